//! One client process's share of the connections: a single-threaded epoll loop on raw
//! non-blocking sockets, speaking [`crate::ws`]. It opens its connections (a bounded
//! number of handshakes in flight), then holds them, answering every ping with a pong,
//! until the parent says otherwise.
//!
//! The parent talks to it in lines (stdin in, stdout out; diagnostics go to stderr):
//!
//! | parent sends  | fleet answers |
//! | ---           | ---           |
//! | (start)       | `connected K failed F ms T` once every connection is up or has failed |
//! | `stats`       | `stats open O hello H pings P pongs Q closed C` |
//! | `burst BYTES` | `burst ok K failed F ms T`: each open connection sent one binary message of BYTES and read its echo back whole and intact |
//! | `exit` or EOF | exits; the kernel closes the sockets |
//!
//! A connection costs this process a few hundred bytes: payloads stream through one
//! shared read buffer, and the burst's message is generated and masked piece by piece
//! from its offset instead of being held per connection.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use crate::error::Error;
use crate::ws::{self, opcode, Decoder, Event, Rng};

/// The WebSocket endpoint a fleet connects to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Endpoint {
    /// `/ws?token=JWT`: a client of the IM protocol; counted as connected at its `hello`.
    Ws,
    /// `/echo` (the server needs `diagnostics.echo = true`); counted at the `101`.
    Echo,
}

impl Endpoint {
    pub fn as_str(self) -> &'static str {
        match self {
            Endpoint::Ws => "ws",
            Endpoint::Echo => "echo",
        }
    }
}

/// The hidden `idle-worker` subcommand: what one client process is started with.
#[derive(Debug, Clone, clap::Args)]
pub struct FleetArgs {
    /// The server's client listener.
    #[arg(long)]
    pub addr: SocketAddr,
    #[arg(long, value_enum)]
    pub path: Endpoint,
    /// Connections this process opens.
    #[arg(long)]
    pub count: usize,
    /// Index of this process's first connection in the whole run: user ids are `b<index>`,
    /// and source addresses rotate by it.
    #[arg(long, default_value_t = 0)]
    pub first: usize,
    /// Spread connections over 127.0.0.1..=127.0.0.K (K > 1 binds before connecting).
    #[arg(long, default_value_t = 1)]
    pub source_ips: u8,
    /// HS256 secret the `/ws` tokens are signed with.
    #[arg(long, default_value = "")]
    pub secret: String,
    /// Pin this process to one CPU.
    #[arg(long)]
    pub cpu: Option<usize>,
    /// Handshakes in flight at once (the kernel's SYN backlog is 2048 here).
    #[arg(long, default_value_t = 256)]
    pub concurrency: usize,
    /// A connection not upgraded (and, on /ws, greeted) within this counts as failed.
    #[arg(long, default_value_t = 10_000)]
    pub handshake_timeout_ms: u64,
    /// Bound on the whole connect phase.
    #[arg(long, default_value_t = 120)]
    pub connect_timeout_secs: u64,
    /// Bound on one burst (send and echo of every connection).
    #[arg(long, default_value_t = 120)]
    pub burst_timeout_secs: u64,
}

/// Lifetime of the tokens the fleet mints: longer than any bounded run.
const TOKEN_TTL_SECS: u64 = 6 * 3600;

/// The shared read buffer, and the piece size the burst is generated in.
const IO_CHUNK: usize = 64 * 1024;

/// epoll token of stdin; connections use their index.
const STDIN_TOKEN: u64 = u64::MAX;

/// Reads per connection per wake-up before the loop moves on (fairness).
const READS_PER_WAKE: usize = 8;

/// The first bytes of a text message kept to recognise the `hello` frame.
const PREFIX: usize = 16;

