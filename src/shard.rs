//! One core: its listener, its sessions, its timer wheel.
//!
//! A shard is a glommio `LocalExecutor` pinned to one CPU. It accepts on its own
//! `SO_REUSEPORT` listener, so a connection lives its whole life here. Everything in
//! [`Shard`] is `!Send` and touched only from this thread; other threads reach a shard
//! by message ([`ShardCommand`]). Nothing here blocks: sockets are io_uring-driven and
//! the heartbeat work per tick is bounded by what is due.

use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::os::fd::{FromRawFd, IntoRawFd, OwnedFd};
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use glommio::channels::shared_channel::SharedReceiver;
use glommio::net::TcpListener;
use glommio::sync::Gate;
use tracing::{debug, info, warn};

use crate::auth::Verifier;
use crate::config::Config;
use crate::metrics::ShardMetrics;
use crate::server::Node;
use crate::session::{self, Session};
use crate::wheel::{TimerId, Wheel};
use crate::ws::codec;

/// What other threads ask of a shard.
#[derive(Debug)]
pub enum ShardCommand {
    /// Stop accepting, close every client with 1001, finish within the drain bound.
    Drain,
}

/// How long a draining shard waits for its clients' close replies before it stops.
const DRAIN_WAIT: Duration = Duration::from_secs(3);

/// Everything a shard thread is started with.
pub struct ShardSetup {
    pub id: usize,
    pub listener: OwnedFd,
    pub commands: SharedReceiver<ShardCommand>,
    pub node: Arc<Node>,
    pub metrics: Arc<ShardMetrics>,
}

/// The state of one shard, shared (`Rc`) by its tasks.
pub struct Shard {
    pub id: usize,
    pub config: Arc<Config>,
    /// tungstenite settings derived once from the config.
    pub ws_config: tungstenite::protocol::WebSocketConfig,
    pub verifier: Verifier,
    pub metrics: Arc<ShardMetrics>,
    /// What the whole process shares: connection count, readiness, node id.
    pub node: Arc<Node>,
    sessions: RefCell<Slab>,
    wheel: RefCell<Wheel>,
    /// Every session task runs through the gate, so a drain can wait for them.
    pub gate: Gate,
    /// The shard clock's zero; session times are milliseconds since this.
    started: Instant,
    next_conn: Cell<u64>,
    pub draining: Cell<bool>,
}

impl Shard {
    /// Milliseconds since the shard started (monotonic).
    pub fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// A connection id unique in this node's lifetime: epoch, shard, counter.
    pub fn next_conn_id(&self) -> String {
        let n = self.next_conn.get();
        self.next_conn.set(n + 1);
        format!("{}-{}-{}", self.node.epoch_tag, self.id, n)
    }

    /// Adds a session to the shard's table and schedules its first heartbeat.
    pub fn register(&self, make: impl FnOnce(TimerId) -> Session) -> Rc<Session> {
        let session = self.sessions.borrow_mut().insert(make);
        self.schedule(session.id, session.next_deadline(self.config.heartbeat.idle_timeout_ms));
        self.metrics.connections.inc();
        session
    }

    pub fn unregister(&self, session: &Session) {
        self.sessions.borrow_mut().remove(session.id);
        self.metrics.connections.dec();
        self.node.connections.fetch_sub(1, Ordering::Relaxed);
    }

    fn schedule(&self, id: TimerId, at_ms: u64) {
        let mut wheel = self.wheel.borrow_mut();
        let tick = at_ms.div_ceil(wheel.tick_ms());
        wheel.insert(id, tick);
    }

    /// The heartbeat loop: every tick, visit the sessions whose earliest deadline is due.
    /// Activity never touches the wheel; a visited session re-checks itself and is put
    /// back at its next deadline.
    async fn run_wheel(self: Rc<Self>) {
        let tick = Duration::from_millis(self.wheel.borrow().tick_ms());
        let mut due: Vec<TimerId> = Vec::with_capacity(1024);
        loop {
            glommio::timer::sleep(tick).await;
            let now = self.now_ms();
            let to = now / self.wheel.borrow().tick_ms();
            self.wheel.borrow_mut().advance(to, &mut due);
            for (i, id) in due.drain(..).enumerate() {
                let session = self.sessions.borrow().get(id);
                if let Some(session) = session {
                    if let Some(next) = session.on_timer(&self, now) {
                        self.schedule(id, next);
                    }
                }
                if i % 256 == 255 {
                    glommio::yield_if_needed().await;
                }
            }
        }
    }

