//! What a lab is made of, kept in `/run/rrc/labs/<name>.json`, and the lock
//! that serialises changes to one lab.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use ipnet::Ipv4Net;
use nix::fcntl::{Flock, FlockArg};
use rrc_container::state::{CgroupRecord, STATE_ROOT};
use serde::{Deserialize, Serialize};

use crate::plan::{Host, LabName, LabPlan};
use crate::{Error, Result};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostRecord {
    pub name: String,
    pub netns: String,
    pub lan_addr: Ipv4Net,
    pub repl_addr: Option<Ipv4Net>,
    /// Everything started on the host lives below this group.
    pub cgroup: CgroupRecord,
    /// Killed by `rrc lab kill` and not yet revived.
    pub down: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LabRecord {
    pub plan: LabPlan,
    pub cgroup: CgroupRecord,
    pub hosts: Vec<HostRecord>,
    pub created_unix: u64,
    /// The arbiter hosts run an etcd cluster (`rrc lab up --arbiter`).
    #[serde(default)]
    pub arbiter: bool,
    /// Pairs of hosts cut from each other (`rrc lab cut`), by name.
    #[serde(default)]
    pub cuts: Vec<(String, String)>,
}

impl LabRecord {
    /// Adds a record for every host of the plan it lacks (a lab made by an
    /// older rrc has no arbiter hosts): each is then built by `up`, and
    /// `host` never misses.
    pub fn complete(&mut self) {
        let lab_cg = self.cgroup.to_cgroup();
        for h in Host::ALL {
            if !self.hosts.iter().any(|r| r.name == h.name()) {
                self.hosts.push(HostRecord {
                    name: h.name().into(),
                    netns: self.plan.netns(h),
                    lan_addr: self.plan.lan_addr(h),
                    repl_addr: self.plan.repl_addr(h),
                    cgroup: CgroupRecord::from_cgroup(&lab_cg.child(Path::new(h.name()))),
                    down: false,
                });
            }
        }
    }

    pub fn host(&self, h: Host) -> &HostRecord {
        self.hosts
            .iter()
            .find(|r| r.name == h.name())
            .expect("every lab records all its hosts")
    }

    pub fn host_mut(&mut self, h: Host) -> &mut HostRecord {
        self.hosts
            .iter_mut()
            .find(|r| r.name == h.name())
            .expect("every lab records all its hosts")
    }
}

pub fn labs_dir() -> PathBuf {
    Path::new(STATE_ROOT).join("labs")
}

fn record_path(name: &LabName) -> PathBuf {
    labs_dir().join(format!("{name}.json"))
}

fn state_err(path: &Path) -> impl FnOnce(io::Error) -> Error + '_ {
    move |source| Error::State {
        path: path.into(),
        source,
    }
}

pub fn load(name: &LabName) -> Result<Option<LabRecord>> {
    let path = record_path(name);
    match fs::read(&path) {
        Ok(bytes) => serde_json::from_slice::<LabRecord>(&bytes)
            .map(|mut r| {
                r.complete();
                Some(r)
            })
            .map_err(|source| Error::CorruptState { path, source }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(state_err(&path)(e)),
    }
}

pub fn save(rec: &LabRecord) -> Result<()> {
    let path = record_path(&rec.plan.name);
    let tmp = path.with_extension("json.tmp");
    let bytes = serde_json::to_vec_pretty(rec).expect("records serialize");
    let write = || -> io::Result<()> {
        let mut f = File::create(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, &path)
    };
    write().map_err(state_err(&path))
}

pub fn remove(name: &LabName) -> Result<()> {
    let path = record_path(name);
    match fs::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(state_err(&path)(e)),
    }
}

/// Every lab recorded on this machine.
pub fn list() -> Result<Vec<LabRecord>> {
    let dir = labs_dir();
    let rd = match fs::read_dir(&dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(state_err(&dir)(e)),
    };
    let mut out = Vec::new();
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(stem) = name.strip_suffix(".json")
            && let Ok(n) = stem.parse::<LabName>()
            && let Some(r) = load(&n)?
        {
            out.push(r);
        }
    }
    out.sort_by(|a, b| a.plan.name.as_str().cmp(b.plan.name.as_str()));
    Ok(out)
}

/// Held while a command changes a lab, so that two `up`s, or a `kill` and a
/// `down`, never interleave.
pub struct LabLock {
    _lock: Flock<File>,
}

pub fn lock(name: &LabName) -> Result<LabLock> {
    let dir = labs_dir();
    fs::create_dir_all(&dir).map_err(state_err(&dir))?;
    let path = dir.join(format!("{name}.lock"));
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(state_err(&path))?;
    let lock = Flock::lock(f, FlockArg::LockExclusive)
        .map_err(|(_, e)| state_err(&path)(io::Error::from(e)))?;
    Ok(LabLock { _lock: lock })
}
