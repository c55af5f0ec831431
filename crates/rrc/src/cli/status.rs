//! `rrc status`: replicated services on this host, as their primaries and
//! backups report them.

use std::path::PathBuf;

use anyhow::{Result, bail};
use clap::Args;
use rrc_container::control::{self, Request, Response};
use rrc_container::{ContainerName, HostState, Status, probe};
use rrc_replica::backup_status::BackupStatus;
use rrc_replica::primary::PrimaryStats;

/// Show the replicated services on this host: each container's role,
/// mode, arbiter term, whether it is protected, the age of the backup's
/// last committed checkpoint, the log not yet acknowledged, the last
/// checkpoint pause and the replies held now; and each backup's state
/// (whom it protects, under which term, what it holds, and the phases of
/// its takeover once it made one).
///
/// With NAME, that container alone (--json: everything the work beside it
/// reports, as JSON).
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Container name (see `rrc ps`).
    name: Option<String>,
    /// Print what the container's companions report, as JSON.
    #[arg(long, requires = "name")]
    json: bool,
    /// Also look for a backup in DIR (its --dir), besides this host's
    /// default backup directories.
    #[arg(long, value_name = "DIR")]
    backup_dir: Vec<PathBuf>,
}

pub fn status(a: StatusArgs) -> Result<i32> {
    probe::require_root("rrc status")?;
    let host = HostState::current();
    if let Some(name) = &a.name {
        let name: ContainerName = name.parse()?;
        let report = container_report(&host, &name)?;
        if a.json {
            println!("{}", serde_json::to_string_pretty(&report)?);
        } else {
            println!("{}", describe(&name, &report));
        }
        return Ok(0);
    }
    let mut any = false;
    for (rec, st) in host.list()? {
        any = true;
        if st != Status::Running {
            println!("{}: {st}", rec.name);
            continue;
        }
        match container_report(&host, &rec.name) {
            Ok(r) => println!("{}", describe(&rec.name, &r)),
            Err(e) => println!("{}: {e:#}", rec.name),
        }
    }
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(host.dir().join("backup"))
        .map(|rd| rd.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    dirs.extend(a.backup_dir.iter().cloned());
    dirs.sort();
    dirs.dedup();
    for d in dirs {
        // A backup serving several services keeps one directory each.
        let subs: Vec<PathBuf> = std::fs::read_dir(&d)
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.path())
                    .filter(|p| p.is_dir())
                    .collect()
            })
            .unwrap_or_default();
        for d in std::iter::once(d).chain(subs) {
            if let Some(b) = BackupStatus::read(&d) {
                any = true;
                println!("{}", b.describe());
            }
        }
    }
    if !any {
        println!("no containers and no backups on this host");
    }
    Ok(0)
}

/// What each companion of a container reports, by name.
type Report = std::collections::BTreeMap<String, serde_json::Value>;

/// What the work beside a running container reports.
fn container_report(host: &HostState, name: &ContainerName) -> Result<Report> {
    let Some((_, st)) = host.load(name)? else {
        return Err(rrc_container::Error::UnknownContainer(name.to_string()).into());
    };
    if st != Status::Running {
        bail!("container {name} is {st}, not running");
    }
    match control::request(host, name, &Request::Status)? {
        Response::Status(s) => Ok(s),
        Response::Failed(e) => bail!("status of container {name}: {e}"),
        other => bail!("status of container {name}: unexpected answer {other:?}"),
    }
}

/// A container's report for people.
fn describe(name: &ContainerName, report: &Report) -> String {
    let Some(r) = report
        .get("replication")
        .and_then(|v| serde_json::from_value::<PrimaryStats>(v.clone()).ok())
    else {
        return format!("{name}: running, not replicated");
    };
    let mut s = format!(
        "{name}: primary ({} mode), {}, {}",
        if r.mode.is_empty() { "?" } else { &r.mode },
        r.term
            .map_or("no arbiter".to_string(), |t| format!("term {t}")),
        if r.protected {
            "protected".to_string()
        } else if r.awaiting_arbiter {
            "UNPROTECTED: lost its backup, holding replies until the arbiter answers".to_string()
        } else {
            "UNPROTECTED".to_string()
        }
    );
    let commit = r.last_commit_ms_ago.map_or("none yet".to_string(), |ms| {
        format!("{:.2} s ago", ms / 1e3)
    });
    let deferred = if r.deferred > 0 {
        format!(", {} put off for connections not yet accepted", r.deferred)
    } else {
        String::new()
    };
    s += &format!(
        "\n  last committed checkpoint {commit} ({} committed, {} failed{deferred}); last pause {:.1} ms (max {:.1} ms)",
        r.committed,
        r.failed,
        r.last_pause_us as f64 / 1e3,
        r.pause_max_us as f64 / 1e3
    );
    if let Some((records, frames)) = r.log_lag {
        s += &format!("\n  log not yet acknowledged: {records} records, {frames} inbound frames");
    }
    s += &format!(
        "\n  replies held now: {} frames ({} bytes)",
        r.held.0, r.held.1
    );
    s
}
