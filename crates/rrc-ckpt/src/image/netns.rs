//! The network namespaces of the tree's own (defined here only): what a
//! restore makes in a new one (`OwnNet`: its interfaces, their addresses,
//! routes and rules, nftables rules and settings), and the rules that tie
//! TUN/TAP files to interfaces of those namespaces.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{FileKind, OpenFile, ProcessImage};

/// A network namespace a process of the tree made: its loopback interface
/// and veth pairs with both ends in it, the addresses given to them (the
/// loopback's 127.0.0.1/8 and ::1 apart), its routes and its nftables
/// rules.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OwnNet {
    /// The loopback interface is up.
    pub lo_up: bool,
    /// Veth pairs with both ends in the namespace.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub veths: Vec<(VethEnd, VethEnd)>,
    /// Veth pairs with their peer in the namespace the restore runs in.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub host_veths: Vec<HostVeth>,
    /// Veths with their peer in another network namespace of the tree's.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tree_veths: Vec<TreeVeth>,
    /// Addresses of its interfaces, but the loopback's 127.0.0.1/8 and ::1
    /// and the link-local ones the kernel derives from a MAC.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<NetAddress>,
    /// Routes of its tables (but the local ones) other than those the
    /// kernel makes for addresses.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<NetRoute>,
    /// Routing rules but the ones a new namespace has.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<NetRule>,
    /// Its TUN and TAP interfaces.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tuns: Vec<TunDevice>,
    /// Its nftables rules, as `nft list ruleset` prints them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nftables: Option<String>,
    /// Its values of the settings of [`OwnNet::SYSCTLS`] (under
    /// /proc/sys), by name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub sysctls: BTreeMap<String, String>,
}

/// One end of a veth pair: `ip link add NAME index INDEX address MAC mtu
/// MTU type veth peer ...`, then up if it was.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VethEnd {
    pub name: String,
    /// Its interface index in the namespace.
    pub index: u32,
    pub mac: [u8; 6],
    pub mtu: u32,
    pub up: bool,
}

/// A veth pair with one end in the namespace and its peer in the network
/// namespace the checkpoint was taken from (the host's, for a process
/// tree checkpointed there), where the restore puts it again: by its name,
/// MAC and MTU (and index, where free), a port of the bridge it was in,
/// with its addresses and its routes other than the kernel's, up if it
/// was. Only a process whose parent is in the restorer's network
/// namespace may have one, and only in a tree restored there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostVeth {
    /// The end in the namespace.
    pub end: VethEnd,
    /// The end in the restorer's.
    pub peer: VethEnd,
    /// The bridge the peer is a port of.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bridge: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub peer_addresses: Vec<NetAddress>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub peer_routes: Vec<NetRoute>,
}

/// A veth with its peer in another network namespace the tree made (or
/// the root's, if the restore makes it): each end is recorded in its own
/// namespace's record, naming the other's namespace and index. A restore
/// makes the pair before the tree, under names of its own, and moves each
/// end into its namespace, with its name and index there, as that is
/// made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TreeVeth {
    pub end: VethEnd,
    /// The process (as the tree numbers it) whose record has the peer's
    /// namespace.
    pub peer_ns: i32,
    /// The peer's index there.
    pub peer_index: u32,
}

/// Every veth between two network namespaces of the tree has both its
/// ends recorded, each once, in namespaces the restore makes. `procs`
/// are the tree's processes.
pub fn check_tree_veths(procs: &[&ProcessImage]) -> std::result::Result<(), String> {
    fn ends(p: &ProcessImage) -> impl Iterator<Item = &TreeVeth> {
        p.own_net.iter().flat_map(|n| &n.tree_veths)
    }
    for p in procs {
        for v in ends(p) {
            let peer = procs.iter().find(|q| q.pid == v.peer_ns && q.pid != p.pid);
            let back = peer.map(|q| {
                ends(q)
                    .filter(|w| w.end.index == v.peer_index && w.peer_ns == p.pid)
                    .filter(|w| w.peer_index == v.end.index)
                    .count()
            });
            if back != Some(1) {
                return Err(format!(
                    "process {}: veth {} whose peer (index {} of process {}'s network \
                     namespace) is not recorded there once",
                    p.pid, v.end.name, v.peer_index, v.peer_ns
                ));
            }
        }
    }
    Ok(())
}

