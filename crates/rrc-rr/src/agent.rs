//! The rrc process's side of recording: a thread that drains every
//! thread's ring of a [`RingSet`] into a log directory, checking each
//! batch, and hands exited threads' slots back once their rings are empty.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::log::{BatchReader, Event, LogError, LogWriter};
use crate::ring::{Consumer, RingError, RingSet, SlotState};

/// How often the rings are looked at. The recording threads never wait
/// for the agent unless a ring fills up.
const PERIOD: Duration = Duration::from_millis(1);

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("the recording's rings: {0}")]
    Ring(#[from] RingError),
    #[error("the log: {0}")]
    Log(#[from] LogError),
    #[error("cannot start the log drain thread: {0}")]
    Spawn(std::io::Error),
    #[error("the log drain thread failed unexpectedly")]
    Panicked,
}

/// What a recording produced.
#[derive(Debug, Clone, Default)]
pub struct RecordStats {
    pub batches: u64,
    pub records: u64,
    pub bytes: u64,
    /// Records per thread log id.
    pub per_thread: BTreeMap<u32, u64>,
    /// Records per event kind (its name).
    pub per_kind: BTreeMap<&'static str, u64>,
    /// `fork` calls whose child could not be recorded.
    pub forks_unrecorded: u64,
    /// Batches refused (they did not check out) and dropped: the program
    /// is never held up by a bad batch, but its log has a hole.
    pub refused_batches: u64,
    /// What went wrong, the first few times.
    pub problems: Vec<String>,
    /// Rings the program damaged (or whose consumer end it took), which
    /// are no longer read: their threads' logs end there.
    pub broken_rings: Vec<usize>,
}

impl RecordStats {
    fn problem(&mut self, what: String) {
        if self.problems.len() < 8 {
            self.problems.push(what);
        }
    }
}

/// A running drain.
pub struct Recorder {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<RecordStats, AgentError>>>,
}

impl Recorder {
    /// Starts draining `set` into the log directory `dir` (created).
    pub fn start(set: RingSet, dir: &Path) -> Result<Recorder, AgentError> {
        let mut log = LogWriter::create(dir)?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("rrc-record".into())
            .spawn(move || drain_until(&set, &mut log, &flag))
            .map_err(AgentError::Spawn)?;
        Ok(Recorder {
            stop,
            thread: Some(thread),
        })
    }

    /// Drains what is left, syncs the log and returns what was recorded.
    pub fn finish(mut self) -> Result<RecordStats, AgentError> {
        self.stop.store(true, Ordering::Release);
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(r)) => r,
            Some(Err(_)) => Err(AgentError::Panicked),
            None => Ok(RecordStats::default()),
        }
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn drain_until(
    set: &RingSet,
    log: &mut LogWriter,
    stop: &AtomicBool,
) -> Result<RecordStats, AgentError> {
    let mut drain = RingDrain::new(set);
    loop {
        // Read the flag first: a pass that starts after it was set sees
        // everything the program ever pushed.
        let last = stop.load(Ordering::Acquire);
        drain.pass(&mut |batch| log.append(batch).map(|_| ()))?;
        if last {
            log.sync()?;
            return Ok(drain.stats);
        }
        std::thread::sleep(PERIOD);
    }
}

/// Takes every batch the program's threads have pushed, ring by ring,
/// checks it and hands it on; hands exited threads' slots back once their
/// rings are empty. Used by the recorder (to files) and by replication (to
/// the backup).
pub struct RingDrain<'s> {
    set: &'s RingSet,
    consumers: Vec<Option<Consumer<'s>>>,
    /// The thread log each ring's current owner writes (read when its
    /// consumer is made): a batch for any other log is refused.
    owners: Vec<u32>,
    /// Rings the program damaged: nothing more can be read from them.
    broken: Vec<bool>,
    scratch: Vec<u8>,
    /// What went through so far.
    pub stats: RecordStats,
}

