//! The `webhooks` scenario: `message.offline` events at a high rate, delivered into a
//! receiver inside the bench; events a second and server CPU per event.
//!
//! Method: the bench listens on 127.0.0.1:0 with a minimal HTTP/1.1 receiver (keep-alive,
//! `204` at once, every request's `X-Ringpush-Signature` checked unless `--no-verify`,
//! events counted by type) and starts the server with `[webhook]` pointing at it and a
//! small `offline_delay_ms`. M conversations each have one connected sender (S sender
//! connections, sender `c % S` in conversation `c`) and K members who never connect. The
//! senders then send for `--duration` seconds (closed loop, `--window` unacked each, or
//! open loop at `--rate`); each message makes K members due for a `message.offline`
//! `offline_delay_ms` later (messages of one conversation within that delay make one
//! event per member). The server's CPU and the events received are measured over the
//! same window; then the run waits until the server's webhook queue is empty and the
//! receiver has stopped receiving, and checks that every offline member's newest event
//! names its conversation's last seq.

use std::collections::HashMap;
use std::io::{self, BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::crowd::{self, Crowd, CrowdSetup};
use crate::error::Error;
use crate::latency::{Latency, Summary};
use crate::plan::Plan;
use crate::server::{self, Server, ServerSetup, API_KEY};
use crate::target::{pin_name, PinArgs};
use crate::workers::total;

/// The `[webhook] secret` of the started server.
const WEBHOOK_SECRET: &str = "ringpush-bench-webhook-secret";

/// The clients' `auth.secret`.
const AUTH_SECRET: &str = "ringpush-bench-secret";

/// `message.offline` events at a high rate into a receiver of the bench's own.
#[derive(Debug, Clone, clap::Args)]
pub struct WebhooksArgs {
    /// The ringpush binary to start (a generated config: one shard, port 0, `[webhook]`).
    #[arg(long, value_name = "PATH", default_value = "target/release/ringpush")]
    pub server_bin: PathBuf,
    /// Keep the started server's log (stderr) in FILE.
    #[arg(long, value_name = "FILE")]
    pub server_log: Option<PathBuf>,
    /// M: conversations.
    #[arg(long, default_value_t = 2000)]
    pub convs: usize,
    /// K: members of each conversation who never connect (each gets `message.offline`).
    #[arg(long, default_value_t = 10)]
    pub offline: usize,
    /// S: connected senders (sender `c % S` is the one online member of conversation `c`).
    #[arg(long, default_value_t = 100)]
    pub senders: usize,
    /// Open loop at this many sends a second (over all senders) instead of the closed loop.
    #[arg(long, value_name = "SENDS_PER_SEC")]
    pub rate: Option<u64>,
    /// Closed loop: sends each sender keeps unacked.
    #[arg(long, default_value_t = 4)]
    pub window: u64,
    /// Seconds of sending (the measured window).
    #[arg(long, default_value_t = 5)]
    pub duration: u64,
    /// `webhook.offline_delay_ms`.
    #[arg(long, default_value_t = 50)]
    pub delay_ms: u64,
    /// `webhook.max_batch`.
    #[arg(long, default_value_t = 100)]
    pub max_batch: usize,
    /// `webhook.queue_max`.
    #[arg(long, default_value_t = 1_000_000)]
    pub queue_max: usize,
    /// Do not check the requests' signatures (HMAC-SHA256 of each body on the client CPU).
    #[arg(long)]
    pub no_verify: bool,
    /// Bytes of each message body.
    #[arg(long, default_value_t = 100)]
    pub body_bytes: usize,
    /// Print one JSON line (after the human summary, which goes to stderr).
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub pin: PinArgs,
}

/// What the receiver counted so far.
#[derive(Debug, Default)]
struct Tally {
    requests: u64,
    events: u64,
    offline: u64,
    online: u64,
    offline_users: u64,
    other: u64,
    bad_signatures: u64,
    bad_requests: u64,
    /// `message.offline` events whose `last_seq` was not above the newest one already
    /// received for their (conversation, user): retries or repeats.
    repeats: u64,
    /// Newest `last_seq` per (conversation, user).
    newest: HashMap<(String, String), u64>,
    /// Wall time of receipt minus the event's newest message's `ts`.
    lag: Latency,
    last_at: Option<Instant>,
}

impl Tally {
    fn take_batch(&mut self, body: &[u8]) -> Result<(), String> {
        let v: serde_json::Value = serde_json::from_slice(body).map_err(|e| format!("body: {e}"))?;
        let events = v["events"].as_array().ok_or("no events array")?;
        let now_ms = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
        self.requests += 1;
        for e in events {
            self.events += 1;
            match e["type"].as_str() {
                Some("message.offline") => {
                    self.offline += 1;
                    let (Some(conv), Some(user), Some(last)) =
                        (e["conv"].as_str(), e["user"].as_str(), e["last_seq"].as_u64())
                    else {
                        return Err(format!("message.offline without conv/user/last_seq: {e}"));
                    };
                    let newest = self.newest.entry((conv.to_string(), user.to_string())).or_insert(0);
                    if last <= *newest {
                        self.repeats += 1;
                    }
                    *newest = (*newest).max(last);
                    if let Some(ts) = e["last"]["ts"].as_u64() {
                        self.lag.record_ns(now_ms.saturating_sub(ts) * 1_000_000);
                    }
                }
                Some("user.online") => self.online += 1,
                Some("user.offline") => self.offline_users += 1,
                _ => self.other += 1,
            }
        }
        self.last_at = Some(Instant::now());
        Ok(())
    }
}

/// The bench's webhook endpoint: a thread per connection, answering `204` at once.
struct Receiver {
    addr: SocketAddr,
    tally: Arc<Mutex<Tally>>,
}

impl Receiver {
    fn start(verify: bool, cpu: Option<usize>) -> Result<Receiver, Error> {
        let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| Error::io("bind the receiver", e))?;
        let addr = listener.local_addr().map_err(|e| Error::io("the receiver's address", e))?;
        let tally = Arc::new(Mutex::new(Tally { lag: Latency::new(), ..Tally::default() }));
        let shared = tally.clone();
        thread::Builder::new()
            .name("webhook-rx".into())
            .spawn(move || {
                if let Some(cpu) = cpu {
                    let _ = server::pin_current(cpu);
                }
                for stream in listener.incoming().flatten() {
                    let tally = shared.clone();
                    let _ = thread::Builder::new().name("webhook-conn".into()).spawn(move || {
                        if let Some(cpu) = cpu {
                            let _ = server::pin_current(cpu);
                        }
                        if let Err(e) = serve(stream, &tally, verify) {
                            if e.kind() != io::ErrorKind::UnexpectedEof {
                                eprintln!("ringpush-bench webhooks: receiver connection: {e}");
                            }
                        }
                    });
                }
            })
            .map_err(|e| Error::io("start the receiver", e))?;
        Ok(Receiver { addr, tally })
    }

    fn tally<T>(&self, f: impl FnOnce(&Tally) -> T) -> T {
        f(&self.tally.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

/// Answers one keep-alive connection's requests until it closes.
fn serve(stream: TcpStream, tally: &Mutex<Tally>, verify: bool) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let mut out = stream.try_clone()?;
    let mut reader = BufReader::with_capacity(64 * 1024, stream);
    let mut head = Vec::with_capacity(1024);
    let mut body = Vec::new();
    loop {
        head.clear();
        // The head: lines up to the empty one.
        loop {
            let n = reader.read_until(b'\n', &mut head)?;
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            if head.ends_with(b"\r\n\r\n") || head == b"\r\n" {
                break;
            }
            if head.len() > 64 * 1024 {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "request head over 64 KiB"));
            }
        }
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        let parsed = req.parse(&head).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        if parsed.is_partial() {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "partial request head"));
        }
        let header = |name: &str| {
            req.headers.iter().find(|h| h.name.eq_ignore_ascii_case(name)).map(|h| h.value.to_vec())
        };
        let len: usize = header("content-length")
            .and_then(|v| std::str::from_utf8(&v).ok()?.trim().parse().ok())
            .unwrap_or(0);
        let close = header("connection").is_some_and(|v| v.eq_ignore_ascii_case(b"close"));
        let signature = header("x-ringpush-signature");
        body.resize(len, 0);
        io::Read::read_exact(&mut reader, &mut body)?;
        let good = !verify || signature.as_deref().is_some_and(|s| signed(s, &body));
        let status = {
            let mut t = tally.lock().unwrap_or_else(|p| p.into_inner());
            if !good {
                t.bad_signatures += 1;
                "401 Unauthorized"
            } else if let Err(e) = t.take_batch(&body) {
                t.bad_requests += 1;
                if t.bad_requests <= 3 {
                    eprintln!("ringpush-bench webhooks: bad request: {e}");
                }
                "400 Bad Request"
            } else {
                "204 No Content"
            }
        };
        write!(out, "HTTP/1.1 {status}\r\ncontent-length: 0\r\n\r\n")?;
        if close {
            return Ok(());
        }
    }
}

