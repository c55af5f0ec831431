//! `rrc stop NAME`: stopping a container from another process.

use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};

use crate::proc::catches_signal;
use crate::spec::ContainerName;
use crate::state::{HostState, Status};
use crate::{Error, Result};

/// What a stop did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stopped {
    /// The program ended on SIGTERM within the grace period.
    Gracefully,
    /// It had to be killed.
    Killed,
    /// Its rrc process was already dead; the leftovers were removed.
    StaleCleaned,
}

/// Stops container `name` on `host`: SIGTERM to its program, SIGKILL to
/// everything in it after `grace`, then waits until its rrc process has
/// removed every trace and exited.
pub fn stop(host: &HostState, name: &ContainerName, grace: Duration) -> Result<Stopped> {
    let Some((rec, status)) = host.load(name)? else {
        return Err(Error::UnknownContainer(name.to_string()));
    };
    if status == Status::Stale {
        host.clean_stale(&rec)?;
        return Ok(Stopped::StaleCleaned);
    }
    let supervisor = rec.supervisor;
    let mut how = Stopped::Gracefully;
    match rec.init.filter(|p| p.is_alive()) {
        Some(init) if catches_signal(init.pid, Signal::SIGTERM as i32) => {
            let _ = kill(init.nix_pid(), Signal::SIGTERM);
        }
        // Still starting, or a pid 1 deaf to SIGTERM: the supervisor's own
        // stop path decides (it kills at once in the latter case).
        _ => {
            let _ = kill(supervisor.nix_pid(), Signal::SIGTERM);
        }
    }
    if !wait_gone(|| supervisor.is_alive(), grace) {
        how = Stopped::Killed;
        if let Some(cg) = &rec.cgroup {
            cg.to_cgroup().kill_all(Duration::from_secs(5))?;
        }
        if !wait_gone(|| supervisor.is_alive(), Duration::from_secs(10)) {
            // The supervisor is wedged: kill it and clean up after it.
            let _ = kill(supervisor.nix_pid(), Signal::SIGKILL);
            if !wait_gone(|| supervisor.is_alive(), Duration::from_secs(5)) {
                return Err(Error::StopTimeout {
                    name: name.to_string(),
                    secs: grace.as_secs() + 15,
                });
            }
        }
    }
    // A supervisor that died instead of finishing leaves its state behind.
    if let Some((rec, _)) = host.load(name)?
        && rec.supervisor == supervisor
    {
        host.clean_stale(&rec)?;
    }
    Ok(how)
}

fn wait_gone(alive: impl Fn() -> bool, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while alive() {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    true
}
