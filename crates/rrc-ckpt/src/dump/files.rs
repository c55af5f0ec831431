//! The file descriptors of a stopped process and the open files behind them.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};

use std::os::unix::fs::{MetadataExt, OpenOptionsExt};

use nix::sys::socket;
use nix::unistd::Pid;

use crate::dump::memory::ShmemTable;
use crate::image::{
    Blob, EpollTarget, FanotifyMark, Fd, FileKind, FileLock, FileOwner, ImageDir, InFlight,
    InotifyWatch, LockKind, MarkOn, NsKind, OpenFile, Owner, OwnerKind, ProcessImage,
};
use crate::procfs::{self as pfs, FdInfo};
use crate::sockopt::{self, Sock};
use crate::unixdiag::UnixInfo;
use crate::{Error, Result, sys, tcp};

/// Open file descriptions met so far in the tree.
#[derive(Default)]
pub struct FileTable {
    pub files: Vec<OpenFile>,
    /// One (process, fd) holding each file, to compare others against.
    holders: Vec<(Pid, i32)>,
    /// What /proc shows each file as: fds of one open file show the same
    /// (all anonymous inodes share one inode number, so an epoll is not
    /// compared with every eventfd met before it).
    links: Vec<String>,
    by_inode: HashMap<(u64, u64), Vec<usize>>,
    /// Pipes whose data is saved, with their packets.
    pipes_saved: HashMap<u64, Vec<u32>>,
    /// TCP sockets put in repair mode to be read.
    pub repaired: tcp::Repaired,
    /// Time spent on sockets.
    pub socket_time: std::time::Duration,
    /// `sockets.img`, opened on first use, and how much it holds.
    blobs: Option<(std::io::BufWriter<File>, u64)>,
    /// A pidfd per process, to take its fds.
    pidfds: HashMap<i32, std::os::fd::OwnedFd>,
    /// The fd taken last, as (process, fd) and our copy: what a file is
    /// and who its signal owner is are asked of one copy.
    taken: Option<((i32, i32), std::rc::Rc<std::os::fd::OwnedFd>)>,
    /// Signal owners as our pid namespace numbers them: (file, type, id).
    owners: Vec<(usize, i32, i32)>,
    /// The inode of each target of each epoll met, in order of meeting.
    epoll_inodes: Vec<Vec<u64>>,
    /// File locks met so far: the process (as we number it) to take each
    /// again, and the lock.
    pub locks: Vec<(i32, FileLock)>,
    /// Where each lock is in `locks`, by what tells it from the others:
    /// its owner (a process for a POSIX lock, else none: the open file),
    /// open file, kind, range and type.
    lock_index: HashMap<LockKey, usize>,
    /// The processes of the tree, as we number them.
    pub tree: std::collections::HashSet<i32>,
    /// Inodes of the files refused.
    refused: std::collections::HashSet<u64>,
    /// Files in flight on the tree's unix sockets, as fds of ours, in the
    /// order met ([`InFlight`] numbers them so until [`resolve_in_flight`]).
    flying: Vec<std::os::fd::OwnedFd>,
    /// POSIX message queues met so far.
    pub queues: crate::dump::mqueue::Queues,
    /// Pseudo-terminals whose master the tree holds, and the terminal
    /// descriptions met.
    pub ptys: crate::dump::pty::Ptys,
}

/// What tells a lock from the others (see [`FileTable::locks`]).
type LockKey = (i32, usize, LockKind, u64, Option<u64>, bool);

impl FileTable {
    /// Notes the locks held through fd `fd` (open file `file`) of `pid`,
    /// as its fdinfo lists them; those that cannot be taken again are
    /// problems.
    fn note_locks(
        &mut self,
        pid: Pid,
        fd: i32,
        file: usize,
        lines: &[String],
        problems: &mut Vec<String>,
    ) {
        let raw = pid.as_raw();
        for line in lines {
            // "1: POSIX  ADVISORY  WRITE 1234 fe:00:5678 0 99"
            let w: Vec<&str> = line.split_whitespace().collect();
            let word = |i: usize| w.get(i).copied().unwrap_or("");
            let kind = match (word(1), word(2)) {
                ("POSIX", "ADVISORY") => Some(LockKind::Posix),
                ("OFDLCK", "ADVISORY") => Some(LockKind::Ofd),
                ("FLOCK", "ADVISORY") => Some(LockKind::Flock),
                // One being broken has someone waiting for it to go, a
                // state no call sets up again.
                ("LEASE", "ACTIVE") => Some(LockKind::Lease),
                _ => None,
            };
            let write = match word(3) {
                "WRITE" => Some(true),
                "READ" => Some(false),
                _ => None,
            };
            let owner: Option<i64> = word(4).parse().ok();
            let start: Option<u64> = word(6).parse().ok();
            let end = match word(7) {
                "EOF" => Some(None),
                e => e.parse().ok().map(Some),
            };
            let (Some(kind), Some(write), Some(owner), Some(start), Some(end)) =
                (kind, write, owner, start, end)
            else {
                let what = match (word(1), word(2)) {
                    ("LEASE", "BREAKING") => {
                        "a lease being broken (an open of the file waits for it)"
                    }
                    ("LEASE", _) => "a lease",
                    ("DELEG", _) => "a delegation",
                    (_, "MANDATORY") => "a mandatory lock",
                    _ => "a lock of a kind this engine does not know",
                };
                problems.push(format!(
                    "process {raw}: fd {fd}: {what}, which cannot be restored ({line})"
                ));
                continue;
            };
            // A flock lock or a lease shows who took it: someone outside
            // the tree sharing the open file would lose it.
            if matches!(kind, LockKind::Flock | LockKind::Lease)
                && owner > 0
                && owner != i64::from(raw)
                && !self.tree.contains(&(owner as i32))
                && fs::metadata(format!("/proc/{owner}")).is_ok()
            {
                let what = if kind == LockKind::Flock {
                    "a flock lock"
                } else {
                    "a lease"
                };
                problems.push(format!(
                    "process {raw}: fd {fd}: {what} taken by process {owner}, outside the tree"
                ));
                continue;
            }
            if kind == LockKind::Posix && owner != i64::from(raw) {
                problems.push(format!(
                    "process {raw}: fd {fd}: a POSIX lock of process {owner}, outside the tree"
                ));
                continue;
            }
            let lock = FileLock {
                fd,
                kind,
                write,
                start,
                end,
            };
            let by = if kind == LockKind::Posix { raw } else { 0 };
            let key = (by, file, kind, start, end, write);
            match self.lock_index.get(&key) {
                // A flock lock or a lease is taken again by the process
                // that took it, if it can: /proc/locks shows its pid (a
                // lease's signal goes to the process that took it).
                Some(&at)
                    if matches!(kind, LockKind::Flock | LockKind::Lease)
                        && owner == i64::from(raw) =>
                {
                    self.locks[at] = (raw, lock);
                }
                Some(_) => {}
                None => {
                    self.lock_index.insert(key, self.locks.len());
                    self.locks.push((raw, lock));
                }
            }
        }
    }
}

impl FileTable {
    /// Appends `data` to the image's socket data; returns where it is.
    fn put_blob(&mut self, img: &ImageDir, data: &[u8]) -> Result<Blob> {
        use std::io::Write;
        let path = img.socket_data();
        if self.blobs.is_none() {
            let f = File::create(&path).map_err(|e| Error::image(&path, e))?;
            self.blobs = Some((std::io::BufWriter::with_capacity(1 << 20, f), 0));
        }
        let (w, at) = self.blobs.as_mut().expect("just opened");
        w.write_all(data).map_err(|e| Error::image(&path, e))?;
        let blob = Blob {
            offset: *at,
            len: data.len() as u64,
        };
        *at += data.len() as u64;
        Ok(blob)
    }

    /// Writes out what [`FileTable::put_blob`] buffered.
    pub fn finish(&mut self, img: &ImageDir) -> Result<()> {
        use std::io::Write;
        if let Some((w, _)) = self.blobs.as_mut() {
            w.flush().map_err(|e| Error::image(&img.socket_data(), e))?;
        }
        Ok(())
    }

    /// Fd `fd` of `pid`, duplicated into this process (once for all the
    /// questions asked of it in a row).
    fn take_fd(&mut self, pid: Pid, fd: i32) -> Result<std::rc::Rc<std::os::fd::OwnedFd>> {
        let key = (pid.as_raw(), fd);
        if let Some((k, f)) = &self.taken
            && *k == key
        {
            return Ok(f.clone());
        }
        let err = |e| Error::io(format!("take fd {fd} of process {pid}"))(e);
        let pidfd = match self.pidfds.entry(pid.as_raw()) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert(sys::pidfd_open(pid).map_err(err)?)
            }
        };
        let f = std::rc::Rc::new(sys::steal_fd_via(pidfd, fd).map_err(err)?);
        self.taken = Some((key, f.clone()));
        Ok(f)
    }
}

