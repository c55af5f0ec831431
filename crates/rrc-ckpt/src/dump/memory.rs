//! The address space of a stopped process: its mappings, and the contents
//! that are not in some file already.

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;

use nix::unistd::Pid;
use procfs::process::{MMPermissions, MMapPath, MemoryMap, VmFlags};

use crate::dump::ShmemLimit;
use crate::dump::inject::Injector;
use crate::dump::splice::PageSplicer;
use crate::image::{ImageDir, Owner, PageRun, SharedMemory, ShmemKind, Vma, VmaKind};
use crate::procfs::{PAGE_SIZE, PageMap, has_own_data, runs};
use crate::{Error, Result, sys};

/// Shared memory objects met so far in the tree, by (dev, inode).
#[derive(Default)]
pub struct ShmemTable {
    pub objects: Vec<SharedMemory>,
    index: HashMap<(u64, u64), usize>,
    /// Bytes to save of the objects saved only in part, by (dev, inode).
    keep: HashMap<(u64, u64), u64>,
    /// Deleted mapped files whose content is saved, by (dev, inode).
    mapped_saved: std::collections::HashSet<(u64, u64)>,
    /// SysV segments by file handle (their inode numbers are their ids,
    /// which two IPC namespaces may both have), and each one's handle.
    sysv: HashMap<Vec<u8>, usize>,
    sysv_handles: HashMap<usize, Vec<u8>>,
}

/// What a process's memory turned into.
#[derive(Default)]
pub struct MemoryDump {
    pub vmas: Vec<Vma>,
    pub pages: Vec<PageRun>,
    /// Ranges whose earlier contents are gone (for a delta).
    pub holes: Vec<(u64, u64)>,
    pub bytes: u64,
}

/// Every page, copied while the tree is stopped.
pub struct Full {
    /// The image is synced before the tree is killed: its pages start on
    /// their way to the disk as they are written.
    pub writeback: bool,
}

impl crate::dump::MemoryPolicy for Full {
    fn capture(&mut self, f: crate::dump::Frozen) -> Result<MemoryDump> {
        dump(
            f.p.pid,
            f.img,
            f.image_pid,
            f.shmem,
            f.problems,
            f.inj,
            self.writeback,
        )
    }

    fn finish(&mut self, img: &ImageDir) -> Result<u64> {
        // Already written; the pages files are the memory.
        let mut n = 0;
        for e in std::fs::read_dir(img.path())
            .map_err(|e| Error::image(img.path(), e))?
            .flatten()
        {
            if e.file_name().to_string_lossy().starts_with("pages-") {
                n += e.metadata().map(|m| m.len()).unwrap_or(0);
            }
        }
        Ok(n)
    }
}

fn makedev(major: i32, minor: i32) -> u64 {
    libc::makedev(major as u32, minor as u32)
}

pub(crate) fn prot_of(perms: MMPermissions) -> u32 {
    let mut p = 0;
    if perms.contains(MMPermissions::READ) {
        p |= libc::PROT_READ as u32;
    }
    if perms.contains(MMPermissions::WRITE) {
        p |= libc::PROT_WRITE as u32;
    }
    if perms.contains(MMPermissions::EXECUTE) {
        p |= libc::PROT_EXEC as u32;
    }
    p
}

/// The madvise-like state of a mapping that a restore has to set again.
pub(crate) fn kept_flags(f: VmFlags) -> Vec<String> {
    // "mw" matters for a shared mapping only (a private one may always be
    // made writable): the file is opened for writing to map it again.
    let may_write = if f.contains(VmFlags::SH) {
        VmFlags::MW
    } else {
        VmFlags::NONE
    };
    [
        (may_write, "mw"),
        (VmFlags::SR, "sr"),
        (VmFlags::RR, "rr"),
        (VmFlags::DD, "dd"),
        (VmFlags::DC, "dc"),
        (VmFlags::WF, "wf"),
        (VmFlags::HG, "hg"),
        (VmFlags::NH, "nh"),
        (VmFlags::MG, "mg"),
        (VmFlags::LO, "lo"),
        (VmFlags::GD, "gd"),
    ]
    .iter()
    .filter(|(bit, _)| *bit != VmFlags::NONE && f.contains(*bit))
    .map(|(_, n)| n.to_string())
    .collect()
}

