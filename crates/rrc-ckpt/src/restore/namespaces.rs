//! Namespaces of the tree's own, made again. A UTS namespace: its first
//! process unshares one and names it before its children are forked; a
//! cgroup namespace: its first process unshares one where it is. Pid
//! namespaces nested in the tree's: the first process of each is forked
//! with `CLONE_NEWPID`, every process and thread with its pids at every
//! level (`clone3`'s `set_tid`, the innermost first), and a parent whose
//! next children go elsewhere than its own namespace is pointed there
//! (`setns` with a pidfd) or unshared once its children are made. Time
//! namespaces: a process first in one of its own unshares one for its
//! children, gives it its offsets and enters it; one whose children go to
//! another unshares that before its children are forked, and a child that
//! is to stay in its parent's own goes back there through an fd of it the
//! parent opened before the fork. User namespaces: made before the tree
//! by a child of ours with their owner's uid, their maps written from
//! here; each process in one enters it once its children are forked
//! (their pids need rights over the tree's pid namespace it leaves
//! outside), before its fds are put in place and it takes its
//! credentials again; the processes of a pid namespace of a user namespace
//! are born in it instead (`restore::fork_into_user_pid_ns`), asking for
//! their pids there, those in the tree's set as the next ones ([`NextPids`]).

use std::collections::BTreeMap;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use crate::image::userns::IdKind;
use crate::image::{
    ChildrenPidNs, Manifest, NsKind, ProcessImage, ThreadImage, TimeNs, TimeOffsets, UtsNames,
};
use crate::restore::tracee::Tracee;
use crate::{Error, Result};

/// Pid namespaces below the host's the kernel allows (`MAX_PID_NS_LEVEL`).
const MAX_NESTING: usize = 32;

/// The longest host or domain name (`__NEW_UTS_LEN`).
const UTS_LEN: usize = 64;

/// Makes `t` (process `p`) the first process of the UTS, cgroup, network,
/// IPC (unless it has its own already: `has_ipc`) and mount namespaces it
/// is the first of, new and empty (a cgroup namespace rooted where it is,
/// a copy of its parent's mounts), for the code of each kind to fill:
/// unshared at once, but those that belong to its user namespace (one of
/// `users`), which a child of its unshares in that namespace and `t`
/// enters (unless `t` is in it already: `in_user`).
pub fn make_own(
    t: &mut Tracee,
    p: &ProcessImage,
    has_ipc: bool,
    in_user: bool,
    users: &[OwnedFd],
    transport: &crate::restore::sockets::Transport,
) -> Result<()> {
    let (mut here, mut made_in_user) = (0, 0);
    for (kind, flag) in [
        (NsKind::Uts, libc::CLONE_NEWUTS),
        (NsKind::Cgroup, libc::CLONE_NEWCGROUP),
        (NsKind::Net, libc::CLONE_NEWNET),
        (NsKind::Ipc, libc::CLONE_NEWIPC),
        (NsKind::Mnt, libc::CLONE_NEWNS),
    ] {
        if !p.makes(kind) || (kind == NsKind::Ipc && has_ipc) {
            continue;
        }
        if p.user_owned.contains(&kind) && !in_user {
            made_in_user |= flag as u64;
        } else {
            here |= flag as u64;
        }
    }
    if here != 0 {
        t.call("unshare (its namespaces)", libc::SYS_unshare, &[here])?;
    }
    match p.user_ns.and_then(|i| users.get(i)) {
        Some(user) if made_in_user != 0 => {
            made_in_user_ns(t, made_in_user, user.as_fd(), transport)
        }
        _ => Ok(()),
    }
}

/// Puts `t` in new namespaces of `flags` that belong to user namespace
/// `user`: a child of `t` enters that one and unshares them, `t` enters
/// them through a pidfd of the child, and the child ends. `t` stays where
/// it is as to users, with every right over them.
fn made_in_user_ns(
    t: &mut Tracee,
    flags: u64,
    user: BorrowedFd<'_>,
    transport: &crate::restore::sockets::Transport,
) -> Result<()> {
    let mut h = super::fork_child(t, &[], 0)?;
    let made = (|| -> Result<()> {
        crate::ptrace::set_sigmask(h.pid, crate::common::BLOCK_ALL)?;
        let fd = transport.pass(&mut h, user)?;
        h.call(
            "setns (user namespace)",
            libc::SYS_setns,
            &[fd, libc::CLONE_NEWUSER as u64],
        )?;
        h.call(
            "unshare (namespaces of its user namespace)",
            libc::SYS_unshare,
            &[flags],
        )?;
        let pidfd = crate::sys::pidfd_open(h.pid).map_err(|e| Error::Restore {
            pid: t.ns_pid,
            stage: "namespaces",
            detail: format!("a pidfd of the process making them: {e}"),
        })?;
        let fd = transport.pass(t, pidfd.as_fd())?;
        let r = t.call(
            "setns (namespaces of its user namespace)",
            libc::SYS_setns,
            &[fd, flags],
        );
        t.call("close", libc::SYS_close, &[fd])?;
        r.map(drop)
    })();
    let ended = super::end_helper(t, h);
    made?;
    ended
}

