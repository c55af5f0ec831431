//! A mount namespace a process of the tree made, recorded as the steps
//! that turn a copy of its parent's namespace into it (defined here only).
//!
//! A restore makes the process unshare a mount namespace, a copy of the one
//! it is restored in, and take these steps in order: propagation first (so
//! that nothing the next steps do reaches the namespace it was copied
//! from), then mounts removed, flags changed and mounts made. Paths are
//! absolute, as the process sees them. A tmpfs comes back with its files,
//! whose contents are in `mount-<pid>-<n>.img` (`n`: the step's index).
//!
//! A namespace with a root of its own (`pivot_root`, as bubblewrap and
//! container runtimes leave one) starts with [`MountOp::NewRoot`]: every
//! step after it makes a mount of the new tree, the first its root (at
//! `/`), each after the one it is mounted on, at the place the process
//! sees once in it; a bind mount's source is in that tree too, or, with
//! `from_parent`, where the parent sees it. The restore builds the tree at
//! a place of its own and then makes it the root, the old one detached.

use serde::{Deserialize, Serialize};

/// The most steps, and files of a tmpfs, an image may give (the kernel's
/// default limit is 100,000 mounts per namespace).
pub const MAX_OPS: usize = 100_000;
pub const MAX_ENTRIES: usize = 1 << 20;

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct MountNs {
    pub ops: Vec<MountOp>,
}

impl MountNs {
    /// Whether it has a root of its own ([`MountOp::NewRoot`]).
    pub fn new_root(&self) -> bool {
        self.ops.first() == Some(&MountOp::NewRoot)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum MountOp {
    /// The propagation of the mount at `path`, and with `recursive` of
    /// every mount under it.
    Propagation {
        path: String,
        kind: Propagation,
        recursive: bool,
    },
    /// The mount at `path` removed, with whatever is mounted under it.
    Unmount { path: String },
    /// The per-mount flags of the mount at `path`.
    Flags { path: String, flags: Vec<MountFlag> },
    /// What is at `source` mounted at `target` too, with `flags`.
    Bind {
        source: String,
        target: String,
        flags: Vec<MountFlag>,
        /// In a namespace with a root of its own: `source` is where the
        /// parent sees it, not in the new tree.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        from_parent: bool,
        /// With the mounts below `source` (`MS_REC`): in a namespace with a
        /// root of its own, where the steps after it name those of them
        /// whose flags or propagation differ.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        recursive: bool,
    },
    /// A new tmpfs at `target` with its options (`size=`, `mode=`...) and
    /// its files: `root` for its top directory, then every other one,
    /// each after the directory that holds it.
    Tmpfs {
        target: String,
        flags: Vec<MountFlag>,
        options: String,
        /// Its device number at the checkpoint: files of the image on it
        /// are the new tmpfs's.
        dev: u64,
        root: Entry,
        entries: Vec<Entry>,
        /// The directory of the tmpfs the mount shows, when not its top
        /// (`a/b`): a new root's only, as bubblewrap's `/newroot`; its files
        /// are those of that directory.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        shows: Option<String>,
    },
    /// A new devpts instance at `target` with its options (`mode=`,
    /// `ptmxmode=`, `gid=`...): empty, for the pseudo-terminals of the
    /// tree's in it, made again by opening its ptmx where the process sees
    /// it (`restore::pty`).
    Devpts {
        target: String,
        flags: Vec<MountFlag>,
        options: String,
    },
    /// A new file system that shows a namespace of process `by`'s, made
    /// by that process: proc (its pid namespace), mqueue (its IPC
    /// namespace), sysfs (its network namespace); `by` is this
    /// namespace's first process or a descendant in it that is the first
    /// in the namespace shown.
    Namespaced {
        fs: NamespacedFs,
        target: String,
        flags: Vec<MountFlag>,
        options: String,
        by: i32,
    },
    /// The steps after this one build a root of the namespace's own.
    NewRoot,
}

impl MountOp {
    /// The path the step acts on.
    pub fn path(&self) -> &str {
        match self {
            MountOp::NewRoot => "/",
            MountOp::Propagation { path, .. }
            | MountOp::Unmount { path }
            | MountOp::Flags { path, .. } => path,
            MountOp::Bind { target, .. }
            | MountOp::Tmpfs { target, .. }
            | MountOp::Devpts { target, .. }
            | MountOp::Namespaced { target, .. } => target,
        }
    }
}

/// A file system that shows a namespace of the process that mounts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NamespacedFs {
    Proc,
    Mqueue,
    Sysfs,
}

impl NamespacedFs {
    /// Its type, as mount(2) and mountinfo name it.
    pub fn name(self) -> &'static str {
        match self {
            NamespacedFs::Proc => "proc",
            NamespacedFs::Mqueue => "mqueue",
            NamespacedFs::Sysfs => "sysfs",
        }
    }
}

