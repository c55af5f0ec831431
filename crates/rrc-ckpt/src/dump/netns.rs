//! A network namespace a process of the tree made, read for its image
//! (`image::OwnNet`): its loopback interface and veth pairs with both
//! ends in it, the addresses and routes given to them, and its nftables
//! rules. Besides those, interfaces the kernel made (fallback tunnels) are
//! all it may have; what else it holds is named, for the tree to be
//! refused.
//!
//! The /proc/PID/net files show the process's namespace; addresses, routes
//! and rules are read by `ip -json` and `nft list ruleset` run from a
//! thread of ours in it (a child process starts in its parent thread's
//! namespaces).

use nix::unistd::Pid;
use serde_json::Value;

use crate::common::in_netns_of;
use crate::image::{
    NetAddress, NetRoute, OwnNet, RouteKind, RouteScope, VethEnd, interface_name_allowed,
};
use crate::procfs as pfs;

type Found<T> = std::result::Result<T, String>;

/// The fallback tunnel devices the kernel makes in every network namespace
/// while their modules are loaded: they come back with it.
const FALLBACK: [&str; 9] = [
    "tunl0", "sit0", "ip6tnl0", "gre0", "gretap0", "erspan0", "ip6gre0", "ip_vti0", "ip6_vti0",
];

/// What the network namespace process `pid` made holds: `Ok(Ok)` if a
/// restore makes it again, `Ok(Err(what))` naming what it cannot, `Err`
/// if it cannot be read.
pub fn read(pid: Pid) -> Found<Found<OwnNet>> {
    let read =
        |what: &str| pfs::read_text(format!("/proc/{pid}/net/{what}")).map_err(|e| e.to_string());
    let interfaces: Vec<String> = read("dev")?
        .lines()
        .skip(2)
        .filter_map(|l| l.split(':').next().map(|n| n.trim().to_string()))
        .collect();
    for tables in ["ip_tables_names", "ip6_tables_names"] {
        // There only while the module is loaded.
        if let Ok(names) = pfs::read_text(format!("/proc/{pid}/net/{tables}"))
            && !names.trim().is_empty()
        {
            return Ok(Err(format!(
                "iptables tables ({})",
                names.trim().replace('\n', ", ")
            )));
        }
    }
    // Every listing at once: each is a program started in the namespace,
    // and the tree is stopped meanwhile.
    #[rustfmt::skip]
    let [links, addrs, rules4, rules6, routes4, routes6, nft] = run_all(pid, [
        ("ip", &["-json", "-details", "link", "show"][..]),
        ("ip", &["-json", "address", "show"]),
        ("ip", &["-4", "-json", "rule", "show"]),
        ("ip", &["-6", "-json", "rule", "show"]),
        ("ip", &["-4", "-json", "route", "show", "table", "all"]),
        ("ip", &["-6", "-json", "route", "show", "table", "all"]),
        ("nft", &["list", "ruleset"]),
    ])?;
    let veths = match veth_pairs(&json(&links)?) {
        Ok(v) => v,
        Err(what) => return Ok(Err(what)),
    };
    let ends: Vec<&VethEnd> = veths.iter().flat_map(|(a, b)| [a, b]).collect();
    if let Some(other) = interfaces.iter().find(|n| {
        *n != "lo" && !FALLBACK.contains(&n.as_str()) && !ends.iter().any(|e| e.name == **n)
    }) {
        return Ok(Err(format!("interface {other}")));
    }
    let (lo_up, sysctls) = in_netns_of(pid, || {
        // The settings read are the reading thread's namespace's.
        let sysctls: std::collections::BTreeMap<String, String> = (OwnNet::SYSCTLS.iter())
            .filter_map(|name| {
                let value = pfs::read_text(format!("/proc/sys/{name}")).ok()?;
                Some((name.to_string(), value.trim_end().to_string()))
            })
            .collect();
        crate::sys::loopback_up().map(|up| (up, sysctls))
    })
    .map_err(|e| e.to_string())?
    .map_err(|e| e.to_string())?;
    let addresses = match addresses(&json(&addrs)?, &ends) {
        Ok(a) => a,
        Err(what) => return Ok(Err(what)),
    };
    let mut routes = Vec::new();
    for (family, rules, table) in [("-4", rules4, routes4), ("-6", rules6, routes6)] {
        if let Err(what) = check_rules(family, &json(&rules)?) {
            return Ok(Err(what));
        }
        match read_routes(&json(&table)?, &ends) {
            Ok(r) => routes.extend(r),
            Err(what) => return Ok(Err(what)),
        }
    }
    Ok(Ok(OwnNet {
        lo_up,
        veths,
        addresses,
        routes,
        nftables: (!nft.trim().is_empty()).then_some(nft),
        sysctls,
    }))
}

