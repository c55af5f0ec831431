//! The raw ioctls and socket calls of the networking layer: the only
//! `unsafe` code in this crate. Each wrapper takes owned or borrowed fds and
//! plain Rust values, so callers never touch C structures.

use std::ffi::CStr;
use std::io;
use std::mem;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use crate::MacAddr;

fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn ifreq_named(name: &str) -> io::Result<libc::ifreq> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains('\0') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("invalid interface name {name:?} (1 to 15 bytes)"),
        ));
    }
    // SAFETY: ifreq is a plain C struct (name array plus a union of integers,
    // sockaddrs and a pointer) for which all-zero bytes are a valid value.
    let mut req: libc::ifreq = unsafe { mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    Ok(req)
}

fn ifreq_name(req: &libc::ifreq) -> String {
    // SAFETY: the kernel (or ifreq_named) leaves ifr_name NUL-terminated
    // within its IFNAMSIZ bytes.
    let cstr = unsafe { CStr::from_ptr(req.ifr_name.as_ptr()) };
    cstr.to_string_lossy().into_owned()
}

fn sockaddr_in(addr: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(addr).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr are both 16 bytes; reinterpreting the
    // former as the latter is how the socket ioctls expect IPv4 addresses.
    unsafe { mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

/// Attaches `fd` (an open /dev/net/tun) to a TAP interface named `name`,
/// creating it; returns the name the kernel chose.
pub fn tun_set_iff(fd: BorrowedFd<'_>, name: &str, flags: libc::c_int) -> io::Result<String> {
    let mut req = ifreq_named(name)?;
    req.ifr_ifru.ifru_flags = flags as libc::c_short;
    // SAFETY: TUNSETIFF reads and writes one ifreq, which lives on our stack
    // for the duration of the call.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, &mut req) })?;
    Ok(ifreq_name(&req))
}

/// The flags the TUN driver supports (`TUNGETFEATURES`); fails with
/// ENOTTY when `fd` is not a TUN device.
pub fn tun_get_features(fd: BorrowedFd<'_>) -> io::Result<libc::c_uint> {
    let mut features: libc::c_uint = 0;
    // SAFETY: TUNGETFEATURES writes one unsigned int through the pointer,
    // which points to a live local.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNGETFEATURES, &mut features) })?;
    Ok(features)
}

pub fn tun_set_offload(fd: BorrowedFd<'_>, flags: libc::c_uint) -> io::Result<()> {
    // SAFETY: TUNSETOFFLOAD takes its argument by value, no memory is shared.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETOFFLOAD, flags as libc::c_ulong) })?;
    Ok(())
}

pub fn tun_set_vnet_hdr_size(fd: BorrowedFd<'_>, size: libc::c_int) -> io::Result<()> {
    // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer, which is
    // valid for the call.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETVNETHDRSZ, &size) })?;
    Ok(())
}

/// A datagram socket in the calling thread's network namespace, the handle
/// the interface-configuration ioctls need.
pub fn config_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the returned fd is fresh and owned by us.
    let fd =
        check(unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: fd was just returned by socket(2) and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn ioctl_ifreq(
    sock: BorrowedFd<'_>,
    request: libc::c_ulong,
    req: &mut libc::ifreq,
) -> io::Result<()> {
    // SAFETY: every request passed here reads or writes a single ifreq,
    // which `req` points to for the duration of the call.
    check(unsafe { libc::ioctl(sock.as_raw_fd(), request, req as *mut libc::ifreq) })?;
    Ok(())
}

pub fn if_set_hwaddr(sock: BorrowedFd<'_>, name: &str, mac: MacAddr) -> io::Result<()> {
    let mut req = ifreq_named(name)?;
    // SAFETY: writing plain data into the sockaddr arm of the union.
    unsafe {
        req.ifr_ifru.ifru_hwaddr.sa_family = libc::ARPHRD_ETHER;
        for (dst, src) in req.ifr_ifru.ifru_hwaddr.sa_data.iter_mut().zip(mac.0) {
            *dst = src as libc::c_char;
        }
    }
    ioctl_ifreq(sock, libc::SIOCSIFHWADDR, &mut req)
}

pub fn if_set_addr(
    sock: BorrowedFd<'_>,
    name: &str,
    addr: Ipv4Addr,
    netmask: Ipv4Addr,
) -> io::Result<()> {
    let mut req = ifreq_named(name)?;
    req.ifr_ifru.ifru_addr = sockaddr_in(addr);
    ioctl_ifreq(sock, libc::SIOCSIFADDR, &mut req)?;
    let mut req = ifreq_named(name)?;
    req.ifr_ifru.ifru_netmask = sockaddr_in(netmask);
    ioctl_ifreq(sock, libc::SIOCSIFNETMASK, &mut req)
}

pub fn if_set_up(sock: BorrowedFd<'_>, name: &str) -> io::Result<()> {
    let mut req = ifreq_named(name)?;
    ioctl_ifreq(sock, libc::SIOCGIFFLAGS, &mut req)?;
    // SAFETY: SIOCGIFFLAGS filled the flags arm of the union.
    unsafe {
        req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
    }
    ioctl_ifreq(sock, libc::SIOCSIFFLAGS, &mut req)
}

/// Sets the length of the interface's transmit queue.
pub fn if_set_txqueuelen(sock: BorrowedFd<'_>, name: &str, len: i32) -> io::Result<()> {
    let mut req = ifreq_named(name)?;
    req.ifr_ifru.ifru_metric = len;
    ioctl_ifreq(sock, libc::SIOCSIFTXQLEN, &mut req)
}

pub fn add_default_route(sock: BorrowedFd<'_>, gateway: Ipv4Addr) -> io::Result<()> {
    // SAFETY: rtentry is a plain C struct for which zero bytes are valid
    // (null device pointer: the kernel picks the interface by gateway).
    let mut rt: libc::rtentry = unsafe { mem::zeroed() };
    rt.rt_dst = sockaddr_in(Ipv4Addr::UNSPECIFIED);
    rt.rt_genmask = sockaddr_in(Ipv4Addr::UNSPECIFIED);
    rt.rt_gateway = sockaddr_in(gateway);
    rt.rt_flags = libc::RTF_UP | libc::RTF_GATEWAY;
    // SAFETY: SIOCADDRT reads one rtentry, valid for the duration of the call.
    check(unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCADDRT, &mut rt) })?;
    Ok(())
}

/// An `AF_PACKET` raw socket, not yet bound: it takes no frame until
/// [`packet_bind`] names the interface and the protocols (all of them).
pub fn packet_socket() -> io::Result<OwnedFd> {
    // Protocol 0: no receive hook yet. A socket made for ETH_P_ALL hooks
    // every interface at once, and its bind to one interface must then
    // unhook it first, which waits for an RCU grace period (10 ms
    // measured, in every container start and restore).
    // SAFETY: plain socket(2); the returned fd is fresh and owned by us.
    let fd =
        check(unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: fd was just returned by socket(2) and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn setsockopt<T>(
    fd: BorrowedFd<'_>,
    level: libc::c_int,
    name: libc::c_int,
    value: &T,
) -> io::Result<()> {
    // SAFETY: `value` points to a live T of the size we pass.
    check(unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            value as *const T as *const libc::c_void,
            mem::size_of::<T>() as libc::socklen_t,
        )
    })?;
    Ok(())
}

pub fn setsockopt_int(
    fd: BorrowedFd<'_>,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    setsockopt(fd, level, name, &value)
}

pub fn packet_bind(fd: BorrowedFd<'_>, ifindex: u32) -> io::Result<()> {
    // SAFETY: sockaddr_ll is plain data; zero is valid for every field.
    let mut sll: libc::sockaddr_ll = unsafe { mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
    sll.sll_ifindex = ifindex as libc::c_int;
    // SAFETY: we pass a pointer to a live sockaddr_ll and its exact size.
    check(unsafe {
        libc::bind(
            fd.as_raw_fd(),
            &sll as *const libc::sockaddr_ll as *const libc::sockaddr,
            mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    })?;
    Ok(())
}

/// Puts the interface in promiscuous mode for as long as `fd` is open (the
/// kernel counts such memberships and drops them with the socket).
pub fn packet_add_promisc(fd: BorrowedFd<'_>, ifindex: u32) -> io::Result<()> {
    let mreq = libc::packet_mreq {
        mr_ifindex: ifindex as libc::c_int,
        mr_type: libc::PACKET_MR_PROMISC as libc::c_ushort,
        mr_alen: 0,
        mr_address: [0; 8],
    };
    setsockopt(fd, libc::SOL_PACKET, libc::PACKET_ADD_MEMBERSHIP, &mreq)
}

/// Attaches a classic BPF program that keeps only frames addressed to `mac`
/// or to a group address, so the forwarding thread is not woken for the
/// host's own traffic.
pub fn attach_mac_filter(fd: BorrowedFd<'_>, mac: MacAddr) -> io::Result<()> {
    let m = mac.0;
    let hi = u32::from_be_bytes([m[0], m[1], m[2], m[3]]);
    let lo = u32::from(u16::from_be_bytes([m[4], m[5]]));
    let ins = |code: u16, jt: u8, jf: u8, k: u32| libc::sock_filter { code, jt, jf, k };
    const LD_B_ABS: u16 = (libc::BPF_LD | libc::BPF_B | libc::BPF_ABS) as u16;
    const LD_W_ABS: u16 = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
    const LD_H_ABS: u16 = (libc::BPF_LD | libc::BPF_H | libc::BPF_ABS) as u16;
    const JSET: u16 = (libc::BPF_JMP | libc::BPF_JSET | libc::BPF_K) as u16;
    const JEQ: u16 = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
    const RET: u16 = (libc::BPF_RET | libc::BPF_K) as u16;
    let prog = [
        ins(LD_B_ABS, 0, 0, 0),   // 0: first byte of the destination
        ins(JSET, 4, 0, 1),       // 1: group bit -> accept (6)
        ins(LD_W_ABS, 0, 0, 0),   // 2: destination bytes 0..4
        ins(JEQ, 0, 3, hi),       // 3: mismatch -> drop (7)
        ins(LD_H_ABS, 0, 0, 4),   // 4: destination bytes 4..6
        ins(JEQ, 0, 1, lo),       // 5: mismatch -> drop (7)
        ins(RET, 0, 0, u32::MAX), // 6: accept whole frame
        ins(RET, 0, 0, 0),        // 7: drop
    ];
    let fprog = libc::sock_fprog {
        len: prog.len() as libc::c_ushort,
        filter: prog.as_ptr() as *mut libc::sock_filter,
    };
    setsockopt(fd, libc::SOL_SOCKET, libc::SO_ATTACH_FILTER, &fprog)
}
