//! In replay: input calls answered from the log. Each writes the logged
//! outcome back the way the C library would have (bytes into the
//! program's buffers, addresses and lengths, ready lists and sets) and
//! returns the logged result; `None` when the thread is not (or no longer)
//! replaying, and the call must be made for real.

use libc::{
    c_int, c_void, epoll_event, iovec, msghdr, pollfd, size_t, sockaddr, socklen_t, ssize_t,
};
use rrc_rr::log::{AcceptCall, Bytes, EpollCall, Event, PollCall, ReadCall, RecvCall, SelectCall};

use crate::hooks::served;
use crate::{net, replay};

/// Copies `data` into the program's buffer of `room` bytes.
fn fill(buf: *mut c_void, room: usize, data: &[u8]) {
    let k = data.len().min(room);
    if k > 0 && !buf.is_null() {
        // SAFETY: the program's buffer of `room` bytes.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), buf.cast::<u8>(), k) };
    }
}

/// Spreads `data` over the program's `cnt` iovecs, in order.
fn scatter(iov: *const iovec, cnt: usize, data: &[u8]) {
    if iov.is_null() {
        return;
    }
    let mut rest = data;
    for i in 0..cnt {
        if rest.is_empty() {
            break;
        }
        // SAFETY: the program's array of `cnt` iovecs.
        let v = unsafe { &*iov.add(i) };
        let k = rest.len().min(v.iov_len);
        fill(v.iov_base, k, &rest[..k]);
        rest = &rest[k..];
    }
}

/// Puts a logged address into the program's `addr`/`len` pair (the full
/// length reported, at most the room given copied).
fn give_address(addr: *mut sockaddr, len: *mut socklen_t, logged: &[u8]) {
    if addr.is_null() || len.is_null() {
        return;
    }
    // SAFETY: the program's address buffer of *len bytes, and its length.
    unsafe {
        fill(addr.cast(), *len as usize, logged);
        *len = logged.len() as socklen_t;
    }
}

fn flat<'a>(b: &Bytes<'a>) -> &'a [u8] {
    // Decoded records always hold flat bytes.
    b.as_flat().unwrap_or(&[])
}

