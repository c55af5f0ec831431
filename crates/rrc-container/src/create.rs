//! Building a container: claim the name, create the cgroup, fork the first
//! process into new namespaces, give it a TAP device and a configured
//! network, then let it exec the program. Any failure undoes every step
//! taken so far.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use nix::mount::{MsFlags, mount};
use nix::sched::CloneFlags;
use nix::sys::signal::{SigHandler, SigSet, SigmaskHow, Signal, kill, signal, sigprocmask};
use nix::sys::wait::waitpid;
use nix::unistd::{
    Pid, dup2_stderr, dup2_stdin, dup2_stdout, pipe2, read, sethostname, setsid, write,
};
use rrc_cgroup::{Cgroup, Layout};
use rrc_ckpt::dump::{Annotations, ShmemLimit};
use rrc_net::forward::Forwarder;
use rrc_net::gate::{PacketGate, PassThrough};
use rrc_net::packet::PacketSocket;
use rrc_net::tap::Tap;
use rrc_net::{NetNs, arp, netconf};

use crate::proc::ProcRef;
use crate::spec::ContainerSpec;
use crate::state::{CgroupRecord, Claim, ContainerRecord, HostState, Phase};
use crate::{Error, Result, nix_setup_err, setup_err, sys};

/// Where the program's output goes.
#[derive(Debug, Clone, Default)]
pub enum Output {
    /// The program shares rrc's terminal.
    #[default]
    Inherit,
    /// rrc and the program write to this file (detached mode); the
    /// program's stdin is /dev/null.
    File(PathBuf),
}

pub struct CreateOptions {
    pub output: Output,
    /// The gate between the container and the LAN; [`PassThrough`] if none.
    pub gate: Option<Arc<dyn PacketGate>>,
    /// How long the forwarder keeps polling after a frame before it sleeps
    /// (see [`rrc_net::forward`]).
    pub spin: Duration,
    /// What every checkpoint of the container leaves out of which shared
    /// memory objects (see [`ShmemLimit`]).
    pub shmem_limits: Vec<ShmemLimit>,
    /// What every checkpoint of the container records beside the
    /// container itself (for whoever restores it).
    pub annotations: Annotations,
    /// Frames are held back (queued in the kernel) from the start until
    /// [`Container::pause_network`] lets them through.
    pub hold_network: bool,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            output: Output::Inherit,
            gate: None,
            spin: rrc_net::forward::DEFAULT_SPIN,
            shmem_limits: Vec::new(),
            annotations: Annotations::new(),
            hold_network: false,
        }
    }
}

/// The network half of a running container.
pub struct ContainerNet {
    pub tap: Arc<Tap>,
    pub uplink: Arc<PacketSocket>,
    pub gate: Arc<dyn PacketGate>,
    pub forwarder: Forwarder,
}

/// A running container and the rrc process's hold on it.
pub struct Container {
    pub(crate) host: HostState,
    pub(crate) claim: Option<Claim>,
    pub(crate) record: ContainerRecord,
    pub(crate) cgroup: Cgroup,
    pub(crate) init: Pid,
    pub(crate) net: Option<ContainerNet>,
    pub(crate) control: crate::control::ControlSocket,
    /// How the restore went, for a container that was restored.
    pub(crate) restored: Option<rrc_ckpt::restore::Restored>,
    pub(crate) shmem_limits: Vec<ShmemLimit>,
    pub(crate) extra_annotations: Annotations,
    /// Whether the container's private root goes with it: one made for it,
    /// of which no image was begun (an image needs it for its restore).
    pub(crate) remove_root: AtomicBool,
}

/// Signals the supervisor takes through a signalfd; blocked before any
/// thread starts so every thread inherits the mask.
pub(crate) fn supervisor_signals() -> SigSet {
    let mut set = SigSet::empty();
    for s in [
        Signal::SIGCHLD,
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGHUP,
        Signal::SIGQUIT,
    ] {
        set.add(s);
    }
    set
}

/// Steps already taken, undone in reverse on failure.
pub(crate) struct Partial {
    pub(crate) claim: Option<Claim>,
    pub(crate) cgroup: Option<Cgroup>,
    pub(crate) init: Option<Pid>,
    /// A private root made for the container, removed if it does not come
    /// to life.
    pub(crate) root: Option<crate::spec::ContainerName>,
}

