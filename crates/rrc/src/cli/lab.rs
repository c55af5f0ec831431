//! `rrc lab`: the local test network.

use std::ffi::OsString;

use anyhow::Result;
use clap::{Args, Subcommand};
use ipnet::Ipv4Net;
use rrc_lab::{Host, Lab, LabName};

#[derive(Debug, Args)]
pub struct LabSel {
    /// Lab name (lowercase letters and digits).
    #[arg(long, env = "RRC_LAB", default_value = "main")]
    lab: String,
}

impl LabSel {
    fn name(&self) -> Result<LabName> {
        Ok(self.lab.parse()?)
    }
}

/// A local test network of hosts made of network namespaces.
///
/// Hosts `client`, `primary` and `backup` share a bridged LAN (with a
/// service address, the VIP, reserved for the container); primary and
/// backup also have a direct replication link. Several labs with different
/// names can run side by side.
#[derive(Debug, Subcommand)]
pub enum LabCommand {
    /// Create the lab (or complete a partial one); fine to run twice.
    Up {
        #[command(flatten)]
        sel: LabSel,
        /// LAN subnet, e.g. 10.77.0.0/24 (default: derived from the name).
        #[arg(long)]
        subnet: Option<Ipv4Net>,
    },
    /// Remove the lab: every process on it, its namespaces, cgroups, state.
    Down {
        #[command(flatten)]
        sel: LabSel,
    },
    /// Show the lab's hosts, addresses, processes and containers.
    Status {
        #[command(flatten)]
        sel: LabSel,
        #[arg(long)]
        json: bool,
    },
    /// List the labs on this machine.
    List,
    /// Run a command on a host of the lab (its network namespace and cgroup).
    Exec {
        #[command(flatten)]
        sel: LabSel,
        /// client, primary or backup.
        host: Host,
        #[arg(last = true, required = true, value_name = "CMD")]
        command: Vec<OsString>,
    },
    /// Fail-stop a host as if its power were cut: every process on it dies at
    /// once and its links go down.
    Kill {
        #[command(flatten)]
        sel: LabSel,
        host: Host,
    },
    /// Bring a killed host back, empty.
    Revive {
        #[command(flatten)]
        sel: LabSel,
        host: Host,
    },
}

pub fn lab(c: LabCommand) -> Result<i32> {
    match c {
        LabCommand::Up { sel, subnet } => {
            let (lab, created) = Lab::up(sel.name()?, subnet)?;
            let p = lab.plan();
            println!(
                "lab {} {}: LAN {} (client {}, primary {}, backup {}), VIP {}, replication link {}",
                p.name,
                if created { "is up" } else { "was already up" },
                p.subnet,
                p.lan_addr(Host::Client).addr(),
                p.lan_addr(Host::Primary).addr(),
                p.lan_addr(Host::Backup).addr(),
                p.vip(),
                p.repl_subnet
            );
            Ok(0)
        }
        LabCommand::Down { sel } => {
            let name = sel.name()?;
            if Lab::down(&name)? {
                println!("lab {name} is down");
            } else {
                println!("no lab named {name}; nothing to do");
            }
            Ok(0)
        }
        LabCommand::Status { sel, json } => {
            let st = Lab::open(&sel.name()?)?.status()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&st)?);
                return Ok(0);
            }
            println!(
                "lab {}: LAN {}, VIP {}, replication {}{}",
                st.name,
                st.subnet,
                st.vip,
                st.repl_subnet,
                if st.switch_present {
                    ""
                } else {
                    " (switch missing: run `rrc lab up`)"
                }
            );
            println!(
                "{:<8} {:<6} {:<20} {:<16} {:<16} {:>5}  CONTAINERS",
                "HOST", "STATE", "NETNS", "LAN", "REPLICATION", "PROCS"
            );
            for h in st.hosts {
                let state = if h.down {
                    "down"
                } else if h.present {
                    "up"
                } else {
                    "broken"
                };
                let containers = if h.containers.is_empty() {
                    "-".to_string()
                } else {
                    h.containers
                        .iter()
                        .map(|(n, s)| format!("{n} ({s})"))
                        .collect::<Vec<_>>()
                        .join(", ")
                };
                println!(
                    "{:<8} {:<6} {:<20} {:<16} {:<16} {:>5}  {}",
                    h.name,
                    state,
                    h.netns,
                    h.lan_addr.to_string(),
                    h.repl_addr.map(|a| a.to_string()).unwrap_or("-".into()),
                    h.processes,
                    containers
                );
            }
            Ok(0)
        }
        LabCommand::List => {
            let labs = Lab::list()?;
            if labs.is_empty() {
                println!("no labs; create one with `rrc lab up`");
            }
            for l in labs {
                let p = l.plan();
                let down: Vec<&str> = l
                    .record()
                    .hosts
                    .iter()
                    .filter(|h| h.down)
                    .map(|h| h.name.as_str())
                    .collect();
                println!(
                    "{:<16} LAN {:<18} VIP {:<16} {}",
                    p.name,
                    p.subnet.to_string(),
                    p.vip().addr().to_string(),
                    if down.is_empty() {
                        "all hosts up".to_string()
                    } else {
                        format!("down: {}", down.join(", "))
                    }
                );
            }
            Ok(0)
        }
        LabCommand::Exec { sel, host, command } => {
            let lab = Lab::open(&sel.name()?)?;
            match lab.exec(host, &command)? {}
        }
        LabCommand::Kill { sel, host } => {
            let name = sel.name()?;
            let r = Lab::kill(&name, host)?;
            if r.already_down {
                println!("{host} of lab {name} was already down");
            } else {
                println!(
                    "{host} of lab {name} is down: {} process(es) killed, links down, in {:.1} ms",
                    r.killed,
                    r.took.as_secs_f64() * 1000.0
                );
            }
            Ok(0)
        }
        LabCommand::Revive { sel, host } => {
            let name = sel.name()?;
            Lab::revive(&name, host)?;
            println!("{host} of lab {name} is back up, empty");
            Ok(0)
        }
    }
}