/// Writes pages read from a process into an image file, recording runs.
struct PageWriter {
    out: BufWriter<File>,
    offset: u64,
}

impl PageWriter {
    fn create(path: &Path) -> Result<PageWriter> {
        let f = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(path)
            .map_err(|e| Error::image(path, e))?;
        Ok(PageWriter {
            out: BufWriter::with_capacity(1 << 20, f),
            offset: 0,
        })
    }

    fn put(&mut self, data: &[u8], path: &Path) -> Result<u64> {
        let at = self.offset;
        self.out
            .write_all(data)
            .map_err(|e| Error::image(path, e))?;
        self.offset += data.len() as u64;
        Ok(at)
    }
}

/// Dumps the memory of `pid` (all its threads stopped).
pub fn dump(
    pid: Pid,
    img: &ImageDir,
    image_pid: i32,
    shmem: &mut ShmemTable,
    problems: &mut Vec<String>,
    inj: &mut Injector,
    writeback: bool,
) -> Result<MemoryDump> {
    let raw = pid.as_raw();
    // The scratch memory is mapped now, if it ever will be (the splice
    // below uses it), and is no part of the image.
    inj.scratch()?;
    let skip = inj.scratch_range();
    let maps = procfs::process::Process::new(raw)
        .and_then(|p| p.smaps())
        .map_err(Error::proc(raw, "memory maps"))?;
    let pagemap = PageMap::open(raw)?;
    let mut out = MemoryDump::default();
    // First where the data is, then one pass moving it into the pages file.
    let mut readable_runs = Vec::new();
    for m in maps.iter() {
        let (start, end) = m.address;
        if skip.is_some_and(|(s, _)| s == start) {
            continue;
        }
        let shared = m.perms.contains(MMPermissions::SHARED);
        let prot = prot_of(m.perms);
        let kind = match classify(pid, m, shared, shmem, img, problems)? {
            Some(k) => k,
            None => continue,
        };
        // Which pages hold data no file has: private anonymous memory, and
        // copied-on-write pages of private file mappings.
        let keep: Option<fn(u64) -> bool> = match (&kind, shared) {
            (VmaKind::Anon, false) => Some(|e| has_own_data(e, false)),
            (VmaKind::File { .. }, false) => Some(|e| has_own_data(e, true)),
            _ => None,
        };
        if let Some(keep) = keep {
            let entries = pagemap.entries(start, end)?;
            for (first, count) in runs(&entries, keep) {
                out.pages.push(PageRun {
                    start: start + first as u64 * PAGE_SIZE,
                    count: count as u64,
                    offset: out.bytes,
                });
                readable_runs.push(prot & libc::PROT_READ as u32 != 0);
                out.bytes += count as u64 * PAGE_SIZE;
            }
        }
        out.vmas.push(Vma {
            start,
            end,
            prot,
            shared,
            kind,
            flags: kept_flags(m.extension.vm_flags),
        });
    }
    copy_out(
        inj,
        &img.pages_file(image_pid),
        &out.pages,
        &readable_runs,
        out.bytes,
        writeback,
    )?;
    Ok(out)
}

/// Copies the page runs of the injector's process into a new file of
/// `total` bytes, laid out as the runs' offsets say (in order, one after
/// the other). Runs the process can read are spliced ([`PageSplicer`]);
/// the others (PROT_NONE, write-only), and all of them where splicing
/// fails, are read into a buffer and written.
fn copy_out(
    inj: &mut Injector,
    path: &Path,
    runs: &[PageRun],
    readable: &[bool],
    total: u64,
    writeback: bool,
) -> Result<()> {
    let pid = inj.pid();
    let f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| Error::image(path, e))?;
    if total == 0 {
        return Ok(());
    }
    // The blocks are taken now: a full disk is an error here, before the
    // process's memory is read.
    nix::fcntl::fallocate(
        &f,
        nix::fcntl::FallocateFlags::empty(),
        0,
        i64::try_from(total).unwrap_or(i64::MAX),
    )
    .map_err(|e| Error::image(path, std::io::Error::from(e)))?;
    let readable_of = |i: usize| readable.get(i).copied().unwrap_or(true);
    let those = |readable: bool| -> Vec<PageRun> {
        (runs.iter().enumerate())
            .filter(|(i, _)| readable_of(*i) == readable)
            .map(|(_, r)| *r)
            .collect()
    };
    let spliceable = those(true);
    let want: u64 = spliceable.iter().map(|r| r.count * PAGE_SIZE).sum();
    let laid_out = match PageSplicer::open(inj).and_then(|mut s| s.copy(&spliceable, &f, writeback))
    {
        Ok(n) if n == want => {
            let rest = those(false);
            n + write_buffered(pid, &f, path, &rest, &vec![false; rest.len()])?
        }
        other => {
            // Everything again, through the buffer.
            tracing::debug!(pid = pid.as_raw(), result = ?other.map_err(|e| e.to_string()),
                "pages not spliced, copied through a buffer");
            let all: Vec<bool> = (0..runs.len()).map(readable_of).collect();
            write_buffered(pid, &f, path, runs, &all)?
        }
    };
    if laid_out != total {
        return Err(Error::image(
            path,
            std::io::Error::other(format!("{laid_out} of {total} bytes laid out")),
        ));
    }
    Ok(())
}

