//! Restore: rebuild a process tree from an image, with the same pids, and
//! let it run.
//!
//! The root is forked by the engine with the recorded pid; every other
//! process is forked by its restored parent (a system call the engine
//! makes in it), so parentage is exact. Each process starts as a copy of
//! the engine (a skeleton), creates the files its children will inherit,
//! forks them, and only then has its address space replaced, its own files
//! put in place, its threads created and its remaining state set. All
//! threads stay stopped until the whole tree is ready; then every thread
//! gets its registers back and is let go.

mod aio;
mod cow;
mod files;
mod ipc;
pub mod lazy;
mod mm;
mod mounts;
mod mqueue;
mod namespaces;
mod netns;
mod pty;
mod sockets;
pub use files::GhostPlace;
pub use sockets::{Connection, build_connections};
mod state;
pub mod tracee;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::ptrace::Options;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::common::{BLOCK_ALL, cpu_info};
use crate::image::{Exit, ImageDir, Manifest, ProcessImage};
use crate::ptrace::{self, Stop};
use crate::restore::files::{FilePlan, Held};
use crate::restore::mm::MemCtx;
use crate::restore::tracee::{Ended, SCRATCH_SIZE, Tracee};
use crate::{Error, Result, sys};

/// Code run in the root process, once forked, before it becomes a skeleton
/// (a container mounts its /proc, sets its hostname). An error text aborts.
pub type RootSetup<'a> = &'a (dyn Fn() -> std::result::Result<(), String> + Sync);

/// Code run by the caller once the root exists, before anything is restored
/// in it (a container puts it in its cgroup and gives its network namespace
/// an interface). An error text aborts.
pub type AfterSpawn<'a> = &'a dyn Fn(Pid) -> std::result::Result<(), String>;

pub struct RestoreOptions<'a> {
    pub images: &'a Path,
    /// Namespaces (`CLONE_NEW*`) the root gets besides a new pid namespace
    /// when the image was a whole pid namespace.
    pub root_flags: u64,
    pub root_setup: Option<RootSetup<'a>>,
    pub after_spawn: Option<AfterSpawn<'a>>,
    /// TCP connections are left in repair mode (nothing sent or taken in,
    /// their state as saved), for a caller that replaces them.
    pub keep_repair: bool,
    /// Where deleted files are made again (by default `/run/rrc/ghosts`):
    /// somewhere the restored processes see, if their root is not the
    /// host's.
    pub ghosts: Option<files::GhostPlace>,
    /// Lets the processes run before all their private memory is in: it
    /// is copied in the background, and each page a process touches
    /// first ([`Restored::pages`] tells when every page is in).
    pub lazy_pages: bool,
}