/// read, pread, recv: the logged bytes into `buf`.
pub fn read(
    call: &'static str,
    buf: *mut c_void,
    n: size_t,
    is: impl Fn(&Event<'static>) -> bool,
) -> Option<ssize_t> {
    let t = replay::take(call, is)?;
    let (ret, data) = match t.record.event {
        Event::Read { ret, data, .. } | Event::Recv { ret, data, .. } => (ret, flat(&data)),
        _ => (-i64::from(libc::EIO), &[][..]),
    };
    fill(buf, n, data);
    t.complete();
    Some(served(ret) as ssize_t)
}

pub fn readv(fd: c_int, iov: *const iovec, cnt: c_int) -> Option<ssize_t> {
    let t = replay::take(
        "readv",
        |e| matches!(e, Event::Read { call: ReadCall::Readv, fd: f, .. } if *f == fd),
    )?;
    let Event::Read { ret, data, .. } = t.record.event else {
        unreachable!("checked by take")
    };
    scatter(iov, cnt.max(0) as usize, flat(&data));
    t.complete();
    Some(served(ret) as ssize_t)
}

pub fn recvfrom(
    fd: c_int,
    buf: *mut c_void,
    n: size_t,
    addr: *mut sockaddr,
    addrlen: *mut socklen_t,
) -> Option<ssize_t> {
    let t = replay::take(
        "recvfrom",
        |e| matches!(e, Event::Recv { call: RecvCall::RecvFrom, fd: f, .. } if *f == fd),
    )?;
    let Event::Recv {
        ret,
        data,
        addr: from,
        ..
    } = t.record.event
    else {
        unreachable!("checked by take")
    };
    fill(buf, n, flat(&data));
    if ret >= 0 {
        give_address(addr, addrlen, from);
    }
    t.complete();
    Some(served(ret) as ssize_t)
}

/// Fills one message header the way recvmsg does.
fn fill_msg(m: &mut msghdr, data: &[u8], from: &[u8], flags: c_int, control: &[u8]) {
    scatter(m.msg_iov, m.msg_iovlen, data);
    if !m.msg_name.is_null() {
        fill(m.msg_name, m.msg_namelen as usize, from);
        m.msg_namelen = from.len() as socklen_t;
    }
    if !m.msg_control.is_null() {
        fill(m.msg_control, m.msg_controllen, control);
        m.msg_controllen = control.len().min(m.msg_controllen);
    } else {
        m.msg_controllen = 0;
    }
    m.msg_flags = flags;
}

pub fn recvmsg(fd: c_int, msg: *mut msghdr) -> Option<ssize_t> {
    let t = replay::take(
        "recvmsg",
        |e| matches!(e, Event::Recv { call: RecvCall::RecvMsg, fd: f, .. } if *f == fd),
    )?;
    let Event::Recv {
        ret,
        data,
        addr,
        flags,
        control,
        ..
    } = t.record.event
    else {
        unreachable!("checked by take")
    };
    if ret >= 0 && !msg.is_null() {
        // SAFETY: the program's message header.
        fill_msg(unsafe { &mut *msg }, flat(&data), addr, flags, control);
    }
    t.complete();
    Some(served(ret) as ssize_t)
}

/// recvmmsg: one call may span several records (at most 32 messages
/// each).
pub fn recvmmsg(fd: c_int, msgs: *mut libc::mmsghdr, n: usize) -> Option<c_int> {
    let is = |e: &Event<'static>| matches!(e, Event::RecvMmsg { fd: f, .. } if *f == fd);
    let mut t = replay::take("recvmmsg", is)?;
    let mut filled = 0usize;
    loop {
        let Event::RecvMmsg { ret, msgs: got, .. } = t.record.event else {
            unreachable!("checked by take")
        };
        for m in got.iter() {
            if filled < n && !msgs.is_null() {
                // SAFETY: the program's array of `n` message headers.
                let h = unsafe { &mut *msgs.add(filled) };
                let data = flat(&m.data);
                fill_msg(&mut h.msg_hdr, data, m.addr, m.flags, m.control);
                h.msg_len = data.len() as u32;
            }
            filled += 1;
        }
        t.complete();
        if ret <= 0 || filled >= ret as usize {
            return Some(served(ret) as c_int);
        }
        t = replay::take("recvmmsg", is)?;
    }
}

/// poll, ppoll: the logged `revents` (one call may span several records
/// of at most 256 descriptors).
pub fn poll(call: PollCall, fds: *mut pollfd, n: usize) -> Option<c_int> {
    let name = match call {
        PollCall::Poll => "poll",
        PollCall::Ppoll => "ppoll",
    };
    let is = |e: &Event<'static>| matches!(e, Event::Poll { call: c, .. } if *c == call);
    let mut t = replay::take(name, is)?;
    let mut at = 0usize;
    loop {
        let Event::Poll { ret, revents, .. } = t.record.event else {
            unreachable!("checked by take")
        };
        for r in revents.iter() {
            if at < n && !fds.is_null() {
                // SAFETY: the program's array of `n` pollfds.
                unsafe { (*fds.add(at)).revents = r as i16 };
            }
            at += 1;
        }
        t.complete();
        if at >= n {
            return Some(served(ret) as c_int);
        }
        t = replay::take(name, is)?;
    }
}

/// select, pselect: the logged sets.
pub fn select(
    call: SelectCall,
    r: *mut libc::fd_set,
    w: *mut libc::fd_set,
    x: *mut libc::fd_set,
) -> Option<c_int> {
    let name = match call {
        SelectCall::Select => "select",
        SelectCall::Pselect => "pselect",
    };
    let t = replay::take(
        name,
        |e| matches!(e, Event::Select { call: c, .. } if *c == call),
    )?;
    let Event::Select {
        ret,
        readfds,
        writefds,
        exceptfds,
        ..
    } = t.record.event
    else {
        unreachable!("checked by take")
    };
    for (set, logged) in [(r, readfds), (w, writefds), (x, exceptfds)] {
        fill(set.cast(), size_of::<libc::fd_set>(), logged);
    }
    t.complete();
    Some(served(ret) as c_int)
}

/// The logged ready list (one call may span several records of at most
/// 64 entries).
pub fn epoll(call: EpollCall, epfd: c_int, events: *mut epoll_event, max: c_int) -> Option<c_int> {
    let name = match call {
        EpollCall::Wait => "epoll_wait",
        EpollCall::Pwait => "epoll_pwait",
        EpollCall::Pwait2 => "epoll_pwait2",
    };
    let is = |e: &Event<'static>| matches!(e, Event::EpollWait { call: c, epfd: f, .. } if *c == call && *f == epfd);
    let mut t = replay::take(name, is)?;
    let mut copied = 0usize;
    loop {
        let Event::EpollWait { ret, ready, .. } = t.record.event else {
            unreachable!("checked by take")
        };
        for e in ready.iter() {
            if copied < max.max(0) as usize && !events.is_null() {
                // SAFETY: the program's array of `max` entries.
                unsafe {
                    *events.add(copied) = epoll_event {
                        events: e.events,
                        u64: e.data,
                    };
                }
            }
            copied += 1;
        }
        t.complete();
        if ret <= 0 || copied >= ret as usize {
            return Some(served(ret) as c_int);
        }
        // The rest of this call's list is in the next record.
        t = replay::take(name, is)?;
    }
}

/// The logged accept, with a placeholder socket at the new descriptor.
pub fn accept(
    call: AcceptCall,
    fd: c_int,
    addr: *mut sockaddr,
    len: *mut socklen_t,
    flags: c_int,
) -> Option<c_int> {
    let t = replay::take(
        match call {
            AcceptCall::Accept => "accept",
            AcceptCall::Accept4 => "accept4",
        },
        |e| matches!(e, Event::Accept { call: c, fd: f, .. } if *c == call && *f == fd),
    )?;
    let Event::Accept {
        ret, addr: peer, ..
    } = t.record.event
    else {
        unreachable!("checked by take")
    };
    if ret >= 0 {
        net::place(ret as c_int, flags);
        give_address(addr, len, peer);
    }
    t.complete();
    Some(served(ret) as c_int)
}
