//! The primary's log shipper (responsive mode): the recorded program's
//! event records, taken from its threads' rings, and the inbound frames the
//! gate logged, sent to the backup as they come.
//!
//! A reply must not wait for a timer: every outbound frame the gate holds
//! makes the shipper drain the rings at once, on the forwarder's own thread
//! (the writing thread pushed its records before its system call, so they
//! are there). A backstop thread ships whatever is left every few
//! milliseconds (records of a program that is not talking) and watches for
//! what the log cannot cover:
//!
//! - a number taken but never pushed (a hole: a batch the drain refused, a
//!   thread that found no ring, a writer preempted for long): once the
//!   shipped records have not run past it for [`HOLE_WAIT`], a checkpoint
//!   is asked for, which covers it;
//! - a record a replay cannot pass (a `fork` whose child is not recorded,
//!   an event too large for the log): a checkpoint is asked for at once.
//!   A forked child runs unrecorded and may leave files behind it that a
//!   restore of it would need (a background save renames its file at the
//!   end): checkpoints should wait until it has ended and been reaped,
//!   which the log also says ([`Shipper::children`]);
//! - something that went unrecorded for good (the program counts it in the
//!   rings): nothing more is shipped, since a replay from any later
//!   checkpoint would miss it too; replies then wait for checkpoints, and
//!   the operator is told.
//!
//! Consecutive batches of one thread are merged before they are sent (the
//! program pushes every record on its own, for speed; one header per
//! record would double what crosses the link).

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rrc_rr::agent::RingDrain;
use rrc_rr::log::{
    BatchHeader, BatchReader, BatchWriter, EncodeError, Event, HEADER_LEN, MAX_PAYLOAD_LEN,
};
use rrc_rr::ring::RingSet;

use crate::gate::LogTap;
use crate::log_store::stops_replay;
use crate::position::{Contiguous, LogPosition};
use crate::wake::Waker;

/// How long a number may stay missing from the shipped records before a
/// checkpoint is asked for to cover it.
pub const HOLE_WAIT: Duration = Duration::from_millis(20);
/// How often the backstop ships what is left.
pub const BACKSTOP: Duration = Duration::from_millis(5);
/// Records sent in one message at most (bytes).
const MESSAGE_LIMIT: usize = 1 << 20;

/// Where the log goes: the link to the backup (which drops what it cannot
/// send while no backup is connected).
pub trait LogSink: Send + Sync {
    /// Net log frames numbered from `first` (if any), then record batches
    /// back to back (each piece of `records` a message): together, so that
    /// they cross the link at once.
    fn send_log(&self, first: u64, frames: Vec<Vec<u8>>, records: Vec<Vec<u8>>);
}

/// What went through the shipper.
#[derive(Debug, Default)]
pub struct ShipStats {
    pub records: AtomicU64,
    pub record_bytes: AtomicU64,
    pub frames: AtomicU64,
    pub frame_bytes: AtomicU64,
    pub checkpoints_asked: AtomicU64,
}

/// A reading of [`ShipStats`].
#[derive(Debug, Clone, Copy, Default, serde::Serialize, serde::Deserialize)]
pub struct ShipCounts {
    pub records: u64,
    pub record_bytes: u64,
    pub frames: u64,
    pub frame_bytes: u64,
    pub checkpoints_asked: u64,
}

struct Drain {
    drain: RingDrain<'static>,
    shipped: Contiguous,
    /// The shipped run's end while numbers above it are handed out: where
    /// it stopped, since when, and whether a checkpoint was asked for it.
    stuck: Option<Stuck>,
    buf: Vec<u8>,
    out: Vec<u8>,
    /// Nothing is shipped any more: something went unrecorded.
    degraded: bool,
    unrecorded_seen: u32,
}

struct Stuck {
    at: u64,
    since: Instant,
    asked: bool,
}

struct NetQueue {
    /// Number of the first pending frame.
    first: u64,
    frames: Vec<Vec<u8>>,
}

