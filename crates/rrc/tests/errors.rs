//! Bad input and unsupported setups: a one-line error that says what to do,
//! a non-zero exit, and nothing left half-created.

mod common;

use std::path::Path;

use common::*;

/// Nothing of container `name` exists on `host`: no state, no cgroup.
fn nothing_created(lab: &TestLab, host: &str, name: &str) {
    let state = Path::new("/run/rrc/hosts")
        .join(lab.netns(host))
        .join("containers")
        .join(name);
    assert!(!state.exists(), "state {} was created", state.display());
    let cg = format!("rrc.{name}");
    let found = walk_dirs(Path::new("/sys/fs/cgroup"), &cg);
    assert!(found.is_empty(), "cgroups created: {found:?}");
}

fn walk_dirs(dir: &Path, name: &str) -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                if e.file_name() == name {
                    out.push(e.path().display().to_string());
                }
                out.extend(walk_dirs(&e.path(), name));
            }
        }
    }
    out
}

#[test]
fn container_errors() {
    let lab = TestLab::up("errs");
    let vip = lab.vip();
    let sleep = ["sleep", "1000"];

    // A name already in use.
    let rec = lab.run_container("primary", "dup", &vip, &sleep);
    lab.rrc_on(
        "primary",
        &[
            "run",
            "--name",
            "dup",
            "--addr",
            &lab.lan_at(130),
            "--",
            "sleep",
            "1",
        ],
    )
    .fails_with("already exists");
    // Detached too, before anything forks.
    lab.rrc_on(
        "primary",
        &[
            "run",
            "-d",
            "--name",
            "dup",
            "--addr",
            &lab.lan_at(130),
            "--",
            "sleep",
            "1",
        ],
    )
    .fails_with("already exists");
    lab.rrc_on("primary", &["stop", "dup"]).ok();
    assert_container_gone(&lab, "primary", &rec);

    // An address outside the lab's subnet.
    lab.rrc_on(
        "primary",
        &[
            "run",
            "--name",
            "x1",
            "--addr",
            "192.0.2.7/24",
            "--",
            "sleep",
            "1",
        ],
    )
    .fails_with("outside every subnet");
    nothing_created(&lab, "primary", "x1");
    lab.rrc_on(
        "primary",
        &[
            "run",
            "--name",
            "x1",
            "--addr",
            "192.0.2.7/24",
            "--uplink",
            "eth0",
            "--",
            "true",
        ],
    )
    .fails_with("outside the subnet of uplink eth0");
    lab.rrc_on(
        "primary",
        &[
            "run", "--name", "x1", "--addr", &vip, "--uplink", "wlan9", "--", "true",
        ],
    )
    .fails_with("no interface named `wlan9`");
    lab.rrc_on(
        "primary",
        &[
            "run",
            "--name",
            "x1",
            "--addr",
            "10.1.2.300/24",
            "--",
            "true",
        ],
    )
    .fails_with("not an IPv4 address");
    nothing_created(&lab, "primary", "x1");

    // A command that does not exist.
    lab.rrc_on(
        "primary",
        &[
            "run",
            "--name",
            "x2",
            "--addr",
            &vip,
            "--",
            "no-such-program",
        ],
    )
    .fails_with("command `no-such-program` not found");
    let data = std::env::temp_dir().join(format!("rrc-not-exec-{}", std::process::id()));
    std::fs::write(&data, "data").unwrap();
    lab.rrc_on(
        "primary",
        &["run", "-d", "--name", "x2", "--", data.to_str().unwrap()],
    )
    .fails_with("not an executable");
    std::fs::remove_file(&data).unwrap();
    nothing_created(&lab, "primary", "x2");

    // A bad name.
    lab.rrc_on("primary", &["run", "--name", "a/b", "--", "true"])
        .fails_with("invalid container name");

    // Stop of an unknown name.
    lab.rrc_on("primary", &["stop", "ghost"])
        .fails_with("no container named `ghost`");

    // A container's word on AIO is given at its start, not per checkpoint.
    lab.rrc_on(
        "primary",
        &["checkpoint", "ghost", "--images", "/tmp/none", "--aio-idle"],
    )
    .fails_with("rrc run --aio-idle");

    // Lab-level mistakes.
    rrc(&["lab", "up", "--lab", "Bad-Name"]).fails_with("invalid lab name");
    rrc(&["lab", "up", "--lab", &lab.name, "--subnet", "10.250.0.0/24"])
        .fails_with("already up with subnet");
    lab.exec("dmz", &["true"]).fails_with("no host `dmz`");
    rrc(&["lab", "revive", "--lab", &lab.name, "client"]).fails_with("only a killed host");
    lab.exec("client", &["no-such-program"])
        .fails_with("not found");
}

