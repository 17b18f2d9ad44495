//! The black-box harness of the wire tests: a real `ringpush serve` process per test, the
//! admin API over a tiny blocking HTTP client, WebSocket clients (tungstenite, blocking)
//! and raw sockets for what a well-behaved client would never send.
//!
//! Every wait is bounded and waits for an event (a log line, a status, a frame, an EOF, a
//! metric value, a process exit); nothing sleeps for a fixed time hoping something happened.
//! Every socket has a read timeout, so a test that goes wrong fails instead of hanging.

// Each test crate that includes this module uses a different part of it.
#![allow(dead_code)]

pub mod redis;

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tungstenite::client::IntoClientRequest;
use tungstenite::handshake::client::Response;
use tungstenite::protocol::CloseFrame;
use tungstenite::{Message, WebSocket};

/// `api_key` of the base configuration.
pub const API_KEY: &str = "test-api-key";
/// `auth.secret` of the base configuration.
pub const SECRET: &str = "test-secret-0123";
/// The `Sec-WebSocket-Key` of RFC 6455, section 1.3 ...
pub const RFC_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
/// ... and the `Sec-WebSocket-Accept` it must produce.
pub const RFC_ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

/// Bound on any single socket read or write in the tests.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// The configuration every test server starts from; `Server::start` merges a test's own
/// TOML over it key by key.
const BASE_CONFIG: &str = r#"
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
shards = 2
api_key = "test-api-key"
handshake_timeout_ms = 500
[auth]
secret = "test-secret-0123"
[heartbeat]
ping_interval_ms = 200
idle_timeout_ms = 800
[diagnostics]
echo = true
"#;

/// How long a server has to log its `listening` line, and then to answer `/readyz` 200.
const START_TIMEOUT: Duration = Duration::from_secs(20);

pub const OP_CONT: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xa;

// ---------------------------------------------------------------------------------------
// Temporary directories and the binary
// ---------------------------------------------------------------------------------------

