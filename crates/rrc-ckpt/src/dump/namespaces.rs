//! The namespaces of the tree's processes. A restore puts every process in
//! the root's namespaces, but where it made others. UTS, cgroup, IPC,
//! network and mount namespaces: a process whose parent is in another is
//! the first of its own, made again (with its names; rooted at its cgroup;
//! with its objects, module `ipc`; modules `netns` and `mounts`). Pid namespaces nested in the tree's: each process's pids at every
//! level below the tree's, the namespace it is in (named by its first
//! process) and the one its next children go to. Time namespaces: whether a
//! process is in its parent's, in the one its parent made for its children,
//! or in one of its own, and the clocks' offsets of each one made. User
//! namespaces: module `userns`.
//!
//! The tree's namespace is the root's. A process `unshare(CLONE_NEWPID)`
//! or `clone(CLONE_NEWPID)` made deeper has pids there too (`NSpid`, the
//! outermost first); its namespace is known by the link
//! `/proc/PID/ns/pid`, and the first process of each (its pid 1) names it
//! in the image, since namespaces have no number of their own a restore
//! could give back.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::PathBuf;

use nix::unistd::Pid;
use procfs::process::Status;

use crate::common::{Ns, in_ns_of};
use crate::dump::seize::SeizedProcess;
use crate::image::{ChildrenPidNs, ThreadImage, TimeNs, TimeOffsets, UtsNames};
use crate::{Error, Result, procfs as pfs};

/// Every process's pids from the tree's namespace inwards.
pub struct PidLevels {
    /// How many levels the root has (1 in the host's own namespace).
    pub depth: usize,
    levels: BTreeMap<Pid, Vec<i32>>,
}

/// A process's place among the namespaces, for its image.
#[derive(Default)]
pub struct NsPlace {
    pub nested_pids: Vec<i32>,
    pub pid_ns: Option<i32>,
    pub children_pid_ns: Option<ChildrenPidNs>,
}

impl PidLevels {
    /// From each process's status (`NSpid`); `root` is the tree's root.
    pub fn new(statuses: &BTreeMap<Pid, Status>, root: Pid) -> Result<PidLevels> {
        let all = |pid: Pid| -> Result<Vec<i32>> {
            let status = statuses
                .get(&pid)
                .ok_or(Error::NoSuchProcess(pid.as_raw()))?;
            Ok(match status.nspid.as_deref() {
                Some(l) if !l.is_empty() => l.to_vec(),
                _ => vec![pid.as_raw()],
            })
        };
        let depth = all(root)?.len();
        let mut levels = BTreeMap::new();
        for pid in statuses.keys() {
            let l = all(*pid)?;
            if l.len() < depth {
                return Err(Error::Proc {
                    pid: pid.as_raw(),
                    what: "status",
                    detail: "it is in a pid namespace above the tree's root".into(),
                });
            }
            levels.insert(*pid, l[depth - 1..].to_vec());
        }
        Ok(PidLevels { depth, levels })
    }

    /// Its pid in the tree's namespace.
    pub fn tree_pid(&self, pid: Pid) -> i32 {
        self.levels.get(&pid).map_or(pid.as_raw(), |l| l[0])
    }

    /// How many pid namespaces nested in the tree's it is below.
    pub fn nesting(&self, pid: Pid) -> usize {
        self.nested(pid).len()
    }

    fn nested(&self, pid: Pid) -> &[i32] {
        self.levels.get(&pid).map_or(&[], |l| &l[1..])
    }

