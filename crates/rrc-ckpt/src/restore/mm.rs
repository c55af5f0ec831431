//! Replacing a skeleton's address space with the recorded one.

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::{FileExt, MetadataExt};

use nix::unistd::Pid;

use crate::image::{ImageDir, PageRun, ProcessImage, SharedMemory, ShmemKind, Vma, VmaKind};
use crate::procfs::PAGE_SIZE;
use crate::remote::Batch;
use crate::restore::files::{GhostDir, Ghosts};
use crate::restore::lazy::LazyPages;
use crate::restore::sockets::Transport;
use crate::restore::tracee::{SCRATCH_SIZE, Tracee};
use crate::restore::{aio, cow};
use crate::{Error, Result, nr};

/// The highest user address of a 47-bit address space.
const TASK_SIZE: u64 = 0x7fff_ffff_f000;
const ARCH_MAP_VDSO_64: u64 = 0x2003;
const PR_SET_MM: u64 = 35;
const PR_SET_MM_MAP: u64 = 14;

/// State shared across the processes of one restore.
pub struct MemCtx<'a> {
    pub img: &'a ImageDir,
    pub shmem: &'a [SharedMemory],
    /// Shared memory objects restored so far, held open by the engine for
    /// the processes that map or open them after the first.
    pub handles: HashMap<usize, File>,
    /// How the engine puts a file into a process's fd table. A path would
    /// not do: a process restored into a container sees its own /proc, in
    /// which the engine does not exist.
    pub transport: Transport,
    /// Where private anonymous memory is filled while the program runs
    /// (`None`: before it runs).
    pub lazy: Option<LazyPages>,
    /// Which process makes each SysV segment, by object id
    /// ([`sysv_makers`]).
    pub sysv_makers: HashMap<usize, i32>,
    /// The IPC namespace each SysV segment made so far is in, by object
    /// id: a process attaches one of another namespace (attached before it
    /// made its own) by going there for the while.
    pub sysv_ns: HashMap<usize, File>,
    /// The devices of the tmpfs file systems the restore makes again
    /// (`mounts::remade_devices`): their files are new ones.
    pub remade_devices: std::collections::HashSet<u64>,
}

impl MemCtx<'_> {
    /// Puts restored object `id` into `t`'s fd table; its fd there, or
    /// `None` when the object is not restored yet.
    pub fn reopen(&self, t: &mut Tracee, id: usize) -> Result<Option<u64>> {
        match self.handles.get(&id) {
            Some(f) => Ok(Some(self.transport.pass(t, f.as_fd())?)),
            None => Ok(None),
        }
    }

    /// Keeps the object behind `path` (in a process being restored) open.
    pub fn keep(&mut self, id: usize, path: &str, pid: i32) -> Result<()> {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| rerr(pid, "shared memory", format!("{path}: {e}")))?;
        self.handles.insert(id, f);
        Ok(())
    }
}

fn rerr(pid: i32, stage: &'static str, detail: String) -> Error {
    Error::Restore { pid, stage, detail }
}

/// The start address and layout of this kernel's vDSO group ([vvar],
/// [vvar_vclock], [vdso]) as offsets from the group start, from our own maps.
fn own_vdso_group() -> Result<Vec<(String, u64, u64)>> {
    let maps = procfs::process::Process::myself()
        .and_then(|p| p.maps())
        .map_err(Error::proc(std::process::id() as i32, "memory maps"))?;
    let mut group = Vec::new();
    for m in maps.iter() {
        let name = match &m.pathname {
            procfs::process::MMapPath::Vdso => "vdso",
            procfs::process::MMapPath::Vvar => "vvar",
            procfs::process::MMapPath::Other(s) if s.contains("vvar_vclock") => "vvar_vclock",
            _ => continue,
        };
        group.push((name.to_string(), m.address.0, m.address.1));
    }
    let base = group.iter().map(|g| g.1).min().unwrap_or(0);
    Ok(group
        .into_iter()
        .map(|(n, s, e)| (n, s - base, e - s))
        .collect())
}

fn image_vdso_group(vmas: &[Vma]) -> Vec<(String, u64, u64)> {
    let parts: Vec<(&str, u64, u64)> = vmas
        .iter()
        .filter_map(|v| {
            let n = match v.kind {
                VmaKind::Vdso => "vdso",
                VmaKind::Vvar => "vvar",
                VmaKind::VvarVclock => "vvar_vclock",
                _ => return None,
            };
            Some((n, v.start, v.end))
        })
        .collect();
    let base = parts.iter().map(|p| p.1).min().unwrap_or(0);
    parts
        .into_iter()
        .map(|(n, s, e)| (n.to_string(), s - base, e - s))
        .collect()
}

/// Whether a restored vDSO can be placed where the image had it: the same
/// kernel layout of vvar/vdso pages.
pub fn check_vdso(p: &ProcessImage) -> Result<()> {
    let want = image_vdso_group(&p.vmas);
    if want.is_empty() {
        return Ok(());
    }
    let have = own_vdso_group()?;
    if want != have {
        return Err(Error::Incompatible(format!(
            "the vDSO layout differs from the checkpointed kernel's ({have:?} here, {want:?} in the image)"
        )));
    }
    Ok(())
}

