//! Pseudo-terminals whose master the tree holds.
//!
//! A master is read through a copy of it (`pidfd_getfd`: opening
//! /proc/PID/fd/N of a master would make a new pair). Its terminal's
//! state is read through a description of the terminal made from the
//! master (`TIOCGPTPEER`), which also tells its file system instance: the
//! terminals the tree holds are matched to their master by number and
//! instance once every process is read.

use std::io::Read;
use std::os::fd::{AsFd, OwnedFd};

use crate::image::{FileKind, Hex, OpenFile, Pty};
use crate::sys::tty;

/// What a master met tells beyond its record.
struct Found {
    /// The file system instance its terminals are on.
    dev: u64,
    /// Its session and foreground group as our pid namespace numbers them.
    session: i32,
    foreground: i32,
}

#[derive(Default)]
pub struct Ptys {
    found: Vec<Found>,
    /// By index: what the image keeps (sessions numbered in
    /// [`Ptys::number_sessions`]).
    pub saved: Vec<Pty>,
    /// The terminal descriptions met, to be matched with a master: file
    /// id and file system instance.
    pub terminals: Vec<(usize, u64)>,
}

impl Ptys {
    /// Reads the pair whose master `master` is (a copy of the tree's);
    /// its index in [`Ptys::saved`], or why it cannot be saved. What the
    /// terminal side wrote and the master had not read is read, and put
    /// back at once as it was: the tree goes on with it whatever becomes
    /// of the checkpoint.
    pub fn master(&mut self, master: OwnedFd) -> crate::Result<Result<usize, String>> {
        let io = |what: &'static str| crate::Error::io(what);
        let fd = master.as_fd();
        let index = tty::index(fd).map_err(io("TIOCGPTN"))?;
        let (packet, locked, exclusive) = tty::modes(fd).map_err(io("pseudo-terminal modes"))?;
        if locked {
            return Ok(Err(format!(
                "pseudo-terminal {index} is still locked (unlockpt not called): its terminal \
                 cannot be opened to be read"
            )));
        }
        // A description of the terminal of our own, for its file system
        // instance and its input queue. (Where no process has the
        // terminal open, its last close then makes the master's reads
        // fail with EIO until one does, as after any terminal's close;
        // one never opened since the pair was made had not.)
        let peer = tty::peer(fd, libc::O_RDWR | libc::O_NONBLOCK)
            .map_err(io("open a pseudo-terminal's terminal"))?;
        let dev = nix::sys::stat::fstat(&peer)
            .map_err(|e| crate::Error::io("stat a terminal")(e.into()))?
            .st_dev;
        let termios = tty::termios(fd).map_err(io("TCGETS2"))?;
        // Input not read yet: read, and written back through the master
        // at once, in non-canonical mode (where it reads as it was).
        let mut input = Vec::new();
        if tty::queued(peer.as_fd()).map_err(io("FIONREAD"))? > 0 {
            if tty::canonical(&termios) {
                return Ok(Err(format!(
                    "pseudo-terminal {index} has input its programs have not read yet, in \
                     canonical mode (its lines cannot be put back as they were)"
                )));
            }
            input = drain_input(&peer).map_err(io("read a pseudo-terminal's input"))?;
            if !input.is_empty() {
                tty::write_input(fd, &termios, &input)
                    .map_err(io("put a pseudo-terminal's input back"))?;
            }
        }
        let output = drain(&master, packet).map_err(io("read a pseudo-terminal's output"))?;
        if !output.is_empty() {
            tty::write_unprocessed(peer.as_fd(), &termios, &output)
                .map_err(io("put a pseudo-terminal's output back"))?;
        }
        let session = crate::sys::ioctl_int(fd, libc::TIOCGSID as libc::c_ulong).unwrap_or(0);
        let foreground = tty::foreground(fd).unwrap_or(0);
        self.saved.push(Pty {
            index,
            termios: Hex(termios),
            winsize: Hex(tty::winsize(fd).map_err(io("TIOCGWINSZ"))?),
            packet,
            exclusive,
            session: None,
            foreground: None,
            output: Hex(output),
            input: Hex(input),
        });
        self.found.push(Found {
            dev,
            session,
            foreground,
        });
        Ok(Ok(self.saved.len() - 1))
    }

