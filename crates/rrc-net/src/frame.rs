//! Frames as they cross rrc: a `virtio_net_hdr` followed by an Ethernet frame.

use crate::MacAddr;

/// Size of `struct virtio_net_hdr`, the offload header that TAP devices with
/// `IFF_VNET_HDR` and packet sockets with `PACKET_VNET_HDR` put in front of
/// every frame. It says whether the checksum is still to be completed and
/// how a large frame is to be segmented, so such frames pass through rrc
/// without being touched.
pub const VNET_HDR_LEN: usize = 10;

const ETH_HDR_LEN: usize = 14;

/// Room for the largest frame a TAP or packet socket hands over: a 64 KiB
/// segmentation-offloaded packet plus headers.
pub const MAX_FRAME_LEN: usize = VNET_HDR_LEN + ETH_HDR_LEN + 65_535 + 64;

/// A frame with its offload header, borrowed from a receive buffer.
#[derive(Clone, Copy)]
pub struct Frame<'a> {
    bytes: &'a [u8],
}

impl<'a> Frame<'a> {
    /// `None` when the buffer is too short to hold the headers.
    pub fn new(bytes: &'a [u8]) -> Option<Frame<'a>> {
        (bytes.len() >= VNET_HDR_LEN + ETH_HDR_LEN).then_some(Frame { bytes })
    }

    /// The whole frame, offload header included, as the devices exchange it.
    pub fn bytes(&self) -> &'a [u8] {
        self.bytes
    }

    /// The Ethernet frame alone.
    pub fn ethernet(&self) -> &'a [u8] {
        &self.bytes[VNET_HDR_LEN..]
    }

    pub fn dst(&self) -> MacAddr {
        mac_at(self.ethernet(), 0)
    }

    pub fn src(&self) -> MacAddr {
        mac_at(self.ethernet(), 6)
    }

    pub fn ethertype(&self) -> u16 {
        let e = self.ethernet();
        u16::from_be_bytes([e[12], e[13]])
    }

    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }
}

fn mac_at(eth: &[u8], at: usize) -> MacAddr {
    let mut m = [0u8; 6];
    m.copy_from_slice(&eth[at..at + 6]);
    MacAddr(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_headers() {
        let mut b = vec![0u8; VNET_HDR_LEN];
        b.extend_from_slice(&[0xff; 6]);
        b.extend_from_slice(&[2, 0, 0, 0, 0, 1]);
        b.extend_from_slice(&[0x08, 0x06]);
        let f = Frame::new(&b).unwrap();
        assert_eq!(f.dst(), MacAddr::BROADCAST);
        assert_eq!(f.src(), MacAddr([2, 0, 0, 0, 0, 1]));
        assert_eq!(f.ethertype(), 0x0806);
        assert!(Frame::new(&b[..20]).is_none());
    }
}
