//! The SysV IPC objects of the IPC namespaces the tree owns: the root's,
//! when it is not the checkpointing process's (a container's), and each
//! one a process of the tree is the first in. The namespace's limits,
//! semaphore sets (their values) and message queues (their messages,
//! copied without being taken) are read by a thread of ours that enters
//! the namespace. Shared memory segments are saved with the memory of
//! the processes that attach them; one that no process attaches is read
//! here (attached read-only by the reading thread for a moment), so that
//! it is saved with them. Ids are a namespace's own (and the segment's
//! inode number), so each segment is also known by its file handle, which
//! tells segments of one id in two namespaces apart: a mapping is matched
//! with the namespace that lists it, and its segment made again there.
//!
//! Each namespace's POSIX message queues are listed here too, so that
//! those no process has open are saved with the others, and the device of
//! its queue file system tells which namespace a queue an fd holds is in.
//!
//! What the kernel keeps per process and shows nowhere is not carried
//! over: `SEM_UNDO` adjustments, and which process last used an object.

use std::collections::BTreeMap;

use nix::unistd::Pid;

use crate::common::{Ns, in_ns_of};
use crate::image::{IPC_LIMITS, IpcObjects, IpcPerm, Message, MessageQueue, SemaphoreSet};
use crate::{procfs as pfs, sys};

/// What a namespace holds, as a checkpoint keeps it.
pub struct Namespace {
    pub objects: IpcObjects,
    /// Each shared memory segment's mode and creator (as our pid
    /// namespace numbers it), by id.
    pub segments: BTreeMap<i32, Segment>,
    /// Each segment's id by its file handle.
    pub handles: BTreeMap<Vec<u8>, i32>,
    /// The segments no process attaches.
    pub unattached: Vec<Unattached>,
    /// The POSIX message queues by name, each open read-write and
    /// non-blocking, and the device of the namespace's queue file system.
    pub queues: Vec<(String, std::fs::File)>,
    pub queue_dev: u64,
}

/// What a namespace's listing says of a shared memory segment.
#[derive(Debug, Clone, Copy)]
pub struct Segment {
    pub mode: u32,
    /// The process that made it (`shm_cpid`), as our pid namespace
    /// numbers it.
    pub creator: i32,
}

/// A shared memory segment no process attaches, with the file its
/// contents are read from.
pub struct Unattached {
    pub key: i32,
    pub id: i32,
    pub segment: Segment,
    pub file: std::fs::File,
}

/// What was read of one namespace.
pub struct Read {
    /// Its first process (the root for the tree's own).
    pub first: Pid,
    /// A namespace below the root's.
    pub nested: bool,
    pub namespace: Result<Namespace, String>,
    /// What in it cannot be saved.
    pub problems: Vec<String>,
}

/// Namespaces being read on a thread of their own, while the checkpoint
/// goes on.
pub struct Reader(Option<std::thread::JoinHandle<Vec<Read>>>);

impl Reader {
    /// Starts reading the namespace of each `(first process, nested)`.
    pub fn start(owners: Vec<(Pid, bool)>) -> Reader {
        if owners.is_empty() {
            return Reader(None);
        }
        Reader(Some(std::thread::spawn(move || {
            owners
                .into_iter()
                .map(|(first, nested)| read(first, nested))
                .collect()
        })))
    }

    /// What was read.
    pub fn finish(self) -> Vec<Read> {
        let Some(job) = self.0 else {
            return Vec::new();
        };
        job.join().unwrap_or_else(|_| {
            vec![Read {
                first: Pid::from_raw(0),
                nested: true,
                namespace: Err("the reading thread failed".into()),
                problems: Vec::new(),
            }]
        })
    }
}

/// Reads the objects of process `first`'s IPC namespace.
fn read(first: Pid, nested: bool) -> Read {
    let mut found = Vec::new();
    let namespace = in_ns_of(first, Ns::Ipc, || read_here(&mut found))
        .map_err(|e| e.to_string())
        .and_then(|r| r.map_err(|e| e.to_string()));
    Read {
        first,
        nested,
        namespace,
        problems: found
            .into_iter()
            .map(|p| format!("process {first}'s IPC namespace: {p}"))
            .collect(),
    }
}

/// The objects of the calling thread's IPC namespace.
fn read_here(problems: &mut Vec<String>) -> std::io::Result<Namespace> {
    let mut segments = BTreeMap::new();
    let mut handles = BTreeMap::new();
    let mut unattached = Vec::new();
    for seg in listing("shm")? {
        let perm = seg.perm()?;
        let (id, key) = (perm.id, perm.key);
        let segment = seg.segment()?;
        segments.insert(id, segment);
        let file = match sys::shm_file(id, seg.get("size")? as u64) {
            Ok(file) => file,
            Err(e) => {
                problems.push(format!(
                    "SysV shared memory segment {id} (key {key}) cannot be read: {e}"
                ));
                continue;
            }
        };
        // A file system without handles (huge pages): known by its id in
        // the root's namespace; a nested one's is then refused, as its
        // mappings are not matched with it.
        let path = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&file));
        if let Some(handle) = crate::dump::memory::sysv_handle(&path) {
            handles.insert(handle, id);
        }
        if seg.get("nattch")? == 0 {
            unattached.push(Unattached {
                key,
                id,
                segment,
                file,
            });
        }
    }
    let mut objects = IpcObjects::default();
    for name in IPC_LIMITS {
        // A kernel without one has no file for it.
        if let Ok(v) = pfs::read_text(format!("/proc/sys/{name}")) {
            objects
                .limits
                .insert(name.to_string(), v.trim().to_string());
        }
    }
    for set in listing("sem")? {
        let perm = set.perm()?;
        let n = set.get("nsems")? as usize;
        objects.semaphores.push(SemaphoreSet {
            values: sys::sem_values(perm.id, n)?,
            perm,
        });
    }
    for queue in listing("msg")? {
        let perm = queue.perm()?;
        let count = queue.get("qnum")? as usize;
        let bytes = queue.get("cbytes")? as usize;
        let max_bytes = sys::msg_queue_limit(perm.id)?;
        let mut messages = Vec::with_capacity(count);
        for i in 0..count {
            // No message is longer than the bytes queued.
            let (kind, text) = sys::msg_copy(perm.id, i, bytes)?;
            messages.push(Message {
                kind,
                text: crate::image::Hex(text),
            });
        }
        objects.queues.push(MessageQueue {
            perm,
            max_bytes,
            messages,
        });
    }
    let (queues, queue_dev) = posix_queues()?;
    Ok(Namespace {
        objects,
        segments,
        handles,
        unattached,
        queues,
        queue_dev,
    })
}

