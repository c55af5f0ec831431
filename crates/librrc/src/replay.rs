//! Replay: each thread takes its outcomes from its own log instead of the
//! world, in the recorded global order (and, if asked, with the recorded
//! time between returns), until its log ends or reaches the last record
//! the configuration lets it serve (`until`); from then on, or after a
//! divergence, it runs live.
//!
//! Everything the wrappers need is built once (so it may allocate there):
//! every thread log read and checked, the sorted list of all sequence
//! numbers. From the program's start that happens in the constructor,
//! while the program is single-threaded; in a copy restored from a
//! checkpoint, by the first thread that tries to record, while the others
//! wait for it ([`switch_in`]). The wrappers then only read that and
//! thread-locals, and wait on a futex.

use std::cell::UnsafeCell;
use std::mem::ManuallyDrop;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use rrc_rr::interface::{self, ReplayConfig};
use rrc_rr::log::{BatchReader, Event, Record, log_file_path};

use crate::thread;

/// Checks of the turn counter before sleeping on it: busy ones first
/// (a few microseconds), then ones that yield the CPU between checks.
const SPIN_LIMIT: u32 = 2_000;
const SPIN_BUSY: u32 = 1_000;

/// A recorded gap longer than this is slept through, less half of it (a
/// sleep overshoots by tens of microseconds).
const SLEEP_GAP_NS: u64 = 200_000;

/// A recorded gap shorter than this is waited out on the CPU: most gaps
/// between a busy program's records are a microsecond or two, and a yield
/// (a system call, often a switch to a thread that only waits for its
/// turn) takes longer than the gap itself.
const SPIN_GAP_NS: u64 = 20_000;

/// How long no record may complete, while a thread waits for its turn,
/// before the order is given up as stuck.
const STUCK_NS: u64 = 5_000_000_000;

/// How long no record may complete before the thread whose turn it is gets
/// a signal, in a restored copy: a checkpoint that caught it between a
/// wrapper and the system call it was about to make leaves it blocked in
/// the real call, from which only a signal brings it back to the wrapper.
const KICK_NS: u64 = 100_000_000;

struct Replay {
    /// Thread log contents by log id (index 0 unused).
    logs: Vec<&'static [u8]>,
    /// Every record's sequence number, sorted: a record's rank is its
    /// place here, and it may complete once `DONE` equals its rank.
    seqs: Vec<u64>,
    /// The log id of the thread each record belongs to, by rank: the one
    /// thread to wake when `DONE` reaches that rank.
    owners: Vec<u32>,
    /// The first sequence number to replay: a copy restored from a
    /// checkpoint has done everything before it.
    from: u64,
    /// The last sequence number to replay: a thread whose next record is
    /// beyond it has reached the end of its log.
    until: u64,
    order: bool,
    timing: bool,
    stop_at_end: bool,
    /// The program runs in the recorded address space (restored from a
    /// checkpoint): the objects of synchronization operations must match.
    same_addresses: bool,
    /// Count the first record served as a divergence (tests).
    inject_divergence: bool,
}

static REPLAY: std::sync::atomic::AtomicPtr<Replay> =
    std::sync::atomic::AtomicPtr::new(std::ptr::null_mut());
/// Records completed so far (the futex word threads wait on).
static DONE: AtomicU32 = AtomicU32::new(0);
/// When the last record completed (monotonic ns).
static LAST_NS: AtomicU64 = AtomicU64::new(0);
/// Set when a thread leaves the recorded path: the order cannot hold any
/// more, nobody waits for it.
static ORDER_BROKEN: AtomicBool = AtomicBool::new(false);
static REPLAYED: AtomicU64 = AtomicU64::new(0);
static DIVERGED: AtomicU64 = AtomicU64::new(0);
/// The injected divergence happened.
static INJECTED: AtomicBool = AtomicBool::new(false);
static STARTED_NS: AtomicU64 = AtomicU64::new(0);
/// Per thread log (by id, the first 1024): the last record it took, for
/// the report of an order that got stuck.
static LAST_TAKEN: [AtomicU64; 1024] = [const { AtomicU64::new(0) }; 1024];
/// Per thread log (by id, the first 1024): the word its thread sleeps on
/// while it waits for its turn, and whether it sleeps there. A completed
/// record wakes only the thread whose turn is next: waking every sleeper
/// at every record (four Memcached workers and their helpers on two CPUs)
/// spent the CPUs on threads that only went back to sleep. Threads of
/// higher ids sleep on `DONE` and are woken all together.
static TURN_WORD: [AtomicU32; 1024] = [const { AtomicU32::new(0) }; 1024];
static ASLEEP: [AtomicBool; 1024] = [const { AtomicBool::new(false) }; 1024];