/// Whether `header` (`t=<secs>,v1=<hex>`) signs `body` with the run's secret.
fn signed(header: &[u8], body: &[u8]) -> bool {
    let Ok(text) = std::str::from_utf8(header) else { return false };
    let Some(t) = text.strip_prefix("t=").and_then(|r| r.split(',').next()).and_then(|t| t.parse().ok())
    else {
        return false;
    };
    ringpush::webhook::sign(WEBHOOK_SECRET.as_bytes(), t, body) == text.trim()
}

/// What the scenario measured.
#[derive(Debug, Clone)]
pub struct Report {
    pub convs: usize,
    pub offline: usize,
    pub senders: usize,
    pub delay_ms: u64,
    pub max_batch: usize,
    pub mode: String,
    pub server_pid: u32,
    pub server_cpu_pin: Option<usize>,
    pub client_cpu_pin: Option<usize>,
    pub setup_secs: f64,
    pub secs: f64,
    pub sent: u64,
    pub acks: u64,
    pub acks_in_window: u64,
    /// `message.offline` events and requests received in the window.
    pub events_in_window: u64,
    pub requests_in_window: u64,
    pub server_cpu: Duration,
    pub client_cpu: Duration,
    /// The bench process itself over the window: the receiver's threads (its main thread
    /// sleeps).
    pub receiver_cpu: Duration,
    /// After the drain.
    pub events: u64,
    pub offline_events: u64,
    pub online_events: u64,
    pub requests: u64,
    pub repeats: u64,
    pub bad_signatures: u64,
    pub bad_requests: u64,
    /// Sum over (conversation, offline member) of the newest `last_seq` received, against
    /// acks x K: every offline member heard of its conversation's last message.
    pub covered: u64,
    pub expected: u64,
    pub lag: Summary,
    pub drain_secs: f64,
    /// Server counters over the run: `ringpush_webhook_delivered_total`,
    /// `ringpush_webhook_events_total{type="message.offline"}`, `..._dropped_total`,
    /// `..._retried_total`.
    pub server_delivered: Option<u64>,
    pub server_offline_events: Option<u64>,
    pub server_dropped: Option<u64>,
    pub server_retried: Option<u64>,
}

