//! Control groups for rrc's containers and lab hosts.
//!
//! rrc needs three things from cgroups: to know every process of a container
//! (including ones it forked), to freeze them all at once (checkpoints, and the
//! instant "power cut" of a lab host), and to kill them all. Hosts that mount
//! cgroup v1 get the `freezer` hierarchy (plus `memory` and `pids` when present,
//! so that containers are accounted apart); hosts with only the v2 unified
//! hierarchy get its core `cgroup.freeze` / `cgroup.kill` files. A group can
//! also be kept to a list of devices ([`DeviceRule`]: the v1 `devices`
//! controller, or a BPF device program on v2).
//!
//! New groups are always created *below the caller's own group* in each
//! hierarchy, so a container started inside a lab host lands inside that host's
//! group and dies with it, and nothing escapes a limit its parent imposed.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

mod devices;
pub use devices::{Access, DeviceKind, DeviceRule};

/// Which cgroup interface a [`Layout`] drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V1,
    V2,
}

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Version::V1 => f.pad("v1"),
            Version::V2 => f.pad("v2"),
        }
    }
}

/// How long [`Cgroup::kill_all`] waits for a cgroup v1 group to freeze
/// before it kills its tasks as they are.
const FREEZE_BEFORE_KILL: Duration = Duration::from_millis(500);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "no usable cgroup hierarchy: mount the cgroup v1 freezer controller or the cgroup v2 unified hierarchy"
    )]
    NotMounted,
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
    #[error("cannot create cgroup {path}: {source}")]
    Create { path: PathBuf, source: io::Error },
    #[error("cannot remove cgroup {path}: {source}")]
    Remove { path: PathBuf, source: io::Error },
    #[error(
        "the cgroup v1 devices controller is not mounted: containers cannot be kept from the host's devices"
    )]
    NoDevicesController,
    #[error("this process is in no {controller} cgroup (see /proc/self/cgroup)")]
    NoMembership { controller: String },
    #[error("cgroup {path} did not reach state {state} within {timeout:?}")]
    Timeout {
        path: PathBuf,
        state: &'static str,
        timeout: Duration,
    },
}

pub type Result<T> = std::result::Result<T, Error>;

#[derive(Debug, Clone)]
struct Hierarchy {
    mount: PathBuf,
    /// The v1 controller this mount carries; `None` for the v2 unified mount.
    controller: Option<&'static str>,
}

/// The cgroup hierarchies of this machine that rrc uses.
#[derive(Debug, Clone)]
pub struct Layout {
    version: Version,
    /// The first entry is the one that freezes and lists processes
    /// (freezer on v1, the unified hierarchy on v2).
    hierarchies: Vec<Hierarchy>,
}

/// v1 controllers rrc places containers in, the freezer first (required);
/// `devices` limits which device files a container may use.
const V1_CONTROLLERS: [&str; 4] = ["freezer", "memory", "pids", "devices"];

impl Layout {
    /// Finds the hierarchies mounted on this machine (as seen from this
    /// process's mount namespace). v1 is preferred when its freezer is
    /// mounted; `RRC_CGROUP=v2` picks the unified hierarchy on a host that
    /// mounts both.
    pub fn detect() -> Result<Layout> {
        let want_v2 = std::env::var("RRC_CGROUP").is_ok_and(|v| v == "v2");
        Self::detect_preferring(if want_v2 { Version::V2 } else { Version::V1 })
    }

    /// As [`Layout::detect`], preferring `version` when both are mounted.
    pub fn detect_preferring(version: Version) -> Result<Layout> {
        let path = Path::new("/proc/self/mountinfo");
        let text = fs::read_to_string(path).map_err(|source| Error::Read {
            path: path.into(),
            source,
        })?;
        Self::from_mountinfo(&text, version == Version::V2).ok_or(Error::NotMounted)
    }

