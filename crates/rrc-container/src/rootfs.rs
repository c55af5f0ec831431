//! What a container sees as `/`.
//!
//! - [`RootFs::Host`]: the host's file system, as rrc sees it (the
//!   container has a mount namespace of its own, but the same files).
//! - [`RootFs::Private`]: a read-only view of the host's file system, with
//!   `/tmp`, `/run` and `/var` of the container's own, kept on the host in
//!   [`PRIVATE_BASE`]`/NAME` (so that a restore on this machine finds what
//!   the program wrote there), and `/dev/shm` too.
//!
//! The container's output file (rrc's log of a detached container, on the
//! host) is bound into a private root at its own path, so that the
//! program's standard output means the same file after a restore.
//!
//! The container's first process enters its root ([`RootPlan::enter`])
//! before it mounts `/proc` and `/sys`: the tree is bound onto a mount
//! point, made what it should be, and `pivot_root` puts it at `/`, the old
//! root detached. A restore enters the same root before the processes are
//! made again, so that every path they had open means the same file.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags, mount, umount2};
use serde::{Deserialize, Serialize};

use crate::spec::ContainerName;
use crate::{Error, Result};

/// Where the private `/tmp`, `/run` and `/var` of containers with
/// [`RootFs::Private`] live, one directory per container name.
pub const PRIVATE_BASE: &str = "/var/lib/rrc/roots";

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum RootFs {
    #[default]
    Host,
    Private,
}

impl std::str::FromStr for RootFs {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<RootFs, String> {
        match s {
            "host" => Ok(RootFs::Host),
            "private" => Ok(RootFs::Private),
            _ => Err(format!("{s:?}: expected host or private")),
        }
    }
}

/// A root ready to enter: every path prepared before the fork (the child
/// only makes system calls).
#[derive(Debug, Clone)]
pub struct RootPlan {
    /// Where the host's tree is bound (read-only), then made `/`.
    mount_point: CString,
    /// Bound over paths of that tree, writable: the private directories
    /// and the files kept (host path, mount point in the tree).
    binds: Vec<(CString, CString)>,
    /// Where the program's working directory was: kept if the new root
    /// has it.
    cwd: Option<CString>,
}

fn cstr(p: &Path) -> Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| Error::InvalidSpec(format!("{} contains a NUL byte", p.display())))
}

impl RootFs {
    /// The private directory of container `name`.
    pub fn private_dir(name: &ContainerName) -> PathBuf {
        Path::new(PRIVATE_BASE).join(name.as_str())
    }