impl Partial {
    pub(crate) fn rollback(mut self) {
        if let Some(pid) = self.init.take() {
            let _ = kill(pid, Signal::SIGKILL);
            let _ = waitpid(pid, None);
        }
        if let Some(cg) = self.cgroup.take()
            && let Err(e) = cg
                .kill_all(Duration::from_secs(5))
                .and_then(|()| cg.remove(Duration::from_secs(5)))
        {
            tracing::warn!(error = %e, "rollback: cgroup left behind");
        }
        if let Some(name) = self.root.take()
            && let Err(e) = crate::rootfs::RootFs::Private.remove(&name)
        {
            tracing::warn!(error = %e, "rollback: private root left behind");
        }
        if let Some(claim) = self.claim.take() {
            let _ = claim.release();
        }
    }
}

impl Container {
    /// Creates and starts a container. Returns once the program has been
    /// exec'd inside it and its network is forwarding.
    pub fn create(
        spec: &ContainerSpec,
        layout: &Layout,
        host: HostState,
        opts: CreateOptions,
    ) -> Result<Container> {
        let argv: Vec<String> = spec
            .argv
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let mut record = ContainerRecord::new(spec.name.clone(), argv);
        record.net = spec.net.clone();
        record.root = spec.root.clone();
        record.share = spec.share.clone();
        record.aio_idle = spec.aio_idle;
        let claim = host.claim(&record)?;
        let mut partial = Partial {
            claim: Some(claim),
            cgroup: None,
            init: None,
            root: None,
        };
        let shmem_limits = opts.shmem_limits.clone();
        let extra_annotations = opts.annotations.clone();
        match Self::build(spec, layout, &host, opts, &mut record, &mut partial) {
            Ok((cgroup, init, net, control)) => Ok(Container {
                host,
                claim: partial.claim.take(),
                remove_root: AtomicBool::new(partial.root.take().is_some()),
                record,
                cgroup,
                init,
                net,
                control,
                restored: None,
                shmem_limits,
                extra_annotations,
            }),
            Err(e) => {
                partial.rollback();
                Err(e)
            }
        }
    }

    fn build(
        spec: &ContainerSpec,
        layout: &Layout,
        host: &HostState,
        opts: CreateOptions,
        record: &mut ContainerRecord,
        partial: &mut Partial,
    ) -> Result<(
        Cgroup,
        Pid,
        Option<ContainerNet>,
        crate::control::ControlSocket,
    )> {
        let save = |partial: &Partial, record: &ContainerRecord| {
            partial.claim.as_ref().expect("claimed").save(record)
        };
        if let Output::File(path) = &opts.output {
            redirect_output(path, false)?;
            record.log = Some(path.clone());
        }

        let cgroup = layout.create_below_self(&PathBuf::from(format!("rrc.{}", spec.name)))?;
        partial.cgroup = Some(cgroup.clone());
        record.cgroup = Some(CgroupRecord::from_cgroup(&cgroup));
        save(partial, record)?;
        cgroup.limit_devices(crate::confine::DEVICES)?;

        // Everything the child needs is prepared before the fork, so that
        // the child only makes system calls.
        let hostname = spec.name.as_str().as_bytes().to_vec();
        let program = CString::new(spec.program.as_os_str().as_bytes())
            .map_err(|_| Error::InvalidSpec("program path contains a NUL byte".into()))?;
        let argv: Vec<CString> = spec
            .argv
            .iter()
            .map(|a| CString::new(a.as_bytes()))
            .collect::<std::result::Result<_, _>>()
            .map_err(|_| Error::InvalidSpec("an argument contains a NUL byte".into()))?;
        let envp = environment(&spec.env)?;
        let keep: Vec<(&std::path::Path, &std::path::Path)> = match &opts.output {
            Output::File(p) => vec![(p.as_path(), p.as_path())],
            _ => Vec::new(),
        };
        let share: Vec<&std::path::Path> = spec.share.iter().map(PathBuf::as_path).collect();
        if spec.root.hides(&spec.program, &spec.share) {
            return Err(Error::InvalidSpec(format!(
                "the program {} is in a directory a private root hides (/tmp, /run, /var): \
                 share its directory (--share DIR) or run it with --root host",
                spec.program.display()
            )));
        }
        let root = spec.root.plan(&spec.name, &keep, &share)?;
        if root.as_ref().is_some_and(|r| r.fresh()) {
            partial.root = Some(spec.name.clone());
        }
        let filters = crate::confine::seccomp_filters(spec.user_namespaces).map_err(|e| {
            Error::InvalidSpec(format!("the seccomp profile cannot be built here: {e}"))
        })?;
        let (go_rd, go_wr) = pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(nix_setup_err("pipe"))?;
        let (rep_rd, rep_wr) =
            pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(nix_setup_err("pipe"))?;

        let flags = CloneFlags::CLONE_NEWPID
            | CloneFlags::CLONE_NEWNS
            | CloneFlags::CLONE_NEWUTS
            | CloneFlags::CLONE_NEWIPC
            | CloneFlags::CLONE_NEWNET;
        // SAFETY: `rrc run` forks its container before starting any thread
        // (the forwarder starts below); the child only makes system calls
        // and then execs or exits (see `child_main`).
        let forked = unsafe { sys::fork_into_namespaces(flags.bits()) };
        let init = match forked {
            Ok(Some(pid)) => pid,
            Ok(None) => {
                drop(go_wr);
                drop(rep_rd);
                let child = ChildPlan {
                    hostname: &hostname,
                    program: &program,
                    argv: &argv,
                    envp: &envp,
                    filters: &filters,
                    root: root.as_ref(),
                };
                child_main(&child, go_rd, rep_wr)
            }
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                // Some namespace kind is missing; name it.
                crate::probe::require_namespaces()?;
                return Err(setup_err("clone")(e));
            }
            Err(e) => return Err(setup_err("clone")(e)),
        };
        drop(go_rd);
        drop(rep_wr);
        partial.init = Some(init);
        // From here on the supervisor takes signals through a signalfd.
        sigprocmask(SigmaskHow::SIG_BLOCK, Some(&supervisor_signals()), None)
            .map_err(nix_setup_err("signal mask"))?;