struct Cursor {
    /// The replay ([`GENERATION`]) this cursor belongs to: a copy restored
    /// after a takeover carries its threads' cursors of the replay before.
    generation: u32,
    started: bool,
    /// This thread left the log (it ended or diverged).
    live: bool,
    rest: &'static [u8],
    batch: Option<BatchReader<'static>>,
}

thread_local! {
    static CURSOR: UnsafeCell<ManuallyDrop<Cursor>> = const {
        UnsafeCell::new(ManuallyDrop::new(Cursor {
            generation: 0,
            started: false,
            live: false,
            rest: &[],
            batch: None,
        }))
    };
}

/// Starts replay from the program's start with the configuration at
/// descriptor `fd`, if that is what it holds; false if it does not. The
/// descriptor stays open.
pub fn init_from_fd(fd: i32) -> bool {
    let Some(cfg) = read_config(fd) else {
        return false;
    };
    start(cfg);
    // The loading thread is the program's first.
    thread::set_log_id(crate::record::next_log_id());
    // SAFETY: registering a plain function.
    unsafe { libc::atexit(report) };
    true
}

/// 0: recording; 1: a thread is loading the replay; 2: replaying.
static SWITCH: AtomicU32 = AtomicU32::new(0);
/// Counts the replays started in this process (a program taken over by
/// replay, then recorded again, is replayed again at the next takeover).
static GENERATION: AtomicU32 = AtomicU32::new(0);

impl Cursor {
    /// This cursor, made afresh if it belongs to an earlier replay.
    fn current(&mut self) -> &mut Cursor {
        let generation = GENERATION.load(Ordering::Acquire);
        if self.generation != generation {
            *self = Cursor {
                generation,
                started: false,
                live: false,
                rest: &[],
                batch: None,
            };
        }
        self
    }
}

/// The program was restored from a checkpoint taken while it was recorded,
/// and `rrc replay` marked it for replay: the first thread to notice loads
/// the replay (its configuration is where the rings' descriptor was), the
/// others wait for it. True if the calling thread is to take its call from
/// the log (false once its log has ended).
pub fn switch_in() -> bool {
    loop {
        match SWITCH.compare_exchange(0, 1, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => {
                if !crate::record::replay_requested() {
                    // The program records into new rings since the
                    // replay before went live ([`end`]): this thread saw
                    // the old state on its way in. Its call stands.
                    SWITCH.store(0, Ordering::Release);
                    return false;
                }
                let fd = crate::record::ring_fd();
                match read_config(fd) {
                    Some(cfg) => start(cfg),
                    None => crate::fatal(
                        b"librrc: restored for replay, but there is no replay configuration at the rings' descriptor\n",
                    ),
                }
                SWITCH.store(2, Ordering::Release);
                break;
            }
            Err(1) => {
                // SAFETY: sched_yield has no arguments.
                unsafe { libc::syscall(libc::SYS_sched_yield) };
            }
            Err(0) => {}
            Err(_) => break,
        }
    }
    !thread_live()
}

/// The takeover this replay was for went live with new rings: the program
/// records again, and the next replay (of a checkpoint taken from now on)
/// is loaded afresh. Returns the last sequence number of the log
/// replayed. Called once, while the program's threads are parked; the
/// replay's memory stays (a thread may still be on its way out of it).
pub fn end() -> u64 {
    let p = REPLAY.swap(std::ptr::null_mut(), Ordering::AcqRel);
    SWITCH.store(0, Ordering::Release);
    if p.is_null() {
        return 0;
    }
    // SAFETY: set in `start` from a leaked Box, never freed.
    unsafe { &*p }.seqs.last().copied().unwrap_or(0)
}

