//! The primary's end of the replication link: a thread that keeps a
//! connection to the backup, sends it each checkpoint, releases the frames
//! a checkpoint covers once the backup has committed it, and keeps the
//! backup aware of the primary with heartbeats in between. It tells the
//! container's supervisor what happened through a channel and a wake-up
//! socket the supervisor polls.

use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rrc_wire::{Key, Message, Role, SecureStream, WireError};

use crate::gate::ReplicationGate;

/// Bytes of a file sent in one message.
const CHUNK: usize = 1 << 20;

#[derive(Clone)]
pub struct LinkConfig {
    pub backup: SocketAddr,
    pub key: Arc<Key>,
    /// This host's name, told to the backup.
    pub node: String,
    /// How often an idle link says it is alive.
    pub heartbeat: Duration,
    /// How long without an answer the backup counts as gone.
    pub timeout: Duration,
}

/// A checkpoint to send.
pub struct Job {
    pub series: String,
    pub epoch: u64,
    pub parent: Option<u64>,
    pub dir: PathBuf,
    /// The gate's mark when it was taken.
    pub boundary: u64,
}

#[derive(Debug, Clone)]
pub enum LinkEvent {
    /// A backup accepted us.
    Connected(String),
    /// No backup could be reached (the first failure of a run of them).
    Unreachable(String),
    /// The backup committed checkpoint `epoch`.
    Committed {
        epoch: u64,
        bytes: u64,
        took: Duration,
    },
    /// The backup cannot apply what we sent: start a new series.
    NeedFull(String),
    /// The connection to the backup is gone.
    Lost(String),
}

pub struct Link {
    jobs: Option<Sender<Job>>,
    events: Receiver<LinkEvent>,
    wake: UnixStream,
    thread: Option<JoinHandle<()>>,
}

struct Side {
    cfg: LinkConfig,
    gate: Arc<ReplicationGate>,
    events: Sender<LinkEvent>,
    wake: UnixStream,
}

impl Side {
    fn tell(&self, e: LinkEvent) {
        let _ = self.events.send(e);
        let _ = (&self.wake).write(&[1]);
    }
}

fn lost(e: WireError) -> String {
    e.to_string()
}

impl Link {
    pub fn start(cfg: LinkConfig, gate: Arc<ReplicationGate>) -> std::io::Result<Link> {
        let (jobs_tx, jobs_rx) = mpsc::channel();
        let (ev_tx, ev_rx) = mpsc::channel();
        let (ours, theirs) = UnixStream::pair()?;
        ours.set_nonblocking(true)?;
        let side = Side {
            cfg,
            gate,
            events: ev_tx,
            wake: theirs,
        };
        let thread = std::thread::Builder::new()
            .name("rrc-link".into())
            .spawn(move || run(side, jobs_rx))?;
        Ok(Link {
            jobs: Some(jobs_tx),
            events: ev_rx,
            wake: ours,
            thread: Some(thread),
        })
    }

    /// Readable when events are waiting.
    pub fn wake_fd(&self) -> BorrowedFd<'_> {
        self.wake.as_fd()
    }

    pub fn send(&self, job: Job) {
        if let Some(j) = &self.jobs {
            let _ = j.send(job);
        }
    }

    /// Events so far.
    pub fn events(&self) -> Vec<LinkEvent> {
        let mut buf = [0u8; 64];
        while matches!((&self.wake).read(&mut buf), Ok(n) if n > 0) {}
        self.events.try_iter().collect()
    }

    /// Says goodbye to the backup (a clean stop is not a failure) and ends
    /// the thread.
    pub fn stop(&mut self) {
        self.jobs = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.stop();
    }
}

fn run(side: Side, jobs: Receiver<Job>) {
    let mut reported_unreachable = false;
    loop {
        let mut stream = match connect(&side.cfg) {
            Ok(s) => s,
            Err(e) => {
                if !reported_unreachable {
                    side.tell(LinkEvent::Unreachable(e));
                    reported_unreachable = true;
                }
                // Checkpoints taken meanwhile are of no use to a backup
                // that will start from a full one.
                if drain(&jobs, Duration::from_secs(1)) {
                    return;
                }
                continue;
            }
        };
        reported_unreachable = false;
        side.tell(LinkEvent::Connected(side.cfg.backup.to_string()));
        match serve(&side, &mut stream, &jobs) {
            Ok(()) => {
                let _ = stream.send(&Message::Bye {
                    reason: "the primary stops".into(),
                });
                return;
            }
            Err(e) => {
                side.tell(LinkEvent::Lost(e));
                if drain(&jobs, Duration::from_millis(200)) {
                    return;
                }
            }
        }
    }
}

/// Discards queued jobs (removing their directories) for a while; true
/// once the supervisor has hung up.
fn drain(jobs: &Receiver<Job>, wait: Duration) -> bool {
    let until = Instant::now() + wait;
    loop {
        match jobs.recv_timeout(until.saturating_duration_since(Instant::now())) {
            Ok(job) => {
                let _ = fs::remove_dir_all(&job.dir);
            }
            Err(RecvTimeoutError::Timeout) => return false,
            Err(RecvTimeoutError::Disconnected) => return true,
        }
    }
}