/// Byte `offset` of every burst message: varied, so a misplaced or dropped piece shows.
fn pattern(offset: u64) -> u8 {
    (offset.wrapping_mul(31) ^ (offset >> 8) ^ (offset >> 16)) as u8
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Not started yet.
    Idle,
    /// `connect` in progress.
    Connecting,
    /// The request is out (or going out); reading the `101`.
    Upgrading,
    Open,
    /// Ended (failed, or closed after being counted); the socket is gone.
    Done,
}

/// One connection's burst: its message going out and its echo coming back.
#[derive(Debug)]
struct Burst {
    size: u64,
    mask: [u8; 4],
    header_queued: bool,
    /// Payload bytes written so far.
    sent: u64,
    /// Echo payload bytes read back so far, all matching the pattern.
    received: u64,
    echoed: bool,
}

impl Burst {
    /// True while the outgoing frame has begun but not ended: control frames must wait.
    fn mid_frame(&self) -> bool {
        self.header_queued && self.sent < self.size
    }
}

#[derive(Debug)]
struct Conn {
    fd: Option<OwnedFd>,
    state: State,
    /// Connected as the scenario means it: the `101` on /echo, the `hello` on /ws.
    ready: bool,
    /// The fleet has counted it as connected (and no longer as a handshake in flight).
    up: bool,
    started: Instant,
    key: String,
    /// The response head while upgrading.
    head: Vec<u8>,
    /// Bytes to write before anything else (request, control frames, burst header).
    out: Vec<u8>,
    /// Control frames waiting for the burst frame in flight to end.
    held: Vec<u8>,
    /// EPOLLOUT is registered.
    want_out: bool,
    decoder: Decoder,
    /// The frame being read.
    frame: ws::Header,
    /// The data message being read: its opcode and length so far.
    msg_opcode: u8,
    msg_len: u64,
    prefix: [u8; PREFIX],
    ctl: [u8; ws::MAX_CONTROL_PAYLOAD],
    ctl_len: u8,
    close_sent: bool,
    burst: Option<Box<Burst>>,
}

impl Conn {
    fn new() -> Conn {
        Conn {
            fd: None,
            state: State::Idle,
            ready: false,
            up: false,
            started: Instant::now(),
            key: String::new(),
            head: Vec::new(),
            out: Vec::new(),
            held: Vec::new(),
            want_out: false,
            decoder: Decoder::default(),
            frame: ws::Header { fin: true, opcode: 0, len: 0, mask: None },
            msg_opcode: 0,
            msg_len: 0,
            prefix: [0; PREFIX],
            ctl: [0; ws::MAX_CONTROL_PAYLOAD],
            ctl_len: 0,
            close_sent: false,
            burst: None,
        }
    }

    fn raw(&self) -> RawFd {
        self.fd.as_ref().map_or(-1, |f| f.as_raw_fd())
    }

    /// Queues a masked control frame, after the burst frame if one is half-written.
    fn queue_control(&mut self, op: u8, payload: &[u8], rng: &mut Rng) {
        let mid = self.burst.as_ref().is_some_and(|b| b.mid_frame());
        let dst = if mid { &mut self.held } else { &mut self.out };
        ws::write_frame(dst, op, payload, rng.mask());
    }

    /// Writes what is pending: `out`, then the burst payload (generated from its offset).
    /// `Ok(true)` when the socket is full and EPOLLOUT is needed.
    fn flush(&mut self, scratch: &mut Vec<u8>) -> io::Result<bool> {
        let fd = self.raw();
        loop {
            if !self.out.is_empty() {
                match send(fd, &self.out)? {
                    None => return Ok(true),
                    Some(n) => {
                        self.out.drain(..n);
                        continue;
                    }
                }
            }
            if self.out.capacity() > 1024 {
                self.out = Vec::new();
            }
            let Some(burst) = self.burst.as_mut() else { return Ok(false) };
            if !burst.header_queued {
                ws::write_header(&mut self.out, true, opcode::BINARY, burst.size, Some(burst.mask));
                burst.header_queued = true;
                continue;
            }
            if burst.sent == burst.size {
                return Ok(false);
            }
            let len = (burst.size - burst.sent).min(IO_CHUNK as u64) as usize;
            scratch.clear();
            scratch.extend((0..len as u64).map(|k| pattern(burst.sent + k)));
            ws::apply_mask(scratch, burst.mask, burst.sent);
            match send(fd, scratch)? {
                None => return Ok(true),
                Some(n) => burst.sent += n as u64,
            }
            if burst.sent == burst.size && !self.held.is_empty() {
                self.out.append(&mut self.held);
                self.held = Vec::new();
            }
        }
    }

