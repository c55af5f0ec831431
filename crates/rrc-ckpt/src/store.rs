//! Applying a delta onto the image of the checkpoint it follows, so that
//! the image becomes exactly what a full checkpoint at the delta's moment
//! would have written.
//!
//! A delta is refused before anything is touched when one of its files is
//! missing or does not match its checksum, when it does not follow the image
//! (a delta in between is missing, or it belongs to another series), or when
//! it was already applied. The image is never left half-updated: the new
//! one is built aside and exchanged for it atomically (see [`apply`]).
//! Images left half-updated by earlier versions, which marked them with an
//! `APPLYING` file, are refused by restore.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::image::{ImageDir, Manifest, PageRun, ProcessImage, VmaKind};
use crate::procfs::PAGE_SIZE;
use crate::{Error, Result};

/// Present in an image an earlier version left half-updated.
pub const APPLYING: &str = "APPLYING";

/// CRC-32 of a whole file.
pub fn crc_of_file(path: &Path) -> Result<u32> {
    let mut f = File::open(path).map_err(|e| Error::image(path, e))?;
    let mut h = crc32fast::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| Error::image(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize())
}

fn refuse(path: &Path, detail: impl Into<String>) -> Error {
    Error::DeltaRefused {
        path: path.into(),
        detail: detail.into(),
    }
}

/// Checks that every file a delta lists is there and intact, and that it
/// has no file it does not list.
pub fn verify(delta: &ImageDir, m: &Manifest) -> Result<()> {
    let path = delta.path();
    if m.lineage.is_none() || m.checksums.is_empty() {
        return Err(refuse(
            path,
            "it is not part of a series of checkpoints (no lineage or checksums)",
        ));
    }
    for (name, want) in &m.checksums {
        let file = delta.file(name);
        if !file.exists() {
            return Err(refuse(path, format!("its file {name} is missing")));
        }
        let got = crc_of_file(&file)?;
        if got != *want {
            return Err(refuse(
                path,
                format!("its file {name} is corrupt (CRC-32 {got:08x}, expected {want:08x})"),
            ));
        }
    }
    for e in fs::read_dir(path)
        .map_err(|e| Error::image(path, e))?
        .flatten()
    {
        let name = e.file_name().to_string_lossy().into_owned();
        if name != "manifest.json" && !m.checksums.contains_key(&name) {
            return Err(refuse(
                path,
                format!("it holds a file it does not list: {name}"),
            ));
        }
    }
    Ok(())
}

/// Whether `m` may be applied onto an image whose manifest is `image`.
fn check_follows(path: &Path, image: &Manifest, m: &Manifest) -> Result<()> {
    let (Some(mine), Some(theirs)) = (&image.lineage, &m.lineage) else {
        return Err(refuse(
            path,
            "the image is not part of a series of checkpoints",
        ));
    };
    let Some(parent) = &m.parent else {
        return Err(refuse(
            path,
            "it is a full checkpoint (the first of its series), not a delta",
        ));
    };
    if parent == mine {
        return Ok(());
    }
    if parent.series != mine.series {
        return Err(refuse(
            path,
            format!(
                "it belongs to series {}, the image to series {}",
                parent.series, mine.series
            ),
        ));
    }
    if theirs.epoch <= mine.epoch {
        return Err(refuse(
            path,
            format!(
                "it is checkpoint {} and the image is already at checkpoint {}",
                theirs.epoch, mine.epoch
            ),
        ));
    }
    Err(refuse(
        path,
        format!(
            "it follows checkpoint {} but the image is at checkpoint {}: the deltas in between are missing",
            parent.epoch, mine.epoch
        ),
    ))
}

/// Where the image at `image` is prepared before it replaces the old one.
fn next_of(image: &Path) -> PathBuf {
    let name = image
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    image.with_file_name(format!(".{name}.next"))
}

