//! Verifying clients: persistent connections that check every reply
//! against what they wrote, and time the gaps between replies.
//!
//! Each connection works on keys of its own, so it knows exactly what the
//! server must answer: a write it saw acknowledged must be readable
//! afterwards, a counter it increments must go up by exactly one per
//! acknowledged increment (an increment applied twice, or lost, shows), and
//! a connection reset is an error.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::resp::{Reply, RespConn};

/// The servers the clients know how to talk to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    Redis,
    Memcached,
    /// HTTP/1.1 keep-alive GETs of files `/f<N>.txt` whose content is
    /// [`http_body`].
    Http,
    /// Tarantool's text console, on a space `kv` with a primary index.
    Tarantool,
}

/// The body of `/f<n>.txt` the HTTP check expects.
pub fn http_body(n: u32) -> String {
    format!("file {n}: {}\n", "x".repeat((n as usize * 37) % 900 + 10))
}

trait Session: Send {
    /// Writes `value` under `key`.
    fn put(&mut self, key: &str, value: &str) -> io::Result<()>;
    /// Reads `key`.
    fn get(&mut self, key: &str) -> io::Result<Option<String>>;
    /// Increments counter `key` by one; returns the new value.
    fn incr(&mut self, key: &str) -> io::Result<i64>;
}

fn bad(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

struct RedisSession(RespConn);

impl Session for RedisSession {
    fn put(&mut self, key: &str, value: &str) -> io::Result<()> {
        self.0.set(key.as_bytes(), value.as_bytes())
    }
    fn get(&mut self, key: &str) -> io::Result<Option<String>> {
        Ok(self
            .0
            .get(key.as_bytes())?
            .map(|v| String::from_utf8_lossy(&v).into_owned()))
    }
    fn incr(&mut self, key: &str) -> io::Result<i64> {
        match self.0.command(&[b"INCR", key.as_bytes()])? {
            Reply::Integer(n) => Ok(n),
            r => Err(bad(format!("INCR answered {r:?}"))),
        }
    }
}

struct LineSession {
    r: BufReader<Tap>,
    w: TcpStream,
}

/// Every byte a connection received, as it arrives.
#[derive(Debug, Default)]
pub struct Received {
    bytes: std::sync::Mutex<Vec<u8>>,
    len: std::sync::atomic::AtomicUsize,
}

impl Received {
    /// Bytes received so far.
    pub fn len(&self) -> usize {
        self.len.load(Ordering::Acquire)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Everything received.
    pub fn bytes(&self) -> Vec<u8> {
        self.bytes.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// A connection's reading side that keeps what it reads.
struct Tap {
    s: TcpStream,
    log: Arc<Received>,
}

impl Read for Tap {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.s.read(buf)?;
        self.log
            .bytes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(&buf[..n]);
        self.log.len.fetch_add(n, Ordering::Release);
        Ok(n)
    }
}

impl LineSession {
    fn connect(addr: SocketAddr, timeout: Duration, log: Arc<Received>) -> io::Result<LineSession> {
        let s = TcpStream::connect_timeout(&addr, timeout)?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(timeout))?;
        Ok(LineSession {
            r: BufReader::new(Tap {
                s: s.try_clone()?,
                log,
            }),
            w: s,
        })
    }

    fn line(&mut self) -> io::Result<String> {
        let mut l = String::new();
        if self.r.read_line(&mut l)? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "server closed the connection",
            ));
        }
        Ok(l)
    }
}

struct MemcachedSession(LineSession);

