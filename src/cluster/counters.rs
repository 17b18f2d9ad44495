//! What the cluster transport counts ([`ClusterMetrics`]), rendered as `ringpush_cluster_*`.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use super::wire::KIND_LABELS;
use crate::metrics::{Counter, Gauge};

/// A count with many writers (every caller of [`Bus::publish`]): an atomic add, off the
/// hot path since it only moves when messages are being dropped.
#[derive(Default, Debug)]
pub struct SharedCounter(AtomicU64);

impl SharedCounter {
    pub fn inc(&self) {
        self.0.fetch_add(1, Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Relaxed)
    }
}

/// The bus's counters. Each field has one writer, named on it, except
/// `publish_queue_full` (see [`SharedCounter`]); the admin listener reads them.
#[derive(Default, Debug)]
pub struct ClusterMetrics {
    /// Messages handed to the PUB socket (publisher thread).
    pub published: Counter,
    /// Messages [`Bus::publish`] dropped because the publisher's queue was full (callers).
    pub publish_queue_full: SharedCounter,
    /// Messages the wire format refused: an id, list or JSON past its cap (publisher thread).
    pub publish_too_large: Counter,
    /// Messages the PUB socket refused (publisher thread).
    pub publish_send_errors: Counter,
    /// Messages decoded from peers, indexed like [`KIND_LABELS`] (subscriber thread).
    pub received: [Counter; KIND_LABELS.len()],
    /// Decoded messages dropped because their routing channel was full or gone (subscriber).
    pub inbound_dropped: Counter,
    /// Inbound messages that were not `[topic, valid payload]` (subscriber thread).
    pub decode_errors: Counter,
    /// Messages from this node itself (same id and epoch), dropped (subscriber thread).
    pub looped_back: Counter,
    /// Topics the SUB socket is subscribed to (subscriber thread).
    pub subscribed_topics: Gauge,
    /// Peer endpoints the SUB socket is connected to (subscriber thread).
    pub peers: Gauge,
}

/// `publish_dropped_total` reasons, in render order.
const DROP_REASONS: [&str; 3] = ["queue_full", "too_large", "send_error"];

impl ClusterMetrics {
    /// Messages not published, for any reason.
    pub fn publish_dropped(&self) -> u64 {
        self.publish_queue_full.get() + self.publish_too_large.get() + self.publish_send_errors.get()
    }

    /// Messages decoded from peers, of every kind.
    pub fn received_total(&self) -> u64 {
        self.received.iter().map(Counter::get).sum()
    }

    /// Appends the counters in the Prometheus text format (version 0.0.4).
    pub fn render(&self, out: &mut String) {
        let one = |out: &mut String, name: &str, kind: &str, help: &str, value: u64| {
            let _ = writeln!(
                out,
                "# HELP ringpush_cluster_{name} {help}\n# TYPE ringpush_cluster_{name} {kind}\n\
                 ringpush_cluster_{name} {value}"
            );
        };
        one(out, "published_total", "counter", "Messages handed to the PUB socket.", self.published.get());
        let _ = writeln!(
            out,
            "# HELP ringpush_cluster_publish_dropped_total Messages not published, by reason \
             (drops at a peer's high-water mark are silent in libzmq and not counted).\n\
             # TYPE ringpush_cluster_publish_dropped_total counter"
        );
        let drops =
            [self.publish_queue_full.get(), self.publish_too_large.get(), self.publish_send_errors.get()];
        for (reason, n) in DROP_REASONS.iter().zip(drops) {
            let _ = writeln!(out, "ringpush_cluster_publish_dropped_total{{reason=\"{reason}\"}} {n}");
        }
        let _ = writeln!(
            out,
            "# HELP ringpush_cluster_received_total Messages decoded from peers, by kind.\n\
             # TYPE ringpush_cluster_received_total counter"
        );
        for (kind, n) in KIND_LABELS.iter().zip(&self.received) {
            let _ = writeln!(out, "ringpush_cluster_received_total{{kind=\"{kind}\"}} {}", n.get());
        }
        one(
            out,
            "inbound_dropped_total",
            "counter",
            "Messages from peers dropped because their shard's channel was full.",
            self.inbound_dropped.get(),
        );
        one(
            out,
            "decode_errors_total",
            "counter",
            "Messages from peers that were not valid node-to-node messages.",
            self.decode_errors.get(),
        );
        one(
            out,
            "looped_back_total",
            "counter",
            "Messages received from this node itself and dropped (it is in its own peer list).",
            self.looped_back.get(),
        );
        one(
            out,
            "subscribed_topics",
            "gauge",
            "Topics this node subscribes to.",
            self.subscribed_topics.get(),
        );
        one(out, "peers", "gauge", "Peer PUB endpoints this node connects to.", self.peers.get());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_family_with_help_and_type() {
        let m = ClusterMetrics::default();
        m.published.add(3);
        m.publish_queue_full.inc();
        m.received[0].add(2);
        m.received[4].inc();
        m.peers.inc();
        let mut out = String::new();
        m.render(&mut out);
        for line in [
            "ringpush_cluster_published_total 3\n",
            "ringpush_cluster_publish_dropped_total{reason=\"queue_full\"} 1\n",
            "ringpush_cluster_publish_dropped_total{reason=\"send_error\"} 0\n",
            "ringpush_cluster_received_total{kind=\"msg\"} 2\n",
            "ringpush_cluster_received_total{kind=\"broadcast\"} 1\n",
            "ringpush_cluster_inbound_dropped_total 0\n",
            "ringpush_cluster_decode_errors_total 0\n",
            "# TYPE ringpush_cluster_subscribed_topics gauge\n",
            "ringpush_cluster_peers 1\n",
        ] {
            assert!(out.contains(line), "{line:?} missing from\n{out}");
        }
        let families = out.lines().filter(|l| l.starts_with("# TYPE")).count();
        assert_eq!(families, out.lines().filter(|l| l.starts_with("# HELP")).count());
        assert_eq!(families, 8);
        assert_eq!(m.publish_dropped(), 1);
        assert_eq!(m.received_total(), 3);
    }
}
