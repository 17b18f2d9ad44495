//! `message.offline` webhooks (PROTOCOL.md, "Webhooks"): `webhook.offline_delay_ms`
//! after a message was accepted, one event per member (not the sender) who then has no
//! connection anywhere and whose read mark is below it; the messages of one conversation
//! within that delay make one *window*, and each member gets one event per window.
//!
//! The owner shard that accepts a message opens its conversation's window if none is
//! open (in a cluster: if no node has one open, `rp:wh:w:{conv}`), and decides when it
//! ends from the store: the members, their read marks, the messages of the window read
//! back from history (whichever node accepted them), and presence. The event id is
//! `<conv>:<user>:<last seq>`, so two windows that cover the same last message (a message
//! accepted just as the earlier one closed) send the same id, which receivers dedupe.

use std::cell::RefCell;
use std::collections::HashSet;
use std::rc::Rc;
use std::time::Duration;

use serde::Deserialize;
use serde_json::value::RawValue;
use tracing::warn;

use crate::ctx::Ctx;
use crate::ids::Key;
use crate::mesh::{Reply, ShardMsg, UserMsg};
use crate::store::{Store, StoreError};
use crate::webhook::EventKind;
use crate::ws::codec;

/// Decisions that failed on the store are tried again this often, this many times.
const RETRY: Duration = Duration::from_millis(500);
const ATTEMPTS: usize = 5;

/// The conversations owned here with an open window.
#[derive(Default)]
pub struct Windows {
    open: RefCell<HashSet<Key>>,
}

/// A message of `conv` with seq `seq` was accepted here: opens the conversation's window
/// unless one is open.
pub fn accepted(ctx: &Rc<Ctx>, windows: &Rc<Windows>, conv: &Key, seq: u64) {
    if ctx.node.webhooks.is_none() || !windows.open.borrow_mut().insert(conv.clone()) {
        return;
    }
    let (ctx, windows, conv) = (ctx.clone(), windows.clone(), conv.clone());
    glommio::spawn_local(async move { window(&ctx, &windows, conv, seq).await }).detach();
}

async fn window(ctx: &Ctx, windows: &Windows, conv: Key, from_seq: u64) {
    let Some(outbox) = &ctx.node.webhooks else { return };
    let delay = outbox.offline_delay_ms;
    if let Some(redis) = ctx.redis() {
        // Another node's window covers this message: its decision reads it from history.
        if let Ok(false) = redis.hook_window(&conv, delay.saturating_mul(2)).await {
            windows.open.borrow_mut().remove(&conv);
            return;
        }
    }
    glommio::timer::sleep(Duration::from_millis(delay)).await;
    // Messages from here on open the next window.
    windows.open.borrow_mut().remove(&conv);
    if let Some(redis) = ctx.redis() {
        let _ = redis.hook_window_close(&conv).await;
    }
    for attempt in 1..=ATTEMPTS {
        match decide(ctx, &conv, from_seq).await {
            Ok(()) => return ctx.metrics.offline_windows.inc(),
            Err(e) if attempt == ATTEMPTS => {
                warn!(conv = %conv, error = %e, "webhook: message.offline not decided (store unavailable)")
            }
            Err(_) => glommio::timer::sleep(RETRY).await,
        }
    }
}

/// What an event needs of a stored `msg` frame.
#[derive(Deserialize)]
struct Msg<'a> {
    seq: u64,
    #[serde(borrow)]
    from: std::borrow::Cow<'a, str>,
    ts: u64,
    #[serde(borrow)]
    body: &'a RawValue,
}

/// The window of `conv` from `from_seq` ended: an event for each member it concerns.
async fn decide(ctx: &Ctx, conv: &Key, from_seq: u64) -> Result<(), StoreError> {
    let store = &ctx.store;
    let members = store.conversation(conv).await?.members;
    let history = store.history(conv, from_seq.saturating_sub(1), ctx.config.history.max_per_conv).await?;
    let payloads: Vec<bytes::Bytes> =
        history.messages.iter().map(|m| codec::text_payload(&m.frame)).collect();
    let msgs: Vec<Msg> = payloads.iter().filter_map(|p| serde_json::from_slice::<Msg>(p).ok()).collect();
    if msgs.is_empty() || members.is_empty() {
        return Ok(());
    }
    let marks = store.read_state(conv, &members).await?.marks;
    // Per member: the window's messages not from them and past their read mark.
    let mut due: Vec<(Key, Vec<&Msg>)> = Vec::new();
    for (user, mark) in members.iter().zip(marks) {
        let unread: Vec<&Msg> = msgs.iter().filter(|m| m.from != **user && m.seq > mark).collect();
        if !unread.is_empty() {
            due.push((user.clone(), unread));
        }
    }
    if due.is_empty() {
        return Ok(());
    }
    let users: Vec<Key> = due.iter().map(|(u, _)| u.clone()).collect();
    let online = online(ctx, &users).await?;
    let Some(outbox) = &ctx.node.webhooks else { return Ok(()) };
    for ((user, unread), online) in due.into_iter().zip(online) {
        if online {
            continue;
        }
        let (first, last) = (unread[0], unread[unread.len() - 1]);
        let id = format!("{conv}:{user}:{}", last.seq);
        let event = serde_json::json!({
            "type": EventKind::MessageOffline.label(),
            "id": id,
            "user": &*user,
            "conv": &**conv,
            "from_seq": first.seq,
            "last_seq": last.seq,
            "count": unread.len(),
            "last": { "from": &*last.from, "seq": last.seq, "ts": last.ts, "body": last.body },
        });
        outbox.emit(EventKind::MessageOffline, id, event.to_string()).await;
    }
    Ok(())
}

/// Whether each of `users` has a connection anywhere: Redis presence in a cluster, the
/// users' owner shards on one node.
async fn online(ctx: &Ctx, users: &[Key]) -> Result<Vec<bool>, StoreError> {
    if let Some(redis) = ctx.redis() {
        return redis.online(users).await;
    }
    let mut answer = vec![false; users.len()];
    for shard in 0..ctx.shard_count {
        let (index, mine): (Vec<usize>, Vec<Key>) = users
            .iter()
            .enumerate()
            .filter(|(_, u)| ctx.owner_of(u) == shard)
            .map(|(i, u)| (i, u.clone()))
            .unzip();
        if mine.is_empty() {
            continue;
        }
        let ask = |reply| ShardMsg::User(UserMsg::AreOnline { reply, users: mine });
        match ctx.mesh.request_via(ask, |msg| ctx.route(shard, msg)).await {
            Some(Reply::Online(flags)) => {
                for (i, flag) in index.into_iter().zip(flags) {
                    answer[i] = flag;
                }
            }
            _ => return Err(StoreError::Unavailable("a shard did not answer".into())),
        }
    }
    Ok(answer)
}