    fn from_mountinfo(text: &str, want_v2: bool) -> Option<Layout> {
        let mut v1: Vec<Hierarchy> = Vec::new();
        let mut v2: Option<PathBuf> = None;
        for line in text.lines() {
            // Fields: id parent major:minor root mountpoint options [optional...] - fstype source superoptions
            let Some((left, right)) = line.split_once(" - ") else {
                continue;
            };
            let left: Vec<&str> = left.split(' ').collect();
            let right: Vec<&str> = right.split(' ').collect();
            if left.len() < 5 || right.len() < 3 {
                continue;
            }
            let mountpoint = PathBuf::from(unescape_mount_path(left[4]));
            match right[0] {
                "cgroup" => {
                    for opt in right[2].split(',') {
                        if let Some(c) = V1_CONTROLLERS.iter().find(|c| **c == opt)
                            && !v1.iter().any(|h| h.controller == Some(*c))
                        {
                            v1.push(Hierarchy {
                                mount: mountpoint.clone(),
                                controller: Some(*c),
                            });
                        }
                    }
                }
                "cgroup2" if v2.is_none() => v2 = Some(mountpoint),
                _ => {}
            }
        }
        if !want_v2 && v1.iter().any(|h| h.controller == Some("freezer")) {
            v1.sort_by_key(|h| V1_CONTROLLERS.iter().position(|c| Some(*c) == h.controller));
            return Some(Layout {
                version: Version::V1,
                hierarchies: v1,
            });
        }
        v2.map(|mount| Layout {
            version: Version::V2,
            hierarchies: vec![Hierarchy {
                mount,
                controller: None,
            }],
        })
    }

    pub fn version(&self) -> Version {
        self.version
    }

    /// The group of `pid` in each hierarchy, as absolute directories.
    pub fn group_of(&self, pid: Pid) -> Result<Cgroup> {
        let path = PathBuf::from(format!("/proc/{pid}/cgroup"));
        let text = fs::read_to_string(&path).map_err(|source| Error::Read { path, source })?;
        let mut dirs = Vec::new();
        for h in &self.hierarchies {
            let rel = membership(&text, h.controller).ok_or_else(|| Error::NoMembership {
                controller: h.controller.unwrap_or("unified").to_string(),
            })?;
            dirs.push(h.mount.join(rel.trim_start_matches('/')));
        }
        Ok(Cgroup {
            version: self.version,
            dirs,
        })
    }

    /// Creates (or reuses) the group `suffix` below this process's own group
    /// in every hierarchy.
    pub fn create_below_self(&self, suffix: &Path) -> Result<Cgroup> {
        let own = self.group_of(Pid::this())?;
        let cg = own.child(suffix);
        cg.create()?;
        Ok(cg)
    }
}