const O_CLOEXEC: u32 = libc::O_CLOEXEC as u32;

/// Gives each open file its signal owner in the tree's numbering, once
/// the whole tree is known (its root has `depth` levels of pids); an
/// owner outside the tree is a problem (the restored file could only
/// signal someone else).
pub fn resolve_owners(
    table: &mut FileTable,
    ns_of: &std::collections::BTreeMap<Pid, i32>,
    images: &[ProcessImage],
    depth: usize,
    problems: &mut Vec<String>,
) {
    for &(id, ty, host) in &table.owners {
        let (hp, hfd) = table.holders[id];
        let kind = match ty {
            0 => OwnerKind::Thread,
            1 => OwnerKind::Process,
            _ => OwnerKind::Group,
        };
        let ns = match kind {
            // A group is numbered by its leader, who may have gone: a
            // member of the tree in that group tells its number.
            OwnerKind::Group => ns_of
                .iter()
                .find(|(p, _)| nix::unistd::getpgid(Some(**p)).ok() == Some(Pid::from_raw(host)))
                .and_then(|(_, ns)| images.iter().find(|i| i.pid == *ns))
                .map(|i| i.pgid),
            _ => crate::dump::process::tree_tid(host, depth),
        };
        let known = ns.filter(|&n| match kind {
            OwnerKind::Thread => images.iter().any(|i| i.threads.iter().any(|t| t.tid == n)),
            OwnerKind::Process => images.iter().any(|i| i.pid == n),
            OwnerKind::Group => images.iter().any(|i| i.pgid == n),
        });
        match known {
            Some(n) => table.files[id].owner = Some(FileOwner { kind, id: n }),
            None => problems.push(format!(
                "process {hp}: fd {hfd}: its I/O signals (F_SETOWN) go to {kind:?} {host}, \
                 outside the tree"
            )),
        }
    }
}

/// Names, for every namespace file, a process of the tree in that
/// namespace, as the tree numbers it (the restore opens that process's
/// file). A namespace no process of the tree is in is a problem: the
/// restore makes only the tree's.
pub fn resolve_ns_files(
    table: &mut FileTable,
    ns_of: &std::collections::BTreeMap<Pid, i32>,
    problems: &mut Vec<String>,
) {
    for id in 0..table.files.len() {
        let FileKind::NsFile { ns, .. } = table.files[id].kind else {
            continue;
        };
        let link = &table.links[id];
        let found = ns_of.iter().find(|(host, _)| {
            fs::read_link(format!("/proc/{host}/ns/{}", ns.file()))
                .is_ok_and(|l| l.as_os_str() == link.as_str())
        });
        match found {
            Some((_, pid)) => table.files[id].kind = FileKind::NsFile { ns, pid: *pid },
            None => {
                let (hp, hfd) = table.holders[id];
                problems.push(format!(
                    "process {hp}: fd {hfd}: a namespace file ({link}) of a namespace no \
                     process of the tree is in"
                ));
            }
        }
    }
}

/// Numbers the process (or thread) of every pidfd as the tree does, once
/// the whole tree is known (its root has `depth` levels of pids). A pidfd
/// of a process outside the tree is a problem (the restored one could only
/// name another process), and so is one an epoll watches that no process
/// holding the epoll holds (pidfds are made, and then registered, at the
/// end of a restore, by a process holding both).
pub fn resolve_pidfds(
    table: &mut FileTable,
    ns_of: &std::collections::BTreeMap<Pid, i32>,
    images: &[ProcessImage],
    depth: usize,
    problems: &mut Vec<String>,
) {
    // Pidfds watched by an epoll that no process holding them holds.
    let unplaced: std::collections::HashSet<usize> = (table.files.iter())
        .filter_map(|f| match &f.kind {
            FileKind::Epoll { targets } => Some(targets.iter().filter_map(|t| {
                let file = t.file?;
                let placed = images.iter().any(|p| p.can_register(f.id, file));
                (!placed).then_some(file)
            })),
            _ => None,
        })
        .flatten()
        .collect();
    for id in 0..table.files.len() {
        let FileKind::PidFd { pid: host } = table.files[id].kind else {
            continue;
        };
        let (hp, hfd) = table.holders[id];
        let thread = table.files[id].flags & libc::O_EXCL as u32 != 0;
        // The thread group it belongs to, as our namespace numbers it.
        let tgid = if thread {
            procfs::process::Process::new(host)
                .and_then(|p| p.status())
                .ok()
                .map(|s| s.tgid)
        } else {
            Some(host)
        };
        let ours = tgid.and_then(|g| ns_of.get(&Pid::from_raw(g)).copied());
        let numbered = ours.and_then(|ns| {
            if !thread {
                return Some(ns);
            }
            let tid = crate::dump::process::tree_tid(host, depth)?;
            (images.iter())
                .find(|i| i.pid == ns)
                .filter(|i| i.threads.iter().any(|t| t.tid == tid))
                .map(|_| tid)
        });
        match numbered {
            None => problems.push(format!(
                "process {hp}: fd {hfd}: a pidfd of {} {host}, outside the tree",
                if thread { "thread" } else { "process" }
            )),
            Some(_) if unplaced.contains(&id) => problems.push(format!(
                "process {hp}: fd {hfd}: a pidfd watched by an epoll that no process holding \
                 the pidfd holds"
            )),
            Some(n) => table.files[id].kind = FileKind::PidFd { pid: n },
        }
    }
}

/// Names the open file behind every epoll target, once every open file of
/// the tree is known: the kernel keys a registration by open file and fd
/// number, and the fd may have been closed (or moved) since. A target no
/// fd of the tree holds is a problem.
pub fn resolve_epoll_targets(table: &mut FileTable, problems: &mut Vec<String>) {
    let mut inodes = std::mem::take(&mut table.epoll_inodes).into_iter();
    for id in 0..table.files.len() {
        let FileKind::Epoll { targets } = &table.files[id].kind else {
            continue;
        };
        let Some(inos) = inodes.next() else { break };
        let (ep, efd) = table.holders[id];
        let mut found = Vec::with_capacity(targets.len());
        for (i, tg) in targets.iter().enumerate() {
            // Registrations sharing a number come in the order the kernel
            // searches them.
            let toff = targets[..i].iter().filter(|o| o.fd == tg.fd).count() as u32;
            let ino = inos.get(i).copied().unwrap_or(0);
            let file = table
                .by_inode
                .iter()
                .filter(|((_, i), _)| ino == 0 || *i == ino)
                .flat_map(|(_, ids)| ids.iter().copied())
                .find(|&cand| {
                    let (cp, cfd) = table.holders[cand];
                    sys::epoll_target_is(cp, cfd, ep, efd, tg.fd, toff).unwrap_or(false)
                });
            if file.is_none() && !table.refused.contains(&ino) {
                problems.push(format!(
                    "process {ep}: fd {efd}: epoll watches a file registered as fd {} \
                     that no process of the tree holds",
                    tg.fd
                ));
            }
            found.push(file);
        }
        if let FileKind::Epoll { targets } = &mut table.files[id].kind {
            for (tg, file) in targets.iter_mut().zip(found) {
                tg.file = file;
            }
        }
    }
}

/// Lists and classifies every fd of `pid`.
pub fn dump(
    pid: Pid,
    img: &ImageDir,
    table: &mut FileTable,
    shmem: &mut ShmemTable,
    unix: &UnixTable,
    problems: &mut Vec<String>,
) -> Result<Vec<Fd>> {
    let raw = pid.as_raw();
    let dir = format!("/proc/{raw}/fd");
    let mut fds: Vec<i32> = fs::read_dir(&dir)
        .map_err(|e| Error::Proc {
            pid: raw,
            what: "file descriptors",
            detail: e.to_string(),
        })?
        .flatten()
        .filter_map(|e| e.file_name().to_string_lossy().parse().ok())
        .collect();
    fds.sort();
    let mut out = Vec::new();
    for fd in fds {
        let link_path = format!("{dir}/{fd}");
        let Ok(link) = fs::read_link(&link_path) else {
            continue; // closed meanwhile (impossible while stopped, but harmless)
        };
        let link = link.to_string_lossy().into_owned();
        let meta = fs::metadata(&link_path).map_err(|e| Error::Proc {
            pid: raw,
            what: "file descriptor",
            detail: format!("fd {fd} ({link}): {e}"),
        })?;
        let info = pfs::read_fdinfo(raw, fd)?;
        let cloexec = info.flags & O_CLOEXEC != 0;
        let Some(id) = file_of(
            pid, fd, &link, &meta, &info, img, table, shmem, unix, problems,
        )?
        else {
            continue;
        };
        if !info.locks.is_empty() {
            table.note_locks(pid, fd, id, &info.locks, problems);
        }
        out.push(Fd {
            fd,
            file: id,
            cloexec,
        });
    }
    Ok(out)
}

