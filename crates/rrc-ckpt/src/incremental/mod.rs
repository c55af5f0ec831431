//! Incremental checkpoints of a running tree.
//!
//! The first checkpoint of a series is full; each later one is a *delta*
//! holding every process's complete state except private memory, of which
//! it holds only what was written or discarded since the checkpoint before
//! (found with [`crate::dirty`]). The tree stays stopped only while its
//! state is read and its memory scanned; the written pages are copied
//! either right then, or after the tree runs again from a copy-on-write
//! snapshot of each process (a clone the process never sees), whichever
//! costs the shorter pause ([`CopyMode`]).
//!
//! [`crate::store::apply`] turns the full checkpoint plus its deltas into
//! the image of the last one.

mod capture;
mod snapshot;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use nix::unistd::Pid;

pub use capture::CopyMode;

use crate::dump::{Annotations, AtFreeze, CheckpointReport, ShmemLimit, Take};
use crate::image::{ImageDir, Lineage};
use crate::store::{ApplyReport, SeriesDir};
use crate::{Error, Result};

pub struct IncrementalOptions {
    /// The root of the tree, as this process's pid namespace numbers it.
    pub root: Pid,
    pub annotations: BTreeMap<String, serde_json::Value>,
    pub copy: CopyMode,
    /// As [`crate::dump::CheckpointOptions::aio_idle`].
    pub aio_idle: bool,
    /// As [`crate::dump::CheckpointOptions::container`].
    pub container: bool,
}

/// A series of checkpoints of one tree, taken one after the other.
pub struct Incremental {
    root: Pid,
    annotations: BTreeMap<String, serde_json::Value>,
    aio_idle: bool,
    container: bool,
    series: String,
    next_epoch: u64,
    last: Option<Lineage>,
    policy: capture::DeltaPolicy,
    shmem_limits: Vec<ShmemLimit>,
    /// Asks the tree's network namespace about its listeners (made at the
    /// first checkpoint, kept for the series: making one costs more than
    /// asking).
    probe: Option<crate::sockdiag::ListenerProbe>,
}

/// What one checkpoint of a series took.
#[derive(Debug, Clone)]
pub struct EpochReport {
    pub lineage: Lineage,
    /// Every process was saved whole (the first checkpoint, or after a
    /// failed one).
    pub full: bool,
    /// `frozen` is the pause the tree saw.
    pub checkpoint: CheckpointReport,
    /// Bytes of private memory saved.
    pub dirty_bytes: u64,
    /// Processes whose pages were copied from a snapshot, after the pause.
    pub snapshots: usize,
    /// Processes whose pages were copied during the pause.
    pub direct: usize,
    /// Within the pause: scanning for written pages, copying them, and
    /// making snapshots.
    pub scan: Duration,
    pub copy: Duration,
    pub snapshot: Duration,
    /// CPU time the checkpoint cost (user + system, of every thread of
    /// the engine that worked on it).
    pub cpu: Duration,
}

fn new_series_id() -> String {
    let mut b = [0u8; 8];
    if std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))
        .is_err()
    {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        b = (t as u64 ^ u64::from(std::process::id())).to_ne_bytes();
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// CPU time of the calling thread so far (user + system).
pub(crate) fn thread_cpu_time() -> Duration {
    nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_THREAD)
        .map(|u| {
            let tv = |t: nix::sys::time::TimeVal| {
                Duration::new(t.tv_sec() as u64, t.tv_usec() as u32 * 1000)
            };
            tv(u.user_time()) + tv(u.system_time())
        })
        .unwrap_or_default()
}

impl Incremental {
    pub fn new(opts: IncrementalOptions) -> Incremental {
        Incremental {
            root: opts.root,
            annotations: opts.annotations,
            aio_idle: opts.aio_idle,
            container: opts.container,
            series: new_series_id(),
            next_epoch: 0,
            last: None,
            policy: capture::DeltaPolicy::new(opts.copy),
            shmem_limits: Vec::new(),
            probe: None,
        }
    }

    /// The number the next checkpoint of the series will get.
    pub fn next_epoch(&self) -> u64 {
        self.next_epoch
    }