impl Session for MemcachedSession {
    fn put(&mut self, key: &str, value: &str) -> io::Result<()> {
        write!(self.0.w, "set {key} 0 0 {}\r\n{value}\r\n", value.len())?;
        match self.0.line()?.as_str() {
            "STORED\r\n" => Ok(()),
            l => Err(bad(format!("set answered {l:?}"))),
        }
    }
    fn get(&mut self, key: &str) -> io::Result<Option<String>> {
        write!(self.0.w, "get {key}\r\n")?;
        let l = self.0.line()?;
        if l == "END\r\n" {
            return Ok(None);
        }
        let len: usize = l
            .split_whitespace()
            .nth(3)
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| bad(format!("get answered {l:?}")))?;
        let mut v = vec![0u8; len + 2];
        self.0.r.read_exact(&mut v)?;
        if self.0.line()? != "END\r\n" {
            return Err(bad("get reply without END".into()));
        }
        v.truncate(len);
        Ok(Some(String::from_utf8_lossy(&v).into_owned()))
    }
    fn incr(&mut self, key: &str) -> io::Result<i64> {
        write!(self.0.w, "incr {key} 1\r\n")?;
        let l = self.0.line()?;
        if l == "NOT_FOUND\r\n" {
            self.put(key, "1")?;
            return Ok(1);
        }
        l.trim()
            .parse()
            .map_err(|_| bad(format!("incr answered {l:?}")))
    }
}

struct HttpSession {
    s: LineSession,
    host: String,
}

impl HttpSession {
    fn fetch(&mut self, path: &str) -> io::Result<String> {
        write!(
            self.s.w,
            "GET {path} HTTP/1.1\r\nHost: {}\r\n\r\n",
            self.host
        )?;
        let status = self.s.line()?;
        if !status.starts_with("HTTP/1.1 200") {
            return Err(bad(format!("GET {path} answered {status:?}")));
        }
        let mut len = None;
        loop {
            let h = self.s.line()?;
            if h == "\r\n" {
                break;
            }
            if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
                len = v.trim().parse::<usize>().ok();
            }
        }
        let len = len.ok_or_else(|| bad("no Content-Length".into()))?;
        let mut body = vec![0u8; len];
        self.s.r.read_exact(&mut body)?;
        Ok(String::from_utf8_lossy(&body).into_owned())
    }
}

impl Session for HttpSession {
    // A static file server takes no writes: "put" fetches and checks a file.
    fn put(&mut self, key: &str, _value: &str) -> io::Result<()> {
        let n = key
            .bytes()
            .fold(0u32, |a, b| a.wrapping_mul(31).wrapping_add(u32::from(b)))
            % 50;
        let body = self.fetch(&format!("/f{n}.txt"))?;
        if body != http_body(n) {
            return Err(bad(format!("/f{n}.txt has wrong content")));
        }
        Ok(())
    }
    fn get(&mut self, _key: &str) -> io::Result<Option<String>> {
        Ok(None)
    }
    fn incr(&mut self, _key: &str) -> io::Result<i64> {
        Ok(0)
    }
}

struct TarantoolSession(LineSession);

impl TarantoolSession {
    /// Runs a Lua expression on the console; returns its YAML lines.
    fn eval(&mut self, expr: &str) -> io::Result<Vec<String>> {
        writeln!(self.0.w, "{expr}")?;
        let first = self.0.line()?;
        if first != "---\n" {
            return Err(bad(format!("console answered {first:?}")));
        }
        let mut out = Vec::new();
        loop {
            let l = self.0.line()?;
            if l == "...\n" {
                return Ok(out);
            }
            out.push(l.trim_end().to_string());
        }
    }
}

impl Session for TarantoolSession {
    fn put(&mut self, key: &str, value: &str) -> io::Result<()> {
        let r = self.eval(&format!("box.space.kv:replace{{'{key}', '{value}'}}"))?;
        if r.first().map(String::as_str) != Some(&format!("- ['{key}', '{value}']")) {
            return Err(bad(format!("replace answered {r:?}")));
        }
        Ok(())
    }
    fn get(&mut self, key: &str) -> io::Result<Option<String>> {
        let r = self.eval(&format!("box.space.kv:get{{'{key}'}}"))?;
        match r.first().map(String::as_str) {
            Some("- null") => Ok(None),
            Some(l) => {
                let v = l
                    .strip_prefix(&format!("- ['{key}', '"))
                    .and_then(|x| x.strip_suffix("']"))
                    .ok_or_else(|| bad(format!("get answered {r:?}")))?;
                Ok(Some(v.to_string()))
            }
            None => Err(bad("empty answer".into())),
        }
    }
    fn incr(&mut self, key: &str) -> io::Result<i64> {
        let r = self.eval(&format!(
            "box.space.kv:upsert({{'{key}', 1}}, {{{{'+', 2, 1}}}}) return box.space.kv:get{{'{key}'}}[2]"
        ))?;
        r.first()
            .and_then(|l| l.strip_prefix("- "))
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| bad(format!("upsert answered {r:?}")))
    }
}

