//! A replicated service in the lab, and its failures: `rrc backup` on the
//! `backup` host, `rrc primary` with the application on `primary`,
//! verifying clients on `client` through the service address, the primary
//! host killed at a random moment. Shared by `rrc bench failover`, the demo
//! and the tests.

use std::fs;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use rrc_lab::Host;
use serde::Serialize;

use crate::session::LabSession;
use crate::verify::{self, Service};

/// An application the lab can replicate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum App {
    Redis,
    Memcached,
    Lighttpd,
    Tarantool,
}

impl App {
    pub fn name(self) -> &'static str {
        match self {
            App::Redis => "redis",
            App::Memcached => "memcached",
            App::Lighttpd => "lighttpd",
            App::Tarantool => "tarantool",
        }
    }

    /// Its command line; the files it needs (Lighttpd's configuration and
    /// documents, Tarantool's script) are written first, in a directory of
    /// this process's that every lab host sees.
    pub fn command(self) -> Result<Vec<String>> {
        let owned = |v: &[&str]| v.iter().map(|s| s.to_string()).collect();
        Ok(match self {
            App::Redis => owned(&[
                "redis-server",
                "--protected-mode",
                "no",
                "--save",
                "",
                "--appendonly",
                "no",
            ]),
            App::Memcached => owned(&["memcached", "-u", "root", "-t", "4"]),
            App::Lighttpd => {
                let dir = self.files_dir()?;
                for n in 0..50 {
                    let f = dir.join(format!("f{n}.txt"));
                    fs::write(&f, verify::http_body(n))
                        .with_context(|| format!("writing {}", f.display()))?;
                }
                let conf = dir.join("lighttpd.conf");
                fs::write(
                    &conf,
                    format!(
                        "server.document-root = \"{d}\"\nserver.port = 80\nserver.max-keep-alive-requests = 1000000\nserver.max-keep-alive-idle = 300\nserver.errorlog = \"{d}/error.log\"\n",
                        d = dir.display()
                    ),
                )
                .with_context(|| format!("writing {}", conf.display()))?;
                vec!["lighttpd".into(), "-D".into(), "-f".into(), path_str(&conf)]
            }
            App::Tarantool => {
                let dir = self.files_dir()?;
                let init = dir.join("init.lua");
                fs::write(
                    &init,
                    format!(
                        "box.cfg{{listen = nil, work_dir = '{d}', wal_mode = 'none', memtx_memory = 64 * 1024 * 1024, log = '{d}/tarantool.log'}}\n\
                         box.schema.space.create('kv', {{if_not_exists = true}})\n\
                         box.space.kv:create_index('primary', {{parts = {{1, 'string'}}, if_not_exists = true}})\n\
                         require('console').listen('0.0.0.0:3302')\n",
                        d = dir.display()
                    ),
                )
                .with_context(|| format!("writing {}", init.display()))?;
                vec!["tarantool".into(), path_str(&init)]
            }
        })
    }

    /// [`App::command`] as the lab's runners take it.
    pub fn argv(command: &[String]) -> Vec<&str> {
        command.iter().map(String::as_str).collect()
    }

    /// The `rrc run` (and `rrc primary`) options it needs besides its
    /// command: the directory of its files (configuration, documents,
    /// data) shared into its private root at its own path.
    pub fn root_options(self) -> Result<Vec<String>> {
        Ok(match self {
            App::Lighttpd | App::Tarantool => {
                vec!["--share".into(), path_str(&self.files_dir()?)]
            }
            App::Redis | App::Memcached => Vec::new(),
        })
    }

    /// Where its files go.
    fn files_dir(self) -> Result<PathBuf> {
        let dir =
            std::env::temp_dir().join(format!("rrc-app-{}-{}", self.name(), std::process::id()));
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(dir)
    }

    pub fn port(self) -> u16 {
        match self {
            App::Redis => 6379,
            App::Memcached => 11211,
            App::Lighttpd => 80,
            App::Tarantool => 3302,
        }
    }

    pub fn service(self) -> Service {
        match self {
            App::Redis => Service::Redis,
            App::Memcached => Service::Memcached,
            App::Lighttpd => Service::Http,
            App::Tarantool => Service::Tarantool,
        }
    }

    /// Where clients on the lab's `client` host reach it: the service
    /// address.
    pub fn target(self, lab: &LabSession) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(lab.plan().vip().addr()), self.port())
    }

    /// Runs it as a container (named after it, at the service address, with
    /// extra `rrc run` options) on the primary host, and waits until clients
    /// reach it; where they do.
    pub fn start(self, lab: &LabSession, options: &[&str]) -> Result<SocketAddr> {
        let command = self.command()?;
        let root_options = self.root_options()?;
        let mut all = App::argv(&root_options);
        all.extend_from_slice(options);
        lab.run_container_with(
            Host::Primary,
            self.name(),
            lab.plan().vip(),
            &all,
            &App::argv(&command),
        )?;
        let target = self.target(lab);
        lab.wait_tcp(Host::Client, target, Duration::from_secs(10))?;
        Ok(target)
    }
}

/// How the primary replicates (`rrc primary --mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Mode {
    /// Replies wait for the next committed checkpoint.
    Checkpoint,
    /// The program is recorded and its log streamed to the backup.
    Responsive,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Checkpoint => "checkpoint",
            Mode::Responsive => "responsive",
        }
    }
}

