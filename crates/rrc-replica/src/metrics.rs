//! What a primary or a backup tells a monitoring system: Prometheus's
//! metrics, served over HTTP on `--metrics ADDR` (`GET /metrics`, the
//! OpenMetrics text format, which Prometheus scrapes).
//!
//! The figures are set where they happen (the primary's companion, the
//! gate, the backup's session); the server only encodes them. Names follow
//! Prometheus's rules: a `rrc_` prefix, base units in the name
//! (`_seconds`, `_bytes`), `_total` on counters.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

use crate::wake::{self, WakeFd, Waker};

/// Which side this process is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Primary,
    Backup,
}

impl Role {
    fn name(self) -> &'static str {
        match self {
            Role::Primary => "primary",
            Role::Backup => "backup",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServiceLabel {
    service: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RoleLabel {
    service: String,
    role: String,
}

/// The figures of every service a process serves or watches, each under
/// a `service` label, as one endpoint serves them.
pub struct MetricsHub {
    registry: Registry,
    role: Family<RoleLabel, Gauge>,
    term: Family<ServiceLabel, Gauge>,
    protected: Family<ServiceLabel, Gauge>,
    takeovers: Family<ServiceLabel, Counter>,
    commits: Family<ServiceLabel, Counter>,
    pause: Family<ServiceLabel, Histogram>,
    hold: Family<ServiceLabel, Histogram>,
    log_bytes: Family<ServiceLabel, Counter>,
    last_commit_age: Family<ServiceLabel, Gauge<f64, AtomicU64>>,
    longest_silence: Family<ServiceLabel, Gauge<f64, AtomicU64>>,
    /// Each service's figures, whose commit ages are read at each scrape.
    services: std::sync::Mutex<Vec<Arc<Metrics>>>,
}

/// One service's figures: handles on its series of the hub's families.
pub struct Metrics {
    service: String,
    role: [Gauge; 2],
    pub term: Gauge,
    pub protected: Gauge,
    pub takeovers: Counter,
    pub commits: Counter,
    pub pause: Histogram,
    pub hold: Histogram,
    pub log_bytes: Counter,
    last_commit_age: Gauge<f64, AtomicU64>,
    /// The longest the primary was silent before it was heard again.
    pub longest_silence: Gauge<f64, AtomicU64>,
    /// When the last checkpoint was committed, in nanoseconds after
    /// `started` (0: never).
    last_commit: AtomicU64,
    started: Instant,
}

impl MetricsHub {
    pub fn new() -> Arc<MetricsHub> {
        let mut registry = Registry::default();
        let role = Family::<RoleLabel, Gauge>::default();
        registry.register(
            "rrc_role",
            "This process's side of each replicated service (1 for the side it is)",
            role.clone(),
        );
        let term = Family::<ServiceLabel, Gauge>::default();
        registry.register(
            "rrc_term",
            "The arbiter's term this side serves or watches under (0 without an arbiter)",
            term.clone(),
        );
        let protected = Family::<ServiceLabel, Gauge>::default();
        registry.register(
            "rrc_protected",
            "1 while a backup holds a committed checkpoint of the service",
            protected.clone(),
        );
        let takeovers = Family::<ServiceLabel, Counter>::default();
        registry.register(
            "rrc_takeovers",
            "Takeovers that brought the service here",
            takeovers.clone(),
        );
        let commits = Family::<ServiceLabel, Counter>::default();
        registry.register(
            "rrc_checkpoints_committed",
            "Checkpoints the backup committed",
            commits.clone(),
        );
        // 50 µs to about 3 s.
        let pause = Family::<ServiceLabel, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.00005, 2.0, 16))
        });
        registry.register_with_unit(
            "rrc_checkpoint_pause",
            "How long the container stood still for each checkpoint",
            Unit::Seconds,
            pause.clone(),
        );
        // 10 µs to about 10 s.
        let hold = Family::<ServiceLabel, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.00001, 2.5, 16))
        });
        registry.register_with_unit(
            "rrc_output_hold",
            "How long each outbound frame was held until the backup held what produced it",
            Unit::Seconds,
            hold.clone(),
        );
        let log_bytes = Family::<ServiceLabel, Counter>::default();
        registry.register_with_unit(
            "rrc_log",
            "Bytes of the event log and net log shipped (primary) or received (backup)",
            Unit::Bytes,
            log_bytes.clone(),
        );
        let last_commit_age = Family::<ServiceLabel, Gauge<f64, AtomicU64>>::default();
        registry.register_with_unit(
            "rrc_last_commit_age",
            "Time since the backup last committed a checkpoint (-1: none yet)",
            Unit::Seconds,
            last_commit_age.clone(),
        );
        let longest_silence = Family::<ServiceLabel, Gauge<f64, AtomicU64>>::default();
        registry.register_with_unit(
            "rrc_primary_longest_silence",
            "The longest the backup heard nothing from a primary that then spoke again: how close its timeout came to a false takeover",
            Unit::Seconds,
            longest_silence.clone(),
        );
        Arc::new(MetricsHub {
            registry,
            role,
            term,
            protected,
            takeovers,
            commits,
            pause,
            hold,
            log_bytes,
            last_commit_age,
            longest_silence,
            services: std::sync::Mutex::new(Vec::new()),
        })
    }

    /// The figures of `service`, on this side as `role` (the same ones
    /// each time it is asked for).
    pub fn service(&self, service: &str, role: Role) -> Arc<Metrics> {
        let mut known = crate::lock(&self.services);
        if let Some(m) = known.iter().find(|m| m.service == service) {
            m.set_role(role);
            return m.clone();
        }
        let l = ServiceLabel {
            service: service.into(),
        };
        let roles = [Role::Primary, Role::Backup].map(|r| {
            self.role
                .get_or_create(&RoleLabel {
                    service: service.into(),
                    role: r.name().into(),
                })
                .clone()
        });
        let m = Arc::new(Metrics {
            service: service.into(),
            role: roles,
            term: self.term.get_or_create(&l).clone(),
            protected: self.protected.get_or_create(&l).clone(),
            takeovers: self.takeovers.get_or_create(&l).clone(),
            commits: self.commits.get_or_create(&l).clone(),
            pause: self.pause.get_or_create(&l).clone(),
            hold: self.hold.get_or_create(&l).clone(),
            log_bytes: self.log_bytes.get_or_create(&l).clone(),
            last_commit_age: self.last_commit_age.get_or_create(&l).clone(),
            longest_silence: self.longest_silence.get_or_create(&l).clone(),
            last_commit: AtomicU64::new(0),
            started: Instant::now(),
        });
        m.set_role(role);
        known.push(m.clone());
        m
    }

    /// The text a scrape gets.
    pub fn encode(&self) -> String {
        for m in crate::lock(&self.services).iter() {
            m.last_commit_age
                .set(m.last_commit_age().map_or(-1.0, |d| d.as_secs_f64()));
        }
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String does not fail");
        out
    }
}