    /// Handles frames from the server. `Err` ends the connection with the reason.
    fn on_frames(&mut self, mut input: &[u8], stats: &mut Stats, rng: &mut Rng) -> Result<(), String> {
        loop {
            let event = match self.decoder.next(&mut input) {
                Ok(Some(event)) => event,
                Ok(None) => return Ok(()),
                Err(e) => {
                    if !self.close_sent {
                        self.queue_control(opcode::CLOSE, &ws::close::PROTOCOL.to_be_bytes(), rng);
                        self.close_sent = true;
                    }
                    return Err(format!("protocol error from the server: {e}"));
                }
            };
            match event {
                Event::Start(h) => {
                    self.frame = h;
                    self.ctl_len = 0;
                    if h.opcode == opcode::TEXT || h.opcode == opcode::BINARY {
                        self.msg_opcode = h.opcode;
                        self.msg_len = 0;
                    }
                }
                Event::Payload(p) => {
                    if opcode::is_control(self.frame.opcode) {
                        let at = self.ctl_len as usize;
                        self.ctl[at..at + p.len()].copy_from_slice(p);
                        self.ctl_len += p.len() as u8;
                    } else {
                        self.on_payload(p)?;
                    }
                }
                Event::End => match self.frame.opcode {
                    opcode::PING => {
                        stats.pings += 1;
                        let payload = self.ctl;
                        self.queue_control(opcode::PONG, &payload[..self.ctl_len as usize], rng);
                        stats.pongs += 1;
                    }
                    opcode::PONG => {}
                    opcode::CLOSE => {
                        if !self.close_sent {
                            // Echo the status code back (RFC 6455, section 5.5.1).
                            let code =
                                if self.ctl_len >= 2 { [self.ctl[0], self.ctl[1]] } else { [0x03, 0xE8] };
                            self.queue_control(opcode::CLOSE, &code, rng);
                            self.close_sent = true;
                        }
                        let code = if self.ctl_len >= 2 {
                            u16::from_be_bytes([self.ctl[0], self.ctl[1]])
                        } else {
                            1005
                        };
                        return Err(format!("closed by the server with {code}"));
                    }
                    _ if self.frame.fin => self.on_message()?,
                    _ => {}
                },
            }
        }
    }

    fn on_payload(&mut self, p: &[u8]) -> Result<(), String> {
        let at = self.msg_len;
        self.msg_len += p.len() as u64;
        if self.msg_opcode == opcode::TEXT && at < PREFIX as u64 {
            let n = (PREFIX - at as usize).min(p.len());
            self.prefix[at as usize..at as usize + n].copy_from_slice(&p[..n]);
        }
        if self.msg_opcode == opcode::BINARY {
            let Some(burst) = self.burst.as_mut() else { return Err("unexpected binary message".into()) };
            if self.msg_len > burst.size {
                return Err(format!("echo longer than the {} bytes sent", burst.size));
            }
            if let Some(k) = p.iter().enumerate().position(|(k, b)| *b != pattern(at + k as u64)) {
                return Err(format!("echo differs at byte {}", at + k as u64));
            }
            burst.received = self.msg_len;
        }
        Ok(())
    }

