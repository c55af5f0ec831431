//! The image-editing API on a real checkpoint (of the `shmem_limit`
//! fixture, left running): a working copy, typed queries and edits, a save
//! and a reload, and the original image untouched throughout.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use common::*;
use rrc_ckpt::Error;
use rrc_ckpt::dump::{CheckpointOptions, checkpoint};
use rrc_ckpt::edit::{ImageEdit, WorkingCopy};
use rrc_ckpt::image::{FileKind, ImageDir};

/// Every file of a directory, by name.
fn contents(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                fs::read(e.path()).unwrap(),
            )
        })
        .collect()
}

/// The `shmem_limit` fixture, running, and a checkpoint of it taken with
/// the fixture left running.
fn checkpointed(tag: &str) -> (Fixture, std::path::PathBuf) {
    let dir = scratch(tag);
    let bin = build("shmem_limit", &dir);
    let fx = Fixture::start(&bin, &dir, &[]);
    let images = dir.join("images");
    checkpoint(&CheckpointOptions {
        container: false,
        root: fx.pid,
        aio_idle: false,
        images: &images,
        leave_running: true,
        annotations: BTreeMap::new(),
    })
    .unwrap();
    (fx, images)
}

fn ino(p: &Path) -> u64 {
    fs::metadata(p).unwrap().ino()
}

#[test]
fn edits_are_saved_into_the_working_copy_only() {
    require_root();
    let (fx, images) = checkpointed("edit");
    let before = contents(&images);
    let pid = fx.pid.as_raw();
    let record = ImageDir::process_name(pid);

    let copy = WorkingCopy::of(&images).unwrap();
    assert_ne!(copy.path(), images.as_path());
    assert_eq!(contents(copy.path()), before);
    assert_eq!(
        ino(&copy.path().join("manifest.json")),
        ino(&images.join("manifest.json")),
        "files are hard-linked"
    );

    let mut edit = ImageEdit::open(copy.path()).unwrap();
    // Queries.
    let rings = edit.memfd_at_fd(10).expect("fd 10 is a memfd");
    assert_eq!(rings.pid, pid);
    let file_only = edit.memfd_at_fd(12).expect("fd 12 is a memfd");
    assert_ne!(rings.shmem_id, file_only.shmem_id);
    assert!(edit.memfd_at_fd(0).is_none(), "fd 0 is /dev/null");
    assert!(edit.memfd_at_fd(999).is_none());
    assert!(edit.tcp_fds(pid).is_empty());
    assert!(edit.tcp_fds(pid + 100_000).is_empty());

    // One page of a shared memory object: the counter's page.
    let page = edit.shmem_page_mut(rings.shmem_id, 0).unwrap();
    let counter = u64::from_ne_bytes(page[..8].try_into().unwrap());
    assert!(counter > 0, "the counter ran before the checkpoint");
    page[..8].copy_from_slice(&u64::MAX.to_ne_bytes());
    // The last page of the 1 MiB object is saved too.
    edit.shmem_page_mut(rings.shmem_id, 255).unwrap()[0] ^= 0xff;
    for (id, page) in [(rings.shmem_id, 256), (rings.shmem_id, u64::MAX), (999, 0)] {
        let e = edit.shmem_page_mut(id, page).unwrap_err();
        assert!(matches!(e, Error::NotInImage { .. }), "{e}");
    }

    // fd 12 becomes a deleted file with other contents.
    edit.replace_with_deleted_file(
        file_only.file_id,
        "/tmp/.rrc-edit-test",
        b"config\n".to_vec(),
    )
    .unwrap();
    let e = edit
        .replace_with_deleted_file(usize::MAX, "/tmp/x", Vec::new())
        .unwrap_err();
    assert!(matches!(e, Error::NotInImage { .. }), "{e}");

    // Threads asleep in the fixture's wait (nanosleep) are interrupted.
    let asleep: Vec<bool> = edit
        .process(pid)
        .unwrap()
        .threads
        .iter()
        .map(|t| {
            let r = t.regs.rax as i64;
            t.regs.orig_rax as i64 == libc::SYS_clock_nanosleep
                && [
                    rrc_ckpt::ptrace::ERESTARTSYS,
                    rrc_ckpt::ptrace::ERESTARTNOINTR,
                    rrc_ckpt::ptrace::ERESTARTNOHAND,
                    rrc_ckpt::ptrace::ERESTART_RESTARTBLOCK,
                    -i64::from(libc::EINTR),
                ]
                .contains(&r)
        })
        .collect();
    let interrupted = edit
        .interrupt_syscalls(pid, &[libc::SYS_clock_nanosleep, libc::SYS_nanosleep])
        .unwrap();
    assert_eq!(interrupted, asleep.iter().filter(|a| **a).count());
    assert!(edit.interrupt_syscalls(pid + 100_000, &[]).is_err());

    // Standard output and error: one log file, open once for both.
    assert_eq!(edit.output_to_restorer(pid).unwrap(), 1);
    assert_eq!(edit.output_to_restorer(pid).unwrap(), 0, "done already");

    edit.save().unwrap();
    // Nothing changed since: nothing written.
    let manifest_ino = ino(&copy.path().join("manifest.json"));
    edit.save().unwrap();
    assert_eq!(ino(&copy.path().join("manifest.json")), manifest_ino);

    // The original image is as it was, file for file.
    assert_eq!(contents(&images), before, "the original image changed");
    // What was not edited is still shared with it.
    let pages = ImageDir::new(&images).pages_file(pid);
    let pages = pages.file_name().unwrap();
    assert_eq!(ino(&copy.path().join(pages)), ino(&images.join(pages)));
    assert_eq!(
        ino(&copy.path().join(&record)) == ino(&images.join(&record)),
        interrupted == 0,
        "the process record is replaced only if it changed"
    );

    // Reloaded, the edits are there.
    let mut again = ImageEdit::open(copy.path()).unwrap();
    let page = again.shmem_page_mut(rings.shmem_id, 0).unwrap();
    assert_eq!(&page[..8], &u64::MAX.to_ne_bytes());
    let files = &again.manifest().files;
    let f = files.iter().find(|f| f.id == file_only.file_id).unwrap();
    assert_eq!(f.flags, libc::O_RDONLY as u32);
    assert!(
        matches!(&f.kind, FileKind::Regular { path, pos: 0, deleted: true, size: 7, .. } if path == "/tmp/.rrc-edit-test"),
        "{f:?}"
    );
    let img = ImageDir::new(copy.path());
    assert_eq!(
        fs::read(img.file_data(file_only.file_id)).unwrap(),
        b"config\n"
    );
    let p = again.process(pid).unwrap();
    let out = p.fds.iter().find(|f| f.fd == 1).unwrap();
    let out = files.iter().find(|f| f.id == out.file).unwrap();
    assert!(
        matches!(
            out.kind,
            FileKind::Pipe {
                write_end: true,
                ..
            }
        ),
        "{out:?}"
    );
    for (t, asleep) in p.threads.iter().zip(&asleep) {
        assert_eq!(t.regs.rax as i64 == -i64::from(libc::EINTR), *asleep);
    }
    // The rings' object is still the only changed one.
    assert_eq!(
        fs::read(img.shmem_file(file_only.shmem_id)).unwrap(),
        before[&format!("shmem-{}.img", file_only.shmem_id)]
    );
    drop(again);

    // Dropped, the copy goes; kept, it stays.
    let gone = copy.path().to_path_buf();
    drop(copy);
    assert!(!gone.exists());
    let kept = WorkingCopy::of(&images).unwrap().keep();
    assert!(kept.join("manifest.json").exists());
    fs::remove_dir_all(&kept).unwrap();

    fx.passes("shmem_limit left running by a checkpoint");
    if let Some(dir) = images.parent() {
        let _ = fs::remove_dir_all(dir);
    }
}