#[test]
fn not_root() {
    require_root();
    let mut c = std::process::Command::new("setpriv");
    c.args(["--reuid=65534", "--regid=65534", "--clear-groups", RRC])
        .args(["run", "--name", "nr", "--", "true"]);
    output(c).fails_with("needs root");
    let mut c = std::process::Command::new("setpriv");
    c.args(["--reuid=65534", "--regid=65534", "--clear-groups", RRC])
        .args(["lab", "up", "--lab", "nrlab"]);
    output(c).fails_with("needs root");
}

/// A replicated pair with nothing to keep two copies from serving is
/// refused unless told that is acceptable; a bad or unreachable arbiter is
/// a clear error before anything starts.
#[test]
fn replication_without_an_arbiter_is_refused() {
    require_root();
    let dir = scratch("noarb");
    let key = dir.join("key");
    rrc(&["keygen", key.to_str().unwrap()]).ok();
    let key = key.to_str().unwrap();
    let primary = |extra: &[&str]| {
        let mut args = vec![
            "primary",
            "--backup",
            "127.0.0.1",
            "--key",
            key,
            "--name",
            "noarb",
            "--addr",
            "10.250.0.5/24",
        ];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["--", "true"]);
        rrc(&args)
    };
    primary(&[]).fails_with("needs --arbiter");
    primary(&["--allow-split-brain", "--arbiter", "127.0.0.1:1"]).fails_with("contradict");
    primary(&["--arbiter", "http://h/x"]).fails_with("invalid arbiter endpoint");
    // Nothing listens there: asked again for a while (saying so), then
    // refused, nothing started.
    let out = primary(&["--arbiter", "127.0.0.1:1", "--arbiter-timeout", "300ms"]);
    assert_ne!(out.code, 0, "{out:?}");
    let last = out.stderr.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("rrc: error: ") && last.contains("cannot be reached"),
        "{out:?}"
    );
    assert!(out.stderr.contains("asking again"), "{out:?}");
    rrc(&["backup", "--listen", "127.0.0.1:0", "--key", key]).fails_with("or --fence");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Runs `rrc ARGS` in a private mount namespace prepared by `setup` (a shell
/// snippet), so a kernel feature can be hidden from rrc alone.
fn with_hidden_feature(setup: &str, args: &str) -> Out {
    let mut c = std::process::Command::new("unshare");
    c.args(["-m", "sh", "-c", &format!("{setup} && exec {RRC} {args}")]);
    output(c)
}

#[test]
fn missing_kernel_features() {
    let lab = TestLab::up("feat");
    let vip = lab.vip();
    // No TAP driver: /dev/net/tun is there but is not the TUN device.
    let out = with_hidden_feature(
        "mount --bind /dev/null /dev/net/tun",
        &format!(
            "lab exec --lab {} primary -- {RRC} run --name nt --addr {vip} -- true",
            lab.name
        ),
    );
    out.fails_with("TAP devices are not available");
    nothing_created(&lab, "primary", "nt");
    // No cgroup hierarchy mounted.
    let out = with_hidden_feature("umount -R /sys/fs/cgroup", "run --name ncg -- true");
    out.fails_with("no usable cgroup hierarchy");
    // (A missing namespace kind cannot be hidden from a process short of
    // another kernel; rrc-container's probe tests cover its detection.)
}

#[test]
fn an_unknown_root_is_refused() {
    require_root();
    rrc(&[
        "run",
        "--name",
        "privbad",
        "--root",
        "elsewhere",
        "--",
        "true",
    ])
    .fails_with("expected host or private");
}
