//! Interface configuration inside a network namespace (addresses, MAC, link
//! state, default route) and the address plan of the current one.

use std::net::Ipv4Addr;
use std::os::fd::AsFd;

use ipnet::Ipv4Net;
use nix::ifaddrs::getifaddrs;
use nix::sys::socket::SockaddrLike;

use crate::{Error, MacAddr, Result, sys};

fn cfg_err(ifname: &str, what: &'static str) -> impl FnOnce(std::io::Error) -> Error {
    let ifname = ifname.to_string();
    move |source| Error::Configure {
        ifname,
        what,
        source,
    }
}

const TXQUEUELEN: i32 = 16_384;

/// Brings `lo` up in the calling thread's namespace.
pub fn loopback_up() -> Result<()> {
    let sock = sys::config_socket().map_err(cfg_err("lo", "socket"))?;
    sys::if_set_up(sock.as_fd(), "lo").map_err(cfg_err("lo", "link up"))
}

/// Gives `ifname` (in the calling thread's namespace) its MAC and IPv4
/// address, then brings it up.
pub fn configure_interface(ifname: &str, mac: MacAddr, addr: Ipv4Net) -> Result<()> {
    let sock = sys::config_socket().map_err(cfg_err(ifname, "socket"))?;
    sys::if_set_hwaddr(sock.as_fd(), ifname, mac).map_err(cfg_err(ifname, "MAC address"))?;
    sys::if_set_addr(sock.as_fd(), ifname, addr.addr(), addr.netmask())
        .map_err(cfg_err(ifname, "IPv4 address"))?;
    // Room for the burst a restored container sends before rrc forwards
    // (a window probe and acknowledgements per restored connection).
    sys::if_set_txqueuelen(sock.as_fd(), ifname, TXQUEUELEN)
        .map_err(cfg_err(ifname, "transmit queue"))?;
    sys::if_set_up(sock.as_fd(), ifname).map_err(cfg_err(ifname, "link up"))
}

/// Adds a default route through `gateway` in the calling thread's namespace.
pub fn add_default_route(gateway: Ipv4Addr) -> Result<()> {
    let sock = sys::config_socket().map_err(cfg_err("default route", "socket"))?;
    sys::add_default_route(sock.as_fd(), gateway).map_err(cfg_err("default route", "route"))
}

/// One IPv4 address configured on an interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InterfaceAddr {
    pub ifname: String,
    pub net: Ipv4Net,
}

/// Every IPv4 address of the calling thread's namespace.
pub fn ipv4_addresses() -> Result<Vec<InterfaceAddr>> {
    let mut out = Vec::new();
    for ifa in getifaddrs().map_err(Error::Addresses)? {
        let (Some(addr), Some(mask)) = (ifa.address, ifa.netmask) else {
            continue;
        };
        if addr.family() != Some(nix::sys::socket::AddressFamily::Inet) {
            continue;
        }
        let (Some(a), Some(m)) = (addr.as_sockaddr_in(), mask.as_sockaddr_in()) else {
            continue;
        };
        let prefix = u32::from(m.ip()).count_ones() as u8;
        if let Ok(net) = Ipv4Net::new(a.ip(), prefix) {
            out.push(InterfaceAddr {
                ifname: ifa.interface_name,
                net,
            });
        }
    }
    Ok(out)
}
