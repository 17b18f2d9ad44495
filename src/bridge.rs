//! The way shards reach blocking clients: jobs go to a pool of plain threads through a
//! `crossbeam-channel`, answers come back through a `flume` channel whose receiver is
//! awaited on the shard (the worker's send wakes the glommio executor from its thread).
//! A shard never blocks here: submitting is a `try_send` on a bounded queue, and a full
//! queue is an answer ([`BridgeError::Unavailable`]), not a wait.
//!
//! [`RedisPool`] is the Redis side: `connections` threads, each owning one blocking
//! `redis::Connection`. A worker takes one job (waiting), then drains what else is queued
//! (up to [`PoolOptions::max_batch`] jobs) and sends all their commands as one pipeline:
//! one write, one round trip, however many shards asked. The replies are split back per
//! job, in order.
//!
//! # What stays true
//! - A job is answered exactly once. A Redis that is gone (connection refused or reset)
//!   fails jobs at once; one that stops answering fails them after at most
//!   `connect_timeout` + `io_timeout` without a byte from it (a job queued behind a connect
//!   attempt waits for that attempt, then is failed).
//! - The commands of one job are sent back to back on one connection, in order; jobs of
//!   different workers may complete in any order (callers that need an order between two
//!   jobs await the first before submitting the second, or put both in one script).
//! - A job answered with an error from the connection (I/O, timeout, a closed socket, a
//!   read interrupted by SIGSTOP/SIGCONT) may or may not have been applied: the reply was
//!   lost, and the answer says so ([`BridgeError::Unknown`]). A job that never reached
//!   Redis (none connected, queue full) is [`BridgeError::Unavailable`], as is one answered
//!   with a Redis error reply (a script error, a wrong type), which failed alone; the rest
//!   of its batch is unaffected.
//! - Scripts registered with [`RedisPool::register`] are loaded (`SCRIPT LOAD`) on every
//!   connection before a batch that could use them, and again on every reconnect; a
//!   `NOSCRIPT` reply (the script cache was flushed under us) reloads them all and re-sends
//!   the calls that met it, after the rest of their batch.
//! - A worker without a connection tries to reconnect at most every
//!   [`PoolOptions::retry_every`], with or without jobs, so the pool recovers by itself
//!   (and [`RedisPool::is_up`] turns true) when Redis returns. Meanwhile it leaves the jobs
//!   to the workers that are connected; when none is, it answers them at once with
//!   `Unavailable` (a job it took just before another worker reconnected waits for its own
//!   next attempt instead, at most `retry_every` plus the connect).

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, RwLock};
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TrySendError};
use redis::{Cmd, Connection, Value};

use thiserror::Error;

/// How a [`RedisPool`] connects, batches and gives up.
#[derive(Debug, Clone)]
pub struct PoolOptions {
    /// Worker threads, each with one connection. Default 2: a pipelined connection carries
    /// tens of thousands of commands a second; a second one keeps a slow reply from
    /// stalling everything.
    pub connections: usize,
    /// Bound on a connect (TCP + the connection's setup commands). Default 1 s.
    pub connect_timeout: Duration,
    /// Bound on each write and each read of a round trip. Default 2 s: a job waits at most
    /// about this long for a Redis that stopped answering.
    pub io_timeout: Duration,
    /// Least time between two connect attempts of one worker while Redis is down.
    /// Default 250 ms.
    pub retry_every: Duration,
    /// A worker with nothing to do pings Redis this often, so [`RedisPool::is_up`] follows
    /// Redis without traffic and a dead connection is found before a job needs it.
    /// Default 1 s.
    pub ping_every: Duration,
    /// Most jobs sent in one pipeline. Default 128.
    pub max_batch: usize,
    /// Jobs that may wait in the queue; past that, submitting answers `Unavailable`.
    /// Default 65536.
    pub queue: usize,
}

impl Default for PoolOptions {
    fn default() -> PoolOptions {
        PoolOptions {
            connections: 2,
            connect_timeout: Duration::from_secs(1),
            io_timeout: Duration::from_secs(2),
            retry_every: Duration::from_millis(250),
            ping_every: Duration::from_secs(1),
            max_batch: 128,
            queue: 65536,
        }
    }
}

/// Counts of a pool's work since it started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Jobs answered (successfully or not).
    pub jobs: u64,
    /// Pipelines written to Redis (each one round trip), script loads excluded.
    pub round_trips: u64,
    /// Jobs answered with an error.
    pub failed: u64,
    /// Successful connects (the first one included).
    pub connects: u64,
}

/// What the caller gets back: one value per command of the job.
pub type Answer = Result<Vec<Value>, BridgeError>;

