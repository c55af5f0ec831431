//! Everything about one stopped process, apart from memory and files.

use std::fs;

use nix::unistd::Pid;

use crate::dump::inject::Injector;
use crate::dump::seize::SeizedProcess;
use crate::image::{
    AltStack, Creds, Hex, ITimer, MmState, PosixTimer, Rseq, SigAction, ThreadImage,
};
use crate::ptrace::{self, ERESTART_RESTARTBLOCK};
use crate::{Error, Result, nr, pr, procfs as pfs, sys};

/// The pid of `pid` as its own (innermost) pid namespace numbers it.
pub fn ns_pid(pid: i32, tid: Option<i32>) -> Result<(i32, usize)> {
    let path = match tid {
        Some(t) => format!("/proc/{pid}/task/{t}/status"),
        None => format!("/proc/{pid}/status"),
    };
    let levels = pfs::read_nspid(&path)
        .map_err(|e| Error::Proc {
            pid,
            what: "status",
            detail: e.to_string(),
        })?
        .ok_or_else(|| Error::Proc {
            pid,
            what: "status",
            detail: "no NSpid line".into(),
        })?;
    Ok((*levels.last().unwrap_or(&pid), levels.len()))
}

/// Task `host` (a pid or tid of ours) as the tree's pid namespace numbers
/// it: the tree's root has `depth` levels of pids.
pub fn tree_tid(host: i32, depth: usize) -> Option<i32> {
    let levels = pfs::read_nspid(format!("/proc/{host}/status")).ok()??;
    levels.get(depth.max(1) - 1).copied()
}

/// The session of the parent of a tree's root, as the tree's pid
/// namespace numbers it (0 when the tree is a pid namespace of its own, or
/// the parent is not in the tree's namespace).
pub fn outer_session(root: i32, own_pid_ns: bool, depth: usize) -> Result<i32> {
    if own_pid_ns {
        return Ok(0);
    }
    let status = |pid: i32| {
        pfs::read_text(format!("/proc/{pid}/status")).map_err(|e| Error::Proc {
            pid,
            what: "status",
            detail: e.to_string(),
        })
    };
    let field = |text: &str, key: &str| -> Vec<i32> {
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .map(|v| {
                v.split_whitespace()
                    .filter_map(|w| w.parse().ok())
                    .collect()
            })
            .unwrap_or_default()
    };
    let ppid = field(&status(root)?, "PPid:").first().copied().unwrap_or(0);
    if ppid <= 0 {
        return Ok(0);
    }
    let text = status(ppid)?;
    if field(&text, "NSpid:").len() != depth {
        return Ok(0);
    }
    Ok(field(&text, "NSsid:").last().copied().unwrap_or(0))
}

/// Sessions a restore cannot make again: one led by a process outside the
/// tree (other than the root's own), or one whose leader has exited and
/// whose members were adopted by several processes (each session is made
/// again by one helper forking its adopted members as children of their
/// parent, so they must share it).
pub fn check_sessions(
    images: &[crate::image::ProcessImage],
    outer: i32,
    own_pid_ns: bool,
    problems: &mut Vec<String>,
) {
    use std::collections::BTreeMap;
    let sid_of: BTreeMap<i32, i32> = images.iter().map(|p| (p.pid, p.sid)).collect();
    let mut adopters: BTreeMap<i32, Vec<(i32, Option<i32>)>> = BTreeMap::new();
    for p in images {
        if p.sid == outer || sid_of.contains_key(&p.sid) {
            continue;
        }
        // In a pid namespace of its own the tree is all there is; outside
        // one, a live process with that pid leads the session.
        if !own_pid_ns && fs::metadata(format!("/proc/{}", p.sid)).is_ok() {
            problems.push(format!(
                "process {} is in session {}, whose leader is outside the tree",
                p.pid, p.sid
            ));
            continue;
        }
        let parent_in_session = p.parent.and_then(|pp| sid_of.get(&pp)) == Some(&p.sid);
        if !parent_in_session {
            adopters.entry(p.sid).or_default().push((p.pid, p.parent));
        }
    }
    for (sid, members) in adopters {
        let parents: std::collections::BTreeSet<_> = members.iter().map(|(_, pp)| *pp).collect();
        if parents.len() > 1 || parents.contains(&None) {
            let pids: Vec<String> = members.iter().map(|(p, _)| p.to_string()).collect();
            problems.push(format!(
                "processes {} are in session {sid}, whose leader has exited, and have different parents: not supported",
                pids.join(", ")
            ));
        }
    }
}

