//! Shared helpers of the integration tests: they drive the real `rrc`
//! binary, as root, in labs of their own that are removed even when a test
//! fails.
#![allow(dead_code)]

use std::fs;
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const RRC: &str = env!("CARGO_BIN_EXE_rrc");

pub fn require_root() {
    assert!(
        nix_is_root(),
        "these tests build namespaces, cgroups and TAP devices: run them as root"
    );
}

fn nix_is_root() -> bool {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false)
}

#[derive(Debug)]
pub struct Out {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Out {
    #[track_caller]
    pub fn ok(self) -> Out {
        assert_eq!(self.code, 0, "command failed: {self:?}");
        self
    }

    /// A failure with a one-line error that mentions `needle`.
    #[track_caller]
    pub fn fails_with(self, needle: &str) -> Out {
        assert_ne!(self.code, 0, "expected a failure: {self:?}");
        let lines: Vec<&str> = self.stderr.lines().collect();
        assert_eq!(lines.len(), 1, "expected a one-line error: {self:?}");
        assert!(
            lines[0].starts_with("rrc: error: ") && lines[0].contains(needle),
            "expected an error mentioning {needle:?}: {self:?}"
        );
        self
    }
}

pub fn output(mut cmd: Command) -> Out {
    let o = cmd
        .stdin(Stdio::null())
        .output()
        .expect("the command starts");
    Out {
        code: o.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    }
}

/// `rrc run --name NAME --record LOG --share DIR -- BIN`: a container
/// recording `bin` into `log` (its standard input and output left to the
/// caller); the directory of `bin` (a test's scratch directory, hidden by
/// the private root) is shared into it.
pub fn record_command(name: &str, log: &Path, bin: &Path) -> Command {
    let mut c = Command::new(RRC);
    c.args(["run", "--name", name, "--record"])
        .arg(log)
        .arg("--share")
        .arg(bin.parent().expect("a fixture in a directory"))
        .arg("--")
        .arg(bin);
    c
}

/// The records of a replay's capture file (`rrc replay --capture`), in
/// order, read by the format's own reader (a torn record fails the test).
pub fn capture_records(path: &Path) -> Vec<rrc_rr::interface::CaptureRecord> {
    let bytes = fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    rrc_rr::interface::parse_capture(&bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

pub fn rrc(args: &[&str]) -> Out {
    let mut c = Command::new(RRC);
    c.args(args);
    output(c)
}

/// A process exists and is not a zombie.
pub fn process_alive(pid: i64) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => {
            let state = s[s.rfind(')').unwrap() + 2..].chars().next().unwrap();
            state != 'Z' && state != 'X'
        }
        Err(_) => false,
    }
}

/// Some process still lives in the network namespace with this identity.
pub fn netns_in_use(dev: u64, ino: u64) -> bool {
    fs::read_dir("/proc").unwrap().flatten().any(|e| {
        e.file_name().to_string_lossy().parse::<u32>().is_ok()
            && fs::metadata(e.path().join("ns/net"))
                .map(|m| m.dev() == dev && m.ino() == ino)
                .unwrap_or(false)
    })
}

pub fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A lab of the test's own, removed on drop (also when the test panics).
pub struct TestLab {
    pub name: String,
    pub status: Value,
}

impl TestLab {
    /// `tag` plus this test process's pid names the lab, so tests running in
    /// parallel never share one.
    pub fn up(tag: &str) -> TestLab {
        require_root();
        let name = format!("{tag}{}", std::process::id());
        assert!(name.len() <= 16, "lab name {name} too long");
        rrc(&["lab", "down", "--lab", &name]).ok();
        rrc(&["lab", "up", "--lab", &name]).ok();
        let mut lab = TestLab {
            name,
            status: Value::Null,
        };
        lab.refresh();
        lab
    }

    pub fn refresh(&mut self) {
        let out = rrc(&["lab", "status", "--json", "--lab", &self.name]).ok();
        self.status = serde_json::from_str(&out.stdout).expect("status is JSON");
    }