/// Whether this thread's log is behind it (ended or left).
fn thread_live() -> bool {
    CURSOR
        .try_with(|cell| {
            // SAFETY: only this thread touches its cursor.
            let c = unsafe { &mut *cell.get() }.current();
            c.live
        })
        .unwrap_or(true)
}

/// The replay configuration at descriptor `fd`, if it holds one: `rrc
/// replay` puts it at the descriptor the recording's rings had, named by
/// the recorded `RRC_RR_FD` (so that the program's environment, which some
/// programs copy into their heap, is exactly the recorded one). One of
/// another version, or one that does not check out, stops the program.
fn read_config(fd: i32) -> Option<ReplayConfig> {
    let mut head = [0u8; 16];
    // SAFETY: a pread into a local buffer.
    let n = unsafe { libc::pread(fd, head.as_mut_ptr().cast(), head.len(), 0) };
    if !interface::is_replay_config(&head[..n.max(0) as usize]) {
        return None;
    }
    let mut text = Vec::new();
    let mut buf = [0u8; 4096];
    let mut off = 0i64;
    loop {
        // SAFETY: a pread into a local buffer.
        let n = unsafe { libc::pread(fd, buf.as_mut_ptr().cast(), buf.len(), off) };
        if n <= 0 {
            break;
        }
        text.extend_from_slice(&buf[..n as usize]);
        off += n as i64;
    }
    match ReplayConfig::parse(&text) {
        Ok(cfg) => Some(cfg),
        Err(e) => crate::fatal(format!("librrc: cannot replay: {e}\n").as_bytes()),
    }
}

fn start(cfg: ReplayConfig) {
    let r = match load(&cfg) {
        Ok(r) => r,
        Err(e) => {
            let msg = format!("librrc: cannot replay {}: {e}\n", cfg.log_dir.display());
            crate::fatal(msg.as_bytes());
        }
    };
    crate::net::init(cfg.capture.as_deref());
    crate::takeover::configure(cfg.takeover.as_deref());
    for &fd in &cfg.virtual_fds {
        crate::net::set_virtual(fd, true);
    }
    // Everything before the first record to replay is done.
    DONE.store(
        r.seqs.partition_point(|s| *s < r.from) as u32,
        Ordering::Release,
    );
    // What an earlier replay of this process left (it was taken over,
    // then recorded again) starts over.
    ORDER_BROKEN.store(false, Ordering::Release);
    REPLAYED.store(0, Ordering::Relaxed);
    DIVERGED.store(0, Ordering::Relaxed);
    INJECTED.store(false, Ordering::Relaxed);
    for slot in &LAST_TAKEN {
        slot.store(0, Ordering::Relaxed);
    }
    GENERATION.fetch_add(1, Ordering::AcqRel);
    STARTED_NS.store(crate::record::now_ns(), Ordering::Relaxed);
    LAST_NS.store(crate::record::now_ns(), Ordering::Relaxed);
    REPLAY.store(Box::into_raw(Box::new(r)), Ordering::Release);
}

