//! Holding a process tree's TCP connections still while the tree is down.
//!
//! Between the checkpoint that kills a tree and its restore, the sockets of
//! its connections do not exist. A peer that sends meanwhile (data, a
//! window probe, a retransmission) would get a reset from the kernel and
//! drop the connection. So a checkpoint that kills a tree first drops, in
//! the firewall, every packet coming to its connections, and the restore
//! lifts that once the connections are back: to the peers it looks like a
//! short loss, which TCP rides out.
//!
//! A container's network is held by its own means (its namespace is
//! paused); this is for a tree in the host's own network namespace
//! (`rrc checkpoint --pid`). The lock is an nftables table of its own,
//! named in the image, so that only the restore of that image lifts it.
//! A failed restore leaves it for the next try;
//! `nft delete table inet NAME` lifts it by hand.

use std::collections::HashSet;
use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt;
use std::process::{Command, Stdio};

use crate::{Error, Result};

/// The start of every lock table's name; a name from an image is used
/// only if it is this followed by hexadecimal digits.
const PREFIX: &str = "rrc_lock_";

/// The mark (`SO_MARK`) of the packets a restore itself sends to a
/// connection as if from its peer (a FIN it had received): the lock lets
/// them through.
pub const PASS_MARK: i32 = 0x7272_6301;

/// One TCP connection of the tree, as its end in the tree sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conn {
    pub local: SocketAddr,
    pub peer: SocketAddr,
}

/// A lock in place. Dropped, it is lifted again (the checkpoint failed and
/// the tree goes on); [`NetLock::keep`] leaves it for the restore.
#[derive(Debug)]
pub struct NetLock {
    table: Option<String>,
}

impl NetLock {
    /// No lock (a tree whose network is held otherwise, or left running).
    pub fn none() -> Self {
        NetLock { table: None }
    }

    /// The table's name, if there is one.
    pub fn name(&self) -> Option<&str> {
        self.table.as_deref()
    }

    /// Leaves the lock in place for the restore to lift.
    pub fn keep(mut self) {
        self.table = None;
    }
}

impl Drop for NetLock {
    fn drop(&mut self) {
        if let Some(t) = self.table.take()
            && let Err(e) = unlock(&t)
        {
            tracing::warn!("the network lock {t} stays: {e}");
        }
    }
}

/// Whether process `pid` is in this process's network namespace.
pub fn in_our_netns(pid: i32) -> bool {
    let ino = |p: &str| std::fs::metadata(p).map(|m| (m.dev(), m.ino())).ok();
    let ours = ino("/proc/self/ns/net");
    ours.is_some() && ours == ino(&format!("/proc/{pid}/ns/net"))
}

/// The TCP connections open in `pids` (those a checkpoint rebuilds),
/// read from their sockets themselves (taken through pidfds): listing the
/// namespace's connections walks the kernel's whole connection table,
/// which costs milliseconds even when it is empty.
pub fn connections_of(pids: &[i32]) -> Vec<Conn> {
    use nix::sys::socket::{SockaddrStorage, getpeername, getsockname};
    use std::os::fd::{AsFd, AsRawFd};
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for &pid in pids {
        let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        let Ok(pidfd) = crate::sys::pidfd_open(nix::unistd::Pid::from_raw(pid)) else {
            continue;
        };
        for e in dir.flatten() {
            let Some(fd) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
                continue;
            };
            let is_new_socket = std::fs::read_link(e.path()).ok().is_some_and(|l| {
                l.to_str()
                    .and_then(|l| l.strip_prefix("socket:["))
                    .is_some_and(|ino| seen.insert(ino.to_string()))
            });
            if !is_new_socket {
                continue;
            }
            let Ok(s) = crate::sys::steal_fd_via(&pidfd, fd) else {
                continue;
            };
            let opt = |level, name| crate::sys::getsockopt_int(s.as_fd(), level, name).ok();
            let domain = opt(libc::SOL_SOCKET, libc::SO_DOMAIN);
            if !matches!(domain, Some(libc::AF_INET | libc::AF_INET6))
                || opt(libc::SOL_SOCKET, libc::SO_PROTOCOL) != Some(libc::IPPROTO_TCP)
            {
                continue;
            }
            // The connections a checkpoint rebuilds.
            if !crate::tcp::info(s.as_fd()).is_ok_and(|i| crate::tcp::is_connection(i.state)) {
                continue;
            }
            let addr = |a: nix::Result<SockaddrStorage>| crate::sys::inet_addr(&a.ok()?);
            if let (Some(local), Some(peer)) = (
                addr(getsockname(s.as_raw_fd())),
                addr(getpeername(s.as_raw_fd())),
            ) {
                out.push(Conn { local, peer });
            }
        }
    }
    out
}

