//! The end of a takeover's replay: threads park instead of running live,
//! and one of them takes the rebuilt connections from rrc and puts them in
//! place of what the replay had at their numbers (the checkpoint's
//! connections, or placeholders of those accepted since), so that the
//! program carries on live on connections that are where its clients think
//! they are. The exchange is `rrc_rr::interface`'s takeover lines.
//!
//! A thread parks at its first wrapped call after its log ended or after
//! it diverged, holding nothing of the program's (the wrapper has not
//! called anything yet); it waits on a futex until the connections are in
//! place. If the takeover does not go on (a divergence, an abort, a
//! connection that cannot be put in place), the threads stay parked: rrc
//! discards this copy.

use std::sync::atomic::{
    AtomicBool, AtomicI32, AtomicPtr, AtomicU8, AtomicU32, AtomicUsize, Ordering,
};

use libc::c_int;
use rrc_rr::interface::{TAKEOVER_BATCH, TAKEOVER_LINE_MAX, TakeoverLine};

/// The takeover socket's path (NUL-terminated, leaked), if this replay is
/// a takeover's.
static PATH: AtomicPtr<libc::c_char> = AtomicPtr::new(std::ptr::null_mut());
/// 0 while parked threads wait; 1 once they may run live.
static RELEASED: AtomicU32 = AtomicU32::new(0);
/// One parked thread talks to rrc.
static CLAIMED: AtomicBool = AtomicBool::new(false);
/// Threads parked now.
static PARKED: AtomicU32 = AtomicU32::new(0);
/// How long the number of parked threads must stay the same before the
/// exchange starts, and how long that may take: a thread between its last
/// record and its next call (a write whose bytes the primary may have
/// sent) gets there in microseconds.
const SETTLE_NS: u64 = 10_000_000;
const SETTLE_LIMIT_NS: u64 = 200_000_000;
/// A thread left the recorded path.
static DIVERGED: AtomicBool = AtomicBool::new(false);
/// How the first divergence was described (for rrc's report): written
/// once, by the thread that set [`WHY_TAKEN`], before [`DIVERGED`].
static WHY: [AtomicU8; WHY_MAX] = [const { AtomicU8::new(0) }; WHY_MAX];
static WHY_LEN: AtomicUsize = AtomicUsize::new(0);
static WHY_TAKEN: AtomicBool = AtomicBool::new(false);
const WHY_MAX: usize = 400;

/// What a thread parked at a write to a connection is writing, by log id:
/// the primary may have sent it already (a frame leaves once the log up to
/// its making is acknowledged, and a write is recorded once it returns),
/// so rrc puts it in the rebuilt connection and the write is done.
struct Pending {
    /// The connection (-1: none).
    fd: AtomicI32,
    /// The program's buffers (on the parked thread's stack or its heap,
    /// valid while it is parked) and how many bytes of them.
    parts: AtomicPtr<libc::iovec>,
    count: AtomicUsize,
    len: AtomicUsize,
    /// The thread is parked in this write.
    parked: AtomicBool,
    /// rrc took the bytes: the write is done.
    absorbed: AtomicBool,
    /// The wrapped call the thread parked at (for the report): a
    /// `&'static str`'s pointer and length.
    at: AtomicPtr<u8>,
    at_len: AtomicUsize,
}

const PENDING_SLOTS: usize = 1024;

static PENDING: [Pending; PENDING_SLOTS] = [const {
    Pending {
        fd: AtomicI32::new(-1),
        parts: AtomicPtr::new(std::ptr::null_mut()),
        count: AtomicUsize::new(0),
        len: AtomicUsize::new(0),
        parked: AtomicBool::new(false),
        absorbed: AtomicBool::new(false),
        at: AtomicPtr::new(std::ptr::null_mut()),
        at_len: AtomicUsize::new(0),
    }
}; PENDING_SLOTS];

/// This thread's slot (log ids start at 1; 0 is a thread without one).
fn my_slot() -> Option<&'static Pending> {
    match crate::thread::log_id() {
        0 => None,
        id => PENDING.get(id as usize),
    }
}