fn load(cfg: &ReplayConfig) -> Result<Replay, String> {
    let dir = cfg.log_dir.as_path();
    let until = cfg.until.unwrap_or(u64::MAX);
    // Listing the directory would go through the C library's opendir,
    // which allocates with the program's malloc and so changes what the
    // program's allocator does next; `rrc replay` passes the list.
    let ids = &cfg.logs;
    if ids.is_empty() {
        return Err("no thread logs".into());
    }
    let mut logs: Vec<&'static [u8]> = Vec::new();
    let mut ranked: Vec<(u64, u32)> = Vec::new();
    for &id in ids {
        let path = log_file_path(dir, id);
        let bytes: &'static [u8] = Box::leak(
            std::fs::read(&path)
                .map_err(|e| format!("{}: {e}", path.display()))?
                .into_boxed_slice(),
        );
        // Checked whole first (each batch's checksum, that it is this
        // thread's, that the order only rises), so the wrappers can trust
        // what they read.
        let bad = |what: String| format!("{}: {what}", path.display());
        let mut rest = bytes;
        let mut last = 0;
        while !rest.is_empty() {
            let (mut batch, next) =
                BatchReader::split_first(rest).map_err(|e| bad(e.to_string()))?;
            if batch.header().log_id != id {
                return Err(bad(format!("a batch of thread {}", batch.header().log_id)));
            }
            while let Some(rec) = batch.next_record().map_err(|e| bad(e.to_string()))? {
                if rec.seq <= last {
                    return Err(bad(format!("event #{} follows #{last}", rec.seq)));
                }
                last = rec.seq;
                // Records beyond `until` are never served: they are not
                // waited for, and the end of the log is reached without
                // them.
                if rec.seq <= until {
                    ranked.push((rec.seq, id));
                }
            }
            rest = next;
        }
        let idx = id as usize;
        if logs.len() <= idx {
            logs.resize(idx + 1, &[]);
        }
        logs[idx] = bytes;
    }
    ranked.sort_unstable();
    let (seqs, owners): (Vec<u64>, Vec<u32>) = ranked.into_iter().unzip();
    // The recorded timing keeps threads' progress relative to each other
    // (a data race between them comes out as recorded). When every record
    // left to replay is one thread's, the others stayed inside calls that
    // had not returned, and its own gaps (time it was blocked, waiting for
    // input) need no waiting: a single-threaded server's takeover then
    // replays its log several times faster than it was recorded.
    let first = seqs.partition_point(|s| *s < cfg.from);
    let several_threads = owners[first..].windows(2).any(|w| w[0] != w[1]);
    Ok(Replay {
        logs,
        seqs,
        owners,
        from: cfg.from,
        until,
        order: cfg.order,
        timing: cfg.timing && several_threads,
        stop_at_end: cfg.stop_at_end,
        same_addresses: cfg.same_addresses,
        inject_divergence: cfg.inject_divergence,
    })
}

fn state() -> Option<&'static Replay> {
    let p = REPLAY.load(Ordering::Acquire);
    // SAFETY: set once in `init` from a leaked Box, never freed.
    (!p.is_null()).then(|| unsafe { &*p })
}

/// Whether the program is being replayed.
pub fn active() -> bool {
    state().is_some()
}

/// Whether the program runs in the recorded address space.
pub fn same_addresses() -> bool {
    state().is_some_and(|r| r.same_addresses)
}

/// The event as text, cut to the buffer, without allocating.
fn describe<'b>(e: &Event<'_>, buf: &'b mut [u8; 160]) -> &'b [u8] {
    struct Cut<'a> {
        buf: &'a mut [u8],
        len: usize,
    }
    impl std::fmt::Write for Cut<'_> {
        fn write_str(&mut self, s: &str) -> std::fmt::Result {
            let k = s.len().min(self.buf.len() - self.len);
            self.buf[self.len..self.len + k].copy_from_slice(&s.as_bytes()[..k]);
            self.len += k;
            Ok(())
        }
    }
    let mut w = Cut {
        buf: &mut buf[..],
        len: 0,
    };
    let _ = std::fmt::write(&mut w, format_args!("{e:?}"));
    let len = w.len;
    &buf[..len]
}

