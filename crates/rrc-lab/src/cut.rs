//! Partitions: a cut between two hosts drops every packet between their
//! addresses, silently, both ways, as a broken cable or switch would. A
//! host's cuts are one nftables table in its namespace, rebuilt whole from
//! the lab's record at each change.
//!
//! Only the hosts' own traffic is cut (the replication link, the arbiter):
//! a container's frames reach the LAN through rrc's forwarder, not the
//! host's IP stack, so clients keep reaching the service on both sides —
//! the case an arbiter exists for.

use std::io::Write;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};

use crate::plan::Host;
use crate::record::LabRecord;
use crate::{Error, Result};

const TABLE: &str = "rrc_lab_cut";

/// The hosts `host` is cut from.
fn peers(rec: &LabRecord, host: Host) -> Vec<Host> {
    rec.cuts
        .iter()
        .filter_map(|(a, b)| {
            if a == host.name() {
                b.parse().ok()
            } else if b == host.name() {
                a.parse().ok()
            } else {
                None
            }
        })
        .collect()
}

/// Every address of `host`.
fn addrs(rec: &LabRecord, host: Host) -> Vec<Ipv4Addr> {
    let r = rec.host(host);
    std::iter::once(r.lan_addr.addr())
        .chain(r.repl_addr.map(|a| a.addr()))
        .collect()
}

/// The ruleset of `host`: its table removed, then made again if it has
/// cuts.
pub fn ruleset(rec: &LabRecord, host: Host) -> String {
    // Declaring a table before deleting it makes the delete safe when it
    // does not exist.
    let mut s = format!("table inet {TABLE}\ndelete table inet {TABLE}\n");
    let far: Vec<String> = peers(rec, host)
        .into_iter()
        .flat_map(|p| addrs(rec, p))
        .map(|a| a.to_string())
        .collect();
    if far.is_empty() {
        return s;
    }
    let set = far.join(", ");
    s += &format!(
        "table inet {TABLE} {{\n\
         \tchain input {{ type filter hook input priority 0; policy accept; ip saddr {{ {set} }} drop; }}\n\
         \tchain output {{ type filter hook output priority 0; policy accept; ip daddr {{ {set} }} drop; }}\n\
         }}\n"
    );
    s
}

/// Applies the cuts of a host made anew (a new namespace has no table):
/// only if it has some, so that a lab without cuts never needs nftables.
pub fn apply_if_cut(rec: &LabRecord, host: Host) -> Result<()> {
    if peers(rec, host).is_empty() {
        return Ok(());
    }
    apply(rec, host)
}

/// Applies `host`'s cuts as the record has them (nothing on a host that
/// is down: a revive applies them).
pub fn apply(rec: &LabRecord, host: Host) -> Result<()> {
    let r = rec.host(host);
    if r.down {
        return Ok(());
    }
    let rules = ruleset(rec, host);
    let mut child = Command::new("ip")
        .args(["netns", "exec", &r.netns, "nft", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            Error::Invalid(format!(
                "cannot run nft (scripts/setup installs nftables): {e}"
            ))
        })?;
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(rules.as_bytes());
    }
    let out = child
        .wait_with_output()
        .map_err(|e| Error::Invalid(format!("nft on {host}: {e}")))?;
    if !out.status.success() {
        return Err(Error::Invalid(format!(
            "nft on {host} refused the cuts: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::{LabName, LabPlan};
    use crate::record::HostRecord;
    use rrc_container::state::CgroupRecord;

    fn rec(cuts: &[(&str, &str)]) -> LabRecord {
        let plan = LabPlan::new(LabName::try_from("t".to_string()).unwrap(), None).unwrap();
        let hosts = Host::ALL
            .iter()
            .map(|&h| HostRecord {
                name: h.name().into(),
                netns: plan.netns(h),
                lan_addr: plan.lan_addr(h),
                repl_addr: plan.repl_addr(h),
                cgroup: CgroupRecord {
                    version: "2".into(),
                    dirs: Vec::new(),
                },
                down: false,
            })
            .collect();
        LabRecord {
            cgroup: CgroupRecord {
                version: "2".into(),
                dirs: Vec::new(),
            },
            hosts,
            created_unix: 0,
            arbiter: false,
            cuts: cuts
                .iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect(),
            plan,
        }
    }

    #[test]
    fn a_cut_drops_both_ways_on_every_address_of_the_peer() {
        let r = rec(&[("primary", "backup")]);
        let p = ruleset(&r, Host::Primary);
        let b = r.host(Host::Backup);
        let lan = b.lan_addr.addr().to_string();
        let repl = b.repl_addr.unwrap().addr().to_string();
        assert!(
            p.contains(&format!("ip saddr {{ {lan}, {repl} }} drop")),
            "{p}"
        );
        assert!(
            p.contains(&format!("ip daddr {{ {lan}, {repl} }} drop")),
            "{p}"
        );
        // The client is cut from nothing: its table is only removed.
        assert!(!ruleset(&r, Host::Client).contains("chain"));
    }
}