/// A TUN or TAP interface: made at a restore by the first of the tree's
/// files of it (`TUNSETIFINDEX`, `TUNSETIFF`, `TUNSETOWNER`,
/// `TUNSETGROUP`, `TUNSETPERSIST` if it was persistent; by a file of the
/// restore's own for a persistent one no file holds), then given its MAC
/// and MTU; the tree's other files attach to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TunDevice {
    pub name: String,
    /// Its interface index in the namespace.
    pub index: u32,
    /// A TAP interface (Ethernet frames), else a TUN one (IP packets).
    pub tap: bool,
    /// Packets carry no protocol information (`IFF_NO_PI`).
    pub no_pi: bool,
    /// Several files may attach to it (`IFF_MULTI_QUEUE`).
    pub multi_queue: bool,
    /// Packets carry a virtio-net header (`IFF_VNET_HDR`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub vnet_hdr: bool,
    /// It outlives its files (`TUNSETPERSIST`).
    pub persist: bool,
    /// The user and group allowed to attach to it, where set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<u32>,
    /// A TAP interface's MAC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<[u8; 6]>,
    pub mtu: u32,
    pub up: bool,
}

/// What a TUN/TAP interface with virtio-net headers (`IFF_VNET_HDR`)
/// puts before each packet and lets pass in one (the same for all its
/// files).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VnetHdr {
    /// The header's length (`TUNGETVNETHDRSZ`).
    pub size: i32,
    /// Its fields are little-endian whatever the machine (`TUNGETVNETLE`).
    pub little_endian: bool,
    /// Offloads (`TUN_F_*`, as `TUNSETOFFLOAD` takes them).
    pub offloads: u32,
}

impl VnetHdr {
    /// The offloads `TUNSETOFFLOAD` knows, and the features (as `ethtool
    /// -k` names them) each turns on; UDP segmentation is on only with
    /// both of its.
    pub const OFFLOADS: [(u32, &'static str); 6] = [
        (libc::TUN_F_CSUM, "tx-checksum-ip-generic"),
        (libc::TUN_F_TSO4, "tx-tcp-segmentation"),
        (libc::TUN_F_TSO6, "tx-tcp6-segmentation"),
        (libc::TUN_F_TSO_ECN, "tx-tcp-ecn-segmentation"),
        (libc::TUN_F_USO4, "tx-udp-segmentation"),
        (libc::TUN_F_USO6, "tx-udp-segmentation"),
    ];

    /// The offloads an interface with `features` on was given.
    pub fn offloads_of(features: &[String]) -> u32 {
        let on = |name: &str| features.iter().any(|f| f == name);
        // Without checksums the kernel keeps none of the others.
        if !on(Self::OFFLOADS[0].1) {
            return 0;
        }
        (Self::OFFLOADS.iter())
            .filter(|(_, name)| on(name))
            .fold(0, |all, (bit, _)| all | bit)
    }

    /// The header's length and the offloads are ones the kernel takes.
    pub fn valid(&self) -> bool {
        let known = Self::OFFLOADS.iter().fold(0, |all, (bit, _)| all | bit);
        (10..=4096).contains(&self.size) && self.offloads & !known == 0
    }
}

impl TunDevice {
    /// The flags `TUNSETIFF` makes or attaches to it with.
    pub fn flags(&self) -> u16 {
        let mut f = if self.tap {
            libc::IFF_TAP
        } else {
            libc::IFF_TUN
        };
        if self.no_pi {
            f |= libc::IFF_NO_PI;
        }
        if self.multi_queue {
            f |= libc::IFF_MULTI_QUEUE;
        }
        if self.vnet_hdr {
            f |= libc::IFF_VNET_HDR;
        }
        f as u16
    }

