//! Batches: a checksummed header followed by a run of records of one
//! thread.
//!
//! The recorder appends records into a fixed per-thread buffer with
//! [`BatchWriter`] and ships the finished batch through the shared-memory
//! ring; the agent checks it with [`BatchReader`] before storing it. The
//! exact layout is given in the crate's `README.md`.

use super::codec::{Decoder, Encoder};
use super::error::{DecodeError, EncodeError};
use super::event::{Event, Record};

/// Magic number opening every batch: the bytes `RRCL`.
pub const BATCH_MAGIC: u32 = u32::from_le_bytes(*b"RRCL");
/// Format version written by this build, and the only one it reads.
pub const FORMAT_VERSION: u16 = 2;
/// Length of the fixed batch header.
pub const HEADER_LEN: usize = 32;
/// Largest payload a batch may carry. Writers never produce more, and
/// readers refuse to trust (or allocate for) a header claiming more.
pub const MAX_PAYLOAD_LEN: usize = 16 << 20;

/// Offset of the CRC field; the CRC covers the header bytes before it and
/// then the payload.
const CRC_OFFSET: usize = 28;

/// The decoded fixed header of a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchHeader {
    /// Format version (always [`FORMAT_VERSION`] once parsed).
    pub version: u16,
    /// The thread log the records belong to.
    pub log_id: u32,
    /// Number of records in the payload.
    pub record_count: u32,
    /// Global sequence number of the first record (0 in an empty batch).
    pub first_seq: u64,
    /// Length of the payload following the header.
    pub payload_len: u32,
    /// CRC-32 of header bytes 0..28 followed by the payload.
    pub crc: u32,
}

impl BatchHeader {
    /// Parses and checks the fixed header at the start of `bytes` (magic,
    /// version, reserved flags, payload limit). The payload and CRC are
    /// not looked at.
    pub fn parse(bytes: &[u8]) -> Result<Self, DecodeError> {
        let h: &[u8; HEADER_LEN] = bytes
            .get(..HEADER_LEN)
            .and_then(|h| h.try_into().ok())
            .ok_or(DecodeError::Truncated {
                what: "batch header",
                offset: 0,
                needed: HEADER_LEN as u64,
                available: bytes.len(),
            })?;
        let u16_at = |o: usize| u16::from_le_bytes([h[o], h[o + 1]]);
        let u32_at = |o: usize| u32::from_le_bytes([h[o], h[o + 1], h[o + 2], h[o + 3]]);
        let magic = u32_at(0);
        if magic != BATCH_MAGIC {
            return Err(DecodeError::BadMagic {
                found: magic,
                expected: BATCH_MAGIC,
            });
        }
        let version = u16_at(4);
        if version != FORMAT_VERSION {
            return Err(DecodeError::UnsupportedVersion {
                found: version,
                supported: FORMAT_VERSION,
            });
        }
        let flags = u16_at(6);
        if flags != 0 {
            return Err(DecodeError::ReservedFlags { flags });
        }
        let payload_len = u32_at(24);
        if payload_len as usize > MAX_PAYLOAD_LEN {
            return Err(DecodeError::Oversized {
                len: u64::from(payload_len),
                max: MAX_PAYLOAD_LEN as u64,
            });
        }
        let mut seq = [0u8; 8];
        seq.copy_from_slice(&h[16..24]);
        Ok(BatchHeader {
            version,
            log_id: u32_at(8),
            record_count: u32_at(12),
            first_seq: u64::from_le_bytes(seq),
            payload_len,
            crc: u32_at(CRC_OFFSET),
        })
    }

    /// Total length of the batch, header included.
    pub fn batch_len(&self) -> usize {
        HEADER_LEN + self.payload_len as usize
    }

    fn write(&self, out: &mut [u8; HEADER_LEN]) {
        out[0..4].copy_from_slice(&BATCH_MAGIC.to_le_bytes());
        out[4..6].copy_from_slice(&self.version.to_le_bytes());
        out[6..8].copy_from_slice(&0u16.to_le_bytes());
        out[8..12].copy_from_slice(&self.log_id.to_le_bytes());
        out[12..16].copy_from_slice(&self.record_count.to_le_bytes());
        out[16..24].copy_from_slice(&self.first_seq.to_le_bytes());
        out[24..28].copy_from_slice(&self.payload_len.to_le_bytes());
        out[28..32].copy_from_slice(&self.crc.to_le_bytes());
    }
}

fn batch_crc(header: &[u8], payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&header[..CRC_OFFSET]);
    h.update(payload);
    h.finalize()
}

