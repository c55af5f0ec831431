//! `rrc run`: start a program as a container.

use std::ffi::OsString;
use std::time::Duration;

use anyhow::Result;
use clap::Args;
use rrc_container::launch::{Launch, Source};
use rrc_container::spec::{NetRequest, resolve_command};
use rrc_container::{ContainerName, ContainerSpec};
use rrc_net::MacAddr;
use rrc_session::recording::Recording;

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
    /// What the container sees as `/`: private (a read-only view of the
    /// host's files, with /tmp, /run, /var and /dev/shm of the container's
    /// own, kept on the host in /var/lib/rrc/roots/NAME while an image of
    /// the container may need them, and removed with it otherwise) or host
    /// (the host's file system, as rrc sees it, writable).
    #[arg(long, default_value = "private", value_name = "private|host")]
    root: rrc_container::rootfs::RootFs,
    /// A host directory the container reaches at the same path, writable
    /// (its data, a configuration, a program kept in /tmp). Repeat for
    /// more. Only with a private root: the host's root shows everything.
    #[arg(long, value_name = "DIR")]
    share: Vec<std::path::PathBuf>,
    /// The program never has a Linux AIO request in flight when it is
    /// checkpointed (a poll waiting, a direct I/O unfinished): its AIO
    /// contexts are saved with every checkpoint, and so with its restores
    /// and takeovers. Requests in flight cannot be seen from user space;
    /// without this a program using AIO cannot be checkpointed.
    #[arg(long)]
    aio_idle: bool,
    /// Let the program make user namespaces (`unshare -r`, a bubblewrap
    /// sandbox) and, inside them, the namespaces and mounts it owns there:
    /// the seccomp profile refuses those calls otherwise, as mainstream
    /// runtimes' do. Outside its user namespaces the program gains
    /// nothing: its capabilities stay the default ones.
    #[arg(long)]
    user_namespaces: bool,
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

    /// The container's address without its prefix (an error without one).
    pub fn service_ip(&self) -> Result<std::net::Ipv4Addr> {
        let addr = self.addr.as_deref().unwrap_or_default();
        let ip = addr.split('/').next().unwrap_or_default();
        ip.parse().map_err(|_| {
            anyhow::anyhow!(
                "`{addr}` is not an IPv4 address (expected ADDR/PREFIX such as 10.0.0.100/24)"
            )
        })
    }

    /// The program file the command names.
    pub fn program(&self) -> Result<std::path::PathBuf> {
        Ok(resolve_command(
            &self.command[0],
            std::env::var_os("PATH").as_deref(),
        )?)
    }

    /// The launch of the container these arguments describe, with `env`
    /// added to the program's environment.
    pub(super) fn launch(&self, env: Vec<(OsString, OsString)>) -> Result<Launch<'static>> {
        let name: ContainerName = self.name.parse()?;
        let program = self.program()?;
        let net = match &self.addr {
            Some(addr) => Some(
                NetRequest {
                    addr: addr.clone(),
                    mac: self.mac,
                    uplink: self.uplink.clone(),
                    gateway: self.gateway,
                }
                .resolve_here(&name)?,
            ),
            None => None,
        };
        anyhow::ensure!(
            self.share.is_empty() || self.root == rrc_container::rootfs::RootFs::Private,
            "--share is for a private root: with --root host the container sees every host directory already"
        );
        let spec = ContainerSpec {
            name,
            argv: self.command.clone(),
            program,
            net,
            env,
            root: self.root.clone(),
            share: self
                .share
                .iter()
                .map(|d| {
                    let c = anyhow::Context::with_context(d.canonicalize(), || {
                        format!("--share {}: no such directory", d.display())
                    })?;
                    anyhow::ensure!(c.is_dir(), "--share {}: not a directory", d.display());
                    Ok(c)
                })
                .collect::<Result<_>>()?,
            aio_idle: self.aio_idle,
            user_namespaces: self.user_namespaces,
        };
        Ok(Launch::new(Source::Program(spec))
            .detach(self.detach)
            .stop_timeout(self.stop_timeout)
            .spin(self.spin))
    }
}

pub fn run(a: RunArgs) -> Result<i32> {
    let launch = match &a.record {
        Some(dir) => {
            let rec = Recording::prepare(dir, &a.container.program()?)?;
            let launch = a.container.launch(rec.environment())?;
            rec.launch(launch)
        }
        None => a.container.launch(Vec::new())?,
    };
    Ok(super::exit_code(launch.run()?))
}
