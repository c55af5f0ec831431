//! Lab operations: up, down, status, exec, kill and revive.

use std::convert::Infallible;
use std::ffi::{CString, OsString};
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ipnet::Ipv4Net;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use rrc_cgroup::{Cgroup, Layout};
use rrc_container::state::{CgroupRecord, HostState, STATE_ROOT};
use rrc_net::NetNs;
use rrc_net::netns::NETNS_RUN_DIR;

use crate::ip::{ip, ip_in, link_exists};
use crate::plan::{BRIDGE, Host, LAN_IF, LabName, LabPlan, REPL_IF};
use crate::record::{self, LabRecord};
use crate::{Error, Result};
use crate::{arbiter, cut};

/// How long a host being killed may take to freeze.
const FREEZE_LIMIT: Duration = Duration::from_millis(500);
const CGROUP_TIMEOUT: Duration = Duration::from_secs(5);

pub struct Lab {
    rec: LabRecord,
}

/// What `rrc lab status` shows for one host.
#[derive(Debug, Clone, serde::Serialize)]
pub struct HostStatus {
    pub name: String,
    pub netns: String,
    /// Its namespace and links exist.
    pub present: bool,
    /// Killed and not revived.
    pub down: bool,
    pub lan_addr: Ipv4Net,
    pub repl_addr: Option<Ipv4Net>,
    pub processes: usize,
    pub containers: Vec<(String, String)>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct LabStatus {
    pub name: String,
    pub subnet: Ipv4Net,
    pub repl_subnet: Ipv4Net,
    pub vip: Ipv4Net,
    pub switch_present: bool,
    pub hosts: Vec<HostStatus>,
    /// The arbiter's endpoints, if the lab runs one.
    pub arbiter: Option<String>,
    /// Pairs of hosts cut from each other.
    pub cuts: Vec<(String, String)>,
}

#[derive(Debug, Clone)]
pub struct KillReport {
    pub killed: usize,
    pub took: Duration,
    pub already_down: bool,
}

fn netns_path(ns: &str) -> PathBuf {
    Path::new(NETNS_RUN_DIR).join(ns)
}

fn netns_exists(ns: &str) -> bool {
    netns_path(ns).exists()
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Creates a namespace with loopback up and IPv6 off, so the lab's links
/// carry only the IPv4 traffic the tests make (no router solicitations or
/// multicast listener reports on the wire).
fn add_netns(ns: &str) -> Result<()> {
    if !netns_exists(ns) {
        ip(&["netns", "add", ns])?;
    }
    NetNs::named(ns)?.run(|| {
        for f in ["all", "default", "lo"] {
            let _ = fs::write(format!("/proc/sys/net/ipv6/conf/{f}/disable_ipv6"), "1");
        }
    })?;
    ip_in(ns, &["link", "set", "lo", "up"])
}

/// Removes link `name` of namespace `ns` if it is there. The kernel may
/// remove it meanwhile (a veth goes when the namespace of its peer does,
/// a little after): gone is gone, however it went.
fn del_link(ns: &str, name: &str) -> Result<()> {
    if !link_exists(ns, name) {
        return Ok(());
    }
    match ip_in(ns, &["link", "del", name]) {
        Err(_) if !link_exists(ns, name) => Ok(()),
        r => r,
    }
}

fn del_netns(ns: &str) -> Result<()> {
    if netns_exists(ns) {
        ip(&["netns", "del", ns])?;
    }
    Ok(())
}

/// Processes whose network namespace is `ns`, found by inode (they may sit
/// outside the host's cgroup if started with `ip netns exec`).
pub(crate) fn processes_in_netns(ns: &str) -> Vec<Pid> {
    let Ok(meta) = fs::metadata(netns_path(ns)) else {
        return Vec::new();
    };
    let target = format!("net:[{}]", meta.ino());
    let me = std::process::id() as i32;
    let mut out = Vec::new();
    let Ok(rd) = fs::read_dir("/proc") else {
        return out;
    };
    for e in rd.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if pid == me {
            continue;
        }
        if let Ok(link) = fs::read_link(format!("/proc/{pid}/ns/net"))
            && link.as_os_str().as_bytes() == target.as_bytes()
        {
            out.push(Pid::from_raw(pid));
        }
    }
    out
}

impl Lab {
    pub fn open(name: &LabName) -> Result<Lab> {
        record::load(name)?
            .map(|rec| Lab { rec })
            .ok_or_else(|| Error::NoSuchLab(name.to_string()))
    }