/// A fresh directory under the system temp dir, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let name =
            format!("ringpush-{tag}-{}-{}-{nanos}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
        let path = std::env::temp_dir().join(name);
        std::fs::create_dir_all(&path).expect("create temp dir");
        TempDir(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// Writes `contents` to `name` in the directory and returns its path.
    pub fn write(&self, name: &str, contents: &str) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, contents).expect("write temp file");
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A `Command` for the `ringpush` binary with no `RINGPUSH_*` variable of the caller's
/// environment leaking in (they would override the test's configuration).
/// `RINGPUSH_TEST_BIN` names another binary to test instead of this build's (an older
/// commit's, to see a new test fail on it).
pub fn ringpush_command() -> Command {
    let bin = std::env::var_os("RINGPUSH_TEST_BIN").unwrap_or_else(|| env!("CARGO_BIN_EXE_ringpush").into());
    let mut cmd = Command::new(bin);
    for (name, _) in std::env::vars_os() {
        if name.to_str().is_some_and(|n| n.starts_with("RINGPUSH_")) {
            cmd.env_remove(name);
        }
    }
    cmd.stdin(Stdio::null());
    cmd
}

/// `base` with every key of `extra` set over it; tables are merged, not replaced.
fn merge(base: &mut toml::Table, extra: toml::Table) {
    for (key, value) in extra {
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(into)), toml::Value::Table(from)) => merge(into, from),
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// The server process
// ---------------------------------------------------------------------------------------

/// One `ringpush serve` process with its own config file and free ports. Killed (SIGKILL)
/// on drop if it is still running; its log is printed when the test is failing.
pub struct Server {
    dir: TempDir,
    config_path: PathBuf,
    pid: u32,
    client: SocketAddr,
    admin: SocketAddr,
    secret: String,
    api_key: String,
    /// stderr lines not yet moved into `log`, from the reader thread.
    lines: Mutex<Receiver<String>>,
    log: Mutex<Vec<String>>,
    /// The exit status, from the thread that owns the `Child` and waits on it.
    exit_rx: Mutex<Receiver<ExitStatus>>,
    exited: Mutex<Option<ExitStatus>>,
}

impl Server {
    /// Starts a server with the base configuration and `extra_toml` merged over it (a key in
    /// `extra_toml` replaces the base's; sections are merged key by key). Returns once the
    /// server has logged its addresses and `/readyz` answers 200.
    pub fn start(extra_toml: &str) -> Server {
        let mut table: toml::Table = BASE_CONFIG.parse().expect("base config");
        let extra: toml::Table = extra_toml.parse().expect("the test's extra TOML does not parse");
        merge(&mut table, extra);
        let secret = table
            .get("auth")
            .and_then(|a| a.get("secret"))
            .and_then(|s| s.as_str())
            .unwrap_or_default()
            .to_owned();
        let api_key = table.get("api_key").and_then(|s| s.as_str()).unwrap_or_default().to_owned();

        let dir = TempDir::new("server");
        let config_path = dir.write("ringpush.toml", &table.to_string());
        let mut child = ringpush_command()
            .args(["serve", "--config"])
            .arg(&config_path)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn ringpush serve");
        let pid = child.id();

        let stderr = child.stderr.take().expect("piped stderr");
        let (line_tx, line_rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if line_tx.send(line).is_err() {
                    break;
                }
            }
        });
        let (exit_tx, exit_rx) = mpsc::channel();
        std::thread::spawn(move || {
            if let Ok(status) = child.wait() {
                let _ = exit_tx.send(status);
            }
        });

        let mut server = Server {
            dir,
            config_path,
            pid,
            client: SocketAddr::from(([127, 0, 0, 1], 0)),
            admin: SocketAddr::from(([127, 0, 0, 1], 0)),
            secret,
            api_key,
            lines: Mutex::new(line_rx),
            log: Mutex::new(Vec::new()),
            exit_rx: Mutex::new(exit_rx),
            exited: Mutex::new(None),
        };
        let line = server
            .wait_log("listening client=", START_TIMEOUT)
            .unwrap_or_else(|| panic!("no `listening` line from ringpush; log:\n{}", server.log()));
        let field = |name: &str| -> SocketAddr {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(name))
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("no {name}ADDR in {line:?}"))
        };
        server.client = field("client=");
        server.admin = field("admin=");
        server.wait_ready();
        server
    }

    /// Polls `/readyz` until it answers 200 (bounded by `START_TIMEOUT`).
    fn wait_ready(&self) {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(resp) = try_http(self.admin, "GET", "/readyz", &[], None) {
                if resp.status == 200 {
                    return;
                }
            }
            if let Some(status) = self.wait_exit(Duration::ZERO) {
                panic!("ringpush exited ({status}) before it was ready; log:\n{}", self.log());
            }
            assert!(Instant::now() < deadline, "/readyz never answered 200; log:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn client_addr(&self) -> SocketAddr {
        self.client
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn api_key(&self) -> &str {
        &self.api_key
    }

    /// A client token signed with the server's `auth.secret`, valid for `ttl_secs`.
    pub fn token(&self, user: &str, device: &str, ttl_secs: u64) -> String {
        ringpush::auth::mint(&self.secret, user, device, ttl_secs).expect("mint token")
    }

    /// `ws://<client addr><path_and_query>`.
    pub fn ws_url(&self, path_and_query: &str) -> String {
        format!("ws://{}{}", self.client, path_and_query)
    }

    /// `ws://.../ws?token=...` for a fresh one-hour token of `user` on `device`.
    pub fn ws_url_for(&self, user: &str, device: &str) -> String {
        self.ws_url(&format!("/ws?token={}", self.token(user, device, 3600)))
    }

    /// Moves stderr lines that have arrived into the log; waits up to `wait` for the first.
    fn pull_lines(&self, wait: Duration) -> bool {
        let rx = self.lines.lock().unwrap_or_else(|e| e.into_inner());
        let mut log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        let mut got = false;
        match rx.recv_timeout(wait) {
            Ok(line) => {
                log.push(line);
                got = true;
            }
            Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => {}
        }
        while let Ok(line) = rx.try_recv() {
            log.push(line);
            got = true;
        }
        got
    }

    /// The whole stderr of the server so far.
    pub fn log(&self) -> String {
        self.pull_lines(Duration::ZERO);
        self.log.lock().unwrap_or_else(|e| e.into_inner()).join("\n")
    }

    pub fn log_contains(&self, s: &str) -> bool {
        self.log().contains(s)
    }

    /// Waits until a log line containing `s` has been written; returns that line.
    pub fn wait_log(&self, s: &str, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        let mut checked = 0;
        loop {
            {
                let log = self.log.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(line) = log[checked..].iter().find(|l| l.contains(s)) {
                    return Some(line.clone());
                }
                checked = log.len();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            if !self.pull_lines(left.min(Duration::from_millis(200))) && self.has_exited() {
                // The reader may still hold the last lines; take them and look once more.
                self.pull_lines(Duration::from_millis(200));
                let log = self.log.lock().unwrap_or_else(|e| e.into_inner());
                return log[checked..].iter().find(|l| l.contains(s)).cloned();
            }
        }
    }

    fn has_exited(&self) -> bool {
        self.wait_exit(Duration::ZERO).is_some()
    }

    /// Sends SIGTERM (a graceful drain).
    pub fn sigterm(&self) {
        self.signal(libc::SIGTERM);
    }

    /// Kills the process outright (SIGKILL) and waits for it to be gone.
    pub fn kill(&self) {
        self.signal(libc::SIGKILL);
        assert!(self.wait_exit(Duration::from_secs(5)).is_some(), "SIGKILL did not end pid {}", self.pid);
    }

    /// Stops the process (SIGSTOP): it keeps its sockets but runs nothing.
    pub fn pause(&self) {
        self.signal(libc::SIGSTOP);
    }

    /// Lets a stopped process run again (SIGCONT).
    pub fn resume(&self) {
        self.signal(libc::SIGCONT);
    }

    fn signal(&self, signal: libc::c_int) {
        // SAFETY: kill(2) touches no memory of ours. The pid is our child's: the waiter
        // thread reaps it only once it has exited, and a pid is not reused within moments.
        let rc = unsafe { libc::kill(self.pid as libc::pid_t, signal) };
        assert_eq!(rc, 0, "kill({}, {signal}) failed: {}", self.pid, io::Error::last_os_error());
    }

    /// The exit status, once the process has exited; waits up to `timeout` for it.
    pub fn wait_exit(&self, timeout: Duration) -> Option<ExitStatus> {
        let mut exited = self.exited.lock().unwrap_or_else(|e| e.into_inner());
        if exited.is_none() {
            let rx = self.exit_rx.lock().unwrap_or_else(|e| e.into_inner());
            *exited = rx.recv_timeout(timeout).ok();
        }
        *exited
    }

    // --- admin API ---

    /// An admin request with `Authorization: Bearer <api_key>`.
    pub fn api(&self, method: &str, path: &str, body: Option<&str>) -> HttpResponse {
        http(self.admin, method, path, Some(&self.api_key), body)
    }

    /// An admin request without credentials.
    pub fn admin_get(&self, path: &str) -> HttpResponse {
        http(self.admin, "GET", path, None, None)
    }

    /// Polls an unauthenticated admin path until it answers `status` (bounded).
    pub fn wait_status(&self, path: &str, status: u16, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let got = try_http(self.admin, "GET", path, &[], None).map(|r| r.status).ok();
            if got == Some(status) {
                return;
            }
            assert!(Instant::now() < deadline, "{path} answered {got:?}, not {status}, within {timeout:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The `/metrics` text.
    pub fn metrics(&self) -> String {
        let resp = self.admin_get("/metrics");
        assert_eq!(resp.status, 200, "/metrics: {resp:?}");
        resp.body
    }

    /// The sum of every series named `name` (any labels), or of one series when `name`
    /// carries labels (`ringpush_connections{shard="0"}`). 0 when absent.
    pub fn metric(&self, name: &str) -> u64 {
        metric_value(&self.metrics(), name)
    }

    /// Polls `/metrics` until `metric(name)` satisfies `ok`; returns the last value seen.
    /// Panics with the metrics text after `timeout`.
    pub fn wait_metric(&self, name: &str, timeout: Duration, ok: impl Fn(u64) -> bool) -> u64 {
        let deadline = Instant::now() + timeout;
        loop {
            let text = self.metrics();
            let value = metric_value(&text, name);
            if ok(value) {
                return value;
            }
            assert!(
                Instant::now() < deadline,
                "{name} = {value} did not reach the expected value within {timeout:?}; metrics:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.wait_exit(Duration::ZERO).is_none() {
            // No assert here: a failure would panic inside a panic. The process may also
            // have exited just now, which is fine.
            // SAFETY: as in `signal`.
            unsafe { libc::kill(self.pid as libc::pid_t, libc::SIGKILL) };
            self.wait_exit(Duration::from_secs(5));
        }
        if std::thread::panicking() {
            // The reader thread ends at the process's EOF; take what it still has.
            while self.pull_lines(Duration::from_millis(200)) {}
            eprintln!("---- ringpush log (pid {}) ----\n{}\n---- end of log ----", self.pid, self.log());
        }
    }
}

/// The value of `name` in a Prometheus text: the sum over all its series, or the one series
/// when `name` includes labels.
pub fn metric_value(text: &str, name: &str) -> u64 {
    let with_labels = name.contains('{');
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let matches = if with_labels {
                series == name
            } else {
                series == name || series.strip_prefix(name).is_some_and(|rest| rest.starts_with('{'))
            };
            matches.then(|| value.trim().parse::<f64>().ok()).flatten()
        })
        .map(|v| v as u64)
        .sum()
}

// ---------------------------------------------------------------------------------------
// A tiny blocking HTTP/1.1 client
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: u16,
    /// Status line and headers, CRLF-separated, without the blank line.
    pub head: String,
    pub body: String,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<String> {
        header_value(&self.head, name)
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("body is not JSON ({e}): {self:?}"))
    }
}

/// One request with `Connection: close`; the response is read to EOF.
pub fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    bearer: Option<&str>,
    body: Option<&str>,
) -> HttpResponse {
    let auth = bearer.map(|key| format!("Bearer {key}"));
    let mut headers = Vec::new();
    if let Some(auth) = &auth {
        headers.push(("Authorization", auth.as_str()));
    }
    try_http(addr, method, path, &headers, body)
        .unwrap_or_else(|e| panic!("{method} http://{addr}{path} failed: {e}"))
}

