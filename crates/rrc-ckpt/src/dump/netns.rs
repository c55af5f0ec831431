//! A network namespace a process of the tree made, read for its image
//! (`image::netns::OwnNet`): its loopback interface, veth pairs with both ends
//! in it, veths whose peer is in ours (read here with its bridge,
//! addresses and routes) or in another namespace of the tree's (each end
//! recorded in its own namespace), told apart by the ids the namespace
//! gives those (`rtnl::netnsid_of`), and TUN/TAP interfaces, the
//! addresses and routes given to them
//! (in any table but the local one), its routing rules and its nftables
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
use crate::image::netns::{
    AddressFlag, HostVeth, NetAddress, NetRoute, NetRule, NextHop, OwnNet, RouteKind, RoutePref,
    RouteScope, RuleAction, TABLE_DEFAULT, TABLE_LOCAL, TABLE_MAIN, TreeVeth, TunDevice, VethEnd,
    interface_name_allowed,
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
/// if it cannot be read. `makers` are the first processes of the tree's
/// network namespaces (where a veth's peer may be).
pub fn read(pid: Pid, makers: &[Pid]) -> Found<Found<OwnNet>> {
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
    let [links, addrs, rules4, rules6, routes4, routes6, nft] = run_all(Some(pid), [
        ("ip", &["-json", "-details", "link", "show"][..]),
        ("ip", &["-json", "address", "show"]),
        ("ip", &["-4", "-json", "rule", "show"]),
        ("ip", &["-6", "-json", "rule", "show"]),
        ("ip", &["-4", "-json", "route", "show", "table", "all"]),
        ("ip", &["-6", "-json", "route", "show", "table", "all"]),
        ("nft", &["list", "ruleset"]),
    ])?;
    let links = json(&links)?;
    let ((veths, outward), tuns) =
        match veth_pairs(&links).and_then(|v| Ok((v, tun_devices(&links)?))) {
            Ok(made) => made,
            Err(what) => return Ok(Err(what)),
        };
    let (host_veths, tree_veths) = match outward_veths(pid, outward, makers)? {
        Ok(both) => both,
        Err(what) => return Ok(Err(what)),
    };
    let ends = (veths.iter().flat_map(|(a, b)| [a, b]))
        .chain(host_veths.iter().map(|h| &h.end))
        .chain(tree_veths.iter().map(|v| &v.end))
        .map(|e| Made {
            name: &e.name,
            link_local: LinkLocal::FromMac(e.mac),
        });
    let ends: Vec<Made> = ends
        .chain(tuns.iter().map(|t| Made {
            name: &t.name,
            link_local: t.mac.map_or(LinkLocal::Random, LinkLocal::FromMac),
        }))
        .collect();
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
    let mut rules = Vec::new();
    for (v6, listed, table) in [(false, rules4, routes4), (true, rules6, routes6)] {
        match read_rules(v6, &json(&listed)?, &ends) {
            Ok(r) => rules.extend(r),
            Err(what) => return Ok(Err(what)),
        }
        match read_routes(&json(&table)?, &ends) {
            Ok(r) => routes.extend(r),
            Err(what) => return Ok(Err(what)),
        }
    }
    Ok(Ok(OwnNet {
        lo_up,
        veths,
        host_veths,
        tree_veths,
        tuns,
        addresses,
        routes,
        rules,
        nftables: (!nft.trim().is_empty()).then_some(nft),
        sysctls,
    }))
}

type VethPair = (VethEnd, VethEnd);

/// A veth of the namespace whose peer is in another: its end, and its
/// peer's index and namespace as the namespace numbers them.
struct Outward {
    end: VethEnd,
    peer_index: u32,
    nsid: i64,
}

/// One end of a veth, as `ip -details link` shows it.
fn veth_end(l: &Value) -> Found<VethEnd> {
    let link = Link::of(l)?;
    let mac = parse_mac(l["address"].as_str().unwrap_or(""))
        .ok_or_else(|| format!("veth {} without a MAC ip shows", link.name))?;
    Ok(VethEnd {
        index: link.index,
        mtu: link.mtu,
        up: link.up,
        name: link.name,
        mac,
    })
}

/// The veth pairs with both ends in the namespace, and the veths whose
/// peer is in another, by `ip -details link`.
fn veth_pairs(links: &[Value]) -> Found<(Vec<VethPair>, Vec<Outward>)> {
    let veths: Vec<&Value> = links
        .iter()
        .filter(|l| l["linkinfo"]["info_kind"] == "veth")
        .collect();
    let mut pairs = Vec::new();
    let mut outward = Vec::new();
    for (i, l) in veths.iter().enumerate() {
        let name = l["ifname"].as_str().unwrap_or("?");
        if let Some(nsid) = l["link_netnsid"].as_i64() {
            let Some(peer_index) = l["link_index"].as_u64().and_then(|i| u32::try_from(i).ok())
            else {
                return Err(format!("veth {name} without a peer ip shows"));
            };
            outward.push(Outward {
                end: veth_end(l)?,
                peer_index,
                nsid,
            });
            continue;
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
            pairs.push((veth_end(l)?, veth_end(veths[p])?));
        }
    }
    Ok((pairs, outward))
}

/// The veths of process `pid`'s network namespace whose peer is in
/// another: in ours (where the restore makes it again), with what their
/// peers are given here, or in the namespace of one of `makers`, the
/// tree's; a peer elsewhere, or in something other than a bridge here, is
/// named.
fn outward_veths(
    pid: Pid,
    outward: Vec<Outward>,
    makers: &[Pid],
) -> Found<Found<(Vec<HostVeth>, Vec<TreeVeth>)>> {
    if outward.is_empty() {
        return Ok(Ok((Vec::new(), Vec::new())));
    }
    // The ids its namespace gives ours and the tree's others.
    let others: Vec<Pid> = makers.iter().copied().filter(|m| *m != pid).collect();
    let ids = in_netns_of(pid, || {
        let ours = crate::rtnl::netnsid_of(Pid::this())?;
        let theirs = (others.iter())
            .map(|m| crate::rtnl::netnsid_of(*m))
            .collect::<std::io::Result<Vec<_>>>()?;
        Ok::<_, std::io::Error>((ours, theirs))
    })
    .map_err(|e| e.to_string())?;
    let (ours, theirs) =
        ids.map_err(|e| format!("the ids of network namespaces in process {pid}'s: {e}"))?;
    let (home, away): (Vec<Outward>, Vec<Outward>) =
        outward.into_iter().partition(|o| ours == Some(o.nsid));
    let mut tree_veths = Vec::new();
    for o in away {
        let Some(at) = theirs.iter().position(|id| *id == Some(o.nsid)) else {
            return Ok(Err(format!(
                "veth {}, whose peer is in a network namespace other than the checkpointer's \
                 or the tree's",
                o.end.name
            )));
        };
        tree_veths.push(TreeVeth {
            end: o.end,
            peer_ns: others[at].as_raw(),
            peer_index: o.peer_index,
        });
    }
    Ok(host_veths(home)?.map(|h| (h, tree_veths)))
}

/// What the peers of veths `outward`, here, are given.
fn host_veths(outward: Vec<Outward>) -> Found<Found<Vec<HostVeth>>> {
    if outward.is_empty() {
        return Ok(Ok(Vec::new()));
    }
    #[rustfmt::skip]
    let [links, addrs, routes4, routes6] = run_all(None, [
        ("ip", &["-json", "-details", "link", "show"][..]),
        ("ip", &["-json", "address", "show"]),
        ("ip", &["-4", "-json", "route", "show", "table", "all"]),
        ("ip", &["-6", "-json", "route", "show", "table", "all"]),
    ])?;
    let (links, addrs) = (json(&links)?, json(&addrs)?);
    let routes: Vec<Value> = json(&routes4)?.into_iter().chain(json(&routes6)?).collect();
    let mut out = Vec::new();
    for o in outward {
        let name = &o.end.name;
        let found = links.iter().find(|l| {
            l["ifindex"].as_u64() == Some(o.peer_index.into())
                && l["linkinfo"]["info_kind"] == "veth"
                && l["link_index"].as_u64() == Some(o.end.index.into())
                && !l["link_netnsid"].is_null()
        });
        let Some(l) = found else {
            return Ok(Err(format!("veth {name}, whose peer ip does not show")));
        };
        let peer = match veth_end(l) {
            Ok(p) => p,
            Err(what) => return Ok(Err(what)),
        };
        let bridge = match l["master"].as_str() {
            None => None,
            Some(m)
                if links
                    .iter()
                    .any(|b| b["ifname"] == m && b["linkinfo"]["info_kind"] == "bridge") =>
            {
                Some(m.to_string())
            }
            Some(m) => {
                return Ok(Err(format!(
                    "veth {name}, whose peer {} is a port of {m}, which is not a bridge",
                    peer.name
                )));
            }
        };
        let made = [Made {
            name: &peer.name,
            link_local: LinkLocal::FromMac(peer.mac),
        }];
        let of_peer = |v: &&Value| v["ifname"] == peer.name.as_str();
        let addrs: Vec<Value> = addrs.iter().filter(of_peer).cloned().collect();
        let through: Vec<Value> = (routes.iter())
            .filter(|r| r["dev"] == peer.name.as_str())
            .cloned()
            .collect();
        let read = addresses(&addrs, &made).and_then(|a| Ok((a, read_routes(&through, &made)?)));
        let (peer_addresses, peer_routes) = match read {
            Ok(both) => both,
            Err(what) => return Ok(Err(format!("veth {name}'s peer {} with {what}", peer.name))),
        };
        out.push(HostVeth {
            end: o.end,
            peer,
            bridge,
            peer_addresses,
            peer_routes,
        });
    }
    Ok(Ok(out))
}

/// Removes the peers the killed tree's veths had in our namespace, which
/// a restore makes again: they would go with their namespace, which a
/// socket closing (in `TIME_WAIT`) may keep for a minute. Each goes only
/// if it is still the veth the image names.
pub fn remove_host_peers(images: &[crate::image::ProcessImage]) {
    let veths = images.iter().filter_map(|p| p.own_net.as_ref());
    let peers: Vec<&VethEnd> = veths.flat_map(|n| &n.host_veths).map(|h| &h.peer).collect();
    if peers.is_empty() {
        return;
    }
    let listed = run_all(None, [("ip", &["-json", "-details", "link", "show"][..])]);
    let Ok(links) = listed.and_then(|[shown]| json(&shown)) else {
        return;
    };
    for peer in peers {
        let name = &peer.name;
        let same = links.iter().any(|l| {
            l["ifname"] == name.as_str()
                && l["ifindex"].as_u64() == Some(peer.index.into())
                && l["linkinfo"]["info_kind"] == "veth"
        });
        if same && let Err(e) = run_all(None, [("ip", &["link", "del", "dev", name][..])]) {
            tracing::warn!("veth {name} of the killed tree stays until its namespace goes: {e}");
        }
    }
}

/// What `ip -details link` shows of any interface the restore makes.
struct Link {
    name: String,
    index: u32,
    mtu: u32,
    up: bool,
}

impl Link {
    fn of(l: &Value) -> Found<Link> {
        let name = l["ifname"].as_str().unwrap_or("?").to_string();
        if !interface_name_allowed(&name) {
            return Err(format!("an interface named {name:?}"));
        }
        Ok(Link {
            index: l["ifindex"]
                .as_u64()
                .and_then(|i| u32::try_from(i).ok())
                .ok_or_else(|| format!("interface {name} without an index ip shows"))?,
            mtu: l["mtu"]
                .as_u64()
                .and_then(|m| u32::try_from(m).ok())
                .unwrap_or(1500),
            up: l["flags"]
                .as_array()
                .is_some_and(|f| f.iter().any(|x| x == "UP")),
            name,
        })
    }
}

/// An interface the restore makes besides the loopback, by name, and how
/// the kernel derives the IPv6 link-local address it gives it by itself.
struct Made<'a> {
    name: &'a str,
    link_local: LinkLocal,
}

