//! The backup: accepts a primary on the replication link (only one that
//! holds the shared key), stages each checkpoint it sends and commits it
//! into its image once complete, keeps the log the primary streams in
//! responsive mode (acknowledging what it holds without a gap), and
//! answers heartbeats. When the primary falls silent (no message for the
//! timeout) or its connection breaks, the backup claims the service from
//! the arbiter (if there is one: a primary that lives and claimed first
//! keeps it), fences it (if told how) and takes over from the last
//! committed checkpoint; the log since that
//! checkpoint is written out beside the image.
//!
//! Only the primary's silence makes it take over. Its own faults (a
//! checkpoint it cannot stage or commit: a full disk) are told to the
//! primary, which goes on unprotected; a primary that sends what cannot be
//! accepted is dropped, not replaced. Connections are taken, and their
//! handshakes run, by the [`crate::acceptor`].
//!
//! The connection is used both ways at once: the session's thread reads
//! (staging checkpoint files, storing the log, acknowledging it), while a
//! committer thread applies each complete checkpoint onto the image, so
//! that a commit of many megabytes never holds up a log acknowledgement.

use std::fs;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rrc_arbiter::{Arbiter, Claim};
use rrc_ckpt::image::ImageDir;
use rrc_container::ContainerName;
use rrc_container::launch::{Launch, Source};
use rrc_session::recording::{RecordingAnnotation, RecordingDir};
use rrc_wire::{Key, Message, SecureReader, SecureStream, SecureWriter, Stage, WireError};

use crate::Error;
use crate::acceptor::{Acceptor, Greeted};
use crate::arbitration::{Arbitration, CLAIM_RETRY};
use crate::backup_status::{BackupStatus, StatusFile};
use crate::log_store::LogStore;
use crate::metrics::{Metrics, MetricsHub, MetricsServer, Role};
use crate::position::{LogPosition, POSITION_ANNOTATION};
use crate::reprotect::Protect;
use crate::takeover::{Fallback, ReplayOutcome, Restoring, by_replay, from_checkpoint};

pub struct BackupOptions {
    pub listen: SocketAddr,
    pub key: Arc<Key>,
    /// Holds `image/` (the last committed checkpoint), the staging area
    /// and, after a takeover, `log/`.
    pub dir: PathBuf,
    /// Silence after which the primary counts as failed.
    pub timeout: Duration,
    /// A command that makes sure the primary is down before taking over
    /// (run with `sh -c`; it must succeed).
    pub fence: Option<String>,
    /// Who decides which side serves: a takeover waits for its claim.
    pub arbiter: Option<Arc<dyn Arbiter>>,
    pub node: String,
    /// Where to serve metrics (`GET /metrics`), bound already.
    pub metrics: Option<TcpListener>,
    /// After a takeover, the new primary replicates to a backup here.
    pub then_protect: Option<ProtectTo>,
    /// Host identities: this backup's, and the primaries it accepts.
    pub trust: Option<crate::acceptor::Trust>,
}

/// Where and how the service is protected again after a takeover.
#[derive(Debug, Clone)]
pub struct ProtectTo {
    /// Where the next backup will listen.
    pub backup: SocketAddr,
    pub epoch: Duration,
    pub heartbeat: Duration,
    pub timeout: Duration,
}

/// How a takeover went.
#[derive(Debug, Clone)]
pub struct Takeover {
    /// The checkpoint restored.
    pub epoch: u64,
    /// From the primary's last message to the decision.
    pub silent_for: Duration,
    /// The claim of the service from the arbiter, if there is one.
    pub arbiter: Option<Duration>,
    pub fence: Duration,
    /// From the decision to the service running again.
    pub restore: Duration,
    /// How the service was resumed.
    pub resumed: Resumed,
    /// Responsive mode: the log since the checkpoint.
    pub log: LogFound,
}

/// The log a takeover found since the checkpoint.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub enum LogFound {
    /// Checkpoint-only mode: there is none.
    None,
    /// Written out beside the image.
    Written(LogWritten),
    /// Responsive mode, but it could not be written out (why).
    Lost(String),
}

impl LogFound {
    pub fn written(&self) -> Option<&LogWritten> {
        match self {
            LogFound::Written(l) => Some(l),
            _ => None,
        }
    }
}

/// How a takeover resumed the service.
#[derive(Debug, Clone)]
pub enum Resumed {
    /// From the checkpoint alone (checkpoint-only mode); what the restore
    /// said.
    Checkpoint(String),
    /// By replaying the log: the program runs live on its connections.
    Replayed {
        restored: String,
        outcome: ReplayOutcome,
    },
    /// The replay failed (`outcome` says why): from the checkpoint, with
    /// the connections used after it reset.
    FellBack {
        outcome: ReplayOutcome,
        fallback: Fallback,
    },
    /// By a process of its own (a backup serving several services), which
    /// said what it did itself.
    ByHelper,
}

