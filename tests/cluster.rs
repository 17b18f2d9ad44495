//! The cluster, black box: a real `redis-server` and three `ringpush serve` nodes on
//! loopback, linked by ZeroMQ (peers discovered through Redis), with real WebSocket
//! clients spread over them. Nodes get killed (SIGKILL), paused (SIGSTOP) and restarted;
//! Redis gets killed and restarted empty.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::redis::{free_port, Redis, RedisCluster};
use common::*;
use serde_json::json;

/// Heartbeats slow enough that a node paused for seconds does not drop its clients as
/// idle when it resumes (the test clients answer pings only while they read).
const CLUSTER_TOML: &str = r#"
[heartbeat]
ping_interval_ms = 1000
idle_timeout_ms = 30000
[limits]
send_rate_per_sec = 1000
"#;

/// One node's fixed addresses, so it can be restarted on the same ports.
#[derive(Clone)]
struct Ports {
    client: u16,
    admin: u16,
    publish: u16,
}

impl Ports {
    fn free() -> Ports {
        Ports { client: free_port(), admin: free_port(), publish: free_port() }
    }
}

fn start_node(name: &str, redis: &impl Backs, ports: &Ports, extra: &str) -> Server {
    let node = format!(
        r#"
node_id = "{name}"
listen = "127.0.0.1:{client}"
admin_listen = "127.0.0.1:{admin}"
[redis]
url = "{url}"
[cluster]
pub_listen = "tcp://127.0.0.1:{publish}"
advertise = "tcp://127.0.0.1:{publish}"
"#,
        client = ports.client,
        admin = ports.admin,
        publish = ports.publish,
        url = redis.url(),
    );
    Server::start(&merge_toml(&[CLUSTER_TOML, &node, extra]))
}

/// What the nodes keep their state in: its URL, and `redis-cli` against it.
trait Backs {
    fn url(&self) -> String;
    fn cli(&self, args: &[&str]) -> String;
}

impl Backs for Redis {
    fn url(&self) -> String {
        Redis::url(self)
    }
    fn cli(&self, args: &[&str]) -> String {
        Redis::cli(self, args)
    }
}

impl Backs for RedisCluster {
    fn url(&self) -> String {
        RedisCluster::url(self)
    }
    fn cli(&self, args: &[&str]) -> String {
        RedisCluster::cli(self, args)
    }
}

/// The two ways to run a cluster's Redis: one `redis-server`, or a Redis Cluster of three
/// masters (every key of a conversation in one slot, the pool following the slot map).
#[derive(Clone, Copy, Debug)]
enum Topology {
    Single,
    Cluster,
}

/// The running store of either topology.
enum Backing {
    Single(Redis),
    Cluster(RedisCluster),
}

impl Backs for Backing {
    fn url(&self) -> String {
        match self {
            Backing::Single(r) => r.url(),
            Backing::Cluster(c) => c.url(),
        }
    }
    fn cli(&self, args: &[&str]) -> String {
        match self {
            Backing::Single(r) => Backs::cli(r, args),
            Backing::Cluster(c) => Backs::cli(c, args),
        }
    }
}

/// Redis and three nodes `n1`..`n3` that know each other (each sees two peers).
fn cluster(extra: &str) -> (Redis, Vec<Server>, Vec<Ports>) {
    let redis = Redis::start();
    let (nodes, ports) = three_nodes(&redis, extra);
    (redis, nodes, ports)
}

/// [`cluster`] on either topology.
fn cluster_on(topology: Topology, extra: &str) -> (Backing, Vec<Server>, Vec<Ports>) {
    let backing = match topology {
        Topology::Single => Backing::Single(Redis::start()),
        Topology::Cluster => Backing::Cluster(RedisCluster::start()),
    };
    let (nodes, ports) = three_nodes(&backing, extra);
    (backing, nodes, ports)
}

fn three_nodes(redis: &impl Backs, extra: &str) -> (Vec<Server>, Vec<Ports>) {
    let ports: Vec<Ports> = (0..3).map(|_| Ports::free()).collect();
    let nodes: Vec<Server> =
        ports.iter().enumerate().map(|(i, p)| start_node(&format!("n{}", i + 1), redis, p, extra)).collect();
    for node in &nodes {
        node.wait_metric("ringpush_cluster_peers", Duration::from_secs(10), |n| n == 2);
    }
    (nodes, ports)
}

/// Runs a test on both topologies: `name::single` and `name::redis_cluster`.
macro_rules! on_both_topologies {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[test]
            fn single() {
                super::$name(super::Topology::Single)
            }
            #[test]
            fn redis_cluster() {
                super::$name(super::Topology::Cluster)
            }
        }
    )*};
}

on_both_topologies!(
    three_nodes_concurrent_senders_one_order,
    killed_node_leaves_no_presence_and_a_restarted_one_rejoins,
    a_paused_node_gets_every_acked_message_in_order_after_it_resumes,
    the_api_acts_cluster_wide,
    a_drained_node_leaves_the_cluster_at_once,
    read_marks_and_signals_cross_nodes,
);

fn collect_msgs(
    ws: &mut Ws,
    conv: &str,
    done: impl Fn(&[serde_json::Value], &[serde_json::Value]) -> bool,
) -> (Vec<serde_json::Value>, Vec<serde_json::Value>) {
    let mut msgs = Vec::new();
    let mut other = Vec::new();
    while !done(&msgs, &other) {
        let frame = read_json(ws);
        if frame["op"] == "msg" && frame["conv"] == conv {
            msgs.push(frame);
        } else {
            other.push(frame);
        }
    }
    (msgs, other)
}

