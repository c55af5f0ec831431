//! The interface between rrc and librrc, two separately built programs
//! that must agree on it: how a recorded program finds its rings (the
//! environment), how `rrc replay` tells librrc what to replay (the replay
//! configuration), and what librrc writes to a replay's capture file. The
//! log and ring formats are in [`crate::log`] and [`crate::ring`].
//!
//! Everything here is versioned or fixed by a constant defined once, here:
//! the rrc side writes through it and librrc reads through it (and the
//! other way round for the capture file), so a mismatch is refused with a
//! message rather than misread.
//!
//! # Environment
//!
//! A recorded program gets `LD_PRELOAD` naming librrc and [`FD_ENV`]
//! naming, in decimal, the descriptor it inherits: the ring set of a
//! recording, or (in a replay) a file holding the [`ReplayConfig`], at the
//! same number, so that the program's environment is the recorded one
//! byte for byte.
//!
//! # Replay configuration
//!
//! Text, one setting a line, `key=value`, after a first line naming the
//! format and its version (`rrc-replay 3`). Paths are written byte for
//! byte except `%`, control characters and DEL, which are `%XX` (two
//! hexadecimal digits). A reader refuses another version, an unknown or
//! repeated key, a missing required key and a malformed value.
//!
//! | key         | value                                               | required |
//! |-------------|-----------------------------------------------------|----------|
//! | `log`       | the log directory (path)                            | yes      |
//! | `logs`      | thread log ids, comma-separated                     | yes      |
//! | `order`     | `1`: force the recorded global order                | yes      |
//! | `timing`    | `1`: wait for the recorded time between returns     | yes      |
//! | `stop`      | `1`: end the program (SIGTERM) at the end of the log| yes      |
//! | `from`      | first sequence number to replay (0: from the start) | yes      |
//! | `until`     | last sequence number to replay                      | no       |
//! | `virtual`   | descriptors of open connections, comma-separated    | yes      |
//! | `addresses` | `1`: the recorded address space (a checkpoint)      | yes      |
//! | `capture`   | the capture file (path)                             | no       |
//! | `takeover`  | the takeover socket (path; see below)               | no       |
//! | `diverge`   | `1`: the first record replayed counts as a divergence (tests of the fallback) | no |
//!
//! # Takeover
//!
//! A backup taking over replays the log in a copy whose connections are
//! to become live at its end. With `takeover` set, a thread whose log has
//! ended (or that diverged) parks at its next wrapped call instead of
//! running live. Once every record is done (or a thread diverged), one
//! parked thread connects to the takeover socket (a unix stream socket)
//! and the two sides exchange lines ([`TakeoverLine`]):
//!
//! 1. librrc: for each thread parked at a write to a connection, `pending
//!    FD LEN` followed by the LEN bytes it is writing (the primary may
//!    have sent them already: a frame leaves once the log up to its making
//!    is acknowledged, and a write is recorded once it returns); then
//!    `end` (every record replayed) or `diverged WHY` (WHY: the first
//!    divergence as the replay described it, one line of printable text);
//! 2. rrc: any number of `install FD...` lines, each with as many
//!    descriptors attached (`SCM_RIGHTS`, at most [`TAKEOVER_BATCH`]): the
//!    rebuilt connections, to be put at those numbers in place of what is
//!    there (keeping its status flags, close-on-exec, socket options and
//!    epoll registrations); then, if the service is to be replicated again
//!    in responsive mode, `rings` with one descriptor attached: a new ring
//!    set, which librrc puts at the rings' descriptor number ([`FD_ENV`])
//!    and records into from the moment the program runs live; then `go`,
//!    or at any point `abort`;
//! 3. librrc: `installed N` once all are in place (the parked threads then
//!    run live, each pending write done: its bytes are in the rebuilt
//!    connection, and recording into the new rings if there are some), or
//!    `failed FD ERRNO` (they stay parked; rrc falls back; FD is the
//!    rings' number if they are what failed).
//!
//! # Capture file
//!
//! What a replayed program writes to its connections, which a replay
//! does not send: records of descriptor (u32 LE), length (u32 LE) and that
//! many bytes, appended each with one `write` (so that records of
//! different threads never mix). A length of [`CAPTURE_CLOSED`] (no bytes
//! follow) marks the descriptor's connection closed: its number may be
//! another connection's after it. A descriptor with [`CAPTURE_EARLIER`]
//! set marks bytes written before the checkpoint the replay started from
//! (it caught the call between the write and its record): the restored
//! connection holds them already. A descriptor with [`CAPTURE_READ_EARLIER`]
//! set (no bytes follow) says that a read of that many bytes from it was
//! made before the checkpoint in the same way: the restored connection no
//! longer holds them, though the log has the read after the checkpoint.