/// How many times a process or thread is made at the next pid of our
/// namespace before the restore gives up: each time another process of
/// the host took its pid first.
const NEXT_PID_TRIES: u32 = 100;

/// Where a pid namespace's next pid is handed out from: the namespace of
/// the process that writes it (`/proc/sys/kernel/ns_last_pid`).
const LAST_PID: &str = "/proc/sys/kernel/ns_last_pid";

/// Where the restore sets the next pid of the tree's pid namespace for
/// the processes and threads that cannot ask for theirs: those of a
/// process in a user namespace, where `set_tid` would need CAP_SYS_ADMIN
/// over the tree's pid namespace, which the process left (it still asks
/// for its pids in a pid namespace of its user namespace).
pub enum NextPids {
    /// The tree is in our pid namespace: we set our own, where another
    /// process of the host may take the pid first.
    Ours,
    /// The tree is a pid namespace of its own (a container's): a helper,
    /// a child of its first process forked at a pid no process of the
    /// tree has, writes our `ns_last_pid` file, which then sets the next
    /// pid of its own namespace, the tree's, where no process of the host
    /// takes pids. `above`: the highest pid of the tree's processes and
    /// threads.
    Tree {
        helper: Box<Tracee>,
        file: u64,
        above: i32,
    },
}

impl NextPids {
    /// For a tree whose first process is `root` (just made, not yet
    /// restored): a helper of its in the tree's namespace if the tree is
    /// one of its own and a process of it is in a user namespace.
    pub fn for_tree(
        root: &mut Tracee,
        m: &Manifest,
        procs: &BTreeMap<i32, ProcessImage>,
        transport: &crate::restore::sockets::Transport,
    ) -> Result<NextPids> {
        if !m.own_pid_ns || procs.values().all(|p| p.user_ns.is_none()) {
            return Ok(NextPids::Ours);
        }
        let taken: std::collections::BTreeSet<i32> = (procs.values())
            .flat_map(|p| std::iter::once(p.pid).chain(p.threads.iter().map(|t| t.tid)))
            .collect();
        let free = (2..).find(|id| !taken.contains(id)).unwrap_or(2);
        let above = taken.last().copied().unwrap_or(1);
        let mut helper = super::fork_silent(root, free)?;
        let made = (|| -> Result<u64> {
            crate::ptrace::set_sigmask(helper.pid, crate::common::BLOCK_ALL)?;
            let file = std::fs::OpenOptions::new()
                .write(true)
                .open(LAST_PID)
                .map_err(|e| Error::Restore {
                    pid: m.root,
                    stage: "pids of processes in user namespaces",
                    detail: format!("open {LAST_PID}: {e}"),
                })?;
            transport.pass(&mut helper, file.as_fd())
        })();
        match made {
            Ok(file) => Ok(NextPids::Tree {
                helper: Box::new(helper),
                file,
                above,
            }),
            Err(e) => {
                let _ = NextPids::Tree {
                    helper: Box::new(helper),
                    file: 0,
                    above,
                }
                .finish(root);
                Err(e)
            }
        }
    }

    /// The level of the tree's pid namespace in a task's `NSpid`, as we
    /// see it.
    pub fn level(&self) -> usize {
        match self {
            NextPids::Ours => 0,
            NextPids::Tree { .. } => 1,
        }
    }

    /// What `attempt` makes (a process or a thread) with pid `pid` in the
    /// tree's pid namespace, that pid set as the next one for each
    /// attempt. `attempt` ends what got another pid (in ours, a process of
    /// the host took it first) and gives `None`; it is then tried again,
    /// [`NEXT_PID_TRIES`] times at most (once in the tree's own, where
    /// nothing else takes pids).
    pub fn at<T>(&mut self, pid: i32, mut attempt: impl FnMut() -> Result<Option<T>>) -> Result<T> {
        let tries = match self {
            NextPids::Ours => NEXT_PID_TRIES,
            NextPids::Tree { .. } => 1,
        };
        for _ in 0..tries {
            let cursor = self.set(pid)?;
            let made = attempt();
            drop(cursor);
            if let Some(made) = made? {
                return Ok(made);
            }
        }
        Err(Error::Restore {
            pid,
            stage: "process or thread in a user namespace",
            detail: format!("it got another pid {tries} time(s) (another process took it first)"),
        })
    }

