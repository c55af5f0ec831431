//! Network namespaces of the tree's own, made again (record
//! `image::netns::OwnNet`): the first process unshares one
//! (`namespaces::make_own`); the ends of its veths to ours or to another
//! of the tree's namespaces, made here before the tree ([`EarlyVeths`]),
//! are moved in; a thread of ours in it writes its settings (/proc/sys),
//! brings the loopback interface up, makes its veth pairs and TUN/TAP
//! interfaces, gives them their addresses, brings them up, adds the
//! routes and routing rules (`ip`) and loads the nftables rules (`nft -f
//! -`). Everything happens in that new namespace only, but the peers of
//! veths to ours, which the image says are here; what an image says is
//! checked at load (`OwnNet::check`, `check_tree_veths`) and given to the
//! programs as arguments, never through a shell.

use std::io::Write;
use std::process::{Command, Stdio};

use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};

use crate::image::netns::{
    AddressFlag, HostVeth, NetAddress, NetRoute, NetRule, OwnNet, RouteKind, RoutePref, RuleAction,
    TunDevice, VethEnd, VnetHdr,
};
use crate::image::{FileKind, OpenFile};
use crate::restore::tracee::Tracee;
use crate::{Error, Result, sys};

/// Makes the new network namespace `t` is the first process of as `net`
/// says (the kernel gives a new one its loopback interface, down).
/// `tun_files` are the TUN/TAP files of the tree in it: made here with
/// their interfaces, kept in `made` by file id for their creators.
pub fn fill(
    t: &mut Tracee,
    net: &OwnNet,
    early: &EarlyVeths,
    tun_files: &[&OpenFile],
    made: &mut HashMap<usize, OwnedFd>,
) -> Result<()> {
    let pid = t.ns_pid;
    let fail = |detail: String| Error::Restore {
        pid,
        stage: "network namespace",
        detail,
    };
    // Opened where the process sees its files.
    let tuns = crate::common::in_view_of(t.pid, || {
        let mut files = Vec::new();
        for tun in &net.tuns {
            let of_it: Vec<&OpenFile> = (tun_files.iter().copied())
                .filter(|f| matches!(&f.kind, FileKind::Tun { iface, .. } if *iface == tun.name))
                .collect();
            files.extend(make_tun(tun, &of_it)?);
        }
        Ok::<_, String>(files)
    })?
    .map_err(fail)?;
    made.extend(tuns);
    // Veths to ours or to another of the tree's: made already, here.
    let outward =
        (net.host_veths.iter().map(|h| &h.end)).chain(net.tree_veths.iter().map(|v| &v.end));
    for end in outward {
        let index = (early.made_for(t.ns_pid, &end.name))
            .ok_or_else(|| fail(format!("veth {}: its pair was not made", end.name)))?;
        crate::rtnl::move_link(index, t.pid, &end.name, end.index).map_err(|e| {
            fail(format!(
                "move veth {} into the namespace as index {}: {e}",
                end.name, end.index
            ))
        })?;
    }
    crate::common::in_netns_of(t.pid, || -> std::result::Result<(), String> {
        // First: with IPv6 off, its addresses are not made.
        for (name, value) in &net.sysctls {
            let path = format!("/proc/sys/{name}");
            let now = crate::procfs::read_text(&path).map_err(|e| format!("{path}: {e}"))?;
            if now.trim_end() != value {
                std::fs::write(&path, value).map_err(|e| format!("{path} = {value}: {e}"))?;
            }
        }
        if net.lo_up {
            crate::sys::set_loopback_up()
                .map_err(|e| format!("bring its loopback interface up: {e}"))?;
        }
        for (a, b) in &net.veths {
            let (mac_a, mac_b) = (mac(a.mac), mac(b.mac));
            let (mtu_a, mtu_b) = (a.mtu.to_string(), b.mtu.to_string());
            let (index_a, index_b) = (a.index.to_string(), b.index.to_string());
            #[rustfmt::skip]
            let args = [
                "link", "add", &a.name, "index", &index_a, "address", &mac_a, "mtu", &mtu_a,
                "type", "veth",
                "peer", "name", &b.name, "index", &index_b, "address", &mac_b, "mtu", &mtu_b,
            ];
            run("ip", &args, None)?;
        }
        for tun in &net.tuns {
            let mtu = tun.mtu.to_string();
            let mut args = vec!["link", "set", "dev", &tun.name, "mtu", &mtu];
            let mac = tun.mac.map(mac);
            args.extend(mac.as_deref().map(|m| ["address", m]).iter().flatten());
            run("ip", &args, None)?;
        }
        ip_all(net.addresses.iter().map(address_args))?;
        let ends = (net.veths.iter().flat_map(|(a, b)| [a, b]))
            .chain(net.host_veths.iter().map(|h| &h.end))
            .chain(net.tree_veths.iter().map(|v| &v.end));
        let up = (ends.filter(|e| e.up).map(|e| &e.name))
            .chain(net.tuns.iter().filter(|t| t.up).map(|t| &t.name));
        ip_all(up.map(|name| link_up(name)))?;
        ip_all(net.routes.iter().map(route_args))?;
        ip_all(net.rules.iter().map(rule_args))?;
        if let Some(rules) = &net.nftables {
            run("nft", &["-f", "-"], Some(rules))?;
        }
        Ok(())
    })?
    .map_err(fail)
}

