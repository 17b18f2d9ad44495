//! One connection: handshake -> join -> `hello` -> read loop -> dispatch -> outbound
//! queue -> close.
//!
//! A session is one glommio task that owns its `TcpStream`, plus a small [`Session`]
//! record in the shard's table that the rest of the shard uses to reach it (heartbeats,
//! drain, later fan-out).
//!
//! The delivery promises of PROTOCOL.md are kept here, per connection and conversation:
//! - a client connection *joins* before its `hello` (`Shard::settle`): the owners of its
//!   user's conversations answer behind every message they sent its shard before, so it
//!   hears every seq accepted after the `hello` and nothing of earlier ones;
//! - live messages are sent, held for a first `sync` during the grace after `hello`,
//!   dropped while a `sync` whose replay carries them is in flight or after a `gap`, or
//!   queued behind a replay still going out ([`modes::ConvMode`]);
//! - a `sync`'s answer goes into a backlog that feeds the queue as the client takes it
//!   ([`Session::refill`]), never thinned; live messages past the budget are thinned into
//!   `gap`s; a push that does not fit, or a queue stuck for the idle timeout, is 4002.
//!
//! What an idle session costs, and why:
//! - reads go into one buffer per shard ([`READ_BUF`]); glommio's stream waits for
//!   readiness first and then reads without a buffer of its own, so a connection that is
//!   not sending holds no read buffer;
//! - the tungstenite context is allocated when bytes arrive and released as soon as the
//!   stream sits at a frame boundary again (see `ws::codec`);
//! - frames are queued and written by the shard's flusher (see [`Session::queue`]): every
//!   frame a connection gets in one turn of the shard goes out in one non-blocking
//!   `send`, and the queue is given back once the socket took it all; a client slow to
//!   read keeps what its socket did not take, and gives that memory back at the next
//!   heartbeat once drained;
//! - a read's own replies (echoes, pongs, errors) go straight to the socket when nothing
//!   is queued, from a per-shard scratch buffer.
//!
//! This file holds the connection's life: the [`Session`] record, the task ([`serve`]:
//! open, read loop, dispatch, timers, finish) and the shard's [`Table`]. Its parts, which
//! import nothing from here:
//! - `outbound`: the outbound queue (`Queue`), its thinning into `gap`s, batched writes;
//! - `modes`: the per-conversation delivery modes, held messages and the replay backlog;
//! - `upgrade`: the HTTP upgrade (`Accepted`) and the shard's read buffer.

mod modes;
mod outbound;
mod upgrade;

use std::cell::{Cell, RefCell};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::RawFd;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use futures_lite::{AsyncRead, AsyncWrite};
use glommio::net::TcpStream;
use tracing::debug;

use crate::clock::unix_ms;
use crate::ctx::Ctx;
use crate::ids::Key;
use crate::mesh::{ConvMsg, Origin, SessionRef, ShardMsg, SyncReply};
use crate::protocol::{self, ClientRequest, ErrorCode, ServerFrame};
use crate::store::{History, NewMessage};
use crate::wheel::TimerId;
use crate::ws::codec::{self, close, Codec, Message, Next};
use modes::{Backlog, Held, Modes, Pending, Then};
use outbound::{send_now, unread_bytes, Queue, Tag, KEPT_SCRATCH_BYTES, WRITE_BATCH_BYTES};
use upgrade::{Accepted, READ_BUF};

/// How long a closing session waits for the peer's close reply (or for its queue to drain)
/// before it drops the socket.
const CLOSE_WAIT: Duration = Duration::from_secs(1);

/// How long a new client connection's live messages wait for its first `sync` of their
/// conversation (PROTOCOL.md: clients sync after `hello`), counted from the `hello`.
/// Within it, replay and live messages cannot cross; a client that does not sync gets the
/// held messages when it ends (the shard's grace timer, `Shard::run_graces`).
pub const SYNC_GRACE_MS: u64 = 1000;

/// Most bytes of replayed messages in the outbound queue at once. A replay is fed into the
/// queue as the client takes it (PROTOCOL.md: paced, never thinned), and only ever fills
/// part of the budget, so that a client catching up on one conversation is not thinned
/// into gaps on the others: at most this, and at most half of `outbound_queue_bytes`.
const REPLAY_FILL_BYTES: usize = 2 * WRITE_BATCH_BYTES;

/// Reads handled in one poll before the session yields to the rest of the ctx.
const READS_PER_POLL: usize = 16;

/// Most `sync`s one connection may have in flight, over all its conversations; one more
/// is answered `error rate_limited`. A client syncs each of its conversations once after
/// `hello`, all at once, so this is sized for a user in hundreds of conversations; each
/// costs a history read and a replay (paced by the outbound budget), and a connection's
/// syncs of one conversation are counted in its [`modes::ConvMode`].
pub const MAX_SYNCS_IN_FLIGHT: usize = 512;

