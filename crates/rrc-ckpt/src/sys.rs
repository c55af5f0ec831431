//! Raw system calls and CPU instructions the engine needs that `nix` does
//! not wrap: the only `unsafe` code of this crate besides [`crate::ptrace`]'s
//! wrappers of these. Each function takes and returns plain Rust values.

use std::io;
use std::mem;

use nix::unistd::Pid;

fn check(ret: libc::c_long) -> io::Result<libc::c_long> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

const PTRACE_SECCOMP_GET_FILTER: libc::c_uint = 0x420c;
/// More filters than a thread can have: the kernel caps a thread's filters
/// at 32768 instructions in all, each filter costing at least 5.
const MAX_SECCOMP_FILTERS: usize = 32768 / 5;

/// A stopped, traced thread's seccomp filters, the first installed first,
/// each as its classic BPF instructions. Empty for a thread without any.
pub fn seccomp_filters(tid: Pid) -> io::Result<Vec<Vec<libc::sock_filter>>> {
    let mut out = Vec::new();
    for index in 0..MAX_SECCOMP_FILTERS {
        // SAFETY: with a null buffer the kernel only returns the filter's
        // length (index 0 is the filter installed last).
        let n = unsafe {
            libc::ptrace(
                PTRACE_SECCOMP_GET_FILTER,
                tid.as_raw(),
                index as *mut libc::c_void,
                std::ptr::null_mut::<libc::c_void>(),
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENOENT) {
                break;
            }
            return Err(e);
        }
        let mut buf = vec![
            libc::sock_filter {
                code: 0,
                jt: 0,
                jf: 0,
                k: 0
            };
            n as usize
        ];
        // SAFETY: `buf` has room for the `n` instructions the kernel said
        // this filter has (filters never change once installed).
        let m = check(unsafe {
            libc::ptrace(
                PTRACE_SECCOMP_GET_FILTER,
                tid.as_raw(),
                index as *mut libc::c_void,
                buf.as_mut_ptr() as *mut libc::c_void,
            )
        })?;
        buf.truncate(m as usize);
        out.push(buf);
    }
    out.reverse();
    Ok(out)
}

/// `NT_X86_XSTATE`: the XSAVE area of a thread (x87, SSE, AVX, AVX-512...).
const NT_X86_XSTATE: libc::c_int = 0x202;
const PTRACE_GET_RSEQ_CONFIGURATION: libc::c_uint = 0x420f;

/// The size of the XSAVE area for the features the OS enabled (CPUID leaf
/// 0xD, sub-leaf 0, EBX), and XCR0 itself: a thread's extended state is only
/// portable to a CPU/kernel with the same two values.
pub fn xsave_layout() -> (usize, u64) {
    let leaf = std::arch::x86_64::__cpuid_count(0xd, 0);
    let xcr0_lo: u32;
    let xcr0_hi: u32;
    // SAFETY: XGETBV with ECX=0 reads XCR0; it is available whenever the OS
    // enabled XSAVE (OSXSAVE), which Linux on x86-64 always does.
    unsafe {
        std::arch::asm!("xgetbv", in("ecx") 0u32, out("eax") xcr0_lo, out("edx") xcr0_hi,
            options(nomem, nostack, preserves_flags));
    }
    (
        leaf.ebx as usize,
        (u64::from(xcr0_hi) << 32) | u64::from(xcr0_lo),
    )
}

pub fn get_xstate(tid: Pid, size: usize) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; size];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: PTRACE_GETREGSET writes at most iov_len bytes into iov_base,
    // which points to our buffer of that size, and updates iov_len.
    check(unsafe {
        libc::ptrace(
            libc::PTRACE_GETREGSET,
            tid.as_raw(),
            NT_X86_XSTATE as libc::c_long,
            &mut iov as *mut libc::iovec,
        )
    })?;
    buf.truncate(iov.iov_len);
    Ok(buf)
}

pub fn set_xstate(tid: Pid, state: &[u8]) -> io::Result<()> {
    let mut copy = state.to_vec();
    let mut iov = libc::iovec {
        iov_base: copy.as_mut_ptr().cast(),
        iov_len: copy.len(),
    };
    // SAFETY: PTRACE_SETREGSET reads iov_len bytes from our buffer.
    check(unsafe {
        libc::ptrace(
            libc::PTRACE_SETREGSET,
            tid.as_raw(),
            NT_X86_XSTATE as libc::c_long,
            &mut iov as *mut libc::iovec,
        )
    })?;
    Ok(())
}

pub fn get_sigmask(tid: Pid) -> io::Result<u64> {
    let mut mask: u64 = 0;
    // SAFETY: PTRACE_GETSIGMASK writes `addr` (8) bytes into `data`.
    check(unsafe {
        libc::ptrace(
            libc::PTRACE_GETSIGMASK,
            tid.as_raw(),
            mem::size_of::<u64>(),
            &mut mask as *mut u64,
        )
    })?;
    Ok(mask)
}

pub fn set_sigmask(tid: Pid, mask: u64) -> io::Result<()> {
    // SAFETY: PTRACE_SETSIGMASK reads `addr` (8) bytes from `data`.
    check(unsafe {
        libc::ptrace(
            libc::PTRACE_SETSIGMASK,
            tid.as_raw(),
            mem::size_of::<u64>(),
            &mask as *const u64,
        )
    })?;
    Ok(())
}

/// A queued signal as the kernel reports it: the 128-byte `siginfo_t`.
pub type RawSigInfo = [u8; 128];

/// Reads (without dequeuing) the signals queued for `tid`, or for its whole
/// process when `shared`.
pub fn peek_siginfo(tid: Pid, shared: bool) -> io::Result<Vec<RawSigInfo>> {
    #[repr(C)]
    struct PeekArgs {
        off: u64,
        flags: u32,
        nr: i32,
    }
    const BATCH: usize = 32;
    let mut out = Vec::new();
    loop {
        let args = PeekArgs {
            off: out.len() as u64,
            flags: u32::from(shared),
            nr: BATCH as i32,
        };
        let mut buf = [[0u8; 128]; BATCH];
        // SAFETY: PTRACE_PEEKSIGINFO writes at most `nr` siginfo_t (128
        // bytes each) into `data`, which has room for BATCH of them.
        let n = check(unsafe {
            libc::ptrace(
                libc::PTRACE_PEEKSIGINFO,
                tid.as_raw(),
                &args as *const PeekArgs,
                buf.as_mut_ptr(),
            )
        })? as usize;
        out.extend_from_slice(&buf[..n]);
        if n < BATCH {
            return Ok(out);
        }
    }
}

/// A thread's restartable-sequence registration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RseqConfig {
    pub ptr: u64,
    pub size: u32,
    pub flags: u32,
    pub signature: u32,
}

pub fn get_rseq(tid: Pid) -> io::Result<Option<RseqConfig>> {
    #[repr(C)]
    #[derive(Default)]
    struct Conf {
        rseq_abi_pointer: u64,
        rseq_abi_size: u32,
        signature: u32,
        flags: u32,
        pad: u32,
    }
    let mut c = Conf::default();
    // SAFETY: the request writes at most `addr` bytes (the struct's size)
    // into `data`, our struct.
    check(unsafe {
        libc::ptrace(
            PTRACE_GET_RSEQ_CONFIGURATION,
            tid.as_raw(),
            mem::size_of::<Conf>(),
            &mut c as *mut Conf,
        )
    })?;
    Ok((c.rseq_abi_pointer != 0).then_some(RseqConfig {
        ptr: c.rseq_abi_pointer,
        size: c.rseq_abi_size,
        flags: c.flags,
        signature: c.signature,
    }))
}

/// The robust futex list head and its length for `tid`.
pub fn get_robust_list(tid: Pid) -> io::Result<(u64, u64)> {
    let mut head: u64 = 0;
    let mut len: libc::size_t = 0;
    // SAFETY: get_robust_list writes a pointer and a size_t through the two
    // pointers, both to live locals.
    check(unsafe {
        libc::syscall(
            libc::SYS_get_robust_list,
            tid.as_raw(),
            &mut head as *mut u64,
            &mut len as *mut libc::size_t,
        )
    })?;
    Ok((head, len as u64))
}

/// Whether fd `fd1` of `pid1` and fd `fd2` of `pid2` are the same open file
/// description.
pub fn same_file(pid1: Pid, fd1: i32, pid2: Pid, fd2: i32) -> io::Result<bool> {
    const KCMP_FILE: libc::c_int = 0;
    // SAFETY: kcmp compares kernel objects; it takes integers only.
    let r = check(unsafe {
        libc::syscall(
            libc::SYS_kcmp,
            pid1.as_raw(),
            pid2.as_raw(),
            KCMP_FILE,
            fd1 as libc::c_ulong,
            fd2 as libc::c_ulong,
        )
    })?;
    Ok(r == 0)
}

/// Whether fd `fd` of `pid` is the open file registered as the `toff`-th
/// target numbered `tfd` of epoll `efd` of `epoll_pid`.
pub fn epoll_target_is(
    pid: Pid,
    fd: i32,
    epoll_pid: Pid,
    efd: i32,
    tfd: i32,
    toff: u32,
) -> io::Result<bool> {
    const KCMP_EPOLL_TFD: libc::c_int = 7;
    // struct kcmp_epoll_slot { __u32 efd, tfd, toff; }
    let slot: [u32; 3] = [efd as u32, tfd as u32, toff];
    // SAFETY: kcmp reads the slot (three u32, ours, alive for the call)
    // and compares kernel objects.
    let r = check(unsafe {
        libc::syscall(
            libc::SYS_kcmp,
            pid.as_raw(),
            epoll_pid.as_raw(),
            KCMP_EPOLL_TFD,
            fd as libc::c_ulong,
            slot.as_ptr(),
        )
    })?;
    Ok(r == 0)
}

/// How the fd tables of processes `pid1` and `pid2` compare in the
/// kernel's order of tables (`Equal`: they share one, `CLONE_FILES`).
pub fn fd_table_order(pid1: Pid, pid2: Pid) -> io::Result<std::cmp::Ordering> {
    const KCMP_FILES: libc::c_int = 2;
    // SAFETY: kcmp compares kernel objects; it takes integers only.
    let r = check(unsafe {
        libc::syscall(
            libc::SYS_kcmp,
            pid1.as_raw(),
            pid2.as_raw(),
            KCMP_FILES,
            0,
            0,
        )
    })?;
    // 0: equal; 1: the first is less; 2: the first is greater.
    Ok(match r {
        0 => std::cmp::Ordering::Equal,
        1 => std::cmp::Ordering::Less,
        _ => std::cmp::Ordering::Greater,
    })
}