pub struct ThreadsAndSignals {
    pub threads: Vec<ThreadImage>,
    pub sigactions: Vec<SigAction>,
    pub itimers: [ITimer; 3],
    pub posix_timers: Vec<PosixTimer>,
    pub shared_pending: Vec<Hex>,
    pub brk: u64,
    pub dumpable: u64,
    pub pdeath_signal: u64,
    pub child_subreaper: bool,
    pub thp_disable: bool,
    pub keepcaps: bool,
    pub securebits: u32,
}

fn u64_at(buf: &[u8], at: usize) -> u64 {
    u64::from_ne_bytes(buf[at..at + 8].try_into().expect("8 bytes"))
}

fn check_ok(what: &'static str, tid: Pid, r: i64) -> Result<u64> {
    if (-4095..0).contains(&r) {
        return Err(Error::RemoteFailed {
            tid: tid.as_raw(),
            what,
            errno: nix::errno::Errno::from_raw(-r as i32),
        });
    }
    Ok(r as u64)
}

/// What only the process itself can tell (asked through injected calls,
/// one batch per thread and one for the process) and what ptrace shows
/// about each thread.
pub fn threads_and_signals(
    p: &SeizedProcess,
    inj: &mut Injector,
    xsave_size: usize,
) -> Result<ThreadsAndSignals> {
    use crate::dump::inject::OUT_AT;
    use crate::remote::Batch;
    let pid = p.pid;
    let out = inj.scratch()? + OUT_AT;
    // Per-thread state, asked of each thread itself, all threads at once
    // (one round trip, where /proc would cost several calls per thread);
    // each writes its outputs to its own 48 bytes: the alternate stack at
    // 0, the clear-child-tid address at 24, the name at 32.
    const PER_THREAD: u64 = 48;
    if p.threads.len() as u64 * PER_THREAD > crate::dump::inject::SCRATCH_SIZE - OUT_AT {
        return Err(Error::Unsupported(vec![format!(
            "process {pid} has {} threads; at most {} are supported",
            p.threads.len(),
            (crate::dump::inject::SCRATCH_SIZE - OUT_AT) / PER_THREAD
        )]));
    }
    let mut work = Vec::with_capacity(p.threads.len());
    for (i, t) in p.threads.iter().enumerate() {
        let o = out + i as u64 * PER_THREAD;
        let mut b = Batch::new();
        b.push(libc::SYS_sigaltstack, &[0, o]);
        b.push(nr::SYS_prctl, &[libc::PR_GET_TID_ADDRESS as u64, o + 24]);
        b.push(nr::SYS_prctl, &[pr::GET_TIMERSLACK]);
        b.push(nr::SYS_prctl, &[pr::GET_NAME, o + 32]);
        // Its number in its own pid namespace, and its nice value (as
        // `20 - nice`: the raw call returns no negative numbers).
        b.push(nr::SYS_gettid, &[]);
        b.push(nr::SYS_getpriority, &[libc::PRIO_PROCESS as u64, 0]);
        work.push((t.tid, b));
    }
    let results = inj.batch_each(&work)?;
    let mut outputs = vec![0u8; p.threads.len() * PER_THREAD as usize];
    inj.read_scratch(OUT_AT, &mut outputs)?;
    let mut threads = Vec::new();
    for (i, (t, r)) in p.threads.iter().zip(results).enumerate() {
        let (mut regs, sigmask) = inj.original(t.tid);
        // A sleep interrupted here would resume through its kernel restart
        // block, which a restore cannot bring back: it returns EINTR instead.
        if regs.rax as i64 == ERESTART_RESTARTBLOCK {
            regs.rax = (-(libc::EINTR as i64)) as u64;
        }
        let mut pending: Vec<Hex> = sys::peek_siginfo(t.tid, false)
            .map_err(|e| Error::io(format!("pending signals of thread {}", t.tid))(e))?
            .into_iter()
            .map(|b| Hex(b.to_vec()))
            .collect();
        if t.signal.is_some() {
            // The signal it was stopped delivering goes back in its queue.
            let si = nix::sys::ptrace::getsiginfo(t.tid).map_err(|e| Error::Ptrace {
                what: "read the signal of",
                tid: t.tid.as_raw(),
                source: e,
            })?;
            pending.push(Hex(sys::siginfo_bytes(&si).to_vec()));
        }
        check_ok("sigaltstack", t.tid, r[0])?;
        check_ok("prctl(PR_GET_TID_ADDRESS)", t.tid, r[1])?;
        let timer_slack_ns = check_ok("prctl(PR_GET_TIMERSLACK)", t.tid, r[2])?;
        check_ok("prctl(PR_GET_NAME)", t.tid, r[3])?;
        let ns_tid = check_ok("gettid", t.tid, r[4])? as i32;
        let nice = 20 - check_ok("getpriority", t.tid, r[5])? as i32;
        let o = &outputs[i * PER_THREAD as usize..(i + 1) * PER_THREAD as usize];
        let name = &o[32..48];
        let name = &name[..name.iter().position(|&c| c == 0).unwrap_or(name.len())];
        threads.push(ThreadImage {
            tid: ns_tid,
            nested_tids: Vec::new(),
            comm: String::from_utf8_lossy(name).into_owned(),
            regs,
            xstate: Hex(ptrace::get_xstate(t.tid, xsave_size)?),
            sigmask,
            pending,
            rseq: sys::get_rseq(t.tid)
                .map_err(|e| Error::io(format!("rseq of thread {}", t.tid))(e))?
                .map(|c| Rseq {
                    ptr: c.ptr,
                    size: c.size,
                    signature: c.signature,
                }),
            robust_list: sys::get_robust_list(t.tid)
                .map_err(|e| Error::io(format!("robust list of thread {}", t.tid))(e))?,
            clear_child_tid: u64_at(o, 24),
            altstack: AltStack {
                sp: u64_at(o, 0),
                flags: u64_at(o, 8) as i32,
                size: u64_at(o, 16),
            },
            timer_slack_ns,
            nice,
            seccomp: Vec::new(),
            no_new_privs: None,
        });
    }

    // Process-wide state in one batch; each output at its own offset.
    let timers = pfs::read_timers(pid.as_raw())?;
    let mut b = Batch::new();
    let mut slots = Vec::new();
    let mut at = 0u64;
    let mut slot = |len: u64| {
        let a = at;
        at += len;
        a
    };
    let mut sig_idx = Vec::new();
    for sig in 1..=64u64 {
        if sig == libc::SIGKILL as u64 || sig == libc::SIGSTOP as u64 {
            sig_idx.push(None);
            continue;
        }
        let o = slot(32);
        sig_idx.push(Some((
            b.push(nr::SYS_rt_sigaction, &[sig, 0, out + o, 8]),
            o,
        )));
    }
    for which in 0..3u64 {
        let o = slot(32);
        slots.push((b.push(nr::SYS_getitimer, &[which, out + o]), o));
    }
    let mut timer_idx = Vec::new();
    for t in &timers {
        let o = slot(32);
        let g = b.push(nr::SYS_timer_gettime, &[t.id as u64, out + o]);
        let ov = b.push(nr::SYS_timer_getoverrun, &[t.id as u64]);
        timer_idx.push((g, ov, o));
    }
    let brk_i = b.push(nr::SYS_brk, &[0]);
    let dump_i = b.push(nr::SYS_prctl, &[libc::PR_GET_DUMPABLE as u64]);
    let pdeath_o = slot(8);
    let pdeath_i = b.push(
        nr::SYS_prctl,
        &[libc::PR_GET_PDEATHSIG as u64, out + pdeath_o],
    );
    let reaper_o = slot(8);
    let reaper_i = b.push(
        nr::SYS_prctl,
        &[libc::PR_GET_CHILD_SUBREAPER as u64, out + reaper_o],
    );
    let thp_i = b.push(nr::SYS_prctl, &[pr::GET_THP_DISABLE]);
    let keep_i = b.push(nr::SYS_prctl, &[pr::GET_KEEPCAPS]);
    let secure_i = b.push(nr::SYS_prctl, &[pr::GET_SECUREBITS]);
    let r = inj.batch(pid, &b)?;
    let mut o = vec![0u8; at as usize];
    inj.read_scratch(OUT_AT, &mut o)?;

    let mut sigactions = Vec::with_capacity(64);
    for s in sig_idx {
        match s {
            None => sigactions.push(SigAction::default()),
            Some((i, off)) => {
                check_ok("rt_sigaction", pid, r[i])?;
                let off = off as usize;
                sigactions.push(SigAction {
                    handler: u64_at(&o, off),
                    flags: u64_at(&o, off + 8),
                    restorer: u64_at(&o, off + 16),
                    mask: u64_at(&o, off + 24),
                });
            }
        }
    }
    let mut itimers = [ITimer::default(); 3];
    for (which, (i, off)) in slots.iter().enumerate() {
        check_ok("getitimer", pid, r[*i])?;
        let off = *off as usize;
        itimers[which] = ITimer {
            interval_us: u64_at(&o, off) * 1_000_000 + u64_at(&o, off + 8),
            value_us: u64_at(&o, off + 16) * 1_000_000 + u64_at(&o, off + 24),
        };
    }
    let mut posix_timers = Vec::new();
    for (t, (g, ov, off)) in timers.iter().zip(timer_idx) {
        check_ok("timer_gettime", pid, r[g])?;
        let overrun = check_ok("timer_getoverrun", pid, r[ov])?;
        let off = off as usize;
        let notify = match t.notify.as_str() {
            "thread" => libc::SIGEV_THREAD,
            "none" => libc::SIGEV_NONE,
            _ => libc::SIGEV_SIGNAL,
        } | if t.to_thread {
            libc::SIGEV_THREAD_ID
        } else {
            0
        };
        posix_timers.push(PosixTimer {
            id: t.id,
            clock: t.clock,
            signal: t.signal,
            notify,
            notify_tid: ns_pid(pid.as_raw(), Some(t.notify_tid))
                .map(|(n, _)| n)
                .unwrap_or(t.notify_tid),
            sigval: t.sigval,
            interval_ns: u64_at(&o, off) * 1_000_000_000 + u64_at(&o, off + 8),
            value_ns: u64_at(&o, off + 16) * 1_000_000_000 + u64_at(&o, off + 24),
            overrun: overrun as i32,
        });
    }
    let brk = check_ok("brk", pid, r[brk_i])?;
    let dumpable = check_ok("prctl(PR_GET_DUMPABLE)", pid, r[dump_i])?;
    check_ok("prctl(PR_GET_PDEATHSIG)", pid, r[pdeath_i])?;
    let pdeath_signal = u64_at(&o, pdeath_o as usize) & 0xffff_ffff;
    check_ok("prctl(PR_GET_CHILD_SUBREAPER)", pid, r[reaper_i])?;
    let child_subreaper = u64_at(&o, reaper_o as usize) & 0xffff_ffff != 0;
    let thp_disable = check_ok("prctl(PR_GET_THP_DISABLE)", pid, r[thp_i])? != 0;
    let keepcaps = check_ok("prctl(PR_GET_KEEPCAPS)", pid, r[keep_i])? != 0;
    let securebits = check_ok("prctl(PR_GET_SECUREBITS)", pid, r[secure_i])? as u32;
    let shared_pending = sys::peek_siginfo(pid, true)
        .map_err(|e| Error::io(format!("shared pending signals of process {pid}"))(e))?
        .into_iter()
        .map(|b| Hex(b.to_vec()))
        .collect();
    Ok(ThreadsAndSignals {
        threads,
        sigactions,
        itimers,
        posix_timers,
        shared_pending,
        brk,
        dumpable,
        pdeath_signal,
        child_subreaper,
        thp_disable,
        keepcaps,
        securebits,
    })
}

