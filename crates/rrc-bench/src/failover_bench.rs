//! `rrc bench failover`: what replication costs and what a failure costs.
//!
//! For each application, in one lab and one run: verifying clients load
//! the plain container (`rrc run`) and then the replicated one (`rrc
//! primary` with `rrc backup`), the same load for the same time, so the
//! added latency and lost throughput are side by side. Then the primary
//! host is killed at random moments under load, N times: recovery from the
//! kill to the first answered request, broken into detection, fencing,
//! restore and the rest (announcement and the clients' retransmission),
//! and how many recoveries succeeded.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use rrc_lab::Host;
use serde::Serialize;

use crate::failover::{App, Moments, Pair, PairOptions, Trial, trial};
use crate::session::LabSession;
use crate::stats::{Latencies, Summary};
use crate::verify::{self, VerifyReport};

#[derive(Debug, Clone)]
pub struct FailoverConfig {
    pub apps: Vec<App>,
    pub kills: usize,
    pub connections: usize,
    /// How long each overhead load runs.
    pub load: Duration,
    pub pair: PairOptions,
    pub seed: u64,
}

/// One load's figures.
#[derive(Debug, Clone, Serialize)]
pub struct Load {
    pub requests: u64,
    pub per_sec: f64,
    pub latency: Summary,
    pub errors: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct Overhead {
    pub app: App,
    pub plain: Load,
    pub replicated: Load,
}

/// Averages over the successful recoveries, in milliseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Recovery {
    pub app: Option<App>,
    pub kills: usize,
    pub succeeded: usize,
    pub first_answer_avg: f64,
    pub first_answer_max: f64,
    pub all_answered_avg: f64,
    pub all_answered_max: f64,
    pub detection_avg: f64,
    pub fence_avg: f64,
    pub restore_avg: f64,
    /// Announcement, forwarding and the clients' retransmission: the rest.
    pub resume_avg: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct FailoverReport {
    pub seed: u64,
    pub epoch_ms: f64,
    pub timeout_ms: f64,
    pub overhead: Vec<Overhead>,
    pub recovery: Vec<Recovery>,
    pub trials: Vec<Trial>,
}

/// Latency and throughput of a closed-loop load from its replies: each
/// connection sends its next request when a reply comes, so the time
/// between two replies is one request's latency.
fn load_figures(r: &VerifyReport, took: Duration) -> Load {
    let mut lat = Latencies::default();
    for conn in &r.replies {
        for w in conn.windows(2) {
            lat.record(w[1].duration_since(w[0]));
        }
    }
    Load {
        requests: r.requests,
        per_sec: r.requests as f64 / took.as_secs_f64(),
        latency: lat.summary(),
        errors: r.errors.len(),
    }
}

pub fn measure(lab: &LabSession, app: App, connections: usize, load: Duration) -> Result<Load> {
    let target = app.target(lab);
    lab.wait_tcp(Host::Client, target, Duration::from_secs(10))?;
    let r = lab.in_host(Host::Client, || {
        verify::run(app.service(), target, connections, || {}, load)
    })?;
    // verify::run loads for half a second before `during`.
    Ok(load_figures(&r, load + Duration::from_millis(500)))
}

fn summarize(app: App, trials: &[Trial]) -> Recovery {
    let ok: Vec<&Trial> = trials.iter().filter(|t| t.ok()).collect();
    let n = ok.len().max(1) as f64;
    let avg = |f: &dyn Fn(&Trial) -> f64| ok.iter().map(|t| f(t)).sum::<f64>() / n;
    let max = |f: &dyn Fn(&Trial) -> f64| ok.iter().map(|t| f(t)).fold(0.0, f64::max);
    let first = |t: &Trial| t.first_answer_ms.unwrap_or(0.0);
    let all = |t: &Trial| t.all_answered_ms.unwrap_or(0.0);
    let tk = |t: &Trial| t.takeover.clone().unwrap_or_default();
    Recovery {
        app: Some(app),
        kills: trials.len(),
        succeeded: ok.len(),
        first_answer_avg: avg(&first),
        first_answer_max: max(&first),
        all_answered_avg: avg(&all),
        all_answered_max: max(&all),
        detection_avg: avg(&|t| tk(t).silent_ms),
        fence_avg: avg(&|t| tk(t).fence_ms),
        restore_avg: avg(&|t| tk(t).restore_ms),
        resume_avg: avg(&|t| {
            let k = tk(t);
            first(t) - k.silent_ms - k.fence_ms - k.restore_ms
        }),
    }
}

pub fn run(rrc: &Path, cfg: &FailoverConfig, progress: &dyn Fn(&str)) -> Result<FailoverReport> {
    let lab = LabSession::start(rrc, "benchfo", None)?;
    let mut moments = Moments::new(cfg.seed);
    let mut report = FailoverReport {
        seed: cfg.seed,
        epoch_ms: cfg.pair.epoch.as_secs_f64() * 1e3,
        timeout_ms: cfg.pair.timeout.as_secs_f64() * 1e3,
        overhead: Vec::new(),
        recovery: Vec::new(),
        trials: Vec::new(),
    };
    for &app in &cfg.apps {
        progress(&format!("{}: plain container", app.name()));
        lab.run_container(Host::Primary, app.name(), lab.plan().vip(), app.command())?;
        let plain = measure(&lab, app, cfg.connections, cfg.load)?;
        lab.run_on(Host::Primary, &[&lab.rrc_path(), "stop", app.name()])?;

        progress(&format!("{}: replicated container", app.name()));
        let mut pair = Pair::new(&lab, app, cfg.pair.clone())?;
        pair.start_backup()?;
        pair.start_primary()?;
        let replicated = measure(&lab, app, cfg.connections, cfg.load)?;
        report.overhead.push(Overhead {
            app,
            plain,
            replicated,
        });

        // The pair is up: the first kill uses it.
        let mut trials = Vec::new();
        for i in 0..cfg.kills {
            if i > 0 {
                pair.start_backup()?;
                pair.start_primary()?;
            }
            let at = moments.between(Duration::from_millis(200), Duration::from_millis(2000));
            let t = trial(&mut pair, cfg.connections, at, Duration::from_millis(1500))
                .with_context(|| format!("{} kill {}", app.name(), i + 1))?;
            progress(&format!(
                "{} kill {}/{}: {} after {:.0} ms of load; first answer {}, all connections {}{}",
                app.name(),
                i + 1,
                cfg.kills,
                if t.ok() { "recovered" } else { "FAILED" },
                t.kill_after_ms,
                ms_or_none(t.first_answer_ms),
                ms_or_none(t.all_answered_ms),
                t.errors
                    .first()
                    .map(|e| format!("; {e}"))
                    .unwrap_or_default()
            ));
            trials.push(t);
            pair.reset()?;
        }
        report.recovery.push(summarize(app, &trials));
        report.trials.extend(trials);
    }
    Ok(report)
}

fn ms_or_none(v: Option<f64>) -> String {
    v.map(|v| format!("{v:.0} ms"))
        .unwrap_or_else(|| "never".into())
}

pub fn render(r: &FailoverReport) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "Replication overhead (epoch {:.0} ms; closed-loop verifying clients, same load, one run)",
        r.epoch_ms
    );
    let _ = writeln!(
        s,
        "{:<10} {:<11} {:>10} {:>10} {:>10} {:>10} {:>7}",
        "app", "container", "req/s", "avg ms", "p50 ms", "p99 ms", "errors"
    );
    for o in &r.overhead {
        for (what, l) in [("plain", &o.plain), ("replicated", &o.replicated)] {
            let _ = writeln!(
                s,
                "{:<10} {:<11} {:>10.0} {:>10.2} {:>10.2} {:>10.2} {:>7}",
                o.app.name(),
                what,
                l.per_sec,
                l.latency.mean_us / 1e3,
                l.latency.p50_us / 1e3,
                l.latency.p99_us / 1e3,
                l.errors
            );
        }
    }
    let _ = writeln!(
        s,
        "\nRecovery from a primary host kill (backup timeout {:.0} ms; ms, averages over successful recoveries; seed {})",
        r.timeout_ms, r.seed
    );
    let _ = writeln!(
        s,
        "{:<10} {:>9} {:>10} {:>10} {:>10} {:>10} {:>8} {:>8} {:>8}",
        "app",
        "recovered",
        "first avg",
        "first max",
        "all avg",
        "all max",
        "detect",
        "restore",
        "resume"
    );
    for v in &r.recovery {
        let _ = writeln!(
            s,
            "{:<10} {:>5}/{:<3} {:>10.0} {:>10.0} {:>10.0} {:>10.0} {:>8.0} {:>8.0} {:>8.0}",
            v.app.map(App::name).unwrap_or("-"),
            v.succeeded,
            v.kills,
            v.first_answer_avg,
            v.first_answer_max,
            v.all_answered_avg,
            v.all_answered_max,
            v.detection_avg,
            v.restore_avg,
            v.resume_avg
        );
    }
    let _ = writeln!(
        s,
        "(first: kill to the first reply on any connection; all: until every connection was answered again;\n detect: the primary's silence until the backup decided; resume: announcement, forwarding and client retransmission; fencing averaged {:.0} ms)",
        r.recovery.iter().map(|v| v.fence_avg).sum::<f64>() / r.recovery.len().max(1) as f64
    );
    s
}
