//! `rrc bench record`: what recording costs a server.
//!
//! For each application, in one lab and one run, alternating rounds: the
//! same verifying closed-loop load on the plain container (`rrc run`) and
//! on the recorded one (`rrc run --record`), throughput and latency side
//! by side, and the log's size per request.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use rrc_lab::Host;
use serde::Serialize;

use crate::failover::App;
use crate::failover_bench::{Load, measure};
use crate::session::LabSession;

#[derive(Debug, Clone)]
pub struct RecordConfig {
    pub apps: Vec<App>,
    pub connections: usize,
    pub load: Duration,
    pub rounds: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct RecordRow {
    pub app: App,
    pub round: usize,
    pub plain: Load,
    pub recorded: Load,
    pub log_bytes: u64,
    pub log_bytes_per_request: f64,
    /// Redis only: redis-benchmark (50 clients, SET and GET) requests per
    /// second, plain and recorded: the server saturated.
    pub saturated: Option<(f64, f64)>,
}

/// redis-benchmark's SET and GET rates, averaged.
fn saturate(lab: &LabSession, app: App) -> Result<Option<f64>> {
    if app != App::Redis {
        return Ok(None);
    }
    let r = crate::redis_benchmark::run(
        &lab.launcher(Host::Client),
        &lab.plan().vip().addr().to_string(),
        app.port(),
        100_000,
        50,
        "set,get",
    )?;
    let rate = |k: &str| r.get(k).copied().unwrap_or(0.0);
    Ok(Some((rate("SET") + rate("GET")) / 2.0))
}

fn dir_size(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

pub fn run(rrc: &Path, cfg: &RecordConfig, progress: &dyn Fn(&str)) -> Result<Vec<RecordRow>> {
    let lab = LabSession::start(rrc, "benchrec", None)?;
    let work: PathBuf =
        std::env::temp_dir().join(format!("rrc-bench-record-{}", std::process::id()));
    let mut rows = Vec::new();
    for &app in &cfg.apps {
        for round in 1..=cfg.rounds {
            progress(&format!("{}: round {round}, plain", app.name()));
            app.start(&lab, &[])?;
            let plain = measure(&lab, app, cfg.connections, cfg.load)?;
            let plain_sat = saturate(&lab, app)?;
            lab.run_on(Host::Primary, &[&lab.rrc_path(), "stop", app.name()])?;

            progress(&format!("{}: round {round}, recorded", app.name()));
            let dir = work.join(format!("{}-{round}", app.name()));
            let _ = std::fs::remove_dir_all(&dir);
            app.start(&lab, &["--record", &dir.display().to_string()])?;
            let recorded = measure(&lab, app, cfg.connections, cfg.load)?;
            // The log of this load alone (the drain lags by a millisecond).
            std::thread::sleep(Duration::from_millis(50));
            let log_bytes = dir_size(&dir);
            let recorded_sat = saturate(&lab, app)?;
            lab.run_on(Host::Primary, &[&lab.rrc_path(), "stop", app.name()])
                .context("stopping the recorded container")?;
            let _ = std::fs::remove_dir_all(&dir);
            rows.push(RecordRow {
                app,
                round,
                log_bytes_per_request: log_bytes as f64 / recorded.requests.max(1) as f64,
                saturated: plain_sat.zip(recorded_sat),
                plain,
                recorded,
                log_bytes,
            });
        }
    }
    let _ = std::fs::remove_dir_all(&work);
    Ok(rows)
}

pub fn render(rows: &[RecordRow]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "Recording overhead (closed-loop verifying clients, same load, alternating in one run)"
    );
    let _ = writeln!(
        s,
        "{:<10} {:>5} {:>10} {:>10} {:>9} {:>9} {:>9} {:>9} {:>9} {:>10}",
        "app",
        "round",
        "plain/s",
        "rec/s",
        "overhead",
        "avg µs",
        "rec avg",
        "p99 µs",
        "rec p99",
        "log B/req"
    );
    for r in rows {
        let overhead = 1.0 - r.recorded.per_sec / r.plain.per_sec.max(1e-9);
        let _ = writeln!(
            s,
            "{:<10} {:>5} {:>10.0} {:>10.0} {:>8.1}% {:>9.0} {:>9.0} {:>9.0} {:>9.0} {:>10.0}",
            r.app.name(),
            r.round,
            r.plain.per_sec,
            r.recorded.per_sec,
            overhead * 100.0,
            r.plain.latency.mean_us,
            r.recorded.latency.mean_us,
            r.plain.latency.p99_us,
            r.recorded.latency.p99_us,
            r.log_bytes_per_request
        );
    }
    for r in rows {
        if let Some((p, rec)) = r.saturated {
            let _ = writeln!(
                s,
                "{} round {}: redis-benchmark -c 50 (SET/GET average): plain {:.0}/s, recorded {:.0}/s, overhead {:.1}%",
                r.app.name(),
                r.round,
                p,
                rec,
                (1.0 - rec / p.max(1e-9)) * 100.0
            );
        }
    }
    s
}
