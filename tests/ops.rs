//! Tests of the operations artifacts, each against the real thing: nginx with the shipped
//! site files in front of a real ringpush (ws and wss, the client address it records), the
//! systemd unit through `systemd-analyze` and the notify protocol over a real datagram
//! socket, the example configuration through `ringpush check-config`, and the tuning
//! scripts against this host's kernel (read only) and against a copy of `/proc/sys`.
//!
//! nginx, openssl and systemd-analyze must be installed (`scripts/test` installs them);
//! a test fails, not skips, without them. Nothing here changes the host: `apply.sh` only
//! runs with `--dry-run` or against a copy of `/proc/sys`.

mod common;

use std::collections::BTreeSet;
use std::fs::File;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;
use tungstenite::client::IntoClientRequest;
use tungstenite::http::HeaderValue;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::CloseFrame;

/// How long nginx has to accept on its port once started.
const NGINX_START: Duration = Duration::from_secs(10);

/// What ringpush.service sets, and what the tuning and the example config must agree with.
const LIMIT_NOFILE: u64 = 1_048_576;

// ---------------------------------------------------------------------------------------
// Repository files and programs
// ---------------------------------------------------------------------------------------

fn repo_path(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

fn repo_file(relative: &str) -> String {
    std::fs::read_to_string(repo_path(relative)).unwrap_or_else(|e| panic!("read {relative}: {e}"))
}

/// The path of `name`: on `PATH`, or in the sbin directories a non-root `PATH` lacks.
fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// Like `find_program`, for programs the tests cannot do without.
fn program(name: &str) -> PathBuf {
    find_program(name).unwrap_or_else(|| panic!("{name} is not installed (scripts/test installs it)"))
}

/// Runs `cmd` to completion; its output.
fn run(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null()).output().unwrap_or_else(|e| panic!("run {cmd:?}: {e}"))
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `text` with `from` replaced by `to`, which must occur exactly once: the tests rewrite
/// the shipped files only where an operator would edit them, and fail loudly when a file
/// changes shape.
fn replace_once(text: &str, from: &str, to: &str) -> String {
    let count = text.matches(from).count();
    assert_eq!(count, 1, "expected exactly one {from:?} in the shipped file, found {count}");
    text.replacen(from, to, 1)
}

/// `text` without the one line that contains `needle`.
fn drop_line(text: &str, needle: &str) -> String {
    let count = text.lines().filter(|l| l.contains(needle)).count();
    assert_eq!(count, 1, "expected exactly one line with {needle:?}, found {count}");
    text.lines().filter(|l| !l.contains(needle)).map(|l| format!("{l}\n")).collect()
}

// ---------------------------------------------------------------------------------------
// Child processes other than the harness's ringpush servers
// ---------------------------------------------------------------------------------------

/// A child process whose stderr (and stdout, unless the caller has a use for it) goes to
/// a log file. On drop it gets SIGTERM and a few seconds to exit (nginx's master stops its
/// workers then), else SIGKILL for it and its children.
struct Proc {
    name: String,
    pid: u32,
    log: PathBuf,
    exit_rx: Mutex<Receiver<ExitStatus>>,
    exited: Mutex<Option<ExitStatus>>,
}

impl Proc {
    /// Spawns `cmd` (consumed, so that no descriptor handed to the child stays open here),
    /// stdout and stderr to `log`.
    fn spawn(name: &str, mut cmd: Command, log: PathBuf) -> Proc {
        cmd.stdout(Stdio::from(append_to(&log)));
        Proc::spawn_keeping_stdout(name, cmd, log)
    }

    /// Spawns `cmd` with stderr to `log` and stdin and stdout as the caller set them.
    fn spawn_keeping_stdout(name: &str, mut cmd: Command, log: PathBuf) -> Proc {
        let err = append_to(&log);
        let mut child = cmd.stderr(Stdio::from(err)).spawn().unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        drop(cmd);
        let pid = child.id();
        let (exit_tx, exit_rx) = mpsc::channel();
        std::thread::spawn(move || {
            if let Ok(status) = child.wait() {
                let _ = exit_tx.send(status);
            }
        });
        Proc { name: name.to_owned(), pid, log, exit_rx: Mutex::new(exit_rx), exited: Mutex::new(None) }
    }

    /// The exit status, once the process has exited; waits up to `timeout` for it.
    fn wait_exit(&self, timeout: Duration) -> Option<ExitStatus> {
        let mut exited = self.exited.lock().unwrap_or_else(|e| e.into_inner());
        if exited.is_none() {
            let rx = self.exit_rx.lock().unwrap_or_else(|e| e.into_inner());
            *exited = rx.recv_timeout(timeout).ok();
        }
        *exited
    }

    /// Sends `signal` unless the process is known to have exited (its pid may be reused).
    fn signal(&self, signal: libc::c_int) {
        if self.wait_exit(Duration::ZERO).is_none() {
            // SAFETY: kill(2) touches no memory of ours; the pid is our child's, reaped only
            // by the waiter thread once it has exited.
            unsafe { libc::kill(self.pid as libc::pid_t, signal) };
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The log, headed with the process name, for failure messages.
    fn report(&self) -> String {
        format!(
            "---- {} (pid {}) log ----\n{}---- end of {} log ----",
            self.name,
            self.pid,
            self.log(),
            self.name
        )
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.wait_exit(Duration::ZERO).is_some() {
            return;
        }
        let children = children_of(self.pid);
        self.signal(libc::SIGTERM);
        if self.wait_exit(Duration::from_secs(5)).is_none() {
            for pid in children {
                // SAFETY: as in `signal`; these are the processes our child started.
                unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            }
            self.signal(libc::SIGKILL);
            self.wait_exit(Duration::from_secs(5));
        }
    }
}

/// `path` opened for appending (created when missing): stdout and stderr of a child both
/// append, so neither overwrites the other.
fn append_to(path: &Path) -> File {
    File::options().create(true).append(true).open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The processes whose parent is `parent` (nginx's workers), from /proc.
fn children_of(parent: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            // /proc/PID/stat: "pid (comm) state ppid ..."; comm may hold spaces.
            std::fs::read_to_string(format!("/proc/{pid}/stat")).ok().is_some_and(|stat| {
                stat.rsplit_once(')')
                    .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok())
                    == Some(parent)
            })
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// Sockets
// ---------------------------------------------------------------------------------------

/// A loopback port for nginx, which cannot report the port it bound: reserved for this
/// test process, below the ephemeral range (see `common::redis::free_port`).
fn free_port() -> u16 {
    common::redis::free_port()
}

/// A TCP connection to `to` from the local address `from` (127.0.0.2, ...: every
/// 127.0.0.0/8 address is local on Linux), with the harness's timeouts.
fn connect_from(from: Ipv4Addr, to: SocketAddr) -> TcpStream {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    socket.bind(&SocketAddr::from((from, 0)).into()).unwrap_or_else(|e| panic!("bind {from}: {e}"));
    socket
        .connect_timeout(&to.into(), IO_TIMEOUT)
        .unwrap_or_else(|e| panic!("connect {to} from {from}: {e}"));
    let stream: TcpStream = socket.into();
    stream.set_read_timeout(Some(IO_TIMEOUT)).expect("set timeout");
    stream.set_write_timeout(Some(IO_TIMEOUT)).expect("set timeout");
    stream.set_nodelay(true).expect("nodelay");
    stream
}

/// Polls until `addr` accepts a connection; panics with `proc`'s log if it exits first
/// or `timeout` passes.
fn wait_accepts(addr: SocketAddr, proc: &Proc, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return;
        }
        if let Some(status) = proc.wait_exit(Duration::ZERO) {
            panic!("{} exited ({status}) before accepting on {addr}\n{}", proc.name, proc.report());
        }
        assert!(Instant::now() < deadline, "{addr} did not accept within {timeout:?}\n{}", proc.report());
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Forwards one connection accepted on the returned loopback address to `to`, connecting
/// from `from`: lets `openssl s_client`, which cannot choose its source address, reach
/// nginx from 127.0.0.2.
fn relay_from(from: Ipv4Addr, to: SocketAddr) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind relay");
    let addr = listener.local_addr().expect("relay address");
    std::thread::spawn(move || {
        let Ok((inbound, _)) = listener.accept() else { return };
        let outbound = connect_from(from, to);
        for stream in [&inbound, &outbound] {
            // The relay waits as long as the connection lives; the test bounds its own reads.
            let _ = stream.set_read_timeout(None);
        }
        let pipe = |mut src: TcpStream, mut dst: TcpStream| {
            std::thread::spawn(move || {
                let _ = io::copy(&mut src, &mut dst);
                let _ = dst.shutdown(std::net::Shutdown::Write);
            })
        };
        let (Ok(in2), Ok(out2)) = (inbound.try_clone(), outbound.try_clone()) else { return };
        pipe(inbound, outbound);
        pipe(out2, in2);
    });
    addr
}

// ---------------------------------------------------------------------------------------
// nginx with the shipped site files
// ---------------------------------------------------------------------------------------

/// A self-signed certificate for `localhost` (P-256), made with the openssl CLI.
fn self_signed_cert(dir: &TempDir) -> (PathBuf, PathBuf) {
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let out = run(Command::new(program("openssl"))
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"])
        .args(["-days", "2", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert));
    assert!(out.status.success(), "openssl req: {}", text(&out.stderr));
    (cert, key)
}

/// A shipped site file, edited where an operator would: the upstream server line, the
/// listen address (a free loopback port instead of 80/443; the IPv6 line dropped) and,
/// for TLS, the certificate paths.
fn site(file: &str, upstream: SocketAddr, listen: SocketAddr, tls: Option<(&Path, &Path)>) -> String {
    let shipped = repo_file(file);
    let mut site = replace_once(&shipped, "    server 127.0.0.1:8080;", &format!("    server {upstream};"));
    let port = if tls.is_some() { 443 } else { 80 };
    site = replace_once(&site, &format!("listen {port} "), &format!("listen {listen} "));
    site = drop_line(&site, &format!("listen [::]:{port} "));
    if let Some((cert, key)) = tls {
        site = replace_once(&site, "/etc/ssl/ringpush/fullchain.pem;", &format!("{};", cert.display()));
        site = replace_once(&site, "/etc/ssl/ringpush/privkey.pem;", &format!("{};", key.display()));
    }
    site
}

/// nginx (master and one worker) serving `site` from the http block of a complete
/// nginx.conf whose every path is in `dir`; returns once `listen` accepts.
fn start_nginx(dir: &TempDir, site: &str, listen: SocketAddr) -> Proc {
    let d = dir.path().display();
    dir.write("site.conf", site);
    let conf = dir.write(
        "nginx.conf",
        &format!(
            "daemon off;\nmaster_process on;\nworker_processes 1;\npid {d}/nginx.pid;\n\
             error_log {d}/error.log info;\nevents {{ worker_connections 256; }}\n\
             http {{\n    access_log {d}/access.log;\n    client_body_temp_path {d}/client_body;\n    \
             proxy_temp_path {d}/proxy;\n    fastcgi_temp_path {d}/fastcgi;\n    \
             uwsgi_temp_path {d}/uwsgi;\n    scgi_temp_path {d}/scgi;\n    include {d}/site.conf;\n}}\n"
        ),
    );
    let mut cmd = Command::new(program("nginx"));
    cmd.stdin(Stdio::null())
        .arg("-c")
        .arg(&conf)
        .arg("-p")
        .arg(dir.path())
        .arg("-e")
        .arg(dir.path().join("error.log"));
    let nginx = Proc::spawn("nginx", cmd, dir.path().join("nginx.out"));
    wait_accepts(listen, &nginx, NGINX_START);
    nginx
}

/// nginx's error log (the interesting one; `Proc::report` has only its stdout/stderr).
fn nginx_errors(dir: &TempDir) -> String {
    std::fs::read_to_string(dir.path().join("error.log")).unwrap_or_default()
}

/// An upgrade request for `url` with the extra headers a client might send.
fn request(url: &str, headers: &[(&'static str, &'static str)]) -> tungstenite::handshake::client::Request {
    let mut req = url.into_client_request().expect("request");
    for (name, value) in headers {
        req.headers_mut().insert(*name, HeaderValue::from_static(value));
    }
    req
}

/// Upgrades over `stream` (plain WebSocket bytes, whatever carries them further) and reads
/// the `hello`.
fn upgrade(
    req: tungstenite::handshake::client::Request,
    stream: TcpStream,
    context: &dyn Fn() -> String,
) -> Ws {
    let (mut ws, _) = tungstenite::client(req, stream)
        .unwrap_or_else(|e| panic!("WebSocket upgrade failed: {e}\n{}", context()));
    let hello = read_json(&mut ws);
    assert_eq!(hello["op"], "hello", "first frame: {hello}");
    ws
}

/// A WebSocket over TLS without a TLS crate: `openssl s_client` speaks TLS to `to`
/// (verifying the certificate against `ca` for the name localhost), and its stdin and
/// stdout are one end of a loopback TCP connection whose other end is returned, so the
/// test's client is an ordinary `Ws` over a `TcpStream`, with timeouts. s_client reaches
/// `to` through a relay that connects from `from`.
fn tls_pipe(to: SocketAddr, from: Ipv4Addr, ca: &Path, log: PathBuf) -> (TcpStream, Proc) {
    let relay = relay_from(from, to);
    let pair = TcpListener::bind("127.0.0.1:0").expect("bind pair");
    let ours = TcpStream::connect(pair.local_addr().expect("pair address")).expect("connect pair");
    let (theirs, _) = pair.accept().expect("accept pair");
    let mut cmd = Command::new(program("openssl"));
    cmd.args(["s_client", "-quiet", "-connect"])
        .arg(relay.to_string())
        .args(["-servername", "localhost", "-verify_hostname", "localhost", "-verify_return_error"])
        .args(["-alpn", "http/1.1", "-CAfile"])
        .arg(ca)
        .stdin(Stdio::from(std::os::fd::OwnedFd::from(theirs.try_clone().expect("clone pair"))))
        .stdout(Stdio::from(std::os::fd::OwnedFd::from(theirs)));
    let s_client = Proc::spawn_keeping_stdout("openssl s_client", cmd, log);
    ours.set_read_timeout(Some(IO_TIMEOUT)).expect("set timeout");
    ours.set_write_timeout(Some(IO_TIMEOUT)).expect("set timeout");
    ours.set_nodelay(true).expect("nodelay");
    (ours, s_client)
}

/// The client address ringpush records for `user`'s one connection (presence API).
fn recorded_ip(server: &Server, user: &str) -> String {
    let devices = server.wait_presence(user, IO_TIMEOUT, |d| d.len() == 1);
    devices[0]["ip"].as_str().unwrap_or_else(|| panic!("no ip in {devices:?}")).to_owned()
}

/// Traffic both ways through a proxied connection of `user`, a member of `conv`: a send
/// and its ack, then a message posted through the API, then a clean close.
fn exchange(server: &Server, ws: &mut Ws, user: &str, conv: &str) {
    let synced = sync(ws, conv, 0, None);
    assert!(synced.msgs.is_empty() && synced.synced["complete"] == true, "{synced:?}");
    let ack = send_acked(ws, conv, "ops-1", &json!({"text": "through nginx"}));
    assert_eq!(ack["seq"], 1, "{ack}");
    let seq = server.post_message(conv, "backend", &json!({"text": "to the device"}));
    let msg = read_op(ws, "msg");
    assert_eq!((msg["conv"].as_str(), msg["seq"].as_u64()), (Some(conv), Some(seq)), "{msg}");
    assert_eq!(msg["body"], json!({"text": "to the device"}), "{msg}");
    let bye = CloseFrame { code: CloseCode::Normal, reason: "bye".into() };
    ws.close(Some(bye)).unwrap_or_else(|e| panic!("{user}: close: {e}"));
    let frame = read_close(ws);
    assert_eq!(code_of(&frame), 1000, "{user}: {frame:?}");
    finish_close(ws, IO_TIMEOUT);
    server.wait_presence(user, IO_TIMEOUT, |d| d.is_empty());
}

/// ringpush trusts exactly the address nginx connects from; the clients of these tests
/// come from other loopback addresses, so any address they are recorded with that is not
/// 127.0.0.1 can only have come from nginx's headers. The idle timeout leaves room for the
/// extra hops (nginx, s_client, the relay) on a busy machine.
const BEHIND_NGINX: &str = "trusted_proxies = [\"127.0.0.1/32\"]\n[heartbeat]\nidle_timeout_ms = 5000\n";

#[test]
fn wss_through_nginx_tls_site_carries_traffic_and_the_client_address() {
    let server = Server::start(BEHIND_NGINX);
    server.set_members("ops-tls", &["tls-user"]);
    let dir = TempDir::new("nginx-tls");
    let (cert, key) = self_signed_cert(&dir);
    let listen = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let site = site("tuning/nginx/ringpush-tls.conf", server.client_addr(), listen, Some((&cert, &key)));
    let nginx = start_nginx(&dir, &site, listen);

    // The client connects from 127.0.0.2 and claims another address itself; nginx
    // replaces the header with the address it saw.
    let url =
        format!("wss://localhost:{}/ws?token={}", listen.port(), server.token("tls-user", "phone", 3600));
    let req = request(&url, &[("X-Forwarded-For", "203.0.113.9"), ("X-Real-IP", "203.0.113.9")]);
    let (stream, s_client) =
        tls_pipe(listen, Ipv4Addr::new(127, 0, 0, 2), &cert, dir.path().join("s_client.log"));
    let context =
        || format!("{}\n{}\nnginx error.log:\n{}", s_client.report(), nginx.report(), nginx_errors(&dir));
    let mut ws = upgrade(req, stream, &context);
    assert!(s_client.log().contains("verify return:1"), "the certificate was not verified\n{}", context());

    assert_eq!(recorded_ip(&server, "tls-user"), "127.0.0.2", "{}", context());
    exchange(&server, &mut ws, "tls-user", "ops-tls");
    assert!(s_client.wait_exit(IO_TIMEOUT).is_some(), "s_client still runs after the close\n{}", context());
}

#[test]
fn ws_through_nginx_plain_site_carries_traffic_refusals_and_the_client_address() {
    let server = Server::start(BEHIND_NGINX);
    server.set_members("ops-ws", &["ws-user"]);
    let dir = TempDir::new("nginx-ws");
    let listen = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let nginx =
        start_nginx(&dir, &site("tuning/nginx/ringpush.conf", server.client_addr(), listen, None), listen);
    let context = || format!("{}\nnginx error.log:\n{}", nginx.report(), nginx_errors(&dir));

    // A refusal before the upgrade comes back through nginx as ringpush sent it.
    let bad = format!("ws://{listen}/ws?token=not-a-token");
    match tungstenite::client(bad.as_str(), connect_from(Ipv4Addr::new(127, 0, 0, 2), listen)) {
        Err(tungstenite::HandshakeError::Failure(tungstenite::Error::Http(resp))) => {
            assert_eq!(resp.status(), 401, "{resp:?}\n{}", context())
        }
        other => panic!("a bad token through nginx: {:?}\n{}", other.map(|(_, r)| r), context()),
    }

    let url = format!("ws://{listen}/ws?token={}", server.token("ws-user", "laptop", 3600));
    let req = request(&url, &[("X-Forwarded-For", "203.0.113.9")]);
    let mut ws = upgrade(req, connect_from(Ipv4Addr::new(127, 0, 0, 2), listen), &context);
    assert_eq!(recorded_ip(&server, "ws-user"), "127.0.0.2", "{}", context());
    exchange(&server, &mut ws, "ws-user", "ops-ws");
}

#[test]
fn forwarded_headers_from_a_peer_outside_trusted_proxies_are_ignored() {
    let server = Server::start(BEHIND_NGINX);
    // Straight to ringpush from 127.0.0.3, not a trusted proxy: its headers are ignored.
    let url = server.ws_url_for("direct-user", "phone");
    let req = request(&url, &[("X-Forwarded-For", "198.51.100.7"), ("X-Real-IP", "198.51.100.7")]);
    let _ws = upgrade(req, connect_from(Ipv4Addr::new(127, 0, 0, 3), server.client_addr()), &String::new);
    assert_eq!(recorded_ip(&server, "direct-user"), "127.0.0.3");

    // The same headers from 127.0.0.1, the trusted proxy, are believed: the setting is
    // what makes the difference.
    let url = server.ws_url_for("proxied-user", "phone");
    let req = request(&url, &[("X-Forwarded-For", "198.51.100.7")]);
    let _ws = upgrade(req, connect_from(Ipv4Addr::LOCALHOST, server.client_addr()), &String::new);
    assert_eq!(recorded_ip(&server, "proxied-user"), "198.51.100.7");
}

// ---------------------------------------------------------------------------------------
// systemd
// ---------------------------------------------------------------------------------------

const SHIPPED_EXEC_START: &str = "ExecStart=/usr/bin/ringpush serve --config /etc/ringpush/ringpush.toml";

/// The `[Service]` settings of the unit, in order (a key may repeat).
fn service_settings(unit: &str) -> Vec<(String, String)> {
    let mut section = "";
    let mut settings = Vec::new();
    for line in unit.lines().map(str::trim) {
        if line.starts_with('[') {
            section = line;
        } else if section == "[Service]" && !line.starts_with('#') {
            if let Some((key, value)) = line.split_once('=') {
                settings.push((key.to_owned(), value.to_owned()));
            }
        }
    }
    settings
}

/// The system calls a `SystemCallFilter=` item stands for, groups expanded
/// (`systemd-analyze syscall-filter`).
fn syscalls(item: &str) -> BTreeSet<String> {
    if !item.starts_with('@') {
        return BTreeSet::from([item.to_owned()]);
    }
    let out = run(Command::new(program("systemd-analyze")).args(["syscall-filter", item]));
    assert!(out.status.success(), "systemd-analyze syscall-filter {item}: {}", text(&out.stderr));
    text(&out.stdout)
        .lines()
        .skip(1)
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .flat_map(syscalls)
        .collect()
}

#[test]
fn systemd_unit_passes_systemd_analyze_verify() {
    let unit = repo_file("systemd/ringpush.service");
    assert!(unit.lines().any(|l| l == SHIPPED_EXEC_START), "ExecStart must be {SHIPPED_EXEC_START:?}");
    // verify checks that ExecStart's binary exists: point it at the one just built. The
    // unit is checked in a directory of its own, so nothing installed on the host is read.
    let dir = TempDir::new("unit");
    let exec = format!("ExecStart={} serve", env!("CARGO_BIN_EXE_ringpush"));
    let unit_path =
        dir.write("ringpush.service", &replace_once(&unit, "ExecStart=/usr/bin/ringpush serve", &exec));
    let out = run(Command::new(program("systemd-analyze")).args(["verify", "--man=no"]).arg(&unit_path));
    // verify exits 0 on unknown keys and bad values too, warning on stderr: none allowed.
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "systemd-analyze verify: {}\n{}{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
}

#[test]
fn systemd_unit_keeps_io_uring_allowed_and_the_settings_ringpush_relies_on() {
    let settings = service_settings(&repo_file("systemd/ringpush.service"));
    let get = |key: &str| -> Vec<&str> {
        settings.iter().filter(|(k, _)| k == key).map(|(_, v)| v.as_str()).collect()
    };
    for (key, value) in [
        ("Type", "notify"),
        ("NotifyAccess", "main"),
        ("WatchdogSec", "10s"),
        ("Restart", "on-failure"),
        ("TimeoutStopSec", "15s"),
        ("KillSignal", "SIGTERM"),
        ("User", "ringpush"),
        ("Group", "ringpush"),
        ("LimitNOFILE", "1048576"),
        ("LimitMEMLOCK", "infinity"),
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("MemoryDenyWriteExecute", "yes"),
        ("SystemCallArchitectures", "native"),
        ("RestrictAddressFamilies", "AF_INET AF_INET6 AF_UNIX"),
    ] {
        assert_eq!(get(key), [value], "{key}");
    }
    assert!(get("ExecReload").is_empty(), "ringpush has no reload; SIGHUP would end it without a drain");
    assert!(get("AmbientCapabilities").is_empty(), "CAP_NET_BIND_SERVICE stays optional (commented)");
    assert!(get("DynamicUser").is_empty());

    // The effective allow-list of SystemCallFilter= lines: allow-lists add, `~` lines remove.
    let (mut allowed, mut denied) = (BTreeSet::new(), BTreeSet::new());
    for value in get("SystemCallFilter") {
        let (deny, items) = value.strip_prefix('~').map_or((false, value), |rest| (true, rest));
        for item in items.split_whitespace() {
            if deny { &mut denied } else { &mut allowed }.extend(syscalls(item));
        }
    }
    for call in ["io_uring_setup", "io_uring_enter", "io_uring_register"] {
        assert!(allowed.contains(call) && !denied.contains(call), "SystemCallFilter blocks {call}");
    }
    // And what ringpush was seen calling under load, which the filter must keep.
    for call in ["sched_setaffinity", "membarrier", "prlimit64", "eventfd2", "accept", "sendto"] {
        assert!(allowed.contains(call) && !denied.contains(call), "SystemCallFilter blocks {call}");
    }
}

/// The next datagram on the notify socket (what systemd would read), waiting until
/// `deadline`; panics with what came so far and ringpush's log when none comes.
fn next_notification(socket: &UnixDatagram, deadline: Instant, proc: &Proc, seen: &[String]) -> String {
    let mut buf = [0u8; 4096];
    let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
    socket.set_read_timeout(Some(left)).expect("set timeout");
    match socket.recv(&mut buf) {
        Ok(n) => text(&buf[..n]),
        Err(e) => panic!("no notification ({e}); so far {seen:?}\n{}", proc.report()),
    }
}

#[test]
fn notify_protocol_sends_ready_then_watchdog_pets_then_stopping() {
    let dir = TempDir::new("notify");
    let socket_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).expect("bind the notify socket");
    let config = dir.write(
        "ringpush.toml",
        "listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\nshards = 2\napi_key = \"test-api-key\"\n\
         [auth]\nsecret = \"test-secret-0123\"\n",
    );
    let mut cmd = ringpush_command();
    cmd.args(["serve", "--config"])
        .arg(&config)
        .env("RUST_LOG", "info")
        .env("NOTIFY_SOCKET", &socket_path)
        // Pets every 200 ms.
        .env("WATCHDOG_USEC", "400000")
        .env_remove("WATCHDOG_PID");
    let ringpush = Proc::spawn("ringpush", cmd, dir.path().join("ringpush.log"));
    let mut seen = Vec::new();

    let ready = next_notification(&socket, Instant::now() + Duration::from_secs(20), &ringpush, &seen);
    assert!(ready.lines().any(|l| l == "READY=1"), "first notification is not READY=1: {ready:?}");
    seen.push(ready);

    let deadline = Instant::now() + Duration::from_secs(5);
    while seen.iter().filter(|m| *m == "WATCHDOG=1").count() < 2 {
        let pet = next_notification(&socket, deadline, &ringpush, &seen);
        assert_eq!(pet, "WATCHDOG=1", "after READY=1: {seen:?}");
        seen.push(pet);
    }

    ringpush.signal(libc::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let message = next_notification(&socket, deadline, &ringpush, &seen);
        seen.push(message.clone());
        if message.lines().any(|l| l == "STOPPING=1") {
            break;
        }
        // A pet may have been on its way when the signal came; nothing else may.
        assert_eq!(message, "WATCHDOG=1", "before STOPPING=1: {seen:?}");
    }
    let status = ringpush.wait_exit(Duration::from_secs(10));
    assert!(status.is_some_and(|s| s.success()), "exit after SIGTERM: {status:?}\n{}", ringpush.report());

    // Nothing after STOPPING=1: the process is gone, so anything it sent is queued now.
    socket.set_nonblocking(true).expect("nonblocking");
    let mut buf = [0u8; 4096];
    let after: Vec<String> =
        std::iter::from_fn(|| socket.recv(&mut buf).ok().map(|n| text(&buf[..n]))).collect();
    assert!(after.is_empty(), "notifications after STOPPING=1: {after:?} (all: {seen:?})");
}

#[test]
fn example_config_passes_check_config_as_shipped_and_as_a_cluster() {
    let check = |path: &Path| {
        let out = run(ringpush_command().args(["check-config", "--config"]).arg(path));
        assert!(
            out.status.success() && text(&out.stdout).trim() == "ok",
            "check-config {}: {}{}",
            path.display(),
            text(&out.stdout),
            text(&out.stderr)
        );
    };
    check(&repo_path("systemd/ringpush.toml"));

    // The commented [redis] and [cluster] sections, uncommented.
    let shipped = repo_file("systemd/ringpush.toml");
    let start = shipped.find("# [redis]").expect("a commented [redis] section");
    let end = shipped[start..].find("\n\n").map_or(shipped.len(), |e| start + e);
    let cluster: String = shipped[start..end]
        .lines()
        .map(|l| l.strip_prefix("# ").unwrap_or(l.trim_start_matches('#')))
        .map(|l| format!("{l}\n"))
        .collect();
    let dir = TempDir::new("config");
    check(&dir.write("cluster.toml", &format!("{}\n{cluster}{}", &shipped[..start], &shipped[end..])));
}

// ---------------------------------------------------------------------------------------
// Tuning
// ---------------------------------------------------------------------------------------

/// (key, recommended value) of every setting in the shipped sysctl file; values with
/// single spaces, keys without the "-" that marks a key the kernel may lack.
fn sysctl_settings() -> Vec<(String, String)> {
    repo_file("tuning/sysctl.d/90-ringpush.conf")
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#') && !l.starts_with(';'))
        .map(|l| {
            let (key, value) = l.split_once('=').unwrap_or_else(|| panic!("not a setting: {l:?}"));
            (key.trim().trim_start_matches('-').to_owned(), squeeze(value))
        })
        .collect()
}

fn squeeze(value: &str) -> String {
    value.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The kernel's current value of `key` (squeezed), or None when it has no such key.
fn kernel_value(root: &Path, key: &str) -> Option<String> {
    std::fs::read_to_string(root.join(key.replace('.', "/"))).ok().map(|v| squeeze(&v))
}

fn tuning_script(name: &str) -> Command {
    let mut cmd = Command::new("bash");
    cmd.arg(repo_path(&format!("tuning/{name}")));
    cmd.env_remove("TUNING_PROC_SYS");
    cmd
}

#[test]
fn sysctl_file_agrees_with_the_unit_the_config_and_nginx() {
    let settings = sysctl_settings();
    let value = |key: &str| -> u64 {
        settings
            .iter()
            .find(|(k, _)| k == key)
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or_else(|| panic!("{key}"))
    };
    assert!(value("fs.nr_open") >= LIMIT_NOFILE, "fs.nr_open must allow LimitNOFILE");
    assert!(value("net.core.somaxconn") >= 65535, "ringpush's listen backlog is 65535");
    let config: toml::Table = repo_file("systemd/ringpush.toml").parse().expect("example config");
    let max_connections = config["limits"]["max_connections"].as_integer().expect("limits.max_connections");
    assert!(max_connections as u64 + 64 <= LIMIT_NOFILE, "max_connections must fit under LimitNOFILE");
    let idle_ms = config["heartbeat"]["idle_timeout_ms"].as_integer().expect("heartbeat.idle_timeout_ms");
    for site in ["tuning/nginx/ringpush.conf", "tuning/nginx/ringpush-tls.conf"] {
        let text = repo_file(site);
        for directive in ["proxy_read_timeout", "proxy_send_timeout"] {
            let secs: i64 = text
                .lines()
                .find_map(|l| l.trim().strip_prefix(directive)?.trim().strip_suffix("s;")?.parse().ok())
                .unwrap_or_else(|| panic!("{site}: no {directive} in seconds"));
            assert!(secs * 1000 > idle_ms, "{site}: {directive} must exceed heartbeat.idle_timeout_ms");
        }
        assert!(text.contains("proxy_set_header X-Forwarded-For $remote_addr;"), "{site}");
        assert!(
            !text.lines().any(|l| l.trim_start().starts_with("keepalive ")),
            "{site}: upstream keepalive"
        );
    }
}

#[test]
fn apply_dry_run_reports_every_setting_and_changes_nothing() {
    let settings = sysctl_settings();
    let proc_sys = Path::new("/proc/sys");
    let before: Vec<_> = settings.iter().map(|(k, _)| kernel_value(proc_sys, k)).collect();
    let out = run(tuning_script("apply.sh").arg("--dry-run"));
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "apply.sh --dry-run: {}\n{stdout}{}", out.status, text(&out.stderr));
    for (key, recommended) in &settings {
        let line = stdout
            .lines()
            .find(|l| l.starts_with(&format!("{key}: ")))
            .unwrap_or_else(|| panic!("no line for {key}:\n{stdout}"));
        match kernel_value(proc_sys, key) {
            None => assert!(line.contains("not in this kernel"), "{line}"),
            Some(current) => {
                let ok = line == format!("{key}: {current} (ok)");
                let change = line.starts_with(&format!("{key}: {current} -> "));
                assert!(ok || change, "{line:?} (current {current:?}, recommended {recommended:?})");
            }
        }
    }
    assert!(stdout.contains("nothing was changed"), "{stdout}");
    let after: Vec<_> = settings.iter().map(|(k, _)| kernel_value(proc_sys, k)).collect();
    assert_eq!(before, after, "--dry-run changed the kernel");
}

/// check.sh's rows, as (first word, status, the whole line): the lines that end in a
/// status word (a setting, or a process limit whose first word is "pid").
fn check_rows(stdout: &str) -> Vec<(String, String, String)> {
    stdout
        .lines()
        .filter_map(|l| {
            let status = l.split_whitespace().last()?;
            ["OK", "LOW", "HIGH", "DIFF", "N/A"].contains(&status).then(|| {
                (l.split_whitespace().next().unwrap_or_default().to_owned(), status.to_owned(), l.to_owned())
            })
        })
        .collect()
}

#[test]
fn check_reports_every_setting_and_the_running_servers_limits() {
    let server = Server::start("");
    let out = run(tuning_script("check.sh").arg("--pid").arg(server.pid().to_string()));
    let stdout = text(&out.stdout);
    let rows = check_rows(&stdout);
    for (key, recommended) in sysctl_settings() {
        let (_, status, line) =
            rows.iter().find(|(k, _, _)| *k == key).unwrap_or_else(|| panic!("no line for {key}:\n{stdout}"));
        let current = kernel_value(Path::new("/proc/sys"), &key);
        if current.is_none() {
            assert_eq!(status, "N/A", "{line}");
        }
        let expected = format!("{key} {} {recommended} {status}", current.as_deref().unwrap_or("-"));
        assert_eq!(squeeze(line), expected, "columns of {line:?}");
    }

    // The server's soft open-file limit, as /proc/PID/limits has it.
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", server.pid())).expect("limits");
    let nofile = limits
        .lines()
        .find_map(|l| l.strip_prefix("Max open files")?.split_whitespace().next().map(str::to_owned))
        .expect("Max open files");
    let status = if nofile.parse::<u64>().is_ok_and(|n| n < LIMIT_NOFILE) { "LOW" } else { "OK" };
    let expected = format!("pid {} Max open files {nofile} {LIMIT_NOFILE} {status}", server.pid());
    assert!(stdout.lines().any(|l| squeeze(l) == expected), "no line {expected:?}:\n{stdout}");
    assert!(stdout.contains(&format!("pid {} Max locked memory", server.pid())), "{stdout}");

    let failing = rows.iter().any(|(_, s, _)| ["LOW", "HIGH", "DIFF"].contains(&s.as_str()));
    assert_eq!(out.status.code(), Some(i32::from(failing)), "exit status vs the lines:\n{stdout}");
}

/// A copy of the keys of the sysctl file from this kernel (the optional ones left out, as
/// on a kernel without nf_conntrack), with some values set to interesting starting points.
fn fake_proc_sys(dir: &TempDir, overrides: &[(&str, &str)]) -> PathBuf {
    let root = dir.path().join("proc-sys");
    let optional: Vec<String> = repo_file("tuning/sysctl.d/90-ringpush.conf")
        .lines()
        .filter_map(|l| l.strip_prefix('-')?.split_once('=').map(|(k, _)| k.trim().to_owned()))
        .collect();
    for (key, _) in sysctl_settings() {
        if optional.contains(&key) {
            continue;
        }
        let value = overrides
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v.to_string())
            .or_else(|| kernel_value(Path::new("/proc/sys"), &key))
            .unwrap_or_else(|| panic!("this kernel has no {key}"));
        let path = root.join(key.replace('.', "/"));
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        std::fs::write(&path, format!("{}\n", value.replace(' ', "\t"))).expect("write");
    }
    root
}

#[test]
fn apply_for_real_on_a_copy_of_proc_sys_raises_never_lowers_and_is_idempotent() {
    let dir = TempDir::new("apply");
    let root = fake_proc_sys(
        &dir,
        &[
            ("fs.file-max", "9223372036854775807"),
            ("fs.nr_open", "1048576"),
            ("net.core.somaxconn", "4096"),
            ("net.ipv4.tcp_mem", "1048576 9000000 100"),
            ("net.ipv4.tcp_rmem", "4096 131072 6291456"),
            ("net.ipv4.ip_local_port_range", "1024 65535"),
            ("net.ipv4.tcp_tw_reuse", "2"),
            ("net.ipv4.tcp_fin_timeout", "60"),
        ],
    );
    let dest = dir.path().join("etc/sysctl.d/90-ringpush.conf");
    let apply = || {
        let out = run(tuning_script("apply.sh").env("TUNING_PROC_SYS", &root).arg("--dest").arg(&dest));
        let stdout = text(&out.stdout);
        assert!(out.status.success(), "apply.sh: {}\n{stdout}{}", out.status, text(&out.stderr));
        stdout
    };
    let first = apply();
    let value = |key: &str| kernel_value(&root, key).unwrap_or_else(|| panic!("{key}"));
    for (key, expected) in [
        ("fs.file-max", "9223372036854775807"),          // above the floor: kept
        ("fs.nr_open", "2097152"),                       // raised
        ("net.core.somaxconn", "65535"),                 // raised
        ("net.ipv4.tcp_mem", "1048576 9000000 3145728"), // number by number
        ("net.ipv4.tcp_rmem", "4096 16384 4194304"),     // lowered to the ceiling
        ("net.ipv4.ip_local_port_range", "1024 65535"),  // more ports already: kept
        ("net.ipv4.tcp_tw_reuse", "1"),                  // exactly
        ("net.ipv4.tcp_fin_timeout", "15"),              // lowered to the ceiling
    ] {
        assert_eq!(value(key), expected, "{key} after apply.sh:\n{first}");
    }
    assert!(first.contains("net.netfilter.nf_conntrack_max: not in this kernel"), "{first}");
    // The file for the next boot holds the same values, the optional keys still marked.
    let written = std::fs::read_to_string(&dest).expect("the sysctl.d file");
    assert!(written.contains("\nnet.ipv4.tcp_mem = 1048576 9000000 3145728\n"), "{written}");
    assert!(written.contains("\nfs.file-max = 9223372036854775807\n"), "{written}");
    assert!(written.contains("\n-net.netfilter.nf_conntrack_max = 2097152\n"), "{written}");

    let second = apply();
    assert!(!second.contains("->"), "a second run still changes something:\n{second}");
    assert!(second.contains("is up to date"), "{second}");

    let out = run(tuning_script("check.sh").env("TUNING_PROC_SYS", &root));
    let stdout = text(&out.stdout);
    let rows = check_rows(&stdout);
    assert!(
        rows.iter().filter(|(k, _, _)| !k.starts_with("pid")).all(|(_, s, _)| s == "OK" || s == "N/A"),
        "{stdout}"
    );
}

#[test]
fn tuning_scripts_parse_and_pass_shellcheck_when_installed() {
    let scripts = ["tuning/apply.sh", "tuning/check.sh", "tuning/lib.sh"];
    for script in scripts {
        let out = run(Command::new("bash").arg("-n").arg(repo_path(script)));
        assert!(out.status.success(), "bash -n {script}: {}", text(&out.stderr));
    }
    let Some(shellcheck) = find_program("shellcheck") else {
        eprintln!("shellcheck not installed: only bash -n was run");
        return;
    };
    let out = run(Command::new(shellcheck)
        .current_dir(repo_path("tuning"))
        .args(["apply.sh", "check.sh", "lib.sh"]));
    assert!(out.status.success(), "shellcheck:\n{}{}", text(&out.stdout), text(&out.stderr));
}