fn assert_increasing(who: &str, seqs: &[u64]) {
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{who}: seqs not strictly increasing: {seqs:?}");
}

/// Posts through `node`'s API until `ws` shows a `msg` of `conv` (live delivery between
/// the nodes is up once the subscriptions have reached the publishers); returns the last
/// seq posted. The probes are ordinary messages of the conversation.
fn post_until_live(node: &Server, ws: &mut Ws, conv: &str) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let seq = node.post_message(conv, "system", &json!({"probe": true}));
        let got = loop {
            match read_json_within(ws, Duration::from_millis(300)) {
                Some(v) if v["op"] == "msg" && v["conv"] == conv => {
                    break Some(v["seq"].as_u64().expect("seq"))
                }
                Some(_) => {}
                None => break None,
            }
        };
        if let Some(got) = got {
            // Everything up to the last probe arrives in order from here.
            if got < seq {
                let (rest, _) =
                    collect_msgs(ws, conv, |m, _| m.last().and_then(|f| f["seq"].as_u64()) == Some(seq));
                assert_increasing("probe catch-up", &seqs(&rest));
            }
            return seq;
        }
        assert!(Instant::now() < deadline, "no live delivery of {conv} within 10 s");
    }
}

fn three_nodes_concurrent_senders_one_order(topology: Topology) {
    let (_redis, nodes, _) = cluster_on(topology, "");
    let conv = "c-three";
    nodes[0].set_members(conv, &["u1", "u2", "u3"]);
    // Every user has a device on two nodes; u1 sends from n1, u2 from n2, u3 from n3.
    let placement = [("u1", 0, 1), ("u2", 1, 2), ("u3", 2, 0)];
    let mut senders = Vec::new();
    let mut readers = Vec::new();
    for (user, send_node, read_node) in placement {
        senders.push((user, connect_synced(&nodes[send_node], user, "phone", &[conv]).0));
        readers.push((user, connect_synced(&nodes[read_node], user, "laptop", &[conv]).0));
    }
    // Live delivery reaches every node before the real traffic (it would be repaired
    // anyway; this keeps the test about order, not about subscription start-up).
    let mut seen = Vec::new();
    for (_, ws) in readers.iter_mut().chain(senders.iter_mut()) {
        seen.push(post_until_live(&nodes[0], ws, conv));
    }
    let warm = seen.iter().copied().max().unwrap_or(0);
    for ((_, ws), seen) in readers.iter_mut().chain(senders.iter_mut()).zip(seen) {
        if seen < warm {
            let (msgs, _) =
                collect_msgs(ws, conv, |m, _| m.last().and_then(|f| f["seq"].as_u64()) == Some(warm));
            assert_increasing("warm-up", &seqs(&msgs));
        }
    }

    const PER_SENDER: u64 = 40;
    let total = PER_SENDER * 3;
    let threads: Vec<_> = senders
        .into_iter()
        .map(|(user, mut ws)| {
            std::thread::spawn(move || {
                for i in 0..PER_SENDER {
                    send_msg(&mut ws, conv, &format!("{user}-{i}"), &json!({"n": i, "from": user}));
                }
                // Read until every other sender's messages and all own acks are in.
                let (msgs, other) = collect_msgs(&mut ws, conv, |m, o| {
                    let acks = o.iter().filter(|f| f["op"] == "ack").count() as u64;
                    m.len() as u64 + acks == total
                });
                let acked: Vec<u64> =
                    other.iter().filter(|f| f["op"] == "ack").map(|f| f["seq"].as_u64().unwrap()).collect();
                (user, seqs(&msgs), acked)
            })
        })
        .collect();
    let reader_threads: Vec<_> = readers
        .into_iter()
        .map(|(user, mut ws)| {
            std::thread::spawn(move || {
                let (msgs, _) = collect_msgs(&mut ws, conv, |m, _| m.len() as u64 == total);
                (user, seqs(&msgs))
            })
        })
        .collect();

    let expected: Vec<u64> = (warm + 1..=warm + total).collect();
    for t in reader_threads {
        let (user, seqs) = t.join().expect("reader");
        assert_eq!(seqs, expected, "{user}/laptop saw a different seq list");
    }
    for t in threads {
        let (user, seqs, acked) = t.join().expect("sender");
        assert_increasing(user, &seqs);
        assert_increasing(&format!("{user} acks"), &acked);
        let all: BTreeSet<u64> = seqs.iter().chain(&acked).copied().collect();
        assert_eq!(all.into_iter().collect::<Vec<_>>(), expected, "{user}/phone: msgs + own acks");
    }
}

