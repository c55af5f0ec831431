//! Socket options a checkpoint keeps: which ones, read from a socket of
//! the tree, and put on the socket that stands in for it at restore.
//!
//! A value is set again only where it differs from what a new socket of
//! the same kind has, so a default stays a default: a socket whose buffers
//! the kernel sizes keeps them sized by the kernel (`SO_BUF_LOCK` says
//! which the program fixed), and a listener the program gave no MSS gets
//! none.

use std::os::fd::BorrowedFd;

use crate::image::{Hex, OptValue, SockOpt};
use crate::sys;

/// What kind of socket options are read from or put on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sock {
    Unix,
    /// An inet socket; `connected` for an established TCP connection
    /// (rebuilt in repair mode, bound and connected before its options
    /// are set, with its MSS carried by the repair state).
    Inet {
        v6: bool,
        tcp: bool,
        connected: bool,
    },
}

/// Which sockets an option is kept for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum On {
    /// Every socket.
    Any,
    Unix,
    /// IPv4 and IPv6 sockets.
    Inet,
    /// IPv4 sockets.
    Ip4,
    /// IPv6 sockets.
    Ip6,
    /// IPv4 sockets other than TCP (multicast options).
    Ip4Dgram,
    /// IPv6 sockets other than TCP.
    Ip6Dgram,
    /// IPv6 sockets other than connections (set before they are bound).
    Ip6Unconnected,
    Tcp,
    /// TCP sockets that are not connections (listeners, unconnected).
    TcpUnconnected,
    /// Unix and TCP sockets.
    UnixOrTcp,
}

impl On {
    fn covers(self, s: Sock) -> bool {
        match (self, s) {
            (On::Any, _) => true,
            (On::Unix, Sock::Unix) => true,
            (On::UnixOrTcp, Sock::Unix) => true,
            (_, Sock::Unix) => false,
            (On::Unix, _) => false,
            (On::Inet, _) => true,
            (On::Ip4, Sock::Inet { v6, .. }) => !v6,
            (On::Ip6, Sock::Inet { v6, .. }) => v6,
            (On::Ip4Dgram, Sock::Inet { v6, tcp, .. }) => !v6 && !tcp,
            (On::Ip6Dgram, Sock::Inet { v6, tcp, .. }) => v6 && !tcp,
            (On::Ip6Unconnected, Sock::Inet { v6, connected, .. }) => v6 && !connected,
            (On::Tcp | On::UnixOrTcp, Sock::Inet { tcp, .. }) => tcp,
            (On::TcpUnconnected, Sock::Inet { tcp, connected, .. }) => tcp && !connected,
        }
    }
}

/// One option: an `int`, or `size` bytes of a C structure or name.
struct Known {
    level: i32,
    name: i32,
    size: usize,
    on: On,
}

const fn int(level: i32, name: i32, on: On) -> Known {
    Known {
        level,
        name,
        size: 0,
        on,
    }
}

const fn bytes(level: i32, name: i32, size: usize, on: On) -> Known {
    Known {
        level,
        name,
        size,
        on,
    }
}

// Option numbers the libc crate does not name on every target.
const SO_TIMESTAMP_OLD: i32 = 29;
const SO_TIMESTAMPNS_OLD: i32 = 35;
const SO_RCVTIMEO_OLD: i32 = 20;
const SO_SNDTIMEO_OLD: i32 = 21;
const SO_BUF_LOCK: i32 = 72;
const SO_PASSPIDFD: i32 = 76;
const TCP_TX_DELAY: i32 = 37;
const IP_LOCAL_PORT_RANGE: i32 = 51;
const IPV6_FREEBIND: i32 = 78;

use libc::{IPPROTO_IP as IP, IPPROTO_IPV6 as IP6, IPPROTO_TCP as TCP, SOL_SOCKET as SOCK};

