//! What the engine's own integration tests share: building a C fixture of
//! `tests/fixtures`, running it as the fixtures' protocol says (READY,
//! SIGUSR1, PASS or FAIL), restoring an image in this process. They need
//! root (ptrace of any process, restoring pids) and gcc.
#![allow(dead_code)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;

pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the engine's integration tests trace and restore processes: run them as root"
    );
}

/// A scratch directory of this test process, empty.
pub fn scratch(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("rrc-ckpt-it-{}-{tag}", std::process::id()));
    let _ = fs::remove_dir_all(&d);
    fs::create_dir_all(&d).unwrap();
    d
}

/// Compiles fixture `name` into `dir`, as `tests/fixtures/build.sh` does.
pub fn build(name: &str, dir: &Path) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let out = dir.join(name);
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

/// A fixture started by this test (its child) or restored by it.
pub struct Fixture {
    pub pid: Pid,
    state: State,
    log: PathBuf,
}

enum State {
    /// Started here.
    Started(Child),
    /// Restored here (so our child too).
    Restored,
    /// Exited and reaped.
    Gone,
}

impl Fixture {
    /// Starts `bin` in `dir` with `env` added, and waits for its READY.
    pub fn start(bin: &Path, dir: &Path, env: &[(&str, &str)]) -> Fixture {
        let log = dir.join("fixture.log");
        let f = fs::File::create(&log).unwrap();
        let child = Command::new(bin)
            .current_dir(dir)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            .spawn()
            .unwrap();
        let fx = Fixture {
            pid: Pid::from_raw(child.id() as i32),
            state: State::Started(child),
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !fx.log_text().contains("READY") {
            assert!(Instant::now() < deadline, "no READY: {}", fx.log_text());
            std::thread::sleep(Duration::from_millis(20));
        }
        // Threads reach their loops.
        std::thread::sleep(Duration::from_millis(200));
        fx
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Makes sure the original, killed by a checkpoint, is reaped, so that
    /// its pid is free for the restore. (The engine reaps what it kills
    /// as its tracer; that includes a child of ours.)
    pub fn reap_killed(&mut self) {
        let State::Started(mut child) = std::mem::replace(&mut self.state, State::Gone) else {
            panic!("not the original");
        };
        match child.wait() {
            Ok(status) => assert_eq!(
                std::os::unix::process::ExitStatusExt::signal(&status),
                Some(9),
                "the checkpoint killed the original"
            ),
            Err(e) => assert_eq!(e.raw_os_error(), Some(libc::ECHILD), "{e}"),
        }
    }

    /// Restores `images` (a checkpoint of this fixture, which is gone) in
    /// this process: the restored root is our child again.
    pub fn restore(&mut self, images: &Path) {
        assert!(
            matches!(self.state, State::Gone),
            "the original is reaped first"
        );
        let r =
            rrc_ckpt::restore::restore(&rrc_ckpt::restore::RestoreOptions::tree(images)).unwrap();
        assert_eq!(r.root, self.pid);
        self.state = State::Restored;
    }

    /// Tells the fixture to check itself; its exit code and log.
    pub fn verdict(mut self) -> (i32, String) {
        kill(self.pid, Signal::SIGUSR1).unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        let code = loop {
            let status = match &mut self.state {
                State::Started(c) => c.try_wait().unwrap().map(|s| s.code().unwrap_or(128 + 9)),
                State::Restored => match waitpid(self.pid, Some(WaitPidFlag::WNOHANG)) {
                    Ok(WaitStatus::Exited(_, c)) => Some(c),
                    Ok(WaitStatus::Signaled(_, s, _)) => Some(128 + s as i32),
                    _ => None,
                },
                State::Gone => panic!("no fixture to ask"),
            };
            if let Some(c) = status {
                break c;
            }
            assert!(Instant::now() < deadline, "no verdict: {}", self.log_text());
            std::thread::sleep(Duration::from_millis(20));
        };
        self.state = State::Gone;
        (code, self.log_text())
    }

    /// The verdict must be PASS.
    #[track_caller]
    pub fn passes(self, what: &str) {
        let (code, log) = self.verdict();
        assert!(
            code == 0 && log.trim_end().ends_with("PASS"),
            "{what}: exit {code}\n{log}"
        );
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        // A failed test leaves no fixture running.
        match std::mem::replace(&mut self.state, State::Gone) {
            State::Started(mut c) => {
                let _ = c.kill();
                let _ = c.wait();
            }
            State::Restored => {
                let _ = kill(self.pid, Signal::SIGKILL);
                let _ = waitpid(self.pid, None);
            }
            State::Gone => {}
        }
    }
}