impl Metrics {
    /// A checkpoint was committed now.
    pub fn committed(&self) {
        self.commits.inc();
        let ns = self.started.elapsed().as_nanos().max(1) as u64;
        self.last_commit.store(ns, Ordering::Relaxed);
    }

    /// Time since the last commit, if there was one.
    pub fn last_commit_age(&self) -> Option<Duration> {
        match self.last_commit.load(Ordering::Relaxed) {
            0 => None,
            ns => Some(
                self.started
                    .elapsed()
                    .saturating_sub(Duration::from_nanos(ns)),
            ),
        }
    }

    /// Counts `total` bytes of log so far (the counter only grows).
    pub fn log_total(&self, total: u64) {
        let now = self.log_bytes.get();
        if total > now {
            self.log_bytes.inc_by(total - now);
        }
    }

    /// This side is now `role` for the service (a backup that took over
    /// serves it).
    pub fn set_role(&self, role: Role) {
        self.role[0].set(i64::from(role == Role::Primary));
        self.role[1].set(i64::from(role == Role::Backup));
    }
}

/// The HTTP endpoint: one thread answering scrapes, one at a time, until
/// stopped. Written here rather than with an HTTP server crate because a
/// backup forks right after it stops this (a takeover), which must leave no
/// other thread behind, and the servers at hand keep pools of their own;
/// a scrape is one GET and one answer, which takes few lines. Stopping
/// leaves the listening socket as it was, so that the primary a takeover
/// makes can serve on the same address.
pub struct MetricsServer {
    listener: TcpListener,
    /// Wakes the thread to stop.
    stop: Waker,
    /// The connection being answered, to shut down on stop (a scraper
    /// that says nothing must not hold a takeover up).
    current: Arc<std::sync::Mutex<Option<TcpStream>>>,
    thread: Option<JoinHandle<()>>,
}

/// The content type of the OpenMetrics text format.
const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// How long a scraper may take to send its request.
const REQUEST_LIMIT: Duration = Duration::from_secs(2);

impl MetricsServer {
    /// Serves `metrics` on `listener` (bound early, so that a taken
    /// address is an error before anything starts).
    pub fn start(
        listener: TcpListener,
        metrics: Arc<MetricsHub>,
    ) -> std::io::Result<MetricsServer> {
        let handle = listener.try_clone()?;
        listener.set_nonblocking(true)?;
        let (stop, stopped) = wake::pair()?;
        let current = Arc::new(std::sync::Mutex::new(None));
        let serving = current.clone();
        let thread = std::thread::Builder::new()
            .name("rrc-metrics".into())
            .spawn(move || serve(&listener, &stopped, &serving, &metrics))?;
        Ok(MetricsServer {
            listener: handle,
            stop,
            current,
            thread: Some(thread),
        })
    }

