//! `rrc primary`, `rrc backup` and `rrc keygen`: a replicated container.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;
use rrc_arbiter::Arbiter;
use rrc_arbiter::etcd::Etcd;
use rrc_container::HostState;
use rrc_container::control::CopyChoice;
use rrc_replica::acceptor::Trust;
use rrc_replica::arbitration::Arbitration;
use rrc_replica::backup::{self, BackupOptions, LogFound, ProtectTo, Resumed};
use rrc_replica::backup_status::{self, TakeoverPhases};
use rrc_replica::gate::Release;
use rrc_replica::link::LinkConfig;
use rrc_replica::primary::{PrimaryOptions, Replication};
use rrc_replica::reprotect::{Protect, ProtectJob, ResumeJob};
use rrc_replica::takeover::{ReplayOutcome, Restoring};
use rrc_session::recording::Rings;
use rrc_wire::{Identified, Identity, Key};

use super::checkpoint::Copy;
use super::run::ContainerArgs;
use super::{ModeArg, PagesArg};

use rrc_replica::DEFAULT_PORT;

/// Run a program as a replicated container: the primary half.
///
/// Like `rrc run`, and besides: every --epoch the container is checkpointed
/// (incrementally) and the checkpoint streamed to the backup over an
/// authenticated, encrypted link. In responsive mode (the default) the
/// program is recorded (librrc preloaded) and its log streamed to the
/// backup as it comes; every frame the container sends (its ACKs
/// included) is held until the backup holds the log that produced it
/// (about a round trip), so a client never sees anything the backup could
/// not reproduce: a takeover replays the log from the last checkpoint. In
/// checkpoint mode frames wait for the next committed checkpoint instead.
/// If the backup fails, the service goes on unprotected (logged loudly)
/// until a backup is back and has received a full checkpoint.
///
/// With --arbiter (an etcd cluster) the primary takes the service's next
/// term at its start; when it loses its backup it holds every reply until
/// it wins the term after that (then goes on unprotected) or learns the
/// backup won it (then kills its container without releasing another
/// reply). Without an arbiter it needs --allow-split-brain.
///
/// Example (start the backup first):
///   rrc keygen /etc/rrc/key   (copy the file to the backup host)
///   rrc primary --backup 10.1.0.2 --key /etc/rrc/key --name redis \
///       --arbiter 10.0.0.21,10.0.0.22,10.0.0.23 \
///       --addr 10.0.0.100/24 -- redis-server --protected-mode no
#[derive(Debug, Args)]
pub struct PrimaryArgs {
    /// The backup's replication address, HOST[:PORT] (port 7470 by default).
    #[arg(long, value_name = "ADDR")]
    backup: String,
    /// The shared key file (`rrc keygen`); the backup must hold the same.
    #[arg(long, value_name = "FILE")]
    key: PathBuf,
    /// This host's identity file (`rrc keygen --identity`): the backup
    /// then accepts this host only if it lists its public key, and the
    /// key file alone no longer lets a host act as this primary.
    #[arg(long, value_name = "FILE", requires = "backup_identity")]
    identity: Option<PathBuf>,
    /// With --identity: the backup host's public key (64 hex characters,
    /// printed by `rrc keygen --identity` on that host); any other backup
    /// is refused.
    #[arg(long, value_name = "KEY", requires = "identity")]
    backup_identity: Option<rrc_wire::PublicKey>,
    /// How often the container is checkpointed.
    #[arg(long, default_value = "100ms", value_parser = super::parse_duration)]
    epoch: Duration,
    /// How often an idle replication link says the primary is alive; the
    /// backup's --timeout must be several times longer.
    // The default is rrc_replica::DEFAULT_HEARTBEAT.
    #[arg(long, default_value = "25ms", value_parser = super::parse_duration)]
    heartbeat: Duration,
    /// How long the backup may stay silent before it counts as failed.
    #[arg(long, default_value = "1s", value_parser = super::parse_duration)]
    backup_timeout: Duration,
    /// When written pages are copied: while the container is stopped
    /// (direct), from a copy-on-write snapshot after it runs again
    /// (snapshot), or whichever pauses it less (auto).
    #[arg(long, value_enum, default_value_t = Copy::Auto)]
    copy: Copy,
    /// What a reply waits for. responsive: the backup's acknowledgement of
    /// the log that produced it (the program must be dynamically linked:
    /// librrc is preloaded to record it). checkpoint: the next checkpoint
    /// committed by the backup (about one --epoch); no recording.
    #[arg(long, value_enum, default_value_t = ModeArg::Responsive)]
    mode: ModeArg,
    /// Responsive mode: when replies leave. log: as soon as the backup
    /// holds the log they depend on. commit: once the next checkpoint is
    /// committed (the log is still streamed; for comparing the two).
    /// [default: log]
    #[arg(long, value_enum)]
    release: Option<ReleaseArg>,
    /// Serve Prometheus metrics on HOST:PORT (GET /metrics): role, term,
    /// protection, checkpoint pauses, how long replies were held, log
    /// bytes, the last commit's age.
    #[arg(long, value_name = "ADDR")]
    metrics: Option<SocketAddr>,
    #[command(flatten)]
    arbiter: ArbiterArgs,
    #[command(flatten)]
    container: ContainerArgs,
}

