//! `rrc stop`: stop a container by name.

use std::time::Duration;

use anyhow::Result;
use clap::Args;
use rrc_container::stop::{Stopped, stop as stop_container};
use rrc_container::{ContainerName, HostState, probe};

/// Stop a container: SIGTERM to its program, SIGKILL to everything in it
/// after the timeout; returns once its processes, cgroup, TAP device,
/// namespaces and state are gone.
#[derive(Debug, Args)]
pub struct StopArgs {
    /// Container name (see `rrc ps`).
    name: String,
    /// How long to wait after SIGTERM before killing.
    #[arg(long, short, default_value = "10s", value_parser = super::parse_duration)]
    timeout: Duration,
}

pub fn stop(a: StopArgs) -> Result<i32> {
    let name: ContainerName = a.name.parse()?;
    probe::require_root("rrc stop")?;
    let host = HostState::current();
    let how = stop_container(&host, &name, a.timeout)?;
    match how {
        Stopped::Gracefully => println!("stopped {name}"),
        Stopped::Killed => println!("stopped {name} (killed after {:?})", a.timeout),
        Stopped::StaleCleaned => println!("removed leftovers of {name} (its rrc process had died)"),
    }
    Ok(0)
}
