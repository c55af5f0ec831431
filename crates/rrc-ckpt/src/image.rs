//! The checkpoint image: plain, versioned records (JSON) plus raw page data.
//!
//! A directory holds `manifest.json` (what was checkpointed and on what
//! machine), one `process-<pid>.json` per process, and the memory contents:
//! `pages-<pid>.img` for each process's private pages and `shmem-<id>.img`
//! for each shared memory object, referenced by offset from the records.
//! Records are the whole truth about a process; a restore reads nothing else.
//!
//! A *delta* is an image directory of the same shape taken by an incremental
//! checkpoint: everything but private memory is complete, and each process's
//! pages are only those written since the previous checkpoint, plus `holes`
//! (ranges that lost their contents). Its manifest names its parent and
//! carries a checksum of every file; [`crate::store`] applies it onto the
//! image of its parent.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::ptrace::Regs;
use crate::{Error, Result};

pub const FORMAT: &str = "rrc-image";
pub const VERSION: u32 = 2;

/// The highest pid Linux hands out (`PID_MAX_LIMIT` on 64-bit machines).
pub const PID_MAX: i32 = 1 << 22;

/// What the image holds and where it was taken; checked before a restore
/// touches anything.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub version: u32,
    pub created_unix: u64,
    /// `uname -r` of the machine that took it.
    pub kernel: String,
    pub cpu: CpuInfo,
    /// The tree's root, as numbered in its own pid namespace.
    pub root: i32,
    /// Every process, parents before their children.
    pub processes: Vec<i32>,
    /// Whether the tree was the whole of its own pid namespace (a
    /// container): it is then restored into a new one, as pid 1.
    pub own_pid_ns: bool,
    /// For such a tree checkpointed by its root's pid (not a container's):
    /// that pid, the root's in the checkpointer's pid namespace, which a
    /// restore gives it again there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outer_pid: Option<i32>,
    /// The session the tree's root was started in (its own if it does not
    /// lead it, else its parent's), as the tree's pid namespace numbers it
    /// (0: outside of it). A process of
    /// the tree in that session is restored in the session the restore
    /// runs in. A process in a session that is neither this one nor led
    /// by a process of the tree is in a session whose leader has exited:
    /// the restore makes it again, with that id. `None` in images of
    /// earlier versions: no session is made again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outer_session: Option<i32>,
    /// Open file descriptions, shared by the fds that refer to them.
    pub files: Vec<OpenFile>,
    /// Shared memory objects (shared anonymous, memfd, SysV).
    pub shmem: Vec<SharedMemory>,
    /// POSIX message queues open in the tree, by index.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub posix_queues: Vec<PosixQueue>,
    /// Pseudo-terminals whose master the tree holds, by index.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ptys: Vec<Pty>,
    /// Data kept on behalf of the layer that asked for the checkpoint (for
    /// containers: name, network settings).
    pub annotations: BTreeMap<String, serde_json::Value>,
    /// For a delta: the checkpoint it follows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<Lineage>,
    /// Where this image stands in its series of checkpoints: a full
    /// checkpoint starts one, each delta (and each image a delta was applied
    /// to) carries the series on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lineage: Option<Lineage>,
    /// The firewall table holding the tree's TCP connections still while
    /// it is down (see `netlock`), lifted by the restore.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub net_lock: Option<String>,
    /// CRC-32 of every other file of a delta, by name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub checksums: BTreeMap<String, u32>,
    /// User namespaces of the tree's, children of the checkpointing
    /// process's, by index (`ProcessImage::user_ns`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub user_namespaces: Vec<userns::UserNs>,
}

/// A checkpoint within a series: its number and an identity no other
/// checkpoint of the series shares.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lineage {
    pub series: String,
    pub epoch: u64,
}

impl std::fmt::Display for Lineage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "checkpoint {} of series {}", self.epoch, self.series)
    }
}

/// The extended register state format of the CPU and kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuInfo {
    pub xsave_size: usize,
    pub xcr0: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ProcessImage {
    /// Its pid in the tree's pid namespace (every pid of the image is).
    pub pid: i32,
    /// Parent within the tree; `None` for the root.
    pub parent: Option<i32>,
    /// In a pid namespace nested in the tree's: its pids there, the
    /// outermost namespace first (its own, the innermost, last).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nested_pids: Vec<i32>,
    /// In a pid namespace nested in the tree's: that namespace's first
    /// process (its pid 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid_ns: Option<i32>,
    /// Where its next children go, when that is not its own pid
    /// namespace (after `unshare(CLONE_NEWPID)` or `setns`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub children_pid_ns: Option<ChildrenPidNs>,
    /// The first process of a UTS namespace of its own (its parent's is
    /// another): the names in it, which its descendants share.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uts: Option<UtsNames>,
    /// The first process of a cgroup namespace of its own (its parent's
    /// is another), rooted at its cgroup, which its descendants share.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub own_cgroup_ns: bool,
    /// The first process of a network namespace of its own (its parent's
    /// is another), which has a loopback interface only and its
    /// descendants share.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub own_net: Option<netns::OwnNet>,
    /// The first process of a mount namespace of its own (its parent's is
    /// another; the root: the checkpointing process's is, and the root
    /// has the same root directory), which its descendants share: how it
    /// differs from its parent's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub own_mounts: Option<mounts::MountNs>,
    /// The first process of an IPC namespace of its own (the root: the
    /// tree's, when it was not the checkpointing process's): the objects
    /// in it, but for shared memory segments (with the memory).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipc: Option<IpcObjects>,
    /// The time namespace it is in: its parent's (the root: the
    /// restorer's), the one its parent made for its children, or one of
    /// its own.
    #[serde(default, skip_serializing_if = "TimeNs::is_parents")]
    pub time_ns: TimeNs,
    /// Its next children's time namespace, when not its own (after
    /// `unshare(CLONE_NEWTIME)`): its clocks' offsets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub children_time_ns: Option<TimeOffsets>,
    /// The user namespace it is in, when not the checkpointing process's:
    /// an index of `Manifest::user_namespaces`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_ns: Option<usize>,
    /// Of the UTS, cgroup, network, IPC and mount namespaces it is the
    /// first of, those that belong to its user namespace (made in it).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub user_owned: Vec<NsKind>,
    pub pgid: i32,
    pub sid: i32,
    pub exe: String,
    pub threads: Vec<ThreadImage>,
    pub mm: MmState,
    pub vmas: Vec<Vma>,
    /// Private memory contents: runs of pages stored in `pages-<pid>.img`.
    pub pages: Vec<PageRun>,
    /// In a delta: ranges whose earlier contents are gone (discarded,
    /// unmapped and mapped again), applied before `pages`. A range without
    /// contents reads as zeros, or as the file for a private file mapping.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub holes: Vec<(u64, u64)>,
    pub fds: Vec<Fd>,
    /// Made with `CLONE_FILES`: its fd table is its parent's (`fds` then
    /// repeats the parent's).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub shares_parent_files: bool,
    /// Made with `CLONE_FILES` by a process whose table it still shares
    /// while its parent no longer does: that sibling (earlier in the
    /// tree), which forks it again with `CLONE_PARENT` (`fds` then repeats
    /// the sibling's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shares_files_with: Option<i32>,
    /// Fds of `fds` that the program did not have: each holds a file that
    /// was only in flight on a unix socket, for the restore to pass again,
    /// and is closed before the program runs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub parked: Vec<i32>,
    /// Room in its fd table (`FDSize`), given back at a restore: a table
    /// its threads share grows only after an RCU grace period (10-30 ms),
    /// so a descriptor numbered high after the restore (librrc's own)
    /// must find the room there already, as it did in the original.
    #[serde(default, skip_serializing_if = "is_zero_u32")]
    pub fd_table: u32,
    /// File locks to take again, through this process's fds, once they
    /// are in place.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub locks: Vec<FileLock>,
    /// Set for a zombie (exited, not reaped by its parent): how it ended.
    /// A zombie has no threads, memory or files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zombie: Option<Exit>,
    /// Index = signal number - 1, for signals 1..=64.
    pub sigactions: Vec<SigAction>,
    pub shared_pending: Vec<Hex>,
    pub itimers: [ITimer; 3],
    pub posix_timers: Vec<PosixTimer>,
    pub creds: Creds,
    pub rlimits: Vec<(u64, u64)>,
    pub umask: u32,
    pub cwd: String,
    /// The working directory was removed: an empty directory owned and
    /// moded like it is entered and removed again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd_deleted: Option<Owner>,
    pub root: String,
    pub personality: u64,
    pub dumpable: u64,
    pub no_new_privs: bool,
    /// The seccomp filters all its threads have, the first installed
    /// first, each instruction as [`pack_bpf`] puts it (a thread's own
    /// later ones are in [`ThreadImage::seccomp`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub seccomp: Vec<Vec<u64>>,
    /// Its main thread is in seccomp's strict mode (read, write, exit and
    /// sigreturn only): entered again as the last call of the restore.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub seccomp_strict: bool,
    pub pdeath_signal: u64,
    pub child_subreaper: bool,
    pub thp_disable: bool,
    pub keepcaps: bool,
    /// `PR_GET_SECUREBITS` (its keep-caps bit is `keepcaps`).
    #[serde(default, skip_serializing_if = "is_zero_u32")]
    pub securebits: u32,
}