/// Resumes the service on this host from the committed checkpoint in
/// `image`: by replaying the log if there is one, falling back to the
/// checkpoint alone if that fails (or the log was lost); from the
/// checkpoint if there is no log (checkpoint-only mode). `dir` is the
/// backup's directory.
pub fn resume(
    image: &Path,
    log: &LogFound,
    dir: &Path,
    how: &Restoring,
    protect: Option<&Protect>,
) -> Result<Resumed, String> {
    let log = match log {
        LogFound::None => {
            return restore_as_container(image, how, protect).map(Resumed::Checkpoint);
        }
        LogFound::Written(l) => l,
        LogFound::Lost(why) => {
            let outcome = ReplayOutcome {
                why: Some(format!("the log was lost: {why}")),
                ..ReplayOutcome::default()
            };
            return fall_back(image, None, how, outcome, protect);
        }
    };
    let outcome = match by_replay(image, log, dir, how, protect) {
        Ok((restored, o)) if o.live => {
            return Ok(Resumed::Replayed {
                restored,
                outcome: o,
            });
        }
        Ok((_, o)) => o,
        Err(why) => ReplayOutcome {
            why: Some(why),
            ..ReplayOutcome::default()
        },
    };
    fall_back(image, Some(log), how, outcome, protect)
}

/// The fallback from the checkpoint after `outcome` (a failed replay),
/// told loudly.
fn fall_back(
    image: &Path,
    log: Option<&LogWritten>,
    how: &Restoring,
    outcome: ReplayOutcome,
    protect: Option<&Protect>,
) -> Result<Resumed, String> {
    eprintln!(
        "rrc backup: TAKEOVER BY REPLAY FAILED: {}; falling back to the checkpoint",
        outcome.why.as_deref().unwrap_or("no reason given")
    );
    let fallback = from_checkpoint(image, log, how, protect)?;
    eprintln!(
        "rrc backup: FALLBACK: restored from the checkpoint; {} connection(s) used after it were reset",
        fallback.reset
    );
    Ok(Resumed::FellBack { outcome, fallback })
}

/// The log a takeover found and wrote out beside the image.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct LogWritten {
    pub dir: PathBuf,
    /// Where the checkpoint stands, and how far the log runs.
    pub from: LogPosition,
    pub until: LogPosition,
}

/// Why a session with a primary ended.
enum SessionEnd {
    /// It said goodbye (why): no failover. It stopped, or it told this
    /// backup to let go of the service (too slow to protect it).
    Clean(String),
    /// It fell silent or its connection broke.
    Failed { reason: String, last_heard: Instant },
    /// It sent what the backup cannot accept (a checkpoint that does not
    /// check out): the backup drops it, but does not take over from a
    /// primary that is not silent.
    Refused { reason: String },
}

/// The last checkpoint committed into the image.
#[derive(Clone)]
struct Committed {
    series: String,
    epoch: u64,
    /// Responsive mode: the log position it stands at.
    position: Option<LogPosition>,
}

/// What a session shares between its reader and its committer.
struct Shared {
    writer: Mutex<SecureWriter>,
    metrics: Arc<Metrics>,
    status: Arc<Mutex<StatusFile>>,
    committed: Mutex<Option<Committed>>,
    log: Mutex<LogStore>,
    /// The last log position acknowledged.
    acked: Mutex<LogPosition>,
    /// Why the checkpoint thread ended the session (the primary sent what
    /// cannot be accepted), if it did.
    broken: Mutex<Option<String>>,
    /// The longest silence of the primary in this session (µs).
    longest_silence_us: AtomicU64,
}

impl Shared {
    /// Ends the session for `why`: the reader stops at its next message
    /// (the link is shut down, so at once).
    fn fail(&self, why: String) {
        *crate::lock(&self.broken) = Some(why.clone());
        crate::lock(&self.writer).abort(&why);
    }

    /// How the session ends once the link failed with `link`: refused,
    /// if the checkpoint thread ended it, else failed.
    fn ended(&self, link: String, last_heard: Instant) -> SessionEnd {
        match crate::lock(&self.broken).clone() {
            Some(reason) => SessionEnd::Refused { reason },
            None => SessionEnd::Failed {
                reason: link,
                last_heard,
            },
        }
    }

    /// This host cannot keep the checkpoint coming in (a full disk, a
    /// failing write): the primary hears so and goes on unprotected; the
    /// image here is no longer one to take over from (what the primary
    /// releases from now on does not wait for this backup). False once
    /// the link is broken.
    fn local_fault(&self, what: &str, e: &dyn std::fmt::Display) -> bool {
        eprintln!(
            "rrc backup: cannot keep a checkpoint ({what}: {e}); the primary goes on unprotected"
        );
        *crate::lock(&self.committed) = None;
        self.metrics.protected.set(0);
        {
            let mut f = crate::lock(&self.status);
            f.status.holds_checkpoint = false;
            f.write();
        }
        self.send(&Message::BackupError {
            reason: format!("{what}: {e}"),
        })
    }

    /// Notes the silence before a message from the primary; the longest
    /// goes to the metrics and the status (the file is written with the
    /// next commit: no file is written on the log's path). A silence that
    /// ends in a takeover is not one (the primary was gone): only those
    /// that ended in a message count.
    fn heard_after(&self, silence: Duration) {
        // The status is locked only for a new longest: not for every
        // message of the log.
        let us = silence.as_micros() as u64;
        if self.longest_silence_us.fetch_max(us, Ordering::Relaxed) >= us {
            return;
        }
        if silence.as_secs_f64() > self.metrics.longest_silence.get() {
            self.metrics.longest_silence.set(silence.as_secs_f64());
        }
        let ms = silence.as_secs_f64() * 1e3;
        let mut f = crate::lock(&self.status);
        if ms > f.status.longest_silence_ms {
            f.status.longest_silence_ms = ms;
        }
    }

    /// Sends a message; false once the link is broken.
    fn send(&self, m: &Message) -> bool {
        let mut w = crate::lock(&self.writer);
        w.send(m).is_ok()
    }

