//! The node-to-node format: what one node's PUB socket sends and every SUB decodes.
//!
//! A ZeroMQ message is two frames, `[topic, payload]`. The topic frame ([`Topic::frame`])
//! is what SUB sockets filter on by prefix; the payload is one [`Envelope`], encoded by
//! hand in this layout (integers little-endian):
//!
//! ```text
//! u8   version          FORMAT_VERSION (4); anything else is refused, never guessed at
//! u8   kind             1 msg, 2 push, 3 disconnect, 4 members, 5 broadcast, 6 to user, 7 signal
//! id   node             the sender's node id
//! u64  epoch            the sender's start epoch
//! body by kind:
//!   msg         id conv, u64 seq, u64 members version, blob json
//!   push        list users, blob json
//!   disconnect  id user
//!   members     id conv, u64 members version, u64 last seq, list added, list removed
//!   broadcast   blob json
//!   to user     id user, blob json
//!   signal      id conv, blob json
//!
//! id    u16 length (<= MAX_ID) + UTF-8 bytes
//! list  u32 count (<= MAX_LIST) + that many ids
//! blob  u32 length (<= MAX_JSON) + UTF-8 bytes (JSON text, written to clients as is)
//! ```
//!
//! Nothing may follow the body. A new field or kind is a new version: nodes of different
//! versions count each other's messages as decode errors instead of misreading them, so a
//! rolling upgrade that changes the format needs the receivers upgraded first. Version 2
//! added the members versions (see `store`): a node that missed a `members` message
//! finds out from the next `msg` of the conversation. Version 3 added the last seq a
//! `members` change was made at, so every node applies it between the same two messages.
//! Version 4 added `to user` (a `read` frame for a user's devices) and `signal`.
//!
//! [`decode`] never panics and checks every length and count against both its cap and the
//! bytes actually left before allocating, so what it allocates is proportional to its input.
//! [`encode`] refuses what [`decode`] would refuse, so a message that cannot travel is
//! caught at the sender, where it can be counted, rather than at every receiver.

use std::sync::Arc;

use bytes::Bytes;
use thiserror::Error;

use crate::ids::{fnv1a, Key};

/// The format version written first in every payload.
pub const FORMAT_VERSION: u8 = 4;
/// Longest node, conversation or user id, in bytes.
pub const MAX_ID: usize = 1024;
/// Most entries in one list (push recipients, members added or removed).
pub const MAX_LIST: usize = 100_000;
/// Largest JSON text carried by one message, in bytes.
pub const MAX_JSON: usize = 16 * 1024 * 1024;

const ID_MAX_BYTES: usize = 2 + MAX_ID;
const LIST_MAX_BYTES: usize = 4 + MAX_LIST * ID_MAX_BYTES;
/// An upper bound on any valid payload (a `members` message with both lists full): the
/// SUB socket's `MAXMSGSIZE`, so a peer announcing a larger frame is cut off before
/// libzmq allocates for it, while nothing valid is ever refused.
pub const MAX_PAYLOAD: usize = 2 + ID_MAX_BYTES + 8 + ID_MAX_BYTES + 8 + 2 * LIST_MAX_BYTES;

/// Topic buckets per kind of key: conversations and users each hash into this many.
pub const BUCKETS: u32 = 4096;

/// What a SUB socket filters on: a hashed bucket of conversation ids, of user ids, or
/// everything for everyone.
///
/// A node subscribes to the buckets of the conversations and users it has online, so its
/// subscription state is bounded by `2 * BUCKETS + 1` topics whatever its load. Buckets
/// are shared by unrelated keys: a subscriber gets every message of its buckets and
/// discards what it does not hold, which is the receiving node's business, not the bus's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Topic {
    /// A bucket of conversations: messages and membership changes.
    Conv(u32),
    /// A bucket of users: pushes and disconnects.
    User(u32),
    /// Every node: broadcasts.
    All,
}

impl Topic {
    /// The bucket of conversation `conv`.
    pub fn conv(conv: &str) -> Topic {
        Topic::Conv(bucket(conv))
    }

    /// The bucket of user `user`.
    pub fn user(user: &str) -> Topic {
        Topic::User(bucket(user))
    }

