//! Sockets at restore: built by the engine itself inside the process's
//! network namespace (TCP connections in repair mode, with their queues),
//! then passed into the process over a unix socket it inherited from the
//! engine, as SCM_RIGHTS.

use std::collections::HashMap;
use std::fs;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};

use nix::sys::socket::{
    AddressFamily, MsgFlags, SockFlag, SockType, SockaddrStorage, UnixAddr, bind, connect, socket,
};

use crate::image::{Blob, FileKind, ImageDir, OpenFile, SockOpt};
use crate::restore::tracee::Tracee;
use crate::unixdiag::UnixName;
use crate::{Error, Result, sys, tcp};

fn rerr(pid: i32, detail: String) -> Error {
    Error::Restore {
        pid,
        stage: "sockets",
        detail,
    }
}

pub fn is_socket(f: &OpenFile) -> bool {
    matches!(
        f.kind,
        FileKind::Tcp { .. }
            | FileKind::TcpListen { .. }
            | FileKind::Inet { .. }
            | FileKind::UnixListen { .. }
            | FileKind::UnixConnected { .. }
            | FileKind::Unix { .. }
    )
}

fn unix_addr(name: &UnixName) -> std::io::Result<UnixAddr> {
    Ok(match name {
        UnixName::Path(p) => UnixAddr::new(p.as_str())?,
        UnixName::Abstract(a) => UnixAddr::new_abstract(a)?,
    })
}

fn unix_type(ty: i32) -> SockType {
    match ty {
        libc::SOCK_DGRAM => SockType::Datagram,
        libc::SOCK_SEQPACKET => SockType::SeqPacket,
        _ => SockType::Stream,
    }
}

/// Bytes of the image's socket data.
fn blob(img: &ImageDir, b: &Blob) -> Result<Vec<u8>> {
    use std::os::unix::fs::FileExt;
    let f = img.open_socket_data()?;
    let mut data = vec![0u8; b.len as usize];
    f.read_exact_at(&mut data, b.offset)
        .map_err(|e| Error::image(&img.socket_data(), e))?;
    Ok(data)
}

/// The saved messages `messages` of `data`, one by one.
fn saved_messages(img: &ImageDir, messages: &[u32], data: &Blob) -> Result<Vec<Vec<u8>>> {
    let bytes = blob(img, data)?;
    let mut off = 0usize;
    let mut out = Vec::with_capacity(messages.len());
    for len in messages {
        let m = off
            .checked_add(*len as usize)
            .and_then(|end| bytes.get(off..end))
            .ok_or_else(|| Error::CorruptImage {
                path: img.socket_data(),
                detail: "queued messages longer than their data".into(),
            })?;
        out.push(m.to_vec());
        off += *len as usize;
    }
    Ok(out)
}

/// Queues `f`'s saved incoming messages by sending them from `from`: its
/// peer end, or (`to`) a socket sending to its name.
fn refill(
    f: &OpenFile,
    from: &OwnedFd,
    to: Option<&UnixAddr>,
    img: &ImageDir,
    pid: i32,
) -> Result<()> {
    let (FileKind::UnixConnected { messages, data, .. } | FileKind::Unix { messages, data, .. }) =
        &f.kind
    else {
        return Ok(());
    };
    for m in saved_messages(img, messages, data)? {
        let mut sent = 0;
        // A stream takes its bytes in as many writes as it likes; a
        // message goes in one.
        loop {
            let n = match to {
                Some(to) => nix::sys::socket::sendto(
                    from.as_raw_fd(),
                    &m[sent..],
                    to,
                    MsgFlags::MSG_DONTWAIT,
                ),
                None => {
                    nix::sys::socket::send(from.as_raw_fd(), &m[sent..], MsgFlags::MSG_DONTWAIT)
                }
            }
            .map_err(|e| rerr(pid, format!("requeue unix socket data: {e}")))?;
            sent += n;
            if sent >= m.len() {
                break;
            }
        }
    }
    Ok(())
}

/// A unix socket whose queue carries files in flight: filled from `from`
/// (the other end of its connection, held by the engine) once every file
/// of the tree exists, by [`send_in_flight`].
pub struct Deferred {
    file: usize,
    /// The sender of each message in turn (one for them all: the first).
    from: Vec<OwnedFd>,
    /// The socket itself, shut down as the image says once filled.
    end: OwnedFd,
    /// A datagram socket connected by name: its own name, the messages
    /// are sent to (its peer end is not ours to send from).
    to: Option<UnixAddr>,
    /// The name it connects to once every queue is in (a datagram socket
    /// connected by name; then it has no messages of its own here), after
    /// those deferred before it.
    connect: Option<UnixAddr>,
}

