//! `rrc status`: what runs beside a container says of itself.

use anyhow::{Result, bail};
use clap::Args;
use rrc_container::control::{self, Request, Response};
use rrc_container::{ContainerName, HostState, Status, probe};

/// Show what the work running beside a container reports: for a replicated
/// container, its replication (checkpoints committed, pauses, what the log
/// carried, how long replies waited or would have waited), as JSON.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Container name (see `rrc ps`).
    name: String,
}

pub fn status(a: StatusArgs) -> Result<i32> {
    let name: ContainerName = a.name.parse()?;
    probe::require_root("rrc status")?;
    let host = HostState::current();
    let Some((_, st)) = host.load(&name)? else {
        return Err(rrc_container::Error::UnknownContainer(name.to_string()).into());
    };
    if st != Status::Running {
        bail!("container {name} is {st}, not running");
    }
    match control::request(&host, &name, &Request::Status)? {
        Response::Status(s) => println!("{}", serde_json::to_string_pretty(&s)?),
        Response::Failed(e) => bail!("status of container {name}: {e}"),
        other => bail!("status of container {name}: unexpected answer {other:?}"),
    }
    Ok(0)
}