    fn on_message(&mut self) -> Result<(), String> {
        match self.msg_opcode {
            opcode::TEXT => {
                let n = (self.msg_len as usize).min(PREFIX);
                if self.prefix[..n].starts_with(b"{\"op\":\"hello\"") {
                    self.ready = true;
                }
                Ok(())
            }
            _ => match self.burst.as_mut() {
                Some(b) if b.received == b.size => {
                    b.echoed = true;
                    Ok(())
                }
                Some(b) => Err(format!("echo of {} bytes, {} sent", b.received, b.size)),
                None => Err("unexpected binary message".into()),
            },
        }
    }
}

/// What the fleet has seen, for `stats`.
#[derive(Debug, Default)]
struct Stats {
    open: u64,
    hello: u64,
    pings: u64,
    pongs: u64,
    /// Connections that were counted and later ended.
    closed: u64,
}

/// The burst in progress.
#[derive(Debug)]
struct BurstRun {
    started: Instant,
    pending: u64,
    ok: u64,
    failed: u64,
}

struct Fleet {
    args: FleetArgs,
    epoll: OwnedFd,
    conns: Vec<Conn>,
    next: usize,
    in_flight: usize,
    connect_ok: u64,
    connect_failed: u64,
    /// Why connections failed, counted, for stderr.
    failures: BTreeMap<String, u64>,
    connect_done: bool,
    started: Instant,
    stats: Stats,
    rng: Rng,
    read_buf: Vec<u8>,
    scratch: Vec<u8>,
    stdin_buf: Vec<u8>,
    burst: Option<BurstRun>,
    exit: bool,
}

/// Runs one client process until the parent says exit (or closes stdin).
pub fn run(args: FleetArgs) -> Result<(), Error> {
    if let Some(cpu) = args.cpu {
        crate::server::pin_current(cpu).map_err(|e| Error::io(format!("pin to cpu {cpu}"), e))?;
    }
    // SAFETY: epoll_create1 has no preconditions; the fd is owned right away.
    let epfd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if epfd < 0 {
        return Err(Error::io("epoll_create1", io::Error::last_os_error()));
    }
    // SAFETY: a fresh fd nobody else owns.
    let epoll = unsafe { OwnedFd::from_raw_fd(epfd) };
    set_nonblocking(0).map_err(|e| Error::io("make stdin non-blocking", e))?;
    epoll_ctl(epoll.as_raw_fd(), libc::EPOLL_CTL_ADD, 0, libc::EPOLLIN as u32, STDIN_TOKEN)
        .map_err(|e| Error::io("watch stdin", e))?;
    let mut fleet = Fleet {
        conns: (0..args.count).map(|_| Conn::new()).collect(),
        args,
        epoll,
        next: 0,
        in_flight: 0,
        connect_ok: 0,
        connect_failed: 0,
        failures: BTreeMap::new(),
        connect_done: false,
        started: Instant::now(),
        stats: Stats::default(),
        rng: Rng::from_entropy(),
        read_buf: vec![0; IO_CHUNK],
        scratch: Vec::with_capacity(IO_CHUNK),
        stdin_buf: Vec::new(),
        burst: None,
        exit: false,
    };
    fleet.run_loop()
}

