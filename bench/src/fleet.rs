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
//! | `ping MS`     | each open connection sends one ping (for servers that send none); once every pong is back, or after MS: `pinged ok K missing M ms T` |
//! | `echo SIZE DEPTH OPCODE START END` | the echo load of [`crate::pipe`]: after END and the drain, `echoed rt R rt_win W sent S errors E inflight I`, then `hist rtt ...` |
//! | `churn START END` | upgrade churn ([`crate::pipe`]): every slot is reset and reconnects, over and over; after END, `churned ok K ok_win W failed F failed_win FW`, then `hist upgrade ...` |
//! | `storm`       | every connection is reset at once and all reconnect at once (no cap on handshakes in flight): `connected K failed F ms T` again, then `hist back ...` (each connection's time from the storm to up) |
//! | `pushes`      | `pushes got G last_ns T`: `push` frames read so far, and the `CLOCK_MONOTONIC` time of the last read |
//! | `receipts`    | with `--watch-conv`: `receipts split S` and one `seq N got C last_ns T` pair group per seq seen (`msg` frames of that conversation) |
//! | `lb`          | with `--lb`: `lb open O down D back B closes_1001 C lost L refused_connect E refused_503 R retry_after_n N retry_after_max_s M pending P last_up_ns T`, then `hist back ...` (each connection's time from down to up since the last `lb`) |
//!
//! With `--lb` a connection that ends after the connect phase comes back as a client behind
//! a load balancer would: to the next node in turn (the process's own round robin), after
//! the `reconnect_after_ms` of a 1001 close, the `Retry-After` of a 503, or else a
//! jittered exponential backoff (full jitter, 1 s doubling to 8 s); a refused TCP connect
//! (a node that is gone) goes to the next node at once, as a balancer fails over.
//!
//! With `--raw` the server is a plain TCP echo: the upgrade request counts as answered
//! once it has come back whole, and so does a ping or an echo frame, byte for byte.
//!
//! With `--chat` (the IM scenarios; [`crate::chat`]) a connection counts as connected
//! once it has synced its conversations, and these come on top:
//!
//! | parent sends  | fleet answers |
//! | ---           | ---           |
//! | `go RATE WINDOW MS` | after the phase and its drain: `done sent S acks A acks_win AW msgs M msgs_win MW gaps G errors E seq_errors Q strays X drain_ms D reads_sent RS signals_sent SS reads R reads_win RW signals N signals_win NW` (the mix: `read`/`signal` frames sent, and read by the clients), then `hist deliver ...`, `hist arrival ...` and `hist ack ...` ([`crate::latency`]). For MS milliseconds the local senders send RATE messages a second in all (open loop), or, with RATE 0, keep WINDOW sends each unacked (closed loop) |
//! | `fan SEQ MS`  | the local sender (if any) sends one message; once every local receiver has read seq SEQ, or after MS: `fan seq SEQ got C want R first_read .. last_read .. first_arrival .. last_arrival ..` (latencies in ns) |
//! | `flood FIRST COUNT MS` | the local sender sends COUNT messages back to back; once seqs FIRST.. are all read, or after MS: `flood got C want R t0 T last_read_at L last_arrival_at A` and `seqlat` with six numbers per seq (seq, receipts, first and last read latency, first and last arrival latency) |
//!
//! A connection costs this process a few hundred bytes: payloads stream through one
//! shared read buffer, and the burst's message is generated and masked piece by piece
//! from its offset instead of being held per connection.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::io::{self, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use crate::chat::{self, Chat, ChatArgs, Peer, Stamp};
use crate::error::Error;
use crate::latency::Latency;
use crate::pipe::{Churn, EchoRun, Pipe};
use crate::scan;
use crate::ws::{self, opcode, Decoder, Event, HandshakeError, Rng};

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
    /// More client listeners (the other nodes of a cluster): connection `first + i` goes
    /// to the `(first + i) % (1 + len)`-th of `addr` and these.
    #[arg(long, value_delimiter = ',')]
    pub also: Vec<SocketAddr>,
    #[arg(long, value_enum)]
    pub path: Endpoint,
    /// Connections this process opens.
    #[arg(long)]
    pub count: usize,
    /// Index of this process's first connection in the whole run: user ids are
    /// `<user-prefix><index>`, and source addresses rotate by it.
    #[arg(long, default_value_t = 0)]
    pub first: usize,
    /// User ids are this followed by the connection's index in the run.
    #[arg(long, default_value = "b")]
    pub user_prefix: String,
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
    /// Never sleep in epoll: poll, and yield the CPU when nothing is ready. The server's
    /// sends then do not pay for waking this process (on loopback the sender's CPU runs the
    /// receiver's wake-up), at the price of this process's CPU.
    #[arg(long)]
    pub spin: bool,
    /// The server is a plain TCP echo (no WebSocket): requests and frames come back as sent.
    #[arg(long)]
    pub raw: bool,
    /// Connections that end after the connect phase come back, as behind a load balancer
    /// (see the module docs).
    #[arg(long)]
    pub lb: bool,
    /// Count the `msg` frames of this conversation per seq, with the time of the last read.
    #[arg(long)]
    pub watch_conv: Option<String>,
    #[command(flatten)]
    pub chat: ChatArgs,
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

/// A masked ping without payload: what a raw echo sends back per ping.
const PING_LEN: u64 = 6;

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
    /// The IM state, with `--chat`.
    peer: Option<Box<Peer>>,
    /// The text message being read was handed over whole from its one piece.
    handled: bool,
    /// Messages in flight of an echo load.
    pipe: Option<Box<Pipe>>,
    /// Pings sent by the client whose pongs have not come back.
    pings_out: u32,
    /// `--raw`: bytes of the request still to come back while upgrading, then bytes come
    /// back and not yet accounted for.
    raw_want: u32,
    raw_in: u64,
    /// `--lb`: the node (index into `--addr` and `--also`) this connection goes to.
    node: u8,
    /// `--lb`: the connection was up, ended, and is being brought back.
    lb_down: bool,
    /// `--lb`: attempts since it went down (the backoff's exponent).
    attempts: u8,
    /// What the last attempt ran into, for the choice of the wait.
    hint: Hint,
    /// A wait the server asked for: a 1001 close's `reconnect_after_ms`, a 503's
    /// `Retry-After`, in milliseconds.
    after_ms: Option<u32>,
    /// `--lb`: when it went down.
    down_at: Option<Instant>,
}

