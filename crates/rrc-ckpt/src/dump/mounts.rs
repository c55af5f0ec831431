//! A mount namespace a process of the tree made, read as the steps that
//! turn a copy of its parent's into it (format: `image::mounts`).
//!
//! Both mount tables are read from mountinfo, each as its process sees it.
//! A namespace unshared is a copy of its parent's, mount for mount, so
//! the two trees are matched from their roots down (same place, file
//! system and root); what is left over is what the process changed:
//! mounts it removed, flags and propagation it changed, and new mounts.
//! A new mount is a bind mount when its file system is mounted elsewhere
//! in either table; otherwise it must be a tmpfs (saved with its files), a
//! proc file system (made again by a process of its pid namespace), a
//! queue file system (of its IPC namespace) or a sysfs (of its network
//! namespace).
//! Anything else is a reason to refuse the tree.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;

use nix::unistd::Pid;
use procfs::FromBufRead;
use procfs::process::{MountInfo, MountOptFields};
use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags};

use crate::common::Ns;
use crate::image::ImageDir;
use crate::image::mounts::{
    Entry, EntryKind, MountFlag, MountNs, MountOp, NamespacedFs, Propagation, options_allowed,
};

/// A tmpfs's regular files to save: its step's index, its top directory,
/// open, and each file (path below the top, length) in `entries` order.
struct TmpfsFiles {
    step: usize,
    top: OwnedFd,
    files: Vec<(String, u64)>,
}

/// A tmpfs read: its device, its top's entry and the others.
struct Tmpfs {
    dev: u64,
    root: Entry,
    entries: Vec<Entry>,
    files: TmpfsFiles,
}

/// A mount namespace read, with what saving its tmpfs contents needs.
pub struct OwnMounts {
    pub ns: MountNs,
    /// What each tmpfs step's data file is made of.
    contents: Vec<TmpfsFiles>,
    /// Proc steps' makers, by the host's pids: index, pid.
    makers: Vec<(usize, Pid)>,
}

type Found<T> = std::result::Result<T, String>;

/// Reads the mount namespace process `pid` made: how it differs from that
/// of its parent `parent`. `peers` are the tree's other live processes,
/// among which a proc file system's maker is found. `Err` says what the
/// namespace holds that a restore cannot make again.
pub fn read(pid: Pid, parent: Pid, peers: &[Pid]) -> Found<OwnMounts> {
    let mine = Table::read(pid)?;
    let theirs = Table::read(parent)?;
    let mut own = OwnMounts {
        ns: MountNs::default(),
        contents: Vec::new(),
        makers: Vec::new(),
    };
    if !same_root(pid, parent) {
        new_root(pid, peers, &mine, &theirs, &mut own)?;
        return Ok(own);
    }
    let matched = match_trees(&mine, &theirs)?;
    propagation_changes(&mine, &theirs, &matched, &mut own.ns.ops)?;
    unmounts(&theirs, &matched, &mut own.ns.ops)?;
    for (i, m) in mine.iter().enumerate() {
        if let Some(j) = matched[i]
            && flags(m) != flags(&theirs[j])
        {
            mine.refuse_covered(i, "its flags changed")?;
            own.ns.ops.push(MountOp::Flags {
                path: point(m),
                flags: flags(m),
            });
        }
    }
    for (i, m) in matched.iter().enumerate() {
        if m.is_none() {
            new_mount(pid, peers, &mine, &theirs, i, false, &mut own)?;
        }
    }
    Ok(own)
}

/// The steps of a namespace with a root of its own (`pivot_root`), whose
/// mounts are all new: each made after the one it is on, in the order of
/// its table, the root first; proc file systems by the namespace's first
/// process itself, which builds the tree before it makes it its root.
fn new_root(
    pid: Pid,
    peers: &[Pid],
    mine: &Table,
    theirs: &Table,
    own: &mut OwnMounts,
) -> Found<()> {
    if mine.root() != Some(0) || (1..mine.len()).any(|i| mine.up[i].is_none_or(|u| u >= i)) {
        return Err("a root of its own whose mounts are not listed after those they are on".into());
    }
    own.ns.ops.push(MountOp::NewRoot);
    let mut made = vec![false; mine.len()];
    for i in 0..mine.len() {
        if made[i] {
            continue;
        }
        let step = own.ns.ops.len();
        new_mount(pid, peers, mine, theirs, i, true, own)?;
        recursive_bind(mine, theirs, i, step, &mut made, &mut own.ns.ops);
    }
    if own.makers.iter().any(|(_, maker)| *maker != pid) {
        return Err(
            "a root of its own with a proc, queue or sys file system another process makes".into(),
        );
    }
    Ok(())
}

