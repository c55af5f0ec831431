//! TCP connections through `TCP_REPAIR`: reading a connection's complete
//! state from a socket of the checkpointed process, and building a socket
//! that carries on exactly where it was (sequence numbers, queued data,
//! MSS, window and its scale, SACK, timestamps).
//!
//! While a socket is in repair mode the kernel sends nothing for it, and
//! closing it sends neither FIN nor RST: the original can be killed without
//! its peers noticing, and the copy is silent until repair mode ends.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use nix::sys::socket::{MsgFlags, recv};
use serde::{Deserialize, Serialize};

use crate::sys;

const TCP_SEND_QUEUE: i32 = 2;
const TCP_RECV_QUEUE: i32 = 1;
const TCPOPT_MSS: u32 = 2;
const TCPOPT_WINDOW: u32 = 3;
const TCPOPT_SACK_PERM: u32 = 4;
const TCPOPT_TIMESTAMP: u32 = 8;
pub const TCPI_OPT_TIMESTAMPS: u8 = 1;
pub const TCPI_OPT_SACK: u8 = 2;
pub const TCPI_OPT_WSCALE: u8 = 4;
/// Leave repair mode without the window probe TCP_REPAIR 0 sends.
const TCP_REPAIR_OFF_NO_WP: i32 = -1;
const SIOCINQ: libc::c_ulong = 0x541B;
const SIOCOUTQ: libc::c_ulong = 0x5411;
const SIOCOUTQNSD: libc::c_ulong = 0x894B;

pub const TCP_ESTABLISHED: u8 = 1;
pub const TCP_SYN_SENT: u8 = 2;
pub const TCP_FIN_WAIT1: u8 = 4;
pub const TCP_FIN_WAIT2: u8 = 5;
pub const TCP_CLOSE: u8 = 7;
pub const TCP_CLOSE_WAIT: u8 = 8;
pub const TCP_LAST_ACK: u8 = 9;
pub const TCP_LISTEN: u8 = 10;
pub const TCP_CLOSING: u8 = 11;

pub fn state_name(s: u8) -> &'static str {
    match s {
        1 => "ESTABLISHED",
        2 => "SYN_SENT",
        3 => "SYN_RECV",
        4 => "FIN_WAIT1",
        5 => "FIN_WAIT2",
        6 => "TIME_WAIT",
        7 => "CLOSE",
        8 => "CLOSE_WAIT",
        9 => "LAST_ACK",
        10 => "LISTEN",
        11 => "CLOSING",
        _ => "unknown",
    }
}

/// What `TCP_INFO` says that repair needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Info {
    pub state: u8,
    pub options: u8,
    pub snd_wscale: u8,
    pub rcv_wscale: u8,
    /// For a listening socket: connections waiting to be accepted.
    pub unacked: u32,
    /// For a listening socket: its backlog.
    pub sacked: u32,
}

pub fn info(fd: BorrowedFd<'_>) -> std::io::Result<Info> {
    let b = sys::getsockopt_bytes(fd, libc::IPPROTO_TCP, libc::TCP_INFO, 104)?;
    if b.len() < 32 {
        return Err(std::io::Error::other("short TCP_INFO"));
    }
    Ok(Info {
        state: b[0],
        options: b[5],
        snd_wscale: b[6] & 0xf,
        rcv_wscale: b[6] >> 4,
        unacked: u32::from_ne_bytes(b[24..28].try_into().expect("4 bytes")),
        sacked: u32::from_ne_bytes(b[28..32].try_into().expect("4 bytes")),
    })
}

/// The state of one connection, as repair mode shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TcpState {
    pub state: u8,
    /// Sequence number after the last byte written (write_seq).
    pub snd_seq: u32,
    /// Sequence number after the last byte received (rcv_nxt).
    pub rcv_seq: u32,
    /// Bytes in the send queue (sent but unacknowledged, then unsent).
    pub sndq_len: u32,
    /// Of those, bytes never sent.
    pub unsent_len: u32,
    /// Bytes received and not yet read.
    pub rcvq_len: u32,
    pub mss: u32,
    pub options: u8,
    pub snd_wscale: u8,
    pub rcv_wscale: u8,
    pub timestamp: u32,
    /// snd_wl1, snd_wnd, max_window, rcv_wnd, rcv_wup.
    pub window: [u32; 5],
}

