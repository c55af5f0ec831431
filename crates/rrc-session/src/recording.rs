//! A program recorded through librrc.
//!
//! rrc makes the rings (one memfd shared with the program, a ring per
//! thread slot) before the program starts, passes their descriptor on
//! (not close-on-exec) and names it in the environment with `LD_PRELOAD`
//! pointing at librrc. Whoever drains the rings decides where the log
//! goes: a recording directory ([`Recording`], for `rrc run --record`) or
//! the backup (replication's log shipper, which takes [`Rings::leak`]).
//!
//! The recording directory holds one log file per thread, the descriptor
//! number the rings had (a replay puts its configuration there) and the
//! program's environment exactly (a replay from the start gives it the
//! same: some programs copy it into their heap). A checkpoint of a
//! recorded container saves only the rings' directory (their contents are
//! drained and of no use to a restore) and records the descriptor number
//! in its annotations.

use std::ffi::{CString, OsStr, OsString};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rrc_ckpt::dump::ShmemLimit;
use rrc_ckpt::edit::{ImageEdit, MemfdAt, WorkingCopy};
use rrc_container::ContainerName;
use rrc_container::create::Container;
use rrc_container::launch::{CompanionError, Launch, MakeCompanion};
use rrc_container::restore::RestoreSpec;
use rrc_container::supervise::Companion;
use rrc_rr::agent::{RecordStats, Recorder};
use rrc_rr::interface;
use rrc_rr::ring::{CopyMark, EAGER, RingSet};
use serde::{Deserialize, Serialize};

use crate::{Error, Result, io};

/// Threads that can record at once, and each one's ring.
const SLOTS: usize = 256;
const RING_BYTES: u64 = 1 << 20;

/// In a recording directory: what a replay needs beside the thread logs.
const RECORDING_FILE: &str = "recording";
/// In a recording directory: the recorded program's environment.
const ENVIRON_FILE: &str = "environ";

/// The annotation key under which a checkpoint of a recorded container
/// records [`RecordingAnnotation`].
pub const ANNOTATION: &str = "recording";

/// What a checkpoint of a recorded container says of the recording.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordingAnnotation {
    /// The descriptor the rings have in the program.
    pub ring_fd: i32,
}

impl RecordingAnnotation {
    /// The recording annotation of the image in `images`, if it has one.
    pub fn read(images: &Path) -> Result<Option<RecordingAnnotation>> {
        let m = rrc_ckpt::image::ImageDir::new(images).read_manifest()?;
        Ok(m.annotations
            .get(ANNOTATION)
            .and_then(|v| serde_json::from_value(v.clone()).ok()))
    }
}

/// Where librrc is: `$RRC_LIBRRC`, or next to the rrc executable (where
/// cargo builds both).
pub fn librrc() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("RRC_LIBRRC") {
        let p = PathBuf::from(p);
        if !p.is_file() {
            return Err(Error::NoLibrrc(format!(
                "RRC_LIBRRC names {}, which is not a file",
                p.display()
            )));
        }
        return Ok(p);
    }
    let exe = std::env::current_exe()
        .map_err(|e| Error::NoLibrrc(format!("cannot locate the rrc binary: {e}")))?;
    let p = exe.with_file_name("librrc.so");
    if !p.is_file() {
        return Err(Error::NoLibrrc(format!(
            "librrc.so is not next to {} (build it with `cargo build -p librrc`, or set RRC_LIBRRC)",
            exe.display()
        )));
    }
    Ok(p)
}

