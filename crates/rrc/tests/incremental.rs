//! Incremental checkpoints: a process that changes its memory in every way
//! it can (the `mem_churn` fixture) is checkpointed many times; the first
//! checkpoint plus every delta, applied in order, must give exactly the
//! memory a full checkpoint of the same moment gives, and both must restore
//! into a process with the memory the original had.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::fs::FileExt;
use std::os::unix::net::{SocketAddr, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use nix::sys::signal::{Signal, kill};
use nix::sys::wait::waitpid;
use nix::unistd::Pid;
use rrc_ckpt::image::{ImageDir, Manifest, PageRun, ProcessImage, Vma, VmaKind};
use rrc_ckpt::incremental::{CopyMode, Incremental, IncrementalOptions};
use rrc_ckpt::store::{self, SeriesDir, layer_name};

const PAGE: u64 = 4096;

/// Sends one command to the fixture listening on `name`; its answer.
fn ask(name: &str, line: &str) -> String {
    let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
    let mut s = UnixStream::connect_addr(&addr).unwrap_or_else(|e| panic!("{name}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    s.write_all(line.as_bytes()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out.trim_end().to_string()
}

fn wait_listening(name: &str) {
    let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
    wait_until("the fixture to listen", Duration::from_secs(10), || {
        UnixStream::connect_addr(&addr).is_ok()
    });
}

struct Churn {
    name: String,
    child: Child,
    dir: PathBuf,
}

impl Churn {
    fn start(tag: &str) -> Churn {
        let dir = scratch(tag);
        let bin = build("mem_churn", &dir);
        let name = format!("rrc-churn-{}-{tag}", std::process::id());
        let log = fs::File::create(dir.join("fixture.log")).unwrap();
        let child = Command::new(&bin)
            .arg(&name)
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        wait_listening(&name);
        Churn { name, child, dir }
    }

    fn pid(&self) -> Pid {
        Pid::from_raw(self.child.id() as i32)
    }

    fn step(&self, seed: u64, n: u32) -> String {
        let a = ask(&self.name, &format!("step {seed} {n}"));
        assert!(a.starts_with("ok "), "step {seed}: {a}");
        self.wait_quiet();
        a
    }

    fn hash(&self) -> String {
        let h = ask(&self.name, "hash");
        self.wait_quiet();
        h
    }

    /// Waits until every thread is blocked where it waits for the next
    /// command (the main one in accept4, the others in read): the answer
    /// comes a little before that.
    fn wait_quiet(&self) {
        let pid = self.pid();
        wait_until(
            "the fixture to wait for a command",
            Duration::from_secs(10),
            || {
                let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
                    return false;
                };
                tasks.flatten().all(|t| {
                    let main = t.file_name().to_string_lossy() == pid.to_string();
                    let sys = fs::read_to_string(t.path().join("syscall")).unwrap_or_default();
                    let stat = fs::read_to_string(t.path().join("stat")).unwrap_or_default();
                    let sleeping = stat
                        .rfind(')')
                        .is_some_and(|i| stat[i + 2..].starts_with('S'));
                    let want = if main { "288 " } else { "0 " };
                    sleeping && sys.starts_with(want)
                })
            },
        );
    }

    fn kill(mut self) -> (String, PathBuf) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        (
            std::mem::take(&mut self.name),
            std::mem::take(&mut self.dir),
        )
    }
}

/// A restored process tree, killed and reaped when dropped.
struct Restored(Pid);

impl Drop for Restored {
    fn drop(&mut self) {
        let _ = kill(self.0, Signal::SIGKILL);
        let _ = waitpid(self.0, None);
    }
}

fn restore(images: &Path) -> Restored {
    let r = rrc_ckpt::restore::restore(&rrc_ckpt::restore::RestoreOptions::tree(images))
        .unwrap_or_else(|e| panic!("restore of {}: {e}", images.display()));
    Restored(r.root)
}

/// An image's memory, page by page.
struct Memory {
    dir: ImageDir,
    manifest: Manifest,
    procs: BTreeMap<i32, ProcessImage>,
}

impl Memory {
    fn load(path: &Path) -> Memory {
        let dir = ImageDir::new(path);
        let manifest = dir.read_manifest().unwrap();
        let procs = manifest
            .processes
            .iter()
            .map(|p| (*p, dir.read_json(&ImageDir::process_name(*p)).unwrap()))
            .collect();
        Memory {
            dir,
            manifest,
            procs,
        }
    }

    /// The page at `addr` as saved, if it was.
    fn saved(&self, file: &fs::File, runs: &[PageRun], addr: u64) -> Option<Vec<u8>> {
        let i = runs.partition_point(|r| r.start + r.count * PAGE <= addr);
        let r = runs.get(i)?;
        if r.start > addr {
            return None;
        }
        let mut buf = vec![0u8; PAGE as usize];
        file.read_exact_at(&mut buf, r.offset + (addr - r.start))
            .unwrap();
        Some(buf)
    }
}

/// What a page of a private mapping holds when nothing of its own was
/// saved: zeros, or the file's contents.
fn default_page(kind: &VmaKind, vma_start: u64, addr: u64) -> Vec<u8> {
    let mut buf = vec![0u8; PAGE as usize];
    if let VmaKind::File { path, offset, .. } = kind {
        let f = fs::File::open(path).unwrap();
        // Past the end of the file reads as zeros too.
        let _ = f.read_at(&mut buf, offset + (addr - vma_start));
    }
    buf
}

/// Joins neighbouring mappings the kernel could have made one.
///
/// Tracking a new mapping's writes (registering it with the userfaultfd)
/// makes it alike with a tracked neighbour, and the kernel merges the two
/// after the delta recorded them apart: a later full checkpoint sees one
/// mapping where the series has two. Both describe the same memory.
fn coalesced(vmas: &[Vma]) -> Vec<Vma> {
    let mut out: Vec<Vma> = Vec::new();
    for v in vmas {
        if let Some(last) = out.last_mut()
            && last.end == v.start
            && (last.prot, last.shared, &last.flags) == (v.prot, v.shared, &v.flags)
        {
            let continues = match (&last.kind, &v.kind) {
                (VmaKind::Anon, VmaKind::Anon) => true,
                (
                    VmaKind::File {
                        path,
                        offset,
                        ino,
                        dev,
                        ..
                    },
                    VmaKind::File {
                        path: p,
                        offset: o,
                        ino: i,
                        dev: d,
                        ..
                    },
                ) => (path, ino, dev) == (p, i, d) && offset + (last.end - last.start) == *o,
                _ => false,
            };
            if continues {
                last.end = v.end;
                continue;
            }
        }
        out.push(v.clone());
    }
    out
}

/// Checks that two lists of mappings describe the same memory, naming the
/// mappings that differ.
fn assert_same_mappings(pid: i32, a: &[Vma], b: &[Vma]) {
    let (a, b) = (coalesced(a), coalesced(b));
    if a != b {
        let only_a: Vec<&Vma> = a.iter().filter(|v| !b.contains(v)).collect();
        let only_b: Vec<&Vma> = b.iter().filter(|v| !a.contains(v)).collect();
        panic!(
            "mappings of process {pid} differ:\n  only in the first: {only_a:?}\n  only in the second: {only_b:?}"
        );
    }
}

/// Checks that two images hold the same memory: the same mappings, the
/// same contents of every page of every private mapping, the same shared
/// memory objects.
fn assert_same_memory(a: &Path, b: &Path) {
    let ma = Memory::load(a);
    let mb = Memory::load(b);
    assert_eq!(ma.manifest.processes, mb.manifest.processes);
    let mut pages = 0u64;
    for (pid, pa) in &ma.procs {
        let pb = &mb.procs[pid];
        assert_same_mappings(*pid, &pa.vmas, &pb.vmas);
        let rseq: Vec<(u64, u64)> = pb
            .threads
            .iter()
            .filter_map(|t| t.rseq)
            .map(|r| (r.ptr, r.ptr + u64::from(r.size)))
            .collect();
        let fa = fs::File::open(ma.dir.pages_file(*pid)).unwrap();
        let fb = fs::File::open(mb.dir.pages_file(*pid)).unwrap();
        for v in &pa.vmas {
            if v.shared || !matches!(v.kind, VmaKind::Anon | VmaKind::File { .. }) {
                continue;
            }
            let mut addr = v.start;
            while addr < v.end {
                let x = ma.saved(&fa, &pa.pages, addr);
                let y = mb.saved(&fb, &pb.pages, addr);
                if x.is_some() || y.is_some() {
                    let saved = (x.is_some(), y.is_some());
                    let mut x = x.unwrap_or_else(|| default_page(&v.kind, v.start, addr));
                    let mut y = y.unwrap_or_else(|| default_page(&v.kind, v.start, addr));
                    // The kernel rewrites each thread's rseq area (the CPU
                    // it runs on) whenever the thread returns to user mode:
                    // it differs between any two moments, whatever the
                    // engine does.
                    for (s, e) in &rseq {
                        for a in (*s).max(addr)..(*e).min(addr + PAGE) {
                            x[(a - addr) as usize] = 0;
                            y[(a - addr) as usize] = 0;
                        }
                    }
                    assert!(
                        x == y,
                        "process {pid}: page {addr:#x} of {:#x}-{:#x} ({:?}) differs (saved in each: {saved:?}, first difference at byte {:?})",
                        v.start,
                        v.end,
                        v.kind,
                        x.iter().zip(&y).position(|(p, q)| p != q)
                    );
                }
                pages += 1;
                addr += PAGE;
            }
        }
    }
    assert_eq!(ma.manifest.shmem.len(), mb.manifest.shmem.len());
    for (oa, ob) in ma.manifest.shmem.iter().zip(&mb.manifest.shmem) {
        assert_eq!((&oa.kind, oa.size), (&ob.kind, ob.size));
        let fa = fs::File::open(ma.dir.shmem_file(oa.id)).unwrap();
        let fb = fs::File::open(mb.dir.shmem_file(ob.id)).unwrap();
        let mut at = 0;
        while at < oa.size {
            let x = ma
                .saved(&fa, &oa.pages, at)
                .unwrap_or(vec![0; PAGE as usize]);
            let y = mb
                .saved(&fb, &ob.pages, at)
                .unwrap_or(vec![0; PAGE as usize]);
            assert!(
                x == y,
                "shared memory object {}: page {at:#x} differs",
                oa.id
            );
            at += PAGE;
        }
    }
    assert!(pages > 0);
}

/// Many checkpoints of a process changing its memory at random; the series
/// is then compared with a full checkpoint and restored.
fn churn(tag: &str, copy: CopyMode, epochs: u64) {
    require_root();
    let run = Churn::start(tag);
    let series = run.dir.join("series");
    SeriesDir::create(&series, true).unwrap();
    let mut inc = Incremental::new(IncrementalOptions {
        container: false,
        root: run.pid(),
        aio_idle: false,
        annotations: Default::default(),
        copy,
    });
    // Each run changes memory differently; RRC_CHURN_SEED repeats a run.
    let seed = std::env::var("RRC_CHURN_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(u64::from(std::process::id()));
    eprintln!("{tag}: seed {seed} (RRC_CHURN_SEED repeats it)");
    let mut snapshots = 0;
    let mut hash = String::new();
    for epoch in 0..epochs {
        run.step(seed * 1000 + epoch, 30);
        if epoch + 1 == epochs {
            // Asked before the last checkpoints: answering changes memory.
            hash = run.hash();
        }
        let r = inc
            .checkpoint(&series.join(layer_name(epoch)))
            .unwrap_or_else(|e| panic!("checkpoint {epoch}: {e}"));
        assert_eq!(r.full, epoch == 0, "checkpoint {epoch}");
        snapshots += r.snapshots;
    }
    if copy == CopyMode::Snapshot {
        assert_eq!(snapshots as u64, epochs, "every checkpoint from a snapshot");
    }
    let full = run.dir.join("full");
    rrc_ckpt::dump::checkpoint(&rrc_ckpt::dump::CheckpointOptions {
        container: false,
        root: run.pid(),
        aio_idle: false,
        images: &full,
        leave_running: true,
        annotations: Default::default(),
    })
    .unwrap();
    inc.finish().unwrap();

    let image = SeriesDir::materialize(&series, |_, _| {}).unwrap();
    assert_same_memory(&image, &full);

    // Both bring back a process with the original's memory, that goes on.
    let (name, dir) = run.kill();
    for images in [&image, &full] {
        let restored = restore(images);
        wait_listening(&name);
        assert_eq!(
            ask(&name, "hash"),
            hash,
            "restored from {}",
            images.display()
        );
        let a = ask(&name, "step 7 20");
        assert!(a.starts_with("ok "), "{a}");
        drop(restored);
    }
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn deltas_copied_while_stopped_add_up_to_a_full_checkpoint() {
    churn("direct", CopyMode::Direct, 40);
}

#[test]
fn deltas_copied_from_snapshots_add_up_to_a_full_checkpoint() {
    churn("snapshot", CopyMode::Snapshot, 40);
}

/// Copies an image directory.
fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for e in fs::read_dir(from).unwrap().flatten() {
        fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

/// `epochs` checkpoints of `run` kept apart in `series`, each after a step
/// of `n` changes (seeds from `seed` on).
fn series_with_deltas(run: &Churn, series: &Path, epochs: u64, seed: u64, n: u32) {
    SeriesDir::create(series, true).unwrap();
    let mut inc = Incremental::new(IncrementalOptions {
        container: false,
        root: run.pid(),
        aio_idle: false,
        annotations: Default::default(),
        copy: CopyMode::Auto,
    });
    for epoch in 0..epochs {
        run.step(seed + epoch, n);
        inc.checkpoint(&series.join(layer_name(epoch))).unwrap();
    }
    inc.finish().unwrap();
}

#[test]
fn a_missing_corrupt_or_repeated_delta_is_refused() {
    require_root();
    let run = Churn::start("refuse");
    let series = run.dir.join("series");
    series_with_deltas(&run, &series, 4, 1, 20);
    let other = run.dir.join("other");
    SeriesDir::create(&other, true).unwrap();
    let mut inc2 = Incremental::new(IncrementalOptions {
        container: false,
        root: run.pid(),
        aio_idle: false,
        annotations: Default::default(),
        copy: CopyMode::Auto,
    });
    inc2.checkpoint(&other.join(layer_name(0))).unwrap();
    run.step(99, 5);
    inc2.checkpoint(&other.join(layer_name(1))).unwrap();
    inc2.finish().unwrap();
    let layer = |n: u64| series.join(layer_name(n));
    let image = run.dir.join("image");
    copy_dir(&layer(0), &image);
    let refused = |delta: &Path, why: &str| {
        let e = store::apply(&image, delta).unwrap_err().to_string();
        assert!(e.contains(why), "{}: {e}", delta.display());
        assert!(!image.join(store::APPLYING).exists());
    };

    // A delta is not an image.
    let e = rrc_ckpt::restore::load(&layer(1))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("it is a delta"), "{e}");
    // Not the next one.
    refused(&layer(2), "the deltas in between are missing");
    // Another series.
    refused(&other.join(layer_name(1)), "belongs to series");
    // Corrupt: one byte of its memory changed.
    let bad = run.dir.join("bad");
    copy_dir(&layer(1), &bad);
    let pages = fs::read_dir(&bad)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("pages-")
                && fs::metadata(p).unwrap().len() > 0
        })
        .expect("the delta saved some memory");
    let f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&pages)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, 100).unwrap();
    b[0] ^= 0x55;
    f.write_all_at(&b, 100).unwrap();
    refused(&bad, "is corrupt");
    // A file gone.
    fs::remove_file(&pages).unwrap();
    refused(&bad, "is missing");
    // A file named by a path that leads out of the delta (here a host
    // file, with its right checksum): refused, the host file untouched.
    let victim = run.dir.join("victim");
    fs::write(&victim, b"host data").unwrap();
    let hostile = run.dir.join("hostile");
    copy_dir(&layer(1), &hostile);
    let mut m: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(hostile.join("manifest.json")).unwrap()).unwrap();
    m["checksums"][victim.to_str().unwrap()] = store::crc_of_file(&victim).unwrap().into();
    fs::write(
        hostile.join("manifest.json"),
        serde_json::to_vec(&m).unwrap(),
    )
    .unwrap();
    refused(&hostile, "not a plain file name");
    assert_eq!(fs::read(&victim).unwrap(), b"host data");
    // In order, each applies once.
    store::apply(&image, &layer(1)).unwrap();
    refused(&layer(1), "already at checkpoint 1");
    store::apply(&image, &layer(2)).unwrap();
    store::apply(&image, &layer(3)).unwrap();
    let m = ImageDir::new(&image).read_manifest().unwrap();
    assert_eq!(m.lineage.unwrap().epoch, 3);
    let (_, dir) = run.kill();
    let _ = fs::remove_dir_all(&dir);
}