/// Why a job got no answer from Redis. The store layer turns it into its own error.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum BridgeError {
    /// The job never reached Redis (none connected, queue full, pool stopped): nothing
    /// was changed. Retry later.
    #[error("{0}")]
    Unavailable(String),
    /// The job was sent and its answer was lost (the connection broke or timed out): it
    /// may or may not have run, whole.
    #[error("{0}")]
    Unknown(String),
    /// The pool could not be started (a bad URL, no thread).
    #[error("{0}")]
    Start(String),
}

/// Commands to send back to back, and where to put their replies.
struct Job {
    cmds: Vec<Cmd>,
    reply: flume::Sender<Answer>,
}

/// A Lua script known to the pool; [`Script::cmd`] builds a call to it.
#[derive(Debug, Clone)]
pub struct Script {
    sha: Arc<str>,
}

impl Script {
    /// `EVALSHA <sha> <nkeys>`: append the `nkeys` keys, then the arguments.
    pub fn cmd(&self, nkeys: usize) -> Cmd {
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(&*self.sha).arg(nkeys);
        cmd
    }

    /// The SHA1 of the source, as Redis names the script.
    pub fn sha(&self) -> &str {
        &self.sha
    }
}

/// What the workers and the handles share.
struct State {
    /// Workers holding a connection whose last connect or round trip succeeded.
    live: AtomicUsize,
    /// Set when the last handle is dropped, for workers that wait without the queue.
    closed: AtomicBool,
    jobs: AtomicU64,
    round_trips: AtomicU64,
    failed: AtomicU64,
    connects: AtomicU64,
    /// Registered scripts as (sha, source), in registration order; only appended to, so
    /// a worker that loaded the first `n` needs only the rest.
    scripts: RwLock<Vec<(Arc<str>, Arc<str>)>>,
}

struct Shared {
    /// Dropped with the last handle: the workers then see the queue closed and exit.
    queue: Sender<Job>,
    state: Arc<State>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        self.state.closed.store(true, Relaxed);
    }
}

/// A pool of blocking Redis connections on their own threads, usable from any shard.
/// Cheap to clone; the threads stop once every clone is dropped.
#[derive(Clone)]
pub struct RedisPool {
    shared: Arc<Shared>,
}

impl RedisPool {
    /// Starts the workers for `url`. They connect in the background: a Redis that is down
    /// now is not an error (jobs answer `Unavailable` until it is up).
    pub fn start(url: &str, options: PoolOptions) -> Result<RedisPool, BridgeError> {
        let client = redis::Client::open(url).map_err(|e| BridgeError::Start(format!("bad url: {e}")))?;
        let (queue, jobs) = crossbeam_channel::bounded(options.queue.max(1));
        let state = Arc::new(State {
            live: AtomicUsize::new(0),
            closed: AtomicBool::new(false),
            jobs: AtomicU64::new(0),
            round_trips: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            connects: AtomicU64::new(0),
            scripts: RwLock::new(Vec::new()),
        });
        for i in 0..options.connections.max(1) {
            let worker = Worker {
                client: client.clone(),
                options: options.clone(),
                state: state.clone(),
                jobs: jobs.clone(),
                conn: None,
                next_attempt: Instant::now(),
                loaded: 0,
            };
            thread::Builder::new()
                .name(format!("redis-{i}"))
                .spawn(move || worker.run())
                .map_err(|e| BridgeError::Start(e.to_string()))?;
        }
        Ok(RedisPool { shared: Arc::new(Shared { queue, state }) })
    }

    /// Makes `lua` known to the pool (idempotent) and returns the handle to call it by.
    /// Register at start-up: it takes a lock the workers also take once per batch.
    pub fn register(&self, lua: &str) -> Script {
        let sha: Arc<str> = Arc::from(redis::Script::new(lua).get_hash());
        let mut scripts = self.shared.state.scripts.write().unwrap_or_else(|e| e.into_inner());
        if !scripts.iter().any(|(s, _)| *s == sha) {
            scripts.push((sha.clone(), Arc::from(lua)));
        }
        Script { sha }
    }

    /// Sends `cmds` back to back in the next pipeline of a worker and waits (without
    /// blocking the thread) for their replies, one per command.
    pub async fn query(&self, cmds: Vec<Cmd>) -> Answer {
        if cmds.is_empty() {
            return Ok(Vec::new());
        }
        let rx = self.submit(cmds)?;
        rx.recv_async().await.map_err(|_| BridgeError::Unavailable("redis worker stopped".into()))?
    }

    /// [`RedisPool::query`] of one command, answering its one value.
    pub async fn query_one(&self, cmd: Cmd) -> Result<Value, BridgeError> {
        let mut values = self.query(vec![cmd]).await?;
        values.pop().ok_or_else(|| BridgeError::Unavailable("redis: missing reply".into()))
    }

