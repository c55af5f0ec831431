//! The lab: building and removing it, hosts that fail-stop and come back,
//! and labs side by side.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;

fn netns_of_lab(name: &str) -> Vec<String> {
    std::fs::read_dir("/run/netns")
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(&format!("rrc-{name}-")))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn up_twice_is_fine_and_down_removes_everything() {
    let lab = TestLab::up("updown");
    let again = rrc(&["lab", "up", "--lab", &lab.name]).ok();
    assert!(again.stdout.contains("already up"), "{again:?}");
    // Six hosts (client, primary, backup, three for the arbiter) and the
    // switch.
    assert_eq!(netns_of_lab(&lab.name).len(), 7);
    // Hosts reach each other on the LAN and over the replication link.
    let primary = lab.addr("primary");
    lab.exec("client", &["redis-cli", "-h", &primary, "ping"]);
    let out = lab.exec(
        "backup",
        &[
            "sh",
            "-c",
            "ip -4 -o addr show dev repl0 && ip -4 -o addr show dev eth0",
        ],
    );
    assert!(out.ok().stdout.contains("repl0"));
    // A cut drops what passes between two hosts; healing mends it.
    lab.exec(
        "primary",
        &[
            "redis-server",
            "--port",
            "6390",
            "--daemonize",
            "yes",
            "--save",
            "",
            "--protected-mode",
            "no",
        ],
    )
    .ok();
    let ping = [
        "timeout",
        "3",
        "redis-cli",
        "-h",
        primary.as_str(),
        "-p",
        "6390",
        "ping",
    ];
    wait_until("redis on the primary host", Duration::from_secs(10), || {
        lab.exec("client", &ping).stdout.contains("PONG")
    });
    let cut = rrc(&["lab", "cut", "--lab", &lab.name, "client", "primary"]).ok();
    assert!(cut.stdout.contains("cut client-primary"), "{cut:?}");
    assert!(!lab.exec("client", &ping).stdout.contains("PONG"));
    let status = rrc(&["lab", "status", "--lab", &lab.name]).ok();
    assert!(status.stdout.contains("cut client-primary"), "{status:?}");
    rrc(&["lab", "heal", "--lab", &lab.name]).ok();
    assert!(lab.exec("client", &ping).stdout.contains("PONG"));
    let record = format!("/run/rrc/labs/{}.json", lab.name);
    assert!(Path::new(&record).exists());
    let cgroups: Vec<String> = lab.status["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["netns"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(cgroups.len(), 6);
    let name = lab.name.clone();
    drop(lab);
    assert!(netns_of_lab(&name).is_empty(), "namespaces left behind");
    assert!(!Path::new(&record).exists(), "lab record left behind");
    let status = rrc(&["lab", "status", "--lab", &name]);
    status.fails_with("no lab named");
    // Down again is harmless.
    assert!(
        rrc(&["lab", "down", "--lab", &name])
            .ok()
            .stdout
            .contains("nothing to do")
    );
}

#[test]
fn kill_leaves_no_process_of_the_host_alive_and_revive_brings_it_back_empty() {
    let mut lab = TestLab::up("kill");
    let rec = lab.run_container("primary", "victim", &lab.vip(), &["sleep", "1000"]);
    let mut bg = std::process::Command::new(RRC)
        .args([
            "lab", "exec", "--lab", &lab.name, "primary", "--", "sleep", "1000",
        ])
        .spawn()
        .unwrap();
    let bg_pid = bg.id() as i64;
    wait_until(
        "the background process to join primary",
        Duration::from_secs(5),
        || {
            std::fs::read_link(format!("/proc/{bg_pid}/exe"))
                .map(|p| p.ends_with("sleep"))
                .unwrap_or(false)
        },
    );
    lab.refresh();
    let before = lab.host("primary")["processes"].as_u64().unwrap();
    assert!(
        before >= 3,
        "expected rrc, the container and sleep on primary"
    );

    let out = rrc(&["lab", "kill", "--lab", &lab.name, "primary"]).ok();
    assert!(out.stdout.contains("is down"), "{out:?}");
    let _ = bg.wait();
    for pid in [
        bg_pid,
        rec["init"]["pid"].as_i64().unwrap(),
        rec["supervisor"]["pid"].as_i64().unwrap(),
    ] {
        assert!(
            !process_alive(pid),
            "process {pid} of the killed host is alive"
        );
    }
    lab.refresh();
    let primary = lab.host("primary");
    assert_eq!(primary["down"], true);
    assert_eq!(primary["processes"], 0);
    // Its cable is unplugged at the switch.
    let link = output({
        let mut c = std::process::Command::new("ip");
        c.args([
            "-n",
            &format!("rrc-{}-lan", lab.name),
            "-o",
            "link",
            "show",
            "primary",
        ]);
        c
    })
    .ok();
    assert!(link.stdout.contains("state DOWN"), "{link:?}");
    // Nothing can be started on a dead host.
    lab.exec("primary", &["true"]).fails_with("is down");
    // Other hosts carry on.
    lab.exec("client", &["true"]).ok();

    rrc(&["lab", "revive", "--lab", &lab.name, "primary"]).ok();
    lab.refresh();
    let primary = lab.host("primary");
    assert_eq!(primary["down"], false);
    assert_eq!(primary["processes"], 0);
    assert!(primary["containers"].as_array().unwrap().is_empty());
    // Back on the LAN and the replication link.
    let ip = lab.addr("primary");
    lab.exec(
        "client",
        &[
            "sh",
            "-c",
            &format!("echo | timeout 5 redis-cli -h {ip} ping || true"),
        ],
    )
    .ok();
    let out = lab
        .exec("primary", &["ip", "-o", "link", "show", "repl0"])
        .ok();
    assert!(out.stdout.contains("UP"), "{out:?}");
    // And a container runs there again.
    let again = lab.run_container("primary", "victim", &lab.vip(), &["sleep", "1000"]);
    lab.rrc_on("primary", &["stop", "victim"]).ok();
    assert_container_gone(&lab, "primary", &again);
}

#[test]
fn two_labs_coexist() {
    let a = TestLab::up("twoa");
    let b = TestLab::up("twob");
    assert_ne!(a.status["subnet"], b.status["subnet"]);
    let redis = ["redis-server", "--protected-mode", "no", "--save", ""];
    a.run_container("primary", "redis", &a.vip(), &redis);
    b.run_container("primary", "redis", &b.vip(), &redis);
    let (va, vb) = (strip_prefix(&a.vip()), strip_prefix(&b.vip()));
    a.wait_tcp(&format!("{va}:6379"));
    b.wait_tcp(&format!("{vb}:6379"));
    a.exec("client", &["redis-cli", "-h", &va, "set", "lab", "a"])
        .ok();
    b.exec("client", &["redis-cli", "-h", &vb, "set", "lab", "b"])
        .ok();
    assert_eq!(
        a.exec("client", &["redis-cli", "-h", &va, "get", "lab"])
            .ok()
            .stdout
            .trim(),
        "a"
    );
    assert_eq!(
        b.exec("client", &["redis-cli", "-h", &vb, "get", "lab"])
            .ok()
            .stdout
            .trim(),
        "b"
    );
    // A lab cannot reach the other's addresses.
    let cross = a.exec("client", &["redis-cli", "-h", &vb, "-t", "1", "ping"]);
    assert!(!cross.stdout.contains("PONG"), "{cross:?}");
    // Taking one down leaves the other serving.
    let a_name = a.name.clone();
    drop(a);
    assert!(netns_of_lab(&a_name).is_empty());
    assert_eq!(
        b.exec("client", &["redis-cli", "-h", &vb, "get", "lab"])
            .ok()
            .stdout
            .trim(),
        "b"
    );
}
