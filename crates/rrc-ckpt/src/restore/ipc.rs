//! The SysV IPC objects of an IPC namespace the tree owns, made again by
//! the namespace's first process, in it, before the program runs: each
//! semaphore set with its values and each message queue with its messages
//! in order, every one with its id (the namespace's next id is settable,
//! for exactly this), key, owner, mode and, for a queue, its byte limit.
//! Shared memory segments come with the memory (`mm`).

use std::collections::BTreeMap;

use crate::common::{Ns, in_ns_of};
use crate::image::{IPC_LIMITS, IpcObjects, IpcPerm};
use crate::restore::tracee::Tracee;
use crate::{Error, Result, sys};

/// Makes `objects` in `t`'s IPC namespace, which has none of their ids,
/// its limits first.
pub fn make(t: &mut Tracee, objects: &IpcObjects) -> Result<()> {
    set_limits(t, &objects.limits)?;
    for set in &objects.semaphores {
        let p = &set.perm;
        next_id(t, "sem_next_id", p.id)?;
        let id = t.call(
            "semget",
            libc::SYS_semget,
            &[p.key as u32 as u64, set.values.len() as u64, CREATE],
        )?;
        same_id(t, p, id, "semaphore set")?;
        let values: Vec<u8> = set.values.iter().flat_map(|v| v.to_ne_bytes()).collect();
        let a = t.arg(&values)?;
        t.call(
            "semctl(SETALL)",
            libc::SYS_semctl,
            &[id, 0, libc::SETALL as u64, a],
        )?;
        let ds = t.arg(&sys::semid_ds_to_set(p.uid, p.gid, p.mode))?;
        t.call(
            "semctl(IPC_SET)",
            libc::SYS_semctl,
            &[id, 0, libc::IPC_SET as u64, ds],
        )?;
    }
    for queue in &objects.queues {
        let p = &queue.perm;
        next_id(t, "msg_next_id", p.id)?;
        let id = t.call("msgget", libc::SYS_msgget, &[p.key as u32 as u64, CREATE])?;
        same_id(t, p, id, "message queue")?;
        // Its limit first: the messages may need more room than a new
        // queue has.
        let ds = t.arg(&sys::msqid_ds_to_set(p.uid, p.gid, 0o600, queue.max_bytes))?;
        t.call(
            "msgctl(IPC_SET)",
            libc::SYS_msgctl,
            &[id, libc::IPC_SET as u64, ds],
        )?;
        for m in &queue.messages {
            let mut buf = m.kind.to_ne_bytes().to_vec();
            buf.extend_from_slice(&m.text.0);
            let a = t.arg(&buf)?;
            t.call(
                "msgsnd",
                libc::SYS_msgsnd,
                &[id, a, m.text.0.len() as u64, libc::IPC_NOWAIT as u64],
            )?;
        }
        let ds = t.arg(&sys::msqid_ds_to_set(p.uid, p.gid, p.mode, queue.max_bytes))?;
        t.call(
            "msgctl(IPC_SET)",
            libc::SYS_msgctl,
            &[id, libc::IPC_SET as u64, ds],
        )?;
    }
    Ok(())
}

/// Sets the limits of `t`'s IPC namespace to `limits` where they differ
/// (writing one may need a privilege the process lacks, so only then).
fn set_limits(t: &Tracee, limits: &BTreeMap<String, String>) -> Result<()> {
    let bad = |detail: String| Error::Restore {
        pid: t.ns_pid,
        stage: "IPC limits",
        detail,
    };
    for (name, value) in limits {
        // The image names the file: only the namespace's own limits.
        if !IPC_LIMITS.contains(&name.as_str()) {
            return Err(bad(format!("{name:?} is not a limit of an IPC namespace")));
        }
        if value.is_empty()
            || !value
                .bytes()
                .all(|b| b.is_ascii_digit() || b == b' ' || b == b'\t')
        {
            return Err(bad(format!("{name} = {value:?} is not a list of numbers")));
        }
    }
    let words = |s: &str| s.split_whitespace().map(str::to_string).collect::<Vec<_>>();
    in_ns_of(t.pid, Ns::Ipc, || -> std::io::Result<()> {
        for (name, value) in limits {
            let path = format!("/proc/sys/{name}");
            if words(&std::fs::read_to_string(&path)?) != words(value) {
                std::fs::write(&path, value)
                    .map_err(|e| std::io::Error::new(e.kind(), format!("{name}: {e}")))?;
            }
        }
        Ok(())
    })?
    .map_err(|e| bad(e.to_string()))
}

/// The flags that create an object anew, readable and writable by its
/// maker until its own mode is set.
const CREATE: u64 = (libc::IPC_CREAT | libc::IPC_EXCL | 0o600) as u64;

fn same_id(t: &Tracee, p: &IpcPerm, id: u64, what: &str) -> Result<()> {
    if id == p.id as u64 {
        return Ok(());
    }
    Err(Error::Restore {
        pid: t.ns_pid,
        stage: "IPC objects",
        detail: format!("{what} {} came back as {id} (is the id taken?)", p.id),
    })
}

/// Sets the id the next object of a kind made in `t`'s IPC namespace gets
/// (`/proc/sys/kernel/{shm,sem,msg}_next_id`, `file`): a thread of ours in
/// the namespace writes it, as a container's /proc/sys is read-only.
pub fn next_id(t: &Tracee, file: &str, id: i32) -> Result<()> {
    in_ns_of(t.pid, Ns::Ipc, || {
        std::fs::write(format!("/proc/sys/kernel/{file}"), id.to_string())
    })?
    .map_err(|e| Error::Restore {
        pid: t.ns_pid,
        stage: "IPC objects",
        detail: format!("set {file}: {e}"),
    })
}
