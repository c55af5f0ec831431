//! Protection after a takeover: the container the backup restored becomes
//! a primary itself, replicating to a backup at an address given in
//! advance (`rrc backup --then-protect-to ADDR`, typically the old
//! primary's host). It runs unprotected until an `rrc backup` listens
//! there, which then receives a full checkpoint; from its first commit on
//! the service is protected again, with neither the service nor its
//! connections restarted.
//!
//! After a takeover by replay the program records again, into rings rrc
//! hands it as it goes live, so the new primary replicates in responsive
//! mode as the old one did (replies leave once the new backup has the log
//! that made them). After a takeover from a checkpoint alone (the
//! fallback, or a primary in checkpoint mode) the program runs
//! unrecorded, and the new primary replicates in checkpoint-only mode
//! (replies wait for commits). It serves under the term the backup won, so
//! a later claim by its own backup starts from there. Its replication
//! starts only once the service is live: a takeover by replay must not be
//! checkpointed half-way.

use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::BorrowedFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rrc_ckpt::incremental::CopyMode;
use rrc_container::create::Container;
use rrc_container::launch::{Launch, MakeCompanion};
use rrc_container::supervise::Companion;
use rrc_wire::Key;

use crate::arbitration::Arbitration;
use crate::gate::Release;
use crate::link::LinkConfig;
use crate::primary::{PrimaryOptions, Replication};

/// A program taken over by replay that records again: the rings it takes
/// as it goes live, and the service address whose frames are logged.
#[derive(Clone, Copy)]
pub struct Recorded {
    pub rings: &'static rrc_rr::ring::RingSet,
    pub service: Ipv4Addr,
}

/// How often a replication waiting for the service to go live looks.
const LIVE_POLL: Duration = Duration::from_millis(20);

/// What the new primary replicates with.
#[derive(Clone)]
pub struct Protect {
    /// Where its backup will listen.
    pub backup: SocketAddr,
    pub key: Arc<Key>,
    /// This host's name.
    pub node: String,
    pub service: String,
    /// The term the takeover won, with the arbiter (if there is one).
    pub arbitration: Option<Arbitration>,
    pub epoch: Duration,
    pub heartbeat: Duration,
    pub timeout: Duration,
    /// Where its checkpoints wait to be sent.
    pub work_dir: PathBuf,
    /// The backup's metrics endpoint, served on by the new primary.
    pub metrics: Option<Arc<std::net::TcpListener>>,
    /// Host identities: this host's, and the one expected of the next
    /// backup (the failed primary's host).
    pub identity: Option<rrc_wire::Identified>,
}

impl Protect {
    /// `launch` with the replication: its gate, and its companion, which
    /// starts once `live` is set. In responsive mode if the program
    /// records again (`recorded`).
    pub fn attach<'a>(
        &self,
        launch: Launch<'a>,
        live: Arc<AtomicBool>,
        recorded: Option<Recorded>,
    ) -> std::io::Result<Launch<'a>> {
        let opts = PrimaryOptions {
            epoch: self.epoch,
            work_dir: self.work_dir.clone(),
            link: LinkConfig {
                backup: self.backup,
                key: self.key.clone(),
                node: self.node.clone(),
                service: self.service.clone(),
                term: self.arbitration.as_ref().map(Arbitration::announced),
                heartbeat: self.heartbeat,
                timeout: self.timeout,
                identity: self.identity.clone(),
            },
            arbitration: self.arbitration.clone(),
            copy: CopyMode::Auto,
            metrics: self.metrics.as_ref().map(|l| l.try_clone()).transpose()?,
            takeovers: 1,
        };
        let (repl, mode) = match recorded {
            Some(r) => (
                Replication::responsive(opts, r.rings, r.service, Release::LogAck)?,
                "responsive",
            ),
            None => (Replication::checkpoint_only(opts)?, "checkpoint"),
        };
        let gate = repl.gate();
        Ok(launch
            .gate(gate)
            .companion(when_live(repl.companion(), live, mode)))
    }
}

/// What a backup serving several services hands the process that takes
/// one of them over, as JSON on its standard input: the log, and what
/// protects the service again.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct ResumeJob {
    pub log: crate::backup::LogFound,
    pub protect: Option<ProtectJob>,
}