/// Reads page runs (`readable[i]`: whether the process can read run `i`)
/// into a buffer, piece by piece, and writes each piece at its runs'
/// offset; returns the bytes written. The pieces are cut as the splice's
/// are ([`RunCursor`]), as large as one write should be
/// ([`crate::common::WRITE_PIECE`]): small enough for the buffer to stay in
/// the CPU's cache between the two copies.
fn write_buffered(
    pid: Pid,
    f: &File,
    path: &Path,
    runs: &[PageRun],
    readable: &[bool],
) -> Result<u64> {
    let mut cursor = RunCursor::default();
    let mut buf = Vec::new();
    let mut written = 0;
    loop {
        let (iov, bytes) = cursor.chunk(runs, crate::common::WRITE_PIECE as u64, usize::MAX);
        if iov.is_empty() {
            return Ok(written);
        }
        // One range per run from the cursor's on (no run is empty), in the
        // file one after the other.
        let mut at = cursor.file_at(runs);
        let mut piece = Vec::with_capacity(iov.len());
        for &(start, len) in &iov {
            piece.push(PageRun {
                start,
                count: len / PAGE_SIZE,
                offset: at,
            });
            at += len;
        }
        let ok = &readable[cursor.run..cursor.run + iov.len()];
        written += put_piece(pid, f, path, &piece, ok, &mut buf)?;
        cursor.advance(runs, bytes);
    }
}

/// Copies runs that follow one another in the file through `buf`.
fn put_piece(
    pid: Pid,
    f: &File,
    path: &Path,
    piece: &[PageRun],
    readable: &[bool],
    buf: &mut Vec<u8>,
) -> Result<u64> {
    let base = piece[0].offset;
    let len: u64 = piece.iter().map(|r| r.count * PAGE_SIZE).sum();
    buf.resize(len as usize, 0);
    let out = &mut buf[..len as usize];
    crate::procmem::read_runs(pid, piece, readable, out, base)?;
    f.write_all_at(out, base)
        .map_err(|e| Error::image(path, e))?;
    Ok(len)
}

/// A place in a list of page runs laid out in a pages file: run index and
/// bytes into it. The splice and the buffered copy cut the runs into the
/// pieces they move with it.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub(crate) struct RunCursor {
    run: usize,
    within: u64,
}

impl RunCursor {
    /// The ranges (address, length) of the next chunk: at most `limit`
    /// bytes in at most `max_iov` ranges, from the cursor on, that follow
    /// one another in the file (they are written as one).
    pub(crate) fn chunk(
        &self,
        runs: &[PageRun],
        limit: u64,
        max_iov: usize,
    ) -> (Vec<(u64, u64)>, u64) {
        let mut iov = Vec::new();
        let mut bytes = 0;
        let mut c = *self;
        let first = (c.run < runs.len()).then(|| c.file_at(runs));
        while c.run < runs.len() && bytes < limit && iov.len() < max_iov {
            if first.is_some_and(|f| c.file_at(runs) != f + bytes) {
                break;
            }
            let r = &runs[c.run];
            let len = (r.count * PAGE_SIZE - c.within).min(limit - bytes);
            if len > 0 {
                iov.push((r.start + c.within, len));
                bytes += len;
            }
            c.run += 1;
            c.within = 0;
        }
        (iov, bytes)
    }