/// Applies the delta at `delta` onto the image at `image`.
///
/// The image stays whole whatever happens (a full disk, a crash of the
/// applying process): the result is built aside, in a directory next to
/// it, and replaces it in one atomic exchange. New pages go into the
/// image's pages files where the old records name nothing, or at their
/// end, never over a page those records name; the new records and files
/// are written in the directory aside, which links the pages files;
/// a pages file to compact is written there anew. On an error the
/// directory aside is removed and the pages files cut back to their old
/// length.
pub fn apply(image: &Path, delta: &Path) -> Result<ApplyReport> {
    let started = std::time::Instant::now();
    let img = ImageDir::new(image);
    let d = ImageDir::new(delta);
    let dm = d.read_manifest()?;
    let im = img.read_manifest()?;
    if img.file(APPLYING).exists() {
        return Err(refuse(
            delta,
            format!(
                "the image {} was left half-updated by an earlier apply; it cannot be used",
                image.display()
            ),
        ));
    }
    check_follows(delta, &im, &dm)?;
    verify(&d, &dm)?;
    let next = next_of(image);
    // A directory aside left by an apply that did not finish.
    let _ = fs::remove_dir_all(&next);
    let next_img = ImageDir::create(&next)?;
    let mut grown: Vec<(PathBuf, u64)> = Vec::new();
    let built = build_aside(&img, &d, &dm, &next_img, &mut grown);
    // Not synced: the exchange is atomic for this host's processes (an
    // error, a crash of rrc); an image must outlive its primary, not a
    // power cut of the host that holds it, and syncing a large pages file
    // every epoch would cost the commit more than the epoch.
    let switched = built.and_then(|report| {
        nix::fcntl::renameat2(
            nix::fcntl::AT_FDCWD,
            &next,
            nix::fcntl::AT_FDCWD,
            image,
            nix::fcntl::RenameFlags::RENAME_EXCHANGE,
        )
        .map_err(|e| Error::image(image, std::io::Error::from(e)))?;
        Ok(report)
    });
    match switched {
        Ok(mut report) => {
            // `next` now holds the old image.
            if let Err(e) = fs::remove_dir_all(&next) {
                tracing::warn!(error = %e, path = %next.display(), "removing the old image");
            }
            report.took = started.elapsed();
            Ok(report)
        }
        Err(e) => {
            let _ = fs::remove_dir_all(&next);
            for (path, len) in grown {
                if let Ok(f) = OpenOptions::new().write(true).open(&path) {
                    let _ = f.set_len(len);
                }
            }
            Err(e)
        }
    }
}

/// The new image in `next`: the old one's pages files (grown by the
/// delta's pages, noted in `grown` with their old lengths) or compacted
/// copies of them, and the delta's records and other files.
fn build_aside(
    img: &ImageDir,
    d: &ImageDir,
    dm: &Manifest,
    next: &ImageDir,
    grown: &mut Vec<(PathBuf, u64)>,
) -> Result<ApplyReport> {
    let mut report = ApplyReport::default();
    for pid in &dm.processes {
        let name = ImageDir::process_name(*pid);
        let mut p: ProcessImage = d.read_json(&name)?;
        let old: Option<ProcessImage> = if img.file(&name).exists() {
            Some(img.read_json(&name)?)
        } else {
            None
        };
        let mut index = PageIndex::new(old.map(|o| o.pages).unwrap_or_default());
        let pages_path = img.pages_file(*pid);
        let out = OpenOptions::new()
            .create(true)
            .read(true)
            .write(true)
            .truncate(false)
            .open(&pages_path)
            .map_err(|e| Error::image(&pages_path, e))?;
        let mut end = out
            .metadata()
            .map_err(|e| Error::image(&pages_path, e))?
            .len();
        grown.push((pages_path.clone(), end));
        // Space the image's records do not name (pages gone or replaced
        // by earlier deltas) takes new pages first: writing there leaves
        // the image as it is. Computed before anything changes.
        let mut free = index.free_space(end);
        for &(s, e) in &p.holes {
            index.remove(s, e);
        }
        if !p.pages.is_empty() {
            let src_path = d.pages_file(*pid);
            let src = File::open(&src_path).map_err(|e| Error::image(&src_path, e))?;
            let map = crate::sys::map_image(&src).map_err(|e| Error::image(&src_path, e))?;
            for r in &p.pages {
                let len = (r.count * PAGE_SIZE) as usize;
                let data = map
                    .get(r.offset as usize..r.offset as usize + len)
                    .ok_or_else(|| Error::CorruptImage {
                        path: src_path.clone(),
                        detail: format!("pages at {:#x} lie beyond the end of the file", r.start),
                    })?;
                // Never over a page the old records name: in free space,
                // or appended.
                for (start, count, at) in index.place_new(r.start, r.count, &mut free, &mut end) {
                    let from = (start - r.start) as usize;
                    let n = (count * PAGE_SIZE) as usize;
                    crate::common::write_at_in_pieces(&out, &data[from..from + n], at)
                        .map_err(|e| Error::image(&pages_path, e))?;
                }
                report.bytes += len as u64;
            }
        }
        // Pages outside the private mappings of the moment are gone.
        let private: Vec<(u64, u64)> = p
            .vmas
            .iter()
            .filter(|v| !v.shared && matches!(v.kind, VmaKind::Anon | VmaKind::File { .. }))
            .map(|v| (v.start, v.end))
            .collect();
        index.retain_within(&private);
        p.pages = index.runs();
        p.holes.clear();
        let live: u64 = p.pages.iter().map(|r| r.count * PAGE_SIZE).sum();
        let next_pages = next.pages_file(*pid);
        if end > 2 * live + (64 << 20) {
            p.pages = compact(&out, &pages_path, &next_pages, &p.pages)?;
            report.compacted += 1;
        } else {
            fs::hard_link(&pages_path, &next_pages).map_err(|e| Error::image(&next_pages, e))?;
        }
        next.write_json(&name, &p)?;
    }
    // Everything else of the delta is complete: it replaces the image's.
    for name in dm.checksums.keys() {
        if name.starts_with("pages-") || name.starts_with("process-") {
            continue;
        }
        fs::copy(d.file(name), next.file(name)).map_err(|e| Error::image(&next.file(name), e))?;
    }
    let mut m = dm.clone();
    m.parent = None;
    m.checksums.clear();
    next.write_json("manifest.json", &m)?;
    Ok(report)
}