enum LinkLocal {
    /// EUI-64, from its MAC.
    FromMac([u8; 6]),
    /// At random (an interface without a MAC: a TUN one), so another one
    /// after a restore.
    Random,
}

impl Made<'_> {
    /// Whether `a/prefix` is the link-local address the kernel gave it.
    fn given(&self, a: std::net::Ipv6Addr, prefix: u64) -> bool {
        prefix == 64
            && match self.link_local {
                LinkLocal::FromMac(mac) => a == link_local(mac),
                LinkLocal::Random => a.segments()[..4] == [0xfe80, 0, 0, 0],
            }
    }
}

/// The TUN/TAP interfaces, by `ip -details link`; one a restore could not
/// make as it is is named.
fn tun_devices(links: &[Value]) -> Found<Vec<TunDevice>> {
    const KNOWN: [&str; 9] = [
        "type",
        "pi",
        "vnet_hdr",
        "multi_queue",
        "numqueues",
        "numdisabled",
        "persist",
        "user",
        "group",
    ];
    let tuns = links.iter().filter(|l| l["linkinfo"]["info_kind"] == "tun");
    tuns.map(|l| {
        let link = Link::of(l)?;
        let name = &link.name;
        let d = &l["linkinfo"]["info_data"];
        let Some(data) = d.as_object() else {
            return Err(format!(
                "TUN/TAP interface {name} whose kind ip does not show"
            ));
        };
        if let Some(k) = data.keys().find(|k| !KNOWN.contains(&k.as_str())) {
            return Err(format!("TUN/TAP interface {name} with {k} ({d})"));
        }
        if d["numdisabled"].as_u64().unwrap_or(0) > 0 {
            return Err(format!("TUN/TAP interface {name} with queues detached"));
        }
        let tap = match d["type"].as_str() {
            Some("tap") => true,
            Some("tun") => false,
            t => return Err(format!("TUN/TAP interface {name} of type {t:?}")),
        };
        // `ip` names them where the machine's files do.
        let id = |key: &str| -> Found<Option<u32>> {
            let Some(v) = d[key].as_str() else {
                return Ok(d[key].as_u64().and_then(|n| u32::try_from(n).ok()));
            };
            let named = match key {
                "user" => nix::unistd::User::from_name(v).map(|u| u.map(|u| u.uid.as_raw())),
                _ => nix::unistd::Group::from_name(v).map(|g| g.map(|g| g.gid.as_raw())),
            };
            match named {
                Ok(Some(n)) => Ok(Some(n)),
                _ => v
                    .parse()
                    .map(Some)
                    .map_err(|_| format!("TUN/TAP interface {name} of {key} {v:?}")),
            }
        };
        let mac = if tap {
            Some(
                parse_mac(l["address"].as_str().unwrap_or(""))
                    .ok_or_else(|| format!("TAP interface {name} without a MAC ip shows"))?,
            )
        } else {
            None
        };
        Ok(TunDevice {
            tap,
            no_pi: d["pi"] == false,
            multi_queue: d["multi_queue"] == true,
            vnet_hdr: d["vnet_hdr"] == true,
            persist: d["persist"] == true,
            owner: id("user")?,
            group: id("group")?,
            mac,
            index: link.index,
            mtu: link.mtu,
            up: link.up,
            name: link.name,
        })
    })
    .collect()
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
/// process `pid`'s network namespace (ours: `None`).
fn run_all<const N: usize>(pid: Option<Pid>, commands: [(&str, &[&str]); N]) -> Found<[String; N]> {
    let what = |(program, args): (&str, &[&str])| format!("{program} {}", args.join(" "));
    let spawn = || {
        commands.map(|(program, args)| {
            std::process::Command::new(program)
                .args(args)
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
        })
    };
    let children = match pid {
        Some(pid) => in_netns_of(pid, spawn).map_err(|e| e.to_string())?,
        None => spawn(),
    };
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

/// The addresses of the loopback and of the interfaces `ends` a new
/// namespace does not have (nor the link-local ones the kernel derives from a MAC);
/// another interface with an address is a reason to refuse.
fn addresses(links: &[Value], ends: &[Made]) -> Found<Vec<NetAddress>> {
    use std::net::IpAddr;
    let mut out = Vec::new();
    for link in links {
        let name = link["ifname"].as_str().unwrap_or("?");
        let made = ends.iter().find(|e| e.name == name);
        for a in link["addr_info"].as_array().into_iter().flatten() {
            let (Some(address), Some(prefix)) = (ip_of(&a["local"]), a["prefixlen"].as_u64())
            else {
                return Err(format!("an address of {name} ip does not show"));
            };
            if name != "lo" && made.is_none() {
                return Err(format!("address {address}/{prefix} on {name}"));
            }
            let given = match (name, address) {
                ("lo", IpAddr::V4(v4)) => v4.octets() == [127, 0, 0, 1] && prefix == 8,
                ("lo", IpAddr::V6(v6)) => v6 == std::net::Ipv6Addr::LOCALHOST && prefix == 128,
                (_, IpAddr::V6(v6)) => made.is_some_and(|e| e.given(v6, prefix)),
                _ => false,
            };
            if given {
                continue;
            }
            // What its flags, lifetimes and order (a secondary IPv4
            // address comes after its primary) make it, or the kernel does.
            const KNOWN: [&str; 11] = [
                "family",
                "local",
                "prefixlen",
                "scope",
                "label",
                "broadcast",
                "valid_life_time",
                "preferred_life_time",
                "secondary",
                "dynamic",
                "deprecated",
            ];
            let Some(o) = a.as_object() else {
                return Err(format!("an address of {name} ip shows as {a}"));
            };
            // In duplicate detection (`tentative`, or usable meanwhile:
            // `optimistic`): given again as past it, which it would be a
            // moment later. One that failed it cannot be given so.
            const PASSING: [&str; 2] = ["tentative", "optimistic"];
            let mut flags = Vec::new();
            let shown = o.keys().filter(|k| !KNOWN.contains(&k.as_str()));
            for k in shown.filter(|k| !PASSING.contains(&k.as_str())) {
                match AddressFlag::from_name(k) {
                    Some(f) if a[k] == true => flags.push(f),
                    _ => {
                        return Err(format!("address {address}/{prefix} with {k} ({a})"));
                    }
                }
            }
            let life = |key: &str| a[key].as_u64().and_then(|v| u32::try_from(v).ok());
            let lifetimes = match (life("valid_life_time"), life("preferred_life_time")) {
                (Some(u32::MAX), Some(u32::MAX)) => None,
                (Some(valid), Some(preferred)) => Some((valid, preferred)),
                _ => {
                    return Err(format!(
                        "address {address}/{prefix} without lifetimes ({a})"
                    ));
                }
            };
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
                flags,
                lifetimes,
            });
        }
    }
    Ok(out)
}