fn killed_node_leaves_no_presence_and_a_restarted_one_rejoins(topology: Topology) {
    let (redis, mut nodes, ports) = cluster_on(topology, "");
    let conv = "c-kill";
    nodes[0].set_members(conv, &["u1", "u2"]);
    let (mut on_n1, _) = connect_synced(&nodes[0], "u1", "a", &[conv]);
    let (_on_n2, _) = connect_synced(&nodes[1], "u1", "b", &[conv]);
    let (_on_n3, _) = connect_synced(&nodes[2], "u1", "c", &[conv]);
    let devices = nodes[0].wait_presence("u1", Duration::from_secs(5), |d| d.len() == 3);
    let on = |node: &str| devices.iter().filter(|d| d["node"] == node).count();
    assert_eq!((on("n1"), on("n2"), on("n3")), (1, 1, 1), "{devices:?}");
    post_until_live(&nodes[1], &mut on_n1, conv);

    nodes[2].kill();
    let killed = Instant::now();
    // The survivors purge its presence within 5 s of its death ...
    let left = nodes[0].wait_presence("u1", Duration::from_secs(5), |d| d.len() == 2);
    assert!(left.iter().all(|d| d["node"] != "n3"), "{left:?}");
    assert!(killed.elapsed() < Duration::from_secs(5), "took {:?}", killed.elapsed());
    nodes[1].wait_presence("u1", Duration::from_secs(1), |d| d.len() == 2);
    // ... and go on: a message posted on n2 reaches the device on n1.
    let seq = nodes[1].post_message(conv, "u2", &json!({"after": "kill"}));
    let (msgs, _) =
        collect_msgs(&mut on_n1, conv, |m, _| m.last().and_then(|f| f["seq"].as_u64()) == Some(seq));
    assert_increasing("n1 after the kill", &seqs(&msgs));
    assert!(redis.cli(&["HGET", "rp:{ctl}:nodes", "n3"]).trim().is_empty(), "n3 still registered");

    // Restarted on the same ports, with a new epoch, it takes part again.
    nodes[2] = start_node("n3", &redis, &ports[2], "");
    nodes[2].wait_metric("ringpush_cluster_peers", Duration::from_secs(10), |n| n == 2);
    let (mut back, _) = connect_synced_after(&nodes[2], "u1", "c", conv);
    let started = Instant::now();
    post_until_live(&nodes[0], &mut back, conv);
    assert!(started.elapsed() < Duration::from_secs(10));
    nodes[0].wait_presence("u1", Duration::from_secs(5), |d| d.iter().any(|x| x["node"] == "n3"));
}

/// Connects and syncs `conv` from 0 (it may have history), returning the connection.
fn connect_synced_after(server: &Server, user: &str, device: &str, conv: &str) -> (Ws, u64) {
    let (mut ws, _) = connect_client(server, user, device);
    let result = sync(&mut ws, conv, 0, None);
    assert_increasing("replay", &result.seqs());
    let last = result.synced["last"].as_u64().expect("last");
    (ws, last)
}

#[test]
fn redis_outage_refuses_sends_and_everything_resumes() {
    let (mut redis, nodes, _) = cluster("");
    let conv = "c-outage";
    nodes[0].set_members(conv, &["u1", "u2"]);
    let (mut sender, _) = connect_synced(&nodes[0], "u1", "phone", &[conv]);
    let (mut reader, _) = connect_synced(&nodes[1], "u2", "phone", &[conv]);
    post_until_live(&nodes[0], &mut reader, conv);
    let probes = post_until_live(&nodes[0], &mut sender, conv);
    let _ = probes;
    let before = send_acked(&mut sender, conv, "m-before", &json!({"n": 0}))["seq"].as_u64().expect("seq");
    collect_msgs(&mut reader, conv, |m, _| m.last().and_then(|f| f["seq"].as_u64()) == Some(before));

    redis.kill();
    let down = Instant::now();
    send_msg(&mut sender, conv, "m-during", &json!({"n": 1}));
    let answer = read_op(&mut sender, "error");
    assert_eq!((answer["code"].as_str(), answer["cid"].as_str()), (Some("unavailable"), Some("m-during")));
    for node in &nodes {
        node.wait_status("/readyz", 503, Duration::from_secs(5));
    }
    assert!(down.elapsed() < Duration::from_secs(6));
    assert_eq!(nodes[0].api("GET", &format!("/api/v1/conversations/{conv}"), None).status, 503);

    // Connections stay up meanwhile: heartbeats go on (pings answered while reading).
    send_json(&mut sender, &json!({"op": "nonsense"}));
    assert_eq!(read_op(&mut sender, "error")["code"], "unknown_op");

    // Redis comes back empty: the backend sets the members again, the same cid is
    // accepted now, and its seq is above every seq seen before (never reused).
    redis.restart();
    let back = Instant::now();
    for node in &nodes {
        node.wait_status("/readyz", 200, Duration::from_secs(15));
    }
    nodes[0].set_members(conv, &["u1", "u2"]);
    let ack = send_acked(&mut sender, conv, "m-during", &json!({"n": 1}));
    let seq = ack["seq"].as_u64().expect("seq");
    assert!(seq > before, "seq {seq} reused after Redis lost its data (had {before})");
    let (msgs, _) =
        collect_msgs(&mut reader, conv, |m, _| m.last().and_then(|f| f["seq"].as_u64()) == Some(seq));
    assert_eq!(msgs.last().map(|m| m["body"]["n"].clone()), Some(json!(1)));
    assert!(back.elapsed() < Duration::from_secs(15));
    // Presence is registered again too.
    nodes[2].wait_presence("u1", Duration::from_secs(5), |d| d.len() == 1);
}

