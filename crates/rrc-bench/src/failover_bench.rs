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
use rrc_replica::gate::DelaySummary;
use rrc_replica::primary::PrimaryStats;
use serde::Serialize;

use crate::failover::{App, Mode, Moments, Pages, Pair, PairOptions, ReplayCheck, Trial, trial};
use crate::session::LabSession;
use crate::stats::{Latencies, Summary};
use crate::verify::{self, VerifyReport};

#[derive(Debug, Clone)]
pub struct FailoverConfig {
    pub apps: Vec<App>,
    /// Primary kills per application.
    pub kills: usize,
    pub connections: usize,
    /// How long each overhead load runs.
    pub load: Duration,
    /// How the pair runs: its mode is the one the kills are made in (in
    /// responsive mode, its costs are measured side by side first).
    pub pair: PairOptions,
    pub seed: u64,
    /// Run the lab's arbiter and have both sides ask it (the pair's own
    /// `arbiter` is set from the lab's).
    pub arbiter: bool,
    /// Redis only: the memory (MiB) it is filled with before each kill,
    /// for takeovers of a realistic size.
    pub fill_mib: u64,
    /// How takeovers bring the memory in: with more than one, the kills
    /// take them in turn (the pair's own `pages` is ignored), and each
    /// gets its row of recovery figures.
    pub pages: Vec<Pages>,
}

/// One load's figures.
#[derive(Debug, Clone, Serialize)]
pub struct Load {
    pub requests: u64,
    pub per_sec: f64,
    pub latency: Summary,
    pub errors: usize,
    /// The latency distribution (µs, fraction at or below), for a plot.
    #[serde(skip)]
    pub cdf: Vec<(f64, f64)>,
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
    pub pages: Option<Pages>,
    pub kills: usize,
    pub succeeded: usize,
    pub first_answer_avg: f64,
    pub first_answer_max: f64,
    pub all_answered_avg: f64,
    pub all_answered_p99: f64,
    pub all_answered_max: f64,
    pub detection_avg: f64,
    /// The backup's claim of the service from the arbiter.
    pub arbiter_avg: f64,
    pub fence_avg: f64,
    /// From the decision to the service running again (restore, and in
    /// responsive mode replay and connections).
    pub restore_avg: f64,
    /// Responsive mode: of that, the steps of the takeovers by replay.
    pub replay_restore_avg: f64,
    pub replay_avg: f64,
    pub connections_avg: f64,
    /// Responsive mode: takeovers by replay, and fallbacks to the
    /// checkpoint.
    pub replayed: usize,
    pub fallbacks: usize,
    /// Announcement, forwarding and the clients' retransmission: the rest.
    pub resume_avg: f64,
}

