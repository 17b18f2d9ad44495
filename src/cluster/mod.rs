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
mod counters;
mod wire;

pub use bus::{Bus, BusError, BusOptions, Route, INBOUND_SLOTS, OUTBOX_SLOTS};
pub use counters::{ClusterMetrics, SharedCounter};
// The high-water mark callers of `Bus::start` pass when nothing is configured
// (tests/cluster_bus.rs); its definition is the default of `cluster.hwm`.
pub use crate::config::DEFAULT_HWM;
pub use wire::{
    decode, encode, encode_into, ClusterMsg, Envelope, Topic, TopicFrame, WireError, BUCKETS, FORMAT_VERSION,
    KIND_LABELS, MAX_ID, MAX_JSON, MAX_LIST, MAX_PAYLOAD,
};