    /// Where in the file the cursor is (it is on a run).
    pub(crate) fn file_at(&self, runs: &[PageRun]) -> u64 {
        runs[self.run].offset + self.within
    }

    pub(crate) fn advance(&mut self, runs: &[PageRun], mut by: u64) {
        while by > 0 && self.run < runs.len() {
            let left = runs[self.run].count * PAGE_SIZE - self.within;
            if by < left {
                self.within += by;
                return;
            }
            by -= left;
            self.run += 1;
            self.within = 0;
        }
    }
}

/// What a mapping is; `None` for mappings nothing needs to be done about.
pub(crate) fn classify(
    pid: Pid,
    m: &MemoryMap,
    shared: bool,
    shmem: &mut ShmemTable,
    img: &ImageDir,
    problems: &mut Vec<String>,
) -> Result<Option<VmaKind>> {
    let (start, end) = m.address;
    let dev = makedev(m.dev.0, m.dev.1);
    let problem = |what: String| format!("process {pid}: mapping {start:#x}-{end:#x}: {what}");
    Ok(Some(match &m.pathname {
        MMapPath::Vsyscall => return Ok(None),
        MMapPath::Vdso => VmaKind::Vdso,
        MMapPath::Vvar => VmaKind::Vvar,
        MMapPath::Other(s) if s.trim_matches(|c| c == '[' || c == ']') == "vvar_vclock" => {
            VmaKind::VvarVclock
        }
        MMapPath::Heap | MMapPath::Stack | MMapPath::TStack(_) | MMapPath::Anonymous if !shared => {
            VmaKind::Anon
        }
        MMapPath::Vsys(key) => {
            let id = shmem.object(
                pid,
                m,
                dev,
                img,
                ShmemKind::SysV {
                    key: *key,
                    shmid: m.inode as i32,
                    mode: 0,
                    creator: None,
                    ns: None,
                },
            )?;
            VmaKind::Shmem {
                id,
                offset: m.offset,
            }
        }
        MMapPath::Path(p) => {
            let s = p.to_string_lossy();
            if s == "/dev/zero (deleted)" || (shared && s.starts_with("/SYSV")) {
                let id = shmem.object(pid, m, dev, img, ShmemKind::Anon)?;
                VmaKind::Shmem {
                    id,
                    offset: m.offset,
                }
            } else if let Some(name) = s.strip_prefix("/memfd:") {
                let name = name.trim_end_matches(" (deleted)").to_string();
                let id = shmem.object(pid, m, dev, img, ShmemKind::Memfd { name, seals: 0 })?;
                VmaKind::Shmem {
                    id,
                    offset: m.offset,
                }
            } else if s.starts_with("/[aio]") {
                match aio_ring(pid, start, end)? {
                    Ok(ring) => ring,
                    Err(what) => {
                        problems.push(problem(what));
                        return Ok(None);
                    }
                }
            } else if let Some(path) = s.strip_prefix('/').and(s.strip_suffix(" (deleted)")) {
                match save_mapped(pid, m, dev, img, shmem)? {
                    Some(owner) => VmaKind::File {
                        path: path.to_string(),
                        offset: m.offset,
                        ino: m.inode,
                        dev,
                        deleted: Some(owner),
                    },
                    None => {
                        problems.push(problem(format!(
                            "maps deleted file {s}, which is not a regular file"
                        )));
                        return Ok(None);
                    }
                }
            } else if s == "/dev/zero" && !shared {
                VmaKind::Anon
            } else if s.starts_with("/dev/") {
                problems.push(problem(format!("maps device {s}")));
                return Ok(None);
            } else {
                VmaKind::File {
                    path: s.into_owned(),
                    offset: m.offset,
                    ino: m.inode,
                    dev,
                    deleted: None,
                }
            }
        }
        other => {
            problems.push(problem(format!("unsupported mapping kind {other:?}")));
            return Ok(None);
        }
    }))
}