use std::ffi::{CStr, OsStr};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

use thiserror::Error;

/// The environment variable naming the descriptor librrc inherits.
pub const FD_ENV: &CStr = c"RRC_RR_FD";

/// [`FD_ENV`]'s value for descriptor `fd`.
pub fn fd_env_value(fd: i32) -> String {
    fd.to_string()
}

/// The descriptor named by [`FD_ENV`]'s value, if it is one (decimal, not
/// negative). Allocation-free, for librrc's constructor.
pub fn parse_fd_env(value: &[u8]) -> Option<i32> {
    if value.is_empty() || value.len() > 10 {
        return None;
    }
    let mut fd: i64 = 0;
    for &b in value {
        if !b.is_ascii_digit() {
            return None;
        }
        fd = fd * 10 + i64::from(b - b'0');
    }
    i32::try_from(fd).ok()
}

/// Why something `rrc` and librrc exchange was refused.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum InterfaceError {
    /// The bytes do not start with the configuration's format name.
    #[error("not a replay configuration (it does not start with `{CONFIG_FORMAT}`)")]
    NotReplayConfig,
    /// A configuration of another version.
    #[error(
        "replay configuration format version {found}, but this build reads version {supported}: rrc and librrc must come from the same build"
    )]
    ConfigVersion {
        /// The version found (1 for the first, unversioned, format).
        found: u32,
        /// The version this build reads.
        supported: u32,
    },
    /// A configuration line that does not check out.
    #[error("replay configuration, line {line}: {problem}")]
    Config {
        /// Line number, from 1.
        line: usize,
        /// What is wrong with it.
        problem: String,
    },
    /// A capture file whose last record is cut short.
    #[error(
        "capture file: the record at byte {offset} (after {complete} complete record(s)) is torn: it needs {needed} bytes, {available} are left"
    )]
    TornCapture {
        /// Where the torn record starts.
        offset: usize,
        /// Records before it.
        complete: usize,
        /// Bytes the record needs (header and data).
        needed: u64,
        /// Bytes the file has from `offset` on.
        available: usize,
    },
}

/// Name of the replay configuration format, its first line's first word.
pub const CONFIG_FORMAT: &str = "rrc-replay";
/// Version of the replay configuration format this build writes and reads.
pub const CONFIG_VERSION: u32 = 3;

/// Whether `head` (a file's first bytes, at least [`CONFIG_FORMAT`]'s
/// length and one more) starts a replay configuration of any version, as
/// opposed to the ring set a recording passes at the same descriptor.
pub fn is_replay_config(head: &[u8]) -> bool {
    head.strip_prefix(CONFIG_FORMAT.as_bytes())
        .and_then(|rest| rest.first())
        .is_some_and(|b| *b == b' ' || *b == b'\n')
}

/// How librrc is to replay a recording: written by `rrc replay`, read by
/// librrc in the replayed program.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplayConfig {
    /// The log directory.
    pub log_dir: PathBuf,
    /// The thread logs in it (librrc must not list the directory: the C
    /// library's `opendir` allocates with the program's allocator).
    pub logs: Vec<u32>,
    /// Force the recorded global order of returns.
    pub order: bool,
    /// Wait for the recorded time between returns (where the records
    /// left to replay are of more than one thread).
    pub timing: bool,
    /// End the program (SIGTERM) once every record has been replayed.
    pub stop_at_end: bool,
    /// Where what the program writes to its connections goes.
    pub capture: Option<PathBuf>,
    /// The first sequence number to replay: a copy restored from a
    /// checkpoint has done everything before it (0 from the start).
    pub from: u64,
    /// The last sequence number the replay may serve: records above it are
    /// treated as the end of their thread's log (a log whose tail after a
    /// gap is not to be replayed).
    pub until: Option<u64>,
    /// Connections open at the checkpoint: their input comes from the log,
    /// what is written to them is captured.
    pub virtual_fds: Vec<i32>,
    /// The program runs in the recorded address space (a restored
    /// checkpoint): objects of synchronization operations must match.
    pub same_addresses: bool,
    /// A takeover: threads park at the end of the log and this socket
    /// hands them the rebuilt connections.
    pub takeover: Option<PathBuf>,
    /// Count the first record replayed as a divergence (to test what
    /// follows one).
    pub inject_divergence: bool,
}