/// The veth pairs with both ends in the namespace, by `ip -details link`;
/// a veth whose peer is elsewhere is named.
fn veth_pairs(links: &[Value]) -> Found<Vec<(VethEnd, VethEnd)>> {
    let end = |l: &Value| -> Found<VethEnd> {
        let name = l["ifname"].as_str().unwrap_or("?").to_string();
        let mac = parse_mac(l["address"].as_str().unwrap_or(""))
            .ok_or_else(|| format!("veth {name} without a MAC ip shows"))?;
        if !interface_name_allowed(&name) {
            return Err(format!("an interface named {name:?}"));
        }
        Ok(VethEnd {
            index: l["ifindex"]
                .as_u64()
                .and_then(|i| u32::try_from(i).ok())
                .ok_or_else(|| format!("veth {name} without an index ip shows"))?,
            mtu: l["mtu"]
                .as_u64()
                .and_then(|m| u32::try_from(m).ok())
                .unwrap_or(1500),
            up: l["flags"]
                .as_array()
                .is_some_and(|f| f.iter().any(|x| x == "UP")),
            name,
            mac,
        })
    };
    let veths: Vec<&Value> = links
        .iter()
        .filter(|l| l["linkinfo"]["info_kind"] == "veth")
        .collect();
    let mut pairs = Vec::new();
    for (i, l) in veths.iter().enumerate() {
        let name = l["ifname"].as_str().unwrap_or("?");
        if !l["link_netnsid"].is_null() {
            return Err(format!(
                "veth {name}, whose peer is in another network namespace"
            ));
        }
        let Some(peer) = l["link"].as_str() else {
            return Err(format!("veth {name} without a peer ip shows"));
        };
        let Some(p) = veths.iter().position(|o| o["ifname"] == peer) else {
            return Err(format!(
                "veth {name}, whose peer {peer} is not in its namespace"
            ));
        };
        if p > i {
            pairs.push((end(l)?, end(veths[p])?));
        }
    }
    Ok(pairs)
}

