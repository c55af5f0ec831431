//! `rrc bench ckpt`: the cost of a checkpoint and a restore.
//!
//! For a process with 10 MB, 100 MB and 1 GB of touched memory (and a
//! Redis holding about 114 MB): how long the checkpoint takes, how long the
//! process is stopped (seen from inside it, by a thread that watches the
//! clock), how big the image is, and how long the restore takes; the
//! restored process then checks its whole memory.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use nix::sys::signal::{Signal, kill};
use nix::sys::wait::waitpid;
use nix::unistd::Pid;
use serde::Serialize;

use crate::criu::Criu;
use crate::resp::RespConn;

#[derive(Debug, Clone, Serialize)]
pub struct CkptResult {
    pub workload: String,
    pub memory_mib: f64,
    pub image_mib: f64,
    pub checkpoint_ms: f64,
    /// How long the engine kept the tree stopped.
    pub stopped_ms: f64,
    /// Of that, syncing the image to disk before the tree is killed (a
    /// checkpoint that leaves the tree running has none).
    #[serde(default)]
    pub sync_ms: f64,
    /// The longest stall a thread of the process saw (0 when not measured).
    pub app_pause_ms: f64,
    pub restore_ms: f64,
    /// Restored again with lazy pages: until the program runs, and until
    /// every page is in (it was checked meanwhile).
    #[serde(default)]
    pub lazy_running_ms: f64,
    #[serde(default)]
    pub lazy_all_in_ms: f64,
    pub verified: bool,
    /// The same workload dumped and restored by CRIU in the same round,
    /// where a working one is installed (the Redis only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub criu: Option<crate::criu::CriuRound>,
}

