//! What a backup says of itself for `rrc status`: a small JSON file,
//! `status.json` in its directory, rewritten as its state changes (and at
//! most once a second as checkpoints are committed), with the phases of
//! its takeover once it made one.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// The file's name in the backup's directory.
pub const FILE: &str = "status.json";

/// How often commits alone rewrite the file.
const EVERY: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct BackupStatus {
    pub listen: String,
    pub pid: u32,
    /// What it does: waiting for a primary, protecting one, waiting for
    /// the arbiter, took over.
    pub state: String,
    pub primary: Option<String>,
    pub service: Option<String>,
    pub term: Option<u64>,
    /// It holds a committed checkpoint it could take over from.
    pub holds_checkpoint: bool,
    pub committed: u64,
    pub last_commit_unix_ms: Option<u64>,
    pub log_bytes: u64,
    /// The longest the primary was not heard from while it was protected
    /// and alive (ms), since this backup started: how close its timeout
    /// came to a false takeover.
    #[serde(default)]
    pub longest_silence_ms: f64,
    pub takeover: Option<TakeoverPhases>,
    pub updated_unix_ms: u64,
}

/// A takeover's steps, as `rrc backup` printed them.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TakeoverPhases {
    pub epoch: u64,
    pub silent_ms: f64,
    pub arbiter_ms: Option<f64>,
    pub fence_ms: f64,
    pub restore_ms: f64,
    /// How the service resumed: by replay, from the checkpoint, or after
    /// a fallback (and why).
    pub resumed: String,
    pub at_unix_ms: u64,
}

pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl BackupStatus {
    /// The status a backup left in `dir`, if any.
    pub fn read(dir: &Path) -> Option<BackupStatus> {
        let bytes = fs::read(dir.join(FILE)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// Whether the process that wrote it still runs.
    pub fn alive(&self) -> bool {
        Path::new(&format!("/proc/{}", self.pid)).exists()
    }

    /// One line for `rrc status`.
    pub fn describe(&self) -> String {
        let mut s = if self.alive() {
            format!(
                "backup on {} (pid {}): {}",
                self.listen, self.pid, self.state
            )
        } else {
            format!(
                "backup on {} (no longer running; it last said: {})",
                self.listen, self.state
            )
        };
        if let (Some(svc), Some(p)) = (&self.service, &self.primary) {
            s += &format!(" {svc} of {p}");
        }
        if let Some(t) = self.term {
            s += &format!(", term {t}");
        }
        if self.holds_checkpoint {
            s += &format!(
                ", holds a committed checkpoint ({} committed",
                self.committed
            );
            if let Some(at) = self.last_commit_unix_ms {
                let ago = unix_ms().saturating_sub(at) as f64 / 1e3;
                s += &format!(", the last {ago:.1} s ago");
            }
            s += ")";
        }
        if self.longest_silence_ms > 0.0 {
            s += &format!(
                ", the primary's longest silence {:.0} ms",
                self.longest_silence_ms
            );
        }
        if let Some(k) = &self.takeover {
            s += &format!(
                "; took over from checkpoint {}: primary silent {:.0} ms, arbiter {}, fence {:.0} ms, restore {:.0} ms; {}",
                k.epoch,
                k.silent_ms,
                k.arbiter_ms
                    .map_or("none".to_string(), |a| format!("{a:.1} ms")),
                k.fence_ms,
                k.restore_ms,
                k.resumed
            );
        }
        s
    }
}

/// The file, kept up to date.
pub struct StatusFile {
    path: PathBuf,
    pub status: BackupStatus,
    written: Option<Instant>,
}

impl StatusFile {
    pub fn new(dir: &Path, listen: String) -> StatusFile {
        StatusFile {
            path: dir.join(FILE),
            status: BackupStatus {
                listen,
                pid: std::process::id(),
                ..BackupStatus::default()
            },
            written: None,
        }
    }

    /// Rewrites the file now (atomically: written aside, then renamed).
    /// A failure is only logged: the status is for people, the backup's
    /// work goes on.
    pub fn write(&mut self) {
        self.status.updated_unix_ms = unix_ms();
        self.written = Some(Instant::now());
        if let Err(e) = crate::write_json_atomically(&self.path, &self.status) {
            tracing::debug!(error = %e, "writing the backup's status");
        }
    }

    /// Rewrites the file unless it was written in the last second.
    pub fn write_soon(&mut self) {
        if self.written.is_none_or(|w| w.elapsed() >= EVERY) {
            self.write();
        }
    }
}

/// Adds a takeover's phases to the status a backup left in `dir`.
pub fn record_takeover(dir: &Path, phases: TakeoverPhases) {
    let mut f = StatusFile {
        path: dir.join(FILE),
        status: BackupStatus::read(dir).unwrap_or_default(),
        written: None,
    };
    f.status.pid = std::process::id();
    f.status.state = "took over".into();
    f.status.holds_checkpoint = false;
    f.status.takeover = Some(phases);
    f.write();
}
