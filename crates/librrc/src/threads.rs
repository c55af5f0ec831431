//! Threads and processes: a thread created with `pthread_create` gets its
//! log id from its creator (so the ids follow the recorded order, not the
//! order in which the new threads happen to run), and its log ends with a
//! record of its exit. `fork` is recorded in the parent; the child is not
//! recorded.

use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};

use libc::{c_int, c_void, pthread_attr_t, pthread_t};
use rrc_rr::log::Event;

use crate::hooks::{SavedErrno, outcome};
use crate::real::{StartRoutine, get};
use crate::{record, replay, thread};

/// A start routine on its way to a new thread. A fixed table, since
/// nothing here may allocate.
struct Start {
    /// 0: free.
    routine: AtomicUsize,
    arg: AtomicUsize,
    log_id: AtomicU32,
}

const STARTS: usize = 1024;

static TABLE: [Start; STARTS] = [const {
    Start {
        routine: AtomicUsize::new(0),
        arg: AtomicUsize::new(0),
        log_id: AtomicU32::new(0),
    }
}; STARTS];

/// Claims an entry of the table for `routine`.
fn claim(routine: StartRoutine, arg: *mut c_void, log_id: u32) -> Option<usize> {
    for (i, s) in TABLE.iter().enumerate() {
        if s.routine
            .compare_exchange(0, routine as usize, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
        {
            s.arg.store(arg as usize, Ordering::Relaxed);
            s.log_id.store(log_id, Ordering::Release);
            return Some(i);
        }
    }
    None
}

extern "C" fn trampoline(entry: *mut c_void) -> *mut c_void {
    let s = &TABLE[entry as usize];
    let log_id = s.log_id.load(Ordering::Acquire);
    let arg = s.arg.load(Ordering::Relaxed) as *mut c_void;
    let routine = s.routine.load(Ordering::Relaxed);
    s.routine.store(0, Ordering::Release);
    thread::set_log_id(log_id);
    // SAFETY: the address stored by `claim` from a StartRoutine.
    let routine: StartRoutine = unsafe { std::mem::transmute::<usize, StartRoutine>(routine) };
    let ret = routine(arg);
    end_of_thread();
    ret
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn pthread_create(
    out: *mut pthread_t,
    attr: *const pthread_attr_t,
    routine: StartRoutine,
    arg: *mut c_void,
) -> c_int {
    if replay::active() {
        // SAFETY: the program's arguments, passed on unchanged.
        return unsafe { replay_create(out, attr, routine, arg) };
    }
    let inside = thread::enter();
    if inside.is_none() || !record::recording() {
        // SAFETY: the program's arguments, passed on unchanged.
        return unsafe { get::pthread_create()(out, attr, routine, arg) };
    }
    let log_id = record::next_log_id();
    let Some(entry) = claim(routine, arg, log_id) else {
        crate::fatal(b"librrc: more than 1024 threads starting at once\n");
    };
    // Recorded before the thread exists: everything it records comes
    // after its creation in the global order, as replay needs.
    if record::emit(&Event::ThreadCreate {
        ret: 0,
        child: log_id,
    }) {
        TABLE[entry].routine.store(0, Ordering::Release);
        drop(inside);
        // SAFETY: as the program called it, now served from the log.
        return unsafe { pthread_create(out, attr, routine, arg) };
    }
    // SAFETY: the program's arguments, with our trampoline around its
    // start routine.
    let ret = unsafe { get::pthread_create()(out, attr, trampoline, entry as *mut c_void) };
    if ret != 0 {
        TABLE[entry].routine.store(0, Ordering::Release);
        // The creation failed after all: a second record says so.
        let _ = record::emit(&Event::ThreadCreate { ret, child: 0 });
    }
    ret
}

/// In replay: the child gets the log id recorded for it.
///
/// # Safety
/// As `pthread_create`.
unsafe fn replay_create(
    out: *mut pthread_t,
    attr: *const pthread_attr_t,
    routine: StartRoutine,
    arg: *mut c_void,
) -> c_int {
    let Some(t) = replay::take("pthread_create", |e| {
        matches!(e, Event::ThreadCreate { .. })
    }) else {
        // SAFETY: the program's arguments, passed on unchanged.
        return unsafe { get::pthread_create()(out, attr, routine, arg) };
    };
    let Event::ThreadCreate { ret, child } = t.record.event else {
        unreachable!("checked by take")
    };
    if ret != 0 || child == 0 {
        t.complete();
        return if ret != 0 { ret } else { libc::EAGAIN };
    }
    let Some(entry) = claim(routine, arg, child) else {
        crate::fatal(b"librrc: more than 1024 threads starting at once\n");
    };
    t.complete();
    // SAFETY: the program's arguments, with our trampoline around its
    // start routine.
    let r = unsafe { get::pthread_create()(out, attr, trampoline, entry as *mut c_void) };
    if r != 0 {
        TABLE[entry].routine.store(0, Ordering::Release);
    }
    r
}

/// A thread's end: its record (or, in replay, its turn).
fn end_of_thread() {
    if !replay::active() {
        let Some(inside) = thread::enter() else {
            return;
        };
        if !record::thread_exit() {
            return;
        }
        // A copy restored for replay: the exit takes its turn.
        drop(inside);
    }
    if let Some(t) = replay::take("thread exit", |e| matches!(e, Event::ThreadExit)) {
        t.complete();
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn pthread_exit(ret: *mut c_void) -> ! {
    end_of_thread();
    // SAFETY: the program's argument; the real pthread_exit never returns.
    unsafe { get::pthread_exit()(ret) };
    unreachable!("pthread_exit returned")
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn fork() -> libc::pid_t {
    replay::unsupported("fork");
    // What the C library's fork handlers make this thread do (an
    // allocator locks and unlocks its mutexes, in the parent and in the
    // child) goes unrecorded: in the child, whose copy of this thread's
    // ring is the parent's own memory, a record would corrupt the
    // parent's log before the child's handler stops its recording; and
    // the log cannot be replayed past a fork anyway.
    let inside = thread::enter();
    // SAFETY: no arguments.
    let ret = unsafe { get::fork()() };
    drop(inside);
    if ret != 0
        && let Some(_inside) = thread::enter()
    {
        let _e = SavedErrno::save();
        if ret > 0 {
            // The child is not recorded (its atfork handler stopped it):
            // replay cannot go past this point.
            let _ = record::emit(&Event::ForkUnsupported);
        } else {
            let _ = record::emit(&Event::Fork { ret: outcome(-1) });
        }
    }
    ret
}