    /// Acknowledges the log if the backup holds more of it than it said.
    fn acknowledge(&self) -> bool {
        let now = crate::lock(&self.log).acknowledged();
        {
            let mut acked = crate::lock(&self.acked);
            if *acked == now {
                return true;
            }
            *acked = now;
        }
        self.send(&Message::LogAck {
            records: now.records,
            net: now.net,
        })
    }
}

/// How a backup serving several services resumes one: in a process of
/// its own, given the same.
pub type ResumeElsewhere<'a> =
    dyn Fn(&Path, &LogFound, Option<&Protect>) -> Result<(), String> + Sync + 'a;

/// How a takeover resumes the service: given the image, the log since it
/// and what protects the service again (if anything).
type Resume<'a> = dyn FnMut(&Path, &LogFound, Option<&Protect>) -> Result<Resumed, String> + 'a;

/// One service the backup watches: its directory (`image/`, the staging
/// area, and `log/` after a takeover), its last committed checkpoint and
/// the term that was sent under, and what it says of itself.
struct Watch<'a> {
    opts: &'a BackupOptions,
    dir: PathBuf,
    committed: Option<Committed>,
    /// The term the committed checkpoint was sent under.
    committed_term: Option<u64>,
    /// Where its figures go (under the name each primary gives it).
    hub: Arc<MetricsHub>,
    status: Arc<Mutex<StatusFile>>,
}

/// What became of a primary's session.
enum Outcome {
    /// It ended without a takeover: wait for the next primary.
    Wait,
    /// A primary connected while the arbiter was asked: nothing was
    /// decided; serve it next.
    Returned(Box<Greeted>),
    /// Take over (the claim, if any, was won).
    TakeOver(Box<Decided>),
}

/// A takeover decided: from which checkpoint, with which log, under which
/// term.
struct Decided {
    committed: Committed,
    log: Option<LogStore>,
    silent_for: Duration,
    arbiter: Option<Duration>,
    won: Option<Arbitration>,
    service: String,
    /// The failed primary's host identity, if identities are in use: the
    /// host a re-protecting primary expects as its backup.
    primary_identity: Option<rrc_wire::PublicKey>,
}