    /// Makes `pid` the next pid of the tree's namespace; in ours, until
    /// the result is dropped. A pid in use in ours is an error at once.
    fn set(&mut self, pid: i32) -> Result<Option<OurNextPid>> {
        let fail = |e: std::io::Error| Error::Restore {
            pid,
            stage: "process or thread in a user namespace",
            detail: format!("set the next pid: {e}"),
        };
        match self {
            NextPids::Ours => {
                if std::path::Path::new(&format!("/proc/{pid}")).exists() {
                    return Err(Error::PidTaken(pid));
                }
                let before = crate::procfs::read_text(LAST_PID)
                    .map_err(fail)?
                    .trim()
                    .parse()
                    .map_err(|_| fail(std::io::Error::other("ns_last_pid is not a number")))?;
                std::fs::write(LAST_PID, (pid - 1).to_string()).map_err(fail)?;
                Ok(Some(OurNextPid { before }))
            }
            NextPids::Tree { helper, file, .. } => {
                write_last_pid(helper, *file, pid - 1)?;
                Ok(None)
            }
        }
    }

    /// Makes the next pid of the tree's namespace one no process or thread
    /// of the tree has, for a helper forked with no pid asked for that
    /// lives while the tree's processes are forked (in ours, the host's
    /// next pids are far from the tree's).
    pub fn clear_of_tree(&mut self) -> Result<()> {
        match self {
            NextPids::Ours => Ok(()),
            NextPids::Tree {
                helper,
                file,
                above,
            } => write_last_pid(helper, *file, *above),
        }
    }

    /// Ends the helper, if any, and has `root`, its parent, reap it (it
    /// sends no SIGCHLD: `root`'s own pending signals are in place).
    pub fn finish(self, root: &mut Tracee) -> Result<()> {
        match self {
            NextPids::Ours => Ok(()),
            NextPids::Tree { helper, .. } => super::end_and_reap(root, *helper),
        }
    }
}

/// Has `helper` write `last` to the `ns_last_pid` file at its fd `file`.
fn write_last_pid(helper: &mut Tracee, file: u64, last: i32) -> Result<()> {
    let text = last.to_string();
    let at = helper.arg(text.as_bytes())?;
    helper
        .call(
            "write the next pid",
            libc::SYS_pwrite64,
            &[file, at, text.len() as u64, 0],
        )
        .map(drop)
}

/// Our pid namespace's last pid handed out, moved back for one pid by
/// [`NextPids::set`] and put forward again when dropped: the pids just
/// below where the kernel stood are those of processes that ended a
/// moment ago (a tree being restored, maybe), which the host's next
/// processes must not take.
struct OurNextPid {
    before: i32,
}

impl Drop for OurNextPid {
    fn drop(&mut self) {
        let now = crate::procfs::read_text(LAST_PID)
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok());
        if now.is_some_and(|n| n < self.before) {
            let _ = std::fs::write(LAST_PID, self.before.to_string());
        }
    }
}

/// Task `host`'s pid at `level` of its `NSpid` (0: ours, `host` itself).
pub fn pid_at_level(host: nix::unistd::Pid, level: usize) -> Result<i32> {
    if level == 0 {
        return Ok(host.as_raw());
    }
    nspid(host)?
        .get(level)
        .copied()
        .ok_or_else(|| Error::Restore {
            pid: host.as_raw(),
            stage: "pids",
            detail: format!("it has no pid at level {level}"),
        })
}

/// Task `host`'s pid as task `seer` (an ancestor's namespace or its
/// own) sees it.
pub fn pid_seen_by(seer: nix::unistd::Pid, host: nix::unistd::Pid) -> Result<i32> {
    pid_at_level(host, nspid(seer)?.len().saturating_sub(1))
}

/// Task `host`'s pids, ours first.
fn nspid(host: nix::unistd::Pid) -> Result<Vec<i32>> {
    crate::procfs::read_nspid(format!("/proc/{host}/status"))
        .ok()
        .flatten()
        .filter(|l| !l.is_empty())
        .ok_or_else(|| Error::Restore {
            pid: host.as_raw(),
            stage: "pids",
            detail: "its pids cannot be read".into(),
        })
}