/// Mask of states whose send queue ends with our FIN, and whose receive
/// side consumed the peer's FIN.
fn fin_sent(state: u8) -> bool {
    matches!(
        state,
        TCP_FIN_WAIT1 | TCP_FIN_WAIT2 | TCP_CLOSING | TCP_LAST_ACK
    )
}

fn fin_received(state: u8) -> bool {
    matches!(state, TCP_CLOSE_WAIT | TCP_LAST_ACK | TCP_CLOSING)
}

fn repair_queue(fd: BorrowedFd<'_>, q: i32) -> std::io::Result<()> {
    sys::setsockopt_int(fd, libc::IPPROTO_TCP, libc::TCP_REPAIR_QUEUE, q)
}

/// The `len` bytes at the head of the queue chosen in repair mode, from
/// its head whatever peek offset the program set.
fn peek(fd: BorrowedFd<'_>, len: usize) -> std::io::Result<Vec<u8>> {
    // Most queues are empty when a checkpoint reads them: no offset to
    // set aside and put back.
    if len == 0 {
        return Ok(Vec::new());
    }
    sys::with_peek_offset(fd, -1, || peek_head(fd, len))
}

fn peek_head(fd: BorrowedFd<'_>, len: usize) -> std::io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    let mut got = 0;
    while got < len {
        let n = recv(
            fd.as_raw_fd(),
            &mut buf[got..],
            MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT,
        )?;
        if n == 0 {
            break;
        }
        // MSG_PEEK always starts at the head: one call must take it all.
        got = n;
        if got < len {
            return Err(std::io::Error::other(format!(
                "queue shorter than reported ({got} of {len} bytes)"
            )));
        }
    }
    Ok(buf)
}

/// Puts the socket in repair mode and reads its state and queued data
/// (send queue, then receive queue). The socket stays in repair mode; on
/// an error it leaves it again (quietly), as it was.
/// `reuseaddr` is the socket's `SO_REUSEADDR` from before (repair mode
/// changes it), put back if it leaves repair mode here.
pub fn dump(fd: BorrowedFd<'_>, reuseaddr: i32) -> std::io::Result<(TcpState, Vec<u8>, Vec<u8>)> {
    sys::setsockopt_int(fd, libc::IPPROTO_TCP, libc::TCP_REPAIR, 1)?;
    let read = read_in_repair(fd);
    if read.is_err() {
        back_from_repair(fd, reuseaddr);
    }
    read
}

/// Takes a socket of a tree that goes on out of repair mode, quietly,
/// with the `SO_REUSEADDR` it had before (repair mode forces it, leaving
/// clears it); says so if it cannot.
fn back_from_repair(fd: BorrowedFd<'_>, reuseaddr: i32) {
    if let Err(e) = leave_repair_keeping(fd, reuseaddr, false) {
        tracing::warn!(error = %e, "a TCP connection stays in repair mode");
    }
}

/// Ends repair mode, with the window probe that makes the peer resend
/// what it must (`probe`, for a restored connection) or without a word
/// (for one that goes on), and puts back the `SO_REUSEADDR` the socket had
/// before repair mode (which sets it, and leaving it clears it).
pub fn leave_repair_keeping(
    fd: BorrowedFd<'_>,
    reuseaddr: i32,
    probe: bool,
) -> std::io::Result<()> {
    if probe {
        leave_repair(fd)?;
    } else {
        leave_repair_quietly(fd)?;
    }
    sys::setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, reuseaddr)
}

/// The `SO_REUSEADDR` among a socket's saved options (0 if not saved).
pub fn saved_reuseaddr(options: &[crate::image::SockOpt]) -> i32 {
    crate::sockopt::saved_int(options, libc::SOL_SOCKET, libc::SO_REUSEADDR).unwrap_or(0)
}

