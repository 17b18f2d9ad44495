//! Messages between the executors of one process: the shards and the control thread.
//!
//! Every pair of executors has a bounded single-producer channel (glommio's shared
//! channels) in each direction, built once at start-up ([`build`]). Sending never waits:
//! [`Mesh::send`] tries the channel and, when it is full, parks the message in a
//! per-peer outbox drained by a task of its own. So a shard handling a message can always
//! send more without stalling its receive loop, and two shards sending to each other can
//! never deadlock. Each channel is FIFO: what one executor sends to another arrives in
//! the order sent, which the conversation layer relies on (a membership change sent
//! before a message is applied before it).
//!
//! Requests that need an answer carry a [`ReplyTo`]; the answer comes back as
//! [`ShardMsg::Reply`] and completes the waiting [`Mesh::request`].

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Poll, Waker};

use bytes::Bytes;
use glommio::channels::shared_channel::{
    self, ConnectedReceiver, ConnectedSender, SharedReceiver, SharedSender,
};
use glommio::GlommioError;

use crate::ids::Key;
use crate::protocol::ErrorCode;
use crate::store::{History, MemberOp, NewMessage, Presence};
use crate::wheel::TimerId;

/// Slots per channel before messages wait in the sender's outbox.
const CHANNEL_SLOTS: usize = 1024;

/// What a `sync` asked for, carried to its answer.
#[derive(Debug, Clone)]
pub struct SyncReply {
    pub after: u64,
    pub limit: usize,
    pub cid: Option<Key>,
    /// Set by the owner: the client holds the stored seqs up to this one, which this
    /// node had not delivered when it answered; they follow live and the session does
    /// not send them again. 0 when the replay covers everything up to `after`.
    pub held: u64,
}

/// A session somewhere in the process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SessionRef {
    pub shard: usize,
    pub id: TimerId,
}

/// Where the answer to a request goes.
#[derive(Clone, Copy, Debug)]
pub struct ReplyTo {
    pub peer: usize,
    pub id: u64,
}

/// Who sent a message into a conversation.
#[derive(Clone, Copy, Debug)]
pub enum Origin {
    /// A client's `send`: the owner answers with an `ack` or `error` frame to the session.
    Session(SessionRef),
    /// An API post: the owner answers with [`Reply::Sent`].
    Api(ReplyTo),
}

/// Answers to requests.
#[derive(Debug)]
pub enum Reply {
    Done,
    /// The store could not be reached; nothing changed.
    Unavailable,
    Sent {
        seq: u64,
    },
    Members {
        count: usize,
    },
    Conversation {
        members: Vec<Key>,
        last_seq: u64,
    },
    Presence(Vec<Presence>),
    /// How many connections were asked to close.
    Closed(usize),
    /// The user is not a member of the conversation; nothing changed.
    NotMember,
    /// A read mark after a `read` through the API.
    ReadMark {
        read: u64,
    },
    /// A user's read mark in a conversation and its last seq.
    ReadState {
        last_seq: u64,
        read: u64,
    },
    /// A user's conversations.
    Convs(Vec<Key>),
    /// Per user asked: a connection on this node.
    Online(Vec<bool>),
}

/// A message to a shard, by the role the shard plays for it.
#[derive(Debug)]
pub enum ShardMsg {
    /// To the owner shard of a conversation.
    Conv(ConvMsg),
    /// To the owner shard of a user.
    User(UserMsg),
    /// To a shard for its sessions and its part of the node.
    Shard(ShardWide),
    /// An answer to a session's shard.
    Answer(Answer),
    /// The answer to a request (completes a [`Mesh::request`]).
    Reply { id: u64, reply: Reply },
}