impl ReplayConfig {
    /// The configuration's bytes.
    pub fn encode(&self) -> Vec<u8> {
        fn list<T: ToString>(v: &[T]) -> String {
            v.iter().map(T::to_string).collect::<Vec<_>>().join(",")
        }
        let mut out = format!("{CONFIG_FORMAT} {CONFIG_VERSION}\n").into_bytes();
        let mut line = |key: &str, value: &[u8]| {
            out.extend_from_slice(key.as_bytes());
            out.push(b'=');
            out.extend_from_slice(value);
            out.push(b'\n');
        };
        line("log", &escape(self.log_dir.as_os_str().as_bytes()));
        line("logs", list(&self.logs).as_bytes());
        line("order", flag(self.order));
        line("timing", flag(self.timing));
        line("stop", flag(self.stop_at_end));
        line("from", self.from.to_string().as_bytes());
        if let Some(until) = self.until {
            line("until", until.to_string().as_bytes());
        }
        line("virtual", list(&self.virtual_fds).as_bytes());
        line("addresses", flag(self.same_addresses));
        if let Some(c) = &self.capture {
            line("capture", &escape(c.as_os_str().as_bytes()));
        }
        if let Some(t) = &self.takeover {
            line("takeover", &escape(t.as_os_str().as_bytes()));
        }
        if self.inject_divergence {
            line("diverge", flag(true));
        }
        out
    }

    /// Reads a configuration, refusing any other version and anything
    /// that does not check out.
    pub fn parse(bytes: &[u8]) -> Result<ReplayConfig, InterfaceError> {
        let mut lines = bytes.split(|b| *b == b'\n');
        let first = lines.next().unwrap_or_default();
        let Some(version) = first.strip_prefix(CONFIG_FORMAT.as_bytes()) else {
            return Err(InterfaceError::NotReplayConfig);
        };
        let found = match version {
            // The first format had no version.
            b"" => 1,
            v => v
                .strip_prefix(b" ")
                .and_then(|v| std::str::from_utf8(v).ok())
                .and_then(|v| v.parse::<u32>().ok())
                .ok_or_else(|| bad(1, "the first line is not `rrc-replay VERSION`"))?,
        };
        if found != CONFIG_VERSION {
            return Err(InterfaceError::ConfigVersion {
                found,
                supported: CONFIG_VERSION,
            });
        }
        let mut seen: Vec<&str> = Vec::new();
        let mut cfg = ReplayConfig {
            log_dir: PathBuf::new(),
            logs: Vec::new(),
            order: true,
            timing: true,
            stop_at_end: false,
            capture: None,
            from: 0,
            until: None,
            virtual_fds: Vec::new(),
            same_addresses: false,
            takeover: None,
            inject_divergence: false,
        };
        let mut ended = false;
        for (i, raw) in lines.enumerate() {
            let n = i + 2;
            if ended {
                return Err(bad(n - 1, "an empty line before the end"));
            }
            if raw.is_empty() {
                // Only the end of the text (after its last newline).
                ended = true;
                continue;
            }
            let eq = raw
                .iter()
                .position(|b| *b == b'=')
                .ok_or_else(|| bad(n, "not `key=value`"))?;
            let (key, value) = (&raw[..eq], &raw[eq + 1..]);
            let key = std::str::from_utf8(key).map_err(|_| bad(n, "a key that is not text"))?;
            let key = KEYS
                .iter()
                .map(|(k, _)| *k)
                .find(|k| *k == key)
                .ok_or_else(|| bad(n, &format!("unknown setting `{key}`")))?;
            if seen.contains(&key) {
                return Err(bad(n, &format!("`{key}` is set twice")));
            }
            seen.push(key);
            let text =
                || std::str::from_utf8(value).map_err(|_| bad(n, "a value that is not text"));
            let number = || -> Result<u64, InterfaceError> {
                text()?
                    .parse::<u64>()
                    .map_err(|_| bad(n, &format!("`{key}` is not a number")))
            };
            match key {
                "log" => cfg.log_dir = PathBuf::from(OsStr::from_bytes(&unescape(value, n)?)),
                "capture" => {
                    cfg.capture = Some(PathBuf::from(OsStr::from_bytes(&unescape(value, n)?)))
                }
                "logs" => cfg.logs = parse_list(text()?, n, key)?,
                "virtual" => cfg.virtual_fds = parse_list(text()?, n, key)?,
                "order" => cfg.order = parse_flag(value, n, key)?,
                "timing" => cfg.timing = parse_flag(value, n, key)?,
                "stop" => cfg.stop_at_end = parse_flag(value, n, key)?,
                "addresses" => cfg.same_addresses = parse_flag(value, n, key)?,
                "takeover" => {
                    cfg.takeover = Some(PathBuf::from(OsStr::from_bytes(&unescape(value, n)?)))
                }
                "diverge" => cfg.inject_divergence = parse_flag(value, n, key)?,
                "from" => cfg.from = number()?,
                "until" => cfg.until = Some(number()?),
                _ => unreachable!("every key of KEYS is handled"),
            }
        }
        if !ended {
            return Err(bad(0, "the text does not end with a newline (torn)"));
        }
        if let Some((missing, _)) = KEYS
            .iter()
            .find(|(k, required)| *required && !seen.contains(k))
        {
            return Err(bad(0, &format!("`{missing}` is missing")));
        }
        Ok(cfg)
    }
}