/// The options kept, in the order they are set again: buffer sizes before
/// `SO_BUF_LOCK`, which says whether the program fixed them; the priority
/// after the type of service, which changes it.
const KNOWN: &[Known] = &[
    int(SOCK, libc::SO_REUSEADDR, On::Inet),
    int(SOCK, libc::SO_REUSEPORT, On::Inet),
    int(SOCK, libc::SO_KEEPALIVE, On::Inet),
    int(SOCK, libc::SO_BROADCAST, On::Inet),
    int(SOCK, libc::SO_OOBINLINE, On::Inet),
    int(SOCK, libc::SO_DONTROUTE, On::Inet),
    int(SOCK, libc::SO_BUSY_POLL, On::Inet),
    int(SOCK, libc::SO_ZEROCOPY, On::Inet),
    bytes(SOCK, libc::SO_BINDTODEVICE, libc::IFNAMSIZ, On::Inet),
    int(SOCK, libc::SO_MARK, On::Any),
    int(SOCK, libc::SO_RCVLOWAT, On::Any),
    int(SOCK, SO_TIMESTAMP_OLD, On::Any),
    int(SOCK, SO_TIMESTAMPNS_OLD, On::Any),
    int(SOCK, libc::SO_RXQ_OVFL, On::Any),
    int(SOCK, libc::SO_SELECT_ERR_QUEUE, On::Any),
    bytes(SOCK, libc::SO_LINGER, size_of::<libc::linger>(), On::Any),
    bytes(SOCK, SO_RCVTIMEO_OLD, size_of::<libc::timeval>(), On::Any),
    bytes(SOCK, SO_SNDTIMEO_OLD, size_of::<libc::timeval>(), On::Any),
    int(SOCK, libc::SO_PASSCRED, On::Unix),
    int(SOCK, libc::SO_PASSSEC, On::Unix),
    int(SOCK, SO_PASSPIDFD, On::Unix),
    int(SOCK, libc::SO_PEEK_OFF, On::UnixOrTcp),
    int(SOCK, libc::SO_SNDBUF, On::Any),
    int(SOCK, libc::SO_RCVBUF, On::Any),
    int(SOCK, SO_BUF_LOCK, On::Any),
    int(TCP, libc::TCP_NODELAY, On::Tcp),
    int(TCP, libc::TCP_CORK, On::Tcp),
    int(TCP, libc::TCP_KEEPIDLE, On::Tcp),
    int(TCP, libc::TCP_KEEPINTVL, On::Tcp),
    int(TCP, libc::TCP_KEEPCNT, On::Tcp),
    int(TCP, libc::TCP_SYNCNT, On::Tcp),
    int(TCP, libc::TCP_LINGER2, On::Tcp),
    int(TCP, libc::TCP_DEFER_ACCEPT, On::Tcp),
    int(TCP, libc::TCP_THIN_LINEAR_TIMEOUTS, On::Tcp),
    int(TCP, libc::TCP_USER_TIMEOUT, On::Tcp),
    int(TCP, libc::TCP_NOTSENT_LOWAT, On::Tcp),
    int(TCP, libc::TCP_FASTOPEN, On::Tcp),
    int(TCP, libc::TCP_FASTOPEN_CONNECT, On::Tcp),
    int(TCP, libc::TCP_INQ, On::Tcp),
    int(TCP, TCP_TX_DELAY, On::Tcp),
    int(TCP, libc::TCP_SAVE_SYN, On::Tcp),
    int(TCP, libc::TCP_MAXSEG, On::TcpUnconnected),
    bytes(TCP, libc::TCP_CONGESTION, 16, On::Tcp),
    int(IP, libc::IP_TOS, On::Ip4),
    int(IP, libc::IP_TTL, On::Ip4),
    int(IP, libc::IP_FREEBIND, On::Ip4),
    int(IP, libc::IP_TRANSPARENT, On::Ip4),
    int(IP, libc::IP_BIND_ADDRESS_NO_PORT, On::Ip4),
    int(IP, libc::IP_MTU_DISCOVER, On::Ip4),
    int(IP, libc::IP_RECVERR, On::Ip4),
    int(IP, libc::IP_PKTINFO, On::Ip4),
    int(IP, libc::IP_RECVTOS, On::Ip4),
    int(IP, libc::IP_RECVTTL, On::Ip4),
    int(IP, libc::IP_RECVORIGDSTADDR, On::Ip4),
    int(IP, libc::IP_MULTICAST_TTL, On::Ip4Dgram),
    int(IP, libc::IP_MULTICAST_LOOP, On::Ip4),
    int(IP, libc::IP_MULTICAST_ALL, On::Ip4),
    int(IP, IP_LOCAL_PORT_RANGE, On::Ip4),
    int(IP6, libc::IPV6_V6ONLY, On::Ip6Unconnected),
    int(IP6, libc::IPV6_TCLASS, On::Ip6),
    int(IP6, libc::IPV6_UNICAST_HOPS, On::Ip6),
    int(IP6, libc::IPV6_MULTICAST_HOPS, On::Ip6Dgram),
    int(IP6, libc::IPV6_MULTICAST_LOOP, On::Ip6),
    int(IP6, libc::IPV6_RECVERR, On::Ip6),
    int(IP6, libc::IPV6_MTU_DISCOVER, On::Ip6),
    int(IP6, libc::IPV6_RECVPKTINFO, On::Ip6),
    int(IP6, libc::IPV6_RECVTCLASS, On::Ip6),
    int(IP6, IPV6_FREEBIND, On::Ip6),
    int(IP6, libc::IPV6_TRANSPARENT, On::Ip6),
    // Setting IP_TOS sets the priority too: the priority comes after.
    int(SOCK, libc::SO_PRIORITY, On::Any),
];

