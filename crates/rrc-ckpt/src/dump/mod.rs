//! Checkpoint: stop a process tree, record it in an image, then let it go
//! or kill it.

pub(crate) mod files;
pub mod inject;
mod ipc;
pub(crate) mod memory;
mod mounts;
mod mqueue;
mod namespaces;
mod netns;
pub(crate) mod process;
mod pty;
pub mod seize;
mod splice;
mod userns;

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::unistd::Pid;
use procfs::process::Process;

use crate::common::{self, cpu_info, kernel_release};
use crate::dump::inject::Injector;
use crate::dump::memory::{MemoryDump, ShmemTable};
use crate::dump::seize::SeizedProcess;
use crate::image::{
    Exit, FORMAT, ImageDir, Lineage, Manifest, NsKind, ProcessImage, VERSION, Vma, VmaKind,
};
use crate::{Error, Result, sys};

pub struct CheckpointOptions<'a> {
    /// The root of the tree, as this process's pid namespace numbers it.
    pub root: Pid,
    pub images: &'a Path,
    /// Let the tree go on running afterwards instead of killing it.
    pub leave_running: bool,
    pub annotations: BTreeMap<String, serde_json::Value>,
    /// The caller vouches that no Linux AIO request of the tree is in
    /// flight when it is stopped (see [`refuse_aio`]); its AIO contexts
    /// are then saved, else refused.
    pub aio_idle: bool,
    /// The tree is a container's, whose first process's namespaces its
    /// restore makes (rrc's runtime: its network with its TAP device, its
    /// root, its host name): a tree that is a pid namespace of its own
    /// records its root's UTS, network, cgroup and mount namespaces only
    /// without it, as any root's.
    pub container: bool,
}

#[derive(Debug, Clone)]
pub struct CheckpointReport {
    pub processes: usize,
    pub threads: usize,
    /// Bytes of memory contents saved.
    pub memory_bytes: u64,
    /// Size of the image on disk.
    pub image_bytes: u64,
    /// How long the tree was stopped.
    pub frozen: Duration,
    pub total: Duration,
    /// Of the total, the time spent reading sockets (connections in repair
    /// mode, queues).
    pub sockets: Duration,
    /// The firewall table that holds the killed tree's TCP connections
    /// still until the restore lifts it.
    pub net_lock: Option<String>,
    /// Of the time stopped, syncing the image to disk before the tree is
    /// killed (nothing when it is left running).
    pub sync: Duration,
}

/// A shared memory object of which every checkpoint saves only the
/// beginning: the first `keep` bytes, rounded up to whole pages. The object
/// keeps its size; the rest of it restores as zeros.
///
/// The object is named by its identity, device and inode, as `fstat` of a
/// descriptor of it gives them (for a memfd: of the memfd itself). The
/// limit applies wherever the object is met: mapped by any process of the
/// tree, or open only as a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShmemLimit {
    pub dev: u64,
    pub ino: u64,
    pub keep: u64,
}

/// Annotations of a checkpoint's manifest, by key.
pub type Annotations = BTreeMap<String, serde_json::Value>;

/// What the caller of a checkpoint does at its two moments: while every
/// thread of the tree is stopped, and as soon as the tree runs again.
///
/// A closure returning [`Annotations`] is the first alone.
pub trait FreezeHooks {
    /// Runs once per checkpoint right after the last thread stops, before
    /// anything of the tree is read. What it returns is added to the
    /// checkpoint's annotations (replacing those of the same keys). It lets
    /// the caller read what the program keeps in shared memory at the very
    /// moment of the checkpoint.
    ///
    /// Its time adds to the pause the tree sees. It may be called for a
    /// checkpoint that then fails (and leaves no image); it is not called
    /// when the tree cannot be stopped at all.
    fn at_freeze(&mut self) -> Annotations {
        Annotations::new()
    }

    /// Runs once the tree of a checkpoint that leaves it running runs
    /// again, everything of it read, before its memory is written out (a
    /// write that may still fail). What the tree does from here on is
    /// after the checkpoint: a container's held frames may go. Not called
    /// when the checkpoint fails while the tree is stopped, nor when the
    /// tree is killed.
    fn resumed(&mut self) {}
}

impl<F: FnMut() -> Annotations> FreezeHooks for F {
    fn at_freeze(&mut self) -> Annotations {
        self()
    }
}

/// The caller's hooks for one checkpoint (see [`FreezeHooks`]).
pub type AtFreeze<'a> = &'a mut dyn FreezeHooks;

/// What a checkpoint may be asked beyond [`CheckpointOptions`]; nothing by
/// default, built with its methods.
#[derive(Default)]
#[non_exhaustive]
pub struct Extras<'a> {
    /// Shared memory objects saved only in part.
    pub shmem_limits: Vec<ShmemLimit>,
    pub at_freeze: Option<AtFreeze<'a>>,
}