/// A [`Protect`] without its live parts (the key, the arbiter's client),
/// which the process that receives it makes again from its own options.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct ProtectJob {
    pub backup: SocketAddr,
    pub node: String,
    pub service: String,
    /// The term the takeover won, if there is an arbiter.
    pub term: Option<rrc_arbiter::Term>,
    pub epoch: Duration,
    pub heartbeat: Duration,
    pub timeout: Duration,
    pub work_dir: PathBuf,
    /// The next backup's host identity (hex), if identities are in use.
    #[serde(default)]
    pub peer_identity: Option<String>,
}

impl ProtectJob {
    pub fn of(p: &Protect) -> ProtectJob {
        ProtectJob {
            backup: p.backup,
            node: p.node.clone(),
            service: p.service.clone(),
            term: p.arbitration.as_ref().map(|a| a.term().clone()),
            epoch: p.epoch,
            heartbeat: p.heartbeat,
            timeout: p.timeout,
            work_dir: p.work_dir.clone(),
            peer_identity: p
                .identity
                .as_ref()
                .and_then(|i| i.peers.first())
                .map(|k| k.to_string()),
        }
    }

    /// The protection again, with the key, the arbiter (needed if the
    /// takeover won a term) and this host's identity (needed if the job
    /// names the next backup's).
    pub fn protect(
        self,
        key: Arc<Key>,
        arbiter: Option<Arc<dyn rrc_arbiter::Arbiter>>,
        ours: Option<Arc<rrc_wire::Identity>>,
    ) -> Result<Protect, String> {
        let identity = match (self.peer_identity, ours) {
            (Some(theirs), Some(ours)) => Some(rrc_wire::Identified {
                ours,
                peers: vec![
                    theirs
                        .parse()
                        .map_err(|e| format!("the next backup's identity: {e}"))?,
                ],
            }),
            (Some(_), None) => {
                return Err(
                    "the job names the next backup's identity, but this host has none".into(),
                );
            }
            (None, _) => None,
        };
        let arbitration = match (self.term, arbiter) {
            (Some(t), Some(a)) => Some(Arbitration::holding(a, &self.service, t)),
            (Some(_), None) => {
                return Err("the takeover won a term, but no arbiter was given".into());
            }
            (None, _) => None,
        };
        Ok(Protect {
            backup: self.backup,
            key,
            node: self.node,
            service: self.service,
            arbitration,
            epoch: self.epoch,
            heartbeat: self.heartbeat,
            timeout: self.timeout,
            work_dir: self.work_dir,
            metrics: None,
            identity,
        })
    }
}

/// A companion made by `make` once `live` is set (before, it only waits).
fn when_live(
    make: MakeCompanion<'static>,
    live: Arc<AtomicBool>,
    mode: &'static str,
) -> MakeCompanion<'static> {
    Box::new(move |_c: &Container| {
        Ok(Box::new(WhenLive {
            make: Some(make),
            live,
            mode,
            inner: None,
        }) as Box<dyn Companion>)
    })
}

struct WhenLive {
    make: Option<MakeCompanion<'static>>,
    live: Arc<AtomicBool>,
    mode: &'static str,
    inner: Option<Box<dyn Companion>>,
}

impl Companion for WhenLive {
    fn next_wake(&self) -> Option<Instant> {
        match &self.inner {
            Some(c) => c.next_wake(),
            None => Some(Instant::now() + LIVE_POLL),
        }
    }

    fn wake_fd(&self) -> Option<BorrowedFd<'_>> {
        self.inner.as_ref().and_then(|c| c.wake_fd())
    }

    fn on_wake(&mut self, container: &mut Container) {
        if self.inner.is_none() {
            if !self.live.load(Ordering::Acquire) {
                return;
            }
            let Some(make) = self.make.take() else {
                return;
            };
            match make(container) {
                Ok(c) => {
                    eprintln!(
                        "rrc: the service is live: replicating it ({} mode) to protect it again",
                        self.mode
                    );
                    self.inner = Some(c);
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot replicate the restored service");
                    eprintln!("rrc: UNPROTECTED: cannot replicate the restored service: {e}");
                    return;
                }
            }
        }
        if let Some(c) = self.inner.as_mut() {
            c.on_wake(container);
        }
    }

    fn on_stop(&mut self, container: &mut Container) {
        if let Some(c) = self.inner.as_mut() {
            c.on_stop(container);
        }
    }

    fn takes_checkpoints(&self) -> bool {
        true
    }

    fn status(&self) -> Option<(&'static str, serde_json::Value)> {
        self.inner.as_ref().and_then(|c| c.status())
    }
}
