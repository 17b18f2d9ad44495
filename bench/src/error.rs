//! The bench's one error type. Every variant ends the run: the server it started is
//! stopped and the client processes are killed on the way out.

use std::io;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Wrong or contradictory options: fix the command line.
    #[error("{0}")]
    Usage(String),
    /// The server could not be started, attached to or measured: see its log.
    #[error("server: {0}")]
    Server(String),
    /// A client process failed or answered something unexpected.
    #[error("client process: {0}")]
    Worker(String),
    /// A bounded wait ran out; the figures would not mean what they claim.
    #[error("timed out after {secs} s waiting for {what}")]
    Timeout { what: String, secs: u64 },
    /// A system call or file the bench needs failed.
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
}

impl Error {
    pub fn io(what: impl Into<String>, source: io::Error) -> Error {
        Error::Io { what: what.into(), source }
    }
}
