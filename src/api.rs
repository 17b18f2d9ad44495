//! The admin listener: `/healthz`, `/readyz`, `/metrics`, and the `/api/v1` calls of
//! PROTOCOL.md. It runs on the control thread, never on a shard, and reaches shard state
//! only through messages (and the shards' own metric counters, which it only reads).
//!
//! HTTP/1.1 with keep-alive, parsed with `httparse`; bodies need `Content-Length` (no
//! chunked uploads) and are limited to [`MAX_BODY`].

use std::cell::Cell;
use std::os::fd::{FromRawFd, IntoRawFd};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::{TcpListener, TcpStream};
use tracing::warn;

use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::auth::{valid_id, MAX_USER_LEN};
use crate::cluster::{ClusterMsg, Topic};
use crate::http;
use crate::ids::{shard_for, Key};
use crate::mesh::{ConvMsg, Mesh, Origin, Reply, ShardMsg, ShardWide, UserMsg};
use crate::metrics::{self, ShardMetrics};
use crate::node::Node;
use crate::protocol::{self, MAX_CONV_CHARS};
use crate::store::{MemberOp, NewMessage};
use crate::web;
use crate::ws::codec;

/// Largest request head (request line + headers).
const MAX_HEAD: usize = 16 * 1024;
/// Largest request body; larger gets 413.
pub const MAX_BODY: usize = 1 << 20;
/// An admin connection silent this long between requests is closed.
const KEEP_ALIVE: Duration = Duration::from_secs(30);
/// How long an API call waits for the shards before answering 503.
const SHARD_TIMEOUT: Duration = Duration::from_secs(5);
/// Admin connections served at once; more are answered `503` and closed. Each holds a
/// file descriptor and up to [`MAX_HEAD`] before its key is checked; backends' keep-alive
/// pools, scrapers and dashboards need far fewer.
pub const MAX_CONNECTIONS: usize = 1024;

/// What the admin handlers need.
pub struct Admin {
    node: Arc<Node>,
    metrics: Vec<Arc<ShardMetrics>>,
    /// The control thread's end of the mesh: API calls are messages to the shards.
    mesh: Rc<Mesh>,
}

impl Admin {
    pub fn new(node: Arc<Node>, metrics: Vec<Arc<ShardMetrics>>, mesh: Rc<Mesh>) -> Admin {
        Admin { node, metrics, mesh }
    }

    fn shards(&self) -> usize {
        self.node.shard_count
    }

    /// Asks shard `to` and waits (bounded) for the answer; `None` means 503.
    async fn ask(&self, to: usize, make: impl FnOnce(crate::mesh::ReplyTo) -> ShardMsg) -> Option<Reply> {
        let asked =
            glommio::timer::timeout(SHARD_TIMEOUT, async { Ok(self.mesh.request(to, make).await) }).await;
        match asked {
            Ok(Some(Reply::Unavailable)) | Ok(None) | Err(_) => None,
            Ok(Some(reply)) => Some(reply),
        }
    }
}

/// One parsed request.
struct Request {
    method: String,
    path: String,
    authorization: Option<String>,
    body: Vec<u8>,
}

/// One response, written with `Content-Length`.
pub struct Response {
    status: u16,
    content_type: &'static str,
    body: Vec<u8>,
}

impl Response {
    /// The HTTP status.
    pub fn status(&self) -> u16 {
        self.status
    }

    fn text(status: u16, body: impl Into<String>) -> Response {
        Response { status, content_type: "text/plain; charset=utf-8", body: body.into().into_bytes() }
    }

    /// `{"error":"<code>","message":"..."}` as PROTOCOL.md says.
    fn error(status: u16, code: &str, message: &str) -> Response {
        let body = http::error_body(code, message);
        Response { status, content_type: "application/json", body: body.into_bytes() }
    }

    fn encode(&self, keep_alive: bool) -> Vec<u8> {
        let headers: &[&str] = if keep_alive { &[] } else { &[http::CLOSE] };
        http::response(self.status, self.content_type, headers, &self.body)
    }
}

