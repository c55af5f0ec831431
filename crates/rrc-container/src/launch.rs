//! Launching a container, the one way every command starts one: from a
//! program (`rrc run`, `rrc primary`) or from a checkpoint image (`rrc
//! restore`, `rrc replay`, a backup's takeover), with a gate between it
//! and the LAN and any number of companions beside it, in the foreground
//! or detached.
//!
//! ```no_run
//! # use rrc_container::launch::{Launch, Source};
//! # fn f(spec: rrc_container::ContainerSpec) -> rrc_container::Result<()> {
//! let outcome = Launch::new(Source::Program(spec))
//!     .detach(true)
//!     .run()?;
//! # Ok(()) }
//! ```

use std::sync::Arc;
use std::time::Duration;

use rrc_ckpt::dump::{Annotations, ShmemLimit};
use rrc_net::gate::PacketGate;

use crate::create::{Container, CreateOptions, Output};
use crate::daemon::{self, Detached};
use crate::restore::RestoreSpec;
use crate::spec::{ContainerName, ContainerSpec};
use crate::state::{HostState, Status};
use crate::supervise::{Companion, ExitReport};
use crate::{Error, Result, probe};

/// What a container is started from.
pub enum Source {
    /// A program, started fresh.
    Program(ContainerSpec),
    /// A checkpoint image, restored.
    Image(RestoreSpec),
}

impl Source {
    pub fn name(&self) -> &ContainerName {
        match self {
            Source::Program(s) => &s.name,
            Source::Image(s) => &s.name,
        }
    }

    fn has_network(&self) -> bool {
        match self {
            Source::Program(s) => s.net.is_some(),
            Source::Image(s) => s.net.is_some(),
        }
    }

    fn verb(&self) -> &'static str {
        match self {
            Source::Program(_) => "running",
            Source::Image(_) => "restored",
        }
    }
}

/// Why a companion could not be made.
pub type CompanionError = Box<dyn std::error::Error + Send + Sync>;

/// Makes a companion once the container exists (it may need the
/// container's network or pid).
pub type MakeCompanion<'a> =
    Box<dyn FnOnce(&Container) -> std::result::Result<Box<dyn Companion>, CompanionError> + 'a>;

/// How a launch ended for the calling process.
#[derive(Debug)]
pub enum Launched {
    /// The container runs on, supervised by a background process; what
    /// that process said once the container ran.
    Detached(String),
    /// The container ran in the foreground and ended.
    Ended(ExitReport),
}

/// A container about to be started: what from, and what goes with it.
pub struct Launch<'a> {
    source: Source,
    host: HostState,
    gate: Option<Arc<dyn PacketGate>>,
    spin: Duration,
    companions: Vec<MakeCompanion<'a>>,
    detach: bool,
    stop_timeout: Duration,
    shmem_limits: Vec<ShmemLimit>,
    annotations: Annotations,
    hold_network: bool,
}

