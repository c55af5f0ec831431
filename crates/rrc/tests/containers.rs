//! Containers started by `rrc run` serve the lab's client through their
//! address, are listed by `rrc ps`, and leave nothing behind when stopped.

mod common;

use std::time::Duration;

use common::*;
use rrc_bench::resp::RespConn;

#[test]
fn redis_and_memcached_serve_the_client_and_stop_cleanly() {
    let lab = TestLab::up("serve");
    let vip = lab.vip();
    let mc_addr = lab.lan_at(101);
    let redis = lab.run_container(
        "primary",
        "redis",
        &vip,
        &rrc_bench::failover::App::argv(&rrc_bench::failover::App::Redis.command().unwrap()),
    );
    let mc = lab.run_container(
        "primary",
        "memcached",
        &mc_addr,
        &["memcached", "-u", "root"],
    );
    let vip_ip = strip_prefix(&vip);
    let mc_ip = strip_prefix(&mc_addr);
    lab.wait_tcp(&format!("{vip_ip}:6379"));
    lab.wait_tcp(&format!("{mc_ip}:11211"));

    // The real Redis client, from the client host.
    let out = lab
        .exec(
            "client",
            &["redis-cli", "-h", &vip_ip, "set", "greeting", "hello"],
        )
        .ok();
    assert_eq!(out.stdout.trim(), "OK");
    let out = lab
        .exec("client", &["redis-cli", "-h", &vip_ip, "get", "greeting"])
        .ok();
    assert_eq!(out.stdout.trim(), "hello");
    // Many requests and bigger values through the same path.
    let addr = format!("{vip_ip}:6379");
    lab.on("client", || {
        let mut c = RespConn::connect(addr.parse().unwrap(), Duration::from_secs(5)).unwrap();
        let big = vec![b'z'; 200_000];
        c.set(b"big", &big).unwrap();
        assert_eq!(c.get(b"big").unwrap().unwrap(), big);
        for i in 0..2000 {
            c.set(format!("k{i}").as_bytes(), format!("v{i}").as_bytes())
                .unwrap();
        }
        for i in 0..2000 {
            assert_eq!(
                c.get(format!("k{i}").as_bytes()).unwrap().unwrap(),
                format!("v{i}").into_bytes()
            );
        }
    });
    let reply = lab.on("client", || {
        memcached_set_get(&format!("{mc_ip}:11211"), "answer", "forty-two")
    });
    assert_eq!(reply, "VALUE answer 0 9\r\nforty-two\r\n");

    // `rrc ps` lists both, running, with their addresses.
    let ps = lab.rrc_on("primary", &["ps"]).ok().stdout;
    for (name, addr) in [("redis", &vip), ("memcached", &mc_addr)] {
        let line = ps
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("{name} missing from:\n{ps}"));
        assert!(
            line.contains("running") && line.contains(addr.as_str()),
            "{line}"
        );
    }
    // Containers live on their host only.
    assert!(
        lab.rrc_on("backup", &["ps"])
            .ok()
            .stdout
            .contains("no containers")
    );

    // In the container the program is pid 1 with its own hostname.
    assert_eq!(redis["init"]["pid"].as_i64().map(|p| p > 1), Some(true));
    let out = lab.rrc_on("primary", &["stop", "redis"]).ok();
    assert!(out.stdout.contains("stopped redis"), "{out:?}");
    assert_container_gone(&lab, "primary", &redis);
    lab.rrc_on("primary", &["stop", "--timeout", "5s", "memcached"])
        .ok();
    assert_container_gone(&lab, "primary", &mc);
}