/// Names the UTS namespace `t` is the first process of `names`.
pub fn name_uts(t: &mut Tracee, names: &UtsNames) -> Result<()> {
    let h = t.arg(names.hostname.as_bytes())?;
    t.call(
        "sethostname",
        libc::SYS_sethostname,
        &[h, names.hostname.len() as u64],
    )?;
    let d = t.arg(names.domainname.as_bytes())?;
    t.call(
        "setdomainname",
        libc::SYS_setdomainname,
        &[d, names.domainname.len() as u64],
    )?;
    Ok(())
}

/// Puts `t` in its time namespaces before its children are forked: one of
/// its own, then the one its children go to.
pub fn enter_time(t: &mut Tracee, p: &ProcessImage) -> Result<()> {
    if let TimeNs::Own { offsets } = &p.time_ns {
        children_time(t, offsets)?;
        let fd = open_in(t, "/proc/self/ns/time_for_children")?;
        let r = t.call(
            "setns (time namespace)",
            libc::SYS_setns,
            &[fd, libc::CLONE_NEWTIME as u64],
        );
        t.call("close", libc::SYS_close, &[fd])?;
        r?;
    }
    if let Some(offsets) = &p.children_time_ns {
        children_time(t, offsets)?;
    }
    Ok(())
}

/// Unshares a time namespace for `t`'s next children, with `offsets`.
fn children_time(t: &mut Tracee, offsets: &TimeOffsets) -> Result<()> {
    t.call(
        "unshare(CLONE_NEWTIME)",
        libc::SYS_unshare,
        &[libc::CLONE_NEWTIME as u64],
    )?;
    crate::procfs::write_timens_offsets(t.pid.as_raw(), offsets).map_err(|e| Error::Restore {
        pid: t.ns_pid,
        stage: "time namespace",
        detail: format!("its offsets: {e}"),
    })
}

/// Opens `path` read-only in `t`; returns the fd.
pub(crate) fn open_in(t: &mut Tracee, path: &str) -> Result<u64> {
    let at = t.arg_str(path)?;
    t.call(
        "open",
        libc::SYS_openat,
        &[
            libc::AT_FDCWD as u64,
            at,
            (libc::O_RDONLY | libc::O_CLOEXEC) as u64,
        ],
    )
}

/// Whether `child`, forked by `forker` (its parent, or the sibling whose fd
/// table it shares), must leave the time namespace it lands in (`forker`'s
/// children's) for `forker`'s own.
pub fn back_to_own_time(forker: &ProcessImage, child: &ProcessImage) -> bool {
    let own = if child.parent == Some(forker.pid) {
        TimeNs::Parents
    } else {
        forker.time_ns
    };
    forker.children_time_ns.is_some() && child.time_ns == own
}

/// An fd of `t`'s own time namespace, for the children it forks next that
/// [`back_to_own_time`] sends back there (closed by [`close_time_fd`]).
pub fn own_time_fd(t: &mut Tracee) -> Result<u64> {
    open_in(t, "/proc/self/ns/time")
}

/// Takes forked process `c` into the time namespace of `fd`, which it
/// inherited, if `join`, and closes its copy (unless its table is its
/// forker's).
pub fn join_time(c: &mut Tracee, fd: u64, join: bool, shares_table: bool) -> Result<()> {
    if join {
        c.call(
            "setns (its parent's time namespace)",
            libc::SYS_setns,
            &[fd, libc::CLONE_NEWTIME as u64],
        )?;
    }
    if !shares_table {
        c.call("close", libc::SYS_close, &[fd])?;
    }
    Ok(())
}

/// Closes the fd [`own_time_fd`] opened.
pub fn close_time_fd(t: &mut Tracee, fd: u64) -> Result<()> {
    t.call("close", libc::SYS_close, &[fd]).map(drop)
}

/// The pids `clone3` is to give a process: the innermost first, down to
/// the tree's namespace.
pub fn set_tid(p: &ProcessImage) -> Vec<i32> {
    innermost_first(&p.nested_pids, p.pid)
}

/// The same for one of its threads.
pub fn thread_set_tid(th: &ThreadImage) -> Vec<i32> {
    innermost_first(&th.nested_tids, th.tid)
}

/// `nested` (the outermost first) turned round, then `tree`'s own.
fn innermost_first(nested: &[i32], tree: i32) -> Vec<i32> {
    nested.iter().rev().copied().chain([tree]).collect()
}

/// Whether a pid of `ids` is no pid at all.
fn out_of_range(ids: &[i32]) -> bool {
    ids.iter().any(|n| !(1..=crate::image::PID_MAX).contains(n))
}