#[derive(Debug, Default, Clone)]
pub struct ApplyReport {
    /// Bytes of memory the delta carried.
    pub bytes: u64,
    /// Pages files rewritten to drop the space of pages that are gone.
    pub compacted: usize,
    pub took: std::time::Duration,
}

/// A directory holding a series of checkpoints: `image/`, the last
/// checkpoint as a full image, and the checkpoints not yet applied to it,
/// each in a directory named by its number (`00000007/`). A series taken
/// with its deltas kept holds only the numbered directories, the first of
/// them full, and gets its `image/` when it is restored.
pub struct SeriesDir {
    dir: PathBuf,
    keep_deltas: bool,
}

/// Name of the directory of checkpoint `epoch` in a series directory.
pub fn layer_name(epoch: u64) -> String {
    format!("{epoch:08}")
}

impl SeriesDir {
    /// Prepares a new (or empty) directory for a series.
    pub fn create(dir: &Path, keep_deltas: bool) -> Result<SeriesDir> {
        ImageDir::create(dir)?;
        Ok(SeriesDir {
            dir: dir.into(),
            keep_deltas,
        })
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Where checkpoint `epoch` is to be written.
    pub fn layer(&self, epoch: u64) -> PathBuf {
        self.dir.join(layer_name(epoch))
    }

    /// The series' full image.
    pub fn image(&self) -> PathBuf {
        self.dir.join("image")
    }

    /// Takes checkpoint `epoch`, just written to [`SeriesDir::layer`], into
    /// the series: it becomes the image (the first) or is applied to it and
    /// removed, unless deltas are kept.
    pub fn commit(&self, epoch: u64) -> Result<Option<ApplyReport>> {
        if self.keep_deltas {
            return Ok(None);
        }
        let layer = self.layer(epoch);
        if epoch == 0 {
            fs::rename(&layer, self.image()).map_err(|e| Error::image(&layer, e))?;
            return Ok(None);
        }
        let r = apply(&self.image(), &layer)?;
        fs::remove_dir_all(&layer).map_err(|e| Error::image(&layer, e))?;
        Ok(Some(r))
    }

    /// Whether `dir` holds a series rather than a single image.
    pub fn is_series(dir: &Path) -> bool {
        !dir.join("manifest.json").exists()
            && (dir.join("image").join("manifest.json").exists()
                || dir.join(layer_name(0)).join("manifest.json").exists())
    }

    /// Brings the series' image up to date with every checkpoint in the
    /// directory, in order, and returns its path. `progress` hears of each
    /// delta applied.
    pub fn materialize(dir: &Path, mut progress: impl FnMut(u64, &ApplyReport)) -> Result<PathBuf> {
        let image = dir.join("image");
        let mut layers: Vec<u64> = fs::read_dir(dir)
            .map_err(|e| Error::image(dir, e))?
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                (name.len() == 8).then(|| name.parse().ok()).flatten()
            })
            .collect();
        layers.sort_unstable();
        if !image.join("manifest.json").exists() {
            let Some(&first) = layers.first() else {
                return Err(Error::CorruptImage {
                    path: dir.into(),
                    detail: "no image and no checkpoints in this series directory".into(),
                });
            };
            if first != 0 {
                return Err(Error::CorruptImage {
                    path: dir.into(),
                    detail: format!(
                        "its first checkpoint ({}) is missing, and there is no image",
                        layer_name(0)
                    ),
                });
            }
            let staging = dir.join(".image.copy");
            let _ = fs::remove_dir_all(&staging);
            copy_dir(&dir.join(layer_name(0)), &staging)?;
            let m = ImageDir::new(&staging).read_manifest()?;
            verify(&ImageDir::new(&staging), &m)?;
            fs::rename(&staging, &image).map_err(|e| Error::image(&image, e))?;
        }
        let at = ImageDir::new(&image)
            .read_manifest()?
            .lineage
            .map(|l| l.epoch)
            .unwrap_or(0);
        for epoch in layers.into_iter().filter(|e| *e > at) {
            let r = apply(&image, &dir.join(layer_name(epoch)))?;
            progress(epoch, &r);
        }
        Ok(image)
    }
}

fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    fs::create_dir_all(to).map_err(|e| Error::image(to, e))?;
    for e in fs::read_dir(from)
        .map_err(|e| Error::image(from, e))?
        .flatten()
    {
        fs::copy(e.path(), to.join(e.file_name())).map_err(|err| Error::image(&e.path(), err))?;
    }
    Ok(())
}

/// Writes the live runs of pages file `old` (at `path`) to a new pages
/// file `to`, in address order; returns where they are in it.
fn compact(old: &File, path: &Path, to: &Path, runs: &[PageRun]) -> Result<Vec<PageRun>> {
    let out = File::create(to).map_err(|e| Error::image(to, e))?;
    let mut at = 0;
    let mut new = Vec::with_capacity(runs.len());
    let mut buf = Vec::new();
    for r in runs {
        let len = (r.count * PAGE_SIZE) as usize;
        buf.resize(len, 0);
        old.read_exact_at(&mut buf, r.offset)
            .map_err(|e| Error::image(path, e))?;
        crate::common::write_at_in_pieces(&out, &buf, at).map_err(|e| Error::image(to, e))?;
        new.push(PageRun {
            start: r.start,
            count: r.count,
            offset: at,
        });
        at += len as u64;
    }
    Ok(new)
}

/// Which page of a process's memory is stored where in its pages file:
/// non-overlapping runs by start address.
#[derive(Debug, Clone, Default)]
pub struct PageIndex {
    /// start → (count, offset)
    runs: BTreeMap<u64, (u64, u64)>,
}

impl PageIndex {
    pub fn new(runs: Vec<PageRun>) -> PageIndex {
        PageIndex {
            runs: runs
                .into_iter()
                .filter(|r| r.count > 0)
                .map(|r| (r.start, (r.count, r.offset)))
                .collect(),
        }
    }

    /// The runs, merged where both addresses and offsets are contiguous.
    pub fn runs(&self) -> Vec<PageRun> {
        let mut out: Vec<PageRun> = Vec::with_capacity(self.runs.len());
        for (&start, &(count, offset)) in &self.runs {
            if let Some(last) = out.last_mut()
                && last.start + last.count * PAGE_SIZE == start
                && last.offset + last.count * PAGE_SIZE == offset
            {
                last.count += count;
                continue;
            }
            out.push(PageRun {
                start,
                count,
                offset,
            });
        }
        out
    }

    /// Runs overlapping `[start, end)`, by start.
    fn overlapping(&self, start: u64, end: u64) -> Vec<(u64, u64, u64)> {
        let mut out = Vec::new();
        if let Some((&s, &(c, o))) = self.runs.range(..start).next_back()
            && s + c * PAGE_SIZE > start
        {
            out.push((s, c, o));
        }
        for (&s, &(c, o)) in self.runs.range(start..end) {
            out.push((s, c, o));
        }
        out
    }

    /// Forgets the pages of `[start, end)`.
    pub fn remove(&mut self, start: u64, end: u64) {
        for (s, c, o) in self.overlapping(start, end) {
            self.runs.remove(&s);
            let e = s + c * PAGE_SIZE;
            if s < start {
                self.runs.insert(s, ((start - s) / PAGE_SIZE, o));
            }
            if e > end {
                self.runs
                    .insert(end, ((e - end) / PAGE_SIZE, o + (end - s)));
            }
        }
    }

    /// Keeps only the pages within the given sorted ranges.
    pub fn retain_within(&mut self, ranges: &[(u64, u64)]) {
        let mut gaps = Vec::new();
        let mut at = 0u64;
        for &(s, e) in ranges {
            if s > at {
                gaps.push((at, s));
            }
            at = at.max(e);
        }
        gaps.push((at, u64::MAX));
        for (s, e) in gaps {
            self.remove(s, e);
        }
    }