/// What a failed attempt ran into (`--lb`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hint {
    None,
    /// The TCP connect was refused: the node is gone.
    Refused,
    /// A 503 before the upgrade.
    Busy,
    /// A 1001 close (the node drains).
    GoingAway,
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
            peer: None,
            handled: false,
            pipe: None,
            pings_out: 0,
            raw_want: 0,
            raw_in: 0,
            node: 0,
            lb_down: false,
            attempts: 0,
            hint: Hint::None,
            after_ms: None,
            down_at: None,
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

    /// Handles frames from the server, read at `at`. `Err` ends the connection with the
    /// reason.
    fn on_frames(
        &mut self,
        mut input: &[u8],
        stats: &mut Stats,
        rng: &mut Rng,
        chat: &mut Option<Chat>,
        echo: &mut Option<EchoRun>,
        at: Stamp,
    ) -> Result<(), String> {
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
                        self.handled = false;
                    }
                }
                Event::Payload(p) => {
                    if opcode::is_control(self.frame.opcode) {
                        let at = self.ctl_len as usize;
                        self.ctl[at..at + p.len()].copy_from_slice(p);
                        self.ctl_len += p.len() as u8;
                    } else if let (Some(run), true) = (echo.as_ref(), self.pipe.is_some()) {
                        run.check(self.msg_opcode, self.msg_len, p)?;
                        self.msg_len += p.len() as u64;
                    } else if let (Some(chat), Some(peer)) = (chat.as_mut(), self.peer.as_deref_mut()) {
                        if self.msg_opcode != opcode::TEXT {
                            return Err("unexpected binary message".into());
                        }
                        let whole = self.msg_len == 0 && self.frame.fin && p.len() as u64 == self.frame.len;
                        self.msg_len += p.len() as u64;
                        if whole {
                            // The usual case: the message is in the read buffer, use it there.
                            self.handled = true;
                            self.ready |= chat.on_text(peer, p, at, &mut self.out, rng);
                        } else {
                            peer.gather(p)?;
                        }
                    } else {
                        if self.msg_opcode == opcode::TEXT && self.msg_len == 0 {
                            let whole = self.frame.fin && p.len() as u64 == self.frame.len;
                            stats.watch_msg(p, whole);
                        }
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
                    opcode::PONG if self.pings_out > 0 => {
                        self.pings_out -= 1;
                        stats.client_pongs += 1;
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
                        if code == 1001 {
                            self.hint = Hint::GoingAway;
                            let reason = &self.ctl[2.min(self.ctl_len as usize)..self.ctl_len as usize];
                            self.after_ms =
                                scan::number_after(reason, b"reconnect_after_ms=").map(|ms| ms as u32);
                        }
                        return Err(format!("closed by the server with {code}"));
                    }
                    _ if self.frame.fin && self.pipe.is_some() => {
                        if let Some(run) = echo.as_mut() {
                            if self.msg_len != run.size {
                                return Err(format!("echo of {} bytes, {} sent", self.msg_len, run.size));
                            }
                            self.on_echo(run, rng, at.read)?;
                        }
                    }
                    _ if self.frame.fin => match (chat.as_mut(), self.peer.as_deref_mut()) {
                        (Some(chat), Some(peer)) => {
                            if !self.handled {
                                let text = peer.take_text();
                                self.ready |= chat.on_text(peer, &text, at, &mut self.out, rng);
                                peer.return_text(text);
                            }
                        }
                        _ => self.on_message(stats)?,
                    },
                    _ => {}
                },
            }
        }
    }

    /// One echo came back whole at `now`: its round trip ends, and while the load lasts
    /// the next message goes out in its place.
    fn on_echo(&mut self, run: &mut EchoRun, rng: &mut Rng, now: u64) -> Result<(), String> {
        let Some(pipe) = self.pipe.as_deref_mut() else { return Ok(()) };
        let Some(sent) = pipe.sent_at.pop_front() else {
            return Err("an echo of a message never sent".into());
        };
        run.echoed(sent, now);
        if run.sending(now) {
            pipe.send(run, &mut self.out, rng.mask(), now);
        }
        Ok(())
    }

    /// `--raw`: bytes from a plain TCP echo. While upgrading, the request coming back
    /// whole stands for the `101`; after it, see [`Conn::on_raw`].
    fn raw_read(
        &mut self,
        data: &[u8],
        stats: &mut Stats,
        rng: &mut Rng,
        echo: &mut Option<EchoRun>,
        now: u64,
    ) -> Result<(), String> {
        let mut n = data.len() as u64;
        if self.state == State::Upgrading {
            let take = n.min(u64::from(self.raw_want));
            self.raw_want -= take as u32;
            n -= take;
            if self.raw_want > 0 {
                return Ok(());
            }
            self.state = State::Open;
            self.ready = true;
            self.key = String::new();
        }
        self.on_raw(n, stats, rng, echo, now)
    }

    /// `--raw`: `n` more bytes came back; whole echo frames and pings are accounted for.
    fn on_raw(
        &mut self,
        n: u64,
        stats: &mut Stats,
        rng: &mut Rng,
        echo: &mut Option<EchoRun>,
        now: u64,
    ) -> Result<(), String> {
        self.raw_in += n;
        if let (Some(run), true) = (echo.as_mut(), self.pipe.is_some()) {
            while self.raw_in >= run.frame_len {
                self.raw_in -= run.frame_len;
                self.on_echo(run, rng, now)?;
            }
        }
        while self.pings_out > 0 && self.raw_in >= PING_LEN {
            self.raw_in -= PING_LEN;
            self.pings_out -= 1;
            stats.client_pongs += 1;
        }
        Ok(())
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

    fn on_message(&mut self, stats: &mut Stats) -> Result<(), String> {
        match self.msg_opcode {
            opcode::TEXT => {
                let n = (self.msg_len as usize).min(PREFIX);
                if self.prefix[..n].starts_with(b"{\"op\":\"hello\"") {
                    self.ready = true;
                } else if self.prefix[..n].starts_with(b"{\"op\":\"push\"") {
                    stats.pushes += 1;
                    stats.push_last_ns = chat::now_ns();
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
    /// Pongs read for the client's own pings.
    client_pongs: u64,
    /// `push` frames read, and when the last one was read (`CLOCK_MONOTONIC` ns).
    pushes: u64,
    push_last_ns: u64,
    /// `--watch-conv`: its `msg` frames per seq.
    watch: Option<Watch>,
}

/// The `msg` frames of one conversation (`--watch-conv`), per seq.
#[derive(Debug, Default)]
struct Watch {
    conv: Vec<u8>,
    /// Seq -> (frames read, the last read's `CLOCK_MONOTONIC` ns).
    seqs: BTreeMap<u64, (u64, u64)>,
    /// Text messages that did not come whole in one read: not looked at (should be 0).
    split: u64,
}

impl Stats {
    /// A text message's first piece; `whole` when it is the whole message.
    fn watch_msg(&mut self, text: &[u8], whole: bool) {
        let Some(w) = self.watch.as_mut() else { return };
        if !whole {
            w.split += 1;
            return;
        }
        if scan::op(text) != scan::Op::Msg || scan::string_after(text, b"\"conv\":") != Some(&w.conv[..]) {
            return;
        }
        if let Some(seq) = scan::number_after(text, b"\"seq\":") {
            let e = w.seqs.entry(seq).or_default();
            e.0 += 1;
            e.1 = chat::now_ns();
        }
    }
}

/// The load-balancer reconnects (`--lb`).
#[derive(Debug, Default)]
struct Lb {
    /// Connections waiting to reconnect: (due, index).
    due: BinaryHeap<Reverse<(Instant, usize)>>,
    /// The next node in turn.
    rr: usize,
    /// Connections that were up and ended.
    down: u64,
    /// Of those, back up.
    back: u64,
    /// How they ended: a 1001 close, anything else (EOF, reset, another close).
    closes_1001: u64,
    lost: u64,
    /// Attempts refused: TCP connect refused (node gone), HTTP 503.
    refused_connect: u64,
    refused_503: u64,
    /// 503s that carried `Retry-After`, and the largest one (seconds).
    retry_after_n: u64,
    retry_after_max_s: u64,
    /// When the last connection came back (`CLOCK_MONOTONIC` ns).
    last_up_ns: u64,
    /// Each connection's time from down to up, since the last `lb` command.
    back_times: Latency,
}

/// The pings in progress (`ping MS`).
#[derive(Debug)]
struct PingRun {
    started: Instant,
    /// Done when `Stats::client_pongs` reaches this.
    want: u64,
    base: u64,
    deadline: Instant,
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
    /// The IM side, with `--chat`.
    chat: Option<Chat>,
    /// Indexes of the connections whose users send.
    senders: Vec<usize>,
    /// The sender the next paced send goes out on.
    next_sender: usize,
    /// The load phase in progress (`go`).
    load: Option<Load>,
    /// The fan-out receipts being waited for (`fan`, `flood`).
    wait: Option<SeqWait>,
    /// `CLOCK_REALTIME - CLOCK_MONOTONIC`, for kernel receive stamps.
    realtime_offset: i64,
    /// Handshakes in flight at most: `--concurrency`, unbounded during a storm.
    concurrency: usize,
    /// The echo load in progress (`echo`).
    echo: Option<EchoRun>,
    /// The upgrade churn in progress (`churn`), and the slots to start again.
    churn: Option<Churn>,
    respawn: Vec<usize>,
    /// When the storm in progress began, and each connection's time back up.
    storm: Option<Instant>,
    back: Latency,
    /// The client pings in progress (`ping`).
    ping: Option<PingRun>,
    /// `--lb`: the reconnects.
    lb: Option<Lb>,
}

/// A load phase (`go RATE WINDOW MS`).
#[derive(Debug)]
struct Load {
    started: u64,
    /// Sends stop at this clock time; then the drain.
    end: u64,
    /// Sends a second from this process (0: closed loop).
    rate: f64,
    /// Paced sends made so far.
    paced: u64,
}

/// What a `fan` or `flood` waits for: every local receiver has read seqs `first..=last`.
#[derive(Debug)]
struct SeqWait {
    flood: bool,
    first: u64,
    last: u64,
    /// Local connections that should read each seq (all but the sender).
    receivers: u64,
    deadline: Instant,
}

/// Longest a phase waits after its window for the last acks and messages.
const DRAIN_LIMIT: Duration = Duration::from_secs(5);

/// The drain ends early once every send is acked and nothing has arrived for this long.
const DRAIN_QUIET: Duration = Duration::from_millis(300);

/// Most paced sends made in one turn of the loop, so reads are not starved.
const SENDS_PER_TURN: u64 = 2000;

/// Runs one client process until the parent says exit (or closes stdin).
pub fn run(args: FleetArgs) -> Result<(), Error> {
    if let Some(cpu) = args.cpu {
        crate::server::pin_current(cpu).map_err(|e| Error::io(format!("pin to cpu {cpu}"), e))?;
    }
    // Paced sends wake on time to the microsecond, not within the default 50 µs of slack.
    // SAFETY: PR_SET_TIMERSLACK takes a number of nanoseconds and changes only this thread.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong) };
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
    let mut conns: Vec<Conn> = (0..args.count).map(|_| Conn::new()).collect();
    let mut chat = None;
    let mut senders = Vec::new();
    if args.chat.chat {
        let (state, peers) = Chat::new(&args.chat, args.first, args.count);
        for (i, (conn, peer)) in conns.iter_mut().zip(peers).enumerate() {
            if peer.sender {
                senders.push(i);
            }
            conn.peer = Some(Box::new(peer));
        }
        chat = Some(state);
    }
    let mut fleet = Fleet {
        conns,
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
        chat,
        senders,
        next_sender: 0,
        load: None,
        wait: None,
        realtime_offset: chat::realtime_offset(),
        concurrency: 0,
        echo: None,
        churn: None,
        respawn: Vec::new(),
        storm: None,
        back: Latency::new(),
        ping: None,
        lb: None,
    };
    if fleet.args.lb {
        fleet.lb = Some(Lb::default());
        let nodes = 1 + fleet.args.also.len();
        let first = fleet.args.first;
        for (i, conn) in fleet.conns.iter_mut().enumerate() {
            conn.node = ((first + i) % nodes) as u8;
        }
    }
    if let Some(conv) = &fleet.args.watch_conv {
        fleet.stats.watch = Some(Watch { conv: conv.as_bytes().to_vec(), ..Watch::default() });
    }
    fleet.concurrency = fleet.args.concurrency.max(1);
    fleet.run_loop()
}

impl Fleet {
    fn run_loop(&mut self) -> Result<(), Error> {
        let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 1024];
        let mut last_sweep = Instant::now();
        while !self.exit {
            self.start_more();
            self.respawn();
            self.lb_due();
            // Wake for the next paced send (to the nanosecond: epoll_pwait2), else for the sweeps.
            let wait = match self.args.spin {
                true => Duration::ZERO,
                false => self.until_next_send().unwrap_or(Duration::from_millis(50)),
            };
            let timeout = libc::timespec { tv_sec: 0, tv_nsec: wait.as_nanos() as libc::c_long };
            // SAFETY: `events` is valid for its length; the epoll fd is ours; no signal mask.
            let n = unsafe {
                libc::epoll_pwait2(
                    self.epoll.as_raw_fd(),
                    events.as_mut_ptr(),
                    events.len() as i32,
                    &timeout,
                    std::ptr::null(),
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(Error::io("epoll_wait", e));
            }
            if n == 0 && self.args.spin {
                // Let the other client processes on this CPU run.
                // SAFETY: sched_yield has no preconditions.
                unsafe { libc::sched_yield() };
            }
            for ev in &events[..n as usize] {
                let (token, flags) = (ev.u64, ev.events);
                if token == STDIN_TOKEN {
                    self.on_stdin()?;
                } else {
                    self.on_event(token as usize, flags);
                }
            }
            self.pace();
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
        while self.next < self.conns.len() && self.in_flight < self.concurrency {
            let i = self.next;
            self.next += 1;
            self.conns[i].started = Instant::now();
            match self.start(i) {
                Ok(()) => self.in_flight += 1,
                Err(e) => self.fail(i, format!("connect: {}", e.kind())),
            }
        }
    }

    /// Where connection `i` goes.
    fn dest(&self, i: usize) -> SocketAddr {
        let node = match self.lb {
            Some(_) => self.conns[i].node as usize,
            None => self.args.first + i,
        };
        match node % (1 + self.args.also.len()) {
            0 => self.args.addr,
            k => self.args.also[k - 1],
        }
    }

    fn start(&mut self, i: usize) -> io::Result<()> {
        let k = self.args.source_ips.max(1) as usize;
        let source = (k > 1).then(|| ((self.args.first + i) % k) as u8 + 1);
        let fd = start_connect(self.dest(i), source, self.args.chat.kernel_stamps)?;
        let raw = fd.as_raw_fd();
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
                if errno == libc::ECONNREFUSED {
                    self.conns[i].hint = Hint::Refused;
                }
                return self.fail(i, format!("connect: {}", io::Error::from_raw_os_error(errno).kind()));
            }
            Err(e) => return self.fail(i, format!("connect: {}", e.kind())),
        }
        let target = match self.args.path {
            Endpoint::Echo => "/echo".to_string(),
            Endpoint::Ws => {
                // With `--devices D` (IM), connection j is user j / D on device `d<j % D>`.
                let (j, d) = (self.args.first + i, self.args.chat.devices());
                let user = format!("{}{}", self.args.user_prefix, j / d);
                let device = if d == 1 { "d".to_string() } else { format!("d{}", j % d) };
                match ringpush::auth::mint(&self.args.secret, &user, &device, TOKEN_TTL_SECS) {
                    Ok(token) => format!("/ws?token={token}"),
                    Err(e) => return self.fail(i, format!("mint a token: {e}")),
                }
            }
        };
        let key = ws::new_key(&mut self.rng);
        let host = self.dest(i).to_string();
        let conn = &mut self.conns[i];
        let request = ws::upgrade_request(&host, &target, &key);
        conn.raw_want = request.len() as u32;
        conn.out.extend_from_slice(request.as_bytes());
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
            let read = if self.args.chat.kernel_stamps {
                chat::recv_stamped(raw, &mut self.read_buf)
            } else {
                // SAFETY: `read_buf` is valid for its length; `raw` is this connection's socket.
                let n = unsafe { libc::read(raw, self.read_buf.as_mut_ptr().cast(), self.read_buf.len()) };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok((n as usize, None))
                }
            };
            let (n, arrival) = match read {
                Ok(read) => read,
                Err(e) => match e.kind() {
                    io::ErrorKind::WouldBlock => break,
                    io::ErrorKind::Interrupted => continue,
                    kind => return self.fail(i, format!("read: {kind}")),
                },
            };
            if n == 0 {
                return self.fail(i, "closed by the server (EOF)".into());
            }
            let at = match self.chat.is_some() || self.echo.is_some() {
                true => Stamp {
                    read: chat::now_ns(),
                    arrival: arrival.map(|real| (real as i64 - self.realtime_offset).max(0) as u64),
                },
                false => Stamp::default(),
            };
            // A short read emptied the socket: epoll (level-triggered) reports more when it
            // comes, so the read that would only say EAGAIN is saved.
            let drained = n < self.read_buf.len();
            let data = &self.read_buf[..n];
            let conn = &mut self.conns[i];
            let result = if self.args.raw {
                conn.raw_read(data, &mut self.stats, &mut self.rng, &mut self.echo, at.read)
            } else if conn.state == State::Upgrading {
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
                        let rest = &head[head_len..];
                        conn.on_frames(
                            rest,
                            &mut self.stats,
                            &mut self.rng,
                            &mut self.chat,
                            &mut self.echo,
                            at,
                        )
                    }
                    Err(e) => {
                        if e == HandshakeError::Status(503) {
                            conn.hint = Hint::Busy;
                            conn.after_ms = ws::retry_after(&conn.head).map(|s| (s * 1000) as u32);
                        }
                        Err(format!("handshake: {e}"))
                    }
                }
            } else {
                conn.on_frames(data, &mut self.stats, &mut self.rng, &mut self.chat, &mut self.echo, at)
            };
            if let Err(why) = result {
                // Best effort: the close (or pong) queued before the error goes out now.
                let _ = self.conns[i].flush(&mut self.scratch);
                return self.fail(i, why);
            }
            self.flush(i);
            if drained {
                break;
            }
        }
    }

    /// Counts what connection `i` just achieved: connected, burst done.
    fn after_progress(&mut self, i: usize) {
        let conn = &mut self.conns[i];
        if conn.state == State::Open && conn.ready && !conn.up {
            if let Some(churn) = self.churn.as_mut() {
                churn.upgraded(chat::now_ns(), conn.started.elapsed().as_nanos() as u64);
                return self.recycle(i);
            }
            if let Some(storm) = self.storm {
                self.back.record_ns(storm.elapsed().as_nanos() as u64);
            }
            conn.up = true;
            if conn.lb_down {
                conn.lb_down = false;
                conn.attempts = 0;
                if let Some(lb) = self.lb.as_mut() {
                    lb.back += 1;
                    lb.last_up_ns = chat::now_ns();
                    if let Some(t) = conn.down_at.take() {
                        lb.back_times.record_ns(t.elapsed().as_nanos() as u64);
                    }
                }
            }
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
        if self.lb.is_some() && self.connect_done && (up || conn.lb_down) {
            return self.lb_lost(i, why);
        }
        conn.state = State::Done;
        // Dropping the fd removes it from the epoll set.
        conn.fd = None;
        conn.head = Vec::new();
        conn.out = Vec::new();
        conn.held = Vec::new();
        if conn.pipe.take().is_some() {
            if let Some(run) = self.echo.as_mut() {
                run.errors += 1;
            }
            eprintln!("idle-worker: connection {} ended during the echo load: {why}", self.args.first + i);
        }
        if let Some(ping) = self.ping.as_mut() {
            ping.want -= u64::from(conn.pings_out);
        }
        conn.pings_out = 0;
        if let Some(churn) = self.churn.as_mut() {
            churn.failed(chat::now_ns());
            *self.failures.entry(why).or_default() += 1;
            return self.recycle(i);
        }
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
        let churning = self.churn.is_some();
        if self.connect_done && !churning && self.lb.is_none() {
            return;
        }
        let limit = Duration::from_millis(self.args.handshake_timeout_ms);
        let phase_over = !churning
            && !self.connect_done
            && self.started.elapsed() > Duration::from_secs(self.args.connect_timeout_secs);
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
            if self.storm.take().is_some() {
                say(&self.back.line("back"))?;
                self.concurrency = self.args.concurrency.max(1);
            }
        }
        self.report_chat()?;
        self.report_load()?;
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
        match read_stdin(&mut self.stdin_buf)? {
            None => self.exit = true,
            Some(lines) => {
                for line in lines {
                    self.command(&line)?;
                }
            }
        }
        Ok(())
    }

    fn command(&mut self, line: &str) -> Result<(), Error> {
        let words: Vec<&str> = line.split_whitespace().collect();
        let bad = || Error::Worker(format!("bad command {line:?}"));
        let numbers: Vec<u64> =
            words.iter().skip(1).map(|w| w.parse().map_err(|_| bad())).collect::<Result<_, _>>()?;
        match (words.first().copied(), numbers.as_slice()) {
            (Some("go" | "fan" | "flood"), _) if self.chat.is_none() => {
                return Err(Error::Worker(format!("{line:?} needs --chat")))
            }
            (Some("go"), &[rate, window, ms]) => self.start_load(rate, window, ms),
            (Some("fan"), &[seq, ms]) => self.start_wait(false, seq, 1, ms),
            (Some("flood"), &[first, count, ms]) if count > 0 => self.start_wait(true, first, count, ms),
            (Some("exit"), _) => self.exit = true,
            (Some("stats"), _) => {
                let s = &self.stats;
                say(&format!(
                    "stats open {} hello {} pings {} pongs {} closed {}",
                    s.open, s.hello, s.pings, s.pongs, s.closed
                ))?;
            }
            (Some("burst"), &[size]) => self.start_burst(size),
            (Some("ping"), &[ms]) => self.start_ping(ms),
            (Some("echo"), &[size, depth, op, start, end]) => {
                self.start_echo(size, depth, op as u8, start, end)
            }
            (Some("churn"), &[start, end]) => self.start_churn(start, end),
            (Some("storm"), _) => self.start_storm(),
            (Some("pushes"), _) => {
                say(&format!("pushes got {} last_ns {}", self.stats.pushes, self.stats.push_last_ns))?
            }
            (Some("receipts"), _) => {
                let mut line = String::from("receipts");
                if let Some(w) = &self.stats.watch {
                    line += &format!(" split {}", w.split);
                    for (seq, (count, last)) in &w.seqs {
                        line += &format!(" seq {seq} got {count} last_ns {last}");
                    }
                }
                say(&line)?;
            }
            (Some("lb"), _) => self.report_lb()?,
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

/// The `ping`, `echo`, `churn` and `storm` commands ([`crate::pipe`]).
impl Fleet {
    /// `ping MS`: one ping on every open connection; the answer once all pongs are back.
    fn start_ping(&mut self, ms: u64) {
        let mut sent = 0;
        for i in 0..self.conns.len() {
            let conn = &mut self.conns[i];
            if conn.state == State::Open && conn.up {
                conn.queue_control(opcode::PING, &[], &mut self.rng);
                conn.pings_out += 1;
                sent += 1;
                self.flush(i);
            }
        }
        let base = self.stats.client_pongs;
        let now = Instant::now();
        self.ping = Some(PingRun {
            started: now,
            want: base + sent,
            base,
            deadline: now + Duration::from_millis(ms),
        });
    }

    /// `echo SIZE DEPTH OPCODE START END`: DEPTH messages in flight on every open connection.
    fn start_echo(&mut self, size: u64, depth: u64, op: u8, start: u64, end: u64) {
        let mut run = EchoRun::new(size as usize, op, start, end);
        let now = chat::now_ns();
        for i in 0..self.conns.len() {
            let conn = &mut self.conns[i];
            if conn.state != State::Open || !conn.up {
                continue;
            }
            let mut pipe = Box::<Pipe>::default();
            for _ in 0..depth {
                pipe.send(&mut run, &mut conn.out, self.rng.mask(), now);
            }
            conn.pipe = Some(pipe);
            self.flush(i);
        }
        self.echo = Some(run);
    }

    /// `churn START END`: every slot is reset and starts over.
    fn start_churn(&mut self, start: u64, end: u64) {
        self.churn = Some(Churn::new(start, end));
        self.failures.clear();
        for i in 0..self.conns.len() {
            if self.conns[i].up {
                self.stats.open -= 1;
            }
            self.recycle(i);
        }
    }

    /// A churn slot is done with its connection: reset it (dropping the socket resets
    /// the TCP connection, `SO_LINGER` 0), and start it again while the churn goes on.
    fn recycle(&mut self, i: usize) {
        let going = self.churn.as_ref().is_some_and(|c| c.going(chat::now_ns()));
        let conn = &mut self.conns[i];
        *conn = Conn::new();
        if going {
            self.respawn.push(i);
        } else {
            conn.state = State::Done;
        }
    }

    /// Starts the churn slots that were recycled.
    fn respawn(&mut self) {
        if self.respawn.is_empty() {
            return;
        }
        let going = self.churn.as_ref().is_some_and(|c| c.going(chat::now_ns()));
        for i in std::mem::take(&mut self.respawn) {
            if !going {
                self.conns[i].state = State::Done;
                continue;
            }
            self.conns[i].started = Instant::now();
            if let Err(e) = self.start(i) {
                self.fail(i, format!("connect: {}", e.kind()));
            }
        }
    }

    /// `storm`: every connection is reset at once, then all reconnect at once.
    fn start_storm(&mut self) {
        for conn in &mut self.conns {
            *conn = Conn::new();
        }
        self.stats.open = 0;
        self.next = 0;
        self.in_flight = 0;
        self.connect_ok = 0;
        self.connect_failed = 0;
        self.failures.clear();
        self.connect_done = false;
        self.started = Instant::now();
        self.concurrency = usize::MAX;
        self.back.reset();
        self.storm = Some(self.started);
    }

    /// Answers `ping`, `echo` and `churn` once they are over.
    fn report_load(&mut self) -> Result<(), Error> {
        if let Some(p) = &self.ping {
            if self.stats.client_pongs >= p.want || Instant::now() > p.deadline {
                let ok = self.stats.client_pongs - p.base;
                let missing = p.want.saturating_sub(self.stats.client_pongs);
                say(&format!("pinged ok {ok} missing {missing} ms {}", p.started.elapsed().as_millis()))?;
                self.ping = None;
            }
        }
        let now = chat::now_ns();
        if let Some(run) = &self.echo {
            if now >= run.end {
                let inflight: u64 =
                    self.conns.iter().filter_map(|c| c.pipe.as_ref()).map(|p| p.sent_at.len() as u64).sum();
                let drained = Duration::from_nanos(now - run.end) >= DRAIN_LIMIT;
                if inflight == 0 || drained {
                    say(&run.line(inflight))?;
                    say(&run.rtt.line("rtt"))?;
                    for conn in &mut self.conns {
                        conn.pipe = None;
                    }
                    self.echo = None;
                }
            }
        }
        if let Some(churn) = &self.churn {
            let busy = self
                .conns
                .iter()
                .any(|c| matches!(c.state, State::Connecting | State::Upgrading | State::Open));
            if now >= churn.end && self.respawn.is_empty() && !busy {
                for (why, n) in &self.failures {
                    eprintln!("idle-worker: {n} upgrades failed: {why}");
                }
                say(&churn.line())?;
                say(&churn.upgrade.line("upgrade"))?;
                self.churn = None;
            }
        }
        Ok(())
    }
}

/// The load-balancer reconnects (`--lb`).
impl Fleet {
    /// Connection `i`, up before or on its way back, ended (`why`): it is brought back
    /// after the wait the server asked for, or a backoff, to the next node in turn.
    fn lb_lost(&mut self, i: usize, why: String) {
        let Some(lb) = self.lb.as_mut() else { return };
        let nodes = 1 + self.args.also.len();
        let old = std::mem::replace(&mut self.conns[i], Conn::new());
        let conn = &mut self.conns[i];
        if old.up {
            self.stats.open -= 1;
            lb.down += 1;
            match old.hint {
                Hint::GoingAway => lb.closes_1001 += 1,
                _ => lb.lost += 1,
            }
            if lb.down - lb.back <= 3 && lb.down <= 3 {
                eprintln!("idle-worker: connection b{} down: {why}", self.args.first + i);
            }
            conn.down_at = Some(Instant::now());
        } else {
            if old.state != State::Idle {
                self.in_flight -= 1;
            }
            conn.down_at = old.down_at;
            conn.attempts = old.attempts;
        }
        conn.lb_down = true;
        let backoff = |attempts: u8, rng: &mut Rng| {
            // Full jitter: uniform below 1 s doubling to 8 s.
            let cap = 1000u64 << attempts.min(3);
            Duration::from_millis(rng.next_u64() % cap)
        };
        let wait = match (old.hint, old.after_ms) {
            (Hint::Refused, _) => {
                lb.refused_connect += 1;
                // The balancer fails over at once; past a round of refusals, back off.
                conn.attempts = conn.attempts.saturating_add(1);
                if (conn.attempts as usize) < nodes {
                    Duration::ZERO
                } else {
                    backoff(conn.attempts - nodes as u8, &mut self.rng)
                }
            }
            (Hint::Busy, after) => {
                lb.refused_503 += 1;
                conn.attempts = conn.attempts.saturating_add(1);
                if let Some(ms) = after {
                    lb.retry_after_n += 1;
                    lb.retry_after_max_s = lb.retry_after_max_s.max(u64::from(ms) / 1000);
                }
                // A full or draining node: the balancer tries the next one at once (nginx:
                // `proxy_next_upstream http_503`); once every node refused, the client
                // waits what it was told.
                match after {
                    _ if (conn.attempts as usize) < nodes => Duration::ZERO,
                    Some(ms) => Duration::from_millis(u64::from(ms)),
                    None => backoff(conn.attempts, &mut self.rng),
                }
            }
            (Hint::GoingAway, Some(ms)) if old.up => Duration::from_millis(u64::from(ms)),
            _ => {
                let wait = backoff(conn.attempts, &mut self.rng);
                conn.attempts = conn.attempts.saturating_add(1);
                wait
            }
        };
        conn.node = match old.hint {
            // Failing over: the next node after the one that refused.
            Hint::Refused | Hint::Busy => ((old.node as usize + 1) % nodes) as u8,
            _ => {
                lb.rr = lb.rr.wrapping_add(1);
                ((lb.rr - 1) % nodes) as u8
            }
        };
        lb.due.push(Reverse((Instant::now() + wait, i)));
    }

    /// Starts the reconnects that are due.
    fn lb_due(&mut self) {
        let now = Instant::now();
        loop {
            let Some(lb) = self.lb.as_mut() else { return };
            match lb.due.peek() {
                Some(Reverse((due, _))) if *due <= now => {}
                _ => return,
            }
            let Some(Reverse((_, i))) = lb.due.pop() else { return };
            self.conns[i].started = now;
            match self.start(i) {
                Ok(()) => self.in_flight += 1,
                Err(e) => self.fail(i, format!("connect: {}", e.kind())),
            }
        }
    }

    /// `lb`: the reconnect counters, then the times back since the last `lb`.
    fn report_lb(&mut self) -> Result<(), Error> {
        let open = self.stats.open;
        let Some(lb) = self.lb.as_mut() else {
            return Err(Error::Worker("lb needs --lb".into()));
        };
        say(&format!(
            "lb open {open} down {} back {} closes_1001 {} lost {} refused_connect {} refused_503 {} \
             retry_after_n {} retry_after_max_s {} pending {} last_up_ns {}",
            lb.down,
            lb.back,
            lb.closes_1001,
            lb.lost,
            lb.refused_connect,
            lb.refused_503,
            lb.retry_after_n,
            lb.retry_after_max_s,
            lb.due.len(),
            lb.last_up_ns
        ))?;
        say(&lb.back_times.line("back"))?;
        lb.back_times.reset();
        Ok(())
    }
}

/// The IM phases (`--chat`): load, fan-out waits.
impl Fleet {
    /// `go RATE WINDOW MS`: RATE sends a second over the whole run (this process makes
    /// its senders' share), or with RATE 0 a closed loop of WINDOW sends per sender.
    fn start_load(&mut self, rate: u64, window: u64, ms: u64) {
        let Some(chat) = self.chat.as_mut() else { return };
        let now = chat::now_ns();
        let end = now + ms * 1_000_000;
        chat.start_phase(end, rate == 0);
        let share = self.senders.len() as f64 / chat.plan().senders.max(1) as f64;
        self.load = Some(Load { started: now, end, rate: rate as f64 * share, paced: 0 });
        if rate == 0 {
            for k in 0..self.senders.len() {
                let i = self.senders[k];
                for _ in 0..window {
                    self.send_on(i);
                }
                self.flush(i);
            }
        }
    }

    /// Writes the next message of connection `i` (a sender) into its output, if it is up.
    fn send_on(&mut self, i: usize) -> bool {
        let (Some(chat), conn) = (self.chat.as_mut(), &mut self.conns[i]) else { return false };
        if conn.state != State::Open || !conn.up {
            return false;
        }
        let Some(peer) = conn.peer.as_deref_mut() else { return false };
        chat.write_send(peer, &mut conn.out, &mut self.rng, chat::now_ns());
        true
    }

    /// Time until the next open-loop send is due, while a phase paces sends.
    fn until_next_send(&self) -> Option<Duration> {
        let load = self.load.as_ref().filter(|l| l.rate > 0.0)?;
        let now = chat::now_ns();
        if now >= load.end || self.senders.is_empty() {
            return None;
        }
        let due_at = load.started + ((load.paced + 1) as f64 * 1e9 / load.rate) as u64;
        Some(Duration::from_nanos(due_at.saturating_sub(now).min(50_000_000)))
    }

    /// Makes the open-loop sends that are due, round robin over the local senders.
    fn pace(&mut self) {
        let Some(load) = self.load.as_mut() else { return };
        let now = chat::now_ns();
        if load.rate <= 0.0 || now >= load.end || self.senders.is_empty() {
            return;
        }
        let due = ((now - load.started) as f64 * load.rate / 1e9) as u64;
        let mut n = due.saturating_sub(load.paced).min(SENDS_PER_TURN);
        load.paced += n;
        let mut misses = 0;
        while n > 0 && misses < self.senders.len() {
            let i = self.senders[self.next_sender % self.senders.len()];
            self.next_sender = self.next_sender.wrapping_add(1);
            if self.send_on(i) {
                self.flush(i);
                n -= 1;
                misses = 0;
            } else {
                misses += 1;
            }
        }
    }

    /// `fan SEQ MS` and `flood FIRST COUNT MS`: the local sender sends, then the receipts
    /// of `first..first + count` are awaited.
    fn start_wait(&mut self, flood: bool, first: u64, count: u64, ms: u64) {
        let receivers = self
            .conns
            .iter()
            .filter(|c| c.state == State::Open && c.up && c.peer.as_ref().is_some_and(|p| !p.sender))
            .count() as u64;
        if let Some(&i) = self.senders.first() {
            for _ in 0..count {
                self.send_on(i);
            }
            self.flush(i);
        }
        let last = first + count - 1;
        self.wait = Some(SeqWait {
            flood,
            first,
            last,
            receivers,
            deadline: Instant::now() + Duration::from_millis(ms),
        });
    }

    /// Tells the parent when a load phase has drained or a fan-out wait is over.
    fn report_chat(&mut self) -> Result<(), Error> {
        let Some(chat) = self.chat.as_mut() else { return Ok(()) };
        if let Some(load) = &self.load {
            let now = chat::now_ns();
            if now >= load.end {
                chat.end_sends(now);
                let after = Duration::from_nanos(now - load.end);
                let inflight: u64 = self
                    .senders
                    .iter()
                    .filter_map(|&i| self.conns[i].peer.as_ref())
                    .map(|p| u64::from(p.inflight()))
                    .sum();
                let quiet = Duration::from_nanos(now.saturating_sub(chat.last_rx)) >= DRAIN_QUIET;
                if (inflight == 0 && quiet && after >= DRAIN_QUIET) || after >= DRAIN_LIMIT {
                    let c = chat.counters;
                    say(&format!(
                        "done sent {} acks {} acks_win {} msgs {} msgs_win {} gaps {} errors {} seq_errors {} \
                         strays {} inflight {inflight} drain_ms {} reads_sent {} signals_sent {} reads {} \
                         reads_win {} signals {} signals_win {}",
                        c.sent,
                        c.acks,
                        c.acks_in_window,
                        c.msgs,
                        c.msgs_in_window,
                        c.gaps,
                        c.errors,
                        c.seq_errors,
                        c.strays,
                        after.as_millis(),
                        c.reads_sent,
                        c.signals_sent,
                        c.reads,
                        c.reads_in_window,
                        c.signals,
                        c.signals_in_window
                    ))?;
                    say(&chat.deliver.line("deliver"))?;
                    say(&chat.arrival.line("arrival"))?;
                    say(&chat.ack.line("ack"))?;
                    self.load = None;
                }
            }
        }
        if let Some(w) = &self.wait {
            let complete = (w.first..=w.last).all(|s| chat.seq(s).count >= w.receivers);
            if complete || Instant::now() > w.deadline {
                let seqs: Vec<_> = (w.first..=w.last).map(|s| (s, chat.seq(s))).collect();
                let got: u64 = seqs.iter().map(|(_, st)| st.count).sum();
                let want = w.receivers * (w.last - w.first + 1);
                if w.flood {
                    let t0 =
                        seqs.iter().filter(|(_, st)| st.count > 0).map(|(_, st)| st.sent).min().unwrap_or(0);
                    let read_at = seqs.iter().map(|(_, st)| st.last_read_at).max().unwrap_or(0);
                    let arrival_at = seqs.iter().map(|(_, st)| st.last_arrival_at).max().unwrap_or(0);
                    say(&format!(
                        "flood got {got} want {want} t0 {t0} last_read_at {read_at} last_arrival_at {arrival_at}"
                    ))?;
                    let mut line = String::from("seqlat");
                    for (s, st) in &seqs {
                        line += &format!(
                            " {s} {} {} {} {} {}",
                            st.count, st.first_read, st.last_read, st.first_arrival, st.last_arrival
                        );
                    }
                    say(&line)?;
                } else {
                    let st = seqs[0].1;
                    say(&format!(
                        "fan seq {} got {got} want {want} first_read {} last_read {} first_arrival {} last_arrival {}",
                        w.first, st.first_read, st.last_read, st.first_arrival, st.last_arrival
                    ))?;
                }
                self.wait = None;
            }
        }
        Ok(())
    }
}

/// One line to the parent.
pub fn say(line: &str) -> Result<(), Error> {
    let mut out = io::stdout().lock();
    writeln!(out, "{line}").and_then(|_| out.flush()).map_err(|e| Error::io("write to the parent", e))
}

/// Reads what the parent has written to the (non-blocking) stdin into `buf`: the whole
/// lines so far, trimmed, or `None` once stdin has closed (the parent asks to exit).
pub fn read_stdin(buf: &mut Vec<u8>) -> Result<Option<Vec<String>>, Error> {
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
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n as usize]);
    }
    let mut lines = Vec::new();
    while let Some(end) = buf.iter().position(|b| *b == b'\n') {
        let line: Vec<u8> = buf.drain(..=end).collect();
        lines.push(String::from_utf8_lossy(&line).trim().to_string());
    }
    Ok(Some(lines))
}

