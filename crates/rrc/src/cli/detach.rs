//! Running a container's supervisor in the foreground or in the background.

use std::time::Duration;

use anyhow::{Result, bail};
use rrc_container::create::{Container, Output};
use rrc_container::daemon::{self, Detached};
use rrc_container::supervise::Companion;
use rrc_container::{ContainerName, HostState};

/// How supervising a container ended for this process.
pub enum Supervised {
    /// The container runs on in the background; what it said when ready.
    Detached(String),
    /// The container ended; rrc's exit code.
    Exited(i32),
}

impl Supervised {
    /// The exit code of a command that just started or ran a container.
    pub fn exit_code(self) -> i32 {
        match self {
            Supervised::Detached(msg) => {
                println!("{msg}");
                0
            }
            Supervised::Exited(code) => code,
        }
    }
}

/// Work that runs beside a container in its supervisor, made once the
/// container exists.
pub type MakeCompanion<'a> = Box<dyn FnOnce(&Container) -> Result<Box<dyn Companion>> + 'a>;

/// Builds a container with `make` (given where output goes) and supervises
/// it until it ends, with `companion` beside it. With `detach`, forks
/// first: the foreground process returns the outcome once the container
/// runs; the background one supervises.
pub fn supervise_container(
    name: &ContainerName,
    host: &HostState,
    detach: bool,
    stop_timeout: Duration,
    what: &str,
    make: impl FnOnce(Output) -> rrc_container::Result<Container>,
    companion: Option<MakeCompanion<'_>>,
) -> Result<Supervised> {
    let mut notifier = None;
    let output = if detach {
        match daemon::detach()? {
            Detached::Foreground(w) => {
                return match w.wait() {
                    Ok(msg) => Ok(Supervised::Detached(msg)),
                    Err(msg) => bail!("{msg}"),
                };
            }
            Detached::Background(n) => {
                notifier = Some(n);
                Output::File(host.log_path(name))
            }
        }
    } else {
        Output::Inherit
    };
    let log = match &output {
        Output::File(p) => Some(p.clone()),
        Output::Inherit => None,
    };
    let made = make(output).map_err(anyhow::Error::from).and_then(|c| {
        let Some(f) = companion else {
            return Ok((c, None));
        };
        match f(&c) {
            Ok(comp) => Ok((c, Some(comp))),
            Err(e) => {
                if let Err(d) = c.discard() {
                    tracing::warn!(error = %d, "removing the container");
                }
                Err(e)
            }
        }
    });
    let (container, mut companion) = match made {
        Ok(c) => c,
        Err(e) => {
            if let Some(n) = &mut notifier {
                n.failed(&format!("{e:#}"));
            }
            return Err(e);
        }
    };
    if let Some(n) = &mut notifier {
        let mut msg = format!("container {name} {what}");
        if let Some(r) = container.restore_report() {
            msg += &format!(
                " in {:.1} ms (sockets {:.1} ms)",
                r.took.as_secs_f64() * 1e3,
                r.sockets.as_secs_f64() * 1e3
            );
        }
        msg += &format!(": pid {}", container.init_pid().as_raw());
        if let Some(net) = &container.record().net {
            msg += &format!(", {} via {}", net.addr, net.uplink);
        }
        if let Some(log) = log {
            msg += &format!(", output in {}", log.display());
        }
        n.ready(&msg);
    }
    let report = match companion.as_mut() {
        Some(c) => container.supervise_with(stop_timeout, Some(c.as_mut())),
        None => container.supervise(stop_timeout),
    }?;
    Ok(Supervised::Exited(report.code))
}
