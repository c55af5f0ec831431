//! Network namespaces: handles to them, and running code inside one.
//!
//! A socket or TAP device belongs to the namespace of the thread that
//! created it, and stays there whatever that thread does next. So rrc creates
//! a container's TAP from a short-lived thread that has entered the
//! container's namespace, and keeps using the device from anywhere.

use std::fs::{self, File};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use nix::sched::{CloneFlags, setns};

use crate::{Error, Result};

/// Where `ip netns` keeps its named namespaces.
pub const NETNS_RUN_DIR: &str = "/run/netns";

#[derive(Debug)]
pub struct NetNs {
    fd: OwnedFd,
    what: String,
}

impl NetNs {
    fn open(path: &Path, what: String) -> Result<NetNs> {
        let f = File::open(path).map_err(|source| Error::NetNsOpen {
            what: what.clone(),
            source,
        })?;
        Ok(NetNs { fd: f.into(), what })
    }

    /// The namespace process `pid` is in.
    pub fn of_pid(pid: i32) -> Result<NetNs> {
        Self::open(
            Path::new(&format!("/proc/{pid}/ns/net")),
            format!("of process {pid}"),
        )
    }

    /// A namespace named by `ip netns add NAME`.
    pub fn named(name: &str) -> Result<NetNs> {
        Self::open(&Path::new(NETNS_RUN_DIR).join(name), format!("`{name}`"))
    }

    /// The calling thread's namespace.
    pub fn current() -> Result<NetNs> {
        Self::open(
            Path::new("/proc/thread-self/ns/net"),
            "of this thread".into(),
        )
    }

    /// The kernel's identity of the namespace (device, inode), the same for
    /// every handle to it.
    pub fn id(&self) -> std::io::Result<(u64, u64)> {
        let f = File::from(self.fd.try_clone()?);
        let m = f.metadata()?;
        Ok((m.dev(), m.ino()))
    }

    /// Moves the calling thread into this namespace for good.
    pub fn enter(&self) -> Result<()> {
        setns(self.fd.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|source| Error::NetNsEnter {
            what: self.what.clone(),
            source,
        })
    }

    /// Runs `f` on a helper thread inside this namespace and returns its
    /// result; the calling thread stays where it is.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        std::thread::scope(|s| {
            let h = s.spawn(|| {
                self.enter()?;
                Ok(f())
            });
            match h.join() {
                Ok(r) => r,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        })
    }
}

/// The `ip netns` name of the calling thread's namespace, if it has one.
pub fn current_name() -> Option<String> {
    let me = NetNs::current().ok()?.id().ok()?;
    for entry in fs::read_dir(NETNS_RUN_DIR).ok()?.flatten() {
        if let Ok(m) = fs::metadata(entry.path())
            && (m.dev(), m.ino()) == me
        {
            return Some(entry.file_name().to_string_lossy().into_owned());
        }
    }
    None
}
