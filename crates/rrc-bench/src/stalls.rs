//! `rrc bench stalls`: what clients of a container see of its periodic
//! checkpoints. Redis in an rrc container of a lab, filled to a set size and
//! kept writing by `redis-benchmark`, answers a few clients that time each
//! reply, in alternating phases without and with a checkpoint every 100 ms
//! (`rrc checkpoint NAME --every`), so that both see the same noise. A
//! reply waits at least as long as the pause of a checkpoint it meets; the
//! benchmark shows whether it waits longer.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use rrc_container::control::{self, CopyChoice, Request, Response};
use rrc_lab::Host;
use serde::Serialize;

use crate::failover::App;
use crate::resp::{Reply, RespConn};
use crate::session::LabSession;
use crate::stats::{Latencies, Summary};

#[derive(Debug, Clone)]
pub struct StallsConfig {
    pub lab: String,
    /// Memory Redis holds before the measurement, in MiB.
    pub mib: u64,
    /// Connections timing their replies.
    pub clients: usize,
    /// Connections of the background writer (`redis-benchmark`).
    pub writers: u32,
    pub every: Duration,
    /// Length of each phase.
    pub phase: Duration,
    /// Pairs of phases (without, with checkpoints).
    pub rounds: u32,
}

impl Default for StallsConfig {
    fn default() -> Self {
        StallsConfig {
            lab: format!("stall{}", std::process::id() % 100_000),
            mib: 120,
            clients: 4,
            writers: 4,
            every: Duration::from_millis(100),
            phase: Duration::from_secs(8),
            rounds: 2,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct PhaseResult {
    /// "without checkpoints" or "checkpoint every …".
    pub phase: String,
    pub replies: Summary,
    /// Checkpoints taken during the phase (the first of each series full).
    pub checkpoints: u64,
    pub pause_avg_ms: f64,
    pub pause_p99_ms: f64,
    pub pause_max_ms: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct StallsReport {
    pub footprint_mib: f64,
    pub without: PhaseResult,
    pub with: PhaseResult,
}

const CONTAINER: &str = "stalls";
const VALUE: usize = 100;

/// The pauses of one series, from its supervisor's reports.
#[derive(Default)]
struct Pauses {
    us: Vec<u64>,
}

impl Pauses {
    fn quantile(&self, q: f64) -> f64 {
        let mut p = self.us.clone();
        p.sort_unstable();
        p.get(((p.len().max(1) - 1) as f64 * q).round() as usize)
            .map_or(0.0, |&us| us as f64 / 1000.0)
    }

    fn avg(&self) -> f64 {
        self.us.iter().sum::<u64>() as f64 / self.us.len().max(1) as f64 / 1000.0
    }
}

/// Fills Redis with `mib` of 100-byte values through pipelined SETs.
pub(crate) fn fill(addr: SocketAddr, mib: u64) -> Result<u64> {
    let mut c = RespConn::connect(addr, Duration::from_secs(5))?;
    // About 200 bytes of Redis memory per key of this size.
    let keys = mib * (1 << 20) / 200;
    let value = vec![b'v'; VALUE];
    // Replies of a replicated container in checkpoint mode wait for the
    // next commit (about 100 ms): one wait per batch.
    const BATCH: u64 = 10_000;
    let mut k = 0;
    while k < keys {
        let n = BATCH.min(keys - k);
        for i in k..k + n {
            c.send(&[b"SET", format!("fill:{i}").as_bytes(), &value])?;
        }
        for _ in 0..n {
            c.read_reply()?;
        }
        k += n;
    }
    Ok(keys)
}

/// Times every reply of `clients` connections for `phase`, each writing
/// and reading back its own keys (a wrong value is an error). `connected`
/// is called once every connection is made, when the phase starts.
fn time_replies(
    addr: SocketAddr,
    clients: usize,
    phase: Duration,
    connected: impl FnOnce(),
) -> Result<Latencies> {
    let stop = AtomicBool::new(false);
    let conns = (0..clients)
        .map(|_| RespConn::connect(addr, Duration::from_secs(5)))
        .collect::<std::io::Result<Vec<_>>>()?;
    let results: Vec<Result<Latencies>> = std::thread::scope(|s| {
        let handles: Vec<_> = conns
            .into_iter()
            .enumerate()
            .map(|(id, mut c)| {
                let stop = &stop;
                s.spawn(move || -> Result<Latencies> {
                    let mut lat = Latencies::default();
                    let mut n = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        let key = format!("stall:{id}:{}", n % 1000);
                        let value = format!("{n:0>width$}", width = VALUE);
                        let t = Instant::now();
                        c.set(key.as_bytes(), value.as_bytes())?;
                        lat.record(t.elapsed());
                        let t = Instant::now();
                        let got = c.get(key.as_bytes())?;
                        lat.record(t.elapsed());
                        ensure!(
                            got.as_deref() == Some(value.as_bytes()),
                            "GET {key} returned other data than the SET before it"
                        );
                        n += 1;
                    }
                    Ok(lat)
                })
            })
            .collect();
        connected();
        std::thread::sleep(phase);
        stop.store(true, Ordering::Relaxed);
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| bail!("a client thread panicked"))
            })
            .collect()
    });
    let mut all = Latencies::default();
    for r in results {
        all.add(&r?);
    }
    Ok(all)
}

