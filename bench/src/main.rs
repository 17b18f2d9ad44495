//! `ringpush-bench`: the load generator of ringpush. Thin: the command line picks a
//! scenario; each scenario lives in its own module.
//!
//! # Layout
//!
//! - `idle`: the `idle` scenario: server memory per idle connection (and after a burst).
//! - `im`: the `im` scenario: many conversations and senders; deliveries/s, latency, CPU.
//! - `fanout`: the `fanout` scenario: one conversation to many members.
//! - `floor`: the `floor` scenario: the kernel's cost of one small TCP write to each of
//!   many loopback sockets, the floor under `fanout`'s server CPU per delivery.
//! - `echo`: the `echo` scenario: round trips, latency and server CPU per message of any
//!   echo server (ringpush's `/echo`, a peer, a plain TCP echo).
//! - `upgrades`: the `upgrades` scenario: new upgrades a second, a reconnect storm.
//! - `webhooks`: the `webhooks` scenario: `message.offline` events into a receiver of the
//!   bench's own (a minimal HTTP/1.1 server); events a second, server CPU per event.
//! - `soak`: the `soak` scenario: a 3-node cluster under churn, rogues and faults, then
//!   the account of loss, order, memory, files and panics (`conn`, `device`, `rogue`).
//! - `scale`: the `crowd` scenario: a crowd of idle connections on five nodes (memory, idle
//!   CPU, broadcast, a big conversation, drain and kill) and the million-connection host on
//!   paper (`paper`); its syncing devices (`sample`).
//! - `redis`: a redis-server of the bench's own (`cluster`, `soak`).
//! - `tabulate`: the side-by-side tables of `bench/compare.sh` from its runs' JSON lines.
//! - `target`: the IM scenarios' server options: start (tuned config) or attach, pinning.
//! - `crowd`: the IM scenarios' client processes: command lines, connect phase, CPU time.
//! - `plan`: who is in which conversation and who sends, the same in every process.
//! - `server`: the server under test: start or attach, readiness, `/metrics`, `/proc`,
//!   the admin API.
//! - `workers`: the parent's side of the client processes: spawn, command lines, stop.
//! - `fleet`: one client process: its connections on an epoll loop (`idle-worker`).
//! - `sink`: one receiver process of `floor`: plain TCP reads, bytes counted (`floor-worker`).
//! - `pipe`: the echo load and the upgrade churn inside a client process.
//! - `chat`: the IM protocol inside a client process: sync, sends, receipts (`--chat`).
//! - `scan`: cheap reads of the server's JSON frames.
//! - `latency`: HdrHistogram latencies and how they cross process boundaries.
//! - `ws`: a minimal RFC 6455 client: handshake, masked frames, a streaming decoder.
//! - `error`: the bench's error type.
//!
//! # Processes
//!
//! The parent starts the server (or attaches to one) and P client processes, which are
//! this binary again with a hidden subcommand; each holds its share of the connections
//! (the open-file limit bounds one process), and they talk to the parent in lines over
//! stdin/stdout.

mod chat;
mod cluster;
mod crowd;
mod echo;
mod error;
mod fanout;
mod fleet;
mod floor;
mod idle;
mod im;
mod latency;
mod pipe;
mod plan;
mod redis;
mod scale;
mod scan;
mod server;
mod sink;
mod soak;
mod tabulate;
mod target;
mod upgrades;
mod webhooks;
mod workers;
mod ws;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Load generator for ringpush.
#[derive(Parser)]
#[command(name = "ringpush-bench", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Bytes of server memory per idle connection (RSS before and after N connections).
    Idle(idle::IdleArgs),
    /// IM load: M conversations of K members over N connections; saturation deliveries/s,
    /// send->deliver latency at a given rate, server CPU per delivery.
    Im(im::ImArgs),
    /// Fan-out of one conversation to many members: time to the first and last receiver.
    Fanout(fanout::FanoutArgs),
    /// The floor under fanout's server CPU per delivery: one small TCP write to each of N
    /// loopback sockets (no WebSocket, no ringpush); CPU per send, time to the last reader.
    Floor(floor::FloorArgs),
    /// The IM load across a cluster (redis-server + N nodes over ZeroMQ), users spread
    /// over the nodes so that sends cross them.
    Cluster(cluster::ClusterArgs),
    /// A crowd of idle connections on five nodes: memory and idle CPU per connection, a
    /// broadcast, a big conversation, drain and kill; the million-connection host on paper.
    Crowd(scale::CrowdArgs),
    /// Echo round trips of any server: N connections x size x pipeline depth; rate,
    /// latency, server CPU per message.
    Echo(echo::EchoArgs),
    /// Three nodes and Redis under churn, misbehaving clients and faults for a set time;
    /// then 0 lost / out of order / duplicated, no memory growth, no fd leak, no panic.
    Soak(soak::SoakArgs),
    /// New WebSocket upgrades a second, and a reconnect storm of N clients at once.
    Upgrades(upgrades::UpgradesArgs),
    /// Webhooks: message.offline events at a high rate (offline members, many
    /// conversations) into a receiver inside the bench; events/s and server CPU per event.
    Webhooks(webhooks::WebhooksArgs),
    /// Side-by-side tables (Markdown) from the JSON lines bench/compare.sh collects.
    Tabulate(tabulate::TabulateArgs),
    /// One client process of a scenario (started by the scenario itself).
    #[command(hide = true)]
    IdleWorker(fleet::FleetArgs),
    /// One receiver process of the floor scenario (started by the scenario itself).
    #[command(hide = true)]
    FloorWorker(sink::SinkArgs),
}

fn main() -> ExitCode {
    let result = match Cli::parse().command {
        Command::Idle(args) => idle::run(args).map(|_| ()),
        Command::Im(args) => im::run(args).map(|_| ()),
        Command::Fanout(args) => fanout::run(args).map(|_| ()),
        Command::Floor(args) => floor::run(args).map(|_| ()),
        Command::Cluster(args) => cluster::run(args).map(|_| ()),
        Command::Crowd(args) => scale::run(args),
        Command::Echo(args) => echo::run(args).map(|_| ()),
        Command::Soak(args) => soak::run(args),
        Command::Upgrades(args) => upgrades::run(args).map(|_| ()),
        Command::Webhooks(args) => webhooks::run(args).map(|_| ()),
        Command::Tabulate(args) => tabulate::run(args),
        Command::IdleWorker(args) => fleet::run(args),
        Command::FloorWorker(args) => sink::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ringpush-bench: {e}");
            ExitCode::FAILURE
        }
    }
}
