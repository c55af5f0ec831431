//! `rrc run`: start a program as a container.

use std::ffi::OsString;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use clap::Args;
use nix::net::if_::if_nametoindex;
use rrc_container::create::{Container, CreateOptions};
use rrc_container::spec::{NetRequest, resolve_command};
use rrc_container::state::Status;
use rrc_container::{ContainerName, ContainerSpec, Error, HostState, probe};
use rrc_net::MacAddr;
use rrc_net::gate::PacketGate;

use super::detach::{MakeCompanion, Supervised};

/// Run a program in a new container.
///
/// The program gets its own pid, mount, uts, ipc and network namespaces and
/// its own cgroup. With --addr, its network interface `eth0` is a TAP device
/// held by this rrc process, which forwards its frames to and from the host
/// interface --uplink (by default the one whose subnet holds the address).
/// rrc stays in the foreground supervising the container (or in the
/// background with --detach) and removes every trace of it when the program
/// ends or the container is stopped (Ctrl-C, SIGTERM, `rrc stop NAME`).
///
/// Example: rrc run --name redis --addr 10.0.0.100/24 -- redis-server --protected-mode no
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Record the program's nondeterministic events (input, time,
    /// randomness, threads) into this log directory, through librrc
    /// preloaded into it (see `rrc log --help`).
    #[arg(long, value_name = "DIR")]
    record: Option<std::path::PathBuf>,
    #[command(flatten)]
    container: ContainerArgs,
}

/// What makes a container: shared by `rrc run` and `rrc primary`.
#[derive(Debug, Args)]
pub struct ContainerArgs {
    /// Container name, unique on this host; also its hostname.
    #[arg(long)]
    name: String,
    /// The container's IPv4 address, ADDR/PREFIX (prefix defaults to the uplink's).
    #[arg(long, value_name = "ADDR/PREFIX")]
    addr: Option<String>,
    /// The container's MAC address (default: derived from its name).
    #[arg(long, requires = "addr")]
    mac: Option<MacAddr>,
    /// Host interface to forward the container's frames through.
    #[arg(long, value_name = "IF", requires = "addr")]
    uplink: Option<String>,
    /// Default gateway for the container.
    #[arg(long, value_name = "ADDR", requires = "addr")]
    gateway: Option<std::net::Ipv4Addr>,
    /// Return once the container runs; rrc keeps supervising it in the
    /// background and the program's output goes to a log file.
    #[arg(short, long)]
    detach: bool,
    /// How long a stop waits for the program to exit after SIGTERM before
    /// killing everything in the container.
    #[arg(long, default_value = "10s", value_parser = super::parse_duration)]
    stop_timeout: Duration,
    /// How long the forwarder keeps polling for more frames after each frame
    /// instead of sleeping (0: always sleep). Trades CPU while traffic flows
    /// for latency: waking a sleeping thread is slow, on VMs especially.
    #[arg(long, default_value = "200us", value_parser = super::parse_duration)]
    spin: Duration,
    /// The program and its arguments.
    #[arg(last = true, required = true, value_name = "CMD")]
    command: Vec<OsString>,
}

impl ContainerArgs {
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn addr(&self) -> Option<&str> {
        self.addr.as_deref()
    }
}

pub fn run(a: RunArgs) -> Result<i32> {
    match &a.record {
        Some(dir) => {
            let program =
                resolve_command(&a.container.command[0], std::env::var_os("PATH").as_deref())?;
            let rec = super::record::Recording::prepare(dir, &program)?;
            let env = rec.environment();
            start(&a.container, None, Some(rec.companion()), env)
        }
        None => start(&a.container, None, None, Vec::new()),
    }
    .map(Supervised::exit_code)
}

/// Creates the container `a` describes, with `gate` between it and the LAN
/// and `companion` beside it, and supervises it (in the background with
/// --detach).
pub(super) fn start(
    a: &ContainerArgs,
    gate: Option<Arc<dyn PacketGate>>,
    companion: Option<MakeCompanion<'_>>,
    env: Vec<(OsString, OsString)>,
) -> Result<Supervised> {
    let name: ContainerName = a.name.parse()?;
    let layout = probe::require_container_support(a.addr.is_some())?;
    let program = resolve_command(&a.command[0], std::env::var_os("PATH").as_deref())?;
    let net = match &a.addr {
        Some(addr) => {
            let req = NetRequest {
                addr: addr.clone(),
                mac: a.mac,
                uplink: a.uplink.clone(),
                gateway: a.gateway,
            };
            let host_addrs = rrc_net::netconf::ipv4_addresses()?;
            Some(req.resolve(&name, &host_addrs, |i| if_nametoindex(i).is_ok())?)
        }
        None => None,
    };
    let host = HostState::current();
    // Checked again, atomically, when the name is claimed; checking here
    // too gives a detached run its error before it forks.
    if let Some((rec, st)) = host.load(&name)?
        && st != Status::Stale
    {
        return Err(Error::NameInUse {
            name: name.to_string(),
            pid: rec.supervisor.pid,
        }
        .into());
    }
    let spec = ContainerSpec {
        name: name.clone(),
        argv: a.command.clone(),
        program,
        net,
        env,
    };

    let opts_spin = a.spin;
    super::detach::supervise_container(
        &name,
        &host.clone(),
        a.detach,
        a.stop_timeout,
        "running",
        |output| {
            Container::create(
                &spec,
                &layout,
                host,
                CreateOptions {
                    output,
                    gate,
                    spin: opts_spin,
                },
            )
        },
        companion,
    )
}
