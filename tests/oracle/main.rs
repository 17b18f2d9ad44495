//! A randomized oracle test of the delivery promises of PROTOCOL.md (issue 16).
//!
//! A seed draws a run ([`plan::Plan`]): users with one to three devices each,
//! conversations, and per connection a behaviour unlike our own clients' (sync at once,
//! late or never; send the moment the `hello` is in; read promptly or slowly through a
//! 4 KiB socket buffer; close, vanish without a word, or stay; come back with the same
//! device id to the same node or another), while a director pushes, broadcasts, posts
//! through the API and changes memberships, and in a cluster kills a node (SIGKILL, then
//! an immediate restart on the same ports), pauses one (SIGSTOP/SIGCONT) and restarts
//! Redis. The real binary runs on loopback; on three nodes, with a real redis-server.
//! Every frame every connection gets is recorded, and [`check`] holds them against the
//! promises.
//!
//! `cargo test` runs a fixed set of seeds (`single_node_seeds`, `cluster_seeds`). By
//! hand, for as long as you like:
//!
//! ```text
//! ORACLE_NODES=3 ORACLE_HOURS=2 cargo test --release --test oracle by_hand -- --ignored --nocapture
//! ORACLE_SEED=1234 ORACLE_NODES=1 cargo test --release --test oracle by_hand -- --ignored --nocapture
//! ```
//!
//! A failure prints the seed, the command that replays it, and per violation the
//! shortest trace of frames that shows it.

mod check;
mod client;
#[path = "../common/mod.rs"]
mod common;
mod plan;
mod record;

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::redis::{free_port, Redis};
use common::{merge_toml, Server, API_KEY, SECRET};
use serde_json::json;

use check::{Bounds, Violation};
use plan::{Act, Plan};
use record::{Call, Clock, Done, Record};

/// The servers' configuration: production heartbeats (a message held until a heartbeat
/// would show), a small outbound budget (slow readers meet it), history that is never
/// trimmed (every replay is complete) and no send limit in the way.
const ORACLE_TOML: &str = r#"
shards = 2
[heartbeat]
ping_interval_ms = 25000
idle_timeout_ms = 60000
[limits]
outbound_queue_bytes = 16384
send_rate_per_sec = 1000
max_connections_per_ip = 0
[history]
max_per_conv = 100000
"#;

/// The seeds `cargo test` runs: on one node, and on three.
const SINGLE_NODE_SEEDS: [u64; 4] = [1, 2, 3, 4];
const CLUSTER_SEEDS: [u64; 2] = [101, 102];

#[test]
fn single_node_seeds() {
    let failed: Vec<String> = SINGLE_NODE_SEEDS
        .iter()
        .filter_map(|&seed| run_seed(seed, 1, Duration::from_secs(8)).err())
        .collect();
    assert!(failed.is_empty(), "{}", failed.join("\n"));
}

#[test]
fn cluster_seeds() {
    let failed: Vec<String> =
        CLUSTER_SEEDS.iter().filter_map(|&seed| run_seed(seed, 3, Duration::from_secs(16)).err()).collect();
    assert!(failed.is_empty(), "{}", failed.join("\n"));
}

/// Runs seeds by hand: `ORACLE_SEED` (one seed) or seeds from `ORACLE_FIRST` (default: a
/// random one) for `ORACLE_HOURS` (default 0.1); `ORACLE_NODES` 1 or 3 (default 1);
/// `ORACLE_SECS` per run (default 8 on one node, 16 on three). Stops at the first failure.
#[test]
#[ignore = "runs for as long as ORACLE_HOURS says; see the module docs"]
fn by_hand() {
    let env = |name: &str| std::env::var(name).ok();
    let nodes: usize = env("ORACLE_NODES").and_then(|v| v.parse().ok()).unwrap_or(1);
    let secs: u64 = env("ORACLE_SECS").and_then(|v| v.parse().ok()).unwrap_or(if nodes > 1 { 16 } else { 8 });
    let duration = Duration::from_secs(secs);
    if let Some(seed) = env("ORACLE_SEED").and_then(|v| v.parse().ok()) {
        if let Err(e) = run_seed(seed, nodes, duration) {
            panic!("{e}");
        }
        return;
    }
    let hours: f64 = env("ORACLE_HOURS").and_then(|v| v.parse().ok()).unwrap_or(0.1);
    let first: u64 = env("ORACLE_FIRST").and_then(|v| v.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() % 1_000_000)
    });
    let until = Instant::now() + Duration::from_secs_f64(hours * 3600.0);
    let mut seed = first;
    while Instant::now() < until {
        if let Err(e) = run_seed(seed, nodes, duration) {
            panic!("{e}");
        }
        seed += 1;
    }
    println!("oracle: seeds {first}..={} on {nodes} node(s) passed ({hours} h)", seed - 1);
}

