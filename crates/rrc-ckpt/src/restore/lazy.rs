//! Memory filled while the restored program already runs (lazy pages).
//!
//! A process's private anonymous pages are registered with a userfaultfd of
//! its memory for missing pages and handed to a copier thread: it copies
//! them from the image in the background, from the moment they are
//! registered (the rest of the restore goes on meanwhile), and first the
//! page of any fault the running program takes. The userfaultfd reports
//! what the program does to its memory: a page it discards or unmaps is no
//! longer copied (it reads as zeros, as it would have), an area it moves is
//! followed, and a child it forks gets a userfaultfd of its own, served the
//! same way from the pages neither had yet. A fault on a page the image
//! does not hold gets the zero page. Once every page is in, the
//! userfaultfds are closed and the program's memory is its own again.
//!
//! A copy that fails for any other reason leaves a program without its
//! memory: the process is killed, never left running on zeros.

use std::collections::{BTreeMap, VecDeque};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::unistd::Pid;

use crate::image::PageRun;
use crate::procfs::PAGE_SIZE;
use crate::sys;

/// Largest copy made for one fault (the pages after it are likely next).
const FAULT_CHUNK: u64 = 16 * PAGE_SIZE;
/// Largest background copy between two looks at the events.
const BACKGROUND_CHUNK: u64 = 64 * PAGE_SIZE;

/// Page ranges still to copy: start -> (end, offset of start in the data).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Pending(BTreeMap<u64, (u64, u64)>);

impl Pending {
    pub fn from_runs(runs: &[PageRun]) -> Pending {
        let mut p = Pending::default();
        for r in runs.iter().filter(|r| r.count > 0) {
            p.0.insert(r.start, (r.start + r.count * PAGE_SIZE, r.offset));
        }
        p
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn bytes(&self) -> u64 {
        self.0.iter().map(|(s, (e, _))| e - s).sum()
    }

    /// Takes up to `max` bytes from `addr` on, if `addr` is pending:
    /// (start, length, offset).
    pub fn take_at(&mut self, addr: u64, max: u64) -> Option<(u64, u64, u64)> {
        let (&s, &(e, off)) = self.0.range(..=addr).next_back()?;
        if addr >= e {
            return None;
        }
        let end = e.min(addr.saturating_add(max));
        self.remove(addr, end);
        Some((addr, end - addr, off + (addr - s)))
    }

    /// Takes up to `max` bytes from the first pending range.
    pub fn take_first(&mut self, max: u64) -> Option<(u64, u64, u64)> {
        let (&s, _) = self.0.iter().next()?;
        self.take_at(s, max)
    }

    /// Puts a range taken back.
    pub fn put(&mut self, start: u64, len: u64, offset: u64) {
        if len > 0 {
            self.0.insert(start, (start + len, offset));
        }
    }

    /// Forgets `[start, end)`: discarded or unmapped.
    pub fn remove(&mut self, start: u64, end: u64) {
        let hit: Vec<(u64, (u64, u64))> = self
            .0
            .range(..end)
            .rev()
            .take_while(|(_, (e, _))| *e > start)
            .map(|(s, v)| (*s, *v))
            .collect();
        for (s, (e, off)) in hit {
            self.0.remove(&s);
            if s < start {
                self.0.insert(s, (start, off));
            }
            if e > end {
                self.0.insert(end, (e, off + (end - s)));
            }
        }
    }

    /// Follows an mremap of `len` bytes from `from` to `to`.
    pub fn moved(&mut self, from: u64, to: u64, len: u64) {
        let inside: Vec<(u64, (u64, u64))> = {
            let mut probe = self.clone();
            probe.remove(0, from);
            probe.remove(from + len, u64::MAX);
            probe.0.into_iter().collect()
        };
        self.remove(from, from + len);
        for (s, (e, off)) in inside {
            self.0.insert(s - from + to, (e - from + to, off));
        }
    }
}

/// What a copier did.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Bytes copied in, and of them in answer to faults.
    pub bytes: u64,
    pub fault_bytes: u64,
    pub faults: u64,
    /// Children forked while it ran (each served too).
    pub forks: u64,
    /// From the copier's start until every page was in.
    pub took: Duration,
}

/// One address space being filled.
struct Space {
    uffd: OwnedFd,
    pending: Pending,
}

/// A copier's thread, with the image pid of the process it fills.
type CopierThread = (i32, JoinHandle<Result<Report, String>>);

/// The copiers of one restore, running until every page is in.
#[derive(Clone, Default)]
pub struct LazyPages {
    copiers: Arc<Mutex<Vec<CopierThread>>>,
    /// Set once the restored tree runs: until then the copiers serve
    /// faults (the restore's own writes) and copy nothing else, leaving
    /// the CPU and the address space's lock to the restore, which ends
    /// 10 ms sooner for a Redis of 150 MB on two CPUs.
    go: Arc<AtomicBool>,
}