    /// Flags an open file of it may show: its own, `IFF_PERSIST`, and
    /// those a file sets for itself that the restore passes on
    /// (`IFF_ONE_QUEUE`, which does nothing).
    pub const FILE_FLAGS: u16 = (libc::IFF_TUN
        | libc::IFF_TAP
        | libc::IFF_NO_PI
        | libc::IFF_MULTI_QUEUE
        | libc::IFF_VNET_HDR
        | libc::IFF_PERSIST
        | libc::IFF_ONE_QUEUE) as u16;
}

/// The process that made the network namespace `p` is in, when the tree
/// made it: `p`, or its nearest ancestor that made one. `procs` are the
/// tree's processes.
pub fn net_maker<'a>(procs: &[&'a ProcessImage], p: &'a ProcessImage) -> Option<&'a ProcessImage> {
    let mut at = Some(p);
    for _ in 0..=procs.len() {
        let q = at?;
        if q.own_net.is_some() {
            return Some(q);
        }
        at = q
            .parent
            .and_then(|pid| procs.iter().find(|r| r.pid == pid).copied());
    }
    None
}

/// The TUN/TAP files of `files` the processes in the network namespace
/// process `maker` made hold.
pub fn tun_files_in<'a>(
    files: &'a [OpenFile],
    procs: &[&ProcessImage],
    maker: i32,
) -> Vec<&'a OpenFile> {
    let held_there = |id: usize| {
        procs.iter().any(|p| {
            p.fds.iter().any(|fd| fd.file == id)
                && net_maker(procs, p).is_some_and(|m| m.pid == maker)
        })
    };
    (files.iter())
        .filter(|f| matches!(f.kind, FileKind::Tun { .. }) && held_there(f.id))
        .collect()
}

/// Every TUN/TAP file is held only by processes in a network namespace
/// the tree made (`OwnNet`), which has its interface with the file's
/// flags: a restore attaches files to interfaces it made, never to one
/// of the host's. `procs` are the tree's processes.
pub fn check_tun_files(
    files: &[OpenFile],
    procs: &[&ProcessImage],
) -> std::result::Result<(), String> {
    for f in files {
        let FileKind::Tun {
            iface,
            flags,
            vnet,
            rdev,
            ..
        } = &f.kind
        else {
            continue;
        };
        // Opened by its path at a restore: the TUN/TAP device and no other
        // (a disk, a watchdog...) may be named.
        if *rdev != libc::makedev(10, 200) {
            return Err(format!(
                "TUN/TAP file {} names device {rdev:#x}, not /dev/net/tun's",
                f.id
            ));
        }
        if vnet.is_some() != (flags & libc::IFF_VNET_HDR as u16 != 0)
            || vnet.is_some_and(|v| !v.valid())
        {
            return Err(format!(
                "TUN/TAP file {} with virtio-net headers {vnet:?} and flags {flags:#x}",
                f.id
            ));
        }
        let mut maker = None;
        for p in procs
            .iter()
            .filter(|p| p.fds.iter().any(|fd| fd.file == f.id))
        {
            let made_by = net_maker(procs, p);
            let m = made_by.map(|m| m.pid);
            if maker.get_or_insert(m) != &m {
                return Err(format!(
                    "TUN/TAP file {} is held in two network namespaces",
                    f.id
                ));
            }
            let net = made_by.and_then(|m| m.own_net.as_ref());
            let found = net.and_then(|net| net.tuns.iter().find(|t| t.name == *iface));
            let Some(dev) = found else {
                return Err(format!(
                    "process {}: a TUN/TAP file of interface {iface:?}, which is not one of a \
                     network namespace the tree made",
                    p.pid
                ));
            };
            // `IFF_NO_PI`'s bit also says a file has no socket filter.
            let own = flags & !((libc::IFF_PERSIST | libc::IFF_ONE_QUEUE | libc::IFF_NO_PI) as u16);
            if flags & !TunDevice::FILE_FLAGS != 0
                || own != dev.flags() & !(libc::IFF_NO_PI as u16)
                || (flags & libc::IFF_PERSIST as u16 != 0) != dev.persist
            {
                return Err(format!(
                    "process {}: a TUN/TAP file of {iface} with flags {flags:#x}, not its \
                     interface's",
                    p.pid
                ));
            }
        }
    }
    // An interface's virtio-net header and offloads are read from a file
    // of it.
    for (p, net) in procs.iter().filter_map(|p| Some((p, p.own_net.as_ref()?))) {
        if !net.tuns.iter().any(|t| t.vnet_hdr) {
            continue;
        }
        let files = tun_files_in(files, procs, p.pid);
        for t in net.tuns.iter().filter(|t| t.vnet_hdr) {
            if !files
                .iter()
                .any(|f| matches!(&f.kind, FileKind::Tun { iface, .. } if *iface == t.name))
            {
                return Err(format!(
                    "process {}: TUN/TAP interface {} with virtio-net headers and no file of \
                     the tree's (its header and offloads are read from one)",
                    p.pid, t.name
                ));
            }
        }
    }
    Ok(())
}