/// The completion ring of an AIO context mapped at `start`..`end`, or why
/// it is not one this engine can make again. The kernel writes the ring;
/// a header it did not write (or a process that rewrote it) is refused.
fn aio_ring(pid: Pid, start: u64, end: u64) -> Result<std::result::Result<VmaKind, String>> {
    use crate::image::aio_ring::*;
    let mut header = [0u8; HEADER];
    crate::procmem::read(pid, start, &mut header)?;
    let word = |at: usize| u32::from_ne_bytes(header[at..at + 4].try_into().expect("4 bytes"));
    let (id, nr, head, tail) = (word(ID), word(NR), word(HEAD), word(TAIL));
    let count = pending(nr, head, tail) as usize;
    let kernels = word(MAGIC_AT) == MAGIC
        && word(COMPAT_AT) == 1
        && word(INCOMPAT_AT) == 0
        && word(HEADER_LENGTH_AT) as usize == HEADER;
    if !kernels {
        return Ok(Err(
            "an AIO ring whose header is not the kernel's (written over by the program?)".into(),
        ));
    }
    if let Err(what) = check(end - start, id, nr, head, tail, count * EVENT) {
        return Ok(Err(format!("{what}: not a ring the kernel makes")));
    }
    let mut events = vec![0u8; count * EVENT];
    // In ring order: from head to the end, then from the start.
    let first = count.min((nr - head) as usize);
    let at = |slot: u32| start + (HEADER + slot as usize * EVENT) as u64;
    crate::procmem::read(pid, at(head), &mut events[..first * EVENT])?;
    crate::procmem::read(pid, at(0), &mut events[first * EVENT..])?;
    Ok(Ok(VmaKind::AioRing {
        id,
        nr,
        head,
        tail,
        events: crate::image::Hex(events),
    }))
}

/// Saves the content of the deleted file mapping `m` maps (once per file
/// and image); returns its owner, or `None` if it is no regular file.
fn save_mapped(
    pid: Pid,
    m: &MemoryMap,
    dev: u64,
    img: &ImageDir,
    shmem: &mut ShmemTable,
) -> Result<Option<Owner>> {
    let (start, end) = m.address;
    let link = format!("/proc/{pid}/map_files/{start:x}-{end:x}");
    let mut f = File::open(&link).map_err(Error::io(format!("open {link}")))?;
    let meta = f.metadata().map_err(Error::io(format!("stat {link}")))?;
    if !meta.is_file() {
        return Ok(None);
    }
    let owner = Owner {
        uid: meta.uid(),
        gid: meta.gid(),
        mode: meta.mode() & 0o7777,
    };
    if shmem.mapped_saved.insert((dev, m.inode)) {
        let out = img.mapped_data(dev, m.inode);
        let mut w = File::create(&out).map_err(|e| Error::image(&out, e))?;
        std::io::copy(&mut f, &mut w).map_err(|e| Error::image(&out, e))?;
    }
    Ok(Some(owner))
}

impl ShmemTable {
    /// Gives the SysV segments IPC namespace `ns` lists (none: the
    /// root's) that namespace, and their modes and creators as it lists
    /// them (the checkpointing process's own listing is another
    /// namespace's).
    pub fn set_segments(&mut self, listed: &crate::dump::ipc::Namespace, ns: Option<i32>) {
        for obj in &mut self.objects {
            if let ShmemKind::SysV {
                shmid,
                mode,
                creator,
                ns: in_ns,
                ..
            } = &mut obj.kind
                && let Some(id) = match self.sysv_handles.get(&obj.id) {
                    Some(handle) => listed.handles.get(handle),
                    // One whose file gives no handle (huge pages): by its
                    // id, in the root's namespace.
                    None => ns.is_none().then_some(&*shmid),
                }
                && let Some(seg) = listed.segments.get(id)
            {
                *shmid = *id;
                *mode = seg.mode;
                *creator = Some(seg.creator);
                *in_ns = ns;
            }
        }
    }

    /// Numbers the SysV segments' creators as the tree does (they were
    /// read as our pid namespace numbers them): a creator outside the tree
    /// is none.
    pub fn resolve_creators(&mut self, ns_of: &std::collections::BTreeMap<Pid, i32>) {
        for obj in &mut self.objects {
            if let ShmemKind::SysV { creator, .. } = &mut obj.kind {
                *creator = creator.and_then(|host| ns_of.get(&Pid::from_raw(host)).copied());
            }
        }
    }

    pub fn with_limits(limits: &[ShmemLimit]) -> ShmemTable {
        ShmemTable {
            keep: limits.iter().map(|l| ((l.dev, l.ino), l.keep)).collect(),
            ..ShmemTable::default()
        }
    }

