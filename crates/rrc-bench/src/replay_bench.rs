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

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

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
    /// Distinct outputs among the recordings.
    pub distinct_recorded: usize,
    pub modes: Vec<ModeResult>,
}

const MODES: [(&str, &[&str]); 3] = [
    ("neither", &["--no-order", "--no-timing"]),
    ("order", &["--no-timing"]),
    ("order + timing", &[]),
];

pub fn run(rrc: &Path, runs: usize, progress: &dyn Fn(&str)) -> Result<ReplayReport> {
    let work = std::env::temp_dir().join(format!("rrc-bench-replay-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let result = run_in(rrc, runs, &work, progress);
    let _ = std::fs::remove_dir_all(&work);
    result
}

fn run_in(rrc: &Path, runs: usize, work: &Path, progress: &dyn Fn(&str)) -> Result<ReplayReport> {
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
        let out = Command::new(rrc)
            .args([
                "run",
                "--name",
                &format!("race{}", std::process::id()),
                "--record",
            ])
            .arg(&log)
            .arg("--")
            .arg(&bin)
            .output()
            .context("cannot run rrc")?;
        if !out.status.success() {
            bail!(
                "recording failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let recorded = String::from_utf8_lossy(&out.stdout).into_owned();
        outputs.insert(recorded.clone());
        for (i, (_, flags)) in MODES.iter().enumerate() {
            let start = Instant::now();
            let out = Command::new(rrc)
                .arg("replay")
                .args(*flags)
                .arg("--log")
                .arg(&log)
                .arg("--")
                .arg(&bin)
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
    }
    for (m, t) in modes.iter_mut().zip(took) {
        m.avg_ms = t.as_secs_f64() * 1e3 / runs.max(1) as f64;
    }
    Ok(ReplayReport {
        distinct_recorded: outputs.len(),
        modes,
    })
}

pub fn render(r: &ReplayReport) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "A program with a data race, recorded and replayed once per mode in each run ({} distinct recorded outputs)",
        r.distinct_recorded
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
