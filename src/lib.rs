//! ringpush: a thread-per-core WebSocket push server for instant messaging.
//!
//! # Layout
//!
//! - `config`: the TOML configuration of PROTOCOL.md, its defaults, env overrides, checks.
//! - `auth`: HS256 client tokens (verify on upgrade, mint for `ringpush token`).
//! - `client`: `ringpush connect`, a line client for trying a server by hand.
//! - `server`: `run(config, shutdown)`: binds, starts the shards and the control thread, drains.
//! - `shard`: one pinned glommio executor: its listener, session table, timer wheel.
//! - `session`: one connection: join (then `hello`), read loop, dispatch, timers, close
//!   (`mod.rs`); the outbound queue and its thinning into gaps (`outbound.rs`); the
//!   per-conversation delivery modes, held messages and replay backlog (`modes.rs`); the
//!   HTTP upgrade (`upgrade.rs`).
//! - `admission`: a shard's share of the connect rate and its per-address counts.
//! - `ws`: the upgrade (`handshake`) and RFC 6455 framing through tungstenite (`codec`).
//! - `protocol`: the JSON frames of PROTOCOL.md as types; no sockets.
//! - `hub`: a shard's indexes of its sessions, by user and by conversation; no I/O.
//! - `conv`: the owner shard's side of conversations: sequencing, fan-out, `sync`, and
//!   with Redis the per-node delivery order (holdback, gap repair, tail checks).
//! - `mesh`: messages between the executors of the process; `shard_for(key, n)`.
//! - `cluster`: node-to-node transport: ZeroMQ PUB/SUB on its own threads, the wire
//!   format, hashed topics; hands what arrives to a routing function, never routes itself.
//! - `store`: membership, seq, history, dedupe, users' conversations behind one trait
//!   (`memory`, or `redis` for a cluster, which also holds presence and node leases);
//!   presence of local connections comes from the sessions themselves.
//! - `bridge`: how shards reach blocking clients without blocking: jobs over
//!   `crossbeam-channel` to worker threads, answers over `flume` (the Redis pool).
//! - `wheel`: the hashed timer wheel behind heartbeats, idle drops and token expiry.
//! - `api`: the admin listener: `/healthz`, `/readyz`, `/metrics`, `/api/v1`.
//! - `web`: what a browser gets: the `/demo` try-it page (client listener, demo mode
//!   only) and the live dashboard (`/`, `/events` on the admin listener), all embedded.
//! - `metrics`: per-shard counters, summed when read.
//! - `lease`: the node's lease, presence and peer list in Redis (control thread).
//! - `limits`: the host's limits, reported at start.
//! - `notify`: the systemd notify protocol (READY, WATCHDOG, STOPPING).
//! - `error`: the crate's error type.
//!
//! # Thread model
//!
//! One shard per CPU of the process's affinity mask, each a glommio `LocalExecutor`
//! pinned to its CPU with its own `SO_REUSEPORT` listener: a connection lives its whole
//! life on the shard that accepted it, and a shard's state is `!Send` and never locked.
//! Shards and the `control` thread (an unpinned executor that serves the admin listener,
//! talks to systemd and drives the drain) form a mesh of bounded glommio channels, FIFO
//! per pair (`mesh`). Signals are turned into a drain on their own thread.
//!
//! With `[redis]` and `[cluster]`, blocking clients get threads of their own: the Redis
//! pool's workers (`bridge`), and ZeroMQ's publisher and subscriber (`cluster`). Shards
//! queue work to them without waiting and are woken by their answers (glommio wakers
//! may be woken from any thread); the subscriber hands each inbound message to the
//! owner shard of its conversation or user. The control thread keeps the node's lease.
//!
//! Dependencies point down: `session` and `conv` use the `Shard` context (its config,
//! metrics, mesh and tables) rather than being handed each piece; `ws`, `protocol`,
//! `hub`, `wheel` and `store` know nothing of shards or sessions.

pub mod admission;
pub mod api;
pub mod auth;
pub mod bridge;
pub mod client;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod conv;
pub mod ctx;
pub mod error;
pub mod hub;
pub mod ids;
pub mod lease;
pub mod limits;
pub mod mesh;
pub mod metrics;
pub mod node;
pub mod notify;
pub mod protocol;
pub mod server;
pub mod session;
pub mod shard;
pub mod store;
pub mod wake;
pub mod web;
pub mod wheel;
pub mod ws;