/// The kernel's handle of the file at `path` (a magic link of /proc
/// followed): `(mount id, handle type, handle bytes)`, to open that very
/// inode again with [`open_by_handle`] whatever its names.
pub fn name_to_handle(path: &std::path::Path) -> io::Result<(i32, i32, Vec<u8>)> {
    use std::os::unix::ffi::OsStrExt;
    const MAX_HANDLE_SZ: usize = 128;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // struct file_handle: u32 handle_bytes, i32 handle_type, then the bytes.
    let mut buf = [0u8; 8 + MAX_HANDLE_SZ];
    buf[..4].copy_from_slice(&(MAX_HANDLE_SZ as u32).to_ne_bytes());
    let mut mount_id: libc::c_int = 0;
    // SAFETY: the path is a NUL-terminated string of ours; the kernel
    // writes at most 8 + handle_bytes bytes into buf (which is that long)
    // and one int into mount_id.
    check(unsafe {
        libc::syscall(
            libc::SYS_name_to_handle_at,
            libc::AT_FDCWD,
            c.as_ptr(),
            buf.as_mut_ptr(),
            &mut mount_id as *mut libc::c_int,
            libc::AT_SYMLINK_FOLLOW,
        )
    })?;
    let len =
        (u32::from_ne_bytes(buf[..4].try_into().expect("4 bytes")) as usize).min(MAX_HANDLE_SZ);
    let ty = i32::from_ne_bytes(buf[4..8].try_into().expect("4 bytes"));
    Ok((mount_id, ty, buf[8..8 + len].to_vec()))
}

/// Starts writing `len` bytes of `f` from `at` back to its disk, without
/// waiting (`sync_file_range(SYNC_FILE_RANGE_WRITE)`): a later sync of
/// the file then has less left to wait for.
pub fn start_writeback(f: &std::fs::File, at: u64, len: u64) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: sync_file_range takes an fd we hold and integers.
    check(unsafe {
        libc::sync_file_range(
            f.as_raw_fd(),
            at as libc::off64_t,
            len as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        )
    } as libc::c_long)
    .map(|_| ())
}

/// The `ioctl` of a pidfd that opens its process's namespace of kind
/// `ns` (`PIDFD_GET_*_NAMESPACE` of `linux/pidfd.h`: `_IO(0xFF, n)`).
pub fn pidfd_namespace_ioctl(ns: crate::image::NsKind) -> u64 {
    use crate::image::NsKind as K;
    let n = match ns {
        K::Cgroup => 1,
        K::Ipc => 2,
        K::Mnt => 3,
        K::Net => 4,
        K::Pid => 5,
        K::Time => 7,
        K::User => 9,
        K::Uts => 10,
    };
    (0xFF << 8) | n
}

/// A new mount of a file system of type `fstype` made by the calling
/// thread (in its namespaces), attached nowhere: no mount table is
/// touched, and it goes with its fd.
pub fn detached_mount(
    fstype: &str,
    attrs: rustix::mount::MountAttrFlags,
) -> io::Result<std::os::fd::OwnedFd> {
    use rustix::mount::{FsMountFlags, FsOpenFlags, fsconfig_create, fsmount, fsopen};
    let fs = fsopen(fstype, FsOpenFlags::FSOPEN_CLOEXEC)?;
    fsconfig_create(&fs)?;
    Ok(fsmount(&fs, FsMountFlags::FSMOUNT_CLOEXEC, attrs)?)
}

/// A pidfd for process `pid`.
pub fn pidfd_open(pid: Pid) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: pidfd_open takes integers and returns a new fd we own.
    let pidfd = check(unsafe { libc::syscall(libc::SYS_pidfd_open, pid.as_raw(), 0) })? as i32;
    // SAFETY: pidfd was just returned to us.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(pidfd) })
}

/// Opens, with open flags `flags`, the file a file handle names, on the
/// filesystem of `mount` (as `name_to_handle_at` or an inotify fdinfo line
/// gives it).
pub fn open_by_handle(
    mount: std::os::fd::BorrowedFd<'_>,
    handle_type: i32,
    handle: &[u8],
    flags: i32,
) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::{AsRawFd, FromRawFd};
    // struct file_handle: handle_bytes (u32), handle_type (i32), then the
    // bytes; kept in u64s for alignment.
    const MAX_HANDLE_SZ: usize = 128;
    if handle.len() > MAX_HANDLE_SZ {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    let mut buf = [0u64; 1 + MAX_HANDLE_SZ / 8];
    let mut bytes = Vec::with_capacity(8 + handle.len());
    bytes.extend_from_slice(&(handle.len() as u32).to_ne_bytes());
    bytes.extend_from_slice(&handle_type.to_ne_bytes());
    bytes.extend_from_slice(handle);
    for (i, chunk) in bytes.chunks(8).enumerate() {
        let mut w = [0u8; 8];
        w[..chunk.len()].copy_from_slice(chunk);
        buf[i] = u64::from_ne_bytes(w);
    }
    // SAFETY: buf holds a complete struct file_handle whose handle_bytes
    // is at most the room after its header; the call only reads it and
    // returns a new fd we own.
    let fd = check(unsafe {
        libc::syscall(
            libc::SYS_open_by_handle_at,
            mount.as_raw_fd(),
            buf.as_mut_ptr(),
            flags,
        )
    })? as i32;
    // SAFETY: fd was just returned to us and nothing else owns it.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
}

/// Duplicates file descriptor `fd` of the process behind `pidfd`.
pub fn steal_fd_via(pidfd: &std::os::fd::OwnedFd, fd: i32) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: pidfd_getfd takes integers and returns a new fd we own.
    let fd = check(unsafe {
        libc::syscall(
            libc::SYS_pidfd_getfd,
            std::os::fd::AsRawFd::as_raw_fd(pidfd),
            fd,
            0,
        )
    })? as i32;
    // SAFETY: fd was just returned by pidfd_getfd and nothing else owns it.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
}

/// `struct clone_args` of clone3(2).
#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

/// clone3(2) without a stack: fork(2) as `args` describes it; 0 in the
/// child, the child's pid or -1 in the parent.
///
/// # Safety
///
/// As for fork(2): in the child, only system calls until it ends or execs;
/// every address in `args` valid for the call.
unsafe fn clone3(args: &CloneArgs) -> libc::c_long {
    // SAFETY: the caller keeps the promises above.
    unsafe {
        libc::syscall(
            libc::SYS_clone3,
            args as *const CloneArgs,
            mem::size_of::<CloneArgs>(),
        )
    }
}

/// Forks (fork(2) semantics: `None` in the child) with `flags`, giving the
/// child the pids `pids` (`clone3`'s `set_tid`: the innermost pid
/// namespace's first; none: the kernel's next ones).
///
/// # Safety
///
/// As for fork(2) in a program: the caller must be single-threaded, and the
/// child must only make system calls (glibc's cached thread id names the
/// parent's thread) until it execs, exits or is taken over by a tracer.
pub unsafe fn fork_with_pid(flags: u64, pids: &[i32]) -> io::Result<Option<Pid>> {
    let args = CloneArgs {
        flags,
        exit_signal: libc::SIGCHLD as u64,
        set_tid: if pids.is_empty() {
            0
        } else {
            pids.as_ptr() as u64
        },
        set_tid_size: pids.len() as u64,
        ..Default::default()
    };
    // SAFETY: as for this function; the set_tid array `args` points to
    // outlives the call.
    let ret = unsafe { clone3(&args) };
    match ret {
        r if r < 0 => Err(io::Error::last_os_error()),
        0 => Ok(None),
        child => Ok(Some(Pid::from_raw(child as i32))),
    }
}

/// Ends the calling process at once (no atexit handlers, no stdio flush).
pub fn exit_now(code: i32) -> ! {
    // SAFETY: _exit has no preconditions and never returns.
    unsafe { libc::_exit(code) }
}

/// `PIDFD_GET_INFO` of linux/pidfd.h (6.13+): `_IOWR(0xFF, 11, struct
/// pidfd_info)` for the 64-byte first version of the struct.
const PIDFD_GET_INFO: libc::c_ulong = 0xc040_ff0b;
/// `pidfd_info.mask` bit asking for the exit status (6.15+).
const PIDFD_INFO_EXIT: u64 = 1 << 3;

/// The wait status of the reaped process behind `pidfd`, as the kernel
/// kept it (`None` on a kernel that keeps none).
pub fn pidfd_exit_status(pidfd: std::os::fd::BorrowedFd<'_>) -> io::Result<Option<i32>> {
    use std::os::fd::AsRawFd;
    // struct pidfd_info: mask, cgroupid, 12 ids of 32 bits, exit_code.
    let mut info = [0u64; 8];
    info[0] = PIDFD_INFO_EXIT;
    // SAFETY: the kernel writes at most the 64 bytes of `info`.
    let r = unsafe { libc::ioctl(pidfd.as_raw_fd(), PIDFD_GET_INFO, info.as_mut_ptr()) };
    if r < 0 {
        let e = io::Error::last_os_error();
        // ENOTTY/EINVAL: an older kernel; ESRCH: it kept no exit status.
        return match e.raw_os_error() {
            Some(libc::ENOTTY | libc::EINVAL | libc::ESRCH) => Ok(None),
            _ => Err(e),
        };
    }
    if info[0] & PIDFD_INFO_EXIT == 0 {
        return Ok(None);
    }
    Ok(Some((info[7] >> 32) as u32 as i32))
}

/// How a process ended, from a wait status a reaped pidfd kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    Exit(u8),
    /// Killed by a signal whose default action ends a process.
    Signal {
        signal: i32,
        core: bool,
    },
}

impl Ending {
    /// The ending wait status `status` describes, if a process can end so.
    pub fn of_status(status: i32) -> Option<Ending> {
        if !(0..=0xffff).contains(&status) {
            return None;
        }
        let signal = status & 0x7f;
        if signal == 0 {
            return Some(Ending::Exit((status >> 8) as u8));
        }
        // Signals whose default action is to ignore or to stop cannot end
        // a process; neither can "stopped" (0x7f).
        let ignored_or_stop = [
            libc::SIGCHLD,
            libc::SIGCONT,
            libc::SIGURG,
            libc::SIGWINCH,
            libc::SIGSTOP,
            libc::SIGTSTP,
            libc::SIGTTIN,
            libc::SIGTTOU,
        ];
        if status >> 8 != 0 || signal > 64 || ignored_or_stop.contains(&signal) {
            return None;
        }
        Some(Ending::Signal {
            signal,
            core: status & 0x80 != 0,
        })
    }
}

