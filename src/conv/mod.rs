//! The owner shard's side of conversations: membership checks, sequencing through the
//! store, fan-out to the shards that hold members' sessions, and `sync` replays.
//!
//! Every message into a conversation, from any shard or the API, is handled here on the
//! conversation's owner shard (`shard_for(conv)`), one at a time, which is what gives
//! each conversation its order without locks. The owner keeps, per conversation, the set
//! of shards that want its messages ([`Interest`]): a shard is added when one of its
//! users joins (connect, `sync`, membership change) and removed when it reports it has
//! no session left there.
//!
//! Besides messages the owner routes what has no seq: read marks (`on_read`, stored, then
//! told to the user's other devices on every node) and signals (`signal_out`, fanned out
//! like a message, stored nowhere), and it decides `message.offline` webhooks
//! (`offline`).

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tracing::warn;

use crate::cluster::{ClusterMsg, Topic};
use crate::ctx::Ctx;
use crate::ids::Key;
use crate::mesh::{
    Answer, ConvMsg, Origin, Reply, ReplyTo, SessionRef, ShardMsg, ShardWide, SyncReply, UserMsg,
};
use crate::protocol::{self, ErrorCode, MsgFields};
use crate::store::{Appended, History, MemberOp, MemberView, NewMessage, Store, StoreError};
use crate::wake::Mailbox;
use crate::wheel::TimerId;

mod interest;
mod offline;
mod order;

use crate::ws::codec;
pub use interest::{Interest, ShardSet};
pub use order::{Held, Holdback, MembersChange, Step};

/// How long a hole in a conversation's seqs may stay open on this node before the
/// owner reads the missing messages from the store (a cluster only). ZeroMQ keeps each
/// publisher's order, so a hole is either a message still on its way from another
/// node, which arrives within this bound, or one that was dropped.
pub const REPAIR_AFTER_MS: u64 = 100;

/// Most messages one repair reads from the store.
pub const REPAIR_BATCH: usize = 1000;

/// A conversation quiet for this long after traffic gets its last seq checked in the
/// store once (a "tail check"): a hole is only visible when a later message arrives, so
/// without it the last messages of a burst that ZeroMQ dropped would wait for the next
/// message. One read per burst per conversation per node.
pub const QUIET_MS: u64 = 250;

/// How long a failed gap repair waits before it tries the store again.
const REPAIR_RETRY_MS: u64 = 500;

/// Conversations whose last seq one tail-check read asks the store for.
const CHECK_BATCH: usize = 512;

/// How an owner hands sequenced messages on to the shards that want them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Delivery {
    /// The embedded store: this shard sequences every message of the conversations it
    /// owns, so each goes out as it is sequenced, in order.
    AsSequenced,
    /// Redis: other nodes sequence too, and their messages reach this one out of order
    /// (or not at all) over ZeroMQ: each conversation goes through a [`Holdback`], with
    /// repairs, reconciles and tail checks.
    InOrder,
}

/// The owner shard's side of the conversations it owns: who wants their messages and,
/// with Redis, each one's delivery order on this node. Driven by the shard's receive
/// loop (messages from sessions, the API and other nodes) and by its own tasks (repairs,
/// reconciles, tail checks).
pub struct Owner {
    pub ctx: Rc<Ctx>,
    /// Chosen once, from the store the node runs on.
    pub delivery: Delivery,
    /// Which shards want the messages of the conversations this shard owns.
    pub interest: RefCell<Interest>,
    /// With Redis: the delivery order of each owned conversation this node has an
    /// interest in (see [`Holdback`]). Empty with the embedded store, whose sequencing
    /// on the owner is already in order.
    pub order: RefCell<HashMap<Key, Holdback>>,
    /// Conversations with a hole to repair, by due time (shard milliseconds).
    repairs: Mailbox<(u64, Key)>,
    /// Conversations whose member set must be read again (see [`Owner::reconcile`]).
    reconciles: Mailbox<Key>,
    /// Conversations due for a tail check once quiet (see [`QUIET_MS`]).
    checks: Mailbox<Key>,
    /// Conversations with an open `message.offline` window (webhooks only).
    offline: Rc<offline::Windows>,
}