/// Accepts admin connections until the task is dropped.
pub async fn serve(listener: std::net::TcpListener, admin: Admin) {
    let admin = Rc::new(admin);
    // SAFETY: a bound, listening TCP socket we own.
    let listener = unsafe { TcpListener::from_raw_fd(listener.into_raw_fd()) };
    let open = Rc::new(Cell::new(0usize));
    loop {
        match listener.accept().await {
            Ok(mut stream) if open.get() >= MAX_CONNECTIONS => {
                let busy = http::busy("too many admin connections", 1);
                // A new socket's buffer takes it at once; the bound only keeps a broken
                // peer from holding up the accepts.
                let _ = glommio::timer::timeout(Duration::from_millis(100), async {
                    Ok(stream.write_all(&busy).await)
                })
                .await;
            }
            Ok(stream) => {
                open.set(open.get() + 1);
                let counted = Counted(open.clone());
                let admin = admin.clone();
                glommio::spawn_local(async move {
                    let _counted = counted;
                    connection(admin, stream).await
                })
                .detach();
            }
            Err(e) => {
                warn!(error = %e, "admin accept failed");
                glommio::timer::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Holds one place among [`MAX_CONNECTIONS`] while its connection is served, however its
/// task ends.
struct Counted(Rc<Cell<usize>>);

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.set(self.0.get().saturating_sub(1));
    }
}

/// Serves requests on one admin connection (keep-alive) until it closes or errs.
async fn connection(admin: Rc<Admin>, mut stream: TcpStream) {
    let mut buf: Vec<u8> = Vec::new();
    loop {
        let read = glommio::timer::timeout(KEEP_ALIVE, async {
            Ok(read_request(&mut stream, &mut buf, &admin.node.config.api_key).await)
        })
        .await;
        let (request, keep_alive) = match read {
            Ok(Ok(parsed)) => parsed,
            Ok(Err(Some(refusal))) => {
                let _ = stream.write_all(&refusal.encode(false)).await;
                return;
            }
            Ok(Err(None)) | Err(_) => return,
        };
        if request.method == "GET" && request.path.split('?').next() == Some("/events") {
            // The dashboard's live feed: holds the connection until the client goes away.
            let query = request.path.split_once('?').map_or("", |(_, q)| q);
            let scrape = || metrics_text(&admin);
            return web::dashboard::serve_events(&mut stream, query, &admin.node, scrape).await;
        }
        let response = route(&admin, &request).await;
        if stream.write_all(&response.encode(keep_alive)).await.is_err() || !keep_alive {
            return;
        }
    }
}

/// Reads one request. `Err(None)`: the peer went away; `Err(Some(r))`: answer `r` and close.
/// An `/api/` call without the API key is answered 401 from its head: its body is never
/// read, so no one without the key makes the node buffer up to [`MAX_BODY`].
async fn read_request(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    api_key: &str,
) -> Result<(Request, bool), Option<Response>> {
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(head) = parse_head(buf).map_err(|e| Some(e.response()))? {
            if head.path.starts_with("/api/") && !key_matches(api_key, head.authorization.as_deref()) {
                return Err(Some(unauthorized()));
            }
            let end = head.head_len + head.content_length;
            while buf.len() < end {
                let n = stream.read(&mut chunk).await.map_err(|_| None)?;
                if n == 0 {
                    return Err(None);
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            let body = buf[head.head_len..end].to_vec();
            buf.drain(..end);
            let RequestHead { method, path, authorization, keep_alive, .. } = head;
            return Ok((Request { method, path, authorization, body }, keep_alive));
        }
        let n = stream.read(&mut chunk).await.map_err(|_| None)?;
        if n == 0 {
            return Err(None);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// An admin request's head: what reading the body and routing need.
#[derive(Debug, PartialEq, Eq)]
pub struct RequestHead {
    pub method: String,
    pub path: String,
    pub authorization: Option<String>,
    /// The body's length (`Content-Length`, at most `MAX_BODY`); it starts at `head_len`.
    pub content_length: usize,
    pub head_len: usize,
    /// HTTP/1.1 without `Connection: close`.
    pub keep_alive: bool,
}

/// Why a request head is refused: answered with 400 (413 for a body too large), then the
/// connection is closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadError {
    Malformed,
    HeadTooLarge,
    BadContentLength,
    Chunked,
    BodyTooLarge,
}

impl HeadError {
    fn response(self) -> Response {
        match self {
            HeadError::Malformed => Response::error(400, "bad_request", "malformed HTTP request"),
            HeadError::HeadTooLarge => Response::error(400, "bad_request", "request head too large"),
            HeadError::BadContentLength => Response::error(400, "bad_request", "bad Content-Length"),
            HeadError::Chunked => Response::error(400, "bad_request", "chunked bodies are not supported"),
            HeadError::BodyTooLarge => Response::error(413, "too_large", "request body too large"),
        }
    }
}

/// Parses the head of the request at the start of `buf`. `Ok(None)`: incomplete, read more.
/// Pure (the connection loop and the fuzz target both call it); the body is not looked at.
pub fn parse_head(buf: &[u8]) -> Result<Option<RequestHead>, HeadError> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => return Ok(None),
        Ok(httparse::Status::Partial) => return Err(HeadError::HeadTooLarge),
        Err(_) => return Err(HeadError::Malformed),
    };
    let mut content_length = 0usize;
    let mut authorization = None;
    let mut close = req.version == Some(0);
    for h in req.headers.iter() {
        let value = std::str::from_utf8(h.value).unwrap_or("").trim();
        if h.name.eq_ignore_ascii_case("content-length") {
            content_length = value.parse().map_err(|_| HeadError::BadContentLength)?;
        } else if h.name.eq_ignore_ascii_case("authorization") {
            authorization = Some(value.to_string());
        } else if h.name.eq_ignore_ascii_case("connection") {
            close |= value.eq_ignore_ascii_case("close");
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(HeadError::Chunked);
        }
    }
    if content_length > MAX_BODY {
        return Err(HeadError::BodyTooLarge);
    }
    Ok(Some(RequestHead {
        method: req.method.unwrap_or("").to_string(),
        path: req.path.unwrap_or("/").to_string(),
        authorization,
        content_length,
        head_len,
        keep_alive: !close,
    }))
}

async fn route(admin: &Admin, req: &Request) -> Response {
    let path = req.path.split('?').next().unwrap_or("");
    match (req.method.as_str(), path) {
        // The dashboard (`web::dashboard`); its feed is `/events`, served by `connection`.
        ("GET", "/") => Response {
            status: 200,
            content_type: "text/html; charset=utf-8",
            body: web::dashboard::DASHBOARD_HTML.as_bytes().to_vec(),
        },
        ("GET", "/healthz") => Response::text(200, "ok\n"),
        ("GET", "/readyz") if admin.node.is_ready() => Response::text(200, "ready\n"),
        ("GET", "/readyz") => Response::text(503, "not ready\n"),
        ("GET", "/metrics") => Response {
            status: 200,
            content_type: "text/plain; version=0.0.4",
            body: {
                let mut text = metrics::render(&admin.metrics);
                metrics::render_node(&node_facts(&admin.node), &admin.metrics, &mut text);
                if let Some(links) = &admin.node.cluster {
                    links.bus.metrics().render(&mut text);
                }
                if let Some(outbox) = &admin.node.webhooks {
                    outbox.counters().render(&mut text);
                }
                text.push_str(&process_metrics().await);
                text.into_bytes()
            },
        },
        (_, p) if p.starts_with("/api/") => {
            if !key_matches(&admin.node.config.api_key, req.authorization.as_deref()) {
                return unauthorized();
            }
            let Some(segments) = api_path(p) else { return not_found() };
            match api(admin, &req.method, &segments, &req.body).await {
                Ok(response) => response,
                Err(response) => response,
            }
        }
        _ => Response::error(404, "not_found", "no such path"),
    }
}

/// What `/metrics` shows of the node itself, read from it at each scrape.
fn node_facts(node: &Node) -> metrics::NodeFacts {
    use std::sync::atomic::Ordering::Relaxed;
    metrics::NodeFacts {
        store_up: node.store_up.load(Relaxed),
        redis: node.redis.is_some(),
        presence_purges: node.presence_purges.load(Relaxed),
        ready: node.is_ready(),
        max_connections: node.config.limits.max_connections as u64,
        shard_ping_us: node.shard_ping_us.load(Relaxed),
    }
}

/// The `/metrics` text exactly as a scrape gets it: what the dashboard is built from.
/// [`metrics::render_process`] on a thread of its own: counting `/proc/self/fd` walks
/// every open descriptor (a million on a full node), which must not hold up this executor
/// (it also keeps the node's lease). Not glommio's blocking pool: the control thread's
/// one blocking thread waits for the shutdown signal. Empty if no thread can start.
async fn process_metrics() -> String {
    let (tx, rx) = flume::bounded(1);
    let started = std::thread::Builder::new().name("metrics".into()).spawn(move || {
        let mut text = String::new();
        metrics::render_process(&mut text);
        let _ = tx.send(text);
    });
    match started {
        Ok(_) => rx.recv_async().await.unwrap_or_default(),
        Err(_) => String::new(),
    }
}

async fn metrics_text(admin: &Admin) -> String {
    let scrape =
        Request { method: "GET".into(), path: "/metrics".into(), authorization: None, body: Vec::new() };
    String::from_utf8(route(admin, &scrape).await.body).unwrap_or_default()
}

fn not_found() -> Response {
    Response::error(404, "not_found", "no such API call")
}

fn unavailable() -> Response {
    Response::error(503, "unavailable", "the store or a shard did not answer; retry")
}

fn json(status: u16, value: serde_json::Value) -> Response {
    Response { status, content_type: "application/json", body: value.to_string().into_bytes() }
}

fn bad(message: &str) -> Response {
    Response::error(400, "bad_request", message)
}

fn parse<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, Response> {
    serde_json::from_slice(body).map_err(|e| bad(&format!("invalid JSON body: {e}")))
}

fn conv_id(s: &str) -> Result<Key, Response> {
    if valid_id(s, MAX_CONV_CHARS) {
        Ok(Key::from(s))
    } else {
        Err(bad("conversation ids are 1-128 characters of [A-Za-z0-9._:@-]"))
    }
}

fn user_ids(users: &[String]) -> Result<Vec<Key>, Response> {
    users
        .iter()
        .map(|u| {
            if valid_id(u, MAX_USER_LEN) {
                Ok(Key::from(u.as_str()))
            } else {
                Err(bad(&format!("invalid user id {u:?}: 1-128 characters of [A-Za-z0-9._:@-]")))
            }
        })
        .collect()
}

#[derive(Deserialize)]
struct UsersBody {
    users: Vec<String>,
}

#[derive(Deserialize)]
struct MessageBody<'a> {
    from: String,
    #[serde(borrow)]
    body: &'a RawValue,
}

#[derive(Deserialize)]
struct PushBody<'a> {
    users: Vec<String>,
    #[serde(borrow)]
    body: &'a RawValue,
}

#[derive(Deserialize)]
struct ReadBody {
    user: String,
    seq: u64,
}

#[derive(Deserialize)]
struct BroadcastBody<'a> {
    #[serde(borrow)]
    body: &'a RawValue,
}

