//! `user.online` and `user.offline` webhooks (PROTOCOL.md, "Webhooks"), decided on the
//! user's owner shard: every shard tells it when a connection of the user comes or goes
//! on this node, so it knows when the node's last one ended. Whether the user is then
//! offline in the whole cluster, and whether the event is still due, is decided after
//! `webhook.offline_delay_ms`: a user back within it causes neither event.
//!
//! One node keeps the announced state here; a cluster keeps it in Redis, where setting it
//! is the one decision every node agrees on (the node that changes it sends the event).

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::time::Duration;

use tracing::warn;

use crate::ctx::Ctx;
use crate::ids::Key;
use crate::store::StoreError;
use crate::webhook::EventKind;

#[derive(Default)]
struct UserState {
    /// Connections of the user on this node.
    count: u32,
    /// `user.online` was sent and `user.offline` not since (one node only).
    announced: bool,
    /// Raised at every last-connection-gone, so a check is only acted on by the latest.
    gone: u64,
}

/// The users this shard owns, as far as webhooks care.
#[derive(Default)]
pub struct OnlineUsers {
    users: RefCell<HashMap<Key, UserState>>,
}

impl OnlineUsers {
    /// Whether each of `users` has a connection on this node.
    pub fn are_online(&self, users: &[Key]) -> Vec<bool> {
        let map = self.users.borrow();
        users.iter().map(|u| map.get(u).is_some_and(|s| s.count > 0)).collect()
    }
}

/// A connection of `user` opened on this node (on any shard).
pub fn came(ctx: &Rc<Ctx>, online: &Rc<OnlineUsers>, user: Key) {
    let first = {
        let mut users = online.users.borrow_mut();
        let state = users.entry(user.clone()).or_default();
        state.count += 1;
        state.count == 1
    };
    if !first {
        return;
    }
    let (ctx, online) = (ctx.clone(), online.clone());
    glommio::spawn_local(async move {
        let changed = match ctx.redis() {
            Some(redis) => retry(|| redis.hook_user_state(&user, true)).await,
            None => {
                let mut users = online.users.borrow_mut();
                let state = users.entry(user.clone()).or_default();
                Some(!std::mem::replace(&mut state.announced, true))
            }
        };
        if changed == Some(true) {
            emit(&ctx, EventKind::UserOnline, &user).await;
        }
    })
    .detach();
}

/// A connection of `user` on this node ended.
pub fn left(ctx: &Rc<Ctx>, online: &Rc<OnlineUsers>, user: Key) {
    let gone = {
        let mut users = online.users.borrow_mut();
        let Some(state) = users.get_mut(&user) else { return };
        state.count = state.count.saturating_sub(1);
        if state.count > 0 {
            return;
        }
        state.gone += 1;
        state.gone
    };
    let Some(outbox) = &ctx.node.webhooks else { return };
    let delay = Duration::from_millis(outbox.offline_delay_ms);
    let (ctx, online) = (ctx.clone(), online.clone());
    glommio::spawn_local(async move {
        glommio::timer::sleep(delay).await;
        let still_gone = online.users.borrow().get(&user).is_some_and(|s| s.count == 0 && s.gone == gone);
        if !still_gone {
            return;
        }
        let changed = match ctx.redis() {
            Some(redis) => {
                // Gone from this node; in the cluster only if no node has a connection.
                match retry(|| redis.online(std::slice::from_ref(&user))).await {
                    Some(online) if online.first() == Some(&false) => {
                        retry(|| redis.hook_user_state(&user, false)).await
                    }
                    _ => Some(false),
                }
            }
            None => online.users.borrow_mut().get_mut(&user).map(|s| std::mem::take(&mut s.announced)),
        };
        {
            // Nothing left to remember of a user with no connection here.
            let mut users = online.users.borrow_mut();
            if users.get(&user).is_some_and(|s| s.count == 0 && s.gone == gone && !s.announced) {
                users.remove(&user);
            }
        }
        if changed == Some(true) {
            emit(&ctx, EventKind::UserOffline, &user).await;
        }
    })
    .detach();
}

async fn emit(ctx: &Ctx, kind: EventKind, user: &str) {
    let Some(outbox) = &ctx.node.webhooks else { return };
    let ts = crate::clock::unix_ms();
    let what = if kind == EventKind::UserOnline { "online" } else { "offline" };
    let id = format!("{user}:{what}:{ts}");
    let json = serde_json::json!({ "type": kind.label(), "id": id, "user": user, "ts": ts }).to_string();
    outbox.emit(kind, id, json).await;
}

/// A Redis call, tried a few times over about two seconds; `None` if it never answered.
async fn retry<T, F, Fut>(call: F) -> Option<T>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<T, StoreError>>,
{
    for attempt in 0..5 {
        match call().await {
            Ok(value) => return Some(value),
            Err(e) if attempt == 4 => warn!(error = %e, "webhook: presence state not read; no event"),
            Err(_) => glommio::timer::sleep(Duration::from_millis(500)).await,
        }
    }
    None
}