/// A routing table as `ip` names it: by number, by one of the kernel's
/// names (`main`: `None`), or by a name given it in `rt_tables`, which
/// `ip`, run by us, reads where we see the files.
fn table_number(name: &str) -> Found<Option<u32>> {
    match name {
        "main" => Ok(None),
        "default" => Ok(Some(TABLE_DEFAULT)),
        "local" => Ok(Some(TABLE_LOCAL)),
        n => match n.parse() {
            Ok(number) => Ok(Some(number)),
            Err(_) => table_named(n).map(Some),
        },
    }
}

/// The number of the routing table named `name` in `rt_tables` and
/// `rt_tables.d/*.conf` (of /etc/iproute2 and /usr/share/iproute2): one
/// number, given that name alone.
fn table_named(name: &str) -> Found<u32> {
    let mut files = Vec::new();
    for dir in ["/usr/share/iproute2", "/etc/iproute2"] {
        files.push(std::path::PathBuf::from(dir).join("rt_tables"));
        let confs = std::fs::read_dir(format!("{dir}/rt_tables.d"))
            .into_iter()
            .flatten();
        let mut confs: Vec<_> = (confs.flatten().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "conf"))
            .collect();
        confs.sort();
        files.extend(confs);
    }
    let mut numbers = std::collections::BTreeSet::new();
    for text in files.iter().filter_map(|f| std::fs::read_to_string(f).ok()) {
        numbers.extend(tables_named(&text, name));
    }
    match (numbers.len(), numbers.first()) {
        (1, Some(n)) => Ok(*n),
        (0, _) => Err(format!(
            "routing table {name:?}, which rt_tables does not name"
        )),
        _ => Err(format!(
            "routing table {name:?}, which rt_tables gives {numbers:?}"
        )),
    }
}

