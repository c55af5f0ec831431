//! Framing: how one [`Message`] is laid out as bytes on the link.
//!
//! ```text
//! offset  size  field
//!      0     2  magic "RW"
//!      2     1  protocol version (2)
//!      3     1  message type
//!      4     4  payload length, u32 LE
//!      8     8  sequence number, u64 LE
//!     16     n  payload
//!   16+n     4  CRC-32 of bytes 0..16+n, u32 LE
//! ```
//!
//! Sequence numbers count frames per direction from 0. The receiver insists
//! on exactly the next number, so a lost, duplicated or replayed frame is an
//! error rather than a silently skipped or doubly applied checkpoint piece.

use crate::error::{Result, WireError};
use crate::message::{Message, MessageType};

pub const MAGIC: [u8; 2] = *b"RW";
/// The frame protocol version. Version 2 dropped messages nobody sent and
/// added the event log's; version 3 put the service and the arbiter's term
/// in the hello; a peer speaking another version is refused on the
/// third byte of its first frame, with an error naming both versions.
pub const VERSION: u8 = 3;
pub const HEADER_LEN: usize = 16;
pub const TRAILER_LEN: usize = 4;
/// Default limit on a frame's payload: large enough for a generous file
/// chunk, small enough that a hostile length field cannot exhaust memory.
pub const DEFAULT_MAX_PAYLOAD: u32 = 16 * 1024 * 1024;

fn frame_len(payload_len: u32) -> usize {
    HEADER_LEN + payload_len as usize + TRAILER_LEN
}

/// Turns messages into frames, numbering them.
#[derive(Debug, Clone)]
pub struct Encoder {
    next_seq: u64,
    max_payload: u32,
}

impl Default for Encoder {
    fn default() -> Self {
        Encoder::new()
    }
}

impl Encoder {
    pub fn new() -> Encoder {
        Encoder::with_max_payload(DEFAULT_MAX_PAYLOAD)
    }

    pub fn with_max_payload(max_payload: u32) -> Encoder {
        Encoder {
            next_seq: 0,
            max_payload,
        }
    }

    /// The sequence number the next encoded frame will carry.
    pub fn next_sequence(&self) -> u64 {
        self.next_seq
    }

    pub fn max_payload(&self) -> u32 {
        self.max_payload
    }

    /// Encodes `msg` as one frame. The sequence number is only used up if
    /// encoding succeeds, so a refused message leaves no gap the peer would
    /// treat as a lost frame.
    pub fn encode(&mut self, msg: &Message) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        self.encode_into(msg, &mut out)?;
        Ok(out)
    }

    /// Like [`Encoder::encode`], appending to `out`. On error `out` is left
    /// as it was.
    pub fn encode_into(&mut self, msg: &Message, out: &mut Vec<u8>) -> Result<()> {
        let seq = self.next_seq;
        let next = seq.checked_add(1).ok_or_else(|| {
            WireError::invalid(msg.message_type().name(), "sequence numbers exhausted")
        })?;
        let start = out.len();
        out.extend_from_slice(&MAGIC);
        out.push(VERSION);
        out.push(msg.message_type().as_u8());
        out.extend_from_slice(&[0; 4]);
        out.extend_from_slice(&seq.to_le_bytes());
        if let Err(e) = msg.encode_payload(out) {
            out.truncate(start);
            return Err(e);
        }
        let payload_len = out.len() - start - HEADER_LEN;
        if payload_len > self.max_payload as usize {
            out.truncate(start);
            return Err(WireError::TooLarge {
                what: "frame payload",
                len: payload_len as u64,
                max: u64::from(self.max_payload),
            });
        }
        // Fits: bounded by max_payload, a u32.
        out[start + 4..start + 8].copy_from_slice(&(payload_len as u32).to_le_bytes());
        let crc = crc32fast::hash(&out[start..]);
        out.extend_from_slice(&crc.to_le_bytes());
        self.next_seq = next;
        Ok(())
    }
}

