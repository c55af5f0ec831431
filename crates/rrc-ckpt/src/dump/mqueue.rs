//! POSIX message queues (`mq_open`) open in the tree. A queue cannot be
//! read without taking its messages, so each is read through a
//! description of our own: every message taken, then sent again in the
//! order taken (highest priority first, the oldest first within one),
//! which leaves the queue as it was. A queue is saved once, however many
//! descriptions of it the tree holds.

use std::collections::HashMap;
use std::fs::{Metadata, OpenOptions};
use std::os::fd::AsFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};

use crate::image::{Hex, Owner, PosixMessage, PosixQueue};
use crate::{Error, Result, sys};

/// `MQUEUE_MAGIC`, the queues' file system type.
const MQUEUE_MAGIC: i64 = 0x1980_0202;

/// The queues met so far.
#[derive(Default)]
pub struct Queues {
    pub saved: Vec<PosixQueue>,
    /// Where each is in `saved`, by (device, inode).
    index: HashMap<(u64, u64), usize>,
}

impl Queues {
    /// Gives each queue its IPC namespace: the one whose queue file system
    /// is the queue's device (`namespaces`: device and namespace, as
    /// [`PosixQueue::ns`] names it); none (the root's) for a device of
    /// none of them.
    pub fn set_namespaces(&mut self, namespaces: &HashMap<u64, Option<i32>>) {
        for (&(dev, _), &id) in &self.index {
            if let Some(ns) = namespaces.get(&dev) {
                self.saved[id].ns = *ns;
            }
        }
    }
}

/// Whether fd `fd` of `pid`, a regular file by its mode, is a POSIX
/// message queue (asked only of files on a device with no disk behind it,
/// where the queues' file system is).
pub fn is_queue(pid: i32, fd: i32, meta: &Metadata) -> bool {
    if libc::major(meta.dev()) != 0 || meta.mode() & libc::S_IFMT != libc::S_IFREG {
        return false;
    }
    nix::sys::statfs::statfs(format!("/proc/{pid}/fd/{fd}").as_str())
        .is_ok_and(|s| s.filesystem_type().0 == MQUEUE_MAGIC)
}

impl Queues {
    /// The queue fd `fd` of `pid` (its /proc link `link`) is a description
    /// of, saved the first time it is met; or why it cannot be.
    pub fn queue(
        &mut self,
        pid: i32,
        fd: i32,
        link: &str,
        meta: &Metadata,
    ) -> Result<std::result::Result<usize, String>> {
        if let Some(&id) = self.index.get(&(meta.dev(), meta.ino())) {
            return Ok(Ok(id));
        }
        // Our own description: the process's may be write-only, or block.
        let ours = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(format!("/proc/{pid}/fd/{fd}"))
            .map_err(|e| Error::Proc {
                pid,
                what: "POSIX message queue",
                detail: format!("fd {fd} ({link}): {e}"),
            })?;
        self.save(&ours, link).map_err(|e| Error::Proc {
            pid,
            what: "POSIX message queue",
            detail: format!("fd {fd}: {e}"),
        })
    }

    /// Saves a queue of the tree's IPC namespace that no process has open,
    /// read through `file`, opened read-write and non-blocking (unless it
    /// was met already).
    pub fn unheld(
        &mut self,
        name: &str,
        file: &std::fs::File,
    ) -> std::io::Result<std::result::Result<usize, String>> {
        let meta = file.metadata()?;
        if let Some(&id) = self.index.get(&(meta.dev(), meta.ino())) {
            return Ok(Ok(id));
        }
        self.save(file, &format!("/{name}"))
    }

    /// Saves queue `name` (" (deleted)" after it if it has no name left),
    /// read through `ours`, a description of our own, read-write and
    /// non-blocking.
    fn save(
        &mut self,
        ours: &std::fs::File,
        name: &str,
    ) -> std::io::Result<std::result::Result<usize, String>> {
        let deleted = name.ends_with(" (deleted)");
        let name = name.trim_end_matches(" (deleted)");
        if !PosixQueue::valid_name(name) {
            return Ok(Err(format!(
                "a POSIX message queue whose name mq_open does not take ({name:?})"
            )));
        }
        if sys::mq_notify_pid(ours.as_fd())? != 0 {
            return Ok(Err(format!(
                "POSIX message queue {name}, which someone asked to be notified by \
                 (mq_notify): what the notification does cannot be read back"
            )));
        }
        let meta = ours.metadata()?;
        let (max_messages, message_size, count) = sys::mq_attr(ours.as_fd())?;
        let (messages, taking) = take_all(ours, count, message_size);
        put_back(ours, &messages).map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!(
                    "{name}: {} of its messages taken to be read could not be sent back: {e}",
                    messages.len()
                ),
            )
        })?;
        taking?;
        let id = self.saved.len();
        self.saved.push(PosixQueue {
            name: name.to_string(),
            ns: None,
            deleted,
            max_messages,
            message_size,
            owner: Owner {
                uid: meta.uid(),
                gid: meta.gid(),
                mode: meta.mode() & 0o777,
            },
            messages,
        });
        self.index.insert((meta.dev(), meta.ino()), id);
        Ok(Ok(id))
    }
}

/// Takes the `count` messages of queue `q` (at most `size` bytes each),
/// and says whether all could be.
fn take_all(q: &std::fs::File, count: i64, size: i64) -> (Vec<PosixMessage>, std::io::Result<()>) {
    let mut messages = Vec::new();
    for _ in 0..count {
        match sys::mq_receive(q.as_fd(), size.max(0) as usize) {
            Ok((priority, text)) => messages.push(PosixMessage {
                priority,
                text: Hex(text),
            }),
            Err(e) => return (messages, Err(e)),
        }
    }
    (messages, Ok(()))
}

/// Sends `messages` to `q` again, in order.
fn put_back(q: &std::fs::File, messages: &[PosixMessage]) -> std::io::Result<()> {
    for m in messages {
        sys::mq_send(q.as_fd(), m.priority, &m.text.0)?;
    }
    Ok(())
}