impl Report {
    fn per_sec(&self, n: u64) -> f64 {
        n as f64 / self.secs.max(1e-9)
    }

    pub fn cpu_us_per_event(&self) -> f64 {
        self.server_cpu.as_secs_f64() * 1e6 / self.events_in_window.max(1) as f64
    }

    pub fn cpu_us_per_send(&self) -> f64 {
        self.server_cpu.as_secs_f64() * 1e6 / self.acks_in_window.max(1) as f64
    }

    pub fn ok(&self) -> bool {
        self.covered == self.expected && self.bad_signatures == 0 && self.bad_requests == 0
    }

    pub fn human(&self) -> String {
        let mut s = format!(
            "ringpush-bench webhooks: {} conversations x {} offline members, {} connected senders, {}; \
             offline_delay_ms {}, max_batch {}; server pid {} ({}), clients and receiver on {}\n",
            self.convs,
            self.offline,
            self.senders,
            self.mode,
            self.delay_ms,
            self.max_batch,
            self.server_pid,
            pin_name(self.server_cpu_pin),
            pin_name(self.client_cpu_pin)
        );
        s += &format!("  setup      memberships and senders in {:.1} s\n", self.setup_secs);
        s += &format!(
            "  sends      {:.0}/s acked over {:.1} s ({} sent, {} acked in all)\n",
            self.per_sec(self.acks_in_window),
            self.secs,
            self.sent,
            self.acks
        );
        s += &format!(
            "  events     {:.0} message.offline/s into the receiver ({} in the window, {:.1} per request, {:.2} per send)\n",
            self.per_sec(self.events_in_window),
            self.events_in_window,
            self.events_in_window as f64 / self.requests_in_window.max(1) as f64,
            self.events_in_window as f64 / self.acks_in_window.max(1) as f64
        );
        s += &format!("  lag        message ts -> event received: {}\n", self.lag.human());
        s += &format!(
            "  server     CPU {:.1}% of one core; {:.2} µs per event = {:.0} events/s per core ({:.2} µs per send, sends included)\n",
            100.0 * self.server_cpu.as_secs_f64() / self.secs.max(1e-9),
            self.cpu_us_per_event(),
            1e6 / self.cpu_us_per_event().max(1e-9),
            self.cpu_us_per_send()
        );
        s += &format!(
            "  clients    CPU {:.1}% of one core (senders), receiver {:.1}% (the bench's own threads)\n",
            100.0 * self.client_cpu.as_secs_f64() / self.secs.max(1e-9),
            100.0 * self.receiver_cpu.as_secs_f64() / self.secs.max(1e-9)
        );
        let opt = |v: Option<u64>| v.map_or("?".to_string(), |v| v.to_string());
        s += &format!(
            "  delivered  {} events in {} requests after a drain of {:.1} s ({} message.offline, {} user.online); \
             server: {} delivered, {} message.offline, {} dropped, {} retried\n",
            self.events,
            self.requests,
            self.drain_secs,
            self.offline_events,
            self.online_events,
            opt(self.server_delivered),
            opt(self.server_offline_events),
            opt(self.server_dropped),
            opt(self.server_retried)
        );
        s += &format!(
            "  integrity  newest last_seq per offline member: {} of {} seqs covered; {} repeats, {} bad signatures, {} bad requests{}\n",
            self.covered,
            self.expected,
            self.repeats,
            self.bad_signatures,
            self.bad_requests,
            if self.ok() { "" } else { "  <-- FAILED" }
        );
        s
    }