/// The names of a UTS namespace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UtsNames {
    pub hostname: String,
    pub domainname: String,
}

/// The limits an IPC namespace has of its own (files under /proc/sys),
/// the only names [`IpcObjects::limits`] may hold.
pub const IPC_LIMITS: [&str; 13] = [
    "kernel/msgmax",
    "kernel/msgmnb",
    "kernel/msgmni",
    "kernel/sem",
    "kernel/shmmax",
    "kernel/shmall",
    "kernel/shmmni",
    "kernel/shm_rmid_forced",
    "fs/mqueue/msg_max",
    "fs/mqueue/msgsize_max",
    "fs/mqueue/queues_max",
    "fs/mqueue/msg_default",
    "fs/mqueue/msgsize_default",
];

/// The limits, SysV semaphore sets and message queues of an IPC
/// namespace.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpcObjects {
    /// Each limit of [`IPC_LIMITS`], as its file reads (numbers apart by
    /// spaces or tabs).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub limits: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub semaphores: Vec<SemaphoreSet>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub queues: Vec<MessageQueue>,
}

/// A SysV IPC object's key, id, owner and permissions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpcPerm {
    pub key: i32,
    pub id: i32,
    pub uid: u32,
    pub gid: u32,
    pub mode: u32,
}

/// A semaphore set and the value of each semaphore.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SemaphoreSet {
    #[serde(flatten)]
    pub perm: IpcPerm,
    pub values: Vec<u16>,
}

/// A message queue, its byte limit and its messages, the oldest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageQueue {
    #[serde(flatten)]
    pub perm: IpcPerm,
    pub max_bytes: u64,
    pub messages: Vec<Message>,
}

/// A queued message: its type and text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub kind: i64,
    pub text: Hex,
}

/// A POSIX message queue (`mq_open`) of an IPC namespace of the tree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PosixQueue {
    /// Its name ("/name", as `mq_open` takes it).
    pub name: String,
    /// The IPC namespace it is in, by the process that is the first in
    /// it; none for the root's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ns: Option<i32>,
    /// Unlinked while open: made under a name of the restore's own, then
    /// unlinked again.
    pub deleted: bool,
    pub max_messages: i64,
    pub message_size: i64,
    pub owner: Owner,
    /// Its messages in the order they are received (highest priority
    /// first, the oldest first within one).
    pub messages: Vec<PosixMessage>,
}

/// A message of a POSIX queue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PosixMessage {
    pub priority: u32,
    pub text: Hex,
}

impl PosixQueue {
    /// Whether `name` is one `mq_open` takes as a queue's own: a slash,
    /// then 1 to 255 bytes with no slash and no NUL, not "." or "..".
    pub fn valid_name(name: &str) -> bool {
        let Some(rest) = name.strip_prefix('/') else {
            return false;
        };
        !rest.is_empty()
            && rest.len() <= 255
            && !rest.contains(['/', '\0'])
            && rest != "."
            && rest != ".."
    }
}

/// Where a process's time namespace comes from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum TimeNs {
    /// Its parent's own (the root's: the restorer's).
    #[default]
    Parents,
    /// The one its parent made for its children
    /// ([`ProcessImage::children_time_ns`]).
    ParentsChildren,
    /// One of its own, first entered by it, with these offsets.
    Own { offsets: TimeOffsets },
}

impl TimeNs {
    pub fn is_parents(&self) -> bool {
        *self == TimeNs::Parents
    }
}

/// The offsets a time namespace adds to the host's clocks
/// (`/proc/PID/timens_offsets`; module `procfs` reads and writes them).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimeOffsets {
    pub monotonic: ClockOffset,
    pub boottime: ClockOffset,
}

/// One clock's offset: `secs` (negative for a clock behind the host's)
/// plus `nsecs`, below a second.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClockOffset {
    pub secs: i64,
    pub nsecs: u32,
}

/// The pid namespace a process's next children are made in, when not its
/// own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ChildrenPidNs {
    /// The nested namespace whose first process is `init`.
    Of { init: i32 },
    /// A namespace made by `unshare(CLONE_NEWPID)` with no process yet:
    /// its next child is to be the first.
    New,
}

/// How a process ended, as its parent's `waitpid` is to see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Exit {
    /// `exit(code)`.
    Code { code: u8 },
    /// Killed by `signal` (without a core dump, whatever the original did).
    Signal { signal: i32 },
}

/// A lock on (a range of) a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileLock {
    /// The fd it is taken through: a POSIX lock belongs to the process,
    /// an OFD or flock lock to the open file description behind the fd.
    pub fd: i32,
    pub kind: LockKind,
    /// A write (exclusive) lock, or a read (shared) one.
    pub write: bool,
    /// First byte locked (0 for flock).
    pub start: u64,
    /// Last byte locked; `None`: up to the end of the file, however far.
    pub end: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LockKind {
    /// `fcntl(F_SETLK)`: a record lock of the process.
    Posix,
    /// `fcntl(F_OFD_SETLK)`: a record lock of the open file description.
    Ofd,
    /// `flock`: a whole-file lock of the open file description.
    Flock,
    /// `fcntl(F_SETLEASE)`: a read or write lease of the open file
    /// description on the whole file.
    Lease,
}

impl ProcessImage {
    /// Whether it is the first of a namespace of `kind` of its own that a
    /// restore makes by unsharing it (UTS, cgroup, network, IPC, mount;
    /// time: its own or its children's).
    pub fn makes(&self, kind: NsKind) -> bool {
        match kind {
            NsKind::Uts => self.uts.is_some(),
            NsKind::Cgroup => self.own_cgroup_ns,
            NsKind::Net => self.own_net.is_some(),
            NsKind::Ipc => self.ipc.is_some(),
            NsKind::Mnt => self.own_mounts.is_some(),
            NsKind::Time => {
                matches!(self.time_ns, TimeNs::Own { .. }) || self.children_time_ns.is_some()
            }
            _ => false,
        }
    }

