//! The epoch checkpointer: incremental checkpoints of a running container,
//! each taken with the container's network paused, so that no frame
//! crosses its gate while the tree is read (frames wait in the kernel's
//! queues, and the TCP state read is exactly what the peers saw).
//!
//! One checkpointer serves every periodic use: a series asked for with
//! `rrc checkpoint NAME --every` ([`crate::supervise`]) and replication's
//! epochs (the primary). What a user of it does at the edges of a
//! checkpoint (take the gate's mark, read counters the program keeps while
//! it is stopped) goes through [`EpochHooks`].

use std::path::Path;

use rrc_ckpt::dump::Annotations;
use rrc_ckpt::incremental::{CopyMode, EpochReport, Incremental, IncrementalOptions};
use rrc_ckpt::store::{ApplyReport, SeriesDir};

use crate::Result;
use crate::create::Container;

/// What a checkpoint's taker does around it.
pub trait EpochHooks {
    /// The network is paused: no frame crosses the gate until
    /// [`EpochHooks::after`] has run.
    fn paused(&mut self) {}
    /// Every thread of the container is stopped: what is returned is added
    /// to the checkpoint's annotations (counters the program keeps in
    /// memory, read at the checkpoint's exact moment).
    fn at_freeze(&mut self) -> Annotations {
        Annotations::new()
    }
    /// The checkpoint was taken (or failed); the network is still paused.
    fn after(&mut self, _taken: Option<&EpochReport>) {}
}

/// No hooks.
impl EpochHooks for () {}

/// Incremental checkpoints of one container.
pub struct EpochCheckpointer {
    inc: Incremental,
}

impl EpochCheckpointer {
    /// Starts a series of checkpoints of `c` (the first one will be full).
    pub fn start(c: &Container, copy: CopyMode) -> Result<EpochCheckpointer> {
        rrc_ckpt::incremental::check_supported()?;
        let inc = Incremental::new(IncrementalOptions {
            root: c.init_pid(),
            annotations: c.annotations()?,
            copy,
        })
        .with_shmem_limits(c.shmem_limits.clone());
        Ok(EpochCheckpointer { inc })
    }

    /// Takes the next checkpoint into `dir` (new or empty).
    pub fn take(
        &mut self,
        c: &Container,
        dir: &Path,
        hooks: &mut dyn EpochHooks,
    ) -> rrc_ckpt::Result<EpochReport> {
        let inc = &mut self.inc;
        paused(c, hooks, |hooks| {
            inc.checkpoint_with(dir, &mut || hooks.at_freeze())
        })
    }

    /// Takes the next checkpoint into a series directory and commits it
    /// there (applied onto its image unless it keeps deltas apart).
    pub fn take_into(
        &mut self,
        c: &Container,
        series: &SeriesDir,
    ) -> rrc_ckpt::Result<(EpochReport, Option<ApplyReport>)> {
        let inc = &mut self.inc;
        // The network is paused for the checkpoint only, not while it is
        // applied onto the series' image.
        let r = paused(c, &mut (), |_| {
            inc.checkpoint(&series.layer(inc.next_epoch()))
        })?;
        let applied = series.commit(r.lineage.epoch)?;
        Ok((r, applied))
    }

    /// Ends the series: tracking stops, snapshots are reaped.
    pub fn finish(self) -> rrc_ckpt::Result<()> {
        self.inc.finish()
    }
}

/// Runs `take` with the container's network paused and `hooks` around it.
fn paused(
    c: &Container,
    hooks: &mut dyn EpochHooks,
    take: impl FnOnce(&mut dyn EpochHooks) -> rrc_ckpt::Result<EpochReport>,
) -> rrc_ckpt::Result<EpochReport> {
    c.pause_network(true);
    hooks.paused();
    let r = take(hooks);
    hooks.after(r.as_ref().ok());
    c.pause_network(false);
    r
}
