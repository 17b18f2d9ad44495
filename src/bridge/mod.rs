//! The way shards reach blocking clients: jobs go to a pool of plain threads through a
//! `crossbeam-channel`, answers come back through a `flume` channel whose receiver is
//! awaited on the shard (the worker's send wakes the glommio executor from its thread).
//! A shard never blocks here: submitting is a `try_send` on a bounded queue, and a full
//! queue is an answer ([`BridgeError::Unavailable`]), not a wait.
//!
//! [`RedisPool`] is the Redis side: `connections` threads. A worker takes one job
//! (waiting), then drains what else is queued (up to [`PoolOptions::max_batch`] jobs) and
//! sends all their commands at once; the replies are split back per job, in order.
//!
//! # One server or a cluster
//! On connect a worker asks the URL's node `CLUSTER SLOTS`. An error reply (Redis says
//! "cluster support disabled") means one server: the worker owns one blocking
//! `redis::Connection` and a batch is one pipeline, one write, one round trip, however
//! many shards asked. A slot map means a Redis Cluster (`cluster.rs`): the worker connects
//! to every master (each with the URL's password, username and TLS settings, at the
//! address the cluster gives), groups a batch's commands per master by the hash slot of
//! their key (`slot.rs`: the first key of `EVAL`/`EVALSHA` when it names keys, else the
//! argument after the command's name; keyless commands go with their job's neighbours,
//! or to any master), writes every group before reading any reply (one round trip of
//! wall time per batch), and follows redirections: `MOVED` updates the map (and reads it
//! again from the cluster, once per batch) and re-sends to the new master, `ASK` sends
//! `ASKING` and the command to the node named, without changing the map; `TRYAGAIN` and
//! `CLUSTERDOWN` re-send after a short pause. A command still redirected or told to try
//! again after six sendings fails its job `Unavailable` (with that last reply). Redis
//! Cluster has only database 0: a URL naming another is refused (logged; jobs answer
//! `Unavailable` saying so). The store must put all keys of one command or script in one
//! hash slot (a `CROSSSLOT` error reply fails that job, as any error reply does).
//!
//! # What stays true
//! - A job is answered exactly once. A Redis that is gone (connection refused or reset)
//!   fails jobs at once; one that stops answering fails them after at most
//!   `connect_timeout` + `io_timeout` without a byte from it (a job queued behind a connect
//!   attempt waits for that attempt, then is failed). In a cluster this holds per master:
//!   a master that is down fails the jobs for its slots (after at most a connect attempt,
//!   and at most one every `retry_every`) while the other masters answer theirs.
//! - The commands of one job are sent back to back on one connection, in order (in a
//!   cluster: those of one hash slot; a command redirected during a slot migration is
//!   re-sent after the rest of its round, in its order among the re-sent ones); jobs of
//!   different workers may complete in any order (callers that need an order between two
//!   jobs await the first before submitting the second, or put both in one script).
//! - A job answered with an error from the connection (I/O, timeout, a closed socket, a
//!   read interrupted by SIGSTOP/SIGCONT) may or may not have been applied: the reply was
//!   lost, and the answer says so ([`BridgeError::Unknown`]). In a cluster only the jobs
//!   with a command on the connection that failed are; jobs whose commands all went to
//!   other masters and were answered are not affected. A job that never reached Redis
//!   (none connected, queue full, its master unreachable, redirected too often) is
//!   [`BridgeError::Unavailable`], as is one answered with a Redis error reply (a script
//!   error, a wrong type), which failed alone; the rest of its batch is unaffected. A job
//!   of which some commands ran and others could not be sent (their master was down) is
//!   `Unknown`: it was applied in part.
//! - Scripts registered with [`RedisPool::register`] are loaded (`SCRIPT LOAD`) on every
//!   connection (every master's, in a cluster) before a batch that could use them, and
//!   again on every reconnect; a `NOSCRIPT` reply (the script cache was flushed under us)
//!   reloads them all on that connection and re-sends the calls that met it, after the
//!   rest of their batch (their round, in a cluster).
//! - A worker without a connection tries to reconnect at most every
//!   [`PoolOptions::retry_every`], with or without jobs, so the pool recovers by itself
//!   (and [`RedisPool::is_up`] turns true) when Redis returns. Meanwhile it leaves the jobs
//!   to the workers that are connected; when none is, it answers them at once with
//!   `Unavailable` (a job it took just before another worker reconnected waits for its own
//!   next attempt instead, at most `retry_every` plus the connect). In a cluster, a worker
//!   with a master down keeps serving the others, reads the slot map again and tries that
//!   master every `retry_every`; one that lost every master finds the cluster again
//!   through the URL's node, else through the masters it knew.
//! - Idle workers ping every `ping_every`: the server, or every master.

