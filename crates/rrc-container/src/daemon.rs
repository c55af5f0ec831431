//! Running in the background (`rrc run --detach`): the command returns once
//! the container runs, or with the error that prevented it, while a
//! background rrc process keeps supervising.

use std::io::{Read, Write};
use std::os::fd::OwnedFd;

use nix::unistd::{ForkResult, fork, pipe2, setsid};

use crate::{Result, nix_setup_err};

/// The foreground half, waiting for the verdict.
pub struct Waiter(OwnedFd);

/// The background half, which reports the verdict.
pub struct Notifier(Option<OwnedFd>);

pub enum Detached {
    Foreground(Waiter),
    Background(Notifier),
}

/// Forks. The child starts its own session and carries on; the parent gets
/// a [`Waiter`].
///
/// Must be called while the process has a single thread.
pub fn detach() -> Result<Detached> {
    // A thread started before would not exist in the background process,
    // and whatever waits for it would wait forever.
    let threads = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Threads:"))
                .and_then(|n| n.trim().parse::<u32>().ok())
        })
        .unwrap_or(1);
    if threads > 1 {
        return Err(crate::Error::Setup {
            stage: "detach",
            source: std::io::Error::other(format!(
                "the process has {threads} threads; it can only detach with one"
            )),
        });
    }
    let (rd, wr) = pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(nix_setup_err("pipe"))?;
    // SAFETY: the CLI detaches before starting any thread, so the child is a
    // faithful single-threaded copy.
    match unsafe { fork() }.map_err(nix_setup_err("fork"))? {
        ForkResult::Parent { .. } => {
            drop(wr);
            Ok(Detached::Foreground(Waiter(rd)))
        }
        ForkResult::Child => {
            drop(rd);
            setsid().map_err(nix_setup_err("new session"))?;
            Ok(Detached::Background(Notifier(Some(wr))))
        }
    }
}

impl Waiter {
    /// `Ok(message)` once the background process is ready, `Err(message)`
    /// if it failed (or died without a word).
    pub fn wait(self) -> std::result::Result<String, String> {
        let mut f = std::fs::File::from(self.0);
        let mut text = String::new();
        let _ = f.read_to_string(&mut text);
        if let Some(ok) = text.strip_prefix("ok ") {
            Ok(ok.to_string())
        } else if let Some(err) = text.strip_prefix("err ") {
            Err(err.to_string())
        } else {
            Err("the background rrc process died during startup".into())
        }
    }
}

impl Notifier {
    fn send(&mut self, text: &str) {
        if let Some(fd) = self.0.take() {
            let mut f = std::fs::File::from(fd);
            let _ = f.write_all(text.as_bytes());
        }
    }

    pub fn ready(&mut self, message: &str) {
        self.send(&format!("ok {message}"));
    }

    pub fn failed(&mut self, message: &str) {
        self.send(&format!("err {message}"));
    }
}
