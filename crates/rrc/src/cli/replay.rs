//! `rrc replay`: a recording replayed from the program's start, or from a
//! checkpoint taken while it was being recorded.

use std::ffi::OsString;
use std::os::fd::OwnedFd;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use rrc_ckpt::image::{FileKind, ImageDir, Manifest, ProcessImage, ShmemKind};
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
    let copy = ImageCopy::of(&images)?;
    let plan = mark_for_replay(&copy.dir, ring_fd, |from, virtual_fds| {
        config(a, ids, from, virtual_fds)
    })?;
    eprintln!(
        "rrc: replaying from event #{} (the checkpoint's place in the recording) with {} thread log(s); {} thread(s) caught waiting for input take it from the log",
        plan.from,
        ids.len(),
        plan.interrupted
    );
    super::restore::run_restored_container(&copy.dir, a.name.clone(), a.uplink.clone())
}

/// A working copy of an image directory (files hard-linked where the
/// file system allows, copied otherwise), removed when dropped. Files it
/// changes are replaced, never written through a link.
struct ImageCopy {
    dir: PathBuf,
}

impl ImageCopy {
    fn of(images: &Path) -> Result<ImageCopy> {
        let parent = images.parent().unwrap_or(Path::new("."));
        let dir = parent.join(format!(
            ".{}.replay-{}",
            images
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            std::process::id()
        ));
        let copy = ImageCopy { dir };
        std::fs::create_dir(&copy.dir)
            .with_context(|| format!("creating {}", copy.dir.display()))?;
        for entry in
            std::fs::read_dir(images).with_context(|| format!("reading {}", images.display()))?
        {
            let entry = entry?;
            if !entry.file_type()?.is_file() {
                continue;
            }
            let to = copy.dir.join(entry.file_name());
            if std::fs::hard_link(entry.path(), &to).is_err() {
                std::fs::copy(entry.path(), &to)
                    .with_context(|| format!("copying {}", entry.path().display()))?;
            }
        }
        Ok(copy)
    }
}

impl Drop for ImageCopy {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Writes `bytes` as a new file at `path` (never through a hard link to
/// the original image).
fn replace_file(path: &Path, bytes: &[u8]) -> Result<()> {
    let _ = std::fs::remove_file(path);
    std::fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))
}

/// What marking an image for replay found.
struct ReplayPlan {
    /// The first sequence number to replay.
    from: u64,
    /// Threads caught inside an input call, made to return from it.
    interrupted: usize,
}

/// System calls behind the wrapped input and wait functions: a thread
/// checkpointed while blocked in one returns EINTR on restore instead of
/// waiting again, so that its wrapper serves the call from the log.
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

