//! Per-shard counters, summed when read.
//!
//! Each shard owns one [`ShardMetrics`] and is its only writer; the admin listener reads
//! them from its own thread. A counter is a relaxed atomic written with a plain load and
//! store (one writer, so no read-modify-write is needed): on x86 that is an ordinary
//! `mov`, no lock prefix, no contention on the shard's hot path.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use crate::ws::handshake;

/// A monotonically increasing count with a single writer (its shard).
#[derive(Default, Debug)]
pub struct Counter(AtomicU64);

impl Counter {
    #[inline]
    pub fn add(&self, n: u64) {
        self.0.store(self.0.load(Relaxed).wrapping_add(n), Relaxed);
    }
    #[inline]
    pub fn inc(&self) {
        self.add(1);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Relaxed)
    }
}

/// A level (goes up and down) with a single writer.
#[derive(Default, Debug)]
pub struct Gauge(AtomicU64);

impl Gauge {
    #[inline]
    pub fn inc(&self) {
        self.0.store(self.0.load(Relaxed).wrapping_add(1), Relaxed);
    }
    #[inline]
    pub fn dec(&self) {
        self.0.store(self.0.load(Relaxed).saturating_sub(1), Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Relaxed)
    }
}

/// Why a handshake was refused: one counter each, the `reason` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    BadRequest,
    Unauthorized,
    Forbidden,
    NotFound,
    /// `Sec-WebSocket-Version` is not 13.
    BadVersion,
    Unavailable,
    Throttled,
    /// The handshake did not finish within `handshake_timeout_ms`.
    Timeout,
}

impl Refusal {
    /// Every reason, in the order of [`ShardMetrics::handshakes_refused`].
    pub const ALL: [Refusal; 8] = [
        Refusal::BadRequest,
        Refusal::Unauthorized,
        Refusal::Forbidden,
        Refusal::NotFound,
        Refusal::BadVersion,
        Refusal::Unavailable,
        Refusal::Throttled,
        Refusal::Timeout,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Refusal::BadRequest => "bad_request",
            Refusal::Unauthorized => "unauthorized",
            Refusal::Forbidden => "forbidden",
            Refusal::NotFound => "not_found",
            Refusal::BadVersion => "bad_version",
            Refusal::Unavailable => "unavailable",
            Refusal::Throttled => "throttled",
            Refusal::Timeout => "timeout",
        }
    }
}

/// The counter of an upgrade refusal: the reason its `label()` names (a test keeps them equal).
impl From<handshake::Refusal> for Refusal {
    fn from(refusal: handshake::Refusal) -> Refusal {
        match refusal {
            handshake::Refusal::BadRequest(_) => Refusal::BadRequest,
            handshake::Refusal::Unauthorized(_) => Refusal::Unauthorized,
            handshake::Refusal::Forbidden => Refusal::Forbidden,
            handshake::Refusal::NotFound => Refusal::NotFound,
            handshake::Refusal::UpgradeRequired => Refusal::BadVersion,
            handshake::Refusal::Unavailable { .. } => Refusal::Unavailable,
            handshake::Refusal::Throttled { .. } => Refusal::Throttled,
        }
    }
}

/// Close codes the server sends, as the `code` label.
pub const CLOSE_CODES: [u16; 10] = [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1011, 4001, 4002];

