//! A backup's takeover in responsive mode: by replay, with every
//! connection carried over; or, when that fails, from the checkpoint alone
//! with the connections used since it reset.
//!
//! By replay:
//! 1. the last committed checkpoint is marked for replay and restored as
//!    the container (same name, address and MAC), its connections left in
//!    repair mode and its network held (clients' frames wait in the
//!    kernel's queues);
//! 2. the program replays the log to its end (recorded order and timing),
//!    what it writes to its connections captured; each thread parks at its
//!    first call after its log ended;
//! 3. the container's supervisor (a [`Companion`] here) hears from librrc
//!    that the log ended, works out every connection ([`crate::rebuild`]),
//!    builds them, hands them over to be put in place of the old ones at
//!    the same numbers, lets the network go: the program runs live.
//!
//! A divergence, a replay that does not reach the end in time, or a
//! connection that does not check out ends that container; the backup
//! then restores the checkpoint as in checkpoint-only mode, with the
//! connections used after it disconnected (their clients get a reset at
//! their next segment), and says so loudly.

use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use rrc_ckpt::edit::{ImageEdit, WorkingCopy};
use rrc_container::create::Container;
use rrc_container::launch::{Launch, Launched, Source};
use rrc_container::restore::RestoreSpec;
use rrc_container::supervise::Companion;
use rrc_rr::interface::{TAKEOVER_BATCH, TAKEOVER_LINE_MAX, TakeoverLine, parse_capture};
use rrc_rr::ring::RingSet;
use rrc_session::recording::{RecordingAnnotation, Rings};
use rrc_session::replay::{ReplayOptions, prepare};
use serde::{Deserialize, Serialize};

use crate::backup::LogWritten;
use crate::rebuild::{HostTcp, Plan, active_since, log_uses, plan};
use crate::reprotect::{Protect, Recorded};

/// Set (to anything) in the backup's environment: the replay counts its
/// first record as a divergence, so that tests can prove the fallback.
pub const INJECT_DIVERGENCE_ENV: &str = "RRC_TEST_INJECT_DIVERGENCE";

/// How long the replay may take to reach the end of the log.
const REPLAY_LIMIT: Duration = Duration::from_secs(20);
/// How long librrc may take to answer during the exchange.
const EXCHANGE_LIMIT: Duration = Duration::from_secs(5);
/// How far ahead of the clients' last echo the rebuilt connections'
/// timestamps start (ms): the primary ran on after the last segment the
/// backup logged, and a timestamp a client saw must never go backwards.
const TIMESTAMP_LEAD_MS: u32 = 60_000;
/// The MSS this host offers on the container's network (1500-byte MTU).
const OFFERED_MSS: u16 = 1460;

/// How a takeover by replay went.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ReplayOutcome {
    /// The program runs live on its carried-over connections.
    pub live: bool,
    /// Why not, if not.
    pub why: Option<String>,
    /// Restoring the checkpoint marked for replay.
    pub restore_ms: f64,
    /// From the restored program's start to the end of the log.
    pub replay_ms: f64,
    /// Working out, building and putting the connections in place.
    pub rebuild_ms: f64,
    /// Connections carried over from the checkpoint, accepted during the
    /// log (rebuilt from their handshake), closed during the log.
    pub carried: usize,
    pub accepted: usize,
    pub closed: usize,
    /// Handshakes completed during the log that the program had not
    /// accepted: those clients are reset.
    pub unaccepted: usize,
    /// Bytes of the clients' not read yet, and of the program's not
    /// acknowledged yet, put back in the rebuilt connections.
    pub unread: usize,
    pub unacknowledged: usize,
}

/// How the fallback from the checkpoint went.
#[derive(Debug, Clone)]
pub struct Fallback {
    /// The restore's report.
    pub restored: String,
    /// Connections used after the checkpoint, disconnected.
    pub reset: usize,
    pub took: Duration,
}

/// Where a takeover by replay keeps what it needs, under the backup's
/// directory.
struct Paths {
    socket: PathBuf,
    report: PathBuf,
    capture: PathBuf,
}

impl Paths {
    fn under(dir: &Path, log: &Path) -> Paths {
        Paths {
            socket: dir.join("takeover.sock"),
            report: dir.join("takeover.json"),
            capture: log.join("capture"),
        }
    }
}

