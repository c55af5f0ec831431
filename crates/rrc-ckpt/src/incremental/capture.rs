//! The memory part of an incremental checkpoint: per process, what changed
//! since the last checkpoint, and how it gets copied.

use std::collections::HashMap;
use std::fs::File;
use std::time::{Duration, Instant};

use nix::unistd::Pid;
use procfs::process::{MMPermissions, Process};

use crate::Error;
use crate::Result;
use crate::dirty::{self, Ranges, Tracker};
use crate::dump::inject::Injector;
use crate::dump::memory::{self, MemoryDump};
use crate::dump::{Frozen, MemoryPolicy};
use crate::image::{ImageDir, PageRun, Vma, VmaKind};
use crate::procfs::{PAGE_SIZE, PageMap, has_own_data, runs};

use super::snapshot::Snapshot;

/// When the written pages of a process are copied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyMode {
    /// Whichever makes the shorter pause, by what earlier checkpoints
    /// measured.
    Auto,
    /// While the tree is stopped.
    Direct,
    /// From a copy-on-write snapshot, after the tree runs again.
    Snapshot,
}

/// What the pause costs, learnt from the checkpoints taken so far.
struct CostModel {
    /// Copying written pages while stopped, per byte.
    direct_ns_per_byte: f64,
    /// Making a snapshot: per resident page (the kernel copies page table
    /// entries), plus a fixed part.
    snapshot_ns_per_page: f64,
    snapshot_fixed_ns: f64,
}

impl CostModel {
    fn new() -> CostModel {
        // Measured on the reference machine; refined as checkpoints go.
        CostModel {
            direct_ns_per_byte: 0.25,
            snapshot_ns_per_page: 85.0,
            snapshot_fixed_ns: 150_000.0,
        }
    }

    fn prefer_snapshot(&self, bytes: u64, resident_pages: u64) -> bool {
        let direct = bytes as f64 * self.direct_ns_per_byte;
        let snap = self.snapshot_fixed_ns + resident_pages as f64 * self.snapshot_ns_per_page;
        snap < direct
    }

    fn learn_direct(&mut self, bytes: u64, took: Duration) {
        // Small copies say more about the fixed costs than about the rate.
        if bytes >= 1 << 20 {
            let rate = took.as_nanos() as f64 / bytes as f64;
            self.direct_ns_per_byte = 0.7 * self.direct_ns_per_byte + 0.3 * rate;
        }
    }

    fn learn_snapshot(&mut self, resident_pages: u64, took: Duration) {
        if resident_pages >= 4096 {
            let per =
                (took.as_nanos() as f64 - self.snapshot_fixed_ns).max(0.0) / resident_pages as f64;
            self.snapshot_ns_per_page = 0.7 * self.snapshot_ns_per_page + 0.3 * per;
        }
    }
}

/// A tracked process.
struct Tracked {
    /// Start time (clock ticks after boot): tells a reused pid apart.
    start_time: u64,
    tracker: Tracker,
    /// The mappings of the last checkpoint, whose madvise flags are taken
    /// over while a mapping stays the same (reading them anew means reading
    /// smaps, which walks every page table).
    vmas: Vec<Vma>,
    /// Pages of private file mappings with data of their own (copied on
    /// write), as of the last checkpoint.
    own_file: Ranges,
}

/// Where the pages of one process are copied from.
enum Source {
    /// Copied during the pause.
    Copied(Vec<u8>),
    /// A stopped copy-on-write clone of the process.
    Snapshot(Snapshot),
}

struct Job {
    pid: i32,
    image_pid: i32,
    runs: Vec<PageRun>,
    readable: Vec<bool>,
    bytes: u64,
    source: Source,
}

#[derive(Debug, Clone, Default)]
pub(crate) struct EpochStats {
    pub full: bool,
    pub bytes: u64,
    pub snapshots: usize,
    pub direct: usize,
    pub scan: Duration,
    pub copy: Duration,
    pub snapshot: Duration,
    /// CPU time of helper threads.
    pub helper_cpu: Duration,
}