#[test]
fn foreground_run_reports_exit_code_and_stops_on_signal() {
    require_root();
    let name = format!("fg{}", std::process::id());
    // The program sees itself as pid 1 under its container's hostname.
    let out = rrc(&[
        "run",
        "--name",
        &name,
        "--",
        "sh",
        "-c",
        "echo $$ $(hostname); exit 7",
    ]);
    assert_eq!(out.code, 7, "{out:?}");
    assert_eq!(out.stdout.trim(), format!("1 {name}"));

    // SIGTERM to a foreground rrc stops its container in order.
    let mut child = std::process::Command::new(RRC)
        .args(["run", "--name", &name, "--", "sleep", "1000"])
        .spawn()
        .unwrap();
    let rec = {
        let mut rec = None;
        wait_until("the container to run", Duration::from_secs(10), || {
            let out = rrc(&["ps", "--json"]).ok();
            let list: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
            rec = list
                .as_array()
                .unwrap()
                .iter()
                .find(|c| c["name"] == name.as_str() && c["status"] == "running")
                .cloned();
            rec.is_some()
        });
        rec.unwrap()
    };
    nix_kill(child.id() as i32, 15);
    let status = child.wait().unwrap();
    // sleep has no SIGTERM handler and is pid 1: it is killed.
    assert_eq!(status.code(), Some(128 + 9), "{status:?}");
    let init = rec["init"]["pid"].as_i64().unwrap();
    assert!(!process_alive(init));
    for dir in rec["cgroup"]["dirs"].as_array().unwrap() {
        assert!(!std::path::Path::new(dir.as_str().unwrap()).exists());
    }
}

fn nix_kill(pid: i32, sig: i32) {
    let out = output({
        let mut c = std::process::Command::new("kill");
        c.args([format!("-{sig}"), pid.to_string()]);
        c
    });
    assert_eq!(out.code, 0, "{out:?}");
}

#[test]
fn a_dead_rrc_leaves_stale_state_that_the_next_start_cleans() {
    let lab = TestLab::up("stale");
    let addr = lab.lan_at(120);
    let rec = lab.run_container("primary", "web", &addr, &["sleep", "1000"]);
    let supervisor = rec["supervisor"]["pid"].as_i64().unwrap();
    nix_kill(supervisor as i32, 9);
    // The container dies with its rrc process.
    let init = rec["init"]["pid"].as_i64().unwrap();
    wait_until(
        "the container to die with rrc",
        Duration::from_secs(5),
        || !process_alive(init),
    );
    let listed = lab.container("primary", "web").unwrap();
    assert_eq!(listed["status"], "stale");
    // A new start under the same name cleans up and succeeds.
    let again = lab.run_container("primary", "web", &addr, &["sleep", "1000"]);
    assert_eq!(again["status"], "running");
    assert_ne!(again["init"]["pid"], rec["init"]["pid"]);
    for dir in again["cgroup"]["dirs"].as_array().unwrap() {
        assert!(std::path::Path::new(dir.as_str().unwrap()).exists());
    }
    lab.rrc_on("primary", &["stop", "web"]).ok();
    assert_container_gone(&lab, "primary", &again);
}

/// Runs `cmd` as the unprivileged user `nobody`; its output.
fn as_nobody(cmd: &[&str]) -> std::process::Output {
    use std::os::unix::process::CommandExt;
    let mut c = std::process::Command::new(cmd[0]);
    c.args(&cmd[1..]);
    // SAFETY: only system calls between fork and exec.
    unsafe {
        c.pre_exec(|| {
            use nix::unistd::{Gid, Uid, setgid, setgroups, setuid};
            setgroups(&[]).map_err(std::io::Error::from)?;
            setgid(Gid::from_raw(65534)).map_err(std::io::Error::from)?;
            setuid(Uid::from_raw(65534)).map_err(std::io::Error::from)?;
            Ok(())
        });
    }
    c.output().unwrap()
}

#[test]
fn an_unprivileged_user_cannot_reach_or_squat_a_containers_control_socket() {
    // The rrc process holding a container answers `rrc checkpoint`,
    // `rrc status` and takeovers on its control socket. Another user must
    // not be able to reach it, nor to take its place before it exists
    // (which made `rrc run --name X` fail).
    let lab = TestLab::up("squat");
    let addr = lab.lan_at(121);
    let host_dir = std::path::Path::new("/run/rrc/hosts").join(lab.netns("primary"));
    let containers = host_dir.join("containers");
    // Before the container: nothing can be put where its socket goes.
    lab.run_container("primary", "early", &lab.lan_at(122), &["sleep", "1000"]);
    let squat = as_nobody(&["mkdir", containers.join("web").to_str().unwrap()]);
    assert!(!squat.status.success(), "{squat:?}");
    let rec = lab.run_container("primary", "web", &addr, &["sleep", "1000"]);
    let sock = containers.join("web").join("control.sock");
    assert!(sock.exists(), "{}", sock.display());
    // Running: another user can neither reach the socket nor put
    // anything beside it.
    let reach = as_nobody(&["cat", sock.to_str().unwrap()]);
    assert!(
        String::from_utf8_lossy(&reach.stderr).contains("Permission denied"),
        "{reach:?}"
    );
    let beside = as_nobody(&["touch", containers.join("web").join("x").to_str().unwrap()]);
    assert!(!beside.status.success(), "{beside:?}");
    // Root reaches it.
    lab.rrc_on("primary", &["status", "web"]).ok();
    lab.rrc_on("primary", &["stop", "web"]).ok();
    lab.rrc_on("primary", &["stop", "early"]).ok();
    assert_container_gone(&lab, "primary", &rec);
}

