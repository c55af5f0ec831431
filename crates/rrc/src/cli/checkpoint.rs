//! `rrc checkpoint`: save a container or a process tree to an image.

use std::os::fd::AsFd;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use nix::unistd::Pid;
use rrc_ckpt::dump::{CheckpointOptions, checkpoint as take_checkpoint};
use rrc_container::control::{self, CopyChoice, EpochLine, Request, Response};
use rrc_container::supervise::BUSY_WAIT;
use rrc_container::{ContainerName, HostState, Status};

/// Checkpoint a container (by name) or any process tree (--pid) into an
/// image directory, once or periodically.
///
/// Every thread of the tree is stopped while its state is read; afterwards
/// the tree is killed, or left running with --leave-running. Anything the
/// engine cannot restore faithfully (io_uring, perf events, Linux AIO
/// unless --aio-idle, ...) is reported by process and fd, and the tree is
/// left untouched.
///
/// With --every, checkpoints are taken periodically into a series
/// directory while the tree runs on: the first is full, each later one
/// saves only the memory written since the one before, and the tree is
/// stopped only while its state is read and its memory scanned. Each is
/// applied to the series' image (DIR/image) as it comes, unless
/// --keep-deltas keeps them all apart (DIR/00000000, DIR/00000001, ...).
/// `rrc restore --images DIR` restores the last one. Ctrl-C ends the
/// series.
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
    /// Take incremental checkpoints this often (e.g. 100ms) into a series
    /// directory, leaving the tree running.
    #[arg(long, value_name = "DURATION", value_parser = super::parse_duration, conflicts_with = "leave_running")]
    every: Option<Duration>,
    /// With --every: stop after this many checkpoints.
    #[arg(long, requires = "every")]
    count: Option<u64>,
    /// With --every: stop after this long.
    #[arg(long = "for", value_name = "DURATION", value_parser = super::parse_duration, requires = "every")]
    for_: Option<Duration>,
    /// With --every: keep every checkpoint as it was taken instead of
    /// applying each to the series' image.
    #[arg(long, requires = "every")]
    keep_deltas: bool,
    /// With --every: when written pages are copied: while the tree is
    /// stopped (direct), after it runs again from a copy-on-write snapshot
    /// (snapshot), or whichever pauses it less by what earlier checkpoints
    /// measured (auto).
    #[arg(long, value_enum, default_value_t = Copy::Auto, requires = "every")]
    copy: Copy,
    /// With --pid: the program never has a Linux AIO request in flight
    /// when it is checkpointed (a poll waiting, a direct I/O unfinished),
    /// so its AIO contexts can be saved: their rings, with the completions
    /// not read yet, come back where they were. Requests in flight cannot
    /// be seen from user space; without this the contexts are refused.
    #[arg(long, requires = "pid")]
    aio_idle: bool,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub(super) enum Copy {
    Auto,
    Direct,
    Snapshot,
}

impl From<Copy> for CopyChoice {
    fn from(c: Copy) -> Self {
        match c {
            Copy::Auto => CopyChoice::Auto,
            Copy::Direct => CopyChoice::Direct,
            Copy::Snapshot => CopyChoice::Snapshot,
        }
    }
}

pub fn checkpoint(a: CheckpointArgs) -> Result<i32> {
    rrc_container::probe::require_root("rrc checkpoint")?;
    if a.aio_idle && a.pid.is_none() {
        bail!(
            "--aio-idle is for a process tree (--pid); a container says it when it is started \
             (rrc run --aio-idle), so that all its checkpoints carry its AIO contexts"
        );
    }
    if let Some(every) = a.every {
        return series(&a, every);
    }
    let (report, what) = match (a.pid, &a.name) {
        (Some(pid), _) => {
            let opts = CheckpointOptions {
                container: false,
                root: Pid::from_raw(pid),
                aio_idle: a.aio_idle,
                images: &a.images,
                leave_running: a.leave_running,
                annotations: Default::default(),
            };
            let r = rrc_ckpt::dump::when_not_busy(BUSY_WAIT, || take_checkpoint(&opts))
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
                    net_lock: None,
                    sync: std::time::Duration::ZERO,
                },
                Response::Failed(e) => bail!("checkpoint of container {name}: {e}"),
                other => bail!("checkpoint of container {name}: unexpected answer {other:?}"),
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
        "checkpointed {what}: {} process(es), {} thread(s): {:.1} MiB of memory, image {:.1} MiB in {}; stopped for {:.1} ms (sockets {:.1} ms{}), total {:.1} ms{}",
        report.processes,
        report.threads,
        report.memory_bytes as f64 / (1 << 20) as f64,
        report.image_bytes as f64 / (1 << 20) as f64,
        a.images.display(),
        report.frozen.as_secs_f64() * 1000.0,
        report.sockets.as_secs_f64() * 1000.0,
        if report.sync.is_zero() {
            String::new()
        } else {
            format!(", image sync {:.1} ms", report.sync.as_secs_f64() * 1000.0)
        },
        report.total.as_secs_f64() * 1000.0,
        if a.leave_running {
            ""
        } else {
            "; the original was killed"
        }
    );
    if let Some(table) = &report.net_lock {
        println!(
            "its TCP connections are held still by the nftables table {table} until `rrc restore` \
             lifts it (by hand: nft delete table inet {table})"
        );
    }
    Ok(0)
}

