//! `rrc log`: reading recordings (`rrc run --record`).

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use rrc_rr::log::{LogReader, thread_log_ids};

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
