//! One core: its listener, its sessions, its timer wheel, its part of the store, and the
//! conversations and users it owns.
//!
//! A shard is a glommio `LocalExecutor` pinned to one CPU. It accepts on its own
//! `SO_REUSEPORT` listener, so a connection lives its whole life here. Everything in
//! [`Shard`] is `!Send` and touched only from this thread; other executors reach a shard
//! through the mesh ([`ShardMsg`]). Nothing here blocks: sockets are io_uring-driven, the
//! heartbeat work per tick is bounded by what is due, and long fan-outs yield.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};

use bytes::Bytes;
use std::net::SocketAddr;
use std::os::fd::{FromRawFd, IntoRawFd, OwnedFd};
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use glommio::channels::shared_channel::ConnectedReceiver;
use glommio::net::TcpListener;
use glommio::sync::Gate;
use tracing::{debug, info, warn};

use crate::admission::Admission;
use crate::auth::Verifier;
use crate::cluster::{ClusterMsg, Envelope, Topic};
use crate::config::Config;
use crate::conv::{self, Holdback, Interest, MembersChange, Step};
use crate::hub::Hub;
use crate::ids::{shard_for, Key};
use crate::mesh::{Mesh, MeshEnds, Reply, SessionRef, ShardMsg};
use crate::metrics::ShardMetrics;
use crate::node::{ClusterLinks, Node};
use crate::session::{self, Kind, Session};
use crate::store::{MemoryStore, NodeStore, Presence, PresenceOp, RedisStore, Store};
use crate::wheel::{TimerId, Wheel};
use crate::ws::codec;

/// How long a draining shard waits for its clients' close replies before it stops.
const DRAIN_WAIT: Duration = Duration::from_secs(3);

/// Recipients served in one go before a fan-out yields to the rest of the shard.
const FANOUT_BATCH: usize = 256;

/// How often a shard writes its connections' presence changes to Redis, in one pipeline:
/// a connection storm costs a few round trips per interval, not one per connection.
const PRESENCE_FLUSH: Duration = Duration::from_millis(20);

/// Presence changes a shard keeps for Redis while it is unreachable; past this it drops
/// them and asks for a full re-registration once Redis is back.
const PRESENCE_BACKLOG: usize = 200_000;

/// How long a join whose store read failed waits before it asks again.
const JOIN_RETRY: Duration = Duration::from_millis(250);

/// How long a failed gap repair waits before it tries the store again.
const REPAIR_RETRY_MS: u64 = 500;

/// Conversations whose last seq one tail-check read asks the store for.
const CHECK_BATCH: usize = 512;

/// A heartbeat tick this late means the shard did not run for a while (the process was
/// stopped, or the host stalled): messages from other nodes may have been dropped
/// meanwhile, so every conversation gets a tail check.
const STALL_MS: u64 = 1000;

/// Everything a shard thread is started with.
pub struct ShardSetup {
    pub id: usize,
    pub listener: OwnedFd,
    pub mesh: MeshEnds,
    pub node: Arc<Node>,
    pub metrics: Arc<ShardMetrics>,
    /// Messages from other nodes for this shard (a cluster only).
    pub inbound: Option<flume::Receiver<Envelope>>,
}

/// The state of one shard, shared (`Rc`) by its tasks.
pub struct Shard {
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
    /// With Redis: the delivery order of each owned conversation this node has an
    /// interest in (see [`Holdback`]). Empty with the embedded store, whose sequencing
    /// on the owner is already in order.
    pub order: RefCell<HashMap<Key, Holdback>>,
    /// Conversations with a hole to repair, by due time (shard milliseconds).
    repairs: RefCell<VecDeque<(u64, Key)>>,
    repair_waker: Cell<Option<Waker>>,
    /// Conversations whose member set must be read again (see [`Shard::reconcile`]).
    reconciles: RefCell<VecDeque<Key>>,
    reconcile_waker: Cell<Option<Waker>>,
    /// Conversations due for a tail check once quiet (see [`conv::QUIET_MS`]).
    checks: RefCell<VecDeque<Key>>,
    /// Presence changes of this shard's connections not yet written to Redis.
    presence_out: RefCell<Vec<PresenceOp>>,
    /// Which shards want the messages of the conversations this shard owns.
    pub interest: RefCell<Interest>,
    /// This shard's sessions by user and by conversation.
    pub hub: RefCell<Hub<TimerId>>,
    /// Requests this shard has out that may add conversations to its index (user loads,
    /// joins, syncs). While any is out, it does not tell owners it lost interest.
    loading: Cell<usize>,
    /// Messages this shard sends itself, handled in order by a task like any peer's.
    local: RefCell<VecDeque<ShardMsg>>,
    local_waker: Cell<Option<Waker>>,
    /// Client sessions in their grace after `hello`, by the shard-clock ms it ends, in
    /// that order (the grace is the same for all): see `session::SYNC_GRACE_MS`.
    graces: RefCell<VecDeque<(u64, TimerId)>>,
    grace_waker: Cell<Option<Waker>>,
    /// Sessions with frames queued since the flusher last ran (see `Session::queue`).
    flush_list: RefCell<Vec<TimerId>>,
    flush_waker: Cell<Option<Waker>>,
    sessions: RefCell<Slab>,
    wheel: RefCell<Wheel>,
    /// Every session task runs through the gate, so a drain can wait for them.
    pub gate: Gate,
    /// The shard clock's zero; session times are milliseconds since this.
    started: Instant,
    next_conn: Cell<u64>,
    pub draining: Cell<bool>,
    drain_waker: Cell<Option<Waker>>,
}