/// Queues `f`'s saved incoming messages from `from`, its peer end, now
/// (true); or, if they carry files in flight, notes them for
/// [`send_in_flight`], with `end`, `f`'s socket (false).
fn refill_or_defer(
    f: &OpenFile,
    from: &OwnedFd,
    end: &OwnedFd,
    img: &ImageDir,
    pid: i32,
    deferred: &mut Vec<Deferred>,
) -> Result<bool> {
    match &f.kind {
        k if !k.in_flight().is_empty() => {
            let keep = |s: &OwnedFd| {
                s.try_clone()
                    .map_err(|e| rerr(pid, format!("keep a unix socket: {e}")))
            };
            deferred.push(Deferred {
                file: f.id,
                from: vec![keep(from)?],
                end: keep(end)?,
                to: None,
                connect: None,
            });
            Ok(false)
        }
        _ => refill(f, from, None, img, pid).map(|()| true),
    }
}

/// Queues the messages of each deferred socket, each with the files it
/// carried, taken from the processes that hold them now (`holder` gives
/// the engine a copy of an open file of the image); then drops the
/// engine's ends and shuts the sockets down as the image says.
pub fn send_in_flight(
    deferred: Vec<Deferred>,
    files: &[OpenFile],
    img: &ImageDir,
    mut holder: impl FnMut(usize) -> Result<OwnedFd>,
) -> Result<()> {
    // Datagram sockets connected by name connect once every queue is in
    // (a connected one takes datagrams from its peer alone), in the order
    // they were made in.
    let mut connect_later = Vec::new();
    for d in deferred {
        let Some(f) = files.iter().find(|f| f.id == d.file) else {
            continue;
        };
        let (FileKind::UnixConnected { messages, data, .. }
        | FileKind::Unix { messages, data, .. }) = &f.kind
        else {
            continue;
        };
        let in_flight = f.kind.in_flight();
        for (i, m) in saved_messages(img, messages, data)?.iter().enumerate() {
            let carried = (in_flight.iter())
                .find(|x| x.message as usize == i)
                .map_or(&[][..], |x| &x.files[..]);
            let fds = carried
                .iter()
                .map(|&id| holder(id))
                .collect::<Result<Vec<OwnedFd>>>()?;
            let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
            let fail = |e: std::io::Error| rerr(0, format!("requeue files in flight: {e}"));
            let Some(from) = d.from.get(i).or(d.from.first()) else {
                break;
            };
            if let Some(to) = &d.to {
                sys::send_with_fds_to(from.as_fd(), m, &raw, to).map_err(fail)?;
                continue;
            }
            // The files go with the first bytes; a stream takes the rest
            // in as many writes as it likes.
            let mut sent = sys::send_with_fds(from.as_fd(), m, &raw, true).map_err(fail)?;
            while sent < m.len() {
                sent +=
                    nix::sys::socket::send(from.as_raw_fd(), &m[sent..], MsgFlags::MSG_DONTWAIT)
                        .map_err(|e| fail(e.into()))?;
            }
        }
        // A widowed socket sees its peer gone from here on.
        drop(d.from);
        match (d.connect, d.to) {
            (Some(peer), _) => connect_later.push((f, d.end, peer)),
            (None, None) => shut(f, &d.end, 0)?,
            // Shut down once connected, by its connect entry.
            (None, Some(_)) => {}
        }
    }
    for (f, end, peer) in connect_later {
        connect(end.as_raw_fd(), &peer)
            .map_err(|e| rerr(0, format!("reconnect unix socket to {peer}: {e}")))?;
        shut(f, &end, 0)?;
    }
    Ok(())
}

/// The type, name and options of a unix socket.
fn unix_parts(f: &OpenFile) -> (i32, Option<&UnixName>, &[SockOpt]) {
    match &f.kind {
        FileKind::UnixListen {
            ty, name, options, ..
        } => (*ty, Some(name), options),
        FileKind::Unix {
            ty, name, options, ..
        }
        | FileKind::UnixConnected {
            ty, name, options, ..
        } => (*ty, name.as_ref(), options),
        _ => unreachable!("unix sockets only"),
    }
}

