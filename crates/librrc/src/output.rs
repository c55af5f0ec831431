//! Output calls: `write`, `writev`, `send`, `sendto`, `sendmsg`, `sendfile`.
//!
//! Recorded when they return, by their result only: the bytes are the
//! program's own, which a replay reproduces, but how many of them the
//! kernel took (a short count, `EAGAIN` on a full socket) is not the
//! program's to decide. Before the call the thread's batch goes to the rrc
//! process: what is written may depend on it, and must not leave the
//! machine before it.
//!
//! In replay each call takes its turn from the log. To a virtual
//! descriptor (a replayed connection) nothing is sent: the first `ret`
//! bytes of what the program passed are captured (`sendfile`: read from
//! its input file at the offset it would have used, which then advances as
//! the kernel would have advanced it). To any other descriptor the call is
//! made for real, but for the bytes the recorded call wrote only (all of
//! them, unless it was short; none after an error): what the program
//! writes again after a short count or `EAGAIN` is then not written twice.
//! Either way the program gets the logged result.

use libc::{c_int, c_void, iovec, msghdr, off_t, size_t, sockaddr, socklen_t, ssize_t};
use rrc_rr::log::{Event, WriteCall};

use crate::hooks::{SavedErrno, logged, outcome, served};
use crate::net::{self, MAX_PARTS};
use crate::real::get;
use crate::{record, replay};

/// Bytes of a `sendfile` input read at a time to be captured.
const FILE_CHUNK: usize = 64 << 10;

/// An output call's arguments beyond the descriptor written to.
#[derive(Clone, Copy)]
enum Out {
    Write {
        buf: *const c_void,
        n: size_t,
    },
    Writev {
        iov: *const iovec,
        cnt: c_int,
    },
    Send {
        buf: *const c_void,
        n: size_t,
        flags: c_int,
    },
    SendTo {
        buf: *const c_void,
        n: size_t,
        flags: c_int,
        addr: *const sockaddr,
        len: socklen_t,
    },
    SendMsg {
        msg: *const msghdr,
        flags: c_int,
    },
    SendFile {
        in_fd: c_int,
        offset: *mut off_t,
        count: size_t,
    },
}

impl Out {
    fn call(&self) -> WriteCall {
        match self {
            Out::Write { .. } => WriteCall::Write,
            Out::Writev { .. } => WriteCall::Writev,
            Out::Send { .. } => WriteCall::Send,
            Out::SendTo { .. } => WriteCall::SendTo,
            Out::SendMsg { .. } => WriteCall::SendMsg,
            Out::SendFile { .. } => WriteCall::SendFile,
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Out::Write { .. } => "write",
            Out::Writev { .. } => "writev",
            Out::Send { .. } => "send",
            Out::SendTo { .. } => "sendto",
            Out::SendMsg { .. } => "sendmsg",
            Out::SendFile { .. } => "sendfile",
        }
    }

    /// The call as the program made it.
    ///
    /// # Safety
    /// The arguments are the program's, valid for the call.
    unsafe fn real(&self, fd: c_int) -> ssize_t {
        // SAFETY: the caller's contract; passed on unchanged.
        unsafe {
            match *self {
                Out::Write { buf, n } => get::write()(fd, buf, n),
                Out::Writev { iov, cnt } => get::writev()(fd, iov, cnt),
                Out::Send { buf, n, flags } => get::send()(fd, buf, n, flags),
                Out::SendTo {
                    buf,
                    n,
                    flags,
                    addr,
                    len,
                } => get::sendto()(fd, buf, n, flags, addr, len),
                Out::SendMsg { msg, flags } => get::sendmsg()(fd, msg, flags),
                Out::SendFile {
                    in_fd,
                    offset,
                    count,
                } => get::sendfile()(fd, in_fd, offset, count),
            }
        }
    }

