//! The rrc process's life beside its running container: wait for the
//! program to end or for a request to stop it, then remove every trace.

use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::{Signal, kill};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};

use std::os::unix::net::UnixStream;
use std::path::Path;

use rrc_ckpt::dump::{CheckpointOptions, CheckpointReport};
use rrc_ckpt::store::SeriesDir;

use crate::control::{self, Request, Response};
use crate::create::{Container, supervisor_signals};
use crate::epochs::EpochCheckpointer;
use crate::proc::catches_signal;
use crate::restore::{ANNOTATION, ContainerAnnotation};
use crate::{Result, nix_setup_err};

/// How the container's program ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExitReport {
    /// What a shell would report: the exit code, or 128 + signal.
    pub code: i32,
    pub description: String,
}

impl ExitReport {
    fn from_status(s: WaitStatus) -> Option<ExitReport> {
        match s {
            WaitStatus::Exited(_, code) => Some(ExitReport {
                code,
                description: format!("exited with code {code}"),
            }),
            WaitStatus::Signaled(_, sig, _) => Some(ExitReport {
                code: 128 + sig as i32,
                description: format!("killed by {sig}"),
            }),
            _ => None,
        }
    }
}

/// Work that runs beside a container in its supervisor's loop (on the
/// supervisor's thread, which is also the one that may trace the
/// container's processes): recording, replication, a series of
/// checkpoints.
pub trait Companion {
    /// When it next wants to run, if at a set time.
    fn next_wake(&self) -> Option<Instant> {
        None
    }
    /// A file descriptor that becomes readable when it wants to run.
    fn wake_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        None
    }
    /// Runs it: its time came or its descriptor is readable (or another
    /// companion's was: it must check for itself).
    fn on_wake(&mut self, _container: &mut Container) {}
    /// The container is about to be removed.
    fn on_stop(&mut self, container: &mut Container);
    /// It takes the container's periodic checkpoints: no other series may
    /// start beside it (two would track the same memory).
    fn takes_checkpoints(&self) -> bool {
        false
    }
    /// Its work is over: the supervisor drops it.
    fn done(&self) -> bool {
        false
    }
    /// What it has to say about itself (`rrc status`), under a name.
    fn status(&self) -> Option<(&'static str, serde_json::Value)> {
        None
    }
}

