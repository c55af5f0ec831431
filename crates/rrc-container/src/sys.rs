//! Raw process creation for containers: the only `unsafe` code in this crate.

use std::io;

use nix::unistd::Pid;

/// `struct clone_args` of clone3(2), as of Linux 5.7.
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

/// Forks with `flags` (namespace flags such as `CLONE_NEWPID`), the way
/// fork(2) does: returns `Some(child)` in the parent and `None` in the child,
/// which continues on a copy of the caller's stack. The child sends SIGCHLD
/// when it exits.
///
/// # Safety
///
/// The calling process must have a single thread (as for fork(2) in a
/// program that then allocates or takes locks). In the child, glibc's cached
/// thread id still names the parent's thread, so the child must not use
/// pthread functions that rely on it (`raise`, `pthread_kill`, error-checking
/// mutexes) before it calls `exec` or `_exit`.
pub unsafe fn fork_into_namespaces(flags: libc::c_int) -> io::Result<Option<Pid>> {
    let args = CloneArgs {
        flags: flags as u64,
        exit_signal: libc::SIGCHLD as u64,
        ..Default::default()
    };
    // SAFETY: clone3 with no stack behaves as fork(2); `args` is a valid
    // clone_args of the size we pass. Single-threadedness is the caller's
    // contract (see above).
    let ret = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            &args as *const CloneArgs,
            std::mem::size_of::<CloneArgs>(),
        )
    };
    match ret {
        r if r < 0 => Err(io::Error::last_os_error()),
        0 => Ok(None),
        child => Ok(Some(Pid::from_raw(child as i32))),
    }
}

/// Ends the calling process at once, without running atexit handlers or
/// flushing stdio buffers that belong to the parent's copy.
pub fn exit_now(code: i32) -> ! {
    // SAFETY: _exit has no preconditions; it never returns.
    unsafe { libc::_exit(code) }
}

/// The file mode creation mask rrc was started with, for the programs it
/// starts.
static PROGRAM_UMASK: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0o022);

/// Makes what this process creates private to its owner (mask 077): rrc
/// writes process memory (images), logs of what a program read, keys and
/// state, none of it for other users to read. Programs started in
/// containers get the mask the process had before.
pub fn private_files() {
    // SAFETY: umask has no memory effects; it cannot fail.
    let before = unsafe { libc::umask(0o077) };
    PROGRAM_UMASK.store(before, std::sync::atomic::Ordering::Relaxed);
}

/// In a container's first process, before it runs the program: the mask
/// rrc was started with.
pub(crate) fn program_umask() {
    let mask = PROGRAM_UMASK.load(std::sync::atomic::Ordering::Relaxed);
    // SAFETY: as in `private_files`.
    unsafe { libc::umask(mask) };
}

/// Restores the default action of SIGPIPE (Rust's runtime ignores it):
/// a command whose output pipe closes ends quietly, as shell tools do.
pub fn default_sigpipe() {
    // SAFETY: installing the default disposition runs no handler code.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// Installs `filters` (seccomp's classic BPF programs, in order) on the
/// calling thread, without setting no_new_privs: the caller must have
/// CAP_SYS_ADMIN, as a container's first process has until its exec.
/// Only system calls: callable between fork and exec.
pub fn install_seccomp(filters: &[seccompiler::BpfProgram]) -> io::Result<()> {
    const SECCOMP_SET_MODE_FILTER: libc::c_ulong = 1;
    for f in filters {
        let prog = libc::sock_fprog {
            len: f.len() as u16,
            // seccompiler's sock_filter has the kernel's layout.
            filter: f.as_ptr() as *mut libc::sock_filter,
        };
        // SAFETY: `prog` points at `f`'s instructions, which outlive the
        // call; the kernel copies them.
        let r = unsafe {
            libc::syscall(
                libc::SYS_seccomp,
                SECCOMP_SET_MODE_FILTER,
                0 as libc::c_ulong,
                &prog as *const libc::sock_fprog,
            )
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Makes the mount at `path` and every mount below it read-only
/// (`mount_setattr` with `AT_RECURSIVE`, Linux 5.12). Only a system call.
pub(crate) fn read_only_tree(path: &std::ffi::CStr) -> nix::Result<()> {
    /// `struct mount_attr`.
    #[repr(C)]
    struct MountAttr {
        attr_set: u64,
        attr_clr: u64,
        propagation: u64,
        userns_fd: u64,
    }
    const MOUNT_ATTR_RDONLY: u64 = 0x1;
    let attr = MountAttr {
        attr_set: MOUNT_ATTR_RDONLY,
        attr_clr: 0,
        propagation: 0,
        userns_fd: 0,
    };
    // SAFETY: `path` is NUL-terminated and `attr` a valid mount_attr of
    // the size passed; the kernel only reads both.
    let r = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            libc::AT_FDCWD,
            path.as_ptr(),
            libc::AT_RECURSIVE,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if r != 0 {
        return Err(nix::errno::Errno::last());
    }
    Ok(())
}
