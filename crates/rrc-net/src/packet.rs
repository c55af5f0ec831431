//! The uplink: an `AF_PACKET` socket on a host interface that receives the
//! LAN's frames for the container's MAC and sends the container's frames.

use std::io;
use std::os::fd::{AsFd, OwnedFd};

use std::os::fd::AsRawFd;

use nix::net::if_::if_nametoindex;
use nix::sys::socket::{MsgFlags, recv};
use nix::unistd;

use crate::gate::FrameSink;
use crate::{Error, MacAddr, Result, sys};

#[derive(Debug)]
pub struct PacketSocket {
    fd: OwnedFd,
    ifname: String,
    ifindex: u32,
}

/// Socket buffers for bursts while the forwarding thread waits for a CPU.
const RCVBUF: libc::c_int = 4 << 20;
const SNDBUF: libc::c_int = 4 << 20;

impl PacketSocket {
    /// Opens the uplink on `ifname` (in the calling thread's network
    /// namespace) for the container whose address is `mac`: frames to that
    /// MAC and to group addresses are received, nothing this socket sends is
    /// looped back to it.
    pub fn open(ifname: &str, mac: MacAddr) -> Result<PacketSocket> {
        let ifindex = if_nametoindex(ifname).map_err(|_| Error::NoInterface(ifname.into()))?;
        let err = |source: io::Error| Error::PacketSocket {
            ifname: ifname.into(),
            source,
        };
        let fd = sys::packet_socket().map_err(err)?;
        // The filter goes on before bind so no foreign frame is queued.
        sys::attach_mac_filter(fd.as_fd(), mac).map_err(err)?;
        sys::setsockopt_int(fd.as_fd(), libc::SOL_PACKET, libc::PACKET_VNET_HDR, 1).map_err(err)?;
        sys::setsockopt_int(
            fd.as_fd(),
            libc::SOL_PACKET,
            libc::PACKET_IGNORE_OUTGOING,
            1,
        )
        .map_err(err)?;
        sys::setsockopt_int(fd.as_fd(), libc::SOL_SOCKET, libc::SO_RCVBUF, RCVBUF).map_err(err)?;
        sys::setsockopt_int(fd.as_fd(), libc::SOL_SOCKET, libc::SO_SNDBUF, SNDBUF).map_err(err)?;
        sys::packet_bind(fd.as_fd(), ifindex).map_err(err)?;
        sys::packet_add_promisc(fd.as_fd(), ifindex).map_err(err)?;
        Ok(PacketSocket {
            fd,
            ifname: ifname.into(),
            ifindex,
        })
    }

    pub fn ifname(&self) -> &str {
        &self.ifname
    }

    pub fn ifindex(&self) -> u32 {
        self.ifindex
    }

    /// Takes the next frame for the container if one is queued (else
    /// `WouldBlock`); returns its length, offload header included.
    pub fn recv_frame(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match recv(self.fd.as_raw_fd(), buf, MsgFlags::MSG_DONTWAIT) {
                Ok(n) => return Ok(n),
                Err(nix::Error::EINTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    pub fn send_frame(&self, frame: &[u8]) -> io::Result<()> {
        loop {
            match unistd::write(&self.fd, frame) {
                Ok(_) => return Ok(()),
                Err(nix::Error::EINTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }
}

impl AsFd for PacketSocket {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl FrameSink for PacketSocket {
    fn send_frame(&self, frame: &[u8]) -> io::Result<()> {
        PacketSocket::send_frame(self, frame)
    }
}