/// The hidden workload: touches `mb` MiB with a pattern, watches its clock
/// from a spinning thread, writes `dirty_per_sec` random pages a second
/// (the pattern again: the pages count as written, the contents stay
/// checkable), and answers signals (USR1: report the longest stall seen and
/// reset it; USR2: check every byte). Reports go to stdout, a file that
/// survives checkpoint and restore.
pub fn target(mb: usize, dirty_per_sec: u64) -> Result<()> {
    // Blocked before any thread starts, so every thread inherits the mask
    // and the signals reach only the waiting main thread.
    let mut set = nix::sys::signal::SigSet::empty();
    set.add(Signal::SIGUSR1);
    set.add(Signal::SIGUSR2);
    set.thread_block()?;
    const WORDS_PER_PAGE: usize = 4096 / 8;
    let pages = (mb << 20) / 4096;
    let pattern = |page: usize| u64::from_ne_bytes([(page % 251) as u8; 8]);
    let mem: Arc<Vec<AtomicU64>> = Arc::new(
        (0..pages * WORDS_PER_PAGE)
            .map(|w| AtomicU64::new(pattern(w / WORDS_PER_PAGE)))
            .collect(),
    );
    let max_gap = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    {
        let (max_gap, stop) = (max_gap.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut last = Instant::now();
            while !stop.load(Ordering::Relaxed) {
                let now = Instant::now();
                let gap = now.duration_since(last).as_nanos() as u64;
                max_gap.fetch_max(gap, Ordering::Relaxed);
                last = now;
            }
        });
    }
    if dirty_per_sec > 0 && pages > 0 {
        let mem = mem.clone();
        std::thread::spawn(move || {
            // A page every 1/rate s, in bursts every millisecond.
            let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
            let started = Instant::now();
            let mut done: u64 = 0;
            loop {
                let due = (started.elapsed().as_secs_f64() * dirty_per_sec as f64) as u64;
                while done < due {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let page = (x % pages as u64) as usize;
                    let word = page * WORDS_PER_PAGE + ((x >> 32) as usize % WORDS_PER_PAGE);
                    mem[word].store(pattern(page), Ordering::Relaxed);
                    done += 1;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        });
    }
    let mut out = std::io::stdout();
    writeln!(out, "ready")?;
    out.flush()?;
    loop {
        match set.wait()? {
            Signal::SIGUSR1 => {
                let g = max_gap.swap(0, Ordering::Relaxed);
                writeln!(out, "gap {g}")?;
            }
            _ => {
                let ok = mem
                    .iter()
                    .enumerate()
                    .all(|(w, v)| v.load(Ordering::Relaxed) == pattern(w / WORDS_PER_PAGE));
                writeln!(out, "verified {ok}")?;
            }
        }
        out.flush()?;
    }
}

pub(crate) fn wait_line(
    path: &Path,
    prefix: &str,
    after: usize,
    timeout: Duration,
) -> Result<String> {
    let deadline = Instant::now() + timeout;
    loop {
        let text = fs::read_to_string(path).unwrap_or_default();
        if let Some(l) = text.lines().skip(after).find(|l| l.starts_with(prefix)) {
            return Ok(l.to_string());
        }
        if Instant::now() > deadline {
            bail!("no `{prefix}` from the workload: {text:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

pub(crate) fn lines(path: &Path) -> usize {
    fs::read_to_string(path)
        .map(|t| t.lines().count())
        .unwrap_or(0)
}

fn dir_mib(dir: &Path) -> f64 {
    fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum::<u64>()
        })
        .unwrap_or(0) as f64
        / (1 << 20) as f64
}

/// One round on the synthetic workload of `mb` MiB.
fn memory_round(rrc: &Path, mb: usize, work: &Path) -> Result<CkptResult> {
    let log = work.join(format!("target-{mb}.log"));
    let images = work.join(format!("img-{mb}"));
    let _ = fs::remove_dir_all(&images);
    // Appending: the restored process writes after what the original
    // wrote since the checkpoint, not over it at its old offset.
    let _ = fs::remove_file(&log);
    let out = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)?;
    let child = Command::new(rrc)
        .args(["bench", "target", "--mb", &mb.to_string()])
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(Stdio::null())
        .spawn()?;
    let pid = Pid::from_raw(child.id() as i32);
    wait_line(&log, "ready", 0, Duration::from_secs(60))?;
    // The watcher's longest gap so far is startup noise: reset it.
    let n = lines(&log);
    kill(pid, Signal::SIGUSR1)?;
    wait_line(&log, "gap", n, Duration::from_secs(5))?;
    std::thread::sleep(Duration::from_millis(100));

    let report = rrc_ckpt::dump::checkpoint(&rrc_ckpt::dump::CheckpointOptions {
        container: false,
        root: pid,
        aio_idle: false,
        images: &images,
        leave_running: true,
        annotations: Default::default(),
    })?;
    // Give the watcher thread a moment to run again and see its stall.
    std::thread::sleep(Duration::from_millis(50));
    let n = lines(&log);
    kill(pid, Signal::SIGUSR1)?;
    let gap: f64 = wait_line(&log, "gap", n, Duration::from_secs(5))?[4..].parse::<f64>()? / 1e6;
    kill(pid, Signal::SIGKILL)?;
    let mut child = child;
    child.wait()?;

    // The restored process checks every byte.
    let check = |root: Pid| -> Result<bool> {
        let n = lines(&log);
        kill(root, Signal::SIGUSR2)?;
        Ok(wait_line(&log, "verified", n, Duration::from_secs(60))? == "verified true")
    };
    let (restored, _, verified) = restore_and_check(&images, false, check)?;
    let (lazy, lazy_all_in_ms, lazy_verified) = restore_and_check(&images, true, check)?;
    let r = CkptResult {
        workload: format!("{mb} MiB touched"),
        memory_mib: report.memory_bytes as f64 / (1 << 20) as f64,
        image_mib: dir_mib(&images),
        checkpoint_ms: report.total.as_secs_f64() * 1e3,
        stopped_ms: report.frozen.as_secs_f64() * 1e3,
        sync_ms: report.sync.as_secs_f64() * 1e3,
        app_pause_ms: gap,
        restore_ms: restored.took.as_secs_f64() * 1e3,
        lazy_running_ms: lazy.took.as_secs_f64() * 1e3,
        lazy_all_in_ms,
        verified: verified && lazy_verified,
        criu: None,
    };
    fs::remove_dir_all(&images)?;
    Ok(r)
}

/// Redis with about 114 MB of data, checkpointed and restored on the host;
/// then, with `criu`, a second such Redis dumped and restored by CRIU.
fn redis_round(work: &Path, criu: Option<&Criu>) -> Result<CkptResult> {
    let port = 16379u16;
    let images = work.join("img-redis");
    let _ = fs::remove_dir_all(&images);
    let mut child = populated_redis(work, port, false)?;
    let pid = Pid::from_raw(child.id() as i32);
    let result = redis_measure(pid, port, &images, &mut child);
    // Whatever happened, no Redis is left behind.
    let _ = child.kill();
    let _ = child.wait();
    let mut result = result?;
    if let Some(criu) = criu {
        result.criu = Some(criu_redis_round(work, port, criu)?);
    }
    Ok(result)
}

/// A Redis on `port` holding 1M keys (about 114 MB), no client left
/// connected; started in a session of its own for CRIU (`own_session`).
fn populated_redis(work: &Path, port: u16, own_session: bool) -> Result<std::process::Child> {
    let mut cmd = crate::resp::local_redis(port, work)?;
    if own_session {
        Criu::own_session(&mut cmd);
    }
    let mut child = cmd
        .spawn()
        .context("cannot start redis-server (run scripts/setup)")?;
    let filled = (|| -> Result<()> {
        let addr = format!("127.0.0.1:{port}").parse()?;
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut c = loop {
            // Filling Redis takes seconds on a busy machine: a reply may be
            // long in coming.
            match RespConn::connect(addr, Duration::from_secs(60)) {
                Ok(c) => break c,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Err(e) => return Err(e.into()),
            }
        };
        let r = c.command(&[b"DEBUG", b"POPULATE", b"1000000", b"key", b"64"])?;
        ensure!(
            r == crate::resp::Reply::Status("OK".into()),
            "DEBUG POPULATE answered {r:?}"
        );
        // Client connections are live TCP state neither engine is asked
        // to take here: leave, and give Redis a moment to close its end.
        let _ = c.command(&[b"QUIT"]);
        drop(c);
        std::thread::sleep(Duration::from_millis(200));
        Ok(())
    })();
    if let Err(e) = filled {
        let _ = child.kill();
        let _ = child.wait();
        return Err(e);
    }
    Ok(child)
}

/// Whether the Redis on `addr` holds what [`populated_redis`] put in.
fn redis_whole(addr: std::net::SocketAddr) -> Result<bool> {
    let mut c = RespConn::connect(addr, Duration::from_secs(5))?;
    Ok(matches!(
        c.command(&[b"DBSIZE"])?,
        crate::resp::Reply::Integer(1_000_000)
    ) && c.get(b"key:999999")?.is_some())
}

fn redis_measure(
    pid: Pid,
    port: u16,
    images: &Path,
    child: &mut std::process::Child,
) -> Result<CkptResult> {
    let addr = format!("127.0.0.1:{port}").parse()?;
    let report = rrc_ckpt::dump::checkpoint(&rrc_ckpt::dump::CheckpointOptions {
        container: false,
        root: pid,
        aio_idle: false,
        images,
        leave_running: false,
        annotations: Default::default(),
    })?;
    // We are Redis's parent and its tracer: the checkpoint already reaped it.
    let _ = child.try_wait();
    let check = |_: Pid| redis_whole(addr);
    let (restored, _, verified) = restore_and_check(images, false, check)?;
    let (lazy, lazy_all_in_ms, lazy_verified) = restore_and_check(images, true, check)?;
    let verified = verified && lazy_verified;
    let r = CkptResult {
        workload: "Redis, 1M keys".into(),
        memory_mib: report.memory_bytes as f64 / (1 << 20) as f64,
        image_mib: dir_mib(images),
        checkpoint_ms: report.total.as_secs_f64() * 1e3,
        stopped_ms: report.frozen.as_secs_f64() * 1e3,
        sync_ms: report.sync.as_secs_f64() * 1e3,
        app_pause_ms: 0.0,
        restore_ms: restored.took.as_secs_f64() * 1e3,
        lazy_running_ms: lazy.took.as_secs_f64() * 1e3,
        lazy_all_in_ms,
        verified,
        criu: None,
    };
    fs::remove_dir_all(images)?;
    ensure!(r.verified, "the restored Redis lost data");
    Ok(r)
}

/// The same Redis dumped and restored by CRIU; the restored one (CRIU
/// restores the same pid, detached: this process, a subreaper, inherits
/// it) is checked, then ended.
fn criu_redis_round(work: &Path, port: u16, criu: &Criu) -> Result<crate::criu::CriuRound> {
    nix::sys::prctl::set_child_subreaper(true)?;
    let images = work.join("criu-redis");
    let _ = fs::remove_dir_all(&images);
    let mut child = populated_redis(work, port, true)?;
    let pid = Pid::from_raw(child.id() as i32);
    let mut round = crate::criu::CriuRound::default();
    let dumped = criu.dump(pid, &images, &mut round);
    if dumped.is_err() {
        let _ = child.kill();
    }
    // Reaped, so that the restore can have its pid again.
    let _ = child.wait();
    let whole = dumped
        .and_then(|()| criu.restore(&images, &mut round))
        .and_then(|()| redis_whole(format!("127.0.0.1:{port}").parse()?));
    // Whatever happened, no restored Redis is left behind.
    if kill(pid, Signal::SIGKILL).is_ok() {
        let _ = waitpid(pid, None);
    }
    let _ = fs::remove_dir_all(&images);
    ensure!(whole?, "the Redis CRIU restored lost data");
    Ok(round)
}

/// Restores `images` on the host (lazily or not), asks `check` at once
/// whether the restored process (its root given) is whole, waits until
/// every page is in and ends it: the restore's report, the milliseconds
/// until every page was in, and what `check` said.
fn restore_and_check(
    images: &Path,
    lazy_pages: bool,
    check: impl FnOnce(Pid) -> Result<bool>,
) -> Result<(rrc_ckpt::restore::Restored, f64, bool)> {
    let started = Instant::now();
    let restored = rrc_ckpt::restore::restore(&rrc_ckpt::restore::RestoreOptions {
        lazy_pages,
        ..rrc_ckpt::restore::RestoreOptions::tree(images)
    })?;
    let checked = check(restored.root);
    let pages = restored.pages.wait().map_err(anyhow::Error::msg);
    let all_in_ms = started.elapsed().as_secs_f64() * 1e3;
    kill(restored.root, Signal::SIGKILL)?;
    let _ = waitpid(restored.root, None);
    pages?;
    Ok((restored, all_in_ms, checked?))
}

/// Runs every workload `rounds` times; returns the median round of each.
pub fn run(
    rrc: &Path,
    sizes: &[usize],
    rounds: usize,
    work: &Path,
    criu: Option<&Criu>,
    progress: &dyn Fn(&str),
) -> Result<Vec<CkptResult>> {
    fs::create_dir_all(work)?;
    let mut out = Vec::new();
    let median = |mut v: Vec<CkptResult>| {
        v.sort_by(|a, b| a.checkpoint_ms.total_cmp(&b.checkpoint_ms));
        v.swap_remove(v.len() / 2)
    };
    for &mb in sizes {
        progress(&format!("{mb} MiB workload, {rounds} round(s)"));
        let v = (0..rounds)
            .map(|_| memory_round(rrc, mb, work))
            .collect::<Result<Vec<_>>>()?;
        out.push(median(v));
    }
    progress(&format!(
        "Redis with 1M keys, {rounds} round(s){}",
        criu.map_or(String::new(), |c| format!(
            ", each also with {}",
            c.version()
        ))
    ));
    let v = (0..rounds)
        .map(|_| redis_round(work, criu))
        .collect::<Result<Vec<_>>>()?;
    out.push(median(v));
    Ok(out)
}

pub fn render(results: &[CkptResult]) -> String {
    let mut s = format!(
        "{:<18} {:>10} {:>10} {:>14} {:>11} {:>8} {:>12} {:>11} {:>17} {:>9}\n",
        "workload",
        "memory MiB",
        "image MiB",
        "checkpoint ms",
        "stopped ms",
        "sync ms",
        "app pause ms",
        "restore ms",
        "lazy: runs / in",
        "verified"
    );
    for r in results {
        s.push_str(&format!(
            "{:<18} {:>10.1} {:>10.1} {:>14.1} {:>11.1} {:>8.1} {:>12} {:>11.1} {:>17} {:>9}\n",
            r.workload,
            r.memory_mib,
            r.image_mib,
            r.checkpoint_ms,
            r.stopped_ms,
            r.sync_ms,
            if r.app_pause_ms > 0.0 {
                format!("{:.1}", r.app_pause_ms)
            } else {
                "-".into()
            },
            r.restore_ms,
            format!("{:.1} / {:.1}", r.lazy_running_ms, r.lazy_all_in_ms),
            r.verified
        ));
    }
    for (r, c) in results
        .iter()
        .filter_map(|r| r.criu.as_ref().map(|c| (r, c)))
    {
        s.push_str(&format!(
            "CRIU, {}: dump {:.1} ms (frozen {:.1}: memory dump {:.1}, memory write {:.1}), \
             restore {:.1} ms (its own figure {:.1}); rrc: stopped {:.1} less sync {:.1} = {:.1}, \
             restore {:.1}\n",
            r.workload,
            c.dump_ms,
            c.frozen_ms,
            c.memdump_ms,
            c.memwrite_ms,
            c.restore_ms,
            c.restore_stat_ms,
            r.stopped_ms,
            r.sync_ms,
            r.stopped_ms - r.sync_ms,
            r.restore_ms
        ));
    }
    s.push_str(
        "sync: the image synced to disk before a killed tree goes (part of the time stopped; \
         CRIU does not sync its images)\n\
         lazy: restored again with lazy pages, until the program runs / until every page is in \
         (checked meanwhile)\n",
    );
    if results.iter().all(|r| r.criu.is_none()) {
        s.push_str(
            "reference (no working CRIU here; --criu PATH to measure one): CRIU 4.2 on this kind \
             of machine dumped a 114 MB Redis in 50-76 ms (stopped throughout) and restored it \
             in 60 ms\n",
        );
    }
    s
}

pub fn default_work_dir() -> PathBuf {
    let base = std::env::temp_dir();
    base.join(format!("rrc-bench-ckpt-{}", std::process::id()))
}
