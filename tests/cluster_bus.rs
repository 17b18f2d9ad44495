//! The cluster bus over real ZeroMQ sockets on loopback TCP: two or three `Bus`es in one
//! process stand for nodes.
//!
//! ZeroMQ subscriptions and connections take effect asynchronously, so no test assumes a
//! route exists: `await_route` publishes probes until one arrives. Absence is proven by
//! order instead of by waiting: one publisher's messages arrive in the order published, so
//! when a message published after X arrives and X did not come first, X was filtered out.
//! Every wait is bounded by `DEADLINE`.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use flume::{Receiver, RecvTimeoutError};
use glommio::{LocalExecutorBuilder, Placement};
use ringpush::cluster::{self, Bus, BusError, BusOptions, ClusterMsg, Envelope, Topic, DEFAULT_HWM};
use ringpush::ids::Key;

/// Bound on every wait: generous, since a restarted peer may take a reconnect backoff.
const DEADLINE: Duration = Duration::from_secs(10);
/// How long one probe waits for its echo before the next is sent.
const PROBE_WAIT: Duration = Duration::from_millis(20);

fn key(s: &str) -> Key {
    Arc::from(s)
}

/// A loopback endpoint whose port libzmq picks when it binds (read back with
/// `last_endpoint`, or `Bus::endpoint`): no port is freed and then bound again, so
/// parallel tests cannot collide.
const ANY_PORT: &str = "tcp://127.0.0.1:*";

struct Node {
    bus: Bus,
    rx: Receiver<Envelope>,
    name: Key,
    epoch: u64,
}

impl Node {
    /// A node on a free port, with one receiver.
    fn start(name: &str, epoch: u64) -> Node {
        Node::at(ANY_PORT, name, epoch).unwrap_or_else(|e| panic!("{e}"))
    }

    fn at(endpoint: &str, name: &str, epoch: u64) -> Result<Node, BusError> {
        let (bus, mut rxs) = Bus::start(
            BusOptions { pub_listen: endpoint, node: key(name), epoch, receivers: 1, hwm: DEFAULT_HWM },
            Box::new(|_| 0),
        )?;
        Ok(Node { bus, rx: rxs.remove(0), name: key(name), epoch })
    }

    fn endpoint(&self) -> String {
        self.bus.endpoint().to_owned()
    }

    fn sent(&self, env: &Envelope) -> bool {
        env.node == self.name && env.epoch == self.epoch
    }
}

fn probe(n: u64) -> ClusterMsg {
    ClusterMsg::Broadcast { json: Bytes::from(format!("{{\"probe\":{n}}}")) }
}

/// The number of a probe, if `env` is one.
fn probe_id(env: &Envelope) -> Option<u64> {
    let ClusterMsg::Broadcast { json } = &env.msg else { return None };
    std::str::from_utf8(json).ok()?.strip_prefix("{\"probe\":")?.strip_suffix('}')?.parse().ok()
}

fn is_probe(env: &Envelope) -> bool {
    probe_id(env).is_some()
}

/// Probe numbers, unique in the process, so a probe left in flight by one wait is never
/// taken for the answer to a later one.
static PROBES: AtomicU64 = AtomicU64::new(0);

fn text(json: &str) -> ClusterMsg {
    ClusterMsg::Broadcast { json: Bytes::from(json.to_owned()) }
}

fn msg(conv: &str, seq: u64) -> ClusterMsg {
    ClusterMsg::Msg {
        conv: key(conv),
        seq,
        members_version: 1,
        json: Bytes::from(format!("{{\"seq\":{seq}}}")),
    }
}

