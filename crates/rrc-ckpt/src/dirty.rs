//! Which pages a process wrote since the last look: userfaultfd
//! write-protection in asynchronous mode (the kernel clears a page's
//! protection itself on the first write, without a fault reaching anyone)
//! and the PAGEMAP_SCAN ioctl, which lists written pages and protects them
//! again in one call. This kernel has no soft-dirty bits.
//!
//! The userfaultfd belongs to the process's memory (it is created by a call
//! injected into the process, then taken over by the engine and closed in
//! the process); its registrations live as long as the engine holds it.
//!
//! What the kernel does, measured on 6.18 (the tests pin it down):
//! - a page never touched, or discarded (MADV_DONTNEED, a reclaimed
//!   MADV_FREE page) of an anonymous mapping reads as *written*, so a
//!   discard shows up in the next scan as a written page that is not
//!   present;
//! - protecting a page never touched leaves a marker in its page table
//!   entry, which the pagemap shows as swapped; [`crate::procfs::has_data`]
//!   tells the two apart;
//! - in a private file mapping, discarding a protected copied-on-write page
//!   leaves a marker, not a written page: such mappings are checked page by
//!   page instead.
//! - only the scan that asks for written pages alone takes the kernel's
//!   fast path (about 1 ns a page instead of 25).

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};

use crate::{Error, Result, sys};

/// `struct pm_scan_arg` categories.
pub const PAGE_IS_WPALLOWED: u64 = 1 << 0;
pub const PAGE_IS_WRITTEN: u64 = 1 << 1;
pub const PAGE_IS_FILE: u64 = 1 << 2;
pub const PAGE_IS_PRESENT: u64 = 1 << 3;
pub const PAGE_IS_SWAPPED: u64 = 1 << 4;

/// A set of address ranges `[start, end)`, sorted and merged.
pub type Ranges = Vec<(u64, u64)>;

/// Dirty-page tracking of one process.
pub struct Tracker {
    uffd: OwnedFd,
    pagemap: File,
    pid: i32,
    /// Ranges registered and write-protected.
    registered: Ranges,
}

fn err(pid: i32, what: &'static str) -> impl FnOnce(std::io::Error) -> Error {
    move |e| Error::Proc {
        pid,
        what,
        detail: e.to_string(),
    }
}

impl Tracker {
    /// Takes over `uffd` (a userfaultfd of process `pid`'s memory) and
    /// enables asynchronous write-protection on it.
    pub fn new(pid: i32, uffd: OwnedFd) -> Result<Tracker> {
        sys::uffd_api(uffd.as_raw_fd())
            .map_err(err(pid, "userfaultfd (asynchronous write-protection)"))?;
        let pagemap = File::open(format!("/proc/{pid}/pagemap")).map_err(err(pid, "pagemap"))?;
        Ok(Tracker {
            uffd,
            pagemap,
            pid,
            registered: Vec::new(),
        })
    }

    /// The ranges whose writes are being tracked.
    pub fn registered(&self) -> &[(u64, u64)] {
        &self.registered
    }

    /// Starts tracking `[start, end)`: registers it and write-protects every
    /// page in it, so that the next scan sees only later writes.
    pub fn track(&mut self, start: u64, end: u64) -> Result<()> {
        sys::uffd_register_wp(self.uffd.as_raw_fd(), start, end - start).map_err(|e| {
            Error::Proc {
                pid: self.pid,
                what: "userfaultfd registration",
                detail: if e.raw_os_error() == Some(libc::EBUSY) {
                    format!(
                        "{start:#x}-{end:#x} is already tracked by another userfaultfd (another series of checkpoints of this process?)"
                    )
                } else {
                    format!("{start:#x}-{end:#x}: {e}")
                },
            }
        })?;
        self.written(start, end)?;
        insert(&mut self.registered, (start, end));
        Ok(())
    }

    /// Forgets ranges that are no longer mapped (their registrations went
    /// with the mappings).
    pub fn retain(&mut self, mapped: &[(u64, u64)]) {
        self.registered = intersect(&self.registered, mapped);
    }

    /// Forgets ranges whose mapping was replaced since they were
    /// registered (unmapped and mapped again at the same address, or moved
    /// there by mremap): the kernel no longer tracks them. One walk of the
    /// address space that skips every mapping still registered.
    pub fn resync(&mut self) -> Result<()> {
        if self.registered.is_empty() {
            return Ok(());
        }
        let (start, end) = (
            self.registered[0].0,
            self.registered[self.registered.len() - 1].1,
        );
        let untracked = self.scan(
            start,
            end,
            0,
            PAGE_IS_WPALLOWED,
            PAGE_IS_WPALLOWED,
            0,
            PAGE_IS_WPALLOWED,
        )?;
        self.registered = subtract(&self.registered, &untracked);
        Ok(())
    }

    /// Pages of `[start, end)` written (or discarded) since the last call,
    /// protected again as they are reported.
    pub fn written(&mut self, start: u64, end: u64) -> Result<Ranges> {
        self.scan(
            start,
            end,
            sys::PM_SCAN_WP_MATCHING | sys::PM_SCAN_CHECK_WPASYNC,
            0,
            PAGE_IS_WRITTEN,
            0,
            PAGE_IS_WRITTEN,
        )
    }