#[test]
fn a_program_in_a_container_is_kept_from_the_hosts_kernel_controls() {
    // From inside: the capability bounding set is a runtime's default one,
    // mounting is refused, the kernel's controls under /proc/sys and /sys
    // cannot be changed, the host's memory and keys read as nothing, and
    // the device nodes it may make cannot be opened unless a runtime's
    // default list has their numbers (the memory device and a block device
    // are refused; /dev/urandom works); its seccomp filters refuse a new
    // user namespace, which an unprivileged program could make otherwise.
    require_root();
    let name = format!("conf{}", std::process::id());
    let out = rrc(&[
        "run",
        "--name",
        &name,
        "--",
        "sh",
        "-c",
        "grep CapBnd /proc/self/status; \
         mount -t tmpfs x /mnt 2>/dev/null && echo MOUNTED; \
         (echo 0 > /proc/sys/kernel/sysrq) 2>/dev/null && echo WROTE-SYSCTL; \
         (echo x > /sys/kernel/uevent_helper) 2>/dev/null && echo WROTE-SYS; \
         for f in /proc/kcore /proc/keys /proc/timer_list; do \
           [ -e $f ] && echo $f $(wc -c < $f); done; \
         d=$(mktemp -d); mknod $d/mem c 1 1 && mknod $d/disk b 7 0 && echo MADE-NODES; \
         head -c 1 $d/mem >/dev/null 2>&1 && echo OPENED-MEM; \
         head -c 1 $d/disk >/dev/null 2>&1 && echo OPENED-BLOCK; \
         rm -rf $d; echo URANDOM $(head -c 8 /dev/urandom | wc -c); \
         grep Seccomp_filters /proc/self/status; \
         unshare -U true 2>/dev/null && echo UNSHARED",
    ]);
    let text = out.stdout.clone();
    let want = format!("{:016x}", rrc_container::confine::bounding_set());
    assert!(text.contains(&want), "bounding set, want {want}: {out:?}");
    for bad in [
        "MOUNTED",
        "WROTE-SYSCTL",
        "WROTE-SYS",
        "OPENED-MEM",
        "OPENED-BLOCK",
    ] {
        assert!(!text.contains(bad), "{bad}: {out:?}");
    }
    assert!(text.contains("MADE-NODES"), "{out:?}");
    assert!(text.contains("URANDOM 8"), "{out:?}");
    assert!(text.contains("Seccomp_filters:\t2"), "{out:?}");
    assert!(text.contains("/proc/keys 0"), "{out:?}");
    assert!(
        !text.contains("kcore") || text.contains("/proc/kcore 0"),
        "{out:?}"
    );
}

#[test]
fn a_container_allowed_user_namespaces_makes_them_and_gains_nothing_outside() {
    // `--user-namespaces`: the program makes a user namespace and mounts a
    // tmpfs in a mount namespace of its there (a sandbox's steps); outside
    // it, mounting, a network namespace of its own and the kernel's
    // controls stay refused (its capabilities are the default ones).
    require_root();
    let name = format!("confu{}", std::process::id());
    let out = rrc(&[
        "run",
        "--name",
        &name,
        "--user-namespaces",
        "--",
        "sh",
        "-c",
        "unshare -Urm sh -c 'mount -t tmpfs x /mnt && echo SANDBOX-MOUNTED'; \
         mount -t tmpfs x /mnt 2>/dev/null && echo MOUNTED; \
         unshare -n true 2>/dev/null && echo NETNS; \
         (echo 0 > /proc/sys/kernel/sysrq) 2>/dev/null && echo WROTE-SYSCTL; \
         echo DONE",
    ]);
    let text = out.stdout.clone();
    assert!(text.contains("DONE"), "{out:?}");
    assert!(text.contains("SANDBOX-MOUNTED"), "{out:?}");
    for bad in ["MOUNTED", "NETNS", "WROTE-SYSCTL"] {
        assert!(!text.lines().any(|l| l == bad), "{bad}: {out:?}");
    }
}