impl std::fmt::Debug for LazyPages {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.copiers.lock().map(|v| v.len()).unwrap_or(0);
        write!(f, "LazyPages({n} copiers)")
    }
}

impl LazyPages {
    /// Starts a copier for process `pid` (`host` as this namespace numbers
    /// it), whose pages `runs` of `data` are registered with `uffd`.
    pub fn start(&self, pid: i32, host: Pid, uffd: OwnedFd, data: memmap2::Mmap, runs: &[PageRun]) {
        let pending = Pending::from_runs(runs);
        // The thread starts with every signal blocked: a signal meant for
        // the process (a supervisor's SIGTERM, read from its signalfd) must
        // never be taken by this thread, whose default action would end
        // the process while the program still needs its pages.
        use nix::sys::signal::{SigSet, SigmaskHow};
        let before = SigSet::all().thread_swap_mask(SigmaskHow::SIG_SETMASK);
        let go = self.go.clone();
        let handle = std::thread::Builder::new()
            .name(format!("rrc-pages-{pid}"))
            .spawn(move || copy_all(host, Space { uffd, pending }, &data, &go));
        match before {
            Ok(mask) => {
                if let Err(e) = mask.thread_set_mask() {
                    tracing::warn!("restoring the signal mask: {e}");
                }
            }
            Err(e) => tracing::warn!("blocking signals for the copier: {e}"),
        }
        match handle {
            Ok(h) => self
                .copiers
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push((pid, h)),
            Err(e) => {
                // Nothing serves its faults: it must not run.
                tracing::error!(
                    pid,
                    "cannot start the copier of its memory: {e}; killing it"
                );
                let _ = nix::sys::signal::kill(host, nix::sys::signal::Signal::SIGKILL);
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.copiers.lock().map(|v| v.is_empty()).unwrap_or(true)
    }

    /// Lets the copiers copy what the program has not touched: the tree
    /// runs (or is gone).
    pub fn let_go(&self) {
        self.go.store(true, Ordering::Release);
    }

    /// Waits until every page is in; the copiers' reports summed, or what
    /// went wrong (the process concerned was killed).
    pub fn wait(&self) -> Result<Report, String> {
        self.let_go();
        let copiers = std::mem::take(&mut *self.copiers.lock().unwrap_or_else(|e| e.into_inner()));
        let mut sum = Report::default();
        let mut errors = Vec::new();
        for (pid, h) in copiers {
            match h.join() {
                Ok(Ok(r)) => {
                    sum.bytes += r.bytes;
                    sum.fault_bytes += r.fault_bytes;
                    sum.faults += r.faults;
                    sum.forks += r.forks;
                    sum.took = sum.took.max(r.took);
                }
                Ok(Err(e)) => errors.push(format!("process {pid}: {e}")),
                Err(_) => errors.push(format!("process {pid}: its copier failed")),
            }
        }
        if errors.is_empty() {
            Ok(sum)
        } else {
            Err(errors.join("; "))
        }
    }
}

/// How a copy ended.
enum Copied {
    /// All of it, or the rest is no longer there to fill.
    Done,
    /// The address space is changing: try the rest again after the events.
    Again { start: u64, len: u64, offset: u64 },
    /// The process is gone.
    Gone,
}

/// Copies `[start, start + len)` from `data` at `offset`, skipping pages
/// already there.
fn copy(uffd: RawFd, data: &[u8], start: u64, len: u64, offset: u64) -> Result<Copied, String> {
    let mut done = 0;
    while done < len {
        let from = usize::try_from(offset + done).map_err(|e| e.to_string())?;
        let to = usize::try_from(offset + len).map_err(|e| e.to_string())?;
        let src = data
            .get(from..to)
            .ok_or_else(|| format!("pages at {start:#x} lie beyond the image's data"))?;
        let (n, err) = sys::uffd_copy_some(uffd, start + done, src);
        done += n;
        let Some(e) = err else { continue };
        match e.raw_os_error() {
            // Written meanwhile (a fault answered with the same page).
            Some(libc::EEXIST) => done += PAGE_SIZE,
            Some(libc::EAGAIN) => {
                return Ok(Copied::Again {
                    start: start + done,
                    len: len - done,
                    offset: offset + done,
                });
            }
            // Unmapped: the event that says so is on its way.
            Some(libc::ENOENT) => return Ok(Copied::Done),
            Some(libc::ESRCH) => return Ok(Copied::Gone),
            _ => {
                return Err(format!(
                    "copy {} bytes to {:#x}: {e}",
                    len - done,
                    start + done
                ));
            }
        }
    }
    Ok(Copied::Done)
}

/// The state of one copier: the address spaces it fills (`None` once one
/// is gone), and the faults read but not answered yet.
struct Copier<'d> {
    data: &'d [u8],
    spaces: Vec<Option<Space>>,
    faults: VecDeque<(usize, u64)>,
    report: Report,
    /// The space the last background chunk went to.
    turn: usize,
}

impl Copier<'_> {
    /// Nothing left to copy and no fault waiting.
    fn done(&self) -> bool {
        self.faults.is_empty()
            && self
                .spaces
                .iter()
                .all(|s| s.as_ref().is_none_or(|s| s.pending.is_empty()))
    }

