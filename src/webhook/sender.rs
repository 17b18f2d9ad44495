//! Webhook delivery: events handed to [`Sender::submit`] are POSTed to `webhook.url` in
//! signed batches by one worker thread (`ringpush-webhook`) with a blocking HTTP client
//! (`ureq`, rustls for https), retried with jittered exponential backoff, and handed back
//! through the `done` callback once finished, so a cluster node can delete them from Redis.
//!
//! # What stays true
//! - [`Sender::submit`] never waits and takes no lock: a `try_send` on a bounded
//!   `crossbeam-channel` queue. When the queue is full the submitter takes the oldest waiting
//!   event out itself (dropped, counted as `queue_full`) and tries again.
//! - `queue_max` events may wait behind the batch being sent (at most `max_batch` more).
//! - One request at a time: batches leave in submission order, and the events of a batch are
//!   in submission order. A failed batch is re-sent whole, with the same body and a fresh
//!   signature, until a 2xx or `max_attempts` requests; newer events wait behind it. So a
//!   receiver sees an id twice only through a retry (or a 2xx lost on its way back).
//! - `done` gets each id once, on the worker thread, after the counters moved: delivered
//!   (2xx), dropped after `max_attempts`, or dropped for a full queue. Events still queued
//!   when [`Sender::stop`]'s time runs out, or submitted after, are not finished and not
//!   reported (in a cluster they stay in Redis for the node that takes the lease over); they
//!   are counted as dropped with reason `stopped`.
//! - The ids of events dropped for a full queue reach the worker over an unbounded channel:
//!   they pile up only while the worker is inside one request (at most `timeout_ms`).
//! - [`Sender::stop`] returns within its `wait`, whatever the receiver does; a request that
//!   was in flight when it was called may keep the thread up to `timeout_ms` longer.

use std::collections::hash_map::RandomState;
use std::fmt::Write as _;
use std::hash::{BuildHasher, Hasher};
use std::io;
use std::sync::atomic::{fence, AtomicBool, AtomicU64, Ordering::Relaxed, Ordering::SeqCst};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::{select, Receiver, TrySendError};
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::clock;

/// The header carrying [`sign`]'s value.
pub const SIGNATURE_HEADER: &str = "X-Ringpush-Signature";

/// Least time between two warnings about events dropped for a full queue.
const EVICTION_LOG_EVERY: Duration = Duration::from_secs(10);

/// Most bytes of an answer's body read (and thrown away) so its connection can be reused.
const ANSWER_LIMIT: u64 = 64 * 1024;

/// Where and how a [`Sender`] posts. The defaults are PROTOCOL.md's `[webhook]` ones; `url`
/// and `secret` have none (no `[webhook]` section means no webhooks).
#[derive(Debug, Clone)]
pub struct SenderConfig {
    /// The endpoint, `http://` or `https://` (rustls, webpki roots). Proxies named by the
    /// usual `HTTPS_PROXY`-style variables are used.
    pub url: String,
    /// The HMAC-SHA256 key of every request's [`SIGNATURE_HEADER`].
    pub secret: String,
    /// Bound on one request, from connecting to the answer's last byte; no answer within it
    /// is a failure, retried. Default 5000.
    pub timeout_ms: u64,
    /// Most events in one request. Default 100.
    pub max_batch: usize,
    /// Requests made for one batch, the first included, before it is dropped. Default 8:
    /// with the default backoff, at most about a minute of trying (0.5 + 1 + ... + 32 s of
    /// waits, less the jitter).
    pub max_attempts: u32,
    /// Events that may wait behind the batch being sent; past that the oldest are dropped.
    /// Default 100000: about as many short JSON objects' worth of memory (tens of MB).
    pub queue_max: usize,
    /// Wait before the first retry; it doubles for each further one, up to `backoff_max`,
    /// and each wait is jittered down to between half and all of it, so nodes that failed
    /// together do not retry together. Default 500 ms (PROTOCOL.md); tests shorten it.
    pub backoff_base: Duration,
    /// Cap on the wait between retries. Default 60 s (PROTOCOL.md).
    pub backoff_max: Duration,
}

impl Default for SenderConfig {
    fn default() -> SenderConfig {
        SenderConfig {
            url: String::new(),
            secret: String::new(),
            timeout_ms: 5000,
            max_batch: 100,
            max_attempts: 8,
            queue_max: 100_000,
            backoff_base: Duration::from_millis(500),
            backoff_max: Duration::from_secs(60),
        }
    }
}

/// The events of PROTOCOL.md's webhook table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    MessageOffline,
    UserOnline,
    UserOffline,
}

impl EventKind {
    /// Every kind, in the order `events_total` is rendered.
    pub const ALL: [EventKind; 3] =
        [EventKind::MessageOffline, EventKind::UserOnline, EventKind::UserOffline];