fn madvise_of(flag: &str) -> Option<i32> {
    Some(match flag {
        "dd" => libc::MADV_DONTDUMP,
        "dc" => libc::MADV_DONTFORK,
        "wf" => libc::MADV_WIPEONFORK,
        "hg" => libc::MADV_HUGEPAGE,
        "nh" => libc::MADV_NOHUGEPAGE,
        "mg" => libc::MADV_MERGEABLE,
        "sr" => libc::MADV_SEQUENTIAL,
        "rr" => libc::MADV_RANDOM,
        _ => return None,
    })
}

/// Replaces the address space of `t` (a skeleton) with `p`'s.
/// `parent` is the process whose memory `t` holds, forked from it once it
/// was in place (`None` for the root): areas it keeps from it stay shared
/// copy-on-write.
/// `lazy` lets its pages be copied while it runs, if the restore does so.
pub fn replace(
    t: &mut Tracee,
    p: &ProcessImage,
    parent: Option<&ProcessImage>,
    lazy: bool,
    ctx: &mut MemCtx,
    ghosts: &mut Ghosts,
) -> Result<()> {
    let pid = p.pid;
    let scratch = t.scratch;
    // The skeleton's glibc registered its thread area for restartable
    // sequences; with that memory gone the kernel would fault the process
    // on its next return to user mode.
    if let Some(rs) = crate::sys::get_rseq(t.pid).map_err(|e| rerr(pid, "rseq", e.to_string()))? {
        const RSEQ_FLAG_UNREGISTER: u64 = 1;
        t.call(
            "unregister the skeleton's rseq",
            nr::SYS_rseq,
            &[
                rs.ptr,
                u64::from(rs.size),
                RSEQ_FLAG_UNREGISTER,
                u64::from(rs.signature),
            ],
        )?;
    }
    // Everything of the skeleton but the scratch region and the areas kept
    // from the parent goes.
    let kept = cow::inheritable(&p.vmas, parent.map(|q| q.vmas.as_slice()));
    let mut unmap = Batch::new();
    let gaps = cow::unmap_except(&kept, (scratch, scratch + SCRATCH_SIZE), TASK_SIZE);
    for &(s, e) in &gaps {
        unmap.push(libc::SYS_munmap, &[s, e - s]);
    }
    for (r, (s, e)) in t.batch(&unmap)?.into_iter().zip(&gaps) {
        if r < 0 {
            return Err(rerr(
                pid,
                "munmap",
                format!(
                    "{s:#x}-{e:#x}: {}",
                    std::io::Error::from_raw_os_error(-r as i32)
                ),
            ));
        }
    }

    let vdso = image_vdso_group(&p.vmas);
    if !vdso.is_empty() {
        let start = p
            .vmas
            .iter()
            .filter(|v| matches!(v.kind, VmaKind::Vdso | VmaKind::Vvar | VmaKind::VvarVclock))
            .map(|v| v.start)
            .min()
            .expect("non-empty group");
        t.call(
            "map the vDSO",
            nr::SYS_arch_prctl,
            &[ARCH_MAP_VDSO_64, start],
        )?;
    }

    let mut open_files: HashMap<String, u64> = HashMap::new();
    let has_pages = |v: &Vma| -> bool {
        p.pages
            .iter()
            .any(|r| r.start < v.end && r.start + r.count * PAGE_SIZE > v.start)
    };
    let mut fix_prot = Vec::new();
    let mut batch = Batch::new();
    // Which call of the batch maps (or, for a kept area, protects) which
    // area, and what it returns.
    let mut maps: Vec<(usize, &Vma, i64)> = Vec::new();
    for v in &p.vmas {
        let len = v.end - v.start;
        // Pages get written through a writable mapping first.
        let needs_write = !v.shared && has_pages(v);
        let map_prot = if needs_write {
            v.prot | (libc::PROT_READ | libc::PROT_WRITE) as u32
        } else {
            v.prot
        };
        if map_prot != v.prot {
            fix_prot.push(v);
        }
        let fixed = (libc::MAP_FIXED
            | if v.shared {
                libc::MAP_SHARED
            } else {
                libc::MAP_PRIVATE
            }) as u64;
        match &v.kind {
            VmaKind::Vdso | VmaKind::Vvar | VmaKind::VvarVclock | VmaKind::Vsyscall => continue,
            // Made by the kernel, once the rest is in place.
            VmaKind::AioRing { .. } => continue,
            VmaKind::Anon if kept.binary_search(&(v.start, v.end)).is_ok() => {
                if map_prot != v.prot {
                    maps.push((
                        batch.push(nr::SYS_mprotect, &[v.start, len, u64::from(map_prot)]),
                        v,
                        0,
                    ));
                }
            }
            VmaKind::Anon => {
                let mut flags = fixed | libc::MAP_ANONYMOUS as u64;
                if v.flags.iter().any(|f| f == "gd") {
                    flags |= libc::MAP_GROWSDOWN as u64;
                }
                maps.push((
                    batch.push(
                        nr::SYS_mmap,
                        &[v.start, len, u64::from(map_prot), flags, u64::MAX, 0],
                    ),
                    v,
                    v.start as i64,
                ));
            }
            VmaKind::File {
                path,
                offset,
                ino,
                dev,
                deleted,
            } => {
                let ghost;
                let path = match deleted {
                    Some(owner) => {
                        let data = ctx.img.mapped_data(*dev, *ino);
                        ghost = GhostDir::made(ghosts, (*dev, *ino), &data, *owner)
                            .map_err(|e| {
                                rerr(
                                    pid,
                                    "recreate a deleted mapped file",
                                    format!("{path}: {e}"),
                                )
                            })?
                            .to_string_lossy()
                            .into_owned();
                        &ghost
                    }
                    None => path,
                };
                // A shared mapping that may be made writable (mprotect)
                // needs the file open for writing, as it was.
                let writable_shared = v.shared
                    && (v.prot & libc::PROT_WRITE as u32 != 0 || v.flags.iter().any(|f| f == "mw"));
                let key = format!("{}{path}", if writable_shared { "w:" } else { "r:" });
                let fd = match open_files.get(&key) {
                    Some(fd) => *fd,
                    None => {
                        // Opened by the process, where its own path leads
                        // (a container's root is not the host's), then
                        // checked through its fd.
                        let a = t.arg_str(path)?;
                        let mode = if writable_shared {
                            libc::O_RDWR
                        } else {
                            libc::O_RDONLY
                        };
                        let fd = t.call(
                            "open a mapped file",
                            nr::SYS_openat,
                            &[libc::AT_FDCWD as u64, a, (mode | libc::O_CLOEXEC) as u64],
                        )?;
                        let meta = std::fs::metadata(format!("/proc/{}/fd/{fd}", t.pid))
                            .map_err(|e| rerr(pid, "mapped file", format!("{path}: {e}")))?;
                        if deleted.is_none()
                            && !ctx.remade_devices.contains(dev)
                            && (meta.ino() != *ino || meta.dev() != *dev)
                        {
                            t.call("close", nr::SYS_close, &[fd])?;
                            return Err(rerr(
                                pid,
                                "mapped file",
                                format!(
                                    "{path} is not the file that was mapped (it was replaced since the checkpoint)"
                                ),
                            ));
                        }
                        open_files.insert(key, fd);
                        fd
                    }
                };
                maps.push((
                    batch.push(
                        nr::SYS_mmap,
                        &[v.start, len, u64::from(map_prot), fixed, fd, *offset],
                    ),
                    v,
                    v.start as i64,
                ));
            }
            VmaKind::Shmem { id, offset } => {
                map_shmem(t, v, *id, *offset, map_prot, ctx)?;
            }
        }
        // Best effort (results not looked at): THP or KSM may be off on
        // this kernel.
        for f in &v.flags {
            if let Some(advice) = madvise_of(f) {
                batch.push(nr::SYS_madvise, &[v.start, len, advice as u64]);
            } else if f == "lo" {
                batch.push(libc::SYS_mlock, &[v.start, len]);
            }
        }
    }
    // Every mapping in one round trip: a process may have tens of
    // thousands.
    for fd in open_files.into_values() {
        batch.push(nr::SYS_close, &[fd]);
    }
    let results = t.batch(&batch)?;
    for (i, v, expected) in maps {
        if results.get(i) != Some(&expected) {
            let r = results.get(i).copied().unwrap_or(0);
            return Err(rerr(
                pid,
                "mmap",
                format!(
                    "{:#x}-{:#x} ({:?}): {}",
                    v.start,
                    v.end,
                    v.kind,
                    std::io::Error::from_raw_os_error(-r as i32)
                ),
            ));
        }
    }

    let lazy = ctx.lazy.as_ref().filter(|_| lazy);
    fill_memory(t, p, ctx.img, parent.map(|q| (q, kept.as_slice())), lazy)?;
    aio::make_rings(t, &p.vmas)?;

    let mut protect = Batch::new();
    for v in &fix_prot {
        protect.push(
            nr::SYS_mprotect,
            &[v.start, v.end - v.start, u64::from(v.prot)],
        );
    }
    for (v, r) in fix_prot.iter().zip(t.batch(&protect)?) {
        if r < 0 {
            return Err(rerr(
                pid,
                "mprotect",
                format!(
                    "{:#x}-{:#x}: {}",
                    v.start,
                    v.end,
                    std::io::Error::from_raw_os_error(-r as i32)
                ),
            ));
        }
    }
    set_mm(t, p)
}