impl<'a> Extras<'a> {
    pub fn new() -> Extras<'a> {
        Extras::default()
    }

    /// Saves only the beginning of these shared memory objects.
    pub fn shmem_limits(mut self, limits: Vec<ShmemLimit>) -> Extras<'a> {
        self.shmem_limits = limits;
        self
    }

    /// Runs `f` while the tree is stopped (see [`AtFreeze`]).
    pub fn at_freeze(mut self, f: AtFreeze<'a>) -> Extras<'a> {
        self.at_freeze = Some(f);
        self
    }
}

/// Checkpoints the tree rooted at `opts.root` into `opts.images`. On error
/// the tree keeps running as if nothing happened and no image is left.
/// Runs `attempt` (a checkpoint) again while it is refused as
/// [`Error::Busy`], for up to `within`: each refusal took nothing, and the
/// tree runs between attempts (a program accepts a waiting connection in
/// microseconds once it runs). The last refusal if it never stops.
pub fn when_not_busy<T>(within: Duration, mut attempt: impl FnMut() -> Result<T>) -> Result<T> {
    let until = Instant::now() + within;
    let mut pause = Duration::from_millis(2);
    loop {
        match attempt() {
            Err(Error::Busy(_)) if Instant::now() + pause < until => {
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(100));
            }
            other => return other,
        }
    }
}

pub fn checkpoint(opts: &CheckpointOptions) -> Result<CheckpointReport> {
    checkpoint_with(opts, Extras::new())
}

/// [`checkpoint`], with what `extras` asks besides.
pub fn checkpoint_with(opts: &CheckpointOptions, extras: Extras) -> Result<CheckpointReport> {
    let img = ImageDir::create(opts.images)?;
    let mut nothing = Annotations::new;
    let probe = match crate::sockdiag::ListenerProbe::of(opts.root) {
        Ok(p) => p,
        Err(e) => {
            common::remove_image_files(img.path());
            return Err(e);
        }
    };
    let result = take(
        &img,
        Take {
            root: opts.root,
            leave_running: opts.leave_running,
            annotations: opts.annotations.clone(),
            aio_idle: opts.aio_idle,
            container: opts.container,
            series: None,
            exclude: &[],
            shmem_limits: &extras.shmem_limits,
            at_freeze: extras.at_freeze.unwrap_or(&mut nothing),
            probe: &probe,
        },
        &mut memory::Full {
            writeback: !opts.leave_running,
        },
    );
    if result.is_err() {
        common::remove_image_files(img.path());
    }
    result
}

/// Refuses the AIO contexts among `vmas` (of process `pid`). A context's
/// ring shows the completions the program has not read yet, but requests
/// still in flight (a poll waits for as long as its file stays quiet, a
/// direct read for its device) are nowhere to be seen from user space: a
/// restored context would lose them without a word. Only the caller can
/// know there are none.
fn refuse_aio(pid: Pid, vmas: &[Vma], problems: &mut Vec<String>) {
    for v in vmas {
        if let VmaKind::AioRing { .. } = v.kind {
            problems.push(format!(
                "process {pid}: mapping {:#x}-{:#x}: uses Linux AIO (io_setup): requests in \
                 flight in its context cannot be seen from user space and would be lost (if the \
                 program never has one in flight when checkpointed, `rrc checkpoint --pid \
                 --aio-idle`, or `rrc run --aio-idle` for a container, carries its contexts)",
                v.start, v.end
            ));
        }
    }
}

/// What one checkpoint of a tree is to do.
pub(crate) struct Take<'a> {
    pub root: Pid,
    pub leave_running: bool,
    pub annotations: BTreeMap<String, serde_json::Value>,
    pub aio_idle: bool,
    /// As [`CheckpointOptions::container`].
    pub container: bool,
    /// For a checkpoint of a series: this one and the one it follows (none
    /// for the first). Its files then get checksums.
    pub series: Option<(Lineage, Option<Lineage>)>,
    /// Processes of the tree that are the engine's own (snapshots).
    pub exclude: &'a [Pid],
    /// Shared memory objects saved only in part.
    pub shmem_limits: &'a [ShmemLimit],
    /// The caller's look at the tree while it is stopped.
    pub at_freeze: AtFreeze<'a>,
    /// A probe of the tree's listeners, made before the tree is stopped
    /// (a series keeps one).
    pub probe: &'a crate::sockdiag::ListenerProbe,
}

/// One stopped process as a memory policy sees it.
pub(crate) struct Frozen<'a> {
    pub p: &'a SeizedProcess,
    pub inj: &'a mut Injector,
    pub img: &'a ImageDir,
    /// The pid the image knows the process by.
    pub image_pid: i32,
    pub shmem: &'a mut ShmemTable,
    pub problems: &'a mut Vec<String>,
}