/// Runs `call`, a write of the first `len` bytes of `parts` to replayed
/// connection `fd` as the replay serves it. If the thread parks in it and
/// the takeover put those bytes in the rebuilt connection, the write is
/// done: `Some(len)`. Otherwise what `call` returned.
pub fn write_in_takeover(
    fd: c_int,
    parts: &[libc::iovec],
    len: usize,
    call: impl FnOnce() -> Option<isize>,
) -> Option<isize> {
    let Some(slot) = my_slot().filter(|_| active()) else {
        return call();
    };
    slot.absorbed.store(false, Ordering::Relaxed);
    slot.parts
        .store(parts.as_ptr().cast_mut(), Ordering::Relaxed);
    slot.count.store(parts.len(), Ordering::Relaxed);
    slot.len.store(len, Ordering::Relaxed);
    slot.fd.store(fd, Ordering::Release);
    let r = call();
    slot.fd.store(-1, Ordering::Release);
    if slot.absorbed.swap(false, Ordering::AcqRel) {
        return Some(len as isize);
    }
    r
}

/// The pending writes of parked threads: sends each to rrc (`pending`
/// line and bytes); returns their slots.
fn send_pending(sock: c_int) -> Option<Vec<&'static Pending>> {
    let mut sent = Vec::new();
    for slot in PENDING.iter() {
        let fd = slot.fd.load(Ordering::Acquire);
        if fd < 0 || !slot.parked.load(Ordering::Acquire) {
            continue;
        }
        let len = slot.len.load(Ordering::Relaxed);
        let (ptr, count) = (
            slot.parts.load(Ordering::Relaxed),
            slot.count.load(Ordering::Relaxed),
        );
        // SAFETY: the buffers of a thread parked in its write, which
        // registered them for the time of the call.
        let parts = unsafe { std::slice::from_raw_parts(ptr, count) };
        let mut bytes = Vec::with_capacity(len);
        for p in parts {
            let take = p.iov_len.min(len - bytes.len());
            if take == 0 || p.iov_base.is_null() {
                continue;
            }
            // SAFETY: as above: `take` bytes of the program's buffer.
            bytes.extend_from_slice(unsafe {
                std::slice::from_raw_parts(p.iov_base.cast::<u8>(), take)
            });
        }
        let line = TakeoverLine::Pending {
            fd,
            len: u32::try_from(bytes.len()).ok()?,
        };
        if !send_all(sock, &line.encode()) || !send_all(sock, &bytes) {
            return None;
        }
        sent.push(slot);
    }
    Some(sent)
}

/// How long a parked thread sleeps between looks (a wake-up comes sooner
/// when the log ends or a thread diverges).
const PARK_NS: i64 = 20_000_000;

/// Sets the takeover socket (from the replay configuration), and starts
/// the exchange's state afresh (a program taken over once, recorded again
/// and restored from a later checkpoint carries the state of the first).
pub fn configure(path: Option<&std::path::Path>) {
    RELEASED.store(0, Ordering::Release);
    CLAIMED.store(false, Ordering::Release);
    DIVERGED.store(false, Ordering::Release);
    WHY_LEN.store(0, Ordering::Release);
    WHY_TAKEN.store(false, Ordering::Release);
    for slot in &PENDING {
        slot.fd.store(-1, Ordering::Relaxed);
        slot.parked.store(false, Ordering::Relaxed);
        slot.absorbed.store(false, Ordering::Relaxed);
    }
    PATH.store(std::ptr::null_mut(), Ordering::Release);
    let Some(p) = path else {
        return;
    };
    let Ok(c) = std::ffi::CString::new(std::os::unix::ffi::OsStrExt::as_bytes(p.as_os_str()))
    else {
        crate::fatal(b"librrc: the takeover path contains a NUL byte\n");
    };
    PATH.store(c.into_raw(), Ordering::Release);
}

/// Whether this replay is a takeover's.
pub fn active() -> bool {
    !PATH.load(Ordering::Acquire).is_null()
}

