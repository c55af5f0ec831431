//! Running iproute2's `ip`, the reference tool for namespace plumbing.

use std::process::Command;

use crate::{Error, Result};

/// Runs `ip ARGS`, turning a failure into an error that quotes `ip`.
pub fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip").args(args).output().map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            Error::NoIpCommand
        } else {
            Error::Ip {
                args: args.join(" "),
                stderr: e.to_string(),
            }
        }
    })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(Error::Ip {
            args: args.join(" "),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// `ip -n NS ARGS`.
pub fn ip_in(ns: &str, args: &[&str]) -> Result<()> {
    let mut all = vec!["-n", ns];
    all.extend_from_slice(args);
    ip(&all)
}

/// Whether interface `ifname` exists in namespace `ns`.
pub fn link_exists(ns: &str, ifname: &str) -> bool {
    Command::new("ip")
        .args(["-n", ns, "link", "show", "dev", ifname])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}