/// Changes the image in `dir` so that the program restored from it
/// replays: the rings' sequence counter marked, the rings' descriptor
/// turned into a file holding the configuration (`config`, given the first
/// event to replay and the descriptors of open connections), and threads
/// blocked in input calls interrupted.
fn mark_for_replay(
    dir: &Path,
    ring_fd: i32,
    config: impl FnOnce(u64, &[i32]) -> Result<Vec<u8>>,
) -> Result<ReplayPlan> {
    let img = ImageDir::new(dir);
    let (_, mut manifest, procs) =
        rrc_ckpt::restore::load(dir).with_context(|| format!("reading {}", dir.display()))?;
    let mut found = None;
    for p in procs.values() {
        let Some(fd) = p.fds.iter().find(|f| f.fd == ring_fd) else {
            continue;
        };
        let Some(file) = manifest.files.iter().find(|f| f.id == fd.file) else {
            continue;
        };
        if let FileKind::Memfd { shmem, .. } = file.kind {
            found = Some((p.pid, file.id, shmem));
            break;
        }
    }
    let Some((pid, file_id, shmem_id)) = found else {
        bail!(
            "no process in {} has the recording's rings (descriptor {ring_fd}): is it a checkpoint of the container recorded into the log?",
            dir.display()
        );
    };
    let from = mark_rings(&img, &manifest, shmem_id)?;
    let mut proc: ProcessImage = procs.get(&pid).cloned().expect("found above");
    // Connections open at the checkpoint: their input is in the log.
    let virtual_fds: Vec<i32> = proc
        .fds
        .iter()
        .filter(|f| {
            manifest
                .files
                .iter()
                .any(|o| o.id == f.file && matches!(o.kind, FileKind::Tcp { .. }))
        })
        .map(|f| f.fd)
        .collect();
    let text = config(from, &virtual_fds)?;
    replace_file(&img.file_data(file_id), &text)?;
    let file = manifest
        .files
        .iter_mut()
        .find(|f| f.id == file_id)
        .expect("found above");
    file.flags = libc::O_RDONLY as u32;
    file.kind = FileKind::Regular {
        path: format!("/tmp/.rrc-replay-{}-{pid}", std::process::id()),
        pos: 0,
        deleted: true,
        size: text.len() as u64,
        mode: 0o600,
    };
    redirect_output(&mut manifest, &proc);
    let mut interrupted = 0;
    for t in &mut proc.threads {
        let ret = t.regs.rax as i64;
        let waiting = [
            rrc_ckpt::ptrace::ERESTARTSYS,
            rrc_ckpt::ptrace::ERESTARTNOINTR,
            rrc_ckpt::ptrace::ERESTARTNOHAND,
            rrc_ckpt::ptrace::ERESTART_RESTARTBLOCK,
            -i64::from(libc::EINTR),
        ]
        .contains(&ret);
        if waiting && INPUT_SYSCALLS.contains(&(t.regs.orig_rax as i64)) {
            t.regs.rax = (-i64::from(libc::EINTR)) as u64;
            interrupted += 1;
        }
    }
    write_json(&img, &ImageDir::process_name(pid), &proc)?;
    write_json(&img, "manifest.json", &manifest)?;
    Ok(ReplayPlan { from, interrupted })
}

/// Standard output and error that were files (the recorded container's
/// log) become the restorer's own, as pipes to outside the tree do: the
/// replay's output and librrc's report reach `rrc replay`'s caller, and
/// the original's log is not written over.
fn redirect_output(manifest: &mut Manifest, proc: &ProcessImage) {
    for fd in proc.fds.iter().filter(|f| f.fd == 1 || f.fd == 2) {
        let shared = proc.fds.iter().filter(|f| f.file == fd.file).count() > 1
            && proc.fds.iter().any(|f| f.file == fd.file && f.fd > 2);
        let Some(file) = manifest.files.iter_mut().find(|f| f.id == fd.file) else {
            continue;
        };
        if shared || !matches!(file.kind, FileKind::Regular { deleted: false, .. }) {
            continue;
        }
        // A pipe whose other end is not in the image: the restore hands it
        // the restorer's descriptor of the same number.
        file.kind = FileKind::Pipe {
            pipe: u64::MAX - file.id as u64,
            write_end: true,
            capacity: 65536,
        };
        file.flags = libc::O_WRONLY as u32;
    }
}

fn write_json<T: serde::Serialize>(img: &ImageDir, name: &str, value: &T) -> Result<()> {
    let _ = std::fs::remove_file(img.file(name));
    img.write_json(name, value)
        .with_context(|| format!("writing {}", img.file(name).display()))
}

/// Marks the ring set (shared memory object `id`) for replay; returns the
/// first sequence number the replay must serve.
fn mark_rings(img: &ImageDir, manifest: &Manifest, id: usize) -> Result<u64> {
    let obj = manifest
        .shmem
        .iter()
        .find(|s| s.id == id && matches!(s.kind, ShmemKind::Memfd { .. }))
        .with_context(|| format!("the image has no shared memory object {id}"))?;
    let run = obj
        .pages
        .iter()
        .find(|r| r.start == 0 && r.count > 0)
        .context("the rings' first page is not in the image")?;
    let path = img.shmem_file(id);
    let mut data = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    let at = run.offset as usize;
    let page = data
        .get_mut(at..at + 4096)
        .with_context(|| format!("{} is truncated", path.display()))?;
    let last = rrc_rr::ring::request_replay(page)
        .with_context(|| format!("descriptor's memory in {}", path.display()))?;
    replace_file(&path, &data)?;
    Ok(last + 1)
}
