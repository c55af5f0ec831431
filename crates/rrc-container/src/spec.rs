//! What a container is made of, checked before anything is created: a bad
//! name, address or command is reported while nothing exists to clean up.

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use ipnet::Ipv4Net;
use rrc_net::MacAddr;
use rrc_net::netconf::InterfaceAddr;
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// A container name: also its hostname and part of its cgroup's name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ContainerName(String);

impl ContainerName {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ContainerName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(&self.0)
    }
}

impl FromStr for ContainerName {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let ok_first = s.chars().next().is_some_and(|c| c.is_ascii_alphanumeric());
        let ok_rest = s
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if !ok_first || !ok_rest || s.len() > 63 {
            return Err(Error::InvalidSpec(format!(
                "invalid container name {s:?}: use 1 to 63 letters, digits, '-', '_' or '.', starting with a letter or digit"
            )));
        }
        Ok(ContainerName(s.to_string()))
    }
}

impl TryFrom<String> for ContainerName {
    type Error = Error;
    fn try_from(s: String) -> Result<Self> {
        s.parse()
    }
}

impl From<ContainerName> for String {
    fn from(n: ContainerName) -> String {
        n.0
    }
}

/// The container's place on the LAN, fully resolved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetSpec {
    /// The service address and its prefix, configured on the container's
    /// interface.
    pub addr: Ipv4Net,
    pub mac: MacAddr,
    /// The host interface frames are forwarded to and from.
    pub uplink: String,
    pub gateway: Option<Ipv4Addr>,
}

/// The network options as the user gave them.
#[derive(Debug, Clone, Default)]
pub struct NetRequest {
    /// `ADDR` or `ADDR/PREFIX`.
    pub addr: String,
    pub mac: Option<MacAddr>,
    pub uplink: Option<String>,
    pub gateway: Option<Ipv4Addr>,
}

impl NetRequest {
    /// Resolves the request against the interfaces of the host this
    /// process runs on (see [`NetRequest::resolve`]).
    pub fn resolve_here(&self, name: &ContainerName) -> Result<NetSpec> {
        let host_addrs = rrc_net::netconf::ipv4_addresses()?;
        self.resolve(name, &host_addrs, |i| {
            nix::net::if_::if_nametoindex(i).is_ok()
        })
    }