/// The numbers `rt_tables` text gives `name` (`NUMBER NAME` lines, the
/// number decimal or `0x` hexadecimal; `#` comments).
fn tables_named(text: &str, name: &str) -> Vec<u32> {
    let lines = text
        .lines()
        .map(|l| l.split('#').next().unwrap_or("").trim());
    lines
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            let (number, named) = (words.next()?, words.next()?);
            (named == name).then_some(())?;
            match number.strip_prefix("0x") {
                Some(hex) => u32::from_str_radix(hex, 16).ok(),
                None => number.parse().ok(),
            }
        })
        .collect()
}

/// A number `ip` prints in hexadecimal (`0x10`).
fn hex(v: &Value) -> Option<u32> {
    u32::from_str_radix(v.as_str()?.strip_prefix("0x")?, 16).ok()
}

/// An address and prefix length `ip rule` shows as `key` and `keylen`
/// (`all`, or nothing: none).
fn rule_prefix(r: &Value, key: &str) -> Found<Option<(std::net::IpAddr, u8)>> {
    match r[key].as_str() {
        None | Some("all") => Ok(None),
        Some(a) => {
            let addr: std::net::IpAddr = a.parse().map_err(|_| format!("a rule's {key} {a}"))?;
            let full = if addr.is_ipv4() { 32 } else { 128 };
            let len = r[format!("{key}len")].as_u64().unwrap_or(full);
            let len = u8::try_from(len).map_err(|_| format!("a rule's {key} {a}/{len}"))?;
            Ok(Some((addr, len)))
        }
    }
}

