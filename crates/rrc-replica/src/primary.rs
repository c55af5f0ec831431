//! The primary: beside its container (a companion in the supervisor's
//! loop, whose thread may trace the container), an incremental checkpoint
//! every epoch handed to the link; the gate holds the container's outbound
//! frames until the backup holds what produced them. Without a backup the
//! service goes on unprotected, and says so loudly, until one is back and
//! has received a full checkpoint.
//!
//! Two modes share all of it:
//! - checkpoint: frames wait for the next committed checkpoint;
//! - responsive: the program runs recorded (librrc), its log and its
//!   inbound frames go to the backup as they come ([`crate::shipper`]),
//!   every outbound frame is tagged with the log position it depends on,
//!   and each checkpoint records the position it stands at. The release
//!   rule is still the commit here; the gate notes when each frame could
//!   have left had it waited only for the log.
//!
//! [`Replication`] wires the pieces together before the container exists
//! (the gate must be there when it starts); the companion it makes runs
//! them once it does.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::os::fd::BorrowedFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rrc_arbiter::Claim;
use rrc_ckpt::dump::Annotations;
use rrc_ckpt::incremental::{CopyMode, EpochReport};
use rrc_container::create::Container;
use rrc_container::epochs::{EpochCheckpointer, EpochHooks};
use rrc_container::launch::MakeCompanion;
use rrc_container::supervise::Companion;
use rrc_net::gate::PacketGate;
use rrc_rr::ring::RingSet;

use crate::arbitration::{Arbitration, CLAIM_RETRY};
use crate::gate::{DelaySummary, LogTap, Release, ReplicationGate, describe};
use crate::link::{AckHandler, Job, Link, LinkConfig, LinkEvent, Outbox};
use crate::metrics::{Metrics, MetricsHub, MetricsServer, Role};
use crate::position::{LogPosition, POSITION_ANNOTATION};
use crate::shipper::{ShipCounts, Shipper};
use crate::wake::{self, WakeFd, Waker};

/// How soon a checkpoint the log asked for is tried again after failing,
/// or after waiting for a forked child.
const IMMEDIATE_RETRY: Duration = Duration::from_millis(10);
/// How long checkpoints wait for a forked child to end: a background save
/// takes milliseconds to seconds; a child that lives on is checkpointed
/// with its parent after that.
const CHILD_WAIT: Duration = Duration::from_secs(5);
/// The slowest a checkpoint may go to the backup (bytes per second): one
/// that takes longer than the link's timeout, a second, and its size at
/// this rate loses the backup, which would otherwise hold replies for as
/// long as it trickles.
const MIN_SEND_RATE: u64 = 4 << 20;
/// After the backup said it cannot keep checkpoints (a full disk), how
/// long before a full checkpoint is tried again.
const BACKUP_FAULT_RETRY: Duration = Duration::from_secs(1);

pub struct PrimaryOptions {
    pub epoch: Duration,
    /// With an arbiter: the term this primary took at its start. Losing
    /// the backup then means claiming the next term before releasing
    /// anything the backup did not acknowledge.
    pub arbitration: Option<Arbitration>,
    /// Where checkpoints wait to be sent (removed once sent).
    pub work_dir: PathBuf,
    pub link: LinkConfig,
    pub copy: CopyMode,
    /// Where to serve metrics (`GET /metrics`), bound already.
    pub metrics: Option<std::net::TcpListener>,
    /// Takeovers that brought the service to this host (1 for the
    /// primary a takeover made), for the metrics.
    pub takeovers: u64,
}

