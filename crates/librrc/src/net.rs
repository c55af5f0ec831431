//! Client connections in replay. A connection the recorded program
//! accepted does not exist when it is replayed: its descriptor number is
//! taken by a placeholder socket (so that epoll, fcntl and setsockopt on
//! it behave), everything read from it comes from the log, and what the
//! program writes to it is not sent but kept in the capture file
//! (`rrc replay --capture`), as records of descriptor, length and bytes.

use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};

use libc::c_int;
use rrc_rr::interface;

/// Descriptors below this can be virtual.
const MAX_FD: usize = 1 << 16;

static VIRTUAL: [AtomicU64; MAX_FD / 64] = [const { AtomicU64::new(0) }; MAX_FD / 64];
/// Where written bytes go (-1: nowhere).
static CAPTURE: AtomicI32 = AtomicI32::new(-1);

/// Opens the capture file, if there is one. Runs in the constructor.
pub fn init(capture: Option<&std::path::Path>) {
    let Some(path) = capture else {
        return;
    };
    let Ok(c) = std::ffi::CString::new(std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str()))
    else {
        crate::fatal(b"librrc: the capture path contains a NUL byte\n");
    };
    // SAFETY: a NUL-terminated path; flags and mode are constants.
    let fd = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC | libc::O_APPEND | libc::O_CLOEXEC,
            0o600,
        )
    };
    if fd < 0 {
        crate::fatal(b"librrc: cannot open the capture file\n");
    }
    // Out of the way: the program's descriptors must get the numbers they
    // had when recorded, and it opens the lowest free ones.
    // SAFETY: fcntl and close on the descriptor just opened.
    let high = unsafe {
        let h = libc::fcntl(
            fd,
            libc::F_DUPFD_CLOEXEC,
            rrc_rr::interface::CAPTURE_FD_FROM,
        );
        libc::close(fd);
        h
    };
    if high < 0 {
        crate::fatal(b"librrc: cannot move the capture file's descriptor\n");
    }
    CAPTURE.store(high, Ordering::Release);
}

/// Closes the capture file: the program runs live now, and must not carry
/// a file of the replay's (on the host that replayed it) into its next
/// checkpoint. Called while every other thread is parked (none is in a
/// capture write, and none opens a file that could take the number).
pub fn close_capture() {
    let fd = CAPTURE.swap(-1, Ordering::AcqRel);
    if fd >= 0 {
        // SAFETY: close of the descriptor this module opened.
        unsafe { libc::syscall(libc::SYS_close, fd) };
    }
}

pub fn is_virtual(fd: c_int) -> bool {
    let Ok(i) = usize::try_from(fd) else {
        return false;
    };
    i < MAX_FD && VIRTUAL[i / 64].load(Ordering::Acquire) & (1 << (i % 64)) != 0
}

/// Every virtual descriptor, in order.
pub fn virtual_fds() -> impl Iterator<Item = c_int> {
    VIRTUAL.iter().enumerate().flat_map(|(w, word)| {
        let bits = word.load(Ordering::Acquire);
        (0..64)
            .filter(move |b| bits & (1u64 << b) != 0)
            .map(move |b| (w * 64 + b) as c_int)
    })
}

pub fn set_virtual(fd: c_int, on: bool) {
    let Ok(i) = usize::try_from(fd) else {
        return;
    };
    if i >= MAX_FD {
        return;
    }
    let bit = 1u64 << (i % 64);
    if on {
        VIRTUAL[i / 64].fetch_or(bit, Ordering::AcqRel);
    } else {
        VIRTUAL[i / 64].fetch_and(!bit, Ordering::AcqRel);
    }
}

/// No descriptor is virtual any more: the program runs live and records
/// again (a later replay names its own).
pub fn forget_virtual() {
    for word in &VIRTUAL {
        word.store(0, Ordering::Release);
    }
}

/// In replay, a thread off its log reading replayed connection `fd`: the
/// log knows of no more input on it, and what the socket itself holds is
/// what the checkpoint saved, which the log has served already. So there
/// is nothing to read: `EAGAIN` without waiting (`dontwait`, or a
/// nonblocking socket), else a wait for a signal (`EINTR`). `None` when
/// the call is not on a replayed connection.
pub fn no_more_input(fd: c_int, dontwait: bool) -> Option<isize> {
    if !crate::replay::active() || !is_virtual(fd) {
        return None;
    }
    // SAFETY: fcntl on the program's descriptor; ppoll with no
    // descriptors waits for a signal.
    unsafe {
        let flags = libc::syscall(libc::SYS_fcntl, fd, libc::F_GETFL);
        let errno = if dontwait || (flags >= 0 && flags & i64::from(libc::O_NONBLOCK) != 0) {
            libc::EAGAIN
        } else {
            libc::syscall(
                libc::SYS_ppoll,
                std::ptr::null_mut::<libc::pollfd>(),
                0,
                std::ptr::null::<libc::timespec>(),
                std::ptr::null::<libc::sigset_t>(),
            );
            libc::EINTR
        };
        *libc::__errno_location() = errno;
    }
    Some(-1)
}