/// Decimal digits of `v`, without allocating.
pub(crate) fn digits(v: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len();
    let mut v = v;
    loop {
        i -= 1;
        buf[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    &buf[i..]
}

/// Prints what the replay did: events, divergences, time.
pub extern "C" fn report() {
    let mut a = [0u8; 20];
    let mut b = [0u8; 20];
    let mut c = [0u8; 20];
    let ms = (crate::record::now_ns() - STARTED_NS.load(Ordering::Relaxed)) / 1_000_000;
    crate::say(&[
        b"rrc replay: ",
        digits(REPLAYED.load(Ordering::Relaxed), &mut a),
        b" events replayed, ",
        digits(DIVERGED.load(Ordering::Relaxed), &mut b),
        b" divergences, ",
        digits(ms, &mut c),
        b" ms\n",
    ]);
}

/// A record this thread may now complete: its outcome is to be given to
/// the program, then [`Turn::complete`] lets the next record go.
pub struct Turn {
    pub record: Record<'static>,
}

impl Turn {
    pub fn complete(self) {
        if let Some(slot) = LAST_TAKEN.get(thread::log_id() as usize) {
            slot.store(self.record.seq | 1 << 61, Ordering::Relaxed);
        }
        let r = state();
        if r.is_some_and(|r| r.timing) {
            wait_gap(self.record.time_delta_ns);
        }
        REPLAYED.fetch_add(1, Ordering::Relaxed);
        LAST_NS.store(crate::record::now_ns(), Ordering::Release);
        let done = DONE.fetch_add(1, Ordering::SeqCst) + 1;
        wake_turn(r.and_then(|r| r.owners.get(done as usize).copied()));
        if let Some(r) = r
            && done as usize == r.seqs.len()
        {
            if crate::takeover::active() {
                crate::say(&[b"rrc replay: end of the log reached\n"]);
                crate::takeover::wake();
                return;
            }
            crate::say(&[b"rrc replay: end of the log reached; the program runs live from here\n"]);
            if r.stop_at_end {
                // SAFETY: signalling this process.
                unsafe { libc::syscall(libc::SYS_kill, libc::getpid(), libc::SIGTERM) };
            }
        }
    }
}

/// This thread's next record, if it passes `expected`; waits for its turn.
/// `None`: the thread runs this call live (its log ended, or it diverged,
/// which is reported and counted). Signal handlers recorded before the
/// call run first, each in its turn.
pub fn take(call: &'static str, expected: impl Fn(&Event<'static>) -> bool) -> Option<Turn> {
    loop {
        match next_turn(call, &expected)? {
            Next::Call(t) => return Some(t),
            Next::Signal(signo) => crate::signals::replay_handler(signo),
        }
    }
}

enum Next {
    Call(Turn),
    /// A handler ran here when recorded: its turn is taken, it runs now
    /// (outside librrc, so that what it calls is replayed too).
    Signal(i32),
}

fn next_turn(call: &'static str, expected: &dyn Fn(&Event<'static>) -> bool) -> Option<Next> {
    let r = state()?;
    let _inside = thread::enter()?;
    CURSOR
        .try_with(|cell| {
            // SAFETY: only this thread touches its cursor, never
            // re-entrantly (we hold `Inside`).
            let c = unsafe { &mut *cell.get() }.current();
            if c.live {
                return None;
            }
            let Some(rec) = next_to_replay(r, c) else {
                // The log ended (or what is left of it is not to be
                // replayed): live from here on.
                c.live = true;
                leave_log(r, call);
                return None;
            };
            if let Some(slot) = LAST_TAKEN.get(thread::log_id() as usize) {
                slot.store(rec.seq, Ordering::Relaxed);
            }
            if let Event::Signal { signo } = rec.event {
                wait_turn(r, &rec);
                Turn { record: rec }.complete();
                return Some(Next::Signal(signo));
            }
            let injected = r.inject_divergence && !INJECTED.swap(true, Ordering::AcqRel);
            if injected || !expected(&rec.event) {
                c.live = true;
                diverged(call, &rec);
                leave_log(r, call);
                return None;
            }
            wait_turn(r, &rec);
            if let Some(slot) = LAST_TAKEN.get(thread::log_id() as usize) {
                slot.store(rec.seq | 1 << 62, Ordering::Relaxed);
            }
            Some(Next::Call(Turn { record: rec }))
        })
        .ok()
        .flatten()
}

/// In replay, a call librrc cannot serve from the log yet: the thread
/// leaves the log here (reported and counted as a divergence).
pub fn unsupported(call: &'static str) {
    if state().is_none() {
        return;
    }
    let Some(_inside) = thread::enter() else {
        return;
    };
    let _ = CURSOR.try_with(|cell| {
        // SAFETY: as in `take`.
        let c = unsafe { &mut *cell.get() }.current();
        if c.live {
            return;
        }
        c.live = true;
        let Some(r) = state() else {
            return;
        };
        if next_to_replay(r, c).is_none() {
            // Past the end of its log, the thread makes the call live (a
            // takeover's log ends before a fork, which a replay cannot
            // pass: the program forks again once live).
            leave_log(r, call);
            return;
        }
        let mut a = [0u8; 20];
        divergence(&[
            b" in thread ",
            digits(u64::from(thread::log_id()), &mut a),
            b": replaying ",
            call.as_bytes(),
            b" is not supported yet; this thread runs live from here\n",
        ]);
        leave_log(r, call);
    });
}