/// The layout of a process's memory: from its stat (read by the caller,
/// stopped), `brk` (asked of the process) and its auxv.
pub fn mm_state(pid: Pid, st: &procfs::process::Stat, brk: u64) -> Result<MmState> {
    let raw = pid.as_raw();
    let auxv_raw = pfs::read_bytes(format!("/proc/{raw}/auxv")).map_err(|e| Error::Proc {
        pid: raw,
        what: "auxv",
        detail: e.to_string(),
    })?;
    let auxv = auxv_raw
        .chunks_exact(8)
        .map(|c| u64::from_ne_bytes(c.try_into().expect("8 bytes")))
        .collect();
    Ok(MmState {
        start_code: st.startcode,
        end_code: st.endcode,
        start_data: st.start_data.unwrap_or(0),
        end_data: st.end_data.unwrap_or(0),
        start_brk: st.start_brk.unwrap_or(0),
        brk,
        start_stack: st.startstack,
        arg_start: st.arg_start.unwrap_or(0),
        arg_end: st.arg_end.unwrap_or(0),
        env_start: st.env_start.unwrap_or(0),
        env_end: st.env_end.unwrap_or(0),
        auxv,
    })
}

pub fn creds(status: &procfs::process::Status) -> Creds {
    Creds {
        uid: [status.ruid, status.euid, status.suid, status.fuid],
        gid: [status.rgid, status.egid, status.sgid, status.fgid],
        groups: status.groups.clone(),
        cap_inh: status.capinh,
        cap_prm: status.capprm,
        cap_eff: status.capeff,
        cap_bnd: status.capbnd.unwrap_or(u64::MAX),
        cap_amb: status.capamb.unwrap_or(0),
    }
}