/// A name the kernel takes for an interface, and no option of `ip`'s: up
/// to 15 letters, digits or `._-`, not starting with `-` or a dot.
pub fn interface_name_allowed(name: &str) -> bool {
    (1..16).contains(&name.len())
        && !name.starts_with(['-', '.'])
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// An address of an interface: `ip addr add ADDRESS/PREFIX dev DEV [label
/// LABEL] [scope SCOPE]` (with `nodad` for IPv6: it was past its duplicate
/// detection).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetAddress {
    #[serde(default = "loopback")]
    pub dev: String,
    pub address: std::net::IpAddr,
    pub prefix: u8,
    /// An IPv4 address's label when it is not the interface's name
    /// (`lo:1`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<RouteScope>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub broadcast: Option<std::net::IpAddr>,
    /// Flags given it (`noprefixroute`...), by `ip`'s names.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub flags: Vec<AddressFlag>,
    /// Seconds it had left to be valid and preferred, where not forever
    /// (given again as they were, so longer by the time the tree was
    /// down).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lifetimes: Option<(u32, u32)>,
}

/// A flag an address is given (`ip address add ... FLAG`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AddressFlag {
    /// No route is made for its prefix.
    NoPrefixRoute,
    /// A home address (mobile IPv6).
    Home,
    /// Not put through duplicate address detection.
    NoDad,
    /// Temporary addresses are made from it (IPv6 privacy).
    MngTmpAddr,
    /// A multicast group joined with it.
    AutoJoin,
}

impl AddressFlag {
    const NAMES: [(AddressFlag, &'static str); 5] = [
        (AddressFlag::NoPrefixRoute, "noprefixroute"),
        (AddressFlag::Home, "home"),
        (AddressFlag::NoDad, "nodad"),
        (AddressFlag::MngTmpAddr, "mngtmpaddr"),
        (AddressFlag::AutoJoin, "autojoin"),
    ];

    /// As `ip` names it.
    pub fn name(self) -> &'static str {
        Self::NAMES
            .iter()
            .find(|(f, _)| *f == self)
            .map_or("", |(_, n)| n)
    }

    pub fn from_name(name: &str) -> Option<AddressFlag> {
        Self::NAMES
            .iter()
            .find(|(_, n)| *n == name)
            .map(|(f, _)| *f)
    }
}

fn loopback() -> String {
    "lo".into()
}

impl NetAddress {
    /// A label the kernel takes for an address of `dev`: `DEV:` and
    /// letters, digits or `._-:`, 15 bytes in all.
    pub fn label_allowed(dev: &str, label: &str) -> bool {
        label.len() < 16
            && (label.strip_prefix(dev))
                .and_then(|r| r.strip_prefix(':'))
                .is_some_and(|rest| {
                    !rest.is_empty()
                        && rest
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b"._-:".contains(&b))
                })
    }
}

/// A route: `ip route add [KIND] DESTINATION [via GATEWAY] [dev DEV]
/// [metric METRIC] [scope SCOPE] [src SOURCE]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetRoute {
    pub kind: RouteKind,
    /// An address and its prefix length; `None`: the default route.
    pub destination: Option<(std::net::IpAddr, u8)>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<std::net::IpAddr>,
    /// The interface it goes through.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dev: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metric: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<RouteScope>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<std::net::IpAddr>,
    /// The routing table it is in; `None`: the main one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub table: Option<u32>,
    /// Who made it (`proto`: a routing daemon's name, or a number), where
    /// not `boot`, the default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    /// Its gateway is taken as on the link whatever its prefix (`onlink`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub onlink: bool,
    /// An IPv6 route's preference, where not medium: `low` or `high`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pref: Option<RoutePref>,
    /// A multipath route's next hops (it has no gateway or interface of
    /// its own then).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nexthops: Vec<NextHop>,
}