pub struct Shipper {
    rings: &'static RingSet,
    drain: Mutex<Drain>,
    net: Mutex<NetQueue>,
    /// The last net frame number given.
    net_last: AtomicU64,
    sink: Arc<dyn LogSink>,
    stats: ShipStats,
    checkpoint_wanted: AtomicBool,
    /// Children forked (unrecorded) and not seen reaped yet.
    children: AtomicI64,
    supervisor: Waker,
    stop: AtomicBool,
}

impl Shipper {
    /// Ships from `rings` (the recording's, which live as long as the
    /// recorded program, so as long as this process) to `sink`; asks for
    /// checkpoints through `supervisor`. The backstop starts with
    /// [`Shipper::start_backstop`].
    pub fn new(rings: &'static RingSet, sink: Arc<dyn LogSink>, supervisor: Waker) -> Arc<Shipper> {
        Arc::new(Shipper {
            rings,
            drain: Mutex::new(Drain {
                drain: RingDrain::new(rings),
                shipped: Contiguous::from_base(rings.last_seq()),
                stuck: None,
                buf: vec![0; HEADER_LEN + MAX_PAYLOAD_LEN],
                out: Vec::new(),
                degraded: false,
                unrecorded_seen: rings.unrecorded(),
            }),
            net: Mutex::new(NetQueue {
                first: 1,
                frames: Vec::new(),
            }),
            net_last: AtomicU64::new(0),
            sink,
            stats: ShipStats::default(),
            checkpoint_wanted: AtomicBool::new(false),
            children: AtomicI64::new(0),
            supervisor,
            stop: AtomicBool::new(false),
        })
    }

    /// Starts the backstop thread (in the process that supervises the
    /// container: threads do not survive its detaching).
    pub fn start_backstop(self: &Arc<Self>) -> std::io::Result<JoinHandle<()>> {
        let me = self.clone();
        std::thread::Builder::new()
            .name("rrc-ship".into())
            .spawn(move || me.backstop())
    }

