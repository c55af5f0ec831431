//! Running a container's supervisor in the foreground or in the background.

use std::time::Duration;

use anyhow::{Result, bail};
use rrc_container::create::{Container, Output};
use rrc_container::daemon::{self, Detached};
use rrc_container::{ContainerName, HostState};

/// Builds a container with `make` (given where output goes) and supervises
/// it until it ends. With `detach`, forks first: the foreground process
/// prints the outcome and returns 0 once the container runs; the
/// background one supervises.
pub fn supervise_container(
    name: &ContainerName,
    host: &HostState,
    detach: bool,
    stop_timeout: Duration,
    what: &str,
    make: impl FnOnce(Output) -> rrc_container::Result<Container>,
) -> Result<i32> {
    let mut notifier = None;
    let output = if detach {
        match daemon::detach()? {
            Detached::Foreground(w) => {
                return match w.wait() {
                    Ok(msg) => {
                        println!("{msg}");
                        Ok(0)
                    }
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
    let container = match make(output) {
        Ok(c) => c,
        Err(e) => {
            if let Some(n) = &mut notifier {
                n.failed(&e.to_string());
            }
            return Err(e.into());
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
    let report = container.supervise(stop_timeout)?;
    Ok(report.code)
}
