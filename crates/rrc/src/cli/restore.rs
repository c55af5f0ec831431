//! `rrc restore`: bring a checkpointed container or process tree back.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use nix::net::if_::if_nametoindex;
use rrc_ckpt::restore::{RestoreOptions, restore as run_restore};
use rrc_container::create::{Container, CreateOptions};
use rrc_container::restore::{ContainerAnnotation, RestoreSpec};
use rrc_container::spec::NetRequest;
use rrc_container::state::Status;
use rrc_container::{ContainerName, Error, HostState, probe};

use super::detach::Supervised;

/// Restore a container or process tree from an image made by
/// `rrc checkpoint`.
///
/// A container comes back as a new container on this host (same name
/// unless --name, same address and MAC, its listening sockets open), with
/// a new rrc process supervising it in the background. A process tree gets
/// its recorded pids and tids back (the originals must be gone), its
/// memory, threads, registers, files and kernel state, and continues where
/// it was; its standard input, output and error, where they were pipes to
/// processes outside the tree, become this command's own. Either way the
/// command returns once the restored processes run.
#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// Image directory written by `rrc checkpoint`, or the directory of a
    /// series (`rrc checkpoint --every`): its last checkpoint is restored,
    /// after the deltas not yet applied are.
    #[arg(long, value_name = "DIR")]
    images: PathBuf,
    /// Name for a restored container (default: the checkpointed name).
    #[arg(long)]
    name: Option<String>,
    /// Host interface for a restored container's frames (default: the one
    /// whose subnet holds its address).
    #[arg(long, value_name = "IF")]
    uplink: Option<String>,
}

pub fn restore(mut a: RestoreArgs) -> Result<i32> {
    probe::require_root("rrc restore")?;
    a.images = image_of(&a.images)?;
    let annotation = ContainerAnnotation::read(&a.images)
        .with_context(|| format!("reading {}", a.images.display()))?;
    match annotation {
        Some(ann) => restore_container(a, ann, true).map(Supervised::exit_code),
        None => restore_tree(a),
    }
}

/// The image to restore from `images`: itself, or for a series its last
/// checkpoint, once every delta is applied.
pub(super) fn image_of(images: &Path) -> Result<PathBuf> {
    if !rrc_ckpt::store::SeriesDir::is_series(images) {
        return Ok(images.to_path_buf());
    }
    rrc_ckpt::store::SeriesDir::materialize(images, |epoch, r| {
        eprintln!(
            "applied checkpoint {epoch} ({:.1} MiB of memory) in {:.1} ms",
            r.bytes as f64 / (1 << 20) as f64,
            r.took.as_secs_f64() * 1000.0
        );
    })
    .with_context(|| format!("bringing the series in {} up to date", images.display()))
}

/// Restores the container checkpointed in `images` and supervises it in
/// the foreground until it ends; its exit code.
pub(super) fn run_restored_container(
    images: &Path,
    name: Option<String>,
    uplink: Option<String>,
) -> Result<i32> {
    let ann = ContainerAnnotation::read(images)
        .with_context(|| format!("reading {}", images.display()))?
        .with_context(|| format!("{} is not the image of a container", images.display()))?;
    let a = RestoreArgs {
        images: images.to_path_buf(),
        name,
        uplink,
    };
    restore_container(a, ann, false).map(Supervised::exit_code)
}

/// Restores the container checkpointed in `images` on this host, in the
/// background; returns what it said when it ran.
pub(super) fn restore_container_from(images: &Path, uplink: Option<String>) -> Result<String> {
    let ann = ContainerAnnotation::read(images)
        .with_context(|| format!("reading {}", images.display()))?
        .with_context(|| format!("{} is not the image of a container", images.display()))?;
    let a = RestoreArgs {
        images: images.to_path_buf(),
        name: None,
        uplink,
    };
    match restore_container(a, ann, true)? {
        Supervised::Detached(msg) => Ok(msg),
        Supervised::Exited(code) => anyhow::bail!("the restored container ended at once ({code})"),
    }
}

fn restore_tree(a: RestoreArgs) -> Result<i32> {
    let r = run_restore(&RestoreOptions {
        images: &a.images,
        root_flags: 0,
        root_setup: None,
        after_spawn: None,
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

fn restore_container(a: RestoreArgs, ann: ContainerAnnotation, detach: bool) -> Result<Supervised> {
    let name: ContainerName = match &a.name {
        Some(n) => n.parse()?,
        None => ann.name.clone(),
    };
    let layout = probe::require_container_support(ann.net.is_some())?;
    let net = match &ann.net {
        Some(n) => {
            // The same address and MAC; the uplink is this host's.
            let req = NetRequest {
                addr: n.addr.to_string(),
                mac: Some(n.mac),
                uplink: a.uplink.clone(),
                gateway: n.gateway,
            };
            let host_addrs = rrc_net::netconf::ipv4_addresses()?;
            Some(req.resolve(&name, &host_addrs, |i| if_nametoindex(i).is_ok())?)
        }
        None => None,
    };
    let host = HostState::current();
    if let Some((rec, st)) = host.load(&name)?
        && st != Status::Stale
    {
        return Err(Error::NameInUse {
            name: name.to_string(),
            pid: rec.supervisor.pid,
        }
        .into());
    }
    let spec = RestoreSpec {
        images: a.images.clone(),
        name: name.clone(),
        argv: ann.argv.clone(),
        net,
        netns: ann.netns.clone(),
    };
    super::detach::supervise_container(
        &name,
        &host.clone(),
        detach,
        Duration::from_secs(10),
        "restored",
        |output| {
            Container::restore(
                &spec,
                &layout,
                host,
                CreateOptions {
                    output,
                    ..Default::default()
                },
            )
        },
        None,
    )
}
