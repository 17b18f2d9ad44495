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
//! - A read mark (per user and conversation) only moves up, and never past the
//!   conversation's last seq.
//!
//! Presence is not stored for this node's own connections: the shards answer it from
//! their live sessions, so it can never outlive them. (A cluster store adds the
//! presence of other nodes.)

mod contract;
pub mod memory;
pub mod redis;

use std::sync::Arc;

use bytes::Bytes;

pub use self::redis::{PresenceOp, RedisPool, RedisStore};
pub use contract::{
    Appended, Conversation, History, MemberChange, MemberOp, MemberView, NewMessage, Presence, ReadMark,
    ReadState, Store, StoreError, Stored,
};
pub use memory::MemoryStore;

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

    async fn set_read(&self, conv: &str, user: &str, seq: u64) -> Result<Option<ReadMark>, StoreError> {
        match self {
            NodeStore::Memory(s) => s.set_read(conv, user, seq).await,
            NodeStore::Redis(s) => s.set_read(conv, user, seq).await,
        }
    }

    async fn read_state(&self, conv: &str, users: &[Arc<str>]) -> Result<ReadState, StoreError> {
        match self {
            NodeStore::Memory(s) => s.read_state(conv, users).await,
            NodeStore::Redis(s) => s.read_state(conv, users).await,
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