/// A `body` the API forwards to clients: the checks of a client's `send`.
fn forwardable(body: &RawValue) -> Result<&RawValue, Response> {
    protocol::check_body(body.get()).map(|()| body).map_err(bad)
}

/// The segments of an `/api/v1/...` path (its query already cut off); `None` for any
/// other path under `/api/`.
pub fn api_path(path: &str) -> Option<Vec<&str>> {
    path.strip_prefix("/api/v1/").map(|rest| rest.split('/').collect())
}

/// An `/api/v1` call of PROTOCOL.md with its path and body checked: what `api` acts on.
/// Parsing needs no state, so the fuzz target runs it on any request.
pub enum Call<'a> {
    Members { conv: Key, op: MemberOp, users: Vec<Key> },
    Conversation { conv: Key },
    Message { conv: Key, from: Key, body: &'a RawValue },
    Push { users: Vec<Key>, body: &'a RawValue },
    Broadcast { body: &'a RawValue },
    Presence { user: Key },
    Disconnect { user: Key },
    Unread { user: Key },
    Read { conv: Key, user: Key, seq: u64 },
}

/// Parses an `/api/v1` call from its method, path segments and body. `Err` is the error
/// response (400 for a bad id or body, 404 for no such call).
pub fn parse_call<'a>(method: &str, path: &[&str], body: &'a [u8]) -> Result<Call<'a>, Response> {
    let one_user = |user: &str| user_ids(&[user.to_string()]).map(|mut u| u.remove(0));
    Ok(match (method, path) {
        ("PUT" | "POST", ["conversations", conv, "members"]) => {
            let conv = conv_id(conv)?;
            let users = user_ids(&parse::<UsersBody>(body)?.users)?;
            let op = if method == "PUT" { MemberOp::Replace } else { MemberOp::Add };
            Call::Members { conv, op, users }
        }
        ("DELETE", ["conversations", conv, "members", user]) => {
            let conv = conv_id(conv)?;
            Call::Members { conv, op: MemberOp::Remove, users: vec![one_user(user)?] }
        }
        ("GET", ["conversations", conv]) => Call::Conversation { conv: conv_id(conv)? },
        ("POST", ["conversations", conv, "messages"]) => {
            let conv = conv_id(conv)?;
            let posted: MessageBody = parse(body)?;
            Call::Message { conv, from: one_user(&posted.from)?, body: forwardable(posted.body)? }
        }
        ("POST", ["push"]) => {
            let push: PushBody = parse(body)?;
            Call::Push { users: user_ids(&push.users)?, body: forwardable(push.body)? }
        }
        ("POST", ["broadcast"]) => Call::Broadcast { body: forwardable(parse::<BroadcastBody>(body)?.body)? },
        ("GET", ["presence", user]) => Call::Presence { user: one_user(user)? },
        ("POST", ["users", user, "disconnect"]) => Call::Disconnect { user: one_user(user)? },
        ("GET", ["users", user, "unread"]) => Call::Unread { user: one_user(user)? },
        ("POST", ["conversations", conv, "read"]) => {
            let conv = conv_id(conv)?;
            let read: ReadBody = parse(body)?;
            Call::Read { conv, user: one_user(&read.user)?, seq: read.seq }
        }
        _ => return Err(not_found()),
    })
}