/// What [`dump`] reads once the socket is in repair mode.
fn read_in_repair(fd: BorrowedFd<'_>) -> std::io::Result<(TcpState, Vec<u8>, Vec<u8>)> {
    let i = info(fd)?;
    let mut sndq_len = sys::ioctl_int(fd, SIOCOUTQ)? as u32;
    let mut unsent_len = sys::ioctl_int(fd, SIOCOUTQNSD)? as u32;
    // A FIN in the send queue takes a sequence number but holds no data.
    if fin_sent(i.state) {
        sndq_len = sndq_len.saturating_sub(1);
        unsent_len = unsent_len.saturating_sub(1);
    }
    let rcvq_len = sys::ioctl_int(fd, SIOCINQ)? as u32;
    repair_queue(fd, TCP_SEND_QUEUE)?;
    let snd_seq = u32::from_ne_bytes(
        sys::getsockopt_bytes(fd, libc::IPPROTO_TCP, libc::TCP_QUEUE_SEQ, 4)?[..4]
            .try_into()
            .expect("4 bytes"),
    );
    let sndq = peek(fd, sndq_len as usize)?;
    repair_queue(fd, TCP_RECV_QUEUE)?;
    let rcv_seq = u32::from_ne_bytes(
        sys::getsockopt_bytes(fd, libc::IPPROTO_TCP, libc::TCP_QUEUE_SEQ, 4)?[..4]
            .try_into()
            .expect("4 bytes"),
    );
    let rcvq = peek(fd, rcvq_len as usize)?;
    repair_queue(fd, 0)?;
    let mss = sys::getsockopt_int(fd, libc::IPPROTO_TCP, libc::TCP_MAXSEG)? as u32;
    let timestamp = if i.options & TCPI_OPT_TIMESTAMPS != 0 {
        sys::getsockopt_int(fd, libc::IPPROTO_TCP, libc::TCP_TIMESTAMP)? as u32
    } else {
        0
    };
    let w = sys::getsockopt_bytes(fd, libc::IPPROTO_TCP, libc::TCP_REPAIR_WINDOW, 20)?;
    let mut window = [0u32; 5];
    for (i, c) in w.chunks_exact(4).take(5).enumerate() {
        window[i] = u32::from_ne_bytes(c.try_into().expect("4 bytes"));
    }
    Ok((
        TcpState {
            state: i.state,
            snd_seq,
            rcv_seq,
            sndq_len,
            unsent_len,
            rcvq_len,
            mss,
            options: i.options,
            snd_wscale: i.snd_wscale,
            rcv_wscale: i.rcv_wscale,
            timestamp,
            window,
        },
        sndq,
        rcvq,
    ))
}

/// TCP sockets of a stopped tree, put in repair mode to be read (our
/// copies of the tree's descriptors). Whatever way a checkpoint ends, none
/// may stay in repair mode in a tree that goes on: its next `send` would
/// fail with EINVAL. Dropped, the set takes them out of repair mode
/// quietly; only once the tree is killed does [`Repaired::close_silently`]
/// close them as they are (a connection killed in repair mode closes
/// without FIN or RST, which a takeover elsewhere relies on).
#[derive(Default)]
pub struct Repaired(Vec<(std::rc::Rc<OwnedFd>, i32)>);

impl Repaired {
    /// A socket in repair mode, and its `SO_REUSEADDR` from before.
    pub fn push(&mut self, fd: std::rc::Rc<OwnedFd>, reuseaddr: i32) {
        self.0.push((fd, reuseaddr));
    }

    /// The tree goes on: every socket leaves repair mode now.
    pub fn release(mut self) {
        self.leave_all();
    }

    /// The tree is dead: the sockets close in repair mode, without a word
    /// to their peers.
    pub fn close_silently(mut self) {
        self.0.clear();
    }

    fn leave_all(&mut self) {
        for (s, reuseaddr) in self.0.drain(..) {
            back_from_repair(s.as_fd(), reuseaddr);
        }
    }
}

impl Drop for Repaired {
    fn drop(&mut self) {
        self.leave_all();
    }
}

/// Takes a socket of a process that goes on running out of repair mode,
/// without the window probe that would tell the peer anything.
pub fn leave_repair_quietly(fd: BorrowedFd<'_>) -> std::io::Result<()> {
    sys::setsockopt_int(
        fd,
        libc::IPPROTO_TCP,
        libc::TCP_REPAIR,
        TCP_REPAIR_OFF_NO_WP,
    )
}