#[test]
fn a_restored_container_is_kept_as_the_original_was() {
    // Checkpointed and restored, the container's program has the same
    // bounding set, masked, read-only kernel paths, device list and
    // seccomp filters: a process it starts after the restore still cannot
    // make a user namespace.
    require_root();
    let name = format!("confmv{}", std::process::id());
    let images = std::env::temp_dir().join(format!("rrc-{name}-images"));
    let _ = std::fs::remove_dir_all(&images);
    // The flag and the answer are in the container's private /tmp.
    let private = rrc_container::rootfs::RootFs::private_dir(&name.parse().unwrap()).unwrap();
    let flag = private.join("tmp/flag");
    let said = private.join("tmp/said");
    let script = "while :; do sleep 0.05; if [ -e /tmp/flag ]; then rm /tmp/flag; \
         (unshare -U true 2>/dev/null && echo UNSHARED || echo REFUSED) > /tmp/said.new; \
         mv /tmp/said.new /tmp/said; fi; done";
    rrc(&["run", "--detach", "--name", &name, "--", "sh", "-c", script]).ok();
    rrc(&["checkpoint", &name, "--images", images.to_str().unwrap()]).ok();
    rrc(&["restore", "--images", images.to_str().unwrap()]).ok();
    let list: serde_json::Value =
        serde_json::from_str(&rrc(&["ps", "--json"]).ok().stdout).unwrap();
    let rec = list
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name.as_str())
        .cloned()
        .expect("the restored container is listed");
    let init = rec["init"]["pid"].as_i64().unwrap();
    let status = std::fs::read_to_string(format!("/proc/{init}/status")).unwrap();
    let want = format!("{:016x}", rrc_container::confine::bounding_set());
    assert!(
        status
            .lines()
            .any(|l| l.starts_with("CapBnd:") && l.ends_with(&want)),
        "{status}"
    );
    // Its device list is the runtime's default one (this machine's cgroup
    // v1 devices controller shows it).
    let groups = std::fs::read_to_string(format!("/proc/{init}/cgroup")).unwrap();
    if let Some(rel) = groups
        .lines()
        .find_map(|l| l.split_once(":devices:").map(|(_, p)| p.to_string()))
    {
        let list =
            std::fs::read_to_string(format!("/sys/fs/cgroup/devices{rel}/devices.list")).unwrap();
        assert!(!list.contains("a *:* rwm"), "{list}");
        assert!(list.contains("c 1:3 rwm"), "{list}");
    }
    let mounts = std::fs::read_to_string(format!("/proc/{init}/mountinfo")).unwrap();
    for ro in [" /proc/sys ", " /sys "] {
        let line = mounts
            .lines()
            .rfind(|l| l.contains(ro))
            .unwrap_or_else(|| panic!("no {ro} mount:\n{mounts}"));
        assert!(line.contains(" ro,") || line.contains(" ro "), "{line}");
    }
    assert!(
        status
            .lines()
            .any(|l| l.starts_with("Seccomp_filters:") && l.ends_with('2')),
        "{status}"
    );
    std::fs::write(&flag, b"").unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let answer = loop {
        if let Ok(a) = std::fs::read_to_string(&said) {
            break a;
        }
        assert!(std::time::Instant::now() < deadline, "no answer");
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    rrc(&["stop", &name]).ok();
    let _ = std::fs::remove_dir_all(&images);
    remove_private_root(&name);
    assert_eq!(answer.trim(), "REFUSED");
}

