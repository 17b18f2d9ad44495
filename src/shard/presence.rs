//! A shard's side of cluster presence: its connections' entries, written to Redis in
//! batches (a connection storm costs a few round trips per interval, not one per
//! connection), kept while Redis is away and re-registered from scratch when asked.

use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tracing::debug;

use crate::ctx::Ctx;
use crate::ids::Key;
use crate::session::{Kind, Session};
use crate::store::{Presence, PresenceOp};
use crate::wake::Mailbox;

/// How long a shard gathers its connections' presence changes before writing them to
/// Redis in one pipeline (and how long it waits before writing again after a failure).
const PRESENCE_FLUSH: Duration = Duration::from_millis(20);

/// Presence changes a shard keeps for Redis while it is unreachable; past this it drops
/// them and asks for a full re-registration once Redis is back.
const PRESENCE_BACKLOG: usize = 200_000;

/// Presence changes of a shard's connections not yet written to Redis.
#[derive(Default)]
pub struct PresenceWriter {
    /// The writer task waits on it for a first change: an idle shard never wakes up for
    /// presence.
    out: Mailbox<PresenceOp>,
}

/// How the presence API shows a client session.
pub fn entry(ctx: &Ctx, session: &Session) -> Presence {
    let device = match &session.kind {
        Kind::Client { device, .. } => device.clone(),
        Kind::Echo => Key::from(""),
    };
    Presence {
        device,
        conn: Key::from(ctx.conn_id(session.conn)),
        node: ctx.node.node_key.clone(),
        ip: session.ip,
        since: session.since_unix_ms,
    }
}

impl PresenceWriter {
    /// Queues a presence change for Redis (a node on Redis only).
    pub fn changed(&self, ctx: &Ctx, op: PresenceOp) {
        if ctx.redis().is_none() {
            return;
        }
        if self.out.items().len() < PRESENCE_BACKLOG {
            self.out.push(op);
        } else {
            ctx.node.presence_lost.store(true, Ordering::Relaxed);
        }
    }

    /// Every live client session's presence, queued again (see `ShardWide::Reregister`).
    pub fn reregister(&self, ctx: &Ctx, sessions: &[Rc<Session>]) {
        self.out.items().clear();
        for s in sessions {
            if let Kind::Client { user, .. } = &s.kind {
                self.out.push(PresenceOp::Add { user: user.clone(), entry: entry(ctx, s) });
            }
        }
    }

    /// Writes queued presence changes to Redis [`PRESENCE_FLUSH`] after the first one
    /// came, one pipeline per write; what fails is kept (bounded) and written when Redis
    /// answers again.
    pub async fn run(self: Rc<Self>, ctx: Rc<Ctx>) {
        let Some(redis) = ctx.redis().cloned() else { return };
        loop {
            self.out.ready().await;
            glommio::timer::sleep(PRESENCE_FLUSH).await;
            let ops: Vec<PresenceOp> = self.out.items().drain(..).collect();
            if ops.is_empty() {
                continue;
            }
            if let Err(e) = redis.presence_write(&ops).await {
                debug!(shard = ctx.id, error = %e, "presence not written; keeping it");
                let mut out = self.out.items();
                for op in ops.into_iter().rev() {
                    out.push_front(op);
                }
                if out.len() > PRESENCE_BACKLOG {
                    out.clear();
                    ctx.node.presence_lost.store(true, Ordering::Relaxed);
                }
            }
        }
    }
}