/// Ends repair mode on a restored socket: the kernel sends a window probe,
/// which makes the peer retransmit whatever it is missing.
pub fn leave_repair(fd: BorrowedFd<'_>) -> std::io::Result<()> {
    sys::setsockopt_int(fd, libc::IPPROTO_TCP, libc::TCP_REPAIR, 0)
}

fn sockaddr(addr: &std::net::SocketAddr) -> nix::sys::socket::SockaddrStorage {
    nix::sys::socket::SockaddrStorage::from(*addr)
}

/// A new socket in the calling thread's network namespace, in repair
/// mode, connected exactly as `st` describes. What the peer sent and the
/// process had not read is in its receive queue; what the process wrote
/// and the peer had not acknowledged is in its send queue. Half-closed
/// states need the peer's FIN put back by the caller
/// ([`needs_peer_fin`]).
pub fn build(
    local: &std::net::SocketAddr,
    peer: &std::net::SocketAddr,
    st: &TcpState,
    sndq: &[u8],
    rcvq: &[u8],
) -> std::io::Result<OwnedFd> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, bind, connect, send, socket};
    let family = if local.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let s = socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
    let fd = s.as_fd();
    sys::setsockopt_int(fd, libc::IPPROTO_TCP, libc::TCP_REPAIR, 1)?;
    // Room for the queues about to be refilled (the caller sets the final
    // sizes afterwards).
    let room = |len: u32| (2 * len as i32).saturating_add(1 << 16);
    sys::setsockopt_int(
        fd,
        libc::SOL_SOCKET,
        libc::SO_SNDBUFFORCE,
        room(st.sndq_len),
    )?;
    sys::setsockopt_int(
        fd,
        libc::SOL_SOCKET,
        libc::SO_RCVBUFFORCE,
        room(st.rcvq_len),
    )?;
    // In repair mode the bind may share the listener's port.
    bind(fd.as_raw_fd(), &sockaddr(local))?;
    let mut rcv_seq = st.rcv_seq;
    if fin_received(st.state) {
        // The peer's FIN is put back as a packet afterwards.
        rcv_seq = rcv_seq.wrapping_sub(1);
    }
    let snd_seq = st.snd_seq;
    repair_queue(fd, TCP_RECV_QUEUE)?;
    sys::setsockopt_bytes(
        fd,
        libc::IPPROTO_TCP,
        libc::TCP_QUEUE_SEQ,
        &rcv_seq.wrapping_sub(st.rcvq_len).to_ne_bytes(),
    )?;
    repair_queue(fd, TCP_SEND_QUEUE)?;
    let snd_una = snd_seq
        .wrapping_sub(st.sndq_len)
        .wrapping_sub(u32::from(fin_sent(st.state)));
    sys::setsockopt_bytes(
        fd,
        libc::IPPROTO_TCP,
        libc::TCP_QUEUE_SEQ,
        &snd_una.to_ne_bytes(),
    )?;
    repair_queue(fd, 0)?;
    // The segment size the connection sends with is worked out when it
    // connects, from the largest it may use: set now, or it is the
    // 536-byte default for good (the repair option below comes too late).
    // A size the kernel refuses leaves the default.
    let _ = sys::setsockopt_int(fd, libc::IPPROTO_TCP, libc::TCP_MAXSEG, st.mss as i32);
    connect(fd.as_raw_fd(), &sockaddr(peer))?;
    // Options, as struct tcp_repair_opt { u32 code; u32 value; }.
    let mut opts = Vec::new();
    let mut opt = |code: u32, val: u32| {
        opts.extend_from_slice(&code.to_ne_bytes());
        opts.extend_from_slice(&val.to_ne_bytes());
    };
    opt(TCPOPT_MSS, st.mss);
    if st.options & TCPI_OPT_WSCALE != 0 {
        opt(
            TCPOPT_WINDOW,
            u32::from(st.snd_wscale) | (u32::from(st.rcv_wscale) << 16),
        );
    }
    if st.options & TCPI_OPT_SACK != 0 {
        opt(TCPOPT_SACK_PERM, 0);
    }
    if st.options & TCPI_OPT_TIMESTAMPS != 0 {
        opt(TCPOPT_TIMESTAMP, 0);
    }
    sys::setsockopt_bytes(fd, libc::IPPROTO_TCP, libc::TCP_REPAIR_OPTIONS, &opts)?;
    if st.options & TCPI_OPT_TIMESTAMPS != 0 {
        sys::setsockopt_bytes(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_TIMESTAMP,
            &st.timestamp.to_ne_bytes(),
        )?;
    }
    let queue = |q: i32, data: &[u8]| -> std::io::Result<()> {
        repair_queue(fd, q)?;
        let mut off = 0;
        while off < data.len() {
            off += send(fd.as_raw_fd(), &data[off..], MsgFlags::empty())?;
        }
        Ok(())
    };
    queue(TCP_RECV_QUEUE, rcvq)?;
    // Sent but unacknowledged data is put back as never sent, so the
    // kernel sends it as soon as the socket is live instead of waiting a
    // whole initial retransmission timeout (1 s: a restored socket has no
    // round-trip estimate); to the peer it is an early retransmission. With
    // our FIN sent, the data must precede the FIN: restored as sent.
    let sent = if fin_sent(st.state) {
        (st.sndq_len - st.unsent_len) as usize
    } else {
        0
    };
    queue(TCP_SEND_QUEUE, &sndq[..sent])?;
    repair_queue(fd, 0)?;
    let mut w = Vec::with_capacity(20);
    for (i, v) in st.window.iter().enumerate() {
        let v = if fin_received(st.state) {
            match i {
                3 => v.wrapping_add(1), // rcv_wnd
                4 => v.wrapping_sub(1), // rcv_wup
                _ => *v,
            }
        } else {
            *v
        };
        w.extend_from_slice(&v.to_ne_bytes());
    }
    sys::setsockopt_bytes(fd, libc::IPPROTO_TCP, libc::TCP_REPAIR_WINDOW, &w)?;
    if fin_sent(st.state) {
        // Our FIN: in the send queue as sent when the peer acknowledged it.
        if st.state == TCP_FIN_WAIT2 {
            repair_queue(fd, TCP_SEND_QUEUE)?;
        }
        nix::sys::socket::shutdown(fd.as_raw_fd(), nix::sys::socket::Shutdown::Write)?;
        repair_queue(fd, 0)?;
    }
    if sent < sndq.len() {
        // Never sent: written normally, the kernel sends it when it can.
        sys::setsockopt_int(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_REPAIR,
            TCP_REPAIR_OFF_NO_WP,
        )?;
        let mut off = sent;
        while off < sndq.len() {
            off += send(fd.as_raw_fd(), &sndq[off..], MsgFlags::MSG_DONTWAIT)?;
        }
        sys::setsockopt_int(fd, libc::IPPROTO_TCP, libc::TCP_REPAIR, 1)?;
    }
    Ok(s)
}

