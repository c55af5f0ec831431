//! The lab's arbiter: a three-member etcd cluster, one member on each
//! arbiter host, so that losing one changes nothing (two are a quorum).
//!
//! Members keep their data outside their host's state, which a revive
//! wipes: a revived arbiter host starts its member again on the data it
//! had, and the member rejoins the cluster as it would after a reboot.

use std::fs::{self, File};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::unistd::Pid;

use crate::plan::{Host, LabPlan};
use crate::record::{self, LabRecord};
use crate::{Error, Result};

/// How long a new cluster may take to answer.
const READY_LIMIT: Duration = Duration::from_secs(60);

/// Where member `host` keeps its data and its log.
fn member_dir(plan: &LabPlan, host: Host) -> PathBuf {
    record::labs_dir()
        .join(format!("{}.arbiter", plan.name))
        .join(host.name())
}

/// Removes every member's data (the lab is going down).
pub fn forget(plan: &LabPlan) {
    let _ = fs::remove_dir_all(record::labs_dir().join(format!("{}.arbiter", plan.name)));
}

/// Whether `host` runs its member now.
fn running(rec: &LabRecord, host: Host) -> bool {
    let r = rec.host(host);
    crate::lab::processes_in_netns(&r.netns)
        .iter()
        .any(|p| fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.trim() == "etcd"))
}

/// Starts the member of `host` if it is up and does not run one.
pub fn start_member(rec: &LabRecord, host: Host) -> Result<()> {
    let r = rec.host(host);
    if r.down || running(rec, host) {
        return Ok(());
    }
    let plan = &rec.plan;
    let members = plan.arbiter_members();
    let me = members
        .iter()
        .find(|m| m.name == host.name())
        .ok_or_else(|| Error::Invalid(format!("{host} is not an arbiter host")))?;
    let dir = member_dir(plan, host);
    fs::create_dir_all(&dir).map_err(|e| Error::State {
        path: dir.clone(),
        source: e,
    })?;
    let log_path = dir.join("etcd.log");
    let log = File::create(&log_path).map_err(|e| Error::State {
        path: log_path.clone(),
        source: e,
    })?;
    let token = format!("rrc-lab-{}", plan.name);
    let etcd = rrc_arbiter::etcd::member_command(me, &members, &token, &dir.join("data"));
    let mut c = Command::new("ip");
    c.args(["netns", "exec", &r.netns])
        .arg(etcd.get_program())
        .args(etcd.get_args())
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(|e| Error::State {
            path: log_path.clone(),
            source: e,
        })?)
        .stderr(log);
    // Its own process group: a signal to whoever started the lab does not
    // reach it.
    std::os::unix::process::CommandExt::process_group(&mut c, 0);
    let child = c.spawn().map_err(|e| {
        Error::Invalid(format!(
            "cannot start etcd on {host} (scripts/setup installs etcd-server): {e}"
        ))
    })?;
    r.cgroup
        .to_cgroup()
        .add_process(Pid::from_raw(child.id() as i32))?;
    Ok(())
}

/// Waits until the cluster answers from the client host (a quorum is up).
pub fn wait_ready(rec: &LabRecord) -> Result<()> {
    let plan = &rec.plan;
    let client = rec.host(Host::Client);
    let endpoints = plan.arbiter_endpoints();
    let t0 = Instant::now();
    loop {
        let ok = Command::new("ip")
            .args(["netns", "exec", &client.netns, "etcdctl"])
            .args(["--endpoints", &endpoints, "--command-timeout=2s"])
            .args(["get", "/rrc/ready"])
            .env("ETCDCTL_API", "3")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            return Ok(());
        }
        if t0.elapsed() > READY_LIMIT {
            return Err(Error::Invalid(format!(
                "the lab's arbiter ({endpoints}) did not answer within {} s; its members' logs are in {}",
                READY_LIMIT.as_secs(),
                member_dir(plan, Host::Arb1)
                    .parent()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default()
            )));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