    /// Calls `f` with the program's buffers, as iovecs (none for
    /// `sendfile`).
    ///
    /// # Safety
    /// As [`real`](Self::real).
    unsafe fn with_parts<R>(&self, f: impl FnOnce(&[iovec]) -> R) -> R {
        let one = |buf: *const c_void, n: size_t| iovec {
            iov_base: buf.cast_mut(),
            iov_len: if buf.is_null() { 0 } else { n },
        };
        let many = |iov: *const iovec, cnt: usize| -> &[iovec] {
            if iov.is_null() || cnt == 0 {
                &[]
            } else {
                // SAFETY: the caller's contract: the program's iovec
                // arrays hold as many entries as it says.
                unsafe { std::slice::from_raw_parts(iov, cnt) }
            }
        };
        match *self {
            Out::Write { buf, n } | Out::Send { buf, n, .. } | Out::SendTo { buf, n, .. } => {
                f(&[one(buf, n)])
            }
            Out::Writev { iov, cnt } => f(many(iov, cnt.max(0) as usize)),
            Out::SendMsg { msg, .. } if !msg.is_null() => {
                // SAFETY: the program's message header.
                let m = unsafe { &*msg };
                f(many(m.msg_iov, m.msg_iovlen))
            }
            Out::SendMsg { .. } | Out::SendFile { .. } => f(&[]),
        }
    }

    /// How many bytes the program asked to write.
    ///
    /// # Safety
    /// As [`real`](Self::real).
    unsafe fn len(&self) -> usize {
        match *self {
            Out::SendFile { count, .. } => count,
            // SAFETY: the caller's contract.
            _ => unsafe {
                self.with_parts(|parts| {
                    parts
                        .iter()
                        .fold(0usize, |a, p| a.saturating_add(p.iov_len))
                })
            },
        }
    }
}

/// Whether a logged event is the record of `call` on `fd`.
fn is_write(call: WriteCall, fd: c_int) -> impl Fn(&Event<'static>) -> bool {
    move |e| matches!(e, Event::Write { call: c, fd: f, .. } if *c == call && *f == fd)
}

/// The logged result of a Write record.
fn logged_ret(t: &replay::Turn) -> i64 {
    match t.record.event {
        Event::Write { ret, .. } => ret,
        _ => -i64::from(libc::EIO),
    }
}

/// Every output wrapper: the replay's way, or the call made and recorded.
///
/// # Safety
/// The program's arguments, valid for the call.
unsafe fn output(fd: c_int, out: Out) -> ssize_t {
    if replay::active() {
        let served = if net::is_virtual(fd) && !matches!(out, Out::SendFile { .. }) {
            // SAFETY: the caller's contract.
            let want = unsafe { out.len() };
            // SAFETY: the caller's contract.
            unsafe {
                out.with_parts(|parts| {
                    crate::takeover::write_in_takeover(fd, parts, want, || in_turn(fd, out))
                })
            }
        } else {
            // SAFETY: the caller's contract.
            unsafe { in_turn(fd, out) }
        };
        if let Some(r) = served {
            return r;
        }
        if net::is_virtual(fd) {
            // A thread off its log writing to a replayed connection: all
            // of it is kept.
            // SAFETY: the caller's contract.
            let n = unsafe { out.len() };
            let _e = SavedErrno::save();
            // SAFETY: the caller's contract.
            unsafe { keep(fd, out, n, 0, false) };
            return n as ssize_t;
        }
    }
    record::flush_before_blocking();
    // SAFETY: the caller's contract.
    let ret = unsafe { out.real(fd) };
    let again = logged(|| Event::Write {
        call: out.call(),
        fd,
        ret: outcome(ret as i64),
    });
    if again {
        // SAFETY: the caller's contract.
        return unsafe { after_real(fd, out, ret) };
    }
    ret
}

/// In replay: the call in its turn, with its logged result; `None` when
/// this thread is not replaying.
///
/// # Safety
/// As [`output`].
unsafe fn in_turn(fd: c_int, out: Out) -> Option<ssize_t> {
    let t = replay::take(out.name(), is_write(out.call(), fd))?;
    let ret = logged_ret(&t);
    if ret > 0 {
        let _e = SavedErrno::save();
        // SAFETY: the caller's contract.
        let want = (ret as usize).min(unsafe { out.len() });
        // SAFETY: the caller's contract.
        unsafe {
            if net::is_virtual(fd) {
                keep(fd, out, want, 0, false);
            } else {
                write_for_real(fd, out, want);
            }
        }
    }
    t.complete();
    Some(served(ret) as ssize_t)
}