/// One run: draws the plan of `seed`, runs it, checks it. `Err` holds the report.
fn run_seed(seed: u64, nodes: usize, duration: Duration) -> Result<(), String> {
    let plan = Plan::draw(seed, nodes, duration);
    let started = Instant::now();
    let (record, calls_ok, logs) = run(&plan);
    let conns = record.conns.into_inner().unwrap_or_else(|e| e.into_inner());
    let calls = record.calls.into_inner().unwrap_or_else(|e| e.into_inner());
    let bounds = Bounds {
        cluster: nodes > 1,
        settle_ms: if nodes > 1 { 3000.0 } else { 1500.0 },
        late_ms: if nodes > 1 { 2000.0 } else { 1000.0 },
        change_ms: if nodes > 1 { 1000.0 } else { 200.0 },
    };
    let mut violations = check::check(&conns, &calls, &plan.convs, &bounds);
    for (node, log) in logs.iter().enumerate() {
        if log.contains("panicked") {
            violations.push(Violation {
                conn: 0,
                what: format!("node {} panicked", node + 1),
                trace: log.clone(),
            });
        }
    }
    if let Err(why) = calls_ok {
        violations.push(Violation { conn: 0, what: why, trace: String::new() });
    }
    let frames: usize = conns.iter().map(|c| c.events.len()).sum();
    println!(
        "oracle seed {seed} on {nodes} node(s): {} connections, {frames} events, {} violations, {:.1} s",
        conns.len(),
        violations.len(),
        started.elapsed().as_secs_f64()
    );
    if violations.is_empty() {
        return Ok(());
    }
    let mut report = format!(
        "oracle: seed {seed} on {nodes} node(s) broke {} promise(s). Replay it with:\n  \
         ORACLE_SEED={seed} ORACLE_NODES={nodes} ORACLE_SECS={} cargo test --release --test oracle by_hand -- --ignored --nocapture\n",
        violations.len(),
        duration.as_secs()
    );
    for call in &calls {
        if let Done::Fault(what) = &call.what {
            report.push_str(&format!("  fault: {what}, {:.0} to {:.0} ms\n", call.at, call.done));
        }
    }
    // The first few, each with its trace; the rest by name.
    for v in violations.iter().take(5) {
        report.push_str(&format!("\n* {} (connection {})\n{}", v.what, v.conn, v.trace));
    }
    for v in violations.iter().skip(5).take(20) {
        report.push_str(&format!("* {} (connection {})\n", v.what, v.conn));
    }
    Err(report)
}

/// The servers of a run, restartable on the same ports.
struct Nodes {
    redis: Option<Redis>,
    servers: Vec<Server>,
    configs: Vec<String>,
    addrs: Vec<SocketAddr>,
}

impl Nodes {
    fn start(count: usize) -> Nodes {
        let redis = (count > 1).then(Redis::start_durable);
        let mut configs = Vec::new();
        for i in 0..count {
            let (client, admin, publish) = (free_port(), free_port(), free_port());
            let mut node = format!(
                "node_id = \"n{}\"\nlisten = \"127.0.0.1:{client}\"\nadmin_listen = \"127.0.0.1:{admin}\"\n",
                i + 1
            );
            if let Some(redis) = &redis {
                node.push_str(&format!(
                    "[redis]\nurl = \"{}\"\n[cluster]\npub_listen = \"tcp://127.0.0.1:{publish}\"\nadvertise = \"tcp://127.0.0.1:{publish}\"\n",
                    redis.url()
                ));
            }
            configs.push(merge_toml(&[ORACLE_TOML, &node]));
        }
        let servers: Vec<Server> = configs.iter().map(|c| Server::start(c)).collect();
        if count > 1 {
            for s in &servers {
                s.wait_metric("ringpush_cluster_peers", Duration::from_secs(15), |n| n as usize == count - 1);
            }
        }
        let addrs = servers.iter().map(|s| s.client_addr()).collect();
        Nodes { redis, servers, configs, addrs }
    }

    /// An API call through the first node that answers (one may be down); `None` when
    /// none accepted it. Returns the answer and the node that gave it.
    fn api(&self, method: &str, path: &str, body: &serde_json::Value) -> Option<serde_json::Value> {
        self.api_via(method, path, body).map(|(answer, _)| answer)
    }

    fn api_via(
        &self,
        method: &str,
        path: &str,
        body: &serde_json::Value,
    ) -> Option<(serde_json::Value, usize)> {
        for (i, s) in self.servers.iter().enumerate() {
            let auth = format!("Bearer {API_KEY}");
            let resp = common::try_http(
                s.admin_addr(),
                method,
                path,
                &[("Authorization", auth.as_str())],
                Some(&body.to_string()),
            );
            match resp {
                Ok(r) if r.status / 100 == 2 => return serde_json::from_str(&r.body).ok().map(|a| (a, i)),
                Ok(r) if r.status == 503 => continue,
                Ok(_) => return None,
                Err(_) => continue,
            }
        }
        None
    }
}