pub fn try_http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> io::Result<HttpResponse> {
    let mut stream = raw_connect_io(addr)?;
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (name, value) in headers {
        req.push_str(&format!("{name}: {value}\r\n"));
    }
    if let Some(body) = body {
        req.push_str(&format!("Content-Type: application/json\r\nContent-Length: {}\r\n", body.len()));
    }
    req.push_str("\r\n");
    req.push_str(body.unwrap_or(""));
    stream.write_all(req.as_bytes())?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    parse_response(&raw).ok_or_else(|| io::Error::other(format!("not an HTTP response: {raw:?}")))
}

fn parse_response(raw: &[u8]) -> Option<HttpResponse> {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some(HttpResponse { status, head: head.to_owned(), body: body.to_owned() })
}

/// The value of header `name` (case-insensitive) in a response head.
pub fn header_value(head: &str, name: &str) -> Option<String> {
    head.lines().skip(1).find_map(|line| {
        let (n, v) = line.split_once(':')?;
        n.trim().eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
    })
}

// ---------------------------------------------------------------------------------------
// Raw sockets
// ---------------------------------------------------------------------------------------

fn raw_connect_io(addr: SocketAddr) -> io::Result<TcpStream> {
    let stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// A TCP connection with read and write timeouts of `IO_TIMEOUT`.
pub fn raw_connect(addr: SocketAddr) -> TcpStream {
    raw_connect_io(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"))
}

/// A well-formed upgrade request for `path_and_query` with the RFC 6455 example key, plus
/// `extra_headers` (each `"Name: value"`).
pub fn upgrade_request(path_and_query: &str, extra_headers: &[&str]) -> String {
    let mut req = format!(
        "GET {path_and_query} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: {RFC_KEY}\r\nSec-WebSocket-Version: 13\r\n"
    );
    for h in extra_headers {
        req.push_str(h);
        req.push_str("\r\n");
    }
    req.push_str("\r\n");
    req
}

/// Reads a response head byte by byte (so no WebSocket byte after it is consumed).
/// Returns the status and the head; panics on EOF or timeout before the blank line.
pub fn read_response_head(stream: &mut TcpStream) -> (u16, String) {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match stream.read(&mut byte) {
            Ok(0) => panic!("EOF before the end of the response head: {:?}", String::from_utf8_lossy(&head)),
            Ok(_) => head.push(byte[0]),
            Err(e) => panic!("reading the response head: {e}; got {:?}", String::from_utf8_lossy(&head)),
        }
        assert!(head.len() < 16 * 1024, "response head too long");
    }
    let head = String::from_utf8_lossy(&head[..head.len() - 4]).into_owned();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line in {head:?}"));
    (status, head)
}

/// Sends `request` as is and reads the whole response (the server closes after a refusal).
pub fn raw_http(addr: SocketAddr, request: &[u8]) -> HttpResponse {
    let mut stream = raw_connect(addr);
    stream.write_all(request).expect("send request");
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
            // A reset after the whole response (unread request bytes) still ends it.
            Err(e) if !raw.is_empty() && e.kind() == io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("reading the response to {:?}: {e}", String::from_utf8_lossy(request)),
        }
    }
    parse_response(&raw)
        .unwrap_or_else(|| panic!("not an HTTP response: {:?}", String::from_utf8_lossy(&raw)))
}