/// The thread's next record to replay (taking it from its cursor), if its
/// log has one left: a restored copy skips what it did before the
/// checkpoint, and records past `until` are not replayed.
fn next_to_replay(r: &Replay, c: &mut Cursor) -> Option<Record<'static>> {
    if !c.started {
        c.started = true;
        c.rest = r
            .logs
            .get(thread::log_id() as usize)
            .copied()
            .unwrap_or(&[]);
    }
    std::iter::from_fn(|| next_record(c))
        .find(|rec| rec.seq >= r.from)
        .filter(|rec| rec.seq <= r.until)
}

/// A thread leaves the log (it ended, or the thread diverged). In a
/// takeover it parks here until its connections are live; otherwise it
/// runs live at once.
fn leave_log(r: &'static Replay, call: &'static str) {
    if crate::takeover::active() {
        crate::takeover::park(call, &|| {
            DONE.load(Ordering::Acquire) as usize >= r.seqs.len()
        });
    }
}

/// Wakes the thread of log `owner`, whose turn it now is, if it sleeps
/// (and with no owner, or one of a high id, every thread).
fn wake_turn(owner: Option<u32>) {
    let Some(id) = owner.map(|o| o as usize).filter(|&i| i < ASLEEP.len()) else {
        return wake_all();
    };
    // Paired with `sleep_turn`: DONE was raised (SeqCst) before this load,
    // and a sleeper sets its flag before it looks at DONE, so either it
    // sees the new count or this sees it asleep.
    if ASLEEP[id].load(Ordering::SeqCst) {
        TURN_WORD[id].fetch_add(1, Ordering::SeqCst);
        futex_wake(&TURN_WORD[id], 1);
    }
}

fn wake_all() {
    futex_wake(&DONE, i32::MAX);
    for (flag, word) in ASLEEP.iter().zip(&TURN_WORD) {
        if flag.load(Ordering::SeqCst) {
            word.fetch_add(1, Ordering::SeqCst);
            futex_wake(word, i32::MAX);
        }
    }
}

fn futex_wake(word: &AtomicU32, n: i32) {
    // SAFETY: a futex wake on a static word.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAKE | libc::FUTEX_PRIVATE_FLAG,
            n,
        )
    };
}

/// Sleeps until woken for the turn `rank` (or for at most 100 ms: the
/// caller looks for a stuck order), unless it came meanwhile.
fn sleep_turn(rank: u32, seen: u32) {
    let ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 100_000_000,
    };
    let id = thread::log_id() as usize;
    let (word, expected) = match (TURN_WORD.get(id), ASLEEP.get(id)) {
        (Some(word), Some(flag)) => {
            let expected = word.load(Ordering::SeqCst);
            flag.store(true, Ordering::SeqCst);
            if DONE.load(Ordering::SeqCst) >= rank || ORDER_BROKEN.load(Ordering::SeqCst) {
                flag.store(false, Ordering::SeqCst);
                return;
            }
            (word, expected)
        }
        _ => (&DONE, seen),
    };
    // SAFETY: a futex wait on a static word with a local timeout.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT | libc::FUTEX_PRIVATE_FLAG,
            expected,
            &ts as *const libc::timespec,
        )
    };
    if let Some(flag) = ASLEEP.get(id) {
        flag.store(false, Ordering::SeqCst);
    }
}

fn next_record(c: &mut Cursor) -> Option<Record<'static>> {
    loop {
        if let Some(b) = c.batch.as_mut() {
            match b.next_record() {
                Ok(Some(rec)) => return Some(rec),
                // Checked at load; an error cannot happen, an end can.
                _ => c.batch = None,
            }
        }
        if c.rest.is_empty() {
            return None;
        }
        let (b, rest) = BatchReader::split_first(c.rest).ok()?;
        c.batch = Some(b);
        c.rest = rest;
    }
}