/// Figures of a primary's run so far.
#[derive(Debug, Default, Clone, serde::Serialize, serde::Deserialize)]
pub struct PrimaryStats {
    pub committed: u64,
    pub failed: u64,
    /// Checkpoints put off a moment because the program had connections
    /// waiting to be accepted (nothing taken; tried again).
    #[serde(default)]
    pub deferred: u64,
    pub bytes_sent: u64,
    pub pause_total_us: u64,
    pub pause_max_us: u64,
    /// Checkpoints taken at once, for what the log could not cover.
    pub immediate: u64,
    /// Responsive mode: what the log carried.
    pub log: Option<ShipCounts>,
    /// How long frames waited, or would have under the log rule: all of
    /// them, and those with TCP payload.
    pub would_be_frames: DelaySummary,
    pub would_be_data: DelaySummary,
    /// The backup holds a committed checkpoint of the current series.
    #[serde(default)]
    pub protected: bool,
    /// Times the backup said it could not keep a checkpoint.
    #[serde(default)]
    pub backup_faults: u64,
    /// Backups told to let go for being too slow, which did.
    #[serde(default)]
    pub backups_dismissed: u64,
    /// The arbiter's term this primary serves under, if it has one.
    #[serde(default)]
    pub term: Option<u64>,
    /// It lost its backup and waits for the arbiter, holding replies.
    #[serde(default)]
    pub awaiting_arbiter: bool,
    /// "responsive" or "checkpoint".
    #[serde(default)]
    pub mode: String,
    /// How long ago the backup last committed a checkpoint.
    #[serde(default)]
    pub last_commit_ms_ago: Option<f64>,
    #[serde(default)]
    pub last_pause_us: u64,
    /// Responsive mode: the log not yet acknowledged by the backup
    /// (records, inbound frames).
    #[serde(default)]
    pub log_lag: Option<(u64, u64)>,
    /// Outbound frames (and bytes) held now.
    #[serde(default)]
    pub held: (usize, usize),
}

/// A replicated container's replication, before the container exists.
pub struct Replication {
    gate: Arc<ReplicationGate>,
    outbox: Arc<Outbox>,
    log: Option<Arc<Shipper>>,
    wake: (Waker, WakeFd),
    opts: PrimaryOptions,
}

impl Replication {
    /// Checkpoint-only mode.
    pub fn checkpoint_only(opts: PrimaryOptions) -> std::io::Result<Replication> {
        let gate = ReplicationGate::new(Release::Commit, None);
        Ok(Replication {
            gate,
            outbox: Outbox::new(),
            log: None,
            wake: wake::pair()?,
            opts,
        })
    }

    /// Responsive mode: the program records into `rings` (the recording's,
    /// which live as long as the program, so as long as this process);
    /// inbound TCP frames for `service` are logged; replies leave by
    /// `release`.
    pub fn responsive(
        opts: PrimaryOptions,
        rings: &'static RingSet,
        service: Ipv4Addr,
        release: Release,
    ) -> std::io::Result<Replication> {
        let outbox = Outbox::new();
        let wake = wake::pair()?;
        let shipper = Shipper::new(rings, outbox.clone(), wake.0.clone());
        let gate =
            ReplicationGate::new(release, Some((shipper.clone() as Arc<dyn LogTap>, service)));
        Ok(Replication {
            gate,
            outbox,
            log: Some(shipper),
            wake,
            opts,
        })
    }

    /// The gate the container's frames go through.
    pub fn gate(&self) -> Arc<dyn PacketGate> {
        self.gate.clone()
    }

    /// The companion that runs the replication beside the container.
    pub fn companion(self) -> MakeCompanion<'static> {
        Box::new(move |c: &Container| {
            let net = c.net().ok_or("a replicated container needs a network")?;
            self.gate.attach(net.uplink.clone());
            let p = Primary::start(self).map_err(|e| format!("starting replication: {e}"))?;
            Ok(Box::new(p) as Box<dyn Companion>)
        })
    }
}

/// The release policy's side of the backup's answers: commits release
/// the frames below the mark their checkpoint was taken at.
struct Releases {
    gate: Arc<ReplicationGate>,
    marks: Mutex<BTreeMap<u64, u64>>,
}

impl AckHandler for Releases {
    fn log_acked(&self, pos: LogPosition) {
        self.gate.log_acked(pos);
    }

    fn committed(&self, epoch: u64) {
        let mark = {
            let mut m = crate::lock(&self.marks);
            let mark = m.get(&epoch).copied();
            // Older epochs are behind us.
            *m = m.split_off(&(epoch + 1));
            mark
        };
        if let Some(mark) = mark {
            self.gate.committed(mark);
        }
    }
}

/// The checkpoint on its way to the backup.
struct InFlight {
    epoch: u64,
    /// When it was handed to the link, and how large it is on disk.
    handed: (Instant, u64),
    /// When it was sent whole, and its size.
    sent: Option<(Instant, u64)>,
}