    /// The topic frame: `c` or `u` and the bucket as four lower-case hex digits (so every
    /// bucket frame has the same width and no subscription is a prefix of another
    /// bucket's frame), or `a` alone. A bucket number `>= BUCKETS` is taken modulo
    /// `BUCKETS`, like every bucket a constructor makes.
    pub fn frame(self) -> TopicFrame {
        let (tag, bucket) = match self {
            Topic::Conv(b) => (b'c', b % BUCKETS),
            Topic::User(b) => (b'u', b % BUCKETS),
            Topic::All => return TopicFrame { bytes: *b"a\0\0\0\0", len: 1 },
        };
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut bytes = [tag, 0, 0, 0, 0];
        for (i, byte) in bytes[1..].iter_mut().enumerate() {
            *byte = HEX[((bucket >> (12 - 4 * i)) & 0xf) as usize];
        }
        TopicFrame { bytes, len: 5 }
    }

    /// The topic a frame names, if it is one [`Topic::frame`] makes.
    pub fn parse(frame: &[u8]) -> Option<Topic> {
        match frame {
            b"a" => Some(Topic::All),
            [tag @ (b'c' | b'u'), digits @ ..] if digits.len() == 4 => {
                let mut bucket = 0u32;
                for d in digits {
                    let v = match d {
                        b'0'..=b'9' => d - b'0',
                        b'a'..=b'f' => d - b'a' + 10,
                        _ => return None,
                    };
                    bucket = bucket << 4 | v as u32;
                }
                if bucket >= BUCKETS {
                    return None;
                }
                Some(if *tag == b'c' { Topic::Conv(bucket) } else { Topic::User(bucket) })
            }
            _ => None,
        }
    }
}

fn bucket(key: &str) -> u32 {
    (fnv1a(key.as_bytes()) % BUCKETS as u64) as u32
}

/// A topic's bytes on the wire, without an allocation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TopicFrame {
    bytes: [u8; 5],
    len: u8,
}

impl TopicFrame {
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len as usize]
    }
}

/// One node-to-node message. The JSON texts are what the receiving node writes to its
/// clients (a `msg` frame's JSON, a `push` frame's), encoded once by the sender.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClusterMsg {
    /// A sequenced message of `conv`: its `msg` frame's JSON text, and the conversation's
    /// members version when it was taken.
    Msg { conv: Key, seq: u64, members_version: u64, json: Bytes },
    /// A push frame's JSON to each of these users' devices.
    Push { users: Vec<Key>, json: Bytes },
    /// Close every connection of `user` (the API's disconnect).
    Disconnect { user: Key },
    /// `conv` gained and lost these members, which made its members version this, when
    /// its last seq was `last_seq`.
    Members { conv: Key, members_version: u64, last_seq: u64, added: Vec<Key>, removed: Vec<Key> },
    /// A broadcast frame's JSON to every connection.
    Broadcast { json: Bytes },
    /// A frame's JSON for every device of `user` (a `read` frame).
    ToUser { user: Key, json: Bytes },
    /// A `signal` frame's JSON for the devices of `conv`'s members.
    Signal { conv: Key, json: Bytes },
}

impl ClusterMsg {
    /// The kind byte on the wire, 1 to 7, in the order of [`KIND_LABELS`].
    pub fn kind(&self) -> u8 {
        match self {
            ClusterMsg::Msg { .. } => 1,
            ClusterMsg::Push { .. } => 2,
            ClusterMsg::Disconnect { .. } => 3,
            ClusterMsg::Members { .. } => 4,
            ClusterMsg::Broadcast { .. } => 5,
            ClusterMsg::ToUser { .. } => 6,
            ClusterMsg::Signal { .. } => 7,
        }
    }

    /// The kind's name, as the `kind` label of the metrics.
    pub fn label(&self) -> &'static str {
        KIND_LABELS[self.kind() as usize - 1]
    }
}

/// The kinds' names, indexed by `kind() - 1`.
pub const KIND_LABELS: [&str; 7] = ["msg", "push", "disconnect", "members", "broadcast", "to_user", "signal"];