/// Checks an image's namespaces: every nested process is in a namespace
/// whose first process is of the tree and as deep as it, at most one
/// level below its parent's, and its threads have as many pids as it.
pub fn check(procs: &BTreeMap<i32, ProcessImage>, root: i32) -> std::result::Result<(), String> {
    for p in procs.values() {
        let pid = p.pid;
        let d = p.depth();
        if out_of_range(&p.nested_pids) {
            return Err(format!("process {pid} has a nested pid out of range"));
        }
        // The kernel nests pid namespaces 32 deep at most, the host's
        // included.
        if d >= MAX_NESTING {
            return Err(format!("process {pid} is {d} pid namespaces deep"));
        }
        if pid == root && (d > 0 || p.pid_ns.is_some()) {
            return Err("the root is not in the tree's pid namespace".into());
        }
        if p.own_cgroup_ns && p.zombie.is_some() {
            return Err(format!(
                "process {pid} has a cgroup namespace it cannot have"
            ));
        }
        if p.ipc.is_some() && p.zombie.is_some() {
            return Err(format!("process {pid} has an IPC namespace it cannot have"));
        }
        if let Some(net) = &p.own_net {
            net.check()
                .map_err(|e| format!("process {pid}'s network namespace: {e}"))?;
            // A veth's peer goes where the restore runs, which must be
            // where its parent is.
            let all: Vec<&ProcessImage> = procs.values().collect();
            let parent = p.parent.and_then(|q| procs.get(&q));
            if !net.host_veths.is_empty()
                && parent.is_some_and(|q| crate::image::netns::net_maker(&all, q).is_some())
            {
                return Err(format!(
                    "process {pid}'s network namespace has a veth to the restorer's, which its \
                     parent is not in"
                ));
            }
        }
        if let Some(u) = &p.uts {
            let bad = |n: &str| n.len() > UTS_LEN || n.contains('\0');
            if p.zombie.is_some() || bad(&u.hostname) || bad(&u.domainname) {
                return Err(format!("process {pid} has a UTS namespace it cannot have"));
            }
        }
        if p.threads
            .iter()
            .any(|th| th.nested_tids.len() != d || out_of_range(&th.nested_tids))
        {
            return Err(format!(
                "a thread of process {pid} has not one pid per pid namespace of its process"
            ));
        }
        match (d, p.pid_ns) {
            (0, None) => {}
            (0, Some(_)) | (_, None) => {
                return Err(format!(
                    "process {pid} is in a nested pid namespace without one"
                ));
            }
            (_, Some(init)) => {
                let first = procs.get(&init).filter(|f| {
                    f.depth() == d && f.pid_ns == Some(init) && f.nested_pids.last() == Some(&1)
                });
                if first.is_none() {
                    return Err(format!(
                        "process {pid}'s pid namespace starts with process {init}, which is not its pid 1 at its depth"
                    ));
                }
            }
        }
        check_time(procs, p)?;
        let parent_depth = p.parent.and_then(|pp| procs.get(&pp)).map(|pp| pp.depth());
        match parent_depth {
            Some(pd) if d != pd && d != pd + 1 => {
                return Err(format!(
                    "process {pid} is not in its parent's pid namespace or one just below it"
                ));
            }
            _ => {}
        }
        if let Some(ChildrenPidNs::Of { init }) = p.children_pid_ns
            && !procs
                .get(&init)
                .is_some_and(|f| f.depth() == d + 1 && f.pid_ns == Some(init))
        {
            return Err(format!(
                "process {pid}'s children go to a pid namespace process {init} does not start"
            ));
        }
    }
    Ok(())
}

/// Checks `p`'s time namespaces: offsets a clock can have, the namespace
/// its parent made for its children only where the parent made one, and,
/// for a process its sibling forks, one that sibling can give it.
fn check_time(
    procs: &BTreeMap<i32, ProcessImage>,
    p: &ProcessImage,
) -> std::result::Result<(), String> {
    let pid = p.pid;
    let offsets = [
        p.children_time_ns.as_ref(),
        match &p.time_ns {
            TimeNs::Own { offsets } => Some(offsets),
            _ => None,
        },
    ];
    if offsets
        .iter()
        .flatten()
        .any(|o| o.monotonic.nsecs >= 1_000_000_000 || o.boottime.nsecs >= 1_000_000_000)
    {
        return Err(format!(
            "process {pid} has a time namespace offset out of range"
        ));
    }
    let parent = p.parent.and_then(|pp| procs.get(&pp));
    if p.time_ns == TimeNs::ParentsChildren && parent.is_none_or(|pp| pp.children_time_ns.is_none())
    {
        return Err(format!(
            "process {pid} is in a time namespace its parent did not make"
        ));
    }
    if let Some(sibling) = p.shares_files_with.and_then(|s| procs.get(&s))
        && p.zombie.is_none()
        && !matches!(p.time_ns, TimeNs::Own { .. })
        && (p.time_ns != sibling.time_ns || matches!(sibling.time_ns, TimeNs::Own { .. }))
    {
        return Err(format!(
            "process {pid} is in another time namespace than process {}, whose fd table it shares, \
             which a restore cannot give it",
            sibling.pid
        ));
    }
    Ok(())
}