pub struct Primary {
    gate: Arc<ReplicationGate>,
    releases: Arc<Releases>,
    link: Link,
    wake: WakeFd,
    log: Option<(Arc<Shipper>, JoinHandle<()>)>,
    opts: PrimaryOptions,
    next_at: Instant,
    epochs: Option<EpochCheckpointer>,
    connected: bool,
    in_flight: Option<InFlight>,
    /// A checkpoint was asked for at once (for what the log cannot cover).
    immediate: bool,
    /// Checkpoints refused in a row because the program had connections
    /// waiting to be accepted.
    busy_in_a_row: u32,
    /// Since when checkpoints have waited for a forked child to end.
    child_wait: Option<Instant>,
    /// Committed since the series began (0: not protected yet).
    committed_in_series: u64,
    /// A backup joined under the current term: it may take over, so
    /// losing it needs the arbiter's word.
    joined: bool,
    /// The backup was lost (why): frames stay held until the arbiter
    /// gives this host the next term.
    claiming: Option<String>,
    /// Said that the arbiter cannot be reached, for this claim.
    claim_said: bool,
    /// The backup, too slow to protect the service, is being told to let
    /// go of it (why): frames stay held until it has, since until then it
    /// could take over from a checkpoint older than what they answer.
    dismissing: Option<String>,
    /// When the claim is made (again).
    claim_at: Instant,
    taken: u64,
    stats: PrimaryStats,
    last_report: Instant,
    metrics: Arc<Metrics>,
    metrics_server: Option<MetricsServer>,
}

impl Primary {
    fn start(r: Replication) -> std::io::Result<Primary> {
        std::fs::create_dir_all(&r.opts.work_dir)?;
        // Checkpoints of the program's memory: its owner's only.
        std::fs::set_permissions(
            &r.opts.work_dir,
            std::os::unix::fs::PermissionsExt::from_mode(0o700),
        )?;
        let releases = Arc::new(Releases {
            gate: r.gate.clone(),
            marks: Mutex::default(),
        });
        let (waker, wake) = r.wake;
        // Threads start here, in the process that supervises the container.
        let log = match r.log {
            Some(l) => {
                let backstop = l.start_backstop()?;
                Some((l, backstop))
            }
            None => None,
        };
        let link = Link::start(r.opts.link.clone(), r.outbox, releases.clone(), waker)?;
        let hub = MetricsHub::new();
        let metrics = hub.service(&r.opts.link.service, Role::Primary);
        metrics.takeovers.inc_by(r.opts.takeovers);
        r.gate.observe_holds(metrics.hold.clone());
        if let Some(a) = &r.opts.arbitration {
            metrics.term.set(a.term().number as i64);
        }
        let metrics_server = match &r.opts.metrics {
            Some(l) => Some(MetricsServer::start(l.try_clone()?, hub)?),
            None => None,
        };
        Ok(Primary {
            gate: r.gate,
            releases,
            link,
            wake,
            log,
            next_at: Instant::now() + r.opts.epoch,
            opts: r.opts,
            epochs: None,
            connected: false,
            in_flight: None,
            immediate: false,
            busy_in_a_row: 0,
            child_wait: None,
            committed_in_series: 0,
            joined: false,
            claiming: None,
            dismissing: None,
            claim_said: false,
            claim_at: Instant::now(),
            taken: 0,
            stats: PrimaryStats::default(),
            last_report: Instant::now(),
            metrics,
            metrics_server,
        })
    }

    /// Figures so far.
    pub fn stats(&self) -> PrimaryStats {
        let mut s = self.stats.clone();
        s.log = self.log.as_ref().map(|(l, _)| l.counts());
        let w = self.gate.would_be();
        s.would_be_frames = DelaySummary::of(&w.frames);
        s.would_be_data = DelaySummary::of(&w.data_frames);
        s.protected = self.protected();
        s.term = self.opts.arbitration.as_ref().map(|a| a.term().number);
        s.awaiting_arbiter = self.claiming.is_some();
        s.mode = if self.log.is_some() {
            "responsive"
        } else {
            "checkpoint"
        }
        .into();
        s.last_commit_ms_ago = self
            .metrics
            .last_commit_age()
            .map(|d| d.as_secs_f64() * 1e3);
        s.log_lag = self.log.as_ref().map(|(l, _)| {
            let (reached, acked) = (l.reached(), self.gate.acked());
            (
                reached.records.saturating_sub(acked.records),
                reached.net.saturating_sub(acked.net),
            )
        });
        s.held = self.gate.held();
        s
    }