    /// Asks every session to close with `code` (drain).
    fn close_all(&self, code: u16, reason: &'static str) {
        let sessions = self.sessions.borrow().all();
        for s in sessions {
            s.request_close(code, reason);
        }
    }
}

/// Runs a shard until it is drained. Called on the shard's own executor thread.
pub async fn run(setup: ShardSetup) {
    let config = setup.node.config.clone();
    let tick_ms = (config.heartbeat.ping_interval_ms / 4).clamp(10, 100);
    let shard = Rc::new(Shard {
        id: setup.id,
        ws_config: codec::server_config(config.limits.max_message_bytes),
        verifier: Verifier::new(&config.auth.secret, config.auth.leeway_secs),
        config,
        metrics: setup.metrics,
        node: setup.node,
        sessions: RefCell::new(Slab::default()),
        wheel: RefCell::new(Wheel::new(tick_ms, 4096)),
        gate: Gate::new(),
        started: Instant::now(),
        next_conn: Cell::new(0),
        draining: Cell::new(false),
    });
    // SAFETY: the fd is a bound, listening TCP socket handed over by the server.
    let listener = unsafe { TcpListener::from_raw_fd(setup.listener.into_raw_fd()) };
    glommio::spawn_local(shard.clone().run_wheel()).detach();

    let commands = setup.commands.connect().await;
    shard.node.ready_shards.fetch_add(1, Ordering::Release);
    debug!(shard = shard.id, "accepting");

    let accept = accept_loop(shard.clone(), listener);
    let drain = async {
        while let Some(cmd) = commands.recv().await {
            match cmd {
                ShardCommand::Drain => return,
            }
        }
    };
    futures_lite::future::or(accept, drain).await;

    shard.draining.set(true);
    shard.close_all(codec::close::GOING_AWAY, "server shutting down");
    let closed = glommio::timer::timeout(DRAIN_WAIT, async {
        let _ = shard.gate.close().await;
        Ok(())
    })
    .await;
    if closed.is_err() {
        warn!(shard = shard.id, "drain bound reached with sessions still open");
    }
    info!(shard = shard.id, "drained");
    shard.node.stopped_shards.fetch_add(1, Ordering::Release);
}

async fn accept_loop(shard: Rc<Shard>, listener: TcpListener) {
    loop {
        match listener.accept().await {
            Ok(stream) => {
                let peer = stream.peer_addr().unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
                let _ = stream.set_nodelay(true);
                let task = session::serve(shard.clone(), stream, peer);
                if shard.gate.spawn(task).map(|t| t.detach()).is_err() {
                    return;
                }
            }
            Err(e) => {
                // EMFILE/ENFILE/ENOBUFS: back off briefly instead of spinning; the
                // kernel keeps the pending connections in the backlog meanwhile.
                warn!(shard = shard.id, error = %e, "accept failed");
                glommio::timer::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// The shard's session table: a slab whose keys carry a generation, so a stale key (a
/// wheel entry for a session that ended and whose slot was reused) finds nothing.
#[derive(Default)]
struct Slab {
    slots: Vec<Slot>,
    free: Vec<u32>,
}

struct Slot {
    generation: u32,
    session: Option<Rc<Session>>,
}

impl Slab {
    fn insert(&mut self, make: impl FnOnce(TimerId) -> Session) -> Rc<Session> {
        let index = match self.free.pop() {
            Some(i) => i,
            None => {
                self.slots.push(Slot { generation: 0, session: None });
                (self.slots.len() - 1) as u32
            }
        };
        let slot = &mut self.slots[index as usize];
        slot.generation = slot.generation.wrapping_add(1);
        let session = Rc::new(make(TimerId { index, generation: slot.generation }));
        slot.session = Some(session.clone());
        session
    }

    fn get(&self, id: TimerId) -> Option<Rc<Session>> {
        let slot = self.slots.get(id.index as usize)?;
        if slot.generation != id.generation {
            return None;
        }
        slot.session.clone()
    }

    fn remove(&mut self, id: TimerId) {
        if let Some(slot) = self.slots.get_mut(id.index as usize) {
            if slot.generation == id.generation && slot.session.take().is_some() {
                self.free.push(id.index);
            }
        }
    }

    fn all(&self) -> Vec<Rc<Session>> {
        self.slots.iter().filter_map(|s| s.session.clone()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slab_keys_carry_generations() {
        let mut slab = Slab::default();
        let a = slab.insert(Session::for_test);
        let id = a.id;
        slab.remove(id);
        let b = slab.insert(Session::for_test);
        assert_eq!(b.id.index, id.index);
        assert!(slab.get(id).is_none(), "a stale key must not find the new session");
        assert!(slab.get(b.id).is_some());
    }
}