/// Every key of the configuration, and whether it is required (the table
/// in the module's documentation).
const KEYS: &[(&str, bool)] = &[
    ("log", true),
    ("logs", true),
    ("order", true),
    ("timing", true),
    ("stop", true),
    ("from", true),
    ("until", false),
    ("virtual", true),
    ("addresses", true),
    ("capture", false),
    ("takeover", false),
    ("diverge", false),
];

/// Most descriptors one `install` line carries (below the kernel's
/// SCM_MAX_FD of 253).
pub const TAKEOVER_BATCH: usize = 200;
/// Longest line of the takeover exchange (an `install` line of a full
/// batch fits).
pub const TAKEOVER_LINE_MAX: usize = 2048;

/// One line of the takeover exchange (see the module documentation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TakeoverLine {
    /// librrc: a parked thread is writing this many bytes (they follow
    /// the line) to this descriptor.
    Pending { fd: i32, len: u32 },
    /// librrc: every record was replayed.
    End,
    /// librrc: a thread left the recorded path; where and how, as the
    /// replay described its first divergence (printable, one line).
    Diverged(String),
    /// rrc: put the attached descriptors at these numbers.
    Install(Vec<i32>),
    /// rrc: record into the ring set attached (one descriptor) once
    /// live, at the rings' descriptor number.
    Rings,
    /// rrc: nothing more to install; run live.
    Go,
    /// rrc: the takeover does not go on with this copy.
    Abort,
    /// librrc: this many connections are in place.
    Installed(u32),
    /// librrc: putting a connection at `fd` failed with `errno`.
    Failed { fd: i32, errno: i32 },
}

/// Longest reason a `diverged` line carries.
const DIVERGED_WHY_MAX: usize = 400;

/// `why` as a `diverged` line carries it: printable ASCII only (the
/// replayed program may have put anything in its descriptions), cut to
/// [`DIVERGED_WHY_MAX`], without spaces at its ends.
fn printable_why(why: &str) -> String {
    why.chars()
        .map(|c| if c.is_ascii_graphic() { c } else { ' ' })
        .take(DIVERGED_WHY_MAX)
        .collect::<String>()
        .trim()
        .to_string()
}

impl TakeoverLine {
    /// The line's text, newline included.
    pub fn encode(&self) -> Vec<u8> {
        let text = match self {
            TakeoverLine::Pending { fd, len } => format!("pending {fd} {len}"),
            TakeoverLine::End => "end".to_string(),
            TakeoverLine::Diverged(why) => format!("diverged {}", printable_why(why)),
            TakeoverLine::Install(fds) => {
                let mut t = "install".to_string();
                for fd in fds {
                    t += &format!(" {fd}");
                }
                t
            }
            TakeoverLine::Rings => "rings".to_string(),
            TakeoverLine::Go => "go".to_string(),
            TakeoverLine::Abort => "abort".to_string(),
            TakeoverLine::Installed(n) => format!("installed {n}"),
            TakeoverLine::Failed { fd, errno } => format!("failed {fd} {errno}"),
        };
        let mut out = text.into_bytes();
        out.push(b'\n');
        out
    }

