//! `rrc bench`: measurements, each comparing with and without rrc in one run.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use rrc_bench::net::{self, NetBenchConfig};

use super::{ModeArg, PagesArg};

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Checkpoint time, the pause the process sees, image size and restore
    /// time for 10 MB, 100 MB and 1 GB of touched memory, and for a Redis
    /// holding about 114 MB (dumped and restored by CRIU too, side by side,
    /// where a working CRIU is installed).
    Ckpt(CkptArgs),
    /// What connections add to a checkpoint and a restore (1, 100 and 1000
    /// Redis connections moved between lab hosts), and the longest gap
    /// busy clients see across such a move.
    Sockets(SocketsArgs),
    /// The pause a checkpoint every 100 ms costs a running process, the
    /// memory it saves and the CPU it takes: full checkpoints against
    /// incremental ones (pages copied while stopped, from a snapshot, or
    /// whichever is cheaper), for a synthetic workload with a set dirty
    /// rate, Redis under redis-benchmark and Memcached under memaslap, at
    /// 10 MB, 100 MB and 1 GB.
    Pause(PauseArgs),
    /// What clients see of a container's periodic checkpoints: Redis in an
    /// rrc container (about 120 MiB, kept writing by redis-benchmark)
    /// answering clients that time every reply, in alternating phases
    /// without and with a checkpoint every 100 ms; the replies' latency
    /// against the checkpoints' pauses.
    Stalls(StallsArgs),
    /// The workload process of `bench ckpt` (not for direct use).
    #[command(hide = true)]
    Target {
        #[arg(long)]
        mb: usize,
        #[arg(long, default_value_t = 0)]
        dirty_per_sec: u64,
    },
    /// Replication: latency and throughput of the replicated container
    /// against the plain one (same load, one run), then recovery from
    /// primary host kills at random moments under load (time to the first
    /// answer, broken into detection, restore and resumption; success
    /// rate), for Redis and Memcached in a lab.
    Failover(FailoverArgs),
    /// Failure detection: a replicated Redis under heavy load for a long
    /// while (10 minutes by default), with a given heartbeat and timeout;
    /// any takeover then is a false one. Then one kill of the primary's
    /// host, to see the same setting detect a real failure.
    Detection(DetectionArgs),
    /// Recording: throughput and latency of Redis and Memcached recorded
    /// by librrc (`rrc run --record`) against the plain container, same
    /// load, alternating rounds in one run; log bytes per request.
    Record(RecordArgs),
    /// Replay: how often replaying a recorded program with a data race
    /// reproduces its output, with neither mitigation, with the recorded
    /// global order, and with order plus the recorded timing, from its
    /// start and from a checkpoint; then Redis and Memcached replayed from
    /// random checkpoints under load (events, divergences, time).
    Replay(ReplayArgs),
    /// Redis latency and throughput through rrc's TAP forwarding path versus
    /// the same Redis on a plain veth, side by side in one lab.
    Net(NetArgs),
}

