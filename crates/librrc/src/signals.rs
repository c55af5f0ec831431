//! Signal handlers. A handler the program installs runs through librrc's
//! own, which records where among the thread's events it ran; a replay
//! runs it at that point (before the thread's next call is served), since
//! the signal itself does not come again. Without this, a server stopped
//! by SIGTERM while recorded would diverge where its handler ran.
//!
//! A signal that arrives while its thread is inside librrc (recording an
//! event) is held until the thread leaves librrc, then handled: the
//! record being written must not be interrupted by another.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use libc::{c_int, c_void, siginfo_t};
use rrc_rr::log::Event;

use crate::real::get;
use crate::{record, replay, thread};

const NSIG: usize = 65;

/// The program's action for one signal, when librrc's handler stands in
/// for it.
struct Program {
    /// Its handler (0: librrc's handler is not installed).
    handler: AtomicUsize,
    flags: AtomicUsize,
    /// The first 64 signals of its mask (all there are on this machine).
    mask: AtomicU64,
}

static PROGRAM: [Program; NSIG] = [const {
    Program {
        handler: AtomicUsize::new(0),
        flags: AtomicUsize::new(0),
        mask: AtomicU64::new(0),
    }
}; NSIG];

thread_local! {
    /// Signals held while this thread was inside librrc (bit `sig - 1`).
    static HELD: Cell<u64> = const { Cell::new(0) };
}

fn active() -> bool {
    record::recording() || replay::active()
}

/// The first 64 bits of a signal set.
fn mask_bits(set: &libc::sigset_t) -> u64 {
    // SAFETY: sigset_t is at least 8 bytes of plain data.
    unsafe { std::ptr::read_unaligned((set as *const libc::sigset_t).cast::<u64>()) }
}

fn set_mask_bits(set: &mut libc::sigset_t, bits: u64) {
    // SAFETY: as above; the rest of the set stays empty.
    unsafe {
        libc::sigemptyset(set);
        std::ptr::write_unaligned((set as *mut libc::sigset_t).cast::<u64>(), bits);
    }
}

/// What the program installed for `sig`, as `sigaction` reports it.
fn program_action(sig: usize, out: &mut libc::sigaction) {
    let p = &PROGRAM[sig];
    out.sa_sigaction = p.handler.load(Ordering::Acquire);
    out.sa_flags = p.flags.load(Ordering::Relaxed) as c_int;
    set_mask_bits(&mut out.sa_mask, p.mask.load(Ordering::Relaxed));
}

fn empty_action() -> libc::sigaction {
    // SAFETY: struct sigaction is plain data; all zeroes is SIG_DFL with
    // no flags and an empty mask.
    unsafe { std::mem::zeroed() }
}