impl Shard {
    /// Milliseconds since the shard started (monotonic).
    pub fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// The next connection number of this shard (see [`Shard::conn_id`]).
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

    /// How the presence API shows a client session.
    fn presence(&self, session: &Session) -> Presence {
        let device = match &session.kind {
            Kind::Client { device, .. } => device.clone(),
            Kind::Echo => Key::from(""),
        };
        Presence {
            device,
            conn: Key::from(self.conn_id(session.conn)),
            node: self.node.node_key.clone(),
            ip: session.ip,
            since: session.since_unix_ms,
        }
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

    /// Shard `shard` wants the messages of `conv`, owned here.
    pub fn want(&self, conv: &Key, shard: usize) {
        if self.interest.borrow_mut().add(conv, shard) {
            self.interest_began(conv);
        }
    }

    /// Every shard wants `conv` until it says otherwise (new members may be anywhere).
    pub fn want_all(&self, conv: &Key) {
        if self.interest.borrow_mut().add_all(conv, self.shard_count) {
            self.interest_began(conv);
        }
    }

    fn unwant(&self, conv: &Key, shard: usize) {
        if self.interest.borrow_mut().remove(conv, shard) {
            // No session of the node is in it any more: stop its traffic, forget its order.
            if let Some(links) = self.links() {
                links.bus.unsubscribe(Topic::conv(conv));
            }
            self.order.borrow_mut().remove(conv);
        }
    }

    fn interest_began(&self, conv: &Key) {
        if let Some(links) = self.links() {
            links.bus.subscribe(Topic::conv(conv));
        }
    }

    /// A store read saw `last` as the last seq of `conv`, which this node has an interest
    /// in: the first read is the delivery baseline (seqs up to it are the clients' to
    /// `sync`), a later one may show a hole to repair. A read of a member's view also
    /// names the members version it was made under (`members_version`): the first one is
    /// what this node's view of the membership starts from. Returns the seq delivered so
    /// far.
    pub fn saw_last_seq(&self, conv: &Key, last: u64, members_version: Option<u64>) -> u64 {
        if self.redis().is_none() {
            return last;
        }
        let mut order = self.order.borrow_mut();
        let h = order.entry(conv.clone()).or_insert_with(|| {
            // The node has just taken an interest in `conv` and subscribed to it: a
            // message another node published before the subscription reached it is lost
            // to this node, and with no later message nothing would show the hole. One
            // tail check once the conversation is quiet finds it.
            // Without a membership read, 0: the first message read it again.
            let mut h = Holdback::new(last, members_version.unwrap_or(0));
            h.active_ms = self.now_ms();
            h.check_queued = true;
            self.checks.borrow_mut().push_back(conv.clone());
            h
        });
        h.saw(last);
        let delivered = h.delivered();
        drop(order);
        self.check_hole(conv);
        delivered
    }

    /// The last seq of `conv` this node has handed to its shards, with Redis (the
    /// embedded store delivers each seq as it assigns it: `None`).
    pub fn delivered_seq(&self, conv: &Key) -> Option<u64> {
        self.redis()?;
        self.order.borrow().get(conv).map(|h| h.delivered())
    }

    /// Hands a sequenced message to the shards that want it, in seq order: at once with
    /// the embedded store; through the conversation's [`Holdback`] with Redis, where a
    /// message taken under a members version newer than this node's view first has the
    /// member set read again (see [`Shard::reconcile`]).
    pub fn deliver_in_order(
        &self,
        conv: &Key,
        seq: u64,
        frame: Bytes,
        exclude: Option<SessionRef>,
        members_version: u64,
    ) {
        if self.redis().is_none() {
            return conv::fan_out(self, conv, seq, frame, exclude);
        }
        if self.interest.borrow().shards(conv).is_none() {
            return; // no session of this node is in it
        }
        let now = self.now_ms();
        let mut order = self.order.borrow_mut();
        // No baseline yet (its read is on the way): this message starts the order.
        let h = order.entry(conv.clone()).or_insert_with(|| Holdback::new(seq - 1, 0));
        h.active_ms = now;
        if !h.check_queued {
            h.check_queued = true;
            self.checks.borrow_mut().push_back(conv.clone());
        }
        if !h.offer(seq, (frame, exclude)) {
            return;
        }
        if h.needs_reconcile(members_version) {
            drop(order);
            return self.reconcile_later(conv);
        }
        drop(order);
        self.drain(conv);
    }

    /// Hands on what is ready of `conv`'s [`Holdback`], in order: messages to the shards
    /// that want them, membership changes to every shard. Then looks for a hole.
    pub fn drain(&self, conv: &Key) {
        loop {
            let step = self.order.borrow_mut().get_mut(conv).and_then(|h| h.next_step());
            match step {
                Some(Step::Msg(seq, (frame, exclude))) => conv::fan_out(self, conv, seq, frame, exclude),
                Some(Step::Members(change)) => {
                    conv::announce_members(self, conv, change.added, change.removed)
                }
                None => break,
            }
        }
        self.check_hole(conv);
    }

    /// Schedules a repair of `conv` if it has a hole and none is scheduled.
    fn check_hole(&self, conv: &Key) {
        let mut order = self.order.borrow_mut();
        let Some(h) = order.get_mut(conv) else { return };
        if h.repair_pending || h.hole().is_none() {
            return;
        }
        h.repair_pending = true;
        drop(order);
        let due = self.now_ms() + conv::REPAIR_AFTER_MS;
        self.repairs.borrow_mut().push_back((due, conv.clone()));
        if let Some(w) = self.repair_waker.take() {
            w.wake();
        }
    }

    /// Queues a read of `conv`'s member set (its [`Holdback`] is paused meanwhile).
    pub fn reconcile_later(&self, conv: &Key) {
        self.reconciles.borrow_mut().push_back(conv.clone());
        if let Some(w) = self.reconcile_waker.take() {
            w.wake();
        }
    }

    /// Brings this node's view of a conversation's membership up to date, one conversation
    /// at a time: a change made on another node reaches this one as a `members` message,
    /// which can be lost (a node restarted, a subscription not yet in place); the next
    /// message of the conversation then carries a members version newer than this node's
    /// view. Until the member set is read again, nothing of the conversation is handed on
    /// (a removed member must not get it); then every shard gets the set
    /// ([`ShardMsg::MembersNow`]) ahead of the conversation's next messages.
    async fn run_reconciles(self: Rc<Self>) {
        loop {
            let conv = futures_lite::future::poll_fn(|cx| match self.reconciles.borrow_mut().pop_front() {
                Some(next) => Poll::Ready(next),
                None => {
                    self.reconcile_waker.set(Some(cx.waker().clone()));
                    Poll::Pending
                }
            })
            .await;
            self.reconcile(&conv).await;
        }
    }

    async fn reconcile(&self, conv: &Key) {
        let read = loop {
            if !self.order.borrow().get(conv).is_some_and(|h| h.reconciling) {
                return; // the node gave the conversation up meanwhile
            }
            match self.store.conversation(conv).await {
                Ok(read) => break read,
                Err(_) => glommio::timer::sleep(Duration::from_millis(REPAIR_RETRY_MS)).await,
            }
        };
        self.metrics.cluster_reconciles.inc();
        // Sessions of members added meanwhile may be on any shard.
        self.want_all(conv);
        let members: Arc<[Key]> = read.members.into();
        for target in 0..self.shard_count {
            self.route(target, ShardMsg::MembersNow { conv: conv.clone(), members: members.clone() });
        }
        let mut order = self.order.borrow_mut();
        let Some(h) = order.get_mut(conv) else { return };
        if h.reconciled(read.members_version) {
            drop(order);
            return self.reconcile_later(conv);
        }
        drop(order);
        self.drain(conv);
    }

    /// Fills holes that outlasted [`conv::REPAIR_AFTER_MS`] from the store, one at a time.
    async fn run_repairs(self: Rc<Self>) {
        loop {
            let (due, conv) =
                futures_lite::future::poll_fn(|cx| match self.repairs.borrow_mut().pop_front() {
                    Some(next) => Poll::Ready(next),
                    None => {
                        self.repair_waker.set(Some(cx.waker().clone()));
                        Poll::Pending
                    }
                })
                .await;
            let now = self.now_ms();
            if due > now {
                glommio::timer::sleep(Duration::from_millis(due - now)).await;
            }
            let hole = match self.order.borrow_mut().get_mut(&conv) {
                Some(h) => {
                    h.repair_pending = false;
                    h.hole()
                }
                None => None,
            };
            if let Some((after, upto)) = hole {
                if !conv::repair(&self, &conv, after, upto).await {
                    if let Some(h) = self.order.borrow_mut().get_mut(&conv) {
                        h.repair_pending = true;
                        self.repairs.borrow_mut().push_back((self.now_ms() + REPAIR_RETRY_MS, conv));
                    }
                    continue;
                }
                self.check_hole(&conv);
            }
        }
    }

    /// Tail checks: every conversation quiet for [`conv::QUIET_MS`] since its last message
    /// has its last seq read from the store (many per read), and a hole it reveals is
    /// repaired like any other.
    async fn run_checks(self: Rc<Self>) {
        let Some(redis) = self.redis().cloned() else { return };
        let tick = Duration::from_millis(conv::QUIET_MS / 2);
        loop {
            glommio::timer::sleep(tick).await;
            let now = self.now_ms();
            let mut due = Vec::new();
            {
                let mut checks = self.checks.borrow_mut();
                let mut order = self.order.borrow_mut();
                for _ in 0..checks.len() {
                    let Some(conv) = checks.pop_front() else { break };
                    let Some(h) = order.get_mut(&conv) else { continue };
                    if now >= h.active_ms + conv::QUIET_MS {
                        h.check_queued = false;
                        due.push(conv);
                    } else {
                        checks.push_back(conv);
                    }
                }
            }
            for batch in due.chunks(CHECK_BATCH) {
                match redis.last_seqs(batch).await {
                    Ok(lasts) => {
                        for (conv, last) in batch.iter().zip(lasts) {
                            if self.order.borrow().contains_key(conv) {
                                self.saw_last_seq(conv, last, None);
                            }
                        }
                    }
                    Err(_) => self.check_all(),
                }
            }
        }
    }

    /// Queues a tail check of every conversation this shard orders (after a stall, or
    /// when Redis or the node's lease was lost).
    pub fn check_all(&self) {
        let mut order = self.order.borrow_mut();
        let mut checks = self.checks.borrow_mut();
        for (conv, h) in order.iter_mut() {
            h.active_ms = 0;
            if !h.check_queued {
                h.check_queued = true;
                checks.push_back(conv.clone());
            }
        }
    }

    /// Queues a presence change for Redis (a node on Redis only).
    fn presence_changed(&self, op: PresenceOp) {
        if self.redis().is_none() {
            return;
        }
        let mut out = self.presence_out.borrow_mut();
        if out.len() < PRESENCE_BACKLOG {
            out.push(op);
        } else {
            self.node.presence_lost.store(true, Ordering::Relaxed);
        }
    }

    /// Writes queued presence changes to Redis every [`PRESENCE_FLUSH`], one pipeline per
    /// write; what fails is kept (bounded) and written when Redis answers again.
    async fn run_presence(self: Rc<Self>) {
        let Some(redis) = self.redis().cloned() else { return };
        loop {
            glommio::timer::sleep(PRESENCE_FLUSH).await;
            let ops = std::mem::take(&mut *self.presence_out.borrow_mut());
            if ops.is_empty() {
                continue;
            }
            if let Err(e) = redis.presence_write(&ops).await {
                debug!(shard = self.id, error = %e, "presence not written; keeping it");
                let mut out = self.presence_out.borrow_mut();
                let newer = std::mem::replace(&mut *out, ops);
                out.extend(newer);
                if out.len() > PRESENCE_BACKLOG {
                    out.clear();
                    self.node.presence_lost.store(true, Ordering::Relaxed);
                }
            }
        }
    }

    /// Every live client session's presence, queued again (see [`ShardMsg::Reregister`]).
    fn reregister(&self) {
        let sessions = self.sessions.borrow().all();
        let mut out = self.presence_out.borrow_mut();
        out.clear();
        for s in sessions {
            if let Kind::Client { user, .. } = &s.kind {
                out.push(PresenceOp::Add { user: user.clone(), entry: self.presence(&s) });
            }
        }
    }

    /// Closes every session of `user` on this shard with 4001; returns how many.
    fn kick(&self, user: &str) -> usize {
        let ids: Vec<TimerId> = self.hub.borrow().all_of_user(user);
        let mut closed = 0;
        for s in ids.into_iter().filter_map(|id| self.session(id)) {
            s.request_close(codec::close::KICKED, "disconnected by the server");
            closed += 1;
        }
        closed
    }

    /// Handles a message from another node.
    async fn on_cluster(self: &Rc<Self>, env: Envelope) {
        match env.msg {
            ClusterMsg::Msg { conv, seq, members_version, json } => {
                conv::on_remote_msg(self, conv, seq, members_version, json)
            }
            ClusterMsg::Members { conv, members_version, last_seq, added, removed } => {
                let change = MembersChange { at: last_seq, version: members_version, added, removed };
                conv::members_changed(self, &conv, change)
            }
            ClusterMsg::Push { users, json } => {
                let users: Arc<[Key]> = users.into();
                let frame = codec::text_frame(&json);
                for shard in 0..self.shard_count {
                    self.route(shard, ShardMsg::Push { users: users.clone(), frame: frame.clone() });
                }
            }
            ClusterMsg::Broadcast { json } => {
                let frame = codec::text_frame(&json);
                for shard in 0..self.shard_count {
                    self.route(shard, ShardMsg::Broadcast { frame: frame.clone() });
                }
            }
            ClusterMsg::Disconnect { user } => {
                for shard in 0..self.shard_count {
                    self.route(shard, ShardMsg::Kick { user: user.clone() });
                }
            }
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
            self.local.borrow_mut().push_back(msg);
            if let Some(w) = self.local_waker.take() {
                w.wake();
            }
        } else {
            self.mesh.send(to, msg);
        }
    }

    /// Puts a session on the flush list; the flusher runs after the tasks already woken,
    /// so a session gets every frame the shard has for it until then in one `send`.
    pub fn flush_later(&self, id: TimerId) {
        self.flush_list.borrow_mut().push(id);
        if let Some(w) = self.flush_waker.take() {
            w.wake();
        }
    }

    /// Writes the queues of the sessions on the flush list, whenever there are any.
    async fn run_flusher(self: Rc<Self>) {
        let mut due = Vec::new();
        loop {
            futures_lite::future::poll_fn(|cx| {
                if self.flush_list.borrow().is_empty() {
                    self.flush_waker.set(Some(cx.waker().clone()));
                    Poll::Pending
                } else {
                    Poll::Ready(())
                }
            })
            .await;
            std::mem::swap(&mut due, &mut *self.flush_list.borrow_mut());
            for (i, id) in due.drain(..).enumerate() {
                if let Some(session) = self.session(id) {
                    session.flush(&self);
                }
                if i % FANOUT_BATCH == FANOUT_BATCH - 1 {
                    glommio::yield_if_needed().await;
                }
            }
            // A fan-out to every connection grows the list to one entry each: give that
            // back rather than keep it (the two lists take turns, so both shrink).
            due.shrink_to(FANOUT_BATCH);
        }
    }

    /// Adds a session to the shard's table and schedules its first heartbeat. A client
    /// session also joins the hub (its user's conversations are loaded on first arrival).
    pub fn register(&self, make: impl FnOnce(TimerId) -> Session) -> Rc<Session> {
        let session = self.sessions.borrow_mut().insert(make);
        self.schedule(session.id, session.next_deadline(self.config.heartbeat.idle_timeout_ms));
        self.metrics.connections.inc();
        if let Kind::Client { user, .. } = &session.kind {
            let first = self.hub.borrow_mut().arrive(user, session.id);
            if first {
                if let Some(links) = self.links() {
                    // Pushes, disconnects and membership changes of the user, from any node.
                    links.bus.subscribe(Topic::user(user));
                }
            }
            // The join: the user's conversations from its owner, then one `Join` to the
            // owner of each (see `settle`).
            self.loading.set(self.loading.get() + 1);
            let load = ShardMsg::LoadUser { shard: self.id, user: user.clone(), session: session.id };
            self.route(self.owner_of(user), load);
            self.presence_changed(PresenceOp::Add { user: user.clone(), entry: self.presence(&session) });
        }
        session
    }

    /// A join's store read failed (Redis away): the request goes again after
    /// [`JOIN_RETRY`], and the session's `hello` waits for it (it must not be promised
    /// conversations it is not in the fan-out of).
    fn ask_again(self: &Rc<Self>, msg: ShardMsg) {
        let to = match &msg {
            ShardMsg::LoadUser { user, .. } => self.owner_of(user),
            ShardMsg::Join { convs, .. } => convs.first().map_or(self.id, |c| self.owner_of(c)),
            _ => return,
        };
        self.loading.set(self.loading.get() + 1);
        let me = self.clone();
        glommio::spawn_local(async move {
            glommio::timer::sleep(JOIN_RETRY).await;
            me.route(to, msg);
        })
        .detach();
    }

    /// Every owner has answered a client session's join: it takes part in its user's
    /// conversations from here, gets its `hello`, and its grace starts.
    fn settle(&self, session: &Session) {
        let Kind::Client { user, .. } = &session.kind else { return };
        if !self.hub.borrow_mut().settle(user, session.id) {
            return;
        }
        session.opened(self, &self.conn_id(session.conn));
        let due = self.now_ms() + session::SYNC_GRACE_MS;
        self.graces.borrow_mut().push_back((due, session.id));
        if let Some(w) = self.grace_waker.take() {
            w.wake();
        }
    }

    /// Ends the grace of each session when it is due: the live messages it held for a
    /// first `sync` that did not come go out.
    async fn run_graces(self: Rc<Self>) {
        loop {
            let (due, id) = futures_lite::future::poll_fn(|cx| match self.graces.borrow().front() {
                Some(&next) => Poll::Ready(next),
                None => {
                    self.grace_waker.set(Some(cx.waker().clone()));
                    Poll::Pending
                }
            })
            .await;
            let now = self.now_ms();
            if due > now {
                glommio::timer::sleep(Duration::from_millis(due - now)).await;
                continue;
            }
            self.graces.borrow_mut().pop_front();
            if let Some(session) = self.session(id) {
                session.release_held(&self);
            }
        }
    }

    pub fn unregister(&self, session: &Session) {
        self.sessions.borrow_mut().remove(session.id);
        self.admission.borrow_mut().release(session.ip);
        self.metrics.connections.dec();
        self.node.connections.fetch_sub(1, Ordering::Relaxed);
        if let Kind::Client { user, .. } = &session.kind {
            let emptied = self.hub.borrow_mut().detach(user, session.id);
            for conv in emptied {
                self.lost_interest(conv);
            }
            if !self.hub.borrow().has_user(user) {
                if let Some(links) = self.links() {
                    links.bus.unsubscribe(Topic::user(user));
                }
            }
            let conn = Key::from(self.conn_id(session.conn));
            self.presence_changed(PresenceOp::Remove { user: user.clone(), conn });
        }
    }

    /// This shard has no session left in `conv`: tell its owner, unless a request that
    /// may bring one back is out (its answer would race the notice).
    fn lost_interest(&self, conv: Key) {
        if self.loading.get() == 0 {
            let owner = self.owner_of(&conv);
            self.route(owner, ShardMsg::InterestOff { shard: self.id, conv });
        }
    }

    /// A request that may add to the index was answered.
    fn loaded(&self) {
        self.loading.set(self.loading.get().saturating_sub(1));
    }

    /// A sync request left this shard (its answer is counted by `loaded`).
    pub fn loading_started(&self) {
        self.loading.set(self.loading.get() + 1);
    }

    pub fn session(&self, id: TimerId) -> Option<Rc<Session>> {
        self.sessions.borrow().get(id)
    }

    fn schedule(&self, id: TimerId, at_ms: u64) {
        let mut wheel = self.wheel.borrow_mut();
        let tick = at_ms.div_ceil(wheel.tick_ms());
        wheel.insert(id, tick);
    }

    /// The heartbeat loop: every tick, visit the sessions whose earliest deadline is due.
    /// Activity never touches the wheel; a visited session re-checks itself and is put
    /// back at its next deadline.
    async fn run_wheel(self: Rc<Self>) {
        let tick = Duration::from_millis(self.wheel.borrow().tick_ms());
        let mut due: Vec<TimerId> = Vec::with_capacity(1024);
        let mut last = self.now_ms();
        loop {
            glommio::timer::sleep(tick).await;
            let now = self.now_ms();
            if now > last + STALL_MS && self.redis().is_some() {
                warn!(shard = self.id, stalled_ms = now - last, "the shard did not run for a while");
                self.check_all();
            }
            last = now;
            let to = now / self.wheel.borrow().tick_ms();
            self.wheel.borrow_mut().advance(to, &mut due);
            for (i, id) in due.drain(..).enumerate() {
                if let Some(session) = self.session(id) {
                    if let Some(next) = session.on_timer(&self, now) {
                        self.schedule(id, next);
                    }
                }
                if i % FANOUT_BATCH == FANOUT_BATCH - 1 {
                    glommio::yield_if_needed().await;
                }
            }
            // A fan-out to every connection grows the list to one entry each: give that
            // back rather than keep it (the two lists take turns, so both shrink).
            due.shrink_to(FANOUT_BATCH);
        }
    }

    /// Asks every session to close with `code` (drain).
    fn close_all(&self, code: u16, reason: &'static str) {
        let sessions = self.sessions.borrow().all();
        for s in sessions {
            s.request_close(code, reason);
        }
    }

    /// Handles one message from another executor (or from itself).
    async fn handle(self: &Rc<Self>, msg: ShardMsg) {
        match msg {
            // As a conversation's owner.
            ShardMsg::Send { origin, conv, msg } => conv::on_send(self, origin, conv, msg).await,
            ShardMsg::Sync { session, user, conv, reply } => {
                conv::on_sync(self, session, user, conv, reply).await
            }
            ShardMsg::Join { shard, user, convs, session } => {
                conv::on_join(self, shard, user, convs, session).await
            }
            ShardMsg::InterestOff { shard, conv } => self.unwant(&conv, shard),
            ShardMsg::Members { reply, conv, op, users } => {
                // It waits on the users' owners: run it beside the receive loop.
                let me = self.clone();
                glommio::spawn_local(async move { conv::on_members(&me, reply, conv, op, users).await })
                    .detach();
            }
            ShardMsg::Conversation { reply, conv } => conv::on_conversation(self, reply, conv).await,

            // As a user's owner.
            ShardMsg::LoadUser { shard, user, session } => {
                let convs = self.store.user_convs(&user).await.ok();
                self.route(shard, ShardMsg::UserConvs { user, convs, session });
            }
            ShardMsg::LinkUser { reply, user, conv, member } => {
                let done = self.store.link_user(&user, &conv, member).await;
                self.mesh.reply(reply, if done.is_ok() { Reply::Done } else { Reply::Unavailable });
            }
            ShardMsg::Presence { reply, user } => {
                let ids: Vec<TimerId> = self.hub.borrow().all_of_user(&user);
                let list =
                    ids.into_iter().filter_map(|id| self.session(id)).map(|s| self.presence(&s)).collect();
                self.mesh.reply(reply, Reply::Presence(list));
            }

            // As a shard with sessions.
            ShardMsg::Deliver { conv, seq, frame, exclude } => self.deliver(conv, seq, frame, exclude).await,
            ShardMsg::MembersNow { conv, members } => {
                let emptied = self.hub.borrow_mut().reconcile(&conv, &members);
                if emptied {
                    self.lost_interest(conv);
                }
            }
            ShardMsg::MembersChanged { conv, added, removed } => {
                let mut hub = self.hub.borrow_mut();
                for user in &added {
                    hub.join(user, &conv);
                }
                let mut emptied = false;
                for user in &removed {
                    emptied |= hub.leave(user, &conv);
                }
                drop(hub);
                if emptied {
                    self.lost_interest(conv);
                }
            }
            ShardMsg::Push { users, frame } => {
                for user in users.iter() {
                    let ids: Vec<TimerId> = self.hub.borrow().of_user(user).to_vec();
                    for id in ids {
                        if let Some(s) = self.session(id) {
                            s.push_bounded(frame.clone(), self);
                        }
                    }
                }
            }
            ShardMsg::Broadcast { frame } => {
                let sessions = self.sessions.borrow().all();
                for (i, s) in sessions.iter().enumerate() {
                    if matches!(s.kind, Kind::Client { .. }) {
                        s.push_bounded(frame.clone(), self);
                    }
                    if i % FANOUT_BATCH == FANOUT_BATCH - 1 {
                        glommio::yield_if_needed().await;
                    }
                }
            }
            ShardMsg::Disconnect { reply, user } => {
                let closed = self.kick(&user);
                self.mesh.reply(reply, Reply::Closed(closed));
            }
            ShardMsg::Kick { user } => {
                self.kick(&user);
            }
            ShardMsg::Missed { conv, from, to } => {
                let ids: Vec<TimerId> = self.hub.borrow().in_conv(&conv).to_vec();
                for id in ids {
                    if let Some(s) = self.session(id) {
                        s.missed(self, &conv, from, to);
                    }
                }
            }
            ShardMsg::Reregister => {
                self.reregister();
                self.check_all();
                let Some(redis) = self.redis().cloned() else { return };
                let seen: Vec<(Key, u64)> =
                    self.order.borrow().iter().map(|(conv, h)| (conv.clone(), h.highest())).collect();
                if !seen.is_empty() {
                    if let Err(e) = redis.reseed(seen).await {
                        warn!(shard = self.id, error = %e, "counters not re-seeded");
                    }
                }
            }
            ShardMsg::Ping { reply } => self.mesh.reply(reply, Reply::Done),
            ShardMsg::Drain => {
                self.draining.set(true);
                if let Some(w) = self.drain_waker.take() {
                    w.wake();
                }
            }
            ShardMsg::ToSession { session, frame } => {
                if let Some(s) = self.session(session) {
                    s.push(frame, self);
                }
            }
            ShardMsg::Synced { session, conv, reply, result } => {
                self.loaded();
                if let Some(s) = self.session(session) {
                    if let (Ok(_), Kind::Client { user, .. }) = (&result, &s.kind) {
                        // The owner confirmed membership and now sends this shard the
                        // conversation: make sure the user's sessions are indexed in it.
                        self.hub.borrow_mut().join(user, &conv);
                    }
                    s.finish_sync(self, &conv, reply, result);
                }
            }
            ShardMsg::Joined { user, convs, session } => {
                self.loaded();
                let convs = match convs {
                    Ok(convs) => convs,
                    Err(convs) => {
                        if self.session(session).is_some() {
                            let join = ShardMsg::Join { shard: self.id, user, convs, session };
                            self.ask_again(join);
                        }
                        return;
                    }
                };
                {
                    let mut hub = self.hub.borrow_mut();
                    for (conv, _) in &convs {
                        hub.join(&user, conv);
                    }
                }
                let Some(s) = self.session(session).filter(|s| !s.is_open()) else { return };
                for (conv, upto) in &convs {
                    if *upto > 0 {
                        s.skip_earlier(conv, *upto);
                    }
                }
                if s.join_answered() {
                    self.settle(&s);
                }
            }
            ShardMsg::UserConvs { user, convs, session } => {
                self.loaded();
                let Some(s) = self.session(session) else { return };
                let Some(convs) = convs else {
                    return self.ask_again(ShardMsg::LoadUser { shard: self.id, user, session });
                };
                let mut by_owner: Vec<(usize, Vec<Key>)> = Vec::new();
                for conv in convs {
                    let owner = self.owner_of(&conv);
                    match by_owner.iter_mut().find(|(o, _)| *o == owner) {
                        Some((_, list)) => list.push(conv),
                        None => by_owner.push((owner, vec![conv])),
                    }
                }
                s.join_started(by_owner.len());
                if by_owner.is_empty() {
                    return self.settle(&s);
                }
                for (owner, convs) in by_owner {
                    self.loading.set(self.loading.get() + 1);
                    let join = ShardMsg::Join { shard: self.id, user: user.clone(), convs, session };
                    self.route(owner, join);
                }
            }
            ShardMsg::Reply { id, reply } => self.mesh.complete(id, reply),
        }
    }

    /// Writes a conversation message to this shard's sessions in it.
    async fn deliver(&self, conv: Key, seq: u64, frame: bytes::Bytes, exclude: Option<SessionRef>) {
        let ids: Vec<TimerId> = self.hub.borrow().in_conv(&conv).to_vec();
        if ids.is_empty() {
            self.lost_interest(conv);
            return;
        }
        let skip = exclude.filter(|e| e.shard == self.id).map(|e| e.id);
        for (i, id) in ids.into_iter().enumerate() {
            if Some(id) != skip {
                if let Some(s) = self.session(id) {
                    s.deliver(self, &conv, seq, &frame);
                }
            }
            if i % FANOUT_BATCH == FANOUT_BATCH - 1 {
                glommio::yield_if_needed().await;
            }
        }
    }
}

/// Runs a shard until it is drained. Called on the shard's own executor thread.
pub async fn run(setup: ShardSetup) {
    let config = setup.node.config.clone();
    let tick_ms = (config.heartbeat.ping_interval_ms / 4).clamp(10, 100);
    let (mesh, receivers) = Mesh::connect(setup.mesh).await;
    let shard = Rc::new(Shard {
        id: setup.id,
        shard_count: setup.node.shard_count,
        ws_config: codec::server_config(config.limits.max_message_bytes),
        verifier: Verifier::new(&config.auth.secret, config.auth.leeway_secs),
        admission: RefCell::new(Admission::new(
            config.limits.connect_rate_per_sec,
            config.limits.max_connections_per_ip,
            setup.node.shard_count,
            setup.node.epoch ^ (setup.id as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15),
        )),
        store: match &setup.node.redis {
            Some(redis) => NodeStore::Redis(redis.clone()),
            None => NodeStore::Memory(MemoryStore::new(
                config.history.max_per_conv,
                config.limits.dedupe_window_ms,
            )),
        },
        order: RefCell::default(),
        repairs: RefCell::default(),
        repair_waker: Cell::new(None),
        reconciles: RefCell::default(),
        reconcile_waker: Cell::new(None),
        checks: RefCell::default(),
        presence_out: RefCell::default(),
        config,
        metrics: setup.metrics,
        node: setup.node,
        mesh,
        interest: RefCell::default(),
        hub: RefCell::default(),
        loading: Cell::new(0),
        local: RefCell::default(),
        local_waker: Cell::new(None),
        flush_list: RefCell::default(),
        flush_waker: Cell::new(None),
        graces: RefCell::default(),
        grace_waker: Cell::new(None),
        sessions: RefCell::new(Slab::default()),
        wheel: RefCell::new(Wheel::new(tick_ms, 4096)),
        gate: Gate::new(),
        started: Instant::now(),
        next_conn: Cell::new(0),
        draining: Cell::new(false),
        drain_waker: Cell::new(None),
    });
    // SAFETY: the fd is a bound, listening TCP socket handed over by the server.
    let listener = unsafe { TcpListener::from_raw_fd(setup.listener.into_raw_fd()) };
    glommio::spawn_local(shard.clone().run_wheel()).detach();
    for (_, rx) in receivers {
        glommio::spawn_local(receive(shard.clone(), rx)).detach();
    }
    glommio::spawn_local(receive_local(shard.clone())).detach();
    glommio::spawn_local(shard.clone().run_flusher()).detach();
    glommio::spawn_local(shard.clone().run_graces()).detach();
    if shard.redis().is_some() {
        glommio::spawn_local(shard.clone().run_repairs()).detach();
        glommio::spawn_local(shard.clone().run_reconciles()).detach();
        glommio::spawn_local(shard.clone().run_presence()).detach();
        glommio::spawn_local(shard.clone().run_checks()).detach();
    }
    if let Some(inbound) = setup.inbound {
        let me = shard.clone();
        glommio::spawn_local(async move {
            while let Ok(env) = inbound.recv_async().await {
                me.on_cluster(env).await;
            }
        })
        .detach();
    }
    shard.node.ready_shards.fetch_add(1, Ordering::Release);
    debug!(shard = shard.id, "accepting");

    let accept = accept_loop(shard.clone(), listener);
    let drain = futures_lite::future::poll_fn(|cx| {
        if shard.draining.get() {
            Poll::Ready(())
        } else {
            shard.drain_waker.set(Some(cx.waker().clone()));
            Poll::Pending
        }
    });
    futures_lite::future::or(accept, drain).await;

    shard.close_all(codec::close::GOING_AWAY, "server shutting down");
    let closed = glommio::timer::timeout(DRAIN_WAIT, async {
        let _ = shard.gate.close().await;
        Ok(())
    })
    .await;
    if closed.is_err() {
        warn!(shard = shard.id, "drain bound reached with sessions still open");
    }
    info!(shard = shard.id, "drained");
    shard.node.stopped_shards.fetch_add(1, Ordering::Release);
}

/// Handles the messages of one peer, in the order sent.
async fn receive(shard: Rc<Shard>, rx: ConnectedReceiver<ShardMsg>) {
    while let Some(msg) = rx.recv().await {
        shard.handle(msg).await;
    }
}

/// Handles the messages the shard sent itself, in the order sent.
async fn receive_local(shard: Rc<Shard>) {
    loop {
        let msg = futures_lite::future::poll_fn(|cx| match shard.local.borrow_mut().pop_front() {
            Some(msg) => Poll::Ready(msg),
            None => {
                shard.local_waker.set(Some(cx.waker().clone()));
                Poll::Pending
            }
        })
        .await;
        shard.handle(msg).await;
    }
}

async fn accept_loop(shard: Rc<Shard>, listener: TcpListener) {
    loop {
        match listener.accept().await {
            Ok(stream) => {
                let peer = stream.peer_addr().unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
                let _ = stream.set_nodelay(true);
                let task = session::serve(shard.clone(), stream, peer);
                if shard.gate.spawn(task).map(|t| t.detach()).is_err() {
                    return;
                }
            }
            Err(e) => {
                // EMFILE/ENFILE/ENOBUFS: back off briefly instead of spinning; the
                // kernel keeps the pending connections in the backlog meanwhile.
                warn!(shard = shard.id, error = %e, "accept failed");
                glommio::timer::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// The shard's session table: a slab whose keys carry a generation, so a stale key (a
/// wheel entry for a session that ended and whose slot was reused) finds nothing.
#[derive(Default)]
struct Slab {
    slots: Vec<Slot>,
    free: Vec<u32>,
}

struct Slot {
    generation: u32,
    session: Option<Rc<Session>>,
}

impl Slab {
    fn insert(&mut self, make: impl FnOnce(TimerId) -> Session) -> Rc<Session> {
        let index = match self.free.pop() {
            Some(i) => i,
            None => {
                self.slots.push(Slot { generation: 0, session: None });
                (self.slots.len() - 1) as u32
            }
        };
        let slot = &mut self.slots[index as usize];
        slot.generation = slot.generation.wrapping_add(1);
        let session = Rc::new(make(TimerId { index, generation: slot.generation }));
        slot.session = Some(session.clone());
        session
    }

    fn get(&self, id: TimerId) -> Option<Rc<Session>> {
        let slot = self.slots.get(id.index as usize)?;
        if slot.generation != id.generation {
            return None;
        }
        slot.session.clone()
    }

    fn remove(&mut self, id: TimerId) {
        if let Some(slot) = self.slots.get_mut(id.index as usize) {
            if slot.generation == id.generation && slot.session.take().is_some() {
                self.free.push(id.index);
            }
        }
    }

    fn all(&self) -> Vec<Rc<Session>> {
        self.slots.iter().filter_map(|s| s.session.clone()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slab_keys_carry_generations() {
        let mut slab = Slab::default();
        let a = slab.insert(Session::for_test);
        let id = a.id;
        slab.remove(id);
        let b = slab.insert(Session::for_test);
        assert_eq!(b.id.index, id.index);
        assert!(slab.get(id).is_none(), "a stale key must not find the new session");
        assert!(slab.get(b.id).is_some());
    }
}
