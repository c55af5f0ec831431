//! TAP devices: the container's network interface, whose file descriptor
//! stays with rrc so every frame in or out passes through the packet gate.

use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsFd, OwnedFd};

use nix::unistd;

use crate::frame::VNET_HDR_LEN;
use crate::gate::FrameSink;
use crate::{Error, Result, sys};

const TUN_PATH: &str = "/dev/net/tun";

#[derive(Debug)]
pub struct Tap {
    fd: OwnedFd,
    name: String,
}

/// Checks that TAP devices with offload headers can be created here,
/// without creating one.
pub fn check_available() -> Result<()> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(TUN_PATH)
        .map_err(Error::TapUnavailable)?;
    let features = sys::tun_get_features(file.as_fd()).map_err(Error::TapUnavailable)?;
    let needed = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_uint;
    if features & needed != needed {
        return Err(Error::TapUnavailable(io::Error::new(
            io::ErrorKind::Unsupported,
            format!("the TUN driver lacks TAP or offload-header support (features {features:#x})"),
        )));
    }
    Ok(())
}

impl Tap {
    /// Creates a TAP interface named `name` in the calling thread's network
    /// namespace. The device lives as long as the returned handle.
    ///
    /// Offloads are enabled so the container's kernel may hand over
    /// unfinished checksums and 64 KiB segments, which the uplink's packet
    /// socket passes on with the same `virtio_net_hdr`.
    pub fn create(name: &str) -> Result<Tap> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(TUN_PATH)
            .map_err(Error::TapUnavailable)?;
        let fd: OwnedFd = file.into();
        let flags = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;
        let name = sys::tun_set_iff(fd.as_fd(), name, flags).map_err(|e| {
            // ENOTTY/EINVAL/EBADFD: /dev/net/tun is there but is not a TUN driver.
            match e.raw_os_error() {
                Some(libc::ENOTTY) | Some(libc::EBADFD) | Some(libc::ENODEV) => {
                    Error::TapUnavailable(e)
                }
                _ => Error::TapCreate {
                    name: name.into(),
                    source: e,
                },
            }
        })?;
        let configure = |what: &'static str, r: io::Result<()>| {
            r.map_err(|source| Error::Configure {
                ifname: name.clone(),
                what,
                source,
            })
        };
        configure(
            "vnet header size",
            sys::tun_set_vnet_hdr_size(fd.as_fd(), VNET_HDR_LEN as libc::c_int),
        )?;
        configure(
            "offloads",
            sys::tun_set_offload(
                fd.as_fd(),
                libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6 | libc::TUN_F_TSO_ECN,
            ),
        )?;
        Ok(Tap { fd, name })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Makes reads return `WouldBlock` instead of waiting.
    pub fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        let flags = nix::fcntl::fcntl(&self.fd, nix::fcntl::FcntlArg::F_GETFL)?;
        let mut flags = nix::fcntl::OFlag::from_bits_truncate(flags);
        flags.set(nix::fcntl::OFlag::O_NONBLOCK, on);
        nix::fcntl::fcntl(&self.fd, nix::fcntl::FcntlArg::F_SETFL(flags))?;
        Ok(())
    }

    /// Reads the next frame the container sent (waiting for one unless the
    /// device is non-blocking); returns its length, offload header included.
    pub fn read_frame(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match unistd::read(self.fd.as_fd(), buf) {
                Ok(n) => return Ok(n),
                Err(nix::Error::EINTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Delivers one frame (offload header included) to the container.
    pub fn write_frame(&self, frame: &[u8]) -> io::Result<()> {
        loop {
            match unistd::write(&self.fd, frame) {
                Ok(_) => return Ok(()),
                Err(nix::Error::EINTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }
}

impl AsFd for Tap {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl FrameSink for Tap {
    fn send_frame(&self, frame: &[u8]) -> io::Result<()> {
        self.write_frame(frame)
    }
}
