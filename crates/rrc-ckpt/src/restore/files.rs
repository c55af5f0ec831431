//! Open files and fd tables.
//!
//! Each open file description is created once, in the lowest process of
//! the tree that is an ancestor of (or is) every process using it, at a
//! temporary fd above every fd number the tree uses; children inherit it
//! when they are forked. Once a process's children exist, it moves the
//! files it uses to their recorded numbers and closes everything else.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;

use crate::image::{FileKind, ImageDir, LockKind, Manifest, MarkOn, OpenFile, ProcessImage};
use crate::restore::mm::{MemCtx, create_memfd};
use crate::restore::sockets;
use crate::restore::tracee::Tracee;
use crate::{Error, Result, nr, sys};

/// The most room [`make_room`] gives an fd table, whatever an image says
/// (an entry costs 8 bytes of kernel memory, and an image is not trusted).
const MAX_FD_TABLE: u32 = 1 << 16;

fn rerr(pid: i32, stage: &'static str, detail: String) -> Error {
    Error::Restore { pid, stage, detail }
}

/// A call the process could not make, as a restore error of `stage` that
/// says what it was for (`what`) and the errno; other errors as they are.
fn failed_call(pid: i32, stage: &'static str, what: String) -> impl FnOnce(Error) -> Error {
    move |e| match e {
        Error::RemoteFailed { errno, .. } => rerr(pid, stage, format!("{what}: {errno}")),
        e => e,
    }
}

/// Where each open file is created and what must stay open meanwhile.
pub struct FilePlan {
    pub creator: HashMap<usize, i32>,
    /// Which process registers target `i` of epoll `id`: `(id, i)`.
    registrar: HashMap<(usize, usize), i32>,
    /// The same for targets that are pidfds, registered once the pidfds
    /// are made ([`register_pidfds`]), by a process holding the epoll and
    /// the pidfd at the number it was registered under.
    pidfd_registrar: HashMap<(usize, usize), i32>,
    /// Epolls given an armed registration so far.
    armed: HashSet<usize>,
    /// Pipes with an end outside the tree, and the stdio slot (0, 1, 2) the
    /// tree had them at, if any: those become the restorer's own stdio.
    external: HashMap<usize, Option<i32>>,
    /// First fd number above every number the tree uses.
    pub temp_base: u64,
    /// Files held by the engine until the restore ends (FIFO ends, ghosts).
    pub keep_open: Vec<File>,
    /// Where deleted files are recreated for the process to open, until
    /// the restore ends.
    pub ghosts: Ghosts,
    /// Restored TCP connections, in repair mode until the tree is let go.
    pub repaired: Vec<sockets::Repaired>,
    /// Unix sockets whose queues carry files in flight, filled once every
    /// file exists ([`pass_in_flight`]).
    pub deferred: Vec<sockets::Deferred>,
    /// Time spent building and passing sockets.
    pub socket_time: std::time::Duration,
    /// Deleted files only mappings hold, by (device, inode): a watch on
    /// one is made on its recreation too.
    mapped_ghosts: HashMap<(u64, u64), crate::image::Owner>,
    /// POSIX message queues made so far.
    pub queues: crate::restore::mqueue::Made,
    /// Pseudo-terminal pairs made so far.
    pub ptys: crate::restore::pty::Made,
    /// TUN/TAP files made with their interfaces, by id, until their
    /// creators take them.
    pub tuns: HashMap<usize, std::os::fd::OwnedFd>,
}

impl FilePlan {
    pub fn new(m: &Manifest, procs: &BTreeMap<i32, ProcessImage>) -> FilePlan {
        let parent: HashMap<i32, Option<i32>> = procs.values().map(|p| (p.pid, p.parent)).collect();
        let ancestors = |pid: i32| {
            let mut chain = vec![pid];
            let mut cur = pid;
            while let Some(Some(p)) = parent.get(&cur) {
                chain.push(*p);
                cur = *p;
            }
            chain
        };
        let lca = |pids: &[i32]| -> i32 {
            let mut common: Option<Vec<i32>> = None;
            for &p in pids {
                let a = ancestors(p);
                common = Some(match common {
                    None => a,
                    Some(c) => c.into_iter().filter(|x| a.contains(x)).collect(),
                });
            }
            common.and_then(|c| c.first().copied()).unwrap_or(m.root)
        };
        // Users of each file, counting both ends of a pipe as one unit.
        let mut users: HashMap<usize, Vec<i32>> = HashMap::new();
        let mut max_fd = 2;
        for p in procs.values() {
            for fd in &p.fds {
                users.entry(fd.file).or_default().push(p.pid);
                max_fd = max_fd.max(fd.fd);
            }
        }
        // Epoll targets are registered under their old numbers, which
        // must not be temporary ones.
        for f in &m.files {
            if let FileKind::Epoll { targets } = &f.kind {
                for tg in targets {
                    max_fd = max_fd.max(tg.fd);
                }
            }
        }
        // Each registration is made once, by the first process holding
        // both the epoll and its target.
        let mut registrar: HashMap<(usize, usize), i32> = HashMap::new();
        let mut pidfd_registrar: HashMap<(usize, usize), i32> = HashMap::new();
        let is_pidfd = |file: usize| {
            matches!(
                m.files.get(file).map(|f| &f.kind),
                Some(FileKind::PidFd { .. })
            )
        };
        for pid in &m.processes {
            let Some(p) = procs.get(pid) else { continue };
            let has: HashSet<usize> = p.fds.iter().map(|fd| fd.file).collect();
            for &id in &has {
                let Some(FileKind::Epoll { targets }) = m.files.get(id).map(|f| &f.kind) else {
                    continue;
                };
                for (i, tg) in targets.iter().enumerate() {
                    match tg.file {
                        Some(file) if is_pidfd(file) && p.can_register(id, file) => {
                            pidfd_registrar.entry((id, i)).or_insert(*pid);
                        }
                        Some(file) if is_pidfd(file) => {}
                        Some(file) if has.contains(&file) => {
                            registrar.entry((id, i)).or_insert(*pid);
                        }
                        _ => {}
                    }
                }
            }
        }
        // Files made together: the two ends of a pipe; unix sockets
        // connected to each other, to a bound socket of the tree, or
        // waiting in a listener's queue, with that listener. Pipe and
        // socket inodes come from one counter.
        let mut joined = Joined::default();
        for f in &m.files {
            match &f.kind {
                FileKind::UnixConnected { ino, peer, .. } if *peer != 0 => {
                    joined.join(u64::from(*ino), u64::from(*peer));
                }
                FileKind::UnixListen { ino, pending, .. } => {
                    for e in pending {
                        joined.join(u64::from(*ino), u64::from(*e));
                    }
                }
                _ => {}
            }
        }
        let mut pipe_ends: HashMap<u64, Vec<usize>> = HashMap::new();
        let group_of = |f: &OpenFile| -> Option<u64> {
            match f.kind {
                FileKind::Pipe { pipe, .. } => Some(pipe),
                _ => f
                    .kind
                    .unix_ino()
                    .filter(|&ino| ino != 0)
                    .map(|ino| joined.root(u64::from(ino))),
            }
        };
        for f in &m.files {
            if let Some(g) = group_of(f) {
                pipe_ends.entry(g).or_default().push(f.id);
            }
        }
        let mut creator = HashMap::new();
        let mut external = HashMap::new();
        for f in &m.files {
            let group: Vec<usize> = match group_of(f) {
                Some(g) => pipe_ends[&g].clone(),
                None => vec![f.id],
            };
            let all: Vec<i32> = group
                .iter()
                .flat_map(|id| users.get(id).cloned().unwrap_or_default())
                .collect();
            creator.insert(f.id, lca(&all));
            // One end in the tree and the other open outside it (an end
            // whose other side is closed is just made and closed again);
            // a terminal whose master is outside.
            let outer_pipe = matches!(
                f.kind,
                FileKind::Pipe {
                    peer_closed: false,
                    ..
                }
            ) && group.len() == 1;
            if outer_pipe || matches!(f.kind, FileKind::OuterTerminal { .. }) {
                let slot = procs
                    .values()
                    .flat_map(|p| p.fds.iter())
                    .find(|fd| fd.file == f.id && fd.fd <= 2)
                    .map(|fd| fd.fd);
                external.insert(f.id, slot);
            }
        }
        FilePlan {
            creator,
            registrar,
            pidfd_registrar,
            armed: HashSet::new(),
            external,
            temp_base: max_fd as u64 + 1,
            keep_open: Vec::new(),
            ghosts: Ghosts::default(),
            repaired: Vec::new(),
            deferred: Vec::new(),
            socket_time: std::time::Duration::ZERO,
            mapped_ghosts: procs
                .values()
                .flat_map(|p| p.vmas.iter())
                .filter_map(crate::image::Vma::deleted_file)
                .collect(),
            queues: Default::default(),
            ptys: Default::default(),
            tuns: HashMap::new(),
        }
    }
}

/// Inodes joined into groups (union-find, without ranks: groups are
/// small).
#[derive(Default)]
struct Joined {
    up: HashMap<u64, u64>,
}

impl Joined {
    fn root(&self, mut x: u64) -> u64 {
        while let Some(&u) = self.up.get(&x) {
            x = u;
        }
        x
    }

    fn join(&mut self, a: u64, b: u64) {
        let (ra, rb) = (self.root(a), self.root(b));
        if ra != rb {
            self.up.insert(ra, rb);
        }
    }
}