    /// The byte ranges of a pages file of `len` bytes that no run names:
    /// `(offset, length)`, in order.
    pub fn free_space(&self, len: u64) -> Vec<(u64, u64)> {
        let mut used: Vec<(u64, u64)> = self
            .runs
            .values()
            .map(|&(count, offset)| (offset, offset + count * PAGE_SIZE))
            .collect();
        used.sort_unstable();
        let mut free = Vec::new();
        let mut at = 0;
        for (s, e) in used {
            if s > at {
                free.push((at, s - at));
            }
            at = at.max(e);
        }
        if len > at {
            free.push((at, len - at));
        }
        free
    }

    /// Stores the `count` pages from `start` anew, in place of wherever
    /// they were: in the ranges of `free` (taken from it, first fit), the
    /// rest appended at `*end` (which moves on). Returns the pieces
    /// `(start, count, file offset)`.
    pub fn place_new(
        &mut self,
        start: u64,
        count: u64,
        free: &mut Vec<(u64, u64)>,
        end: &mut u64,
    ) -> Vec<(u64, u64, u64)> {
        let stop = start + count * PAGE_SIZE;
        self.remove(start, stop);
        let mut out = Vec::new();
        let mut at = start;
        while at < stop && !free.is_empty() {
            let (offset, len) = free[0];
            let pages = (len / PAGE_SIZE).min((stop - at) / PAGE_SIZE);
            if pages == 0 {
                free.remove(0);
                continue;
            }
            let bytes = pages * PAGE_SIZE;
            if bytes == len {
                free.remove(0);
            } else {
                free[0] = (offset + bytes, len - bytes);
            }
            self.runs.insert(at, (pages, offset));
            out.push((at, pages, offset));
            at += bytes;
        }
        if at < stop {
            out.push(self.append(at, stop, end));
        }
        out
    }

    fn append(&mut self, from: u64, to: u64, end: &mut u64) -> (u64, u64, u64) {
        let count = (to - from) / PAGE_SIZE;
        let at = *end;
        *end += count * PAGE_SIZE;
        self.runs.insert(from, (count, at));
        (from, count, at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    /// A page-by-page model of memory contents: page → value.
    type Model = HashMap<u64, u64>;

    #[derive(Debug, Clone)]
    enum Op {
        Write(u64, u64),
        Hole(u64, u64),
        Clip(u64, u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u64..64, 1u64..8).prop_map(|(s, n)| Op::Write(s, n)),
            (0u64..64, 1u64..16).prop_map(|(s, n)| Op::Hole(s, n)),
            (0u64..32, 32u64..72).prop_map(|(s, e)| Op::Clip(s, e)),
        ]
    }

    proptest! {
        /// Any sequence of writes, holes and clips leaves the index
        /// pointing every page at the data last written to it.
        #[test]
        fn index_tracks_last_write(ops in proptest::collection::vec(op(), 1..40)) {
            let mut index = PageIndex::default();
            let mut file: HashMap<u64, u64> = HashMap::new(); // offset → value
            let mut model = Model::new();
            let mut end = 0;
            for (stamp, op) in ops.into_iter().enumerate() {
                match op {
                    Op::Write(s, n) => {
                        // Nothing the index names before is written over.
                        let named: Vec<PageRun> = index.runs();
                        let mut free = index.free_space(end);
                        for (start, count, at) in index.place_new(s * PAGE_SIZE, n, &mut free, &mut end) {
                            for r in &named {
                                let (a, b) = (r.offset, r.offset + r.count * PAGE_SIZE);
                                prop_assert!(at + count * PAGE_SIZE <= a || at >= b);
                            }
                            for i in 0..count {
                                let page = start / PAGE_SIZE + i;
                                file.insert(at + i * PAGE_SIZE, stamp as u64 * 1000 + page);
                            }
                        }
                        for page in s..s + n {
                            model.insert(page, stamp as u64 * 1000 + page);
                        }
                    }
                    Op::Hole(s, n) => {
                        index.remove(s * PAGE_SIZE, (s + n) * PAGE_SIZE);
                        for page in s..s + n {
                            model.remove(&page);
                        }
                    }
                    Op::Clip(s, e) => {
                        index.retain_within(&[(s * PAGE_SIZE, e * PAGE_SIZE)]);
                        model.retain(|p, _| *p >= s && *p < e);
                    }
                }
                let mut seen = Model::new();
                let runs = index.runs();
                for w in runs.windows(2) {
                    prop_assert!(w[0].start + w[0].count * PAGE_SIZE <= w[1].start);
                }
                for r in runs {
                    for i in 0..r.count {
                        let page = r.start / PAGE_SIZE + i;
                        seen.insert(page, file[&(r.offset + i * PAGE_SIZE)]);
                    }
                }
                prop_assert_eq!(&seen, &model);
            }
        }
    }
}
