//! Recording: `rrc run --record DIR` preloads librrc into the program,
//! which logs every nondeterministic outcome per thread; the log must hold
//! exactly what the program saw.

mod common;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use rrc_bench::failover::App;
use rrc_lab::Host;
use rrc_rr::interface::CaptureRecord;
use rrc_rr::log::{Event, LogReader, SyncOp, WaitCall, WriteCall, thread_log_ids};

/// Every record of every thread log in `dir`: (thread, seq, event as
/// owned text and data).
fn records(dir: &Path) -> Vec<(u32, u64, Owned)> {
    let mut out = Vec::new();
    for id in thread_log_ids(dir).unwrap() {
        let mut r = LogReader::open(dir, id).unwrap();
        while let Some(rec) = r.next_record().unwrap() {
            out.push((id, rec.seq, Owned::of(&rec.event)));
        }
    }
    out
}

/// The parts of an event the tests look at, owned.
#[derive(Debug, Clone, PartialEq)]
enum Owned {
    Clock(i32, i64, u32),
    TimeOfDay(i64, u32),
    Time(i64),
    Random(Vec<u8>),
    Input(Vec<u8>),
    Accept,
    Create(u32),
    Exit,
    Sync(SyncOp, u64),
    Write(WriteCall, i32, i64),
    Wait(WaitCall, i64, i32),
    Other,
}