    /// Where each process stands among the namespaces; what cannot be
    /// restored goes to `problems`. Reads one link per process in the
    /// tree's namespace, two per nested one.
    pub fn places(
        &self,
        root: Pid,
        processes: &[SeizedProcess],
        zombie: impl Fn(Pid) -> bool,
        problems: &mut Vec<String>,
    ) -> BTreeMap<Pid, NsPlace> {
        let tree_ns = ns_link(root, "pid");
        // Each nested process's namespace, and the first process of each.
        let mut ns_of: BTreeMap<Pid, PathBuf> = BTreeMap::new();
        let mut first_of: BTreeMap<PathBuf, i32> = BTreeMap::new();
        for p in processes {
            let nested = self.nested(p.pid);
            if nested.is_empty() || zombie(p.pid) {
                continue;
            }
            if let Some(ns) = ns_link(p.pid, "pid") {
                if nested.last() == Some(&1) {
                    first_of.insert(ns.clone(), self.tree_pid(p.pid));
                }
                ns_of.insert(p.pid, ns);
            }
        }
        let mut places = BTreeMap::new();
        for p in processes {
            let raw = p.pid.as_raw();
            let nested = self.nested(p.pid).to_vec();
            let parent_depth = p.parent.map_or(0, |pp| self.nested(pp).len());
            if p.parent.is_some() && nested.len() > parent_depth + 1 {
                problems.push(format!(
                    "process {raw} is {} pid namespaces below its parent's",
                    nested.len() - parent_depth
                ));
            }
            let mut place = NsPlace {
                pid_ns: None,
                children_pid_ns: None,
                nested_pids: nested,
            };
            if !place.nested_pids.is_empty() {
                place.pid_ns = if zombie(p.pid) {
                    // A zombie's namespace cannot be read: that of its
                    // parent in the same one, or its own as its pid 1.
                    if place.nested_pids.last() == Some(&1) {
                        Some(self.tree_pid(p.pid))
                    } else {
                        p.parent
                            .filter(|pp| self.nested(*pp).len() == place.nested_pids.len())
                            .and_then(|pp| ns_of.get(&pp))
                            .and_then(|ns| first_of.get(ns))
                            .copied()
                    }
                } else {
                    ns_of.get(&p.pid).and_then(|ns| first_of.get(ns)).copied()
                };
                if place.pid_ns.is_none() {
                    problems.push(format!(
                        "process {raw} is in a nested pid namespace whose first process is not in the tree"
                    ));
                }
            }
            if !zombie(p.pid) {
                let own = if place.nested_pids.is_empty() {
                    tree_ns.clone()
                } else {
                    ns_of.get(&p.pid).cloned()
                };
                place.children_pid_ns = match ns_link(p.pid, "pid_for_children") {
                    Some(ns) if Some(&ns) == own.as_ref() => None,
                    Some(ns) => match first_of.get(&ns) {
                        Some(init) => Some(ChildrenPidNs::Of { init: *init }),
                        None => {
                            problems.push(format!(
                                "process {raw}'s next children go to a pid namespace whose first process is not in the tree"
                            ));
                            None
                        }
                    },
                    // The link is missing for a namespace no process is in
                    // yet: one just unshared.
                    None => Some(ChildrenPidNs::New),
                };
            }
            places.insert(p.pid, place);
        }
        places
    }
}

/// The namespaces of their own some processes start: each such process's
/// UTS names, and which start a cgroup or an IPC namespace.
#[derive(Default)]
pub struct OwnNamespaces {
    pub uts: BTreeMap<Pid, UtsNames>,
    pub cgroup: BTreeSet<Pid>,
    pub ipc: BTreeSet<Pid>,
    pub net: BTreeMap<Pid, crate::image::netns::OwnNet>,
    pub mnt: BTreeMap<Pid, super::mounts::OwnMounts>,
}