/// Which files a process holds, and at which fd.
pub type Held = HashMap<usize, u64>;

/// Moves `fd` to the first free number at or above the temporary base.
fn stash(t: &mut Tracee, fd: u64, plan: &FilePlan) -> Result<u64> {
    let high = t.call(
        "move an fd out of the way",
        nr::SYS_fcntl,
        &[fd, libc::F_DUPFD as u64, plan.temp_base],
    )?;
    t.call("close", nr::SYS_close, &[fd])?;
    Ok(high)
}

/// Creates the files `t` is the creator of; records where they are.
pub fn create_owned(
    t: &mut Tracee,
    m: &Manifest,
    img: &ImageDir,
    plan: &mut FilePlan,
    mem: &mut MemCtx,
    held: &mut Held,
) -> Result<()> {
    let pid = t.ns_pid;
    let (sockets, mine): (Vec<&OpenFile>, Vec<&OpenFile>) = m
        .files
        .iter()
        .filter(|f| plan.creator.get(&f.id) == Some(&pid) && !held.contains_key(&f.id))
        .partition(|f| sockets::is_socket(f));
    if !sockets.is_empty() {
        let mut repaired = Vec::new();
        let got = sockets::create(
            t,
            &sockets,
            img,
            &mem.transport,
            &mut repaired,
            &mut plan.deferred,
        )?;
        plan.repaired.extend(repaired);
        for (id, fd) in got {
            let fd = stash(t, fd, plan)?;
            held.insert(id, fd);
        }
    }
    for f in mine {
        if held.contains_key(&f.id) {
            continue; // the other end of a pipe made it already
        }
        match plan.external.get(&f.id) {
            Some(Some(slot)) => {
                // The restorer's own stdio stands in for the outside end.
                let fd = t.call(
                    "take the restorer's stdio",
                    nr::SYS_fcntl,
                    &[*slot as u64, libc::F_DUPFD as u64, plan.temp_base],
                )?;
                held.insert(f.id, fd);
                continue;
            }
            // A terminal held at no stdio fd goes on to `create`, which
            // refuses it.
            Some(None) if matches!(f.kind, FileKind::Pipe { .. }) => {
                tracing::warn!(
                    pid,
                    file = f.id,
                    "a pipe to a process outside the tree is restored unconnected"
                );
            }
            Some(None) | None => {}
        }
        if let FileKind::Pipe { pipe, .. } = f.kind {
            let (rd, wr) = make_pipe(t, m, img, f, pipe)?;
            let (rd, wr) = (stash(t, rd, plan)?, stash(t, wr, plan)?);
            // The first open file of each end is the pipe's own; any other
            // (an end opened again through /proc) is opened anew.
            let (mut rd_used, mut wr_used) = (false, false);
            for other in m
                .files
                .iter()
                .filter(|o| matches!(o.kind, FileKind::Pipe { pipe: p, .. } if p == pipe))
            {
                let write_end = matches!(
                    other.kind,
                    FileKind::Pipe {
                        write_end: true,
                        ..
                    }
                );
                let (end, used) = if write_end {
                    (wr, &mut wr_used)
                } else {
                    (rd, &mut rd_used)
                };
                let fd = if std::mem::replace(used, true) {
                    let again = reopen_own(t, end, other.flags)?;
                    stash(t, again, plan)?
                } else {
                    end
                };
                set_flags(t, fd, other.flags)?;
                held.insert(other.id, fd);
            }
            if !held.values().any(|&v| v == rd) {
                t.call("close", nr::SYS_close, &[rd])?;
            }
            if !held.values().any(|&v| v == wr) {
                t.call("close", nr::SYS_close, &[wr])?;
            }
            continue;
        }
        let fd = create(t, f, img, plan, mem, m)?;
        let fd = stash(t, fd, plan)?;
        // What opening may set otherwise (O_NONBLOCK of a FIFO).
        set_flags(t, fd, f.flags)?;
        held.insert(f.id, fd);
    }
    // A fired one-shot registration can only be made as it was while its
    // epoll is new: before anything else is registered in it.
    register_epoll_targets(t, m, held, plan, true)?;
    let _ = pid;
    Ok(())
}

/// A new open file of what `fd` of `t` is, opened through /proc with the
/// access mode of `flags` (and without blocking, as opening a pipe's end
/// may); returns its fd.
fn reopen_own(t: &mut Tracee, fd: u64, flags: u32) -> Result<u64> {
    let path = format!("/proc/self/fd/{fd}");
    let access = flags & libc::O_ACCMODE as u32;
    open_path(
        t,
        &path,
        access | (libc::O_NONBLOCK | libc::O_CLOEXEC) as u32,
    )
}

/// The status flags `F_SETFL` can change.
const SETTABLE: u32 =
    (libc::O_APPEND | libc::O_NONBLOCK | libc::O_ASYNC | libc::O_DIRECT | libc::O_NOATIME) as u32;

fn set_flags(t: &mut Tracee, fd: u64, flags: u32) -> Result<()> {
    // Only the flags F_SETFL can change; the access mode was set at open.
    // O_ASYNC waits for the file's final fd number ([`set_owners`]).
    let settable = SETTABLE & !(libc::O_ASYNC as u32);
    t.call(
        "set file status flags",
        nr::SYS_fcntl,
        &[fd, libc::F_SETFL as u64, u64::from(flags & settable)],
    )?;
    Ok(())
}

/// A pipe with its saved contents and capacity; returns (read, write) fds.
fn make_pipe(
    t: &mut Tracee,
    m: &Manifest,
    img: &ImageDir,
    f: &OpenFile,
    pipe: u64,
) -> Result<(u64, u64)> {
    let pid = t.ns_pid;
    let out = t.out(8)?;
    t.call("pipe2", nr::SYS_pipe2, &[out, 0])?;
    let mut b = [0u8; 8];
    crate::procmem::read(t.pid, out, &mut b)?;
    let rd = u64::from(u32::from_ne_bytes(b[0..4].try_into().expect("4 bytes")));
    let wr = u64::from(u32::from_ne_bytes(b[4..8].try_into().expect("4 bytes")));
    let (capacity, packets) = m
        .files
        .iter()
        .find_map(|o| match &o.kind {
            FileKind::Pipe {
                pipe: p,
                capacity,
                packets,
                ..
            } if *p == pipe => Some((*capacity, packets.as_slice())),
            _ => None,
        })
        .unwrap_or((65536, &[]));
    let _ = t.raw_on(
        t.pid,
        nr::SYS_fcntl,
        &[wr, libc::F_SETPIPE_SZ as u64, u64::from(capacity)],
    );
    let data_path = img.pipe_data(pipe);
    let data = fs::read(&data_path).unwrap_or_default();
    if !data.is_empty() {
        let mut w = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(format!("/proc/{}/fd/{wr}", t.pid))
            .map_err(|e| rerr(pid, "pipe data", e.to_string()))?;
        if !packets.is_empty() {
            // Packets are written one by one through a packet-mode writer
            // (which only F_SETFL makes: opening with O_DIRECT is refused).
            let flags = nix::fcntl::OFlag::O_NONBLOCK | nix::fcntl::OFlag::O_DIRECT;
            nix::fcntl::fcntl(&w, nix::fcntl::FcntlArg::F_SETFL(flags))
                .map_err(|e| rerr(pid, "pipe data", format!("packet mode: {e}")))?;
        }
        let whole = [data.len() as u32];
        let runs = if packets.is_empty() {
            &whole[..]
        } else {
            packets
        };
        if runs.iter().map(|&n| n as usize).sum::<usize>() != data.len() {
            return Err(rerr(
                pid,
                "pipe data",
                format!(
                    "pipe {pipe}: its packets do not add up to its {} bytes",
                    data.len()
                ),
            ));
        }
        let mut at = 0;
        for &n in runs {
            let chunk = &data[at..at + n as usize];
            // A packet must go in one write.
            let wrote = w
                .write(chunk)
                .map_err(|e| rerr(pid, "pipe data", format!("{} bytes: {e}", data.len())))?;
            if wrote != chunk.len() {
                w.write_all(&chunk[wrote..])
                    .map_err(|e| rerr(pid, "pipe data", format!("{} bytes: {e}", data.len())))?;
            }
            at += n as usize;
        }
    }
    let _ = f;
    Ok((rd, wr))
}

fn open_path(t: &mut Tracee, path: &str, flags: u32) -> Result<u64> {
    let a = t.arg_str(path)?;
    let clean = flags & !((libc::O_CREAT | libc::O_EXCL | libc::O_TRUNC | libc::O_NOCTTY) as u32);
    t.call(
        "open a file",
        nr::SYS_openat,
        &[libc::AT_FDCWD as u64, a, u64::from(clean)],
    )
    .map_err(|e| match e {
        Error::RemoteFailed { errno, .. } => {
            rerr(t.ns_pid, "open a file", format!("{path}: {errno}"))
        }
        e => e,
    })
}

/// Opens device `rdev` at `path` in `t`: the device the image names, not
/// whatever is at its path now.
fn open_device(t: &mut Tracee, path: &str, rdev: u64, flags: u32) -> Result<u64> {
    let fd = open_path(t, path, flags)?;
    let found = fs::metadata(format!("/proc/{}/fd/{fd}", t.pid))
        .map(|m| std::os::unix::fs::MetadataExt::rdev(&m));
    if found.as_ref().ok() != Some(&rdev) {
        return Err(rerr(
            t.ns_pid,
            "open a device",
            format!("{path} is not device {rdev:#x} ({found:?})"),
        ));
    }
    Ok(fd)
}