/// A copy of `images` whose JSON file `name` is changed by `f`.
fn corrupted(images: &Path, name: &str, f: impl FnOnce(&mut serde_json::Value)) -> WorkingCopy {
    let copy = WorkingCopy::of(images).unwrap();
    let path = copy.path().join(name);
    let mut v: serde_json::Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
    f(&mut v);
    // Replaced, not written through the hard link into the original.
    fs::remove_file(&path).unwrap();
    fs::write(&path, serde_json::to_vec(&v).unwrap()).unwrap();
    copy
}

#[test]
fn an_image_whose_records_do_not_refer_to_each_other_is_refused() {
    require_root();
    let (fx, images) = checkpointed("xref");
    let pid = fx.pid.as_raw();
    let record = ImageDir::process_name(pid);
    ImageEdit::open(&images).expect("the image as taken loads");
    let refused = |copy: WorkingCopy, needle: &str| match ImageEdit::open(copy.path()) {
        Err(Error::CorruptImage { detail, .. }) => {
            assert!(detail.contains(needle), "{detail}")
        }
        Err(e) => panic!("{needle}: {e}"),
        Ok(_) => panic!("{needle}: loaded"),
    };
    refused(
        corrupted(&images, &record, |v| v["pid"] = serde_json::json!(pid + 1)),
        "holds process",
    );
    refused(
        corrupted(&images, &record, |v| {
            v["fds"][0]["file"] = serde_json::json!(1_000_000)
        }),
        "which it does not hold",
    );
    refused(
        corrupted(&images, "manifest.json", |v| {
            v["root"] = serde_json::json!(pid + 7)
        }),
        "the root",
    );
    refused(
        corrupted(&images, "manifest.json", |v| {
            v["shmem"] = serde_json::json!([]);
        }),
        "shared memory",
    );
    refused(
        corrupted(&images, &record, |v| {
            v["parent"] = serde_json::json!(pid + 3)
        }),
        "is not before it in the tree",
    );
    // A pidfd naming a process the image does not hold would reach
    // another process once made again.
    refused(
        corrupted(&images, "manifest.json", |v| {
            v["files"][0]["kind"] = serde_json::json!({"type": "pid_fd", "pid": pid + 9});
        }),
        "is a pidfd of",
    );
    // A reaped pidfd is made again by a process that ends as its did: one
    // said to have stopped would never end, and the restore would wait.
    refused(
        corrupted(&images, "manifest.json", |v| {
            v["files"][0]["kind"] = serde_json::json!({"type": "pid_fd_reaped", "status": 0x137f});
        }),
        "which no process can end with",
    );
    // A watch on a deleted file the image does not recreate has nothing
    // to watch.
    refused(
        corrupted(&images, "manifest.json", |v| {
            v["files"][0]["kind"] = serde_json::json!({
                "type": "inotify",
                "watches": [{"wd": 1, "mask": 2, "path": "/gone", "deleted": [1, 2]}]
            });
        }),
        "has a watch 1",
    );
    // The same for a fanotify mark.
    refused(
        corrupted(&images, "manifest.json", |v| {
            v["files"][0]["kind"] = serde_json::json!({
                "type": "fanotify", "init_flags": 0, "event_flags": 0,
                "marks": [{"path": "/gone", "on": "file", "mflags": 0, "mask": 2,
                           "ignored_mask": 0, "deleted": [1, 2]}]
            });
        }),
        "has a mark on",
    );
    // Files in flight are taken from the processes holding them: one no
    // process holds cannot be passed again.
    refused(
        corrupted(&images, "manifest.json", |v| {
            v["files"][0]["kind"] = serde_json::json!({
                "type": "unix_connected", "ty": 1, "ino": 1, "peer": 0,
                "name": null, "peer_name": null, "messages": [0],
                "data": {"offset": 0, "len": 0},
                "in_flight": [{"message": 0, "files": [1_000_000]}]
            });
        }),
        "has files in flight that no process holds",
    );
    // A fanotify group for permission events would leave the processes it
    // holds waiting.
    refused(
        corrupted(&images, "manifest.json", |v| {
            v["files"][0]["kind"] = serde_json::json!({
                "type": "fanotify", "init_flags": 4, "event_flags": 0, "marks": []
            });
        }),
        "is for permission events",
    );
    drop(fx);
    let _ = fs::remove_dir_all(images.parent().expect("a scratch directory"));
}