/// Upgrades a raw connection on `path_and_query`, asserting the 101.
pub fn raw_upgrade(addr: SocketAddr, path_and_query: &str) -> TcpStream {
    let mut stream = raw_connect(addr);
    stream.write_all(upgrade_request(path_and_query, &[]).as_bytes()).expect("send upgrade");
    let (status, head) = read_response_head(&mut stream);
    assert_eq!(status, 101, "upgrade of {path_and_query} refused: {head}");
    stream
}

/// One frame as it goes on the wire: first byte `b0` (FIN, RSV, opcode), the payload
/// masked with `mask` when there is one.
pub fn encode_frame(b0: u8, mask: Option<[u8; 4]>, payload: &[u8]) -> Vec<u8> {
    let mask_bit = if mask.is_some() { 0x80 } else { 0 };
    let mut f = vec![b0];
    match payload.len() {
        n if n < 126 => f.push(mask_bit | n as u8),
        n if n <= 0xffff => {
            f.push(mask_bit | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(mask_bit | 127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    match mask {
        Some(m) => {
            f.extend_from_slice(&m);
            f.extend(payload.iter().enumerate().map(|(i, b)| b ^ m[i % 4]));
        }
        None => f.extend_from_slice(payload),
    }
    f
}

/// A masked client frame, as RFC 6455 requires of clients.
pub fn client_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    let b0 = if fin { 0x80 } else { 0 } | (opcode & 0x0f);
    encode_frame(b0, Some([0x37, 0xfa, 0x21, 0x3d]), payload)
}

/// A masked client close frame with `code`.
pub fn client_close(code: u16, reason: &str) -> Vec<u8> {
    let mut payload = code.to_be_bytes().to_vec();
    payload.extend_from_slice(reason.as_bytes());
    client_frame(true, OP_CLOSE, &payload)
}

/// A frame read from the server.
#[derive(Debug, Clone)]
pub struct RawFrame {
    pub fin: bool,
    /// The three RSV bits, in the low bits.
    pub rsv: u8,
    pub opcode: u8,
    pub masked: bool,
    pub payload: Vec<u8>,
}

impl RawFrame {
    /// The code of a close frame (1005 when it has no payload).
    pub fn close_code(&self) -> u16 {
        assert_eq!(self.opcode, OP_CLOSE, "not a close frame: {self:?}");
        match self.payload.as_slice() {
            [a, b, ..] => u16::from_be_bytes([*a, *b]),
            _ => 1005,
        }
    }
}

fn read_exact_or_eof(stream: &mut TcpStream, buf: &mut [u8]) -> io::Result<bool> {
    let mut at = 0;
    while at < buf.len() {
        match stream.read(&mut buf[at..])? {
            0 if at == 0 => return Ok(false),
            0 => return Err(io::ErrorKind::UnexpectedEof.into()),
            n => at += n,
        }
    }
    Ok(true)
}

/// Reads one frame; `Ok(None)` at a clean EOF between frames.
pub fn read_frame(stream: &mut TcpStream) -> io::Result<Option<RawFrame>> {
    let mut h = [0u8; 2];
    if !read_exact_or_eof(stream, &mut h)? {
        return Ok(None);
    }
    let mut len = (h[1] & 0x7f) as u64;
    if len == 126 {
        let mut b = [0u8; 2];
        read_exact_or_eof(stream, &mut b)?;
        len = u16::from_be_bytes(b) as u64;
    } else if len == 127 {
        let mut b = [0u8; 8];
        read_exact_or_eof(stream, &mut b)?;
        len = u64::from_be_bytes(b);
    }
    let masked = h[1] & 0x80 != 0;
    let mut mask = [0u8; 4];
    if masked {
        read_exact_or_eof(stream, &mut mask)?;
    }
    assert!(len <= 16 << 20, "absurd frame length {len}");
    let mut payload = vec![0u8; len as usize];
    if len > 0 && !read_exact_or_eof(stream, &mut payload)? {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    if masked {
        payload.iter_mut().enumerate().for_each(|(i, b)| *b ^= mask[i % 4]);
    }
    Ok(Some(RawFrame {
        fin: h[0] & 0x80 != 0,
        rsv: (h[0] >> 4) & 0x07,
        opcode: h[0] & 0x0f,
        masked,
        payload,
    }))
}

/// Reads frames until the first one that is not a ping (server heartbeats are skipped).
pub fn read_frame_skip_pings(stream: &mut TcpStream) -> RawFrame {
    loop {
        match read_frame(stream) {
            Ok(Some(f)) if f.opcode == OP_PING => continue,
            Ok(Some(f)) => return f,
            Ok(None) => panic!("EOF while waiting for a frame"),
            Err(e) => panic!("reading a frame: {e}"),
        }
    }
}

/// Reads frames until a close frame arrives and returns it; other frames (hello, pings)
/// are skipped. Panics on EOF or timeout first.
pub fn read_until_close(stream: &mut TcpStream) -> RawFrame {
    loop {
        match read_frame(stream) {
            Ok(Some(f)) if f.opcode == OP_CLOSE => return f,
            Ok(Some(_)) => continue,
            Ok(None) => panic!("EOF without a close frame"),
            Err(e) => panic!("reading until a close frame: {e}"),
        }
    }
}

/// Reads and discards until the server ends the stream (EOF, or a reset), within
/// `timeout`. Returns how long that took, or `Err` with what happened instead.
pub fn wait_eof(stream: &mut TcpStream, timeout: Duration) -> Result<Duration, String> {
    let start = Instant::now();
    let deadline = start + timeout;
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!("the stream was still open after {timeout:?}"));
        }
        stream.set_read_timeout(Some(left)).map_err(|e| e.to_string())?;
        match stream.read(&mut buf) {
            Ok(0) => return Ok(start.elapsed()),
            Ok(_) => continue,
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => continue,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return Ok(start.elapsed()),
        }
    }
}

/// Reads every frame until the server ends the stream (EOF or reset), within `timeout`.
/// Returns the frames and how long it took; `Err` if the stream is still open at the end.
pub fn frames_until_eof(
    stream: &mut TcpStream,
    timeout: Duration,
) -> Result<(Vec<RawFrame>, Duration), String> {
    let start = Instant::now();
    let deadline = start + timeout;
    let mut frames = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!("the stream was still open after {timeout:?}; frames: {frames:?}"));
        }
        stream.set_read_timeout(Some(left)).map_err(|e| e.to_string())?;
        match read_frame(stream) {
            Ok(Some(f)) => frames.push(f),
            Ok(None) => return Ok((frames, start.elapsed())),
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                return Err(format!("the stream was still open after {timeout:?}; frames: {frames:?}"))
            }
            Err(_) => return Ok((frames, start.elapsed())),
        }
    }
}

