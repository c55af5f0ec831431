//! Recording a container's nondeterministic events (`rrc run --record`)
//! and reading recordings (`rrc log`).

use std::ffi::{OsStr, OsString};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use rrc_container::create::Container;
use rrc_container::supervise::Companion;
use rrc_rr::agent::{RecordStats, Recorder};
use rrc_rr::interface;
use rrc_rr::log::{LogReader, thread_log_ids};
use rrc_rr::ring::RingSet;

use rrc_container::launch::MakeCompanion;

/// What a recording notes for its replay, beside the thread logs.
const RECORDING_FILE: &str = "recording";
/// The recorded program's environment, as /proc shows it.
pub(super) const ENVIRON_FILE: &str = "environ";

/// The descriptor number the recording's rings had in the program.
pub(super) fn recorded_ring_fd(dir: &Path) -> Result<i32> {
    let path = dir.join(RECORDING_FILE);
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "reading {} (is {} a recording made by `rrc run --record`?)",
            path.display(),
            dir.display()
        )
    })?;
    text.lines()
        .find_map(|l| l.strip_prefix("ring_fd="))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("{} names no ring_fd", path.display()))
}

/// Threads that can record at once, and each one's ring.
const SLOTS: usize = 256;
const RING_BYTES: u64 = 1 << 20;

/// Where librrc is: `$RRC_LIBRRC`, or next to the rrc executable (where
/// cargo builds both).
fn librrc() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("RRC_LIBRRC") {
        let p = PathBuf::from(p);
        if !p.is_file() {
            bail!("RRC_LIBRRC names {}, which is not a file", p.display());
        }
        return Ok(p);
    }
    let exe = std::env::current_exe().context("cannot locate the rrc binary")?;
    let p = exe.with_file_name("librrc.so");
    if !p.is_file() {
        bail!(
            "librrc.so is not next to {} (build it with `cargo build -p librrc`, or set RRC_LIBRRC)",
            exe.display()
        );
    }
    Ok(p)
}

/// A recording about to start: the rings, the descriptor the program
/// inherits, the log directory.
pub struct Recording {
    set: RingSet,
    /// The set's descriptor as the program gets it (not close-on-exec).
    child_fd: OwnedFd,
    lib: PathBuf,
    dir: PathBuf,
    /// What the program's environment gets on top of rrc's.
    env: Vec<(OsString, OsString)>,
}

/// Whether `program` is loaded by the dynamic linker (has a PT_INTERP
/// program header): only then does LD_PRELOAD reach it.
pub(super) fn dynamically_linked(program: &Path) -> Result<bool> {
    let data = std::fs::read(program).with_context(|| format!("reading {}", program.display()))?;
    let u16_at = |o: usize| data.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u32_at = |o: usize| {
        data.get(o..o + 4)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap()))
    };
    let u64_at = |o: usize| {
        data.get(o..o + 8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap()))
    };
    // A script (#!) runs an interpreter, which is checked when it starts.
    if data.starts_with(b"#!") {
        return Ok(true);
    }
    // ELF, 64-bit, little-endian: what this machine runs.
    if !data.starts_with(b"\x7fELF") || data.get(4) != Some(&2) || data.get(5) != Some(&1) {
        bail!("{} is not a 64-bit ELF program", program.display());
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38))
    else {
        bail!("{} is a truncated ELF file", program.display());
    };
    const PT_INTERP: u32 = 3;
    Ok((0..usize::from(phnum))
        .any(|i| u32_at(phoff as usize + i * usize::from(phentsize)) == Some(PT_INTERP)))
}

impl Recording {
    /// Checks that `program` can be recorded and prepares the rings and
    /// the log directory `dir`.
    pub fn prepare(dir: &Path, program: &Path) -> Result<Recording> {
        if !dynamically_linked(program)? {
            bail!(
                "{} is statically linked: librrc cannot be preloaded into it, so it cannot be recorded",
                program.display()
            );
        }
        if dir.exists()
            && std::fs::read_dir(dir)
                .with_context(|| format!("reading {}", dir.display()))?
                .next()
                .is_some()
        {
            bail!(
                "{} is not empty: a recording goes into a new directory",
                dir.display()
            );
        }
        let lib = librrc()?;
        let set = RingSet::create(SLOTS, RING_BYTES).context("creating the recording's rings")?;
        // dup gives a descriptor without close-on-exec: the program keeps it.
        let child_fd = nix::unistd::dup(set.fd()).context("passing the rings on")?;
        let mut r = Recording {
            set,
            child_fd,
            lib,
            dir: dir.to_path_buf(),
            env: Vec::new(),
        };
        r.env = r.overrides();
        Ok(r)
    }

    /// What the program's environment needs for librrc to record it.
    pub fn environment(&self) -> Vec<(OsString, OsString)> {
        self.env.clone()
    }

    fn overrides(&self) -> Vec<(OsString, OsString)> {
        let mut preload = OsString::from(self.lib.as_os_str());
        if let Some(old) = std::env::var_os("LD_PRELOAD").filter(|o| !o.is_empty()) {
            preload.push(":");
            preload.push(old);
        }
        vec![
            ("LD_PRELOAD".into(), preload),
            (
                OsStr::from_bytes(interface::FD_ENV.to_bytes()).into(),
                interface::fd_env_value(self.child_fd.as_raw_fd()).into(),
            ),
        ]
    }

