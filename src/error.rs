//! The crate's error type: one variant per layer, each saying what the caller should do.

use thiserror::Error;

use crate::config::ConfigError;

#[derive(Debug, Error)]
pub enum Error {
    /// The configuration is wrong: fix the named key.
    #[error("config: {0}")]
    Config(#[from] ConfigError),
    /// A listener could not be bound: the address is taken or not allowed.
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: std::net::SocketAddr, source: std::io::Error },
    /// A shard or service thread could not start (io_uring unavailable, memlock too low, ...).
    #[error("cannot start {what}: {reason}")]
    Start { what: String, reason: String },
    /// Any other I/O failure at start-up.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}