/// Makes step `step`, if it binds mount `i` of `mine`, recursive when
/// its source has mounts below it and each is found again below it, in
/// place (a sandbox binds so: a bind in a user namespace of a mount with
/// mounts the namespace may not uncover must take them along), those
/// marked `made`, with a step for each one's flags and propagation if
/// they differ from its source's.
fn recursive_bind(
    mine: &Table,
    theirs: &Table,
    i: usize,
    step: usize,
    made: &mut [bool],
    ops: &mut Vec<MountOp>,
) {
    let Some(MountOp::Bind {
        source,
        target,
        from_parent,
        recursive,
        ..
    }) = ops.get_mut(step)
    else {
        return;
    };
    let (table, before): (&[MountInfo], usize) = if *from_parent {
        (theirs, theirs.len())
    } else {
        (mine, i)
    };
    let below = |p: &str, dir: &str| dir != p && under(p, dir);
    let mut found = Vec::new();
    for c in table[..before].iter().filter(|c| below(&point(c), source)) {
        let rest = &point(c)[source.trim_end_matches('/').len()..];
        let place = format!("{}{rest}", target.trim_end_matches('/'));
        let again = (i + 1..mine.len()).find(|&j| {
            !made[j]
                && point(&mine[j]) == place
                && mine[j].majmin == c.majmin
                && mine[j].root == c.root
        });
        match again {
            Some(j) => found.push((j, c)),
            None => return,
        }
    }
    if found.is_empty() {
        return;
    }
    *recursive = true;
    let mut more = Vec::new();
    for (j, c) in found {
        made[j] = true;
        let place = point(&mine[j]);
        if flags(&mine[j]) != flags(c) {
            more.push(MountOp::Flags {
                path: place.clone(),
                flags: flags(&mine[j]),
            });
        }
        push_kind(&mine[j], &place, &mut more);
    }
    ops.extend(more);
}

/// Whether processes `a` and `b` have one root directory (each table
/// shows places from its process's root).
fn same_root(a: Pid, b: Pid) -> bool {
    let root = |p: Pid| {
        rustix::fs::stat(format!("/proc/{p}/root"))
            .map(|s| (s.st_dev, s.st_ino))
            .ok()
    };
    matches!((root(a), root(b)), (Some(x), Some(y)) if x == y)
}

impl OwnMounts {
    /// The proc steps' makers by the image's pids (`image_pid` gives them).
    pub fn number_makers(&mut self, image_pid: impl Fn(Pid) -> Option<i32>) -> Found<()> {
        for (n, host) in &self.makers {
            if let MountOp::Namespaced { by, .. } = &mut self.ns.ops[*n] {
                *by =
                    image_pid(*host).ok_or_else(|| format!("process {host} is not in the tree"))?;
            }
        }
        Ok(())
    }

    /// Writes each tmpfs's files to its data file, for the image of
    /// process `image_pid`; the namespace's steps for its image.
    pub fn save(self, img: &ImageDir, image_pid: i32) -> crate::Result<MountNs> {
        for TmpfsFiles { step, top, files } in &self.contents {
            let path = img.mount_data(image_pid, *step);
            let mut out = File::create(&path).map_err(|e| crate::Error::image(&path, e))?;
            for (rel, len) in files {
                let mut copy = || -> std::io::Result<()> {
                    let fd = rustix::fs::openat2(
                        top,
                        rel.as_str(),
                        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                        Mode::empty(),
                        ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_XDEV,
                    )?;
                    let copied = std::io::copy(&mut File::from(fd).take(*len), &mut out)?;
                    if copied != *len {
                        return Err(std::io::Error::other(format!(
                            "{copied} bytes where {len} were"
                        )));
                    }
                    Ok(())
                };
                copy().map_err(|e| crate::Error::Proc {
                    pid: image_pid,
                    what: "tmpfs of its mount namespace",
                    detail: format!("{rel}: {e}"),
                })?;
            }
            out.flush().map_err(|e| crate::Error::image(&path, e))?;
        }
        Ok(self.ns)
    }
}

