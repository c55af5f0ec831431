//! rrc containers: an unmodified program in its own pid, mount, uts, ipc and
//! network namespaces and its own cgroup, whose only LAN interface is a TAP
//! device held by the rrc process that supervises it.
//!
//! - [`spec`]: what the user asked for, validated before anything is created.
//! - [`probe`]: the kernel features a container needs, checked up front.
//! - [`state`]: the per-host state directory (`rrc ps`, stale detection).
//! - [`create`]: building the container, with rollback on any failure;
//!   [`restore`]: rebuilding one from a checkpoint image.
//! - [`launch`]: the one way to start a container (from a program or an
//!   image, with a gate and companions, in the foreground or detached).
//! - [`supervise`]: the rrc process's life beside the running container,
//!   with its companions; [`epochs`]: its periodic checkpoints.
//! - [`stop`]: stopping a container by name, from another process.
//! - [`confine`]: what the programs inside are kept from (capabilities,
//!   masked and read-only kernel paths).

pub mod confine;
pub mod control;
pub mod create;
pub mod daemon;
pub mod epochs;
pub mod launch;
pub mod netstate;
pub mod probe;
pub mod proc;
pub mod restore;
pub mod rootfs;
pub mod spec;
pub mod state;
pub mod stop;
pub mod supervise;
mod sys;

pub use sys::{default_sigpipe, private_files};

pub use spec::{ContainerName, ContainerSpec, NetSpec};
pub use state::{ContainerRecord, HostState, Status};

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0} needs root: it creates namespaces, a cgroup and a TAP device (try sudo)")]
    NotRoot(&'static str),
    #[error(
        "this kernel has no {kind} namespaces ({path} is missing): rebuild it with CONFIG_{config}_NS=y"
    )]
    NoNamespace {
        kind: &'static str,
        path: String,
        config: &'static str,
    },
    #[error(transparent)]
    Cgroup(#[from] rrc_cgroup::Error),
    #[error(transparent)]
    Net(#[from] rrc_net::Error),
    #[error("{0}")]
    InvalidSpec(String),
    #[error("command `{0}` not found in PATH; give an existing program (or its full path)")]
    CommandNotFound(String),
    #[error("`{0}` is not an executable file")]
    NotExecutable(String),
    #[error(
        "a container named `{name}` already exists on this host (rrc process {pid}); stop it with `rrc stop {name}` or pick another name"
    )]
    NameInUse { name: String, pid: i32 },
    #[error("no container named `{0}` on this host; `rrc ps` lists them")]
    UnknownContainer(String),
    #[error("cannot start `{command}` in the container: {source}")]
    Exec {
        command: String,
        source: std::io::Error,
    },
    #[error("container setup failed at {stage}: {source}")]
    Setup {
        stage: &'static str,
        source: std::io::Error,
    },
    #[error("state directory {path}: {source}")]
    State {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("corrupt state file {path}: {source}")]
    CorruptState {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error(transparent)]
    Checkpoint(#[from] rrc_ckpt::Error),
    #[error("container `{name}` did not stop within {secs} s")]
    StopTimeout { name: String, secs: u64 },
    #[error("{} is not the image of a container (it holds a process tree: restore it with `rrc restore --images DIR`)", .0.display())]
    NotAContainerImage(PathBuf),
    /// What runs beside the container could not start.
    #[error("{0}")]
    Companion(crate::launch::CompanionError),
    /// The background process of a detached launch failed; its words.
    #[error("{0}")]
    Background(String),
}

pub type Result<T> = std::result::Result<T, Error>;

pub(crate) fn setup_err(stage: &'static str) -> impl FnOnce(std::io::Error) -> Error {
    move |source| Error::Setup { stage, source }
}

pub(crate) fn nix_setup_err(stage: &'static str) -> impl FnOnce(nix::Error) -> Error {
    move |e| Error::Setup {
        stage,
        source: e.into(),
    }
}
