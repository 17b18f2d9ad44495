//! Durable state behind one narrow trait: membership, per-conversation sequence numbers,
//! history, de-duplication, and the user side (a user's conversations).
//!
//! Calls are made on the shard that owns the key: conversation calls on
//! `shard_for(conv)`, user calls on `shard_for(user)`. The in-memory store keeps each
//! shard's part of the data on that shard (no locks); a networked store (Redis, with the
//! cluster) answers asynchronously from its own threads. Every call may fail with
//! [`StoreError::Unavailable`]: the caller then refuses the operation (`error
//! unavailable`, HTTP 503) and nothing is half-applied. A networked call that failed
//! after it was sent may still have been applied whole: retrying is safe, because an
//! append is de-duplicated on `(from, cid)` and a de-duplicated append is delivered again
//! (delivery is idempotent by seq).
//!
//! # Promises every implementation keeps
//! - `append` assigns `last_seq + 1` (1 for a new conversation) with no gaps, unless the
//!   `(from, cid)` pair was seen within the dedupe window: then it answers the first seq
//!   again and stores nothing.
//! - History keeps at least the last `history.max_per_conv` messages of a conversation.
//! - Every change of a conversation's member set raises its *members version* by one, in
//!   the same atomic step; an append answers the version it saw, and history keeps it with
//!   each message. A node that learns of membership from messages between nodes (which
//!   can be lost) compares versions to know when its view is stale.
//!
//! Presence is not stored for this node's own connections: the shards answer it from
//! their live sessions, so it can never outlive them. (A cluster store adds the
//! presence of other nodes.)

pub mod memory;
pub mod redis;

use std::net::IpAddr;
use std::sync::Arc;

use bytes::Bytes;
use thiserror::Error;

use crate::bridge::BridgeError;

pub use self::redis::{PresenceOp, RedisPool, RedisStore};
pub use memory::MemoryStore;

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum StoreError {
    /// The store cannot be reached right now, or refused the call; nothing was changed.
    /// Retry later.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The call was sent, and its answer was lost (the connection broke or timed out): it
    /// may or may not have been applied, whole. Retrying is safe (an append is
    /// de-duplicated on `(from, cid)`) and is how to find out.
    #[error("store answer lost: {0}")]
    Unknown(String),
}

impl From<BridgeError> for StoreError {
    fn from(e: BridgeError) -> StoreError {
        match e {
            BridgeError::Unknown(why) => StoreError::Unknown(why),
            BridgeError::Unavailable(why) | BridgeError::Start(why) => StoreError::Unavailable(why),
        }
    }
}

/// A message to sequence and store.
#[derive(Debug, Clone)]
pub struct NewMessage {
    pub from: Arc<str>,
    /// `None` for messages posted through the API.
    pub dev: Option<Arc<str>>,
    /// The client's idempotency key; `None` for API posts (never de-duplicated).
    pub cid: Option<Arc<str>>,
    /// Server time, unix milliseconds.
    pub ts: u64,
    /// The message body: JSON text, validated by the caller.
    pub body: Bytes,
}

/// The outcome of [`Store::append`].
#[derive(Debug, Clone)]
pub struct Appended {
    pub seq: u64,
    pub ts: u64,
    /// The `msg` frame as ready-to-write WebSocket bytes (encoded once, shared).
    pub frame: Bytes,
    /// The `(from, cid)` pair was seen before: nothing new was stored or must be delivered.
    pub duplicate: bool,
    /// The conversation's members version when the message was taken.
    pub members_version: u64,
}

/// A stored message, as replayed by `sync`.
#[derive(Debug, Clone)]
pub struct Stored {
    pub seq: u64,
    pub frame: Bytes,
    /// The conversation's members version when the message was taken.
    pub members_version: u64,
}

/// What a member's view of a conversation starts from, read at once: its last seq and
/// the members version under which the membership was read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemberView {
    pub last_seq: u64,
    pub members_version: u64,
}