/// How the memory of each process gets into the image: all of it, copied
/// while the tree is stopped ([`memory::Full`]), or what changed since the
/// last checkpoint, copied partly after the tree runs again
/// ([`crate::incremental`]).
pub(crate) trait MemoryPolicy {
    /// Called for each process while the whole tree is stopped.
    fn capture(&mut self, f: Frozen) -> Result<MemoryDump>;
    /// Called once every process is captured: after the tree runs again
    /// when it is left running, before it is killed otherwise. Finishes
    /// the pages files and returns how many bytes of memory they hold.
    fn finish(&mut self, img: &ImageDir) -> Result<u64>;
    /// Last word on the mappings of process `image_pid` before its record
    /// is written (after [`MemoryPolicy::finish`]).
    fn amend(&mut self, _image_pid: i32, _vmas: &mut [crate::image::Vma]) -> Result<()> {
        Ok(())
    }
}

/// A TCP connection that its program has not accepted yet cannot be saved
/// (no call puts it back in a listener's queue), nor can a unix one whose
/// client is outside the tree (it cannot connect again) or has sent data
/// (it sits in a socket no fd holds yet): a checkpoint finding one in the
/// tree is refused before anything is read, so that the caller may try
/// again once the program has accepted it (a series keeps its place). A
/// sock_diag request for each family; the tree's sockets are listed only
/// if some listener of its network namespace has connections waiting.
fn refuse_if_busy(seized: &seize::Seized, probe: &crate::sockdiag::ListenerProbe) -> Result<()> {
    let busy = probe
        .busy_listeners()
        .map_err(Error::io("list TCP listeners (sock_diag)"))?;
    let backlogs = probe
        .unix_backlogs()
        .map_err(Error::io("list unix listeners (sock_diag)"))?;
    if busy.is_empty() && backlogs.is_empty() {
        return Ok(());
    }
    let ours: std::collections::BTreeSet<u32> = seized
        .processes
        .iter()
        .flat_map(|p| {
            fs::read_dir(format!("/proc/{}/fd", p.pid.as_raw()))
                .into_iter()
                .flatten()
                .flatten()
                .filter_map(|e| {
                    let target = fs::read_link(e.path()).ok()?;
                    let t = target.to_str()?;
                    t.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
                })
        })
        .collect();
    let mut waiting: Vec<String> = busy
        .iter()
        .filter(|l| ours.contains(&l.inode))
        .map(|l| format!("{} ({} waiting)", l.addr, l.waiting))
        .collect();
    for l in backlogs.iter().filter(|l| ours.contains(&l.inode)) {
        let (inside, outside): (Vec<u32>, Vec<u32>) =
            l.clients.iter().partition(|c| ours.contains(c));
        let sent = if inside.is_empty() {
            Vec::new()
        } else {
            (probe.unix_sent_unread(&inside))
                .map_err(Error::io("list unix connections (sock_diag)"))?
        };
        if !outside.is_empty() || !sent.is_empty() {
            waiting.push(format!(
                "unix socket {} ({} from outside the tree, {} with data sent)",
                l.name,
                outside.len(),
                sent.len()
            ));
        }
    }
    if waiting.is_empty() {
        return Ok(());
    }
    Err(Error::Busy(format!(
        "connections not yet accepted by the program, on {} (nothing was saved; try again \
         once it has accepted them)",
        waiting.join(", ")
    )))
}