/// Checks that librrc can reach `program`: it must be loaded by the
/// dynamic linker (have a PT_INTERP program header), or be a script
/// (whose interpreter is checked when it starts).
pub fn check_recordable(program: &Path) -> Result<()> {
    let data = std::fs::read(program).map_err(io("reading", program))?;
    if data.starts_with(b"#!") {
        return Ok(());
    }
    let u16_at = |o: usize| data.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u32_at = |o: usize| {
        data.get(o..o + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let u64_at = |o: usize| {
        data.get(o..o + 8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
    };
    // ELF, 64-bit, little-endian: what this machine runs.
    if !data.starts_with(b"\x7fELF") || data.get(4) != Some(&2) || data.get(5) != Some(&1) {
        return Err(Error::NotElf(program.to_path_buf()));
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38))
    else {
        return Err(Error::NotElf(program.to_path_buf()));
    };
    const PT_INTERP: u32 = 3;
    let dynamic = (0..usize::from(phnum)).any(|i| {
        usize::try_from(phoff)
            .ok()
            .and_then(|o| o.checked_add(i * usize::from(phentsize)))
            .and_then(u32_at)
            == Some(PT_INTERP)
    });
    if !dynamic {
        return Err(Error::StaticProgram(program.to_path_buf()));
    }
    Ok(())
}

/// The rings a program about to start will record into, and what it needs
/// to find them.
pub struct Rings {
    set: RingSet,
    /// The set's descriptor as the program gets it (not close-on-exec),
    /// for a program about to start.
    child_fd: Option<OwnedFd>,
    /// The number the program has the rings at.
    ring_fd: i32,
    /// What the program's environment gets on top of rrc's.
    env: Vec<(OsString, OsString)>,
}

impl Rings {
    /// Rings for `program` (checked to be recordable). `eager`: librrc
    /// pushes every record at once instead of batching it (replication,
    /// where a reply may wait for any thread's records).
    pub fn create(program: &Path, eager: bool) -> Result<Rings> {
        check_recordable(program)?;
        let lib = librrc()?;
        let flags = if eager { EAGER } else { 0 };
        let set = RingSet::create_with(SLOTS, RING_BYTES, flags)?;
        // dup gives a descriptor without close-on-exec: the program keeps it.
        let child_fd = nix::unistd::dup(set.fd())
            .map_err(|e| io("passing the rings on", Path::new("memfd"))(std::io::Error::from(e)))?;
        let mut preload = OsString::from(lib.as_os_str());
        if let Some(old) = std::env::var_os("LD_PRELOAD").filter(|o| !o.is_empty()) {
            preload.push(":");
            preload.push(old);
        }
        let env = vec![
            ("LD_PRELOAD".into(), preload),
            (
                OsStr::from_bytes(interface::FD_ENV.to_bytes()).into(),
                interface::fd_env_value(child_fd.as_raw_fd()).into(),
            ),
        ];
        Ok(Rings {
            set,
            ring_fd: child_fd.as_raw_fd(),
            child_fd: Some(child_fd),
            env,
        })
    }

    /// Rings for a program restored from a checkpoint of its recording,
    /// which takes them (at `ring_fd`, the number its first rings had)
    /// when a takeover by replay goes live: from then on it is recorded
    /// for replication again. Always eager.
    pub fn for_restored(ring_fd: i32) -> Result<Rings> {
        Ok(Rings {
            set: RingSet::create_with(SLOTS, RING_BYTES, EAGER)?,
            child_fd: None,
            ring_fd,
            env: Vec::new(),
        })
    }

    /// What the program's environment needs for librrc to record it.
    pub fn environment(&self) -> Vec<(OsString, OsString)> {
        self.env.clone()
    }

    /// The descriptor the rings have in the program.
    pub fn child_fd(&self) -> i32 {
        self.ring_fd
    }

    /// What the container's launch needs for the recording: its
    /// checkpoints keep only the rings' directory (the counters a replay
    /// starts from), and say where the rings are.
    pub fn into_launch<'a>(&self, launch: Launch<'a>) -> Launch<'a> {
        let keep = self.set.directory_len() as u64;
        let limit = nix::sys::stat::fstat(self.set.fd()).map(|m| ShmemLimit {
            dev: m.st_dev,
            ino: m.st_ino,
            keep,
        });
        let launch = match limit {
            Ok(l) => launch.shmem_limit(l),
            Err(e) => {
                tracing::warn!(error = %e, "the rings will be saved whole by checkpoints");
                launch
            }
        };
        launch.annotation(
            ANNOTATION,
            serde_json::to_value(RecordingAnnotation {
                ring_fd: self.child_fd(),
            })
            .expect("annotations serialize"),
        )
    }

    /// The rings for as long as this process lives (they live as long as
    /// the recorded program, which this process supervises); the
    /// descriptor the program inherits is closed by the companion
    /// returned, once the program has it.
    pub fn leak(self) -> (&'static RingSet, MakeCompanion<'static>) {
        let set: &'static RingSet = Box::leak(Box::new(self.set));
        let fd = self.child_fd;
        let close = Box::new(move |_c: &Container| {
            drop(fd);
            Ok(Box::new(Done) as Box<dyn Companion>)
        });
        (set, close)
    }
}

/// A companion with nothing to do.
struct Done;

impl Companion for Done {
    fn on_stop(&mut self, _c: &mut Container) {}
    fn done(&self) -> bool {
        true
    }
}

/// The recorded program's rings in `edit` (an image of `images`): the
/// memfd at descriptor `ring_fd`, and the process that has it.
pub fn rings_at(edit: &ImageEdit, images: &Path, ring_fd: i32) -> Result<MemfdAt> {
    edit.memfd_at_fd(ring_fd).ok_or_else(|| Error::NoRings {
        images: images.to_path_buf(),
        fd: ring_fd,
    })
}

/// A working copy of `images` whose program, if it was recorded, stops
/// recording when restored and runs on (a restored copy's rings have
/// nobody draining them); `None` when the image is not of a recorded
/// program and can be restored as it is.
pub fn unrecorded_copy(images: &Path) -> Result<Option<WorkingCopy>> {
    let Some(a) = RecordingAnnotation::read(images)? else {
        return Ok(None);
    };
    let copy = WorkingCopy::of(images)?;
    let mut edit = ImageEdit::open(copy.path())?;
    let rings = rings_at(&edit, images, a.ring_fd)?;
    let page = edit.shmem_page_mut(rings.shmem_id, 0)?;
    rrc_rr::ring::mark_copy(page, CopyMark::Stop)?;
    edit.save()?;
    Ok(Some(copy))
}