impl<'s> RingDrain<'s> {
    pub fn new(set: &'s RingSet) -> RingDrain<'s> {
        RingDrain {
            set,
            consumers: (0..set.slot_count()).map(|_| None).collect(),
            owners: vec![0; set.slot_count()],
            broken: vec![false; set.slot_count()],
            scratch: Vec::new(),
            stats: RecordStats::default(),
        }
    }

    /// One pass over every ring: each batch waiting is checked and given
    /// to `sink`, in each ring's order. A batch that does not check out,
    /// that is not for its ring's own thread log, or that `sink` refuses,
    /// is dropped and counted, never a reason to stop draining: the
    /// program would block on a full ring. The rings live in memory the
    /// program can write: a ring it damaged (or whose consumer end it
    /// claimed) is reported and skipped from then on, and the others go on.
    pub fn pass<E: std::fmt::Display>(
        &mut self,
        sink: &mut dyn FnMut(&[u8]) -> Result<(), E>,
    ) -> Result<(), AgentError> {
        for index in 0..self.consumers.len() {
            if self.broken[index] {
                continue;
            }
            if let Err(e) = self.drain_ring(index, sink) {
                self.stats
                    .problem(format!("ring {index}: {e}; it is not read any more"));
                self.stats.broken_rings.push(index);
                self.broken[index] = true;
                self.consumers[index] = None;
            }
        }
        Ok(())
    }

    /// Takes what ring `index` holds (see [`RingDrain::pass`]).
    fn drain_ring<E: std::fmt::Display>(
        &mut self,
        index: usize,
        sink: &mut dyn FnMut(&[u8]) -> Result<(), E>,
    ) -> Result<(), RingError> {
        let slot = self.set.slot(index)?;
        if !matches!(slot.state, SlotState::Active | SlotState::Exited) {
            return Ok(());
        }
        if self.consumers[index].is_none() {
            self.consumers[index] = Some(self.set.consumer(index)?);
            self.owners[index] = slot.log_id;
        }
        let owner = self.owners[index];
        let c = self.consumers[index].as_mut().expect("set above");
        while c.pop_into(&mut self.scratch)? {
            let refused = match account(&mut self.stats, &self.scratch, owner) {
                Err(e) => Some(format!("ring {index}: a batch does not check out: {e}")),
                Ok(()) => sink(&self.scratch).err().map(|e| e.to_string()),
            };
            if let Some(why) = refused {
                self.stats.refused_batches += 1;
                self.stats.problem(why);
            }
        }
        if slot.state == SlotState::Exited {
            // Drained after its thread's last push: free for reuse.
            self.consumers[index] = None;
            self.set.release_slot(index)?;
        }
        Ok(())
    }
}

/// Why a batch is refused before its records are looked at.
#[derive(Debug, thiserror::Error)]
enum BatchRefused {
    #[error(transparent)]
    Decode(#[from] crate::log::DecodeError),
    #[error("it is for thread log {found}, and the ring is thread log {owner}'s")]
    NotItsLog { found: u32, owner: u32 },
}

/// Checks a batch whole (and that it is for the ring's own thread log,
/// `owner`) and, if it checks out, counts what it holds.
fn account(stats: &mut RecordStats, batch: &[u8], owner: u32) -> Result<(), BatchRefused> {
    let mut r = BatchReader::new(batch)?;
    let id = r.header().log_id;
    if id != owner {
        return Err(BatchRefused::NotItsLog { found: id, owner });
    }
    let mut records = 0;
    let mut forks = 0;
    let mut kinds: Vec<&'static str> = Vec::new();
    while let Some(rec) = r.next_record()? {
        records += 1;
        kinds.push(kind(&rec.event));
        if matches!(rec.event, Event::ForkUnsupported) {
            forks += 1;
        }
    }
    stats.batches += 1;
    stats.bytes += batch.len() as u64;
    stats.records += records;
    stats.forks_unrecorded += forks;
    *stats.per_thread.entry(id).or_default() += records;
    for k in kinds {
        *stats.per_kind.entry(k).or_default() += 1;
    }
    Ok(())
}

/// A short name of an event's kind, for summaries.
pub fn kind(e: &Event<'_>) -> &'static str {
    match e {
        Event::Syscall { .. } => "syscall",
        Event::Read { .. } => "read",
        Event::Recv { .. } => "recv",
        Event::RecvMmsg { .. } => "recvmmsg",
        Event::Accept { .. } => "accept",
        Event::EpollWait { .. } => "epoll_wait",
        Event::Poll { .. } => "poll",
        Event::Select { .. } => "select",
        Event::ClockGettime { .. } => "clock_gettime",
        Event::Gettimeofday { .. } => "gettimeofday",
        Event::Time { .. } => "time",
        Event::Getrandom { .. } => "getrandom",
        Event::Mmap { .. } => "mmap",
        Event::ThreadCreate { .. } => "thread_create",
        Event::ThreadExit => "thread_exit",
        Event::Fork { .. } => "fork",
        Event::ForkUnsupported => "fork (unrecorded child)",
        Event::Signal { .. } => "signal",
        Event::Write { .. } => "write",
        Event::Wait { .. } => "wait",
        Event::Sync { .. } => "sync",
    }
}