#[derive(Default, Debug)]
pub struct ShardMetrics {
    /// Open WebSocket connections (after the upgrade).
    pub connections: Gauge,
    pub handshakes_ok: Counter,
    /// Indexed by [`Refusal`].
    pub handshakes_refused: [Counter; Refusal::ALL.len()],
    pub frames_in: Counter,
    pub frames_out: Counter,
    pub bytes_in: Counter,
    pub bytes_out: Counter,
    /// `send` calls that wrote to a client socket: `frames_out` over this is how many
    /// frames one write carries on average (the flusher's coalescing).
    pub socket_writes: Counter,
    pub pings_sent: Counter,
    /// Connections dropped because nothing arrived for `idle_timeout_ms`.
    pub idle_drops: Counter,
    /// Indexed like [`CLOSE_CODES`].
    pub closes_sent: [Counter; CLOSE_CODES.len()],
    /// Codec contexts released from idle connections (memory given back).
    pub codec_releases: Counter,
    /// Messages sequenced and stored (on the owner shard).
    pub accepted: Counter,
    /// Sends answered from the dedupe window (same user, conv and cid).
    pub deduplicated: Counter,
    /// Appends asked again because the store's answer to the first was lost.
    pub store_retries: Counter,
    /// Requests refused, indexed like [`REFUSED_CODES`].
    pub refused: [Counter; REFUSED_CODES.len()],
    /// `msg` frames handed to sessions (live fan-out and replays).
    pub delivered: Counter,
    /// Messages sent by `sync` replays.
    pub replayed: Counter,
    /// `sync` requests answered (on the owner shard).
    pub sync_replays: Counter,
    /// `gap` frames queued in place of messages a slow connection could not take.
    pub slow_consumer_gaps: Counter,
    /// Connections closed with 4002.
    pub slow_consumer_closes: Counter,
    /// `push` and broadcast frames handed to sessions.
    pub pushes: Counter,
    /// Read marks moved (on the owner shard).
    pub reads: Counter,
    /// `message.offline` windows decided (webhooks; on the owner shard).
    pub offline_windows: Counter,
    /// `signal` frames handed to sessions; dropped for a connection without room.
    pub signals_delivered: Counter,
    pub signals_dropped: Counter,
    /// Owner-side time from taking a message to handing its frame to every shard.
    pub fanout_latency: Histogram,
    /// Cluster: messages from other nodes for conversations with no session here (they
    /// share a topic bucket with one that has).
    pub cluster_ignored: Counter,
    /// Cluster: gap repairs (reads of missing seqs from the store).
    pub cluster_repairs: Counter,
    /// Cluster: messages recovered by gap repairs.
    pub cluster_repaired: Counter,
    /// Cluster: member sets read again after a membership change this node missed.
    pub cluster_reconciles: Counter,
}

/// Error codes counted in `ringpush_requests_refused_total`.
pub const REFUSED_CODES: [&str; 5] =
    ["bad_request", "unknown_op", "not_member", "rate_limited", "unavailable"];

/// Upper bounds (microseconds) of the latency histogram buckets; the last is +Inf.
pub const LATENCY_BUCKETS_US: [u64; 12] = [5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 50000];

/// A latency histogram with fixed buckets, one writer.
#[derive(Default, Debug)]
pub struct Histogram {
    buckets: [Counter; LATENCY_BUCKETS_US.len() + 1],
    sum_us: Counter,
}

impl Histogram {
    pub fn record(&self, d: std::time::Duration) {
        let us = d.as_micros() as u64;
        let i = LATENCY_BUCKETS_US.iter().position(|b| us <= *b).unwrap_or(LATENCY_BUCKETS_US.len());
        self.buckets[i].inc();
        self.sum_us.add(us);
    }
}

impl ShardMetrics {
    pub fn refused(&self, reason: Refusal) {
        self.handshakes_refused[reason as usize].inc();
    }

    pub fn refused_send(&self, code: crate::protocol::ErrorCode) {
        let label = code.label();
        if let Some(i) = REFUSED_CODES.iter().position(|c| *c == label) {
            self.refused[i].inc();
        }
    }

    pub fn close_sent(&self, code: u16) {
        if let Some(i) = CLOSE_CODES.iter().position(|c| *c == code) {
            self.closes_sent[i].inc();
        }
    }
}

/// A metric family of the shards' counters: `ringpush_{name}`, its help text, its type,
/// and how its samples are read.
type Family = (&'static str, &'static str, Kind, Read);