fn read_one(fd: BorrowedFd<'_>, level: i32, name: i32, size: usize) -> Option<OptValue> {
    if size == 0 {
        sys::getsockopt_int(fd, level, name).ok().map(OptValue::Int)
    } else {
        sys::getsockopt_bytes(fd, level, name, size)
            .ok()
            .map(|b| OptValue::Bytes(Hex(b)))
    }
}

/// Every kept option of `fd` (a socket of kind `s`) that it has.
pub fn read(fd: BorrowedFd<'_>, s: Sock) -> Vec<SockOpt> {
    KNOWN
        .iter()
        .filter(|k| k.on.covers(s))
        .filter_map(|k| {
            Some(SockOpt(
                k.level,
                k.name,
                read_one(fd, k.level, k.name, k.size)?,
            ))
        })
        .collect()
}

/// Sets the saved options on `fd`, each one whose value differs from what
/// the socket has now; says which could not be set. Options this rrc does
/// not know (from a newer image) are set as given.
pub fn apply(fd: BorrowedFd<'_>, saved: &[SockOpt]) -> Vec<String> {
    let mut failed = Vec::new();
    for SockOpt(level, name, value) in saved {
        let (level, name) = (*level, *name);
        let now = match value {
            OptValue::Int(_) => read_one(fd, level, name, 0),
            OptValue::Bytes(b) => read_one(fd, level, name, b.0.len().max(1)),
        };
        if now.as_ref() == Some(value) {
            continue;
        }
        let set = match (level, name, value) {
            // Buffer sizes read back doubled (the kernel's bookkeeping
            // share); the forcing variants set them past the system limits.
            (SOCK, libc::SO_SNDBUF, OptValue::Int(v)) => {
                sys::setsockopt_int(fd, level, libc::SO_SNDBUFFORCE, v / 2)
            }
            (SOCK, libc::SO_RCVBUF, OptValue::Int(v)) => {
                sys::setsockopt_int(fd, level, libc::SO_RCVBUFFORCE, v / 2)
            }
            (_, _, OptValue::Int(v)) => sys::setsockopt_int(fd, level, name, *v),
            (_, _, OptValue::Bytes(b)) => sys::setsockopt_bytes(fd, level, name, &b.0),
        };
        if let Err(e) = set {
            failed.push(format!("option {level}/{name} = {value:?}: {e}"));
        }
    }
    failed
}

/// The saved value of an integer option, if it was saved.
pub fn saved_int(saved: &[SockOpt], level: i32, name: i32) -> Option<i32> {
    saved.iter().find_map(|SockOpt(l, n, v)| match v {
        OptValue::Int(v) if *l == level && *n == name => Some(*v),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    fn tcp_socket() -> std::os::fd::OwnedFd {
        use nix::sys::socket::{AddressFamily, SockFlag, SockType, socket};
        socket(
            AddressFamily::Inet,
            SockType::Stream,
            SockFlag::empty(),
            None,
        )
        .unwrap()
    }

    #[test]
    fn options_set_on_one_socket_come_back_on_another() {
        let a = tcp_socket();
        let fd = a.as_fd();
        sys::setsockopt_int(fd, TCP, libc::TCP_CORK, 1).unwrap();
        sys::setsockopt_int(fd, TCP, libc::TCP_KEEPIDLE, 77).unwrap();
        sys::setsockopt_int(fd, SOCK, libc::SO_SNDBUF, 50000).unwrap();
        // struct linger: on, seconds.
        let linger = [1i32.to_ne_bytes(), 9i32.to_ne_bytes()].concat();
        sys::setsockopt_bytes(fd, SOCK, libc::SO_LINGER, &linger).unwrap();
        let kind = Sock::Inet {
            v6: false,
            tcp: true,
            connected: false,
        };
        let saved = read(fd, kind);
        let b = tcp_socket();
        assert!(apply(b.as_fd(), &saved).is_empty());
        assert_eq!(read(b.as_fd(), kind), saved);
        assert_eq!(saved_int(&saved, TCP, libc::TCP_KEEPIDLE), Some(77));
        // A socket whose buffers the kernel sizes keeps them so.
        let c = tcp_socket();
        let plain = read(c.as_fd(), kind);
        let d = tcp_socket();
        assert!(apply(d.as_fd(), &plain).is_empty());
        assert_eq!(
            sys::getsockopt_int(d.as_fd(), SOCK, SO_BUF_LOCK).unwrap(),
            0
        );
    }
}