/// Appends records to a batch in a caller-provided buffer.
///
/// Never allocates and never panics, so it can run inside interposed libc
/// calls and signal handlers. When a record does not fit, `push` returns
/// [`EncodeError::Full`] and leaves the batch as it was; the caller ships
/// the batch ([`finish`](Self::finish)), [`reset`](Self::reset)s, and
/// pushes again.
pub struct BatchWriter<'b> {
    buf: &'b mut [u8],
    /// Bytes in use, header included.
    len: usize,
    log_id: u32,
    count: u32,
    first_seq: u64,
    last_seq: u64,
}

impl<'b> BatchWriter<'b> {
    /// Starts an empty batch for thread log `log_id` in `buf`. Only the
    /// first `HEADER_LEN + MAX_PAYLOAD_LEN` bytes of `buf` are ever used.
    pub fn new(buf: &'b mut [u8], log_id: u32) -> Result<Self, EncodeError> {
        if buf.len() < HEADER_LEN {
            return Err(EncodeError::BufferTooSmall {
                len: buf.len(),
                header: HEADER_LEN,
            });
        }
        let usable = buf.len().min(HEADER_LEN + MAX_PAYLOAD_LEN);
        Ok(BatchWriter {
            buf: &mut buf[..usable],
            len: HEADER_LEN,
            log_id,
            count: 0,
            first_seq: 0,
            last_seq: 0,
        })
    }

    /// Appends one record, or reports why it cannot.
    ///
    /// On any error the batch is unchanged.
    pub fn push(&mut self, record: &Record<'_>) -> Result<(), EncodeError> {
        if self.count > 0 && record.seq <= self.last_seq {
            return Err(EncodeError::SeqNotIncreasing {
                prev: self.last_seq,
                next: record.seq,
            });
        }
        if self.count == u32::MAX {
            return Err(EncodeError::Full);
        }
        let mut out = Encoder::new(self.buf, self.len);
        out.put_u8(record.event.tag())?;
        if self.count > 0 {
            // Strictly increasing, so the smallest step (1) encodes as 0.
            out.put_varint(record.seq - self.last_seq - 1)?;
        }
        out.put_varint(record.time_delta_ns)?;
        record.event.encode_body(&mut out)?;
        self.len = out.pos();
        if self.count == 0 {
            self.first_seq = record.seq;
        }
        self.last_seq = record.seq;
        self.count += 1;
        Ok(())
    }

    /// Number of records in the batch.
    pub fn record_count(&self) -> u32 {
        self.count
    }

    /// Whether no record has been pushed since the last reset.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Bytes the batch occupies, header included.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Bytes still free for records.
    pub fn remaining(&self) -> usize {
        self.buf.len() - self.len
    }

    /// Seals the header (counts, CRC) and returns the complete batch.
    ///
    /// The writer stays usable: pushing more records and finishing again
    /// yields a longer batch with a fresh header.
    pub fn finish(&mut self) -> &[u8] {
        let (header, payload) = self.buf[..self.len].split_at_mut(HEADER_LEN);
        let mut fixed = BatchHeader {
            version: FORMAT_VERSION,
            log_id: self.log_id,
            record_count: self.count,
            first_seq: if self.count == 0 { 0 } else { self.first_seq },
            // Bounded by MAX_PAYLOAD_LEN through `new`'s clamp.
            payload_len: payload.len() as u32,
            crc: 0,
        };
        let mut bytes = [0u8; HEADER_LEN];
        fixed.write(&mut bytes);
        fixed.crc = batch_crc(&bytes, payload);
        fixed.write(&mut bytes);
        header.copy_from_slice(&bytes);
        &self.buf[..self.len]
    }

    /// Empties the batch and makes it thread log `log_id`'s, keeping the
    /// buffer.
    pub fn restart(&mut self, log_id: u32) {
        self.reset();
        self.log_id = log_id;
    }

    /// The thread log the batch is for.
    pub fn log_id(&self) -> u32 {
        self.log_id
    }

    /// Empties the batch, keeping the buffer and log id.
    pub fn reset(&mut self) {
        self.len = HEADER_LEN;
        self.count = 0;
        self.first_seq = 0;
        self.last_seq = 0;
    }
}

/// Walks the records of a validated payload; shared by [`BatchReader`]
/// and the file reader, which owns its buffer.
#[derive(Debug, Clone)]
pub(crate) struct RecordCursor {
    pos: usize,
    left: u32,
    prev: Option<u64>,
    first_seq: u64,
    /// Set after an error so the walk stops instead of reporting garbage.
    failed: bool,
}

impl RecordCursor {
    pub(crate) fn new(header: &BatchHeader) -> Self {
        RecordCursor {
            pos: 0,
            left: header.record_count,
            prev: None,
            first_seq: header.first_seq,
            failed: false,
        }
    }