/// To the owner shard of a conversation (`shard_for(conv)`).
#[derive(Debug)]
pub enum ConvMsg {
    /// Sequence, store and fan out a message.
    Send {
        origin: Origin,
        conv: Key,
        msg: NewMessage,
    },
    /// Replay history to a session (answered with `Synced`).
    Sync {
        session: SessionRef,
        user: Key,
        conv: Key,
        reply: SyncReply,
    },
    /// A new session of `user` on `shard` joins: confirm which of `convs` the user is a
    /// member of (answered with `Joined`) and send those conversations' messages to that
    /// shard from now on. The answer travels behind every message of them sent to the
    /// shard before, so the session takes part from a clean point.
    Join {
        shard: usize,
        user: Key,
        convs: Vec<Key>,
        session: TimerId,
    },
    /// The shard had no session in `conv` at seq `seq` (0: its last one there left):
    /// stop sending it its messages, unless members were added since.
    InterestOff {
        shard: usize,
        conv: Key,
        seq: u64,
    },
    Members {
        reply: ReplyTo,
        conv: Key,
        op: MemberOp,
        users: Vec<Key>,
    },
    Conversation {
        reply: ReplyTo,
        conv: Key,
    },
    /// Move `user`'s read mark (a client's `read`, or the API's); the user's other
    /// connections, on every node, are told when it moves.
    Read {
        origin: Origin,
        conv: Key,
        user: Key,
        dev: Option<Key>,
        seq: u64,
        cid: Option<Key>,
    },
    /// `user`'s read mark and the last seq (answered with `Reply::ReadState`).
    ReadState {
        reply: ReplyTo,
        conv: Key,
        user: Key,
    },
    /// A member's `signal`, checked by the sender's shard: to every shard with sessions in
    /// `conv` (and every node), but the sending connection.
    Signal {
        conv: Key,
        frame: Bytes,
        exclude: SessionRef,
    },
}

/// To the owner shard of a user (`shard_for(user)`).
#[derive(Debug)]
pub enum UserMsg {
    /// The conversations of `user`, for the join of a new session (answered with
    /// `UserConvs`).
    LoadUser {
        shard: usize,
        user: Key,
        session: TimerId,
    },
    LinkUser {
        reply: ReplyTo,
        user: Key,
        conv: Key,
        member: bool,
    },
    /// The shard's connections of `user` (answered with `Reply::Presence`).
    Presence {
        reply: ReplyTo,
        user: Key,
    },
    /// The conversations of `user` (answered with `Reply::Convs`).
    Convs {
        reply: ReplyTo,
        user: Key,
    },
    /// A connection of `user` opened on this node (webhooks: `user.online`).
    Came {
        user: Key,
    },
    /// A connection of `user` on this node ended (webhooks: `user.offline`).
    Left {
        user: Key,
    },
    /// Whether each of `users` has a connection on this node (answered with
    /// `Reply::Online`).
    AreOnline {
        reply: ReplyTo,
        users: Vec<Key>,
    },
}

/// To a shard, for its sessions and its part of the node.
#[derive(Debug)]
pub enum ShardWide {
    /// A sequenced message for the shard's sessions in `conv` (but `exclude`).
    Deliver {
        conv: Key,
        seq: u64,
        frame: Bytes,
        exclude: Option<SessionRef>,
    },
    MembersChanged {
        conv: Key,
        added: Vec<Key>,
        removed: Vec<Key>,
    },
    /// `conv`'s members are exactly these now (read again after a change this node
    /// missed): bring the shard's index in line.
    MembersNow {
        conv: Key,
        members: Arc<[Key]>,
    },
    Push {
        users: Arc<[Key]>,
        frame: Bytes,
    },
    Broadcast {
        frame: Bytes,
    },
    /// A frame for every open session of `user` on the shard but `exclude` (a `read`).
    ToUser {
        user: Key,
        frame: Bytes,
        exclude: Option<SessionRef>,
    },
    /// A `signal` for the shard's sessions in `conv` but `exclude`; dropped for one
    /// without room in its outbound budget.
    Signal {
        conv: Key,
        frame: Bytes,
        exclude: Option<SessionRef>,
    },
    Disconnect {
        reply: ReplyTo,
        user: Key,
    },
    /// Close every session of `user` with 4001 (a disconnect from another node).
    Kick {
        user: Key,
    },
    /// Seqs `from..=to` of `conv` are gone from the store before this node could deliver
    /// them (a cluster's gap repair came too late): the sessions get a `gap`.
    Missed {
        conv: Key,
        from: u64,
        to: u64,
    },
    /// Redis lost this node's presence (a restart, or the node was paused past its
    /// lease): write every live session's entry again, and re-seed the counters of the
    /// conversations the shard owns above the seqs it has seen.
    Reregister,
    /// Answered with `Done` by the shard's receive loop: proves the shard is alive.
    Ping {
        reply: ReplyTo,
    },
    Drain,
}

