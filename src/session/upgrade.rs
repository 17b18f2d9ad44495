//! A new connection's HTTP upgrade: reading the request head, the routing, origin, token
//! and capacity checks, and the answer (`101`, or a refusal); what passed is an
//! [`Accepted`]. Plain HTTP requests for the `/demo` try-it page are handed to
//! `web::demo` from here.
//!
//! Also owns the shard's read buffer ([`READ_BUF`]), which the upgrade reads the request
//! head through first and the session's read loop then reads frames through.

use std::cell::RefCell;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::Poll;

use futures_lite::{AsyncRead, AsyncWriteExt};
use glommio::net::TcpStream;

use crate::admission::FULL_RETRY_S;
use crate::clock::unix_ms;
use crate::ctx::Ctx;
use crate::ids::Key;
use crate::web::demo;
use crate::ws::handshake::{self, Refusal};

/// Size of the per-shard read buffer every socket read goes through.
const READ_BUF_BYTES: usize = 64 * 1024;

thread_local! {
    /// The shard's read buffer. Borrowed only inside a synchronous poll, never across an
    /// await, so every session of the shard can use it in turn.
    pub(super) static READ_BUF: RefCell<Box<[u8]>> = RefCell::new(vec![0; READ_BUF_BYTES].into_boxed_slice());
}

/// A handshake that passed every check.
pub(super) struct Accepted {
    /// `(user, device)` for `/ws`; `None` for `/echo`.
    pub(super) claims: Option<(Key, Key)>,
    pub(super) conn: u64,
    pub(super) ip: IpAddr,
    pub(super) fd: RawFd,
    pub(super) expires_ms: u64,
    /// Bytes the client sent after its request head (the first frames, pipelined).
    pub(super) leftover: Vec<u8>,
}

/// Reads the upgrade request and answers it. `Some` when the connection is upgraded.
pub(super) async fn handshake(ctx: &Ctx, stream: &mut TcpStream, peer: SocketAddr) -> Option<Accepted> {
    let mut head: Vec<u8> = Vec::new();
    loop {
        let n = read_into(stream, &mut head, handshake::MAX_REQUEST_BYTES + 1).await;
        if n == 0 {
            return None;
        }
        let (request, head_len) = match handshake::parse(&head) {
            Ok(None) => continue,
            Ok(Some(parsed)) => parsed,
            // A plain HTTP request for the try-it page and its calls, not an upgrade.
            Err(_) if demo::is_demo_request(&head) => {
                demo::serve(ctx, stream, &head).await;
                return None;
            }
            Err(refusal) => return refuse_upgrade(ctx, stream, refusal).await,
        };
        let checked = check(ctx, &request, peer);
        let mut accepted = match checked {
            Ok(accepted) => accepted,
            Err(refusal) => return refuse_upgrade(ctx, stream, refusal).await,
        };
        let response = handshake::accept_response(request.key);
        accepted.fd = stream.as_raw_fd();
        accepted.leftover = head[head_len..].to_vec();
        if stream.write_all(&response).await.is_err() {
            ctx.node.connections.fetch_sub(1, Ordering::Relaxed);
            ctx.admission.borrow_mut().release(accepted.ip);
            return None;
        }
        return Some(accepted);
    }
}

/// Routing, origin, token and capacity checks of an upgrade request.
fn check(ctx: &Ctx, request: &handshake::Request<'_>, peer: SocketAddr) -> Result<Accepted, Refusal> {
    let config = &ctx.config;
    let claims = match request.path {
        "/ws" => {
            if let (false, Some(origin)) = (config.allowed_origins.is_empty(), request.origin) {
                if !config.allowed_origins.iter().any(|o| o == origin) {
                    return Err(Refusal::Forbidden);
                }
            }
            let token = request.token().ok_or(Refusal::Unauthorized("missing token"))?;
            let claims =
                ctx.verifier.verify(token).map_err(|_| Refusal::Unauthorized("invalid or expired token"))?;
            Some(claims)
        }
        "/echo" if config.diagnostics.echo => None,
        _ => return Err(Refusal::NotFound),
    };
    if ctx.draining.get() {
        let retry_after_s = ctx.admission.borrow_mut().spread(FULL_RETRY_S);
        return Err(Refusal::Unavailable { why: "server is shutting down", retry_after_s });
    }
    let ip = request.client_ip(peer.ip(), &config.trusted_proxies);
    if let Err(t) = ctx.admission.borrow_mut().admit(ip, ctx.now_ms()) {
        return Err(Refusal::Throttled { why: t.why, retry_after_s: t.retry_after_s });
    }
    let count = ctx.node.connections.fetch_add(1, Ordering::Relaxed);
    if count >= config.limits.max_connections {
        ctx.node.connections.fetch_sub(1, Ordering::Relaxed);
        ctx.admission.borrow_mut().release(ip);
        let retry_after_s = ctx.admission.borrow_mut().spread(FULL_RETRY_S);
        return Err(Refusal::Unavailable { why: "connection limit reached", retry_after_s });
    }
    let now_unix = unix_ms() / 1000;
    let expires_ms = match &claims {
        Some(c) => {
            let left_s = ctx.verifier.deadline(c).saturating_sub(now_unix);
            ctx.now_ms() + left_s * 1000
        }
        None => u64::MAX,
    };
    Ok(Accepted {
        claims: claims.map(|c| (Arc::from(c.sub), Arc::from(c.dev))),
        conn: ctx.next_conn(),
        ip,
        fd: -1,
        expires_ms,
        leftover: Vec::new(),
    })
}

async fn refuse_upgrade(ctx: &Ctx, stream: &mut TcpStream, refusal: Refusal) -> Option<Accepted> {
    ctx.metrics.refused(refusal.into());
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