/// What replication costs one application, side by side in one lab: the
/// plain container, the recorded one (`rrc run --record`: the recording
/// alone), the checkpoint-only primary (replies wait for commits) and the
/// responsive one (replies wait for the backup's acknowledgement of their
/// log).
#[derive(Debug, Clone, Serialize)]
pub struct Responsive {
    pub app: App,
    pub plain: Load,
    pub recorded: Load,
    pub checkpoint: Load,
    pub responsive: Load,
    /// How long frames with payload waited in responsive mode, from
    /// leaving the program to the backup's acknowledgement of their log.
    pub held: DelaySummary,
    /// Log bytes per request (event records; inbound frames), and the
    /// link's load (log; checkpoints), during the load with replies at log
    /// acknowledgement.
    pub record_bytes_per_request: f64,
    pub net_bytes_per_request: f64,
    pub log_mb_per_s: f64,
    pub checkpoint_mb_per_s: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct FailoverReport {
    pub seed: u64,
    pub epoch_ms: f64,
    pub timeout_ms: f64,
    pub mode: Mode,
    pub overhead: Vec<Overhead>,
    pub responsive: Vec<Responsive>,
    pub recovery: Vec<Recovery>,
    pub trials: Vec<Trial>,
    /// Responsive mode: each takeover's log replayed offline.
    pub replays: Vec<ReplayCheck>,
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
        cdf: lat.cdf(200),
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

fn summarize(app: App, pages: Pages, trials: &[Trial]) -> Recovery {
    let ok: Vec<&Trial> = trials.iter().filter(|t| t.ok()).collect();
    let n = ok.len().max(1) as f64;
    // Folded from +0.0: the sum of nothing is -0.0, printed "-0".
    let avg = |f: &dyn Fn(&Trial) -> f64| ok.iter().map(|t| f(t)).fold(0.0, |a, b| a + b) / n;
    let max = |f: &dyn Fn(&Trial) -> f64| ok.iter().map(|t| f(t)).fold(0.0, f64::max);
    let first = |t: &Trial| t.first_answer_ms.unwrap_or(0.0);
    let all = |t: &Trial| t.all_answered_ms.unwrap_or(0.0);
    let tk = |t: &Trial| t.takeover.clone().unwrap_or_default();
    let replays: Vec<_> = ok
        .iter()
        .filter_map(|t| t.takeover.as_ref()?.replay.clone())
        .collect();
    let rn = replays.len().max(1) as f64;
    let ravg = |f: &dyn Fn(&crate::failover::ReplayLine) -> f64| {
        replays.iter().map(f).fold(0.0, |a, b| a + b) / rn
    };
    let mut alls: Vec<f64> = ok.iter().map(|t| all(t)).collect();
    alls.sort_by(f64::total_cmp);
    let p99 = alls
        .get(((alls.len() as f64 * 0.99).ceil() as usize).saturating_sub(1))
        .copied()
        .unwrap_or(0.0);
    Recovery {
        app: Some(app),
        pages: Some(pages),
        kills: trials.len(),
        succeeded: ok.len(),
        first_answer_avg: avg(&first),
        first_answer_max: max(&first),
        all_answered_avg: avg(&all),
        all_answered_p99: p99,
        all_answered_max: max(&all),
        detection_avg: avg(&|t| tk(t).silent_ms),
        arbiter_avg: avg(&|t| tk(t).arbiter_ms),
        fence_avg: avg(&|t| tk(t).fence_ms),
        restore_avg: avg(&|t| tk(t).restore_ms),
        replay_restore_avg: ravg(&|r| r.restore_ms),
        replay_avg: ravg(&|r| r.replay_ms),
        connections_avg: ravg(&|r| r.connections_ms),
        replayed: replays.len(),
        fallbacks: trials
            .iter()
            .filter(|t| t.takeover.as_ref().is_some_and(|k| k.fallback.is_some()))
            .count(),
        resume_avg: avg(&|t| {
            let k = tk(t);
            first(t) - k.silent_ms - k.arbiter_ms - k.fence_ms - k.restore_ms
        }),
    }
}

pub fn run(rrc: &Path, cfg: &FailoverConfig, progress: &dyn Fn(&str)) -> Result<FailoverReport> {
    let lab = if cfg.arbiter {
        LabSession::start_with_arbiter(rrc, "benchfo", None)?
    } else {
        LabSession::start(rrc, "benchfo", None)?
    };
    let mut cfg = cfg.clone();
    cfg.pair.arbiter = lab.arbiter().map(str::to_string);
    let mut seen = Vec::new();
    cfg.pages.retain(|p| {
        let new = !seen.contains(p);
        seen.push(*p);
        new
    });
    if cfg.pages.is_empty() {
        cfg.pages = vec![cfg.pair.pages];
    }
    cfg.pair.pages = cfg.pages[0];
    let cfg = &cfg;
    let mut moments = Moments::new(cfg.seed);
    let mut report = FailoverReport {
        seed: cfg.seed,
        epoch_ms: cfg.pair.epoch.as_secs_f64() * 1e3,
        timeout_ms: cfg.pair.timeout.as_secs_f64() * 1e3,
        mode: cfg.pair.mode,
        overhead: Vec::new(),
        responsive: Vec::new(),
        recovery: Vec::new(),
        trials: Vec::new(),
        replays: Vec::new(),
    };
    for &app in &cfg.apps {
        if cfg.pair.mode == Mode::Responsive {
            report
                .responsive
                .push(responsive_costs(&lab, app, cfg, progress)?);
        }
        let mut pair = Pair::new(&lab, app, cfg.pair.clone())?;
        if cfg.pair.mode == Mode::Checkpoint {
            let plain = measure_plain(&lab, app, cfg, progress)?;
            progress(&format!("{}: replicated container", app.name()));
            pair.start_backup()?;
            pair.start_primary()?;
            let replicated = measure(&lab, app, cfg.connections, cfg.load)?;
            report.overhead.push(Overhead {
                app,
                plain,
                replicated,
            });
        }
        let mut trials: Vec<(Pages, Trial)> = Vec::new();
        for i in 0..cfg.kills {
            let pages = cfg.pages[i % cfg.pages.len()];
            pair.set_pages(pages);
            // In checkpoint mode the pair is up already for the first kill
            // (with the first of `pages`).
            if i > 0 || cfg.pair.mode == Mode::Responsive {
                pair.start_backup()?;
                pair.start_primary()?;
            }
            if cfg.fill_mib > 0 {
                progress(&format!(
                    "{} kill {}: filling it with {} MiB",
                    app.name(),
                    i + 1,
                    cfg.fill_mib
                ));
            }
            fill(&lab, app, cfg.fill_mib)?;
            let at = moments.between(Duration::from_millis(200), Duration::from_millis(2000));
            let t = trial(&mut pair, cfg.connections, at, Duration::from_millis(1500))
                .with_context(|| format!("{} kill {}", app.name(), i + 1))?;
            if cfg.pair.mode == Mode::Responsive && t.ok() {
                let c = pair
                    .replay_check(&t)
                    .with_context(|| format!("{} kill {}: replaying the log", app.name(), i + 1))?;
                progress(&format!(
                    "{} kill {}: the backup's log replayed: {} events, {} divergences, {} connection(s) as the clients saw them{}",
                    app.name(),
                    i + 1,
                    c.events,
                    c.divergences,
                    c.matched,
                    mismatch(&c)
                ));
                report.replays.push(c);
            }
            progress(&format!(
                "{} kill {}/{} ({} pages): {} after {:.0} ms of load; first answer {}, all connections {}{}",
                app.name(),
                i + 1,
                cfg.kills,
                pages.name(),
                if t.ok() { "recovered" } else { "FAILED" },
                t.kill_after_ms,
                ms_or_none(t.first_answer_ms),
                ms_or_none(t.all_answered_ms),
                t.errors
                    .first()
                    .map(|e| format!("; {e}"))
                    .unwrap_or_default()
            ));
            trials.push((pages, t));
            pair.reset()?;
        }
        for &pages in &cfg.pages {
            let these: Vec<Trial> = trials
                .iter()
                .filter(|(p, _)| *p == pages)
                .map(|(_, t)| t.clone())
                .collect();
            report.recovery.push(summarize(app, pages, &these));
        }
        report.trials.extend(trials.into_iter().map(|(_, t)| t));
    }
    Ok(report)
}

/// Fills Redis with `mib` of data (nothing for 0), then leaves the pair
/// time to commit a checkpoint that holds it: a takeover then restores
/// that much memory rather than replaying its writes.
fn fill(lab: &LabSession, app: App, mib: u64) -> Result<()> {
    if mib == 0 {
        return Ok(());
    }
    anyhow::ensure!(app == App::Redis, "only Redis is filled before a kill");
    let target = app.target(lab);
    lab.in_host(Host::Client, || crate::stalls::fill(target, mib))??;
    std::thread::sleep(Duration::from_secs(2));
    Ok(())
}

/// The load on `app` as a plain container (`rrc run`).
fn measure_plain(
    lab: &LabSession,
    app: App,
    cfg: &FailoverConfig,
    progress: &dyn Fn(&str),
) -> Result<Load> {
    progress(&format!("{}: plain container", app.name()));
    app.start(lab, &[])?;
    let plain = measure(lab, app, cfg.connections, cfg.load)?;
    lab.run_on(Host::Primary, &[&lab.rrc_path(), "stop", app.name()])?;
    Ok(plain)
}

/// Plain, recorded, checkpoint-only and responsive: the same load on
/// each, one after the other.
fn responsive_costs(
    lab: &LabSession,
    app: App,
    cfg: &FailoverConfig,
    progress: &dyn Fn(&str),
) -> Result<Responsive> {
    let rrc = lab.rrc_path();
    let plain = measure_plain(lab, app, cfg, progress)?;

    progress(&format!("{}: recorded container", app.name()));
    let log = std::env::temp_dir().join(format!("rrc-bench-record-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&log);
    let log_s = log.display().to_string();
    app.start(lab, &["--record", &log_s])?;
    let recorded = measure(lab, app, cfg.connections, cfg.load);
    let _ = lab.run_on(Host::Primary, &[&rrc, "stop", app.name()]);
    let _ = std::fs::remove_dir_all(&log);
    let recorded = recorded?;

    let replicated = |mode: Mode| -> Result<(Load, PrimaryStats, PrimaryStats)> {
        progress(&format!("{}: {} primary", app.name(), mode.name()));
        let opts = PairOptions {
            mode,
            ..cfg.pair.clone()
        };
        let mut pair = Pair::new(lab, app, opts)?;
        pair.start_backup()?;
        pair.start_primary()?;
        let before = pair.primary_status()?;
        let load = measure(lab, app, cfg.connections, cfg.load)?;
        let after = pair.primary_status()?;
        pair.stop_primary()?;
        pair.reset()?;
        Ok((load, before, after))
    };
    let (checkpoint, _, _) = replicated(Mode::Checkpoint)?;
    let (responsive, before, after) = replicated(Mode::Responsive)?;
    // What went through during the load, in bytes.
    let during = |f: &dyn Fn(&PrimaryStats) -> u64| f(&after).saturating_sub(f(&before)) as f64;
    let requests = responsive.requests.max(1) as f64;
    let secs = (cfg.load + Duration::from_millis(500)).as_secs_f64();
    let record_bytes = during(&|s| s.log.map_or(0, |l| l.record_bytes));
    let frame_bytes = during(&|s| s.log.map_or(0, |l| l.frame_bytes));
    Ok(Responsive {
        app,
        plain,
        recorded,
        checkpoint,
        responsive,
        held: after.would_be_data,
        record_bytes_per_request: record_bytes / requests,
        net_bytes_per_request: frame_bytes / requests,
        log_mb_per_s: (record_bytes + frame_bytes) / secs / 1e6,
        checkpoint_mb_per_s: during(&|s| s.bytes_sent) / secs / 1e6,
    })
}

fn ms_or_none(v: Option<f64>) -> String {
    v.map(|v| format!("{v:.0} ms"))
        .unwrap_or_else(|| "never".into())
}

pub fn render(r: &FailoverReport) -> String {
    let mut s = String::new();
    if !r.responsive.is_empty() {
        render_responsive(&mut s, r);
    }
    if !r.overhead.is_empty() {
        let _ = writeln!(
            s,
            "Replication overhead (epoch {:.0} ms; closed-loop verifying clients, same load, one run)",
            r.epoch_ms
        );
        let rows = r.overhead.iter().flat_map(|o| {
            [("plain", &o.plain), ("replicated", &o.replicated)].map(|(w, l)| (o.app, w, l))
        });
        render_loads(&mut s, 11, 2, rows);
    }
    let _ = writeln!(
        s,
        "\nRecovery from a primary host kill (backup timeout {:.0} ms; ms, averages over successful recoveries; seed {})",
        r.timeout_ms, r.seed
    );
    let _ = writeln!(
        s,
        "{:<10} {:<6} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>9}",
        "app",
        "pages",
        "recovered",
        "first avg",
        "first max",
        "all avg",
        "all p99",
        "all max",
        "detect",
        "takeover",
        "restore",
        "replay",
        "conns",
        "resume",
        "fallbacks"
    );
    for v in &r.recovery {
        let _ = writeln!(
            s,
            "{:<10} {:<6} {:>5}/{:<3} {:>9.0} {:>9.0} {:>9.0} {:>9.0} {:>9.0} {:>8.0} {:>8.0} {:>8.0} {:>8.0} {:>8.1} {:>8.0} {:>9}",
            v.app.map(App::name).unwrap_or("-"),
            v.pages.map(Pages::name).unwrap_or("-"),
            v.succeeded,
            v.kills,
            v.first_answer_avg,
            v.first_answer_max,
            v.all_answered_avg,
            v.all_answered_p99,
            v.all_answered_max,
            v.detection_avg,
            v.restore_avg,
            v.replay_restore_avg,
            v.replay_avg,
            v.connections_avg,
            v.resume_avg,
            v.fallbacks
        );
    }
    let _ = writeln!(
        s,
        "(first: kill to the first reply from the new primary on any connection; all: until every connection was answered again;\n detect: the primary's silence until the backup decided; takeover: from the decision to the service running, of which, by replay:\n restore, replay of the log and the connections' rebuilding; pages: lazy, the program ran before its memory was in; resume: announcement, forwarding and client retransmission;\n the arbiter's claim averaged {:.1} ms, fencing {:.0} ms)",
        r.recovery.iter().map(|v| v.arbiter_avg).sum::<f64>() / r.recovery.len().max(1) as f64,
        r.recovery.iter().map(|v| v.fence_avg).sum::<f64>() / r.recovery.len().max(1) as f64
    );
    if !r.replays.is_empty() {
        let ok = r.replays.iter().filter(|c| c.ok()).count();
        let _ = writeln!(
            s,
            "\nThe backup's log after each takeover, replayed offline: {ok}/{} reached the end of the log with no divergence and wrote what the clients received; {} events replayed in all, {} connections compared",
            r.replays.len(),
            r.replays.iter().map(|c| c.events).sum::<u64>(),
            r.replays.iter().map(|c| c.matched).sum::<usize>()
        );
    }
    s
}

/// What went wrong in an offline replay, for its progress line (nothing
/// when it checked out).
fn mismatch(c: &crate::failover::ReplayCheck) -> String {
    if c.ok() {
        return String::new();
    }
    let why = c
        .said
        .lines()
        .find(|l| l.contains("DIVERGENCE"))
        .or(c.unmatched.first().map(String::as_str))
        .unwrap_or("the replay did not reach the end of the log");
    let why: String = why.chars().take(300).collect();
    format!("; MISMATCH: {why}")
}

/// A table of loads, one row per app and container: `width` is the
/// container column's, `digits` the decimals of the milliseconds.
fn render_loads<'a>(
    s: &mut String,
    width: usize,
    digits: usize,
    rows: impl Iterator<Item = (App, &'a str, &'a Load)>,
) {
    let _ = writeln!(
        s,
        "{:<10} {:<width$} {:>10} {:>9} {:>9} {:>9} {:>7}",
        "app", "container", "req/s", "avg ms", "p50 ms", "p99 ms", "errors"
    );
    for (app, what, l) in rows {
        let _ = writeln!(
            s,
            "{:<10} {:<width$} {:>10.0} {:>9.digits$} {:>9.digits$} {:>9.digits$} {:>7}",
            app.name(),
            what,
            l.per_sec,
            l.latency.mean_us / 1e3,
            l.latency.p50_us / 1e3,
            l.latency.p99_us / 1e3,
            l.errors
        );
    }
}

fn render_responsive(s: &mut String, r: &FailoverReport) {
    let _ = writeln!(
        s,
        "Responsive mode (epoch {:.0} ms; closed-loop verifying clients, same load on each, one run)",
        r.epoch_ms
    );
    let rows = r.responsive.iter().flat_map(|o| {
        [
            ("plain", &o.plain),
            ("recorded", &o.recorded),
            ("checkpoint", &o.checkpoint),
            ("responsive", &o.responsive),
        ]
        .map(|(w, l)| (o.app, w, l))
    });
    render_loads(s, 11, 3, rows);
    let _ = writeln!(
        s,
        "\nResponsive against plain: added latency (µs) and throughput"
    );
    let _ = writeln!(
        s,
        "{:<10} {:>10} {:>10} {:>10} {:>12}",
        "app", "avg", "p50", "p99", "throughput"
    );
    for o in &r.responsive {
        let (p, x) = (&o.plain.latency, &o.responsive.latency);
        let _ = writeln!(
            s,
            "{:<10} {:>10.0} {:>10.0} {:>10.0} {:>11.0}%",
            o.app.name(),
            x.mean_us - p.mean_us,
            x.p50_us - p.p50_us,
            x.p99_us - p.p99_us,
            100.0 * o.responsive.per_sec / o.plain.per_sec.max(1e-9)
        );
    }
    let _ = writeln!(
        s,
        "\nWhat the log rule adds to a reply (its frame, from leaving the program to the backup's acknowledgement of its log; µs)"
    );
    let _ = writeln!(
        s,
        "{:<10} {:<34} {:>8} {:>8} {:>8} {:>9}",
        "app", "measured", "avg", "p50", "p99", "frames"
    );
    for o in &r.responsive {
        let d = &o.held;
        let _ = writeln!(
            s,
            "{:<10} {:<34} {:>8.0} {:>8.0} {:>8.0} {:>9}",
            o.app.name(),
            "held, responsive",
            d.avg_us,
            d.p50_us,
            d.p99_us,
            d.count
        );
    }
    let _ = writeln!(s, "\nThe log (responsive)");
    let _ = writeln!(
        s,
        "{:<10} {:>14} {:>14} {:>12} {:>16} {:>16}",
        "app", "records B/req", "frames B/req", "log MB/s", "checkpoint MB/s", "throughput cost"
    );
    for o in &r.responsive {
        let cost = 1.0 - o.responsive.per_sec / o.plain.per_sec.max(1e-9);
        let _ = writeln!(
            s,
            "{:<10} {:>14.0} {:>14.0} {:>12.2} {:>16.2} {:>15.0}%",
            o.app.name(),
            o.record_bytes_per_request,
            o.net_bytes_per_request,
            o.log_mb_per_s,
            o.checkpoint_mb_per_s,
            cost * 100.0
        );
    }
    let _ = writeln!(s);
}