/// The open file behind fd `fd` of `pid` (its `link`, `meta` and `info`
/// read from /proc): one met before (a dup, a fork, a file in flight), or
/// one classified and added now; `None` when it is refused (said in
/// `problems`).
#[allow(clippy::too_many_arguments)]
fn file_of(
    pid: Pid,
    fd: i32,
    link: &str,
    meta: &fs::Metadata,
    info: &FdInfo,
    img: &ImageDir,
    table: &mut FileTable,
    shmem: &mut ShmemTable,
    unix: &UnixTable,
    problems: &mut Vec<String>,
) -> Result<Option<usize>> {
    let key = (meta.dev(), meta.ino());
    for &id in table.by_inode.get(&key).into_iter().flatten() {
        if table.links[id] != link {
            continue;
        }
        let (hp, hfd) = table.holders[id];
        if sys::same_file(pid, fd, hp, hfd).unwrap_or(false) {
            return Ok(Some(id));
        }
    }
    let Some(kind) = classify(pid, fd, link, meta, info, img, table, shmem, unix, problems)? else {
        // Refused (said in `problems`): an epoll watching it need not say
        // so again.
        table.refused.insert(meta.ino());
        return Ok(None);
    };
    let id = table.files.len();
    let ((owner_type, owner), signal) = {
        let f = table.take_fd(pid, fd)?;
        sys::signal_owner(f.as_fd()).map_err(Error::io(format!(
            "signal owner of fd {fd} of process {pid}"
        )))?
    };
    if owner > 0 {
        table.owners.push((id, owner_type, owner));
    }
    table.files.push(OpenFile {
        id,
        flags: info.flags & !O_CLOEXEC,
        kind,
        owner: None,
        signal,
    });
    table.holders.push((pid, fd));
    table.links.push(link.to_string());
    table.by_inode.entry(key).or_default().push(id);
    if let FileKind::OuterTerminal { .. } = table.files[id].kind {
        table.ptys.terminals.push((id, meta.dev()));
    }
    if let FileKind::Regular { deleted: true, .. } = table.files[id].kind {
        save_deleted(pid.as_raw(), fd, &img.file_data(id))?;
    }
    Ok(Some(id))
}

/// Gives every file in flight on a unix socket of the tree its place in
/// the table: the open file a process of the tree holds, or one added now
/// and parked ([`ProcessImage::parked`]) at the lowest free fd of the
/// process holding the socket that carries it (for a socket itself in
/// flight, of the process that socket is parked with).
#[allow(clippy::too_many_arguments)]
pub fn resolve_in_flight(
    table: &mut FileTable,
    img: &ImageDir,
    shmem: &mut ShmemTable,
    unix: &UnixTable,
    images: &mut [ProcessImage],
    ns_of: &std::collections::BTreeMap<Pid, i32>,
    problems: &mut Vec<String>,
) -> Result<()> {
    if table.flying.is_empty() {
        return Ok(());
    }
    let me = Pid::this();
    // The socket carrying in-flight file `i`, and who holds that socket.
    let carrier = |table: &FileTable, i: usize| {
        (table.files.iter())
            .find(|f| f.kind.in_flight().iter().any(|m| m.files.contains(&i)))
            .map(|f| f.id)
    };
    let mut ids: Vec<Option<usize>> = Vec::with_capacity(table.flying.len());
    let mut parked_with: HashMap<usize, i32> = HashMap::new();
    let mut i = 0;
    while i < table.flying.len() {
        let fd = table.flying[i].as_raw_fd();
        let Some(socket) = carrier(table, i) else {
            // Its socket was refused (said already).
            ids.push(None);
            i += 1;
            continue;
        };
        let (hp, hfd) = table.holders[socket];
        let held_by = if hp == me {
            parked_with.get(&socket).copied()
        } else {
            ns_of.get(&hp).copied()
        };
        let path = format!("/proc/self/fd/{fd}");
        let link = fs::read_link(&path)
            .map_err(Error::io("a file in flight"))?
            .to_string_lossy()
            .into_owned();
        let meta = fs::metadata(&path).map_err(Error::io("a file in flight"))?;
        let info = pfs::read_fdinfo(me.as_raw(), fd)?;
        let whose = match held_by {
            _ if hp != me => format!("process {hp}: fd {hfd}"),
            Some(ns) => format!("a unix socket in flight parked with process {ns}"),
            None => "a unix socket in flight".to_string(),
        };
        let mut said = Vec::new();
        let id = if link == "anon_inode:[eventpoll]" {
            said.push("an epoll instance (its registrations name fds of its sender)".into());
            None
        } else if !info.locks.is_empty() {
            said.push("a file with locks".into());
            None
        } else {
            file_of(
                me, fd, &link, &meta, &info, img, table, shmem, unix, &mut said,
            )?
        };
        let known = id.is_some_and(|id| table.holders[id].0 != me);
        // A file only in flight is read through our own fd: its path is
        // as we see it, and must name the same file in the receiver's root
        // (a container's may differ), where the restore opens it.
        if let Some(path) = id
            .filter(|_| !known)
            .and_then(|id| reopened_by(&table.files[id].kind))
            && let Some(ns) = held_by
            && !names_it(ns_of, ns, path, &meta)
        {
            said.push(format!(
                "a file only in flight whose path ({path}) names another file, or none, \
                 where the process receiving it sees it"
            ));
        }
        // Said of our own fd by `file_of`: said of the socket instead.
        let ours = format!("process {me}: fd {fd} ({link}): ");
        problems.extend(said.into_iter().map(|what| {
            let what = what.strip_prefix(&ours).unwrap_or(&what);
            format!("{whose}: a file in flight (SCM_RIGHTS) on it ({link}): {what}")
        }));
        match (id, held_by, known) {
            (Some(id), Some(ns), false) if !parked_with.contains_key(&id) => {
                park(images, ns, id);
                parked_with.insert(id, ns);
            }
            (Some(_), None, false) => problems.push(format!(
                "{whose}: a file in flight (SCM_RIGHTS) on it ({link}) that no process \
                 of the tree can hold for the restore"
            )),
            _ => {}
        }
        ids.push(id);
        i += 1;
    }
    for f in &mut table.files {
        if let FileKind::UnixConnected { in_flight, .. } | FileKind::Unix { in_flight, .. } =
            &mut f.kind
        {
            for m in in_flight.iter_mut() {
                m.files = m.files.iter().filter_map(|&i| ids[i]).collect();
            }
        }
    }
    Ok(())
}

/// What an open file of misc device `minor` (major 10) is, if it is a
/// thing of its own that opening the device again does not bring back.
fn stateful_misc_device(minor: u32) -> Option<&'static str> {
    Some(match minor {
        229 => "a FUSE connection (/dev/fuse)",
        232 => "a KVM handle (/dev/kvm)",
        238 => "a vhost-net device (/dev/vhost-net)",
        241 => "a vhost-vsock device (/dev/vhost-vsock)",
        223 => "a uinput device (/dev/uinput)",
        _ => return None,
    })
}

/// A TUN/TAP file of process `pid` (`file`, a copy of it, opened at
/// `path`): the interface it is attached to, in the process's network
/// namespace (whether the tree made that namespace is checked once the
/// tree is known, [`crate::image::netns::check_tun_files`]), or what a restore
/// could not bring back.
fn tun_file(
    pid: i32,
    file: BorrowedFd<'_>,
    path: String,
    rdev: u64,
) -> std::io::Result<std::result::Result<FileKind, String>> {
    let Some((iface, flags)) = sys::tun::attached(file)? else {
        return Ok(Err("a TUN/TAP file attached to no interface yet".into()));
    };
    if flags & libc::IFF_DETACH_QUEUE as u16 != 0 {
        return Ok(Err(format!(
            "a queue detached from TUN/TAP interface {iface} (TUNSETQUEUE)"
        )));
    }
    if flags & !crate::image::netns::TunDevice::FILE_FLAGS != 0 {
        return Ok(Err(format!(
            "a file of TUN/TAP interface {iface} with flags {flags:#x} (NAPI, for tests of \
             the kernel)"
        )));
    }
    let here = std::fs::metadata(format!("/proc/{pid}/ns/net"))?.ino();
    if sys::tun::device_netns(file)? != here {
        return Ok(Err(format!(
            "a file of TUN/TAP interface {iface}, which is in another network namespace \
             than the process"
        )));
    }
    if flags & libc::IFF_TAP as u16 != 0 && sys::tun::has_filter(file)? {
        return Ok(Err(format!(
            "a file of TAP interface {iface} with a socket filter (TUNATTACHFILTER)"
        )));
    }
    let sndbuf = sys::tun::sndbuf(file)?;
    let vnet = if flags & libc::IFF_VNET_HDR as u16 != 0 {
        let (size, little_endian) = sys::tun::vnet(file)?;
        // The offloads are its interface's features, seen from its
        // namespace.
        let features = crate::common::in_netns_of(Pid::from_raw(pid), || {
            sys::ethtool::active_features(&iface)
        })
        .map_err(|e| std::io::Error::other(e.to_string()))??;
        let offloads = crate::image::netns::VnetHdr::offloads_of(&features);
        Some(crate::image::netns::VnetHdr {
            size,
            little_endian,
            offloads,
        })
    } else {
        None
    };
    Ok(Ok(FileKind::Tun {
        path,
        rdev,
        iface,
        flags,
        sndbuf: (sndbuf != i32::MAX).then_some(sndbuf),
        vnet,
    }))
}