    /// Ends the server's thread, at once.
    pub fn stop(&mut self) {
        {
            let cur = crate::lock(&self.current);
            self.stop.wake();
            if let Some(c) = cur.as_ref() {
                let _ = c.shutdown(std::net::Shutdown::Both);
            }
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    /// Ends the server's thread and gives its socket back, still
    /// listening (blocking again), for whoever serves next.
    pub fn hand_over(mut self) -> std::io::Result<TcpListener> {
        self.stop();
        let l = self.listener.try_clone()?;
        l.set_nonblocking(false)?;
        Ok(l)
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The server's thread: waits for a connection or the stop, answers.
fn serve(
    listener: &TcpListener,
    stopped: &WakeFd,
    serving: &std::sync::Mutex<Option<TcpStream>>,
    metrics: &MetricsHub,
) {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    use std::os::fd::AsFd;
    loop {
        let mut fds = [
            PollFd::new(listener.as_fd(), PollFlags::POLLIN),
            PollFd::new(stopped.fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) | Err(nix::Error::EINTR) => {}
            Err(_) => return,
        }
        if fds[1].revents().is_some_and(|r| !r.is_empty()) {
            return;
        }
        let c = match listener.accept() {
            Ok((c, _)) => c,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(_) => {
                // Out of descriptors, say: not a busy loop.
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        {
            let mut cur = crate::lock(serving);
            // Checked under the lock stop takes: a connection is either
            // seen by stop or never answered.
            if stopped_now(stopped) {
                return;
            }
            *cur = c.try_clone().ok();
        }
        let _ = c.set_nonblocking(false);
        let _ = answer(c, metrics);
        *crate::lock(serving) = None;
    }
}

/// Whether the stop was asked for (without waiting).
fn stopped_now(stopped: &WakeFd) -> bool {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    let mut fds = [PollFd::new(stopped.fd(), PollFlags::POLLIN)];
    poll(&mut fds, PollTimeout::ZERO).is_ok_and(|n| n > 0)
}

/// Reads one request's head and answers it: the metrics for `GET
/// /metrics`, 404 for any other path, 405 for any other method.
fn answer(mut c: TcpStream, metrics: &MetricsHub) -> std::io::Result<()> {
    c.set_read_timeout(Some(REQUEST_LIMIT))?;
    c.set_write_timeout(Some(REQUEST_LIMIT))?;
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 8192 {
        let n = c.read(&mut buf)?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
    let mut words = line.split(|&b| b == b' ');
    let (method, path) = (
        words.next().unwrap_or_default(),
        words.next().unwrap_or_default(),
    );
    let path = path.split(|&b| b == b'?').next().unwrap_or_default();
    let (status, ctype, body) = match (method, path) {
        (b"GET", b"/metrics") => ("200 OK", CONTENT_TYPE, metrics.encode()),
        (b"GET", _) => (
            "404 Not Found",
            "text/plain",
            "rrc serves /metrics\n".into(),
        ),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "GET /metrics\n".into(),
        ),
    };
    write!(
        c,
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scrape_gets_each_services_figures_under_prometheus_names() {
        let hub = MetricsHub::new();
        let m = hub.service("redis", Role::Primary);
        m.term.set(3);
        m.protected.set(1);
        m.pause.observe(0.002);
        m.log_total(4096);
        m.log_total(1000);
        m.committed();
        let other = hub.service("web", Role::Backup);
        other.takeovers.inc();
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let srv = MetricsServer::start(l, hub).unwrap();
        let scrape = || {
            let mut c = std::net::TcpStream::connect(addr).unwrap();
            c.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
            let mut body = String::new();
            c.read_to_string(&mut body).unwrap();
            body
        };
        let body = scrape();
        assert!(body.starts_with("HTTP/1.1 200 OK"), "{body}");
        for line in [
            "rrc_role{service=\"redis\",role=\"primary\"} 1",
            "rrc_role{service=\"redis\",role=\"backup\"} 0",
            "rrc_role{service=\"web\",role=\"backup\"} 1",
            "rrc_term{service=\"redis\"} 3",
            "rrc_protected{service=\"redis\"} 1",
            "rrc_checkpoint_pause_seconds_count{service=\"redis\"} 1",
            "rrc_log_bytes_total{service=\"redis\"} 4096",
            "rrc_checkpoints_committed_total{service=\"redis\"} 1",
            "rrc_takeovers_total{service=\"redis\"} 0",
            "rrc_takeovers_total{service=\"web\"} 1",
            "rrc_last_commit_age_seconds{service=\"web\"} -1",
            "# EOF",
        ] {
            assert!(body.contains(line), "{line:?} not in:\n{body}");
        }
        assert!(
            body.contains("rrc_last_commit_age_seconds{service=\"redis\"} 0."),
            "{body}"
        );
        // One family each, whatever the number of services.
        assert_eq!(body.matches("# TYPE rrc_term gauge").count(), 1, "{body}");
        // Handed over, the socket still listens: a second server answers.
        let l = srv.hand_over().unwrap();
        let hub2 = MetricsHub::new();
        hub2.service("redis", Role::Backup);
        let _srv2 = MetricsServer::start(l, hub2).unwrap();
        let body2 = scrape();
        assert!(
            body2.contains("rrc_role{service=\"redis\",role=\"backup\"} 1"),
            "{body2}"
        );
    }
}
