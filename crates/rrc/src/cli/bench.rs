//! `rrc bench`: measurements, each comparing with and without rrc in one run.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use rrc_bench::net::{self, NetBenchConfig};

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
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

pub fn bench(c: BenchCommand) -> Result<i32> {
    rrc_container::probe::require_root("rrc bench")?;
    match c {
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