/// A new unix socket of `f`'s type, bound to its name if it had one.
fn unix_socket(f: &OpenFile, pid: i32) -> Result<OwnedFd> {
    let (ty, name, _) = unix_parts(f);
    let s = socket(
        AddressFamily::Unix,
        unix_type(ty),
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|e| rerr(pid, format!("unix socket: {e}")))?;
    if let Some(n) = name {
        if let UnixName::Path(p) = n {
            // A socket file left by the original (now gone) is in the way.
            if fs::symlink_metadata(p)
                .is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()))
            {
                let _ = fs::remove_file(p);
            }
        }
        let a = unix_addr(n).map_err(|e| rerr(pid, format!("unix address: {e}")))?;
        bind(s.as_raw_fd(), &a).map_err(|e| rerr(pid, format!("bind unix socket {n:?}: {e}")))?;
    }
    Ok(s)
}

/// What is left to do once a unix socket holds its data: its shutdown
/// state, its options, its blocking mode.
fn finish_unix(f: &OpenFile, s: &OwnedFd, pid: i32) -> Result<()> {
    shut(f, s, pid)?;
    finish_unshut(f, s, pid)
}

/// [`finish_unix`] but for the shutdown, left for when its queue is in.
fn finish_unshut(f: &OpenFile, s: &OwnedFd, pid: i32) -> Result<()> {
    set_options(s, unix_parts(f).2, pid);
    set_nonblocking(s, f.flags).map_err(|e| rerr(pid, format!("socket flags: {e}")))
}

/// Shuts down a connected unix socket as the image says it was.
fn shut(f: &OpenFile, s: &OwnedFd, pid: i32) -> Result<()> {
    if let FileKind::UnixConnected { shutdown, .. } = f.kind {
        let how = match shutdown & 3 {
            1 => Some(nix::sys::socket::Shutdown::Read),
            2 => Some(nix::sys::socket::Shutdown::Write),
            3 => Some(nix::sys::socket::Shutdown::Both),
            _ => None,
        };
        if let Some(how) = how {
            // A peer already gone has shut this end whole.
            match nix::sys::socket::shutdown(s.as_raw_fd(), how) {
                Ok(()) | Err(nix::Error::ENOTCONN) => {}
                Err(e) => return Err(rerr(pid, format!("unix socket shutdown: {e}"))),
            }
        }
    }
    Ok(())
}

/// A listening or unconnected unix socket.
fn build_unix(
    f: &OpenFile,
    img: &ImageDir,
    pid: i32,
    deferred: &mut Vec<Deferred>,
) -> Result<OwnedFd> {
    let s = unix_socket(f, pid)?;
    match &f.kind {
        FileKind::UnixListen { backlog, .. } => {
            nix::sys::socket::listen(
                &s,
                nix::sys::socket::Backlog::new((*backlog).clamp(1, i32::MAX as u32) as i32)
                    .unwrap_or(nix::sys::socket::Backlog::MAXCONN),
            )
            .map_err(|e| rerr(pid, format!("listen: {e}")))?;
        }
        FileKind::Unix {
            name: Some(n),
            messages,
            ..
        } if !messages.is_empty() => {
            // Messages that were queued to it come again from an unnamed
            // sender, as they came from unnamed (or gone) ones; connected
            // to it here (in its network namespace) if the files they
            // carry are to be sent later.
            let to = unix_addr(n).map_err(|e| rerr(pid, format!("unix address: {e}")))?;
            let sender = unnamed_sender(pid)?;
            if f.kind.in_flight().is_empty() {
                refill(f, &sender, Some(&to), img, pid)?;
            } else {
                connect(sender.as_raw_fd(), &to)
                    .map_err(|e| rerr(pid, format!("connect to {n:?}: {e}")))?;
                refill_or_defer(f, &sender, &s, img, pid, deferred)?;
            }
        }
        _ => {}
    }
    Ok(s)
}

/// A datagram socket without a name, to send from.
fn unnamed_sender(pid: i32) -> Result<OwnedFd> {
    socket(
        AddressFamily::Unix,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|e| rerr(pid, format!("unix socket: {e}")))
}

/// A client of a connection not yet accepted: connected to its listener
/// again, where it waits in the accept queue.
fn reconnect_client(f: &OpenFile, listener: &UnixName, pid: i32) -> Result<OwnedFd> {
    let s = unix_socket(f, pid)?;
    let a = unix_addr(listener).map_err(|e| rerr(pid, format!("unix address: {e}")))?;
    connect(s.as_raw_fd(), &a)
        .map_err(|e| rerr(pid, format!("connect again to {listener:?}: {e}")))?;
    Ok(s)
}

/// The unix sockets made so far: where each inode's socket is in the
/// output, and which files are done.
#[derive(Default)]
struct Made {
    at: HashMap<u32, usize>,
    done: std::collections::HashSet<usize>,
}

