//! `rrc replay`: a recording replayed from the program's start, or from a
//! checkpoint taken while it was being recorded.

use std::ffi::OsString;
use std::os::fd::OwnedFd;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use rrc_ckpt::edit::{ImageEdit, WorkingCopy};
use rrc_container::probe;
use rrc_rr::interface::ReplayConfig;
use rrc_rr::log::thread_log_ids;

use super::record::{ENVIRON_FILE, dynamically_linked, recorded_ring_fd};

/// Replay a recording, from a checkpoint taken while it was recorded or
/// from the program's start.
///
/// With --images (a checkpoint of the recorded container, taken with
/// `rrc checkpoint NAME --leave-running` while `rrc run --record` ran):
/// restores it as a new container on this host and replays from that
/// moment: the restored librrc learns at its first call that it is a
/// replay, each thread skips what it had done before the checkpoint and
/// takes the outcomes of its later calls (network input, time,
/// randomness, thread creation, lock order) from its log; connections that
/// were open are served from the log and what the program writes to them
/// is captured, not sent. Threads the checkpoint caught waiting for input
/// take that input from the log too. When every thread has reached the
/// end of its log the program runs live (or ends, with --stop-at-end).
///
/// Without --images: runs CMD (the recorded program and arguments) from
/// its start, the same way.
///
/// Either way, a call other than the logged one is a divergence, reported
/// with the thread and event; that thread runs live from there. At the end
/// librrc reports the events replayed, the divergences and the time.
#[derive(Debug, clap::Args)]
pub struct ReplayArgs {
    /// The log directory written by `rrc run --record`.
    #[arg(long, value_name = "DIR")]
    log: PathBuf,
    /// A checkpoint of the recorded container (or a series of them: its
    /// last), taken while it was recorded.
    #[arg(long, value_name = "DIR", conflicts_with = "command")]
    images: Option<PathBuf>,
    /// With --images: the restored container's name (default: the
    /// checkpointed one, which must not be running).
    #[arg(long, requires = "images")]
    name: Option<String>,
    /// With --images: host interface for the container's frames (default:
    /// the one whose subnet holds its address).
    #[arg(long, value_name = "IF", requires = "images")]
    uplink: Option<String>,
    /// Do not force the recorded global order of returns.
    #[arg(long)]
    no_order: bool,
    /// Do not wait for the recorded time between returns.
    #[arg(long)]
    no_timing: bool,
    /// Write what the program sends on its connections (not sent anywhere
    /// in a replay) into this file, as records of descriptor (u32 LE),
    /// length (u32 LE) and bytes; a length of 0xffffffff (no bytes) marks
    /// a connection closed (its descriptor number may come again).
    #[arg(long, value_name = "FILE")]
    capture: Option<PathBuf>,
    /// End the program (SIGTERM) once the whole log has been replayed: for
    /// servers, which do not end on their own.
    #[arg(long)]
    stop_at_end: bool,
    /// Replay no record after this sequence number: each thread's log ends
    /// before its first record beyond it (a log whose tail after a gap is
    /// not to be replayed), and the end of the log is reached when every
    /// record up to it is done.
    #[arg(long, value_name = "SEQ")]
    until: Option<u64>,
    /// Without --images: the recorded program and its arguments.
    #[arg(last = true, required_unless_present = "images", value_name = "CMD")]
    command: Vec<OsString>,
}

pub fn replay(a: ReplayArgs) -> Result<i32> {
    let ids = thread_log_ids(&a.log).with_context(|| format!("reading {}", a.log.display()))?;
    if ids.is_empty() {
        bail!("{} holds no thread logs", a.log.display());
    }
    let ring_fd = recorded_ring_fd(&a.log)?;
    match &a.images {
        Some(images) => from_checkpoint(&a, images, &ids, ring_fd),
        None => from_start(&a, &ids, ring_fd),
    }
}

/// librrc's replay configuration: what it reads where the rings'
/// descriptor was.
fn config(a: &ReplayArgs, ids: &[u32], from: u64, virtual_fds: &[i32]) -> Result<Vec<u8>> {
    Ok(ReplayConfig {
        log_dir: a
            .log
            .canonicalize()
            .with_context(|| format!("resolving {}", a.log.display()))?,
        logs: ids.to_vec(),
        order: !a.no_order,
        timing: !a.no_timing,
        stop_at_end: a.stop_at_end,
        capture: a.capture.as_deref().map(std::path::absolute).transpose()?,
        from,
        until: a.until,
        virtual_fds: virtual_fds.to_vec(),
        // A restored checkpoint has the recorded address space.
        same_addresses: from > 0,
    }
    .encode())
}