    pub fn host(&self, host: &str) -> &Value {
        self.status["hosts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|h| h["name"] == host)
            .unwrap()
    }

    pub fn netns(&self, host: &str) -> String {
        self.host(host)["netns"].as_str().unwrap().to_string()
    }

    /// The address of `host` on the LAN, without prefix.
    pub fn addr(&self, host: &str) -> String {
        strip_prefix(self.host(host)["lan_addr"].as_str().unwrap())
    }

    /// The VIP, with prefix.
    pub fn vip(&self) -> String {
        self.status["vip"].as_str().unwrap().to_string()
    }

    /// The LAN address at `offset` in the subnet, with prefix.
    pub fn lan_at(&self, offset: u8) -> String {
        let vip = self.vip();
        let (ip, prefix) = vip.split_once('/').unwrap();
        let mut octets: Vec<u8> = ip.split('.').map(|o| o.parse().unwrap()).collect();
        octets[3] = offset;
        format!(
            "{}.{}.{}.{}/{prefix}",
            octets[0], octets[1], octets[2], octets[3]
        )
    }

    /// `rrc lab exec --lab NAME HOST -- ARGS`.
    pub fn exec(&self, host: &str, args: &[&str]) -> Out {
        let mut c = Command::new(RRC);
        c.args(["lab", "exec", "--lab", &self.name, host, "--"])
            .args(args);
        output(c)
    }

    /// `rrc ARGS` run on `host`.
    pub fn rrc_on(&self, host: &str, args: &[&str]) -> Out {
        let mut all = vec![RRC];
        all.extend_from_slice(args);
        self.exec(host, &all)
    }

    /// Starts a detached container and returns its `rrc ps --json` record.
    pub fn run_container(&self, host: &str, name: &str, addr: &str, cmd: &[&str]) -> Value {
        self.run_container_with(host, name, addr, &[], cmd)
    }

    /// [`TestLab::run_container`] with extra `rrc run` options.
    pub fn run_container_with(
        &self,
        host: &str,
        name: &str,
        addr: &str,
        options: &[&str],
        cmd: &[&str],
    ) -> Value {
        let mut args = vec!["run", "--detach", "--name", name, "--addr", addr];
        args.extend_from_slice(options);
        args.push("--");
        args.extend_from_slice(cmd);
        let out = self.rrc_on(host, &args).ok();
        assert!(out.stdout.contains("running"), "{out:?}");
        self.container(host, name).expect("listed after start")
    }

    /// The `rrc ps --json` record of container `name` on `host`.
    pub fn container(&self, host: &str, name: &str) -> Option<Value> {
        let out = self.rrc_on(host, &["ps", "--json"]).ok();
        let list: Value = serde_json::from_str(&out.stdout).unwrap();
        list.as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == name)
            .cloned()
    }

    /// Runs `f` on a thread inside `host`'s network namespace.
    pub fn on<T: Send>(&self, host: &str, f: impl FnOnce() -> T + Send) -> T {
        rrc_net::NetNs::named(&self.netns(host))
            .unwrap()
            .run(f)
            .unwrap()
    }

