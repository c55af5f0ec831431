//! The per-host state directory: one subdirectory per container holding
//! `state.json`, written atomically as the container comes to life.
//!
//! A "host" is a network namespace: the machine's own, or a lab host's named
//! namespace. Containers on different hosts may share a name, as a primary's
//! container and its replica on the backup do.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rrc_cgroup::{Cgroup, Version};
use serde::{Deserialize, Serialize};

use crate::proc::ProcRef;
use crate::spec::{ContainerName, NetSpec};
use crate::{Error, Result};

/// Whether `file` was last written before the machine booted.
fn written_before_boot(file: &Path) -> bool {
    let boot = fs::read_to_string("/proc/stat").ok().and_then(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("btime "))
            .and_then(|n| n.trim().parse::<u64>().ok())
    });
    let modified = fs::metadata(file)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok());
    matches!((boot, modified), (Some(boot), Some(m)) if m.as_secs() < boot)
}

/// The root of all rrc state on this machine.
pub const STATE_ROOT: &str = "/run/rrc";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    Starting,
    Running,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CgroupRecord {
    pub version: String,
    pub dirs: Vec<PathBuf>,
}

impl CgroupRecord {
    pub fn from_cgroup(cg: &Cgroup) -> CgroupRecord {
        CgroupRecord {
            version: cg.version().to_string(),
            dirs: cg.dirs().to_vec(),
        }
    }

    pub fn to_cgroup(&self) -> Cgroup {
        let v = if self.version == "v2" {
            Version::V2
        } else {
            Version::V1
        };
        Cgroup::from_dirs(v, self.dirs.clone())
    }
}

/// What `rrc ps` shows and `rrc stop` acts on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerRecord {
    pub name: ContainerName,
    pub phase: Phase,
    /// The rrc process holding the TAP and supervising the container.
    pub supervisor: ProcRef,
    /// The container's first process (pid 1 inside), as seen from the host.
    pub init: Option<ProcRef>,
    pub cgroup: Option<CgroupRecord>,
    pub net: Option<NetSpec>,
    /// Device and inode of the container's network namespace, to prove it
    /// gone after a stop.
    pub netns: Option<(u64, u64)>,
    pub argv: Vec<String>,
    pub created_unix: u64,
    /// Where the program's output goes when rrc runs detached.
    pub log: Option<PathBuf>,
    /// What the container sees as `/`.
    #[serde(default)]
    pub root: crate::rootfs::RootFs,
    /// Host directories shared into its root.
    #[serde(default)]
    pub share: Vec<PathBuf>,
    /// Its program never has a Linux AIO request in flight when it is
    /// checkpointed: its AIO contexts are saved, not refused.
    #[serde(default)]
    pub aio_idle: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Starting,
    Running,
    /// Its rrc process died without cleaning up.
    Stale,
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(match self {
            Status::Starting => "starting",
            Status::Running => "running",
            Status::Stale => "stale",
        })
    }
}

impl ContainerRecord {
    pub fn new(name: ContainerName, argv: Vec<String>) -> ContainerRecord {
        ContainerRecord {
            name,
            phase: Phase::Starting,
            supervisor: ProcRef::this(),
            init: None,
            cgroup: None,
            net: None,
            netns: None,
            argv,
            created_unix: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            log: None,
            root: crate::rootfs::RootFs::Host,
            share: Vec::new(),
            aio_idle: false,
        }
    }

    pub fn status(&self) -> Status {
        if !self.supervisor.is_alive() {
            Status::Stale
        } else if self.phase == Phase::Starting {
            Status::Starting
        } else {
            Status::Running
        }
    }
}

/// The state directory of one host.
#[derive(Debug, Clone)]
pub struct HostState {
    dir: PathBuf,
    host: String,
}

/// How long a claimed directory may lack its state file before it counts as
/// abandoned (its creator died between mkdir and the first write).
const CLAIM_GRACE: Duration = Duration::from_secs(30);

impl HostState {
    /// The state of the host this process runs on: `$RRC_STATE_DIR` if set,
    /// else a directory named after the current network namespace.
    pub fn current() -> HostState {
        let host = rrc_net::netns::current_name().unwrap_or_else(|| "default".into());
        if let Some(dir) = std::env::var_os("RRC_STATE_DIR") {
            return HostState {
                dir: dir.into(),
                host,
            };
        }
        Self::for_host(&host)
    }

    pub fn for_host(host: &str) -> HostState {
        HostState {
            dir: Path::new(STATE_ROOT).join("hosts").join(host),
            host: host.into(),
        }
    }

