//! Frames as they cross rrc: a `virtio_net_hdr` followed by an Ethernet frame.

use std::net::{Ipv4Addr, SocketAddrV4};

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

/// What the replication's release rule needs to know of a TCP segment:
/// its connection and where it sits in each direction's byte stream. Large
/// offloaded segments (up to 64 KiB) are described whole: the offload
/// header only says how the kernel will cut them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpFacts {
    pub src: SocketAddrV4,
    pub dst: SocketAddrV4,
    pub seq: u32,
    pub ack: u32,
    /// TCP flags (FIN 0x01, SYN 0x02, RST 0x04, PSH 0x08, ACK 0x10).
    pub flags: u8,
    /// Bytes of payload after the TCP header.
    pub payload_len: u32,
}

impl TcpFacts {
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const ACK: u8 = 0x10;
}

const ETHERTYPE_IPV4: u16 = 0x0800;
const IPPROTO_TCP: u8 = 6;

/// A whole TCP segment as a takeover reads it from the net log: the facts,
/// the window, the options of interest and the payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpSegment<'a> {
    pub facts: TcpFacts,
    /// The window field as sent (not scaled).
    pub window: u16,
    /// MSS option (SYN segments).
    pub mss: Option<u16>,
    /// Window scale option (SYN segments).
    pub wscale: Option<u8>,
    /// SACK permitted option (SYN segments).
    pub sack_permitted: bool,
    /// Timestamps option: (value, echo reply).
    pub timestamps: Option<(u32, u32)>,
    pub payload: &'a [u8],
}

impl<'a> Frame<'a> {
    /// The TCP facts of an IPv4 TCP frame (not a fragment); `None` for
    /// anything else or anything too short to hold what it claims.
    pub fn tcp(&self) -> Option<TcpFacts> {
        self.tcp_parts().map(|(facts, _, _)| facts)
    }

