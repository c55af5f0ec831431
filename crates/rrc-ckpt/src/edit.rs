//! Preparing an image for a restore that is to differ from the original:
//! a working copy of the image ([`WorkingCopy`]), and typed queries and
//! changes of what the restore will read ([`ImageEdit`]), so that callers
//! (a replay, a takeover) never handle the image's files themselves.
//!
//! Edits are made in memory and written by [`ImageEdit::save`], which
//! replaces each changed file by a new one: a working copy's files are
//! hard links to the original image's, which must stay as it was.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::image::{FileKind, ImageDir, Manifest, OpenFile, ProcessImage};
use crate::procfs::PAGE_SIZE;
use crate::{Error, Result};

/// A copy of an image directory beside it, its files hard-linked where the
/// file system allows and copied where not; removed when dropped, unless
/// kept.
#[derive(Debug)]
pub struct WorkingCopy {
    dir: PathBuf,
    kept: bool,
}

impl WorkingCopy {
    /// Makes a working copy of the image in `images`.
    pub fn of(images: &Path) -> Result<WorkingCopy> {
        // Several copies of one image may be made by one process.
        static MADE: AtomicUsize = AtomicUsize::new(0);
        let parent = images.parent().unwrap_or(Path::new("."));
        let name = images
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let dir = parent.join(format!(
            ".{name}.work-{}-{}",
            std::process::id(),
            MADE.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir(&dir).map_err(Error::io(format!("creating {}", dir.display())))?;
        // From here on, a failure removes what was made.
        let copy = WorkingCopy { dir, kept: false };
        let entries =
            fs::read_dir(images).map_err(Error::io(format!("reading {}", images.display())))?;
        for entry in entries {
            let entry = entry.map_err(Error::io(format!("reading {}", images.display())))?;
            let is_file = entry
                .file_type()
                .map_err(Error::io(format!("reading {}", entry.path().display())))?
                .is_file();
            if !is_file {
                continue;
            }
            let to = copy.dir.join(entry.file_name());
            if fs::hard_link(entry.path(), &to).is_err() {
                fs::copy(entry.path(), &to)
                    .map_err(Error::io(format!("copying {}", entry.path().display())))?;
            }
        }
        Ok(copy)
    }

    /// The copy's directory.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Keeps the copy when this is dropped; returns its directory.
    pub fn keep(mut self) -> PathBuf {
        self.kept = true;
        self.dir.clone()
    }
}

impl Drop for WorkingCopy {
    fn drop(&mut self) {
        if !self.kept {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// The process and open file behind a memfd descriptor, and the shared
/// memory object that holds its contents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemfdAt {
    pub pid: i32,
    pub file_id: usize,
    pub shmem_id: usize,
}

/// A TCP connection as a checkpoint saved it.
#[derive(Debug, Clone)]
pub struct SavedConnection {
    pub fd: i32,
    pub file_id: usize,
    /// The open file's status flags.
    pub flags: u32,
    pub local: std::net::SocketAddr,
    pub peer: std::net::SocketAddr,
    pub state: crate::tcp::TcpState,
    pub options: Vec<crate::image::SockOpt>,
    /// Sent and unacknowledged, then unsent bytes.
    pub sndq: Vec<u8>,
    /// Received bytes not yet read.
    pub rcvq: Vec<u8>,
}

/// One page of a shared memory object's saved contents, read for editing.
struct Page {
    /// Where it is in the object's file.
    at: u64,
    original: Vec<u8>,
    current: Vec<u8>,
}

/// An image loaded for editing; nothing is written before
/// [`ImageEdit::save`].
pub struct ImageEdit {
    img: ImageDir,
    manifest: Manifest,
    procs: BTreeMap<i32, ProcessImage>,
    manifest_changed: bool,
    changed: BTreeSet<i32>,
    /// New contents of whole files, by name.
    files: BTreeMap<String, Vec<u8>>,
    /// Pages read for editing, by shared memory object and page number.
    pages: BTreeMap<(usize, u64), Page>,
}

impl ImageEdit {
    /// Loads the image in `dir`: its manifest and every process record,
    /// checked as a restore checks them.
    pub fn open(dir: &Path) -> Result<ImageEdit> {
        let (img, manifest, procs) = crate::restore::load(dir)?;
        Ok(ImageEdit {
            img,
            manifest,
            procs,
            manifest_changed: false,
            changed: BTreeSet::new(),
            files: BTreeMap::new(),
            pages: BTreeMap::new(),
        })
    }

    pub fn path(&self) -> &Path {
        self.img.path()
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    pub fn process(&self, pid: i32) -> Option<&ProcessImage> {
        self.procs.get(&pid)
    }

    /// Every process, by pid.
    pub fn processes(&self) -> impl Iterator<Item = &ProcessImage> {
        self.procs.values()
    }

    fn missing(&self, what: String) -> Error {
        Error::NotInImage {
            path: self.img.path().into(),
            what,
        }
    }

    fn file_of(&self, id: usize) -> Option<&OpenFile> {
        self.manifest.files.iter().find(|f| f.id == id)
    }

    /// The first process, by pid, whose descriptor `fd` is a memfd.
    pub fn memfd_at_fd(&self, fd: i32) -> Option<MemfdAt> {
        self.procs.values().find_map(|p| {
            let file = self.file_of(p.fds.iter().find(|f| f.fd == fd)?.file)?;
            match file.kind {
                FileKind::Memfd { shmem, .. } => Some(MemfdAt {
                    pid: p.pid,
                    file_id: file.id,
                    shmem_id: shmem,
                }),
                _ => None,
            }
        })
    }

    /// The descriptors of process `pid` that are TCP connections (none for
    /// a process not in the image).
    pub fn tcp_fds(&self, pid: i32) -> Vec<i32> {
        let Some(p) = self.procs.get(&pid) else {
            return Vec::new();
        };
        p.fds
            .iter()
            .filter(|f| {
                self.file_of(f.file)
                    .is_some_and(|o| matches!(o.kind, FileKind::Tcp { .. }))
            })
            .map(|f| f.fd)
            .collect()
    }

    /// Process `pid`'s TCP connections as saved: descriptor, open file,
    /// addresses, state, options and queued bytes (read from the image's
    /// socket data, checked against the state's queue lengths).
    pub fn tcp_connections(&self, pid: i32) -> Result<Vec<SavedConnection>> {
        let Some(p) = self.procs.get(&pid) else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for fd in &p.fds {
            let Some(f) = self.file_of(fd.file) else {
                continue;
            };
            let FileKind::Tcp {
                local,
                peer,
                tcp,
                options,
                data,
            } = &f.kind
            else {
                continue;
            };
            let path = self.img.socket_data();
            let bad = |detail: String| Error::CorruptImage {
                path: path.clone(),
                detail,
            };
            let addr = |s: &str| {
                s.parse::<std::net::SocketAddr>()
                    .map_err(|_| bad(format!("bad address {s:?}")))
            };
            let sndq = tcp.sndq_len as u64;
            if data.len != sndq + u64::from(tcp.rcvq_len) {
                return Err(bad(format!(
                    "the queues of connection {local} -> {peer} do not match its record"
                )));
            }
            let file = fs::File::open(&path).map_err(|e| Error::image(&path, e))?;
            let len = usize::try_from(data.len).map_err(|_| bad("queues too long".into()))?;
            let mut bytes = vec![0u8; len];
            file.read_exact_at(&mut bytes, data.offset)
                .map_err(|e| Error::image(&path, e))?;
            let rcvq = bytes.split_off(sndq as usize);
            out.push(SavedConnection {
                fd: fd.fd,
                file_id: f.id,
                flags: f.flags,
                local: addr(local)?,
                peer: addr(peer)?,
                state: tcp.clone(),
                options: options.clone(),
                sndq: bytes,
                rcvq,
            });
        }
        Ok(out)
    }

    /// Makes open file `file_id` (a TCP connection) an unconnected TCP
    /// socket: the program finds its connection gone (reads fail, polls
    /// report a hang-up) and the peer's next segment is answered with a
    /// reset.
    pub fn disconnect(&mut self, file_id: usize) -> Result<()> {
        let file = self
            .manifest
            .files
            .iter_mut()
            .find(|f| f.id == file_id)
            .ok_or_else(|| Error::NotInImage {
                path: self.img.path().into(),
                what: format!("open file {file_id}"),
            })?;
        let FileKind::Tcp { local, options, .. } = &file.kind else {
            return Err(Error::NotInImage {
                path: self.img.path().into(),
                what: format!("a TCP connection as open file {file_id}"),
            });
        };
        let family = if local.starts_with('[') {
            libc::AF_INET6
        } else {
            libc::AF_INET
        };
        file.kind = FileKind::Inet {
            family,
            ty: libc::SOCK_STREAM,
            local: None,
            peer: None,
            options: options.clone(),
        };
        self.manifest_changed = true;
        Ok(())
    }

    /// Makes open file `file_id`, whatever it was, a regular file holding
    /// `contents` that was deleted while open: the restore recreates it at
    /// `path`, opens it read-only at position 0 for every descriptor of
    /// the open file, and deletes it again.
    pub fn replace_with_deleted_file(
        &mut self,
        file_id: usize,
        path: &str,
        contents: Vec<u8>,
    ) -> Result<()> {
        let Some(file) = self.manifest.files.iter_mut().find(|f| f.id == file_id) else {
            return Err(self.missing(format!("open file {file_id}")));
        };
        file.flags = libc::O_RDONLY as u32;
        file.kind = FileKind::Regular {
            path: path.into(),
            pos: 0,
            deleted: true,
            size: contents.len() as u64,
            mode: 0o600,
            ghost: None,
            handle: None,
        };
        self.manifest_changed = true;
        let name = file_name(&self.img.file_data(file_id));
        self.files.insert(name, contents);
        Ok(())
    }

    /// Page `page` (at byte `page * PAGE_SIZE`) of shared memory object
    /// `shmem_id` as the image saved it, to read or change. An error if
    /// the image did not save that page (a hole, or beyond a limit).
    pub fn shmem_page_mut(&mut self, shmem_id: usize, page: u64) -> Result<&mut [u8]> {
        if !self.pages.contains_key(&(shmem_id, page)) {
            let loaded = self.load_page(shmem_id, page)?;
            self.pages.insert((shmem_id, page), loaded);
        }
        Ok(&mut self
            .pages
            .get_mut(&(shmem_id, page))
            .expect("loaded")
            .current)
    }

    fn load_page(&self, shmem_id: usize, page: u64) -> Result<Page> {
        let Some(obj) = self.manifest.shmem.iter().find(|s| s.id == shmem_id) else {
            return Err(self.missing(format!("shared memory object {shmem_id}")));
        };
        let not_saved = || self.missing(format!("page {page} of shared memory object {shmem_id}"));
        let offset = page.checked_mul(PAGE_SIZE).ok_or_else(not_saved)?;
        let run = obj
            .pages
            .iter()
            .find(|r| r.start <= offset && offset - r.start < r.count.saturating_mul(PAGE_SIZE))
            .ok_or_else(not_saved)?;
        let at = run.offset.saturating_add(offset - run.start);
        let path = self.img.shmem_file(shmem_id);
        let f = fs::File::open(&path).map_err(|e| Error::image(&path, e))?;
        let mut original = vec![0u8; PAGE_SIZE as usize];
        f.read_exact_at(&mut original, at)
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::UnexpectedEof => Error::CorruptImage {
                    path: path.clone(),
                    detail: format!("it ends before page {page} of the object"),
                },
                _ => Error::image(&path, e),
            })?;
        Ok(Page {
            at,
            current: original.clone(),
            original,
        })
    }

    /// Gives the fd table of process `pid` room for descriptors below
    /// `room` from its restore on (one that has more keeps it): a
    /// descriptor it will place that high then needs no growth of the
    /// table, which waits for an RCU grace period once threads share it.
    pub fn fd_room(&mut self, pid: i32, room: u32) -> Result<()> {
        let Some(p) = self.procs.get_mut(&pid) else {
            return Err(self.missing(format!("process {pid}")));
        };
        if p.fd_table < room {
            p.fd_table = room;
            self.changed.insert(pid);
        }
        Ok(())
    }

    /// Makes the threads of process `pid` that the checkpoint caught
    /// blocked in one of `syscalls` (numbers) return EINTR from it when
    /// restored, instead of waiting again; returns how many there were.
    pub fn interrupt_syscalls(&mut self, pid: i32, syscalls: &[i64]) -> Result<usize> {
        let Some(p) = self.procs.get_mut(&pid) else {
            return Err(self.missing(format!("process {pid}")));
        };
        // What a blocked call's return value reads as while it waits to be
        // restarted (or as it was interrupted).
        let waiting = [
            crate::ptrace::ERESTARTSYS,
            crate::ptrace::ERESTARTNOINTR,
            crate::ptrace::ERESTARTNOHAND,
            crate::ptrace::ERESTART_RESTARTBLOCK,
            -i64::from(libc::EINTR),
        ];
        let mut interrupted = 0;
        for t in &mut p.threads {
            let ret = t.regs.rax as i64;
            if waiting.contains(&ret) && syscalls.contains(&(t.regs.orig_rax as i64)) {
                t.regs.rax = (-i64::from(libc::EINTR)) as u64;
                interrupted += 1;
            }
        }
        if interrupted > 0 {
            self.changed.insert(pid);
        }
        Ok(interrupted)
    }

    /// Turns the standard output and error of process `pid` that were
    /// plain files (not deleted, and not also open at another descriptor
    /// above 2) into the restorer's own: the restore hands the process
    /// the restorer's descriptors 1 and 2 there, as it does for pipes
    /// leading out of the tree. Returns how many it turned.
    pub fn output_to_restorer(&mut self, pid: i32) -> Result<usize> {
        let Some(p) = self.procs.get(&pid) else {
            return Err(self.missing(format!("process {pid}")));
        };
        let mut turned = 0;
        for fd in p.fds.iter().filter(|f| f.fd == 1 || f.fd == 2) {
            let shared = p.fds.iter().filter(|f| f.file == fd.file).count() > 1
                && p.fds.iter().any(|f| f.file == fd.file && f.fd > 2);
            let Some(file) = self.manifest.files.iter_mut().find(|f| f.id == fd.file) else {
                continue;
            };
            if shared || !matches!(file.kind, FileKind::Regular { deleted: false, .. }) {
                continue;
            }
            // A pipe whose other end is not in the image: the restore gives
            // it the restorer's descriptor of the same number.
            file.kind = FileKind::Pipe {
                pipe: u64::MAX - file.id as u64,
                write_end: true,
                capacity: 65536,
                packets: Vec::new(),
                peer_closed: false,
            };
            file.flags = libc::O_WRONLY as u32;
            turned += 1;
        }
        if turned > 0 {
            self.manifest_changed = true;
        }
        Ok(turned)
    }

    /// Writes what changed, each file replaced by a new one (never written
    /// through a link into another image); the manifest last, so that an
    /// image whose save failed still has its old manifest. Files the
    /// manifest has checksums of get new checksums.
    pub fn save(&mut self) -> Result<()> {
        let mut written = Vec::new();
        for (name, bytes) in std::mem::take(&mut self.files) {
            self.img.replace_file(&name, &bytes)?;
            written.push(name);
        }
        let mut patches: BTreeMap<usize, Vec<(u64, &[u8])>> = BTreeMap::new();
        for ((id, _), p) in &self.pages {
            if p.current != p.original {
                patches
                    .entry(*id)
                    .or_default()
                    .push((p.at, p.current.as_slice()));
            }
        }
        for (id, patches) in patches {
            let name = file_name(&self.img.shmem_file(id));
            self.img.patch_file(&name, &patches)?;
            written.push(name);
        }
        for p in self.pages.values_mut() {
            p.original.clone_from(&p.current);
        }
        for pid in std::mem::take(&mut self.changed) {
            let name = ImageDir::process_name(pid);
            self.img.replace_json(&name, &self.procs[&pid])?;
            written.push(name);
        }
        if !self.manifest.checksums.is_empty() && !written.is_empty() {
            for name in written {
                let crc = crate::store::crc_of_file(&self.img.file(&name))?;
                self.manifest.checksums.insert(name, crc);
            }
            self.manifest_changed = true;
        }
        if std::mem::take(&mut self.manifest_changed) {
            self.img.replace_json("manifest.json", &self.manifest)?;
        }
        Ok(())
    }
}

/// The name of a file of the image directory.
fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}
