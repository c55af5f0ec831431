//! Where events go: each thread appends its records to a batch of its own
//! and pushes the batch, at flush points (or at once, when the set is
//! `EAGER`), to its own ring of the set the rrc process shares with the
//! program (`RRC_RR_FD`). Global order: every record takes the next number
//! of one process-wide counter, and the time since the previous record of
//! any thread.

use std::cell::UnsafeCell;
use std::mem::ManuallyDrop;
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicPtr, AtomicU32, AtomicU64, Ordering};

use rrc_rr::interface;
use rrc_rr::log::{BatchWriter, Event, Record};
use rrc_rr::ring::{CopyMark, Producer, RingSet};

use crate::thread;

/// A thread's first batch buffer; it grows (by mapping a larger one) for
/// records that do not fit.
const FIRST_BUF: usize = 64 << 10;

/// A batch this large goes to the ring without waiting for a flush point.
const FLUSH_AT: usize = 16 << 10;

static SET: AtomicPtr<RingSet> = AtomicPtr::new(std::ptr::null_mut());
/// Cleared in a forked child: its writes would mix with the parent's.
static RECORDING: AtomicBool = AtomicBool::new(false);
/// Set once a copy restored from a checkpoint learned that it is being
/// replayed: nothing goes to the rings any more (nobody drains them).
static REPLAYED_COPY: AtomicBool = AtomicBool::new(false);
/// Every record goes to the ring as soon as it is made (the set's `EAGER`
/// flag, read at attach).
static EAGER: AtomicBool = AtomicBool::new(false);
static LAST_NS: AtomicU64 = AtomicU64::new(0);
/// The rings' descriptor (where a replay's configuration is put).
static RING_FD: AtomicI32 = AtomicI32::new(-1);
/// Log ids when not recording (replay numbers threads the same way): the
/// first thread, the one loading librrc, gets 1. A recording numbers them
/// in the ring set, across `exec`.
static NEXT_ID: AtomicU32 = AtomicU32::new(1);

struct ThreadLog {
    /// The set its producer is of: after a takeover that gave the program
    /// new rings, a thread still holding one of the old set's attaches
    /// afresh.
    set: *const RingSet,
    producer: Option<Producer<'static>>,
    slot: usize,
    /// The batch being filled, in a buffer mapped with a raw mmap (hooks
    /// must not call malloc) that lives as long as the writer.
    writer: Option<BatchWriter<'static>>,
    buf: *mut u8,
    cap: usize,
    /// Its log was closed (`ThreadExit`): what the thread still does on
    /// its way out (destructors) is not recorded.
    ended: bool,
}

thread_local! {
    // ManuallyDrop: no destructor to register (which could allocate); a
    // thread's end is handled by `thread_exit`.
    static LOG: UnsafeCell<ManuallyDrop<ThreadLog>> = const {
        UnsafeCell::new(ManuallyDrop::new(ThreadLog {
            set: std::ptr::null(),
            producer: None,
            slot: 0,
            writer: None,
            buf: std::ptr::null_mut(),
            cap: 0,
            ended: false,
        }))
    };
}

/// Runs `f` on this thread's log, if it is recording.
fn with_log<R>(f: impl FnOnce(&'static RingSet, &mut ThreadLog) -> R) -> Option<R> {
    let set = set()?;
    LOG.try_with(|cell| {
        // SAFETY: only this thread touches its ThreadLog, and never
        // re-entrantly: callers hold `thread::Inside`.
        let log = unsafe { &mut **cell.get() };
        if !std::ptr::eq(log.set, set) {
            // Rings of an earlier recording (restored with the thread):
            // nobody drains them.
            log.writer = None;
            log.producer = None;
            log.ended = false;
            log.set = set;
        }
        f(set, log)
    })
    .ok()
}

/// Attaches to the ring set named by `RRC_RR_FD`, if any.
pub fn init() {
    // SAFETY: getenv with a NUL-terminated name, before threads exist.
    let v = unsafe { libc::getenv(interface::FD_ENV.as_ptr()) };
    if v.is_null() {
        return;
    }
    // SAFETY: getenv returned a NUL-terminated string.
    let s = unsafe { std::ffi::CStr::from_ptr(v) };
    let Some(fd) = interface::parse_fd_env(s.to_bytes()) else {
        crate::fatal(b"librrc: RRC_RR_FD is not a descriptor number\n");
    };
    RING_FD.store(fd, Ordering::Relaxed);
    // `rrc replay` puts its configuration where the rings were.
    if crate::replay::init_from_fd(fd) {
        return;
    }
    // SAFETY: the rrc process passed this descriptor to us for the ring set
    // and nothing else in the program knows it.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let set = match RingSet::from_fd_near(owned, crate::alloc::LOW_AREA) {
        Ok(s) => s,
        Err(_) => crate::fatal(b"librrc: RRC_RR_FD is not an rrc ring set\n"),
    };
    EAGER.store(set.eager(), Ordering::Relaxed);
    SET.store(Box::into_raw(Box::new(set)), Ordering::Release);
    // The loading thread is the program's first: log 1, before any thread
    // it creates takes a number.
    thread::set_log_id(next_log_id());
    // SAFETY: registering handlers (plain functions) before threads exist.
    unsafe {
        libc::pthread_atfork(None, None, Some(in_fork_child));
        libc::atexit(at_exit);
    }
    RECORDING.store(true, Ordering::Release);
}

