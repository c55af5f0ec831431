//! `rrc bench sockets`: what connections cost a checkpoint and a restore,
//! and what clients see when their server moves.
//!
//! Redis runs as a container on the lab's `primary`; the client host opens
//! N connections through the service address; the container is
//! checkpointed (killed), restored on `backup`, and every connection must
//! still answer. The socket part of both operations comes from the engine's
//! own accounting. Then, with verifying clients busy, the same move is
//! timed from the clients' side: the longest gap between two replies.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use rrc_lab::Host;
use serde::Serialize;

use crate::resp::RespConn;
use crate::session::LabSession;
use crate::verify::{self, Service};

#[derive(Debug, Clone, Serialize)]
pub struct SocketCost {
    pub connections: usize,
    pub checkpoint_ms: f64,
    pub checkpoint_sockets_ms: f64,
    pub restore_ms: f64,
    pub restore_sockets_ms: f64,
    pub image_mib: f64,
    pub connections_alive_after: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct Interruption {
    pub connections: usize,
    pub requests: u64,
    pub errors: usize,
    pub max_gap_ms: f64,
    pub move_ms: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct SocketsReport {
    pub costs: Vec<SocketCost>,
    pub interruptions: Vec<Interruption>,
}

const REDIS: &[&str] = &[
    "redis-server",
    "--protected-mode",
    "no",
    "--save",
    "",
    "--appendonly",
    "no",
    "--maxclients",
    "10000",
];

/// A number in milliseconds that follows `key` in `text` ("sockets 1.2 ms").
fn ms_after(text: &str, key: &str) -> Option<f64> {
    let rest = &text[text.find(key)? + key.len()..];
    rest.split_whitespace()
        .next()?
        .trim_end_matches(',')
        .parse()
        .ok()
}

fn rrc(lab: &LabSession, rrc: &Path, host: Host, args: &[&str]) -> Result<String> {
    let exe = rrc.display().to_string();
    let mut argv = vec![exe.as_str()];
    argv.extend_from_slice(args);
    lab.run_on(host, &argv)
}

/// Moves the container from primary to backup or back; returns the
/// checkpoint's and the restore's output.
fn move_container(
    lab: &LabSession,
    exe: &Path,
    images: &Path,
    from: Host,
    to: Host,
) -> Result<(String, String)> {
    let _ = std::fs::remove_dir_all(images);
    let img = images.display().to_string();
    let c = rrc(lab, exe, from, &["checkpoint", "redis", "--images", &img])?;
    let r = rrc(lab, exe, to, &["restore", "--images", &img])?;
    Ok((c, r))
}

pub fn run(
    exe: &Path,
    counts: &[usize],
    rounds: usize,
    progress: &dyn Fn(&str),
) -> Result<SocketsReport> {
    let name = format!("sock{}", std::process::id() % 100_000);
    progress(&format!("bringing up lab {name}"));
    let lab = LabSession::start(exe, &name, None)?;
    let vip = lab.plan().vip();
    let addr = SocketAddr::new(IpAddr::V4(vip.addr()), 6379);
    let images = std::env::temp_dir().join(format!("rrc-bench-sockets-{}", std::process::id()));
    lab.run_container(Host::Primary, "redis", vip, REDIS)?;
    lab.wait_tcp(Host::Client, addr, Duration::from_secs(10))?;
    let mut at = Host::Primary;
    let mut costs = Vec::new();
    for &n in counts {
        progress(&format!(
            "{n} connection(s): checkpoint on {at}, restore on the other host"
        ));
        // Connections stay open in this thread, inside the client host.
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<()>>();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<usize>();
        let ns = rrc_net::NetNs::named(&lab.plan().netns(Host::Client))?;
        let holder = std::thread::spawn(move || {
            let run = || -> Result<Vec<RespConn>> {
                ns.enter()?;
                let mut conns = Vec::with_capacity(n);
                for i in 0..n {
                    let mut c = RespConn::connect(addr, Duration::from_secs(10))?;
                    c.set(format!("conn:{i}").as_bytes(), format!("{i}").as_bytes())?;
                    conns.push(c);
                }
                Ok(conns)
            };
            let mut conns = match run() {
                Ok(c) => {
                    let _ = ready_tx.send(Ok(()));
                    c
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            let _ = rx.recv();
            let mut alive = 0;
            for (i, c) in conns.iter_mut().enumerate() {
                let want = format!("{i}").into_bytes();
                if c.get(format!("conn:{i}").as_bytes()).ok().flatten() == Some(want) {
                    alive += 1;
                }
            }
            let _ = done_tx.send(alive);
        });
        ready_rx.recv().context("connection holder")??;
        let to = if at == Host::Primary {
            Host::Backup
        } else {
            Host::Primary
        };
        let (c, r) = move_container(&lab, exe, &images, at, to)?;
        at = to;
        lab.wait_tcp(Host::Client, addr, Duration::from_secs(10))?;
        tx.send(()).ok();
        let alive = done_rx
            .recv_timeout(Duration::from_secs(120))
            .context("connections check")?;
        let _ = holder.join();
        let image_mib = std::fs::read_dir(&images)
            .map(|d| {
                d.flatten()
                    .filter_map(|e| e.metadata().ok())
                    .map(|m| m.len())
                    .sum::<u64>()
            })
            .unwrap_or(0) as f64
            / (1 << 20) as f64;
        let parse = |t: &str, k: &str| ms_after(t, k).with_context(|| format!("no `{k}` in {t:?}"));
        costs.push(SocketCost {
            connections: n,
            checkpoint_ms: parse(&c, "total")?,
            checkpoint_sockets_ms: parse(&c, "(sockets")?,
            restore_ms: parse(&r, "restored in")?,
            restore_sockets_ms: parse(&r, "(sockets")?,
            image_mib,
            connections_alive_after: alive,
        });
        ensure!(
            alive == n,
            "{} of {n} connections broke across the move",
            n - alive
        );
    }

    let mut interruptions = Vec::new();
    for round in 0..rounds {
        progress(&format!(
            "verifying clients across a move, round {}/{rounds}",
            round + 1
        ));
        let to = if at == Host::Primary {
            Host::Backup
        } else {
            Host::Primary
        };
        let from = at;
        let mut move_ms = 0.0;
        let mut failed = None;
        let report = lab.in_host(Host::Client, || {
            verify::run(
                Service::Redis,
                addr,
                8,
                || {
                    let t = Instant::now();
                    if let Err(e) = move_container(&lab, exe, &images, from, to) {
                        failed = Some(e);
                    }
                    move_ms = t.elapsed().as_secs_f64() * 1e3;
                },
                Duration::from_secs(2),
            )
        })?;
        if let Some(e) = failed {
            return Err(e);
        }
        at = to;
        if !report.errors.is_empty() {
            bail!("clients saw errors across the move: {:?}", report.errors);
        }
        interruptions.push(Interruption {
            connections: report.connections,
            requests: report.requests,
            errors: report.errors.len(),
            max_gap_ms: report.max_gap_ms,
            move_ms,
        });
    }
    let _ = std::fs::remove_dir_all(&images);
    Ok(SocketsReport {
        costs,
        interruptions,
    })
}

pub fn render(r: &SocketsReport) -> String {
    let mut s = format!(
        "{:>11} {:>14} {:>11} {:>11} {:>11} {:>10} {:>12}\n",
        "connections",
        "checkpoint ms",
        "sockets ms",
        "restore ms",
        "sockets ms",
        "image MiB",
        "alive after"
    );
    for c in &r.costs {
        s.push_str(&format!(
            "{:>11} {:>14.1} {:>11.1} {:>11.1} {:>11.1} {:>10.1} {:>12}\n",
            c.connections,
            c.checkpoint_ms,
            c.checkpoint_sockets_ms,
            c.restore_ms,
            c.restore_sockets_ms,
            c.image_mib,
            c.connections_alive_after
        ));
    }
    s.push_str("\nRedis under load from 8 verifying clients, moved primary <-> backup (checkpoint, kill, restore, attach):\n");
    s.push_str(&format!(
        "{:>6} {:>10} {:>7} {:>22} {:>22}\n",
        "round", "requests", "errors", "longest reply gap ms", "checkpoint+restore ms"
    ));
    for (i, x) in r.interruptions.iter().enumerate() {
        s.push_str(&format!(
            "{:>6} {:>10} {:>7} {:>22.1} {:>22.1}\n",
            i + 1,
            x.requests,
            x.errors,
            x.max_gap_ms,
            x.move_ms
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_figures_from_our_messages() {
        let c = "checkpointed container redis: 1 process(es), 5 thread(s): 2.7 MiB of memory, image 2.8 MiB in /x; stopped for 28.0 ms (sockets 1.5 ms), total 28.4 ms";
        assert_eq!(ms_after(c, "(sockets"), Some(1.5));
        assert_eq!(ms_after(c, "total"), Some(28.4));
        let r = "container redis restored in 20.3 ms (sockets 4.2 ms): pid 7";
        assert_eq!(ms_after(r, "restored in"), Some(20.3));
        assert_eq!(ms_after(r, "(sockets"), Some(4.2));
    }
}