impl Made {
    fn keep(&mut self, f: &OpenFile, s: OwnedFd, out: &mut Vec<(usize, OwnedFd, bool)>) {
        if let Some(ino) = f.kind.unix_ino() {
            self.at.insert(ino, out.len());
        }
        self.done.insert(f.id);
        out.push((f.id, s, false));
    }
}

/// The unix sockets among `files`, made in the order their connections
/// need: every bound or listening socket (with the connections its clients
/// had not seen accepted) before the sockets connected to them.
fn build_unix_all(
    files: &[&OpenFile],
    img: &ImageDir,
    pid: i32,
    out: &mut Vec<(usize, OwnedFd, bool)>,
    deferred: &mut Vec<Deferred>,
) -> Result<()> {
    let unix: Vec<&OpenFile> = files
        .iter()
        .copied()
        .filter(|f| f.kind.unix_ino().is_some())
        .collect();
    let connected = |f: &OpenFile| match f.kind {
        FileKind::UnixConnected { ino, peer, .. } => Some((ino, peer)),
        _ => None,
    };
    let by_ino: HashMap<u32, &OpenFile> = unix
        .iter()
        .filter_map(|f| Some((f.kind.unix_ino()?, *f)))
        .collect();
    // Whether socket `ino`'s peer is connected back to it.
    let is_mutual = |ino: u32, peer: u32| {
        by_ino
            .get(&peer)
            .and_then(|o| connected(o))
            .is_some_and(|(_, back)| back == ino)
    };
    let mut made = Made::default();
    // Sockets others connect to.
    for f in &unix {
        let s = match &f.kind {
            FileKind::Unix { .. } => build_unix(f, img, pid, deferred)?,
            FileKind::UnixListen { name, pending, .. } => {
                let s = build_unix(f, img, pid, deferred)?;
                finish_unix(f, &s, pid)?;
                made.keep(f, s, out);
                for e in pending {
                    let c = by_ino.get(e).ok_or_else(|| {
                        rerr(pid, "a connection not yet accepted has no client".into())
                    })?;
                    let cs = reconnect_client(c, name, pid)?;
                    finish_unix(c, &cs, pid)?;
                    made.keep(c, cs, out);
                }
                continue;
            }
            _ => continue,
        };
        finish_unix(f, &s, pid)?;
        made.keep(f, s, out);
    }
    // Datagram sockets connected by name: all made and bound, then their
    // queues filled (from their peer where it is in the tree, so a reply
    // keeps its sender), then connected, as a socket connected to one
    // takes messages from it alone.
    let by_name: Vec<&OpenFile> = unix
        .iter()
        .copied()
        .filter(|f| {
            matches!(f.kind, FileKind::UnixConnected { ty, peer_name: Some(_), .. }
                if ty == libc::SOCK_DGRAM)
        })
        .collect();
    let mut bound = HashMap::new();
    for f in &by_name {
        bound.insert(f.id, unix_socket(f, pid)?);
    }
    // Queues carrying files in flight are filled once every file exists:
    // those sockets, and all of this batch after them, connect then.
    let late = by_name.iter().any(|f| !f.kind.in_flight().is_empty());
    let keep = |s: &OwnedFd| {
        s.try_clone()
            .map_err(|e| rerr(pid, format!("keep a unix socket: {e}")))
    };
    // The datagram socket of the tree bound to a name, made by now.
    let named = |n: &UnixName| -> Option<&OwnedFd> {
        unix.iter().find_map(|f| {
            let (ty, name, _) = unix_parts(f);
            if ty != libc::SOCK_DGRAM || name != Some(n) {
                return None;
            }
            bound.get(&f.id).or_else(|| {
                let FileKind::Unix { ino, .. } = f.kind else {
                    return None;
                };
                made.at.get(&ino).map(|&at| &out[at].1)
            })
        })
    };
    for f in &by_name {
        let (_, name, _) = unix_parts(f);
        let Some(name) = name else {
            if matches!(&f.kind, FileKind::UnixConnected { messages, .. } if !messages.is_empty()) {
                tracing::warn!(pid, "an unnamed datagram socket's queued messages are lost");
            }
            continue;
        };
        let to = unix_addr(name).map_err(|e| rerr(pid, format!("unix address: {e}")))?;
        let carries_files = !f.kind.in_flight().is_empty();
        let unnamed = unnamed_sender(pid)?;
        let senders: Vec<&OwnedFd> = match &f.kind {
            FileKind::UnixConnected {
                senders, messages, ..
            } if !senders.is_empty() => {
                // Each message from its own sender: a socket of the tree
                // of that name, or one without a name.
                (senders.iter().take(messages.len()))
                    .map(|from| match from {
                        None => &unnamed,
                        Some(n) => named(n).unwrap_or_else(|| {
                            tracing::warn!(pid, "a datagram from {n:?}, outside the tree, comes from a socket without a name");
                            &unnamed
                        }),
                    })
                    .collect()
            }
            _ => {
                let peer = connected(f).map(|(_, p)| p).unwrap_or(0);
                let from_peer = made
                    .at
                    .get(&peer)
                    .map(|&at| &out[at].1)
                    .or_else(|| by_ino.get(&peer).and_then(|o| bound.get(&o.id)));
                vec![from_peer.unwrap_or(&unnamed)]
            }
        };
        if carries_files {
            deferred.push(Deferred {
                file: f.id,
                from: senders.into_iter().map(keep).collect::<Result<_>>()?,
                end: keep(&bound[&f.id])?,
                to: Some(to),
                connect: None,
            });
            continue;
        }
        let FileKind::UnixConnected { messages, data, .. } = &f.kind else {
            continue;
        };
        for (i, m) in saved_messages(img, messages, data)?.iter().enumerate() {
            let Some(from) = senders.get(i).or(senders.first()) else {
                break;
            };
            nix::sys::socket::sendto(from.as_raw_fd(), m, &to, MsgFlags::MSG_DONTWAIT)
                .map_err(|e| rerr(pid, format!("requeue unix socket data: {e}")))?;
        }
    }
    // Once connected, a socket takes datagrams from its peer alone, and
    // refuses a connect() from any other: the sockets connected to it one
    // way connect first.
    let one_way = |f: &OpenFile| connected(f).filter(|&(ino, peer)| !is_mutual(ino, peer));
    let mut left: Vec<&OpenFile> = by_name.clone();
    while !left.is_empty() {
        let awaited: std::collections::HashSet<u32> = left
            .iter()
            .filter_map(|f| one_way(f))
            .map(|(_, peer)| peer)
            .collect();
        let (now, later): (Vec<&OpenFile>, Vec<&OpenFile>) = left
            .iter()
            .partition(|f| connected(f).is_none_or(|(ino, _)| !awaited.contains(&ino)));
        // A cycle of one-way connections (no order works): in file order,
        // and the kernel says what fails.
        let (now, later) = if now.is_empty() {
            (later, Vec::new())
        } else {
            (now, later)
        };
        for f in now {
            let FileKind::UnixConnected {
                peer_name: Some(p), ..
            } = &f.kind
            else {
                continue;
            };
            let a = unix_addr(p).map_err(|e| rerr(pid, format!("unix address: {e}")))?;
            if late {
                // Once the queues deferred are in, in this order.
                deferred.push(Deferred {
                    file: f.id,
                    from: Vec::new(),
                    end: keep(&bound[&f.id])?,
                    to: None,
                    connect: Some(a),
                });
                continue;
            }
            connect(bound[&f.id].as_raw_fd(), &a)
                .map_err(|e| rerr(pid, format!("reconnect unix socket to {p:?}: {e}")))?;
        }
        left = later;
    }
    for f in &by_name {
        let s = bound.remove(&f.id).expect("made above");
        if late {
            // Shut down once connected.
            finish_unshut(f, &s, pid)?;
        } else {
            finish_unix(f, &s, pid)?;
        }
        made.keep(f, s, out);
    }
    // Connections made as pairs: both ends in the tree, or one end alone
    // whose peer is gone.
    for f in &unix {
        let Some((ino, peer)) = connected(f) else {
            continue;
        };
        if made.done.contains(&f.id) {
            continue;
        }
        let ty = unix_parts(f).0;
        let mutual = is_mutual(ino, peer);
        if !mutual && peer != 0 {
            return Err(rerr(
                pid,
                format!(
                    "a unix socket (inode {ino}) is connected to {peer}, which is not connected back"
                ),
            ));
        }
        // A fresh pair, each end's incoming data sent from the other; an
        // end whose peer is gone keeps its data and sees the other end
        // closed.
        let (a, b) = nix::sys::socket::socketpair(
            AddressFamily::Unix,
            unix_type(ty),
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .map_err(|e| rerr(pid, format!("socketpair: {e}")))?;
        // A socket whose queue carries files is shut down (by hand, or by
        // its peer's going) only once that queue is in.
        if mutual {
            let other = by_ino[&peer];
            let now = refill_or_defer(f, &b, &a, img, pid, deferred)?;
            let other_now = refill_or_defer(other, &a, &b, img, pid, deferred)?;
            if now {
                shut(f, &a, pid)?;
            }
            if other_now {
                shut(other, &b, pid)?;
            }
            finish_unshut(f, &a, pid)?;
            finish_unshut(other, &b, pid)?;
            made.keep(f, a, out);
            made.keep(other, b, out);
        } else {
            // Closed once its data is in, now or with the files in flight.
            let now = refill_or_defer(f, &b, &a, img, pid, deferred)?;
            drop(b);
            if now {
                shut(f, &a, pid)?;
            }
            finish_unshut(f, &a, pid)?;
            made.keep(f, a, out);
        }
    }
    Ok(())
}

fn parse_addr(pid: i32, s: &str) -> Result<std::net::SocketAddr> {
    s.parse().map_err(|_| rerr(pid, format!("bad address {s}")))
}

/// Puts the saved options on `fd`; one that cannot be set (a device or
/// congestion control this host lacks) is said, and the socket goes on
/// without it.
fn set_options(fd: &OwnedFd, options: &[SockOpt], pid: i32) {
    for failed in crate::sockopt::apply(fd.as_fd(), options) {
        tracing::warn!(pid, "a socket option is not restored: {failed}");
    }
}

fn set_nonblocking(fd: &OwnedFd, flags: u32) -> std::io::Result<()> {
    if flags & libc::O_NONBLOCK as u32 != 0 {
        nonblocking(fd, true)?;
    }
    Ok(())
}

/// Puts `fd` in non-blocking mode (`on`) or in blocking mode.
fn nonblocking(fd: &OwnedFd, on: bool) -> std::io::Result<()> {
    let cur = nix::fcntl::OFlag::from_bits_truncate(nix::fcntl::fcntl(
        fd,
        nix::fcntl::FcntlArg::F_GETFL,
    )?);
    let mut new = cur;
    new.set(nix::fcntl::OFlag::O_NONBLOCK, on);
    if new != cur {
        nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_SETFL(new))?;
    }
    Ok(())
}