/// The `# TYPE` of a family.
#[derive(Clone, Copy)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// How a family's samples are read from the shards.
enum Read {
    /// One sample per shard, labelled `shard`.
    PerShard(fn(&ShardMetrics) -> u64),
    /// One sample, summed over the shards.
    Total(fn(&ShardMetrics) -> u64),
    /// One sample per value of `label` (`values` of them, the `i`th named `value(i)`), each
    /// summed over the shards; `get(m, i)` reads the `i`th.
    ByLabel {
        label: &'static str,
        values: usize,
        value: fn(usize) -> String,
        get: fn(&ShardMetrics, usize) -> u64,
    },
    /// Cumulative `le` buckets in seconds, then `_sum` and `_count`, summed over the shards.
    Histogram(fn(&ShardMetrics) -> &Histogram),
}

/// Every family of [`render`], in the order a scrape gets them.
static FAMILIES: [Family; 27] = [
    ("connections", "Open WebSocket connections.", Kind::Gauge, Read::PerShard(|m| m.connections.get())),
    ("handshakes_ok_total", "Upgrades accepted.", Kind::Counter, Read::PerShard(|m| m.handshakes_ok.get())),
    (
        "frames_in_total",
        "WebSocket messages and control frames received.",
        Kind::Counter,
        Read::PerShard(|m| m.frames_in.get()),
    ),
    (
        "frames_out_total",
        "WebSocket frames queued for clients.",
        Kind::Counter,
        Read::PerShard(|m| m.frames_out.get()),
    ),
    (
        "bytes_in_total",
        "Bytes read from client sockets.",
        Kind::Counter,
        Read::PerShard(|m| m.bytes_in.get()),
    ),
    (
        "bytes_out_total",
        "Bytes written to client sockets.",
        Kind::Counter,
        Read::PerShard(|m| m.bytes_out.get()),
    ),
    (
        "socket_writes_total",
        "Writes to client sockets (frames_out_total over this: frames per write).",
        Kind::Counter,
        Read::PerShard(|m| m.socket_writes.get()),
    ),
    ("pings_sent_total", "Heartbeat pings sent.", Kind::Counter, Read::PerShard(|m| m.pings_sent.get())),
    (
        "idle_drops_total",
        "Connections dropped after idle_timeout_ms of silence.",
        Kind::Counter,
        Read::PerShard(|m| m.idle_drops.get()),
    ),
    (
        "codec_releases_total",
        "Codec buffers released from idle connections.",
        Kind::Counter,
        Read::PerShard(|m| m.codec_releases.get()),
    ),
    (
        "handshakes_refused_total",
        "Upgrades refused, by reason.",
        Kind::Counter,
        Read::ByLabel {
            label: "reason",
            values: Refusal::ALL.len(),
            value: |i| Refusal::ALL[i].label().to_string(),
            get: |m, i| m.handshakes_refused[i].get(),
        },
    ),
    (
        "closes_sent_total",
        "Close frames sent, by code.",
        Kind::Counter,
        Read::ByLabel {
            label: "code",
            values: CLOSE_CODES.len(),
            value: |i| CLOSE_CODES[i].to_string(),
            get: |m, i| m.closes_sent[i].get(),
        },
    ),
    (
        "messages_accepted_total",
        "Messages sequenced and stored.",
        Kind::Counter,
        Read::Total(|m| m.accepted.get()),
    ),
    (
        "messages_deduplicated_total",
        "Sends answered from the dedupe window.",
        Kind::Counter,
        Read::Total(|m| m.deduplicated.get()),
    ),
    (
        "messages_delivered_total",
        "msg frames handed to connections.",
        Kind::Counter,
        Read::Total(|m| m.delivered.get()),
    ),
    (
        "store_retries_total",
        "Appends asked again because the store's answer was lost.",
        Kind::Counter,
        Read::Total(|m| m.store_retries.get()),
    ),
    (
        "messages_replayed_total",
        "msg frames sent by sync replays.",
        Kind::Counter,
        Read::Total(|m| m.replayed.get()),
    ),
    ("sync_replays_total", "sync requests answered.", Kind::Counter, Read::Total(|m| m.sync_replays.get())),
    (
        "pushes_delivered_total",
        "push and broadcast frames handed to connections.",
        Kind::Counter,
        Read::Total(|m| m.pushes.get()),
    ),
    ("read_marks_total", "Read marks moved.", Kind::Counter, Read::Total(|m| m.reads.get())),
    (
        "webhook_windows_total",
        "message.offline windows decided (webhooks only).",
        Kind::Counter,
        Read::Total(|m| m.offline_windows.get()),
    ),
    (
        "signals_delivered_total",
        "signal frames handed to connections.",
        Kind::Counter,
        Read::Total(|m| m.signals_delivered.get()),
    ),
    (
        "signals_dropped_total",
        "signal frames not sent to a connection without room in its outbound budget.",
        Kind::Counter,
        Read::Total(|m| m.signals_dropped.get()),
    ),
    (
        "slow_consumer_gaps_total",
        "gap frames queued for slow connections.",
        Kind::Counter,
        Read::Total(|m| m.slow_consumer_gaps.get()),
    ),
    (
        "slow_consumer_closes_total",
        "Connections closed with 4002.",
        Kind::Counter,
        Read::Total(|m| m.slow_consumer_closes.get()),
    ),
    (
        "requests_refused_total",
        "Client requests answered with an error, by code.",
        Kind::Counter,
        Read::ByLabel {
            label: "code",
            values: REFUSED_CODES.len(),
            value: |i| REFUSED_CODES[i].to_string(),
            get: |m, i| m.refused[i].get(),
        },
    ),
    (
        "fanout_seconds",
        "Owner-side time from taking a message to handing it to every shard.",
        Kind::Histogram,
        Read::Histogram(|m| &m.fanout_latency),
    ),
];