/// A copy restored for replay learned it when recording a call it had
/// made: the call takes its turn, and what it wrote to a replayed
/// connection is captured.
///
/// Two moments of the checkpoint lead here. Between the call's return and
/// its record: the call was made before the checkpoint, the connection
/// holds (or its client acknowledged) its bytes already, and `real` is
/// what it returned then. Before the call (the thread was stopped on its
/// way in, flushing its records): the call was made just now, by this
/// copy, on a connection that takes nothing (restored in repair mode, or
/// not at all), so `real` is an error while the record says the primary
/// wrote; its bytes are the replay's output like any other call's.
///
/// # Safety
/// As [`output`].
unsafe fn after_real(fd: c_int, out: Out, real: ssize_t) -> ssize_t {
    let Some(t) = replay::take(out.name(), is_write(out.call(), fd)) else {
        return real;
    };
    let ret = logged_ret(&t);
    if ret > 0 && net::is_virtual(fd) {
        let _e = SavedErrno::save();
        // SAFETY: the caller's contract.
        let want = (ret as usize).min(unsafe { out.len() });
        let earlier = real >= 0;
        // SAFETY: the caller's contract; a sendfile's input has moved on
        // by what the real call sent (nothing if it was made just now).
        unsafe { keep(fd, out, want, real.max(0) as usize, earlier) };
    }
    t.complete();
    served(ret) as ssize_t
}

/// Captures the first `want` bytes of the call's data, written to virtual
/// descriptor `fd` (`earlier`: before the checkpoint, see
/// [`net::capture`]). For `sendfile`, whose input position has already
/// moved on by `moved` bytes, the input is read from where the call
/// started and left `want` bytes further on, as the kernel would leave it.
///
/// # Safety
/// As [`output`].
unsafe fn keep(fd: c_int, out: Out, want: usize, moved: usize, earlier: bool) {
    if let Out::SendFile { in_fd, offset, .. } = out {
        // SAFETY: the caller's contract: `offset` is null or the
        // program's.
        unsafe { keep_file(fd, in_fd, offset, want, moved, earlier) };
        return;
    }
    // SAFETY: the caller's contract.
    unsafe { out.with_parts(|parts| net::capture(fd, parts, want, earlier)) };
}

/// The `sendfile` part of [`keep`].
///
/// # Safety
/// `offset` is null or points to the program's offset.
unsafe fn keep_file(
    fd: c_int,
    in_fd: c_int,
    offset: *mut off_t,
    want: usize,
    moved: usize,
    earlier: bool,
) {
    // Raw system calls: the wrapped read functions would serve the reads
    // from the log.
    let now = if offset.is_null() {
        // SAFETY: lseek on the program's descriptor, not moving it.
        unsafe { libc::syscall(libc::SYS_lseek, in_fd, 0i64, libc::SEEK_CUR) }
    } else {
        // SAFETY: the caller's contract.
        unsafe { *offset }
    };
    if now < 0 {
        return;
    }
    let start = now - moved as i64;
    if let Some(buf) = crate::alloc::map_low(FILE_CHUNK) {
        let mut done = 0usize;
        while done < want {
            let k = (want - done).min(FILE_CHUNK);
            // SAFETY: a pread into librrc's own buffer of FILE_CHUNK bytes.
            let r = unsafe { libc::syscall(libc::SYS_pread64, in_fd, buf, k, start + done as i64) };
            if r <= 0 {
                break;
            }
            let part = [iovec {
                iov_base: buf.cast(),
                iov_len: r as usize,
            }];
            net::capture(fd, &part, r as usize, earlier);
            done += r as usize;
        }
        // SAFETY: unmapping the buffer mapped above, used by nothing else.
        unsafe { libc::syscall(libc::SYS_munmap, buf, FILE_CHUNK) };
    }
    let end = start + want as i64;
    if offset.is_null() {
        // SAFETY: lseek on the program's descriptor, to where the
        // recorded call left it.
        unsafe { libc::syscall(libc::SYS_lseek, in_fd, end, libc::SEEK_SET) };
    } else {
        // SAFETY: the caller's contract.
        unsafe { *offset = end };
    }
}