/// Builds one socket (in the calling thread's network namespace). TCP
/// connections come back in repair mode: `true` says so.
fn build(f: &OpenFile, img: &ImageDir, pid: i32) -> Result<(OwnedFd, bool)> {
    let io = |what: &str| {
        let what = what.to_string();
        move |e: std::io::Error| rerr(pid, format!("{what}: {e}"))
    };
    match &f.kind {
        FileKind::Tcp {
            local,
            peer,
            tcp: st,
            options,
            data,
        } => {
            let (l, p) = (parse_addr(pid, local)?, parse_addr(pid, peer)?);
            let path = img.socket_data();
            let data = blob(img, data)?;
            let n = st.sndq_len as usize;
            if data.len() != n + st.rcvq_len as usize {
                return Err(Error::CorruptImage {
                    path,
                    detail: "queued data does not match the connection's record".into(),
                });
            }
            let s = connection(pid, &l, &p, st, (&data[..n], &data[n..]), options)?;
            set_nonblocking(&s, f.flags).map_err(io("socket flags"))?;
            Ok((s, true))
        }
        FileKind::TcpListen {
            addr,
            backlog,
            options,
        } => {
            let a = parse_addr(pid, addr)?;
            let fam = if a.is_ipv4() {
                AddressFamily::Inet
            } else {
                AddressFamily::Inet6
            };
            let s = socket(fam, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)
                .map_err(|e| io("socket")(e.into()))?;
            set_options(&s, options, pid);
            bind(s.as_raw_fd(), &SockaddrStorage::from(a))
                .map_err(|e| io(&format!("bind {addr}"))(e.into()))?;
            let backlog = nix::sys::socket::Backlog::new((*backlog).min(i32::MAX as u32) as i32)
                .unwrap_or(nix::sys::socket::Backlog::MAXCONN);
            nix::sys::socket::listen(&s, backlog)
                .map_err(|e| io(&format!("listen on {addr}"))(e.into()))?;
            set_nonblocking(&s, f.flags).map_err(io("socket flags"))?;
            Ok((s, false))
        }
        FileKind::Inet {
            family,
            ty,
            local,
            peer,
            options,
        } => {
            let fam = if *family == libc::AF_INET6 {
                AddressFamily::Inet6
            } else {
                AddressFamily::Inet
            };
            let sty = if *ty == libc::SOCK_DGRAM {
                SockType::Datagram
            } else {
                SockType::Stream
            };
            let s = socket(fam, sty, SockFlag::SOCK_CLOEXEC, None)
                .map_err(|e| io("socket")(e.into()))?;
            set_options(&s, options, pid);
            if let Some(l) = local {
                let a = SockaddrStorage::from(parse_addr(pid, l)?);
                bind(s.as_raw_fd(), &a).map_err(|e| io(&format!("bind {l}"))(e.into()))?;
            }
            if let Some(p) = peer {
                let a = SockaddrStorage::from(parse_addr(pid, p)?);
                if sty == SockType::Stream {
                    // A connection under way: its SYN is sent again and the
                    // program sees it complete (or fail) as it would have.
                    nonblocking(&s, true).map_err(io("socket flags"))?;
                    match connect(s.as_raw_fd(), &a) {
                        Ok(()) | Err(nix::Error::EINPROGRESS) => {}
                        Err(e) => tracing::warn!(
                            pid,
                            peer = %p,
                            error = %e,
                            "a connection under way failed again at once: its socket is left unconnected"
                        ),
                    }
                    // A blocking connect() the program is in goes on
                    // waiting once restarted.
                    nonblocking(&s, f.flags & libc::O_NONBLOCK as u32 != 0)
                        .map_err(io("socket flags"))?;
                } else {
                    connect(s.as_raw_fd(), &a)
                        .map_err(|e| io(&format!("connect {p}"))(e.into()))?;
                }
            }
            set_nonblocking(&s, f.flags).map_err(io("socket flags"))?;
            Ok((s, false))
        }
        _ => unreachable!("only sockets are built here"),
    }
}