pub(crate) struct DeltaPolicy {
    mode: CopyMode,
    model: CostModel,
    procs: HashMap<i32, Tracked>,
    /// Dead snapshots, by the process that is to reap them.
    zombies: HashMap<i32, Vec<Snapshot>>,
    seen: Vec<i32>,
    jobs: Vec<Job>,
    stats: EpochStats,
    /// Buffers kept from one checkpoint to the next: their pages are
    /// already faulted in.
    spare: Vec<Vec<u8>>,
    /// Mappings whose madvise flags are to be read once the tree runs
    /// again, by image pid: (pid, ranges).
    flags_pending: HashMap<i32, (i32, Vec<(u64, u64)>)>,
}

fn start_time(pid: i32) -> Result<u64> {
    Process::new(pid)
        .and_then(|p| p.stat())
        .map(|s| s.starttime)
        .map_err(Error::proc(pid, "stat"))
}

fn resident_pages(pid: i32) -> u64 {
    crate::procfs::read_text(format!("/proc/{pid}/statm"))
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

/// What one process's memory turned into this time.
struct Delta {
    dump: MemoryDump,
    content: Ranges,
    readable: Vec<bool>,
}

impl DeltaPolicy {
    pub fn new(mode: CopyMode) -> DeltaPolicy {
        DeltaPolicy {
            mode,
            model: CostModel::new(),
            procs: HashMap::new(),
            zombies: HashMap::new(),
            seen: Vec::new(),
            jobs: Vec::new(),
            stats: EpochStats::default(),
            spare: Vec::new(),
            flags_pending: HashMap::new(),
        }
    }

    pub fn begin_epoch(&mut self) {
        self.seen.clear();
        self.flags_pending.clear();
        self.stats = EpochStats {
            full: true,
            ..Default::default()
        };
    }

    pub fn stats(&self) -> EpochStats {
        self.stats.clone()
    }

    /// Processes of the engine's own in the tree: dead snapshots left for
    /// their parents to reap.
    pub fn own_processes(&self) -> Vec<Pid> {
        self.zombies.values().flatten().map(|s| s.pid).collect()
    }

    /// After a failed checkpoint: written pages were reported (and
    /// protected again) for nothing, so every process starts over.
    pub fn abort(&mut self) {
        self.end_snapshots();
        self.procs.clear();
    }

    /// Kills this checkpoint's snapshots, leaving them to be reaped.
    fn end_snapshots(&mut self) {
        for job in self.jobs.drain(..) {
            if let Source::Snapshot(snap) = job.source {
                super::snapshot::end(snap.pid);
                self.zombies.entry(job.pid).or_default().push(snap);
            }
        }
    }

    /// Stops tracking and has every process reap its snapshots.
    pub fn finish_series(&mut self, root: Pid) -> Result<()> {
        self.end_snapshots();
        self.procs.clear();
        if self.zombies.is_empty() {
            return Ok(());
        }
        let exclude = self.own_processes();
        let seized = crate::dump::seize::Seized::tree_excluding(root, &exclude)?;
        for p in &seized.processes {
            if let Some(zs) = self.zombies.remove(&p.pid.as_raw()) {
                let mut inj = Injector::new(p)?;
                super::snapshot::reap(&mut inj, p.pid, &zs)?;
                inj.finish()?;
            }
        }
        // Processes gone meanwhile took their snapshots with them.
        self.zombies.clear();
        Ok(())
    }

    /// The tracker of `pid`, set up on first sight (or when the pid now
    /// names another process). Returns whether it is new.
    fn tracked(&mut self, f: &mut Frozen) -> Result<bool> {
        let pid = f.p.pid.as_raw();
        let st = start_time(pid)?;
        if self.procs.get(&pid).is_some_and(|t| t.start_time == st) {
            return Ok(false);
        }
        let uffd = super::snapshot::take_userfaultfd(f.inj, f.p.pid)?;
        let tracker = Tracker::new(pid, uffd)?;
        self.procs.insert(
            pid,
            Tracked {
                start_time: st,
                tracker,
                vmas: Vec::new(),
                own_file: Vec::new(),
            },
        );
        Ok(true)
    }

    /// Finds what changed in the memory of a stopped process.
    fn delta(&mut self, f: &mut Frozen, fresh: bool) -> Result<Delta> {
        let pid = f.p.pid;
        let raw = pid.as_raw();
        let skip = f.inj.scratch_range();
        let maps = Process::new(raw)
            .and_then(|p| p.maps())
            .map_err(Error::proc(raw, "memory maps"))?;
        let t = self.procs.get_mut(&raw).expect("tracked");
        let t0 = Instant::now();
        t.tracker.resync()?;
        let mut scan = t0.elapsed();
        let pagemap = PageMap::open(raw)?;
        // Every page written since the last look, in one walk that skips
        // the mappings not tracked.
        let t0 = Instant::now();
        let written_all = t.tracker.written_everywhere()?;
        scan += t0.elapsed();
        let mut next_written = 0;
        let previous: HashMap<(u64, u64), &Vma> =
            t.vmas.iter().map(|v| ((v.start, v.end), v)).collect();
        let mut pending: Vec<(u64, u64)> = Vec::new();
        let mut out = MemoryDump::default();
        let mut content: Ranges = Vec::new();
        let mut holes: Ranges = Vec::new();
        let mut private: Ranges = Vec::new();
        let mut own_file: Ranges = Vec::new();
        let mut to_track: Ranges = Vec::new();
        for m in maps.iter() {
            let (start, end) = m.address;
            if skip.is_some_and(|(s, _)| s == start) {
                continue;
            }
            let shared = m.perms.contains(MMPermissions::SHARED);
            let prot = memory::prot_of(m.perms);
            let Some(kind) = memory::classify(pid, m, shared, f.shmem, f.img, f.problems)? else {
                continue;
            };
            let flags = match previous.get(&(start, end)) {
                Some(v) if v.prot == prot && v.kind == kind => v.flags.clone(),
                _ => {
                    // Reading smaps walks every page table (tens of ms for
                    // a gigabyte): not while the tree is stopped. A piece of
                    // a mapping keeps its flags; the flags of the others are
                    // read once it runs again (mmap itself sets none of
                    // those recorded but for locked and grows-down ones,
                    // which are rare).
                    pending.push((start, end));
                    t.vmas
                        .iter()
                        .find(|v| v.start < end && start < v.end && v.kind == kind)
                        .map(|v| v.flags.clone())
                        .unwrap_or_default()
                }
            };
            let vma = Vma {
                start,
                end,
                prot,
                shared,
                kind,
                flags,
            };
            let file_backed = match (&vma.kind, shared) {
                (VmaKind::Anon, false) => false,
                (VmaKind::File { .. }, false) => true,
                _ => {
                    out.vmas.push(vma);
                    continue;
                }
            };
            dirty::insert(&mut private, (start, end));
            let whole = [(start, end)];
            let known = dirty::intersect(t.tracker.registered(), &whole);
            let new = dirty::subtract(&whole, &known);
            for &(s, e) in &known {
                let written = take_within(&written_all, &mut next_written, s, e);
                if file_backed {
                    // Discarded copied-on-write pages leave markers here,
                    // not written pages: the pages that had data of their
                    // own are looked at again.
                    let had = dirty::intersect(&t.own_file, &[(s, e)]);
                    let look = dirty::union(&had, &written);
                    let mut own = Vec::new();
                    for &(ls, le) in &look {
                        for r in own_in(&pagemap, ls, le)? {
                            dirty::insert(&mut own, r);
                        }
                    }
                    for r in dirty::subtract(&had, &own) {
                        dirty::insert(&mut holes, r);
                    }
                    for r in dirty::intersect(&written, &own) {
                        dirty::insert(&mut content, r);
                    }
                    for r in own {
                        dirty::insert(&mut own_file, r);
                    }
                } else {
                    // Written or discarded: a discarded page is copied as
                    // the zeros it reads as. Telling the two apart would
                    // cost a read of the page tables for every page.
                    for r in written {
                        dirty::insert(&mut content, r);
                    }
                }
            }
            for &(s, e) in &new {
                let own = own_pages(&pagemap, &t.tracker, s, e, file_backed)?;
                dirty::insert(&mut holes, (s, e));
                for &r in &own {
                    dirty::insert(&mut content, r);
                    if file_backed {
                        dirty::insert(&mut own_file, r);
                    }
                }
                if prot != 0 {
                    // Never written without a change of protection, which
                    // shows as a new range then.
                    dirty::insert(&mut to_track, (s, e));
                }
            }
            out.vmas.push(vma);
        }
        let t0 = Instant::now();
        for (s, e) in to_track {
            t.tracker.track(s, e)?;
        }
        scan += t0.elapsed();
        t.own_file = own_file;
        t.tracker.retain(&private);
        t.vmas = out.vmas.clone();
        if !pending.is_empty() {
            self.flags_pending.insert(f.image_pid, (raw, pending));
        }
        self.stats.scan += scan;
        if fresh {
            holes = vec![(0, u64::MAX)];
        } else {
            self.stats.full = false;
        }
        // Pages go into the file in address order; the protection decides
        // how they can be read.
        let mut readable = Vec::new();
        let mut offset = 0;
        for &(s, e) in &content {
            let vma_readable = |a: u64| {
                out.vmas
                    .iter()
                    .find(|v| v.start <= a && a < v.end)
                    .is_some_and(|v| v.prot & libc::PROT_READ as u32 != 0)
            };
            // Split at mapping boundaries where readability changes.
            let mut a = s;
            while a < e {
                let r = vma_readable(a);
                let mut b = a + PAGE_SIZE;
                while b < e && vma_readable(b) == r {
                    b += PAGE_SIZE;
                }
                out.pages.push(PageRun {
                    start: a,
                    count: (b - a) / PAGE_SIZE,
                    offset,
                });
                readable.push(r);
                offset += b - a;
                a = b;
            }
        }
        out.bytes = offset;
        out.holes = holes;
        Ok(Delta {
            dump: out,
            content,
            readable,
        })
    }

    fn buffer(&mut self, len: usize) -> Vec<u8> {
        let mut b = self.spare.pop().unwrap_or_default();
        if b.len() < len {
            b.resize(len, 0);
        }
        b
    }
}

/// Pages of `[start, end)` with data of their own (markers and, for a file
/// mapping, page-cache pages left out).
fn own_pages(
    pagemap: &PageMap,
    tracker: &Tracker,
    start: u64,
    end: u64,
    file_backed: bool,
) -> Result<Ranges> {
    let mut out = Vec::new();
    for (s, e) in tracker.populated(start, end)? {
        let entries = pagemap.entries(s, e)?;
        for (first, count) in runs(&entries, |x| has_own_data(x, file_backed)) {
            let a = s + first as u64 * PAGE_SIZE;
            dirty::insert(&mut out, (a, a + count as u64 * PAGE_SIZE));
        }
    }
    Ok(out)
}

/// The part of the sorted ranges `all` within `[s, e)`, for mappings
/// visited in address order (`*next` remembers where the last one ended).
fn take_within(all: &[(u64, u64)], next: &mut usize, s: u64, e: u64) -> Ranges {
    while *next < all.len() && all[*next].1 <= s {
        *next += 1;
    }
    let mut out = Vec::new();
    let mut i = *next;
    while i < all.len() && all[i].0 < e {
        out.push((all[i].0.max(s), all[i].1.min(e)));
        i += 1;
    }
    out
}

/// Pages of `[start, end)` of a private file mapping with data of their
/// own, by the pagemap.
fn own_in(pagemap: &PageMap, start: u64, end: u64) -> Result<Ranges> {
    let entries = pagemap.entries(start, end)?;
    Ok(runs(&entries, |x| has_own_data(x, true))
        .into_iter()
        .map(|(first, count)| {
            let a = start + first as u64 * PAGE_SIZE;
            (a, a + count as u64 * PAGE_SIZE)
        })
        .collect())
}

/// The madvise flags of mappings, by range, in address order.
type FlagsByRange = Vec<((u64, u64), Vec<String>)>;

/// The madvise flags of every mapping of `pid`.
fn read_flags(pid: i32) -> Result<FlagsByRange> {
    let maps = Process::new(pid)
        .and_then(|p| p.smaps())
        .map_err(Error::proc(pid, "memory maps"))?;
    Ok(maps
        .iter()
        .map(|m| (m.address, memory::kept_flags(m.extension.vm_flags)))
        .collect())
}

/// The flags of the mapping that holds all of `start..end`, if one does.
/// The range may be part of a larger mapping by now: tracking a new
/// mapping's writes lets the kernel merge it with a tracked neighbour, and
/// the kernel merges only mappings whose flags are alike.
fn flags_of(flags: &FlagsByRange, start: u64, end: u64) -> Option<&Vec<String>> {
    let i = flags.partition_point(|((_, e), _)| *e <= start);
    flags
        .get(i)
        .filter(|((s, e), _)| *s <= start && end <= *e)
        .map(|(_, f)| f)
}

/// Copies page runs of `pid` into `buf`, laid out as their offsets say;
/// large copies in two halves at once (the tree is stopped: both CPUs of a
/// small machine are free).
/// Returns the CPU time the helper thread spent (the caller's own is its
/// thread's).
fn copy_runs(pid: Pid, runs: &[PageRun], readable: &[bool], buf: &mut [u8]) -> Result<Duration> {
    let total: u64 = runs.iter().map(|r| r.count * PAGE_SIZE).sum();
    if total < 2 << 20 || runs.len() < 2 {
        return crate::procmem::read_runs(pid, runs, readable, buf, 0).map(|()| Duration::ZERO);
    }
    let half = runs.partition_point(|r| r.offset < total / 2).max(1);
    let split = runs[half].offset;
    let (a, b) = buf.split_at_mut(split as usize);
    std::thread::scope(|s| {
        let other = s.spawn(|| {
            let r = crate::procmem::read_runs(pid, &runs[half..], &readable[half..], b, split);
            (r, super::thread_cpu_time())
        });
        let mine = crate::procmem::read_runs(pid, &runs[..half], &readable[..half], a, 0);
        let (theirs, cpu) = other
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p));
        mine.and(theirs).map(|()| cpu)
    })
}