/// Incremental frame decoder.
///
/// Feed it whatever the transport delivered, in pieces of any size, and pull
/// messages out with [`Decoder::next`]. Everything about a frame that can be
/// judged from its header (magic, version, type, length) is judged as soon as
/// those bytes arrive, so a hostile length is refused before a single payload
/// byte is buffered. The first error is final: the stream position after a bad
/// frame is meaningless, and carrying on would mean guessing.
///
/// Memory: the buffer holds the unconsumed part of what was fed. Its capacity
/// grows towards one maximal frame and beyond only if the caller feeds more
/// than that without calling [`Decoder::next`] in between.
#[derive(Debug)]
pub struct Decoder {
    buf: Vec<u8>,
    pos: usize,
    expected_seq: u64,
    max_payload: u32,
    failed: bool,
}

impl Default for Decoder {
    fn default() -> Self {
        Decoder::new()
    }
}

impl Decoder {
    pub fn new() -> Decoder {
        Decoder::with_max_payload(DEFAULT_MAX_PAYLOAD)
    }

    pub fn with_max_payload(max_payload: u32) -> Decoder {
        Decoder {
            buf: Vec::new(),
            pos: 0,
            expected_seq: 0,
            max_payload,
            failed: false,
        }
    }

    /// The sequence number the next frame must carry.
    pub fn expected_sequence(&self) -> u64 {
        self.expected_seq
    }

    pub fn max_payload(&self) -> u32 {
        self.max_payload
    }

    pub fn has_failed(&self) -> bool {
        self.failed
    }