/// The nftables table that drops what comes to `conns`.
fn ruleset(table: &str, conns: &[Conn]) -> String {
    let mut rules = String::new();
    for c in conns {
        // A dual-stack socket lists IPv4 peers as mapped IPv6 addresses;
        // their packets are IPv4.
        let v4 = |a: SocketAddr| match a {
            SocketAddr::V4(a) => Some(*a.ip()),
            SocketAddr::V6(a) => a.ip().to_ipv4_mapped(),
        };
        let (fam, from, to) = match (v4(c.peer), v4(c.local)) {
            (Some(p), Some(l)) => ("ip", p.to_string(), l.to_string()),
            _ => ("ip6", c.peer.ip().to_string(), c.local.ip().to_string()),
        };
        rules += &format!(
            "\t\t{fam} saddr {from} {fam} daddr {to} tcp sport {} tcp dport {} drop\n",
            c.peer.port(),
            c.local.port()
        );
    }
    // Before connection tracking and everything else.
    format!(
        "table inet {table} {{\n\tchain input {{\n\t\ttype filter hook input priority -400; policy accept;\n\t\tmeta mark {PASS_MARK:#x} accept\n{rules}\t}}\n}}\n"
    )
}

fn nft(script: &str) -> std::result::Result<(), String> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run nft (scripts/setup installs nftables): {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(script.as_bytes())
            .map_err(|e| format!("nft: {e}"))?;
    }
    let out = child.wait_with_output().map_err(|e| format!("nft: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

/// Drops every packet coming to `conns` until the lock is lifted; nothing
/// to do (no table) without connections.
pub fn lock(conns: &[Conn]) -> Result<NetLock> {
    if conns.is_empty() {
        return Ok(NetLock::none());
    }
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let table = format!("{PREFIX}{:x}{stamp:x}", std::process::id());
    nft(&ruleset(&table, conns)).map_err(|e| {
        Error::Unsupported(vec![format!(
            "cannot hold the tree's {} TCP connection(s) still while it is down: {e}",
            conns.len()
        )])
    })?;
    Ok(NetLock { table: Some(table) })
}

/// Whether `table` is a name [`lock`] gives.
pub fn is_lock_name(table: &str) -> bool {
    table
        .strip_prefix(PREFIX)
        .is_some_and(|h| !h.is_empty() && h.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// Lifts the lock `table`; one that is not here (lifted already, or made
/// in another network namespace) is no error.
pub fn unlock(table: &str) -> std::result::Result<(), String> {
    if !is_lock_name(table) {
        return Err(format!("{table:?} is not the name of a network lock"));
    }
    match nft(&format!("delete table inet {table}\n")) {
        Err(e) if !e.contains("No such file or directory") => Err(e),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_names_it_gives_are_lifted() {
        assert!(is_lock_name("rrc_lock_1a2b"));
        for bad in [
            "rrc_lock_",
            "rrc_lock_xyz",
            "lab_cut",
            "rrc_lock_1;flush ruleset",
        ] {
            assert!(!is_lock_name(bad), "{bad}");
        }
        assert!(unlock("filter").is_err());
    }

    #[test]
    fn the_ruleset_drops_what_comes_to_each_connection() {
        let c = Conn {
            local: "127.0.0.1:5000".parse().unwrap(),
            peer: "127.0.0.1:40000".parse().unwrap(),
        };
        let d = Conn {
            local: "[::1]:6000".parse().unwrap(),
            peer: "[::1]:50000".parse().unwrap(),
        };
        let r = ruleset("rrc_lock_1", &[c, d]);
        assert!(
            r.contains("ip saddr 127.0.0.1 ip daddr 127.0.0.1 tcp sport 40000 tcp dport 5000 drop")
        );
        assert!(r.contains("ip6 saddr ::1 ip6 daddr ::1 tcp sport 50000 tcp dport 6000 drop"));
        assert!(r.starts_with("table inet rrc_lock_1 {"));
    }
}