fn a_paused_node_gets_every_acked_message_in_order_after_it_resumes(topology: Topology) {
    // A tiny queue per peer, so ZeroMQ drops while the node is stopped.
    let (_redis, nodes, _) = cluster_on(topology, "[cluster]\nhwm = 10\n");
    let conv = "c-pause";
    nodes[0].set_members(conv, &["u1", "u3"]);
    let (mut on_n3, _) = connect_synced(&nodes[2], "u3", "phone", &[conv]);
    let warm = post_until_live(&nodes[0], &mut on_n3, conv);
    let repairs_before = nodes[2].metric("ringpush_cluster_gap_repairs_total");
    // Its presence is visible before the pause (on a loaded machine the first write can
    // lag), so that its disappearance below is the lease running out.
    nodes[0].wait_presence("u3", Duration::from_secs(5), |d| d.len() == 1);

    nodes[2].pause();
    let paused = Instant::now();
    // More bytes than the kernel's socket buffers and the queues hold together.
    let filler = "x".repeat(16 * 1024);
    let mut last = warm;
    for i in 0..1000 {
        last = nodes[0].post_message(conv, "u1", &json!({"i": i, "filler": filler}));
    }
    // Long enough for its lease to end: the others purge its presence meanwhile.
    nodes[0].wait_presence("u3", Duration::from_secs(6), |d| d.is_empty());
    assert!(paused.elapsed() >= Duration::from_secs(1));
    nodes[2].resume();

    // The backlog is larger than the connection's outbound budget, so the device gets
    // `gap` frames and syncs, as PROTOCOL.md tells clients to.
    let got = follow(&mut on_n3, conv, warm, last);
    assert_eq!(got, (warm + 1..=last).collect::<Vec<_>>(), "the paused node's device");
    assert!(
        nodes[2].metric("ringpush_cluster_gap_repairs_total") > repairs_before,
        "no gap repair ran: the test did not make ZeroMQ drop anything"
    );
    // Its presence comes back once it renews its lease.
    nodes[0].wait_presence("u3", Duration::from_secs(5), |d| d.len() == 1);
}

#[test]
fn a_node_without_members_online_receives_none_of_a_conversation() {
    let (_redis, nodes, _) = cluster("");
    let conv = "c-quiet";
    nodes[0].set_members(conv, &["u1", "u2"]);
    let (_sender, _) = connect_synced(&nodes[0], "u1", "phone", &[conv]);
    let (mut reader, _) = connect_synced(&nodes[1], "u2", "phone", &[conv]);
    // n3 holds a connection too, of a user in no conversation.
    let (_other, _) = connect_client(&nodes[2], "u9", "phone");
    let warm = post_until_live(&nodes[0], &mut reader, conv);
    let mut last = warm;
    for i in 0..50 {
        last = nodes[0].post_message(conv, "u1", &json!({"i": i}));
    }
    let (msgs, _) =
        collect_msgs(&mut reader, conv, |m, _| m.last().and_then(|f| f["seq"].as_u64()) == Some(last));
    assert_eq!(seqs(&msgs), (warm + 1..=last).collect::<Vec<_>>());
    assert!(nodes[1].metric("ringpush_cluster_received_total{kind=\"msg\"}") >= 50);
    assert_eq!(nodes[2].metric("ringpush_cluster_received_total{kind=\"msg\"}"), 0, "{}", nodes[2].metrics());
}