fn connect(
    service: Service,
    addr: SocketAddr,
    timeout: Duration,
    log: Arc<Received>,
) -> io::Result<Box<dyn Session>> {
    Ok(match service {
        Service::Redis => Box::new(RedisSession(RespConn::connect_with(addr, timeout, |s| {
            Box::new(Tap { s, log })
        })?)),
        Service::Memcached => Box::new(MemcachedSession(LineSession::connect(addr, timeout, log)?)),
        Service::Http => Box::new(HttpSession {
            s: LineSession::connect(addr, timeout, log)?,
            host: addr.ip().to_string(),
        }),
        Service::Tarantool => {
            let mut s = LineSession::connect(addr, timeout, log)?;
            // The console greets with a banner line and an empty line.
            s.line()?;
            s.line()?;
            Box::new(TarantoolSession(s))
        }
    })
}

/// What one verifying connection saw.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ConnReport {
    pub requests: u64,
    pub errors: Vec<String>,
    /// The longest time without a reply, in milliseconds.
    pub max_gap_ms: f64,
    /// When each reply came.
    #[serde(skip)]
    pub replies: Vec<Instant>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct VerifyReport {
    pub connections: usize,
    pub requests: u64,
    pub errors: Vec<String>,
    pub max_gap_ms: f64,
    /// When each connection's replies came.
    #[serde(skip)]
    pub replies: Vec<Vec<Instant>>,
    /// Each connection's bytes, as received.
    #[serde(skip)]
    pub received: Vec<Vec<u8>>,
    /// How many of them each connection had received when `during` (the
    /// middle of the load: a kill, say) was over.
    #[serde(skip)]
    pub received_at_mark: Vec<usize>,
}

impl VerifyReport {
    /// How long after `t` every connection had been answered again: the
    /// time until the last of the connections got its first reply after
    /// `t` (None if one never did).
    pub fn all_answered_after(&self, t: Instant) -> Option<Duration> {
        let mut worst = Duration::ZERO;
        for conn in &self.replies {
            let first = conn.iter().find(|r| **r > t)?;
            worst = worst.max(first.duration_since(t));
        }
        Some(worst)
    }

    /// How long after `t` the first reply on any connection came.
    pub fn first_answer_after(&self, t: Instant) -> Option<Duration> {
        self.replies
            .iter()
            .filter_map(|conn| conn.iter().find(|r| **r > t))
            .min()
            .map(|r| r.duration_since(t))
    }
}

/// Runs one connection's checked workload until `stop`.
/// Counters the connections keep up to date while they run, for a live
/// view.
#[derive(Debug, Default)]
pub struct Live {
    replies: AtomicU64,
    latency_ns: AtomicU64,
    longest_ns: AtomicU64,
    errors: AtomicU64,
    /// What each connection has received.
    received: std::sync::Mutex<Vec<Arc<Received>>>,
}

/// A reading of [`Live`].
#[derive(Debug, Clone, Copy, Default)]
pub struct LiveReading {
    pub replies: u64,
    /// Sum of the replies' latencies.
    pub latency: Duration,
    pub errors: u64,
}

impl Live {
    /// How many bytes each connection has received so far.
    pub fn received_now(&self) -> Vec<usize> {
        self.received
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|r| r.len())
            .collect()
    }

    /// The longest a connection waited for a reply since the last call.
    pub fn take_longest(&self) -> Duration {
        Duration::from_nanos(self.longest_ns.swap(0, Ordering::Relaxed))
    }
}

impl Live {
    pub fn read(&self) -> LiveReading {
        LiveReading {
            replies: self.replies.load(Ordering::Relaxed),
            latency: Duration::from_nanos(self.latency_ns.load(Ordering::Relaxed)),
            errors: self.errors.load(Ordering::Relaxed),
        }
    }
}