    /// The event's `type`, as in PROTOCOL.md.
    pub fn label(self) -> &'static str {
        match self {
            EventKind::MessageOffline => "message.offline",
            EventKind::UserOnline => "user.online",
            EventKind::UserOffline => "user.offline",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Called on the worker thread with the ids of finished events (see [`Sender::start`]).
pub type Done = Box<dyn Fn(&[String]) + Send>;

/// One event to deliver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// The event's `id`, handed back to `done` once the event is finished.
    pub id: String,
    /// Its type, for the counters (the JSON carries it too).
    pub kind: EventKind,
    /// The whole event object as JSON text, put into the batch's `events` as it is, e.g.
    /// `{"type":"user.online","id":"...","user":"u1","ts":1}`. The caller makes it valid.
    pub json: String,
}

/// Upper bounds of the request latency buckets, in microseconds, and as rendered.
const LATENCY_BOUNDS_US: [u64; 11] =
    [5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000, 2_500_000, 5_000_000, 10_000_000];
const LATENCY_LABELS: [&str; 11] =
    ["0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1", "2.5", "5", "10"];

/// What a [`Sender`] counts, rendered as `ringpush_webhook_*`. Submitters (any thread)
/// write `events`, `dropped_queue_full` and `queue_depth`; the worker writes the rest and
/// lowers `queue_depth`. Every write is an atomic add, so many threads may write at once.
#[derive(Debug, Default)]
pub struct Counters {
    /// Events submitted, by [`EventKind::index`].
    events: [AtomicU64; 3],
    /// Events in batches answered with a 2xx.
    delivered: AtomicU64,
    /// Requests that re-sent a batch after a failure.
    retried: AtomicU64,
    /// Events dropped, oldest first, because `queue_max` were waiting.
    dropped_queue_full: AtomicU64,
    /// Events dropped after `max_attempts` failed requests.
    dropped_attempts: AtomicU64,
    /// Events not sent because the sender stopped first (or was stopped when they came).
    dropped_stopped: AtomicU64,
    /// Events submitted and not yet finished: waiting, plus the batch in flight. Raised
    /// before an event is queued and lowered after it left, so it never goes below zero.
    queue_depth: AtomicU64,
    /// Requests by latency bucket, not cumulative; the last slot is past the largest bound.
    latency: [AtomicU64; LATENCY_BOUNDS_US.len() + 1],
    /// Sum of all request latencies, in microseconds.
    latency_sum_us: AtomicU64,
}

impl Counters {
    /// Events of `kind` submitted.
    pub fn events(&self, kind: EventKind) -> u64 {
        self.events[kind.index()].load(Relaxed)
    }
    /// Events delivered (answered with a 2xx).
    pub fn delivered(&self) -> u64 {
        self.delivered.load(Relaxed)
    }
    /// Requests that re-sent a batch.
    pub fn retried(&self) -> u64 {
        self.retried.load(Relaxed)
    }
    /// Events dropped because the queue was full.
    pub fn dropped_queue_full(&self) -> u64 {
        self.dropped_queue_full.load(Relaxed)
    }
    /// Events dropped after `max_attempts` failed requests.
    pub fn dropped_attempts(&self) -> u64 {
        self.dropped_attempts.load(Relaxed)
    }
    /// Events left unsent by a stop.
    pub fn dropped_stopped(&self) -> u64 {
        self.dropped_stopped.load(Relaxed)
    }
    /// Events submitted and not finished yet (the batch in flight included).
    pub fn queue_depth(&self) -> u64 {
        self.queue_depth.load(Relaxed)
    }
    /// Requests made (every attempt, failed or not).
    pub fn requests(&self) -> u64 {
        self.latency.iter().map(|n| n.load(Relaxed)).sum()
    }

    fn observe(&self, took: Duration) {
        let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        let bucket =
            LATENCY_BOUNDS_US.iter().position(|&bound| us <= bound).unwrap_or(LATENCY_BOUNDS_US.len());
        self.latency[bucket].fetch_add(1, Relaxed);
        self.latency_sum_us.fetch_add(us, Relaxed);
    }

    /// `n` events finished (delivered or dropped by the worker): they leave the depth.
    fn finished(&self, n: u64) {
        self.queue_depth.fetch_sub(n, Relaxed);
    }

