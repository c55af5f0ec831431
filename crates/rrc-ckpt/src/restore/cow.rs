//! Private memory a forked child shares copy-on-write with its parent.
//!
//! A child is forked from its parent once the parent's memory is in place,
//! so it starts with a copy-on-write view of all of it. Each private
//! anonymous area the child had in the same place, size, protection and
//! advice is kept as inherited, and only its pages that differ from the
//! parent's are written (and those the child did not have are dropped):
//! the pages the two still had alike stay shared, as they were before the
//! checkpoint, instead of coming back as two copies.

use crate::image::{ImageDir, PageRun, ProcessImage, Vma, VmaKind};
use crate::procfs::PAGE_SIZE;
use crate::remote::Batch;
use crate::restore::tracee::Tracee;
use crate::{Error, Result, nr};

/// Advice a fork does not hand on as it is: such an area is mapped anew.
const NOT_INHERITED: [&str; 3] = ["dc", "wf", "lo"];

/// The areas (start, end), sorted, of a process with `vmas` that it keeps
/// from a parent with `parent`.
pub fn inheritable(vmas: &[Vma], parent: Option<&[Vma]>) -> Vec<(u64, u64)> {
    let Some(parent) = parent else {
        return Vec::new();
    };
    let private_anon = |v: &&Vma| matches!(v.kind, VmaKind::Anon) && !v.shared;
    vmas.iter()
        .filter(private_anon)
        .filter(|v| {
            let at = parent.partition_point(|w| w.start < v.start);
            parent.get(at).is_some_and(|w| {
                private_anon(&w)
                    && w.end == v.end
                    && w.prot == v.prot
                    && w.flags == v.flags
                    && !w.flags.iter().any(|f| NOT_INHERITED.contains(&f.as_str()))
            })
        })
        .map(|v| (v.start, v.end))
        .collect()
}

/// The ranges below `top` to unmap so that only `kept` (sorted, disjoint)
/// and `also` stay.
pub fn unmap_except(kept: &[(u64, u64)], also: (u64, u64), top: u64) -> Vec<(u64, u64)> {
    let mut stay = kept.to_vec();
    stay.push(also);
    stay.sort_unstable();
    let mut gaps = Vec::new();
    let mut at = 0;
    for (s, e) in stay {
        if s > at {
            gaps.push((at, s));
        }
        at = at.max(e);
    }
    if at < top {
        gaps.push((at, top));
    }
    gaps
}

/// What a child does to its inherited areas.
#[derive(Debug, Default, PartialEq)]
pub struct Plan {
    /// Its pages that differ from the parent's (offsets in its own file).
    pub write: Vec<PageRun>,
    /// The parent's pages it did not have: dropped, they read as zeros.
    pub drop: Vec<(u64, u64)>,
    /// Pages left shared.
    pub shared: u64,
}

/// The run of `runs` (sorted) that holds page `addr`.
fn run_at(runs: &[PageRun], addr: u64) -> Option<&PageRun> {
    let i = runs.partition_point(|r| r.start <= addr).checked_sub(1)?;
    let r = &runs[i];
    (addr < r.start.saturating_add(r.count.saturating_mul(PAGE_SIZE))).then_some(r)
}

/// One page of a run list (sorted), by address: its bytes in `data`.
fn page_at<'d>(runs: &[PageRun], data: &'d [u8], addr: u64) -> Option<&'d [u8]> {
    let r = run_at(runs, addr)?;
    let off = usize::try_from(r.offset.checked_add(addr - r.start)?).ok()?;
    data.get(off..off.checked_add(PAGE_SIZE as usize)?)
}

/// Adds page `addr` to a list of ranges, growing the last one if it ends
/// there.
fn extend(ranges: &mut Vec<(u64, u64)>, addr: u64) {
    match ranges.last_mut() {
        Some((_, e)) if *e == addr => *e += PAGE_SIZE,
        _ => ranges.push((addr, addr + PAGE_SIZE)),
    }
}