/// How a takeover brings the container's private memory in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Pages {
    /// Lazily from [`LAZY_FROM`] bytes of memory on, else eagerly.
    #[default]
    Auto,
    /// The program runs once everything but its private memory is in
    /// place, and that memory follows from the image while it runs (the
    /// pages it touches first): the takeover is shorter by most of the
    /// copy, and the program's first touches wait for their pages.
    Lazy,
    /// The whole memory is copied before the program runs.
    Eager,
}

impl Pages {
    pub fn name(self) -> &'static str {
        match self {
            Pages::Auto => "auto",
            Pages::Lazy => "lazy",
            Pages::Eager => "eager",
        }
    }
}

/// Memory from which [`Pages::Auto`] restores lazily. Below it the copy
/// takes a few milliseconds, less than the faults of a program (Memcached
/// with its threads) that touches much of its memory at once in a replay.
pub const LAZY_FROM: u64 = 32 << 20;

/// Where and how a takeover restores the container on this host.
#[derive(Debug, Clone, Default)]
pub struct Restoring {
    /// The host interface the container's frames leave by (else the one
    /// whose subnet holds its address).
    pub uplink: Option<String>,
    pub pages: Pages,
}

impl Restoring {
    /// Whether `image` is restored with lazy pages.
    fn lazy(&self, image: &Path) -> bool {
        match self.pages {
            Pages::Lazy => true,
            Pages::Eager => false,
            Pages::Auto => rrc_ckpt::image::ImageDir::new(image)
                .pages_bytes()
                .is_ok_and(|b| b >= LAZY_FROM),
        }
    }

    /// The restore of `image` (a working copy) as a container, per these
    /// choices.
    fn spec(&self, image: &Path) -> Result<RestoreSpec, String> {
        let mut spec =
            RestoreSpec::from_image(image, None, self.uplink.clone()).map_err(|e| e.to_string())?;
        spec.lazy_pages = self.lazy(image);
        Ok(spec)
    }

    /// As [`Restoring::spec`], for a recorded image restored to run
    /// unrecorded (its log went to the primary's backup, which this host
    /// no longer has); the second value keeps the image copy alive.
    pub(crate) fn unrecorded(
        &self,
        image: &Path,
    ) -> Result<(RestoreSpec, Option<WorkingCopy>), String> {
        let (mut spec, copy) =
            rrc_session::recording::unrecorded_restore(image, None, self.uplink.clone())
                .map_err(|e| e.to_string())?;
        spec.lazy_pages = self.lazy(image);
        Ok((spec, copy))
    }
}