/// The path of this process in the hierarchy carrying `controller` (or the
/// unified one when `None`), from the text of /proc/PID/cgroup.
fn membership(text: &str, controller: Option<&str>) -> Option<String> {
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(id), Some(ctrls), Some(path)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        match controller {
            None if id == "0" && ctrls.is_empty() => return Some(path.to_string()),
            Some(c) if ctrls.split(',').any(|x| x == c) => return Some(path.to_string()),
            _ => {}
        }
    }
    None
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape_mount_path(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 4 <= bytes.len()
            && let Ok(v) = u8::from_str_radix(&s[i + 1..i + 4], 8)
        {
            out.push(v);
            i += 4;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// One control group: the same relative place in each hierarchy rrc uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cgroup {
    version: Version,
    /// Absolute directories, the freezing/listing hierarchy first.
    dirs: Vec<PathBuf>,
}

impl Cgroup {
    /// Rebuilds a handle from directories saved earlier (see [`Cgroup::dirs`]).
    pub fn from_dirs(version: Version, dirs: Vec<PathBuf>) -> Cgroup {
        Cgroup { version, dirs }
    }

    pub fn version(&self) -> Version {
        self.version
    }

    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    /// The directory that lists and freezes processes.
    pub fn main_dir(&self) -> &Path {
        &self.dirs[0]
    }

    pub fn child(&self, suffix: &Path) -> Cgroup {
        Cgroup {
            version: self.version,
            dirs: self.dirs.iter().map(|d| d.join(suffix)).collect(),
        }
    }

    pub fn exists(&self) -> bool {
        self.main_dir().is_dir()
    }

    pub fn create(&self) -> Result<()> {
        for d in &self.dirs {
            fs::create_dir_all(d).map_err(|source| Error::Create {
                path: d.clone(),
                source,
            })?;
        }
        Ok(())
    }

    /// Moves `pid` (a whole process) into this group in every hierarchy.
    pub fn add_process(&self, pid: Pid) -> Result<()> {
        for d in &self.dirs {
            write_file(&d.join("cgroup.procs"), &pid.to_string())?;
        }
        Ok(())
    }

    /// Every process in this group and its descendants.
    pub fn processes(&self) -> Result<Vec<Pid>> {
        let mut out = Vec::new();
        if self.exists() {
            collect_procs(self.main_dir(), &mut out)?;
        }
        out.sort();
        out.dedup();
        Ok(out)
    }

    pub fn is_empty(&self) -> Result<bool> {
        Ok(self.processes()?.is_empty())
    }

    /// Stops every process of the group (and descendants) and returns once
    /// the kernel reports them all frozen.
    pub fn freeze(&self, timeout: Duration) -> Result<()> {
        match self.version {
            Version::V1 => {
                let f = self.main_dir().join("freezer.state");
                write_file(&f, "FROZEN")?;
                wait_for(&f, timeout, "FROZEN", |s| s.trim() == "FROZEN")
            }
            Version::V2 => {
                write_file(&self.main_dir().join("cgroup.freeze"), "1")?;
                let ev = self.main_dir().join("cgroup.events");
                wait_for(&ev, timeout, "frozen", |s| {
                    s.lines().any(|l| l == "frozen 1")
                })
            }
        }
    }

    pub fn thaw(&self) -> Result<()> {
        match self.version {
            Version::V1 => write_file(&self.main_dir().join("freezer.state"), "THAWED"),
            Version::V2 => write_file(&self.main_dir().join("cgroup.freeze"), "0"),
        }
    }

    pub fn is_frozen(&self) -> Result<bool> {
        match self.version {
            Version::V1 => {
                Ok(read_file(&self.main_dir().join("freezer.state"))?.trim() == "FROZEN")
            }
            Version::V2 => Ok(read_file(&self.main_dir().join("cgroup.events"))?
                .lines()
                .any(|l| l == "frozen 1")),
        }
    }

    /// Kills every process of the group and its descendants at once, as a
    /// power cut would: frozen first so none can react, fork or exit cleanly.
    pub fn kill_all(&self, timeout: Duration) -> Result<()> {
        if !self.exists() {
            return Ok(());
        }
        match self.version {
            Version::V2 if self.main_dir().join("cgroup.kill").exists() => {
                write_file(&self.main_dir().join("cgroup.kill"), "1")?;
                // A group frozen by the caller stays frozen otherwise; killed
                // tasks leave it either way, but new ones must not stay stuck.
                self.thaw()?;
            }
            _ => {
                // Frozen first, so that all die at once and none forks
                // meanwhile. A group that does not freeze soon (a task
                // stopped under ptrace by a tracer that froze first can
                // hold it in FREEZING) is killed as it is, over and over
                // below until it is empty.
                if let Err(e) = self.freeze(timeout.min(FREEZE_BEFORE_KILL)) {
                    tracing::warn!(error = %e, "killing the cgroup's tasks without freezing it first");
                }
                for pid in self.processes()? {
                    // ESRCH: it died on its own meanwhile, which is what we want.
                    let _ = kill(pid, Signal::SIGKILL);
                }
                self.thaw()?;
            }
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = self.processes()?;
            if left.is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(Error::Timeout {
                    path: self.main_dir().into(),
                    state: "empty",
                    timeout,
                });
            }
            // A process forked between our listing and the freeze (v2 kill
            // races nothing, v1 re-lists) gets its signal here.
            for pid in left {
                let _ = kill(pid, Signal::SIGKILL);
            }
            thread::sleep(Duration::from_millis(5));
        }
    }

    /// Removes the group and its descendants. The group must be empty (see
    /// [`Cgroup::kill_all`]); exiting processes may keep it busy briefly.
    pub fn remove(&self, timeout: Duration) -> Result<()> {
        for d in &self.dirs {
            remove_tree(d, Instant::now() + timeout)?;
        }
        Ok(())
    }
}