    /// The whole segment of an IPv4 TCP frame, as [`Frame::tcp`] finds it.
    pub fn tcp_segment(&self) -> Option<TcpSegment<'a>> {
        let (facts, header, payload) = self.tcp_parts()?;
        let mut seg = TcpSegment {
            facts,
            window: u16::from_be_bytes([header[14], header[15]]),
            mss: None,
            wscale: None,
            sack_permitted: false,
            timestamps: None,
            payload,
        };
        let mut opts = &header[20..];
        while let Some(&kind) = opts.first() {
            match kind {
                0 => break,
                1 => {
                    opts = &opts[1..];
                    continue;
                }
                _ => {}
            }
            let len = usize::from(*opts.get(1)?);
            if len < 2 || len > opts.len() {
                return None;
            }
            let body = &opts[2..len];
            match (kind, body.len()) {
                (2, 2) => seg.mss = Some(u16::from_be_bytes([body[0], body[1]])),
                (3, 1) => seg.wscale = Some(body[0]),
                (4, 0) => seg.sack_permitted = true,
                (8, 8) => {
                    let v = u32::from_be_bytes([body[0], body[1], body[2], body[3]]);
                    let e = u32::from_be_bytes([body[4], body[5], body[6], body[7]]);
                    seg.timestamps = Some((v, e));
                }
                _ => {}
            }
            opts = &opts[len..];
        }
        Some(seg)
    }

    /// Facts, TCP header (options included) and payload of an IPv4 TCP
    /// frame.
    fn tcp_parts(&self) -> Option<(TcpFacts, &'a [u8], &'a [u8])> {
        if self.ethertype() != ETHERTYPE_IPV4 {
            return None;
        }
        let ip = &self.bytes[VNET_HDR_LEN + ETH_HDR_LEN..];
        let ihl = usize::from(*ip.first()? & 0x0f) * 4;
        if ip[0] >> 4 != 4 || ihl < 20 || ip.len() < ihl || ip[9] != IPPROTO_TCP {
            return None;
        }
        // A later fragment has no TCP header; a first one is cut short.
        let frag = u16::from_be_bytes([ip[6], ip[7]]);
        if frag & 0x3fff != 0 {
            return None;
        }
        // The IP length bounds the payload (Ethernet pads short frames);
        // a segmentation-offloaded packet may carry 0 there when it is
        // larger than IP can say, and then the frame's length counts.
        let total = match usize::from(u16::from_be_bytes([ip[2], ip[3]])) {
            0 => ip.len(),
            n if n <= ip.len() => n,
            _ => return None,
        };
        let tcp = &ip[ihl..total];
        if tcp.len() < 20 {
            return None;
        }
        let doff = usize::from(tcp[12] >> 4) * 4;
        if doff < 20 || doff > tcp.len() {
            return None;
        }
        let addr = |b: &[u8]| Ipv4Addr::new(b[0], b[1], b[2], b[3]);
        let u32_at =
            |b: &[u8], at: usize| u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
        let facts = TcpFacts {
            src: SocketAddrV4::new(addr(&ip[12..16]), u16::from_be_bytes([tcp[0], tcp[1]])),
            dst: SocketAddrV4::new(addr(&ip[16..20]), u16::from_be_bytes([tcp[2], tcp[3]])),
            seq: u32_at(tcp, 4),
            ack: u32_at(tcp, 8),
            flags: tcp[13],
            payload_len: (tcp.len() - doff) as u32,
        };
        Some((facts, &tcp[..doff], &tcp[doff..]))
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

    #[test]
    fn a_segment_gives_its_options_window_and_payload() {
        let mut f = tcp_frame(5, None);
        let tcp_at = VNET_HDR_LEN + 14 + 20;
        f[tcp_at + 14..tcp_at + 16].copy_from_slice(&501u16.to_be_bytes());
        let opts: [u8; 12] = [8, 10, 0, 0, 0, 9, 0, 0, 0, 4, 1, 1];
        f[tcp_at + 20..tcp_at + 32].copy_from_slice(&opts);
        let seg = Frame::new(&f).unwrap().tcp_segment().unwrap();
        assert_eq!(seg.window, 501);
        assert_eq!(seg.timestamps, Some((9, 4)));
        assert_eq!(seg.payload, &[7u8; 5][..]);
        assert_eq!(seg.facts.payload_len, 5);
        let syn: [u8; 12] = [2, 4, 5, 0xb4, 1, 3, 3, 7, 4, 2, 0, 0];
        f[tcp_at + 20..tcp_at + 32].copy_from_slice(&syn);
        let seg = Frame::new(&f).unwrap().tcp_segment().unwrap();
        assert_eq!(
            (seg.mss, seg.wscale, seg.sack_permitted, seg.timestamps),
            (Some(1460), Some(7), true, None)
        );
        // An option running past the header is refused.
        f[tcp_at + 20..tcp_at + 32].copy_from_slice(&[1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 8, 10]);
        assert!(Frame::new(&f).unwrap().tcp_segment().is_none());
    }

    /// A TCP/IPv4 frame with `payload` bytes of data.
    fn tcp_frame(payload: usize, ip_len_field: Option<u16>) -> Vec<u8> {
        let mut b = vec![0u8; VNET_HDR_LEN];
        b.extend_from_slice(&[2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1, 0x08, 0x00]);
        let total = 20 + 32 + payload;
        let mut ip = vec![
            0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 6, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2,
        ];
        let len = ip_len_field.unwrap_or(total as u16);
        ip[2..4].copy_from_slice(&len.to_be_bytes());
        b.extend_from_slice(&ip);
        let mut tcp = vec![0u8; 32];
        tcp[0..2].copy_from_slice(&6379u16.to_be_bytes());
        tcp[2..4].copy_from_slice(&40000u16.to_be_bytes());
        tcp[4..8].copy_from_slice(&1000u32.to_be_bytes());
        tcp[8..12].copy_from_slice(&2000u32.to_be_bytes());
        tcp[12] = 8 << 4;
        tcp[13] = TcpFacts::ACK | 0x08;
        b.extend_from_slice(&tcp);
        b.extend(std::iter::repeat_n(7u8, payload));
        b
    }

    #[test]
    fn tcp_facts() {
        let f = tcp_frame(100, None);
        let t = Frame::new(&f).unwrap().tcp().unwrap();
        assert_eq!(t.src, "10.0.0.1:6379".parse().unwrap());
        assert_eq!(t.dst, "10.0.0.2:40000".parse().unwrap());
        assert_eq!((t.seq, t.ack, t.payload_len), (1000, 2000, 100));
        assert_eq!(t.flags & TcpFacts::ACK, TcpFacts::ACK);
        // Ethernet padding after the IP packet is not payload.
        let mut padded = tcp_frame(0, None);
        padded.extend_from_slice(&[0; 6]);
        assert_eq!(Frame::new(&padded).unwrap().tcp().unwrap().payload_len, 0);
        // An offloaded segment too large for the IP length field.
        let big = tcp_frame(70_000, Some(0));
        assert_eq!(Frame::new(&big).unwrap().tcp().unwrap().payload_len, 70_000);
        // A length beyond the frame, a bad data offset: not trusted.
        assert!(
            Frame::new(&tcp_frame(10, Some(500)))
                .unwrap()
                .tcp()
                .is_none()
        );
        let mut bad = tcp_frame(10, None);
        bad[VNET_HDR_LEN + 14 + 20 + 12] = 15 << 4;
        assert!(Frame::new(&bad).unwrap().tcp().is_none());
        for cut in 0..f.len() {
            if let Some(fr) = Frame::new(&f[..cut]) {
                let _ = fr.tcp();
            }
        }
    }
}
