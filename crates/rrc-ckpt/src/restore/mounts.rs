//! Mount namespaces of the tree's own, made again (format:
//! `image::mounts`). The namespace's first process unshares one, a copy of
//! the namespace it is restored in, and takes the image's steps in it
//! with calls of its own; a proc or queue file system of another pid or
//! IPC namespace is mounted by that namespace's first process when it is
//! restored.
//!
//! An image is not trusted: every step's path must lead where it says
//! without a symbolic link (resolved as the process sees its files), and a
//! step that would attach or detach a mount under one shared with the
//! namespace the restore runs in (whose events would reach it) is refused.
//! A tmpfs's files are written by rrc beneath the new tmpfs's top, checked
//! to be that empty tmpfs, never following a link.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::FileExt;

use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags, Timespec, Timestamps};

use crate::image::mounts::{
    Entry, EntryKind, MountFlag, MountNs, MountOp, NamespacedFs, Propagation,
};
use crate::image::{ImageDir, ProcessImage};
use crate::restore::tracee::Tracee;
use crate::{Error, Result};

const TMPFS_MAGIC: i64 = 0x0102_1994;

fn rerr(pid: i32, detail: String) -> Error {
    Error::Restore {
        pid,
        stage: "mount namespace",
        detail,
    }
}

/// Checks the mount namespaces an image gives before anything is made:
/// each step (`image::mounts::check`), each data file's length, and each
/// namespaced file system's maker (the namespace's first process, or a
/// descendant in its namespace first in the pid or IPC namespace shown).
pub fn check(
    img: &ImageDir,
    procs: &BTreeMap<i32, ProcessImage>,
) -> std::result::Result<(), String> {
    for p in procs.values() {
        let Some(ns) = &p.own_mounts else {
            continue;
        };
        let len = |n| {
            std::fs::metadata(img.mount_data(p.pid, n))
                .ok()
                .map(|m| m.len())
        };
        crate::image::mounts::check(ns, len).map_err(|e| format!("process {}: {e}", p.pid))?;
        for op in &ns.ops {
            let MountOp::Namespaced { fs, by, .. } = op else {
                continue;
            };
            let first = |q: &ProcessImage| match fs {
                NamespacedFs::Proc => q.nested_pids.last() == Some(&1),
                NamespacedFs::Mqueue => q.ipc.is_some(),
                NamespacedFs::Sysfs => q.own_net.is_some(),
            };
            // A new root's tree is built by its first process alone.
            let made_here = *by == p.pid
                || (!ns.new_root()
                    && (procs.get(by))
                        .is_some_and(|q| first(q) && mount_ns_of(procs, q) == Some(p.pid)));
            if !made_here {
                return Err(format!(
                    "process {}'s {} file system is made by process {by}, not the first of a \
                     namespace it shows in its mount namespace",
                    p.pid,
                    fs.name()
                ));
            }
        }
    }
    Ok(())
}

/// The first process of the mount namespace a tree made that process `p`
/// (not its first) is in.
fn mount_ns_of(procs: &BTreeMap<i32, ProcessImage>, p: &ProcessImage) -> Option<i32> {
    if p.own_mounts.is_some() {
        return None;
    }
    let mut at = p.parent?;
    for _ in 0..procs.len() {
        let q = procs.get(&at)?;
        if q.own_mounts.is_some() {
            return Some(q.pid);
        }
        at = q.parent?;
    }
    None
}

/// The devices (at the checkpoint) of the tmpfs file systems the image
/// makes again.
pub fn remade_devices(procs: &BTreeMap<i32, ProcessImage>) -> std::collections::HashSet<u64> {
    procs
        .values()
        .filter_map(|p| p.own_mounts.as_ref())
        .flat_map(|ns| &ns.ops)
        .filter_map(|op| match op {
            MountOp::Tmpfs { dev, .. } => Some(*dev),
            _ => None,
        })
        .collect()
}

/// Takes the steps of the mount namespace `t` (process `p`) is the first
/// of, made (a copy of its parent's), but proc file systems others make.
pub fn make(t: &mut Tracee, p: &ProcessImage, ns: &MountNs, img: &ImageDir) -> Result<()> {
    if ns.new_root() {
        return make_new_root(t, p, ns, img);
    }
    for (n, op) in ns.ops.iter().enumerate() {
        if matches!(op, MountOp::Namespaced { by, .. } if *by != p.pid) {
            continue;
        }
        step(t, op, &img.mount_data(p.pid, n))?;
    }
    Ok(())
}

