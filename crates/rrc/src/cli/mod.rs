//! The command line: argument definitions and dispatch. Each verb lives in
//! its own module and returns the process exit code.

mod bench;
mod checkpoint;
mod demo;
mod lab;
mod ps;
mod record;
mod replay;
mod replica;
mod restore;
mod run;
mod status;
mod stop;

use clap::{Parser, Subcommand};

/// Transparent fault tolerance for unmodified Linux server applications.
///
/// rrc runs a program in a container whose network traffic passes through
/// rrc itself, so that (in later releases) a backup host can take over with
/// every client connection intact. Start with `rrc lab up` and `rrc demo`.
#[derive(Debug, Parser)]
#[command(name = "rrc", version, propagate_version = true)]
pub struct Cli {
    /// More log output (-v: info, -vv: debug). RRC_LOG=filter overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    Run(run::RunArgs),
    Ps(ps::PsArgs),
    Stop(stop::StopArgs),
    Status(status::StatusArgs),
    Checkpoint(checkpoint::CheckpointArgs),
    Restore(restore::RestoreArgs),
    #[command(subcommand)]
    Lab(lab::LabCommand),
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    #[command(subcommand)]
    Log(record::LogCommand),
    Replay(replay::ReplayArgs),
    Primary(replica::PrimaryArgs),
    Backup(replica::BackupArgs),
    Keygen(replica::KeygenArgs),
    Demo(demo::DemoArgs),
    #[command(hide = true)]
    BackupResume(replica::ResumeArgs),
}

pub fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("RRC_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
}

pub fn dispatch(cli: Cli) -> anyhow::Result<i32> {
    match cli.command {
        Command::Run(a) => run::run(a),
        Command::Ps(a) => ps::ps(a),
        Command::Stop(a) => stop::stop(a),
        Command::Status(a) => status::status(a),
        Command::Checkpoint(a) => checkpoint::checkpoint(a),
        Command::Restore(a) => restore::restore(a),
        Command::Lab(c) => lab::lab(c),
        Command::Bench(c) => bench::bench(c),
        Command::Log(c) => record::log(c),
        Command::Replay(a) => replay::replay(a),
        Command::Primary(a) => replica::primary(a),
        Command::Backup(a) => replica::backup(a),
        Command::Keygen(a) => replica::keygen(a),
        Command::Demo(a) => demo::demo(a),
        Command::BackupResume(a) => replica::backup_resume(a),
    }
}

/// A replication mode, as `--mode` takes it (`rrc primary`, `rrc demo`,
/// `rrc bench failover`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ModeArg {
    Checkpoint,
    Responsive,
}

impl From<ModeArg> for rrc_bench::failover::Mode {
    fn from(m: ModeArg) -> Self {
        match m {
            ModeArg::Checkpoint => rrc_bench::failover::Mode::Checkpoint,
            ModeArg::Responsive => rrc_bench::failover::Mode::Responsive,
        }
    }
}

/// How a takeover brings the memory in, as `--pages` takes it (`rrc
/// backup`, `rrc bench failover`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PagesArg {
    Auto,
    Lazy,
    Eager,
}

impl From<PagesArg> for rrc_replica::takeover::Pages {
    fn from(p: PagesArg) -> Self {
        match p {
            PagesArg::Auto => rrc_replica::takeover::Pages::Auto,
            PagesArg::Lazy => rrc_replica::takeover::Pages::Lazy,
            PagesArg::Eager => rrc_replica::takeover::Pages::Eager,
        }
    }
}

/// The exit code of a command that launched a container: 0 once a
/// detached one runs (its words printed), the program's own otherwise.
pub fn exit_code(l: rrc_container::launch::Launched) -> i32 {
    match l {
        rrc_container::launch::Launched::Detached(msg) => {
            println!("{msg}");
            0
        }
        rrc_container::launch::Launched::Ended(r) => r.code,
    }
}

/// Parses "10", "10s", "500ms", "2m" into a duration.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    use std::time::Duration;
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let v: f64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a duration (e.g. 10s, 500ms, 2m)"))?;
    let secs = match unit {
        "" | "s" => v,
        "ms" => v / 1000.0,
        "us" | "µs" => v / 1e6,
        "m" | "min" => v * 60.0,
        _ => return Err(format!("`{s}`: unknown unit `{unit}` (use ms, s or m)")),
    };
    if !(0.0..=86_400.0).contains(&secs) {
        return Err(format!("`{s}` is out of range"));
    }
    Ok(Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert!(parse_duration("abc").is_err());
        assert!(parse_duration("5h").is_err());
    }

    #[test]
    fn replication_defaults_are_the_libraries() {
        use clap::CommandFactory;
        let cmd = Cli::command();
        let default = |sub: &str, arg: &str| {
            let sub = cmd.find_subcommand(sub).expect("subcommand");
            let a = sub
                .get_arguments()
                .find(|a| a.get_id() == arg)
                .expect("argument");
            parse_duration(a.get_default_values()[0].to_str().unwrap()).unwrap()
        };
        assert_eq!(
            default("primary", "heartbeat"),
            rrc_replica::DEFAULT_HEARTBEAT
        );
        assert_eq!(default("backup", "timeout"), rrc_replica::DEFAULT_TIMEOUT);
    }

    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