/// The veth pairs of the tree's network namespaces with an end outside
/// of them, in ours (the restorer's), or in another namespace of the
/// tree's, made before any process is: a socket of the tree's in ours may
/// be bound to a peer's address, and a process's socket in its namespace
/// to its end's. Each is made here under names of ours; a peer in ours is
/// given its name, MAC, MTU, index (where free), bridge, addresses, state
/// and routes at once; every other end is moved into its namespace once
/// that is made ([`fill`]). A restore that fails removes them (either end
/// takes the other with it).
pub struct EarlyVeths {
    /// Each end to move into a namespace: by the image's pid of the
    /// namespace's maker and its name there, its index here.
    ends: Vec<(i32, String, u32)>,
    /// What a failed restore removes here.
    made: Vec<String>,
    kept: bool,
}

impl EarlyVeths {
    /// How long the peers of a tree just killed may keep their names: its
    /// namespace goes once its last socket has.
    const NAMES_FREE_WITHIN: std::time::Duration = std::time::Duration::from_secs(5);

    pub fn make(
        procs: &std::collections::BTreeMap<i32, crate::image::ProcessImage>,
    ) -> Result<EarlyVeths> {
        let mut early = EarlyVeths {
            ends: Vec::new(),
            made: Vec::new(),
            kept: false,
        };
        for p in procs.values() {
            let Some(net) = &p.own_net else {
                continue;
            };
            let fail = |detail: String| Error::Restore {
                pid: p.pid,
                stage: "network namespace",
                detail,
            };
            for h in &net.host_veths {
                early.host_pair(p.pid, h, &net.host_veths).map_err(fail)?;
            }
            // Each pair once, from the namespace of the lower pid; its other
            // end is there (checked at load).
            for v in net.tree_veths.iter().filter(|v| p.pid < v.peer_ns) {
                let other = (procs.get(&v.peer_ns))
                    .and_then(|q| q.own_net.as_ref())
                    .and_then(|n| n.tree_veths.iter().find(|w| w.end.index == v.peer_index));
                let Some(w) = other else {
                    return Err(fail(format!("veth {}: its peer is not there", v.end.name)));
                };
                early
                    .tree_pair((p.pid, &v.end), (v.peer_ns, &w.end))
                    .map_err(fail)?;
            }
        }
        Ok(early)
    }

    /// A name of ours for an end until it is moved: unique to this
    /// restore.
    fn temporary(&self, n: usize) -> String {
        format!("rrc{:x}.{}", std::process::id(), self.ends.len() + n)
    }

