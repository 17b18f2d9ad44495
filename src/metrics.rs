//! Per-shard counters, summed when read.
//!
//! Each shard owns one [`ShardMetrics`] and is its only writer; the admin listener reads
//! them from its own thread. A counter is a relaxed atomic written with a plain load and
//! store (one writer, so no read-modify-write is needed): on x86 that is an ordinary
//! `mov`, no lock prefix, no contention on the shard's hot path.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

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

/// Why a handshake was refused, as the `reason` label.
pub const REFUSAL_REASONS: [&str; 8] = [
    "bad_request",
    "unauthorized",
    "forbidden",
    "not_found",
    "bad_version",
    "unavailable",
    "throttled",
    "timeout",
];

/// Close codes the server sends, as the `code` label.
pub const CLOSE_CODES: [u16; 10] = [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1011, 4001, 4002];

#[derive(Default, Debug)]
pub struct ShardMetrics {
    /// Open WebSocket connections (after the upgrade).
    pub connections: Gauge,
    pub handshakes_ok: Counter,
    /// Indexed like [`REFUSAL_REASONS`].
    pub handshakes_refused: [Counter; REFUSAL_REASONS.len()],
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
    pub fn refused(&self, reason: &str) {
        if let Some(i) = REFUSAL_REASONS.iter().position(|r| *r == reason) {
            self.handshakes_refused[i].inc();
        }
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

/// Writes counter `ringpush_{name}`: `get` summed over the shards, with its help line.
fn write_total(
    out: &mut String,
    shards: &[Arc<ShardMetrics>],
    name: &str,
    help: &str,
    get: &dyn Fn(&ShardMetrics) -> u64,
) {
    let sum: u64 = shards.iter().map(|m| get(m)).sum();
    let _ =
        writeln!(out, "# HELP ringpush_{name} {help}\n# TYPE ringpush_{name} counter\nringpush_{name} {sum}");
}

/// Renders every shard's counters in the Prometheus text format (version 0.0.4).
pub fn render(shards: &[Arc<ShardMetrics>]) -> String {
    let mut out = String::with_capacity(4096);
    let per_shard =
        |out: &mut String, name: &str, help: &str, kind: &str, get: &dyn Fn(&ShardMetrics) -> u64| {
            let _ = writeln!(out, "# HELP ringpush_{name} {help}\n# TYPE ringpush_{name} {kind}");
            for (i, m) in shards.iter().enumerate() {
                let _ = writeln!(out, "ringpush_{name}{{shard=\"{i}\"}} {}", get(m));
            }
        };
    per_shard(&mut out, "connections", "Open WebSocket connections.", "gauge", &|m| m.connections.get());
    per_shard(&mut out, "handshakes_ok_total", "Upgrades accepted.", "counter", &|m| m.handshakes_ok.get());
    per_shard(
        &mut out,
        "frames_in_total",
        "WebSocket messages and control frames received.",
        "counter",
        &|m| m.frames_in.get(),
    );
    per_shard(&mut out, "frames_out_total", "WebSocket frames queued for clients.", "counter", &|m| {
        m.frames_out.get()
    });
    per_shard(&mut out, "bytes_in_total", "Bytes read from client sockets.", "counter", &|m| {
        m.bytes_in.get()
    });
    per_shard(&mut out, "bytes_out_total", "Bytes written to client sockets.", "counter", &|m| {
        m.bytes_out.get()
    });
    per_shard(
        &mut out,
        "socket_writes_total",
        "Writes to client sockets (frames_out_total over this: frames per write).",
        "counter",
        &|m| m.socket_writes.get(),
    );
    per_shard(&mut out, "pings_sent_total", "Heartbeat pings sent.", "counter", &|m| m.pings_sent.get());
    per_shard(
        &mut out,
        "idle_drops_total",
        "Connections dropped after idle_timeout_ms of silence.",
        "counter",
        &|m| m.idle_drops.get(),
    );
    per_shard(
        &mut out,
        "codec_releases_total",
        "Codec buffers released from idle connections.",
        "counter",
        &|m| m.codec_releases.get(),
    );

    let _ = writeln!(
        out,
        "# HELP ringpush_handshakes_refused_total Upgrades refused, by reason.\n\
         # TYPE ringpush_handshakes_refused_total counter"
    );
    for (r, reason) in REFUSAL_REASONS.iter().enumerate() {
        let sum: u64 = shards.iter().map(|m| m.handshakes_refused[r].get()).sum();
        let _ = writeln!(out, "ringpush_handshakes_refused_total{{reason=\"{reason}\"}} {sum}");
    }
    let _ = writeln!(
        out,
        "# HELP ringpush_closes_sent_total Close frames sent, by code.\n# TYPE ringpush_closes_sent_total counter"
    );
    for (c, code) in CLOSE_CODES.iter().enumerate() {
        let sum: u64 = shards.iter().map(|m| m.closes_sent[c].get()).sum();
        let _ = writeln!(out, "ringpush_closes_sent_total{{code=\"{code}\"}} {sum}");
    }
    let total = |out: &mut String, name: &str, help: &str, get: &dyn Fn(&ShardMetrics) -> u64| {
        write_total(out, shards, name, help, get)
    };
    total(&mut out, "messages_accepted_total", "Messages sequenced and stored.", &|m| m.accepted.get());
    total(&mut out, "messages_deduplicated_total", "Sends answered from the dedupe window.", &|m| {
        m.deduplicated.get()
    });
    total(&mut out, "messages_delivered_total", "msg frames handed to connections.", &|m| m.delivered.get());
    total(
        &mut out,
        "store_retries_total",
        "Appends asked again because the store's answer was lost.",
        &|m| m.store_retries.get(),
    );
    total(&mut out, "messages_replayed_total", "msg frames sent by sync replays.", &|m| m.replayed.get());
    total(&mut out, "sync_replays_total", "sync requests answered.", &|m| m.sync_replays.get());
    total(&mut out, "pushes_delivered_total", "push and broadcast frames handed to connections.", &|m| {
        m.pushes.get()
    });
    total(&mut out, "slow_consumer_gaps_total", "gap frames queued for slow connections.", &|m| {
        m.slow_consumer_gaps.get()
    });
    total(&mut out, "slow_consumer_closes_total", "Connections closed with 4002.", &|m| {
        m.slow_consumer_closes.get()
    });
    let _ = writeln!(
        out,
        "# HELP ringpush_requests_refused_total Client requests answered with an error, by code.\n\
         # TYPE ringpush_requests_refused_total counter"
    );
    for (i, code) in REFUSED_CODES.iter().enumerate() {
        let sum: u64 = shards.iter().map(|m| m.refused[i].get()).sum();
        let _ = writeln!(out, "ringpush_requests_refused_total{{code=\"{code}\"}} {sum}");
    }
    let _ = writeln!(
        out,
        "# HELP ringpush_fanout_seconds Owner-side time from taking a message to handing it to every shard.\n\
         # TYPE ringpush_fanout_seconds histogram"
    );
    let mut cumulative = 0;
    for (i, bound) in LATENCY_BUCKETS_US.iter().enumerate() {
        cumulative += shards.iter().map(|m| m.fanout_latency.buckets[i].get()).sum::<u64>();
        let _ =
            writeln!(out, "ringpush_fanout_seconds_bucket{{le=\"{}\"}} {cumulative}", *bound as f64 / 1e6);
    }
    cumulative +=
        shards.iter().map(|m| m.fanout_latency.buckets[LATENCY_BUCKETS_US.len()].get()).sum::<u64>();
    let sum_us: u64 = shards.iter().map(|m| m.fanout_latency.sum_us.get()).sum();
    let _ = writeln!(out, "ringpush_fanout_seconds_bucket{{le=\"+Inf\"}} {cumulative}");
    let _ = writeln!(out, "ringpush_fanout_seconds_sum {}", sum_us as f64 / 1e6);
    let _ = writeln!(out, "ringpush_fanout_seconds_count {cumulative}");
    out
}

/// Process-wide figures read when scraped: the C heap's bytes in use (glibc's
/// `mallinfo2`, summed over its arenas), to tell live memory from RSS kept by the allocator.
/// The node-wide figures: store health and, with Redis, the delivery order's repairs
/// and, in a cluster, the ZeroMQ links.
pub fn render_node(node: &crate::node::Node, shards: &[Arc<ShardMetrics>], out: &mut String) {
    use std::sync::atomic::Ordering;
    let up = node.store_up.load(Ordering::Relaxed) as u8;
    let kind = if node.redis.is_some() { "redis" } else { "memory" };
    let _ = writeln!(
        out,
        "# HELP ringpush_store_up 1 while the store answers (Redis: as of the last lease renewal).\n\
         # TYPE ringpush_store_up gauge\nringpush_store_up{{backend=\"{kind}\"}} {up}"
    );
    if node.redis.is_some() {
        let total = |out: &mut String, name: &str, help: &str, get: &dyn Fn(&ShardMetrics) -> u64| {
            write_total(out, shards, name, help, get)
        };
        total(out, "cluster_ignored_total", "Messages from other nodes with no session here.", &|m| {
            m.cluster_ignored.get()
        });
        total(out, "cluster_gap_repairs_total", "Reads of missing seqs from the store.", &|m| {
            m.cluster_repairs.get()
        });
        total(out, "cluster_repaired_total", "Messages recovered by gap repairs.", &|m| {
            m.cluster_repaired.get()
        });
        total(
            out,
            "cluster_reconciles_total",
            "Member sets read again after a missed membership change.",
            &|m| m.cluster_reconciles.get(),
        );
        let purges = node.presence_purges.load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "# HELP ringpush_presence_purges_total Dead nodes whose presence this node purged.\n\
             # TYPE ringpush_presence_purges_total counter\nringpush_presence_purges_total {purges}"
        );
    }
    if let Some(links) = &node.cluster {
        links.bus.metrics().render(out);
    }
}

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
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
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
        a.refused("unauthorized");
        b.refused("unauthorized");
        b.close_sent(1001);
        let text = render(&[a, b]);
        assert!(text.contains("ringpush_connections{shard=\"1\"} 2\n"));
        assert!(text.contains("ringpush_handshakes_refused_total{reason=\"unauthorized\"} 2\n"));
        assert!(text.contains("ringpush_closes_sent_total{code=\"1001\"} 1\n"));
    }
}
