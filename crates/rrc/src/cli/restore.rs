//! `rrc restore`: bring a checkpointed container or process tree back.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Args;
use rrc_ckpt::restore::{RestoreOptions, restore as run_restore};
use rrc_container::launch::{Launch, Source};
use rrc_container::probe;
use rrc_container::restore::ContainerAnnotation;

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
/// command returns once the restored processes run (with --lazy-pages, once
/// their memory is all in).
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
    /// Let the processes run before all their memory is in: private
    /// memory is copied in the background, a page the program touches
    /// first. A process with children, or where userfaultfd's events are
    /// not available, is filled before it runs as without this option.
    ///
    /// A process tree: the command stays until every page is in (it
    /// ignores SIGINT, SIGTERM and SIGHUP meanwhile: killed with SIGKILL
    /// before, it would leave the program zeros where its memory was not
    /// in yet). A container: its supervisor fills the memory (the program
    /// dies with it, as always) and a checkpoint of it waits until every
    /// page is in. Takeovers restore this way.
    #[arg(long)]
    lazy_pages: bool,
}

pub fn restore(a: RestoreArgs) -> Result<i32> {
    probe::require_root("rrc restore")?;
    let images = image_of(&a.images)?;
    let is_container = ContainerAnnotation::read(&images)
        .with_context(|| format!("reading {}", images.display()))?
        .is_some();
    if !is_container {
        return restore_tree(&images, a.lazy_pages);
    }
    let name = a.name.as_deref().map(str::parse).transpose()?;
    // A recorded program stops recording: nothing drains its rings here.
    let (mut spec, _copy) = rrc_session::recording::unrecorded_restore(&images, name, a.uplink)?;
    spec.lazy_pages = a.lazy_pages;
    let launched = Launch::new(Source::Image(spec)).detach(true).run()?;
    Ok(super::exit_code(launched))
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

fn restore_tree(images: &Path, lazy_pages: bool) -> Result<i32> {
    if lazy_pages {
        // From here until every page is in, only SIGKILL ends this command.
        use nix::sys::signal::{SigSet, Signal};
        let mut set = SigSet::empty();
        for s in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
            set.add(s);
        }
        set.thread_block().context("blocking signals")?;
    }
    let r = run_restore(&RestoreOptions {
        lazy_pages,
        ..RestoreOptions::tree(images)
    })
    .with_context(|| format!("restore from {}", images.display()))?;
    println!(
        "restored {} process(es), {} thread(s) in {:.1} ms; root pid {}",
        r.processes,
        r.threads,
        r.took.as_secs_f64() * 1000.0,
        r.root
    );
    if r.pages.is_empty() {
        return Ok(0);
    }
    let done = r.pages.wait().map_err(|e| {
        anyhow::anyhow!("memory not restored (the process concerned was killed): {e}")
    })?;
    println!(
        "memory in: {:.1} MiB in {:.1} ms, {} fault(s) served first ({:.1} MiB){}",
        done.bytes as f64 / (1 << 20) as f64,
        done.took.as_secs_f64() * 1000.0,
        done.faults,
        done.fault_bytes as f64 / (1 << 20) as f64,
        if done.forks > 0 {
            format!(", {} child(ren) forked meanwhile", done.forks)
        } else {
            String::new()
        }
    );
    Ok(0)
}