/// The `/api/v1` calls of PROTOCOL.md. `Err` carries an error response.
async fn api(admin: &Admin, method: &str, path: &[&str], body: &[u8]) -> Result<Response, Response> {
    match parse_call(method, path, body)? {
        Call::Members { conv, op, users } => members(admin, conv, op, users).await,
        Call::Conversation { conv } => {
            let owner = shard_for(&conv, admin.shards());
            let ask = |reply| ShardMsg::Conv(ConvMsg::Conversation { reply, conv: conv.clone() });
            match admin.ask(owner, ask).await {
                Some(Reply::Conversation { mut members, last_seq }) => {
                    members.sort();
                    let members: Vec<&str> = members.iter().map(|m| &**m).collect();
                    Ok(json(
                        200,
                        serde_json::json!({ "conv": &*conv, "members": members, "last_seq": last_seq }),
                    ))
                }
                _ => Err(unavailable()),
            }
        }
        Call::Message { conv, from, body } => {
            let msg = NewMessage {
                from,
                dev: None,
                cid: None,
                ts: 0,
                body: Bytes::copy_from_slice(body.get().as_bytes()),
            };
            let owner = shard_for(&conv, admin.shards());
            let ask =
                |reply| ShardMsg::Conv(ConvMsg::Send { origin: Origin::Api(reply), conv: conv.clone(), msg });
            match admin.ask(owner, ask).await {
                Some(Reply::Sent { seq }) => Ok(json(200, serde_json::json!({ "conv": &*conv, "seq": seq }))),
                _ => Err(unavailable()),
            }
        }
        Call::Push { users, body } => {
            let users: Arc<[Key]> = users.into();
            let text = protocol::push_json(body.get().as_bytes());
            let frame = codec::text_frame(&text);
            for shard in 0..admin.shards() {
                admin.mesh.send(
                    shard,
                    ShardMsg::Shard(ShardWide::Push { users: users.clone(), frame: frame.clone() }),
                );
            }
            if let Some(links) = &admin.node.cluster {
                // One message per topic the users fall in, to the nodes that follow it.
                let text = Bytes::from(text);
                let mut by_topic: Vec<(Topic, Vec<Key>)> = Vec::new();
                for user in users.iter() {
                    let topic = Topic::user(user);
                    match by_topic.iter_mut().find(|(t, _)| *t == topic) {
                        Some((_, list)) => list.push(user.clone()),
                        None => by_topic.push((topic, vec![user.clone()])),
                    }
                }
                for (topic, users) in by_topic {
                    links.bus.publish(topic, ClusterMsg::Push { users, json: text.clone() });
                }
            }
            Ok(json(202, serde_json::json!({ "ok": true })))
        }
        Call::Broadcast { body } => {
            let text = protocol::push_json(body.get().as_bytes());
            let frame = codec::text_frame(&text);
            for shard in 0..admin.shards() {
                admin.mesh.send(shard, ShardMsg::Shard(ShardWide::Broadcast { frame: frame.clone() }));
            }
            if let Some(links) = &admin.node.cluster {
                links.bus.publish(Topic::All, ClusterMsg::Broadcast { json: Bytes::from(text) });
            }
            Ok(json(202, serde_json::json!({ "ok": true })))
        }
        Call::Presence { user } => {
            // Every shard answers from its live sessions of the user.
            let mut list = Vec::new();
            for shard in 0..admin.shards() {
                match admin
                    .ask(shard, |reply| ShardMsg::User(UserMsg::Presence { reply, user: user.clone() }))
                    .await
                {
                    Some(Reply::Presence(part)) => list.extend(part),
                    _ => return Err(unavailable()),
                }
            }
            if let Some(redis) = &admin.node.redis {
                // Other nodes' devices; this node's come from its live sessions above.
                match redis.presence_of(&user).await {
                    Ok(entries) => list.extend(entries.into_iter().filter(|p| p.node != admin.node.node_key)),
                    Err(_) => return Err(unavailable()),
                }
            }
            list.sort_by(|a, b| (a.since, &a.conn).cmp(&(b.since, &b.conn)));
            let devices: Vec<serde_json::Value> = list
                .iter()
                .map(|p| {
                    serde_json::json!({
                        "device": &*p.device, "conn": &*p.conn, "node": &*p.node,
                        "ip": p.ip.to_string(), "since": p.since,
                    })
                })
                .collect();
            Ok(json(200, serde_json::json!({ "user": &*user, "devices": devices })))
        }
        Call::Unread { user } => unread(admin, user).await,
        Call::Read { conv, user, seq } => {
            let owner = shard_for(&conv, admin.shards());
            let ask = |reply| {
                let origin = Origin::Api(reply);
                ShardMsg::Conv(ConvMsg::Read {
                    origin,
                    conv: conv.clone(),
                    user: user.clone(),
                    dev: None,
                    seq,
                    cid: None,
                })
            };
            match admin.ask(owner, ask).await {
                Some(Reply::ReadMark { read }) => {
                    Ok(json(200, serde_json::json!({ "conv": &*conv, "user": &*user, "read": read })))
                }
                Some(Reply::NotMember) => Err(Response::error(404, "not_member", "the user is not a member")),
                _ => Err(unavailable()),
            }
        }
        Call::Disconnect { user } => {
            if let Some(links) = &admin.node.cluster {
                links.bus.publish(Topic::user(&user), ClusterMsg::Disconnect { user: user.clone() });
            }
            for shard in 0..admin.shards() {
                if admin
                    .ask(shard, |reply| ShardMsg::Shard(ShardWide::Disconnect { reply, user: user.clone() }))
                    .await
                    .is_none()
                {
                    return Err(unavailable());
                }
            }
            Ok(json(200, serde_json::json!({ "ok": true })))
        }
    }
}

