//! Bringing a checkpointed container back: a new container (cgroup, network
//! namespace with the same address and MAC, TAP held by this process)
//! around the restored process tree.

use std::cell::RefCell;
use std::path::{Path, PathBuf};

use nix::unistd::Pid;
use rrc_cgroup::Layout;
use rrc_ckpt::restore::{RestoreOptions, restore};
use serde::{Deserialize, Serialize};

use crate::create::{
    AttachedNet, Container, CreateOptions, Output, Partial, attach_network, redirect_output,
    stage_name, start_forwarding,
};
use crate::proc::ProcRef;
use crate::spec::{ContainerName, NetSpec};
use crate::state::{CgroupRecord, ContainerRecord, HostState, Phase};
use crate::{Error, Result};

/// What a container checkpoint records about the container, beside the
/// process tree (kept in the image's annotations).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerAnnotation {
    pub name: ContainerName,
    pub argv: Vec<String>,
    pub net: Option<NetSpec>,
    /// The network namespace's own configuration beyond `net`.
    #[serde(default)]
    pub netns: Option<crate::netstate::NetnsConfig>,
    /// What the container saw as `/`: a restore enters the same root.
    #[serde(default)]
    pub root: crate::rootfs::RootFs,
    /// Where its output went: in a private root, the restore's output
    /// file is bound there too (the program's standard output names it).
    #[serde(default)]
    pub log: Option<PathBuf>,
    /// Host directories shared into its root (`rrc run --share`).
    #[serde(default)]
    pub share: Vec<PathBuf>,
    /// `rrc run --aio-idle`: its next checkpoints save AIO contexts too.
    #[serde(default)]
    pub aio_idle: bool,
}

/// The annotation key of [`ContainerAnnotation`].
pub const ANNOTATION: &str = "container";

impl ContainerAnnotation {
    pub fn of(record: &ContainerRecord) -> ContainerAnnotation {
        ContainerAnnotation {
            name: record.name.clone(),
            argv: record.argv.clone(),
            net: record.net.clone(),
            netns: None,
            root: record.root.clone(),
            log: record.log.clone(),
            share: record.share.clone(),
            aio_idle: record.aio_idle,
        }
    }

    /// The container described by the image at `images`, if it is one.
    pub fn read(images: &Path) -> Result<Option<ContainerAnnotation>> {
        let m = rrc_ckpt::image::ImageDir::new(images).read_manifest()?;
        match m.annotations.get(ANNOTATION) {
            None => Ok(None),
            Some(v) => serde_json::from_value(v.clone())
                .map(Some)
                .map_err(|source| Error::CorruptState {
                    path: images.join("manifest.json"),
                    source,
                }),
        }
    }
}

/// How to restore: under which name, with which (re-resolved) network.
pub struct RestoreSpec {
    pub images: PathBuf,
    pub name: ContainerName,
    pub argv: Vec<String>,
    pub net: Option<NetSpec>,
    pub netns: Option<crate::netstate::NetnsConfig>,
    pub root: crate::rootfs::RootFs,
    /// Where the checkpointed container's output went.
    pub log: Option<PathBuf>,
    /// Host directories shared into its root (those it was started with):
    /// its processes reach them at their paths, writable, and its next
    /// images list them again.
    pub share: Vec<PathBuf>,
    /// Host directories bound at their paths for this restore only (a
    /// replay's log, capture and takeover socket, added by the caller):
    /// not the container's, so its next images do not ask for them.
    pub share_now: Vec<PathBuf>,
    /// As it was started (see [`crate::state::ContainerRecord::aio_idle`]).
    pub aio_idle: bool,
    /// TCP connections stay in repair mode (silent, their state as saved)
    /// for whoever takes them over; normally they go live.
    pub tcp_repair: bool,
    /// The program runs before its private memory is all in: a copier
    /// thread of the supervisor fills it in the background (see
    /// [`rrc_ckpt::restore::RestoreOptions::lazy_pages`]). The supervisor
    /// then holds the program's memory until every page is in: a
    /// checkpoint of the container waits for that, and the program dies
    /// with its supervisor as always (its parent-death signal).
    pub lazy_pages: bool,
}

impl RestoreSpec {
    /// How to restore the container checkpointed in `images` on this host:
    /// under `name` (by default the checkpointed one), with the same
    /// address and MAC, through `uplink` (by default the interface whose
    /// subnet holds the address).
    pub fn from_image(
        images: &Path,
        name: Option<ContainerName>,
        uplink: Option<String>,
    ) -> Result<RestoreSpec> {
        let ann = ContainerAnnotation::read(images)?
            .ok_or_else(|| Error::NotAContainerImage(images.to_path_buf()))?;
        let name = name.unwrap_or_else(|| ann.name.clone());
        let net = match &ann.net {
            Some(n) => Some(
                crate::spec::NetRequest {
                    addr: n.addr.to_string(),
                    mac: Some(n.mac),
                    uplink,
                    gateway: n.gateway,
                }
                .resolve_here(&name)?,
            ),
            None => None,
        };
        Ok(RestoreSpec {
            images: images.to_path_buf(),
            name,
            argv: ann.argv,
            net,
            netns: ann.netns,
            root: ann.root,
            log: ann.log,
            share: ann.share,
            share_now: Vec::new(),
            aio_idle: ann.aio_idle,
            tcp_repair: false,
            lazy_pages: false,
        })
    }
}

