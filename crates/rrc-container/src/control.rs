//! The supervisor's control socket: how `rrc checkpoint NAME` asks the rrc
//! process that holds a container to checkpoint it (only that process can
//! cut the container's network while its TCP state is read).
//!
//! A unix socket in the container's state directory (which only root may
//! enter: nobody else can reach the socket, or bind one there first to
//! make `rrc run` fail or to answer in its place), one JSON request and
//! one JSON response per connection. Each end checks the other's
//! credentials: the rrc process answers root only, and the asker talks to
//! a socket held by root only.

use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsFd;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::spec::ContainerName;
use crate::state::HostState;
use crate::{Error, Result};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Request {
    Checkpoint {
        images: PathBuf,
        leave_running: bool,
    },
    /// Incremental checkpoints every `every_us` into the series directory
    /// `dir`, until `count` are taken or `for_us` has passed (or the asker
    /// goes away); one [`Response::Epoch`] per checkpoint, then
    /// [`Response::SeriesDone`].
    Series {
        dir: PathBuf,
        every_us: u64,
        count: Option<u64>,
        for_us: Option<u64>,
        keep_deltas: bool,
        copy: CopyChoice,
    },
    /// What the work running beside the container says of itself.
    Status,
}

/// When the pages of an incremental checkpoint are copied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CopyChoice {
    Auto,
    Direct,
    Snapshot,
}

impl From<CopyChoice> for rrc_ckpt::incremental::CopyMode {
    fn from(c: CopyChoice) -> Self {
        match c {
            CopyChoice::Auto => Self::Auto,
            CopyChoice::Direct => Self::Direct,
            CopyChoice::Snapshot => Self::Snapshot,
        }
    }
}

/// One checkpoint of a series, as reported to whoever asked for it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EpochLine {
    pub epoch: u64,
    pub full: bool,
    pub pause_us: u64,
    pub scan_us: u64,
    pub copy_us: u64,
    pub snapshot_us: u64,
    pub total_us: u64,
    pub cpu_us: u64,
    pub dirty_bytes: u64,
    pub snapshots: usize,
    pub direct: usize,
    /// Applying it onto the series' image, when that was done.
    pub apply_us: Option<u64>,
}

impl EpochLine {
    pub fn of(
        r: &rrc_ckpt::incremental::EpochReport,
        applied: Option<&rrc_ckpt::store::ApplyReport>,
    ) -> EpochLine {
        EpochLine {
            epoch: r.lineage.epoch,
            full: r.full,
            pause_us: r.checkpoint.frozen.as_micros() as u64,
            scan_us: r.scan.as_micros() as u64,
            copy_us: r.copy.as_micros() as u64,
            snapshot_us: r.snapshot.as_micros() as u64,
            total_us: r.checkpoint.total.as_micros() as u64,
            cpu_us: r.cpu.as_micros() as u64,
            dirty_bytes: r.dirty_bytes,
            snapshots: r.snapshots,
            direct: r.direct,
            apply_us: applied.map(|a| a.took.as_micros() as u64),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Response {
    Checkpointed {
        processes: usize,
        threads: usize,
        memory_bytes: u64,
        image_bytes: u64,
        stopped_us: u64,
        total_us: u64,
        sockets_us: u64,
        killed: bool,
    },
    Epoch(EpochLine),
    /// A checkpoint of a series failed; the series goes on (the next
    /// checkpoint saves every process whole).
    EpochFailed(String),
    SeriesDone {
        epochs: u64,
        error: Option<String>,
    },
    /// Each companion's status, by name.
    Status(std::collections::BTreeMap<String, serde_json::Value>),
    Failed(String),
}

/// The socket address of container `name` on `host`.
fn address(host: &HostState, name: &ContainerName) -> Result<(PathBuf, SocketAddr)> {
    let path = host.control_path(name);
    let addr = SocketAddr::from_pathname(&path).map_err(|e| Error::Setup {
        stage: "control socket address",
        source: std::io::Error::new(
            e.kind(),
            format!(
                "{} is too long for a socket's path (a shorter RRC_STATE_DIR?)",
                path.display()
            ),
        ),
    })?;
    Ok((path, addr))
}

/// The uid of the process at the other end of `stream`.
fn peer_uid(stream: &UnixStream) -> Option<u32> {
    nix::sys::socket::getsockopt(stream, nix::sys::socket::sockopt::PeerCredentials)
        .ok()
        .map(|c| c.uid())
}

/// Connects to the rrc process holding container `name`, if root holds
/// the socket.
fn connect(host: &HostState, name: &ContainerName) -> Result<UnixStream> {
    let (_, addr) = address(host, name)?;
    let stream = UnixStream::connect_addr(&addr).map_err(|e| Error::Setup {
        stage: "reach the container's rrc process",
        source: e,
    })?;
    match peer_uid(&stream) {
        Some(0) => Ok(stream),
        other => Err(Error::Setup {
            stage: "reach the container's rrc process",
            source: std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                format!(
                    "the control socket of container {name} is held by uid {}, not root: refused",
                    other.map_or("unknown".into(), |u| u.to_string())
                ),
            ),
        }),
    }
}

pub struct ControlSocket {
    listener: UnixListener,
}

impl ControlSocket {
    /// Binds the control socket of container `name`, whose state
    /// directory this process has claimed (a socket file left there by a
    /// killed rrc process of the same name is replaced).
    pub fn bind(host: &HostState, name: &ContainerName) -> Result<ControlSocket> {
        let (path, addr) = address(host, name)?;
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(Error::Setup {
                    stage: "control socket",
                    source: e,
                });
            }
        }
        let listener = UnixListener::bind_addr(&addr).map_err(|e| Error::Setup {
            stage: "control socket",
            source: e,
        })?;
        listener
            .set_nonblocking(true)
            .map_err(crate::setup_err("control socket"))?;
        Ok(ControlSocket { listener })
    }

