//! The kernel state of a restored process beyond memory and files: signals,
//! timers, limits, identity, and per-thread registrations.

use nix::unistd::Pid;

use crate::image::ProcessImage;
use crate::image::userns::{IdKind, UserNs};
use crate::remote::Batch;
use crate::restore::files::{GhostDir, Ghosts};
use crate::restore::tracee::Tracee;
use crate::{Error, Result, nr, pr};

fn warn_failed(pid: i32, what: &str, r: i64) {
    if r < 0 {
        tracing::warn!(pid, errno = -r, "{what} not restored");
    }
}

/// Signal handlers, timers, limits, directories, personality: the
/// process-wide state that does not depend on credentials.
pub fn process_state(t: &mut Tracee, p: &ProcessImage, ghosts: &mut Ghosts) -> Result<()> {
    let pid = p.pid;
    for (i, a) in p.sigactions.iter().enumerate() {
        let sig = i as u64 + 1;
        if sig == libc::SIGKILL as u64 || sig == libc::SIGSTOP as u64 {
            continue;
        }
        let mut b = Vec::with_capacity(32);
        for v in [a.handler, a.flags, a.restorer, a.mask] {
            b.extend_from_slice(&v.to_ne_bytes());
        }
        let addr = t.arg(&b)?;
        t.call("rt_sigaction", nr::SYS_rt_sigaction, &[sig, addr, 0, 8])?;
    }
    for (which, it) in p.itimers.iter().enumerate() {
        if it.value_us == 0 && it.interval_us == 0 {
            continue;
        }
        let mut b = Vec::with_capacity(32);
        for us in [it.interval_us, it.value_us.max(1)] {
            b.extend_from_slice(&(us / 1_000_000).to_ne_bytes());
            b.extend_from_slice(&(us % 1_000_000).to_ne_bytes());
        }
        let a = t.arg(&b)?;
        t.call("setitimer", nr::SYS_setitimer, &[which as u64, a, 0])?;
    }
    posix_timers(t, p)?;
    for (res, (soft, hard)) in p.rlimits.iter().enumerate() {
        let mut b = Vec::with_capacity(16);
        b.extend_from_slice(&soft.to_ne_bytes());
        b.extend_from_slice(&hard.to_ne_bytes());
        let a = t.arg(&b)?;
        let r = t.raw_on(t.pid, nr::SYS_prlimit64, &[0, res as u64, a, 0])?;
        if r < 0 {
            // Raising a hard limit needs CAP_SYS_RESOURCE: keep the hard
            // limit we have and the soft limit as close as it allows.
            tracing::warn!(
                pid,
                resource = res,
                errno = -r,
                "resource limit not restored exactly"
            );
        }
    }
    // The working directory first: its path, like the root's, is as this
    // machine's root sees it, which a chroot would hide.
    let ghost = match p.cwd_deleted {
        Some(owner) => Some(
            GhostDir::empty_dir(ghosts, owner).map_err(|e| Error::Restore {
                pid,
                stage: "working directory",
                detail: format!("recreate {}: {e}", p.cwd),
            })?,
        ),
        None => None,
    };
    let cwd = match &ghost {
        Some((_, inside)) => inside.to_string_lossy().into_owned(),
        None => p.cwd.clone(),
    };
    let a = t.arg_str(&cwd)?;
    t.call("chdir", nr::SYS_chdir, &[a]).map_err(|e| match e {
        Error::RemoteFailed { errno, .. } => Error::Restore {
            pid,
            stage: "working directory",
            detail: format!("{}: {errno}", p.cwd),
        },
        e => e,
    })?;
    if let Some((dir, _)) = ghost {
        std::fs::remove_dir(&dir).map_err(|e| Error::Restore {
            pid,
            stage: "working directory",
            detail: format!("remove {}: {e}", dir.display()),
        })?;
    }
    if p.root != "/" && !p.root.is_empty() {
        let a = t.arg_str(&p.root)?;
        let r = t.raw_on(t.pid, nr::SYS_chroot, &[a])?;
        warn_failed(pid, "root directory", r);
    }
    t.call("umask", nr::SYS_umask, &[u64::from(p.umask)])?;
    t.call("personality", nr::SYS_personality, &[p.personality])?;
    if p.child_subreaper {
        t.call(
            "prctl(PR_SET_CHILD_SUBREAPER)",
            nr::SYS_prctl,
            &[libc::PR_SET_CHILD_SUBREAPER as u64, 1],
        )?;
    }
    Ok(())
}