/// `aa:bb:cc:dd:ee:ff`.
fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for b in &mut mac {
        *b = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// The IPv6 link-local address the kernel gives an interface with MAC
/// `mac` (EUI-64).
fn link_local(mac: [u8; 6]) -> std::net::Ipv6Addr {
    let m = mac;
    std::net::Ipv6Addr::from([
        0xfe,
        0x80,
        0,
        0,
        0,
        0,
        0,
        0,
        m[0] ^ 2,
        m[1],
        m[2],
        0xff,
        0xfe,
        m[3],
        m[4],
        m[5],
    ])
}

/// The outputs of the commands `(program, args)`, run side by side in
/// process `pid`'s network namespace.
fn run_all<const N: usize>(pid: Pid, commands: [(&str, &[&str]); N]) -> Found<[String; N]> {
    let what = |(program, args): (&str, &[&str])| format!("{program} {}", args.join(" "));
    let children = in_netns_of(pid, || {
        commands.map(|(program, args)| {
            std::process::Command::new(program)
                .args(args)
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
        })
    })
    .map_err(|e| e.to_string())?;
    let mut outputs = Vec::with_capacity(N);
    let mut failed = None;
    // Every child is waited for, whatever failed.
    for (child, command) in children.into_iter().zip(commands) {
        let out = child
            .and_then(|c| c.wait_with_output())
            .map_err(|e| format!("{}: {e}", what(command)))
            .and_then(|out| {
                if !out.status.success() {
                    return Err(format!(
                        "{}: {}",
                        what(command),
                        String::from_utf8_lossy(&out.stderr).trim()
                    ));
                }
                String::from_utf8(out.stdout)
                    .map_err(|_| format!("{}: output that is not UTF-8", what(command)))
            });
        match out {
            Ok(text) => outputs.push(text),
            Err(e) => {
                failed.get_or_insert(e);
                outputs.push(String::new());
            }
        }
    }
    if let Some(e) = failed {
        return Err(e);
    }
    Ok(outputs.try_into().expect("one output per command"))
}

fn json(text: &str) -> Found<Vec<Value>> {
    serde_json::from_str(text).map_err(|e| format!("ip's JSON: {e}"))
}

fn ip_of(v: &Value) -> Option<std::net::IpAddr> {
    v.as_str()?.parse().ok()
}

/// The addresses of the loopback and of the veths `ends` a new namespace
/// does not have (nor the link-local ones the kernel derives from a MAC);
/// another interface with an address is a reason to refuse.
fn addresses(links: &[Value], ends: &[&VethEnd]) -> Found<Vec<NetAddress>> {
    use std::net::IpAddr;
    let mut out = Vec::new();
    for link in links {
        let name = link["ifname"].as_str().unwrap_or("?");
        let veth = ends.iter().find(|e| e.name == name);
        for a in link["addr_info"].as_array().into_iter().flatten() {
            let (Some(address), Some(prefix)) = (ip_of(&a["local"]), a["prefixlen"].as_u64())
            else {
                return Err(format!("an address of {name} ip does not show"));
            };
            if name != "lo" && veth.is_none() {
                return Err(format!("address {address}/{prefix} on {name}"));
            }
            let given = match (name, address) {
                ("lo", IpAddr::V4(v4)) => v4.octets() == [127, 0, 0, 1] && prefix == 8,
                ("lo", IpAddr::V6(v6)) => v6 == std::net::Ipv6Addr::LOCALHOST && prefix == 128,
                (_, IpAddr::V6(v6)) => {
                    veth.is_some_and(|e| v6 == link_local(e.mac)) && prefix == 64
                }
                _ => false,
            };
            if given {
                continue;
            }
            const KNOWN: [&str; 8] = [
                "family",
                "local",
                "prefixlen",
                "scope",
                "label",
                "broadcast",
                "valid_life_time",
                "preferred_life_time",
            ];
            let plain = a
                .as_object()
                .is_some_and(|o| o.keys().all(|k| KNOWN.contains(&k.as_str())));
            let forever = a["valid_life_time"] == u32::MAX && a["preferred_life_time"] == u32::MAX;
            if !plain || !forever {
                return Err(format!(
                    "address {address}/{prefix} with flags or a lifetime ({a})"
                ));
            }
            let label = a["label"]
                .as_str()
                .filter(|l| *l != name)
                .map(str::to_string);
            if label
                .as_deref()
                .is_some_and(|l| !NetAddress::label_allowed(name, l))
            {
                return Err(format!("address {address}/{prefix} labelled {label:?}"));
            }
            // Global, an address's own, goes without saying.
            let scope = match a["scope"].as_str().map(|s| (s, RouteScope::from_name(s))) {
                None | Some((_, Some(RouteScope::Global))) => None,
                Some((_, Some(scope))) => Some(scope),
                Some((s, None)) => return Err(format!("address {address}/{prefix} of scope {s}")),
            };
            out.push(NetAddress {
                dev: name.to_string(),
                address,
                prefix: prefix as u8,
                label,
                scope,
                broadcast: ip_of(&a["broadcast"]),
            });
        }
    }
    Ok(out)
}

/// The rules of a new namespace: local, main and (IPv4) default tables.
fn check_rules(family: &str, rules: &[Value]) -> Found<()> {
    let mut seen: Vec<(u64, String)> = Vec::new();
    for r in rules {
        let keys_ok = r.as_object().is_some_and(|o| {
            o.keys()
                .all(|k| ["priority", "src", "table"].contains(&k.as_str()))
        });
        if !keys_ok || r["src"] != "all" {
            return Err(format!("routing rules of its own ({r})"));
        }
        seen.push((
            r["priority"].as_u64().unwrap_or(u64::MAX),
            r["table"].as_str().unwrap_or("").to_string(),
        ));
    }
    let mut given = vec![(0, "local".to_string()), (32766, "main".to_string())];
    if family == "-4" {
        given.push((32767, "default".to_string()));
    }
    if seen != given {
        return Err(format!("routing rules of its own ({seen:?})"));
    }
    Ok(())
}

/// The routes of the main table the kernel did not make for an address.
fn read_routes(table: &[Value], ends: &[&VethEnd]) -> Found<Vec<NetRoute>> {
    const KNOWN: [&str; 10] = [
        "type", "dst", "gateway", "dev", "metric", "scope", "prefsrc", "protocol", "flags", "pref",
    ];
    let mut out = Vec::new();
    for r in table {
        let Some(o) = r.as_object() else {
            return Err(format!("a route ip shows as {r}"));
        };
        if r["protocol"] == "kernel" || r["table"] == "local" {
            continue;
        }
        if let Some(t) = r["table"].as_str() {
            return Err(format!("routing table {t}"));
        }
        if let Some(k) = o.keys().find(|k| !KNOWN.contains(&k.as_str())) {
            return Err(format!("a route with {k} ({r})"));
        }
        // Whether a link has its carrier is no route's.
        let plain_flags = (r["flags"].as_array()).is_none_or(|f| f.iter().all(|x| x == "linkdown"));
        let plain_pref = r["pref"].is_null() || r["pref"] == "medium";
        let plain_proto =
            r["protocol"].is_null() || r["protocol"] == "boot" || r["protocol"] == "static";
        let dev = match r["dev"].as_str() {
            None => None,
            Some(d) if d == "lo" || ends.iter().any(|e| e.name == d) => Some(d.to_string()),
            Some(d) => return Err(format!("a route through {d}")),
        };
        if !(plain_flags && plain_pref && plain_proto) {
            return Err(format!(
                "a route with flags, a preference or a protocol ({r})"
            ));
        }
        let kind = match r["type"].as_str() {
            None | Some("unicast") => RouteKind::Unicast,
            Some("blackhole") => RouteKind::Blackhole,
            Some("unreachable") => RouteKind::Unreachable,
            Some("prohibit") => RouteKind::Prohibit,
            Some(t) => return Err(format!("a {t} route")),
        };
        let destination = match r["dst"].as_str() {
            Some("default") => None,
            Some(d) => {
                let (a, p) = d.split_once('/').unwrap_or((d, ""));
                let a: std::net::IpAddr = a.parse().map_err(|_| format!("a route to {d}"))?;
                let p = match p {
                    "" if a.is_ipv4() => 32,
                    "" => 128,
                    p => p.parse().map_err(|_| format!("a route to {d}"))?,
                };
                Some((a, p))
            }
            None => return Err(format!("a route without a destination ({r})")),
        };
        let scope = match r["scope"].as_str() {
            None => None,
            Some(s) => Some(RouteScope::from_name(s).ok_or(format!("a route of scope {s}"))?),
        };
        out.push(NetRoute {
            kind,
            destination,
            gateway: ip_of(&r["gateway"]),
            dev,
            metric: r["metric"].as_u64().and_then(|m| u32::try_from(m).ok()),
            scope,
            source: ip_of(&r["prefsrc"]),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_the_kernel_makes_are_left_and_others_kept_or_named() {
        let table: Vec<Value> = serde_json::from_str(
            r#"[{"dst":"10.20.0.0/16","dev":"lo","scope":"link","metric":5,"flags":[]},
                {"type":"blackhole","dst":"10.30.0.0/16","flags":[]},
                {"type":"local","dst":"10.1.1.1","dev":"lo","table":"local","protocol":"kernel","scope":"host","prefsrc":"10.1.1.1","flags":[]},
                {"dst":"fd00::7","dev":"lo","protocol":"kernel","metric":256,"flags":[],"pref":"medium"},
                {"dst":"default","gateway":"10.1.1.2","dev":"lo","flags":[]}]"#,
        )
        .unwrap();
        let r = read_routes(&table, &[]).unwrap();
        assert_eq!(r.len(), 3);
        assert_eq!(r[0].destination, Some(("10.20.0.0".parse().unwrap(), 16)));
        assert_eq!(r[0].metric, Some(5));
        assert_eq!(r[1].kind, RouteKind::Blackhole);
        assert_eq!(r[2].destination, None);
        let other: Vec<Value> =
            serde_json::from_str(r#"[{"dst":"10.0.0.0/8","dev":"lo","table":"100"}]"#).unwrap();
        assert_eq!(read_routes(&other, &[]).unwrap_err(), "routing table 100");
        let multipath: Vec<Value> =
            serde_json::from_str(r#"[{"dst":"10.0.0.0/8","nexthops":[]}]"#).unwrap();
        assert!(
            read_routes(&multipath, &[])
                .unwrap_err()
                .contains("nexthops")
        );
    }
}