thread_local! {
    /// Scratch for the frames one read's messages answer with (echoes, pongs, errors).
    static REPLIES: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// What the connection is for: a client of the IM protocol, or the diagnostics echo.
#[derive(Debug)]
pub enum Kind {
    Client { user: Key, device: Key },
    Echo,
}

/// How a session is being closed, set by the session itself or by the ctx.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CloseState {
    Open,
    /// Send a close frame with this code, wait briefly for the reply, drop.
    Requested(u16, &'static str),
    /// Drop the socket without a word (the client stopped answering).
    Drop,
}

/// A session's record in the shard's table.
pub struct Session {
    pub id: TimerId,
    pub kind: Kind,
    /// The connection's number on its shard (`Shard::conn_id` makes the id text).
    pub conn: u64,
    pub ip: IpAddr,
    /// Unix milliseconds at connect (presence `since`).
    pub since_unix_ms: u64,
    /// The socket, for direct non-blocking sends; -1 once the task has let go of it.
    fd: Cell<RawFd>,
    /// Shard-clock ms after which the token has expired (`u64::MAX`: never).
    expires_ms: u64,
    /// Shard-clock ms of the last bytes from the client. Updated on reads; the wheel
    /// looks at it only when the session's deadline comes.
    last_seen: Cell<u64>,
    next_ping: Cell<u64>,
    /// The `send` and `signal` token buckets: tokens left, and when both were last refilled.
    tokens: Cell<f32>,
    signal_tokens: Cell<f32>,
    tokens_at: Cell<u64>,
    /// On the shard's flush list: the flusher writes the queue (see [`Session::queue`]).
    flush_due: Cell<bool>,
    /// The task to wake when frames are queued or a close is requested.
    waker: Cell<Option<Waker>>,
    inner: RefCell<Inner>,
}

struct Inner {
    /// Frames not yet written (see [`Queue`]).
    queue: Queue,
    codec: Codec,
    close: CloseState,
    /// A client connection is *joining* until the owners of its user's conversations have
    /// answered (`Shard::settle`): it is in no fan-out yet, has had no `hello`, and is
    /// not read from. Owners still to answer: `joins`.
    open: bool,
    joins: u16,
    /// Conversations whose live messages are not simply sent (see [`modes::ConvMode`]).
    /// Usually empty.
    modes: Modes,
    /// A new client connection holds its live messages until this shard-clock ms, or
    /// until it syncs their conversation, whichever comes first; 0 once over.
    hold_until: u64,
    /// Messages held meanwhile (boxed: most connections never hold any, and every
    /// connection keeps this record).
    held: Option<Box<Held>>,
    /// Answers to `sync`s waiting for room in `queue` (see [`Session::refill`]); `None`
    /// while there are none.
    replay: Option<Box<Backlog>>,
}

/// Why the open phase of a session ended.
#[derive(Debug)]
enum End {
    /// The peer closed the TCP stream (or it broke).
    Eof,
    /// The close handshake finished; tungstenite's reply is queued.
    Closed,
    /// The peer broke the protocol: send this close and drop.
    Fail(u16, &'static str),
    /// Close politely with this code.
    Close(u16, &'static str),
    /// Drop without a close frame.
    Drop,
}

/// When a new connection gets its first ping: between half and a whole interval after it
/// connected, spread by its connection number. Pings then follow every interval, so the
/// connections of a reconnect storm (a deploy, a network blip) would otherwise ping, and
/// be answered, all in the same instant every interval for as long as they stay.
fn first_ping_after(conn: u64, ping_interval_ms: u64) -> u64 {
    let spread = ping_interval_ms / 2;
    ping_interval_ms - conn.wrapping_mul(0x9e37_79b9_7f4a_7c15).rotate_left(32) % (spread + 1)
}

impl Session {
    fn new(id: TimerId, accepted: &Accepted, now: u64, ping_interval_ms: u64) -> Session {
        Session {
            id,
            kind: match &accepted.claims {
                Some((user, device)) => Kind::Client { user: user.clone(), device: device.clone() },
                None => Kind::Echo,
            },
            conn: accepted.conn,
            ip: accepted.ip,
            since_unix_ms: unix_ms(),
            fd: Cell::new(accepted.fd),
            expires_ms: accepted.expires_ms,
            last_seen: Cell::new(now),
            next_ping: Cell::new(now + first_ping_after(accepted.conn, ping_interval_ms)),
            tokens: Cell::new(f32::MAX),
            signal_tokens: Cell::new(f32::MAX),
            tokens_at: Cell::new(now),
            flush_due: Cell::new(false),
            waker: Cell::new(None),
            inner: RefCell::new(Inner {
                queue: Queue::new(now),
                codec: Codec::default(),
                close: CloseState::Open,
                // The diagnostics echo has no conversations to join.
                open: accepted.claims.is_none(),
                joins: 0,
                modes: Modes::default(),
                hold_until: 0,
                held: None,
                replay: None,
            }),
        }
    }

    #[cfg(test)]
    pub fn for_test(id: TimerId) -> Session {
        let accepted = Accepted {
            claims: None,
            conn: 0,
            ip: IpAddr::from([127, 0, 0, 1]),
            fd: -1,
            expires_ms: u64::MAX,
            leftover: Vec::new(),
        };
        Session::new(id, &accepted, 0, 1000)
    }

    /// The earliest of the next ping, the idle drop and the token expiry.
    pub fn next_deadline(&self, idle_timeout_ms: u64) -> u64 {
        self.next_ping.get().min(self.last_seen.get() + idle_timeout_ms).min(self.expires_ms)
    }

    /// Queues a control frame for the client (never dropped for a slow consumer; bounded
    /// by the client's own requests, which are not read while the queue is over budget).
    pub fn push(&self, frame: Bytes, ctx: &Ctx) {
        self.enqueue(frame, Tag::Control, ctx);
    }

    /// Queues a `push` (or broadcast) frame within the outbound budget. A push cannot be
    /// folded into a `gap`: one that does not fit ends the connection with 4002 at once
    /// (PROTOCOL.md "Slow consumers"), so no queue grows past the budget with them.
    pub fn push_bounded(&self, frame: Bytes, ctx: &Ctx) {
        match self.fits_budget(frame.len(), ctx) {
            None => {}
            Some(true) => {
                ctx.metrics.pushes.inc();
                self.enqueue(frame, Tag::Control, ctx);
            }
            Some(false) => self.slow_consumer(ctx),
        }
    }

    /// Queues a `signal` frame if it fits the outbound budget; a slow consumer does not
    /// get it (PROTOCOL.md: signals are dropped, never queued past the budget, never a
    /// reason to close).
    pub fn offer_signal(&self, frame: Bytes, ctx: &Ctx) {
        match self.fits_budget(frame.len(), ctx) {
            None => {}
            Some(true) => {
                ctx.metrics.signals_delivered.inc();
                self.enqueue(frame, Tag::Control, ctx);
            }
            Some(false) => ctx.metrics.signals_dropped.inc(),
        }
    }

    /// Whether a frame of `len` bytes fits the outbound budget now (`None`: the session
    /// is not open for frames).
    fn fits_budget(&self, len: usize, ctx: &Ctx) -> Option<bool> {
        if self.fd.get() < 0 || !self.inner.borrow().open {
            return None;
        }
        let budget = ctx.config.limits.outbound_queue_bytes;
        if self.flush_due.get() && self.inner.borrow().queue.bytes() + len > budget {
            // Frames the flusher has not offered to the socket yet do not count.
            self.flush(ctx);
        }
        let inner = self.inner.borrow();
        Some(inner.queue.is_empty() || inner.queue.bytes() + len <= budget)
    }

    /// Gives up on a client that does not take what it is sent: what is queued and not
    /// started is dropped (the memory goes back now, not after the close handshake's
    /// wait), and the connection is closed with 4002.
    fn slow_consumer(&self, ctx: &Ctx) {
        if self.inner.borrow().close != CloseState::Open {
            return;
        }
        ctx.metrics.slow_consumer_closes.inc();
        self.inner.borrow_mut().drop_unsent();
        self.request_close(close::SLOW_CONSUMER, "slow consumer");
    }

    /// Frames from a scratch buffer (one read's replies): sent right away with a
    /// non-blocking `send` when nothing is queued, copied into the queue only for what the
    /// socket does not take.
    fn push_slice(&self, frames: &[u8], ctx: &Ctx) {
        let fd = self.fd.get();
        if fd < 0 {
            return;
        }
        ctx.metrics.frames_out.inc();
        if !self.inner.borrow().queue.is_empty() {
            // Behind frames already queued: they go out first.
            return self.queue(Bytes::copy_from_slice(frames), Tag::Control, ctx);
        }
        // An error just queues the frames; a broken socket shows up on the task's next
        // read or write.
        let sent = send_now(fd, frames).unwrap_or(0);
        ctx.metrics.socket_writes.inc();
        ctx.metrics.bytes_out.add(sent as u64);
        if sent < frames.len() {
            // The socket is full: the rest is the session task's to write when it has
            // room, not the flusher's (its `send` would only find it full again).
            self.inner.borrow_mut().queue.append(
                Bytes::copy_from_slice(&frames[sent..]),
                Tag::Control,
                ctx.now_ms(),
            );
            self.wake();
        }
    }

    /// Queues `frame` if the socket is still open (see [`Session::queue`]).
    fn enqueue(&self, frame: Bytes, tag: Tag, ctx: &Ctx) {
        if self.fd.get() >= 0 {
            ctx.metrics.frames_out.inc();
            self.queue(frame, tag, ctx);
        }
    }

    /// Appends `frame` to the queue. Who writes it: a session with nothing queued joins
    /// the shard's flush list, so that every frame it gets before the shard's flusher runs
    /// (the rest of this fan-out, the other messages of this batch) goes out in the same
    /// `send`; a batch that reaches [`WRITE_BATCH_BYTES`] goes out at once. Frames queued
    /// behind older ones that the socket did not take are the session task's to write.
    fn queue(&self, frame: Bytes, tag: Tag, ctx: &Ctx) {
        let first = self.inner.borrow_mut().queue.append(frame, tag, ctx.now_ms());
        let full = self.inner.borrow().queue.bytes() >= WRITE_BATCH_BYTES;
        self.schedule_write(first, ctx);
        if self.flush_due.get() && full {
            self.flush(ctx);
        }
    }

    /// Frames were appended to the queue (`first`: to an empty one): the flusher writes
    /// them when it runs, or the session task, when older frames still wait for room.
    fn schedule_write(&self, first: bool, ctx: &Ctx) {
        if first {
            self.flush_due.set(true);
            ctx.flush_later(self.id);
        } else if !self.flush_due.get() {
            self.wake();
        }
    }

    /// The shard's flusher (or a full batch) writes what is queued with non-blocking
    /// `send`s; whatever the socket does not take is left to the session task, which
    /// waits for the socket to take more.
    pub fn flush(&self, ctx: &Ctx) {
        if !self.flush_due.replace(false) {
            return;
        }
        let fd = self.fd.get();
        if fd < 0 {
            return;
        }
        let mut inner = self.inner.borrow_mut();
        let now = ctx.now_ms();
        while !inner.queue.is_empty() {
            let (wanted, sent) = inner.queue.with_batch(|batch| (batch.len(), send_now(fd, batch)));
            let Ok(n) = sent else { break };
            ctx.metrics.socket_writes.inc();
            ctx.metrics.bytes_out.add(n as u64);
            inner.queue.consume(n, now);
            if n < wanted {
                break;
            }
        }
        let more = !inner.queue.is_empty();
        if !more && inner.replay.is_none() {
            // An idle connection holds no queue (README "Memory per connection").
            inner.queue.give_back();
        }
        drop(inner);
        if more {
            self.wake();
        } else {
            // Room again: the next part of a replay goes in (the flusher writes it).
            self.refill(ctx);
        }
    }

    /// Moves what fits of the replay backlog into the queue: replayed messages up to
    /// [`REPLAY_FILL_BYTES`] (or half the budget) of queued bytes, at least one item when
    /// nothing is queued. So a replay goes out as fast as the client takes it, is never
    /// thinned, and never holds more than that in the queue. Called whenever the queue
    /// has drained some.
    fn refill(&self, ctx: &Ctx) {
        let fill = REPLAY_FILL_BYTES.min(ctx.config.limits.outbound_queue_bytes / 2);
        let now = ctx.now_ms();
        let mut first = None;
        let mut inner = self.inner.borrow_mut();
        if self.fd.get() < 0 || inner.close != CloseState::Open {
            return;
        }
        while let Some(next) = inner.replay.as_ref().and_then(|b| b.items.front()) {
            if !inner.queue.is_empty() && inner.queue.bytes() + next.len() > fill {
                break;
            }
            let Some(backlog) = inner.replay.as_mut() else { break };
            let Some(item) = backlog.items.pop_front() else { break };
            if backlog.items.is_empty() {
                inner.replay = None;
            }
            let appended = match item {
                Pending::Msg { bytes } => {
                    ctx.metrics.replayed.inc();
                    inner.queue.append(bytes, Tag::Replay, now)
                }
                Pending::Live { bytes } => {
                    if let Some(backlog) = inner.replay.as_mut() {
                        backlog.live_bytes -= bytes.len();
                    }
                    ctx.metrics.delivered.inc();
                    inner.queue.append(bytes, Tag::Replay, now)
                }
                Pending::Frame(bytes) => inner.queue.append(bytes, Tag::Control, now),
                Pending::End(conv) => match inner.replay_done(&conv) {
                    Some(gap) => {
                        ctx.metrics.slow_consumer_gaps.inc();
                        inner.queue.append(gap, Tag::Control, now)
                    }
                    None => continue,
                },
            };
            ctx.metrics.frames_out.inc();
            first.get_or_insert(appended);
        }
        drop(inner);
        if let Some(first) = first {
            self.schedule_write(first, ctx);
        }
    }

    /// A message of `conv` for this session: sent; or not sent because a `sync` the
    /// client asked for (or must ask for, after a `gap`) will carry it; or queued behind
    /// the replay of a `sync` still going out; or held while a new connection has not
    /// synced yet; or, past the outbound budget, folded into a `gap`. Whatever the path,
    /// the connection sees each conversation's seqs in increasing order, and every seq it
    /// does not get as `msg` falls in a `gap` or a requested replay.
    pub fn deliver(&self, ctx: &Ctx, conv: &Key, seq: u64, frame: &Bytes) {
        let mut inner = self.inner.borrow_mut();
        if self.fd.get() < 0 || !inner.open {
            return;
        }
        let budget = ctx.config.limits.outbound_queue_bytes;
        let mut send_now = inner.hold_until == 0;
        if let Some(i) = inner.modes.position(conv) {
            let m = &mut inner.modes[i];
            if m.syncs > 0 || m.then == Then::Gapped {
                return;
            }
            if let Then::Ahead(held) = m.then {
                if seq <= held {
                    return;
                }
                m.then = Then::Send;
            }
            if m.replays > 0 {
                // A replay of this conversation is still going out: this follows it.
                if let Some((_, to)) = &mut m.gap {
                    *to = seq;
                    return;
                }
                let backlog = inner.replay.get_or_insert_with(Box::default);
                if backlog.live_bytes + frame.len() > budget {
                    inner.modes[i].gap = Some((seq, seq));
                    return;
                }
                backlog.live_bytes += frame.len();
                backlog.items.push_back(Pending::Live { bytes: frame.clone() });
                drop(inner);
                return self.refill(ctx);
            }
            send_now |= m.synced;
            inner.tidy(i);
        }
        if send_now {
            drop(inner);
            return self.send_msg(ctx, conv, seq, frame);
        }
        // The connection's grace: held for the client's first sync of `conv`.
        let held = inner.held.get_or_insert_with(Box::default);
        held.msgs.push((conv.clone(), seq, frame.clone()));
        held.bytes += frame.len();
        if held.bytes > budget {
            // Holding is bounded like the queue: past the budget the grace ends now and
            // the backlog meets the slow-consumer rules.
            drop(inner);
            self.release_held(ctx);
        }
    }

    /// Queues a `msg` frame within the outbound budget, or thins the queue out into gaps.
    fn send_msg(&self, ctx: &Ctx, conv: &Key, seq: u64, frame: &Bytes) {
        let budget = ctx.config.limits.outbound_queue_bytes;
        let over = |inner: &Inner| inner.queue.bytes() + frame.len() > budget;
        if self.flush_due.get() && over(&self.inner.borrow()) {
            // The budget is for what the client has not taken: frames the flusher has
            // not yet offered to the socket do not count against it.
            self.flush(ctx);
        }
        let mut inner = self.inner.borrow_mut();
        if inner.queue.is_empty() || !over(&inner) {
            drop(inner);
            ctx.metrics.delivered.inc();
            return self.enqueue(frame.clone(), Tag::Msg { conv: conv.clone(), seq }, ctx);
        }
        let gaps = inner.thin_out(conv, seq);
        ctx.metrics.slow_consumer_gaps.add(gaps as u64);
        drop(inner);
        self.wake();
    }

    /// The client asked to `sync` `conv`: until the answer, its live messages are not
    /// sent (the owner sequenced them before it reads the history, so the replay has
    /// them), and any held for it are dropped for the same reason. A sync also ends a
    /// gap's pause and an earlier sync's skip.
    fn start_sync(&self, conv: &Key) {
        let mut inner = self.inner.borrow_mut();
        if let Some(held) = inner.held.as_mut() {
            held.take(conv);
        }
        inner.queue.forget_queued(conv);
        inner.modes.sync_started(conv);
    }

    /// A new connection's grace is over: send what was held, in order.
    pub fn release_held(&self, ctx: &Ctx) {
        let held = {
            let mut inner = self.inner.borrow_mut();
            if inner.hold_until == 0 {
                return;
            }
            inner.hold_until = 0;
            // Conversations synced during the grace were sent rather than held; the rest
            // now are too.
            inner.modes.end_grace();
            inner.held.take().map(|h| h.msgs).unwrap_or_default()
        };
        for (conv, seq, frame) in held {
            self.deliver(ctx, &conv, seq, &frame);
        }
    }

    /// The owner's answer to a `sync`: the replay and `synced` (and a `gap` for what a
    /// `limit` left out: live messages of the conversation then wait for the next sync),
    /// into the replay backlog, which goes out as the client takes it.
    pub fn finish_sync(&self, ctx: &Ctx, conv: &Key, reply: SyncReply, result: Result<History, ErrorCode>) {
        let history = match result {
            Ok(history) => history,
            Err(code) => {
                // Not a member: nothing of it is delivered here, and nothing may stay
                // behind per conversation a client merely asked about. Unavailable: the
                // live messages this sync dropped are in no replay now; like after a
                // `gap`, they wait for the client's next sync (a client retries after
                // `unavailable`), unless another sync in flight carries them.
                self.inner.borrow_mut().sync_failed(conv, code != ErrorCode::NotMember);
                let message = match code {
                    ErrorCode::NotMember => "not a member",
                    _ => "the store is unavailable; retry",
                };
                ctx.metrics.refused_send(code);
                let frame = protocol::error_json(reply.cid.as_deref(), code, message);
                return self.push(codec::text_frame(&frame), ctx);
            }
        };
        // The last seq replayed; with nothing to replay, what the client now holds
        // (PROTOCOL.md: never below the `after` asked for).
        let last = match history.messages.last() {
            Some(m) => m.seq,
            None => history.last_seq.max(reply.after).max(reply.held),
        };
        let truncated = history.messages.len() >= reply.limit && last < history.last_seq;
        {
            let mut inner = self.inner.borrow_mut();
            if self.fd.get() < 0 || inner.close != CloseState::Open {
                return;
            }
            let then = if truncated {
                Then::Gapped
            } else if reply.held > history.last_seq {
                // The client holds seqs this node has not delivered yet: when they come
                // live they are not sent again.
                Then::Ahead(reply.held)
            } else {
                Then::Send
            };
            inner.modes.sync_answered(conv, then);
            let backlog = &mut inner.replay.get_or_insert_with(Box::default).items;
            for m in history.messages {
                backlog.push_back(Pending::Msg { bytes: m.frame });
            }
            let synced = protocol::synced_json(conv, last, history.read, history.complete);
            backlog.push_back(Pending::Frame(codec::text_frame(&synced)));
            if truncated {
                let gap = protocol::gap_json(conv, last + 1, history.last_seq);
                backlog.push_back(Pending::Frame(codec::text_frame(&gap)));
            }
            backlog.push_back(Pending::End(conv.clone()));
        }
        self.refill(ctx);
    }

    /// Seqs `from..=to` of `conv` will never reach this session live (gone from the
    /// store before this node could deliver them): tell it with a `gap`, and hold its
    /// live messages of `conv` until it syncs, as after any gap.
    pub fn missed(&self, ctx: &Ctx, conv: &Key, from: u64, to: u64) {
        let mut inner = self.inner.borrow_mut();
        if self.fd.get() < 0 || !inner.open {
            return;
        }
        let mut from = from;
        if let Some(m) = inner.modes.get_mut(conv) {
            if m.syncs > 0 || m.then == Then::Gapped {
                return; // the sync in flight, or the one the gap calls for, covers them
            }
            if let Then::Ahead(held) = m.then {
                if to <= held {
                    return;
                }
                from = from.max(held + 1);
            }
            if m.replays > 0 {
                // It follows the replay still going out.
                m.gap = Some(m.gap.map_or((from, to), |(f, t)| (f.min(from), t.max(to))));
                return;
            }
        }
        // Messages held for the first sync come before it (they are older seqs).
        let held = inner.held.as_mut().map(|h| h.take(conv)).unwrap_or_default();
        drop(inner);
        for (seq, frame) in held {
            self.send_msg(ctx, conv, seq, &frame);
        }
        let mut inner = self.inner.borrow_mut();
        if inner.modes.is_gapped(conv) {
            return; // thinned into a gap meanwhile, which now covers these too
        }
        inner.modes.set_gapped(conv);
        drop(inner);
        let bytes = codec::text_frame(&protocol::gap_json(conv, from, to));
        self.enqueue(bytes, Tag::Gap { conv: conv.clone(), from, to }, ctx);
    }

    /// Asks the session to close with `code` (drain, expiry, API disconnect).
    pub fn request_close(&self, code: u16, reason: &'static str) {
        self.set_close(CloseState::Requested(code, reason));
    }

    fn set_close(&self, state: CloseState) {
        let mut inner = self.inner.borrow_mut();
        if inner.close == CloseState::Open {
            inner.close = state;
            drop(inner);
            self.wake();
        }
    }

    fn wake(&self) {
        if let Some(w) = self.waker.take() {
            w.wake();
        }
    }

    /// The session's deadline has come (see `Shard::run_wheel`): drop it if silent for
    /// `idle_timeout_ms`, close it if its token expired, ping it if a ping is due, give
    /// back an outbound queue it no longer needs. Returns the next deadline, or `None`
    /// when the session is ending.
    pub fn on_timer(&self, ctx: &Ctx, now: u64) -> Option<u64> {
        if self.fd.get() < 0 || self.inner.borrow().close != CloseState::Open {
            return None;
        }
        let hb = &ctx.config.heartbeat;
        if now >= self.last_seen.get() + hb.idle_timeout_ms && unread_bytes(self.fd.get()) > 0 {
            // The client did send; a busy shard has not read it yet. That is life.
            self.last_seen.set(now);
        }
        if now >= self.last_seen.get() + hb.idle_timeout_ms {
            debug!(conn = %self.conn, "idle timeout");
            ctx.metrics.idle_drops.inc();
            self.set_close(CloseState::Drop);
            return None;
        }
        if now >= self.expires_ms {
            self.request_close(close::POLICY, "token expired");
            return None;
        }
        let (queued, head_since, open) = {
            let inner = self.inner.borrow();
            (!inner.queue.is_empty(), inner.queue.head_since(), inner.open)
        };
        if queued && now >= head_since + hb.idle_timeout_ms {
            // The frame at the head of the queue has not gone out for the idle bound:
            // even control frames do not drain. Give up on it.
            self.slow_consumer(ctx);
            return None;
        }
        if open && now >= self.next_ping.get() {
            self.push(Bytes::from_static(codec::PING_FRAME), ctx);
            ctx.metrics.pings_sent.inc();
            self.next_ping.set(now + hb.ping_interval_ms);
        }
        let mut inner = self.inner.borrow_mut();
        if inner.replay.is_none() {
            inner.queue.give_back();
        }
        drop(inner);
        let mut next = self.next_deadline(hb.idle_timeout_ms);
        if queued {
            next = next.min(head_since + hb.idle_timeout_ms);
        }
        Some(next)
    }

    /// Drives the socket: writes what is queued, reads and handles what arrived, until the
    /// session must end. In `closing` mode data messages are ignored and only the close
    /// handshake is followed.
    fn poll_pump(&self, ctx: &Ctx, stream: &mut TcpStream, cx: &mut Context<'_>, closing: bool) -> Poll<End> {
        match self.waker.take() {
            Some(w) if w.will_wake(cx.waker()) => self.waker.set(Some(w)),
            _ => self.waker.set(Some(cx.waker().clone())),
        }
        for _ in 0..READS_PER_POLL {
            if !closing {
                match self.inner.borrow().close {
                    CloseState::Open => {}
                    CloseState::Requested(code, reason) => return Poll::Ready(End::Close(code, reason)),
                    CloseState::Drop => return Poll::Ready(End::Drop),
                }
            }
            if let Poll::Ready(Err(_)) = self.poll_flush(ctx, stream, cx) {
                return Poll::Ready(End::Eof);
            }
            // A client that does not read its own echoes stops being read from.
            if self.inner.borrow().queue.bytes() > ctx.config.limits.outbound_queue_bytes {
                return Poll::Pending;
            }
            let read = READ_BUF.with(|buf| {
                let mut buf = buf.borrow_mut();
                match Pin::new(&mut *stream).poll_read(cx, &mut buf[..]) {
                    Poll::Pending => Poll::Pending,
                    Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => Poll::Ready(Some(End::Eof)),
                    Poll::Ready(Ok(n)) => Poll::Ready(self.on_bytes(ctx, &buf[..n], closing)),
                }
            });
            match read {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(end)) => return Poll::Ready(end),
                Poll::Ready(None) => {}
            }
        }
        // Fair share used: let the other sessions of the shard run, then continue.
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// Writes queued frames, several per `send` when they are small.
    fn poll_flush(&self, ctx: &Ctx, stream: &mut TcpStream, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            let mut inner = self.inner.borrow_mut();
            if inner.queue.is_empty() {
                return Poll::Ready(Ok(()));
            }
            let written = inner.queue.with_batch(|batch| Pin::new(&mut *stream).poll_write(cx, batch));
            let n = match written {
                // The socket is full; `Queue::head_since` tells how long the queue has
                // been stuck (see `on_timer`).
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => n,
            };
            ctx.metrics.socket_writes.inc();
            ctx.metrics.bytes_out.add(n as u64);
            inner.queue.consume(n, ctx.now_ms());
            let refill = inner.replay.is_some();
            drop(inner);
            if refill {
                self.refill(ctx);
            }
        }
    }

    /// Handles bytes read from the socket. Returns why the session must end, if it must.
    fn on_bytes(&self, ctx: &Ctx, data: &[u8], closing: bool) -> Option<End> {
        ctx.metrics.bytes_in.add(data.len() as u64);
        self.last_seen.set(ctx.now_ms());
        // The codec is taken out while messages are handled, so handlers may queue frames
        // on this session without holding its borrow.
        let mut codec = std::mem::take(&mut self.inner.borrow_mut().codec);
        codec.received(data);
        let mut input = data;
        // Taken, not borrowed: a handler that queues frames never finds it in use.
        let mut replies = REPLIES.with(|r| std::mem::take(&mut *r.borrow_mut()));
        let end = loop {
            match codec.read(&ctx.ws_config, &mut input, &mut replies) {
                Next::Message(msg) => {
                    ctx.metrics.frames_in.inc();
                    if closing {
                        continue;
                    }
                    if let Some(end) = self.on_message(ctx, msg, &mut replies) {
                        break Some(end);
                    }
                }
                Next::NeedMore => break None,
                Next::Closed => break Some(End::Closed),
                Next::Fail(code, why) => break Some(End::Fail(code, why)),
            }
        };
        if end.is_none() && codec.release() {
            ctx.metrics.codec_releases.inc();
        }
        self.inner.borrow_mut().codec = codec;
        if !replies.is_empty() {
            self.push_slice(&replies, ctx);
            replies.clear();
        }
        if replies.capacity() <= KEPT_SCRATCH_BYTES {
            REPLIES.with(|r| *r.borrow_mut() = replies);
        }
        end
    }

    fn on_message(&self, ctx: &Ctx, msg: Message, replies: &mut Vec<u8>) -> Option<End> {
        match (&self.kind, msg) {
            (Kind::Echo, msg) => {
                codec::append_echo(&msg, replies);
                None
            }
            (Kind::Client { .. }, Message::Text(text)) => {
                self.on_client_text(ctx, text.as_bytes(), replies);
                None
            }
            (Kind::Client { .. }, Message::Binary(_)) => {
                Some(End::Close(close::UNSUPPORTED, "binary messages are not accepted"))
            }
            // Pongs for pings are queued by the codec; pongs from clients need nothing.
            _ => None,
        }
    }

    /// A client frame of PROTOCOL.md: `send` and `sync` go to the conversation's owner
    /// shard; answers that need no owner (errors) go straight into `replies`.
    fn on_client_text(&self, ctx: &Ctx, text: &[u8], replies: &mut Vec<u8>) {
        let Kind::Client { user, device } = &self.kind else { return };
        let request = match protocol::parse_request(text) {
            Ok(request) => request,
            Err(r) => return refuse(ctx, replies, r.cid.as_deref(), r.code, r.message),
        };
        let me = SessionRef { shard: ctx.id, id: self.id };
        let (cid, conv, body) = match request {
            ClientRequest::Sync { cid, conv, after, limit } => {
                if self.inner.borrow().modes.syncs_in_flight() >= MAX_SYNCS_IN_FLIGHT {
                    let why = "too many syncs in flight; wait for synced";
                    return refuse(ctx, replies, cid.as_deref(), ErrorCode::RateLimited, why);
                }
                let owner = ctx.owner_of(&conv);
                let cap = ctx.config.history.max_per_conv;
                let limit = limit.unwrap_or(cap).clamp(1, cap);
                let after = after.unwrap_or(0);
                let conv: Key = Arc::from(&*conv);
                self.start_sync(&conv);
                ctx.loading_started();
                let reply = SyncReply { after, limit, cid: cid.as_deref().map(Key::from), held: 0 };
                let sync = ShardMsg::Conv(ConvMsg::Sync { session: me, user: user.clone(), conv, reply });
                return ctx.route(owner, sync);
            }
            ClientRequest::Send { cid, conv, body } => (cid, conv, body),
            ClientRequest::Read { cid, conv, seq } => {
                let read = ConvMsg::Read {
                    origin: Origin::Session(me),
                    conv: Arc::from(&*conv),
                    user: user.clone(),
                    dev: Some(device.clone()),
                    seq,
                    cid: cid.as_deref().map(Key::from),
                };
                return ctx.route(ctx.owner_of(&conv), ShardMsg::Conv(read));
            }
            ClientRequest::Signal { cid, conv, body } => {
                if body.get().len() > ctx.config.limits.max_signal_bytes {
                    let why = "signal body larger than limits.max_signal_bytes";
                    return refuse(ctx, replies, cid.as_deref(), ErrorCode::BadRequest, why);
                }
                if !self.take_token(ctx, Bucket::Signal) {
                    let why = "too many signals; slow down";
                    return refuse(ctx, replies, cid.as_deref(), ErrorCode::RateLimited, why);
                }
                // This shard's index of who is in which conversation is the check: the
                // session is in it for every conversation its user is a member of.
                if !ctx.hub.borrow().is_member(user, &conv) {
                    return refuse(ctx, replies, cid.as_deref(), ErrorCode::NotMember, "not a member");
                }
                let text = protocol::signal_json(&conv, user, device, body.get().as_bytes());
                // The same path as this connection's sends: to the owner, in order with them.
                let signal =
                    ConvMsg::Signal { conv: Arc::from(&*conv), frame: codec::text_frame(&text), exclude: me };
                return ctx.route(ctx.owner_of(&conv), ShardMsg::Conv(signal));
            }
        };
        if !self.take_token(ctx, Bucket::Send) {
            return refuse(ctx, replies, Some(&cid), ErrorCode::RateLimited, "too many sends; slow down");
        }
        let owner = ctx.owner_of(&conv);
        let msg = NewMessage {
            from: user.clone(),
            dev: Some(device.clone()),
            cid: Some(Arc::from(&*cid)),
            ts: 0,
            body: Bytes::copy_from_slice(body.get().as_bytes()),
        };
        ctx.route(
            owner,
            ShardMsg::Conv(ConvMsg::Send { origin: Origin::Session(me), conv: Arc::from(&*conv), msg }),
        );
    }

    /// The per-connection token buckets of `limits.send_rate_per_sec` and
    /// `limits.signal_rate_per_sec` (bursts of twice the rate): both are refilled at
    /// once, so they share one timestamp; a token is taken from `bucket`.
    fn take_token(&self, ctx: &Ctx, bucket: Bucket) -> bool {
        let limits = &ctx.config.limits;
        let now = ctx.now_ms();
        let elapsed = now.saturating_sub(self.tokens_at.get()) as f32 / 1000.0;
        self.tokens_at.set(now);
        let refill = |cell: &Cell<f32>, rate: u32| {
            let rate = rate as f32;
            cell.set((cell.get() + elapsed * rate).min(2.0 * rate));
        };
        refill(&self.tokens, limits.send_rate_per_sec);
        refill(&self.signal_tokens, limits.signal_rate_per_sec);
        let cell = match bucket {
            Bucket::Send => &self.tokens,
            Bucket::Signal => &self.signal_tokens,
        };
        if cell.get() >= 1.0 {
            cell.set(cell.get() - 1.0);
            true
        } else {
            false
        }
    }
}

/// Which of a connection's token buckets a request takes from.
#[derive(Clone, Copy)]
enum Bucket {
    Send,
    Signal,
}

/// Answers a client request with an `error` frame.
fn refuse(ctx: &Ctx, replies: &mut Vec<u8>, cid: Option<&str>, code: ErrorCode, message: &str) {
    ctx.metrics.refused_send(code);
    let cid = cid.filter(|c| !c.is_empty());
    replies.extend_from_slice(&codec::text_frame(&protocol::error_json(cid, code, message)));
}

/// Where the queue, the modes and the grace meet.
impl Inner {
    /// Forgets mode `i` once it is plain (see [`Modes::tidy`]).
    fn tidy(&mut self, i: usize) {
        self.modes.tidy(i, self.hold_until > 0);
    }

    /// The end of one answer of `conv` left the replay backlog: the `gap` frame to send
    /// for live messages dropped behind it, if any (see [`Modes::replay_done`]).
    fn replay_done(&mut self, conv: &Key) -> Option<Bytes> {
        self.modes.replay_done(conv, self.hold_until > 0)
    }

    /// A `sync` of `conv` was answered with an error (see [`Modes::sync_failed`]).
    fn sync_failed(&mut self, conv: &Key, gapped: bool) {
        self.modes.sync_failed(conv, gapped, self.hold_until > 0);
    }

    /// The queue is over budget and a message of `conv`/`seq` is due: the queue is
    /// thinned into one `gap` per conversation (see [`Queue::thin_out`]), and the live
    /// messages of those conversations then wait for the client's `sync`. Returns the
    /// number of gap frames queued.
    fn thin_out(&mut self, conv: &Key, seq: u64) -> usize {
        let gapped = self.queue.thin_out(conv, seq);
        for conv in &gapped {
            self.modes.set_gapped(conv);
        }
        gapped.len()
    }

    /// The connection is given up on (4002): frames not started, the replay backlog and
    /// held messages are dropped; a frame half written stays so the close frame can
    /// follow it.
    fn drop_unsent(&mut self) {
        self.queue.truncate_unsent();
        self.replay = None;
        self.held = None;
    }
}

/// A connection task's way into its shard's session table (the shard implements it):
/// registering indexes the session, starts its join and its heartbeats.
pub trait Table {
    fn ctx(&self) -> &Ctx;
    fn register(&self, make: impl FnOnce(TimerId) -> Session) -> Rc<Session>;
    fn unregister(&self, session: &Session);
}

/// Clears a session's raw fd when its task lets go of the socket, however the task ends:
/// a write from another task's fan-out (`send_now`) must never reach a descriptor number
/// the kernel may have handed to another socket since.
struct ReleaseFd<'a>(&'a Session);

impl Drop for ReleaseFd<'_> {
    fn drop(&mut self) {
        self.0.fd.set(-1);
    }
}