/// The families [`render_node`] adds with Redis: the per-node delivery order's repairs.
static REDIS_FAMILIES: [Family; 4] = [
    (
        "cluster_ignored_total",
        "Messages from other nodes with no session here.",
        Kind::Counter,
        Read::Total(|m| m.cluster_ignored.get()),
    ),
    (
        "cluster_gap_repairs_total",
        "Reads of missing seqs from the store.",
        Kind::Counter,
        Read::Total(|m| m.cluster_repairs.get()),
    ),
    (
        "cluster_repaired_total",
        "Messages recovered by gap repairs.",
        Kind::Counter,
        Read::Total(|m| m.cluster_repaired.get()),
    ),
    (
        "cluster_reconciles_total",
        "Member sets read again after a missed membership change.",
        Kind::Counter,
        Read::Total(|m| m.cluster_reconciles.get()),
    ),
];

/// Writes one family: its help and type lines, then its samples read from `shards`.
fn write_family(out: &mut String, shards: &[Arc<ShardMetrics>], family: &Family) {
    let (name, help, kind, read) = family;
    let _ = writeln!(out, "# HELP ringpush_{name} {help}\n# TYPE ringpush_{name} {}", kind.as_str());
    match *read {
        Read::PerShard(get) => {
            for (i, m) in shards.iter().enumerate() {
                let _ = writeln!(out, "ringpush_{name}{{shard=\"{i}\"}} {}", get(m));
            }
        }
        Read::Total(get) => {
            let sum: u64 = shards.iter().map(|m| get(m)).sum();
            let _ = writeln!(out, "ringpush_{name} {sum}");
        }
        Read::ByLabel { label, values, value, get } => {
            for i in 0..values {
                let sum: u64 = shards.iter().map(|m| get(m, i)).sum();
                let _ = writeln!(out, "ringpush_{name}{{{label}=\"{}\"}} {sum}", value(i));
            }
        }
        Read::Histogram(get) => {
            let bucket = |i: usize| shards.iter().map(|m| get(m).buckets[i].get()).sum::<u64>();
            let mut cumulative = 0;
            for (i, bound) in LATENCY_BUCKETS_US.iter().enumerate() {
                cumulative += bucket(i);
                let _ =
                    writeln!(out, "ringpush_{name}_bucket{{le=\"{}\"}} {cumulative}", *bound as f64 / 1e6);
            }
            cumulative += bucket(LATENCY_BUCKETS_US.len());
            let sum_us: u64 = shards.iter().map(|m| get(m).sum_us.get()).sum();
            let _ = writeln!(out, "ringpush_{name}_bucket{{le=\"+Inf\"}} {cumulative}");
            let _ = writeln!(out, "ringpush_{name}_sum {}", sum_us as f64 / 1e6);
            let _ = writeln!(out, "ringpush_{name}_count {cumulative}");
        }
    }
}

