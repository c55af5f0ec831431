//! The two rtnetlink requests `ip` (iproute2 6.1) does not make, written
//! here (the only place these messages are defined): the id a network
//! namespace gives another (`RTM_GETNSID`), which tells where a veth's
//! peer is, and moving an interface into another namespace under a name
//! and index of its own there (`RTM_SETLINK` with `IFLA_NEW_IFINDEX`),
//! which puts back a veth whose peer the restore made first.
//!
//! Each request goes to the network namespace of the calling thread.

use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};
use nix::unistd::Pid;

const RTM_NEWNSID: u16 = 88;
const RTM_GETNSID: u16 = 90;
const RTM_SETLINK: u16 = 19;
const NETNSA_NSID: u16 = 1;
const NETNSA_PID: u16 = 2;
const IFLA_IFNAME: u16 = 3;
const IFLA_NET_NS_PID: u16 = 19;
const IFLA_NEW_IFINDEX: u16 = 49;
/// `struct nlmsghdr`'s length, and `struct ifinfomsg`'s.
const HEADER: usize = 16;
const IFINFOMSG: usize = 16;

/// A request being written: the header, then what follows it.
struct Request(Vec<u8>);

impl Request {
    fn new(kind: u16, flags: i32) -> Request {
        let mut b = Vec::with_capacity(64);
        b.extend(0u32.to_ne_bytes()); // length, set by `send`
        b.extend(kind.to_ne_bytes());
        b.extend((flags as u16).to_ne_bytes());
        b.extend([0u8; 8]); // sequence number and port: the kernel's to fill
        Request(b)
    }

    /// An attribute, padded to 4 bytes.
    fn attr(mut self, kind: u16, value: &[u8]) -> Request {
        let len = 4 + value.len();
        self.0.extend((len as u16).to_ne_bytes());
        self.0.extend(kind.to_ne_bytes());
        self.0.extend(value);
        self.0.resize(self.0.len().next_multiple_of(4), 0);
        self
    }

    /// Sends it and gives the answer.
    fn send(mut self) -> std::io::Result<Vec<u8>> {
        let len = self.0.len() as u32;
        self.0[..4].copy_from_slice(&len.to_ne_bytes());
        let mut socket = Socket::new(NETLINK_ROUTE)?;
        socket.bind_auto()?;
        socket.connect(&SocketAddr::new(0, 0))?;
        socket.send(&self.0, 0)?;
        let mut rx = Vec::with_capacity(4096);
        let n = socket.recv(&mut rx, 0)?;
        rx.truncate(n);
        Ok(rx)
    }
}

fn bad() -> std::io::Error {
    std::io::Error::other("an rtnetlink answer that is not one")
}

fn u16_at(b: &[u8], at: usize) -> std::io::Result<u16> {
    let s = b.get(at..at + 2).ok_or_else(bad)?;
    Ok(u16::from_ne_bytes([s[0], s[1]]))
}

fn i32_at(b: &[u8], at: usize) -> std::io::Result<i32> {
    let s = b.get(at..at + 4).ok_or_else(bad)?;
    Ok(i32::from_ne_bytes([s[0], s[1], s[2], s[3]]))
}

/// An error answer as the error it carries (`Ok` for an acknowledgement).
fn error_of(answer: &[u8]) -> std::io::Result<()> {
    if u16_at(answer, 4)? != libc::NLMSG_ERROR as u16 {
        return Err(bad());
    }
    match i32_at(answer, HEADER)? {
        0 => Ok(()),
        e => Err(std::io::Error::from_raw_os_error(-e)),
    }
}

/// The id the calling thread's network namespace gives that of process
/// `of`, if it gave it one.
pub fn netnsid_of(of: Pid) -> std::io::Result<Option<i64>> {
    // After the header, a `struct rtgenmsg` padded to 4 bytes.
    let mut req = Request::new(RTM_GETNSID, libc::NLM_F_REQUEST);
    req.0.extend([libc::AF_UNSPEC as u8, 0, 0, 0]);
    let answer = req.attr(NETNSA_PID, &of.as_raw().to_ne_bytes()).send()?;
    if u16_at(&answer, 4)? != RTM_NEWNSID {
        error_of(&answer)?;
        return Err(bad());
    }
    // One message: the attributes run to the end of what was read.
    let mut at = HEADER + 4;
    while at + 4 <= answer.len() {
        let (len, kind) = (usize::from(u16_at(&answer, at)?), u16_at(&answer, at + 2)?);
        if kind == NETNSA_NSID {
            let id = i32_at(&answer, at + 4)?;
            return Ok((id >= 0).then_some(id.into()));
        }
        if len < 4 {
            break;
        }
        at += len.next_multiple_of(4);
    }
    Err(bad())
}

/// Moves interface `index` of the calling thread's network namespace into
/// process `to`'s, where it is named `name` and numbered `new_index`.
pub fn move_link(index: u32, to: Pid, name: &str, new_index: u32) -> std::io::Result<()> {
    let mut req = Request::new(RTM_SETLINK, libc::NLM_F_REQUEST | libc::NLM_F_ACK);
    // `struct ifinfomsg`: family, padding, type, index, flags, change.
    let mut info = [0u8; IFINFOMSG];
    info[4..8].copy_from_slice(&(index as i32).to_ne_bytes());
    req.0.extend(info);
    let mut ifname = name.as_bytes().to_vec();
    ifname.push(0);
    let answer = req
        .attr(IFLA_NET_NS_PID, &(to.as_raw() as u32).to_ne_bytes())
        .attr(IFLA_IFNAME, &ifname)
        .attr(IFLA_NEW_IFINDEX, &(new_index as i32).to_ne_bytes())
        .send()?;
    error_of(&answer)
}