    /// Queues a job without waiting for it; the answer arrives on the returned receiver.
    /// Never blocks: a full queue is `Unavailable`.
    pub fn submit(&self, cmds: Vec<Cmd>) -> Result<flume::Receiver<Answer>, BridgeError> {
        let (reply, rx) = flume::bounded(1);
        match self.shared.queue.try_send(Job { cmds, reply }) {
            Ok(()) => Ok(rx),
            Err(TrySendError::Full(_)) => Err(BridgeError::Unavailable("redis queue full".into())),
            Err(TrySendError::Disconnected(_)) => Err(BridgeError::Unavailable("redis pool stopped".into())),
        }
    }

    /// Whether some worker's last connect or round trip (an idle ping included) succeeded.
    pub fn is_up(&self) -> bool {
        self.shared.state.live.load(Relaxed) > 0
    }

    pub fn stats(&self) -> PoolStats {
        let s = &self.shared.state;
        PoolStats {
            jobs: s.jobs.load(Relaxed),
            round_trips: s.round_trips.load(Relaxed),
            failed: s.failed.load(Relaxed),
            connects: s.connects.load(Relaxed),
        }
    }
}

/// One blocking connection and the loop that feeds it.
struct Worker {
    client: redis::Client,
    options: PoolOptions,
    state: Arc<State>,
    jobs: Receiver<Job>,
    /// `None` while Redis is unreachable.
    conn: Option<Connection>,
    /// While disconnected: no connect attempt before this.
    next_attempt: Instant,
    /// How many of the registered scripts this connection has loaded.
    loaded: usize,
}

impl Worker {
    fn run(mut self) {
        let mut batch: Vec<Job> = Vec::with_capacity(self.options.max_batch);
        loop {
            if self.conn.is_none() && self.state.live.load(Relaxed) > 0 {
                // Other workers carry the jobs; come back for the next attempt.
                thread::sleep(self.next_attempt.saturating_duration_since(Instant::now()));
                if self.state.closed.load(Relaxed) {
                    return;
                }
                self.connect();
                continue;
            }
            // Up: wake up to ping when idle. Down: wake up for the next connect attempt.
            let wake = match self.conn {
                Some(_) => Instant::now() + self.options.ping_every,
                None => self.next_attempt,
            };
            let first = match self.jobs.recv_deadline(wake) {
                Ok(job) => Some(job),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => return,
            };
            if first.is_none() && self.conn.is_some() {
                self.ping();
                continue;
            }
            batch.extend(first);
            while batch.len() < self.options.max_batch {
                match self.jobs.try_recv() {
                    Ok(job) => batch.push(job),
                    Err(_) => break,
                }
            }
            if self.conn.is_none() {
                // Jobs taken while down (this worker started waiting when no worker was
                // connected): if another worker got through since, Redis is back, and
                // waiting out the backoff beats failing them.
                if !batch.is_empty() && self.state.live.load(Relaxed) > 0 {
                    thread::sleep(self.next_attempt.saturating_duration_since(Instant::now()));
                }
                if Instant::now() >= self.next_attempt {
                    self.connect();
                }
            }
            if batch.is_empty() {
                continue;
            }
            match self.conn.is_some() {
                true => self.execute(&mut batch),
                false => self.fail(&mut batch, "redis is unreachable"),
            }
        }
    }

    /// Connects and loads the scripts; the connection is kept (and counted live) only if
    /// both succeed.
    fn connect(&mut self) {
        let options = &self.options;
        let result = self.client.get_connection_with_timeout(options.connect_timeout).and_then(|conn| {
            conn.set_read_timeout(Some(options.io_timeout))?;
            conn.set_write_timeout(Some(options.io_timeout))?;
            Ok(conn)
        });
        let loaded = result.map_err(|e| e.to_string()).and_then(|mut conn| {
            // Its PING makes sure Redis answers (without a password or a database the
            // connect itself sent nothing) before the connection counts as live.
            let loaded = load_scripts(&mut conn, &self.state, 0)?;
            Ok((conn, loaded))
        });
        match loaded {
            Ok((conn, loaded)) => {
                self.conn = Some(conn);
                self.loaded = loaded;
                self.state.live.fetch_add(1, Relaxed);
                self.state.connects.fetch_add(1, Relaxed);
                tracing::info!("redis: connected");
            }
            Err(why) => {
                tracing::debug!("redis: cannot connect: {why}");
                self.next_attempt = Instant::now() + self.options.retry_every;
            }
        }
    }

    /// Forgets the connection after a failure; the next attempt waits `retry_every`.
    fn disconnect(&mut self, why: &str) {
        if self.conn.take().is_some() {
            self.state.live.fetch_sub(1, Relaxed);
            tracing::warn!("redis: {why}");
        }
        self.next_attempt = Instant::now() + self.options.retry_every;
    }