/// Renders every shard's counters in the Prometheus text format (version 0.0.4).
pub fn render(shards: &[Arc<ShardMetrics>]) -> String {
    let mut out = String::with_capacity(4096);
    for family in &FAMILIES {
        write_family(&mut out, shards, family);
    }
    out
}

/// What [`render_node`] shows of the node, read by its caller from the node's state (so
/// this module needs nothing above it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeFacts {
    /// The store answers (with Redis: as of the last lease renewal).
    pub store_up: bool,
    /// The store is Redis (else the embedded one): the cluster families are shown.
    pub redis: bool,
    /// Dead nodes whose presence this node purged (shown with Redis only).
    pub presence_purges: u64,
    /// Every shard accepts, the store answers, the node is not draining (`/readyz`).
    pub ready: bool,
    /// `limits.max_connections`.
    pub max_connections: u64,
    /// How long the slowest shard took to answer the last watchdog ping, in microseconds
    /// (capped at the ping's timeout: a stalled shard shows the cap).
    pub shard_ping_us: u64,
}

/// The node-wide figures: store health and, with Redis, the delivery order's repairs and
/// the presence purges. A cluster's ZeroMQ links have families of their own
/// (`cluster::ClusterMetrics`), which the caller renders after these.
pub fn render_node(node: &NodeFacts, shards: &[Arc<ShardMetrics>], out: &mut String) {
    let up = node.store_up as u8;
    let kind = if node.redis { "redis" } else { "memory" };
    let _ = writeln!(
        out,
        "# HELP ringpush_ready 1 while /readyz answers 200 (every shard accepts, the store answers, not draining).\n\
         # TYPE ringpush_ready gauge\nringpush_ready {}\n\
         # HELP ringpush_max_connections limits.max_connections.\n\
         # TYPE ringpush_max_connections gauge\nringpush_max_connections {}\n\
         # HELP ringpush_shard_ping_seconds Time the slowest shard took to answer the last watchdog ping (once a second; capped at its timeout).\n\
         # TYPE ringpush_shard_ping_seconds gauge\nringpush_shard_ping_seconds {}.{:06}",
        node.ready as u8,
        node.max_connections,
        node.shard_ping_us / 1_000_000,
        node.shard_ping_us % 1_000_000
    );
    let _ = writeln!(
        out,
        "# HELP ringpush_store_up 1 while the store answers (Redis: as of the last lease renewal).\n\
         # TYPE ringpush_store_up gauge\nringpush_store_up{{backend=\"{kind}\"}} {up}"
    );
    if node.redis {
        for family in &REDIS_FAMILIES {
            write_family(out, shards, family);
        }
        let _ = writeln!(
            out,
            "# HELP ringpush_presence_purges_total Dead nodes whose presence this node purged.\n\
             # TYPE ringpush_presence_purges_total counter\nringpush_presence_purges_total {}",
            node.presence_purges
        );
    }
}