impl Container {
    /// Runs until the container's first process ends, forwarding frames all
    /// the while, with `companions` beside it. SIGTERM, SIGINT or SIGHUP to
    /// rrc stop the container: SIGTERM to its program, and after `grace`
    /// (or a second signal) SIGKILL to everything in it. Returns after the
    /// cgroup and state are removed.
    pub fn supervise(
        mut self,
        grace: Duration,
        mut companions: Vec<Box<dyn Companion>>,
    ) -> Result<ExitReport> {
        let sfd = SignalFd::with_flags(
            &supervisor_signals(),
            SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK,
        )
        .map_err(nix_setup_err("signalfd"))?;
        let mut kill_at: Option<Instant> = None;
        let mut checkpointed = false;
        let report = loop {
            match waitpid(self.init, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) => {}
                Ok(s) => {
                    if let Some(r) = ExitReport::from_status(s) {
                        break r;
                    }
                }
                Err(nix::Error::ECHILD) if checkpointed => {
                    // The checkpoint took the tree down (and reaped it).
                    break ExitReport {
                        code: 0,
                        description: "checkpointed and stopped".into(),
                    };
                }
                Err(nix::Error::ECHILD) => {
                    break ExitReport {
                        code: 1,
                        description: "vanished".into(),
                    };
                }
                Err(e) => return Err(nix_setup_err("wait for the container")(e)),
            }
            let wake = companions
                .iter()
                .filter_map(|c| c.next_wake())
                .chain(kill_at)
                .min();
            let timeout = match wake {
                Some(t) => {
                    let left = t.saturating_duration_since(Instant::now());
                    // Round up: waking early would only loop.
                    let us = left.as_micros().min(60_000_000) as u64;
                    PollTimeout::try_from(us.div_ceil(1000) as u32).unwrap_or(PollTimeout::MAX)
                }
                None => PollTimeout::NONE,
            };
            let any_fd_ready = {
                let mut fds = vec![
                    PollFd::new(sfd.as_fd(), PollFlags::POLLIN),
                    PollFd::new(self.control.fd(), PollFlags::POLLIN),
                ];
                fds.extend(
                    companions
                        .iter()
                        .filter_map(|c| c.wake_fd())
                        .map(|fd| PollFd::new(fd, PollFlags::POLLIN)),
                );
                match poll(&mut fds, timeout) {
                    Ok(_) | Err(nix::Error::EINTR) => {}
                    Err(e) => return Err(nix_setup_err("poll")(e)),
                }
                fds[2..]
                    .iter()
                    .any(|f| f.revents().is_some_and(|r| !r.is_empty()))
            };
            let now = Instant::now();
            for c in companions.iter_mut() {
                // A companion with a readable descriptor is not told which
                // one woke the loop: each checks its own.
                if any_fd_ready || c.next_wake().is_some_and(|t| now >= t) {
                    c.on_wake(&mut self);
                }
            }
            companions.retain(|c| !c.done());
            if let Some((req, stream)) = self.control.accept() {
                self.serve_request(req, stream, &mut companions, &mut checkpointed);
            }
            while let Ok(Some(info)) = sfd.read_signal() {
                let sig = info.ssi_signo as i32;
                if sig == Signal::SIGCHLD as i32 {
                    continue;
                }
                if kill_at.is_none() {
                    tracing::info!(container = %self.record.name, "stopping");
                    kill_at = Some(self.request_stop(grace));
                } else {
                    // Asked twice: no more waiting.
                    kill_at = Some(Instant::now());
                }
            }
            if kill_at.is_some_and(|t| Instant::now() >= t) {
                tracing::warn!(container = %self.record.name, "killing what is left of the container");
                self.cgroup.kill_all(Duration::from_secs(5))?;
                kill_at = Some(Instant::now() + Duration::from_secs(3600));
            }
        };
        tracing::info!(container = %self.record.name, "{}", report.description);
        for c in companions.iter_mut() {
            c.on_stop(&mut self);
        }
        self.teardown()?;
        Ok(report)
    }

    /// Answers a request that came through the control socket.
    fn serve_request(
        &mut self,
        req: Request,
        stream: UnixStream,
        companions: &mut Vec<Box<dyn Companion>>,
        checkpointed: &mut bool,
    ) {
        match req {
            Request::Series { .. } if companions.iter().any(|c| c.takes_checkpoints()) => {
                control::answer(
                    stream,
                    &Response::Failed(
                        "this container is already being checkpointed periodically (a series, or replication)".into(),
                    ),
                )
            }
            Request::Series {
                dir,
                every_us,
                count,
                for_us,
                keep_deltas,
                copy,
            } => match Series::start(self, &dir, keep_deltas, copy.into()) {
                Ok((epochs, dir)) => companions.push(Box::new(Series {
                    dir,
                    epochs: Some(epochs),
                    every: Duration::from_micros(every_us.max(1000)),
                    left: count,
                    until: for_us.map(|us| Instant::now() + Duration::from_micros(us)),
                    next_at: Instant::now(),
                    stream,
                    taken: 0,
                    failures: 0,
                    busy_since: None,
                })),
                Err(e) => control::answer(stream, &Response::Failed(e.to_string())),
            },
            Request::Status => {
                let status = companions
                    .iter()
                    .filter_map(|c| c.status())
                    .map(|(k, v)| (k.to_string(), v))
                    .collect();
                control::answer(stream, &Response::Status(status))
            }
            Request::Checkpoint {
                images,
                leave_running,
            } => {
                let resp = match self.checkpoint(&images, leave_running) {
                    Ok(r) => {
                        *checkpointed |= !leave_running;
                        Response::Checkpointed {
                            processes: r.processes,
                            threads: r.threads,
                            memory_bytes: r.memory_bytes,
                            image_bytes: r.image_bytes,
                            stopped_us: r.frozen.as_micros() as u64,
                            total_us: r.total.as_micros() as u64,
                            sockets_us: r.sockets.as_micros() as u64,
                            killed: !leave_running,
                        }
                    }
                    Err(e) => Response::Failed(e.to_string()),
                };
                control::answer(stream, &resp);
            }
        }
    }

    /// What a checkpoint of the container records besides the processes.
    pub fn annotations(&self) -> Result<std::collections::BTreeMap<String, serde_json::Value>> {
        // An image is on its way: its restore needs the private root.
        self.remove_root
            .store(false, std::sync::atomic::Ordering::Release);
        let mut annotations = self.extra_annotations.clone();
        let mut ann = ContainerAnnotation::of(&self.record);
        ann.netns = Some(crate::netstate::capture(self.init)?);
        annotations.insert(
            ANNOTATION.to_string(),
            serde_json::to_value(ann).expect("annotations serialize"),
        );
        Ok(annotations)
    }

    /// Checkpoints the container into `images` with no frame crossing its
    /// gate, so no TCP state changes while it is read. A container left
    /// running has its frames held back until the tree runs again (they
    /// reach it then, instead of waiting for the peers to send them again);
    /// one that is killed (and then removed by this process) is cut off
    /// the network for good.
    pub fn checkpoint(&mut self, images: &Path, leave_running: bool) -> Result<CheckpointReport> {
        self.memory_in()?;
        let annotations = self.annotations()?;
        if let Some(net) = &self.net {
            if leave_running {
                net.forwarder.set_paused(true);
            } else {
                net.forwarder.set_blocked(true);
            }
        }
        let opts = CheckpointOptions {
            container: true,
            root: self.init,
            aio_idle: self.record.aio_idle,
            images,
            leave_running,
            annotations,
        };
        // A client whose connection is waiting when the checkpoint comes is
        // accepted within microseconds of the program running again (it
        // needs no frame for that): tried again for a while.
        let r = rrc_ckpt::dump::when_not_busy(BUSY_WAIT, || {
            let mut moves_again = || self.pause_network(false);
            rrc_ckpt::dump::checkpoint_with(
                &opts,
                rrc_ckpt::dump::Extras::new()
                    .shmem_limits(self.shmem_limits.clone())
                    .at_freeze(&mut OnResume(&mut moves_again)),
            )
        });
        if let Some(net) = &self.net {
            if leave_running {
                net.forwarder.set_paused(false);
            } else if r.is_err() {
                net.forwarder.set_blocked(false);
            }
        }
        Ok(r?)
    }

    /// Holds the container's frames back in the kernel's queues, or lets
    /// them through again (see [`rrc_net::forward::Forwarder::set_paused`]).
    pub fn pause_network(&self, paused: bool) {
        if let Some(net) = &self.net {
            net.forwarder.set_paused(paused);
        }
    }

    /// Asks the program to stop; returns when to stop asking. A program that
    /// is pid 1 of its namespace and has no SIGTERM handler would never see
    /// the signal, so it is killed at once.
    fn request_stop(&self, grace: Duration) -> Instant {
        let pid = self.init.as_raw();
        if catches_signal(pid, Signal::SIGTERM as i32) {
            let _ = kill(self.init, Signal::SIGTERM);
            Instant::now() + grace
        } else {
            Instant::now()
        }
    }

    /// Removes a container that will not be supervised (what was to run
    /// beside it could not start): every process in it, its cgroup, its
    /// state.
    pub fn discard(mut self) -> Result<()> {
        self.teardown()
    }

    /// Removes the container's remaining processes, its cgroup and its state.
    /// The TAP device and network namespace go when this process exits and
    /// closes the TAP.
    fn teardown(&mut self) -> Result<()> {
        self.cgroup.kill_all(Duration::from_secs(5))?;
        self.cgroup.remove(Duration::from_secs(5))?;
        if self.remove_root.load(std::sync::atomic::Ordering::Acquire)
            && let Err(e) = self.record.root.remove(&self.record.name)
        {
            // The name is released all the same: a root left behind is
            // found again by the next container of the name.
            tracing::warn!(error = %e, "the container's private root is left behind");
        }
        if let Some(claim) = self.claim.take() {
            claim.release()?;
        }
        Ok(())
    }
}