/// A non-blocking TCP socket to `dest` with its `connect` started (done, or in progress:
/// EPOLLOUT tells, then [`socket_error`]). It closes with a reset, so a run leaves no
/// TIME_WAIT behind to crowd the next run's ephemeral ports; TCP_NODELAY as browsers do;
/// kernel receive stamps with `stamps`; from 127.0.0.`source` when given (IPv4 only).
pub fn start_connect(dest: SocketAddr, source: Option<u8>, stamps: bool) -> io::Result<OwnedFd> {
    let ip = match dest {
        SocketAddr::V4(_) => libc::AF_INET,
        SocketAddr::V6(_) => libc::AF_INET6,
    };
    // SAFETY: plain socket creation; the fd is owned right away.
    let raw = unsafe { libc::socket(ip, libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let linger = libc::linger { l_onoff: 1, l_linger: 0 };
    setsockopt(raw, libc::SOL_SOCKET, libc::SO_LINGER, &linger)?;
    // A small frame goes out at once, not after the previous one's ACK.
    setsockopt(raw, libc::IPPROTO_TCP, libc::TCP_NODELAY, &1i32)?;
    if stamps {
        chat::enable_stamps(raw)?;
    }
    if let (Some(host), libc::AF_INET) = (source, ip) {
        // Port chosen at connect time, per destination: without this, every bound
        // socket would hold its port exclusively and the range would run out anyway.
        setsockopt(raw, libc::IPPROTO_IP, libc::IP_BIND_ADDRESS_NO_PORT, &1i32)?;
        let src = SocketAddr::from((Ipv4Addr::new(127, 0, 0, host), 0));
        let (storage, len) = sockaddr(&src);
        // SAFETY: `storage` holds a valid sockaddr of `len` bytes.
        if unsafe { libc::bind(raw, (&storage as *const libc::sockaddr_storage).cast(), len) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    let (storage, len) = sockaddr(&dest);
    // SAFETY: as above.
    let rc = unsafe { libc::connect(raw, (&storage as *const libc::sockaddr_storage).cast(), len) };
    if rc != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINPROGRESS) {
            return Err(e);
        }
    }
    Ok(fd)
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

pub fn epoll_ctl(epfd: RawFd, op: i32, fd: RawFd, events: u32, token: u64) -> io::Result<()> {
    let mut ev = libc::epoll_event { events, u64: token };
    // SAFETY: `ev` lives across the call; the fds are open.
    if unsafe { libc::epoll_ctl(epfd, op, fd, &mut ev) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

pub fn set_nonblocking(fd: RawFd) -> io::Result<()> {
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
pub fn socket_error(fd: RawFd) -> io::Result<i32> {
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