    /// The backup holds a committed checkpoint of the current series.
    fn protected(&self) -> bool {
        self.connected && self.committed_in_series > 0
    }

    /// Ends the current series (its snapshots reaped, tracking stopped).
    fn end_series(&mut self) {
        if let Some(epochs) = self.epochs.take()
            && let Err(e) = epochs.finish()
        {
            tracing::warn!(error = %e, "ending a series of checkpoints");
        }
        self.committed_in_series = 0;
    }

    fn unprotected(&mut self, why: &str) {
        if self.opts.arbitration.is_some() && self.joined {
            // The backup may be taking over: hold everything until the
            // arbiter says which side serves.
            if self.claiming.is_none() {
                eprintln!(
                    "rrc primary: {why}; holding replies until the arbiter decides who serves"
                );
            }
            self.connected = false;
            self.in_flight = None;
            self.end_series();
            self.claiming = Some(why.to_string());
            self.claim_said = false;
            self.claim_at = Instant::now();
            return;
        }
        tracing::error!("UNPROTECTED: {why}; the service goes on without a replica");
        eprintln!("rrc primary: UNPROTECTED: {why}; the service goes on without a replica");
        self.connected = false;
        self.in_flight = None;
        self.end_series();
        self.gate.open();
    }

    /// Tells a backup too slow to protect the service to let go of it;
    /// replies stay held until it has ([`LinkEvent::Dismissed`]). Opening
    /// the gate at once would let replies out that its checkpoint does not
    /// cover, while it could still take over from that checkpoint.
    fn dismiss(&mut self, why: &str) {
        if self.dismissing.is_some() {
            return;
        }
        tracing::warn!(reason = %why, "telling the backup to let go");
        eprintln!(
            "rrc primary: {why}; telling the backup to let go of the service (replies wait until it has)"
        );
        self.link.dismiss(why);
        self.dismissing = Some(why.to_string());
        self.connected = false;
        self.in_flight = None;
        self.end_series();
    }

    fn handle(&mut self, ev: LinkEvent) {
        match ev {
            LinkEvent::Connected(b) => {
                tracing::info!(backup = %b, "backup connected: sending a full checkpoint");
                eprintln!("rrc primary: backup {b} connected; sending it a full checkpoint");
                if self.claiming.take().is_some() {
                    // It did not take over (it would not be back as a
                    // backup): nothing to decide. Replies wait for its
                    // first commit.
                    eprintln!(
                        "rrc primary: the backup is back before the arbiter answered; no claim made"
                    );
                }
                self.joined = true;
                self.connected = true;
                self.dismissing = None;
                self.in_flight = None;
                self.end_series();
            }
            LinkEvent::Unreachable(why) => self.unprotected(&why.to_string()),
            LinkEvent::Lost(why) => {
                self.dismissing = None;
                self.unprotected(&format!("lost the backup ({why})"))
            }
            LinkEvent::Dismissed { let_go } => {
                let why = self.dismissing.take().unwrap_or_default();
                if let_go {
                    self.stats.backups_dismissed += 1;
                    tracing::error!(reason = %why, "UNPROTECTED: the backup let go of the service");
                    eprintln!(
                        "rrc primary: UNPROTECTED: {why}; the backup let go of the service, which goes on without a replica until it catches up"
                    );
                    self.gate.open();
                } else {
                    self.unprotected(&format!(
                        "{why}, and the backup did not answer when told to let go"
                    ));
                }
            }
            LinkEvent::NeedFull(why) => {
                tracing::warn!(reason = %why, "the backup asks for a full checkpoint");
                self.in_flight = None;
                self.end_series();
            }
            LinkEvent::BackupFault(why) => {
                // The backup is there but holds nothing it can vouch for
                // from here on: the service goes on unprotected (nothing
                // held waits for it) and a full checkpoint is tried again
                // after a while, which protects it again once committed.
                self.stats.backup_faults += 1;
                let retry = BACKUP_FAULT_RETRY.as_secs();
                tracing::error!(reason = %why, "UNPROTECTED: the backup cannot keep checkpoints");
                eprintln!(
                    "rrc primary: UNPROTECTED: the backup cannot keep checkpoints ({why}); the service goes on without a replica, and a full checkpoint is tried again in {retry} s"
                );
                self.in_flight = None;
                self.end_series();
                self.gate.open();
                self.next_at = Instant::now() + BACKUP_FAULT_RETRY;
            }
            LinkEvent::Sent { epoch, bytes } => {
                if let Some(f) = &mut self.in_flight
                    && f.epoch == epoch
                {
                    f.sent = Some((Instant::now(), bytes));
                }
            }
            LinkEvent::Committed { epoch } => {
                let Some(f) = self.in_flight.take_if(|f| f.epoch == epoch) else {
                    return;
                };
                let (sent_at, bytes) = f.sent.unwrap_or((Instant::now(), 0));
                self.stats.committed += 1;
                self.stats.bytes_sent += bytes;
                self.committed_in_series += 1;
                self.metrics.committed();
                if self.committed_in_series == 1 {
                    self.gate.protected();
                    tracing::info!(epoch, "protected: the backup holds a full checkpoint");
                    eprintln!(
                        "rrc primary: protected: the backup committed a full checkpoint ({:.1} MiB, applied {:.0} ms after it was sent)",
                        bytes as f64 / (1 << 20) as f64,
                        sent_at.elapsed().as_secs_f64() * 1e3
                    );
                }
                tracing::debug!(epoch, bytes, "committed");
            }
        }
    }

