//! Waiting for child processes: `wait`, `waitpid`, `wait3`, `wait4`,
//! `waitid`. Whether a child has ended yet is not the program's to decide
//! (a server polls for a background child with `WNOHANG`), so each call's
//! outcome is recorded: the result, the status and what `waitid` fills in
//! its `siginfo_t`.
//!
//! In replay the logged outcome is returned (resource usage reads as
//! zero). When it reports a child that ended, that child is reaped for
//! real, waiting for it as long as it takes, so that it does not stay a
//! zombie: the recorded pid where the replay has the recorded pids (a
//! restored checkpoint), otherwise a child of the set the program asked
//! about (replayed from its start, the program's children have other
//! pids). Otherwise children are left alone.

use libc::{c_int, id_t, idtype_t, pid_t, rusage, siginfo_t};
use rrc_rr::log::{Event, WaitCall, WaitChild};

use crate::hooks::{SavedErrno, logged, outcome, served};
use crate::real::get;
use crate::{record, replay};

/// The fields of a `siginfo_t` that `waitid` fills, where the kernel puts
/// them on x86-64 (the C library's `si_pid` and friends are macros over a
/// union).
#[repr(C)]
struct ChildInfo {
    signo: c_int,
    errno: c_int,
    code: c_int,
    _pad: c_int,
    pid: pid_t,
    uid: libc::uid_t,
    status: c_int,
}

const _: () = {
    assert!(size_of::<ChildInfo>() <= size_of::<siginfo_t>());
    assert!(std::mem::offset_of!(ChildInfo, pid) == 16);
    assert!(std::mem::offset_of!(ChildInfo, status) == 24);
};

/// Options of a reaping wait: the program's choice of which children
/// count, without returning early (`WNOHANG`), without reporting stops
/// and continues, and reaping (`WNOWAIT` off).
fn reap_options(options: c_int) -> c_int {
    options & (libc::__WALL | libc::__WCLONE | libc::__WNOTHREAD)
}

/// After a replayed wait that reported child `pid` ended: reaps it for
/// real (see the module's documentation); `any` reaps a child of the set
/// the program asked about.
fn reap(pid: pid_t, options: c_int, any: impl FnOnce()) {
    let _e = SavedErrno::save();
    let mut st = 0;
    // SAFETY: a blocking wait for one child into a local status word.
    let r = unsafe { get::wait4()(pid, &mut st, reap_options(options), std::ptr::null_mut()) };
    // ECHILD: no such child. In the recorded address space (a restored
    // checkpoint) the pids are the recorded ones: it was reaped already.
    if r < 0 && !replay::same_addresses() {
        any();
    }
}

/// Whether a status word says the child ended (exited or was killed), as
/// opposed to stopped or continued.
fn ended(status: c_int) -> bool {
    libc::WIFEXITED(status) || libc::WIFSIGNALED(status)
}

fn name(call: WaitCall) -> &'static str {
    match call {
        WaitCall::Wait => "wait",
        WaitCall::Waitpid => "waitpid",
        WaitCall::Wait3 => "wait3",
        WaitCall::Wait4 => "wait4",
        WaitCall::Waitid => "waitid",
    }
}

fn is_wait(call: WaitCall) -> impl Fn(&Event<'static>) -> bool {
    move |e| matches!(e, Event::Wait { call: c, .. } if *c == call)
}

/// `wait`, `waitpid`, `wait3` and `wait4`: `pid` is the set of children
/// asked about (-1 for `wait` and `wait3`), `real` the call made with a
/// status word to fill.
///
/// # Safety
/// `status` and `usage` are null or the program's, valid to write.
unsafe fn wait_status(
    call: WaitCall,
    pid: pid_t,
    options: c_int,
    status: *mut c_int,
    usage: *mut rusage,
    real: impl FnOnce(*mut c_int) -> pid_t,
) -> pid_t {
    if replay::active()
        // SAFETY: the caller's contract.
        && let Some(r) = unsafe { replay_status(call, pid, options, status, usage) }
    {
        return r;
    }
    record::flush_before_blocking();
    // The status is recorded even when the program does not ask for it:
    // a replay needs it to know whether the child ended.
    let mut local = 0;
    let target = if status.is_null() {
        &mut local as *mut c_int
    } else {
        status
    };
    let ret = real(target);
    let again = logged(|| Event::Wait {
        call,
        ret: outcome(i64::from(ret)),
        status: if ret > 0 {
            // SAFETY: the call filled the status word it was given.
            unsafe { *target }
        } else {
            0
        },
        child: WaitChild::default(),
    });
    if again {
        // A copy restored for replay: the call made is served from the log
        // instead (a child it reaped is not reaped again).
        // SAFETY: the caller's contract.
        return unsafe { replay_status(call, pid, options, status, usage) }.unwrap_or(ret);
    }
    ret
}

