//! Replay from a checkpoint: a program recorded under load is checkpointed
//! at a random moment and keeps running and recording; the checkpoint is
//! then restored as a fresh container and replayed to the end of the log.
//! What the replay outputs must be byte for byte what the original output
//! from that moment on, and its state at the end the original's.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use rrc_bench::failover::App;
use rrc_lab::Host;

/// A delay in `[lo, hi)` ms that differs from run to run (the checkpoint's
/// random moment).
fn random_delay(lo: u64, hi: u64) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as u64;
    Duration::from_millis(lo + nanos % (hi - lo))
}

/// The connections a capture file holds, each as the bytes written to it.
fn captured_streams(path: &Path) -> Vec<(u32, Vec<u8>)> {
    rrc_rr::interface::connection_streams(capture_records(path))
}

/// The last record to replay: the one before the first SIGTERM handler the
/// recording holds (`rrc stop`'s). The state is read before the stop, and
/// the shutdown that follows is not what is checked here: Redis's exit path
/// (threads torn down while the main thread saves and exits) takes locks
/// in an order the log does not pin yet, so a replay of it may diverge.
fn before_the_stop(log: &Path) -> u64 {
    use rrc_rr::log::{Event, LogReader, thread_log_ids};
    let mut first_term = u64::MAX;
    for id in thread_log_ids(log).unwrap() {
        let mut reader = LogReader::open(log, id).unwrap();
        while let Some(r) = reader.next_record().unwrap() {
            if matches!(r.event, Event::Signal { signo: 15 }) {
                first_term = first_term.min(r.seq);
                break;
            }
        }
    }
    first_term.saturating_sub(1)
}

fn assert_replayed_cleanly(report: &str) {
    assert!(report.contains("end of the log reached"), "{report}");
    assert!(report.contains(" 0 divergences"), "{report}");
    assert!(!report.contains("DIVERGENCE"), "{report}");
}

#[test]
fn a_multithreaded_program_replayed_from_a_random_checkpoint_prints_what_it_printed() {
    require_root();
    let work = scratch("replay-ckpt-fixture");
    let bin = build("rr_long", &work);
    let log = work.join("log");
    let images = work.join("images");
    let name = format!("rl{}", std::process::id());
    // Adders on one mutex, a producer and a consumer on a condition
    // variable; a line of time, random bytes and counters every 50 ms.
    let original = record_command(&name, &log, &bin)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(random_delay(300, 1300));
    rrc(&[
        "checkpoint",
        &name,
        "--images",
        &images.display().to_string(),
        "--leave-running",
    ])
    .ok();
    let original = original.wait_with_output().unwrap();
    assert!(original.status.success(), "{original:?}");
    let printed = String::from_utf8_lossy(&original.stdout).into_owned();

    let replay = Command::new(RRC)
        .args(["replay", "--images"])
        .arg(&images)
        .arg("--log")
        .arg(&log)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&replay.stderr);
    assert!(replay.status.success(), "{report}");
    assert_replayed_cleanly(&report);
    let replayed = String::from_utf8_lossy(&replay.stdout).into_owned();
    // From the checkpoint on: the same lines, the final totals included.
    assert!(replayed.lines().count() >= 2, "{replayed}\n{report}");
    assert!(
        printed.ends_with(&replayed),
        "the replay printed\n{replayed}\nwhere the original printed\n{printed}"
    );
    assert!(replayed.contains("done counter 120000 consumed 4000"));
    remove_private_root(&name);
    let _ = std::fs::remove_dir_all(&work);
}

/// A client connection of the load: what it sent and received.
struct Conn {
    stream: TcpStream,
    received: Vec<u8>,
}

impl Conn {
    fn open(target: SocketAddr) -> Conn {
        let stream = TcpStream::connect_timeout(&target, Duration::from_secs(5)).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        Conn {
            stream,
            received: Vec::new(),
        }
    }

