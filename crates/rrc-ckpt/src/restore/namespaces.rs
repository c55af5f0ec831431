//! Namespaces of the tree's own, made again. A UTS namespace: its first
//! process unshares one and names it before its children are forked. Pid
//! namespaces nested in the tree's: the first process of each is forked
//! with `CLONE_NEWPID`, every process and thread with its pids at every
//! level (`clone3`'s `set_tid`, the innermost first), and a parent whose
//! next children go elsewhere than its own namespace is pointed there
//! (`setns` with a pidfd) or unshared once its children are made.

use std::collections::BTreeMap;

use crate::Result;
use crate::image::{ChildrenPidNs, ProcessImage, ThreadImage, UtsNames};
use crate::restore::tracee::Tracee;

/// Pid namespaces below the host's the kernel allows (`MAX_PID_NS_LEVEL`).
const MAX_NESTING: usize = 32;

/// The longest host or domain name (`__NEW_UTS_LEN`).
const UTS_LEN: usize = 64;

/// Makes `t` the first process of a UTS namespace of its own, named
/// `names`.
pub fn own_uts(t: &mut Tracee, names: &UtsNames) -> Result<()> {
    t.call(
        "unshare(CLONE_NEWUTS)",
        libc::SYS_unshare,
        &[libc::CLONE_NEWUTS as u64],
    )?;
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
        if let Some(u) = &p.uts {
            let bad = |n: &str| n.len() > UTS_LEN || n.contains('\0');
            if pid == root || p.zombie.is_some() || bad(&u.hostname) || bad(&u.domainname) {
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
        let bad: [(&str, Spoil); 7] = [
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
