//! One connection: handshake -> read loop -> dispatch -> outbound queue -> close.
//!
//! A session is one glommio task that owns its `TcpStream`, plus a small [`Session`]
//! record in the shard's table that the rest of the shard uses to reach it (heartbeats,
//! drain, later fan-out). What an idle session costs, and why:
//! - reads go into one buffer per shard ([`READ_BUF`]); glommio's stream waits for
//!   readiness first and then reads without a buffer of its own, so a connection that is
//!   not sending holds no read buffer;
//! - the tungstenite context is allocated when bytes arrive and released as soon as the
//!   stream sits at a frame boundary again (see `ws::codec`);
//! - frames go straight to the socket with a non-blocking `send` when nothing is queued,
//!   so the outbound queue allocates only for a client that is slow to read, and gives
//!   its memory back at the next heartbeat once drained.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use futures_lite::{AsyncRead, AsyncWrite, AsyncWriteExt};
use glommio::net::TcpStream;
use tracing::debug;

use crate::metrics::ShardMetrics;
use crate::protocol::{Envelope, ErrorCode, ServerFrame};
use crate::shard::Shard;
use crate::wheel::TimerId;
use crate::ws::codec::{self, close, Codec, Message, Next};
use crate::ws::handshake::{self, Refusal};

/// Size of the per-shard read buffer every socket read goes through.
const READ_BUF_BYTES: usize = 64 * 1024;

/// Most bytes gathered into one `send` when several frames are queued.
const WRITE_BATCH_BYTES: usize = 64 * 1024;

/// How long a closing session waits for the peer's close reply (or for its queue to drain)
/// before it drops the socket.
const CLOSE_WAIT: Duration = Duration::from_secs(1);

/// Reads handled in one poll before the session yields to the rest of the shard.
const READS_PER_POLL: usize = 16;

thread_local! {
    /// The shard's read buffer. Borrowed only inside a synchronous poll, never across an
    /// await, so every session of the shard can use it in turn.
    static READ_BUF: RefCell<Box<[u8]>> = RefCell::new(vec![0; READ_BUF_BYTES].into_boxed_slice());
    /// Scratch for gathering several queued frames into one `send`.
    static WRITE_BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// What the connection is for: a client of the IM protocol, or the diagnostics echo.
#[derive(Debug)]
pub enum Kind {
    Client { user: Box<str>, device: Box<str> },
    Echo,
}

/// How a session is being closed, set by the session itself or by the shard.
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
    pub conn: Box<str>,
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
    /// The task to wake when frames are queued or a close is requested.
    waker: Cell<Option<Waker>>,
    inner: RefCell<Inner>,
}

struct Inner {
    /// Frames not yet written, oldest first; `head_sent` bytes of the first are out.
    out: VecDeque<Bytes>,
    head_sent: usize,
    /// Bytes in `out` not yet written.
    out_bytes: usize,
    codec: Codec,
    close: CloseState,
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

impl Session {
    fn new(id: TimerId, accepted: &Accepted, now: u64, ping_interval_ms: u64) -> Session {
        Session {
            id,
            kind: match &accepted.claims {
                Some((user, device)) => Kind::Client { user: user.clone(), device: device.clone() },
                None => Kind::Echo,
            },
            conn: accepted.conn.clone(),
            ip: accepted.ip,
            since_unix_ms: unix_ms(),
            fd: Cell::new(accepted.fd),
            expires_ms: accepted.expires_ms,
            last_seen: Cell::new(now),
            next_ping: Cell::new(now + ping_interval_ms),
            waker: Cell::new(None),
            inner: RefCell::new(Inner {
                out: VecDeque::new(),
                head_sent: 0,
                out_bytes: 0,
                codec: Codec::default(),
                close: CloseState::Open,
            }),
        }
    }

