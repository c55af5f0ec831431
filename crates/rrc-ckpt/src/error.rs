//! Errors of the engine; each says which process or file and what failed.

use std::path::{Path, PathBuf};

use nix::errno::Errno;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no process {0} (it is gone, or this is not its pid namespace)")]
    NoSuchProcess(i32),
    #[error("cannot {what} thread {tid}: {source}")]
    Ptrace {
        what: &'static str,
        tid: i32,
        source: Errno,
    },
    #[error("thread {tid}, injected system call {nr}: {detail}")]
    Remote { tid: i32, nr: i64, detail: String },
    #[error("thread {tid}: {what} failed in the process: {errno}")]
    RemoteFailed {
        tid: i32,
        what: &'static str,
        errno: Errno,
    },
    #[error("process {pid}: cannot read {what}: {detail}")]
    Proc {
        pid: i32,
        what: &'static str,
        detail: String,
    },
    /// Reading or writing another process's memory failed (`op` is "read"
    /// or "write").
    #[error("process {pid}: cannot {op} its memory: {detail}")]
    Memory {
        pid: i32,
        op: &'static str,
        detail: String,
    },
    #[error("image {path}: {source}")]
    Image {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("image directory {0} is not empty; give a new or empty directory")]
    ImageDirNotEmpty(PathBuf),
    #[error("image {path} is unusable: {detail}")]
    CorruptImage { path: PathBuf, detail: String },
    /// An edit of an image names something the image does not hold.
    #[error("image {path} has no {what}")]
    NotInImage { path: PathBuf, what: String },
    #[error("delta {path} refused: {detail}")]
    DeltaRefused { path: PathBuf, detail: String },
    /// Nothing was read or saved: the same checkpoint may work a moment
    /// later (a series goes on as if it had not been tried).
    #[error("cannot checkpoint now: {0}")]
    Busy(String),
    #[error("cannot checkpoint: {}", .0.join("; "))]
    Unsupported(Vec<String>),
    #[error("cannot restore on this machine: {0}")]
    Incompatible(String),
    #[error(
        "pid {0} is in use; the checkpointed process must be gone (or restore into a new pid namespace)"
    )]
    PidTaken(i32),
    #[error("pid {pid} is still held by a zombie: its parent (pid {parent}) has not reaped it yet")]
    PidZombie { pid: i32, parent: i32 },
    #[error("restore of process {pid} failed at {stage}: {detail}")]
    Restore {
        pid: i32,
        stage: &'static str,
        detail: String,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
}

impl Error {
    pub fn image(path: &Path, source: std::io::Error) -> Error {
        Error::Image {
            path: path.into(),
            source,
        }
    }

    pub fn proc(pid: i32, what: &'static str) -> impl FnOnce(procfs::ProcError) -> Error {
        move |e| Error::Proc {
            pid,
            what,
            detail: e.to_string(),
        }
    }

    pub fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
        let what = what.into();
        move |source| Error::Io { what, source }
    }
}

pub type Result<T> = std::result::Result<T, Error>;