/// A process's mount table, as it sees it, with each mount's parent in
/// it (read as the mounts themselves: `Deref`).
struct Table {
    mounts: Vec<MountInfo>,
    /// The index of each mount's parent; `None` for the table's root,
    /// whose parent is not shown.
    up: Vec<Option<usize>>,
}

impl std::ops::Deref for Table {
    type Target = [MountInfo];
    fn deref(&self) -> &[MountInfo] {
        &self.mounts
    }
}

impl Table {
    /// Process `pid`'s.
    fn read(pid: Pid) -> Found<Table> {
        let f = File::open(format!("/proc/{pid}/mountinfo"))
            .map_err(|e| format!("its mount table cannot be read: {e}"))?;
        let mounts = procfs::process::MountInfos::from_buf_read(std::io::BufReader::new(f))
            .map_err(|e| format!("its mount table cannot be read: {e}"))?
            .0;
        let by_id: HashMap<i32, usize> = (mounts.iter().enumerate())
            .map(|(i, m)| (m.mnt_id, i))
            .collect();
        let up = (mounts.iter().enumerate())
            .map(|(i, m)| by_id.get(&m.pid).copied().filter(|&p| p != i))
            .collect();
        Ok(Table { mounts, up })
    }

    /// The index of its root.
    fn root(&self) -> Option<usize> {
        self.up.iter().position(Option::is_none)
    }

    fn children(&self, of: usize) -> impl Iterator<Item = usize> + '_ {
        (0..self.len()).filter(move |&i| self.up[i] == Some(of))
    }

    /// Whether mount `a` is an ancestor of mount `b`.
    fn is_ancestor(&self, a: usize, b: usize) -> bool {
        let mut at = b;
        for _ in 0..self.len() {
            match self.up[at] {
                None => return false,
                Some(up) if up == a => return true,
                Some(up) => at = up,
            }
        }
        false
    }

    /// Refuses mount `i` if another mount hides it: one at its place
    /// above it, or one at a directory above its place not below it. A
    /// step names a mount by its place, which would reach the other.
    fn refuse_covered(&self, i: usize, why: &str) -> Found<()> {
        let p = point(&self[i]);
        for j in 0..self.len() {
            if j == i || self.is_ancestor(j, i) {
                continue;
            }
            let q = point(&self[j]);
            if q == p || (under(&p, &q) && !self.is_ancestor(i, j)) {
                return Err(format!(
                    "the mount at {p} ({why}) under another mount at {q}"
                ));
            }
        }
        Ok(())
    }
}

fn point(m: &MountInfo) -> String {
    m.mount_point.to_string_lossy().into_owned()
}

/// Its per-mount flags, in order.
fn flags(m: &MountInfo) -> Vec<MountFlag> {
    let mut f: Vec<MountFlag> = m
        .mount_options
        .keys()
        .filter_map(|k| MountFlag::from_option(k))
        .collect();
    f.sort();
    f
}

fn propagation(m: &MountInfo) -> Propagation {
    let has = |f: fn(&MountOptFields) -> bool| m.opt_fields.iter().any(f);
    let shared = has(|f| matches!(f, MountOptFields::Shared(_)));
    let slave = has(|f| matches!(f, MountOptFields::Master(_)));
    match (shared, slave) {
        (true, true) => Propagation::SharedSlave,
        (true, false) => Propagation::Shared,
        (false, true) => Propagation::Slave,
        _ if has(|f| matches!(f, MountOptFields::Unbindable)) => Propagation::Unbindable,
        _ => Propagation::Private,
    }
}

/// Whether two mounts are copies of one another.
fn alike(a: &MountInfo, b: &MountInfo) -> bool {
    a.mount_point == b.mount_point
        && a.majmin == b.majmin
        && a.root == b.root
        && a.fs_type == b.fs_type
}

/// For each mount of `mine`, the mount of `theirs` it is a copy of.
fn match_trees(mine: &Table, theirs: &Table) -> Found<Vec<Option<usize>>> {
    let (Some(r), Some(s)) = (mine.root(), theirs.root()) else {
        return Err("a mount table without a root".into());
    };
    if !alike(&mine[r], &theirs[s]) {
        return Err("another root mount than its parent's".into());
    }
    let mut matched = vec![None; mine.len()];
    let mut used = vec![false; theirs.len()];
    matched[r] = Some(s);
    used[s] = true;
    let mut queue = std::collections::VecDeque::from([(r, s)]);
    while let Some((a, b)) = queue.pop_front() {
        for c in mine.children(a) {
            if let Some(d) = (theirs.children(b)).find(|&d| !used[d] && alike(&mine[c], &theirs[d]))
            {
                matched[c] = Some(d);
                used[d] = true;
                queue.push_back((c, d));
            }
        }
    }
    Ok(matched)
}