/// Maps shared memory object `id`: creating it on first use (filled from
/// the image), reopening it through the first process's handle after that.
fn map_shmem(
    t: &mut Tracee,
    v: &Vma,
    id: usize,
    offset: u64,
    prot: u32,
    ctx: &mut MemCtx,
) -> Result<()> {
    let pid = t.ns_pid;
    let obj = ctx.shmem.get(id).ok_or_else(|| {
        rerr(
            pid,
            "shared memory",
            format!("object {id} missing from the image"),
        )
    })?;
    let len = v.end - v.start;
    let shared = (libc::MAP_FIXED | libc::MAP_SHARED) as u64;
    if let Some(fd) = ctx.reopen(t, id)? {
        t.call(
            "mmap shared memory",
            nr::SYS_mmap,
            &[v.start, len, u64::from(prot), shared, fd, offset],
        )?;
        t.call("close shared memory", nr::SYS_close, &[fd])?;
        return Ok(());
    }
    match &obj.kind {
        ShmemKind::Anon => {
            if offset != 0 {
                return Err(rerr(
                    pid,
                    "shared memory",
                    "a shared anonymous mapping that does not start at offset 0".into(),
                ));
            }
            t.call(
                "mmap shared anonymous memory",
                nr::SYS_mmap,
                &[
                    v.start,
                    len,
                    (libc::PROT_READ | libc::PROT_WRITE) as u64,
                    shared | libc::MAP_ANONYMOUS as u64,
                    u64::MAX,
                    0,
                ],
            )?;
            fill_through_mapping(t.pid, ctx.img, obj, v.start, 0, len, pid)?;
            if prot != (libc::PROT_READ | libc::PROT_WRITE) as u32 {
                t.call(
                    "mprotect shared memory",
                    nr::SYS_mprotect,
                    &[v.start, len, u64::from(prot)],
                )?;
            }
            let path = format!("/proc/{}/map_files/{:x}-{:x}", t.pid, v.start, v.end);
            ctx.keep(id, &path, pid)?;
        }
        ShmemKind::Memfd { name, .. } => {
            let fd = create_memfd(t, name, obj, ctx.img)?;
            t.call(
                "mmap a memfd",
                nr::SYS_mmap,
                &[v.start, len, u64::from(prot), shared, fd, offset],
            )?;
            ctx.keep(id, &format!("/proc/{}/fd/{fd}", t.pid), pid)?;
            t.call("close a memfd", nr::SYS_close, &[fd])?;
        }
        ShmemKind::SysV { shmid, .. } => {
            // Made (and filled) by its maker before any process maps it.
            if offset != 0 {
                return Err(rerr(
                    pid,
                    "shared memory",
                    "a partially unmapped SysV segment".into(),
                ));
            }
            let mut flags = 0u64;
            if prot & libc::PROT_WRITE as u32 == 0 {
                flags |= libc::SHM_RDONLY as u64;
            }
            if prot & libc::PROT_EXEC as u32 != 0 {
                flags |= libc::SHM_EXEC as u64;
            }
            tracing::debug!(shmid, start = v.start, flags, "shmat");
            let attach = |t: &mut Tracee| {
                t.call("shmat", libc::SYS_shmat, &[*shmid as u64, v.start, flags])
                    .map(drop)
            };
            match ctx.sysv_ns.get(&id) {
                Some(there) if !same_ns(there, t.pid) => {
                    in_ipc_ns(t, there, &ctx.transport, attach)?
                }
                _ => attach(t)?,
            }
        }
    }
    Ok(())
}