/// Runs `plan`: the nodes, the devices' threads and the director; returns what was
/// recorded, whether the director's set-up worked, and the nodes' logs.
fn run(plan: &Plan) -> (Record, Result<(), String>, Vec<String>) {
    let mut nodes = Nodes::start(plan.nodes);
    let record = Record::default();
    let members: Mutex<BTreeMap<String, HashSet<String>>> = Mutex::new(BTreeMap::new());
    let mut setup = Ok(());
    for (conv, users) in &plan.convs {
        let answer =
            nodes.api("PUT", &format!("/api/v1/conversations/{conv}/members"), &json!({ "users": users }));
        if answer.is_none() {
            setup = Err(format!("could not set the members of {conv}"));
        }
        members
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(conv.clone(), users.iter().cloned().collect());
    }
    let clock = Clock::start();
    let winding_down = AtomicBool::new(false);
    let next_conn = Mutex::new(0);
    let addrs = nodes.addrs.clone();
    let shared = client::Shared {
        clock: &clock,
        record: &record,
        secret: SECRET,
        nodes: &addrs,
        members: &members,
        winding_down: &winding_down,
        next_conn: &next_conn,
    };
    std::thread::scope(|scope| {
        for device in &plan.devices {
            let shared = &shared;
            scope.spawn(move || client::run(device, shared));
        }
        direct(plan, &mut nodes, &clock, &record, &members);
        winding_down.store(true, Ordering::Relaxed);
    });
    let logs = nodes.servers.iter().map(|s| s.log()).collect();
    (record, setup, logs)
}

/// The director: the plan's acts at their times.
fn direct(
    plan: &Plan,
    nodes: &mut Nodes,
    clock: &Clock,
    record: &Record,
    members: &Mutex<BTreeMap<String, HashSet<String>>>,
) {
    let start = Instant::now();
    let mut k = 0;
    for (at, act) in &plan.acts {
        let wait = (start + *at).saturating_duration_since(Instant::now());
        std::thread::sleep(wait);
        let t0 = clock.now();
        let what = match act {
            Act::Push { users } => {
                k += 1;
                let body =
                    json!({ "users": users, "body": { "k": k, "pad": "p".repeat(k as usize * 37 % 2000) } });
                let via = nodes.api_via("POST", "/api/v1/push", &body).map(|(_, node)| node);
                Done::Push { k, users: Some(users.clone()), via }
            }
            Act::Broadcast => {
                k += 1;
                let via = nodes
                    .api_via("POST", "/api/v1/broadcast", &json!({ "body": { "k": k } }))
                    .map(|(_, n)| n);
                Done::Push { k, users: None, via }
            }
            Act::Post { conv } => {
                let body = json!({ "post": t0 as u64 });
                let answer = nodes.api(
                    "POST",
                    &format!("/api/v1/conversations/{conv}/messages"),
                    &json!({ "from": "system", "body": body }),
                );
                Done::Post { conv: conv.clone(), body, seq: answer.and_then(|a| a["seq"].as_u64()) }
            }
            Act::Member { conv, user, join } => {
                let answer = if *join {
                    nodes.api(
                        "POST",
                        &format!("/api/v1/conversations/{conv}/members"),
                        &json!({ "users": [user] }),
                    )
                } else {
                    nodes.api("DELETE", &format!("/api/v1/conversations/{conv}/members/{user}"), &json!({}))
                };
                let ok = answer.is_some();
                if ok {
                    let mut m = members.lock().unwrap_or_else(|e| e.into_inner());
                    let set = m.entry(conv.clone()).or_default();
                    if *join {
                        set.insert(user.clone());
                    } else {
                        set.remove(user);
                    }
                }
                Done::Member { conv: conv.clone(), user: user.clone(), join: *join, ok }
            }
            Act::Kill { node } => {
                nodes.servers[*node].kill();
                let config = nodes.configs[*node].clone();
                nodes.servers[*node] = Server::start(&config);
                Done::Fault(format!("node {} killed and restarted", node + 1))
            }
            Act::Pause { node, for_ } => {
                nodes.servers[*node].pause();
                std::thread::sleep(*for_);
                nodes.servers[*node].resume();
                Done::Fault(format!("node {} paused for {for_:?}", node + 1))
            }
            Act::RestartRedis => {
                if let Some(redis) = nodes.redis.as_mut() {
                    redis.restart();
                }
                Done::Fault("redis restarted".into())
            }
        };
        record.call(Call { at: t0, done: clock.now(), what });
    }
    let wait = (start + plan.duration).saturating_duration_since(Instant::now());
    std::thread::sleep(wait);
}