/// A pidfd of a process of ours that ended as `ending` (or by exit 0) and
/// has been reaped, with pidfd flags `flags` (`PIDFD_NONBLOCK`,
/// `PIDFD_THREAD`). A core dump is not made again: a core-dumping signal
/// ends the process without one.
pub fn reaped_pidfd(ending: Option<Ending>, flags: u32) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let mut pidfd: libc::c_int = -1;
    let args = CloneArgs {
        flags: libc::CLONE_PIDFD as u64,
        pidfd: &mut pidfd as *mut libc::c_int as u64,
        exit_signal: libc::SIGCHLD as u64,
        ..Default::default()
    };
    // SAFETY: the child only makes system calls and ends (no allocation,
    // no lock: the engine may have other threads); `pidfd` outlives the
    // call.
    let ret = unsafe { clone3(&args) };
    if ret == 0 {
        if let Some(Ending::Signal { signal, .. }) = ending {
            // SAFETY: raw system calls on this process only; a core-dumping
            // signal is barred from dumping by a zero core size.
            unsafe {
                let none = libc::rlimit {
                    rlim_cur: 0,
                    rlim_max: 0,
                };
                libc::setrlimit(libc::RLIMIT_CORE, &none);
                libc::signal(signal, libc::SIG_DFL);
                let mut set: libc::sigset_t = mem::zeroed();
                libc::sigaddset(&mut set, signal);
                libc::sigprocmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
                libc::syscall(libc::SYS_kill, libc::syscall(libc::SYS_getpid), signal);
            }
        }
        let code = match ending {
            Some(Ending::Exit(code)) => i32::from(code),
            Some(Ending::Signal { .. }) => 127,
            None => 0,
        };
        exit_now(code);
    }
    check(ret)?;
    let child = ret as libc::pid_t;
    // SAFETY: clone3 stored a new pidfd we own.
    let first = unsafe { OwnedFd::from_raw_fd(pidfd) };
    let waitid = |options: libc::c_int| {
        // SAFETY: `si` is a plain struct the kernel fills.
        let mut si: libc::siginfo_t = unsafe { mem::zeroed() };
        // SAFETY: as above; the pidfd is ours.
        check(unsafe {
            libc::waitid(
                libc::P_PIDFD,
                first.as_raw_fd() as libc::id_t,
                &mut si,
                libc::WEXITED | options,
            )
        } as libc::c_long)
    };
    // Flags are given by pidfd_open only, while the child is a zombie.
    let wanted = if flags == 0 {
        None
    } else {
        waitid(libc::WNOWAIT)?;
        // SAFETY: pidfd_open takes integers and returns a new fd we own.
        let fd = check(unsafe { libc::syscall(libc::SYS_pidfd_open, child, flags) })?;
        // SAFETY: fd was just returned to us.
        Some(unsafe { OwnedFd::from_raw_fd(fd as i32) })
    };
    waitid(0)?;
    Ok(wanted.unwrap_or(first))
}

/// `fcntl` commands for a file's signal owner, which the libc crate lacks
/// on this target.
pub const F_SETSIG: u64 = 10;
pub const F_GETSIG: libc::c_int = 11;
pub const F_SETOWN_EX: u64 = 15;
pub const F_GETOWN_EX: libc::c_int = 16;

/// Who receives the I/O signals of a file of ours, as `(type, id)` of
/// `F_GETOWN_EX` (id 0: nobody), and which signal (`F_GETSIG`, 0: SIGIO).
pub fn signal_owner(fd: std::os::fd::BorrowedFd<'_>) -> io::Result<((i32, i32), i32)> {
    use std::os::fd::AsRawFd;
    let mut owner = [0 as libc::c_int; 2];
    // SAFETY: F_GETOWN_EX writes one `struct f_owner_ex` (two ints) at the
    // pointer, which points at two ints of ours.
    check(unsafe { libc::fcntl(fd.as_raw_fd(), F_GETOWN_EX, owner.as_mut_ptr()) }.into())?;
    // SAFETY: F_GETSIG takes no argument and returns an integer.
    let sig = check(unsafe { libc::fcntl(fd.as_raw_fd(), F_GETSIG) }.into())?;
    Ok(((owner[0], owner[1]), sig as i32))
}

/// Runs `f` with the socket's peek offset set to `off`, then puts back
/// the offset the program had.
pub fn with_peek_offset<T>(
    s: std::os::fd::BorrowedFd<'_>,
    off: i32,
    f: impl FnOnce() -> std::io::Result<T>,
) -> std::io::Result<T> {
    let had = getsockopt_int(s, libc::SOL_SOCKET, libc::SO_PEEK_OFF)?;
    setsockopt_int(s, libc::SOL_SOCKET, libc::SO_PEEK_OFF, off)?;
    let r = f();
    let back = setsockopt_int(s, libc::SOL_SOCKET, libc::SO_PEEK_OFF, had);
    let r = r?;
    back?;
    Ok(r)
}

/// The IPv4 or IPv6 address in `addr`, if it holds one.
pub fn inet_addr(addr: &nix::sys::socket::SockaddrStorage) -> Option<std::net::SocketAddr> {
    if let Some(a) = addr.as_sockaddr_in() {
        Some(std::net::SocketAddr::from(std::net::SocketAddrV4::from(*a)))
    } else {
        addr.as_sockaddr_in6()
            .map(|a| std::net::SocketAddr::from(std::net::SocketAddrV6::from(*a)))
    }
}

/// An integer socket option of a socket of ours.
pub fn getsockopt_int(
    fd: std::os::fd::BorrowedFd<'_>,
    level: libc::c_int,
    name: libc::c_int,
) -> io::Result<libc::c_int> {
    use std::os::fd::AsRawFd;
    let mut v: libc::c_int = 0;
    let mut len = mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `v`.
    let r = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&mut v as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    check(r as libc::c_long)?;
    Ok(v)
}

/// The data queued in a pipe, copied without consuming it: `tee(2)` into a
/// pipe of our own as large as the original, then read from that; and the
/// length of each read. A read never spans a packet of a packet-mode pipe
/// (written with `O_DIRECT`), so several reads mean several packets.
pub fn peek_pipe(
    reader: std::os::fd::BorrowedFd<'_>,
    capacity: usize,
) -> io::Result<(Vec<u8>, Vec<u32>)> {
    use std::io::Read;
    use std::os::fd::AsRawFd;
    let (rd, wr) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK)?;
    nix::fcntl::fcntl(&wr, nix::fcntl::FcntlArg::F_SETPIPE_SZ(capacity as i32))?;
    // SAFETY: tee takes two fds we hold open and integers.
    let n = unsafe {
        libc::tee(
            reader.as_raw_fd(),
            wr.as_raw_fd(),
            capacity,
            libc::SPLICE_F_NONBLOCK,
        )
    };
    if n < 0 {
        let e = io::Error::last_os_error();
        // An empty pipe: nothing to copy.
        if e.raw_os_error() == Some(libc::EAGAIN) {
            return Ok((Vec::new(), Vec::new()));
        }
        return Err(e);
    }
    drop(wr);
    let mut out = vec![0u8; n as usize];
    let mut reads = Vec::new();
    let mut at = 0;
    let mut copy = std::fs::File::from(rd);
    while at < out.len() {
        match copy.read(&mut out[at..])? {
            0 => break,
            got => {
                reads.push(got as u32);
                at += got;
            }
        }
    }
    out.truncate(at);
    Ok((out, reads))
}

/// Whether the other side of the pipe end `fd` (of ours) is gone: no
/// writer is left for a read end (it polls as hung up), no reader for a
/// write end (it polls as an error).
pub fn pipe_widowed(fd: std::os::fd::BorrowedFd<'_>, write_end: bool) -> io::Result<bool> {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    let mut fds = [PollFd::new(fd, PollFlags::empty())];
    poll(&mut fds, PollTimeout::ZERO)?;
    let got = fds[0].revents().unwrap_or(PollFlags::empty());
    Ok(if write_end {
        got.contains(PollFlags::POLLERR)
    } else {
        got.contains(PollFlags::POLLHUP)
    })
}

/// The raw bytes of a `siginfo_t`, as the image keeps them.
pub fn siginfo_bytes(si: &libc::siginfo_t) -> RawSigInfo {
    // SAFETY: siginfo_t is a 128-byte plain C structure; viewing it as
    // bytes reads initialised memory of exactly that size.
    unsafe { mem::transmute_copy::<libc::siginfo_t, RawSigInfo>(si) }
}

/// In a freshly forked skeleton: maps the engine's scratch region at `addr`
/// (readable, writable, executable) with a `syscall` instruction at its
/// start, for the tracer to point the process's registers at.
pub fn map_scratch(addr: u64, size: u64) -> io::Result<()> {
    // SAFETY: a new anonymous mapping at an address the caller chose to be
    // free (MAP_FIXED_NOREPLACE fails rather than replace anything).
    let p = unsafe {
        libc::mmap(
            addr as *mut libc::c_void,
            size as usize,
            libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    if p as u64 != addr {
        return Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            "scratch region placed elsewhere",
        ));
    }
    // SAFETY: the mapping is ours, writable and at least two bytes long.
    unsafe {
        std::ptr::write_volatile(p.cast::<[u8; 2]>(), [0x0f, 0x05]);
    }
    Ok(())
}

/// A read-only view of an image file, to copy pages from without reading
/// them into a buffer first.
pub fn map_image(file: &std::fs::File) -> io::Result<memmap2::Mmap> {
    // SAFETY: image files are written once by a checkpoint and only read by
    // a restore; nothing truncates or rewrites them while they are mapped
    // (a concurrent writer would be a misuse the engine cannot prevent,
    // and could at worst corrupt the restored memory, not ours).
    unsafe { memmap2::MmapOptions::new().map(file) }
}

/// An integer socket option of a socket of ours.
pub fn setsockopt_int(
    fd: std::os::fd::BorrowedFd<'_>,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    setsockopt_bytes(fd, level, name, &value.to_ne_bytes())
}

/// A socket option given as raw bytes (a C structure the caller laid out).
pub fn setsockopt_bytes(
    fd: std::os::fd::BorrowedFd<'_>,
    level: libc::c_int,
    name: libc::c_int,
    value: &[u8],
) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: setsockopt reads `len` bytes from `value`, which has them.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            value.as_ptr().cast(),
            value.len() as libc::socklen_t,
        )
    };
    check(r as libc::c_long)?;
    Ok(())
}

/// A socket option read as raw bytes, at most `max` of them.
pub fn getsockopt_bytes(
    fd: std::os::fd::BorrowedFd<'_>,
    level: libc::c_int,
    name: libc::c_int,
    max: usize,
) -> io::Result<Vec<u8>> {
    use std::os::fd::AsRawFd;
    let mut buf = vec![0u8; max];
    let mut len = max as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `buf` and updates
    // `len` to what it wrote.
    let r = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            level,
            name,
            buf.as_mut_ptr().cast(),
            &mut len,
        )
    };
    check(r as libc::c_long)?;
    buf.truncate(len as usize);
    Ok(buf)
}

/// An `ioctl` that reports one int (SIOCINQ, SIOCOUTQ, SIOCOUTQNSD).
pub fn ioctl_int(fd: std::os::fd::BorrowedFd<'_>, request: libc::c_ulong) -> io::Result<i32> {
    use std::os::fd::AsRawFd;
    let mut v: libc::c_int = 0;
    // SAFETY: these requests write one int through the pointer.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), request, &mut v) } as libc::c_long)?;
    Ok(v)
}

/// Sends `fds` over a unix socket of ours as one SCM_RIGHTS message.
pub fn send_fds(sock: std::os::fd::BorrowedFd<'_>, fds: &[std::os::fd::RawFd]) -> io::Result<()> {
    send_with_fds(sock, b"f", fds, false).map(|_| ())
}