    /// Stops the backstop thread (it ends within [`BACKSTOP`]).
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
    }

    /// How many children the program forked (they run unrecorded) that the
    /// log has not seen it reap yet.
    pub fn children(&self) -> u64 {
        self.children.load(Ordering::Acquire).max(0) as u64
    }

    /// Whether a checkpoint was asked for since the last call.
    pub fn take_checkpoint_request(&self) -> bool {
        self.checkpoint_wanted.swap(false, Ordering::AcqRel)
    }

    /// A checkpoint standing at `at` was taken: what it covers needs no
    /// log, holes below it included.
    pub fn checkpoint_at(&self, at: LogPosition) {
        let mut d = self.lock_drain();
        d.shipped.advance_to(at.records);
        d.stuck = None;
    }

    /// Whether something went unrecorded: the log ships nothing more.
    pub fn degraded(&self) -> bool {
        self.lock_drain().degraded
    }

    pub fn counts(&self) -> ShipCounts {
        let s = &self.stats;
        ShipCounts {
            records: s.records.load(Ordering::Relaxed),
            record_bytes: s.record_bytes.load(Ordering::Relaxed),
            frames: s.frames.load(Ordering::Relaxed),
            frame_bytes: s.frame_bytes.load(Ordering::Relaxed),
            checkpoints_asked: s.checkpoints_asked.load(Ordering::Relaxed),
        }
    }

    fn lock_drain(&self) -> std::sync::MutexGuard<'_, Drain> {
        crate::lock(&self.drain)
    }

    fn want_checkpoint(&self) {
        if !self.checkpoint_wanted.swap(true, Ordering::AcqRel) {
            self.stats.checkpoints_asked.fetch_add(1, Ordering::Relaxed);
        }
        self.supervisor.wake();
    }

    /// Sends every pending net frame and every record the rings hold.
    pub fn ship(&self) {
        let (first, frames) = {
            let mut q = crate::lock(&self.net);
            let first = q.first;
            q.first += q.frames.len() as u64;
            (first, std::mem::take(&mut q.frames))
        };
        let (data, records, barrier, forked) = {
            let mut d = self.lock_drain();
            let Drain {
                drain,
                shipped,
                buf,
                out,
                degraded,
                ..
            } = &mut *d;
            let mut merge = Merge {
                writer: match BatchWriter::new(buf, 0) {
                    Ok(w) => w,
                    Err(_) => return,
                },
                out,
                shipped,
                records: 0,
                barrier: false,
                forked: 0,
            };
            if let Err(e) = drain.pass(&mut |batch| merge.add(batch)) {
                tracing::error!(error = %e, "the recording's rings cannot be read");
            }
            merge.flush();
            let (records, barrier, forked) = (merge.records, merge.barrier, merge.forked);
            let data = std::mem::take(out);
            // Drained all the same: the program must never wait for a
            // full ring; but nothing of it is sent.
            let data = if *degraded { Vec::new() } else { data };
            (data, records, barrier, forked)
        };
        if forked != 0 {
            // Never below zero: a reaped child forked otherwise (not
            // through fork) must not hide the next one.
            let _ = self
                .children
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                    Some((n + forked).max(0))
                });
        }
        if barrier {
            self.want_checkpoint();
        }
        if frames.is_empty() && data.is_empty() {
            return;
        }
        self.stats
            .frames
            .fetch_add(frames.len() as u64, Ordering::Relaxed);
        self.stats.frame_bytes.fetch_add(
            frames.iter().map(|f| f.len() as u64).sum(),
            Ordering::Relaxed,
        );
        self.stats.records.fetch_add(records, Ordering::Relaxed);
        self.stats
            .record_bytes
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        let pieces = split_batches(&data, MESSAGE_LIMIT)
            .into_iter()
            .map(<[u8]>::to_vec)
            .collect();
        self.sink.send_log(first, frames, pieces);
    }

    /// Ships what is left now and then, and watches for holes and for
    /// what went unrecorded.
    fn backstop(&self) {
        while !self.stop.load(Ordering::Acquire) {
            std::thread::park_timeout(BACKSTOP);
            self.ship();
            self.watch();
        }
    }

    fn watch(&self) {
        let reached = self.rings.last_seq();
        let unrecorded = self.rings.unrecorded();
        let mut d = self.lock_drain();
        if unrecorded != d.unrecorded_seen {
            d.unrecorded_seen = unrecorded;
            if !d.degraded {
                d.degraded = true;
                drop(d);
                tracing::error!(
                    "the program did something that could not be recorded; from the next checkpoint on, replies wait for checkpoints"
                );
                eprintln!(
                    "rrc primary: WARNING: the program did something that could not be recorded (see its output); the log stops and replies wait for checkpoints from now on"
                );
                self.want_checkpoint();
                return;
            }
        }
        let prefix = d.shipped.prefix();
        if prefix >= reached {
            d.stuck = None;
            return;
        }
        match &mut d.stuck {
            Some(s) if s.at == prefix => {
                // Asked once per hole.
                if !s.asked && s.since.elapsed() >= HOLE_WAIT {
                    s.asked = true;
                    drop(d);
                    tracing::debug!(
                        missing = prefix + 1,
                        "a record never came: a checkpoint covers it"
                    );
                    self.want_checkpoint();
                }
            }
            _ => {
                d.stuck = Some(Stuck {
                    at: prefix,
                    since: Instant::now(),
                    asked: false,
                })
            }
        }
    }
}

/// Cuts back-to-back batches into runs of at most `limit` bytes (a batch
/// larger than that alone).
fn split_batches(data: &[u8], limit: usize) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut at = 0;
    while at < data.len() {
        let len = match BatchHeader::parse(&data[at..]) {
            Ok(h) => h.batch_len(),
            // Made here from checked batches: cannot happen; send the rest.
            Err(_) => data.len() - at,
        };
        if at > start && at + len - start > limit {
            out.push(&data[start..at]);
            start = at;
        }
        at += len;
    }
    if at > start {
        out.push(&data[start..]);
    }
    out
}

/// Merging the batches of one pass: consecutive batches of one thread
/// become one.
struct Merge<'a, 'b> {
    writer: BatchWriter<'b>,
    out: &'a mut Vec<u8>,
    shipped: &'a mut Contiguous,
    records: u64,
    barrier: bool,
    /// Children forked, less children reaped.
    forked: i64,
}

