//! `rrc bench detection`: whether a detection setting (the primary's
//! heartbeat, the backup's timeout) takes over from a primary that is only
//! busy. A replicated Redis in a lab under heavy load for a long while:
//! `redis-benchmark` with many connections plus verifying clients, on a
//! machine whose two CPUs the primary, the backup, the server and the
//! clients all share. Any takeover in that time is a false one. Then the
//! primary's host is killed once, so the same setting is seen to detect a
//! real failure, and how fast.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Result;
use rrc_lab::Host;
use serde::Serialize;

use crate::failover::{App, Pair, PairOptions, trial};
use crate::session::LabSession;

#[derive(Debug, Clone)]
pub struct DetectionConfig {
    pub lab: String,
    pub pair: PairOptions,
    /// How long the load runs.
    pub soak: Duration,
    /// Connections of the background `redis-benchmark`.
    pub benchmark_clients: u32,
    /// Verifying connections.
    pub connections: usize,
}

impl Default for DetectionConfig {
    fn default() -> Self {
        DetectionConfig {
            lab: format!("det{}", std::process::id() % 100_000),
            pair: PairOptions::default(),
            soak: Duration::from_secs(600),
            benchmark_clients: 50,
            connections: 8,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct DetectionReport {
    pub heartbeat_ms: f64,
    pub timeout_ms: f64,
    pub soak_s: f64,
    /// Requests the verifying clients made, and their errors.
    pub requests: u64,
    pub errors: usize,
    /// The longest a verifying connection waited between two replies.
    pub max_gap_ms: f64,
    /// Takeovers while the primary lived (each a false one).
    pub false_takeovers: usize,
    /// The backup's longest silence of the primary during the load: how
    /// close the timeout came to a false takeover.
    pub longest_silence_ms: Option<f64>,
    /// The backup's own account of the primary's longest silence before
    /// the real failure, and kill to every connection answered.
    pub detected_after_ms: Option<f64>,
    pub all_answered_ms: Option<f64>,
}

pub fn run(rrc: &Path, cfg: &DetectionConfig, progress: &dyn Fn(&str)) -> Result<DetectionReport> {
    progress(&format!("bringing up lab {}", cfg.lab));
    let lab = LabSession::start(rrc, &cfg.lab, None)?;
    let mut pair = Pair::new(&lab, App::Redis, cfg.pair.clone())?;
    pair.start_backup()?;
    pair.start_primary()?;
    let target = pair.target();
    progress(&format!(
        "heavy load for {:?}: redis-benchmark with {} connections and {} verifying connections (heartbeat {:?}, timeout {:?})",
        cfg.soak, cfg.benchmark_clients, cfg.connections, cfg.pair.heartbeat, cfg.pair.timeout
    ));
    let mut bench = lab
        .command_on(
            Host::Client,
            &[
                "redis-benchmark",
                "-h",
                &target.ip().to_string(),
                "-p",
                &target.port().to_string(),
                "-n",
                "2000000000",
                "-c",
                &cfg.benchmark_clients.to_string(),
                "-r",
                "100000",
                "-t",
                "set,get",
                "-q",
            ],
        )
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let started = Instant::now();
    let verify = lab.in_host(Host::Client, || {
        crate::verify::run(
            crate::verify::Service::Redis,
            target,
            cfg.connections,
            || {},
            cfg.soak,
        )
    });
    let _ = bench.kill();
    let _ = bench.wait();
    let verify = verify?;
    let said = pair.backup_output();
    let false_takeovers = said.matches("taking over").count();
    // The status is rewritten at most once a second, with a commit: the
    // last longest is there by now.
    std::thread::sleep(Duration::from_millis(1500));
    let longest_silence_ms = rrc_replica::backup_status::BackupStatus::read(pair.backup_dir())
        .map(|s| s.longest_silence_ms);
    progress(&format!(
        "{:?} of load: {} requests, {} errors, {} takeover(s)",
        started.elapsed(),
        verify.requests,
        verify.errors.len(),
        false_takeovers
    ));
    let (detected_after_ms, all_answered_ms) = if false_takeovers == 0 && pair.backup_running() {
        progress("killing the primary's host once");
        let t = trial(
            &mut pair,
            4,
            Duration::from_millis(700),
            Duration::from_millis(1500),
        )?;
        (t.takeover.map(|l| l.silent_ms), t.all_answered_ms)
    } else {
        (None, None)
    };
    Ok(DetectionReport {
        heartbeat_ms: cfg.pair.heartbeat.as_secs_f64() * 1e3,
        timeout_ms: cfg.pair.timeout.as_secs_f64() * 1e3,
        soak_s: cfg.soak.as_secs_f64(),
        requests: verify.requests,
        errors: verify.errors.len(),
        max_gap_ms: verify.max_gap_ms,
        false_takeovers,
        longest_silence_ms,
        detected_after_ms,
        all_answered_ms,
    })
}

pub fn render(r: &DetectionReport) -> String {
    let ms = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.0} ms"));
    format!(
        "heartbeat {:.0} ms, timeout {:.0} ms: {:.0} s of heavy load, {} verified requests, {} errors, longest wait {:.0} ms, false takeovers {}, the primary's longest silence {}\n\
         then one kill: taken over after {} of silence, every connection answered {} after the kill\n",
        r.heartbeat_ms,
        r.timeout_ms,
        r.soak_s,
        r.requests,
        r.errors,
        r.max_gap_ms,
        r.false_takeovers,
        ms(r.longest_silence_ms),
        ms(r.detected_after_ms),
        ms(r.all_answered_ms),
    )
}