/// Answers to a session's shard.
#[derive(Debug)]
pub enum Answer {
    /// A frame for one session (`ack`, `error`).
    ToSession {
        session: TimerId,
        frame: Bytes,
    },
    Synced {
        session: TimerId,
        conv: Key,
        reply: SyncReply,
        result: Result<History, ErrorCode>,
    },
    /// The answer to `Join`: the conversations confirmed, each with the last seq the
    /// session must not hear of (stored, not yet delivered by this node; 0: none); or,
    /// when the store could not be read, `Err` with the conversations to ask again.
    Joined {
        user: Key,
        convs: Result<Vec<(Key, u64)>, Vec<Key>>,
        session: TimerId,
    },
    /// The answer to `LoadUser` (`None`: the store could not be read; ask again).
    UserConvs {
        user: Key,
        convs: Option<Vec<Key>>,
        session: TimerId,
    },
}

/// One executor's ends of the mesh, handed to it at start-up.
pub struct MeshEnds {
    pub me: usize,
    senders: Vec<Option<SharedSender<ShardMsg>>>,
    receivers: Vec<Option<SharedReceiver<ShardMsg>>>,
}

/// Builds the channels between `peers` executors; element `i` goes to executor `i`.
pub fn build(peers: usize) -> Vec<MeshEnds> {
    let mut ends: Vec<MeshEnds> = (0..peers)
        .map(|me| MeshEnds {
            me,
            senders: (0..peers).map(|_| None).collect(),
            receivers: (0..peers).map(|_| None).collect(),
        })
        .collect();
    for from in 0..peers {
        for to in 0..peers {
            if from != to {
                let (tx, rx) = shared_channel::new_bounded(CHANNEL_SLOTS);
                ends[from].senders[to] = Some(tx);
                ends[to].receivers[from] = Some(rx);
            }
        }
    }
    ends
}

struct Outbox {
    sender: ConnectedSender<ShardMsg>,
    /// Messages the channel had no room for, oldest first.
    waiting: RefCell<VecDeque<ShardMsg>>,
    /// The outbox task, parked while `waiting` is empty.
    waker: Cell<Option<Waker>>,
    /// The task holds a message it is waiting to send: later ones must queue behind it.
    busy: Cell<bool>,
}

/// One executor's side of the mesh.
pub struct Mesh {
    pub me: usize,
    outboxes: Vec<Option<Rc<Outbox>>>,
    pending: RefCell<HashMap<u64, PendingSlot>>,
    next_id: Cell<u64>,
}

enum PendingSlot {
    Waiting(Option<Waker>),
    Done(Reply),
}

impl Mesh {
    /// Connects this executor's ends. Returns the mesh and the receivers, one per peer,
    /// for the caller to drain (each in its own task, in order).
    pub async fn connect(ends: MeshEnds) -> (Rc<Mesh>, Vec<(usize, ConnectedReceiver<ShardMsg>)>) {
        // Each side's `connect` waits for the other side's, so every end is connected at
        // once (in tasks) and only then awaited: connecting one after another deadlocks.
        let senders: Vec<_> =
            ends.senders.into_iter().map(|tx| tx.map(|tx| glommio::spawn_local(tx.connect()))).collect();
        let receivers: Vec<_> = ends
            .receivers
            .into_iter()
            .enumerate()
            .filter_map(|(peer, rx)| rx.map(|rx| (peer, glommio::spawn_local(rx.connect()))))
            .collect();
        let mut outboxes = Vec::with_capacity(senders.len());
        for tx in senders {
            match tx {
                Some(tx) => {
                    let outbox = Rc::new(Outbox {
                        sender: tx.await,
                        waiting: RefCell::new(VecDeque::new()),
                        waker: Cell::new(None),
                        busy: Cell::new(false),
                    });
                    glommio::spawn_local(drain_outbox(outbox.clone())).detach();
                    outboxes.push(Some(outbox));
                }
                None => outboxes.push(None),
            }
        }
        let mut connected = Vec::with_capacity(receivers.len());
        for (peer, rx) in receivers {
            connected.push((peer, rx.await));
        }
        let mesh =
            Rc::new(Mesh { me: ends.me, outboxes, pending: RefCell::default(), next_id: Cell::new(1) });
        (mesh, connected)
    }