fn connect(cfg: &LinkConfig) -> Result<SecureStream, String> {
    let tcp = TcpStream::connect_timeout(&cfg.backup, Duration::from_secs(1))
        .map_err(|e| format!("cannot reach the backup at {}: {e}", cfg.backup))?;
    let _ = tcp.set_nodelay(true);
    let sc = crate::link_security();
    let mut s = SecureStream::client_with(tcp, &cfg.key, &sc).map_err(|e| match e {
        WireError::Authentication(_) => format!(
            "the backup at {} refused us: the key files differ",
            cfg.backup
        ),
        e => format!("handshake with the backup at {}: {e}", cfg.backup),
    })?;
    s.send(&Message::Hello {
        role: Role::Primary,
        node: cfg.node.clone(),
    })
    .map_err(lost)?;
    s.set_read_timeout(Some(cfg.timeout)).map_err(lost)?;
    match s.recv().map_err(lost)? {
        Message::Welcome { .. } => Ok(s),
        other => Err(format!("the backup answered {other:?} to our hello")),
    }
}

/// Sends checkpoints and heartbeats until the supervisor hangs up (Ok) or
/// the link fails (Err).
fn serve(side: &Side, s: &mut SecureStream, jobs: &Receiver<Job>) -> Result<(), String> {
    loop {
        match jobs.recv_timeout(side.cfg.heartbeat) {
            Ok(job) => {
                let r = send_job(side, s, &job);
                let _ = fs::remove_dir_all(&job.dir);
                r?;
            }
            Err(RecvTimeoutError::Timeout) => {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(0);
                s.send(&Message::Heartbeat { sent_unix_ns: now })
                    .map_err(lost)?;
                s.set_read_timeout(Some(side.cfg.timeout)).map_err(lost)?;
                match s.recv().map_err(lost)? {
                    Message::HeartbeatAck { .. } => {}
                    other => return Err(format!("unexpected {other:?} from the backup")),
                }
            }
            Err(RecvTimeoutError::Disconnected) => return Ok(()),
        }
    }
}

/// Sends the checkpoint in `dir` (every file, the manifest last); returns
/// its size in bytes.
pub fn send_checkpoint(
    s: &mut SecureStream,
    series: &str,
    epoch: u64,
    parent: Option<u64>,
    dir: &std::path::Path,
) -> Result<u64, String> {
    let mut files: Vec<(String, u64)> = fs::read_dir(dir)
        .map_err(|e| format!("checkpoint {epoch}: {e}"))?
        .flatten()
        .filter_map(|e| {
            let len = e.metadata().ok()?.len();
            Some((e.file_name().to_string_lossy().into_owned(), len))
        })
        .collect();
    // The manifest last: it names everything else.
    files.sort_by_key(|(n, _)| (n == "manifest.json", n.clone()));
    let total: u64 = files.iter().map(|(_, l)| l).sum();
    s.send(&Message::DeltaBegin {
        series: series.to_string(),
        epoch,
        parent,
        files: files.len() as u32,
        total_bytes: total,
    })
    .map_err(lost)?;
    let mut buf = vec![0u8; CHUNK];
    for (name, len) in &files {
        let mut f = fs::File::open(dir.join(name))
            .map_err(|e| format!("checkpoint {epoch}: {name}: {e}"))?;
        let mut offset = 0u64;
        loop {
            let n = f
                .read(&mut buf)
                .map_err(|e| format!("checkpoint {epoch}: {name}: {e}"))?;
            // Every file, even an empty one, is announced by one chunk.
            if n == 0 && offset > 0 {
                break;
            }
            s.send(&Message::FileChunk {
                epoch,
                name: name.clone(),
                offset,
                data: buf[..n].to_vec(),
            })
            .map_err(lost)?;
            offset += n as u64;
            if n == 0 || offset >= *len {
                break;
            }
        }
    }
    s.send(&Message::DeltaEnd {
        epoch,
        files: files.len() as u32,
        total_bytes: total,
    })
    .map_err(lost)?;
    Ok(total)
}

fn send_job(side: &Side, s: &mut SecureStream, job: &Job) -> Result<(), String> {
    let started = Instant::now();
    let total = send_checkpoint(s, &job.series, job.epoch, job.parent, &job.dir)?;
    // Applying takes time with the size (checksums are checked first).
    let wait = side.cfg.timeout + Duration::from_millis(total / (50 << 10));
    s.set_read_timeout(Some(wait)).map_err(lost)?;
    loop {
        match s.recv().map_err(lost)? {
            Message::Committed { epoch } if epoch == job.epoch => {
                side.gate.committed(job.boundary);
                side.tell(LinkEvent::Committed {
                    epoch,
                    bytes: total,
                    took: started.elapsed(),
                });
                return Ok(());
            }
            Message::HeartbeatAck { .. } => {}
            Message::NeedFull { reason } => {
                side.tell(LinkEvent::NeedFull(reason));
                return Ok(());
            }
            other => return Err(format!("unexpected {other:?} from the backup")),
        }
    }
}