    /// Asks the arbiter for the next term, having lost the backup: won,
    /// the service goes on unprotected; lost, another host serves and the
    /// container is killed without releasing another frame; no answer,
    /// everything stays held and the claim is made again soon.
    fn settle(&mut self, c: &mut Container) {
        let (Some(why), Some(a)) = (self.claiming.clone(), self.opts.arbitration.as_mut()) else {
            return;
        };
        let d = a.claim();
        let service = a.service().to_string();
        match d.claim {
            Ok(Claim::Won(t)) => {
                self.claiming = None;
                self.joined = false;
                self.metrics.term.set(t.number as i64);
                eprintln!(
                    "rrc primary: the arbiter gave {service} to this host at term {} ({:.1} ms)",
                    t.number,
                    d.took.as_secs_f64() * 1e3
                );
                tracing::error!("UNPROTECTED: {why}; the service goes on without a replica");
                eprintln!("rrc primary: UNPROTECTED: {why}; the service goes on without a replica");
                self.gate.open();
            }
            Ok(Claim::Lost(now)) => {
                self.gate.fence();
                let who = now.map_or("nobody".to_string(), |t| t.to_string());
                tracing::error!(%who, "lost the service to another host");
                eprintln!(
                    "rrc primary: STOPPING: {why}, and the arbiter's record of {service} moved on ({who}): another host serves it; the container is killed without releasing another reply"
                );
                self.claiming = None;
                if let Err(e) = c.cgroup().kill_all(Duration::from_secs(5)) {
                    tracing::error!(error = %e, "killing the container");
                }
            }
            Err(e) => {
                if !self.claim_said {
                    self.claim_said = true;
                    eprintln!(
                        "rrc primary: still holding replies: {why}, and {e}; asking again every {} ms",
                        CLAIM_RETRY.as_millis()
                    );
                }
                self.claim_at = Instant::now() + CLAIM_RETRY;
                self.next_at = self.next_at.min(self.claim_at);
            }
        }
    }

    /// Whether the next checkpoint waits: the program forked a child that
    /// has not ended (it runs unrecorded, and a checkpoint of it may not
    /// be restorable once it is gone: the files it held, renamed). Not
    /// for longer than [`CHILD_WAIT`].
    fn waits_for_a_child(&mut self) -> bool {
        let alive = self.log.as_ref().is_some_and(|(l, _)| l.children() > 0);
        if !alive {
            self.child_wait = None;
            return false;
        }
        let since = *self.child_wait.get_or_insert_with(Instant::now);
        since.elapsed() < CHILD_WAIT
    }