        cgroup.add_process(init)?;
        record.init = ProcRef::of(init.as_raw());

        let (netns, net) = attach_network(init, spec.net.as_ref())?;
        record.netns = netns;
        save(partial, record)?;

        // Let the child exec, and learn whether it could.
        write(&go_wr, b"g").map_err(nix_setup_err("release the container"))?;
        drop(go_wr);
        if let Some(err) = read_child_report(rep_rd) {
            return Err(err.into_error(spec));
        }

        let net = start_forwarding(
            net,
            spec.net.as_ref(),
            opts.gate,
            opts.spin,
            opts.hold_network,
        )?;
        let control = crate::control::ControlSocket::bind(host, &record.name)?;
        record.phase = Phase::Running;
        save(partial, record)?;
        tracing::info!(
            container = %spec.name,
            pid = init.as_raw(),
            host = host.host(),
            "container running"
        );
        partial.init = None;
        partial.cgroup = None;
        Ok((cgroup, init, net, control))
    }

    pub fn host(&self) -> &HostState {
        &self.host
    }

    pub fn record(&self) -> &ContainerRecord {
        &self.record
    }

    pub fn init_pid(&self) -> Pid {
        self.init
    }

    pub fn cgroup(&self) -> &Cgroup {
        &self.cgroup
    }

    pub fn net(&self) -> Option<&ContainerNet> {
        self.net.as_ref()
    }

    /// The engine's report, for a container that was restored.
    pub fn restore_report(&self) -> Option<&rrc_ckpt::restore::Restored> {
        self.restored.as_ref()
    }

    /// Returns once the memory of a container restored with lazy pages is
    /// all in (at once otherwise). A checkpoint waits for this: until then
    /// the program's pages are registered with the copier's userfaultfd,
    /// which the checkpoint's own tracking cannot share.
    pub fn memory_in(&self) -> rrc_ckpt::Result<()> {
        let Some(r) = self.restored.as_ref().filter(|r| !r.pages.is_empty()) else {
            return Ok(());
        };
        let done = r.pages.wait().map_err(|detail| rrc_ckpt::Error::Restore {
            pid: self.init.as_raw(),
            stage: "lazy pages",
            detail,
        })?;
        tracing::info!(
            container = %self.record.name,
            mib = done.bytes as f64 / (1 << 20) as f64,
            ms = done.took.as_secs_f64() * 1e3,
            faults = done.faults,
            "every page of the restored container is in"
        );
        Ok(())
    }
}

/// The TAP and uplink of a container whose network is set up but not yet
/// forwarding.
pub(crate) type PendingNet = Option<(Arc<Tap>, Arc<PacketSocket>)>;

/// A network namespace's identity and its pending network.
pub(crate) type AttachedNet = (Option<(u64, u64)>, PendingNet);