/// One next hop of a multipath route: `nexthop [via GATEWAY] [dev DEV]
/// weight WEIGHT [onlink]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NextHop {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<std::net::IpAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dev: Option<String>,
    /// Its share of the traffic, 1 to 256.
    pub weight: u16,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub onlink: bool,
}

/// An IPv6 route's preference other than the default, medium.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RoutePref {
    Low,
    High,
}

impl NetRoute {
    /// A protocol `ip route` takes as `proto`: a name of letters, digits
    /// and `_-.` (not starting with `-`), or a number.
    pub fn protocol_allowed(p: &str) -> bool {
        (1..32).contains(&p.len())
            && !p.starts_with('-')
            && p.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b))
    }
}

/// A routing rule (`ip rule`): packets that match every selector given
/// (or, with `not`, that do not) take `action`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetRule {
    pub ipv6: bool,
    pub priority: u32,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub not: bool,
    /// Source and destination: an address and its prefix length.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<(std::net::IpAddr, u8)>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<(std::net::IpAddr, u8)>,
    /// Interfaces packets come in and go out through.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iif: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oif: Option<String>,
    /// The firewall mark and its mask.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fwmark: Option<(u32, u32)>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tos: Option<u8>,
    /// The range of user ids of the sockets it applies to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uids: Option<(u32, u32)>,
    /// The IP protocol (as `ip` names it: `tcp`, or a number) and the
    /// ranges of source and destination ports it applies to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipproto: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sport: Option<(u16, u16)>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dport: Option<(u16, u16)>,
    /// Routes found with a prefix this long or shorter are not taken.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suppress_prefixlen: Option<u8>,
    pub action: RuleAction,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RuleAction {
    /// Look the route up in this table.
    Table(u32),
    /// Go on with the rules from this priority.
    Goto(u32),
    Blackhole,
    Unreachable,
    Prohibit,
}

/// The routing tables the kernel names (`rt_tables`).
pub const TABLE_DEFAULT: u32 = 253;
pub const TABLE_MAIN: u32 = 254;
pub const TABLE_LOCAL: u32 = 255;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RouteKind {
    Unicast,
    Blackhole,
    Unreachable,
    Prohibit,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RouteScope {
    Global,
    Link,
    Host,
}

impl RouteScope {
    /// As `ip` names it.
    pub fn name(self) -> &'static str {
        match self {
            RouteScope::Global => "global",
            RouteScope::Link => "link",
            RouteScope::Host => "host",
        }
    }

    /// The scope `ip` names `name` (`universe` is `global`'s other name).
    pub fn from_name(name: &str) -> Option<RouteScope> {
        Some(match name {
            "global" | "universe" => RouteScope::Global,
            "link" => RouteScope::Link,
            "host" => RouteScope::Host,
            _ => return None,
        })
    }
}

impl OwnNet {
    /// The settings of a network namespace's own that programs and their
    /// launchers change, kept with it (paths under /proc/sys); written at
    /// a restore where a new namespace's differ.
    pub const SYSCTLS: [&'static str; 22] = [
        "net/ipv6/conf/all/disable_ipv6",
        "net/ipv6/conf/default/disable_ipv6",
        "net/ipv4/ip_forward",
        "net/ipv4/conf/all/forwarding",
        "net/ipv4/conf/default/forwarding",
        "net/ipv6/conf/all/forwarding",
        "net/ipv6/conf/default/forwarding",
        "net/ipv4/conf/all/rp_filter",
        "net/ipv4/conf/default/rp_filter",
        "net/ipv4/ping_group_range",
        "net/ipv4/ip_unprivileged_port_start",
        "net/ipv4/ip_local_port_range",
        "net/ipv4/ip_default_ttl",
        "net/ipv4/icmp_echo_ignore_all",
        "net/core/somaxconn",
        "net/ipv4/tcp_syncookies",
        "net/ipv4/tcp_keepalive_time",
        "net/ipv4/tcp_keepalive_intvl",
        "net/ipv4/tcp_keepalive_probes",
        "net/ipv4/tcp_fin_timeout",
        "net/ipv4/tcp_tw_reuse",
        "net/ipv4/tcp_max_syn_backlog",
    ];