/// Creates one (non-pipe) open file in `t`; returns its fd.
fn create(
    t: &mut Tracee,
    f: &OpenFile,
    img: &ImageDir,
    plan: &mut FilePlan,
    mem: &mut MemCtx,
    m: &Manifest,
) -> Result<u64> {
    let pid = t.ns_pid;
    let nonblock = u64::from(f.flags & libc::O_NONBLOCK as u32 != 0);
    Ok(match &f.kind {
        FileKind::Regular {
            path,
            pos,
            deleted,
            mode,
            ghost,
            handle,
            ..
        } => {
            if let Some(h) = handle {
                match open_handle(t, h, f.flags, &mem.transport) {
                    Ok(fd) => {
                        t.call("seek", nr::SYS_lseek, &[fd, *pos, libc::SEEK_SET as u64])?;
                        return Ok(fd);
                    }
                    Err(e) => tracing::warn!(
                        pid,
                        file = f.id,
                        "{path}: the deleted file linked elsewhere cannot be opened again ({e}): \
                         a copy of its content stands in"
                    ),
                }
            }
            let path = if *deleted {
                let (key, owner) = match ghost {
                    Some((dev, ino, owner)) => ((*dev, *ino), Some(*owner)),
                    // Older images: by open file, with its mode.
                    None => ((u64::MAX, f.id as u64), None),
                };
                let owner = owner.unwrap_or(crate::image::Owner {
                    uid: 0,
                    gid: 0,
                    mode: *mode,
                });
                let data = img.file_data(f.id);
                let ghost = GhostDir::made(&mut plan.ghosts, key, &data, owner)
                    .map_err(|e| rerr(pid, "recreate a deleted file", format!("{path}: {e}")))?;
                ghost.to_string_lossy().into_owned()
            } else {
                path.clone()
            };
            let fd = open_path(t, &path, f.flags)?;
            t.call("seek", nr::SYS_lseek, &[fd, *pos, libc::SEEK_SET as u64])?;
            fd
        }
        FileKind::Directory {
            path,
            deleted: None,
        } => open_path(t, path, f.flags | libc::O_DIRECTORY as u32)?,
        FileKind::Directory {
            path,
            deleted: Some(owner),
        } => {
            let (dir, inside) = GhostDir::empty_dir(&mut plan.ghosts, *owner)
                .map_err(|e| rerr(pid, "recreate a deleted directory", format!("{path}: {e}")))?;
            let fd = open_path(
                t,
                &inside.to_string_lossy(),
                f.flags | libc::O_DIRECTORY as u32,
            )?;
            fs::remove_dir(&dir)
                .map_err(|e| rerr(pid, "recreate a deleted directory", format!("{path}: {e}")))?;
            fd
        }
        FileKind::CharDevice { path, rdev } => open_device(t, path, *rdev, f.flags)?,
        // Made with its interface ([`crate::restore::netns::fill`]).
        FileKind::Tun { iface, .. } => {
            let Some(file) = plan.tuns.remove(&f.id) else {
                return Err(rerr(
                    pid,
                    "TUN/TAP file",
                    format!("a file of {iface} its network namespace did not make"),
                ));
            };
            mem.transport.pass(t, file.as_fd())?
        }
        // Stood in for by the restorer's stdio (see `external`), where
        // the tree held it at a stdio fd.
        FileKind::OuterTerminal { path, .. } => {
            return Err(rerr(
                pid,
                "terminal",
                format!("{path}: a terminal outside the tree held at no stdio fd"),
            ));
        }
        FileKind::Fifo { path, pipe } => {
            // Held open read-write by the engine, the FIFO has a reader and
            // a writer, so the process's open cannot block or fail.
            // Opened where the process sees its files.
            let keeper = crate::common::in_view_of(t.pid, || {
                OpenOptions::new()
                    .read(true)
                    .write(true)
                    .custom_flags(libc::O_NONBLOCK)
                    .open(path)
            })?
            .map_err(|e| rerr(pid, "open a FIFO", format!("{path}: {e}")))?;
            let is_fifo = keeper
                .metadata()
                .is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_fifo(&m.file_type()));
            if !is_fifo {
                return Err(rerr(pid, "open a FIFO", format!("{path} is not a FIFO")));
            }
            let data = fs::read(img.pipe_data(*pipe)).unwrap_or_default();
            if !data.is_empty() {
                (&keeper)
                    .write_all(&data)
                    .map_err(|e| rerr(pid, "FIFO data", e.to_string()))?;
            }
            plan.keep_open.push(keeper);
            let fd = open_path(t, path, f.flags | libc::O_NONBLOCK as u32)?;
            set_flags(t, fd, f.flags)?;
            fd
        }
        FileKind::Pipe { .. } => unreachable!("pipes are made in pairs by make_pipe"),
        // Its process may not exist yet: a placeholder takes its numbers
        // until [`make_pidfds`] (a namespace file's: [`make_ns_files`]).
        FileKind::PidFd { .. } | FileKind::NsFile { .. } => {
            t.call("eventfd2 (a pidfd's place)", nr::SYS_eventfd2, &[0, 0])?
        }
        // A process of the engine's ends as that one did and is reaped
        // ([`check_pidfds`] made sure a process can end so).
        FileKind::PidFdReaped { status } => {
            let ending = status.and_then(sys::Ending::of_status);
            if let Some(sys::Ending::Signal { core: true, signal }) = ending {
                tracing::warn!(
                    pid,
                    file = f.id,
                    "a reaped pidfd's process had dumped core on signal {signal}: \
                     it ends by that signal again, without a core"
                );
            }
            let flags = f.flags & (libc::O_NONBLOCK | libc::O_EXCL) as u32;
            // Made in the process's PID namespace: a pidfd of another
            // namespace than the process's (or one below it) gives no exit
            // status and takes no signal there.
            let pidfd = crate::common::in_ns_of(t.pid, crate::common::Ns::Pid, || {
                sys::reaped_pidfd(ending, flags)
            })?
            .map_err(|e| rerr(pid, "pidfds", format!("a reaped pidfd: {e}")))?;
            mem.transport.pass(t, pidfd.as_fd())?
        }
        FileKind::EventFd { count, semaphore } => {
            let flags = if *semaphore { libc::EFD_SEMAPHORE } else { 0 }
                | if nonblock != 0 { libc::EFD_NONBLOCK } else { 0 };
            let fd = t.call("eventfd2", nr::SYS_eventfd2, &[0, flags as u64])?;
            if *count > 0 {
                let a = t.arg(&count.to_ne_bytes())?;
                t.call("set the eventfd count", nr::SYS_write, &[fd, a, 8])?;
            }
            fd
        }
        FileKind::SignalFd { mask } => {
            let a = t.arg(&mask.to_ne_bytes())?;
            let flags = if nonblock != 0 { libc::SFD_NONBLOCK } else { 0 };
            t.call(
                "signalfd4",
                nr::SYS_signalfd4,
                &[u64::MAX, a, 8, flags as u64],
            )?
        }
        FileKind::TimerFd {
            clock,
            interval_ns,
            value_ns,
            ticks,
        } => {
            let flags = if nonblock != 0 { libc::TFD_NONBLOCK } else { 0 };
            let fd = t.call(
                "timerfd_create",
                nr::SYS_timerfd_create,
                &[*clock as u64, flags as u64],
            )?;
            if *value_ns > 0 || *interval_ns > 0 {
                let mut spec = Vec::new();
                for ns in [interval_ns, value_ns] {
                    spec.extend_from_slice(&(ns / 1_000_000_000).to_ne_bytes());
                    spec.extend_from_slice(&(ns % 1_000_000_000).to_ne_bytes());
                }
                // A timer that had just expired resumes at once, not never.
                if *value_ns == 0 {
                    spec[16..24].copy_from_slice(&0u64.to_ne_bytes());
                    spec[24..32].copy_from_slice(&1u64.to_ne_bytes());
                }
                let a = t.arg(&spec)?;
                t.call("timerfd_settime", nr::SYS_timerfd_settime, &[fd, 0, a, 0])?;
            }
            if *ticks > 0 {
                const TFD_IOC_SET_TICKS: u64 = 0x4008_5400;
                let a = t.arg(&ticks.to_ne_bytes())?;
                let _ = t.raw_on(t.pid, libc::SYS_ioctl, &[fd, TFD_IOC_SET_TICKS, a]);
            }
            fd
        }
        FileKind::Epoll { .. } => t.call("epoll_create1", nr::SYS_epoll_create1, &[0])?,
        FileKind::Inotify { watches } => inotify(t, f, watches, plan, img, m)?,
        FileKind::Fanotify {
            init_flags,
            event_flags,
            marks,
        } => {
            let fd = fanotify(t, *init_flags, *event_flags, marks, plan, img, m)?;
            set_flags(t, fd, f.flags)?;
            fd
        }
        FileKind::PosixQueue { queue } => {
            crate::restore::mqueue::open(t, &mut plan.queues, m, *queue, f.flags, &mem.transport)?
        }
        FileKind::PtyMaster { pty } => {
            let fd = plan.ptys.master(t, m, *pty, &mem.transport)?;
            set_flags(t, fd, f.flags)?;
            fd
        }
        FileKind::PtyTerminal { pty } => {
            let fd = plan.ptys.terminal(t, m, *pty, f.flags, &mem.transport)?;
            set_flags(t, fd, f.flags)?;
            fd
        }
        FileKind::Memfd { shmem, pos } => {
            let fd = match mem.reopen(t, *shmem)? {
                Some(fd) => fd,
                None => {
                    let obj = m.shmem.iter().find(|o| o.id == *shmem).ok_or_else(|| {
                        rerr(
                            pid,
                            "memfd",
                            format!("shared memory object {shmem} missing"),
                        )
                    })?;
                    let name = match &obj.kind {
                        crate::image::ShmemKind::Memfd { name, .. } => name.clone(),
                        _ => String::new(),
                    };
                    let fd = create_memfd(t, &name, obj, img)?;
                    mem.keep(*shmem, &format!("/proc/{}/fd/{fd}", t.pid), pid)?;
                    fd
                }
            };
            // An open file of its own, with its own access mode and
            // offset, like the one the process had.
            let own = reopen_own(t, fd, f.flags)?;
            t.call("close", nr::SYS_close, &[fd])?;
            t.call("seek", nr::SYS_lseek, &[own, *pos, libc::SEEK_SET as u64])?;
            own
        }
        FileKind::Tcp { .. }
        | FileKind::TcpListen { .. }
        | FileKind::Inet { .. }
        | FileKind::UnixListen { .. }
        | FileKind::UnixConnected { .. }
        | FileKind::Unix { .. } => unreachable!("sockets are built by the engine"),
    })
}

