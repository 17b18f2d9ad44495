//! The cluster's store: Redis, reached through the [`RedisPool`] of `bridge` (blocking
//! connections on their own threads; a shard only awaits answers). Every call of the
//! [`Store`] trait is one job, so one round trip, and every change that must be atomic is
//! one Lua script (one `EVALSHA`) over the keys of one slot. Besides the [`Store`] trait it holds what nodes share: presence of every
//! node's connections and the node leases that let a dead node's presence be purged.
//!
//! # Keys
//!
//! Ids (conversations, users, nodes, cids) may contain `:`, so they are written inside
//! `{}`, which no id may contain: a key reads back unambiguously. The first `{...}` of a
//! key is its Redis Cluster hash tag, so every key of one conversation shares a slot
//! (`{conv}`), every key of one user shares one (`{user}`), and the keys the nodes share
//! to keep the cluster itself (leases, node runs, presence indexes, pending webhook
//! events) all live in the one slot of `{ctl}`.
//!
//! | key | slot | type | holds |
//! | --- | --- | --- | --- |
//! | `rp:c:{conv}:m` | conv | set | members of `conv` |
//! | `rp:c:{conv}:seq` | conv | string | last seq assigned in `conv` |
//! | `rp:c:{conv}:mv` | conv | string | members version of `conv`: raised by one at every change of `rp:c:{conv}:m` |
//! | `rp:c:{conv}:h` | conv | stream | history; entry id `<seq>-1`, fields `v` members version, `f` from, `t` ts, `b` body, `d` dev and `c` cid when present; exactly the last `history.max_per_conv` |
//! | `rp:c:{conv}:d:{user}:{cid}` | conv | string, PX `dedupe_window_ms` | `"<seq>:<ts>"` of the first message with this cid |
//! | `rp:c:{conv}:r` | conv | hash | read marks: user -> the highest seq the user marked read (never above `:seq`) |
//! | `rp:wh:w:{conv}` | conv | string, PX 2 × `webhook.offline_delay_ms` | the node whose `message.offline` window of `conv` is open |
//! | `rp:u:{user}:c` | user | set | conversations of `user` |
//! | `rp:p:{user}` | user | hash | presence: field `<node>/<conn>` -> `{"device","conn","node","epoch","ip","since"}` |
//! | `rp:wh:u:{user}` | user | string | `on` / `off`: the user's state as last sent in `user.online` / `user.offline` |
//! | `rp:{ctl}:lease:{node}` | ctl | string, PX lease ttl | the epoch of the node run holding the lease |
//! | `rp:{ctl}:nodes` | ctl | hash | node -> `{"epoch":<epoch>,"pub":<endpoint or null>}` |
//! | `rp:{ctl}:epochs` | ctl | set | `"<node>:<epoch>"` of every node run that may have presence to purge |
//! | `rp:{ctl}:purging` | ctl | set | `"<node>:<epoch>"` of every run whose purge has begun and not ended |
//! | `rp:{ctl}:pn:{node}:<epoch>` | ctl | set | `"<user>\n<field>"` of every presence entry written by that node run |
//! | `rp:{ctl}:wh:{node}:<epoch>` | ctl | hash | webhook events of that node run not yet delivered: id -> event JSON (taken over by another node once the run's lease is gone) |
//! | `rp:{ctl}:wh:runs` | ctl | set | `"<node>:<epoch>"` of every run that may have pending webhook events |
//!
//! Every command and every script names keys of one slot only (a script may compute
//! further keys of that same slot, never of another), so the store runs unchanged on one
//! Redis and on a Redis Cluster, where the pool routes each command by its first key.
//!
//! # Promises
//! - Seqs: `append` continues above the caller's `floor` and above the newest history
//!   entry when the counter is missing, so a Redis that lost data never reuses a seq.
//!   Counters and history never expire; dedupe entries expire after the window.
//! - A `msg` frame rebuilt from history is byte for byte the frame the sender's node
//!   encoded (`protocol::msg_json` over the same fields, `codec::text_frame`).
//! - Presence lives as long as its node's lease: once `rp:{ctl}:lease:{node}` is gone or
//!   holds another epoch, the next [`RedisStore::sweep`] of any node removes every entry
//!   of that node run. The purge spans the users' slots, so it is not one script: it
//!   begins with one (which checks the lease, unregisters the run and marks it purging),
//!   removes the entries in chunks, each chunk removed from the run's index after its
//!   entries, and ends when the index is empty. A purge cut short (its node died) is
//!   resumed by the next sweep of any node; only the sweep that began it reports it. A
//!   node whose lease comes back false from [`RedisStore::renew_lease`] must write its
//!   presence again.

use std::borrow::Cow;
use std::net::IpAddr;
use std::sync::Arc;

use ::redis::{from_redis_value, Cmd, FromRedisValue, Value};
use bytes::Bytes;
use serde::{Deserialize, Serialize};

pub use crate::bridge::RedisPool;
use crate::bridge::Script;
use crate::protocol::{msg_json, MsgFields};
use crate::ws::codec::text_frame;

use super::contract::{
    Appended, Conversation, History, MemberChange, MemberOp, MemberView, NewMessage, Presence, ReadMark,
    ReadState, Store, StoreError, Stored,
};

/// Most conversations per `reseed` round trip.
const RESEED_CHUNK: usize = 1000;

/// One change to this node's presence in Redis.
#[derive(Debug, Clone)]
pub enum PresenceOp {
    /// A connection of `user` arrived on this node (`entry.node` is taken to be this node).
    Add { user: Arc<str>, entry: Presence },
    /// Connection `conn` of `user`, on this node, went away.
    Remove { user: Arc<str>, conn: Arc<str> },
}