/// Every page of a run list, by address.
fn pages(runs: &[PageRun]) -> impl Iterator<Item = u64> + '_ {
    runs.iter()
        .flat_map(|r| (0..r.count).map(move |k| r.start + k * PAGE_SIZE))
}

/// Compares the child's pages in its inherited areas (`mine`, data in
/// `my_data`) with the parent's (`theirs`, data in `their_data`). A page
/// of the child's that lies beyond its data is written, so that writing
/// it reports the image as corrupt.
pub fn plan(mine: &[PageRun], my_data: &[u8], theirs: &[PageRun], their_data: &[u8]) -> Plan {
    let sorted = |runs: &[PageRun]| {
        let mut v = runs.to_vec();
        v.sort_unstable_by_key(|r| r.start);
        v
    };
    let (mine, theirs) = (sorted(mine), sorted(theirs));
    let mut plan = Plan::default();
    let mut write: Vec<(u64, u64)> = Vec::new();
    for addr in pages(&mine) {
        let same = match (
            page_at(&mine, my_data, addr),
            page_at(&theirs, their_data, addr),
        ) {
            (Some(a), Some(b)) => a == b,
            _ => false,
        };
        if same {
            plan.shared += 1;
        } else {
            extend(&mut write, addr);
        }
    }
    for addr in pages(&theirs) {
        if run_at(&mine, addr).is_none() {
            extend(&mut plan.drop, addr);
        }
    }
    // Written back as runs of the child's own file, split where its runs
    // end: their data need not be adjacent in the file.
    for (mut at, end) in write {
        while at < end {
            let r = run_at(&mine, at).expect("a written page is the child's");
            let to = end.min(r.start + r.count * PAGE_SIZE);
            plan.write.push(PageRun {
                start: at,
                count: (to - at) / PAGE_SIZE,
                offset: r.offset + (at - r.start),
            });
            at = to;
        }
    }
    plan
}