pub use rrc_replica::takeover::Pages;

/// How the pair is set up.
#[derive(Debug, Clone)]
pub struct PairOptions {
    pub epoch: Duration,
    /// The backup's failure-detection timeout. By default twice the
    /// product's (`rrc_replica::DEFAULT_TIMEOUT`), heartbeats as often as
    /// the product's were before (50 ms): the tests run many pairs at once
    /// on two CPUs, where a correct test must not see a false takeover.
    pub timeout: Duration,
    /// How often the primary's idle link says it is alive.
    pub heartbeat: Duration,
    pub mode: Mode,
    /// Responsive mode: replies wait for the next committed checkpoint
    /// (`--release commit`, for comparison) instead of leaving once the
    /// backup holds their log.
    pub release_at_commit: bool,
    /// Tests of the fallback only: the backup's replay diverges at its
    /// first record.
    pub inject_divergence: bool,
    /// The arbiter both sides ask (etcd endpoints); without one the
    /// primary runs with `--allow-split-brain` and the backup fences it
    /// by killing its lab host.
    pub arbiter: Option<String>,
    /// Both sides serve metrics on their LAN address, port
    /// [`METRICS_PORT`].
    pub metrics: bool,
    /// After a takeover the new primary replicates to a backup on the old
    /// primary's host (`rrc backup --then-protect-to`).
    pub then_protect: bool,
    /// The backup serves any number of primaries and goes on after a
    /// takeover (`rrc backup --keep-serving`).
    pub keep_serving: bool,
    /// Each host proves an identity of its own on the link (`rrc keygen
    /// --identity`): the backup lists the primary's host for the service,
    /// the primary the backup's host.
    pub identities: bool,
    /// How a takeover brings the memory in.
    pub pages: Pages,
}

/// The port of the pair's metrics endpoints, with `metrics`.
pub const METRICS_PORT: u16 = 9470;

impl Default for PairOptions {
    fn default() -> Self {
        PairOptions {
            epoch: Duration::from_millis(100),
            timeout: Duration::from_millis(200),
            heartbeat: Duration::from_millis(50),
            mode: Mode::Checkpoint,
            release_at_commit: false,
            inject_divergence: false,
            arbiter: None,
            metrics: false,
            then_protect: false,
            keep_serving: false,
            identities: false,
            pages: Pages::Auto,
        }
    }
}

/// What the backup said about its takeover.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TakeoverLine {
    pub epoch: u64,
    pub silent_ms: f64,
    /// The claim of the service from the arbiter (0 without one).
    pub arbiter_ms: f64,
    pub fence_ms: f64,
    /// From the decision to the service running again (in responsive
    /// mode: restore, replay and the connections).
    pub restore_ms: f64,
    /// Responsive mode: how the replay went, if it went live.
    pub replay: Option<ReplayLine>,
    /// Responsive mode: why the replay failed, if it did (the backup fell
    /// back to the checkpoint).
    pub fallback: Option<String>,
}

/// The backup's "replayed the log" line.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ReplayLine {
    pub restore_ms: f64,
    pub replay_ms: f64,
    pub connections_ms: f64,
    pub carried: u64,
    pub accepted: u64,
    pub closed: u64,
    pub unaccepted: u64,
}

/// The numbers of a line, in order.
fn numbers(line: &str) -> Vec<f64> {
    line.split(|c: char| !(c.is_ascii_digit() || c == '.'))
        .filter(|w| !w.is_empty() && *w != ".")
        .filter_map(|w| w.parse().ok())
        .collect()
}

impl TakeoverLine {
    /// Parses "took over from checkpoint N: primary silent X ms, arbiter
    /// A ms, fence Y ms, restore Z ms", and the replay's or the
    /// fallback's line.
    pub fn parse(out: &str) -> Option<TakeoverLine> {
        let line = out.lines().find(|l| l.starts_with("took over from"))?;
        let [epoch, silent, arbiter, fence, restore] = numbers(line)[..] else {
            return None;
        };
        let replay = out
            .lines()
            .find(|l| l.starts_with("replayed the log:"))
            .and_then(|l| match numbers(l)[..] {
                [
                    restore_ms,
                    replay_ms,
                    connections_ms,
                    carried,
                    accepted,
                    closed,
                    unaccepted,
                    ..,
                ] => Some(ReplayLine {
                    restore_ms,
                    replay_ms,
                    connections_ms,
                    carried: carried as u64,
                    accepted: accepted as u64,
                    closed: closed as u64,
                    unaccepted: unaccepted as u64,
                }),
                _ => None,
            });
        let fallback = out
            .lines()
            .find_map(|l| l.strip_prefix("FALLBACK: "))
            .map(str::to_string);
        Some(TakeoverLine {
            epoch: epoch as u64,
            silent_ms: silent,
            arbiter_ms: arbiter,
            fence_ms: fence,
            restore_ms: restore,
            replay,
            fallback,
        })
    }

