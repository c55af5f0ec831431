//! ARP frames rrc sends on the container's behalf.

use std::net::Ipv4Addr;

use crate::MacAddr;
use crate::frame::VNET_HDR_LEN;

/// A gratuitous ARP request announcing that `ip` is at `mac`, with an empty
/// offload header in front, ready for [`crate::packet::PacketSocket::send_frame`].
///
/// Switches learn the port of `mac` from it and hosts update their ARP caches,
/// which is how the LAN finds a container that moved to another host.
pub fn gratuitous(mac: MacAddr, ip: Ipv4Addr) -> Vec<u8> {
    let mut f = vec![0u8; VNET_HDR_LEN];
    f.extend_from_slice(&MacAddr::BROADCAST.0);
    f.extend_from_slice(&mac.0);
    f.extend_from_slice(&0x0806u16.to_be_bytes()); // ARP
    f.extend_from_slice(&1u16.to_be_bytes()); // hardware: Ethernet
    f.extend_from_slice(&0x0800u16.to_be_bytes()); // protocol: IPv4
    f.push(6);
    f.push(4);
    f.extend_from_slice(&1u16.to_be_bytes()); // request
    f.extend_from_slice(&mac.0); // sender MAC
    f.extend_from_slice(&ip.octets()); // sender IP
    f.extend_from_slice(&[0; 6]); // target MAC: unknown
    f.extend_from_slice(&ip.octets()); // target IP = sender IP: gratuitous
    f
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::Frame;

    #[test]
    fn layout() {
        let mac = MacAddr([2, 1, 2, 3, 4, 5]);
        let raw = gratuitous(mac, Ipv4Addr::new(10, 0, 0, 100));
        let f = Frame::new(&raw).unwrap();
        assert_eq!(f.dst(), MacAddr::BROADCAST);
        assert_eq!(f.src(), mac);
        assert_eq!(f.ethertype(), 0x0806);
        assert_eq!(f.ethernet().len(), 14 + 28);
        assert_eq!(&f.ethernet()[28..32], &[10, 0, 0, 100]);
        assert_eq!(&f.ethernet()[38..42], &[10, 0, 0, 100]);
    }
}