#[test]
fn a_container_with_a_private_root_sees_the_host_read_only_and_keeps_its_files_across_a_restore() {
    // `--root private`: the host's files are there but read-only, the
    // host's /tmp is not, the container's own /tmp, /run and /var are
    // writable, and so is a host directory it was given (`--share`);
    // checkpointed and restored, the program still holds the files it
    // opened in its /tmp and in the shared directory, and goes on writing
    // to them.
    require_root();
    let name = format!("privroot{}", std::process::id());
    let images = std::env::temp_dir().join(format!("rrc-{name}-images"));
    let _ = std::fs::remove_dir_all(&images);
    let host_file = std::env::temp_dir().join(format!("rrc-{name}-hostfile"));
    std::fs::write(&host_file, b"host").unwrap();
    let private = rrc_container::rootfs::RootFs::private_dir(&name.parse().unwrap()).unwrap();
    let shared = std::env::temp_dir().join(format!("rrc-{name}-shared"));
    let _ = std::fs::remove_dir_all(&shared);
    std::fs::create_dir_all(&shared).unwrap();
    let script = format!(
        "exec 3>/tmp/held; echo before >&3; exec 4>{shared}/out; echo shared-before >&4; \
         [ -e {host} ] && echo SEES-HOST-TMP >&3; \
         (echo x > /etc/rrc-{name}) 2>/dev/null && echo WROTE-ETC >&3; \
         echo ok > /var/log/v && echo ok > /run/r && echo WROTE-PRIVATE >&3; \
         while :; do sleep 0.05; if [ -e /tmp/flag ]; then rm /tmp/flag; echo shared-after >&4; echo after >&3; fi; done",
        host = host_file.display(),
        shared = shared.display()
    );
    rrc(&[
        "run",
        "--detach",
        "--name",
        &name,
        "--root",
        "private",
        "--share",
        shared.to_str().unwrap(),
        "--",
        "sh",
        "-c",
        &script,
    ])
    .ok();
    let held = private.join("tmp/held");
    let wait_for = |what: &str| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let text = std::fs::read_to_string(&held).unwrap_or_default();
            if text.contains(what) {
                return text;
            }
            assert!(std::time::Instant::now() < deadline, "no {what}: {text:?}");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    };
    wait_for("WROTE-PRIVATE");
    rrc(&["checkpoint", &name, "--images", images.to_str().unwrap()]).ok();
    rrc(&["restore", "--images", images.to_str().unwrap()]).ok();
    std::fs::write(private.join("tmp/flag"), b"").unwrap();
    let text = wait_for("after");
    let log = rrc(&["stop", &name]);
    let _ = std::fs::remove_dir_all(&images);
    let _ = std::fs::remove_file(&host_file);
    remove_private_root(&name);
    let out = std::fs::read_to_string(shared.join("out")).unwrap_or_default();
    let _ = std::fs::remove_dir_all(&shared);
    assert_eq!(out, "shared-before\nshared-after\n");
    assert!(!std::path::Path::new(&format!("/etc/rrc-{name}")).exists());
    assert_eq!(text, "before\nWROTE-PRIVATE\nafter\n", "{log:?}");
}

/// A host directory only root may enter, holding one file.
fn host_dir_of(name: &str) -> std::path::PathBuf {
    let host_dir = std::env::temp_dir().join(format!("rrc-{name}-hostdir"));
    std::fs::create_dir_all(&host_dir).unwrap();
    std::fs::set_permissions(
        &host_dir,
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .unwrap();
    std::fs::write(host_dir.join("file"), b"host").unwrap();
    host_dir
}

#[test]
fn a_link_a_container_leaves_in_its_private_root_is_never_followed_on_the_host() {
    // A program replaces its /var/tmp (in its private /var) with a link to
    // a host directory, and is checkpointed (so its root is kept for the
    // image); the next start of that name refuses the link instead of
    // making the host directory world-writable.
    require_root();
    let name = format!("privlink{}", std::process::id());
    let host_dir = host_dir_of(&name);
    let images = std::env::temp_dir().join(format!("rrc-{name}-images"));
    let private = rrc_container::rootfs::RootFs::private_dir(&name.parse().unwrap()).unwrap();
    let link = format!(
        "rm -rf /var/tmp && ln -s {} /var/tmp && exec sleep 600",
        host_dir.display()
    );
    rrc(&["run", "--detach", "--name", &name, "--", "sh", "-c", &link]).ok();
    wait_until("the link", std::time::Duration::from_secs(30), || {
        private.join("var/tmp").is_symlink()
    });
    let imaged = rrc(&["checkpoint", &name, "--images", images.to_str().unwrap()]);
    let again = rrc(&["run", "--name", &name, "--", "true"]);
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&host_dir).unwrap().permissions(),
    ) & 0o7777;
    remove_private_root(&name);
    let _ = std::fs::remove_dir_all(&host_dir);
    let _ = std::fs::remove_dir_all(&images);
    imaged.ok();
    again.fails_with("symbolic link");
    assert_eq!(mode, 0o700);
}