/// A TCP connection to build as described (a takeover's: a checkpoint's
/// connection advanced by what happened since, or one accepted since).
#[derive(Debug, Clone)]
pub struct Connection {
    pub local: std::net::SocketAddr,
    pub peer: std::net::SocketAddr,
    pub state: crate::tcp::TcpState,
    pub sndq: Vec<u8>,
    pub rcvq: Vec<u8>,
    /// Socket options as a checkpoint saves them.
    pub options: Vec<SockOpt>,
}

/// Builds `conns` in the network namespace of process `pid`, in repair
/// mode (nothing is sent until the caller lets each go with
/// [`crate::tcp::leave_repair`]).
pub fn build_connections(pid: nix::unistd::Pid, conns: &[Connection]) -> Result<Vec<OwnedFd>> {
    crate::common::in_netns_of(pid, || {
        conns
            .iter()
            .map(|c| {
                connection(
                    pid.as_raw(),
                    &c.local,
                    &c.peer,
                    &c.state,
                    (&c.sndq, &c.rcvq),
                    &c.options,
                )
            })
            .collect()
    })?
}

/// A TCP connection in repair mode as `st` and the queues `(sndq, rcvq)`
/// describe it, half-closed if it was, with its socket options (in the
/// calling thread's network namespace; `pid` names the process it is for,
/// in errors).
fn connection(
    pid: i32,
    local: &std::net::SocketAddr,
    peer: &std::net::SocketAddr,
    st: &crate::tcp::TcpState,
    (sndq, rcvq): (&[u8], &[u8]),
    options: &[SockOpt],
) -> Result<OwnedFd> {
    let s = tcp::build(local, peer, st, sndq, rcvq).map_err(|e| {
        rerr(
            pid,
            format!("rebuild TCP connection {local} -> {peer}: {e}"),
        )
    })?;
    if tcp::needs_peer_packet(st.state) {
        tcp::inject_peer_packet(local, peer, st).map_err(|e| {
            rerr(
                pid,
                format!("half-close TCP connection {local} -> {peer}: {e}"),
            )
        })?;
    }
    set_options(&s, options, pid);
    Ok(s)
}