/// Sends `data` with `fds` (SCM_RIGHTS) over a unix socket of ours, in one
/// call (without waiting when `nowait`); returns the bytes sent: a stream
/// may take fewer (the files go with the first).
pub fn send_with_fds(
    sock: std::os::fd::BorrowedFd<'_>,
    data: &[u8],
    fds: &[std::os::fd::RawFd],
    nowait: bool,
) -> io::Result<usize> {
    use nix::sys::socket::MsgFlags;
    let flags = if nowait {
        MsgFlags::MSG_DONTWAIT
    } else {
        MsgFlags::empty()
    };
    sendmsg_fds(sock, data, fds, flags, None)
}

/// Sends one datagram with files (SCM_RIGHTS) to the unix socket named
/// `to`, without waiting.
pub fn send_with_fds_to(
    sock: std::os::fd::BorrowedFd<'_>,
    data: &[u8],
    fds: &[std::os::fd::RawFd],
    to: &nix::sys::socket::UnixAddr,
) -> io::Result<usize> {
    sendmsg_fds(
        sock,
        data,
        fds,
        nix::sys::socket::MsgFlags::MSG_DONTWAIT,
        Some(to),
    )
}

/// One `sendmsg` of `data` with `fds`, to `to` if given.
fn sendmsg_fds(
    sock: std::os::fd::BorrowedFd<'_>,
    data: &[u8],
    fds: &[std::os::fd::RawFd],
    flags: nix::sys::socket::MsgFlags,
    to: Option<&nix::sys::socket::UnixAddr>,
) -> io::Result<usize> {
    use nix::sys::socket::{ControlMessage, sendmsg};
    use std::os::fd::AsRawFd;
    let iov = [io::IoSlice::new(data)];
    let cmsg = [ControlMessage::ScmRights(fds)];
    Ok(sendmsg(sock.as_raw_fd(), &iov, &cmsg, flags, to)?)
}

/// A message queued on a unix socket, as a peek sees it.
pub struct Peeked {
    pub data: Vec<u8>,
    /// The files it carries (SCM_RIGHTS), as fds of ours.
    pub fds: Vec<std::os::fd::OwnedFd>,
    /// It carried more files than a peek can take.
    pub truncated: bool,
    /// Its sender's name (`None`: it has none).
    pub from: Option<crate::unixdiag::UnixName>,
}

/// Peeks at the next message queued on a unix socket of ours without
/// taking it; `None` when there is none.
pub fn peek_message(fd: std::os::fd::BorrowedFd<'_>, max: usize) -> io::Result<Option<Peeked>> {
    use nix::sys::socket::{ControlMessageOwned, MsgFlags, UnixAddr, recvmsg};
    use std::os::fd::AsRawFd;
    let mut buf = vec![0u8; max];
    let mut cmsg = nix::cmsg_space!([std::os::fd::RawFd; 253]);
    let mut iov = [io::IoSliceMut::new(&mut buf)];
    let r = match recvmsg::<UnixAddr>(
        fd.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_CMSG_CLOEXEC,
    ) {
        Ok(r) => r,
        Err(nix::errno::Errno::EAGAIN) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let n = r.bytes;
    let from = r.address.and_then(|a| {
        use nix::sys::socket::SockaddrLike;
        // A sender without a name comes with no address at all.
        if (a.len() as usize) <= std::mem::offset_of!(libc::sockaddr_un, sun_path) {
            None
        } else if let Some(p) = a.path() {
            Some(crate::unixdiag::UnixName::Path(
                p.to_string_lossy().into_owned(),
            ))
        } else {
            a.as_abstract()
                .map(|b| crate::unixdiag::UnixName::Abstract(b.to_vec()))
        }
    });
    let truncated = r.flags.contains(MsgFlags::MSG_CTRUNC);
    let mut fds = Vec::new();
    if let Ok(cmsgs) = r.cmsgs() {
        for c in cmsgs {
            if let ControlMessageOwned::ScmRights(got) = c {
                use std::os::fd::FromRawFd;
                // SAFETY: the kernel just installed these fds for us.
                fds.extend(
                    got.into_iter()
                        .map(|f| unsafe { std::os::fd::OwnedFd::from_raw_fd(f) }),
                );
            }
        }
    }
    buf.truncate(n);
    Ok(Some(Peeked {
        data: buf,
        fds,
        truncated,
        from,
    }))
}

const UFFDIO_API: libc::c_ulong = 0xc018_aa3f;
const UFFDIO_REGISTER: libc::c_ulong = 0xc020_aa00;
const UFFD_API: u64 = 0xaa;
const UFFD_FEATURE_WP_ASYNC: u64 = 1 << 15;
const UFFDIO_REGISTER_MODE_WP: u64 = 2;
const PAGEMAP_SCAN: libc::c_ulong = 0xc060_6610;
pub const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
pub const PM_SCAN_CHECK_WPASYNC: u64 = 1 << 1;

/// Enables asynchronous write-protection on a fresh userfaultfd. Not
/// UFFD_FEATURE_WP_UNPOPULATED: with it, discarding a protected anonymous
/// page would leave a marker instead of showing up as written.
pub fn uffd_api(uffd: std::os::fd::RawFd) -> io::Result<()> {
    uffd_api_features(uffd, UFFD_FEATURE_WP_ASYNC)
}

/// The UFFDIO_API handshake of a fresh userfaultfd, asking for `features`.
pub fn uffd_api_features(uffd: std::os::fd::RawFd, features: u64) -> io::Result<()> {
    let mut api = [UFFD_API, features, 0u64];
    // SAFETY: UFFDIO_API reads and writes one struct uffdio_api (three
    // u64), which `api` is.
    check(unsafe { libc::ioctl(uffd, UFFDIO_API, api.as_mut_ptr()) } as libc::c_long)?;
    Ok(())
}

const UFFDIO_UNREGISTER: libc::c_ulong = 0x8010_aa01;
const UFFDIO_COPY: libc::c_ulong = 0xc028_aa03;
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;

/// Registers `[start, start + len)` for missing-page handling, which is
/// what lets [`uffd_copy`] fill it.
pub fn uffd_register_missing(uffd: std::os::fd::RawFd, start: u64, len: u64) -> io::Result<()> {
    let mut reg = [start, len, UFFDIO_REGISTER_MODE_MISSING, 0u64];
    // SAFETY: UFFDIO_REGISTER reads and writes one struct uffdio_register
    // (range, mode, ioctls: four u64), which `reg` is.
    check(unsafe { libc::ioctl(uffd, UFFDIO_REGISTER, reg.as_mut_ptr()) } as libc::c_long)?;
    Ok(())
}

/// Ends every registration of `[start, start + len)`.
pub fn uffd_unregister(uffd: std::os::fd::RawFd, start: u64, len: u64) -> io::Result<()> {
    let mut range = [start, len];
    // SAFETY: UFFDIO_UNREGISTER reads one struct uffdio_range (two u64),
    // which `range` is.
    check(unsafe { libc::ioctl(uffd, UFFDIO_UNREGISTER, range.as_mut_ptr()) } as libc::c_long)?;
    Ok(())
}

/// Fills pages of the userfaultfd's memory never touched yet, at `dst`,
/// with `src` (whole pages): the kernel allocates each page and copies into
/// it, without clearing it first as a fault would.
pub fn uffd_copy(uffd: std::os::fd::RawFd, dst: u64, src: &[u8]) -> io::Result<()> {
    let mut done = 0usize;
    let mut idle = 0;
    while done < src.len() {
        let (copied, err) = uffd_copy_some(uffd, dst + done as u64, &src[done..]);
        let Some(e) = err else { return Ok(()) };
        if e.raw_os_error() == Some(libc::EAGAIN) && idle < 100 {
            // Stopped part way (the address space changed meanwhile): the
            // rest is tried again.
            if copied > 0 {
                done += copied as usize;
                idle = 0;
            } else {
                idle += 1;
            }
            continue;
        }
        return Err(e);
    }
    Ok(())
}

const UFFDIO_WAKE: libc::c_ulong = 0x8010_aa02;
const UFFDIO_ZEROPAGE: libc::c_ulong = 0xc020_aa04;
/// Events a userfaultfd reports besides faults: a fork (with a new
/// userfaultfd for the child), mremap, MADV_DONTNEED/REMOVE, munmap.
pub const UFFD_FEATURE_EVENTS: u64 = (1 << 1) | (1 << 2) | (1 << 3) | (1 << 6);
pub const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
pub const UFFD_EVENT_FORK: u8 = 0x13;
pub const UFFD_EVENT_REMAP: u8 = 0x14;
pub const UFFD_EVENT_REMOVE: u8 = 0x15;
pub const UFFD_EVENT_UNMAP: u8 = 0x16;

/// One UFFDIO_COPY: the bytes copied before it stopped, and why it stopped
/// short (EEXIST at a page already there, EAGAIN while the address space
/// changes, ENOENT where nothing is mapped, ESRCH once the process is gone).
pub fn uffd_copy_some(uffd: std::os::fd::RawFd, dst: u64, src: &[u8]) -> (u64, Option<io::Error>) {
    let mut arg = [dst, src.as_ptr() as u64, src.len() as u64, 0u64, 0u64];
    // SAFETY: UFFDIO_COPY reads one struct uffdio_copy (five u64), which
    // `arg` is, writes its last field, and reads `len` bytes at `src`,
    // which the slice holds.
    let r = unsafe { libc::ioctl(uffd, UFFDIO_COPY, arg.as_mut_ptr()) };
    if r == 0 {
        return (src.len() as u64, None);
    }
    let e = io::Error::last_os_error();
    let copied = u64::try_from(arg[4] as i64).unwrap_or(0);
    (copied, Some(e))
}

/// Maps the zero page at `[start, start + len)`, waking what waits there.
pub fn uffd_zeropage(uffd: std::os::fd::RawFd, start: u64, len: u64) -> io::Result<()> {
    let mut arg = [start, len, 0u64, 0u64];
    // SAFETY: UFFDIO_ZEROPAGE reads one struct uffdio_zeropage (range, mode,
    // result: four u64), which `arg` is, and writes its last field.
    check(unsafe { libc::ioctl(uffd, UFFDIO_ZEROPAGE, arg.as_mut_ptr()) } as libc::c_long)?;
    Ok(())
}

/// Wakes the threads waiting for a fault in `[start, start + len)`.
pub fn uffd_wake(uffd: std::os::fd::RawFd, start: u64, len: u64) -> io::Result<()> {
    let mut range = [start, len];
    // SAFETY: UFFDIO_WAKE reads one struct uffdio_range (two u64), which
    // `range` is.
    check(unsafe { libc::ioctl(uffd, UFFDIO_WAKE, range.as_mut_ptr()) } as libc::c_long)?;
    Ok(())
}

/// Reads the messages waiting on a non-blocking userfaultfd (struct
/// uffd_msg, 32 bytes each: event, then its arguments as u64 from byte 8).
pub fn uffd_read_msgs(uffd: std::os::fd::RawFd) -> io::Result<Vec<(u8, [u64; 3])>> {
    let mut out = Vec::new();
    loop {
        let mut buf = [0u8; 32 * 16];
        // SAFETY: reads at most buf.len() bytes into buf.
        let n = unsafe { libc::read(uffd, buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EAGAIN) {
                return Ok(out);
            }
            return Err(e);
        }
        if n == 0 {
            return Ok(out);
        }
        for m in buf[..n as usize].chunks_exact(32) {
            let word = |i: usize| u64::from_ne_bytes(m[i..i + 8].try_into().expect("8 bytes"));
            out.push((m[0], [word(8), word(16), word(24)]));
        }
    }
}

/// Whether this kernel offers asynchronous write-protection and
/// PAGEMAP_SCAN, tried on this process.
pub fn uffd_probe() -> io::Result<()> {
    use std::os::fd::FromRawFd;
    // SAFETY: userfaultfd takes flags and returns a new fd we own.
    let fd = check(unsafe {
        libc::syscall(
            libc::SYS_userfaultfd,
            libc::O_CLOEXEC | libc::O_NONBLOCK | 1, // UFFD_USER_MODE_ONLY
        )
    })? as i32;
    // SAFETY: fd was just returned to us and nothing else owns it.
    let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    uffd_api(std::os::fd::AsRawFd::as_raw_fd(&fd))?;
    let pagemap = std::fs::File::open("/proc/self/pagemap")?;
    let probe = [0u8; 4096];
    let at = probe.as_ptr() as u64 & !4095;
    pagemap_scan(
        std::os::fd::AsRawFd::as_raw_fd(&pagemap),
        at,
        at + 4096,
        0,
        0,
        0,
        0,
        0,
    )?;
    Ok(())
}

pub fn uffd_register_wp(uffd: std::os::fd::RawFd, start: u64, len: u64) -> io::Result<()> {
    let mut reg = [start, len, UFFDIO_REGISTER_MODE_WP, 0u64];
    // SAFETY: UFFDIO_REGISTER reads and writes one struct uffdio_register
    // (range, mode, ioctls: four u64), which `reg` is.
    check(unsafe { libc::ioctl(uffd, UFFDIO_REGISTER, reg.as_mut_ptr()) } as libc::c_long)?;
    Ok(())
}

/// One PAGEMAP_SCAN call over `[start, end)`: the matching regions (start,
/// end) and where the walk stopped (it stops early when the output is full).
#[allow(clippy::too_many_arguments)]
pub fn pagemap_scan(
    pagemap: std::os::fd::RawFd,
    start: u64,
    end: u64,
    flags: u64,
    inverted: u64,
    mask: u64,
    anyof: u64,
    ret: u64,
) -> io::Result<(Vec<(u64, u64)>, u64)> {
    const CAP: usize = 4096;
    let mut regions = vec![[0u64; 3]; CAP];
    let mut arg = [
        96u64, // size of struct pm_scan_arg
        flags,
        start,
        end,
        0, // walk_end (out)
        regions.as_mut_ptr() as u64,
        CAP as u64,
        0, // max_pages: no limit
        inverted,
        mask,
        anyof,
        ret,
    ];
    // SAFETY: PAGEMAP_SCAN reads one struct pm_scan_arg (twelve u64, `arg`)
    // and writes at most vec_len struct page_region (three u64 each) into
    // the vector it points to, which has room for CAP of them.
    let n = check(unsafe { libc::ioctl(pagemap, PAGEMAP_SCAN, arg.as_mut_ptr()) } as libc::c_long)?
        as usize;
    let walk_end = arg[4];
    Ok((
        regions[..n.min(CAP)].iter().map(|r| (r[0], r[1])).collect(),
        walk_end,
    ))
}

/// The values of the `n` semaphores of set `id` in the calling thread's
/// IPC namespace.
pub fn sem_values(id: i32, n: usize) -> io::Result<Vec<u16>> {
    let mut values = vec![0u16; n.max(1)];
    // SAFETY: GETALL writes one unsigned short per semaphore of the set
    // (`n`, as its IPC_STAT told) into the array passed as the fourth
    // argument (a `union semun` whose member is that pointer).
    let r = unsafe { libc::semctl(id, 0, libc::GETALL, values.as_mut_ptr()) };
    check(r.into())?;
    values.truncate(n);
    Ok(values)
}

/// The file behind SysV segment `id` (of `size` bytes) of the calling
/// thread's IPC namespace, to read its contents by: the segment is
/// attached read-only for as long as it takes to open the file of the
/// mapping, then detached (the open file keeps the segment's memory).
pub fn shm_file(id: i32, size: u64) -> io::Result<std::fs::File> {
    // SAFETY: attaches at an address the kernel picks, read-only: no
    // memory of ours is touched or given away.
    let addr = unsafe { libc::shmat(id, std::ptr::null(), libc::SHM_RDONLY) };
    if addr as isize == -1 {
        return Err(io::Error::last_os_error());
    }
    let start = addr as u64;
    let end = start + size.max(1).next_multiple_of(crate::procfs::PAGE_SIZE);
    let opened = std::fs::File::open(format!("/proc/self/map_files/{start:x}-{end:x}"));
    // SAFETY: `addr` is the attachment just made, used by nothing else.
    check(unsafe { libc::shmdt(addr) }.into())?;
    opened
}

/// The byte limit of message queue `id` in the calling thread's IPC
/// namespace (`msg_qbytes`).
pub fn msg_queue_limit(id: i32) -> io::Result<u64> {
    // SAFETY: a zeroed msqid_ds is valid; IPC_STAT fills it.
    let mut ds: libc::msqid_ds = unsafe { mem::zeroed() };
    // SAFETY: `ds` is a msqid_ds the call may write.
    check(unsafe { libc::msgctl(id, libc::IPC_STAT, &mut ds) }.into())?;
    Ok(ds.msg_qbytes)
}

/// A copy of message `index` of queue `id` (0 the oldest), left in the
/// queue (`MSG_COPY`): its type and text, at most `room` bytes of it.
pub fn msg_copy(id: i32, index: usize, room: usize) -> io::Result<(i64, Vec<u8>)> {
    const MSG_COPY: libc::c_int = 0o40000;
    let mut buf = vec![0u8; mem::size_of::<libc::c_long>() + room];
    // SAFETY: the buffer holds the type (a long) and `room` bytes of text,
    // as msgrcv writes them; MSG_COPY with IPC_NOWAIT takes nothing off
    // the queue.
    let n = unsafe {
        libc::msgrcv(
            id,
            buf.as_mut_ptr().cast(),
            room,
            index as libc::c_long,
            libc::IPC_NOWAIT | MSG_COPY,
        )
    };
    let n = check(n as libc::c_long)? as usize;
    let (ty, text) = buf.split_at(mem::size_of::<libc::c_long>());
    let ty = libc::c_long::from_ne_bytes(ty.try_into().expect("a long's bytes"));
    Ok((ty, text[..n].to_vec()))
}

/// The bytes of a `T` (a plain C struct of the kernel's interface).
fn struct_bytes<T: Copy>(v: &T) -> Vec<u8> {
    // SAFETY: `v` is a valid `T` of `size_of::<T>()` bytes, read once as
    // bytes; the structs given here are made from zeroed memory, so their
    // padding is zero too.
    unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), mem::size_of::<T>()) }
        .to_vec()
}