    /// The id of the shared memory object behind mapping `m`, saving its
    /// contents the first time it is met.
    fn object(
        &mut self,
        pid: Pid,
        m: &MemoryMap,
        dev: u64,
        img: &ImageDir,
        kind: ShmemKind,
    ) -> Result<usize> {
        let (start, end) = m.address;
        let path = format!("/proc/{pid}/map_files/{start:x}-{end:x}");
        let handle = match kind {
            ShmemKind::SysV { .. } => sysv_handle(&path),
            _ => None,
        };
        if let Some(id) = self.known(handle.as_deref(), dev, m.inode) {
            return Ok(id);
        }
        // The object itself, whole (or as far as its limit says), through
        // the kernel's handle on the mapping (it also reaches pages this
        // process never touched).
        let f = File::open(&path).map_err(|e| Error::Proc {
            pid: pid.as_raw(),
            what: "shared memory",
            detail: format!("{path}: {e}"),
        })?;
        let id = self.objects.len();
        let keep = self.keep.get(&(dev, m.inode)).copied();
        let (size, pages) = save_object(&f, &img.shmem_file(id), keep)?;
        let kind = match kind {
            ShmemKind::Memfd { name, .. } => ShmemKind::Memfd {
                name,
                seals: memfd_seals(&f),
            },
            ShmemKind::SysV { key, shmid, .. } => {
                let listed = crate::dump::ipc::own_segment(shmid);
                ShmemKind::SysV {
                    key,
                    shmid,
                    mode: listed.map_or(0o600, |s| s.mode),
                    creator: listed.map(|s| s.creator),
                    ns: None,
                }
            }
            k => k,
        };
        self.objects.push(SharedMemory {
            id,
            kind,
            size,
            dev,
            ino: m.inode,
            pages,
        });
        self.remember(id, handle, dev, m.inode);
        Ok(id)
    }

    /// The object met already with `handle` (SysV segments) or device and
    /// inode (the others).
    fn known(&self, handle: Option<&[u8]>, dev: u64, ino: u64) -> Option<usize> {
        match handle {
            Some(h) => self.sysv.get(h).copied(),
            None => self.index.get(&(dev, ino)).copied(),
        }
    }

    fn remember(&mut self, id: usize, handle: Option<Vec<u8>>, dev: u64, ino: u64) {
        match handle {
            Some(h) => {
                self.sysv.insert(h.clone(), id);
                self.sysv_handles.insert(id, h);
            }
            None => {
                self.index.insert((dev, ino), id);
            }
        }
    }

    /// The id of a memfd open as a file (saving it if it was not mapped).
    pub fn memfd(&mut self, f: &File, name: String, img: &ImageDir) -> Result<usize> {
        let seals = memfd_seals(f);
        self.open_object(f, ShmemKind::Memfd { name, seals }, img, None)
    }

    /// Saves a SysV segment no process of the tree attaches (read from
    /// the file its namespace's reader opened), to be made again with
    /// namespace `ns` (none: the root's).
    pub fn unattached_segment(
        &mut self,
        seg: &crate::dump::ipc::Unattached,
        ns: Option<i32>,
        img: &ImageDir,
    ) -> Result<usize> {
        let handle = sysv_handle(&format!("/proc/self/fd/{}", seg.file.as_raw_fd()));
        let kind = ShmemKind::SysV {
            key: seg.key,
            shmid: seg.id,
            mode: seg.segment.mode,
            creator: Some(seg.segment.creator),
            ns,
        };
        self.open_object(&seg.file, kind, img, handle)
    }

    /// The id of the shared memory object `f` is open on (a SysV segment
    /// known by `handle`), saving it the first time it is met.
    fn open_object(
        &mut self,
        f: &File,
        kind: ShmemKind,
        img: &ImageDir,
        handle: Option<Vec<u8>>,
    ) -> Result<usize> {
        let meta = f.metadata().map_err(Error::io("stat shared memory"))?;
        if let Some(id) = self.known(handle.as_deref(), meta.dev(), meta.ino()) {
            return Ok(id);
        }
        let id = self.objects.len();
        let keep = self.keep.get(&(meta.dev(), meta.ino())).copied();
        let (size, pages) = save_object(f, &img.shmem_file(id), keep)?;
        self.objects.push(SharedMemory {
            id,
            kind,
            size,
            dev: meta.dev(),
            ino: meta.ino(),
            pages,
        });
        self.remember(id, handle, meta.dev(), meta.ino());
        Ok(id)
    }
}