    /// Reads one line (without its newline); `None` if it is not one.
    pub fn parse(line: &[u8]) -> Option<TakeoverLine> {
        let text = std::str::from_utf8(line).ok()?;
        let mut words = text.split(' ');
        let numbers = |w: std::str::Split<'_, char>| -> Option<Vec<i64>> {
            w.map(|x| x.parse::<i64>().ok()).collect()
        };
        let line = match words.next()? {
            "end" => TakeoverLine::End,
            "diverged" => {
                let why: Vec<&str> = words.collect();
                return Some(TakeoverLine::Diverged(printable_why(&why.join(" "))));
            }
            "rings" => TakeoverLine::Rings,
            "go" => TakeoverLine::Go,
            "abort" => TakeoverLine::Abort,
            "install" => {
                let fds = numbers(words.clone())?
                    .into_iter()
                    .map(|n| i32::try_from(n).ok().filter(|n| *n >= 0))
                    .collect::<Option<Vec<i32>>>()?;
                if fds.is_empty() || fds.len() > TAKEOVER_BATCH {
                    return None;
                }
                return Some(TakeoverLine::Install(fds));
            }
            "installed" => match numbers(words.clone())?.as_slice() {
                [n] => TakeoverLine::Installed(u32::try_from(*n).ok()?),
                _ => return None,
            },
            "pending" => match numbers(words.clone())?.as_slice() {
                [fd, len] => TakeoverLine::Pending {
                    fd: i32::try_from(*fd).ok().filter(|f| *f >= 0)?,
                    len: u32::try_from(*len).ok()?,
                },
                _ => return None,
            },
            "failed" => match numbers(words.clone())?.as_slice() {
                [fd, errno] => TakeoverLine::Failed {
                    fd: i32::try_from(*fd).ok()?,
                    errno: i32::try_from(*errno).ok()?,
                },
                _ => return None,
            },
            _ => return None,
        };
        // Words after a line that takes none.
        match line {
            TakeoverLine::End | TakeoverLine::Rings | TakeoverLine::Go | TakeoverLine::Abort
                if words.next().is_some() =>
            {
                None
            }
            l => Some(l),
        }
    }
}

fn bad(line: usize, problem: &str) -> InterfaceError {
    InterfaceError::Config {
        line,
        problem: problem.to_string(),
    }
}

fn flag(v: bool) -> &'static [u8] {
    if v { b"1" } else { b"0" }
}

fn parse_flag(v: &[u8], line: usize, key: &str) -> Result<bool, InterfaceError> {
    match v {
        b"0" => Ok(false),
        b"1" => Ok(true),
        _ => Err(bad(line, &format!("`{key}` is neither 0 nor 1"))),
    }
}

fn parse_list<T: std::str::FromStr>(
    v: &str,
    line: usize,
    key: &str,
) -> Result<Vec<T>, InterfaceError> {
    if v.is_empty() {
        return Ok(Vec::new());
    }
    v.split(',')
        .map(|x| {
            x.parse()
                .map_err(|_| bad(line, &format!("`{key}` holds {x:?}, not a number")))
        })
        .collect()
}

/// A path's bytes with `%`, control characters and DEL as `%XX`, so that
/// no path can end its line early.
fn escape(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len());
    for &b in bytes {
        if b == b'%' || b < 0x20 || b == 0x7f {
            out.extend_from_slice(format!("%{b:02X}").as_bytes());
        } else {
            out.push(b);
        }
    }
    out
}

fn unescape(bytes: &[u8], line: usize) -> Result<Vec<u8>, InterfaceError> {
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| bad(line, "a `%` not followed by two hexadecimal digits"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    Ok(out)
}

/// The lowest descriptor number librrc gives the capture file, out of the
/// way of the program's own (which takes the lowest free ones). A replay
/// gives the process's fd table room for it beforehand.
pub const CAPTURE_FD_FROM: i32 = 900;

/// Length of a capture record's header (descriptor and length).
pub const CAPTURE_HEADER_LEN: usize = 8;
/// The length field of a record marking a connection closed.
pub const CAPTURE_CLOSED: u32 = u32::MAX;
/// The most bytes one record carries (a longer write takes several).
pub const CAPTURE_MAX_LEN: u32 = u32::MAX - 1;
/// Set in a record's descriptor: the bytes were written before the
/// checkpoint (see the module documentation).
pub const CAPTURE_EARLIER: u32 = 1 << 31;
/// Set in a record's descriptor: a read of `len` bytes made before the
/// checkpoint (see the module documentation).
pub const CAPTURE_READ_EARLIER: u32 = 1 << 30;

/// A capture record's header: descriptor `fd`, then `len` (the number of
/// bytes that follow, or [`CAPTURE_CLOSED`]). Allocation-free, for
/// librrc's writer.
pub fn capture_header(fd: i32, len: u32) -> [u8; CAPTURE_HEADER_LEN] {
    let mut head = [0u8; CAPTURE_HEADER_LEN];
    head[..4].copy_from_slice(&(fd as u32).to_le_bytes());
    head[4..].copy_from_slice(&len.to_le_bytes());
    head
}

/// One record of a capture file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CaptureRecord {
    /// Bytes the program wrote to descriptor `fd`.
    Written {
        /// The descriptor.
        fd: u32,
        /// What was written.
        bytes: Vec<u8>,
        /// Written before the checkpoint: the connection holds them
        /// already.
        earlier: bool,
    },
    /// The connection on `fd` was closed.
    Closed {
        /// The descriptor.
        fd: u32,
    },
    /// A read of `len` bytes from `fd` was made before the checkpoint,
    /// though the log has it after.
    ReadEarlier {
        /// The descriptor.
        fd: u32,
        /// Bytes read.
        len: u32,
    },
}

