//! The Redis pool against a real three-master Redis Cluster (one per test, on free loopback
//! ports): hash slots as the server computes them, batches spread over every master,
//! scripts, a flushed script cache, a live slot migration (`ASK`, then `MOVED`), a killed
//! master, and a URL the cluster cannot serve.
//!
//! Needs `redis-server` and `redis-cli` on the PATH (Debian: `apt-get install
//! redis-server redis-tools`). Jobs are submitted from plain threads and their answers
//! awaited with a bound; every wait for an event is a bounded poll.

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::redis::RedisCluster;
use redis::{Cmd, Value};
use ringpush::bridge::{key_slot, Answer, BridgeError, PoolOptions, RedisPool};

/// Bound on waiting for any one job's answer (the pool promises far less).
const CALL_TIMEOUT: Duration = Duration::from_secs(6);
/// Bound on polls for an event.
const POLL_TIMEOUT: Duration = Duration::from_secs(10);

fn cmd(args: &[&str]) -> Cmd {
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    cmd
}

fn pool(cluster: &RedisCluster) -> RedisPool {
    RedisPool::start(&cluster.url(), PoolOptions::default()).expect("start the pool")
}

/// Submits a job and waits (bounded) for its answer.
fn run(pool: &RedisPool, cmds: Vec<Cmd>) -> Answer {
    let rx = pool.submit(cmds).expect("submit");
    rx.recv_timeout(CALL_TIMEOUT).expect("a job answered within the bound")
}

fn int(value: &Value) -> i64 {
    match value {
        Value::Int(n) => *n,
        Value::BulkString(b) => std::str::from_utf8(b).unwrap().parse().unwrap(),
        other => panic!("not an integer: {other:?}"),
    }
}

fn text(value: &Value) -> String {
    match value {
        Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
        Value::SimpleString(s) => s.clone(),
        Value::Okay => "OK".to_owned(),
        other => panic!("not a string: {other:?}"),
    }
}

/// Polls `check` every 20 ms until it answers true, for at most `POLL_TIMEOUT`.
fn poll_until(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + POLL_TIMEOUT;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(20));
    }
}

/// The cluster's slot map as node 0 sees it: (first, last, node index).
fn slot_map(cluster: &RedisCluster) -> Vec<(u16, u16, usize)> {
    let client = redis::Client::open(cluster.url()).unwrap();
    let mut conn = client.get_connection_with_timeout(Duration::from_secs(2)).unwrap();
    let reply: Value = redis::cmd("CLUSTER").arg("SLOTS").query(&mut conn).unwrap();
    let Value::Array(ranges) = reply else { panic!("CLUSTER SLOTS: {reply:?}") };
    ranges
        .iter()
        .map(|range| {
            let Value::Array(parts) = range else { panic!("{range:?}") };
            let Value::Array(master) = &parts[2] else { panic!("{range:?}") };
            let port = int(&master[1]) as u16;
            let node = (0..3).find(|&n| cluster.port(n) == port).expect("a node of ours");
            (int(&parts[0]) as u16, int(&parts[1]) as u16, node)
        })
        .collect()
}

fn owner(map: &[(u16, u16, usize)], slot: u16) -> usize {
    map.iter().find(|(first, last, _)| (*first..=*last).contains(&slot)).expect("slot assigned").2
}

/// `count` keys `{prefix}N` whose slots node `node` serves.
fn keys_on(map: &[(u16, u16, usize)], node: usize, count: usize, prefix: &str) -> Vec<String> {
    (0..)
        .map(|i| format!("{prefix}{i}"))
        .filter(|k| owner(map, key_slot(k.as_bytes())) == node)
        .take(count)
        .collect()
}

// ---------------------------------------------------------------------------------------

