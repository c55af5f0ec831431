//! `rrc checkpoint`: save a container or a process tree to an image.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Args;
use nix::unistd::Pid;
use rrc_ckpt::dump::{CheckpointOptions, checkpoint as take_checkpoint};

/// Checkpoint a container (by name) or any process tree (--pid) into an
/// image directory.
///
/// Every thread of the tree is stopped while its state is read; afterwards
/// the tree is killed, or left running with --leave-running. Anything the
/// engine cannot restore faithfully (inotify, io_uring, sockets other than
/// listening TCP, ...) is reported by process and fd, and the tree is left
/// untouched.
#[derive(Debug, Args)]
pub struct CheckpointArgs {
    /// Container name (see `rrc ps`).
    #[arg(required_unless_present = "pid", conflicts_with = "pid")]
    name: Option<String>,
    /// Root of a process tree to checkpoint instead of a container.
    #[arg(long)]
    pid: Option<i32>,
    /// Image directory (created; must be empty if it exists).
    #[arg(long, value_name = "DIR")]
    images: PathBuf,
    /// Leave the tree running after the checkpoint.
    #[arg(long)]
    leave_running: bool,
}

pub fn checkpoint(a: CheckpointArgs) -> Result<i32> {
    rrc_container::probe::require_root("rrc checkpoint")?;
    let Some(pid) = a.pid else {
        bail!("checkpointing containers by name is not available yet; use --pid");
    };
    let report = take_checkpoint(&CheckpointOptions {
        root: Pid::from_raw(pid),
        images: &a.images,
        leave_running: a.leave_running,
        annotations: Default::default(),
    })
    .with_context(|| format!("checkpoint of process {pid}"))?;
    println!(
        "checkpointed {} process(es), {} thread(s): {:.1} MiB of memory, image {:.1} MiB in {}; stopped for {:.1} ms, total {:.1} ms{}",
        report.processes,
        report.threads,
        report.memory_bytes as f64 / (1 << 20) as f64,
        report.image_bytes as f64 / (1 << 20) as f64,
        a.images.display(),
        report.frozen.as_secs_f64() * 1000.0,
        report.total.as_secs_f64() * 1000.0,
        if a.leave_running {
            ""
        } else {
            "; the original was killed"
        }
    );
    Ok(0)
}