/// Publishes probes from `from` on `topic` until `to` receives one of them: from then on,
/// `to`'s subscription has reached `from` and the connection between them is up. Probes
/// from other nodes are skipped; anything else arriving meanwhile fails the test.
fn await_route(from: &Node, topic: Topic, to: &Node) {
    let deadline = Instant::now() + DEADLINE;
    let first = PROBES.load(Ordering::Relaxed);
    loop {
        from.bus.publish(topic, probe(PROBES.fetch_add(1, Ordering::Relaxed)));
        match to.rx.recv_timeout(PROBE_WAIT) {
            Ok(env) if is_probe(&env) => {
                if from.sent(&env) && probe_id(&env) >= Some(first) {
                    return;
                }
            }
            Ok(env) => panic!("{} got {env:?} while probing", to.name),
            Err(RecvTimeoutError::Timeout) => {}
            Err(e) => panic!("{e}"),
        }
        assert!(Instant::now() < deadline, "no route {topic:?} from {} to {}", from.name, to.name);
    }
}

/// The next message `to` receives that is not a probe.
fn next(to: &Node) -> Envelope {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match to.rx.recv_timeout(left) {
            Ok(env) if is_probe(&env) => {}
            Ok(env) => return env,
            Err(e) => panic!("{} received nothing: {e}", to.name),
        }
    }
}

