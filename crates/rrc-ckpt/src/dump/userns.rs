//! The user namespaces of the tree's processes. A process in a user
//! namespace other than ours is recorded with that namespace (its owner,
//! id maps and `setgroups` setting, read once, through a process of the
//! tree in it; the namespaces it is nested in too, a parent before its
//! children, one no process of the tree is in read through a child of
//! ours that enters it), which a restore makes again and has the process
//! enter once its children are forked, before its fds are put in place
//! and it takes its credentials again (as the namespace numbers them).
//! What that cannot give back is refused:
//!
//! - a process with more than one thread there in a nested pid namespace
//!   (the tree's own, or one below it) other than one of its user
//!   namespace's: a thread gets its id by `clone3`'s `set_tid`, which
//!   needs CAP_SYS_ADMIN over each pid namespace it names, which a process
//!   in the user namespace lacks over those outside it, while `setns` into
//!   a user namespace needs a single thread; in ours, the restore sets the
//!   next pid for it (`ns_last_pid`), and asks for the id it has in a pid
//!   namespace of its user namespace;
//! - a pid namespace owned by the user namespace (`unshare -Urpf`) but
//!   one nested once in ours, which a restore makes in it
//!   (`ProcessImage::user_owned`, as the UTS, IPC, network, mount and
//!   cgroup ones it is the first of), with each process's pid in ours set
//!   as the next one;
//! - a process making time namespaces (its own, its children's) some of
//!   which its user namespace owns and some not: a restore makes those
//!   its user namespace owns in it (`NsKind::Time` in
//!   `ProcessImage::user_owned`), the process entering it first;
//! - a namespace owned by a user namespace other than its own;
//! - ids of the process the namespace does not map.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::AsFd;

use nix::unistd::Pid;
use procfs::process::Status;

use crate::dump::seize::SeizedProcess;
use crate::image::NsKind;
use crate::image::userns::UserNs;

/// The kinds of namespace a user namespace may own that a restore makes
/// in it (and its pid namespace, made in it when nested once in ours, and
/// its time namespaces), as `/proc/PID/ns` names them.
const MADE_IN_IT: [NsKind; 5] = [
    NsKind::Uts,
    NsKind::Ipc,
    NsKind::Net,
    NsKind::Mnt,
    NsKind::Cgroup,
];

/// The user namespaces of the tree, and the one of each process in one.
#[derive(Default)]
pub struct UserPlaces {
    pub namespaces: Vec<UserNs>,
    pub of: BTreeMap<Pid, usize>,
    /// The namespaces of each process's (of the kinds a restore makes in
    /// a user namespace) that belong to its user namespace.
    pub owned: BTreeMap<Pid, Vec<NsKind>>,
}

/// A namespace's identity: the device and inode of its nsfs file.
type NsId = (u64, u64);

fn ns_id(f: impl AsFd) -> std::io::Result<NsId> {
    let st = rustix::fs::fstat(f)?;
    Ok((st.st_dev, st.st_ino))
}

/// Reads the user namespaces of the tree's live processes (`statuses`:
/// theirs; `threads_may`: whether a process may have more than one thread
/// in one, given whether its pid namespace is its user namespace's:
/// being in the tree's pid namespace, ours, or in one of its user
/// namespace's nested once in it; `makes_time`: whether a process makes
/// its own time namespace and its children's); what a restore could not
/// make again goes to `problems`.
pub fn read(
    processes: &[SeizedProcess],
    statuses: &BTreeMap<Pid, Status>,
    threads_may: impl Fn(Pid, bool) -> bool,
    makes_time: impl Fn(Pid) -> (bool, bool),
    problems: &mut Vec<String>,
) -> UserPlaces {
    let mut places = UserPlaces::default();
    let mine = match File::open("/proc/self/ns/user").and_then(ns_id) {
        Ok(id) => id,
        Err(e) => {
            problems.push(format!("our own user namespace cannot be read: {e}"));
            return places;
        }
    };
    let mut known: BTreeMap<NsId, usize> = BTreeMap::new();
    let live: Vec<&SeizedProcess> = processes.iter().filter(|p| !p.threads.is_empty()).collect();
    let opened: Vec<std::io::Result<(File, NsId)>> = (live.iter())
        .map(|p| {
            File::open(format!("/proc/{}/ns/user", p.pid)).and_then(|f| ns_id(&f).map(|id| (f, id)))
        })
        .collect();
    // A process in each namespace, through which it is read.
    let members: Vec<(Pid, &File, NsId)> = (live.iter().zip(&opened))
        .filter_map(|(p, o)| {
            let (f, id) = o.as_ref().ok()?;
            (*id != mine).then_some((p.pid, f, *id))
        })
        .collect();
    for (p, opened) in live.iter().zip(&opened) {
        let pid = p.pid;
        let (file, id) = match opened {
            Ok((f, id)) => (f, *id),
            Err(e) => {
                problems.push(format!(
                    "process {pid}'s user namespace cannot be read: {e}"
                ));
                continue;
            }
        };
        if id == mine {
            continue;
        }
        let owner = |kind: &str| owner_of(pid, kind).filter(|o| *o != mine);
        let pid_ns_owned = owner("pid") == Some(id);
        if p.threads.len() > 1 && !threads_may(pid, pid_ns_owned) {
            problems.push(format!(
                "process {pid} has {} threads in a user namespace other than rrc's and in a \
                 nested pid namespace: a restore enters the user namespace before it makes \
                 the threads (setns needs a single one), and the threads can then get their \
                 ids only as the next pids of the restorer's namespace",
                p.threads.len()
            ));
        }
        let mut owned = Vec::new();
        // The time namespaces it makes (its own, its children's): all in
        // its user namespace or none (a restore makes them all there, or
        // all outside); those it is in only are its makers'.
        let (own_time, children_time) = makes_time(pid);
        let mut made_in = Vec::new();
        let mut made_outside = Vec::new();
        for (kind, made) in [("time", own_time), ("time_for_children", children_time)] {
            match owner(kind) {
                Some(o) if o != id => problems.push(format!(
                    "process {pid}'s {kind} namespace belongs to a user namespace other than its \
                     own"
                )),
                Some(_) if made => made_in.push(kind),
                None if made => made_outside.push(kind),
                _ => {}
            }
        }
        if !made_in.is_empty() && !made_outside.is_empty() {
            problems.push(format!(
                "process {pid} made its {} namespace in its user namespace and its {} namespace \
                 outside it, which a restore does not both do",
                made_in.join(", "),
                made_outside.join(", ")
            ));
        } else if !made_in.is_empty() {
            owned.push(NsKind::Time);
        }
        for kind in ["pid", "pid_for_children"] {
            match owner(kind) {
                None => {}
                Some(o) if o == id => {}
                Some(_) => problems.push(format!(
                    "process {pid}'s {kind} namespace belongs to a user namespace other than its \
                     own"
                )),
            }
        }
        if pid_ns_owned {
            owned.push(NsKind::Pid);
        }
        for kind in MADE_IN_IT {
            match owner(kind.file()) {
                None => {}
                Some(o) if o == id => owned.push(kind),
                Some(_) => problems.push(format!(
                    "process {pid}'s {} namespace belongs to a user namespace other than its own",
                    kind.file()
                )),
            }
        }
        places.owned.insert(pid, owned);
        let recorded = record(
            id,
            file.as_fd(),
            &members,
            mine,
            &mut known,
            &mut places.namespaces,
        );
        let index = match recorded {
            Ok(i) => i,
            Err(what) => {
                problems.push(format!(
                    "process {pid} is in a user namespace {what}, which a restore does not make \
                     again"
                ));
                continue;
            }
        };
        places.of.insert(pid, index);
        if let Some(st) = statuses.get(&pid) {
            let c = crate::dump::process::creds(st);
            if !places.namespaces[index].maps(&c) {
                problems.push(format!(
                    "process {pid} has ids its user namespace does not map (uids {:?}, gids {:?}), \
                     which it could not be given again there",
                    c.uid, c.gid
                ));
            }
        }
    }
    places
}

