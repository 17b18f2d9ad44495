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
pub const REFUSAL_REASONS: [&str; 7] =
    ["bad_request", "unauthorized", "forbidden", "not_found", "bad_version", "unavailable", "timeout"];

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
    pub pings_sent: Counter,
    /// Connections dropped because nothing arrived for `idle_timeout_ms`.
    pub idle_drops: Counter,
    /// Indexed like [`CLOSE_CODES`].
    pub closes_sent: [Counter; CLOSE_CODES.len()],
    /// Codec contexts released from idle connections (memory given back).
    pub codec_releases: Counter,
}

impl ShardMetrics {
    pub fn refused(&self, reason: &str) {
        if let Some(i) = REFUSAL_REASONS.iter().position(|r| *r == reason) {
            self.handshakes_refused[i].inc();
        }
    }

    pub fn close_sent(&self, code: u16) {
        if let Some(i) = CLOSE_CODES.iter().position(|c| *c == code) {
            self.closes_sent[i].inc();
        }
    }
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
    out
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