    /// Resolves the request against this host's interfaces: picks the uplink
    /// whose subnet holds the address (or checks the one given), and takes
    /// the prefix from it when the user gave a bare address.
    pub fn resolve(
        &self,
        name: &ContainerName,
        host: &[InterfaceAddr],
        interface_exists: impl Fn(&str) -> bool,
    ) -> Result<NetSpec> {
        let bad = |m: String| Err(Error::InvalidSpec(m));
        let (ip, prefix) = match self.addr.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (self.addr.as_str(), None),
        };
        let Ok(ip) = ip.parse::<Ipv4Addr>() else {
            return bad(format!(
                "`{}` is not an IPv4 address (expected ADDR/PREFIX such as 10.0.0.100/24)",
                self.addr
            ));
        };
        let prefix = match prefix.map(str::parse::<u8>) {
            Some(Ok(p)) if p <= 32 => Some(p),
            Some(_) => return bad(format!("`{}` has an invalid prefix length", self.addr)),
            None => None,
        };
        if ip.is_unspecified() || ip.is_multicast() || ip.is_broadcast() || ip.is_loopback() {
            return bad(format!("{ip} cannot be a container's address"));
        }
        if let Some(own) = host.iter().find(|a| a.net.addr() == ip) {
            return bad(format!(
                "{ip} is this host's own address on {}; give the container an unused address",
                own.ifname
            ));
        }
        let subnets_of = |ifname: &str| -> Vec<Ipv4Net> {
            host.iter()
                .filter(|a| a.ifname == ifname)
                .map(|a| a.net.trunc())
                .collect()
        };
        let describe = |nets: &[&InterfaceAddr]| {
            nets.iter()
                .map(|a| format!("{} on {}", a.net.trunc(), a.ifname))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let (uplink, subnet) = match &self.uplink {
            Some(up) => {
                if !interface_exists(up) {
                    return bad(format!(
                        "no interface named `{up}` on this host (`ip link` lists them)"
                    ));
                }
                let nets = subnets_of(up);
                match nets.iter().find(|n| n.contains(&ip)) {
                    Some(n) => (up.clone(), Some(*n)),
                    // An uplink without IPv4 addresses is a plain bridge
                    // port: nothing to check the address against.
                    None if nets.is_empty() => (up.clone(), None),
                    None => {
                        let list: Vec<String> = nets.iter().map(|n| n.to_string()).collect();
                        return bad(format!(
                            "address {ip} is outside the subnet of uplink {up} ({}); pick an address inside it",
                            list.join(", ")
                        ));
                    }
                }
            }
            None => {
                let candidates: Vec<&InterfaceAddr> = host
                    .iter()
                    .filter(|a| a.net.trunc().contains(&ip) && a.ifname != "lo")
                    .collect();
                match candidates.as_slice() {
                    [one] => (one.ifname.clone(), Some(one.net.trunc())),
                    [] => {
                        let all: Vec<&InterfaceAddr> =
                            host.iter().filter(|a| a.ifname != "lo").collect();
                        return bad(format!(
                            "address {ip} is outside every subnet of this host ({}); pick an address inside one, or name the interface with --uplink",
                            if all.is_empty() {
                                "it has none".to_string()
                            } else {
                                describe(&all)
                            }
                        ));
                    }
                    several => {
                        return bad(format!(
                            "address {ip} is in the subnets of several interfaces ({}); choose one with --uplink",
                            describe(several)
                        ));
                    }
                }
            }
        };
        let prefix = match (prefix, subnet) {
            (Some(p), _) => p,
            (None, Some(s)) => s.prefix_len(),
            (None, None) => {
                return bad(format!(
                    "give the prefix length with the address (e.g. {ip}/24): uplink {uplink} has no IPv4 subnet to take it from"
                ));
            }
        };
        let addr = Ipv4Net::new(ip, prefix).expect("prefix checked above");
        if prefix < 31 && (ip == addr.network() || ip == addr.broadcast()) {
            return bad(format!(
                "{ip} is the network or broadcast address of {}",
                addr.trunc()
            ));
        }
        if let Some(gw) = self.gateway
            && !addr.contains(&gw)
        {
            return bad(format!(
                "gateway {gw} is outside the container's subnet {}",
                addr.trunc()
            ));
        }
        let mac = self
            .mac
            .unwrap_or_else(|| MacAddr::derived_from(name.as_str()));
        if mac.is_multicast() || mac.is_zero() {
            return bad(format!("{mac} is not a unicast MAC address"));
        }
        Ok(NetSpec {
            addr,
            mac,
            uplink,
            gateway: self.gateway,
        })
    }
}

/// Everything needed to start a container.
#[derive(Debug, Clone)]
pub struct ContainerSpec {
    pub name: ContainerName,
    /// argv as given; `argv[0]` is what the program sees.
    pub argv: Vec<OsString>,
    /// The program file `argv[0]` resolved to.
    pub program: PathBuf,
    pub net: Option<NetSpec>,
    /// Variables set in the program's environment, over rrc's own.
    pub env: Vec<(OsString, OsString)>,
    /// What the container sees as `/`.
    pub root: crate::rootfs::RootFs,
    /// Host directories bound into a private root at their own paths,
    /// writable (absolute, canonical).
    pub share: Vec<PathBuf>,
    /// See [`crate::state::ContainerRecord::aio_idle`].
    pub aio_idle: bool,
    /// The program may make user namespaces, and in them what a sandbox
    /// makes (see [`crate::confine::seccomp_filters`]).
    pub user_namespaces: bool,
}