    /// Appends the counters in the Prometheus text format (version 0.0.4).
    pub fn render(&self, out: &mut String) {
        let head = |out: &mut String, name: &str, kind: &str, help: &str| {
            let _ =
                writeln!(out, "# HELP ringpush_webhook_{name} {help}\n# TYPE ringpush_webhook_{name} {kind}");
        };
        head(out, "events_total", "counter", "Webhook events submitted, by type.");
        for kind in EventKind::ALL {
            let n = self.events(kind);
            let _ = writeln!(out, "ringpush_webhook_events_total{{type=\"{}\"}} {n}", kind.label());
        }
        head(out, "delivered_total", "counter", "Webhook events delivered (answered with a 2xx).");
        let _ = writeln!(out, "ringpush_webhook_delivered_total {}", self.delivered());
        head(out, "retried_total", "counter", "Webhook requests that re-sent a batch after a failure.");
        let _ = writeln!(out, "ringpush_webhook_retried_total {}", self.retried());
        head(
            out,
            "dropped_total",
            "counter",
            "Webhook events given up, by reason: the queue was full (oldest dropped), \
             max_attempts failed, or the sender stopped first.",
        );
        let drops = [
            ("queue_full", self.dropped_queue_full()),
            ("attempts", self.dropped_attempts()),
            ("stopped", self.dropped_stopped()),
        ];
        for (reason, n) in drops {
            let _ = writeln!(out, "ringpush_webhook_dropped_total{{reason=\"{reason}\"}} {n}");
        }
        head(out, "queue_depth", "gauge", "Webhook events waiting, the batch in flight included.");
        let _ = writeln!(out, "ringpush_webhook_queue_depth {}", self.queue_depth());
        head(out, "request_seconds", "histogram", "Webhook request latency, every attempt, failed or not.");
        let mut cumulative = 0;
        for (label, n) in LATENCY_LABELS.iter().zip(&self.latency) {
            cumulative += n.load(Relaxed);
            let _ = writeln!(out, "ringpush_webhook_request_seconds_bucket{{le=\"{label}\"}} {cumulative}");
        }
        let count = self.requests();
        let sum = self.latency_sum_us.load(Relaxed);
        let _ = writeln!(
            out,
            "ringpush_webhook_request_seconds_bucket{{le=\"+Inf\"}} {count}\n\
             ringpush_webhook_request_seconds_sum {}.{:06}\n\
             ringpush_webhook_request_seconds_count {count}",
            sum / 1_000_000,
            sum % 1_000_000
        );
    }
}

/// `t=<t_secs>,v1=<lowercase hex HMAC-SHA256(secret, "<t_secs>." + body)>`, the value of
/// [`SIGNATURE_HEADER`]. Receivers recompute it from the raw body and refuse old `t`s.
pub fn sign(secret: &[u8], t_secs: u64, body: &[u8]) -> String {
    let t = t_secs.to_string();
    let mac = hmac_sha256(secret, &[t.as_bytes(), b".", body]);
    let mut out = String::with_capacity(t.len() + 6 + 64);
    let _ = write!(out, "t={t},v1=");
    for byte in mac {
        let _ = write!(out, "{byte:02x}");
    }
    out
}

fn hmac_sha256(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    // HMAC takes a key of any length (long ones are hashed first): this cannot fail.
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC accepts any key length");
    for part in parts {
        mac.update(part);
    }
    mac.finalize().into_bytes().into()
}

/// `{"events":[<json>,...],"ts":<ts_ms>}`.
fn batch_body(batch: &[Event], ts_ms: u64) -> String {
    let mut body = String::with_capacity(batch.iter().map(|ev| ev.json.len() + 1).sum::<usize>() + 40);
    body.push_str("{\"events\":[");
    for (i, ev) in batch.iter().enumerate() {
        if i > 0 {
            body.push(',');
        }
        body.push_str(&ev.json);
    }
    let _ = write!(body, "],\"ts\":{ts_ms}}}");
    body
}

/// What the handles share. The worker holds none of it but the counters, so when the last
/// handle goes, its channels disconnect and the worker ends.
struct Shared {
    /// Events for the worker, bounded by `queue_max`.
    queue: crossbeam_channel::Sender<Event>,
    /// The queue's other end, for submitters to take the oldest event out when it is full.
    oldest: Receiver<Event>,
    /// Ids of events dropped for a full queue, for the worker to hand to `done`.
    evicted: crossbeam_channel::Sender<String>,
    /// A stop's deadline (capacity 1: the first stop's deadline counts).
    stop: crossbeam_channel::Sender<Instant>,
    /// Disconnects when the worker's thread ends (its sender is dropped).
    ended: Receiver<()>,
    /// Set by the worker as it ends; from then on events are dropped as they come.
    closed: Arc<AtomicBool>,
    counters: Arc<Counters>,
}

impl Shared {
    /// Drops (as `stopped`) whatever is queued now that the worker is gone.
    fn drain_closed(&self) {
        let n = self.oldest.try_iter().count() as u64;
        self.counters.dropped_stopped.fetch_add(n, Relaxed);
        self.counters.finished(n);
    }
}

/// The handle: submit events, read the counters, stop. `Send + Sync`, cheap to clone.
#[derive(Clone)]
pub struct Sender {
    shared: Arc<Shared>,
}

impl Sender {
    /// Spawns the worker thread (`ringpush-webhook`). `done` is called on the worker thread
    /// with the ids of events that are finished (delivered with a 2xx, or dropped after
    /// `max_attempts` or for queue overflow) so a cluster node can delete them from Redis.
    /// Fails (`InvalidInput`) on a URL that is not `http(s)://host...` or a zero limit.
    pub fn start(cfg: SenderConfig, done: Done) -> io::Result<Sender> {
        check(&cfg)?;
        let timeout = Duration::from_millis(cfg.timeout_ms);
        let agent: ureq::Agent = ureq::Agent::config_builder()
            // A 4xx/5xx is an answer whose status we count and log, not a transport error.
            .http_status_as_error(false)
            // A redirect is not followed (a POST's body would not be re-sent): a failure.
            .max_redirects(0)
            .timeout_global(Some(timeout))
            .user_agent(concat!("ringpush/", env!("CARGO_PKG_VERSION")))
            .build()
            .into();
        let (queue, events) = crossbeam_channel::bounded(cfg.queue_max);
        let (evicted, evicted_rx) = crossbeam_channel::unbounded();
        let (stop, stop_rx) = crossbeam_channel::bounded(1);
        let (alive, ended) = crossbeam_channel::bounded(0);
        let closed = Arc::new(AtomicBool::new(false));
        let counters = Arc::new(Counters::default());
        let worker = Worker {
            timeout,
            agent,
            events: events.clone(),
            evicted: evicted_rx,
            stop: stop_rx,
            closed: closed.clone(),
            counters: counters.clone(),
            done,
            jitter: seed(),
            stop_at: None,
            evictions: (0, None),
            _alive: alive,
            cfg,
        };
        thread::Builder::new().name("ringpush-webhook".into()).spawn(move || worker.run())?;
        let shared = Shared { queue, oldest: events, evicted, stop, ended, closed, counters };
        Ok(Sender { shared: Arc::new(shared) })
    }