/// Every pseudo-terminal of the tree is one its master is outside of
/// (masters are refused), which the restorer's stdio can stand in for
/// only where the tree holds it at a stdio fd.
pub fn check_terminals(table: &FileTable, images: &[ProcessImage], problems: &mut Vec<String>) {
    for f in &table.files {
        let FileKind::OuterTerminal { path, .. } = &f.kind else {
            continue;
        };
        let at_stdio = images
            .iter()
            .flat_map(|p| p.fds.iter())
            .any(|fd| fd.file == f.id && fd.fd <= 2);
        if !at_stdio {
            let holders: Vec<String> = images
                .iter()
                .flat_map(|p| {
                    p.fds
                        .iter()
                        .filter(|fd| fd.file == f.id)
                        .map(move |fd| format!("process {}: fd {}", p.pid, fd.fd))
                })
                .collect();
            problems.push(format!(
                "{}: terminal {path}, whose master is outside the tree, held at no stdio fd \
                 (opened again by its path, it could be another's)",
                holders.join(", ")
            ));
        }
    }
}

/// The path a restore opens a file of this kind again by, if it does.
fn reopened_by(kind: &FileKind) -> Option<&str> {
    match kind {
        FileKind::Regular {
            path,
            deleted: false,
            ..
        }
        | FileKind::Directory {
            path,
            deleted: None,
        }
        | FileKind::CharDevice { path, .. }
        | FileKind::Fifo { path, .. } => Some(path),
        _ => None,
    }
}

/// Whether `path`, in the root of the process the tree numbers `ns`, is
/// the file `meta` describes.
fn names_it(
    ns_of: &std::collections::BTreeMap<Pid, i32>,
    ns: i32,
    path: &str,
    meta: &fs::Metadata,
) -> bool {
    let Some((host, _)) = ns_of.iter().find(|(_, n)| **n == ns) else {
        return false;
    };
    fs::metadata(format!("/proc/{host}/root{path}"))
        .is_ok_and(|m| (m.dev(), m.ino()) == (meta.dev(), meta.ino()))
}

/// Parks open file `id` at the lowest free fd of the fd table process
/// `ns` uses (its parent's, and so on, when it shares it).
fn park(images: &mut [ProcessImage], ns: i32, id: usize) {
    let owner = table_owner(images, ns);
    let Some(p) = images.iter().find(|p| p.pid == owner) else {
        return;
    };
    let used: std::collections::HashSet<i32> = p.fds.iter().map(|f| f.fd).collect();
    let Some(fd) = (0..i32::MAX).find(|n| !used.contains(n)) else {
        return;
    };
    // Every process sharing the table lists it.
    let sharing: Vec<i32> = images
        .iter()
        .filter(|q| q.pid == owner || (q.shares_table() && table_owner(images, q.pid) == owner))
        .map(|q| q.pid)
        .collect();
    for q in images.iter_mut().filter(|q| sharing.contains(&q.pid)) {
        let at = q.fds.partition_point(|f| f.fd < fd);
        q.fds.insert(
            at,
            Fd {
                fd,
                file: id,
                cloexec: true,
            },
        );
        q.parked.push(fd);
    }
}

/// The process whose fd table `ns` uses.
fn table_owner(images: &[ProcessImage], mut ns: i32) -> i32 {
    // Each step goes to a process earlier in the tree: no cycle.
    while let Some(next) = images
        .iter()
        .find(|p| p.pid == ns)
        .and_then(ProcessImage::table_sharer)
    {
        ns = next;
    }
    ns
}

#[allow(clippy::too_many_arguments)]
fn classify(
    pid: Pid,
    fd: i32,
    link: &str,
    meta: &fs::Metadata,
    info: &FdInfo,
    img: &ImageDir,
    table: &mut FileTable,
    shmem: &mut ShmemTable,
    unix: &UnixTable,
    problems: &mut Vec<String>,
) -> Result<Option<FileKind>> {
    let raw = pid.as_raw();
    let mut problem = |what: String| {
        problems.push(format!("process {raw}: fd {fd} ({link}): {what}"));
        Ok(None)
    };
    let field = |k: &str| info.fields.get(k).map(String::as_str).unwrap_or("");
    if link.starts_with("pipe:[") {
        let pipe = meta.ino();
        let write_end = info.flags & libc::O_ACCMODE as u32 == libc::O_WRONLY as u32;
        let (capacity, packets) = save_pipe(raw, fd, pipe, img, table)?;
        let end = table.take_fd(pid, fd)?;
        let peer_closed = sys::pipe_widowed(end.as_fd(), write_end)
            .map_err(Error::io(format!("poll pipe fd {fd} of process {pid}")))?;
        return Ok(Some(FileKind::Pipe {
            pipe,
            write_end,
            capacity,
            packets,
            peer_closed,
        }));
    }
    if link.starts_with("socket:[") {
        let ino = meta.ino() as u32;
        let started = std::time::Instant::now();
        let kind = socket_kind(pid, fd, ino, img, table, unix);
        table.socket_time += started.elapsed();
        return match kind? {
            Ok(kind) => Ok(Some(kind)),
            Err(what) => problem(what),
        };
    }
    if let Some(anon) = link.strip_prefix("anon_inode:") {
        return match anon {
            "[eventfd]" => Ok(Some(FileKind::EventFd {
                count: u64::from_str_radix(field("eventfd-count"), 16).unwrap_or(0),
                semaphore: field("eventfd-semaphore") == "1",
            })),
            "[signalfd]" => Ok(Some(FileKind::SignalFd {
                mask: u64::from_str_radix(field("sigmask"), 16).unwrap_or(0),
            })),
            "[timerfd]" => Ok(Some(FileKind::TimerFd {
                clock: field("clockid").parse().unwrap_or(libc::CLOCK_MONOTONIC),
                ticks: field("ticks").parse().unwrap_or(0),
                value_ns: pfs::parse_timespec_pair(field("it_value")).unwrap_or(0),
                interval_ns: pfs::parse_timespec_pair(field("it_interval")).unwrap_or(0),
            })),
            "[eventpoll]" => Ok(Some({
                table
                    .epoll_inodes
                    .push(info.epoll.iter().map(|e| e.ino).collect());
                FileKind::Epoll {
                    targets: info
                        .epoll
                        .iter()
                        .map(|e| EpollTarget {
                            fd: e.tfd,
                            events: e.events,
                            data: e.data,
                            file: None,
                        })
                        .collect(),
                }
            })),
            // Numbered as the tree numbers it once the tree is known
            // ([`resolve_pidfds`]); -1 once its process is reaped.
            "[pidfd]" => match field("Pid").parse::<i32>() {
                Ok(target) if target > 0 => Ok(Some(FileKind::PidFd { pid: target })),
                Ok(-1) => {
                    let end = table.take_fd(pid, fd)?;
                    let status = sys::pidfd_exit_status(end.as_fd())
                        .map_err(Error::io(format!("exit status behind pidfd {fd} of {pid}")))?;
                    Ok(Some(FileKind::PidFdReaped { status }))
                }
                _ => problem(format!("a pidfd naming pid {:?}", field("Pid"))),
            },
            "[fanotify]" => match fanotify_group(raw, &info.fanotify) {
                Ok(kind) => Ok(Some(kind)),
                Err(what) => problem(what),
            },
            "inotify" => match inotify_watches(raw, &info.inotify)? {
                Ok(watches) => Ok(Some(FileKind::Inotify { watches })),
                Err(what) => problem(what),
            },
            other => problem(format!("{} is not supported", describe_anon(other))),
        };
    }
    if let Some(name) = link.strip_prefix("/memfd:") {
        let name = name.trim_end_matches(" (deleted)").to_string();
        let f = File::open(format!("/proc/{raw}/fd/{fd}")).map_err(Error::io("open memfd"))?;
        let id = shmem.memfd(&f, name, img)?;
        return Ok(Some(FileKind::Memfd {
            shmem: id,
            pos: info.pos,
        }));
    }
    // A namespace file ("uts:[4026531838]"): of which process, once the
    // tree is known ([`resolve_ns_files`]).
    if let Some(ns) = link
        .split_once(":[")
        .and_then(|(kind, _)| NsKind::from_file(kind))
    {
        return Ok(Some(FileKind::NsFile { ns, pid: 0 }));
    }
    // What is left has a path.
    if !link.starts_with('/') {
        return problem(
            "a file of a kind this engine does not know has no path to open again".into(),
        );
    }
    if crate::dump::mqueue::is_queue(raw, fd, meta) {
        return match table.queues.queue(raw, fd, link, meta)? {
            Ok(queue) => Ok(Some(FileKind::PosixQueue { queue })),
            Err(what) => problem(what),
        };
    }
    let ft = meta.mode() & libc::S_IFMT;
    let deleted = link.ends_with(" (deleted)");
    let path = link.trim_end_matches(" (deleted)").to_string();
    let owner = Owner {
        uid: meta.uid(),
        gid: meta.gid(),
        mode: meta.mode() & 0o7777,
    };
    // A deleted file still linked elsewhere is that file, not a copy.
    let handle = if deleted && ft == libc::S_IFREG && meta.nlink() > 0 {
        sys::name_to_handle(std::path::Path::new(&format!("/proc/{raw}/fd/{fd}")))
            .ok()
            .map(|(mount_id, ty, bytes)| crate::image::FileHandle {
                mount_id,
                ty,
                bytes: crate::image::Hex(bytes),
            })
    } else {
        None
    };
    Ok(Some(match ft {
        libc::S_IFREG => FileKind::Regular {
            path,
            pos: info.pos,
            deleted,
            size: meta.len(),
            mode: meta.mode() & 0o7777,
            ghost: deleted.then_some((meta.dev(), meta.ino(), owner)),
            handle,
        },
        libc::S_IFDIR => FileKind::Directory {
            path,
            deleted: deleted.then_some(owner),
        },
        libc::S_IFCHR if !deleted => match libc::major(meta.rdev()) {
            // /dev/ptmx (5:2): a master, read through a copy (opened
            // again, it would make a new pair).
            5 if libc::minor(meta.rdev()) == 2 => {
                let master = table
                    .take_fd(pid, fd)?
                    .try_clone()
                    .map_err(Error::io(format!("copy fd {fd} of process {pid}")))?;
                return match table.ptys.master(master)? {
                    Ok(pty) => Ok(Some(FileKind::PtyMaster { pty })),
                    Err(what) => problem(what),
                };
            }
            // The old BSD masters: opened again, one makes a new pair.
            128..=135 => return problem("a BSD pseudo-terminal master".into()),
            // /dev/pts/N: one of a pair whose master the tree holds once
            // that master is met ([`crate::dump::pty::Ptys::claim_terminals`]),
            // else one whose master is outside.
            136..=143 => FileKind::OuterTerminal {
                path,
                rdev: meta.rdev(),
            },
            // A TUN/TAP file: attached again to its interface, which a
            // network namespace the tree made has again.
            10 if libc::minor(meta.rdev()) == 200 => {
                let file = table.take_fd(pid, fd)?;
                let kind = tun_file(raw, file.as_fd(), path, meta.rdev())
                    .map_err(Error::io(format!("read TUN/TAP fd {fd} of process {pid}")))?;
                return match kind {
                    Ok(kind) => Ok(Some(kind)),
                    Err(what) => problem(what),
                };
            }
            // Devices whose open file is a thing of its own (an interface,
            // a file system's connection, a virtual machine...): opened
            // again, the device gives a new one.
            10 if let Some(what) = stateful_misc_device(libc::minor(meta.rdev())) => {
                return problem(format!(
                    "{what}: opened again, the device would give a new one, not this"
                ));
            }
            _ => FileKind::CharDevice {
                path,
                rdev: meta.rdev(),
            },
        },
        libc::S_IFIFO if !deleted => {
            let pipe = meta.ino();
            save_pipe(raw, fd, pipe, img, table)?;
            FileKind::Fifo { path, pipe }
        }
        _ => {
            return problem(
                "unsupported file type (deleted device or FIFO, or a block device)".into(),
            );
        }
    }))
}