/// A thread left the recorded path (`why`, in parts): the takeover cannot
/// go on with this copy, and rrc must hear so, and why.
pub fn diverged(why: &[&[u8]]) {
    if !WHY_TAKEN.swap(true, Ordering::AcqRel) {
        let mut n = 0;
        for b in why.iter().flat_map(|p| p.iter()).take(WHY_MAX) {
            WHY[n].store(*b, Ordering::Relaxed);
            n += 1;
        }
        WHY_LEN.store(n, Ordering::Release);
    }
    DIVERGED.store(true, Ordering::Release);
    wake();
}

/// The log's end was reached (or something else a parked thread waits
/// for happened): parked threads look again.
pub fn wake() {
    // SAFETY: a futex wake on a static word.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            RELEASED.as_ptr(),
            libc::FUTEX_WAKE | libc::FUTEX_PRIVATE_FLAG,
            i32::MAX,
        )
    };
}

/// Parks the calling thread until the rebuilt connections are in place;
/// `ended` says whether every record has been replayed. One parked thread
/// does the exchange with rrc once the log has ended or a thread diverged.
pub fn park(call: &'static str, ended: &dyn Fn() -> bool) {
    let slot = my_slot();
    if let Some(s) = slot {
        s.at.store(call.as_ptr().cast_mut(), Ordering::Relaxed);
        s.at_len.store(call.len(), Ordering::Relaxed);
        s.parked.store(true, Ordering::Release);
    }
    PARKED.fetch_add(1, Ordering::AcqRel);
    park_until_released(ended);
    PARKED.fetch_sub(1, Ordering::AcqRel);
    if let Some(s) = slot {
        s.parked.store(false, Ordering::Release);
    }
}

/// Waits until no more threads come to park for a while (bounded).
fn settle() {
    let start = crate::record::now_ns();
    let mut seen = PARKED.load(Ordering::Acquire);
    let mut since = start;
    loop {
        let ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 1_000_000,
        };
        // SAFETY: a sleep with a local timespec.
        unsafe {
            libc::syscall(
                libc::SYS_nanosleep,
                &ts as *const libc::timespec,
                std::ptr::null_mut::<libc::timespec>(),
            )
        };
        let now = crate::record::now_ns();
        let parked = PARKED.load(Ordering::Acquire);
        if parked != seen {
            seen = parked;
            since = now;
        }
        if now - since >= SETTLE_NS || now - start >= SETTLE_LIMIT_NS {
            return;
        }
    }
}

fn park_until_released(ended: &dyn Fn() -> bool) {
    loop {
        if RELEASED.load(Ordering::Acquire) == 1 {
            return;
        }
        let diverged = DIVERGED.load(Ordering::Acquire);
        if (diverged || ended()) && !CLAIMED.swap(true, Ordering::AcqRel) {
            if hand_over(diverged) {
                crate::net::close_capture();
                RELEASED.store(1, Ordering::Release);
                wake();
                return;
            }
            crate::say(&[b"rrc takeover: this copy does not go on; its threads stay parked\n"]);
        }
        let ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: PARK_NS,
        };
        // SAFETY: a futex wait on a static word with a local timeout.
        unsafe {
            libc::syscall(
                libc::SYS_futex,
                RELEASED.as_ptr(),
                libc::FUTEX_WAIT | libc::FUTEX_PRIVATE_FLAG,
                0,
                &ts as *const libc::timespec,
            )
        };
    }
}

/// A descriptor closed when dropped (raw close: nothing of the program's
/// runs).
struct Fd(c_int);

impl Drop for Fd {
    fn drop(&mut self) {
        // SAFETY: closing a descriptor this code opened.
        unsafe { libc::syscall(libc::SYS_close, self.0) };
    }
}