/// `fanotify_mark` flags.
const FAN_MARK_ADD: u32 = 0x1;
const FAN_MARK_DONT_FOLLOW: u32 = 0x4;
const FAN_MARK_MOUNT: u32 = 0x10;
const FAN_MARK_FILESYSTEM: u32 = 0x100;
const FAN_MARK_IGNORED_MASK: u32 = 0x20;
const FAN_MARK_IGNORED_SURV_MODIFY: u32 = 0x40;
const FAN_MARK_EVICTABLE: u32 = 0x200;
const FAN_MARK_IGNORE: u32 = 0x400;
/// The mark flags fdinfo shows, which a restore sets again.
const FAN_MARK_KEPT: u32 = FAN_MARK_IGNORED_SURV_MODIFY | FAN_MARK_EVICTABLE | FAN_MARK_IGNORE;

/// A fanotify group with its marks: the events of each mark's mask added,
/// then those it ignores (in the way it was told to ignore them).
///
/// A mark on a deleted file is made on the file recreated for the fds
/// that hold it, as an inotify watch is ([`inotify`]).
fn fanotify(
    t: &mut Tracee,
    init_flags: u32,
    event_flags: u32,
    marks: &[crate::image::FanotifyMark],
    plan: &mut FilePlan,
    img: &ImageDir,
    m: &Manifest,
) -> Result<u64> {
    let pid = t.ns_pid;
    let fd = t
        .call(
            "fanotify_init",
            libc::SYS_fanotify_init,
            &[u64::from(init_flags), u64::from(event_flags)],
        )
        .map_err(failed_call(pid, "fanotify", "fanotify_init".into()))?;
    for mark in marks {
        let path = match mark.deleted {
            None => mark.path.clone(),
            Some(key) => recreated(t.ns_pid, key, &mark.path, plan, img, m)?,
        };
        let on = match mark.on {
            MarkOn::File => FAN_MARK_DONT_FOLLOW,
            MarkOn::Mount => FAN_MARK_MOUNT,
            MarkOn::Filesystem => FAN_MARK_FILESYSTEM,
        };
        let evictable = mark.mflags & FAN_MARK_EVICTABLE;
        let ignore = if mark.mflags & FAN_MARK_IGNORE != 0 {
            FAN_MARK_IGNORE
        } else {
            FAN_MARK_IGNORED_MASK
        };
        let adds = [
            (FAN_MARK_ADD | on | evictable, mark.mask),
            (
                FAN_MARK_ADD
                    | on
                    | evictable
                    | ignore
                    | (mark.mflags & FAN_MARK_IGNORED_SURV_MODIFY),
                mark.ignored_mask,
            ),
        ];
        for (flags, mask) in adds.into_iter().filter(|(_, mask)| *mask != 0) {
            let path = t.arg_str(&path)?;
            t.call(
                "fanotify_mark",
                libc::SYS_fanotify_mark,
                &[
                    fd,
                    u64::from(flags),
                    u64::from(mask),
                    libc::AT_FDCWD as u64,
                    path,
                ],
            )
            .map_err(failed_call(
                pid,
                "fanotify",
                format!("mark {} for {mask:#x}", mark.path),
            ))?;
        }
    }
    Ok(fd)
}

/// Every fanotify group is for notifications only, and every mark is on
/// an absolute path, with flags a restore sets again.
pub fn check_fanotify(
    m: &Manifest,
    procs: &BTreeMap<i32, ProcessImage>,
) -> std::result::Result<(), String> {
    for f in &m.files {
        let FileKind::Fanotify {
            init_flags, marks, ..
        } = &f.kind
        else {
            continue;
        };
        if init_flags & 0xc != 0 {
            return Err(format!(
                "fanotify group {} is for permission events ({init_flags:#x})",
                f.id
            ));
        }
        if let Some(k) = marks.iter().find(|k| {
            k.mflags & !FAN_MARK_KEPT != 0
                || !k.path.starts_with('/')
                || k.path.contains('\0')
                || (k.mask == 0 && k.ignored_mask == 0)
                || k.deleted
                    .is_some_and(|key| k.on != MarkOn::File || !recreatable(m, procs, key))
        }) {
            return Err(format!(
                "fanotify group {} has a mark on {:?} with flags {:#x}",
                f.id, k.path, k.mflags
            ));
        }
    }
    Ok(())
}

/// An inotify instance with its watches, at their watch descriptors.
///
/// A new instance hands out descriptors from 1 up, never the same twice
/// (even once one is removed), and adding a watch on a file already
/// watched gives its descriptor back. So each watch is added, in the
/// order of the descriptors, and until its descriptor comes up the watch
/// just added is removed and added again, which uses up one number each
/// time. Each removal queues an IN_IGNORED event: the queue is emptied
/// before the process runs (events queued at checkpoint time are lost
/// anyway: they are not saved).
///
/// A watch on a deleted file is added on the file recreated for the fds
/// that hold it, made here if they come later; its removal once the tree
/// is restored queues an IN_ATTRIB, emptied by [`drain_notifications`].
fn inotify(
    t: &mut Tracee,
    f: &OpenFile,
    watches: &[crate::image::InotifyWatch],
    plan: &mut FilePlan,
    img: &ImageDir,
    m: &Manifest,
) -> Result<u64> {
    let pid = t.ns_pid;
    let fd = t.call(
        "inotify_init1",
        libc::SYS_inotify_init1,
        &[libc::IN_NONBLOCK as u64],
    )?;
    let mut sorted: Vec<_> = watches.iter().collect();
    sorted.sort_by_key(|w| w.wd);
    let mut used = false;
    for w in sorted {
        let path = match w.deleted {
            None => w.path.clone(),
            Some(key) => recreated(pid, key, &w.path, plan, img, m)?,
        };
        loop {
            let path = t.arg_str(&path)?;
            let got = t
                .call(
                    "inotify_add_watch",
                    libc::SYS_inotify_add_watch,
                    &[fd, path, u64::from(w.mask | libc::IN_DONT_FOLLOW)],
                )
                .map_err(failed_call(
                    pid,
                    "inotify watch",
                    format!("watch {} on {}", w.wd, w.path),
                ))? as i32;
            if got == w.wd {
                break;
            }
            if got > w.wd {
                return Err(rerr(
                    pid,
                    "inotify watch",
                    format!("watch {} on {} came up as {got}", w.wd, w.path),
                ));
            }
            t.call(
                "inotify_rm_watch",
                libc::SYS_inotify_rm_watch,
                &[fd, got as u64],
            )?;
            used = true;
        }
    }
    if used {
        loop {
            let buf = t.out(4096)?;
            let r = t.raw_on(t.pid, libc::SYS_read, &[fd, buf, 4096])?;
            if r <= 0 {
                break;
            }
        }
    }
    set_flags(t, fd, f.flags)?;
    Ok(fd)
}

/// Where deleted file `key` (once at `path`) is recreated for the fds
/// holding it, made now if they come later.
fn recreated(
    pid: i32,
    key: (u64, u64),
    path: &str,
    plan: &mut FilePlan,
    img: &ImageDir,
    m: &Manifest,
) -> Result<String> {
    // Recreated from an fd's copy, or from a mapping's: the same file for
    // both, made once.
    let (data, owner) = match ghost_of(m, key) {
        Some((id, owner)) => (img.file_data(id), owner),
        None => match plan.mapped_ghosts.get(&key) {
            Some(owner) => (img.mapped_data(key.0, key.1), *owner),
            None => {
                return Err(rerr(
                    pid,
                    "recreate a deleted file",
                    format!("{path}: not in the image"),
                ));
            }
        },
    };
    Ok(GhostDir::made(&mut plan.ghosts, key, &data, owner)
        .map_err(|e| rerr(pid, "recreate a deleted file", format!("{path}: {e}")))?
        .to_string_lossy()
        .into_owned())
}

/// Whether deleted file `key` is recreated by a restore of the image: an
/// fd or a mapping of the tree holds it.
fn recreatable(m: &Manifest, procs: &BTreeMap<i32, ProcessImage>, key: (u64, u64)) -> bool {
    ghost_of(m, key).is_some()
        || (procs.values().flat_map(|p| p.vmas.iter()))
            .any(|v| v.deleted_file().is_some_and(|(k, _)| k == key))
}