    /// Sends `req` and reads until the reply holds `complete`.
    fn ask(&mut self, req: &[u8], complete: impl Fn(&[u8]) -> bool) {
        self.stream.write_all(req).unwrap();
        let start = self.received.len();
        let mut buf = [0u8; 4096];
        while !complete(&self.received[start..]) {
            let n = self.stream.read(&mut buf).unwrap();
            assert!(n > 0, "the server closed a connection");
            self.received.extend_from_slice(&buf[..n]);
        }
    }
}

fn resp(args: &[&str]) -> Vec<u8> {
    let mut r = format!("*{}\r\n", args.len());
    for a in args {
        r += &format!("${}\r\n{a}\r\n", a.len());
    }
    r.into_bytes()
}

/// One round of connection `c`: store a value, count, read the value back.
fn round(app: App, conn: &mut Conn, c: usize, i: usize) {
    let (key, value, counter) = (format!("k{c}_{i}"), format!("v{c}_{i}"), format!("n{c}"));
    match app {
        App::Redis => {
            let mut req = resp(&["SET", &key, &value]);
            req.extend(resp(&["INCR", &counter]));
            req.extend(resp(&["GET", &key]));
            conn.ask(&req, |r| r.windows(2).filter(|w| w == b"\r\n").count() == 4);
        }
        App::Memcached => {
            let req = format!(
                "set {key} 0 0 {}\r\n{value}\r\nincr {counter} 1\r\nget {key}\r\n",
                value.len()
            );
            conn.ask(req.as_bytes(), |r| r.ends_with(b"END\r\n"));
        }
        App::Lighttpd | App::Tarantool => unreachable!("replayed here: Redis and Memcached"),
    }
}

/// The final state, read through a new connection: every counter and the
/// number of keys.
fn dump_state(app: App, target: SocketAddr, conns: usize) -> Vec<u8> {
    let mut d = Conn::open(target);
    for c in 0..conns {
        match app {
            App::Redis => d.ask(&resp(&["GET", &format!("n{c}")]), |r| {
                r.windows(2).filter(|w| w == b"\r\n").count() == 2
            }),
            App::Memcached => d.ask(format!("get n{c}\r\n").as_bytes(), |r| {
                r.ends_with(b"END\r\n")
            }),
            App::Lighttpd | App::Tarantool => unreachable!("replayed here: Redis and Memcached"),
        }
    }
    match app {
        App::Redis => d.ask(&resp(&["DBSIZE"]), |r| r.ends_with(b"\r\n")),
        App::Memcached => d.ask(b"stats items\r\n", |r| r.ends_with(b"END\r\n")),
        App::Lighttpd | App::Tarantool => unreachable!("replayed here: Redis and Memcached"),
    }
    d.received
}