/// The `semid_ds` whose owner and mode `IPC_SET` gives a semaphore set.
pub fn semid_ds_to_set(uid: u32, gid: u32, mode: u32) -> Vec<u8> {
    // SAFETY: all zeroes is a valid semid_ds.
    let mut ds: libc::semid_ds = unsafe { mem::zeroed() };
    ds.sem_perm.uid = uid;
    ds.sem_perm.gid = gid;
    ds.sem_perm.mode = (mode & 0o777) as libc::c_ushort;
    struct_bytes(&ds)
}

/// The `msqid_ds` whose owner, mode and byte limit `IPC_SET` gives a
/// message queue.
pub fn msqid_ds_to_set(uid: u32, gid: u32, mode: u32, max_bytes: u64) -> Vec<u8> {
    // SAFETY: all zeroes is a valid msqid_ds.
    let mut ds: libc::msqid_ds = unsafe { mem::zeroed() };
    ds.msg_perm.uid = uid;
    ds.msg_perm.gid = gid;
    ds.msg_perm.mode = (mode & 0o777) as libc::c_ushort;
    ds.msg_qbytes = max_bytes;
    struct_bytes(&ds)
}

/// The limits and count of POSIX message queue `fd`: (most messages,
/// largest message, messages queued).
pub fn mq_attr(fd: std::os::fd::BorrowedFd) -> io::Result<(i64, i64, i64)> {
    use std::os::fd::AsRawFd;
    // SAFETY: a zeroed mq_attr is valid; the call fills it and reads no
    // new attributes (null).
    let mut attr: libc::mq_attr = unsafe { mem::zeroed() };
    // SAFETY: as above; `attr` outlives the call.
    check(unsafe {
        libc::syscall(
            libc::SYS_mq_getsetattr,
            fd.as_raw_fd(),
            std::ptr::null::<libc::mq_attr>(),
            &mut attr as *mut libc::mq_attr,
        )
    })?;
    Ok((attr.mq_maxmsg, attr.mq_msgsize, attr.mq_curmsgs))
}

/// Who asked POSIX message queue `fd` for a notification (`mq_notify`),
/// as the queue's status text says ("QSIZE:5 NOTIFY:0 SIGNO:0
/// NOTIFY_PID:0"); 0 for no one. Read at offset 0, the file's own left.
pub fn mq_notify_pid(fd: std::os::fd::BorrowedFd) -> io::Result<i32> {
    let mut buf = [0u8; 256];
    let n = nix::sys::uio::pread(fd, &mut buf, 0)?;
    let text = String::from_utf8_lossy(&buf[..n]);
    text.split_whitespace()
        .find_map(|w| w.strip_prefix("NOTIFY_PID:"))
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| io::Error::other(format!("an unknown queue status: {text:?}")))
}

/// The next message of POSIX message queue `fd` (opened `O_NONBLOCK`),
/// whose messages are at most `size` bytes: its priority and text.
pub fn mq_receive(fd: std::os::fd::BorrowedFd, size: usize) -> io::Result<(u32, Vec<u8>)> {
    use std::os::fd::AsRawFd;
    let mut buf = vec![0u8; size.max(1)];
    let mut priority: libc::c_uint = 0;
    // SAFETY: the buffer holds `size` bytes, as the queue's largest
    // message; no timeout (the fd does not block).
    let n = check(unsafe {
        libc::syscall(
            libc::SYS_mq_timedreceive,
            fd.as_raw_fd(),
            buf.as_mut_ptr(),
            buf.len(),
            &mut priority as *mut libc::c_uint,
            std::ptr::null::<libc::timespec>(),
        )
    })?;
    buf.truncate(n as usize);
    Ok((priority, buf))
}

