//! `rrc lab`: the local test network.

use std::ffi::OsString;

use anyhow::{Result, bail};
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
/// backup also have a direct replication link. Hosts `arb1`, `arb2` and
/// `arb3` are on the LAN too, for the arbiter (an etcd cluster, started
/// with `rrc lab up --arbiter`). Several labs with different names can run
/// side by side.
#[derive(Debug, Subcommand)]
pub enum LabCommand {
    /// Create the lab (or complete a partial one); fine to run twice.
    Up {
        #[command(flatten)]
        sel: LabSel,
        /// LAN subnet, e.g. 10.77.0.0/24 (default: derived from the name).
        #[arg(long)]
        subnet: Option<Ipv4Net>,
        /// Also run the arbiter: an etcd member on each of arb1, arb2 and
        /// arb3 (a quorum survives one of them killed). Pass its endpoints
        /// to `rrc primary` and `rrc backup` as --arbiter.
        #[arg(long)]
        arbiter: bool,
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
        /// client, primary, backup, arb1, arb2 or arb3.
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
    /// Cut a host off from others: every packet between their addresses is
    /// dropped, both ways, silently (a partition; containers' own frames
    /// still reach the LAN). `arbiter` names arb1, arb2 and arb3 together.
    ///
    /// Example: rrc lab cut primary backup; rrc lab cut primary arbiter
    Cut {
        #[command(flatten)]
        sel: LabSel,
        /// The host cut off: client, primary, backup, arb1, arb2 or arb3.
        host: Host,
        /// The hosts it is cut from (`arbiter`: the three arbiter hosts).
        #[arg(required = true, value_name = "OTHER", value_parser = parse_hosts)]
        others: Vec<Vec<Host>>,
    },
    /// Mend cuts: between a host and others, or every cut of the lab.
    Heal {
        #[command(flatten)]
        sel: LabSel,
        /// The host whose cuts to mend (none: every cut of the lab).
        host: Option<Host>,
        /// The hosts to mend its cuts from (`arbiter`: the three arbiter
        /// hosts).
        #[arg(value_name = "OTHER", value_parser = parse_hosts)]
        others: Vec<Vec<Host>>,
    },
}

/// A host, or `arbiter` for the three arbiter hosts.
fn parse_hosts(s: &str) -> Result<Vec<Host>, String> {
    if s == "arbiter" {
        return Ok(Host::ARBITERS.to_vec());
    }
    s.parse::<Host>()
        .map(|h| vec![h])
        .map_err(|e| format!("{e}, or arbiter"))
}

fn print_cuts(name: &LabName, cuts: &[(String, String)]) {
    if cuts.is_empty() {
        println!("lab {name}: no cuts");
    } else {
        let list: Vec<String> = cuts.iter().map(|(a, b)| format!("{a}-{b}")).collect();
        println!("lab {name}: cut {}", list.join(", "));
    }
}

pub fn lab(c: LabCommand) -> Result<i32> {
    match c {
        LabCommand::Up {
            sel,
            subnet,
            arbiter,
        } => {
            let (lab, created) = Lab::up(sel.name()?, subnet, arbiter)?;
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
            if let Some(a) = lab.arbiter_endpoints() {
                println!("arbiter (etcd on arb1, arb2, arb3): --arbiter {a}");
            }
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
            if let Some(a) = &st.arbiter {
                println!("arbiter: --arbiter {a}");
            }
            if !st.cuts.is_empty() {
                print_cuts(&sel.name()?, &st.cuts);
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
        LabCommand::Cut { sel, host, others } => {
            let name = sel.name()?;
            let cuts = Lab::cut(&name, host, &others.concat(), false)?;
            print_cuts(&name, &cuts);
            Ok(0)
        }
        LabCommand::Heal { sel, host, others } => {
            let name = sel.name()?;
            let cuts = match host {
                None => {
                    Lab::heal_all(&name)?;
                    Vec::new()
                }
                Some(h) if others.is_empty() => {
                    bail!("name the hosts to heal {h} from, or no host to heal every cut")
                }
                Some(h) => Lab::cut(&name, h, &others.concat(), true)?,
            };
            print_cuts(&name, &cuts);
            Ok(0)
        }
    }
}
