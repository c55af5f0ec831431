//! Containers checkpointed on one lab host and restored on another: Redis
//! and Memcached answer the client through the same address with their
//! data intact.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::*;
use rrc_bench::failover::App;
use rrc_bench::resp::{Reply, RespConn};

fn image_dir(tag: &str) -> String {
    let d = std::env::temp_dir().join(format!("rrc-cimg-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d.to_string_lossy().into_owned()
}

/// A lab of its own (`tag`) with Redis as a container on `primary`: the
/// lab, the container's record, and its address.
fn redis_on_primary(tag: &str) -> (TestLab, serde_json::Value, String) {
    let lab = TestLab::up(tag);
    let vip = lab.vip();
    let rec = lab.run_container(
        "primary",
        "redis",
        &vip,
        &App::argv(&App::Redis.command().unwrap()),
    );
    let ip = strip_prefix(&vip);
    (lab, rec, ip)
}

#[test]
fn redis_moves_from_primary_to_backup_with_its_data() {
    let (lab, rec, ip) = redis_on_primary("credis");
    let addr = format!("{ip}:6379");
    lab.wait_tcp(&addr);
    let a = addr.clone();
    lab.on("client", move || {
        let mut c = RespConn::connect(a.parse().unwrap(), Duration::from_secs(5)).unwrap();
        for i in 0..5000 {
            c.set(
                format!("key:{i}").as_bytes(),
                format!("value-{i}").as_bytes(),
            )
            .unwrap();
        }
        c.command(&[b"RPUSH", b"list", b"a", b"b", b"c"]).unwrap();
        c.command(&[b"HSET", b"hash", b"f", b"v"]).unwrap();
        c.command(&[b"INCRBY", b"counter", b"41"]).unwrap();
    });
    let images = image_dir("redis");
    let out = lab
        .rrc_on("primary", &["checkpoint", "redis", "--images", &images])
        .ok();
    assert!(out.stdout.contains("the original was killed"), "{out:?}");
    // The container is gone from primary, all of it.
    assert_container_gone(&lab, "primary", &rec);

    let out = lab.rrc_on("backup", &["restore", "--images", &images]).ok();
    assert!(out.stdout.contains("container redis restored"), "{out:?}");
    let listed = lab.container("backup", "redis").expect("listed on backup");
    assert_eq!(listed["status"], "running");
    assert_eq!(listed["net"]["addr"], lab.vip().as_str());
    lab.on("client", move || {
        let mut c = RespConn::connect(addr.parse().unwrap(), Duration::from_secs(5)).unwrap();
        for i in 0..5000 {
            assert_eq!(
                c.get(format!("key:{i}").as_bytes()).unwrap().unwrap(),
                format!("value-{i}").into_bytes()
            );
        }
        let list = c.command(&[b"LRANGE", b"list", b"0", b"-1"]).unwrap();
        assert_eq!(
            list,
            Reply::Array(Some(vec![
                Reply::Bulk(Some(b"a".to_vec())),
                Reply::Bulk(Some(b"b".to_vec())),
                Reply::Bulk(Some(b"c".to_vec())),
            ]))
        );
        assert_eq!(
            c.command(&[b"HGET", b"hash", b"f"]).unwrap(),
            Reply::Bulk(Some(b"v".to_vec()))
        );
        assert_eq!(
            c.command(&[b"INCR", b"counter"]).unwrap(),
            Reply::Integer(42)
        );
        // It keeps taking writes.
        c.set(b"after", b"restore").unwrap();
        assert_eq!(c.get(b"after").unwrap().unwrap(), b"restore".to_vec());
    });
    lab.rrc_on("backup", &["stop", "redis"]).ok();
    assert_container_gone(&lab, "backup", &listed);
    let _ = std::fs::remove_dir_all(&images);
}

/// The value of key `i` in the lazy-pages test: 1 KiB, its own for each key.
fn kib_value(i: usize) -> Vec<u8> {
    let mut v = format!("value-{i}-").into_bytes();
    v.resize(1024, b'a' + (i % 26) as u8);
    v
}

/// Sends `command(i)` for every `i` below `n`, 1000 at a time before
/// reading their replies, and checks each reply with `check(i, reply)`.
fn pipelined(
    c: &mut RespConn,
    n: usize,
    command: impl Fn(usize) -> Vec<Vec<u8>>,
    check: impl Fn(usize, Reply),
) {
    for batch in (0..n).collect::<Vec<_>>().chunks(1000) {
        for &i in batch {
            let args = command(i);
            let args: Vec<&[u8]> = args.iter().map(Vec::as_slice).collect();
            c.send(&args).unwrap();
        }
        for &i in batch {
            check(i, c.read_reply().unwrap());
        }
    }
}

#[test]
fn a_container_restored_with_lazy_pages_has_all_its_data_and_checkpoints_at_once() {
    const KEYS: usize = 80_000;
    let (lab, _, ip) = redis_on_primary("clazy");
    let addr: std::net::SocketAddr = format!("{ip}:6379").parse().unwrap();
    lab.wait_tcp(&addr.to_string());
    // About 100 MB for the copier to fill.
    lab.on("client", move || {
        let mut c = RespConn::connect(addr, Duration::from_secs(10)).unwrap();
        pipelined(
            &mut c,
            KEYS,
            |i| {
                vec![
                    b"SET".to_vec(),
                    format!("key:{i}").into_bytes(),
                    kib_value(i),
                ]
            },
            |i, r| assert_eq!(r, Reply::Status("OK".into()), "SET key:{i}"),
        );
    });
    let first = image_dir("lazy1");
    lab.rrc_on("primary", &["checkpoint", "redis", "--images", &first])
        .ok();
    // The copier paced (2 ms after each 256 KiB: about a second for all
    // of it), so that the checkpoints below start while it still runs.
    let out = lab
        .exec(
            "backup",
            &[
                "env",
                "RRC_LAZY_PAGES_PACE_US=2000",
                RRC,
                "restore",
                "--images",
                &first,
                "--lazy-pages",
            ],
        )
        .ok();
    assert!(out.stdout.contains("container redis restored"), "{out:?}");
    // At once: a series of checkpoints (their write tracking cannot share
    // the pages with the copier) waits for every page, then takes them all.
    let second = image_dir("lazy2");
    let o = lab
        .rrc_on(
            "backup",
            &[
                "checkpoint",
                "redis",
                "--images",
                &second,
                "--every",
                "50ms",
                "--count",
                "3",
            ],
        )
        .ok();
    assert!(
        o.stdout.contains("3 checkpoints") && !o.stdout.contains("failed"),
        "every checkpoint of the series must succeed: {o:?}"
    );
    lab.rrc_on("backup", &["stop", "redis"]).ok();
    let out = lab
        .rrc_on("primary", &["restore", "--images", &second, "--lazy-pages"])
        .ok();
    assert!(out.stdout.contains("container redis restored"), "{out:?}");
    // Read while the pages are still coming in.
    lab.on("client", move || {
        let mut c = RespConn::connect(addr, Duration::from_secs(10)).unwrap();
        pipelined(
            &mut c,
            KEYS,
            |i| vec![b"GET".to_vec(), format!("key:{i}").into_bytes()],
            |i, r| assert_eq!(r, Reply::Bulk(Some(kib_value(i))), "GET key:{i}"),
        );
        c.set(b"after", b"restore").unwrap();
        assert_eq!(c.get(b"after").unwrap().unwrap(), b"restore".to_vec());
    });
    lab.rrc_on("primary", &["stop", "redis"]).ok();
    for d in [first, second] {
        let _ = std::fs::remove_dir_all(d);
    }
}

fn memcached(addr: &str, cmd: &str) -> String {
    let s = TcpStream::connect_timeout(&addr.parse().unwrap(), Duration::from_secs(5)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut w = s.try_clone().unwrap();
    w.write_all(cmd.as_bytes()).unwrap();
    let mut r = BufReader::new(s);
    let mut out = String::new();
    loop {
        let mut l = String::new();
        r.read_line(&mut l).unwrap();
        out.push_str(&l);
        if ["END\r\n", "STORED\r\n", "DELETED\r\n", "ERROR\r\n"].contains(&l.as_str())
            || l.is_empty()
        {
            return out;
        }
    }
}

#[test]
fn memcached_with_worker_threads_moves_with_its_data() {
    let lab = TestLab::up("cmemc");
    let vip = lab.lan_at(110);
    let ip = strip_prefix(&vip);
    lab.run_container(
        "primary",
        "memcached",
        &vip,
        &App::argv(&App::Memcached.command().unwrap()),
    );
    let addr = format!("{ip}:11211");
    lab.wait_tcp(&addr);
    let a = addr.clone();
    lab.on("client", move || {
        for i in 0..500 {
            let v = format!("v{i:04}");
            assert_eq!(
                memcached(&a, &format!("set k{i} 0 0 {}\r\n{v}\r\n", v.len())),
                "STORED\r\n"
            );
        }
    });
    let images = image_dir("memc");
    lab.rrc_on("primary", &["checkpoint", "memcached", "--images", &images])
        .ok();
    lab.rrc_on("backup", &["restore", "--images", &images]).ok();
    lab.on("client", move || {
        for i in 0..500 {
            let v = format!("v{i:04}");
            assert_eq!(
                memcached(&addr, &format!("get k{i}\r\n")),
                format!("VALUE k{i} 0 5\r\n{v}\r\nEND\r\n")
            );
        }
        assert_eq!(memcached(&addr, "set new 0 0 1\r\nx\r\n"), "STORED\r\n");
    });
    let _ = std::fs::remove_dir_all(&images);
}

#[test]
fn a_container_checkpointed_with_leave_running_keeps_serving() {
    let lab = TestLab::up("cleave");
    let vip = lab.vip();
    let ip = strip_prefix(&vip);
    lab.run_container(
        "primary",
        "redis",
        &vip,
        &["redis-server", "--protected-mode", "no", "--save", ""],
    );
    lab.wait_tcp(&format!("{ip}:6379"));
    lab.exec("client", &["redis-cli", "-h", &ip, "set", "a", "1"])
        .ok();
    let images = image_dir("leave");
    let out = lab
        .rrc_on(
            "primary",
            &[
                "checkpoint",
                "redis",
                "--images",
                &images,
                "--leave-running",
            ],
        )
        .ok();
    assert!(!out.stdout.contains("killed"), "{out:?}");
    lab.exec("client", &["redis-cli", "-h", &ip, "set", "b", "2"])
        .ok();
    assert_eq!(
        lab.exec("client", &["redis-cli", "-h", &ip, "get", "a"])
            .ok()
            .stdout
            .trim(),
        "1"
    );
    // The same name cannot be restored beside the running original.
    lab.rrc_on("primary", &["restore", "--images", &images])
        .fails_with("already exists");
    // Once the original is gone, a copy comes back under another name.
    lab.rrc_on("primary", &["stop", "redis"]).ok();
    lab.rrc_on(
        "primary",
        &["restore", "--images", &images, "--name", "clone"],
    )
    .ok();
    lab.wait_tcp(&format!("{ip}:6379"));
    assert_eq!(
        lab.exec("client", &["redis-cli", "-h", &ip, "get", "a"])
            .ok()
            .stdout
            .trim(),
        "1"
    );
    // Taken after the checkpoint: not in the image.
    assert_eq!(
        lab.exec("client", &["redis-cli", "-h", &ip, "get", "b"])
            .ok()
            .stdout
            .trim(),
        ""
    );
    let _ = std::fs::remove_dir_all(&images);
}

/// Checkpoints `name` on primary (killing it) and restores it on backup
/// while `connections` verifying clients keep working; returns their report.
fn move_under_load(
    lab: &TestLab,
    name: &str,
    service: rrc_bench::verify::Service,
    port: u16,
    ip: &str,
    connections: usize,
) -> rrc_bench::verify::VerifyReport {
    let addr: std::net::SocketAddr = format!("{ip}:{port}").parse().unwrap();
    lab.wait_tcp(&addr.to_string());
    let images = image_dir(name);
    let report = lab.on("client", || {
        rrc_bench::verify::run(
            service,
            addr,
            connections,
            || {
                lab.rrc_on("primary", &["checkpoint", name, "--images", &images])
                    .ok();
                lab.rrc_on("backup", &["restore", "--images", &images]).ok();
            },
            Duration::from_secs(2),
        )
    });
    let _ = std::fs::remove_dir_all(&images);
    eprintln!(
        "{name}: {} connections, {} requests, longest gap {:.1} ms, {} errors",
        report.connections,
        report.requests,
        report.max_gap_ms,
        report.errors.len()
    );
    report
}

#[test]
fn redis_clients_keep_their_connections_across_a_move() {
    let (lab, _, ip) = redis_on_primary("lredis");
    let r = move_under_load(
        &lab,
        "redis",
        rrc_bench::verify::Service::Redis,
        6379,
        &ip,
        8,
    );
    assert!(r.errors.is_empty(), "{r:#?}");
    assert!(r.requests > 1000, "{r:#?}");
    assert!(lab.container("backup", "redis").is_some());
}

#[test]
fn memcached_clients_keep_their_connections_across_a_move() {
    let lab = TestLab::up("lmemc");
    let vip = lab.vip();
    let ip = strip_prefix(&vip);
    lab.run_container(
        "primary",
        "memcached",
        &vip,
        &App::argv(&App::Memcached.command().unwrap()),
    );
    let r = move_under_load(
        &lab,
        "memcached",
        rrc_bench::verify::Service::Memcached,
        11211,
        &ip,
        8,
    );
    assert!(r.errors.is_empty(), "{r:#?}");
    assert!(r.requests > 1000, "{r:#?}");
}

#[test]
fn lighttpd_keepalive_clients_keep_their_connections_across_a_move() {
    let lab = TestLab::up("lhttp");
    let vip = lab.vip();
    let ip = strip_prefix(&vip);
    let command = App::Lighttpd.command().unwrap();
    let options = App::Lighttpd.root_options().unwrap();
    lab.run_container_with(
        "primary",
        "web",
        &vip,
        &App::argv(&options),
        &App::argv(&command),
    );
    let r = move_under_load(&lab, "web", rrc_bench::verify::Service::Http, 80, &ip, 8);
    assert!(r.errors.is_empty(), "{r:#?}");
    assert!(r.requests > 1000, "{r:#?}");
}

#[test]
fn tarantool_clients_keep_their_connections_across_a_move() {
    let lab = TestLab::up("ltnt");
    let vip = lab.vip();
    let ip = strip_prefix(&vip);
    let command = App::Tarantool.command().unwrap();
    let options = App::Tarantool.root_options().unwrap();
    lab.run_container_with(
        "primary",
        "tarantool",
        &vip,
        &App::argv(&options),
        &App::argv(&command),
    );
    let r = move_under_load(
        &lab,
        "tarantool",
        rrc_bench::verify::Service::Tarantool,
        3302,
        &ip,
        4,
    );
    assert!(r.errors.is_empty(), "{r:#?}");
    assert!(r.requests > 500, "{r:#?}");
}