/// POSIX timers, with the ids the process knows them by: ids are handed out
/// in order, so timers are created until each recorded id is reached and
/// the fillers are deleted.
fn posix_timers(t: &mut Tracee, p: &ProcessImage) -> Result<()> {
    if p.posix_timers.is_empty() {
        return Ok(());
    }
    let mut timers = p.posix_timers.clone();
    timers.sort_by_key(|x| x.id);
    let mut fillers = Vec::new();
    for tm in &timers {
        loop {
            // struct sigevent: value (8), signo (4), notify (4), tid (4), pad.
            let mut ev = vec![0u8; 64];
            ev[0..8].copy_from_slice(&tm.sigval.to_ne_bytes());
            ev[8..12].copy_from_slice(&tm.signal.to_ne_bytes());
            ev[12..16].copy_from_slice(&tm.notify.to_ne_bytes());
            ev[16..20].copy_from_slice(&tm.notify_tid.to_ne_bytes());
            let evp = t.arg(&ev)?;
            let out = t.out(4)?;
            t.call(
                "timer_create",
                nr::SYS_timer_create,
                &[tm.clock as u64, evp, out],
            )?;
            let mut b = [0u8; 4];
            crate::procmem::read(t.pid, out, &mut b)?;
            let id = i32::from_ne_bytes(b);
            if id == tm.id {
                break;
            }
            if id > tm.id {
                return Err(Error::Restore {
                    pid: p.pid,
                    stage: "POSIX timers",
                    detail: format!("timer id {} is no longer available (got {id})", tm.id),
                });
            }
            fillers.push(id);
        }
        if tm.value_ns > 0 || tm.interval_ns > 0 {
            let mut spec = Vec::with_capacity(32);
            for ns in [tm.interval_ns, tm.value_ns.max(1)] {
                spec.extend_from_slice(&(ns / 1_000_000_000).to_ne_bytes());
                spec.extend_from_slice(&(ns % 1_000_000_000).to_ne_bytes());
            }
            let a = t.arg(&spec)?;
            t.call(
                "timer_settime",
                nr::SYS_timer_settime,
                &[tm.id as u64, 0, a, 0],
            )?;
        }
    }
    for id in fillers {
        t.call("timer_delete", libc::SYS_timer_delete, &[id as u64])?;
    }
    Ok(())
}

/// Per-thread registrations: rseq, robust futex list, clear_child_tid,
/// alternate signal stack, name.
pub fn thread_state(t: &mut Tracee, p: &ProcessImage) -> Result<()> {
    let pid = p.pid;
    let threads = t.threads.clone();
    for th in &p.threads {
        let Some(&(_, host)) = threads.iter().find(|(ns, _)| *ns == th.tid) else {
            continue;
        };
        if let Some(rs) = th.rseq {
            let r = t.raw_on(
                host,
                nr::SYS_rseq,
                &[rs.ptr, u64::from(rs.size), 0, u64::from(rs.signature)],
            )?;
            warn_failed(pid, "rseq registration", r);
        }
        if th.robust_list.0 != 0 {
            t.call_on(
                host,
                "set_robust_list",
                nr::SYS_set_robust_list,
                &[th.robust_list.0, th.robust_list.1],
            )?;
        }
        t.call_on(
            host,
            "set_tid_address",
            nr::SYS_set_tid_address,
            &[th.clear_child_tid],
        )?;
        const SS_DISABLE: i32 = 2;
        const SS_AUTODISARM: i32 = 1 << 31;
        let mut ss = Vec::with_capacity(24);
        ss.extend_from_slice(&th.altstack.sp.to_ne_bytes());
        let flags = if th.altstack.flags & SS_DISABLE != 0 {
            SS_DISABLE
        } else {
            th.altstack.flags & SS_AUTODISARM
        };
        ss.extend_from_slice(&(flags as i64).to_ne_bytes());
        ss.extend_from_slice(&th.altstack.size.to_ne_bytes());
        let a = t.arg(&ss)?;
        let r = t.raw_on(host, nr::SYS_sigaltstack, &[a, 0])?;
        warn_failed(pid, "alternate signal stack", r);
        let mut name = th.comm.as_bytes().to_vec();
        name.truncate(15);
        name.push(0);
        let a = t.arg(&name)?;
        t.call_on(
            host,
            "prctl(PR_SET_NAME)",
            nr::SYS_prctl,
            &[pr::SET_NAME, a],
        )?;
        if th.timer_slack_ns > 0 {
            t.call_on(
                host,
                "prctl(PR_SET_TIMERSLACK)",
                nr::SYS_prctl,
                &[pr::SET_TIMERSLACK, th.timer_slack_ns],
            )?;
        }
        let r = t.raw_on(
            host,
            libc::SYS_setpriority,
            &[
                libc::PRIO_PROCESS as u64,
                th.own_tid() as u64,
                th.nice as i64 as u64,
            ],
        )?;
        warn_failed(pid, "nice value", r);
    }
    Ok(())
}