/// Builds the tree of a namespace with a root of its own (every step
/// after [`MountOp::NewRoot`], each at its place below a directory of the
/// restore's own in the `/tmp` the process sees, once every mount there is
/// private, so that nothing reaches the namespace it was copied from),
/// then makes it the process's root (`pivot_root`), the old one detached.
fn make_new_root(t: &mut Tracee, p: &ProcessImage, ns: &MountNs, img: &ImageDir) -> Result<()> {
    let pid = t.ns_pid;
    let private = MountOp::Propagation {
        path: "/".into(),
        kind: Propagation::Private,
        recursive: true,
    };
    step(t, &private, std::path::Path::new(""))?;
    let place = Staging::make(t)?;
    for (n, op) in ns.ops.iter().enumerate().skip(1) {
        step(t, &staged(op, &place.path), &img.mount_data(p.pid, n))?;
    }
    let mut call = |what: &'static str, nr: i64, path: &str, more: u64| -> Result<()> {
        let at = t.arg_str(path)?;
        let args: &[u64] = match nr {
            libc::SYS_pivot_root => &[at, at],
            _ => &[at, more],
        };
        t.call(what, nr, args)
            .map(drop)
            .map_err(named(pid, format!("{what} {path}")))
    };
    call("chdir", libc::SYS_chdir, &place.path, 0)?;
    call("pivot_root", libc::SYS_pivot_root, ".", 0)?;
    call("umount2", libc::SYS_umount2, ".", libc::MNT_DETACH as u64)?;
    call("chdir", libc::SYS_chdir, "/", 0)?;
    drop(place);
    Ok(())
}

/// `op` made at `at` instead of `/`: its places, and a bind's source but
/// one from the parent's tree.
fn staged(op: &MountOp, at: &str) -> MountOp {
    let under = |path: &String| match path.as_str() {
        "/" => at.to_string(),
        p => format!("{at}{p}"),
    };
    let mut op = op.clone();
    match &mut op {
        MountOp::Propagation { path, .. } | MountOp::Flags { path, .. } => *path = under(path),
        MountOp::Bind {
            source,
            target,
            from_parent,
            ..
        } => {
            if !*from_parent {
                *source = under(source);
            }
            *target = under(target);
        }
        MountOp::Tmpfs { target, .. }
        | MountOp::Devpts { target, .. }
        | MountOp::Namespaced { target, .. } => *target = under(target),
        MountOp::Unmount { path } => *path = under(path),
        MountOp::NewRoot => {}
    }
    op
}

/// A directory of the restore's own in the `/tmp` a process sees, where a
/// new root's tree is built; removed when dropped (once the tree is the
/// root, nothing is mounted on it any more).
struct Staging {
    dir: OwnedFd,
    name: String,
    /// As the process sees it.
    path: String,
}

impl Staging {
    fn make(t: &Tracee) -> Result<Staging> {
        let pid = t.ns_pid;
        let dir = resolve(t, "/tmp", OFlags::PATH | OFlags::DIRECTORY)
            .map_err(|e| rerr(pid, format!("/tmp, to build its new root in: {e}")))?;
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let name = format!(".rrc-root-{}-{nanos}", t.pid);
        // Searchable by a process in a user namespace (rrc's umask is 077).
        rustix::fs::mkdirat(&dir, name.as_str(), Mode::from_raw_mode(0o700))
            .and_then(|()| {
                let mode = Mode::from_raw_mode(0o755);
                rustix::fs::chmodat(&dir, name.as_str(), mode, AtFlags::empty())
            })
            .map_err(|e| rerr(pid, format!("/tmp/{name}, to build its new root in: {e}")))?;
        let path = format!("/tmp/{name}");
        Ok(Staging { dir, name, path })
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if let Err(e) = rustix::fs::unlinkat(&self.dir, self.name.as_str(), AtFlags::REMOVEDIR) {
            tracing::warn!("/tmp/{} (where a new root was built) stays: {e}", self.name);
        }
    }
}

/// Mounts the file systems process `t` makes in the mount namespace an
/// ancestor made, those that show a namespace it is the first in
/// (nothing for most processes).
pub fn made_by(t: &mut Tracee, procs: &BTreeMap<i32, ProcessImage>) -> Result<()> {
    let Some(first) = procs.get(&t.ns_pid).and_then(|p| mount_ns_of(procs, p)) else {
        return Ok(());
    };
    let Some(ns) = &procs[&first].own_mounts else {
        return Ok(());
    };
    for op in &ns.ops {
        if matches!(op, MountOp::Namespaced { by, .. } if *by == t.ns_pid) {
            step(t, op, std::path::Path::new(""))?;
        }
    }
    Ok(())
}

