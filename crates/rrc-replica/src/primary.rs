//! The primary: beside its container (in the supervisor's loop, whose
//! thread may trace the container), an incremental checkpoint every epoch,
//! handed to the link thread; the commit gate holds the container's
//! outbound frames until the backup has committed the checkpoint that
//! follows them. Without a backup the service goes on unprotected, and says
//! so loudly, until one is back and has received a full checkpoint.

use std::os::fd::BorrowedFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rrc_ckpt::incremental::CopyMode;
use rrc_container::create::Container;
use rrc_container::epochs::{EpochCheckpointer, EpochHooks};
use rrc_container::supervise::Companion;

use crate::gate::ReplicationGate;
use crate::link::{Job, Link, LinkConfig, LinkEvent};

pub struct PrimaryOptions {
    pub epoch: Duration,
    /// Where checkpoints wait to be sent (removed once sent).
    pub work_dir: PathBuf,
    pub link: LinkConfig,
    pub copy: CopyMode,
}

/// Figures of a primary's run so far.
#[derive(Debug, Default, Clone)]
pub struct PrimaryStats {
    pub committed: u64,
    pub failed: u64,
    pub bytes_sent: u64,
    pub pause_total: Duration,
    pub pause_max: Duration,
}

pub struct Primary {
    gate: Arc<ReplicationGate>,
    link: Link,
    opts: PrimaryOptions,
    next_at: Instant,
    epochs: Option<EpochCheckpointer>,
    connected: bool,
    /// The checkpoint on its way to the backup.
    in_flight: Option<u64>,
    /// Committed since the series began (0: not protected yet).
    committed_in_series: u64,
    taken: u64,
    stats: PrimaryStats,
    last_report: Instant,
}

impl Primary {
    /// Starts the link; the gate must be the container's.
    pub fn start(gate: Arc<ReplicationGate>, opts: PrimaryOptions) -> std::io::Result<Primary> {
        std::fs::create_dir_all(&opts.work_dir)?;
        let link = Link::start(opts.link.clone(), gate.clone())?;
        Ok(Primary {
            gate,
            link,
            next_at: Instant::now() + opts.epoch,
            opts,
            epochs: None,
            connected: false,
            in_flight: None,
            committed_in_series: 0,
            taken: 0,
            stats: PrimaryStats::default(),
            last_report: Instant::now(),
        })
    }

    pub fn stats(&self) -> &PrimaryStats {
        &self.stats
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
        tracing::error!("UNPROTECTED: {why}; the service goes on without a replica");
        eprintln!("rrc primary: UNPROTECTED: {why}; the service goes on without a replica");
        self.connected = false;
        self.in_flight = None;
        self.end_series();
        self.gate.open();
    }

    fn handle(&mut self, ev: LinkEvent) {
        match ev {
            LinkEvent::Connected(b) => {
                tracing::info!(backup = %b, "backup connected: sending a full checkpoint");
                eprintln!("rrc primary: backup {b} connected; sending it a full checkpoint");
                self.connected = true;
                self.in_flight = None;
                self.end_series();
            }
            LinkEvent::Unreachable(why) => self.unprotected(&why),
            LinkEvent::Lost(why) => self.unprotected(&format!("lost the backup ({why})")),
            LinkEvent::NeedFull(why) => {
                tracing::warn!(reason = %why, "the backup asks for a full checkpoint");
                self.in_flight = None;
                self.end_series();
            }
            LinkEvent::Committed { epoch, bytes, took } => {
                if self.in_flight == Some(epoch) {
                    self.in_flight = None;
                }
                self.stats.committed += 1;
                self.stats.bytes_sent += bytes;
                self.committed_in_series += 1;
                if self.committed_in_series == 1 {
                    tracing::info!(epoch, "protected: the backup holds a full checkpoint");
                    eprintln!(
                        "rrc primary: protected: the backup committed a full checkpoint ({:.1} MiB in {:.0} ms)",
                        bytes as f64 / (1 << 20) as f64,
                        took.as_secs_f64() * 1e3
                    );
                }
                tracing::debug!(epoch, bytes, took_ms = took.as_millis() as u64, "committed");
            }
        }
    }

    /// Takes the next checkpoint and hands it to the link.
    fn take(&mut self, c: &mut Container) {
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
            boundary: 0,
        };
        let r = epochs.take(c, &dir, &mut marks);
        let boundary = marks.boundary;
        match r {
            Ok(r) => {
                let pause = r.checkpoint.frozen;
                self.stats.pause_total += pause;
                self.stats.pause_max = self.stats.pause_max.max(pause);
                let epoch = r.lineage.epoch;
                self.in_flight = Some(epoch);
                self.link.send(Job {
                    series: r.lineage.series,
                    epoch,
                    parent: epoch.checked_sub(1),
                    dir,
                    boundary,
                });
            }
            Err(e) => {
                self.stats.failed += 1;
                tracing::warn!(error = %e, "a checkpoint failed; the next one saves everything");
                let _ = std::fs::remove_dir_all(&dir);
            }
        }
    }
}

/// The gate's side of a checkpoint: with no frame crossing the gate, the
/// mark is exactly the frames produced before it; from the first
/// checkpoint of a series on, frames wait for commits.
struct Marks<'a> {
    gate: &'a ReplicationGate,
    boundary: u64,
}

impl EpochHooks for Marks<'_> {
    fn paused(&mut self) {
        self.boundary = self.gate.mark();
    }

    fn after(&mut self, taken: Option<&rrc_ckpt::incremental::EpochReport>) {
        if taken.is_some_and(|r| r.lineage.epoch == 0) {
            self.gate.hold();
        }
    }
}

impl Companion for Primary {
    fn next_wake(&self) -> Option<Instant> {
        Some(self.next_at)
    }

    fn wake_fd(&self) -> Option<BorrowedFd<'_>> {
        Some(self.link.wake_fd())
    }

    fn on_wake(&mut self, c: &mut Container) {
        for ev in self.link.events() {
            self.handle(ev);
        }
        let now = Instant::now();
        if now < self.next_at {
            return;
        }
        self.next_at = (self.next_at + self.opts.epoch).max(now);
        if self.connected && self.in_flight.is_none() {
            self.take(c);
        }
        if self.last_report.elapsed() >= Duration::from_secs(10) {
            self.last_report = Instant::now();
            let s = &self.stats;
            let (frames, bytes) = self.gate.held();
            tracing::info!(
                committed = s.committed,
                failed = s.failed,
                sent_mib = s.bytes_sent >> 20,
                pause_max_ms = s.pause_max.as_secs_f64() * 1e3,
                held_frames = frames,
                held_bytes = bytes,
                "replication"
            );
        }
    }

    fn takes_checkpoints(&self) -> bool {
        true
    }

    fn on_stop(&mut self, _c: &mut Container) {
        self.link.stop();
        self.end_series();
        self.gate.open();
        let _ = std::fs::remove_dir_all(&self.opts.work_dir);
    }
}