/// Who decides which host serves when primary and backup lose each other.
#[derive(Debug, Args)]
struct ArbiterArgs {
    /// The arbiter: an etcd cluster, as its members' HOST[:PORT]
    /// (comma-separated; port 2379 by default). A side that loses the
    /// other must win the service's next term there before it acts: the
    /// backup before it takes over, the primary before it releases replies
    /// its backup did not acknowledge (a primary that loses stops). Both
    /// sides must name the same cluster.
    #[arg(long, value_name = "ENDPOINTS", env = "RRC_ARBITER")]
    arbiter: Option<String>,
    /// How long one question to the arbiter may take before it counts as
    /// unreachable (and is asked again).
    #[arg(long, default_value = "1s", value_parser = super::parse_duration)]
    arbiter_timeout: Duration,
    /// Run without an arbiter (and, on the backup, without --fence): if
    /// the link between the hosts breaks while both still reach the
    /// clients, both serve, and the clients' acknowledged writes diverge.
    #[arg(long)]
    allow_split_brain: bool,
}

impl ArbiterArgs {
    /// The arbiter, if one is named; an error if none is and nothing else
    /// (`fenced`, or being told) keeps two copies from serving.
    fn arbiter(&self, who: &str, fenced: bool) -> Result<Option<Arc<dyn Arbiter>>> {
        let Some(endpoints) = &self.arbiter else {
            if !fenced && !self.allow_split_brain {
                bail!(
                    "{who} needs --arbiter (an etcd cluster that decides which host serves){}; without it, if the link between the hosts breaks, both serve. --allow-split-brain runs it anyway",
                    if who == "rrc backup" {
                        " or --fence"
                    } else {
                        ""
                    }
                );
            }
            return Ok(None);
        };
        if self.allow_split_brain {
            bail!("--allow-split-brain and --arbiter contradict each other: choose one");
        }
        if self.arbiter_timeout < Duration::from_millis(10) {
            bail!("--arbiter-timeout must be at least 10ms");
        }
        let etcd = Etcd::new(endpoints, self.arbiter_timeout).context("--arbiter")?;
        Ok(Some(Arc::new(etcd)))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum ReleaseArg {
    Commit,
    Log,
}

/// Keep a replica of a primary's container and take over when it fails.
///
/// Waits for a primary (`rrc primary`) holding the same key on --listen;
/// stages every checkpoint it sends and commits it only once complete, so a
/// primary failing mid-transfer leaves the last committed checkpoint
/// intact. When the primary falls silent for --timeout (or its link breaks)
/// the backup claims the service's next term from --arbiter (if the
/// primary won it first, it does not take over), runs --fence (if given)
/// and restores the last committed checkpoint as a container on this host
/// (same name, address and MAC), announced with a gratuitous ARP. From a responsive primary it also
/// writes the log sent since that checkpoint into DIR/log (replayable with
/// `rrc replay --images DIR/image --log DIR/log`) and takes over by
/// replay: the restored program replays the log with its network held,
/// every open connection is rebuilt to where the log leaves it, and only
/// then does the network go live; if the replay diverges or a connection
/// does not check out, it falls back to the checkpoint alone and resets
/// the connections used after it (said as FALLBACK). It prints how long
/// each step took and exits, leaving the container running under its own
/// rrc process; with --then-protect-to that container replicates to a
/// backup there once one starts, and is protected again (in responsive
/// mode after a takeover by replay: the program records again; in
/// checkpoint mode after a takeover from the checkpoint alone).
/// A primary that stops cleanly is not failed over: the backup waits for
/// the next one. Without --arbiter it needs --fence or --allow-split-brain.
///
/// Example: rrc backup --listen 10.1.0.2 --key /etc/rrc/key --arbiter 10.0.0.21,10.0.0.22,10.0.0.23
#[derive(Debug, Args)]
pub struct BackupArgs {
    /// Address to listen on for the primary, HOST[:PORT] (port 7470 by default).
    #[arg(long, value_name = "ADDR")]
    listen: String,
    /// The shared key file (`rrc keygen`); the primary must hold the same.
    #[arg(long, value_name = "FILE")]
    key: PathBuf,
    /// This host's identity file (`rrc keygen --identity`): only the
    /// primaries listed with --primary-identity get in.
    #[arg(long, value_name = "FILE", requires = "primary_identity")]
    identity: Option<PathBuf>,
    /// With --identity: a primary host allowed in, by its public key (64
    /// hex characters), for any service (KEY) or for one (SERVICE=KEY; the
    /// service is the container's name). Repeat for more.
    #[arg(long, value_name = "[SERVICE=]KEY", requires = "identity")]
    primary_identity: Vec<rrc_replica::acceptor::TrustedPrimary>,
    /// Silence from the primary after which it counts as failed (the
    /// primary says it is alive every 25 ms by default: see its
    /// --heartbeat). Measured on a noisy 2-vCPU machine: no false takeover
    /// in 10 minutes of heavy load (`rrc bench detection`).
    // The default is rrc_replica::DEFAULT_TIMEOUT.
    #[arg(long, default_value = "100ms", value_parser = super::parse_duration)]
    timeout: Duration,
    /// Shell command that makes sure the primary is down (powers it off,
    /// cuts its switch port) before the backup takes over; must succeed.
    #[arg(long, value_name = "CMD")]
    fence: Option<String>,
    /// Where committed checkpoints are kept (default: under this host's
    /// rrc state directory).
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
    /// Host interface for the restored container's frames (default: the
    /// one whose subnet holds its address).
    #[arg(long, value_name = "IF")]
    uplink: Option<String>,
    /// How a takeover brings the container's private memory in: lazy, the
    /// program runs once everything else is in place and its memory follows
    /// while it runs (a Redis of 120 MB restored in 45 ms instead of 127
    /// in a takeover); eager, all of it before the program runs; auto, lazy
    /// from 32 MiB of memory on.
    #[arg(long, value_enum, default_value_t = PagesArg::Auto)]
    pages: PagesArg,
    /// Serve Prometheus metrics on HOST:PORT (GET /metrics): role, term,
    /// whether it holds a committed checkpoint, checkpoints committed, log
    /// bytes received, the last commit's age, the primary's longest
    /// silence (how close the timeout came to a false takeover), takeovers.
    #[arg(long, value_name = "ADDR")]
    metrics: Option<SocketAddr>,
    /// After a takeover, keep the service protected: the restored
    /// container becomes a primary (responsive mode after a takeover by
    /// replay, checkpoint mode after one from the checkpoint alone)
    /// replicating to a backup at ADDR,
    /// HOST[:PORT] (typically the old primary's host, once back). It runs
    /// unprotected until `rrc backup --listen ADDR` starts there, which
    /// gets a full checkpoint and protects it again; the service and its
    /// connections go on throughout.
    #[arg(long, value_name = "ADDR")]
    then_protect_to: Option<String>,
    /// With --then-protect-to: the new primary's checkpoint interval.
    #[arg(long, default_value = "100ms", value_parser = super::parse_duration)]
    then_epoch: Duration,
    /// Serve any number of primaries at once, one per service (each kept
    /// in DIR/SERVICE), and go on serving the others after a takeover; each
    /// takeover runs in a process of its own.
    #[arg(long)]
    keep_serving: bool,
    #[command(flatten)]
    arbiter: ArbiterArgs,
}

/// Create a shared key file, or a host identity, for the replication link.
///
/// Writes 32 random bytes, hex encoded, to FILE with mode 0600; an existing
/// file is never overwritten. A shared key goes to both hosts (copy it by a
/// secure channel). An identity (--identity) stays on its host; its public
/// key, printed, is what the other host is given (`rrc primary
/// --backup-identity`, `rrc backup --primary-identity`).
///
/// Example: rrc keygen --identity /etc/rrc/identity
#[derive(Debug, Args)]
pub struct KeygenArgs {
    file: PathBuf,
    /// Make a host identity (an X25519 key pair) and print its public key.
    #[arg(long)]
    identity: bool,
    /// With --identity: print the public key of the existing FILE.
    #[arg(long, requires = "identity")]
    show: bool,
}

fn resolve(addr: &str) -> Result<SocketAddr> {
    let with_port = if addr.parse::<SocketAddr>().is_ok() || addr.contains(':') {
        addr.to_string()
    } else {
        format!("{addr}:{DEFAULT_PORT}")
    };
    with_port
        .to_socket_addrs()
        .with_context(|| format!("`{addr}` is not a HOST[:PORT] address"))?
        .next()
        .with_context(|| format!("`{addr}` resolves to no address"))
}

fn load_key(path: &std::path::Path) -> Result<Arc<Key>> {
    let key = Key::load(path).with_context(|| {
        format!(
            "reading the key file {} (make one with `rrc keygen FILE`)",
            path.display()
        )
    })?;
    Ok(Arc::new(key))
}

fn load_identity(path: &std::path::Path) -> Result<Arc<Identity>> {
    let id = Identity::load(path).with_context(|| {
        format!(
            "reading the identity file {} (make one with `rrc keygen --identity FILE`)",
            path.display()
        )
    })?;
    Ok(Arc::new(id))
}

pub fn keygen(a: KeygenArgs) -> Result<i32> {
    if a.identity {
        let id = if a.show {
            load_identity(&a.file)?
        } else {
            Arc::new(
                Identity::generate(&a.file)
                    .with_context(|| format!("creating {}", a.file.display()))?,
            )
        };
        if !a.show {
            eprintln!(
                "wrote a new identity to {}; it stays on this host. Its public key:",
                a.file.display()
            );
        }
        println!("{}", id.public());
        return Ok(0);
    }
    Key::generate(&a.file).with_context(|| format!("creating {}", a.file.display()))?;
    println!(
        "wrote a new key to {}; copy it to the other host",
        a.file.display()
    );
    Ok(0)
}

pub fn primary(a: PrimaryArgs) -> Result<i32> {
    rrc_container::probe::require_root("rrc primary")?;
    if a.container.addr().is_none() {
        bail!("a replicated container needs --addr: its service address moves to the backup");
    }
    if a.epoch < Duration::from_millis(1) {
        bail!("--epoch must be at least 1ms");
    }
    if a.heartbeat < Duration::from_millis(1) || a.heartbeat * 2 > a.backup_timeout {
        bail!("--heartbeat must be at least 1ms and at most half of --backup-timeout");
    }
    let backup = resolve(&a.backup)?;
    let key = load_key(&a.key)?;
    let host = HostState::current();
    let service = a.container.name().to_string();
    let arbitration = match a.arbiter.arbiter("rrc primary", false)? {
        Some(arb) => Some(take_service(arb, &service, host.host())?),
        None => None,
    };
    let opts = PrimaryOptions {
        epoch: a.epoch,
        work_dir: host.dir().join("replication").join(&service),
        link: LinkConfig {
            backup,
            key,
            node: host.host().to_string(),
            service,
            term: arbitration.as_ref().map(Arbitration::announced),
            heartbeat: a.heartbeat,
            timeout: a.backup_timeout,
            identity: match (&a.identity, a.backup_identity) {
                (Some(file), Some(theirs)) => Some(Identified {
                    ours: load_identity(file)?,
                    peers: vec![theirs],
                }),
                _ => None,
            },
        },
        arbitration,
        copy: CopyChoice::from(a.copy).into(),
        metrics: bind_metrics(a.metrics)?,
        takeovers: 0,
    };
    if a.release.is_some() && a.mode != ModeArg::Responsive {
        bail!("--release is for --mode responsive (in checkpoint mode replies wait for commits)");
    }
    let release = match a.release.unwrap_or(ReleaseArg::Log) {
        ReleaseArg::Commit => Release::Commit,
        ReleaseArg::Log => Release::LogAck,
    };
    let launch = match a.mode {
        ModeArg::Checkpoint => {
            let repl = Replication::checkpoint_only(opts)?;
            a.container
                .launch(Vec::new())?
                .gate(repl.gate())
                .companion(repl.companion())
        }
        ModeArg::Responsive => {
            let rings = Rings::create(&a.container.program()?, true)?;
            let launch = rings.into_launch(a.container.launch(rings.environment())?);
            let (rings, close) = rings.leak();
            let repl = Replication::responsive(opts, rings, a.container.service_ip()?, release)?;
            launch
                .gate(repl.gate())
                .companion(close)
                .companion(repl.companion())
        }
    };
    Ok(super::exit_code(launch.run()?))
}

/// The metrics endpoint's socket, bound now so that a taken address fails
/// before anything starts.
fn bind_metrics(addr: Option<SocketAddr>) -> Result<Option<std::net::TcpListener>> {
    addr.map(|a| {
        std::net::TcpListener::bind(a).with_context(|| format!("--metrics: cannot listen on {a}"))
    })
    .transpose()
}

/// How long a starting primary keeps asking an arbiter that does not
/// answer (electing a leader after losing a member takes a second or two).
const TAKE_PATIENCE: Duration = Duration::from_secs(15);

/// A starting primary takes the service from the arbiter (the next term).
fn take_service(arb: Arc<dyn Arbiter>, service: &str, me: &str) -> Result<Arbitration> {
    let described = arb.describe();
    let t0 = std::time::Instant::now();
    let mut said = false;
    let (a, before) = loop {
        match Arbitration::take(arb.clone(), service, me) {
            Err(e) if e.is_transient() && t0.elapsed() < TAKE_PATIENCE => {
                if !said {
                    said = true;
                    eprintln!(
                        "rrc primary: {e}; asking again for up to {} s",
                        TAKE_PATIENCE.as_secs()
                    );
                }
                std::thread::sleep(Duration::from_millis(250));
            }
            r => {
                break r
                    .with_context(|| format!("taking {service} from the arbiter ({described})"))?;
            }
        }
    };
    match before {
        Some(t) if t.holder != me => eprintln!(
            "rrc primary: the arbiter said {} served {service} ({t}); this host takes it at term {} (make sure it no longer runs there)",
            t.holder,
            a.term().number
        ),
        _ => eprintln!(
            "rrc primary: the arbiter gave {service} to this host at term {}",
            a.term().number
        ),
    }
    Ok(a)
}

pub fn backup(a: BackupArgs) -> Result<i32> {
    rrc_container::probe::require_root("rrc backup")?;
    let listen = resolve(&a.listen)?;
    if a.timeout < Duration::from_millis(10) {
        bail!("--timeout must be at least 10ms");
    }
    let key = load_key(&a.key)?;
    let host = HostState::current();
    let dir = a
        .dir
        .clone()
        .unwrap_or_else(|| host.dir().join("backup").join(listen.port().to_string()));
    let opts = BackupOptions {
        listen,
        key,
        dir,
        timeout: a.timeout,
        fence: a.fence.clone(),
        arbiter: a.arbiter.arbiter("rrc backup", a.fence.is_some())?,
        node: host.host().to_string(),
        metrics: bind_metrics(a.metrics)?,
        then_protect: match &a.then_protect_to {
            Some(to) => {
                if a.then_epoch < Duration::from_millis(1) {
                    bail!("--then-epoch must be at least 1ms");
                }
                Some(ProtectTo {
                    backup: resolve(to)?,
                    epoch: a.then_epoch,
                    heartbeat: rrc_replica::DEFAULT_HEARTBEAT,
                    timeout: Duration::from_secs(1),
                })
            }
            None => None,
        },
        trust: match &a.identity {
            Some(file) => Some(Trust {
                ours: load_identity(file)?,
                primaries: a.primary_identity.clone(),
            }),
            None => None,
        },
    };
    let how = Restoring {
        uplink: a.uplink.clone(),
        pages: a.pages.into(),
    };
    if a.keep_serving {
        return serve_many(&opts, &a, &how);
    }
    let dir = opts.dir.clone();
    let t = backup::serve(&opts, |image, log, protect| {
        backup::resume(image, log, &dir, &how, protect)
    })?;
    backup_status::record_takeover(&dir, phases(&t));
    println!("{}", takeover_line(&t));
    if let Some(log) = t.log.written() {
        println!(
            "the log since the checkpoint (records {} to {}, net frames {} to {}) is in {}",
            log.from.records + 1,
            log.until.records,
            log.from.net + 1,
            log.until.net,
            log.dir.display()
        );
    }
    print_resumed(&t.resumed);
    Ok(0)
}

/// A takeover's phases, for the backup's status file.
fn phases(t: &backup::Takeover) -> TakeoverPhases {
    TakeoverPhases {
        epoch: t.epoch,
        silent_ms: t.silent_for.as_secs_f64() * 1e3,
        arbiter_ms: t.arbiter.map(|d| d.as_secs_f64() * 1e3),
        fence_ms: t.fence.as_secs_f64() * 1e3,
        restore_ms: t.restore.as_secs_f64() * 1e3,
        resumed: match &t.resumed {
            Resumed::Checkpoint(_) => "resumed from the checkpoint".into(),
            Resumed::Replayed { .. } => "resumed by replaying the log".into(),
            Resumed::FellBack { outcome, .. } => format!(
                "FALLBACK to the checkpoint: {}",
                outcome.why.as_deref().unwrap_or("no reason given")
            ),
            Resumed::ByHelper => "resumed by a takeover process (see its output)".into(),
        },
        at_unix_ms: backup_status::unix_ms(),
    }
}

/// `rrc backup --keep-serving`: takeovers run as `rrc backup-resume`
/// processes, told the log (and what protects the service again) on their
/// standard input.
fn serve_many(opts: &BackupOptions, a: &BackupArgs, how: &Restoring) -> Result<i32> {
    let exe = std::env::current_exe().context("cannot locate the rrc binary")?;
    let resume = |image: &Path,
                  log: &LogFound,
                  protect: Option<&Protect>|
     -> std::result::Result<(), String> {
        let dir = image.parent().ok_or("the image has no directory")?;
        let mut cmd = std::process::Command::new(&exe);
        cmd.arg("backup-resume")
            .arg("--image")
            .arg(image)
            .arg("--dir")
            .arg(dir)
            .arg("--key")
            .arg(&a.key);
        if let Some(id) = &a.identity {
            cmd.arg("--identity").arg(id);
        }
        if let Some(u) = &how.uplink {
            cmd.args(["--uplink", u]);
        }
        cmd.args(["--pages", how.pages.name()]);
        if let Some(e) = &a.arbiter.arbiter {
            cmd.args(["--arbiter", e]);
            cmd.arg("--arbiter-timeout")
                .arg(format!("{}ms", a.arbiter.arbiter_timeout.as_millis()));
        }
        let mut child = cmd
            .stdin(std::process::Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start the takeover's process: {e}"))?;
        let job = ResumeJob {
            log: log.clone(),
            protect: protect.map(ProtectJob::of),
        };
        let job = serde_json::to_vec(&job).map_err(|e| e.to_string())?;
        if let Some(mut stdin) = child.stdin.take() {
            std::io::Write::write_all(&mut stdin, &job).map_err(|e| e.to_string())?;
        }
        let status = child.wait().map_err(|e| e.to_string())?;
        if status.success() {
            Ok(())
        } else {
            Err(format!("the takeover's process failed ({status})"))
        }
    };
    let report = |service: &str, t: &backup::Takeover| {
        backup_status::record_takeover(&opts.dir.join(service), phases(t));
        println!("{service}: {}", takeover_line(t));
    };
    backup::serve_many(opts, &resume, &report)?;
    Ok(0)
}

/// `rrc backup-resume`: one takeover of a backup serving several
/// services, in a process of its own (the job on standard input).
#[derive(Debug, Args)]
pub struct ResumeArgs {
    #[arg(long)]
    image: PathBuf,
    #[arg(long)]
    dir: PathBuf,
    #[arg(long)]
    uplink: Option<String>,
    #[arg(long, value_enum, default_value_t = PagesArg::Auto)]
    pages: PagesArg,
    /// The key, for the link of a primary that protects the service again.
    #[arg(long)]
    key: PathBuf,
    /// This host's identity, for the same link.
    #[arg(long)]
    identity: Option<PathBuf>,
    #[arg(long)]
    arbiter: Option<String>,
    #[arg(long, default_value = "1s", value_parser = super::parse_duration)]
    arbiter_timeout: Duration,
}

pub fn backup_resume(a: ResumeArgs) -> Result<i32> {
    rrc_container::probe::require_root("rrc backup-resume")?;
    let mut job = Vec::new();
    std::io::Read::read_to_end(&mut std::io::stdin(), &mut job)?;
    let job: ResumeJob = serde_json::from_slice(&job).context("the takeover's job")?;
    let protect = match job.protect {
        Some(p) => {
            let arbiter = match &a.arbiter {
                Some(e) => Some(Arc::new(Etcd::new(e, a.arbiter_timeout)?) as Arc<dyn Arbiter>),
                None => None,
            };
            Some(
                p.protect(
                    load_key(&a.key)?,
                    arbiter,
                    a.identity.as_deref().map(load_identity).transpose()?,
                )
                .map_err(anyhow::Error::msg)?,
            )
        }
        None => None,
    };
    let how = Restoring {
        uplink: a.uplink,
        pages: a.pages.into(),
    };
    let resumed = backup::resume(&a.image, &job.log, &a.dir, &how, protect.as_ref())
        .map_err(|e| anyhow::anyhow!("takeover failed: {e}"))?;
    print_resumed(&resumed);
    Ok(0)
}

/// The takeover's first line: its steps' times.
fn takeover_line(t: &backup::Takeover) -> String {
    format!(
        "took over from checkpoint {}: primary silent {:.0} ms, arbiter {:.1} ms, fence {:.0} ms, restore {:.0} ms",
        t.epoch,
        t.silent_for.as_secs_f64() * 1e3,
        t.arbiter.unwrap_or_default().as_secs_f64() * 1e3,
        t.fence.as_secs_f64() * 1e3,
        t.restore.as_secs_f64() * 1e3,
    )
}

/// How the service was resumed, for people.
fn print_resumed(resumed: &Resumed) {
    match resumed {
        Resumed::Checkpoint(said) => println!("{said}"),
        Resumed::Replayed { restored, outcome } => {
            println!("{}", replayed_line(outcome));
            println!("{restored}");
        }
        Resumed::FellBack { outcome, fallback } => {
            println!(
                "FALLBACK: the replay failed ({}); restored from the checkpoint in {:.0} ms, {} connection(s) used after it reset",
                outcome.why.as_deref().unwrap_or("no reason given"),
                fallback.took.as_secs_f64() * 1e3,
                fallback.reset
            );
            println!("{}", fallback.restored);
        }
        Resumed::ByHelper => {}
    }
}

/// The takeover-by-replay line: its steps' times and the connections.
fn replayed_line(o: &ReplayOutcome) -> String {
    format!(
        "replayed the log: restore {:.0} ms, replay {:.0} ms, connections {:.1} ms; {} carried over, {} accepted during the log, {} closed during it, {} not accepted by its end reset ({} bytes unread, {} unacknowledged put back)",
        o.restore_ms,
        o.replay_ms,
        o.rebuild_ms,
        o.carried,
        o.accepted,
        o.closed,
        o.unaccepted,
        o.unread,
        o.unacknowledged
    )
}
