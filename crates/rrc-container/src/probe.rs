//! The kernel features a container needs, checked before anything is
//! created so that a missing one is a clear one-line error, not a half-built
//! container.

use std::path::Path;

use crate::{Error, Result};

/// Fails unless the effective user is root.
pub fn require_root(what: &'static str) -> Result<()> {
    if nix::unistd::geteuid().is_root() {
        Ok(())
    } else {
        Err(Error::NotRoot(what))
    }
}

/// The namespace kinds a container gets, with their kernel config names.
const NAMESPACES: [(&str, &str, &str); 5] = [
    ("pid", "pid", "PID"),
    ("mount", "mnt", "MNT"),
    ("uts", "uts", "UTS"),
    ("ipc", "ipc", "IPC"),
    ("network", "net", "NET"),
];

/// A kernel built without a namespace kind has no /proc/self/ns entry for it.
pub fn require_namespaces() -> Result<()> {
    namespaces_in(Path::new("/proc/self/ns"))
}

fn namespaces_in(dir: &Path) -> Result<()> {
    for (kind, file, config) in NAMESPACES {
        let path = dir.join(file);
        if !path.exists() {
            return Err(Error::NoNamespace {
                kind,
                path: path.display().to_string(),
                config,
            });
        }
    }
    Ok(())
}

pub fn require_cgroups() -> Result<rrc_cgroup::Layout> {
    Ok(rrc_cgroup::Layout::detect()?)
}

pub fn require_tap() -> Result<()> {
    Ok(rrc_net::tap::check_available()?)
}

/// Everything `rrc run` needs; returns the cgroup layout to use.
pub fn require_container_support(with_network: bool) -> Result<rrc_cgroup::Layout> {
    require_root("rrc run")?;
    require_namespaces()?;
    let layout = require_cgroups()?;
    if with_network {
        require_tap()?;
    }
    Ok(layout)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_the_missing_namespace_kind() {
        assert!(require_namespaces().is_ok());
        let dir = std::env::temp_dir().join(format!("rrc-ns-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for f in ["mnt", "uts", "ipc", "net"] {
            std::fs::write(dir.join(f), "").unwrap();
        }
        let e = namespaces_in(&dir).unwrap_err().to_string();
        assert!(
            e.contains("no pid namespaces") && e.contains("CONFIG_PID_NS"),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
