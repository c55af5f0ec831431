//! `rrc bench`: measurements, each comparing with and without rrc in one run.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use rrc_bench::net::{self, NetBenchConfig};

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Checkpoint time, the pause the process sees, image size and restore
    /// time for 10 MB, 100 MB and 1 GB of touched memory, and for a Redis
    /// holding about 114 MB.
    Ckpt(CkptArgs),
    /// What connections add to a checkpoint and a restore (1, 100 and 1000
    /// Redis connections moved between lab hosts), and the longest gap
    /// busy clients see across such a move.
    Sockets(SocketsArgs),
    /// The workload process of `bench ckpt` (not for direct use).
    #[command(hide = true)]
    Target {
        #[arg(long)]
        mb: usize,
    },
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
    if let BenchCommand::Target { mb } = c {
        rrc_bench::ckpt::target(mb)?;
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
            if let Some(path) = a.json {
                std::fs::write(&path, serde_json::to_string_pretty(&r)?)
                    .with_context(|| format!("cannot write {}", path.display()))?;
            }
            Ok(0)
        }
        BenchCommand::Ckpt(a) => {
            let exe = std::env::current_exe().context("cannot locate the rrc binary")?;
            let work = rrc_bench::ckpt::default_work_dir();
            let results = rrc_bench::ckpt::run(&exe, &a.sizes, a.rounds.max(1), &work, &|m| {
                eprintln!("bench: {m}")
            });
            let _ = std::fs::remove_dir_all(&work);
            let results = results?;
            print!("{}", rrc_bench::ckpt::render(&results));
            if let Some(path) = a.json {
                std::fs::write(&path, serde_json::to_string_pretty(&results)?)
                    .with_context(|| format!("cannot write {}", path.display()))?;
            }
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
            if let Some(path) = a.json {
                std::fs::write(&path, serde_json::to_string_pretty(&report)?)
                    .with_context(|| format!("cannot write {}", path.display()))?;
            }
            Ok(0)
        }
    }
}