/// Runs a series of checkpoints of the container for `phase`, as `rrc
/// checkpoint NAME --every` asks its supervisor.
fn series(lab: &LabSession, dir: &Path, cfg: &StallsConfig) -> Result<Pauses> {
    let host = rrc_container::HostState::for_host(&lab.plan().netns(Host::Primary));
    let name = CONTAINER.parse()?;
    let mut pauses = Pauses::default();
    let mut failed = None;
    let last = control::request_stream(
        &host,
        &name,
        &Request::Series {
            dir: dir.to_path_buf(),
            every_us: cfg.every.as_micros() as u64,
            count: None,
            for_us: Some(cfg.phase.as_micros() as u64),
            keep_deltas: false,
            copy: CopyChoice::Auto,
        },
        |resp| match resp {
            Response::Epoch(line) => {
                pauses.us.push(line.pause_us);
                true
            }
            Response::EpochFailed(e) => {
                failed = Some(e.clone());
                true
            }
            _ => false,
        },
    )
    .context("checkpoints of the container")?;
    if let Some(e) = failed {
        bail!("a checkpoint failed: {e}");
    }
    match last {
        Some(Response::SeriesDone { error: None, .. }) => Ok(pauses),
        other => bail!("the series did not end well: {other:?}"),
    }
}

fn phase_result(name: String, lat: &Latencies, pauses: &Pauses) -> PhaseResult {
    PhaseResult {
        phase: name,
        replies: lat.summary(),
        checkpoints: pauses.us.len() as u64,
        pause_avg_ms: pauses.avg(),
        pause_p99_ms: pauses.quantile(0.99),
        pause_max_ms: pauses.quantile(1.0),
    }
}