/// The watches of an inotify instance of `pid`, from its fdinfo lines
/// ("wd:1 ino:98c636 sdev:fe00000 mask:300 ignored_mask:0
/// fhandle-bytes:8 fhandle-type:1 f_handle:36c6980052d58c89"): each
/// watched file is found by its handle, and named by its path as the
/// process sees it. A watch whose file has no name left cannot be made
/// again.
fn inotify_watches(
    pid: i32,
    lines: &[String],
) -> Result<std::result::Result<Vec<InotifyWatch>, String>> {
    let mut out = Vec::new();
    for line in lines {
        let hex32 = |k: &str| hex_word(line, k);
        let handle = mark_handle(line);
        let (Some(wd), Some(mask), Some(sdev), Some(htype), Some(handle)) = (
            hex32("wd"),
            hex32("mask"),
            hex32("sdev"),
            hex32("fhandle-type"),
            handle,
        ) else {
            return Ok(Err(format!(
                "an inotify watch this engine cannot read ({line})"
            )));
        };
        if wd as i32 > crate::image::INOTIFY_MAX_WD || (wd as i32) < 1 {
            return Ok(Err(format!(
                "inotify watch descriptor {wd} is beyond {}, the highest a restore reaches",
                crate::image::INOTIFY_MAX_WD
            )));
        }
        let found = watched_path(pid, sdev, htype as i32, &handle);
        let (path, key) = match found {
            Ok(p) => p,
            Err(e) => {
                return Ok(Err(format!(
                    "inotify watch {wd}: its file cannot be found ({e})"
                )));
            }
        };
        // Watched again on its recreation, if an fd of the tree holds it
        // ([`check_deleted_watches`]).
        let deleted = path.ends_with(" (deleted)").then_some(key);
        out.push(InotifyWatch {
            wd: wd as i32,
            mask,
            path: path.trim_end_matches(" (deleted)").to_string(),
            deleted,
        });
    }
    out.sort_by_key(|w| w.wd);
    Ok(Ok(out))
}

/// A fanotify group of `pid` from its fdinfo lines (the group's, then
/// one per mark), each mark's file found by its handle and recorded by
/// path, each mount mark by its mount point; or why it cannot be restored.
fn fanotify_group(pid: i32, lines: &[String]) -> std::result::Result<FileKind, String> {
    let group = lines.first().map(String::as_str).unwrap_or("");
    let (Some(init_flags), Some(event_flags)) =
        (hex_word(group, "flags"), hex_word(group, "event-flags"))
    else {
        return Err(format!(
            "a fanotify group this engine cannot read ({group})"
        ));
    };
    // FAN_CLASS_CONTENT, FAN_CLASS_PRE_CONTENT.
    if init_flags & 0xc != 0 {
        return Err(
            "a fanotify group for permission events (an answer the program owes would be lost)"
                .into(),
        );
    }
    let mut marks = Vec::new();
    for line in &lines[1..] {
        let (Some(mflags), Some(mask), Some(ignored_mask)) = (
            hex_word(line, "mflags"),
            hex_word(line, "mask"),
            hex_word(line, "ignored_mask"),
        ) else {
            return Err(format!("a fanotify mark this engine cannot read ({line})"));
        };
        let mut deleted = None;
        let (on, path) = if let Some(mnt) = hex_word(line, "mnt_id") {
            let path = mount_point(pid, |w| {
                w.first().and_then(|id| id.parse::<u32>().ok()) == Some(mnt)
            })
            .map_err(|e| format!("fanotify mount mark: {e}"))?;
            (MarkOn::Mount, path)
        } else if hex_word(line, "ino").is_some() {
            let handle = mark_handle(line);
            let (Some(sdev), Some(htype), Some(handle)) = (
                hex_word(line, "sdev"),
                hex_word(line, "fhandle-type"),
                handle,
            ) else {
                return Err(format!("a fanotify mark this engine cannot read ({line})"));
            };
            let (path, key) = watched_path(pid, sdev, htype as i32, &handle)
                .map_err(|e| format!("fanotify mark: its file cannot be found ({e})"))?;
            // Marked again on its recreation, if an fd of the tree holds
            // it ([`check_deleted_watches`]).
            deleted = path.ends_with(" (deleted)").then_some(key);
            (
                MarkOn::File,
                path.trim_end_matches(" (deleted)").to_string(),
            )
        } else if let Some(sdev) = hex_word(line, "sdev") {
            let dev = format!("{}:{}", sdev >> 20, sdev & 0xfffff);
            let path = mount_point(pid, |w| w.get(2) == Some(&dev.as_str()))
                .map_err(|e| format!("fanotify filesystem mark: {e}"))?;
            (MarkOn::Filesystem, path)
        } else {
            return Err(format!("a fanotify mark this engine cannot read ({line})"));
        };
        marks.push(FanotifyMark {
            path,
            on,
            mflags,
            mask,
            ignored_mask,
            deleted,
        });
    }
    // fdinfo lists the newest mark first: kept in the order they were made.
    marks.reverse();
    Ok(FileKind::Fanotify {
        init_flags,
        event_flags,
        marks,
    })
}