/// A SysV segment's file handle, through a path to its file: it tells
/// apart segments of one id (their inode number) in two IPC namespaces.
/// None where the file system gives none (huge pages): such a segment is
/// known by its id, as one of the root's namespace.
pub(crate) fn sysv_handle(path: &str) -> Option<Vec<u8>> {
    sys::name_to_handle(Path::new(path))
        .map(|(_, _, handle)| handle)
        .ok()
}

fn memfd_seals(f: &File) -> u32 {
    nix::fcntl::fcntl(f, nix::fcntl::FcntlArg::F_GET_SEALS)
        .map(|s| s as u32)
        .unwrap_or(0)
}

/// Copies the data regions of a shared memory file (holes stay holes), of
/// the whole file or of its first `keep` bytes in whole pages; returns the
/// file's size (whole, whatever was saved) and the runs saved.
fn save_object(f: &File, out: &Path, keep: Option<u64>) -> Result<(u64, Vec<PageRun>)> {
    use nix::unistd::{Whence, lseek};
    let size = f.metadata().map_err(Error::io("stat shared memory"))?.len();
    let end = keep.map_or(size, |k| {
        k.checked_next_multiple_of(PAGE_SIZE)
            .unwrap_or(u64::MAX)
            .min(size)
    });
    let mut w = PageWriter::create(out)?;
    let mut runs = Vec::new();
    let mut pos: i64 = 0;
    let mut regions: BTreeMap<u64, u64> = BTreeMap::new();
    while (pos as u64) < end {
        let data = match lseek(f, pos, Whence::SeekData) {
            Ok(d) if (d as u64) < end => d,
            Ok(_) | Err(nix::errno::Errno::ENXIO) => break,
            Err(e) => return Err(Error::io("seek shared memory")(e.into())),
        };
        let hole = lseek(f, data, Whence::SeekHole).unwrap_or(size as i64);
        regions.insert(data as u64, (hole as u64).min(end));
        pos = hole;
    }
    for (s, e) in regions {
        let s = s / PAGE_SIZE * PAGE_SIZE;
        let e = e.div_ceil(PAGE_SIZE) * PAGE_SIZE;
        let mut buf = vec![0u8; (e - s) as usize];
        let n = f
            .read_at(&mut buf, s)
            .map_err(Error::io("read shared memory"))?;
        // The buffer started zeroed: a short last page keeps zeros.
        buf.truncate(n.div_ceil(PAGE_SIZE as usize) * PAGE_SIZE as usize);
        if buf.is_empty() {
            continue;
        }
        let at = w.put(&buf, out)?;
        runs.push(PageRun {
            start: s,
            count: buf.len() as u64 / PAGE_SIZE,
            offset: at,
        });
    }
    w.out.flush().map_err(|e| Error::image(out, e))?;
    Ok((size, runs))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(start: u64, count: u64, offset: u64) -> PageRun {
        PageRun {
            start,
            count,
            offset,
        }
    }

    #[test]
    fn chunks_cut_runs_at_the_pipe_size_and_resume_where_the_last_stopped() {
        let p = PAGE_SIZE;
        let runs = [run(0x10000, 3, 0), run(0x40000, 2, 3 * p)];
        let mut c = RunCursor::default();
        let (iov, n) = c.chunk(&runs, 2 * p, 16);
        assert_eq!((iov, n), (vec![(0x10000, 2 * p)], 2 * p));
        c.advance(&runs, n);
        assert_eq!(
            c,
            RunCursor {
                run: 0,
                within: 2 * p
            }
        );
        let (iov, n) = c.chunk(&runs, 4 * p, 16);
        assert_eq!(iov, vec![(0x10000 + 2 * p, p), (0x40000, 2 * p)]);
        // A short vmsplice: only part of the chunk moved.
        c.advance(&runs, n - p);
        assert_eq!(c, RunCursor { run: 1, within: p });
        let (iov, n) = c.chunk(&runs, 4 * p, 16);
        assert_eq!((iov, n), (vec![(0x40000 + p, p)], p));
        c.advance(&runs, n);
        assert!(c.chunk(&runs, 4 * p, 16).0.is_empty());
    }

    #[test]
    fn chunks_hold_at_most_the_ranges_one_call_takes() {
        let runs: Vec<PageRun> = (0..5)
            .map(|i| run(0x100000 * (i + 1), 1, i * PAGE_SIZE))
            .collect();
        let (iov, n) = RunCursor::default().chunk(&runs, 1 << 20, 2);
        assert_eq!(iov.len(), 2);
        assert_eq!(n, 2 * PAGE_SIZE);
    }

    #[test]
    fn a_chunk_ends_where_the_runs_stop_following_one_another_in_the_file() {
        let p = PAGE_SIZE;
        // A run left out (unreadable) between the two.
        let runs = [run(0x10000, 2, 0), run(0x40000, 1, 5 * p)];
        let mut c = RunCursor::default();
        let (iov, n) = c.chunk(&runs, 1 << 20, 16);
        assert_eq!((iov, n), (vec![(0x10000, 2 * p)], 2 * p));
        c.advance(&runs, n);
        assert_eq!(c.chunk(&runs, 1 << 20, 16).0, vec![(0x40000, p)]);
    }

    /// A memfd of `pages` pages, page i filled with i + 1, in a scratch
    /// image directory.
    fn memfd(pages: u64, tag: &str) -> (File, ImageDir) {
        let fd = nix::sys::memfd::memfd_create(c"rrc-test", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)
            .unwrap();
        let f = File::from(fd);
        for i in 0..pages {
            f.write_all_at(&vec![i as u8 + 1; PAGE_SIZE as usize], i * PAGE_SIZE)
                .unwrap();
        }
        let dir = std::env::temp_dir().join(format!("rrc-ckpt-unit-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        (f, ImageDir::create(&dir).unwrap())
    }

    #[test]
    fn a_limited_object_keeps_its_size_and_only_its_first_pages() {
        let (f, img) = memfd(3, "limit");
        let meta = f.metadata().unwrap();
        let mut table = ShmemTable::with_limits(&[ShmemLimit {
            dev: meta.dev(),
            ino: meta.ino(),
            keep: 100,
        }]);
        let id = table.memfd(&f, "rings".into(), &img).unwrap();
        let obj = &table.objects[id];
        assert_eq!(obj.size, 3 * PAGE_SIZE);
        assert_eq!(
            obj.pages,
            vec![PageRun {
                start: 0,
                count: 1,
                offset: 0
            }]
        );
        let saved = std::fs::read(img.shmem_file(id)).unwrap();
        assert_eq!(saved, vec![1u8; PAGE_SIZE as usize]);
        // Met again (mapped by another process, say): the same object.
        assert_eq!(table.memfd(&f, "rings".into(), &img).unwrap(), id);
        let _ = std::fs::remove_dir_all(img.path());
    }

    #[test]
    fn limits_round_up_to_pages_and_leave_other_objects_whole() {
        let (f, img) = memfd(3, "other");
        let meta = f.metadata().unwrap();
        // Another object's limit: this one is saved whole.
        let mut table = ShmemTable::with_limits(&[ShmemLimit {
            dev: meta.dev(),
            ino: meta.ino() + 1,
            keep: 0,
        }]);
        let id = table.memfd(&f, "whole".into(), &img).unwrap();
        assert_eq!(table.objects[id].pages[0].count, 3);
        let out = img.file("part.img");
        let (size, runs) = save_object(&f, &out, Some(PAGE_SIZE + 1)).unwrap();
        assert_eq!(size, 3 * PAGE_SIZE);
        assert_eq!(runs.iter().map(|r| r.count).sum::<u64>(), 2);
        let (size, runs) = save_object(&f, &out, Some(0)).unwrap();
        assert_eq!((size, runs.len()), (3 * PAGE_SIZE, 0));
        // A limit beyond the end is no limit.
        for keep in [1 << 30, u64::MAX] {
            let (_, runs) = save_object(&f, &out, Some(keep)).unwrap();
            assert_eq!(runs.iter().map(|r| r.count).sum::<u64>(), 3);
        }
        let _ = std::fs::remove_dir_all(img.path());
    }
}