/// Re-queues signals that were pending (process-wide and per thread), in
/// their original order.
pub fn pending_signals(t: &mut Tracee, p: &ProcessImage) -> Result<()> {
    let tgid = p.own_pid() as u64;
    for si in &p.shared_pending {
        let sig = u32::from_ne_bytes(si.0[0..4].try_into().expect("siginfo"));
        let a = t.arg(&si.0)?;
        let r = t.raw_on(t.pid, nr::SYS_rt_sigqueueinfo, &[tgid, u64::from(sig), a])?;
        warn_failed(p.pid, "pending signal", r);
    }
    let threads = t.threads.clone();
    for th in &p.threads {
        let Some(&(_, host)) = threads.iter().find(|(ns, _)| *ns == th.tid) else {
            continue;
        };
        for si in &th.pending {
            let sig = u32::from_ne_bytes(si.0[0..4].try_into().expect("siginfo"));
            let a = t.arg(&si.0)?;
            let r = t.raw_on(
                host,
                nr::SYS_rt_tgsigqueueinfo,
                &[tgid, th.own_tid() as u64, u64::from(sig), a],
            )?;
            warn_failed(p.pid, "pending thread signal", r);
        }
    }
    Ok(())
}

/// `SECBIT_*` (linux/securebits.h).
mod secbit {
    pub const KEEP_CAPS: u32 = 1 << 4;
    /// Keep-caps locked and no ambient raise (with its lock): set last,
    /// as they stop the restore's own steps.
    pub const LATE: u32 = KEEP_CAPS | 1 << 5 | 1 << 6 | 1 << 7;
    pub const CAP_SETPCAP: u32 = 8;
}

/// A `capset` data block (version 3) for these effective, permitted and
/// inheritable sets.
fn cap_data(eff: u64, prm: u64, inh: u64) -> Vec<u8> {
    let mut data = Vec::with_capacity(24);
    for half in 0..2 {
        for set in [eff, prm, inh] {
            data.extend_from_slice(&((set >> (32 * half)) as u32).to_ne_bytes());
        }
    }
    data
}

/// The highest capability number this kernel knows.
fn cap_last() -> u64 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(40)
}

/// What every thread of `p` inherits from its main thread, set there
/// before the threads are made: the bounding set, the securebits that
/// only change what exec and uid changes do to capabilities, and (outside
/// a user namespace, whose process set them before entering it) the
/// supplementary groups. The capabilities in use stay until
/// [`identity`].
pub fn before_threads(t: &mut Tracee, p: &ProcessImage) -> Result<()> {
    let c = &p.creds;
    // The bounding set only shrinks, and needs CAP_SETPCAP.
    let mut b = Batch::new();
    for cap in (0..=cap_last()).filter(|cap| c.cap_bnd & (1 << cap) == 0) {
        b.push(nr::SYS_prctl, &[pr::CAPBSET_DROP, cap]);
    }
    let failed = t.batch(&b)?.into_iter().find(|r| *r < 0);
    if let Some(r) = failed {
        return Err(Error::Restore {
            pid: p.pid,
            stage: "credentials",
            detail: format!("drop a capability from the bounding set: errno {}", -r),
        });
    }
    // With these, the uid changes of `identity` keep the capabilities,
    // which are set exactly after them anyway. Those that would stop its
    // steps (keep-caps locked, no ambient raise) come last.
    let early = p.securebits & !secbit::LATE;
    if early != 0 {
        t.call(
            "prctl(PR_SET_SECUREBITS)",
            nr::SYS_prctl,
            &[pr::SET_SECUREBITS, u64::from(early)],
        )?;
    }
    if p.user_ns.is_none() {
        let groups: Vec<u8> = c.groups.iter().flat_map(|g| g.to_ne_bytes()).collect();
        let a = t.arg(&groups)?;
        t.call("setgroups", nr::SYS_setgroups, &[c.groups.len() as u64, a])?;
    }
    Ok(())
}

