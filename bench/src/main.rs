//! `ringpush-bench`: the load generator of ringpush. Thin: the command line picks a
//! scenario; each scenario lives in its own module.
//!
//! # Layout
//!
//! - `idle`: the `idle` scenario: server memory per idle connection (and after a burst).
//! - `server`: the server under test: start or attach, readiness, `/metrics`, `/proc`.
//! - `workers`: the parent's side of the client processes: spawn, command lines, stop.
//! - `fleet`: one client process: its connections on an epoll loop (`idle-worker`).
//! - `ws`: a minimal RFC 6455 client: handshake, masked frames, a streaming decoder.
//! - `error`: the bench's error type.
//!
//! # Processes
//!
//! The parent starts the server (or attaches to one) and P client processes, which are
//! this binary again with a hidden subcommand; each holds its share of the connections
//! (the open-file limit bounds one process), and they talk to the parent in lines over
//! stdin/stdout.

mod error;
mod fleet;
mod idle;
mod server;
mod workers;
mod ws;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Load generator for ringpush.
#[derive(Parser)]
#[command(name = "ringpush-bench", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Bytes of server memory per idle connection (RSS before and after N connections).
    Idle(idle::IdleArgs),
    /// One client process of a scenario (started by the scenario itself).
    #[command(hide = true)]
    IdleWorker(fleet::FleetArgs),
}

fn main() -> ExitCode {
    let result = match Cli::parse().command {
        Command::Idle(args) => idle::run(args).map(|_| ()),
        Command::IdleWorker(args) => fleet::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ringpush-bench: {e}");
            ExitCode::FAILURE
        }
    }
}