    /// Has every checkpoint of the series save only the beginning of these
    /// shared memory objects (see [`ShmemLimit`]).
    pub fn with_shmem_limits(mut self, limits: Vec<ShmemLimit>) -> Incremental {
        self.shmem_limits = limits;
        self
    }

    /// The last checkpoint written, if any.
    pub fn last(&self) -> Option<&Lineage> {
        self.last.as_ref()
    }

    /// Takes the next checkpoint of the series into `dir` (new or empty):
    /// the full one first, deltas after. On error nothing is left in `dir`
    /// and the next checkpoint saves every process whole (what was written
    /// in between is known no more), still as a delta of the last good one.
    pub fn checkpoint(&mut self, dir: &Path) -> Result<EpochReport> {
        self.checkpoint_with(dir, &mut Annotations::new)
    }

    /// [`Incremental::checkpoint`], with the caller's hooks: called once
    /// while the tree is stopped (the annotations they return are added to
    /// this checkpoint's) and once it runs again (see [`crate::dump::FreezeHooks`]).
    pub fn checkpoint_with(&mut self, dir: &Path, at_freeze: AtFreeze) -> Result<EpochReport> {
        let img = ImageDir::create(dir)?;
        let lineage = Lineage {
            series: self.series.clone(),
            epoch: self.next_epoch,
        };
        if self.probe.is_none() {
            self.probe = Some(crate::sockdiag::ListenerProbe::of(self.root)?);
        }
        let probe = self.probe.as_ref().expect("made above");
        let cpu0 = thread_cpu_time();
        self.policy.begin_epoch();
        let exclude = self.policy.own_processes();
        let result = crate::dump::take(
            &img,
            Take {
                root: self.root,
                leave_running: true,
                annotations: self.annotations.clone(),
                aio_idle: self.aio_idle,
                container: self.container,
                series: Some((lineage.clone(), self.last.clone())),
                exclude: &exclude,
                shmem_limits: &self.shmem_limits,
                at_freeze,
                probe,
            },
            &mut self.policy,
        );
        let checkpoint = match result {
            Ok(r) => r,
            Err(e) => {
                // Refused before any page was read: the tracking still
                // holds every write since the last checkpoint.
                if !matches!(e, Error::Busy(_)) {
                    self.policy.abort();
                    // A question it did not finish may have left answers
                    // on its socket: the next checkpoint makes a new one.
                    self.probe = None;
                }
                crate::common::remove_image_files(img.path());
                return Err(e);
            }
        };
        self.next_epoch += 1;
        self.last = Some(lineage.clone());
        let s = self.policy.stats();
        Ok(EpochReport {
            lineage,
            full: s.full,
            checkpoint,
            dirty_bytes: s.bytes,
            snapshots: s.snapshots,
            direct: s.direct,
            scan: s.scan,
            copy: s.copy,
            snapshot: s.snapshot,
            cpu: thread_cpu_time().saturating_sub(cpu0) + s.helper_cpu,
        })
    }

    /// Takes the next checkpoint into a series directory and commits it
    /// there (see [`SeriesDir::commit`]).
    pub fn checkpoint_into(
        &mut self,
        series: &SeriesDir,
    ) -> Result<(EpochReport, Option<ApplyReport>)> {
        let epoch = self.next_epoch;
        let r = self.checkpoint(&series.layer(epoch))?;
        let a = series.commit(epoch)?;
        Ok((r, a))
    }

    /// Ends the series: stops tracking and has the processes reap the
    /// snapshots of the last checkpoint.
    pub fn finish(mut self) -> Result<()> {
        self.policy.finish_series(self.root)
    }
}

impl Drop for Incremental {
    fn drop(&mut self) {
        if let Err(e) = self.policy.finish_series(self.root) {
            tracing::warn!(error = %e, "ending a series of checkpoints");
        }
    }
}

/// Checks that `root` can be tracked at all (for a clear error up front).
pub fn check_supported() -> Result<()> {
    let probe = crate::sys::uffd_probe();
    probe.map_err(|e| {
        Error::Incompatible(format!(
            "this kernel cannot track written pages (userfaultfd with asynchronous write-protection and PAGEMAP_SCAN, Linux 6.7 or later): {e}"
        ))
    })
}
