//! What a container sees as `/`.
//!
//! - [`RootFs::Host`]: the host's file system, as rrc sees it (the
//!   container has a mount namespace of its own, but the same files).
//! - [`RootFs::Private`] (what `rrc run` and `rrc primary` give by
//!   default): a read-only view of the host's file system, with `/tmp`,
//!   `/run`, `/var` and `/dev/shm` of the container's own, kept on the host
//!   in [`PRIVATE_BASE`]`/NAME` (so that a restore on this machine finds
//!   what the program wrote there), or `PRIVATE_BASE/labs/LAB/NAME` on the
//!   hosts of lab LAB (which share the machine's disk, as a pair's two
//!   hosts share the files its program uses, and are kept apart from other
//!   labs').
//!
//! A private root goes with its container unless an image of the container
//! may need it: once a checkpoint of it began, or if it was restored from
//! one, it stays for the next restore (a lab's go when the lab does).
//!
//! The container's output file (rrc's log of a detached container, on the
//! host) is bound into a private root at its own path, so that the
//! program's standard output means the same file after a restore; so are,
//! writable, the host directories a replay's program reaches by path (its
//! log, its capture, the takeover socket).
//!
//! The container's first process enters its root ([`RootPlan::enter`])
//! before it mounts `/proc` and `/sys`: the tree is bound onto a mount
//! point, made what it should be, and `pivot_root` puts it at `/`, the old
//! root detached. A restore enters the same root before the processes are
//! made again, so that every path they had open means the same file.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags, mount, umount2};
use serde::{Deserialize, Serialize};

use crate::spec::ContainerName;
use crate::{Error, Result};

/// Where the private `/tmp`, `/run` and `/var` of containers with
/// [`RootFs::Private`] live, one directory per container name.
pub const PRIVATE_BASE: &str = "/var/lib/rrc/roots";

/// Set by `rrc lab exec` to the lab whose host a process runs on: the
/// lab's containers keep their private roots apart from the machine's.
pub const LAB_ENV: &str = "RRC_LAB";

/// Where the private roots of lab `lab`'s containers live.
pub fn lab_roots(lab: &str) -> PathBuf {
    Path::new(PRIVATE_BASE).join("labs").join(lab)
}

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

/// A host path bound over a path of the new root's tree.
#[derive(Debug, Clone)]
struct Bind {
    from: CString,
    to: CString,
    read_only: bool,
}

impl Bind {
    fn writable(from: CString, to: CString) -> Bind {
        Bind {
            from,
            to,
            read_only: false,
        }
    }
}

/// A root ready to enter: every path prepared before the fork (the child
/// only makes system calls).
#[derive(Debug, Clone)]
pub struct RootPlan {
    /// Where the host's tree is bound (read-only), then made `/`.
    mount_point: CString,
    /// Bound over paths of that tree, in order: the private directories,
    /// the files kept and the directories shared (writable), then rrc's
    /// own programs where the private directories would hide them
    /// (read-only).
    binds: Vec<Bind>,
    /// Where the program's working directory was: kept if the new root
    /// has it.
    cwd: Option<CString>,
    /// Whether the private directory was made by this plan (not kept from
    /// an earlier container of the name, whose image may need it).
    fresh: bool,
}

fn io_error(what: &str, p: &Path, e: std::io::Error) -> Error {
    Error::InvalidSpec(format!("{what} {}: {e}", p.display()))
}

/// `p` as a directory: made if missing (then with `mode`, or 0755), given
/// `mode` if there is one; refused if it is a symbolic link or not a
/// directory. The private directories are the container's to change, and
/// rrc, as root, must not follow a link it left there to a host path.
fn ensure_dir(p: &Path, mode: Option<u32>) -> Result<()> {
    match std::fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() && mode.is_none() => return Ok(()),
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            return Err(Error::InvalidSpec(format!(
                "{} is not a directory (a symbolic link?): refused",
                p.display()
            )));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::DirBuilder::new()
                .mode(0o700)
                .create(p)
                .map_err(|e| io_error("cannot create", p, e))?;
        }
        Err(e) => return Err(io_error("cannot read", p, e)),
    }
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode.unwrap_or(0o755)))
        .map_err(|e| io_error("cannot set the mode of", p, e))
}