fn from_start(a: &ReplayArgs, ids: &[u32], ring_fd: i32) -> Result<i32> {
    let program =
        rrc_container::spec::resolve_command(&a.command[0], std::env::var_os("PATH").as_deref())?;
    if !dynamically_linked(&program)? {
        bail!(
            "{} is statically linked: it cannot be replayed",
            program.display()
        );
    }
    // The program gets exactly the recorded environment (librrc preloaded,
    // the rings' variable) and, at the descriptor the rings had, the
    // replay's configuration.
    let environ = a.log.join(ENVIRON_FILE);
    if !environ.exists() {
        bail!(
            "{} has no {ENVIRON_FILE} file: it is not a recording made by `rrc run --record`",
            a.log.display()
        );
    }
    let config = config(a, ids, 0, &[])?;
    let file = a.log.join(format!(".replay-{}", std::process::id()));
    std::fs::write(&file, config).with_context(|| format!("writing {}", file.display()))?;
    // Held until the program has started.
    let conf: OwnedFd = std::fs::File::open(&file)?.into();
    let _ = std::fs::remove_file(&file);
    let env: Vec<std::ffi::CString> = std::fs::read(&environ)?
        .split(|b| *b == 0)
        .filter(|v| !v.is_empty())
        .map(|v| std::ffi::CString::new(v).expect("split at NULs"))
        .collect();
    let argv: Vec<std::ffi::CString> = a
        .command
        .iter()
        .map(|x| std::ffi::CString::new(x.as_encoded_bytes()))
        .collect::<std::result::Result<_, _>>()
        .context("an argument contains a NUL byte")?;
    let prog = std::ffi::CString::new(program.as_os_str().as_encoded_bytes())?;
    let mut cmd = std::process::Command::new(&program);
    crate::sys::exec_exactly(&mut cmd, prog, argv, env, &conf, ring_fd);
    let status = cmd
        .status()
        .with_context(|| format!("running {}", program.display()))?;
    Ok(status.code().unwrap_or(128 + status.signal().unwrap_or(0)))
}

fn from_checkpoint(a: &ReplayArgs, images: &Path, ids: &[u32], ring_fd: i32) -> Result<i32> {
    probe::require_root("rrc replay --images")?;
    let images = super::restore::image_of(images)?;
    let copy = WorkingCopy::of(&images)?;
    let plan = mark_for_replay(&images, copy.path(), ring_fd, |from, virtual_fds| {
        config(a, ids, from, virtual_fds)
    })?;
    eprintln!(
        "rrc: replaying from event #{} (the checkpoint's place in the recording) with {} thread log(s); {} thread(s) caught waiting for input take it from the log",
        plan.from,
        ids.len(),
        plan.interrupted
    );
    let name = a.name.as_deref().map(str::parse).transpose()?;
    let spec =
        rrc_container::restore::RestoreSpec::from_image(copy.path(), name, a.uplink.clone())?;
    let launched =
        rrc_container::launch::Launch::new(rrc_container::launch::Source::Image(spec)).run()?;
    Ok(super::exit_code(launched))
}

/// What marking an image for replay found.
struct ReplayPlan {
    /// The first sequence number to replay.
    from: u64,
    /// Threads caught inside an input call, made to return from it.
    interrupted: usize,
}

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
];

/// Changes the image in `dir` (a working copy of `images`) so that the
/// program restored from it replays: the rings' sequence counter marked,
/// the rings' descriptor turned into a file holding the configuration
/// (`config`, given the first event to replay and the descriptors of open
/// connections), its standard output and error turned into the
/// restorer's, and threads blocked in input calls interrupted.
fn mark_for_replay(
    images: &Path,
    dir: &Path,
    ring_fd: i32,
    config: impl FnOnce(u64, &[i32]) -> Result<Vec<u8>>,
) -> Result<ReplayPlan> {
    let mut edit = ImageEdit::open(dir).with_context(|| format!("reading {}", images.display()))?;
    let Some(rings) = edit.memfd_at_fd(ring_fd) else {
        bail!(
            "no process in {} has the recording's rings (descriptor {ring_fd}): is it a checkpoint of the container recorded into the log?",
            images.display()
        );
    };
    let page = edit
        .shmem_page_mut(rings.shmem_id, 0)
        .context("the rings' first page")?;
    let last = rrc_rr::ring::request_replay(page)
        .with_context(|| format!("the rings' memory in {}", images.display()))?;
    let from = last + 1;
    // Connections open at the checkpoint: their input is in the log.
    let virtual_fds = edit.tcp_fds(rings.pid);
    let text = config(from, &virtual_fds)?;
    edit.replace_with_deleted_file(
        rings.file_id,
        &format!("/tmp/.rrc-replay-{}-{}", std::process::id(), rings.pid),
        text,
    )?;
    // The replay's output and librrc's report reach `rrc replay`'s caller,
    // and the original's log is not written over.
    edit.output_to_restorer(rings.pid)?;
    let interrupted = edit.interrupt_syscalls(rings.pid, INPUT_SYSCALLS)?;
    edit.save()
        .with_context(|| format!("writing {}", dir.display()))?;
    Ok(ReplayPlan { from, interrupted })
}