impl Fleet {
    fn run_loop(&mut self) -> Result<(), Error> {
        let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 1024];
        let mut last_sweep = Instant::now();
        while !self.exit {
            self.start_more();
            // SAFETY: `events` is valid for its length; the epoll fd is ours.
            let n = unsafe {
                libc::epoll_wait(self.epoll.as_raw_fd(), events.as_mut_ptr(), events.len() as i32, 50)
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(Error::io("epoll_wait", e));
            }
            for ev in &events[..n as usize] {
                let (token, flags) = (ev.u64, ev.events);
                if token == STDIN_TOKEN {
                    self.on_stdin()?;
                } else {
                    self.on_event(token as usize, flags);
                }
            }
            if last_sweep.elapsed() >= Duration::from_millis(100) {
                last_sweep = Instant::now();
                self.sweep();
            }
            self.report_progress()?;
        }
        Ok(())
    }

    /// Starts connections while fewer than `concurrency` handshakes are in flight.
    fn start_more(&mut self) {
        while self.next < self.conns.len() && self.in_flight < self.args.concurrency.max(1) {
            let i = self.next;
            self.next += 1;
            self.conns[i].started = Instant::now();
            match self.start(i) {
                Ok(()) => self.in_flight += 1,
                Err(e) => self.fail(i, format!("connect: {}", e.kind())),
            }
        }
    }

    fn start(&mut self, i: usize) -> io::Result<()> {
        let ip = match self.args.addr {
            SocketAddr::V4(_) => libc::AF_INET,
            SocketAddr::V6(_) => libc::AF_INET6,
        };
        // SAFETY: plain socket creation; the fd is owned right away.
        let raw =
            unsafe { libc::socket(ip, libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, 0) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh fd nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // Close with a reset when the process exits: a run leaves no TIME_WAIT behind to
        // crowd the next run's ephemeral ports.
        let linger = libc::linger { l_onoff: 1, l_linger: 0 };
        setsockopt(raw, libc::SOL_SOCKET, libc::SO_LINGER, &linger)?;
        let k = self.args.source_ips.max(1) as usize;
        if k > 1 && ip == libc::AF_INET {
            // Port chosen at connect time, per destination: without this, every bound
            // socket would hold its port exclusively and the range would run out anyway.
            setsockopt(raw, libc::IPPROTO_IP, libc::IP_BIND_ADDRESS_NO_PORT, &1i32)?;
            let host = ((self.args.first + i) % k) as u8 + 1;
            let src = SocketAddr::from((Ipv4Addr::new(127, 0, 0, host), 0));
            let (storage, len) = sockaddr(&src);
            // SAFETY: `storage` holds a valid sockaddr of `len` bytes.
            if unsafe { libc::bind(raw, (&storage as *const libc::sockaddr_storage).cast(), len) } != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        let (storage, len) = sockaddr(&self.args.addr);
        // SAFETY: as above.
        let rc = unsafe { libc::connect(raw, (&storage as *const libc::sockaddr_storage).cast(), len) };
        if rc != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EINPROGRESS) {
                return Err(e);
            }
        }
        let flags = (libc::EPOLLIN | libc::EPOLLOUT | libc::EPOLLRDHUP) as u32;
        epoll_ctl(self.epoll.as_raw_fd(), libc::EPOLL_CTL_ADD, raw, flags, i as u64)?;
        let conn = &mut self.conns[i];
        conn.fd = Some(fd);
        conn.state = State::Connecting;
        conn.want_out = true;
        Ok(())
    }

    fn on_event(&mut self, i: usize, flags: u32) {
        let Some(state) = self.conns.get(i).map(|c| c.state) else { return };
        match state {
            State::Connecting => {
                if flags & (libc::EPOLLOUT | libc::EPOLLERR | libc::EPOLLHUP) as u32 != 0 {
                    self.on_connected(i);
                }
            }
            State::Upgrading | State::Open => {
                if flags & libc::EPOLLOUT as u32 != 0 {
                    self.flush(i);
                }
                if flags & (libc::EPOLLIN | libc::EPOLLERR | libc::EPOLLHUP | libc::EPOLLRDHUP) as u32 != 0 {
                    self.on_readable(i);
                }
            }
            State::Idle | State::Done => {}
        }
    }

    fn on_connected(&mut self, i: usize) {
        let raw = self.conns[i].raw();
        match socket_error(raw) {
            Ok(0) => {}
            Ok(errno) => {
                return self.fail(i, format!("connect: {}", io::Error::from_raw_os_error(errno).kind()))
            }
            Err(e) => return self.fail(i, format!("connect: {}", e.kind())),
        }
        let target = match self.args.path {
            Endpoint::Echo => "/echo".to_string(),
            Endpoint::Ws => {
                let user = format!("b{}", self.args.first + i);
                match ringpush::auth::mint(&self.args.secret, &user, "d", TOKEN_TTL_SECS) {
                    Ok(token) => format!("/ws?token={token}"),
                    Err(e) => return self.fail(i, format!("mint a token: {e}")),
                }
            }
        };
        let key = ws::new_key(&mut self.rng);
        let host = self.args.addr.to_string();
        let conn = &mut self.conns[i];
        conn.out.extend_from_slice(ws::upgrade_request(&host, &target, &key).as_bytes());
        conn.key = key;
        conn.state = State::Upgrading;
        self.flush(i);
    }

    /// Writes what is pending on connection `i` and keeps EPOLLOUT registered only while
    /// the socket is full.
    fn flush(&mut self, i: usize) {
        let conn = &mut self.conns[i];
        let blocked = match conn.flush(&mut self.scratch) {
            Ok(blocked) => blocked,
            Err(e) => return self.fail(i, format!("send: {}", e.kind())),
        };
        if blocked != conn.want_out {
            let mut flags = (libc::EPOLLIN | libc::EPOLLRDHUP) as u32;
            if blocked {
                flags |= libc::EPOLLOUT as u32;
            }
            if let Err(e) =
                epoll_ctl(self.epoll.as_raw_fd(), libc::EPOLL_CTL_MOD, conn.raw(), flags, i as u64)
            {
                return self.fail(i, format!("epoll: {}", e.kind()));
            }
            conn.want_out = blocked;
        }
        self.after_progress(i);
    }

    fn on_readable(&mut self, i: usize) {
        for _ in 0..READS_PER_WAKE {
            let raw = self.conns[i].raw();
            if raw < 0 {
                return;
            }
            // SAFETY: `read_buf` is valid for its length; `raw` is this connection's socket.
            let n = unsafe { libc::read(raw, self.read_buf.as_mut_ptr().cast(), self.read_buf.len()) };
            if n < 0 {
                let e = io::Error::last_os_error();
                match e.kind() {
                    io::ErrorKind::WouldBlock => break,
                    io::ErrorKind::Interrupted => continue,
                    kind => return self.fail(i, format!("read: {kind}")),
                }
            }
            if n == 0 {
                return self.fail(i, "closed by the server (EOF)".into());
            }
            let data = &self.read_buf[..n as usize];
            let conn = &mut self.conns[i];
            let result = if conn.state == State::Upgrading {
                conn.head.extend_from_slice(data);
                match ws::check_response(&conn.head, &conn.key) {
                    Ok(None) => Ok(()),
                    Ok(Some(head_len)) => {
                        let head = std::mem::take(&mut conn.head);
                        conn.key = String::new();
                        conn.state = State::Open;
                        if self.args.path == Endpoint::Echo {
                            conn.ready = true;
                        }
                        conn.on_frames(&head[head_len..], &mut self.stats, &mut self.rng)
                    }
                    Err(e) => Err(format!("handshake: {e}")),
                }
            } else {
                conn.on_frames(data, &mut self.stats, &mut self.rng)
            };
            if let Err(why) = result {
                // Best effort: the close (or pong) queued before the error goes out now.
                let _ = self.conns[i].flush(&mut self.scratch);
                return self.fail(i, why);
            }
            self.flush(i);
        }
    }

    /// Counts what connection `i` just achieved: connected, burst done.
    fn after_progress(&mut self, i: usize) {
        let conn = &mut self.conns[i];
        if conn.state == State::Open && conn.ready && !conn.up {
            conn.up = true;
            self.in_flight -= 1;
            self.connect_ok += 1;
            self.stats.open += 1;
            if self.args.path == Endpoint::Ws {
                self.stats.hello += 1;
            }
        }
        if let Some(b) = conn.burst.as_ref() {
            if b.echoed && b.sent == b.size {
                conn.burst = None;
                if let Some(run) = self.burst.as_mut() {
                    run.pending -= 1;
                    run.ok += 1;
                }
            }
        }
    }

    /// Ends connection `i` and counts why.
    fn fail(&mut self, i: usize, why: String) {
        let conn = &mut self.conns[i];
        let (state, up) = (conn.state, conn.up);
        if state == State::Done {
            return;
        }
        conn.state = State::Done;
        // Dropping the fd removes it from the epoll set.
        conn.fd = None;
        conn.head = Vec::new();
        conn.out = Vec::new();
        conn.held = Vec::new();
        if conn.burst.take().is_some() {
            if let Some(run) = self.burst.as_mut() {
                run.pending -= 1;
                run.failed += 1;
            }
        }
        if up {
            self.stats.open -= 1;
            self.stats.closed += 1;
            if self.stats.closed <= 5 {
                eprintln!("idle-worker: connection b{} ended: {why}", self.args.first + i);
            }
            return;
        }
        if state != State::Idle {
            self.in_flight -= 1;
        }
        self.connect_failed += 1;
        *self.failures.entry(why).or_default() += 1;
    }

    /// Fails handshakes past their timeout, and the whole connect phase past its bound.
    fn sweep(&mut self) {
        if self.connect_done {
            return;
        }
        let limit = Duration::from_millis(self.args.handshake_timeout_ms);
        let phase_over = self.started.elapsed() > Duration::from_secs(self.args.connect_timeout_secs);
        for i in 0..self.next {
            let c = &self.conns[i];
            let waiting = matches!(c.state, State::Connecting | State::Upgrading | State::Open) && !c.up;
            if waiting && (phase_over || c.started.elapsed() > limit) {
                self.fail(i, "handshake timeout".into());
            }
        }
        if phase_over {
            for i in self.next..self.conns.len() {
                self.fail(i, "connect phase bound reached".into());
            }
            self.next = self.conns.len();
        }
    }

    /// Tells the parent when the connect phase or a burst has finished.
    fn report_progress(&mut self) -> Result<(), Error> {
        if !self.connect_done && self.next == self.conns.len() && self.in_flight == 0 {
            self.connect_done = true;
            for (why, n) in &self.failures {
                eprintln!("idle-worker: {n} connections failed: {why}");
            }
            let ms = self.started.elapsed().as_millis();
            say(&format!("connected {} failed {} ms {ms}", self.connect_ok, self.connect_failed))?;
        }
        if let Some(run) = &self.burst {
            let over = run.started.elapsed() > Duration::from_secs(self.args.burst_timeout_secs);
            if run.pending == 0 || over {
                let (ok, failed) = (run.ok, run.failed + run.pending);
                let ms = run.started.elapsed().as_millis();
                for conn in &mut self.conns {
                    conn.burst = None;
                }
                self.burst = None;
                say(&format!("burst ok {ok} failed {failed} ms {ms}"))?;
            }
        }
        Ok(())
    }

    fn on_stdin(&mut self) -> Result<(), Error> {
        let mut chunk = [0u8; 256];
        loop {
            // SAFETY: reading into a stack buffer we own.
            let n = unsafe { libc::read(0, chunk.as_mut_ptr().cast(), chunk.len()) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::WouldBlock {
                    break;
                }
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(Error::io("read stdin", e));
            }
            if n == 0 {
                self.exit = true;
                return Ok(());
            }
            self.stdin_buf.extend_from_slice(&chunk[..n as usize]);
        }
        while let Some(end) = self.stdin_buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.stdin_buf.drain(..=end).collect();
            let line = String::from_utf8_lossy(&line).trim().to_string();
            self.command(&line)?;
        }
        Ok(())
    }

    fn command(&mut self, line: &str) -> Result<(), Error> {
        let mut words = line.split_whitespace();
        match (words.next(), words.next()) {
            (Some("exit"), _) => self.exit = true,
            (Some("stats"), _) => {
                let s = &self.stats;
                say(&format!(
                    "stats open {} hello {} pings {} pongs {} closed {}",
                    s.open, s.hello, s.pings, s.pongs, s.closed
                ))?;
            }
            (Some("burst"), Some(size)) => {
                let size: u64 = size.parse().map_err(|_| Error::Worker(format!("bad command {line:?}")))?;
                self.start_burst(size);
            }
            _ => return Err(Error::Worker(format!("unknown command {line:?}"))),
        }
        Ok(())
    }

    fn start_burst(&mut self, size: u64) {
        let mut run = BurstRun { started: Instant::now(), pending: 0, ok: 0, failed: 0 };
        let mut open = Vec::new();
        for (i, conn) in self.conns.iter_mut().enumerate() {
            if conn.state == State::Open && conn.up {
                conn.burst = Some(Box::new(Burst {
                    size,
                    mask: self.rng.mask(),
                    header_queued: false,
                    sent: 0,
                    received: 0,
                    echoed: false,
                }));
                run.pending += 1;
                open.push(i);
            }
        }
        self.burst = Some(run);
        for i in open {
            self.flush(i);
        }
    }
}