/// How mount events spread between a mount and others (`shared:` and
/// `master:` in mountinfo).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Propagation {
    Private,
    Shared,
    Slave,
    /// A slave of one peer group and shared in another.
    SharedSlave,
    Unbindable,
}

/// A per-mount flag, as mountinfo's fifth field names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MountFlag {
    ReadOnly,
    NoSuid,
    NoDev,
    NoExec,
    NoAtime,
    NoDirAtime,
    RelAtime,
}

impl MountFlag {
    /// The flag a mountinfo option names (`None` for `rw` and the rest).
    pub fn from_option(name: &str) -> Option<MountFlag> {
        Some(match name {
            "ro" => MountFlag::ReadOnly,
            "nosuid" => MountFlag::NoSuid,
            "nodev" => MountFlag::NoDev,
            "noexec" => MountFlag::NoExec,
            "noatime" => MountFlag::NoAtime,
            "nodiratime" => MountFlag::NoDirAtime,
            "relatime" => MountFlag::RelAtime,
            _ => return None,
        })
    }

    /// `mount(2)`'s flags for `flags`; no access-time flag asks for
    /// strict access times (the kernel would make it relatime).
    pub fn bits(flags: &[MountFlag]) -> u64 {
        let mut bits = 0;
        for f in flags {
            bits |= match f {
                MountFlag::ReadOnly => libc::MS_RDONLY,
                MountFlag::NoSuid => libc::MS_NOSUID,
                MountFlag::NoDev => libc::MS_NODEV,
                MountFlag::NoExec => libc::MS_NOEXEC,
                MountFlag::NoAtime => libc::MS_NOATIME,
                MountFlag::NoDirAtime => libc::MS_NODIRATIME,
                MountFlag::RelAtime => libc::MS_RELATIME,
            };
        }
        if bits & (libc::MS_NOATIME | libc::MS_RELATIME) == 0 {
            bits |= libc::MS_STRICTATIME;
        }
        bits
    }
}

/// A file of a tmpfs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Below the tmpfs's top ("" for the top itself), `/` between names.
    pub path: String,
    pub kind: EntryKind,
    /// Permission bits, with set-id and sticky bits.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Modification time: seconds and nanoseconds.
    pub mtime: (i64, u32),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum EntryKind {
    Dir,
    /// A regular file: its contents at `offset` in the step's data file.
    File {
        offset: u64,
        len: u64,
    },
    Symlink {
        target: String,
    },
    Fifo,
    /// Another name of the file an earlier entry at `to` is (a hard link).
    Link {
        to: String,
    },
    /// A character device node, one of [`HARMLESS_DEVICES`].
    CharDevice {
        major: u32,
        minor: u32,
    },
}

/// The character devices a tmpfs may hold that a restore makes again:
/// those a container runtime gives every container (null, zero, full,
/// random, urandom, tty), which reach nothing of the host's. Any other
/// node an image named would be a way into the host's devices.
pub const HARMLESS_DEVICES: [(u32, u32, &str); 6] = [
    (1, 3, "null"),
    (1, 5, "zero"),
    (1, 7, "full"),
    (1, 8, "random"),
    (1, 9, "urandom"),
    (5, 0, "tty"),
];

/// Whether device `major:minor` is one of [`HARMLESS_DEVICES`].
pub fn harmless_device(major: u32, minor: u32) -> bool {
    HARMLESS_DEVICES
        .iter()
        .any(|(a, b, _)| (*a, *b) == (major, minor))
}

/// The options a tmpfs may be given again; anything else (`mpol=`,
/// quotas...) is not carried.
const TMPFS_OPTIONS: [&str; 8] = [
    "size",
    "nr_inodes",
    "mode",
    "uid",
    "gid",
    "inode64",
    "huge",
    "noswap",
];
const PROC_OPTIONS: [&str; 3] = ["hidepid", "subset", "gid"];
const DEVPTS_OPTIONS: [&str; 5] = ["mode", "ptmxmode", "gid", "uid", "max"];