/// The top directory of the calling thread's IPC namespace's queue file
/// system, through a mount of it attached nowhere (its device tells the
/// namespace: every mount of it shows one).
pub fn queue_fs() -> std::io::Result<std::os::fd::OwnedFd> {
    use rustix::fs::{Mode, OFlags, openat};
    use rustix::mount::MountAttrFlags as A;
    let mnt = sys::detached_mount(
        "mqueue",
        A::MOUNT_ATTR_NOSUID | A::MOUNT_ATTR_NODEV | A::MOUNT_ATTR_NOEXEC,
    )?;
    Ok(openat(
        &mnt,
        ".",
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?)
}

/// The POSIX message queues of the calling thread's IPC namespace, each
/// open read-write and non-blocking, read through a mount of the
/// namespace's queue file system that is attached nowhere (made with
/// `fsopen`/`fsmount`: no mount table is touched, and it goes with its
/// fd).
fn posix_queues() -> std::io::Result<(Vec<(String, std::fs::File)>, u64)> {
    use rustix::fs::{Mode, OFlags, openat};
    let dir = queue_fs()?;
    let dev = rustix::fs::fstat(&dir)?.st_dev;
    let mut queues = Vec::new();
    for entry in rustix::fs::Dir::read_from(&dir)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name == "." || name == ".." {
            continue;
        }
        let fd = openat(
            &dir,
            entry.file_name(),
            OFlags::RDWR | OFlags::NONBLOCK | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        queues.push((name, std::fs::File::from(fd)));
    }
    queues.sort_by(|a, b| a.0.cmp(&b.0));
    Ok((queues, dev))
}

/// What the checkpointing process's own IPC namespace lists of SysV
/// segment `shmid`.
pub fn own_segment(shmid: i32) -> Option<Segment> {
    listing("shm")
        .ok()?
        .into_iter()
        .find(|seg| seg.get("shmid").ok() == Some(i64::from(shmid)))?
        .segment()
        .ok()
}

/// One line of a `/proc/sysvipc` table, by column name.
struct Row(BTreeMap<String, String>);

impl Row {
    fn get(&self, column: &str) -> std::io::Result<i64> {
        self.0
            .get(column)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| bad(format!("no number in column {column}")))
    }

    /// A shared memory segment's row: its mode and creator.
    fn segment(&self) -> std::io::Result<Segment> {
        Ok(Segment {
            mode: self.perm()?.mode,
            creator: self.get("cpid")? as i32,
        })
    }

    fn perm(&self) -> std::io::Result<IpcPerm> {
        let id = ["shmid", "semid", "msqid"]
            .iter()
            .find_map(|c| self.get(c).ok())
            .ok_or_else(|| bad("no id column".into()))?;
        let mode = self
            .0
            .get("perms")
            .and_then(|v| u32::from_str_radix(v, 8).ok())
            .ok_or_else(|| bad("no perms column".into()))?;
        Ok(IpcPerm {
            key: self.get("key")? as i32,
            id: id as i32,
            uid: self.get("uid")? as u32,
            gid: self.get("gid")? as u32,
            mode,
        })
    }
}

fn bad(what: String) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        format!("/proc/sysvipc: {what}"),
    )
}

/// `/proc/sysvipc/KIND` of the calling thread's namespace, a row per object.
fn listing(kind: &str) -> std::io::Result<Vec<Row>> {
    parse_listing(&pfs::read_text(format!("/proc/sysvipc/{kind}"))?)
}

/// A table whose first line names its columns.
fn parse_listing(text: &str) -> std::io::Result<Vec<Row>> {
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap_or("").split_whitespace().collect();
    lines
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let cells: Vec<&str> = l.split_whitespace().collect();
            if cells.len() < header.len() {
                return Err(bad(format!("a short line: {l:?}")));
            }
            Ok(Row(header
                .iter()
                .zip(cells)
                .map(|(h, c)| (h.to_string(), c.to_string()))
                .collect()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listing_is_read_by_its_column_names() {
        let text = "       key      semid perms      nsems   uid   gid  cuid  cgid      otime      ctime\n\
                    \x20 305419896          3   640          4     0    10     0     0          0 1700000000\n";
        let rows = parse_listing(text).unwrap();
        assert_eq!(rows.len(), 1);
        let p = rows[0].perm().unwrap();
        assert_eq!(
            (p.key, p.id, p.uid, p.gid, p.mode),
            (305419896, 3, 0, 10, 0o640)
        );
        assert_eq!(rows[0].get("nsems").unwrap(), 4);
        assert!(parse_listing("key semid perms\n1 2\n").is_err());
        let no_perms = parse_listing("key semid uid gid\n1 2 0 0\n").unwrap();
        assert!(no_perms[0].perm().is_err());
    }
}
