//! Stopping every thread of a process tree, and letting it go again.

use std::collections::BTreeSet;
use std::fs;

use nix::errno::Errno;
use nix::sys::ptrace::Options;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::ptrace::{self, Stop, collect_deaths};
use crate::{Error, Result};

const PTRACE_EVENT_STOP: i32 = 128;

#[derive(Debug, Clone)]
pub struct SeizedThread {
    pub tid: Pid,
    /// A signal the thread was about to receive when it stopped; delivered
    /// again when it is let go, and recorded as pending in the image.
    pub signal: Option<Signal>,
}

#[derive(Debug, Clone)]
pub struct SeizedProcess {
    pub pid: Pid,
    pub parent: Option<Pid>,
    pub threads: Vec<SeizedThread>,
}

/// A stopped process tree, parents before children.
#[derive(Debug)]
pub struct Seized {
    pub processes: Vec<SeizedProcess>,
    released: bool,
    started: std::time::Instant,
    stopped_for: Option<std::time::Duration>,
}

fn tasks(pid: Pid) -> Vec<Pid> {
    fs::read_dir(format!("/proc/{pid}/task"))
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.file_name().to_string_lossy().parse().ok())
                .map(Pid::from_raw)
                .collect()
        })
        .unwrap_or_default()
}

fn children(pid: Pid, threads: &[SeizedThread], exclude: &[Pid]) -> Vec<Pid> {
    let mut out = BTreeSet::new();
    for t in threads {
        if let Ok(s) = crate::procfs::read_text(format!("/proc/{pid}/task/{}/children", t.tid)) {
            out.extend(
                s.split_whitespace()
                    .filter_map(|w| w.parse().ok())
                    .map(Pid::from_raw)
                    .filter(|c| !exclude.contains(c) && !is_dead_clone(*c)),
            );
        }
    }
    out.into_iter().collect()
}

/// A dead child with no exit signal (made by `clone` without one, as the
/// engine's snapshots are) waiting for a `__WCLONE` wait: it holds no state
/// and the process does not see it in its ordinary waits.
fn is_dead_clone(pid: Pid) -> bool {
    // Fields after the command name: state is the 3rd, exit_signal the 38th.
    stat_fields(pid).is_some_and(|f| {
        f.first().map(String::as_str) == Some("Z") && f.get(35).map(String::as_str) == Some("0")
    })
}

/// The fields of task `tid`'s stat after its command name.
fn stat_fields(tid: Pid) -> Option<Vec<String>> {
    crate::procfs::read_stat_fields(format!("/proc/{tid}/stat"))
}

/// A process that has exited, all its threads with it, and waits for its
/// parent to reap it.
fn is_zombie(pid: Pid) -> bool {
    stat_fields(pid).is_some_and(|f| f.first().map(String::as_str) == Some("Z"))
        && tasks(pid).len() <= 1
}

/// Stops every thread of one process; threads it creates meanwhile are
/// caught by going round until the thread list stops changing.
fn seize_process(pid: Pid) -> Result<Vec<SeizedThread>> {
    let mut seized: Vec<Pid> = Vec::new();
    loop {
        let fresh: Vec<Pid> = tasks(pid)
            .into_iter()
            .filter(|t| !seized.contains(t))
            .collect();
        if fresh.is_empty() {
            break;
        }
        for tid in fresh {
            match ptrace::seize(tid, Options::empty()) {
                Ok(()) => {}
                // It exited between the listing and now.
                Err(Error::Ptrace {
                    source: Errno::ESRCH,
                    ..
                }) => continue,
                Err(Error::Ptrace {
                    source: Errno::EPERM,
                    ..
                }) => {
                    return Err(Error::Unsupported(vec![format!(
                        "thread {tid} of process {pid} is already traced by another process (a debugger?)"
                    )]));
                }
                Err(e) => return Err(e),
            }
            seized.push(tid);
            ptrace::interrupt(tid)?;
        }
    }
    let mut threads = Vec::new();
    for tid in seized {
        match ptrace::wait_stop(tid)? {
            Stop::Event(PTRACE_EVENT_STOP, _) | Stop::Event(_, _) => {
                threads.push(SeizedThread { tid, signal: None })
            }
            Stop::Signal(sig) => threads.push(SeizedThread {
                tid,
                signal: Some(sig),
            }),
            Stop::Exited(_) | Stop::Killed(_) => {}
        }
    }
    if threads.is_empty() {
        return Err(Error::NoSuchProcess(pid.as_raw()));
    }
    threads.sort_by_key(|t| (t.tid != pid, t.tid));
    Ok(threads)
}

impl Seized {
    /// Stops the tree rooted at `root` (a pid of the caller's namespace).
    pub fn tree(root: Pid) -> Result<Seized> {
        Seized::tree_excluding(root, &[])
    }