/// Takes one checkpoint of the tree at `t.root` into `img`.
pub(crate) fn take(
    img: &ImageDir,
    t: Take,
    policy: &mut dyn MemoryPolicy,
) -> Result<CheckpointReport> {
    let start = Instant::now();
    let cpu = cpu_info();
    let frozen_at = Instant::now();
    let mut seized = seize::Seized::tree_excluding(t.root, t.exclude)?;
    let stopped = frozen_at.elapsed();
    refuse_if_busy(&seized, t.probe)?;
    // First thing once the tree stands still: what the caller reads then
    // is of the very moment the checkpoint saves.
    let mut annotations = t.annotations.clone();
    annotations.extend(t.at_freeze.at_freeze());
    // A tree about to be killed in the host's own network: what comes to
    // its connections is dropped until the restore (before their queues
    // are read, so that nothing arrives after).
    let net_lock = if !t.leave_running && crate::netlock::in_our_netns(t.root.as_raw()) {
        let pids: Vec<i32> = seized.processes.iter().map(|p| p.pid.as_raw()).collect();
        crate::netlock::lock(&crate::netlock::connections_of(&pids))?
    } else {
        crate::netlock::NetLock::none()
    };
    let mut problems = Vec::new();
    let mut shmem = memory::ShmemTable::with_limits(t.shmem_limits);
    let mut files = files::FileTable::default();
    files.tree = seized.processes.iter().map(|p| p.pid.as_raw()).collect();
    let mut images: Vec<ProcessImage> = Vec::new();
    // Each process's status, read once: its pid in its namespace, its
    // credentials and more below.
    let mut statuses = BTreeMap::new();
    for p in &seized.processes {
        let raw = p.pid.as_raw();
        let status = Process::new(raw)
            .and_then(|proc| proc.status())
            .map_err(Error::proc(raw, "status"))?;
        // Any call of ours would kill it.
        if status.seccomp == Some(1) && !crate::ptrace::seccomp_suspended() {
            return Err(Error::Unsupported(vec![format!(
                "process {raw} runs in seccomp's strict mode, and the kernel does not let \
                 seccomp be suspended for the checkpoint's calls (PTRACE_O_SUSPEND_SECCOMP)"
            )]));
        }
        statuses.insert(p.pid, status);
    }
    // Each process's pids from the tree's namespace inwards, and where it
    // stands among the namespaces nested in it.
    let levels = namespaces::PidLevels::new(&statuses, t.root)?;
    let depth = levels.depth;
    let root_ns_pid = levels.tree_pid(t.root);
    let own_pid_ns = depth > 1 && root_ns_pid == 1;
    // A group or session id as the tree's namespace numbers it: a status
    // lists it at every level of the process's, the outermost first.
    let tree_level = |v: &Option<Vec<i32>>, fallback: i32| {
        v.as_ref()
            .and_then(|l| l.get(depth - 1))
            .copied()
            .unwrap_or(fallback)
    };
    let mut ns_of: BTreeMap<Pid, i32> = BTreeMap::new();
    for p in &seized.processes {
        ns_of.insert(p.pid, levels.tree_pid(p.pid));
    }
    // A container's root namespaces are its restore's to make; any other
    // root's, a pid namespace's first or not, are the tree's.
    let root_ns_made = own_pid_ns && t.container;
    let mut own_ns =
        namespaces::own_namespaces(t.root, root_ns_made, &seized.processes, &mut problems);
    for (p, m) in &mut own_ns.mnt {
        if let Err(e) = m.number_makers(|h| ns_of.get(&h).copied()) {
            problems.push(format!("process {p}'s mount namespace: {e}"));
        }
    }
    // The network namespaces processes of the tree made (the root's is
    // the tree's), whose waiting connections refuse a checkpoint as the
    // root's do.
    let nested_nets: Vec<Pid> = own_ns
        .net
        .keys()
        .copied()
        .filter(|p| *p != t.root)
        .collect();
    for first in &nested_nets {
        refuse_if_busy(&seized, &crate::sockdiag::ListenerProbe::of(*first)?)?;
    }
    // In ours, a restore sets the next pid for a thread or process it
    // cannot ask for one: at the tree's level, the others asked for in
    // pid namespaces of its user namespace.
    let mut times = namespaces::time_places(t.root, &seized.processes, &mut problems);
    let mut users = userns::read(
        &seized.processes,
        &statuses,
        |pid, pid_ns_owned| levels.nesting(pid) == 0 || pid_ns_owned,
        |pid| {
            times.get(&pid).map_or((false, false), |t| {
                (
                    matches!(t.ns, crate::image::TimeNs::Own { .. }),
                    t.children.is_some(),
                )
            })
        },
        &mut problems,
    );
    let mut places = levels.places(
        t.root,
        &seized.processes,
        |pid| {
            seized
                .processes
                .iter()
                .any(|p| p.pid == pid && p.threads.is_empty())
        },
        &mut problems,
    );
    // Which unix socket is connected to which: only sock_diag tells, for
    // the sockets of the tree's network namespace.
    // The IPC namespaces the tree owns (the root's, when it is not ours,
    // and each nested one), read by a thread of their own while the
    // processes are: nothing else touches them while the tree is stopped.
    let root_ipc = namespaces::root_owns_ipc(t.root);
    let ipc_owners = own_ns
        .ipc
        .iter()
        .map(|p| (*p, true))
        .chain(root_ipc.then_some((t.root, false)))
        .collect();
    let ipc_reader = ipc::Reader::start(ipc_owners);
    let unix = files::UnixTable::new(std::iter::once(t.root).chain(nested_nets).collect());
    let tables = fd_tables(&seized.processes);
    // The first process (its image's pid) seen using each fd table.
    let mut first_with_table: HashMap<usize, i32> = HashMap::new();
    let mut phases = Phases::default();
    for p in &seized.processes {
        let raw = p.pid.as_raw();
        let proc = Process::new(raw).map_err(Error::proc(raw, "process"))?;
        let status = statuses.remove(&p.pid).expect("read above");
        let st = proc.stat().map_err(Error::proc(raw, "stat"))?;
        let (seccomp, thread_seccomp) = match status.seccomp.unwrap_or(0) {
            2 => seccomp_filters(p)?,
            _ => Default::default(),
        };
        let seccomp_strict = status.seccomp == Some(1);
        if p.threads.is_empty() {
            // A zombie: only its place in the tree and how it ended.
            let code = st.exit_code.unwrap_or(0);
            let exit = match code & 0x7f {
                0 => Exit::Code {
                    code: (code >> 8) as u8,
                },
                sig => Exit::Signal { signal: sig },
            };
            if let Exit::Signal { signal } = exit
                && !crate::common::is_fatal_signal(signal)
            {
                problems.push(format!(
                    "process {raw} is a zombie killed by signal {signal}, which cannot be sent again"
                ));
            }
            let place = places.remove(&p.pid).unwrap_or_default();
            images.push(ProcessImage {
                pid: ns_of[&p.pid],
                parent: p.parent.map(|pp| ns_of[&pp]),
                nested_pids: place.nested_pids,
                pid_ns: place.pid_ns,
                pgid: tree_level(&status.nspgid, st.pgrp),
                sid: tree_level(&status.nssid, st.session),
                zombie: Some(exit),
                ..Default::default()
            });
            continue;
        }
        let t0 = Instant::now();
        let mut inj = Injector::new(p)?;
        let mut ts = process::threads_and_signals(p, &mut inj, cpu.xsave_size)?;
        // Each thread's own status but the main thread's (`status`), read
        // once: its pids at every level, its no_new_privs.
        let others = process::thread_statuses(p)?;
        namespaces::thread_levels(
            p,
            &levels,
            status.nspid.as_deref(),
            &others,
            &mut ts.threads,
        )?;
        for (th, own) in ts.threads.iter_mut().zip(thread_seccomp) {
            th.seccomp = own;
        }
        // no_new_privs is each thread's: where a thread's differs from the
        // process's (set after the thread was made), it is noted.
        let process_nnp = status.nonewprivs.unwrap_or(0) != 0;
        for (th, text) in ts.threads.iter_mut().skip(1).zip(&others) {
            let nnp = text
                .lines()
                .any(|l| l.starts_with("NoNewPrivs:") && l.trim_end().ends_with('1'));
            th.no_new_privs = (nnp != process_nnp).then_some(nnp);
        }
        let t1 = Instant::now();
        let mem = policy.capture(Frozen {
            p,
            inj: &mut inj,
            img,
            image_pid: ns_of[&p.pid],
            shmem: &mut shmem,
            problems: &mut problems,
        })?;
        inj.finish()?;
        if !t.aio_idle {
            refuse_aio(p.pid, &mem.vmas, &mut problems);
        }
        let t2 = Instant::now();
        let fds = files::dump(p.pid, img, &mut files, &mut shmem, &unix, &mut problems)?;
        let table = tables.get(&p.pid).copied();
        let shares_parent_files =
            table.is_some() && p.parent.and_then(|pp| tables.get(&pp).copied()) == table;
        // Not its parent's table but a sibling's (the parent unshared its
        // own since): that sibling forks it again.
        let mut shares_files_with = None;
        let earlier = table.and_then(|t| first_with_table.get(&t).copied());
        if let Some(t) = table {
            first_with_table.entry(t).or_insert(ns_of[&p.pid]);
        }
        if !shares_parent_files
            && let Some(other) = earlier.and_then(|e| images.iter().find(|i| i.pid == e))
        {
            let depth = places.get(&p.pid).map_or(0, |pl| pl.nested_pids.len());
            let sibling = other.parent.is_some() && other.parent == p.parent.map(|pp| ns_of[&pp]);
            // A namespace's first process cannot fork with CLONE_PARENT.
            if sibling && other.depth() == depth && other.nested_pids.last() != Some(&1) {
                shares_files_with = Some(other.pid);
            } else {
                problems.push(format!(
                    "process {raw} shares its fd table with process {}, which is neither its parent \
                     nor a sibling in its pid namespace: only a table shared with the parent or a \
                     sibling (CLONE_FILES) can be restored",
                    other.pid
                ));
            }
        }
        phases.state += t1 - t0;
        phases.memory += t2 - t1;
        phases.files += t2.elapsed();
        let link = |what: &str| {
            fs::read_link(format!("/proc/{raw}/{what}"))
                .map(|p| p.to_string_lossy().into_owned())
                .unwrap_or_default()
        };
        let personality = crate::procfs::read_text(format!("/proc/{raw}/personality"))
            .ok()
            .and_then(|s| u64::from_str_radix(s.trim(), 16).ok())
            .unwrap_or(0);
        let place = places.remove(&p.pid).unwrap_or_default();
        let time = times.remove(&p.pid).unwrap_or_default();
        // Those of its namespaces of its user namespace it is the first of
        // (the others it shares with its parent, which makes them).
        let owned = users.owned.remove(&p.pid).unwrap_or_default();
        // A pid namespace unshared for its next children, which no process
        // is in yet, shows no owner: in a user namespace, it may be its
        // (which a restore makes so only for a process born there).
        if users.of.contains_key(&p.pid)
            && !owned.contains(&NsKind::Pid)
            && matches!(
                place.children_pid_ns,
                Some(crate::image::ChildrenPidNs::New)
            )
        {
            problems.push(format!(
                "process {raw} unshared a pid namespace for its next children, which may belong \
                 to its user namespace, where a restore does not make pid namespaces"
            ));
        }
        // The tree's own pid namespace is made by rrc, outside any user
        // namespace.
        if owned.contains(&NsKind::Pid) && place.nested_pids.is_empty() {
            problems.push(format!(
                "process {raw}'s pid namespace, the tree's own, belongs to its user namespace \
                 (a rootless container's), where a restore does not make the tree's"
            ));
        }
        let user_owned = (owned.into_iter())
            .filter(|k| match k {
                NsKind::Uts => own_ns.uts.contains_key(&p.pid),
                NsKind::Cgroup => own_ns.cgroup.contains(&p.pid),
                NsKind::Net => own_ns.net.contains_key(&p.pid),
                NsKind::Mnt => own_ns.mnt.contains_key(&p.pid),
                NsKind::Ipc => own_ns.ipc.contains(&p.pid) || (p.pid == t.root && root_ipc),
                NsKind::Pid => place.nested_pids.last() == Some(&1),
                NsKind::Time => true,
                _ => false,
            })
            .collect();
        images.push(ProcessImage {
            pid: ns_of[&p.pid],
            parent: p.parent.map(|pp| ns_of[&pp]),
            nested_pids: place.nested_pids,
            pid_ns: place.pid_ns,
            children_pid_ns: place.children_pid_ns,
            uts: own_ns.uts.remove(&p.pid),
            own_cgroup_ns: own_ns.cgroup.contains(&p.pid),
            own_net: own_ns.net.remove(&p.pid).map(|mut net| {
                // Its veths' peers' namespaces, as the tree numbers them.
                for v in &mut net.tree_veths {
                    v.peer_ns = ns_of.get(&Pid::from_raw(v.peer_ns)).copied().unwrap_or(0);
                }
                net
            }),
            own_mounts: own_ns
                .mnt
                .remove(&p.pid)
                .map(|m| m.save(img, ns_of[&p.pid]))
                .transpose()?,
            ipc: None,
            time_ns: time.ns,
            children_time_ns: time.children,
            user_ns: users.of.remove(&p.pid),
            user_owned,
            pgid: tree_level(&status.nspgid, st.pgrp),
            sid: tree_level(&status.nssid, st.session),
            exe: link("exe"),
            threads: ts.threads,
            mm: process::mm_state(p.pid, &st, ts.brk)?,
            vmas: mem.vmas,
            pages: mem.pages,
            holes: mem.holes,
            fds,
            shares_parent_files,
            shares_files_with,
            parked: Vec::new(),
            fd_table: status.fdsize,
            locks: Vec::new(),
            zombie: None,
            sigactions: ts.sigactions,
            shared_pending: ts.shared_pending,
            itimers: ts.itimers,
            posix_timers: ts.posix_timers,
            creds: process::creds(&status),
            rlimits: process::rlimits(raw)?,
            umask: status.umask.unwrap_or(0o022),
            cwd: link("cwd"),
            cwd_deleted: link("cwd")
                .ends_with(" (deleted)")
                .then(|| fs::metadata(format!("/proc/{raw}/cwd")).ok())
                .flatten()
                .map(|m| {
                    use std::os::unix::fs::MetadataExt;
                    crate::image::Owner {
                        uid: m.uid(),
                        gid: m.gid(),
                        mode: m.mode() & 0o7777,
                    }
                }),
            root: link("root"),
            personality,
            dumpable: ts.dumpable,
            no_new_privs: status.nonewprivs.unwrap_or(0) != 0,
            seccomp,
            seccomp_strict,
            pdeath_signal: ts.pdeath_signal,
            child_subreaper: ts.child_subreaper,
            thp_disable: ts.thp_disable,
            keepcaps: ts.keepcaps,
            securebits: ts.securebits,
        });
    }
    for (host, lock) in std::mem::take(&mut files.locks) {
        let ns = ns_of[&Pid::from_raw(host)];
        if let Some(p) = images.iter_mut().find(|p| p.pid == ns) {
            p.locks.push(lock);
        }
    }
    // The session the root was started in: the one it is in, unless it
    // made its own; then its parent's (the best guess left).
    let outer_session = match images.iter().find(|p| p.pid == root_ns_pid) {
        Some(r) if r.sid != r.pid => r.sid,
        _ => process::outer_session(t.root.as_raw(), own_pid_ns, depth)?,
    };
    process::check_sessions(&images, outer_session, own_pid_ns, &mut problems);
    files::resolve_in_flight(
        &mut files,
        img,
        &mut shmem,
        &unix,
        &mut images,
        &ns_of,
        &mut problems,
    )?;
    // The IPC objects of the namespaces the tree owns, read meanwhile
    // (waiting for them is what the reading adds to the pause): the
    // root's (its segments' modes are read there, and the segments no
    // process attaches are saved with the others), and each nested one's.
    let ipc_waited = Instant::now();
    let mut queue_devs = HashMap::new();
    for read in ipc_reader.finish() {
        problems.extend(read.problems);
        let ns = match read.namespace {
            Ok(ns) => ns,
            Err(e) => {
                problems.push(format!(
                    "process {}: the objects of its IPC namespace cannot be read: {e}",
                    read.first
                ));
                continue;
            }
        };
        // Segments are made again in their namespace: the root's, or the
        // one its first process makes.
        let tag = read.nested.then(|| ns_of[&read.first]);
        shmem.set_segments(&ns, tag);
        for seg in &ns.unattached {
            shmem.unattached_segment(seg, tag, img)?;
        }
        // After every fd of the tree: those it holds are saved.
        for (name, file) in &ns.queues {
            match files.queues.unheld(name, file) {
                Ok(Ok(_)) => {}
                Ok(Err(what)) => {
                    problems.push(format!("process {}'s IPC namespace: {what}", read.first))
                }
                Err(e) => problems.push(format!(
                    "process {}'s IPC namespace: POSIX message queue /{name}: {e}",
                    read.first
                )),
            }
        }
        queue_devs.insert(ns.queue_dev, tag);
        if let Some(p) = images.iter_mut().find(|p| p.pid == ns_of[&read.first]) {
            p.ipc = Some(ns.objects);
        }
    }
    phases.ipc = ipc_waited.elapsed();
    shmem.resolve_creators(&ns_of);
    files.queues.set_namespaces(&queue_devs);
    files::check_unix_peers(&mut files, &mut problems);
    files.ptys.claim_terminals(&mut files.files);
    files
        .ptys
        .number_sessions(&seized.processes, &images, &ns_of, &mut problems);
    files::check_terminals(&files, &images, &mut problems);
    files::check_deleted_watches(&files, &images, &mut problems);
    let all: Vec<&ProcessImage> = images.iter().collect();
    if let Err(what) = crate::image::netns::check_tun_files(&files.files, &all) {
        problems.push(what);
    }
    // Pid namespaces of user namespaces, their pids outside them set as the
    // next ones of the tree's namespace at a restore.
    if let Err(what) = crate::image::check_user_pid_namespaces(&all) {
        problems.push(what);
    }
    // Time namespaces of user namespaces, made by processes in them from
    // the start.
    if images.iter().any(|p| p.user_owned.contains(&NsKind::Time)) {
        let by_pid: BTreeMap<i32, ProcessImage> =
            images.iter().map(|p| (p.pid, p.clone())).collect();
        if let Err(what) = crate::image::check_user_time_namespaces(&by_pid) {
            problems.push(what);
        }
    }
    files::resolve_owners(&mut files, &ns_of, &images, depth, &mut problems);
    files::resolve_epoll_targets(&mut files, &mut problems);
    files::resolve_pidfds(&mut files, &ns_of, &images, depth, &mut problems);
    files::resolve_ns_files(&mut files, &ns_of, &mut problems);
    files.finish(img)?;
    let sockets = files.socket_time;
    // Dropped on any error from here on, the set takes the connections out
    // of repair mode before `seized` lets the tree go.
    let repaired = std::mem::take(&mut files.repaired);
    if !problems.is_empty() {
        return Err(Error::Unsupported(problems));
    }
    let (lineage, parent) = match &t.series {
        Some((l, p)) => (Some(l.clone()), p.clone()),
        None => (None, None),
    };
    let manifest = Manifest {
        format: FORMAT.into(),
        version: VERSION,
        created_unix: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        kernel: kernel_release(),
        cpu,
        root: root_ns_pid,
        processes: images.iter().map(|p| p.pid).collect(),
        own_pid_ns,
        outer_pid: (own_pid_ns && !t.container).then_some(t.root.as_raw()),
        outer_session: Some(outer_session),
        files: std::mem::take(&mut files.files),
        shmem: shmem.objects,
        posix_queues: std::mem::take(&mut files.queues.saved),
        ptys: std::mem::take(&mut files.ptys.saved),
        annotations,
        parent,
        lineage,
        checksums: BTreeMap::new(),
        user_namespaces: std::mem::take(&mut users.namespaces),
        net_lock: net_lock.name().map(str::to_string),
    };
    let lock_name = manifest.net_lock.clone();
    let threads = images.iter().map(|p| p.threads.len()).sum();
    let processes = images.len();
    let write_records = |img: &ImageDir,
                         mut manifest: Manifest,
                         images: &mut Vec<ProcessImage>,
                         policy: &mut dyn MemoryPolicy|
     -> Result<()> {
        for p in images.iter_mut() {
            policy.amend(p.pid, &mut p.vmas)?;
            img.write_json(&ImageDir::process_name(p.pid), p)?;
        }
        if t.series.is_some() {
            manifest.checksums = checksum_files(img)?;
        }
        img.write_json("manifest.json", &manifest)
    };
    let memory_bytes;
    let mut synced = Duration::ZERO;
    if t.leave_running {
        // The connections go on: out of repair mode without a word.
        repaired.release();
        seized.release(false);
        t.at_freeze.resumed();
        phases.log(stopped, frozen_at.elapsed());
        memory_bytes = policy.finish(img)?;
        write_records(img, manifest, &mut images, policy)?;
    } else {
        // Nothing may fail once the tree is gone: the image is complete
        // before it is killed.
        memory_bytes = policy.finish(img)?;
        write_records(img, manifest, &mut images, policy)?;
        let t = Instant::now();
        img.sync()?;
        synced = t.elapsed();
        seized.release(true);
        netns::remove_host_peers(&images);
        // Killed in repair mode, the connections close without FIN or RST;
        // the lock keeps their peers quiet until the restore.
        repaired.close_silently();
        net_lock.keep();
        phases.log(stopped, frozen_at.elapsed());
    }
    let frozen = seized.stopped_for();
    let image_bytes = fs::read_dir(img.path())
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0);
    Ok(CheckpointReport {
        processes,
        threads,
        memory_bytes,
        image_bytes,
        frozen: frozen.unwrap_or(frozen_at.elapsed()),
        total: start.elapsed(),
        sockets,
        net_lock: lock_name,
        sync: synced,
    })
}