/// Where a parent's next child must go for `child` to be made: its own
/// namespace (`None`), or the nested one `child` is in.
pub fn children_for(parent: &ProcessImage, child: &ProcessImage) -> Option<i32> {
    (child.depth() > parent.depth() && child.pid_ns != Some(child.pid))
        .then_some(child.pid_ns)
        .flatten()
}

/// Whether `child` is the first process of a namespace its parent makes.
pub fn starts_namespace(parent: &ProcessImage, child: &ProcessImage) -> bool {
    child.depth() > parent.depth() && child.pid_ns == Some(child.pid)
}

/// Points `t`'s next children at its own namespace (`want` `None`) or at
/// the nested one `want` starts, if they do not go there already (`now`).
pub fn point_children(
    t: &mut Tracee,
    procs: &BTreeMap<i32, ProcessImage>,
    p: &ProcessImage,
    want: Option<i32>,
    now: &mut Option<i32>,
) -> Result<()> {
    if *now == want {
        return Ok(());
    }
    let pid = match want {
        None => Some(p.own_pid()),
        Some(init) => p.sees(procs, init),
    }
    .ok_or_else(|| crate::Error::Restore {
        pid: p.pid,
        stage: "pid namespace",
        detail: format!("process {} is not in sight of it", want.unwrap_or(p.pid)),
    })?;
    let fd = t.call("pidfd_open", libc::SYS_pidfd_open, &[pid as u64, 0])?;
    let r = t.call(
        "setns (children's pid namespace)",
        libc::SYS_setns,
        &[fd, libc::CLONE_NEWPID as u64],
    );
    t.call("close", libc::SYS_close, &[fd])?;
    r?;
    *now = want;
    Ok(())
}

/// Sends `t`'s next children where they went at the checkpoint, once the
/// children it had are made (`now`: where they go at this point).
pub fn restore_children_ns(
    t: &mut Tracee,
    procs: &BTreeMap<i32, ProcessImage>,
    p: &ProcessImage,
    mut now: Option<i32>,
) -> Result<()> {
    match p.children_pid_ns {
        None => point_children(t, procs, p, None, &mut now),
        Some(ChildrenPidNs::Of { init }) => point_children(t, procs, p, Some(init), &mut now),
        Some(ChildrenPidNs::New) => {
            // A namespace made by unshare sits below the one children went
            // to: the process's own.
            point_children(t, procs, p, None, &mut now)?;
            t.call(
                "unshare(CLONE_NEWPID)",
                libc::SYS_unshare,
                &[libc::CLONE_NEWPID as u64],
            )?;
            Ok(())
        }
    }
}

/// Checks an image's user namespaces: maps the kernel takes, and each
/// process in one a live one whose ids are all mapped there, with one
/// thread unless it is in the tree's pid namespace or one of its user
/// namespace's (its threads could not get their ids: see [`NextPids`]).
pub fn check_users(
    m: &Manifest,
    procs: &BTreeMap<i32, ProcessImage>,
) -> std::result::Result<(), String> {
    for (i, u) in m.user_namespaces.iter().enumerate() {
        u.check().map_err(|e| format!("user namespace {i}: {e}"))?;
        // Nested in one made before it, its ids all mapped there.
        if let Some(p) = u.parent {
            let parent = (m.user_namespaces[..i].get(p)).ok_or_else(|| {
                format!("user namespace {i} is nested in {p}, not an earlier one")
            })?;
            let mapped = [IdKind::Uid, IdKind::Gid]
                .iter()
                .all(|k| u.map_text_in(*k, parent).is_some());
            if !mapped || parent.inside(IdKind::Uid, u.owner).is_none() {
                return Err(format!(
                    "user namespace {i} maps ids its parent {p} does not, or has an owner it does \
                     not map"
                ));
            }
        }
    }
    let all: Vec<&ProcessImage> = procs.values().collect();
    crate::image::check_user_pid_namespaces(&all)?;
    crate::image::check_user_time_namespaces(procs)?;
    for p in procs.values() {
        let pid = p.pid;
        if let Some(k) = (p.user_owned.iter())
            .find(|k| (**k != NsKind::Pid && !p.makes(**k)) || p.user_ns.is_none())
        {
            return Err(format!(
                "process {pid} has a {} namespace of its user namespace it does not make",
                k.file()
            ));
        }
        let Some(i) = p.user_ns else { continue };
        let u = m
            .user_namespaces
            .get(i)
            .ok_or_else(|| format!("process {pid} is in user namespace {i}, which is not in it"))?;
        // Threads get the next pid of the tree's namespace: only there,
        // and ask for their ids in a pid namespace of their user
        // namespace's below it.
        let nested = !p.in_user_pid_ns(procs)
            && (!p.nested_pids.is_empty() || p.threads.iter().any(|th| !th.nested_tids.is_empty()));
        if p.zombie.is_some() {
            return Err(format!("process {pid} is a zombie in a user namespace"));
        }
        if p.threads.len() != 1 && nested {
            return Err(format!(
                "process {pid} is in a user namespace with {} threads in a nested pid namespace",
                p.threads.len()
            ));
        }
        if !u.maps(&p.creds) {
            return Err(format!(
                "process {pid} has ids its user namespace does not map"
            ));
        }
    }
    Ok(())
}