/// Sends `text` with `priority` to POSIX message queue `fd`.
pub fn mq_send(fd: std::os::fd::BorrowedFd, priority: u32, text: &[u8]) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: the call reads `text.len()` bytes of `text`; no timeout.
    check(unsafe {
        libc::syscall(
            libc::SYS_mq_timedsend,
            fd.as_raw_fd(),
            text.as_ptr(),
            text.len(),
            priority as libc::c_uint,
            std::ptr::null::<libc::timespec>(),
        )
    })
    .map(drop)
}

/// Opens POSIX message queue `name` ("/name") of the calling thread's IPC
/// namespace with `flags` (access mode, `O_NONBLOCK`), close-on-exec;
/// with `create`, makes it (it must not exist) with these
/// limits, readable and writable by its owner alone.
pub fn mq_open(
    name: &str,
    flags: libc::c_int,
    create: Option<(i64, i64)>,
) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    let bare = queue_name(name)?;
    // SAFETY: a zeroed mq_attr is valid.
    let mut attr: libc::mq_attr = unsafe { mem::zeroed() };
    // Close-on-exec set apart: given to mq_open, it would stay in the
    // description's flags, which a queue opened without it lacks.
    let mut flags = flags & (libc::O_ACCMODE | libc::O_NONBLOCK);
    if let Some((max_messages, message_size)) = create {
        attr.mq_maxmsg = max_messages;
        attr.mq_msgsize = message_size;
        flags |= libc::O_CREAT | libc::O_EXCL;
    }
    // SAFETY: the name is a C string and `attr` a valid mq_attr, both
    // outliving the call (the kernel takes a name without its slash).
    let fd = check(unsafe {
        libc::syscall(
            libc::SYS_mq_open,
            bare.as_ptr(),
            flags,
            0o600 as libc::mode_t,
            &attr as *const libc::mq_attr,
        )
    })?;
    // SAFETY: mq_open returned a new fd we own.
    let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) };
    nix::fcntl::fcntl(
        &fd,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    )?;
    Ok(fd)
}

/// Removes the name of POSIX message queue `name` ("/name") in the calling
/// thread's IPC namespace.
pub fn mq_unlink(name: &str) -> io::Result<()> {
    let bare = queue_name(name)?;
    // SAFETY: the name is a C string outliving the call.
    check(unsafe { libc::syscall(libc::SYS_mq_unlink, bare.as_ptr()) }).map(drop)
}

/// Queue name `name` ("/name") as the system calls take it: without its
/// slash.
fn queue_name(name: &str) -> io::Result<std::ffi::CString> {
    std::ffi::CString::new(name.trim_start_matches('/'))
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

#[cfg(test)]
mod tests {
    use super::Ending;

    #[test]
    fn wait_statuses_a_process_can_end_with_are_told_apart_from_the_rest() {
        assert_eq!(Ending::of_status(0x700), Some(Ending::Exit(7)));
        assert_eq!(Ending::of_status(0), Some(Ending::Exit(0)));
        assert_eq!(
            Ending::of_status(libc::SIGTERM),
            Some(Ending::Signal {
                signal: libc::SIGTERM,
                core: false
            })
        );
        assert_eq!(
            Ending::of_status(0x80 | libc::SIGSEGV),
            Some(Ending::Signal {
                signal: libc::SIGSEGV,
                core: true
            })
        );
        // Stopped, continued, ignored by default, out of range.
        for bad in [
            0x137f,
            0xffff,
            libc::SIGCHLD,
            libc::SIGSTOP,
            65,
            -1,
            0x10000,
            0x105,
        ] {
            assert_eq!(Ending::of_status(bad), None, "{bad:#x}");
        }
    }
}

/// Calls on pseudo-terminals and terminals: each an `ioctl` of an int, a
/// struct given as bytes, or nothing.
pub mod tty {
    use std::io;
    use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

    use super::{check, ioctl_int};
    use crate::image::Pty;

    /// A master's number (`TIOCGPTN`).
    pub fn index(master: BorrowedFd<'_>) -> io::Result<u32> {
        ioctl_int(master, libc::TIOCGPTN as libc::c_ulong).map(|n| n as u32)
    }

    /// A new description of a master's terminal (`TIOCGPTPEER`), with
    /// `flags` (access mode, `O_NONBLOCK`); never a controlling terminal.
    /// Not `O_CLOEXEC`, which the kernel would keep among its status
    /// flags.
    pub fn peer(master: BorrowedFd<'_>, flags: i32) -> io::Result<OwnedFd> {
        let flags = flags & (libc::O_ACCMODE | libc::O_NONBLOCK) | libc::O_NOCTTY;
        // SAFETY: TIOCGPTPEER takes its flags by value and returns a new fd.
        let fd = unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCGPTPEER, flags) };
        check(fd as libc::c_long)?;
        // SAFETY: the fd was just made for us and nothing else owns it.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    /// A struct of `len` bytes that `request` writes (`TCGETS2`,
    /// `TIOCGWINSZ`).
    fn get_struct(fd: BorrowedFd<'_>, request: libc::c_ulong, len: usize) -> io::Result<Vec<u8>> {
        let mut b = vec![0u8; len];
        // SAFETY: the requests passed here write one struct of `len`
        // bytes, the size of `b`.
        let r = unsafe { libc::ioctl(fd.as_raw_fd(), request, b.as_mut_ptr()) };
        check(r as libc::c_long)?;
        Ok(b)
    }

    /// Gives `request` (`TCSETS2`, `TIOCSWINSZ`) the struct `bytes`, which
    /// must be `len` bytes long.
    fn set_struct(
        fd: BorrowedFd<'_>,
        request: libc::c_ulong,
        len: usize,
        bytes: &[u8],
    ) -> io::Result<()> {
        if bytes.len() != len {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        }
        // SAFETY: the requests passed here read one struct of `len` bytes,
        // which `bytes` is.
        let r = unsafe { libc::ioctl(fd.as_raw_fd(), request, bytes.as_ptr()) };
        check(r as libc::c_long)?;
        Ok(())
    }

    /// `struct termios2` (`TCGETS2`).
    pub fn termios(fd: BorrowedFd<'_>) -> io::Result<Vec<u8>> {
        get_struct(fd, libc::TCGETS2, Pty::TERMIOS)
    }

    /// Sets `struct termios2` (`TCSETS2`: at once, nothing flushed).
    pub fn set_termios(fd: BorrowedFd<'_>, t: &[u8]) -> io::Result<()> {
        set_struct(fd, libc::TCSETS2, Pty::TERMIOS, t)
    }

    /// Writes `output` through the terminal `fd` with output processing
    /// (`OPOST`) off, as it was processed once already, then sets its
    /// `termios` back.
    pub fn write_unprocessed(fd: BorrowedFd<'_>, termios: &[u8], output: &[u8]) -> io::Result<()> {
        use std::io::Write;
        let mut raw = termios.to_vec();
        // c_oflag is the second u32 of struct termios2.
        let oflag = u32::from_ne_bytes(raw[4..8].try_into().expect("4 bytes"));
        raw[4..8].copy_from_slice(&(oflag & !libc::OPOST).to_ne_bytes());
        set_termios(fd, &raw)?;
        let written = std::fs::File::from(fd.try_clone_to_owned()?).write_all(output);
        set_termios(fd, termios)?;
        written
    }

    /// Whether `termios` (a `struct termios2`) is in canonical mode: its
    /// input read a line at a time, put together by the line discipline.
    pub fn canonical(termios: &[u8]) -> bool {
        // c_lflag is the fourth u32 of struct termios2.
        let lflag = u32::from_ne_bytes(termios[12..16].try_into().expect("4 bytes"));
        lflag & libc::ICANON != 0
    }

    /// Writes `input` to `master` as its terminal's unread input, the line
    /// discipline's input processing (translations, flow control,
    /// signals, echo) off for the while (`termios` taken for it and then
    /// set back, if it had any), so that it reads as it was read: byte for
    /// byte in non-canonical mode (the caller's only use).
    pub fn write_input(master: BorrowedFd<'_>, termios: &[u8], input: &[u8]) -> io::Result<()> {
        use std::io::Write;
        let word = |at: usize| u32::from_ne_bytes(termios[at..at + 4].try_into().expect("4 bytes"));
        let (iflag, lflag) = (word(0), word(12));
        let iflag_off = libc::ICRNL
            | libc::INLCR
            | libc::IGNCR
            | libc::IUCLC
            | libc::ISTRIP
            | libc::IXON
            | libc::IXOFF;
        let lflag_off =
            libc::ECHO | libc::ECHOE | libc::ECHOK | libc::ECHONL | libc::ISIG | libc::IEXTEN;
        let mut raw = termios.to_vec();
        raw[0..4].copy_from_slice(&(iflag & !iflag_off).to_ne_bytes());
        raw[12..16].copy_from_slice(&(lflag & !lflag_off).to_ne_bytes());
        let changed = raw != termios;
        if changed {
            set_termios(master, &raw)?;
        }
        let written = std::fs::File::from(master.try_clone_to_owned()?).write_all(input);
        if changed {
            set_termios(master, termios)?;
        }
        written
    }

    /// `struct winsize` (`TIOCGWINSZ`).
    pub fn winsize(fd: BorrowedFd<'_>) -> io::Result<Vec<u8>> {
        get_struct(fd, libc::TIOCGWINSZ, Pty::WINSIZE)
    }

    pub fn set_winsize(fd: BorrowedFd<'_>, w: &[u8]) -> io::Result<()> {
        set_struct(fd, libc::TIOCSWINSZ, Pty::WINSIZE, w)
    }

    /// A master's packet mode, lock, and its terminal's exclusive mode
    /// (`TIOCGPKT`, `TIOCGPTLCK`, `TIOCGEXCL`).
    pub fn modes(master: BorrowedFd<'_>) -> io::Result<(bool, bool, bool)> {
        let get = |req| ioctl_int(master, req as libc::c_ulong).map(|v| v != 0);
        Ok((
            get(libc::TIOCGPKT)?,
            get(libc::TIOCGPTLCK)?,
            get(libc::TIOCGEXCL)?,
        ))
    }

    /// Sets packet mode or the lock (`TIOCPKT`, `TIOCSPTLCK`).
    pub fn set_mode(master: BorrowedFd<'_>, request: libc::c_ulong, on: bool) -> io::Result<()> {
        let v: libc::c_int = on.into();
        // SAFETY: TIOCPKT and TIOCSPTLCK read one int through the pointer.
        let r = unsafe { libc::ioctl(master.as_raw_fd(), request, &v) };
        check(r as libc::c_long)?;
        Ok(())
    }

    /// Makes the terminal exclusive (`TIOCEXCL`).
    pub fn set_exclusive(fd: BorrowedFd<'_>) -> io::Result<()> {
        // SAFETY: TIOCEXCL takes no argument.
        let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCEXCL) };
        check(r as libc::c_long)?;
        Ok(())
    }

    /// Bytes waiting to be read (`FIONREAD`).
    pub fn queued(fd: BorrowedFd<'_>) -> io::Result<usize> {
        ioctl_int(fd, libc::FIONREAD as libc::c_ulong).map(|n| n.max(0) as usize)
    }

    /// The foreground process group (`TIOCGPGRP`; 0: none), as our pid
    /// namespace numbers it.
    pub fn foreground(master: BorrowedFd<'_>) -> io::Result<i32> {
        ioctl_int(master, libc::TIOCGPGRP as libc::c_ulong)
    }
}