/// The open file a deleted file `key` is recreated from, and its owner:
/// one that the restore recreates, not one opened again by its handle.
fn ghost_of(m: &Manifest, key: (u64, u64)) -> Option<(usize, crate::image::Owner)> {
    m.files.iter().find_map(|f| match f.kind {
        FileKind::Regular {
            ghost: Some((dev, ino, owner)),
            handle: None,
            ..
        } if (dev, ino) == key => Some((f.id, owner)),
        _ => None,
    })
}

/// Empties the queues of `p`'s inotify instances and fanotify groups that
/// watch a recreated deleted file, once the recreated files have lost
/// their names: those events (the unlink, the restore's own opens) are
/// the restore's, not the program's. A fanotify event may come with an fd
/// of the file, closed here.
pub fn drain_notifications(t: &mut Tracee, p: &ProcessImage, m: &Manifest) -> Result<()> {
    if p.shares_table() {
        return Ok(());
    }
    for fd in &p.fds {
        let fanotify = match m.files.get(fd.file).map(|f| &f.kind) {
            Some(FileKind::Inotify { watches }) if watches.iter().any(|w| w.deleted.is_some()) => {
                false
            }
            Some(FileKind::Fanotify { marks, .. }) if marks.iter().any(|w| w.deleted.is_some()) => {
                true
            }
            _ => continue,
        };
        let fd = fd.fd as u64;
        loop {
            let n = t.out(4)?;
            t.call("queued events", libc::SYS_ioctl, &[fd, libc::FIONREAD, n])?;
            let mut queued = [0u8; 4];
            crate::procmem::read(t.pid, n, &mut queued)?;
            let queued = u64::from(u32::from_ne_bytes(queued));
            if queued == 0 {
                break;
            }
            // Room for whole events: FIONREAD counts a fanotify event's
            // metadata, not the records that may follow it. With events
            // queued, a read does not wait.
            let buf = t.out(4096)?;
            let got = t.call("empty an event queue", libc::SYS_read, &[fd, buf, 4096])?;
            if fanotify {
                let mut events = vec![0u8; got as usize];
                crate::procmem::read(t.pid, buf, &mut events)?;
                for file in fanotify_event_fds(&events) {
                    t.call("close an event's fd", nr::SYS_close, &[file as u64])?;
                }
            }
        }
    }
    Ok(())
}

/// The fds that fanotify events (`struct fanotify_event_metadata`, one
/// after the other) carry.
fn fanotify_event_fds(events: &[u8]) -> Vec<i32> {
    let mut fds = Vec::new();
    let mut at = 0usize;
    while let Some(e) = events.get(at..at + 24) {
        let len = u32::from_ne_bytes(e[0..4].try_into().expect("4 bytes")) as usize;
        let fd = i32::from_ne_bytes(e[16..20].try_into().expect("4 bytes"));
        if fd >= 0 {
            fds.push(fd);
        }
        if len < 24 {
            break;
        }
        at += len;
    }
    fds
}

/// Every watch of every inotify instance is at a descriptor an instance
/// can give, for events inotify knows, on an absolute path; one on a
/// deleted file names a deleted file the image recreates.
pub fn check_inotify(
    m: &Manifest,
    procs: &BTreeMap<i32, ProcessImage>,
) -> std::result::Result<(), String> {
    let known = libc::IN_ALL_EVENTS | libc::IN_ONESHOT | libc::IN_EXCL_UNLINK;
    for f in &m.files {
        if let FileKind::Inotify { watches } = &f.kind {
            let mut wds = HashSet::new();
            for w in watches {
                if !(1..=crate::image::INOTIFY_MAX_WD).contains(&w.wd)
                    || !wds.insert(w.wd)
                    || w.mask & !known != 0
                    || w.mask & libc::IN_ALL_EVENTS == 0
                    || !w.path.starts_with('/')
                    || w.path.contains('\0')
                    || w.deleted.is_some_and(|key| !recreatable(m, procs, key))
                {
                    return Err(format!(
                        "inotify instance {} has a watch {} on {:?} with mask {:#x}",
                        f.id, w.wd, w.path, w.mask
                    ));
                }
            }
        }
    }
    Ok(())
}

/// A directory of root's alone where the deleted files a process had open
/// or mapped are recreated for it to open (then unlinked with the
/// directory). The image names the file, its contents and its owner, none
/// of which decides where on the host anything is written: each file is
/// made anew there (never through a link), without set-id bits, and the
/// directory goes when the restore ends, however it ends.
pub struct GhostDir {
    /// Where the directory is made, on the host.
    dir: std::path::PathBuf,
    /// The same directory as the restored processes see it (their root
    /// may not be the host's): what they open.
    inside: std::path::PathBuf,
    /// Files made so far, by the (device, inode) they stand for: every fd
    /// and mapping of one deleted file shares one recreated file.
    made: HashMap<(u64, u64), std::path::PathBuf>,
    /// Empty directories made so far.
    dirs: usize,
}

impl GhostDir {
    fn create(place: &GhostPlace) -> std::io::Result<GhostDir> {
        use std::os::unix::fs::DirBuilderExt;
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&place.host)?;
        for n in 0u32.. {
            let name = format!("{}-{n}", std::process::id());
            let dir = place.host.join(&name);
            match fs::DirBuilder::new().mode(0o700).create(&dir) {
                Ok(()) => {
                    return Ok(GhostDir {
                        dir,
                        inside: place.inside.join(name),
                        made: HashMap::new(),
                        dirs: 0,
                    });
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(e),
            }
        }
        unreachable!("a free name comes first")
    }

    /// The file recreated for deleted file `key`, made on first use (in a
    /// ghost directory made on first use) from the content at `data`.
    pub fn made(
        ghosts: &mut Ghosts,
        key: (u64, u64),
        data: &std::path::Path,
        owner: crate::image::Owner,
    ) -> std::io::Result<std::path::PathBuf> {
        let dir = ghosts.dir()?;
        if let Some(p) = dir.made.get(&key) {
            return Ok(p.clone());
        }
        let name = format!("file-{}", dir.made.len());
        let path = dir.dir.join(&name);
        let mut src = File::open(data)
            .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", data.display())))?;
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW)
            .mode(0o600)
            .open(&path)?;
        std::io::copy(&mut src, &mut f)?;
        // Its owner and permission bits as they were (this process's
        // umask aside), set-id and sticky bits never.
        std::os::unix::fs::fchown(&f, Some(owner.uid), Some(owner.gid))?;
        f.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(
            owner.mode & 0o777,
        ))?;
        let inside = dir.inside.join(name);
        dir.made.insert(key, inside.clone());
        Ok(inside)
    }
}

impl GhostDir {
    /// A new empty directory owned and moded as `owner` says, for the
    /// caller to enter or open (as the restored processes see it: the
    /// second path) and then remove (as the host sees it: the first).
    pub fn empty_dir(
        ghosts: &mut Ghosts,
        owner: crate::image::Owner,
    ) -> std::io::Result<(std::path::PathBuf, std::path::PathBuf)> {
        use std::os::unix::fs::DirBuilderExt;
        let dir = ghosts.dir()?;
        dir.dirs += 1;
        let name = format!("dir-{}", dir.dirs);
        let path = dir.dir.join(&name);
        fs::DirBuilder::new().mode(0o700).create(&path)?;
        std::os::unix::fs::chown(&path, Some(owner.uid), Some(owner.gid))?;
        fs::set_permissions(
            &path,
            std::os::unix::fs::PermissionsExt::from_mode(owner.mode & 0o777),
        )?;
        Ok((path, dir.inside.join(name)))
    }
}

/// Where a restore makes its ghost directory: a directory on the host, and
/// the same directory as the restored processes see it.
#[derive(Debug, Clone)]
pub struct GhostPlace {
    pub host: std::path::PathBuf,
    pub inside: std::path::PathBuf,
}

impl Default for GhostPlace {
    fn default() -> Self {
        let p = std::path::PathBuf::from("/run/rrc/ghosts");
        GhostPlace {
            host: p.clone(),
            inside: p,
        }
    }
}

/// A restore's ghost directory, made on first use.
#[derive(Default)]
pub struct Ghosts {
    pub place: GhostPlace,
    dir: Option<GhostDir>,
}

impl Ghosts {
    fn dir(&mut self) -> std::io::Result<&mut GhostDir> {
        match &mut self.dir {
            Some(d) => Ok(d),
            d => Ok(d.insert(GhostDir::create(&self.place)?)),
        }
    }

    /// Removes the directory and what is in it.
    pub fn remove(&mut self) {
        self.dir.take();
    }
}