    /// Reads the events of every space (a fork adds one, read in turn).
    fn read_events(&mut self) -> Result<(), String> {
        let mut i = 0;
        while i < self.spaces.len() {
            let msgs = match &self.spaces[i] {
                Some(sp) => sys::uffd_read_msgs(sp.uffd.as_raw_fd())
                    .map_err(|e| format!("read its userfaultfd: {e}"))?,
                None => Vec::new(),
            };
            for (event, a) in msgs {
                self.event(i, event, a)?;
            }
            i += 1;
        }
        Ok(())
    }

    /// Takes in event `event` (arguments `a`) of space `i`.
    fn event(&mut self, i: usize, event: u8, a: [u64; 3]) -> Result<(), String> {
        match event {
            sys::UFFD_EVENT_PAGEFAULT => {
                self.report.faults += 1;
                self.faults.push_back((i, a[1] & !(PAGE_SIZE - 1)));
            }
            sys::UFFD_EVENT_FORK => {
                // SAFETY: the kernel put this fd, a new userfaultfd of the
                // child, in our table for us.
                let uffd = unsafe { OwnedFd::from_raw_fd(a[0] as u32 as RawFd) };
                // The child lacks what its parent lacked at the fork.
                let pending = self.spaces[i].as_ref().map(|s| s.pending.clone());
                self.report.forks += 1;
                self.spaces.push(Some(Space {
                    uffd,
                    pending: pending.unwrap_or_default(),
                }));
            }
            sys::UFFD_EVENT_REMAP => {
                if let Some(sp) = self.spaces[i].as_mut() {
                    sp.pending.moved(a[0], a[1], a[2]);
                }
            }
            sys::UFFD_EVENT_REMOVE | sys::UFFD_EVENT_UNMAP => {
                if let Some(sp) = self.spaces[i].as_mut() {
                    sp.pending.remove(a[0], a[1]);
                }
            }
            other => return Err(format!("unexpected userfaultfd event {other:#x}")),
        }
        Ok(())
    }

    /// Answers the faults read, in order; one met while its address space
    /// changes waits for the next round, after the events.
    fn serve_faults(&mut self) -> Result<(), String> {
        for (i, addr) in std::mem::take(&mut self.faults) {
            let Some(sp) = self.spaces[i].as_mut() else {
                continue;
            };
            let fd = sp.uffd.as_raw_fd();
            let outcome = match sp.pending.take_at(addr, FAULT_CHUNK) {
                Some((s, len, off)) => {
                    self.report.fault_bytes += len;
                    copy(fd, self.data, s, len, off)?
                }
                // Not in the image: the page was never written.
                None => zero_page(fd, addr)?,
            };
            match outcome {
                Copied::Done => {}
                Copied::Again { start, len, offset } => {
                    sp.pending.put(start, len, offset);
                    self.faults.push_back((i, addr));
                }
                Copied::Gone => self.spaces[i] = None,
            }
        }
        Ok(())
    }

    /// Copies the next background chunk, space after space.
    fn copy_next(&mut self) -> Result<(), String> {
        let live: Vec<usize> = (0..self.spaces.len())
            .filter(|&i| {
                self.spaces[i]
                    .as_ref()
                    .is_some_and(|s| !s.pending.is_empty())
            })
            .collect();
        if live.is_empty() {
            // Only faults waiting for their address space to settle.
            std::thread::yield_now();
            return Ok(());
        }
        self.turn = (self.turn + 1) % live.len();
        let i = live[self.turn];
        let Some(sp) = self.spaces[i].as_mut() else {
            return Ok(());
        };
        let Some((s, len, off)) = sp.pending.take_first(BACKGROUND_CHUNK) else {
            return Ok(());
        };
        match copy(sp.uffd.as_raw_fd(), self.data, s, len, off)? {
            Copied::Done => self.report.bytes += len,
            Copied::Again { start, len, offset } => sp.pending.put(start, len, offset),
            Copied::Gone => self.spaces[i] = None,
        }
        Ok(())
    }
}