/// How to restore the container checkpointed in `images` on this host
/// (see [`RestoreSpec::from_image`]) so that a recorded program in it
/// stops recording and runs on: from an [`unrecorded_copy`] when the image
/// is of a recorded program. The copy, if one was made, is to be kept
/// until the restore is done.
pub fn unrecorded_restore(
    images: &Path,
    name: Option<ContainerName>,
    uplink: Option<String>,
) -> Result<(RestoreSpec, Option<WorkingCopy>)> {
    let copy = unrecorded_copy(images)?;
    let from = copy.as_ref().map_or(images, |c| c.path());
    let spec = RestoreSpec::from_image(from, name, uplink)?;
    Ok((spec, copy))
}

/// A recording directory.
pub struct RecordingDir;

impl RecordingDir {
    /// The descriptor number the recording's rings had in the program.
    pub fn ring_fd(dir: &Path) -> Result<i32> {
        let path = dir.join(RECORDING_FILE);
        let text = std::fs::read_to_string(&path).map_err(|e| Error::NotARecording {
            dir: dir.to_path_buf(),
            why: format!("{}: {e}", path.display()),
        })?;
        text.lines()
            .find_map(|l| l.strip_prefix("ring_fd="))
            .and_then(|v| v.trim().parse().ok())
            .ok_or_else(|| Error::NotARecording {
                dir: dir.to_path_buf(),
                why: format!("{} names no ring_fd", path.display()),
            })
    }

    /// Writes what a replay needs beside the thread logs: the rings'
    /// descriptor number and, when known, the program's environment.
    pub fn write_info(dir: &Path, ring_fd: i32, environ: Option<&[CString]>) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(io("creating", dir))?;
        let path = dir.join(RECORDING_FILE);
        std::fs::write(&path, format!("ring_fd={ring_fd}\n")).map_err(io("writing", &path))?;
        if let Some(env) = environ {
            let mut bytes = Vec::new();
            for v in env {
                bytes.extend_from_slice(v.as_bytes_with_nul());
            }
            let path = dir.join(ENVIRON_FILE);
            std::fs::write(&path, bytes).map_err(io("writing", &path))?;
        }
        Ok(())
    }

    /// The recorded program's environment, in order.
    pub fn environ(dir: &Path) -> Result<Vec<CString>> {
        let path = dir.join(ENVIRON_FILE);
        let bytes = std::fs::read(&path).map_err(|e| Error::NotARecording {
            dir: dir.to_path_buf(),
            why: format!("{}: {e}", path.display()),
        })?;
        Ok(bytes
            .split(|b| *b == 0)
            .filter(|v| !v.is_empty())
            .map(|v| CString::new(v).expect("split at NULs"))
            .collect())
    }
}

/// A recording into a directory (`rrc run --record DIR`), about to start.
pub struct Recording {
    rings: Rings,
    dir: PathBuf,
}

impl Recording {
    /// Checks that `program` can be recorded and that `dir` is new or
    /// empty, and makes the rings.
    pub fn prepare(dir: &Path, program: &Path) -> Result<Recording> {
        if dir.exists()
            && std::fs::read_dir(dir)
                .map_err(io("reading", dir))?
                .next()
                .is_some()
        {
            return Err(Error::NotEmpty(dir.to_path_buf()));
        }
        Ok(Recording {
            rings: Rings::create(program, false)?,
            dir: dir.to_path_buf(),
        })
    }

    /// What the program's environment needs for librrc to record it.
    pub fn environment(&self) -> Vec<(OsString, OsString)> {
        self.rings.environment()
    }

    /// `launch` with the recording: its checkpoints know of it, and a
    /// companion drains the rings into the directory once it runs.
    pub fn launch(self, launch: Launch<'static>) -> Launch<'static> {
        self.rings
            .into_launch(launch)
            .companion(Box::new(move |_c: &Container| {
                self.start().map_err(|e| Box::new(e) as CompanionError)
            }))
    }

    fn start(self) -> Result<Box<dyn Companion>> {
        let Rings {
            set,
            child_fd,
            ring_fd,
            env,
        } = self.rings;
        // Its environment exactly, in order (the one the container gave
        // it).
        let environ = rrc_container::create::environment(&env)?;
        RecordingDir::write_info(&self.dir, ring_fd, Some(&environ))?;
        // The program has its copy now.
        drop(child_fd);
        // A second view of the set, for librrc's count of what went
        // unrecorded once the drain has the set.
        let watch = nix::unistd::dup(set.fd())
            .map_err(|e| io("mapping the rings", &self.dir)(e.into()))
            .and_then(|fd| Ok(RingSet::from_fd(fd)?))?;
        let recorder = Recorder::start(set, &self.dir)?;
        Ok(Box::new(Drain {
            recorder: Some(recorder),
            watch,
            dir: self.dir,
        }))
    }
}

/// Drains the rings into the recording directory; reports at the end.
struct Drain {
    recorder: Option<Recorder>,
    watch: RingSet,
    dir: PathBuf,
}

impl Companion for Drain {
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
            "; {unrecorded} thread(s) found no free ring and ran unrecorded: a replay cannot cover them"
        );
    }
    out
}
