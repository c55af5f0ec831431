//! `rrc ps`: list the containers of this host.

use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Result;
use clap::Args;
use rrc_container::HostState;

/// List the containers on this host (the current network namespace, e.g. a
/// lab host under `rrc lab exec`).
#[derive(Debug, Args)]
pub struct PsArgs {
    /// Print JSON records instead of a table.
    #[arg(long)]
    json: bool,
}

fn age(created: u64) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(created);
    let s = now.saturating_sub(created);
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        3600..86400 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86400),
    }
}

/// The command line as a shell would need it typed.
fn shell_words(argv: &[String]) -> String {
    argv.iter()
        .map(|a| {
            let plain = !a.is_empty()
                && a.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c));
            if plain {
                a.clone()
            } else {
                format!("'{}'", a.replace('\'', "'\\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

pub fn ps(a: PsArgs) -> Result<i32> {
    let host = HostState::current();
    let list = host.list()?;
    if a.json {
        let items: Vec<serde_json::Value> = list
            .iter()
            .map(|(rec, st)| {
                let mut v = serde_json::to_value(rec).expect("records serialize");
                v["status"] = serde_json::Value::String(st.to_string());
                v["host"] = serde_json::Value::String(host.host().to_string());
                v
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&items)?);
        return Ok(0);
    }
    if list.is_empty() {
        println!("no containers on host {}", host.host());
        return Ok(0);
    }
    println!(
        "{:<16} {:<9} {:>8} {:<19} {:<18} {:<8} {:>5}  COMMAND",
        "NAME", "STATUS", "PID", "ADDRESS", "MAC", "UPLINK", "AGE"
    );
    for (rec, st) in list {
        let pid = rec.init.map(|p| p.pid.to_string()).unwrap_or("-".into());
        let (addr, mac, up) = match &rec.net {
            Some(n) => (n.addr.to_string(), n.mac.to_string(), n.uplink.clone()),
            None => ("-".into(), "-".into(), "-".into()),
        };
        println!(
            "{:<16} {:<9} {:>8} {:<19} {:<18} {:<8} {:>5}  {}",
            rec.name,
            st,
            pid,
            addr,
            mac,
            up,
            age(rec.created_unix),
            shell_words(&rec.argv)
        );
    }
    Ok(0)
}