fn the_api_acts_cluster_wide(topology: Topology) {
    let (_redis, nodes, _) = cluster_on(topology, "");
    let (mut u1, _) = connect_client(&nodes[1], "u1", "phone");
    let (mut u2, _) = connect_client(&nodes[2], "u2", "tablet");
    let (mut local, _) = connect_client(&nodes[0], "u3", "desk");

    // Presence lists every node's devices, with their node and address.
    let devices = nodes[0].wait_presence("u1", Duration::from_secs(5), |d| d.len() == 1);
    assert_eq!((devices[0]["node"].as_str(), devices[0]["device"].as_str()), (Some("n2"), Some("phone")));
    assert_eq!(devices[0]["ip"], "127.0.0.1");

    // A push from n1 reaches u1 on n2 (retried until the node's subscription is up:
    // pushes are not stored, so one sent before it would be gone).
    let frame = repeat_until_frame(&mut u1, || {
        nodes[0].api_expect("POST", "/api/v1/push", Some(r#"{"users":["u1"],"body":{"hi":1}}"#), 202);
    });
    assert_eq!(frame, json!({"op": "push", "body": {"hi": 1}}));

    // A broadcast reaches every connection of the cluster.
    nodes[0].api_expect("POST", "/api/v1/broadcast", Some(r#"{"body":{"all":true}}"#), 202);
    for ws in [&mut u1, &mut u2, &mut local] {
        assert_eq!(read_op(ws, "push")["body"], json!({"all": true}));
    }

    // A disconnect from n1 closes u2's device on n3 with 4001, and its presence goes.
    nodes[0].api_expect("POST", "/api/v1/users/u2/disconnect", None, 200);
    assert_eq!(code_of(&read_close(&mut u2)), 4001);
    nodes[0].wait_presence("u2", Duration::from_secs(5), |d| d.is_empty());
}

/// Reads `conv` as a well-behaved client does, from `after` until it has seq `until`:
/// `msg` frames are taken in order, and a `gap` is answered with a `sync` from the last
/// seq held. Returns the seqs in the order they came; each must be the next one.
fn follow(ws: &mut Ws, conv: &str, after: u64, until: u64) -> Vec<u64> {
    let mut got = Vec::new();
    let mut last = after;
    while last < until {
        let frame = read_json(ws);
        match frame["op"].as_str() {
            Some("msg") if frame["conv"] == conv => {
                let seq = frame["seq"].as_u64().expect("seq");
                assert_eq!(seq, last + 1, "after {last} came {seq}");
                got.push(seq);
                last = seq;
            }
            Some("gap") if frame["conv"] == conv => {
                let replay = sync(ws, conv, last, None);
                for seq in replay.seqs() {
                    assert_eq!(seq, last + 1, "sync after {last} replayed {seq}");
                    got.push(seq);
                    last = seq;
                }
            }
            _ => {}
        }
    }
    got
}

/// Calls `act` until `ws` receives a text frame (bounded), which is returned.
fn repeat_until_frame(ws: &mut Ws, act: impl Fn()) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        act();
        if let Some(frame) = read_json_within(ws, Duration::from_millis(300)) {
            return frame;
        }
        assert!(Instant::now() < deadline, "nothing arrived within 10 s");
    }
}

/// The next JSON text frame if one arrives within `wait` (control frames are skipped).
fn read_json_within(ws: &mut Ws, wait: Duration) -> Option<serde_json::Value> {
    ws.get_mut().set_read_timeout(Some(wait)).expect("timeout");
    let frame = loop {
        match ws.read() {
            Ok(tungstenite::Message::Text(t)) => break Some(serde_json::from_str(t.as_str()).expect("json")),
            Ok(_) => {}
            Err(tungstenite::Error::Io(e))
                if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) =>
            {
                break None
            }
            Err(e) => panic!("reading: {e}"),
        }
    };
    ws.get_mut().set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
    frame
}

#[test]
fn static_peers_and_a_bad_cluster_config() {
    let redis = Redis::start();
    let (a, b) = (Ports::free(), Ports::free());
    let peer = |p: &Ports| format!("[cluster]\npeers = [\"tcp://127.0.0.1:{}\"]\n", p.publish);
    let n1 = start_node("n1", &redis, &a, &peer(&b));
    let n2 = start_node("n2", &redis, &b, &peer(&a));
    for n in [&n1, &n2] {
        n.wait_metric("ringpush_cluster_peers", Duration::from_secs(10), |v| v == 1);
    }
    n1.set_members("c-static", &["u1", "u2"]);
    let (mut r, _) = connect_synced(&n2, "u2", "x", &["c-static"]);
    post_until_live(&n1, &mut r, "c-static");

    // [cluster] without [redis] is refused with a line naming the key.
    let dir = TempDir::new("bad-cluster");
    let path = dir.write("bad.toml", "[cluster]\npub_listen = \"tcp://127.0.0.1:1\"\n");
    let out = ringpush_command().args(["check-config", "--config"]).arg(&path).output().expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cluster") && err.contains("redis"), "{err}");
}

fn a_drained_node_leaves_the_cluster_at_once(topology: Topology) {
    let (redis, nodes, _) = cluster_on(topology, "");
    let (_ws, _) = connect_client(&nodes[2], "u1", "phone");
    nodes[0].wait_presence("u1", Duration::from_secs(5), |d| d.len() == 1);
    nodes[2].sigterm();
    assert!(nodes[2].wait_exit(Duration::from_secs(10)).is_some_and(|s| s.success()));
    // Gone now, not when its lease would have expired.
    let presence = nodes[0].presence("u1");
    assert!(presence.is_empty(), "{presence:?}");
    assert!(redis.cli(&["EXISTS", "rp:{ctl}:lease:{n3}"]).trim() == "0", "the lease outlived the drain");
    nodes[0].wait_metric("ringpush_cluster_peers", Duration::from_secs(5), |n| n == 1);
}

/// A device that holds seqs its new node has not delivered yet (they reached the old
/// node first, or, as here, a node died between storing a message and publishing it)
/// syncs from what it holds: the node must not hand it those seqs again when it
/// delivers them to its other sessions. The hour soak saw exactly this during a drain.
#[test]
fn a_device_ahead_of_its_new_node_gets_no_seq_twice() {
    let redis = Redis::start();
    let node = start_node("n1", &redis, &Ports::free(), "");
    let conv = "c-ahead";
    node.set_members(conv, &["u1", "u2"]);
    let (mut laptop, _) = connect_synced(&node, "u2", "laptop", &[conv]);
    let first = node.post_message(conv, "u1", &json!({"n": 1}));
    let (msgs, _) = collect_msgs(&mut laptop, conv, |m, _| !m.is_empty());
    assert_eq!(seqs(&msgs), vec![first]);

    // Stored, never published: what a node that died just after the append leaves.
    let lost = first + 1;
    assert_eq!(redis.cli(&["INCR", &format!("rp:c:{{{conv}}}:seq")]).trim(), lost.to_string());
    let id = format!("{lost}-1");
    let body = json!({"n": 2}).to_string();
    redis.cli(&["XADD", &format!("rp:c:{{{conv}}}:h"), &id, "f", "u1", "t", "1", "b", &body]);

    // The phone read it elsewhere and syncs from there.
    let (mut phone, _) = connect_client(&node, "u2", "phone");
    let result = sync(&mut phone, conv, lost, None);
    assert!(result.msgs.is_empty(), "replayed what the phone holds: {:?}", result.seqs());
    assert_eq!(result.synced["last"], lost, "{}", result.synced);

    // The node learns of the lost seq and delivers it; the next message follows it.
    let next = node.post_message(conv, "u1", &json!({"n": 3}));
    let (msgs, _) = collect_msgs(&mut laptop, conv, |m, _| m.len() == 2);
    assert_eq!(seqs(&msgs), vec![lost, next], "the laptop");
    let (msgs, _) = collect_msgs(&mut phone, conv, |m, _| !m.is_empty());
    assert_eq!(seqs(&msgs), vec![next], "the phone, which held {lost} already");
}

/// Production heartbeats: nothing a test sees can be a side effect of a heartbeat (the
/// first ping comes 12.5 to 25 s after connecting).
const PRODUCTION_HEARTBEATS: &str = "[heartbeat]\nping_interval_ms = 25000\nidle_timeout_ms = 60000\n";

#[test]
fn a_client_that_never_syncs_gets_other_nodes_messages_from_its_hello_on() {
    // Issue 16, bug 1, in a cluster: a device that never syncs connects to a node that
    // follows none of its conversations yet; a message sent on another node right after
    // its hello must reach it (the subscription may still be on its way to the
    // publisher: the node's tail check finds what it missed).
    let (_redis, nodes, _) = cluster(PRODUCTION_HEARTBEATS);
    for round in 0..4 {
        let (a, b, conv) = (format!("a{round}"), format!("b{round}"), format!("c{round}"));
        nodes[0].set_members(&conv, &[&a, &b]);
        let (mut sender, _) = connect_client(&nodes[0], &a, "A");
        let (mut reader, _) = connect_client(&nodes[1 + round % 2], &b, "B");
        let ack = send_acked(&mut sender, &conv, "k1", &json!(1));
        let got = read_json(&mut reader);
        assert_eq!(
            (got["op"].as_str(), got["seq"].as_u64()),
            (Some("msg"), ack["seq"].as_u64()),
            "round {round}: {got}"
        );
    }
}

#[test]
fn a_device_back_on_another_node_hears_nothing_of_seqs_sent_while_it_was_away() {
    // Issue 16, bug 2, in a cluster: a device that vanished (no close) and came back on
    // another node was sent a `gap` about seqs sent while it was away before it asked for
    // anything. PROTOCOL.md: a new connection gets nothing about earlier seqs unless it
    // asks with `sync`.
    let (_redis, nodes, _) = cluster(PRODUCTION_HEARTBEATS);
    for round in 0..3 {
        let conv = format!("c{round}");
        nodes[0].set_members(&conv, &["u1", "u2"]);
        let (mut sender, _) = connect_client(&nodes[0], "u1", "A");
        let (mut phone, _) = connect_client(&nodes[1], "u2", "B");
        let first = send_acked(&mut sender, &conv, &format!("{conv}-1"), &json!(1));
        assert_eq!(read_op(&mut phone, "msg")["seq"], first["seq"]);
        drop(phone);
        let mut last = 0;
        for i in 2..=11 {
            let ack = send_acked(&mut sender, &conv, &format!("{conv}-{i}"), &json!(i));
            last = ack["seq"].as_u64().expect("seq");
        }
        let (mut phone, _) = connect_client(&nodes[2], "u2", "B");
        let next = send_acked(&mut sender, &conv, &format!("{conv}-next"), &json!("next"));
        assert_eq!(next["seq"].as_u64(), Some(last + 1));
        let got = read_json(&mut phone);
        assert_eq!(
            (got["op"].as_str(), got["seq"].as_u64()),
            (Some("msg"), Some(last + 1)),
            "round {round}: the new connection heard of an earlier seq first: {got}"
        );
    }
}

#[test]
fn a_killed_node_started_again_at_once_rejoins_on_the_same_ports() {
    // Issue 16, bug 5: 3 of 5 immediate restarts failed with "Address already in use"
    // (the killed process's io_uring releases its listeners a few ms after it is reaped).
    let (redis, mut nodes, ports) = cluster("");
    for round in 0..5 {
        let (_ws, _) = connect_client(&nodes[1], "u1", "phone");
        nodes[1].kill();
        nodes[1] = start_node("n2", &redis, &ports[1], "");
        nodes[1].wait_metric("ringpush_cluster_peers", Duration::from_secs(10), |n| n == 2);
        assert_eq!(nodes[1].client_addr().port(), ports[1].client, "round {round}");
    }
}

/// A TCP relay between a node and Redis that, once armed with a marker, passes on the
/// request holding the marker and then loses Redis's answer to it: it resets both sides
/// instead (what a node paused with SIGSTOP, or a connection cut mid-call, sees).
struct LossyRelay {
    port: u16,
    armed: std::sync::Arc<std::sync::Mutex<Option<Vec<u8>>>>,
}

impl LossyRelay {
    fn start(redis_port: u16) -> LossyRelay {
        use std::io::{Read, Write};
        use std::net::{Shutdown, TcpListener, TcpStream};
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::{Arc, Mutex};
        let port = free_port();
        let listener = TcpListener::bind(("127.0.0.1", port)).expect("bind the relay");
        let armed: Arc<Mutex<Option<Vec<u8>>>> = Arc::new(Mutex::new(None));
        let marker = armed.clone();
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let Ok(server) = TcpStream::connect(("127.0.0.1", redis_port)) else { continue };
                let lose = Arc::new(AtomicBool::new(false));
                let (mut c_in, mut s_out) =
                    (client.try_clone().expect("clone"), server.try_clone().expect("clone"));
                let (marker, lose_in) = (marker.clone(), lose.clone());
                std::thread::spawn(move || {
                    let mut buf = [0u8; 65536];
                    while let Ok(n @ 1..) = c_in.read(&mut buf) {
                        let mut armed = marker.lock().unwrap_or_else(|e| e.into_inner());
                        if armed.as_ref().is_some_and(|m| buf[..n].windows(m.len()).any(|w| w == &m[..])) {
                            // This request goes through; its answer will not.
                            *armed = None;
                            lose_in.store(true, Ordering::SeqCst);
                        }
                        drop(armed);
                        if s_out.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = s_out.shutdown(Shutdown::Both);
                });
                let (mut s_in, mut c_out) = (server, client);
                std::thread::spawn(move || {
                    let mut buf = [0u8; 65536];
                    while let Ok(n @ 1..) = s_in.read(&mut buf) {
                        if lose.load(Ordering::SeqCst) {
                            let _ = socket2::SockRef::from(&c_out).set_linger(Some(Duration::ZERO));
                            break;
                        }
                        if c_out.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = c_out.shutdown(Shutdown::Both);
                    let _ = s_in.shutdown(Shutdown::Both);
                });
            }
        });
        LossyRelay { port, armed }
    }

    fn lose_answer_to(&self, marker: &str) {
        *self.armed.lock().unwrap_or_else(|e| e.into_inner()) = Some(marker.as_bytes().to_vec());
    }
}

