//! The Redis store and its bridge against a real `redis-server` (one per test, on a free
//! loopback port, no persistence), driven from glommio executors the way shards drive it:
//! every answer comes back from a worker thread and must wake the executor.
//!
//! Needs `redis-server` on the PATH (Debian: `apt-get install redis-server`).
//! Every wait is a bounded poll for an event; every store call is bounded too, so a call
//! that hangs fails its test instead of hanging it.

mod common;

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::TempDir;
use glommio::LocalExecutorBuilder;
use redis::Value;
use ringpush::bridge::{BridgeError, PoolOptions, RedisPool};
use ringpush::protocol::{msg_json, MsgFields};
use ringpush::store::{
    MemberOp, MemberView, NewMessage, Presence, PresenceOp, RedisStore, Store, StoreError,
};
use ringpush::ws::codec::text_frame;

/// Bound on any single store call in these tests (the pool promises far less).
const CALL_TIMEOUT: Duration = Duration::from_secs(6);
/// Bound on waiting for redis-server to answer PING, and on other polls.
const POLL_TIMEOUT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------
// A redis-server of our own
// ---------------------------------------------------------------------------------------

/// A `redis-server` child on a free loopback port, killed on drop.
struct RedisServer {
    child: Option<Child>,
    port: u16,
    dir: TempDir,
}

impl RedisServer {
    fn start() -> RedisServer {
        let port = TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("free port").port();
        let mut server = RedisServer { child: None, port, dir: TempDir::new("redis") };
        server.spawn();
        server
    }