    /// For a report: the takeover's steps.
    pub fn describe(&self) -> String {
        let mut s = format!(
            "the backup took over from checkpoint {}: primary silent {:.0} ms, arbiter {:.1} ms, fence {:.0} ms",
            self.epoch, self.silent_ms, self.arbiter_ms, self.fence_ms
        );
        match (&self.replay, &self.fallback) {
            (Some(r), _) => {
                s += &format!(
                    ", restore {:.0} ms, replay of the log {:.0} ms, {} connection(s) rebuilt in {:.1} ms ({} accepted since the checkpoint)",
                    r.restore_ms,
                    r.replay_ms,
                    r.carried + r.accepted,
                    r.connections_ms,
                    r.accepted
                );
                if r.unaccepted > 0 {
                    s += &format!(", {} not yet accepted reset", r.unaccepted);
                }
            }
            (None, Some(why)) => s += &format!("; FALLBACK: {why}"),
            (None, None) => s += &format!(", restore {:.0} ms", self.restore_ms),
        }
        s
    }
}

/// A primary and a backup of one application in a lab.
pub struct Pair<'a> {
    lab: &'a LabSession,
    pub app: App,
    opts: PairOptions,
    key: PathBuf,
    /// The backup's directory: its image and, after a takeover, the log.
    backup_dir: PathBuf,
    /// Extra arguments of the application's command.
    app_args: Vec<String>,
    backup: Option<Child>,
    backup_log: PathBuf,
    /// Backups started so far (each gets a log of its own).
    backups: u32,
    /// Where the primary and the backup run (the lab's primary and backup
    /// hosts unless swapped).
    primary_host: Host,
    backup_host: Host,
    /// The service address.
    vip: ipnet::Ipv4Net,
    /// With `identities`: each host's identity file and public key.
    identities: Vec<(Host, PathBuf, String)>,
}

impl<'a> Pair<'a> {
    /// How the backups started from now on bring the memory in at a
    /// takeover.
    pub fn set_pages(&mut self, pages: Pages) {
        self.opts.pages = pages;
    }