/// One line to the parent.
fn say(line: &str) -> Result<(), Error> {
    let mut out = io::stdout().lock();
    writeln!(out, "{line}").and_then(|_| out.flush()).map_err(|e| Error::io("write to the parent", e))
}

/// A non-blocking `send`: `Ok(None)` when the socket is full.
fn send(fd: RawFd, buf: &[u8]) -> io::Result<Option<usize>> {
    loop {
        // SAFETY: `buf` is valid for its length; `fd` is an open socket.
        let n = unsafe {
            libc::send(fd, buf.as_ptr().cast(), buf.len(), libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT)
        };
        if n >= 0 {
            return Ok(Some(n as usize));
        }
        let e = io::Error::last_os_error();
        match e.kind() {
            io::ErrorKind::WouldBlock => return Ok(None),
            io::ErrorKind::Interrupted => continue,
            _ => return Err(e),
        }
    }
}

fn epoll_ctl(epfd: RawFd, op: i32, fd: RawFd, events: u32, token: u64) -> io::Result<()> {
    let mut ev = libc::epoll_event { events, u64: token };
    // SAFETY: `ev` lives across the call; the fds are open.
    if unsafe { libc::epoll_ctl(epfd, op, fd, &mut ev) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl on an open fd.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags < 0 || libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

fn setsockopt<T>(fd: RawFd, level: i32, name: i32, value: &T) -> io::Result<()> {
    // SAFETY: `value` lives across the call and its size is passed.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (value as *const T).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `SO_ERROR` of a socket: the outcome of a non-blocking connect.
fn socket_error(fd: RawFd) -> io::Result<i32> {
    let mut err: i32 = 0;
    let mut len = std::mem::size_of::<i32>() as libc::socklen_t;
    // SAFETY: `err` and `len` live across the call and match.
    let rc = unsafe {
        libc::getsockopt(fd, libc::SOL_SOCKET, libc::SO_ERROR, (&mut err as *mut i32).cast(), &mut len)
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(err)
}

/// A socket address as the C structure `bind` and `connect` take.
fn sockaddr(addr: &SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            // SAFETY: sockaddr_storage is large and aligned enough for sockaddr_in.
            let sin =
                unsafe { &mut *(&mut storage as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            sin.sin_family = libc::AF_INET as libc::sa_family_t;
            sin.sin_port = a.port().to_be();
            sin.sin_addr = libc::in_addr { s_addr: u32::from_ne_bytes(a.ip().octets()) };
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            // SAFETY: as above, for sockaddr_in6.
            let sin6 =
                unsafe { &mut *(&mut storage as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sin6.sin6_port = a.port().to_be();
            sin6.sin6_addr = libc::in6_addr { s6_addr: a.ip().octets() };
            sin6.sin6_scope_id = a.scope_id();
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_pattern_is_not_constant() {
        let bytes: Vec<u8> = (0..1024).map(pattern).collect();
        assert!(bytes.windows(2).filter(|w| w[0] != w[1]).count() > 1000);
    }
}
