//! The owner shard's side of conversations: membership checks, sequencing through the
//! store, fan-out to the shards that hold members' sessions, and `sync` replays.
//!
//! Every message into a conversation, from any shard or the API, is handled here on the
//! conversation's owner shard (`shard_for(conv)`), one at a time, which is what gives
//! each conversation its order without locks. The owner keeps, per conversation, the set
//! of shards that want its messages ([`Interest`]): a shard is added when one of its
//! users joins (connect, `sync`, membership change) and removed when it reports it has
//! no session left there.

use std::collections::HashMap;

use bytes::Bytes;
use tracing::warn;

use crate::mesh::{Key, Origin, Reply, ReplyTo, SessionRef, ShardMsg};
use crate::protocol::{self, ErrorCode, MsgFields};
use crate::session::SyncReply;
use crate::shard::Shard;
use crate::store::{MemberOp, NewMessage, Store};
use crate::ws::codec;

/// A set of shard indexes, one bit each.
#[derive(Clone, Debug, Default)]
pub struct ShardSet(Vec<u64>);

impl ShardSet {
    pub fn insert(&mut self, shard: usize) {
        let (w, b) = (shard / 64, shard % 64);
        if self.0.len() <= w {
            self.0.resize(w + 1, 0);
        }
        self.0[w] |= 1 << b;
    }

    pub fn remove(&mut self, shard: usize) {
        if let Some(word) = self.0.get_mut(shard / 64) {
            *word &= !(1u64 << (shard % 64));
        }
    }

    pub fn contains(&self, shard: usize) -> bool {
        self.0.get(shard / 64).is_some_and(|w| w & (1 << (shard % 64)) != 0)
    }

    pub fn is_empty(&self) -> bool {
        self.0.iter().all(|w| *w == 0)
    }

    pub fn iter(&self) -> impl Iterator<Item = usize> + '_ {
        self.0
            .iter()
            .enumerate()
            .flat_map(|(w, word)| (0..64).filter(move |b| word & (1 << b) != 0).map(move |b| w * 64 + b))
    }
}

/// Which shards want the messages of each owned conversation.
#[derive(Default)]
pub struct Interest {
    by_conv: HashMap<Key, ShardSet>,
}

impl Interest {
    pub fn add(&mut self, conv: &Key, shard: usize) {
        self.by_conv.entry(conv.clone()).or_default().insert(shard);
    }

    pub fn add_all(&mut self, conv: &Key, shards: usize) {
        let set = self.by_conv.entry(conv.clone()).or_default();
        for s in 0..shards {
            set.insert(s);
        }
    }

    pub fn remove(&mut self, conv: &str, shard: usize) {
        if let Some(set) = self.by_conv.get_mut(conv) {
            set.remove(shard);
            if set.is_empty() {
                self.by_conv.remove(conv);
            }
        }
    }

    pub fn shards(&self, conv: &str) -> Option<&ShardSet> {
        self.by_conv.get(conv)
    }
}

/// `send` (from a session) or an API post: check, sequence, store, fan out, answer.
pub async fn on_send(shard: &Shard, origin: Origin, conv: Key, mut msg: NewMessage) {
    let started = std::time::Instant::now();
    msg.ts = crate::session::unix_ms();
    if let Origin::Session(session) = origin {
        match shard.store.is_member(&conv, &msg.from).await {
            Ok(true) => {}
            Ok(false) => {
                shard.metrics.refused_send(ErrorCode::NotMember);
                let frame = protocol::error_json(msg.cid.as_deref(), ErrorCode::NotMember, "not a member");
                return to_session(shard, session, codec::text_frame(&frame));
            }
            Err(_) => return unavailable(shard, origin, msg.cid.as_deref()),
        }
    }
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
    let appended = match shard.store.append(&conv, &msg, 0, &encode).await {
        Ok(appended) => appended,
        Err(_) => return unavailable(shard, origin, msg.cid.as_deref()),
    };
    if appended.duplicate {
        shard.metrics.deduplicated.inc();
    } else {
        shard.metrics.accepted.inc();
        let exclude = match origin {
            Origin::Session(s) => Some(s),
            Origin::Api(_) => None,
        };
        fan_out(shard, &conv, appended.seq, appended.frame, exclude);
        shard.metrics.fanout_latency.record(started.elapsed());
    }
    match origin {
        Origin::Session(session) => {
            let cid = msg.cid.as_deref().unwrap_or("");
            let ack = protocol::ack_json(&conv, cid, appended.seq, appended.ts);
            to_session(shard, session, codec::text_frame(&ack));
        }
        Origin::Api(reply) => shard.mesh.reply(reply, Reply::Sent { seq: appended.seq }),
    }
}

/// Hands a sequenced frame to every shard that wants the conversation's messages.
fn fan_out(shard: &Shard, conv: &Key, seq: u64, frame: Bytes, exclude: Option<SessionRef>) {
    // `route` only queues (locally or in the mesh) and never touches the interest table,
    // so the set is walked in place, without a copy per message.
    let interest = shard.interest.borrow();
    let Some(set) = interest.shards(conv) else { return };
    for target in set.iter() {
        let msg = ShardMsg::Deliver { conv: conv.clone(), seq, frame: frame.clone(), exclude };
        shard.route(target, msg);
    }
}

