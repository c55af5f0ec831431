//! The backup's log: everything the primary's program did since the last
//! committed checkpoint (event records) and every frame it was given (the
//! net log), kept until a later checkpoint covers it.
//!
//! Records arrive out of order across threads (each thread's ring is
//! drained on its own), so what the backup can vouch for is the contiguous
//! run of record numbers from the checkpoint on: that, and the net log's
//! run, is what it acknowledges. A record after which a replay cannot go
//! on (a `fork` whose child was not recorded, an event too large for the
//! log) is a barrier: the acknowledgement stops before it until a
//! checkpoint taken after it is committed.
//!
//! Everything sent is checked as it arrives (every batch decoded whole);
//! a batch that does not check out is refused whole.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use rrc_rr::log::{BatchReader, BatchWriter, DecodeError, EncodeError, Event, LogError, LogWriter};

use crate::netlog;
use crate::position::{Contiguous, LogPosition};

#[derive(Debug, thiserror::Error)]
pub enum LogStoreError {
    #[error("a log batch does not check out: {0}")]
    Batch(#[from] DecodeError),
    #[error("net log frame {0} is longer than a frame can be")]
    FrameTooLong(u64),
    #[error("re-encoding a record: {0}")]
    Encode(#[from] EncodeError),
    #[error("writing the log: {0}")]
    Log(#[from] LogError),
    #[error("writing the net log: {0}")]
    Net(#[from] netlog::NetLogError),
}

/// One thread's batch as it came, with the record numbers it holds.
struct Stored {
    first: u64,
    last: u64,
    bytes: Vec<u8>,
}

/// The log held since the last committed checkpoint.
pub struct LogStore {
    /// Where the last committed checkpoint stands.
    base: LogPosition,
    records: Contiguous,
    /// Records a replay cannot go past.
    barriers: BTreeSet<u64>,
    batches: Vec<Stored>,
    net: Contiguous,
    frames: BTreeMap<u64, Vec<u8>>,
}

/// Whether a replay cannot go past `e`: the log is no use beyond it until a
/// checkpoint taken after it.
pub fn stops_replay(e: &Event<'_>) -> bool {
    match e {
        Event::ForkUnsupported => true,
        // What an event too large for the log is replaced with.
        Event::Syscall { nr, .. } => *nr == u32::MAX,
        _ => false,
    }
}

impl LogStore {
    /// An empty log starting at `base`.
    pub fn new(base: LogPosition) -> LogStore {
        LogStore {
            base,
            records: Contiguous::from_base(base.records),
            barriers: BTreeSet::new(),
            batches: Vec::new(),
            net: Contiguous::from_base(base.net),
            frames: BTreeMap::new(),
        }
    }

    /// Takes record batches (back to back, as one `Log` message carries
    /// them). Every batch is checked before any is kept.
    pub fn add_records(&mut self, data: &[u8]) -> Result<(), LogStoreError> {
        let mut checked = Vec::new();
        let mut rest = data;
        while !rest.is_empty() {
            let (mut batch, next) = BatchReader::split_first(rest)?;
            let len = rest.len() - next.len();
            let mut seqs = Vec::new();
            let mut barriers = Vec::new();
            while let Some(r) = batch.next_record()? {
                seqs.push(r.seq);
                if stops_replay(&r.event) {
                    barriers.push(r.seq);
                }
            }
            checked.push((&rest[..len], seqs, barriers));
            rest = next;
        }
        for (bytes, seqs, barriers) in checked {
            let (Some(&first), Some(&last)) = (seqs.first(), seqs.last()) else {
                continue;
            };
            if last <= self.base.records {
                continue;
            }
            for s in seqs {
                self.records.insert(s);
            }
            self.barriers
                .extend(barriers.into_iter().filter(|b| *b > self.base.records));
            self.batches.push(Stored {
                first,
                last,
                bytes: bytes.to_vec(),
            });
        }
        Ok(())
    }

    /// Takes net log frames numbered from `first`.
    pub fn add_frames(&mut self, first: u64, frames: Vec<Vec<u8>>) -> Result<(), LogStoreError> {
        for (i, f) in frames.into_iter().enumerate() {
            let n = first + i as u64;
            if f.len() > netlog::MAX_FRAME {
                return Err(LogStoreError::FrameTooLong(n));
            }
            if n <= self.base.net {
                continue;
            }
            self.net.insert(n);
            self.frames.insert(n, f);
        }
        Ok(())
    }

    /// What the backup holds without a gap, stopping before a barrier.
    pub fn acknowledged(&self) -> LogPosition {
        let mut records = self.records.prefix();
        if let Some(b) = self.barriers.first() {
            records = records.min(b - 1);
        }
        LogPosition {
            records,
            net: self.net.prefix(),
        }
    }

    /// A checkpoint standing at `at` is committed: what it covers goes.
    pub fn committed(&mut self, at: LogPosition) {
        let at = at.max(self.base);
        self.base = at;
        self.records.advance_to(at.records);
        self.net.advance_to(at.net);
        self.barriers = self.barriers.split_off(&(at.records + 1));
        self.batches.retain(|b| b.last > at.records);
        self.frames = self.frames.split_off(&(at.net + 1));
    }

    /// Writes the acknowledged log (records after the base up to the
    /// acknowledgement, each thread's in its own file, and the net log)
    /// into the log directory `dir`, which must not hold a log yet. Returns
    /// the positions it runs between.
    pub fn write_to(&self, dir: &Path) -> Result<(LogPosition, LogPosition), LogStoreError> {
        let until = self.acknowledged();
        let mut log = LogWriter::create(dir)?;
        let mut buf = vec![0u8; rrc_rr::log::HEADER_LEN + rrc_rr::log::MAX_PAYLOAD_LEN];
        // A thread's batches may arrive out of order (two drains of its
        // ring racing to the link); its log file takes them in order. They
        // never overlap: a thread's records only rise.
        let mut batches: Vec<&Stored> = self.batches.iter().collect();
        batches.sort_by_key(|b| b.first);
        for b in batches {
            if b.last <= self.base.records || b.first > until.records {
                continue;
            }
            if b.first > self.base.records && b.last <= until.records {
                log.append(&b.bytes)?;
                continue;
            }
            // Partly inside: only the records that are.
            let mut reader = BatchReader::new(&b.bytes)?;
            // A record decoded from a valid batch fits in an empty batch
            // of the largest size.
            let mut w = BatchWriter::new(&mut buf, reader.header().log_id)?;
            while let Some(r) = reader.next_record()? {
                if r.seq > self.base.records && r.seq <= until.records {
                    w.push(&r)?;
                }
            }
            if !w.is_empty() {
                log.append(w.finish())?;
            }
        }
        log.sync()?;
        netlog::write(
            dir,
            self.frames
                .iter()
                .filter(|(n, _)| **n > self.base.net && **n <= until.net)
                .map(|(n, f)| (*n, f.as_slice())),
        )?;
        Ok((self.base, until))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rrc_rr::log::{LogReader, Record};

    /// One batch of thread `id` holding `events` at the given numbers.
    fn batch(id: u32, events: &[(u64, Event<'static>)]) -> Vec<u8> {
        let mut buf = vec![0u8; 4096];
        let mut w = BatchWriter::new(&mut buf, id).unwrap();
        for (seq, event) in events {
            w.push(&Record {
                seq: *seq,
                time_delta_ns: 1,
                event: *event,
            })
            .unwrap();
        }
        w.finish().to_vec()
    }

    fn time(sec: i64) -> Event<'static> {
        Event::Time { sec }
    }

    #[test]
    fn acknowledges_the_contiguous_run_and_stops_at_barriers() {
        let mut s = LogStore::new(LogPosition {
            records: 10,
            net: 4,
        });
        let mut data = batch(1, &[(9, time(0)), (11, time(1)), (13, time(3))]);
        data.extend(batch(2, &[(14, time(4))]));
        s.add_records(&data).unwrap();
        // 12 is missing: the run stops at 11.
        assert_eq!(s.acknowledged().records, 11);
        s.add_records(&batch(2, &[(12, time(2)), (15, Event::ForkUnsupported)]))
            .unwrap();
        s.add_records(&batch(1, &[(16, time(6))])).unwrap();
        // Contiguous to 16, but a replay cannot pass the fork at 15.
        assert_eq!(s.acknowledged().records, 14);
        s.add_frames(5, vec![vec![1], vec![2]]).unwrap();
        s.add_frames(8, vec![vec![4]]).unwrap();
        assert_eq!(s.acknowledged().net, 6);
        // A bad batch is refused whole, and changes nothing.
        let mut bad = batch(1, &[(17, time(7))]);
        let last = bad.len() - 1;
        bad[last] ^= 0xff;
        let before = s.acknowledged();
        let mut two = batch(3, &[(17, time(7))]);
        two.extend(bad);
        assert!(s.add_records(&two).is_err());
        assert_eq!(s.acknowledged(), before);
        // A checkpoint after the fork clears it.
        s.committed(LogPosition {
            records: 15,
            net: 5,
        });
        assert_eq!(
            s.acknowledged(),
            LogPosition {
                records: 16,
                net: 6
            }
        );
    }

    #[test]
    fn writes_what_it_acknowledges_as_a_log_directory() {
        let dir = std::env::temp_dir().join(format!("rrc-logstore-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut s = LogStore::new(LogPosition { records: 2, net: 0 });
        s.add_records(&batch(1, &[(1, time(1)), (3, time(3)), (7, time(7))]))
            .unwrap();
        // Thread 2's batches arrive in the wrong order.
        s.add_records(&batch(2, &[(5, time(5))])).unwrap();
        s.add_records(&batch(2, &[(2, time(2)), (4, time(4))]))
            .unwrap();
        s.add_frames(1, vec![vec![9; 60], vec![8; 70]]).unwrap();
        // Nothing in the net log beyond the base: an empty net log.
        let empty = dir.with_extension("empty");
        let _ = std::fs::remove_dir_all(&empty);
        LogStore::new(LogPosition { records: 2, net: 5 })
            .write_to(&empty)
            .unwrap();
        assert!(netlog::read(&empty).unwrap().is_empty());
        std::fs::remove_dir_all(&empty).unwrap();
        // 6 never came: records 3 to 5 are the log.
        let (from, until) = s.write_to(&dir).unwrap();
        assert_eq!(from.records, 2);
        assert_eq!(until, LogPosition { records: 5, net: 2 });
        let read = |id| {
            let mut r = LogReader::open(&dir, id).unwrap();
            let mut seqs = Vec::new();
            while let Some(rec) = r.next_record().unwrap() {
                seqs.push(rec.seq);
            }
            seqs
        };
        assert_eq!(read(1), vec![3]);
        assert_eq!(read(2), vec![4, 5]);
        let frames = netlog::read(&dir).unwrap();
        assert_eq!(frames.iter().map(|f| f.0).collect::<Vec<_>>(), vec![1, 2]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