fn under(path: &str, dir: &str) -> bool {
    dir == "/" || path.strip_prefix(dir).is_some_and(|r| r.starts_with('/'))
}

/// Propagation steps: one for every mount when all share one kind that
/// differs from their parent's copies', else one per mount that differs.
fn propagation_changes(
    mine: &Table,
    theirs: &[MountInfo],
    matched: &[Option<usize>],
    ops: &mut Vec<MountOp>,
) -> Found<()> {
    let pairs: Vec<(usize, usize)> = matched
        .iter()
        .enumerate()
        .filter_map(|(i, m)| m.map(|j| (i, j)))
        .collect();
    let differ: Vec<usize> = pairs
        .iter()
        .filter(|(i, j)| propagation(&mine[*i]) != propagation(&theirs[*j]))
        .map(|(i, _)| *i)
        .collect();
    let Some(&first) = differ.first() else {
        return Ok(());
    };
    let kind = propagation(&mine[first]);
    if pairs.iter().all(|(i, _)| propagation(&mine[*i]) == kind) {
        ops.push(MountOp::Propagation {
            path: "/".into(),
            kind,
            recursive: true,
        });
        return Ok(());
    }
    for i in differ {
        mine.refuse_covered(i, "its propagation changed")?;
        ops.push(MountOp::Propagation {
            path: point(&mine[i]),
            kind: propagation(&mine[i]),
            recursive: false,
        });
    }
    Ok(())
}

/// A step for each mount of the parent's that is gone, the topmost of
/// each subtree gone, the last mounted first.
fn unmounts(theirs: &Table, matched: &[Option<usize>], ops: &mut Vec<MountOp>) -> Found<()> {
    let kept: HashSet<usize> = matched.iter().flatten().copied().collect();
    for j in (0..theirs.len()).rev() {
        if kept.contains(&j) || !theirs.up[j].is_some_and(|p| kept.contains(&p)) {
            continue;
        }
        // Hidden in the parent's table, where the copy's place was read.
        theirs.refuse_covered(j, "unmounted")?;
        ops.push(MountOp::Unmount {
            path: point(&theirs[j]),
        });
    }
    Ok(())
}