/// Finds `cmd` the way `execvp` will, so a typo is reported before a
/// container is built around it.
pub fn resolve_command(cmd: &OsStr, path_env: Option<&OsStr>) -> Result<PathBuf> {
    let shown = cmd.to_string_lossy().into_owned();
    if cmd.is_empty() {
        return Err(Error::InvalidSpec(
            "no command given: put it after `--`".into(),
        ));
    }
    let check = |p: &Path| -> Option<Result<PathBuf>> {
        let meta = std::fs::metadata(p).ok()?;
        if meta.is_file() && meta.permissions().mode() & 0o111 != 0 {
            Some(Ok(p.to_path_buf()))
        } else {
            Some(Err(Error::NotExecutable(p.display().to_string())))
        }
    };
    if cmd.as_encoded_bytes().contains(&b'/') {
        return check(Path::new(cmd)).unwrap_or(Err(Error::CommandNotFound(shown)));
    }
    let path = path_env.unwrap_or(OsStr::new("/usr/local/bin:/usr/bin:/bin"));
    let mut not_exec = None;
    for dir in std::env::split_paths(path) {
        match check(&dir.join(cmd)) {
            Some(Ok(p)) => return Ok(p),
            Some(Err(e)) => not_exec = not_exec.or(Some(e)),
            None => {}
        }
    }
    Err(not_exec.unwrap_or(Error::CommandNotFound(shown)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host() -> Vec<InterfaceAddr> {
        vec![
            InterfaceAddr {
                ifname: "lo".into(),
                net: "127.0.0.1/8".parse().unwrap(),
            },
            InterfaceAddr {
                ifname: "eth0".into(),
                net: "10.7.0.11/24".parse().unwrap(),
            },
            InterfaceAddr {
                ifname: "repl0".into(),
                net: "172.20.0.1/24".parse().unwrap(),
            },
        ]
    }

    fn req(addr: &str, uplink: Option<&str>) -> NetRequest {
        NetRequest {
            addr: addr.into(),
            uplink: uplink.map(String::from),
            ..Default::default()
        }
    }

    fn name() -> ContainerName {
        "redis".parse().unwrap()
    }

    #[test]
    fn picks_uplink_by_subnet_and_inherits_prefix() {
        let s = req("10.7.0.100", None)
            .resolve(&name(), &host(), |_| true)
            .unwrap();
        assert_eq!(s.uplink, "eth0");
        assert_eq!(s.addr, "10.7.0.100/24".parse().unwrap());
        assert_eq!(s.mac, MacAddr::derived_from("redis"));
    }

    #[test]
    fn rejects_address_outside_every_subnet() {
        let e = req("10.9.0.100/24", None)
            .resolve(&name(), &host(), |_| true)
            .unwrap_err()
            .to_string();
        assert!(e.contains("outside every subnet"), "{e}");
        assert!(e.contains("10.7.0.0/24 on eth0"), "{e}");
    }

    #[test]
    fn rejects_address_outside_given_uplink() {
        let e = req("172.20.0.9/24", Some("eth0"))
            .resolve(&name(), &host(), |_| true)
            .unwrap_err()
            .to_string();
        assert!(e.contains("outside the subnet of uplink eth0"), "{e}");
    }

    #[test]
    fn rejects_unknown_uplink_own_address_and_garbage() {
        let h = host();
        let e = |r: NetRequest| {
            r.resolve(&name(), &h, |i| i != "nope")
                .unwrap_err()
                .to_string()
        };
        assert!(e(req("10.7.0.100/24", Some("nope"))).contains("no interface named `nope`"));
        assert!(e(req("10.7.0.11/24", None)).contains("this host's own address"));
        assert!(e(req("10.7.0.300/24", None)).contains("not an IPv4 address"));
        assert!(e(req("10.7.0.100/40", None)).contains("invalid prefix"));
        assert!(e(req("10.7.0.255/24", None)).contains("broadcast"));
    }

    #[test]
    fn names() {
        assert!("redis-1.a_b".parse::<ContainerName>().is_ok());
        assert!("".parse::<ContainerName>().is_err());
        assert!("-x".parse::<ContainerName>().is_err());
        assert!("a/b".parse::<ContainerName>().is_err());
        assert!("x".repeat(64).parse::<ContainerName>().is_err());
    }

    #[test]
    fn commands() {
        assert!(resolve_command(OsStr::new("sh"), None).is_ok());
        assert!(matches!(
            resolve_command(OsStr::new("no-such-program-xyz"), None),
            Err(Error::CommandNotFound(_))
        ));
        let data = std::env::temp_dir().join(format!("rrc-spec-test-{}", std::process::id()));
        std::fs::write(&data, "x").unwrap();
        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            resolve_command(data.as_os_str(), None),
            Err(Error::NotExecutable(_))
        ));
        std::fs::remove_file(&data).unwrap();
        assert!(matches!(
            resolve_command(OsStr::new("/nonexistent/x"), None),
            Err(Error::CommandNotFound(_))
        ));
    }
}
