//! Unix sockets as the kernel's sock_diag interface reports them: bound
//! name, peer, pending connections and queue length, by inode. Only this
//! interface says which socket is connected to which.

use std::collections::HashMap;

use netlink_packet_sock_diag::SockDiagMessage;
use netlink_packet_sock_diag::unix::{ShowFlags, StateFlags, UnixRequest, nlas::Nla};
use serde::{Deserialize, Serialize};

/// A unix socket address.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UnixName {
    Path(String),
    /// Without the leading NUL.
    Abstract(Vec<u8>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnixInfo {
    pub ty: u8,
    pub state: u8,
    pub name: Option<UnixName>,
    /// The socket it is connected to; `Some(0)` when that socket has
    /// been closed since (its data may still be queued here).
    pub peer: Option<u32>,
    /// Connections waiting to be accepted (listening sockets): the
    /// inodes of their clients, in the order they will be accepted.
    pub pending: Vec<u32>,
    /// `SHUT_RD` (1) and `SHUT_WR` (2) of this end, as the kernel keeps
    /// them (a peer's shutdown shows here as the opposite direction).
    pub shutdown: u8,
    /// A listening socket's backlog.
    pub backlog: u32,
}

/// Every unix socket of the calling thread's network namespace.
pub fn query() -> std::io::Result<HashMap<u32, UnixInfo>> {
    let request = SockDiagMessage::UnixRequest(UnixRequest {
        state_flags: StateFlags::from_bits_retain(u32::MAX),
        inode: 0,
        show_flags: ShowFlags::NAME | ShowFlags::PEER | ShowFlags::ICONS | ShowFlags::RQLEN,
        cookie: [0xff; 8],
    });
    let mut out = HashMap::new();
    crate::sockdiag::dump(request, |m| {
        let SockDiagMessage::UnixResponse(r) = m else {
            return;
        };
        let mut info = UnixInfo {
            ty: r.header.kind,
            state: r.header.state,
            name: None,
            peer: None,
            pending: Vec::new(),
            shutdown: 0,
            backlog: 0,
        };
        for nla in r.nlas.iter() {
            match nla {
                Nla::Name(n) => {
                    info.name = Some(match n {
                        netlink_packet_sock_diag::unix::nlas::UnixDiagName::Pathname(p) => {
                            UnixName::Path(p.to_string_lossy().into_owned())
                        }
                        netlink_packet_sock_diag::unix::nlas::UnixDiagName::Abstract(a) => {
                            UnixName::Abstract(a.clone())
                        }
                    })
                }
                Nla::Peer(p) => info.peer = Some(*p),
                Nla::PendingConnections(c) => info.pending = c.clone(),
                Nla::Shutdown(s) => info.shutdown = *s,
                // For a listener: connections queued, backlog.
                Nla::ReceiveQueueLength(_, b) => info.backlog = *b,
                _ => {}
            }
        }
        out.insert(r.header.inode, info);
    })?;
    Ok(out)
}
