//! What /proc says about a process beyond what the `procfs` crate parses:
//! fdinfo, POSIX timers, and the pagemap.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::image::{ClockOffset, TimeOffsets};
use crate::{Error, Result};

pub const PAGE_SIZE: u64 = 4096;

/// The whole of a /proc file, in as few calls as it takes: open, one read
/// per 4 KiB or more, close. (`std::fs::read` asks the file's size first,
/// which /proc files do not give, then reads in steps growing from 32
/// bytes: eight or more calls for a thread's `stat`, while the tree is
/// stopped.)
pub fn read_bytes(path: impl AsRef<Path>) -> std::io::Result<Vec<u8>> {
    let mut f = File::open(path)?;
    let mut buf = vec![0u8; 4096];
    let mut len = 0;
    loop {
        if len == buf.len() {
            buf.resize(len * 2, 0);
        }
        match f.read(&mut buf[len..]) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buf.truncate(len);
    Ok(buf)
}

/// [`read_bytes`], as text.
pub fn read_text(path: impl AsRef<Path>) -> std::io::Result<String> {
    String::from_utf8(read_bytes(path)?)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

/// A task's pids (the `NSpid` line of its `status` at `path`), the
/// outermost pid namespace's first; `None` when it has no such line.
pub fn read_nspid(path: impl AsRef<Path>) -> std::io::Result<Option<Vec<i32>>> {
    Ok(nspid_of(&read_text(path)?))
}

/// The `NSpid:` line of a status file's text, as [`read_nspid`] gives it.
pub fn nspid_of(status: &str) -> Option<Vec<i32>> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("NSpid:"))
        .map(|l| {
            l.split_whitespace()
                .filter_map(|w| w.parse().ok())
                .collect()
        })
}

/// The clock offsets of the time namespace process `pid`'s next children
/// go to (`/proc/PID/timens_offsets`): its own's, unless it has unshared
/// one since.
pub fn read_timens_offsets(pid: i32) -> std::io::Result<TimeOffsets> {
    let text = read_text(format!("/proc/{pid}/timens_offsets"))?;
    parse_timens_offsets(&text).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("unexpected timens_offsets: {text:?}"),
        )
    })
}

/// `timens_offsets` lines: a clock (by name, or by number as a write may
/// give it), seconds and nanoseconds. Both clocks must be there.
pub fn parse_timens_offsets(text: &str) -> Option<TimeOffsets> {
    let (mut monotonic, mut boottime) = (None, None);
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let w: Vec<&str> = line.split_whitespace().collect();
        let [clock, secs, nsecs] = w[..] else {
            return None;
        };
        let offset = ClockOffset {
            secs: secs.parse().ok()?,
            nsecs: nsecs.parse().ok().filter(|n| *n < 1_000_000_000)?,
        };
        match clock {
            "monotonic" | "1" => monotonic = Some(offset),
            "boottime" | "7" => boottime = Some(offset),
            _ => return None,
        }
    }
    Some(TimeOffsets {
        monotonic: monotonic?,
        boottime: boottime?,
    })
}

/// The text that gives a time namespace `o`, as the file takes it.
pub fn timens_offsets_text(o: &TimeOffsets) -> String {
    format!(
        "monotonic {} {}\nboottime {} {}\n",
        o.monotonic.secs, o.monotonic.nsecs, o.boottime.secs, o.boottime.nsecs
    )
}

/// Gives the time namespace process `pid` has just unshared for its
/// children the offsets `o` (possible only before a process enters it).
pub fn write_timens_offsets(pid: i32, o: &TimeOffsets) -> std::io::Result<()> {
    // One write: the kernel takes every line of a write or none.
    std::fs::write(
        format!("/proc/{pid}/timens_offsets"),
        timens_offsets_text(o),
    )
}

