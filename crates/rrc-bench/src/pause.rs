//! `rrc bench pause`: what a checkpoint every 100 ms costs a running
//! server: the pause per checkpoint (average, p99, max), the memory saved
//! each time, and the CPU the checkpoints take, for full checkpoints and
//! for incremental ones (pages copied while stopped, from a copy-on-write
//! snapshot, or whichever is cheaper), side by side on the same process
//! under the same load.

use std::fs;
use std::io::Write;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde::Serialize;

use rrc_ckpt::incremental::{CopyMode, Incremental, IncrementalOptions};
use rrc_ckpt::store::SeriesDir;

use crate::ckpt::{lines, wait_line};
use crate::resp::RespConn;

#[derive(Debug, Clone)]
pub struct PauseConfig {
    /// Footprints to measure, in MiB.
    pub sizes: Vec<usize>,
    /// Incremental checkpoints per mode (after the first, full one).
    pub epochs: u64,
    /// Full checkpoints per workload (they are slow at 1 GB).
    pub full_epochs: u64,
    pub every: Duration,
    /// Pages a second the synthetic workload writes.
    pub dirty_per_sec: u64,
    pub workloads: Vec<Workload>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Workload {
    /// The synthetic process writing a set number of pages a second.
    Fixture,
    Redis,
    Memcached,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Mode {
    Full,
    Direct,
    Snapshot,
    Auto,
}

#[derive(Debug, Clone, Serialize)]
pub struct PauseRow {
    pub workload: String,
    /// Resident memory of the process when measured.
    pub footprint_mib: f64,
    pub mode: Mode,
    pub checkpoints: u64,
    pub pause_avg_ms: f64,
    pub pause_p99_ms: f64,
    pub pause_max_ms: f64,
    /// Memory saved per checkpoint.
    pub saved_mib_avg: f64,
    pub cpu_ms_avg: f64,
    /// Of the incremental checkpoints, how many copied pages from a
    /// snapshot.
    pub from_snapshot: u64,
    /// The longest stall a thread of the process saw (fixture only).
    pub app_stall_max_ms: Option<f64>,
}

/// A process under test, killed when dropped, with the load on it.
struct Subject {
    pid: Pid,
    child: Child,
    load: Option<Child>,
    log: Option<PathBuf>,
}

impl Drop for Subject {
    fn drop(&mut self) {
        if let Some(l) = &mut self.load {
            let _ = l.kill();
            let _ = l.wait();
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn resident_mib(pid: Pid) -> f64 {
    fs::read_to_string(format!("/proc/{pid}/statm"))
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<f64>().ok())
        .map(|pages| pages * 4096.0 / (1 << 20) as f64)
        .unwrap_or(0.0)
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

fn start_fixture(rrc: &Path, mb: usize, rate: u64, work: &Path) -> Result<Subject> {
    let log = work.join(format!("target-{mb}.log"));
    let out = fs::File::create(&log)?;
    let child = Command::new(rrc)
        .args([
            "bench",
            "target",
            "--mb",
            &mb.to_string(),
            "--dirty-per-sec",
            &rate.to_string(),
        ])
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(Stdio::null())
        .spawn()?;
    let s = Subject {
        pid: Pid::from_raw(child.id() as i32),
        child,
        load: None,
        log: Some(log.clone()),
    };
    wait_line(&log, "ready", 0, Duration::from_secs(120))?;
    Ok(s)
}

fn connect_redis(port: u16) -> Result<RespConn> {
    let addr = format!("127.0.0.1:{port}").parse()?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        // Filling a gigabyte takes a while: a patient connection.
        match RespConn::connect(addr, Duration::from_secs(300)) {
            Ok(c) => return Ok(c),
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(e.into()),
        }
    }
}

fn start_redis(mb: usize, work: &Path) -> Result<Subject> {
    let port = 16479u16;
    let child = crate::resp::local_redis(port, work)?
        .spawn()
        .context("cannot start redis-server (run scripts/setup)")?;
    let mut s = Subject {
        pid: Pid::from_raw(child.id() as i32),
        child,
        load: None,
        log: None,
    };
    let mut c = connect_redis(port)?;
    // About 150 bytes a key with 64-byte values.
    let keys = (mb << 20) / 150;
    let r = c.command(&[
        b"DEBUG",
        b"POPULATE",
        keys.to_string().as_bytes(),
        b"key",
        b"64",
    ])?;
    ensure!(
        r == crate::resp::Reply::Status("OK".into()),
        "DEBUG POPULATE answered {r:?}"
    );
    drop(c);
    s.load = Some(
        Command::new("redis-benchmark")
            .args([
                "-p",
                &port.to_string(),
                "-t",
                "set,get",
                "-r",
                "100000",
                "-d",
                "64",
                "-c",
                "8",
                "-n",
                "1000000000",
                "-q",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start redis-benchmark")?,
    );
    Ok(s)
}

fn start_memcached(mb: usize) -> Result<Subject> {
    let port = 16411u16;
    let child = Command::new("memcached")
        .args([
            "-p",
            &port.to_string(),
            "-l",
            "127.0.0.1",
            "-U",
            "0",
            "-t",
            "4",
            "-u",
            "root",
            "-m",
            &(mb + 256).to_string(),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("cannot start memcached (run scripts/setup)")?;
    let mut s = Subject {
        pid: Pid::from_raw(child.id() as i32),
        child,
        load: None,
        log: None,
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut conn = loop {
        match TcpStream::connect(("127.0.0.1", port)) {
            Ok(c) => break c,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(e.into()),
        }
    };
    // Fill it with 1 KB values, pipelined without replies.
    let value = vec![b'v'; 1000];
    let keys = (mb << 20) / 1100;
    let mut batch = Vec::with_capacity(1 << 20);
    for i in 0..keys {
        write!(batch, "set fill:{i} 0 0 {} noreply\r\n", value.len())?;
        batch.extend_from_slice(&value);
        batch.extend_from_slice(b"\r\n");
        if batch.len() > (1 << 20) - 2048 {
            conn.write_all(&batch)?;
            batch.clear();
        }
    }
    batch.extend_from_slice(b"version\r\n");
    conn.write_all(&batch)?;
    let mut reply = [0u8; 64];
    let n = std::io::Read::read(&mut conn, &mut reply)?;
    ensure!(
        reply[..n].starts_with(b"VERSION"),
        "memcached did not take the fill"
    );
    s.load = Some(
        Command::new("memcaslap")
            .args([
                "-s",
                &format!("127.0.0.1:{port}"),
                "-T",
                "2",
                "-c",
                "16",
                "-X",
                "100",
                "-t",
                "3600s",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start memcaslap (libmemcached-tools)")?,
    );
    Ok(s)
}

/// The longest stall the fixture's watcher saw since the last ask.
fn app_stall(s: &Subject) -> Result<Option<f64>> {
    let Some(log) = &s.log else {
        return Ok(None);
    };
    let n = lines(log);
    kill(s.pid, Signal::SIGUSR1)?;
    let line = wait_line(log, "gap", n, Duration::from_secs(5))?;
    Ok(Some(line[4..].parse::<f64>()? / 1e6))
}

/// Sleeps until the next tick of a fixed-rate schedule.
fn tick(next: &mut Instant, every: Duration) {
    let now = Instant::now();
    if *next > now {
        std::thread::sleep(*next - now);
    }
    *next = (*next + every).max(Instant::now());
}

fn measure(
    s: &Subject,
    mode: Mode,
    cfg: &PauseConfig,
    work: &Path,
    name: &str,
) -> Result<PauseRow> {
    let mut pauses = Vec::new();
    let mut saved = 0u64;
    let mut cpu = Duration::ZERO;
    let mut from_snapshot = 0u64;
    app_stall(s)?;
    let mut next = Instant::now();
    match mode {
        Mode::Full => {
            for i in 0..cfg.full_epochs {
                tick(&mut next, cfg.every);
                let dir = work.join(format!("full-{i}"));
                let cpu0 = self_cpu();
                let r = rrc_ckpt::dump::checkpoint(&rrc_ckpt::dump::CheckpointOptions {
                    container: false,
                    root: s.pid,
                    aio_idle: false,
                    images: &dir,
                    leave_running: true,
                    annotations: Default::default(),
                })?;
                cpu += self_cpu().saturating_sub(cpu0);
                pauses.push(r.frozen.as_secs_f64() * 1e3);
                saved += r.memory_bytes;
                fs::remove_dir_all(&dir)?;
            }
        }
        _ => {
            let copy = match mode {
                Mode::Direct => CopyMode::Direct,
                Mode::Snapshot => CopyMode::Snapshot,
                _ => CopyMode::Auto,
            };
            let dir = work.join(format!("series-{mode:?}"));
            let _ = fs::remove_dir_all(&dir);
            let series = SeriesDir::create(&dir, false)?;
            let mut inc = Incremental::new(IncrementalOptions {
                container: false,
                root: s.pid,
                aio_idle: false,
                annotations: Default::default(),
                copy,
            });
            // The first checkpoint of a series is full: not counted.
            inc.checkpoint_into(&series)?;
            for _ in 0..cfg.epochs {
                tick(&mut next, cfg.every);
                let (r, _) = inc.checkpoint_into(&series)?;
                pauses.push(r.checkpoint.frozen.as_secs_f64() * 1e3);
                saved += r.dirty_bytes;
                cpu += r.cpu;
                from_snapshot += r.snapshots as u64;
            }
            inc.finish()?;
            fs::remove_dir_all(&dir)?;
        }
    }
    let n = pauses.len().max(1) as f64;
    let avg = pauses.iter().sum::<f64>() / n;
    pauses.sort_by(f64::total_cmp);
    Ok(PauseRow {
        workload: name.to_string(),
        footprint_mib: resident_mib(s.pid),
        mode,
        checkpoints: pauses.len() as u64,
        pause_avg_ms: avg,
        pause_p99_ms: quantile(&pauses, 0.99),
        pause_max_ms: quantile(&pauses, 1.0),
        saved_mib_avg: saved as f64 / n / (1 << 20) as f64,
        cpu_ms_avg: cpu.as_secs_f64() * 1e3 / n,
        from_snapshot,
        app_stall_max_ms: app_stall(s)?,
    })
}

/// CPU time of this whole process (a full checkpoint runs on one thread,
/// but the figure should not depend on that).
fn self_cpu() -> Duration {
    nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_SELF)
        .map(|u| {
            let tv = |t: nix::sys::time::TimeVal| {
                Duration::new(t.tv_sec() as u64, t.tv_usec() as u32 * 1000)
            };
            tv(u.user_time()) + tv(u.system_time())
        })
        .unwrap_or_default()
}

pub fn run(
    rrc: &Path,
    cfg: &PauseConfig,
    work: &Path,
    progress: &dyn Fn(&str),
) -> Result<Vec<PauseRow>> {
    rrc_ckpt::incremental::check_supported()?;
    fs::create_dir_all(work)?;
    let mut rows = Vec::new();
    for &mb in &cfg.sizes {
        for &w in &cfg.workloads {
            let (subject, name) = match w {
                Workload::Fixture => (
                    start_fixture(rrc, mb, cfg.dirty_per_sec, work)?,
                    format!("fixture {} pages/s", cfg.dirty_per_sec),
                ),
                Workload::Redis => (start_redis(mb, work)?, "Redis + redis-benchmark".into()),
                Workload::Memcached => (start_memcached(mb)?, "Memcached + memaslap".into()),
            };
            // Let the load reach its pace.
            std::thread::sleep(Duration::from_millis(500));
            for mode in [Mode::Full, Mode::Direct, Mode::Snapshot, Mode::Auto] {
                progress(&format!("{name}, {mb} MiB: {mode:?} checkpoints"));
                let row = measure(&subject, mode, cfg, work, &name)?;
                if kill(subject.pid, None).is_err() {
                    bail!("the workload died during the {mode:?} checkpoints");
                }
                progress(render_row(&row).trim_end());
                rows.push(row);
            }
        }
    }
    Ok(rows)
}

pub fn render(rows: &[PauseRow]) -> String {
    let mut s = format!(
        "{:<26} {:>9} {:<8} {:>5} {:>9} {:>9} {:>9} {:>10} {:>8} {:>6} {:>10}\n",
        "workload",
        "RSS MiB",
        "mode",
        "ckpts",
        "pause ms",
        "p99 ms",
        "max ms",
        "saved MiB",
        "CPU ms",
        "snap",
        "stall ms"
    );
    for r in rows {
        s.push_str(&render_row(r));
    }
    s.push_str(
        "pause: how long the engine kept the process stopped; saved: memory written per checkpoint; snap: checkpoints that copied pages from a copy-on-write snapshot; stall: the longest stall a thread of the process saw\n",
    );
    s
}

fn render_row(r: &PauseRow) -> String {
    format!(
        "{:<26} {:>9.0} {:<8} {:>5} {:>9.2} {:>9.2} {:>9.2} {:>10.2} {:>8.2} {:>6} {:>10}\n",
        r.workload,
        r.footprint_mib,
        format!("{:?}", r.mode).to_lowercase(),
        r.checkpoints,
        r.pause_avg_ms,
        r.pause_p99_ms,
        r.pause_max_ms,
        r.saved_mib_avg,
        r.cpu_ms_avg,
        if r.mode == Mode::Full {
            "-".into()
        } else {
            r.from_snapshot.to_string()
        },
        r.app_stall_max_ms
            .map(|g| format!("{g:.2}"))
            .unwrap_or_else(|| "-".into())
    )
}

pub fn default_work_dir() -> PathBuf {
    std::env::temp_dir().join(format!("rrc-bench-pause-{}", std::process::id()))
}
