//! Primitive field encodings: LEB128 varints, zigzag for signed values,
//! length-prefixed byte strings.
//!
//! The encoder writes into a borrowed slice and never allocates; the
//! decoder borrows its input and never allocates either, so decoding cost
//! and memory are bounded by the input's size.

use super::error::{DecodeError, EncodeError};

/// Longest LEB128 encoding of a `u64`.
pub(crate) const MAX_VARINT_LEN: usize = 10;

/// Marker for "the buffer has no room left"; mapped to
/// [`EncodeError::Full`](super::EncodeError::Full) by the batch writer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct NoRoom;

impl From<NoRoom> for EncodeError {
    fn from(_: NoRoom) -> Self {
        EncodeError::Full
    }
}

/// Maps a signed value onto an unsigned one so that small magnitudes of
/// either sign give short varints (-1 -> 1, 1 -> 2, -2 -> 3, ...).
pub(crate) fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

/// Inverse of [`zigzag`].
pub(crate) fn unzigzag(u: u64) -> i64 {
    ((u >> 1) as i64) ^ -((u & 1) as i64)
}

/// Appends fields to a fixed slice.
pub(crate) struct Encoder<'b> {
    buf: &'b mut [u8],
    pos: usize,
}

impl<'b> Encoder<'b> {
    pub(crate) fn new(buf: &'b mut [u8], pos: usize) -> Self {
        Encoder { buf, pos }
    }

    pub(crate) fn pos(&self) -> usize {
        self.pos
    }

    pub(crate) fn put_u8(&mut self, v: u8) -> Result<(), NoRoom> {
        let slot = self.buf.get_mut(self.pos).ok_or(NoRoom)?;
        *slot = v;
        self.pos += 1;
        Ok(())
    }

    pub(crate) fn put_raw(&mut self, bytes: &[u8]) -> Result<(), NoRoom> {
        let end = self.pos.checked_add(bytes.len()).ok_or(NoRoom)?;
        let dst = self.buf.get_mut(self.pos..end).ok_or(NoRoom)?;
        dst.copy_from_slice(bytes);
        self.pos = end;
        Ok(())
    }

    pub(crate) fn put_varint(&mut self, mut v: u64) -> Result<(), NoRoom> {
        let mut tmp = [0u8; MAX_VARINT_LEN];
        let mut n = 0;
        loop {
            let low = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                tmp[n] = low;
                n += 1;
                break;
            }
            tmp[n] = low | 0x80;
            n += 1;
        }
        self.put_raw(&tmp[..n])
    }

    pub(crate) fn put_signed(&mut self, v: i64) -> Result<(), NoRoom> {
        self.put_varint(zigzag(v))
    }

    /// A byte string: varint length, then the bytes.
    pub(crate) fn put_bytes(&mut self, bytes: &[u8]) -> Result<(), NoRoom> {
        self.put_varint(bytes.len() as u64)?;
        self.put_raw(bytes)
    }
}

/// Reads fields from a borrowed slice, reporting offsets relative to the
/// start of the enclosing batch.
#[derive(Clone)]
pub(crate) struct Decoder<'a> {
    buf: &'a [u8],
    pos: usize,
    /// Batch offset of `buf[0]`, for error messages.
    base: usize,
}

impl<'a> Decoder<'a> {
    pub(crate) fn new(buf: &'a [u8], base: usize) -> Self {
        Decoder { buf, pos: 0, base }
    }

    /// Batch offset of the next byte to be read.
    pub(crate) fn offset(&self) -> usize {
        self.base + self.pos
    }

    pub(crate) fn pos(&self) -> usize {
        self.pos
    }

    /// The bytes consumed between this decoder's position and `later`'s
    /// (a clone of this decoder that has read further).
    pub(crate) fn slice_to(&self, later: &Decoder<'a>) -> &'a [u8] {
        &self.buf[self.pos..later.pos]
    }

    pub(crate) fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.remaining() == 0
    }

    fn truncated(&self, what: &'static str, needed: u64) -> DecodeError {
        DecodeError::Truncated {
            what,
            offset: self.offset(),
            needed,
            available: self.remaining(),
        }
    }

