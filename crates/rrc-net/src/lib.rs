//! Networking for rrc containers.
//!
//! A container's only network interface (besides loopback) is a TAP device
//! whose file descriptor the rrc process holds. Every frame between the
//! container and the LAN therefore crosses rrc: [`forward::Forwarder`] moves
//! frames between the TAP and an uplink [`packet::PacketSocket`] on a host
//! interface, and hands each one to a [`gate::PacketGate`], the single place
//! that may hold, log or release frames.
//!
//! Frames travel with a `virtio_net_hdr` in front (see [`frame::Frame`]):
//! both the TAP (`IFF_VNET_HDR`) and the packet socket (`PACKET_VNET_HDR`)
//! speak it, so checksum-offloaded and segmentation-offloaded packets pass
//! through untouched instead of arriving with unfinished checksums.

pub mod arp;
pub mod forward;
pub mod frame;
pub mod gate;
pub mod mac;
pub mod netconf;
pub mod netns;
pub mod packet;
mod sys;
pub mod tap;

pub use mac::MacAddr;
pub use netns::NetNs;

/// Errors of the networking layer; each names what failed and on what.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "TAP devices are not available ({0}): load the `tun` kernel module and make sure /dev/net/tun exists"
    )]
    TapUnavailable(std::io::Error),
    #[error("cannot create TAP device {name}: {source}")]
    TapCreate {
        name: String,
        source: std::io::Error,
    },
    #[error("no network interface named {0} here")]
    NoInterface(String),
    #[error("cannot open a packet socket on {ifname}: {source}")]
    PacketSocket {
        ifname: String,
        source: std::io::Error,
    },
    #[error("cannot configure interface {ifname} ({what}): {source}")]
    Configure {
        ifname: String,
        what: &'static str,
        source: std::io::Error,
    },
    #[error("cannot open network namespace {what}: {source}")]
    NetNsOpen {
        what: String,
        source: std::io::Error,
    },
    #[error("cannot enter network namespace {what}: {source}")]
    NetNsEnter { what: String, source: nix::Error },
    #[error("cannot list interface addresses: {0}")]
    Addresses(nix::Error),
}

pub type Result<T> = std::result::Result<T, Error>;