/// The Redis store of one node; cheap to clone (one per shard is fine).
#[derive(Clone)]
pub struct RedisStore {
    inner: Arc<Inner>,
}

struct Inner {
    pool: RedisPool,
    node: Arc<str>,
    epoch: u64,
    max_per_conv: usize,
    dedupe_window_ms: u64,
    scripts: Scripts,
    /// `rp:{ctl}:lease:{node}`.
    lease_key: String,
    /// `rp:{ctl}:pn:{node}:<epoch>`.
    presence_index_key: String,
    /// `<node>:<epoch>`, this run's member of `rp:epochs`.
    run: String,
}

struct Scripts {
    append: Script,
    history: Script,
    conversation: Script,
    member_view: Script,
    set_members: Script,
    renew: Script,
    dead_runs: Script,
    purge_begin: Script,
    peers: Script,
    reseed: Script,
    set_read: Script,
    read_state: Script,
    hook_claim: Script,
    hook_user_state: Script,
}

// The cluster's own keys, all in the slot of `{ctl}` (see "Keys").
const NODES: &str = "rp:{ctl}:nodes";
/// Runs (`node:epoch`) that may have pending webhook events.
const HOOK_RUNS: &str = "rp:{ctl}:wh:runs";
const EPOCHS: &str = "rp:{ctl}:epochs";
/// Runs whose presence purge has begun and not ended.
const PURGING: &str = "rp:{ctl}:purging";

/// Presence entries removed per round trip of a purge.
const PURGE_CHUNK: usize = 1000;

fn members_key(conv: &str) -> String {
    format!("rp:c:{{{conv}}}:m")
}
fn seq_key(conv: &str) -> String {
    format!("rp:c:{{{conv}}}:seq")
}
fn members_version_key(conv: &str) -> String {
    format!("rp:c:{{{conv}}}:mv")
}
fn history_key(conv: &str) -> String {
    format!("rp:c:{{{conv}}}:h")
}
fn reads_key(conv: &str) -> String {
    format!("rp:c:{{{conv}}}:r")
}
fn dedupe_key(conv: &str, user: &str, cid: &str) -> String {
    format!("rp:c:{{{conv}}}:d:{{{user}}}:{{{cid}}}")
}
fn user_convs_key(user: &str) -> String {
    format!("rp:u:{{{user}}}:c")
}
fn presence_key(user: &str) -> String {
    format!("rp:p:{{{user}}}")
}
/// Also built inside `DEAD_RUNS`, `PEERS` and `HOOK_CLAIM`: keep them in step.
fn lease_key(node: &str) -> String {
    format!("rp:{{ctl}}:lease:{{{node}}}")
}
fn presence_index_key(node: &str, epoch: u64) -> String {
    format!("rp:{{ctl}}:pn:{{{node}}}:{epoch}")
}
/// Also built inside `HOOK_CLAIM`: keep both in step.
fn hook_pending_key(node: &str, epoch: u64) -> String {
    format!("rp:{{ctl}}:wh:{{{node}}}:{epoch}")
}
fn hook_user_key(user: &str) -> String {
    format!("rp:wh:u:{{{user}}}")
}
fn hook_window_key(conv: &str) -> String {
    format!("rp:wh:w:{{{conv}}}")
}

/// KEYS: seq, history, members, members version, [dedupe]. ARGV: floor, max_per_conv, ts,
/// dedupe window ms, check membership ('1'/'0'), then the stream fields as name/value
/// pairs, the first pair being `f`, the sender. Answers `{}` when the sender must be a
/// member and is not (nothing stored), else `{seq, ts, duplicate (0/1), fields of the
/// first message or nil, members version}`; numbers as decimal strings (Lua numbers would
/// print as floats past 14 digits). The membership check rides in the same round trip as
/// the append; the members version is stored with the message (field `v`).
const APPEND: &str = r#"
if ARGV[5] == '1' and redis.call('SISMEMBER', KEYS[3], ARGV[7]) == 0 then
  return {}
end
local mv = redis.call('GET', KEYS[4]) or '0'
if KEYS[5] then
  local seen = redis.call('GET', KEYS[5])
  if seen then
    local at = string.find(seen, ':', 1, true)
    local seq = string.sub(seen, 1, at - 1)
    local entry = redis.call('XRANGE', KEYS[2], seq .. '-1', seq .. '-1')
    return {seq, string.sub(seen, at + 1), 1, entry[1] and entry[1][2] or false, mv}
  end
end
local floor = tonumber(ARGV[1])
local cur = redis.call('GET', KEYS[1])
if cur then
  cur = tonumber(cur)
else
  -- A new conversation, or a lost counter: never go below what history still holds.
  cur = 0
  local newest = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)
  if newest[1] then
    local top = tonumber(string.match(newest[1][1], '^(%d+)'))
    if top > floor then floor = top end
  end
end
if cur < floor then
  redis.call('SET', KEYS[1], string.format('%d', floor))
end
local seq = string.format('%d', redis.call('INCR', KEYS[1]))
redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[2], seq .. '-1', 'v', mv, unpack(ARGV, 6))
if KEYS[5] and tonumber(ARGV[4]) > 0 then
  redis.call('SET', KEYS[5], seq .. ':' .. ARGV[3], 'PX', ARGV[4])
end
return {seq, ARGV[3], 0, false, mv}
"#;

/// KEYS: members, seq, members version of one conversation. ARGV: the user. Answers
/// `{member (1/0), last seq, members version}`, read at once (a membership and its
/// version belong together).
const MEMBER_VIEW: &str = r#"
return {redis.call('SISMEMBER', KEYS[1], ARGV[1]), redis.call('GET', KEYS[2]) or '0', redis.call('GET', KEYS[3]) or '0'}
"#;