/// Takes one step; `data` is its data file (a tmpfs's).
fn step(t: &mut Tracee, op: &MountOp, data: &std::path::Path) -> Result<()> {
    let pid = t.ns_pid;
    let path = op.path();
    resolve(t, path, OFlags::PATH).map_err(|e| {
        rerr(
            pid,
            format!("{path}: {e} (as the process sees its files, without following links)"),
        )
    })?;
    if !matches!(op, MountOp::Propagation { .. } | MountOp::Flags { .. }) {
        let unmount = matches!(op, MountOp::Unmount { .. });
        if attached_to_shared(t, path, unmount)? {
            return Err(rerr(
                pid,
                format!(
                    "the image would change the mounts at {path}, under a mount shared with the \
                     namespace the restore runs in (whose mounts would change too)"
                ),
            ));
        }
    }
    match op {
        MountOp::Propagation {
            path,
            kind,
            recursive,
        } => {
            let rec = if *recursive { libc::MS_REC } else { 0 };
            let kinds: &[u64] = match kind {
                Propagation::Private => &[libc::MS_PRIVATE],
                Propagation::Shared => &[libc::MS_SHARED],
                Propagation::Slave => &[libc::MS_SLAVE],
                Propagation::SharedSlave => &[libc::MS_SLAVE, libc::MS_SHARED],
                Propagation::Unbindable => &[libc::MS_UNBINDABLE],
            };
            for k in kinds {
                mount(t, None, path, None, k | rec, None)?;
            }
        }
        MountOp::Unmount { path } => {
            let at = t.arg_str(path)?;
            t.call("umount2", libc::SYS_umount2, &[at, libc::MNT_DETACH as u64])
                .map_err(named(pid, format!("unmount {path}")))?;
        }
        MountOp::Flags { path, flags } => remount(t, path, flags)?,
        MountOp::NewRoot => {}
        MountOp::Bind {
            source,
            target,
            flags,
            recursive,
            ..
        } => {
            let rec = if *recursive { libc::MS_REC } else { 0 };
            mount(t, Some(source), target, None, libc::MS_BIND | rec, None)?;
            remount(t, target, flags)?;
        }
        MountOp::Tmpfs {
            target,
            flags,
            options,
            root,
            entries,
            shows,
            ..
        } => {
            // Written before it is made read-only, if it is.
            let writable: Vec<MountFlag> = (flags.iter())
                .filter(|f| **f != MountFlag::ReadOnly)
                .copied()
                .collect();
            mount(
                t,
                Some("tmpfs"),
                target,
                Some("tmpfs"),
                MountFlag::bits(&writable),
                Some(options),
            )?;
            // A directory of it shown at its place: made, and bound on
            // the tmpfs's top there.
            if let Some(dir) = shows {
                let top = resolve(t, target, OFlags::PATH | OFlags::DIRECTORY)
                    .map_err(|e| rerr(pid, format!("the tmpfs at {target}: {e}")))?;
                let mut at = String::new();
                for part in dir.split('/') {
                    at = if at.is_empty() {
                        part.to_string()
                    } else {
                        format!("{at}/{part}")
                    };
                    rustix::fs::mkdirat(&top, at.as_str(), Mode::from_raw_mode(0o755))
                        .map_err(|e| rerr(pid, format!("{target}/{at}: {e}")))?;
                }
                let source = format!("{}/{dir}", target.trim_end_matches('/'));
                mount(t, Some(&source), target, None, libc::MS_BIND, None)?;
            }
            fill(t, target, root, entries, data)
                .map_err(|e| rerr(pid, format!("the files of the tmpfs at {target}: {e}")))?;
            if writable.len() != flags.len() {
                remount(t, target, flags)?;
            }
        }
        MountOp::Devpts {
            target,
            flags,
            options,
        } => {
            let options = match options.as_str() {
                "" => "newinstance".to_string(),
                o => format!("newinstance,{o}"),
            };
            let bits = MountFlag::bits(flags);
            mount(
                t,
                Some("devpts"),
                target,
                Some("devpts"),
                bits,
                Some(&options),
            )?;
        }
        MountOp::Namespaced {
            fs,
            target,
            flags,
            options,
            ..
        } => mount(
            t,
            Some(fs.name()),
            target,
            Some(fs.name()),
            MountFlag::bits(flags),
            Some(options),
        )?,
    }
    Ok(())
}

fn named(pid: i32, what: String) -> impl FnOnce(Error) -> Error {
    move |e| match e {
        Error::RemoteFailed { errno, .. } => rerr(pid, format!("{what}: {errno}")),
        e => e,
    }
}

