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
