//! A shard's side of cluster presence: its connections' entries, written to Redis in
//! batches (a connection storm costs a few round trips per interval, not one per
//! connection), kept while Redis is away and re-registered from scratch when asked.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::task::{Poll, Waker};
use std::time::Duration;

use tracing::debug;

use crate::ctx::Ctx;
use crate::ids::Key;
use crate::session::{Kind, Session};
use crate::store::{Presence, PresenceOp};

/// How long a shard gathers its connections' presence changes before writing them to
/// Redis in one pipeline (and how long it waits before writing again after a failure).
const PRESENCE_FLUSH: Duration = Duration::from_millis(20);

/// Presence changes a shard keeps for Redis while it is unreachable; past this it drops
/// them and asks for a full re-registration once Redis is back.
const PRESENCE_BACKLOG: usize = 200_000;

/// Presence changes of a shard's connections not yet written to Redis.
#[derive(Default)]
pub struct PresenceWriter {
    out: RefCell<Vec<PresenceOp>>,
    /// The writer task, while it waits for a first change (an idle shard never wakes
    /// up for presence).
    waiting: Cell<Option<Waker>>,
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
        let mut out = self.out.borrow_mut();
        if out.len() < PRESENCE_BACKLOG {
            out.push(op);
        } else {
            ctx.node.presence_lost.store(true, Ordering::Relaxed);
        }
        drop(out);
        self.wake();
    }

    fn wake(&self) {
        if let Some(waker) = self.waiting.take() {
            waker.wake();
        }
    }

    /// Every live client session's presence, queued again (see `ShardWide::Reregister`).
    pub fn reregister(&self, ctx: &Ctx, sessions: &[Rc<Session>]) {
        let mut out = self.out.borrow_mut();
        out.clear();
        for s in sessions {
            if let Kind::Client { user, .. } = &s.kind {
                out.push(PresenceOp::Add { user: user.clone(), entry: entry(ctx, s) });
            }
        }
        drop(out);
        self.wake();
    }

    /// Writes queued presence changes to Redis [`PRESENCE_FLUSH`] after the first one
    /// came, one pipeline per write; what fails is kept (bounded) and written when Redis
    /// answers again.
    pub async fn run(self: Rc<Self>, ctx: Rc<Ctx>) {
        let Some(redis) = ctx.redis().cloned() else { return };
        loop {
            futures_lite::future::poll_fn(|cx| {
                if self.out.borrow().is_empty() {
                    self.waiting.set(Some(cx.waker().clone()));
                    Poll::Pending
                } else {
                    Poll::Ready(())
                }
            })
            .await;
            glommio::timer::sleep(PRESENCE_FLUSH).await;
            let ops = std::mem::take(&mut *self.out.borrow_mut());
            if ops.is_empty() {
                continue;
            }
            if let Err(e) = redis.presence_write(&ops).await {
                debug!(shard = ctx.id, error = %e, "presence not written; keeping it");
                let mut out = self.out.borrow_mut();
                let newer = std::mem::replace(&mut *out, ops);
                out.extend(newer);
                if out.len() > PRESENCE_BACKLOG {
                    out.clear();
                    ctx.node.presence_lost.store(true, Ordering::Relaxed);
                }
            }
        }
    }
}