/// Whether namespace file `ns` is the IPC namespace of process `pid` (as
/// we number it).
fn same_ns(ns: &File, pid: nix::unistd::Pid) -> bool {
    use std::os::unix::fs::MetadataExt;
    let ino = |m: std::io::Result<std::fs::Metadata>| m.ok().map(|m| (m.dev(), m.ino()));
    let theirs = ino(std::fs::metadata(format!("/proc/{pid}/ns/ipc")));
    theirs.is_some() && ino(ns.metadata()) == theirs
}

/// Runs `f` in `t` while `t` is in IPC namespace `ns` (passed in through
/// `transport`), then puts `t` back in its own.
fn in_ipc_ns(
    t: &mut Tracee,
    ns: &File,
    transport: &Transport,
    f: impl FnOnce(&mut Tracee) -> Result<()>,
) -> Result<()> {
    let flag = libc::CLONE_NEWIPC as u64;
    let own = crate::restore::namespaces::open_in(t, "/proc/self/ns/ipc")?;
    let there = transport.pass(t, ns.as_fd())?;
    let went = t.call("setns (an IPC namespace)", libc::SYS_setns, &[there, flag]);
    let done = went.and_then(|_| f(t));
    let back = t.call("setns (its IPC namespace)", libc::SYS_setns, &[own, flag]);
    t.call("close", nr::SYS_close, &[there])?;
    t.call("close", nr::SYS_close, &[own])?;
    done.and(back.map(drop))
}

/// Which process makes each SysV segment again, by object id: the one
/// that made it (so that it is its creator again, `shm_cpid`) where it
/// can, else the first process of the segment's IPC namespace (the root
/// for the root's). It can if it is restored, not a zombie, in the
/// segment's namespace (the first process at or above it that starts one
/// is that namespace's) and restored before every process that maps the
/// segment (each is it or one of its descendants: a parent's memory is in
/// place before its children are made).
pub fn sysv_makers(
    shmem: &[SharedMemory],
    procs: &std::collections::BTreeMap<i32, ProcessImage>,
    root: i32,
) -> HashMap<usize, i32> {
    // `p` and the processes above it, `p` first.
    let lineage = |p: i32| {
        std::iter::successors(Some(p), |q| procs.get(q).and_then(|q| q.parent))
            .take(procs.len() + 1)
            .collect::<Vec<i32>>()
    };
    // The first process of `p`'s IPC namespace (`p` and those above it
    // alone can start it; the root starts the root's).
    let namespace_of = |p: i32| {
        let line = lineage(p);
        (line.last() == Some(&root)).then(|| {
            *line
                .iter()
                .find(|q| **q == root || procs.get(q).is_some_and(|q| q.ipc.is_some()))
                .expect("the root is in its own lineage")
        })
    };
    let maps = |q: &ProcessImage, id: usize| {
        q.vmas
            .iter()
            .any(|v| matches!(v.kind, VmaKind::Shmem { id: o, .. } if o == id))
    };
    let can_make = |c: i32, id: usize, first: i32| {
        procs.get(&c).is_some_and(|p| p.zombie.is_none())
            && namespace_of(c) == Some(first)
            && procs
                .values()
                .filter(|q| maps(q, id))
                .all(|q| lineage(q.pid).contains(&c))
    };
    shmem
        .iter()
        .filter_map(|obj| match obj.kind {
            ShmemKind::SysV { creator, ns, .. } => {
                let first = ns.unwrap_or(root);
                Some((
                    obj.id,
                    creator
                        .filter(|&c| can_make(c, obj.id, first))
                        .unwrap_or(first),
                ))
            }
            _ => None,
        })
        .collect()
}

