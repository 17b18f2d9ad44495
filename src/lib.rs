//! ringpush: a thread-per-core WebSocket push server for instant messaging.
//!
//! # Layout
//!
//! Modules in layers, top first. A module imports only from layers below its own (the
//! files of one module may import each other, never in a circle); `tests/layers.rs`
//! holds the code to this map, so keep it true as the code changes.
//!
//! ### Layer 11: the binary
//! - `main`: CLI -> Config -> logging -> `server::run`.
//!
//! ### Layer 10: the process
//! - `server`: `run(config, shutdown)`: binds, starts the shards and the control thread, drains.
//!
//! ### Layer 9: what runs on an executor
//! - `shard`: one pinned glommio executor: its listener, its tasks, its session table
//!   (`table`), its presence writer (`presence`), and the messages it handles.
//! - `api`: the admin listener: `/healthz`, `/readyz`, `/metrics`, `/api/v1`.
//! - `lease`: the node's lease, presence and peer list in Redis (control thread).
//!
//! ### Layer 8: one connection
//! - `session`: one connection: join (then `hello`), read loop, dispatch, timers, close
//!   (`mod.rs`); the outbound queue and its thinning into gaps (`outbound.rs`); the
//!   per-conversation delivery modes, held messages and replay backlog (`modes.rs`); the
//!   HTTP upgrade (`upgrade.rs`).
//!
//! ### Layer 7: what a shard does for others
//! - `conv`: the owner shard's side of conversations (`Owner`): sequencing, fan-out,
//!   `sync`, membership, and with Redis the per-node delivery order (`order`: the
//!   holdback; gap repair, reconciles, tail checks), and which shards want each
//!   conversation (`interest`).
//! - `web`: what a browser gets: the `/demo` try-it page (client listener, demo mode
//!   only) and the live dashboard (`/`, `/events` on the admin listener), all embedded.
//!
//! ### Layer 6: a shard's shared context
//! - `ctx`: what a shard's parts share (`Ctx`): id, config, metrics, clock, store, mesh,
//!   the local and flush queues, the hub. Sessions, conversations and the demo page get a `&Ctx`.
//!
//! ### Layer 5: the process's plumbing
//! - `mesh`: messages between the executors of the process (`ShardMsg`, `Reply`).
//! - `node`: what every thread of a node shares (`Node`, `ClusterLinks`).
//!
//! ### Layer 4: other nodes and a shard's indexes
//! - `cluster`: node-to-node transport: ZeroMQ PUB/SUB on its own threads, the wire
//!   format, hashed topics; hands what arrives to a routing function, never routes itself.
//! - `hub`: a shard's indexes of its sessions, by user and by conversation; no I/O.
//! - `outbox`: the node's webhook events on their way out: kept in Redis in a cluster
//!   (another node takes over a dead node's), handed to `webhook`'s sender.
//!
//! ### Layer 3: durable state and counters
//! - `store`: membership, seq, history, dedupe, users' conversations behind one trait
//!   (`contract`; `memory`, or `redis` for a cluster, which also holds presence and node
//!   leases); presence of local connections comes from the sessions themselves.
//! - `metrics`: per-shard counters, summed when read, rendered from a table.
//!
//! ### Layer 2: formats and blocking clients
//! - `protocol`: the JSON frames of PROTOCOL.md as types; no sockets.
//! - `ws`: the upgrade (`handshake`) and RFC 6455 framing through tungstenite (`codec`).
//! - `bridge`: how shards reach blocking clients without blocking: jobs over
//!   `crossbeam-channel` to worker threads, answers over `flume` (the Redis pool,
//!   `mod.rs`); a Redis Cluster's slot map, per-master connections and redirections
//!   (`cluster.rs`); hash slots and command keys (`slot.rs`); one connection's round
//!   trips, script loads and counters (`wire.rs`).
//! - `webhook`: webhook delivery (`sender`): signed, batched POSTs from a thread of its
//!   own, retried with backoff; callers submit events without waiting.
//! - `limits`: the host's limits, reported at start.
//! - `error`: the crate's start-up error type.
//!
//! ### Layer 1: the ground (no imports from the crate)
//! - `config`: the TOML configuration of PROTOCOL.md, its defaults, env overrides, checks.
//! - `http`: the HTTP/1.1 responses of `api`, `web` and the upgrade's refusals: status
//!   lines, framing, the JSON error body, the `503` of a full listener.
//! - `auth`: HS256 client tokens (verify on upgrade, mint for `ringpush token`).
//! - `admission`: a shard's share of the connect rate and its per-address counts.
//! - `ids`: conversation and user ids (`Key`) and `shard_for(key, n)`.
//! - `clock`: wall-clock unix milliseconds.
//! - `wake`: `Mailbox`, a queue one task of an executor waits on.
//! - `wheel`: the hashed timer wheel behind heartbeats, idle drops and token expiry.
//! - `notify`: the systemd notify protocol (READY, WATCHDOG, STOPPING).
//! - `client`: `ringpush connect`, a line client for trying a server by hand.
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
//! Dependencies point down (see the layers above): sessions and conversations get the
//! shard's context (`Ctx`) and talk to the shard only through the mesh; `ws`,
//! `protocol`, `hub`, `wheel` and `store` know nothing of shards or sessions.

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
pub mod http;
pub mod hub;
pub mod ids;
pub mod lease;
pub mod limits;
pub mod mesh;
pub mod metrics;
pub mod node;
pub mod notify;
pub mod outbox;
pub mod protocol;
pub mod server;
pub mod session;
pub mod shard;
pub mod store;
pub mod wake;
pub mod web;
pub mod webhook;
pub mod wheel;
pub mod ws;