/// Process-wide figures read when scraped: the C heap's bytes in use (glibc's
/// `mallinfo2`, summed over its arenas), to tell live memory from RSS kept by the allocator,
/// and the open descriptors (a walk over `/proc/self/fd`: call it off the executors).
pub fn render_process(out: &mut String) {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallinfo2 only reads the allocator's statistics.
        let info = unsafe { libc::mallinfo2() };
        let in_use = info.uordblks + info.hblkhd;
        let _ = writeln!(
            out,
            "# HELP ringpush_heap_in_use_bytes Heap bytes allocated and not freed (glibc mallinfo2).\n\
             # TYPE ringpush_heap_in_use_bytes gauge\nringpush_heap_in_use_bytes {in_use}"
        );
        let _ = writeln!(
            out,
            "# HELP ringpush_heap_free_bytes Heap bytes freed but kept by the allocator.\n\
             # TYPE ringpush_heap_free_bytes gauge\nringpush_heap_free_bytes {}",
            info.fordblks
        );
    }
    #[cfg(target_os = "linux")]
    {
        // The standard process collector's names, so existing alerts on them apply.
        let open = std::fs::read_dir("/proc/self/fd").map(|d| d.count()).unwrap_or(0);
        let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        // SAFETY: getrlimit writes into the struct it is given.
        let max =
            if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0 { limit.rlim_cur } else { 0 };
        let _ = writeln!(
            out,
            "# HELP process_open_fds Open file descriptors.\n# TYPE process_open_fds gauge\nprocess_open_fds {open}\n\
             # HELP process_max_fds The open-file limit (RLIMIT_NOFILE, soft).\n# TYPE process_max_fds gauge\nprocess_max_fds {max}"
        );
    }
    #[cfg(not(target_os = "linux"))]
    let _ = out;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_sums_and_per_shard_lines() {
        let a = Arc::new(ShardMetrics::default());
        let b = Arc::new(ShardMetrics::default());
        a.connections.inc();
        b.connections.inc();
        b.connections.inc();
        a.refused(Refusal::Unauthorized);
        b.refused(Refusal::Unauthorized);
        b.close_sent(1001);
        let text = render(&[a, b]);
        assert!(text.contains("ringpush_connections{shard=\"1\"} 2\n"));
        assert!(text.contains("ringpush_handshakes_refused_total{reason=\"unauthorized\"} 2\n"));
        assert!(text.contains("ringpush_closes_sent_total{code=\"1001\"} 1\n"));
    }

    #[test]
    fn upgrade_refusals_count_under_the_label_they_carry() {
        use handshake::Refusal as R;
        let throttled = R::Throttled { why: "", retry_after_s: 1 };
        for r in [R::BadRequest(""), R::Unauthorized(""), R::Forbidden, R::NotFound, R::UpgradeRequired]
            .into_iter()
            .chain([R::Unavailable { why: "", retry_after_s: 1 }, throttled])
        {
            assert_eq!(Refusal::from(r).label(), r.label());
        }
        for (i, r) in Refusal::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i, "ALL is in counter order");
        }
    }

    #[test]
    fn node_figures_show_the_cluster_families_only_with_redis() {
        let m = Arc::new(ShardMetrics::default());
        m.cluster_repairs.add(3);
        let shards = [m];
        let mut out = String::new();
        render_node(
            &NodeFacts {
                store_up: true,
                redis: false,
                presence_purges: 9,
                ready: true,
                max_connections: 7,
                shard_ping_us: 1_500,
            },
            &shards,
            &mut out,
        );
        assert!(out.contains("\nringpush_ready 1\n"), "{out}");
        assert!(out.contains("\nringpush_max_connections 7\n"), "{out}");
        assert!(out.contains("\nringpush_shard_ping_seconds 0.001500\n"), "{out}");
        assert!(out.ends_with(
            "# HELP ringpush_store_up 1 while the store answers (Redis: as of the last lease renewal).\n\
             # TYPE ringpush_store_up gauge\nringpush_store_up{backend=\"memory\"} 1\n"
        ));
        assert!(!out.contains("cluster"), "{out}");
        out.clear();
        render_node(
            &NodeFacts {
                store_up: false,
                redis: true,
                presence_purges: 9,
                ready: false,
                max_connections: 7,
                shard_ping_us: 0,
            },
            &shards,
            &mut out,
        );
        assert!(out.contains("ringpush_store_up{backend=\"redis\"} 0\n"));
        assert!(out.contains("\nringpush_ready 0\n"), "{out}");
        assert!(out.contains(
            "# HELP ringpush_cluster_gap_repairs_total Reads of missing seqs from the store.\n\
             # TYPE ringpush_cluster_gap_repairs_total counter\nringpush_cluster_gap_repairs_total 3\n"
        ));
        assert!(out
            .ends_with("# TYPE ringpush_presence_purges_total counter\nringpush_presence_purges_total 9\n"));
    }
}