fn to_session(shard: &Shard, session: SessionRef, frame: Bytes) {
    shard.route(session.shard, ShardMsg::ToSession { session: session.id, frame });
}

fn unavailable(shard: &Shard, origin: Origin, cid: Option<&str>) {
    shard.metrics.refused_send(ErrorCode::Unavailable);
    match origin {
        Origin::Session(session) => {
            let frame = protocol::error_json(
                cid,
                ErrorCode::Unavailable,
                "the store is unavailable; retry with the same cid",
            );
            to_session(shard, session, codec::text_frame(&frame));
        }
        Origin::Api(reply) => shard.mesh.reply(reply, Reply::Unavailable),
    }
}

/// `sync`: replay history after `after` to a session of a member. From this point the
/// session's shard also receives the conversation's live messages, in order after the
/// replay (the reply and later `Deliver`s travel the same FIFO channel).
pub async fn on_sync(shard: &Shard, session: SessionRef, user: Key, conv: Key, reply: SyncReply) {
    let result = match shard.store.is_member(&conv, &user).await {
        Ok(true) => match shard.store.history(&conv, reply.after, reply.limit).await {
            Ok(history) => {
                shard.interest.borrow_mut().add(&conv, session.shard);
                Ok(history)
            }
            Err(_) => Err(ErrorCode::Unavailable),
        },
        Ok(false) => Err(ErrorCode::NotMember),
        Err(_) => Err(ErrorCode::Unavailable),
    };
    shard.metrics.sync_replays.inc();
    shard.route(session.shard, ShardMsg::Synced { session: session.id, conv, reply, result });
}

/// A shard has sessions of `user`: answer which of `convs` it is a member of, and send
/// that shard those conversations' messages from now on.
pub async fn on_join(shard: &Shard, from: usize, user: Key, convs: Vec<Key>) {
    let mut member_of = Vec::with_capacity(convs.len());
    for conv in convs {
        // A store error here leaves the conversation out; the client's `sync` after
        // `hello` joins it again once the store answers.
        if let Ok(true) = shard.store.is_member(&conv, &user).await {
            shard.interest.borrow_mut().add(&conv, from);
            member_of.push(conv);
        }
    }
    shard.route(from, ShardMsg::Joined { user, convs: member_of });
}

/// Membership change through the API. The user side is updated (and acknowledged)
/// before the change is announced to the shards, so a session that arrives meanwhile
/// learns of it either from its user's conversation list or from the announcement.
pub async fn on_members(shard: &Shard, reply: ReplyTo, conv: Key, op: MemberOp, users: Vec<Key>) {
    let change = match shard.store.set_members(&conv, op, &users).await {
        Ok(change) => change,
        Err(_) => return shard.mesh.reply(reply, Reply::Unavailable),
    };
    for (user, member) in
        change.added.iter().map(|u| (u, true)).chain(change.removed.iter().map(|u| (u, false)))
    {
        let owner = shard.owner_of(user);
        let linked = if owner == shard.id {
            shard.store.link_user(user, &conv, member).await.is_ok()
        } else {
            let ask = |reply| ShardMsg::LinkUser { reply, user: user.clone(), conv: conv.clone(), member };
            matches!(shard.mesh.request(owner, ask).await, Some(Reply::Done))
        };
        if !linked {
            warn!(user = %user, conv = %conv, "user side of a membership change not recorded");
        }
    }
    if !change.added.is_empty() {
        // Every shard may hold sessions of the new members: send it this conversation
        // until it says it has none (it answers `InterestOff` on the first message).
        shard.interest.borrow_mut().add_all(&conv, shard.shard_count);
    }
    if !change.added.is_empty() || !change.removed.is_empty() {
        for target in 0..shard.shard_count {
            let msg = ShardMsg::MembersChanged {
                conv: conv.clone(),
                added: change.added.clone(),
                removed: change.removed.clone(),
            };
            shard.route(target, msg);
        }
    }
    shard.mesh.reply(reply, Reply::Members { count: change.count });
}

pub async fn on_conversation(shard: &Shard, reply: ReplyTo, conv: Key) {
    let answer = match shard.store.conversation(&conv).await {
        Ok((members, last_seq)) => Reply::Conversation { members, last_seq },
        Err(_) => Reply::Unavailable,
    };
    shard.mesh.reply(reply, answer);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_sets() {
        let mut s = ShardSet::default();
        assert!(s.is_empty());
        s.insert(3);
        s.insert(70);
        assert!(s.contains(3) && s.contains(70) && !s.contains(4));
        assert_eq!(s.iter().collect::<Vec<_>>(), vec![3, 70]);
        s.remove(3);
        s.remove(70);
        assert!(s.is_empty());
    }
}