/// Recreates the SysV segments of the image `t` makes ([`sysv_makers`]),
/// with their keys, ids, modes and contents.
pub fn create_sysv_segments(t: &mut Tracee, ctx: &mut MemCtx) -> Result<()> {
    for obj in ctx.shmem {
        let ShmemKind::SysV {
            key, shmid, mode, ..
        } = obj.kind
        else {
            continue;
        };
        if ctx.sysv_makers.get(&obj.id) != Some(&t.ns_pid) {
            continue;
        }
        let pid = t.ns_pid;
        let ns = File::open(format!("/proc/{}/ns/ipc", t.pid))
            .map_err(|e| rerr(pid, "shared memory", format!("its IPC namespace: {e}")))?;
        ctx.sysv_ns.insert(obj.id, ns);
        // Still there (same host, same IPC namespace: segments outlive their
        // processes)? Then it is the very segment, contents and all.
        let r = t.raw_on(t.pid, libc::SYS_shmget, &[key as u32 as u64, 0, 0])?;
        if key != libc::IPC_PRIVATE && r == i64::from(shmid) {
            continue;
        }
        if key == libc::IPC_PRIVATE && sysv_exists(t, shmid)? {
            continue;
        }
        crate::restore::ipc::next_id(t, "shm_next_id", shmid)?;
        let id = t.call(
            "shmget",
            libc::SYS_shmget,
            &[
                key as u32 as u64,
                obj.size,
                (libc::IPC_CREAT | libc::IPC_EXCL) as u64 | u64::from(mode & 0o777),
            ],
        )?;
        if id != shmid as u64 {
            return Err(rerr(
                pid,
                "shared memory",
                format!("SysV segment {shmid} came back as {id} (is the id taken?)"),
            ));
        }
        let addr = t.call("shmat", libc::SYS_shmat, &[id, 0, 0])?;
        fill_through_mapping(
            t.pid,
            ctx.img,
            obj,
            addr,
            0,
            obj.size.next_multiple_of(PAGE_SIZE),
            pid,
        )?;
        t.call("shmdt", libc::SYS_shmdt, &[addr])?;
    }
    Ok(())
}

/// Whether segment `shmid` exists in the process's IPC namespace.
fn sysv_exists(t: &mut Tracee, shmid: i32) -> Result<bool> {
    let buf = t.out(128)?;
    Ok(t.raw_on(
        t.pid,
        libc::SYS_shmctl,
        &[shmid as u64, libc::IPC_STAT as u64, buf],
    )? >= 0)
}

/// Seals memfds once every mapping and write is done (a write seal would
/// forbid the writable mappings the restore makes).
pub fn seal_memfds(ctx: &MemCtx) -> Result<()> {
    for obj in ctx.shmem {
        if let ShmemKind::Memfd { seals, .. } = obj.kind {
            if seals == 0 {
                continue;
            }
            if let Some(f) = ctx.handles.get(&obj.id) {
                nix::fcntl::fcntl(
                    f,
                    nix::fcntl::FcntlArg::F_ADD_SEALS(nix::fcntl::SealFlag::from_bits_truncate(
                        seals as i32,
                    )),
                )
                .map_err(|e| rerr(0, "memfd seals", e.to_string()))?;
            }
        }
    }
    Ok(())
}

/// Creates a memfd in the process holding `obj`'s contents; returns its fd.
pub fn create_memfd(t: &mut Tracee, name: &str, obj: &SharedMemory, img: &ImageDir) -> Result<u64> {
    let pid = t.ns_pid;
    let a = t.arg_str(name)?;
    let fd = t.call(
        "memfd_create",
        nr::SYS_memfd_create,
        &[a, (libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) as u64],
    )?;
    t.call("size a memfd", libc::SYS_ftruncate, &[fd, obj.size])?;
    // Fill it from here, through the process's fd.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(format!("/proc/{}/fd/{fd}", t.pid))
        .map_err(|e| rerr(pid, "fill a memfd", e.to_string()))?;
    let data =
        File::open(img.shmem_file(obj.id)).map_err(|e| Error::image(&img.shmem_file(obj.id), e))?;
    let mut buf = Vec::new();
    for r in &obj.pages {
        buf.resize((r.count * PAGE_SIZE) as usize, 0);
        data.read_exact_at(&mut buf, r.offset)
            .map_err(|e| Error::image(&img.shmem_file(obj.id), e))?;
        let n = buf.len().min(obj.size.saturating_sub(r.start) as usize);
        f.write_all_at(&buf[..n], r.start)
            .map_err(|e| rerr(pid, "fill a memfd", e.to_string()))?;
    }
    Ok(fd)
}

/// Writes a shared object's saved pages through a writable mapping of its
/// `[obj_start, obj_start+len)` range at `addr`.
fn fill_through_mapping(
    tid: Pid,
    img: &ImageDir,
    obj: &SharedMemory,
    addr: u64,
    obj_start: u64,
    len: u64,
    pid: i32,
) -> Result<()> {
    let runs: Vec<PageRun> = obj
        .pages
        .iter()
        .filter(|r| r.start >= obj_start && r.start < obj_start + len)
        .map(|r| PageRun {
            start: addr + (r.start - obj_start),
            count: r.count.min((obj_start + len - r.start) / PAGE_SIZE),
            offset: r.offset,
        })
        .collect();
    write_pages(tid, &img.shmem_file(obj.id), &runs, pid)
}

