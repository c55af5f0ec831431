//! The wrappers: each calls the C library's function, then records what it
//! returned. They keep the C library's `-1`/`errno` convention towards the
//! program; the log holds `-errno`.

use std::io::IoSlice;

use libc::{
    c_int, c_uint, c_void, clockid_t, epoll_event, iovec, msghdr, nfds_t, pollfd, size_t, sockaddr,
    socklen_t, ssize_t, time_t, timespec, timeval,
};
use rrc_rr::log::{
    AcceptCall, Bytes, EpollCall, EpollReady, Event, List, MmapCall, PollCall, ReadCall, RecvCall,
    RecvMsg, SelectCall,
};

use crate::net;
use crate::real::get;
use crate::record;
use crate::replay;
use crate::serve;
use crate::thread;

/// The call's result as the log holds it: `-errno` on failure.
pub(crate) fn outcome(ret: i64) -> i64 {
    if ret < 0 {
        // SAFETY: __errno_location returns this thread's errno slot.
        -i64::from(unsafe { *libc::__errno_location() })
    } else {
        ret
    }
}

/// A logged result given back the C library's way: -1 and errno for
/// `-errno`.
pub(crate) fn served(ret: i64) -> i64 {
    if ret < 0 {
        // SAFETY: __errno_location returns this thread's errno slot.
        unsafe { *libc::__errno_location() = (-ret) as c_int };
        -1
    } else {
        ret
    }
}

/// Keeps errno as the wrapped call left it across the recording.
pub(crate) struct SavedErrno(c_int);

impl SavedErrno {
    pub(crate) fn save() -> SavedErrno {
        // SAFETY: as in `outcome`.
        SavedErrno(unsafe { *libc::__errno_location() })
    }
}

impl Drop for SavedErrno {
    fn drop(&mut self) {
        // SAFETY: as in `outcome`.
        unsafe { *libc::__errno_location() = self.0 };
    }
}

/// Records the event `make` builds from what a call returned: inside
/// librrc (nothing is recorded for a call librrc itself made) and with
/// errno kept as the call left it. True if the call must be made again
/// (see [`record::emit`]).
pub(crate) fn logged<'a>(make: impl FnOnce() -> Event<'a>) -> bool {
    let Some(_inside) = thread::enter() else {
        return false;
    };
    let _e = SavedErrno::save();
    let event = make();
    let again = record::emit(&event);
    if again {
        match &event {
            Event::Read { fd, ret, .. } | Event::Recv { fd, ret, .. } => {
                crate::net::read_earlier(*fd, *ret)
            }
            _ => {}
        }
    }
    again
}

/// `len` bytes at `p`, or nothing.
///
/// # Safety
/// `p` must be valid for reads of `len` bytes when `len > 0`.
unsafe fn bytes<'a>(p: *const c_void, len: i64) -> &'a [u8] {
    if p.is_null() || len <= 0 {
        return &[];
    }
    // SAFETY: the caller's contract.
    unsafe { std::slice::from_raw_parts(p.cast::<u8>(), len as usize) }
}

/// The address a call filled in, `len` bytes at most of the room given.
///
/// # Safety
/// `addr` and `len`, when non-null, are what the program passed to a call
/// that filled them.
unsafe fn address<'a>(addr: *const sockaddr, len: *const socklen_t, room: socklen_t) -> &'a [u8] {
    if addr.is_null() || len.is_null() {
        return &[];
    }
    // SAFETY: the caller's contract; the kernel reports the full length,
    // of which only `room` bytes were written.
    unsafe {
        let n = (*len).min(room) as i64;
        bytes(addr.cast(), n)
    }
}

/// Records a read-family call that filled one buffer; true if the call
/// must be made again (see [`record::emit`]).
fn record_flat_read(call: ReadCall, fd: c_int, ret: ssize_t, buf: *const c_void) -> bool {
    record_flat_read_len(call, fd, ret, buf, ret.max(0) as usize)
}