/// The status files of `p`'s threads but its main thread, in order.
pub fn thread_statuses(p: &SeizedProcess) -> Result<Vec<String>> {
    p.threads
        .iter()
        .skip(1)
        .map(|th| {
            pfs::read_text(format!("/proc/{}/task/{}/status", p.pid, th.tid)).map_err(|e| {
                Error::Proc {
                    pid: p.pid.as_raw(),
                    what: "status",
                    detail: e.to_string(),
                }
            })
        })
        .collect()
}

/// Soft and hard limits for every resource, from /proc/PID/limits (readable
/// where prlimit(2) on another user's process is not).
pub fn rlimits(pid: i32) -> Result<Vec<(u64, u64)>> {
    let text = pfs::read_text(format!("/proc/{pid}/limits")).map_err(|e| Error::Proc {
        pid,
        what: "limits",
        detail: e.to_string(),
    })?;
    parse_limits(&text).ok_or_else(|| Error::Proc {
        pid,
        what: "limits",
        detail: "unexpected format".into(),
    })
}

/// Resources Linux has limits for (RLIMIT_CPU ..= RLIMIT_RTTIME).
pub const RLIMITS: usize = 16;

fn parse_limits(text: &str) -> Option<Vec<(u64, u64)>> {
    let value = |s: &str| -> Option<u64> {
        let s = s.trim();
        if s == "unlimited" {
            Some(libc::RLIM_INFINITY)
        } else {
            s.parse().ok()
        }
    };
    let mut out = Vec::new();
    // "%-25s %-20s %-20s %-10s": name, soft, hard, units.
    for line in text.lines().skip(1) {
        if line.len() < 47 {
            return None;
        }
        let soft = value(line.get(26..46)?)?;
        let hard = value(line.get(47..67.min(line.len()))?)?;
        out.push((soft, hard));
    }
    (out.len() == RLIMITS).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_limits_parse() {
        let l = rlimits(std::process::id() as i32).unwrap();
        let want =
            nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).unwrap();
        assert_eq!(l[libc::RLIMIT_NOFILE as usize], want);
    }
}