/// Periodic incremental checkpoints, by this process for a tree, by the
/// container's rrc process for a container (it holds the network back
/// while each is taken).
fn series(a: &CheckpointArgs, every: Duration) -> Result<i32> {
    rrc_ckpt::incremental::check_supported()?;
    if every < Duration::from_millis(1) {
        bail!("--every must be at least 1ms");
    }
    if a.count == Some(0) {
        bail!("--count must be at least 1");
    }
    let mut stats = SeriesStats::default();
    let what = match (a.pid, &a.name) {
        (Some(pid), _) => {
            tree_series(a, pid, every, &mut stats)?;
            format!("process {pid}")
        }
        (None, Some(name)) => {
            let name: ContainerName = name.parse()?;
            let host = HostState::current();
            let Some((_, status)) = host.load(&name)? else {
                return Err(rrc_container::Error::UnknownContainer(name.to_string()).into());
            };
            if status != Status::Running {
                bail!("container {name} is {status}, not running; nothing to checkpoint");
            }
            let dir = std::path::absolute(&a.images).context("series directory")?;
            let last = control::request_stream(
                &host,
                &name,
                &Request::Series {
                    dir,
                    every_us: every.as_micros() as u64,
                    count: a.count,
                    for_us: a.for_.map(|d| d.as_micros() as u64),
                    keep_deltas: a.keep_deltas,
                    copy: a.copy.into(),
                },
                |resp| match resp {
                    Response::Epoch(line) => {
                        stats.add(line);
                        true
                    }
                    Response::EpochFailed(e) => {
                        stats.failed += 1;
                        eprintln!("a checkpoint failed (the series goes on): {e}");
                        true
                    }
                    _ => false,
                },
            )
            .with_context(|| format!("checkpoints of container {name}"))?;
            match last {
                Some(Response::SeriesDone { error: None, .. }) => {}
                Some(Response::SeriesDone { error: Some(e), .. }) => {
                    stats.print_summary(&a.images);
                    bail!("checkpoints of container {name} stopped: {e}")
                }
                Some(Response::Failed(e)) => bail!("checkpoints of container {name}: {e}"),
                _ => bail!("the rrc process of container {name} went away during the series"),
            }
            format!("container {name}")
        }
        (None, None) => bail!("name a container or give --pid"),
    };
    println!("series of {what} done");
    stats.print_summary(&a.images);
    Ok(0)
}