/// [`ensure_dir`] for each directory from `base` down to `base/rest`
/// (the last with `mode`, those on the way as they are or 0755 if new);
/// returns the last.
fn ensure_beneath(base: &Path, rest: &Path, mode: Option<u32>) -> Result<PathBuf> {
    let mut p = base.to_path_buf();
    let parts: Vec<_> = rest.components().collect();
    for (i, c) in parts.iter().enumerate() {
        let std::path::Component::Normal(c) = c else {
            return Err(Error::InvalidSpec(format!(
                "{} is not a plain relative path",
                rest.display()
            )));
        };
        p.push(c);
        ensure_dir(&p, if i + 1 == parts.len() { mode } else { None })?;
    }
    Ok(p)
}

/// The directories a private root has of its own (relative to `/`).
const PRIVATE_DIRS: [&str; 4] = ["tmp", "run", "var", "dev/shm"];

fn is_private(p: &Path) -> bool {
    PRIVATE_DIRS
        .iter()
        .any(|sub| p.starts_with(Path::new("/").join(sub)))
}

fn is_plain_absolute(p: &Path) -> bool {
    p.is_absolute()
        && p.components()
            .skip(1)
            .all(|c| matches!(c, std::path::Component::Normal(_)))
}

fn cstr(p: &Path) -> Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| Error::InvalidSpec(format!("{} contains a NUL byte", p.display())))
}

impl RootFs {
    /// The private directory of container `name` on this host: in its
    /// lab's directory on a lab's host ([`LAB_ENV`]), else the machine's.
    pub fn private_dir(name: &ContainerName) -> Result<PathBuf> {
        let base = match std::env::var_os(LAB_ENV) {
            None => PathBuf::from(PRIVATE_BASE),
            Some(lab) => {
                let plain = Path::new(&lab)
                    .components()
                    .map(|c| matches!(c, std::path::Component::Normal(_)))
                    .eq([true]);
                if !plain {
                    return Err(Error::InvalidSpec(format!(
                        "{LAB_ENV}={}: not a lab's name",
                        Path::new(&lab).display()
                    )));
                }
                lab_roots(&lab.to_string_lossy())
            }
        };
        Ok(base.join(name.as_str()))
    }