/// Finds the first process of each UTS, IPC, network, mount and cgroup
/// namespace other than the root's: a process in another than its
/// parent's, which no other process shares but its descendants (any other
/// is a problem), and those of the root unless the tree is a `container`'s
/// (see [`root_namespaces`]). A cgroup
/// namespace must be rooted at its first process's cgroup, as one it
/// unshared where it is (the restore unshares one in the cgroup the tree
/// is restored to). Reads five links per process but the root (none for a
/// tree of one).
pub fn own_namespaces(
    root: Pid,
    container: bool,
    processes: &[SeizedProcess],
    problems: &mut Vec<String>,
) -> OwnNamespaces {
    let mut own = OwnNamespaces::default();
    let others: Vec<&SeizedProcess> = processes
        .iter()
        .filter(|p| p.pid != root && !p.threads.is_empty())
        .collect();
    let live: Vec<Pid> = others.iter().map(|p| p.pid).collect();
    // The makers of the tree's network namespaces, where a veth's peer may
    // be.
    let mut net_makers = if others.is_empty() {
        Vec::new()
    } else {
        first_of_own(processes, &others, "net", "network", problems)
    };
    let root_net = !container && ns_link(root, "net") != ns_link(Pid::this(), "net");
    if root_net {
        net_makers.push(root);
    }
    if !container {
        root_namespaces(root, &live, &net_makers, &mut own, problems);
    }
    if others.is_empty() {
        return own;
    }
    for p in first_of_own(processes, &others, "uts", "UTS", problems) {
        own_uts(p, &mut own.uts, problems);
    }
    own.ipc = first_of_own(processes, &others, "ipc", "IPC", problems)
        .into_iter()
        .collect();
    for &p in net_makers.iter().filter(|p| **p != root) {
        own_net(p, &net_makers, &mut own.net, problems);
    }
    for p in first_of_own(processes, &others, "mnt", "mount", problems) {
        let parent = others.iter().find(|q| q.pid == p).and_then(|q| q.parent);
        own_mounts(p, parent.unwrap_or(root), &live, &mut own.mnt, problems);
    }
    for p in first_of_own(processes, &others, "cgroup", "cgroup", problems) {
        own_cgroup(p, &mut own.cgroup, problems);
    }
    own
}

/// The namespaces of a root (of a tree that is not a container's) other
/// than the checkpointing process's, which a restore into ours
/// makes again as for a process of the tree that made them: UTS, network,
/// cgroup and mount namespaces (IPC and time ones are the tree's own,
/// made apart), and a mount namespace (`unshare -m`, or a root of its
/// own: a sandbox's). `live` are the tree's other live processes.
fn root_namespaces(
    root: Pid,
    live: &[Pid],
    net_makers: &[Pid],
    own: &mut OwnNamespaces,
    problems: &mut Vec<String>,
) {
    let me = Pid::this();
    let differs = |kind: &str| ns_link(root, kind) != ns_link(me, kind);
    if differs("uts") {
        own_uts(root, &mut own.uts, problems);
    }
    if differs("net") {
        own_net(root, net_makers, &mut own.net, problems);
    }
    if differs("cgroup") {
        own_cgroup(root, &mut own.cgroup, problems);
    }
    if differs("mnt") {
        own_mounts(root, me, live, &mut own.mnt, problems);
    }
}

/// Reads the names of the UTS namespace process `p` is the first in into
/// `uts`.
fn own_uts(p: Pid, uts: &mut BTreeMap<Pid, UtsNames>, problems: &mut Vec<String>) {
    match uts_names(p) {
        Ok(names) => {
            uts.insert(p, names);
        }
        Err(e) => problems.push(format!(
            "process {p}: the names of its UTS namespace cannot be read: {e}"
        )),
    }
}

/// Reads the mount namespace process `p` is the first in, against that of
/// `parent`, into `mnt`; `live` are the tree's processes but the root.
fn own_mounts(
    p: Pid,
    parent: Pid,
    live: &[Pid],
    mnt: &mut BTreeMap<Pid, super::mounts::OwnMounts>,
    problems: &mut Vec<String>,
) {
    match super::mounts::read(p, parent, live) {
        Ok(m) => {
            mnt.insert(p, m);
        }
        Err(what) => problems.push(format!(
            "process {p} is in a mount namespace of its own with {what}, which a restore does \
             not make again"
        )),
    }
}

/// Reads the network namespace process `p` is the first in into `net`;
/// `makers` are the first processes of the tree's network namespaces.
fn own_net(
    p: Pid,
    makers: &[Pid],
    net: &mut BTreeMap<Pid, crate::image::netns::OwnNet>,
    problems: &mut Vec<String>,
) {
    match super::netns::read(p, makers) {
        Ok(Ok(n)) => {
            net.insert(p, n);
        }
        Ok(Err(what)) => problems.push(format!(
            "process {p} is in a network namespace of its own with {what}, which a \
             restore does not make again (its loopback, veth pairs within it or to the \
             checkpointer's namespace or another of the tree's and TUN/TAP interfaces, their \
             addresses, routes and nftables rules are)"
        )),
        Err(e) => problems.push(format!(
            "process {p}: its network namespace cannot be read: {e}"
        )),
    }
}