extern "C" fn in_fork_child() {
    RECORDING.store(false, Ordering::Release);
}

/// The descriptor the rings were passed at.
pub fn ring_fd() -> i32 {
    RING_FD.load(Ordering::Relaxed)
}

/// Whether the rings say this copy is to replay (a copy restored from a
/// checkpoint and marked so).
pub fn replay_requested() -> bool {
    let p = SET.load(Ordering::Acquire);
    // SAFETY: sets are leaked Boxes, never freed.
    !p.is_null() && unsafe { &*p }.marked() == Some(CopyMark::Replay)
}

/// A takeover goes live with its replication in responsive mode: from now
/// on the program records into the ring set at `fd` (put at the rings'
/// descriptor number, where the next replay's configuration will be put
/// in turn), numbering on from the replayed log. Called while the
/// program's other threads are parked; one that was on its way into a
/// wrapper may make one call unrecorded, which no replay needs (the next
/// checkpoint is taken after this). Err: the errno of what failed.
pub fn resume(fd: libc::c_int) -> Result<(), libc::c_int> {
    let at = RING_FD.load(Ordering::Relaxed);
    if at < 0 {
        return Err(libc::EBADF);
    }
    // Without close-on-exec, as the first rings were passed.
    // SAFETY: dup3 of a descriptor received for this onto the rings'
    // number, which holds the replay's configuration (read already).
    if unsafe { libc::syscall(libc::SYS_dup3, fd, at, 0) } < 0 {
        return Err(std::io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO));
    }
    // SAFETY: the number now holds the new rings and nothing else in the
    // program uses it.
    let owned = unsafe { OwnedFd::from_raw_fd(at) };
    let set = RingSet::from_fd_near(owned, 0).map_err(|_| libc::EINVAL)?;
    let last_replayed = crate::replay::end();
    let old = SET.load(Ordering::Acquire);
    let (last_seq, last_id) = if old.is_null() {
        (0, NEXT_ID.load(Ordering::Relaxed).saturating_sub(1))
    } else {
        // SAFETY: sets are leaked Boxes, never freed.
        let old = unsafe { &*old };
        (old.last_seq(), old.last_log_id())
    };
    set.continue_from(last_seq.max(last_replayed), last_id);
    EAGER.store(set.eager(), Ordering::Relaxed);
    // The old set stays mapped: a thread may still hold it. Published
    // before the flags below, so that whoever sees them sees it.
    SET.store(Box::into_raw(Box::new(set)), Ordering::Release);
    crate::net::forget_virtual();
    RECORDING.store(true, Ordering::Release);
    REPLAYED_COPY.store(false, Ordering::Release);
    Ok(())
}

fn set() -> Option<&'static RingSet> {
    if !RECORDING.load(Ordering::Acquire) {
        return None;
    }
    let p = SET.load(Ordering::Acquire);
    // SAFETY: sets are leaked Boxes (`init`, `resume`), never freed.
    (!p.is_null()).then(|| unsafe { &*p })
}

/// Whether calls are being recorded.
pub fn recording() -> bool {
    set().is_some()
}