/// Serves one accepted TCP connection from handshake to close.
pub async fn serve<T: Table>(table: Rc<T>, mut stream: TcpStream, peer: SocketAddr) {
    // The handshake and the close are boxed: the task then keeps, while the connection
    // is open, only the stream, the session handle and the shard handle.
    let Some((session, early_end)) = Box::pin(open(&*table, &mut stream, peer)).await else { return };
    let ctx = table.ctx();
    {
        let _release = ReleaseFd(&session);
        let end = match early_end {
            Some(end) => end,
            None => futures_lite::future::poll_fn(|cx| session.poll_pump(ctx, &mut stream, cx, false)).await,
        };
        Box::pin(finish(ctx, &session, &mut stream, end)).await;
    }
    table.unregister(&session);
}

/// Handshake, registration, the join (`hello` once it is answered), and whatever frames
/// came with the request.
async fn open<T: Table>(
    table: &T,
    stream: &mut TcpStream,
    peer: SocketAddr,
) -> Option<(Rc<Session>, Option<End>)> {
    let ctx = table.ctx();
    let limit = Duration::from_millis(ctx.config.handshake_timeout_ms);
    let accepted =
        match glommio::timer::timeout(limit, async { Ok(upgrade::handshake(ctx, stream, peer).await) }).await
        {
            Ok(Some(accepted)) => accepted,
            Ok(None) => return None,
            Err(_) => {
                ctx.metrics.refused(crate::metrics::Refusal::Timeout);
                return None;
            }
        };
    ctx.metrics.handshakes_ok.inc();
    let hb = &ctx.config.heartbeat;
    let now = ctx.now_ms();
    let session = table.register(|id| Session::new(id, &accepted, now, hb.ping_interval_ms));
    if ctx.draining.get() {
        // The drain's close-all ran while this handshake was finishing.
        session.request_close(close::GOING_AWAY, "server shutting down");
    }
    // Nothing is read, and nothing but the `hello` is sent, until the connection takes
    // part in its conversations (`Shard::settle`): PROTOCOL.md promises every seq accepted
    // after the `hello`, and nothing of earlier ones.
    let joined = futures_lite::future::poll_fn(|cx| {
        let inner = session.inner.borrow();
        match inner.close {
            CloseState::Requested(code, reason) => return Poll::Ready(Some(End::Close(code, reason))),
            CloseState::Drop => return Poll::Ready(Some(End::Drop)),
            CloseState::Open if inner.open => return Poll::Ready(None),
            CloseState::Open => {}
        }
        session.waker.set(Some(cx.waker().clone()));
        Poll::Pending
    });
    if let Some(end) = joined.await {
        return Some((session, Some(end)));
    }
    let mut end = None;
    if !accepted.leftover.is_empty() {
        end = session.on_bytes(ctx, &accepted.leftover, false);
    }
    Some((session, end))
}

