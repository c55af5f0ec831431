//! POSIX message queues made again: each by a thread of ours in its IPC
//! namespace (entered through the namespace's first process, or the
//! first process that has it open), with its limits,
//! messages (sent in the order they were taken, which is the order they
//! are received in), owner and mode. A queue still there by its name (the
//! same host and IPC namespace: queues outlive their processes, and the
//! checkpoint left its messages in it) is that very queue. Each
//! description is opened by name there (`mq_open`, so that its flags are
//! a queue's own) and passed into the process; a queue unlinked while
//! open is made under a name of the restore's own, unlinked once its last
//! description is open (or the restore fails).

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::fs::File;
use std::os::fd::AsFd;

use nix::unistd::Pid;

use crate::common::{Ns, in_ns, ns_file};
use crate::image::{FileKind, Manifest, PosixQueue};
use crate::restore::sockets::Transport;
use crate::restore::tracee::Tracee;
use crate::{Error, Result, sys};

/// The queues made so far, by index.
#[derive(Default)]
pub struct Made(HashMap<usize, Queue>);

/// A queue made: the name it has, the namespace it is in, and how many of
/// its descriptions are still to be opened.
struct Queue {
    name: String,
    ns: File,
    pid: Pid,
    left: usize,
    /// Its name goes once every description is open.
    unlink: bool,
}

impl Queue {
    fn unlink(&mut self) {
        if std::mem::take(&mut self.unlink) {
            let name = self.name.clone();
            let _ = in_ns(&self.ns, Ns::Ipc, self.pid, move || sys::mq_unlink(&name));
        }
    }
}

impl Drop for Made {
    fn drop(&mut self) {
        for q in self.0.values_mut() {
            q.unlink();
        }
    }
}

/// Makes every queue of the image's IPC namespace `ns` ([`PosixQueue::ns`])
/// in `t`'s, new with it and `t` the first process in it: those no
/// process has open too.
pub fn make_all(t: &mut Tracee, made: &mut Made, m: &Manifest, ns: Option<i32>) -> Result<()> {
    for id in 0..m.posix_queues.len() {
        if m.posix_queues[id].ns == ns {
            made_queue(t, made, m, id)?;
        }
    }
    Ok(())
}

/// Opens queue `id` of the image for `t`, with the access mode and
/// `O_NONBLOCK` of `flags`; returns its fd in `t`.
pub fn open(
    t: &mut Tracee,
    made: &mut Made,
    m: &Manifest,
    id: usize,
    flags: u32,
    transport: &Transport,
) -> Result<u64> {
    let pid = t.ns_pid;
    let q = made_queue(t, made, m, id)?;
    let name = q.name.clone();
    let ours = in_ns(&q.ns, Ns::Ipc, q.pid, move || {
        sys::mq_open(&name, flags as libc::c_int, None)
    })?
    .map_err(|e| Error::Restore {
        pid,
        stage: "POSIX message queue",
        detail: format!("open {}: {e}", q.name),
    })?;
    q.left = q.left.saturating_sub(1);
    if q.left == 0 {
        q.unlink();
    }
    transport.pass(t, ours.as_fd())
}

/// Queue `id` of the image, made in `t`'s IPC namespace if it is not yet.
fn made_queue<'a>(
    t: &mut Tracee,
    made: &'a mut Made,
    m: &Manifest,
    id: usize,
) -> Result<&'a mut Queue> {
    let pid = t.ns_pid;
    let fail = |detail: String| Error::Restore {
        pid,
        stage: "POSIX message queue",
        detail,
    };
    Ok(match made.0.entry(id) {
        Entry::Occupied(e) => e.into_mut(),
        Entry::Vacant(e) => {
            let q = m
                .posix_queues
                .get(id)
                .ok_or_else(|| fail(format!("queue {id} is missing from the image")))?;
            check(q).map_err(|e| fail(format!("{}: {e}", q.name)))?;
            let name = if q.deleted {
                format!("/rrc-restore.{}.{id}", std::process::id())
            } else {
                q.name.clone()
            };
            let ns = ns_file(t.pid, Ns::Ipc)?;
            let maker = name.clone();
            in_ns(&ns, Ns::Ipc, t.pid, move || make(q, &maker))?
                .map_err(|e| fail(format!("{}: {e}", q.name)))?;
            let left = m
                .files
                .iter()
                .filter(|f| matches!(f.kind, FileKind::PosixQueue { queue } if queue == id))
                .count();
            e.insert(Queue {
                name,
                ns,
                pid: t.pid,
                left,
                unlink: q.deleted,
            })
        }
    })
}

/// Whether the image's queue can be made as it says.
fn check(q: &PosixQueue) -> std::result::Result<(), String> {
    if !PosixQueue::valid_name(&q.name) {
        return Err("not a name mq_open takes".into());
    }
    if q.max_messages < 1 || q.message_size < 1 {
        return Err(format!(
            "limits of {} messages of {} bytes",
            q.max_messages, q.message_size
        ));
    }
    if q.messages.len() as i64 > q.max_messages
        || q.messages
            .iter()
            .any(|msg| msg.text.0.len() as i64 > q.message_size)
    {
        return Err("more or longer messages than its limits allow".into());
    }
    Ok(())
}

/// Makes queue `q` under `name` in the calling thread's IPC namespace,
/// unless one of that name is there already.
fn make(q: &PosixQueue, name: &str) -> std::io::Result<()> {
    let create = Some((q.max_messages, q.message_size));
    let file = match sys::mq_open(name, libc::O_RDWR | libc::O_NONBLOCK, create) {
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) && !q.deleted => return Ok(()),
        r => File::from(r?),
    };
    let filled = (|| {
        for msg in &q.messages {
            sys::mq_send(file.as_fd(), msg.priority, &msg.text.0)?;
        }
        nix::unistd::fchown(&file, Some(q.owner.uid.into()), Some(q.owner.gid.into()))?;
        nix::sys::stat::fchmod(
            &file,
            nix::sys::stat::Mode::from_bits_truncate(q.owner.mode & 0o777),
        )?;
        Ok(())
    })();
    // Made for this restore: not left behind half made.
    if filled.is_err() {
        let _ = sys::mq_unlink(name);
    }
    filled
}

#[cfg(test)]
mod tests {
    use super::check;
    use crate::image::{Hex, Owner, PosixMessage, PosixQueue};

    fn queue(max_messages: i64, message_size: i64, texts: &[&str]) -> PosixQueue {
        PosixQueue {
            name: "/q".into(),
            ns: None,
            deleted: false,
            max_messages,
            message_size,
            owner: Owner {
                uid: 0,
                gid: 0,
                mode: 0o600,
            },
            messages: texts
                .iter()
                .map(|t| PosixMessage {
                    priority: 1,
                    text: Hex(t.as_bytes().to_vec()),
                })
                .collect(),
        }
    }

    #[test]
    fn an_image_queue_must_hold_what_its_limits_allow() {
        assert!(check(&queue(2, 4, &["ab", ""])).is_ok());
        assert!(check(&queue(1, 4, &["ab", "cd"])).is_err(), "too many");
        assert!(check(&queue(2, 1, &["ab"])).is_err(), "too long");
        assert!(check(&queue(0, 4, &[])).is_err(), "no room");
        assert!(check(&queue(2, -1, &[])).is_err(), "negative size");
        let mut bad = queue(2, 4, &[]);
        bad.name = "/a/b".into();
        assert!(check(&bad).is_err(), "a name with a slash");
    }
}