impl Container {
    /// Restores the container image of `spec.images` as a running
    /// container on this host.
    pub fn restore(
        spec: &RestoreSpec,
        layout: &Layout,
        host: HostState,
        opts: CreateOptions,
    ) -> Result<Container> {
        let mut record = ContainerRecord::new(spec.name.clone(), spec.argv.clone());
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
        match Self::rebuild(spec, layout, &host, opts, &mut record, &mut partial) {
            Ok((cgroup, init, net, restored, control)) => Ok(Container {
                host,
                claim: partial.claim.take(),
                record,
                cgroup,
                init,
                net,
                control,
                restored: Some(restored),
                remove_root: std::sync::atomic::AtomicBool::new(false),
                shmem_limits,
                extra_annotations,
            }),
            Err(e) => {
                partial.rollback();
                Err(e)
            }
        }
    }

    fn rebuild(
        spec: &RestoreSpec,
        layout: &Layout,
        host: &HostState,
        opts: CreateOptions,
        record: &mut ContainerRecord,
        partial: &mut Partial,
    ) -> Result<(
        rrc_cgroup::Cgroup,
        Pid,
        Option<crate::create::ContainerNet>,
        rrc_ckpt::restore::Restored,
        crate::control::ControlSocket,
    )> {
        let save = |partial: &Partial, record: &ContainerRecord| {
            partial.claim.as_ref().expect("claimed").save(record)
        };
        if let Output::File(path) = &opts.output {
            redirect_output(path, true)?;
            record.log = Some(path.clone());
        }
        let cgroup = layout.create_below_self(&PathBuf::from(format!("rrc.{}", spec.name)))?;
        partial.cgroup = Some(cgroup.clone());
        record.cgroup = Some(CgroupRecord::from_cgroup(&cgroup));
        save(partial, record)?;
        cgroup.limit_devices(crate::confine::DEVICES)?;

        let hostname = spec.name.as_str().as_bytes().to_vec();
        let mut keep: Vec<(&Path, &Path)> = Vec::new();
        if let Output::File(p) = &opts.output {
            keep.push((p, p));
            if let Some(old) = spec.log.as_deref().filter(|old| *old != p.as_path()) {
                keep.push((p, old));
            }
        }
        let share: Vec<&Path> = spec
            .share
            .iter()
            .chain(&spec.share_now)
            .map(PathBuf::as_path)
            .collect();
        let root = spec.root.plan(&spec.name, &keep, &share)?;
        let setup = move || -> std::result::Result<(), String> {
            crate::create::prepare_namespaces(&hostname, root.as_ref())
                .map_err(|(stage, e)| format!("{}: {e}", stage_name(stage)))
        };
        // Filled in by the hook once the root exists: the network must be
        // there before the restored processes bind their sockets.
        let attached: RefCell<Option<AttachedNet>> = RefCell::new(None);
        let after_spawn = |root: Pid| -> std::result::Result<(), String> {
            cgroup.add_process(root).map_err(|e| e.to_string())?;
            let net = attach_network(root, spec.net.as_ref()).map_err(|e| e.to_string())?;
            if let Some(cfg) = &spec.netns {
                crate::netstate::apply(root, cfg).map_err(|e| e.to_string())?;
            }
            *attached.borrow_mut() = Some(net);
            Ok(())
        };
        let flags =
            (libc::CLONE_NEWNS | libc::CLONE_NEWUTS | libc::CLONE_NEWIPC | libc::CLONE_NEWNET)
                as u64;
        let restored = restore(&RestoreOptions {
            images: &spec.images,
            root_flags: flags,
            root_setup: Some(&setup),
            after_spawn: Some(&after_spawn),
            keep_repair: spec.tcp_repair,
            ghosts: spec.root.ghosts(&spec.name)?,
            lazy_pages: spec.lazy_pages,
        })?;
        let init = restored.root;
        partial.init = Some(init);
        // From here on the supervisor takes signals through a signalfd.
        nix::sys::signal::sigprocmask(
            nix::sys::signal::SigmaskHow::SIG_BLOCK,
            Some(&crate::create::supervisor_signals()),
            None,
        )
        .map_err(crate::nix_setup_err("signal mask"))?;
        let (netns, pending) = attached.into_inner().ok_or_else(|| {
            Error::InvalidSpec("the restored container's network was not set up".into())
        })?;
        record.init = ProcRef::of(init.as_raw());
        record.netns = netns;
        let net = start_forwarding(
            pending,
            spec.net.as_ref(),
            opts.gate,
            opts.spin,
            opts.hold_network,
        )?;
        let control = crate::control::ControlSocket::bind(host, &record.name)?;
        record.phase = Phase::Running;
        save(partial, record)?;
        tracing::info!(container = %spec.name, pid = init.as_raw(), "container restored");
        partial.init = None;
        partial.cgroup = None;
        Ok((cgroup, init, net, restored, control))
    }
}