    /// Bytes fed but not yet consumed as complete frames. Zero at a frame
    /// boundary, which is how a caller tells a clean end of stream from a
    /// truncated one.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.pos
    }

    pub fn feed(&mut self, bytes: &[u8]) {
        if self.failed || bytes.is_empty() {
            return;
        }
        if self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
        }
        let needed = self.buffered() + bytes.len();
        if needed > self.buf.capacity() {
            if self.pos > 0 {
                self.buf.drain(..self.pos);
                self.pos = 0;
            }
            // Amortised doubling, but never past one maximal frame unless the
            // caller's own unconsumed input is already larger than that.
            let cap = frame_len(self.max_payload);
            let target = (self.buf.capacity() * 2).min(cap).max(needed);
            self.buf.reserve_exact(target - self.buf.len());
        }
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete message, `Ok(None)` if more input is needed.
    // The name is the one callers asked for; Iterator does not fit because
    // `None` here means "feed more", not "finished".
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> Result<Option<Message>> {
        if self.failed {
            return Err(WireError::Poisoned);
        }
        match self.parse() {
            Ok(m) => Ok(m),
            Err(e) => {
                self.failed = true;
                self.buf = Vec::new();
                self.pos = 0;
                Err(e)
            }
        }
    }

    fn parse(&mut self) -> Result<Option<Message>> {
        let avail = &self.buf[self.pos..];
        if avail.is_empty() {
            return Ok(None);
        }
        // Judge each header field as soon as it is present, so garbage is
        // refused on its first bytes rather than after a full header arrives.
        if avail[0] != MAGIC[0] || (avail.len() >= 2 && avail[1] != MAGIC[1]) {
            let got = [avail[0], avail.get(1).copied().unwrap_or(0)];
            return Err(WireError::BadMagic(got));
        }
        if let Some(&v) = avail.get(2)
            && v != VERSION
        {
            return Err(WireError::UnsupportedVersion(v));
        }
        if let Some(&t) = avail.get(3)
            && MessageType::from_u8(t).is_none()
        {
            return Err(WireError::UnknownType(t));
        }
        if avail.len() < 8 {
            return Ok(None);
        }
        let len = u32::from_le_bytes([avail[4], avail[5], avail[6], avail[7]]);
        if len > self.max_payload {
            return Err(WireError::TooLarge {
                what: "frame payload",
                len: u64::from(len),
                max: u64::from(self.max_payload),
            });
        }
        let total = frame_len(len);
        if avail.len() < total {
            return Ok(None);
        }
        let frame = &avail[..total];
        let body = &frame[..total - TRAILER_LEN];
        let mut crc_bytes = [0u8; 4];
        crc_bytes.copy_from_slice(&frame[total - TRAILER_LEN..]);
        let expected = u32::from_le_bytes(crc_bytes);
        let actual = crc32fast::hash(body);
        if expected != actual {
            return Err(WireError::CrcMismatch { expected, actual });
        }
        let mut seq_bytes = [0u8; 8];
        seq_bytes.copy_from_slice(&frame[8..16]);
        let seq = u64::from_le_bytes(seq_bytes);
        if seq != self.expected_seq {
            return Err(WireError::Sequence {
                expected: self.expected_seq,
                got: seq,
            });
        }
        // Checked above; cannot fail.
        let ty = MessageType::from_u8(frame[3]).ok_or(WireError::UnknownType(frame[3]))?;
        let msg = Message::decode_payload(ty, &body[HEADER_LEN..])?;
        self.pos += total;
        // A u64 of frames cannot be exhausted in practice; wrapping would
        // reopen replay of frame 0, so treat it as the end of the stream.
        self.expected_seq = self
            .expected_seq
            .checked_add(1)
            .ok_or(WireError::Sequence {
                expected: u64::MAX,
                got: seq,
            })?;
        Ok(Some(msg))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Role;

    fn hb(n: u64) -> Message {
        Message::Heartbeat { sent_unix_ns: n }
    }

    fn frames(msgs: &[Message]) -> Vec<u8> {
        let mut enc = Encoder::new();
        let mut out = Vec::new();
        for m in msgs {
            enc.encode_into(m, &mut out).unwrap();
        }
        out
    }

    fn decode_all(bytes: &[u8]) -> Result<Vec<Message>> {
        let mut d = Decoder::new();
        d.feed(bytes);
        let mut out = Vec::new();
        while let Some(m) = d.next()? {
            out.push(m);
        }
        Ok(out)
    }

    fn fix_crc(frame: &mut [u8]) {
        let n = frame.len() - TRAILER_LEN;
        let crc = crc32fast::hash(&frame[..n]);
        frame[n..].copy_from_slice(&crc.to_le_bytes());
    }

    /// A frame with arbitrary header fields and payload, correctly checksummed.
    fn raw_frame(ty: u8, seq: u64, payload: &[u8]) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(&MAGIC);
        f.push(VERSION);
        f.push(ty);
        f.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        f.extend_from_slice(&seq.to_le_bytes());
        f.extend_from_slice(payload);
        f.extend_from_slice(&[0; 4]);
        fix_crc(&mut f);
        f
    }

    #[test]
    fn layout_is_as_documented() {
        let f = Encoder::new().encode(&hb(0x0102)).unwrap();
        assert_eq!(&f[0..2], b"RW");
        assert_eq!(f[2], 3);
        assert_eq!(f[3], MessageType::Heartbeat.as_u8());
        assert_eq!(u32::from_le_bytes(f[4..8].try_into().unwrap()), 8);
        assert_eq!(u64::from_le_bytes(f[8..16].try_into().unwrap()), 0);
        assert_eq!(&f[16..24], &0x0102u64.to_le_bytes());
        assert_eq!(
            u32::from_le_bytes(f[24..28].try_into().unwrap()),
            crc32fast::hash(&f[..24])
        );
        assert_eq!(f.len(), 28);
    }

    #[test]
    fn encoder_numbers_frames_from_zero() {
        let mut enc = Encoder::new();
        for i in 0..3 {
            assert_eq!(enc.next_sequence(), i);
            let f = enc.encode(&hb(i)).unwrap();
            assert_eq!(u64::from_le_bytes(f[8..16].try_into().unwrap()), i);
        }
    }

    #[test]
    fn decodes_byte_by_byte() {
        let msgs = [
            hb(1),
            Message::Hello {
                role: Role::Primary,
                node: "a".into(),
                service: "svc".into(),
                term: None,
            },
            hb(2),
        ];
        let bytes = frames(&msgs);
        let mut d = Decoder::new();
        let mut got = Vec::new();
        for b in &bytes {
            d.feed(std::slice::from_ref(b));
            while let Some(m) = d.next().unwrap() {
                got.push(m);
            }
        }
        assert_eq!(got, msgs);
        assert_eq!(d.buffered(), 0);
        assert_eq!(d.expected_sequence(), 3);
    }

    #[test]
    fn rejects_bad_magic_on_first_byte() {
        let mut d = Decoder::new();
        d.feed(b"G");
        assert!(matches!(d.next(), Err(WireError::BadMagic(_))));

        let mut f = frames(&[hb(1)]);
        f[1] = b'X';
        assert!(matches!(
            decode_all(&f),
            Err(WireError::BadMagic([b'R', b'X']))
        ));
    }

    #[test]
    fn rejects_other_versions() {
        for v in [0, 1, 2, 4, 255] {
            let mut f = frames(&[hb(1)]);
            f[2] = v;
            fix_crc(&mut f);
            let e = decode_all(&f).unwrap_err();
            assert!(
                matches!(e, WireError::UnsupportedVersion(x) if x == v),
                "{e:?}"
            );
            // Before the rest of the header arrives.
            let mut d = Decoder::new();
            d.feed(&f[..3]);
            assert!(matches!(d.next(), Err(WireError::UnsupportedVersion(_))));
        }
        // The message says what to do about it.
        let text = WireError::UnsupportedVersion(1).to_string();
        assert!(text.contains("version 1"), "{text}");
        assert!(text.contains("version 3"), "{text}");
    }

    #[test]
    fn rejects_unknown_type() {
        // 7 is Refused, retired in version 2.
        for t in [0u8, 7, 16, 200, 255] {
            let f = raw_frame(t, 0, &[]);
            assert!(matches!(decode_all(&f), Err(WireError::UnknownType(x)) if x == t));
            let mut d = Decoder::new();
            d.feed(&f[..4]);
            assert!(matches!(d.next(), Err(WireError::UnknownType(_))));
        }
    }

    #[test]
    fn rejects_oversized_length_from_header_alone() {
        let mut d = Decoder::with_max_payload(1024);
        let mut header = vec![b'R', b'W', VERSION, 4];
        header.extend_from_slice(&1025u32.to_le_bytes());
        d.feed(&header);
        match d.next() {
            Err(WireError::TooLarge {
                len: 1025,
                max: 1024,
                ..
            }) => {}
            other => panic!("{other:?}"),
        }
        // Default limit: a 4 GiB claim is refused without buffering.
        let mut d = Decoder::new();
        let mut header = vec![b'R', b'W', VERSION, 4];
        header.extend_from_slice(&u32::MAX.to_le_bytes());
        d.feed(&header);
        assert!(matches!(d.next(), Err(WireError::TooLarge { .. })));
    }

    #[test]
    fn accepts_payload_exactly_at_limit() {
        let data = vec![7u8; 100];
        let m = Message::FileChunk {
            epoch: 1,
            name: "f".into(),
            offset: 0,
            data,
        };
        let mut probe = Vec::new();
        m.encode_payload(&mut probe).unwrap();
        let limit = probe.len() as u32;
        let f = Encoder::with_max_payload(limit).encode(&m).unwrap();
        let mut d = Decoder::with_max_payload(limit);
        d.feed(&f);
        assert_eq!(d.next().unwrap(), Some(m.clone()));
        assert!(matches!(
            Encoder::with_max_payload(limit - 1).encode(&m),
            Err(WireError::TooLarge { .. })
        ));
        let mut d = Decoder::with_max_payload(limit - 1);
        d.feed(&f);
        assert!(matches!(d.next(), Err(WireError::TooLarge { .. })));
    }

    #[test]
    fn rejects_crc_mismatch() {
        let clean = frames(&[hb(5)]);
        for i in HEADER_LEN..clean.len() {
            let mut f = clean.clone();
            f[i] ^= 0x10;
            assert!(
                matches!(decode_all(&f), Err(WireError::CrcMismatch { .. })),
                "byte {i}"
            );
        }
        // Sequence field corrupted in transit is a CRC error, not a
        // misleading sequence error.
        let mut f = clean.clone();
        f[9] ^= 1;
        assert!(matches!(decode_all(&f), Err(WireError::CrcMismatch { .. })));
    }

    #[test]
    fn rejects_out_of_order_replayed_and_missing_frames() {
        let f0 = raw_frame(8, 0, &1u64.to_le_bytes());
        let f1 = raw_frame(8, 1, &1u64.to_le_bytes());
        let f2 = raw_frame(8, 2, &1u64.to_le_bytes());

        // Stream starting at 1.
        let r = decode_all(&f1);
        assert!(matches!(
            r,
            Err(WireError::Sequence {
                expected: 0,
                got: 1
            })
        ));
        // Replay of frame 0.
        let r = decode_all(&[f0.clone(), f0.clone()].concat());
        assert!(matches!(
            r,
            Err(WireError::Sequence {
                expected: 1,
                got: 0
            })
        ));
        // Frame 1 missing.
        let r = decode_all(&[f0.clone(), f2.clone()].concat());
        assert!(matches!(
            r,
            Err(WireError::Sequence {
                expected: 1,
                got: 2
            })
        ));
        // Swapped.
        let r = decode_all(&[f0, f2, f1].concat());
        assert!(matches!(
            r,
            Err(WireError::Sequence {
                expected: 1,
                got: 2
            })
        ));
    }

    #[test]
    fn rejects_payload_that_does_not_decode() {
        // Heartbeat with 7 bytes instead of 8.
        let r = decode_all(&raw_frame(8, 0, &[0; 7]));
        assert!(matches!(r, Err(WireError::Malformed { .. })));
        // Heartbeat with a trailing byte.
        let r = decode_all(&raw_frame(8, 0, &[0; 9]));
        assert!(matches!(r, Err(WireError::Malformed { .. })));
        // FileChunk whose data length exceeds the frame.
        let mut p = Vec::new();
        p.extend_from_slice(&1u64.to_le_bytes());
        p.extend_from_slice(&[1, b'f']);
        p.extend_from_slice(&0u64.to_le_bytes());
        p.extend_from_slice(&(u32::MAX).to_le_bytes());
        let r = decode_all(&raw_frame(4, 0, &p));
        assert!(matches!(r, Err(WireError::Malformed { .. })));
        // FileChunk escaping the staging directory.
        let mut p = Vec::new();
        p.extend_from_slice(&1u64.to_le_bytes());
        p.extend_from_slice(&[2, b'.', b'.']);
        p.extend_from_slice(&0u64.to_le_bytes());
        p.extend_from_slice(&0u32.to_le_bytes());
        let r = decode_all(&raw_frame(4, 0, &p));
        assert!(matches!(r, Err(WireError::Malformed { .. })));
    }

    #[test]
    fn stays_failed_after_an_error() {
        let mut d = Decoder::new();
        d.feed(b"XX");
        assert!(d.next().is_err());
        assert!(d.has_failed());
        d.feed(&frames(&[hb(1)]));
        for _ in 0..3 {
            assert!(matches!(d.next(), Err(WireError::Poisoned)));
        }
        assert_eq!(d.buffered(), 0);
    }

    #[test]
    fn partial_input_needs_more() {
        let f = frames(&[hb(1)]);
        for cut in 0..f.len() {
            let mut d = Decoder::new();
            d.feed(&f[..cut]);
            assert_eq!(d.next().unwrap(), None, "cut {cut}");
            d.feed(&f[cut..]);
            assert_eq!(d.next().unwrap(), Some(hb(1)));
        }
    }

    #[test]
    fn buffer_capacity_stays_near_one_frame() {
        let max = 64 * 1024;
        let m = Message::FileChunk {
            epoch: 1,
            name: "f".into(),
            offset: 0,
            data: vec![0; max as usize - 64],
        };
        let mut enc = Encoder::with_max_payload(max);
        let mut d = Decoder::with_max_payload(max);
        for _ in 0..20 {
            let f = enc.encode(&m).unwrap();
            for piece in f.chunks(1000) {
                d.feed(piece);
                while d.next().unwrap().is_some() {}
            }
        }
        assert!(d.buf.capacity() <= frame_len(max), "{}", d.buf.capacity());
    }
}