/// A series of incremental checkpoints asked for through the control
/// socket (`rrc checkpoint NAME --every`), reported on its stream.
struct Series {
    /// None once the series is over.
    epochs: Option<EpochCheckpointer>,
    dir: SeriesDir,
    every: Duration,
    left: Option<u64>,
    until: Option<Instant>,
    next_at: Instant,
    /// Where each checkpoint is reported.
    stream: UnixStream,
    taken: u64,
    /// Checkpoints failed in a row.
    failures: u32,
    /// Since when the next checkpoint has been refused for connections
    /// not yet accepted.
    busy_since: Option<Instant>,
}

/// How soon a checkpoint of a series refused for connections not yet
/// accepted is tried again.
const BUSY_RETRY: Duration = Duration::from_millis(10);
/// How long a single checkpoint (`rrc checkpoint`) is tried again while
/// the program has connections waiting to be accepted.
pub const BUSY_WAIT: Duration = Duration::from_secs(2);

/// A series ends after this many checkpoints failed in a row.
const MAX_FAILURES_IN_A_ROW: u32 = 10;

impl Series {
    fn start(
        c: &Container,
        dir: &Path,
        keep_deltas: bool,
        copy: rrc_ckpt::incremental::CopyMode,
    ) -> Result<(EpochCheckpointer, SeriesDir)> {
        let epochs = EpochCheckpointer::start(c, copy)?;
        let dir = SeriesDir::create(dir, keep_deltas)?;
        Ok((epochs, dir))
    }

