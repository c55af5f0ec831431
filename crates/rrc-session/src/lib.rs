//! Record/replay sessions: what rrc does around librrc, the library it
//! preloads into a program to record it or to replay it.
//!
//! - [`recording`]: the rings a recorded program writes its events into,
//!   the environment that makes librrc find them, what a checkpoint of a
//!   recorded container keeps of them, and the recording directory (the
//!   thread logs and what a replay needs beside them), drained there by a
//!   companion of the container.
//! - [`replay`]: a checkpoint image prepared so that the program restored
//!   from it replays a log (the image is edited through
//!   [`rrc_ckpt::edit`]), and a replay from the program's start.
//!
//! What librrc and rrc must agree on (the environment variable, the replay
//! configuration, the capture file) is defined once, in
//! [`rrc_rr::interface`]; the log's format in [`rrc_rr::log`].

pub mod recording;
pub mod replay;
mod sys;

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "{} is statically linked: librrc cannot be preloaded into it, so it cannot be recorded or replayed",
        .0.display()
    )]
    StaticProgram(PathBuf),
    #[error("{} is not a 64-bit ELF program", .0.display())]
    NotElf(PathBuf),
    #[error("{}", .0)]
    NoLibrrc(String),
    #[error("{} is not empty: a recording goes into a new directory", .0.display())]
    NotEmpty(PathBuf),
    #[error("{} is not a recording made by `rrc run --record`: {why}", dir.display())]
    NotARecording { dir: PathBuf, why: String },
    #[error(
        "no process in {} has the recording's rings (descriptor {fd}): is it a checkpoint of the container recorded into the log?",
        images.display()
    )]
    NoRings { images: PathBuf, fd: i32 },
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the recording's rings: {0}")]
    Rings(#[from] rrc_rr::ring::RingError),
    #[error("the recording: {0}")]
    Record(#[from] rrc_rr::agent::AgentError),
    #[error(transparent)]
    Log(#[from] rrc_rr::log::LogError),
    #[error(transparent)]
    Interface(#[from] rrc_rr::interface::InterfaceError),
    #[error(transparent)]
    Image(#[from] rrc_ckpt::Error),
    #[error(transparent)]
    Container(#[from] rrc_container::Error),
    #[error("{0}")]
    InvalidArgument(String),
}

pub type Result<T> = std::result::Result<T, Error>;

/// Wraps an I/O error with what was done and on which path.
pub(crate) fn io(
    what: &'static str,
    path: &std::path::Path,
) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.to_path_buf();
    move |source| Error::Io { what, path, source }
}