/// Takes over by replay: restores `image` marked for replaying `log` as a
/// container, and waits until it runs live (or failed, the container then
/// gone). Err: it could not be tried at all.
pub fn by_replay(
    image: &Path,
    log: &LogWritten,
    dir: &Path,
    how: &Restoring,
    protect: Option<&Protect>,
) -> Result<(String, ReplayOutcome), String> {
    let paths = Paths::under(dir, &log.dir);
    let _ = std::fs::remove_file(&paths.socket);
    let _ = std::fs::remove_file(&paths.report);
    let listener = UnixListener::bind(&paths.socket)
        .map_err(|e| format!("takeover socket {}: {e}", paths.socket.display()))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| format!("takeover socket: {e}"))?;
    // Nothing recorded since the checkpoint: an empty log still replays
    // (to its end at once), and the connections are rebuilt from the net
    // log alone: the client's data the primary's kernel acknowledged is
    // there and nowhere else.
    if rrc_rr::log::thread_log_ids(&log.dir)
        .map_err(|e| e.to_string())?
        .is_empty()
    {
        let empty = rrc_rr::log::log_file_path(&log.dir, 1);
        std::fs::write(&empty, b"").map_err(|e| format!("{}: {e}", empty.display()))?;
    }
    let opts = ReplayOptions {
        capture: Some(paths.capture.clone()),
        takeover: Some(paths.socket.clone()),
        inject_divergence: std::env::var_os(INJECT_DIVERGENCE_ENV).is_some(),
        ..ReplayOptions::new(&log.dir)
    };
    let prepared = prepare(image, &opts).map_err(|e| e.to_string())?;
    let mut spec = how.spec(prepared.copy.path())?;
    spec.tcp_repair = true;
    // The replayed program reads the log, writes its capture and talks
    // over the socket at these paths, whatever its root.
    spec.share_now.extend(
        [dir, log.dir.as_path()]
            .iter()
            .filter_map(|d| d.canonicalize().ok()),
    );
    // The service is to be replicated again: in responsive mode, as
    // before, once it is live (the program takes new rings at the end of
    // the exchange).
    let service = spec.net.as_ref().map(|n| n.addr.addr());
    let rings = match (protect, service) {
        (Some(_), Some(service)) => {
            let ring_fd = RecordingAnnotation::read(image)
                .map_err(|e| e.to_string())?
                .ok_or("the checkpoint is not of a recorded program")?
                .ring_fd;
            let rings = Rings::for_restored(ring_fd).map_err(|e| e.to_string())?;
            Some((rings, service))
        }
        _ => None,
    };
    let mut launch = Launch::new(Source::Image(spec)).hold_network(true);
    if let Some((r, _)) = &rings {
        launch = r.into_launch(launch);
    }
    let recorded = rings.map(|(r, service)| Recorded {
        rings: r.leak().0,
        service,
    });
    let finisher = Finisher {
        rings: recorded.map(|r| r.rings),
        listener,
        inputs: Inputs {
            image: image.to_path_buf(),
            pid: prepared.pid,
            log: log.dir.clone(),
            from: prepared.from,
            capture: paths.capture.clone(),
        },
        report: paths.report.clone(),
        started: Instant::now(),
        done: false,
        live: Arc::new(AtomicBool::new(false)),
    };
    let live = finisher.live.clone();
    let t0 = Instant::now();
    let launch = launch.companion(Box::new(move |_c: &Container| {
        let mut f = finisher;
        f.started = Instant::now();
        Ok(Box::new(f) as Box<dyn Companion>)
    }));
    let said = run_restored(protected(launch, protect, live, recorded)?)?;
    let restore_ms = t0.elapsed().as_secs_f64() * 1e3;
    drop(prepared);
    let mut outcome = wait_report(&paths.report, REPLAY_LIMIT + EXCHANGE_LIMIT * 2);
    outcome.restore_ms = restore_ms;
    let _ = std::fs::remove_file(&paths.socket);
    Ok((said, outcome))
}

/// `launch` with the replication that protects it again (if asked for),
/// started once `live` is set: in responsive mode if the program records
/// again (`recorded`), else in checkpoint mode.
pub(crate) fn protected<'a>(
    launch: Launch<'a>,
    protect: Option<&Protect>,
    live: Arc<AtomicBool>,
    recorded: Option<Recorded>,
) -> Result<Launch<'a>, String> {
    match protect {
        Some(p) => p
            .attach(launch, live, recorded)
            .map_err(|e| format!("setting up the replication of the restored service: {e}")),
        None => Ok(launch),
    }
}

/// Runs a restored container in the background, under a supervisor of
/// its own; what the restore said.
pub(crate) fn run_restored(launch: Launch<'_>) -> Result<String, String> {
    match launch.detach(true).run() {
        Ok(Launched::Detached(msg)) => Ok(msg),
        Ok(Launched::Ended(r)) => Err(format!(
            "the restored container ended at once ({})",
            r.description
        )),
        Err(e) => Err(e.to_string()),
    }
}

