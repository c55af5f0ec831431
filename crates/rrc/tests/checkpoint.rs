//! The checkpoint/restore engine through the CLI, as an outside conformance
//! suite drives it: `rrc checkpoint --pid PID --images DIR` then
//! `rrc restore --images DIR`, on the fixture programs of
//! `crates/rrc-ckpt/tests/fixtures` (each checks one kind of state and
//! prints PASS or FAIL after restore).

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;

/// Exit statuses reaped by [`reap_orphans`]: tests run side by side in
/// this process, and one test's reaping may take another's restored
/// fixture, whose verdict then finds its status here.
static REAPED: std::sync::Mutex<Vec<WaitStatus>> = std::sync::Mutex::new(Vec::new());

/// Reaps the killed tree's other processes, which were orphaned to us.
fn reap_orphans() {
    while let Ok(s) = waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
        if s == WaitStatus::StillAlive {
            break;
        }
        REAPED.lock().unwrap().push(s);
    }
}

/// How process `pid` ended, if it did (reaped here or by [`reap_orphans`]).
fn ended(pid: Pid) -> Option<i32> {
    let code = |s: WaitStatus| match s {
        WaitStatus::Exited(_, c) => Some(c),
        WaitStatus::Signaled(_, sig, _) => Some(128 + sig as i32),
        _ => None,
    };
    match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
        Ok(s) if s != WaitStatus::StillAlive => code(s),
        _ => {
            // Taken out: a process restored later with the same pid must
            // not be thought to have ended with it.
            let mut reaped = REAPED.lock().unwrap();
            let at = reaped.iter().position(|s| s.pid() == Some(pid))?;
            code(reaped.remove(at))
        }
    }
}

/// The test process adopts orphans, so that a restored fixture (whose
/// restorer exits) becomes its child and can be waited for.
fn become_subreaper() {
    nix::sys::prctl::set_child_subreaper(true).unwrap();
}

struct Running {
    pid: Pid,
    child: Option<Child>,
    log: PathBuf,
}

fn start(bin: &Path, dir: &Path) -> Running {
    start_with_stdin(bin, dir, Stdio::null())
}