    pub fn host(&self) -> &str {
        &self.host
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn containers(&self) -> PathBuf {
        self.dir.join("containers")
    }

    fn container_dir(&self, name: &ContainerName) -> PathBuf {
        self.containers().join(name.as_str())
    }

    /// The control socket of container `name`'s rrc process: in the
    /// container's state directory, which only root can enter.
    pub(crate) fn control_path(&self, name: &ContainerName) -> PathBuf {
        self.container_dir(name).join("control.sock")
    }

    pub fn log_path(&self, name: &ContainerName) -> PathBuf {
        self.dir.join("logs").join(format!("{name}.log"))
    }

    fn state_err(path: &Path) -> impl FnOnce(io::Error) -> Error + '_ {
        move |source| Error::State {
            path: path.into(),
            source,
        }
    }

    /// Reserves `name` for the calling process. A name held by a dead rrc
    /// process is reclaimed after its leftovers are cleaned up.
    pub fn claim(&self, record: &ContainerRecord) -> Result<Claim> {
        let parent = self.containers();
        fs::create_dir_all(&parent).map_err(Self::state_err(&parent))?;
        let dir = self.container_dir(&record.name);
        for _ in 0..3 {
            match fs::create_dir(&dir) {
                Ok(()) => {
                    // Its control socket lives here: nobody but root may
                    // reach it or put anything in its place.
                    fs::set_permissions(&dir, fs::Permissions::from_mode(0o700))
                        .map_err(Self::state_err(&dir))?;
                    let claim = Claim {
                        dir: dir.clone(),
                        done: false,
                    };
                    claim.save(record)?;
                    return Ok(claim);
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    match self.inspect(&dir)? {
                        Some((rec, Status::Stale)) => {
                            tracing::warn!(
                                container = %rec.name,
                                pid = rec.supervisor.pid,
                                "cleaning up after a container whose rrc process died"
                            );
                            self.clean_stale(&rec)?;
                        }
                        Some((rec, _)) => {
                            return Err(Error::NameInUse {
                                name: rec.name.to_string(),
                                pid: rec.supervisor.pid,
                            });
                        }
                        None => {
                            // Claimed a moment ago, state not yet written.
                            return Err(Error::NameInUse {
                                name: record.name.to_string(),
                                pid: 0,
                            });
                        }
                    }
                }
                Err(e) => return Err(Self::state_err(&dir)(e)),
            }
        }
        Err(Error::NameInUse {
            name: record.name.to_string(),
            pid: 0,
        })
    }

    /// The record in `dir` and its status; `None` while it is being created.
    fn inspect(&self, dir: &Path) -> Result<Option<(ContainerRecord, Status)>> {
        let file = dir.join("state.json");
        match fs::read(&file) {
            Ok(bytes) => {
                let rec: ContainerRecord = match serde_json::from_slice(&bytes) {
                    Ok(rec) => rec,
                    // Written before this boot (records are not synced):
                    // whatever it described is gone.
                    Err(_) if written_before_boot(&file) => {
                        let _ = fs::remove_dir_all(dir);
                        return Ok(None);
                    }
                    Err(source) => {
                        return Err(Error::CorruptState {
                            path: file.clone(),
                            source,
                        });
                    }
                };
                let st = rec.status();
                Ok(Some((rec, st)))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let age = fs::metadata(dir)
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .unwrap_or_default();
                if age > CLAIM_GRACE {
                    // Abandoned before its first write: nothing else to clean.
                    let _ = fs::remove_dir_all(dir);
                }
                Ok(None)
            }
            Err(e) => Err(Self::state_err(&file)(e)),
        }
    }

    pub fn load(&self, name: &ContainerName) -> Result<Option<(ContainerRecord, Status)>> {
        let dir = self.container_dir(name);
        if !dir.exists() {
            return Ok(None);
        }
        self.inspect(&dir)
    }

    /// Every container recorded on this host, by name.
    pub fn list(&self) -> Result<Vec<(ContainerRecord, Status)>> {
        let parent = self.containers();
        let rd = match fs::read_dir(&parent) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(Self::state_err(&parent)(e)),
        };
        let mut out = Vec::new();
        for entry in rd.flatten() {
            if let Some(found) = self.inspect(&entry.path())? {
                out.push(found);
            }
        }
        out.sort_by(|a, b| a.0.name.as_str().cmp(b.0.name.as_str()));
        Ok(out)
    }

    /// Removes what a dead rrc process left: the container's processes (if
    /// any survived), its cgroup and its state directory. The TAP device and
    /// namespaces vanish with the processes that held them.
    pub fn clean_stale(&self, rec: &ContainerRecord) -> Result<()> {
        if let Some(init) = rec.init.filter(|p| p.is_alive()) {
            let _ = nix::sys::signal::kill(init.nix_pid(), nix::sys::signal::Signal::SIGKILL);
        }
        if let Some(cg) = &rec.cgroup {
            let cg = cg.to_cgroup();
            cg.kill_all(Duration::from_secs(5))?;
            cg.remove(Duration::from_secs(5))?;
        }
        self.remove(&rec.name)
    }

    /// Forgets a container (its processes must already be gone).
    pub fn remove(&self, name: &ContainerName) -> Result<()> {
        let dir = self.container_dir(name);
        match fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Self::state_err(&dir)(e)),
        }
    }
}