impl Owned {
    fn of(e: &Event<'_>) -> Owned {
        match e {
            Event::ClockGettime {
                clock, sec, nsec, ..
            } => Owned::Clock(*clock, *sec, *nsec),
            Event::Gettimeofday { sec, usec, .. } => Owned::TimeOfDay(*sec, *usec),
            Event::Time { sec } => Owned::Time(*sec),
            Event::Getrandom { data, .. } => Owned::Random(data.to_vec()),
            Event::Read { data, .. } | Event::Recv { data, .. } => Owned::Input(data.to_vec()),
            Event::Accept { .. } => Owned::Accept,
            Event::ThreadCreate { child, .. } => Owned::Create(*child),
            Event::ThreadExit => Owned::Exit,
            Event::Sync { op, obj, .. } => Owned::Sync(*op, *obj),
            Event::Write { call, fd, ret } => Owned::Write(*call, *fd, *ret),
            Event::Wait {
                call, ret, status, ..
            } => Owned::Wait(*call, *ret, *status),
            _ => Owned::Other,
        }
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[test]
fn the_log_holds_what_the_program_saw() {
    require_root();
    let work = scratch("record-basic");
    let (dir, stdout, stderr) = record_fixture(&work, "rr_basic", b"hello\n");
    assert!(
        stderr.contains("recorded 11 events of 3 thread(s)"),
        "{stderr}"
    );

    let recs = records(&dir);
    let main: Vec<&Owned> = recs.iter().filter(|r| r.0 == 1).map(|r| &r.2).collect();
    let line = |prefix: &str| -> Vec<String> {
        stdout
            .lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no `{prefix}` in {stdout}"))
            .split_whitespace()
            .skip(1)
            .map(str::to_string)
            .collect()
    };
    let clock = line("clock ");
    assert_eq!(
        main[0],
        &Owned::Clock(
            libc::CLOCK_MONOTONIC,
            clock[0].parse().unwrap(),
            clock[1].parse().unwrap()
        )
    );
    let tod = line("timeofday ");
    assert_eq!(
        main[1],
        &Owned::TimeOfDay(tod[0].parse().unwrap(), tod[1].parse().unwrap())
    );
    assert_eq!(main[2], &Owned::Time(line("time ")[0].parse().unwrap()));
    match main[3] {
        Owned::Random(r) => assert_eq!(hex(r), line("random ")[0]),
        other => panic!("expected getrandom, got {other:?}"),
    }
    assert_eq!(main[4], &Owned::Input(b"hello\n".to_vec()));
    let children: Vec<u32> = main
        .iter()
        .filter_map(|e| match e {
            Owned::Create(c) => Some(*c),
            _ => None,
        })
        .collect();
    assert_eq!(children.len(), 2, "{main:?}");
    // Each created thread's log: the clock it printed, then its exit.
    for (i, child) in children.iter().enumerate() {
        let mine: Vec<&Owned> = recs
            .iter()
            .filter(|r| r.0 == *child)
            .map(|r| &r.2)
            .collect();
        let printed = line(&format!("thread {} clock ", i + 1));
        assert_eq!(
            mine,
            vec![
                &Owned::Clock(
                    libc::CLOCK_REALTIME,
                    printed[2].parse().unwrap(),
                    printed[3].parse().unwrap()
                ),
                &Owned::Exit
            ],
            "thread {child}"
        );
    }
    // One global order: every sequence number once.
    let mut seqs: Vec<u64> = recs.iter().map(|r| r.1).collect();
    seqs.sort();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());

    // `rrc log show` reads it.
    let show = Command::new(RRC)
        .args(["log", "show"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(show.status.success());
    assert!(String::from_utf8_lossy(&show.stdout).contains("ThreadExit"));
    let _ = std::fs::remove_dir_all(&work);
}

#[test]
fn lock_order_is_recorded_as_it_happened() {
    require_root();
    let work = scratch("record-locks");
    let (dir, stdout, _) = record_fixture(&work, "rr_locks", b"");
    let words: Vec<&str> = stdout.split_whitespace().collect();
    assert_eq!(words[5], "8000", "{stdout}");
    let lock = u64::from_str_radix(words[1], 16).unwrap();
    let mut recs = records(&dir);
    recs.sort_by_key(|r| r.1);
    // The shared mutex, in global order: each acquisition followed by the
    // same thread's release, 4 threads x 2000 rounds.
    let on_lock: Vec<(u32, SyncOp)> = recs
        .iter()
        .filter_map(|(t, _, e)| match e {
            Owned::Sync(op, obj) if *obj == lock => Some((*t, *op)),
            _ => None,
        })
        .collect();
    assert_eq!(on_lock.len(), 16000);
    for pair in on_lock.chunks(2) {
        assert_eq!(pair[0].1, SyncOp::MutexLock, "{pair:?}");
        assert_eq!(pair[1], (pair[0].0, SyncOp::MutexUnlock), "{pair:?}");
    }
    let count = |op: SyncOp| {
        recs.iter()
            .filter(|r| matches!(r.2, Owned::Sync(o, _) if o == op))
            .count()
    };
    assert_eq!(count(SyncOp::CondSignal), 500);
    assert_eq!(count(SyncOp::SemPost), 1);
    assert_eq!(count(SyncOp::SemWait), 1);
    let _ = std::fs::remove_dir_all(&work);
}

/// Records `app` in the lab under verifying load; returns the log's
/// records and the clients' request count.
fn record_under_load(tag: &str, app: App) -> (Vec<(u32, u64, Owned)>, u64) {
    let lab = lab_session(tag);
    let work = scratch(tag);
    let dir = work.join("log");
    let target = app
        .start(&lab, &["--record", &dir.display().to_string()])
        .unwrap();
    let r = lab
        .in_host(Host::Client, || {
            rrc_bench::verify::run(app.service(), target, 4, || {}, Duration::from_secs(2))
        })
        .unwrap();
    assert!(r.errors.is_empty(), "{r:#?}");
    lab.run_on(Host::Primary, &[RRC, "stop", app.name()])
        .unwrap();
    let recs = records(&dir);
    let _ = std::fs::remove_dir_all(&work);
    (recs, r.requests)
}

/// Every verifying connection's first writes are among the logged input.
fn assert_clients_input_logged(recs: &[(u32, u64, Owned)]) {
    let mut all = Vec::new();
    for (_, _, e) in recs {
        if let Owned::Input(d) = e {
            all.extend_from_slice(d);
        }
    }
    let input = String::from_utf8_lossy(&all);
    for id in 0..4 {
        assert!(
            input.contains(&format!("k{id}_1")),
            "connection {id}'s writes are not in the log"
        );
    }
}

#[test]
fn redis_under_load_is_recorded_with_its_input() {
    let (recs, requests) = record_under_load("recred", App::Redis);
    assert!(requests > 100, "{requests} requests");
    let accepts = recs.iter().filter(|r| r.2 == Owned::Accept).count();
    assert!(accepts >= 4, "{accepts} accepts");
    assert_clients_input_logged(&recs);
}

#[test]
fn memcached_worker_threads_are_recorded_each_in_its_own_log() {
    let (recs, requests) = record_under_load("recmem", App::Memcached);
    assert!(requests > 100, "{requests} requests");
    let threads: std::collections::BTreeSet<u32> = recs.iter().map(|r| r.0).collect();
    // The main thread and at least the workers that served connections.
    assert!(threads.len() >= 3, "thread logs: {threads:?}");
    let created = recs
        .iter()
        .filter(|r| matches!(r.2, Owned::Create(_)))
        .count();
    assert!(created >= 4, "{created} threads created");
    assert_clients_input_logged(&recs);
}

#[test]
fn a_statically_linked_program_is_refused() {
    require_root();
    let work = scratch("record-static");
    let src = work.join("st.c");
    std::fs::write(&src, "int main(void) { return 0; }\n").unwrap();
    let bin = work.join("st");
    let built = Command::new("gcc")
        .args(["-static", "-o"])
        .arg(&bin)
        .arg(&src)
        .status()
        .unwrap();
    assert!(built.success());
    let out = Command::new(RRC)
        .args(["run", "--name", "rrst", "--record"])
        .arg(work.join("log"))
        .arg("--share")
        .arg(&work)
        .arg("--")
        .arg(&bin)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("statically linked"),
        "{out:?}"
    );
    let _ = std::fs::remove_dir_all(&work);
}

/// Tests run in parallel threads: each recording gets a container name.
static NEXT_NAME: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Records `fixture` (built from the fixtures) with `input` on stdin;
/// returns its log directory, its output and rrc's summary line.
fn record_fixture(
    work: &Path,
    fixture: &str,
    input: &[u8],
) -> (std::path::PathBuf, String, String) {
    let bin = build(fixture, work);
    let dir = work.join(format!("{fixture}.log"));
    let name = format!(
        "rp{}n{}",
        std::process::id(),
        NEXT_NAME.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    let mut child = record_command(&name, &dir, &bin)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    (
        dir,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `rrc replay --log DIR -- BIN`: its output and librrc's report.
fn replay(dir: &Path, bin: &Path) -> (String, String) {
    let out = Command::new(RRC)
        .args(["replay", "--log"])
        .arg(dir)
        .arg("--")
        .arg(bin)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_replay_gives_the_program_what_it_got_when_recorded() {
    require_root();
    let work = scratch("replay-basic");
    let (dir, recorded, _) = record_fixture(&work, "rr_basic", b"hello\n");
    // No input this time, another time and other random bytes: all of it
    // comes from the log.
    let (replayed, report) = replay(&dir, &work.join("rr_basic"));
    assert_eq!(replayed, recorded);
    assert!(
        report.contains("11 events replayed, 0 divergences"),
        "{report}"
    );
    let _ = std::fs::remove_dir_all(&work);
}

#[test]
fn a_replay_serves_no_record_after_until() {
    require_root();
    let work = scratch("replay-until");
    let (dir, _, _) = record_fixture(&work, "rr_basic", b"hello\n");
    // The main thread's first five records (time, random bytes, the
    // read); its thread creations come after.
    let out = Command::new(RRC)
        .args(["replay", "--until", "5", "--log"])
        .arg(&dir)
        .arg("--")
        .arg(work.join("rr_basic"))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{report}");
    assert!(report.contains("end of the log reached"), "{report}");
    assert!(
        report.contains("5 events replayed, 0 divergences"),
        "{report}"
    );
    let _ = std::fs::remove_dir_all(&work);
}

#[test]
fn a_replay_serves_poll_select_readv_and_every_recv_from_the_log() {
    require_root();
    let work = scratch("replay-inputs");
    let (dir, recorded, _) = record_fixture(&work, "rr_inputs", b"hello world of input\n");
    assert!(recorded.contains("readv 21 [hel]"), "{recorded}");
    // Standard input is empty now, and the socket pair's datagrams are
    // not read at all: every outcome is the logged one.
    let (replayed, report) = replay(&dir, &work.join("rr_inputs"));
    assert_eq!(replayed, recorded);
    assert!(report.contains(" 0 divergences"), "{report}");
    assert!(report.contains("end of the log reached"), "{report}");
    let _ = std::fs::remove_dir_all(&work);
}

/// The host pid of the process running `bin` (a path unique to the test).
fn pid_of(bin: &Path) -> Option<i32> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: i32 = e.file_name().to_str()?.parse().ok()?;
        let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok()?;
        (exe == bin).then_some(pid)
    })
}

#[test]
fn signal_handlers_run_in_the_replay_where_they_ran_when_recorded() {
    use std::io::BufRead;
    require_root();
    let work = scratch("replay-signal");
    let bin = build("rr_signal", &work);
    let dir = work.join("log");
    let mut child = record_command(&format!("rs{}", std::process::id()), &dir, &bin)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut recorded = String::new();
    while !recorded.ends_with("ready\n") {
        assert!(out.read_line(&mut recorded).unwrap() > 0, "{recorded}");
    }
    let pid = pid_of(&bin).expect("the recorded program runs");
    for sig in [libc::SIGUSR1, libc::SIGUSR2] {
        std::thread::sleep(Duration::from_millis(100));
        // SAFETY: signalling a process of this test's.
        assert_eq!(unsafe { libc::kill(pid, sig) }, 0);
    }
    std::io::Read::read_to_string(&mut out, &mut recorded).unwrap();
    assert!(child.wait().unwrap().success());
    assert!(
        recorded.contains("handler reported back: yes"),
        "{recorded}"
    );
    // No signal now: both handlers run where the log says they ran.
    let (replayed, report) = replay(&dir, &bin);
    assert_eq!(replayed, recorded);
    assert!(report.contains(" 0 divergences"), "{report}");
    let _ = std::fs::remove_dir_all(&work);
}

#[test]
fn a_replay_follows_the_recorded_lock_order() {
    require_root();
    let work = scratch("replay-locks");
    let (dir, recorded, summary) = record_fixture(&work, "rr_locks", b"");
    let events: u64 = summary
        .split("recorded ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no summary in {summary}"));
    let (replayed, report) = replay(&dir, &work.join("rr_locks"));
    assert!(
        report.contains(&format!("{events} events replayed, 0 divergences")),
        "{report}"
    );
    // Addresses differ between runs; the totals may not.
    let totals = |s: &str| s.split_whitespace().skip(4).collect::<Vec<_>>().join(" ");
    assert_eq!(totals(&replayed), totals(&recorded));
    let _ = std::fs::remove_dir_all(&work);
}

#[test]
fn a_divergence_is_detected_and_reported() {
    require_root();
    let work = scratch("replay-diverge");
    let (dir, _, _) = record_fixture(&work, "rr_basic", b"hello\n");
    // Another program against this log: its first call is not the logged
    // one.
    let other = build("rr_locks", &work);
    let (_, report) = replay(&dir, &other);
    assert!(report.contains("DIVERGENCE in thread 1"), "{report}");
    assert!(!report.contains(" 0 divergences"), "{report}");
    let _ = std::fs::remove_dir_all(&work);
}

#[test]
fn a_program_that_execs_and_reads_too_much_at_once_is_never_held_up() {
    require_root();
    let work = scratch("record-exec");
    let big = work.join("big");
    std::fs::write(&big, vec![7u8; 3 << 20]).unwrap();
    let dir = work.join("log");
    // The shell execs dd, which reads 3 MiB in one call: more than a ring
    // holds.
    let out = Command::new(RRC)
        .args([
            "run",
            "--name",
            &format!("rrx{}", std::process::id()),
            "--record",
        ])
        .arg(&dir)
        .arg("--share")
        .arg(&work)
        .args(["--", "sh", "-c"])
        .arg(format!(
            "dd if={} of=/dev/null bs=4M count=1 status=none",
            big.display()
        ))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("only its result is logged"), "{stderr}");
    // One numbering across the exec: every batch was taken.
    assert!(stderr.contains("rrc: recorded "), "{stderr}");
    assert!(!stderr.contains("WARNING"), "{stderr}");
    let mut seqs: Vec<u64> = records(&dir).iter().map(|r| r.1).collect();
    let n = seqs.len();
    seqs.sort();
    seqs.dedup();
    assert_eq!(seqs.len(), n, "a sequence number was handed out twice");
    let _ = std::fs::remove_dir_all(&work);
}

/// The bytes a capture file holds (records of fd, length, bytes), in order.
fn captured(path: &Path) -> Vec<u8> {
    capture_records(path)
        .into_iter()
        .filter_map(|r| match r {
            CaptureRecord::Written { bytes, .. } => Some(bytes),
            CaptureRecord::Closed { .. } | CaptureRecord::ReadEarlier { .. } => None,
        })
        .flatten()
        .collect()
}

#[test]
fn a_replayed_server_answers_its_recorded_clients_byte_for_byte() {
    require_root();
    let work = scratch("replay-server");
    let server = build("rr_server", &work);
    let lab = lab_session("rsrv");
    let dir = work.join("log");
    let vip = lab.plan().vip();
    // The server ends by itself after 100 requests.
    let run = lab
        .command_on(
            Host::Primary,
            &[
                RRC,
                "run",
                "--name",
                "srv",
                "--record",
                &dir.display().to_string(),
                "--addr",
                &vip.to_string(),
                "--share",
                &work.display().to_string(),
                "--",
                &server.display().to_string(),
            ],
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let target = std::net::SocketAddr::new(std::net::IpAddr::V4(vip.addr()), 7000);
    lab.wait_tcp(Host::Client, target, Duration::from_secs(10))
        .unwrap();
    // wait_tcp's probe was a connection too; 100 requests over two more.
    let received = lab
        .in_host(Host::Client, || {
            use std::io::Read;
            let mut got = Vec::new();
            for c in 0..2 {
                let mut s = std::net::TcpStream::connect(target).unwrap();
                for i in 0..50 {
                    s.write_all(format!("req {c}-{i}\n").as_bytes()).unwrap();
                    let mut buf = [0u8; 1024];
                    let n = s.read(&mut buf).unwrap();
                    got.extend_from_slice(&buf[..n]);
                }
            }
            got
        })
        .unwrap();
    let out = run.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    // Replayed on another host, with no client: every request comes from
    // the log, every reply goes to the capture file.
    let capture = work.join("capture");
    let replay = lab
        .command_on(
            Host::Backup,
            &[
                RRC,
                "replay",
                "--log",
                &dir.display().to_string(),
                "--capture",
                &capture.display().to_string(),
                "--",
                &server.display().to_string(),
            ],
        )
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&replay.stderr);
    assert!(replay.status.success(), "{report}");
    assert!(report.contains(" 0 divergences"), "{report}");
    assert!(report.contains("end of the log reached"), "{report}");
    assert_eq!(
        String::from_utf8_lossy(&captured(&capture)),
        String::from_utf8_lossy(&received)
    );
    let _ = std::fs::remove_dir_all(&work);
}

/// 64-bit FNV-1a, as the rr_output fixture sums what it reads back.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(14695981039346656037u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(1099511628211)
    })
}