impl Session {
    /// The owners have answered this client connection's join (`Shard::settle`): it is in
    /// its conversations' fan-out from now on. Sends the `hello`, starts the grace in
    /// which live messages wait for the first `sync`, and lets the session task read.
    pub fn opened(&self, ctx: &Ctx, node_conn: &str) {
        let Kind::Client { user, device } = &self.kind else { return };
        let hb = &ctx.config.heartbeat;
        let hello = ServerFrame::Hello {
            user,
            device,
            conn: node_conn,
            node: &ctx.config.node_id,
            ping_interval_ms: hb.ping_interval_ms,
            idle_timeout_ms: hb.idle_timeout_ms,
        };
        {
            let mut inner = self.inner.borrow_mut();
            inner.open = true;
            inner.hold_until = ctx.now_ms() + SYNC_GRACE_MS;
        }
        self.push(codec::text_frame(&hello.to_json()), ctx);
        self.wake();
    }

    /// One owner answered the join; true when it was the last one.
    pub fn join_answered(&self) -> bool {
        let mut inner = self.inner.borrow_mut();
        inner.joins = inner.joins.saturating_sub(1);
        inner.joins == 0
    }

    /// The join asks `owners` owners; 0 opens the connection at once.
    pub fn join_started(&self, owners: usize) {
        self.inner.borrow_mut().joins = owners.min(u16::MAX as usize) as u16;
    }

