//! `rrc replay`: a recording replayed from the program's start, or from a
//! checkpoint taken while it was being recorded.

use std::ffi::OsString;
use std::path::PathBuf;

use anyhow::Result;
use rrc_container::launch::{Launch, Source};
use rrc_container::probe;
use rrc_container::restore::RestoreSpec;
use rrc_container::spec::resolve_command;
use rrc_session::replay::{self, ReplayOptions};

/// Replay a recording, from a checkpoint taken while it was recorded or
/// from the program's start.
///
/// With --images (a checkpoint of the recorded container, taken with
/// `rrc checkpoint NAME --leave-running` while `rrc run --record` ran):
/// restores it as a new container on this host and replays from that
/// moment: the restored librrc learns at its first call that it is a
/// replay, each thread skips what it had done before the checkpoint and
/// takes the outcomes of its later calls (network input, time,
/// randomness, thread creation, lock order) from its log; connections that
/// were open are served from the log and what the program writes to them
/// is captured, not sent. Threads the checkpoint caught waiting for input
/// take that input from the log too. When every thread has reached the
/// end of its log the program runs live (or ends, with --stop-at-end).
///
/// Without --images: runs CMD (the recorded program and arguments) from
/// its start, the same way.
///
/// Either way, a call other than the logged one is a divergence, reported
/// with the thread and event; that thread runs live from there. At the end
/// librrc reports the events replayed, the divergences and the time.
#[derive(Debug, clap::Args)]
pub struct ReplayArgs {
    /// The log directory written by `rrc run --record`.
    #[arg(long, value_name = "DIR")]
    log: PathBuf,
    /// A checkpoint of the recorded container (or a series of them: its
    /// last), taken while it was recorded.
    #[arg(long, value_name = "DIR", conflicts_with = "command")]
    images: Option<PathBuf>,
    /// With --images: the restored container's name (default: the
    /// checkpointed one, which must not be running).
    #[arg(long, requires = "images")]
    name: Option<String>,
    /// With --images: host interface for the container's frames (default:
    /// the one whose subnet holds its address).
    #[arg(long, value_name = "IF", requires = "images")]
    uplink: Option<String>,
    /// Do not force the recorded global order of returns.
    #[arg(long)]
    no_order: bool,
    /// Do not wait for the recorded time between returns (waited for only
    /// where the records to replay are of more than one thread).
    #[arg(long)]
    no_timing: bool,
    /// Write what the program sends on its connections (not sent anywhere
    /// in a replay) into this file, as records of descriptor (u32 LE),
    /// length (u32 LE) and bytes; a length of 0xffffffff (no bytes) marks
    /// a connection closed (its descriptor number may come again).
    #[arg(long, value_name = "FILE")]
    capture: Option<PathBuf>,
    /// End the program (SIGTERM) once the whole log has been replayed: for
    /// servers, which do not end on their own.
    #[arg(long)]
    stop_at_end: bool,
    /// Replay no record after this sequence number: each thread's log ends
    /// before its first record beyond it (a log whose tail after a gap is
    /// not to be replayed), and the end of the log is reached when every
    /// record up to it is done.
    #[arg(long, value_name = "SEQ")]
    until: Option<u64>,
    /// Without --images: the recorded program and its arguments.
    #[arg(last = true, required_unless_present = "images", value_name = "CMD")]
    command: Vec<OsString>,
}

pub fn replay(a: ReplayArgs) -> Result<i32> {
    let opts = ReplayOptions {
        log: a.log.clone(),
        order: !a.no_order,
        timing: !a.no_timing,
        stop_at_end: a.stop_at_end,
        capture: a.capture.clone(),
        until: a.until,
        ..ReplayOptions::new(&a.log)
    };
    let Some(images) = &a.images else {
        let program = resolve_command(&a.command[0], std::env::var_os("PATH").as_deref())?;
        return Ok(replay::from_start(&program, &a.command, &opts)?);
    };
    probe::require_root("rrc replay --images")?;
    let images = super::restore::image_of(images)?;
    let prepared = replay::prepare(&images, &opts)?;
    eprintln!(
        "rrc: replaying from event #{} (the checkpoint's place in the recording) with {} thread log(s); {} thread(s) caught waiting for input take it from the log",
        prepared.from, prepared.threads, prepared.interrupted
    );
    let name = a.name.as_deref().map(str::parse).transpose()?;
    let mut spec = RestoreSpec::from_image(prepared.copy.path(), name, a.uplink.clone())?;
    // The replayed program reads the log and writes its capture at these
    // paths, whatever its root.
    spec.share_now.extend(
        std::iter::once(a.log.as_path())
            .chain(a.capture.as_deref().and_then(std::path::Path::parent))
            .filter_map(|d| d.canonicalize().ok()),
    );
    let launched = Launch::new(Source::Image(spec)).run()?;
    Ok(super::exit_code(launched))
}