    /// Pages written (or discarded) since the last look anywhere in the
    /// tracked ranges, protected again; one walk that skips every mapping
    /// not tracked.
    pub fn written_everywhere(&mut self) -> Result<Ranges> {
        if self.registered.is_empty() {
            return Ok(Vec::new());
        }
        let (start, end) = (
            self.registered[0].0,
            self.registered[self.registered.len() - 1].1,
        );
        let all = self.scan(
            start,
            end,
            sys::PM_SCAN_WP_MATCHING,
            0,
            PAGE_IS_WRITTEN,
            0,
            PAGE_IS_WRITTEN,
        )?;
        // Only what is known to be tracked (resync first).
        Ok(intersect(&all, &self.registered))
    }

    /// Pages of `[start, end)` that are present or swapped (or hold a
    /// write-protection marker): a quick superset of the pages with data,
    /// skipping empty stretches of the page tables.
    pub fn populated(&self, start: u64, end: u64) -> Result<Ranges> {
        let any = PAGE_IS_PRESENT | PAGE_IS_SWAPPED;
        self.scan(start, end, 0, 0, 0, any, any)
    }

    #[allow(clippy::too_many_arguments)]
    fn scan(
        &self,
        start: u64,
        end: u64,
        flags: u64,
        inverted: u64,
        mask: u64,
        anyof: u64,
        ret: u64,
    ) -> Result<Ranges> {
        let mut out = Vec::new();
        let mut at = start;
        while at < end {
            let (regions, walk_end) = sys::pagemap_scan(
                self.pagemap.as_raw_fd(),
                at,
                end,
                flags,
                inverted,
                mask,
                anyof,
                ret,
            )
            .map_err(|e| Error::Proc {
                pid: self.pid,
                what: "PAGEMAP_SCAN",
                detail: format!("{at:#x}-{end:#x}: {e}"),
            })?;
            for (s, e) in regions {
                insert(&mut out, (s, e));
            }
            if walk_end <= at {
                break;
            }
            at = walk_end;
        }
        Ok(out)
    }
}

/// Adds `r` to a sorted, merged range set.
pub fn insert(set: &mut Ranges, r: (u64, u64)) {
    if r.0 >= r.1 {
        return;
    }
    // Ranges mostly come in address order: appending is the common case.
    match set.last_mut() {
        None => {
            set.push(r);
            return;
        }
        Some(last) if last.1 >= r.0 && last.0 <= r.0 => {
            last.1 = last.1.max(r.1);
            return;
        }
        Some(last) if last.1 < r.0 => {
            set.push(r);
            return;
        }
        _ => {}
    }
    set.push(r);
    set.sort_unstable();
    let mut merged: Ranges = Vec::with_capacity(set.len());
    for &(s, e) in set.iter() {
        match merged.last_mut() {
            Some(m) if m.1 >= s => m.1 = m.1.max(e),
            _ => merged.push((s, e)),
        }
    }
    *set = merged;
}

/// `a ∩ b` of two sorted, merged range sets.
pub fn intersect(a: &[(u64, u64)], b: &[(u64, u64)]) -> Ranges {
    let (mut i, mut j) = (0, 0);
    let mut out = Vec::new();
    while i < a.len() && j < b.len() {
        let s = a[i].0.max(b[j].0);
        let e = a[i].1.min(b[j].1);
        if s < e {
            out.push((s, e));
        }
        if a[i].1 < b[j].1 {
            i += 1;
        } else {
            j += 1;
        }
    }
    out
}

/// `a \ b` of two sorted, merged range sets.
pub fn subtract(a: &[(u64, u64)], b: &[(u64, u64)]) -> Ranges {
    let mut out = Vec::new();
    let mut j = 0;
    for &(s, e) in a {
        let mut cur = s;
        while j < b.len() && b[j].1 <= cur {
            j += 1;
        }
        let mut k = j;
        while k < b.len() && b[k].0 < e {
            if b[k].0 > cur {
                out.push((cur, b[k].0));
            }
            cur = cur.max(b[k].1);
            k += 1;
        }
        if cur < e {
            out.push((cur, e));
        }
    }
    out
}

/// `a ∪ b`.
pub fn union(a: &[(u64, u64)], b: &[(u64, u64)]) -> Ranges {
    let mut all: Ranges = a.iter().chain(b.iter()).copied().collect();
    all.sort_unstable();
    let mut out: Ranges = Vec::with_capacity(all.len());
    for (s, e) in all {
        match out.last_mut() {
            Some(m) if m.1 >= s => m.1 = m.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_algebra() {
        let a = vec![(0, 10), (20, 30)];
        let b = vec![(5, 25)];
        assert_eq!(intersect(&a, &b), vec![(5, 10), (20, 25)]);
        assert_eq!(subtract(&a, &b), vec![(0, 5), (25, 30)]);
        assert_eq!(union(&a, &b), vec![(0, 30)]);
        let mut s = vec![(0, 4)];
        insert(&mut s, (4, 8));
        insert(&mut s, (20, 24));
        insert(&mut s, (10, 12));
        assert_eq!(s, vec![(0, 8), (10, 12), (20, 24)]);
        assert_eq!(
            subtract(&[(0, 100)], &[(10, 20), (30, 40)]),
            vec![(0, 10), (20, 30), (40, 100)]
        );
    }
}
