//! The node-to-node transport: ZeroMQ PUB/SUB between the nodes of a cluster.
//!
//! The cluster moves bytes between nodes and never decides routing inside the node. A
//! node publishes a [`ClusterMsg`] under a [`Topic`]; every peer subscribed to that topic
//! decodes it and hands the [`Envelope`] to the channel its routing function picks (one
//! per shard, typically the owner shard of the conversation or user). What the node does
//! with it (holdback, gap repair, fan-out) is the shards' business.
//!
//! - `wire`: the payload format (hand-written, versioned, bounded) and the topic frames.
//! - `bus`: the sockets and their two threads; [`Bus`] is the handle the shards share.
//!
//! # Threads
//!
//! ZeroMQ sockets block and must stay on one thread, and executors must never block, so
//! each socket lives on a thread of its own. The publisher thread owns the PUB socket
//! (bound on `cluster.pub_listen`), takes messages from a bounded queue, encodes and sends
//! them. The subscriber thread owns the SUB socket, connected to every peer's PUB endpoint;
//! it polls the socket, applies subscription and peer changes between polls, decodes and
//! routes. Callers on any thread only ever try-send to those threads: [`Bus::publish`],
//! [`Bus::subscribe`] and [`Bus::set_peers`] never wait.
//!
//! # Delivery
//!
//! At most once, in order per publisher, no order across publishers:
//!
//! - One publisher's messages reach a subscriber in the order published: ZeroMQ keeps
//!   order on a connection, and each SUB has one connection per peer.
//! - Any of them may be lost: while a subscription is on its way to a peer (subscribing is
//!   asynchronous: a peer filters by what it has heard so far), while a peer reconnects,
//!   when a subscriber falls `SNDHWM` messages behind (a PUB socket drops silently, libzmq
//!   has no count of it), or when a routing channel is full (counted). A receiver detects
//!   loss from the conversation's `seq` and repairs it from the store.
//! - A node drops what it receives from itself (same node id and epoch), so a discovery
//!   list that includes the node itself costs bandwidth, never duplicates.
//!
//! # Metrics
//!
//! [`ClusterMetrics`], rendered as `ringpush_cluster_*` by [`ClusterMetrics::render`].

mod bus;
mod wire;

pub use bus::{Bus, BusError, Route, INBOUND_SLOTS, OUTBOX_SLOTS};
// The high-water mark callers of `Bus::start` pass when nothing is configured
// (tests/cluster_bus.rs); its definition is the default of `cluster.hwm`.
pub use crate::config::DEFAULT_HWM;
pub use wire::{
    decode, encode, encode_into, ClusterMsg, Envelope, Topic, TopicFrame, WireError, BUCKETS, FORMAT_VERSION,
    KIND_LABELS, MAX_ID, MAX_JSON, MAX_LIST, MAX_PAYLOAD,
};

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

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