/// Whether `options` (a mountinfo super-options field without `rw`/`ro`)
/// are only of those a fresh file system of type `fstype` is given.
pub fn options_allowed(fstype: &str, options: &str) -> bool {
    let allowed: &[&str] = match fstype {
        "tmpfs" => &TMPFS_OPTIONS,
        "proc" => &PROC_OPTIONS,
        "devpts" => &DEVPTS_OPTIONS,
        "mqueue" | "sysfs" => &[],
        _ => return false,
    };
    options.is_empty()
        || options.split(',').all(|o| {
            let key = o.split('=').next().unwrap_or("");
            allowed.contains(&key)
                && o.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"=_-".contains(&b))
        })
}

/// An absolute path with no empty, `.` or `..` component and no NUL.
pub fn is_clean_path(path: &str) -> bool {
    path == "/"
        || (path.starts_with('/')
            && path.len() < libc::PATH_MAX as usize
            && path[1..].split('/').all(crate::image::is_plain_file_name))
}

/// Checks what an image says of a mount namespace before a restore acts
/// on it; `data_len(n)` is the length of step `n`'s data file.
pub fn check(ns: &MountNs, data_len: impl Fn(usize) -> Option<u64>) -> Result<(), String> {
    if ns.ops.len() > MAX_OPS {
        return Err(format!("{} mount steps", ns.ops.len()));
    }
    let new_root = ns.new_root();
    for (n, op) in ns.ops.iter().enumerate() {
        if !is_clean_path(op.path()) {
            return Err(format!("mount step {n} has the path {:?}", op.path()));
        }
        // A new tree: its root first, at `/`, mounts on it after; nothing
        // of the old one changed.
        if new_root {
            let root_step = n == 1;
            let fits = match op {
                MountOp::NewRoot => n == 0,
                MountOp::Unmount { .. } => false,
                MountOp::Tmpfs { target, .. } | MountOp::Bind { target, .. } if root_step => {
                    target == "/"
                }
                // The root's own propagation and flags may follow it.
                MountOp::Propagation { .. } | MountOp::Flags { .. } => !root_step,
                _ => !root_step && op.path() != "/",
            };
            if !fits {
                return Err(format!(
                    "mount step {n} is not a step of a new root's tree in its place"
                ));
            }
        } else if matches!(
            op,
            MountOp::NewRoot
                | MountOp::Bind {
                    from_parent: true,
                    ..
                }
                | MountOp::Bind {
                    recursive: true,
                    ..
                }
        ) {
            return Err(format!(
                "mount step {n} is a new root's in a namespace without one"
            ));
        }
        match op {
            MountOp::Bind { source, .. } if !is_clean_path(source) => {
                return Err(format!("mount step {n} binds {source:?}"));
            }
            MountOp::Tmpfs {
                options,
                root,
                entries,
                shows,
                ..
            } => {
                if !options_allowed("tmpfs", options) {
                    return Err(format!("mount step {n}: tmpfs options {options:?}"));
                }
                if let Some(dir) = shows
                    && !(new_root
                        && n == 1
                        && dir.len() < 4096
                        && dir.split('/').all(crate::image::is_plain_file_name))
                {
                    return Err(format!("mount step {n} shows its directory {dir:?}"));
                }
                check_entries(root, entries, data_len(n))
                    .map_err(|e| format!("mount step {n}: {e}"))?;
            }
            MountOp::Devpts { options, .. } if !options_allowed("devpts", options) => {
                return Err(format!("mount step {n}: devpts options {options:?}"));
            }
            MountOp::Namespaced { fs, options, .. } if !options_allowed(fs.name(), options) => {
                return Err(format!("mount step {n}: {} options {options:?}", fs.name()));
            }
            _ => {}
        }
    }
    Ok(())
}