    /// [`round_trip`] on this worker's connection; a failure drops it.
    fn trip<'a>(&mut self, cmds: impl Iterator<Item = &'a Cmd>) -> Result<Vec<Value>, String> {
        let Some(conn) = self.conn.as_mut() else {
            return Err("redis is unreachable".into());
        };
        round_trip(conn, cmds).map_err(|e| {
            let why = format!("redis connection lost: {e}");
            self.disconnect(&why);
            why
        })
    }

    /// A round trip with nothing to do, to learn whether Redis still answers (a failure
    /// drops the connection).
    fn ping(&mut self) {
        let ping = redis::cmd("PING");
        let _ = self.trip(std::iter::once(&ping));
    }

    /// Loads the scripts registered since this connection last loaded them.
    fn load_new_scripts(&mut self, from: usize) -> Result<(), String> {
        let Some(conn) = self.conn.as_mut() else {
            return Err("redis is unreachable".into());
        };
        match load_scripts(conn, &self.state, from) {
            Ok(loaded) => {
                self.loaded = loaded;
                Ok(())
            }
            Err(why) => {
                self.disconnect(&why);
                Err(why)
            }
        }
    }

    /// Sends the batch as one pipeline and answers every job of it.
    fn execute(&mut self, batch: &mut Vec<Job>) {
        let registered = self.state.scripts.read().map(|s| s.len()).unwrap_or(self.loaded);
        if registered > self.loaded {
            if let Err(why) = self.load_new_scripts(self.loaded) {
                return self.fail(batch, &why);
            }
        }
        let mut values = match self.trip(batch.iter().flat_map(|job| job.cmds.iter())) {
            Ok(values) => values,
            // Sent, or partly: whether Redis applied it is not known.
            Err(why) => {
                for job in batch.drain(..) {
                    self.answer(job, Err(BridgeError::Unknown(why.clone())));
                }
                return;
            }
        };
        self.state.round_trips.fetch_add(1, Relaxed);
        if values.iter().any(is_noscript) {
            self.retry_noscript(batch, &mut values);
        }
        let mut values = values.into_iter();
        for job in batch.drain(..) {
            let mine: Vec<Value> = values.by_ref().take(job.cmds.len()).collect();
            let answer = match mine.iter().find_map(error_reply) {
                Some(e) => Err(BridgeError::Unavailable(format!("redis: {e}"))),
                None => Ok(mine),
            };
            self.answer(job, answer);
        }
    }

    /// Reloads every script and re-sends the calls that met `NOSCRIPT`, replacing their
    /// replies in `values`. A failure here leaves the `NOSCRIPT` replies (their jobs fail).
    fn retry_noscript(&mut self, batch: &[Job], values: &mut [Value]) {
        if let Err(why) = self.load_new_scripts(0) {
            tracing::warn!("redis: reloading scripts after NOSCRIPT: {why}");
            return;
        }
        let cmds: Vec<&Cmd> = batch.iter().flat_map(|job| job.cmds.iter()).collect();
        let again: Vec<usize> = (0..values.len()).filter(|&i| is_noscript(&values[i])).collect();
        if let Ok(replies) = self.trip(again.iter().map(|&i| cmds[i])) {
            self.state.round_trips.fetch_add(1, Relaxed);
            for (i, reply) in again.into_iter().zip(replies) {
                values[i] = reply;
            }
        }
    }

    fn fail(&self, batch: &mut Vec<Job>, why: &str) {
        for job in batch.drain(..) {
            self.answer(job, Err(BridgeError::Unavailable(why.to_owned())));
        }
    }

    fn answer(&self, job: Job, answer: Answer) {
        if answer.is_err() {
            self.state.failed.fetch_add(1, Relaxed);
        }
        self.state.jobs.fetch_add(1, Relaxed);
        // The caller may have stopped waiting; nothing to do then.
        let _ = job.reply.send(answer);
    }
}

/// Writes `cmds` as one pipeline and reads one reply per command. Redis error replies
/// come back as `Value::ServerError`; an `Err` means the connection is no longer usable.
fn round_trip<'a>(
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
fn load_scripts(conn: &mut Connection, state: &State, from: usize) -> Result<usize, String> {
    let sources: Vec<(Arc<str>, Arc<str>)> = {
        let scripts = state.scripts.read().unwrap_or_else(|e| e.into_inner());
        scripts[from.min(scripts.len())..].to_vec()
    };
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

fn is_noscript(value: &Value) -> bool {
    matches!(value, Value::ServerError(e) if e.code() == "NOSCRIPT")
}

/// The text of a Redis error reply (`None` for any other value).
fn error_reply(value: &Value) -> Option<String> {
    match value {
        Value::ServerError(e) => Some(match e.details() {
            Some(details) => format!("{} {details}", e.code()),
            None => e.code().to_owned(),
        }),
        _ => None,
    }
}