impl Owner {
    pub fn new(ctx: Rc<Ctx>) -> Owner {
        let delivery = if ctx.redis().is_some() { Delivery::InOrder } else { Delivery::AsSequenced };
        Owner {
            ctx,
            delivery,
            interest: RefCell::default(),
            order: RefCell::default(),
            repairs: Mailbox::default(),
            reconciles: Mailbox::default(),
            checks: Mailbox::default(),
            offline: Rc::default(),
        }
    }

    /// Shard `shard` wants the messages of `conv`, owned here.
    pub fn want(&self, conv: &Key, shard: usize) {
        if self.interest.borrow_mut().add(conv, shard) {
            self.interest_began(conv);
        }
    }

    /// Every shard wants `conv` until it says otherwise: members were added after seq
    /// `at`, and their sessions may be on any shard.
    pub fn want_all(&self, conv: &Key, at: u64) {
        if self.interest.borrow_mut().add_all(conv, self.ctx.shard_count, at) {
            self.interest_began(conv);
        }
    }

    /// Shard `shard` had no session in `conv` at seq `seq` (see [`Interest::remove`]).
    pub fn unwant(&self, conv: &Key, shard: usize, seq: u64) {
        if self.interest.borrow_mut().remove(conv, shard, seq) {
            // No session of the node is in it any more: stop its traffic, forget its order.
            if let Some(links) = self.ctx.links() {
                links.bus.unsubscribe(Topic::conv(conv));
            }
            self.order.borrow_mut().remove(conv);
        }
    }