/// Opens the file a handle names, through the mount of this machine with
/// the mount id it was seen on; returns its fd in `t`. Only for a process
/// restored into our own mount namespace: a handle opens any file of its
/// file system, wherever its links are, which a container's process must
/// not be given on an image's say-so (nor could its mount ids, those of
/// another namespace, name ours).
fn open_handle(
    t: &mut Tracee,
    h: &crate::image::FileHandle,
    flags: u32,
    transport: &sockets::Transport,
) -> std::result::Result<u64, String> {
    let mnt = |pid: &str| fs::read_link(format!("/proc/{pid}/ns/mnt")).ok();
    if mnt("self").is_none() || mnt("self") != mnt(&t.pid.to_string()) {
        return Err("the process is restored into a mount namespace of its own".into());
    }
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").map_err(|e| e.to_string())?;
    let point = mountinfo
        .lines()
        .find_map(|l| {
            let mut w = l.split(' ');
            let id: i32 = w.next()?.parse().ok()?;
            (id == h.mount_id).then(|| w.nth(3).map(str::to_string))?
        })
        .ok_or_else(|| format!("mount {} is not here", h.mount_id))?;
    let mount = File::open(&point).map_err(|e| format!("{point}: {e}"))?;
    let clean = flags & !((libc::O_CREAT | libc::O_EXCL | libc::O_TRUNC | libc::O_NOCTTY) as u32);
    let file = crate::sys::open_by_handle(
        std::os::fd::AsFd::as_fd(&mount),
        h.ty,
        &h.bytes.0,
        clean as i32 | libc::O_CLOEXEC,
    )
    .map_err(|e| e.to_string())?;
    transport
        .pass(t, std::os::fd::AsFd::as_fd(&file))
        .map_err(|e| e.to_string())
}

impl Drop for GhostDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Gives the open files `p` is the first to hold their signal owner,
/// signal and O_ASYNC, once every process and thread of the tree exists.
pub fn set_owners(
    t: &mut Tracee,
    p: &ProcessImage,
    procs: &BTreeMap<i32, ProcessImage>,
    m: &Manifest,
    first: &mut HashSet<usize>,
) -> Result<()> {
    for fd in &p.fds {
        let Some(f) = m.files.get(fd.file) else {
            continue;
        };
        let async_io = f.flags & libc::O_ASYNC as u32 != 0;
        if (f.owner.is_none() && f.signal == 0 && !async_io) || !first.insert(f.id) {
            continue;
        }
        if let Some(owner) = f.owner {
            // Numbered as this process sees it (in a nested pid namespace,
            // not as the tree does).
            let id = match owner.kind {
                crate::image::OwnerKind::Thread => p.sees_thread(procs, owner.id),
                _ => p.sees(procs, owner.id),
            };
            let Some(id) = id else {
                tracing::warn!(
                    pid = p.pid,
                    fd = fd.fd,
                    "the signal owner is not in sight of the process: not set"
                );
                continue;
            };
            let mut ex = Vec::with_capacity(8);
            ex.extend_from_slice(&owner.kind.raw().to_ne_bytes());
            ex.extend_from_slice(&id.to_ne_bytes());
            let a = t.arg(&ex)?;
            t.call(
                "set the signal owner",
                nr::SYS_fcntl,
                &[fd.fd as u64, crate::sys::F_SETOWN_EX, a],
            )?;
        }
        if f.signal != 0 {
            t.call(
                "set the I/O signal",
                nr::SYS_fcntl,
                &[fd.fd as u64, crate::sys::F_SETSIG, f.signal as u64],
            )?;
        }
        if async_io {
            // Signals name the fd O_ASYNC was turned on through (si_fd):
            // the file's first fd in its first process.
            t.call(
                "set O_ASYNC",
                nr::SYS_fcntl,
                &[
                    fd.fd as u64,
                    libc::F_SETFL as u64,
                    u64::from(f.flags & SETTABLE),
                ],
            )?;
        }
    }
    Ok(())
}

/// Puts a pidfd at each fd of `p` that held one, in place of the
/// placeholder there, now that every process and thread of the tree
/// exists. Each fd gets a pidfd of its own: fds that shared one open
/// pidfd no longer do (a pidfd has no position, and its flags are kept).
pub fn make_pidfds(t: &mut Tracee, p: &ProcessImage, m: &Manifest) -> Result<()> {
    if p.shares_table() {
        // Its parent's table, done by the parent.
        return Ok(());
    }
    for fd in &p.fds {
        let Some(OpenFile {
            kind: FileKind::PidFd { pid: target },
            flags,
            ..
        }) = m.files.get(fd.file)
        else {
            continue;
        };
        let flags = flags & (libc::O_NONBLOCK | libc::O_EXCL) as u32;
        let pidfd = t
            .call(
                "pidfd_open",
                libc::SYS_pidfd_open,
                &[*target as u64, u64::from(flags)],
            )
            .map_err(failed_call(
                p.pid,
                "pidfds",
                format!("fd {}: pidfd of {target}", fd.fd),
            ))?;
        place(t, pidfd, fd)?;
    }
    Ok(())
}

/// Moves `t`'s fd `from` to the number of `fd`, with its close-on-exec
/// flag (over the placeholder there).
fn place(t: &mut Tracee, from: u64, fd: &crate::image::Fd) -> Result<()> {
    let cloexec = if fd.cloexec { libc::O_CLOEXEC } else { 0 };
    t.call(
        "put a file in place",
        nr::SYS_dup3,
        &[from, fd.fd as u64, cloexec as u64],
    )?;
    t.call("close", nr::SYS_close, &[from]).map(drop)
}

/// Puts in `t`'s fds the namespace files it held, now that every process
/// of the tree is in its namespaces: each opened by `t` through a pidfd of
/// the process the image names (`PIDFD_GET_*_NAMESPACE`) and moved over
/// the placeholder at its number.
pub fn make_ns_files(
    t: &mut Tracee,
    p: &ProcessImage,
    procs: &std::collections::BTreeMap<i32, ProcessImage>,
    m: &Manifest,
) -> Result<()> {
    if p.shares_table() {
        return Ok(());
    }
    for fd in &p.fds {
        let Some(OpenFile {
            kind: FileKind::NsFile { ns, pid: of },
            flags,
            ..
        }) = m.files.get(fd.file)
        else {
            continue;
        };
        let what = || format!("fd {}: the {} namespace of process {of}", fd.fd, ns.file());
        let Some(seen) = p.sees(procs, *of) else {
            return Err(rerr(
                p.pid,
                "namespace files",
                format!("{}, which it cannot see", what()),
            ));
        };
        let pidfd = t
            .call("pidfd_open", libc::SYS_pidfd_open, &[seen as u64, 0])
            .map_err(failed_call(p.pid, "namespace files", what()))?;
        let nsfd = t.call(
            "ioctl(PIDFD_GET_NAMESPACE)",
            libc::SYS_ioctl,
            &[pidfd, sys::pidfd_namespace_ioctl(*ns), 0],
        );
        t.call("close", nr::SYS_close, &[pidfd])?;
        let got = nsfd.map_err(failed_call(p.pid, "namespace files", what()))?;
        // Opened again, as by `open` (which adds O_LARGEFILE), with its
        // flags.
        let nsfd = reopen_own(t, got, *flags);
        t.call("close", nr::SYS_close, &[got])?;
        let nsfd = nsfd?;
        set_flags(t, nsfd, *flags)?;
        place(t, nsfd, fd)?;
    }
    Ok(())
}

/// Makes the epoll registrations of pidfds that fall to `t`, now that its
/// pidfds are in place at their numbers ([`check_pidfds`] made sure that
/// some process can make each).
pub fn register_pidfds(
    t: &mut Tracee,
    p: &ProcessImage,
    m: &Manifest,
    plan: &mut FilePlan,
) -> Result<()> {
    let mine: Vec<(usize, usize)> = (plan.pidfd_registrar.iter())
        .filter(|(_, who)| **who == p.pid)
        .map(|(k, _)| *k)
        .collect();
    for (id, i) in mine {
        plan.pidfd_registrar.remove(&(id, i));
        let (Some(epfd), Some(FileKind::Epoll { targets })) = (
            p.fds.iter().find(|fd| fd.file == id).map(|fd| fd.fd),
            m.files.get(id).map(|f| &f.kind),
        ) else {
            continue;
        };
        let Some(tg) = targets.get(i) else { continue };
        if tg.events & !PRIVATE == 0 {
            tracing::warn!(
                pid = p.pid,
                epoll = id,
                target = tg.fd,
                "a one-shot epoll registration of a pidfd that had fired is restored armed for errors and hangups"
            );
        }
        let Some(src) = (tg.file)
            .and_then(|file| p.fds.iter().find(|fd| fd.file == file))
            .map(|fd| fd.fd)
        else {
            continue;
        };
        // The registration names the number the pidfd had then.
        let cloexec = p.fds.iter().any(|fd| fd.fd == tg.fd && fd.cloexec);
        let (at, events, data) = (tg.fd as u64, tg.events, tg.data);
        let r = with_target_at(
            t,
            epfd as u64,
            src as u64,
            at,
            plan.temp_base,
            cloexec,
            |t, ep| epoll_add(t, ep, at, events, data),
        )?;
        if r < 0 {
            return Err(rerr(
                p.pid,
                "epoll",
                format!(
                    "register pidfd {} with epoll fd {epfd}: {}",
                    tg.fd,
                    std::io::Error::from_raw_os_error(-r as i32)
                ),
            ));
        }
    }
    Ok(())
}