// ---------------------------------------------------------------------------------------
// WebSocket clients (tungstenite, blocking)
// ---------------------------------------------------------------------------------------

pub type Ws = WebSocket<TcpStream>;

/// Connects with tungstenite; `Err` carries tungstenite's error (`Error::Http` holds a
/// refusal's response).
pub fn try_connect(req: impl IntoClientRequest) -> Result<(Ws, Response), tungstenite::Error> {
    let req = req.into_client_request()?;
    let uri = req.uri();
    let host = uri.host().expect("URL without a host");
    let port = uri.port_u16().unwrap_or(80);
    let addr: SocketAddr = format!("{host}:{port}").parse().expect("tests use IP:PORT URLs");
    let stream = raw_connect_io(addr)?;
    tungstenite::client(req, stream).map_err(|e| match e {
        tungstenite::HandshakeError::Failure(e) => e,
        tungstenite::HandshakeError::Interrupted(_) => tungstenite::Error::Io(io::ErrorKind::TimedOut.into()),
    })
}

/// Connects or panics.
pub fn connect(url: &str) -> Ws {
    match try_connect(url) {
        Ok((ws, _)) => ws,
        Err(tungstenite::Error::Http(resp)) => {
            let body = resp.body().as_deref().map(String::from_utf8_lossy).unwrap_or_default();
            panic!("upgrade of {url} refused: {} {body}", resp.status())
        }
        Err(e) => panic!("connect {url}: {e}"),
    }
}