/// A message and who sent it: `node` with the `epoch` it started at, so a receiver can tell
/// a restarted node (same id, new epoch) from its previous life, and its own messages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Envelope {
    pub node: Key,
    pub epoch: u64,
    pub msg: ClusterMsg,
}

/// Why bytes are not a valid envelope, or why an envelope cannot be encoded. Decoding: drop
/// the message and count it (a peer on another format version, or corruption). Encoding:
/// the message cannot travel; refuse it before publishing (ids, lists and JSON past the caps
/// should have been refused where they entered the system).
#[derive(Debug, Error, PartialEq, Eq)]
pub enum WireError {
    #[error("truncated: {wanted} bytes wanted at offset {at}, {left} left")]
    Truncated { at: usize, wanted: usize, left: usize },
    #[error("format version {0}, this node speaks {FORMAT_VERSION}")]
    Version(u8),
    #[error("unknown message kind {0}")]
    Kind(u8),
    #[error("id of {0} bytes, more than {MAX_ID}")]
    IdTooLong(usize),
    #[error("list of {0} entries, more than {MAX_LIST}")]
    ListTooLong(usize),
    #[error("JSON of {0} bytes, more than {MAX_JSON}")]
    JsonTooLarge(usize),
    #[error("text that is not UTF-8")]
    NotUtf8,
    #[error("{0} bytes after the end of the message")]
    TrailingBytes(usize),
}

/// Encodes `env` into one exactly-sized buffer.
pub fn encode(env: &Envelope) -> Result<Vec<u8>, WireError> {
    let mut out = Vec::new();
    encode_into(env, &mut out)?;
    Ok(out)
}

/// Appends `env`'s encoding to `out`. On an error `out` is left as it was.
pub fn encode_into(env: &Envelope, out: &mut Vec<u8>) -> Result<(), WireError> {
    let len = encoded_len(env)?;
    out.reserve_exact(len);
    let start = out.len();
    out.push(FORMAT_VERSION);
    out.push(env.msg.kind());
    put_id(out, &env.node);
    out.extend_from_slice(&env.epoch.to_le_bytes());
    match &env.msg {
        ClusterMsg::Msg { conv, seq, members_version, json } => {
            put_id(out, conv);
            out.extend_from_slice(&seq.to_le_bytes());
            out.extend_from_slice(&members_version.to_le_bytes());
            put_blob(out, json);
        }
        ClusterMsg::Push { users, json } => {
            put_list(out, users);
            put_blob(out, json);
        }
        ClusterMsg::Disconnect { user } => put_id(out, user),
        ClusterMsg::Members { conv, members_version, last_seq, added, removed } => {
            put_id(out, conv);
            out.extend_from_slice(&members_version.to_le_bytes());
            out.extend_from_slice(&last_seq.to_le_bytes());
            put_list(out, added);
            put_list(out, removed);
        }
        ClusterMsg::Broadcast { json } => put_blob(out, json),
        ClusterMsg::ToUser { user: key, json } | ClusterMsg::Signal { conv: key, json } => {
            put_id(out, key);
            put_blob(out, json);
        }
    }
    debug_assert_eq!(out.len() - start, len);
    Ok(())
}

/// The encoded size of `env`, after checking every cap.
fn encoded_len(env: &Envelope) -> Result<usize, WireError> {
    fn id(key: &str) -> Result<usize, WireError> {
        if key.len() > MAX_ID {
            return Err(WireError::IdTooLong(key.len()));
        }
        Ok(2 + key.len())
    }
    fn list(keys: &[Key]) -> Result<usize, WireError> {
        if keys.len() > MAX_LIST {
            return Err(WireError::ListTooLong(keys.len()));
        }
        keys.iter().try_fold(4, |sum, k| Ok(sum + id(k)?))
    }
    fn blob(json: &[u8]) -> Result<usize, WireError> {
        if json.len() > MAX_JSON {
            return Err(WireError::JsonTooLarge(json.len()));
        }
        std::str::from_utf8(json).map_err(|_| WireError::NotUtf8)?;
        Ok(4 + json.len())
    }
    let head = 2 + id(&env.node)? + 8;
    let body = match &env.msg {
        ClusterMsg::Msg { conv, json, .. } => id(conv)? + 8 + 8 + blob(json)?,
        ClusterMsg::Push { users, json } => list(users)? + blob(json)?,
        ClusterMsg::Disconnect { user } => id(user)?,
        ClusterMsg::Members { conv, added, removed, .. } => id(conv)? + 16 + list(added)? + list(removed)?,
        ClusterMsg::Broadcast { json } => blob(json)?,
        ClusterMsg::ToUser { user: key, json } | ClusterMsg::Signal { conv: key, json } => {
            id(key)? + blob(json)?
        }
    };
    Ok(head + body)
}