    pub fn json(&self) -> String {
        let r = |x: f64| (x * 10.0).round() / 10.0;
        let r3 = |x: f64| (x * 1000.0).round() / 1000.0;
        serde_json::json!({
            "scenario": "webhooks",
            "convs": self.convs, "offline": self.offline, "senders": self.senders,
            "mode": self.mode, "delay_ms": self.delay_ms, "max_batch": self.max_batch,
            "server": { "pid": self.server_pid, "cpu": self.server_cpu_pin },
            "client_cpu": self.client_cpu_pin,
            "secs": r3(self.secs), "sent": self.sent, "acks": self.acks,
            "acks_per_sec": r(self.per_sec(self.acks_in_window)),
            "events_in_window": self.events_in_window,
            "events_per_sec": r(self.per_sec(self.events_in_window)),
            "requests_in_window": self.requests_in_window,
            "server_cpu_util": r3(self.server_cpu.as_secs_f64() / self.secs.max(1e-9)),
            "server_cpu_us_per_event": r3(self.cpu_us_per_event()),
            "server_cpu_us_per_send": r3(self.cpu_us_per_send()),
            "client_cpu_util": r3(self.client_cpu.as_secs_f64() / self.secs.max(1e-9)),
            "receiver_cpu_util": r3(self.receiver_cpu.as_secs_f64() / self.secs.max(1e-9)),
            "lag": self.lag.json(),
            "events": self.events, "offline_events": self.offline_events,
            "online_events": self.online_events, "requests": self.requests,
            "repeats": self.repeats, "bad_signatures": self.bad_signatures,
            "bad_requests": self.bad_requests, "covered": self.covered, "expected": self.expected,
            "drain_secs": r3(self.drain_secs),
            "server_delivered": self.server_delivered,
            "server_offline_events": self.server_offline_events,
            "server_dropped": self.server_dropped, "server_retried": self.server_retried,
            "ok": self.ok(),
        })
        .to_string()
    }
}

fn check(args: &WebhooksArgs) -> Result<(), Error> {
    let usage = |m: &str| Err(Error::Usage(m.into()));
    if args.convs == 0 || args.offline == 0 || args.senders == 0 || args.senders > args.convs {
        return usage("--convs, --offline and --senders must be at least 1, --senders at most --convs");
    }
    if args.duration == 0 || args.window == 0 || args.rate == Some(0) || args.max_batch == 0 {
        return usage("--duration, --window, --rate and --max-batch must be at least 1");
    }
    if args.body_bytes < 32 {
        return usage("--body-bytes must be at least 32 (the timestamp lives in the body)");
    }
    Ok(())
}

/// Bound on the drain: the server's queue empty and the receiver quiet.
const DRAIN_LIMIT: Duration = Duration::from_secs(30);