/// Records `app` under load in a lab, checkpoints it at a random moment
/// while the load goes on, reads its final state, stops it, and replays
/// the checkpoint on the same host.
fn replayed_from_a_random_checkpoint(tag: &str, app: App) {
    const CONNS: usize = 4;
    let lab = lab_session(tag);
    let work = scratch(tag);
    let log = work.join("log");
    let images = work.join("images");
    let capture = work.join("capture");
    let target = app
        .start(&lab, &["--record", &log.display().to_string()])
        .unwrap();
    let (load, state) = std::thread::scope(|s| {
        let load = s.spawn(|| {
            lab.in_host(Host::Client, || {
                let mut conns: Vec<Conn> = (0..CONNS).map(|_| Conn::open(target)).collect();
                if matches!(app, App::Memcached) {
                    for (c, conn) in conns.iter_mut().enumerate() {
                        conn.ask(format!("set n{c} 0 0 1\r\n0\r\n").as_bytes(), |r| {
                            r.ends_with(b"\r\n")
                        });
                    }
                }
                let end = Instant::now() + Duration::from_millis(2500);
                let mut i = 0;
                while Instant::now() < end {
                    for (c, conn) in conns.iter_mut().enumerate() {
                        round(app, conn, c, i);
                    }
                    i += 1;
                    std::thread::sleep(Duration::from_millis(2));
                }
                (i, conns.into_iter().map(|c| c.received).collect::<Vec<_>>())
            })
            .unwrap()
        });
        std::thread::sleep(random_delay(400, 1600));
        lab.run_on(
            Host::Primary,
            &[
                RRC,
                "checkpoint",
                app.name(),
                "--images",
                &images.display().to_string(),
                "--leave-running",
            ],
        )
        .unwrap();
        let (rounds, received) = load.join().unwrap();
        assert!(rounds > 100, "{rounds} rounds");
        let state = lab
            .in_host(Host::Client, || dump_state(app, target, CONNS))
            .unwrap();
        (received, state)
    });
    lab.run_on(Host::Primary, &[RRC, "stop", app.name()])
        .unwrap();

    let replay = lab
        .command_on(
            Host::Primary,
            &[
                RRC,
                "replay",
                "--images",
                &images.display().to_string(),
                "--log",
                &log.display().to_string(),
                "--capture",
                &capture.display().to_string(),
                "--until",
                &before_the_stop(&log).to_string(),
                "--stop-at-end",
            ],
        )
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&replay.stdout),
        String::from_utf8_lossy(&replay.stderr)
    );
    assert!(replay.status.success(), "{report}");
    assert_replayed_cleanly(&report);

    // Each connection's replies from the checkpoint on, exactly: every
    // captured stream is the end of one client's stream, and every client
    // (all of them busy past the checkpoint) has one.
    let streams = captured_streams(&capture);
    for (c, r) in load.iter().enumerate() {
        std::fs::write(work.join(format!("client{c}")), r).unwrap();
    }
    let mut matched = vec![false; CONNS];
    let mut state_replayed = false;
    for (fd, bytes) in &streams {
        if bytes.is_empty() {
            continue;
        }
        if *bytes == state {
            state_replayed = true;
            continue;
        }
        let owner: Vec<usize> = (0..CONNS).filter(|&c| load[c].ends_with(bytes)).collect();
        assert_eq!(
            owner.len(),
            1,
            "descriptor {fd}'s {} replayed bytes are not the end of one client's replies: {:?}",
            bytes.len(),
            String::from_utf8_lossy(&bytes[..bytes.len().min(200)])
        );
        assert!(!matched[owner[0]], "two streams for client {}", owner[0]);
        matched[owner[0]] = true;
    }
    assert!(
        matched.iter().all(|m| *m),
        "clients without replayed replies: {matched:?}"
    );
    // The state read at the end (counters, number of keys), answered by
    // the replay exactly as by the original.
    assert!(
        state_replayed,
        "the replay's answer to the final state query differs: the original said {:?}",
        String::from_utf8_lossy(&state)
    );
    let _ = std::fs::remove_dir_all(&work);
}

#[test]
fn redis_replayed_from_a_random_checkpoint_answers_as_it_did() {
    replayed_from_a_random_checkpoint("rpred", App::Redis);
}

#[test]
fn memcached_with_four_workers_replayed_from_a_random_checkpoint_answers_as_it_did() {
    replayed_from_a_random_checkpoint("rpmem", App::Memcached);
}

#[test]
fn replay_from_images_refuses_a_checkpoint_of_another_container() {
    require_root();
    let work = scratch("replay-ckpt-wrong");
    let bin = build("rr_long", &work);
    let log = work.join("log");
    let name = format!("rw{}", std::process::id());
    // A recording, and a checkpoint of a container that was not recorded.
    let out = record_command(&format!("{name}a"), &log, &bin)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let images: PathBuf = work.join("images");
    let plain = Command::new(RRC)
        .args(["run", "--name", &format!("{name}b"), "--share"])
        .arg(&work)
        .arg("--")
        .arg(&bin)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    rrc(&[
        "checkpoint",
        &format!("{name}b"),
        "--images",
        &images.display().to_string(),
    ])
    .ok();
    let _ = plain.wait_with_output();
    rrc(&[
        "replay",
        "--images",
        &images.display().to_string(),
        "--log",
        &log.display().to_string(),
    ])
    .fails_with("no process in");
    remove_private_root(&format!("{name}b"));
    let _ = std::fs::remove_dir_all(&work);
}