/// Counts and reports a divergence (`parts` follow "DIVERGENCE"), and
/// stops enforcing the order: nobody may wait for the diverged thread's
/// records any more.
fn divergence(parts: &[&[u8]]) {
    DIVERGED.fetch_add(1, Ordering::Relaxed);
    let mut all: [&[u8]; 12] = [&[]; 12];
    all[0] = b"rrc replay: DIVERGENCE";
    let n = parts.len().min(all.len() - 1);
    all[1..=n].copy_from_slice(&parts[..n]);
    crate::takeover::diverged(&all[1..=n]);
    ORDER_BROKEN.store(true, Ordering::SeqCst);
    crate::say(&all[..=n]);
    wake_all();
}

fn diverged(call: &str, rec: &Record<'_>) {
    let mut a = [0u8; 20];
    let mut b = [0u8; 20];
    divergence(&[
        b" in thread ",
        digits(u64::from(thread::log_id()), &mut a),
        b" at event #",
        digits(rec.seq, &mut b),
        b": the program called ",
        call.as_bytes(),
        b" where the log has ",
        describe(&rec.event, &mut [0u8; 160]),
        b"; this thread runs live from here\n",
    ]);
}

/// The last record thread `id` took (its number), and whether it completed
/// it; `None` before its first.
pub fn last_taken(id: u32) -> Option<(u64, bool)> {
    let v = LAST_TAKEN.get(id as usize)?.load(Ordering::Relaxed);
    (v != 0).then_some((v & ((1 << 60) - 1), v >> 61 == 1))
}

/// How many thread logs the replay has (ids below this).
pub fn thread_logs() -> usize {
    state().map_or(0, |r| r.logs.len())
}

/// For a stuck order: where each thread is in its log.
fn positions(r: &Replay, done: u32) {
    let mut a = [0u8; 20];
    let mut b = [0u8; 20];
    crate::say(&[
        b"rrc replay: ",
        digits(u64::from(done), &mut a),
        b" of ",
        digits(r.seqs.len() as u64, &mut b),
        b" events done; the last event each thread took:\n",
    ]);
    for (id, last) in LAST_TAKEN.iter().enumerate().take(r.logs.len()).skip(1) {
        let (mut a, mut b) = ([0u8; 20], [0u8; 20]);
        crate::say(&[
            b"rrc replay:   thread ",
            digits(id as u64, &mut a),
            b" #",
            digits(last.load(Ordering::Relaxed) & ((1 << 60) - 1), &mut b),
            match last.load(Ordering::Relaxed) >> 61 {
                2 => b" (its turn: in the call)\n",
                1 => b" (completed)\n",
                _ => b" (waiting for its turn)\n",
            },
        ]);
    }
}

/// Signals the thread whose record is next (rank `done`), so that a real
/// input call it was restored into returns EINTR to its wrapper, which
/// then serves it from the log. The signal is one the program has no
/// handler for, caught by a handler that does nothing and does not restart
/// the interrupted call.
fn kick_owner(r: &Replay, done: u32) {
    let Some(seq) = r.seqs.get(done as usize) else {
        return;
    };
    let Some(tid) = find_record(r, *seq).and_then(|(id, _)| crate::record::tid_of_log(id)) else {
        return;
    };
    let Some(sig) = crate::signals::kick_signal() else {
        return;
    };
    // SAFETY: signalling a thread of this process.
    unsafe { libc::syscall(libc::SYS_tgkill, libc::getpid(), tid, sig) };
}

/// The thread and event of record `seq` (a search through every log,
/// for reports).
fn find_record(r: &Replay, seq: u64) -> Option<(u32, Event<'static>)> {
    for (id, log) in r.logs.iter().enumerate() {
        let mut rest: &'static [u8] = log;
        while !rest.is_empty() {
            let (mut batch, next) = BatchReader::split_first(rest).ok()?;
            while let Ok(Some(rec)) = batch.next_record() {
                if rec.seq == seq {
                    return Some((id as u32, rec.event));
                }
            }
            rest = next;
        }
    }
    None
}