/// KEYS: members, seq, members version. Answers `{members, last seq, members version}`
/// read at once (a member set and its version belong together).
const CONVERSATION: &str = r#"
return {redis.call('SMEMBERS', KEYS[1]), redis.call('GET', KEYS[2]) or '0', redis.call('GET', KEYS[3]) or '0'}
"#;

/// KEYS: seq, history. ARGV: first id, count. Answers `{last seq, entries}` read at once.
const HISTORY: &str = r#"
return {redis.call('GET', KEYS[1]) or '0', redis.call('XRANGE', KEYS[2], ARGV[1], '+', 'COUNT', ARGV[2])}
"#;

/// KEYS: members, seq, read marks. ARGV: user, seq. Answers `{}` when the user is not a
/// member, else `{mark, moved (1/0)}`: the mark becomes `max(mark, min(seq, last seq))`.
const SET_READ: &str = r#"
if redis.call('SISMEMBER', KEYS[1], ARGV[1]) == 0 then
  return {}
end
local last = tonumber(redis.call('GET', KEYS[2]) or '0')
local want = math.min(tonumber(ARGV[2]), last)
local old = tonumber(redis.call('HGET', KEYS[3], ARGV[1]) or '0')
if want <= old then
  return {string.format('%d', old), 0}
end
redis.call('HSET', KEYS[3], ARGV[1], string.format('%d', want))
return {string.format('%d', want), 1}
"#;