/// The fields of a task's `stat` at `path` after its command name (the
/// state first), which a command name with spaces cannot shift.
pub fn read_stat_fields(path: impl AsRef<Path>) -> Option<Vec<String>> {
    let text = read_text(path).ok()?;
    let rest = &text[text.rfind(')')? + 1..];
    Some(rest.split_whitespace().map(str::to_string).collect())
}

/// `/proc/PID/fdinfo/FD`, as key/value lines plus the epoll target lines.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FdInfo {
    pub pos: u64,
    pub flags: u32,
    pub fields: BTreeMap<String, String>,
    pub epoll: Vec<EpollLine>,
    /// Lines naming inotify watches or fanotify marks: present means the fd
    /// is one of those.
    pub watches: usize,
    /// The `inotify wd:...` lines, one per watch.
    pub inotify: Vec<String>,
    /// The `fanotify ...` lines: the group's first, then one per mark.
    pub fanotify: Vec<String>,
    /// The `lock:` lines (what follows the key), one per lock held through
    /// this fd's open file by its owner.
    pub locks: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EpollLine {
    pub tfd: i32,
    pub events: u32,
    pub data: u64,
    /// The target file's inode (0 if the kernel did not say).
    pub ino: u64,
}

pub fn read_fdinfo(pid: i32, fd: i32) -> Result<FdInfo> {
    let text = read_text(format!("/proc/{pid}/fdinfo/{fd}")).map_err(|e| Error::Proc {
        pid,
        what: "fdinfo",
        detail: e.to_string(),
    })?;
    parse_fdinfo(&text).ok_or_else(|| Error::Proc {
        pid,
        what: "fdinfo",
        detail: format!("unexpected content for fd {fd}: {text:?}"),
    })
}

pub fn parse_fdinfo(text: &str) -> Option<FdInfo> {
    let mut info = FdInfo::default();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("tfd:") {
            // "tfd:        5 events:       19 data:                0  pos:0 ino:.. sdev:.."
            let words: Vec<&str> = rest.split_whitespace().collect();
            let tfd = words.first()?.parse().ok()?;
            let mut events = None;
            let mut data = None;
            let mut ino = 0;
            for w in words.windows(2) {
                match w[0] {
                    "events:" => events = u32::from_str_radix(w[1], 16).ok(),
                    "data:" => data = u64::from_str_radix(w[1], 16).ok(),
                    _ => {}
                }
            }
            for w in &words {
                if let Some(v) = w.strip_prefix("ino:") {
                    ino = u64::from_str_radix(v, 16).unwrap_or(0);
                }
            }
            info.epoll.push(EpollLine {
                tfd,
                events: events?,
                data: data?,
                ino,
            });
            continue;
        }
        if let Some(rest) = line.strip_prefix("inotify ") {
            info.watches += 1;
            info.inotify.push(rest.to_string());
            continue;
        }
        if let Some(rest) = line.strip_prefix("fanotify ") {
            info.watches += 1;
            info.fanotify.push(rest.to_string());
            continue;
        }
        if let Some(rest) = line.strip_prefix("lock:") {
            info.locks.push(rest.trim().to_string());
            continue;
        }
        let Some((k, v)) = line.split_once(':') else {
            continue;
        };
        let v = v.trim();
        match k {
            "pos" => info.pos = v.parse().ok()?,
            "flags" => info.flags = u32::from_str_radix(v, 8).ok()?,
            _ => {
                info.fields.insert(k.to_string(), v.to_string());
            }
        }
    }
    Some(info)
}

/// Parses "(sec, nsec)" as timerfd fdinfo prints it, into nanoseconds.
pub fn parse_timespec_pair(s: &str) -> Option<u64> {
    let s = s.trim().strip_prefix('(')?.strip_suffix(')')?;
    let (sec, nsec) = s.split_once(',')?;
    let sec: u64 = sec.trim().parse().ok()?;
    let nsec: u64 = nsec.trim().parse().ok()?;
    Some(sec * 1_000_000_000 + nsec)
}

