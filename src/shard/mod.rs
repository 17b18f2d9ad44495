//! One core: its listener, its sessions, its timer wheel, its part of the store, and the
//! conversations and users it owns.
//!
//! A shard is a glommio `LocalExecutor` pinned to one CPU. It accepts on its own
//! `SO_REUSEPORT` listener, so a connection lives its whole life here. Everything in
//! [`Shard`] is `!Send` and touched only from this thread; other executors reach a shard
//! through the mesh ([`ShardMsg`]). Nothing here blocks: sockets are io_uring-driven, the
//! heartbeat work per tick is bounded by what is due, and long fan-outs yield.
//!
//! What the shard's parts share is its context ([`Ctx`]); the conversations it owns are
//! [`Owner`]'s (in `conv`), which gets the messages addressed to a conversation's owner.
//! This module keeps the executor's tasks, the session table (`table`), the hub (kept in its `Ctx`), the
//! timer wheel, the graces, the presence writer (`presence`), the users it owns for
//! `user.online`/`user.offline` webhooks (`online`), and the handling of the messages
//! addressed to a user's owner and to the shard's sessions.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;

use std::net::SocketAddr;
use std::os::fd::{FromRawFd, IntoRawFd, OwnedFd};
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::Duration;

use glommio::channels::shared_channel::ConnectedReceiver;
use glommio::net::TcpListener;
use glommio::sync::Gate;
use tracing::{debug, info, warn};

use crate::admission::Admission;
use crate::cluster::{ClusterMsg, Envelope, Topic};
mod online;
mod presence;
mod table;

use crate::conv::{self, Delivery, MembersChange, Owner};
use crate::ctx::{Ctx, CtxParts};
use crate::ids::Key;
use crate::mesh::{Answer, ConvMsg, Mesh, MeshEnds, Reply, SessionRef, ShardMsg, ShardWide, UserMsg};
use crate::metrics::ShardMetrics;
use crate::node::Node;
use crate::session::{self, Kind, Session};
use crate::store::{MemoryStore, NodeStore, PresenceOp, Store};
use crate::wake::Mailbox;
use crate::wheel::{TimerId, Wheel};
use crate::ws::codec;
use online::OnlineUsers;
use presence::PresenceWriter;
use table::Slab;

/// How long a draining shard waits for its clients' close replies before it stops.
const DRAIN_WAIT: Duration = Duration::from_secs(3);

/// Recipients served in one go before a fan-out yields to the rest of the shard.
const FANOUT_BATCH: usize = 256;

/// How long a join whose store read failed waits before it asks again.
const JOIN_RETRY: Duration = Duration::from_millis(250);

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
    /// What the shard's parts share (config, metrics, mesh, store, clock).
    pub ctx: Rc<Ctx>,
    /// The conversations this shard owns: interest, delivery order, repairs.
    pub owner: Rc<Owner>,
    /// Presence changes of this shard's connections not yet written to Redis.
    presence: Rc<PresenceWriter>,
    /// The users this shard owns that have connections on the node (webhooks only).
    online: Rc<OnlineUsers>,
    /// Client sessions in their grace after `hello`, by the shard-clock ms it ends, in
    /// that order (the grace is the same for all): see `session::SYNC_GRACE_MS`.
    graces: Mailbox<(u64, TimerId)>,
    sessions: RefCell<Slab>,
    wheel: RefCell<Wheel>,
    /// Every session task runs through the gate, so a drain can wait for them.
    pub gate: Gate,
    drain_waker: Cell<Option<Waker>>,
}