/// Whether a socket in `state` is a connection a checkpoint rebuilds in
/// repair mode.
pub fn is_connection(state: u8) -> bool {
    matches!(
        state,
        TCP_ESTABLISHED
            | TCP_CLOSE_WAIT
            | TCP_FIN_WAIT1
            | TCP_FIN_WAIT2
            | TCP_LAST_ACK
            | TCP_CLOSING
    )
}

/// Whether restoring `state` needs a packet from the peer: its FIN (the
/// receive side had consumed it) or the acknowledgement of ours.
pub fn needs_peer_packet(state: u8) -> bool {
    fin_received(state) || state == TCP_FIN_WAIT2
}

/// Delivers to the restored socket, as if from its peer, what half-closed
/// states need: the peer's FIN, and for FIN_WAIT2 the acknowledgement of
/// our FIN. Must run in the socket's network namespace; IPv4 only.
pub fn inject_peer_packet(
    local: &std::net::SocketAddr,
    peer: &std::net::SocketAddr,
    st: &TcpState,
) -> std::io::Result<()> {
    let (std::net::SocketAddr::V4(l), std::net::SocketAddr::V4(p)) = (local, peer) else {
        return Err(std::io::Error::other(
            "half-closed IPv6 connections are not supported",
        ));
    };
    const FIN: u8 = 0x01;
    const ACK: u8 = 0x10;
    let (flags, seq) = if fin_received(st.state) {
        (FIN | ACK, st.rcv_seq.wrapping_sub(1))
    } else {
        (ACK, st.rcv_seq)
    };
    let window = (st.window[1] >> st.snd_wscale).min(0xffff) as u16;
    let pkt = ipv4_tcp_packet(
        *p.ip(),
        p.port(),
        *l.ip(),
        l.port(),
        seq,
        st.snd_seq,
        flags,
        window,
    );
    let raw = nix::sys::socket::socket(
        nix::sys::socket::AddressFamily::Inet,
        nix::sys::socket::SockType::Raw,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        nix::sys::socket::SockProtocol::Raw,
    )?;
    // Let through the lock that holds the connection's peer back.
    sys::setsockopt_int(
        raw.as_fd(),
        libc::SOL_SOCKET,
        libc::SO_MARK,
        crate::netlock::PASS_MARK,
    )?;
    let dst = nix::sys::socket::SockaddrIn::from(*l);
    nix::sys::socket::sendto(raw.as_raw_fd(), &pkt, &dst, MsgFlags::empty())?;
    Ok(())
}