/// Waits for the supervisor's report (a failure if none comes in time).
fn wait_report(path: &Path, limit: Duration) -> ReplayOutcome {
    let until = Instant::now() + limit;
    loop {
        if let Ok(bytes) = std::fs::read(path)
            && let Ok(o) = serde_json::from_slice::<ReplayOutcome>(&bytes)
        {
            return o;
        }
        if Instant::now() >= until {
            return ReplayOutcome {
                why: Some(format!(
                    "no word from the restored container in {} s",
                    limit.as_secs()
                )),
                ..ReplayOutcome::default()
            };
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// The fallback: `image` restored as in checkpoint-only mode, the
/// connections used after it (per `log`; all of them without one)
/// disconnected. Waits first for a container of the same name (a failed
/// replay's) to be gone.
pub fn from_checkpoint(
    image: &Path,
    log: Option<&LogWritten>,
    how: &Restoring,
    protect: Option<&Protect>,
) -> Result<Fallback, String> {
    let t0 = Instant::now();
    let copy = WorkingCopy::of(image).map_err(|e| e.to_string())?;
    let reset = disconnect_active(copy.path(), image, log)?;
    let (spec, _unrecorded) = how.unrecorded(copy.path())?;
    wait_name_free(&spec.name, Duration::from_secs(10))?;
    let launch = protected(
        Launch::new(Source::Image(spec)),
        protect,
        Arc::new(AtomicBool::new(true)),
        None,
    )?;
    let restored = run_restored(launch)?;
    Ok(Fallback {
        restored,
        reset,
        took: t0.elapsed(),
    })
}

/// Disconnects, in the image at `copy`, the connections used after the
/// checkpoint; returns how many.
fn disconnect_active(copy: &Path, image: &Path, log: Option<&LogWritten>) -> Result<usize, String> {
    let ring_fd = rrc_session::recording::RecordingAnnotation::read(image)
        .map_err(|e| e.to_string())?
        .ok_or("the checkpoint is not of a recorded program")?
        .ring_fd;
    let mut edit = ImageEdit::open(copy).map_err(|e| e.to_string())?;
    let pid = rrc_session::recording::rings_at(&edit, image, ring_fd)
        .map_err(|e| e.to_string())?
        .pid;
    let saved = edit.tcp_connections(pid).map_err(|e| e.to_string())?;
    // What cannot be read counts as everything used.
    let uses = log.and_then(|l| log_uses(&l.dir, l.from.records + 1).ok());
    let frames = log.and_then(|l| frames(&l.dir).ok());
    let active = match (uses, frames) {
        (Some(u), Some(f)) => active_since(&saved, &u, &f),
        _ => saved.iter().map(|s| s.file_id).collect(),
    };
    for id in &active {
        edit.disconnect(*id).map_err(|e| e.to_string())?;
    }
    edit.save().map_err(|e| e.to_string())?;
    Ok(active.len())
}

fn wait_name_free(name: &rrc_container::ContainerName, limit: Duration) -> Result<(), String> {
    let host = rrc_container::state::HostState::current();
    let until = Instant::now() + limit;
    while matches!(host.load(name), Ok(Some(_))) {
        if Instant::now() >= until {
            return Err(format!(
                "container {name} is still there {} s after its replay failed",
                limit.as_secs()
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

/// What the supervisor reads to work the connections out.
struct Inputs {
    /// The checkpoint (unmarked): the connections as saved.
    image: PathBuf,
    /// The recorded process, as the image numbers it.
    pid: i32,
    log: PathBuf,
    /// The first record replayed.
    from: u64,
    capture: PathBuf,
}

impl Inputs {
    fn plan(&self, writing: &[(i32, Vec<u8>)]) -> Result<Plan, String> {
        let edit = ImageEdit::open(&self.image).map_err(|e| e.to_string())?;
        let saved = edit.tcp_connections(self.pid).map_err(|e| e.to_string())?;
        let uses = log_uses(&self.log, self.from).map_err(|e| e.to_string())?;
        let capture = match std::fs::read(&self.capture) {
            Ok(b) => parse_capture(&b).map_err(|e| e.to_string())?,
            // Nothing was written.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(format!("{}: {e}", self.capture.display())),
        };
        let frames = frames(&self.log).map_err(|e| e.to_string())?;
        plan(&saved, &uses, &capture, writing, &frames, &host_tcp()).map_err(|e| e.to_string())
    }
}

/// The net log's frames in `dir`, in order.
fn frames(dir: &Path) -> Result<Vec<Vec<u8>>, crate::netlog::NetLogError> {
    Ok(crate::netlog::read(dir)?
        .into_iter()
        .map(|(_, f)| f)
        .collect())
}

/// This host's choices for a connection it accepts.
fn host_tcp() -> HostTcp {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let rmem = read("/proc/sys/net/ipv4/tcp_rmem")
        .split_whitespace()
        .nth(2)
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(6 << 20);
    let rmem_max = read("/proc/sys/net/core/rmem_max")
        .trim()
        .parse::<u64>()
        .unwrap_or(0);
    HostTcp {
        rcv_wscale: HostTcp::wscale_for(rmem.max(rmem_max)),
        mss: OFFERED_MSS,
        timestamp_lead: TIMESTAMP_LEAD_MS,
    }
}

/// The restored container's companion: waits for librrc's word at the end
/// of the log, then rebuilds and hands over the connections and lets the
/// network go; reports either way, and ends the container if the takeover
/// cannot go on with it.
struct Finisher {
    listener: UnixListener,
    inputs: Inputs,
    report: PathBuf,
    started: Instant,
    done: bool,
    /// Set once the service is live (what protects it again may start).
    live: Arc<AtomicBool>,
    /// What the program records into once live, when it is to be
    /// replicated again in responsive mode.
    rings: Option<&'static RingSet>,
}

impl Finisher {
    fn conclude(&mut self, c: &Container, result: Result<ReplayOutcome, String>) {
        let outcome = result.unwrap_or_else(|why| ReplayOutcome {
            why: Some(why),
            ..ReplayOutcome::default()
        });
        if outcome.live {
            self.live.store(true, std::sync::atomic::Ordering::Release);
        } else {
            // This copy does not go on: the backup falls back.
            let _ = nix::sys::signal::kill(c.init_pid(), nix::sys::signal::Signal::SIGKILL);
        }
        if let Err(e) = crate::write_json_atomically(&self.report, &outcome) {
            tracing::error!(error = %e, "the takeover's report could not be written");
        }
        self.done = true;
    }

    /// The exchange with librrc, once it has connected.
    fn finish(&self, mut s: UnixStream, c: &Container) -> Result<ReplayOutcome, String> {
        s.set_nonblocking(false).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(EXCHANGE_LIMIT))
            .map_err(|e| e.to_string())?;
        let mut buffered = Vec::new();
        let mut writing: Vec<(i32, Vec<u8>)> = Vec::new();
        let replay_ms = loop {
            match read_line(&mut s, &mut buffered)? {
                TakeoverLine::Pending { fd, len } => {
                    let bytes = read_bytes(&mut s, &mut buffered, len as usize)?;
                    writing.push((fd, bytes));
                }
                TakeoverLine::End => break self.started.elapsed().as_secs_f64() * 1e3,
                TakeoverLine::Diverged(why) => {
                    let why = why.trim_start_matches([':', ' ']);
                    return Err(if why.is_empty() {
                        "the replay diverged from the log".into()
                    } else {
                        format!("the replay diverged from the log ({why})")
                    });
                }
                other => return Err(format!("librrc said {other:?} before the end")),
            }
        };
        let t0 = Instant::now();
        let plan = self.inputs.plan(&writing)?;
        let conns: Vec<_> = plan.rebuilt.iter().map(|r| r.conn.clone()).collect();
        let fds = rrc_ckpt::restore::build_connections(c.init_pid(), &conns)
            .map_err(|e| e.to_string())?;
        for fd in &fds {
            rrc_ckpt::tcp::leave_repair(fd.as_fd())
                .map_err(|e| format!("a rebuilt connection would not go live: {e}"))?;
        }
        let targets: Vec<i32> = plan.rebuilt.iter().map(|r| r.fd).collect();
        for (t, f) in targets
            .chunks(TAKEOVER_BATCH)
            .zip(fds.chunks(TAKEOVER_BATCH))
        {
            let f: Vec<BorrowedFd<'_>> = f.iter().map(|f| f.as_fd()).collect();
            send_with_fds(&s, &TakeoverLine::Install(t.to_vec()), &f)?;
        }
        if let Some(rings) = self.rings {
            send_with_fds(&s, &TakeoverLine::Rings, &[rings.fd()])?;
        }
        s.write_all(&TakeoverLine::Go.encode())
            .map_err(|e| format!("telling librrc to go: {e}"))?;
        match read_line(&mut s, &mut buffered)? {
            TakeoverLine::Installed(n) if n as usize == targets.len() => {}
            TakeoverLine::Failed { fd, errno } => {
                return Err(format!(
                    "putting the connection at descriptor {fd} in place failed: {}",
                    std::io::Error::from_raw_os_error(errno)
                ));
            }
            other => return Err(format!("librrc answered {other:?}")),
        }
        c.pause_network(false);
        let accepted = plan.rebuilt.iter().filter(|r| r.accepted).count();
        Ok(ReplayOutcome {
            live: true,
            why: None,
            restore_ms: 0.0,
            replay_ms,
            rebuild_ms: t0.elapsed().as_secs_f64() * 1e3,
            carried: plan.rebuilt.len() - accepted,
            accepted,
            closed: plan.closed,
            unaccepted: plan.unaccepted,
            unread: plan.unread,
            unacknowledged: plan.unacknowledged,
        })
    }
}

impl Companion for Finisher {
    fn next_wake(&self) -> Option<Instant> {
        (!self.done).then_some(self.started + REPLAY_LIMIT)
    }

    fn wake_fd(&self) -> Option<BorrowedFd<'_>> {
        (!self.done).then(|| self.listener.as_fd())
    }

    fn on_wake(&mut self, c: &mut Container) {
        if self.done {
            return;
        }
        match self.listener.accept() {
            Ok((s, _)) => {
                let r = self.finish(s, c);
                self.conclude(c, r);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if self.started.elapsed() >= REPLAY_LIMIT {
                    let why = format!(
                        "the replay did not reach the end of the log in {} s",
                        REPLAY_LIMIT.as_secs()
                    );
                    self.conclude(c, Err(why));
                }
            }
            Err(e) => self.conclude(c, Err(format!("takeover socket: {e}"))),
        }
    }

    fn on_stop(&mut self, c: &mut Container) {
        if !self.done {
            self.conclude(c, Err("the container ended during the replay".into()));
        }
    }

    fn done(&self) -> bool {
        self.done
    }
}

/// The next line from librrc (`pending` keeps what came after it).
fn read_line(s: &mut UnixStream, pending: &mut Vec<u8>) -> Result<TakeoverLine, String> {
    loop {
        if let Some(nl) = pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = pending.drain(..=nl).collect();
            return TakeoverLine::parse(&line[..nl])
                .ok_or_else(|| format!("librrc sent {:?}", String::from_utf8_lossy(&line)));
        }
        if pending.len() > TAKEOVER_LINE_MAX {
            return Err("librrc sent an overlong line".into());
        }
        read_more(s, pending)?;
    }
}

/// The next `len` bytes from librrc (`pending` first).
fn read_bytes(s: &mut UnixStream, pending: &mut Vec<u8>, len: usize) -> Result<Vec<u8>, String> {
    while pending.len() < len {
        read_more(s, pending)?;
    }
    Ok(pending.drain(..len).collect())
}

/// Appends what librrc sent next to `pending`.
fn read_more(s: &mut UnixStream, pending: &mut Vec<u8>) -> Result<(), String> {
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return Err("librrc hung up".into()),
            Ok(n) => {
                pending.extend_from_slice(&buf[..n]);
                return Ok(());
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("waiting for librrc: {e}")),
        }
    }
}

/// One line with descriptors attached: an `install` line with its
/// connections, or the `rings` line with the new rings.
fn send_with_fds(
    s: &UnixStream,
    line: &TakeoverLine,
    fds: &[BorrowedFd<'_>],
) -> Result<(), String> {
    use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
    let line = line.encode();
    let raw: Vec<i32> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let cmsg = [ControlMessage::ScmRights(&raw)];
    let mut sent = sendmsg::<()>(
        s.as_raw_fd(),
        &[std::io::IoSlice::new(&line)],
        &cmsg,
        MsgFlags::MSG_NOSIGNAL,
        None,
    )
    .map_err(|e| format!("handing connections over: {e}"))?;
    // The descriptors went with the first byte; the rest of the line may
    // follow on its own.
    while sent < line.len() {
        sent += nix::sys::socket::send(s.as_raw_fd(), &line[sent..], MsgFlags::MSG_NOSIGNAL)
            .map_err(|e| format!("handing connections over: {e}"))?;
    }
    Ok(())
}