fn check_entries(root: &Entry, entries: &[Entry], data: Option<u64>) -> Result<(), String> {
    if entries.len() > MAX_ENTRIES {
        return Err(format!("{} files", entries.len()));
    }
    if !root.path.is_empty() || root.kind != EntryKind::Dir {
        return Err("its top is not a directory".into());
    }
    let mut dirs = std::collections::HashSet::from([""]);
    let mut seen = std::collections::HashSet::new();
    // The files a hard link may name: earlier regular files and FIFOs.
    let mut linkable = std::collections::HashSet::new();
    for e in std::iter::once(root).chain(entries) {
        if e.mode & !0o7777 != 0 {
            return Err(format!("{:?} has mode {:o}", e.path, e.mode));
        }
        if e.path.is_empty() {
            if !std::ptr::eq(e, root) {
                return Err("a second top".into());
            }
            continue;
        }
        let (dir, name) = e.path.rsplit_once('/').unwrap_or(("", &e.path));
        if !crate::image::is_plain_file_name(name) || !dirs.contains(dir) || !seen.insert(&e.path) {
            return Err(format!(
                "{:?} is not a new name in a directory before it",
                e.path
            ));
        }
        match &e.kind {
            EntryKind::Dir => {
                dirs.insert(&e.path);
            }
            EntryKind::File { offset, len } => {
                let end = offset.checked_add(*len);
                if end.is_none() || end > data {
                    return Err(format!("{:?} lies beyond the data file", e.path));
                }
            }
            EntryKind::Symlink { target } => {
                if target.is_empty() || target.contains('\0') || target.len() >= 4096 {
                    return Err(format!("{:?} is a link to {target:?}", e.path));
                }
            }
            EntryKind::Fifo => {}
            EntryKind::CharDevice { major, minor } if !harmless_device(*major, *minor) => {
                return Err(format!("{:?} is device {major}:{minor}", e.path));
            }
            EntryKind::CharDevice { .. } => {}
            EntryKind::Link { to } => {
                if !linkable.contains(to.as_str()) {
                    return Err(format!(
                        "{:?} is a link to {to:?}, no file before it",
                        e.path
                    ));
                }
            }
        }
        if matches!(e.kind, EntryKind::File { .. } | EntryKind::Fifo) {
            linkable.insert(e.path.as_str());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(path: &str, kind: EntryKind) -> Entry {
        Entry {
            path: path.into(),
            kind,
            mode: 0o755,
            uid: 0,
            gid: 0,
            mtime: (0, 0),
        }
    }

    fn tmpfs(entries: Vec<Entry>) -> MountNs {
        MountNs {
            ops: vec![MountOp::Tmpfs {
                target: "/tmp".into(),
                flags: vec![],
                options: "size=1024k,mode=1777".into(),
                dev: 42,
                root: entry("", EntryKind::Dir),
                entries,
                shows: None,
            }],
        }
    }

    #[test]
    fn a_sound_namespace_passes_and_round_trips() {
        let ns = tmpfs(vec![
            entry("d", EntryKind::Dir),
            entry("d/f", EntryKind::File { offset: 0, len: 4 }),
            entry(
                "l",
                EntryKind::Symlink {
                    target: "../etc".into(),
                },
            ),
            entry("h", EntryKind::Link { to: "d/f".into() }),
            entry("null", EntryKind::CharDevice { major: 1, minor: 3 }),
        ]);
        assert_eq!(check(&ns, |_| Some(4)), Ok(()));
        let json = serde_json::to_string(&ns).unwrap();
        assert_eq!(serde_json::from_str::<MountNs>(&json).unwrap(), ns);
    }

    #[test]
    fn hostile_paths_options_and_files_are_refused() {
        let bad_paths = ["tmp", "/tmp/../etc", "/tmp//x", "/a/./b", "/a\0b", ""];
        for p in bad_paths {
            let ns = MountNs {
                ops: vec![MountOp::Unmount { path: p.into() }],
            };
            assert!(check(&ns, |_| None).is_err(), "{p:?}");
        }
        let ns = MountNs {
            ops: vec![MountOp::Bind {
                source: "/x/..".into(),
                target: "/y".into(),
                flags: vec![],
                from_parent: false,
                recursive: false,
            }],
        };
        assert!(check(&ns, |_| None).is_err());
        let mut ns = tmpfs(vec![]);
        if let MountOp::Tmpfs { options, .. } = &mut ns.ops[0] {
            *options = "size=1k,mpol=bind".into();
        }
        assert!(check(&ns, |_| Some(0)).is_err());
        let link = |to: &str| entry("h", EntryKind::Link { to: to.into() });
        for entries in [
            // Hard links to what is not a file before them.
            vec![link("f"), entry("f", EntryKind::Fifo)],
            vec![entry("d", EntryKind::Dir), link("d")],
            vec![entry("f", EntryKind::Fifo), link("../etc/passwd")],
            // A disk's node.
            vec![entry("sda", EntryKind::CharDevice { major: 8, minor: 0 })],
            vec![entry("../x", EntryKind::Dir)],
            vec![entry("a/b", EntryKind::Dir)],
            vec![entry("a", EntryKind::Dir), entry("a", EntryKind::Dir)],
            vec![entry("f", EntryKind::File { offset: 2, len: 4 })],
            vec![entry(
                "f",
                EntryKind::File {
                    offset: u64::MAX,
                    len: 4,
                },
            )],
        ] {
            assert!(
                check(&tmpfs(entries.clone()), |_| Some(4)).is_err(),
                "{entries:?}"
            );
        }
    }

    /// A new root's tree as bubblewrap leaves one: the root a directory of
    /// a tmpfs, the host's /usr bound on it, a tmpfs /tmp.
    fn new_root() -> MountNs {
        let mut root = tmpfs(vec![
            entry("usr", EntryKind::Dir),
            entry("tmp", EntryKind::Dir),
        ]);
        if let MountOp::Tmpfs { target, shows, .. } = &mut root.ops[0] {
            *target = "/".into();
            *shows = Some("newroot".into());
        }
        let mut ops = vec![MountOp::NewRoot];
        ops.append(&mut root.ops);
        ops.push(MountOp::Bind {
            source: "/usr".into(),
            target: "/usr".into(),
            flags: vec![MountFlag::ReadOnly],
            from_parent: true,
            recursive: true,
        });
        ops.append(&mut tmpfs(vec![]).ops);
        MountNs { ops }
    }

    #[test]
    fn a_new_roots_tree_passes_and_round_trips() {
        let mut ns = new_root();
        // A root mount that is not private.
        ns.ops.insert(
            2,
            MountOp::Propagation {
                path: "/".into(),
                kind: Propagation::Slave,
                recursive: false,
            },
        );
        assert!(ns.new_root());
        assert_eq!(check(&ns, |_| Some(0)), Ok(()));
        let json = serde_json::to_string(&ns).unwrap();
        assert_eq!(serde_json::from_str::<MountNs>(&json).unwrap(), ns);
    }

    #[test]
    fn a_new_roots_steps_out_of_place_are_refused() {
        type Edit = fn(&mut Vec<MountOp>);
        let edits: [(&str, Edit); 7] = [
            ("a new root not first", |ops| ops.swap(0, 1)),
            ("a root not at /", |ops| {
                if let MountOp::Tmpfs { target, .. } = &mut ops[1] {
                    *target = "/x".into();
                }
            }),
            ("a second mount at /", |ops| {
                if let MountOp::Bind { target, .. } = &mut ops[2] {
                    *target = "/".into();
                }
            }),
            ("an unmount", |ops| {
                ops.push(MountOp::Unmount {
                    path: "/usr".into(),
                })
            }),
            ("a shown directory out of the tmpfs", |ops| {
                if let MountOp::Tmpfs { shows, .. } = &mut ops[1] {
                    *shows = Some("../etc".into());
                }
            }),
            ("a shown directory of a mount not the root", |ops| {
                if let MountOp::Tmpfs { shows, .. } = &mut ops[3] {
                    *shows = Some("a".into());
                }
            }),
            ("a bind from the parent's tree without a new root", |ops| {
                ops.remove(0);
                ops.remove(0);
            }),
        ];
        for (what, edit) in edits {
            let mut ns = new_root();
            edit(&mut ns.ops);
            assert!(check(&ns, |_| Some(0)).is_err(), "{what}");
        }
    }

    #[test]
    fn mount_flags_ask_for_strict_access_times_when_none_is_named() {
        assert_eq!(
            MountFlag::bits(&[MountFlag::ReadOnly]),
            libc::MS_RDONLY | libc::MS_STRICTATIME
        );
        assert_eq!(
            MountFlag::bits(&[MountFlag::NoSuid, MountFlag::RelAtime]),
            libc::MS_NOSUID | libc::MS_RELATIME
        );
    }
}