#[test]
fn slots_match_cluster_keyslot() {
    let cluster = RedisCluster::start();
    let client = redis::Client::open(cluster.url()).unwrap();
    let mut conn = client.get_connection_with_timeout(Duration::from_secs(2)).unwrap();
    let mut keys: Vec<Vec<u8>> = [
        "",
        "{",
        "}",
        "{}",
        "}{",
        "{}{",
        "{}}",
        "{{}}",
        "}{a}",
        "{a}",
        "a{b}c",
        "a{}b{c}",
        "{{x}}",
        "x{y",
        "x}y{z}",
        "{a}{b}",
        "foo",
        "bar",
        "123456789",
        "rp:c:{conv}:seq",
        "rp:c:{c}:d:{u}:{x}",
        "{user1000}.following",
    ]
    .iter()
    .map(|k| k.as_bytes().to_vec())
    .collect();
    // Many more: counters, braces in every position, and bytes that are not UTF-8.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for i in 0..3000u32 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let len = (x % 24) as usize;
        let mut key: Vec<u8> = (0..len)
            .map(|j| [b'{', b'}', b'a', b'z', b':', 0xff, 0x00, b'0'][((x >> (j * 2)) % 8) as usize])
            .collect();
        key.extend_from_slice(format!("k{i}").as_bytes());
        if i % 3 == 0 {
            key.rotate_left(len / 2);
        }
        keys.push(key);
    }
    let mut pipe = redis::pipe();
    for key in &keys {
        pipe.cmd("CLUSTER").arg("KEYSLOT").arg(key.as_slice());
    }
    let slots: Vec<u16> = pipe.query(&mut conn).unwrap();
    for (key, slot) in keys.iter().zip(slots) {
        assert_eq!(key_slot(key), slot, "key {:?}", String::from_utf8_lossy(key));
    }
}

#[test]
fn a_batch_over_every_master_is_answered_in_order() {
    let cluster = RedisCluster::start();
    let pool = pool(&cluster);
    let map = slot_map(&cluster);
    let counters: Vec<String> = (0..3).map(|n| keys_on(&map, n, 1, "ctr")[0].clone()).collect();
    let mut seen: Vec<Vec<i64>> = vec![Vec::new(); 3];
    let before = pool.stats();
    let mut jobs = 0u64;
    for round in 0..3 {
        // Submitted before any is awaited, so they share pipelines.
        let mut pending = Vec::new();
        for j in 0..300usize {
            let (n, m) = (j % 3, (j / 3) % 3);
            let own = format!("s:{round}:{j}");
            let value = format!("v{round}-{j}");
            let cmds = vec![
                cmd(&["SET", &own, &value]),
                cmd(&["INCR", &counters[n]]),
                cmd(&["GET", &own]),
                cmd(&["PING"]),
                cmd(&["INCR", &counters[m]]),
                cmd(&["MGET", "{t}a", "{t}b"]),
            ];
            pending.push((j, value, pool.submit(cmds).unwrap()));
        }
        // One job with keys of two slots: it alone fails.
        let cross = pool.submit(vec![cmd(&["MGET", "a", "b"])]).unwrap();
        for (j, value, rx) in pending {
            let values = rx.recv_timeout(CALL_TIMEOUT).unwrap().unwrap_or_else(|e| panic!("job {j}: {e}"));
            assert_eq!(values.len(), 6);
            assert_eq!(text(&values[0]), "OK");
            assert_eq!(text(&values[2]), value, "GET answers the SET of the same job");
            assert_eq!(text(&values[3]), "PONG");
            seen[j % 3].push(int(&values[1]));
            seen[(j / 3) % 3].push(int(&values[4]));
            assert_eq!(values[5], Value::Array(vec![Value::Nil, Value::Nil]));
            jobs += 1;
        }
        let cross = cross.recv_timeout(CALL_TIMEOUT).unwrap();
        assert!(matches!(&cross, Err(BridgeError::Unavailable(e)) if e.contains("CROSSSLOT")), "{cross:?}");
    }
    // Every INCR ran once: each counter's replies are 1..=n, whatever the order.
    for (n, mut replies) in seen.into_iter().enumerate() {
        replies.sort_unstable();
        assert_eq!(replies, (1..=replies.len() as i64).collect::<Vec<_>>(), "counter on node {n}");
        assert_eq!(cluster.cli(&["GET", &counters[n]]).trim(), replies.len().to_string());
    }
    let stats = pool.stats();
    let trips = stats.round_trips - before.round_trips;
    assert!(trips * 5 <= jobs, "{trips} round trips for {jobs} jobs: batching did not happen");
    assert_eq!(stats.redirects, 0, "{stats:?}");
    assert!(pool.is_up());
}

#[test]
fn scripts_run_by_sha_on_every_master() {
    let cluster = RedisCluster::start();
    let pool = pool(&cluster);
    let map = slot_map(&cluster);
    let incrby = pool.register("return redis.call('INCRBY', KEYS[1], ARGV[1])");
    let pair = pool.register(
        "redis.call('SET', KEYS[1], ARGV[1]); redis.call('SET', KEYS[2], ARGV[1]); \
         return redis.call('MGET', KEYS[1], KEYS[2])",
    );
    let echo = pool.register("return ARGV[1]");
    for node in 0..3 {
        let key = &keys_on(&map, node, 1, "sc")[0];
        for i in 1..=3 {
            let mut call = incrby.cmd(1);
            call.arg(key).arg(10);
            let mut both = pair.cmd(2);
            let (a, b) = (format!("{{{key}}}:a"), format!("{{{key}}}:b"));
            both.arg(&a).arg(&b).arg(i);
            let mut keyless = echo.cmd(0);
            keyless.arg(format!("hi{i}"));
            let values = run(&pool, vec![call, both, keyless]).unwrap();
            assert_eq!(int(&values[0]), 10 * i);
            assert_eq!(values[1], Value::Array(vec![Value::BulkString(vec![b'0' + i as u8]); 2]));
            assert_eq!(text(&values[2]), format!("hi{i}"));
        }
        assert_eq!(cluster.cli_at(node, &["GET", key]).trim(), "30", "the script ran on the key's master");
    }
}