/// The index in `namespaces` of user namespace `id` (open: `ns`),
/// recorded there if it is not yet (`known`), a parent before its
/// children. Each is read through a process of `members` in it, or
/// through a child of ours that enters it if no process of the tree is.
fn record(
    id: NsId,
    ns: std::os::fd::BorrowedFd<'_>,
    members: &[(Pid, &File, NsId)],
    mine: NsId,
    known: &mut BTreeMap<NsId, usize>,
    namespaces: &mut Vec<UserNs>,
) -> Result<usize, String> {
    if let Some(i) = known.get(&id) {
        return Ok(*i);
    }
    let parent_ns =
        crate::sys::ns_owner(ns, true).map_err(|e| format!("whose parent cannot be read ({e})"))?;
    let parent_id = ns_id(&parent_ns).map_err(|e| format!("whose parent cannot be read ({e})"))?;
    let parent = match parent_id == mine {
        true => None,
        false => Some(record(
            parent_id,
            parent_ns.as_fd(),
            members,
            mine,
            known,
            namespaces,
        )?),
    };
    let u = match members.iter().find(|(_, _, m)| *m == id) {
        Some((pid, _, _)) => namespace(*pid, ns, parent)?,
        None => {
            let visitor = crate::sys::UserNsChild::visit(ns).map_err(|e| {
                format!("no process of the tree is in, which cannot be entered ({e})")
            })?;
            let u = namespace(visitor.pid, ns, parent);
            visitor.finish();
            u?
        }
    };
    namespaces.push(u);
    known.insert(id, namespaces.len() - 1);
    Ok(namespaces.len() - 1)
}

/// User namespace `ns`, read through process `pid` in it, nested in the
/// tree's `parent` (none: ours): its owner, maps and `setgroups`.
fn namespace(
    pid: Pid,
    ns: std::os::fd::BorrowedFd<'_>,
    parent: Option<usize>,
) -> Result<UserNs, String> {
    let owner = crate::sys::user_ns_owner_uid(ns)
        .map_err(|e| format!("whose owner cannot be read ({e})"))?;
    let read = |what: &str| {
        crate::procfs::read_text(format!("/proc/{pid}/{what}"))
            .map_err(|e| format!("whose {what} cannot be read ({e})"))
    };
    let map = |what: &str| {
        UserNs::parse_map(&read(what)?).map_err(|e| format!("whose {what} is odd ({e})"))
    };
    let u = UserNs {
        owner,
        uid_map: map("uid_map")?,
        gid_map: map("gid_map")?,
        setgroups: read("setgroups")?.trim() == "allow",
        parent,
    };
    // A namespace whose maps were never written has no ids at all.
    u.check()
        .map_err(|e| format!("whose maps a restore cannot write ({e})"))?;
    Ok(u)
}

/// The user namespace that owns process `pid`'s namespace of kind `kind`
/// (`None` if it cannot be read: a children's namespace no process is in
/// yet belongs to no one yet).
fn owner_of(pid: Pid, kind: &str) -> Option<NsId> {
    File::open(format!("/proc/{pid}/ns/{kind}"))
        .and_then(|f| crate::sys::ns_owner(f.as_fd(), false))
        .and_then(ns_id)
        .ok()
}