fn errno() -> c_int {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// Says where each replayed thread is as the exchange starts: parked at a
/// call, or still running (a thread that has not come back to a wrapped
/// call yet); with the last record it took.
fn report_threads() {
    let logs = crate::replay::thread_logs();
    for (id, slot) in PENDING.iter().enumerate().take(logs).skip(1) {
        let (mut a, mut b) = ([0u8; 20], [0u8; 20]);
        let at: &[u8] = if slot.parked.load(Ordering::Acquire) {
            let (p, n) = (
                slot.at.load(Ordering::Relaxed),
                slot.at_len.load(Ordering::Relaxed),
            );
            if p.is_null() {
                b"?"
            } else {
                // SAFETY: the pointer and length of a `&'static str`
                // stored by `park`.
                unsafe { std::slice::from_raw_parts(p, n) }
            }
        } else {
            b""
        };
        let (seq, done) = crate::replay::last_taken(id as u32).unwrap_or((0, true));
        let fd = slot.fd.load(Ordering::Acquire);
        let (mut c, mut d) = ([0u8; 20], [0u8; 20]);
        let writing: [&[u8]; 5] = if fd >= 0 && !at.is_empty() {
            [
                b" (connection ",
                crate::replay::digits(fd as u64, &mut c),
                b", ",
                crate::replay::digits(slot.len.load(Ordering::Relaxed) as u64, &mut d),
                b" bytes)",
            ]
        } else {
            [b"", b"", b"", b"", b""]
        };
        crate::say(&[
            b"rrc takeover: thread ",
            crate::replay::digits(id as u64, &mut a),
            if at.is_empty() {
                b" is running"
            } else {
                b" parked at "
            },
            at,
            writing[0],
            writing[1],
            writing[2],
            writing[3],
            writing[4],
            if done {
                b", last event #"
            } else {
                b", in event #"
            },
            crate::replay::digits(seq, &mut b),
            b"\n",
        ]);
    }
}

/// Talks to rrc: says how the replay ended, puts in place what it sends.
/// True if the program is to run live now.
fn hand_over(diverged: bool) -> bool {
    if !diverged {
        settle();
        report_threads();
        if !release_saved_connections() {
            return false;
        }
    }
    let Some(sock) = connect() else {
        crate::say(&[b"rrc takeover: cannot reach rrc's takeover socket\n"]);
        return false;
    };
    if diverged {
        let n = WHY_LEN.load(Ordering::Acquire);
        let why: Vec<u8> = WHY[..n].iter().map(|b| b.load(Ordering::Relaxed)).collect();
        let why = String::from_utf8_lossy(&why).into_owned();
        let _ = send_all(sock.0, &TakeoverLine::Diverged(why).encode());
        return false;
    }
    let Some(pending) = send_pending(sock.0) else {
        return false;
    };
    if !send_all(sock.0, &TakeoverLine::End.encode()) {
        return false;
    }
    let mut lines: Vec<u8> = Vec::new();
    let mut fds: std::collections::VecDeque<c_int> = std::collections::VecDeque::new();
    let mut installed = 0u32;
    let mut rings: Option<Fd> = None;
    loop {
        while let Some(nl) = lines.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = lines.drain(..=nl).collect();
            match TakeoverLine::parse(&line[..line.len() - 1]) {
                Some(TakeoverLine::Install(targets)) => {
                    if fds.len() < targets.len() {
                        crate::say(&[
                            b"rrc takeover: an install line came without its connections\n",
                        ]);
                        return false;
                    }
                    for target in targets {
                        let new = Fd(fds.pop_front().expect("counted"));
                        if let Err(e) = install(new.0, target) {
                            let _ = send_all(
                                sock.0,
                                &TakeoverLine::Failed {
                                    fd: target,
                                    errno: e,
                                }
                                .encode(),
                            );
                            return false;
                        }
                        installed += 1;
                    }
                }
                Some(TakeoverLine::Rings) => {
                    let Some(fd) = fds.pop_front() else {
                        crate::say(&[
                            b"rrc takeover: the rings line came without its descriptor\n",
                        ]);
                        return false;
                    };
                    rings = Some(Fd(fd));
                }
                Some(TakeoverLine::Go) => {
                    if let Some(r) = rings.take()
                        && let Err(e) = crate::record::resume(r.0)
                    {
                        let _ = send_all(
                            sock.0,
                            &TakeoverLine::Failed {
                                fd: crate::record::ring_fd(),
                                errno: e,
                            }
                            .encode(),
                        );
                        return false;
                    }
                    // What the parked writers are writing is in the
                    // rebuilt connections: their writes are done.
                    for slot in &pending {
                        slot.absorbed.store(true, Ordering::Release);
                    }
                    return send_all(sock.0, &TakeoverLine::Installed(installed).encode());
                }
                _ => return false,
            }
        }
        if lines.len() > TAKEOVER_LINE_MAX || !receive(sock.0, &mut lines, &mut fds) {
            for fd in fds {
                drop(Fd(fd));
            }
            return false;
        }
    }
}