    /// Takes the next checkpoint; `Some` once the series is over (done,
    /// failed, or its asker gone away).
    fn step(&mut self, c: &Container) -> Option<std::result::Result<(), crate::Error>> {
        let epochs = self.epochs.as_mut()?;
        let (report, applied) = match epochs.take_into(c, &self.dir) {
            Ok(x) => x,
            // Nothing was taken and the series keeps its place: the same
            // checkpoint a moment later, once the program has accepted its
            // connections (for up to an interval; then it counts as failed).
            Err(rrc_ckpt::Error::Busy(why))
                if self.busy_since.get_or_insert_with(Instant::now).elapsed() < self.every =>
            {
                tracing::debug!(container = %c.record.name, %why, "a checkpoint of the series waits");
                self.next_at = Instant::now() + BUSY_RETRY.min(self.every);
                return None;
            }
            Err(e) => {
                self.busy_since = None;
                // Even the first is tried again: what fails one checkpoint
                // is often gone by the next (a connection not yet
                // accepted, a child being reaped).
                self.failures += 1;
                tracing::warn!(container = %c.record.name, error = %e, "a checkpoint of the series failed");
                if self.failures >= MAX_FAILURES_IN_A_ROW {
                    if self.taken == 0 {
                        // Nothing to go on from: no series left behind.
                        let _ = std::fs::remove_dir_all(self.dir.path());
                    }
                    return Some(Err(e.into()));
                }
                if !control::send(&self.stream, &Response::EpochFailed(e.to_string())) {
                    return Some(Ok(()));
                }
                self.next_at = (self.next_at + self.every).max(Instant::now());
                return None;
            }
        };
        self.failures = 0;
        self.busy_since = None;
        self.taken += 1;
        let line = control::EpochLine::of(&report, applied.as_ref());
        if !control::send(&self.stream, &Response::Epoch(line)) {
            tracing::info!(container = %c.record.name, "series asker gone; series ended");
            return Some(Ok(()));
        }
        if let Some(left) = &mut self.left {
            *left = left.saturating_sub(1);
            if *left == 0 {
                return Some(Ok(()));
            }
        }
        let now = Instant::now();
        if self.until.is_some_and(|u| now >= u) {
            return Some(Ok(()));
        }
        // A late checkpoint does not make the next ones come sooner.
        self.next_at = (self.next_at + self.every).max(now);
        None
    }

    /// Ends the series and tells the asker how.
    fn end(&mut self, error: Option<String>) {
        let Some(epochs) = self.epochs.take() else {
            return;
        };
        if let Err(e) = epochs.finish() {
            tracing::warn!(error = %e, "ending a series of checkpoints");
        }
        control::send(
            &self.stream,
            &Response::SeriesDone {
                epochs: self.taken,
                error,
            },
        );
    }
}

impl Companion for Series {
    fn next_wake(&self) -> Option<Instant> {
        self.epochs.as_ref().map(|_| self.next_at)
    }

    fn on_wake(&mut self, c: &mut Container) {
        if Instant::now() < self.next_at {
            return;
        }
        if let Some(done) = self.step(c) {
            self.end(done.err().map(|e| e.to_string()));
        }
    }

    fn on_stop(&mut self, _c: &mut Container) {
        self.end(Some("the container stopped".into()));
    }

    fn takes_checkpoints(&self) -> bool {
        true
    }

    fn done(&self) -> bool {
        self.epochs.is_none()
    }
}

/// Checkpoint hooks that only act once the tree runs again.
struct OnResume<'a>(&'a mut dyn FnMut());

impl rrc_ckpt::dump::FreezeHooks for OnResume<'_> {
    fn resumed(&mut self) {
        (self.0)()
    }
}