fn tree_series(
    a: &CheckpointArgs,
    pid: i32,
    every: Duration,
    stats: &mut SeriesStats,
) -> Result<()> {
    use nix::sys::signal::{SigSet, Signal};
    use nix::sys::signalfd::{SfdFlags, SignalFd};
    let dir = rrc_ckpt::store::SeriesDir::create(&a.images, a.keep_deltas)?;
    let mut inc =
        rrc_ckpt::incremental::Incremental::new(rrc_ckpt::incremental::IncrementalOptions {
            container: false,
            root: Pid::from_raw(pid),
            aio_idle: a.aio_idle,
            annotations: Default::default(),
            copy: CopyChoice::from(a.copy).into(),
        });
    // Ctrl-C (or SIGTERM) ends the series between two checkpoints.
    let mut mask = SigSet::empty();
    mask.add(Signal::SIGINT);
    mask.add(Signal::SIGTERM);
    mask.thread_block().context("block signals")?;
    let sfd = SignalFd::with_flags(&mask, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)
        .context("signalfd")?;
    let until = a.for_.map(|d| Instant::now() + d);
    let mut next = Instant::now();
    let mut failures = 0;
    loop {
        let left = next.saturating_duration_since(Instant::now());
        let mut fds = [nix::poll::PollFd::new(
            sfd.as_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        let timeout = nix::poll::PollTimeout::try_from(left.as_millis() as u32)
            .unwrap_or(nix::poll::PollTimeout::MAX);
        if left > Duration::ZERO && nix::poll::poll(&mut fds, timeout).unwrap_or(0) > 0 {
            eprintln!("interrupted: ending the series");
            break;
        }
        // Connections not yet accepted put a checkpoint off (nothing is
        // taken meanwhile): the first as long as a single checkpoint, the
        // others within their interval.
        let wait = if stats.count == 0 {
            BUSY_WAIT
        } else {
            every.min(BUSY_WAIT)
        };
        match rrc_ckpt::dump::when_not_busy(wait, || inc.checkpoint_into(&dir)) {
            Ok((report, applied)) => {
                failures = 0;
                stats.add(&EpochLine::of(&report, applied.as_ref()));
            }
            Err(e) if stats.count == 0 => {
                // Nothing to go on from: no series at all.
                let _ = std::fs::remove_dir_all(dir.path());
                return Err(anyhow::Error::new(e).context(format!("checkpoint of process {pid}")));
            }
            Err(rrc_ckpt::Error::NoSuchProcess(_)) => {
                eprintln!("process {pid} is gone: the series ends");
                break;
            }
            Err(e) => {
                failures += 1;
                stats.failed += 1;
                if failures >= 10 {
                    return Err(anyhow::Error::new(e).context(format!(
                        "checkpoints of process {pid}: {failures} failed in a row"
                    )));
                }
                eprintln!("a checkpoint failed (the series goes on): {e}");
            }
        }
        if a.count.is_some_and(|c| stats.count >= c) || until.is_some_and(|u| Instant::now() >= u) {
            break;
        }
        next = (next + every).max(Instant::now());
    }
    inc.finish().context("ending the series")?;
    Ok(())
}

/// What a series took, for the progress lines and the summary.
#[derive(Default)]
struct SeriesStats {
    count: u64,
    failed: u64,
    pauses_us: Vec<u64>,
    dirty: u64,
    cpu_us: u64,
    snapshots: usize,
    direct: usize,
    last_print: Option<Instant>,
}

impl SeriesStats {
    fn add(&mut self, l: &EpochLine) {
        self.count += 1;
        self.pauses_us.push(l.pause_us);
        self.dirty += l.dirty_bytes;
        self.cpu_us += l.cpu_us;
        self.snapshots += l.snapshots;
        self.direct += l.direct;
        // A line a second at most (and the first one, which is full).
        if l.full
            || self
                .last_print
                .is_none_or(|t| t.elapsed() >= Duration::from_secs(1))
        {
            self.last_print = Some(Instant::now());
            eprintln!(
                "checkpoint {}{}: paused {:.2} ms (scan {:.2}, copy {:.2}, snapshot {:.2}), {:.2} MiB written, total {:.1} ms{}",
                l.epoch,
                if l.full { " (full)" } else { "" },
                l.pause_us as f64 / 1000.0,
                l.scan_us as f64 / 1000.0,
                l.copy_us as f64 / 1000.0,
                l.snapshot_us as f64 / 1000.0,
                l.dirty_bytes as f64 / (1 << 20) as f64,
                l.total_us as f64 / 1000.0,
                l.apply_us
                    .map(|us| format!(", applied in {:.1} ms", us as f64 / 1000.0))
                    .unwrap_or_default()
            );
        }
    }

    fn print_summary(&self, dir: &std::path::Path) {
        if self.count == 0 {
            return;
        }
        let mut p = self.pauses_us.clone();
        p.sort_unstable();
        let q = |f: f64| p[((p.len() - 1) as f64 * f).round() as usize] as f64 / 1000.0;
        let avg = p.iter().sum::<u64>() as f64 / p.len() as f64 / 1000.0;
        println!(
            "{} checkpoints in {}{}: pause avg {avg:.2} ms, p50 {:.2}, p99 {:.2}, max {:.2}; {:.1} MiB of memory saved; CPU {:.1} ms; pages copied from snapshots {} time(s), while stopped {} time(s)",
            self.count,
            dir.display(),
            if self.failed > 0 {
                format!(" ({} failed)", self.failed)
            } else {
                String::new()
            },
            q(0.5),
            q(0.99),
            q(1.0),
            self.dirty as f64 / (1 << 20) as f64,
            self.cpu_us as f64 / 1000.0,
            self.snapshots,
            self.direct
        );
    }
}