impl CaptureRecord {
    /// The record's descriptor.
    pub fn fd(&self) -> u32 {
        match self {
            CaptureRecord::Written { fd, .. }
            | CaptureRecord::Closed { fd }
            | CaptureRecord::ReadEarlier { fd, .. } => *fd,
        }
    }
}

/// Every record of a capture file, in order. A file that ends part-way
/// through a record (the program was killed while writing it) is
/// reported as [`InterfaceError::TornCapture`], never read past.
pub fn parse_capture(bytes: &[u8]) -> Result<Vec<CaptureRecord>, InterfaceError> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let rest = &bytes[at..];
        let torn = |needed: u64| InterfaceError::TornCapture {
            offset: at,
            complete: out.len(),
            needed,
            available: rest.len(),
        };
        let Some(head) = rest.get(..CAPTURE_HEADER_LEN) else {
            return Err(torn(CAPTURE_HEADER_LEN as u64));
        };
        let raw = u32::from_le_bytes(head[..4].try_into().expect("4 bytes"));
        let (fd, earlier) = (raw & !CAPTURE_EARLIER, raw & CAPTURE_EARLIER != 0);
        let len = u32::from_le_bytes(head[4..].try_into().expect("4 bytes"));
        if fd & CAPTURE_READ_EARLIER != 0 {
            out.push(CaptureRecord::ReadEarlier {
                fd: fd & !CAPTURE_READ_EARLIER,
                len,
            });
            at += CAPTURE_HEADER_LEN;
            continue;
        }
        if len == CAPTURE_CLOSED {
            out.push(CaptureRecord::Closed { fd });
            at += CAPTURE_HEADER_LEN;
            continue;
        }
        let end = CAPTURE_HEADER_LEN as u64 + u64::from(len);
        let Some(data) = rest.get(CAPTURE_HEADER_LEN..end as usize) else {
            return Err(torn(end));
        };
        out.push(CaptureRecord::Written {
            fd,
            bytes: data.to_vec(),
            earlier,
        });
        at += end as usize;
    }
    Ok(out)
}