    /// A cursor with nothing left to read.
    pub(crate) fn exhausted() -> Self {
        RecordCursor {
            pos: 0,
            left: 0,
            prev: None,
            first_seq: 0,
            failed: true,
        }
    }

    pub(crate) fn is_done(&self) -> bool {
        self.failed || self.left == 0
    }

    pub(crate) fn next<'a>(
        &mut self,
        payload: &'a [u8],
    ) -> Result<Option<Record<'a>>, DecodeError> {
        if self.failed {
            return Ok(None);
        }
        if self.left == 0 {
            self.failed = true;
            return match payload.len().saturating_sub(self.pos) {
                0 => Ok(None),
                count => Err(DecodeError::TrailingBytes { count }),
            };
        }
        match self.decode_one(payload) {
            Ok(r) => Ok(Some(r)),
            Err(e) => {
                self.failed = true;
                Err(e)
            }
        }
    }

    fn decode_one<'a>(&mut self, payload: &'a [u8]) -> Result<Record<'a>, DecodeError> {
        let rest = payload.get(self.pos..).unwrap_or_default();
        let mut dec = Decoder::new(rest, HEADER_LEN + self.pos);
        let tag_offset = dec.offset();
        let tag = dec.u8("record tag")?;
        let seq = match self.prev {
            None => self.first_seq,
            Some(prev) => {
                let gap = dec.varint("sequence gap")?;
                prev.checked_add(1)
                    .and_then(|s| s.checked_add(gap))
                    .ok_or(DecodeError::SeqOverflow { prev })?
            }
        };
        let time_delta_ns = dec.varint("time delta")?;
        let event = Event::decode_body(tag, tag_offset, &mut dec)?;
        self.pos += dec.pos();
        self.left -= 1;
        self.prev = Some(seq);
        Ok(Record {
            seq,
            time_delta_ns,
            event,
        })
    }
}

fn verify(bytes: &[u8]) -> Result<(BatchHeader, &[u8]), DecodeError> {
    let header = BatchHeader::parse(bytes)?;
    let payload = bytes
        .get(HEADER_LEN..header.batch_len())
        .ok_or(DecodeError::Truncated {
            what: "batch payload",
            offset: HEADER_LEN,
            needed: u64::from(header.payload_len),
            available: bytes.len() - HEADER_LEN,
        })?;
    let computed = batch_crc(bytes, payload);
    if computed != header.crc {
        return Err(DecodeError::Checksum {
            stored: header.crc,
            computed,
        });
    }
    Ok((header, payload))
}

/// Checks a whole batch (header, CRC) in place; used by the file reader.
pub(crate) fn verify_batch(bytes: &[u8]) -> Result<BatchHeader, DecodeError> {
    verify(bytes).map(|(h, _)| h)
}

/// What [`BatchReader::validate`] learned about a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchSummary {
    /// Its header.
    pub header: BatchHeader,
    /// Sequence number of its last record, if it has any.
    pub last_seq: Option<u64>,
}

/// Decodes the records of one batch, borrowing from the input.
///
/// Construction checks the header and CRC; each record is checked as it
/// is read. Nothing is allocated, so a hostile input costs at most a pass
/// over its own bytes.
pub struct BatchReader<'a> {
    header: BatchHeader,
    payload: &'a [u8],
    cursor: RecordCursor,
}

impl<'a> BatchReader<'a> {
    /// Opens the batch that makes up all of `bytes`.
    pub fn new(bytes: &'a [u8]) -> Result<Self, DecodeError> {
        let (reader, rest) = Self::split_first(bytes)?;
        if !rest.is_empty() {
            return Err(DecodeError::TrailingBytes { count: rest.len() });
        }
        Ok(reader)
    }

    /// Opens the batch at the start of `bytes`, returning what follows it.
    pub fn split_first(bytes: &'a [u8]) -> Result<(Self, &'a [u8]), DecodeError> {
        let (header, payload) = verify(bytes)?;
        let reader = BatchReader {
            header,
            payload,
            cursor: RecordCursor::new(&header),
        };
        Ok((reader, &bytes[header.batch_len()..]))
    }

    /// Decodes every record of the batch at the start of `bytes` without
    /// keeping them, checking the whole structure.
    pub fn validate(bytes: &'a [u8]) -> Result<BatchSummary, DecodeError> {
        let mut reader = Self::new(bytes)?;
        let mut last_seq = None;
        while let Some(r) = reader.next_record()? {
            last_seq = Some(r.seq);
        }
        Ok(BatchSummary {
            header: reader.header,
            last_seq,
        })
    }