impl Shard {
    /// Closes every session of `user` on this shard with 4001; returns how many.
    fn kick(&self, user: &str) -> usize {
        let ids: Vec<TimerId> = self.ctx.hub.borrow().all_of_user(user);
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
                conv::on_remote_msg(&self.owner, conv, seq, members_version, json)
            }
            ClusterMsg::Members { conv, members_version, last_seq, added, removed } => {
                let change = MembersChange { at: last_seq, version: members_version, added, removed };
                conv::members_changed(&self.owner, &conv, change)
            }
            ClusterMsg::Push { users, json } => {
                let users: Arc<[Key]> = users.into();
                let frame = codec::text_frame(&json);
                for shard in 0..self.ctx.shard_count {
                    self.ctx.route(
                        shard,
                        ShardMsg::Shard(ShardWide::Push { users: users.clone(), frame: frame.clone() }),
                    );
                }
            }
            ClusterMsg::Broadcast { json } => {
                let frame = codec::text_frame(&json);
                for shard in 0..self.ctx.shard_count {
                    self.ctx.route(shard, ShardMsg::Shard(ShardWide::Broadcast { frame: frame.clone() }));
                }
            }
            ClusterMsg::Disconnect { user } => {
                for shard in 0..self.ctx.shard_count {
                    self.ctx.route(shard, ShardMsg::Shard(ShardWide::Kick { user: user.clone() }));
                }
            }
            ClusterMsg::ToUser { user, json } => {
                let frame = codec::text_frame(&json);
                for shard in 0..self.ctx.shard_count {
                    let msg = ShardWide::ToUser { user: user.clone(), frame: frame.clone(), exclude: None };
                    self.ctx.route(shard, ShardMsg::Shard(msg));
                }
            }
            ClusterMsg::Signal { conv, json } => conv::on_remote_signal(&self.owner, conv, json),
        }
    }

    /// Writes the queues of the sessions on the flush list, whenever there are any.
    async fn run_flusher(self: Rc<Self>) {
        let mut due = VecDeque::new();
        loop {
            self.ctx.flush_list.ready().await;
            std::mem::swap(&mut due, &mut *self.ctx.flush_list.items());
            for (i, id) in due.drain(..).enumerate() {
                if let Some(session) = self.session(id) {
                    session.flush(&self.ctx);
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

    /// A join's store read failed (Redis away): the request goes again after
    /// [`JOIN_RETRY`], and the session's `hello` waits for it (it must not be promised
    /// conversations it is not in the fan-out of).
    fn ask_again(self: &Rc<Self>, msg: ShardMsg) {
        let to = match &msg {
            ShardMsg::User(UserMsg::LoadUser { user, .. }) => self.ctx.owner_of(user),
            ShardMsg::Conv(ConvMsg::Join { convs, .. }) => {
                convs.first().map_or(self.ctx.id, |c| self.ctx.owner_of(c))
            }
            _ => return,
        };
        self.ctx.loading_started();
        let me = self.clone();
        glommio::spawn_local(async move {
            glommio::timer::sleep(JOIN_RETRY).await;
            me.ctx.route(to, msg);
        })
        .detach();
    }

    /// Every owner has answered a client session's join: it takes part in its user's
    /// conversations from here, gets its `hello`, and its grace starts.
    fn settle(&self, session: &Session) {
        let Kind::Client { user, .. } = &session.kind else { return };
        if !self.ctx.hub.borrow_mut().settle(user, session.id) {
            return;
        }
        session.opened(&self.ctx, &self.ctx.conn_id(session.conn));
        let due = self.ctx.now_ms() + session::SYNC_GRACE_MS;
        self.graces.push((due, session.id));
    }

    /// Ends the grace of each session when it is due: the live messages it held for a
    /// first `sync` that did not come go out.
    async fn run_graces(self: Rc<Self>) {
        loop {
            self.graces.ready().await;
            let Some(&(due, id)) = self.graces.items().front() else { continue };
            let now = self.ctx.now_ms();
            if due > now {
                glommio::timer::sleep(Duration::from_millis(due - now)).await;
                continue;
            }
            self.graces.items().pop_front();
            if let Some(session) = self.session(id) {
                session.release_held(&self.ctx);
            }
        }
    }

    /// This shard has no session left in `conv` (at seq `seq` of it, 0 when not at a
    /// message): tell its owner, unless a request that may bring one back is out (its
    /// answer would race the notice).
    fn lost_interest(&self, conv: Key, seq: u64) {
        if !self.ctx.is_loading() {
            let owner = self.ctx.owner_of(&conv);
            let off = ConvMsg::InterestOff { shard: self.ctx.id, conv, seq };
            self.ctx.route(owner, ShardMsg::Conv(off));
        }
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
        let mut last = self.ctx.now_ms();
        loop {
            glommio::timer::sleep(tick).await;
            let now = self.ctx.now_ms();
            if now > last + STALL_MS && self.owner.delivery == Delivery::InOrder {
                warn!(shard = self.ctx.id, stalled_ms = now - last, "the shard did not run for a while");
                self.owner.check_all();
            }
            last = now;
            let to = now / self.wheel.borrow().tick_ms();
            self.wheel.borrow_mut().advance(to, &mut due);
            for (i, id) in due.drain(..).enumerate() {
                if let Some(session) = self.session(id) {
                    if let Some(next) = session.on_timer(&self.ctx, now) {
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

    /// Handles one message from another executor (or from itself), by the role this
    /// shard plays for it.
    async fn handle(self: &Rc<Self>, msg: ShardMsg) {
        match msg {
            ShardMsg::Conv(msg) => conv::handle(&self.owner, msg).await,
            ShardMsg::User(msg) => self.as_user_owner(msg).await,
            ShardMsg::Shard(msg) => self.for_sessions(msg).await,
            ShardMsg::Answer(msg) => self.answered(msg),
            ShardMsg::Reply { id, reply } => self.ctx.mesh.complete(id, reply),
        }
    }

    /// As the owner of a user.
    async fn as_user_owner(&self, msg: UserMsg) {
        match msg {
            UserMsg::LoadUser { shard, user, session } => {
                let convs = self.ctx.store.user_convs(&user).await.ok();
                self.ctx.route(shard, ShardMsg::Answer(Answer::UserConvs { user, convs, session }));
            }
            UserMsg::LinkUser { reply, user, conv, member } => {
                let done = self.ctx.store.link_user(&user, &conv, member).await;
                self.ctx.mesh.reply(reply, if done.is_ok() { Reply::Done } else { Reply::Unavailable });
            }
            UserMsg::Came { user } => online::came(&self.ctx, &self.online, user),
            UserMsg::Left { user } => online::left(&self.ctx, &self.online, user),
            UserMsg::AreOnline { reply, users } => {
                self.ctx.mesh.reply(reply, Reply::Online(self.online.are_online(&users)));
            }
            UserMsg::Convs { reply, user } => {
                let answer = match self.ctx.store.user_convs(&user).await {
                    Ok(convs) => Reply::Convs(convs),
                    Err(_) => Reply::Unavailable,
                };
                self.ctx.mesh.reply(reply, answer);
            }
            UserMsg::Presence { reply, user } => {
                let ids: Vec<TimerId> = self.ctx.hub.borrow().all_of_user(&user);
                let list = ids
                    .into_iter()
                    .filter_map(|id| self.session(id))
                    .map(|s| presence::entry(&self.ctx, &s))
                    .collect();
                self.ctx.mesh.reply(reply, Reply::Presence(list));
            }
        }
    }

    /// For this shard's sessions and its part of the node.
    async fn for_sessions(&self, msg: ShardWide) {
        match msg {
            ShardWide::Deliver { conv, seq, frame, exclude } => self.deliver(conv, seq, frame, exclude).await,
            ShardWide::MembersNow { conv, members } => {
                let emptied = self.ctx.hub.borrow_mut().reconcile(&conv, &members);
                if emptied {
                    self.lost_interest(conv, 0);
                }
            }
            ShardWide::MembersChanged { conv, added, removed } => {
                let mut hub = self.ctx.hub.borrow_mut();
                for user in &added {
                    hub.join(user, &conv);
                }
                let mut emptied = false;
                for user in &removed {
                    emptied |= hub.leave(user, &conv);
                }
                drop(hub);
                if emptied {
                    self.lost_interest(conv, 0);
                }
            }
            ShardWide::Push { users, frame } => {
                for user in users.iter() {
                    let ids: Vec<TimerId> = self.ctx.hub.borrow().of_user(user).to_vec();
                    for id in ids {
                        if let Some(s) = self.session(id) {
                            s.push_bounded(frame.clone(), &self.ctx);
                        }
                    }
                }
            }
            ShardWide::Broadcast { frame } => {
                let sessions = self.sessions.borrow().all();
                for (i, s) in sessions.iter().enumerate() {
                    if matches!(s.kind, Kind::Client { .. }) {
                        s.push_bounded(frame.clone(), &self.ctx);
                    }
                    if i % FANOUT_BATCH == FANOUT_BATCH - 1 {
                        glommio::yield_if_needed().await;
                    }
                }
            }
            ShardWide::ToUser { user, frame, exclude } => {
                let skip = exclude.filter(|e| e.shard == self.ctx.id).map(|e| e.id);
                let ids: Vec<TimerId> = self.ctx.hub.borrow().of_user(&user).to_vec();
                for id in ids.into_iter().filter(|id| Some(*id) != skip) {
                    if let Some(s) = self.session(id) {
                        s.push(frame.clone(), &self.ctx);
                    }
                }
            }
            ShardWide::Signal { conv, frame, exclude } => {
                let skip = exclude.filter(|e| e.shard == self.ctx.id).map(|e| e.id);
                let ids: Vec<TimerId> = self.ctx.hub.borrow().in_conv(&conv).to_vec();
                for (i, id) in ids.into_iter().enumerate() {
                    if Some(id) != skip {
                        if let Some(s) = self.session(id) {
                            s.offer_signal(frame.clone(), &self.ctx);
                        }
                    }
                    if i % FANOUT_BATCH == FANOUT_BATCH - 1 {
                        glommio::yield_if_needed().await;
                    }
                }
            }
            ShardWide::Disconnect { reply, user } => {
                let closed = self.kick(&user);
                self.ctx.mesh.reply(reply, Reply::Closed(closed));
            }
            ShardWide::Kick { user } => {
                self.kick(&user);
            }
            ShardWide::Missed { conv, from, to } => {
                let ids: Vec<TimerId> = self.ctx.hub.borrow().in_conv(&conv).to_vec();
                for id in ids {
                    if let Some(s) = self.session(id) {
                        s.missed(&self.ctx, &conv, from, to);
                    }
                }
            }
            ShardWide::Reregister => {
                self.presence.reregister(&self.ctx, &self.sessions.borrow().all());
                self.owner.check_all();
                let Some(redis) = self.ctx.redis().cloned() else { return };
                let seen: Vec<(Key, u64)> =
                    self.owner.order.borrow().iter().map(|(conv, h)| (conv.clone(), h.highest())).collect();
                if !seen.is_empty() {
                    if let Err(e) = redis.reseed(seen).await {
                        warn!(shard = self.ctx.id, error = %e, "counters not re-seeded");
                    }
                }
            }
            ShardWide::Ping { reply } => self.ctx.mesh.reply(reply, Reply::Done),
            ShardWide::Drain => {
                self.ctx.draining.set(true);
                if let Some(w) = self.drain_waker.take() {
                    w.wake();
                }
            }
        }
    }

    /// Answers to requests this shard's sessions made.
    fn answered(self: &Rc<Self>, msg: Answer) {
        match msg {
            Answer::ToSession { session, frame } => {
                if let Some(s) = self.session(session) {
                    s.push(frame, &self.ctx);
                }
            }
            Answer::Synced { session, conv, reply, result } => {
                self.ctx.loaded();
                if let Some(s) = self.session(session) {
                    if let (Ok(_), Kind::Client { user, .. }) = (&result, &s.kind) {
                        // The owner confirmed membership and now sends this shard the
                        // conversation: make sure the user's sessions are indexed in it.
                        self.ctx.hub.borrow_mut().join(user, &conv);
                    }
                    s.finish_sync(&self.ctx, &conv, reply, result);
                }
            }
            Answer::Joined { user, convs, session } => {
                self.ctx.loaded();
                let convs = match convs {
                    Ok(convs) => convs,
                    Err(convs) => {
                        if self.session(session).is_some() {
                            let join =
                                ShardMsg::Conv(ConvMsg::Join { shard: self.ctx.id, user, convs, session });
                            self.ask_again(join);
                        }
                        return;
                    }
                };
                {
                    let mut hub = self.ctx.hub.borrow_mut();
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
            Answer::UserConvs { user, convs, session } => {
                self.ctx.loaded();
                let Some(s) = self.session(session) else { return };
                let Some(convs) = convs else {
                    return self.ask_again(ShardMsg::User(UserMsg::LoadUser {
                        shard: self.ctx.id,
                        user,
                        session,
                    }));
                };
                let mut by_owner: Vec<(usize, Vec<Key>)> = Vec::new();
                for conv in convs {
                    let owner = self.ctx.owner_of(&conv);
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
                    self.ctx.loading_started();
                    let join = ShardMsg::Conv(ConvMsg::Join {
                        shard: self.ctx.id,
                        user: user.clone(),
                        convs,
                        session,
                    });
                    self.ctx.route(owner, join);
                }
            }
        }
    }

    /// Writes a conversation message to this shard's sessions in it.
    async fn deliver(&self, conv: Key, seq: u64, frame: bytes::Bytes, exclude: Option<SessionRef>) {
        let ids: Vec<TimerId> = self.ctx.hub.borrow().in_conv(&conv).to_vec();
        if ids.is_empty() {
            self.lost_interest(conv, seq);
            return;
        }
        let skip = exclude.filter(|e| e.shard == self.ctx.id).map(|e| e.id);
        for (i, id) in ids.into_iter().enumerate() {
            if Some(id) != skip {
                if let Some(s) = self.session(id) {
                    s.deliver(&self.ctx, &conv, seq, &frame);
                }
            }
            if i % FANOUT_BATCH == FANOUT_BATCH - 1 {
                glommio::yield_if_needed().await;
            }
        }
    }
}

impl session::Table for Shard {
    fn ctx(&self) -> &Ctx {
        &self.ctx
    }

    /// Adds a session to the shard's table and schedules its first heartbeat. A client
    /// session also joins the hub (its user's conversations are loaded on first arrival).
    fn register(&self, make: impl FnOnce(TimerId) -> Session) -> Rc<Session> {
        let session = self.sessions.borrow_mut().insert(make);
        self.schedule(session.id, session.next_deadline(self.ctx.config.heartbeat.idle_timeout_ms));
        self.ctx.metrics.connections.inc();
        if let Kind::Client { user, .. } = &session.kind {
            let first = self.ctx.hub.borrow_mut().arrive(user, session.id);
            if first {
                if let Some(links) = self.ctx.links() {
                    // Pushes, disconnects and membership changes of the user, from any node.
                    links.bus.subscribe(Topic::user(user));
                }
            }
            // The join: the user's conversations from its owner, then one `Join` to the
            // owner of each (see `settle`).
            self.ctx.loading_started();
            let load = ShardMsg::User(UserMsg::LoadUser {
                shard: self.ctx.id,
                user: user.clone(),
                session: session.id,
            });
            self.ctx.route(self.ctx.owner_of(user), load);
            self.presence.changed(
                &self.ctx,
                PresenceOp::Add { user: user.clone(), entry: presence::entry(&self.ctx, &session) },
            );
            if self.ctx.node.webhooks.is_some() {
                self.ctx.route(self.ctx.owner_of(user), ShardMsg::User(UserMsg::Came { user: user.clone() }));
            }
        }
        session
    }

    fn unregister(&self, session: &Session) {
        self.sessions.borrow_mut().remove(session.id);
        self.ctx.admission.borrow_mut().release(session.ip);
        self.ctx.metrics.connections.dec();
        self.ctx.node.connections.fetch_sub(1, Ordering::Relaxed);
        if let Kind::Client { user, .. } = &session.kind {
            let emptied = self.ctx.hub.borrow_mut().detach(user, session.id);
            for conv in emptied {
                self.lost_interest(conv, 0);
            }
            if !self.ctx.hub.borrow().has_user(user) {
                if let Some(links) = self.ctx.links() {
                    links.bus.unsubscribe(Topic::user(user));
                }
            }
            let conn = Key::from(self.ctx.conn_id(session.conn));
            self.presence.changed(&self.ctx, PresenceOp::Remove { user: user.clone(), conn });
            if self.ctx.node.webhooks.is_some() {
                self.ctx.route(self.ctx.owner_of(user), ShardMsg::User(UserMsg::Left { user: user.clone() }));
            }
        }
    }
}

/// Runs a shard until it is drained. Called on the shard's own executor thread.
pub async fn run(setup: ShardSetup) {
    let config = setup.node.config.clone();
    let tick_ms = (config.heartbeat.ping_interval_ms / 4).clamp(10, 100);
    let (mesh, receivers) = Mesh::connect(setup.mesh).await;
    let admission = Admission::new(
        config.limits.connect_rate_per_sec,
        config.limits.max_connections_per_ip,
        setup.node.shard_count,
        setup.node.epoch ^ (setup.id as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15),
    );
    let store = match &setup.node.redis {
        Some(redis) => NodeStore::Redis(redis.clone()),
        None => {
            NodeStore::Memory(MemoryStore::new(config.history.max_per_conv, config.limits.dedupe_window_ms))
        }
    };
    let ctx = Rc::new(Ctx::new(CtxParts {
        id: setup.id,
        config,
        metrics: setup.metrics,
        node: setup.node,
        mesh,
        store,
        admission,
    }));
    let shard = Rc::new(Shard {
        owner: Rc::new(Owner::new(ctx.clone())),
        ctx,
        presence: Rc::default(),
        online: Rc::default(),
        graces: Mailbox::default(),
        sessions: RefCell::new(Slab::default()),
        wheel: RefCell::new(Wheel::new(tick_ms, 4096)),
        gate: Gate::new(),
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
    if shard.owner.delivery == Delivery::InOrder {
        glommio::spawn_local(shard.owner.clone().run_repairs()).detach();
        glommio::spawn_local(shard.owner.clone().run_reconciles()).detach();
        glommio::spawn_local(shard.presence.clone().run(shard.ctx.clone())).detach();
        glommio::spawn_local(shard.owner.clone().run_checks()).detach();
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
    shard.ctx.node.ready_shards.fetch_add(1, Ordering::Release);
    debug!(shard = shard.ctx.id, "accepting");

    let accept = accept_loop(shard.clone(), listener);
    let drain = futures_lite::future::poll_fn(|cx| {
        if shard.ctx.draining.get() {
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
        warn!(shard = shard.ctx.id, "drain bound reached with sessions still open");
    }
    info!(shard = shard.ctx.id, "drained");
    shard.ctx.node.stopped_shards.fetch_add(1, Ordering::Release);
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
        let msg = shard.ctx.local.next().await;
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
                warn!(shard = shard.ctx.id, error = %e, "accept failed");
                glommio::timer::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}