/// Runs the scenario: prints the summary (and the JSON line) and returns the report; a
/// failed integrity check fails the run.
pub fn run(args: WebhooksArgs) -> Result<Report, Error> {
    check(&args)?;
    let (server_cpu_pin, client_cpu_pin) = args.pin.cpus()?;
    let receiver = Receiver::start(!args.no_verify, client_cpu_pin)?;
    let webhook = format!(
        "\n[webhook]\nurl = \"http://{}/ringpush/events\"\nsecret = \"{WEBHOOK_SECRET}\"\n\
         offline_delay_ms = {}\ntimeout_ms = 5000\nmax_batch = {}\nmax_attempts = 8\nqueue_max = {}\n",
        receiver.addr, args.delay_ms, args.max_batch, args.queue_max
    );
    let setup = ServerSetup {
        secret: AUTH_SECRET.into(),
        ping_interval_ms: 25_000,
        idle_timeout_ms: 60_000,
        echo: false,
        max_message_bytes: 64 * 1024,
        send_rate_per_sec: Some(1_000_000),
        signal_rate_per_sec: None,
        outbound_queue_bytes: Some(4 << 20),
        cpu: server_cpu_pin,
        log: args.server_log.clone(),
        node_id: "bench".into(),
        extra_toml: webhook,
        extra_limits: String::new(),
        ports: (0, 0),
    };
    let mut server = Server::start(&args.server_bin, &setup)?;
    let result = measure(&args, &mut server, &receiver, server_cpu_pin, client_cpu_pin);
    if result.is_err() {
        let tail = server.log_tail(15);
        if !tail.is_empty() {
            eprintln!("ringpush-bench: the server's log ends with:\n{tail}");
        }
    }
    let report = result?;
    crate::server::print_report(&report.human(), &report.json(), args.json);
    if !report.ok() {
        return Err(Error::Server("webhooks: events missing or refused (see integrity)".into()));
    }
    Ok(report)
}