/// Whether the loopback interface of the calling thread's network
/// namespace is up.
pub fn loopback_up() -> io::Result<bool> {
    Ok(loopback_flags(None)? & libc::IFF_UP as i16 != 0)
}

/// Brings the loopback interface of the calling thread's network namespace
/// up.
pub fn set_loopback_up() -> io::Result<()> {
    let flags = loopback_flags(None)?;
    loopback_flags(Some(flags | libc::IFF_UP as i16)).map(|_| ())
}

/// The loopback interface's flags (`SIOCGIFFLAGS`), after setting them
/// to `set` (`SIOCSIFFLAGS`) if given.
fn loopback_flags(set: Option<i16>) -> io::Result<i16> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    // SAFETY: socket takes integers and returns a new fd or -1.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    check(fd.into())?;
    // SAFETY: the fd was just made for us and nothing else owns it.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // struct ifreq: the name (16 bytes), then a union whose first member
    // here is the flags (a short); 40 bytes in all.
    let mut req = [0u8; 40];
    req[..2].copy_from_slice(b"lo");
    let (request, flags) = match set {
        Some(f) => (libc::SIOCSIFFLAGS, f),
        None => (libc::SIOCGIFFLAGS, 0),
    };
    req[16..18].copy_from_slice(&flags.to_ne_bytes());
    // SAFETY: both requests read and write one struct ifreq, which `req`
    // is.
    let r = unsafe { libc::ioctl(sock.as_raw_fd(), request, req.as_mut_ptr()) };
    check(r.into())?;
    Ok(i16::from_ne_bytes([req[16], req[17]]))
}

/// `NS_GET_USERNS`, `NS_GET_PARENT` and `NS_GET_OWNER_UID` of
/// linux/nsfs.h: `_IO(0xb7, 1)`, `_IO(0xb7, 2)`, `_IO(0xb7, 4)`.
const NS_GET_USERNS: libc::c_ulong = 0xb701;
const NS_GET_PARENT: libc::c_ulong = 0xb702;
const NS_GET_OWNER_UID: libc::c_ulong = 0xb704;

/// The user namespace that owns namespace `ns` (for a user namespace: its
/// parent, with `parent`), open.
pub fn ns_owner(ns: std::os::fd::BorrowedFd<'_>, parent: bool) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::{AsRawFd, FromRawFd};
    let request = if parent { NS_GET_PARENT } else { NS_GET_USERNS };
    // SAFETY: these requests take no argument and return a new fd we own.
    let fd = check(unsafe { libc::ioctl(ns.as_raw_fd(), request) } as libc::c_long)? as i32;
    // SAFETY: fd was just returned to us and nothing else owns it.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
}

/// The uid (in the caller's user namespace) that made user namespace `ns`.
pub fn user_ns_owner_uid(ns: std::os::fd::BorrowedFd<'_>) -> io::Result<u32> {
    use std::os::fd::AsRawFd;
    let mut uid: libc::uid_t = 0;
    // SAFETY: NS_GET_OWNER_UID writes one uid_t through the pointer.
    check(unsafe { libc::ioctl(ns.as_raw_fd(), NS_GET_OWNER_UID, &mut uid) } as libc::c_long)?;
    Ok(uid)
}

/// Forks a child of ours, which ends with SIGCHLD to us (`clone3` with
/// no flags): 0 in the child, its pid in the parent, or -1.
///
/// # Safety
///
/// As for [`clone3`]: the child may make only raw system calls, on what
/// was made before the fork, and must end with `_exit`.
unsafe fn fork_raw() -> libc::c_long {
    let args = CloneArgs {
        exit_signal: libc::SIGCHLD as u64,
        ..Default::default()
    };
    // SAFETY: the caller keeps the child to what `clone3` asks.
    unsafe { clone3(&args) }
}

/// A child process of ours in a user namespace, waiting until
/// [`UserNsChild::finish`] (or its drop) ends it: alone in one it made,
/// for its maps to be written from outside and the namespace opened, or
/// in one it entered, for its maps to be read.
pub struct UserNsChild {
    pub pid: Pid,
    go: Option<std::os::fd::OwnedFd>,
}

/// A user namespace another is made in: open, with the uid and gid the
/// maker takes there (as it numbers them; the uid is the new namespace's
/// owner, and the new one's creator must have both mapped there).
#[derive(Clone, Copy)]
pub struct InParent<'a> {
    pub ns: std::os::fd::BorrowedFd<'a>,
    pub uid: u32,
    pub gid: u32,
}

impl UserNsChild {
    /// Starts one that makes a namespace, in ours with uid `owner`, or in
    /// `parent` with its ids there.
    pub fn make(owner: u32, parent: Option<InParent<'_>>) -> io::Result<UserNsChild> {
        use std::os::fd::AsRawFd;
        let parent = parent.map(|p| (p.ns.as_raw_fd(), p.uid, p.gid));
        // SAFETY: raw system calls on integers only.
        Self::start(&|| unsafe {
            let entered = match parent {
                None => libc::syscall(libc::SYS_setresuid, owner, owner, owner) == 0,
                Some((ns, uid, gid)) => {
                    libc::syscall(libc::SYS_setns, ns, libc::CLONE_NEWUSER) == 0
                        && libc::syscall(libc::SYS_setresgid, gid, gid, gid) == 0
                        && libc::syscall(libc::SYS_setresuid, uid, uid, uid) == 0
                }
            };
            // Its /proc files its own again (the uid change made them
            // root's), for its parent namespace to write its maps.
            entered
                && libc::prctl(libc::PR_SET_DUMPABLE, 1) == 0
                && libc::syscall(libc::SYS_unshare, libc::CLONE_NEWUSER) == 0
        })
    }

    /// Starts one that enters namespace `ns`, which no process of ours may
    /// be in, for its maps to be read through its /proc files.
    pub fn visit(ns: std::os::fd::BorrowedFd<'_>) -> io::Result<UserNsChild> {
        use std::os::fd::AsRawFd;
        let ns = ns.as_raw_fd();
        // SAFETY: a raw system call on integers.
        Self::start(&|| unsafe { libc::syscall(libc::SYS_setns, ns, libc::CLONE_NEWUSER) == 0 })
    }

    /// Forks the child, which takes `step` (raw system calls only: it runs
    /// in a copy of a process of many threads) and waits.
    fn start(step: &dyn Fn() -> bool) -> io::Result<UserNsChild> {
        use std::os::fd::AsRawFd;
        let (ready_r, ready_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
        let (go_r, go_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
        let (ready_w_raw, go_r_raw) = (ready_w.as_raw_fd(), go_r.as_raw_fd());
        // The child's copies of the parent's ends: closed, or its read
        // would never see the end of the pipe.
        let (ready_r_raw, go_w_raw) = (ready_r.as_raw_fd(), go_w.as_raw_fd());
        // SAFETY: the child makes only raw system calls (`step`'s, and on
        // integers and a byte of its own stack), then ends with _exit:
        // nothing of the parent's other threads (locks, allocator) is
        // touched.
        let ret = unsafe { fork_raw() };
        if ret == 0 {
            // SAFETY: as above; each call takes integers or a pointer to a
            // live local byte.
            unsafe {
                libc::close(ready_r_raw);
                libc::close(go_w_raw);
                let code = if step() {
                    let b = 1u8;
                    libc::write(ready_w_raw, (&raw const b).cast(), 1);
                    let mut b = 0u8;
                    // Until the parent closes its end.
                    libc::read(go_r_raw, (&raw mut b).cast(), 1);
                    0
                } else {
                    1
                };
                libc::_exit(code)
            }
        }
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut child = UserNsChild {
            pid: Pid::from_raw(ret as i32),
            go: Some(go_w),
        };
        drop(ready_w);
        drop(go_r);
        let mut b = [0u8; 1];
        match nix::unistd::read(&ready_r, &mut b) {
            Ok(1) => Ok(child),
            Ok(_) => {
                child.end();
                Err(io::Error::other(
                    "the process could not take its ids or enter or make the user namespace",
                ))
            }
            Err(e) => {
                child.end();
                Err(e.into())
            }
        }
    }

    /// Lets the child go and reaps it.
    fn end(&mut self) {
        self.go = None;
        let _ = nix::sys::wait::waitpid(self.pid, None);
    }

    pub fn finish(mut self) {
        self.end();
    }
}

impl Drop for UserNsChild {
    fn drop(&mut self) {
        if self.go.is_some() {
            self.end();
        }
    }
}

/// Writes `files` (at most 3, each a path and its text: a nested user
/// namespace's `setgroups`, `uid_map`, `gid_map` under /proc/PID) from user namespace
/// `parent`, where the kernel wants a namespace's maps written from (its
/// parent's, with CAP_SETUID there), by a child of ours that enters it and
/// takes file-system uid `fsuid` there (the files' owner's: the
/// namespace's creator's).
pub fn write_in_user_ns(
    parent: std::os::fd::BorrowedFd<'_>,
    fsuid: u32,
    files: &[(String, String)],
) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let files: Vec<(std::ffi::CString, &[u8])> = files
        .iter()
        .map(|(path, text)| {
            std::ffi::CString::new(path.as_str())
                .map(|c| (c, text.as_bytes()))
                .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
        })
        .collect::<io::Result<_>>()?;
    let ns = parent.as_raw_fd();
    // SAFETY: the child makes only raw system calls on integers and on
    // paths and texts made before the clone, then ends with _exit: nothing
    // of the parent's other threads (locks, allocator) is touched.
    let ret = unsafe { fork_raw() };
    if ret == 0 {
        // SAFETY: as above; each pointer is to memory of the child's own
        // copy, live until it ends.
        unsafe {
            // The exit code: 0, or 64 times the step that failed (0: the
            // entry, then each file's) and its errno (below 64).
            let fail = |step: i32| {
                let errno = (*libc::__errno_location()).clamp(1, 63);
                libc::_exit(step * 64 + errno)
            };
            if libc::syscall(libc::SYS_setns, ns, libc::CLONE_NEWUSER) != 0 {
                fail(0);
            }
            libc::syscall(libc::SYS_setfsuid, fsuid);
            for (i, (path, text)) in files.iter().enumerate() {
                let fd = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0
                    || libc::write(fd, text.as_ptr().cast(), text.len()) != text.len() as isize
                {
                    fail(1 + i as i32);
                }
                libc::close(fd);
            }
            libc::_exit(0)
        }
    }
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    let status = nix::sys::wait::waitpid(Pid::from_raw(ret as i32), None)?;
    match status {
        nix::sys::wait::WaitStatus::Exited(_, 0) => Ok(()),
        nix::sys::wait::WaitStatus::Exited(_, code) => {
            let what = match (code / 64) as usize {
                0 => "enter the parent namespace".to_string(),
                n => files
                    .get(n - 1)
                    .map_or("?".into(), |f| f.0.to_string_lossy().into_owned()),
            };
            let e = io::Error::from_raw_os_error(code % 64);
            Err(io::Error::other(format!("{what}: {e}")))
        }
        other => Err(io::Error::other(format!("the writer ended as {other:?}"))),
    }
}

/// Calls on TUN/TAP files (`/dev/net/tun`), and the making of a TUN/TAP
/// interface, in the calling thread's network namespace.
pub mod tun {
    use std::io;
    use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