#[test]
fn a_private_root_goes_with_its_container_and_never_takes_host_files_with_it() {
    // By default a container's root is private; one never checkpointed
    // leaves nothing behind when it ends, and removing what it kept
    // removes a link it made to a host directory, not the directory's
    // files. A program in a directory the root hides is refused clearly.
    require_root();
    let name = format!("privgone{}", std::process::id());
    let host_dir = host_dir_of(&name);
    let private = rrc_container::rootfs::RootFs::private_dir(&name.parse().unwrap()).unwrap();
    let script = format!(
        "echo kept > /tmp/f && ln -s {} /tmp/link && ! [ -w /etc ] && ! [ -e {}/file ] && echo PRIVATE",
        host_dir.display(),
        host_dir.display()
    );
    let out = rrc(&["run", "--name", &name, "--", "sh", "-c", &script]).ok();
    let gone = !private.exists();
    let intact = std::fs::read(host_dir.join("file")).ok();
    let program = host_dir.join("prog");
    std::fs::copy("/bin/true", &program).unwrap();
    let hidden = rrc(&["run", "--name", &name, "--", program.to_str().unwrap()]);
    let _ = std::fs::remove_dir_all(&host_dir);
    assert!(out.stdout.contains("PRIVATE"), "{out:?}");
    assert!(gone, "{} left behind", private.display());
    assert_eq!(intact.as_deref(), Some(&b"host"[..]));
    hidden.fails_with("--share");
}

/// Container `name`'s record in `rrc ps --json`.
fn ps_record(name: &str) -> serde_json::Value {
    let list: serde_json::Value =
        serde_json::from_str(&rrc(&["ps", "--json"]).ok().stdout).unwrap();
    list.as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .cloned()
        .unwrap_or_else(|| panic!("container {name} is not listed"))
}

/// Runs fixture `fixture` (with arguments `args`) as a container with a
/// private root (its binary in a shared directory), checkpoints and
/// restores the container once it is ready, and expects its checks to
/// pass.
fn fixture_moves_in_a_container(fixture: &str, args: &[&str]) {
    fixture_moves_in_a_container_as(fixture, args, false)
}

/// As [`fixture_moves_in_a_container`], the fixture the child of a shell
/// (the container's first process) with `under_shell`.
fn fixture_moves_in_a_container_as(fixture: &str, args: &[&str], under_shell: bool) {
    fixture_moves_in_a_container_with(fixture, args, under_shell, &[])
}

/// As [`fixture_moves_in_a_container_as`], the container run with
/// `run_options` too.
fn fixture_moves_in_a_container_with(
    fixture: &str,
    args: &[&str],
    under_shell: bool,
    run_options: &[&str],
) {
    require_root();
    let name = format!("fx{}{}", fixture.replace('_', ""), std::process::id());
    let dir = scratch(&name);
    let bin = build(fixture, &dir);
    let images = dir.join("images");
    let mut run = vec![
        "run",
        "--detach",
        "--name",
        &name,
        "--share",
        dir.to_str().unwrap(),
    ];
    run.extend_from_slice(run_options);
    run.push("--");
    let script = format!(
        "cd {} && {} {}; sleep 1000",
        dir.display(),
        bin.display(),
        args.join(" ")
    );
    if under_shell {
        run.extend_from_slice(&["/bin/sh", "-c", &script]);
    } else {
        run.push(bin.to_str().unwrap());
        run.extend_from_slice(args);
    }
    rrc(&run).ok();
    let log = ps_record(&name)["log"].as_str().unwrap().to_string();
    let said = |what: &str| {
        wait_until(what, Duration::from_secs(30), || {
            std::fs::read_to_string(&log).is_ok_and(|l| l.contains(what) || l.contains("FAIL"))
        });
        std::fs::read_to_string(&log).unwrap_or_default()
    };
    said("READY");
    let mut out = rrc(&["checkpoint", &name, "--images", images.to_str().unwrap()]);
    if out.code == 0 {
        out = rrc(&["restore", "--images", images.to_str().unwrap()]);
    }
    let restored = out.code == 0;
    let text = if restored {
        let init = ps_record(&name)["init"]["pid"].as_i64().unwrap();
        let fixture_pid = if under_shell {
            let children =
                std::fs::read_to_string(format!("/proc/{init}/task/{init}/children")).unwrap();
            children.split_whitespace().next().unwrap().parse().unwrap()
        } else {
            init
        };
        nix_kill(fixture_pid as i32, libc::SIGUSR1);
        said("PASS")
    } else {
        String::new()
    };
    let _ = rrc(&["stop", &name]);
    remove_private_root(&name);
    let _ = std::fs::remove_dir_all(&dir);
    // The log outlives its container (a restore appends to it).
    let _ = std::fs::remove_file(&log);
    assert!(restored, "checkpoint or restore failed: {out:?}");
    assert!(text.contains("PASS") && !text.contains("FAIL"), "{text}");
}

