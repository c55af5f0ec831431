//! A container network namespace's own configuration (addresses, routes,
//! per-namespace sysctls), captured at checkpoint and applied again to the
//! restored container's new namespace.

use std::fs;
use std::net::Ipv4Addr;
use std::process::Command;

use ipnet::Ipv4Net;
use nix::unistd::Pid;
use rrc_net::NetNs;
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetnsConfig {
    /// IPv4 addresses by interface (loopback's own excepted).
    pub addrs: Vec<(String, Ipv4Net)>,
    pub routes: Vec<Route>,
    /// `net.*` sysctls (as paths under /proc/sys) and their values.
    pub sysctls: Vec<(String, String)>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    pub dest: Ipv4Net,
    pub gateway: Option<Ipv4Addr>,
    pub ifname: String,
    pub metric: u32,
}

/// Per-namespace sysctls that change how the container's TCP/IP behaves.
const SYSCTLS: &[&str] = &[
    "net/core/somaxconn",
    "net/ipv4/tcp_timestamps",
    "net/ipv4/tcp_sack",
    "net/ipv4/tcp_window_scaling",
    "net/ipv4/tcp_keepalive_time",
    "net/ipv4/tcp_keepalive_intvl",
    "net/ipv4/tcp_keepalive_probes",
    "net/ipv4/tcp_fin_timeout",
    "net/ipv4/tcp_syncookies",
    "net/ipv4/tcp_max_syn_backlog",
    "net/ipv4/tcp_rmem",
    "net/ipv4/tcp_wmem",
    "net/ipv4/tcp_congestion_control",
    "net/ipv4/ip_local_port_range",
    "net/ipv4/ip_forward",
    "net/ipv4/ping_group_range",
];

fn net_err(what: &str) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Setup {
        stage: "network namespace state",
        source: std::io::Error::new(source.kind(), format!("{what}: {source}")),
    }
}

/// Parses /proc/net/route (hex, little-endian addresses).
fn parse_routes(text: &str) -> Vec<Route> {
    let hex_ip = |s: &str| {
        u32::from_str_radix(s, 16)
            .ok()
            .map(|v| Ipv4Addr::from(u32::from_be(v.to_be()).swap_bytes()))
    };
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let dest = hex_ip(f.get(1)?)?;
            let gw = hex_ip(f.get(2)?)?;
            let flags = u32::from_str_radix(f.get(3)?, 16).ok()?;
            let metric = f.get(6)?.parse().ok()?;
            let mask = hex_ip(f.get(7)?)?;
            let prefix = u32::from(mask).count_ones() as u8;
            const RTF_GATEWAY: u32 = 0x2;
            Some(Route {
                dest: Ipv4Net::new(dest, prefix).ok()?,
                gateway: (flags & RTF_GATEWAY != 0).then_some(gw),
                ifname: f[0].to_string(),
                metric,
            })
        })
        .collect()
}

/// Reads the configuration of the network namespace `init` is in.
pub fn capture(init: Pid) -> Result<NetnsConfig> {
    NetNs::of_pid(init.as_raw())?.run(|| -> Result<NetnsConfig> {
        let addrs = rrc_net::netconf::ipv4_addresses()?
            .into_iter()
            .filter(|a| a.ifname != "lo")
            .map(|a| (a.ifname, a.net))
            .collect();
        let routes = parse_routes(
            &fs::read_to_string("/proc/thread-self/net/route").map_err(net_err("routes"))?,
        );
        let sysctls = SYSCTLS
            .iter()
            .filter_map(|k| {
                fs::read_to_string(format!("/proc/sys/{k}"))
                    .ok()
                    .map(|v| (k.to_string(), v.trim().to_string()))
            })
            .collect();
        Ok(NetnsConfig {
            addrs,
            routes,
            sysctls,
        })
    })?
}

/// Whether a restore may write sysctl `key` (a path under /proc/sys): one
/// of those a checkpoint saves, never what an image makes up.
fn settable(key: &str) -> bool {
    SYSCTLS.contains(&key)
}

/// Applies `cfg` to the network namespace `init` is in, adding what its
/// interface setup did not already give it.
pub fn apply(init: Pid, cfg: &NetnsConfig) -> Result<()> {
    NetNs::of_pid(init.as_raw())?.run(|| -> Result<()> {
        for (k, v) in &cfg.sysctls {
            // The image names them: only those a checkpoint saves, all of
            // the container's own network namespace, are ever written.
            if !settable(k) {
                tracing::warn!(
                    sysctl = k.as_str(),
                    "the image names a sysctl a container's network state does not hold: not applied"
                );
                continue;
            }
            if let Err(e) = fs::write(format!("/proc/sys/{k}"), v) {
                tracing::warn!(sysctl = k.as_str(), error = %e, "sysctl not restored");
            }
        }
        let have = rrc_net::netconf::ipv4_addresses()?;
        for (ifname, net) in &cfg.addrs {
            if have.iter().any(|a| &a.ifname == ifname && a.net == *net) {
                continue;
            }
            // A process forked from this thread shares its namespace.
            ip(&["addr", "add", &net.to_string(), "dev", ifname])?;
        }
        let routes = parse_routes(
            &fs::read_to_string("/proc/thread-self/net/route").map_err(net_err("routes"))?,
        );
        for r in &cfg.routes {
            if routes
                .iter()
                .any(|x| x.dest == r.dest && x.gateway == r.gateway)
            {
                continue;
            }
            let dest = if r.dest.prefix_len() == 0 {
                "default".to_string()
            } else {
                r.dest.to_string()
            };
            let mut args = vec!["route", "add", dest.as_str()];
            let gw;
            if let Some(g) = r.gateway {
                gw = g.to_string();
                args.extend(["via", gw.as_str()]);
            }
            let metric = r.metric.to_string();
            args.extend(["dev", r.ifname.as_str(), "metric", metric.as_str()]);
            ip(&args)?;
        }
        Ok(())
    })?
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(net_err("run ip"))?;
    if !out.status.success() {
        return Err(net_err("ip")(std::io::Error::other(format!(
            "`ip {}`: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_saved_network_sysctls_are_settable() {
        assert!(settable("net/core/somaxconn"));
        for k in [
            "../../../tmp/x",
            "kernel/hostname",
            "net/ipv4/../../kernel/core_pattern",
            "",
            "net/core/somaxconn/..",
        ] {
            assert!(!settable(k), "{k}");
        }
    }

    #[test]
    fn routes_parse() {
        let text = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
eth0\t00000000\t0100000A\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
eth0\t0000000A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n";
        let r = parse_routes(text);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].dest, "0.0.0.0/0".parse().unwrap());
        assert_eq!(r[0].gateway, Some(Ipv4Addr::new(10, 0, 0, 1)));
        assert_eq!(r[1].dest, "10.0.0.0/24".parse().unwrap());
        assert_eq!(r[1].gateway, None);
    }
}