/// Waits until every record before `rec` completed (the recorded timing
/// is kept by [`Turn::complete`]).
fn wait_turn(r: &Replay, rec: &Record<'_>) {
    if r.order {
        let rank = r.seqs.partition_point(|s| *s < rec.seq) as u32;
        // Stuck means no event completed for a while, not a long wait:
        // a thread whose turn is far ahead (a timer's) waits as long as
        // the events before it take.
        let mut seen = DONE.load(Ordering::Acquire);
        let mut since = crate::record::now_ns();
        let mut kicked = false;
        // Spin first: recorded events are often microseconds apart, and a
        // futex wake-up across CPUs costs tens of microseconds, which
        // would serialize threads that ran side by side when recorded.
        let mut spins = 0u32;
        loop {
            let done = DONE.load(Ordering::Acquire);
            if done >= rank || ORDER_BROKEN.load(Ordering::Acquire) {
                break;
            }
            if spins < SPIN_LIMIT {
                spins += 1;
                if spins < SPIN_BUSY {
                    std::hint::spin_loop();
                } else {
                    // More threads wait than there are CPUs: the one whose
                    // turn it is must not be kept off its CPU.
                    // SAFETY: sched_yield has no arguments.
                    unsafe { libc::syscall(libc::SYS_sched_yield) };
                }
                continue;
            }
            if done != seen {
                seen = done;
                since = crate::record::now_ns();
                kicked = false;
            }
            if !kicked && r.from > 0 && crate::record::now_ns() - since > KICK_NS {
                kicked = true;
                kick_owner(r, done);
            }
            if crate::record::now_ns() - since > STUCK_NS {
                let missing = r.seqs.get(done as usize).copied().unwrap_or(0);
                let (mut a, mut b, mut c, mut d, mut e) =
                    ([0u8; 20], [0u8; 20], [0u8; 20], [0u8; 160], [0u8; 20]);
                // Before the order is let go: where each thread stands.
                positions(r, done);
                let (owner, what) = match find_record(r, missing) {
                    Some((id, e)) => (id, describe(&e, &mut d)),
                    None => (0, &b"?"[..]),
                };
                divergence(&[
                    b": event #",
                    digits(rec.seq, &mut a),
                    b" waits, and for 5 s no event completed; the next is #",
                    digits(missing, &mut b),
                    b" (thread ",
                    digits(u64::from(owner), &mut c),
                    b": ",
                    what,
                    b"), which never came (that thread last took #",
                    digits(
                        LAST_TAKEN
                            .get(owner as usize)
                            .map_or(0, |l| l.load(Ordering::Relaxed)),
                        &mut e,
                    ),
                    b"); order no longer enforced\n",
                ]);
                break;
            }
            sleep_turn(rank, done);
        }
    }
}

/// Waits until the recorded time since the previous return of any thread
/// has passed since the replay's previous return. Called just before this
/// thread's return is let go, so the work of serving the outcome overlaps
/// the gap instead of adding to it (when recorded, threads ran side by
/// side and their gaps a microsecond or two apart).
fn wait_gap(delta_ns: u64) {
    let due = LAST_NS.load(Ordering::Acquire) + delta_ns;
    loop {
        let now = crate::record::now_ns();
        if now >= due {
            break;
        }
        if due - now > SLEEP_GAP_NS {
            // A long gap (the thread was blocked when recorded) is slept
            // through, not yielded through: the threads that run meanwhile
            // need the CPU. Woken early enough that the sleep's overshoot
            // does not delay the record.
            sleep_ns(due - now - SLEEP_GAP_NS / 2);
        } else if due - now > SPIN_GAP_NS {
            // SAFETY: sched_yield has no arguments. Gaps of tens of
            // microseconds are yielded through; a sleep would overshoot.
            unsafe { libc::syscall(libc::SYS_sched_yield) };
        } else {
            std::hint::spin_loop();
        }
    }
}

/// Sleeps for `ns` by the system call itself (the program's
/// `clock_nanosleep` may be wrapped).
fn sleep_ns(ns: u64) {
    let ts = libc::timespec {
        tv_sec: (ns / 1_000_000_000) as libc::time_t,
        tv_nsec: (ns % 1_000_000_000) as libc::c_long,
    };
    // SAFETY: a relative sleep on a local timespec; no remainder asked.
    unsafe {
        libc::syscall(
            libc::SYS_clock_nanosleep,
            libc::CLOCK_MONOTONIC,
            0,
            &ts as *const libc::timespec,
            std::ptr::null_mut::<libc::timespec>(),
        )
    };
}