/// Makes the tree's user namespaces, each with its owner and maps, and
/// holds them open (no process is in them until the tree's enter).
pub fn make_users(m: &Manifest) -> Result<Vec<OwnedFd>> {
    let fail = |detail: String| Error::Restore {
        pid: m.root,
        stage: "user namespaces",
        detail,
    };
    let mut made: Vec<OwnedFd> = Vec::new();
    for u in &m.user_namespaces {
        // Its parent, made before it ([`check_users`]), and where its maker
        // goes: there, with its owner's uid and any gid as it numbers them.
        let parent = match u.parent {
            None => None,
            Some(i) => {
                let (Some(pu), Some(ns)) = (m.user_namespaces.get(i), made.get(i)) else {
                    return Err(fail(format!("its parent {i} is not made before it")));
                };
                let uid = (pu.inside(IdKind::Uid, u.owner))
                    .ok_or_else(|| fail(format!("owner {} outside its parent", u.owner)))?;
                let gid = pu.gid_map.first().map_or(0, |r| r.inside);
                let ns = ns.as_fd();
                Some((pu, crate::sys::InParent { ns, uid, gid }))
            }
        };
        let maker = crate::sys::UserNsChild::make(u.owner, parent.as_ref().map(|(_, at)| *at))
            .map_err(|e| fail(format!("make one as uid {}: {e}", u.owner)))?;
        let dir = format!("/proc/{}", maker.pid);
        // setgroups before the gid map, which allows it otherwise.
        let mut files = Vec::new();
        if !u.setgroups {
            files.push((format!("{dir}/setgroups"), "deny".to_string()));
        }
        for kind in [IdKind::Uid, IdKind::Gid] {
            let text = match &parent {
                None => Some(u.map_text(kind)),
                Some((pu, _)) => u.map_text_in(kind, pu),
            };
            let text =
                text.ok_or_else(|| fail(format!("its {} outside its parent", kind.file())))?;
            files.push((format!("{dir}/{}", kind.file()), text));
        }
        match &parent {
            // From its parent, as the kernel wants for a nested one.
            Some((_, at)) => crate::sys::write_in_user_ns(at.ns, at.uid, &files)
                .map_err(|e| fail(format!("write its maps: {e}")))?,
            None => {
                for (path, text) in &files {
                    std::fs::write(path, text)
                        .map_err(|e| fail(format!("write {path} ({}): {e}", text.trim_end())))?;
                }
            }
        }
        let ns = std::fs::File::open(format!("{dir}/ns/user"))
            .map_err(|e| fail(format!("open it: {e}")))?;
        maker.finish();
        made.push(OwnedFd::from(ns));
    }
    Ok(made)
}

