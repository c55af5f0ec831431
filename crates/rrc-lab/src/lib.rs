//! The lab: a local test network whose hosts are network namespaces.
//!
//! ```text
//!   client ──┐
//!   primary ─┼── br0 (in the lab's own "lan" namespace)     LAN: <subnet>, VIP .100
//!   backup ──┘
//!   primary ── repl0 ════ repl0 ── backup                   replication link
//! ```
//!
//! Every lab has a name, and everything it creates carries that name
//! (namespaces `rrc-<lab>-<host>`, cgroup `rrc-lab.<lab>`, state in
//! `/run/rrc/labs/<lab>.json`), so labs run side by side without meeting. No
//! interface of the machine's own namespace is touched.
//!
//! Each host has a cgroup holding everything started on it (through
//! `rrc lab exec`), containers included, so [`Lab::kill`] can cut a host's
//! power: freeze it, pull its cables, kill every process at once.

mod arbiter;
mod cut;
mod ip;
mod lab;
mod plan;
mod record;

pub use lab::{HostStatus, KillReport, Lab, LabStatus};
pub use plan::{Host, LabName, LabPlan};
pub use record::{HostRecord, LabRecord};

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Invalid(String),
    #[error("no lab named `{0}` is up; start it with `rrc lab up --lab {0}`")]
    NoSuchLab(String),
    #[error(
        "lab `{name}` is already up with subnet {existing}; take it down first (`rrc lab down --lab {name}`) to change it"
    )]
    SubnetMismatch { name: String, existing: String },
    #[error(
        "host `{host}` of lab `{lab}` is down (killed); bring it back with `rrc lab revive {host}`"
    )]
    HostDown { lab: String, host: String },
    #[error("iproute2's `ip` command is missing: install iproute2 (scripts/setup does)")]
    NoIpCommand,
    #[error("`ip {args}` failed: {stderr}")]
    Ip { args: String, stderr: String },
    #[error("lab state {path}: {source}")]
    State {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("corrupt lab state {path}: {source}")]
    CorruptState {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("cannot run `{command}` on {host}: {source}")]
    Exec {
        host: String,
        command: String,
        source: nix::Error,
    },
    #[error("processes of host `{host}` survived the kill: {pids:?}")]
    Survivors { host: String, pids: Vec<i32> },
    #[error(transparent)]
    Cgroup(#[from] rrc_cgroup::Error),
    #[error(transparent)]
    Net(#[from] rrc_net::Error),
    #[error(transparent)]
    Container(#[from] rrc_container::Error),
}

pub type Result<T> = std::result::Result<T, Error>;