/// Gives the network namespace of `init` its loopback and, with `net`, its
/// TAP device and address; opens the uplink. Returns the namespace's
/// identity too.
pub(crate) fn attach_network(init: Pid, net: Option<&crate::spec::NetSpec>) -> Result<AttachedNet> {
    let ns = NetNs::of_pid(init.as_raw())?;
    let id = ns.id().ok();
    let net_spec = net.cloned();
    let tap = ns.run(move || -> Result<Option<Tap>> {
        netconf::loopback_up()?;
        let Some(net) = net_spec else {
            return Ok(None);
        };
        let tap = Tap::create("eth0")?;
        netconf::configure_interface(tap.name(), net.mac, net.addr)?;
        if let Some(gw) = net.gateway {
            netconf::add_default_route(gw)?;
        }
        Ok(Some(tap))
    })??;
    let pending = match (tap, net) {
        (Some(tap), Some(n)) => {
            let uplink = PacketSocket::open(&n.uplink, n.mac)?;
            Some((Arc::new(tap), Arc::new(uplink)))
        }
        _ => None,
    };
    Ok((id, pending))
}

/// Announces the container's address on the LAN and starts moving frames.
pub(crate) fn start_forwarding(
    pending: PendingNet,
    net: Option<&crate::spec::NetSpec>,
    gate: Option<Arc<dyn PacketGate>>,
    spin: Duration,
    hold: bool,
) -> Result<Option<ContainerNet>> {
    let (Some((tap, uplink)), Some(n)) = (pending, net) else {
        return Ok(None);
    };
    // Tell the LAN where the service address lives now.
    if let Err(e) = uplink.send_frame(&arp::gratuitous(n.mac, n.addr.addr())) {
        tracing::warn!(error = %e, "gratuitous ARP not sent");
    }
    let gate: Arc<dyn PacketGate> = gate.unwrap_or_else(|| Arc::new(PassThrough::default()));
    let forwarder = Forwarder::start(tap.clone(), uplink.clone(), n.mac, gate.clone(), spin, hold)
        .map_err(setup_err("start forwarding"))?;
    Ok(Some(ContainerNet {
        tap,
        uplink,
        gate,
        forwarder,
    }))
}

/// Sends the supervisor's and the program's output to `path` and detaches
/// stdin, for containers that run in the background. The log is written
/// in append mode, so that the supervisor's lines and the program's (which
/// share it) never overwrite each other; `keep` keeps what it holds (a
/// restored program goes on writing there), else it starts empty.
pub(crate) fn redirect_output(path: &std::path::Path, keep: bool) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|source| Error::State {
            path: dir.into(),
            source,
        })?;
    }
    let state_err = |source| Error::State {
        path: path.into(),
        source,
    };
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(state_err)?;
    if !keep {
        log.set_len(0).map_err(state_err)?;
    }
    let null = File::open("/dev/null").map_err(setup_err("open /dev/null"))?;
    dup2_stdin(null.as_fd()).map_err(nix_setup_err("redirect stdin"))?;
    dup2_stdout(log.as_fd()).map_err(nix_setup_err("redirect stdout"))?;
    dup2_stderr(log.as_fd()).map_err(nix_setup_err("redirect stderr"))?;
    Ok(())
}

/// What the child reports when it cannot reach exec.
struct ChildFailure {
    stage: u8,
    errno: i32,
}

const STAGES: [&str; 12] = [
    "wait for setup",
    "parent-death signal",
    "new session",
    "hostname",
    "mount propagation",
    "mount /proc",
    "mount /sys",
    "exec",
    "mask /proc and /sys",
    "drop capabilities",
    "install the seccomp filters",
    "enter the container's root",
];
const STAGE_EXEC: u8 = 7;

impl ChildFailure {
    fn into_error(self, spec: &ContainerSpec) -> Error {
        let source = std::io::Error::from_raw_os_error(self.errno);
        if self.stage == STAGE_EXEC {
            Error::Exec {
                command: spec.program.display().to_string(),
                source,
            }
        } else {
            Error::Setup {
                stage: stage_name(self.stage),
                source,
            }
        }
    }
}

/// Blocks until the child execs (its end of the pipe closes on exec) or
/// reports the step that failed.
fn read_child_report(rep_rd: OwnedFd) -> Option<ChildFailure> {
    let mut buf = [0u8; 5];
    let mut got = 0;
    while got < buf.len() {
        match read(rep_rd.as_fd(), &mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(nix::Error::EINTR) => continue,
            Err(_) => break,
        }
    }
    (got == buf.len()).then(|| ChildFailure {
        stage: buf[0],
        errno: i32::from_ne_bytes([buf[1], buf[2], buf[3], buf[4]]),
    })
}