// The `put_*` helpers run after `encoded_len` checked every cap, so the casts cannot truncate.
fn put_id(out: &mut Vec<u8>, key: &str) {
    out.extend_from_slice(&(key.len() as u16).to_le_bytes());
    out.extend_from_slice(key.as_bytes());
}

fn put_list(out: &mut Vec<u8>, keys: &[Key]) {
    out.extend_from_slice(&(keys.len() as u32).to_le_bytes());
    for key in keys {
        put_id(out, key);
    }
}

fn put_blob(out: &mut Vec<u8>, json: &[u8]) {
    out.extend_from_slice(&(json.len() as u32).to_le_bytes());
    out.extend_from_slice(json);
}

/// Decodes one payload. The JSON texts are copied once into their own `Bytes`.
pub fn decode(bytes: &[u8]) -> Result<Envelope, WireError> {
    let mut r = Reader { bytes, at: 0 };
    let version = r.u8()?;
    if version != FORMAT_VERSION {
        return Err(WireError::Version(version));
    }
    let kind = r.u8()?;
    if !(1..=7).contains(&kind) {
        return Err(WireError::Kind(kind));
    }
    let node = r.id()?;
    let epoch = r.u64()?;
    let msg = match kind {
        1 => {
            let conv = r.id()?;
            let seq = r.u64()?;
            let members_version = r.u64()?;
            ClusterMsg::Msg { conv, seq, members_version, json: r.blob()? }
        }
        2 => {
            let users = r.list()?;
            ClusterMsg::Push { users, json: r.blob()? }
        }
        3 => ClusterMsg::Disconnect { user: r.id()? },
        4 => {
            let conv = r.id()?;
            let members_version = r.u64()?;
            let last_seq = r.u64()?;
            let added = r.list()?;
            ClusterMsg::Members { conv, members_version, last_seq, added, removed: r.list()? }
        }
        5 => ClusterMsg::Broadcast { json: r.blob()? },
        6 => {
            let user = r.id()?;
            ClusterMsg::ToUser { user, json: r.blob()? }
        }
        _ => {
            let conv = r.id()?;
            ClusterMsg::Signal { conv, json: r.blob()? }
        }
    };
    let left = r.left();
    if left != 0 {
        return Err(WireError::TrailingBytes(left));
    }
    Ok(Envelope { node, epoch, msg })
}