/// The checkpoint's connections (restored in repair mode, silent) give
/// their addresses up for the rebuilt ones: each is replaced by a
/// placeholder at its number (flags, options and epoll registrations
/// kept), which closes it without a word to its peer.
fn release_saved_connections() -> bool {
    for fd in crate::net::virtual_fds() {
        // SAFETY: sockaddr_storage is plain data; getpeername fills it.
        let connected = unsafe {
            let mut addr: libc::sockaddr_storage = std::mem::zeroed();
            let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            libc::syscall(
                libc::SYS_getpeername,
                fd,
                &mut addr as *mut libc::sockaddr_storage,
                &mut len as *mut libc::socklen_t,
            ) == 0
        };
        if !connected {
            continue;
        }
        // SAFETY: a new socket of this code's.
        let placeholder = unsafe {
            libc::syscall(
                libc::SYS_socket,
                libc::AF_INET,
                libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
                0,
            )
        } as c_int;
        if placeholder < 0 {
            return false;
        }
        let placeholder = Fd(placeholder);
        if install(placeholder.0, fd).is_err() {
            crate::say(&[b"rrc takeover: a saved connection could not be released\n"]);
            return false;
        }
        crate::net::set_virtual(fd, true);
    }
    true
}

fn connect() -> Option<Fd> {
    let path = PATH.load(Ordering::Acquire);
    // SAFETY: a NUL-terminated string leaked by `configure`.
    let bytes = unsafe { std::ffi::CStr::from_ptr(path) }.to_bytes();
    // SAFETY: sockaddr_un is plain data.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() {
        return None;
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: raw socket calls with a local address.
    unsafe {
        let s = libc::syscall(
            libc::SYS_socket,
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
            0,
        ) as c_int;
        if s < 0 {
            return None;
        }
        let s = Fd(s);
        let r = libc::syscall(
            libc::SYS_connect,
            s.0,
            &addr as *const libc::sockaddr_un,
            std::mem::size_of::<libc::sockaddr_un>(),
        );
        (r == 0).then_some(s)
    }
}

fn send_all(sock: c_int, mut bytes: &[u8]) -> bool {
    while !bytes.is_empty() {
        // SAFETY: sending a local buffer.
        let n = unsafe {
            libc::syscall(
                libc::SYS_sendto,
                sock,
                bytes.as_ptr(),
                bytes.len(),
                libc::MSG_NOSIGNAL,
                0usize,
                0usize,
            )
        };
        if n <= 0 {
            if n < 0 && errno() == libc::EINTR {
                continue;
            }
            return false;
        }
        bytes = &bytes[n as usize..];
    }
    true
}