    /// Sends `msg` to executor `to` without waiting. Sending to oneself is a bug of the
    /// caller (local work is done in place) and the message is dropped.
    pub fn send(&self, to: usize, msg: ShardMsg) {
        let Some(Some(outbox)) = self.outboxes.get(to) else {
            debug_assert!(false, "mesh send to self or to an unknown peer {to}");
            return;
        };
        let mut waiting = outbox.waiting.borrow_mut();
        if waiting.is_empty() && !outbox.busy.get() {
            match outbox.sender.try_send(msg) {
                Ok(()) => return,
                Err(GlommioError::WouldBlock(glommio::ResourceType::Channel(msg))) => waiting.push_back(msg),
                // The peer has stopped (drain): nothing more to tell it.
                Err(_) => return,
            }
        } else {
            waiting.push_back(msg);
        }
        drop(waiting);
        if let Some(w) = outbox.waker.take() {
            w.wake();
        }
    }

    /// Sends a request built by `make` to `to` and waits for its reply. `None` if the
    /// peer went away before answering.
    pub async fn request(&self, to: usize, make: impl FnOnce(ReplyTo) -> ShardMsg) -> Option<Reply> {
        self.request_via(make, |msg| self.send(to, msg)).await
    }

    /// Like [`Mesh::request`], with the caller delivering the request: a shard asking
    /// itself routes it through its own local queue (`Shard::route`).
    pub async fn request_via(
        &self,
        make: impl FnOnce(ReplyTo) -> ShardMsg,
        deliver: impl FnOnce(ShardMsg),
    ) -> Option<Reply> {
        let id = self.next_id.get();
        self.next_id.set(id + 1);
        self.pending.borrow_mut().insert(id, PendingSlot::Waiting(None));
        deliver(make(ReplyTo { peer: self.me, id }));
        let guard = PendingGuard { mesh: self, id };
        let reply = futures_lite::future::poll_fn(|cx| {
            let mut pending = self.pending.borrow_mut();
            match pending.remove(&id) {
                Some(PendingSlot::Done(reply)) => Poll::Ready(Some(reply)),
                Some(PendingSlot::Waiting(_)) => {
                    pending.insert(id, PendingSlot::Waiting(Some(cx.waker().clone())));
                    Poll::Pending
                }
                None => Poll::Ready(None),
            }
        })
        .await;
        drop(guard);
        reply
    }

    /// Answers a request (on the requester's side: completes its `request`).
    pub fn reply(&self, to: ReplyTo, reply: Reply) {
        if to.peer == self.me {
            self.complete(to.id, reply);
        } else {
            self.send(to.peer, ShardMsg::Reply { id: to.id, reply });
        }
    }

    /// Completes a pending request with its answer. Called by the receive loops.
    pub fn complete(&self, id: u64, reply: Reply) {
        let mut pending = self.pending.borrow_mut();
        if let Some(PendingSlot::Waiting(waker)) = pending.remove(&id) {
            pending.insert(id, PendingSlot::Done(reply));
            drop(pending);
            if let Some(w) = waker {
                w.wake();
            }
        }
    }
}

/// Forgets a request whose waiter gave up (timeout, task dropped).
struct PendingGuard<'a> {
    mesh: &'a Mesh,
    id: u64,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.mesh.pending.borrow_mut().remove(&self.id);
    }
}

/// Moves parked messages into the channel as it gets room.
async fn drain_outbox(outbox: Rc<Outbox>) {
    loop {
        let msg = futures_lite::future::poll_fn(|cx| match outbox.waiting.borrow_mut().pop_front() {
            Some(msg) => {
                outbox.busy.set(true);
                Poll::Ready(msg)
            }
            None => {
                outbox.waker.set(Some(cx.waker().clone()));
                Poll::Pending
            }
        })
        .await;
        let sent = outbox.sender.send(msg).await;
        outbox.busy.set(false);
        if sent.is_err() {
            outbox.waiting.borrow_mut().clear();
            return;
        }
    }
}