/// A container name held by this process, with the state directory behind it.
#[derive(Debug)]
pub struct Claim {
    dir: PathBuf,
    done: bool,
}

impl Claim {
    /// Replaces the state file atomically: readers see the old or the new
    /// record, never half of one.
    pub fn save(&self, record: &ContainerRecord) -> Result<()> {
        let file = self.dir.join("state.json");
        let tmp = self.dir.join(".state.json.tmp");
        let bytes = serde_json::to_vec_pretty(record).expect("records serialize");
        let write = || -> io::Result<()> {
            // No fsync: a record describes live processes, which a crash of
            // the host ends with it (a record from before the boot is
            // dropped, readable or not: `inspect`), and the rename alone
            // shows readers a whole record. An fsync here waited up to
            // 15 ms for the journal in a takeover's restore, just after
            // the backup wrote its log.
            let mut f = fs::File::create(&tmp)?;
            f.write_all(&bytes)?;
            fs::rename(&tmp, &file)
        };
        write().map_err(|source| Error::State { path: file, source })
    }

    /// Gives the name back, removing the state directory.
    pub fn release(mut self) -> Result<()> {
        self.done = true;
        match fs::remove_dir_all(&self.dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(Error::State {
                path: self.dir.clone(),
                source,
            }),
        }
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        // An error path that forgot to release must not leave the name taken.
        if !self.done {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp_host(tag: &str) -> HostState {
        let dir = std::env::temp_dir().join(format!("rrc-state-test-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        HostState {
            dir,
            host: "test".into(),
        }
    }

    #[test]
    fn claim_list_release() {
        let h = tmp_host("claim");
        let name: ContainerName = "web".parse().unwrap();
        let mut rec = ContainerRecord::new(name.clone(), vec!["x".into()]);
        let claim = h.claim(&rec).unwrap();
        rec.phase = Phase::Running;
        claim.save(&rec).unwrap();
        let listed = h.list().unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].1, Status::Running);
        assert!(matches!(h.claim(&rec), Err(Error::NameInUse { .. })));
        claim.release().unwrap();
        assert!(h.list().unwrap().is_empty());
        let _ = fs::remove_dir_all(h.dir());
    }

    #[test]
    fn stale_claim_is_reclaimed() {
        let h = tmp_host("stale");
        let name: ContainerName = "db".parse().unwrap();
        let mut dead = ContainerRecord::new(name.clone(), vec![]);
        dead.supervisor.start_time += 1; // a process that no longer exists
        let c = h.claim(&dead).unwrap();
        std::mem::forget(c); // as if the process died holding it
        assert_eq!(h.load(&name).unwrap().unwrap().1, Status::Stale);
        let fresh = ContainerRecord::new(name.clone(), vec![]);
        let c = h.claim(&fresh).unwrap();
        assert_eq!(h.load(&name).unwrap().unwrap().1, Status::Starting);
        c.release().unwrap();
        let _ = fs::remove_dir_all(h.dir());
    }

    #[test]
    fn a_torn_record_from_before_the_boot_is_dropped_and_a_current_one_refused() {
        let h = tmp_host("torn");
        let name: ContainerName = "cache".parse().unwrap();
        let rec = ContainerRecord::new(name.clone(), vec![]);
        let c = h.claim(&rec).unwrap();
        std::mem::forget(c);
        let file = h.container_dir(&name).join("state.json");
        fs::write(&file, b"").unwrap();
        // Written now: a record some process is writing is not guessed at.
        assert!(matches!(h.load(&name), Err(Error::CorruptState { .. })));
        // Written before the boot: what it described is gone.
        fs::File::options()
            .write(true)
            .open(&file)
            .unwrap()
            .set_modified(UNIX_EPOCH + Duration::from_secs(1))
            .unwrap();
        assert!(h.load(&name).unwrap().is_none());
        assert!(!h.container_dir(&name).exists());
        let _ = fs::remove_dir_all(h.dir());
    }
}