/// As [`record_flat_read`], for a call whose result is not its length in
/// bytes (`fread` counts items): `len` bytes at `buf` were filled.
fn record_flat_read_len(
    call: ReadCall,
    fd: c_int,
    ret: ssize_t,
    buf: *const c_void,
    len: usize,
) -> bool {
    logged(|| {
        let r = outcome(ret as i64);
        Event::Read {
            call,
            fd,
            ret: r,
            // SAFETY: the call wrote `len` bytes at `buf` (none on failure).
            data: Bytes::Flat(unsafe { bytes(buf, if r < 0 { 0 } else { len as i64 }) }),
        }
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn read(fd: c_int, buf: *mut c_void, n: size_t) -> ssize_t {
    if replay::active()
        && let Some(r) = serve::read(
            "read",
            buf,
            n,
            |e| matches!(e, Event::Read { call: ReadCall::Read, fd: f, .. } if *f == fd),
        )
    {
        return r;
    }
    if let Some(r) = crate::net::no_more_input(fd, false) {
        return r;
    }
    // SAFETY: the program's arguments, passed on unchanged.
    let ret = unsafe { get::read()(fd, buf, n) };
    if record_flat_read(ReadCall::Read, fd, ret, buf) {
        // SAFETY: as the program called it, to be served from the log.
        return unsafe { read(fd, buf, n) };
    }
    ret
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn readv(fd: c_int, iov: *const iovec, cnt: c_int) -> ssize_t {
    if replay::active()
        && let Some(r) = serve::readv(fd, iov, cnt)
    {
        return r;
    }
    if let Some(r) = crate::net::no_more_input(fd, false) {
        return r;
    }
    // SAFETY: the program's arguments, passed on unchanged.
    let ret = unsafe { get::readv()(fd, iov, cnt) };
    let again = logged(|| {
        let r = outcome(ret as i64);
        let parts: &[IoSlice<'_>] = if iov.is_null() || cnt <= 0 {
            &[]
        } else {
            // SAFETY: IoSlice is ABI-compatible with struct iovec, and the
            // program passed `cnt` of them.
            unsafe { std::slice::from_raw_parts(iov.cast(), cnt as usize) }
        };
        Event::Read {
            call: ReadCall::Readv,
            fd,
            ret: r,
            data: Bytes::Scattered {
                parts,
                len: r.max(0) as usize,
            },
        }
    });
    if again {
        // SAFETY: as the program called it, to be served from the log.
        return unsafe { readv(fd, iov, cnt) };
    }
    ret
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn pread64(
    fd: c_int,
    buf: *mut c_void,
    n: size_t,
    off: libc::off64_t,
) -> ssize_t {
    if replay::active()
        && let Some(r) = serve::read(
            "pread",
            buf,
            n,
            |e| matches!(e, Event::Read { call: ReadCall::Pread, fd: f, .. } if *f == fd),
        )
    {
        return r;
    }
    // SAFETY: the program's arguments, passed on unchanged.
    let ret = unsafe { get::pread64()(fd, buf, n, off) };
    if record_flat_read(ReadCall::Pread, fd, ret, buf) {
        // SAFETY: as the program called it, to be served from the log.
        return unsafe { pread64(fd, buf, n, off) };
    }
    ret
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn pread(
    fd: c_int,
    buf: *mut c_void,
    n: size_t,
    off: libc::off_t,
) -> ssize_t {
    // SAFETY: on x86-64 off_t and off64_t are the same type.
    unsafe { pread64(fd, buf, n, off) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn recv(fd: c_int, buf: *mut c_void, n: size_t, flags: c_int) -> ssize_t {
    if replay::active()
        && let Some(r) = serve::read(
            "recv",
            buf,
            n,
            |e| matches!(e, Event::Recv { call: RecvCall::Recv, fd: f, .. } if *f == fd),
        )
    {
        return r;
    }
    if let Some(r) = crate::net::no_more_input(fd, flags & libc::MSG_DONTWAIT != 0) {
        return r;
    }
    // SAFETY: the program's arguments, passed on unchanged.
    let ret = unsafe { get::recv()(fd, buf, n, flags) };
    let again = logged(|| {
        let r = outcome(ret as i64);
        Event::Recv {
            call: RecvCall::Recv,
            fd,
            ret: r,
            // SAFETY: the call wrote `ret` bytes at `buf`.
            data: Bytes::Flat(unsafe { bytes(buf, r.min(n as i64)) }),
            addr: &[],
            flags: 0,
            control: &[],
        }
    });
    if again {
        // SAFETY: as the program called it, to be served from the log.
        return unsafe { recv(fd, buf, n, flags) };
    }
    ret
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn recvfrom(
    fd: c_int,
    buf: *mut c_void,
    n: size_t,
    flags: c_int,
    addr: *mut sockaddr,
    addrlen: *mut socklen_t,
) -> ssize_t {
    if replay::active()
        && let Some(r) = serve::recvfrom(fd, buf, n, addr, addrlen)
    {
        return r;
    }
    if let Some(r) = crate::net::no_more_input(fd, flags & libc::MSG_DONTWAIT != 0) {
        return r;
    }
    let room = if addrlen.is_null() {
        0
    } else {
        // SAFETY: the program passed a valid length to fill.
        unsafe { *addrlen }
    };
    // SAFETY: the program's arguments, passed on unchanged.
    let ret = unsafe { get::recvfrom()(fd, buf, n, flags, addr, addrlen) };
    let again = logged(|| {
        let r = outcome(ret as i64);
        Event::Recv {
            call: RecvCall::RecvFrom,
            fd,
            ret: r,
            // SAFETY: the call wrote `ret` bytes (at most `n`) at `buf`.
            data: Bytes::Flat(unsafe { bytes(buf, r.min(n as i64)) }),
            addr: if r >= 0 {
                // SAFETY: the call filled the address it was given.
                unsafe { address(addr, addrlen, room) }
            } else {
                &[]
            },
            flags: 0,
            control: &[],
        }
    });
    if again {
        // SAFETY: as the program called it, to be served from the log.
        return unsafe { recvfrom(fd, buf, n, flags, addr, addrlen) };
    }
    ret
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn recvmsg(fd: c_int, msg: *mut msghdr, flags: c_int) -> ssize_t {
    if replay::active()
        && let Some(r) = serve::recvmsg(fd, msg)
    {
        return r;
    }
    if let Some(r) = crate::net::no_more_input(fd, flags & libc::MSG_DONTWAIT != 0) {
        return r;
    }
    let (name_room, control_room) = if msg.is_null() {
        (0, 0)
    } else {
        // SAFETY: the program passed a valid msghdr.
        unsafe { ((*msg).msg_namelen, (*msg).msg_controllen) }
    };
    // SAFETY: the program's arguments, passed on unchanged.
    let ret = unsafe { get::recvmsg()(fd, msg, flags) };
    let again = !msg.is_null()
        && logged(|| {
            let r = outcome(ret as i64);
            // SAFETY: the call filled the msghdr the program gave; the iovecs
            // are the program's (IoSlice has struct iovec's layout).
            let (parts, addr, control, mflags) = unsafe {
                let m = &*msg;
                let parts: &[IoSlice<'_>] = if m.msg_iov.is_null() || m.msg_iovlen == 0 {
                    &[]
                } else {
                    std::slice::from_raw_parts(m.msg_iov.cast(), m.msg_iovlen)
                };
                let ok = r >= 0;
                let addr = if ok {
                    bytes(m.msg_name, i64::from(m.msg_namelen.min(name_room)))
                } else {
                    &[]
                };
                let control = if ok {
                    bytes(m.msg_control, m.msg_controllen.min(control_room) as i64)
                } else {
                    &[]
                };
                (parts, addr, control, m.msg_flags)
            };
            Event::Recv {
                call: RecvCall::RecvMsg,
                fd,
                ret: r,
                data: Bytes::Scattered {
                    parts,
                    len: r.max(0) as usize,
                },
                addr,
                flags: mflags,
                control,
            }
        });
    if again {
        // SAFETY: as the program called it, to be served from the log.
        return unsafe { recvmsg(fd, msg, flags) };
    }
    ret
}

/// Records an accept (the peer address it filled in, `room` bytes at
/// most); true if it must be made again (see [`record::emit`]): the
/// connection it got is closed then.
fn record_accept(
    call: AcceptCall,
    fd: c_int,
    ret: c_int,
    addr: *const sockaddr,
    len: *const socklen_t,
    room: socklen_t,
) -> bool {
    let again = logged(|| Event::Accept {
        call,
        fd,
        ret: outcome(i64::from(ret)),
        addr: if ret >= 0 {
            // SAFETY: the call filled the address it was given.
            unsafe { address(addr, len, room) }
        } else {
            &[]
        },
    });
    if again && ret >= 0 {
        // SAFETY: the descriptor the real call just made, not yet seen by
        // the program.
        unsafe { get::close()(ret) };
    }
    again
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn accept(fd: c_int, addr: *mut sockaddr, len: *mut socklen_t) -> c_int {
    if replay::active()
        && let Some(r) = serve::accept(AcceptCall::Accept, fd, addr, len, 0)
    {
        return r;
    }
    let room = if len.is_null() {
        0
    } else {
        // SAFETY: the program passed a valid length to fill.
        unsafe { *len }
    };
    // SAFETY: the program's arguments, passed on unchanged.
    let ret = unsafe { get::accept()(fd, addr, len) };
    let again = record_accept(AcceptCall::Accept, fd, ret, addr, len, room);
    if again {
        // SAFETY: as the program called it, to be served from the log.
        return unsafe { accept(fd, addr, len) };
    }
    ret
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn accept4(
    fd: c_int,
    addr: *mut sockaddr,
    len: *mut socklen_t,
    flags: c_int,
) -> c_int {
    if replay::active()
        && let Some(r) = serve::accept(AcceptCall::Accept4, fd, addr, len, flags)
    {
        return r;
    }
    let room = if len.is_null() {
        0
    } else {
        // SAFETY: the program passed a valid length to fill.
        unsafe { *len }
    };
    // SAFETY: the program's arguments, passed on unchanged.
    let ret = unsafe { get::accept4()(fd, addr, len, flags) };
    let again = record_accept(AcceptCall::Accept4, fd, ret, addr, len, room);
    if again {
        // SAFETY: as the program called it, to be served from the log.
        return unsafe { accept4(fd, addr, len, flags) };
    }
    ret
}

/// Records an epoll wait's ready list (in records of at most 64); true if
/// the call must be made again (see [`record::emit`]).
fn record_epoll(call: EpollCall, epfd: c_int, ret: c_int, events: *const epoll_event) -> bool {
    let Some(_inside) = thread::enter() else {
        return false;
    };
    let _e = SavedErrno::save();
    let r = outcome(i64::from(ret));
    let ready: &[epoll_event] = if r > 0 && !events.is_null() {
        // SAFETY: the call filled `ret` entries of the program's array.
        unsafe { std::slice::from_raw_parts(events, r as usize) }
    } else {
        &[]
    };
    // epoll_event is packed on x86-64; copy into a bounded stack array.
    let mut copied = [EpollReady { events: 0, data: 0 }; 64];
    let mut start = 0;
    loop {
        let end = ready.len().min(start + copied.len());
        for (i, e) in ready[start..end].iter().enumerate() {
            copied[i] = EpollReady {
                events: e.events,
                data: e.u64,
            };
        }
        if record::emit(&Event::EpollWait {
            call,
            epfd,
            ret: r,
            ready: List::new(&copied[..end - start]),
        }) {
            return true;
        }
        start = end;
        if start >= ready.len() {
            return false;
        }
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn epoll_wait(
    epfd: c_int,
    events: *mut epoll_event,
    max: c_int,
    timeout: c_int,
) -> c_int {
    if replay::active()
        && let Some(r) = serve::epoll(EpollCall::Wait, epfd, events, max)
    {
        return r;
    }
    record::flush_before_blocking();
    // SAFETY: the program's arguments, passed on unchanged.
    let ret = unsafe { get::epoll_wait()(epfd, events, max, timeout) };
    if record_epoll(EpollCall::Wait, epfd, ret, events) {
        // SAFETY: as the program called it, to be served from the log.
        return unsafe { epoll_wait(epfd, events, max, timeout) };
    }
    ret
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn epoll_pwait(
    epfd: c_int,
    events: *mut epoll_event,
    max: c_int,
    timeout: c_int,
    sigmask: *const libc::sigset_t,
) -> c_int {
    if replay::active()
        && let Some(r) = serve::epoll(EpollCall::Pwait, epfd, events, max)
    {
        return r;
    }
    record::flush_before_blocking();
    // SAFETY: the program's arguments, passed on unchanged.
    let ret = unsafe { get::epoll_pwait()(epfd, events, max, timeout, sigmask) };
    if record_epoll(EpollCall::Pwait, epfd, ret, events) {
        // SAFETY: as the program called it, to be served from the log.
        return unsafe { epoll_pwait(epfd, events, max, timeout, sigmask) };
    }
    ret
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn epoll_pwait2(
    epfd: c_int,
    events: *mut epoll_event,
    max: c_int,
    timeout: *const timespec,
    sigmask: *const libc::sigset_t,
) -> c_int {
    if replay::active()
        && let Some(r) = serve::epoll(EpollCall::Pwait2, epfd, events, max)
    {
        return r;
    }
    record::flush_before_blocking();
    // SAFETY: the program's arguments, passed on unchanged.
    let ret = unsafe { get::epoll_pwait2()(epfd, events, max, timeout, sigmask) };
    if record_epoll(EpollCall::Pwait2, epfd, ret, events) {
        // SAFETY: as the program called it, to be served from the log.
        return unsafe { epoll_pwait2(epfd, events, max, timeout, sigmask) };
    }
    ret
}

/// Records a poll's `revents` (in records of at most 256); true if the
/// call must be made again.
fn record_poll(call: PollCall, fds: *const pollfd, n: nfds_t, ret: c_int) -> bool {
    let Some(_inside) = thread::enter() else {
        return false;
    };
    let _e = SavedErrno::save();
    let all: &[pollfd] = if fds.is_null() {
        &[]
    } else {
        // SAFETY: the program's array of `n` entries, filled by the call.
        unsafe { std::slice::from_raw_parts(fds, n as usize) }
    };
    let mut revents = [0u16; 256];
    let mut start = 0;
    loop {
        let end = all.len().min(start + revents.len());
        for (i, p) in all[start..end].iter().enumerate() {
            revents[i] = p.revents as u16;
        }
        if record::emit(&Event::Poll {
            call,
            ret: outcome(i64::from(ret)),
            revents: List::new(&revents[..end - start]),
        }) {
            return true;
        }
        start = end;
        if start >= all.len() {
            return false;
        }
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn poll(fds: *mut pollfd, n: nfds_t, timeout: c_int) -> c_int {
    if replay::active()
        && let Some(r) = serve::poll(PollCall::Poll, fds, n as usize)
    {
        return r;
    }
    record::flush_before_blocking();
    // SAFETY: the program's arguments, passed on unchanged.
    let ret = unsafe { get::poll()(fds, n, timeout) };
    if record_poll(PollCall::Poll, fds, n, ret) {
        // SAFETY: as the program called it, to be served from the log.
        return unsafe { poll(fds, n, timeout) };
    }
    ret
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn ppoll(
    fds: *mut pollfd,
    n: nfds_t,
    timeout: *const timespec,
    sigmask: *const libc::sigset_t,
) -> c_int {
    if replay::active()
        && let Some(r) = serve::poll(PollCall::Ppoll, fds, n as usize)
    {
        return r;
    }
    record::flush_before_blocking();
    // SAFETY: the program's arguments, passed on unchanged.
    let ret = unsafe { get::ppoll()(fds, n, timeout, sigmask) };
    if record_poll(PollCall::Ppoll, fds, n, ret) {
        // SAFETY: as the program called it, to be served from the log.
        return unsafe { ppoll(fds, n, timeout, sigmask) };
    }
    ret
}

/// The part of an fd set that `nfds` covers, as bytes.
fn fd_set_bytes<'a>(set: *const libc::fd_set, nfds: c_int) -> &'a [u8] {
    if set.is_null() || nfds <= 0 {
        return &[];
    }
    let len = (nfds as usize).div_ceil(8).min(size_of::<libc::fd_set>());
    // SAFETY: the program's fd_set, which the call filled.
    unsafe { std::slice::from_raw_parts(set.cast::<u8>(), len) }
}

fn record_select(
    call: SelectCall,
    nfds: c_int,
    r: *const libc::fd_set,
    w: *const libc::fd_set,
    e: *const libc::fd_set,
    ret: c_int,
) -> bool {
    logged(|| Event::Select {
        call,
        ret: outcome(i64::from(ret)),
        readfds: fd_set_bytes(r, nfds),
        writefds: fd_set_bytes(w, nfds),
        exceptfds: fd_set_bytes(e, nfds),
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn select(
    nfds: c_int,
    r: *mut libc::fd_set,
    w: *mut libc::fd_set,
    e: *mut libc::fd_set,
    timeout: *mut timeval,
) -> c_int {
    if replay::active()
        && let Some(r) = serve::select(SelectCall::Select, r, w, e)
    {
        return r;
    }
    record::flush_before_blocking();
    // SAFETY: the program's arguments, passed on unchanged.
    let ret = unsafe { get::select()(nfds, r, w, e, timeout) };
    if record_select(SelectCall::Select, nfds, r, w, e, ret) {
        // SAFETY: as the program called it, to be served from the log.
        return unsafe { select(nfds, r, w, e, timeout) };
    }
    ret
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn pselect(
    nfds: c_int,
    r: *mut libc::fd_set,
    w: *mut libc::fd_set,
    e: *mut libc::fd_set,
    timeout: *const timespec,
    sigmask: *const libc::sigset_t,
) -> c_int {
    if replay::active()
        && let Some(r) = serve::select(SelectCall::Pselect, r, w, e)
    {
        return r;
    }
    record::flush_before_blocking();
    // SAFETY: the program's arguments, passed on unchanged.
    let ret = unsafe { get::pselect()(nfds, r, w, e, timeout, sigmask) };
    if record_select(SelectCall::Pselect, nfds, r, w, e, ret) {
        // SAFETY: as the program called it, to be served from the log.
        return unsafe { pselect(nfds, r, w, e, timeout, sigmask) };
    }
    ret
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn recvmmsg(
    fd: c_int,
    msgs: *mut libc::mmsghdr,
    n: c_uint,
    flags: c_int,
    timeout: *mut timespec,
) -> c_int {
    if replay::active()
        && let Some(r) = serve::recvmmsg(fd, msgs, n as usize)
    {
        return r;
    }
    if let Some(r) = crate::net::no_more_input(fd, flags & libc::MSG_DONTWAIT != 0) {
        return r as c_int;
    }
    record::flush_before_blocking();
    // SAFETY: the program's arguments, passed on unchanged.
    let ret = unsafe { get::recvmmsg()(fd, msgs, n, flags, timeout) };
    let again = if let Some(_inside) = thread::enter() {
        let _e = SavedErrno::save();
        let got: &[libc::mmsghdr] = if ret > 0 && !msgs.is_null() {
            // SAFETY: the call filled `ret` entries of the program's array.
            unsafe { std::slice::from_raw_parts(msgs, ret as usize) }
        } else {
            &[]
        };
        // Bounded on the stack: a larger batch is recorded in parts.
        let mut one = [RecvMsg {
            data: Bytes::Flat(&[]),
            addr: &[],
            flags: 0,
            control: &[],
        }; 32];
        let mut start = 0;
        loop {
            let end = got.len().min(start + one.len());
            for (i, m) in got[start..end].iter().enumerate() {
                let h = &m.msg_hdr;
                // SAFETY: the call filled each header and its buffers; the
                // iovecs are the program's (IoSlice has their layout).
                one[i] = unsafe {
                    RecvMsg {
                        data: Bytes::Scattered {
                            parts: if h.msg_iov.is_null() {
                                &[]
                            } else {
                                std::slice::from_raw_parts(h.msg_iov.cast(), h.msg_iovlen)
                            },
                            len: m.msg_len as usize,
                        },
                        addr: bytes(h.msg_name, i64::from(h.msg_namelen)),
                        flags: h.msg_flags,
                        control: bytes(h.msg_control, h.msg_controllen as i64),
                    }
                };
            }
            if record::emit(&Event::RecvMmsg {
                fd,
                ret: outcome(i64::from(ret)),
                msgs: List::new(&one[..end - start]),
            }) {
                break true;
            }
            start = end;
            if start >= got.len() {
                break false;
            }
        }
    } else {
        false
    };
    if again {
        // SAFETY: as the program called it, to be served from the log.
        return unsafe { recvmmsg(fd, msgs, n, flags, timeout) };
    }
    ret
}

// The fortified variants (_FORTIFY_SOURCE) check the buffer size, then do
// what the plain call does.

#[unsafe(no_mangle)]
pub unsafe extern "C" fn __read_chk(
    fd: c_int,
    buf: *mut c_void,
    n: size_t,
    size: size_t,
) -> ssize_t {
    if n > size {
        fatal_overflow();
    }
    // SAFETY: as `read`.
    unsafe { read(fd, buf, n) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn __pread64_chk(
    fd: c_int,
    buf: *mut c_void,
    n: size_t,
    off: libc::off64_t,
    size: size_t,
) -> ssize_t {
    if n > size {
        fatal_overflow();
    }
    // SAFETY: as `pread64`.
    unsafe { pread64(fd, buf, n, off) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn __recv_chk(
    fd: c_int,
    buf: *mut c_void,
    n: size_t,
    size: size_t,
    flags: c_int,
) -> ssize_t {
    if n > size {
        fatal_overflow();
    }
    // SAFETY: as `recv`.
    unsafe { recv(fd, buf, n, flags) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn __recvfrom_chk(
    fd: c_int,
    buf: *mut c_void,
    n: size_t,
    size: size_t,
    flags: c_int,
    addr: *mut sockaddr,
    len: *mut socklen_t,
) -> ssize_t {
    if n > size {
        fatal_overflow();
    }
    // SAFETY: as `recvfrom`.
    unsafe { recvfrom(fd, buf, n, flags, addr, len) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn __poll_chk(
    fds: *mut pollfd,
    n: nfds_t,
    timeout: c_int,
    size: size_t,
) -> c_int {
    if (n as usize).saturating_mul(size_of::<pollfd>()) > size {
        fatal_overflow();
    }
    // SAFETY: as `poll`.
    unsafe { poll(fds, n, timeout) }
}

/// What glibc's checks do on overflow: stop the program.
fn fatal_overflow() -> ! {
    crate::fatal(b"*** buffer overflow detected ***: terminated\n")
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn clock_gettime(clock: clockid_t, tp: *mut timespec) -> c_int {
    if replay::active()
        && let Some(t) = replay::take(
            "clock_gettime",
            |e| matches!(e, Event::ClockGettime { clock: c, .. } if *c == clock),
        )
    {
        let Event::ClockGettime { ret, sec, nsec, .. } = t.record.event else {
            unreachable!("checked by take")
        };
        if ret == 0 && !tp.is_null() {
            // SAFETY: the program's timespec.
            unsafe {
                (*tp).tv_sec = sec;
                (*tp).tv_nsec = i64::from(nsec);
            }
        }
        t.complete();
        return served(i64::from(ret)) as c_int;
    }
    // SAFETY: the program's arguments, passed on unchanged.
    let ret = unsafe { get::clock_gettime()(clock, tp) };
    let again = logged(|| {
        let (sec, nsec) = if ret == 0 && !tp.is_null() {
            // SAFETY: the call filled `tp`.
            unsafe { ((*tp).tv_sec, (*tp).tv_nsec as u32) }
        } else {
            (0, 0)
        };
        Event::ClockGettime {
            clock,
            ret: outcome(i64::from(ret)) as i32,
            sec,
            nsec,
        }
    });
    if again {
        // SAFETY: as the program called it, to be served from the log.
        return unsafe { clock_gettime(clock, tp) };
    }
    ret
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn gettimeofday(tv: *mut timeval, tz: *mut c_void) -> c_int {
    if replay::active()
        && let Some(t) = replay::take("gettimeofday", |e| matches!(e, Event::Gettimeofday { .. }))
    {
        let Event::Gettimeofday { ret, sec, usec } = t.record.event else {
            unreachable!("checked by take")
        };
        if ret == 0 && !tv.is_null() {
            // SAFETY: the program's timeval.
            unsafe {
                (*tv).tv_sec = sec;
                (*tv).tv_usec = i64::from(usec);
            }
        }
        t.complete();
        return served(i64::from(ret)) as c_int;
    }
    // SAFETY: the program's arguments, passed on unchanged.
    let ret = unsafe { get::gettimeofday()(tv, tz) };
    let again = logged(|| {
        let (sec, usec) = if ret == 0 && !tv.is_null() {
            // SAFETY: the call filled `tv`.
            unsafe { ((*tv).tv_sec, (*tv).tv_usec as u32) }
        } else {
            (0, 0)
        };
        Event::Gettimeofday {
            ret: outcome(i64::from(ret)) as i32,
            sec,
            usec,
        }
    });
    if again {
        // SAFETY: as the program called it, to be served from the log.
        return unsafe { gettimeofday(tv, tz) };
    }
    ret
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn time(t: *mut time_t) -> time_t {
    if replay::active()
        && let Some(turn) = replay::take("time", |e| matches!(e, Event::Time { .. }))
    {
        let Event::Time { sec } = turn.record.event else {
            unreachable!("checked by take")
        };
        if !t.is_null() {
            // SAFETY: the program's time_t.
            unsafe { *t = sec };
        }
        turn.complete();
        return sec;
    }
    // SAFETY: the program's argument, passed on unchanged.
    let ret = unsafe { get::time()(t) };
    let again = logged(|| Event::Time { sec: ret });
    if again {
        // SAFETY: as the program called it, to be served from the log.
        return unsafe { time(t) };
    }
    ret
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn getrandom(buf: *mut c_void, n: size_t, flags: c_uint) -> ssize_t {
    if replay::active()
        && let Some(t) = replay::take("getrandom", |e| matches!(e, Event::Getrandom { .. }))
    {
        let Event::Getrandom { ret, data } = t.record.event else {
            unreachable!("checked by take")
        };
        if let Some(d) = data.as_flat() {
            let k = d.len().min(n);
            // SAFETY: the program's buffer of `n` bytes.
            unsafe { std::ptr::copy_nonoverlapping(d.as_ptr(), buf.cast::<u8>(), k) };
        }
        t.complete();
        return served(ret) as ssize_t;
    }
    // SAFETY: the program's arguments, passed on unchanged.
    let ret = unsafe { get::getrandom()(buf, n, flags) };
    let again = logged(|| {
        let r = outcome(ret as i64);
        Event::Getrandom {
            ret: r,
            // SAFETY: the call wrote `ret` bytes at `buf`.
            data: Bytes::Flat(unsafe { bytes(buf, r) }),
        }
    });
    if again {
        // SAFETY: as the program called it, to be served from the log.
        return unsafe { getrandom(buf, n, flags) };
    }
    ret
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn getentropy(buf: *mut c_void, n: size_t) -> c_int {
    if replay::active()
        && let Some(t) = replay::take("getentropy", |e| matches!(e, Event::Getrandom { .. }))
    {
        let Event::Getrandom { ret, data } = t.record.event else {
            unreachable!("checked by take")
        };
        if let Some(d) = data.as_flat() {
            let k = d.len().min(n);
            // SAFETY: the program's buffer of `n` bytes.
            unsafe { std::ptr::copy_nonoverlapping(d.as_ptr(), buf.cast::<u8>(), k) };
        }
        t.complete();
        return served(ret) as c_int;
    }
    // SAFETY: the program's arguments, passed on unchanged.
    let ret = unsafe { get::getentropy()(buf, n) };
    let again = logged(|| {
        let r = outcome(i64::from(ret));
        let filled = if r == 0 { n as i64 } else { 0 };
        Event::Getrandom {
            ret: r,
            // SAFETY: on success the call filled all `n` bytes.
            data: Bytes::Flat(unsafe { bytes(buf, filled) }),
        }
    });
    if again {
        // SAFETY: as the program called it, to be served from the log.
        return unsafe { getentropy(buf, n) };
    }
    ret
}

/// Whether `stream` reads a random-number device (`/dev/random`,
/// `/dev/urandom`: character devices 1:8 and 1:9), whose bytes the C
/// library's stdio fetches without calling `read`.
fn random_stream(stream: *mut libc::FILE) -> Option<c_int> {
    if stream.is_null() {
        return None;
    }
    // SAFETY: the program's open stream.
    let fd = unsafe { libc::fileno(stream) };
    // SAFETY: an fstat into a local struct.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if fd < 0 || unsafe { libc::fstat(fd, &mut st) } != 0 {
        return None;
    }
    let random = st.st_mode & libc::S_IFMT == libc::S_IFCHR
        && libc::major(st.st_rdev) == 1
        && matches!(libc::minor(st.st_rdev), 8 | 9);
    random.then_some(fd)
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn fread(
    ptr: *mut c_void,
    size: size_t,
    n: size_t,
    stream: *mut libc::FILE,
) -> size_t {
    let random = if replay::active() || record::recording() {
        random_stream(stream)
    } else {
        None
    };
    if let Some(fd) = random
        && replay::active()
        && let Some(r) = serve::read(
            "fread",
            ptr,
            size.saturating_mul(n),
            |e| matches!(e, Event::Read { call: ReadCall::Fread, fd: f, .. } if *f == fd),
        )
    {
        return r as size_t;
    }
    // SAFETY: the program's arguments, passed on unchanged.
    let got = unsafe { get::fread()(ptr, size, n, stream) };
    let Some(fd) = random else {
        return got;
    };
    if record_flat_read_len(
        ReadCall::Fread,
        fd,
        got as ssize_t,
        ptr,
        got.saturating_mul(size),
    ) {
        // SAFETY: as the program called it, to be served from the log.
        return unsafe { fread(ptr, size, n, stream) };
    }
    got
}

// Addresses the kernel chose for new mappings.

/// Records where a mapping went. A copy restored for replay made it
/// already, where the recording did: the call keeps its result and only
/// takes its turn.
fn record_mapping(call: MmapCall, name: &'static str, p: *mut c_void, len: size_t) {
    let again = logged(|| Event::Mmap {
        call,
        ret: if p == libc::MAP_FAILED {
            outcome(-1)
        } else {
            p as i64
        },
        len: len as u64,
    });
    if again
        && let Some(t) = replay::take(
            name,
            |e| matches!(e, Event::Mmap { call: c, .. } if *c == call),
        )
    {
        t.complete();
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn mmap(
    addr: *mut c_void,
    len: size_t,
    prot: c_int,
    flags: c_int,
    fd: c_int,
    off: libc::off_t,
) -> *mut c_void {
    if replay::active()
        && let Some(t) = replay::take("mmap", |e| {
            matches!(
                e,
                Event::Mmap {
                    call: MmapCall::Mmap,
                    ..
                }
            )
        })
    {
        // Where the kernel put it when recorded, if that place is free.
        let hint = match t.record.event {
            Event::Mmap { ret, .. } if addr.is_null() && ret > 0 => ret as *mut c_void,
            _ => addr,
        };
        // SAFETY: the program's arguments, with a hint the kernel may
        // ignore.
        let p = unsafe { get::mmap()(hint, len, prot, flags, fd, off) };
        t.complete();
        return p;
    }
    // SAFETY: the program's arguments, passed on unchanged.
    let p = unsafe { get::mmap()(addr, len, prot, flags, fd, off) };
    record_mapping(MmapCall::Mmap, "mmap", p, len);
    p
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn mmap64(
    addr: *mut c_void,
    len: size_t,
    prot: c_int,
    flags: c_int,
    fd: c_int,
    off: libc::off64_t,
) -> *mut c_void {
    // SAFETY: on x86-64 off_t and off64_t are the same type.
    unsafe { mmap(addr, len, prot, flags, fd, off) }
}

/// `mremap`'s fifth argument exists only with MREMAP_FIXED; C callers
/// pass it as a variadic, which on x86-64 arrives in the same register
/// whether or not it was given.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mremap(
    old: *mut c_void,
    old_len: size_t,
    new_len: size_t,
    flags: c_int,
    new_addr: *mut c_void,
) -> *mut c_void {
    if replay::active()
        && let Some(t) = replay::take("mremap", |e| {
            matches!(
                e,
                Event::Mmap {
                    call: MmapCall::Mremap,
                    ..
                }
            )
        })
    {
        // SAFETY: the program's arguments, passed on unchanged.
        let p = unsafe { get::mremap()(old, old_len, new_len, flags, new_addr) };
        t.complete();
        return p;
    }
    // SAFETY: the program's arguments, passed on unchanged.
    let p = unsafe { get::mremap()(old, old_len, new_len, flags, new_addr) };
    record_mapping(MmapCall::Mremap, "mremap", p, new_len);
    p
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn close(fd: c_int) -> c_int {
    if replay::active() {
        net::closed(fd);
    }
    // SAFETY: the program's argument, passed on unchanged.
    unsafe { get::close()(fd) }
}