    fn interest_began(&self, conv: &Key) {
        if let Some(links) = self.ctx.links() {
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
        if self.delivery == Delivery::AsSequenced {
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
            h.active_ms = self.ctx.now_ms();
            h.check_queued = true;
            self.checks.push(conv.clone());
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
        match self.delivery {
            Delivery::AsSequenced => None,
            Delivery::InOrder => self.order.borrow().get(conv).map(|h| h.delivered()),
        }
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
        if self.delivery == Delivery::AsSequenced {
            return fan_out(self, conv, seq, frame, exclude);
        }
        if self.interest.borrow().shards(conv).is_none() {
            return; // no session of this node is in it
        }
        let now = self.ctx.now_ms();
        let mut order = self.order.borrow_mut();
        // No baseline yet (its read is on the way): this message starts the order.
        let h = order.entry(conv.clone()).or_insert_with(|| Holdback::new(seq - 1, 0));
        h.active_ms = now;
        if !h.check_queued {
            h.check_queued = true;
            self.checks.push(conv.clone());
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
                Some(Step::Msg(seq, (frame, exclude))) => fan_out(self, conv, seq, frame, exclude),
                Some(Step::Members(change)) => announce_members(self, conv, change),
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
        let due = self.ctx.now_ms() + REPAIR_AFTER_MS;
        self.repairs.push((due, conv.clone()));
    }

    /// Queues a read of `conv`'s member set (its [`Holdback`] is paused meanwhile).
    pub fn reconcile_later(&self, conv: &Key) {
        self.reconciles.push(conv.clone());
    }

    /// Brings this node's view of a conversation's membership up to date, one conversation
    /// at a time: a change made on another node reaches this one as a `members` message,
    /// which can be lost (a node restarted, a subscription not yet in place); the next
    /// message of the conversation then carries a members version newer than this node's
    /// view. Until the member set is read again, nothing of the conversation is handed on
    /// (a removed member must not get it); then every shard gets the set
    /// ([`ShardWide::MembersNow`]) ahead of the conversation's next messages.
    pub async fn run_reconciles(self: Rc<Self>) {
        loop {
            let conv = self.reconciles.next().await;
            self.reconcile(&conv).await;
        }
    }

    async fn reconcile(&self, conv: &Key) {
        let read = loop {
            if !self.order.borrow().get(conv).is_some_and(|h| h.reconciling) {
                return; // the node gave the conversation up meanwhile
            }
            match self.ctx.store.conversation(conv).await {
                Ok(read) => break read,
                Err(_) => glommio::timer::sleep(Duration::from_millis(REPAIR_RETRY_MS)).await,
            }
        };
        self.ctx.metrics.cluster_reconciles.inc();
        // Sessions of members added meanwhile may be on any shard, from the next seq on.
        let delivered = self.order.borrow().get(conv).map_or(0, |h| h.delivered());
        self.want_all(conv, delivered);
        let members: Arc<[Key]> = read.members.into();
        for target in 0..self.ctx.shard_count {
            self.ctx.route(
                target,
                ShardMsg::Shard(ShardWide::MembersNow { conv: conv.clone(), members: members.clone() }),
            );
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

    /// Fills holes that outlasted [`REPAIR_AFTER_MS`] from the store, one at a time.
    pub async fn run_repairs(self: Rc<Self>) {
        loop {
            let (due, conv) = self.repairs.next().await;
            let now = self.ctx.now_ms();
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
                if !repair(&self, &conv, after, upto).await {
                    if let Some(h) = self.order.borrow_mut().get_mut(&conv) {
                        h.repair_pending = true;
                        self.repairs.push((self.ctx.now_ms() + REPAIR_RETRY_MS, conv));
                    }
                    continue;
                }
                self.check_hole(&conv);
            }
        }
    }

    /// Tail checks: every conversation quiet for [`QUIET_MS`] since its last message
    /// has its last seq read from the store (many per read), and a hole it reveals is
    /// repaired like any other.
    pub async fn run_checks(self: Rc<Self>) {
        let Some(redis) = self.ctx.redis().cloned() else { return };
        let tick = Duration::from_millis(QUIET_MS / 2);
        loop {
            // A shard with no conversation to check never wakes up for checks.
            self.checks.ready().await;
            glommio::timer::sleep(tick).await;
            let now = self.ctx.now_ms();
            let mut due = Vec::new();
            {
                let mut checks = self.checks.items();
                let mut order = self.order.borrow_mut();
                for _ in 0..checks.len() {
                    let Some(conv) = checks.pop_front() else { break };
                    let Some(h) = order.get_mut(&conv) else { continue };
                    if now >= h.active_ms + QUIET_MS {
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
        for (conv, h) in order.iter_mut() {
            h.active_ms = 0;
            if !h.check_queued {
                h.check_queued = true;
                self.checks.push(conv.clone());
            }
        }
    }
}

/// Handles a message to this shard as the owner of a conversation.
pub async fn handle(owner: &Rc<Owner>, msg: ConvMsg) {
    match msg {
        ConvMsg::Send { origin, conv, msg } => {
            if let Some(seq) = on_send(owner, origin, conv.clone(), msg).await {
                offline::accepted(&owner.ctx, &owner.offline, &conv, seq);
            }
        }
        ConvMsg::Sync { session, user, conv, reply } => on_sync(owner, session, user, conv, reply).await,
        ConvMsg::Join { shard, user, convs, session } => on_join(owner, shard, user, convs, session).await,
        ConvMsg::InterestOff { shard, conv, seq } => owner.unwant(&conv, shard, seq),
        ConvMsg::Members { reply, conv, op, users } => {
            // It waits on the users' owners: run it beside the receive loop.
            let owner = owner.clone();
            glommio::spawn_local(async move { on_members(&owner, reply, conv, op, users).await }).detach();
        }
        ConvMsg::Conversation { reply, conv } => on_conversation(owner, reply, conv).await,
        ConvMsg::Read { origin, conv, user, dev, seq, cid } => {
            // A read mark waits on the store but orders nothing: beside the receive loop,
            // so it never delays the conversation's messages.
            let owner = owner.clone();
            glommio::spawn_local(async move { on_read(&owner, origin, conv, user, dev, seq, cid).await })
                .detach();
        }
        ConvMsg::ReadState { reply, conv, user } => {
            let owner = owner.clone();
            glommio::spawn_local(async move {
                let answer = match owner.ctx.store.read_state(&conv, std::slice::from_ref(&user)).await {
                    Ok(state) => Reply::ReadState {
                        last_seq: state.last_seq,
                        read: state.marks.first().copied().unwrap_or(0),
                    },
                    Err(_) => Reply::Unavailable,
                };
                owner.ctx.mesh.reply(reply, answer);
            })
            .detach();
        }
        ConvMsg::Signal { conv, frame, exclude } => {
            if owner.ctx.links().is_some() {
                let json = codec::text_payload(&frame);
                owner.ctx.publish(Topic::conv(&conv), ClusterMsg::Signal { conv: conv.clone(), json });
            }
            signal_out(owner, &conv, frame, Some(exclude));
        }
    }
}

/// `read` (from a session) or the API's read: moves the user's read mark, and tells the
/// user's other connections on every node when it moved.
async fn on_read(
    owner: &Owner,
    origin: Origin,
    conv: Key,
    user: Key,
    dev: Option<Key>,
    seq: u64,
    cid: Option<Key>,
) {
    let mark = match owner.ctx.store.set_read(&conv, &user, seq).await {
        Ok(Some(mark)) => mark,
        Ok(None) => return not_member(owner, origin, cid.as_deref()),
        Err(_) => return unavailable(owner, origin, cid.as_deref()),
    };
    if let Origin::Api(reply) = origin {
        owner.ctx.mesh.reply(reply, Reply::ReadMark { read: mark.read });
    }
    if !mark.moved {
        return;
    }
    owner.ctx.metrics.reads.inc();
    let text = protocol::read_json(&conv, mark.read, dev.as_deref());
    let exclude = match origin {
        Origin::Session(session) => Some(session),
        Origin::Api(_) => None,
    };
    if owner.ctx.links().is_some() {
        let json = Bytes::from(text.clone());
        owner.ctx.publish(Topic::user(&user), ClusterMsg::ToUser { user: user.clone(), json });
    }
    let frame = codec::text_frame(&text);
    for target in 0..owner.ctx.shard_count {
        let msg = ShardWide::ToUser { user: user.clone(), frame: frame.clone(), exclude };
        owner.ctx.route(target, ShardMsg::Shard(msg));
    }
}

/// Hands a `signal` frame to the shards with sessions in `conv` (no seq, no order to
/// keep, nothing stored).
fn signal_out(owner: &Owner, conv: &Key, frame: Bytes, exclude: Option<SessionRef>) {
    let interest = owner.interest.borrow();
    let Some(set) = interest.shards(conv) else { return };
    for target in set.iter() {
        let msg = ShardMsg::Shard(ShardWide::Signal { conv: conv.clone(), frame: frame.clone(), exclude });
        owner.ctx.route(target, msg);
    }
}

/// A `signal` from another node's member.
pub fn on_remote_signal(owner: &Owner, conv: Key, json: Bytes) {
    if owner.interest.borrow().shards(&conv).is_none() {
        owner.ctx.metrics.cluster_ignored.inc();
        return;
    }
    signal_out(owner, &conv, codec::text_frame(&json), None);
}

/// `send` (from a session) or an API post: check, sequence, store, fan out, answer.
/// Returns the seq of a message accepted now (not a repeat).
pub async fn on_send(owner: &Owner, origin: Origin, conv: Key, mut msg: NewMessage) -> Option<u64> {
    let started = std::time::Instant::now();
    msg.ts = crate::clock::unix_ms();
    let encode = |seq: u64| {
        let json = protocol::msg_json(&MsgFields {
            conv: &conv,
            seq,
            from: &msg.from,
            dev: msg.dev.as_deref(),
            cid: msg.cid.as_deref(),
            ts: msg.ts,
            body: &msg.body,
        });
        codec::text_frame(&json)
    };
    // The highest seq this node has seen: a Redis that lost its data continues above it.
    let floor = owner.order.borrow().get(&conv).map_or(0, |h| h.highest());
    // A client must be a member (checked with the append, in one store call); the API
    // posts as anyone.
    let append = || async {
        match origin {
            Origin::Session(_) => owner.ctx.store.append_if_member(&conv, &msg, floor, &encode).await,
            Origin::Api(_) => owner.ctx.store.append(&conv, &msg, floor, &encode).await.map(Some),
        }
    };
    let mut appended = append().await;
    if let (Err(StoreError::Unknown(_)), Some(_)) = (&appended, &msg.cid) {
        // The answer was lost, not the call: the message may be stored, and then every
        // other device gets it. Asking again with the same cid finds out (a stored one is
        // answered as a repeat, with its seq), so the sender is not told `unavailable`
        // about a message the others see. API posts have no cid to ask with.
        owner.ctx.metrics.store_retries.inc();
        appended = append().await;
    }
    let appended = match appended {
        Ok(Some(appended)) => appended,
        Ok(None) => {
            not_member(owner, origin, msg.cid.as_deref());
            return None;
        }
        Err(_) => {
            unavailable(owner, origin, msg.cid.as_deref());
            return None;
        }
    };
    // The ack goes first: delivering this seq can release later ones held behind it
    // (with Redis, appends may answer out of order), and the sender must know its seq
    // before it sees a later one, or it would take its own seq for a hole.
    let exclude = match origin {
        Origin::Session(session) => {
            let cid = msg.cid.as_deref().unwrap_or("");
            let ack = protocol::ack_json(&conv, cid, appended.seq, appended.ts);
            to_session(owner, session, codec::text_frame(&ack));
            Some(session)
        }
        Origin::Api(reply) => {
            owner.ctx.mesh.reply(reply, Reply::Sent { seq: appended.seq });
            None
        }
    };
    if appended.duplicate {
        owner.ctx.metrics.deduplicated.inc();
        if owner.delivery == Delivery::InOrder {
            // A Redis call that failed after it was sent may have stored the message
            // without anyone delivering it; delivery is idempotent by seq, so hand it on
            // again (nodes that have it drop it). The repeating connection has its ack.
            publish_and_deliver(owner, &conv, &appended, exclude);
        }
        None
    } else {
        owner.ctx.metrics.accepted.inc();
        publish_and_deliver(owner, &conv, &appended, exclude);
        owner.ctx.metrics.fanout_latency.record(started.elapsed());
        Some(appended.seq)
    }
}

/// Sends a message sequenced here to the other nodes (in a cluster) and to this node's
/// sessions.
fn publish_and_deliver(owner: &Owner, conv: &Key, appended: &Appended, exclude: Option<SessionRef>) {
    let (seq, members_version) = (appended.seq, appended.members_version);
    if owner.ctx.links().is_some() {
        let json = codec::text_payload(&appended.frame);
        owner
            .ctx
            .publish(Topic::conv(conv), ClusterMsg::Msg { conv: conv.clone(), seq, members_version, json });
    }
    owner.deliver_in_order(conv, seq, appended.frame.clone(), exclude, members_version);
}

/// Hands a sequenced frame to every shard that wants the conversation's messages (in
/// a cluster, through [`Shard::deliver_in_order`]).
pub fn fan_out(owner: &Owner, conv: &Key, seq: u64, frame: Bytes, exclude: Option<SessionRef>) {
    // `route` only queues (locally or in the mesh) and never touches the interest table,
    // so the set is walked in place, without a copy per message.
    let interest = owner.interest.borrow();
    let Some(set) = interest.shards(conv) else { return };
    for target in set.iter() {
        let msg =
            ShardMsg::Shard(ShardWide::Deliver { conv: conv.clone(), seq, frame: frame.clone(), exclude });
        owner.ctx.route(target, msg);
    }
}

fn to_session(owner: &Owner, session: SessionRef, frame: Bytes) {
    owner.ctx.route(session.shard, ShardMsg::Answer(Answer::ToSession { session: session.id, frame }));
}

/// Refuses a request of a non-member: an `error` frame to a session, `Reply::NotMember`
/// to the API.
fn not_member(owner: &Owner, origin: Origin, cid: Option<&str>) {
    owner.ctx.metrics.refused_send(ErrorCode::NotMember);
    match origin {
        Origin::Session(session) => {
            let frame = protocol::error_json(cid, ErrorCode::NotMember, "not a member");
            to_session(owner, session, codec::text_frame(&frame));
        }
        Origin::Api(reply) => owner.ctx.mesh.reply(reply, Reply::NotMember),
    }
}

fn unavailable(owner: &Owner, origin: Origin, cid: Option<&str>) {
    owner.ctx.metrics.refused_send(ErrorCode::Unavailable);
    match origin {
        Origin::Session(session) => {
            let frame = protocol::error_json(
                cid,
                ErrorCode::Unavailable,
                "the store is unavailable; retry with the same cid",
            );
            to_session(owner, session, codec::text_frame(&frame));
        }
        Origin::Api(reply) => owner.ctx.mesh.reply(reply, Reply::Unavailable),
    }
}

/// `sync`: replay history after `after` to a session of a member. From this point the
/// session's shard also receives the conversation's live messages, in order after the
/// replay (the reply and later `Deliver`s travel the same FIFO channel).
pub async fn on_sync(owner: &Owner, session: SessionRef, user: Key, conv: Key, mut reply: SyncReply) {
    let view = fresh_views(owner, std::slice::from_ref(&conv), &user).await.map(|mut v| v.pop().flatten());
    let result = match view {
        Ok(Some(view)) => match owner.ctx.store.history(&conv, reply.after, reply.limit).await {
            Ok(mut history) => {
                // A client that holds stored seqs this node has not delivered yet (they
                // reached it through another node) must not get them again when they
                // come live. Seqs past the store's are not the client's to skip: the
                // store lost its data, or the client's state is not this cluster's.
                reply.held = reply.after.min(history.last_seq);
                owner.want(&conv, session.shard);
                // In a cluster the store may already hold seqs this node has not delivered
                // yet (on their way from another node): the replay stops where delivery
                // is, and the rest follows live, in order, after `synced`.
                let delivered = owner.saw_last_seq(&conv, history.last_seq, Some(view.members_version));
                if delivered < history.last_seq {
                    history.messages.retain(|m| m.seq <= delivered);
                    history.last_seq = delivered;
                }
                // The user's read mark goes with `synced`. Read before the catch-up, which
                // must be the last wait before the answer leaves: a seq delivered during a
                // wait after it would reach the session neither live nor in the replay.
                let read = owner.ctx.store.read_state(&conv, std::slice::from_ref(&user)).await;
                let caught_up = catch_up(owner, &conv, &mut history, reply.after, reply.limit).await;
                match (caught_up, read) {
                    (Ok(()), Ok(read)) => {
                        history.read = read.marks.first().copied().unwrap_or(0);
                        Ok(history)
                    }
                    _ => Err(ErrorCode::Unavailable),
                }
            }
            Err(_) => Err(ErrorCode::Unavailable),
        },
        Ok(None) => Err(ErrorCode::NotMember),
        Err(_) => Err(ErrorCode::Unavailable),
    };
    owner.ctx.metrics.sync_replays.inc();
    owner
        .ctx
        .route(session.shard, ShardMsg::Answer(Answer::Synced { session: session.id, conv, reply, result }));
}

/// Extends a sync's replay to every seq this node has delivered by the time the answer
/// leaves. The syncing session drops the conversation's live messages until its answer
/// (the replay carries them), and with Redis the owner delivers other nodes' messages
/// while it waits for the store: a seq delivered after the history read would otherwise
/// reach the session neither live nor in the replay. Each round reads what the store holds
/// past the replay; past `limit` the answer's `gap` covers the rest.
async fn catch_up(
    owner: &Owner,
    conv: &Key,
    history: &mut History,
    after: u64,
    limit: usize,
) -> Result<(), StoreError> {
    loop {
        let Some(delivered) = owner.delivered_seq(conv) else { return Ok(()) };
        // The replay never reaches back to what the client holds already.
        let held = history.last_seq.max(after);
        if delivered <= held {
            return Ok(());
        }
        let room = limit.saturating_sub(history.messages.len());
        if room == 0 {
            history.last_seq = delivered;
            return Ok(());
        }
        let tail = owner.ctx.store.history(conv, held, room).await?;
        // Only what was delivered: later seqs reach the session live, after the answer.
        let upto = owner.delivered_seq(conv).unwrap_or(delivered);
        let before = history.messages.len();
        for m in tail.messages.into_iter().take_while(|m| m.seq <= upto) {
            // `held` covers `history.last_seq` too; the tail comes in seq order.
            if m.seq > held {
                history.last_seq = m.seq;
                history.messages.push(m);
            }
        }
        if history.messages.len() == before {
            // Delivered, yet gone from the store already (trimmed in the same instant):
            // nothing more to replay.
            return Ok(());
        }
    }
}

/// A new session of `user` joins: answer which of `convs` the user is a member of, and
/// send the session's shard those conversations' messages from now on. The answer
/// follows every message of them this shard sent there before (the mesh is FIFO), so the
/// session hears of no seq sequenced before its join. In a cluster the node may be
/// behind the store (seqs on their way from other nodes): the answer names, per
/// conversation, the last stored seq the session must not hear of when it comes.
pub async fn on_join(owner: &Owner, from: usize, user: Key, convs: Vec<Key>, session: TimerId) {
    let views = match fresh_views(owner, &convs, &user).await {
        Ok(views) => views,
        // The session's shard asks again: its `hello` waits for the store.
        Err(_) => {
            return owner
                .ctx
                .route(from, ShardMsg::Answer(Answer::Joined { user, convs: Err(convs), session }))
        }
    };
    let mut member_of = Vec::with_capacity(convs.len());
    for (conv, view) in convs.into_iter().zip(views) {
        if let Some(view) = view {
            owner.want(&conv, from);
            let last = view.last_seq;
            let delivered = owner.saw_last_seq(&conv, last, Some(view.members_version));
            member_of.push((conv, if delivered < last { last } else { 0 }));
        }
    }
    owner.ctx.route(from, ShardMsg::Answer(Answer::Joined { user, convs: Ok(member_of), session }));
}

/// Membership change through the API. The user side is updated (and acknowledged)
/// before the change is announced to the shards, so a session that arrives meanwhile
/// learns of it either from its user's conversation list or from the announcement.
pub async fn on_members(owner: &Owner, reply: ReplyTo, conv: Key, op: MemberOp, users: Vec<Key>) {
    let change = match owner.ctx.store.set_members(&conv, op, &users).await {
        Ok(change) => change,
        Err(_) => return owner.ctx.mesh.reply(reply, Reply::Unavailable),
    };
    for (user, member) in
        change.added.iter().map(|u| (u, true)).chain(change.removed.iter().map(|u| (u, false)))
    {
        let user_owner = owner.ctx.owner_of(user);
        let linked = if user_owner == owner.ctx.id {
            owner.ctx.store.link_user(user, &conv, member).await.is_ok()
        } else {
            let ask = |reply| {
                ShardMsg::User(UserMsg::LinkUser { reply, user: user.clone(), conv: conv.clone(), member })
            };
            matches!(owner.ctx.mesh.request(user_owner, ask).await, Some(Reply::Done))
        };
        if !linked {
            warn!(user = %user, conv = %conv, "user side of a membership change not recorded");
        }
    }
    let count = change.count;
    let change = MembersChange {
        at: change.last_seq,
        version: change.members_version,
        added: change.added,
        removed: change.removed,
    };
    if owner.ctx.links().is_some() && (!change.added.is_empty() || !change.removed.is_empty()) {
        // Other nodes follow the topics of the users they hold sessions of: one message
        // per topic the changed users fall in.
        let mut topics: Vec<Topic> = Vec::new();
        for user in change.added.iter().chain(&change.removed) {
            let topic = Topic::user(user);
            if !topics.contains(&topic) {
                topics.push(topic);
            }
        }
        for topic in topics {
            let msg = ClusterMsg::Members {
                conv: conv.clone(),
                members_version: change.version,
                last_seq: change.at,
                added: change.added.clone(),
                removed: change.removed.clone(),
            };
            owner.ctx.publish(topic, msg);
        }
    }
    members_changed(owner, &conv, change);
    owner.ctx.mesh.reply(reply, Reply::Members { count });
}

/// A membership change of `conv` (owned here), made on this node or another. With the
/// embedded store it is announced to the shards at once, in order with the messages.
/// With Redis it takes its place in the conversation's [`Holdback`], after the seq it was
/// made at (a message sequenced before it may still be on its way). A change this node's
/// view is not one behind of (one it already reflects, or one after a change it missed)
/// is not applied piecemeal: the member set is read again instead (see
/// [`Shard::reconcile`]).
pub fn members_changed(owner: &Owner, conv: &Key, change: MembersChange) {
    if change.added.is_empty() && change.removed.is_empty() {
        return;
    }
    if owner.delivery == Delivery::InOrder {
        let mut order = owner.order.borrow_mut();
        if let Some(h) = order.get_mut(conv) {
            if change.version <= h.members_version {
                return; // already reflected (a reconcile read it)
            }
            if change.version > h.members_version + 1 || h.reconciling {
                if h.needs_reconcile(change.version) {
                    drop(order);
                    owner.reconcile_later(conv);
                }
                return;
            }
            h.place(change);
            drop(order);
            return owner.drain(conv);
        }
        drop(order);
        if !change.added.is_empty() {
            // The new members' sessions are live from here (`announce_members` makes
            // every shard want it): seqs up to the change are not theirs.
            owner.saw_last_seq(conv, change.at, Some(change.version));
        }
    }
    announce_members(owner, conv, change);
}

/// Tells every shard of a membership change, in order with the messages handed to them
/// (the change was made at seq `change.at`: later messages are the new members').
pub fn announce_members(owner: &Owner, conv: &Key, change: MembersChange) {
    if !change.added.is_empty() {
        // Every shard may hold sessions of the new members: send it this conversation
        // until it says it has none (it answers `InterestOff` on the first message).
        owner.want_all(conv, change.at);
    }
    for target in 0..owner.ctx.shard_count {
        let msg = ShardMsg::Shard(ShardWide::MembersChanged {
            conv: conv.clone(),
            added: change.added.clone(),
            removed: change.removed.clone(),
        });
        owner.ctx.route(target, msg);
    }
}

/// A message sequenced on another node, under members version `members_version`.
pub fn on_remote_msg(owner: &Owner, conv: Key, seq: u64, members_version: u64, json: Bytes) {
    if owner.interest.borrow().shards(&conv).is_none() {
        // Subscriptions are by bucket: other conversations of the bucket come along.
        owner.ctx.metrics.cluster_ignored.inc();
        return;
    }
    owner.deliver_in_order(&conv, seq, codec::text_frame(&json), None, members_version);
}

/// The member views of `user` in `convs`, each read under a members version no older than
/// the one this node's view of the conversation already reflects: an answer older than
/// that would undo a change already applied (it is read again).
async fn fresh_views(
    owner: &Owner,
    convs: &[Key],
    user: &str,
) -> Result<Vec<Option<MemberView>>, StoreError> {
    let mut attempts = 0;
    loop {
        let views = owner.ctx.store.member_views(convs, user).await?;
        let order = owner.order.borrow();
        let stale = convs.iter().zip(&views).any(|(conv, view)| {
            let read = view.map_or(u64::MAX, |v| v.members_version);
            order.get(conv).is_some_and(|h| read < h.members_version)
        });
        attempts += 1;
        if !stale || attempts >= 5 {
            return Ok(views);
        }
    }
}

/// Reads seqs `after+1 ..= upto` of `conv` from the store and delivers them in order;
/// what the store no longer has is announced to the sessions as a `gap`. False when the
/// store could not be read (the caller retries).
pub async fn repair(owner: &Owner, conv: &Key, after: u64, upto: u64) -> bool {
    let limit = ((upto - after) as usize).min(REPAIR_BATCH);
    let history = match owner.ctx.store.history(conv, after, limit).await {
        Ok(history) => history,
        Err(_) => return false,
    };
    owner.ctx.metrics.cluster_repairs.inc();
    // Seqs before the first one read are trimmed from history (or lost with Redis's
    // data): nothing can bring them back.
    let to = history.messages.first().map_or(upto, |m| m.seq - 1);
    if to > after {
        warn!(conv = %conv, from = after + 1, to, "messages gone before this node could deliver them");
        if let Some(h) = owner.order.borrow_mut().get_mut(conv) {
            h.skip_to(to);
        }
        if let Some(set) = owner.interest.borrow().shards(conv) {
            for target in set.iter() {
                owner.ctx.route(
                    target,
                    ShardMsg::Shard(ShardWide::Missed { conv: conv.clone(), from: after + 1, to }),
                );
            }
        }
        // Membership changes made at the skipped seqs take their place now.
        owner.drain(conv);
    }
    for m in history.messages {
        owner.ctx.metrics.cluster_repaired.inc();
        owner.deliver_in_order(conv, m.seq, m.frame, None, m.members_version);
    }
    true
}

pub async fn on_conversation(owner: &Owner, reply: ReplyTo, conv: Key) {
    let answer = match owner.ctx.store.conversation(&conv).await {
        Ok(c) => Reply::Conversation { members: c.members, last_seq: c.last_seq },
        Err(_) => Reply::Unavailable,
    };
    owner.ctx.mesh.reply(reply, answer);
}
