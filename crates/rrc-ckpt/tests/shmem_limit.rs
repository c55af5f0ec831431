//! Shared memory objects saved only up to a limit, and the hook run while
//! the tree is stopped, on the `shmem_limit` fixture: two memfds limited
//! to their first page (one mapped, one open only as a file), one whole,
//! and a counter running in the first page of the mapped limited one.

mod common;

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;

use common::*;
use rrc_ckpt::dump::{CheckpointOptions, Extras, ShmemLimit, checkpoint_with};
use rrc_ckpt::image::{ImageDir, Manifest, SharedMemory};
use rrc_ckpt::incremental::{CopyMode, Incremental, IncrementalOptions};
use serde_json::json;

const PAGE: u64 = 4096;
const MIB: u64 = 1 << 20;

/// The memfd at descriptor `fd` of `pid`, held open, and its limit.
fn limit_of(pid: nix::unistd::Pid, fd: i32, keep: u64) -> (File, ShmemLimit) {
    let f = File::open(format!("/proc/{pid}/fd/{fd}")).unwrap();
    let m = f.metadata().unwrap();
    let limit = ShmemLimit {
        dev: m.dev(),
        ino: m.ino(),
        keep,
    };
    (f, limit)
}

fn object<'a>(m: &'a Manifest, l: &ShmemLimit) -> &'a SharedMemory {
    m.shmem
        .iter()
        .find(|o| o.dev == l.dev && o.ino == l.ino)
        .expect("the object is in the image")
}

/// The counter (first 8 bytes) of a saved object.
fn saved_counter(images: &Path, id: usize) -> u64 {
    let data = std::fs::read(ImageDir::new(images).shmem_file(id)).unwrap();
    u64::from_ne_bytes(data[..8].try_into().unwrap())
}

/// Checks what an image holds of the three objects: the limited ones one
/// page each (size kept), the other whole.
fn check_saved(images: &Path, m: &Manifest, limited: &[ShmemLimit], whole: &ShmemLimit) {
    let img = ImageDir::new(images);
    for (l, size) in limited.iter().zip([MIB, 256 * 1024]) {
        let o = object(m, l);
        assert_eq!(o.size, size, "a limited object keeps its size");
        let saved: u64 = o.pages.iter().map(|r| r.count).sum();
        assert_eq!(saved, 1, "only the first page of {o:?}");
        assert_eq!(o.pages[0].start, 0);
        let len = std::fs::metadata(img.shmem_file(o.id)).unwrap().len();
        assert_eq!(len, PAGE);
    }
    let o = object(m, whole);
    assert_eq!(o.size, MIB);
    assert_eq!(o.pages.iter().map(|r| r.count).sum::<u64>(), MIB / PAGE);
}

#[test]
fn limited_objects_restore_their_first_page_and_zeros() {
    require_root();
    let dir = scratch("limit");
    let bin = build("shmem_limit", &dir);
    // Restored from a limited checkpoint, the fixture expects zeros after
    // the first pages.
    let mut fx = Fixture::start(&bin, &dir, &[("FX_SHMEM_LIMITED", "1")]);
    let (counter, mapped) = limit_of(fx.pid, 10, 100);
    let (_f, whole) = limit_of(fx.pid, 11, 0);
    let (_g, file_only) = limit_of(fx.pid, 12, PAGE);
    let whole = ShmemLimit {
        keep: u64::MAX,
        ..whole
    };
    let images = dir.join("images");
    let mut calls = 0;
    let mut seen = 0;
    let mut hook = || {
        calls += 1;
        let mut b = [0u8; 8];
        counter.read_exact_at(&mut b, 0).unwrap();
        seen = u64::from_ne_bytes(b);
        BTreeMap::from([
            ("counter".to_string(), json!(seen)),
            ("who".to_string(), json!("hook")),
        ])
    };
    checkpoint_with(
        &CheckpointOptions {
            container: false,
            root: fx.pid,
            aio_idle: false,
            images: &images,
            leave_running: false,
            annotations: BTreeMap::from([
                ("who".to_string(), json!("caller")),
                ("kept".to_string(), json!(1)),
            ]),
        },
        Extras::new()
            .shmem_limits(vec![mapped, file_only, whole])
            .at_freeze(&mut hook),
    )
    .unwrap();
    assert_eq!(calls, 1, "the hook runs once per checkpoint");
    fx.reap_killed();
    let m = ImageDir::new(&images).read_manifest().unwrap();
    assert_eq!(m.annotations["who"], json!("hook"), "the hook's keys win");
    assert_eq!(m.annotations["kept"], json!(1));
    assert_eq!(m.annotations["counter"], json!(seen));
    // The counter never stops but while the tree does: what the hook read
    // is what the checkpoint saved.
    assert!(seen > 0);
    assert_eq!(saved_counter(&images, object(&m, &mapped).id), seen);
    check_saved(&images, &m, &[mapped, file_only], &whole);
    fx.restore(&images);
    fx.passes("shmem_limit after a limited checkpoint and restore");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn every_checkpoint_of_a_series_is_limited_and_calls_the_hook_once() {
    require_root();
    rrc_ckpt::incremental::check_supported().unwrap();
    let dir = scratch("series");
    let bin = build("shmem_limit", &dir);
    // Left running, the original keeps everything.
    let fx = Fixture::start(&bin, &dir, &[]);
    let (counter, mapped) = limit_of(fx.pid, 10, PAGE);
    let (_f, whole) = limit_of(fx.pid, 11, 0);
    let (_g, file_only) = limit_of(fx.pid, 12, 1);
    let mut series = Incremental::new(IncrementalOptions {
        container: false,
        root: fx.pid,
        aio_idle: false,
        annotations: BTreeMap::from([("who".to_string(), json!("caller"))]),
        copy: CopyMode::Auto,
    })
    .with_shmem_limits(vec![mapped, file_only]);
    let mut last = 0;
    for epoch in 0..3 {
        let layer = dir.join(format!("layer-{epoch}"));
        let mut calls = 0;
        let mut hook = || {
            calls += 1;
            let mut b = [0u8; 8];
            counter.read_exact_at(&mut b, 0).unwrap();
            BTreeMap::from([("counter".to_string(), json!(u64::from_ne_bytes(b)))])
        };
        series.checkpoint_with(&layer, &mut hook).unwrap();
        assert_eq!(calls, 1, "checkpoint {epoch}: the hook runs once");
        let m = ImageDir::new(&layer).read_manifest().unwrap();
        assert_eq!(m.annotations["who"], json!("caller"));
        let seen = m.annotations["counter"].as_u64().unwrap();
        assert_eq!(saved_counter(&layer, object(&m, &mapped).id), seen);
        assert!(seen > last, "checkpoint {epoch}: the tree ran in between");
        last = seen;
        check_saved(&layer, &m, &[mapped, file_only], &whole);
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // Without a hook, a checkpoint carries the caller's annotations only.
    let layer = dir.join("layer-3");
    series.checkpoint(&layer).unwrap();
    let m = ImageDir::new(&layer).read_manifest().unwrap();
    assert_eq!(m.annotations.keys().collect::<Vec<_>>(), ["who"]);
    series.finish().unwrap();
    fx.passes("shmem_limit left running through a series of checkpoints");
    let _ = std::fs::remove_dir_all(&dir);
}