    /// Queues `ev` for delivery. Never blocks, never fails: past `queue_max` waiting events
    /// the oldest waiting one is dropped and counted (and handed to `done`); after a stop the
    /// event is dropped and counted as `stopped`.
    pub fn submit(&self, ev: Event) {
        let s = &*self.shared;
        s.counters.events[ev.kind.index()].fetch_add(1, Relaxed);
        if s.closed.load(SeqCst) {
            s.counters.dropped_stopped.fetch_add(1, Relaxed);
            return;
        }
        s.counters.queue_depth.fetch_add(1, Relaxed);
        let mut ev = ev;
        loop {
            match s.queue.try_send(ev) {
                Ok(()) => break,
                Err(TrySendError::Full(back)) => {
                    ev = back;
                    // Make room by dropping the oldest; if the worker took it first, the next
                    // try finds room anyway.
                    if let Ok(old) = s.oldest.try_recv() {
                        s.counters.dropped_queue_full.fetch_add(1, Relaxed);
                        s.counters.finished(1);
                        let _ = s.evicted.send(old.id);
                    }
                }
                // Cannot happen while `oldest` is held; count it as a stop if it ever does.
                Err(TrySendError::Disconnected(_)) => {
                    s.counters.dropped_stopped.fetch_add(1, Relaxed);
                    s.counters.finished(1);
                    return;
                }
            }
        }
        // Pairs with the worker's fence in `finish`: either it sees this event in the queue
        // or this sees `closed`, so nothing is left in a queue nobody reads.
        fence(SeqCst);
        if s.closed.load(SeqCst) {
            s.drain_closed();
        }
    }

    /// The counters, for `/metrics`.
    pub fn counters(&self) -> Arc<Counters> {
        self.shared.counters.clone()
    }

    /// Tries to deliver what is queued within `wait` (one attempt each, no backoff), then the
    /// thread ends. Returns when it has ended or `wait` has passed, whichever is first; what
    /// is left unsent is counted as `stopped` and not handed to `done`. Only the first stop
    /// of a sender sets the deadline.
    pub fn stop(&self, wait: Duration) {
        let now = Instant::now();
        let deadline = now.checked_add(wait).unwrap_or(now + Duration::from_secs(86_400 * 365));
        let _ = self.shared.stop.try_send(deadline);
        let _ = self.shared.ended.recv_deadline(deadline);
    }
}

fn check(cfg: &SenderConfig) -> io::Result<()> {
    let bad = |why: String| Err(io::Error::new(io::ErrorKind::InvalidInput, why));
    let uri = match cfg.url.parse::<ureq::http::Uri>() {
        Ok(uri) => uri,
        Err(e) => return bad(format!("webhook url {:?}: {e}", cfg.url)),
    };
    if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
        return bad(format!("webhook url {:?}: not http:// or https:// with a host", cfg.url));
    }
    if cfg.timeout_ms == 0 || cfg.max_batch == 0 || cfg.max_attempts == 0 || cfg.queue_max == 0 {
        return bad("webhook timeout_ms, max_batch, max_attempts and queue_max must be above 0".into());
    }
    Ok(())
}

/// A seed for the backoff jitter: std's per-process random hash keys, mixed with the time.
fn seed() -> u64 {
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u64(clock::unix_ms());
    hasher.finish()
}

/// The worker thread's state.
struct Worker {
    cfg: SenderConfig,
    /// `cfg.timeout_ms`.
    timeout: Duration,
    agent: ureq::Agent,
    events: Receiver<Event>,
    evicted: Receiver<String>,
    stop: Receiver<Instant>,
    closed: Arc<AtomicBool>,
    counters: Arc<Counters>,
    done: Done,
    /// splitmix64 state for the backoff jitter.
    jitter: u64,
    /// Set once a stop was asked (or every handle dropped): when the worker must be done.
    stop_at: Option<Instant>,
    /// Events dropped for a full queue and not logged yet, and when that was last logged:
    /// one warning every [`EVICTION_LOG_EVERY`] at most, however fast they come (the
    /// counter has them all; the count not yet logged goes into the next warning).
    evictions: (u64, Option<Instant>),
    /// Dropped as the thread ends, which is what [`Sender::stop`] waits for.
    _alive: crossbeam_channel::Sender<()>,
}

impl Worker {
    fn run(mut self) {
        while let Some(batch) = self.next_batch() {
            self.deliver(batch);
            self.report_evicted(None);
        }
        self.finish();
    }

    /// The next events to send, oldest first, at most `max_batch`: waits for the first
    /// unless stopping. None once stopping with nothing queued or no time left.
    fn next_batch(&mut self) -> Option<Vec<Event>> {
        let first = loop {
            if let Some(deadline) = self.stop_at {
                if Instant::now() >= deadline {
                    return None;
                }
                break self.events.try_recv().ok()?;
            }
            // A disconnected channel means every handle is gone: stop now.
            select! {
                recv(self.events) -> ev => match ev {
                    Ok(ev) => break ev,
                    Err(_) => self.stop_at = Some(Instant::now()),
                },
                recv(self.stop) -> deadline => {
                    self.stop_at = Some(deadline.unwrap_or_else(|_| Instant::now()));
                }
                recv(self.evicted) -> id => match id {
                    Ok(id) => self.report_evicted(Some(id)),
                    Err(_) => self.stop_at = Some(Instant::now()),
                },
            }
        };
        let mut batch = Vec::with_capacity(self.cfg.max_batch.min(1 + self.events.len()));
        batch.push(first);
        batch.extend(self.events.try_iter().take(self.cfg.max_batch - 1));
        Some(batch)
    }