/// Process `pid`'s mount table as it sees it, each line split in words
/// ("36 35 254:0 / / rw,relatime shared:1 - ext4 /dev/root rw": mount id,
/// parent, device, root of the mount in its file system, mount point...).
fn mount_table(pid: i32) -> std::io::Result<Vec<Vec<String>>> {
    let mountinfo = crate::procfs::read_text(format!("/proc/{pid}/mountinfo"))?;
    Ok(mountinfo
        .lines()
        .map(|l| l.split(' ').map(str::to_string).collect())
        .collect())
}

/// The mount point, as process `pid` sees it, of the first of its mounts
/// whose mountinfo line (split in words) `which` picks.
fn mount_point(pid: i32, which: impl Fn(&[&str]) -> bool) -> std::io::Result<String> {
    mount_table(pid)?
        .into_iter()
        .find(|w| which(&w.iter().map(String::as_str).collect::<Vec<_>>()))
        .and_then(|mut w| (w.len() > 4).then(|| w.swap_remove(4)))
        .ok_or_else(|| std::io::Error::other("no such mount in its mount table"))
}

/// The hexadecimal value of `key:` in an inotify watch's or fanotify
/// mark's fdinfo line.
fn hex_word(line: &str, key: &str) -> Option<u32> {
    let v = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix(':'))?;
    u32::from_str_radix(v, 16).ok()
}

/// The `f_handle:` bytes of an inotify watch's or fanotify mark's line.
fn mark_handle(line: &str) -> Option<Vec<u8>> {
    let h = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("f_handle:"))?;
    (h.len() % 2 == 0)
        .then(|| {
            (0..h.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(h.get(i..i + 2)?, 16).ok())
                .collect()
        })
        .flatten()
}

/// The path, as process `pid` sees it, of the file of a handle on the
/// filesystem of device `sdev` (major in the bits above 20), and the
/// file's (device, inode).
///
/// The handle is opened through one of the process's mounts of that
/// device, which names the file by that mount; but the process may see
/// the file through another, bind-mounted elsewhere (a container's /tmp is
/// a directory of the host's root file system mounted on /tmp). The name
/// kept is the one through the mount whose root holds the file most
/// closely, checked to lead to the same inode; failing that, the name as
/// opened (a chrooted process's with its root taken off).
fn watched_path(
    pid: i32,
    sdev: u32,
    htype: i32,
    handle: &[u8],
) -> std::io::Result<(String, (u64, u64))> {
    let dev = format!("{}:{}", sdev >> 20, sdev & 0xfffff);
    let table = mount_table(pid)?;
    // (root of the mount in its file system, where it is mounted).
    let mounts: Vec<(&str, &str)> = table
        .iter()
        .filter(|w| w.get(2) == Some(&dev))
        .filter_map(|w| Some((w.get(3)?.as_str(), w.get(4)?.as_str())))
        .collect();
    let &(via_root, via_point) = mounts
        .first()
        .ok_or_else(|| std::io::Error::other(format!("no mount of device {dev}")))?;
    // Not O_PATH: open_by_handle_at refuses such an fd for the mount.
    let mount = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(format!("/proc/{pid}/root{via_point}"))?;
    let f = sys::open_by_handle(mount.as_fd(), htype, handle, libc::O_PATH | libc::O_CLOEXEC)?;
    let link = fs::read_link(format!("/proc/self/fd/{}", f.as_raw_fd()))?;
    let meta = fs::metadata(format!("/proc/self/fd/{}", f.as_raw_fd()))?;
    let key = (meta.dev(), meta.ino());
    let opened = link.to_string_lossy().into_owned();
    let (name, suffix) = match opened.strip_suffix(" (deleted)") {
        Some(n) => (n.to_string(), " (deleted)"),
        None => (opened.clone(), ""),
    };
    let mut candidates = Vec::new();
    if let Some(in_fs) = strip_dir(&name, via_point).map(|rest| join_dir(via_root, rest)) {
        let mut by_root: Vec<_> = mounts
            .iter()
            .filter_map(|&(root, point)| {
                Some((root.len(), join_dir(point, strip_dir(&in_fs, root)?)))
            })
            .collect();
        by_root.sort_by_key(|(len, _)| std::cmp::Reverse(*len));
        candidates.extend(by_root.into_iter().map(|(_, p)| p));
    }
    // Our view of the path, made the process's: its root is a directory
    // of ours.
    let mut plain = name.clone();
    if let Ok(root) = fs::read_link(format!("/proc/{pid}/root")) {
        let root = root.to_string_lossy().into_owned();
        if root != "/"
            && let Some(rest) = strip_dir(&name, &root)
        {
            plain = join_dir("/", rest);
        }
    }
    candidates.push(plain.clone());
    // A deleted file has no name to check: its name as opened stands.
    let path = if suffix.is_empty() {
        candidates
            .into_iter()
            .find(|c| {
                fs::metadata(format!("/proc/{pid}/root{c}"))
                    .is_ok_and(|m| (m.dev(), m.ino()) == key)
            })
            .unwrap_or(plain)
    } else {
        candidates.into_iter().next().unwrap_or(plain)
    };
    Ok((format!("{path}{suffix}"), key))
}

/// What is left of `path` below directory `dir` ("" for `dir` itself), if
/// it is below it.
fn strip_dir<'a>(path: &'a str, dir: &str) -> Option<&'a str> {
    if dir == "/" {
        return path.strip_prefix('/');
    }
    let rest = path.strip_prefix(dir)?;
    match rest.strip_prefix('/') {
        Some(r) => Some(r),
        None => rest.is_empty().then_some(""),
    }
}

/// `rest` (relative) below directory `dir`.
fn join_dir(dir: &str, rest: &str) -> String {
    match (dir.trim_end_matches('/'), rest) {
        ("", "") => "/".into(),
        (d, "") => d.into(),
        (d, r) => format!("{d}/{r}"),
    }
}

fn describe_anon(name: &str) -> String {
    match name {
        "inotify" => "an inotify instance".into(),
        "[fanotify]" => "a fanotify instance".into(),
        "[io_uring]" => "an io_uring instance".into(),
        "[userfaultfd]" => "a userfaultfd".into(),
        "[pidfd]" => "a pidfd".into(),
        "[perf_event]" => "a perf event".into(),
        other => format!("an anonymous inode of kind {other}"),
    }
}

/// A unix socket: listening, connected (with what it has queued to read)
/// or neither.
/// The unix sockets of the tree's network namespaces (asked of sock_diag
/// once, when the first unix socket is met: most processes have none;
/// inode numbers are the host's, whatever the namespace).
pub struct UnixTable {
    /// A process in each namespace: the root, and the first of each the
    /// tree made.
    namespaces: Vec<Pid>,
    map: std::cell::OnceCell<HashMap<u32, UnixInfo>>,
}

impl UnixTable {
    pub fn new(namespaces: Vec<Pid>) -> UnixTable {
        UnixTable {
            namespaces,
            map: std::cell::OnceCell::new(),
        }
    }

    pub fn get(&self) -> Result<&HashMap<u32, UnixInfo>> {
        if let Some(m) = self.map.get() {
            return Ok(m);
        }
        let mut all = HashMap::new();
        for pid in &self.namespaces {
            let m = crate::common::in_netns_of(*pid, crate::unixdiag::query)?
                .map_err(Error::io("list unix sockets (sock_diag)"))?;
            all.extend(m);
        }
        Ok(self.map.get_or_init(|| all))
    }
}