fn is_function(handler: usize) -> bool {
    handler != libc::SIG_DFL && handler != libc::SIG_IGN && handler != libc::SIG_ERR
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn sigaction(
    sig: c_int,
    act: *const libc::sigaction,
    old: *mut libc::sigaction,
) -> c_int {
    let idx = sig as usize;
    if !active() || !(1..NSIG).contains(&idx) || sig == libc::SIGKILL || sig == libc::SIGSTOP {
        // SAFETY: the program's arguments, passed on unchanged.
        return unsafe { get::sigaction()(sig, act, old) };
    }
    let ours_before = PROGRAM[idx].handler.load(Ordering::Acquire) != 0;
    let mut before = empty_action();
    if ours_before {
        program_action(idx, &mut before);
    }
    let ret = if act.is_null() {
        // SAFETY: reading the current action into `old`.
        unsafe { get::sigaction()(sig, std::ptr::null(), old) }
    } else {
        // SAFETY: the program's action, valid to read.
        let mut a = unsafe { *act };
        if is_function(a.sa_sigaction) {
            let p = &PROGRAM[idx];
            p.flags.store(a.sa_flags as usize, Ordering::Relaxed);
            p.mask.store(mask_bits(&a.sa_mask), Ordering::Relaxed);
            p.handler.store(a.sa_sigaction, Ordering::Release);
            a.sa_sigaction = on_signal as *const () as usize;
            a.sa_flags |= libc::SA_SIGINFO;
        } else {
            PROGRAM[idx].handler.store(0, Ordering::Release);
        }
        // SAFETY: a valid action (the program's, or librrc's handler with
        // the program's flags and mask).
        unsafe { get::sigaction()(sig, &a, old) }
    };
    if ret == 0 && ours_before && !old.is_null() {
        // SAFETY: the program's output struct.
        unsafe { *old = before };
    }
    ret
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn signal(sig: c_int, handler: libc::sighandler_t) -> libc::sighandler_t {
    // The C library's semantics: restart interrupted calls, block the
    // signal while its handler runs.
    let mut a = empty_action();
    a.sa_sigaction = handler;
    a.sa_flags = libc::SA_RESTART;
    // SAFETY: a local set.
    unsafe {
        libc::sigemptyset(&mut a.sa_mask);
        libc::sigaddset(&mut a.sa_mask, sig);
    }
    let mut old = empty_action();
    // SAFETY: local structs.
    if unsafe { sigaction(sig, &a, &mut old) } != 0 {
        return libc::SIG_ERR;
    }
    old.sa_sigaction
}

/// Runs the program's handler for `sig` (with what the kernel gave, or a
/// minimal siginfo when replayed or held).
fn run_program_handler(sig: c_int, info: *mut siginfo_t, ctx: *mut c_void) {
    let p = &PROGRAM[sig as usize];
    let handler = p.handler.load(Ordering::Acquire);
    if !is_function(handler) || handler == 0 {
        return;
    }
    // SAFETY: siginfo_t is plain data; all zeroes is a valid value.
    let mut local: siginfo_t = unsafe { std::mem::zeroed() };
    let info = if info.is_null() {
        local.si_signo = sig;
        local.si_code = libc::SI_USER;
        &mut local as *mut siginfo_t
    } else {
        info
    };
    if p.flags.load(Ordering::Relaxed) as c_int & libc::SA_SIGINFO != 0 {
        // SAFETY: the program installed a three-argument handler.
        let f: extern "C" fn(c_int, *mut siginfo_t, *mut c_void) =
            unsafe { std::mem::transmute::<usize, _>(handler) };
        f(sig, info, ctx);
    } else {
        // SAFETY: the program installed a one-argument handler.
        let f: extern "C" fn(c_int) = unsafe { std::mem::transmute::<usize, _>(handler) };
        f(sig);
    }
}

/// Records that the program's handler for `sig` runs here, then runs it.
fn record_and_run(sig: c_int, info: *mut siginfo_t, ctx: *mut c_void) {
    // A copy restored for replay receiving a real signal: it is handled as
    // it comes.
    let _ = crate::hooks::logged(|| Event::Signal { signo: sig });
    run_program_handler(sig, info, ctx);
}

extern "C" fn on_signal(sig: c_int, info: *mut siginfo_t, ctx: *mut c_void) {
    let _e = crate::hooks::SavedErrno::save();
    if replay::active() {
        run_program_handler(sig, info, ctx);
        return;
    }
    if thread::inside() {
        let _ = HELD.try_with(|h| h.set(h.get() | 1 << (sig - 1)));
        return;
    }
    record_and_run(sig, info, ctx);
}

/// Handles the signals held while this thread was inside librrc (called
/// as it leaves).
pub fn run_held() {
    let held = HELD.try_with(|h| h.replace(0)).unwrap_or(0);
    if held == 0 {
        return;
    }
    for sig in 1..NSIG as c_int {
        if held & (1 << (sig - 1)) != 0 {
            record_and_run(sig, std::ptr::null_mut(), std::ptr::null_mut());
        }
    }
}

/// In replay: the program's handler for `sig`, run where the recording
/// ran it.
pub fn replay_handler(sig: c_int) {
    if (1..NSIG as c_int).contains(&sig) {
        run_program_handler(sig, std::ptr::null_mut(), std::ptr::null_mut());
    }
}

extern "C" fn on_kick(_sig: c_int) {}

/// A signal the program has no handler for, with librrc's do-nothing,
/// non-restarting handler installed (the first time): sent to a thread,
/// it makes a blocking system call return EINTR.
pub fn kick_signal() -> Option<c_int> {
    static CHOSEN: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);
    let sig = CHOSEN.load(Ordering::Acquire);
    if sig != 0 {
        return Some(sig);
    }
    let sig = (libc::SIGRTMIN()..=libc::SIGRTMAX())
        .rev()
        .find(|&s| PROGRAM[s as usize].handler.load(Ordering::Acquire) == 0)?;
    let mut a = empty_action();
    a.sa_sigaction = on_kick as *const () as usize;
    // SAFETY: a valid action for a signal the program does not handle.
    if unsafe { get::sigaction()(sig, &a, std::ptr::null_mut()) } != 0 {
        return None;
    }
    CHOSEN.store(sig, Ordering::Release);
    Some(sig)
}
