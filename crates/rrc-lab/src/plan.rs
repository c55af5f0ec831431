//! The lab's names and address plan: pure functions of its name and subnet.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct LabName(String);

impl LabName {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for LabName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(&self.0)
    }
}

impl FromStr for LabName {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        // No '-': it separates lab and host in namespace names.
        let ok = !s.is_empty()
            && s.len() <= 16
            && s.starts_with(|c: char| c.is_ascii_lowercase())
            && s.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
        if ok {
            Ok(LabName(s.into()))
        } else {
            Err(Error::Invalid(format!(
                "invalid lab name {s:?}: use 1 to 16 lowercase letters and digits, starting with a letter"
            )))
        }
    }
}

impl TryFrom<String> for LabName {
    type Error = Error;
    fn try_from(s: String) -> Result<Self> {
        s.parse()
    }
}

impl From<LabName> for String {
    fn from(n: LabName) -> String {
        n.0
    }
}

/// The hosts of a lab: a client, a primary and a backup, and three hosts
/// for the arbiter's members (an etcd cluster, run by `rrc lab up
/// --arbiter`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Host {
    Client,
    Primary,
    Backup,
    Arb1,
    Arb2,
    Arb3,
}

impl Host {
    pub const ALL: [Host; 6] = [
        Host::Client,
        Host::Primary,
        Host::Backup,
        Host::Arb1,
        Host::Arb2,
        Host::Arb3,
    ];
    /// The hosts of the arbiter's members.
    pub const ARBITERS: [Host; 3] = [Host::Arb1, Host::Arb2, Host::Arb3];

    pub fn name(self) -> &'static str {
        match self {
            Host::Client => "client",
            Host::Primary => "primary",
            Host::Backup => "backup",
            Host::Arb1 => "arb1",
            Host::Arb2 => "arb2",
            Host::Arb3 => "arb3",
        }
    }

    /// Last octet (offset in the LAN subnet) of the host's address.
    fn lan_offset(self) -> u32 {
        match self {
            Host::Client => 10,
            Host::Primary => 11,
            Host::Backup => 12,
            Host::Arb1 => 21,
            Host::Arb2 => 22,
            Host::Arb3 => 23,
        }
    }

    /// Whether it has an end of the replication link (primary and backup).
    pub fn has_repl_link(self) -> bool {
        self.repl_offset().is_some()
    }

    /// Offset on the replication link; only primary and backup have one.
    fn repl_offset(self) -> Option<u32> {
        match self {
            Host::Primary => Some(1),
            Host::Backup => Some(2),
            _ => None,
        }
    }
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.name())
    }
}

impl FromStr for Host {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Host::ALL
            .into_iter()
            .find(|h| h.name() == s)
            .ok_or_else(|| {
                Error::Invalid(format!(
                    "no host `{s}` in a lab: use client, primary, backup, arb1, arb2 or arb3"
                ))
            })
    }
}

/// Offset of the service address reserved for the container.
const VIP_OFFSET: u32 = 100;

/// Names and addresses of one lab.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LabPlan {
    pub name: LabName,
    /// The LAN shared by client, primary and backup (and the VIP).
    pub subnet: Ipv4Net,
    /// The point-to-point replication link between primary and backup.
    pub repl_subnet: Ipv4Net,
}

fn fnv(s: &str) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in s.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

impl LabPlan {
    /// A plan for lab `name`; without an explicit subnet each name gets its
    /// own /24 in 10.64.0.0/10, and its replication link one in 172.16.0.0/12.
    pub fn new(name: LabName, subnet: Option<Ipv4Net>) -> Result<LabPlan> {
        let h = fnv(name.as_str());
        let subnet = match subnet {
            Some(s) => {
                if s != s.trunc() {
                    return Err(Error::Invalid(format!(
                        "--subnet {s} has host bits set; did you mean {}?",
                        s.trunc()
                    )));
                }
                if !(8..=25).contains(&s.prefix_len()) {
                    return Err(Error::Invalid(format!(
                        "--subnet {s}: use a prefix between /8 and /25 (the VIP is host .{VIP_OFFSET})"
                    )));
                }
                s
            }
            None => Ipv4Net::new(
                Ipv4Addr::new(10, 64 + (h % 64) as u8, (h >> 8) as u8, 0),
                24,
            )
            .expect("valid"),
        };
        let repl_subnet = Ipv4Net::new(
            Ipv4Addr::new(172, 16 + ((h >> 16) % 16) as u8, (h >> 20) as u8, 0),
            24,
        )
        .expect("valid");
        Ok(LabPlan {
            name,
            subnet,
            repl_subnet,
        })
    }

