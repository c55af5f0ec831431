//! `rrc`: responsive replicated containers.

mod cli;

use std::process::ExitCode;

use clap::Parser;
use clap::error::ErrorKind;

fn main() -> ExitCode {
    rrc_container::default_sigpipe();
    rrc_container::private_files();
    let args = match cli::Cli::try_parse() {
        Ok(a) => a,
        Err(e) => return usage_error(e),
    };
    cli::init_logging(args.verbose);
    match cli::dispatch(args) {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(e) => {
            eprintln!("rrc: error: {}", one_line(&e));
            ExitCode::from(1)
        }
    }
}

/// The error and its causes on one line, outermost first ("what failed:
/// why"), skipping a cause whose text the line already carries (library
/// errors quote their source in their own message).
fn one_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

/// Help and version go to stdout as clap prints them; a usage mistake
/// becomes one line, like every other error.
fn usage_error(e: clap::Error) -> ExitCode {
    match e.kind() {
        ErrorKind::DisplayHelp
        | ErrorKind::DisplayVersion
        | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            let _ = e.print();
            ExitCode::SUCCESS
        }
        _ => {
            // Clap's first paragraph says what is wrong; the rest is usage.
            let text = e.render().to_string();
            let first: Vec<&str> = text
                .lines()
                .take_while(|l| !l.trim().is_empty())
                .map(str::trim)
                .collect();
            let first = first.join(" ");
            let first = first.trim_start_matches("error: ");
            eprintln!("rrc: error: {first} (see `rrc --help`)");
            ExitCode::from(2)
        }
    }
}
