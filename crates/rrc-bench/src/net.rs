//! `rrc bench net`: what the TAP forwarding path costs. Redis in an rrc
//! container (client -> bridge -> veth -> rrc -> TAP -> container) against
//! the same Redis on the host's plain veth (client -> bridge -> veth), in
//! one lab, measured in alternating rounds so both see the same noise.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use ipnet::Ipv4Net;
use rrc_lab::Host;
use serde::Serialize;

use crate::redis_benchmark;
use crate::resp::RespConn;
use crate::session::LabSession;
use crate::stats::{Latencies, Summary};

#[derive(Debug, Clone)]
pub struct NetBenchConfig {
    pub lab: String,
    /// Latency samples per path (each a SET or a GET).
    pub requests: u64,
    /// Rounds the samples are split into, alternating paths.
    pub rounds: u32,
    /// Requests per redis-benchmark run (throughput).
    pub throughput_requests: u64,
    pub clients: u32,
    pub value_size: usize,
    /// Forwarder spin of the second rrc container (the first spins not).
    pub spin: Duration,
}

impl Default for NetBenchConfig {
    fn default() -> Self {
        NetBenchConfig {
            lab: format!("bench{}", std::process::id() % 100_000),
            requests: 40_000,
            rounds: 10,
            throughput_requests: 100_000,
            clients: 50,
            value_size: 100,
            spin: rrc_net::forward::DEFAULT_SPIN,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct PathResult {
    pub path: String,
    pub latency: Summary,
    pub set_rps: f64,
    pub get_rps: f64,
    /// CPU time of the rrc process per latency request (rrc paths only).
    pub forwarder_cpu_us_per_request: Option<f64>,
    /// CPU the rrc process takes while no request comes, in percent of one
    /// CPU (rrc paths only).
    pub idle_cpu_percent: Option<f64>,
}

/// The plain veth first, then the rrc paths.
#[derive(Debug, Clone, Serialize)]
pub struct NetBenchReport {
    pub paths: Vec<PathResult>,
}

const PORT: u16 = 6379;
/// How long the idle CPU is measured.
const IDLE: Duration = Duration::from_secs(10);

fn redis_args(bind: &str) -> Vec<String> {
    [
        "redis-server",
        "--port",
        "6379",
        "--bind",
        bind,
        "--protected-mode",
        "no",
        "--save",
        "",
        "--appendonly",
        "no",
        "--daemonize",
        "no",
        "--loglevel",
        "warning",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// One way of reaching Redis from the client.
struct Target {
    name: String,
    addr: SocketAddr,
    /// The rrc container serving it, if any (for CPU accounting).
    container: Option<String>,
}

/// CPU time (user + system) of the rrc process supervising `container` on
/// primary, in milliseconds.
fn supervisor_cpu_ms(plan: &rrc_lab::LabPlan, container: &str) -> Option<f64> {
    let host = rrc_container::HostState::for_host(&plan.netns(Host::Primary));
    let (rec, _) = host.load(&container.parse().ok()?).ok()??;
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", rec.supervisor.pid)).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    // Fields 14 and 15 (utime, stime) are at 11 and 12 counting from field 3.
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok()??;
    Some(ticks as f64 * 1000.0 / hz as f64)
}

pub fn run(rrc: &Path, cfg: &NetBenchConfig, progress: &dyn Fn(&str)) -> Result<NetBenchReport> {
    progress(&format!("bringing up lab {}", cfg.lab));
    let mut lab = LabSession::start(rrc, &cfg.lab, None)?;
    let plan = lab.plan().clone();
    let veth_ip = plan.lan_addr(Host::Primary).addr();
    let vip = plan.vip();
    let vip_nospin = Ipv4Net::new(Ipv4Addr::from(u32::from(vip.addr()) + 1), vip.prefix_len())?;

    progress(
        "starting Redis on primary's veth and in two rrc containers (forwarder spinning and not)",
    );
    let bind = veth_ip.to_string();
    let args = redis_args(&bind);
    lab.spawn_on(
        Host::Primary,
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    )?;
    let args = redis_args("0.0.0.0");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let spin = format!("{}us", cfg.spin.as_micros());
    lab.run_container_with(Host::Primary, "bench-spin", vip, &["--spin", &spin], &args)?;
    lab.run_container_with(
        Host::Primary,
        "bench-nospin",
        vip_nospin,
        &["--spin", "0"],
        &args,
    )?;
    let targets = [
        Target {
            name: "plain veth".into(),
            addr: SocketAddr::new(IpAddr::V4(veth_ip), PORT),
            container: None,
        },
        Target {
            name: "rrc, no spin".into(),
            addr: SocketAddr::new(IpAddr::V4(vip_nospin.addr()), PORT),
            container: Some("bench-nospin".into()),
        },
        Target {
            name: format!("rrc, spin {}µs", cfg.spin.as_micros()),
            addr: SocketAddr::new(IpAddr::V4(vip.addr()), PORT),
            container: Some("bench-spin".into()),
        },
    ];
    for t in &targets {
        lab.wait_tcp(Host::Client, t.addr, Duration::from_secs(10))?;
    }

    progress(&format!(
        "latency: {} requests per path in {} alternating rounds",
        cfg.requests, cfg.rounds
    ));
    let value = vec![b'x'; cfg.value_size];
    let per_round = (cfg.requests / u64::from(cfg.rounds) / 2).max(1);
    let rounds = cfg.rounds;
    let n = targets.len();
    let mut cpu = vec![0.0f64; n];
    let addrs: Vec<SocketAddr> = targets.iter().map(|t| t.addr).collect();
    let cpu_of = |i: usize| {
        targets[i]
            .container
            .as_deref()
            .and_then(|c| supervisor_cpu_ms(&plan, c))
            .unwrap_or(0.0)
    };
    let lats = lab.in_host(Host::Client, || -> Result<Vec<Latencies>> {
        let mut conns = addrs
            .iter()
            .map(|a| RespConn::connect(*a, Duration::from_secs(5)))
            .collect::<std::io::Result<Vec<_>>>()?;
        let mut lats: Vec<Latencies> = (0..n).map(|_| Latencies::default()).collect();
        for c in conns.iter_mut() {
            for i in 0..500u32 {
                c.set(format!("warm{i}").as_bytes(), &value)?;
            }
        }
        for round in 0..rounds {
            // Rotate which path goes first, so none always follows
            // another's cache effects.
            for j in 0..n {
                let i = (j + round as usize) % n;
                let c = &mut conns[i];
                let before = cpu_of(i);
                for k in 0..per_round {
                    let key = format!("key:{}", k % 1000);
                    let t = Instant::now();
                    c.set(key.as_bytes(), &value)?;
                    lats[i].record(t.elapsed());
                    let t = Instant::now();
                    let got = c.get(key.as_bytes())?;
                    lats[i].record(t.elapsed());
                    anyhow::ensure!(
                        got.as_deref() == Some(&value[..]),
                        "GET returned wrong data"
                    );
                }
                cpu[i] += cpu_of(i) - before;
            }
        }
        Ok(lats)
    })??;

    progress(&format!(
        "throughput: redis-benchmark, {} requests, {} clients, every path twice",
        cfg.throughput_requests, cfg.clients
    ));
    let launcher = lab.launcher(Host::Client);
    let mut rps = vec![(0.0f64, 0.0f64); n];
    const TP_ROUNDS: usize = 2;
    for round in 0..TP_ROUNDS {
        for j in 0..n {
            let i = (j + round) % n;
            let addr = targets[i].addr;
            let r = redis_benchmark::run(
                &launcher,
                &addr.ip().to_string(),
                PORT,
                cfg.throughput_requests,
                cfg.clients,
                "set,get",
            )
            .with_context(|| format!("redis-benchmark against {addr}"))?;
            rps[i].0 += r.get("SET").copied().unwrap_or(0.0) / TP_ROUNDS as f64;
            rps[i].1 += r.get("GET").copied().unwrap_or(0.0) / TP_ROUNDS as f64;
        }
    }
    // A quiet container's forwarder should sleep: its CPU over a while
    // with no traffic at all.
    progress(&format!("idle: {IDLE:?} without traffic"));
    let before: Vec<f64> = (0..n).map(cpu_of).collect();
    std::thread::sleep(IDLE);
    let idle: Vec<f64> = (0..n)
        .map(|i| (cpu_of(i) - before[i]) * 100.0 / IDLE.as_millis() as f64)
        .collect();
    drop(lab);

    let paths: Vec<PathResult> = (0..n)
        .map(|i| PathResult {
            path: targets[i].name.clone(),
            latency: lats[i].summary(),
            set_rps: rps[i].0,
            get_rps: rps[i].1,
            forwarder_cpu_us_per_request: targets[i]
                .container
                .as_ref()
                .map(|_| cpu[i] * 1000.0 / cfg.requests as f64),
            idle_cpu_percent: targets[i].container.as_ref().map(|_| idle[i]),
        })
        .collect();
    Ok(NetBenchReport { paths })
}

pub fn render(r: &NetBenchReport) -> String {
    let mut s = String::new();
    s.push_str(&format!(
        "{:<18} {:>8} {:>8} {:>8} {:>9} {:>8} {:>10} {:>10} {:>11} {:>9}\n",
        "path",
        "p50 µs",
        "p90 µs",
        "p99 µs",
        "p99.9 µs",
        "mean µs",
        "SET req/s",
        "GET req/s",
        "rrc CPU/req",
        "idle CPU"
    ));
    for p in &r.paths {
        let l = &p.latency;
        s.push_str(&format!(
            "{:<18} {:>8.1} {:>8.1} {:>8.1} {:>9.1} {:>8.1} {:>10.0} {:>10.0} {:>11} {:>9}\n",
            p.path,
            l.p50_us,
            l.p90_us,
            l.p99_us,
            l.p999_us,
            l.mean_us,
            p.set_rps,
            p.get_rps,
            p.forwarder_cpu_us_per_request
                .map(|c| format!("{c:.1} µs"))
                .unwrap_or("-".into()),
            p.idle_cpu_percent
                .map(|c| format!("{c:.2}%"))
                .unwrap_or("-".into())
        ));
    }
    let base = &r.paths[0].latency;
    for p in &r.paths[1..] {
        s.push_str(&format!(
            "added by {}: p50 {:+.1} µs, p99 {:+.1} µs, mean {:+.1} µs\n",
            p.path,
            p.latency.p50_us - base.p50_us,
            p.latency.p99_us - base.p99_us,
            p.latency.mean_us - base.mean_us
        ));
    }
    s
}