    /// The batch header.
    pub fn header(&self) -> &BatchHeader {
        &self.header
    }

    /// The next record, `None` after the last one. After an error the
    /// reader stays at its end.
    pub fn next_record(&mut self) -> Result<Option<Record<'a>>, DecodeError> {
        self.cursor.next(self.payload)
    }
}

impl<'a> Iterator for BatchReader<'a> {
    type Item = Result<Record<'a>, DecodeError>;

    fn next(&mut self) -> Option<Self::Item> {
        self.next_record().transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::Bytes;

    fn rec(seq: u64, event: Event<'_>) -> Record<'_> {
        Record {
            seq,
            time_delta_ns: 7,
            event,
        }
    }

    #[test]
    fn header_layout_is_as_documented() {
        let mut buf = [0u8; 128];
        let mut w = BatchWriter::new(&mut buf, 0x0102_0304).unwrap();
        w.push(&rec(0x1122, Event::Time { sec: 5 })).unwrap();
        let batch = w.finish();
        assert_eq!(&batch[0..4], b"RRCL");
        assert_eq!(&batch[4..6], &[2, 0]);
        assert_eq!(&batch[6..8], &[0, 0]);
        assert_eq!(&batch[8..12], &[4, 3, 2, 1]);
        assert_eq!(&batch[12..16], &[1, 0, 0, 0]);
        assert_eq!(&batch[16..24], &[0x22, 0x11, 0, 0, 0, 0, 0, 0]);
        // tag, time delta, zigzag(5)
        assert_eq!(&batch[24..28], &[3, 0, 0, 0]);
        assert_eq!(&batch[32..], &[super::super::tag::TIME, 7, 10]);
        let crc = batch_crc(batch, &batch[32..]);
        assert_eq!(&batch[28..32], &crc.to_le_bytes());
    }

    #[test]
    fn sequence_gaps_encode_and_decode() {
        let mut buf = [0u8; 256];
        let mut w = BatchWriter::new(&mut buf, 1).unwrap();
        for seq in [10, 11, 15, 1 << 40] {
            w.push(&rec(seq, Event::ThreadExit)).unwrap();
        }
        assert_eq!(
            w.push(&rec(3, Event::ThreadExit)),
            Err(EncodeError::SeqNotIncreasing {
                prev: 1 << 40,
                next: 3
            })
        );
        let batch = w.finish().to_vec();
        let seqs: Vec<u64> = BatchReader::new(&batch)
            .unwrap()
            .map(|r| r.unwrap().seq)
            .collect();
        assert_eq!(seqs, [10, 11, 15, 1 << 40]);
    }

    #[test]
    fn full_push_leaves_batch_intact() {
        let mut buf = [0u8; HEADER_LEN + 12];
        let mut w = BatchWriter::new(&mut buf, 1).unwrap();
        let data = [0xabu8; 8];
        let ev = Event::Getrandom {
            ret: 8,
            data: Bytes::Flat(&data),
        };
        w.push(&rec(1, ev)).unwrap();
        let used = w.len();
        assert_eq!(w.push(&rec(2, ev)), Err(EncodeError::Full));
        assert_eq!(w.len(), used);
        assert_eq!(w.record_count(), 1);
        let batch = w.finish().to_vec();
        assert_eq!(BatchReader::validate(&batch).unwrap().last_seq, Some(1));
        w.reset();
        w.push(&rec(2, ev)).unwrap();
    }

    #[test]
    fn tiny_buffer_is_rejected() {
        let mut buf = [0u8; HEADER_LEN - 1];
        assert!(matches!(
            BatchWriter::new(&mut buf, 0),
            Err(EncodeError::BufferTooSmall { .. })
        ));
    }

    #[test]
    fn declared_count_beyond_payload_is_an_error() {
        let mut buf = [0u8; 64];
        let mut w = BatchWriter::new(&mut buf, 1).unwrap();
        w.push(&rec(1, Event::ThreadExit)).unwrap();
        w.finish();
        // Claim two records, then fix the CRC so only the structure is wrong.
        buf[12] = 2;
        let len = HEADER_LEN + 2;
        let crc = batch_crc(&buf[..len], &buf[HEADER_LEN..len]);
        buf[28..32].copy_from_slice(&crc.to_le_bytes());
        let mut r = BatchReader::new(&buf[..len]).unwrap();
        assert!(r.next_record().unwrap().is_some());
        assert!(matches!(
            r.next_record(),
            Err(DecodeError::Truncated {
                what: "record tag",
                ..
            })
        ));
        assert_eq!(r.next_record(), Ok(None));
    }
}