fn start_with_stdin(bin: &Path, dir: &Path, stdin: Stdio) -> Running {
    let log = dir.join("fixture.log");
    let f = fs::File::create(&log).unwrap();
    let child = Command::new(bin)
        .current_dir(dir)
        .stdin(stdin)
        .stdout(f.try_clone().unwrap())
        .stderr(f)
        .spawn()
        .unwrap();
    let r = Running {
        pid: Pid::from_raw(child.id() as i32),
        child: Some(child),
        log,
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !r.log_text().contains("READY") {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for READY: {}",
            r.log_text()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // Let the state settle (threads reach their loops).
    std::thread::sleep(Duration::from_millis(300));
    r
}

impl Running {
    fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Tells the fixture to check itself; returns its exit code and log.
    fn verdict(mut self) -> (i32, String) {
        kill(self.pid, Signal::SIGUSR1).unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        let code = loop {
            let status = match &mut self.child {
                // Reaped by another test's [`reap_orphans`] (ECHILD): its
                // status is in REAPED.
                Some(c) => match c.try_wait() {
                    Ok(s) => s.map(|s| {
                        s.code().unwrap_or(
                            128 + std::os::unix::process::ExitStatusExt::signal(&s).unwrap_or(9),
                        )
                    }),
                    Err(_) => ended(self.pid),
                },
                None => ended(self.pid),
            };
            if let Some(c) = status {
                break c;
            }
            assert!(Instant::now() < deadline, "no verdict: {}", self.log_text());
            std::thread::sleep(Duration::from_millis(20));
        };
        (code, self.log_text())
    }
}

/// The processes of the tree rooted at `root`: it and its descendants.
fn tree_of(root: Pid) -> Vec<Pid> {
    let mut all = vec![root];
    let mut at = 0;
    while at < all.len() {
        let p = all[at];
        at += 1;
        for task in fs::read_dir(format!("/proc/{p}/task"))
            .into_iter()
            .flatten()
            .flatten()
        {
            let children = fs::read_to_string(task.path().join("children")).unwrap_or_default();
            all.extend(
                children
                    .split_whitespace()
                    .filter_map(|c| c.parse().ok())
                    .map(Pid::from_raw),
            );
        }
    }
    all
}

/// A path as compared: a deleted file is recreated where the restore
/// chooses, and pipes and sockets get new inode numbers.
/// A namespace file's link (`net:[4026532175]`) as the process of the tree
/// in that namespace (a restore makes the tree's namespaces again, with
/// new numbers); `None` for other links and other namespaces.
fn ns_of_tree(link: &str, tree: &[Pid]) -> Option<String> {
    let (kind, _) = link.split_once(":[")?;
    tree.iter()
        .find(|p| {
            fs::read_link(format!("/proc/{p}/ns/{kind}")).is_ok_and(|l| l.to_string_lossy() == link)
        })
        .map(|p| format!("the {kind} namespace of {p}"))
}

fn same_name(path: &str) -> String {
    if path.starts_with("pipe:[") {
        "pipe".into()
    } else if path.starts_with("socket:[") {
        "socket".into()
    } else if path.ends_with(" (deleted)")
        && !path.starts_with("/memfd:")
        && !path.starts_with("/SYSV")
    {
        "(deleted)".into()
    } else {
        path.into()
    }
}

/// Every integer-like option a server may set on a socket, as read back
/// (an option a socket does not have reads as its error, the same both
/// times).
fn socket_options(pid: Pid, fd: i32) -> String {
    use nix::sys::socket::{getsockopt, sockopt};
    let pidfd = rustix::process::pidfd_open(
        rustix::process::Pid::from_raw(pid.as_raw()).expect("a pid"),
        rustix::process::PidfdFlags::empty(),
    );
    let Ok(pidfd) = pidfd else {
        return "gone".into();
    };
    let Ok(s) = rustix::process::pidfd_getfd(&pidfd, fd, rustix::process::PidfdGetfdFlags::empty())
    else {
        return "gone".into();
    };
    let mut out = Vec::new();
    macro_rules! opt {
        ($($o:ident),*) => {$(
            out.push(format!("{}={:?}", stringify!($o), getsockopt(&s, sockopt::$o)));
        )*};
    }
    opt!(
        SockType,
        ReuseAddr,
        ReusePort,
        KeepAlive,
        Priority,
        OobInline,
        Mark,
        Linger,
        TcpNoDelay,
        TcpKeepIdle,
        TcpKeepCount,
        TcpKeepInterval,
        TcpUserTimeout,
        Ipv4Tos
    );
    out.join(" ")
}

/// What the kernel shows of the tree from outside, in the terms a restore
/// must keep: each process's fds (name, fdinfo, socket options), the room
/// in its fd table, and its maps.
/// Inode numbers, ids and timers' remaining times are left out.
fn outside_view(root: Pid) -> BTreeMap<String, String> {
    let mut view = BTreeMap::new();
    let tree = tree_of(root);
    for &p in &tree {
        let maps = fs::read_to_string(format!("/proc/{p}/maps")).unwrap_or_default();
        let maps: Vec<String> = maps
            .lines()
            .map(|l| {
                let w: Vec<&str> = l.splitn(6, ' ').collect();
                let path = w.get(5).map(|s| s.trim_start()).unwrap_or("");
                format!("{} {} {} {}", w[0], w[1], w[2], same_name(path))
            })
            .collect();
        view.insert(format!("{p} maps"), maps.join("\n"));
        let status = fs::read_to_string(format!("/proc/{p}/status")).unwrap_or_default();
        let fd_table = status.lines().find_map(|l| l.strip_prefix("FDSize:"));
        view.insert(
            format!("{p} fd table"),
            fd_table.unwrap_or("").trim().to_string(),
        );
        // Its pids, group and session at every pid namespace's level.
        for key in ["NSpid:", "NSpgid:", "NSsid:"] {
            let v = status.lines().find_map(|l| l.strip_prefix(key));
            view.insert(format!("{p} {key}"), v.unwrap_or("").trim().to_string());
        }
        // Each thread's credentials, capabilities and seccomp (each thread
        // has its own).
        for task in fs::read_dir(format!("/proc/{p}/task"))
            .into_iter()
            .flatten()
            .flatten()
        {
            let tid = task.file_name().to_string_lossy().into_owned();
            let status = fs::read_to_string(task.path().join("status")).unwrap_or_default();
            let identity: Vec<&str> = (status.lines())
                .filter(|l| {
                    let key = l.split(':').next().unwrap_or("");
                    [
                        "Uid",
                        "Gid",
                        "Groups",
                        "NoNewPrivs",
                        "Seccomp",
                        "Seccomp_filters",
                    ]
                    .contains(&key)
                        || key.starts_with("Cap")
                })
                .collect();
            view.insert(format!("{p} thread {tid} identity"), identity.join("; "));
        }
        let mut fds: Vec<i32> = fs::read_dir(format!("/proc/{p}/fd"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse().ok())
            .collect();
        fds.sort();
        for fd in fds {
            let link = fs::read_link(format!("/proc/{p}/fd/{fd}"))
                .map(|l| l.to_string_lossy().into_owned())
                .unwrap_or_default();
            let named = ns_of_tree(&link, &tree).unwrap_or_else(|| same_name(&link));
            view.insert(format!("{p} fd {fd}"), named);
            let info = fs::read_to_string(format!("/proc/{p}/fdinfo/{fd}")).unwrap_or_default();
            // A TUN/TAP file's position is the length of the last packet
            // read from it (the kernel sets it so, and no seek moves it).
            let tun = info.lines().any(|l| l.starts_with("iff:"));
            // Epoll targets are listed in the order of their files' kernel
            // addresses: sorted.
            let mut info: Vec<String> = info
                .lines()
                .filter(|l| {
                    let key = l.split(':').next().unwrap_or("");
                    let ignored = ["mnt_id", "ino", "eventfd-id", "it_value", "ticks"];
                    !(ignored.contains(&key) || tun && key == "pos")
                })
                .map(|l| match l.find(" pos:") {
                    Some(at) if l.starts_with("tfd:") => l[..at].trim_end().to_string(),
                    // A watch on a deleted file is on its recreation: the
                    // inode and the handle naming it are new.
                    _ if l.starts_with("inotify ") || l.starts_with("fanotify ino:") => (l
                        .split(' '))
                    .filter(|w| !w.starts_with("ino:") && !w.starts_with("f_handle:"))
                    .collect::<Vec<_>>()
                    .join(" "),
                    _ => l.to_string(),
                })
                .collect();
            info.sort_by_key(|l| l.starts_with("tfd:"));
            let first_tfd = info.iter().position(|l| l.starts_with("tfd:"));
            if let Some(at) = first_tfd {
                info[at..].sort();
            }
            view.insert(format!("{p} fdinfo {fd}"), info.join("; "));
            if link.starts_with("socket:[") {
                view.insert(format!("{p} sockopt {fd}"), socket_options(p, fd));
            }
        }
    }
    view
}

/// Checkpoint (killing the original), restore, check.
fn checkpoint_restore(name: &str) {
    checkpoint_restore_after(name, Duration::ZERO);
}

/// Checkpoint (killing the original), wait `down`, restore, check; gives
/// what the checkpoint said.
fn checkpoint_restore_after(name: &str, down: Duration) -> Out {
    checkpoint_restore_with(name, down, &[])
}

/// As [`checkpoint_restore_after`], the checkpoint given `options` too.
fn checkpoint_restore_with(name: &str, down: Duration, options: &[&str]) -> Out {
    require_root();
    become_subreaper();
    let dir = scratch(name);
    let bin = build(name, &dir);
    let mut run = start(&bin, &dir);
    let images = dir.join("images");
    let pid = run.pid.to_string();
    let before = outside_view(run.pid);
    let said = checkpoint_and_reap_with(&mut run, &images, options);
    std::thread::sleep(down);
    let out = rrc(&["restore", "--images", images.to_str().unwrap()]).ok();
    assert!(out.stdout.contains(&format!("root pid {pid}")), "{out:?}");
    // Seen from outside, nothing changed.
    let after = outside_view(run.pid);
    let keys: std::collections::BTreeSet<&String> = before.keys().chain(after.keys()).collect();
    // A deleted file with links left is the very file again, and so shows
    // under a name it still has.
    let relinked = |b: Option<&String>, a: Option<&String>| {
        b.is_some_and(|b| b == "(deleted)")
            && a.is_some_and(|a| fs::metadata(a).is_ok_and(|m| m.nlink() > 0))
    };
    // The restore may leave more room in an fd table (never less).
    let roomier = |k: &str, b: Option<&String>, a: Option<&String>| {
        let n = |v: Option<&String>| v.and_then(|v| v.parse::<u32>().ok());
        k.ends_with(" fd table") && n(a) >= n(b) && n(b).is_some()
    };
    let differ: Vec<String> = keys
        .into_iter()
        .filter(|k| {
            let (b, a) = (before.get(*k), after.get(*k));
            b != a && !relinked(b, a) && !roomier(k, b, a)
        })
        .map(|k| {
            format!(
                "{k}:\n  before {:?}\n  after  {:?}",
                before.get(k),
                after.get(k)
            )
        })
        .collect();
    let (code, log) = run.verdict();
    assert!(
        differ.is_empty(),
        "{name}: seen from outside, the restored tree differs:\n{}",
        differ.join("\n")
    );
    assert!(
        code == 0 && log.trim_end().ends_with("PASS"),
        "{name} after restore: exit {code}\n{log}"
    );
    let _ = fs::remove_dir_all(&dir);
    said
}

/// `rrc checkpoint --pid` of a running fixture, which kills it; the
/// original is reaped so that its pid is free again.
fn checkpoint_and_reap(run: &mut Running, images: &Path) -> Out {
    checkpoint_and_reap_with(run, images, &[])
}

/// As [`checkpoint_and_reap`], the checkpoint given `options` too.
fn checkpoint_and_reap_with(run: &mut Running, images: &Path, options: &[&str]) -> Out {
    let pid = run.pid.to_string();
    let tree = tree_of(run.pid);
    let mut args = vec![
        "checkpoint",
        "--pid",
        &pid,
        "--images",
        images.to_str().unwrap(),
    ];
    args.extend_from_slice(options);
    let out = rrc(&args).ok();
    assert!(out.stdout.contains("the original was killed"), "{out:?}");
    reap_killed(run, &tree);
    out
}

/// Reaps the killed original of `run` (so that its pid is free again) and
/// waits for the rest of its `tree` to be gone.
fn reap_killed(run: &mut Running, tree: &[Pid]) {
    // Reap the original so its pid is free again (another test's
    // [`reap_orphans`] may have reaped it first: its status is then in
    // REAPED).
    let code = match run.child.take().unwrap().wait() {
        Ok(status) => std::os::unix::process::ExitStatusExt::signal(&status).map(|s| 128 + s),
        Err(_) => {
            // Taken out, so that the restored process (same pid) is not
            // thought to have ended with it.
            let mut taken = None;
            wait_until("the original's status", Duration::from_secs(5), || {
                let mut reaped = REAPED.lock().unwrap();
                if let Some(at) = reaped.iter().position(|s| s.pid() == Some(run.pid)) {
                    taken = match reaped.remove(at) {
                        WaitStatus::Signaled(_, sig, _) => Some(128 + sig as i32),
                        WaitStatus::Exited(_, c) => Some(c),
                        _ => None,
                    };
                    return true;
                }
                false
            });
            taken
        }
    };
    assert_eq!(code, Some(128 + 9));
    // The rest of the tree comes to this subreaper as it dies (the first
    // process of a pid namespace only once the others in it are reaped).
    wait_until("the tree's processes gone", Duration::from_secs(10), || {
        reap_orphans();
        tree.iter()
            .all(|p| !Path::new(&format!("/proc/{p}")).exists())
    });
}

/// `rrc restore --lazy-pages`: the program runs before its memory is in
/// (the copy slowed down for the test), and what it does meanwhile (a
/// read() into memory not yet there, a discard, an mremap, a fork whose
/// child checks its own copy) sees the checkpointed contents.
#[test]
fn lazy_pages_serve_a_program_that_reads_discards_moves_and_forks_meanwhile() {
    use std::io::{BufRead, Read};
    require_root();
    become_subreaper();
    let dir = scratch("mem_lazy");
    let bin = build("mem_lazy", &dir);
    let mut run = start(&bin, &dir);
    let images = dir.join("images");
    let pid = run.pid.to_string();
    checkpoint_and_reap(&mut run, &images);
    let mut restore = Command::new(RRC)
        .args(["restore", "--lazy-pages", "--images"])
        .arg(&images)
        .env("RRC_LAZY_PAGES_PACE_US", "20000")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(restore.stdout.take().unwrap());
    let mut first = String::new();
    out.read_line(&mut first).unwrap();
    assert!(first.contains(&format!("root pid {pid}")), "{first}");
    // At once: the copy takes seconds at this pace.
    let (code, log) = run.verdict();
    let mut rest = String::new();
    out.read_to_string(&mut rest).unwrap();
    let status = restore.wait().unwrap();
    assert!(
        code == 0 && log.trim_end().ends_with("PASS"),
        "mem_lazy after restore: exit {code}\n{log}\n{rest}"
    );
    assert!(status.success(), "rrc restore: {status:?}\n{rest}");
    assert!(
        rest.contains("memory in:") && rest.contains("1 child(ren) forked meanwhile"),
        "the program's fork did not come while its memory was copied in: {rest}"
    );
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn memory_private_anonymous_heap_stack_and_layout() {
    checkpoint_restore("mem_anon");
}

#[test]
fn memory_of_a_process_with_no_descriptor_left() {
    checkpoint_restore("mem_fd_table_full");
}

#[test]
fn private_memory_shared_copy_on_write_with_children_stays_shared() {
    checkpoint_restore("mem_cow");
}

#[test]
fn memory_shared_memfd_sysv_and_files() {
    checkpoint_restore("mem_shared");
}

#[test]
fn registers_general_vector_and_fs_base() {
    checkpoint_restore("regs");
}

#[test]
fn threads_ids_tls_masks_altstacks_names() {
    checkpoint_restore("threads");
}

#[test]
fn seccomp_filters_that_differ_between_threads_come_back_thread_by_thread() {
    checkpoint_restore("seccomp_threads");
}

#[test]
fn a_process_in_seccomps_strict_mode_is_in_it_again() {
    checkpoint_restore("seccomp_strict");
}

#[test]
fn threads_under_load_keep_computing() {
    checkpoint_restore("threads_load");
}

#[test]
fn signal_handlers_masks_pending_signals() {
    checkpoint_restore("signals");
}

#[test]
fn process_tree_sessions_groups_pipes() {
    checkpoint_restore("tree");
}

#[test]
fn sessions_kept_from_before_a_setsid_or_of_an_exited_leader_and_fs_ids() {
    checkpoint_restore("sessions");
}

#[test]
fn posix_ofd_and_flock_locks_held_by_their_owners() {
    checkpoint_restore("locks");
}

#[test]
fn read_and_write_leases_are_held_again_and_still_break() {
    checkpoint_restore("locks_lease");
}

#[test]
fn fanotify_marks_on_files_directories_mounts_and_filesystems_report_again() {
    checkpoint_restore("fanotify");
}

#[test]
fn pidfds_of_processes_zombies_threads_and_reaped_processes_come_back() {
    checkpoint_restore("pidfds");
}

#[test]
fn zombies_keep_their_pid_and_exit_status() {
    checkpoint_restore("zombies");
}

#[test]
fn inotify_watches_with_their_descriptors() {
    checkpoint_restore("inotify");
}

#[test]
fn credentials_limits_and_process_attributes() {
    checkpoint_restore("creds_misc");
}

#[test]
fn interval_posix_and_timerfd_timers() {
    checkpoint_restore("timers");
}

#[test]
fn file_descriptors_of_every_kind() {
    checkpoint_restore("fds");
}

#[test]
fn tcp_listeners_and_connections_with_queued_data() {
    checkpoint_restore("sk_tcp");
}

#[test]
fn tcp_half_closed_connections() {
    checkpoint_restore("sk_tcp_halfclosed");
}

#[test]
fn udp_sockets_bound_and_connected() {
    checkpoint_restore("sk_udp");
}

#[test]
fn unix_sockets_pairs_named_abstract_with_queued_messages() {
    checkpoint_restore("sk_unix");
}

/// The peer, outside the tree, keeps sending while the tree is down: the
/// connection's packets are held back until the restore, not answered
/// with a reset.
#[test]
fn tcp_with_full_queues_and_a_peer_outside_the_tree() {
    let said = checkpoint_restore_after("sk_tcp_outside", Duration::from_secs(3));
    let table = said
        .stdout
        .split_whitespace()
        .find(|w| w.starts_with("rrc_lock_"))
        .unwrap_or_else(|| panic!("the checkpoint names its network lock: {said:?}"))
        .to_string();
    let tables = Command::new("nft")
        .args(["list", "tables"])
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&tables.stdout).contains(&table),
        "the restore lifts the network lock {table}"
    );
}

/// Datagram sockets connected one way and both ways by name, a listener
/// with connections not yet accepted, shut-down and widowed sockets, and a
/// connection to a process outside the tree, which comes back with its
/// peer closed and is said so.
#[test]
fn unix_sockets_connected_by_name_pending_shut_down_and_outside() {
    let said = checkpoint_restore_after("sk_unix_more", Duration::ZERO);
    assert!(
        said.stderr.contains(
            "a unix socket connected to a process outside the tree comes back with its peer closed"
        ),
        "{said:?}"
    );
}

#[test]
fn socket_options_set_and_default_on_every_kind_of_socket() {
    checkpoint_restore("sk_options");
}

/// Checkpointing `fixture` is refused with an error naming `what`, leaves
/// no image, and the original carries on.
fn refused(fixture: &str, what: &str) {
    refused_for_each(fixture, &[what]);
}

/// As [`refused`], the error naming each of `whats`.
fn refused_for_each(fixture: &str, whats: &[&str]) {
    require_root();
    become_subreaper();
    let dir = scratch(fixture);
    let bin = build(fixture, &dir);
    let run = start(&bin, &dir);
    let images = dir.join("images");
    let out = rrc(&[
        "checkpoint",
        "--pid",
        &run.pid.to_string(),
        "--images",
        images.to_str().unwrap(),
    ]);
    let out = out.fails_with(whats[0]);
    for what in &whats[1..] {
        assert!(out.stderr.contains(what), "expected {what:?} in: {out:?}");
    }
    assert!(
        fs::read_dir(&images).map(|d| d.count()).unwrap_or(0) == 0,
        "a refused checkpoint leaves no image"
    );
    let (code, log) = run.verdict();
    assert_eq!(code, 0, "the original must carry on untouched: {log}");
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn tcp_connections_under_way_complete_after_restore() {
    checkpoint_restore("sk_tcp_syn_sent");
}

#[test]
fn files_in_flight_on_datagram_sockets_connected_by_name_arrive_after_restore() {
    checkpoint_restore("sk_unix_scm_rights_by_name");
}

#[test]
fn an_epoll_registration_on_a_file_only_in_flight_comes_back_on_that_file() {
    checkpoint_restore("epoll_in_flight");
}

#[test]
fn files_in_flight_on_stream_and_seqpacket_sockets_arrive_after_restore() {
    checkpoint_restore("sk_unix_scm_rights");
}

#[test]
fn files_in_flight_on_datagram_pairs_and_bound_sockets_arrive_after_restore() {
    checkpoint_restore("sk_unix_scm_rights_dgram");
}

#[test]
fn pidfds_of_processes_outside_the_tree_are_refused_by_name_and_left_running() {
    refused_for_each(
        "unsupported_pidfds",
        &["fd 40: a pidfd of process", "outside the tree"],
    );
}

#[test]
fn fanotify_permission_groups_are_refused_by_name_and_left_running() {
    refused(
        "unsupported_fanotify",
        "fd 60 (anon_inode:[fanotify]): a fanotify group for permission events",
    );
}

#[test]
fn inotify_watches_on_deleted_files_held_only_by_a_mapping_are_made_on_its_recreation() {
    checkpoint_restore("inotify_deleted_mapped");
}

#[test]
fn inotify_watches_on_deleted_files_held_open_report_again() {
    checkpoint_restore("inotify_deleted");
}

#[test]
fn fanotify_marks_on_deleted_files_held_open_report_again() {
    checkpoint_restore("fanotify_deleted");
}

#[test]
fn a_lease_being_broken_is_refused_by_name_and_left_running() {
    refused("unsupported_lease_breaking", "a lease being broken");
}

#[test]
fn leave_running_then_restore_after_the_original_ends() {
    require_root();
    become_subreaper();
    let dir = scratch("leave");
    let bin = build("threads", &dir);
    let run = start(&bin, &dir);
    let images = dir.join("images");
    let pid = run.pid.to_string();
    let img = images.to_str().unwrap();
    let out = rrc(&[
        "checkpoint",
        "--pid",
        &pid,
        "--images",
        img,
        "--leave-running",
    ])
    .ok();
    assert!(!out.stdout.contains("killed"), "{out:?}");
    // While the original lives its pids are taken.
    rrc(&["restore", "--images", img]).fails_with(&format!("pid {pid} is in use"));
    let log_before = run.log_text();
    let (code, log) = run.verdict();
    assert_eq!(code, 0, "the original goes on after a checkpoint: {log}");
    // Now a second life from the image, checked in a fresh log.
    fs::write(dir.join("fixture.log"), &log_before).unwrap();
    let out = rrc(&["restore", "--images", img]).ok();
    assert!(out.stdout.contains(&format!("root pid {pid}")), "{out:?}");
    let again = Running {
        pid: Pid::from_raw(pid.parse().unwrap()),
        child: None,
        log: dir.join("fixture.log"),
    };
    let (code, log) = again.verdict();
    assert!(code == 0 && log.trim_end().ends_with("PASS"), "{log}");
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn bad_checkpoint_and_restore_input() {
    require_root();
    let dir = scratch("bad");
    rrc(&[
        "checkpoint",
        "--pid",
        "999999999",
        "--images",
        dir.join("x").to_str().unwrap(),
    ])
    .fails_with("no process 999999999");
    fs::write(dir.join("junk"), "x").unwrap();
    rrc(&[
        "checkpoint",
        "--pid",
        "1",
        "--images",
        dir.to_str().unwrap(),
    ])
    .fails_with("not empty");
    rrc(&["restore", "--images", dir.join("missing").to_str().unwrap()])
        .fails_with("manifest.json");
    fs::write(dir.join("manifest.json"), "{}").unwrap();
    rrc(&["restore", "--images", dir.to_str().unwrap()]).fails_with("unusable");
    let _ = fs::remove_dir_all(&dir);
}

/// An image holds a process's memory: only its owner may read it.
fn assert_private(images: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(images), 0o700, "{}", images.display());
    for e in fs::read_dir(images).unwrap().flatten() {
        let m = mode(&e.path());
        assert_eq!(m & 0o077, 0, "{} is {m:o}", e.path().display());
    }
}

#[test]
fn a_checkpoint_that_fails_on_a_full_disk_leaves_the_tree_and_its_connections_running() {
    // Whatever file of the image the disk fills at (too few inodes for
    // the last files, too few bytes for the memory), and whether the tree
    // was to be left running or killed, a failed checkpoint leaves the
    // tree running with its TCP connections out of repair mode (in repair
    // mode its next send would fail), and no image behind.
    require_root();
    become_subreaper();
    let dir = scratch("diskfull");
    let bin = build("sk_tcp", &dir);
    let run = start(&bin, &dir);
    let pid = run.pid.to_string();
    let mut failures = 0;
    // As many inodes as the image has files and fewer (its directory and
    // the file system's root take one each): every file of it in turn is
    // the first that finds no room.
    let whole = dir.join("whole");
    let out = rrc(&[
        "checkpoint",
        "--pid",
        &pid,
        "--images",
        whole.to_str().unwrap(),
        "--leave-running",
    ]);
    assert_eq!(out.code, 0, "{out:?}");
    let files: Vec<u64> = fs::read_dir(&whole)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .collect();
    fs::remove_dir_all(&whole).unwrap();
    let mut limits: Vec<String> = (2..=files.len() + 1)
        .map(|n| format!("size=64m,nr_inodes={n}"))
        .collect();
    // And too few bytes: a sixth and a half of the image's.
    let bytes: u64 = files.iter().sum();
    limits.extend([bytes / 6, bytes / 2].map(|b| format!("size={}k", (b / 1024).max(4))));
    for (i, opts) in limits.iter().enumerate() {
        let fs_dir = SmallFs::mount(dir.join(format!("small-{i}")), opts);
        let images = fs_dir.0.join("img");
        let mut args = vec!["checkpoint", "--pid", &pid, "--images"];
        args.push(images.to_str().unwrap());
        let leave = i % 2 == 0;
        if leave {
            args.push("--leave-running");
        }
        let out = rrc(&args);
        if out.code == 0 {
            if !leave {
                // The tree is gone: its connections' lock goes too.
                if let Some(table) = out
                    .stdout
                    .split_whitespace()
                    .find(|w| w.starts_with("rrc_lock_"))
                {
                    let _ = Command::new("nft")
                        .args(["delete", "table", "inet", table])
                        .status();
                }
            }
            assert!(
                leave,
                "a checkpoint that kills the tree cannot succeed on {opts}: {out:?}"
            );
            assert_private(&images);
            fs::remove_dir_all(&images).unwrap();
            continue;
        }
        failures += 1;
        assert!(
            out.stderr.contains("No space left") || out.stderr.contains("space"),
            "on {opts}: {out:?}"
        );
        assert!(
            process_alive(run.pid.as_raw().into()),
            "the tree died on {opts}"
        );
        let left: Vec<_> = fs::read_dir(&images)
            .map(|rd| rd.flatten().map(|e| e.file_name()).collect())
            .unwrap_or_default();
        assert!(
            left.is_empty(),
            "a failed checkpoint left {left:?} on {opts}"
        );
    }
    // Every limit is below what the image needs.
    assert_eq!(
        failures,
        limits.len(),
        "the disk filled only {failures} times of {}",
        limits.len()
    );
    let (code, log) = run.verdict();
    assert!(
        code == 0 && log.trim_end().ends_with("PASS"),
        "after the failed checkpoints: exit {code}\n{log}"
    );
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn a_deleted_file_is_recreated_where_the_restore_chooses_without_set_id_bits() {
    // The image says where the deleted file was and with what mode; a
    // restore writes nothing at a host path on an image's say-so, and
    // makes no set-id file: the file comes back, with its permission bits,
    // from a directory of the restore's own.
    require_root();
    become_subreaper();
    let dir = scratch("ghost");
    let bin = build("fds", &dir);
    let mut run = start(&bin, &dir);
    let images = dir.join("images");
    let pid = run.pid.to_string();
    rrc(&[
        "checkpoint",
        "--pid",
        &pid,
        "--images",
        images.to_str().unwrap(),
    ])
    .ok();
    run.child.take().unwrap().wait().unwrap();
    reap_orphans();
    let elsewhere = dir.join("no-such-dir").join("victim");
    let manifest = images.join("manifest.json");
    let mut m: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(&manifest).unwrap()).unwrap();
    let deleted = m["files"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .find(|f| f["kind"]["deleted"] == true)
        .expect("the fixture has a deleted file open");
    deleted["kind"]["path"] = elsewhere.to_str().unwrap().into();
    let mode = deleted["kind"]["mode"].as_u64().unwrap();
    deleted["kind"]["mode"] = (mode | 0o6000).into();
    fs::write(&manifest, serde_json::to_vec(&m).unwrap()).unwrap();
    let out = rrc(&["restore", "--images", images.to_str().unwrap()]).ok();
    assert!(out.stdout.contains(&format!("root pid {pid}")), "{out:?}");
    assert!(!elsewhere.exists() && !elsewhere.parent().unwrap().exists());
    // The fixture checks the file's content, offset and mode (its own,
    // without the set-id bits the image added).
    let (code, log) = run.verdict();
    assert!(
        code == 0 && log.trim_end().ends_with("PASS"),
        "after restore: exit {code}\n{log}"
    );
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn file_status_flags_close_on_exec_and_owners() {
    checkpoint_restore("fd_flags");
}

#[test]
fn epoll_registrations_by_open_file_with_every_flag() {
    checkpoint_restore("epoll_files");
}

#[test]
fn a_child_sharing_its_parents_fd_table_keeps_sharing_it() {
    checkpoint_restore("fd_shared_table");
}

#[test]
fn siblings_sharing_an_fd_table_their_parent_left_keep_sharing_it() {
    checkpoint_restore("fd_shared_siblings");
}

#[test]
fn a_uts_namespace_of_a_process_of_the_tree_comes_back_with_its_names() {
    checkpoint_restore("uts_own");
}

#[test]
fn a_cgroup_namespace_of_a_process_of_the_tree_comes_back_rooted_where_it_was() {
    checkpoint_restore("cgroupns_own");
}

#[test]
fn an_ipc_namespace_of_a_process_of_the_tree_keeps_its_semaphores_queues_and_limits() {
    checkpoint_restore("ipc_own");
}

#[test]
fn a_network_namespace_of_a_process_comes_back_with_its_loopback_and_sockets() {
    checkpoint_restore("netns_own");
}

#[test]
fn a_network_namespace_keeps_its_addresses_routes_and_nftables_rules() {
    checkpoint_restore("netns_routes");
}

#[test]
fn tun_and_tap_interfaces_of_a_network_namespace_come_back_with_their_files_attached() {
    checkpoint_restore("netns_tun");
}

#[test]
fn tun_files_of_the_hosts_interfaces_or_of_detached_queues_are_refused_and_left_running() {
    refused_for_each(
        "unsupported_tun",
        &[
            "which is not one of a network namespace the tree made",
            "with queues detached",
            "a queue detached from TUN/TAP interface fxv0",
        ],
    );
}

/// The peers come back in the restorer's namespace with their names,
/// MACs, MTUs, indexes, bridge, addresses and routes, and a TCP
/// connection through one carries on.
#[test]
fn veths_to_the_checkpointers_namespace_come_back_with_their_peers() {
    let _bridge = RemoveBridgesLeft;
    checkpoint_restore("netns_veth_host");
}

/// The bridges `netns_veth_host` makes in the host's namespace (`fxbPID`)
/// are removed by the fixture as it ends; one whose fixture is gone (a
/// failed run) goes at the end of the test.
struct RemoveBridgesLeft;

impl Drop for RemoveBridgesLeft {
    fn drop(&mut self) {
        let Ok(out) = Command::new("ip")
            .args(["-o", "link", "show", "type", "bridge"])
            .output()
        else {
            return;
        };
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let name = line.split(": ").nth(1).unwrap_or("");
            let Some(pid) = name
                .strip_prefix("fxb")
                .filter(|p| p.parse::<u32>().is_ok())
            else {
                continue;
            };
            if !Path::new(&format!("/proc/{pid}")).exists() {
                let _ = Command::new("ip").args(["link", "del", name]).status();
            }
        }
    }
}

/// Unix connections not yet accepted whose clients sent data, one of them
/// from outside the tree: the checkpoint waits for the program to accept
/// them (it does 1.5 s after it is ready), and they come back.
#[test]
fn unix_connections_waiting_with_data_put_a_checkpoint_off_until_accepted() {
    require_root();
    become_subreaper();
    let dir = scratch("unix_backlog");
    let bin = build("unix_backlog", &dir);
    let mut run = start(&bin, &dir);
    let images = dir.join("images");
    checkpoint_and_reap(&mut run, &images);
    let out = rrc(&["restore", "--images", images.to_str().unwrap()]).ok();
    assert!(
        out.stdout.contains(&format!("root pid {}", run.pid)),
        "{out:?}"
    );
    let (code, log) = run.verdict();
    assert!(code == 0 && log.trim_end().ends_with("PASS"), "{log}");
    let _ = fs::remove_dir_all(&dir);
}

/// A program that does not accept them: the checkpoint is refused as
/// "not now" once it has waited, and the tree goes on untouched.
#[test]
fn unix_connections_never_accepted_refuse_a_checkpoint_as_not_now() {
    require_root();
    become_subreaper();
    let dir = scratch("unix_backlog_never");
    let bin = build("unix_backlog", &dir);
    fs::write(dir.join("never"), "").unwrap();
    let run = start(&bin, &dir);
    let images = dir.join("images");
    let pid = run.pid.to_string();
    let args = [
        "checkpoint",
        "--pid",
        &pid,
        "--images",
        images.to_str().unwrap(),
    ];
    let out = rrc(&args).fails_with("cannot checkpoint now");
    assert!(
        out.stderr
            .contains("1 from outside the tree, 1 with data sent"),
        "{out:?}"
    );
    let (code, log) = run.verdict();
    assert!(code == 0 && log.trim_end().ends_with("PASS"), "{log}");
    let _ = fs::remove_dir_all(&dir);
}

/// A network emulator's hosts: both ends come back in their namespaces,
/// with a connection through them.
#[test]
fn veths_between_network_namespaces_of_the_tree_come_back_with_their_ends() {
    checkpoint_restore("netns_veth_tree");
}

#[test]
fn a_veth_to_a_network_namespace_no_process_is_in_is_refused_and_left_running() {
    refused(
        "unsupported_netns",
        "whose peer is in a network namespace other than the checkpointer's or the tree's",
    );
}

#[test]
fn message_queues_of_a_nested_ipc_namespace_come_back_there_even_with_the_roots_names() {
    checkpoint_restore("mqueue_own_ns");
}

#[test]
fn segments_of_a_nested_ipc_namespace_come_back_there_even_with_the_roots_ids() {
    checkpoint_restore("ipc_own_segments");
}

#[test]
fn posix_message_queues_keep_their_messages_limits_and_descriptions() {
    // In the host's IPC namespace the queue outlives the killed tree and
    // is found again by its name; the unlinked one is made again.
    checkpoint_restore("posix_mqueue");
}

/// The default refuses them ([`linux_aio_is_refused_by_name_and_left_running`]).
#[test]
fn aio_contexts_with_unread_and_wrapped_completions_come_back_with_aio_idle() {
    checkpoint_restore_with("aio", Duration::ZERO, &["--aio-idle"]);
}

/// A series carries them too: each checkpoint reads the rings again, and
/// the last one restores them.
#[test]
fn aio_contexts_come_back_from_the_last_checkpoint_of_a_series() {
    require_root();
    become_subreaper();
    let dir = scratch("aio_series");
    let bin = build("aio", &dir);
    let mut run = start(&bin, &dir);
    let series = dir.join("series");
    let pid = run.pid.to_string();
    let tree = tree_of(run.pid);
    let out = rrc(&[
        "checkpoint",
        "--pid",
        &pid,
        "--images",
        series.to_str().unwrap(),
        "--every",
        "50ms",
        "--count",
        "3",
        "--aio-idle",
    ])
    .ok();
    assert!(out.stdout.contains("3 checkpoints"), "{out:?}");
    kill(run.pid, Signal::SIGKILL).unwrap();
    reap_killed(&mut run, &tree);
    let out = rrc(&["restore", "--images", series.to_str().unwrap()]).ok();
    assert!(out.stdout.contains(&format!("root pid {pid}")), "{out:?}");
    let (code, log) = run.verdict();
    assert!(
        code == 0 && log.trim_end().ends_with("PASS"),
        "aio after a series: exit {code}\n{log}"
    );
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn a_pseudo_terminal_pair_the_tree_holds_comes_back_with_its_session() {
    checkpoint_restore("pty");
}

#[test]
fn a_message_queue_someone_awaits_a_notification_from_is_refused_and_left_running() {
    refused("unsupported_mq_notify", "mq_notify");
}

#[test]
fn a_namespace_file_of_a_namespace_outside_the_tree_is_refused_and_left_running() {
    refused("unsupported_ns_fd", "no process of the tree is in");
}

#[test]
fn namespace_files_held_open_name_the_same_namespaces_after_restore() {
    checkpoint_restore("ns_files");
}

#[test]
fn a_fuse_connection_is_refused_and_left_running() {
    refused("unsupported_fuse", "a FUSE connection");
}

#[test]
fn a_pseudo_terminal_pair_in_packet_and_raw_mode_keeps_its_unread_output_and_input() {
    checkpoint_restore("pty_raw");
}

#[test]
fn a_pseudo_terminal_with_input_not_read_yet_in_canonical_mode_is_refused_and_left_running() {
    refused(
        "unsupported_pty_input",
        "input its programs have not read yet, in canonical mode",
    );
}

/// A pseudo-terminal pair: its master, and its terminal opened.
fn pty_pair() -> (fs::File, fs::File) {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    let open = |path: &str| {
        fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOCTTY)
            .open(path)
            .unwrap()
    };
    let master = open("/dev/ptmx");
    let unlock: libc::c_int = 0;
    let mut n: libc::c_uint = 0;
    // SAFETY: both ioctls take a pointer to an int the call reads or fills.
    unsafe {
        assert_eq!(
            libc::ioctl(master.as_raw_fd(), libc::TIOCSPTLCK, &unlock),
            0
        );
        assert_eq!(libc::ioctl(master.as_raw_fd(), libc::TIOCGPTN, &mut n), 0);
    }
    let terminal = open(&format!("/dev/pts/{n}"));
    (master, terminal)
}

#[test]
fn the_terminal_a_tree_was_started_from_is_the_restorers_after_restore() {
    // The fixture's stdin is a terminal whose master the test holds: not
    // opened again by its path (/dev/pts/N may be another's by then), the
    // terminal `rrc restore` runs on stands in, as for a pipe.
    require_root();
    become_subreaper();
    let name = "tty_stdio";
    let dir = scratch(name);
    let bin = build(name, &dir);
    let (first, first_tty) = pty_pair();
    let mut run = start_with_stdin(&bin, &dir, Stdio::from(first_tty));
    let images = dir.join("images");
    checkpoint_and_reap(&mut run, &images);
    drop(first);
    let (second, second_tty) = pty_pair();
    let mut restore = Command::new(RRC);
    restore
        .args(["restore", "--images", images.to_str().unwrap()])
        .stdin(Stdio::from(second_tty));
    // Not `output`, which gives its command no stdin.
    let restored = restore.output().unwrap();
    assert!(restored.status.success(), "{restored:?}");
    let (code, log) = run.verdict();
    assert!(
        code == 0 && log.trim_end().ends_with("PASS"),
        "{name} after restore: exit {code}\n{log}"
    );
    // What the restored fixture wrote to its fd 0 is on the second pair.
    let mut said = Vec::new();
    let fd = std::os::fd::AsFd::as_fd(&second);
    let line = "said through the restorer's terminal";
    wait_until("the fixture's line", Duration::from_secs(10), || {
        let mut pfd = [nix::poll::PollFd::new(fd, nix::poll::PollFlags::POLLIN)];
        if nix::poll::poll(&mut pfd, nix::poll::PollTimeout::ZERO).unwrap_or(0) > 0 {
            let mut buf = [0u8; 256];
            if let Ok(n) = nix::unistd::read(fd, &mut buf) {
                said.extend_from_slice(&buf[..n]);
            }
        }
        String::from_utf8_lossy(&said).contains(line)
    });
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn securebits_come_back_locked_with_the_capabilities_they_were_set_with() {
    checkpoint_restore("securebits");
}

#[test]
fn time_namespaces_of_the_tree_keep_their_clocks_and_members() {
    checkpoint_restore("timens");
}

#[test]
fn processes_in_nested_pid_namespaces_keep_their_pids_at_every_level() {
    checkpoint_restore("pidns_nested");
}

#[test]
fn pipes_full_grown_packet_widowed_and_shared() {
    checkpoint_restore("pipes");
}

#[test]
fn file_mappings_writable_later_advised_and_deleted() {
    checkpoint_restore("mem_files");
}

#[test]
fn deleted_files_and_directories_and_a_chrooted_working_directory() {
    checkpoint_restore("files_deleted");
}

#[test]
fn time_namespaces_of_user_namespaces_come_back_in_them() {
    checkpoint_restore("userns_timens");
}

#[test]
fn a_time_namespace_of_another_user_namespace_than_its_process_is_refused_and_left_running() {
    refused(
        "unsupported_namespaces",
        "time namespace belongs to a user namespace other than its own",
    );
}

/// `rrc checkpoint --pid PID`, the tree killed, into `images`.
fn checkpoint_pid(pid: i32, images: &Path) {
    let pid = pid.to_string();
    let images = images.to_str().unwrap();
    let out = rrc(&["checkpoint", "--pid", &pid, "--images", images]).ok();
    assert!(out.stdout.contains("the original was killed"), "{out:?}");
}

/// Runs fixture `name` as the first process of a pid namespace of its own
/// with its own /proc (`unshare -pf --mount-proc`), checkpoints it by its
/// pid, restores it and expects its checks to pass and its pid to be the
/// same.
fn checkpoint_restore_as_pid_namespace_root(name: &str) {
    require_root();
    become_subreaper();
    let dir = scratch(&format!("{name}_pidns_root"));
    let bin = build(name, &dir);
    let log = dir.join("fixture.log");
    let f = fs::File::create(&log).unwrap();
    let mut outer = Command::new("unshare")
        .args(["-pf", "--mount-proc"])
        .arg(&bin)
        .current_dir(&dir)
        .stdout(f.try_clone().unwrap())
        .stderr(f)
        .spawn()
        .unwrap();
    let text = || fs::read_to_string(&log).unwrap_or_default();
    wait_until("READY", Duration::from_secs(10), || {
        text().contains("READY")
    });
    std::thread::sleep(Duration::from_millis(300));
    let outer_pid = outer.id();
    let first: i32 = fs::read_to_string(format!("/proc/{outer_pid}/task/{outer_pid}/children"))
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let images = dir.join("images");
    checkpoint_pid(first, &images);
    let _ = outer.wait();
    let out = rrc(&["restore", "--images", images.to_str().unwrap()]).ok();
    let root: i32 = (out.stdout.split("root pid ").nth(1))
        .and_then(|r| r.trim().parse().ok())
        .unwrap_or_else(|| panic!("no root pid: {out:?}"));
    kill(Pid::from_raw(root), Signal::SIGUSR1).unwrap();
    wait_until("the verdict", Duration::from_secs(20), || {
        text().contains("PASS") || text().contains("FAIL")
    });
    let said = text();
    assert_eq!(
        root, first,
        "the root's pid outside its namespace is not kept"
    );
    wait_until("the restored root's end", Duration::from_secs(10), || {
        reap_orphans();
        !Path::new(&format!("/proc/{root}")).exists()
    });
    let _ = fs::remove_dir_all(&dir);
    assert!(
        said.contains("PASS") && !said.contains("FAIL"),
        "{name}: {said}"
    );
}

#[test]
fn a_pid_namespaces_first_process_gets_its_uts_network_and_cgroup_namespaces_back() {
    // A `--pid` tree whose root is pid 1 of its own pid namespace, not a
    // container's: its other namespaces are the tree's to make again too.
    checkpoint_restore_as_pid_namespace_root("ns_root");
}

#[test]
fn a_pid_namespaces_first_process_gets_its_mount_namespace_and_proc_back() {
    checkpoint_restore_as_pid_namespace_root("mntns_root");
}

/// Process `pid`'s mount table as it sees it, without the numbers a new
/// mount gets (ids, peer groups): place, root, flags, propagation kinds,
/// type, source and options of each mount.
fn mount_table(pid: i32) -> Vec<String> {
    fs::read_to_string(format!("/proc/{pid}/mountinfo"))
        .unwrap_or_default()
        .lines()
        .map(|l| {
            let w: Vec<&str> = l.split(' ').collect();
            let kinds: Vec<&str> = (w[6..].iter())
                .take_while(|f| **f != "-")
                .map(|f| f.split(':').next().unwrap_or(""))
                .collect();
            let dash = w.iter().position(|f| *f == "-").unwrap_or(w.len());
            format!(
                "{} {} {} [{}] {}",
                w[4],
                w[3],
                w[5],
                kinds.join(","),
                w[dash..].join(" ")
            )
        })
        .collect()
}

#[test]
fn a_bubblewrap_sandbox_comes_back_with_its_root_and_mounts() {
    // bwrap's sandbox: user, pid and mount namespaces of its own, a root
    // of its own (a directory of a tmpfs, `pivot_root`) with links to the
    // host's /usr bound read-only, /proc, a /dev of its own (a tmpfs with
    // the host's device nodes bound on files, a devpts), a tmpfs /tmp with
    // the test's directory bound in it; fixture `threads` runs there.
    require_root();
    become_subreaper();
    let dir = scratch("bwrap");
    let bin = build("threads", &dir);
    let log = dir.join("fixture.log");
    let f = fs::File::create(&log).unwrap();
    let d = dir.to_str().unwrap();
    let mut child = Command::new("bwrap")
        .args(["--ro-bind", "/usr", "/usr"])
        .args(["--symlink", "usr/lib", "/lib"])
        .args(["--symlink", "usr/lib64", "/lib64"])
        .args(["--symlink", "usr/bin", "/bin"])
        .args(["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp"])
        .args(["--bind", d, d, "--chdir", d])
        .args(["--unshare-pid", "--unshare-user", "--uid", "0", "--"])
        .arg(&bin)
        .stdout(f.try_clone().unwrap())
        .stderr(f)
        .spawn()
        .expect("bwrap (scripts/setup installs it)");
    let text = || fs::read_to_string(&log).unwrap_or_default();
    wait_until("READY", Duration::from_secs(10), || {
        text().contains("READY")
    });
    std::thread::sleep(Duration::from_millis(300));
    let outer = Pid::from_raw(child.id() as i32);
    let tree = tree_of(outer);
    let fixture = (tree.iter())
        .find(|p| {
            fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.trim() == "threads")
        })
        .copied()
        .expect("the fixture in the sandbox");
    // The sandbox's processes' (the host's changes with other tests).
    let ours = fs::read_link("/proc/self/ns/mnt").unwrap();
    let inside: Vec<Pid> = (tree.iter().copied())
        .filter(|p| fs::read_link(format!("/proc/{p}/ns/mnt")).is_ok_and(|l| l != ours))
        .collect();
    assert_eq!(
        inside.len(),
        2,
        "bwrap's init and the fixture in the sandbox"
    );
    let before: Vec<Vec<String>> = inside.iter().map(|p| mount_table(p.as_raw())).collect();
    let images = dir.join("images");
    let pid = outer.to_string();
    checkpoint_pid(outer.as_raw(), &images);
    let _ = child.wait();
    wait_until(
        "the sandbox's processes gone",
        Duration::from_secs(10),
        || {
            reap_orphans();
            tree.iter()
                .all(|p| !Path::new(&format!("/proc/{p}")).exists())
        },
    );
    let out = rrc(&["restore", "--images", images.to_str().unwrap()]).ok();
    assert!(out.stdout.contains(&format!("root pid {pid}")), "{out:?}");
    let after: Vec<Vec<String>> = inside.iter().map(|p| mount_table(p.as_raw())).collect();
    kill(fixture, Signal::SIGUSR1).unwrap();
    wait_until("the verdict", Duration::from_secs(20), || {
        text().contains("PASS") || text().contains("FAIL")
    });
    let said = text();
    wait_until(
        "the restored sandbox's end",
        Duration::from_secs(10),
        || {
            reap_orphans();
            tree.iter()
                .all(|p| !Path::new(&format!("/proc/{p}")).exists())
        },
    );
    let left: Vec<String> = (fs::read_dir("/tmp").unwrap().flatten())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".rrc-root-") && n.contains(&format!("-{}-", inside[0])))
        .collect();
    let _ = fs::remove_dir_all(&dir);
    assert_eq!(before, after, "the sandbox's mount tables differ");
    assert!(said.contains("PASS") && !said.contains("FAIL"), "{said}");
    assert!(left.is_empty(), "left in /tmp: {left:?}");
}

#[test]
fn a_tree_whose_own_pid_namespace_a_user_namespace_owns_is_refused_and_left_running() {
    // A rootless container's first process (`unshare -Urpf`): the tree's
    // own pid namespace would come back as rrc's, not its user
    // namespace's.
    require_root();
    let mut outer = Command::new("unshare")
        .args(["-Urpf", "--mount-proc", "sleep", "1000"])
        .spawn()
        .unwrap();
    let outer_pid = outer.id();
    let mut first = None;
    wait_until(
        "the sandbox's first process",
        Duration::from_secs(10),
        || {
            first = fs::read_to_string(format!("/proc/{outer_pid}/task/{outer_pid}/children"))
                .ok()
                .and_then(|c| c.split_whitespace().next()?.parse::<i32>().ok());
            first.is_some()
        },
    );
    let first = first.unwrap();
    let dir = scratch("rootless_pid_ns");
    let images = dir.join("images");
    let out = rrc(&[
        "checkpoint",
        "--pid",
        &first.to_string(),
        "--images",
        images.to_str().unwrap(),
    ]);
    let alive = fs::read_to_string(format!("/proc/{first}/stat"))
        .is_ok_and(|s| s.rsplit(')').next().is_some_and(|r| !r.starts_with(" Z")));
    let _ = outer.kill();
    let _ = kill(Pid::from_raw(first), Signal::SIGKILL);
    let _ = outer.wait();
    let _ = fs::remove_dir_all(&dir);
    out.fails_with("the tree's own, belongs to its user namespace");
    assert!(alive, "the refused tree was not left running");
}

#[test]
fn namespaces_made_in_a_user_namespace_come_back_in_it() {
    checkpoint_restore("userns_made");
}

#[test]
fn every_thread_gets_its_credentials_and_no_new_privs_back() {
    checkpoint_restore("creds_threads");
}

#[test]
fn processes_in_user_namespaces_of_their_own_get_them_back_with_their_ids() {
    checkpoint_restore("userns_own");
}

#[test]
fn user_namespaces_nested_as_a_rootless_containers_come_back_nested() {
    checkpoint_restore("userns_nested");
}

#[test]
fn a_pid_namespace_of_a_user_namespace_comes_back_in_it_with_its_pids() {
    checkpoint_restore("userns_pidns");
}

#[test]
fn a_root_that_made_itself_root_of_a_user_namespace_gets_it_back() {
    checkpoint_restore("userns_root");
}

#[test]
fn a_mount_namespace_of_a_process_comes_back_with_its_mounts_and_tmpfs_files() {
    checkpoint_restore("mntns_own");
}

#[test]
fn a_root_in_uts_network_and_cgroup_namespaces_of_its_own_gets_them_back() {
    checkpoint_restore("ns_root");
}

#[test]
fn routing_tables_and_rules_of_a_network_namespace_come_back() {
    checkpoint_restore("netns_rules");
}

#[test]
fn a_devpts_instance_of_a_mount_namespace_comes_back_with_its_pseudo_terminals() {
    checkpoint_restore("mntns_devpts");
}

#[test]
fn a_root_in_a_mount_namespace_of_its_own_gets_it_back() {
    checkpoint_restore("mntns_root");
}

#[test]
fn linux_aio_is_refused_by_name_and_left_running() {
    refused("unsupported_aio", "AIO");
}

/// A busy server with a connection not yet accepted: the checkpoint is
/// refused for that reason alone (the listener's epoll registration is not
/// reported again as a file "no process holds"), and the server goes on.
#[test]
fn a_connection_not_yet_accepted_is_refused_alone_and_the_server_goes_on() {
    use std::io::{Read, Write};
    use std::net::TcpStream;
    require_root();
    let port = (20_000 + std::process::id() % 20_000) as u16;
    /// The server goes however the test ends.
    struct Server(Child);
    impl Drop for Server {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let server = Server(
        Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .args(["--enable-debug-command", "local"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server starts"),
    );
    let addr = format!("127.0.0.1:{port}");
    let mut busy = None;
    wait_until("Redis answers", Duration::from_secs(10), || {
        busy = TcpStream::connect(&addr).ok();
        busy.is_some()
    });
    let mut busy = busy.unwrap();
    // Longer than the checkpoint tries again for (2 s).
    busy.write_all(b"DEBUG SLEEP 5\r\n").unwrap();
    std::thread::sleep(Duration::from_millis(200));
    // Accepted by the kernel, not by the sleeping server.
    let mut waiting = TcpStream::connect(&addr).unwrap();
    waiting.write_all(b"PING\r\n").unwrap();
    let images = scratch("unaccepted").join("images");
    let pid = server.0.id().to_string();
    let checkpoint = || {
        let _ = std::fs::remove_dir_all(&images);
        rrc(&[
            "checkpoint",
            "--pid",
            &pid,
            "--images",
            images.to_str().unwrap(),
            "--leave-running",
        ])
    };
    let out = checkpoint().fails_with("not yet accepted");
    assert!(!out.stderr.contains("epoll watches"), "{out:?}");
    waiting
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut reply = [0u8; 7];
    waiting.read_exact(&mut reply).unwrap();
    assert_eq!(&reply, b"+PONG\r\n");
    // A shorter wait: the checkpoint is tried again until the server has
    // accepted its client, and then taken.
    let mut sleeping = [0u8; 5];
    busy.read_exact(&mut sleeping).unwrap();
    busy.write_all(b"DEBUG SLEEP 0.5\r\n").unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let mut late = TcpStream::connect(&addr).unwrap();
    late.write_all(b"PING\r\n").unwrap();
    checkpoint().ok();
    late.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    late.read_exact(&mut reply).unwrap();
    assert_eq!(&reply, b"+PONG\r\n");
    let _ = std::fs::remove_dir_all(images.parent().unwrap());
}