    /// Makes a key shared by both hosts; nothing runs yet.
    pub fn new(lab: &'a LabSession, app: App, opts: PairOptions) -> Result<Pair<'a>> {
        // The pair's files, named after its lab, this process and the app.
        let scratch = |what: &str| {
            std::env::temp_dir().join(format!(
                "rrc-{}-{}-{}{what}",
                lab.plan().name.as_str(),
                std::process::id(),
                app.name()
            ))
        };
        let key = scratch(".key");
        let _ = fs::remove_file(&key);
        lab.run_on(Host::Client, &[&lab.rrc_path(), "keygen", &path_str(&key)])?;
        let backup_dir = scratch("-backup");
        let mut identities = Vec::new();
        if opts.identities {
            for host in [Host::Primary, Host::Backup] {
                let file = scratch(&format!("-{host}.identity"));
                let _ = fs::remove_file(&file);
                let public = lab.run_on(
                    Host::Client,
                    &[&lab.rrc_path(), "keygen", "--identity", &path_str(&file)],
                )?;
                identities.push((host, file, public.trim().to_string()));
            }
        }
        Ok(Pair {
            identities,
            primary_host: Host::Primary,
            backup_host: Host::Backup,
            vip: lab.plan().vip(),
            lab,
            app,
            opts,
            backup_log: PathBuf::new(),
            key,
            backup_dir,
            app_args: Vec::new(),
            backup: None,
            backups: 0,
        })
    }

    /// The lab the pair runs in.
    pub fn lab(&self) -> &LabSession {
        self.lab
    }

    pub fn target(&self) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(self.vip.addr()), self.app.port())
    }

    /// The address `offset` after the lab's service address.
    fn vip_at(&self, offset: u32) -> ipnet::Ipv4Net {
        let vip = self.lab.plan().vip();
        ipnet::Ipv4Net::new(
            std::net::Ipv4Addr::from(u32::from(vip.addr()) + offset),
            vip.prefix_len(),
        )
        .expect("a prefix from a valid net")
    }

    /// A second service replicated to `other`'s backup (started by
    /// `other`, with `--keep-serving`), at the address `offset` after the
    /// lab's service address. Its own backup is never started.
    pub fn sharing_backup_of(mut self, other: &Pair<'_>, offset: u32) -> Self {
        let _ = fs::remove_file(&self.key);
        self.key = other.key.clone();
        self.backup_log = other.backup_log.clone();
        self.backup_dir = other.backup_dir.join(self.app.name());
        self.vip = self.vip_at(offset);
        self
    }

    /// After a takeover: the service's primary is now on the backup's
    /// host, and its next backup goes on the old primary's.
    pub fn swap_roles(&mut self) {
        std::mem::swap(&mut self.primary_host, &mut self.backup_host);
    }

    /// The host the primary runs on now.
    pub fn primary_host(&self) -> Host {
        self.primary_host
    }

    /// Runs the primary on the lab's backup host and the backup on its
    /// primary host, at the address `offset` after the lab's service
    /// address: a second service, the other way round.
    pub fn swapped(mut self, offset: u32) -> Self {
        std::mem::swap(&mut self.primary_host, &mut self.backup_host);
        self.vip = self.vip_at(offset);
        self
    }

    /// Gives the application's command these extra arguments.
    pub fn with_app_args(mut self, args: &[&str]) -> Self {
        self.app_args = args.iter().map(|a| a.to_string()).collect();
        self
    }

    /// Where the backup keeps its image (`image/`) and, after a takeover,
    /// the log since it (`log/`).
    pub fn backup_dir(&self) -> &std::path::Path {
        &self.backup_dir
    }

    /// Has the backup keep its image and log in `dir` (a directory of its
    /// own: it is emptied when the pair ends).
    pub fn with_backup_dir(mut self, dir: PathBuf) -> Self {
        self.backup_dir = dir;
        self
    }

    /// The same, for the next backup started (the last one's directory
    /// stays as it is, for its owner to remove).
    pub fn set_backup_dir(&mut self, dir: PathBuf) {
        self.backup_dir = dir;
    }

    /// Whether the `rrc backup` process this pair started still runs.
    pub fn backup_running(&mut self) -> bool {
        self.backup
            .as_mut()
            .is_some_and(|c| c.try_wait().is_ok_and(|s| s.is_none()))
    }

    fn repl_addr(&self) -> Result<String> {
        let a = self
            .lab
            .plan()
            .repl_addr(self.backup_host)
            .context("the lab has no replication link")?;
        Ok(a.addr().to_string())
    }

    /// Starts `rrc backup` on the backup host.
    pub fn start_backup(&mut self) -> Result<()> {
        ensure!(self.backup.is_none(), "a backup is already running");
        self.backups += 1;
        self.backup_log = std::env::temp_dir().join(format!(
            "rrc-{}-{}-backup{}.log",
            self.lab.plan().name.as_str(),
            std::process::id(),
            self.backups
        ));
        let log = fs::File::create(&self.backup_log)
            .with_context(|| format!("creating {}", self.backup_log.display()))?;
        let fence = format!(
            "{} lab kill --lab {} {}",
            self.lab.rrc_path(),
            self.lab.plan().name.as_str(),
            self.primary_host
        );
        let listen = self.repl_addr()?;
        let timeout = format!("{}ms", self.opts.timeout.as_millis());
        let mut cmd = self.lab.command_on(
            self.backup_host,
            &[
                &self.lab.rrc_path(),
                "backup",
                "--listen",
                &listen,
                "--key",
                &path_str(&self.key),
                "--timeout",
                &timeout,
                "--dir",
                &path_str(&self.backup_dir),
            ],
        );
        // The arbiter alone keeps two copies from serving; without one,
        // the backup makes sure by killing the primary's host.
        match &self.opts.arbiter {
            Some(a) => cmd.args(["--arbiter", a]),
            None => cmd.args(["--fence", &fence]),
        };
        if self.opts.metrics {
            cmd.args([
                "--metrics",
                &self.metrics_addr(self.backup_host).to_string(),
            ]);
        }
        if self.opts.keep_serving {
            cmd.arg("--keep-serving");
        }
        cmd.args(["--pages", self.opts.pages.name()]);
        if let (Some((file, _)), Some((_, primary))) = (
            self.identity_of(self.backup_host),
            self.identity_of(self.primary_host),
        ) {
            cmd.arg("--identity").arg(file).args([
                "--primary-identity",
                &format!("{}={primary}", self.app.name()),
            ]);
        }
        if self.opts.then_protect {
            let to = self
                .lab
                .plan()
                .repl_addr(self.primary_host)
                .context("the lab has no replication link")?;
            cmd.args(["--then-protect-to", &to.addr().to_string()]);
        }
        if self.opts.inject_divergence {
            cmd.env(rrc_replica::takeover::INJECT_DIVERGENCE_ENV, "1");
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("cannot start rrc backup")?;
        self.backup = Some(child);
        // Listening before the primary looks for it.
        self.wait_backup_says("waiting for a primary", Duration::from_secs(10))
    }

    /// Waits until the backup's output holds `what`.
    fn wait_backup_says(&self, what: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while !self.backup_output().contains(what) {
            if Instant::now() > deadline {
                bail!(
                    "the backup did not say {what:?} within {timeout:?}:\n{}",
                    self.backup_output()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// The backup's output so far.
    pub fn backup_output(&self) -> String {
        fs::read_to_string(&self.backup_log).unwrap_or_default()
    }

    /// Starts `rrc primary --detach` with the application on the primary
    /// host, and waits until the backup holds its first checkpoint and the
    /// service answers.
    pub fn start_primary(&self) -> Result<()> {
        self.launch_primary()?;
        self.wait_protected(Duration::from_secs(30))?;
        self.lab
            .wait_tcp(Host::Client, self.target(), Duration::from_secs(10))
    }

    /// Starts `rrc primary --detach` with the application on the primary
    /// host, and returns once it runs (whatever its backup does).
    pub fn launch_primary(&self) -> Result<()> {
        let vip = self.vip.to_string();
        let epoch = format!("{}ms", self.opts.epoch.as_millis());
        let heartbeat = format!("{}ms", self.opts.heartbeat.as_millis());
        let backup = self.repl_addr()?;
        let rrc = self.lab.rrc_path();
        let key = path_str(&self.key);
        let mut argv = vec![
            rrc.as_str(),
            "primary",
            "--detach",
            "--backup",
            &backup,
            "--key",
            &key,
            "--epoch",
            &epoch,
            "--heartbeat",
            &heartbeat,
            "--mode",
            self.opts.mode.name(),
            "--name",
            self.app.name(),
            "--addr",
            &vip,
            "--",
        ];
        if self.opts.release_at_commit {
            argv.splice(argv.len() - 1..argv.len() - 1, ["--release", "commit"]);
        }
        let root_options = self.app.root_options()?;
        argv.splice(argv.len() - 1..argv.len() - 1, App::argv(&root_options));
        let metrics = self.metrics_addr(self.primary_host).to_string();
        if self.opts.metrics {
            let at = argv.len() - 1;
            argv.splice(at..at, ["--metrics", metrics.as_str()])
                .for_each(drop);
        }
        let ours = self
            .identity_of(self.primary_host)
            .map(|(f, _)| path_str(f));
        let theirs = self
            .identity_of(self.backup_host)
            .map(|(_, k)| k.to_string());
        if let (Some(ours), Some(theirs)) = (&ours, &theirs) {
            let at = argv.len() - 1;
            argv.splice(
                at..at,
                [
                    "--identity",
                    ours.as_str(),
                    "--backup-identity",
                    theirs.as_str(),
                ],
            )
            .for_each(drop);
        }
        let at = argv.len() - 1;
        match &self.opts.arbiter {
            Some(a) => argv
                .splice(at..at, ["--arbiter", a.as_str()])
                .for_each(drop),
            // The backup fences this host (kills it) before taking over.
            None => argv.insert(at, "--allow-split-brain"),
        }
        let command = self.app.command()?;
        argv.extend(command.iter().map(String::as_str));
        argv.extend(self.app_args.iter().map(String::as_str));
        self.lab.run_on(self.primary_host, &argv).map(|_| ())
    }

    /// The key file the pair's primary and backup share.
    pub fn key_path(&self) -> &std::path::Path {
        &self.key
    }

    /// With `identities`: `host`'s identity file and public key.
    pub fn identity_of(&self, host: Host) -> Option<(&std::path::Path, &str)> {
        self.identities
            .iter()
            .find(|(h, _, _)| *h == host)
            .map(|(_, f, k)| (f.as_path(), k.as_str()))
    }

    /// Where the backup listens for the primary (on the replication link).
    pub fn backup_listen_addr(&self) -> Result<SocketAddr> {
        let a = self
            .lab
            .plan()
            .repl_addr(self.backup_host)
            .context("the lab has no replication link")?;
        Ok(SocketAddr::new(
            IpAddr::V4(a.addr()),
            rrc_replica::DEFAULT_PORT,
        ))
    }

    /// What the primary's replication reports (`rrc status`).
    pub fn primary_status(&self) -> Result<rrc_replica::primary::PrimaryStats> {
        let out = self.lab.run_on(
            self.primary_host,
            &[&self.lab.rrc_path(), "status", "--json", self.app.name()],
        )?;
        let mut v: std::collections::BTreeMap<String, serde_json::Value> =
            serde_json::from_str(&out).context("rrc status did not print JSON")?;
        let r = v
            .remove("replication")
            .context("rrc status says nothing of a replication")?;
        serde_json::from_value(r).context("rrc status: the replication's figures")
    }

    /// Stops the primary's container (and with it the primary).
    pub fn stop_primary(&self) -> Result<()> {
        self.lab
            .run_on(
                self.primary_host,
                &[&self.lab.rrc_path(), "stop", self.app.name()],
            )
            .map(|_| ())
    }

    /// Waits until the current backup has committed a full checkpoint.
    pub fn wait_protected(&self, timeout: Duration) -> Result<()> {
        self.wait_backup_says("committed checkpoint 0 ", timeout)
    }

    /// Cuts the primary host's power; returns when that began.
    pub fn kill_primary(&self) -> Result<Instant> {
        let t = Instant::now();
        self.lab.kill(self.primary_host)?;
        Ok(t)
    }

    /// Cuts the replication link between primary and backup (both hosts
    /// still reach the clients and the arbiter); returns when that began.
    pub fn cut_link(&self) -> Result<Instant> {
        let t = Instant::now();
        self.lab.cut(self.primary_host, &[self.backup_host])?;
        Ok(t)
    }

    /// Where `host`'s side serves its metrics (with `metrics`).
    pub fn metrics_addr(&self, host: Host) -> SocketAddr {
        SocketAddr::new(
            std::net::IpAddr::V4(self.lab.plan().lan_addr(host).addr()),
            METRICS_PORT,
        )
    }

    /// Scrapes `host`'s metrics endpoint from the client host.
    pub fn scrape(&self, host: Host) -> Result<String> {
        use std::io::{Read, Write};
        let addr = self.metrics_addr(host);
        self.lab.in_host(Host::Client, || -> Result<String> {
            let mut c = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
            c.set_read_timeout(Some(Duration::from_secs(5)))?;
            c.write_all(b"GET /metrics HTTP/1.0\r\n\r\n")?;
            let mut out = String::new();
            c.read_to_string(&mut out)?;
            ensure!(
                out.starts_with("HTTP/1.") && out.contains(" 200 "),
                "scraping {addr}: {out}"
            );
            Ok(out)
        })?
    }

    /// `rrc status` on `host` (finding the pair's backup directory).
    pub fn status_on(&self, host: Host) -> Result<String> {
        let dir = path_str(&self.backup_dir);
        self.lab.run_on(
            host,
            &[&self.lab.rrc_path(), "status", "--backup-dir", &dir],
        )
    }

    /// What the primary (and its container) said, from its host's log.
    pub fn primary_output(&self) -> String {
        let Ok(name) = self.app.name().parse::<rrc_container::ContainerName>() else {
            return String::new();
        };
        let state = rrc_container::HostState::for_host(&self.lab.plan().netns(self.primary_host));
        fs::read_to_string(state.log_path(&name)).unwrap_or_default()
    }

    /// Whether the primary host still runs the service's container.
    pub fn primary_serves(&self) -> Result<bool> {
        let out = self
            .lab
            .run_on(self.primary_host, &[&self.lab.rrc_path(), "ps"])?;
        Ok(out
            .lines()
            .any(|l| l.split_whitespace().next() == Some(self.app.name())))
    }

    /// Waits until the primary host no longer runs the service.
    pub fn wait_primary_gone(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while self.primary_serves()? {
            if Instant::now() > deadline {
                bail!(
                    "the primary still serves {timeout:?} on:\n{}",
                    self.primary_output()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// Cuts the backup host's power (the backup process dies with it).
    pub fn kill_backup(&mut self) -> Result<()> {
        self.lab.kill(self.backup_host)?;
        self.stop_backup_process();
        self.lab.revive(self.backup_host)
    }

    /// Waits for the backup to take over and exit; returns what it said.
    pub fn wait_takeover(&mut self, timeout: Duration) -> Result<TakeoverLine> {
        let mut child = self.backup.take().context("no backup is running")?;
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(s) = child.try_wait()? {
                break s;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "the backup did not take over within {timeout:?}:\n{}",
                    self.backup_output()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let out = self.backup_output();
        ensure!(status.success(), "the backup failed ({status}):\n{out}");
        TakeoverLine::parse(&out).with_context(|| format!("no takeover line in:\n{out}"))
    }

    /// After a takeover: removes the restored container from the backup
    /// host and brings the primary host back, ready for another start.
    pub fn reset(&mut self) -> Result<()> {
        self.stop_backup_process();
        let rrc = self.lab.rrc_path();
        // Nothing to stop is fine: the takeover may not have happened.
        let _ = self
            .lab
            .run_on(self.backup_host, &[&rrc, "stop", self.app.name()]);
        self.lab.kill(self.primary_host)?;
        self.lab.revive(self.primary_host)
    }
}

impl Pair<'_> {
    /// Ends the `rrc backup` process this pair started, if it still runs
    /// (containers it restored run on under their own supervisors).
    pub fn stop_backup_process(&mut self) {
        if let Some(mut c) = self.backup.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Pair<'_> {
    fn drop(&mut self) {
        self.stop_backup_process();
        let _ = fs::remove_file(&self.key);
        for (_, file, _) in &self.identities {
            let _ = fs::remove_file(file);
        }
        let _ = fs::remove_file(&self.backup_log);
        let _ = fs::remove_dir_all(&self.backup_dir);
        // What the container kept in its private root, in the lab's
        // directory both hosts share.
        let _ = fs::remove_dir_all(
            rrc_container::rootfs::lab_roots(self.lab.plan().name.as_str()).join(self.app.name()),
        );
    }
}

fn path_str(p: &std::path::Path) -> String {
    p.display().to_string()
}

/// One primary failure under load, as the clients saw it.
#[derive(Debug, Clone, Serialize)]
pub struct Trial {
    pub app: App,
    /// Load before the kill.
    pub kill_after_ms: f64,
    pub connections: usize,
    pub requests: u64,
    pub errors: Vec<String>,
    /// From the kill to the first reply on any connection from the new
    /// primary (after the backup decided).
    pub first_answer_ms: Option<f64>,
    /// From the kill until every connection had been answered again by
    /// the new primary.
    pub all_answered_ms: Option<f64>,
    pub takeover: Option<TakeoverLine>,
    /// What each connection received, and how much of it by the kill.
    #[serde(skip)]
    pub received: Vec<Vec<u8>>,
    #[serde(skip)]
    pub received_at_kill: Vec<usize>,
}

impl Trial {
    /// No client saw an error and the service answered every connection
    /// again.
    pub fn ok(&self) -> bool {
        self.errors.is_empty() && self.all_answered_ms.is_some() && self.takeover.is_some()
    }
}

/// Loads the pair's service with verifying clients, kills the primary host
/// `kill_after` into the load, waits for the takeover and keeps the load
/// going for `after` more.
pub fn trial(
    pair: &mut Pair<'_>,
    connections: usize,
    kill_after: Duration,
    after: Duration,
) -> Result<Trial> {
    fault_trial(
        pair,
        connections,
        kill_after,
        after,
        |p| p.kill_primary(),
        TAKEOVER_LIMIT,
    )
}

/// How long a trial waits for the backup to take over once the fault
/// began: far more than it takes, for a loaded machine.
pub const TAKEOVER_LIMIT: Duration = Duration::from_secs(20);

/// [`trial`] with another fault than a kill of the primary host (a cut
/// link): `fault` returns when it began; a takeover is waited for
/// `takeover_within` (a fault may not lead to one).
pub fn fault_trial(
    pair: &mut Pair<'_>,
    connections: usize,
    kill_after: Duration,
    after: Duration,
    fault: impl FnOnce(&Pair<'_>) -> Result<Instant> + Send,
    takeover_within: Duration,
) -> Result<Trial> {
    let target = pair.target();
    let service = pair.app.service();
    let mut killed = None;
    let mut kill_err = None;
    let report = {
        let p = &*pair;
        p.lab.in_host(Host::Client, || {
            verify::run(
                service,
                target,
                connections,
                || {
                    std::thread::sleep(kill_after);
                    match fault(p) {
                        Ok(t) => killed = Some(t),
                        Err(e) => kill_err = Some(e),
                    }
                },
                after,
            )
        })?
    };
    if let Some(e) = kill_err {
        return Err(e.context("killing the primary host"));
    }
    let killed = killed.context("the primary was not killed")?;
    let takeover = pair.wait_takeover(takeover_within).ok();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    // Answers from the new primary: those after the backup decided. (Just
    // after the kill, replies the old primary released may still arrive.)
    let decided = Duration::from_secs_f64(takeover.as_ref().map_or(0.0, |t| t.silent_ms) / 1e3);
    let since_kill = |d: Duration| ms(d + decided);
    Ok(Trial {
        app: pair.app,
        kill_after_ms: ms(kill_after),
        connections,
        requests: report.requests,
        errors: report.errors.clone(),
        first_answer_ms: report.first_answer_after(killed + decided).map(since_kill),
        all_answered_ms: report.all_answered_after(killed + decided).map(since_kill),
        takeover,
        received: report.received,
        received_at_kill: report.received_at_mark,
    })
}

/// What an offline replay of the backup's checkpoint and log showed,
/// against what the clients received.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ReplayCheck {
    pub events: u64,
    pub divergences: u64,
    pub end_reached: bool,
    /// Connections whose replayed output was found, byte for byte, in
    /// what the client received, where its stream stood at the checkpoint.
    pub matched: usize,
    /// Connections of no client that were sent only what every client
    /// was sent first (a server's greeting to a probe that connected and
    /// left).
    pub greetings: usize,
    /// Replayed output that is in no client's stream there.
    pub unmatched: Vec<String>,
    /// Bytes of output the replay produced.
    pub bytes: usize,
    /// What `rrc replay` said, for a report.
    #[serde(skip)]
    pub said: String,
}

impl ReplayCheck {
    /// The replay reached the end of the log without a divergence, and
    /// everything it wrote to the clients is what they received.
    pub fn ok(&self) -> bool {
        self.end_reached && self.divergences == 0 && self.unmatched.is_empty()
    }
}

/// How far past where the client stood at the kill the replayed output
/// may begin: frames released before the kill that had not arrived yet
/// (at most a reply or two per connection while replies wait for
/// commits).
const MATCH_SLACK: usize = 4 << 10;
/// Longest greeting a connection of no client may have been sent (the
/// Tarantool console's is 128 bytes).
const GREETING_MAX: usize = 512;
/// How long an offline replay may run before it is stopped (one that
/// diverged never reaches the end of the log).
const REPLAY_CHECK_LIMIT: Duration = Duration::from_secs(60);
/// How far before it: replies released at log acknowledgement left the
/// primary before the kill, up to an epoch of them (none under the commit
/// rule, but the window costs nothing there).
const MATCH_BEFORE: usize = 256 << 10;

impl Pair<'_> {
    /// After a takeover in responsive mode: stops the container that took
    /// over, replays the backup's checkpoint and log on the backup host
    /// (`rrc replay`, outputs captured, stopped at the end of the log) and
    /// compares the output of each replayed connection with what the
    /// clients of `trial` received.
    pub fn replay_check(&self, trial: &Trial) -> Result<ReplayCheck> {
        self.replay_check_against(&trial.received, &trial.received_at_kill)
    }

    /// [`Pair::replay_check`] against what each client connection
    /// received (`received`), and how much of it it had when the primary
    /// was killed (`at_kill`).
    pub fn replay_check_against(
        &self,
        received: &[Vec<u8>],
        at_kill: &[usize],
    ) -> Result<ReplayCheck> {
        let rrc = self.lab.rrc_path();
        let _ = self
            .lab
            .run_on(self.backup_host, &[&rrc, "stop", self.app.name()]);
        let log = self.backup_dir.join("log");
        let image = self.backup_dir.join("image");
        let has_logs = fs::read_dir(&log)
            .with_context(|| format!("no log was written out in {}", log.display()))?
            .flatten()
            .any(|e| e.file_name().to_string_lossy().starts_with("thread-"));
        if !has_logs {
            // Nothing happened after the checkpoint: nothing to replay.
            return Ok(ReplayCheck {
                end_reached: true,
                said: "an empty log".into(),
                ..Default::default()
            });
        }
        let capture = self.backup_dir.with_extension("capture");
        let _ = fs::remove_file(&capture);
        let out = self
            .lab
            .command_on(
                self.backup_host,
                &[
                    &rrc,
                    "replay",
                    "--images",
                    &path_str(&image),
                    "--log",
                    &path_str(&log),
                    "--capture",
                    &path_str(&capture),
                    "--stop-at-end",
                ],
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("cannot run rrc replay")?;
        // A replay that diverges never reaches the end of the log, where it
        // would stop: it is stopped after a while.
        let killer = {
            let pid = out.id();
            let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            let d = done.clone();
            std::thread::spawn(move || {
                let until = Instant::now() + REPLAY_CHECK_LIMIT;
                while !d.load(std::sync::atomic::Ordering::Acquire) && Instant::now() < until {
                    std::thread::sleep(Duration::from_millis(50));
                }
                if !d.load(std::sync::atomic::Ordering::Acquire) {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid as i32),
                        nix::sys::signal::Signal::SIGTERM,
                    );
                }
            });
            done
        };
        let out = out.wait_with_output().context("waiting for rrc replay")?;
        killer.store(true, std::sync::atomic::Ordering::Release);
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let number_before = |what: &str| -> Option<u64> {
            let line = said.lines().find(|l| l.contains(what))?;
            let at = line.find(what)?;
            line[..at].split_whitespace().last()?.parse().ok()
        };
        let mut check = ReplayCheck {
            events: number_before(" events replayed").unwrap_or(0),
            divergences: number_before(" divergences").unwrap_or(u64::MAX),
            end_reached: said.contains("end of the log reached"),
            ..Default::default()
        };
        let bytes = fs::read(&capture).unwrap_or_default();
        let _ = fs::remove_file(&capture);
        let records = rrc_rr::interface::parse_capture(&bytes)
            .map_err(|e| anyhow::anyhow!("the replay's capture: {e}"))?;
        // Which client each replayed connection could be: short replies
        // ("+OK") fit several, so the streams are assigned all together.
        // Longest first: a short stream that fits many clients (a
        // greeting) is then the one left over, not a client's own.
        let mut streams: Vec<(u32, Vec<u8>)> = rrc_rr::interface::connection_streams(records)
            .into_iter()
            .filter(|(_, s)| !s.is_empty())
            .collect();
        streams.sort_by_key(|(_, s)| std::cmp::Reverse(s.len()));
        let fits: Vec<Vec<usize>> = streams
            .iter()
            .map(|(_, stream)| {
                (0..received.len())
                    .filter(|&c| {
                        found_near(&received[c], stream, at_kill.get(c).copied().unwrap_or(0))
                    })
                    .collect()
            })
            .collect();
        let owners = assign(&fits, received.len());
        for (i, (fd, stream)) in streams.iter().enumerate() {
            check.bytes += stream.len();
            if owners[i].is_some() {
                check.matched += 1;
            } else if stream.len() <= GREETING_MAX && received.iter().any(|r| r.starts_with(stream))
            {
                // What every connection is sent first, written to one no
                // client kept (the harness's probe of the service).
                check.greetings += 1;
            } else {
                check.unmatched.push(format!(
                    "descriptor {fd}: {} bytes beginning {:?}",
                    stream.len(),
                    String::from_utf8_lossy(&stream[..stream.len().min(80)])
                ));
            }
        }
        check.said = said;
        Ok(check)
    }
}

/// Gives each item one of the owners it fits, no owner twice, as many
/// items as can be (augmenting paths: a handful of connections).
fn assign(fits: &[Vec<usize>], owners: usize) -> Vec<Option<usize>> {
    fn place(
        i: usize,
        fits: &[Vec<usize>],
        seen: &mut [bool],
        owner_of: &mut [Option<usize>],
    ) -> bool {
        for &o in &fits[i] {
            if seen[o] {
                continue;
            }
            seen[o] = true;
            if owner_of[o].is_none_or(|j| place(j, fits, seen, owner_of)) {
                owner_of[o] = Some(i);
                return true;
            }
        }
        false
    }
    let mut owner_of: Vec<Option<usize>> = vec![None; owners];
    for i in 0..fits.len() {
        place(i, fits, &mut vec![false; owners], &mut owner_of);
    }
    let mut out = vec![None; fits.len()];
    for (o, i) in owner_of.iter().enumerate() {
        if let Some(i) = i {
            out[*i] = Some(o);
        }
    }
    out
}

/// Whether `part` is in `stream` between [`MATCH_BEFORE`] bytes before
/// `mark` and [`MATCH_SLACK`] bytes after it.
fn found_near(stream: &[u8], part: &[u8], mark: usize) -> bool {
    let hi = (mark + MATCH_SLACK).min(stream.len().saturating_sub(part.len()));
    (mark.saturating_sub(MATCH_BEFORE)..=hi).any(|p| stream.get(p..p + part.len()) == Some(part))
}

/// A small seeded generator for kill moments (xorshift64*): the seed is
/// printed, so a failing run can be repeated.
pub struct Moments(u64);

impl Moments {
    pub fn new(seed: u64) -> Moments {
        Moments(seed.max(1))
    }

    /// A seed from the clock.
    pub fn seed_from_clock() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
    }

    /// A duration uniformly in [lo, hi).
    pub fn between(&mut self, lo: Duration, hi: Duration) -> Duration {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let r = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11;
        let f = r as f64 / (1u64 << 53) as f64;
        lo + (hi - lo).mul_f64(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn takeover_line_parses() {
        let t = TakeoverLine::parse(
            "x\ntook over from checkpoint 2137: primary silent 345 ms, arbiter 2.5 ms, fence 4 ms, restore 51 ms\n",
        )
        .unwrap();
        assert_eq!(t.epoch, 2137);
        assert_eq!(t.silent_ms, 345.0);
        assert_eq!(t.arbiter_ms, 2.5);
        assert_eq!(t.fence_ms, 4.0);
        assert_eq!(t.restore_ms, 51.0);
        assert!(TakeoverLine::parse("took over from checkpoint x").is_none());
    }

    #[test]
    fn streams_are_assigned_all_together() {
        // The first fits both owners; the second only the first owner.
        let a = assign(&[vec![0, 1], vec![0]], 2);
        assert_eq!(a, vec![Some(1), Some(0)]);
        let b = assign(&[vec![0], vec![0]], 2);
        assert_eq!(b.iter().filter(|x| x.is_some()).count(), 1);
    }

    #[test]
    fn moments_stay_in_range() {
        let mut m = Moments::new(7);
        for _ in 0..1000 {
            let d = m.between(Duration::from_millis(300), Duration::from_millis(900));
            assert!(d >= Duration::from_millis(300) && d < Duration::from_millis(900));
        }
    }
}