    /// Starts redis-server on `self.port` (again) and waits until it answers PING.
    fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", ""])
            .args(["--appendonly", "no", "--protected-mode", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .arg("--logfile")
            .arg(self.dir.path().join("redis.log"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("redis-server on the PATH (apt-get install redis-server)");
        self.child = Some(child);
        let deadline = Instant::now() + POLL_TIMEOUT;
        loop {
            if let Ok(mut conn) = self.try_conn() {
                if redis::cmd("PING").query::<String>(&mut conn).is_ok() {
                    return;
                }
            }
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                let log = std::fs::read_to_string(self.dir.path().join("redis.log")).unwrap_or_default();
                panic!("redis-server exited ({status}):\n{log}");
            }
            assert!(Instant::now() < deadline, "redis-server did not answer PING on port {}", self.port);
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    fn try_conn(&self) -> redis::RedisResult<redis::Connection> {
        redis::Client::open(self.url())?.get_connection_with_timeout(Duration::from_millis(500))
    }

    /// A direct connection for the test's own checks.
    fn conn(&self) -> redis::Connection {
        self.try_conn().expect("direct connection to redis-server")
    }

    fn cmd<T: redis::FromRedisValue>(&self, args: &[&str]) -> T {
        let mut cmd = redis::cmd(args[0]);
        for a in &args[1..] {
            cmd.arg(*a);
        }
        cmd.query(&mut self.conn()).unwrap_or_else(|e| panic!("{args:?}: {e}"))
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

/// Runs `f` on a fresh glommio executor thread (as a shard would) and returns its output.
fn on_shard<G, F, T>(f: G) -> T
where
    G: FnOnce() -> F + Send + 'static,
    F: Future<Output = T> + 'static,
    T: Send + 'static,
{
    LocalExecutorBuilder::default()
        .name("test-shard")
        .io_memory(512 * 1024)
        .spawn(f)
        .expect("start a glommio executor")
        .join()
        .expect("the executor ran to the end")
}

/// Awaits `fut`, failing the test if it takes longer than `CALL_TIMEOUT`.
async fn bounded<T>(fut: impl Future<Output = T>) -> T {
    let timeout = async {
        glommio::timer::sleep(CALL_TIMEOUT).await;
        None
    };
    futures_lite::future::or(async { Some(fut.await) }, timeout)
        .await
        .unwrap_or_else(|| panic!("a store call hung for more than {CALL_TIMEOUT:?}"))
}

/// Polls `check` (async) every 20 ms until it answers true, for at most `limit`.
async fn poll_until<F, Fut>(limit: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        glommio::timer::sleep(Duration::from_millis(20)).await;
    }
}

fn pool(server: &RedisServer) -> RedisPool {
    RedisPool::start(&server.url(), PoolOptions::default()).expect("start the pool")
}

fn store(pool: &RedisPool, node: &str, epoch: u64) -> RedisStore {
    RedisStore::new(pool.clone(), Arc::from(node), epoch, 1000, 300_000)
}

fn message(from: &str, cid: Option<&str>, ts: u64, body: &str) -> NewMessage {
    NewMessage {
        from: from.into(),
        dev: cid.map(|_| Arc::from("phone")),
        cid: cid.map(Arc::from),
        ts,
        body: Bytes::from(body.to_owned()),
    }
}

/// The frame conv.rs encodes at send time.
fn encoded(conv: &str, msg: &NewMessage, seq: u64) -> Bytes {
    text_frame(&msg_json(&MsgFields {
        conv,
        seq,
        from: &msg.from,
        dev: msg.dev.as_deref(),
        cid: msg.cid.as_deref(),
        ts: msg.ts,
        body: &msg.body,
    }))
}

async fn append(store: &RedisStore, conv: &str, msg: &NewMessage, floor: u64) -> ringpush::store::Appended {
    let encode = |seq| encoded(conv, msg, seq);
    bounded(store.append(conv, msg, floor, &encode)).await.expect("append")
}

fn users(names: &[&str]) -> Vec<Arc<str>> {
    names.iter().map(|n| Arc::from(*n)).collect()
}

fn sorted(mut v: Vec<Arc<str>>) -> Vec<Arc<str>> {
    v.sort();
    v
}

fn presence(device: &str, conn: &str, node: &str) -> Presence {
    Presence {
        device: device.into(),
        conn: conn.into(),
        node: node.into(),
        ip: IpAddr::V4(Ipv4Addr::new(203, 0, 113, 7)),
        since: 1_764_201_600_123,
    }
}

fn add(user: &str, entry: Presence) -> PresenceOp {
    PresenceOp::Add { user: user.into(), entry }
}

// ---------------------------------------------------------------------------------------
// Sequencing, dedupe, history
// ---------------------------------------------------------------------------------------

#[test]
fn seq_has_no_gaps_across_two_nodes() {
    let server = RedisServer::start();
    let (pool_a, pool_b) = (pool(&server), pool(&server));
    let seqs = on_shard(move || async move {
        let a = store(&pool_a, "a", 1);
        let b = store(&pool_b, "b", 2);
        let mut tasks = Vec::new();
        for i in 0..200u64 {
            let s = if i % 2 == 0 { a.clone() } else { b.clone() };
            tasks.push(glommio::spawn_local(async move {
                let msg = message(if i % 2 == 0 { "ua" } else { "ub" }, None, 1000 + i, "{\"n\":1}");
                let appended = append(&s, "c1", &msg, 0).await;
                assert!(!appended.duplicate);
                assert_eq!(appended.ts, msg.ts);
                assert_eq!(appended.frame, encoded("c1", &msg, appended.seq));
                appended.seq
            }));
        }
        let mut seqs = Vec::new();
        for t in tasks {
            seqs.push(t.await);
        }
        assert_eq!(bounded(a.conversation("c1")).await.unwrap().last_seq, 200);
        seqs
    });
    let mut sorted_seqs = seqs.clone();
    sorted_seqs.sort_unstable();
    assert_eq!(sorted_seqs, (1..=200).collect::<Vec<u64>>());
}

#[test]
fn dedupe_answers_the_first_seq_and_ts() {
    let server = RedisServer::start();
    let pool = pool(&server);
    let probe = server.url();
    on_shard(move || async move {
        let s = RedisStore::new(pool, "a".into(), 1, 100, 400);
        let first = message("u", Some("x"), 1000, "{\"v\":1}");
        let a = append(&s, "c", &first, 0).await;
        assert_eq!((a.seq, a.ts, a.duplicate), (1, 1000, false));

        // The same (user, cid) again, later and with another body: the first answer, and
        // the first message's frame rebuilt from history.
        let again = append(&s, "c", &message("u", Some("x"), 2000, "{\"v\":2}"), 0).await;
        assert_eq!((again.seq, again.ts, again.duplicate), (1, 1000, true));
        assert_eq!(again.frame, encoded("c", &first, 1));
        // Another user with the same cid is another message; nothing was stored twice.
        let other = append(&s, "c", &message("v", Some("x"), 3000, "{}"), 0).await;
        assert_eq!((other.seq, other.duplicate), (2, false));
        // ids with ':' stay apart: ("u:x", "y") is not ("u", "x:y").
        let left = append(&s, "c", &message("u", Some("x:y"), 3100, "{}"), 0).await;
        let right = append(&s, "c", &message("u:x", Some("y"), 3200, "{}"), 0).await;
        assert_eq!((left.seq, left.duplicate, right.seq, right.duplicate), (3, false, 4, false));
        let h = bounded(s.history("c", 0, 10)).await.unwrap();
        assert_eq!(h.messages.iter().map(|m| m.seq).collect::<Vec<_>>(), vec![1, 2, 3, 4]);

        // Past the window (400 ms, Redis's own PX) the cid is new again.
        let key = "rp:c:{c}:d:{u}:{x}";
        let client = redis::Client::open(probe).unwrap();
        poll_until(Duration::from_secs(5), "the dedupe key to expire", || {
            let exists: i64 =
                redis::cmd("EXISTS").arg(key).query(&mut client.get_connection().unwrap()).unwrap();
            async move { exists == 0 }
        })
        .await;
        let late = append(&s, "c", &message("u", Some("x"), 9000, "{}"), 0).await;
        assert_eq!((late.seq, late.duplicate), (5, false));
    });
}

#[test]
fn counter_never_goes_back_after_data_loss() {
    let server = RedisServer::start();
    let pool = pool(&server);
    let url = server.url();
    on_shard(move || async move {
        let s = store(&pool, "a", 1);
        let direct = redis::Client::open(url).unwrap();
        let run = |args: &[&str]| {
            let mut cmd = redis::cmd(args[0]);
            cmd.arg(&args[1..]);
            cmd.query::<Value>(&mut direct.get_connection().unwrap()).unwrap()
        };
        for i in 0..5 {
            append(&s, "c", &message("u", None, i, "{}"), 0).await;
        }
        // Redis lost everything: the caller's floor (the highest seq it saw) wins.
        run(&["FLUSHALL"]);
        assert_eq!(append(&s, "c", &message("u", None, 10, "{}"), 5).await.seq, 6);
        // Only the counter lost: history's newest entry wins over a lower floor.
        run(&["DEL", "rp:c:{c}:seq"]);
        assert_eq!(append(&s, "c", &message("u", None, 11, "{}"), 0).await.seq, 7);
        // A floor below the counter changes nothing.
        assert_eq!(append(&s, "c", &message("u", None, 12, "{}"), 3).await.seq, 8);

        // reseed raises counters, never lowers them; several conversations in one call.
        run(&["FLUSHALL"]);
        bounded(s.reseed(vec![("c".into(), 20), ("d".into(), 3)])).await.unwrap();
        bounded(s.reseed(vec![("c".into(), 10)])).await.unwrap();
        bounded(s.reseed(Vec::new())).await.unwrap();
        assert_eq!(append(&s, "c", &message("u", None, 13, "{}"), 0).await.seq, 21);
        assert_eq!(append(&s, "d", &message("u", None, 14, "{}"), 0).await.seq, 4);
        let h = bounded(s.history("c", 0, 10)).await.unwrap();
        assert_eq!((h.last_seq, h.complete), (21, false));
    });
}

#[test]
fn history_is_trimmed_and_says_when_incomplete() {
    let server = RedisServer::start();
    let pool = pool(&server);
    on_shard(move || async move {
        let s = RedisStore::new(pool, "a".into(), 1, 3, 300_000);
        let mut sent = Vec::new();
        for i in 0..5u64 {
            // Odd ones come from the API (no dev, no cid), even ones from a device.
            let cid = format!("m{i}");
            let msg = message("u", (i % 2 == 0).then_some(cid.as_str()), 100 + i, "{\"t\":\"h\\u00e9\"}");
            sent.push(encoded("c", &msg, append(&s, "c", &msg, 0).await.seq));
        }
        let h = bounded(s.history("c", 0, 100)).await.unwrap();
        assert_eq!(h.messages.iter().map(|m| m.seq).collect::<Vec<_>>(), vec![3, 4, 5]);
        assert_eq!((h.last_seq, h.complete), (5, false));
        // Rebuilt frames are exactly what was encoded at send time.
        for m in &h.messages {
            assert_eq!(m.frame, sent[m.seq as usize - 1]);
        }
        let h = bounded(s.history("c", 1, 100)).await.unwrap();
        assert!(!h.complete);
        let h = bounded(s.history("c", 2, 100)).await.unwrap();
        assert!(h.complete);
        assert_eq!(h.messages.len(), 3);
        let h = bounded(s.history("c", 3, 1)).await.unwrap();
        assert_eq!(h.messages.iter().map(|m| m.seq).collect::<Vec<_>>(), vec![4]);
        assert!(h.complete);
        let h = bounded(s.history("c", 5, 10)).await.unwrap();
        assert!(h.complete && h.messages.is_empty());
        let h = bounded(s.history("c", 0, 0)).await.unwrap();
        assert!(!h.complete && h.messages.is_empty());
        let h = bounded(s.history("nobody", 0, 10)).await.unwrap();
        assert!(h.complete && h.messages.is_empty() && h.last_seq == 0);
    });
    let len: u64 = server.cmd(&["XLEN", "rp:c:{c}:h"]);
    assert_eq!(len, 3, "MAXLEN is exact");
}

// ---------------------------------------------------------------------------------------
// Membership and users
// ---------------------------------------------------------------------------------------

#[test]
fn members_and_user_conversations() {
    let server = RedisServer::start();
    let pool = pool(&server);
    on_shard(move || async move {
        let s = store(&pool, "a", 1);
        // Every change raises the members version by one; a call that changes nothing
        // leaves it.
        let ch = bounded(s.set_members("c", MemberOp::Replace, &users(&["a", "b"]))).await.unwrap();
        assert_eq!((sorted(ch.added), ch.removed.len(), ch.count), (users(&["a", "b"]), 0, 2));
        assert_eq!(ch.members_version, 1);
        let ch = bounded(s.set_members("c", MemberOp::Replace, &users(&["b", "c"]))).await.unwrap();
        assert_eq!(
            (ch.added, ch.removed, ch.count, ch.members_version),
            (users(&["c"]), users(&["a"]), 2, 2)
        );
        let ch = bounded(s.set_members("c", MemberOp::Add, &users(&["c", "d"]))).await.unwrap();
        assert_eq!((ch.added, ch.count, ch.members_version), (users(&["d"]), 3, 3));
        let ch = bounded(s.set_members("c", MemberOp::Add, &users(&["d"]))).await.unwrap();
        assert_eq!((ch.added.len(), ch.members_version), (0, 3), "no change, no new version");
        let ch = bounded(s.set_members("c", MemberOp::Remove, &users(&["b", "zz"]))).await.unwrap();
        assert_eq!((ch.removed, ch.count, ch.members_version), (users(&["b"]), 2, 4));

        assert!(bounded(s.is_member("c", "c")).await.unwrap());
        assert!(!bounded(s.is_member("c", "b")).await.unwrap());
        let view = |last_seq, members_version| Some(MemberView { last_seq, members_version });
        assert_eq!(bounded(s.member_view("c", "c")).await.unwrap(), view(0, 4));
        assert_eq!(bounded(s.member_view("c", "b")).await.unwrap(), None);
        let first = append(&s, "c", &message("c", None, 1, "{}"), 0).await;
        assert_eq!(first.members_version, 4, "an append answers the version it was taken under");
        append(&s, "c", &message("c", None, 2, "{}"), 0).await;
        assert_eq!(bounded(s.member_view("c", "d")).await.unwrap(), view(2, 4));
        let read = bounded(s.conversation("c")).await.unwrap();
        assert_eq!((sorted(read.members), read.last_seq, read.members_version), (users(&["c", "d"]), 2, 4));
        // History keeps the version each message was taken under.
        let history = bounded(s.history("c", 0, 10)).await.unwrap();
        assert!(history.messages.iter().all(|m| m.members_version == 4), "{history:?}");
        // Many conversations in one call, in the order asked.
        let convs: Vec<Arc<str>> = vec!["c".into(), "none".into(), "c".into()];
        assert_eq!(bounded(s.member_views(&convs, "d")).await.unwrap(), vec![view(2, 4), None, view(2, 4)]);
        // A client's append is refused for a non-member and stores nothing; a member's
        // goes in, as does the API's (no check).
        let enc = |seq| encoded("c", &message("b", None, 3, "{}"), seq);
        let refused = bounded(s.append_if_member("c", &message("b", Some("x"), 3, "{}"), 0, &enc)).await;
        assert!(refused.unwrap().is_none());
        assert_eq!(
            bounded(s.conversation("c")).await.unwrap().last_seq,
            2,
            "nothing stored for a non-member"
        );
        let enc = |seq| encoded("c", &message("d", None, 4, "{}"), seq);
        let ok = bounded(s.append_if_member("c", &message("d", None, 4, "{}"), 0, &enc)).await.unwrap();
        assert_eq!(ok.map(|a| a.seq), Some(3));
        let none = bounded(s.conversation("none")).await.unwrap();
        assert_eq!((none.members.len(), none.last_seq, none.members_version), (0, 0, 0));

        let (c1, c2): (Arc<str>, Arc<str>) = ("c1".into(), "c2:x".into());
        bounded(s.link_user("u", &c1, true)).await.unwrap();
        bounded(s.link_user("u", &c2, true)).await.unwrap();
        assert_eq!(sorted(bounded(s.user_convs("u")).await.unwrap()), vec![c1.clone(), c2.clone()]);
        bounded(s.link_user("u", &c1, false)).await.unwrap();
        assert_eq!(bounded(s.user_convs("u")).await.unwrap(), vec![c2]);
        assert!(bounded(s.user_convs("nobody")).await.unwrap().is_empty());
    });
}

// ---------------------------------------------------------------------------------------
// Presence, leases, sweep, peers
// ---------------------------------------------------------------------------------------

#[test]
fn presence_is_written_read_and_removed() {
    let server = RedisServer::start();
    let pool = pool(&server);
    on_shard(move || async move {
        let n1 = store(&pool, "n1", 7);
        let n2 = store(&pool, "n2", 9);
        bounded(n1.presence_write(&[
            add("u", presence("phone", "k1", "n1")),
            add("v", presence("pc", "k2", "n1")),
        ]))
        .await
        .unwrap();
        bounded(n2.presence_write(&[add("u", presence("pc", "k3", "n2"))])).await.unwrap();
        bounded(n2.presence_write(&[])).await.unwrap();
        let mut got = bounded(n1.presence_of("u")).await.unwrap();
        got.sort_by(|a, b| a.conn.cmp(&b.conn));
        assert_eq!(got, vec![presence("phone", "k1", "n1"), presence("pc", "k3", "n2")]);

        bounded(n1.presence_write(&[PresenceOp::Remove { user: "u".into(), conn: "k1".into() }]))
            .await
            .unwrap();
        assert_eq!(bounded(n2.presence_of("u")).await.unwrap(), vec![presence("pc", "k3", "n2")]);
        assert!(bounded(n2.presence_of("nobody")).await.unwrap().is_empty());
    });
    let record: String = server.cmd(&["HGET", "rp:p:{v}", "n1/k2"]);
    let record: serde_json::Value = serde_json::from_str(&record).unwrap();
    assert_eq!(
        record,
        serde_json::json!({"device":"pc","conn":"k2","node":"n1","epoch":7,"ip":"203.0.113.7","since":1764201600123u64})
    );
    let index: Vec<String> = server.cmd(&["SMEMBERS", "rp:{ctl}:pn:{n1}:7"]);
    assert_eq!(index, vec!["v\nn1/k2".to_owned()]);
}

#[test]
fn lease_renewal_says_whether_presence_must_be_rewritten() {
    let server = RedisServer::start();
    let pool = pool(&server);
    let url = server.url();
    on_shard(move || async move {
        let n1 = store(&pool, "n1", 7);
        assert!(!bounded(n1.renew_lease(Some("tcp://10.0.0.1:7001"), 30_000)).await.unwrap());
        assert!(bounded(n1.renew_lease(Some("tcp://10.0.0.1:7001"), 30_000)).await.unwrap());
        // Redis lost its data: the next renewal says so.
        let direct = redis::Client::open(url).unwrap();
        redis::cmd("FLUSHALL").query::<()>(&mut direct.get_connection().unwrap()).unwrap();
        assert!(!bounded(n1.renew_lease(None, 30_000)).await.unwrap());
        assert!(bounded(n1.renew_lease(None, 30_000)).await.unwrap());
        // Another run of the same node took the lease: ours is no longer held.
        let n1_new = store(&pool, "n1", 8);
        assert!(!bounded(n1_new.renew_lease(None, 30_000)).await.unwrap());
        assert!(!bounded(n1.renew_lease(None, 30_000)).await.unwrap());
    });
}

#[test]
fn sweep_purges_an_expired_node_and_never_a_live_one() {
    let server = RedisServer::start();
    let pool = pool(&server);
    let url = server.url();
    on_shard(move || async move {
        let dead = store(&pool, "dead", 1);
        let live = store(&pool, "live", 2);
        // Long enough for the checks below on a loaded machine, short enough to wait for.
        assert!(!bounded(dead.renew_lease(Some("tcp://dead:1"), 1500)).await.unwrap());
        assert!(!bounded(live.renew_lease(Some("tcp://live:1"), 30_000)).await.unwrap());
        bounded(
            dead.presence_write(&[
                add("u", presence("a", "k1", "dead")),
                add("w", presence("a", "k2", "dead")),
            ]),
        )
        .await
        .unwrap();
        bounded(live.presence_write(&[add("u", presence("b", "k3", "live"))])).await.unwrap();
        // While both leases hold, nothing is swept and both are peers.
        assert!(bounded(live.sweep()).await.unwrap().is_empty());
        assert_eq!(
            bounded(live.peers()).await.unwrap(),
            vec![(Arc::from("dead"), "tcp://dead:1".to_owned())]
        );

        let direct = redis::Client::open(url).unwrap();
        poll_until(Duration::from_secs(5), "the short lease to expire", || {
            let held: Option<String> = redis::cmd("GET")
                .arg("rp:{ctl}:lease:{dead}")
                .query(&mut direct.get_connection().unwrap())
                .unwrap();
            async move { held.is_none() }
        })
        .await;
        assert!(bounded(live.peers()).await.unwrap().is_empty(), "an expired node is no peer");
        assert_eq!(bounded(live.sweep()).await.unwrap(), vec!["dead:1".to_owned()]);
        assert_eq!(bounded(live.presence_of("u")).await.unwrap(), vec![presence("b", "k3", "live")]);
        assert!(bounded(live.presence_of("w")).await.unwrap().is_empty());
        // Idempotent: nothing left to purge, the live node untouched.
        assert!(bounded(dead.sweep()).await.unwrap().is_empty());
        assert_eq!(
            bounded(dead.peers()).await.unwrap(),
            vec![(Arc::from("live"), "tcp://live:1".to_owned())]
        );
        let mut conn = direct.get_connection().unwrap();
        let nodes: Vec<String> = redis::cmd("HKEYS").arg("rp:{ctl}:nodes").query(&mut conn).unwrap();
        assert_eq!(nodes, vec!["live".to_owned()]);
        let runs: Vec<String> = redis::cmd("SMEMBERS").arg("rp:{ctl}:epochs").query(&mut conn).unwrap();
        assert_eq!(runs, vec!["live:2".to_owned()]);
        let index: i64 = redis::cmd("EXISTS").arg("rp:{ctl}:pn:{dead}:1").query(&mut conn).unwrap();
        assert_eq!(index, 0);

        // A restarted node (new epoch, lease live) has its old run purged, not its new one.
        let old = store(&pool, "n", 10);
        bounded(old.renew_lease(Some("tcp://n:1"), 30_000)).await.unwrap();
        bounded(old.presence_write(&[add("x", presence("a", "old", "n"))])).await.unwrap();
        let new = store(&pool, "n", 11);
        bounded(new.renew_lease(Some("tcp://n:2"), 30_000)).await.unwrap();
        bounded(new.presence_write(&[add("x", presence("a", "new", "n"))])).await.unwrap();
        assert_eq!(bounded(live.sweep()).await.unwrap(), vec!["n:10".to_owned()]);
        assert_eq!(bounded(live.presence_of("x")).await.unwrap(), vec![presence("a", "new", "n")]);
        assert_eq!(bounded(live.peers()).await.unwrap(), vec![(Arc::from("n"), "tcp://n:2".to_owned())]);
        // The purged run renews (it was only paused): it learns it must rewrite presence.
        assert!(!bounded(dead.renew_lease(None, 30_000)).await.unwrap());
    });
}

/// A purge spans the users' slots, so it is not one script: a node that dies in the
/// middle of one leaves the run marked purging with part of its entries. The next sweep
/// of any node finishes it, and does not report the run a second time.
#[test]
fn a_purge_cut_short_is_finished_by_the_next_sweep() {
    let server = RedisServer::start();
    let pool = pool(&server);
    let url = server.url();
    on_shard(move || async move {
        let dead = store(&pool, "gone", 3);
        let live = store(&pool, "here", 4);
        bounded(live.renew_lease(None, 30_000)).await.unwrap();
        // 2500 entries: more than one chunk of the purge.
        let ops: Vec<PresenceOp> =
            (0..2500).map(|i| add(&format!("p{i}"), presence("d", &format!("k{i}"), "gone"))).collect();
        bounded(dead.presence_write(&ops)).await.unwrap();
        // What the purger that died had done: the run out of the epochs (reported by it),
        // marked purging, its lease gone, some of its entries and index lines removed.
        let mut conn = redis::Client::open(url).unwrap().get_connection().unwrap();
        let _: () = redis::cmd("SREM").arg("rp:{ctl}:epochs").arg("gone:3").query(&mut conn).unwrap();
        let _: () = redis::cmd("SADD").arg("rp:{ctl}:purging").arg("gone:3").query(&mut conn).unwrap();
        for i in 0..700 {
            let _: () = redis::cmd("HDEL")
                .arg(format!("rp:p:{{p{i}}}"))
                .arg(format!("gone/k{i}"))
                .query(&mut conn)
                .unwrap();
            let _: () = redis::cmd("SREM")
                .arg("rp:{ctl}:pn:{gone}:3")
                .arg(format!("p{i}\ngone/k{i}"))
                .query(&mut conn)
                .unwrap();
        }
        assert_eq!(bounded(live.presence_of("p2000")).await.unwrap().len(), 1);

        assert!(bounded(live.sweep()).await.unwrap().is_empty(), "reported twice");
        for i in [0, 700, 1499, 2499] {
            assert!(bounded(live.presence_of(&format!("p{i}"))).await.unwrap().is_empty(), "p{i} left");
        }
        let purging: Vec<String> = redis::cmd("SMEMBERS").arg("rp:{ctl}:purging").query(&mut conn).unwrap();
        assert!(purging.is_empty(), "{purging:?}");
        let index: i64 = redis::cmd("EXISTS").arg("rp:{ctl}:pn:{gone}:3").query(&mut conn).unwrap();
        assert_eq!(index, 0);
        // A live run marked purging (a leave cut short, then registered again) is left alone.
        bounded(live.presence_write(&[add("q", presence("e", "k", "here"))])).await.unwrap();
        let _: () = redis::cmd("SADD").arg("rp:{ctl}:purging").arg("here:4").query(&mut conn).unwrap();
        assert!(bounded(live.sweep()).await.unwrap().is_empty());
        assert_eq!(bounded(live.presence_of("q")).await.unwrap().len(), 1);
    });
}

#[test]
fn two_concurrent_sweeps_purge_each_run_once() {
    let server = RedisServer::start();
    let (pool_a, pool_b) = (pool(&server), pool(&server));
    let url = server.url();
    on_shard(move || async move {
        let a = store(&pool_a, "a", 1);
        let b = store(&pool_b, "b", 1);
        // Twenty runs that registered and wrote presence, then died (lease deleted).
        let direct = redis::Client::open(url).unwrap();
        for i in 0..20 {
            let gone = store(&pool_a, &format!("g{i}"), 5);
            bounded(gone.renew_lease(None, 30_000)).await.unwrap();
            bounded(gone.presence_write(&[add("u", presence("d", &format!("k{i}"), &format!("g{i}")))]))
                .await
                .unwrap();
            redis::cmd("DEL")
                .arg(format!("rp:{{ctl}}:lease:{{g{i}}}"))
                .query::<()>(&mut direct.get_connection().unwrap())
                .unwrap();
        }
        bounded(a.renew_lease(None, 30_000)).await.unwrap();
        bounded(b.renew_lease(None, 30_000)).await.unwrap();
        bounded(a.presence_write(&[add("u", presence("d", "ka", "a"))])).await.unwrap();
        let (ra, rb) = futures_lite::future::zip(bounded(a.sweep()), bounded(b.sweep())).await;
        let (ra, rb) = (ra.unwrap(), rb.unwrap());
        let mut all: Vec<String> = ra.iter().chain(rb.iter()).cloned().collect();
        all.sort();
        let mut expected: Vec<String> = (0..20).map(|i| format!("g{i}:5")).collect();
        expected.sort();
        assert_eq!(all, expected, "every dead run purged by exactly one sweep: a={ra:?} b={rb:?}");
        assert_eq!(bounded(b.presence_of("u")).await.unwrap(), vec![presence("d", "ka", "a")]);
    });
}

#[test]
fn leave_drops_lease_presence_and_registration() {
    let server = RedisServer::start();
    let pool = pool(&server);
    on_shard(move || async move {
        let n1 = store(&pool, "n1", 3);
        let n2 = store(&pool, "n2", 4);
        bounded(n1.renew_lease(Some("tcp://n1:1"), 30_000)).await.unwrap();
        bounded(n2.renew_lease(Some("tcp://n2:1"), 30_000)).await.unwrap();
        bounded(n1.presence_write(&[add("u", presence("p", "k1", "n1"))])).await.unwrap();
        assert_eq!(bounded(n2.peers()).await.unwrap().len(), 1);
        bounded(n1.leave()).await.unwrap();
        assert!(bounded(n2.presence_of("u")).await.unwrap().is_empty());
        assert!(bounded(n2.peers()).await.unwrap().is_empty());
        assert!(bounded(n2.sweep()).await.unwrap().is_empty(), "nothing left for a sweep");
        bounded(n1.leave()).await.unwrap();
        assert!(!bounded(n1.renew_lease(None, 30_000)).await.unwrap());
    });
    let lease: Option<String> = server.cmd(&["GET", "rp:{ctl}:lease:{n2}"]);
    assert_eq!(lease.as_deref(), Some("4"));
}

// ---------------------------------------------------------------------------------------
// The bridge: failures, recovery, batching
// ---------------------------------------------------------------------------------------

#[test]
fn redis_down_fails_fast_then_recovers_without_a_new_pool() {
    let mut server = RedisServer::start();
    let pool = pool(&server);
    let handle = pool.clone();
    on_shard(move || async move {
        let s = store(&handle, "a", 1);
        append(&s, "c", &message("u", None, 1, "{}"), 0).await;
        assert!(handle.is_up());
        // Hand the server to the executor's side for the kill and the restart.
        server.kill();
        for _ in 0..5 {
            let started = Instant::now();
            let msg = message("u", Some("k"), 2, "{}");
            let encode = |seq| encoded("c", &msg, seq);
            let result = bounded(s.append("c", &msg, 1, &encode)).await;
            // The first may have been written before the reset was seen (its outcome is
            // then unknown); the rest find no connection.
            assert!(matches!(result, Err(StoreError::Unavailable(_) | StoreError::Unknown(_))), "{result:?}");
            assert!(started.elapsed() < Duration::from_millis(2500), "took {:?}", started.elapsed());
            let started = Instant::now();
            assert!(bounded(s.is_member("c", "u")).await.is_err());
            assert!(started.elapsed() < Duration::from_millis(2500), "took {:?}", started.elapsed());
        }
        poll_until(Duration::from_secs(3), "is_up to turn false", || async { !handle.is_up() }).await;

        server.spawn();
        // The same pool (and its scripts, lost with the restart) works again.
        poll_until(Duration::from_secs(5), "is_up after the restart", || async { handle.is_up() }).await;
        let deadline = Instant::now() + Duration::from_secs(5);
        let seq = loop {
            let msg = message("u", Some("k"), 3, "{}");
            let encode = |seq| encoded("c", &msg, seq);
            match bounded(s.append("c", &msg, 1, &encode)).await {
                Ok(a) => break a.seq,
                Err(e) => assert!(Instant::now() < deadline, "no append after the restart: {e}"),
            }
            glommio::timer::sleep(Duration::from_millis(20)).await;
        };
        // The restart lost the counter; the floor of 1 keeps seq 1 from being reused.
        assert_eq!(seq, 2);
        server
    });
    assert!(pool.stats().connects >= 2, "{:?}", pool.stats());
}

#[test]
fn redis_that_stops_answering_times_jobs_out() {
    let server = RedisServer::start();
    // One connection, whose scripts the first append loads: the first job after the stop
    // is sure to be sent (not refused while loading scripts on another connection).
    let options = PoolOptions { connections: 1, ..PoolOptions::default() };
    let pool = RedisPool::start(&server.url(), options).expect("start the pool");
    let pid = server.child.as_ref().map(|c| c.id()).expect("running") as libc::pid_t;
    on_shard(move || async move {
        let s = store(&pool, "a", 1);
        append(&s, "c", &message("u", None, 1, "{}"), 0).await;
        // SIGSTOP: connections stay open, nothing answers; only the timeouts end a wait.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
        let mut waits = Vec::new();
        for i in 0..4 {
            let started = Instant::now();
            let result = bounded(s.is_member("c", "u")).await;
            waits.push(started.elapsed());
            if i == 0 {
                // Sent, never answered: whether it was applied is not known.
                assert!(matches!(result, Err(StoreError::Unknown(_))), "{result:?}");
            } else {
                assert!(
                    matches!(result, Err(StoreError::Unavailable(_) | StoreError::Unknown(_))),
                    "{result:?}"
                );
            }
        }
        assert!(waits.iter().all(|w| *w < Duration::from_millis(2600)), "waits {waits:?}");
        poll_until(Duration::from_secs(3), "is_up to turn false", || async { !pool.is_up() }).await;
        assert_eq!(unsafe { libc::kill(pid, libc::SIGCONT) }, 0);
        let deadline = Instant::now() + Duration::from_secs(6);
        while bounded(s.is_member("c", "u")).await.is_err() {
            assert!(Instant::now() < deadline, "no recovery after SIGCONT");
            glommio::timer::sleep(Duration::from_millis(20)).await;
        }
        // Whatever the timed-out jobs did, the counter moved on without a gap or reuse.
        let next = append(&s, "c", &message("u", None, 2, "{}"), 0).await;
        assert_eq!(next.seq, 2);
    });
}

#[test]
fn script_cache_flush_is_survived() {
    let server = RedisServer::start();
    let pool = pool(&server);
    let url = server.url();
    on_shard(move || async move {
        let s = store(&pool, "a", 1);
        append(&s, "c", &message("u", None, 1, "{}"), 0).await;
        let direct = redis::Client::open(url).unwrap();
        redis::cmd("SCRIPT").arg("FLUSH").query::<()>(&mut direct.get_connection().unwrap()).unwrap();
        assert_eq!(append(&s, "c", &message("u", None, 2, "{}"), 0).await.seq, 2);
        let h = bounded(s.history("c", 0, 10)).await.unwrap();
        assert_eq!(h.messages.len(), 2);
    });
}

#[test]
fn a_failing_command_fails_only_its_own_job() {
    let server = RedisServer::start();
    let pool = pool(&server);
    server.cmd::<()>(&["SADD", "a-set", "x"]);
    on_shard(move || async move {
        for _ in 0..20 {
            // Queue both before awaiting either, so they usually share a pipeline.
            let bad = pool.submit(vec![redis::cmd("INCR").arg("a-set").clone()]).unwrap();
            let good =
                pool.submit(vec![redis::cmd("INCR").arg("counter").clone(), redis::cmd("PING")]).unwrap();
            let bad = bounded(bad.recv_async()).await.unwrap();
            let good = bounded(good.recv_async()).await.unwrap();
            assert!(matches!(&bad, Err(BridgeError::Unavailable(e)) if e.contains("WRONGTYPE")), "{bad:?}");
            let good = good.unwrap();
            assert_eq!(good.len(), 2);
            assert!(matches!(good[1], Value::SimpleString(ref s) if s == "PONG"), "{good:?}");
        }
        assert!(pool.is_up());
    });
    let counter: u64 = server.cmd(&["GET", "counter"]);
    assert_eq!(counter, 20);
}

#[test]
fn answers_wake_a_parked_executor() {
    let server = RedisServer::start();
    let pool = pool(&server);
    on_shard(move || async move {
        // Nothing else runs on this executor: it parks in io_uring after each submit, and
        // only the worker thread's wake can resume the task (`bounded` would fail it).
        let started = Instant::now();
        for _ in 0..50 {
            let pong = bounded(pool.query_one(redis::cmd("PING"))).await.unwrap();
            assert!(matches!(pong, Value::SimpleString(ref s) if s == "PONG"), "{pong:?}");
        }
        assert!(started.elapsed() < Duration::from_secs(2), "50 round trips took {:?}", started.elapsed());
    });
}

#[test]
fn concurrent_jobs_share_round_trips() {
    let server = RedisServer::start();
    let pool = pool(&server);
    let handle = pool.clone();
    let before = pool.stats();
    on_shard(move || async move {
        let s = store(&handle, "a", 1);
        let mut tasks = Vec::new();
        for i in 0..1000u64 {
            let s = s.clone();
            tasks.push(glommio::spawn_local(async move {
                let cid = format!("m{i}");
                append(&s, "c", &message("u", Some(&cid), i, "{}"), 0).await.seq
            }));
        }
        let mut seqs = Vec::new();
        for t in tasks {
            seqs.push(t.await);
        }
        seqs.sort_unstable();
        assert_eq!(seqs, (1..=1000).collect::<Vec<u64>>());
    });
    let stats = pool.stats();
    let (jobs, trips) = (stats.jobs - before.jobs, stats.round_trips - before.round_trips);
    assert_eq!(jobs, 1000, "{stats:?}");
    // The executor queues its jobs faster than Redis runs them, so workers take the queue
    // up to 128 jobs at a time: about 10 round trips here, never near 1000.
    assert!(trips * 5 <= jobs, "{trips} round trips for {jobs} jobs: batching did not happen");
    // Redis saw every append as its own EVALSHA, so the jobs were really sent.
    let info: String = server.cmd(&["INFO", "commandstats"]);
    let calls: u64 = info
        .lines()
        .find_map(|l| l.strip_prefix("cmdstat_evalsha:calls="))
        .and_then(|rest| rest.split(',').next())
        .and_then(|n| n.parse().ok())
        .expect("cmdstat_evalsha in INFO commandstats");
    assert_eq!(calls, 1000);
}

#[test]
fn read_marks_only_move_up_stop_at_the_last_seq_and_need_membership() {
    let server = RedisServer::start();
    let p = pool(&server);
    on_shard(move || async move {
        let s = store(&p, "a", 1);
        bounded(s.set_members("c1", MemberOp::Add, &users(&["al", "bo"]))).await.unwrap();
        for i in 0..4 {
            append(&s, "c1", &message("al", None, 1000 + i, "1"), 0).await;
        }
        assert_eq!(bounded(s.set_read("c1", "eve", 2)).await.unwrap(), None, "not a member");
        let mark = bounded(s.set_read("c1", "bo", 2)).await.unwrap().expect("member");
        assert_eq!((mark.read, mark.moved), (2, true));
        let mark = bounded(s.set_read("c1", "bo", 1)).await.unwrap().expect("member");
        assert_eq!((mark.read, mark.moved), (2, false));
        let mark = bounded(s.set_read("c1", "bo", 99)).await.unwrap().expect("member");
        assert_eq!((mark.read, mark.moved), (4, true), "clamped to the last seq");
        let state = bounded(s.read_state("c1", &users(&["al", "bo", "eve"]))).await.unwrap();
        assert_eq!((state.last_seq, state.marks), (4, vec![0, 4, 0]));
        let state = bounded(s.read_state("nothing", &users(&["al"]))).await.unwrap();
        assert_eq!((state.last_seq, state.marks), (0, vec![0]));
    });
}