/// Maps the zero page at `addr`, for a fault on a page the image does not
/// hold.
fn zero_page(fd: RawFd, addr: u64) -> Result<Copied, String> {
    let Err(e) = sys::uffd_zeropage(fd, addr, PAGE_SIZE) else {
        return Ok(Copied::Done);
    };
    Ok(match e.raw_os_error() {
        // There meanwhile: the waiting thread only needs waking.
        Some(libc::EEXIST) => {
            let _ = sys::uffd_wake(fd, addr, PAGE_SIZE);
            Copied::Done
        }
        // Nothing to put back: the fault is tried again.
        Some(libc::EAGAIN) => Copied::Again {
            start: addr,
            len: 0,
            offset: 0,
        },
        Some(libc::ENOENT) => Copied::Done,
        Some(libc::ESRCH) => Copied::Gone,
        _ => return Err(format!("zero page at {addr:#x}: {e}")),
    })
}

/// The copier: events and faults first, then (once `go` is set) the next
/// background chunk, until nothing is pending in any address space.
fn copy_all(host: Pid, first: Space, data: &[u8], go: &AtomicBool) -> Result<Report, String> {
    let started = Instant::now();
    let pace = pace();
    let mut c = Copier {
        data,
        spaces: vec![Some(first)],
        faults: VecDeque::new(),
        report: Report::default(),
        turn: 0,
    };
    let outcome = (|| -> Result<(), String> {
        loop {
            c.read_events()?;
            c.serve_faults()?;
            if c.done() {
                return Ok(());
            }
            if !go.load(Ordering::Acquire) {
                wait_events(&c.spaces, Duration::from_millis(1));
                continue;
            }
            c.copy_next()?;
            if let Some(pace) = pace {
                wait_events(&c.spaces, pace);
            }
        }
    })();
    let mut report = c.report;
    report.bytes += report.fault_bytes;
    report.took = started.elapsed();
    match outcome {
        Ok(()) => Ok(report),
        Err(e) => {
            // Its memory cannot be completed: it must not run on.
            tracing::error!(
                pid = host.as_raw(),
                "restoring its memory failed: {e}; killing it"
            );
            let _ = nix::sys::signal::kill(host, nix::sys::signal::Signal::SIGKILL);
            Err(e)
        }
    }
}

/// A pause after each background chunk (`RRC_LAZY_PAGES_PACE_US`), for
/// tests that act on memory while it is still being copied in; none by
/// default.
fn pace() -> Option<Duration> {
    std::env::var("RRC_LAZY_PAGES_PACE_US")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|&us| us > 0)
        .map(Duration::from_micros)
}

/// Waits up to `limit` for an event on any space.
fn wait_events(spaces: &[Option<Space>], limit: Duration) {
    let mut fds: Vec<libc::pollfd> = spaces
        .iter()
        .flatten()
        .map(|s| libc::pollfd {
            fd: s.uffd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let ms = i32::try_from(limit.as_millis().max(1)).unwrap_or(i32::MAX);
    // SAFETY: poll reads and writes fds.len() pollfd structs, which the
    // vector holds.
    unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: u64 = PAGE_SIZE;

    fn pending(ranges: &[(u64, u64, u64)]) -> Pending {
        Pending(
            ranges
                .iter()
                .map(|&(s, e, o)| (s * P, (e * P, o * P)))
                .collect(),
        )
    }

    #[test]
    fn a_fault_takes_from_its_page_on_and_splits_the_range() {
        let mut p = pending(&[(10, 20, 0), (30, 40, 10)]);
        assert_eq!(p.take_at(14 * P, 4 * P), Some((14 * P, 4 * P, 4 * P)));
        assert_eq!(p, pending(&[(10, 14, 0), (18, 20, 8), (30, 40, 10)]));
        assert_eq!(p.take_at(25 * P, P), None);
        assert_eq!(p.take_at(38 * P, 16 * P), Some((38 * P, 2 * P, 18 * P)));
        assert_eq!(p.take_first(100 * P), Some((10 * P, 4 * P, 0)));
        assert_eq!(p.bytes(), 2 * P + 8 * P);
    }

    #[test]
    fn discarded_ranges_are_forgotten_and_moved_ones_followed() {
        let mut p = pending(&[(10, 20, 0), (30, 40, 10)]);
        p.remove(15 * P, 35 * P);
        assert_eq!(p, pending(&[(10, 15, 0), (35, 40, 15)]));
        // An mremap of [12, 37) to 100.
        p.moved(12 * P, 100 * P, 25 * P);
        assert_eq!(
            p,
            pending(&[(10, 12, 0), (100, 103, 2), (123, 125, 15), (37, 40, 17)])
        );
    }

    #[test]
    fn runs_become_ranges() {
        let runs = [
            PageRun {
                start: 10 * P,
                count: 2,
                offset: 0,
            },
            PageRun {
                start: 20 * P,
                count: 0,
                offset: 2 * P,
            },
        ];
        assert_eq!(Pending::from_runs(&runs), pending(&[(10, 12, 0)]));
    }
}