    pub fn list() -> Result<Vec<Lab>> {
        Ok(record::list()?.into_iter().map(|rec| Lab { rec }).collect())
    }

    pub fn record(&self) -> &LabRecord {
        &self.rec
    }

    pub fn plan(&self) -> &LabPlan {
        &self.rec.plan
    }

    /// Builds the lab, or completes it if parts are missing; with
    /// `arbiter`, its arbiter hosts run an etcd cluster from then on.
    /// Returns the lab and whether anything had to be created.
    pub fn up(name: LabName, subnet: Option<Ipv4Net>, arbiter: bool) -> Result<(Lab, bool)> {
        rrc_container::probe::require_root("rrc lab")?;
        let _lock = record::lock(&name)?;
        let existing = record::load(&name)?;
        if let (Some(rec), Some(s)) = (&existing, subnet)
            && rec.plan.subnet != s
        {
            return Err(Error::SubnetMismatch {
                name: name.to_string(),
                existing: rec.plan.subnet.to_string(),
            });
        }
        let mut rec = match existing {
            Some(rec) => rec,
            None => {
                let plan = LabPlan::new(name.clone(), subnet)?;
                let layout = Layout::detect()?;
                let lab_cg = layout.create_below_self(Path::new(&format!("rrc-lab.{name}")))?;
                LabRecord {
                    plan,
                    cgroup: CgroupRecord::from_cgroup(&lab_cg),
                    hosts: Vec::new(),
                    created_unix: now_unix(),
                    arbiter: false,
                    cuts: Vec::new(),
                }
            }
        };
        rec.complete();
        rec.arbiter |= arbiter;
        // Saved first: a failure half-way leaves a record `down` can use.
        record::save(&rec)?;
        let mut created = false;
        let plan = rec.plan.clone();
        if !netns_exists(&plan.switch_netns()) || !link_exists(&plan.switch_netns(), BRIDGE) {
            // Without the switch every host's cable is gone too: rebuild all.
            for h in Host::ALL {
                kill_everything(&rec, h)?;
                del_netns(&plan.netns(h))?;
            }
            del_netns(&plan.switch_netns())?;
            add_netns(&plan.switch_netns())?;
            ip_in(
                &plan.switch_netns(),
                &["link", "add", BRIDGE, "type", "bridge"],
            )?;
            ip_in(&plan.switch_netns(), &["link", "set", BRIDGE, "up"])?;
            for h in Host::ALL {
                rec.host_mut(h).down = false;
            }
            created = true;
        }
        for h in Host::ALL {
            if !netns_exists(&plan.netns(h)) || !link_exists(&plan.netns(h), LAN_IF) {
                build_host(&mut rec, h)?;
                created = true;
            }
            rec.host(h).cgroup.to_cgroup().create()?;
        }
        if !link_exists(&plan.netns(Host::Primary), REPL_IF) {
            build_repl_link(&rec)?;
            created = true;
        }
        for h in Host::ALL {
            cut::apply_if_cut(&rec, h)?;
        }
        record::save(&rec)?;
        if rec.arbiter {
            for h in Host::ARBITERS {
                arbiter::start_member(&rec, h)?;
            }
            arbiter::wait_ready(&rec)?;
        }
        Ok((Lab { rec }, created))
    }

    /// The arbiter's endpoints, if the lab runs one.
    pub fn arbiter_endpoints(&self) -> Option<String> {
        self.rec.arbiter.then(|| self.rec.plan.arbiter_endpoints())
    }