/// The kernel thread id of the thread that records log `id`, as the rings'
/// directory has it.
pub fn tid_of_log(id: u32) -> Option<i32> {
    let p = SET.load(Ordering::Acquire);
    if p.is_null() {
        return None;
    }
    // SAFETY: sets are leaked Boxes (`init`, `resume`), never freed.
    let set = unsafe { &*p };
    (0..set.slot_count()).find_map(|i| {
        let s = set.slot(i).ok()?;
        (s.state == rrc_rr::ring::SlotState::Active && s.log_id == id).then_some(s.tid as i32)
    })
}

/// A new log id, for a thread about to be created.
pub fn next_log_id() -> u32 {
    let p = SET.load(Ordering::Acquire);
    if p.is_null() {
        return NEXT_ID.fetch_add(1, Ordering::Relaxed);
    }
    // SAFETY: sets are leaked Boxes (`init`, `resume`), never freed.
    unsafe { &*p }.next_log_id()
}

pub fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: the real clock_gettime (not our wrapper) filling a local.
    unsafe { crate::real::get::clock_gettime()(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Records `event` for this thread. The record waits in the thread's
/// batch until a flush: before the thread blocks or sends, when the batch
/// is large, when the thread or the program ends.
///
/// True when the event must not stand: the program was restored from a
/// checkpoint for replay (it may have been stopped anywhere, even between
/// a wrapped call and its record), so the wrapper undoes what it can of
/// the call it made and makes it again, to be served from the log. The
/// caller must have left librrc (dropped its `thread::Inside`) first.
#[must_use = "a call whose record was refused must be made again"]
pub fn emit(event: &Event<'_>) -> bool {
    if REPLAYED_COPY.load(Ordering::Acquire) {
        return crate::replay::switch_in();
    }
    with_log(|set, log| emit_into(set, log, event)).unwrap_or(false)
}

fn emit_into(set: &'static RingSet, log: &mut ThreadLog, event: &Event<'_>) -> bool {
    if log.ended {
        return false;
    }
    // Taken before anything else is touched: the one atomic step that
    // tells a recording from a restored copy.
    let seq = match set.next_seq() {
        Ok(seq) => seq,
        Err(CopyMark::Replay) => {
            REPLAYED_COPY.store(true, Ordering::Release);
            return crate::replay::switch_in();
        }
        Err(CopyMark::Stop) => {
            // A copy that runs on unrecorded: the call stands.
            RECORDING.store(false, Ordering::Release);
            return false;
        }
    };
    if log.producer.is_none() {
        attach(set, log);
        if log.ended {
            return false;
        }
    }
    let now = now_ns();
    let prev = LAST_NS.swap(now, Ordering::AcqRel);
    let record = Record {
        seq,
        time_delta_ns: if prev == 0 {
            0
        } else {
            now.saturating_sub(prev)
        },
        event: *event,
    };
    let mut record = record;
    loop {
        let Some(w) = log.writer.as_mut() else {
            return false;
        };
        match w.push(&record) {
            Ok(()) => break,
            Err(_) if !w.is_empty() => push_batch(log),
            Err(_) => {
                // Alone and still too big: a larger buffer, up to what
                // a ring can carry.
                let max = log.producer.as_ref().map_or(0, |p| p.max_message_len());
                let want = (log.cap * 4).min(max);
                if log.cap < max && grow(log, want) {
                    continue;
                }
                // The program must not pay for it: only the call's
                // result goes in the log, which a replay reports as a
                // divergence when it gets there.
                warn_once(
                    &TOO_LARGE,
                    b"librrc: an event's data is larger than a ring; only its result is logged, and a replay cannot go past it\n",
                );
                record.event = Event::Syscall {
                    nr: u32::MAX,
                    ret: 0,
                };
            }
        }
    }
    if log
        .writer
        .as_ref()
        .is_some_and(|w| w.len() >= FLUSH_AT || EAGER.load(Ordering::Relaxed))
    {
        push_batch(log);
    }
    false
}

/// Sends this thread's pending records to its ring.
pub fn flush() {
    if REPLAYED_COPY.load(Ordering::Acquire) {
        return;
    }
    with_log(|_, log| {
        if log.writer.as_ref().is_some_and(|w| !w.is_empty()) {
            push_batch(log);
        }
    });
}

/// Pushes the current batch to the ring (waiting while the ring is full:
/// the rrc process drains it) and starts a new one.
fn push_batch(log: &mut ThreadLog) {
    let (Some(w), Some(p)) = (log.writer.as_mut(), log.producer.as_mut()) else {
        return;
    };
    let batch = w.finish();
    while !p.try_push(batch) {
        // A copy restored from a checkpoint (caught here by it) has nobody
        // draining its rings.
        match set().and_then(RingSet::marked) {
            Some(CopyMark::Replay) => {
                REPLAYED_COPY.store(true, Ordering::Release);
                break;
            }
            Some(CopyMark::Stop) => {
                RECORDING.store(false, Ordering::Release);
                break;
            }
            None => {}
        }
        // SAFETY: sched_yield has no arguments.
        unsafe { libc::syscall(libc::SYS_sched_yield) };
    }
    w.reset();
}

/// Replaces the thread's batch buffer by a mapping of `cap` bytes.
fn grow(log: &mut ThreadLog, cap: usize) -> bool {
    let Some(p) = crate::alloc::map_low(cap) else {
        return false;
    };
    // The old batch is empty (callers push it first); its writer goes
    // before its buffer.
    log.writer = None;
    if !log.buf.is_null() {
        // SAFETY: unmapping this thread's previous buffer, which nothing
        // refers to any more.
        unsafe { libc::syscall(libc::SYS_munmap, log.buf, log.cap) };
    }
    log.buf = p;
    log.cap = cap;
    // SAFETY: the mapping just made, `cap` bytes, used only through this
    // writer and unmapped only after the writer is dropped.
    let buf: &'static mut [u8] = unsafe { std::slice::from_raw_parts_mut(log.buf, cap) };
    match BatchWriter::new(buf, thread::log_id()) {
        Ok(w) => {
            log.writer = Some(w);
            true
        }
        Err(_) => false,
    }
}

/// Gives this thread its log id (if it has none), a ring and a batch.
fn attach(set: &'static RingSet, log: &mut ThreadLog) {
    log.set = set;
    if thread::log_id() == 0 {
        // Not created through pthread_create: numbered when first seen.
        thread::set_log_id(next_log_id());
    }
    // SAFETY: gettid has no arguments.
    let tid = unsafe { libc::syscall(libc::SYS_gettid) } as u32;
    let Ok(slot) = set.claim_slot(thread::log_id(), tid) else {
        // The program goes on; this thread is not recorded.
        set.note_unrecorded();
        warn_once(
            &NO_RING,
            b"librrc: more threads than rings; a thread runs unrecorded, and a replay cannot cover it\n",
        );
        log.ended = true;
        return;
    };
    match set.producer(slot) {
        Ok(p) => {
            log.producer = Some(p);
            log.slot = slot;
            if !grow(log, FIRST_BUF) {
                crate::fatal(b"librrc: cannot map a batch buffer\n");
            }
        }
        Err(_) => crate::fatal(b"librrc: cannot write to a new thread's ring\n"),
    }
}

static TOO_LARGE: AtomicBool = AtomicBool::new(false);
static NO_RING: AtomicBool = AtomicBool::new(false);

/// Writes `msg` to standard error the first time `flag` is raised.
fn warn_once(flag: &AtomicBool, msg: &[u8]) {
    if !flag.swap(true, Ordering::Relaxed) {
        crate::say(&[msg]);
    }
}

/// Ends this thread's log: its last record, its ring handed back. True,
/// as for [`emit`], when the process is being replayed instead.
#[must_use = "in a replay the thread's exit takes its turn instead"]
pub fn thread_exit() -> bool {
    if emit(&Event::ThreadExit) {
        return true;
    }
    with_log(|set, log| {
        push_batch(log);
        log.ended = true;
        log.writer = None;
        if log.producer.take().is_some() {
            let _ = set.retire_slot(log.slot);
        }
        if !log.buf.is_null() {
            // SAFETY: the thread's buffer; its writer is gone.
            unsafe { libc::syscall(libc::SYS_munmap, log.buf, log.cap) };
            log.buf = std::ptr::null_mut();
            log.cap = 0;
        }
    });
    false
}

/// Before a call that may block or that sends: the records so far must
/// reach the rrc process first (they may be what the output depends on).
pub fn flush_before_blocking() {
    if let Some(_inside) = thread::enter() {
        flush();
    }
}

/// At exit: the exiting thread's pending records, or the replay's report
/// when a restored copy was replayed.
extern "C" fn at_exit() {
    if crate::replay::active() {
        crate::replay::report();
        return;
    }
    if let Some(_inside) = thread::enter() {
        flush();
    }
}