/// Makes the call for real for its first `want` bytes: the program's own
/// call when that is all of them, then (after a short count, or for a
/// prefix) the rest in calls of the same kind (`writev` for the write
/// calls, `sendmsg` for the send calls) over that prefix. Stops at an
/// error: the logged result is what the program gets anyway.
///
/// # Safety
/// As [`output`].
unsafe fn write_for_real(fd: c_int, out: Out, want: usize) {
    let mut done = 0usize;
    // SAFETY: the caller's contract.
    if want == unsafe { out.len() } {
        // SAFETY: the caller's contract.
        let r = unsafe { out.real(fd) };
        if r <= 0 {
            return;
        }
        done = r as usize;
    }
    if let Out::SendFile { in_fd, offset, .. } = out {
        while done < want {
            // SAFETY: the program's descriptors and offset.
            let r = unsafe { get::sendfile()(fd, in_fd, offset, want - done) };
            if r <= 0 {
                return;
            }
            done += r as usize;
        }
        return;
    }
    // SAFETY: the caller's contract.
    unsafe {
        out.with_parts(|parts| {
            while done < want {
                let mut iov = [iovec {
                    iov_base: std::ptr::null_mut(),
                    iov_len: 0,
                }; MAX_PARTS];
                let (n, _) = net::slice(parts, done, want, &mut iov);
                if n == 0 {
                    return;
                }
                let r = prefix_call(fd, out, &iov[..n], done == 0);
                if r <= 0 {
                    return;
                }
                done += r as usize;
            }
        })
    };
}

/// One call for real over `iov` (part of the program's data): `writev`
/// for the write calls, `sendmsg` with the program's flags and address
/// for the send calls (its ancillary data with the first bytes only).
///
/// # Safety
/// As [`output`]; `iov` describes the program's buffers.
unsafe fn prefix_call(fd: c_int, out: Out, iov: &[iovec], first: bool) -> ssize_t {
    // SAFETY: all zeroes is an empty message header.
    let mut m: msghdr = unsafe { std::mem::zeroed() };
    m.msg_iov = iov.as_ptr().cast_mut();
    m.msg_iovlen = iov.len();
    let flags = match out {
        Out::Write { .. } | Out::Writev { .. } | Out::SendFile { .. } => {
            // SAFETY: local iovecs over the program's buffers.
            return unsafe { get::writev()(fd, iov.as_ptr(), iov.len() as c_int) };
        }
        Out::Send { flags, .. } => flags,
        Out::SendTo {
            flags, addr, len, ..
        } => {
            m.msg_name = addr.cast_mut().cast();
            m.msg_namelen = len;
            flags
        }
        Out::SendMsg { msg, flags } => {
            // SAFETY: the program's message header (non-null: it has
            // data).
            let p = unsafe { &*msg };
            m.msg_name = p.msg_name;
            m.msg_namelen = p.msg_namelen;
            if first {
                m.msg_control = p.msg_control;
                m.msg_controllen = p.msg_controllen;
            }
            flags
        }
    };
    // SAFETY: a message header over the program's buffers and address.
    unsafe { get::sendmsg()(fd, &m, flags) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn write(fd: c_int, buf: *const c_void, n: size_t) -> ssize_t {
    // SAFETY: the program's arguments.
    unsafe { output(fd, Out::Write { buf, n }) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn writev(fd: c_int, iov: *const iovec, cnt: c_int) -> ssize_t {
    // SAFETY: the program's arguments.
    unsafe { output(fd, Out::Writev { iov, cnt }) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn send(fd: c_int, buf: *const c_void, n: size_t, flags: c_int) -> ssize_t {
    // SAFETY: the program's arguments.
    unsafe { output(fd, Out::Send { buf, n, flags }) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn sendto(
    fd: c_int,
    buf: *const c_void,
    n: size_t,
    flags: c_int,
    addr: *const sockaddr,
    len: socklen_t,
) -> ssize_t {
    // SAFETY: the program's arguments.
    unsafe {
        output(
            fd,
            Out::SendTo {
                buf,
                n,
                flags,
                addr,
                len,
            },
        )
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn sendmsg(fd: c_int, msg: *const msghdr, flags: c_int) -> ssize_t {
    // SAFETY: the program's arguments.
    unsafe { output(fd, Out::SendMsg { msg, flags }) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn sendfile(
    out_fd: c_int,
    in_fd: c_int,
    offset: *mut off_t,
    count: size_t,
) -> ssize_t {
    // SAFETY: the program's arguments.
    unsafe {
        output(
            out_fd,
            Out::SendFile {
                in_fd,
                offset,
                count,
            },
        )
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn sendfile64(
    out_fd: c_int,
    in_fd: c_int,
    offset: *mut libc::off64_t,
    count: size_t,
) -> ssize_t {
    // SAFETY: on x86-64 off_t and off64_t are the same type.
    unsafe { sendfile(out_fd, in_fd, offset, count) }
}