    pub fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.listener.as_fd()
    }

    /// The next pending request from root, with the stream to answer on.
    pub fn accept(&self) -> Option<(Request, UnixStream)> {
        let (stream, _) = self.listener.accept().ok()?;
        let uid = peer_uid(&stream)?;
        if uid != 0 {
            tracing::warn!(uid, "control request from a non-root process refused");
            return None;
        }
        stream.set_nonblocking(false).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        let mut line = String::new();
        BufReader::new(&stream).read_line(&mut line).ok()?;
        let req = serde_json::from_str(&line).ok()?;
        Some((req, stream))
    }
}

pub fn answer(stream: UnixStream, resp: &Response) {
    send(&stream, resp);
}

/// Sends one answer line; false once the asker has gone away.
pub fn send(stream: &UnixStream, resp: &Response) -> bool {
    let mut text = serde_json::to_string(resp).expect("responses serialize");
    text.push('\n');
    // MSG_NOSIGNAL: a client that went away must not take the supervisor
    // (and its container) down with SIGPIPE.
    nix::sys::socket::send(
        std::os::fd::AsRawFd::as_raw_fd(stream),
        text.as_bytes(),
        nix::sys::socket::MsgFlags::MSG_NOSIGNAL,
    )
    .is_ok_and(|n| n == text.len())
}

/// Sends `req` and hands every answer line to `each` until it returns
/// false or the other side closes; returns the last answer.
pub fn request_stream(
    host: &HostState,
    name: &ContainerName,
    req: &Request,
    mut each: impl FnMut(&Response) -> bool,
) -> Result<Option<Response>> {
    let stream = connect(host, name)?;
    let mut text = serde_json::to_string(req).expect("requests serialize");
    text.push('\n');
    (&stream)
        .write_all(text.as_bytes())
        .map_err(crate::setup_err("send a request"))?;
    let mut last = None;
    for line in BufReader::new(&stream).lines() {
        let line = line.map_err(crate::setup_err("read the answer"))?;
        let resp: Response = serde_json::from_str(&line).map_err(|e| Error::Setup {
            stage: "read the answer",
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{e}: {line:?}")),
        })?;
        let go_on = each(&resp);
        last = Some(resp);
        if !go_on {
            break;
        }
    }
    Ok(last)
}

/// Sends `req` to the rrc process holding container `name` and waits for
/// its answer (a checkpoint of a large container takes a while).
pub fn request(host: &HostState, name: &ContainerName, req: &Request) -> Result<Response> {
    let stream = connect(host, name)?;
    let mut text = serde_json::to_string(req).expect("requests serialize");
    text.push('\n');
    (&stream)
        .write_all(text.as_bytes())
        .map_err(crate::setup_err("send a request"))?;
    let mut line = String::new();
    BufReader::new(&stream)
        .read_line(&mut line)
        .map_err(crate::setup_err("read the answer"))?;
    serde_json::from_str(&line).map_err(|e| Error::Setup {
        stage: "read the answer",
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{e}: {line:?}")),
    })
}
