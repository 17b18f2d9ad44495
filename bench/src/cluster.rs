//! The `cluster` scenario: the `im` load across a cluster of ringpush nodes that share a
//! `redis-server` and link over ZeroMQ, beside the same load on one node.
//!
//! Method: starts `redis-server` (a free port, a temp dir, no persistence) and `--nodes`
//! ringpush nodes (`shards = 1` each, all pinned to the server CPU, so the figures are
//! per server core, as `im`'s), each with `[redis]` and `[cluster]`. Users are spread over
//! the nodes by index (user `i` on node `i % nodes`), so every conversation of K
//! consecutive users has members on every node and a send crosses nodes. Then the `im`
//! phases run as usual; server CPU is the nodes' together. With `--nodes 1` the same
//! load runs on one node on Redis (the cost of the store alone); `im` gives the
//! embedded store's figure.
//!
//! `redis-server`'s own CPU over the run is reported beside it (it runs on the server
//! CPU too).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::error::Error;
use crate::im::{self, ImArgs};
use crate::redis::{free_port, Redis};
use crate::server::{self, Server, ServerSetup};

/// `limits.send_rate_per_sec` of the nodes: never the limit of a run.
const SEND_RATE_PER_SEC: u32 = 1_000_000;

/// Measure the IM load across a cluster (Redis + ZeroMQ) of ringpush nodes.
#[derive(Debug, Clone, clap::Args)]
pub struct ClusterArgs {
    /// Nodes (1 = one node on Redis, no ZeroMQ).
    #[arg(long, default_value_t = 2)]
    pub nodes: usize,
    /// The redis-server binary.
    #[arg(long, value_name = "PATH", default_value = "redis-server")]
    pub redis_server: PathBuf,
    #[command(flatten)]
    pub im: ImArgs,
}

pub fn run(args: ClusterArgs) -> Result<im::Report, Error> {
    if args.nodes == 0 || args.nodes > 16 {
        return Err(Error::Usage("--nodes must be 1..=16".into()));
    }
    let t = &args.im.target;
    let (server_cpu, client_cpu) = t.pin.cpus()?;
    let redis = Redis::start(&args.redis_server, server_cpu, false)?;
    let mut nodes = Vec::with_capacity(args.nodes);
    for i in 0..args.nodes {
        let mut extra = format!("\n[redis]\nurl = \"redis://127.0.0.1:{}/0\"\n", redis.port);
        if args.nodes > 1 {
            let port = free_port()?;
            extra += &format!(
                "\n[cluster]\npub_listen = \"tcp://127.0.0.1:{port}\"\nadvertise = \"tcp://127.0.0.1:{port}\"\n"
            );
        }
        let setup = ServerSetup {
            secret: t.secret.clone(),
            ping_interval_ms: 25_000,
            idle_timeout_ms: 60_000,
            echo: false,
            max_message_bytes: 64 * 1024,
            send_rate_per_sec: Some(SEND_RATE_PER_SEC),
            signal_rate_per_sec: Some(SEND_RATE_PER_SEC),
            outbound_queue_bytes: Some(4 << 20),
            cpu: server_cpu,
            log: None,
            node_id: format!("bench-n{}", i + 1),
            extra_toml: extra,
            extra_limits: String::new(),
            ports: (0, 0),
        };
        nodes.push(Server::start(&t.server_bin, &setup)?);
    }
    // Each node follows the others (peers are discovered through Redis every second).
    let deadline = Instant::now() + Duration::from_secs(15);
    for node in &nodes {
        loop {
            let peers = node.metrics()?.map_or(0, |m| m.sum("ringpush_cluster_peers"));
            if peers + 1 >= args.nodes as u64 {
                break;
            }
            if Instant::now() > deadline {
                return Err(Error::Server(format!("a node sees {peers} of {} peers", args.nodes - 1)));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    eprintln!(
        "ringpush-bench cluster: {} node(s) and redis-server (pid {}) up; users spread over the nodes",
        args.nodes, redis.pid
    );
    let redis_cpu_before = server::cpu_time(redis.pid).unwrap_or_default();
    let started = Instant::now();
    let report = im::measure(&args.im, &mut nodes, server_cpu, client_cpu)?;
    let redis_cpu = server::cpu_time(redis.pid).unwrap_or_default().saturating_sub(redis_cpu_before);
    let mut repairs = 0;
    for node in &nodes {
        repairs += node.metrics()?.map_or(0, |m| m.sum("ringpush_cluster_gap_repairs_total"));
    }
    eprintln!(
        "  redis      CPU {:.1}% of one core over the run ({:.1} s); gap repairs on the nodes: {repairs}",
        100.0 * redis_cpu.as_secs_f64() / started.elapsed().as_secs_f64().max(1e-9),
        started.elapsed().as_secs_f64()
    );
    Ok(report)
}