/// Fills the memory of `p` from the image. Pages of private anonymous
/// mappings (nearly all of a server's memory) go in through a userfaultfd
/// of its memory: the kernel then allocates each page and copies into it,
/// where a write from outside would first fault it in cleared (about 40%
/// slower in all). Other pages, and all of them where userfaultfd cannot
/// be had, are written from outside.
///
/// Areas kept from a parent (`inherited`: the parent and the areas) hold
/// its pages already: only what differs is written there. With `lazy`, the
/// pages that would go in through the userfaultfd are left to a copier
/// that goes on while the program runs.
fn fill_memory(
    t: &mut Tracee,
    p: &ProcessImage,
    img: &ImageDir,
    inherited: Option<(&ProcessImage, &[(u64, u64)])>,
    lazy: Option<&LazyPages>,
) -> Result<()> {
    let pid = p.pid;
    let file = img.pages_file(pid);
    let pages: std::borrow::Cow<[PageRun]> = match inherited {
        Some((parent, kept)) if !kept.is_empty() => {
            let Split {
                inside, outside, ..
            } = split_runs(&p.pages, kept);
            cow::fill(t, p, parent, img, kept, &inside)?;
            outside.into()
        }
        _ => p.pages.as_slice().into(),
    };
    // Mappings never touched since they were made (an mlock'ed one was
    // faulted in already; a kept one is the parent's).
    let fillable: Vec<(u64, u64)> = p
        .vmas
        .iter()
        .filter(|v| {
            matches!(v.kind, VmaKind::Anon)
                && !v.shared
                && !v.flags.iter().any(|f| f == "lo")
                && inherited.is_none_or(|(_, kept)| kept.binary_search(&(v.start, v.end)).is_err())
        })
        .map(|v| (v.start, v.end))
        .collect();
    let Split {
        inside,
        outside,
        used,
    } = split_runs(&pages, &fillable);
    if inside.is_empty() {
        return write_pages(t.pid, &file, &pages, pid);
    }
    let used: Vec<(u64, u64)> = used.iter().map(|&i| fillable[i]).collect();
    if let Some(lazy) = lazy {
        match take_userfaultfd(t, true)? {
            Some(uffd) => {
                return fill_lazily(t, p, &file, &used, uffd, &inside, &outside, lazy);
            }
            None => tracing::debug!(
                pid,
                "no userfaultfd for lazy pages here; filling before it runs"
            ),
        }
    }
    let Some(uffd) = take_userfaultfd(t, false)? else {
        return write_pages(t.pid, &file, &pages, pid);
    };
    let fd = uffd.as_raw_fd();
    if !register_all(fd, &used, pid) {
        return write_pages(t.pid, &file, &pages, pid);
    }
    let result =
        copy_runs(fd, &file, &inside, pid).and_then(|()| write_pages(t.pid, &file, &outside, pid));
    // Registrations end before the process runs, however the copy went.
    unregister_all(fd, &used);
    result
}

/// Registers every range of `ranges` with `uffd` for missing pages, or
/// none: where the kernel refuses one (a kind of mapping a userfaultfd
/// cannot handle), those registered already go again, and the pages are
/// to be written from outside.
fn register_all(uffd: std::os::fd::RawFd, ranges: &[(u64, u64)], pid: i32) -> bool {
    for (i, &(s, e)) in ranges.iter().enumerate() {
        if let Err(err) = crate::sys::uffd_register_missing(uffd, s, e - s) {
            tracing::debug!(pid, error = %err, "cannot register {s:#x}-{e:#x}; writing pages from outside");
            unregister_all(uffd, &ranges[..i]);
            return false;
        }
    }
    true
}

fn unregister_all(uffd: std::os::fd::RawFd, ranges: &[(u64, u64)]) {
    for &(s, e) in ranges {
        let _ = crate::sys::uffd_unregister(uffd, s, e - s);
    }
}

/// Registers `ranges` with `uffd` and hands the pages `inside` them to a
/// copier of `lazy`, after writing the others (`outside`) at once.
#[allow(clippy::too_many_arguments)]
fn fill_lazily(
    t: &mut Tracee,
    p: &ProcessImage,
    file: &std::path::Path,
    ranges: &[(u64, u64)],
    uffd: std::os::fd::OwnedFd,
    inside: &[PageRun],
    outside: &[PageRun],
    lazy: &LazyPages,
) -> Result<()> {
    let pid = p.pid;
    write_pages(t.pid, file, outside, pid)?;
    // Nothing is registered that a copier would not serve.
    if !register_all(uffd.as_raw_fd(), ranges, pid) {
        return write_pages(t.pid, file, inside, pid);
    }
    let map = map_pages(file, inside)?;
    lazy.start(pid, t.pid, uffd, map, inside);
    Ok(())
}

/// Creates a userfaultfd in `t` (for its memory), takes it over and closes
/// it in `t` again; `None` where this kernel or its settings refuse one.
/// One for `lazy` pages also takes faults the kernel takes on the
/// program's behalf (a read() into a page not yet there) and reports
/// forks, moves and discards; that needs privilege.
fn take_userfaultfd(t: &mut Tracee, lazy: bool) -> Result<Option<std::os::fd::OwnedFd>> {
    /// Faults from user mode only: nothing is to fault while the process
    /// is stopped, and no privilege is needed for it.
    const UFFD_USER_MODE_ONLY: u64 = 1;
    let mode = if lazy { 0 } else { UFFD_USER_MODE_ONLY };
    let flags = (libc::O_CLOEXEC | libc::O_NONBLOCK) as u64 | mode;
    let Ok(fd) = t.call("userfaultfd", libc::SYS_userfaultfd, &[flags]) else {
        return Ok(None);
    };
    let ours =
        crate::sys::pidfd_open(t.pid).and_then(|pidfd| crate::sys::steal_fd_via(&pidfd, fd as i32));
    t.call("close the userfaultfd", nr::SYS_close, &[fd])?;
    let Ok(ours) = ours else { return Ok(None) };
    let features = if lazy {
        crate::sys::UFFD_FEATURE_EVENTS
    } else {
        0
    };
    if crate::sys::uffd_api_features(ours.as_raw_fd(), features).is_err() {
        return Ok(None);
    }
    Ok(Some(ours))
}