#[test]
fn a_replay_returns_what_output_and_wait_calls_returned_and_captures_every_output_call() {
    require_root();
    let work = scratch("replay-output");
    let (dir, recorded, _) = record_fixture(&work, "rr_output", b"");
    let field = |prefix: &str, n: usize| -> String {
        recorded
            .lines()
            .find_map(|l| l.strip_prefix(prefix))
            .and_then(|rest| rest.split_whitespace().nth(n))
            .unwrap_or_else(|| panic!("no `{prefix}` in {recorded}"))
            .trim_end_matches(',')
            .to_string()
    };
    let conn: i32 = field("accepted fd ", 0).parse().unwrap();
    assert!(recorded.contains("children left: none"), "{recorded}");
    assert!(recorded.contains("a child after some polls"), "{recorded}");

    // The log: every output call's result, short counts and EAGAIN too.
    let mut recs = records(&dir);
    recs.sort_by_key(|r| r.1);
    let eagain = -i64::from(libc::EAGAIN);
    let writes = |fd: i32| -> Vec<(WriteCall, i64)> {
        recs.iter()
            .filter_map(|(_, _, e)| match e {
                Owned::Write(call, f, ret) if *f == fd => Some((*call, *ret)),
                _ => None,
            })
            .collect()
    };
    let on_conn = writes(conn);
    assert_eq!(
        on_conn[..7],
        [
            (WriteCall::Write, 6),
            (WriteCall::Writev, 18),
            (WriteCall::Send, 5),
            (WriteCall::SendTo, 7),
            (WriteCall::SendMsg, 20),
            (WriteCall::SendFile, 6),
            (WriteCall::SendFile, 5),
        ]
    );
    let short: i64 = field("connection: ", 5).parse().unwrap();
    assert!(short > 0 && short < 50000, "{recorded}");
    let fill = &on_conn[7..];
    assert_eq!(
        fill[fill.len() - 2..],
        [(WriteCall::Write, short), (WriteCall::Write, eagain)]
    );
    assert!(
        fill[..fill.len() - 2]
            .iter()
            .all(|w| *w == (WriteCall::Write, 50000))
    );
    let pair_short: i64 = field("socket pair: ", 5).parse().unwrap();
    assert!(
        recs.iter().any(|r| matches!(r.2, Owned::Write(WriteCall::Write, fd, ret) if fd != conn && ret == pair_short))
            && recs.iter().any(|r| matches!(r.2, Owned::Write(WriteCall::Write, fd, ret) if fd != conn && ret == eagain)),
        "the socket pair's short write and EAGAIN are not in the log"
    );
    let waits: Vec<(WaitCall, i64, i32)> = recs
        .iter()
        .filter_map(|r| match r.2 {
            Owned::Wait(c, ret, st) => Some((c, ret, st)),
            _ => None,
        })
        .collect();
    let (last, polls) = waits.split_last().unwrap();
    assert_eq!(
        (last.0, last.1, last.2),
        (WaitCall::Waitid, 0, 5),
        "{waits:?}"
    );
    let (reaped, polls) = polls.split_last().unwrap();
    assert_eq!(reaped.0, WaitCall::Waitpid);
    assert!(reaped.1 > 0 && reaped.2 == 3 << 8, "{waits:?}");
    assert!(!polls.is_empty() && polls.iter().all(|w| *w == (WaitCall::Waitpid, 0, 0)));

    // The replay: the same output (short counts, EAGAIN, the polls, no
    // child left unreaped), and on the connection, captured instead of
    // sent, exactly the bytes the other end read when recorded.
    let bin = work.join("rr_output");
    let capture = work.join("capture");
    let out = Command::new(RRC)
        .args(["replay", "--log"])
        .arg(&dir)
        .arg("--capture")
        .arg(&capture)
        .arg("--")
        .arg(&bin)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{report}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), recorded);
    assert!(report.contains(" 0 divergences"), "{report}");
    assert!(report.contains("end of the log reached"), "{report}");
    let caught = capture_records(&capture);
    assert!(caught.iter().all(|r| r.fd() == conn as u32), "{caught:?}");
    assert_eq!(
        caught.last(),
        Some(&CaptureRecord::Closed { fd: conn as u32 })
    );
    let bytes: Vec<&[u8]> = caught
        .iter()
        .filter_map(|r| match r {
            CaptureRecord::Written { bytes, .. } => Some(&bytes[..]),
            CaptureRecord::Closed { .. } | CaptureRecord::ReadEarlier { .. } => None,
        })
        .collect();
    let calls: [&[u8]; 7] = [
        b"write|",
        b"writev-a|writev-b|",
        b"send|",
        b"sendto|",
        b"sendmsg-a|sendmsg-b|",
        b"456789",
        b"cdefg",
    ];
    assert_eq!(bytes[..7], calls);
    // The filling writes: the short one captured as far as it went.
    let filled: Vec<usize> = bytes[7..].iter().map(|b| b.len()).collect();
    let expected: Vec<usize> = fill[..fill.len() - 1]
        .iter()
        .map(|w| w.1 as usize)
        .collect();
    assert_eq!(filled, expected);
    let all = bytes.concat();
    assert_eq!(all.len().to_string(), field("read back ", 0));
    assert_eq!(format!("{:016x}", fnv1a(&all)), field("read back ", 5));
    let _ = std::fs::remove_dir_all(&work);
}