fn unix_kind(
    pid: Pid,
    fd: i32,
    ino: u32,
    s: &std::os::fd::OwnedFd,
    img: &ImageDir,
    table: &mut FileTable,
    unix: &HashMap<u32, UnixInfo>,
) -> Result<std::result::Result<FileKind, String>> {
    let ty = sys::getsockopt_int(s.as_fd(), libc::SOL_SOCKET, libc::SO_TYPE)
        .map_err(Error::io("socket type"))?;
    let Some(info) = unix.get(&ino) else {
        return Ok(Err(format!(
            "unix socket {ino} is not in the container's network namespace"
        )));
    };
    // Read before peeking, which moves the peek offset.
    let options = sockopt::read(s.as_fd(), Sock::Unix);
    if info.state == tcp::TCP_LISTEN {
        let Some(name) = info.name.clone() else {
            return Ok(Err("a listening unix socket without a name".into()));
        };
        return Ok(Ok(FileKind::UnixListen {
            ty,
            name,
            backlog: info.backlog,
            ino,
            pending: info.pending.clone(),
            options,
        }));
    }
    // What this end would read next, without taking it: messages one by
    // one, a stream in one piece.
    let mut data = Vec::new();
    let mut messages = Vec::new();
    let mut senders = Vec::new();
    let fail = |what: &str| {
        let what = what.to_string();
        Error::io(format!("unix socket fd {fd} of process {pid}: {what}"))
    };
    let mut in_flight = Vec::new();
    let Some(peer) = info.peer else {
        if ty == libc::SOCK_DGRAM
            && info.name.is_some()
            && let Err(what) = peek_messages(
                s,
                ty,
                &mut Queue {
                    messages: &mut messages,
                    senders: &mut senders,
                    data: &mut data,
                    in_flight: &mut in_flight,
                    flying: &mut table.flying,
                },
            )
            .map_err(fail("peek"))?
        {
            return Ok(Err(what));
        }
        let data = table.put_blob(img, &data)?;
        return Ok(Ok(FileKind::Unix {
            ty,
            name: info.name.clone(),
            messages,
            data,
            ino,
            options,
            in_flight,
        }));
    };
    if ty == libc::SOCK_STREAM {
        // A client whose connection waits in a listener's queue: the
        // listener names it by its own inode (its peer, the server end, has
        // no inode yet and shows as 0).
        if unix.values().any(|l| l.pending.contains(&ino))
            && sys::ioctl_int(s.as_fd(), 0x5411 /* SIOCOUTQ */).map_err(fail("send queue"))? > 0
        {
            return Ok(Err(
                "a unix connection not yet accepted whose client has sent data".into(),
            ));
        }
    }
    if let Err(what) = peek_messages(
        s,
        ty,
        &mut Queue {
            messages: &mut messages,
            senders: &mut senders,
            data: &mut data,
            in_flight: &mut in_flight,
            flying: &mut table.flying,
        },
    )
    .map_err(fail("peek"))?
    {
        return Ok(Err(what));
    }
    let peer_name = unix.get(&peer).and_then(|p| p.name.clone());
    let data = table.put_blob(img, &data)?;
    Ok(Ok(FileKind::UnixConnected {
        ty,
        ino,
        peer,
        name: info.name.clone(),
        peer_name,
        messages,
        data,
        senders: if ty == libc::SOCK_DGRAM {
            senders
        } else {
            Vec::new()
        },
        shutdown: info.shutdown,
        options,
        in_flight,
    }))
}

/// What a unix socket would read next, as [`peek_messages`] fills it.
struct Queue<'a> {
    messages: &'a mut Vec<u32>,
    senders: &'a mut Vec<Option<crate::unixdiag::UnixName>>,
    data: &'a mut Vec<u8>,
    /// Files passed with the messages, as indices into `flying`.
    in_flight: &'a mut Vec<InFlight>,
    /// Every file in flight met so far, as an fd of ours.
    flying: &'a mut Vec<std::os::fd::OwnedFd>,
}

/// Every message queued on a unix socket of ours (of type `ty`), without
/// taking any: through a peek offset from the head. A stream comes in the
/// pieces one read would return; files passed with SCM_RIGHTS come with
/// the message (or piece) that brings them.
fn peek_messages(
    s: &std::os::fd::OwnedFd,
    ty: i32,
    q: &mut Queue<'_>,
) -> std::io::Result<std::result::Result<(), String>> {
    // A seqpacket socket whose peer has gone reads 0 at the end of its
    // queue instead of EAGAIN: stop once every queued byte (SIOCINQ counts
    // them all) has been seen. A stream reads 0 at its end once its peer
    // has gone.
    let total = if ty == libc::SOCK_DGRAM {
        None
    } else {
        Some(sys::ioctl_int(s.as_fd(), 0x541B /* SIOCINQ */)? as usize)
    };
    if ty == libc::SOCK_STREAM && total == Some(0) {
        return Ok(Ok(()));
    }
    sys::with_peek_offset(s.as_fd(), 0, || {
        while let Some(p) = sys::peek_message(s.as_fd(), 1 << 17)? {
            let end = ty == libc::SOCK_STREAM || total.is_some_and(|t| q.data.len() >= t);
            if p.data.is_empty() && end {
                break;
            }
            if p.truncated {
                return Ok(Err(
                    "more file descriptors in flight in one message than a peek takes".into(),
                ));
            }
            if !p.fds.is_empty() {
                q.in_flight.push(InFlight {
                    message: q.messages.len() as u32,
                    files: (q.flying.len()..q.flying.len() + p.fds.len()).collect(),
                });
                q.flying.extend(p.fds);
            }
            q.messages.push(p.data.len() as u32);
            q.senders.push(p.from);
            q.data.extend_from_slice(&p.data);
        }
        Ok(Ok(()))
    })
}

/// Every inotify watch and fanotify mark on a deleted file is on one an fd
/// of the tree holds open: the file the restore recreates for that fd is
/// watched again. A deleted file held only by the watch, a mapping or a
/// handle is not.
pub fn check_deleted_watches(
    table: &FileTable,
    images: &[ProcessImage],
    problems: &mut Vec<String>,
) {
    // Deleted files an fd of the tree holds or a process maps, recreated at
    // restore (those still linked elsewhere are opened again instead, not
    // recreated).
    let mapped = images
        .iter()
        .flat_map(|p| p.vmas.iter())
        .filter_map(|v| v.deleted_file().map(|(key, _)| key));
    let ghosts: std::collections::HashSet<(u64, u64)> = (table.files.iter())
        .filter_map(|f| match f.kind {
            FileKind::Regular {
                ghost: Some((dev, ino, _)),
                handle: None,
                ..
            } => Some((dev, ino)),
            _ => None,
        })
        .chain(mapped)
        .collect();
    for f in &table.files {
        let (p, fd) = table.holders[f.id];
        let lost = |deleted: Option<(u64, u64)>| deleted.is_some_and(|key| !ghosts.contains(&key));
        match &f.kind {
            FileKind::Inotify { watches } => {
                for w in watches.iter().filter(|w| lost(w.deleted)) {
                    problems.push(format!(
                        "process {p}: fd {fd}: inotify watch {} is on a file that was deleted \
                         ({}) and that no process of the tree holds open or maps, which cannot be \
                         watched again",
                        w.wd, w.path
                    ));
                }
            }
            FileKind::Fanotify { marks, .. } => {
                for m in marks.iter().filter(|m| lost(m.deleted)) {
                    problems.push(format!(
                        "process {p}: fd {fd}: a fanotify mark on a file that was deleted \
                         ({}) and that no process of the tree holds open or maps, which cannot be \
                         marked again",
                        m.path
                    ));
                }
            }
            _ => {}
        }
    }
}

/// Unix sockets against the rest of the tree. A connection whose other
/// end is outside the tree comes back with that end closed (said here);
/// a datagram socket connected to a named socket is reconnected by name
/// instead. A connection not yet accepted must have its client in the
/// tree, to connect again.
pub fn check_unix_peers(table: &mut FileTable, problems: &mut Vec<String>) {
    if !problems.is_empty() {
        // A refused socket is missing from the table: its peers would look
        // outside the tree, and the checkpoint fails anyway.
        return;
    }
    let inodes: std::collections::HashSet<u32> = table
        .files
        .iter()
        .filter_map(|f| f.kind.unix_ino())
        .collect();
    let waiting: std::collections::HashSet<u32> = table
        .files
        .iter()
        .filter_map(|f| match &f.kind {
            FileKind::UnixListen { pending, .. } => Some(pending.iter().copied()),
            _ => None,
        })
        .flatten()
        .collect();
    for f in &mut table.files {
        let (p, fd) = table.holders[f.id];
        match &mut f.kind {
            // No peer and not shut down: a client waiting in the queue of
            // a listener outside the tree (a peer that closed shuts it).
            FileKind::UnixConnected {
                ino,
                ty,
                peer: 0,
                shutdown: 0,
                ..
            } if *ty != libc::SOCK_DGRAM && !waiting.contains(ino) => {
                tracing::warn!(
                    "process {p}: fd {fd}: a unix socket waiting to be accepted by a process \
                     outside the tree comes back with its peer closed"
                );
            }
            FileKind::UnixConnected {
                ty,
                peer,
                peer_name,
                ..
            } if *peer != 0 && !inodes.contains(peer) => {
                if *ty == libc::SOCK_DGRAM && peer_name.is_some() {
                    continue;
                }
                tracing::warn!(
                    "process {p}: fd {fd}: a unix socket connected to a process outside the \
                     tree comes back with its peer closed"
                );
                *peer = 0;
                *peer_name = None;
            }
            FileKind::UnixListen { pending, .. } => {
                let outside = pending.iter().filter(|e| !inodes.contains(e)).count();
                if outside > 0 {
                    problems.push(format!(
                        "process {p}: fd {fd}: a listening unix socket with {outside} \
                         connection(s) not yet accepted from processes outside the tree"
                    ));
                }
            }
            _ => {}
        }
    }
}

