//! `rrc checkpoint`: save a container or a process tree to an image.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Args;
use nix::unistd::Pid;
use rrc_ckpt::dump::{CheckpointOptions, checkpoint as take_checkpoint};
use rrc_container::control::{self, Request, Response};
use rrc_container::{ContainerName, HostState, Status};

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
    let (report, what) = match (a.pid, &a.name) {
        (Some(pid), _) => {
            let r = take_checkpoint(&CheckpointOptions {
                root: Pid::from_raw(pid),
                images: &a.images,
                leave_running: a.leave_running,
                annotations: Default::default(),
            })
            .with_context(|| format!("checkpoint of process {pid}"))?;
            (r, format!("process {pid}"))
        }
        (None, Some(name)) => {
            let name: ContainerName = name.parse()?;
            let host = HostState::current();
            let Some((rec, status)) = host.load(&name)? else {
                return Err(rrc_container::Error::UnknownContainer(name.to_string()).into());
            };
            if status != Status::Running {
                bail!("container {name} is {status}, not running; nothing to checkpoint");
            }
            // The rrc process holding the container does it: it alone can
            // cut the container's network while the TCP state is read.
            let images = std::path::absolute(&a.images).context("image directory")?;
            let resp = control::request(
                &host,
                &name,
                &Request::Checkpoint {
                    images,
                    leave_running: a.leave_running,
                },
            )
            .with_context(|| format!("checkpoint of container {name}"))?;
            let r = match resp {
                Response::Checkpointed {
                    processes,
                    threads,
                    memory_bytes,
                    image_bytes,
                    stopped_us,
                    total_us,
                    sockets_us,
                    ..
                } => rrc_ckpt::dump::CheckpointReport {
                    processes,
                    threads,
                    memory_bytes,
                    image_bytes,
                    frozen: std::time::Duration::from_micros(stopped_us),
                    total: std::time::Duration::from_micros(total_us),
                    sockets: std::time::Duration::from_micros(sockets_us),
                },
                Response::Failed(e) => bail!("checkpoint of container {name}: {e}"),
            };
            if !a.leave_running {
                // Its rrc process removes the container once the tree is
                // gone; wait so that the name is free when we return.
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
                while rec.supervisor.is_alive() && std::time::Instant::now() < deadline {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
            }
            (r, format!("container {name}"))
        }
        (None, None) => bail!("name a container or give --pid"),
    };
    println!(
        "checkpointed {what}: {} process(es), {} thread(s): {:.1} MiB of memory, image {:.1} MiB in {}; stopped for {:.1} ms (sockets {:.1} ms), total {:.1} ms{}",
        report.processes,
        report.threads,
        report.memory_bytes as f64 / (1 << 20) as f64,
        report.image_bytes as f64 / (1 << 20) as f64,
        a.images.display(),
        report.frozen.as_secs_f64() * 1000.0,
        report.sockets.as_secs_f64() * 1000.0,
        report.total.as_secs_f64() * 1000.0,
        if a.leave_running {
            ""
        } else {
            "; the original was killed"
        }
    );
    Ok(0)
}