/// Page runs split by a set of address ranges.
#[derive(Debug, PartialEq)]
struct Split {
    inside: Vec<PageRun>,
    outside: Vec<PageRun>,
    /// The ranges holding pages, by index.
    used: std::collections::BTreeSet<usize>,
}

/// Splits page runs into the parts inside `ranges` (sorted, disjoint) and
/// the rest.
fn split_runs(runs: &[PageRun], ranges: &[(u64, u64)]) -> Split {
    let mut split = Split {
        inside: Vec::new(),
        outside: Vec::new(),
        used: Default::default(),
    };
    for r in runs {
        let mut at = r.start;
        let end = r.start.saturating_add(r.count.saturating_mul(PAGE_SIZE));
        let piece = |from: u64, to: u64| PageRun {
            start: from,
            count: (to - from) / PAGE_SIZE,
            offset: r.offset.saturating_add(from - r.start),
        };
        // The first range ending after `at`.
        let mut i = ranges.partition_point(|&(_, e)| e <= at);
        while at < end {
            match ranges.get(i) {
                Some(&(s, e)) if s < end => {
                    if at < s {
                        split.outside.push(piece(at, s));
                        at = s;
                    }
                    let to = e.min(end);
                    split.inside.push(piece(at, to));
                    split.used.insert(i);
                    at = to;
                    i += 1;
                }
                _ => {
                    split.outside.push(piece(at, end));
                    at = end;
                }
            }
        }
    }
    split
}

/// Copies page runs from an image file into registered memory.
fn copy_runs(
    uffd: std::os::fd::RawFd,
    file: &std::path::Path,
    runs: &[PageRun],
    pid: i32,
) -> Result<()> {
    let map = map_pages(file, runs)?;
    for r in runs {
        // Within the mapping: map_pages checked every run.
        let src = &map[r.offset as usize..(r.offset + r.count * PAGE_SIZE) as usize];
        crate::sys::uffd_copy(uffd, r.start, src).map_err(|e| {
            rerr(
                pid,
                "write memory",
                format!("{} pages at {:#x}: {e}", r.count, r.start),
            )
        })?;
    }
    Ok(())
}

/// The parts of page runs inside `ranges` (sorted, disjoint).
pub(super) fn split_in(runs: &[PageRun], ranges: &[(u64, u64)]) -> Vec<PageRun> {
    split_runs(runs, ranges).inside
}

/// Copies page runs from an image file into the process, straight from a
/// mapping of the file (one copy, no staging buffer).
pub(super) fn write_pages(
    tid: Pid,
    file: &std::path::Path,
    runs: &[PageRun],
    pid: i32,
) -> Result<()> {
    if runs.is_empty() {
        return Ok(());
    }
    write_mapped(tid, runs, &map_pages(file, runs)?, pid)
}

/// Writes page runs from `data` (a page file mapped by [`map_pages`] for
/// them) into the process.
pub(super) fn write_mapped(tid: Pid, runs: &[PageRun], data: &[u8], pid: i32) -> Result<()> {
    crate::procmem::write_runs(tid, runs, data)
        .map_err(|e| rerr(pid, "write memory", e.to_string()))
}

/// A page file of the image, mapped, once every run of `runs` is found to
/// lie within it: a run beyond the file is the image's fault, and said so.
pub(super) fn map_pages(file: &std::path::Path, runs: &[PageRun]) -> Result<memmap2::Mmap> {
    let data = File::open(file).map_err(|e| Error::image(file, e))?;
    let map = crate::sys::map_image(&data).map_err(|e| Error::image(file, e))?;
    if let Some(r) = runs
        .iter()
        .find(|r| r.offset.saturating_add(r.count.saturating_mul(PAGE_SIZE)) > map.len() as u64)
    {
        return Err(Error::CorruptImage {
            path: file.into(),
            detail: format!("pages at {:#x} lie beyond the end of the file", r.start),
        });
    }
    Ok(map)
}