    /// The join found this node behind in `conv`: the client must not hear of seqs up to
    /// `upto` (stored before it took part), which this node delivers later.
    pub fn skip_earlier(&self, conv: &Key, upto: u64) {
        self.inner.borrow_mut().modes.mode_mut(conv).then = Then::Ahead(upto);
    }

    /// Whether the connection has had its `hello` (it is in its conversations' fan-out).
    pub fn is_open(&self) -> bool {
        self.inner.borrow().open
    }
}

/// Ends a session the way `end` says: answer, close politely, or just drop.
async fn finish(ctx: &Ctx, session: &Session, stream: &mut TcpStream, end: End) {
    match end {
        End::Eof | End::Drop => {}
        End::Closed => flush_for(ctx, session, stream, CLOSE_WAIT).await,
        End::Fail(code, reason) => {
            ctx.metrics.close_sent(code);
            session.push(codec::close_frame(code, reason), ctx);
            flush_for(ctx, session, stream, CLOSE_WAIT).await;
        }
        End::Close(code, reason) => {
            ctx.metrics.close_sent(code);
            let mut out = Vec::new();
            let hint;
            let reason: &str = if code == close::GOING_AWAY {
                // A drain: tell each client when to come back, spread so that a whole
                // fleet does not reconnect at once.
                let spread = ctx.config.limits.reconnect_spread_ms;
                hint =
                    format!("{reason}; reconnect_after_ms={}", ctx.admission.borrow_mut().jitter_ms(spread));
                &hint
            } else {
                reason
            };
            session.inner.borrow_mut().codec.close(&ctx.ws_config, code, reason, &mut out);
            session.push(Bytes::from(out), ctx);
            // Wait for the client's close reply; the server then closes TCP first.
            let wait = Box::pin(glommio::timer::timeout(CLOSE_WAIT, async {
                Ok(futures_lite::future::poll_fn(|cx| session.poll_pump(ctx, stream, cx, true)).await)
            }));
            if let Ok(End::Closed) = wait.await {
                flush_for(ctx, session, stream, CLOSE_WAIT).await;
            }
        }
    }
}

