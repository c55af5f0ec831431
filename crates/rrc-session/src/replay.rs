//! Replaying a recording: from a checkpoint taken while the program was
//! recorded, or from the program's start.
//!
//! From a checkpoint, a working copy of the image is marked so that the
//! program restored from it replays (the rings' sequence counter gets the
//! replay bit, the rings' descriptor becomes a file holding librrc's
//! configuration, threads caught waiting for input are made to return
//! from the call, standard output and error that were the original's log
//! file become the restorer's own); restoring the copy is the caller's
//! (a container launch).

use std::ffi::{CString, OsString};
use std::os::fd::OwnedFd;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};

use rrc_ckpt::edit::{ImageEdit, WorkingCopy};
use rrc_rr::interface::ReplayConfig;
use rrc_rr::log::thread_log_ids;

use crate::recording::{RecordingAnnotation, RecordingDir, check_recordable, rings_at};
use crate::{Error, Result, io};

/// How to replay.
#[derive(Debug, Clone)]
pub struct ReplayOptions {
    /// The log directory.
    pub log: PathBuf,
    /// Force the recorded global order of returns.
    pub order: bool,
    /// Wait for the recorded time between returns.
    pub timing: bool,
    /// End the program once every record is replayed.
    pub stop_at_end: bool,
    /// Where what the program writes to replayed connections goes.
    pub capture: Option<PathBuf>,
    /// The last record to replay (a log whose tail is not to be).
    pub until: Option<u64>,
    /// A takeover: threads park at the end of the log and take their
    /// rebuilt connections from this socket (see
    /// `rrc_rr::interface::TakeoverLine`).
    pub takeover: Option<PathBuf>,
    /// Count the first record replayed as a divergence (tests of what
    /// follows one).
    pub inject_divergence: bool,
}

impl ReplayOptions {
    /// Replays `log` with the recorded order and timing, no capture, not
    /// stopping at the end.
    pub fn new(log: &Path) -> ReplayOptions {
        ReplayOptions {
            log: log.to_path_buf(),
            order: true,
            timing: true,
            stop_at_end: false,
            capture: None,
            until: None,
            takeover: None,
            inject_divergence: false,
        }
    }

    /// The thread logs of the log directory (there must be some).
    fn thread_logs(&self) -> Result<Vec<u32>> {
        let ids = thread_log_ids(&self.log)?;
        if ids.is_empty() {
            return Err(Error::NotARecording {
                dir: self.log.clone(),
                why: "it holds no thread logs".into(),
            });
        }
        Ok(ids)
    }

    /// librrc's configuration for replaying from record `from`.
    fn config(&self, ids: &[u32], from: u64, virtual_fds: &[i32]) -> Result<Vec<u8>> {
        let absolute = |p: &Path| std::path::absolute(p).map_err(io("resolving", p));
        Ok(ReplayConfig {
            log_dir: self
                .log
                .canonicalize()
                .map_err(io("resolving", &self.log))?,
            logs: ids.to_vec(),
            order: self.order,
            timing: self.timing,
            stop_at_end: self.stop_at_end,
            capture: self.capture.as_deref().map(absolute).transpose()?,
            from,
            until: self.until,
            virtual_fds: virtual_fds.to_vec(),
            // A restored checkpoint has the recorded address space.
            same_addresses: from > 0,
            takeover: self.takeover.as_deref().map(absolute).transpose()?,
            inject_divergence: self.inject_divergence,
        }
        .encode())
    }
}

/// The room [`prepare`] gives a replayed process's fd table for the
/// capture file: the kernel's own size for a table holding its number.
const CAPTURE_FD_ROOM: u32 = (rrc_rr::interface::CAPTURE_FD_FROM as u32 + 1).next_power_of_two();

/// System calls behind the wrapped input functions: a thread checkpointed
/// while blocked in one returns EINTR on restore instead of waiting again,
/// so that its wrapper serves the call from the log.
const INPUT_SYSCALLS: &[i64] = &[
    libc::SYS_read,
    libc::SYS_readv,
    libc::SYS_pread64,
    libc::SYS_recvfrom,
    libc::SYS_recvmsg,
    libc::SYS_recvmmsg,
    libc::SYS_accept,
    libc::SYS_accept4,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_pwait2,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_select,
    libc::SYS_pselect6,
    libc::SYS_wait4,
    libc::SYS_waitid,
];