/// Queues again the messages that carried files in flight, each file
/// taken from a process of `done` that holds it (at a parked fd, if the
/// program held it nowhere); then closes the parked fds.
pub fn pass_in_flight(
    done: &mut [Tracee],
    procs: &BTreeMap<i32, ProcessImage>,
    m: &Manifest,
    img: &ImageDir,
    plan: &mut FilePlan,
) -> Result<()> {
    let deferred = std::mem::take(&mut plan.deferred);
    if !deferred.is_empty() {
        let mut pidfds: HashMap<i32, std::os::fd::OwnedFd> = HashMap::new();
        let holder = |id: usize| -> Result<std::os::fd::OwnedFd> {
            let (t, fd) = (done.iter())
                .find_map(|t| {
                    let p = procs.get(&t.ns_pid)?;
                    p.fds.iter().find(|f| f.file == id).map(|f| (t, f.fd))
                })
                .ok_or_else(|| rerr(0, "files in flight", format!("open file {id}: no holder")))?;
            let fail =
                |e: std::io::Error| rerr(t.ns_pid, "files in flight", format!("take fd {fd}: {e}"));
            let pidfd = match pidfds.entry(t.ns_pid) {
                std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::hash_map::Entry::Vacant(e) => {
                    e.insert(sys::pidfd_open(t.pid).map_err(fail)?)
                }
            };
            sys::steal_fd_via(pidfd, fd).map_err(fail)
        };
        // Names resolve as the tree's root sees them.
        let root = done
            .first()
            .map(|t| t.pid)
            .ok_or_else(|| rerr(0, "files in flight", "no process restored".into()))?;
        let _ = img.open_socket_data();
        crate::common::in_view_of(root, || {
            sockets::send_in_flight(deferred, &m.files, img, holder)
        })??;
    }
    for t in done.iter_mut() {
        let p = &procs[&t.ns_pid];
        if p.shares_table() {
            continue; // its parent's table, closed by the parent
        }
        for &fd in &p.parked {
            t.call("close a parked fd", nr::SYS_close, &[fd as u64])?;
        }
    }
    Ok(())
}

/// Every file in flight on a unix socket is held by a process of the
/// image, and goes with a message it has queued; every parked fd is one of
/// its process's.
pub fn check_in_flight(
    m: &Manifest,
    procs: &BTreeMap<i32, ProcessImage>,
) -> std::result::Result<(), String> {
    let held: HashSet<usize> = procs
        .values()
        .flat_map(|p| p.fds.iter().map(|f| f.file))
        .collect();
    for f in &m.files {
        let messages = match &f.kind {
            FileKind::UnixConnected { messages, .. } | FileKind::Unix { messages, .. } => messages,
            _ => continue,
        };
        for x in f.kind.in_flight() {
            if x.message as usize >= messages.len()
                || x.files.len() > 253
                || x.files.iter().any(|id| !held.contains(id))
            {
                return Err(format!(
                    "unix socket {} has files in flight that no process holds or no message carries",
                    f.id
                ));
            }
        }
    }
    for p in procs.values() {
        if p.parked.iter().any(|fd| !p.fds.iter().any(|f| f.fd == *fd)) {
            return Err(format!("process {} parks an fd it does not hold", p.pid));
        }
    }
    Ok(())
}

/// Every namespace file names a live process of the image.
pub fn check_ns_files(
    m: &Manifest,
    procs: &std::collections::BTreeMap<i32, ProcessImage>,
) -> std::result::Result<(), String> {
    for f in &m.files {
        if let FileKind::NsFile { pid, .. } = f.kind
            && procs.get(&pid).is_none_or(|p| p.zombie.is_some())
        {
            return Err(format!(
                "open file {} is a namespace file of process {pid}, which is not a live \
                 process of the image",
                f.id
            ));
        }
    }
    Ok(())
}

/// Every pidfd names a process of the image (a thread of one with
/// `PIDFD_THREAD`): made again, it must not reach another process.
pub fn check_pidfds(
    m: &Manifest,
    procs: &std::collections::BTreeMap<i32, ProcessImage>,
) -> std::result::Result<(), String> {
    for f in &m.files {
        let pid = match f.kind {
            FileKind::PidFd { pid } => pid,
            FileKind::PidFdReaped { status: Some(s) } if sys::Ending::of_status(s).is_none() => {
                return Err(format!(
                    "open file {} is a pidfd of a process that ended with wait status {s:#x}, \
                     which no process can end with",
                    f.id
                ));
            }
            _ => continue,
        };
        let known = if f.flags & libc::O_EXCL as u32 != 0 {
            procs
                .values()
                .any(|p| p.threads.iter().any(|t| t.tid == pid))
        } else {
            procs.contains_key(&pid)
        };
        if !known {
            return Err(format!(
                "open file {} is a pidfd of {pid}, which is not in the image",
                f.id
            ));
        }
    }
    // An epoll's registration of a pidfd is made by a process holding
    // both.
    for f in &m.files {
        let FileKind::Epoll { targets } = &f.kind else {
            continue;
        };
        for tg in targets {
            let Some(target) = tg.file else { continue };
            if !matches!(
                m.files.get(target).map(|t| &t.kind),
                Some(FileKind::PidFd { .. })
            ) {
                continue;
            }
            if !procs.values().any(|p| p.can_register(f.id, target)) {
                return Err(format!(
                    "epoll {} watches pidfd {} under fd {}, and no process holds both",
                    f.id, target, tg.fd
                ));
            }
        }
    }
    Ok(())
}

/// The open file target `i` of epoll `id` watches.
fn epoll_target(m: &Manifest, id: usize, i: usize) -> Option<usize> {
    match m.files.get(id).map(|f| &f.kind) {
        Some(FileKind::Epoll { targets }) => targets.get(i).and_then(|tg| tg.file),
        _ => None,
    }
}

/// The epoll flags that are not events, which a fired one-shot keeps.
const PRIVATE: u32 =
    (libc::EPOLLONESHOT | libc::EPOLLET | libc::EPOLLWAKEUP | libc::EPOLLEXCLUSIVE) as u32;
/// Every event a file can be ready for.
const READINESS: u32 = (libc::EPOLLIN
    | libc::EPOLLOUT
    | libc::EPOLLPRI
    | libc::EPOLLRDNORM
    | libc::EPOLLRDBAND
    | libc::EPOLLWRNORM
    | libc::EPOLLWRBAND
    | libc::EPOLLMSG
    | libc::EPOLLRDHUP) as u32;

/// Makes the epoll registrations that fall to `t` (`early`: only fired
/// one-shots of the epolls it has just made), while every file it holds
/// is still at a temporary number: each target is put for a moment
/// at the number it was registered under (what was there set aside and
/// put back), registered, and taken away again.
/// `epoll_ctl(EPOLL_CTL_ADD)` in `t` of fd `at` to epoll `ep` for
/// `events` with `data`; the call's result (a negative errno on failure).
fn epoll_add(t: &mut Tracee, ep: u64, at: u64, events: u32, data: u64) -> Result<i64> {
    let mut ev = Vec::with_capacity(12);
    ev.extend_from_slice(&events.to_ne_bytes());
    ev.extend_from_slice(&data.to_ne_bytes());
    let a = t.arg(&ev)?;
    t.raw_on(
        t.pid,
        nr::SYS_epoll_ctl,
        &[ep, libc::EPOLL_CTL_ADD as u64, at, a],
    )
}

/// Runs `register` with the open file at fd `src` of `t` put at fd `at`
/// for the while: an epoll registration names the number its target had,
/// which may hold something else now (set aside above `temp_base` and put
/// back, close-on-exec if `cloexec`) or nothing. `register` gets the epoll
/// `epfd` at a number of its own if `epfd` was `at`.
fn with_target_at<R>(
    t: &mut Tracee,
    epfd: u64,
    src: u64,
    at: u64,
    temp_base: u64,
    cloexec: bool,
    register: impl FnOnce(&mut Tracee, u64) -> Result<R>,
) -> Result<R> {
    if src == at {
        return register(t, epfd);
    }
    let epoll_aside = if epfd == at {
        Some(t.call(
            "set an epoll aside",
            nr::SYS_fcntl,
            &[at, libc::F_DUPFD_CLOEXEC as u64, temp_base],
        )?)
    } else {
        None
    };
    let aside = t.raw_on(
        t.pid,
        nr::SYS_fcntl,
        &[at, libc::F_DUPFD_CLOEXEC as u64, temp_base],
    )?;
    t.call("put an epoll target in place", nr::SYS_dup3, &[src, at, 0])?;
    let r = register(t, epoll_aside.unwrap_or(epfd));
    if aside >= 0 {
        let flags = if cloexec { libc::O_CLOEXEC as u64 } else { 0 };
        t.call("put an fd back", nr::SYS_dup3, &[aside as u64, at, flags])?;
        t.call("close", nr::SYS_close, &[aside as u64])?;
    } else {
        t.call("close", nr::SYS_close, &[at])?;
    }
    if let Some(ep) = epoll_aside {
        t.call("close", nr::SYS_close, &[ep])?;
    }
    r
}

