//! The kernel's sock_diag interface: one dump request, every answer.
//! Unix sockets are read through it in [`crate::unixdiag`]; here, the TCP
//! and unix listeners that hold connections their program has not accepted
//! yet (with, for unix ones, whether their clients sent data), and where a
//! connection under way is going.

use std::net::{IpAddr, SocketAddr};

use netlink_packet_core::{
    NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_sock_diag::SockDiagMessage;
use netlink_packet_sock_diag::inet::{ExtensionFlags, InetRequest, SocketId, StateFlags};
use netlink_sys::protocols::NETLINK_SOCK_DIAG;
use netlink_sys::{Socket, SocketAddr as NetlinkAddr};

/// A sock_diag socket, tied to the network namespace it was made in.
fn open() -> std::io::Result<Socket> {
    let mut socket = Socket::new(NETLINK_SOCK_DIAG)?;
    socket.bind_auto()?;
    socket.connect(&NetlinkAddr::new(0, 0))?;
    Ok(socket)
}

/// Sends `request` (a dump) to sock_diag in the calling thread's network
/// namespace and hands every answer to `each`.
pub(crate) fn dump(
    request: SockDiagMessage,
    each: impl FnMut(SockDiagMessage),
) -> std::io::Result<()> {
    dump_on(&open()?, request, each)
}

fn dump_on(
    socket: &Socket,
    request: SockDiagMessage,
    mut each: impl FnMut(SockDiagMessage),
) -> std::io::Result<()> {
    let mut hdr = NetlinkHeader::default();
    hdr.flags = NLM_F_REQUEST | NLM_F_DUMP;
    let mut packet = NetlinkMessage::new(hdr, request.into());
    packet.finalize();
    let mut buf = vec![0; packet.buffer_len()];
    packet.serialize(&mut buf);
    socket.send(&buf, 0)?;
    let mut rx = Vec::with_capacity(1 << 16);
    loop {
        rx.clear();
        let n = socket.recv(&mut rx, 0)?;
        let mut off = 0;
        while off < n {
            let msg = NetlinkMessage::<SockDiagMessage>::deserialize(&rx[off..n])
                .map_err(|e| std::io::Error::other(format!("sock_diag: {e}")))?;
            let len = msg.header.length as usize;
            match msg.payload {
                NetlinkPayload::Done(_) => return Ok(()),
                NetlinkPayload::Error(e) => {
                    return Err(std::io::Error::other(format!("sock_diag: {e:?}")));
                }
                NetlinkPayload::InnerMessage(m) => each(m),
                _ => {}
            }
            if len == 0 {
                break;
            }
            off += len;
        }
    }
}

/// An IPv4-mapped IPv6 address as the IPv4 one it maps.
fn unmapped(a: IpAddr) -> IpAddr {
    match a {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        a => a,
    }
}

/// Asks sock_diag on `socket` for the TCP sockets (IPv4 and IPv6) in
/// `states`, handing each answer to `each`.
fn dump_tcp(
    socket: &Socket,
    states: StateFlags,
    mut each: impl FnMut(&netlink_packet_sock_diag::inet::InetResponse),
) -> std::io::Result<()> {
    for (family, any) in [
        (libc::AF_INET as u8, SocketId::new_v4()),
        (libc::AF_INET6 as u8, SocketId::new_v6()),
    ] {
        let request = SockDiagMessage::InetRequest(InetRequest {
            family,
            protocol: libc::IPPROTO_TCP as u8,
            extensions: ExtensionFlags::empty(),
            states: states.clone(),
            socket_id: any,
        });
        dump_on(socket, request, |m| {
            if let SockDiagMessage::InetResponse(r) = m {
                each(&r);
            }
        })?;
    }
    Ok(())
}

/// Where the TCP socket of inode `ino` in process `pid`'s network
/// namespace is connecting to, while it is (`SYN_SENT`: it has no peer
/// name yet).
pub fn connecting_to(pid: nix::unistd::Pid, ino: u32) -> Option<SocketAddr> {
    let look = || -> std::io::Result<Option<SocketAddr>> {
        let mut found = None;
        dump_tcp(&open()?, StateFlags::SYN_SENT, |r| {
            if r.header.inode == ino {
                let id = &r.header.socket_id;
                found = Some(SocketAddr::new(
                    unmapped(id.destination_address),
                    id.destination_port,
                ));
            }
        })?;
        Ok(found)
    };
    crate::common::in_netns_of(pid, look).ok()?.ok()?
}

/// Asks a process's network namespace about its listeners, again and
/// again: entering the namespace (a thread of its own) costs more than the
/// question, so a series of checkpoints keeps one.
pub struct ListenerProbe {
    socket: Socket,
}

impl ListenerProbe {
    /// A probe of the network namespace process `pid` is in.
    pub fn of(pid: nix::unistd::Pid) -> crate::Result<ListenerProbe> {
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            return Err(crate::Error::NoSuchProcess(pid.as_raw()));
        }
        let socket = crate::common::in_netns_of(pid, open)?
            .map_err(crate::Error::io("open a sock_diag socket"))?;
        Ok(ListenerProbe { socket })
    }

    /// Its TCP listeners (IPv4 and IPv6) that hold connections not yet
    /// accepted.
    pub fn busy_listeners(&self) -> std::io::Result<Vec<BusyListener>> {
        let mut out = Vec::new();
        dump_tcp(&self.socket, StateFlags::LISTEN, |r| {
            if r.header.recv_queue > 0 {
                let id = &r.header.socket_id;
                out.push(BusyListener {
                    inode: r.header.inode,
                    addr: SocketAddr::new(unmapped(id.source_address), id.source_port),
                    waiting: r.header.recv_queue,
                });
            }
        })?;
        Ok(out)
    }

    /// Its unix listeners that hold connections not yet accepted.
    pub fn unix_backlogs(&self) -> std::io::Result<Vec<UnixBacklog>> {
        use netlink_packet_sock_diag::unix::nlas::{Nla, UnixDiagName};
        use netlink_packet_sock_diag::unix::{ShowFlags, StateFlags, UnixRequest};
        let request = SockDiagMessage::UnixRequest(UnixRequest {
            state_flags: StateFlags::LISTEN,
            inode: 0,
            show_flags: ShowFlags::NAME | ShowFlags::ICONS,
            cookie: [0xff; 8],
        });
        let mut out = Vec::new();
        dump_on(&self.socket, request, |m| {
            let SockDiagMessage::UnixResponse(r) = m else {
                return;
            };
            let mut backlog = UnixBacklog {
                inode: r.header.inode,
                name: String::new(),
                clients: Vec::new(),
            };
            for nla in &r.nlas {
                match nla {
                    Nla::PendingConnections(c) => backlog.clients = c.clone(),
                    Nla::Name(UnixDiagName::Pathname(p)) => backlog.name = p.display().to_string(),
                    Nla::Name(UnixDiagName::Abstract(a)) => {
                        backlog.name = format!("@{}", String::from_utf8_lossy(a))
                    }
                    _ => {}
                }
            }
            if !backlog.clients.is_empty() {
                out.push(backlog);
            }
        })?;
        Ok(out)
    }

    /// Of the connected unix sockets `inodes`, those that sent data no one
    /// has read yet.
    pub fn unix_sent_unread(&self, inodes: &[u32]) -> std::io::Result<Vec<u32>> {
        use netlink_packet_sock_diag::unix::{ShowFlags, StateFlags, UnixRequest, nlas::Nla};
        let request = SockDiagMessage::UnixRequest(UnixRequest {
            state_flags: StateFlags::ESTABLISHED,
            inode: 0,
            show_flags: ShowFlags::RQLEN,
            cookie: [0xff; 8],
        });
        let mut out = Vec::new();
        dump_on(&self.socket, request, |m| {
            let SockDiagMessage::UnixResponse(r) = m else {
                return;
            };
            // For a socket not listening: what it has to read, and what it
            // sent that is still queued at its peer.
            let sent = r
                .nlas
                .iter()
                .any(|n| matches!(n, Nla::ReceiveQueueLength(_, w) if *w > 0));
            if sent && inodes.contains(&r.header.inode) {
                out.push(r.header.inode);
            }
        })?;
        Ok(out)
    }
}

/// A unix listener with connections waiting to be accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnixBacklog {
    pub inode: u32,
    /// Its name as sock_diag gives it.
    pub name: String,
    /// The inodes of the clients, in the order they will be accepted.
    pub clients: Vec<u32>,
}

/// A TCP listener with connections waiting to be accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BusyListener {
    pub inode: u32,
    pub addr: SocketAddr,
    /// Connections waiting.
    pub waiting: u32,
}