#[test]
fn a_rootless_sandbox_in_a_container_moves_with_its_pid_namespaces() {
    // Allowed user namespaces, the container's program makes pid
    // namespaces of them (`unshare -Urpf`, bubblewrap's clone): they come
    // back in them, their pids in the container's set as the next ones
    // there by a helper in its pid namespace.
    fixture_moves_in_a_container_with("userns_pidns", &[], false, &["--user-namespaces"]);
}

#[test]
fn a_threaded_process_in_a_user_namespace_of_a_container_moves_with_its_thread_ids() {
    fixture_moves_in_a_container_with("userns_own", &[], false, &["--user-namespaces"]);
}

#[test]
fn time_namespaces_of_a_containers_user_namespaces_move_with_it() {
    // Made again by their makers in their user namespaces, which they
    // enter first; their children forked there at the container's pids.
    fixture_moves_in_a_container_with("userns_timens", &[], false, &["--user-namespaces"]);
}

#[test]
fn a_bubblewrap_sandbox_in_a_container_moves_with_its_root_and_mounts() {
    // A sandbox of its own inside the container (allowed user
    // namespaces): bwrap's user and mount namespaces, a root of their own
    // (pivot_root) with the container's /usr and /proc bound in it (with
    // the mounts the runtime put below /proc, which a user namespace may
    // not uncover: bound along), a /dev and /tmp of its own; fixture
    // `threads` in it checks itself after the move, and its mount table
    // reads as before.
    require_root();
    let name = format!("fxbwrap{}", std::process::id());
    let dir = scratch(&name);
    let bin = build("threads", &dir);
    let images = dir.join("images");
    let d = dir.to_str().unwrap();
    #[rustfmt::skip]
    let sandbox = [
        "--ro-bind", "/usr", "/usr", "--symlink", "usr/lib", "/lib",
        "--symlink", "usr/lib64", "/lib64", "--symlink", "usr/bin", "/bin",
        "--ro-bind", "/proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp",
        "--bind", d, d, "--chdir", d, "--unshare-user", "--uid", "0", "--",
    ];
    let mut run = vec!["run", "--detach", "--name", &name, "--share", d];
    run.extend(["--user-namespaces", "--", "bwrap"]);
    run.extend(sandbox);
    run.push(bin.to_str().unwrap());
    rrc(&run).ok();
    let log = ps_record(&name)["log"].as_str().unwrap().to_string();
    let said = |what: &str| {
        wait_until(what, Duration::from_secs(30), || {
            std::fs::read_to_string(&log).is_ok_and(|l| l.contains(what) || l.contains("FAIL"))
        });
        std::fs::read_to_string(&log).unwrap_or_default()
    };
    said("READY");
    // The fixture: the container's first process's child.
    let fixture = || -> Option<i32> {
        let init = ps_record(&name)["init"]["pid"].as_i64()?;
        let kids = std::fs::read_to_string(format!("/proc/{init}/task/{init}/children")).ok()?;
        kids.split_whitespace().next()?.parse().ok()
    };
    let table = |pid: Option<i32>| -> Vec<String> {
        let text = std::fs::read_to_string(format!("/proc/{}/mountinfo", pid.unwrap_or(0)));
        (text.unwrap_or_default().lines())
            .map(|l| {
                let w: Vec<&str> = l.split(' ').collect();
                format!("{} {} {} {:?}", w[3], w[4], w[5], &w[w.len() - 3..])
            })
            .collect()
    };
    let before = table(fixture());
    let mut out = rrc(&["checkpoint", &name, "--images", images.to_str().unwrap()]);
    if out.code == 0 {
        out = rrc(&["restore", "--images", images.to_str().unwrap()]);
    }
    let restored = out.code == 0;
    let after = table(fixture());
    let text = if restored {
        nix_kill(fixture().unwrap_or(0), libc::SIGUSR1);
        said("PASS")
    } else {
        String::new()
    };
    let _ = rrc(&["stop", &name]);
    remove_private_root(&name);
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_file(&log);
    assert!(restored, "checkpoint or restore failed: {out:?}");
    assert!(
        !before.is_empty() && before == after,
        "{before:#?}\n{after:#?}"
    );
    assert!(text.contains("PASS") && !text.contains("FAIL"), "{text}");
}