/// KEYS: seq, read marks. ARGV: users. Answers `{last seq, mark per user}` read at once.
const READ_STATE: &str = r#"
local out = {redis.call('GET', KEYS[1]) or '0'}
for i = 1, #ARGV do
  out[#out + 1] = redis.call('HGET', KEYS[2], ARGV[i]) or '0'
end
return out
"#;

/// KEYS: rp:wh:runs, this run's pending events. ARGV: this run. Moves the pending webhook
/// events of every other run whose node lease is gone or held by another epoch (the run
/// died or was restarted) into this run's hash, and answers them as id, json pairs: each
/// event is taken over by one node only.
const HOOK_CLAIM: &str = r#"
local out = {}
for _, run in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if run ~= ARGV[1] then
    local node, epoch = string.match(run, '^(.*):(%d+)$')
    local lease = node and redis.call('GET', 'rp:{ctl}:lease:{' .. node .. '}')
    if node and lease ~= epoch then
      local key = 'rp:{ctl}:wh:{' .. node .. '}:' .. epoch
      local all = redis.call('HGETALL', key)
      for i = 1, #all, 2 do
        redis.call('HSET', KEYS[2], all[i], all[i + 1])
        out[#out + 1] = all[i]
        out[#out + 1] = all[i + 1]
      end
      redis.call('DEL', key)
      redis.call('SREM', KEYS[1], run)
    end
  end
end
if #out > 0 then redis.call('SADD', KEYS[1], ARGV[1]) end
return out
"#;

/// KEYS: the user's announced state. ARGV: 'on' | 'off'. Sets it; answers 1 when it changed
/// (the event is this caller's to send), 0 when it already was so.
const HOOK_USER_STATE: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1])
return 1
"#;

/// KEYS: members, members version, seq. ARGV: 'replace' | 'add' | 'remove', then users.
/// Answers `{added, removed, count, members version, last seq}`; the version is raised by
/// one when anything changed, and the last seq places the change between two messages.
const SET_MEMBERS: &str = r#"
local added, removed = {}, {}
if ARGV[1] == 'replace' then
  local keep = {}
  for i = 2, #ARGV do keep[ARGV[i]] = true end
  for _, m in ipairs(redis.call('SMEMBERS', KEYS[1])) do
    if not keep[m] then
      redis.call('SREM', KEYS[1], m)
      removed[#removed + 1] = m
    end
  end
end
if ARGV[1] == 'remove' then
  for i = 2, #ARGV do
    if redis.call('SREM', KEYS[1], ARGV[i]) == 1 then removed[#removed + 1] = ARGV[i] end
  end
else
  for i = 2, #ARGV do
    if redis.call('SADD', KEYS[1], ARGV[i]) == 1 then added[#added + 1] = ARGV[i] end
  end
end
local mv
if #added > 0 or #removed > 0 then
  mv = redis.call('INCR', KEYS[2])
else
  mv = tonumber(redis.call('GET', KEYS[2]) or '0')
end
local last = tonumber(redis.call('GET', KEYS[3]) or '0')
return {added, removed, redis.call('SCARD', KEYS[1]), string.format('%d', mv), string.format('%d', last)}
"#;

/// KEYS: lease, rp:nodes, rp:epochs. ARGV: epoch, ttl ms, node, node info JSON, run.
/// Answers 1 when the lease already held this epoch.
const RENEW: &str = r#"
local held = redis.call('GET', KEYS[1])
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('HSET', KEYS[2], ARGV[3], ARGV[4])
redis.call('SADD', KEYS[3], ARGV[5])
if held == ARGV[1] then return 1 end
return 0
"#;

/// KEYS: rp:{ctl}:epochs, rp:{ctl}:purging. Answers the runs (`node:epoch`) whose lease
/// is gone or moved on: those never purged, and those whose purge was cut short.
const DEAD_RUNS: &str = r#"
local dead, seen = {}, {}
for k = 1, 2 do
  for _, run in ipairs(redis.call('SMEMBERS', KEYS[k])) do
    local node, epoch = string.match(run, '^(.*):(%d+)$')
    if not seen[run] and (not node or redis.call('GET', 'rp:{ctl}:lease:{' .. node .. '}') ~= epoch) then
      seen[run] = true
      dead[#dead + 1] = run
    end
  end
end
return dead
"#;

/// KEYS: rp:{ctl}:epochs, the run's lease, rp:{ctl}:nodes, rp:{ctl}:purging. ARGV: run,
/// epoch, node, '1' when the run itself is leaving (its lease is dropped first) else '0'.
/// Begins the purge of a run's presence unless its lease is live (answers -1 then):
/// unregisters the node run and marks it purging. Answers 1 if this call took the run
/// out of rp:{ctl}:epochs (so two sweeps never both report it), else 0. The entries
/// themselves are removed by the caller, then the run is taken out of rp:{ctl}:purging.
const PURGE_BEGIN: &str = r#"
local lease = redis.call('GET', KEYS[2])
if ARGV[4] == '1' then
  if lease == ARGV[2] then redis.call('DEL', KEYS[2]) end
elseif lease == ARGV[2] then
  return -1
end
local info = redis.call('HGET', KEYS[3], ARGV[3])
local mine = '{"epoch":' .. ARGV[2] .. ','
if info and string.sub(info, 1, #mine) == mine then redis.call('HDEL', KEYS[3], ARGV[3]) end
redis.call('SADD', KEYS[4], ARGV[1])
return redis.call('SREM', KEYS[1], ARGV[1])
"#;

/// KEYS: rp:nodes. ARGV: this node. Answers node, info pairs of the other nodes whose
/// lease holds the epoch they registered.
const PEERS: &str = r#"
local out = {}
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  local node, info = all[i], all[i + 1]
  if node ~= ARGV[1] then
    local epoch = string.match(info, '^{"epoch":(%d+),')
    if epoch and redis.call('GET', 'rp:{ctl}:lease:{' .. node .. '}') == epoch then
      out[#out + 1] = node
      out[#out + 1] = info
    end
  end
end
return out
"#;

/// KEYS: a seq counter. ARGV: a seq. Raises the counter to at least the seq.
const RESEED: &str = r#"
if tonumber(redis.call('GET', KEYS[1]) or '0') < tonumber(ARGV[1]) then redis.call('SET', KEYS[1], ARGV[1]) end
return 0
"#;

/// A presence entry as stored in `rp:p:{user}`.
#[derive(Serialize, Deserialize)]
struct PresenceRecord<'a> {
    #[serde(borrow)]
    device: Cow<'a, str>,
    #[serde(borrow)]
    conn: Cow<'a, str>,
    #[serde(borrow)]
    node: Cow<'a, str>,
    epoch: u64,
    ip: IpAddr,
    since: u64,
}

/// A node as registered in `rp:nodes`; the writer puts `epoch` first (the scripts match
/// it as a prefix).
#[derive(Deserialize)]
struct NodeInfo {
    #[serde(rename = "pub")]
    endpoint: Option<String>,
}

impl RedisStore {
    /// A store for node `node` in its run `epoch` (a new one at every start). Registers the
    /// scripts with `pool`.
    pub fn new(
        pool: RedisPool,
        node: Arc<str>,
        epoch: u64,
        max_per_conv: usize,
        dedupe_window_ms: u64,
    ) -> RedisStore {
        let scripts = Scripts {
            append: pool.register(APPEND),
            history: pool.register(HISTORY),
            conversation: pool.register(CONVERSATION),
            member_view: pool.register(MEMBER_VIEW),
            set_members: pool.register(SET_MEMBERS),
            renew: pool.register(RENEW),
            dead_runs: pool.register(DEAD_RUNS),
            purge_begin: pool.register(PURGE_BEGIN),
            peers: pool.register(PEERS),
            reseed: pool.register(RESEED),
            set_read: pool.register(SET_READ),
            read_state: pool.register(READ_STATE),
            hook_claim: pool.register(HOOK_CLAIM),
            hook_user_state: pool.register(HOOK_USER_STATE),
        };
        let inner = Inner {
            lease_key: lease_key(&node),
            presence_index_key: presence_index_key(&node, epoch),
            run: format!("{node}:{epoch}"),
            pool,
            node,
            epoch,
            max_per_conv: max_per_conv.max(1),
            dedupe_window_ms,
            scripts,
        };
        RedisStore { inner: Arc::new(inner) }
    }

    pub fn pool(&self) -> &RedisPool {
        &self.inner.pool
    }

    pub fn node(&self) -> &Arc<str> {
        &self.inner.node
    }

    pub fn epoch(&self) -> u64 {
        self.inner.epoch
    }

    /// Applies `ops` to this node's presence, in order, in one round trip.
    pub async fn presence_write(&self, ops: &[PresenceOp]) -> Result<(), StoreError> {
        if ops.is_empty() {
            return Ok(());
        }
        let me = &*self.inner;
        let mut cmds = Vec::with_capacity(ops.len() * 2);
        for op in ops {
            match op {
                PresenceOp::Add { user, entry } => {
                    let field = format!("{}/{}", me.node, entry.conn);
                    let record = PresenceRecord {
                        device: Cow::Borrowed(&entry.device),
                        conn: Cow::Borrowed(&entry.conn),
                        node: Cow::Borrowed(&me.node),
                        epoch: me.epoch,
                        ip: entry.ip,
                        since: entry.since,
                    };
                    let json = serde_json::to_string(&record).map_err(unexpected)?;
                    let mut hset = ::redis::cmd("HSET");
                    hset.arg(presence_key(user)).arg(&field).arg(json);
                    let mut sadd = ::redis::cmd("SADD");
                    sadd.arg(&me.presence_index_key).arg(format!("{user}\n{field}"));
                    cmds.extend([hset, sadd]);
                }
                PresenceOp::Remove { user, conn } => {
                    let field = format!("{}/{conn}", me.node);
                    let mut hdel = ::redis::cmd("HDEL");
                    hdel.arg(presence_key(user)).arg(&field);
                    let mut srem = ::redis::cmd("SREM");
                    srem.arg(&me.presence_index_key).arg(format!("{user}\n{field}"));
                    cmds.extend([hdel, srem]);
                }
            }
        }
        me.pool.query(cmds).await.map(drop).map_err(StoreError::from)
    }

    /// Every node's connections of `user` (entries that do not parse are skipped).
    pub async fn presence_of(&self, user: &str) -> Result<Vec<Presence>, StoreError> {
        let mut hvals = ::redis::cmd("HVALS");
        hvals.arg(presence_key(user));
        let records: Vec<Vec<u8>> = parse(&self.inner.pool.query_one(hvals).await?)?;
        let mut out = Vec::with_capacity(records.len());
        for raw in &records {
            match serde_json::from_slice::<PresenceRecord>(raw) {
                Ok(r) => out.push(Presence {
                    device: Arc::from(r.device),
                    conn: Arc::from(r.conn),
                    node: Arc::from(r.node),
                    ip: r.ip,
                    since: r.since,
                }),
                Err(e) => tracing::warn!("redis: skipping a presence entry of {user}: {e}"),
            }
        }
        Ok(out)
    }

    /// Takes or extends this node's lease for `ttl_ms` and registers the node (with its
    /// PUB endpoint `advertise`). True when the lease already held this epoch; false the
    /// first time, or when this node was purged or Redis lost its data: the caller then
    /// writes all its presence again.
    pub async fn renew_lease(&self, advertise: Option<&str>, ttl_ms: u64) -> Result<bool, StoreError> {
        let me = &*self.inner;
        let endpoint = serde_json::to_string(&advertise).map_err(unexpected)?;
        let info = format!("{{\"epoch\":{},\"pub\":{endpoint}}}", me.epoch);
        let mut cmd = me.scripts.renew.cmd(3);
        cmd.arg(&me.lease_key).arg(NODES).arg(EPOCHS);
        cmd.arg(me.epoch).arg(ttl_ms.max(1)).arg(&*me.node).arg(info).arg(&me.run);
        let held: i64 = parse(&me.pool.query_one(cmd).await?)?;
        Ok(held == 1)
    }

    /// Purges the presence of every node run whose lease is gone or held by another epoch,
    /// and finishes purges that were cut short. Answers the runs (`node:epoch`) whose
    /// purge this call began; a run begun by a concurrent sweep is not listed.
    pub async fn sweep(&self) -> Result<Vec<String>, StoreError> {
        let me = &*self.inner;
        let mut find = me.scripts.dead_runs.cmd(2);
        find.arg(EPOCHS).arg(PURGING);
        let dead: Vec<String> = parse(&me.pool.query_one(find).await?)?;
        let mut purged = Vec::new();
        for run in dead {
            let Some((node, epoch)) = run.rsplit_once(':').and_then(|(n, e)| Some((n, e.parse().ok()?)))
            else {
                continue;
            };
            if self.purge(&run, node, epoch, false).await? {
                purged.push(run);
            }
        }
        Ok(purged)
    }

    /// Purges the presence of node run `run` (see "Promises"): true when this call began
    /// it. Nothing happens to a run whose lease is live, unless it is this node `leaving`.
    async fn purge(&self, run: &str, node: &str, epoch: u64, leaving: bool) -> Result<bool, StoreError> {
        let me = &*self.inner;
        let mut begin = me.scripts.purge_begin.cmd(4);
        begin.arg(EPOCHS).arg(lease_key(node)).arg(NODES).arg(PURGING);
        begin.arg(run).arg(epoch).arg(node).arg(if leaving { "1" } else { "0" });
        let began: i64 = parse(&me.pool.query_one(begin).await?)?;
        if began < 0 {
            return Ok(false);
        }
        let index = presence_index_key(node, epoch);
        loop {
            let mut some = ::redis::cmd("SRANDMEMBER");
            some.arg(&index).arg(PURGE_CHUNK);
            let entries: Vec<String> = parse(&me.pool.query_one(some).await?)?;
            if entries.is_empty() {
                break;
            }
            // The entries first, then their index lines: a purge cut short in between
            // finds them again.
            let mut cmds: Vec<Cmd> = entries
                .iter()
                .filter_map(|entry| {
                    let (user, field) = entry.split_once('\n')?;
                    let mut hdel = ::redis::cmd("HDEL");
                    hdel.arg(presence_key(user)).arg(field);
                    Some(hdel)
                })
                .collect();
            let mut srem = ::redis::cmd("SREM");
            srem.arg(&index).arg(&entries);
            cmds.push(srem);
            me.pool.query(cmds).await?;
        }
        let mut done = ::redis::cmd("SREM");
        done.arg(PURGING).arg(run);
        me.pool.query_one(done).await?;
        Ok(began == 1)
    }

    /// `(node, PUB endpoint)` of the other nodes whose lease is live under the epoch they
    /// registered and that advertise an endpoint.
    pub async fn peers(&self) -> Result<Vec<(Arc<str>, String)>, StoreError> {
        let me = &*self.inner;
        let mut cmd = me.scripts.peers.cmd(1);
        cmd.arg(NODES).arg(&*me.node);
        let pairs: Vec<String> = parse(&me.pool.query_one(cmd).await?)?;
        let mut out = Vec::new();
        for pair in pairs.chunks_exact(2) {
            match serde_json::from_str::<NodeInfo>(&pair[1]) {
                Ok(NodeInfo { endpoint: Some(endpoint) }) => {
                    out.push((Arc::from(pair[0].as_str()), endpoint))
                }
                Ok(_) => {}
                Err(e) => tracing::warn!("redis: skipping node {}: {e}", pair[0]),
            }
        }
        Ok(out)
    }

    /// Leaves the cluster: drops this run's lease, its `rp:{ctl}:nodes` entry and its
    /// presence.
    pub async fn leave(&self) -> Result<(), StoreError> {
        let me = &*self.inner;
        self.purge(&me.run, &me.node, me.epoch, true).await.map(drop)
    }

    /// Raises each conversation's counter to at least the given seq (after Redis lost its
    /// data), one round trip per [`RESEED_CHUNK`] conversations.
    pub async fn reseed(&self, convs: Vec<(Arc<str>, u64)>) -> Result<(), StoreError> {
        if convs.is_empty() {
            return Ok(());
        }
        let me = &*self.inner;
        for chunk in convs.chunks(RESEED_CHUNK) {
            let cmds = chunk
                .iter()
                .map(|(conv, seq)| {
                    let mut cmd = me.scripts.reseed.cmd(1);
                    cmd.arg(seq_key(conv)).arg(*seq);
                    cmd
                })
                .collect();
            me.pool.query(cmds).await?;
        }
        Ok(())
    }
}

/// Webhooks in a cluster: pending events live in Redis until delivered, so another node
/// sends them when this one dies; the decisions that must be made once for the cluster
/// (a user's online state, a conversation's offline window) are made here.
impl RedisStore {
    fn hook_pending_key(&self) -> String {
        hook_pending_key(&self.inner.node, self.inner.epoch)
    }

    /// Keeps a webhook event until [`RedisStore::hook_done_cmds`] removes it.
    pub async fn hook_pending(&self, id: &str, json: &str) -> Result<(), StoreError> {
        let mut hset = ::redis::cmd("HSET");
        hset.arg(self.hook_pending_key()).arg(id).arg(json);
        let mut sadd = ::redis::cmd("SADD");
        sadd.arg(HOOK_RUNS).arg(&self.inner.run);
        self.inner.pool.query(vec![hset, sadd]).await.map(drop).map_err(StoreError::from)
    }

    /// The commands that forget delivered (or dropped) events.
    pub fn hook_done_cmds(&self, ids: &[String]) -> Vec<Cmd> {
        if ids.is_empty() {
            return Vec::new();
        }
        let mut hdel = ::redis::cmd("HDEL");
        hdel.arg(self.hook_pending_key());
        for id in ids {
            hdel.arg(id);
        }
        vec![hdel]
    }

    /// Takes over the pending events of dead node runs (see `HOOK_CLAIM`): `(id, json)`.
    pub async fn hook_claim(&self) -> Result<Vec<(String, String)>, StoreError> {
        let mut cmd = self.inner.scripts.hook_claim.cmd(2);
        cmd.arg(HOOK_RUNS).arg(self.hook_pending_key()).arg(&self.inner.run);
        let flat: Vec<String> = parse(&self.inner.pool.query_one(cmd).await?)?;
        Ok(flat.chunks_exact(2).map(|p| (p[0].clone(), p[1].clone())).collect())
    }

    /// Records the user's announced state; true when it changed (send the event).
    pub async fn hook_user_state(&self, user: &str, online: bool) -> Result<bool, StoreError> {
        let mut cmd = self.inner.scripts.hook_user_state.cmd(1);
        cmd.arg(hook_user_key(user)).arg(if online { "on" } else { "off" });
        Ok(parse::<i64>(&self.inner.pool.query_one(cmd).await?)? == 1)
    }

    /// Opens the cluster's offline window of `conv` for `ttl_ms`; false when a node has
    /// one open already (its event covers this message).
    pub async fn hook_window(&self, conv: &str, ttl_ms: u64) -> Result<bool, StoreError> {
        let mut cmd = ::redis::cmd("SET");
        cmd.arg(hook_window_key(conv)).arg(&*self.inner.node).arg("NX").arg("PX").arg(ttl_ms.max(1));
        let answer = self.inner.pool.query_one(cmd).await?;
        Ok(!matches!(answer, Value::Nil))
    }

    /// Closes the offline window of `conv` (a message after this opens a new one).
    pub async fn hook_window_close(&self, conv: &str) -> Result<(), StoreError> {
        let mut cmd = ::redis::cmd("DEL");
        cmd.arg(hook_window_key(conv));
        self.inner.pool.query_one(cmd).await.map(drop).map_err(StoreError::from)
    }

    /// Whether each of `users` has a connection on any node (presence entries).
    pub async fn online(&self, users: &[Arc<str>]) -> Result<Vec<bool>, StoreError> {
        if users.is_empty() {
            return Ok(Vec::new());
        }
        let cmds = users
            .iter()
            .map(|u| {
                let mut cmd = ::redis::cmd("HLEN");
                cmd.arg(presence_key(u));
                cmd
            })
            .collect();
        let answers = self.inner.pool.query(cmds).await?;
        answers.iter().map(|v| parse::<u64>(v).map(|n| n > 0)).collect()
    }
}

impl Store for RedisStore {
    async fn is_member(&self, conv: &str, user: &str) -> Result<bool, StoreError> {
        let mut cmd = ::redis::cmd("SISMEMBER");
        cmd.arg(members_key(conv)).arg(user);
        parse(&self.inner.pool.query_one(cmd).await?)
    }

    async fn member_view(&self, conv: &str, user: &str) -> Result<Option<MemberView>, StoreError> {
        let mut views = self.member_views(&[Arc::from(conv)], user).await?;
        views.pop().ok_or_else(|| StoreError::Unavailable("redis: no reply to member_view".into()))
    }

    async fn member_views(
        &self,
        convs: &[Arc<str>],
        user: &str,
    ) -> Result<Vec<Option<MemberView>>, StoreError> {
        if convs.is_empty() {
            return Ok(Vec::new());
        }
        let cmds = convs
            .iter()
            .map(|conv| {
                let mut cmd = self.inner.scripts.member_view.cmd(3);
                cmd.arg(members_key(conv)).arg(seq_key(conv)).arg(members_version_key(conv)).arg(user);
                cmd
            })
            .collect();
        let answers = self.inner.pool.query(cmds).await?;
        if answers.len() != convs.len() {
            return Err(StoreError::Unavailable("redis: short reply to member_views".into()));
        }
        answers
            .iter()
            .map(|answer| {
                let (member, last_seq, members_version): (u64, u64, u64) = parse(answer)?;
                Ok((member == 1).then_some(MemberView { last_seq, members_version }))
            })
            .collect()
    }

    async fn conversation(&self, conv: &str) -> Result<Conversation, StoreError> {
        let mut cmd = self.inner.scripts.conversation.cmd(3);
        cmd.arg(members_key(conv)).arg(seq_key(conv)).arg(members_version_key(conv));
        let (members, last_seq, members_version): (Vec<String>, u64, u64) =
            parse(&self.inner.pool.query_one(cmd).await?)?;
        Ok(Conversation { members: arcs(members), last_seq, members_version })
    }

    async fn set_members(
        &self,
        conv: &str,
        op: MemberOp,
        users: &[Arc<str>],
    ) -> Result<MemberChange, StoreError> {
        let mut cmd = self.inner.scripts.set_members.cmd(3);
        cmd.arg(members_key(conv)).arg(members_version_key(conv)).arg(seq_key(conv)).arg(match op {
            MemberOp::Replace => "replace",
            MemberOp::Add => "add",
            MemberOp::Remove => "remove",
        });
        for user in users {
            cmd.arg(&**user);
        }
        let (added, removed, count, members_version, last_seq): (Vec<String>, Vec<String>, usize, u64, u64) =
            parse(&self.inner.pool.query_one(cmd).await?)?;
        Ok(MemberChange { added: arcs(added), removed: arcs(removed), count, members_version, last_seq })
    }

    async fn append(
        &self,
        conv: &str,
        msg: &NewMessage,
        floor: u64,
        encode: &dyn Fn(u64) -> Bytes,
    ) -> Result<Appended, StoreError> {
        let appended = self.append_checked(conv, msg, floor, false, encode).await?;
        appended.ok_or_else(|| StoreError::Unavailable("redis: append refused without a check".into()))
    }

    async fn append_if_member(
        &self,
        conv: &str,
        msg: &NewMessage,
        floor: u64,
        encode: &dyn Fn(u64) -> Bytes,
    ) -> Result<Option<Appended>, StoreError> {
        self.append_checked(conv, msg, floor, true, encode).await
    }

    async fn history(&self, conv: &str, after: u64, limit: usize) -> Result<History, StoreError> {
        let first = after.saturating_add(1);
        let mut cmd = self.inner.scripts.history.cmd(2);
        cmd.arg(seq_key(conv)).arg(history_key(conv)).arg(format!("{first}-0")).arg(limit.max(1));
        let (last_seq, entries): (u64, Vec<Value>) = parse(&self.inner.pool.query_one(cmd).await?)?;
        let entries = entries.iter().map(Entry::from_stream).collect::<Result<Vec<_>, _>>()?;
        // History reaches back to `after + 1` when its first entry past `after` is that
        // one, or when there is nothing past `after` to reach.
        let complete = match entries.first() {
            Some(entry) => entry.seq <= first,
            None => after >= last_seq,
        };
        let messages = entries
            .iter()
            .take(limit)
            .map(|e| Stored { seq: e.seq, frame: e.frame(conv), members_version: e.members_version })
            .collect();
        Ok(History { messages, last_seq, complete, read: 0 })
    }

    async fn set_read(&self, conv: &str, user: &str, seq: u64) -> Result<Option<ReadMark>, StoreError> {
        let mut cmd = self.inner.scripts.set_read.cmd(3);
        cmd.arg(members_key(conv)).arg(seq_key(conv)).arg(reads_key(conv)).arg(user).arg(seq);
        let answer: Vec<u64> = parse(&self.inner.pool.query_one(cmd).await?)?;
        Ok(match answer[..] {
            [read, moved] => Some(ReadMark { read, moved: moved == 1 }),
            _ => None,
        })
    }

    async fn read_state(&self, conv: &str, users: &[Arc<str>]) -> Result<ReadState, StoreError> {
        let mut cmd = self.inner.scripts.read_state.cmd(2);
        cmd.arg(seq_key(conv)).arg(reads_key(conv));
        for user in users {
            cmd.arg(&**user);
        }
        let flat: Vec<u64> = parse(&self.inner.pool.query_one(cmd).await?)?;
        match flat.split_first() {
            Some((&last_seq, marks)) if marks.len() == users.len() => {
                Ok(ReadState { last_seq, marks: marks.to_vec() })
            }
            _ => Err(StoreError::Unavailable("redis: short reply to read_state".into())),
        }
    }

    async fn link_user(&self, user: &str, conv: &Arc<str>, member: bool) -> Result<(), StoreError> {
        let mut cmd = ::redis::cmd(if member { "SADD" } else { "SREM" });
        cmd.arg(user_convs_key(user)).arg(&**conv);
        self.inner.pool.query_one(cmd).await.map(drop).map_err(StoreError::from)
    }

    async fn user_convs(&self, user: &str) -> Result<Vec<Arc<str>>, StoreError> {
        let mut cmd = ::redis::cmd("SMEMBERS");
        cmd.arg(user_convs_key(user));
        Ok(arcs(parse(&self.inner.pool.query_one(cmd).await?)?))
    }
}

/// A history stream entry, as far as a `msg` frame needs it.
struct Entry {
    seq: u64,
    members_version: u64,
    from: String,
    dev: Option<String>,
    cid: Option<String>,
    ts: u64,
    body: Vec<u8>,
}

impl Entry {
    /// `[id, [field, value, ...]]` as XRANGE answers it.
    fn from_stream(value: &Value) -> Result<Entry, StoreError> {
        let (id, fields): (String, Value) = parse(value)?;
        let seq = id.split('-').next().and_then(|s| s.parse().ok());
        let seq = seq.ok_or_else(|| StoreError::Unavailable(format!("redis: bad history id {id:?}")))?;
        Entry::from_fields(seq, &fields)
    }

    fn from_fields(seq: u64, fields: &Value) -> Result<Entry, StoreError> {
        let fields: Vec<Vec<u8>> = parse(fields)?;
        let mut entry = Entry {
            seq,
            members_version: 0,
            from: String::new(),
            dev: None,
            cid: None,
            ts: 0,
            body: Vec::new(),
        };
        for pair in fields.chunks_exact(2) {
            let text = || String::from_utf8_lossy(&pair[1]).into_owned();
            match &pair[0][..] {
                b"f" => entry.from = text(),
                b"d" => entry.dev = Some(text()),
                b"c" => entry.cid = Some(text()),
                b"t" => entry.ts = text().parse().unwrap_or(0),
                b"v" => entry.members_version = text().parse().unwrap_or(0),
                b"b" => entry.body = pair[1].clone(),
                _ => {}
            }
        }
        Ok(entry)
    }

    /// The `msg` frame, exactly as the sending node encoded it.
    fn frame(&self, conv: &str) -> Bytes {
        text_frame(&msg_json(&MsgFields {
            conv,
            seq: self.seq,
            from: &self.from,
            dev: self.dev.as_deref(),
            cid: self.cid.as_deref(),
            ts: self.ts,
            body: &self.body,
        }))
    }
}

fn parse<T: FromRedisValue>(value: &Value) -> Result<T, StoreError> {
    from_redis_value(value).map_err(|e| StoreError::Unavailable(format!("redis: unexpected reply: {e}")))
}

fn arcs(strings: Vec<String>) -> Vec<Arc<str>> {
    strings.into_iter().map(Arc::from).collect()
}

fn unexpected(e: serde_json::Error) -> StoreError {
    StoreError::Unavailable(format!("redis: {e}"))
}

impl RedisStore {
    /// The append script; with `check`, only if the sender is a member (`None` if not).
    async fn append_checked(
        &self,
        conv: &str,
        msg: &NewMessage,
        floor: u64,
        check: bool,
        encode: &dyn Fn(u64) -> Bytes,
    ) -> Result<Option<Appended>, StoreError> {
        let me = &*self.inner;
        let dedupe = msg.cid.as_ref().map(|cid| dedupe_key(conv, &msg.from, cid));
        let mut cmd = me.scripts.append.cmd(if dedupe.is_some() { 5 } else { 4 });
        cmd.arg(seq_key(conv)).arg(history_key(conv)).arg(members_key(conv)).arg(members_version_key(conv));
        if let Some(key) = &dedupe {
            cmd.arg(key);
        }
        cmd.arg(floor).arg(me.max_per_conv).arg(msg.ts).arg(me.dedupe_window_ms).arg(if check {
            "1"
        } else {
            "0"
        });
        cmd.arg("f").arg(&*msg.from).arg("t").arg(msg.ts).arg("b").arg(&msg.body[..]);
        if let Some(dev) = &msg.dev {
            cmd.arg("d").arg(&**dev);
        }
        if let Some(cid) = &msg.cid {
            cmd.arg("c").arg(&**cid);
        }
        let Value::Array(reply) = me.pool.query_one(cmd).await? else {
            return Err(StoreError::Unavailable("redis: unexpected reply to append".into()));
        };
        if reply.is_empty() {
            return Ok(None);
        }
        let mut reply = reply.into_iter();
        let seq: u64 = parse(&reply.next().unwrap_or(Value::Nil))?;
        let ts: u64 = parse(&reply.next().unwrap_or(Value::Nil))?;
        let duplicate: bool = parse(&reply.next().unwrap_or(Value::Nil))?;
        let first = reply.next();
        let members_version: u64 = parse(&reply.next().unwrap_or(Value::Nil))?;
        if !duplicate {
            return Ok(Some(Appended { seq, ts, frame: encode(seq), duplicate, members_version }));
        }
        // The first message's frame, rebuilt from history (empty when trimmed away).
        let frame = match first {
            Some(fields @ Value::Array(_)) => Entry::from_fields(seq, &fields)?.frame(conv),
            _ => Bytes::new(),
        };
        Ok(Some(Appended { seq, ts, frame, duplicate, members_version }))
    }

    /// The last seq of each of `convs` (0 for one never written), in one round trip: the
    /// cluster's tail checks.
    pub async fn last_seqs(&self, convs: &[Arc<str>]) -> Result<Vec<u64>, StoreError> {
        if convs.is_empty() {
            return Ok(Vec::new());
        }
        // One GET per conversation: their counters live in as many slots.
        let cmds = convs
            .iter()
            .map(|conv| {
                let mut get = ::redis::cmd("GET");
                get.arg(seq_key(conv));
                get
            })
            .collect();
        let values = self.inner.pool.query(cmds).await?;
        values.iter().map(|v| parse::<Option<u64>>(v).map(|s| s.unwrap_or(0))).collect()
    }
}