impl<'a> Watch<'a> {
    /// Watches the service whose state lives in `dir` (made private; a
    /// checkpoint left there by an earlier run is of another primary, so
    /// it goes).
    fn new(
        opts: &'a BackupOptions,
        dir: PathBuf,
        hub: Arc<MetricsHub>,
    ) -> Result<Watch<'a>, Error> {
        fs::create_dir_all(&dir).map_err(Error::io(&dir))?;
        // Images and logs of a program's memory and input: its owner's only.
        fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .map_err(Error::io(&dir))?;
        let _ = fs::remove_dir_all(dir.join("image"));
        let _ = fs::remove_dir_all(dir.join("log"));
        let status = Arc::new(Mutex::new(StatusFile::new(&dir, opts.listen.to_string())));
        let w = Watch {
            opts,
            dir,
            committed: None,
            committed_term: None,
            hub,
            status,
        };
        w.set_status(&|s| s.state = "waiting for a primary".into());
        Ok(w)
    }

    fn image(&self) -> PathBuf {
        self.dir.join("image")
    }

    fn set_status(&self, f: &dyn Fn(&mut BackupStatus)) {
        let mut s = crate::lock(&self.status);
        f(&mut s.status);
        s.write();
    }

    /// Forgets the committed checkpoint.
    fn forget(&mut self) {
        self.committed = None;
        self.committed_term = None;
        let _ = fs::remove_dir_all(self.image());
    }

    /// Serves the primary `g` until its session ends, and decides what
    /// follows; `returned` waits up to a while for the same service's
    /// primary to connect again (while the arbiter does not answer).
    fn serve(&mut self, g: Greeted, returned: &dyn Fn(Duration) -> Option<Greeted>) -> Outcome {
        let opts = self.opts;
        let Greeted {
            stream: s,
            node,
            peer,
            service,
            term,
            identity,
        } = g;
        match (&opts.arbiter, term) {
            (Some(_), None) => {
                eprintln!(
                    "rrc backup: refused primary {node} ({peer}): it has no arbiter and this backup does (start it with the same --arbiter)"
                );
                return Outcome::Wait;
            }
            (None, Some(_)) => {
                eprintln!(
                    "rrc backup: refused primary {node} ({peer}): it serves under an arbiter's term and this backup has no --arbiter (a takeover would not ask it)"
                );
                return Outcome::Wait;
            }
            _ => {}
        }
        if term != self.committed_term {
            // A checkpoint of another term is of a service that moved on
            // without this backup: never a state to take over from.
            self.forget();
        }
        eprintln!("rrc backup: primary {node} ({peer}) connected, replicating {service}");
        let metrics = self.hub.service(&service, Role::Backup);
        metrics.term.set(term.map_or(0, |t| t as i64));
        metrics.protected.set(i64::from(self.committed.is_some()));
        let holds = self.committed.is_some();
        self.set_status(&|s| {
            s.state = "protecting".into();
            s.primary = Some(node.clone());
            s.service = Some(service.clone());
            s.term = term;
            s.holds_checkpoint = holds;
        });
        let (end, log) = session(
            s,
            opts,
            &self.dir,
            &mut self.committed,
            &metrics,
            &self.status,
        );
        self.committed_term = self.committed.as_ref().and(term);
        metrics.protected.set(0);
        let holds = self.committed.is_some();
        self.set_status(&|s| {
            s.state = "waiting for a primary".into();
            s.holds_checkpoint = holds;
        });
        let (reason, last_heard) = match end {
            SessionEnd::Clean(why) => {
                eprintln!(
                    "rrc backup: primary {node} said goodbye ({why}); holding nothing for it now; waiting for a primary"
                );
                self.forget();
                return Outcome::Wait;
            }
            SessionEnd::Refused { reason } => {
                eprintln!(
                    "rrc backup: dropped primary {node}: {reason}; not a failure of the primary, so no takeover; waiting for a primary"
                );
                self.forget();
                return Outcome::Wait;
            }
            SessionEnd::Failed { reason, last_heard } => (reason, last_heard),
        };
        let Some(c) = self.committed.clone() else {
            eprintln!(
                "rrc backup: primary {node} failed ({reason}) before a checkpoint was committed; waiting for a primary"
            );
            return Outcome::Wait;
        };
        let silent_for = last_heard.elapsed();
        eprintln!(
            "rrc backup: primary {node} failed ({reason}); taking over {service} from checkpoint {} of series {}",
            c.epoch, c.series
        );
        let (arbiter, won) = match (&opts.arbiter, term) {
            (Some(arbiter), Some(term)) => {
                let mut a = Arbitration::watch(arbiter.clone(), &service, &opts.node, &node, term);
                self.set_status(&|s| s.state = "asking the arbiter to take over".into());
                match claim(&mut a, &node, returned) {
                    Claimed::Won(took) => (Some(took), Some(a)),
                    Claimed::Lost => {
                        self.forget();
                        return Outcome::Wait;
                    }
                    Claimed::Returned(g) => return Outcome::Returned(g),
                }
            }
            _ => (None, None),
        };
        Outcome::TakeOver(Box::new(Decided {
            committed: c,
            log,
            silent_for,
            arbiter,
            won,
            service,
            primary_identity: identity,
        }))
    }

    /// Takes over as `d` decided: fences the primary (if told how),
    /// writes the log out beside the image and resumes the service with
    /// `resume`; `metrics` is the endpoint's socket for the primary this
    /// makes, if it protects the service again.
    fn take_over(
        &self,
        d: Decided,
        metrics: Option<Arc<TcpListener>>,
        resume: &mut Resume<'_>,
    ) -> Result<Takeover, Error> {
        let opts = self.opts;
        let image = self.image();
        let t1 = Instant::now();
        if let Some(cmd) = &opts.fence {
            fence(cmd)?;
        }
        let fenced = t1.elapsed();
        let log = match (&d.committed.position, d.log) {
            (Some(_), Some(store)) => write_log(&store, &image, &self.dir.join("log")),
            (Some(_), None) => LogFound::Lost("no log was kept".into()),
            (None, _) => LogFound::None,
        };
        let protect = opts.then_protect.as_ref().map(|to| Protect {
            backup: to.backup,
            key: opts.key.clone(),
            node: opts.node.clone(),
            service: d.service.clone(),
            arbitration: d.won.clone(),
            epoch: to.epoch,
            heartbeat: to.heartbeat,
            timeout: to.timeout,
            work_dir: self.dir.join("primary"),
            metrics: metrics.clone(),
            identity: opts.trust.as_ref().and_then(|t| {
                d.primary_identity.map(|theirs| rrc_wire::Identified {
                    ours: t.ours.clone(),
                    peers: vec![theirs],
                })
            }),
        });
        // Without a primary to serve on it, the endpoint closes here, not
        // in the restored container's supervisor.
        drop(metrics);
        let t2 = Instant::now();
        let resumed = resume(&image, &log, protect.as_ref()).map_err(Error::Takeover)?;
        Ok(Takeover {
            epoch: d.committed.epoch,
            silent_for: d.silent_for,
            arbiter: d.arbiter,
            fence: fenced,
            restore: t2.elapsed(),
            resumed,
            log,
        })
    }
}

/// Listens for primaries on the options' address.
fn listen(opts: &BackupOptions) -> Result<Acceptor, Error> {
    let listener = TcpListener::bind(opts.listen).map_err(|e| Error::Io {
        what: format!("listen on {}", opts.listen),
        source: e,
    })?;
    Acceptor::start(
        listener,
        opts.key.clone(),
        opts.node.clone(),
        opts.trust.clone(),
    )
    .map_err(|e| Error::Io {
        what: "start accepting primaries".into(),
        source: e,
    })
}

/// Serves `metrics` on the options' endpoint, if there is one.
fn serve_metrics(
    opts: &BackupOptions,
    metrics: &Arc<MetricsHub>,
) -> Result<Option<MetricsServer>, Error> {
    opts.metrics
        .as_ref()
        .map(|l| {
            l.try_clone()
                .and_then(|l| MetricsServer::start(l, metrics.clone()))
        })
        .transpose()
        .map_err(|e| Error::Io {
            what: "serve metrics".into(),
            source: e,
        })
}

