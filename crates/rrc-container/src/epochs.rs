//! The epoch checkpointer: incremental checkpoints of a running container,
//! each taken with the container's network paused from just before the
//! tree stops until it runs again, so that no frame crosses its gate while
//! the tree is read (frames wait in the kernel's queues, and the TCP state
//! read is exactly what the peers saw). Writing the checkpoint out comes
//! after: frames move again meanwhile, or every client would wait for the
//! disk on top of the pause.
//!
//! One checkpointer serves every periodic use: a series asked for with
//! `rrc checkpoint NAME --every` ([`crate::supervise`]) and replication's
//! epochs (the primary). What a user of it does at the edges of a
//! checkpoint (take the gate's mark, read counters the program keeps while
//! it is stopped) goes through [`EpochHooks`].

use std::path::Path;

use rrc_ckpt::dump::{Annotations, FreezeHooks};
use rrc_ckpt::incremental::{CopyMode, EpochReport, Incremental, IncrementalOptions};
use rrc_ckpt::store::{ApplyReport, SeriesDir};

use crate::Result;
use crate::create::Container;

/// What a checkpoint's taker does around it.
pub trait EpochHooks {
    /// The network is paused: no frame crosses the gate until
    /// [`EpochHooks::resumed`] has run (or [`EpochHooks::after`], if the
    /// checkpoint fails before the tree runs again).
    fn paused(&mut self) {}
    /// Every thread of the container is stopped: what is returned is added
    /// to the checkpoint's annotations (counters the program keeps in
    /// memory, read at the checkpoint's exact moment).
    fn at_freeze(&mut self) -> Annotations {
        Annotations::new()
    }
    /// The tree runs again, everything of it read; the network is still
    /// paused and moves again right after. Writing the checkpoint out may
    /// still fail ([`EpochHooks::after`] then says so).
    fn resumed(&mut self) {}
    /// The checkpoint was taken (or failed); the network moves again.
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
            container: true,
            root: c.init_pid(),
            aio_idle: c.record().aio_idle,
            annotations: c.annotations()?,
            copy,
        })
        .with_shmem_limits(c.shmem_limits.clone());
        Ok(EpochCheckpointer { inc })
    }

    /// The number the next checkpoint will get (0: the full first one).
    pub fn next_epoch(&self) -> u64 {
        self.inc.next_epoch()
    }

    /// Takes the next checkpoint into `dir` (new or empty).
    pub fn take(
        &mut self,
        c: &Container,
        dir: &Path,
        hooks: &mut dyn EpochHooks,
    ) -> rrc_ckpt::Result<EpochReport> {
        let inc = &mut self.inc;
        paused(c, hooks, |h| inc.checkpoint_with(dir, h))
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
        let layer = series.layer(inc.next_epoch());
        let r = paused(c, &mut (), |h| inc.checkpoint_with(&layer, h))?;
        let applied = series.commit(r.lineage.epoch)?;
        Ok((r, applied))
    }

    /// Ends the series: tracking stops, snapshots are reaped.
    pub fn finish(self) -> rrc_ckpt::Result<()> {
        self.inc.finish()
    }
}

/// Runs `take` with the container's network paused until the tree runs
/// again, and `hooks` around it.
fn paused(
    c: &Container,
    hooks: &mut dyn EpochHooks,
    take: impl FnOnce(&mut dyn FreezeHooks) -> rrc_ckpt::Result<EpochReport>,
) -> rrc_ckpt::Result<EpochReport> {
    c.memory_in()?;
    c.pause_network(true);
    hooks.paused();
    let r = take(&mut Moments { c, hooks });
    hooks.after(r.as_ref().ok());
    // A checkpoint that failed while the tree was stopped never said it
    // runs again.
    c.pause_network(false);
    r
}

/// The checkpoint engine's two moments, passed on to the hooks; the
/// network moves again at the second.
struct Moments<'a> {
    c: &'a Container,
    hooks: &'a mut dyn EpochHooks,
}

impl FreezeHooks for Moments<'_> {
    fn at_freeze(&mut self) -> Annotations {
        self.hooks.at_freeze()
    }

    fn resumed(&mut self) {
        self.hooks.resumed();
        self.c.pause_network(false);
    }
}