impl<'a> RestoreOptions<'a> {
    /// A process tree restored on the host as it was: in the host's
    /// namespaces, its connections live again, deleted files made again
    /// in rrc's place for them, memory filled before it runs.
    pub fn tree(images: &'a Path) -> RestoreOptions<'a> {
        RestoreOptions {
            images,
            root_flags: 0,
            root_setup: None,
            after_spawn: None,
            keep_repair: false,
            ghosts: None,
            lazy_pages: false,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Restored {
    /// The root, as our pid namespace numbers it.
    pub root: Pid,
    pub processes: usize,
    pub threads: usize,
    pub took: Duration,
    /// Of that, the time spent rebuilding sockets.
    pub sockets: Duration,
    /// With lazy pages, the copiers still filling memory.
    pub pages: lazy::LazyPages,
}

const CLONE_THREAD_FLAGS: u64 = (libc::CLONE_VM
    | libc::CLONE_FS
    | libc::CLONE_FILES
    | libc::CLONE_SIGHAND
    | libc::CLONE_THREAD
    | libc::CLONE_SYSVSEM) as u64;

fn rerr(pid: i32, stage: &'static str, detail: impl Into<String>) -> Error {
    Error::Restore {
        pid,
        stage,
        detail: detail.into(),
    }
}

/// Reads an image and checks that this machine can run it.
pub fn load(images: &Path) -> Result<(ImageDir, Manifest, BTreeMap<i32, ProcessImage>)> {
    let img = ImageDir::new(images);
    let m = img.read_manifest()?;
    if img.file(crate::store::APPLYING).exists() {
        return Err(Error::CorruptImage {
            path: images.into(),
            detail: "a delta was being applied to it and did not finish".into(),
        });
    }
    if let (Some(parent), Some(me)) = (&m.parent, &m.lineage) {
        return Err(Error::CorruptImage {
            path: images.into(),
            detail: format!(
                "it is a delta ({me}, following checkpoint {}); restore the image it was applied to",
                parent.epoch
            ),
        });
    }
    let cpu = cpu_info();
    if cpu != m.cpu {
        return Err(Error::Incompatible(format!(
            "the CPU's extended register state differs (XSAVE size {} and XCR0 {:#x} here, {} and {:#x} in the image)",
            cpu.xsave_size, cpu.xcr0, m.cpu.xsave_size, m.cpu.xcr0
        )));
    }
    let mut procs = BTreeMap::new();
    for pid in &m.processes {
        let p: ProcessImage = img.read_json(&ImageDir::process_name(*pid))?;
        procs.insert(*pid, p);
    }
    check_references(images, &m, &procs)?;
    check_sizes(&img, &m, &procs)?;
    mounts::check(&img, &procs)
        .and_then(|()| namespaces::check_users(&m, &procs))
        .map_err(|detail| Error::CorruptImage {
            path: images.into(),
            detail,
        })?;
    if let Some(p) = procs.values().find(|p| p.zombie.is_none()) {
        mm::check_vdso(p)?;
    }
    Ok((img, m, procs))
}

/// Every run of saved pages lies within the file that holds it and, for a
/// shared object, within the object; every mapping is a non-empty range
/// of whole pages; no length overflows. Checked once here, so that the
/// arithmetic of the restore cannot wrap.
fn check_sizes(
    img: &ImageDir,
    m: &crate::image::Manifest,
    procs: &BTreeMap<i32, ProcessImage>,
) -> Result<()> {
    use crate::procfs::PAGE_SIZE;
    let check = |file: std::path::PathBuf, runs: &[crate::image::PageRun], limit: Option<u64>| {
        if runs.is_empty() {
            return Ok(());
        }
        let len = std::fs::metadata(&file)
            .map_err(|e| Error::image(&file, e))?
            .len();
        for r in runs {
            let bytes = r.count.checked_mul(PAGE_SIZE);
            let fits_file = bytes
                .and_then(|b| r.offset.checked_add(b))
                .is_some_and(|end| end <= len);
            let end = bytes.and_then(|b| r.start.checked_add(b));
            let fits_object = match (end, limit) {
                (None, _) => false,
                (Some(end), Some(limit)) => end <= limit,
                (Some(_), None) => true,
            };
            if !fits_file || !fits_object || r.start % PAGE_SIZE != 0 {
                return Err(Error::CorruptImage {
                    path: file.clone(),
                    detail: format!(
                        "a run of {} pages at {:#x} (file offset {:#x}) does not fit",
                        r.count, r.start, r.offset
                    ),
                });
            }
        }
        Ok(())
    };
    for (pid, p) in procs {
        check(img.pages_file(*pid), &p.pages, None)?;
        if let Some(v) = p
            .vmas
            .iter()
            .find(|v| v.start >= v.end || v.start % PAGE_SIZE != 0 || v.end % PAGE_SIZE != 0)
        {
            return Err(Error::CorruptImage {
                path: img.file(&ImageDir::process_name(*pid)),
                detail: format!(
                    "a mapping of process {pid} runs from {:#x} to {:#x}",
                    v.start, v.end
                ),
            });
        }
        for v in &p.vmas {
            crate::image::aio_ring::check_vma(v).map_err(|what| Error::CorruptImage {
                path: img.file(&ImageDir::process_name(*pid)),
                detail: format!("process {pid}, mapping at {:#x}: {what}", v.start),
            })?;
        }
    }
    for obj in &m.shmem {
        check(
            img.shmem_file(obj.id),
            &obj.pages,
            Some(
                obj.size
                    .checked_next_multiple_of(PAGE_SIZE)
                    .unwrap_or(u64::MAX),
            ),
        )?;
    }
    Ok(())
}

/// Every reference between the image's records points at something the
/// image has: a process file is the process the manifest names, a parent
/// is in the tree and comes before its child, the root is there, an open
/// file and a shared memory object referred to exist. A corrupted image is
/// refused here, before anything is created.
fn check_references(
    images: &Path,
    m: &crate::image::Manifest,
    procs: &BTreeMap<i32, ProcessImage>,
) -> Result<()> {
    let corrupt = |detail: String| Error::CorruptImage {
        path: images.into(),
        detail,
    };
    if !procs.contains_key(&m.root) {
        return Err(corrupt(format!(
            "the root, process {}, is not in it",
            m.root
        )));
    }
    let bad_filter = |f: &Vec<u64>| f.is_empty() || f.len() > crate::image::SECCOMP_FILTER_MAX;
    if let Some(p) = procs.values().find(|p| {
        p.seccomp.iter().any(bad_filter)
            || (p.threads.iter()).any(|th| th.seccomp.iter().any(bad_filter))
    }) {
        return Err(corrupt(format!(
            "process {} has a seccomp filter that is empty or longer than {} instructions",
            p.pid,
            crate::image::SECCOMP_FILTER_MAX
        )));
    }
    let files: std::collections::BTreeSet<usize> = m.files.iter().map(|f| f.id).collect();
    let shmem: std::collections::BTreeSet<usize> = m.shmem.iter().map(|s| s.id).collect();
    let known_owner = |o: &crate::image::FileOwner| {
        use crate::image::OwnerKind;
        procs.values().any(|p| match o.kind {
            OwnerKind::Thread => p.threads.iter().any(|t| t.tid == o.id),
            OwnerKind::Process => p.pid == o.id,
            OwnerKind::Group => p.pgid == o.id,
        })
    };
    for f in &m.files {
        if let Some(o) = &f.owner
            && !known_owner(o)
        {
            return Err(corrupt(format!(
                "open file {} signals {:?} {}, which is not in the tree",
                f.id, o.kind, o.id
            )));
        }
        if let crate::image::FileKind::Epoll { targets } = &f.kind
            && let Some(tg) = targets
                .iter()
                .find(|tg| tg.fd < 0 || tg.file.is_some_and(|id| !files.contains(&id)))
        {
            return Err(corrupt(format!(
                "epoll {} watches fd {} of open file {:?}, which is not in it",
                f.id, tg.fd, tg.file
            )));
        }
        if !(0..=64).contains(&f.signal) {
            return Err(corrupt(format!(
                "open file {} has signal {}",
                f.id, f.signal
            )));
        }
        if let crate::image::FileKind::Memfd { shmem: id, .. } = f.kind
            && !shmem.contains(&id)
        {
            return Err(corrupt(format!(
                "open file {} is a memfd of shared memory {id}, which it does not hold",
                f.id
            )));
        }
        if let crate::image::FileKind::PtyMaster { pty }
        | crate::image::FileKind::PtyTerminal { pty } = f.kind
            && pty >= m.ptys.len()
        {
            return Err(corrupt(format!(
                "open file {} is an end of pseudo-terminal pair {pty}, which it does not hold",
                f.id
            )));
        }
    }
    // A queue's or segment's namespace is one a process of the tree
    // starts.
    let starts_none = |ns: &Option<i32>| {
        ns.is_some_and(|f| f == m.root || procs.get(&f).is_none_or(|p| p.ipc.is_none()))
    };
    if let Some(q) = m.posix_queues.iter().find(|q| starts_none(&q.ns)) {
        return Err(corrupt(format!(
            "POSIX message queue {} is in the IPC namespace of process {:?}, which starts none",
            q.name, q.ns
        )));
    }
    if let Some(o) = m
        .shmem
        .iter()
        .find(|o| matches!(&o.kind, crate::image::ShmemKind::SysV { ns, .. } if starts_none(ns)))
    {
        return Err(corrupt(format!(
            "SysV segment {} is in an IPC namespace no process of the tree starts",
            o.id
        )));
    }
    for pty in &m.ptys {
        use crate::image::Pty;
        let leader = |sid: &i32| procs.get(sid).is_some_and(|p| p.sid == *sid);
        // Unread input only as a terminal in non-canonical mode holds it,
        // within its line discipline's buffer (a write of more would
        // wait for a reader forever).
        let bad_input = !pty.input.0.is_empty()
            && (pty.input.0.len() >= Pty::INPUT_MAX || sys::tty::canonical(&pty.termios.0));
        if pty.termios.0.len() != Pty::TERMIOS
            || pty.winsize.0.len() != Pty::WINSIZE
            || bad_input
            || pty.session.is_some_and(|sid| !leader(&sid))
            || pty
                .foreground
                .is_some_and(|g| !procs.values().any(|p| p.pgid == g))
        {
            return Err(corrupt(format!(
                "pseudo-terminal {} has settings of the wrong size, input it cannot hold, or \
                 a session or group not in the tree",
                pty.index
            )));
        }
    }
    // A session whose leader had exited is made again by a process with
    // its id: that must be a pid.
    if let Some(sid) = orphan_sessions(m, procs)
        .into_iter()
        .find(|sid| !(1..=crate::image::PID_MAX).contains(sid))
    {
        return Err(corrupt(format!(
            "a process is in session {sid}, which is not a process id"
        )));
    }
    // The root's pid outside its pid namespace: a pid, of such a tree.
    if let Some(outer) = m.outer_pid
        && (!m.own_pid_ns || !(1..=crate::image::PID_MAX).contains(&outer))
    {
        return Err(corrupt(format!(
            "the root's outer pid {outer} is not a pid of a tree that is a pid namespace"
        )));
    }
    files::check_inotify(m, procs).map_err(corrupt)?;
    files::check_pidfds(m, procs).map_err(corrupt)?;
    files::check_ns_files(m, procs).map_err(corrupt)?;
    files::check_in_flight(m, procs).map_err(corrupt)?;
    files::check_fanotify(m, procs).map_err(corrupt)?;
    let all: Vec<&ProcessImage> = procs.values().collect();
    crate::image::netns::check_tun_files(&m.files, &all).map_err(corrupt)?;
    crate::image::netns::check_tree_veths(&all).map_err(corrupt)?;
    namespaces::check(procs, m.root).map_err(corrupt)?;
    for (at, pid) in m.processes.iter().enumerate() {
        let p = &procs[pid];
        if p.pid != *pid {
            return Err(corrupt(format!(
                "the file of process {pid} holds process {}",
                p.pid
            )));
        }
        if p.shares_parent_files && p.parent.is_none() {
            return Err(corrupt(format!(
                "process {pid} shares the fd table of a parent it does not have"
            )));
        }
        if let Some(s) = p.shares_files_with {
            let sibling = procs.get(&s).filter(|q| {
                !p.shares_parent_files
                    && m.processes[..at].contains(&s)
                    && q.parent.is_some()
                    && q.parent == p.parent
                    && q.zombie.is_none()
                    && q.depth() == p.depth()
                    && q.nested_pids.last() != Some(&1)
            });
            if sibling.is_none() {
                return Err(corrupt(format!(
                    "process {pid} shares the fd table of process {s}, which is not a live sibling before it"
                )));
            }
        }
        match p.parent {
            None if *pid != m.root => {
                return Err(corrupt(format!(
                    "process {pid} has no parent and is not the root"
                )));
            }
            Some(parent) if !m.processes[..at].contains(&parent) => {
                return Err(corrupt(format!(
                    "process {pid}'s parent {parent} is not before it in the tree"
                )));
            }
            _ => {}
        }
        files::check_locks(p).map_err(corrupt)?;
        if let Some(exit) = p.zombie {
            // A zombie is forked and ended at once: nothing else of it
            // can be restored, and it cannot be the root.
            let bad = if *pid == m.root {
                Some("is the root".to_string())
            } else if !p.threads.is_empty() || !p.fds.is_empty() || !p.vmas.is_empty() {
                Some("has threads, files or memory".to_string())
            } else if procs.values().any(|c| c.parent == Some(*pid)) {
                Some("has children".to_string())
            } else if let Exit::Signal { signal } = exit
                && !crate::common::is_fatal_signal(signal)
            {
                Some(format!(
                    "was killed by signal {signal}, which does not kill"
                ))
            } else {
                None
            };
            if let Some(bad) = bad {
                return Err(corrupt(format!("process {pid} is a zombie and {bad}")));
            }
        } else if p.threads.is_empty() {
            return Err(corrupt(format!("process {pid} has no threads")));
        }
        if let Some(fd) = p.fds.iter().find(|fd| !files.contains(&fd.file)) {
            return Err(corrupt(format!(
                "descriptor {} of process {pid} refers to open file {}, which it does not hold",
                fd.fd, fd.file
            )));
        }
    }
    Ok(())
}

/// An address for the scratch region that no process of the image and not
/// the engine itself uses.
fn choose_scratch(procs: &BTreeMap<i32, ProcessImage>) -> Result<u64> {
    let mut used: Vec<(u64, u64)> = procs
        .values()
        .flat_map(|p| p.vmas.iter().map(|v| (v.start, v.end)))
        .collect();
    let own = procfs::process::Process::myself()
        .and_then(|p| p.maps())
        .map_err(Error::proc(std::process::id() as i32, "memory maps"))?;
    used.extend(own.iter().map(|m| m.address));
    // Leave a guard page on both sides.
    let need = SCRATCH_SIZE + 2 * 4096;
    let mut candidate: u64 = 0x1_0000_0000;
    used.sort();
    for (s, e) in used {
        if e <= candidate {
            continue;
        }
        if s >= candidate + need {
            break;
        }
        candidate = e.next_multiple_of(1 << 21);
    }
    if candidate + need >= 0x7fff_0000_0000 {
        return Err(Error::Incompatible(
            "no free address range for the restorer's scratch memory".into(),
        ));
    }
    Ok(candidate + 4096)
}

/// Forks the root with its recorded pid and turns it into a traced,
/// stopped skeleton.
fn spawn_root(
    p: &ProcessImage,
    outer: Option<i32>,
    flags: u64,
    setup: Option<RootSetup>,
    scratch: u64,
) -> Result<Pid> {
    let (mut ready_rd, mut ready_wr) = pipe()?;
    let (hold_rd, hold_wr) = pipe()?;
    // Its pid in its own namespace, then, for a tree that is one, in ours.
    let pids: Vec<i32> = std::iter::once(p.pid).chain(outer).collect();
    // SAFETY: the engine restores from a single thread (the CLI starts
    // none before), and the child only runs `root_setup`, maps its scratch
    // region, reports and blocks until it is taken over.
    let forked = unsafe { sys::fork_with_pid(flags, &pids) };
    match forked {
        Err(e) => Err(match e.raw_os_error() {
            Some(libc::EEXIST) => Error::PidTaken(outer.unwrap_or(p.pid)),
            _ => rerr(p.pid, "fork the root", e.to_string()),
        }),
        Ok(None) => {
            drop(ready_rd);
            drop(hold_wr);
            let outcome = setup.map(|f| f()).unwrap_or(Ok(())).and_then(|()| {
                sys::map_scratch(scratch, SCRATCH_SIZE).map_err(|e| format!("scratch memory: {e}"))
            });
            let msg = match outcome {
                Ok(()) => "ok".to_string(),
                Err(e) => e,
            };
            let _ = ready_wr.write_all(msg.as_bytes());
            drop(ready_wr);
            let mut b = [0u8; 1];
            let mut hold = hold_rd;
            let _ = hold.read(&mut b);
            sys::exit_now(1)
        }
        Ok(Some(child)) => {
            drop(ready_wr);
            drop(hold_rd);
            let mut msg = String::new();
            let _ = ready_rd.read_to_string(&mut msg);
            if msg != "ok" {
                let _ = kill(child, Signal::SIGKILL);
                let _ = nix::sys::wait::waitpid(child, None);
                return Err(rerr(
                    p.pid,
                    "prepare the root",
                    if msg.is_empty() {
                        "it died".into()
                    } else {
                        msg
                    },
                ));
            }
            let opts = Options::PTRACE_O_TRACEFORK
                | Options::PTRACE_O_TRACECLONE
                | Options::PTRACE_O_EXITKILL;
            ptrace::seize(child, opts)?;
            ptrace::interrupt(child)?;
            wait_started(child, p.pid)?;
            // The hold pipe's write end may close now: the child never runs
            // its own code again.
            drop(hold_wr);
            Ok(child)
        }
    }
}

fn pipe() -> Result<(std::fs::File, std::fs::File)> {
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| Error::io("pipe")(e.into()))?;
    Ok((std::fs::File::from(r), std::fs::File::from(w)))
}

/// Waits for a new task to report its first stop.
fn wait_started(tid: Pid, ns: i32) -> Result<()> {
    match ptrace::wait_stop(tid)? {
        Stop::Event(_, _) | Stop::Signal(_) => Ok(()),
        other => Err(rerr(ns, "start a process", format!("{other:?}"))),
    }
}

/// clone3 arguments in the tracee's scratch: fork-like, or a thread.
/// `ids`: the pids to give it, the innermost pid namespace's first (none:
/// the kernel's choice).
fn clone_args(t: &mut Tracee, flags: u64, exit_signal: u64, ids: &[i32]) -> Result<u64> {
    let bytes: Vec<u8> = ids.iter().flat_map(|id| id.to_ne_bytes()).collect();
    // clone3 refuses an array of no pids.
    let set_tid = if ids.is_empty() { 0 } else { t.arg(&bytes)? };
    let mut a = Vec::with_capacity(88);
    for v in [
        flags,
        0,
        0,
        0,
        exit_signal,
        0,
        0,
        0,
        set_tid,
        ids.len() as u64,
        0,
    ] {
        a.extend_from_slice(&v.to_ne_bytes());
    }
    t.arg(&a)
}

/// Forks a child of `parent` with pids `ids` (the innermost first; none:
/// the kernel's next one).
fn fork_child(parent: &mut Tracee, ids: &[i32], flags: u64) -> Result<Tracee> {
    fork_asking(parent, ids, ids.last().copied().unwrap_or(0), flags)
}

/// Forks a helper child of `parent` at pid `id` of its namespace, which
/// signals no one when it ends (its parent reaps it with `__WALL`).
fn fork_silent(parent: &mut Tracee, id: i32) -> Result<Tracee> {
    let args = clone_args(parent, 0, 0, &[id])?;
    let host = clone_in(parent, "clone3 (a helper)", args, id)?;
    Tracee::new(id, host, parent.scratch)
}

/// Forks a child of `parent` that is to be process `ns_pid` of the tree,
/// asking for pids `ids` (the innermost first).
fn fork_asking(parent: &mut Tracee, ids: &[i32], ns_pid: i32, flags: u64) -> Result<Tracee> {
    // A CLONE_PARENT child ends with its maker's exit signal; clone3
    // wants none given.
    let exit_signal = if flags & libc::CLONE_PARENT as u64 != 0 {
        0
    } else {
        libc::SIGCHLD as u64
    };
    let args = clone_args(parent, flags, exit_signal, ids)?;
    let host = clone_in(parent, "clone3 (fork)", args, ns_pid)?;
    Tracee::new(ns_pid, host, parent.scratch)
}

/// Forks the process of pids `ids` (the innermost first) from `forker`,
/// which is in a user namespace and may ask for its pids in that
/// namespace's pid namespace only: its pid in the tree's (the last) is
/// set as the next one (`next`). One that got another pid in ours ends
/// and is reaped by `reaper` (the forker itself, which sees it by its pid
/// in its own namespace, or the parent of a `CLONE_PARENT` child, in
/// ours).
fn fork_at_next_pid(
    forker: &mut Tracee,
    mut reaper: Option<&mut Tracee>,
    next: &mut namespaces::NextPids,
    ids: &[i32],
    flags: u64,
) -> Result<Tracee> {
    let Some((&outer, inner)) = ids.split_last() else {
        return fork_child(forker, ids, flags);
    };
    let level = next.level();
    next.at(outer, || {
        let ct = fork_asking(forker, inner, outer, flags)?;
        let host = ct.pid;
        let got = namespaces::pid_at_level(host, level)?;
        if got == outer {
            return Ok(Some(ct));
        }
        if level != 0 {
            // Nothing else takes pids in the tree's own namespace.
            return Err(rerr(outer, "fork", format!("it got pid {got}")));
        }
        ct.end(libc::SYS_exit, &[0])?;
        let (r, seen) = match reaper.as_deref_mut() {
            Some(r) => (r, host.as_raw()),
            None => (
                &mut *forker,
                inner.first().copied().unwrap_or(host.as_raw()),
            ),
        };
        r.call(
            "reap a child that got another pid",
            libc::SYS_wait4,
            &[seen as u64, 0, libc::__WALL as u64, 0],
        )?;
        flush_sigchld(r)?;
        Ok(None)
    })
}

/// Forks `c`, the first process of a pid namespace of its user namespace,
/// from its parent `t`: a helper child of `t` takes `c`'s supplementary
/// groups, enters the user namespace and unshares a pid namespace there
/// (which so belongs to it), and forks `c` into that as `t`'s child
/// (`CLONE_PARENT`), pid 1 there and its pid in ours set as the next one;
/// then the helper ends and `t` reaps it.
fn fork_into_user_pid_ns(ctx: &mut Ctx, t: &mut Tracee, c: &ProcessImage) -> Result<Tracee> {
    let user = (c.user_ns.and_then(|i| ctx.users.get(i)))
        .ok_or_else(|| rerr(c.pid, "pid namespace", "in no user namespace"))?;
    // The helper lives while `c` is forked: at no pid `c` may ask for.
    ctx.next_pids.clear_of_tree()?;
    let mut h = fork_child(t, &[], 0)?;
    let made = (|| -> Result<Tracee> {
        ptrace::set_sigmask(h.pid, BLOCK_ALL)?;
        namespaces::enter_user(&mut h, c, user.as_fd(), &ctx.mem.transport)?;
        h.call(
            "unshare(CLONE_NEWPID)",
            libc::SYS_unshare,
            &[libc::CLONE_NEWPID as u64],
        )?;
        let flags = libc::CLONE_PARENT as u64;
        let ids = namespaces::set_tid(c);
        fork_at_next_pid(&mut h, Some(&mut *t), &mut ctx.next_pids, &ids, flags)
    })();
    let ended = end_helper(t, h);
    let ct = made?;
    ended?;
    Ok(ct)
}

fn spawn_threads(t: &mut Tracee, p: &ProcessImage, next: &mut namespaces::NextPids) -> Result<()> {
    for th in p.threads.iter().skip(1) {
        let ids = namespaces::thread_set_tid(th);
        let host = match p.user_ns {
            None => spawn_thread(t, th.tid, &ids)?,
            // In a user namespace, the process cannot ask for a pid in
            // ours.
            Some(_) => thread_at_next_pid(t, next, &ids)?,
        };
        t.threads.push((th.tid, host));
    }
    Ok(())
}

/// Makes a thread of `t` with ids `ids` (the innermost first), asking for
/// those of a pid namespace of its user namespace only: its id in the
/// tree's (the last) is set as the next one (`next`); one that got
/// another ends.
fn thread_at_next_pid(t: &mut Tracee, next: &mut namespaces::NextPids, ids: &[i32]) -> Result<Pid> {
    let (&tid, inner) = ids
        .split_last()
        .ok_or_else(|| rerr(t.ns_pid, "create a thread", "a thread without an id"))?;
    let level = next.level();
    next.at(tid, || {
        let host = spawn_thread(t, tid, inner)?;
        if namespaces::pid_at_level(host, level)? == tid {
            return Ok(Some(host));
        }
        t.end_thread(host)?;
        Ok(None)
    })
}

/// Makes a thread of `t`, with pids `ids` (none: the kernel's next one);
/// returns its pid as we see it.
fn spawn_thread(t: &mut Tracee, tid: i32, ids: &[i32]) -> Result<Pid> {
    let args = clone_args(t, CLONE_THREAD_FLAGS, 0, ids)?;
    clone_in(t, "clone3 (thread)", args, tid)
}

/// Runs `t`'s clone3 of `args` (asking for pid `id`, for errors); returns
/// the new task's pid as we see it, once it has stopped at its start.
fn clone_in(t: &mut Tracee, what: &'static str, args: u64, id: i32) -> Result<Pid> {
    let (_, spawned) = t
        .call_spawning(what, libc::SYS_clone3, &[args, 88])
        .map_err(|e| match e {
            Error::RemoteFailed {
                errno: nix::errno::Errno::EEXIST,
                ..
            } => Error::PidTaken(id),
            e => e,
        })?;
    let host = *spawned
        .tids
        .first()
        .ok_or_else(|| rerr(id, what, "the new task was not reported"))?;
    wait_started(host, id)?;
    Ok(host)
}

struct Ctx<'a> {
    img: &'a ImageDir,
    m: &'a Manifest,
    procs: &'a BTreeMap<i32, ProcessImage>,
    children: BTreeMap<i32, Vec<i32>>,
    /// Siblings each process forks (`CLONE_PARENT`) into its fd table.
    sharers: BTreeMap<i32, Vec<i32>>,
    plan: FilePlan,
    mem: MemCtx<'a>,
    /// Every process restored so far, stopped, in creation order.
    done: Vec<Tracee>,
    /// Sessions whose leader had exited, made again by helpers.
    orphan_sessions: BTreeSet<i32>,
    /// Whether the root was made in an IPC namespace of its own.
    root_new_ipc: bool,
    /// The tree's user namespaces, by index.
    users: Vec<std::os::fd::OwnedFd>,
    /// Where the next pid of the tree's namespace is set.
    next_pids: namespaces::NextPids,
    /// Veths with an end outside their namespace, made before the tree.
    early_veths: netns::EarlyVeths,
}

/// Sessions whose leader had exited: neither the session the root was
/// started in nor led by a process of the tree (none for images that do
/// not record the root's session).
fn orphan_sessions(m: &Manifest, procs: &BTreeMap<i32, ProcessImage>) -> BTreeSet<i32> {
    let Some(outer) = m.outer_session else {
        return BTreeSet::new();
    };
    procs
        .values()
        .map(|p| p.sid)
        .filter(|sid| *sid != outer && !procs.contains_key(sid))
        .collect()
}

/// Restores process `t` and, recursively, its children. `inherited` is the
/// session it was forked in (as the image numbers sessions; `None` for the
/// root of an image that does not say); `mem_of` the process (image pid)
/// whose restored memory it was forked with (`None` for the root).
fn restore_process(
    ctx: &mut Ctx,
    mut t: Tracee,
    mut held: Held,
    inherited: Option<i32>,
    mem_of: Option<i32>,
) -> Result<()> {
    let p = &ctx.procs[&t.ns_pid];
    let pid = p.pid;
    ptrace::set_sigmask(t.pid, BLOCK_ALL)?;
    if let Some(exit) = p.zombie {
        join_session(&mut t, p, ctx.procs)?;
        return end_zombie(t, exit);
    }
    // A process making time namespaces of its user namespace is in it
    // before it makes them (their owner is their maker's).
    let born_in_user = p.born_in_user(ctx.procs);
    let user_first = p.enters_user_first(ctx.procs);
    if let Some(i) = p.user_ns
        && user_first
    {
        namespaces::enter_user(&mut t, p, ctx.users[i].as_fd(), &ctx.mem.transport)?;
    }
    // Its own time, UTS, cgroup, network, IPC and mount namespaces before
    // its children are forked into them: made (a container's root was made
    // in a new IPC one), then each filled.
    namespaces::enter_time(&mut t, p)?;
    let root_has_ipc = pid == ctx.m.root && ctx.root_new_ipc;
    let in_user = born_in_user || user_first;
    let (users, transport) = (&ctx.users, &ctx.mem.transport);
    namespaces::make_own(&mut t, p, root_has_ipc, in_user, users, transport)?;
    if let Some(names) = &p.uts {
        namespaces::name_uts(&mut t, names)?;
    }
    if let Some(net) = &p.own_net {
        let all: Vec<&ProcessImage> = ctx.procs.values().collect();
        let tun_files = crate::image::netns::tun_files_in(&ctx.m.files, &all, pid);
        netns::fill(
            &mut t,
            net,
            &ctx.early_veths,
            &tun_files,
            &mut ctx.plan.tuns,
        )?;
    }
    // Its IPC namespace's objects before anyone uses them.
    if let Some(objects) = &p.ipc {
        ipc::make(&mut t, objects)?;
        // The namespace's queues, those no process has open too.
        let ns = (pid != ctx.m.root).then_some(pid);
        mqueue::make_all(&mut t, &mut ctx.plan.queues, ctx.m, ns)?;
    } else if pid == ctx.m.root {
        // The queues of the tree's IPC namespace, the restorer's, made in
        // it before any process that made one of its own opens them.
        mqueue::make_all(&mut t, &mut ctx.plan.queues, ctx.m, None)?;
    }
    // Its mount namespace's mounts before it opens or maps a file, once
    // it is in the namespaces its file systems show.
    if let Some(ns) = &p.own_mounts {
        mounts::make(&mut t, p, ns, ctx.img)?;
    }
    mounts::made_by(&mut t, ctx.procs)?;
    // The SysV segments it made, before any process maps them.
    mm::create_sysv_segments(&mut t, &mut ctx.mem)?;
    // A process sharing its parent's fd table leaves the table to the
    // parent, who arranges it once every child is made.
    if !p.shares_table() {
        files::create_owned(
            &mut t,
            ctx.m,
            ctx.img,
            &mut ctx.plan,
            &mut ctx.mem,
            &mut held,
        )?;
    }
    // Memory before the children are forked: they start with it, shared
    // copy-on-write, and keep what they had alike.
    let parent = mem_of.and_then(|q| ctx.procs.get(&q));
    let kids = ctx.children.get(&pid).cloned().unwrap_or_default();
    let sharers = ctx.sharers.get(&pid).cloned().unwrap_or_default();
    // Lazily only where no child is forked from memory still filling.
    let lazy = kids.is_empty() && sharers.is_empty();
    mm::replace(&mut t, p, parent, lazy, &mut ctx.mem, &mut ctx.plan.ghosts)?;
    let leads = p.sid == pid;
    let session = if leads { Some(pid) } else { inherited };
    let sid_of = |c: &i32| ctx.procs[c].sid;
    // Children that kept the session this process left by making its own
    // are forked before it does.
    let (early, kids): (Vec<i32>, Vec<i32>) = kids
        .into_iter()
        .partition(|c| leads && Some(sid_of(c)) == inherited);
    // Where its next child goes: its own pid namespace until a child in
    // a nested one needs otherwise.
    let mut children_ns = None;
    for child in early {
        let ct = fork_in_place(ctx, &mut t, child, &mut children_ns)?;
        restore_process(ctx, ct, held.clone(), inherited, Some(pid))?;
    }
    // Session and group before the other children, who inherit them, and
    // so the session's controlling terminal.
    join_session(&mut t, p, ctx.procs)?;
    if leads {
        ctx.plan
            .ptys
            .controlling(&mut t, ctx.m, &ctx.mem.transport)?;
    }
    // Children adopted from a session whose leader has exited are forked
    // in that session, made again by a helper.
    let (adopted, kids): (Vec<i32>, Vec<i32>) = kids
        .into_iter()
        .partition(|c| Some(sid_of(c)) != session && ctx.orphan_sessions.contains(&sid_of(c)));
    for child in kids {
        let ct = fork_in_place(ctx, &mut t, child, &mut children_ns)?;
        restore_process(ctx, ct, held.clone(), session, Some(pid))?;
    }
    let mut by_session: BTreeMap<i32, Vec<i32>> = BTreeMap::new();
    for c in adopted {
        by_session.entry(sid_of(&c)).or_default().push(c);
    }
    for (sid, members) in by_session {
        namespaces::point_children(&mut t, ctx.procs, p, None, &mut children_ns)?;
        session_helper(ctx, &mut t, &held, sid, &members)?;
    }
    // Siblings sharing its fd table (their parent unshared its own since):
    // forked from it into their parent, before its table is arranged.
    for s in sharers {
        namespaces::point_children(&mut t, ctx.procs, p, None, &mut children_ns)?;
        let flags = (libc::CLONE_FILES | libc::CLONE_PARENT) as u64;
        let sp = &ctx.procs[&s];
        let back = namespaces::back_to_own_time(p, sp);
        let fd = back.then(|| namespaces::own_time_fd(&mut t)).transpose()?;
        let mut ct = fork_child(&mut t, &namespaces::set_tid(sp), flags)?;
        if let Some(fd) = fd {
            namespaces::join_time(&mut ct, fd, true, true)?;
            namespaces::close_time_fd(&mut t, fd)?;
        }
        restore_process(ctx, ct, held.clone(), session, Some(pid))?;
    }
    namespaces::restore_children_ns(&mut t, ctx.procs, p, children_ns)?;
    // The zombies among the children died again just now: their SIGCHLD
    // was had already.
    let children = ctx.children.get(&pid).map(Vec::as_slice).unwrap_or(&[]);
    if children.iter().any(|c| ctx.procs[c].zombie.is_some()) {
        flush_sigchld(&mut t)?;
    }
    if leads {
        let nested = !p.nested_pids.is_empty();
        (ctx.plan.ptys).foreground(&mut t, ctx.m, nested, &ctx.mem.transport)?;
    }
    // Its user namespace once its children are forked (their pids need
    // rights over the tree's pid namespace that it leaves outside) and
    // while the fd the engine passes files through is still in its table.
    // (Unless it is there already.)
    if let Some(i) = p.user_ns
        && !in_user
    {
        namespaces::enter_user(&mut t, p, ctx.users[i].as_fd(), &ctx.mem.transport)?;
    }
    if !p.shares_table() {
        files::arrange(&mut t, p, ctx.m, &held, &mut ctx.plan)?;
    }
    files::take_locks(&mut t, p)?;
    // What its threads inherit, set once.
    state::before_threads(&mut t, p)?;
    spawn_threads(&mut t, p, &mut ctx.next_pids)?;
    state::process_state(&mut t, p, &mut ctx.plan.ghosts)?;
    state::thread_state(&mut t, p)?;
    state::pending_signals(&mut t, p)?;
    let user = p.user_ns.map(|i| &ctx.m.user_namespaces[i]);
    state::identity(&mut t, p, user)?;
    ctx.done.push(t);
    Ok(())
}

/// Forks `child` of `t`: sharing the fd table if it did, in its pid
/// namespace (made for it if it is its first process, `t`'s next children
/// pointed there if not; `children_ns` says where they go now) with its
/// pids there.
fn fork_in_place(
    ctx: &mut Ctx,
    t: &mut Tracee,
    child: i32,
    children_ns: &mut Option<i32>,
) -> Result<Tracee> {
    let p = &ctx.procs[&t.ns_pid];
    let c = &ctx.procs[&child];
    let mut flags = 0;
    if c.shares_parent_files {
        flags |= libc::CLONE_FILES as u64;
    }
    let new_ns = namespaces::starts_namespace(p, c);
    if new_ns {
        flags |= libc::CLONE_NEWPID as u64;
    }
    let want = if new_ns {
        None
    } else {
        namespaces::children_for(p, c)
    };
    namespaces::point_children(t, ctx.procs, p, want, children_ns)?;
    // A child of its parent's own time namespace, which is not where its
    // children go, goes back there.
    let fd = namespaces::back_to_own_time(p, c)
        .then(|| namespaces::own_time_fd(t))
        .transpose()?;
    let ids = namespaces::set_tid(c);
    // A process in its user namespace forks there, a new pid namespace
    // too; one outside has a helper make one of its user namespace.
    let mut ct = if p.in_user_when_forking(ctx.procs) {
        fork_at_next_pid(t, None, &mut ctx.next_pids, &ids, flags)?
    } else if new_ns && c.user_owned.contains(&crate::image::NsKind::Pid) {
        fork_into_user_pid_ns(ctx, t, c)?
    } else {
        fork_child(t, &ids, flags)?
    };
    if let Some(fd) = fd {
        namespaces::join_time(&mut ct, fd, true, c.shares_parent_files)?;
        namespaces::close_time_fd(t, fd)?;
    }
    Ok(ct)
}

/// Makes `t` the leader of its session or group, or joins the group it
/// was in, as recorded.
fn join_session(
    t: &mut Tracee,
    p: &ProcessImage,
    procs: &BTreeMap<i32, ProcessImage>,
) -> Result<()> {
    let pid = p.pid;
    if p.sid == pid {
        let r = t.raw_on(t.pid, libc::SYS_setsid, &[])?;
        if r < 0 {
            tracing::warn!(pid, errno = -r, "session not restored");
        }
    } else if p.pgid == pid {
        t.call("setpgid", libc::SYS_setpgid, &[0, 0])?;
    } else if let Some(pgid) = p.sees(procs, p.pgid) {
        // Joins a group led by a process restored earlier, if it can.
        let _ = t.raw_on(t.pid, libc::SYS_setpgid, &[0, pgid as u64]);
    }
    Ok(())
}

/// Ends a zombie the way it had ended, leaving it for its parent to reap:
/// by `exit_group(code)`, or by its signal with the default action and
/// without a core dump (not dumpable).
fn end_zombie(mut t: Tracee, exit: Exit) -> Result<()> {
    let pid = t.ns_pid;
    let ended = match exit {
        Exit::Code { code } => t.end(libc::SYS_exit_group, &[u64::from(code)])?,
        Exit::Signal { signal } => {
            let sig = nix::sys::signal::Signal::try_from(signal)
                .map_err(|e| rerr(pid, "end a zombie", format!("signal {signal}: {e}")))?;
            t.call(
                "prctl(PR_SET_DUMPABLE)",
                libc::SYS_prctl,
                &[libc::PR_SET_DUMPABLE as u64, 0],
            )?;
            if sig != nix::sys::signal::Signal::SIGKILL {
                // SIG_DFL, no flags, empty mask.
                let a = t.arg(&[0u8; 32])?;
                t.call(
                    "rt_sigaction",
                    libc::SYS_rt_sigaction,
                    &[signal as u64, a, 0, 8],
                )?;
            }
            ptrace::set_sigmask(t.pid, BLOCK_ALL & !(1 << (signal - 1)))?;
            t.end_by_signal(sig)?
        }
    };
    let expected = match exit {
        Exit::Code { code } => Ended::Exited(i32::from(code)),
        Exit::Signal { signal } => Ended::Killed(
            nix::sys::signal::Signal::try_from(signal)
                .map_err(|e| rerr(pid, "end a zombie", e.to_string()))?,
        ),
    };
    if ended != expected {
        return Err(rerr(
            pid,
            "end a zombie",
            format!("it ended by {ended:?}, not {expected:?}"),
        ));
    }
    Ok(())
}

/// Makes session `sid` again, whose leader had exited, for `members`,
/// children of `parent`: a helper forked with the session's id makes the
/// session, forks each member as a child of `parent` (CLONE_PARENT), then
/// exits and is reaped by `parent`, leaving the members in the session.
fn session_helper(
    ctx: &mut Ctx,
    parent: &mut Tracee,
    held: &Held,
    sid: i32,
    members: &[i32],
) -> Result<()> {
    // Members of the parent's own time namespace, which is not where its
    // children go, go back there through an fd the helper passes on.
    let back = |m: &i32| namespaces::back_to_own_time(&ctx.procs[&parent.ns_pid], &ctx.procs[m]);
    let fd = members
        .iter()
        .any(back)
        .then(|| namespaces::own_time_fd(parent))
        .transpose()?;
    let mut h = fork_child(parent, &[sid], 0)?;
    ptrace::set_sigmask(h.pid, BLOCK_ALL)?;
    h.call("setsid", libc::SYS_setsid, &[])?;
    for &m in members {
        // The exit signal of a CLONE_PARENT child is the helper's own (SIGCHLD);
        // clone3 wants none given.
        let args = clone_args(&mut h, libc::CLONE_PARENT as u64, 0, &[m])?;
        let host = clone_in(&mut h, "clone3 (into a session)", args, m)?;
        // The helper holds the parent's memory.
        let mut ct = Tracee::new(m, host, parent.scratch)?;
        if let Some(fd) = fd {
            let join = namespaces::back_to_own_time(&ctx.procs[&parent.ns_pid], &ctx.procs[&m]);
            namespaces::join_time(&mut ct, fd, join, false)?;
        }
        restore_process(ctx, ct, held.clone(), Some(sid), Some(parent.ns_pid))?;
    }
    end_helper(parent, h)?;
    match fd {
        Some(fd) => namespaces::close_time_fd(parent, fd),
        None => Ok(()),
    }
}

/// Ends helper process `h`, a child of `parent`: it exits, then `parent`
/// reaps it and takes the SIGCHLD its exit sent (it is blocked; signals
/// the process really had pending are queued again later).
fn end_helper(parent: &mut Tracee, h: Tracee) -> Result<()> {
    end_and_reap(parent, h)?;
    flush_sigchld(parent)
}

/// Ends helper process `h`, a child of `parent` that `parent` then reaps
/// by its pid as `parent` sees it (in a tree that is a pid namespace of
/// its own, not ours); a helper forked with no exit signal sends none.
pub(super) fn end_and_reap(parent: &mut Tracee, h: Tracee) -> Result<()> {
    let id = h.ns_pid;
    let seen = namespaces::pid_seen_by(parent.pid, h.pid);
    match h.end(libc::SYS_exit, &[0])? {
        Ended::Exited(0) => {}
        other => {
            return Err(rerr(id, "end a helper", format!("{other:?}")));
        }
    }
    parent.call(
        "reap a helper",
        libc::SYS_wait4,
        &[seen? as u64, 0, libc::__WALL as u64, 0],
    )?;
    Ok(())
}

/// Takes a pending SIGCHLD out of `t`'s queue, if there is one.
fn flush_sigchld(t: &mut Tracee) -> Result<()> {
    let set = t.arg(&(1u64 << (libc::SIGCHLD - 1)).to_ne_bytes())?;
    let zero = t.arg(&[0u8; 16])?;
    let r = t.raw_on(t.pid, libc::SYS_rt_sigtimedwait, &[set, 0, zero, 8])?;
    if r < 0 && r != -(libc::EAGAIN as i64) {
        tracing::warn!(pid = t.ns_pid, errno = -r, "SIGCHLD of a helper not taken");
    }
    Ok(())
}

/// Restores the image at `opts.images`. On error every process created so
/// far is killed.
/// A restore that failed leaves nothing: every process of the tree made
/// so far (`known`, and whatever descends from them) is killed, and each
/// thread this process traces or parented is waited for, so that none is
/// left a zombie held by its tracer (a traced thread is reaped by its
/// tracer, thread by thread).
fn discard_tree(known: &[Pid]) {
    let mut all: Vec<Pid> = Vec::new();
    let mut next: Vec<Pid> = known.to_vec();
    while let Some(p) = next.pop() {
        if all.contains(&p) {
            continue;
        }
        all.push(p);
        for tid in tasks(p) {
            let children = crate::procfs::read_text(format!("/proc/{p}/task/{tid}/children"))
                .unwrap_or_default();
            next.extend(
                children
                    .split_whitespace()
                    .filter_map(|c| c.parse().ok())
                    .map(Pid::from_raw),
            );
        }
    }
    let mut threads: Vec<Pid> = all.iter().flat_map(|p| tasks(*p)).collect();
    for p in &all {
        let _ = kill(*p, Signal::SIGKILL);
    }
    // Never waited for without end: a task whose end is reported to
    // another (one of the tree's processes it was reparented to) would
    // hold the restore's error back for ever.
    crate::ptrace::collect_deaths(&mut threads, |_| true, |_| false, DISCARD_WAIT);
    for tid in threads {
        tracing::warn!(
            tid = tid.as_raw(),
            "a task of a failed restore was not reaped"
        );
    }
}

/// How long a failed restore waits for its processes to be reaped.
const DISCARD_WAIT: Duration = Duration::from_secs(5);

/// The threads of process `p`.
fn tasks(p: Pid) -> Vec<Pid> {
    std::fs::read_dir(format!("/proc/{p}/task"))
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .map(Pid::from_raw)
                .collect()
        })
        .unwrap_or_default()
}