    /// Waits until `addr` accepts connections from the client host.
    pub fn wait_tcp(&self, addr: &str) {
        let addr: SocketAddr = addr.parse().unwrap();
        let ok = self.on("client", || {
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                    return true;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            false
        });
        assert!(ok, "{addr} never accepted a connection from client");
    }
}

impl Drop for TestLab {
    fn drop(&mut self) {
        let out = rrc(&["lab", "down", "--lab", &self.name]);
        if out.code != 0 && !std::thread::panicking() {
            panic!("lab down failed: {out:?}");
        }
    }
}

pub fn strip_prefix(a: &str) -> String {
    a.split('/').next().unwrap().to_string()
}

/// Proves a stopped container left nothing behind: no process, cgroup,
/// network namespace (and so no TAP device, which lived in it) or state.
pub fn assert_container_gone(lab: &TestLab, host: &str, rec: &Value) {
    let name = rec["name"].as_str().unwrap();
    let init = rec["init"]["pid"].as_i64().unwrap();
    let supervisor = rec["supervisor"]["pid"].as_i64().unwrap();
    wait_until(
        "the container's processes to end",
        Duration::from_secs(10),
        || !process_alive(init) && !process_alive(supervisor),
    );
    for dir in rec["cgroup"]["dirs"].as_array().unwrap() {
        let dir = PathBuf::from(dir.as_str().unwrap());
        assert!(!dir.exists(), "cgroup {} left behind", dir.display());
    }
    let ns = rec["netns"].as_array().unwrap();
    let (dev, ino) = (ns[0].as_u64().unwrap(), ns[1].as_u64().unwrap());
    wait_until(
        "the container's network namespace to go",
        Duration::from_secs(5),
        || !netns_in_use(dev, ino),
    );
    assert!(lab.container(host, name).is_none(), "{name} still listed");
    let state = Path::new("/run/rrc/hosts")
        .join(lab.netns(host))
        .join("containers")
        .join(name);
    assert!(!state.exists(), "state {} left behind", state.display());
}

/// A memcached text-protocol round trip: set then get.
pub fn memcached_set_get(addr: &str, key: &str, value: &str) -> String {
    use std::io::{BufRead, BufReader, Write};
    let s = TcpStream::connect_timeout(&addr.parse().unwrap(), Duration::from_secs(5)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut w = s.try_clone().unwrap();
    let mut r = BufReader::new(s);
    write!(w, "set {key} 0 0 {}\r\n{value}\r\n", value.len()).unwrap();
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    assert_eq!(line, "STORED\r\n");
    write!(w, "get {key}\r\n").unwrap();
    let mut reply = String::new();
    loop {
        let mut l = String::new();
        r.read_line(&mut l).unwrap();
        if l == "END\r\n" || l.is_empty() {
            break;
        }
        reply.push_str(&l);
    }
    reply
}

/// Where the C fixtures of the engine live.
#[allow(dead_code)]
pub fn fixtures_src() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../rrc-ckpt/tests/fixtures")
}

/// Removes what container `name` (on the machine, not in a lab) kept in
/// its private root: one checkpointed or restored keeps it for its images.
#[allow(dead_code)]
pub fn remove_private_root(name: &str) {
    let name = name.parse().expect("a container name");
    if let Ok(dir) = rrc_container::rootfs::RootFs::private_dir(&name) {
        let _ = fs::remove_dir_all(dir);
    }
    // And the output of a detached run, which outlives its container.
    let _ = fs::remove_file(rrc_container::HostState::current().log_path(&name));
}

/// A scratch directory of this test process.
#[allow(dead_code)]
pub fn scratch(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("rrc-ckpt-test-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Compiles fixture `name` into `dir`.
#[allow(dead_code)]
pub fn build(name: &str, dir: &std::path::Path) -> std::path::PathBuf {
    let out = dir.join(name);
    let src = fixtures_src();
    let status = Command::new("gcc")
        .args(["-O1", "-g", "-Wall", "-Wextra", "-Werror", "-pthread", "-I"])
        .arg(&src)
        .arg("-o")
        .arg(&out)
        .arg(src.join(format!("{name}.c")))
        .arg("-lrt")
        .status()
        .expect("gcc runs");
    assert!(status.success(), "fixture {name} does not compile");
    out
}

/// A lab of the test's own (`tag` plus this process's pid names it) for
/// tests that drive it through `rrc_bench`; removed when dropped.
pub fn lab_session(tag: &str) -> rrc_bench::session::LabSession {
    require_root();
    let name = format!("{tag}{}", std::process::id());
    rrc_bench::session::LabSession::start(std::path::Path::new(RRC), &name, None).expect("lab up")
}

/// A small tmpfs, unmounted when dropped (even when the test fails).
pub struct SmallFs(pub std::path::PathBuf);

impl SmallFs {
    pub fn mount(at: std::path::PathBuf, options: &str) -> SmallFs {
        std::fs::create_dir_all(&at).unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", options, "tmpfs"])
            .arg(&at)
            .status()
            .unwrap()
            .success();
        assert!(ok, "mounting a tmpfs at {}", at.display());
        SmallFs(at)
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
        let _ = std::fs::remove_dir(&self.0);
        // And the scratch directory it was made in, if nothing else is.
        if let Some(parent) = self.0.parent() {
            let _ = std::fs::remove_dir(parent);
        }
    }
}