    pub(crate) fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        let v = *self
            .buf
            .get(self.pos)
            .ok_or_else(|| self.truncated(what, 1))?;
        self.pos += 1;
        Ok(v)
    }

    pub(crate) fn raw(&mut self, what: &'static str, len: u64) -> Result<&'a [u8], DecodeError> {
        if len > self.remaining() as u64 {
            return Err(self.truncated(what, len));
        }
        let start = self.pos;
        self.pos += len as usize;
        Ok(&self.buf[start..self.pos])
    }

    pub(crate) fn varint(&mut self, what: &'static str) -> Result<u64, DecodeError> {
        let start = self.offset();
        let mut value = 0u64;
        for i in 0..MAX_VARINT_LEN {
            let byte = self.u8(what)?;
            let bits = u64::from(byte & 0x7f);
            // The tenth byte may only contribute the top bit of a u64.
            if i == MAX_VARINT_LEN - 1 && bits > 1 {
                return Err(DecodeError::BadVarint {
                    what,
                    offset: start,
                });
            }
            value |= bits << (7 * i);
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(DecodeError::BadVarint {
            what,
            offset: start,
        })
    }

    pub(crate) fn signed(&mut self, what: &'static str) -> Result<i64, DecodeError> {
        Ok(unzigzag(self.varint(what)?))
    }

    pub(crate) fn u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        let offset = self.offset();
        let v = self.varint(what)?;
        u32::try_from(v).map_err(|_| DecodeError::OutOfRange {
            what,
            offset,
            value: v,
        })
    }

    pub(crate) fn u16(&mut self, what: &'static str) -> Result<u16, DecodeError> {
        let offset = self.offset();
        let v = self.varint(what)?;
        u16::try_from(v).map_err(|_| DecodeError::OutOfRange {
            what,
            offset,
            value: v,
        })
    }

    pub(crate) fn i32(&mut self, what: &'static str) -> Result<i32, DecodeError> {
        let offset = self.offset();
        let raw = self.varint(what)?;
        i32::try_from(unzigzag(raw)).map_err(|_| DecodeError::OutOfRange {
            what,
            offset,
            value: raw,
        })
    }

    /// A length-prefixed byte string, borrowed from the input.
    pub(crate) fn bytes(&mut self, what: &'static str) -> Result<&'a [u8], DecodeError> {
        let len = self.varint(what)?;
        self.raw(what, len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varint_boundaries_round_trip() {
        for v in [
            0,
            1,
            127,
            128,
            16_383,
            16_384,
            u64::from(u32::MAX),
            u64::MAX,
        ] {
            let mut buf = [0u8; MAX_VARINT_LEN];
            let mut enc = Encoder::new(&mut buf, 0);
            enc.put_varint(v).unwrap();
            let len = enc.pos();
            let mut dec = Decoder::new(&buf[..len], 0);
            assert_eq!(dec.varint("v").unwrap(), v);
            assert!(dec.is_empty());
        }
    }

    #[test]
    fn varint_rejects_overlong_and_overflow() {
        let overlong = [0x80u8; 11];
        assert!(matches!(
            Decoder::new(&overlong, 0).varint("v"),
            Err(DecodeError::BadVarint { .. })
        ));
        let mut overflow = [0xffu8; 10];
        overflow[9] = 0x02;
        assert!(matches!(
            Decoder::new(&overflow, 0).varint("v"),
            Err(DecodeError::BadVarint { .. })
        ));
    }

    #[test]
    fn zigzag_is_a_bijection_on_edges() {
        for v in [0, -1, 1, i64::MIN, i64::MAX, -4096] {
            assert_eq!(unzigzag(zigzag(v)), v);
        }
        assert_eq!(zigzag(-1), 1);
        assert_eq!(zigzag(1), 2);
    }

    #[test]
    fn encoder_reports_no_room_without_overrunning() {
        let mut buf = [0u8; 3];
        let mut enc = Encoder::new(&mut buf, 0);
        assert_eq!(enc.put_bytes(&[1, 2, 3]), Err(NoRoom));
        assert_eq!(enc.put_varint(u64::MAX), Err(NoRoom));
    }
}
