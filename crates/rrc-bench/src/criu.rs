//! CRIU on the same workload, for comparison: where a working CRIU is
//! installed (`rrc bench ckpt --criu PATH`, or `criu` on the PATH), the
//! Redis of `rrc bench ckpt` is dumped and restored by it too, in the
//! same rounds, and its own figures (`--display-stats`) are reported
//! beside rrc's.

use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use nix::unistd::Pid;
use serde::Serialize;

/// A CRIU binary that passed `criu check` on this machine.
#[derive(Debug, Clone)]
pub struct Criu {
    bin: PathBuf,
}

/// One CRIU dump and restore of a workload.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CriuRound {
    /// `criu dump`, from start to exit.
    pub dump_ms: f64,
    /// CRIU's own "Frozen time": how long the tree was stopped.
    pub frozen_ms: f64,
    /// CRIU's "Memory dump time" and "Memory write time" (parts of it).
    pub memdump_ms: f64,
    pub memwrite_ms: f64,
    /// `criu restore -d`, from start to exit.
    pub restore_ms: f64,
    /// CRIU's own "Restore time".
    pub restore_stat_ms: f64,
}

impl Criu {
    /// `path` if given (an error if it does not pass `criu check`), else
    /// `criu` on the PATH if it passes (none otherwise).
    pub fn find(path: Option<&Path>) -> Result<Option<Criu>> {
        let bin = path.map_or_else(|| PathBuf::from("criu"), Path::to_path_buf);
        let check = Command::new(&bin)
            .arg("check")
            .stdin(Stdio::null())
            .output();
        match (check, path) {
            (Ok(o), _) if o.status.success() => Ok(Some(Criu { bin })),
            (_, None) => Ok(None),
            (Ok(o), Some(p)) => bail!(
                "{} check failed: {}",
                p.display(),
                String::from_utf8_lossy(&o.stderr).trim()
            ),
            (Err(e), Some(p)) => bail!("cannot run {}: {e}", p.display()),
        }
    }

    /// `criu --version`'s first line.
    pub fn version(&self) -> String {
        Command::new(&self.bin)
            .arg("--version")
            .output()
            .map(|o| {
                let text = String::from_utf8_lossy(&o.stdout).into_owned();
                text.lines().next().unwrap_or("").trim().to_string()
            })
            .unwrap_or_default()
    }

    /// Makes `cmd` start its program as a session leader: CRIU dumps only
    /// a tree whose session is its own unless told it is a shell job.
    pub fn own_session(cmd: &mut Command) {
        // SAFETY: setsid is async-signal-safe and touches no memory.
        unsafe {
            cmd.pre_exec(|| nix::unistd::setsid().map(|_| ()).map_err(Into::into));
        }
    }

    /// Dumps the tree of `pid` into `dir` (the tree is killed; its parent
    /// must reap it before a restore can have its pid again); fills the
    /// dump's figures of `round`.
    pub fn dump(&self, pid: Pid, dir: &Path, round: &mut CriuRound) -> Result<()> {
        fs::create_dir_all(dir)?;
        let t = Instant::now();
        let out = self.run(&[
            "dump",
            "-t",
            &pid.to_string(),
            "-D",
            &dir.to_string_lossy(),
            "-o",
            "dump.log",
            "--display-stats",
        ])?;
        round.dump_ms = t.elapsed().as_secs_f64() * 1e3;
        if !out.status.success() {
            bail!("criu dump failed (see {}/dump.log)", dir.display());
        }
        let stats = text_of(&out);
        round.frozen_ms = stat_ms(&stats, "Frozen time")?;
        round.memdump_ms = stat_ms(&stats, "Memory dump time")?;
        round.memwrite_ms = stat_ms(&stats, "Memory write time")?;
        Ok(())
    }

    /// Restores the tree dumped in `dir`, detached (with the pids it had);
    /// fills the restore's figures of `round`.
    pub fn restore(&self, dir: &Path, round: &mut CriuRound) -> Result<()> {
        let t = Instant::now();
        let out = self.run(&[
            "restore",
            "-D",
            &dir.to_string_lossy(),
            "-d",
            "-o",
            "restore.log",
            "--display-stats",
        ])?;
        round.restore_ms = t.elapsed().as_secs_f64() * 1e3;
        if !out.status.success() {
            bail!("criu restore failed (see {}/restore.log)", dir.display());
        }
        round.restore_stat_ms = stat_ms(&text_of(&out), "Restore time")?;
        Ok(())
    }

    fn run(&self, args: &[&str]) -> Result<Output> {
        Command::new(&self.bin)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("cannot run {}", self.bin.display()))
    }
}

fn text_of(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

/// `NAME: N us` from CRIU's `--display-stats` output, in milliseconds.
fn stat_ms(text: &str, name: &str) -> Result<f64> {
    let prefix = format!("{name}: ");
    text.lines()
        .find_map(|l| l.trim().strip_prefix(&prefix))
        .and_then(|rest| rest.trim_end_matches(" us").trim().parse::<f64>().ok())
        .map(|us| us / 1e3)
        .with_context(|| format!("CRIU's statistics have no \"{name}\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statistics_are_read_in_milliseconds() {
        let text = "Displaying dump stats:\nFreezing time: 120 us\nFrozen time: 51234 us\n\
                    Memory dump time: 30100 us\n";
        assert_eq!(stat_ms(text, "Frozen time").unwrap(), 51.234);
        assert_eq!(stat_ms(text, "Memory dump time").unwrap(), 30.1);
        assert!(stat_ms(text, "Restore time").is_err());
    }
}