/// Serves primaries one after the other until one fails with a committed
/// checkpoint here; then takes over (see [`Watch::take_over`]) and
/// returns.
pub fn serve(
    opts: &BackupOptions,
    mut resume: impl FnMut(&Path, &LogFound, Option<&Protect>) -> Result<Resumed, String>,
) -> Result<Takeover, Error> {
    let metrics = MetricsHub::new();
    let mut watch = Watch::new(opts, opts.dir.clone(), metrics.clone())?;
    let mut acceptor = listen(opts)?;
    let mut metrics_server = serve_metrics(opts, &metrics)?;
    tracing::info!(listen = %opts.listen, "backup waiting for a primary");
    eprintln!("rrc backup: waiting for a primary on {}", opts.listen);
    // A primary that connected while a takeover waited for the arbiter.
    let mut arrived: Option<Greeted> = None;
    loop {
        let Some(g) = arrived.take().or_else(|| acceptor.next()) else {
            return Err(Error::Protocol("the acceptor stopped".into()));
        };
        let d = match watch.serve(g, &|d| acceptor.next_within(d)) {
            Outcome::Wait => continue,
            Outcome::Returned(g) => {
                arrived = Some(*g);
                continue;
            }
            Outcome::TakeOver(d) => *d,
        };
        // The takeover forks the restored container's supervisor: no
        // thread of the acceptor (or the metrics) may be left.
        acceptor.stop();
        metrics.service(&d.service, Role::Primary).takeovers.inc();
        // The endpoint's socket goes to the primary this takeover makes,
        // if it protects the service again.
        let socket = match metrics_server.take().map(MetricsServer::hand_over) {
            Some(Ok(l)) => Some(Arc::new(l)),
            Some(Err(e)) => {
                tracing::warn!(error = %e, "the metrics endpoint cannot be handed over");
                None
            }
            None => None,
        };
        return watch.take_over(d, socket, &mut resume);
    }
}

/// Serves any number of primaries at once, one per service, each watched
/// in a directory of its own under the backup's (`DIR/SERVICE`). When one
/// fails, its service is taken over by `resume`, which must run the
/// restore in a process of its own (this one goes on serving the others,
/// with their threads, and a restored container's supervisor is forked
/// from a process with one thread only); `report` is told how each
/// takeover went. Returns only on an error of the backup itself.
pub fn serve_many(
    opts: &BackupOptions,
    resume: &ResumeElsewhere<'_>,
    report: &(dyn Fn(&str, &Takeover) + Sync),
) -> Result<(), Error> {
    fs::create_dir_all(&opts.dir).map_err(Error::io(&opts.dir))?;
    fs::set_permissions(
        &opts.dir,
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .map_err(Error::io(&opts.dir))?;
    let acceptor = listen(opts)?;
    let hub = MetricsHub::new();
    let _metrics_server = serve_metrics(opts, &hub)?;
    tracing::info!(listen = %opts.listen, "backup waiting for primaries");
    eprintln!(
        "rrc backup: waiting for a primary of any service on {}",
        opts.listen
    );
    std::thread::scope(|scope| {
        let mut routes: std::collections::HashMap<String, mpsc::Sender<Greeted>> =
            std::collections::HashMap::new();
        loop {
            let Some(mut g) = acceptor.next() else {
                return Err(Error::Protocol("the acceptor stopped".into()));
            };
            // The service is the primary's container name: checked as
            // one, it is a plain directory name too.
            if g.service.parse::<ContainerName>().is_err() {
                eprintln!(
                    "rrc backup: refused primary {} ({}): {:?} is not a container name",
                    g.node, g.peer, g.service
                );
                continue;
            }
            if let Some(tx) = routes.get(&g.service) {
                match tx.send(g) {
                    Ok(()) => continue,
                    // Its watch ended (a takeover): a new one for it.
                    Err(mpsc::SendError(back)) => g = back,
                }
            }
            let (tx, rx) = mpsc::channel();
            let service = g.service.clone();
            let dir = opts.dir.join(&service);
            tx.send(g).expect("the receiver is here");
            routes.insert(service.clone(), tx);
            let hub = hub.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("rrc-watch-{service}"))
                .spawn_scoped(scope, move || {
                    if let Err(e) = watch_service(opts, dir, &rx, &hub, resume, report) {
                        eprintln!("rrc backup: {service}: {e}");
                    }
                });
            if let Err(e) = spawned {
                eprintln!("rrc backup: cannot watch {}: {e}", routes.len());
            }
        }
    })
}

/// One service of a backup serving several: its primaries' sessions one
/// after the other, until a takeover.
fn watch_service(
    opts: &BackupOptions,
    dir: PathBuf,
    rx: &mpsc::Receiver<Greeted>,
    hub: &Arc<MetricsHub>,
    resume: &ResumeElsewhere<'_>,
    report: &(dyn Fn(&str, &Takeover) + Sync),
) -> Result<(), Error> {
    let mut watch = Watch::new(opts, dir, hub.clone())?;
    let mut arrived = None;
    loop {
        let g = match arrived.take() {
            Some(g) => g,
            None => match rx.recv() {
                Ok(g) => g,
                Err(_) => return Ok(()),
            },
        };
        let service = g.service.clone();
        match watch.serve(g, &|d| rx.recv_timeout(d).ok()) {
            Outcome::Wait => {}
            Outcome::Returned(g) => arrived = Some(*g),
            Outcome::TakeOver(d) => {
                hub.service(&d.service, Role::Primary).takeovers.inc();
                let t = watch.take_over(*d, None, &mut |image, log, protect| {
                    resume(image, log, protect).map(|()| Resumed::ByHelper)
                })?;
                report(&service, &t);
                return Ok(());
            }
        }
    }
}

/// How a takeover's claim ended.
enum Claimed {
    /// The arbiter gave the service to this host (after this long).
    Won(Duration),
    /// The primary still serves: no takeover.
    Lost,
    /// A primary connected while the arbiter could not be reached: the
    /// link is back, and nothing was decided.
    Returned(Box<Greeted>),
}