#[test]
fn a_send_whose_store_answer_was_lost_is_acked_when_it_was_stored() {
    // Found by the oracle (seed 5032 on three nodes): a node paused with SIGSTOP while its
    // append was in flight lost Redis's answer (the read came back EINTR); the sender was
    // told `unavailable` ("the message was NOT accepted") while everyone else, the sending
    // connection included, got the stored message. The node now asks again with the same
    // cid, which finds the stored one.
    let redis = Redis::start();
    let redis_port: u16 = redis
        .url()
        .rsplit(':')
        .next()
        .and_then(|p| p.split('/').next())
        .and_then(|p| p.parse().ok())
        .expect("port");
    let relay = LossyRelay::start(redis_port);
    let node = Server::start(&merge_toml(&[
        CLUSTER_TOML,
        &format!("[redis]\nurl = \"redis://127.0.0.1:{}/0\"\n", relay.port),
    ]));
    node.set_members("c1", &["alice", "bob"]);
    let (mut alice, _) = connect_synced(&node, "alice", "phone", &["c1"]);
    let (mut bob, _) = connect_synced(&node, "bob", "phone", &["c1"]);
    relay.lose_answer_to("lost-answer-cid");
    send_msg(&mut alice, "c1", "lost-answer-cid", &json!("hello"));
    let answer = read_json(&mut alice);
    assert_eq!((answer["op"].as_str(), answer["seq"].as_u64()), (Some("ack"), Some(1)), "{answer}");
    assert_eq!(read_op(&mut bob, "msg")["cid"], "lost-answer-cid");
    assert!(node.metric("ringpush_store_retries_total") >= 1, "the answer was never lost");
    // Stored once; and the sending connection gets nothing more of it.
    let ack = send_acked(&mut alice, "c1", "next", &json!("next"));
    assert_eq!(ack["seq"], 2);
    assert_eq!(read_op(&mut bob, "msg")["seq"], 2);
}