/// A POSIX timer as listed in `/proc/PID/timers`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimerLine {
    pub id: i32,
    pub signal: i32,
    pub sigval: u64,
    /// "signal", "thread", "none".
    pub notify: String,
    /// Delivered to one thread (`SIGEV_THREAD_ID`): `notify_tid` is a tid.
    pub to_thread: bool,
    pub notify_tid: i32,
    pub clock: i32,
}

pub fn read_timers(pid: i32) -> Result<Vec<TimerLine>> {
    let text = read_text(format!("/proc/{pid}/timers")).map_err(|e| Error::Proc {
        pid,
        what: "timers",
        detail: e.to_string(),
    })?;
    parse_timers(&text).ok_or_else(|| Error::Proc {
        pid,
        what: "timers",
        detail: format!("unexpected content: {text:?}"),
    })
}

pub fn parse_timers(text: &str) -> Option<Vec<TimerLine>> {
    let mut out = Vec::new();
    let mut cur: Option<TimerLine> = None;
    for line in text.lines() {
        let Some((k, v)) = line.split_once(':') else {
            continue;
        };
        let v = v.trim();
        match k {
            "ID" => {
                out.extend(cur.take());
                cur = Some(TimerLine {
                    id: v.parse().ok()?,
                    signal: 0,
                    sigval: 0,
                    notify: String::new(),
                    to_thread: false,
                    notify_tid: 0,
                    clock: 0,
                });
            }
            "signal" => {
                let t = cur.as_mut()?;
                let (sig, val) = v.split_once('/')?;
                t.signal = sig.parse().ok()?;
                t.sigval = u64::from_str_radix(val, 16).ok()?;
            }
            "notify" => {
                let t = cur.as_mut()?;
                let (how, target) = v.split_once('/')?;
                t.notify = how.to_string();
                let (kind, id) = target.split_once('.')?;
                t.to_thread = kind == "tid";
                t.notify_tid = id.parse().ok()?;
            }
            "ClockID" => cur.as_mut()?.clock = v.parse().ok()?,
            _ => {}
        }
    }
    out.extend(cur);
    Some(out)
}

/// The pagemap of a process: one 64-bit entry per virtual page.
pub struct PageMap {
    file: File,
    pid: i32,
}

pub const PM_PRESENT: u64 = 1 << 63;
pub const PM_SWAPPED: u64 = 1 << 62;
/// The page is a page-cache page of a file or shared memory: a private file
/// mapping's page without it was written (copied on write).
pub const PM_FILE: u64 = 1 << 61;
/// Write-protected for userfaultfd.
pub const PM_UFFD_WP: u64 = 1 << 57;
/// The swap "type" of a non-present entry (low five bits of the frame
/// field) that marks a write-protection marker, not swapped-out data.
const SWP_PTE_MARKER: u64 = 31;

/// Whether a pagemap entry holds data of its own: present, or really
/// swapped out. Dirty tracking leaves markers on pages that were never
/// touched; those read as empty.
pub fn has_data(e: u64) -> bool {
    if e & PM_PRESENT != 0 {
        return true;
    }
    e & PM_SWAPPED != 0 && !(e & PM_UFFD_WP != 0 && e & 0x1f == SWP_PTE_MARKER)
}

/// Whether a page of a private mapping holds data no file has: anonymous
/// memory, or a copied-on-write page of a private file mapping.
pub fn has_own_data(e: u64, file_backed: bool) -> bool {
    has_data(e) && !(file_backed && e & PM_FILE != 0)
}

impl PageMap {
    pub fn open(pid: i32) -> Result<PageMap> {
        let file = File::open(format!("/proc/{pid}/pagemap")).map_err(|e| Error::Proc {
            pid,
            what: "pagemap",
            detail: e.to_string(),
        })?;
        Ok(PageMap { file, pid })
    }