/// In replay: the logged outcome of a wait of the `wait_status` kind;
/// `None` when this thread is not replaying.
///
/// # Safety
/// As `wait_status`.
unsafe fn replay_status(
    call: WaitCall,
    pid: pid_t,
    options: c_int,
    status: *mut c_int,
    usage: *mut rusage,
) -> Option<pid_t> {
    let t = replay::take(name(call), is_wait(call))?;
    let (ret, st) = match t.record.event {
        Event::Wait { ret, status, .. } => (ret, status),
        _ => (-i64::from(libc::EIO), 0),
    };
    if ret > 0 {
        if !status.is_null() {
            // SAFETY: the caller's contract.
            unsafe { *status = st };
        }
        if !usage.is_null() {
            // SAFETY: the caller's contract; all zeroes is a valid
            // rusage.
            unsafe { std::ptr::write_bytes(usage, 0, 1) };
        }
        if ended(st) {
            reap(ret as pid_t, options, || {
                let mut s = 0;
                // SAFETY: a blocking wait for one of the children the
                // program asked about, into a local status word.
                unsafe { get::wait4()(pid, &mut s, reap_options(options), std::ptr::null_mut()) };
            });
        }
    }
    t.complete();
    Some(served(ret) as pid_t)
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn wait(status: *mut c_int) -> pid_t {
    // SAFETY: the program's argument; the real call gets it or a local.
    unsafe {
        wait_status(WaitCall::Wait, -1, 0, status, std::ptr::null_mut(), |st| {
            get::wait()(st)
        })
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn waitpid(pid: pid_t, status: *mut c_int, options: c_int) -> pid_t {
    // SAFETY: the program's arguments; the real call gets them, the status
    // word or a local.
    unsafe {
        wait_status(
            WaitCall::Waitpid,
            pid,
            options,
            status,
            std::ptr::null_mut(),
            |st| get::waitpid()(pid, st, options),
        )
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn wait3(status: *mut c_int, options: c_int, usage: *mut rusage) -> pid_t {
    // SAFETY: the program's arguments; the real call gets them, the status
    // word or a local.
    unsafe {
        wait_status(WaitCall::Wait3, -1, options, status, usage, |st| {
            get::wait3()(st, options, usage)
        })
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn wait4(
    pid: pid_t,
    status: *mut c_int,
    options: c_int,
    usage: *mut rusage,
) -> pid_t {
    // SAFETY: the program's arguments; the real call gets them, the status
    // word or a local.
    unsafe {
        wait_status(WaitCall::Wait4, pid, options, status, usage, |st| {
            get::wait4()(pid, st, options, usage)
        })
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn waitid(
    idtype: idtype_t,
    id: id_t,
    info: *mut siginfo_t,
    options: c_int,
) -> c_int {
    if replay::active()
        // SAFETY: the program's arguments.
        && let Some(r) = unsafe { replay_waitid(idtype, id, info, options) }
    {
        return r;
    }
    record::flush_before_blocking();
    // SAFETY: all zeroes is a valid siginfo_t.
    let mut local: siginfo_t = unsafe { std::mem::zeroed() };
    let target = if info.is_null() {
        &mut local as *mut siginfo_t
    } else {
        info
    };
    // SAFETY: the program's arguments, with its siginfo_t or a local one.
    let ret = unsafe { get::waitid()(idtype, id, target, options) };
    let again = logged(|| {
        let (status, child) = if ret == 0 {
            // SAFETY: the call filled the siginfo_t it was given.
            let i = unsafe { &*target.cast::<ChildInfo>() };
            (
                i.status,
                WaitChild {
                    pid: i.pid,
                    uid: i.uid,
                    code: i.code,
                },
            )
        } else {
            (0, WaitChild::default())
        };
        Event::Wait {
            call: WaitCall::Waitid,
            ret: outcome(i64::from(ret)),
            status,
            child,
        }
    });
    if again {
        // A copy restored for replay: the call made is served from the log
        // instead.
        // SAFETY: the program's arguments.
        return unsafe { replay_waitid(idtype, id, info, options) }.unwrap_or(ret);
    }
    ret
}

/// In replay: `waitid`'s logged outcome; `None` when this thread is not
/// replaying.
///
/// # Safety
/// `info` is null or the program's, valid to write.
unsafe fn replay_waitid(
    idtype: idtype_t,
    id: id_t,
    info: *mut siginfo_t,
    options: c_int,
) -> Option<c_int> {
    let t = replay::take("waitid", is_wait(WaitCall::Waitid))?;
    let (ret, status, child) = match t.record.event {
        Event::Wait {
            ret, status, child, ..
        } => (ret, status, child),
        _ => (-i64::from(libc::EIO), 0, WaitChild::default()),
    };
    if ret == 0 && !info.is_null() {
        // SAFETY: the program's siginfo_t, large enough for the fields
        // the kernel fills (checked above).
        unsafe {
            let i = &mut *info.cast::<ChildInfo>();
            i.signo = if child.pid != 0 { libc::SIGCHLD } else { 0 };
            i.errno = 0;
            i.code = child.code;
            i.pid = child.pid;
            i.uid = child.uid;
            i.status = status;
        }
    }
    let exited = matches!(
        child.code,
        libc::CLD_EXITED | libc::CLD_KILLED | libc::CLD_DUMPED
    );
    if ret == 0 && child.pid > 0 && exited && options & libc::WNOWAIT == 0 {
        reap(child.pid, options, || {
            // SAFETY: all zeroes is a valid siginfo_t.
            let mut local: siginfo_t = unsafe { std::mem::zeroed() };
            // SAFETY: a blocking wait for one of the children the
            // program asked about, into a local siginfo_t.
            unsafe {
                get::waitid()(
                    idtype,
                    id,
                    &mut local,
                    libc::WEXITED | reap_options(options),
                )
            };
        });
    }
    t.complete();
    Some(served(ret) as c_int)
}
