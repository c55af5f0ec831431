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
    let mut consumers: Vec<Option<Consumer<'_>>> = (0..set.slot_count()).map(|_| None).collect();
    let mut stats = RecordStats::default();
    let mut scratch = Vec::new();
    let mut broken = vec![false; set.slot_count()];
    loop {
        // Read the flag first: a pass that starts after it was set sees
        // everything the program ever pushed.
        let last = stop.load(Ordering::Acquire);
        for (index, slot) in consumers.iter_mut().enumerate() {
            if broken[index] {
                continue;
            }
            let state = set.slot(index)?.state;
            if !matches!(state, SlotState::Active | SlotState::Exited) {
                continue;
            }
            if slot.is_none() {
                *slot = Some(set.consumer(index)?);
            }
            let c = slot.as_mut().expect("set above");
            loop {
                match c.pop_into(&mut scratch) {
                    Ok(true) => {}
                    Ok(false) => break,
                    Err(e) => {
                        // A ring the program damaged: nothing more can be
                        // read from it; the others go on.
                        stats.problem(format!("ring {index}: {e}"));
                        broken[index] = true;
                        break;
                    }
                }
                account(&mut stats, &scratch);
                // A batch that does not check out is dropped, never a
                // reason to stop draining: the program would block on a
                // full ring.
                if let Err(e) = log.append(&scratch) {
                    stats.refused_batches += 1;
                    stats.problem(e.to_string());
                }
            }
            if state == SlotState::Exited && !broken[index] {
                // Drained after its thread's last push: free for reuse.
                *slot = None;
                set.release_slot(index)?;
            }
        }
        if last {
            log.sync()?;
            return Ok(stats);
        }
        std::thread::sleep(PERIOD);
    }
}

fn account(stats: &mut RecordStats, batch: &[u8]) {
    stats.batches += 1;
    stats.bytes += batch.len() as u64;
    let Ok(mut r) = BatchReader::new(batch) else {
        // LogWriter::append reports it.
        return;
    };
    let id = r.header().log_id;
    while let Ok(Some(rec)) = r.next_record() {
        stats.records += 1;
        *stats.per_thread.entry(id).or_default() += 1;
        *stats.per_kind.entry(kind(&rec.event)).or_default() += 1;
        if matches!(rec.event, Event::ForkUnsupported) {
            stats.forks_unrecorded += 1;
        }
    }
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
