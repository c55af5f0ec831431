//! A container checkpointed every 100 ms for a minute while clients load
//! it: the series' image (the first checkpoint with every delta applied)
//! restores on another host into a server holding exactly the dataset the
//! original held at the last checkpoint.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use rrc_bench::resp::{Reply, RespConn};

fn series_dir(tag: &str) -> String {
    let d = std::env::temp_dir().join(format!("rrc-series-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d.to_string_lossy().into_owned()
}

/// Redis's digest of its whole dataset, and its number of keys.
fn digest(c: &mut RespConn) -> (Vec<u8>, i64) {
    let d = match c.command(&[b"DEBUG", b"DIGEST"]).unwrap() {
        Reply::Status(s) => s.into_bytes(),
        Reply::Bulk(Some(b)) => b,
        other => panic!("DEBUG DIGEST answered {other:?}"),
    };
    let n = match c.command(&[b"DBSIZE"]).unwrap() {
        Reply::Integer(n) => n,
        other => panic!("DBSIZE answered {other:?}"),
    };
    (d, n)
}

#[test]
fn redis_checkpointed_every_100ms_for_a_minute_under_load_restores_to_the_last_checkpoint() {
    let lab = TestLab::up("series");
    let vip = lab.vip();
    let ip = strip_prefix(&vip);
    lab.run_container(
        "primary",
        "redis",
        &vip,
        &[
            "redis-server",
            "--protected-mode",
            "no",
            "--save",
            "",
            "--appendonly",
            "no",
            "--enable-debug-command",
            "yes",
        ],
    );
    let addr = format!("{ip}:6379");
    lab.wait_tcp(&addr);
    let a = addr.clone();
    lab.on("client", move || {
        let mut c = RespConn::connect(a.parse().unwrap(), Duration::from_secs(5)).unwrap();
        let r = c
            .command(&[b"DEBUG", b"POPULATE", b"200000", b"base", b"100"])
            .unwrap();
        assert_eq!(r, Reply::Status("OK".into()));
    });

    let dir = series_dir("redis");
    let started = Instant::now();
    let series = Command::new(RRC)
        .args(["lab", "exec", "--lab", &lab.name, "primary", "--", RRC])
        .args([
            "checkpoint",
            "redis",
            "--images",
            &dir,
            "--every",
            "100ms",
            "--for",
            "62s",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Writes of several kinds from 8 connections, for most of the minute.
    let mut load = Command::new(RRC)
        .args(["lab", "exec", "--lab", &lab.name, "client", "--"])
        .args([
            "redis-benchmark",
            "-h",
            &ip,
            "-t",
            "set,incr,lpush,rpop,sadd,hset",
            "-r",
            "100000",
            "-c",
            "8",
            "-n",
            "1000000000",
            "-q",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    while started.elapsed() < Duration::from_secs(56) {
        std::thread::sleep(Duration::from_millis(200));
        assert!(
            load.try_wait().unwrap().is_none(),
            "redis-benchmark stopped early"
        );
    }
    // The last seconds of the series are quiet: the original holds still.
    load.kill().unwrap();
    load.wait().unwrap();
    let out = series.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "series: {stdout}\n{stderr}");
    assert!(
        stdout.contains("series of container redis done"),
        "{stdout}"
    );
    // About 600 checkpoints at 100 ms. An epoch whose checkpoint and apply
    // take longer than it is skipped; on a loaded CI machine, with a debug
    // build, that is often (the speed is measured by `rrc bench pause`):
    // the series must keep going, at half the pace at least.
    let count: u64 = stdout
        .split_whitespace()
        .skip_while(|w| *w != "done")
        .nth(1)
        .and_then(|w| w.parse().ok())
        .unwrap_or(0);
    assert!(count >= 300, "only {count} checkpoints: {stdout}\n{stderr}");

    let a = addr.clone();
    let (want, keys) = lab.on("client", move || {
        let mut c = RespConn::connect(a.parse().unwrap(), Duration::from_secs(5)).unwrap();
        digest(&mut c)
    });
    assert!(keys > 200_000, "the load added keys: {keys}");

    // The original goes; the series' last checkpoint comes back on backup.
    lab.rrc_on("primary", &["stop", "redis"]).ok();
    let out = lab.rrc_on("backup", &["restore", "--images", &dir]).ok();
    assert!(out.stdout.contains("container redis restored"), "{out:?}");
    let a = addr.clone();
    let got = lab.on("client", move || {
        let mut c = RespConn::connect(a.parse().unwrap(), Duration::from_secs(5)).unwrap();
        digest(&mut c)
    });
    assert_eq!(
        (String::from_utf8_lossy(&got.0).into_owned(), got.1),
        (String::from_utf8_lossy(&want).into_owned(), keys),
        "the restored dataset differs from the original's"
    );
    lab.rrc_on("backup", &["stop", "redis"]).ok();
    let _ = std::fs::remove_dir_all(&dir);
}