#[derive(Debug, Args)]
pub struct NetArgs {
    /// Latency samples per path (SETs and GETs, one at a time).
    #[arg(long, default_value_t = 40_000)]
    requests: u64,
    /// Requests per redis-benchmark throughput run.
    #[arg(long, default_value_t = 100_000)]
    throughput_requests: u64,
    /// Concurrent redis-benchmark clients.
    #[arg(long, default_value_t = 50)]
    clients: u32,
    /// Forwarder spin of the spinning rrc container.
    #[arg(long, default_value = "200us", value_parser = crate::cli::parse_duration)]
    spin: std::time::Duration,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct FailoverArgs {
    /// Applications to measure.
    #[arg(long, value_delimiter = ',', value_enum, default_values_t = [FailoverApp::Redis, FailoverApp::Memcached])]
    apps: Vec<FailoverApp>,
    /// Primary kills per application.
    #[arg(long, default_value_t = 20)]
    kills: usize,
    /// Verifying client connections.
    #[arg(long, default_value_t = 8)]
    connections: usize,
    /// How long each overhead load runs.
    #[arg(long, default_value = "5s", value_parser = crate::cli::parse_duration)]
    load: std::time::Duration,
    /// Checkpoint interval of the primary.
    #[arg(long, default_value = "100ms", value_parser = crate::cli::parse_duration)]
    epoch: std::time::Duration,
    /// The backup's failure-detection timeout.
    #[arg(long, default_value = "100ms", value_parser = crate::cli::parse_duration)]
    timeout: std::time::Duration,
    /// How often the primary's idle link says it is alive.
    #[arg(long, default_value = "25ms", value_parser = crate::cli::parse_duration)]
    heartbeat: std::time::Duration,
    /// Run the lab's arbiter (etcd on three hosts) and have both sides
    /// ask it; without it the backup fences the primary by killing its
    /// host. The report shows what the claim adds to a takeover.
    #[arg(long)]
    arbiter: bool,
    /// Seed of the kill moments (default: from the clock; printed).
    #[arg(long)]
    seed: Option<u64>,
    /// The replication mode. responsive: first measures, side by side,
    /// the plain container, the recorded one, the checkpoint-only primary
    /// and the responsive one (latency, the log's bytes per request and
    /// link load, the throughput cost); the kills are then made in
    /// responsive mode (takeover by replay) and each takeover's log is
    /// replayed once more offline and checked against what the clients
    /// received.
    #[arg(long, value_enum, default_value_t = ModeArg::Checkpoint)]
    mode: ModeArg,
    /// Fill Redis with this much data (MiB) before each kill, so that a
    /// takeover restores a realistic amount of memory (Redis alone).
    #[arg(long, default_value_t = 0, value_name = "MIB")]
    fill_mib: u64,
    /// How the backup's takeovers bring the memory in (`rrc backup
    /// --pages`): lazy, the program runs first and its memory follows;
    /// eager, all of it before the program runs; auto, lazy from 32 MiB
    /// on. With several (`--pages lazy,eager`) the kills take them in
    /// turn, and each gets its row of recovery figures.
    #[arg(long, value_delimiter = ',', value_enum, default_values_t = [PagesArg::Auto])]
    pages: Vec<PagesArg>,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// With --mode responsive: also plot the latency distributions of the
    /// side-by-side loads to this SVG file.
    #[arg(long, value_name = "FILE.svg")]
    plot: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct ReplayArgs {
    /// Replays per mode of the racy program.
    #[arg(long, default_value_t = 100)]
    runs: usize,
    /// Runs of the racy program replayed from a checkpoint, per mode (0:
    /// none).
    #[arg(long, default_value_t = 100)]
    checkpoint_runs: usize,
    /// Checkpoints replayed per server (0: none).
    #[arg(long, default_value_t = 3)]
    server_runs: usize,
    /// Servers to replay from a checkpoint.
    #[arg(long, value_delimiter = ',', value_enum, default_values_t = [FailoverApp::Redis, FailoverApp::Memcached])]
    apps: Vec<FailoverApp>,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct RecordArgs {
    /// Applications to measure.
    #[arg(long, value_delimiter = ',', value_enum, default_values_t = [FailoverApp::Redis, FailoverApp::Memcached])]
    apps: Vec<FailoverApp>,
    /// Verifying client connections.
    #[arg(long, default_value_t = 8)]
    connections: usize,
    /// How long each load runs.
    #[arg(long, default_value = "5s", value_parser = crate::cli::parse_duration)]
    load: std::time::Duration,
    /// Rounds (plain, then recorded) per application.
    #[arg(long, default_value_t = 2)]
    rounds: usize,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum FailoverApp {
    Redis,
    Memcached,
    Lighttpd,
    Tarantool,
}

impl FailoverApp {
    fn app(self) -> rrc_bench::failover::App {
        match self {
            FailoverApp::Redis => rrc_bench::failover::App::Redis,
            FailoverApp::Memcached => rrc_bench::failover::App::Memcached,
            FailoverApp::Lighttpd => rrc_bench::failover::App::Lighttpd,
            FailoverApp::Tarantool => rrc_bench::failover::App::Tarantool,
        }
    }
}

#[derive(Debug, Args)]
pub struct CkptArgs {
    /// Memory sizes to measure, in MiB.
    #[arg(long, value_delimiter = ',', default_values_t = [10usize, 100, 1024])]
    sizes: Vec<usize>,
    /// Rounds per workload (the median round is reported).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// A CRIU binary to measure on the same Redis in each round, side by
    /// side. Without it, `criu` on the PATH is used if `criu check` passes
    /// (else the reference figures are printed).
    #[arg(long, value_name = "PATH")]
    criu: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct PauseArgs {
    /// Footprints to measure, in MiB.
    #[arg(long, value_delimiter = ',', default_values_t = [10usize, 100, 1024])]
    sizes: Vec<usize>,
    /// Workloads to measure.
    #[arg(long, value_delimiter = ',', value_enum, default_values_t = [PauseWorkload::Fixture, PauseWorkload::Redis, PauseWorkload::Memcached])]
    workloads: Vec<PauseWorkload>,
    /// Incremental checkpoints per mode.
    #[arg(long, default_value_t = 30)]
    epochs: u64,
    /// Full checkpoints per workload.
    #[arg(long, default_value_t = 5)]
    full_epochs: u64,
    /// Time between checkpoints.
    #[arg(long, default_value = "100ms", value_parser = crate::cli::parse_duration)]
    every: std::time::Duration,
    /// Pages a second the synthetic workload writes.
    #[arg(long, default_value_t = 2000)]
    dirty_per_sec: u64,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct DetectionArgs {
    /// How often the primary's idle link says it is alive.
    #[arg(long, default_value = "25ms", value_parser = crate::cli::parse_duration)]
    heartbeat: std::time::Duration,
    /// Silence from the primary after which the backup takes over.
    #[arg(long, default_value = "100ms", value_parser = crate::cli::parse_duration)]
    timeout: std::time::Duration,
    /// How long the heavy load runs.
    #[arg(long = "for", default_value = "10m", value_parser = crate::cli::parse_duration)]
    soak: std::time::Duration,
    /// The replication mode.
    #[arg(long, value_enum, default_value_t = ModeArg::Responsive)]
    mode: ModeArg,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct StallsArgs {
    /// Memory Redis holds, in MiB.
    #[arg(long, default_value_t = 120)]
    mib: u64,
    /// Connections timing their replies.
    #[arg(long, default_value_t = 4)]
    clients: usize,
    /// Time between checkpoints.
    #[arg(long, default_value = "100ms", value_parser = crate::cli::parse_duration)]
    every: std::time::Duration,
    /// Length of each phase (without, then with checkpoints).
    #[arg(long, default_value = "8s", value_parser = crate::cli::parse_duration)]
    phase: std::time::Duration,
    /// Pairs of phases.
    #[arg(long, default_value_t = 2)]
    rounds: u32,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum PauseWorkload {
    Fixture,
    Redis,
    Memcached,
}

#[derive(Debug, Args)]
pub struct SocketsArgs {
    /// Numbers of open connections to measure.
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 100, 1000])]
    connections: Vec<usize>,
    /// Moves under load from verifying clients.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

pub fn bench(c: BenchCommand) -> Result<i32> {
    if let BenchCommand::Target { mb, dirty_per_sec } = c {
        rrc_bench::ckpt::target(mb, dirty_per_sec)?;
        return Ok(0);
    }
    rrc_container::probe::require_root("rrc bench")?;
    match c {
        BenchCommand::Target { .. } => unreachable!("handled above"),
        BenchCommand::Sockets(a) => {
            let exe = std::env::current_exe().context("cannot locate the rrc binary")?;
            let r = rrc_bench::sockets::run(&exe, &a.connections, a.rounds, &|m| {
                eprintln!("bench: {m}")
            })?;
            print!("{}", rrc_bench::sockets::render(&r));
            write_json(a.json.as_deref(), &r)?;
            Ok(0)
        }
        BenchCommand::Pause(a) => {
            use rrc_bench::pause::{self, PauseConfig, Workload};
            let exe = std::env::current_exe().context("cannot locate the rrc binary")?;
            let work = pause::default_work_dir();
            let cfg = PauseConfig {
                sizes: a.sizes,
                epochs: a.epochs.max(1),
                full_epochs: a.full_epochs.max(1),
                every: a.every,
                dirty_per_sec: a.dirty_per_sec,
                workloads: a
                    .workloads
                    .iter()
                    .map(|w| match w {
                        PauseWorkload::Fixture => Workload::Fixture,
                        PauseWorkload::Redis => Workload::Redis,
                        PauseWorkload::Memcached => Workload::Memcached,
                    })
                    .collect(),
            };
            let rows = pause::run(&exe, &cfg, &work, &|m| eprintln!("bench: {m}"));
            let _ = std::fs::remove_dir_all(&work);
            let rows = rows?;
            print!("{}", pause::render(&rows));
            write_json(a.json.as_deref(), &rows)?;
            Ok(0)
        }
        BenchCommand::Ckpt(a) => {
            let exe = std::env::current_exe().context("cannot locate the rrc binary")?;
            let criu = rrc_bench::criu::Criu::find(a.criu.as_deref())?;
            let work = rrc_bench::ckpt::default_work_dir();
            let results = rrc_bench::ckpt::run(
                &exe,
                &a.sizes,
                a.rounds.max(1),
                &work,
                criu.as_ref(),
                &|m| eprintln!("bench: {m}"),
            );
            let _ = std::fs::remove_dir_all(&work);
            let results = results?;
            print!("{}", rrc_bench::ckpt::render(&results));
            write_json(a.json.as_deref(), &results)?;
            Ok(0)
        }
        BenchCommand::Failover(a) => {
            use rrc_bench::failover::{Moments, PairOptions};
            use rrc_bench::failover_bench::{self, FailoverConfig};
            anyhow::ensure!(a.connections > 0, "--connections must be at least 1");
            anyhow::ensure!(
                a.plot.is_none() || a.mode == ModeArg::Responsive,
                "--plot draws the side-by-side loads, which --mode responsive measures"
            );
            anyhow::ensure!(
                a.fill_mib == 0
                    || a.apps
                        .iter()
                        .all(|x| x.app() == rrc_bench::failover::App::Redis),
                "--fill-mib fills Redis alone: give --apps redis"
            );
            let exe = std::env::current_exe().context("cannot locate the rrc binary")?;
            anyhow::ensure!(
                a.heartbeat * 2 <= a.timeout,
                "--timeout must be at least twice --heartbeat"
            );
            let cfg = FailoverConfig {
                apps: a.apps.iter().map(|x| x.app()).collect(),
                kills: a.kills,
                connections: a.connections,
                load: a.load,
                pair: PairOptions {
                    epoch: a.epoch,
                    timeout: a.timeout,
                    heartbeat: a.heartbeat,
                    mode: a.mode.into(),
                    ..PairOptions::default()
                },
                seed: a.seed.unwrap_or_else(Moments::seed_from_clock),
                arbiter: a.arbiter,
                pages: a.pages.iter().map(|&p| p.into()).collect(),
                fill_mib: a.fill_mib,
            };
            eprintln!("bench: kill moments from seed {}", cfg.seed);
            let r = failover_bench::run(&exe, &cfg, &|m| eprintln!("bench: {m}"))?;
            print!("{}", failover_bench::render(&r));
            write_json(a.json.as_deref(), &r)?;
            if let Some(p) = &a.plot {
                rrc_bench::plot::latency_cdfs(&r, p)?;
                println!("latency distributions plotted in {}", p.display());
            }
            Ok(0)
        }
        BenchCommand::Record(a) => {
            use rrc_bench::record_bench::{self, RecordConfig};
            anyhow::ensure!(a.connections > 0, "--connections must be at least 1");
            let exe = std::env::current_exe().context("cannot locate the rrc binary")?;
            let cfg = RecordConfig {
                apps: a.apps.iter().map(|x| x.app()).collect(),
                connections: a.connections,
                load: a.load,
                rounds: a.rounds.max(1),
            };
            let rows = record_bench::run(&exe, &cfg, &|m| eprintln!("bench: {m}"))?;
            print!("{}", record_bench::render(&rows));
            write_json(a.json.as_deref(), &rows)?;
            Ok(0)
        }
        BenchCommand::Replay(a) => {
            let exe = std::env::current_exe().context("cannot locate the rrc binary")?;
            let progress = |m: &str| eprintln!("bench: {m}");
            let racy = rrc_bench::replay_bench::run(&exe, a.runs.max(1), false, &progress)?;
            print!("{}", rrc_bench::replay_bench::render(&racy));
            let racy_checkpoint = if a.checkpoint_runs > 0 {
                let r = rrc_bench::replay_bench::run(&exe, a.checkpoint_runs, true, &progress)?;
                print!("\n{}", rrc_bench::replay_bench::render(&r));
                Some(r)
            } else {
                None
            };
            let apps: Vec<_> = a.apps.iter().map(|x| x.app()).collect();
            let servers = if a.server_runs > 0 {
                rrc_bench::replay_bench::servers(&exe, &apps, a.server_runs, &progress)?
            } else {
                Vec::new()
            };
            if !servers.is_empty() {
                print!("\n{}", rrc_bench::replay_bench::render_servers(&servers));
            }
            write_json(
                a.json.as_deref(),
                &serde_json::json!({
                    "racy": racy,
                    "racy_from_checkpoint": racy_checkpoint,
                    "servers": servers
                }),
            )?;
            Ok(0)
        }
        BenchCommand::Detection(a) => {
            use rrc_bench::detection::{self, DetectionConfig};
            use rrc_bench::failover::PairOptions;
            anyhow::ensure!(
                a.heartbeat * 2 <= a.timeout,
                "--timeout must be at least twice --heartbeat"
            );
            let cfg = DetectionConfig {
                pair: PairOptions {
                    heartbeat: a.heartbeat,
                    timeout: a.timeout,
                    mode: a.mode.into(),
                    ..PairOptions::default()
                },
                soak: a.soak,
                ..Default::default()
            };
            let exe = std::env::current_exe().context("cannot locate the rrc binary")?;
            let report = detection::run(&exe, &cfg, &|m| eprintln!("bench: {m}"))?;
            print!("{}", detection::render(&report));
            write_json(a.json.as_deref(), &report)?;
            Ok(0)
        }
        BenchCommand::Stalls(a) => {
            use rrc_bench::stalls::{self, StallsConfig};
            let cfg = StallsConfig {
                mib: a.mib,
                clients: a.clients,
                every: a.every,
                phase: a.phase,
                rounds: a.rounds,
                ..Default::default()
            };
            let exe = std::env::current_exe().context("cannot locate the rrc binary")?;
            let report = stalls::run(&exe, &cfg, &|m| eprintln!("bench: {m}"))?;
            print!("{}", stalls::render(&report));
            write_json(a.json.as_deref(), &report)?;
            Ok(0)
        }
        BenchCommand::Net(a) => {
            let cfg = NetBenchConfig {
                requests: a.requests,
                throughput_requests: a.throughput_requests,
                clients: a.clients,
                spin: a.spin,
                ..Default::default()
            };
            let exe = std::env::current_exe().context("cannot locate the rrc binary")?;
            let report = net::run(&exe, &cfg, &|m| eprintln!("bench: {m}"))?;
            print!("{}", net::render(&report));
            write_json(a.json.as_deref(), &report)?;
            Ok(0)
        }
    }
}

/// Writes a benchmark's results as JSON, if asked to.
fn write_json(path: Option<&std::path::Path>, results: &impl serde::Serialize) -> Result<()> {
    if let Some(path) = path {
        std::fs::write(path, serde_json::to_string_pretty(results)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}