    /// Cuts `a` from each of `others` (both ways, every address), or with
    /// `heal`, mends those cuts. Returns the cuts in force afterwards.
    pub fn cut(
        name: &LabName,
        a: Host,
        others: &[Host],
        heal: bool,
    ) -> Result<Vec<(String, String)>> {
        rrc_container::probe::require_root("rrc lab")?;
        let _lock = record::lock(name)?;
        let mut rec = record::load(name)?.ok_or_else(|| Error::NoSuchLab(name.to_string()))?;
        for &b in others {
            if a == b {
                return Err(Error::Invalid(format!("cannot cut {a} from itself")));
            }
            let pair = if a < b { (a, b) } else { (b, a) };
            let pair = (pair.0.name().to_string(), pair.1.name().to_string());
            rec.cuts.retain(|c| c != &pair);
            if !heal {
                rec.cuts.push(pair);
            }
        }
        record::save(&rec)?;
        for h in std::iter::once(a).chain(others.iter().copied()) {
            cut::apply(&rec, h)?;
        }
        Ok(rec.cuts)
    }

    /// Mends every cut of the lab.
    pub fn heal_all(name: &LabName) -> Result<()> {
        rrc_container::probe::require_root("rrc lab")?;
        let _lock = record::lock(name)?;
        let mut rec = record::load(name)?.ok_or_else(|| Error::NoSuchLab(name.to_string()))?;
        rec.cuts.clear();
        record::save(&rec)?;
        for h in Host::ALL {
            cut::apply(&rec, h)?;
        }
        Ok(())
    }