/// Bytes a directory's files take on a tmpfs (whole pages).
fn pages_used(dir: &Path) -> u64 {
    fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.metadata().unwrap().len().div_ceil(PAGE) * PAGE)
        .sum()
}

#[test]
fn a_delta_that_does_not_fit_on_the_disk_leaves_the_last_good_image() {
    // The disk fills at every point of an apply in turn (too few bytes for
    // the new pages, the records or the other files; too few inodes): the
    // image stays exactly the checkpoint it was, loads and is accepted by
    // the next apply, which, given the space, gives the new checkpoint.
    require_root();
    let run = Churn::start("diskfull");
    let series = run.dir.join("series");
    series_with_deltas(&run, &series, 2, 11, 40);
    let (first, delta) = (series.join(layer_name(0)), series.join(layer_name(1)));
    let after = run.dir.join("after");
    copy_dir(&first, &after);
    store::apply(&after, &delta).unwrap();

    let image_bytes = pages_used(&first);
    let delta_bytes = pages_used(&delta);
    let files = fs::read_dir(&first).unwrap().count() as u64;
    let mut limits: Vec<String> = [0, 1, 2, 4, 8, 16]
        .iter()
        .map(|k| format!("size={},nr_inodes=1000", image_bytes + k * delta_bytes / 16))
        .collect();
    // Inodes: the root, the image and its files, then the directory aside
    // and some of its files.
    limits.extend((2..8).map(|k| format!("size=1g,nr_inodes={}", files + k)));
    let mut failed = 0;
    for (i, opts) in limits.iter().enumerate() {
        let small = SmallFs::mount(run.dir.join(format!("small-{i}")), opts);
        let image = small.0.join("image");
        copy_dir(&first, &image);
        match store::apply(&image, &delta) {
            Ok(_) => assert_same_memory(&image, &after),
            Err(e) => {
                failed += 1;
                assert!(e.to_string().contains("No space left"), "{opts}: {e}");
                let left: Vec<_> = fs::read_dir(&small.0)
                    .unwrap()
                    .flatten()
                    .map(|e| e.file_name())
                    .collect();
                assert_eq!(left, ["image"], "{opts}: left behind");
                let m = ImageDir::new(&image).read_manifest().unwrap();
                assert_eq!(m.lineage.unwrap().epoch, 0, "{opts}");
                rrc_ckpt::restore::load(&image)
                    .unwrap_or_else(|e| panic!("{opts}: the image no longer loads: {e}"));
                assert_same_memory(&image, &first);
            }
        }
    }
    assert!(failed >= 6, "the disk filled only {failed} times");
    let (_, dir) = run.kill();
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn a_connection_not_yet_accepted_defers_a_checkpoint_without_ending_the_series() {
    // A TCP connection waiting in a listener's queue cannot be saved: the
    // checkpoint is refused as "not now" before anything is read, and the
    // next one, once the program accepted it, is still a delta.
    require_root();
    let dir = scratch("backlog");
    let bin = build("tcp_backlog", &dir);
    let log = dir.join("fixture.log");
    let out = fs::File::create(&log).unwrap();
    let mut child = Command::new(&bin)
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .unwrap();
    let pid = Pid::from_raw(child.id() as i32);
    let said = |what: &str| {
        let mut text = String::new();
        wait_until(what, Duration::from_secs(10), || {
            text = fs::read_to_string(&log).unwrap_or_default();
            text.contains(what)
        });
        text
    };
    let port: u16 = said("PORT ")
        .lines()
        .find_map(|l| l.strip_prefix("PORT "))
        .and_then(|p| p.trim().parse().ok())
        .expect("a port");
    let mut inc = Incremental::new(IncrementalOptions {
        container: false,
        root: pid,
        aio_idle: false,
        annotations: Default::default(),
        copy: CopyMode::Direct,
    });
    let first = inc.checkpoint(&dir.join("0")).unwrap();
    assert!(first.full);
    let mut client = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    let refused = inc.checkpoint(&dir.join("1")).map(|_| ());
    // A checkpoint that kills the tree is refused the same way.
    let once = rrc_ckpt::dump::checkpoint(&rrc_ckpt::dump::CheckpointOptions {
        container: false,
        root: pid,
        aio_idle: false,
        images: &dir.join("once"),
        leave_running: false,
        annotations: Default::default(),
    })
    .map(|_| ());
    kill(pid, Signal::SIGUSR1).unwrap();
    said("ACCEPTED");
    let mut hi = String::new();
    client.read_to_string(&mut hi).unwrap();
    let again = inc.checkpoint(&dir.join("1b"));
    let alive = fs::metadata(format!("/proc/{pid}")).is_ok();
    let _ = child.kill();
    let _ = child.wait();
    let _ = fs::remove_dir_all(&dir);
    let e = refused.unwrap_err();
    assert!(matches!(e, rrc_ckpt::Error::Busy(_)), "{e}");
    assert!(
        e.to_string()
            .contains(&format!("127.0.0.1:{port} (1 waiting)")),
        "{e}"
    );
    assert!(matches!(once, Err(rrc_ckpt::Error::Busy(_))), "{once:?}");
    assert!(
        alive,
        "the refused checkpoint that would kill left the tree alone"
    );
    assert_eq!(hi, "hi\n");
    let again = again.unwrap();
    assert!(!again.full, "the series had to start over");
    assert_eq!(again.lineage.epoch, 1);
}