    /// Sends `batch` until a 2xx, `max_attempts` requests, or a stop's one attempt.
    fn deliver(&mut self, batch: Vec<Event>) {
        let body = batch_body(&batch, clock::unix_ms());
        let n = batch.len() as u64;
        let mut attempts = 0;
        loop {
            let timeout = match self.stop_at {
                None => self.timeout,
                Some(deadline) => deadline.saturating_duration_since(Instant::now()).min(self.timeout),
            };
            if timeout.is_zero() {
                return self.leave(&batch);
            }
            attempts += 1;
            if attempts > 1 {
                self.counters.retried.fetch_add(1, Relaxed);
            }
            let failure = match self.post(&body, timeout) {
                Ok(status) if (200..300).contains(&status) => {
                    self.counters.delivered.fetch_add(n, Relaxed);
                    self.counters.finished(n);
                    return self.report(&batch);
                }
                Ok(status) => format!("HTTP status {status}"),
                Err(e) => e.to_string(),
            };
            if attempts >= self.cfg.max_attempts {
                tracing::warn!(
                    url = %self.cfg.url, events = n, first = %batch[0].id, attempts, last_failure = %failure,
                    "webhook batch dropped after max_attempts"
                );
                self.counters.dropped_attempts.fetch_add(n, Relaxed);
                self.counters.finished(n);
                return self.report(&batch);
            }
            if self.stop_at.is_some() {
                return self.leave(&batch);
            }
            tracing::debug!(url = %self.cfg.url, events = n, attempts, %failure, "webhook request failed, retrying");
            self.back_off(attempts);
        }
    }

    /// One POST of `body`, its latency recorded whatever the outcome: the answer's status,
    /// or why there was none.
    fn post(&self, body: &str, timeout: Duration) -> Result<u16, ureq::Error> {
        let signature = sign(self.cfg.secret.as_bytes(), clock::unix_ms() / 1000, body.as_bytes());
        let started = Instant::now();
        let result = self
            .agent
            .post(&self.cfg.url)
            .config()
            .timeout_global(Some(timeout))
            .build()
            .header("Content-Type", "application/json")
            .header(SIGNATURE_HEADER, signature.as_str())
            .send(body)
            .map(|mut answer| {
                // Read the answer (its content does not matter) so the connection is reused.
                let _ = answer.body_mut().with_config().limit(ANSWER_LIMIT).read_to_vec();
                answer.status().as_u16()
            });
        self.counters.observe(started.elapsed());
        result
    }

    /// Waits before retry number `failures`, handling evictions meanwhile; returns early when
    /// a stop is asked (the batch then gets its one attempt at once).
    fn back_off(&mut self, failures: u32) {
        let full =
            self.cfg.backoff_base.saturating_mul(1 << (failures - 1).min(30)).min(self.cfg.backoff_max);
        let until = Instant::now() + self.jittered(full);
        loop {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            select! {
                recv(self.stop) -> deadline => {
                    self.stop_at = Some(deadline.unwrap_or_else(|_| Instant::now()));
                    return;
                }
                recv(self.evicted) -> id => match id {
                    Ok(id) => self.report_evicted(Some(id)),
                    Err(_) => {
                        self.stop_at = Some(Instant::now());
                        return;
                    }
                },
                default(left) => return,
            }
        }
    }

    /// Between half and all of `full`.
    fn jittered(&mut self, full: Duration) -> Duration {
        // splitmix64
        self.jitter = self.jitter.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.jitter;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        let nanos = u64::try_from(full.as_nanos()).unwrap_or(u64::MAX);
        let half = nanos / 2;
        Duration::from_nanos(half + z % (nanos - half).saturating_add(1))
    }

    /// A batch not sent because the stop's time is up: counted, not reported as finished.
    fn leave(&self, batch: &[Event]) {
        let n = batch.len() as u64;
        tracing::warn!(url = %self.cfg.url, events = n, "webhook batch not delivered before stop");
        self.counters.dropped_stopped.fetch_add(n, Relaxed);
        self.counters.finished(n);
    }

    fn report(&self, batch: &[Event]) {
        let ids: Vec<String> = batch.iter().map(|ev| ev.id.clone()).collect();
        (self.done)(&ids);
    }

    /// Hands the ids of events dropped for a full queue (`first`, then all waiting) to `done`.
    fn report_evicted(&mut self, first: Option<String>) {
        let ids: Vec<String> = first.into_iter().chain(self.evicted.try_iter()).collect();
        if ids.is_empty() {
            return;
        }
        self.evictions.0 += ids.len() as u64;
        let now = Instant::now();
        if self.evictions.1.is_none_or(|at| now.duration_since(at) >= EVICTION_LOG_EVERY)
            || self.stop_at.is_some()
        {
            let events = std::mem::take(&mut self.evictions.0);
            tracing::warn!(url = %self.cfg.url, events, "webhook queue full: oldest events dropped");
            self.evictions.1 = Some(now);
        }
        (self.done)(&ids);
    }