    /// Checks what an image says before a restore acts on it: prefixes in
    /// range for their family, and rules that read no file.
    pub fn check(&self) -> std::result::Result<(), String> {
        let fits = |a: &std::net::IpAddr, p: u8| p <= if a.is_ipv4() { 32 } else { 128 };
        let veth_end = |end: &VethEnd, devices: &[&str]| {
            if !interface_name_allowed(&end.name) || devices.contains(&end.name.as_str()) {
                return Err(format!("a veth named {:?}", end.name));
            }
            if !(68..=65535).contains(&end.mtu) || !(2..1 << 30).contains(&end.index) {
                return Err(format!(
                    "veth {} with MTU {} and index {}",
                    end.name, end.mtu, end.index
                ));
            }
            Ok(())
        };
        let mut devices = vec!["lo"];
        let inner = (self.veths.iter().flat_map(|(a, b)| [a, b]))
            .chain(self.host_veths.iter().map(|h| &h.end))
            .chain(self.tree_veths.iter().map(|v| &v.end));
        for end in inner {
            veth_end(end, &devices)?;
            devices.push(&end.name);
        }
        // Their peers are named in the restorer's namespace.
        let mut peers = Vec::new();
        for h in &self.host_veths {
            let peer = &h.peer;
            veth_end(peer, &peers)?;
            peers.push(&peer.name);
            if h.bridge
                .as_deref()
                .is_some_and(|b| !interface_name_allowed(b))
            {
                return Err(format!("veth {} in bridge {:?}", peer.name, h.bridge));
            }
            if let Some(a) = h.peer_addresses.iter().find(|a| {
                a.dev != peer.name
                    || !fits(&a.address, a.prefix)
                    || (a.label.as_deref()).is_some_and(|l| !NetAddress::label_allowed(&a.dev, l))
            }) {
                return Err(format!("address {}/{} on {:?}", a.address, a.prefix, a.dev));
            }
            if let Some(r) = h.peer_routes.iter().find(|r| {
                // A multipath route's next hops name their own devices:
                // none is made through the peer.
                r.destination.is_some_and(|(a, p)| !fits(&a, p))
                    || r.dev.as_deref() != Some(peer.name.as_str())
                    || !r.nexthops.is_empty()
                    || r.table.is_some_and(|t| t == 0 || t == TABLE_LOCAL)
                    || (r.protocol.as_deref()).is_some_and(|p| !NetRoute::protocol_allowed(p))
            }) {
                return Err(format!(
                    "a route to {:?} through {:?} in table {:?}",
                    r.destination, r.dev, r.table
                ));
            }
        }
        for t in &self.tuns {
            if !interface_name_allowed(&t.name) || devices.contains(&t.name.as_str()) {
                return Err(format!("a TUN/TAP interface named {:?}", t.name));
            }
            if !(68..=65535).contains(&t.mtu)
                || !(2..1 << 30).contains(&t.index)
                || [t.owner, t.group].contains(&Some(u32::MAX))
                || t.mac.is_some() != t.tap
            {
                return Err(format!(
                    "TUN/TAP interface {} with MTU {}, index {}, owner {:?}, group {:?} and \
                     MAC {:?}",
                    t.name, t.mtu, t.index, t.owner, t.group, t.mac
                ));
            }
            devices.push(&t.name);
        }
        let known = |d: &str| devices.contains(&d);
        if let Some(a) = self.addresses.iter().find(|a| {
            !known(&a.dev)
                || !fits(&a.address, a.prefix)
                || (a.label.as_deref()).is_some_and(|l| !NetAddress::label_allowed(&a.dev, l))
        }) {
            return Err(format!("address {}/{} on {:?}", a.address, a.prefix, a.dev));
        }
        // The local table is the kernel's; the main one is `None`.
        let table_ok = |t: u32| t != 0 && t != TABLE_MAIN && t != TABLE_LOCAL;
        for r in &self.routes {
            let v6 = r.destination.map(|(a, _)| a.is_ipv6());
            let hop_ok = |h: &NextHop| {
                (1..=256).contains(&h.weight)
                    && h.dev.as_deref().is_none_or(known)
                    && (h.gateway.is_some() || h.dev.is_some())
                    && h.gateway
                        .is_none_or(|g| v6.is_none_or(|v6| g.is_ipv6() == v6))
            };
            let multipath_ok = r.nexthops.is_empty()
                || (r.gateway.is_none() && r.dev.is_none() && r.nexthops.len() <= 64);
            if r.destination.is_some_and(|(a, p)| !fits(&a, p))
                || !multipath_ok
                || !r.nexthops.iter().all(hop_ok)
                || r.dev.as_deref().is_some_and(|d| !known(d))
                || r.table.is_some_and(|t| !table_ok(t))
                || (r.protocol.as_deref()).is_some_and(|p| !NetRoute::protocol_allowed(p))
            {
                return Err(format!(
                    "a route to {:?} through {:?} in table {:?}",
                    r.destination, r.dev, r.table
                ));
            }
        }
        for r in &self.rules {
            let family = |a: &(std::net::IpAddr, u8)| a.0.is_ipv6() == r.ipv6 && fits(&a.0, a.1);
            let range = |r: &Option<(u16, u16)>| r.is_none_or(|(a, b)| a <= b);
            let ok = r.from.as_ref().is_none_or(family)
                && r.uids.is_none_or(|(a, b)| a <= b && b != u32::MAX)
                && range(&r.sport)
                && range(&r.dport)
                && r.suppress_prefixlen.is_none_or(|l| l <= 128)
                && (r.ipproto.as_deref()).is_none_or(|p| {
                    (1..=16).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_alphanumeric())
                })
                && r.to.as_ref().is_none_or(family)
                && [&r.iif, &r.oif]
                    .iter()
                    .all(|d| d.as_deref().is_none_or(known))
                && match r.action {
                    // The kernel's rules are those of priorities 0, 32766
                    // and 32767 only: any table may be named.
                    RuleAction::Table(t) => t != 0,
                    RuleAction::Goto(p) => p > r.priority,
                    _ => true,
                };
            if !ok {
                return Err(format!("routing rule {} ({:?})", r.priority, r.action));
            }
        }
        if let Some((name, value)) = self.sysctls.iter().find(|(n, v)| {
            !Self::SYSCTLS.contains(&n.as_str())
                || v.len() > 64
                || !v
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b" \t-".contains(&b))
        }) {
            return Err(format!("setting {name:?} = {value:?}"));
        }
        // `nft -f` reads what `include` names (the word is refused
        // anywhere, a comment's too).
        if let Some(rules) = &self.nftables
            && rules
                .split(|c: char| !c.is_ascii_alphanumeric() && c != '_')
                .any(|w| w == "include")
        {
            return Err("nftables rules that include a file".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offloads_are_the_features_tunsetoffload_turns_on() {
        let on = |names: &[&str]| names.iter().map(|n| n.to_string()).collect::<Vec<_>>();
        let tso = on(&[
            "tx-checksum-ip-generic",
            "tx-tcp-segmentation",
            "tx-tcp6-segmentation",
            "rx-gro",
        ]);
        assert_eq!(
            VnetHdr::offloads_of(&tso),
            libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6
        );
        // Segmentation without checksums is not an offload a file gave.
        assert_eq!(VnetHdr::offloads_of(&on(&["tx-tcp-segmentation"])), 0);
        let uso = on(&["tx-checksum-ip-generic", "tx-udp-segmentation"]);
        assert_eq!(
            VnetHdr::offloads_of(&uso),
            libc::TUN_F_CSUM | libc::TUN_F_USO4 | libc::TUN_F_USO6
        );
        let v = VnetHdr {
            size: 12,
            little_endian: false,
            offloads: VnetHdr::offloads_of(&uso),
        };
        assert!(v.valid());
        assert!(!VnetHdr { size: 4, ..v }.valid());
        assert!(
            !VnetHdr {
                offloads: 1 << 20,
                ..v
            }
            .valid()
        );
    }
}