/// A small seeded generator (xorshift64*), so that a failing run can be
/// repeated from the seed it prints.
struct Rng(u64);

impl Rng {
    /// Seeded from the clock; the seed is printed, and returned for
    /// reports, so that a failing run can be repeated.
    fn from_clock() -> (u64, Rng) {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
            | 1;
        eprintln!("mutation seed {seed}");
        (seed, Rng(seed))
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// A working copy of `images` whose file `name` is mutated once; the
/// file's text before and after.
fn mutated_copy(images: &Path, name: &str, rng: &mut Rng) -> (WorkingCopy, Vec<u8>, Vec<u8>) {
    let copy = WorkingCopy::of(images).unwrap();
    let path = copy.path().join(name);
    let text = fs::read(&path).unwrap();
    let mutated = mutate(&text, rng);
    // Removed first: the copy's files are links to the image's.
    fs::remove_file(&path).unwrap();
    fs::write(&path, &mutated).unwrap();
    (copy, text, mutated)
}

/// One mutation of a JSON record: a byte changed, a number replaced by a
/// value at a boundary, or the text cut short.
fn mutate(text: &[u8], rng: &mut Rng) -> Vec<u8> {
    let mut out = text.to_vec();
    match rng.below(3) {
        0 => {
            let at = rng.below(out.len());
            out[at] = rng.next() as u8;
        }
        1 => {
            // The digits of a random number in the text.
            let starts: Vec<usize> = (0..out.len())
                .filter(|&i| {
                    out[i].is_ascii_digit() && (i == 0 || !out[i - 1].is_ascii_alphanumeric())
                })
                .collect();
            if let Some(&s) = starts.get(rng.below(starts.len())) {
                let e = (s..out.len())
                    .find(|&i| !out[i].is_ascii_digit())
                    .unwrap_or(out.len());
                const EDGES: [&str; 8] = [
                    "0",
                    "-1",
                    "2147483648",
                    "4294967296",
                    "1099511627776",
                    "4503599627370496",
                    "9223372036854775807",
                    "18446744073709551615",
                ];
                let with = EDGES[rng.below(EDGES.len())].as_bytes();
                out.splice(s..e, with.iter().copied());
            }
        }
        _ => out.truncate(rng.below(out.len())),
    }
    out
}

/// A bounded mutation campaign over a real image: every mutated image
/// loads or is refused with an error, never a panic.
#[test]
fn a_thousand_mutated_images_load_or_are_refused_never_panic() {
    require_root();
    let (fx, images) = checkpointed("fuzz");
    let names = [
        "manifest.json".to_string(),
        ImageDir::process_name(fx.pid.as_raw()),
    ];
    let (seed, mut rng) = Rng::from_clock();
    let (mut loaded, mut refused) = (0, 0);
    for i in 0..1000 {
        let name = &names[rng.below(names.len())];
        let (copy, _text, mutated) = mutated_copy(&images, name, &mut rng);
        let r = std::panic::catch_unwind(|| ImageEdit::open(copy.path()).map(|_| ()));
        match r {
            Ok(Ok(())) => loaded += 1,
            Ok(Err(_)) => refused += 1,
            Err(_) => panic!(
                "mutation {i} of {name} (seed {seed}) panicked the load:\n{}",
                String::from_utf8_lossy(&mutated)
            ),
        }
    }
    eprintln!("1000 mutated images: {loaded} loaded, {refused} refused");
    assert!(refused > 0);
    drop(fx);
    let _ = fs::remove_dir_all(images.parent().expect("a scratch directory"));
}

/// Whether process `pid` is gone (reaped if it was our child) within 2 s.
fn gone(pid: i32) -> bool {
    use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
    let p = nix::unistd::Pid::from_raw(pid);
    for _ in 0..200 {
        match waitpid(p, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) => {}
            Ok(_) => return true,
            Err(_) => {
                if nix::sys::signal::kill(p, None).is_err() {
                    return true;
                }
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    false
}

/// Restores of mutated images that load: each is refused with an error
/// and leaves no process behind, or restores (a tree the image describes,
/// killed at once); never a panic.
#[test]
fn mutated_images_that_load_restore_or_are_refused_cleanly() {
    require_root();
    let dir = scratch("rfuzz");
    let bin = build("shmem_limit", &dir);
    let mut fx = Fixture::start(&bin, &dir, &[]);
    let images = dir.join("images");
    checkpoint(&CheckpointOptions {
        container: false,
        root: fx.pid,
        aio_idle: false,
        images: &images,
        leave_running: false,
        annotations: BTreeMap::new(),
    })
    .unwrap();
    fx.reap_killed();
    let pid = fx.pid.as_raw();
    let names = ["manifest.json".to_string(), ImageDir::process_name(pid)];
    let (seed, mut rng) = Rng::from_clock();
    let (mut restored, mut refused, mut tried) = (0, 0, 0);
    let mut i = 0;
    while tried < 150 && i < 3000 {
        i += 1;
        let name = &names[rng.below(names.len())];
        let (copy, text, mutated) = mutated_copy(&images, name, &mut rng);
        if rrc_ckpt::restore::load(copy.path()).is_err() {
            continue;
        }
        tried += 1;
        let r = std::panic::catch_unwind(|| {
            rrc_ckpt::restore::restore(&rrc_ckpt::restore::RestoreOptions::tree(copy.path()))
        });
        match r {
            Ok(Ok(done)) => {
                restored += 1;
                let _ = nix::sys::signal::kill(done.root, nix::sys::signal::Signal::SIGKILL);
                let _ = nix::sys::wait::waitpid(done.root, None);
            }
            Ok(Err(e)) => {
                refused += 1;
                let at = text
                    .iter()
                    .zip(&mutated)
                    .position(|(a, b)| a != b)
                    .unwrap_or(text.len().min(mutated.len()));
                let near = |t: &[u8]| {
                    String::from_utf8_lossy(&t[at.saturating_sub(60)..(at + 60).min(t.len())])
                        .into_owned()
                };
                assert!(
                    gone(pid),
                    "mutation {i} of {name} (seed {seed}): a refused restore ({e}) left process {pid} behind; at byte {at}, {:?} became {:?}",
                    near(&text),
                    near(&mutated)
                );
            }
            Err(_) => panic!(
                "mutation {i} of {name} (seed {seed}) panicked the restore:\n{}",
                String::from_utf8_lossy(&mutated)
            ),
        }
    }
    eprintln!("{tried} mutated images that load: {restored} restored, {refused} refused");
    assert!(tried >= 100, "only {tried} mutated images loaded");
    let _ = fs::remove_dir_all(&dir);
}

/// Checkpoints fixture `name` (killed); its image directory and pid.
fn image_of(name: &str, aio_idle: bool) -> (PathBuf, PathBuf, i32) {
    let dir = scratch(name);
    let bin = build(name, &dir);
    let mut fx = Fixture::start(&bin, &dir, &[]);
    let images = dir.join("images");
    checkpoint(&CheckpointOptions {
        container: false,
        root: fx.pid,
        aio_idle,
        images: &images,
        leave_running: false,
        annotations: BTreeMap::new(),
    })
    .unwrap();
    fx.reap_killed();
    (dir, images, fx.pid.as_raw())
}

/// A copy of `images` whose record `name` `edit` changed must be refused
/// when loaded, before anything is made, naming the image as corrupt.
fn refused_when(images: &Path, name: &str, what: &str, edit: impl Fn(&mut serde_json::Value)) {
    let copy = WorkingCopy::of(images).unwrap();
    let path = copy.path().join(name);
    let mut v: serde_json::Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
    edit(&mut v);
    fs::remove_file(&path).unwrap();
    fs::write(&path, serde_json::to_vec(&v).unwrap()).unwrap();
    match rrc_ckpt::restore::load(copy.path()) {
        Err(Error::CorruptImage { .. }) => {}
        other => panic!("{what}: loaded as {:?}", other.map(|_| ())),
    }
}

/// AIO rings and pseudo-terminals that are not what the kernel makes, or
/// that name what the image does not hold, are refused at load.
#[test]
fn hostile_aio_rings_and_pseudo_terminals_are_refused_before_anything_is_made() {
    require_root();
    let (dir, images, pid) = image_of("aio", true);
    let process = ImageDir::process_name(pid);
    let ring = |v: &mut serde_json::Value| -> serde_json::Value {
        let vmas = v["vmas"].as_array_mut().unwrap();
        let at = vmas
            .iter()
            .position(|m| m["kind"]["type"] == "aio_ring" && m["kind"]["events"] != "")
            .expect("a ring with events pending");
        vmas[at]["kind"].take()
    };
    let with_ring = |f: fn(&mut serde_json::Value)| {
        move |v: &mut serde_json::Value| {
            let mut kind = ring(v);
            f(&mut kind);
            let vmas = v["vmas"].as_array_mut().unwrap();
            let at = vmas.iter().position(|m| m["kind"].is_null()).unwrap();
            vmas[at]["kind"] = kind;
        }
    };
    refused_when(
        &images,
        &process,
        "a ring bigger than its mapping",
        with_ring(|k| k["nr"] = (k["nr"].as_u64().unwrap() + 1).into()),
    );
    refused_when(
        &images,
        &process,
        "a head out of the ring",
        with_ring(|k| k["head"] = k["nr"].clone()),
    );
    refused_when(
        &images,
        &process,
        "events missing",
        with_ring(|k| {
            let e = k["events"].as_str().unwrap();
            k["events"] = e[..e.len() - 64].into()
        }),
    );
    refused_when(
        &images,
        &process,
        "an id past any table",
        with_ring(|k| k["id"] = 1_000_000.into()),
    );
    let _ = fs::remove_dir_all(&dir);
    // The fixture was killed by the checkpoint, before it removed its file.
    let _ = fs::remove_file(format!("/tmp/fx_aio.{pid}"));

    let (dir, images, _) = image_of("pty_raw", false);
    refused_when(
        &images,
        "manifest.json",
        "settings of the wrong size",
        |m| {
            let t = m["ptys"][0]["termios"].as_str().unwrap().to_string();
            m["ptys"][0]["termios"] = t[2..].into();
        },
    );
    refused_when(
        &images,
        "manifest.json",
        "a session no process leads",
        |m| {
            m["ptys"][0]["session"] = 4_000_000.into();
        },
    );
    refused_when(
        &images,
        "manifest.json",
        "an end of a pair it does not hold",
        |m| {
            let files = m["files"].as_array_mut().unwrap();
            let f = files
                .iter_mut()
                .find(|f| f["kind"]["type"] == "pty_master")
                .expect("a master");
            f["kind"]["pty"] = 9.into();
        },
    );
    let _ = fs::remove_dir_all(&dir);
}

/// The name of the process record of `images` that has field `field`.
fn record_with(images: &Path, field: &str) -> String {
    fs::read_dir(images)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| {
            n.starts_with("process-")
                && serde_json::from_slice::<serde_json::Value>(&fs::read(images.join(n)).unwrap())
                    .unwrap()
                    .get(field)
                    .is_some()
        })
        .unwrap_or_else(|| panic!("no process record has {field}"))
}

/// Unmounts what the `mntns_own` fixture (root `pid`) and a test of its
/// image mounted on the host, and removes its directory.
struct MountsOf(String);

impl Drop for MountsOf {
    fn drop(&mut self) {
        for m in ["shared/x", "shared", "a", "b"] {
            let _ = std::process::Command::new("umount")
                .args(["-l", &format!("{}/{m}", self.0)])
                .stderr(std::process::Stdio::null())
                .status();
        }
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Whether the host has a mount at `path`.
fn host_mount_at(path: &str) -> bool {
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(path))
}

/// Mount steps an image gives are checked at load, and at a restore each
/// step's path must lead where it says without a link and may not lie
/// under a mount shared with the host's: nothing an image says reaches
/// the host's mounts.
#[test]
fn hostile_mount_steps_are_refused_and_never_reach_the_hosts_mounts() {
    require_root();
    let (dir, images, root) = image_of("mntns_own", false);
    let base = format!("/tmp/fx_mntns.{root}");
    let _mounts = MountsOf(base.clone());
    let process = record_with(&images, "own_mounts");
    let step = |kind: &'static str, fs: Option<&'static str>| {
        move |v: &serde_json::Value| {
            v["own_mounts"]["ops"]
                .as_array()
                .unwrap()
                .iter()
                .position(|o| o["op"] == kind && fs.is_none_or(|f| o["fs"] == f))
                .unwrap()
        }
    };
    let tmpfs = step("tmpfs", None);
    let proc = step("namespaced", Some("proc"));
    let queues = step("namespaced", Some("mqueue"));
    refused_when(&images, &process, "a path climbing out", |v| {
        v["own_mounts"]["ops"][0]["path"] = "/tmp/../etc".into()
    });
    refused_when(&images, &process, "tmpfs options not carried", |v| {
        let n = tmpfs(v);
        v["own_mounts"]["ops"][n]["options"] = "size=1m,mpol=bind".into()
    });
    refused_when(&images, &process, "a file beyond the data", |v| {
        let n = tmpfs(v);
        let entries = v["own_mounts"]["ops"][n]["entries"].as_array_mut().unwrap();
        let f = entries
            .iter_mut()
            .find(|e| e["kind"]["kind"] == "file")
            .unwrap();
        f["kind"]["len"] = (1u64 << 40).into();
    });
    refused_when(&images, &process, "a name with a slash", |v| {
        let n = tmpfs(v);
        v["own_mounts"]["ops"][n]["entries"][0]["path"] = "../../etc".into()
    });
    refused_when(&images, &process, "proc made by the root", |v| {
        let n = proc(v);
        v["own_mounts"]["ops"][n]["by"] = root.into()
    });
    refused_when(&images, &process, "a queue file system with options", |v| {
        let n = queues(v);
        v["own_mounts"]["ops"][n]["options"] = "size=1".into()
    });
    refused_when(&images, &process, "devpts options not carried", |v| {
        v["own_mounts"]["ops"] = serde_json::json!([
            {"op": "devpts", "target": "/tmp", "flags": [], "options": "mode=620,size=1"}
        ])
    });

    // A mount shared with the host's, and a link to it.
    let shared = format!("{base}/shared");
    fs::create_dir(&shared).unwrap();
    let ok = |args: &[&str]| {
        assert!(
            std::process::Command::new(args[0])
                .args(&args[1..])
                .status()
                .unwrap()
                .success(),
            "{args:?}"
        )
    };
    ok(&["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", &shared]);
    ok(&["mount", "--make-shared", &shared]);
    fs::create_dir(format!("{shared}/x")).unwrap();
    std::os::unix::fs::symlink(&shared, format!("{base}/link")).unwrap();
    let new_tmpfs = |target: &str| {
        serde_json::json!([{
            "op": "tmpfs", "target": target, "flags": [], "options": "size=64k", "dev": 1,
            "root": {"path": "", "kind": {"kind": "dir"}, "mode": 0o755, "uid": 0, "gid": 0,
                     "mtime": [0, 0]},
            "entries": []
        }])
    };
    for (target, why) in [
        (format!("{shared}/x"), "under a mount shared"),
        (format!("{base}/link/x"), "without following links"),
    ] {
        let copy = WorkingCopy::of(&images).unwrap();
        let path = copy.path().join(&process);
        let mut v: serde_json::Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
        v["own_mounts"]["ops"] = new_tmpfs(&target);
        fs::remove_file(&path).unwrap();
        fs::write(&path, serde_json::to_vec(&v).unwrap()).unwrap();
        match rrc_ckpt::restore::restore(&rrc_ckpt::restore::RestoreOptions::tree(copy.path())) {
            Err(e) => assert!(e.to_string().contains(why), "{target}: {e}"),
            Ok(done) => {
                let _ = nix::sys::signal::kill(done.root, nix::sys::signal::Signal::SIGKILL);
                panic!("{target}: restored");
            }
        }
        assert!(
            !host_mount_at(&format!("{shared}/x")),
            "{target}: the host got a mount"
        );
    }
    let _ = fs::remove_dir_all(&dir);
}

/// A network namespace's interfaces, addresses, routes and rules are
/// checked at load: nothing an image says reaches `ip` or `nft` unchecked.
#[test]
fn hostile_network_namespaces_are_refused_before_anything_is_made() {
    require_root();
    let (dir, images, _) = image_of("netns_routes", false);
    let process = record_with(&images, "own_net");
    let net = |v: &mut serde_json::Value| -> serde_json::Value { v["own_net"].take() };
    type Edit = fn(&mut serde_json::Value);
    let edits: [(&str, Edit); 17] = [
        ("a next hop through an interface it does not have", |n| {
            let r = &mut n["routes"][0];
            (r["dev"], r["gateway"]) = (serde_json::Value::Null, serde_json::Value::Null);
            r["nexthops"] = serde_json::json!([{"dev": "eth9", "weight": 1}]);
        }),
        ("a next hop of no weight", |n| {
            let r = &mut n["routes"][0];
            (r["dev"], r["gateway"]) = (serde_json::Value::Null, serde_json::Value::Null);
            r["nexthops"] = serde_json::json!([{"dev": "lo", "weight": 0}]);
        }),
        ("a routing rule's protocol named like an option", |n| {
            n["rules"] = serde_json::json!([
                {"ipv6": false, "priority": 5, "ipproto": "-evil", "action": {"table": 100}}
            ])
        }),
        ("a routing rule's uid range going back", |n| {
            n["rules"] = serde_json::json!([
                {"ipv6": false, "priority": 5, "uids": [10, 1], "action": {"table": 100}}
            ])
        }),
        ("a route in the local table", |n| {
            n["routes"][0]["table"] = 255.into()
        }),
        ("a route's protocol named like an option", |n| {
            n["routes"][0]["protocol"] = "-evil".into()
        }),
        ("a routing rule on an interface it does not have", |n| {
            n["rules"] = serde_json::json!([
                {"ipv6": false, "priority": 5, "iif": "eth9", "action": {"table": 100}}
            ])
        }),
        ("a routing rule going back", |n| {
            n["rules"] = serde_json::json!([
                {"ipv6": false, "priority": 5, "action": {"goto": 1}}
            ])
        }),
        ("a routing rule of the other family", |n| {
            n["rules"] = serde_json::json!([
                {"ipv6": true, "priority": 5, "from": ["10.0.0.0", 8], "action": "prohibit"}
            ])
        }),
        ("rules that include a file", |n| {
            n["nftables"] = "include \"/etc/shadow\"\n".into()
        }),
        ("a veth named like an option", |n| {
            n["veths"][0][0]["name"] = "-evil".into()
        }),
        ("a veth named twice", |n| {
            n["veths"][0][1]["name"] = n["veths"][0][0]["name"].clone()
        }),
        ("an address on an interface it does not have", |n| {
            n["addresses"][0]["dev"] = "eth9".into()
        }),
        ("a prefix too long", |n| {
            n["addresses"][0]["prefix"] = 33.into()
        }),
        ("a route through an interface it does not have", |n| {
            n["routes"][0]["dev"] = "eth9".into()
        }),
        ("a setting outside the network's", |n| {
            n["sysctls"]["../../kernel/core_pattern"] = "|/tmp/x".into()
        }),
        ("a setting with a line of its own", |n| {
            n["sysctls"]["net/core/somaxconn"] = "1\n2".into()
        }),
    ];
    for (what, edit) in edits {
        refused_when(&images, &process, what, |v| {
            let mut n = net(v);
            edit(&mut n);
            v["own_net"] = n;
        });
    }
    // The same rules, well made, load: the ones above are refused for
    // what they say.
    let copy = corrupted(&images, &process, |v| {
        v["own_net"]["rules"] = serde_json::json!([
            {"ipv6": false, "priority": 5, "iif": "lo", "action": {"table": 100}},
            {"ipv6": false, "priority": 6, "action": {"goto": 7}},
            {"ipv6": true, "priority": 8, "from": ["fd00::", 8], "action": "prohibit"}
        ])
    });
    rrc_ckpt::restore::load(copy.path()).expect("well-made rules load");
    let copy = corrupted(&images, &process, |v| {
        let r = &mut v["own_net"]["routes"][0];
        (r["dev"], r["gateway"]) = (serde_json::Value::Null, serde_json::Value::Null);
        r["nexthops"] =
            serde_json::json!([{"dev": "lo", "weight": 1}, {"dev": "lo", "weight": 256}]);
    });
    rrc_ckpt::restore::load(copy.path()).expect("a well-made multipath route loads");
    let _ = fs::remove_dir_all(&dir);
}

/// Veths to the checkpointer's network namespace are checked at load:
/// their peers, made in the restorer's, get only names, addresses and
/// routes of their own (nothing another interface of the host has, no
/// route in the kernel's table), and only for a namespace whose maker's
/// parent is in the restorer's, in a tree restored there.
#[test]
fn hostile_veths_to_the_host_are_refused_before_anything_is_made() {
    require_root();
    let (dir, images, pid) = image_of("netns_veth_host", false);
    let left = Leftovers {
        bridge: Some(format!("fxb{pid}")),
        images: images.clone(),
    };
    let process = record_with(&images, "own_net");
    type Edit = fn(&mut serde_json::Value);
    let edits: [(&str, Edit); 9] = [
        ("a peer named like an option", |n| {
            n["host_veths"][0]["peer"]["name"] = "-evil".into()
        }),
        ("an end named as the loopback", |n| {
            n["host_veths"][0]["end"]["name"] = "lo".into()
        }),
        ("two peers of one name", |n| {
            n["host_veths"][1]["peer"]["name"] = n["host_veths"][0]["peer"]["name"].clone()
        }),
        ("a bridge named like an option", |n| {
            n["host_veths"][1]["bridge"] = "-evil".into()
        }),
        ("a peer's address on another interface of the host", |n| {
            n["host_veths"][0]["peer_addresses"][0]["dev"] = "eth0".into()
        }),
        (
            "a peer's route through another interface of the host",
            |n| n["host_veths"][0]["peer_routes"][0]["dev"] = "eth0".into(),
        ),
        (
            "a peer's route with next hops through other interfaces of the host",
            |n| {
                n["host_veths"][0]["peer_routes"][0]["nexthops"] =
                    serde_json::json!([{"dev": "eth0", "weight": 1}, {"dev": "eth1", "weight": 1}])
            },
        ),
        ("a peer's route in the local table", |n| {
            n["host_veths"][0]["peer_routes"][0]["table"] = 255.into()
        }),
        ("a peer's MTU the kernel refuses", |n| {
            n["host_veths"][0]["peer"]["mtu"] = 0.into()
        }),
    ];
    for (what, edit) in edits {
        refused_when(&images, &process, what, |v| edit(&mut v["own_net"]));
    }
    // The root in a namespace the restore makes: its child's peers would
    // be there, not in the restorer's.
    refused_when(
        &images,
        &ImageDir::process_name(pid),
        "a veth to the restorer's from a namespace below another",
        |v| v["own_net"] = serde_json::json!({"lo_up": true}),
    );
    // A bridge gone since: the restore fails naming it, and the peer it
    // made before it found out goes again.
    let _ = std::process::Command::new("ip")
        .args(["link", "del", &format!("fxb{pid}")])
        .status();
    match rrc_ckpt::restore::restore(&rrc_ckpt::restore::RestoreOptions::tree(&images)) {
        Err(e) => assert!(
            e.to_string().contains("which this network namespace"),
            "{e}"
        ),
        Ok(done) => {
            let _ = nix::sys::signal::kill(done.root, nix::sys::signal::Signal::SIGKILL);
            panic!("restored without its bridge");
        }
    }
    let links = std::process::Command::new("ip")
        .args(["-o", "link", "show"])
        .output()
        .unwrap();
    let links = String::from_utf8_lossy(&links.stdout);
    assert!(
        !links.contains(&format!("fxh{pid}"))
            && !links.contains(&format!("rrc{:x}.", std::process::id())),
        "a failed restore left interfaces: {links}"
    );
    // A tree restored in a network namespace of its own (a container's)
    // has none: refused before anything is made.
    let mut opts = rrc_ckpt::restore::RestoreOptions::tree(&images);
    opts.root_flags = libc::CLONE_NEWNET as u64;
    match rrc_ckpt::restore::restore(&opts) {
        Err(e) => assert!(
            e.to_string().contains("in a tree restored in a new one"),
            "{e}"
        ),
        Ok(done) => {
            let _ = nix::sys::signal::kill(done.root, nix::sys::signal::Signal::SIGKILL);
            panic!("restored into a network namespace of its own");
        }
    }
    drop(left);
    let _ = fs::remove_dir_all(&dir);
}

/// Veths between the tree's network namespaces are made only as pairs
/// both of whose ends the image records, each in its own namespace.
#[test]
fn hostile_veths_between_the_trees_namespaces_are_refused_before_anything_is_made() {
    require_root();
    let (dir, images, root) = image_of("netns_veth_tree", false);
    let left = Leftovers {
        bridge: None,
        images: images.clone(),
    };
    let process = record_with(&images, "own_net");
    type Edit = fn(&mut serde_json::Value, i32);
    let edits: [(&str, Edit); 4] = [
        ("a peer in its own namespace", |v, _| {
            let veth = &mut v["own_net"]["tree_veths"][0];
            veth["peer_index"] = veth["end"]["index"].clone();
            v["own_net"]["tree_veths"][0]["peer_ns"] = v["pid"].clone();
        }),
        ("a peer at another index", |v, _| {
            v["own_net"]["tree_veths"][0]["peer_index"] = 77.into()
        }),
        (
            "a peer in a namespace the restore does not make",
            |v, root| v["own_net"]["tree_veths"][0]["peer_ns"] = root.into(),
        ),
        ("a second end of the same pair", |v, _| {
            let veths = &mut v["own_net"]["tree_veths"];
            let mut twin = veths[0].clone();
            twin["end"]["name"] = "fxtwin".into();
            twin["end"]["index"] = 9.into();
            veths.as_array_mut().unwrap().push(twin);
        }),
    ];
    for (what, edit) in edits {
        refused_when(&images, &process, what, |v| edit(v, root));
    }
    drop(left);
    let _ = fs::remove_dir_all(&dir);
}

/// What an image never restored leaves on the host: the lock holding its
/// connections still, and a bridge its fixture made.
struct Leftovers {
    bridge: Option<String>,
    images: PathBuf,
}

impl Drop for Leftovers {
    fn drop(&mut self) {
        if let Some(bridge) = &self.bridge {
            let _ = std::process::Command::new("ip")
                .args(["link", "del", bridge])
                .status();
        }
        let manifest = fs::read(self.images.join("manifest.json")).unwrap_or_default();
        let lock = serde_json::from_slice::<serde_json::Value>(&manifest)
            .ok()
            .and_then(|m| m["net_lock"].as_str().map(str::to_string));
        if let Some(table) = lock {
            let _ = rrc_ckpt::netlock::unlock(&table);
        }
    }
}

/// TUN/TAP interfaces and files are checked at load: a file is attached
/// only to an interface of a network namespace the restore makes, never
/// to one of the host's, and an interface is made only as the kernel
/// could have made it.
#[test]
fn hostile_tun_interfaces_and_files_are_refused_before_anything_is_made() {
    require_root();
    let (dir, images, _) = image_of("netns_tun", false);
    let process = record_with(&images, "own_net");
    type Edit = fn(&mut serde_json::Value);
    let in_net: [(&str, Edit); 5] = [
        ("an interface named like an option", |n| {
            n["tuns"][0]["name"] = "-evil".into()
        }),
        ("an interface named as a veth", |n| {
            n["tuns"][0]["name"] = "lo".into()
        }),
        ("an MTU the kernel refuses", |n| {
            n["tuns"][0]["mtu"] = 0.into()
        }),
        ("an owner that is none", |n| {
            n["tuns"][0]["owner"] = u32::MAX.into()
        }),
        ("a TUN interface with a MAC", |n| {
            let tun = (n["tuns"].as_array_mut().unwrap().iter_mut())
                .find(|t| t["tap"] == false)
                .unwrap();
            tun["mac"] = serde_json::json!([2, 0, 0, 0, 0, 1]);
        }),
    ];
    for (what, edit) in in_net {
        refused_when(&images, &process, what, |v| edit(&mut v["own_net"]));
    }
    refused_when(
        &images,
        &process,
        "a file in a namespace the tree did not make",
        |v| v["own_net"] = serde_json::Value::Null,
    );
    let in_manifest: [(&str, Edit); 4] = [
        ("a file of an interface of the host's", |f| {
            f["iface"] = "eth0".into()
        }),
        ("a file of another device, a disk's", |f| {
            f["path"] = "/dev/sda".into();
            f["rdev"] = 0x800.into();
        }),
        ("a file of a TAP interface as a TUN one", |f| {
            f["flags"] = (f["flags"].as_u64().unwrap() ^ 3).into()
        }),
        ("a file with flags the restore does not make", |f| {
            f["flags"] = (f["flags"].as_u64().unwrap() | 0x4000).into()
        }),
    ];
    for (what, edit) in in_manifest {
        refused_when(&images, "manifest.json", what, |m| {
            let files = m["files"].as_array_mut().unwrap();
            let tun = files
                .iter_mut()
                .find(|f| f["kind"]["type"] == "tun")
                .unwrap();
            edit(&mut tun["kind"]);
        });
    }
    let _ = fs::remove_dir_all(&dir);
}

/// The process records of `images`: each file's name and contents.
fn process_records(images: &Path) -> Vec<(String, serde_json::Value)> {
    fs::read_dir(images)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("process-"))
        .map(|n| {
            let v = serde_json::from_slice(&fs::read(images.join(&n)).unwrap()).unwrap();
            (n, v)
        })
        .collect()
}

/// Pid namespaces of user namespaces are made only as a restore can: the
/// first process of one pid 1 there, each process in it born in that user
/// namespace with the first one's groups.
#[test]
fn hostile_pid_namespaces_of_user_namespaces_are_refused_before_anything_is_made() {
    require_root();
    let (dir, images, _) = image_of("userns_pidns", false);
    let records = process_records(&images);
    let find = |nested: i64| {
        (records.iter())
            .find(|(_, v)| v["nested_pids"] == serde_json::json!([nested]))
            .map(|(n, _)| n.clone())
            .unwrap()
    };
    // a (pid 1 there, or v) and b (pid 2 there).
    let (first, member) = (find(1), find(2));
    type Edit = fn(&mut serde_json::Value);
    let on_first: [(&str, Edit); 2] = [
        ("a first process in no user namespace", |p| {
            p["user_ns"] = serde_json::Value::Null
        }),
        ("a first process that is not pid 1", |p| {
            p["nested_pids"] = serde_json::json!([4]);
            p["threads"][0]["nested_tids"] = serde_json::json!([4]);
        }),
    ];
    for (what, edit) in on_first {
        refused_when(&images, &first, what, edit);
    }
    let on_member: [(&str, Edit); 3] = [
        ("a member of another user namespace", |p| {
            p["user_ns"] = (1 - p["user_ns"].as_u64().unwrap()).into()
        }),
        ("a member with other groups", |p| {
            p["creds"]["groups"] = serde_json::json!([0, 4242])
        }),
        ("a member that claims the namespace too", |p| {
            p["user_owned"] = serde_json::json!(["pid"])
        }),
    ];
    for (what, edit) in on_member {
        refused_when(&images, &member, what, edit);
    }
    // The root's pid outside its namespace, which a restore asks for:
    // only of a tree that is a pid namespace, and a pid.
    let on_manifest: [(&str, Edit); 3] = [
        ("an outer pid of a tree in ours", |m| {
            m["outer_pid"] = 4242.into()
        }),
        ("an outer pid 0", |m| {
            m["own_pid_ns"] = true.into();
            m["outer_pid"] = 0.into()
        }),
        ("an outer pid past the highest", |m| {
            m["own_pid_ns"] = true.into();
            m["outer_pid"] = (1i64 << 23).into()
        }),
    ];
    for (what, edit) in on_manifest {
        refused_when(&images, "manifest.json", what, edit);
    }
    let _ = fs::remove_dir_all(&dir);
}

/// Time namespaces of user namespaces are made only as a restore can: by
/// a process in the user namespace that makes them, whose children it
/// forks there.
#[test]
fn hostile_time_namespaces_of_user_namespaces_are_refused_before_anything_is_made() {
    require_root();
    let (dir, images, _) = image_of("userns_timens", false);
    let records = process_records(&images);
    // u, whose children's time namespace its user namespace owns, and g,
    // its child there.
    let (u, u_pid) = (records.iter())
        .find(|(_, v)| !v["children_time_ns"].is_null())
        .map(|(n, v)| (n.clone(), v["pid"].clone()))
        .unwrap();
    let g = (records.iter())
        .find(|(_, v)| v["parent"] == u_pid)
        .map(|(n, _)| n.clone())
        .unwrap();
    type Edit = fn(&mut serde_json::Value);
    let on_u: [(&str, Edit); 2] = [
        ("a maker in no user namespace", |p| {
            p["user_ns"] = serde_json::Value::Null
        }),
        ("a maker that makes no time namespace", |p| {
            p["children_time_ns"] = serde_json::Value::Null
        }),
    ];
    for (what, edit) in on_u {
        refused_when(&images, &u, what, edit);
    }
    let on_g: [(&str, Edit); 3] = [
        ("a child claiming a namespace it does not make", |p| {
            p["user_owned"] = serde_json::json!(["time"])
        }),
        ("a child in another session", |p| p["sid"] = 1.into()),
        ("a child in its parent's own time namespace", |p| {
            p.as_object_mut().unwrap().remove("time_ns");
        }),
    ];
    for (what, edit) in on_g {
        refused_when(&images, &g, what, edit);
    }
    let _ = fs::remove_dir_all(&dir);
}

/// User namespaces whose maps the kernel would refuse, or that leave a
/// process's ids unmapped, or a process in one that a restore could not
/// put there, are refused at load.
#[test]
fn hostile_user_namespaces_are_refused_before_anything_is_made() {
    require_root();
    let (dir, images, _) = image_of("userns_own", false);
    let process = record_with(&images, "user_ns");
    type Edit = fn(&mut serde_json::Value);
    let in_manifest: [(&str, Edit); 6] = [
        ("nested in itself", |m| {
            m["user_namespaces"][0]["parent"] = 0.into()
        }),
        ("no uid ranges", |m| {
            m["user_namespaces"][0]["uid_map"] = serde_json::json!([])
        }),
        ("an empty range", |m| {
            m["user_namespaces"][0]["gid_map"][0]["count"] = 0.into()
        }),
        ("a range that wraps", |m| {
            m["user_namespaces"][0]["uid_map"][0]["outside"] = u32::MAX.into()
        }),
        ("overlapping ranges", |m| {
            let r = m["user_namespaces"][0]["uid_map"][0].clone();
            m["user_namespaces"][0]["uid_map"]
                .as_array_mut()
                .unwrap()
                .push(r)
        }),
        ("maps that leave the process's ids out", |m| {
            for map in ["uid_map", "gid_map"] {
                m["user_namespaces"][0][map] =
                    serde_json::json!([{"inside": 0, "outside": 7777, "count": 1}]);
            }
        }),
    ];
    for (what, edit) in in_manifest {
        refused_when(&images, "manifest.json", what, edit);
    }
    let in_process: [(&str, Edit); 3] = [
        ("a namespace the image does not have", |p| {
            p["user_ns"] = 9.into()
        }),
        ("two threads in one, in a nested pid namespace", |p| {
            let mut th = p["threads"][0].clone();
            th["tid"] = (th["tid"].as_i64().unwrap() + 1).into();
            th["nested_tids"] = serde_json::json!([2]);
            p["threads"].as_array_mut().unwrap().push(th)
        }),
        ("a zombie in one", |p| {
            p["zombie"] = serde_json::json!({"type": "code", "code": 0})
        }),
    ];
    for (what, edit) in in_process {
        refused_when(&images, &process, what, edit);
    }
    let _ = fs::remove_dir_all(&dir);
}