/// How a result of [`thread_identity`]'s calls is taken.
#[derive(Clone, Copy)]
enum Check {
    /// A failure fails the restore.
    Must,
    /// A failure is warned of (the capabilities for setting the fs uid).
    Warn,
    /// `setfs*id(-1)` must give this id back, else a warning.
    Is(u32),
    /// Nothing to check (`setfs*id` gives the id it replaced).
    Any,
}

/// System calls for one round trip, each with how its result is taken.
#[derive(Default)]
struct Calls {
    batch: Batch,
    checks: Vec<(&'static str, Check)>,
}

impl Calls {
    fn push(&mut self, what: &'static str, check: Check, nr: i64, args: &[u64]) {
        self.batch.push(nr, args);
        self.checks.push((what, check));
    }

    /// Raises `p`'s ambient capabilities and sets its keep-caps flag.
    fn ambient_and_keepcaps(&mut self, p: &ProcessImage) {
        for cap in (0..=cap_last()).filter(|cap| p.creds.cap_amb & (1 << cap) != 0) {
            let raise = [pr::CAP_AMBIENT, pr::CAP_AMBIENT_RAISE, cap, 0, 0];
            self.push(
                "raise an ambient capability",
                Check::Must,
                nr::SYS_prctl,
                &raise,
            );
        }
        let keep = [pr::SET_KEEPCAPS, u64::from(p.keepcaps)];
        self.push("keep-caps", Check::Must, nr::SYS_prctl, &keep);
    }