/// Brings the inherited areas `kept` of `p` (their pages `mine`, a part of
/// its image's) to what the image says, from `parent`'s memory in place.
pub fn fill(
    t: &mut Tracee,
    p: &ProcessImage,
    parent: &ProcessImage,
    img: &ImageDir,
    kept: &[(u64, u64)],
    mine: &[PageRun],
) -> Result<()> {
    let theirs = super::mm::split_in(&parent.pages, kept);
    let my_data = super::mm::map_pages(&img.pages_file(p.pid), mine)?;
    let their_data = super::mm::map_pages(&img.pages_file(parent.pid), &theirs)?;
    let plan = plan(mine, &my_data, &theirs, &their_data);
    let mut batch = Batch::new();
    for &(s, e) in &plan.drop {
        batch.push(nr::SYS_madvise, &[s, e - s, libc::MADV_DONTNEED as u64]);
    }
    for (r, (s, e)) in t.batch(&batch)?.into_iter().zip(&plan.drop) {
        if r < 0 {
            return Err(Error::Restore {
                pid: p.pid,
                stage: "drop pages",
                detail: format!(
                    "{s:#x}-{e:#x}: {}",
                    std::io::Error::from_raw_os_error(-r as i32)
                ),
            });
        }
    }
    tracing::debug!(
        pid = p.pid,
        shared = plan.shared,
        written = plan.write.iter().map(|r| r.count).sum::<u64>(),
        dropped = plan
            .drop
            .iter()
            .map(|(s, e)| (e - s) / PAGE_SIZE)
            .sum::<u64>(),
        "pages inherited from the parent"
    );
    super::mm::write_mapped(t.pid, &plan.write, &my_data, p.pid)
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: u64 = PAGE_SIZE;

    fn run(start: u64, count: u64, offset: u64) -> PageRun {
        PageRun {
            start: start * P,
            count,
            offset: offset * P,
        }
    }

    /// `n` pages, page `i` filled with byte `fill(i)`.
    fn data(n: u64, fill: impl Fn(u64) -> u8) -> Vec<u8> {
        (0..n)
            .flat_map(|i| std::iter::repeat_n(fill(i), P as usize))
            .collect()
    }

    #[test]
    fn only_differing_pages_are_written_and_missing_ones_dropped() {
        // The parent has pages 10..20; the child 12..22 in two runs (its
        // file holds 16..22 first), differing at pages 14 and 16.
        let theirs = [run(10, 10, 0)];
        let their_data = data(10, |i| i as u8);
        let mine = [run(16, 6, 0), run(12, 4, 6)];
        let my_data = data(10, |i| match i {
            0 => 99,                   // page 16
            i if i < 6 => 6 + i as u8, // pages 17..22 (18, 19 equal)
            8 => 77,                   // page 14
            i => (i - 6 + 2) as u8,    // pages 12, 13, 15
        });
        let plan = plan(&mine, &my_data, &theirs, &their_data);
        assert_eq!(plan.drop, vec![(10 * P, 12 * P)]);
        // 12, 13, 15, 17, 18, 19 are alike; 14, 16 differ; 20 and 21 the
        // parent does not have.
        assert_eq!(plan.shared, 6);
        assert_eq!(
            plan.write,
            vec![run(14, 1, 8), run(16, 1, 0), run(20, 2, 4)]
        );
    }

    #[test]
    fn a_child_page_beyond_its_data_is_written_to_be_reported() {
        let plan = plan(
            &[run(0, 2, 0)],
            &data(1, |_| 1),
            &[run(0, 2, 0)],
            &data(2, |_| 1),
        );
        assert_eq!(plan.shared, 1);
        assert_eq!(plan.write, vec![run(1, 1, 1)]);
    }

    #[test]
    fn gaps_leave_the_kept_areas_and_the_scratch() {
        let kept = [(0x1000, 0x3000), (0x3000, 0x5000), (0x9000, 0xa000)];
        assert_eq!(
            unmap_except(&kept, (0x6000, 0x7000), 0x10000),
            vec![
                (0, 0x1000),
                (0x5000, 0x6000),
                (0x7000, 0x9000),
                (0xa000, 0x10000)
            ]
        );
        assert_eq!(
            unmap_except(&[], (0, 0x1000), 0x2000),
            vec![(0x1000, 0x2000)]
        );
    }

    fn image(vmas: Vec<Vma>) -> ProcessImage {
        ProcessImage {
            vmas,
            ..Default::default()
        }
    }

    fn anon(start: u64, end: u64, prot: u32, flags: &[&str]) -> Vma {
        Vma {
            start,
            end,
            prot,
            shared: false,
            kind: VmaKind::Anon,
            flags: flags.iter().map(|f| f.to_string()).collect(),
        }
    }

    #[test]
    fn areas_alike_in_place_size_protection_and_advice_are_kept() {
        let rw = (libc::PROT_READ | libc::PROT_WRITE) as u32;
        let parent = image(vec![
            anon(0x1000, 0x3000, rw, &[]),
            anon(0x4000, 0x6000, rw, &[]),
            anon(0x7000, 0x8000, rw, &["dc"]),
            anon(0x9000, 0xa000, rw, &["hg"]),
            anon(0xb000, 0xc000, rw, &[]),
        ]);
        let child = image(vec![
            anon(0x1000, 0x3000, rw, &[]),                     // kept
            anon(0x4000, 0x5000, rw, &[]),                     // smaller
            anon(0x7000, 0x8000, rw, &["dc"]),                 // not forked
            anon(0x9000, 0xa000, rw, &[]),                     // other advice
            anon(0xb000, 0xc000, libc::PROT_READ as u32, &[]), // other protection
        ]);
        assert_eq!(
            inheritable(&child.vmas, Some(&parent.vmas)),
            vec![(0x1000, 0x3000)]
        );
        assert!(inheritable(&child.vmas, None).is_empty());
    }
}