#[test]
fn a_node_that_missed_a_membership_change_delivers_nothing_to_the_removed_member() {
    // Found by the oracle (cluster seed 5065): a member removed through a node whose
    // `members` message never reached another node (it had just restarted and its peers
    // had not reconnected) went on getting the conversation there. Here node b never hears
    // node a at all (its only peer is a dead endpoint), so every change made through a is
    // lost to b; b must still stop delivering to the removed member, from the first
    // message taken after the change (it carries the newer members version).
    let redis = Redis::start();
    let (a, b) = (Ports::free(), Ports::free());
    let node_a = start_node("a", &redis, &a, "");
    let node_b = start_node("b", &redis, &b, "[cluster]\npeers = [\"tcp://127.0.0.1:1\"]\n");
    // Two conversations with the same owner shard, so that on b their messages reach a
    // connection in the order b takes them.
    let shards = 2;
    let c = id_on_shard("conv-", 0, shards);
    let c2 = id_on_shard("other-", 0, shards);
    node_b.set_members(&c, &["u", "v"]);
    node_b.set_members(&c2, &["u", "v"]);
    let (mut u, _) = connect_synced(&node_b, "u", "phone", &[&c, &c2]);
    let (mut v, _) = connect_synced(&node_b, "v", "phone", &[&c, &c2]);
    send_acked(&mut v, &c, "before", &json!("before"));
    assert_eq!(read_op(&mut u, "msg")["cid"], "before");
    // Through a: b never hears of it.
    node_a.api_expect("DELETE", &format!("/api/v1/conversations/{c}/members/u"), None, 200);
    send_acked(&mut v, &c, "after", &json!("not for u"));
    node_b.wait_metric("ringpush_cluster_reconciles_total", Duration::from_secs(10), |n| n >= 1);
    // Then a message u is owed, behind it in b's order: the first frame u gets.
    let ack = send_acked(&mut v, &c2, "marker", &json!("marker"));
    let got = read_json(&mut u);
    assert_eq!(
        (got["conv"].as_str(), got["seq"].as_u64()),
        (Some(c2.as_str()), ack["seq"].as_u64()),
        "u, no longer a member of {c}, got {got}"
    );
}