impl MemoryPolicy for DeltaPolicy {
    fn amend(&mut self, image_pid: i32, vmas: &mut [Vma]) -> Result<()> {
        let Some((pid, ranges)) = self.flags_pending.remove(&image_pid) else {
            return Ok(());
        };
        // The process may have changed its mappings since: only those
        // still the same get flags from now.
        let flags = match read_flags(pid) {
            Ok(f) => f,
            Err(_) => return Ok(()),
        };
        let wanted: std::collections::HashSet<(u64, u64)> = ranges.into_iter().collect();
        for v in vmas.iter_mut() {
            if wanted.contains(&(v.start, v.end))
                && let Some(f) = flags_of(&flags, v.start, v.end)
            {
                v.flags = f.clone();
            }
        }
        if let Some(t) = self.procs.get_mut(&pid) {
            for v in t.vmas.iter_mut() {
                if let Some(f) = flags_of(&flags, v.start, v.end) {
                    v.flags = f.clone();
                }
            }
        }
        Ok(())
    }

    fn capture(&mut self, mut f: Frozen) -> Result<MemoryDump> {
        let pid = f.p.pid.as_raw();
        let t_start = Instant::now();
        self.seen.push(pid);
        if let Some(zs) = self.zombies.remove(&pid) {
            super::snapshot::reap(f.inj, f.p.pid, &zs)?;
        }
        let fresh = self.tracked(&mut f)?;
        let t_tracked = t_start.elapsed();
        let delta = match self.delta(&mut f, fresh) {
            Ok(d) => d,
            Err(e) => {
                // Whatever the tracker knew is unreliable now.
                self.procs.remove(&pid);
                return Err(e);
            }
        };
        let bytes = delta.dump.bytes;
        tracing::debug!(
            pid,
            tracked_us = t_tracked.as_micros() as u64,
            delta_us = t_start.elapsed().as_micros() as u64,
            "delta found"
        );
        let resident = resident_pages(pid);
        let snapshot = match self.mode {
            CopyMode::Direct => false,
            CopyMode::Snapshot => true,
            CopyMode::Auto => bytes > 0 && self.model.prefer_snapshot(bytes, resident),
        };
        let source = if snapshot {
            let t0 = Instant::now();
            let child = super::snapshot::take(f.inj, f.p.pid)?;
            let took = t0.elapsed();
            self.model.learn_snapshot(resident, took);
            self.stats.snapshot += took;
            self.stats.snapshots += 1;
            Source::Snapshot(child)
        } else {
            let t0 = Instant::now();
            let mut buf = self.buffer(bytes as usize);
            self.stats.helper_cpu +=
                copy_runs(f.p.pid, &delta.dump.pages, &delta.readable, &mut buf)?;
            let took = t0.elapsed();
            self.model.learn_direct(bytes, took);
            self.stats.copy += took;
            self.stats.direct += 1;
            Source::Copied(buf)
        };
        debug_assert_eq!(delta.content.iter().map(|(s, e)| e - s).sum::<u64>(), bytes);
        self.stats.bytes += bytes;
        self.jobs.push(Job {
            pid,
            image_pid: f.image_pid,
            runs: delta.dump.pages.clone(),
            readable: delta.readable,
            bytes,
            source,
        });
        Ok(delta.dump)
    }

