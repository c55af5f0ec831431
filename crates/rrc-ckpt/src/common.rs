//! What both halves of the engine use besides the mechanism modules: the
//! machine an image belongs to, the signal mask the engine's calls run
//! under, entering a process's namespaces, and cleaning up after a failed
//! checkpoint.

use std::fs::{self, File};
use std::os::unix::fs::FileExt;
use std::path::Path;

use nix::unistd::Pid;

use crate::image::CpuInfo;
use crate::{Error, Result, sys};

/// Every signal but SIGKILL and SIGSTOP, which cannot be blocked: while the
/// engine makes calls in a thread, no signal may be delivered to it.
pub const BLOCK_ALL: u64 = !((1 << (libc::SIGKILL - 1)) | (1 << (libc::SIGSTOP - 1)));

/// Bytes per write into an image file. Single writes of several MiB into
/// the page cache were often ten times slower here than the same bytes in
/// 1 MiB writes (docs/benchmarks.md, 2026-12-06).
pub(crate) const WRITE_PIECE: usize = 1 << 20;

/// Writes `data` into `f` at `at`, in pieces of [`WRITE_PIECE`].
pub(crate) fn write_at_in_pieces(f: &File, data: &[u8], at: u64) -> std::io::Result<()> {
    for (i, piece) in data.chunks(WRITE_PIECE).enumerate() {
        f.write_all_at(piece, at + (i * WRITE_PIECE) as u64)?;
    }
    Ok(())
}

/// `uname -r` of this machine.
pub fn kernel_release() -> String {
    nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The extended register state format of this machine, which an image
/// must match to be restored here.
pub fn cpu_info() -> CpuInfo {
    let (xsave_size, xcr0) = sys::xsave_layout();
    CpuInfo { xsave_size, xcr0 }
}

/// Removes the files of an image directory that was being written (it was
/// empty before), so that a failed checkpoint leaves nothing behind.
pub(crate) fn remove_image_files(dir: &Path) {
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            let _ = fs::remove_file(e.path());
        }
    }
}

/// A kind of namespace a thread of ours enters to see what a process of
/// the tree sees.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Ns {
    Net,
    Uts,
    Cgroup,
    Ipc,
    /// The namespace new children of the thread are made in.
    Pid,
}

impl Ns {
    /// Its name under `/proc/PID/ns`, its `setns` flag and what to call it.
    fn parts(self) -> (&'static str, nix::sched::CloneFlags, &'static str) {
        use nix::sched::CloneFlags as F;
        match self {
            Ns::Net => ("net", F::CLONE_NEWNET, "network namespace"),
            Ns::Uts => ("uts", F::CLONE_NEWUTS, "UTS namespace"),
            Ns::Cgroup => ("cgroup", F::CLONE_NEWCGROUP, "cgroup namespace"),
            Ns::Ipc => ("ipc", F::CLONE_NEWIPC, "IPC namespace"),
            Ns::Pid => ("pid", F::CLONE_NEWPID, "PID namespace"),
        }
    }
}

/// Runs `f` on a thread inside process `pid`'s namespace of kind `ns` (a
/// thread of its own, as `setns` changes only the calling thread's).
pub(crate) fn in_ns_of<T: Send>(pid: Pid, ns: Ns, f: impl FnOnce() -> T + Send) -> Result<T> {
    in_ns(&ns_file(pid, ns)?, ns, pid, f)
}

/// Process `pid`'s namespace of kind `ns`, open.
pub(crate) fn ns_file(pid: Pid, ns: Ns) -> Result<fs::File> {
    let (file, _, what) = ns.parts();
    fs::File::open(format!("/proc/{pid}/ns/{file}")).map_err(|e| Error::Proc {
        pid: pid.as_raw(),
        what,
        detail: e.to_string(),
    })
}

/// Runs `f` on a thread inside namespace `file` of kind `ns` (process
/// `pid`'s, for errors).
pub(crate) fn in_ns<T: Send>(
    file: &fs::File,
    ns: Ns,
    pid: Pid,
    f: impl FnOnce() -> T + Send,
) -> Result<T> {
    use std::os::fd::AsFd;
    let (_, flag, what) = ns.parts();
    std::thread::scope(|s| {
        s.spawn(|| {
            nix::sched::setns(file.as_fd(), flag).map_err(|e| Error::Proc {
                pid: pid.as_raw(),
                what,
                detail: format!("enter it: {e}"),
            })?;
            Ok(f())
        })
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}

/// Runs `f` on a thread that sees the files and network process `pid`
/// sees: its network and mount namespaces, its root and its working
/// directory. A unix socket's name is bound, connected to or sent to
/// there, where the process's own would be: never on the host's files on
/// an image's say-so. (The thread leaves the file system state it shares
/// with ours first, as entering a mount namespace requires.)
pub(crate) fn in_view_of<T: Send>(pid: Pid, f: impl FnOnce() -> T + Send) -> Result<T> {
    use nix::sched::CloneFlags as F;
    use std::os::fd::AsFd;
    let fail = |detail: String| Error::Proc {
        pid: pid.as_raw(),
        what: "file system view",
        detail,
    };
    let open = |what: &str| {
        fs::File::open(format!("/proc/{pid}/{what}")).map_err(|e| fail(format!("{what}: {e}")))
    };
    let (net, mnt, root, cwd) = (
        open("ns/net")?,
        open("ns/mnt")?,
        open("root")?,
        open("cwd")?,
    );
    std::thread::scope(|s| {
        s.spawn(|| {
            let step = |what: &str, r: nix::Result<()>| r.map_err(|e| fail(format!("{what}: {e}")));
            step(
                "enter its network namespace",
                nix::sched::setns(net.as_fd(), F::CLONE_NEWNET),
            )?;
            step(
                "leave our file system state",
                nix::sched::unshare(F::CLONE_FS),
            )?;
            step(
                "enter its mount namespace",
                nix::sched::setns(mnt.as_fd(), F::CLONE_NEWNS),
            )?;
            step("go to its root", nix::unistd::fchdir(root.as_fd()))?;
            step("make that the root", nix::unistd::chroot("."))?;
            step(
                "go to its working directory",
                nix::unistd::fchdir(cwd.as_fd()),
            )?;
            Ok(f())
        })
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}

/// [`in_ns_of`] the network namespace.
pub(crate) fn in_netns_of<T: Send>(pid: Pid, f: impl FnOnce() -> T + Send) -> Result<T> {
    in_ns_of(pid, Ns::Net, f)
}

/// A signal whose default action ends the process, and which the engine
/// can deliver again (a zombie killed by it is restored by it).
pub fn is_fatal_signal(sig: i32) -> bool {
    use nix::sys::signal::Signal::*;
    matches!(
        nix::sys::signal::Signal::try_from(sig),
        Ok(SIGHUP
            | SIGINT
            | SIGQUIT
            | SIGILL
            | SIGTRAP
            | SIGABRT
            | SIGBUS
            | SIGFPE
            | SIGKILL
            | SIGUSR1
            | SIGSEGV
            | SIGUSR2
            | SIGPIPE
            | SIGALRM
            | SIGTERM
            | SIGSTKFLT
            | SIGXCPU
            | SIGXFSZ
            | SIGVTALRM
            | SIGPROF
            | SIGIO
            | SIGPWR
            | SIGSYS)
    )
}