/// `GET /api/v1/users/{user}/unread`: the user's conversations with messages past the
/// read mark. The user's owner names the conversations, each one's owner answers for it.
async fn unread(admin: &Admin, user: Key) -> Result<Response, Response> {
    let owner = shard_for(&user, admin.shards());
    let convs =
        match admin.ask(owner, |reply| ShardMsg::User(UserMsg::Convs { reply, user: user.clone() })).await {
            Some(Reply::Convs(convs)) => convs,
            _ => return Err(unavailable()),
        };
    let mut list = Vec::new();
    for conv in convs {
        let owner = shard_for(&conv, admin.shards());
        let ask =
            |reply| ShardMsg::Conv(ConvMsg::ReadState { reply, conv: conv.clone(), user: user.clone() });
        match admin.ask(owner, ask).await {
            Some(Reply::ReadState { last_seq, read }) if last_seq > read => list.push((conv, last_seq, read)),
            Some(Reply::ReadState { .. }) => {}
            _ => return Err(unavailable()),
        }
    }
    list.sort();
    let convs: Vec<serde_json::Value> = list
        .iter()
        .map(|(conv, last_seq, read)| {
            serde_json::json!({ "conv": &**conv, "last_seq": last_seq, "read": read, "unread": last_seq - read })
        })
        .collect();
    Ok(json(200, serde_json::json!({ "user": &*user, "convs": convs })))
}