    /// Makes the calls by thread `tid` of `t` (process `pid`).
    fn run(self, t: &mut Tracee, tid: Pid, pid: i32) -> Result<()> {
        let results = t.batch_on(tid, &self.batch)?;
        for ((what, check), r) in self.checks.into_iter().zip(results) {
            match check {
                Check::Must if r < 0 => {
                    return Err(Error::Restore {
                        pid,
                        stage: "credentials",
                        detail: format!("{what} failed in thread {tid}: errno {}", -r),
                    });
                }
                Check::Warn => warn_failed(pid, what, r),
                Check::Is(id) if r as u32 != id => {
                    tracing::warn!(pid, want = id, got = r, "{what} not restored");
                }
                _ => {}
            }
        }
        Ok(())
    }
}

/// Thread `tid`'s credentials, the process's (each thread has its own:
/// the restorer's, as it was made, with what [`before_threads`] set),
/// then what changing them resets for it, in one round trip.
fn thread_identity(
    t: &mut Tracee,
    tid: Pid,
    no_new_privs: bool,
    p: &ProcessImage,
    user: Option<&UserNs>,
) -> Result<()> {
    let c = &p.creds;
    let inside = |kind: IdKind, ids: [u32; 4]| -> Result<[u32; 4]> {
        let Some(u) = user else { return Ok(ids) };
        let mut out = ids;
        for (o, id) in out.iter_mut().zip(ids) {
            *o = u.inside(kind, id).ok_or_else(|| Error::Restore {
                pid: p.pid,
                stage: "credentials",
                detail: format!("id {id} is not mapped in its user namespace"),
            })?;
        }
        Ok(out)
    };
    let uid = inside(IdKind::Uid, c.uid)?;
    let gid = inside(IdKind::Gid, c.gid)?;
    let late = p.securebits & secbit::LATE & !secbit::KEEP_CAPS != 0;
    // The sets the thread works with until its own: its permitted set,
    // and CAP_SETPCAP for the late securebits.
    let working = c.cap_prm | if late { 1 << secbit::CAP_SETPCAP } else { 0 };
    // capset, version 3: a header and two 32-bit halves of each set.
    const CAP_V3: u32 = 0x2008_0522;
    let mut hdr = Vec::with_capacity(8);
    hdr.extend_from_slice(&CAP_V3.to_ne_bytes());
    hdr.extend_from_slice(&0i32.to_ne_bytes());
    let hdr = t.arg(&hdr)?;
    let working = t.arg(&cap_data(working, working, c.cap_inh))?;
    let exact = t.arg(&cap_data(c.cap_eff, c.cap_prm, c.cap_inh))?;
    let mut calls = Calls::default();
    let ids = |i: [u32; 4]| [u64::from(i[0]), u64::from(i[1]), u64::from(i[2])];
    calls.push("setresgid", Check::Must, nr::SYS_setresgid, &ids(gid));
    // setresgid made the fs gid the effective one; the recorded one may
    // differ (setfsgid). Still with every capability, this cannot fail.
    if gid[3] != gid[1] {
        let (set, get) = ([u64::from(gid[3])], [u64::from(u32::MAX)]);
        calls.push("setfsgid", Check::Any, libc::SYS_setfsgid, &set);
        calls.push("fs gid", Check::Is(gid[3]), libc::SYS_setfsgid, &get);
    }
    // Capabilities survive the uid change so they can be set exactly after.
    calls.push(
        "keep-caps",
        Check::Must,
        nr::SYS_prctl,
        &[pr::SET_KEEPCAPS, 1],
    );
    calls.push("setresuid", Check::Must, nr::SYS_setresuid, &ids(uid));
    if uid[3] != uid[1] {
        // setresuid made the fs uid the effective one. setfsuid to another
        // id needs CAP_SETUID in the effective set, which a change away
        // from uid 0 cleared: the permitted set is made effective for it,
        // and the exact sets follow. Changing the fs uid from or to 0
        // changes the effective set, so the sets are set after it.
        let what = "capabilities for the fs uid";
        calls.push(what, Check::Warn, libc::SYS_capset, &[hdr, working]);
        let (set, get) = ([u64::from(uid[3])], [u64::from(u32::MAX)]);
        calls.push("setfsuid", Check::Any, libc::SYS_setfsuid, &set);
        calls.push("fs uid", Check::Is(uid[3]), libc::SYS_setfsuid, &get);
    }
    if late {
        // The ambient set and keep-caps before the securebits that lock
        // them, with CAP_SETPCAP effective to set those.
        let what = "capset (to set securebits)";
        calls.push(what, Check::Must, libc::SYS_capset, &[hdr, working]);
        calls.ambient_and_keepcaps(p);
        let bits = [pr::SET_SECUREBITS, u64::from(p.securebits)];
        calls.push("securebits", Check::Must, nr::SYS_prctl, &bits);
    }
    calls.push("capset", Check::Must, libc::SYS_capset, &[hdr, exact]);
    if !late {
        calls.ambient_and_keepcaps(p);
    }
    if no_new_privs {
        let nnp = [libc::PR_SET_NO_NEW_PRIVS as u64, 1, 0, 0, 0];
        calls.push("no_new_privs", Check::Must, nr::SYS_prctl, &nnp);
    }
    calls.run(t, tid, p.pid)
}

/// Identity last: seccomp filters, then every thread's credentials (see
/// [`thread_identity`]), then what the process has once. In user
/// namespace `user` (entered already, with the groups set, before the
/// threads were made), ids are given as it numbers them.
pub fn identity(t: &mut Tracee, p: &ProcessImage, user: Option<&UserNs>) -> Result<()> {
    seccomp(t, p)?;
    for th in &p.threads {
        let Some(&(_, host)) = t.threads.iter().find(|(ns, _)| *ns == th.tid) else {
            continue;
        };
        let no_new_privs = th.no_new_privs.unwrap_or(p.no_new_privs);
        thread_identity(t, host, no_new_privs, p, user)?;
    }
    if p.thp_disable {
        t.call(
            "prctl(PR_SET_THP_DISABLE)",
            nr::SYS_prctl,
            &[pr::SET_THP_DISABLE, 1, 0, 0, 0],
        )?;
    }
    t.call(
        "prctl(PR_SET_DUMPABLE)",
        nr::SYS_prctl,
        &[libc::PR_SET_DUMPABLE as u64, p.dumpable],
    )?;
    // Its parent's death signals the main thread only (a thread starts
    // without one).
    if p.pdeath_signal != 0 {
        t.call(
            "prctl(PR_SET_PDEATHSIG)",
            nr::SYS_prctl,
            &[libc::PR_SET_PDEATHSIG as u64, p.pdeath_signal],
        )?;
    }
    Ok(())
}

/// Puts `t`'s main thread in seccomp's strict mode, which refuses the
/// engine's next calls unless seccomp is suspended for them.
pub fn strict_mode(t: &mut Tracee) -> Result<()> {
    if !crate::ptrace::seccomp_suspended() {
        return Err(Error::Restore {
            pid: t.ns_pid,
            stage: "seccomp",
            detail: "its strict mode needs seccomp suspended for the restore's last calls \
                     (PTRACE_O_SUSPEND_SECCOMP), which the kernel refused"
                .into(),
        });
    }
    t.call(
        "prctl(PR_SET_SECCOMP, SECCOMP_MODE_STRICT)",
        nr::SYS_prctl,
        &[
            libc::PR_SET_SECCOMP as u64,
            libc::SECCOMP_MODE_STRICT as u64,
        ],
    )
    .map(drop)
}

/// The process's seccomp filters, the first first, for all its threads at
/// once (`SECCOMP_FILTER_FLAG_TSYNC`), then each thread's own after them:
/// installed while the restored process still has CAP_SYS_ADMIN, before
/// its credentials are set, which is why the engine traces with seccomp
/// suspended ([`crate::ptrace::seize`]) for the calls that follow.
fn seccomp(t: &mut Tracee, p: &ProcessImage) -> Result<()> {
    for filter in &p.seccomp {
        let r = install_filter(t, t.pid, filter, libc::SECCOMP_FILTER_FLAG_TSYNC)?;
        if r != 0 {
            return Err(Error::Restore {
                pid: p.pid,
                stage: "seccomp",
                detail: format!("thread {r} could not take the process's filters"),
            });
        }
    }
    let threads = t.threads.clone();
    for th in p.threads.iter().filter(|th| !th.seccomp.is_empty()) {
        let Some(&(_, host)) = threads.iter().find(|(ns, _)| *ns == th.tid) else {
            continue;
        };
        for filter in &th.seccomp {
            install_filter(t, host, filter, 0)?;
        }
    }
    Ok(())
}

/// Installs one filter in thread `tid` (with `flags`); the call's result.
fn install_filter(
    t: &mut Tracee,
    tid: nix::unistd::Pid,
    filter: &[u64],
    flags: u64,
) -> Result<u64> {
    const SECCOMP_SET_MODE_FILTER: u64 = 1;
    let mut insns = Vec::with_capacity(filter.len() * 8);
    for v in filter {
        let i = crate::image::unpack_bpf(*v);
        insns.extend_from_slice(&i.code.to_ne_bytes());
        insns.push(i.jt);
        insns.push(i.jf);
        insns.extend_from_slice(&i.k.to_ne_bytes());
    }
    let at = t.arg(&insns)?;
    // struct sock_fprog: a u16 length, padding, the pointer.
    let mut prog = Vec::with_capacity(16);
    prog.extend_from_slice(&(filter.len() as u16).to_ne_bytes());
    prog.extend_from_slice(&[0u8; 6]);
    prog.extend_from_slice(&at.to_ne_bytes());
    let prog = t.arg(&prog)?;
    t.call_on(
        tid,
        "seccomp(SECCOMP_SET_MODE_FILTER)",
        nr::SYS_seccomp,
        &[SECCOMP_SET_MODE_FILTER, flags, prog],
    )
}

/// Puts every thread's registers and mask back and lets it run.
pub fn release(t: &Tracee, p: &ProcessImage) -> Result<()> {
    for th in &p.threads {
        let Some(&(_, host)) = t.threads.iter().find(|(ns, _)| *ns == th.tid) else {
            continue;
        };
        crate::ptrace::set_xstate(host, &th.xstate.0)?;
        crate::ptrace::set_regs(host, &th.regs)?;
        crate::ptrace::set_sigmask(host, th.sigmask)?;
    }
    for &(_, host) in &t.threads {
        crate::ptrace::detach(host, None)?;
    }
    Ok(())
}