#[test]
fn noscript_after_a_flush_on_one_master_is_recovered() {
    let cluster = RedisCluster::start();
    let pool = pool(&cluster);
    let map = slot_map(&cluster);
    let incr = pool.register("return redis.call('INCR', KEYS[1])");
    let keys: Vec<String> = (0..3).map(|n| keys_on(&map, n, 1, "ns")[0].clone()).collect();
    let call = |key: &str| {
        let mut c = incr.cmd(1);
        c.arg(key);
        c
    };
    for key in &keys {
        assert_eq!(int(&run(&pool, vec![call(key)]).unwrap()[0]), 1);
    }
    assert_eq!(cluster.cli_at(1, &["SCRIPT", "FLUSH"]).trim(), "OK");
    assert_eq!(cluster.cli_at(1, &["SCRIPT", "EXISTS", incr.sha()]).trim(), "0");
    for round in 2..=4 {
        // Several calls per master in one batch, the flushed one's among them.
        let rxs: Vec<_> = keys.iter().map(|k| pool.submit(vec![call(k), call(k)]).unwrap()).collect();
        for rx in rxs {
            let values = rx.recv_timeout(CALL_TIMEOUT).unwrap().expect("NOSCRIPT recovered");
            assert_eq!((int(&values[0]), int(&values[1])), (2 * round - 2, 2 * round - 1));
        }
    }
    assert_eq!(cluster.cli_at(1, &["SCRIPT", "EXISTS", incr.sha()]).trim(), "1");
}

