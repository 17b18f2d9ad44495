//! The `ringpush` command: CLI -> Config -> logging -> `server::run`. Nothing else lives
//! here; everything testable is in the library.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use ringpush::auth::{valid_id, MAX_DEVICE_LEN, MAX_USER_LEN};
use ringpush::config::Config;
use tracing_subscriber::EnvFilter;

/// A thread-per-core WebSocket push server for instant messaging.
#[derive(Parser)]
#[command(name = "ringpush", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server until SIGTERM or SIGINT, then drain and exit 0.
    Serve {
        /// TOML configuration file; without it, defaults and RINGPUSH_* variables only.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Print a client token signed with the configured auth.secret.
    Token {
        /// User id (the `sub` claim).
        #[arg(long)]
        user: String,
        /// Device id (the `dev` claim).
        #[arg(long)]
        device: String,
        /// Seconds until the token expires.
        #[arg(long, value_name = "SECS", default_value_t = 3600,
              value_parser = clap::value_parser!(u64).range(1..))]
        ttl: u64,
        /// TOML configuration file holding auth.secret (RINGPUSH_AUTH__SECRET also works).
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Connect to a ringpush (or any WebSocket) URL: print every text frame received, send
    /// every line typed as a text frame. For trying a server by hand.
    Connect {
        /// e.g. ws://127.0.0.1:8080/ws?token=...
        url: String,
    },
    /// Validate a configuration file (with RINGPUSH_* overrides applied, as `serve` would):
    /// print `ok`, or one line naming the wrong key and exit 2.
    CheckConfig {
        /// TOML configuration file.
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Serve { config } => serve(config),
        Command::Token { user, device, ttl, config } => token(config, &user, &device, ttl),
        Command::Connect { url } => match ringpush::client::talk(&url) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(e, 1),
        },
        Command::CheckConfig { config } => match Config::load(Some(&config)) {
            Ok(_) => {
                println!("ok");
                ExitCode::SUCCESS
            }
            Err(e) => fail(e, 2),
        },
    }
}

fn serve(path: Option<PathBuf>) -> ExitCode {
    let config = match Config::load(path.as_deref()) {
        Ok(config) => config,
        Err(e) => return fail(e, 1),
    };
    init_logging();
    if config.api_key_generated {
        tracing::warn!(
            "generated api_key: {} (set api_key or RINGPUSH_API_KEY to keep one across restarts)",
            config.api_key
        );
    }
    if config.auth.secret_generated {
        tracing::warn!(
            "auth.secret is not set: a random one was generated, so no client token will verify \
             and `ringpush token` cannot be used; set auth.secret or RINGPUSH_AUTH__SECRET"
        );
    }
    // Signal handling is set up before any thread starts, so every thread inherits it.
    let shutdown = match ringpush::server::Shutdown::from_signals() {
        Ok(shutdown) => shutdown,
        Err(e) => return fail(format!("cannot install signal handlers: {e}"), 1),
    };
    match ringpush::server::run(config, shutdown) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(e, 1),
    }
}

fn token(path: Option<PathBuf>, user: &str, device: &str, ttl: u64) -> ExitCode {
    let config = match Config::load(path.as_deref()) {
        Ok(config) => config,
        Err(e) => return fail(e, 1),
    };
    if config.auth.secret_generated {
        return fail(
            "auth.secret is not set (in --config FILE or RINGPUSH_AUTH__SECRET); \
             a token signed with a random secret would never verify",
            1,
        );
    }
    if !valid_id(user, MAX_USER_LEN) {
        return fail(format!("--user must be 1-{MAX_USER_LEN} characters of [A-Za-z0-9._:@-]"), 1);
    }
    if !valid_id(device, MAX_DEVICE_LEN) {
        return fail(format!("--device must be 1-{MAX_DEVICE_LEN} characters of [A-Za-z0-9._:@-]"), 1);
    }
    match ringpush::auth::mint(&config.auth.secret, user, device, ttl) {
        Ok(token) => {
            println!("{token}");
            ExitCode::SUCCESS
        }
        Err(e) => fail(e, 1),
    }
}

/// Logs go to stderr; `RUST_LOG` filters them (default `info`). Colours only on a terminal,
/// so journald and log files get plain text.
fn init_logging() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

/// The one line a failed command leaves on stderr.
fn fail(error: impl std::fmt::Display, code: u8) -> ExitCode {
    eprintln!("ringpush: {error}");
    ExitCode::from(code)
}