/// Polls `ready` until it holds; for the metrics, which have no event to wait on.
fn wait_for(what: &str, ready: impl Fn() -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !ready() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn a_topic_arrives_only_once_subscribed() {
    let a = Node::start("a", 1);
    let b = Node::start("b", 1);
    b.bus.set_peers(vec![a.endpoint()]);
    let (one, two) = (Topic::conv("one"), Topic::conv("two"));
    assert_ne!(one.frame(), two.frame());
    b.bus.subscribe(one);
    await_route(&a, one, &b);

    a.bus.publish(two, msg("two", 1));
    a.bus.publish(one, msg("one", 1));
    let env = next(&b);
    assert_eq!(env, Envelope { node: key("a"), epoch: 1, msg: msg("one", 1) }, "two was filtered out");

    b.bus.subscribe(two);
    await_route(&a, two, &b);
    a.bus.publish(two, msg("two", 2));
    assert_eq!(next(&b).msg, msg("two", 2));
    assert_eq!(b.bus.metrics().received[0].get(), 2);
    assert_eq!(b.bus.metrics().subscribed_topics.get(), 2);
    assert_eq!(b.bus.metrics().peers.get(), 1);
}

#[test]
fn unsubscribe_stops_a_topic_and_subscriptions_are_counted() {
    let a = Node::start("a", 1);
    let b = Node::start("b", 1);
    b.bus.set_peers(vec![a.endpoint()]);
    let (kept, dropped, marker) = (Topic::conv("kept"), Topic::user("dropped"), Topic::All);
    b.bus.subscribe(kept);
    b.bus.subscribe(kept);
    b.bus.subscribe(dropped);
    await_route(&a, kept, &b);
    await_route(&a, dropped, &b);

    b.bus.unsubscribe(kept); // one interest in `kept` is left
    b.bus.unsubscribe(dropped);
    b.bus.unsubscribe(dropped); // unbalanced: ignored
                                // A subscription sent after the unsubscribes reaches `a` after them: once `marker`
                                // arrives, `a` has applied them all.
    b.bus.subscribe(marker);
    await_route(&a, marker, &b);

    a.bus.publish(dropped, ClusterMsg::Disconnect { user: key("dropped") });
    a.bus.publish(kept, msg("kept", 7));
    assert_eq!(next(&b).msg, msg("kept", 7), "the message on the dropped topic never came");
    assert_eq!(b.bus.metrics().subscribed_topics.get(), 2);
    assert_eq!(b.bus.metrics().received[2].get(), 0);
}

#[test]
fn each_publisher_keeps_its_order_over_10000_messages() {
    const N: u64 = 10_000;
    let a = Node::start("a", 1);
    let b = Node::start("b", 1);
    let c = Node::start("c", 1);
    c.bus.set_peers(vec![a.endpoint(), b.endpoint()]);
    let topic = Topic::conv("ordered");
    c.bus.subscribe(topic);
    await_route(&a, topic, &c);
    await_route(&b, topic, &c);

    let publish = |node: &Node| {
        let bus = node.bus.clone();
        std::thread::spawn(move || (0..N).for_each(|seq| bus.publish(topic, msg("ordered", seq))))
    };
    let (pa, pb) = (publish(&a), publish(&b));
    let mut next_seq = [0u64; 2];
    while next_seq != [N, N] {
        let env = next(&c);
        let from = if a.sent(&env) { 0 } else { 1 };
        let ClusterMsg::Msg { seq, .. } = env.msg else { panic!("{env:?}") };
        assert_eq!(seq, next_seq[from], "from {}", env.node);
        next_seq[from] += 1;
    }
    pa.join().unwrap();
    pb.join().unwrap();
    assert_eq!(c.bus.metrics().inbound_dropped.get(), 0);
    wait_for("published counts", || a.bus.metrics().published.get() >= N);
    assert_eq!(a.bus.metrics().publish_dropped(), 0);
}

#[test]
fn set_peers_adds_and_removes_peers() {
    let a = Node::start("a", 1);
    let b = Node::start("b", 1);
    let c = Node::start("c", 1);
    c.bus.subscribe(Topic::All);
    c.bus.set_peers(vec![a.endpoint()]);
    await_route(&a, Topic::All, &c);

    c.bus.set_peers(vec![a.endpoint(), b.endpoint()]);
    c.bus.set_peers(vec![b.endpoint(), a.endpoint(), b.endpoint()]); // the same set again
    await_route(&b, Topic::All, &c);
    await_route(&a, Topic::All, &c);
    assert_eq!(c.bus.metrics().peers.get(), 2);

    c.bus.set_peers(vec![b.endpoint()]);
    wait_for("a disconnected", || c.bus.metrics().peers.get() == 1);
    // What `a` sent before the disconnect may still be queued; after it, nothing can come.
    let _ = c.rx.drain();
    a.bus.publish(Topic::All, text("{\"after\":\"removal\"}"));
    b.bus.publish(Topic::All, text("{\"from\":\"b\"}"));
    let env = next(&c);
    assert!(b.sent(&env), "{env:?}");
    await_route(&b, Topic::All, &c);
    assert!(c.rx.drain().all(|env| !a.sent(&env)), "a removed peer's message arrived");

    c.bus.set_peers(vec![]);
    wait_for("no peers", || c.bus.metrics().peers.get() == 0);
}

#[test]
fn own_messages_are_not_looped_back() {
    let a = Node::start("a", 1);
    let b = Node::start("b", 1);
    // `a` lists itself, as a discovery list may.
    a.bus.set_peers(vec![a.endpoint(), b.endpoint()]);
    a.bus.subscribe(Topic::All);
    let deadline = Instant::now() + DEADLINE;
    let mut n = 0;
    while a.bus.metrics().looped_back.get() == 0 {
        assert!(Instant::now() < deadline, "a never heard itself");
        a.bus.publish(Topic::All, probe(n));
        n += 1;
        match a.rx.recv_timeout(PROBE_WAIT) {
            Err(RecvTimeoutError::Timeout) => {}
            other => panic!("a received {other:?}"),
        }
    }
    a.bus.publish(Topic::All, text("{\"own\":true}"));
    await_route(&b, Topic::All, &a);
    // A later life of `a` (same id, new epoch) is another sender.
    let a2 = Node::start("a", 2);
    a.bus.set_peers(vec![a.endpoint(), b.endpoint(), a2.endpoint()]);
    await_route(&a2, Topic::All, &a);
    assert!(a.rx.drain().all(|env| !a.sent(&env)));
    assert_eq!(a.bus.metrics().received_total(), a.bus.metrics().received[4].get());
}

#[test]
fn a_restarted_peer_is_reconnected() {
    let a = Node::start("a", 1);
    let b = Node::start("b", 1);
    let endpoint = b.endpoint();
    a.bus.set_peers(vec![endpoint.clone()]);
    a.bus.subscribe(Topic::user("u1"));
    await_route(&b, Topic::user("u1"), &a);

    b.bus.shutdown();
    b.bus.shutdown(); // idempotent
    drop(b);
    let b2 = Node::at(&endpoint, "b", 2).expect("rebind the same endpoint");
    let started = Instant::now();
    await_route(&b2, Topic::user("u1"), &a);
    assert!(started.elapsed() < Duration::from_secs(10));
    b2.bus.publish(Topic::user("u1"), ClusterMsg::Disconnect { user: key("u1") });
    let env = next(&a);
    assert_eq!((env.node.as_ref(), env.epoch), ("b", 2));
    assert_eq!(a.bus.metrics().peers.get(), 1);
}

#[test]
fn all_reaches_every_node() {
    let nodes: Vec<Node> = ["a", "b", "c"].iter().map(|n| Node::start(n, 1)).collect();
    for node in &nodes {
        let others = nodes.iter().filter(|o| o.name != node.name).map(Node::endpoint).collect();
        node.bus.set_peers(others);
        node.bus.subscribe(Topic::All);
    }
    for from in &nodes {
        for to in nodes.iter().filter(|o| o.name != from.name) {
            await_route(from, Topic::All, to);
        }
    }
    nodes[0].bus.publish(Topic::All, text("{\"to\":\"all\"}"));
    for to in &nodes[1..] {
        let env = next(to);
        assert_eq!((env.node.as_ref(), env.msg), ("a", text("{\"to\":\"all\"}")));
    }
    // `a` hears `b` and `c` but never itself: its next message is b's.
    nodes[1].bus.publish(Topic::All, text("{\"from\":\"b\"}"));
    assert!(nodes[1].sent(&next(&nodes[0])));
}

#[test]
fn garbage_is_counted_and_nothing_else_breaks() {
    let a = Node::start("a", 1);
    let b = Node::start("b", 1);
    // A raw XPUB stands for a broken peer; being an XPUB, it sees a's subscription arrive.
    let ctx = zmq::Context::new();
    let raw = ctx.socket(zmq::XPUB).unwrap();
    raw.set_linger(0).unwrap();
    raw.set_rcvtimeo(DEADLINE.as_millis() as i32).unwrap();
    raw.bind(ANY_PORT).unwrap();
    let raw_endpoint = raw.get_last_endpoint().unwrap().unwrap();

    let topic = Topic::conv("c");
    let frame = topic.frame();
    a.bus.set_peers(vec![raw_endpoint, b.endpoint()]);
    a.bus.subscribe(topic);
    let subscription = raw.recv_bytes(0).expect("a's subscription reaches the raw peer");
    assert_eq!(subscription, [&[1u8][..], frame.as_bytes()].concat());

    let valid =
        |node: &str| cluster::encode(&Envelope { node: key(node), epoch: 9, msg: msg("c", 1) }).unwrap();
    let good = valid("raw");
    let junk: Vec<Vec<Vec<u8>>> = vec![
        vec![frame.as_bytes().to_vec(), vec![]],
        vec![frame.as_bytes().to_vec(), b"\x02not this version".to_vec()],
        vec![[frame.as_bytes(), b"one frame only"].concat()],
        vec![frame.as_bytes().to_vec(), good.clone(), b"a third frame".to_vec()],
        vec![frame.as_bytes().to_vec(), good[..good.len() - 1].to_vec()],
        vec![frame.as_bytes().to_vec(), [&good[..], b"\0"].concat()],
    ];
    for parts in &junk {
        raw.send_multipart(parts, 0).unwrap();
    }
    raw.send_multipart([frame.as_bytes(), &good[..]], 0).unwrap();
    let env = next(&a);
    assert_eq!(env, Envelope { node: key("raw"), epoch: 9, msg: msg("c", 1) });
    assert_eq!(a.bus.metrics().decode_errors.get(), junk.len() as u64);
    assert_eq!(a.bus.metrics().received_total(), 1);

    await_route(&b, topic, &a);
    b.bus.publish(topic, msg("c", 2));
    assert_eq!(next(&a).msg, msg("c", 2));
    assert_eq!(a.bus.metrics().decode_errors.get(), junk.len() as u64);
}

#[test]
fn the_route_function_picks_the_receiver() {
    let a = Node::start("a", 1);
    let route = |env: &Envelope| match &env.msg {
        ClusterMsg::Msg { seq, .. } => *seq as usize, // taken modulo 3 by the bus
        _ => 0,
    };
    let (bus, rxs) = Bus::start(
        BusOptions { pub_listen: ANY_PORT, node: key("b"), epoch: 1, receivers: 3, hwm: DEFAULT_HWM },
        Box::new(route),
    )
    .unwrap();
    let b = Node { bus, rx: rxs[0].clone(), name: key("b"), epoch: 1 };
    b.bus.set_peers(vec![a.endpoint()]);
    b.bus.subscribe(Topic::conv("r"));
    await_route(&a, Topic::conv("r"), &b);
    for seq in 0..30 {
        a.bus.publish(Topic::conv("r"), msg("r", seq));
    }
    for (i, rx) in rxs.iter().enumerate() {
        for k in 0..10 {
            let env = loop {
                match rx.recv_timeout(DEADLINE) {
                    Ok(env) if is_probe(&env) => assert_eq!(i, 0, "probes go to 0"),
                    Ok(env) => break env,
                    Err(e) => panic!("receiver {i}: {e}"),
                }
            };
            assert_eq!(env.msg, msg("r", (3 * k + i) as u64), "receiver {i}");
        }
    }
}

#[test]
fn a_full_receiver_drops_and_counts() {
    let a = Node::start("a", 1);
    let b = Node::start("b", 1);
    b.bus.set_peers(vec![a.endpoint()]);
    b.bus.subscribe(Topic::All);
    await_route(&a, Topic::All, &b);
    let _ = b.rx.drain();
    let sent = cluster::INBOUND_SLOTS as u64 + 100;
    // In steps, so that the publisher's own queue never overflows.
    let before = a.bus.metrics().published.get();
    for step in (0..sent).collect::<Vec<_>>().chunks(10_000) {
        step.iter().for_each(|&seq| a.bus.publish(Topic::All, msg("bulk", seq)));
        let done = before + step[step.len() - 1] + 1;
        wait_for("the step published", || a.bus.metrics().published.get() >= done);
    }
    assert_eq!(a.bus.metrics().publish_dropped(), 0);
    wait_for("every message received", || b.bus.metrics().received[0].get() == sent);
    assert_eq!(b.rx.len(), cluster::INBOUND_SLOTS, "the receiver is full");
    // Probes still in flight when it was drained may hold a few slots.
    let kept: Vec<u64> =
        b.rx.drain()
            .filter_map(|env| match env.msg {
                ClusterMsg::Msg { seq, .. } => Some(seq),
                _ => None,
            })
            .collect();
    assert_eq!(kept, (0..kept.len() as u64).collect::<Vec<_>>(), "the first ones are kept, in order");
    assert!(kept.len() + 10 > cluster::INBOUND_SLOTS);
    let dropped = b.bus.metrics().inbound_dropped.get();
    assert_eq!(dropped + kept.len() as u64, sent);
}

#[test]
fn unpublishable_messages_are_counted() {
    let a = Node::start("a", 1);
    a.bus.publish(Topic::All, ClusterMsg::Broadcast { json: Bytes::from_static(&[0xff, 0xfe]) });
    a.bus.publish(Topic::All, ClusterMsg::Disconnect { user: key(&"u".repeat(cluster::MAX_ID + 1)) });
    a.bus.publish(Topic::All, text("{}"));
    wait_for("all three handled", || a.bus.metrics().published.get() == 1);
    assert_eq!(a.bus.metrics().publish_too_large.get(), 2);
    assert_eq!(a.bus.metrics().publish_dropped(), 2);
}

#[test]
fn start_says_which_endpoint_it_cannot_bind() {
    let a = Node::start("a", 1);
    let err = Bus::start(
        BusOptions { pub_listen: &a.endpoint(), node: key("b"), epoch: 1, receivers: 1, hwm: DEFAULT_HWM },
        Box::new(|_| 0),
    )
    .err()
    .expect("port taken");
    assert!(matches!(err, BusError::Bind { .. }));
    assert!(err.to_string().contains(&a.endpoint()), "{err}");
    let err = Bus::start(
        BusOptions { pub_listen: "tcp://nonsense", node: key("b"), epoch: 1, receivers: 1, hwm: DEFAULT_HWM },
        Box::new(|_| 0),
    )
    .err()
    .expect("bad endpoint");
    assert!(err.to_string().contains("tcp://nonsense"), "{err}");
    assert!(matches!(
        Bus::start(
            BusOptions { pub_listen: ANY_PORT, node: key("b"), epoch: 1, receivers: 0, hwm: DEFAULT_HWM },
            Box::new(|_| 0)
        ),
        Err(BusError::NoReceivers)
    ));
}

#[test]
fn a_glommio_executor_is_woken_by_the_subscriber_thread() {
    let a = Node::start("a", 1);
    let b = Node::start("b", 1);
    b.bus.set_peers(vec![a.endpoint()]);
    b.bus.subscribe(Topic::All);
    // Probes from a plain thread until the executor has what it waits for.
    let done = Arc::new(AtomicBool::new(false));
    let prober = {
        let (bus, done) = (a.bus.clone(), done.clone());
        std::thread::spawn(move || {
            let deadline = Instant::now() + DEADLINE;
            let mut n = 0;
            while !done.load(Ordering::Relaxed) && Instant::now() < deadline {
                bus.publish(Topic::All, probe(n));
                n += 1;
                std::thread::sleep(PROBE_WAIT);
            }
        })
    };
    let rx = b.rx.clone();
    let got = LocalExecutorBuilder::new(Placement::Unbound)
        .io_memory(512 * 1024)
        .make()
        .expect("a glommio executor")
        .run(
            async move { glommio::timer::timeout(DEADLINE, async move { Ok(rx.recv_async().await) }).await },
        );
    done.store(true, Ordering::Relaxed);
    prober.join().unwrap();
    let env = got.expect("woken before the deadline").expect("channel open");
    assert!(a.sent(&env) && is_probe(&env), "{env:?}");
}

/// A node that subscribes to every bucket at once (a crowd of users in thousands of
/// conversations) gets messages on every one of them: libzmq queues subscriptions behind
/// the SUB socket's send high-water mark, and past it would drop them without a word
/// (the crowd bench saw no message cross nodes at 20,000 connections). Both orders: the
/// subscriptions sent to a connected peer, and the whole set resent on a new connection.
#[test]
fn thousands_of_subscriptions_at_once_all_take_effect() {
    let a = Node::start("a", 1);
    let b = Node::start("b", 1);
    let c = Node::start("c", 1);
    b.bus.set_peers(vec![a.endpoint()]);
    await_route_all(&a, &b);
    let every: Vec<Topic> = (0..cluster::BUCKETS).flat_map(|i| [Topic::Conv(i), Topic::User(i)]).collect();
    for topic in &every {
        b.bus.subscribe(*topic);
        c.bus.subscribe(*topic);
    }
    c.bus.set_peers(vec![a.endpoint()]);
    for to in [&b, &c] {
        // Subscriptions travel in order on one connection: once the last one works,
        // every earlier one reached `a` too (or was dropped on the way).
        await_route(&a, *every.last().expect("topics"), to);
        let _ = to.rx.drain();
    }
    for (i, topic) in every.iter().enumerate() {
        a.bus.publish(*topic, msg("any", i as u64 + 1));
    }
    for to in [&b, &c] {
        let mut seqs = Vec::with_capacity(every.len());
        while seqs.len() < every.len() {
            match next(to).msg {
                ClusterMsg::Msg { seq, .. } => seqs.push(seq),
                other => panic!("{} got {other:?}", to.name),
            }
        }
        assert_eq!(seqs, (1..=every.len() as u64).collect::<Vec<_>>(), "{} missed topics", to.name);
    }
}

/// Waits until `to` hears `from` on the `All` topic (the connection is up).
fn await_route_all(from: &Node, to: &Node) {
    to.bus.subscribe(Topic::All);
    await_route(from, Topic::All, to);
}