    /// Removes the lab completely: every process on its hosts, its
    /// namespaces, cgroups, state and containers' private roots. Works from
    /// whatever is left of a lab whose creation or removal was interrupted.
    /// Returns false if there was no such lab.
    pub fn down(name: &LabName) -> Result<bool> {
        rrc_container::probe::require_root("rrc lab")?;
        let _lock = record::lock(name)?;
        let rec = record::load(name)?;
        let plan = match &rec {
            Some(r) => r.plan.clone(),
            None => LabPlan::new(name.clone(), None)?,
        };
        let mut namespaces: Vec<String> = fs::read_dir(NETNS_RUN_DIR)
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.starts_with(&plan.netns_prefix()))
                    .collect()
            })
            .unwrap_or_default();
        if rec.is_none() && namespaces.is_empty() {
            return Ok(false);
        }
        if let Some(r) = &rec {
            for h in Host::ALL {
                kill_everything(r, h)?;
            }
        }
        for ns in &namespaces {
            for pid in processes_in_netns(ns) {
                let _ = kill(pid, Signal::SIGKILL);
            }
        }
        // Hosts before the switch, so each veth goes with its host.
        namespaces.sort_by_key(|n| n == &plan.switch_netns());
        for ns in &namespaces {
            wait_netns_empty(ns, CGROUP_TIMEOUT);
            del_netns(ns)?;
            let _ = fs::remove_dir_all(Path::new(STATE_ROOT).join("hosts").join(ns));
        }
        if let Some(r) = &rec {
            let cg = r.cgroup.to_cgroup();
            cg.kill_all(CGROUP_TIMEOUT)?;
            cg.remove(CGROUP_TIMEOUT)?;
        }
        arbiter::forget(&plan);
        // What the lab's containers kept in their private roots for
        // restores on the lab's hosts, which are gone.
        let _ = fs::remove_dir_all(rrc_container::rootfs::lab_roots(name.as_str()));
        record::remove(name)?;
        Ok(true)
    }

    pub fn status(&self) -> Result<LabStatus> {
        let plan = &self.rec.plan;
        let mut hosts = Vec::new();
        for h in Host::ALL {
            let r = self.rec.host(h);
            let present = netns_exists(&r.netns) && link_exists(&r.netns, LAN_IF);
            let mut procs = r.cgroup.to_cgroup().processes()?;
            procs.extend(processes_in_netns(&r.netns));
            procs.sort();
            procs.dedup();
            let containers = HostState::for_host(&r.netns)
                .list()
                .unwrap_or_default()
                .into_iter()
                .map(|(c, st)| (c.name.to_string(), st.to_string()))
                .collect();
            hosts.push(HostStatus {
                name: r.name.clone(),
                netns: r.netns.clone(),
                present,
                down: r.down,
                lan_addr: r.lan_addr,
                repl_addr: r.repl_addr,
                processes: procs.len(),
                containers,
            });
        }
        Ok(LabStatus {
            name: plan.name.to_string(),
            subnet: plan.subnet,
            repl_subnet: plan.repl_subnet,
            vip: plan.vip(),
            switch_present: netns_exists(&plan.switch_netns()),
            hosts,
            arbiter: self.arbiter_endpoints(),
            cuts: self.rec.cuts.clone(),
        })
    }

    /// Replaces the calling process with `argv` running on `host`: inside its
    /// network namespace and its cgroup.
    ///
    /// Must be called while the process has a single thread.
    pub fn exec(&self, host: Host, argv: &[OsString]) -> Result<Infallible> {
        let r = self.rec.host(host);
        if r.down {
            return Err(Error::HostDown {
                lab: self.rec.plan.name.to_string(),
                host: host.to_string(),
            });
        }
        let command = argv
            .first()
            .map(|a| a.to_string_lossy().into_owned())
            .unwrap_or_default();
        let fail = |source: nix::Error| Error::Exec {
            host: host.to_string(),
            command: command.clone(),
            source,
        };
        let program = rrc_container::spec::resolve_command(
            argv.first().map(|a| a.as_os_str()).unwrap_or_default(),
            std::env::var_os("PATH").as_deref(),
        )?;
        // Unlike `ip netns exec`, /sys is left as it is: a fresh sysfs would
        // hide the cgroup mounts that rrc (and the host's containers) need.
        NetNs::named(&r.netns)?.enter()?;
        r.cgroup.to_cgroup().add_process(Pid::this())?;
        let mut env: Vec<CString> = std::env::vars_os()
            .filter(|(k, _)| k != "RRC_LAB" && k != "RRC_HOST")
            .filter_map(|(k, v)| {
                let mut kv = k.as_bytes().to_vec();
                kv.push(b'=');
                kv.extend_from_slice(v.as_bytes());
                CString::new(kv).ok()
            })
            .collect();
        env.push(CString::new(format!("RRC_LAB={}", self.rec.plan.name)).expect("no NUL"));
        env.push(CString::new(format!("RRC_HOST={host}")).expect("no NUL"));
        let args: Vec<CString> = argv
            .iter()
            .map(|a| CString::new(a.as_bytes()))
            .collect::<std::result::Result<_, _>>()
            .map_err(|_| Error::Invalid("an argument contains a NUL byte".into()))?;
        let prog = CString::new(program.as_os_str().as_bytes())
            .map_err(|_| Error::Invalid("program path contains a NUL byte".into()))?;
        Err(fail(nix::unistd::execve(&prog, &args, &env).unwrap_err()))
    }

    /// Fail-stops `host` as if its power were cut: its processes are frozen
    /// at once, its links go down, then everything on it is killed.
    pub fn kill(name: &LabName, host: Host) -> Result<KillReport> {
        rrc_container::probe::require_root("rrc lab")?;
        let _lock = record::lock(name)?;
        let mut rec = record::load(name)?.ok_or_else(|| Error::NoSuchLab(name.to_string()))?;
        let start = Instant::now();
        if rec.host(host).down {
            return Ok(KillReport {
                killed: 0,
                took: start.elapsed(),
                already_down: true,
            });
        }
        let r = rec.host(host).clone();
        let cg = r.cgroup.to_cgroup();
        if cg.processes()?.contains(&Pid::this()) {
            return Err(Error::Invalid(format!(
                "this command runs on {host}; kill it from outside the host"
            )));
        }
        let before = {
            let mut p = cg.processes()?;
            p.extend(processes_in_netns(&r.netns));
            p.sort();
            p.dedup();
            p.len()
        };
        // Frozen, so that nothing on the host can react to what follows.
        // A group that does not freeze soon (a task stopped under ptrace by
        // a tracer that froze first can hold it in FREEZING) has its
        // cables cut and its tasks killed all the same.
        if cg.exists()
            && let Err(e) = cg.freeze(FREEZE_LIMIT)
        {
            tracing::warn!(host = %host, error = %e, "the host did not freeze; killing it as it is");
        }
        // Cables out while nothing on the host can react.
        let plan = &rec.plan;
        let _ = ip_in(&plan.switch_netns(), &["link", "set", host.name(), "down"]);
        let _ = ip_in(&r.netns, &["link", "set", LAN_IF, "down"]);
        if r.repl_addr.is_some() {
            let _ = ip_in(&r.netns, &["link", "set", REPL_IF, "down"]);
        }
        kill_everything(&rec, host)?;
        rec.host_mut(host).down = true;
        record::save(&rec)?;
        Ok(KillReport {
            killed: before,
            took: start.elapsed(),
            already_down: false,
        })
    }

    /// Brings a killed host back, empty: a fresh namespace with its links
    /// and addresses, no processes, no containers.
    pub fn revive(name: &LabName, host: Host) -> Result<()> {
        rrc_container::probe::require_root("rrc lab")?;
        let _lock = record::lock(name)?;
        let mut rec = record::load(name)?.ok_or_else(|| Error::NoSuchLab(name.to_string()))?;
        if !rec.host(host).down {
            return Err(Error::Invalid(format!(
                "host {host} of lab {name} is up; only a killed host can be revived (`rrc lab kill {host}` first)"
            )));
        }
        kill_everything(&rec, host)?;
        rec.host_mut(host).down = false;
        build_host(&mut rec, host)?;
        if host.has_repl_link() {
            build_repl_link(&rec)?;
        }
        cut::apply_if_cut(&rec, host)?;
        record::save(&rec)?;
        if rec.arbiter && Host::ARBITERS.contains(&host) {
            arbiter::start_member(&rec, host)?;
        }
        Ok(())
    }
}