async fn members(admin: &Admin, conv: Key, op: MemberOp, users: Vec<Key>) -> Result<Response, Response> {
    let owner = shard_for(&conv, admin.shards());
    let ask = |reply| ShardMsg::Conv(ConvMsg::Members { reply, conv: conv.clone(), op, users });
    match admin.ask(owner, ask).await {
        Some(Reply::Members { count }) => {
            Ok(json(200, serde_json::json!({ "conv": &*conv, "members": count })))
        }
        _ => Err(unavailable()),
    }
}

fn unauthorized() -> Response {
    Response::error(401, "unauthorized", "missing or wrong API key")
}

/// `Authorization: Bearer <api_key>`, compared in constant time.
fn key_matches(api_key: &str, authorization: Option<&str>) -> bool {
    let Some(given) = authorization.and_then(|h| h.strip_prefix("Bearer ")) else {
        return false;
    };
    let expected = api_key.as_bytes();
    let given = given.trim().as_bytes();
    given.len() == expected.len() && given.iter().zip(expected).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_are_checked_before_any_shard_is_asked() {
        let call = |m, p: &str, b: &str| {
            parse_call(m, &api_path(p).unwrap(), b.as_bytes()).map(|_| ()).map_err(|r| r.status())
        };
        assert_eq!(call("PUT", "/api/v1/conversations/c1/members", r#"{"users":["a","b"]}"#), Ok(()));
        assert_eq!(call("PUT", "/api/v1/conversations/c 1/members", r#"{"users":["a"]}"#), Err(400));
        assert_eq!(call("POST", "/api/v1/push", r#"{"users":["a/b"],"body":1}"#), Err(400));
        assert_eq!(call("POST", "/api/v1/push", r#"{"users":["a"]}"#), Err(400));
        assert_eq!(call("POST", "/api/v1/conversations/c1/messages", r#"{"from":"a","body":null}"#), Ok(()));
        assert_eq!(call("DELETE", "/api/v1/conversations/c1/members/", ""), Err(400));
        assert_eq!(call("GET", "/api/v1/nothing", ""), Err(404));
        assert_eq!(call("GET", "/api/v1/users/u1/unread", ""), Ok(()));
        assert_eq!(call("POST", "/api/v1/conversations/c1/read", r#"{"user":"u1","seq":4}"#), Ok(()));
        assert_eq!(call("POST", "/api/v1/conversations/c1/read", r#"{"user":"u1"}"#), Err(400));
        assert_eq!(call("POST", "/api/v1/conversations/c1/read", r#"{"user":"u 1","seq":4}"#), Err(400));
        assert!(api_path("/api/v2/push").is_none());
    }

    #[test]
    fn head_then_keep_alive_and_refusals() {
        let two =
            b"POST /api/v1/push HTTP/1.1\r\nContent-Length: 2\r\nAuthorization: Bearer k\r\n\r\n{}GET /x";
        let head = parse_head(two).unwrap().unwrap();
        assert_eq!((head.method.as_str(), head.path.as_str()), ("POST", "/api/v1/push"));
        assert_eq!(
            (head.content_length, head.authorization.as_deref(), head.keep_alive),
            (2, Some("Bearer k"), true)
        );
        assert_eq!(parse_head(&two[head.head_len + 2..]), Ok(None));
        assert!(!parse_head(b"GET / HTTP/1.0\r\n\r\n").unwrap().unwrap().keep_alive);
        assert_eq!(
            parse_head(b"GET / HTTP/1.1\r\nContent-Length: -1\r\n\r\n"),
            Err(HeadError::BadContentLength)
        );
        let big = format!("POST / HTTP/1.1\r\nContent-Length: {}\r\n\r\n", MAX_BODY + 1);
        assert_eq!(parse_head(big.as_bytes()), Err(HeadError::BodyTooLarge));
        assert_eq!(
            parse_head(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"),
            Err(HeadError::Chunked)
        );
        assert_eq!(parse_head(b"\x00garbage\r\n\r\n"), Err(HeadError::Malformed));
        assert_eq!(
            parse_head(&[b"GET / HTTP/1.1\r\nX: ".as_slice(), &[b'a'; MAX_HEAD]].concat()),
            Err(HeadError::HeadTooLarge)
        );
    }
}
