//! Pseudo-terminal pairs made again.
//!
//! A pair is made by the first process of the tree that needs either end,
//! by opening /dev/ptmx where it sees it (its own devpts instance in a
//! container) until the kernel gives the number the image names: the
//! kernel gives the lowest free one, so the numbers below are held open
//! meanwhile, and a number already taken on this host is an error. The
//! engine keeps the master and passes every description of it in. A
//! terminal is opened by its path where the process sees it, and kept only
//! if that is the very pair (checked against a description made from the
//! master, `TIOCGPTPEER`, which is passed in instead otherwise). The
//! terminal's settings and the output its master had not read come back
//! first; the session's controlling terminal when its leader is restored
//! (before its children are forked, who inherit it), its foreground group
//! once they are; the exclusive mode once every process exists.

use std::collections::HashMap;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use crate::image::{Manifest, Pty};
use crate::restore::sockets::Transport;
use crate::restore::tracee::Tracee;
use crate::sys::tty;
use crate::{Error, Result, nr, sys};

/// The engine's master of each pair made, by index in the manifest.
#[derive(Default)]
pub struct Made(HashMap<usize, OwnedFd>);

fn rerr(pid: i32, detail: String) -> Error {
    Error::Restore {
        pid,
        stage: "pseudo-terminal",
        detail,
    }
}

impl Made {
    /// The master of pair `id`, made in `t` if it is not yet.
    fn master_of(&mut self, t: &mut Tracee, m: &Manifest, id: usize) -> Result<BorrowedFd<'_>> {
        let master: &OwnedFd = match self.0.entry(id) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                let pty = m.ptys.get(id).ok_or_else(|| {
                    rerr(t.ns_pid, format!("no pseudo-terminal {id} in the image"))
                })?;
                e.insert(make(t, pty)?)
            }
        };
        Ok(master.as_fd())
    }

    /// A description of pair `id`'s master in `t`; its fd there.
    pub fn master(
        &mut self,
        t: &mut Tracee,
        m: &Manifest,
        id: usize,
        transport: &Transport,
    ) -> Result<u64> {
        let master = self
            .master_of(t, m, id)?
            .try_clone_to_owned()
            .map_err(io(t))?;
        transport.pass(t, master.as_fd())
    }

    /// A new description of pair `id`'s terminal in `t`, with `flags`'
    /// access mode and `O_NONBLOCK`; its fd there. Opened by its path
    /// where `t` sees it, as `open` gives status flags a description made
    /// from the master lacks (`O_LARGEFILE`), and only if that path leads
    /// to this very pair; made from the master where it does not.
    pub fn terminal(
        &mut self,
        t: &mut Tracee,
        m: &Manifest,
        id: usize,
        flags: u32,
        transport: &Transport,
    ) -> Result<u64> {
        let index = m.ptys[id].index;
        let peer = tty::peer(self.master_of(t, m, id)?, flags as i32).map_err(io(t))?;
        let ours = nix::sys::stat::fstat(&peer).map_err(|e| io(t)(e.into()))?;
        let path = t.arg_str(&format!("/dev/pts/{index}"))?;
        let open_flags = (flags as i32 & (libc::O_ACCMODE | libc::O_NONBLOCK))
            | libc::O_NOCTTY
            | libc::O_CLOEXEC;
        let r = t.raw_on(
            t.pid,
            nr::SYS_openat,
            &[libc::AT_FDCWD as u64, path, open_flags as u64],
        )?;
        if r >= 0 {
            let fd = r as u64;
            let same = std::fs::metadata(format!("/proc/{}/fd/{fd}", t.pid)).is_ok_and(|st| {
                use std::os::unix::fs::MetadataExt;
                st.dev() == ours.st_dev && st.rdev() == ours.st_rdev
            });
            if same {
                return Ok(fd);
            }
            t.call("close", nr::SYS_close, &[fd])?;
        }
        transport.pass(t, peer.as_fd())
    }

    /// Gives `t`, the leader of its session, the controlling terminal the
    /// session had, if it is a pair of the image.
    pub fn controlling(
        &mut self,
        t: &mut Tracee,
        m: &Manifest,
        transport: &Transport,
    ) -> Result<()> {
        let Some(id) = m.ptys.iter().position(|p| p.session == Some(t.ns_pid)) else {
            return Ok(());
        };
        self.ioctl_in(t, m, id, transport, libc::TIOCSCTTY, None)
            .map_err(|e| {
                rerr(
                    t.ns_pid,
                    format!(
                        "make pseudo-terminal {} the session's controlling terminal: {e}",
                        m.ptys[id].index
                    ),
                )
            })
    }

    /// Sets the foreground group of the controlling terminal of `t`'s
    /// session, as only a process of the session may: `t` is its leader,
    /// once its descendants (the session's other processes) are restored,
    /// before its own files are arranged (the engine's way of passing
    /// files in is closed then). `nested`: `t` is in a pid namespace below
    /// the tree's, whose numbers are not the image's.
    pub fn foreground(
        &mut self,
        t: &mut Tracee,
        m: &Manifest,
        nested: bool,
        transport: &Transport,
    ) -> Result<()> {
        let Some(id) = m.ptys.iter().position(|p| p.session == Some(t.ns_pid)) else {
            return Ok(());
        };
        let pty = &m.ptys[id];
        let Some(pgrp) = pty.foreground else {
            return Ok(());
        };
        if nested {
            return Err(rerr(
                t.ns_pid,
                format!(
                    "the foreground group of pseudo-terminal {} is set by its session's leader, \
                     which is in a nested pid namespace",
                    pty.index
                ),
            ));
        }
        self.ioctl_in(
            t,
            m,
            id,
            transport,
            libc::TIOCSPGRP,
            Some(&pgrp.to_ne_bytes()),
        )
        .map_err(|e| {
            rerr(
                t.ns_pid,
                format!(
                    "set the foreground group of pseudo-terminal {} to {pgrp} (a group of \
                         the session not restored yet?): {e}",
                    m.ptys[id].index
                ),
            )
        })
    }

    /// Makes `t` ask `request` of a description of pair `id`'s terminal of
    /// its own (opened for it, closed after), with `arg` in its memory (or
    /// 0); the call's error, if it failed.
    fn ioctl_in(
        &mut self,
        t: &mut Tracee,
        m: &Manifest,
        id: usize,
        transport: &Transport,
        request: libc::c_ulong,
        arg: Option<&[u8]>,
    ) -> std::result::Result<(), String> {
        let fd = self
            .terminal(t, m, id, libc::O_RDWR as u32, transport)
            .map_err(|e| e.to_string())?;
        let at = match arg {
            Some(bytes) => t.arg(bytes).map_err(|e| e.to_string())?,
            None => 0,
        };
        let r = t.raw_on(t.pid, libc::SYS_ioctl, &[fd, request, at]);
        t.call("close", nr::SYS_close, &[fd])
            .map_err(|e| e.to_string())?;
        match r.map_err(|e| e.to_string())? {
            0 => Ok(()),
            e => Err(std::io::Error::from_raw_os_error(-e as i32).to_string()),
        }
    }

    /// Once every process exists: exclusive modes (an exclusive terminal
    /// is opened again by root only).
    pub fn finish(&mut self, m: &Manifest) -> Result<()> {
        for (&id, master) in &self.0 {
            let pty = &m.ptys[id];
            if pty.exclusive {
                let fail = |what: &str, e: std::io::Error| {
                    rerr(
                        m.root,
                        format!("pseudo-terminal {}: {what}: {e}", pty.index),
                    )
                };
                let peer = tty::peer(master.as_fd(), libc::O_RDWR).map_err(|e| fail("open", e))?;
                tty::set_exclusive(peer.as_fd()).map_err(|e| fail("TIOCEXCL", e))?;
            }
        }
        Ok(())
    }
}