pub fn restore(opts: &RestoreOptions) -> Result<Restored> {
    let start = Instant::now();
    let (img, m, procs) = load(opts.images)?;
    let root = procs
        .get(&m.root)
        .ok_or_else(|| rerr(m.root, "read the image", "the root process is missing"))?;
    let mut flags = opts.root_flags;
    // The tree's network namespace is not the restorer's then.
    let to_host = procs
        .values()
        .find(|p| p.own_net.as_ref().is_some_and(|n| !n.host_veths.is_empty()));
    if let Some(p) = to_host
        && flags & libc::CLONE_NEWNET as u64 != 0
    {
        return Err(rerr(
            p.pid,
            "read the image",
            "a veth to the restorer's network namespace, in a tree restored in a new one",
        ));
    }
    if m.own_pid_ns {
        flags |= libc::CLONE_NEWPID as u64;
        if let Some(outer) = m.outer_pid
            && std::path::Path::new(&format!("/proc/{outer}")).exists()
        {
            return Err(Error::PidTaken(outer));
        }
    } else {
        for p in procs.values() {
            for id in std::iter::once(p.pid).chain(p.threads.iter().map(|t| t.tid)) {
                if let Ok(st) = crate::procfs::read_text(format!("/proc/{id}/stat")) {
                    let rest = st.rfind(')').map(|i| &st[i + 2..]).unwrap_or("");
                    let mut f = rest.split(' ');
                    if f.next() == Some("Z") {
                        let parent = f.next().and_then(|p| p.parse().ok()).unwrap_or(0);
                        return Err(Error::PidZombie { pid: id, parent });
                    }
                    return Err(Error::PidTaken(id));
                }
            }
        }
    }
    let scratch = choose_scratch(&procs)?;
    let mut children: BTreeMap<i32, Vec<i32>> = BTreeMap::new();
    let mut sharers: BTreeMap<i32, Vec<i32>> = BTreeMap::new();
    for p in procs.values() {
        if let Some(s) = p.shares_files_with {
            sharers.entry(s).or_default().push(p.pid);
        } else if let Some(parent) = p.parent {
            children.entry(parent).or_default().push(p.pid);
        }
    }
    let mut ctx = Ctx {
        img: &img,
        m: &m,
        procs: &procs,
        children,
        sharers,
        plan: {
            let mut plan = FilePlan::new(&m, &procs);
            if let Some(place) = &opts.ghosts {
                plan.ghosts.place = place.clone();
            }
            plan
        },
        mem: MemCtx {
            img: &img,
            shmem: &m.shmem,
            handles: Default::default(),
            // Inherited by every skeleton, for passing files in.
            transport: sockets::Transport::new()?,
            lazy: opts.lazy_pages.then(lazy::LazyPages::default),
            sysv_makers: mm::sysv_makers(&m.shmem, &procs, m.root),
            sysv_ns: Default::default(),
            remade_devices: mounts::remade_devices(&procs),
        },
        done: Vec::new(),
        orphan_sessions: orphan_sessions(&m, &procs),
        root_new_ipc: flags & libc::CLONE_NEWIPC as u64 != 0,
        users: namespaces::make_users(&m)?,
        next_pids: namespaces::NextPids::Ours,
        early_veths: netns::EarlyVeths::make(&procs)?,
    };
    let root_pid = spawn_root(root, m.outer_pid, flags, opts.root_setup, scratch)?;
    let prepared = match opts.after_spawn {
        Some(f) => f(root_pid).map_err(|e| rerr(root.pid, "prepare the root", e)),
        None => Ok(()),
    };
    let outcome = prepared
        .and_then(|()| Tracee::new(root.pid, root_pid, scratch))
        .and_then(|t| {
            // Room for the temporary fds: the soft limit up to the hard one.
            let lim = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
                .map_err(|e| Error::io("fd limit")(e.into()))?;
            let mut t = t;
            let b: Vec<u8> = [lim.1, lim.1]
                .iter()
                .flat_map(|v| v.to_ne_bytes())
                .collect();
            let a = t.arg(&b)?;
            let _ = t.raw_on(
                t.pid,
                crate::nr::SYS_prlimit64,
                &[0, libc::RLIMIT_NOFILE as u64, a, 0],
            );
            ctx.next_pids = namespaces::NextPids::for_tree(&mut t, &m, &procs, &ctx.mem.transport)?;
            restore_process(&mut ctx, t, Held::new(), m.outer_session, None)?;
            let next = std::mem::replace(&mut ctx.next_pids, namespaces::NextPids::Ours);
            match ctx.done.iter_mut().find(|t| t.ns_pid == m.root) {
                Some(root) => next.finish(root),
                None => Ok(()),
            }
        });
    let outcome = outcome.and_then(|()| {
        mm::seal_memfds(&ctx.mem)?;
        // Connections leave repair mode before their processes run: the
        // window probe each sends makes its peer resend what it lacks.
        // Unless the caller is to replace them: they stay silent.
        let started = Instant::now();
        // The peers may reach the connections again.
        if let Some(table) = &m.net_lock
            && let Err(e) = crate::netlock::unlock(table)
        {
            tracing::warn!("the network lock {table} stays: {e}");
        }
        if opts.keep_repair {
            ctx.plan.repaired.clear();
        }
        for s in ctx.plan.repaired.drain(..) {
            s.finish()
                .map_err(|e| rerr(root.pid, "sockets", format!("leave repair mode: {e}")))?;
        }
        ctx.plan.socket_time += started.elapsed();
        // Pidfds and signal owners may name any process or thread of the
        // tree, which now all exist.
        for t in ctx.done.iter_mut() {
            files::make_pidfds(t, &procs[&t.ns_pid], &m)?;
            files::make_ns_files(t, &procs[&t.ns_pid], &procs, &m)?;
        }
        // Only once every pidfd is made: a child sharing its parent's fd
        // table is done before the parent, who makes the table's pidfds.
        for t in ctx.done.iter_mut() {
            files::register_pidfds(t, &procs[&t.ns_pid], &m, &mut ctx.plan)?;
        }
        let mut owned = std::collections::HashSet::new();
        for t in ctx.done.iter_mut() {
            files::set_owners(t, &procs[&t.ns_pid], &procs, &m, &mut owned)?;
        }
        ctx.plan.ptys.finish(&m)?;
        // Files in flight once every file exists, pidfds included.
        files::pass_in_flight(&mut ctx.done, &procs, &m, &img, &mut ctx.plan)?;
        // Every file is open: the names of the deleted files recreated go,
        // and with them the events their removal queued.
        ctx.plan.ghosts.remove();
        for t in ctx.done.iter_mut() {
            files::drain_notifications(t, &procs[&t.ns_pid], &m)?;
        }
        // Everything is in place: seccomp's strict mode, whose process
        // takes the engine's calls only while its seccomp is suspended;
        // then drop the scratch regions and let go.
        for t in ctx.done.iter_mut() {
            if procs[&t.ns_pid].seccomp_strict {
                state::strict_mode(t)?;
            }
            t.call(
                "unmap the scratch region",
                libc::SYS_munmap,
                &[t.scratch, SCRATCH_SIZE],
            )?;
        }
        for t in &ctx.done {
            state::release(t, &procs[&t.ns_pid])?;
        }
        ctx.early_veths.keep();
        Ok(())
    });
    // Also when the restore failed.
    ctx.plan.ghosts.remove();
    // The tree runs (or is about to go): the copiers take the rest.
    if let Some(lazy) = &ctx.mem.lazy {
        lazy.let_go();
    }
    if let Err(e) = outcome {
        tracing::debug!("the restore failed ({e}): its processes go");
        let mut pids: Vec<Pid> = ctx.done.iter().map(|t| t.pid).collect();
        pids.push(root_pid);
        discard_tree(&pids);
        // Their processes gone, the copiers end.
        if let Some(lazy) = &ctx.mem.lazy {
            let _ = lazy.wait();
        }
        return Err(e);
    }
    Ok(Restored {
        root: root_pid,
        processes: procs.len(),
        threads: procs.values().map(|p| p.threads.len()).sum(),
        took: start.elapsed(),
        sockets: ctx.plan.socket_time,
        pages: ctx.mem.lazy.take().unwrap_or_default(),
    })
}