/// The routing rules of a family but those a new namespace has (local,
/// main and, for IPv4, default tables at 0, 32766 and 32767), which must
/// all be there still.
fn read_rules(v6: bool, rules: &[Value], ends: &[Made]) -> Found<Vec<NetRule>> {
    const KNOWN: [&str; 25] = [
        "priority",
        "not",
        "src",
        "srclen",
        "dst",
        "dstlen",
        "iif",
        "oif",
        "fwmark",
        "fwmask",
        "tos",
        "table",
        "goto",
        "action",
        "uid_start",
        "uid_end",
        "ipproto",
        "sport",
        "sport_start",
        "sport_end",
        "dport",
        "dport_start",
        "dport_end",
        "suppress_prefixlen",
        "protocol",
    ];
    let mut given = vec![(0, "local"), (32766, "main")];
    if !v6 {
        given.push((32767, "default"));
    }
    let mut out = Vec::new();
    for r in rules {
        let Some(o) = r.as_object() else {
            return Err(format!("a routing rule ip shows as {r}"));
        };
        if let Some(k) = o.keys().find(|k| !KNOWN.contains(&k.as_str())) {
            return Err(format!("a routing rule with {k} ({r})"));
        }
        let priority = r["priority"]
            .as_u64()
            .and_then(|p| u32::try_from(p).ok())
            .ok_or_else(|| format!("a routing rule without a priority ({r})"))?;
        let plain = o.len() == 3 && r["src"] == "all";
        if plain
            && let Some(i) = (given.iter()).position(|(p, t)| *p == priority && r["table"] == *t)
        {
            given.remove(i);
            continue;
        }
        let device = |key: &str| match r[key].as_str() {
            None => Ok(None),
            Some(d) if d == "lo" || ends.iter().any(|e| e.name == d) => Ok(Some(d.to_string())),
            Some(d) => Err(format!("a routing rule on {d}")),
        };
        let action = match (
            r["table"].as_str(),
            r["goto"].as_u64(),
            r["action"].as_str(),
        ) {
            (Some(t), None, None) => RuleAction::Table(table_number(t)?.unwrap_or(TABLE_MAIN)),
            (None, Some(g), None) => RuleAction::Goto(
                u32::try_from(g).map_err(|_| format!("a routing rule going to {g}"))?,
            ),
            (None, None, Some("blackhole")) => RuleAction::Blackhole,
            (None, None, Some("unreachable")) => RuleAction::Unreachable,
            (None, None, Some("prohibit")) => RuleAction::Prohibit,
            _ => {
                return Err(format!(
                    "a routing rule that does what rrc does not know ({r})"
                ));
            }
        };
        let fwmark = match (r.get("fwmark"), r.get("fwmask")) {
            (None, None) => None,
            (Some(m), mask) => Some((
                hex(m).ok_or_else(|| format!("a rule's mark {m}"))?,
                mask.map_or(Some(u32::MAX), hex)
                    .ok_or_else(|| format!("a rule's mask {mask:?}"))?,
            )),
            (None, Some(_)) => return Err(format!("a rule with a mask and no mark ({r})")),
        };
        let tos = match r.get("tos") {
            None => None,
            Some(t) => Some(
                hex(t)
                    .and_then(|v| u8::try_from(v).ok())
                    .ok_or_else(|| format!("a rule's tos {t}"))?,
            ),
        };
        let number = |key: &str| r[key].as_u64();
        let uids = match (number("uid_start"), number("uid_end")) {
            (None, None) => None,
            (Some(a), Some(b)) => Some((
                u32::try_from(a).map_err(|_| format!("a rule's uid {a}"))?,
                u32::try_from(b).map_err(|_| format!("a rule's uid {b}"))?,
            )),
            _ => return Err(format!("a rule with half a uid range ({r})")),
        };
        let port = |key: &str| -> Found<Option<(u16, u16)>> {
            let as_port = |v: u64| u16::try_from(v).map_err(|_| format!("a rule's {key} {v}"));
            let (start, end) = (format!("{key}_start"), format!("{key}_end"));
            match (number(key), number(&start), number(&end)) {
                (None, None, None) => Ok(None),
                (Some(p), None, None) => Ok(Some((as_port(p)?, as_port(p)?))),
                (None, Some(a), Some(b)) => Ok(Some((as_port(a)?, as_port(b)?))),
                _ => Err(format!("a rule's {key} ({r})")),
            }
        };
        let ipproto = match &r["ipproto"] {
            Value::Null => None,
            Value::String(p) => Some(p.clone()),
            Value::Number(n) => Some(n.to_string()),
            p => return Err(format!("a rule's protocol {p}")),
        };
        // Who added it (`proto`) is not kept: only `ip rule` and the
        // kernel's, which a restore makes as `ip rule`'s.
        if !matches!(r["protocol"].as_str(), None | Some("boot") | Some("kernel")) {
            return Err(format!("a routing rule of protocol {}", r["protocol"]));
        }
        out.push(NetRule {
            ipv6: v6,
            priority,
            not: o.contains_key("not"),
            from: rule_prefix(r, "src")?,
            to: rule_prefix(r, "dst")?,
            iif: device("iif")?,
            oif: device("oif")?,
            fwmark,
            tos,
            uids,
            ipproto,
            sport: port("sport")?,
            dport: port("dport")?,
            suppress_prefixlen: (number("suppress_prefixlen"))
                .map(|l| u8::try_from(l).map_err(|_| format!("a rule suppressing /{l}")))
                .transpose()?,
            action,
        });
    }
    if let Some((p, t)) = given.first() {
        return Err(format!("its rule {p} (table {t}) removed"));
    }
    Ok(out)
}

