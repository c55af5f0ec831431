//! librrc: preloaded (`LD_PRELOAD`) into a program that `rrc run --record`
//! starts, it wraps the C library functions whose outcome the program
//! cannot predict (input, time, randomness, thread creation, how much of
//! its output the kernel took, whether a child has ended) and records
//! each outcome in its thread's log: a ring in memory shared with the rrc
//! process, which drains it to the log directory.
//!
//! Everything here runs inside the program's own calls, on its threads,
//! possibly in signal handlers: no allocation, no locks, no stdio, no
//! panics that could unwind into C. A call made while this thread is
//! already inside librrc (the C library calling itself, a signal handler
//! interrupting a wrapper) goes straight to the C library unrecorded.
//!
//! Without `RRC_RR_FD` in the environment the wrappers only pass calls on.

mod alloc;
mod hooks;
mod net;
mod output;
mod real;
mod record;
mod replay;
mod serve;
mod signals;
mod sync;
mod takeover;
mod thread;
mod threads;
mod wait;

#[global_allocator]
static ALLOCATOR: alloc::Pages = alloc::Pages;

/// Runs when the library is loaded, before `main` and before the program
/// can start threads: resolves the wrapped functions and attaches to the
/// rings.
extern "C" fn init() {
    real::resolve_all();
    // A replay's configuration arrives where a recording's rings would.
    record::init();
}

#[used]
#[unsafe(link_section = ".init_array")]
static INIT: extern "C" fn() = init;

/// Writes `parts` to standard error in one raw system call (no stdio, no
/// allocation: callable from any wrapper).
pub(crate) fn say(parts: &[&[u8]]) {
    let mut buf = [0u8; 512];
    let mut n = 0;
    for p in parts {
        let k = p.len().min(buf.len() - n);
        buf[n..n + k].copy_from_slice(&p[..k]);
        n += k;
    }
    // SAFETY: writing a local buffer to fd 2.
    unsafe { libc::syscall(libc::SYS_write, 2, buf.as_ptr(), n) };
}

/// Writes `msg` to standard error and exits with status 127: for
/// conditions under which the program must not go on unrecorded.
pub(crate) fn fatal(msg: &[u8]) -> ! {
    say(&[msg]);
    // SAFETY: exiting touches no memory of the program's.
    unsafe { libc::syscall(libc::SYS_exit_group, 127) };
    unreachable!("exit_group returned")
}
