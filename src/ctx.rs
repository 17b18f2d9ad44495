//! What one shard's parts share: its identity, config, metrics, clock, the store, the
//! mesh to the other executors, and the queues its tasks drain. Sessions, conversations
//! and the demo page get a `&Ctx`, never the whole shard: they send messages (`route`)
//! rather than reach into each other's state.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use crate::admission::Admission;
use crate::auth::Verifier;
use crate::cluster::{ClusterMsg, Topic};
use crate::config::Config;
use crate::hub::Hub;
use crate::ids::shard_for;
use crate::mesh::{Mesh, ShardMsg};
use crate::metrics::ShardMetrics;
use crate::node::{ClusterLinks, Node};
use crate::store::{NodeStore, RedisStore};
use crate::wake::Mailbox;
use crate::wheel::TimerId;

/// One shard's shared context (`!Send`: it stays on its executor).
pub struct Ctx {
    pub id: usize,
    pub shard_count: usize,
    pub config: Arc<Config>,
    /// tungstenite settings derived once from the config.
    pub ws_config: tungstenite::protocol::WebSocketConfig,
    pub verifier: Verifier,
    pub metrics: Arc<ShardMetrics>,
    /// This shard's share of the connect rate and the per-address connection counts.
    pub admission: RefCell<Admission>,
    /// What the whole process shares: connection count, readiness, node id.
    pub node: Arc<Node>,
    pub mesh: Rc<Mesh>,
    /// The store: this shard's part of the embedded one (the conversations and users it
    /// owns), or a handle to Redis.
    pub store: NodeStore,
    pub draining: Cell<bool>,
    /// Messages this shard sends itself, handled in order by a task like any peer's.
    pub local: Mailbox<ShardMsg>,
    /// Sessions with frames queued since the flusher last ran (see `Session::queue`).
    pub flush_list: Mailbox<TimerId>,
    /// This shard's sessions by user and by conversation (a session checks a `signal`'s
    /// sender against it; the shard keeps it).
    pub hub: RefCell<Hub<TimerId>>,
    /// The shard clock's zero; session times are milliseconds since this.
    started: Instant,
    next_conn: Cell<u64>,
    /// Requests this shard has out that may add conversations to its index (user loads,
    /// joins, syncs). While any is out, it does not tell owners it lost interest.
    loading: Cell<usize>,
}

/// What a [`Ctx`] is made of; the rest starts empty.
pub struct CtxParts {
    pub id: usize,
    pub config: Arc<Config>,
    pub metrics: Arc<ShardMetrics>,
    pub node: Arc<Node>,
    pub mesh: Rc<Mesh>,
    pub store: NodeStore,
    pub admission: Admission,
}

impl Ctx {
    pub fn new(parts: CtxParts) -> Ctx {
        let config = parts.config;
        Ctx {
            id: parts.id,
            shard_count: parts.node.shard_count,
            ws_config: crate::ws::codec::server_config(config.limits.max_message_bytes),
            verifier: Verifier::new(&config.auth.secret, config.auth.leeway_secs),
            admission: RefCell::new(parts.admission),
            config,
            metrics: parts.metrics,
            node: parts.node,
            mesh: parts.mesh,
            store: parts.store,
            draining: Cell::new(false),
            local: Mailbox::default(),
            flush_list: Mailbox::default(),
            hub: RefCell::default(),
            started: Instant::now(),
            next_conn: Cell::new(0),
            loading: Cell::new(0),
        }
    }

    /// Milliseconds since the shard started (monotonic).
    pub fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// The next connection number of this shard (see [`Ctx::conn_id`]).
    pub fn next_conn(&self) -> u64 {
        let n = self.next_conn.get();
        self.next_conn.set(n + 1);
        n
    }

    /// A connection id unique in this node's lifetime: start epoch, shard, number.
    /// Sessions keep only the number; the text is made when it is shown.
    pub fn conn_id(&self, conn: u64) -> String {
        format!("{}-{}-{}", self.node.epoch_tag, self.id, conn)
    }

    /// The Redis store, when the node runs on one.
    pub fn redis(&self) -> Option<&RedisStore> {
        match &self.store {
            NodeStore::Redis(r) => Some(r),
            NodeStore::Memory(_) => None,
        }
    }

    /// The node's links to its peers, when it is part of a cluster.
    pub fn links(&self) -> Option<&ClusterLinks> {
        self.node.cluster.as_ref()
    }

    /// Publishes to the other nodes (nothing on a single node).
    pub fn publish(&self, topic: Topic, msg: ClusterMsg) {
        if let Some(links) = self.links() {
            links.bus.publish(topic, msg);
        }
    }

    /// The shard that owns a conversation or a user.
    pub fn owner_of(&self, key: &str) -> usize {
        shard_for(key, self.shard_count)
    }

    /// Sends `msg` to shard `to`; to itself it goes through the local queue, so messages
    /// a shard sends itself keep their order like any other pair's.
    pub fn route(&self, to: usize, msg: ShardMsg) {
        if to == self.id {
            self.local.push(msg);
        } else {
            self.mesh.send(to, msg);
        }
    }

    /// Puts a session on the flush list; the flusher runs after the tasks already woken,
    /// so a session gets every frame the shard has for it until then in one `send`.
    pub fn flush_later(&self, id: TimerId) {
        self.flush_list.push(id);
    }

    /// A request that may add conversations to this shard's index left it (a user load,
    /// a join or a sync); its answer is counted by `loaded`.
    pub fn loading_started(&self) {
        self.loading.set(self.loading.get() + 1);
    }

    /// A request that may add to the index was answered.
    pub fn loaded(&self) {
        self.loading.set(self.loading.get().saturating_sub(1));
    }

    /// Whether requests that may add to the index are out (see [`Ctx::loading_started`]).
    pub fn is_loading(&self) -> bool {
        self.loading.get() > 0
    }
}
