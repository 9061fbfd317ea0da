//! The `sluice` command line (SPEC.md): run, check, validate, status.
//! Exit codes: 0 ok, 1 user error, 2 internal error.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "sluice",
    version,
    about = "Change-data-capture replication: PostgreSQL to PostgreSQL, MySQL and Parquet"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon (SIGINT/SIGTERM stop it gracefully).
    Run {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Parse the configuration and mappings, connect to every endpoint, report.
    Check {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Compare source and sink contents row by row; exit 1 when they differ.
    Validate {
        #[arg(long, short)]
        config: PathBuf,
        /// Only this sink.
        #[arg(long)]
        sink: Option<String>,
    },
    /// Print pipelines, actors, lag and throughput of a running daemon.
    Status {
        #[arg(long, default_value = "http://127.0.0.1:7878")]
        url: String,
    },
}

fn main() -> ExitCode {
    sluice::allocator::configure();
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { 1 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    let outcome = std::panic::catch_unwind(|| match cli.command {
        Command::Run { config } => {
            if let Err(e) = sluice::allocator::trim_c_heap() {
                eprintln!("warning: no thread to trim the C heap: {e}");
            }
            sluice::daemon::run(&config)
        }
        Command::Check { config } => sluice::check::run(&config),
        Command::Validate { config, sink } => sluice::validate::run(&config, sink.as_deref()),
        Command::Status { url } => sluice::status::run(&url),
    });
    outcome.unwrap_or_else(|_| {
        eprintln!("internal error: sluice panicked; please report it with the log above");
        ExitCode::from(2)
    })
}