/// Connects to `/ws` as `user`/`device` and reads the `hello`, which is returned.
pub fn connect_client(server: &Server, user: &str, device: &str) -> (Ws, serde_json::Value) {
    let mut ws = connect(&server.ws_url_for(user, device));
    let hello = read_json(&mut ws);
    assert_eq!(hello["op"], "hello", "first frame is not hello: {hello}");
    (ws, hello)
}

/// The next message that is not a ping or pong (tungstenite answers pings itself while
/// reading).
pub fn read_message(ws: &mut Ws) -> Message {
    // The socket's read timeout bounds each read; this bounds a run of heartbeats too.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match ws.read() {
            Ok(Message::Ping(_)) | Ok(Message::Pong(_)) => {
                assert!(Instant::now() < deadline, "no message within 5 s, only heartbeats");
                continue;
            }
            Ok(msg) => return msg,
            Err(e) => panic!("reading a message: {e}"),
        }
    }
}

/// The next text message, parsed as JSON (pings and pongs skipped).
pub fn read_json(ws: &mut Ws) -> serde_json::Value {
    match read_message(ws) {
        Message::Text(text) => serde_json::from_str(text.as_str())
            .unwrap_or_else(|e| panic!("server text is not JSON ({e}): {}", text.as_str())),
        other => panic!("expected a JSON text message, got {other:?}"),
    }
}

/// Sends a text message.
pub fn send_text(ws: &mut Ws, text: &str) {
    ws.send(Message::text(text)).unwrap_or_else(|e| panic!("send {text:?}: {e}"));
}

/// Reads until the server's close frame and returns it (skipping data messages, pings
/// and pongs). tungstenite queues the close reply; it goes out on the next read.
pub fn read_close(ws: &mut Ws) -> Option<CloseFrame> {
    loop {
        match ws.read() {
            Ok(Message::Close(frame)) => return frame,
            Ok(_) => continue,
            Err(e) => panic!("reading until the close frame: {e}"),
        }
    }
}

/// After the close frame: reads until tungstenite reports the connection closed (this also
/// sends the queued close reply). Panics if the server does not end the stream within
/// `timeout`.
pub fn finish_close(ws: &mut Ws, timeout: Duration) {
    ws.get_mut().set_read_timeout(Some(timeout)).expect("set timeout");
    loop {
        match ws.read() {
            Ok(_) => continue,
            Err(tungstenite::Error::ConnectionClosed) | Err(tungstenite::Error::AlreadyClosed) => return,
            Err(tungstenite::Error::Io(e))
                if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) =>
            {
                panic!("the server did not end the connection within {timeout:?}")
            }
            Err(_) => return,
        }
    }
}

/// The close code of a tungstenite close frame.
pub fn code_of(frame: &Option<CloseFrame>) -> u16 {
    frame.as_ref().map(|f| u16::from(f.code)).unwrap_or(1005)
}

// ---------------------------------------------------------------------------------------
// The IM layer: conversations through the admin API, `send` and `sync` over /ws
// ---------------------------------------------------------------------------------------

/// The shard that owns a conversation or a user, as the server routes it: 64-bit FNV-1a
/// of the key modulo the shard count. Tests use it to pick ids with the owners they need.
pub fn owner_shard(key: &str, shards: usize) -> usize {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (h % shards.max(1) as u64) as usize
}

/// The first id `prefix0`, `prefix1`, ... whose owner among `shards` is `shard`.
pub fn id_on_shard(prefix: &str, shard: usize, shards: usize) -> String {
    (0..1000)
        .map(|i| format!("{prefix}{i}"))
        .find(|id| owner_shard(id, shards) == shard)
        .expect("some id hashes to every shard")
}