    /// Removes what container `name` kept in its private root, if it has
    /// one. The directory may hold links the container made: they are
    /// removed, never followed.
    pub fn remove(&self, name: &ContainerName) -> Result<()> {
        if *self != RootFs::Private {
            return Ok(());
        }
        let dir = Self::private_dir(name)?;
        match std::fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(io_error("cannot remove", &dir, e))
            }
            _ => Ok(()),
        }
    }

    /// Whether the container would not see host path `p` (a private
    /// directory hides it, and no directory of `share` brings it in).
    pub fn hides(&self, p: &Path, share: &[PathBuf]) -> bool {
        *self == RootFs::Private && is_private(p) && !share.iter().any(|d| p.starts_with(d))
    }

    /// Prepares the root of container `name` (creating its private
    /// directories, if it has any), with the host files of `keep` (rrc's
    /// own: the container's output) bound at paths in it (host file, path
    /// inside), and the host directories `share` (rrc's: a replay's log,
    /// capture and takeover socket) bound writable at their own paths;
    /// `None` for the host's own root. A path inside that is not plain
    /// (`..`, not absolute) is refused: it may come from an image.
    pub fn plan(
        &self,
        name: &ContainerName,
        keep: &[(&Path, &Path)],
        share: &[&Path],
    ) -> Result<Option<RootPlan>> {
        match self {
            RootFs::Host => Ok(None),
            RootFs::Private => {
                let cwd = std::env::current_dir().ok().map(|d| cstr(&d)).transpose()?;
                let dir = Self::private_dir(name)?;
                // Only root may enter the base: what the containers keep
                // there is theirs.
                let base = dir.parent().unwrap_or(Path::new(PRIVATE_BASE));
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(base)
                    .map_err(|e| io_error("cannot create", base, e))?;
                let fresh = !dir.exists();
                ensure_dir(&dir, Some(0o700))?;
                let mut binds = Vec::new();
                for (sub, mode) in PRIVATE_DIRS.into_iter().zip([0o1777, 0o755, 0o755, 0o1777]) {
                    let p = ensure_beneath(&dir, Path::new(sub), Some(mode))?;
                    binds.push(Bind::writable(
                        cstr(&p)?,
                        cstr(&dir.join("root").join(sub))?,
                    ));
                }
                // What programs expect of /var: /var/run and /var/lock are
                // the run directory, /var/tmp a temporary one.
                for (link, to) in [("run", "/run"), ("lock", "/run/lock")] {
                    let l = dir.join("var").join(link);
                    if std::fs::symlink_metadata(&l).is_err() {
                        std::os::unix::fs::symlink(to, &l)
                            .map_err(|e| io_error("cannot create", &l, e))?;
                    }
                }
                for (sub, mode) in [("var/tmp", 0o1777), ("var/lib", 0o755), ("var/log", 0o755)] {
                    ensure_beneath(&dir, Path::new(sub), Some(mode))?;
                }
                let root = ensure_beneath(&dir, Path::new("root"), Some(0o755))?;
                for (file, at) in keep {
                    if !is_plain_absolute(at) {
                        return Err(Error::InvalidSpec(format!(
                            "{} is not a plain absolute path",
                            at.display()
                        )));
                    }
                    // Only files under a private directory are hidden; a
                    // mount target is made for them there.
                    if !is_private(at) {
                        continue;
                    }
                    let under = at.strip_prefix("/").unwrap_or(at);
                    let parent = under.parent().unwrap_or(Path::new(""));
                    ensure_beneath(&dir, parent, None)?;
                    let target = dir.join(under);
                    std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .custom_flags(libc::O_NOFOLLOW)
                        .open(&target)
                        .map_err(|e| io_error("cannot create", &target, e))?;
                    binds.push(Bind::writable(cstr(file)?, cstr(&root.join(under))?));
                }
                for d in share {
                    if !is_plain_absolute(d) {
                        return Err(Error::InvalidSpec(format!(
                            "{} is not a plain absolute path",
                            d.display()
                        )));
                    }
                    if !d.is_dir() {
                        return Err(Error::InvalidSpec(format!(
                            "{} is shared into the container's root but is not a directory on this host \
                             (a failover needs the directories a container shares on both hosts)",
                            d.display()
                        )));
                    }
                    let under = d.strip_prefix("/").unwrap_or(d);
                    if is_private(d) {
                        ensure_beneath(&dir, under, None)?;
                    }
                    binds.push(Bind::writable(cstr(d)?, cstr(&root.join(under))?));
                }
                // rrc's directory (and librrc's, if set apart): a recorded
                // program preloads librrc from there, and its restore maps
                // it again by that path. Read-only: the container must not
                // change what rrc runs.
                let ours = std::env::current_exe()
                    .ok()
                    .and_then(|e| e.parent().map(Path::to_path_buf))
                    .into_iter()
                    .chain(
                        std::env::var_os("RRC_LIBRRC")
                            .and_then(|p| Path::new(&p).parent().map(Path::to_path_buf)),
                    );
                for d in ours {
                    let Ok(d) = d.canonicalize() else { continue };
                    let from = cstr(&d)?;
                    if !is_private(&d) || binds.iter().any(|b| b.read_only && b.from == from) {
                        continue;
                    }
                    let under = d.strip_prefix("/").unwrap_or(&d);
                    ensure_beneath(&dir, under, None)?;
                    binds.push(Bind {
                        from,
                        to: cstr(&root.join(under))?,
                        read_only: true,
                    });
                }
                Ok(Some(RootPlan {
                    mount_point: cstr(&root)?,
                    binds,
                    cwd,
                    fresh,
                }))
            }
        }
    }

    /// Where a restore of container `name` makes deleted files again, if
    /// not in the default place: inside a private root, its `/run`.
    /// The directory is made here, refusing a symbolic link the
    /// container may have left on the way.
    pub fn ghosts(&self, name: &ContainerName) -> Result<Option<rrc_ckpt::restore::GhostPlace>> {
        match self {
            RootFs::Host => Ok(None),
            RootFs::Private => Ok(Some(rrc_ckpt::restore::GhostPlace {
                host: ensure_beneath(
                    &Self::private_dir(name)?,
                    Path::new("run/rrc/ghosts"),
                    Some(0o700),
                )?,
                inside: PathBuf::from("/run/rrc/ghosts"),
            })),
        }
    }
}

impl RootPlan {
    /// Whether the private directory is new: nothing kept before needs it.
    pub fn fresh(&self) -> bool {
        self.fresh
    }

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
        for b in &self.binds {
            mount(
                Some(b.from.as_c_str()),
                b.to.as_c_str(),
                none,
                MsFlags::MS_BIND | MsFlags::MS_REC,
                none,
            )?;
            if b.read_only {
                crate::sys::read_only_tree(&b.to)?;
            }
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