#[test]
fn a_member_added_gets_no_message_sent_before_it_was_added() {
    // Found by the oracle (cluster seed 5125): a message sequenced on one node reached
    // another only after a member was added there, and went to the new member too. Here
    // node b never hears node a: the message sent through a reaches b by a repair from
    // Redis, after b has already taken the change. A change takes its place after the
    // seq it was made at, on every node.
    let redis = Redis::start();
    let (a, b) = (Ports::free(), Ports::free());
    let node_a = start_node("a", &redis, &a, "");
    let node_b = start_node("b", &redis, &b, "[cluster]\npeers = [\"tcp://127.0.0.1:1\"]\n");
    let c = "talk";
    node_b.set_members(c, &["u", "v"]);
    let (mut u, _) = connect_synced(&node_b, "u", "phone", &[c]);
    let (mut w, _) = connect_synced(&node_b, "w", "phone", &[]);
    let (mut v, _) = connect_synced(&node_a, "v", "phone", &[c]);
    send_acked(&mut v, c, "early", &json!("before w"));
    let add = json!({"users": ["w"]}).to_string();
    node_b.api_expect("POST", &format!("/api/v1/conversations/{c}/members"), Some(&add), 200);
    assert_eq!(read_op(&mut u, "msg")["cid"], "early", "b repaired the message it never heard");
    let ack = send_acked(&mut u, c, "late", &json!("for w"));
    let got = read_json(&mut w);
    assert_eq!(
        (got["op"].as_str(), got["seq"].as_u64()),
        (Some("msg"), ack["seq"].as_u64()),
        "w was added after seq 1: its first frame is the message after that, not {got}"
    );
}

/// Read marks and signals across nodes: two devices of alice on n1 and n2, bob on n3.
fn read_marks_and_signals_cross_nodes(topology: Topology) {
    let (_redis, nodes, _) = cluster_on(topology, "");
    nodes[0].set_members("c1", &["alice", "bob"]);
    let (mut laptop, _) = connect_synced(&nodes[0], "alice", "laptop", &["c1"]);
    let (mut phone, _) = connect_synced(&nodes[1], "alice", "phone", &["c1"]);
    let (mut bob, _) = connect_synced(&nodes[2], "bob", "tablet", &["c1"]);
    // Live between the nodes for every connection (the subscriptions are in place).
    let live = post_until_live(&nodes[0], &mut phone, "c1");
    for ws in [&mut laptop, &mut bob] {
        let (msgs, _) = collect_msgs(ws, "c1", |m, _| m.last().and_then(|f| f["seq"].as_u64()) == Some(live));
        assert_increasing("catch-up", &seqs(&msgs));
    }

    // A read on n1 moves the mark on alice's phone on n2; a signal reaches n2 and n3.
    send_json(&mut laptop, &json!({"op": "read", "conv": "c1", "seq": live}));
    assert_eq!(read_json(&mut phone), json!({"op": "read", "conv": "c1", "seq": live, "dev": "laptop"}));
    send_json(&mut laptop, &json!({"op": "signal", "conv": "c1", "body": {"typing": true}}));
    let signal =
        json!({"op": "signal", "conv": "c1", "from": "alice", "dev": "laptop", "body": {"typing": true}});
    assert_eq!(read_json(&mut phone), signal);
    assert_eq!(read_json(&mut bob), signal);
    // The API's read on n3 reaches every device of its user (bob's here); then alice's.
    nodes[2].api_expect("POST", "/api/v1/conversations/c1/read", Some(r#"{"user":"bob","seq":1}"#), 200);
    assert_eq!(read_json(&mut bob), json!({"op": "read", "conv": "c1", "seq": 1, "dev": null}));
    let seq = nodes[2].post_message("c1", "system", &json!("marker"));
    let read = nodes[2].api_expect(
        "POST",
        "/api/v1/conversations/c1/read",
        Some(&format!(r#"{{"user":"alice","seq":{seq}}}"#)),
        200,
    );
    assert_eq!(read["read"], seq);
    for (who, ws) in [("laptop", &mut laptop), ("phone", &mut phone)] {
        let frames = read_until(ws, |f| f["op"] == "read");
        assert_eq!(
            frames.last(),
            Some(&json!({"op": "read", "conv": "c1", "seq": seq, "dev": null})),
            "{who}"
        );
        assert!(frames[..frames.len() - 1].iter().all(|f| f["op"] == "msg"), "{who}: {frames:?}");
    }
    let frames = read_until(&mut bob, |f| f["op"] == "msg" && f["seq"] == seq);
    assert_eq!(frames.len(), 1, "bob got more than the marker (alice's read?): {frames:?}");
    // A new device of alice on n3 learns the mark from `synced`; the unread API agrees.
    let (mut watch, _) = connect_client(&nodes[2], "alice", "watch");
    assert_eq!(sync(&mut watch, "c1", seq, None).synced["read"], seq);
    let unread = nodes[1].api_expect("GET", "/api/v1/users/bob/unread", None, 200);
    assert_eq!(unread["convs"][0]["read"], 1, "{unread}");
    assert_eq!(unread["convs"][0]["unread"], seq - 1, "{unread}");
}