    /// A backup that does not take a checkpoint in the time sending it may
    /// take (it reads, but at a trickle), or that received one whole but
    /// does not commit it within the time applying it may take, is lost.
    /// The reason, if so.
    fn checkpoint_overdue(&self) -> Option<&'static str> {
        let f = self.in_flight.as_ref()?;
        // A second besides: a loaded machine must not lose a backup that
        // is merely slow (it answers heartbeats all the while).
        let base = self.opts.link.timeout + Duration::from_secs(1);
        match f.sent {
            None => {
                let (at, bytes) = f.handed;
                let allowed = base + Duration::from_millis(bytes / (MIN_SEND_RATE / 1000));
                (at.elapsed() > allowed).then_some("the backup did not take a checkpoint in time")
            }
            Some((at, bytes)) => {
                // Applying takes time with the size (checksums first).
                let allowed = base + Duration::from_millis(bytes / (50 << 10));
                (at.elapsed() > allowed)
                    .then_some("the backup did not commit a checkpoint it was sent")
            }
        }
    }

    /// Takes the next checkpoint and hands it to the link; `was_immediate`:
    /// asked for by the log.
    fn take(&mut self, c: &mut Container, was_immediate: bool) {
        if self.epochs.is_none() {
            match EpochCheckpointer::start(c, self.opts.copy) {
                Ok(e) => self.epochs = Some(e),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot start checkpointing the container");
                    return;
                }
            }
        }
        let dir = self.opts.work_dir.join(format!("{:08}", self.taken));
        self.taken += 1;
        let _ = std::fs::remove_dir_all(&dir);
        let epochs = self.epochs.as_mut().expect("set above");
        let mut marks = Marks {
            gate: &self.gate,
            log: self.log.as_ref().map(|(l, _)| l.as_ref()),
            first: epochs.next_epoch() == 0,
            held_before: self.gate.is_holding(),
            mark: 0,
            at: LogPosition::default(),
        };
        let r = epochs.take(c, &dir, &mut marks);
        let (mark, at) = (marks.mark, marks.at);
        match r {
            Ok(r) => {
                self.busy_in_a_row = 0;
                let pause = r.checkpoint.frozen.as_micros() as u64;
                self.metrics
                    .pause
                    .observe(r.checkpoint.frozen.as_secs_f64());
                self.stats.pause_total_us += pause;
                self.stats.last_pause_us = pause;
                self.stats.pause_max_us = self.stats.pause_max_us.max(pause);
                if let Some((log, _)) = &self.log {
                    log.checkpoint_at(at);
                }
                let epoch = r.lineage.epoch;
                crate::lock(&self.releases.marks).insert(epoch, mark);
                self.in_flight = Some(InFlight {
                    epoch,
                    handed: (Instant::now(), r.checkpoint.image_bytes),
                    sent: None,
                });
                self.link.send(Job {
                    series: r.lineage.series,
                    epoch,
                    parent: epoch.checked_sub(1),
                    dir,
                });
            }
            Err(rrc_ckpt::Error::Busy(why)) => {
                // Nothing was read: the series keeps its place, and the
                // same checkpoint is tried again soon (sooner than an
                // epoch: replies may be waiting for it), less often while
                // the program keeps its connections waiting.
                let _ = std::fs::remove_dir_all(&dir);
                self.stats.deferred += 1;
                self.busy_in_a_row += 1;
                let wait = IMMEDIATE_RETRY
                    .saturating_mul(1 << self.busy_in_a_row.min(6))
                    .min(self.opts.epoch);
                if self.busy_in_a_row == 8 {
                    tracing::warn!(%why, "checkpoints keep waiting for the program to accept connections");
                } else {
                    tracing::debug!(%why, ?wait, "a checkpoint waits");
                }
                self.immediate |= was_immediate;
                self.next_at = Instant::now() + wait;
            }
            Err(e) => {
                self.busy_in_a_row = 0;
                self.stats.failed += 1;
                tracing::warn!(error = %e, "a checkpoint failed; the next one saves everything");
                let _ = std::fs::remove_dir_all(&dir);
                if was_immediate {
                    // What the log cannot cover still needs a checkpoint
                    // (a fork's child may be exiting: soon reaped).
                    self.immediate = true;
                    self.next_at = Instant::now() + IMMEDIATE_RETRY;
                }
            }
        }
    }

    fn report(&mut self) {
        if self.last_report.elapsed() < Duration::from_secs(10) {
            return;
        }
        self.last_report = Instant::now();
        let s = self.stats();
        let (frames, bytes) = self.gate.held();
        tracing::info!(
            committed = s.committed,
            failed = s.failed,
            deferred = s.deferred,
            immediate = s.immediate,
            sent_mib = s.bytes_sent >> 20,
            pause_max_ms = s.pause_max_us as f64 / 1e3,
            held_frames = frames,
            held_bytes = bytes,
            "replication"
        );
        if self.log.is_some() {
            tracing::info!(
                "replies would have waited for the log: {}",
                describe(&s.would_be_data)
            );
        }
    }
}