    /// Whether this process can make epoll `epoll`'s registration of open
    /// file `target`: it holds both (the target is put at the registered
    /// number for the while). Pidfds are registered so, once made.
    pub fn can_register(&self, epoll: usize, target: usize) -> bool {
        self.fds.iter().any(|fd| fd.file == epoll) && self.fds.iter().any(|fd| fd.file == target)
    }

    /// The process whose fd table it uses, if not its own: its parent's
    /// or a sibling's.
    pub fn table_sharer(&self) -> Option<i32> {
        if self.shares_parent_files {
            self.parent
        } else {
            self.shares_files_with
        }
    }

    /// Whether its fd table is another process's (which makes it).
    pub fn shares_table(&self) -> bool {
        self.table_sharer().is_some()
    }

    /// Whether it is in a pid namespace of its user namespace (made in
    /// it at a restore: the process is born in the user namespace, and
    /// asks for its pids in that pid namespace only). `procs` are the
    /// tree's processes.
    pub fn in_user_pid_ns(&self, procs: &BTreeMap<i32, ProcessImage>) -> bool {
        (self.pid_ns.and_then(|init| procs.get(&init)))
            .is_some_and(|init| init.user_owned.contains(&NsKind::Pid))
    }

    /// Whether it is forked in its user namespace at a restore, by a
    /// process in it then: it is in a pid namespace of its user namespace,
    /// or its parent, in the same user namespace, is in it when it forks
    /// ([`ProcessImage::in_user_when_forking`]). It then does not enter its
    /// user namespace, being in it, and makes the namespaces it makes
    /// there.
    pub fn born_in_user(&self, procs: &BTreeMap<i32, ProcessImage>) -> bool {
        self.user_ns.is_some()
            && (self.in_user_pid_ns(procs)
                || (self.parent.and_then(|q| procs.get(&q)))
                    .is_some_and(|q| q.user_ns == self.user_ns && q.in_user_when_forking(procs)))
    }

    /// Whether it enters its user namespace before anything else at a
    /// restore (not born there): to make the time namespaces its user
    /// namespace owns there, since a time namespace belongs to the user
    /// namespace its maker is in.
    pub fn enters_user_first(&self, procs: &BTreeMap<i32, ProcessImage>) -> bool {
        self.user_ns.is_some()
            && self.user_owned.contains(&NsKind::Time)
            && !self.born_in_user(procs)
    }

    /// Whether it is in its user namespace when it forks its children at a
    /// restore: born there or entered first.
    pub fn in_user_when_forking(&self, procs: &BTreeMap<i32, ProcessImage>) -> bool {
        self.born_in_user(procs) || self.enters_user_first(procs)
    }

    /// Its pid as it sees it (in its own pid namespace).
    pub fn own_pid(&self) -> i32 {
        self.nested_pids.last().copied().unwrap_or(self.pid)
    }

    /// How many pid namespaces it is nested below the tree's.
    pub fn depth(&self) -> usize {
        self.nested_pids.len()
    }

    /// `pid` (of the tree's namespace) as this process sees it, if the
    /// process `target` it names is in its pid namespace or one nested in
    /// it; `None` for a process it cannot see. A process of the tree's
    /// own namespace sees every pid as it is, in the tree or not.
    pub fn sees(&self, procs: &BTreeMap<i32, ProcessImage>, pid: i32) -> Option<i32> {
        let d = self.depth();
        if d == 0 {
            return Some(pid);
        }
        let target = procs.get(&pid)?;
        // Within its namespace: the level below the tree's at its depth.
        (target.depth() >= d && target.pid_ns_at(procs, d) == self.pid_ns)
            .then(|| target.nested_pids[d - 1])
    }

    /// Thread `tid` (of the tree's namespace) as this process sees it, as
    /// [`ProcessImage::sees`] does a process.
    pub fn sees_thread(&self, procs: &BTreeMap<i32, ProcessImage>, tid: i32) -> Option<i32> {
        let d = self.depth();
        if d == 0 {
            return Some(tid);
        }
        let (owner, th) = procs
            .values()
            .find_map(|p| p.threads.iter().find(|t| t.tid == tid).map(|t| (p, t)))?;
        self.sees(procs, owner.pid)?;
        th.nested_tids.get(d - 1).copied()
    }

    /// The first process of the namespace it is in at `depth` (1 = just
    /// below the tree's), following namespaces outwards from its own.
    fn pid_ns_at(&self, procs: &BTreeMap<i32, ProcessImage>, depth: usize) -> Option<i32> {
        let mut at = self;
        for _ in 0..=self.depth() {
            if at.depth() == depth {
                return at.pid_ns;
            }
            // The namespace's first process was made from the one above.
            at = procs
                .get(&at.pid_ns?)?
                .parent
                .and_then(|pp| procs.get(&pp))?;
        }
        None
    }
}