fn checksum(data: &[u8], mut sum: u32) -> u16 {
    for c in data.chunks(2) {
        let word = if c.len() == 2 {
            u16::from_be_bytes([c[0], c[1]])
        } else {
            u16::from_be_bytes([c[0], 0])
        };
        sum += u32::from(word);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An IPv4 packet carrying a bare TCP segment (no options, no data).
#[allow(clippy::too_many_arguments)]
fn ipv4_tcp_packet(
    src: std::net::Ipv4Addr,
    sport: u16,
    dst: std::net::Ipv4Addr,
    dport: u16,
    seq: u32,
    ack: u32,
    flags: u8,
    window: u16,
) -> Vec<u8> {
    let mut tcp = Vec::with_capacity(20);
    tcp.extend_from_slice(&sport.to_be_bytes());
    tcp.extend_from_slice(&dport.to_be_bytes());
    tcp.extend_from_slice(&seq.to_be_bytes());
    tcp.extend_from_slice(&ack.to_be_bytes());
    tcp.push(5 << 4); // data offset: 5 words
    tcp.push(flags);
    tcp.extend_from_slice(&window.to_be_bytes());
    tcp.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent pointer
    let mut pseudo = Vec::with_capacity(12);
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&[0, libc::IPPROTO_TCP as u8]);
    pseudo.extend_from_slice(&(tcp.len() as u16).to_be_bytes());
    let mut sum = 0u32;
    for c in pseudo.chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    let csum = checksum(&tcp, sum);
    tcp[16..18].copy_from_slice(&csum.to_be_bytes());
    let total = 20 + tcp.len() as u16;
    let mut ip = Vec::with_capacity(total as usize);
    ip.extend_from_slice(&[0x45, 0]);
    ip.extend_from_slice(&total.to_be_bytes());
    ip.extend_from_slice(&[0, 0, 0x40, 0]); // id, don't fragment
    ip.extend_from_slice(&[64, libc::IPPROTO_TCP as u8, 0, 0]);
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&dst.octets());
    let hsum = checksum(&ip, 0);
    ip[10..12].copy_from_slice(&hsum.to_be_bytes());
    ip.extend_from_slice(&tcp);
    ip
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packet_checksums_verify() {
        let p = ipv4_tcp_packet(
            "10.0.0.1".parse().unwrap(),
            1234,
            "10.0.0.2".parse().unwrap(),
            80,
            7,
            9,
            0x11,
            512,
        );
        assert_eq!(p.len(), 40);
        // A correct header sums to 0xffff (checksum of it is 0).
        assert_eq!(checksum(&p[..20], 0), 0);
        let mut sum = 0u32;
        for c in [&p[12..16], &p[16..20]].concat().chunks(2) {
            sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
        }
        sum += u32::from(libc::IPPROTO_TCP as u16) + 20;
        assert_eq!(checksum(&p[20..], sum), 0);
    }
}