/// Where the time went while the tree was stopped.
#[derive(Default)]
struct Phases {
    state: Duration,
    memory: Duration,
    files: Duration,
    ipc: Duration,
}

impl Phases {
    fn log(&self, stopped: Duration, frozen: Duration) {
        tracing::debug!(
            stop_us = stopped.as_micros() as u64,
            state_us = self.state.as_micros() as u64,
            memory_us = self.memory.as_micros() as u64,
            files_us = self.files.as_micros() as u64,
            ipc_us = self.ipc.as_micros() as u64,
            frozen_us = frozen.as_micros() as u64,
            "checkpoint phases"
        );
    }
}

/// CRC-32 of every file of an image directory but its manifest.
pub(crate) fn checksum_files(img: &ImageDir) -> Result<BTreeMap<String, u32>> {
    let mut out = BTreeMap::new();
    let rd = fs::read_dir(img.path()).map_err(|e| Error::image(img.path(), e))?;
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name == "manifest.json" {
            continue;
        }
        out.insert(name, crate::store::crc_of_file(&e.path())?);
    }
    Ok(out)
}

/// The seccomp filters of process `p`, packed for its image: those all
/// its threads have (the longest run, from the first installed, that they
/// share), and each thread's own after those, in the order of
/// `p.threads`.
type SeccompOfThreads = (Vec<Vec<u64>>, Vec<Vec<Vec<u64>>>);
/// The fd table of each live process of the tree, numbered: processes
/// with one number share a table (`CLONE_FILES`). The kernel orders tables
/// (kcmp), so each process finds its table among those seen so far by a
/// binary search: n log n comparisons, not one per pair of processes. A
/// process kcmp cannot compare gets a table of its own.
fn fd_tables(processes: &[SeizedProcess]) -> HashMap<Pid, usize> {
    // A process using each table seen so far, in the kernel's order, and
    // the table's number.
    let mut seen: Vec<(Pid, usize)> = Vec::new();
    let mut out = HashMap::new();
    for p in processes.iter().filter(|p| !p.threads.is_empty()) {
        let fresh = out.len();
        let table = match search_tables(p.pid, &seen) {
            Some(Ok(shared)) => shared,
            Some(Err(at)) => {
                seen.insert(at, (p.pid, fresh));
                fresh
            }
            None => fresh,
        };
        out.insert(p.pid, table);
    }
    out
}