impl Server {
    /// An admin call that must answer `status`; returns its JSON body.
    pub fn api_expect(&self, method: &str, path: &str, body: Option<&str>, status: u16) -> serde_json::Value {
        let resp = self.api(method, path, body);
        assert_eq!(resp.status, status, "{method} {path} {body:?}: {resp:?}");
        assert!(
            resp.header("content-type").is_some_and(|c| c.starts_with("application/json")),
            "{method} {path}: not JSON: {resp:?}"
        );
        resp.json()
    }

    /// `PUT /api/v1/conversations/{conv}/members`: `users` become the members of `conv`.
    pub fn set_members(&self, conv: &str, users: &[&str]) {
        let body = serde_json::json!({ "users": users }).to_string();
        let answer =
            self.api_expect("PUT", &format!("/api/v1/conversations/{conv}/members"), Some(&body), 200);
        assert_eq!(answer, serde_json::json!({ "conv": conv, "members": users.len() }));
    }

    /// `POST /api/v1/conversations/{conv}/messages`; returns the seq assigned.
    pub fn post_message(&self, conv: &str, from: &str, body: &serde_json::Value) -> u64 {
        let req = serde_json::json!({ "from": from, "body": body }).to_string();
        let answer =
            self.api_expect("POST", &format!("/api/v1/conversations/{conv}/messages"), Some(&req), 200);
        assert_eq!(answer["conv"], conv, "{answer}");
        answer["seq"].as_u64().unwrap_or_else(|| panic!("no seq in {answer}"))
    }

    /// `GET /api/v1/conversations/{conv}`.
    pub fn conversation(&self, conv: &str) -> serde_json::Value {
        self.api_expect("GET", &format!("/api/v1/conversations/{conv}"), None, 200)
    }

    /// `GET /api/v1/presence/{user}`: the `devices` list.
    pub fn presence(&self, user: &str) -> Vec<serde_json::Value> {
        let answer = self.api_expect("GET", &format!("/api/v1/presence/{user}"), None, 200);
        assert_eq!(answer["user"], user, "{answer}");
        answer["devices"].as_array().unwrap_or_else(|| panic!("no devices list in {answer}")).clone()
    }

