//! A lab brought up for one benchmark, demo or test, and taken down again
//! however that ends.

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use ipnet::Ipv4Net;
use rrc_lab::{Host, Lab, LabName, LabPlan};
use rrc_net::NetNs;

pub struct LabSession {
    plan: LabPlan,
    rrc: PathBuf,
    children: Vec<Child>,
    arbiter: Option<String>,
}

impl LabSession {
    /// Brings up lab `name` (taking down a leftover of the same name first)
    /// and drives it with the `rrc` binary at `rrc`.
    pub fn start(rrc: &Path, name: &str, subnet: Option<Ipv4Net>) -> Result<LabSession> {
        Self::start_with(rrc, name, subnet, false)
    }

    /// The same, with the lab's arbiter (an etcd cluster of three) running.
    pub fn start_with_arbiter(
        rrc: &Path,
        name: &str,
        subnet: Option<Ipv4Net>,
    ) -> Result<LabSession> {
        Self::start_with(rrc, name, subnet, true)
    }

    fn start_with(
        rrc: &Path,
        name: &str,
        subnet: Option<Ipv4Net>,
        arbiter: bool,
    ) -> Result<LabSession> {
        let name: LabName = name.parse()?;
        Lab::down(&name)?;
        let (lab, _) = Lab::up(name, subnet, arbiter)?;
        Ok(LabSession {
            plan: lab.plan().clone(),
            rrc: rrc.to_path_buf(),
            children: Vec::new(),
            arbiter: lab.arbiter_endpoints(),
        })
    }

    /// The arbiter's endpoints, if the lab runs one.
    pub fn arbiter(&self) -> Option<&str> {
        self.arbiter.as_deref()
    }

    /// Cuts `host` from each of `others` (`rrc lab cut`).
    pub fn cut(&self, host: Host, others: &[Host]) -> Result<()> {
        Lab::cut(&self.plan.name, host, others, false)?;
        Ok(())
    }

    /// Mends the cuts between `host` and `others` (`rrc lab heal`).
    pub fn heal(&self, host: Host, others: &[Host]) -> Result<()> {
        Lab::cut(&self.plan.name, host, others, true)?;
        Ok(())
    }

    pub fn plan(&self) -> &LabPlan {
        &self.plan
    }

    /// The `rrc` binary driving the lab.
    pub fn rrc_path(&self) -> String {
        self.rrc.display().to_string()
    }

    /// Cuts `host`'s power (`rrc lab kill`).
    pub fn kill(&self, host: Host) -> Result<()> {
        Lab::kill(&self.plan.name, host)?;
        Ok(())
    }

    /// Brings a killed `host` back, empty (`rrc lab revive`).
    pub fn revive(&self, host: Host) -> Result<()> {
        Lab::revive(&self.plan.name, host)?;
        Ok(())
    }

    /// `rrc lab exec --lab NAME HOST -- ARGV...`, not yet started.
    pub fn command_on(&self, host: Host, argv: &[&str]) -> Command {
        let mut c = Command::new(&self.rrc);
        c.args([
            "lab",
            "exec",
            "--lab",
            self.plan.name.as_str(),
            host.name(),
            "--",
        ])
        .args(argv);
        c
    }

    /// The words that prefix a command to run it on `host`.
    pub fn launcher(&self, host: Host) -> Vec<String> {
        vec![
            self.rrc.display().to_string(),
            "lab".into(),
            "exec".into(),
            "--lab".into(),
            self.plan.name.to_string(),
            host.name().into(),
            "--".into(),
        ]
    }

    /// Runs `argv` on `host` to completion; fails with its stderr if it fails.
    pub fn run_on(&self, host: Host, argv: &[&str]) -> Result<String> {
        let out = self
            .command_on(host, argv)
            .output()
            .with_context(|| format!("cannot run {argv:?} on {host}"))?;
        if !out.status.success() {
            bail!(
                "{argv:?} on {host} failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Starts `argv` on `host` in the background; it is killed with the lab.
    pub fn spawn_on(&mut self, host: Host, argv: &[&str]) -> Result<()> {
        let child = self
            .command_on(host, argv)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("cannot start {argv:?} on {host}"))?;
        self.children.push(child);
        Ok(())
    }

    /// Starts a container `name` at `addr` on `host` (`rrc run --detach`).
    pub fn run_container(&self, host: Host, name: &str, addr: Ipv4Net, cmd: &[&str]) -> Result<()> {
        self.run_container_with(host, name, addr, &[], cmd)
    }

    /// As [`LabSession::run_container`], with extra `rrc run` options.
    pub fn run_container_with(
        &self,
        host: Host,
        name: &str,
        addr: Ipv4Net,
        options: &[&str],
        cmd: &[&str],
    ) -> Result<()> {
        let addr = addr.to_string();
        let rrc = self.rrc.display().to_string();
        let mut argv = vec![
            rrc.as_str(),
            "run",
            "--detach",
            "--name",
            name,
            "--addr",
            &addr,
        ];
        argv.extend_from_slice(options);
        argv.push("--");
        argv.extend_from_slice(cmd);
        self.run_on(host, &argv).map(|_| ())
    }

    /// Runs `f` on a thread inside `host`'s network namespace: sockets it
    /// opens belong to that host.
    pub fn in_host<T: Send>(&self, host: Host, f: impl FnOnce() -> T + Send) -> Result<T> {
        Ok(NetNs::named(&self.plan.netns(host))?.run(f)?)
    }

    /// Waits until `addr` accepts TCP connections from `from`.
    pub fn wait_tcp(&self, from: Host, addr: SocketAddr, timeout: Duration) -> Result<()> {
        let ok = self.in_host(from, || {
            let deadline = Instant::now() + timeout;
            loop {
                if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                    return true;
                }
                if Instant::now() > deadline {
                    return false;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })?;
        if !ok {
            bail!("{addr} does not accept connections from {from} after {timeout:?}");
        }
        Ok(())
    }
}

impl Drop for LabSession {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Err(e) = Lab::down(&self.plan.name) {
            eprintln!("rrc: lab {} not fully removed: {e}", self.plan.name);
        }
    }
}