fn run_conn(
    service: Service,
    addr: SocketAddr,
    id: usize,
    stop: &AtomicBool,
    timeout: Duration,
    live: &Live,
    received: Arc<Received>,
) -> ConnReport {
    let rep = run_conn_inner(service, addr, id, stop, timeout, live, received);
    live.errors
        .fetch_add(rep.errors.len() as u64, Ordering::Relaxed);
    rep
}

fn run_conn_inner(
    service: Service,
    addr: SocketAddr,
    id: usize,
    stop: &AtomicBool,
    timeout: Duration,
    live: &Live,
    received: Arc<Received>,
) -> ConnReport {
    let mut rep = ConnReport::default();
    let mut s = match connect(service, addr, timeout, received) {
        Ok(s) => s,
        Err(e) => {
            rep.errors.push(format!("connection {id}: connect: {e}"));
            return rep;
        }
    };
    let counter = format!("c{id}");
    let mut count: i64 = 0;
    let mut last_reply = Instant::now();
    let mut i: u64 = 0;
    let mut gap = |rep: &mut ConnReport| {
        let now = Instant::now();
        let took = now.duration_since(last_reply);
        live.replies.fetch_add(1, Ordering::Relaxed);
        live.latency_ns
            .fetch_add(took.as_nanos() as u64, Ordering::Relaxed);
        live.longest_ns
            .fetch_max(took.as_nanos() as u64, Ordering::Relaxed);
        rep.max_gap_ms = rep.max_gap_ms.max(took.as_secs_f64() * 1e3);
        last_reply = now;
        rep.requests += 1;
        rep.replies.push(now);
    };
    while !stop.load(Ordering::Relaxed) {
        i += 1;
        let key = format!("k{id}_{}", i % 64);
        let value = format!("v{id}_{i}");
        let step = (|| -> io::Result<()> {
            s.put(&key, &value)?;
            gap(&mut rep);
            if service == Service::Http {
                return Ok(());
            }
            let got = s.get(&key)?;
            gap(&mut rep);
            if got.as_deref() != Some(value.as_str()) {
                return Err(bad(format!("{key} read {got:?} after writing {value:?}")));
            }
            let n = s.incr(&counter)?;
            gap(&mut rep);
            if count > 0 && n != count + 1 {
                return Err(bad(format!("counter {counter} went from {count} to {n}")));
            }
            count = n;
            Ok(())
        })();
        if let Err(e) = step {
            rep.errors
                .push(format!("connection {id}, request {i}: {e}"));
            return rep;
        }
    }
    rep
}

/// Runs `connections` verifying connections to `addr`; calls `during` once
/// they are all busy, and stops them `after` it returned.
pub fn run(
    service: Service,
    addr: SocketAddr,
    connections: usize,
    during: impl FnOnce(),
    after: Duration,
) -> VerifyReport {
    run_observed(service, addr, connections, &Arc::default(), during, after)
}

/// [`run`], keeping `live` up to date.
pub fn run_observed(
    service: Service,
    addr: SocketAddr,
    connections: usize,
    live: &Arc<Live>,
    during: impl FnOnce(),
    after: Duration,
) -> VerifyReport {
    let stop = Arc::new(AtomicBool::new(false));
    let timeout = Duration::from_secs(10);
    let received: Vec<Arc<Received>> = (0..connections).map(|_| Arc::default()).collect();
    *live.received.lock().unwrap_or_else(|p| p.into_inner()) = received.clone();
    let handles: Vec<_> = (0..connections)
        .map(|id| {
            let stop = stop.clone();
            let live = live.clone();
            let received = received[id].clone();
            std::thread::spawn(move || run_conn(service, addr, id, &stop, timeout, &live, received))
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    during();
    let received_at_mark = received.iter().map(|r| r.len()).collect();
    std::thread::sleep(after);
    stop.store(true, Ordering::Relaxed);
    let mut out = VerifyReport {
        connections,
        received_at_mark,
        ..Default::default()
    };
    for h in handles {
        let r = h.join().unwrap_or_default();
        out.requests += r.requests;
        out.errors.extend(r.errors);
        out.max_gap_ms = out.max_gap_ms.max(r.max_gap_ms);
        out.replies.push(r.replies);
    }
    out.received = received.iter().map(|r| r.bytes()).collect();
    out
}