/// The routes of its tables (but the local one) the kernel did not make for
/// an address.
fn read_routes(table: &[Value], ends: &[Made]) -> Found<Vec<NetRoute>> {
    const KNOWN: [&str; 12] = [
        "type", "dst", "gateway", "dev", "metric", "scope", "prefsrc", "protocol", "flags", "pref",
        "table", "nexthops",
    ];
    let mut out = Vec::new();
    for r in table {
        let Some(o) = r.as_object() else {
            return Err(format!("a route ip shows as {r}"));
        };
        if r["protocol"] == "kernel" || r["table"] == "local" {
            continue;
        }
        let table = match r["table"].as_str() {
            None => None,
            Some(t) => table_number(t)?,
        };
        if let Some(k) = o.keys().find(|k| !KNOWN.contains(&k.as_str())) {
            return Err(format!("a route with {k} ({r})"));
        }
        // Whether a link has its carrier is no route's.
        let flags: Vec<&Value> = r["flags"].as_array().into_iter().flatten().collect();
        let onlink = flags.iter().any(|f| *f == "onlink");
        let plain_flags = flags.iter().all(|f| *f == "linkdown" || *f == "onlink");
        let pref = match r["pref"].as_str() {
            None | Some("medium") => None,
            Some("low") => Some(RoutePref::Low),
            Some("high") => Some(RoutePref::High),
            Some(p) => return Err(format!("a route of preference {p}")),
        };
        // `boot`, the default, is `ip route add`'s.
        let protocol = match &r["protocol"] {
            Value::Null => None,
            Value::String(p) if p == "boot" => None,
            Value::String(p) if NetRoute::protocol_allowed(p) => Some(p.clone()),
            Value::Number(n) => Some(n.to_string()),
            p => return Err(format!("a route of protocol {p}")),
        };
        let dev = match r["dev"].as_str() {
            None => None,
            Some(d) if d == "lo" || ends.iter().any(|e| e.name == d) => Some(d.to_string()),
            Some(d) => return Err(format!("a route through {d}")),
        };
        if !plain_flags {
            return Err(format!("a route with flags ({r})"));
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
        let mut nexthops = Vec::new();
        for h in r["nexthops"].as_array().into_iter().flatten() {
            const HOP: [&str; 4] = ["gateway", "dev", "weight", "flags"];
            let Some(o) = h.as_object() else {
                return Err(format!("a next hop ip shows as {h}"));
            };
            if let Some(k) = o.keys().find(|k| !HOP.contains(&k.as_str())) {
                return Err(format!("a next hop with {k} ({h})"));
            }
            let flags: Vec<&Value> = h["flags"].as_array().into_iter().flatten().collect();
            if !flags.iter().all(|f| *f == "linkdown" || *f == "onlink") {
                return Err(format!("a next hop with flags ({h})"));
            }
            let dev = match h["dev"].as_str() {
                None => None,
                Some(d) if d == "lo" || ends.iter().any(|e| e.name == d) => Some(d.to_string()),
                Some(d) => return Err(format!("a next hop through {d}")),
            };
            nexthops.push(NextHop {
                gateway: ip_of(&h["gateway"]),
                dev,
                weight: (h["weight"].as_u64())
                    .and_then(|w| u16::try_from(w).ok())
                    .unwrap_or(1),
                onlink: flags.iter().any(|f| *f == "onlink"),
            });
        }
        out.push(NetRoute {
            kind,
            destination,
            gateway: ip_of(&r["gateway"]),
            dev,
            metric: r["metric"].as_u64().and_then(|m| u32::try_from(m).ok()),
            scope,
            source: ip_of(&r["prefsrc"]),
            table,
            protocol,
            onlink,
            pref,
            nexthops,
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
        let other: Vec<Value> = serde_json::from_str(
            r#"[{"dst":"10.0.0.0/8","dev":"lo","table":"100"},
                {"dst":"10.7.0.0/16","dev":"lo","table":"default"}]"#,
        )
        .unwrap();
        let r = read_routes(&other, &[]).unwrap();
        assert_eq!((r[0].table, r[1].table), (Some(100), Some(TABLE_DEFAULT)));
        let named: Vec<Value> =
            serde_json::from_str(r#"[{"dst":"10.0.0.0/8","dev":"lo","table":"vpn"}]"#).unwrap();
        assert_eq!(
            read_routes(&named, &[]).unwrap_err(),
            "routing table \"vpn\", which rt_tables does not name"
        );
        let routed: Vec<Value> = serde_json::from_str(
            r#"[{"dst":"10.70.0.0/16","dev":"lo","protocol":"bird","flags":[]},
                {"dst":"10.71.0.0/16","dev":"lo","protocol":99,"flags":[]},
                {"dst":"10.72.0.0/16","gateway":"192.168.9.1","dev":"lo","flags":["onlink"]},
                {"dst":"fd03::/64","dev":"lo","protocol":"static","pref":"high","flags":[]}]"#,
        )
        .unwrap();
        let r = read_routes(&routed, &[]).unwrap();
        assert_eq!(r[0].protocol.as_deref(), Some("bird"));
        assert_eq!(r[1].protocol.as_deref(), Some("99"));
        assert!(r[2].onlink && r[2].protocol.is_none());
        assert_eq!(
            (r[3].protocol.as_deref(), r[3].pref),
            (Some("static"), Some(RoutePref::High))
        );
        let offloaded: Vec<Value> =
            serde_json::from_str(r#"[{"dst":"10.0.0.0/8","dev":"lo","flags":["offload"]}]"#)
                .unwrap();
        assert!(read_routes(&offloaded, &[]).unwrap_err().contains("flags"));
        let multipath: Vec<Value> = serde_json::from_str(
            r#"[{"dst":"10.9.0.0/16","metric":7,"flags":["linkdown"],"nexthops":[
                  {"gateway":"10.1.0.2","dev":"lo","weight":2,"flags":["linkdown"]},
                  {"gateway":"10.2.0.2","dev":"lo","weight":1,"flags":["onlink"]}]}]"#,
        )
        .unwrap();
        let r = read_routes(&multipath, &[]).unwrap();
        assert_eq!(r[0].nexthops.len(), 2);
        assert_eq!(
            (r[0].nexthops[0].weight, r[0].nexthops[1].onlink),
            (2, true)
        );
        let elsewhere: Vec<Value> = serde_json::from_str(
            r#"[{"dst":"10.9.0.0/16","nexthops":[{"gateway":"10.1.0.2","dev":"eth0"}]}]"#,
        )
        .unwrap();
        assert_eq!(
            read_routes(&elsewhere, &[]).unwrap_err(),
            "a next hop through eth0"
        );
    }

    #[test]
    fn addresses_keep_their_flags_and_lifetimes_or_are_named() {
        let links: Vec<Value> = serde_json::from_str(
            r#"[{"ifname":"lo","addr_info":[
                  {"family":"inet","local":"127.0.0.1","prefixlen":8,"scope":"host","label":"lo",
                   "valid_life_time":4294967295,"preferred_life_time":4294967295},
                  {"family":"inet","local":"10.1.0.1","prefixlen":16,"scope":"global","label":"lo",
                   "valid_life_time":4294967295,"preferred_life_time":4294967295},
                  {"family":"inet","local":"10.1.0.2","prefixlen":16,"scope":"global",
                   "secondary":true,"noprefixroute":true,"label":"lo","dynamic":true,
                   "valid_life_time":3000,"preferred_life_time":0,"deprecated":true}]}]"#,
        )
        .unwrap();
        let a = addresses(&links, &[]).unwrap();
        assert_eq!(a.len(), 2);
        assert_eq!((a[0].flags.as_slice(), a[0].lifetimes), (&[][..], None));
        assert_eq!(a[1].flags, vec![AddressFlag::NoPrefixRoute]);
        assert_eq!(a[1].lifetimes, Some((3000, 0)));
        let passing = |flag: &str| -> Vec<Value> {
            serde_json::from_str(&format!(
                r#"[{{"ifname":"lo","addr_info":[{{"family":"inet6","local":"fd00::1",
                     "prefixlen":64,"{flag}":true,"valid_life_time":4294967295,
                     "preferred_life_time":4294967295}}]}}]"#
            ))
            .unwrap()
        };
        for flag in ["tentative", "optimistic"] {
            let a = addresses(&passing(flag), &[]).unwrap();
            assert_eq!((a.len(), a[0].flags.as_slice()), (1, &[][..]), "{flag}");
        }
        assert!(
            addresses(&passing("dadfailed"), &[])
                .unwrap_err()
                .contains("dadfailed")
        );
    }

    #[test]
    fn tun_and_tap_interfaces_are_read_or_named() {
        let links = |data: &str| -> Vec<Value> {
            serde_json::from_str(&format!(
                r#"[{{"ifindex":3,"ifname":"tap0","flags":["BROADCAST","UP"],"mtu":1400,
                     "address":"02:11:22:33:44:55","linkinfo":{{"info_kind":"tun",
                     "info_data":{data}}}}}]"#
            ))
            .unwrap()
        };
        let tap = tun_devices(&links(
            r#"{"type":"tap","pi":false,"vnet_hdr":false,"multi_queue":true,"numqueues":2,
                "numdisabled":0,"persist":false,"user":4242,"group":"4343"}"#,
        ))
        .unwrap();
        assert_eq!(
            tap,
            vec![TunDevice {
                name: "tap0".into(),
                index: 3,
                tap: true,
                no_pi: true,
                multi_queue: true,
                vnet_hdr: false,
                persist: false,
                owner: Some(4242),
                group: Some(4343),
                mac: Some([2, 0x11, 0x22, 0x33, 0x44, 0x55]),
                mtu: 1400,
                up: true,
            }]
        );
        assert_eq!(
            tap[0].flags(),
            (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_MULTI_QUEUE) as u16
        );
        for (data, named) in [
            (
                r#"{"type":"tap","multi_queue":true,"numdisabled":1}"#,
                "queues detached",
            ),
            (r#"{"type":"tap","napi":true}"#, "with napi"),
            (r#"{"type":"tunnel"}"#, "of type"),
        ] {
            let e = tun_devices(&links(data)).unwrap_err();
            assert!(e.contains(named), "{data}: {e}");
        }
    }

    #[test]
    fn routing_tables_are_named_as_rt_tables_names_them() {
        let text = "# reserved\n255\tlocal\n100 vpn # ours\n0x10  lab\n#7 off\n";
        assert_eq!(tables_named(text, "vpn"), [100]);
        assert_eq!(tables_named(text, "lab"), [16]);
        assert!(tables_named(text, "off").is_empty());
        assert_eq!(table_number("42"), Ok(Some(42)));
        assert_eq!(table_number("main"), Ok(None));
    }

    #[test]
    fn rules_a_new_namespace_has_are_left_and_others_kept_or_named() {
        let listed = |extra: &str| -> Vec<Value> {
            serde_json::from_str(&format!(
                r#"[{{"priority":0,"src":"all","table":"local"}},{extra}
                    {{"priority":32766,"src":"all","table":"main"}},
                    {{"priority":32767,"src":"all","table":"default"}}]"#
            ))
            .unwrap()
        };
        assert_eq!(read_rules(false, &listed(""), &[]).unwrap(), vec![]);
        let r = read_rules(
            false,
            &listed(
                r#"{"priority":50,"src":"10.9.0.0","srclen":16,"goto":32766},
                   {"priority":300,"src":"all","fwmark":"0x5","fwmask":"0xff","table":"300"},
                   {"priority":400,"not":null,"src":"10.3.0.0","srclen":16,"action":"blackhole"},
                   {"priority":700,"src":"all","dst":"10.2.0.0","dstlen":24,"iif":"lo","tos":"0x10","table":"main"},"#,
            ),
            &[],
        )
        .unwrap();
        assert_eq!(r.len(), 4);
        assert_eq!(r[0].action, RuleAction::Goto(32766));
        assert_eq!(r[0].from, Some(("10.9.0.0".parse().unwrap(), 16)));
        assert_eq!(
            (r[1].fwmark, r[1].action),
            (Some((5, 0xff)), RuleAction::Table(300))
        );
        assert!(r[2].not && r[2].action == RuleAction::Blackhole);
        assert_eq!(r[3].to, Some(("10.2.0.0".parse().unwrap(), 24)));
        assert_eq!((r[3].iif.as_deref(), r[3].tos), (Some("lo"), Some(0x10)));
        assert_eq!(r[3].action, RuleAction::Table(TABLE_MAIN));
        let on_eth: Vec<Value> = listed(r#"{"priority":5,"src":"all","iif":"eth0","table":"5"},"#);
        assert_eq!(
            read_rules(false, &on_eth, &[]).unwrap_err(),
            "a routing rule on eth0"
        );
        let selectors: Vec<Value> = listed(
            r#"{"priority":5,"src":"all","uid_start":1000,"uid_end":2000,"table":"5"},
               {"priority":6,"src":"all","ipproto":"udp","sport_start":10,"sport_end":20,"table":"6"},
               {"priority":7,"src":"all","ipproto":"tcp","dport":80,"table":"7"},
               {"priority":8,"src":"all","table":"main","suppress_prefixlen":0},"#,
        );
        let r = read_rules(false, &selectors, &[]).unwrap();
        assert_eq!(r[0].uids, Some((1000, 2000)));
        assert_eq!(
            (r[1].ipproto.as_deref(), r[1].sport),
            (Some("udp"), Some((10, 20)))
        );
        assert_eq!(
            (r[2].ipproto.as_deref(), r[2].dport),
            (Some("tcp"), Some((80, 80)))
        );
        assert_eq!(r[3].suppress_prefixlen, Some(0));
        let l3mdev: Vec<Value> = listed(r#"{"priority":5,"src":"all","l3mdev":null},"#);
        assert!(
            read_rules(false, &l3mdev, &[])
                .unwrap_err()
                .contains("l3mdev")
        );
        let removed: Vec<Value> =
            serde_json::from_str(r#"[{"priority":0,"src":"all","table":"local"}]"#).unwrap();
        assert!(
            read_rules(true, &removed, &[])
                .unwrap_err()
                .contains("32766")
        );
    }
}