/// Puts a placeholder socket at descriptor `fd` (the number the recorded
/// accept returned) and marks it virtual. `flags`: accept4's.
pub fn place(fd: c_int, flags: c_int) -> bool {
    let ty = libc::SOCK_STREAM | (flags & (libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC));
    // SAFETY: raw system calls on descriptors this function owns; `fd` is
    // the number the program will use, free in the recording at this point
    // of the program as it is now.
    let ok = unsafe {
        let s = libc::syscall(libc::SYS_socket, libc::AF_INET, ty, 0) as c_int;
        if s < 0 {
            return false;
        }
        if s != fd {
            let cloexec = flags & libc::SOCK_CLOEXEC != 0;
            let r = libc::syscall(
                libc::SYS_dup3,
                s,
                fd,
                if cloexec { libc::O_CLOEXEC } else { 0 },
            );
            libc::syscall(libc::SYS_close, s);
            r >= 0
        } else {
            true
        }
    };
    if ok {
        set_virtual(fd, true);
    }
    ok
}

/// A copy restored for replay learned, when recording it, that it had made
/// a read of `len` bytes from `fd` already (the checkpoint came between
/// the call and its record): if `fd` is a replayed connection, the
/// capture says so, for a takeover works out what the restored connection
/// still holds.
pub fn read_earlier(fd: c_int, len: i64) {
    if len <= 0 || !is_virtual(fd) {
        return;
    }
    let mut head = [libc::iovec {
        iov_base: std::ptr::null_mut(),
        iov_len: 0,
    }];
    let marked = (fd as u32 | interface::CAPTURE_READ_EARLIER) as c_int;
    write_record(marked, len.min(i64::from(u32::MAX - 1)) as u32, &mut head);
}

/// The descriptor is closed: no longer virtual; a connection's capture
/// ends here.
pub fn closed(fd: c_int) {
    if is_virtual(fd) {
        set_virtual(fd, false);
        let mut head = [libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        }];
        write_record(fd, interface::CAPTURE_CLOSED, &mut head);
    }
}

/// Most buffers one call gathers (an iovec array on the stack of the
/// program's thread): a capture record, or an output call made for real
/// over part of the program's data; more take several.
pub const MAX_PARTS: usize = 64;

/// Fills `out` with iovecs over bytes `from..to` of `parts` (buffers of
/// the program's, back to back), as many as `out` holds; returns how many,
/// and how many bytes they cover.
pub fn slice(
    parts: &[libc::iovec],
    from: usize,
    to: usize,
    out: &mut [libc::iovec],
) -> (usize, usize) {
    let (mut n, mut at, mut len) = (0usize, 0usize, 0usize);
    for p in parts {
        if n == out.len() || at >= to {
            break;
        }
        let (start, end) = (at, at.saturating_add(p.iov_len));
        at = end;
        let (lo, hi) = (start.max(from), end.min(to));
        if lo >= hi {
            continue;
        }
        out[n] = libc::iovec {
            // Inside the program's buffer: `lo - start` is below its
            // length.
            iov_base: p.iov_base.cast::<u8>().wrapping_add(lo - start).cast(),
            iov_len: hi - lo,
        };
        n += 1;
        len += hi - lo;
    }
    (n, len)
}

/// Keeps the first `want` bytes of `parts` (buffers of the program's),
/// written to virtual descriptor `fd`: one record, or several for many
/// buffers or more bytes than a record holds. `earlier`: they were
/// written before the checkpoint (the restored connection holds them).
pub fn capture(fd: c_int, parts: &[libc::iovec], want: usize, earlier: bool) {
    let fd = if earlier {
        (fd as u32 | interface::CAPTURE_EARLIER) as c_int
    } else {
        fd
    };
    if CAPTURE.load(Ordering::Acquire) < 0 {
        return;
    }
    // Room for the record's header first.
    let mut iov = [libc::iovec {
        iov_base: std::ptr::null_mut(),
        iov_len: 0,
    }; MAX_PARTS + 1];
    let mut done = 0;
    while done < want {
        let to = want.min(done.saturating_add(interface::CAPTURE_MAX_LEN as usize));
        let (n, len) = slice(parts, done, to, &mut iov[1..]);
        if len == 0 {
            break;
        }
        write_record(fd, len as u32, &mut iov[..=n]);
        done += len;
    }
}

/// One capture record: descriptor, length (or `CAPTURE_CLOSED`), then the
/// bytes of `iov[1..]` (`iov[0]` is for the header); the format is
/// `rrc_rr::interface`'s.
fn write_record(fd: c_int, len: u32, iov: &mut [libc::iovec]) {
    let out = CAPTURE.load(Ordering::Acquire);
    if out < 0 || iov.is_empty() {
        return;
    }
    let mut head = interface::capture_header(fd, len);
    iov[0] = libc::iovec {
        iov_base: head.as_mut_ptr().cast(),
        iov_len: head.len(),
    };
    // SAFETY: a writev of a local header and the program's buffers to our
    // capture file. O_APPEND keeps each record whole among threads.
    unsafe { libc::syscall(libc::SYS_writev, out, iov.as_ptr(), iov.len()) };
}