/// The gate's and the log's side of a checkpoint: with no frame crossing
/// the gate, the mark is exactly the frames produced before it; the log
/// position is read while every thread is stopped; from the first
/// checkpoint of a series on, frames wait for the backup.
struct Marks<'a> {
    gate: &'a ReplicationGate,
    log: Option<&'a Shipper>,
    /// The first checkpoint of a series (the gate holds from it on), and
    /// whether the gate held before it.
    first: bool,
    held_before: bool,
    mark: u64,
    at: LogPosition,
}

impl EpochHooks for Marks<'_> {
    fn paused(&mut self) {
        self.mark = self.gate.mark();
    }

    fn at_freeze(&mut self) -> Annotations {
        let mut a = Annotations::new();
        if let Some(log) = self.log {
            self.at = log.reached();
            a.insert(
                POSITION_ANNOTATION.to_string(),
                serde_json::to_value(self.at).expect("positions serialize"),
            );
        }
        a
    }

    fn resumed(&mut self) {
        // Before any frame of the running tree crosses the gate.
        if self.first {
            self.gate.hold();
        }
    }

    fn after(&mut self, taken: Option<&EpochReport>) {
        // A first checkpoint that could not be written out protects
        // nothing: if nothing was held before it, what waited since it
        // resumed goes, and later frames pass as before.
        if self.first && !self.held_before && taken.is_none() {
            self.gate.open();
        }
    }
}

impl Companion for Primary {
    fn next_wake(&self) -> Option<Instant> {
        Some(self.next_at)
    }

    fn wake_fd(&self) -> Option<BorrowedFd<'_>> {
        Some(self.wake.fd())
    }

    fn on_wake(&mut self, c: &mut Container) {
        self.wake.clear();
        for ev in self.link.events() {
            self.handle(ev);
        }
        self.metrics.protected.set(i64::from(self.protected()));
        if let Some((log, _)) = &self.log {
            let n = log.counts();
            self.metrics.log_total(n.record_bytes + n.frame_bytes);
        }
        if let Some(why) = self.checkpoint_overdue() {
            self.dismiss(why);
        }
        if self.claiming.is_some() && Instant::now() >= self.claim_at {
            self.settle(c);
        }
        if let Some((log, _)) = &self.log
            && log.take_checkpoint_request()
        {
            self.immediate = true;
        }
        let now = Instant::now();
        let due = now >= self.next_at;
        let at_once = self.immediate;
        if !due && !at_once {
            return;
        }
        if self.waits_for_a_child() {
            self.next_at = now + IMMEDIATE_RETRY;
            return;
        }
        if self.connected && self.in_flight.is_none() {
            if at_once {
                self.immediate = false;
                self.stats.immediate += 1;
            }
            // The epoch counts from the last checkpoint, whatever took it.
            self.next_at = Instant::now() + self.opts.epoch;
            self.take(c, at_once);
        } else if due {
            self.next_at = (self.next_at + self.opts.epoch).max(now);
        }
        self.report();
    }

    fn on_stop(&mut self, _c: &mut Container) {
        if let Some(mut m) = self.metrics_server.take() {
            m.stop();
        }
        self.link.stop();
        if let Some((log, backstop)) = self.log.take() {
            log.stop();
            let _ = backstop.join();
        }
        self.end_series();
        self.gate.open();
        let _ = std::fs::remove_dir_all(&self.opts.work_dir);
    }

    fn takes_checkpoints(&self) -> bool {
        true
    }

    fn status(&self) -> Option<(&'static str, serde_json::Value)> {
        Some((
            "replication",
            serde_json::to_value(self.stats()).expect("stats serialize"),
        ))
    }
}