/// An image marked for replay, ready to be restored.
pub struct Prepared {
    /// The marked copy (removed when dropped).
    pub copy: WorkingCopy,
    /// The first record the replay serves (the checkpoint's place in the
    /// recording).
    pub from: u64,
    /// Thread logs replayed.
    pub threads: usize,
    /// Threads caught waiting for input, made to take it from the log.
    pub interrupted: usize,
    /// The recorded process (as the image numbers it).
    pub pid: i32,
}

/// Marks a working copy of `images` (a checkpoint of a container taken
/// while it was recorded into `opts.log`) so that the program restored
/// from it replays the log from that moment.
pub fn prepare(images: &Path, opts: &ReplayOptions) -> Result<Prepared> {
    let ids = opts.thread_logs()?;
    // The image says where the rings are; images from before it did, and
    // the recording directory, say it too.
    let ring_fd = match RecordingAnnotation::read(images)? {
        Some(a) => a.ring_fd,
        None => RecordingDir::ring_fd(&opts.log)?,
    };
    let copy = WorkingCopy::of(images)?;
    let mut edit = ImageEdit::open(copy.path())?;
    let rings = rings_at(&edit, images, ring_fd)?;
    let page = edit.shmem_page_mut(rings.shmem_id, 0)?;
    let last = rrc_rr::ring::request_replay(page)?;
    let from = last + 1;
    // Connections open at the checkpoint: their input is in the log.
    let virtual_fds = edit.tcp_fds(rings.pid);
    let config = opts.config(&ids, from, &virtual_fds)?;
    edit.replace_with_deleted_file(
        rings.file_id,
        &format!("/tmp/.rrc-replay-{}-{}", std::process::id(), rings.pid),
        config,
    )?;
    // The replay's output and librrc's report reach the caller, and the
    // original's log is not written over.
    edit.output_to_restorer(rings.pid)?;
    if opts.capture.is_some() {
        // Room for the capture file's descriptor before the threads share
        // the table (growing it then took 10-30 ms of the takeover).
        edit.fd_room(rings.pid, CAPTURE_FD_ROOM)?;
    }
    let interrupted = edit.interrupt_syscalls(rings.pid, INPUT_SYSCALLS)?;
    edit.save()?;
    Ok(Prepared {
        copy,
        from,
        threads: ids.len(),
        interrupted,
        pid: rings.pid,
    })
}

/// Replays the recording from the program's start: runs `program` with
/// `argv` as a plain process, with exactly the recorded environment and the
/// configuration where the rings were; returns its exit code.
pub fn from_start(program: &Path, argv: &[OsString], opts: &ReplayOptions) -> Result<i32> {
    check_recordable(program)?;
    let ids = opts.thread_logs()?;
    let ring_fd = RecordingDir::ring_fd(&opts.log)?;
    let env = RecordingDir::environ(&opts.log)?;
    let config = opts.config(&ids, 0, &[])?;
    let file = opts.log.join(format!(".replay-{}", std::process::id()));
    std::fs::write(&file, config).map_err(io("writing", &file))?;
    // Held until the program has started.
    let conf: OwnedFd = std::fs::File::open(&file)
        .map_err(io("opening", &file))?
        .into();
    let _ = std::fs::remove_file(&file);
    let cstr = |b: &[u8]| {
        CString::new(b)
            .map_err(|_| Error::InvalidArgument("an argument contains a NUL byte".into()))
    };
    let argv: Vec<CString> = argv
        .iter()
        .map(|x| cstr(x.as_encoded_bytes()))
        .collect::<Result<_>>()?;
    let prog = cstr(program.as_os_str().as_encoded_bytes())?;
    let mut cmd = std::process::Command::new(program);
    crate::sys::exec_exactly(&mut cmd, prog, argv, env, &conf, ring_fd);
    let status = cmd.status().map_err(io("running", program))?;
    Ok(status.code().unwrap_or(128 + status.signal().unwrap_or(0)))
}