/// Claims the service from the arbiter before a takeover, asking again
/// while it cannot be reached (nothing is restored meanwhile), unless a
/// primary connects first.
fn claim(
    a: &mut Arbitration,
    primary: &str,
    returned: &dyn Fn(Duration) -> Option<Greeted>,
) -> Claimed {
    let started = Instant::now();
    let mut said = false;
    loop {
        let d = a.claim();
        match d.claim {
            Ok(Claim::Won(t)) => {
                eprintln!(
                    "rrc backup: the arbiter gave {} to this host at term {} ({:.1} ms)",
                    a.service(),
                    t.number,
                    d.took.as_secs_f64() * 1e3
                );
                return Claimed::Won(started.elapsed());
            }
            Ok(Claim::Lost(now)) => {
                let who = now.map_or("nobody".to_string(), |t| t.to_string());
                eprintln!(
                    "rrc backup: NOT TAKING OVER: the arbiter's record of {} moved on from term {} of {primary} ({who}): the primary lives and serves; waiting for a primary",
                    a.service(),
                    a.term().number
                );
                return Claimed::Lost;
            }
            Err(e) => {
                if !said {
                    said = true;
                    eprintln!(
                        "rrc backup: cannot take over yet: {e}; nothing is restored until the arbiter answers (asking every {} ms)",
                        CLAIM_RETRY.as_millis()
                    );
                }
                if let Some(g) = returned(CLAIM_RETRY) {
                    eprintln!(
                        "rrc backup: primary {} connected again before the arbiter answered: no takeover",
                        g.node
                    );
                    return Claimed::Returned(Box::new(g));
                }
            }
        }
    }
}

/// The takeover's restore: the image as a container on this host (same
/// name, address and MAC; `how` says the uplink and how the memory comes
/// in), supervised by a background process; what it said once it ran. A
/// recorded program stops recording (its log went to the primary's
/// backup, which this host no longer has).
pub fn restore_as_container(
    image: &Path,
    how: &Restoring,
    protect: Option<&Protect>,
) -> Result<String, String> {
    let (spec, _copy) = how.unrecorded(image)?;
    let launch = crate::takeover::protected(
        Launch::new(Source::Image(spec)),
        protect,
        Arc::new(std::sync::atomic::AtomicBool::new(true)),
        None,
    )?;
    crate::takeover::run_restored(launch)
}

/// Writes the log held since the committed checkpoint into `dir`, as a
/// recording directory `rrc replay` reads beside the image.
fn write_log(store: &LogStore, image: &Path, dir: &Path) -> LogFound {
    let _ = fs::remove_dir_all(dir);
    let written = store
        .write_to(dir)
        .map_err(|e| e.to_string())
        .and_then(|(from, until)| match RecordingAnnotation::read(image) {
            Ok(Some(a)) => RecordingDir::write_info(dir, a.ring_fd, None)
                .map(|()| (from, until))
                .map_err(|e| e.to_string()),
            Ok(None) => Err("the checkpoint is not of a recorded program".into()),
            Err(e) => Err(e.to_string()),
        });
    match written {
        Ok((from, until)) => LogFound::Written(LogWritten {
            dir: dir.to_path_buf(),
            from,
            until,
        }),
        Err(e) => {
            eprintln!("rrc backup: the log could not be written out: {e}");
            LogFound::Lost(e)
        }
    }
}