    fn finish(&mut self, img: &ImageDir) -> Result<u64> {
        // Processes that are gone took their tracking with them.
        let seen = std::mem::take(&mut self.seen);
        self.procs.retain(|p, _| seen.contains(p));
        self.seen = seen;
        let mut total = 0;
        let mut first_err = None;
        for job in std::mem::take(&mut self.jobs) {
            let path = img.pages_file(job.image_pid);
            let written = (|| -> Result<Vec<u8>> {
                let buf = match job.source {
                    Source::Copied(buf) => buf,
                    Source::Snapshot(snap) => {
                        let mut buf = self.buffer(job.bytes as usize);
                        let r = copy_runs(snap.pid, &job.runs, &job.readable, &mut buf);
                        super::snapshot::end(snap.pid);
                        let r = r.map(|cpu| self.stats.helper_cpu += cpu);
                        self.zombies.entry(job.pid).or_default().push(snap);
                        r?;
                        buf
                    }
                };
                let out = File::create(&path).map_err(|e| Error::image(&path, e))?;
                crate::common::write_at_in_pieces(&out, &buf[..job.bytes as usize], 0)
                    .map_err(|e| Error::image(&path, e))?;
                Ok(buf)
            })();
            match written {
                Ok(buf) => {
                    self.spare.push(buf);
                    total += job.bytes;
                }
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        // One buffer per process is enough to keep.
        self.spare.truncate(self.procs.len().max(1));
        match first_err {
            Some(e) => Err(e),
            None => Ok(total),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_come_from_the_mapping_that_holds_the_range() {
        let f = |s: &str| vec![s.to_string()];
        let flags = vec![
            ((0x1000, 0x3000), f("dd")),
            ((0x3000, 0x8000), f("wf")),
            ((0x9000, 0xa000), f("hg")),
        ];
        assert_eq!(flags_of(&flags, 0x1000, 0x3000), Some(&f("dd")));
        // Merged with its neighbour since it was recorded.
        assert_eq!(flags_of(&flags, 0x5000, 0x8000), Some(&f("wf")));
        assert_eq!(flags_of(&flags, 0x3000, 0x4000), Some(&f("wf")));
        // Across two mappings, or in a gap: nothing known.
        assert_eq!(flags_of(&flags, 0x2000, 0x4000), None);
        assert_eq!(flags_of(&flags, 0x8000, 0x9000), None);
        assert_eq!(flags_of(&flags, 0xa000, 0xb000), None);
    }
}