mod cluster;
mod slot;
mod wire;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TrySendError};
use redis::{Cmd, Connection, ConnectionInfo, Value};

use thiserror::Error;

use cluster::{Cluster, Outcome};
use wire::{error_reply, is_noscript, load_scripts, round_trip, Counters, Scripts, Timing};

pub use slot::key_slot;

/// How a [`RedisPool`] connects, batches and gives up.
#[derive(Debug, Clone)]
pub struct PoolOptions {
    /// Worker threads, each with one connection (to each master, with a cluster).
    /// Default 2: a pipelined connection carries tens of thousands of commands a second;
    /// a second one keeps a slow reply from stalling everything.
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
    /// Pipelines written to Redis (each one round trip), script loads excluded. In a
    /// cluster, one per round: the pipelines written to several masters at once count one.
    pub round_trips: u64,
    /// Jobs answered with an error.
    pub failed: u64,
    /// Successful connects (the first one included); in a cluster, one per master.
    pub connects: u64,
    /// Commands a cluster sent elsewhere (`MOVED`, `ASK`) and that were sent again there.
    pub redirects: u64,
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
    /// Workers that are up: their server, or every master serving slots, answered their
    /// last connect or round trip.
    live: AtomicUsize,
    /// Workers holding any connection (to the server, or to some master): they take jobs.
    linked: AtomicUsize,
    /// Set when the last handle is dropped, for workers that wait without the queue.
    closed: AtomicBool,
    counters: Counters,
    scripts: Scripts,
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
    /// Starts the workers for `url` (one server, or any node of a Redis Cluster). They
    /// connect in the background: a Redis that is down now is not an error (jobs answer
    /// `Unavailable` until it is up).
    pub fn start(url: &str, options: PoolOptions) -> Result<RedisPool, BridgeError> {
        let client = redis::Client::open(url).map_err(|e| BridgeError::Start(format!("bad url: {e}")))?;
        let (queue, jobs) = crossbeam_channel::bounded(options.queue.max(1));
        let state = Arc::new(State {
            live: AtomicUsize::new(0),
            linked: AtomicUsize::new(0),
            closed: AtomicBool::new(false),
            counters: Counters::default(),
            scripts: Scripts::default(),
        });
        for i in 0..options.connections.max(1) {
            let worker = Worker {
                info: client.get_connection_info().clone(),
                options: options.clone(),
                state: state.clone(),
                jobs: jobs.clone(),
                link: Link::Down,
                next_attempt: Instant::now(),
                loaded: 0,
                linked: false,
                up: false,
                known: Vec::new(),
                refused: None,
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
        Script { sha: self.shared.state.scripts.register(lua) }
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

    /// Whether some worker is up: its last connect or round trip (an idle ping included)
    /// succeeded, with one server; with a cluster, it holds a connection to every master
    /// that serves slots in its map, each of which answered its last connect or round
    /// trip (so one master down makes this false, though jobs for the others go on).
    pub fn is_up(&self) -> bool {
        self.shared.state.live.load(Relaxed) > 0
    }

    pub fn stats(&self) -> PoolStats {
        let s = &self.shared.state.counters;
        PoolStats {
            jobs: s.jobs.load(Relaxed),
            round_trips: s.round_trips.load(Relaxed),
            failed: s.failed.load(Relaxed),
            connects: s.connects.load(Relaxed),
            redirects: s.redirects.load(Relaxed),
        }
    }
}

/// What a worker is connected to.
enum Link {
    /// Nothing: Redis is unreachable (or refused).
    Down,
    /// One server.
    Single(Connection),
    /// The masters of a cluster (some of them, at least).
    Cluster(Box<Cluster>),
}

/// Why a connect did not give a link.
enum Refusal {
    /// Redis could not be reached or did not answer well: tried again later.
    Failed(String),
    /// Redis answered, and the pool cannot use it as configured (a cluster and a
    /// database other than 0): logged once, answered to every job meanwhile.
    Refused(String),
}

/// One link to Redis and the loop that feeds it.
struct Worker {
    /// The URL's connection settings.
    info: ConnectionInfo,
    options: PoolOptions,
    state: Arc<State>,
    jobs: Receiver<Job>,
    link: Link,
    /// While down: no connect attempt before this.
    next_attempt: Instant,
    /// With one server: how many of the registered scripts its connection has loaded.
    loaded: usize,
    /// Counted in `State::linked` and `State::live`.
    linked: bool,
    up: bool,
    /// The masters of the cluster this worker was linked to, tried when the URL's node
    /// cannot be reached.
    known: Vec<(String, u16)>,
    /// Why Redis refused the last connect, if it did.
    refused: Option<String>,
}

impl Worker {
    fn run(mut self) {
        let mut batch: Vec<Job> = Vec::with_capacity(self.options.max_batch);
        loop {
            if !self.linked && self.state.linked.load(Relaxed) > 0 {
                // Other workers carry the jobs; come back for the next attempt.
                thread::sleep(self.next_attempt.saturating_duration_since(Instant::now()));
                if self.state.closed.load(Relaxed) {
                    return;
                }
                self.connect();
                continue;
            }
            // Up: wake up to ping when idle (or to repair a cluster's missing master).
            // Down: wake up for the next connect attempt.
            let ping = Instant::now() + self.options.ping_every;
            let wake = match &self.link {
                Link::Down => self.next_attempt,
                Link::Single(_) => ping,
                Link::Cluster(cluster) => cluster.next_repair().map_or(ping, |repair| repair.min(ping)),
            };
            let first = match self.jobs.recv_deadline(wake) {
                Ok(job) => Some(job),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => return,
            };
            if first.is_none() && self.linked {
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
            if !self.linked {
                // Jobs taken while down (this worker started waiting when no worker was
                // connected): if another worker got through since, Redis is back, and
                // waiting out the backoff beats failing them.
                if !batch.is_empty() && self.state.linked.load(Relaxed) > 0 {
                    thread::sleep(self.next_attempt.saturating_duration_since(Instant::now()));
                }
                if Instant::now() >= self.next_attempt {
                    self.connect();
                }
            }
            if batch.is_empty() {
                continue;
            }
            match self.link {
                Link::Single(_) => self.execute(&mut batch),
                Link::Cluster(_) => self.execute_cluster(&mut batch),
                Link::Down => {
                    let why = self.refused.clone().unwrap_or_else(|| "redis is unreachable".into());
                    self.fail(&mut batch, &why)
                }
            }
        }
    }

    fn timing(&self) -> Timing {
        Timing {
            connect: self.options.connect_timeout,
            io: self.options.io_timeout,
            retry_every: self.options.retry_every,
        }
    }

    /// Connects: to the URL's node, else (after a cluster was lost) to a master it had.
    /// The link is kept (and counted) only if Redis answered and the scripts are loaded.
    fn connect(&mut self) {
        let mut seed = self.info.clone();
        // Database 0 for the probe: a cluster node refuses SELECT (another database is
        // selected below, once the server is known to be standalone).
        seed.redis.db = 0;
        let mut nodes = vec![seed.addr.clone()];
        nodes.extend(self.known.iter().map(|(host, port)| cluster::with_address(&seed.addr, host, *port)));
        let mut failed = String::new();
        for addr in nodes {
            let info = ConnectionInfo { addr, redis: seed.redis.clone() };
            match self.open(info) {
                Ok(link) => {
                    let single = matches!(link, Link::Single(_));
                    if single {
                        self.state.counters.connects.fetch_add(1, Relaxed);
                    }
                    self.link = link;
                    self.refused = None;
                    self.known.clear();
                    self.sync_status();
                    tracing::info!("redis: connected{}", if single { "" } else { " to a cluster" });
                    return;
                }
                Err(Refusal::Refused(why)) => {
                    if self.refused.as_deref() != Some(why.as_str()) {
                        tracing::error!("{why}");
                    }
                    self.refused = Some(why);
                    break;
                }
                Err(Refusal::Failed(why)) => failed = why,
            }
        }
        if !failed.is_empty() {
            tracing::debug!("redis: cannot connect: {failed}");
        }
        self.next_attempt = Instant::now() + self.options.retry_every;
    }

    /// One connect to `info` (database 0): asks `CLUSTER SLOTS` and makes the link that
    /// the answer calls for.
    fn open(&mut self, info: ConnectionInfo) -> Result<Link, Refusal> {
        let timing = self.timing();
        let mut conn = wire::connect(&info, timing).map_err(Refusal::Failed)?;
        let db = self.info.redis.db;
        let mut slots = redis::cmd("CLUSTER");
        slots.arg("SLOTS");
        let mut cmds = vec![slots];
        if db != 0 {
            let mut select = redis::cmd("SELECT");
            select.arg(db);
            cmds.push(select);
        }
        let replies = round_trip(&mut conn, cmds.iter()).map_err(|e| Refusal::Failed(e.to_string()))?;
        match &replies[0] {
            Value::ServerError(e) if e.code() == "LOADING" => Err(Refusal::Failed(format!(
                "CLUSTER SLOTS: {}",
                error_reply(&replies[0]).unwrap_or_default()
            ))),
            Value::ServerError(e) => {
                // One server: "ERR This instance has cluster support disabled" (any other
                // error, say a user without the right, is taken the same way).
                if !e.details().unwrap_or("").contains("cluster support disabled") {
                    tracing::debug!("redis: CLUSTER SLOTS answered {e:?}: taken as a standalone server");
                }
                if let Some(e) = replies.get(1).and_then(error_reply) {
                    return Err(Refusal::Failed(format!("SELECT {db}: {e}")));
                }
                // Its PING makes sure the server still answers after the probe.
                self.loaded = load_scripts(&mut conn, &self.state.scripts, 0).map_err(Refusal::Failed)?;
                wire::settle(&conn, timing).map_err(Refusal::Failed)?;
                Ok(Link::Single(conn))
            }
            reply => {
                if db != 0 {
                    return Err(Refusal::Refused(format!(
                        "redis: the URL names database {db}, but Redis Cluster has only database 0 \
                         (use /0 or no database in the URL)"
                    )));
                }
                let cluster = Cluster::open(info, reply, timing, &self.state.scripts, &self.state.counters)
                    .map_err(Refusal::Failed)?;
                Ok(Link::Cluster(Box::new(cluster)))
            }
        }
    }

    /// Brings `State::linked` and `State::live` in line with the link; a cluster link
    /// without any connection left is dropped (its masters are remembered to find it again).
    fn sync_status(&mut self) {
        if let Link::Cluster(cluster) = &self.link {
            if !cluster.any_up() {
                self.known = cluster.masters();
                self.link = Link::Down;
                self.next_attempt = Instant::now() + self.options.retry_every;
                tracing::warn!("redis: no master of the cluster is reachable");
            }
        }
        let (linked, up) = match &self.link {
            Link::Down => (false, false),
            Link::Single(_) => (true, true),
            Link::Cluster(cluster) => (true, cluster.all_up()),
        };
        for (mine, now, count) in
            [(&mut self.linked, linked, &self.state.linked), (&mut self.up, up, &self.state.live)]
        {
            match (*mine, now) {
                (false, true) => count.fetch_add(1, Relaxed),
                (true, false) => count.fetch_sub(1, Relaxed),
                _ => 0,
            };
            *mine = now;
        }
    }

    /// Forgets the server's connection after a failure; the next attempt waits
    /// `retry_every`.
    fn disconnect(&mut self, why: &str) {
        if matches!(self.link, Link::Single(_)) {
            self.link = Link::Down;
            tracing::warn!("redis: {why}");
        }
        self.next_attempt = Instant::now() + self.options.retry_every;
        self.sync_status();
    }

    /// [`round_trip`] on the server's connection; a failure drops it.
    fn trip<'a>(&mut self, cmds: impl Iterator<Item = &'a Cmd>) -> Result<Vec<Value>, String> {
        let Link::Single(conn) = &mut self.link else {
            return Err("redis is unreachable".into());
        };
        round_trip(conn, cmds).map_err(|e| {
            let why = format!("redis connection lost: {e}");
            self.disconnect(&why);
            why
        })
    }

    /// A round trip with nothing to do, to learn whether Redis still answers (a failure
    /// drops the connection); in a cluster, to every master (and repairs, see
    /// [`Cluster::ping`]).
    fn ping(&mut self) {
        if let Link::Cluster(cluster) = &mut self.link {
            cluster.ping(&self.state.scripts, &self.state.counters);
            self.sync_status();
            return;
        }
        let ping = redis::cmd("PING");
        let _ = self.trip(std::iter::once(&ping));
    }

    /// Loads the scripts registered since the server's connection last loaded them.
    fn load_new_scripts(&mut self, from: usize) -> Result<(), String> {
        let Link::Single(conn) = &mut self.link else {
            return Err("redis is unreachable".into());
        };
        match load_scripts(conn, &self.state.scripts, from) {
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

    /// One server: sends the batch as one pipeline and answers every job of it.
    fn execute(&mut self, batch: &mut Vec<Job>) {
        if self.state.scripts.len() > self.loaded {
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
        self.state.counters.round_trips.fetch_add(1, Relaxed);
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
            self.state.counters.round_trips.fetch_add(1, Relaxed);
            for (i, reply) in again.into_iter().zip(replies) {
                values[i] = reply;
            }
        }
    }

    /// A cluster: routes the batch's commands to their masters ([`Cluster::execute`])
    /// and answers every job from its commands' outcomes.
    fn execute_cluster(&mut self, batch: &mut Vec<Job>) {
        let Link::Cluster(cluster) = &mut self.link else { return };
        let cmds: Vec<&Cmd> = batch.iter().flat_map(|job| job.cmds.iter()).collect();
        let jobs: Vec<usize> =
            batch.iter().enumerate().flat_map(|(j, job)| std::iter::repeat_n(j, job.cmds.len())).collect();
        let outcomes = cluster.execute(&cmds, &jobs, &self.state.scripts, &self.state.counters);
        let mut outcomes = outcomes.into_iter();
        let answers: Vec<Answer> =
            batch.iter().map(|job| verdict(outcomes.by_ref().take(job.cmds.len()))).collect();
        for (job, answer) in batch.drain(..).zip(answers) {
            self.answer(job, answer);
        }
        self.sync_status();
    }

    fn fail(&self, batch: &mut Vec<Job>, why: &str) {
        for job in batch.drain(..) {
            self.answer(job, Err(BridgeError::Unavailable(why.to_owned())));
        }
    }

    fn answer(&self, job: Job, answer: Answer) {
        if answer.is_err() {
            self.state.counters.failed.fetch_add(1, Relaxed);
        }
        self.state.counters.jobs.fetch_add(1, Relaxed);
        // The caller may have stopped waiting; nothing to do then.
        let _ = job.reply.send(answer);
    }
}

/// A job's answer from its commands' outcomes in a cluster: `Unknown` when a reply was
/// lost, or when some commands ran and others could not be sent; `Unavailable` when none
/// could be sent, or one was answered with an error reply; else the replies.
fn verdict(outcomes: impl Iterator<Item = Outcome>) -> Answer {
    let (mut lost, mut not_sent, mut error, mut applied) = (None, None, None, false);
    let mut values = Vec::new();
    for outcome in outcomes {
        match outcome {
            Outcome::Reply(value) => {
                match error_reply(&value) {
                    Some(e) => drop(error.get_or_insert(e)),
                    None => applied = true,
                }
                values.push(value);
            }
            Outcome::Lost(why) => drop(lost.get_or_insert(why)),
            Outcome::NotSent(why) => drop(not_sent.get_or_insert(why)),
        }
    }
    match (lost, not_sent, error) {
        (Some(why), _, _) => Err(BridgeError::Unknown(why)),
        (None, Some(why), _) if applied => {
            Err(BridgeError::Unknown(format!("{why} (other commands of the job ran)")))
        }
        (None, Some(why), _) => Err(BridgeError::Unavailable(why)),
        (None, None, Some(e)) => Err(BridgeError::Unavailable(format!("redis: {e}"))),
        (None, None, None) => Ok(values),
    }
}