    /// Stops the tree rooted at `root`, leaving out the processes of
    /// `exclude` (and their descendants).
    pub fn tree_excluding(root: Pid, exclude: &[Pid]) -> Result<Seized> {
        if !std::path::Path::new(&format!("/proc/{root}")).exists() {
            return Err(Error::NoSuchProcess(root.as_raw()));
        }
        let mut s = Seized {
            processes: Vec::new(),
            released: false,
            started: std::time::Instant::now(),
            stopped_for: None,
        };
        let mut queue = vec![(root, None)];
        while let Some((pid, parent)) = queue.pop() {
            // A zombie cannot be traced, runs nothing and has no children
            // (they went to a reaper when it exited): it is recorded as it
            // is.
            if parent.is_some() && is_zombie(pid) {
                s.processes.push(SeizedProcess {
                    pid,
                    parent,
                    threads: Vec::new(),
                });
                continue;
            }
            let threads = match seize_process(pid) {
                Ok(t) => t,
                // A child that exited while we walked the tree.
                Err(Error::NoSuchProcess(_)) if parent.is_some() => continue,
                Err(e) => {
                    s.release(false);
                    return Err(e);
                }
            };
            // Stable now: every thread of `pid` is stopped.
            for c in children(pid, &threads, exclude).into_iter().rev() {
                queue.push((c, Some(pid)));
            }
            s.processes.push(SeizedProcess {
                pid,
                parent,
                threads,
            });
        }
        Ok(s)
    }

    /// Lets every thread go (`kill` false: on its way, with any signal it
    /// was about to receive) or kills the whole tree and waits until every
    /// thread is gone.
    pub fn release(&mut self, kill_tree: bool) {
        if self.released {
            return;
        }
        self.released = true;
        self.stopped_for = Some(self.started.elapsed());
        if kill_tree {
            for p in &self.processes {
                let _ = kill(p.pid, Signal::SIGKILL);
            }
            // Each traced thread reports its death to us, and is released
            // only once we collect that: a group leader waits for its other
            // threads, a pid namespace's init for every task of the
            // namespace. So collect whatever is ready, in any order. The
            // first process of a pid namespace nested in the tree's ends
            // only once the others in it are reaped, by parents that may be
            // waiting for us: once on its way out, it is as good as gone.
            let firsts = self.nested_firsts();
            let mut left: Vec<Pid> = self
                .processes
                .iter()
                .flat_map(|p| p.threads.iter().map(|t| t.tid))
                .collect();
            let aside = collect_deaths(
                &mut left,
                |_| true,
                |tid| firsts.contains(&tid) && exiting(tid),
                DEATHS_WAIT,
            );
            let lingering: Vec<(Pid, u64)> = (aside.into_iter())
                .filter_map(|tid| Some((tid, start_time(tid)?)))
                .collect();
            if !lingering.is_empty() {
                // Their deaths are ours to collect still (or their parents
                // never see them): a thread of ours does it meanwhile,
                // never past the task it knew (a pid restored anew is
                // another).
                std::thread::spawn(move || {
                    let mut tids: Vec<Pid> = lingering.iter().map(|(t, _)| *t).collect();
                    let starts: std::collections::HashMap<Pid, u64> =
                        lingering.into_iter().collect();
                    collect_deaths(
                        &mut tids,
                        |t| start_time(t) == starts.get(&t).copied(),
                        |_| false,
                        DEATHS_WAIT,
                    );
                });
            }
        } else {
            for p in &self.processes {
                for t in &p.threads {
                    let _ = ptrace::detach(t.tid, t.signal);
                }
            }
        }
    }
}

/// How long the deaths of a killed tree's threads are collected.
const DEATHS_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// When task `tid` started (its stat's field 22), which tells it from a
/// later task given the same number.
fn start_time(tid: Pid) -> Option<u64> {
    stat_fields(tid)?.get(19)?.parse().ok()
}

/// Whether thread `tid` is on its way out (`PF_EXITING` in its stat's
/// flags), never to run the program again.
fn exiting(tid: Pid) -> bool {
    const PF_EXITING: u64 = 0x4;
    stat_fields(tid)
        .and_then(|f| f.get(6)?.parse::<u64>().ok())
        .is_some_and(|flags| flags & PF_EXITING != 0)
}

impl Seized {
    /// The threads of the processes that are the first (pid 1) of a pid
    /// namespace nested in the root's.
    fn nested_firsts(&self) -> std::collections::HashSet<Pid> {
        let levels = |pid: Pid| -> Vec<i32> {
            crate::procfs::read_nspid(format!("/proc/{pid}/status"))
                .ok()
                .flatten()
                .unwrap_or_default()
        };
        let Some(root) = self.processes.first() else {
            return Default::default();
        };
        let depth = levels(root.pid).len();
        self.processes
            .iter()
            .filter(|p| {
                let l = levels(p.pid);
                l.len() > depth && l.last() == Some(&1)
            })
            .flat_map(|p| p.threads.iter().map(|t| t.tid))
            .collect()
    }

    /// How long the tree was stopped, once it was let go or killed.
    pub fn stopped_for(&self) -> Option<std::time::Duration> {
        self.stopped_for
    }
}

impl Drop for Seized {
    fn drop(&mut self) {
        // An error path that did not decide: leave the tree running.
        self.release(false);
    }
}