#[test]
fn a_live_slot_migration_loses_and_misanswers_no_job() {
    let cluster = RedisCluster::start();
    let pool = pool(&cluster);
    let map = slot_map(&cluster);
    let slot = key_slot(b"mig");
    let from = owner(&map, slot);
    let to = (from + 1) % 3;
    let keys: Arc<Vec<String>> = Arc::new((0..40).map(|i| format!("{{mig}}:{i}")).collect());
    let elsewhere = keys_on(&map, (from + 2) % 3, 1, "other")[0].clone();
    for key in keys.iter() {
        assert_eq!(int(&run(&pool, vec![cmd(&["INCR", key])]).unwrap()[0]), 1);
    }

    // Waves of 16 jobs on distinct keys, each INCR then GET of one key (and an INCR on
    // another master), until told to stop: every key's INCRs must answer 2, 3, 4... with
    // the GET equal, whatever node ran them.
    let stop = Arc::new(AtomicBool::new(false));
    let answered = Arc::new(AtomicUsize::new(0));
    let sender = {
        let (pool, keys, stop, answered) = (pool.clone(), keys.clone(), stop.clone(), answered.clone());
        thread::spawn(move || {
            let mut last = vec![1i64; keys.len()];
            let mut i = 0;
            let deadline = Instant::now() + Duration::from_secs(60);
            while !stop.load(Ordering::Relaxed) {
                assert!(Instant::now() < deadline, "the migration test never stopped the sender");
                let wave: Vec<_> = (0..16)
                    .map(|_| {
                        let k = i % keys.len();
                        i += 1;
                        let cmds = vec![
                            cmd(&["INCR", &keys[k]]),
                            cmd(&["GET", &keys[k]]),
                            cmd(&["INCR", &elsewhere]),
                        ];
                        (k, pool.submit(cmds).unwrap())
                    })
                    .collect();
                for (k, rx) in wave {
                    let values =
                        rx.recv_timeout(CALL_TIMEOUT).unwrap().unwrap_or_else(|e| panic!("{}: {e}", keys[k]));
                    let (incr, get) = (int(&values[0]), int(&values[1]));
                    assert_eq!((incr, get), (last[k] + 1, last[k] + 1), "{}", keys[k]);
                    last[k] = incr;
                    answered.fetch_add(1, Ordering::Relaxed);
                }
            }
            last
        })
    };
    let answered_now = || answered.load(Ordering::Relaxed);
    poll_until("jobs before the migration", || answered_now() > 50);

    let (from_id, to_id) = (cluster.id(from), cluster.id(to));
    let s = slot.to_string();
    assert_eq!(cluster.cli_at(to, &["CLUSTER", "SETSLOT", &s, "IMPORTING", &from_id]).trim(), "OK");
    assert_eq!(cluster.cli_at(from, &["CLUSTER", "SETSLOT", &s, "MIGRATING", &to_id]).trim(), "OK");
    let to_port = cluster.port(to).to_string();
    let mut chunks = 0;
    loop {
        let listed = cluster.cli_at(from, &["CLUSTER", "GETKEYSINSLOT", &s, "5"]);
        let chunk: Vec<&str> = listed.lines().map(str::trim).filter(|k| !k.is_empty()).collect();
        if chunk.is_empty() {
            break;
        }
        let mut args = vec!["MIGRATE", "127.0.0.1", &to_port, "", "0", "5000", "KEYS"];
        args.extend(chunk.iter().copied());
        assert_eq!(cluster.cli_at(from, &args).trim(), "OK");
        chunks += 1;
        if chunks == 1 {
            // Some keys moved, the slot still the source's: jobs on them meet ASK.
            poll_until("an ASK followed", || pool.stats().redirects > 0);
        }
    }
    assert!(chunks >= 8, "40 keys moved 5 at a time");
    let asked = pool.stats().redirects;
    let during = answered_now();
    // The slot is the target's: the target first, then the source, then the third.
    for node in [to, from, (from + 2) % 3] {
        assert_eq!(cluster.cli_at(node, &["CLUSTER", "SETSLOT", &s, "NODE", &to_id]).trim(), "OK");
    }
    poll_until("a MOVED followed", || pool.stats().redirects > asked);
    let moved = pool.stats().redirects;
    poll_until("jobs after the move", || answered_now() > during + 200);
    stop.store(true, Ordering::Relaxed);
    let last = sender.join().expect("the sender saw every job answered right");

    // Every answered INCR is in the data, once.
    for (key, count) in keys.iter().zip(&last) {
        assert_eq!(cluster.cli_at(to, &["GET", key]).trim(), count.to_string(), "{key}");
    }
    assert_eq!(cluster.cli_at(from, &["CLUSTER", "COUNTKEYSINSLOT", &s]).trim(), "0");
    // The map was read again: later jobs go straight to the new master.
    let stats = pool.stats();
    for key in keys.iter().take(10) {
        run(&pool, vec![cmd(&["INCR", key])]).unwrap();
    }
    assert!(
        pool.stats().redirects - stats.redirects <= 2,
        "redirections go on after the move: {stats:?} then {:?}",
        pool.stats()
    );
    assert!(moved > asked);
    assert_eq!(owner(&slot_map(&cluster), slot), to);
}

#[test]
fn a_killed_master_fails_its_slots_only() {
    let mut cluster = RedisCluster::start();
    let options = PoolOptions { connect_timeout: Duration::from_millis(500), ..PoolOptions::default() };
    let pool = RedisPool::start(&cluster.url(), options).expect("start the pool");
    let map = slot_map(&cluster);
    let keys: Vec<String> = (0..3).map(|n| keys_on(&map, n, 1, "km")[0].clone()).collect();
    for key in &keys {
        run(&pool, vec![cmd(&["INCR", key])]).unwrap();
    }
    poll_until("is_up", || pool.is_up());

    cluster.kill_master(2);
    // Through the cluster's own failure detection (node timeout 2 s) and past it.
    let until = Instant::now() + Duration::from_secs(4);
    let mut rounds = 0;
    while Instant::now() < until {
        let started = Instant::now();
        let rxs: Vec<_> = keys.iter().map(|k| pool.submit(vec![cmd(&["INCR", k])]).unwrap()).collect();
        let answers: Vec<Answer> = rxs.into_iter().map(|rx| rx.recv_timeout(CALL_TIMEOUT).unwrap()).collect();
        assert!(started.elapsed() < Duration::from_millis(2600), "took {:?}", started.elapsed());
        assert!(answers[0].is_ok() && answers[1].is_ok(), "{answers:?}");
        assert!(
            matches!(answers[2], Err(BridgeError::Unavailable(_) | BridgeError::Unknown(_))),
            "{:?}",
            answers[2]
        );
        // A job with a command on a live master and one on the dead master ran in part.
        let mixed = run(&pool, vec![cmd(&["INCR", &keys[0]]), cmd(&["INCR", &keys[2]])]);
        assert!(matches!(mixed, Err(BridgeError::Unknown(_))), "{mixed:?}");
        rounds += 1;
        thread::sleep(Duration::from_millis(20));
    }
    assert!(rounds >= 10, "{rounds} rounds");
    poll_until("is_up to turn false", || !pool.is_up());

    cluster.restart(2);
    poll_until("jobs on the restarted master", || run(&pool, vec![cmd(&["INCR", &keys[2]])]).is_ok());
    poll_until("is_up after the restart", || pool.is_up());
    for key in &keys {
        run(&pool, vec![cmd(&["INCR", key])]).unwrap();
    }
}

