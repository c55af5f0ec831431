//! The primary's end of the replication link: a connection to the backup
//! used both ways at once.
//!
//! - The writer (thread `rrc-link`, which also makes the connection) sends
//!   what the outbox holds: small messages (log records, net log frames,
//!   heartbeats) first, and checkpoints in pieces between them, so that a
//!   reply's log never waits behind a checkpoint of many megabytes.
//! - The reader (thread `rrc-link-rx`) takes the backup's answers as they
//!   come: log acknowledgements and commits go straight to the
//!   [`AckHandler`] (the release policy, outside this module), everything
//!   else to the container's supervisor as [`LinkEvent`]s.
//!
//! Either side failing ends the connection for both (the wire's halves see
//! to that); the writer then reports the loss and reconnects every second.
//! A backup silent for longer than the timeout (no answer to heartbeats,
//! which go out every `heartbeat` even in the middle of a checkpoint) is
//! lost.

use std::collections::VecDeque;
use std::fs;
use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rrc_wire::{Key, Message, Role, SecureReader, SecureStream, SecureWriter, WireError};

use crate::position::LogPosition;
use crate::shipper::LogSink;
use crate::wake::Waker;

/// Bytes of a checkpoint file sent in one message: small enough that a
/// log message queued behind it waits well under a millisecond.
const CHUNK: usize = 64 << 10;
/// Log data queued for the backup at most; beyond it new data is dropped
/// (the gap it leaves is covered by the next checkpoint).
const MAX_QUEUED: usize = 64 << 20;

#[derive(Clone)]
pub struct LinkConfig {
    pub backup: SocketAddr,
    pub key: Arc<Key>,
    /// This host's name, told to the backup.
    pub node: String,
    /// The replicated service (the container's name), told to the backup.
    pub service: String,
    /// With an arbiter: the term this primary serves under, told to the
    /// backup at each connection (it grows when the primary wins a claim).
    pub term: Option<Arc<AtomicU64>>,
    /// How often the primary says it is alive.
    pub heartbeat: Duration,
    /// How long the backup may stay silent before it counts as gone.
    pub timeout: Duration,
    /// Host identities: this host's, and the backup's public key.
    pub identity: Option<rrc_wire::Identified>,
}