/// Notes in `cgroup` that process `p` is the first in its cgroup
/// namespace, which must be rooted at its cgroup.
fn own_cgroup(p: Pid, cgroup: &mut BTreeSet<Pid>, problems: &mut Vec<String>) {
    match cgroup_view(p) {
        Ok(view) if view.lines().all(|l| l.ends_with(":/")) => {
            cgroup.insert(p);
        }
        Ok(view) => problems.push(format!(
            "process {p} is in a cgroup namespace rooted elsewhere than its cgroup \
             (it sees {:?}), which a restore cannot make again",
            view.trim_end()
        )),
        Err(e) => problems.push(format!(
            "process {p}: its cgroups as its cgroup namespace shows them cannot be read: {e}"
        )),
    }
}

/// The processes of `others` in a namespace of kind `kind` other than
/// their parent's, each the only one there but its descendants (any other
/// is a problem).
fn first_of_own(
    processes: &[SeizedProcess],
    others: &[&SeizedProcess],
    kind: &str,
    name: &str,
    problems: &mut Vec<String>,
) -> Vec<Pid> {
    let of: BTreeMap<Pid, Option<PathBuf>> = processes
        .iter()
        .filter(|p| !p.threads.is_empty())
        .map(|p| (p.pid, ns_link(p.pid, kind)))
        .collect();
    let mut first: BTreeMap<PathBuf, Pid> = BTreeMap::new();
    for p in others {
        let mine = of.get(&p.pid).cloned().flatten();
        let parents = p.parent.and_then(|pp| of.get(&pp).cloned().flatten());
        let Some(ns) = mine.filter(|m| Some(m) != parents.as_ref()) else {
            continue;
        };
        if let Some(other) = first.get(&ns) {
            problems.push(format!(
                "process {} is in the {name} namespace of process {other} but not in its parent's, \
                 which a restore cannot make again",
                p.pid
            ));
            continue;
        }
        first.insert(ns, p.pid);
    }
    first.into_values().collect()
}

/// Process `pid`'s `/proc/PID/cgroup` as its cgroup namespace shows it,
/// read by a thread of ours that enters it.
fn cgroup_view(pid: Pid) -> std::result::Result<String, String> {
    // Paths show relative to the reading thread's namespace.
    in_ns_of(pid, Ns::Cgroup, || {
        pfs::read_text(format!("/proc/{pid}/cgroup"))
    })
    .map_err(|e| e.to_string())?
    .map_err(|e| e.to_string())
}

/// A process's time namespaces, for its image.
#[derive(Default)]
pub struct TimePlace {
    pub ns: TimeNs,
    pub children: Option<TimeOffsets>,
}