/// Reads what is there: bytes onto `lines`, descriptors onto `fds`. False
/// at the end of the connection or on an error.
fn receive(sock: c_int, lines: &mut Vec<u8>, fds: &mut std::collections::VecDeque<c_int>) -> bool {
    let mut buf = [0u8; TAKEOVER_LINE_MAX];
    // Room for a full batch of descriptors.
    let mut control = [0u64; (TAKEOVER_BATCH * 4 + 64) / 8];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is plain data.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control);
    let n = loop {
        // SAFETY: receiving into local buffers the msghdr describes.
        let n = unsafe {
            libc::syscall(
                libc::SYS_recvmsg,
                sock,
                &mut msg as *mut libc::msghdr,
                libc::MSG_CMSG_CLOEXEC,
            )
        };
        if n < 0 && errno() == libc::EINTR {
            continue;
        }
        break n;
    };
    if n <= 0 {
        return false;
    }
    // SAFETY: walking the control messages the kernel wrote into
    // `control`, as msg_controllen bounds them.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(c).cast::<c_int>();
                let count = ((*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize)
                    / std::mem::size_of::<c_int>();
                for i in 0..count {
                    fds.push_back(data.add(i).read_unaligned());
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return false;
    }
    lines.extend_from_slice(&buf[..n as usize]);
    true
}

/// Socket options a program sets on its connections, copied from what is
/// at the number to the connection put there.
const OPTIONS: &[(c_int, c_int)] = &[
    (libc::IPPROTO_TCP, libc::TCP_NODELAY),
    (libc::IPPROTO_TCP, libc::TCP_KEEPIDLE),
    (libc::IPPROTO_TCP, libc::TCP_KEEPINTVL),
    (libc::IPPROTO_TCP, libc::TCP_KEEPCNT),
    (libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT),
    (libc::SOL_SOCKET, libc::SO_KEEPALIVE),
];

/// Puts connection `new` at descriptor `target`, in place of what is
/// there: same status flags, close-on-exec and socket options, and the
/// same epoll registrations. Err: the errno of what failed.
fn install(new: c_int, target: c_int) -> Result<(), c_int> {
    // SAFETY: fcntl, getsockopt and setsockopt on descriptors of this
    // process with local buffers.
    let (flags, fdflags) = unsafe {
        let flags = libc::syscall(libc::SYS_fcntl, target, libc::F_GETFL);
        let fdflags = libc::syscall(libc::SYS_fcntl, target, libc::F_GETFD);
        if flags < 0 || fdflags < 0 {
            return Err(errno());
        }
        for &(level, name) in OPTIONS {
            let mut v: c_int = 0;
            let mut len = std::mem::size_of::<c_int>() as libc::socklen_t;
            let got = libc::syscall(
                libc::SYS_getsockopt,
                target,
                level,
                name,
                &mut v as *mut c_int,
                &mut len as *mut libc::socklen_t,
            );
            if got == 0 {
                libc::syscall(
                    libc::SYS_setsockopt,
                    new,
                    level,
                    name,
                    &v as *const c_int,
                    std::mem::size_of::<c_int>(),
                );
            }
        }
        (flags, fdflags)
    };
    let registrations = epoll_registrations(target);
    let cloexec = if fdflags & i64::from(libc::FD_CLOEXEC) != 0 {
        libc::O_CLOEXEC
    } else {
        0
    };
    // SAFETY: dup3, fcntl and epoll_ctl on descriptors of this process;
    // the event is a local.
    unsafe {
        if libc::syscall(libc::SYS_dup3, new, target, cloexec) < 0 {
            return Err(errno());
        }
        let status = flags & i64::from(libc::O_NONBLOCK | libc::O_APPEND);
        if libc::syscall(libc::SYS_fcntl, target, libc::F_SETFL, status) < 0 {
            return Err(errno());
        }
        for (epfd, events, data) in registrations {
            let mut ev = libc::epoll_event { events, u64: data };
            let r = libc::syscall(
                libc::SYS_epoll_ctl,
                epfd,
                libc::EPOLL_CTL_ADD,
                target,
                &mut ev as *mut libc::epoll_event,
            );
            if r < 0 && errno() != libc::EEXIST {
                return Err(errno());
            }
        }
    }
    crate::net::set_virtual(target, false);
    Ok(())
}