    /// Polls presence (presence is registered and removed asynchronously) until `ok`
    /// holds for the device list; returns that list. Panics after `timeout`.
    pub fn wait_presence(
        &self,
        user: &str,
        timeout: Duration,
        ok: impl Fn(&[serde_json::Value]) -> bool,
    ) -> Vec<serde_json::Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let devices = self.presence(user);
            if ok(&devices) {
                return devices;
            }
            assert!(Instant::now() < deadline, "presence of {user} still {devices:?} after {timeout:?}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Sends one JSON frame.
pub fn send_json(ws: &mut Ws, frame: &serde_json::Value) {
    send_text(ws, &frame.to_string());
}

/// `{"op":"send","conv":conv,"cid":cid,"body":body}`.
pub fn send_msg(ws: &mut Ws, conv: &str, cid: &str, body: &serde_json::Value) {
    send_json(ws, &serde_json::json!({ "op": "send", "conv": conv, "cid": cid, "body": body }));
}

/// Sends into `conv` and reads the answer, which must be the `ack` for `cid`; returns it.
/// Only for a connection that gets no other traffic meanwhile.
pub fn send_acked(ws: &mut Ws, conv: &str, cid: &str, body: &serde_json::Value) -> serde_json::Value {
    send_msg(ws, conv, cid, body);
    let ack = read_json(ws);
    assert_eq!(
        (ack["op"].as_str(), ack["conv"].as_str(), ack["cid"].as_str()),
        (Some("ack"), Some(conv), Some(cid)),
        "{ack}"
    );
    ack
}

/// Reads the next JSON frame and asserts its `op`.
pub fn read_op(ws: &mut Ws, op: &str) -> serde_json::Value {
    let frame = read_json(ws);
    assert_eq!(frame["op"], op, "expected {op}, got {frame}");
    frame
}

/// Reads JSON frames until one satisfies `last` and returns them all, that one included.
pub fn read_until(ws: &mut Ws, last: impl Fn(&serde_json::Value) -> bool) -> Vec<serde_json::Value> {
    let mut frames = Vec::new();
    loop {
        let frame = read_json(ws);
        let done = last(&frame);
        frames.push(frame);
        if done {
            return frames;
        }
    }
}

/// What a `sync` brought: the replayed `msg` frames of the conversation, any other frame
/// that arrived meanwhile, and the `synced` frame.
#[derive(Debug)]
pub struct SyncResult {
    pub msgs: Vec<serde_json::Value>,
    pub other: Vec<serde_json::Value>,
    pub synced: serde_json::Value,
}

impl SyncResult {
    pub fn seqs(&self) -> Vec<u64> {
        seqs(&self.msgs)
    }
}

/// Sends `sync` for `conv` after `after` (and `limit` when given) and reads until its
/// `synced`. An `error` frame instead is a panic: use `send_json` for syncs that must fail.
pub fn sync(ws: &mut Ws, conv: &str, after: u64, limit: Option<u64>) -> SyncResult {
    let mut req = serde_json::json!({ "op": "sync", "conv": conv, "after": after });
    if let Some(limit) = limit {
        req["limit"] = limit.into();
    }
    send_json(ws, &req);
    let mut msgs = Vec::new();
    let mut other = Vec::new();
    loop {
        let frame = read_json(ws);
        match frame["op"].as_str() {
            Some("synced") if frame["conv"] == conv => return SyncResult { msgs, other, synced: frame },
            Some("msg") if frame["conv"] == conv => msgs.push(frame),
            Some("error") => panic!("sync {conv} after {after} answered {frame}"),
            _ => other.push(frame),
        }
    }
}

/// Connects as `user`/`device`, reads the `hello` and syncs each of `convs` after 0, so
/// the connection's live path is in place for all of them (PROTOCOL.md: clients `sync`
/// after `hello`). Every sync must be complete and replay nothing: for fresh conversations.
pub fn connect_synced(server: &Server, user: &str, device: &str, convs: &[&str]) -> (Ws, serde_json::Value) {
    let (mut ws, hello) = connect_client(server, user, device);
    for conv in convs {
        let result = sync(&mut ws, conv, 0, None);
        let replayed = result.seqs();
        assert!(replayed.is_empty(), "{user}/{device}: sync {conv} replayed {replayed:?}");
        assert!(result.other.is_empty(), "{user}/{device}: sync {conv} brought {:?}", result.other);
        assert_eq!(result.synced["complete"], true, "{user}/{device}: {}", result.synced);
    }
    (ws, hello)
}

/// The `seq` of each frame (panics on a frame without one).
pub fn seqs(frames: &[serde_json::Value]) -> Vec<u64> {
    frames.iter().map(|f| f["seq"].as_u64().unwrap_or_else(|| panic!("no seq in {f}"))).collect()
}

/// A TCP connection whose receive buffer is set to `rcvbuf` bytes before it connects, so
/// the kernel cannot hide a client that stops reading (the window stays that small).
pub fn connect_small_rcvbuf(addr: SocketAddr, rcvbuf: usize) -> TcpStream {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    socket.set_recv_buffer_size(rcvbuf).expect("SO_RCVBUF");
    socket.connect_timeout(&addr.into(), IO_TIMEOUT).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    let stream: TcpStream = socket.into();
    stream.set_read_timeout(Some(IO_TIMEOUT)).expect("set timeout");
    stream.set_write_timeout(Some(IO_TIMEOUT)).expect("set timeout");
    stream.set_nodelay(true).expect("nodelay");
    stream
}

/// Like `connect_client`, over a socket with a small receive buffer (`connect_small_rcvbuf`).
pub fn connect_client_small_rcvbuf(
    server: &Server,
    user: &str,
    device: &str,
    rcvbuf: usize,
) -> (Ws, serde_json::Value) {
    let stream = connect_small_rcvbuf(server.client_addr(), rcvbuf);
    let url = server.ws_url_for(user, device);
    let (mut ws, _) =
        tungstenite::client(url.as_str(), stream).unwrap_or_else(|e| panic!("upgrade {url}: {e}"));
    let hello = read_json(&mut ws);
    assert_eq!(hello["op"], "hello", "first frame is not hello: {hello}");
    (ws, hello)
}

/// TOML `layers` merged in order (a later layer's keys replace an earlier one's; sections
/// are merged key by key), as one TOML text for `Server::start`.
pub fn merge_toml(layers: &[&str]) -> String {
    let mut table = toml::Table::new();
    for layer in layers {
        merge(&mut table, layer.parse().unwrap_or_else(|e| panic!("TOML layer {layer:?}: {e}")));
    }
    table.to_string()
}

/// Wall-clock unix milliseconds (to bound the server's `ts` and `since`).
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Connects devices `{device}-0`, `{device}-1`, ... of `user` (reading each `hello`) until
/// the user has at least `min` connections and one on every shard, going by the
/// `ringpush_connections` gauges. No other client may connect meanwhile.
pub fn connect_spread(
    server: &Server,
    user: &str,
    device: &str,
    shards: usize,
    min: usize,
) -> Vec<(Ws, serde_json::Value)> {
    let gauges = || -> Vec<u64> {
        let text = server.metrics();
        (0..shards).map(|s| metric_value(&text, &format!("ringpush_connections{{shard=\"{s}\"}}"))).collect()
    };
    let before = gauges();
    let mut clients = Vec::new();
    loop {
        clients.push(connect_client(server, user, &format!("{device}-{}", clients.len())));
        let now = gauges();
        if clients.len() >= min && now.iter().zip(&before).all(|(n, b)| n > b) {
            return clients;
        }
        assert!(
            clients.len() < 32,
            "{} connections of {user} did not reach every shard: {now:?}",
            clients.len()
        );
    }
}