/// Puts `t` in user namespace `ns` (of `transport`'s reach), its
/// supplementary groups set first as the host numbers them (the namespace
/// may deny `setgroups`). Its capabilities are then every one there and
/// none outside, its securebits the defaults: [`crate::restore::state::identity`]
/// sets both after.
pub fn enter_user(
    t: &mut Tracee,
    p: &ProcessImage,
    ns: BorrowedFd<'_>,
    transport: &crate::restore::sockets::Transport,
) -> Result<()> {
    let groups: Vec<u8> = p
        .creds
        .groups
        .iter()
        .flat_map(|g| g.to_ne_bytes())
        .collect();
    let a = t.arg(&groups)?;
    t.call(
        "setgroups",
        libc::SYS_setgroups,
        &[p.creds.groups.len() as u64, a],
    )?;
    let fd = transport.pass(t, ns)?;
    let r = t.call(
        "setns (user namespace)",
        libc::SYS_setns,
        &[fd, libc::CLONE_NEWUSER as u64],
    );
    t.call("close", libc::SYS_close, &[fd])?;
    r.map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proc(pid: i32, parent: Option<i32>, nested: &[i32], ns: Option<i32>) -> ProcessImage {
        ProcessImage {
            pid,
            parent,
            nested_pids: nested.to_vec(),
            pid_ns: ns,
            threads: vec![ThreadImage {
                tid: pid,
                nested_tids: nested.to_vec(),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    /// root 10; a 11 first of a namespace (pid 1 there) with b 12 (pid 2)
    /// below it; c 13, root's child in a's namespace.
    fn tree() -> BTreeMap<i32, ProcessImage> {
        [
            proc(10, None, &[], None),
            proc(11, Some(10), &[1], Some(11)),
            proc(12, Some(11), &[2], Some(11)),
            proc(13, Some(10), &[3], Some(11)),
        ]
        .into_iter()
        .map(|p| (p.pid, p))
        .collect()
    }

    #[test]
    fn a_sound_tree_passes_and_each_process_sees_its_namespace_only() {
        let procs = tree();
        check(&procs, 10).unwrap();
        let (root, b) = (&procs[&10], &procs[&12]);
        assert_eq!(root.sees(&procs, 12), Some(12));
        assert_eq!(b.sees(&procs, 11), Some(1));
        assert_eq!(b.sees(&procs, 13), Some(3));
        assert_eq!(b.sees(&procs, 10), None);
        assert_eq!(set_tid(b), vec![2, 12]);
        assert!(starts_namespace(root, &procs[&11]));
        assert_eq!(children_for(root, &procs[&13]), Some(11));
        assert_eq!(children_for(&procs[&11], b), None);
    }

    type Spoil = fn(&mut BTreeMap<i32, ProcessImage>);

    #[test]
    fn namespaces_an_image_cannot_have_are_refused() {
        let bad: [(&str, Spoil); 11] = [
            ("too deep", |t| {
                let p = t.get_mut(&12).unwrap();
                p.nested_pids = vec![2; 40];
                p.threads[0].nested_tids = vec![2; 40];
            }),
            ("pid out of range", |t| {
                t.get_mut(&12).unwrap().nested_pids = vec![0]
            }),
            ("first process not pid 1", |t| {
                t.get_mut(&11).unwrap().nested_pids = vec![5];
                t.get_mut(&11).unwrap().threads[0].nested_tids = vec![5];
            }),
            ("no namespace named", |t| {
                t.get_mut(&12).unwrap().pid_ns = None
            }),
            ("threads without their pids", |t| {
                t.get_mut(&12).unwrap().threads[0].nested_tids.clear()
            }),
            ("two levels below the parent", |t| {
                let p = t.get_mut(&12).unwrap();
                p.nested_pids = vec![2, 2];
                p.threads[0].nested_tids = vec![2, 2];
            }),
            ("children sent to a namespace nobody starts", |t| {
                t.get_mut(&10).unwrap().children_pid_ns = Some(ChildrenPidNs::Of { init: 12 })
            }),
            ("a time namespace the parent did not make", |t| {
                t.get_mut(&12).unwrap().time_ns = TimeNs::ParentsChildren
            }),
            ("the root in its parent's children's time namespace", |t| {
                let root = t.get_mut(&10).unwrap();
                root.time_ns = TimeNs::ParentsChildren;
                root.children_time_ns = Some(TimeOffsets::default());
            }),
            ("a clock offset of a second or more of nanoseconds", |t| {
                let mut offsets = TimeOffsets::default();
                offsets.boottime.nsecs = 1_000_000_000;
                t.get_mut(&12).unwrap().time_ns = TimeNs::Own { offsets };
            }),
            (
                "a table sharer in a time namespace its sibling cannot give",
                |t| {
                    t.get_mut(&13).unwrap().shares_files_with = Some(11);
                    t.get_mut(&11).unwrap().time_ns = TimeNs::Own {
                        offsets: TimeOffsets::default(),
                    };
                },
            ),
        ];
        for (what, spoil) in bad {
            let mut procs = tree();
            spoil(&mut procs);
            assert!(check(&procs, 10).is_err(), "{what} passed");
        }
        let mut procs = tree();
        procs.get_mut(&10).unwrap().nested_pids = vec![1];
        assert!(check(&procs, 10).is_err(), "a nested root passed");
    }
}