/// Every epoll registration of descriptor `target` in this process:
/// (epoll descriptor, events, data), from `/proc/self/fdinfo`.
fn epoll_registrations(target: c_int) -> Vec<(c_int, u32, u64)> {
    let mut out = Vec::new();
    for epfd in epoll_fds() {
        let path = format!("/proc/self/fdinfo/{epfd}\0");
        let Some(text) = read_file(&path) else {
            continue;
        };
        for line in text.split(|b| *b == b'\n') {
            if let Some((tfd, events, data)) = parse_target(line)
                && tfd == target
            {
                out.push((epfd, events, data));
            }
        }
    }
    out
}

/// `tfd: N events: HEX data: HEX ...` (the kernel's fdinfo of an epoll
/// file, one line per registration).
fn parse_target(line: &[u8]) -> Option<(c_int, u32, u64)> {
    let text = std::str::from_utf8(line).ok()?;
    let mut words = text.split_whitespace();
    let mut field = |name: &str| -> Option<&str> {
        (words.next()? == name).then_some(())?;
        words.next()
    };
    let tfd = field("tfd:")?.parse().ok()?;
    let events = u32::from_str_radix(field("events:")?, 16).ok()?;
    let data = u64::from_str_radix(field("data:")?, 16).ok()?;
    Some((tfd, events, data))
}

/// This process's epoll descriptors.
fn epoll_fds() -> Vec<c_int> {
    let mut out = Vec::new();
    // SAFETY: opening a constant path.
    let dir = unsafe {
        libc::syscall(
            libc::SYS_openat,
            libc::AT_FDCWD,
            c"/proc/self/fd".as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    } as c_int;
    if dir < 0 {
        return out;
    }
    let dir = Fd(dir);
    let mut buf = [0u8; 8192];
    loop {
        // SAFETY: getdents64 into a local buffer.
        let n = unsafe { libc::syscall(libc::SYS_getdents64, dir.0, buf.as_mut_ptr(), buf.len()) };
        if n <= 0 {
            break;
        }
        let mut at = 0usize;
        while at + 19 < n as usize {
            let reclen = usize::from(u16::from_le_bytes([buf[at + 16], buf[at + 17]]));
            if reclen == 0 {
                break;
            }
            let name = &buf[at + 19..(at + reclen).min(n as usize)];
            let name = &name[..name.iter().position(|b| *b == 0).unwrap_or(name.len())];
            if let Some(fd) = std::str::from_utf8(name).ok().and_then(|s| s.parse().ok())
                && is_epoll(fd)
            {
                out.push(fd);
            }
            at += reclen;
        }
    }
    out
}

fn is_epoll(fd: c_int) -> bool {
    let path = format!("/proc/self/fd/{fd}\0");
    let mut link = [0u8; 64];
    // SAFETY: readlink of a NUL-terminated local path into a local buffer.
    let n = unsafe {
        libc::syscall(
            libc::SYS_readlinkat,
            libc::AT_FDCWD,
            path.as_ptr(),
            link.as_mut_ptr(),
            link.len(),
        )
    };
    n > 0 && &link[..n as usize] == b"anon_inode:[eventpoll]"
}

/// A whole file's bytes (`path` NUL-terminated).
fn read_file(path: &str) -> Option<Vec<u8>> {
    // SAFETY: opening a NUL-terminated local path.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat,
            libc::AT_FDCWD,
            path.as_ptr(),
            libc::O_RDONLY | libc::O_CLOEXEC,
        )
    } as c_int;
    if fd < 0 {
        return None;
    }
    let fd = Fd(fd);
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        // SAFETY: reading into a local buffer.
        let n = unsafe { libc::syscall(libc::SYS_read, fd.0, buf.as_mut_ptr(), buf.len()) };
        if n <= 0 {
            break;
        }
        out.extend_from_slice(&buf[..n as usize]);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epoll_fdinfo_lines_are_read() {
        let line = b"tfd:        7 events:       19 data:       10000000a  pos:0 ino:1a sdev:9";
        assert_eq!(parse_target(line), Some((7, 0x19, 0x1_0000_000a)));
        assert_eq!(parse_target(b"pos:\t0"), None);
        assert_eq!(parse_target(b"tfd: x events: 1 data: 1"), None);
    }
}