/// A conversation as [`Store::conversation`] reads it, all at once.
#[derive(Debug, Clone, Default)]
pub struct Conversation {
    pub members: Vec<Arc<str>>,
    pub last_seq: u64,
    pub members_version: u64,
}

/// The answer to [`Store::history`].
#[derive(Debug, Clone, Default)]
pub struct History {
    /// Messages with `seq > after`, oldest first, at most `limit`.
    pub messages: Vec<Stored>,
    /// The conversation's last assigned seq at the time of the read.
    pub last_seq: u64,
    /// False when history no longer reaches back to `after + 1`.
    pub complete: bool,
}

/// How a membership call changes the set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemberOp {
    Replace,
    Add,
    Remove,
}

/// What a membership call changed.
#[derive(Debug, Clone, Default)]
pub struct MemberChange {
    pub added: Vec<Arc<str>>,
    pub removed: Vec<Arc<str>>,
    /// Members after the change.
    pub count: usize,
    /// The members version after the change (raised by one when anything changed).
    pub members_version: u64,
    /// The conversation's last seq when the change was made: messages up to it were
    /// taken under the members before the change, later ones under the members after.
    pub last_seq: u64,
}

/// One connection of a user, as the presence API lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Presence {
    pub device: Arc<str>,
    pub conn: Arc<str>,
    pub node: Arc<str>,
    pub ip: IpAddr,
    /// Unix milliseconds when the connection was made.
    pub since: u64,
}

/// The store a shard uses. Futures are not `Send`: they run on the calling shard.
#[allow(async_fn_in_trait)]
pub trait Store {
    /// Whether `user` is a member of `conv`.
    async fn is_member(&self, conv: &str, user: &str) -> Result<bool, StoreError>;
    /// `Some(view)` when `user` is a member of `conv`, `None` when not; membership, last
    /// seq and members version read at once (the cluster takes its ordering baseline from
    /// it, and knows which membership it saw).
    async fn member_view(&self, conv: &str, user: &str) -> Result<Option<MemberView>, StoreError>;
    /// [`Store::member_view`] for each of `convs` (a networked store: one round trip).
    async fn member_views(
        &self,
        convs: &[Arc<str>],
        user: &str,
    ) -> Result<Vec<Option<MemberView>>, StoreError> {
        let mut out = Vec::with_capacity(convs.len());
        for conv in convs {
            out.push(self.member_view(conv, user).await?);
        }
        Ok(out)
    }
    /// Members of `conv` (any order), its last seq and its members version.
    async fn conversation(&self, conv: &str) -> Result<Conversation, StoreError>;
    /// Changes the member set of `conv`.
    async fn set_members(
        &self,
        conv: &str,
        op: MemberOp,
        users: &[Arc<str>],
    ) -> Result<MemberChange, StoreError>;
    /// De-duplicates, sequences and stores a message of `conv` (see the module promises).
    /// `encode` builds the `msg` frame once the seq is known. `floor` is the highest seq
    /// of `conv` the caller has seen: a store that lost its data (a Redis restart without
    /// persistence) continues above it, so a seq is never reused.
    async fn append(
        &self,
        conv: &str,
        msg: &NewMessage,
        floor: u64,
        encode: &dyn Fn(u64) -> Bytes,
    ) -> Result<Appended, StoreError>;
    /// Like [`Store::append`] for a member of `conv` only: `None` (and nothing stored)
    /// when `msg.from` is not one. A networked store checks in the same round trip.
    async fn append_if_member(
        &self,
        conv: &str,
        msg: &NewMessage,
        floor: u64,
        encode: &dyn Fn(u64) -> Bytes,
    ) -> Result<Option<Appended>, StoreError> {
        if !self.is_member(conv, &msg.from).await? {
            return Ok(None);
        }
        self.append(conv, msg, floor, encode).await.map(Some)
    }
    /// Stored messages of `conv` after `after`, at most `limit`.
    async fn history(&self, conv: &str, after: u64, limit: usize) -> Result<History, StoreError>;

