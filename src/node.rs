//! The process-wide state of a node, shared by every thread: its identity and epoch,
//! connection and readiness counters, and its links to Redis and the other nodes. Built
//! by `server`, read by the shards, the admin API, the lease and the dashboard.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use crate::cluster::Bus;
use crate::config::Config;
use crate::ids::Key;
use crate::outbox::Outbox;
use crate::store::RedisStore;

/// What every thread of the node shares. Read-mostly; the counters are touched once per
/// connection, never per message.
pub struct Node {
    pub config: Arc<Config>,
    /// `config.node_id` as a shared key (presence entries carry it).
    pub node_key: Key,
    /// Changes at every start (seconds since the epoch, base 36): in connection ids.
    pub epoch_tag: String,
    /// Changes at every start (unix milliseconds at start): cluster presence entries and
    /// the node's lease carry it, so a restarted node never inherits its old entries.
    pub epoch: u64,
    /// Open connections across all shards, for `limits.max_connections`.
    pub connections: AtomicUsize,
    /// Shards whose accept loop has started; the node is ready when all have.
    pub ready_shards: AtomicUsize,
    pub shard_count: usize,
    /// Shards that have finished draining.
    pub stopped_shards: AtomicUsize,
    pub draining: AtomicBool,
    /// The Redis store (`[redis]`), shared by the shards and the control thread.
    pub redis: Option<RedisStore>,
    /// The ZeroMQ links to the other nodes (`[cluster]`).
    pub cluster: Option<ClusterLinks>,
    /// The store answers: always with the embedded one; with Redis, as of the last lease
    /// renewal (every second). `/readyz` follows it.
    pub store_up: AtomicBool,
    /// A shard dropped presence changes it could not write (Redis away too long): the
    /// control thread re-registers the node's presence from scratch.
    pub presence_lost: AtomicBool,
    /// Presence of dead nodes purged by this node (their lease ended).
    pub presence_purges: AtomicU64,
    /// How long the slowest shard took to answer the last watchdog ping, in µs.
    pub shard_ping_us: AtomicU64,
    /// Webhook events on their way to the backend (`[webhook]`).
    pub webhooks: Option<Outbox>,
}

/// A cluster node's ends of the ZeroMQ network.
pub struct ClusterLinks {
    pub bus: Bus,
    /// The PUB endpoint other nodes connect to (`cluster.advertise`).
    pub advertise: String,
}

impl Node {
    /// Every shard accepts and the store answers (`/readyz`).
    pub fn is_ready(&self) -> bool {
        self.is_serving() && self.store_up.load(Ordering::Relaxed)
    }

    /// Every shard accepts and the node is not draining. A node whose Redis is down still
    /// serves its connections (heartbeats, refusals), so systemd hears READY without it.
    pub fn is_serving(&self) -> bool {
        !self.draining.load(Ordering::Relaxed)
            && self.ready_shards.load(Ordering::Acquire) == self.shard_count
    }
}
