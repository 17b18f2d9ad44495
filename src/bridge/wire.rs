//! What both ways of reaching Redis (one server, or the masters of a cluster) do on one
//! connection: connect with the pool's timeouts, write a pipeline and read its replies,
//! load the registered scripts, read error replies; and the counters they share.

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use redis::{Cmd, Connection, ConnectionInfo, Value};

/// The pool's counters (see `PoolStats`).
#[derive(Default)]
pub struct Counters {
    pub jobs: AtomicU64,
    pub round_trips: AtomicU64,
    pub failed: AtomicU64,
    pub connects: AtomicU64,
    pub redirects: AtomicU64,
}

/// Registered scripts as (sha, source), in registration order; only appended to, so a
/// connection that loaded the first `n` needs only the rest.
#[derive(Default)]
pub struct Scripts(RwLock<Vec<(Arc<str>, Arc<str>)>>);

impl Scripts {
    /// Adds `lua` (once) and answers its sha.
    pub fn register(&self, lua: &str) -> Arc<str> {
        let sha: Arc<str> = Arc::from(redis::Script::new(lua).get_hash());
        let mut scripts = self.0.write().unwrap_or_else(|e| e.into_inner());
        if !scripts.iter().any(|(s, _)| *s == sha) {
            scripts.push((sha.clone(), Arc::from(lua)));
        }
        sha
    }

    pub fn len(&self) -> usize {
        self.0.read().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// The scripts from index `from` on.
    fn since(&self, from: usize) -> Vec<(Arc<str>, Arc<str>)> {
        let scripts = self.0.read().unwrap_or_else(|e| e.into_inner());
        scripts[from.min(scripts.len())..].to_vec()
    }
}

/// The bounds a connection is made and used with.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    pub connect: Duration,
    pub io: Duration,
    pub retry_every: Duration,
}

/// A connection to `info` whose reads and writes time out after `timing.connect`: its
/// setup commands are part of the connect. [`settle`] it once they are done.
pub fn connect(info: &ConnectionInfo, timing: Timing) -> Result<Connection, String> {
    let client = redis::Client::open(info.clone()).map_err(|e| e.to_string())?;
    let conn = client.get_connection_with_timeout(timing.connect).map_err(|e| e.to_string())?;
    set_timeouts(&conn, timing.connect)?;
    Ok(conn)
}

/// Gives a connected connection the timeouts of its round trips (`timing.io`).
pub fn settle(conn: &Connection, timing: Timing) -> Result<(), String> {
    set_timeouts(conn, timing.io)
}

fn set_timeouts(conn: &Connection, timeout: Duration) -> Result<(), String> {
    conn.set_read_timeout(Some(timeout)).map_err(|e| e.to_string())?;
    conn.set_write_timeout(Some(timeout)).map_err(|e| e.to_string())
}

/// Writes `cmds` as one pipeline and reads one reply per command. Redis error replies
/// come back as `Value::ServerError`; an `Err` means the connection is no longer usable.
pub fn round_trip<'a>(
    conn: &mut Connection,
    cmds: impl Iterator<Item = &'a Cmd>,
) -> redis::RedisResult<Vec<Value>> {
    let mut packed = Vec::new();
    let mut count = 0;
    for cmd in cmds {
        cmd.write_packed_command(&mut packed);
        count += 1;
    }
    conn.send_packed_command(&packed)?;
    let mut values = Vec::with_capacity(count);
    for _ in 0..count {
        values.push(conn.recv_response()?);
    }
    Ok(values)
}

/// Loads the registered scripts from index `from` on, after a PING, in one round trip;
/// answers how many are loaded now.
pub fn load_scripts(conn: &mut Connection, scripts: &Scripts, from: usize) -> Result<usize, String> {
    let sources = scripts.since(from);
    let mut cmds = vec![redis::cmd("PING")];
    for (_, lua) in &sources {
        let mut cmd = redis::cmd("SCRIPT");
        cmd.arg("LOAD").arg(&**lua);
        cmds.push(cmd);
    }
    let mut values = round_trip(conn, cmds.iter()).map_err(|e| format!("loading scripts: {e}"))?;
    if let Some(e) = values.first().and_then(error_reply) {
        return Err(format!("PING: {e}"));
    }
    for ((sha, _), value) in sources.iter().zip(values.drain(1..)) {
        match value {
            Value::BulkString(got) if got.eq_ignore_ascii_case(sha.as_bytes()) => {}
            other => match error_reply(&other) {
                Some(e) => return Err(format!("SCRIPT LOAD {sha}: {e}")),
                None => return Err(format!("SCRIPT LOAD {sha}: unexpected reply {other:?}")),
            },
        }
    }
    Ok(from + sources.len())
}

pub fn is_noscript(value: &Value) -> bool {
    is_code(value, "NOSCRIPT")
}

/// Whether `value` is an error reply whose code (its first word) is `code`.
pub fn is_code(value: &Value, code: &str) -> bool {
    matches!(value, Value::ServerError(e) if e.code() == code)
}

/// The text of a Redis error reply (`None` for any other value).
pub fn error_reply(value: &Value) -> Option<String> {
    match value {
        Value::ServerError(e) => Some(match e.details() {
            Some(details) => format!("{} {details}", e.code()),
            None => e.code().to_owned(),
        }),
        _ => None,
    }
}