    /// Records that `user` is (or is no longer) a member of `conv`, on the user's side.
    async fn link_user(&self, user: &str, conv: &Arc<str>, member: bool) -> Result<(), StoreError>;
    /// The conversations `user` is a member of.
    async fn user_convs(&self, user: &str) -> Result<Vec<Arc<str>>, StoreError>;
}

/// The store a node runs on: the embedded one, or Redis (a cluster). An enum rather than
/// a trait object: the trait's methods are `async`, and a shard's calls stay static.
pub enum NodeStore {
    Memory(MemoryStore),
    Redis(RedisStore),
}

impl Store for NodeStore {
    async fn is_member(&self, conv: &str, user: &str) -> Result<bool, StoreError> {
        match self {
            NodeStore::Memory(s) => s.is_member(conv, user).await,
            NodeStore::Redis(s) => s.is_member(conv, user).await,
        }
    }

    async fn member_view(&self, conv: &str, user: &str) -> Result<Option<MemberView>, StoreError> {
        match self {
            NodeStore::Memory(s) => s.member_view(conv, user).await,
            NodeStore::Redis(s) => s.member_view(conv, user).await,
        }
    }

    async fn member_views(
        &self,
        convs: &[Arc<str>],
        user: &str,
    ) -> Result<Vec<Option<MemberView>>, StoreError> {
        match self {
            NodeStore::Memory(s) => s.member_views(convs, user).await,
            NodeStore::Redis(s) => s.member_views(convs, user).await,
        }
    }

    async fn conversation(&self, conv: &str) -> Result<Conversation, StoreError> {
        match self {
            NodeStore::Memory(s) => s.conversation(conv).await,
            NodeStore::Redis(s) => s.conversation(conv).await,
        }
    }

    async fn set_members(
        &self,
        conv: &str,
        op: MemberOp,
        users: &[Arc<str>],
    ) -> Result<MemberChange, StoreError> {
        match self {
            NodeStore::Memory(s) => s.set_members(conv, op, users).await,
            NodeStore::Redis(s) => s.set_members(conv, op, users).await,
        }
    }

    async fn append(
        &self,
        conv: &str,
        msg: &NewMessage,
        floor: u64,
        encode: &dyn Fn(u64) -> Bytes,
    ) -> Result<Appended, StoreError> {
        match self {
            NodeStore::Memory(s) => s.append(conv, msg, floor, encode).await,
            NodeStore::Redis(s) => s.append(conv, msg, floor, encode).await,
        }
    }

    async fn append_if_member(
        &self,
        conv: &str,
        msg: &NewMessage,
        floor: u64,
        encode: &dyn Fn(u64) -> Bytes,
    ) -> Result<Option<Appended>, StoreError> {
        match self {
            NodeStore::Memory(s) => s.append_if_member(conv, msg, floor, encode).await,
            NodeStore::Redis(s) => s.append_if_member(conv, msg, floor, encode).await,
        }
    }

    async fn history(&self, conv: &str, after: u64, limit: usize) -> Result<History, StoreError> {
        match self {
            NodeStore::Memory(s) => s.history(conv, after, limit).await,
            NodeStore::Redis(s) => s.history(conv, after, limit).await,
        }
    }

    async fn link_user(&self, user: &str, conv: &Arc<str>, member: bool) -> Result<(), StoreError> {
        match self {
            NodeStore::Memory(s) => s.link_user(user, conv, member).await,
            NodeStore::Redis(s) => s.link_user(user, conv, member).await,
        }
    }

    async fn user_convs(&self, user: &str) -> Result<Vec<Arc<str>>, StoreError> {
        match self {
            NodeStore::Memory(s) => s.user_convs(user).await,
            NodeStore::Redis(s) => s.user_convs(user).await,
        }
    }
}