    fn at(net: Ipv4Net, offset: u32) -> Ipv4Net {
        Ipv4Net::new(
            Ipv4Addr::from(u32::from(net.network()) + offset),
            net.prefix_len(),
        )
        .expect("prefix from a valid net")
    }

    pub fn lan_addr(&self, host: Host) -> Ipv4Net {
        Self::at(self.subnet, host.lan_offset())
    }

    pub fn repl_addr(&self, host: Host) -> Option<Ipv4Net> {
        host.repl_offset().map(|o| Self::at(self.repl_subnet, o))
    }

    /// The service address reserved for the replicated container.
    pub fn vip(&self) -> Ipv4Net {
        Self::at(self.subnet, VIP_OFFSET)
    }

    pub fn netns(&self, host: Host) -> String {
        format!("rrc-{}-{}", self.name, host.name())
    }

    /// The namespace holding the LAN's bridge.
    pub fn switch_netns(&self) -> String {
        format!("rrc-{}-lan", self.name)
    }

    /// The arbiter's members: one on each arbiter host, on etcd's usual
    /// ports.
    pub fn arbiter_members(&self) -> Vec<rrc_arbiter::etcd::Member> {
        Host::ARBITERS
            .iter()
            .map(|&h| {
                let ip = std::net::IpAddr::V4(self.lan_addr(h).addr());
                rrc_arbiter::etcd::Member {
                    name: h.name().into(),
                    client: (ip, rrc_arbiter::etcd::DEFAULT_PORT).into(),
                    peer: (ip, rrc_arbiter::etcd::DEFAULT_PORT + 1).into(),
                }
            })
            .collect()
    }

    /// The arbiter's endpoints, as `--arbiter` takes them.
    pub fn arbiter_endpoints(&self) -> String {
        rrc_arbiter::etcd::endpoints(&self.arbiter_members())
    }

    /// Prefix shared by every namespace of this lab.
    pub fn netns_prefix(&self) -> String {
        format!("rrc-{}-", self.name)
    }
}

/// Interface names, the same in every lab (each lives in its own namespace).
pub const LAN_IF: &str = "eth0";
pub const REPL_IF: &str = "repl0";
pub const BRIDGE: &str = "br0";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_addresses() {
        let p = LabPlan::new("t1".parse().unwrap(), Some("10.9.8.0/24".parse().unwrap())).unwrap();
        assert_eq!(p.lan_addr(Host::Client).to_string(), "10.9.8.10/24");
        assert_eq!(p.lan_addr(Host::Backup).to_string(), "10.9.8.12/24");
        assert_eq!(p.vip().to_string(), "10.9.8.100/24");
        assert!(p.repl_addr(Host::Client).is_none());
        assert_eq!(p.repl_addr(Host::Primary).unwrap().prefix_len(), 24);
        assert_eq!(p.netns(Host::Primary), "rrc-t1-primary");
    }

    #[test]
    fn default_subnets_differ_by_name() {
        let a = LabPlan::new("a".parse().unwrap(), None).unwrap();
        let b = LabPlan::new("b".parse().unwrap(), None).unwrap();
        assert_ne!(a.subnet, b.subnet);
        assert_eq!(a, LabPlan::new("a".parse().unwrap(), None).unwrap());
    }

    #[test]
    fn rejects_bad_input() {
        assert!("A".parse::<LabName>().is_err());
        assert!("a-b".parse::<LabName>().is_err());
        assert!("x".repeat(17).parse::<LabName>().is_err());
        assert!("dmz".parse::<Host>().is_err());
        let n: LabName = "a".parse().unwrap();
        assert!(LabPlan::new(n.clone(), Some("10.0.0.1/24".parse().unwrap())).is_err());
        assert!(LabPlan::new(n, Some("10.0.0.0/26".parse().unwrap())).is_err());
    }
}