fn measure(
    args: &WebhooksArgs,
    server: &mut Server,
    receiver: &Receiver,
    server_cpu_pin: Option<usize>,
    client_cpu_pin: Option<usize>,
) -> Result<Report, Error> {
    let started = Instant::now();
    // The senders' plan: S users, M conversations of one member each (`c % S`).
    let plan = Plan {
        users: args.senders,
        convs: args.convs,
        members: 1,
        senders: args.senders,
        tag: crowd::run_tag(),
    };
    for conv in 0..plan.convs {
        let mut users: Vec<String> = plan.members_of(conv).map(Plan::user_name).collect();
        users.extend((0..args.offline).map(|j| format!("{}o{conv}.{j}", plan.tag)));
        server.set_members(API_KEY, &plan.conv_name(conv), &users, 2000)?;
    }
    let setup = CrowdSetup {
        addr: server.client,
        also: Vec::new(),
        plan: &plan,
        secret: AUTH_SECRET,
        cpu: client_cpu_pin,
        procs: 1,
        body_bytes: args.body_bytes,
        per_seq: false,
        kernel_stamps: false,
        spin: false,
        concurrency: 256,
        devices: 1,
        reads: 0.0,
        signals: 0.0,
    };
    let mut crowd = Crowd::start(&setup)?;
    // The senders' user.online events, and anything else of the setup, go first.
    thread::sleep(Duration::from_millis(args.delay_ms + 200));
    let setup_secs = started.elapsed().as_secs_f64();
    let metrics_before = server.metrics()?;

    let (rate, window, mode) = match args.rate {
        Some(rate) => (rate, 0, format!("open loop at {rate} sends/s")),
        None => (0, args.window, format!("closed loop, {} sends unacked per sender", args.window)),
    };
    eprintln!(
        "ringpush-bench webhooks: {} senders up; sending for {} s ({mode}) ...",
        crowd.connected, args.duration
    );
    let (events0, requests0) = receiver.tally(|t| (t.offline, t.requests));
    let cpu0 = server.cpu_time()?;
    let client0 = crowd.cpu_time();
    let own0 = server::cpu_time(std::process::id()).unwrap_or_default();
    let t0 = Instant::now();
    crowd.workers.send(&format!("go {rate} {window} {}", args.duration * 1000))?;
    thread::sleep(Duration::from_secs(args.duration));
    let server_cpu = server.cpu_time()?.saturating_sub(cpu0);
    let client_cpu = crowd.cpu_time().saturating_sub(client0);
    let receiver_cpu = server::cpu_time(std::process::id()).unwrap_or_default().saturating_sub(own0);
    let (events1, requests1) = receiver.tally(|t| (t.offline, t.requests));
    let secs = t0.elapsed().as_secs_f64();
    let done = crowd.workers.expect("done", Duration::from_secs(20))?;
    crowd.workers.expect_lines("hist", Duration::from_secs(10))?;
    crowd.workers.expect_lines("hist", Duration::from_secs(10))?;
    crowd.workers.expect_lines("hist", Duration::from_secs(10))?;

    // The drain: the server's queue empty and nothing received for a few delays.
    let drain_started = Instant::now();
    let quiet = Duration::from_millis((4 * args.delay_ms).max(300));
    loop {
        let depth = server.metrics()?.map_or(0, |m| m.sum("ringpush_webhook_queue_depth"));
        let idle = receiver.tally(|t| t.last_at.is_none_or(|at| at.elapsed() >= quiet));
        if (depth == 0 && idle && drain_started.elapsed() >= quiet) || drain_started.elapsed() > DRAIN_LIMIT {
            break;
        }
        thread::sleep(Duration::from_millis(50));
    }
    let drain_secs = drain_started.elapsed().as_secs_f64();
    let metrics_after = server.metrics()?;
    crowd.workers.stop();
    if !server.alive() {
        return Err(Error::Server("the server exited during the run".into()));
    }
    let rise = |name: &str| match (&metrics_before, &metrics_after) {
        (Some(a), Some(b)) => Some(b.sum(name).saturating_sub(a.sum(name))),
        _ => None,
    };
    let offline_events = |m: &Option<server::Metrics>| {
        m.as_ref().map(|m| m.value("ringpush_webhook_events_total{type=\"message.offline\"}"))
    };
    let acks = total(&done, "acks");
    let t = receiver.tally.lock().unwrap_or_else(|p| p.into_inner());
    Ok(Report {
        convs: args.convs,
        offline: args.offline,
        senders: args.senders,
        delay_ms: args.delay_ms,
        max_batch: args.max_batch,
        mode,
        server_pid: server.pid,
        server_cpu_pin,
        client_cpu_pin,
        setup_secs,
        secs,
        sent: total(&done, "sent"),
        acks,
        acks_in_window: total(&done, "acks_win"),
        events_in_window: events1 - events0,
        requests_in_window: requests1 - requests0,
        server_cpu,
        client_cpu,
        receiver_cpu,
        events: t.events,
        offline_events: t.offline,
        online_events: t.online,
        requests: t.requests,
        repeats: t.repeats,
        bad_signatures: t.bad_signatures,
        bad_requests: t.bad_requests,
        covered: t.newest.values().sum(),
        expected: acks * args.offline as u64,
        lag: t.lag.summary(),
        drain_secs,
        server_delivered: rise("ringpush_webhook_delivered_total"),
        server_offline_events: match (offline_events(&metrics_before), offline_events(&metrics_after)) {
            (Some(a), Some(b)) => Some(b.saturating_sub(a)),
            _ => None,
        },
        server_dropped: rise("ringpush_webhook_dropped_total"),
        server_retried: rise("ringpush_webhook_retried_total"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_and_batches() {
        let body = br#"{"events":[{"type":"message.offline","id":"c1:u1:3","user":"u1","conv":"c1","from_seq":1,"last_seq":3,"count":3,"last":{"from":"u0","seq":3,"ts":1,"body":{}}},{"type":"user.online","id":"x","user":"u0","ts":1}],"ts":1}"#;
        let header = ringpush::webhook::sign(WEBHOOK_SECRET.as_bytes(), 1_700_000_000, body);
        assert!(signed(header.as_bytes(), body));
        assert!(!signed(header.as_bytes(), b"{}"));
        assert!(!signed(b"t=1,v1=00", body));
        let mut t = Tally { lag: Latency::new(), ..Tally::default() };
        t.take_batch(body).expect("a batch");
        t.take_batch(body).expect("a batch");
        assert_eq!((t.events, t.offline, t.online, t.requests, t.repeats), (4, 2, 2, 2, 1));
        assert_eq!(t.newest.values().sum::<u64>(), 3);
        assert!(t.take_batch(b"{}").is_err());
    }
}