impl<'a> Launch<'a> {
    /// A launch on this host, in the foreground, with no gate (frames pass
    /// through) and no companion.
    pub fn new(source: Source) -> Launch<'a> {
        Launch {
            source,
            host: HostState::current(),
            gate: None,
            spin: rrc_net::forward::DEFAULT_SPIN,
            companions: Vec::new(),
            detach: false,
            stop_timeout: Duration::from_secs(10),
            shmem_limits: Vec::new(),
            annotations: Annotations::new(),
            hold_network: false,
        }
    }

    /// Holds the container's frames back (queued in the kernel) from the
    /// start, until a companion lets them through
    /// ([`Container::pause_network`]).
    pub fn hold_network(mut self, hold: bool) -> Self {
        self.hold_network = hold;
        self
    }

    /// Every checkpoint of the container saves only the beginning of this
    /// shared memory object (memory rrc shares with the program, of which
    /// only a header matters to a restore).
    pub fn shmem_limit(mut self, limit: ShmemLimit) -> Self {
        self.shmem_limits.push(limit);
        self
    }

    /// Every checkpoint of the container records `value` under `key`, for
    /// whoever restores it.
    pub fn annotation(mut self, key: &str, value: serde_json::Value) -> Self {
        self.annotations.insert(key.to_string(), value);
        self
    }

    /// The policy every frame between the container and the LAN goes
    /// through.
    pub fn gate(mut self, gate: Arc<dyn PacketGate>) -> Self {
        self.gate = Some(gate);
        self
    }

    /// How long the forwarder polls after a frame before it sleeps.
    pub fn spin(mut self, spin: Duration) -> Self {
        self.spin = spin;
        self
    }

    /// Work to run beside the container in its supervisor, made once the
    /// container exists; if making it fails, the container is removed and
    /// the launch fails.
    pub fn companion(mut self, make: MakeCompanion<'a>) -> Self {
        self.companions.push(make);
        self
    }

    /// Return once the container runs, leaving a background process to
    /// supervise it (its output and the program's in the host's log
    /// directory). The fork this takes must happen while the calling
    /// process has a single thread.
    pub fn detach(mut self, detach: bool) -> Self {
        self.detach = detach;
        self
    }

    /// How long a stop waits for the program after SIGTERM before killing
    /// everything in the container.
    pub fn stop_timeout(mut self, t: Duration) -> Self {
        self.stop_timeout = t;
        self
    }

    /// Checks what can be checked, builds the container, makes its
    /// companions and supervises it until it ends (in the foreground) or
    /// until it runs (detached).
    ///
    /// A detached launch returns only in the caller's process. The
    /// background process that supervises the container is a copy of the
    /// caller; it exits with the program's status when the container ends
    /// (1 if it could not be built), so that nothing of the caller's code
    /// after this call (a takeover that would restore again, a working
    /// copy that would be removed twice) runs in it.
    pub fn run(self) -> Result<Launched> {
        let name = self.source.name().clone();
        let layout = probe::require_container_support(self.source.has_network())?;
        // Checked again, atomically, when the name is claimed; checking
        // here too gives a detached launch its error before it forks.
        if let Some((rec, st)) = self.host.load(&name)?
            && st != Status::Stale
        {
            return Err(Error::NameInUse {
                name: name.to_string(),
                pid: rec.supervisor.pid,
            });
        }
        if !self.detach {
            return self.build_and_supervise(layout, Output::Inherit, None);
        }
        match daemon::detach()? {
            Detached::Foreground(w) => w.wait().map(Launched::Detached).map_err(Error::Background),
            Detached::Background(n) => {
                let output = Output::File(self.host.log_path(&name));
                let code = match self.build_and_supervise(layout, output, Some(n)) {
                    Ok(Launched::Ended(r)) => r.code,
                    Ok(Launched::Detached(_)) => 0,
                    Err(e) => {
                        tracing::error!(error = %e, "the container could not be supervised");
                        1
                    }
                };
                std::process::exit(code)
            }
        }
    }

    /// Builds the container and supervises it until it ends; `notifier`
    /// (detached) hears that it runs or why it could not.
    fn build_and_supervise(
        self,
        layout: rrc_cgroup::Layout,
        output: Output,
        mut notifier: Option<daemon::Notifier>,
    ) -> Result<Launched> {
        let name = self.source.name().clone();
        let log = match &output {
            Output::File(p) => Some(p.clone()),
            Output::Inherit => None,
        };
        let verb = self.source.verb();
        let opts = CreateOptions {
            output,
            gate: self.gate,
            spin: self.spin,
            shmem_limits: self.shmem_limits,
            annotations: self.annotations,
            hold_network: self.hold_network,
        };
        let made = match &self.source {
            Source::Program(spec) => Container::create(spec, &layout, self.host, opts),
            Source::Image(spec) => Container::restore(spec, &layout, self.host, opts),
        }
        .and_then(|c| make_companions(c, self.companions));
        let (container, companions) = match made {
            Ok(x) => x,
            Err(e) => {
                if let Some(n) = &mut notifier {
                    n.failed(&e.to_string());
                }
                return Err(e);
            }
        };
        if let Some(n) = &mut notifier {
            n.ready(&ready_message(&container, &name, verb, log.as_deref()));
        }
        container
            .supervise(self.stop_timeout, companions)
            .map(Launched::Ended)
    }
}

/// Makes every companion; on the first failure the container goes.
fn make_companions(
    c: Container,
    makers: Vec<MakeCompanion<'_>>,
) -> Result<(Container, Vec<Box<dyn Companion>>)> {
    let mut made = Vec::with_capacity(makers.len());
    for make in makers {
        match make(&c) {
            Ok(comp) => made.push(comp),
            Err(e) => {
                // Those made already end with the container.
                let mut c = c;
                for mut m in made {
                    m.on_stop(&mut c);
                }
                if let Err(d) = c.discard() {
                    tracing::warn!(error = %d, "removing the container");
                }
                return Err(Error::Companion(e));
            }
        }
    }
    Ok((c, made))
}

/// What a detached launch tells its caller once the container runs.
fn ready_message(
    c: &Container,
    name: &ContainerName,
    verb: &str,
    log: Option<&std::path::Path>,
) -> String {
    let mut msg = format!("container {name} {verb}");
    if let Some(r) = c.restore_report() {
        msg += &format!(
            " in {:.1} ms (sockets {:.1} ms)",
            r.took.as_secs_f64() * 1e3,
            r.sockets.as_secs_f64() * 1e3
        );
    }
    msg += &format!(": pid {}", c.init_pid().as_raw());
    if let Some(net) = &c.record().net {
        msg += &format!(", {} via {}", net.addr, net.uplink);
    }
    if let Some(log) = log {
        msg += &format!(", output in {}", log.display());
    }
    msg
}