impl Merge<'_, '_> {
    fn add(&mut self, batch: &[u8]) -> Result<(), EncodeError> {
        // The drain checked it whole.
        let Ok(mut r) = BatchReader::new(batch) else {
            return Ok(());
        };
        let id = r.header().log_id;
        if self.writer.log_id() != id {
            self.flush();
            self.writer.restart(id);
        }
        while let Ok(Some(rec)) = r.next_record() {
            self.shipped.insert(rec.seq);
            self.barrier |= stops_replay(&rec.event);
            match rec.event {
                Event::ForkUnsupported => self.forked += 1,
                Event::Wait { ret, child, .. } if ret > 0 || child.pid > 0 => self.forked -= 1,
                _ => {}
            }
            self.records += 1;
            if self.writer.push(&rec).is_err() {
                // Full: a record from a valid batch fits an empty one.
                self.flush();
                self.writer.push(&rec)?;
            }
        }
        Ok(())
    }

    fn flush(&mut self) {
        if !self.writer.is_empty() {
            self.out.extend_from_slice(self.writer.finish());
            self.writer.reset();
        }
    }
}

impl LogTap for Shipper {
    fn log_inbound(&self, frame: &[u8]) -> u64 {
        let mut q = crate::lock(&self.net);
        q.frames.push(frame.to_vec());
        let n = q.first + q.frames.len() as u64 - 1;
        self.net_last.store(n, Ordering::Release);
        n
    }

    fn reached(&self) -> LogPosition {
        LogPosition {
            records: self.rings.last_seq(),
            net: self.net_last.load(Ordering::Acquire),
        }
    }