    /// Drains the rings beside the container once it runs.
    pub fn companion(self) -> MakeCompanion<'static> {
        Box::new(move |_c: &Container| self.start().map_err(|e| format!("{e:#}").into()))
    }

    fn start(self) -> Result<Box<dyn Companion>> {
        {
            // A replay gives the program the same descriptor numbers: it
            // must know which one the rings had.
            std::fs::create_dir_all(&self.dir)
                .with_context(|| format!("creating {}", self.dir.display()))?;
            std::fs::write(
                self.dir.join(RECORDING_FILE),
                format!("ring_fd={}\n", self.child_fd.as_raw_fd()),
            )
            .with_context(|| format!("writing into {}", self.dir.display()))?;
            // Its environment exactly, in order (the one the container
            // gave it): a replay gives it the same, since some programs
            // copy it into their heap at start.
            let mut environ = Vec::new();
            for v in rrc_container::create::environment(&self.env)? {
                environ.extend_from_slice(v.as_bytes_with_nul());
            }
            std::fs::write(self.dir.join(ENVIRON_FILE), environ)
                .with_context(|| format!("writing into {}", self.dir.display()))?;
            // The program has its copy now.
            drop(self.child_fd);
            // A second view of the set, for librrc's count of what went
            // unrecorded once the drain has the set.
            let watch = nix::unistd::dup(self.set.fd())
                .map_err(anyhow::Error::from)
                .and_then(|fd| Ok(RingSet::from_fd(fd)?))
                .context("mapping the recording's rings")?;
            let recorder = Recorder::start(self.set, &self.dir)
                .with_context(|| format!("recording into {}", self.dir.display()))?;
            Ok(Box::new(Drain {
                recorder: Some(recorder),
                watch,
                dir: self.dir,
            }))
        }
    }
}

struct Drain {
    recorder: Option<Recorder>,
    watch: RingSet,
    dir: PathBuf,
}

impl Companion for Drain {
    fn next_wake(&self) -> Option<std::time::Instant> {
        None
    }

    fn wake_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        None
    }

    fn on_wake(&mut self, _c: &mut Container) {}

    fn on_stop(&mut self, _c: &mut Container) {
        let Some(r) = self.recorder.take() else {
            return;
        };
        match r.finish() {
            Ok(s) if s.records == 0 => eprintln!(
                "rrc: nothing was recorded into {}: the program made none of the recorded calls through the C library",
                self.dir.display()
            ),
            Ok(s) => eprintln!("rrc: {}", summary(&s, self.watch.unrecorded(), &self.dir)),
            Err(e) => eprintln!(
                "rrc: the recording in {} is incomplete: {e}",
                self.dir.display()
            ),
        }
    }
}

fn summary(s: &RecordStats, unrecorded: u32, dir: &Path) -> String {
    let kinds: Vec<String> = s.per_kind.iter().map(|(k, n)| format!("{k} {n}")).collect();
    let mut out = format!(
        "recorded {} events of {} thread(s) in {} batches ({:.1} KiB) into {}: {}",
        s.records,
        s.per_thread.len(),
        s.batches,
        s.bytes as f64 / 1024.0,
        dir.display(),
        kinds.join(", ")
    );
    if s.refused_batches > 0 || !s.problems.is_empty() {
        out += &format!(
            "; WARNING: {} batch(es) dropped, the log has holes: {}",
            s.refused_batches,
            s.problems.join("; ")
        );
    }
    if s.forks_unrecorded > 0 {
        out += &format!(
            "; {} fork(s) whose child was not recorded: replay cannot go past them",
            s.forks_unrecorded
        );
    }
    if unrecorded > 0 {
        out += &format!(
            "; librrc left {unrecorded} thing(s) unrecorded (threads beyond the rings, events larger than a ring, children of fork): a replay stops where they were"
        );
    }
    out
}

/// Read recordings made with `rrc run --record DIR`.
#[derive(Debug, Subcommand)]
pub enum LogCommand {
    /// Print a recording's events, thread by thread, in their global order
    /// within each thread.
    Show {
        /// The log directory.
        dir: PathBuf,
        /// Only this thread log (1 is the program's first thread).
        #[arg(long)]
        thread: Option<u32>,
        /// At most this many events per thread.
        #[arg(long)]
        limit: Option<usize>,
    },
}

pub fn log(c: LogCommand) -> Result<i32> {
    match c {
        LogCommand::Show { dir, thread, limit } => {
            let ids = thread_log_ids(&dir).with_context(|| format!("reading {}", dir.display()))?;
            if ids.is_empty() {
                bail!("{} holds no thread logs", dir.display());
            }
            for id in ids.into_iter().filter(|id| thread.is_none_or(|t| t == *id)) {
                println!("thread {id}:");
                let mut r = LogReader::open(&dir, id)?;
                let mut n = 0;
                while let Some(rec) = r.next_record()? {
                    if limit.is_some_and(|l| n >= l) {
                        println!("  ...");
                        break;
                    }
                    println!(
                        "  #{:<8} +{:>9} ns  {:?}",
                        rec.seq, rec.time_delta_ns, rec.event
                    );
                    n += 1;
                }
            }
            Ok(0)
        }
    }
}