fn fence(cmd: &str) -> Result<(), Error> {
    let out = Command::new("sh")
        .args(["-c", cmd])
        .output()
        .map_err(|e| Error::Io {
            what: format!("run the fence command {cmd:?}"),
            source: e,
        })?;
    if !out.status.success() {
        return Err(Error::Fence(format!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// Receives checkpoints and the log until the primary leaves or fails;
/// returns how, and the log held at that moment.
fn session(
    s: SecureStream,
    opts: &BackupOptions,
    dir: &Path,
    committed: &mut Option<Committed>,
    metrics: &Arc<Metrics>,
    status: &Arc<Mutex<StatusFile>>,
) -> (SessionEnd, Option<LogStore>) {
    let (reader, writer) = s.split();
    let _ = writer.set_write_timeout(Some(opts.timeout));
    let base = committed
        .as_ref()
        .and_then(|c| c.position)
        .unwrap_or_default();
    let shared = Arc::new(Shared {
        writer: Mutex::new(writer),
        metrics: metrics.clone(),
        status: status.clone(),
        committed: Mutex::new(committed.clone()),
        log: Mutex::new(LogStore::new(base)),
        acked: Mutex::new(base),
        broken: Mutex::new(None),
        longest_silence_us: AtomicU64::new(0),
    });
    let (tx, rx) = mpsc::channel::<Message>();
    let committer = {
        let shared = shared.clone();
        let image = dir.join("image");
        let incoming = dir.join("incoming");
        std::thread::Builder::new()
            .name("rrc-commit".into())
            .spawn(move || checkpoint_loop(&shared, &image, &incoming, rx))
    };
    let end = match &committer {
        Ok(_) => read_loop(reader, opts, &shared, &tx),
        Err(e) => SessionEnd::Failed {
            reason: format!("cannot start committing: {e}"),
            last_heard: Instant::now(),
        },
    };
    // The committer finishes what it has (a checkpoint complete and
    // verified is as good as any), then ends.
    drop(tx);
    if let Ok(t) = committer {
        let _ = t.join();
    }
    let Ok(shared) = Arc::try_unwrap(shared) else {
        return (end, None);
    };
    *committed = shared
        .committed
        .into_inner()
        .unwrap_or_else(|p| p.into_inner());
    let log = shared.log.into_inner().unwrap_or_else(|p| p.into_inner());
    (end, Some(log))
}

fn read_loop(
    mut r: SecureReader,
    opts: &BackupOptions,
    shared: &Shared,
    checkpoints: &mpsc::Sender<Message>,
) -> SessionEnd {
    let mut last_heard = Instant::now();
    let failed = |reason: String, last_heard: Instant| SessionEnd::Failed { reason, last_heard };
    if let Err(e) = r.set_read_timeout(Some(opts.timeout)) {
        return failed(e.to_string(), last_heard);
    }
    // Log that arrived since the last acknowledgement: acknowledged once
    // nothing more is there to read (one acknowledgement for a burst).
    let mut unacknowledged = false;
    loop {
        let next = if unacknowledged {
            match r.try_recv() {
                Ok(Some(m)) => Ok(m),
                Ok(None) => {
                    unacknowledged = false;
                    if !shared.acknowledge() {
                        return failed("link broken".into(), last_heard);
                    }
                    continue;
                }
                Err(e) => Err(e),
            }
        } else {
            r.recv_polling(crate::POLL_SPIN)
        };
        let msg = match next {
            Ok(m) => m,
            Err(WireError::Timeout) => {
                return failed(
                    format!("silent for {} ms", opts.timeout.as_millis()),
                    last_heard,
                );
            }
            Err(e) => return shared.ended(format!("link broken: {e}"), last_heard),
        };
        shared.heard_after(last_heard.elapsed());
        last_heard = Instant::now();
        let ok = match msg {
            Message::Heartbeat { sent_unix_ns } => shared.send(&Message::HeartbeatAck {
                echo_unix_ns: sent_unix_ns,
            }),
            Message::Bye { reason } => {
                // Closed at once, not once the checkpoint being committed
                // is: the primary waits for that to let its replies go.
                crate::lock(&shared.writer).abort("the primary said goodbye");
                return SessionEnd::Clean(reason);
            }
            Message::Log { data } => {
                shared.metrics.log_bytes.inc_by(data.len() as u64);
                let r = crate::lock(&shared.log).add_records(&data);
                stored(shared, r, &mut unacknowledged)
            }
            Message::NetLog { first, frames } => {
                let bytes: usize = frames.iter().map(|f| f.len()).sum();
                shared.metrics.log_bytes.inc_by(bytes as u64);
                let r = crate::lock(&shared.log).add_frames(first, frames);
                stored(shared, r, &mut unacknowledged)
            }
            // Staged and committed on the checkpoint thread, in order: the
            // disk's pace (files are synced) must not hold up the log.
            m @ (Message::DeltaBegin { .. }
            | Message::FileChunk { .. }
            | Message::DeltaEnd { .. }) => checkpoints.send(m).is_ok(),
            other => {
                return failed(
                    format!("unexpected {}", other.message_type().name()),
                    last_heard,
                );
            }
        };
        if !ok {
            return shared.ended("link broken".into(), last_heard);
        }
    }
}

/// After log data arrived: it is to be acknowledged once stored; if it
/// does not check out, the primary is told, and starts over from a full
/// checkpoint. False once the link is broken.
fn stored(
    shared: &Shared,
    r: Result<(), crate::log_store::LogStoreError>,
    unacknowledged: &mut bool,
) -> bool {
    match r {
        Ok(()) => {
            *unacknowledged = true;
            true
        }
        Err(e) => {
            tracing::warn!(reason = %e, "log data refused");
            shared.send(&Message::BackupError {
                reason: format!("log data refused: {e}"),
            })
        }
    }
}

/// Stages the checkpoints the primary sends and commits each once
/// complete, until the session ends. A checkpoint the primary sent wrong
/// ends the session (it is the primary's fault: the link reports it). One
/// this host cannot keep (its own fault: a full disk) is dropped and the
/// primary told, and the session goes on.
fn checkpoint_loop(shared: &Shared, image: &Path, incoming: &Path, rx: mpsc::Receiver<Message>) {
    let _ = fs::remove_dir_all(incoming);
    let mut progress = Progress::default();
    let mut stage: Option<Stage> = None;
    // The checkpoint coming in could not be kept: its pieces are dropped
    // until its end.
    let mut dropping = false;
    for m in rx {
        let reply = match m {
            m @ Message::DeltaBegin { .. } => {
                // A delta left half-way (it cannot be: one connection, in
                // order) is dropped with its staging.
                dropping = false;
                let begun = fs::create_dir_all(incoming)
                    .map_err(WireError::from)
                    .and_then(|()| {
                        let mut st = Stage::new(incoming);
                        st.receive(&m).map(|()| st)
                    });
                match begun {
                    Ok(st) => {
                        stage = Some(st);
                        None
                    }
                    Err(WireError::Io(e)) => {
                        dropping = true;
                        if !shared.local_fault("staging a checkpoint", &e) {
                            return;
                        }
                        None
                    }
                    Err(e) => Some(Message::NeedFull {
                        reason: e.to_string(),
                    }),
                }
            }
            Message::FileChunk { .. } if dropping => None,
            m @ Message::FileChunk { .. } => match stage.as_mut().map(|st| st.receive(&m)) {
                Some(Ok(())) => None,
                Some(Err(WireError::Io(e))) => {
                    stage = None;
                    dropping = true;
                    if !shared.local_fault("staging a checkpoint", &e) {
                        return;
                    }
                    None
                }
                Some(Err(e)) => return shared.fail(format!("bad checkpoint data: {e}")),
                None => return shared.fail("a file chunk outside a checkpoint".into()),
            },
            Message::DeltaEnd { .. } if dropping => {
                dropping = false;
                None
            }
            m @ Message::DeltaEnd { .. } => {
                let Some(mut st) = stage.take() else {
                    return shared.fail("a checkpoint end without its beginning".into());
                };
                let series = st.series().unwrap_or_default().to_string();
                match st.receive(&m) {
                    Ok(()) => {}
                    Err(WireError::Io(e)) => {
                        if !shared.local_fault("staging a checkpoint", &e) {
                            return;
                        }
                        continue;
                    }
                    Err(e) => return shared.fail(format!("bad checkpoint: {e}")),
                }
                let t0 = Instant::now();
                match st.finish() {
                    Ok(layer) => commit_staged(shared, &layer, image, series, t0, &mut progress),
                    Err(WireError::Io(e)) => {
                        if !shared.local_fault("staging a checkpoint", &e) {
                            return;
                        }
                        None
                    }
                    Err(e) => Some(Message::NeedFull {
                        reason: e.to_string(),
                    }),
                }
            }
            _ => None,
        };
        if let Some(reply) = reply
            && (!shared.send(&reply) || !shared.acknowledge())
        {
            return;
        }
    }
}

/// Commits a staged checkpoint; the answer for the primary (none when
/// this host could not keep it: the primary was told already).
fn commit_staged(
    shared: &Shared,
    layer: &Path,
    image: &Path,
    series: String,
    t0: Instant,
    progress: &mut Progress,
) -> Option<Message> {
    let previous = crate::lock(&shared.committed).clone();
    match commit(layer, image, previous.as_ref()) {
        Ok((epoch, position)) => {
            if let Some(pos) = position {
                crate::lock(&shared.log).committed(pos);
            }
            *crate::lock(&shared.committed) = Some(Committed {
                series,
                epoch,
                position,
            });
            shared.metrics.committed();
            shared.metrics.protected.set(1);
            {
                let mut f = crate::lock(&shared.status);
                let first = !f.status.holds_checkpoint;
                f.status.holds_checkpoint = true;
                f.status.committed = shared.metrics.commits.get();
                f.status.last_commit_unix_ms = Some(crate::backup_status::unix_ms());
                f.status.log_bytes = shared.metrics.log_bytes.get();
                if first {
                    f.write();
                } else {
                    f.write_soon();
                }
            }
            progress.add(epoch, t0.elapsed());
            Some(Message::Committed { epoch })
        }
        Err(e) if io_cause(&e) => {
            let _ = fs::remove_dir_all(layer);
            // The image here is still the last good one (an apply leaves
            // it whole), but the primary goes on without waiting for it.
            let _ = shared.local_fault("committing a checkpoint", &e);
            None
        }
        Err(e) => {
            eprintln!("rrc backup: a checkpoint was refused: {e}");
            Some(Message::NeedFull {
                reason: e.to_string(),
            })
        }
    }
}

/// Whether an I/O error of this host is behind `e` (its own fault, not
/// the primary's).
fn io_cause(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(e);
    while let Some(c) = cause {
        if c.is::<std::io::Error>() {
            return true;
        }
        cause = c.source();
    }
    false
}

/// Makes the staged checkpoint at `layer` the image: the first of a series
/// replaces it (once checked), a delta is applied onto it. Returns its
/// epoch and the log position it stands at, if it records one.
fn commit(
    layer: &Path,
    image: &Path,
    previous: Option<&Committed>,
) -> Result<(u64, Option<LogPosition>), Error> {
    let l = ImageDir::new(layer);
    let m = l.read_manifest()?;
    let lineage = m
        .lineage
        .clone()
        .ok_or_else(|| Error::Protocol("a checkpoint without lineage".into()))?;
    let position = match m.annotations.get(POSITION_ANNOTATION) {
        None => None,
        Some(v) => Some(
            serde_json::from_value::<LogPosition>(v.clone()).map_err(|e| {
                Error::Protocol(format!("a checkpoint with a bad log position: {e}"))
            })?,
        ),
    };
    if m.parent.is_none() {
        rrc_ckpt::store::verify(&l, &m)?;
        let old = image.with_extension("old");
        let _ = fs::remove_dir_all(&old);
        if image.exists() {
            fs::rename(image, &old).map_err(Error::io(image))?;
        }
        fs::rename(layer, image).map_err(Error::io(image))?;
        let _ = fs::remove_dir_all(&old);
        Ok((lineage.epoch, position))
    } else {
        if previous.is_none() {
            return Err(Error::Protocol(
                "a delta with no full checkpoint before it".into(),
            ));
        }
        let r = rrc_ckpt::store::apply(image, layer).map(|_| (lineage.epoch, position));
        let _ = fs::remove_dir_all(layer);
        r.map_err(Error::from)
    }
}

/// Progress lines, one every few seconds.
#[derive(Default)]
struct Progress {
    since: Option<Instant>,
    count: u64,
    apply: Duration,
}

impl Progress {
    fn add(&mut self, epoch: u64, took: Duration) {
        self.count += 1;
        self.apply += took;
        let since = *self.since.get_or_insert_with(Instant::now);
        if epoch == 0 || since.elapsed() >= Duration::from_secs(5) {
            eprintln!(
                "rrc backup: committed checkpoint {epoch} ({} since the last report, {:.1} ms each to commit)",
                self.count,
                self.apply.as_secs_f64() * 1e3 / self.count as f64
            );
            *self = Progress {
                since: Some(Instant::now()),
                ..Default::default()
            };
        }
    }
}