/// Restores the mm fields (code/data/brk/stack/args/env, auxv, exe link).
fn set_mm(t: &mut Tracee, p: &ProcessImage) -> Result<()> {
    // The kernel refuses to change the exe link while the old executable is
    // still mapped; a skeleton of the same program needs no change anyway.
    let same_exe = match (
        std::fs::metadata(format!("/proc/{}/exe", t.pid)),
        std::fs::metadata(&p.exe),
    ) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    };
    let exe_fd = if p.exe.is_empty() || same_exe {
        None
    } else {
        let a = t.arg_str(&p.exe)?;
        Some(t.call(
            "open the executable",
            nr::SYS_openat,
            &[
                libc::AT_FDCWD as u64,
                a,
                (libc::O_RDONLY | libc::O_CLOEXEC) as u64,
            ],
        )?)
    };
    let m = &p.mm;
    let auxv: Vec<u8> = m.auxv.iter().flat_map(|v| v.to_ne_bytes()).collect();
    let auxv_addr = t.arg(&auxv)?;
    let mut map = Vec::with_capacity(104);
    for v in [
        m.start_code,
        m.end_code,
        m.start_data,
        m.end_data,
        m.start_brk,
        m.brk,
        m.start_stack,
        m.arg_start,
        m.arg_end,
        m.env_start,
        m.env_end,
        auxv_addr,
    ] {
        map.extend_from_slice(&v.to_ne_bytes());
    }
    map.extend_from_slice(&(auxv.len() as u32).to_ne_bytes());
    map.extend_from_slice(&(exe_fd.map(|f| f as u32).unwrap_or(u32::MAX)).to_ne_bytes());
    let a = t.arg(&map)?;
    t.call(
        "prctl(PR_SET_MM_MAP)",
        nr::SYS_prctl,
        &[PR_SET_MM, PR_SET_MM_MAP, a, map.len() as u64, 0],
    )?;
    if let Some(fd) = exe_fd {
        t.call("close the executable", nr::SYS_close, &[fd])?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_segment_is_made_by_its_creator_when_that_is_restored_before_its_users() {
        use crate::image::{IpcObjects, ProcessImage, SharedMemory, ShmemKind, Vma, VmaKind};
        use std::collections::BTreeMap;
        let process = |pid: i32, parent: Option<i32>, maps: bool| ProcessImage {
            pid,
            parent,
            vmas: if maps {
                vec![Vma {
                    start: 0x1000,
                    end: 0x2000,
                    prot: 3,
                    shared: true,
                    kind: VmaKind::Shmem { id: 0, offset: 0 },
                    flags: Vec::new(),
                }]
            } else {
                Vec::new()
            },
            ..Default::default()
        };
        let in_ns = |creator: Option<i32>, ns: Option<i32>| {
            vec![SharedMemory {
                id: 0,
                kind: ShmemKind::SysV {
                    key: 1,
                    shmid: 0,
                    mode: 0o600,
                    creator,
                    ns,
                },
                size: 4096,
                dev: 0,
                ino: 0,
                pages: Vec::new(),
            }]
        };
        let segment = |creator: Option<i32>| in_ns(creator, None);
        // 1 -> 2 -> 3; 2 and 3 map the segment.
        let mut procs: BTreeMap<i32, ProcessImage> = [
            process(1, None, false),
            process(2, Some(1), true),
            process(3, Some(2), true),
        ]
        .into_iter()
        .map(|p| (p.pid, p))
        .collect();
        let maker = |shm: &[SharedMemory], procs: &BTreeMap<i32, ProcessImage>| {
            sysv_makers(shm, procs, 1)[&0]
        };
        assert_eq!(maker(&segment(Some(2)), &procs), 2, "its creator");
        assert_eq!(
            maker(&segment(Some(3)), &procs),
            1,
            "2 maps it before 3 exists"
        );
        assert_eq!(maker(&segment(Some(9)), &procs), 1, "made outside the tree");
        assert_eq!(maker(&segment(None), &procs), 1, "no creator known");
        procs.get_mut(&2).unwrap().ipc = Some(IpcObjects::default());
        assert_eq!(
            maker(&segment(Some(2)), &procs),
            1,
            "2 has an IPC namespace of its own"
        );
        // A segment of 2's namespace.
        assert_eq!(maker(&in_ns(Some(2), Some(2)), &procs), 2, "its creator");
        assert_eq!(
            maker(&in_ns(Some(3), Some(2)), &procs),
            2,
            "2 maps it before 3 exists: the namespace's first process"
        );
        assert_eq!(
            maker(&in_ns(Some(1), Some(2)), &procs),
            2,
            "1 is not in the namespace"
        );
        procs.get_mut(&2).unwrap().vmas.clear();
        assert_eq!(
            maker(&in_ns(Some(3), Some(2)), &procs),
            3,
            "its creator, alone to map it"
        );
    }

    const P: u64 = PAGE_SIZE;

    fn run(start: u64, count: u64, offset: u64) -> PageRun {
        PageRun {
            start: start * P,
            count,
            offset: offset * P,
        }
    }

    #[test]
    fn runs_are_split_at_range_edges_with_their_offsets() {
        // Ranges [10, 20), [30, 40) and [50, 60), in pages.
        let ranges = [(10 * P, 20 * P), (30 * P, 40 * P), (50 * P, 60 * P)];
        let runs = [
            run(0, 5, 0),    // before every range
            run(8, 4, 5),    // across the start of the first
            run(12, 3, 9),   // inside
            run(18, 14, 12), // across the gap into the second
            run(38, 4, 26),  // across the end of the last
        ];
        let Split {
            inside,
            outside,
            used,
        } = split_runs(&runs, &ranges);
        // The last range holds no page.
        assert_eq!(used.into_iter().collect::<Vec<_>>(), vec![0, 1]);
        assert_eq!(
            inside,
            vec![
                run(10, 2, 7),
                run(12, 3, 9),
                run(18, 2, 12),
                run(30, 2, 24),
                run(38, 2, 26),
            ]
        );
        assert_eq!(
            outside,
            vec![run(0, 5, 0), run(8, 2, 5), run(20, 10, 14), run(40, 2, 28)]
        );
        let pages = |v: &[PageRun]| v.iter().map(|r| r.count).sum::<u64>();
        assert_eq!(pages(&inside) + pages(&outside), pages(&runs));
    }
}