    /// Makes every terminal description whose master is in the tree one
    /// of its pair ([`FileKind::PtyTerminal`]); the others stay terminals
    /// of a master outside.
    pub fn claim_terminals(&self, files: &mut [OpenFile]) {
        for &(id, dev) in &self.terminals {
            let Some(f) = files.get_mut(id) else { continue };
            let FileKind::OuterTerminal { rdev, .. } = f.kind else {
                continue;
            };
            let index = (libc::major(rdev) - 136) * 256 + libc::minor(rdev);
            if let Some(pty) = (self.saved.iter().zip(&self.found))
                .position(|(s, found)| s.index == index && found.dev == dev)
            {
                f.kind = FileKind::PtyTerminal { pty };
            }
        }
    }

    /// Numbers each pair's session and foreground group as the image does
    /// (`processes` are the tree's, `images` their records, `ns_of` their
    /// pids as the image numbers them); a pair that is the controlling
    /// terminal of a session the tree does not lead is refused.
    pub fn number_sessions(
        &mut self,
        processes: &[crate::dump::seize::SeizedProcess],
        images: &[crate::image::ProcessImage],
        ns_of: &std::collections::BTreeMap<nix::unistd::Pid, i32>,
        problems: &mut Vec<String>,
    ) {
        // Nothing to ask of every process at every checkpoint of a tree
        // that holds no master.
        if self.saved.is_empty() {
            return;
        }
        // Session leaders and groups as the image numbers them, by ours.
        let mut leaders = std::collections::HashMap::new();
        let mut groups = std::collections::HashMap::new();
        for p in processes {
            let Some(image) = images.iter().find(|i| i.pid == ns_of[&p.pid]) else {
                continue;
            };
            if image.sid == image.pid {
                leaders.insert(p.pid.as_raw(), image.pid);
            }
            if let Ok(pgid) = nix::unistd::getpgid(Some(p.pid)) {
                groups.insert(pgid.as_raw(), image.pgid);
            }
        }
        for (s, found) in self.saved.iter_mut().zip(&self.found) {
            if found.session <= 0 {
                continue;
            }
            match leaders.get(&found.session) {
                Some(&sid) => s.session = Some(sid),
                None => problems.push(format!(
                    "pseudo-terminal {} is the controlling terminal of session {}, whose \
                     leader is not in the tree",
                    s.index, found.session
                )),
            }
            s.foreground = groups.get(&found.foreground).copied();
        }
    }
}

/// Reads what waits to be read on `master` (our copy, so its description's
/// `O_NONBLOCK` is not ours to change: only as much as it says it holds).
/// In packet mode each read starts with a status byte, left out.
/// What a terminal's programs have not read yet, read through `peer` (a
/// description of the terminal of our own, not blocking).
fn drain_input(peer: &OwnedFd) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut f = std::fs::File::from(peer.try_clone()?);
    let mut buf = [0u8; 4096];
    loop {
        match f.read(&mut buf) {
            Ok(0) => return Ok(out),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(out),
            Err(e) => return Err(e),
        }
    }
}

fn drain(master: &OwnedFd, packet: bool) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut f = std::fs::File::from(master.try_clone()?);
    loop {
        let n = tty::queued(master.as_fd())?;
        if n == 0 {
            return Ok(out);
        }
        let mut buf = vec![0u8; n + usize::from(packet)];
        let got = f.read(&mut buf)?;
        let data = if packet {
            buf.get(1..got).unwrap_or(&[])
        } else {
            &buf[..got]
        };
        out.extend_from_slice(data);
        if got == 0 {
            return Ok(out);
        }
    }
}