/// Kills every process of `host` (its cgroup tree and anything else in its
/// namespace) and waits until they are gone.
fn kill_everything(rec: &LabRecord, host: Host) -> Result<()> {
    let r = rec.host(host);
    let cg: Cgroup = r.cgroup.to_cgroup();
    cg.kill_all(CGROUP_TIMEOUT)?;
    let deadline = Instant::now() + CGROUP_TIMEOUT;
    loop {
        let left = processes_in_netns(&r.netns);
        if left.is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(Error::Survivors {
                host: host.to_string(),
                pids: left.iter().map(|p| p.as_raw()).collect(),
            });
        }
        for pid in left {
            let _ = kill(pid, Signal::SIGKILL);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn wait_netns_empty(ns: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while !processes_in_netns(ns).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// (Re)creates `host` from scratch: namespace, LAN cable to the switch,
/// address, an empty cgroup and no container state.
fn build_host(rec: &mut LabRecord, host: Host) -> Result<()> {
    let plan = rec.plan.clone();
    let r = rec.host(host).clone();
    del_netns(&r.netns)?;
    let _ = fs::remove_dir_all(HostState::for_host(&r.netns).dir());
    let cg = r.cgroup.to_cgroup();
    if cg.exists() {
        cg.kill_all(CGROUP_TIMEOUT)?;
        cg.remove(CGROUP_TIMEOUT)?;
    }
    cg.create()?;
    add_netns(&r.netns)?;
    let sw = plan.switch_netns();
    del_link(&sw, host.name())?;
    ip(&[
        "link",
        "add",
        LAN_IF,
        "netns",
        &r.netns,
        "type",
        "veth",
        "peer",
        "name",
        host.name(),
        "netns",
        &sw,
    ])?;
    ip_in(&sw, &["link", "set", host.name(), "master", BRIDGE, "up"])?;
    ip_in(
        &r.netns,
        &["addr", "add", &r.lan_addr.to_string(), "dev", LAN_IF],
    )?;
    ip_in(&r.netns, &["link", "set", LAN_IF, "up"])?;
    Ok(())
}

/// The direct link between primary and backup; an end whose host is down
/// stays down.
fn build_repl_link(rec: &LabRecord) -> Result<()> {
    let p = rec.host(Host::Primary);
    let b = rec.host(Host::Backup);
    if !netns_exists(&p.netns) || !netns_exists(&b.netns) {
        return Ok(());
    }
    del_link(&p.netns, REPL_IF)?;
    del_link(&b.netns, REPL_IF)?;
    ip(&[
        "link", "add", REPL_IF, "netns", &p.netns, "type", "veth", "peer", "name", REPL_IF,
        "netns", &b.netns,
    ])?;
    for r in [p, b] {
        let addr = r
            .repl_addr
            .expect("primary and backup have one")
            .to_string();
        ip_in(&r.netns, &["addr", "add", &addr, "dev", REPL_IF])?;
        if !r.down {
            ip_in(&r.netns, &["link", "set", REPL_IF, "up"])?;
        }
    }
    Ok(())
}