/// Inside a new container's first process: its hostname, and a /proc and
/// /sys of its own namespaces, mounted in its own mount namespace. Errors
/// carry the index of the failed stage in [`STAGES`].
pub(crate) fn prepare_namespaces(
    hostname: &[u8],
    root: Option<&crate::rootfs::RootPlan>,
) -> std::result::Result<(), (u8, nix::Error)> {
    sethostname(std::ffi::OsStr::from_bytes(hostname)).map_err(|e| (3, e))?;
    // Mounts made in here stay in here.
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_SLAVE,
        None::<&str>,
    )
    .map_err(|e| (4, e))?;
    if let Some(root) = root {
        root.enter().map_err(|e| (11, e))?;
    }
    let nosuid = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mount(Some("proc"), "/proc", Some("proc"), nosuid, None::<&str>).map_err(|e| (5, e))?;
    mount(
        Some("sysfs"),
        "/sys",
        Some("sysfs"),
        nosuid | MsFlags::MS_RDONLY,
        None::<&str>,
    )
    .map_err(|e| (6, e))?;
    crate::confine::mounts().map_err(|e| (8, e))?;
    Ok(())
}

pub(crate) fn stage_name(stage: u8) -> &'static str {
    STAGES[usize::from(stage).min(STAGES.len() - 1)]
}

/// What the container's first process needs, all prepared before the
/// fork (the child only makes system calls).
struct ChildPlan<'a> {
    hostname: &'a [u8],
    program: &'a CString,
    argv: &'a [CString],
    envp: &'a [CString],
    filters: &'a [seccompiler::BpfProgram],
    root: Option<&'a crate::rootfs::RootPlan>,
}

/// The container's first process, between the fork and exec.
fn child_main(plan: &ChildPlan<'_>, go: OwnedFd, report: OwnedFd) -> ! {
    let ChildPlan {
        hostname,
        program,
        argv,
        envp,
        filters,
        root,
    } = *plan;
    let fail = |stage: u8, e: nix::Error| -> ! {
        let mut msg = [0u8; 5];
        msg[0] = stage;
        msg[1..].copy_from_slice(&(e as i32).to_ne_bytes());
        let _ = write(&report, &msg);
        sys::exit_now(127)
    };
    // Dies with its rrc process, so a killed rrc leaves no orphan container.
    if let Err(e) = nix::sys::prctl::set_pdeathsig(Signal::SIGKILL) {
        fail(1, e);
    }
    let mut b = [0u8; 1];
    match read(go.as_fd(), &mut b) {
        Ok(1) => {}
        // The parent gave up (or died) before releasing us.
        _ => sys::exit_now(1),
    }
    drop(go);
    // Its own session: the terminal's ^C goes to rrc, which stops the
    // container in order.
    if let Err(e) = setsid() {
        fail(2, e);
    }
    if let Err((stage, e)) = prepare_namespaces(hostname, root) {
        fail(stage, e);
    }
    // The program starts with the signal state a shell would give it:
    // rrc blocks nothing yet here, but Rust's runtime ignores SIGPIPE.
    let _ = sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None);
    // SAFETY: restoring the default disposition installs no handler code.
    let _ = unsafe { signal(Signal::SIGPIPE, SigHandler::SigDfl) };
    sys::program_umask();
    if let Err(e) = crate::confine::capabilities() {
        fail(9, e);
    }
    // Last: the filters refuse calls made above (mount, among others).
    if let Err(e) = sys::install_seccomp(filters) {
        fail(10, nix::Error::from_raw(e.raw_os_error().unwrap_or(0)));
    }
    let e = nix::unistd::execve(program, argv, envp).unwrap_err();
    fail(STAGE_EXEC, e)
}

/// rrc's environment with `overrides` set, for the program.
pub fn environment(overrides: &[(std::ffi::OsString, std::ffi::OsString)]) -> Result<Vec<CString>> {
    let mut vars: Vec<(std::ffi::OsString, std::ffi::OsString)> = std::env::vars_os()
        .filter(|(k, _)| !overrides.iter().any(|(o, _)| o == k))
        .collect();
    vars.extend(overrides.iter().cloned());
    vars.into_iter()
        .map(|(k, v)| {
            let mut kv = std::os::unix::ffi::OsStringExt::into_vec(k);
            kv.push(b'=');
            kv.extend_from_slice(v.as_bytes());
            CString::new(kv)
        })
        .collect::<std::result::Result<_, _>>()
        .map_err(|_| Error::InvalidSpec("an environment variable contains a NUL byte".into()))
}