/// The step that makes new mount `i` of `mine` (in a tree of its own:
/// `new_root`).
fn new_mount(
    pid: Pid,
    peers: &[Pid],
    mine: &[MountInfo],
    theirs: &[MountInfo],
    i: usize,
    new_root: bool,
    own: &mut OwnMounts,
) -> Found<()> {
    let m = &mine[i];
    let target = point(m);
    let in_parents = theirs.iter().any(|t| t.majmin == m.majmin);
    // A bind mount: from a mount of the same file system before it that
    // holds its root (in a tree of its own, or from one of the parent's).
    let holds =
        |s: &&MountInfo| s.majmin == m.majmin && (s.root == m.root || under(&m.root, &s.root));
    let source = match mine[..i].iter().find(holds) {
        Some(s) => Some((s, false)),
        None if new_root => theirs.iter().find(holds).map(|s| (s, true)),
        None => None,
    };
    if let Some((s, from_parent)) = source {
        // Below the source's root, with its leading `/` ("" for the root).
        let rest = match s.root.as_str() {
            "/" => m.root.as_str(),
            r => m.root.strip_prefix(r).unwrap_or(""),
        };
        let rest = if rest == "/" { "" } else { rest };
        let src = match (point(s).as_str(), rest) {
            (p, "") => p.to_string(),
            ("/", r) => r.to_string(),
            (p, r) => format!("{p}{r}"),
        };
        own.ns.ops.push(MountOp::Bind {
            source: src,
            target: target.clone(),
            flags: flags(m),
            from_parent,
            recursive: false,
        });
        push_kind(m, &target, &mut own.ns.ops);
        return Ok(());
    }
    if in_parents || mine[..i].iter().any(|s| s.majmin == m.majmin) {
        return Err(format!(
            "a mount at {target} bound from a part of its file system no mount shows"
        ));
    }
    let options = super_options(m);
    if !options_allowed(&m.fs_type, &options) {
        return Err(format!(
            "a new {} file system at {target} (options {options:?})",
            m.fs_type
        ));
    }
    // The root of a tree of its own may be a directory of a tmpfs (its
    // files but those below it are out of sight, and not saved).
    let whole = m.root == "/" || (new_root && i == 0);
    match m.fs_type.as_str() {
        "tmpfs" if whole => {
            let n = own.ns.ops.len();
            let Tmpfs {
                dev,
                root,
                entries,
                files,
            } = read_tmpfs(pid, m, n)?;
            own.contents.push(files);
            own.ns.ops.push(MountOp::Tmpfs {
                target: target.clone(),
                flags: flags(m),
                options,
                dev,
                root,
                entries,
                shows: (m.root != "/").then(|| m.root.trim_start_matches('/').to_string()),
            });
        }
        // Its pseudo-terminals are the tree's, or refused as any other.
        "devpts" if m.root == "/" => own.ns.ops.push(MountOp::Devpts {
            target: target.clone(),
            flags: flags(m),
            options,
        }),
        "proc" | "mqueue" | "sysfs" if m.root == "/" => {
            let (fs, maker) = match m.fs_type.as_str() {
                "proc" => (NamespacedFs::Proc, proc_maker(pid, peers, &target)?),
                "mqueue" => (
                    NamespacedFs::Mqueue,
                    device_maker(pid, peers, m, Ns::Ipc, "ipc")?,
                ),
                _ => (
                    NamespacedFs::Sysfs,
                    device_maker(pid, peers, m, Ns::Net, "net")?,
                ),
            };
            own.makers.push((own.ns.ops.len(), maker));
            own.ns.ops.push(MountOp::Namespaced {
                fs,
                target: target.clone(),
                flags: flags(m),
                options,
                by: 0,
            });
        }
        other => {
            return Err(format!(
                "a new {other} file system at {target} (of its root {})",
                m.root
            ));
        }
    }
    push_kind(m, &target, &mut own.ns.ops);
    Ok(())
}

/// A propagation step for a new mount that is not private, as a new
/// mount in a private namespace is.
fn push_kind(m: &MountInfo, target: &str, ops: &mut Vec<MountOp>) {
    let kind = propagation(m);
    if kind != Propagation::Private {
        ops.push(MountOp::Propagation {
            path: target.into(),
            kind,
            recursive: false,
        });
    }
}

/// Its super options, as a mount's data string, without `rw` and `ro`.
fn super_options(m: &MountInfo) -> String {
    let mut o: Vec<String> = m
        .super_options
        .iter()
        .filter(|(k, _)| *k != "rw" && *k != "ro")
        .map(|(k, v)| match v {
            Some(v) => format!("{k}={v}"),
            None => k.clone(),
        })
        .collect();
    o.sort();
    o.join(",")
}

/// The process of the tree that makes the proc file system at `target`
/// of process `pid`'s namespace again: the one in its mount namespace that
/// is first in the proc's pid namespace (or `pid` itself, if in it).
fn proc_maker(pid: Pid, peers: &[Pid], target: &str) -> Found<Pid> {
    let link = |p: &str| std::fs::read_link(p).ok();
    let ns = link(&format!("/proc/{pid}/root{target}/1/ns/pid")).ok_or_else(|| {
        format!("a proc file system at {target} whose pid namespace has no first process")
    })?;
    let mnt = link(&format!("/proc/{pid}/ns/mnt"));
    let of = |p: Pid, what: &str| link(&format!("/proc/{p}/ns/{what}"));
    std::iter::once(pid)
        .chain(peers.iter().copied())
        .find(|p| {
            of(*p, "pid").as_ref() == Some(&ns)
                && of(*p, "mnt") == mnt
                && (*p == pid || {
                    let ppid = procfs::process::Process::new(p.as_raw())
                        .and_then(|q| q.stat())
                        .map(|s| Pid::from_raw(s.ppid));
                    ppid.is_ok_and(|pp| of(pp, "pid").as_ref() != Some(&ns))
                })
        })
        .ok_or_else(|| {
            format!(
                "a proc file system at {target} for a pid namespace whose first process is not \
                 in its mount namespace"
            )
        })
}