pub fn run(rrc: &Path, cfg: &StallsConfig, progress: &dyn Fn(&str)) -> Result<StallsReport> {
    ensure!(cfg.clients > 0, "at least one timing client is needed");
    ensure!(cfg.rounds > 0, "at least one round is needed");
    rrc_ckpt::incremental::check_supported()?;
    progress(&format!("bringing up lab {}", cfg.lab));
    let mut lab = LabSession::start(rrc, &cfg.lab, None)?;
    let vip = lab.plan().vip();
    let addr = SocketAddr::new(IpAddr::V4(vip.addr()), App::Redis.port());
    let redis = App::Redis.command()?;
    lab.run_container(Host::Primary, CONTAINER, vip, &App::argv(&redis))?;
    lab.wait_tcp(Host::Client, addr, Duration::from_secs(10))?;
    progress(&format!("filling Redis with about {} MiB", cfg.mib));
    let keys = lab.in_host(Host::Client, || fill(addr, cfg.mib))??;
    let footprint_mib = lab.in_host(Host::Client, || -> Result<f64> {
        let mut c = RespConn::connect(addr, Duration::from_secs(5))?;
        let Reply::Bulk(Some(info)) = c.command(&[b"INFO", b"memory"])? else {
            bail!("INFO memory gave no text");
        };
        let bytes = String::from_utf8_lossy(&info)
            .lines()
            .find_map(|l| l.strip_prefix("used_memory:")?.trim().parse::<u64>().ok())
            .context("INFO memory does not say used_memory")?;
        Ok(bytes as f64 / (1 << 20) as f64)
    })??;
    // The background writer rewrites the filled keys at random, so each
    // checkpoint has pages to save.
    let writers = cfg.writers.to_string();
    let range = keys.to_string();
    let target = vip.addr().to_string();
    lab.spawn_on(
        Host::Client,
        &[
            "redis-benchmark",
            "-h",
            &target,
            "-n",
            "1000000000",
            "-r",
            &range,
            "-d",
            "100",
            "-c",
            &writers,
            "-t",
            "set",
            "-q",
        ],
    )?;
    std::thread::sleep(Duration::from_millis(500));

    let work = std::env::temp_dir().join(format!("rrc-bench-stalls-{}", std::process::id()));
    let mut without = Latencies::default();
    let mut with = Latencies::default();
    let mut pauses = Pauses::default();
    let every_ms = cfg.every.as_secs_f64() * 1e3;
    for round in 0..cfg.rounds {
        progress(&format!(
            "round {}/{}: {} clients for {:?} without checkpoints, then with one every {every_ms} ms",
            round + 1,
            cfg.rounds,
            cfg.clients,
            cfg.phase
        ));
        let lat = lab.in_host(Host::Client, || {
            time_replies(addr, cfg.clients, cfg.phase, || {})
        })??;
        without.add(&lat);
        let dir = work.join(format!("series-{round}"));
        let _ = std::fs::remove_dir_all(&dir);
        // The series starts once the clients are connected: a connection
        // not yet accepted makes a checkpoint fail (and be tried again).
        let (go, started) = std::sync::mpsc::channel::<()>();
        let (lat, p) = std::thread::scope(|s| {
            let (lab, dir) = (&lab, &dir);
            let taker = s.spawn(move || {
                started.recv().ok().context("the clients did not connect")?;
                series(lab, dir, cfg)
            });
            let lat = lab.in_host(Host::Client, || {
                time_replies(addr, cfg.clients, cfg.phase, move || {
                    let _ = go.send(());
                })
            });
            let p = taker
                .join()
                .unwrap_or_else(|_| bail!("the checkpoint thread panicked"));
            (lat, p)
        });
        with.add(&lat??);
        pauses.us.extend(p?.us);
        let _ = std::fs::remove_dir_all(&dir);
    }
    let _ = std::fs::remove_dir_all(&work);
    drop(lab);
    Ok(StallsReport {
        footprint_mib,
        without: phase_result("without checkpoints".into(), &without, &Pauses::default()),
        with: phase_result(format!("checkpoint every {every_ms} ms"), &with, &pauses),
    })
}

pub fn render(r: &StallsReport) -> String {
    let mut s = format!(
        "Redis holding {:.0} MiB under redis-benchmark writes; replies timed by the clients\n",
        r.footprint_mib
    );
    s.push_str(&format!(
        "{:<28} {:>8} {:>9} {:>9} {:>10} {:>10} {:>6} {:>22}\n",
        "phase",
        "replies",
        "p50 ms",
        "p99 ms",
        "p99.9 ms",
        "max ms",
        "ckpts",
        "pause avg/p99/max ms"
    ));
    for p in [&r.without, &r.with] {
        let l = &p.replies;
        let pauses = if p.checkpoints > 0 {
            format!(
                "{:.2} / {:.2} / {:.2}",
                p.pause_avg_ms, p.pause_p99_ms, p.pause_max_ms
            )
        } else {
            "-".into()
        };
        s.push_str(&format!(
            "{:<28} {:>8} {:>9.3} {:>9.3} {:>10.3} {:>10.2} {:>6} {:>22}\n",
            p.phase,
            l.count,
            l.p50_us / 1e3,
            l.p99_us / 1e3,
            l.p999_us / 1e3,
            l.max_us / 1e3,
            p.checkpoints,
            pauses
        ));
    }
    s.push_str(&format!(
        "checkpoints added to the clients' p99 {:+.3} ms; their worst reply exceeds the worst pause by {:+.2} ms\n",
        (r.with.replies.p99_us - r.without.replies.p99_us) / 1e3,
        r.with.replies.max_us / 1e3 - r.with.pause_max_ms
    ));
    s
}