impl ThreadImage {
    /// Its tid as its process sees it.
    pub fn own_tid(&self) -> i32 {
        self.nested_tids.last().copied().unwrap_or(self.tid)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ThreadImage {
    /// Its tid in the tree's pid namespace.
    pub tid: i32,
    /// Its tids in the pid namespaces nested in the tree's that its
    /// process is in ([`ProcessImage::nested_pids`]), outermost first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nested_tids: Vec<i32>,
    pub comm: String,
    pub regs: Regs,
    pub xstate: Hex,
    pub sigmask: u64,
    /// Signals queued for this thread, as raw `siginfo_t`.
    pub pending: Vec<Hex>,
    pub rseq: Option<Rseq>,
    pub robust_list: (u64, u64),
    pub clear_child_tid: u64,
    pub altstack: AltStack,
    pub timer_slack_ns: u64,
    pub nice: i32,
    /// Seccomp filters this thread has after those of its process
    /// ([`ProcessImage::seccomp`]), the first installed first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub seccomp: Vec<Vec<u64>>,
    /// Its no_new_privs flag, where it is not the process's (each thread
    /// has its own: set after the thread was made).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub no_new_privs: Option<bool>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rseq {
    pub ptr: u64,
    pub size: u32,
    pub signature: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct AltStack {
    pub sp: u64,
    pub flags: i32,
    pub size: u64,
}

/// The mm fields `prctl(PR_SET_MM_MAP)` restores, plus brk and auxv.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct MmState {
    pub start_code: u64,
    pub end_code: u64,
    pub start_data: u64,
    pub end_data: u64,
    pub start_brk: u64,
    pub brk: u64,
    pub start_stack: u64,
    pub arg_start: u64,
    pub arg_end: u64,
    pub env_start: u64,
    pub env_end: u64,
    pub auxv: Vec<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vma {
    pub start: u64,
    pub end: u64,
    pub prot: u32,
    pub shared: bool,
    pub kind: VmaKind,
    /// Two-letter `VmFlags` of smaps that need restoring (madvise state:
    /// dd, dc, wf, hg, nh, mg, lo, gd).
    pub flags: Vec<String>,
}

impl Vma {
    /// The deleted file it maps, by (device, inode), and that file's owner.
    pub fn deleted_file(&self) -> Option<((u64, u64), Owner)> {
        match self.kind {
            VmaKind::File {
                dev,
                ino,
                deleted: Some(owner),
                ..
            } => Some(((dev, ino), owner)),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum VmaKind {
    /// Private anonymous memory (heap, stacks, guard pages, malloc arenas).
    Anon,
    /// A regular file mapped at `offset`.
    File {
        path: String,
        offset: u64,
        ino: u64,
        dev: u64,
        /// The file was deleted: its content is in `mapped-<dev>-<ino>.img`
        /// and it is recreated (owned and moded as it was) where the
        /// restore chooses.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        deleted: Option<Owner>,
    },
    /// A shared memory object of the manifest, mapped at `offset`.
    Shmem {
        id: usize,
        offset: u64,
    },
    Vdso,
    Vvar,
    VvarVclock,
    /// `[vsyscall]`: fixed by the kernel, nothing to do.
    Vsyscall,
    /// The completion ring of a Linux AIO context (`io_setup`), whose
    /// handle is the mapping's address; `id` is its place in the process's
    /// table of contexts. It holds `nr` events; the kernel has written up
    /// to `tail`, the program has read up to `head`, and `events` are those
    /// in between, in ring order (32 bytes each).
    AioRing {
        id: u32,
        nr: u32,
        head: u32,
        tail: u32,
        events: Hex,
    },
}

/// A pseudo-terminal pair whose master the tree holds. Its terminal end
/// is opened again through the master (`TIOCGPTPEER`), never by a path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pty {
    /// Its number (`/dev/pts/N` where its file system is mounted).
    pub index: u32,
    /// The terminal's `struct termios2` (`TCGETS2`; a master has none of
    /// its own to ask for: the call on it answers for its terminal).
    pub termios: Hex,
    /// `struct winsize` (`TIOCGWINSZ`).
    pub winsize: Hex,
    /// Packet mode (`TIOCPKT`), exclusive (`TIOCEXCL`). (A locked pair is
    /// refused: its terminal cannot be opened to be read.)
    pub packet: bool,
    pub exclusive: bool,
    /// The session (its leader's pid) whose controlling terminal it is.
    pub session: Option<i32>,
    /// Its foreground process group, as the image numbers it.
    pub foreground: Option<i32>,
    /// What the terminal's side wrote that the master had not read yet.
    pub output: Hex,
    /// What the master wrote that the terminal's programs had not read
    /// yet, the terminal in non-canonical mode (in canonical mode such
    /// input is refused: lines would not be put together again as they
    /// were).
    #[serde(default, skip_serializing_if = "Hex::is_empty")]
    pub input: Hex,
}

impl Pty {
    /// Bytes of `struct termios2` and of `struct winsize`.
    pub const TERMIOS: usize = 44;
    pub const WINSIZE: usize = 8;
    /// A terminal's input buffer (`N_TTY_BUF_SIZE`): unread input is
    /// shorter.
    pub const INPUT_MAX: usize = 4096;
}

/// A kind of namespace, as `/proc/PID/ns` names its file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NsKind {
    Cgroup,
    Ipc,
    Mnt,
    Net,
    Pid,
    Time,
    User,
    Uts,
}

impl NsKind {
    const ALL: [(NsKind, &'static str); 8] = [
        (NsKind::Cgroup, "cgroup"),
        (NsKind::Ipc, "ipc"),
        (NsKind::Mnt, "mnt"),
        (NsKind::Net, "net"),
        (NsKind::Pid, "pid"),
        (NsKind::Time, "time"),
        (NsKind::User, "user"),
        (NsKind::Uts, "uts"),
    ];

    /// Its file's name under `/proc/PID/ns`, which its link also starts
    /// with (`net:[4026531840]`).
    pub fn file(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(k, _)| *k == self)
            .map_or("", |(_, n)| n)
    }

    pub fn from_file(name: &str) -> Option<NsKind> {
        Self::ALL.iter().find(|(_, n)| *n == name).map(|(k, _)| *k)
    }
}

/// Pid namespaces of a user namespace, as a restore makes them (the pids
/// outside them set as the next ones of the tree's pid namespace): one
/// nested once in the tree's, its first process made in the user
/// namespace by its parent's helper, or one below a pid namespace of the
/// same user namespace, its first process forked by its parent there.
/// Each process in one is born in that user namespace (in no other, nor
/// in another time namespace, nor forked by a sibling sharing its fd
/// table), with its first process's supplementary groups (which it
/// inherits, and may not change there).
pub fn check_user_pid_namespaces(procs: &[&ProcessImage]) -> std::result::Result<(), String> {
    let by_pid = |pid: i32| procs.iter().find(|q| q.pid == pid).copied();
    // The first process of its pid namespace, if that is one of its user
    // namespace's.
    let user_init = |q: &ProcessImage| {
        q.pid_ns
            .and_then(by_pid)
            .filter(|init| init.user_owned.contains(&NsKind::Pid))
    };
    for p in procs {
        let pid = p.pid;
        if p.user_owned.contains(&NsKind::Pid) {
            let by_helper = p.nested_pids == [1];
            let by_parent = (p.parent.and_then(by_pid)).is_some_and(|q| {
                user_init(q).is_some() && q.user_ns == p.user_ns && p.depth() == q.depth() + 1
            });
            if p.user_ns.is_none()
                || p.nested_pids.last() != Some(&1)
                || p.pid_ns != Some(pid)
                || p.zombie.is_some()
                || !(by_helper || by_parent)
            {
                return Err(format!(
                    "process {pid} is the first of a pid namespace of its user namespace a \
                     restore does not make (nested once in the tree's or below one of the same \
                     user namespace, its first process live)"
                ));
            }
        }
        let Some(init) = user_init(p) else {
            continue;
        };
        if p.user_ns != init.user_ns
            || p.depth() != init.depth()
            || p.time_ns != TimeNs::Parents
            || p.children_time_ns.is_some()
            || p.creds.groups != init.creds.groups
            || p.shares_files_with.is_some()
        {
            return Err(format!(
                "process {pid} is in the pid namespace of a user namespace process {} is first \
                 of, in another user or time namespace, or with other supplementary groups",
                init.pid
            ));
        }
    }
    Ok(())
}

/// Time namespaces of a user namespace, as a restore makes them: by a
/// process in it that makes time namespaces (its own, its children's),
/// entering its user namespace before anything else, or born there (its
/// parent in it when it forks). A process in its user namespace from the
/// start (but those of a pid namespace of their user namespace, see
/// [`check_user_pid_namespaces`]) makes every namespace it makes there,
/// so its user namespace must own them, and is in the tree's pid
/// namespace, pointing no children at another; it forks its children in
/// the user namespace, asking for their pids there only (those in the
/// tree's pid namespace set as the next ones), so they are in its user
/// namespace, in its pid namespace or first of one of their user
/// namespace, in its session or one of their own, in its time namespace
/// for children or one of their own, and none is forked by a sibling
/// sharing its fd table.
pub fn check_user_time_namespaces(
    procs: &BTreeMap<i32, ProcessImage>,
) -> std::result::Result<(), String> {
    for p in procs.values() {
        let pid = p.pid;
        if !p.in_user_when_forking(procs) || p.in_user_pid_ns(procs) {
            continue;
        }
        let outside = [
            NsKind::Uts,
            NsKind::Cgroup,
            NsKind::Net,
            NsKind::Ipc,
            NsKind::Mnt,
            NsKind::Time,
        ]
        .into_iter()
        .any(|k| p.makes(k) && !p.user_owned.contains(&k));
        if !p.nested_pids.is_empty()
            || p.children_pid_ns.is_some()
            || outside
            || p.zombie.is_some()
            || procs.values().any(|q| q.shares_files_with == Some(pid))
        {
            return Err(format!(
                "process {pid}, in its user namespace from the start at a restore (to make time \
                 namespaces there), is in a nested pid namespace, points its children at \
                 another, makes namespaces its user namespace does not own or has siblings \
                 forked into its fd table"
            ));
        }
        for c in procs.values().filter(|c| c.parent == Some(pid)) {
            let time_ok = match c.time_ns {
                TimeNs::Parents => p.children_time_ns.is_none(),
                TimeNs::ParentsChildren | TimeNs::Own { .. } => true,
            };
            if c.user_ns != p.user_ns
                || !(c.nested_pids.is_empty() || c.user_owned.contains(&NsKind::Pid))
                || !(c.sid == p.sid || c.sid == c.pid)
                || !time_ok
            {
                return Err(format!(
                    "process {}, a child of process {pid}, which is in its user namespace from \
                     the start at a restore (to make time namespaces there), is in another user \
                     namespace, pid namespace, session or time namespace than it is forked in",
                    c.pid
                ));
            }
        }
    }
    Ok(())
}

pub mod mounts;
pub mod netns;
pub mod userns;

/// The layout of an AIO completion ring (`struct aio_ring` of
/// `linux/aio.h`, followed by its `struct io_event`s), defined here only.
pub mod aio_ring {
    /// Bytes of the ring's header.
    pub const HEADER: usize = 32;
    /// Bytes of one event.
    pub const EVENT: usize = 32;
    /// `aio_ring::magic`.
    pub const MAGIC: u32 = 0xa10a_10a1;
    /// Offsets of the header's fields.
    pub const ID: usize = 0;
    pub const NR: usize = 4;
    pub const HEAD: usize = 8;
    pub const TAIL: usize = 12;
    pub const MAGIC_AT: usize = 16;
    pub const COMPAT_AT: usize = 20;
    pub const INCOMPAT_AT: usize = 24;
    pub const HEADER_LENGTH_AT: usize = 28;

    /// How many events a ring of `len` bytes holds.
    pub fn capacity(len: u64) -> u64 {
        len.saturating_sub(HEADER as u64) / EVENT as u64
    }

    /// The `nr_events` to give `io_setup` for a ring of `capacity` events:
    /// the kernel makes that at least four per possible CPU, doubles it,
    /// adds two, and fills the pages that needs (`aio_setup_ring`), so the
    /// largest request that fits the same pages gives the same ring.
    pub fn setup_request(capacity: u64) -> u64 {
        capacity.saturating_sub(2) / 2
    }

    /// Contexts a process may have, and so the ids a ring may have (the
    /// kernel's own bound is the machine's `fs.aio-max-nr` requests).
    pub const MAX_CONTEXTS: u32 = 4096;

    /// Whether a ring of `len` bytes recorded as `id`, `nr`, `head`, `tail`
    /// with `events` bytes of pending events is one the kernel makes; what
    /// is wrong with it if not.
    pub fn check(
        len: u64,
        id: u32,
        nr: u32,
        head: u32,
        tail: u32,
        events: usize,
    ) -> Result<(), String> {
        if u64::from(nr) != capacity(len) || nr < 2 || head >= nr || tail >= nr {
            return Err(format!(
                "an AIO ring of {len} bytes has nr {nr}, head {head}, tail {tail}"
            ));
        }
        if id >= MAX_CONTEXTS {
            return Err(format!(
                "an AIO ring has id {id}: more than {MAX_CONTEXTS} contexts"
            ));
        }
        let pending = pending(nr, head, tail);
        if events as u64 != pending * EVENT as u64 {
            return Err(format!(
                "an AIO ring with {pending} events pending has {events} bytes of them"
            ));
        }
        Ok(())
    }

    /// [`check`] of mapping `v`, if it is an AIO ring.
    pub fn check_vma(v: &super::Vma) -> Result<(), String> {
        match &v.kind {
            super::VmaKind::AioRing {
                id,
                nr,
                head,
                tail,
                events,
            } => check(v.end - v.start, *id, *nr, *head, *tail, events.0.len()),
            _ => Ok(()),
        }
    }

    /// Unreaped events from `head` to `tail` in a ring of `nr`.
    pub fn pending(nr: u32, head: u32, tail: u32) -> u64 {
        if tail >= head {
            u64::from(tail - head)
        } else {
            u64::from(nr).saturating_sub(u64::from(head)) + u64::from(tail)
        }
    }
}

/// A file's handle (`name_to_handle_at`) and the mount it was seen on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileHandle {
    pub mount_id: i32,
    pub ty: i32,
    pub bytes: Hex,
}

/// Who owns a file and its permission bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    pub uid: u32,
    pub gid: u32,
    pub mode: u32,
}

/// A run of `count` consecutive pages at `start`, stored at `offset` of the
/// process's pages file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageRun {
    pub start: u64,
    pub count: u64,
    pub offset: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SharedMemory {
    pub id: usize,
    pub kind: ShmemKind,
    pub size: u64,
    /// Device and inode on the checkpointed machine (identity only).
    pub dev: u64,
    pub ino: u64,
    /// Contents: runs whose `start` is an offset in the object.
    pub pages: Vec<PageRun>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ShmemKind {
    /// `MAP_SHARED | MAP_ANONYMOUS`.
    Anon,
    Memfd {
        name: String,
        seals: u32,
    },
    SysV {
        key: i32,
        shmid: i32,
        mode: u32,
        /// The process of the tree that made it, if one did (`shm_cpid`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        creator: Option<i32>,
        /// The IPC namespace it is in, by the process that is the first in
        /// it; none for the root's.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ns: Option<i32>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fd {
    pub fd: i32,
    pub file: usize,
    pub cloexec: bool,
}

/// An open file description.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpenFile {
    pub id: usize,
    /// `O_*` status flags (access mode, append, nonblock...).
    pub flags: u32,
    pub kind: FileKind,
    /// Who is sent the file's I/O signals (`F_SETOWN_EX`), if anyone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<FileOwner>,
    /// The signal sent instead of SIGIO (`F_SETSIG`); 0 for SIGIO.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub signal: i32,
}

fn is_zero(v: &i32) -> bool {
    *v == 0
}

fn is_zero_u32(v: &u32) -> bool {
    *v == 0
}

/// The owner of an open file's I/O signals, numbered in the tree's own pid
/// namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileOwner {
    pub kind: OwnerKind,
    pub id: i32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OwnerKind {
    /// One thread (`F_OWNER_TID`).
    Thread,
    /// A whole process (`F_OWNER_PID`).
    Process,
    /// A process group (`F_OWNER_PGRP`).
    Group,
}

impl OwnerKind {
    /// The `f_owner_ex` type this kind is.
    pub fn raw(self) -> i32 {
        match self {
            OwnerKind::Thread => 0,
            OwnerKind::Process => 1,
            OwnerKind::Group => 2,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum FileKind {
    Regular {
        path: String,
        pos: u64,
        /// Deleted while open: its content is in `file-<id>.img`, and it is
        /// recreated at its path, reopened and unlinked again.
        deleted: bool,
        size: u64,
        mode: u32,
        /// A deleted file's identity and owner: its mappings share the
        /// file recreated for it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ghost: Option<(u64, u64, Owner)>,
        /// A deleted file with links left elsewhere: the kernel's handle of
        /// it, to open that very file again (the saved content stands in
        /// if it cannot be).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        handle: Option<FileHandle>,
    },
    Directory {
        path: String,
        /// Removed while open: an empty directory is made and removed
        /// again where the restore chooses.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        deleted: Option<Owner>,
    },
    CharDevice {
        path: String,
        rdev: u64,
    },
    /// An open file of `/dev/net/tun` (device `rdev`, opened at `path`)
    /// attached to interface `iface` of its holder's network namespace,
    /// one the tree made ([`OwnNet::tuns`]): opened again and attached
    /// with `TUNSETIFF`.
    Tun {
        path: String,
        rdev: u64,
        iface: String,
        /// What `TUNGETIFF` gave: its interface's flags (`IFF_TUN` or
        /// `IFF_TAP`, `IFF_MULTI_QUEUE`, `IFF_PERSIST`...), with the bit of
        /// `IFF_NO_PI` also set for a file without a socket filter.
        flags: u16,
        /// Its send buffer (`TUNGETSNDBUF`), where not the default.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        sndbuf: Option<i32>,
        /// With `IFF_VNET_HDR`: its interface's header and offloads.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        vnet: Option<netns::VnetHdr>,
    },
    /// The master of pseudo-terminal `pty` ([`Manifest::ptys`]).
    PtyMaster {
        pty: usize,
    },
    /// A description of the terminal of pseudo-terminal `pty`, whose
    /// master the tree holds.
    PtyTerminal {
        pty: usize,
    },
    /// A pseudo-terminal whose master is outside the tree (the terminal
    /// the tree was started from), held at a stdio fd: the restorer's
    /// stdio at that fd stands in, as for a pipe to a process outside.
    OuterTerminal {
        path: String,
        rdev: u64,
    },
    /// A named pipe; unread data (of the pipe object `pipe`) is in
    /// `pipe-<pipe>.img` (no such file: none).
    Fifo {
        path: String,
        pipe: u64,
    },
    /// One end of a pipe; `pipe` numbers the pipe object (its inode) and its
    /// unread data is in `pipe-<pipe>.img` (no such file: none).
    Pipe {
        pipe: u64,
        write_end: bool,
        capacity: u32,
        /// A packet-mode pipe holding several packets: their lengths.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        packets: Vec<u32>,
        /// The pipe's other side had no end open anywhere.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        peer_closed: bool,
    },
    EventFd {
        count: u64,
        semaphore: bool,
    },
    SignalFd {
        mask: u64,
    },
    TimerFd {
        clock: i32,
        interval_ns: u64,
        value_ns: u64,
        ticks: u64,
    },
    Epoll {
        targets: Vec<EpollTarget>,
    },
    /// A pidfd (`pidfd_open`, `CLONE_PIDFD`) of process `pid` of the tree,
    /// or of its thread `pid` when the flags hold `PIDFD_THREAD`
    /// (`O_EXCL`), as the tree numbers them. Made again once the whole
    /// tree exists, one per fd that held it.
    PidFd {
        pid: i32,
    },
    /// A namespace file (`/proc/PID/ns/NAME`) of a namespace process `pid`
    /// of the tree is in, as the tree numbers it. Made again once the
    /// whole tree exists, one per fd that held it, from that process's
    /// file.
    NsFile {
        ns: NsKind,
        pid: i32,
    },
    /// A pidfd of a process (or, with `O_EXCL` in the flags, a thread)
    /// that had exited and been reaped: it names no pid any more. Its wait
    /// status as `PIDFD_GET_INFO` reports it (`None` where the kernel does
    /// not keep it). Made again from a process of the engine's that ends
    /// the same way and is reaped.
    PidFdReaped {
        status: Option<i32>,
    },
    /// An inotify instance and its watches. Events it had queued are not
    /// kept.
    Inotify {
        watches: Vec<InotifyWatch>,
    },
    /// A fanotify group (`fanotify_init` flags and event flags) and its
    /// marks, the first made first. Events it had queued are not kept.
    Fanotify {
        init_flags: u32,
        event_flags: u32,
        marks: Vec<FanotifyMark>,
    },
    /// A description of POSIX message queue `queue`
    /// ([`Manifest::posix_queues`]); its access mode and `O_NONBLOCK` are
    /// the open file's flags.
    PosixQueue {
        queue: usize,
    },
    /// A memfd (its memory is shared object `shmem`).
    Memfd {
        shmem: usize,
        pos: u64,
    },
    TcpListen {
        addr: String,
        backlog: u32,
        options: Vec<SockOpt>,
    },
    /// A TCP connection; `data` holds its send queue then its receive
    /// queue.
    Tcp {
        local: String,
        peer: String,
        tcp: crate::tcp::TcpState,
        options: Vec<SockOpt>,
        data: Blob,
    },
    /// A listening unix socket (inode `ino`). Connections not yet
    /// accepted are in `pending`, by the inode of their client (as
    /// sock_diag names them; the client's own peer, the server end not yet
    /// accepted, has no inode and shows as 0), in the order they will be
    /// accepted: each is made again by its client (a socket of the tree,
    /// with nothing sent yet) connecting anew.
    UnixListen {
        ty: i32,
        name: crate::unixdiag::UnixName,
        backlog: u32,
        #[serde(default)]
        ino: u32,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        pending: Vec<u32>,
        #[serde(default)]
        options: Vec<SockOpt>,
    },
    /// A connected unix socket (inode `ino`, connected to inode `peer`;
    /// 0 when that socket has been closed, or is outside the tree and
    /// comes back closed). What it had queued to read is in `data`, as
    /// consecutive messages of the lengths given (one run for a stream
    /// socket).
    UnixConnected {
        ty: i32,
        ino: u32,
        peer: u32,
        name: Option<crate::unixdiag::UnixName>,
        /// The peer's address, for a datagram socket connected to a
        /// socket that is not connected back (reconnected by name).
        peer_name: Option<crate::unixdiag::UnixName>,
        messages: Vec<u32>,
        data: Blob,
        /// A datagram socket's: who sent each message in `messages`
        /// (`None`: a socket without a name). Empty in older images.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        senders: Vec<Option<crate::unixdiag::UnixName>>,
        /// `SHUT_RD` (1) and `SHUT_WR` (2) as the kernel keeps them for
        /// this end.
        #[serde(default)]
        shutdown: u8,
        #[serde(default)]
        options: Vec<SockOpt>,
        /// Files passed with SCM_RIGHTS in the messages queued, not yet
        /// received (none on a datagram socket connected by name).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        in_flight: Vec<InFlight>,
    },
    /// An unconnected unix socket (inode `ino`), bound or not; a bound
    /// datagram socket keeps the messages queued to it (in `data`, of the
    /// lengths given).
    Unix {
        ty: i32,
        name: Option<crate::unixdiag::UnixName>,
        #[serde(default)]
        messages: Vec<u32>,
        #[serde(default)]
        data: Blob,
        #[serde(default)]
        ino: u32,
        #[serde(default)]
        options: Vec<SockOpt>,
        /// Files passed with SCM_RIGHTS in the messages queued, not yet
        /// received.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        in_flight: Vec<InFlight>,
    },
    /// An unconnected TCP socket, a TCP socket connecting (`SYN_SENT`: both
    /// addresses), or a UDP socket (bound and/or connected).
    Inet {
        family: i32,
        ty: i32,
        local: Option<String>,
        peer: Option<String>,
        options: Vec<SockOpt>,
    },
}

impl FileKind {
    /// The files in flight on a unix socket's queue.
    pub fn in_flight(&self) -> &[InFlight] {
        match self {
            FileKind::UnixConnected { in_flight, .. } | FileKind::Unix { in_flight, .. } => {
                in_flight
            }
            _ => &[],
        }
    }

    /// The inode of a unix socket (listening, unconnected or connected);
    /// `None` for any other file.
    pub fn unix_ino(&self) -> Option<u32> {
        match self {
            FileKind::UnixConnected { ino, .. }
            | FileKind::Unix { ino, .. }
            | FileKind::UnixListen { ino, .. } => Some(*ino),
            _ => None,
        }
    }
}

/// The highest inotify watch descriptor a restore reaches: it gets there
/// by using up every number below it, one system call pair each.
pub const INOTIFY_MAX_WD: i32 = 1 << 16;

/// Files in flight on a unix socket: passed with SCM_RIGHTS along with
/// queued message `message` (an index into its `messages`), as open files
/// of the image in the order they were passed. A file no process holds
/// is held for the restore at a parked fd ([`ProcessImage::parked`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InFlight {
    pub message: u32,
    pub files: Vec<usize>,
}

/// One watch of an inotify instance: watch descriptor `wd` on the file at
/// `path`, for the events of `mask` (with `IN_ONESHOT`, `IN_EXCL_UNLINK`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InotifyWatch {
    pub wd: i32,
    pub mask: u32,
    pub path: String,
    /// Set when the file watched had been deleted: its (device, inode),
    /// the key of a deleted file an fd of the tree holds open
    /// ([`FileKind::Regular`]'s `ghost`), whose recreation is watched.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deleted: Option<(u64, u64)>,
}

/// A fanotify mark: on the file at `path`, or on the mount or the whole
/// filesystem at that mount point (`on`), for the events of `mask` and not
/// those of `ignored_mask`, with the mark's own flags
/// (`FAN_MARK_IGNORED_SURV_MODIFY`, `FAN_MARK_EVICTABLE`, `FAN_MARK_IGNORE`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FanotifyMark {
    pub path: String,
    pub on: MarkOn,
    pub mflags: u32,
    pub mask: u32,
    pub ignored_mask: u32,
    /// As [`InotifyWatch::deleted`], for a mark on a file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deleted: Option<(u64, u64)>,
}

/// What a fanotify mark is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MarkOn {
    File,
    Mount,
    Filesystem,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EpollTarget {
    /// The fd number it was registered under (part of its key, even if
    /// that fd has been closed since).
    pub fd: i32,
    pub events: u32,
    pub data: u64,
    /// The open file watched: a registration belongs to the open file,
    /// whatever fds it has now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct SigAction {
    pub handler: u64,
    pub flags: u64,
    pub restorer: u64,
    pub mask: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ITimer {
    pub interval_us: u64,
    pub value_us: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PosixTimer {
    pub id: i32,
    pub clock: i32,
    pub signal: i32,
    /// SIGEV_* notification and its target thread (for SIGEV_THREAD_ID).
    pub notify: i32,
    pub notify_tid: i32,
    pub sigval: u64,
    pub interval_ns: u64,
    pub value_ns: u64,
    pub overrun: i32,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Creds {
    pub uid: [u32; 4],
    pub gid: [u32; 4],
    pub groups: Vec<u32>,
    pub cap_inh: u64,
    pub cap_prm: u64,
    pub cap_eff: u64,
    pub cap_bnd: u64,
    pub cap_amb: u64,
}

/// A run of bytes in the image's `sockets.img` (queued socket data).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Blob {
    pub offset: u64,
    pub len: u64,
}

/// A socket option as a checkpoint keeps it: level, name, value (see
/// `sockopt` for which are kept).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SockOpt(pub i32, pub i32, pub OptValue);

/// An option's value: an `int`, or the bytes of a C structure or name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum OptValue {
    Int(i32),
    Bytes(Hex),
}

/// Bytes kept as a hex string in the JSON records.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Hex(pub Vec<u8>);

impl Hex {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl std::fmt::Debug for Hex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Hex({} bytes)", self.0.len())
    }
}

impl Serialize for Hex {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        let mut out = String::with_capacity(self.0.len() * 2);
        for b in &self.0 {
            out.push_str(&format!("{b:02x}"));
        }
        s.serialize_str(&out)
    }
}

impl<'de> Deserialize<'de> for Hex {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Hex, D::Error> {
        let s = String::deserialize(d)?;
        // Pairs of bytes, not of characters: a character beyond ASCII in
        // a corrupted image must be refused, not split.
        if s.len() % 2 != 0 {
            return Err(serde::de::Error::custom("odd-length hex"));
        }
        let digit = |b: u8| (b as char).to_digit(16);
        s.as_bytes()
            .chunks(2)
            .map(|p| match (digit(p[0]), digit(p[1])) {
                (Some(h), Some(l)) => Ok((h * 16 + l) as u8),
                _ => Err(serde::de::Error::custom(format!(
                    "not a hexadecimal byte: {:?}",
                    String::from_utf8_lossy(p)
                ))),
            })
            .collect::<std::result::Result<Vec<u8>, _>>()
            .map(Hex)
    }
}

/// An image directory.
#[derive(Debug, Clone)]
pub struct ImageDir {
    dir: PathBuf,
    /// The socket data, once opened: read through this handle also where
    /// the image's path does not resolve (a thread that sees a restored
    /// container's files, not the host's).
    socket_data: std::sync::OnceLock<std::sync::Arc<fs::File>>,
}

/// A name that stays in the directory it is joined to: one path component,
/// not `.` or `..`, without NUL.
pub fn is_plain_file_name(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.contains(['/', '\0'])
}

impl ImageDir {
    pub fn new(dir: &Path) -> ImageDir {
        ImageDir {
            dir: dir.into(),
            socket_data: Default::default(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Prepares an empty directory for a new image (creating it if needed).
    /// An image holds a process's memory: the directory is made readable
    /// by its owner only.
    pub fn create(dir: &Path) -> Result<ImageDir> {
        use std::os::unix::fs::PermissionsExt;
        fs::create_dir_all(dir).map_err(|e| Error::image(dir, e))?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
            .map_err(|e| Error::image(dir, e))?;
        let nonempty = fs::read_dir(dir)
            .map_err(|e| Error::image(dir, e))?
            .next()
            .is_some();
        if nonempty {
            return Err(Error::ImageDirNotEmpty(dir.into()));
        }
        Ok(ImageDir::new(dir))
    }

    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    pub fn pages_file(&self, pid: i32) -> PathBuf {
        self.file(&format!("pages-{pid}.img"))
    }

    /// The size of the page files of the processes the manifest lists:
    /// about the private memory a restore fills. Nothing is checked here.
    pub fn pages_bytes(&self) -> Result<u64> {
        let m = self.read_manifest()?;
        Ok(m.processes
            .iter()
            .filter_map(|&pid| fs::metadata(self.pages_file(pid)).ok())
            .map(|meta| meta.len())
            .sum())
    }

    pub fn shmem_file(&self, id: usize) -> PathBuf {
        self.file(&format!("shmem-{id}.img"))
    }

    /// Makes every file of the image durable, and the directory that
    /// names them: before the process it saves is killed, the image must
    /// be on disk.
    pub fn sync(&self) -> Result<()> {
        let rd = fs::read_dir(&self.dir).map_err(|e| Error::image(&self.dir, e))?;
        for e in rd {
            let e = e.map_err(|e| Error::image(&self.dir, e))?;
            let path = e.path();
            if e.file_type().is_ok_and(|t| t.is_file()) {
                fs::File::open(&path)
                    .and_then(|f| f.sync_all())
                    .map_err(|e| Error::image(&path, e))?;
            }
        }
        fs::File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| Error::image(&self.dir, e))
    }

    pub fn write_json<T: Serialize>(&self, name: &str, value: &T) -> Result<()> {
        let path = self.file(name);
        let bytes = serde_json::to_vec_pretty(value).expect("image records serialize");
        let mut f = fs::File::create(&path).map_err(|e| Error::image(&path, e))?;
        f.write_all(&bytes).map_err(|e| Error::image(&path, e))?;
        Ok(())
    }

    /// Writes `bytes` as file `name` in place of the one there: a new
    /// file renamed over it, so that an image whose files are hard links
    /// to another image's never writes into that other image.
    pub fn replace_file(&self, name: &str, bytes: &[u8]) -> Result<()> {
        let path = self.file(name);
        let new = self.file(&format!(".{name}.new"));
        fs::write(&new, bytes).map_err(|e| Error::image(&new, e))?;
        fs::rename(&new, &path).map_err(|e| {
            let _ = fs::remove_file(&new);
            Error::image(&path, e)
        })
    }

    /// Overwrites byte ranges (offset, bytes) of file `name`, in a copy of
    /// it renamed over it as [`ImageDir::replace_file`] does.
    pub fn patch_file(&self, name: &str, patches: &[(u64, &[u8])]) -> Result<()> {
        use std::os::unix::fs::FileExt;
        let path = self.file(name);
        let new = self.file(&format!(".{name}.new"));
        let patched = fs::copy(&path, &new)
            .map_err(|e| Error::image(&path, e))
            .and_then(|_| {
                let f = fs::OpenOptions::new()
                    .write(true)
                    .open(&new)
                    .map_err(|e| Error::image(&new, e))?;
                for (at, bytes) in patches {
                    f.write_all_at(bytes, *at)
                        .map_err(|e| Error::image(&new, e))?;
                }
                Ok(())
            })
            .and_then(|()| fs::rename(&new, &path).map_err(|e| Error::image(&path, e)));
        if patched.is_err() {
            let _ = fs::remove_file(&new);
        }
        patched
    }

    /// [`ImageDir::write_json`] in place of the record there, as
    /// [`ImageDir::replace_file`] does it.
    pub fn replace_json<T: Serialize>(&self, name: &str, value: &T) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(value).expect("image records serialize");
        self.replace_file(name, &bytes)
    }

    pub fn read_json<T: DeserializeOwned>(&self, name: &str) -> Result<T> {
        let path = self.file(name);
        let bytes = fs::read(&path).map_err(|e| Error::image(&path, e))?;
        serde_json::from_slice(&bytes).map_err(|e| Error::CorruptImage {
            path,
            detail: e.to_string(),
        })
    }

    pub fn read_manifest(&self) -> Result<Manifest> {
        let m: Manifest = self.read_json("manifest.json")?;
        if m.format != FORMAT || m.version != VERSION {
            return Err(Error::CorruptImage {
                path: self.file("manifest.json"),
                detail: format!(
                    "format {} version {} (this rrc reads {FORMAT} version {VERSION})",
                    m.format, m.version
                ),
            });
        }
        // The files a checkpoint of a series lists are read, copied and
        // written by their names: each must be a file of this directory,
        // never a path that leads out of it.
        if let Some(bad) = m.checksums.keys().find(|n| !is_plain_file_name(n)) {
            return Err(Error::CorruptImage {
                path: self.file("manifest.json"),
                detail: format!("it lists a file named {bad:?}, which is not a plain file name"),
            });
        }
        Ok(m)
    }

    pub fn file_data(&self, id: usize) -> PathBuf {
        self.file(&format!("file-{id}.img"))
    }

    /// Queued socket data of the whole image.
    pub fn socket_data(&self) -> PathBuf {
        self.file("sockets.img")
    }

    /// The socket data file, opened once.
    pub fn open_socket_data(&self) -> Result<&fs::File> {
        if let Some(f) = self.socket_data.get() {
            return Ok(f);
        }
        let path = self.socket_data();
        let f = fs::File::open(&path).map_err(|e| Error::image(&path, e))?;
        Ok(self.socket_data.get_or_init(|| std::sync::Arc::new(f)))
    }

    /// The content of a deleted file a process had mapped.
    pub fn mapped_data(&self, dev: u64, ino: u64) -> PathBuf {
        self.file(&format!("mapped-{dev}-{ino}.img"))
    }

    /// The contents of the files of file system `n` that process `pid`'s
    /// mount namespace made (`mounts::MountOp::Tmpfs`).
    pub fn mount_data(&self, pid: i32, n: usize) -> PathBuf {
        self.file(&format!("mount-{pid}-{n}.img"))
    }

    pub fn pipe_data(&self, pipe: u64) -> PathBuf {
        self.file(&format!("pipe-{pipe}.img"))
    }

    pub fn process_name(pid: i32) -> String {
        format!("process-{pid}.json")
    }
}

/// The most instructions a seccomp filter may have (`BPF_MAXINSNS`).
pub const SECCOMP_FILTER_MAX: usize = 4096;

/// One classic BPF instruction in a u64: code, jt, jf, k from the lowest
/// bits up.
pub fn pack_bpf(i: &libc::sock_filter) -> u64 {
    u64::from(i.code) | u64::from(i.jt) << 16 | u64::from(i.jf) << 24 | u64::from(i.k) << 32
}

pub fn unpack_bpf(v: u64) -> libc::sock_filter {
    libc::sock_filter {
        code: v as u16,
        jt: (v >> 16) as u8,
        jf: (v >> 24) as u8,
        k: (v >> 32) as u32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The ring `io_setup(n)` makes, as `aio_setup_ring` sizes it.
    fn kernel_ring(n: u64, cpus: u64) -> u64 {
        let events = n.max(cpus * 4) * 2 + 2;
        let pages = (aio_ring::HEADER as u64 + events * aio_ring::EVENT as u64).div_ceil(4096);
        aio_ring::capacity(pages * 4096)
    }

    #[test]
    fn an_aio_ring_is_made_again_with_its_size() {
        for cpus in [1, 2, 8, 64] {
            for n in 1..3000 {
                let nr = kernel_ring(n, cpus);
                let again = aio_ring::setup_request(nr);
                assert_eq!(kernel_ring(again, cpus), nr, "io_setup({n}) on {cpus} CPUs");
                assert!(again >= n, "no fewer requests than asked for");
            }
        }
    }

    #[test]
    fn an_aio_ring_that_is_not_the_kernels_is_refused() {
        use aio_ring::check;
        let page = 4096;
        assert!(check(page, 0, 127, 3, 1, 127 * 32 - 2 * 32).is_ok());
        assert!(check(page, 0, 127, 5, 5, 0).is_ok());
        assert!(check(page, 0, 126, 0, 0, 0).is_err(), "nr beyond the size");
        assert!(
            check(page, 0, 127, 127, 0, 0).is_err(),
            "head out of the ring"
        );
        assert!(
            check(page, 0, 127, 0, 200, 0).is_err(),
            "tail out of the ring"
        );
        assert!(check(page, 0, 127, 0, 2, 32).is_err(), "events missing");
        assert!(check(page, 5000, 127, 0, 0, 0).is_err(), "id out of bounds");
        assert_eq!(aio_ring::pending(127, 200, 3), 3, "no wrap below zero");
    }

    #[test]
    fn a_queue_name_is_one_mq_open_takes() {
        let long = format!("/{}", "q".repeat(255));
        for good in ["/q", "/fx_mq.42", "/...", long.as_str()] {
            assert!(PosixQueue::valid_name(good), "{good:?}");
        }
        let too_long = format!("/{}", "q".repeat(256));
        for bad in [
            "",
            "/",
            "q",
            "/a/b",
            "/.",
            "/..",
            "/a\0b",
            "//",
            too_long.as_str(),
        ] {
            assert!(!PosixQueue::valid_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn bpf_instructions_pack_and_unpack_unchanged() {
        let i = libc::sock_filter {
            code: 0x15,
            jt: 3,
            jf: 250,
            k: 0xdead_beef,
        };
        let back = unpack_bpf(pack_bpf(&i));
        assert_eq!(
            (back.code, back.jt, back.jf, back.k),
            (i.code, i.jt, i.jf, i.k)
        );
    }

    #[test]
    fn hex_round_trip() {
        let h = Hex(vec![0, 1, 0xab, 0xff]);
        let s = serde_json::to_string(&h).unwrap();
        assert_eq!(s, "\"0001abff\"");
        assert_eq!(serde_json::from_str::<Hex>(&s).unwrap(), h);
        assert!(serde_json::from_str::<Hex>("\"abc\"").is_err());
        assert!(serde_json::from_str::<Hex>("\"zz\"").is_err());
        // A character beyond ASCII (two bytes in UTF-8) is refused, not
        // split in the middle.
        assert!(serde_json::from_str::<Hex>("\"a\u{e9}b\"").is_err());
        assert!(serde_json::from_str::<Hex>("\"\u{e9}\u{e9}\"").is_err());
        assert!(serde_json::from_str::<Hex>("\"+1\"").is_err());
    }
}