/// The process of the tree that makes file system `m` of process `pid`'s
/// mount namespace again, a queue file system or a sysfs, which show the
/// IPC or network namespace (of kind `ns`, named `link` under
/// /proc/PID/ns) they were mounted in: the first process in this mount
/// namespace of the namespace whose file system it is, told by its device
/// (every mount of that file system made in a namespace shows one: a
/// thread of ours in each candidate's makes one attached nowhere).
fn device_maker(pid: Pid, peers: &[Pid], m: &MountInfo, ns: Ns, link: &str) -> Found<Pid> {
    let ns_link = |p: Pid, what: &str| std::fs::read_link(format!("/proc/{p}/ns/{what}")).ok();
    let mnt = ns_link(pid, "mnt");
    let majmin = |d: u64| format!("{}:{}", rustix::fs::major(d), rustix::fs::minor(d));
    let shows = |p: Pid| {
        crate::common::in_ns_of(p, ns, || fs_device(&m.fs_type))
            .ok()
            .and_then(|r| r.ok())
            .is_some_and(|d| majmin(d) == m.majmin)
    };
    let parents = |p: Pid| {
        procfs::process::Process::new(p.as_raw())
            .and_then(|q| q.stat())
            .ok()
            .and_then(|s| ns_link(Pid::from_raw(s.ppid), link))
    };
    std::iter::once(pid)
        .chain(peers.iter().copied())
        .filter(|p| ns_link(*p, "mnt") == mnt)
        .filter(|p| *p == pid || parents(*p) != ns_link(*p, link))
        .find(|p| shows(*p))
        .ok_or_else(|| {
            format!(
                "a {} file system at {} of a namespace whose first process is not in its mount \
                 namespace",
                m.fs_type,
                point(m)
            )
        })
}

/// The device of a file system of type `fstype` the calling thread mounts
/// (attached nowhere).
fn fs_device(fstype: &str) -> std::io::Result<u64> {
    let mnt = crate::sys::detached_mount(fstype, rustix::mount::MountAttrFlags::MOUNT_ATTR_RDONLY)?;
    Ok(rustix::fs::fstat(&mnt)?.st_dev)
}

/// A tmpfs's files (step `step`'s), read through the process's root.
fn read_tmpfs(pid: Pid, m: &MountInfo, step: usize) -> Found<Tmpfs> {
    let target = point(m);
    let top = rustix::fs::open(
        PathBuf::from(format!("/proc/{pid}/root{target}")),
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| format!("the tmpfs at {target} cannot be opened: {e}"))?;
    let sx = rustix::fs::statx(
        &top,
        "",
        AtFlags::EMPTY_PATH,
        rustix::fs::StatxFlags::MNT_ID,
    )
    .map_err(|e| format!("the tmpfs at {target}: {e}"))?;
    if sx.stx_mnt_id != m.mnt_id as u64 {
        return Err(format!("the tmpfs at {target} under another mount"));
    }
    let st = rustix::fs::fstat(&top).map_err(|e| e.to_string())?;
    let mut walk = Walk {
        dev: st.st_dev,
        target: &target,
        entries: Vec::new(),
        files: Vec::new(),
        offset: 0,
        links: HashMap::new(),
    };
    let root = walk
        .entry(&top, "", &st)?
        .ok_or("a tmpfs whose top is a socket")?;
    walk.dir(&top, "")?;
    // A name under another mount would be lost.
    if let Some((path, _)) = walk.links.values().find(|(_, left)| *left > 0) {
        return Err(format!(
            "a file with hard links in the tmpfs at {target} some of which no path shows: {path}"
        ));
    }
    Ok(Tmpfs {
        dev: st.st_dev,
        root,
        entries: walk.entries,
        files: TmpfsFiles {
            step,
            top,
            files: walk.files,
        },
    })
}

struct Walk<'a> {
    dev: u64,
    target: &'a str,
    entries: Vec<Entry>,
    files: Vec<(String, u64)>,
    offset: u64,
    /// Files with other names (hard links), by inode: the first name met
    /// and how many names are yet to be met.
    links: HashMap<u64, (String, u64)>,
}