    /// Prepares the root of container `name` (creating its private
    /// directories, if it has any), with the host files of `keep` (rrc's
    /// own: the container's output) bound at paths in it (host file, path
    /// inside); `None` for the host's own root. A path inside that is not
    /// plain (`..`, not absolute) is refused: it may come from an image.
    pub fn plan(&self, name: &ContainerName, keep: &[(&Path, &Path)]) -> Result<Option<RootPlan>> {
        let cwd = std::env::current_dir().ok().map(|d| cstr(&d)).transpose()?;
        match self {
            RootFs::Host => Ok(None),
            RootFs::Private => {
                let dir = Self::private_dir(name);
                let io = |what: &str, p: &Path, e: std::io::Error| {
                    Error::InvalidSpec(format!("{what} {}: {e}", p.display()))
                };
                // Only root may enter the base: what the containers keep
                // there is theirs.
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(PRIVATE_BASE)
                    .map_err(|e| io("cannot create", Path::new(PRIVATE_BASE), e))?;
                let mut binds = Vec::new();
                for (sub, mode) in [
                    ("tmp", 0o1777),
                    ("run", 0o755),
                    ("var", 0o755),
                    ("dev/shm", 0o1777),
                ] {
                    let p = dir.join(sub);
                    std::fs::DirBuilder::new()
                        .recursive(true)
                        .mode(0o755)
                        .create(&p)
                        .map_err(|e| io("cannot create", &p, e))?;
                    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode))
                        .map_err(|e| io("cannot set the mode of", &p, e))?;
                    binds.push((cstr(&p)?, cstr(&dir.join("root").join(sub))?));
                }
                // What programs expect of /var: /var/run and /var/lock are
                // the run directory, /var/tmp a temporary one.
                for (link, to) in [("run", "/run"), ("lock", "/run/lock")] {
                    let l = dir.join("var").join(link);
                    if std::fs::symlink_metadata(&l).is_err() {
                        std::os::unix::fs::symlink(to, &l)
                            .map_err(|e| io("cannot create", &l, e))?;
                    }
                }
                for (sub, mode) in [("var/tmp", 0o1777), ("var/lib", 0o755), ("var/log", 0o755)] {
                    let p = dir.join(sub);
                    std::fs::DirBuilder::new()
                        .recursive(true)
                        .create(&p)
                        .map_err(|e| io("cannot create", &p, e))?;
                    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode))
                        .map_err(|e| io("cannot set the mode of", &p, e))?;
                }
                let root = dir.join("root");
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o755)
                    .create(&root)
                    .map_err(|e| io("cannot create", &root, e))?;
                for (file, at) in keep {
                    let plain = at.is_absolute()
                        && at
                            .components()
                            .skip(1)
                            .all(|c| matches!(c, std::path::Component::Normal(_)));
                    if !plain {
                        return Err(Error::InvalidSpec(format!(
                            "{} is not a plain absolute path",
                            at.display()
                        )));
                    }
                    // Only files under a private directory are hidden; a
                    // mount target is made for them there.
                    let Some(private) = ["tmp", "run", "var", "dev/shm"].iter().find_map(|sub| {
                        at.strip_prefix(Path::new("/").join(sub))
                            .ok()
                            .map(|rest| dir.join(sub).join(rest))
                    }) else {
                        continue;
                    };
                    if let Some(parent) = private.parent() {
                        std::fs::DirBuilder::new()
                            .recursive(true)
                            .mode(0o755)
                            .create(parent)
                            .map_err(|e| io("cannot create", parent, e))?;
                    }
                    std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(&private)
                        .map_err(|e| io("cannot create", &private, e))?;
                    let inside = root.join(at.strip_prefix("/").unwrap_or(at));
                    binds.push((cstr(file)?, cstr(&inside)?));
                }
                Ok(Some(RootPlan {
                    mount_point: cstr(&root)?,
                    binds,
                    cwd,
                }))
            }
        }
    }

    /// Where a restore of container `name` makes deleted files again, if
    /// not in the default place: inside a private root, its `/run`.
    pub fn ghosts(&self, name: &ContainerName) -> Option<rrc_ckpt::restore::GhostPlace> {
        match self {
            RootFs::Host => None,
            RootFs::Private => Some(rrc_ckpt::restore::GhostPlace {
                host: Self::private_dir(name).join("run/rrc/ghosts"),
                inside: PathBuf::from("/run/rrc/ghosts"),
            }),
        }
    }
}

impl RootPlan {
    /// In the container's first process, in its own mount namespace (made
    /// a slave of the host's): the host's tree onto the mount point, made
    /// read-only, the private directories over it, then made `/`. Only
    /// system calls.
    pub(crate) fn enter(&self) -> nix::Result<()> {
        let none: Option<&str> = None;
        mount(
            Some("/"),
            self.mount_point.as_c_str(),
            none,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            none,
        )?;
        crate::sys::read_only_tree(&self.mount_point)?;
        for (from, to) in &self.binds {
            mount(
                Some(from.as_c_str()),
                to.as_c_str(),
                none,
                MsFlags::MS_BIND | MsFlags::MS_REC,
                none,
            )?;
        }
        // pivot_root with the same directory twice puts the old root on
        // top of the new one, from where it is detached: no directory for
        // it is needed in the new root.
        nix::unistd::chdir(self.mount_point.as_c_str())?;
        nix::unistd::pivot_root(".", ".")?;
        umount2(".", MntFlags::MNT_DETACH)?;
        nix::unistd::chdir("/")?;
        if let Some(cwd) = &self.cwd {
            let _ = nix::unistd::chdir(cwd.as_c_str());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roots_are_named_as_the_cli_takes_them() {
        assert_eq!("host".parse::<RootFs>(), Ok(RootFs::Host));
        assert_eq!("private".parse::<RootFs>(), Ok(RootFs::Private));
        assert!("/srv/image".parse::<RootFs>().is_err());
    }
}