/// `mount(2)` called by the process.
fn mount(
    t: &mut Tracee,
    source: Option<&str>,
    target: &str,
    fstype: Option<&str>,
    flags: u64,
    data: Option<&str>,
) -> Result<()> {
    let pid = t.ns_pid;
    let s = t.arg_str(source.unwrap_or("none"))?;
    let tg = t.arg_str(target)?;
    let f = match fstype {
        Some(f) => t.arg_str(f)?,
        None => 0,
    };
    let d = match data {
        Some(d) if !d.is_empty() => t.arg_str(d)?,
        _ => 0,
    };
    t.call("mount", libc::SYS_mount, &[s, tg, f, flags, d])
        .map(drop)
        .map_err(named(
            pid,
            format!(
                "mount {} at {target} ({flags:#x})",
                source.or(fstype).unwrap_or("none")
            ),
        ))
}

/// Gives the mount at `path` its per-mount flags.
fn remount(t: &mut Tracee, path: &str, flags: &[MountFlag]) -> Result<()> {
    let bits = libc::MS_REMOUNT | libc::MS_BIND | MountFlag::bits(flags);
    mount(t, None, path, None, bits, None)
}

/// Opens `path` as process `t` sees it, following no link.
fn resolve(t: &Tracee, path: &str, flags: OFlags) -> rustix::io::Result<OwnedFd> {
    let root = rustix::fs::open(
        format!("/proc/{}/root", t.pid),
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let rel = path.trim_start_matches('/');
    rustix::fs::openat2(
        &root,
        if rel.is_empty() { "." } else { rel },
        flags | OFlags::CLOEXEC,
        Mode::empty(),
        ResolveFlags::IN_ROOT | ResolveFlags::NO_SYMLINKS,
    )
}

/// Whether the mount that a mount at `path` attaches to (with `unmount`:
/// the one the mount at `path` is attached to) is shared, by the
/// process's mount table.
fn attached_to_shared(t: &Tracee, path: &str, unmount: bool) -> Result<bool> {
    use procfs::FromBufRead;
    let pid = t.ns_pid;
    let f = File::open(format!("/proc/{}/mountinfo", t.pid))
        .map_err(|e| rerr(pid, format!("its mount table: {e}")))?;
    let table = procfs::process::MountInfos::from_buf_read(std::io::BufReader::new(f))
        .map_err(|e| rerr(pid, format!("its mount table: {e}")))?
        .0;
    let under = |p: &str, dir: &str| {
        dir == "/" || p == dir || p.strip_prefix(dir).is_some_and(|r| r.starts_with('/'))
    };
    // The mount seen at `path`: the last one listed at the longest place
    // above or at it.
    let holding = |p: &str| {
        table
            .iter()
            .filter(|m| under(p, &m.mount_point.to_string_lossy()))
            .max_by_key(|m| m.mount_point.as_os_str().len())
            .map(|m| m.mnt_id)
    };
    let mut id = holding(path);
    if unmount {
        id = id
            .and_then(|i| table.iter().find(|m| m.mnt_id == i))
            .map(|m| m.pid);
    }
    let Some(m) = id.and_then(|i| table.iter().find(|m| m.mnt_id == i)) else {
        return Err(rerr(pid, format!("no mount holds {path}")));
    };
    Ok(m.opt_fields
        .iter()
        .any(|f| matches!(f, procfs::process::MountOptFields::Shared(_))))
}

/// Writes a tmpfs's files beneath its top at `target`, which must be that
/// tmpfs, empty.
fn fill(
    t: &Tracee,
    target: &str,
    root: &Entry,
    entries: &[Entry],
    data: &std::path::Path,
) -> std::result::Result<(), String> {
    let top = resolve(t, target, OFlags::RDONLY | OFlags::DIRECTORY).map_err(|e| e.to_string())?;
    let fs = rustix::fs::fstatfs(&top).map_err(|e| e.to_string())?;
    let sx = rustix::fs::statx(
        &top,
        "",
        AtFlags::EMPTY_PATH,
        rustix::fs::StatxFlags::BASIC_STATS,
    )
    .map_err(|e| e.to_string())?;
    let mount_root = sx
        .stx_attributes
        .contains(rustix::fs::StatxAttributes::MOUNT_ROOT);
    let empty = rustix::fs::Dir::read_from(&top)
        .map_err(|e| e.to_string())?
        .filter_map(|d| d.ok())
        .all(|d| matches!(d.file_name().to_bytes(), b"." | b".."));
    if fs.f_type as i64 != TMPFS_MAGIC || !mount_root || !empty {
        return Err("what is there is not the new, empty tmpfs".into());
    }
    let data = if entries
        .iter()
        .any(|e| matches!(e.kind, EntryKind::File { .. }))
    {
        Some(File::open(data).map_err(|e| format!("{}: {e}", data.display()))?)
    } else {
        None
    };
    for e in entries {
        make_entry(&top, e, data.as_ref()).map_err(|err| format!("{}: {err}", e.path))?;
    }
    set_owner(&top, ".", root).map_err(|e| e.to_string())?;
    // Directories' times last, the deepest first: making what they hold
    // changed them.
    for e in entries.iter().rev().filter(|e| e.kind == EntryKind::Dir) {
        times(&top, &e.path, e).map_err(|err| format!("{}: {err}", e.path))?;
    }
    times(&top, ".", root).map_err(|e| e.to_string())
}

fn make_entry(top: &OwnedFd, e: &Entry, data: Option<&File>) -> std::io::Result<()> {
    let (dir, name) = e.path.rsplit_once('/').unwrap_or(("", &e.path));
    let parent = rustix::fs::openat2(
        top,
        if dir.is_empty() { "." } else { dir },
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
        ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_XDEV,
    )?;
    match &e.kind {
        EntryKind::Dir => rustix::fs::mkdirat(&parent, name, Mode::from_raw_mode(0o700))?,
        EntryKind::Fifo => {
            rustix::fs::mknodat(&parent, name, FileType::Fifo, Mode::from_raw_mode(0o600), 0)?
        }
        EntryKind::Symlink { target } => rustix::fs::symlinkat(target.as_str(), &parent, name)?,
        // One of `HARMLESS_DEVICES` (checked at load).
        EntryKind::CharDevice { major, minor } => rustix::fs::mknodat(
            &parent,
            name,
            FileType::CharacterDevice,
            Mode::from_raw_mode(0o600),
            rustix::fs::makedev(*major, *minor),
        )?,
        EntryKind::Link { to } => {
            // The file made for its first name, found beneath the top.
            let file = rustix::fs::openat2(
                top,
                to.as_str(),
                OFlags::PATH | OFlags::CLOEXEC,
                Mode::empty(),
                ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_XDEV,
            )?;
            rustix::fs::linkat(&file, "", &parent, name, AtFlags::EMPTY_PATH)?;
        }
        EntryKind::File { offset, len } => {
            let fd = rustix::fs::openat(
                &parent,
                name,
                OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::from_raw_mode(0o600),
            )?;
            let out = File::from(fd);
            let data = data.ok_or_else(|| std::io::Error::other("no data file"))?;
            let mut buf = vec![0u8; (*len).min(1 << 20) as usize];
            let mut done = 0u64;
            while done < *len {
                let want = ((*len - done) as usize).min(buf.len());
                data.read_exact_at(&mut buf[..want], offset + done)?;
                out.write_all_at(&buf[..want], done)?;
                done += want as u64;
            }
        }
    }
    // A hard link's file has its owner, mode and time from its first name.
    if matches!(e.kind, EntryKind::Link { .. }) {
        return Ok(());
    }
    set_owner(&parent, name, e)?;
    if e.kind != EntryKind::Dir {
        times(&parent, name, e)?;
    }
    Ok(())
}

/// Owner, then mode (a change of owner clears set-id bits); a link has
/// no mode of its own.
fn set_owner(dir: &impl AsFd, name: &str, e: &Entry) -> std::io::Result<()> {
    rustix::fs::chownat(
        dir,
        name,
        Some(rustix::fs::Uid::from_raw(e.uid)),
        Some(rustix::fs::Gid::from_raw(e.gid)),
        AtFlags::SYMLINK_NOFOLLOW,
    )?;
    if !matches!(e.kind, EntryKind::Symlink { .. }) {
        rustix::fs::chmodat(dir, name, Mode::from_raw_mode(e.mode), AtFlags::empty())?;
    }
    Ok(())
}

fn times(dir: &impl AsFd, name: &str, e: &Entry) -> std::io::Result<()> {
    let ts = Timespec {
        tv_sec: e.mtime.0,
        tv_nsec: e.mtime.1.into(),
    };
    let omit = Timespec {
        tv_sec: 0,
        tv_nsec: libc::UTIME_OMIT,
    };
    let path = if name.is_empty() { "." } else { name };
    rustix::fs::utimensat(
        dir,
        path,
        &Timestamps {
            last_access: omit,
            last_modification: ts,
        },
        AtFlags::SYMLINK_NOFOLLOW,
    )?;
    Ok(())
}