/// As `binary_search` does: the number of `pid`'s table if a process of
/// `seen` (in the kernel's order of tables) uses it, else where it goes;
/// `None` if kcmp cannot compare them.
fn search_tables(pid: Pid, seen: &[(Pid, usize)]) -> Option<std::result::Result<usize, usize>> {
    use std::cmp::Ordering;
    let (mut lo, mut hi) = (0, seen.len());
    while lo < hi {
        let mid = (lo + hi) / 2;
        match sys::fd_table_order(pid, seen[mid].0).ok()? {
            Ordering::Equal => return Some(Ok(seen[mid].1)),
            Ordering::Less => hi = mid,
            Ordering::Greater => lo = mid + 1,
        }
    }
    Some(Err(lo))
}

fn seccomp_filters(p: &SeizedProcess) -> Result<SeccompOfThreads> {
    let mut chains: Vec<Vec<Vec<u64>>> = Vec::with_capacity(p.threads.len());
    for th in &p.threads {
        chains.push(
            crate::ptrace::seccomp_filters(th.tid)?
                .iter()
                .map(|f| f.iter().map(crate::image::pack_bpf).collect())
                .collect(),
        );
    }
    let Some(first) = chains.first() else {
        return Ok(Default::default());
    };
    let shared = (0..first.len())
        .take_while(|&i| chains.iter().all(|c| c.get(i) == Some(&first[i])))
        .count();
    let common = first[..shared].to_vec();
    let own = chains
        .into_iter()
        .map(|mut c| c.split_off(shared))
        .collect();
    Ok((common, own))
}