/// Where each live process's time namespace comes from, and the offsets of
/// each namespace a restore makes: one a process entered first (for the
/// root, one other than the checkpointing process's) and one a process
/// unshared for its children. A namespace two processes would have to make
/// is a problem. Reads two links per live process; nothing when the kernel
/// has no time namespaces.
pub fn time_places(
    root: Pid,
    processes: &[SeizedProcess],
    problems: &mut Vec<String>,
) -> BTreeMap<Pid, TimePlace> {
    let mut places = BTreeMap::new();
    // Each live process's namespace and its children's.
    let links: BTreeMap<Pid, (PathBuf, PathBuf)> = processes
        .iter()
        .filter(|p| !p.threads.is_empty())
        .filter_map(|p| {
            let own = ns_link(p.pid, "time")?;
            let children = ns_link(p.pid, "time_for_children")?;
            Some((p.pid, (own, children)))
        })
        .collect();
    let Some(mine) = fs::read_link("/proc/self/ns/time").ok() else {
        return places;
    };
    let offsets_of = |ns: &PathBuf| -> Option<TimeOffsets> {
        // The file tells the offsets of a process's children's namespace.
        let (pid, _) = links.iter().find(|(_, (_, c))| c == ns)?;
        crate::procfs::read_timens_offsets(pid.as_raw()).ok()
    };
    // The process that makes each namespace again.
    let mut maker: BTreeMap<&PathBuf, Pid> = BTreeMap::new();
    let mut made_twice = |ns, pid: Pid, problems: &mut Vec<String>| match maker.insert(ns, pid) {
        Some(other) => {
            problems.push(format!(
                "processes {other} and {pid} are in one time namespace neither got from \
                 its parent, which a restore cannot make again"
            ));
            true
        }
        None => false,
    };
    for p in processes {
        let Some((own, children)) = links.get(&p.pid) else {
            continue;
        };
        let (parents, parents_children) = match p.parent.and_then(|pp| links.get(&pp)) {
            Some((o, c)) => (o, c),
            None if p.pid == root => (&mine, &mine),
            // A parent whose namespace cannot be read: not for a live
            // child's parent, which is not a zombie.
            None => continue,
        };
        let mut place = TimePlace::default();
        if own == parents {
        } else if own == parents_children {
            place.ns = TimeNs::ParentsChildren;
        } else if made_twice(own, p.pid, problems) {
            continue;
        } else {
            match offsets_of(own) {
                Some(offsets) => place.ns = TimeNs::Own { offsets },
                None => problems.push(format!(
                    "process {}: the offsets of its time namespace cannot be read \
                     (it unshared another since and has no child in it)",
                    p.pid
                )),
            }
        }
        if children != own {
            if made_twice(children, p.pid, problems) {
                continue;
            }
            match crate::procfs::read_timens_offsets(p.pid.as_raw()) {
                Ok(o) => place.children = Some(o),
                Err(e) => problems.push(format!(
                    "process {}: its children's time namespace: {e}",
                    p.pid
                )),
            }
        }
        places.insert(p.pid, place);
    }
    places
}

/// Whether the root's IPC namespace is not the checkpointing process's
/// (a container's): the tree's own, which a restore makes again.
pub fn root_owns_ipc(root: Pid) -> bool {
    let mine = fs::read_link("/proc/self/ns/ipc").ok();
    mine.is_some() && ns_link(root, "ipc") != mine
}

/// The namespace of kind `kind` (a name of `/proc/PID/ns`) process `pid`
/// is in, as its link there reads (`None` if it cannot be read).
fn ns_link(pid: Pid, kind: &str) -> Option<PathBuf> {
    fs::read_link(format!("/proc/{pid}/ns/{kind}")).ok()
}

/// The host and domain names of process `pid`'s UTS namespace, read by a
/// thread of ours that enters it.
fn uts_names(pid: Pid) -> std::result::Result<UtsNames, String> {
    in_ns_of(pid, Ns::Uts, || -> std::io::Result<UtsNames> {
        // These read the names of the reading thread's namespace.
        let name = |what: &str| {
            pfs::read_text(format!("/proc/sys/kernel/{what}")).map(|s| s.trim_end().to_string())
        };
        Ok(UtsNames {
            hostname: name("hostname")?,
            domainname: name("domainname")?,
        })
    })
    .map_err(|e| e.to_string())?
    .map_err(|e| e.to_string())
}

/// Gives the threads of a process in a nested namespace (`threads`, in the
/// order of `p.threads`) their tids at every level: the injected `gettid`
/// told only the innermost. `main_nspid`: the main thread's (its
/// process's status); `others`: the other threads' status files.
pub fn thread_levels(
    p: &SeizedProcess,
    levels: &PidLevels,
    main_nspid: Option<&[i32]>,
    others: &[String],
    threads: &mut [ThreadImage],
) -> Result<()> {
    if levels.nested(p.pid).is_empty() {
        return Ok(());
    }
    let all = std::iter::once(main_nspid.map(<[i32]>::to_vec))
        .chain(others.iter().map(|text| pfs::nspid_of(text)));
    for ((seized, th), all) in p.threads.iter().zip(threads.iter_mut()).zip(all) {
        let all = all.unwrap_or_default();
        let mine = all.get(levels.depth - 1..).unwrap_or_default();
        let Some((tid, nested)) = mine.split_first() else {
            return Err(Error::Proc {
                pid: p.pid.as_raw(),
                what: "status",
                detail: format!("thread {} has no pid in the tree's namespace", seized.tid),
            });
        };
        th.tid = *tid;
        th.nested_tids = nested.to_vec();
    }
    Ok(())
}