/// Why the link to the backup failed.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("cannot reach the backup at {addr}: {source}")]
    Unreachable {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(
        "the backup at {0} refused us: the key files differ, or (with host identities) it does not accept this host's or is not the backup we were given"
    )]
    KeyMismatch(SocketAddr),
    #[error("handshake with the backup at {addr}: {source}")]
    Handshake { addr: SocketAddr, source: WireError },
    #[error("the backup answered {0} to our hello")]
    NotWelcomed(&'static str),
    #[error("the backup sent a {0} message, which it never should")]
    Unexpected(&'static str),
    #[error("the backup said nothing for {} ms", .0.as_millis())]
    Silent(Duration),
    #[error("the backup left: {0}")]
    Left(String),
    #[error("{0}")]
    Wire(#[from] WireError),
    #[error("checkpoint {epoch}: {}: {source}", path.display())]
    Checkpoint {
        epoch: u64,
        path: PathBuf,
        source: std::io::Error,
    },
}

/// A checkpoint to send.
pub struct Job {
    pub series: String,
    pub epoch: u64,
    pub parent: Option<u64>,
    pub dir: PathBuf,
}

#[derive(Debug)]
pub enum LinkEvent {
    /// A backup accepted us.
    Connected(String),
    /// No backup could be reached (the first failure of a run of them).
    Unreachable(LinkError),
    /// Checkpoint `epoch` has been sent whole.
    Sent { epoch: u64, bytes: u64 },
    /// The backup committed checkpoint `epoch`.
    Committed { epoch: u64 },
    /// The backup cannot use what we sent: start a new series.
    NeedFull(String),
    /// The backup cannot keep checkpoints at all (its own fault: a full
    /// disk): the service is unprotected until a full one commits.
    BackupFault(String),
    /// The connection to the backup is gone.
    Lost(LinkError),
    /// The backup was told to let go of the service ([`Link::dismiss`]):
    /// `let_go` once it closed its end after reading that (it holds nothing
    /// it would take over from), false if it did not within the link's
    /// timeout (the connection was cut: as good as lost). The link connects
    /// again after a while.
    Dismissed { let_go: bool },
}

/// The release policy's side of the backup's answers. Called on the
/// reader's thread as each answer arrives.
pub trait AckHandler: Send + Sync {
    /// The backup holds the log up to `pos`.
    fn log_acked(&self, pos: LogPosition);
    /// The backup committed checkpoint `epoch`.
    fn committed(&self, epoch: u64);
}

#[derive(Default)]
struct Queue {
    connected: bool,
    stop: bool,
    /// Tell the backup to let go, for this reason.
    dismiss: Option<String>,
    small: VecDeque<Message>,
    small_bytes: usize,
    dropped: u64,
    jobs: VecDeque<Job>,
}

/// What waits to be sent to the backup. The log shipper fills it from any
/// thread; the link's writer empties it. A small message that nothing
/// waits before, and that finds the connection free, goes out at once on
/// the sender's own thread: waking the writer's thread would cost a
/// reply tens of microseconds.
#[derive(Default)]
pub struct Outbox {
    q: Mutex<Queue>,
    cv: Condvar,
    /// The connection's sending half, while there is one. Taken before the
    /// queue whenever both are (the order of messages depends on it).
    writer: Mutex<Option<SecureWriter>>,
}

impl Outbox {
    pub fn new() -> Arc<Outbox> {
        Arc::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        crate::lock(&self.q)
    }

    fn lock_writer(&self) -> std::sync::MutexGuard<'_, Option<SecureWriter>> {
        crate::lock(&self.writer)
    }

    fn push_small(&self, msgs: Vec<Message>, bytes: usize) {
        if let Ok(mut w) = self.writer.try_lock()
            && let Some(writer) = w.as_mut()
        {
            let q = self.lock();
            if q.connected && q.small.is_empty() {
                drop(q);
                // A failure ends the connection: its reader sees it, and
                // the writer's thread reports it.
                let _ = writer.send_all(&msgs);
                return;
            }
        }
        let mut q = self.lock();
        if !q.connected {
            // A backup that connects later starts from a checkpoint taken
            // after it did.
            return;
        }
        if q.small_bytes + bytes > MAX_QUEUED {
            q.dropped += 1;
            if q.dropped.is_power_of_two() {
                tracing::warn!(
                    dropped = q.dropped,
                    "the backup takes the log more slowly than it comes; log data dropped (a checkpoint covers it)"
                );
            }
            return;
        }
        q.small_bytes += bytes;
        q.small.extend(msgs);
        drop(q);
        self.cv.notify_one();
    }

    /// Queues a checkpoint (or drops it, without a backup).
    pub fn send_checkpoint(&self, job: Job) {
        let mut q = self.lock();
        if !q.connected {
            drop(q);
            let _ = fs::remove_dir_all(&job.dir);
            return;
        }
        q.jobs.push_back(job);
        drop(q);
        self.cv.notify_one();
    }
}

impl LogSink for Outbox {
    fn send_log(&self, first: u64, frames: Vec<Vec<u8>>, records: Vec<Vec<u8>>) {
        let mut bytes = 0;
        let mut msgs = Vec::with_capacity(1 + records.len());
        if !frames.is_empty() {
            bytes += frames.iter().map(Vec::len).sum::<usize>() + 4 * frames.len();
            msgs.push(Message::NetLog { first, frames });
        }
        for data in records {
            bytes += data.len();
            msgs.push(Message::Log { data });
        }
        self.push_small(msgs, bytes);
    }
}

pub struct Link {
    outbox: Arc<Outbox>,
    events: Receiver<LinkEvent>,
    thread: Option<JoinHandle<()>>,
}

struct Side {
    cfg: LinkConfig,
    outbox: Arc<Outbox>,
    acks: Arc<dyn AckHandler>,
    events: Sender<LinkEvent>,
    wake: Waker,
}

impl Side {
    fn tell(&self, e: LinkEvent) {
        let _ = self.events.send(e);
        self.wake.wake();
    }
}

impl Link {
    /// Starts connecting to the backup; events are told through `wake`.
    pub fn start(
        cfg: LinkConfig,
        outbox: Arc<Outbox>,
        acks: Arc<dyn AckHandler>,
        wake: Waker,
    ) -> std::io::Result<Link> {
        let (ev_tx, ev_rx) = mpsc::channel();
        let side = Side {
            cfg,
            outbox: outbox.clone(),
            acks,
            events: ev_tx,
            wake,
        };
        let thread = std::thread::Builder::new()
            .name("rrc-link".into())
            .spawn(move || run(side))?;
        Ok(Link {
            outbox,
            events: ev_rx,
            thread: Some(thread),
        })
    }

    pub fn send(&self, job: Job) {
        self.outbox.send_checkpoint(job);
    }

    /// Events so far.
    pub fn events(&self) -> Vec<LinkEvent> {
        self.events.try_iter().collect()
    }

    /// Tells the backup to let go of the service (it is too slow to
    /// protect it): a goodbye, after which it takes nothing over from what
    /// it holds. [`LinkEvent::Dismissed`] says how that went.
    pub fn dismiss(&self, reason: &str) {
        self.outbox.lock().dismiss = Some(reason.to_string());
        self.outbox.cv.notify_all();
    }

    /// Says goodbye to the backup (a clean stop is not a failure) and ends
    /// the link's threads.
    pub fn stop(&mut self) {
        self.outbox.lock().stop = true;
        self.outbox.cv.notify_all();
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

/// Connects, serves, reconnects, until stopped.
fn run(side: Side) {
    let mut reported_unreachable = false;
    loop {
        if side.outbox.lock().stop {
            return;
        }
        let stream = match connect(&side.cfg) {
            Ok(s) => s,
            Err(e) => {
                if !reported_unreachable {
                    side.tell(LinkEvent::Unreachable(e));
                    reported_unreachable = true;
                }
                if wait_stop(&side.outbox, Duration::from_secs(1)) {
                    return;
                }
                continue;
            }
        };
        reported_unreachable = false;
        let (reader, writer) = stream.split();
        *side.outbox.lock_writer() = Some(writer);
        {
            let mut q = side.outbox.lock();
            q.connected = true;
            q.dismiss = None;
            q.small.clear();
            q.small_bytes = 0;
        }
        side.tell(LinkEvent::Connected(side.cfg.backup.to_string()));
        let failed = Arc::new(AtomicBool::new(false));
        let rx = {
            let acks = side.acks.clone();
            let events = side.events.clone();
            let wake = side.wake.clone();
            let outbox = side.outbox.clone();
            let failed = failed.clone();
            let timeout = side.cfg.timeout;
            std::thread::Builder::new()
                .name("rrc-link-rx".into())
                .spawn(move || {
                    let r = read_answers(reader, timeout, &*acks, &events, &wake);
                    failed.store(true, Ordering::Release);
                    outbox.cv.notify_all();
                    r
                })
        };
        let result = match rx {
            Ok(rx) => {
                let sent = write_loop(&side, &failed);
                let read = rx.join().unwrap_or(Ok(()));
                // The reader's reason is the first cause when it failed.
                match (sent, read) {
                    // Let go only if the backup closed its end, not if
                    // our reader gave up on it.
                    (Ok(WriteEnd::Dismissed { let_go }), read) => Ok(WriteEnd::Dismissed {
                        let_go: let_go && read.is_ok(),
                    }),
                    (Ok(end), _) => Ok(end),
                    (Err(_), Err(e)) => Err(e),
                    (Err(e), Ok(())) => Err(e),
                }
            }
            Err(e) => Err(LinkError::Wire(WireError::Io(e))),
        };
        let writer = side.outbox.lock_writer().take();
        drop(writer);
        let jobs: Vec<Job> = {
            let mut q = side.outbox.lock();
            q.connected = false;
            q.small.clear();
            q.small_bytes = 0;
            q.jobs.drain(..).collect()
        };
        for j in jobs {
            let _ = fs::remove_dir_all(&j.dir);
        }
        match result {
            Ok(WriteEnd::Stopped) => return,
            Ok(WriteEnd::Dismissed { let_go }) => {
                side.tell(LinkEvent::Dismissed { let_go });
                if wait_stop(&side.outbox, DISMISSED_FOR) {
                    return;
                }
            }
            Err(e) => {
                side.tell(LinkEvent::Lost(e));
                if wait_stop(&side.outbox, Duration::from_millis(200)) {
                    return;
                }
            }
        }
    }
}

/// How long a dismissed backup is left alone before the link connects
/// again (it may have caught up: a full checkpoint then protects the
/// service again).
const DISMISSED_FOR: Duration = Duration::from_secs(1);

/// How the writer ended without failing.
enum WriteEnd {
    /// Stopped, after saying goodbye.
    Stopped,
    /// After telling the backup to let go (see [`LinkEvent::Dismissed`]).
    Dismissed { let_go: bool },
}

/// Waits `d` or until stopped; true if stopped.
fn wait_stop(outbox: &Outbox, d: Duration) -> bool {
    let q = outbox.lock();
    let (q, _) = outbox
        .cv
        .wait_timeout_while(q, d, |q| !q.stop)
        .unwrap_or_else(|p| p.into_inner());
    q.stop
}

fn connect(cfg: &LinkConfig) -> Result<SecureStream, LinkError> {
    let addr = cfg.backup;
    let tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(1))
        .map_err(|source| LinkError::Unreachable { addr, source })?;
    let _ = tcp.set_nodelay(true);
    let sc = rrc_wire::SecureConfig {
        identity: cfg.identity.clone(),
        ..crate::link_security()
    };
    let mut s = SecureStream::client_with(tcp, &cfg.key, &sc).map_err(|e| match e {
        WireError::Authentication(_) => LinkError::KeyMismatch(addr),
        source => LinkError::Handshake { addr, source },
    })?;
    s.send(&Message::Hello {
        role: Role::Primary,
        node: cfg.node.clone(),
        service: cfg.service.clone(),
        term: cfg.term.as_ref().map(|t| t.load(Ordering::Acquire)),
    })?;
    s.set_read_timeout(Some(cfg.timeout))?;
    s.set_write_timeout(Some(cfg.timeout))?;
    match s.recv()? {
        Message::Welcome { .. } => Ok(s),
        other => Err(LinkError::NotWelcomed(other.message_type().name())),
    }
}

/// The reader: the backup's answers until the connection ends.
fn read_answers(
    mut r: SecureReader,
    timeout: Duration,
    acks: &dyn AckHandler,
    events: &Sender<LinkEvent>,
    wake: &Waker,
) -> Result<(), LinkError> {
    r.set_read_timeout(Some(timeout))?;
    loop {
        let msg = match r.recv_polling(crate::POLL_SPIN) {
            Ok(m) => m,
            Err(WireError::Timeout) => return Err(LinkError::Silent(timeout)),
            // Our own writer ended the connection (a clean stop, or it
            // failed and says why).
            Err(WireError::OtherHalfFailed { .. }) | Err(WireError::Closed) => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        match msg {
            Message::HeartbeatAck { .. } => {}
            Message::LogAck { records, net } => acks.log_acked(LogPosition { records, net }),
            Message::Committed { epoch } => {
                acks.committed(epoch);
                let _ = events.send(LinkEvent::Committed { epoch });
                wake.wake();
            }
            Message::NeedFull { reason } => {
                let _ = events.send(LinkEvent::NeedFull(reason));
                wake.wake();
            }
            Message::BackupError { reason } => {
                let _ = events.send(LinkEvent::BackupFault(reason));
                wake.wake();
            }
            Message::Bye { reason } => return Err(LinkError::Left(reason)),
            other => return Err(LinkError::Unexpected(other.message_type().name())),
        }
    }
}

/// The writer: the outbox's messages, checkpoints in pieces between them,
/// heartbeats; until stopped or the backup dismissed (Ok, after saying
/// goodbye) or failed.
fn write_loop(side: &Side, reader_failed: &AtomicBool) -> Result<WriteEnd, LinkError> {
    let heartbeat = side.cfg.heartbeat;
    let mut last_beat = Instant::now() - heartbeat;
    let mut current: Option<Pieces> = None;
    loop {
        // Wait for work without holding the connection: small messages
        // may go straight out meanwhile.
        {
            let q = side.outbox.lock();
            let wait = if current.is_some() {
                Duration::ZERO
            } else {
                heartbeat.saturating_sub(last_beat.elapsed())
            };
            let _ = side
                .outbox
                .cv
                .wait_timeout_while(q, wait, |q| {
                    q.small.is_empty()
                        && q.jobs.is_empty()
                        && !q.stop
                        && q.dismiss.is_none()
                        && !reader_failed.load(Ordering::Acquire)
                })
                .unwrap_or_else(|p| p.into_inner());
        }
        if reader_failed.load(Ordering::Acquire) {
            return Err(LinkError::Left("the connection ended".into()));
        }
        let mut guard = side.outbox.lock_writer();
        let Some(w) = guard.as_mut() else {
            return Err(LinkError::Left("the connection ended".into()));
        };
        let (small, job, stop, dismiss) = {
            let mut q = side.outbox.lock();
            q.small_bytes = 0;
            let small: Vec<Message> = q.small.drain(..).collect();
            let job = if current.is_none() {
                q.jobs.pop_front()
            } else {
                None
            };
            (small, job, q.stop, q.dismiss.take())
        };
        if !small.is_empty() {
            w.send_all(&small)?;
        }
        if stop {
            let _ = w.send(&Message::Bye {
                reason: "the primary stops".into(),
            });
            if let Some(w) = guard.take() {
                let _ = w.shutdown();
            }
            return Ok(WriteEnd::Stopped);
        }
        if let Some(reason) = dismiss {
            // A checkpoint half sent stays half sent: the backup drops it
            // with the session.
            w.send(&Message::Bye { reason })?;
            let mut w = guard.take().expect("checked above");
            drop(guard);
            // The backup closes its end once it has read the goodbye; our
            // reader then ends. Not within the timeout: cut.
            let let_go = wait_reader(side, reader_failed, side.cfg.timeout);
            w.abort("the backup was dismissed");
            return Ok(WriteEnd::Dismissed { let_go });
        }
        if last_beat.elapsed() >= heartbeat {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0);
            w.send(&Message::Heartbeat { sent_unix_ns: now })?;
            last_beat = Instant::now();
        }
        if let Some(job) = job {
            current = Some(Pieces::of(job)?);
        }
        if let Some(p) = &mut current {
            match p.next()? {
                Some(msg) => w.send(&msg)?,
                None => {
                    let p = current.take().expect("some");
                    let _ = fs::remove_dir_all(&p.job.dir);
                    side.tell(LinkEvent::Sent {
                        epoch: p.job.epoch,
                        bytes: p.total,
                    });
                }
            }
        }
    }
}

/// Waits up to `within` for the reader to end; whether it did.
fn wait_reader(side: &Side, reader_failed: &AtomicBool, within: Duration) -> bool {
    let q = side.outbox.lock();
    let _ = side
        .outbox
        .cv
        .wait_timeout_while(q, within, |_| !reader_failed.load(Ordering::Acquire))
        .unwrap_or_else(|p| p.into_inner());
    reader_failed.load(Ordering::Acquire)
}

/// A checkpoint being sent, one message at a time: its announcement, each
/// file in chunks (the manifest last: it names everything else), the end.
struct Pieces {
    job: Job,
    files: Vec<(String, u64)>,
    total: u64,
    began: bool,
    /// The file being sent and how far.
    at: usize,
    offset: u64,
    open: Option<fs::File>,
    buf: Vec<u8>,
    done: bool,
}

impl Pieces {
    fn of(job: Job) -> Result<Pieces, LinkError> {
        let io = |source, path: &std::path::Path| LinkError::Checkpoint {
            epoch: job.epoch,
            path: path.to_path_buf(),
            source,
        };
        let mut files = Vec::new();
        for e in fs::read_dir(&job.dir).map_err(|e| io(e, &job.dir))? {
            let e = e.map_err(|e| io(e, &job.dir))?;
            let len = e.metadata().map_err(|x| io(x, &e.path()))?.len();
            files.push((e.file_name().to_string_lossy().into_owned(), len));
        }
        files.sort_by_key(|(n, _)| (n == "manifest.json", n.clone()));
        let total = files.iter().map(|(_, l)| l).sum();
        Ok(Pieces {
            job,
            files,
            total,
            began: false,
            at: 0,
            offset: 0,
            open: None,
            buf: vec![0; CHUNK],
            done: false,
        })
    }

    /// The next message, or None once the end was sent.
    fn next(&mut self) -> Result<Option<Message>, LinkError> {
        if self.done {
            return Ok(None);
        }
        let epoch = self.job.epoch;
        if !self.began {
            self.began = true;
            return Ok(Some(Message::DeltaBegin {
                series: self.job.series.clone(),
                epoch,
                parent: self.job.parent,
                files: self.files.len() as u32,
                total_bytes: self.total,
            }));
        }
        let Some((name, len)) = self.files.get(self.at).cloned() else {
            self.done = true;
            return Ok(Some(Message::DeltaEnd {
                epoch,
                files: self.files.len() as u32,
                total_bytes: self.total,
            }));
        };
        let path = self.job.dir.join(&name);
        let io = |source| LinkError::Checkpoint {
            epoch,
            path: path.clone(),
            source,
        };
        if self.open.is_none() {
            self.open = Some(fs::File::open(&path).map_err(io)?);
            self.offset = 0;
        }
        let f = self.open.as_mut().expect("opened above");
        let want = (len - self.offset.min(len)).min(CHUNK as u64) as usize;
        f.read_exact(&mut self.buf[..want]).map_err(io)?;
        let msg = Message::FileChunk {
            epoch,
            name,
            offset: self.offset,
            data: self.buf[..want].to_vec(),
        };
        // Every file, even an empty one, is announced by one chunk.
        self.offset += want as u64;
        if self.offset >= len {
            self.open = None;
            self.at += 1;
        }
        Ok(Some(msg))
    }
}

/// Sends the checkpoint in `dir` whole on `s` (its announcement, every
/// file, the end) and returns its size in bytes: for a peer that only
/// sends checkpoints.
pub fn send_checkpoint(
    s: &mut SecureStream,
    series: &str,
    epoch: u64,
    parent: Option<u64>,
    dir: &std::path::Path,
) -> Result<u64, LinkError> {
    let mut p = Pieces::of(Job {
        series: series.to_string(),
        epoch,
        parent,
        dir: dir.to_path_buf(),
    })?;
    while let Some(m) = p.next()? {
        s.send(&m)?;
    }
    Ok(p.total)
}