    /// The thread's end: from now on submitters drop events themselves; what is queued is
    /// counted as `stopped`, evictions are reported.
    fn finish(mut self) {
        self.closed.store(true, SeqCst);
        // Pairs with the fence in `Sender::submit`.
        fence(SeqCst);
        let left = self.events.try_iter().count() as u64;
        if left > 0 {
            tracing::warn!(url = %self.cfg.url, events = left, "webhook events not delivered before stop");
            self.counters.dropped_stopped.fetch_add(left, Relaxed);
            self.counters.finished(left);
        }
        self.report_evicted(None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::sync::atomic::AtomicUsize;

    const SECRET: &str = "s3cret-for-tests";
    /// Bound on every wait of a test for something the sender does.
    const PATIENCE: Duration = Duration::from_secs(10);

    /// What the test receiver does with request number n (from 0, over all connections).
    #[derive(Clone, Copy)]
    enum Answer {
        Status(u16),
        /// Waits for the test to open the gate (or to drop the receiver), then answers.
        Gated(u16),
        /// Never answers; the connection closes when the test drops the receiver.
        Hang,
    }

    /// One request as the receiver read it.
    struct Seen {
        content_type: String,
        signature: String,
        body: String,
        ids: Vec<String>,
    }

    /// A tiny HTTP/1.1 webhook receiver on 127.0.0.1:0, answering per `script`.
    struct Receiver {
        url: String,
        requests: crossbeam_channel::Receiver<Seen>,
        /// One message lets one `Gated` answer go; dropping it lets every waiting one go.
        gate: crossbeam_channel::Sender<()>,
    }

    impl Receiver {
        fn start(script: impl Fn(usize) -> Answer + Send + Sync + 'static) -> Receiver {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let url = format!("http://{}/ringpush/events", listener.local_addr().unwrap());
            let (seen_tx, requests) = crossbeam_channel::unbounded();
            let (gate, gate_rx) = crossbeam_channel::unbounded::<()>();
            let script = Arc::new(script);
            let count = Arc::new(AtomicUsize::new(0));
            thread::spawn(move || {
                for stream in listener.incoming() {
                    let Ok(stream) = stream else { return };
                    let (script, count, seen, gate) =
                        (script.clone(), count.clone(), seen_tx.clone(), gate_rx.clone());
                    thread::spawn(move || serve(stream, &*script, &count, &seen, &gate));
                }
            });
            Receiver { url, requests, gate }
        }

        fn next(&self) -> Seen {
            self.requests.recv_timeout(PATIENCE).expect("a request within the patience")
        }
    }

    /// Reads requests off one (keep-alive) connection and answers them.
    fn serve(
        stream: TcpStream,
        script: &(dyn Fn(usize) -> Answer + Send + Sync),
        count: &AtomicUsize,
        seen: &crossbeam_channel::Sender<Seen>,
        gate: &crossbeam_channel::Receiver<()>,
    ) {
        let mut writer = stream.try_clone().unwrap();
        let mut reader = BufReader::new(stream);
        loop {
            let (mut length, mut content_type, mut signature) = (0, String::new(), String::new());
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            assert!(line.starts_with("POST /ringpush/events HTTP/1.1"), "{line:?}");
            loop {
                line.clear();
                if reader.read_line(&mut line).unwrap_or(0) == 0 {
                    return;
                }
                let line = line.trim_end();
                if line.is_empty() {
                    break;
                }
                let (name, value) = line.split_once(':').unwrap();
                let value = value.trim().to_string();
                match name.to_ascii_lowercase().as_str() {
                    "content-length" => length = value.parse().unwrap(),
                    "content-type" => {
                        assert!(content_type.is_empty(), "one Content-Type");
                        content_type = value;
                    }
                    "x-ringpush-signature" => signature = value,
                    _ => {}
                }
            }
            let mut body = vec![0; length];
            if reader.read_exact(&mut body).is_err() {
                return;
            }
            let body = String::from_utf8(body).unwrap();
            let parsed: serde_json::Value = serde_json::from_str(&body).unwrap();
            let events = parsed["events"].as_array().unwrap();
            let ids = events.iter().map(|ev| ev["id"].as_str().unwrap().to_string()).collect();
            let n = count.fetch_add(1, SeqCst);
            let _ = seen.send(Seen { content_type, signature, body, ids });
            let status = match script(n) {
                Answer::Status(status) => status,
                Answer::Gated(status) => {
                    let _ = gate.recv();
                    status
                }
                Answer::Hang => {
                    let _ = gate.recv();
                    return;
                }
            };
            let answer = format!("HTTP/1.1 {status} Scripted\r\nContent-Length: 2\r\n\r\nok");
            if writer.write_all(answer.as_bytes()).is_err() {
                return;
            }
        }
    }

    /// Recomputes the signature from the raw body, independently of [`sign`].
    fn verifies(header: &str, body: &str) -> bool {
        let Some((t, v1)) = header.strip_prefix("t=").and_then(|rest| rest.split_once(",v1=")) else {
            return false;
        };
        let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
        mac.update(format!("{t}.{body}").as_bytes());
        let expected: String = mac.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect();
        let fresh = t.parse::<u64>().is_ok_and(|t| t.abs_diff(clock::unix_ms() / 1000) < 60);
        fresh && expected == v1
    }

    fn config(url: &str) -> SenderConfig {
        SenderConfig {
            url: url.to_string(),
            secret: SECRET.to_string(),
            backoff_base: Duration::from_millis(5),
            ..SenderConfig::default()
        }
    }

    fn event(i: usize) -> Event {
        let id = format!("ev{i}");
        let json = format!(r#"{{"type":"user.online","id":"{id}","user":"u{i}","ts":{i}}}"#);
        Event { id, kind: EventKind::UserOnline, json }
    }

    /// A sender whose `done` ids arrive on the returned channel.
    fn start(cfg: SenderConfig) -> (Sender, crossbeam_channel::Receiver<String>) {
        let (tx, rx) = crossbeam_channel::unbounded();
        let done = move |ids: &[String]| ids.iter().for_each(|id| tx.send(id.clone()).unwrap());
        (Sender::start(cfg, Box::new(done)).unwrap(), rx)
    }

    fn done_ids(done: &crossbeam_channel::Receiver<String>, n: usize) -> Vec<String> {
        (0..n).map(|_| done.recv_timeout(PATIENCE).expect("done within the patience")).collect()
    }

    fn ids(range: std::ops::Range<usize>) -> Vec<String> {
        range.map(|i| format!("ev{i}")).collect()
    }

    #[test]
    fn hmac_matches_rfc_4231_and_sign_formats_the_header() {
        // RFC 4231, test case 2.
        let mac = hmac_sha256(b"Jefe", &[b"what do ya want ", b"for nothing?"]);
        let hex: String = mac.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");
        let signed = sign(b"key", 1_700_000_000, b"{\"events\":[]}");
        let expected = hmac_sha256(b"key", &[b"1700000000.{\"events\":[]}"]);
        let expected: String = expected.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(signed, format!("t=1700000000,v1={expected}"));
        assert_eq!(
            batch_body(&[event(1), event(2)], 7),
            format!("{{\"events\":[{},{}],\"ts\":7}}", event(1).json, event(2).json)
        );
    }

    #[test]
    fn start_refuses_a_bad_url_or_a_zero_limit() {
        fn send_sync<T: Send + Sync + Clone>() {}
        send_sync::<Sender>();
        for cfg in [
            config("ftp://example.com/x"),
            config("not a url"),
            SenderConfig { max_batch: 0, ..config("http://127.0.0.1:1/") },
            SenderConfig { queue_max: 0, ..config("http://127.0.0.1:1/") },
        ] {
            let err = Sender::start(cfg, Box::new(|_: &[String]| {})).err().unwrap();
            assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        }
    }

    #[test]
    fn retries_until_the_receiver_recovers_and_loses_nothing() {
        let hook = Receiver::start(|n| Answer::Status(if n < 2 { 500 } else { 200 }));
        let (sender, done) = start(config(&hook.url));
        for i in 0..20 {
            sender.submit(event(i));
        }
        let mut finished = done_ids(&done, 20);
        finished.sort_by_key(|id| id[2..].parse::<usize>().unwrap());
        assert_eq!(finished, ids(0..20), "each id done once");
        assert!(done.try_recv().is_err());

        let mut requests = Vec::new();
        while let Ok(seen) = hook.requests.try_recv() {
            assert_eq!(seen.content_type, "application/json");
            assert!(verifies(&seen.signature, &seen.body), "{} over {}", seen.signature, seen.body);
            requests.push(seen.ids);
        }
        // The first batch failed twice: three requests with the same ids.
        assert!(requests.len() >= 3);
        assert_eq!(requests[0], requests[1]);
        assert_eq!(requests[0], requests[2]);
        // Past the retries, each id went once, in submission order.
        let sent: Vec<String> = requests[2..].concat();
        assert_eq!(sent, ids(0..20));
        let c = sender.counters();
        assert_eq!((c.delivered(), c.retried(), c.requests()), (20, 2, requests.len() as u64));
        assert_eq!((c.events(EventKind::UserOnline), c.queue_depth(), c.dropped_attempts()), (20, 0, 0));
    }

    #[test]
    fn batches_take_what_is_queued_up_to_max_batch() {
        let hook = Receiver::start(|n| if n == 0 { Answer::Gated(200) } else { Answer::Status(200) });
        let (sender, done) = start(SenderConfig { max_batch: 3, ..config(&hook.url) });
        sender.submit(event(0));
        assert_eq!(hook.next().ids, ids(0..1), "sent at once, alone");
        for i in 1..8 {
            sender.submit(event(i));
        }
        assert_eq!(sender.counters().queue_depth(), 8);
        hook.gate.send(()).unwrap();
        assert_eq!(hook.next().ids, ids(1..4));
        assert_eq!(hook.next().ids, ids(4..7));
        assert_eq!(hook.next().ids, ids(7..8));
        assert_eq!(done_ids(&done, 8), ids(0..8));
        assert_eq!(sender.counters().delivered(), 8);
        assert_eq!(sender.counters().queue_depth(), 0);
    }

    #[test]
    fn a_batch_is_dropped_after_max_attempts_and_reported_done() {
        let hook = Receiver::start(|_| Answer::Status(500));
        let (sender, done) = start(SenderConfig { max_attempts: 3, ..config(&hook.url) });
        sender.submit(event(0));
        for _ in 0..3 {
            assert_eq!(hook.next().ids, ids(0..1));
        }
        assert_eq!(done_ids(&done, 1), ids(0..1));
        let c = sender.counters();
        assert_eq!((c.dropped_attempts(), c.retried(), c.delivered(), c.queue_depth()), (1, 2, 0, 0));
        // The worker goes on with the next events.
        sender.submit(event(1));
        assert_eq!(hook.next().ids, ids(1..2));
    }

    #[test]
    fn a_full_queue_drops_the_oldest_waiting_events() {
        let hook = Receiver::start(|n| if n == 0 { Answer::Gated(200) } else { Answer::Status(200) });
        let (sender, done) = start(SenderConfig { queue_max: 3, ..config(&hook.url) });
        sender.submit(event(0));
        assert_eq!(hook.next().ids, ids(0..1));
        for i in 1..6 {
            sender.submit(event(i));
        }
        let c = sender.counters();
        assert_eq!((c.dropped_queue_full(), c.queue_depth()), (2, 4), "ev1 and ev2 made room");
        hook.gate.send(()).unwrap();
        assert_eq!(hook.next().ids, ids(3..6), "the newest three, in order");
        let mut finished = done_ids(&done, 6);
        finished.sort();
        assert_eq!(finished, ids(0..6), "dropped ones are done too");
        assert_eq!((c.delivered(), c.queue_depth()), (4, 0));
        assert!(hook.requests.try_recv().is_err());
    }

    #[test]
    fn no_answer_within_the_timeout_is_a_failure_retried() {
        let hook = Receiver::start(|n| if n == 0 { Answer::Hang } else { Answer::Status(200) });
        let (sender, done) = start(SenderConfig { timeout_ms: 200, ..config(&hook.url) });
        sender.submit(event(0));
        assert_eq!(hook.next().ids, ids(0..1));
        assert_eq!(hook.next().ids, ids(0..1), "re-sent after the timeout");
        assert_eq!(done_ids(&done, 1), ids(0..1));
        let c = sender.counters();
        assert_eq!((c.delivered(), c.retried(), c.requests()), (1, 1, 2));
        assert!(c.latency_sum_us.load(Relaxed) >= 200_000, "the timed-out attempt is recorded");
    }

    #[test]
    fn stop_sends_what_is_queued_then_drops_what_comes_after() {
        let hook = Receiver::start(|n| if n == 0 { Answer::Gated(200) } else { Answer::Status(200) });
        let (sender, done) = start(config(&hook.url));
        sender.submit(event(0));
        assert_eq!(hook.next().ids, ids(0..1));
        sender.submit(event(1));
        sender.submit(event(2));
        hook.gate.send(()).unwrap();
        sender.stop(PATIENCE);
        // The thread has ended: every `done` call was made.
        assert_eq!(done.try_iter().collect::<Vec<_>>(), ids(0..3));
        assert_eq!(hook.next().ids, ids(1..3));
        sender.submit(event(3));
        let c = sender.counters();
        assert_eq!((c.delivered(), c.dropped_stopped(), c.queue_depth()), (3, 1, 0));
        assert_eq!(c.events(EventKind::UserOnline), 4);
    }

    #[test]
    fn stop_returns_within_its_wait_while_the_receiver_hangs() {
        let hook = Receiver::start(|_| Answer::Hang);
        let (sender, done) = start(SenderConfig { timeout_ms: 60_000, ..config(&hook.url) });
        sender.submit(event(0));
        assert_eq!(hook.next().ids, ids(0..1));
        sender.submit(event(1));
        let started = Instant::now();
        sender.stop(Duration::from_millis(300));
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(300) && took < Duration::from_secs(2), "{took:?}");
        assert!(done.try_recv().is_err(), "nothing finished");
    }

    #[test]
    fn renders_every_family_with_help_and_type() {
        let c = Counters::default();
        c.events[EventKind::MessageOffline.index()].fetch_add(2, Relaxed);
        c.dropped_queue_full.fetch_add(1, Relaxed);
        c.observe(Duration::from_millis(3));
        c.observe(Duration::from_millis(30));
        c.observe(Duration::from_secs(20));
        let mut out = String::new();
        c.render(&mut out);
        for line in [
            "ringpush_webhook_events_total{type=\"message.offline\"} 2\n",
            "ringpush_webhook_events_total{type=\"user.offline\"} 0\n",
            "ringpush_webhook_delivered_total 0\n",
            "ringpush_webhook_retried_total 0\n",
            "ringpush_webhook_dropped_total{reason=\"queue_full\"} 1\n",
            "ringpush_webhook_dropped_total{reason=\"attempts\"} 0\n",
            "# TYPE ringpush_webhook_queue_depth gauge\n",
            "# TYPE ringpush_webhook_request_seconds histogram\n",
            "ringpush_webhook_request_seconds_bucket{le=\"0.005\"} 1\n",
            "ringpush_webhook_request_seconds_bucket{le=\"0.05\"} 2\n",
            "ringpush_webhook_request_seconds_bucket{le=\"10\"} 2\n",
            "ringpush_webhook_request_seconds_bucket{le=\"+Inf\"} 3\n",
            "ringpush_webhook_request_seconds_sum 20.033000\n",
            "ringpush_webhook_request_seconds_count 3\n",
        ] {
            assert!(out.contains(line), "{line:?} missing from\n{out}");
        }
        let families = out.lines().filter(|l| l.starts_with("# TYPE")).count();
        assert_eq!(families, out.lines().filter(|l| l.starts_with("# HELP")).count());
        assert_eq!(families, 6);
    }
}