impl Walk<'_> {
    fn dir(&mut self, fd: &OwnedFd, rel: &str) -> Found<()> {
        let fail = |e: rustix::io::Errno| format!("the tmpfs at {}: {rel}: {e}", self.target);
        let mut names: Vec<Vec<u8>> = Vec::new();
        for d in rustix::fs::Dir::read_from(fd).map_err(fail)? {
            let d = d.map_err(fail)?;
            let name = d.file_name().to_bytes();
            if name != b"." && name != b".." {
                names.push(name.to_vec());
            }
        }
        names.sort();
        for name in names {
            let name = String::from_utf8(name).map_err(|_| {
                format!(
                    "the tmpfs at {}: a name that is not UTF-8 in {rel:?}",
                    self.target
                )
            })?;
            let path = if rel.is_empty() {
                name.clone()
            } else {
                format!("{rel}/{name}")
            };
            let st = rustix::fs::statat(fd, name.as_str(), AtFlags::SYMLINK_NOFOLLOW)
                .map_err(|e| format!("the tmpfs at {}: {path}: {e}", self.target))?;
            if st.st_dev != self.dev {
                // Another mount over it: a step of its own; the directory
                // under it comes back empty, and so does the file a file
                // is bound on (a sandbox's /dev/null).
                let kind = match FileType::from_raw_mode(st.st_mode) {
                    FileType::Directory => EntryKind::Dir,
                    _ => EntryKind::File {
                        offset: self.offset,
                        len: 0,
                    },
                };
                self.entries.push(Entry {
                    path,
                    kind,
                    mode: 0o755,
                    uid: 0,
                    gid: 0,
                    mtime: (0, 0),
                });
                continue;
            }
            let Some(e) = self.entry(fd, &path, &st)? else {
                continue;
            };
            let is_dir = e.kind == EntryKind::Dir;
            self.entries.push(e);
            if is_dir {
                let sub = rustix::fs::openat(
                    fd,
                    name.as_str(),
                    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::empty(),
                )
                .map_err(|e| format!("the tmpfs at {}: {path}: {e}", self.target))?;
                self.dir(&sub, &path)?;
            }
        }
        Ok(())
    }

    /// The entry for `path` (`st` its status), read at `dir`.
    /// `None` for a named socket.
    fn entry(
        &mut self,
        dir: &impl AsFd,
        path: &str,
        st: &rustix::fs::Stat,
    ) -> Found<Option<Entry>> {
        let name = path.rsplit('/').next().unwrap_or("");
        let kind = match FileType::from_raw_mode(st.st_mode) {
            FileType::Directory => EntryKind::Dir,
            // Another name of a file met before: a link to it.
            _ if st.st_nlink > 1 && self.links.contains_key(&st.st_ino) => {
                let (to, left) = self.links.get_mut(&st.st_ino).expect("just seen");
                *left -= 1;
                EntryKind::Link { to: to.clone() }
            }
            FileType::RegularFile => {
                let len = st.st_size as u64;
                self.files.push((path.to_string(), len));
                let k = EntryKind::File {
                    offset: self.offset,
                    len,
                };
                self.offset += len;
                k
            }
            FileType::Symlink if st.st_nlink > 1 => {
                return Err(format!(
                    "a symbolic link with hard links in the tmpfs at {}: {path}",
                    self.target
                ));
            }
            FileType::Symlink => {
                let t = rustix::fs::readlinkat(dir, name, Vec::new())
                    .map_err(|e| format!("the tmpfs at {}: {path}: {e}", self.target))?;
                EntryKind::Symlink {
                    target: t.to_string_lossy().into_owned(),
                }
            }
            FileType::Fifo => EntryKind::Fifo,
            FileType::CharacterDevice => {
                let (major, minor) = (rustix::fs::major(st.st_rdev), rustix::fs::minor(st.st_rdev));
                if !crate::image::mounts::harmless_device(major, minor) {
                    return Err(format!(
                        "device {major}:{minor} in the tmpfs at {}: {path} (of the devices, only \
                         null, zero, full, random, urandom and tty are made again)",
                        self.target
                    ));
                }
                EntryKind::CharDevice { major, minor }
            }
            // A named socket's file is made again by its socket's bind.
            FileType::Socket => return Ok(None),
            other => {
                return Err(format!(
                    "a {other:?} in the tmpfs at {}: {path}",
                    self.target
                ));
            }
        };
        if st.st_nlink > 1 && matches!(kind, EntryKind::File { .. } | EntryKind::Fifo) {
            (self.links).insert(st.st_ino, (path.to_string(), st.st_nlink - 1));
        }
        Ok(Some(Entry {
            path: path.to_string(),
            kind,
            mode: st.st_mode & 0o7777,
            uid: st.st_uid,
            gid: st.st_gid,
            mtime: (st.st_mtime, st.st_mtime_nsec as u32),
        }))
    }
}