    fn outbound_waiting(&self) {
        self.ship();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rrc_rr::log::{Record, WaitCall, WaitChild};

    /// One call of the sink: first frame number, frames, record pieces.
    type Shipment = (u64, Vec<Vec<u8>>, Vec<Vec<u8>>);

    /// What the shipper sent.
    #[derive(Default)]
    struct Sent(Mutex<Vec<Shipment>>);

    impl LogSink for Sent {
        fn send_log(&self, first: u64, frames: Vec<Vec<u8>>, records: Vec<Vec<u8>>) {
            self.0.lock().unwrap().push((first, frames, records));
        }
    }

    impl Sent {
        /// Every record sent: (log id, seq).
        fn records(&self) -> Vec<(u32, u64)> {
            let mut out = Vec::new();
            for (_, _, pieces) in self.0.lock().unwrap().iter() {
                for piece in pieces {
                    let mut rest: &[u8] = piece;
                    while !rest.is_empty() {
                        let (mut b, next) = BatchReader::split_first(rest).unwrap();
                        let id = b.header().log_id;
                        while let Some(r) = b.next_record().unwrap() {
                            out.push((id, r.seq));
                        }
                        rest = next;
                    }
                }
            }
            out
        }

        fn batches(&self) -> usize {
            let mut n = 0;
            for (_, _, pieces) in self.0.lock().unwrap().iter() {
                for piece in pieces {
                    n += split_batches(piece, 1).len();
                }
            }
            n
        }
    }

    /// A thread of the "program": a ring of the set and its log id.
    struct Thread {
        rings: &'static RingSet,
        slot: usize,
        id: u32,
    }

    impl Thread {
        fn new(rings: &'static RingSet, id: u32) -> Thread {
            let slot = rings.claim_slot(id, 1000 + id).unwrap();
            Thread { rings, slot, id }
        }

        /// Takes the next number and pushes `event` under it, alone in a
        /// batch (as the program does in eager mode).
        fn push(&self, event: Event<'_>) -> u64 {
            let seq = self.rings.next_seq().unwrap();
            self.push_as(seq, event);
            seq
        }

        fn push_as(&self, seq: u64, event: Event<'_>) {
            let mut buf = vec![0u8; 1024];
            let mut w = BatchWriter::new(&mut buf, self.id).unwrap();
            w.push(&Record {
                seq,
                time_delta_ns: 1,
                event,
            })
            .unwrap();
            let mut p = self.rings.producer(self.slot).unwrap();
            assert!(p.try_push(w.finish()));
        }
    }

    fn setup() -> (
        Arc<Shipper>,
        &'static RingSet,
        Arc<Sent>,
        crate::wake::WakeFd,
    ) {
        let rings: &'static RingSet = Box::leak(Box::new(RingSet::create(4, 1 << 16).unwrap()));
        let sent = Arc::new(Sent::default());
        let (waker, fd) = crate::wake::pair().unwrap();
        let s = Shipper::new(rings, sent.clone(), waker);
        (s, rings, sent, fd)
    }

    #[test]
    fn ships_frames_and_merges_a_threads_batches() {
        let (s, rings, sent, _fd) = setup();
        let t1 = Thread::new(rings, 1);
        let t2 = Thread::new(rings, 2);
        t1.push(Event::Time { sec: 1 });
        t1.push(Event::Time { sec: 2 });
        t2.push(Event::Time { sec: 3 });
        t1.push(Event::Time { sec: 4 });
        assert_eq!(s.log_inbound(&[1; 60]), 1);
        assert_eq!(s.log_inbound(&[2; 70]), 2);
        assert_eq!(s.reached(), LogPosition { records: 4, net: 2 });
        s.ship();
        let mut recs = sent.records();
        recs.sort_by_key(|r| r.1);
        assert_eq!(recs, vec![(1, 1), (1, 2), (2, 3), (1, 4)]);
        // Ring by ring: thread 1's three batches became one.
        assert_eq!(sent.batches(), 2);
        let (first, frames, _) = sent.0.lock().unwrap()[0].clone();
        assert_eq!((first, frames.len()), (1, 2));
        assert!(!s.take_checkpoint_request());
        // Nothing new: nothing sent.
        s.ship();
        assert_eq!(sent.0.lock().unwrap().len(), 1);
        assert_eq!(s.counts().records, 4);
    }

    #[test]
    fn a_number_that_never_comes_asks_for_a_checkpoint_that_covers_it() {
        let (s, rings, _sent, _fd) = setup();
        let t = Thread::new(rings, 1);
        t.push(Event::Time { sec: 1 });
        // Taken, never pushed.
        let _hole = rings.next_seq().unwrap();
        t.push(Event::Time { sec: 3 });
        s.ship();
        s.watch();
        assert!(!s.take_checkpoint_request());
        std::thread::sleep(HOLE_WAIT + Duration::from_millis(10));
        s.watch();
        assert!(s.take_checkpoint_request());
        // Asked once for that hole; a checkpoint past it ends it.
        s.watch();
        assert!(!s.take_checkpoint_request());
        s.checkpoint_at(LogPosition { records: 3, net: 0 });
        t.push(Event::Time { sec: 4 });
        s.ship();
        std::thread::sleep(HOLE_WAIT + Duration::from_millis(10));
        s.watch();
        assert!(!s.take_checkpoint_request());
    }

    #[test]
    fn a_fork_asks_for_a_checkpoint_and_its_child_is_counted_until_reaped() {
        let (s, rings, _sent, _fd) = setup();
        let t = Thread::new(rings, 1);
        t.push(Event::ForkUnsupported);
        s.ship();
        assert!(s.take_checkpoint_request());
        assert_eq!(s.children(), 1);
        t.push(Event::Wait {
            call: WaitCall::Waitpid,
            ret: 0,
            status: 0,
            child: WaitChild::default(),
        });
        s.ship();
        assert_eq!(s.children(), 1);
        t.push(Event::Wait {
            call: WaitCall::Waitpid,
            ret: 42,
            status: 0,
            child: WaitChild::default(),
        });
        s.ship();
        assert_eq!(s.children(), 0);
    }

    #[test]
    fn a_thread_left_unrecorded_stops_the_log() {
        let (s, rings, sent, _fd) = setup();
        let t = Thread::new(rings, 1);
        t.push(Event::Time { sec: 1 });
        s.ship();
        rings.note_unrecorded();
        s.watch();
        assert!(s.degraded());
        assert!(s.take_checkpoint_request());
        t.push(Event::Time { sec: 2 });
        s.ship();
        assert_eq!(sent.records(), vec![(1, 1)]);
    }
}