fn register_epoll_targets(
    t: &mut Tracee,
    m: &Manifest,
    held: &Held,
    plan: &mut FilePlan,
    early: bool,
) -> Result<()> {
    let pid = t.ns_pid;
    let disarmed = |&(id, i): &(usize, usize)| match m.files.get(id).map(|f| &f.kind) {
        Some(FileKind::Epoll { targets }) => {
            targets.get(i).is_some_and(|tg| tg.events & !PRIVATE == 0)
        }
        _ => false,
    };
    let mut mine: Vec<(usize, usize)> = plan
        .registrar
        .iter()
        .filter(|((id, i), who)| {
            if !early {
                return **who == pid;
            }
            // Early, in the epoll's creator, which holds the target.
            plan.creator.get(id) == Some(&pid)
                && disarmed(&(*id, *i))
                && epoll_target(m, *id, *i).is_some_and(|f| held.contains_key(&f))
        })
        .map(|(k, _)| *k)
        .collect();
    // Disarmed one-shot registrations first, while their epoll reports
    // nothing else (see below).
    mine.sort_by_key(|k| (!disarmed(k), *k));
    for (id, i) in mine {
        plan.registrar.remove(&(id, i));
        let (Some(&epfd), Some(FileKind::Epoll { targets })) =
            (held.get(&id), m.files.get(id).map(|f| &f.kind))
        else {
            continue;
        };
        let Some(tg) = targets.get(i) else { continue };
        let Some(&src) = tg.file.and_then(|f| held.get(&f)) else {
            continue;
        };
        // A one-shot registration that has fired keeps only its private
        // bits, and adding one always arms it (for errors and hangups at
        // least): it is added armed for every event and, if its file is
        // ready and nothing else of the epoll can be, fired once at once.
        let disarm = tg.events & !PRIVATE == 0 && !plan.armed.contains(&id);
        let events = if disarm {
            tg.events | READINESS
        } else {
            tg.events
        };
        let temp_base = plan.temp_base;
        let r = with_target_at(t, epfd, src, tg.fd as u64, temp_base, false, |t, ep| {
            let r = epoll_add(t, ep, tg.fd as u64, events, tg.data)?;
            if r >= 0 && tg.events & !PRIVATE == 0 {
                let fired = if disarm {
                    let out = t.out(12)?;
                    t.raw_on(t.pid, nr::SYS_epoll_wait, &[ep, out, 1, 0])? == 1
                } else {
                    false
                };
                if !fired {
                    tracing::warn!(
                        pid,
                        epoll = id,
                        target = tg.fd,
                        "a one-shot epoll registration that had fired is restored armed for errors and hangups"
                    );
                }
            } else {
                plan.armed.insert(id);
            }
            Ok(r)
        })?;
        if r < 0 {
            return Err(rerr(
                pid,
                "epoll",
                format!(
                    "register fd {} (events {:#x}): {}",
                    tg.fd,
                    tg.events,
                    std::io::Error::from_raw_os_error(-r as i32)
                ),
            ));
        }
    }
    Ok(())
}

/// Puts the files `p` uses at their recorded numbers and closes the rest;
/// then re-registers epoll targets.
pub fn arrange(
    t: &mut Tracee,
    p: &ProcessImage,
    m: &Manifest,
    held: &Held,
    plan: &mut FilePlan,
) -> Result<()> {
    let pid = t.ns_pid;
    register_epoll_targets(t, m, held, plan, false)?;
    let mut wanted: HashSet<u64> = HashSet::new();
    for fd in &p.fds {
        let src = *held.get(&fd.file).ok_or_else(|| {
            rerr(
                pid,
                "file descriptors",
                format!("fd {}: its open file was not created", fd.fd),
            )
        })?;
        let target = fd.fd as u64;
        let flags = if fd.cloexec {
            libc::O_CLOEXEC as u64
        } else {
            0
        };
        if src == target {
            if fd.cloexec {
                t.call(
                    "set FD_CLOEXEC",
                    nr::SYS_fcntl,
                    &[target, libc::F_SETFD as u64, libc::FD_CLOEXEC as u64],
                )?;
            }
        } else {
            t.call("place an fd", nr::SYS_dup3, &[src, target, flags])?;
        }
        wanted.insert(target);
    }
    let current: Vec<u64> = fs::read_dir(format!("/proc/{}/fd", t.pid))
        .map_err(|e| rerr(pid, "file descriptors", e.to_string()))?
        .flatten()
        .filter_map(|e| e.file_name().to_string_lossy().parse().ok())
        .collect();
    for fd in current {
        if !wanted.contains(&fd) {
            t.call("close", nr::SYS_close, &[fd])?;
        }
    }
    make_room(t, p, &wanted)?;
    // Images without the open file of each target: by fd number.
    for fd in &p.fds {
        let Some(f) = m.files.get(fd.file) else {
            continue;
        };
        if let FileKind::Epoll { targets } = &f.kind {
            for tg in targets.iter().filter(|tg| tg.file.is_none()) {
                let r = epoll_add(t, fd.fd as u64, tg.fd as u64, tg.events, tg.data)?;
                if r < 0 {
                    tracing::warn!(
                        pid,
                        epoll = fd.fd,
                        target = tg.fd,
                        errno = -r,
                        "epoll registration not restored"
                    );
                }
            }
        }
    }
    Ok(())
}

/// Grows the fd table of `p` to the room it had, while no thread shares
/// it (growing a shared table waits for an RCU grace period): a
/// descriptor placed at the last slot and closed again, since a table
/// never shrinks.
fn make_room(t: &mut Tracee, p: &ProcessImage, wanted: &HashSet<u64>) -> Result<()> {
    let last = u64::from(p.fd_table.min(MAX_FD_TABLE)).saturating_sub(1);
    let Some(&any) = wanted.iter().next() else {
        return Ok(());
    };
    if last == 0 || wanted.iter().any(|&fd| fd >= last) {
        return Ok(());
    }
    // Past the process's RLIMIT_NOFILE (set later, from the image) the
    // call fails: the table then grows when it must, as before.
    let r = t.raw_on(t.pid, nr::SYS_dup3, &[any, last, libc::O_CLOEXEC as u64])?;
    if r >= 0 {
        t.call("close", nr::SYS_close, &[last])?;
    }
    Ok(())
}

/// Takes the file locks of `p` again, through its fds, which are in place:
/// nothing closes an fd of the process from here on (closing any fd of a
/// file would drop the process's POSIX locks on it).
pub fn take_locks(t: &mut Tracee, p: &ProcessImage) -> Result<()> {
    for l in &p.locks {
        let fd = l.fd as u64;
        let pid = t.ns_pid;
        let failed = || {
            let what = format!("{:?} lock on fd {} from {}", l.kind, l.fd, l.start);
            failed_call(pid, "file locks", what)
        };
        if l.kind == LockKind::Lease {
            let ty = if l.write {
                libc::F_WRLCK
            } else {
                libc::F_RDLCK
            };
            t.call(
                "fcntl (lease)",
                nr::SYS_fcntl,
                &[fd, libc::F_SETLEASE as u64, ty as u64],
            )
            .map_err(failed())?;
            continue;
        }
        if l.kind == LockKind::Flock {
            let op = if l.write {
                libc::LOCK_EX
            } else {
                libc::LOCK_SH
            } | libc::LOCK_NB;
            t.call("flock", libc::SYS_flock, &[fd, op as u64])
                .map_err(failed())?;
            continue;
        }
        // struct flock: type and whence (16 bits each), start and length
        // (64 bits, after 4 bytes of padding), pid (0), padding. A length
        // of 0 reaches the end of the file, however far. The image was
        // checked: the range fits.
        let len = match l.end {
            None => 0,
            Some(end) => end - l.start + 1,
        };
        let ty = if l.write {
            libc::F_WRLCK
        } else {
            libc::F_RDLCK
        } as i16;
        let mut b = Vec::with_capacity(32);
        b.extend_from_slice(&ty.to_ne_bytes());
        b.extend_from_slice(&(libc::SEEK_SET as i16).to_ne_bytes());
        b.extend_from_slice(&[0u8; 4]);
        b.extend_from_slice(&l.start.to_ne_bytes());
        b.extend_from_slice(&len.to_ne_bytes());
        b.extend_from_slice(&[0u8; 8]);
        let a = t.arg(&b)?;
        let cmd = match l.kind {
            LockKind::Posix => libc::F_SETLK,
            _ => libc::F_OFD_SETLK,
        };
        t.call("fcntl (lock)", nr::SYS_fcntl, &[fd, cmd as u64, a])
            .map_err(failed())?;
    }
    Ok(())
}

/// Every lock is taken through an fd of its process, on a range that
/// `struct flock` can express.
pub fn check_locks(p: &ProcessImage) -> std::result::Result<(), String> {
    for l in &p.locks {
        if !p.fds.iter().any(|fd| fd.fd == l.fd) {
            return Err(format!(
                "a lock of process {} is taken through fd {}, which it does not have",
                p.pid, l.fd
            ));
        }
        let fits = l.start <= i64::MAX as u64
            && l.end.is_none_or(|end| {
                end >= l.start
                    && end
                        .checked_sub(l.start)
                        .and_then(|d| d.checked_add(1))
                        .is_some_and(|len| len <= i64::MAX as u64)
            })
            && (!matches!(l.kind, LockKind::Flock | LockKind::Lease)
                || (l.start == 0 && l.end.is_none()));
        if !fits {
            return Err(format!(
                "a lock of process {} on fd {} covers {}..{:?}",
                p.pid, l.fd, l.start, l.end
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::fanotify_event_fds;

    fn event(len: u32, fd: i32) -> Vec<u8> {
        let mut e = vec![0u8; (len as usize).max(24)];
        e[0..4].copy_from_slice(&len.to_ne_bytes());
        e[16..20].copy_from_slice(&fd.to_ne_bytes());
        e
    }

    #[test]
    fn the_fds_fanotify_events_carry_are_found_past_their_info_records() {
        let mut events = event(24, 7);
        events.extend(event(40, -1));
        events.extend(event(24, 9));
        assert_eq!(fanotify_event_fds(&events), vec![7, 9]);
        // A length that would not move on ends the walk.
        assert_eq!(fanotify_event_fds(&event(4, 3)), vec![3]);
        assert!(fanotify_event_fds(&[0u8; 10]).is_empty());
    }
}