/// A cursor over a payload; every read checks the bytes left first.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn left(&self) -> usize {
        self.bytes.len() - self.at
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        let left = self.left();
        if n > left {
            return Err(WireError::Truncated { at: self.at, wanted: n, left });
        }
        let taken = &self.bytes[self.at..self.at + n];
        self.at += n;
        Ok(taken)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        let mut a = [0; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.array::<1>()?[0])
    }

    fn u64(&mut self) -> Result<u64, WireError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    fn id(&mut self) -> Result<Key, WireError> {
        let len = u16::from_le_bytes(self.array()?) as usize;
        if len > MAX_ID {
            return Err(WireError::IdTooLong(len));
        }
        let text = std::str::from_utf8(self.take(len)?).map_err(|_| WireError::NotUtf8)?;
        Ok(Arc::from(text))
    }

    fn list(&mut self) -> Result<Vec<Key>, WireError> {
        let count = u32::from_le_bytes(self.array()?) as usize;
        if count > MAX_LIST {
            return Err(WireError::ListTooLong(count));
        }
        // Every id takes at least its 2-byte length: a count the bytes left cannot hold
        // is refused before the Vec is sized from it.
        let least = count * 2;
        if least > self.left() {
            return Err(WireError::Truncated { at: self.at, wanted: least, left: self.left() });
        }
        let mut keys = Vec::with_capacity(count);
        for _ in 0..count {
            keys.push(self.id()?);
        }
        Ok(keys)
    }

    fn blob(&mut self) -> Result<Bytes, WireError> {
        let len = u32::from_le_bytes(self.array()?) as usize;
        if len > MAX_JSON {
            return Err(WireError::JsonTooLarge(len));
        }
        let json = self.take(len)?;
        std::str::from_utf8(json).map_err(|_| WireError::NotUtf8)?;
        Ok(Bytes::copy_from_slice(json))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(s: &str) -> Key {
        Arc::from(s)
    }

    fn env(msg: ClusterMsg) -> Envelope {
        Envelope { node: key("node-1"), epoch: 1_700_000_000_123, msg }
    }

    fn every_variant() -> Vec<ClusterMsg> {
        vec![
            ClusterMsg::Msg {
                conv: key("c1"),
                seq: u64::MAX,
                members_version: 7,
                json: Bytes::from_static(br#"{"op":"msg","text":"h\u00e9"}"#),
            },
            ClusterMsg::Push { users: vec![key("u1"), key(""), key("ü")], json: Bytes::from_static(b"{}") },
            ClusterMsg::Push { users: vec![], json: Bytes::new() },
            ClusterMsg::Disconnect { user: key("u1") },
            ClusterMsg::Members {
                conv: key("c1"),
                members_version: 1,
                last_seq: 7,
                added: vec![key("a"), key("b")],
                removed: vec![],
            },
            ClusterMsg::Members {
                conv: key(""),
                members_version: u64::MAX,
                last_seq: u64::MAX,
                added: vec![],
                removed: vec![key("x")],
            },
            ClusterMsg::Broadcast { json: Bytes::from_static(br#"{"op":"push"}"#) },
            ClusterMsg::ToUser { user: key("u1"), json: Bytes::from_static(br#"{"op":"read"}"#) },
            ClusterMsg::Signal { conv: key("c1"), json: Bytes::from_static(br#"{"op":"signal"}"#) },
        ]
    }

    #[test]
    fn every_variant_round_trips() {
        for msg in every_variant() {
            let e = env(msg);
            let bytes = encode(&e).unwrap();
            assert_eq!(decode(&bytes).unwrap(), e);
        }
    }

    #[test]
    fn ids_and_lists_at_their_caps_round_trip() {
        let long = key(&"x".repeat(MAX_ID));
        let e = Envelope {
            node: long.clone(),
            epoch: 0,
            msg: ClusterMsg::Push { users: vec![key("u"); MAX_LIST], json: Bytes::from_static(b"1") },
        };
        assert_eq!(decode(&encode(&e).unwrap()).unwrap(), e);
        let e = env(ClusterMsg::Disconnect { user: long });
        assert_eq!(decode(&encode(&e).unwrap()).unwrap(), e);
    }

    #[test]
    fn the_layout_is_the_documented_one() {
        let e = Envelope {
            node: key("n"),
            epoch: 2,
            msg: ClusterMsg::Msg {
                conv: key("c"),
                seq: 3,
                members_version: 4,
                json: Bytes::from_static(b"{}"),
            },
        };
        let expected: &[u8] = &[
            4, 1, // version, kind
            1, 0, b'n', // node
            2, 0, 0, 0, 0, 0, 0, 0, // epoch
            1, 0, b'c', // conv
            3, 0, 0, 0, 0, 0, 0, 0, // seq
            4, 0, 0, 0, 0, 0, 0, 0, // members version
            2, 0, 0, 0, b'{', b'}', // json
        ];
        assert_eq!(encode(&e).unwrap(), expected);
    }

    #[test]
    fn encode_refuses_what_decode_would() {
        let cases = [
            (
                env(ClusterMsg::Disconnect { user: key(&"x".repeat(MAX_ID + 1)) }),
                WireError::IdTooLong(MAX_ID + 1),
            ),
            (
                Envelope {
                    node: key(&"n".repeat(MAX_ID + 1)),
                    epoch: 0,
                    msg: ClusterMsg::Broadcast { json: Bytes::new() },
                },
                WireError::IdTooLong(MAX_ID + 1),
            ),
            (
                env(ClusterMsg::Members {
                    conv: key("c"),
                    members_version: 1,
                    last_seq: 0,
                    added: vec![],
                    removed: vec![key("u"); MAX_LIST + 1],
                }),
                WireError::ListTooLong(MAX_LIST + 1),
            ),
            (
                env(ClusterMsg::Broadcast { json: Bytes::from(vec![b' '; MAX_JSON + 1]) }),
                WireError::JsonTooLarge(MAX_JSON + 1),
            ),
            (env(ClusterMsg::Broadcast { json: Bytes::from_static(&[0xff]) }), WireError::NotUtf8),
        ];
        for (e, want) in cases {
            let mut out = b"kept".to_vec();
            assert_eq!(encode_into(&e, &mut out), Err(want));
            assert_eq!(out, b"kept");
        }
    }

    #[test]
    fn bad_inputs_are_refused() {
        let good = encode(&env(ClusterMsg::Msg {
            conv: key("c"),
            seq: 9,
            members_version: 0,
            json: Bytes::from_static(b"{}"),
        }))
        .unwrap();
        let mut trailing = good.clone();
        trailing.push(0);
        let mut version = good.clone();
        version[0] = 1;
        let mut kind = good.clone();
        kind[1] = 8;
        let mut kind_zero = good.clone();
        kind_zero[1] = 0;
        // version, kind, node id "n", epoch, then the body.
        let head = |kind: u8| -> Vec<u8> {
            let mut v = vec![FORMAT_VERSION, kind, 1, 0, b'n'];
            v.extend_from_slice(&7u64.to_le_bytes());
            v
        };
        let with = |kind: u8, body: &[u8]| -> Vec<u8> {
            let mut v = head(kind);
            v.extend_from_slice(body);
            v
        };
        let long_id = (MAX_ID as u16 + 1).to_le_bytes();
        let many = (MAX_LIST as u32 + 1).to_le_bytes();
        let huge = (MAX_JSON as u32 + 1).to_le_bytes();
        let cases: Vec<(&str, Vec<u8>, WireError)> = vec![
            ("empty", vec![], WireError::Truncated { at: 0, wanted: 1, left: 0 }),
            ("version only", vec![FORMAT_VERSION], WireError::Truncated { at: 1, wanted: 1, left: 0 }),
            ("trailing byte", trailing, WireError::TrailingBytes(1)),
            ("an older version", version, WireError::Version(1)),
            ("unknown kind", kind, WireError::Kind(8)),
            ("kind zero", kind_zero, WireError::Kind(0)),
            (
                "node length past the end",
                vec![FORMAT_VERSION, 3, 9, 0, b'n'],
                WireError::Truncated { at: 4, wanted: 9, left: 1 },
            ),
            (
                "node too long",
                [&[FORMAT_VERSION, 3][..], &long_id].concat(),
                WireError::IdTooLong(MAX_ID + 1),
            ),
            ("node not UTF-8", vec![FORMAT_VERSION, 3, 1, 0, 0xc3], WireError::NotUtf8),
            (
                "no epoch",
                vec![FORMAT_VERSION, 3, 1, 0, b'n', 7],
                WireError::Truncated { at: 5, wanted: 8, left: 1 },
            ),
            ("disconnect without user", head(3), WireError::Truncated { at: 13, wanted: 2, left: 0 }),
            ("user too long", with(3, &long_id), WireError::IdTooLong(MAX_ID + 1)),
            (
                "msg without seq",
                with(1, &[1, 0, b'c', 1]),
                WireError::Truncated { at: 16, wanted: 8, left: 1 },
            ),
            ("json too large", with(5, &huge), WireError::JsonTooLarge(MAX_JSON + 1)),
            (
                "json past the end",
                with(5, &[3, 0, 0, 0, b'{']),
                WireError::Truncated { at: 17, wanted: 3, left: 1 },
            ),
            ("json not UTF-8", with(5, &[1, 0, 0, 0, 0xff]), WireError::NotUtf8),
            ("list too long", with(2, &many), WireError::ListTooLong(MAX_LIST + 1)),
            (
                "list count the bytes cannot hold",
                with(2, &[0xa0, 0x86, 0x01, 0x00, 0, 0]),
                WireError::Truncated { at: 17, wanted: 200_000, left: 2 },
            ),
            (
                "list entry past the end",
                with(2, &[2, 0, 0, 0, 1, 0, b'u', 5, 0]),
                WireError::Truncated { at: 22, wanted: 5, left: 0 },
            ),
            (
                "msg without members version",
                with(1, &[1, 0, b'c', 3, 0, 0, 0, 0, 0, 0, 0, 1]),
                WireError::Truncated { at: 24, wanted: 8, left: 1 },
            ),
            (
                "members without removed",
                with(4, &[1, 0, b'c', 1, 0, 0, 0, 0, 0, 0, 0, 5, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
                WireError::Truncated { at: 36, wanted: 4, left: 0 },
            ),
            (
                "members without last seq",
                with(4, &[1, 0, b'c', 1, 0, 0, 0, 0, 0, 0, 0, 5, 0, 0, 0]),
                WireError::Truncated { at: 24, wanted: 8, left: 4 },
            ),
        ];
        for (name, bytes, want) in cases {
            assert_eq!(decode(&bytes), Err(want), "{name}");
        }
    }

    #[test]
    fn every_truncation_of_every_variant_is_refused() {
        for msg in every_variant() {
            let bytes = encode(&env(msg)).unwrap();
            for len in 0..bytes.len() {
                assert!(decode(&bytes[..len]).is_err(), "{len} of {} bytes", bytes.len());
            }
        }
    }

    #[test]
    fn random_bytes_never_panic() {
        // xorshift64*: deterministic, no dependency.
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            state.wrapping_mul(0x2545_f491_4f6c_dd1d)
        };
        let seeds: Vec<Vec<u8>> = every_variant().into_iter().map(|m| encode(&env(m)).unwrap()).collect();
        for round in 0..20_000 {
            let mut bytes = if round % 2 == 0 {
                // Pure noise behind a valid version byte, so the decoder gets past the first check.
                let len = (next() % 64) as usize;
                let mut v: Vec<u8> = (0..len).map(|_| next() as u8).collect();
                if let Some(first) = v.first_mut() {
                    *first = FORMAT_VERSION;
                }
                v
            } else {
                // A valid encoding with a few bytes flipped.
                seeds[(next() % seeds.len() as u64) as usize].clone()
            };
            if !bytes.is_empty() {
                for _ in 0..=(next() % 3) {
                    let i = (next() % bytes.len() as u64) as usize;
                    bytes[i] ^= (next() as u8) | 1;
                }
            }
            if let Ok(e) = decode(&bytes) {
                // Whatever decodes must re-encode to the same bytes: there is one encoding.
                assert_eq!(encode(&e).unwrap(), bytes);
            }
        }
    }

    #[test]
    fn topic_frames_are_fixed_width_and_parse_back() {
        assert_eq!(Topic::Conv(0).frame().as_bytes(), b"c0000");
        assert_eq!(Topic::Conv(0xa3f).frame().as_bytes(), b"c0a3f");
        assert_eq!(Topic::User(BUCKETS - 1).frame().as_bytes(), b"u0fff");
        assert_eq!(Topic::Conv(BUCKETS + 1).frame(), Topic::Conv(1).frame());
        assert_eq!(Topic::All.frame().as_bytes(), b"a");
        for topic in [Topic::Conv(0), Topic::Conv(4095), Topic::User(17), Topic::All] {
            assert_eq!(Topic::parse(topic.frame().as_bytes()), Some(topic));
        }
        for bad in [&b""[..], b"c", b"c0a3", b"c0a3f0", b"x0a3f", b"c0A3F", b"c1000", b"aa"] {
            assert_eq!(Topic::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn buckets_come_from_fnv1a() {
        let b = (fnv1a(b"conv-42") % BUCKETS as u64) as u32;
        assert_eq!(Topic::conv("conv-42"), Topic::Conv(b));
        assert_eq!(Topic::user("conv-42"), Topic::User(b));
        assert!((0..1000).all(|i| matches!(Topic::conv(&format!("c{i}")), Topic::Conv(b) if b < BUCKETS)));
    }
}