    #[cfg(test)]
    pub fn for_test(id: TimerId) -> Session {
        let accepted = Accepted {
            claims: None,
            conn: "t".into(),
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

    /// Queues a frame for the client. When nothing is queued the frame is sent right away
    /// with a non-blocking `send`; only what the socket does not take is queued.
    pub fn push(&self, frame: Bytes, metrics: &ShardMetrics) {
        let fd = self.fd.get();
        if fd < 0 {
            return;
        }
        metrics.frames_out.inc();
        let mut inner = self.inner.borrow_mut();
        let mut sent = 0;
        if inner.out.is_empty() {
            match send_now(fd, &frame) {
                Ok(n) => {
                    metrics.bytes_out.add(n as u64);
                    if n == frame.len() {
                        return;
                    }
                    sent = n;
                }
                // Queue it; a broken socket shows up on the task's next read or write.
                Err(_) => {}
            }
        }
        inner.out_bytes += frame.len() - sent;
        if inner.out.is_empty() {
            inner.head_sent = sent;
        }
        inner.out.push_back(frame);
        drop(inner);
        self.wake();
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
    pub fn on_timer(&self, shard: &Shard, now: u64) -> Option<u64> {
        if self.fd.get() < 0 || self.inner.borrow().close != CloseState::Open {
            return None;
        }
        let hb = &shard.config.heartbeat;
        if now >= self.last_seen.get() + hb.idle_timeout_ms {
            debug!(conn = %self.conn, "idle timeout");
            shard.metrics.idle_drops.inc();
            self.set_close(CloseState::Drop);
            return None;
        }
        if now >= self.expires_ms {
            self.request_close(close::POLICY, "token expired");
            return None;
        }
        if now >= self.next_ping.get() {
            self.push(Bytes::from_static(codec::PING_FRAME), &shard.metrics);
            shard.metrics.pings_sent.inc();
            self.next_ping.set(now + hb.ping_interval_ms);
        }
        let mut inner = self.inner.borrow_mut();
        if inner.out.is_empty() && inner.out.capacity() > 0 {
            inner.out = VecDeque::new();
        }
        drop(inner);
        Some(self.next_deadline(hb.idle_timeout_ms))
    }

    /// Drives the socket: writes what is queued, reads and handles what arrived, until the
    /// session must end. In `closing` mode data messages are ignored and only the close
    /// handshake is followed.
    fn poll_pump(
        &self,
        shard: &Shard,
        stream: &mut TcpStream,
        cx: &mut Context<'_>,
        closing: bool,
    ) -> Poll<End> {
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
            if let Poll::Ready(Err(_)) = self.poll_flush(shard, stream, cx) {
                return Poll::Ready(End::Eof);
            }
            // A client that does not read its own echoes stops being read from.
            if self.inner.borrow().out_bytes > shard.config.limits.outbound_queue_bytes {
                return Poll::Pending;
            }
            let read = READ_BUF.with(|buf| {
                let mut buf = buf.borrow_mut();
                match Pin::new(&mut *stream).poll_read(cx, &mut buf[..]) {
                    Poll::Pending => Poll::Pending,
                    Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => Poll::Ready(Some(End::Eof)),
                    Poll::Ready(Ok(n)) => Poll::Ready(self.on_bytes(shard, &buf[..n], closing)),
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
    fn poll_flush(
        &self,
        shard: &Shard,
        stream: &mut TcpStream,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<()>> {
        let mut inner = self.inner.borrow_mut();
        while !inner.out.is_empty() {
            let head = inner.head_sent;
            let written = if inner.out.len() == 1 {
                let front = &inner.out[0][head..];
                Pin::new(&mut *stream).poll_write(cx, front)
            } else {
                WRITE_BUF.with(|w| {
                    let mut w = w.borrow_mut();
                    w.clear();
                    for (i, frame) in inner.out.iter().enumerate() {
                        let part = if i == 0 { &frame[head..] } else { &frame[..] };
                        if !w.is_empty() && w.len() + part.len() > WRITE_BATCH_BYTES {
                            break;
                        }
                        w.extend_from_slice(part);
                    }
                    let res = Pin::new(&mut *stream).poll_write(cx, &w);
                    if w.capacity() > 4 * WRITE_BATCH_BYTES {
                        *w = Vec::new();
                    }
                    res
                })
            };
            let n = match written {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => n,
            };
            shard.metrics.bytes_out.add(n as u64);
            inner.consume(n);
        }
        Poll::Ready(Ok(()))
    }

    /// Handles bytes read from the socket. Returns why the session must end, if it must.
    fn on_bytes(&self, shard: &Shard, data: &[u8], closing: bool) -> Option<End> {
        shard.metrics.bytes_in.add(data.len() as u64);
        self.last_seen.set(shard.now_ms());
        // The codec is taken out while messages are handled, so handlers may queue frames
        // on this session without holding its borrow.
        let mut codec = std::mem::take(&mut self.inner.borrow_mut().codec);
        codec.received(data);
        let mut input = data;
        let mut replies = Vec::new();
        let end = loop {
            match codec.read(&shard.ws_config, &mut input, &mut replies) {
                Next::Message(msg) => {
                    shard.metrics.frames_in.inc();
                    if closing {
                        continue;
                    }
                    if let Some(end) = self.on_message(shard, &mut codec, msg, &mut replies) {
                        break Some(end);
                    }
                }
                Next::NeedMore => break None,
                Next::Closed => break Some(End::Closed),
                Next::Fail(code, why) => break Some(End::Fail(code, why)),
            }
        };
        if end.is_none() && codec.release() {
            shard.metrics.codec_releases.inc();
        }
        self.inner.borrow_mut().codec = codec;
        if !replies.is_empty() {
            self.push(Bytes::from(replies), &shard.metrics);
        }
        end
    }

    fn on_message(
        &self,
        shard: &Shard,
        codec: &mut Codec,
        msg: Message,
        replies: &mut Vec<u8>,
    ) -> Option<End> {
        match (&self.kind, msg) {
            (Kind::Echo, msg @ (Message::Text(_) | Message::Binary(_))) => {
                codec.write(&shard.ws_config, msg, replies);
                None
            }
            (Kind::Client { .. }, Message::Text(text)) => {
                self.on_client_text(text.as_bytes(), replies);
                None
            }
            (Kind::Client { .. }, Message::Binary(_)) => {
                Some(End::Close(close::UNSUPPORTED, "binary messages are not accepted"))
            }
            // Pongs for pings are queued by the codec; pongs from clients need nothing.
            _ => None,
        }
    }

    /// A client frame of PROTOCOL.md. The IM operations come with the conversation layer;
    /// until then every well-formed frame is an `unknown_op`.
    fn on_client_text(&self, text: &[u8], replies: &mut Vec<u8>) {
        let (code, cid, message) = match serde_json::from_slice::<Envelope>(text) {
            Err(_) => (ErrorCode::BadRequest, None, "not a JSON object"),
            Ok(Envelope { op: None, cid }) => (ErrorCode::BadRequest, cid, "missing op"),
            Ok(Envelope { op: Some(_), cid }) => (ErrorCode::UnknownOp, cid, "unknown op"),
        };
        let frame = ServerFrame::Error { cid: cid.as_deref(), code, message };
        replies.extend_from_slice(&codec::text_frame(&frame.to_json()));
    }
}

impl Inner {
    /// Marks `n` written bytes of the queue as sent.
    fn consume(&mut self, mut n: usize) {
        self.out_bytes -= n;
        while n > 0 {
            let Some(front) = self.out.front() else { break };
            let left = front.len() - self.head_sent;
            if n >= left {
                n -= left;
                self.out.pop_front();
                self.head_sent = 0;
            } else {
                self.head_sent += n;
                n = 0;
            }
        }
    }
}

/// A non-blocking `send` on the session's socket.
fn send_now(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: `fd` is the session's open socket (the task sets it to -1 before the
    // stream is dropped) and `buf` is valid for `buf.len()` bytes.
    let n =
        unsafe { libc::send(fd, buf.as_ptr().cast(), buf.len(), libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A handshake that passed every check.
struct Accepted {
    /// `(user, device)` for `/ws`; `None` for `/echo`.
    claims: Option<(Box<str>, Box<str>)>,
    conn: Box<str>,
    ip: IpAddr,
    fd: RawFd,
    expires_ms: u64,
    /// Bytes the client sent after its request head (the first frames, pipelined).
    leftover: Vec<u8>,
}

/// Serves one accepted TCP connection from handshake to close.
pub async fn serve(shard: Rc<Shard>, mut stream: TcpStream, peer: SocketAddr) {
    let limit = Duration::from_millis(shard.config.handshake_timeout_ms);
    // Boxed so the session task keeps none of the handshake's state once it is done.
    let handshake =
        Box::pin(glommio::timer::timeout(limit, async { Ok(handshake(&shard, &mut stream, peer).await) }));
    let accepted = match handshake.await {
        Ok(Some(accepted)) => accepted,
        Ok(None) => return,
        Err(_) => {
            shard.metrics.refused("timeout");
            return;
        }
    };
    shard.metrics.handshakes_ok.inc();
    let hb = &shard.config.heartbeat;
    let now = shard.now_ms();
    let session = shard.register(|id| Session::new(id, &accepted, now, hb.ping_interval_ms));

    if let Kind::Client { user, device } = &session.kind {
        let hello = ServerFrame::Hello {
            user,
            device,
            conn: &session.conn,
            node: &shard.config.node_id,
            ping_interval_ms: hb.ping_interval_ms,
            idle_timeout_ms: hb.idle_timeout_ms,
        };
        session.push(codec::text_frame(&hello.to_json()), &shard.metrics);
    }
    let mut end = None;
    if !accepted.leftover.is_empty() {
        end = session.on_bytes(&shard, &accepted.leftover, false);
    }
    drop(accepted);
    let end = match end {
        Some(end) => end,
        None => futures_lite::future::poll_fn(|cx| session.poll_pump(&shard, &mut stream, cx, false)).await,
    };
    finish(&shard, &session, &mut stream, end).await;
    session.fd.set(-1);
    shard.unregister(&session);
}

/// Ends a session the way `end` says: answer, close politely, or just drop.
async fn finish(shard: &Shard, session: &Session, stream: &mut TcpStream, end: End) {
    match end {
        End::Eof | End::Drop => {}
        End::Closed => flush_for(shard, session, stream, CLOSE_WAIT).await,
        End::Fail(code, reason) => {
            shard.metrics.close_sent(code);
            session.push(codec::close_frame(code, reason), &shard.metrics);
            flush_for(shard, session, stream, CLOSE_WAIT).await;
        }
        End::Close(code, reason) => {
            shard.metrics.close_sent(code);
            let mut out = Vec::new();
            session.inner.borrow_mut().codec.close(&shard.ws_config, code, reason, &mut out);
            session.push(Bytes::from(out), &shard.metrics);
            // Wait for the client's close reply; the server then closes TCP first.
            let wait = Box::pin(glommio::timer::timeout(CLOSE_WAIT, async {
                Ok(futures_lite::future::poll_fn(|cx| session.poll_pump(shard, stream, cx, true)).await)
            }));
            if let Ok(End::Closed) = wait.await {
                flush_for(shard, session, stream, CLOSE_WAIT).await;
            }
        }
    }
}

/// Writes what is queued, for at most `limit`.
async fn flush_for(shard: &Shard, session: &Session, stream: &mut TcpStream, limit: Duration) {
    let flush = Box::pin(glommio::timer::timeout(limit, async {
        let _ = futures_lite::future::poll_fn(|cx| session.poll_flush(shard, stream, cx)).await;
        Ok(())
    }));
    let _ = flush.await;
}

/// Reads the upgrade request and answers it. `Some` when the connection is upgraded.
async fn handshake(shard: &Shard, stream: &mut TcpStream, peer: SocketAddr) -> Option<Accepted> {
    let mut head: Vec<u8> = Vec::new();
    loop {
        let n = read_into(stream, &mut head, handshake::MAX_REQUEST_BYTES + 1).await;
        if n == 0 {
            return None;
        }
        let (request, head_len) = match handshake::parse(&head) {
            Ok(None) => continue,
            Ok(Some(parsed)) => parsed,
            Err(refusal) => return refuse(shard, stream, refusal).await,
        };
        let checked = check(shard, &request, peer);
        let mut accepted = match checked {
            Ok(accepted) => accepted,
            Err(refusal) => return refuse(shard, stream, refusal).await,
        };
        let response = handshake::accept_response(request.key);
        accepted.fd = stream.as_raw_fd();
        accepted.leftover = head[head_len..].to_vec();
        if stream.write_all(&response).await.is_err() {
            shard.node.connections.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        return Some(accepted);
    }
}

/// Routing, origin, token and capacity checks of an upgrade request.
fn check(shard: &Shard, request: &handshake::Request<'_>, peer: SocketAddr) -> Result<Accepted, Refusal> {
    let config = &shard.config;
    let claims = match request.path {
        "/ws" => {
            if let (false, Some(origin)) = (config.allowed_origins.is_empty(), request.origin) {
                if !config.allowed_origins.iter().any(|o| o == origin) {
                    return Err(Refusal::Forbidden);
                }
            }
            let token = request.token().ok_or(Refusal::Unauthorized("missing token"))?;
            let claims = shard
                .verifier
                .verify(token)
                .map_err(|_| Refusal::Unauthorized("invalid or expired token"))?;
            Some(claims)
        }
        "/echo" if config.diagnostics.echo => None,
        _ => return Err(Refusal::NotFound),
    };
    if shard.draining.get() {
        return Err(Refusal::Unavailable("server is shutting down"));
    }
    let count = shard.node.connections.fetch_add(1, Ordering::Relaxed);
    if count >= config.limits.max_connections {
        shard.node.connections.fetch_sub(1, Ordering::Relaxed);
        return Err(Refusal::Unavailable("connection limit reached"));
    }
    let now_unix = unix_ms() / 1000;
    let expires_ms = match &claims {
        Some(c) => {
            let left_s = shard.verifier.deadline(c).saturating_sub(now_unix);
            shard.now_ms() + left_s * 1000
        }
        None => u64::MAX,
    };
    Ok(Accepted {
        claims: claims.map(|c| (c.sub.into_boxed_str(), c.dev.into_boxed_str())),
        conn: shard.next_conn_id().into_boxed_str(),
        ip: request.client_ip(peer.ip(), &config.trusted_proxies),
        fd: -1,
        expires_ms,
        leftover: Vec::new(),
    })
}

async fn refuse(shard: &Shard, stream: &mut TcpStream, refusal: Refusal) -> Option<Accepted> {
    shard.metrics.refused(refusal.label());
    let _ = stream.write_all(&refusal.response()).await;
    let _ = stream.close().await;
    None
}

/// Reads once from the socket through the shard's buffer, appending to `dst` (at most
/// `max` bytes in all). Returns the bytes read; 0 at end of stream or on error.
async fn read_into(stream: &mut TcpStream, dst: &mut Vec<u8>, max: usize) -> usize {
    futures_lite::future::poll_fn(|cx| {
        READ_BUF.with(|buf| {
            let mut buf = buf.borrow_mut();
            let room = max.saturating_sub(dst.len()).min(buf.len());
            if room == 0 {
                return Poll::Ready(0);
            }
            match Pin::new(&mut *stream).poll_read(cx, &mut buf[..room]) {
                Poll::Pending => Poll::Pending,
                Poll::Ready(Ok(n)) => {
                    dst.extend_from_slice(&buf[..n]);
                    Poll::Ready(n)
                }
                Poll::Ready(Err(_)) => Poll::Ready(0),
            }
        })
    })
    .await
}