/// Writes what is queued, for at most `limit`.
async fn flush_for(ctx: &Ctx, session: &Session, stream: &mut TcpStream, limit: Duration) {
    let flush = Box::pin(glommio::timer::timeout(limit, async {
        let _ = futures_lite::future::poll_fn(|cx| session.poll_flush(ctx, stream, cx)).await;
        Ok(())
    }));
    let _ = flush.await;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The record every connection keeps for its whole life: README "Memory per
    /// connection" counts on it staying this small.
    #[test]
    fn session_record_stays_small() {
        let size = std::mem::size_of::<Session>();
        assert!(size <= 320, "Session grew to {size} bytes");
    }

    #[test]
    fn first_pings_of_a_connect_storm_spread_over_half_an_interval() {
        let interval = 25_000;
        let firsts: Vec<u64> = (0..10_000).map(|conn| first_ping_after(conn, interval)).collect();
        assert!(firsts.iter().all(|&f| (interval / 2..=interval).contains(&f)));
        // Consecutive connection numbers land all over the range: every tenth of it gets
        // some, none gets a fifth of them.
        let mut tenths = [0usize; 10];
        for f in &firsts {
            tenths[((f - interval / 2) * 10 / (interval / 2 + 1)) as usize] += 1;
        }
        assert!(tenths.iter().all(|&n| (500..2000).contains(&n)), "{tenths:?}");
        assert_eq!(first_ping_after(7, 1), 1, "no spread below 2 ms");
        assert!((1..=2).contains(&first_ping_after(7, 2)));
    }

    #[test]
    fn a_sync_forgets_what_its_conversation_has_queued_or_held_and_giving_up_drops_the_rest() {
        let session = Session::for_test(TimerId { index: 0, generation: 0 });
        let (a, b): (Key, Key) = (Arc::from("a"), Arc::from("b"));
        {
            let mut inner = session.inner.borrow_mut();
            let msg = |conv: &Key, seq| Tag::Msg { conv: conv.clone(), seq };
            inner.queue.append(Bytes::from_static(b"0123"), msg(&a, 1), 0);
            inner.queue.append(Bytes::from_static(b"ack"), Tag::Control, 0);
            inner.queue.append(Bytes::from_static(b"aa"), msg(&a, 2), 0);
            inner.queue.append(Bytes::from_static(b"bb"), msg(&b, 5), 0);
            inner.queue.consume(1, 0);
            inner.held.get_or_insert_with(Box::default).msgs.push((a.clone(), 3, Bytes::from_static(b"h")));
        }
        session.start_sync(&a);
        let mut inner = session.inner.borrow_mut();
        assert_eq!(inner.queue.bytes(), 3 + 3 + 2, "the started frame stays");
        assert!(inner.held.as_ref().is_some_and(|h| h.msgs.is_empty()), "the replay carries it");
        // Given up on: only the started frame stays, so a close frame can follow it.
        inner
            .replay
            .get_or_insert_with(Box::default)
            .items
            .push_back(Pending::Frame(Bytes::from_static(b"s")));
        inner.drop_unsent();
        assert_eq!(inner.queue.bytes(), 3);
        assert!(inner.replay.is_none());
        assert!(inner.held.is_none());
    }

    #[test]
    fn syncs_in_flight_count_every_conversation_until_answered() {
        let session = Session::for_test(TimerId { index: 0, generation: 0 });
        let (a, b): (Key, Key) = (Arc::from("a"), Arc::from("b"));
        for _ in 0..MAX_SYNCS_IN_FLIGHT - 1 {
            session.start_sync(&a);
        }
        session.start_sync(&b);
        let mut inner = session.inner.borrow_mut();
        assert_eq!(inner.modes.syncs_in_flight(), MAX_SYNCS_IN_FLIGHT);
        inner.modes.sync_answered(&a, Then::Send);
        inner.modes.sync_answered(&b, Then::Send);
        assert_eq!(inner.modes.syncs_in_flight(), MAX_SYNCS_IN_FLIGHT - 2);
        assert_eq!(inner.replay_done(&b), None);
        assert!(inner.modes.mode("b").is_none());
    }
}