fn io(t: &Tracee) -> impl FnOnce(std::io::Error) -> Error + use<> {
    let pid = t.ns_pid;
    move |e| rerr(pid, e.to_string())
}

/// Opens /dev/ptmx in `t` until it gives pair `pty.index`, which the
/// engine keeps, set as the image says.
fn make(t: &mut Tracee, pty: &Pty) -> Result<OwnedFd> {
    let pidfd = sys::pidfd_open(t.pid).map_err(io(t))?;
    // The numbers below it, held until it is had.
    let mut below = Vec::new();
    let master = loop {
        let path = t.arg_str("/dev/ptmx")?;
        let flags = libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC;
        let fd = t.call(
            "open /dev/ptmx",
            nr::SYS_openat,
            &[libc::AT_FDCWD as u64, path, flags as u64],
        )?;
        let ours = sys::steal_fd_via(&pidfd, fd as i32);
        t.call("close", nr::SYS_close, &[fd])?;
        let ours = ours.map_err(io(t))?;
        let index = tty::index(ours.as_fd()).map_err(io(t))?;
        if index == pty.index {
            break ours;
        }
        if index > pty.index || below.len() > pty.index as usize {
            return Err(rerr(
                t.ns_pid,
                format!(
                    "pseudo-terminal {} is in use here (the next free one is {index})",
                    pty.index
                ),
            ));
        }
        below.push(ours);
    };
    drop(below);
    set_up(master.as_fd(), pty).map_err(|e| {
        rerr(
            t.ns_pid,
            format!("set pseudo-terminal {} up: {e}", pty.index),
        )
    })?;
    Ok(master)
}

/// The modes, settings and unread output and input of `pty` on its new
/// `master`
/// (unlocked: its terminal is opened from it).
fn set_up(master: BorrowedFd<'_>, pty: &Pty) -> std::io::Result<()> {
    tty::set_mode(master, libc::TIOCSPTLCK as libc::c_ulong, false)?;
    // Settings asked of a master are its terminal's.
    tty::set_termios(master, &pty.termios.0)?;
    tty::set_winsize(master, &pty.winsize.0)?;
    if !pty.output.0.is_empty() {
        let peer = tty::peer(master, libc::O_RDWR | libc::O_NONBLOCK)?;
        tty::write_unprocessed(peer.as_fd(), &pty.termios.0, &pty.output.0)?;
    }
    if !pty.input.0.is_empty() {
        tty::write_input(master, &pty.termios.0, &pty.input.0)?;
    }
    // Last: in packet mode, changes of the terminal's flow control would
    // queue status bytes for the master to read.
    tty::set_mode(master, libc::TIOCPKT as libc::c_ulong, pty.packet)
}