/// Each connection's output in a capture, in order: a connection ends at
/// its close mark, after which its descriptor number may be another
/// connection's. Connections still open at the end come last, by
/// descriptor.
pub fn connection_streams(records: Vec<CaptureRecord>) -> Vec<(u32, Vec<u8>)> {
    let mut done = Vec::new();
    let mut open = std::collections::BTreeMap::<u32, Vec<u8>>::new();
    for r in records {
        match r {
            CaptureRecord::Written { fd, bytes, .. } => {
                open.entry(fd).or_default().extend_from_slice(&bytes)
            }
            CaptureRecord::Closed { fd } => done.extend(open.remove(&fd).map(|b| (fd, b))),
            CaptureRecord::ReadEarlier { .. } => {}
        }
    }
    done.extend(open);
    done
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> ReplayConfig {
        ReplayConfig {
            log_dir: PathBuf::from("/var/log/rec 1"),
            logs: vec![1, 2, 17],
            order: true,
            timing: false,
            stop_at_end: true,
            capture: Some(PathBuf::from("/tmp/cap")),
            from: 1234,
            until: Some(99_999),
            virtual_fds: vec![5, 9],
            same_addresses: true,
            takeover: None,
            inject_divergence: false,
        }
    }

    #[test]
    fn a_takeover_configuration_reads_back() {
        let c = ReplayConfig {
            takeover: Some(PathBuf::from("/run/x/takeover.sock")),
            inject_divergence: true,
            ..sample()
        };
        assert_eq!(ReplayConfig::parse(&c.encode()).unwrap(), c);
    }

    #[test]
    fn takeover_lines_read_back_and_bad_ones_are_refused() {
        for l in [
            TakeoverLine::End,
            TakeoverLine::Diverged("in thread 2 at event #7: the program called read".into()),
            TakeoverLine::Diverged(String::new()),
            TakeoverLine::Install(vec![5, 7, 1000]),
            TakeoverLine::Rings,
            TakeoverLine::Go,
            TakeoverLine::Abort,
            TakeoverLine::Installed(3),
            TakeoverLine::Failed { fd: 9, errno: 22 },
            TakeoverLine::Pending { fd: 9, len: 14 },
        ] {
            let text = l.encode();
            assert_eq!(text.last(), Some(&b'\n'));
            assert_eq!(TakeoverLine::parse(&text[..text.len() - 1]), Some(l));
        }
        for bad in [
            &b"install"[..],
            b"install -1",
            b"install x",
            b"end now",
            b"installed",
            b"failed 1",
            b"",
            b"\xff",
        ] {
            assert_eq!(TakeoverLine::parse(bad), None, "{bad:?}");
        }
        assert_eq!(
            TakeoverLine::parse("diverged at\u{1}#3\u{e9}".as_bytes()),
            Some(TakeoverLine::Diverged("at #3".into()))
        );
        let long = TakeoverLine::Diverged("x".repeat(TAKEOVER_LINE_MAX)).encode();
        assert!(long.len() <= TAKEOVER_LINE_MAX);
        let many = format!("install{}", " 3".repeat(TAKEOVER_BATCH + 1));
        assert_eq!(TakeoverLine::parse(many.as_bytes()), None);
        let full = TakeoverLine::Install(vec![65535; TAKEOVER_BATCH]).encode();
        assert!(full.len() <= TAKEOVER_LINE_MAX);
    }

    #[test]
    fn a_configuration_reads_back_as_written() {
        let c = sample();
        let text = c.encode();
        assert!(text.starts_with(b"rrc-replay 3\n"), "{text:?}");
        assert!(is_replay_config(&text));
        assert_eq!(ReplayConfig::parse(&text).unwrap(), c);
        let bare = ReplayConfig {
            capture: None,
            until: None,
            virtual_fds: Vec::new(),
            ..c
        };
        assert_eq!(ReplayConfig::parse(&bare.encode()).unwrap(), bare);
    }

    #[test]
    fn any_path_survives_the_text_format() {
        let odd = OsStr::from_bytes(b"/tmp/a\nb=c%d\x01\xff\x7f e");
        let c = ReplayConfig {
            log_dir: PathBuf::from(odd),
            capture: Some(PathBuf::from(odd)),
            ..sample()
        };
        let text = c.encode();
        assert_eq!(text.iter().filter(|b| **b == b'\n').count(), 11);
        assert_eq!(ReplayConfig::parse(&text).unwrap(), c);
    }

    #[test]
    fn another_version_is_refused_with_both_versions_named() {
        let text = sample().encode();
        let v2 = [b"rrc-replay 2".as_slice(), &text[12..]].concat();
        let e = ReplayConfig::parse(&v2).unwrap_err();
        assert_eq!(
            e,
            InterfaceError::ConfigVersion {
                found: 2,
                supported: 3
            }
        );
        assert!(e.to_string().contains("version 2"), "{e}");
        assert!(e.to_string().contains("reads version 3"), "{e}");
        // The first format: no version at all.
        let v1 = b"rrc-replay\nlog=/x\nlogs=1\n";
        assert!(is_replay_config(v1));
        assert_eq!(
            ReplayConfig::parse(v1).unwrap_err(),
            InterfaceError::ConfigVersion {
                found: 1,
                supported: 3
            }
        );
        assert!(matches!(
            ReplayConfig::parse(b"rrc-replay two\n"),
            Err(InterfaceError::Config { line: 1, .. })
        ));
    }

    #[test]
    fn what_is_not_a_configuration_is_told_apart() {
        assert!(!is_replay_config(b"RRCRSET\0"));
        assert!(!is_replay_config(b"rrc-replayed\n"));
        assert!(!is_replay_config(b"rrc-rep"));
        assert_eq!(
            ReplayConfig::parse(b"RRCRSET\0\x03\0\0\0"),
            Err(InterfaceError::NotReplayConfig)
        );
        assert_eq!(
            ReplayConfig::parse(b""),
            Err(InterfaceError::NotReplayConfig)
        );
    }

    #[test]
    fn bad_settings_are_refused_with_their_line() {
        let good = String::from_utf8(sample().encode()).unwrap();
        let refused =
            |text: &str, line: usize, needle: &str| match ReplayConfig::parse(text.as_bytes()) {
                Err(InterfaceError::Config { line: l, problem }) => {
                    assert_eq!(l, line, "{text:?}: {problem}");
                    assert!(problem.contains(needle), "{text:?}: {problem}");
                }
                other => panic!("{text:?} gave {other:?}"),
            };
        refused(&good.replace("order=1", "order=yes"), 4, "neither 0 nor 1");
        refused(&good.replace("from=1234", "from=-1"), 7, "not a number");
        refused(&good.replace("logs=1,2,17", "logs=1,,2"), 3, "not a number");
        refused(&format!("{good}colour=blue\n"), 12, "unknown setting");
        refused(&format!("{good}from=1\n"), 12, "set twice");
        refused(&good.replace("timing=0\n", ""), 0, "`timing` is missing");
        refused(good.trim_end(), 0, "torn");
        refused(&good.replace("stop=1\n", "stop=1\n\n"), 7, "empty line");
        refused(&good.replace("log=/var", "log=/v%zr"), 2, "hexadecimal");
        refused(&good.replace("addresses=1", "addresses"), 10, "key=value");
    }

    #[test]
    fn the_descriptor_variable_reads_back() {
        assert_eq!(FD_ENV.to_bytes(), b"RRC_RR_FD");
        for fd in [0, 3, 1023, i32::MAX] {
            assert_eq!(parse_fd_env(fd_env_value(fd).as_bytes()), Some(fd));
        }
        for bad in [&b""[..], b"-1", b"3 ", b"x", b"2147483648", b"99999999999"] {
            assert_eq!(parse_fd_env(bad), None, "{bad:?}");
        }
    }

    fn capture(records: &[(i32, Option<&[u8]>)]) -> Vec<u8> {
        let mut out = Vec::new();
        for (fd, bytes) in records {
            match bytes {
                Some(b) => {
                    out.extend(capture_header(*fd, b.len() as u32));
                    out.extend_from_slice(b);
                }
                None => out.extend(capture_header(*fd, CAPTURE_CLOSED)),
            }
        }
        out
    }

    #[test]
    fn a_capture_file_reads_back_record_by_record() {
        let file = capture(&[
            (5, Some(b"hello")),
            (6, Some(b"")),
            (5, None),
            ((5 | CAPTURE_EARLIER) as i32, Some(b"x")),
        ]);
        let mut file = file;
        file.extend(capture_header((5 | CAPTURE_READ_EARLIER) as i32, 9));
        assert_eq!(
            parse_capture(&file).unwrap(),
            vec![
                CaptureRecord::Written {
                    fd: 5,
                    bytes: b"hello".to_vec(),
                    earlier: false,
                },
                CaptureRecord::Written {
                    fd: 6,
                    bytes: Vec::new(),
                    earlier: false,
                },
                CaptureRecord::Closed { fd: 5 },
                CaptureRecord::Written {
                    fd: 5,
                    bytes: b"x".to_vec(),
                    earlier: true,
                },
                CaptureRecord::ReadEarlier { fd: 5, len: 9 },
            ]
        );
        assert_eq!(parse_capture(&[]).unwrap(), Vec::new());
    }

    #[test]
    fn a_torn_capture_tail_is_reported_at_every_cut() {
        let file = capture(&[(5, Some(b"hello")), (7, None), (5, Some(b"world!"))]);
        // Cut anywhere inside the last record: header or data.
        let last = 13 + 8;
        for cut in last + 1..file.len() {
            assert_eq!(
                parse_capture(&file[..cut]),
                Err(InterfaceError::TornCapture {
                    offset: last,
                    complete: 2,
                    needed: if cut - last < 8 { 8 } else { 14 },
                    available: cut - last,
                }),
                "cut at {cut}"
            );
        }
        assert_eq!(parse_capture(&file[..last]).unwrap().len(), 2);
        // A length no file holds.
        let mut huge = capture_header(3, u32::MAX - 1).to_vec();
        huge.extend_from_slice(b"abc");
        assert!(matches!(
            parse_capture(&huge),
            Err(InterfaceError::TornCapture { needed, .. }) if needed == u64::from(u32::MAX - 1) + 8
        ));
    }
}
