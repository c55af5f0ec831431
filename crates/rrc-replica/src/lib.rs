//! Replication: a primary container checkpointed every epoch and streamed
//! to a backup, which takes over when the primary fails; in responsive
//! mode the program's log goes to the backup too, as it comes.
//!
//! Mechanism and policy are kept apart: [`gate::ReplicationGate`] is the
//! release policy (an outbound frame leaves once the backup holds what
//! produced it: a committed checkpoint taken after it, or the log up to its
//! tag); [`shipper`] takes the log from the program's rings to the link;
//! [`link`] moves checkpoints, the log and heartbeats both ways at once and
//! hands the backup's answers to the policy; [`primary`] runs beside the
//! container in its supervisor; [`backup::serve`] stages, commits, keeps the
//! log ([`log_store`]) and takes over. [`position`] says what a place in
//! the log is; [`netlog`] is the net log's file. [`arbitration`] is who
//! may act when the two sides lose each other.

pub mod acceptor;
pub mod arbitration;
pub mod backup;
pub mod backup_status;
pub mod gate;
pub mod link;
pub mod log_store;
pub mod metrics;
pub mod netlog;
pub mod position;
pub mod primary;
pub mod rebuild;
pub mod reprotect;
pub mod shipper;
pub mod takeover;
pub mod wake;

use std::path::{Path, PathBuf};
use std::time::Duration;

/// How long a link reader keeps looking for the next message before it
/// sleeps: log acknowledgements and log batches follow each other closely
/// under load, and a reply waits for every wake-up on their way.
pub(crate) const POLL_SPIN: Duration = Duration::from_micros(100);

/// Takes `m`'s lock even when a thread panicked holding it: replication
/// goes on, and every state these locks guard is whole between two
/// statements that change it.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Writes `value` as JSON to `path` whole or not at all (written aside,
/// then renamed over it): a reader never sees half a file.
pub(crate) fn write_json_atomically(
    path: &Path,
    value: &impl serde::Serialize,
) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".next");
    let tmp = PathBuf::from(tmp);
    let bytes = serde_json::to_vec_pretty(value).map_err(std::io::Error::other)?;
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

/// The replication link's port when an address names none.
pub const DEFAULT_PORT: u16 = 7470;

/// How often an idle replication link says the primary is alive, unless
/// told otherwise (`rrc primary --heartbeat`).
pub const DEFAULT_HEARTBEAT: std::time::Duration = std::time::Duration::from_millis(25);

/// How long a backup hears nothing from its primary before it counts it
/// failed, unless told otherwise (`rrc backup --timeout`): four heartbeats.
/// `rrc bench detection` ran ten minutes of heavy load on a noisy 2-vCPU
/// machine with these two settings without a false takeover.
pub const DEFAULT_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(100);

/// The link's security settings, the same on both ends: a peer that has
/// not completed the handshake in 2 s is dropped.
pub(crate) fn link_security() -> rrc_wire::SecureConfig {
    rrc_wire::SecureConfig {
        handshake_timeout: Duration::from_secs(2),
        ..rrc_wire::SecureConfig::default()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("takeover failed: {0}")]
    Takeover(String),
    #[error("fencing the primary failed: {0}")]
    Fence(String),
    #[error("replication protocol: {0}")]
    Protocol(String),
    #[error(transparent)]
    Checkpoint(#[from] rrc_ckpt::Error),
}

impl Error {
    /// Wraps an I/O error with the path it happened on.
    pub fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + use<> {
        let path: PathBuf = path.to_path_buf();
        move |source| Error::Io {
            what: path.display().to_string(),
            source,
        }
    }
}