#[test]
fn a_database_other_than_0_is_refused() {
    let cluster = RedisCluster::start();
    let url = cluster.url().replace("/0", "/2");
    let pool = RedisPool::start(&url, PoolOptions::default()).expect("start the pool");
    let started = Instant::now();
    let answer = run(&pool, vec![cmd(&["PING"])]);
    assert!(
        matches!(&answer, Err(BridgeError::Unavailable(e)) if e.contains("only database 0")),
        "{answer:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(3), "took {:?}", started.elapsed());
    assert!(!pool.is_up());
}

#[test]
fn tryagain_is_retried_a_bounded_time_then_fails_its_job_alone() {
    let cluster = RedisCluster::start();
    let pool = pool(&cluster);
    let slot = key_slot(b"tg");
    let from = owner(&slot_map(&cluster), slot);
    let to = (from + 1) % 3;
    run(&pool, vec![cmd(&["SET", "{tg}:a", "1"]), cmd(&["SET", "{tg}:b", "2"])]).unwrap();
    let (from_id, to_id, s) = (cluster.id(from), cluster.id(to), slot.to_string());
    assert_eq!(cluster.cli_at(to, &["CLUSTER", "SETSLOT", &s, "IMPORTING", &from_id]).trim(), "OK");
    assert_eq!(cluster.cli_at(from, &["CLUSTER", "SETSLOT", &s, "MIGRATING", &to_id]).trim(), "OK");
    let to_port = cluster.port(to).to_string();
    let migrate = |key: &str| {
        let args = ["MIGRATE", "127.0.0.1", &to_port, key, "0", "5000"];
        assert_eq!(cluster.cli_at(from, &args).trim(), "OK");
    };
    migrate("{tg}:a");

    // The two keys are on two nodes for now: a command on both meets TRYAGAIN until the
    // last round, and fails alone; single keys are found (ASK for the moved one).
    let started = Instant::now();
    let both = pool.submit(vec![cmd(&["MGET", "{tg}:a", "{tg}:b"])]).unwrap();
    let one = pool.submit(vec![cmd(&["GET", "{tg}:a"]), cmd(&["GET", "{tg}:b"])]).unwrap();
    let both = both.recv_timeout(CALL_TIMEOUT).unwrap();
    assert!(matches!(&both, Err(BridgeError::Unavailable(e)) if e.contains("TRYAGAIN")), "{both:?}");
    assert!(started.elapsed() < Duration::from_secs(2), "took {:?}", started.elapsed());
    let one = one.recv_timeout(CALL_TIMEOUT).unwrap().unwrap();
    assert_eq!((text(&one[0]), text(&one[1])), ("1".to_owned(), "2".to_owned()));

    migrate("{tg}:b");
    for node in [to, from, (from + 2) % 3] {
        assert_eq!(cluster.cli_at(node, &["CLUSTER", "SETSLOT", &s, "NODE", &to_id]).trim(), "OK");
    }
    let values = run(&pool, vec![cmd(&["MGET", "{tg}:a", "{tg}:b"])]).unwrap();
    assert_eq!(
        values[0],
        Value::Array(vec![Value::BulkString(b"1".to_vec()), Value::BulkString(b"2".to_vec())])
    );
}

#[test]
fn idle_workers_ping_every_master() {
    let cluster = RedisCluster::start();
    let options = PoolOptions { ping_every: Duration::from_millis(50), ..PoolOptions::default() };
    let pool = RedisPool::start(&cluster.url(), options).expect("start the pool");
    poll_until("is_up", || pool.is_up());
    let pings = |node: usize| -> u64 {
        let info = cluster.cli_at(node, &["INFO", "commandstats"]);
        info.lines()
            .find_map(|l| l.strip_prefix("cmdstat_ping:calls="))
            .and_then(|rest| rest.split(',').next())
            .map_or(0, |n| n.parse().unwrap())
    };
    let before: Vec<u64> = (0..3).map(pings).collect();
    poll_until("pings on every master", || (0..3).all(|n| pings(n) >= before[n] + 10));
    assert!(pool.is_up());
}
