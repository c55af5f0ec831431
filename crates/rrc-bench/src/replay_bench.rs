//! `rrc bench replay`: how often a replay reproduces a program with a data
//! race, with neither of librrc's mitigations, with the recorded global
//! order of returns only, and with order plus the recorded time between
//! returns.
//!
//! The program (`rr_race`, built here with gcc) has two threads updating a
//! counter without a lock between recorded calls; its output (the counter
//! and a trace of the values each thread saw) depends on how their steps
//! interleaved. Each run records it anew and replays that recording once
//! in each mode, comparing the output with the recorded one: a replay of
//! one recording tends to come out the same every time, so what varies is
//! which recordings a mode can reproduce.
//!
//! Then servers replayed from a checkpoint ([`servers`]): Redis and
//! Memcached recorded under verifying load in a lab, checkpointed at a
//! random moment while the load goes on, and replayed from that checkpoint
//! to the end of the log, with and without the recorded timing: the events
//! replayed, the divergences, and how long the replay took against the
//! time the recording spent after the checkpoint.

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use serde::Serialize;

const SOURCE: &str = include_str!("../../rrc-ckpt/tests/fixtures/rr_race.c");

#[derive(Debug, Clone, Serialize)]
pub struct ModeResult {
    pub mode: &'static str,
    pub runs: usize,
    /// Replays whose output equals the recorded output.
    pub reproduced: usize,
    /// Replays in which librrc reported a divergence.
    pub diverged: usize,
    pub avg_ms: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ReplayReport {
    /// Where each replay starts: "program start" or "checkpoint".
    pub from: &'static str,
    /// Distinct outputs among the recordings.
    pub distinct_recorded: usize,
    pub modes: Vec<ModeResult>,
}

const MODES: [(&str, &[&str]); 3] = [
    ("neither", &["--no-order", "--no-timing"]),
    ("order", &["--no-timing"]),
    ("order + timing", &[]),
];

/// The racy program's threads wait this long when replayed from a
/// checkpoint, and the checkpoint is taken this far into the wait.
const DELAY_MS: u64 = 200;
const CHECKPOINT_AT_MS: u64 = 80;

/// Records the racy program `runs` times and replays each recording once
/// per mode: from the program's start, or (`from_checkpoint`) from a
/// checkpoint taken while it was recorded, before its threads raced.
pub fn run(
    rrc: &Path,
    runs: usize,
    from_checkpoint: bool,
    progress: &dyn Fn(&str),
) -> Result<ReplayReport> {
    let work = std::env::temp_dir().join(format!("rrc-bench-replay-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let result = run_in(rrc, runs, from_checkpoint, &work, progress);
    let _ = std::fs::remove_dir_all(&work);
    result
}

/// The container the racy program is recorded in.
fn race_name() -> String {
    format!("race{}", std::process::id())
}

/// Records the racy program into `log` (checkpointing it into `images`
/// while its threads wait, if given); what it printed.
fn record_race(rrc: &Path, bin: &Path, log: &Path, images: Option<&Path>) -> Result<String> {
    let name = race_name();
    let mut cmd = Command::new(rrc);
    cmd.args(["run", "--name", &name, "--record"])
        .arg(log)
        // The program is in the bench's directory, which the container's
        // private root hides.
        .arg("--share")
        .arg(bin.parent().unwrap_or(Path::new("/")))
        .arg("--")
        .arg(bin)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    if images.is_some() {
        cmd.arg(DELAY_MS.to_string());
    }
    let child = cmd.spawn().context("cannot run rrc")?;
    if let Some(images) = images {
        std::thread::sleep(Duration::from_millis(CHECKPOINT_AT_MS));
        let out = Command::new(rrc)
            .args(["checkpoint", &name, "--leave-running", "--images"])
            .arg(images)
            .output()
            .context("cannot run rrc checkpoint")?;
        ensure!(
            out.status.success(),
            "checkpoint failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "recording failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn run_in(
    rrc: &Path,
    runs: usize,
    from_checkpoint: bool,
    work: &Path,
    progress: &dyn Fn(&str),
) -> Result<ReplayReport> {
    let src = work.join("rr_race.c");
    let bin = work.join("rr_race");
    std::fs::write(&src, SOURCE)?;
    let built = Command::new("gcc")
        .args(["-O1", "-pthread", "-o"])
        .arg(&bin)
        .arg(&src)
        .status()
        .context("cannot run gcc (run scripts/setup)")?;
    ensure!(built.success(), "the racy program does not compile");

    let mut modes: Vec<ModeResult> = MODES
        .iter()
        .map(|(mode, _)| ModeResult {
            mode,
            runs,
            reproduced: 0,
            diverged: 0,
            avg_ms: 0.0,
        })
        .collect();
    let mut took = vec![std::time::Duration::ZERO; MODES.len()];
    let mut outputs = std::collections::BTreeSet::new();
    for run in 0..runs {
        if run % 10 == 0 {
            progress(&format!(
                "run {}/{runs}: record, then replay in each mode",
                run + 1
            ));
        }
        let log = work.join(format!("log{run}"));
        let images = work.join(format!("images{run}"));
        let recorded = record_race(rrc, &bin, &log, from_checkpoint.then_some(&images))?;
        outputs.insert(recorded.clone());
        for (i, (_, flags)) in MODES.iter().enumerate() {
            let start = Instant::now();
            let mut cmd = Command::new(rrc);
            cmd.arg("replay").args(*flags).arg("--log").arg(&log);
            if from_checkpoint {
                cmd.arg("--images").arg(&images);
            } else {
                cmd.arg("--").arg(&bin);
            }
            let out = cmd
                .stdin(std::process::Stdio::null())
                .output()
                .context("cannot run rrc replay")?;
            took[i] += start.elapsed();
            if String::from_utf8_lossy(&out.stdout) == recorded {
                modes[i].reproduced += 1;
            }
            if String::from_utf8_lossy(&out.stderr).contains("DIVERGENCE") {
                modes[i].diverged += 1;
            }
        }
        let _ = std::fs::remove_dir_all(&log);
        let _ = std::fs::remove_dir_all(&images);
    }
    // What the checkpointed and replayed containers kept in their root.
    if let Ok(name) = race_name().parse() {
        let _ = rrc_container::rootfs::RootFs::Private.remove(&name);
    }
    for (m, t) in modes.iter_mut().zip(took) {
        m.avg_ms = t.as_secs_f64() * 1e3 / runs.max(1) as f64;
    }
    Ok(ReplayReport {
        from: if from_checkpoint {
            "checkpoint"
        } else {
            "program start"
        },
        distinct_recorded: outputs.len(),
        modes,
    })
}

pub fn render(r: &ReplayReport) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "A program with a data race, recorded and replayed from its {} once per mode in each run ({} distinct recorded outputs)",
        r.from, r.distinct_recorded
    );
    let _ = writeln!(
        s,
        "{:<16} {:>6} {:>11} {:>9} {:>10} {:>9}",
        "mitigation", "runs", "reproduced", "rate", "diverged", "avg ms"
    );
    for m in &r.modes {
        let _ = writeln!(
            s,
            "{:<16} {:>6} {:>11} {:>8.1}% {:>10} {:>9.1}",
            m.mode,
            m.runs,
            m.reproduced,
            m.reproduced as f64 * 100.0 / m.runs.max(1) as f64,
            m.diverged,
            m.avg_ms
        );
    }
    s
}

/// One server replayed from one checkpoint, in one mode.
#[derive(Debug, Clone, Serialize)]
pub struct ServerReplay {
    pub app: &'static str,
    pub mode: &'static str,
    pub events: u64,
    pub divergences: u64,
    /// How long the replay took, as librrc reports it.
    pub replay_ms: u64,
    /// How long the recording ran after the checkpoint.
    pub recorded_ms: u64,
    pub reached_end: bool,
    /// Bytes the replay wrote to its connections.
    pub captured_bytes: u64,
}

/// librrc's closing report: events, divergences, milliseconds.
fn parse_report(text: &str) -> Option<(u64, u64, u64)> {
    let line = text
        .lines()
        .rev()
        .find(|l| l.contains(" events replayed, "))?;
    let nums: Vec<u64> = line
        .split(|c: char| !c.is_ascii_digit())
        .filter(|w| !w.is_empty())
        .filter_map(|w| w.parse().ok())
        .collect();
    match nums[..] {
        [events, divergences, ms, ..] => Some((events, divergences, ms)),
        _ => None,
    }
}

/// Records each app under verifying load, checkpoints it at a random
/// moment, and replays the checkpoint in each mode, `runs` times.
pub fn servers(
    rrc: &Path,
    apps: &[crate::failover::App],
    runs: usize,
    progress: &dyn Fn(&str),
) -> Result<Vec<ServerReplay>> {
    let lab = crate::session::LabSession::start(rrc, "benchrpl", None)?;
    let work = std::env::temp_dir().join(format!("rrc-bench-rpl-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let mut rows = Vec::new();
    let result = (|| -> Result<()> {
        for &app in apps {
            for run in 0..runs {
                progress(&format!(
                    "{} run {}/{runs}: record under load, checkpoint, replay",
                    app.name(),
                    run + 1
                ));
                rows.extend(server_run(
                    &lab,
                    rrc,
                    app,
                    &work.join(format!("{}{run}", app.name())),
                    progress,
                )?);
            }
        }
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&work);
    result.map(|()| rows)
}

fn server_run(
    lab: &crate::session::LabSession,
    rrc: &Path,
    app: crate::failover::App,
    dir: &Path,
    progress: &dyn Fn(&str),
) -> Result<Vec<ServerReplay>> {
    use rrc_lab::Host;
    std::fs::create_dir_all(dir)?;
    let log = dir.join("log");
    let images = dir.join("images");
    let target = app.start(lab, &["--record", &log.display().to_string()])?;
    let rrc_s = rrc.display().to_string();
    let images_s = images.display().to_string();
    let checkpointed = std::sync::Mutex::new(None);
    let report = lab.in_host(Host::Client, || {
        crate::verify::run(
            app.service(),
            target,
            8,
            || {
                let nanos = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.subsec_nanos());
                std::thread::sleep(Duration::from_millis(u64::from(nanos % 1000)));
                let r = lab.run_on(
                    Host::Primary,
                    &[
                        &rrc_s,
                        "checkpoint",
                        app.name(),
                        "--images",
                        &images_s,
                        "--leave-running",
                    ],
                );
                *checkpointed.lock().expect("not poisoned") = Some((Instant::now(), r.map(|_| ())));
            },
            Duration::from_millis(1500),
        )
    })?;
    let load_end = Instant::now();
    lab.run_on(Host::Primary, &[&rrc_s, "stop", app.name()])?;
    let (at, made) = checkpointed
        .into_inner()
        .expect("not poisoned")
        .context("no checkpoint was taken")?;
    made.context("checkpointing the recorded server")?;
    ensure!(
        report.errors.is_empty(),
        "the load saw errors: {:?}",
        report.errors
    );
    let recorded_ms = load_end.duration_since(at).as_millis() as u64;
    let mut rows = Vec::new();
    for (mode, flags) in [("order + timing", &[][..]), ("order", &["--no-timing"][..])] {
        let capture = dir.join(format!("capture-{}", rows.len()));
        let mut argv = vec![
            rrc_s.as_str(),
            "replay",
            "--images",
            &images_s,
            "--stop-at-end",
        ];
        let log_s = log.display().to_string();
        let capture_s = capture.display().to_string();
        argv.extend(["--log", &log_s, "--capture", &capture_s]);
        argv.extend(flags);
        let out = lab
            .command_on(Host::Primary, &argv)
            .stdin(std::process::Stdio::null())
            .output()
            .context("running rrc replay")?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let (events, divergences, replay_ms) = parse_report(&text)
            .with_context(|| format!("the replay printed no report: {}", text.trim()))?;
        if let Some(first) = text.lines().find(|l| l.contains("DIVERGENCE")) {
            progress(&format!("{} ({mode}): {first}", app.name()));
        }
        rows.push(ServerReplay {
            app: app.name(),
            mode,
            events,
            divergences,
            replay_ms,
            recorded_ms,
            reached_end: text.contains("end of the log reached"),
            captured_bytes: std::fs::metadata(&capture).map_or(0, |m| m.len()),
        });
    }
    Ok(rows)
}

pub fn render_servers(rows: &[ServerReplay]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "Servers recorded under load (8 verifying connections), checkpointed at a random moment, replayed from the checkpoint to the end of the log"
    );
    let _ = writeln!(
        s,
        "{:<10} {:<15} {:>9} {:>11} {:>8} {:>12} {:>10} {:>11}",
        "app", "mode", "events", "divergences", "end", "recorded ms", "replay ms", "captured B"
    );
    for r in rows {
        let _ = writeln!(
            s,
            "{:<10} {:<15} {:>9} {:>11} {:>8} {:>12} {:>10} {:>11}",
            r.app,
            r.mode,
            r.events,
            r.divergences,
            if r.reached_end { "yes" } else { "NO" },
            r.recorded_ms,
            r.replay_ms,
            r.captured_bytes
        );
    }
    s
}
