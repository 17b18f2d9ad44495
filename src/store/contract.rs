//! What every store promises: the [`Store`] trait, the data it takes and answers, and
//! [`StoreError`]. The promises themselves are written in the `store` module docs.

use std::net::IpAddr;
use std::sync::Arc;

use bytes::Bytes;
use thiserror::Error;

use crate::bridge::BridgeError;

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
    /// The syncing user's read mark (filled in by the owner for a `sync`; 0 otherwise).
    pub read: u64,
}

/// A user's read mark in a conversation after [`Store::set_read`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadMark {
    /// The mark now: `max(old, min(asked, last seq))`.
    pub read: u64,
    /// The mark went up with this call (the user's other devices are told).
    pub moved: bool,
}

/// The read marks of some users in a conversation, read at once with its last seq.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReadState {
    pub last_seq: u64,
    /// One per user asked, in order; 0 when the user has none.
    pub marks: Vec<u64>,
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

    /// Moves `user`'s read mark in `conv` to `max(mark, min(seq, last seq))`; `None` (and
    /// nothing changed) when `user` is not a member. A mark never goes back.
    async fn set_read(&self, conv: &str, user: &str, seq: u64) -> Result<Option<ReadMark>, StoreError>;
    /// The read marks of `users` in `conv` and its last seq, read at once.
    async fn read_state(&self, conv: &str, users: &[Arc<str>]) -> Result<ReadState, StoreError>;

    /// Records that `user` is (or is no longer) a member of `conv`, on the user's side.
    async fn link_user(&self, user: &str, conv: &Arc<str>, member: bool) -> Result<(), StoreError>;
    /// The conversations `user` is a member of.
    async fn user_convs(&self, user: &str) -> Result<Vec<Arc<str>>, StoreError>;
}