#[test]
fn a_container_run_with_aio_idle_moves_with_its_aio_contexts() {
    // The container said at its start that its program has no AIO request
    // in flight when checkpointed: its contexts move with it.
    fixture_moves_in_a_container_with("aio", &[], false, &["--aio-idle"]);
}

#[test]
fn a_pseudo_terminal_session_in_a_container_moves_with_it() {
    // On the container's own devpts: the pair is made again there with
    // its number, the terminal opened by its path inside.
    fixture_moves_in_a_container("pty", &[]);
}

#[test]
fn a_containers_semaphores_and_message_queues_move_with_it() {
    // The container's IPC namespace is its own and dies with it: the
    // checkpoint keeps its semaphore sets and message queues, the restore
    // makes them again with their ids (through /proc/sys, read-only in the
    // container), and the program finds them as they were.
    fixture_moves_in_a_container("ipc_here", &[]);
}

#[test]
fn unix_sockets_named_in_a_containers_private_root_are_bound_there_again() {
    // Named in the container's own /tmp: bound again there, not on the
    // host's, and connected to and sent to there. A host socket at the
    // very path the image names (the fixture is pid 1 in its container)
    // is neither removed nor taken.
    let host_path = std::path::Path::new("/tmp/fx_sk_unix.1.stream");
    let _ = std::fs::remove_file(host_path);
    let host = std::os::unix::net::UnixListener::bind(host_path).unwrap();
    fixture_moves_in_a_container("sk_unix", &[]);
    let still = std::os::unix::net::UnixStream::connect(host_path).is_ok();
    drop(host);
    let _ = std::fs::remove_file(host_path);
    assert!(still, "the host's socket at the image's path was touched");
}

#[test]
fn files_mapped_from_a_containers_private_root_and_sysv_memory_move_with_it() {
    // Mapped files in the container's own /tmp are opened where the
    // program sees them; its SysV segment gets its id again in the
    // container's IPC namespace.
    fixture_moves_in_a_container("mem_shared", &[]);
}

#[test]
fn files_a_container_watches_are_watched_again_by_their_names_inside_it() {
    // The container's /tmp is a host directory mounted there: a watch is
    // made again on /tmp/..., as the program named it, not on the host
    // directory's own name (which the container cannot see).
    fixture_moves_in_a_container("inotify", &[]);
}

#[test]
fn pidfds_of_reaped_children_in_a_container_keep_their_exit_status() {
    // A reaped child's pidfd is remade in the container's PID namespace:
    // one of the host's would give neither exit status nor ESRCH there.
    fixture_moves_in_a_container("pidfds", &[]);
}

#[test]
fn deleted_files_directories_and_chroots_in_a_container_come_back() {
    // A deleted working directory and a deleted directory held open are
    // remade under the container's root, where its processes can enter
    // them; a deleted file still linked elsewhere comes back as its saved
    // copy, as the engine does not follow a file handle into a mount
    // namespace it does not share.
    fixture_moves_in_a_container("files_deleted", &["saved-copy"]);
}

#[test]
fn a_containers_posix_message_queues_move_with_it() {
    // The container's IPC namespace dies with it: its queues are made
    // again in the new one, with their messages in order.
    fixture_moves_in_a_container("posix_mqueue", &[]);
}

#[test]
fn a_segment_a_containers_second_process_made_is_made_by_it_again() {
    // The fixture runs under a shell, the container's first process: its
    // SysV segment is made again by it, so that it is the segment's
    // creator again (shm_cpid), not the container's first process.
    fixture_moves_in_a_container_as("mem_shared", &[], true);
}