    /// Makes a pair by `ip link add` with the arguments `args` gives for
    /// two indexes free here but `avoid` (one for each end; the indexes
    /// taken are passed too), from the listing `links` of the interfaces
    /// here. An index taken meanwhile (by an interface made elsewhere on
    /// the host) fails the call, which is tried again with a new listing.
    /// Gives both indexes.
    fn add_pair(
        args: impl Fn(&str, &str, &[u32]) -> Vec<String>,
        avoid: &[u32],
        mut links: Vec<serde_json::Value>,
    ) -> std::result::Result<(u32, u32), String> {
        let mut tries = 0;
        loop {
            let taken: Vec<u32> = (links.iter())
                .filter_map(|l| l["ifindex"].as_u64().and_then(|i| u32::try_from(i).ok()))
                .collect();
            let mut spare = (2..).filter(|i| !taken.contains(i) && !avoid.contains(i));
            let (a, b) = (spare.next().unwrap_or(0), spare.next().unwrap_or(0));
            let args = args(&a.to_string(), &b.to_string(), &taken);
            let words: Vec<&str> = args.iter().map(String::as_str).collect();
            match run("ip", &words, None) {
                Ok(()) => return Ok((a, b)),
                Err(_) if tries < 4 => {
                    tries += 1;
                    links = links_here()?;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Makes veth `h` of the namespace process `maker` makes (whose veths
    /// to ours are `all`), its peer here as it was.
    fn host_pair(
        &mut self,
        maker: i32,
        h: &HostVeth,
        all: &[HostVeth],
    ) -> std::result::Result<(), String> {
        let (a, b) = (&h.end, &h.peer);
        let links = Self::ready(h)?;
        let temporary = self.temporary(0);
        let (mac_a, mac_b) = (mac(a.mac), mac(b.mac));
        let (mtu_a, mtu_b) = (a.mtu.to_string(), b.mtu.to_string());
        let index_b = b.index.to_string();
        // The kernel gives a veth's peer the index asked for only if the
        // veth is given one too: one no peer asks for.
        let peers: Vec<u32> = all.iter().map(|h| h.peer.index).collect();
        let (index, _) = Self::add_pair(
            |index_a, _, taken| {
                #[rustfmt::skip]
                let mut args = strings([
                    "link", "add", &temporary, "index", index_a, "address", &mac_a, "mtu",
                    &mtu_a, "type", "veth", "peer", "name", &b.name, "address", &mac_b, "mtu",
                    &mtu_b,
                ]);
                // Its own index again, where free.
                if !taken.contains(&b.index) {
                    args.extend(strings(["index", &index_b]));
                }
                args
            },
            &peers,
            links,
        )?;
        self.ends.push((maker, a.name.clone(), index));
        self.made.push(b.name.clone());
        let peer = &b.name;
        ip_all(
            h.bridge
                .iter()
                .map(|br| strings(["link", "set", peer, "master", br])),
        )?;
        ip_all(h.peer_addresses.iter().map(address_args))?;
        if b.up {
            ip_all([link_up(peer)])?;
        }
        ip_all(h.peer_routes.iter().map(route_args))
    }

    /// Makes a veth between the namespaces processes `maker_a` and
    /// `maker_b` make, with ends `a` and `b`.
    fn tree_pair(
        &mut self,
        (maker_a, a): (i32, &VethEnd),
        (maker_b, b): (i32, &VethEnd),
    ) -> std::result::Result<(), String> {
        let (name_a, name_b) = (self.temporary(0), self.temporary(1));
        let (mac_a, mac_b) = (mac(a.mac), mac(b.mac));
        let (mtu_a, mtu_b) = (a.mtu.to_string(), b.mtu.to_string());
        let (index_a, index_b) = Self::add_pair(
            |index_a, index_b, _| {
                #[rustfmt::skip]
                let args = strings([
                    "link", "add", &name_a, "index", index_a, "address", &mac_a, "mtu", &mtu_a,
                    "type", "veth", "peer", "name", &name_b, "index", index_b, "address",
                    &mac_b, "mtu", &mtu_b,
                ]);
                args
            },
            &[],
            links_here()?,
        )?;
        self.ends.push((maker_a, a.name.clone(), index_a));
        self.ends.push((maker_b, b.name.clone(), index_b));
        self.made.push(name_a);
        Ok(())
    }

    /// Waits for the name of `h`'s peer to be free here, checks its
    /// bridge is, and gives the interfaces here then.
    fn ready(h: &HostVeth) -> std::result::Result<Vec<serde_json::Value>, String> {
        let started = std::time::Instant::now();
        loop {
            let links = links_here()?;
            let named = |n: &str| links.iter().find(|l| l["ifname"] == n);
            if named(&h.peer.name).is_some() {
                if started.elapsed() < Self::NAMES_FREE_WITHIN {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                    continue;
                }
                return Err(format!(
                    "the peer of veth {}, {}, cannot be made in this network namespace: an \
                     interface there has its name (the original's, if its namespace is \
                     still there: `ip link del {}` removes both its ends)",
                    h.end.name, h.peer.name, h.peer.name
                ));
            }
            if let Some(b) = &h.bridge
                && !named(b).is_some_and(|l| l["linkinfo"]["info_kind"] == "bridge")
            {
                return Err(format!(
                    "the peer of veth {} was a port of bridge {b}, which this network \
                     namespace does not have",
                    h.end.name
                ));
            }
            return Ok(links);
        }
    }

    /// The index here of the end named `name` of the namespace process
    /// `maker` makes.
    fn made_for(&self, maker: i32, name: &str) -> Option<u32> {
        (self.ends.iter())
            .find(|(m, n, _)| *m == maker && n == name)
            .map(|(_, _, index)| *index)
    }

    /// The restore succeeded: they stay.
    pub fn keep(&mut self) {
        self.kept = true;
    }
}

impl Drop for EarlyVeths {
    fn drop(&mut self) {
        if self.kept || self.made.is_empty() {
            return;
        }
        // Those still here: one moved goes with its namespace.
        let here = links_here().unwrap_or_default();
        let left = (self.made.iter()).filter(|n| here.iter().any(|l| l["ifname"] == n.as_str()));
        for name in left {
            if let Err(e) = run("ip", &["link", "del", name], None) {
                tracing::warn!("veth {name} made for a failed restore stays: {e}");
            }
        }
    }
}

/// What `ip -details link show` shows of the interfaces here.
fn links_here() -> std::result::Result<Vec<serde_json::Value>, String> {
    let out = Command::new("ip")
        .args(["-json", "-details", "link", "show"])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .map_err(|e| format!("ip link show: {e}"))?;
    serde_json::from_slice(&out.stdout).map_err(|e| format!("ip link show: {e}"))
}

/// `ip` with each of `commands`' arguments, one after the other.
fn ip_all(commands: impl IntoIterator<Item = Vec<String>>) -> std::result::Result<(), String> {
    for args in commands {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        run("ip", &args, None)?;
    }
    Ok(())
}

fn strings<const N: usize>(words: [&str; N]) -> Vec<String> {
    words.iter().map(|w| w.to_string()).collect()
}

fn link_up(name: &str) -> Vec<String> {
    strings(["link", "set", name, "up"])
}

/// `ip address add` of address `a`.
fn address_args(a: &NetAddress) -> Vec<String> {
    let mut args = strings([
        "address",
        "add",
        &format!("{}/{}", a.address, a.prefix),
        "dev",
        &a.dev,
    ]);
    if let Some(l) = &a.label {
        args.extend(strings(["label", l]));
    }
    if let Some(s) = a.scope {
        args.extend(strings(["scope", s.name()]));
    }
    if let Some(b) = a.broadcast {
        args.extend(strings(["broadcast", &b.to_string()]));
    }
    args.extend(a.flags.iter().map(|f| f.name().to_string()));
    // It had been through duplicate address detection.
    if a.address.is_ipv6() && a.dev != "lo" && !a.flags.contains(&AddressFlag::NoDad) {
        args.push("nodad".into());
    }
    if let Some((valid, preferred)) = a.lifetimes {
        args.extend(strings([
            "valid_lft",
            &valid.to_string(),
            "preferred_lft",
            &preferred.to_string(),
        ]));
    }
    args
}

/// A TUN/TAP file to make: one of the tree's (by id), or one of ours.
struct TunFile<'a> {
    id: Option<usize>,
    /// Where it is opened, and the device that must be there.
    path: &'a str,
    rdev: Option<u64>,
    /// `O_RDONLY`, `O_WRONLY` or `O_RDWR`.
    access: i32,
    /// Flags a file sets for itself besides its interface's.
    own_flags: u16,
    sndbuf: Option<i32>,
    vnet: Option<VnetHdr>,
}

impl<'a> TunFile<'a> {
    fn of(f: &'a OpenFile) -> Option<TunFile<'a>> {
        let FileKind::Tun {
            path,
            rdev,
            flags,
            sndbuf,
            vnet,
            ..
        } = &f.kind
        else {
            return None;
        };
        Some(TunFile {
            id: Some(f.id),
            path,
            rdev: Some(*rdev),
            access: (f.flags & libc::O_ACCMODE as u32) as i32,
            // `IFF_ONE_QUEUE`, which does nothing: the others are the
            // interface's, or say the file has no filter (none here).
            own_flags: flags & libc::IFF_ONE_QUEUE as u16,
            sndbuf: *sndbuf,
            vnet: *vnet,
        })
    }

    /// A file of ours that makes an interface none of the tree's holds.
    fn ours() -> TunFile<'static> {
        TunFile {
            id: None,
            path: "/dev/net/tun",
            rdev: None,
            access: libc::O_RDWR,
            own_flags: 0,
            sndbuf: None,
            vnet: None,
        }
    }
}

/// Makes TUN/TAP interface `tun` by attaching the first of `files` (or a
/// file of ours, for an interface no file holds) with its index, owner
/// and group, then attaches the others. Returns the files by id: they keep
/// the interface while the restore holds them (it outlives them only if
/// persistent), and its carrier never goes down, as it would between a
/// file of ours and one made again.
fn make_tun(
    tun: &TunDevice,
    files: &[&OpenFile],
) -> std::result::Result<Vec<(usize, OwnedFd)>, String> {
    let err =
        |what: &str, e: std::io::Error| format!("{what} of TUN/TAP interface {}: {e}", tun.name);
    let mut wants: Vec<TunFile> = files.iter().filter_map(|f| TunFile::of(f)).collect();
    if wants.is_empty() {
        wants.push(TunFile::ours());
    }
    let mut made = Vec::new();
    for (i, want) in wants.into_iter().enumerate() {
        let path = want.path;
        // The device the image names, looked at before it is opened.
        let is = std::fs::metadata(path).map(|m| std::os::unix::fs::MetadataExt::rdev(&m));
        if let Some(rdev) = want.rdev.filter(|r| is.as_ref().ok() != Some(r)) {
            return Err(format!("{path} is not device {rdev:#x} ({is:?})"));
        }
        let fd = sys::tun::open(path, want.access).map_err(|e| err(&format!("open {path}"), e))?;
        if i == 0 {
            sys::tun::set_index(fd.as_fd(), tun.index).map_err(|e| err("the index", e))?;
        }
        sys::tun::attach(fd.as_fd(), &tun.name, tun.flags() | want.own_flags)
            .map_err(|e| err("attach a file", e))?;
        if i == 0 {
            let set = [
                ("the owner", libc::TUNSETOWNER, tun.owner),
                ("the group", libc::TUNSETGROUP, tun.group),
                ("persistence", libc::TUNSETPERSIST, tun.persist.then_some(1)),
            ];
            for (what, request, value) in set {
                if let Some(v) = value {
                    sys::tun::set(fd.as_fd(), request, v).map_err(|e| err(what, e))?;
                }
            }
        }
        if let Some(v) = want.vnet {
            sys::tun::set_vnet(fd.as_fd(), v.size, v.little_endian, v.offloads)
                .map_err(|e| err("virtio-net headers", e))?;
        }
        if let Some(size) = want.sndbuf {
            sys::tun::set_sndbuf(fd.as_fd(), size).map_err(|e| err("a send buffer", e))?;
        }
        if let Some(id) = want.id {
            made.push((id, fd));
        }
    }
    Ok(made)
}

/// `ip route add ...` for route `r`.
fn route_args(r: &NetRoute) -> Vec<String> {
    let v6 = r
        .destination
        .map(|(a, _)| a)
        .or(r.gateway)
        .or(r.source)
        .or(r.nexthops.iter().find_map(|h| h.gateway))
        .is_some_and(|a| a.is_ipv6());
    let mut a: Vec<String> = vec![
        if v6 { "-6" } else { "-4" }.into(),
        "route".into(),
        "add".into(),
    ];
    match r.kind {
        RouteKind::Unicast => {}
        RouteKind::Blackhole => a.push("blackhole".into()),
        RouteKind::Unreachable => a.push("unreachable".into()),
        RouteKind::Prohibit => a.push("prohibit".into()),
    }
    a.push(match r.destination {
        Some((addr, prefix)) => format!("{addr}/{prefix}"),
        None => "default".into(),
    });
    if let Some(g) = r.gateway {
        a.extend(["via".into(), g.to_string()]);
    }
    if let Some(d) = &r.dev {
        a.extend(["dev".into(), d.clone()]);
    }
    if let Some(m) = r.metric {
        a.extend(["metric".into(), m.to_string()]);
    }
    if let Some(s) = r.scope {
        a.extend(["scope".into(), s.name().into()]);
    }
    if let Some(src) = r.source {
        a.extend(["src".into(), src.to_string()]);
    }
    if let Some(t) = r.table {
        a.extend(["table".into(), t.to_string()]);
    }
    if let Some(p) = &r.protocol {
        a.extend(["proto".into(), p.clone()]);
    }
    if r.onlink {
        a.push("onlink".into());
    }
    match r.pref {
        None => {}
        Some(RoutePref::Low) => a.extend(["pref".into(), "low".into()]),
        Some(RoutePref::High) => a.extend(["pref".into(), "high".into()]),
    }
    for h in &r.nexthops {
        a.push("nexthop".into());
        if let Some(g) = h.gateway {
            a.extend(["via".into(), g.to_string()]);
        }
        if let Some(d) = &h.dev {
            a.extend(["dev".into(), d.clone()]);
        }
        a.extend(["weight".into(), h.weight.to_string()]);
        if h.onlink {
            a.push("onlink".into());
        }
    }
    a
}

/// `ip rule add ...` for rule `r`.
fn rule_args(r: &NetRule) -> Vec<String> {
    let mut a: Vec<String> = vec![
        if r.ipv6 { "-6" } else { "-4" }.into(),
        "rule".into(),
        "add".into(),
        "priority".into(),
        r.priority.to_string(),
    ];
    if r.not {
        a.push("not".into());
    }
    let prefix = |(addr, len): (std::net::IpAddr, u8)| format!("{addr}/{len}");
    a.extend(["from".into(), r.from.map_or("all".into(), prefix)]);
    if let Some(to) = r.to {
        a.extend(["to".into(), prefix(to)]);
    }
    for (key, dev) in [("iif", &r.iif), ("oif", &r.oif)] {
        if let Some(d) = dev {
            a.extend([key.into(), d.clone()]);
        }
    }
    if let Some((mark, mask)) = r.fwmark {
        a.extend(["fwmark".into(), format!("{mark:#x}/{mask:#x}")]);
    }
    if let Some(tos) = r.tos {
        a.extend(["tos".into(), format!("{tos:#x}")]);
    }
    if let Some((first, last)) = r.uids {
        a.extend(["uidrange".into(), format!("{first}-{last}")]);
    }
    if let Some(p) = &r.ipproto {
        a.extend(["ipproto".into(), p.clone()]);
    }
    for (key, range) in [("sport", r.sport), ("dport", r.dport)] {
        if let Some((first, last)) = range {
            a.extend([key.into(), format!("{first}-{last}")]);
        }
    }
    if let Some(len) = r.suppress_prefixlen {
        a.extend(["suppress_prefixlength".into(), len.to_string()]);
    }
    match r.action {
        RuleAction::Table(t) => a.extend(["table".into(), t.to_string()]),
        RuleAction::Goto(p) => a.extend(["goto".into(), p.to_string()]),
        RuleAction::Blackhole => a.push("blackhole".into()),
        RuleAction::Unreachable => a.push("unreachable".into()),
        RuleAction::Prohibit => a.push("prohibit".into()),
    }
    a
}

fn mac(m: [u8; 6]) -> String {
    let hex: Vec<String> = m.iter().map(|b| format!("{b:02x}")).collect();
    hex.join(":")
}

/// Runs `program args` (with `input` on its stdin) from this thread's
/// namespaces; its error output on failure.
fn run(program: &str, args: &[&str], input: Option<&str>) -> std::result::Result<(), String> {
    let what = || format!("{program} {}", args.join(" "));
    let mut child = Command::new(program)
        .args(args)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{}: {e}", what()))?;
    if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
        stdin
            .write_all(text.as_bytes())
            .map_err(|e| format!("{}: {e}", what()))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("{}: {e}", what()))?;
    if !out.status.success() {
        return Err(format!(
            "{}: {}",
            what(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::netns::RouteScope;

    #[test]
    fn routes_become_the_arguments_that_make_them() {
        let r = NetRoute {
            kind: RouteKind::Blackhole,
            destination: Some(("10.30.0.0".parse().unwrap(), 16)),
            gateway: None,
            dev: None,
            metric: Some(7),
            scope: None,
            source: None,
            table: None,
            protocol: None,
            onlink: false,
            pref: None,
            nexthops: Vec::new(),
        };
        assert_eq!(
            route_args(&r).join(" "),
            "-4 route add blackhole 10.30.0.0/16 metric 7"
        );
        let hop = |g: &str, dev: &str, weight, onlink| crate::image::netns::NextHop {
            gateway: Some(g.parse().unwrap()),
            dev: Some(dev.into()),
            weight,
            onlink,
        };
        let multipath = NetRoute {
            kind: RouteKind::Unicast,
            nexthops: vec![
                hop("10.1.0.2", "a0", 2, false),
                hop("10.2.0.2", "b0", 1, true),
            ],
            ..r
        };
        assert_eq!(
            route_args(&multipath).join(" "),
            "-4 route add 10.30.0.0/16 metric 7 nexthop via 10.1.0.2 dev a0 weight 2 \
             nexthop via 10.2.0.2 dev b0 weight 1 onlink"
        );
        let r = NetRoute {
            kind: RouteKind::Unicast,
            destination: Some(("fd01::".parse().unwrap(), 64)),
            gateway: None,
            dev: Some("lo".into()),
            metric: None,
            scope: Some(RouteScope::Link),
            source: None,
            table: Some(100),
            protocol: Some("bird".into()),
            onlink: true,
            pref: Some(RoutePref::High),
            nexthops: Vec::new(),
        };
        assert_eq!(
            route_args(&r).join(" "),
            "-6 route add fd01::/64 dev lo scope link table 100 proto bird onlink pref high"
        );
    }

    #[test]
    fn rules_become_the_arguments_that_make_them() {
        let r = NetRule {
            ipv6: false,
            priority: 400,
            not: true,
            from: Some(("10.3.0.0".parse().unwrap(), 16)),
            to: Some(("10.2.0.0".parse().unwrap(), 24)),
            iif: Some("lo".into()),
            oif: None,
            fwmark: Some((5, 0xff)),
            tos: Some(0x10),
            uids: Some((1000, 2000)),
            ipproto: Some("tcp".into()),
            sport: None,
            dport: Some((80, 80)),
            suppress_prefixlen: None,
            action: RuleAction::Table(100),
        };
        assert_eq!(
            rule_args(&r).join(" "),
            "-4 rule add priority 400 not from 10.3.0.0/16 to 10.2.0.0/24 iif lo \
             fwmark 0x5/0xff tos 0x10 uidrange 1000-2000 ipproto tcp dport 80-80 table 100"
        );
        let r = NetRule {
            ipv6: true,
            priority: 50,
            not: false,
            from: None,
            to: None,
            iif: None,
            oif: None,
            fwmark: None,
            tos: None,
            uids: None,
            ipproto: None,
            sport: Some((1, 1024)),
            dport: None,
            suppress_prefixlen: Some(0),
            action: RuleAction::Goto(32766),
        };
        assert_eq!(
            rule_args(&r).join(" "),
            "-6 rule add priority 50 from all sport 1-1024 suppress_prefixlength 0 goto 32766"
        );
    }
}
