//! `rrc restore`: bring a checkpointed process tree (or container) back.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use rrc_ckpt::restore::{RestoreOptions, restore as run_restore};

/// Restore a process tree from an image made by `rrc checkpoint`.
///
/// The processes get their recorded pids and tids back (the originals must
/// be gone), their memory, threads, registers, files and kernel state, and
/// continue where they were. The command returns once the tree runs; it
/// stays running on its own. Standard input, output and error that were
/// pipes to processes outside the tree become this command's own.
#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// Image directory written by `rrc checkpoint`.
    #[arg(long, value_name = "DIR")]
    images: PathBuf,
}

pub fn restore(a: RestoreArgs) -> Result<i32> {
    rrc_container::probe::require_root("rrc restore")?;
    let r = run_restore(&RestoreOptions {
        images: &a.images,
        root_flags: 0,
        root_setup: None,
    })
    .with_context(|| format!("restore from {}", a.images.display()))?;
    println!(
        "restored {} process(es), {} thread(s) in {:.1} ms; root pid {}",
        r.processes,
        r.threads,
        r.took.as_secs_f64() * 1000.0,
        r.root
    );
    Ok(0)
}