/// What a socket is (with its state and data), or why it is not supported.
fn socket_kind(
    pid: Pid,
    fd: i32,
    ino: u32,
    img: &ImageDir,
    table: &mut FileTable,
    unix: &UnixTable,
) -> Result<std::result::Result<FileKind, String>> {
    let s = table.take_fd(pid, fd)?;
    let domain = sys::getsockopt_int(s.as_fd(), libc::SOL_SOCKET, libc::SO_DOMAIN)
        .map_err(Error::io("socket domain"))?;
    let ty = sys::getsockopt_int(s.as_fd(), libc::SOL_SOCKET, libc::SO_TYPE)
        .map_err(Error::io("socket type"))?;
    if domain == libc::AF_UNIX {
        return unix_kind(pid, fd, ino, &s, img, table, unix.get()?);
    }
    if domain != libc::AF_INET && domain != libc::AF_INET6 {
        let name = socket::AddressFamily::from_i32(domain)
            .map(|f| format!("{f:?}"))
            .unwrap_or_else(|| format!("family {domain}"));
        return Ok(Err(format!(
            "a {name} socket: only TCP and UDP sockets are supported so far"
        )));
    }
    let v6 = domain == libc::AF_INET6;
    let local = socket::getsockname::<socket::SockaddrStorage>(s.as_raw_fd())
        .ok()
        .and_then(|a| sys::inet_addr(&a))
        .filter(|a| a.port() != 0);
    let peer = socket::getpeername::<socket::SockaddrStorage>(s.as_raw_fd())
        .ok()
        .and_then(|a| sys::inet_addr(&a));
    if ty == libc::SOCK_DGRAM {
        return Ok(Ok(FileKind::Inet {
            family: domain,
            ty,
            local: local.map(|a| a.to_string()),
            peer: peer.map(|a| a.to_string()),
            options: sockopt::read(
                s.as_fd(),
                Sock::Inet {
                    v6,
                    tcp: false,
                    connected: false,
                },
            ),
        }));
    }
    if ty != libc::SOCK_STREAM {
        return Ok(Err(format!(
            "an inet socket of type {ty}: only stream and datagram sockets are supported"
        )));
    }
    let info = tcp::info(s.as_fd()).map_err(Error::io("TCP_INFO"))?;
    let options = sockopt::read(
        s.as_fd(),
        Sock::Inet {
            v6,
            tcp: true,
            connected: tcp::is_connection(info.state),
        },
    );
    match info.state {
        tcp::TCP_LISTEN => {
            if info.unacked > 0 {
                return Ok(Err(format!(
                    "listening socket {} has {} connection(s) not yet accepted",
                    local.map(|a| a.to_string()).unwrap_or_default(),
                    info.unacked
                )));
            }
            let addr = local.ok_or_else(|| {
                Error::io("listening socket address")(std::io::Error::other("unbound"))
            })?;
            Ok(Ok(FileKind::TcpListen {
                addr: addr.to_string(),
                // TCP_INFO reports a listener's backlog where it would report
                // SACKed segments.
                backlog: info.sacked,
                options,
            }))
        }
        tcp::TCP_CLOSE => Ok(Ok(FileKind::Inet {
            family: domain,
            ty,
            local: local.map(|a| a.to_string()),
            peer: None,
            options,
        })),
        // Connecting: nothing was exchanged yet but the SYN, which a
        // restore sends again from the same address.
        tcp::TCP_SYN_SENT => match (
            local,
            peer.or_else(|| crate::sockdiag::connecting_to(pid, ino)),
        ) {
            (Some(local), Some(peer)) => Ok(Ok(FileKind::Inet {
                family: domain,
                ty,
                local: Some(local.to_string()),
                peer: Some(peer.to_string()),
                options,
            })),
            _ => Ok(Err("a connecting TCP socket without addresses".into())),
        },
        tcp::TCP_ESTABLISHED
        | tcp::TCP_CLOSE_WAIT
        | tcp::TCP_FIN_WAIT1
        | tcp::TCP_FIN_WAIT2
        | tcp::TCP_LAST_ACK
        | tcp::TCP_CLOSING => {
            let (Some(local), Some(peer)) = (local, peer) else {
                return Ok(Err("a connected TCP socket without addresses".into()));
            };
            if v6 && tcp::needs_peer_packet(info.state) {
                return Ok(Err(format!(
                    "a half-closed IPv6 connection ({})",
                    tcp::state_name(info.state)
                )));
            }
            let reuseaddr = tcp::saved_reuseaddr(&options);
            let (st, sndq, rcvq) = tcp::dump(s.as_fd(), reuseaddr).map_err(Error::io(format!(
                "read TCP connection {local} -> {peer} of process {pid}"
            )))?;
            // Kept open: the connection stays in repair mode until the
            // checkpoint ends (then it dies silently, or leaves repair
            // mode quietly if the tree goes on, or the checkpoint fails).
            table.repaired.push(s, reuseaddr);
            let data = table.put_blob(img, &[sndq, rcvq].concat())?;
            Ok(Ok(FileKind::Tcp {
                local: local.to_string(),
                peer: peer.to_string(),
                tcp: st,
                options,
                data,
            }))
        }
        other => Ok(Err(format!(
            "a TCP socket in state {}, which is not supported",
            tcp::state_name(other)
        ))),
    }
}

/// Saves the unread data of pipe `pipe` (once per pipe, whichever end is
/// met first) without consuming it; returns the pipe's capacity.
/// Saves the data of pipe or FIFO `pipe` (once per pipe); returns its
/// capacity and, for a packet-mode pipe holding more than one packet, the
/// length of each.
fn save_pipe(
    pid: i32,
    fd: i32,
    pipe: u64,
    img: &ImageDir,
    table: &mut FileTable,
) -> Result<(u32, Vec<u32>)> {
    let end = table.take_fd(Pid::from_raw(pid), fd)?;
    let capacity = nix::fcntl::fcntl(end.as_fd(), nix::fcntl::FcntlArg::F_GETPIPE_SZ)
        .map_err(|e| Error::io("pipe size")(e.into()))? as u32;
    if let Some(packets) = table.pipes_saved.get(&pipe) {
        return Ok((capacity, packets.clone()));
    }
    // Most pipes are empty when a checkpoint reads them: either end says so.
    let unread = sys::ioctl_int(end.as_fd(), libc::FIONREAD as libc::c_ulong)
        .map_err(Error::io(format!("pipe fd {fd} of process {pid}")))?;
    let (data, reads) = if unread == 0 {
        (Vec::new(), Vec::new())
    } else {
        // A new read end of the same pipe, opened through the fd's /proc
        // link, to copy the data without taking it.
        let reader = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(format!("/proc/{pid}/fd/{fd}"))
            .map_err(Error::io(format!("reopen pipe fd {fd} of process {pid}")))?;
        sys::peek_pipe(reader.as_fd(), capacity as usize).map_err(Error::io(format!(
            "copy pipe data of fd {fd} of process {pid}"
        )))?
    };
    // An empty pipe has no data file (the restore reads none as empty): a
    // series writes one per pipe per checkpoint otherwise.
    if !data.is_empty() {
        let path = img.pipe_data(pipe);
        fs::write(&path, &data).map_err(|e| Error::image(&path, e))?;
    }
    let packets = if reads.len() > 1 { reads } else { Vec::new() };
    table.pipes_saved.insert(pipe, packets.clone());
    Ok((capacity, packets))
}

fn save_deleted(pid: i32, fd: i32, out: &std::path::Path) -> Result<()> {
    let mut f = File::open(format!("/proc/{pid}/fd/{fd}")).map_err(Error::io(format!(
        "reopen deleted file fd {fd} of process {pid}"
    )))?;
    let mut data = Vec::new();
    f.read_to_end(&mut data).map_err(Error::io(format!(
        "read deleted file fd {fd} of process {pid}"
    )))?;
    fs::write(out, &data).map_err(|e| Error::image(out, e))
}

#[cfg(test)]
mod tests {
    use super::{join_dir, strip_dir};

    #[test]
    fn a_file_of_a_bind_mounted_directory_is_named_below_its_mount_point() {
        // The container's /tmp is the host's /var/lib/rrc/roots/c/tmp.
        let in_fs = "/var/lib/rrc/roots/c/tmp/watched";
        let rest = strip_dir(in_fs, "/var/lib/rrc/roots/c/tmp").unwrap();
        assert_eq!(join_dir("/tmp", rest), "/tmp/watched");
        assert_eq!(
            strip_dir(in_fs, "/"),
            Some("var/lib/rrc/roots/c/tmp/watched")
        );
        assert_eq!(join_dir("/", strip_dir("/", "/").unwrap()), "/");
        assert_eq!(strip_dir("/tmp", "/tmp"), Some(""));
        assert_eq!(join_dir("/mnt/", ""), "/mnt");
        // A name that only begins like the directory is not below it.
        assert_eq!(strip_dir("/tmpfile", "/tmp"), None);
    }
}
