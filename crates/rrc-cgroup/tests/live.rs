//! Both cgroup interfaces on this machine's real hierarchies: create a group
//! below our own, put a process in it, freeze, kill, remove.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use nix::unistd::Pid;
use rrc_cgroup::{Layout, Version};

fn exercise(layout: &Layout, tag: &str) {
    let cg = layout
        .create_below_self(Path::new(&format!("rrc-test-{tag}-{}", std::process::id())))
        .unwrap();
    let mut child = Command::new("sleep").arg("1000").spawn().unwrap();
    let pid = Pid::from_raw(child.id() as i32);
    cg.add_process(pid).unwrap();
    assert_eq!(cg.processes().unwrap(), vec![pid]);
    cg.freeze(Duration::from_secs(5)).unwrap();
    assert!(cg.is_frozen().unwrap());
    cg.thaw().unwrap();
    cg.kill_all(Duration::from_secs(5)).unwrap();
    let status = child.wait().unwrap();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(9)
    );
    assert!(cg.is_empty().unwrap());
    cg.remove(Duration::from_secs(5)).unwrap();
    assert!(!cg.exists());
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

#[test]
fn default_layout_freezes_and_kills() {
    assert!(is_root(), "run as root");
    exercise(&Layout::detect().unwrap(), "default");
}

#[test]
fn v2_freezes_and_kills() {
    assert!(is_root(), "run as root");
    let layout = Layout::detect_preferring(Version::V2).unwrap();
    assert_eq!(layout.version(), Version::V2);
    exercise(&layout, "v2");
}

/// A shell moved into `cg` that makes a zero device node (c 1:5) and a
/// null device node (c 1:3) in a directory of its own and reads each:
/// what it printed.
fn try_devices(cg: &rrc_cgroup::Cgroup, tag: &str) -> String {
    let dir = std::env::temp_dir().join(format!("rrc-devtest-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let join = cg
        .dirs()
        .iter()
        .map(|d| format!("echo $$ > {}/cgroup.procs; ", d.display()))
        .collect::<String>();
    let script = format!(
        "{join} cd {dir}; mknod zero c 1 5 && echo MADE; mknod null c 1 3; \
         head -c 1 zero > /dev/null 2>&1 && echo READ-ZERO; \
         echo x > null && echo WROTE-NULL",
        dir = dir.display()
    );
    let out = Command::new("sh").arg("-c").arg(script).output().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn exercise_devices(layout: &Layout, tag: &str) {
    let cg = layout
        .create_below_self(Path::new(&format!(
            "rrc-test-dev-{tag}-{}",
            std::process::id()
        )))
        .unwrap();
    cg.limit_devices(&[
        rrc_cgroup::DeviceRule {
            kind: rrc_cgroup::DeviceKind::Char,
            major: None,
            minor: None,
            access: rrc_cgroup::Access::MKNOD,
        },
        rrc_cgroup::DeviceRule {
            kind: rrc_cgroup::DeviceKind::Char,
            major: Some(1),
            minor: Some(3),
            access: rrc_cgroup::Access::ALL,
        },
    ])
    .unwrap();
    let seen = try_devices(&cg, tag);
    cg.kill_all(Duration::from_secs(5)).unwrap();
    cg.remove(Duration::from_secs(5)).unwrap();
    assert!(seen.contains("MADE"), "{tag}: {seen}");
    assert!(seen.contains("WROTE-NULL"), "{tag}: {seen}");
    assert!(!seen.contains("READ-ZERO"), "{tag}: {seen}");
}

#[test]
fn a_group_keeps_its_processes_to_the_devices_listed() {
    assert!(is_root(), "run as root");
    // Outside any limit the same shell reads the zero device's node.
    let free = Layout::detect()
        .unwrap()
        .create_below_self(Path::new(&format!(
            "rrc-test-devfree-{}",
            std::process::id()
        )))
        .unwrap();
    let seen = try_devices(&free, "free");
    free.remove(Duration::from_secs(5)).unwrap();
    assert!(seen.contains("READ-ZERO"), "without limits: {seen}");
    exercise_devices(&Layout::detect().unwrap(), "v1");
    exercise_devices(&Layout::detect_preferring(Version::V2).unwrap(), "v2");
}