    /// The entries of the pages in `[start, end)`.
    pub fn entries(&self, start: u64, end: u64) -> Result<Vec<u64>> {
        let n = ((end - start) / PAGE_SIZE) as usize;
        let mut raw = vec![0u8; n * 8];
        self.file
            .read_exact_at(&mut raw, start / PAGE_SIZE * 8)
            .map_err(|e| Error::Proc {
                pid: self.pid,
                what: "pagemap",
                detail: e.to_string(),
            })?;
        Ok(raw
            .chunks_exact(8)
            .map(|c| u64::from_ne_bytes(c.try_into().expect("8 bytes")))
            .collect())
    }
}

/// Runs of consecutive page indices for which `keep` holds.
pub fn runs(entries: &[u64], keep: impl Fn(u64) -> bool) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < entries.len() {
        if keep(entries[i]) {
            let s = i;
            while i < entries.len() && keep(entries[i]) {
                i += 1;
            }
            out.push((s, i - s));
        } else {
            i += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timens_offsets_round_trip_and_bad_text_is_refused() {
        let o = parse_timens_offsets(
            "monotonic        1000         5\nboottime        -20  999999999\n",
        )
        .unwrap();
        assert_eq!(
            o.monotonic,
            ClockOffset {
                secs: 1000,
                nsecs: 5
            }
        );
        assert_eq!(
            o.boottime,
            ClockOffset {
                secs: -20,
                nsecs: 999_999_999
            }
        );
        assert_eq!(parse_timens_offsets(&timens_offsets_text(&o)), Some(o));
        for bad in [
            "",
            "monotonic 1 0\n",
            "monotonic 1 0\nboottime 1 1000000000\n",
            "monotonic 1 0\nrealtime 1 0\n",
            "monotonic 1\nboottime 1 0\n",
            "monotonic x 0\nboottime 1 0\n",
        ] {
            assert_eq!(parse_timens_offsets(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn fdinfo_epoll_and_eventfd() {
        let e = parse_fdinfo(
            "pos:\t0\nflags:\t02000002\nmnt_id:\t15\nino:\t1057\ntfd:        5 events:       19 data:     1122334455667788  pos:0 ino:41 sdev:d\ntfd:        7 events: 80000001 data:                7  pos:0 ino:42 sdev:d\n",
        )
        .unwrap();
        assert_eq!(e.flags, 0o2000002);
        assert_eq!(
            e.epoll,
            vec![
                EpollLine {
                    tfd: 5,
                    events: 0x19,
                    data: 0x1122334455667788,
                    ino: 0x41,
                },
                EpollLine {
                    tfd: 7,
                    events: 0x80000001,
                    data: 7,
                    ino: 0x42,
                },
            ]
        );
        let ev = parse_fdinfo("pos:\t0\nflags:\t02\nmnt_id:\t15\nino:\t1057\neventfd-count:               2a\neventfd-id: 3\neventfd-semaphore: 0\n").unwrap();
        assert_eq!(ev.fields["eventfd-count"], "2a");
    }

    #[test]
    fn timerfd_times() {
        assert_eq!(parse_timespec_pair("(1, 500)"), Some(1_000_000_500));
        assert_eq!(parse_timespec_pair(" (0, 0)"), Some(0));
        assert_eq!(parse_timespec_pair("0, 0"), None);
    }

    #[test]
    fn timers() {
        let t = parse_timers("ID: 0\nsignal: 34/0000000000000007\nnotify: signal/pid.123\nClockID: 1\nID: 1\nsignal: 14/00000000deadbeef\nnotify: signal/tid.124\nClockID: 0\n").unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!(t[0].signal, 34);
        assert_eq!(t[0].sigval, 7);
        assert_eq!(t[1].notify, "signal");
        assert!(t[1].to_thread && !t[0].to_thread);
        assert_eq!(t[1].notify_tid, 124);
    }

    #[test]
    fn page_runs() {
        let e = [PM_PRESENT, PM_PRESENT, 0, PM_SWAPPED, 0, PM_PRESENT];
        let r = runs(&e, |x| x & (PM_PRESENT | PM_SWAPPED) != 0);
        assert_eq!(r, vec![(0, 2), (3, 1), (5, 1)]);
    }
}