/// The engine's end of the fd transport, and the number the processes
/// know the other end by (inherited from the engine at fork).
pub struct Transport {
    ours: OwnedFd,
    theirs: OwnedFd,
}

impl Transport {
    pub fn new() -> Result<Transport> {
        let (ours, theirs) = nix::sys::socket::socketpair(
            AddressFamily::Unix,
            SockType::Datagram,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .map_err(|e| Error::io("fd transport")(e.into()))?;
        Ok(Transport { ours, theirs })
    }

    fn tracee_fd(&self) -> RawFd {
        self.theirs.as_raw_fd()
    }

    /// Puts `fd` (one of the engine's) into `t`'s fd table; returns its
    /// number there (close-on-exec, as the caller will set it later).
    pub fn pass(&self, t: &mut Tracee, fd: BorrowedFd<'_>) -> Result<u64> {
        sys::send_fds(self.ours.as_fd(), &[fd.as_raw_fd()])
            .map_err(|e| rerr(t.ns_pid, format!("pass a file: {e}")))?;
        let got = receive(t, self.tracee_fd(), 1)?;
        Ok(got[0])
    }
}

/// At most this many fds travel in one message (the kernel's SCM_MAX_FD).
const BATCH: usize = 250;

/// Builds `files` for process `t` and puts them in its fd table; returns
/// (file id, fd in the process) and keeps the repair-mode connections in
/// `repaired` so they can leave repair mode once the tree runs.
pub fn create(
    t: &mut Tracee,
    files: &[&OpenFile],
    img: &ImageDir,
    transport: &Transport,
    repaired: &mut Vec<Repaired>,
    deferred: &mut Vec<Deferred>,
) -> Result<Vec<(usize, u64)>> {
    let pid = t.ns_pid;
    // The thread that builds them does not see the image by its path.
    let _ = img.open_socket_data();
    let built = crate::common::in_view_of(t.pid, || -> Result<Vec<(usize, OwnedFd, bool)>> {
        let mut out = Vec::new();
        build_unix_all(files, img, pid, &mut out, deferred)?;
        for f in files {
            if f.kind.unix_ino().is_some() {
                continue;
            }
            let (s, r) = build(f, img, pid)?;
            out.push((f.id, s, r));
        }
        Ok(out)
    })??;
    let mut out = Vec::with_capacity(built.len());
    for chunk in built.chunks(BATCH) {
        let raw: Vec<RawFd> = chunk.iter().map(|(_, s, _)| s.as_raw_fd()).collect();
        sys::send_fds(transport.ours.as_fd(), &raw)
            .map_err(|e| rerr(pid, format!("pass sockets: {e}")))?;
        let fds = receive(t, transport.tracee_fd(), raw.len())?;
        out.extend(chunk.iter().zip(fds).map(|((id, _, _), fd)| (*id, fd)));
    }
    for (id, s, in_repair) in built {
        if in_repair {
            // Leaving repair mode clears SO_REUSEADDR: note what to put back.
            let reuse = files
                .iter()
                .find(|f| f.id == id)
                .map_or(0, |f| match &f.kind {
                    FileKind::Tcp { options, .. } => tcp::saved_reuseaddr(options),
                    _ => 0,
                });
            repaired.push(Repaired {
                fd: s,
                reuseaddr: reuse,
            });
        }
    }
    Ok(out)
}

/// A restored connection still in repair mode.
pub struct Repaired {
    pub fd: OwnedFd,
    pub reuseaddr: i32,
}

impl Repaired {
    /// Ends repair mode (the window probe makes the peer resend what it
    /// must) and puts back what leaving repair mode resets.
    pub fn finish(&self) -> std::io::Result<()> {
        tcp::leave_repair_keeping(self.fd.as_fd(), self.reuseaddr, true)
    }
}

/// Makes the process receive one SCM_RIGHTS message of `n` fds on `sock`;
/// returns the fd numbers it got.
fn receive(t: &mut Tracee, sock: RawFd, n: usize) -> Result<Vec<u64>> {
    let pid = t.ns_pid;
    let data = t.out(8)?;
    let mut iov = Vec::with_capacity(16);
    iov.extend_from_slice(&data.to_ne_bytes());
    iov.extend_from_slice(&8u64.to_ne_bytes());
    let iov = t.arg(&iov)?;
    // CMSG_SPACE(4 n): a 16-byte header and the fds, 8-byte aligned.
    let cmsg_len = 16 + (4 * n).next_multiple_of(8);
    let cmsg = t.out(cmsg_len)?;
    let mut msg = vec![0u8; 56];
    msg[16..24].copy_from_slice(&iov.to_ne_bytes());
    msg[24..32].copy_from_slice(&1u64.to_ne_bytes());
    msg[32..40].copy_from_slice(&cmsg.to_ne_bytes());
    msg[40..48].copy_from_slice(&(cmsg_len as u64).to_ne_bytes());
    let msg = t.arg(&msg)?;
    t.call(
        "receive sockets",
        libc::SYS_recvmsg,
        &[sock as u64, msg, libc::MSG_CMSG_CLOEXEC as u64],
    )?;
    let mut buf = vec![0u8; cmsg_len];
    crate::procmem::read(t.pid, cmsg, &mut buf)?;
    let level = i32::from_ne_bytes(buf[8..12].try_into().expect("4 bytes"));
    let ty = i32::from_ne_bytes(buf[12..16].try_into().expect("4 bytes"));
    if level != libc::SOL_SOCKET || ty != libc::SCM_RIGHTS {
        return Err(rerr(pid, "no fds arrived".into()));
    }
    Ok(buf[16..16 + 4 * n]
        .chunks_exact(4)
        .map(|c| u64::from(u32::from_ne_bytes(c.try_into().expect("4 bytes"))))
        .collect())
}