    use super::{check, ioctl_int};

    /// A `struct ifreq` with `name` and `flags` (40 bytes: the name, then
    /// a union whose first member here is the flags, a short).
    fn ifreq(name: &str, flags: u16) -> [u8; 40] {
        let mut req = [0u8; 40];
        let n = name.len().min(15);
        req[..n].copy_from_slice(&name.as_bytes()[..n]);
        req[16..18].copy_from_slice(&flags.to_ne_bytes());
        req
    }

    /// The interface file `fd` is attached to and its flags (`TUNGETIFF`:
    /// the interface's, with `IFF_DETACH_QUEUE` for a queue detached from
    /// it and `IFF_NOFILTER`, the bit of `IFF_NO_PI`, for a file without
    /// a socket filter); `None` for a file attached to none.
    pub fn attached(fd: BorrowedFd<'_>) -> io::Result<Option<(String, u16)>> {
        let mut req = [0u8; 40];
        // SAFETY: TUNGETIFF writes one struct ifreq, which `req` is.
        let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNGETIFF, req.as_mut_ptr()) };
        match check(r.into()) {
            Err(e) if e.raw_os_error() == Some(libc::EBADFD) => return Ok(None),
            Err(e) => return Err(e),
            Ok(_) => {}
        }
        let len = req[..16].iter().position(|b| *b == 0).unwrap_or(16);
        let name = String::from_utf8_lossy(&req[..len]).into_owned();
        Ok(Some((name, u16::from_ne_bytes([req[16], req[17]]))))
    }

    /// The inode of the network namespace of the interface `fd` is
    /// attached to (`TUNGETDEVNETNS`).
    pub fn device_netns(fd: BorrowedFd<'_>) -> io::Result<u64> {
        use std::os::unix::fs::MetadataExt;
        // SAFETY: TUNGETDEVNETNS takes no argument and returns a new fd.
        let ns = check(unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNGETDEVNETNS) }.into())?;
        // SAFETY: the fd was just made for us and nothing else owns it.
        let ns = unsafe { OwnedFd::from_raw_fd(ns as i32) };
        Ok(std::fs::File::from(ns).metadata()?.ino())
    }

    /// Its send buffer (`TUNGETSNDBUF`).
    pub fn sndbuf(fd: BorrowedFd<'_>) -> io::Result<i32> {
        ioctl_int(fd, libc::TUNGETSNDBUF as libc::c_ulong)
    }

    /// Whether a TAP file has a socket filter attached (`TUNGETFILTER`
    /// copies its program's header, of length 0 without one).
    pub fn has_filter(fd: BorrowedFd<'_>) -> io::Result<bool> {
        let mut prog = libc::sock_fprog {
            len: 0,
            filter: std::ptr::null_mut(),
        };
        // SAFETY: TUNGETFILTER writes one struct sock_fprog, which `prog` is.
        let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNGETFILTER, &mut prog) };
        check(r.into())?;
        Ok(prog.len != 0)
    }

    /// A new file of the TUN/TAP device at `path` (attached to nothing),
    /// with access mode `access`; its interfaces go to the calling
    /// thread's network namespace.
    pub fn open(path: &str, access: i32) -> io::Result<OwnedFd> {
        use std::os::unix::fs::OpenOptionsExt;
        let f = std::fs::OpenOptions::new()
            .read(access != libc::O_WRONLY)
            .write(access != libc::O_RDONLY)
            .custom_flags(libc::O_CLOEXEC | libc::O_NOCTTY | libc::O_NONBLOCK)
            .open(path)?;
        Ok(f.into())
    }

    /// The index the next interface `fd` makes gets (`TUNSETIFINDEX`).
    pub fn set_index(fd: BorrowedFd<'_>, index: u32) -> io::Result<()> {
        // SAFETY: TUNSETIFINDEX reads one unsigned int through the pointer.
        check(unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFINDEX, &index) }.into())?;
        Ok(())
    }

    /// Attaches `fd` to interface `name`, made with `flags` if there is
    /// none (`TUNSETIFF`).
    pub fn attach(fd: BorrowedFd<'_>, name: &str, flags: u16) -> io::Result<()> {
        let mut req = ifreq(name, flags);
        // SAFETY: TUNSETIFF reads and writes one struct ifreq, which `req` is.
        check(unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, req.as_mut_ptr()) }.into())?;
        Ok(())
    }

    /// An ioctl of `fd`'s interface or queue taking its value as the
    /// argument itself: `TUNSETOWNER`, `TUNSETGROUP`, `TUNSETPERSIST`.
    pub fn set(fd: BorrowedFd<'_>, request: libc::Ioctl, value: u32) -> io::Result<()> {
        // SAFETY: these requests read no memory: the value is the argument.
        let r = unsafe { libc::ioctl(fd.as_raw_fd(), request, libc::c_ulong::from(value)) };
        check(r.into())?;
        Ok(())
    }

    /// Its interface's virtio-net header length (`TUNGETVNETHDRSZ`) and
    /// whether the header is little-endian whatever the machine
    /// (`TUNGETVNETLE`).
    pub fn vnet(fd: BorrowedFd<'_>) -> io::Result<(i32, bool)> {
        let size = ioctl_int(fd, libc::TUNGETVNETHDRSZ as libc::c_ulong)?;
        let le = ioctl_int(fd, libc::TUNGETVNETLE as libc::c_ulong)?;
        Ok((size, le != 0))
    }

    /// Sets its interface's virtio-net header length, endianness and
    /// offloads (`TUNSETVNETHDRSZ`, `TUNSETVNETLE`, `TUNSETOFFLOAD`).
    pub fn set_vnet(fd: BorrowedFd<'_>, size: i32, le: bool, offloads: u32) -> io::Result<()> {
        let le = libc::c_int::from(le);
        // SAFETY: TUNSETVNETHDRSZ and TUNSETVNETLE read one int through
        // the pointer; TUNSETOFFLOAD takes its value as the argument.
        unsafe {
            check(libc::ioctl(fd.as_raw_fd(), libc::TUNSETVNETHDRSZ, &size).into())?;
            check(libc::ioctl(fd.as_raw_fd(), libc::TUNSETVNETLE, &le).into())?;
            let offloads = libc::c_ulong::from(offloads);
            check(libc::ioctl(fd.as_raw_fd(), libc::TUNSETOFFLOAD, offloads).into())?;
        }
        Ok(())
    }

    /// Sets its send buffer (`TUNSETSNDBUF`).
    pub fn set_sndbuf(fd: BorrowedFd<'_>, size: i32) -> io::Result<()> {
        // SAFETY: TUNSETSNDBUF reads one int through the pointer.
        check(unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETSNDBUF, &size) }.into())?;
        Ok(())
    }
}

/// Reading a network interface's features (`SIOCETHTOOL`), in the calling
/// thread's network namespace.
pub mod ethtool {
    use std::io;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

    use super::check;

    const ETHTOOL_GSTRINGS: u32 = 0x1b;
    const ETHTOOL_GSSET_INFO: u32 = 0x37;
    const ETHTOOL_GFEATURES: u32 = 0x3a;
    const ETH_SS_FEATURES: u32 = 4;

    /// Runs ethtool command `buf` (its first word) on interface `name`
    /// through `sock`; the kernel writes its answer into `buf`.
    fn run(sock: &OwnedFd, name: &str, buf: &mut [u32]) -> io::Result<()> {
        // struct ifreq: the name (16 bytes), then a union whose member
        // here is a pointer to the command (ifr_data); 40 bytes in all.
        let mut req = [0u8; 40];
        let n = name.len().min(15);
        req[..n].copy_from_slice(&name.as_bytes()[..n]);
        req[16..24].copy_from_slice(&(buf.as_mut_ptr() as u64).to_ne_bytes());
        // SAFETY: SIOCETHTOOL reads the ifreq, and reads and writes the
        // command it points to, which `buf` holds whole: each command's
        // buffer is sized by the caller from the counts it announces.
        let r = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCETHTOOL, req.as_mut_ptr()) };
        check(r.into()).map(|_| ())
    }

    /// The names of the features interface `name` has on (`ethtool -k`
    /// calls them so: `tx-tcp-segmentation`...).
    pub fn active_features(name: &str) -> io::Result<Vec<String>> {
        // SAFETY: socket takes integers and returns a new fd or -1.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        check(fd.into())?;
        // SAFETY: the fd was just made for us and nothing else owns it.
        let sock = unsafe { OwnedFd::from_raw_fd(fd) };
        // struct ethtool_sset_info: cmd, reserved, a 64-bit mask of sets,
        // then one count per set asked for.
        let mut info = [ETHTOOL_GSSET_INFO, 0, 1 << ETH_SS_FEATURES, 0, 0, 0];
        run(&sock, name, &mut info)?;
        let count = info[4] as usize;
        if info[2] & (1 << ETH_SS_FEATURES) == 0 || count > 4096 {
            return Err(io::Error::other("no feature names"));
        }
        // struct ethtool_gstrings: cmd, set, count, then 32 bytes a name.
        let mut strings = vec![0u32; 3 + count * 8];
        strings[..3].copy_from_slice(&[ETHTOOL_GSTRINGS, ETH_SS_FEATURES, count as u32]);
        run(&sock, name, &mut strings)?;
        let bytes: Vec<u8> = strings[3..].iter().flat_map(|w| w.to_ne_bytes()).collect();
        // struct ethtool_gfeatures: cmd, blocks, then per 32 features
        // available, requested, active and never-changed words.
        let blocks = count.div_ceil(32);
        let mut features = vec![0u32; 2 + blocks * 4];
        features[..2].copy_from_slice(&[ETHTOOL_GFEATURES, blocks as u32]);
        run(&sock, name, &mut features)?;
        let active = |i: usize| features[2 + (i / 32) * 4 + 2] & (1 << (i % 32)) != 0;
        Ok((0..count)
            .filter(|&i| active(i))
            .map(|i| {
                let s = &bytes[i * 32..(i + 1) * 32];
                let len = s.iter().position(|b| *b == 0).unwrap_or(32);
                String::from_utf8_lossy(&s[..len]).into_owned()
            })
            .collect())
    }
}