fn collect_procs(dir: &Path, out: &mut Vec<Pid>) -> Result<()> {
    let procs = dir.join("cgroup.procs");
    match fs::read_to_string(&procs) {
        Ok(text) => out.extend(
            text.lines()
                .filter_map(|l| l.trim().parse::<i32>().ok())
                .map(Pid::from_raw),
        ),
        // The group vanished while we walked: nothing in it.
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(Error::Read {
                path: procs,
                source,
            });
        }
    }
    for sub in subdirs(dir)? {
        collect_procs(&sub, out)?;
    }
    Ok(())
}

fn subdirs(dir: &Path) -> Result<Vec<PathBuf>> {
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(Error::Read {
                path: dir.into(),
                source,
            });
        }
    };
    Ok(rd
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
        .map(|e| e.path())
        .collect())
}

fn remove_tree(dir: &Path, deadline: Instant) -> Result<()> {
    for sub in subdirs(dir)? {
        remove_tree(&sub, deadline)?;
    }
    loop {
        match fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            // Tasks that were just killed leave the group a moment later.
            Err(e) if e.raw_os_error() == Some(libc_ebusy()) && Instant::now() < deadline => {
                thread::sleep(Duration::from_millis(5));
            }
            Err(source) => {
                return Err(Error::Remove {
                    path: dir.into(),
                    source,
                });
            }
        }
    }
}

fn libc_ebusy() -> i32 {
    nix::errno::Errno::EBUSY as i32
}

fn read_file(path: &Path) -> Result<String> {
    fs::read_to_string(path).map_err(|source| Error::Read {
        path: path.into(),
        source,
    })
}

fn write_file(path: &Path, value: &str) -> Result<()> {
    fs::write(path, value).map_err(|source| Error::Write {
        path: path.into(),
        source,
    })
}

fn wait_for(
    path: &Path,
    timeout: Duration,
    state: &'static str,
    done: impl Fn(&str) -> bool,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_micros(50);
    loop {
        if done(&read_file(path)?) {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(Error::Timeout {
                path: path.into(),
                state,
                timeout,
            });
        }
        thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(5));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
25 1 0:22 / /sys/fs/cgroup rw - tmpfs tmpfs rw,mode=755
26 25 0:23 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu
27 25 0:24 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory
28 25 0:25 / /sys/fs/cgroup/freezer rw - cgroup cgroup rw,freezer
29 25 0:26 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw
";

    #[test]
    fn prefers_v1_freezer_and_orders_it_first() {
        let l = Layout::from_mountinfo(HYBRID, false).unwrap();
        assert_eq!(l.version, Version::V1);
        assert_eq!(l.hierarchies[0].controller, Some("freezer"));
        assert_eq!(l.hierarchies[1].controller, Some("memory"));
        assert_eq!(l.hierarchies.len(), 2);
    }

    #[test]
    fn falls_back_to_v2() {
        let l = Layout::from_mountinfo(
            "29 25 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n",
            false,
        )
        .unwrap();
        assert_eq!(l.version, Version::V2);
        assert_eq!(l.hierarchies[0].mount, Path::new("/sys/fs/cgroup"));
        let l = Layout::from_mountinfo(HYBRID, true).unwrap();
        assert_eq!(l.version, Version::V2);
        assert_eq!(l.hierarchies[0].mount, Path::new("/sys/fs/cgroup/unified"));
    }

    #[test]
    fn nothing_mounted() {
        assert!(Layout::from_mountinfo("1 0 0:1 / / rw - ext4 /dev/vda rw\n", false).is_none());
    }

    #[test]
    fn membership_lines() {
        let text = "6:freezer:/a/b\n4:memory:/m\n1:cpu,cpuacct:/c\n0::/u\n";
        assert_eq!(membership(text, Some("freezer")).unwrap(), "/a/b");
        assert_eq!(membership(text, Some("cpuacct")).unwrap(), "/c");
        assert_eq!(membership(text, None).unwrap(), "/u");
        assert!(membership(text, Some("pids")).is_none());
    }

    #[test]
    fn unescapes_octal() {
        assert_eq!(unescape_mount_path(r"/a\040b"), "/a b");
        assert_eq!(unescape_mount_path("/plain"), "/plain");
    }
}
