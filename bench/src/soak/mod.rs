//! The `soak` scenario: three ringpush nodes and a `redis-server` on loopback for a set
//! time under connection churn, misbehaving clients and faults, then a strict account.
//!
//! # Method
//!
//! - **Cluster.** A durable `redis-server` (append-only file, fsync on every write, so a
//!   restart keeps what was acknowledged) and three nodes (one shard each, fixed ports so a
//!   restarted node comes back where its clients expect it), each logging to its own file.
//! - **Conversations of mixed sizes**: pairs, groups of 10, groups of 50 (spread over the
//!   users by stride), and one of everyone. Each user has `--devices` devices; device `i`
//!   lives on node `i % 3`, so every conversation spans the nodes.
//! - **Devices** ([`device`]): one thread each. They send (one at a time, retrying with the
//!   same `cid` after `unavailable` or a reconnect), check every `msg` against
//!   PROTOCOL.md's order promises, follow `gap`s with `sync`, and churn: they leave after
//!   a random time (politely, or vanishing without a close, some with a TCP reset) and come
//!   back a few seconds later with `sync`. While their node is down they use another one.
//! - **Rogues** ([`rogue`]): garbage instead of an upgrade, 1 GiB frames, unmasked frames,
//!   sockets that never read, upgrades trickled a byte at a time; each answer is checked.
//! - **Faults**, spaced evenly over the run: node 3 killed (SIGKILL) and restarted, node 2
//!   paused with SIGSTOP past its lease, node 3 drained (SIGTERM) and restarted, and
//!   redis-server restarted once, half-way.
//!
//! # The account at the end
//!
//! Sends stop; every device goes home, syncs everything and must hold every conversation
//! up to the highest seq acknowledged to any sender (0 lost), having seen no seq twice
//! (0 duplicated) and no hole no `gap` announced (0 out of order). Then, at the connection
//! counts of the start: the RSS of the two nodes never restarted within 10% of theirs at
//! the start; then with every client gone, each node's open files back to their count
//! before any client came; and no panic in any node's log.

pub(crate) mod conn;
pub(crate) mod device;
mod rogue;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::error::Error;
use crate::redis::{free_port, Redis};
use crate::server::{Server, ServerSetup, API_KEY};

/// Nodes in the soak's cluster.
const NODES: usize = 3;

/// How long a paused node stays stopped: past its 3 s lease.
const PAUSE: Duration = Duration::from_secs(5);

/// Reports (order violations, unexpected answers) printed in full; the rest are counted.
const MAX_REPORTS: u64 = 50;

/// The memory check: RSS at the end within this fraction of the start.
const RSS_TOLERANCE: f64 = 0.10;

/// Soak the cluster: churn, misbehaving clients, node and Redis faults; then check that
/// nothing acknowledged was lost, duplicated or reordered, and that nothing leaked.
#[derive(Debug, Clone, clap::Args)]
pub struct SoakArgs {
    /// Seconds of churn, rogues and faults (CI: 120; by hand: 3600).
    #[arg(long, default_value_t = 120)]
    pub duration: u64,
    /// Users.
    #[arg(long, default_value_t = 200)]
    pub users: usize,
    /// Devices (connections) per user.
    #[arg(long, default_value_t = 2)]
    pub devices: usize,
    /// Sends per second over all devices.
    #[arg(long, default_value_t = 50)]
    pub sends_per_sec: u32,
    /// Mean seconds a device stays connected before it leaves for a few seconds.
    #[arg(long, default_value_t = 30)]
    pub session_secs: u64,
    /// Misbehaving client threads.
    #[arg(long, default_value_t = 3)]
    pub rogues: usize,
    /// The ringpush binary.
    #[arg(long, value_name = "PATH", default_value = "target/release/ringpush")]
    pub server_bin: PathBuf,
    /// The redis-server binary.
    #[arg(long, value_name = "PATH", default_value = "redis-server")]
    pub redis_server: PathBuf,
    /// Keep the nodes' logs in this directory (default: a temporary one, removed after a
    /// passing run and kept after a failing one).
    #[arg(long, value_name = "DIR")]
    pub logs: Option<PathBuf>,
}

/// Where the run is; devices and rogues follow it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
pub enum Phase {
    /// Everyone connected; sends, no churn yet.
    Warmup,
    /// A pause in the run for the memory baseline: no churn, no rogues, every device home.
    Gather,
    /// Sends, churn, rogues and faults.
    Run,
    /// No new sends; pending ones get their acks.
    Quiesce,
    /// Every device home, synced, checked.
    Settle,
    /// Devices close and their threads end.
    Leave,
}

/// One conversation of the plan.
#[derive(Debug, Clone)]
pub struct ConvSpec {
    pub name: String,
    pub members: Vec<String>,
    /// How likely a member is to pick it for a send.
    pub weight: u32,
}

/// Who is in which conversation.
#[derive(Debug)]
pub struct Plan {
    pub convs: Vec<ConvSpec>,
    /// Per user, its conversations (indices into `convs`).
    pub user_convs: Vec<Vec<u32>>,
    /// Extra members of the conversation of everyone, for the never-reading rogues.
    pub lurkers: usize,
}

pub fn user_name(user: usize) -> String {
    format!("soak-u{user}")
}

pub fn lurker_name(lurker: usize) -> String {
    format!("soak-lurker-{lurker}")
}

impl Plan {
    pub fn new(users: usize, lurkers: usize) -> Plan {
        let mut convs = Vec::new();
        let mut user_convs = vec![Vec::new(); users];
        let mut add = |name: String, members: Vec<usize>, weight: u32, extra: Vec<String>| {
            let index = convs.len() as u32;
            for &u in &members {
                user_convs[u].push(index);
            }
            let mut names: Vec<String> = members.into_iter().map(user_name).collect();
            names.extend(extra);
            convs.push(ConvSpec { name, members: names, weight });
        };
        for k in 0..users.div_ceil(2) {
            add(format!("soak-pair-{k}"), (2 * k..(2 * k + 2).min(users)).collect(), 4, Vec::new());
        }
        for k in 0..users.div_ceil(10) {
            add(format!("soak-ten-{k}"), (10 * k..(10 * k + 10).min(users)).collect(), 3, Vec::new());
        }
        let fifties = (users / 50).max(1);
        for k in 0..fifties {
            add(format!("soak-fifty-{k}"), (0..users).filter(|u| u % fifties == k).collect(), 2, Vec::new());
        }
        add("soak-all".into(), (0..users).collect(), 1, (0..lurkers).map(lurker_name).collect());
        Plan { convs, user_convs, lurkers }
    }
}

/// What devices and rogues count.
#[derive(Debug, Default)]
pub struct Stats {
    pub sends: AtomicU64,
    pub acked: AtomicU64,
    pub unavailable: AtomicU64,
    pub delivered: AtomicU64,
    pub lost: AtomicU64,
    pub duplicated: AtomicU64,
    pub out_of_order: AtomicU64,
    pub incomplete: AtomicU64,
    pub gaps: AtomicU64,
    pub syncs: AtomicU64,
    pub unexpected: AtomicU64,
    pub reconnects: AtomicU64,
    pub lost_connections: AtomicU64,
    pub abrupt_ends: AtomicU64,
    pub vanished: AtomicU64,
    pub left_politely: AtomicU64,
    pub refused: AtomicU64,
    pub bad_handshakes: AtomicU64,
    pub connect_failures: AtomicU64,
    /// Devices past their first full sync; quiet (nothing pending) in Quiesce; checked in
    /// Settle; gone in Leave.
    pub ready: AtomicU64,
    pub quiet: AtomicU64,
    pub settled: AtomicU64,
    pub left: AtomicU64,
    pub rogue_attempts: [AtomicU64; rogue::KINDS.len()],
    pub rogue_unexpected: AtomicU64,
    pub rogue_disturbed: AtomicU64,
    /// Close codes servers sent to devices.
    pub closes: Mutex<BTreeMap<u16, u64>>,
}

/// What the soak's threads share.
pub struct Shared {
    phase: AtomicU8,
    pub nodes: Vec<std::net::SocketAddr>,
    /// Nodes stopped or restarting right now (rogues pick others).
    pub down: Vec<AtomicBool>,
    /// Changes at the start and end of every fault.
    pub fault_epoch: AtomicU64,
    pub stop_rogues: AtomicBool,
    /// Rogues wait (and cut their attempts short) while this is set.
    pub hold_rogues: AtomicBool,
    /// Rogue attempts under way.
    pub rogues_busy: AtomicU64,
    pub secret: String,
    pub plan: Plan,
    /// Per conversation, the highest seq acknowledged to any sender.
    pub acked: Vec<AtomicU64>,
    pub send_interval: Duration,
    pub session: Duration,
    pub stats: Stats,
    reports: AtomicU64,
    started: Instant,
}

impl Shared {
    pub fn phase(&self) -> Phase {
        match self.phase.load(Relaxed) {
            0 => Phase::Warmup,
            1 => Phase::Gather,
            2 => Phase::Run,
            3 => Phase::Quiesce,
            4 => Phase::Settle,
            _ => Phase::Leave,
        }
    }

    fn set_phase(&self, phase: Phase) {
        self.phase.store(phase as u8, Relaxed);
    }

    /// Prints something that went wrong (the first [`MAX_REPORTS`]).
    pub fn report(&self, what: String) {
        if self.reports.fetch_add(1, Relaxed) < MAX_REPORTS {
            eprintln!("  [{:7.1}s] {what}", self.started.elapsed().as_secs_f64());
        }
    }

    pub fn count_close(&self, code: Option<u16>) {
        let mut closes = self.stats.closes.lock().unwrap_or_else(|e| e.into_inner());
        *closes.entry(code.unwrap_or(1005)).or_default() += 1;
    }

    fn log(&self, what: impl std::fmt::Display) {
        eprintln!("[{:7.1}s] {what}", self.started.elapsed().as_secs_f64());
    }
}

/// A fault of the schedule.
#[derive(Debug, Clone, Copy)]
enum Fault {
    /// SIGKILL node 3 and start it again.
    Kill,
    /// SIGTERM node 3 (it drains) and start it again.
    Drain,
    /// SIGSTOP node 2 for [`PAUSE`], then SIGCONT.
    Pause,
    /// Restart redis-server.
    Redis,
    /// Not a fault: the memory baseline (see [`baseline`]).
    Baseline,
}

/// The faults of a run of `duration`, by offset from the start of the run phase: node
/// faults every `duration / 5` (20 s to 120 s apart), and Redis once, half-way.
fn schedule(duration: Duration) -> Vec<(Duration, Fault)> {
    let every = (duration / 5).clamp(Duration::from_secs(20), Duration::from_secs(120));
    let cycle = [Fault::Kill, Fault::Pause, Fault::Drain, Fault::Pause];
    let mut plan = Vec::new();
    let mut at = every;
    let mut i = 0;
    while at + Duration::from_secs(10) < duration {
        plan.push((at, cycle[i % cycle.len()]));
        at += every;
        i += 1;
    }
    plan.push((duration / 2 + every / 4, Fault::Redis));
    // Between faults, after the warm-up (the timer wheel's first rotation, the queues'
    // and tables' high-water marks).
    let k = (duration / 4).as_millis() / every.as_millis().max(1);
    plan.push((every * (2 * k as u32 + 1) / 2, Fault::Baseline));
    plan.sort_by_key(|(at, _)| *at);
    plan
}

/// The nodes of the run, started and restarted in place.
struct Cluster {
    bin: PathBuf,
    setups: Vec<ServerSetup>,
    nodes: Vec<Server>,
}

impl Cluster {
    fn restart(&mut self, node: usize, graceful: bool) -> Result<Duration, Error> {
        let t = Instant::now();
        self.nodes[node].stop(graceful);
        self.nodes[node] = Server::start(&self.bin, &self.setups[node])?;
        Ok(t.elapsed())
    }

    fn heap_in_use(&self) -> Result<Vec<u64>, Error> {
        let heap = |n: &Server| n.metrics().map(|m| m.map_or(0, |m| m.sum("ringpush_heap_in_use_bytes")));
        self.nodes.iter().map(heap).collect()
    }

    fn connections(&self, node: usize) -> Result<u64, Error> {
        Ok(self.nodes[node].metrics()?.map_or(0, |m| m.sum("ringpush_connections")))
    }

    /// Waits until every node serves `want(node)` connections.
    fn wait_connections(
        &self,
        what: &str,
        want: impl Fn(usize) -> u64,
        limit: Duration,
    ) -> Result<(), Error> {
        let deadline = Instant::now() + limit;
        loop {
            let have: Vec<u64> = (0..NODES).map(|n| self.connections(n)).collect::<Result<_, _>>()?;
            if (0..NODES).all(|n| have[n] == want(n)) {
                return Ok(());
            }
            if Instant::now() > deadline {
                let want: Vec<u64> = (0..NODES).map(want).collect();
                return Err(Error::Server(format!("{what}: nodes serve {have:?} connections, not {want:?}")));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn open_files(pid: u32) -> Result<u64, Error> {
    let dir = format!("/proc/{pid}/fd");
    std::fs::read_dir(&dir).map(|d| d.count() as u64).map_err(|e| Error::io(format!("read {dir}"), e))
}

pub fn run(args: SoakArgs) -> Result<(), Error> {
    if args.users < 2 || args.devices == 0 || args.sends_per_sec == 0 || args.duration < 30 {
        return Err(Error::Usage(
            "soak needs --users >= 2, --devices >= 1, --sends-per-sec >= 1, --duration >= 30".into(),
        ));
    }
    let devices = args.users * args.devices;
    let (logs, keep_logs) = match &args.logs {
        Some(dir) => (dir.clone(), true),
        None => (std::env::temp_dir().join(format!("ringpush-soak-{}", std::process::id())), false),
    };
    std::fs::create_dir_all(&logs).map_err(|e| Error::io(format!("create {}", logs.display()), e))?;

    let mut redis = Redis::start(&args.redis_server, None, true)?;
    let secret = "ringpush-soak-secret".to_string();
    let mut setups = Vec::new();
    for i in 0..NODES {
        let bus = free_port()?;
        setups.push(ServerSetup {
            secret: secret.clone(),
            ping_interval_ms: 5_000,
            idle_timeout_ms: 15_000,
            echo: false,
            max_message_bytes: 64 * 1024,
            send_rate_per_sec: Some(1000),
            signal_rate_per_sec: None,
            outbound_queue_bytes: None,
            cpu: None,
            log: Some(logs.join(format!("node{}.log", i + 1))),
            node_id: format!("soak-n{}", i + 1),
            extra_toml: format!(
                "\n[redis]\nurl = \"redis://127.0.0.1:{}/0\"\n\n[cluster]\npub_listen = \"tcp://127.0.0.1:{bus}\"\n\
                 advertise = \"tcp://127.0.0.1:{bus}\"\n\n[history]\nmax_per_conv = 100000\n",
                redis.port
            ),
            extra_limits: String::new(),
            ports: (free_port()?, free_port()?),
        });
    }
    let mut cluster = Cluster { bin: args.server_bin.clone(), nodes: Vec::new(), setups };
    for setup in &cluster.setups {
        cluster.nodes.push(Server::start(&cluster.bin, setup)?);
    }
    wait_peers(&cluster)?;
    let fds_before: Vec<u64> = cluster.nodes.iter().map(|n| open_files(n.pid)).collect::<Result<_, _>>()?;
    let rss_base: Vec<u64> =
        cluster.nodes.iter().map(|n| n.status().map(|s| s.vm_rss)).collect::<Result<_, _>>()?;

    let plan = Plan::new(args.users, args.rogues.max(1));
    for conv in &plan.convs {
        cluster.nodes[0].set_members(API_KEY, &conv.name, &conv.members, 1000)?;
    }
    let shared = Shared {
        phase: AtomicU8::new(Phase::Warmup as u8),
        nodes: cluster.nodes.iter().map(|n| n.client).collect(),
        down: (0..NODES).map(|_| AtomicBool::new(false)).collect(),
        fault_epoch: AtomicU64::new(0),
        stop_rogues: AtomicBool::new(false),
        hold_rogues: AtomicBool::new(false),
        rogues_busy: AtomicU64::new(0),
        secret,
        acked: plan.convs.iter().map(|_| AtomicU64::new(0)).collect(),
        plan,
        send_interval: Duration::from_micros(devices as u64 * 1_000_000 / args.sends_per_sec as u64),
        session: Duration::from_secs(args.session_secs.max(1)),
        stats: Stats::default(),
        reports: AtomicU64::new(0),
        started: Instant::now(),
    };
    shared.log(format!(
        "soak: {NODES} nodes and redis-server (durable) up; {} users x {} devices, {} conversations, {} sends/s, \
         {} rogues, {} s; logs in {}",
        args.users,
        args.devices,
        shared.plan.convs.len(),
        args.sends_per_sec,
        args.rogues,
        args.duration,
        logs.display()
    ));

    let outcome = std::thread::scope(|scope| {
        for index in 0..devices {
            let spec = device::DeviceSpec { index, user: index / args.devices, home: index % NODES };
            let shared = &shared;
            std::thread::Builder::new()
                .name(format!("device-{index}"))
                .stack_size(256 * 1024)
                .spawn_scoped(scope, move || device::run(spec, shared))
                .map_err(|e| Error::io("spawn a device thread", e))?;
        }
        let before = Before { fds: fds_before, rss: rss_base };
        let result = drive(&args, &shared, &mut cluster, &mut redis, before, devices as u64, scope);
        shared.stop_rogues.store(true, Relaxed);
        shared.set_phase(Phase::Leave);
        result
    });
    let panics = panics_in_logs(&logs, NODES)?;
    let verdict = outcome.and_then(|account| account.verdict(&shared, panics));
    drop(cluster);
    if verdict.is_ok() && !keep_logs {
        let _ = std::fs::remove_dir_all(&logs);
    } else {
        eprintln!("soak: the nodes' logs are in {}", logs.display());
    }
    verdict
}

/// Waits until each node follows the other two.
fn wait_peers(cluster: &Cluster) -> Result<(), Error> {
    let deadline = Instant::now() + Duration::from_secs(15);
    for node in &cluster.nodes {
        loop {
            let peers = node.metrics()?.map_or(0, |m| m.sum("ringpush_cluster_peers"));
            if peers + 1 >= NODES as u64 {
                break;
            }
            if Instant::now() > deadline {
                return Err(Error::Server(format!("a node sees {peers} of {} peers", NODES - 1)));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    Ok(())
}

/// Each node's memory at one moment: RSS, and `ringpush_heap_in_use_bytes` (malloc's
/// live bytes: what the program holds, apart from what the allocator keeps).
struct Snapshot {
    rss: Vec<u64>,
    heap: Vec<u64>,
}

impl Snapshot {
    fn take(cluster: &Cluster) -> Result<Snapshot, Error> {
        let rss = cluster.nodes.iter().map(|n| n.status().map(|s| s.vm_rss)).collect::<Result<_, _>>()?;
        Ok(Snapshot { rss, heap: cluster.heap_in_use()? })
    }

    fn kib(&self) -> String {
        let each: Vec<String> =
            self.rss.iter().zip(&self.heap).map(|(r, h)| format!("{}/{}", r / 1024, h / 1024)).collect();
        each.join(" ")
    }
}

/// The memory baseline, part-way through the run: rogues held, churn stopped, every
/// device home, so each node serves the connections it served at the start; then the
/// run goes on. Taken after the warm-up (the timer wheel's first rotation, the queues'
/// and tables' high-water marks), so that the end is compared with a node that holds
/// what a running node holds, and growth past it is a leak.
fn gather(shared: &Shared, cluster: &Cluster, conns: &[u64]) -> Result<Snapshot, Error> {
    shared.hold_rogues.store(true, Relaxed);
    wait_for("rogue attempts to end", &shared.rogues_busy, |busy| busy == 0, Duration::from_secs(30))?;
    shared.set_phase(Phase::Gather);
    let gathered = cluster.wait_connections(
        "every device home for the memory baseline",
        |n| conns[n],
        Duration::from_secs(60),
    );
    let snapshot = gathered.and_then(|()| Snapshot::take(cluster));
    shared.set_phase(Phase::Run);
    shared.hold_rogues.store(false, Relaxed);
    let snapshot = snapshot?;
    shared.log(format!("memory baseline after the warm-up: RSS/heap KiB {}", snapshot.kib()));
    Ok(snapshot)
}

/// Each node before any client came: open files and RSS.
struct Before {
    fds: Vec<u64>,
    rss: Vec<u64>,
}

/// What the end of the run measured besides the devices' counts.
struct Account {
    rss_base: Vec<u64>,
    /// Every device connected, before churn.
    first: Snapshot,
    /// The same connections after the warm-up ([`gather`]): what the end is judged against.
    warm: Snapshot,
    /// The same connections at the end.
    end: Snapshot,
    conns: Vec<u64>,
    fds_before: Vec<u64>,
    fds_after: Vec<u64>,
    faults: Vec<String>,
    elapsed: Duration,
}

/// Every phase of the run, with the devices' threads running.
fn drive<'s>(
    args: &SoakArgs,
    shared: &'s Shared,
    cluster: &mut Cluster,
    redis: &mut Redis,
    before: Before,
    devices: u64,
    scope: &'s std::thread::Scope<'s, '_>,
) -> Result<Account, Error> {
    let stats = &shared.stats;
    wait_count("devices connected and synced", &stats.ready, devices, Duration::from_secs(120))?;
    shared.log(format!("all {devices} devices connected and synced; warming up"));
    std::thread::sleep(Duration::from_secs(5));
    let conns: Vec<u64> = (0..NODES).map(|n| cluster.connections(n)).collect::<Result<_, _>>()?;
    let first = Snapshot::take(cluster)?;
    shared.log(format!("start: connections per node {conns:?}, RSS/heap KiB {}", first.kib()));

    shared.set_phase(Phase::Run);
    let mut rogues = Vec::new();
    for id in 0..args.rogues {
        let handle = std::thread::Builder::new()
            .name(format!("rogue-{id}"))
            .spawn_scoped(scope, move || rogue::run(id, shared))
            .map_err(|e| Error::io("spawn a rogue thread", e))?;
        rogues.push(handle);
    }
    let run_start = Instant::now();
    let duration = Duration::from_secs(args.duration);
    let mut faults = Vec::new();
    let mut baseline = None;
    let mut next_progress = Duration::from_secs(10);
    for (at, fault) in schedule(duration) {
        while run_start.elapsed() < at {
            std::thread::sleep(Duration::from_millis(100));
            if run_start.elapsed() >= next_progress {
                progress(shared, cluster);
                next_progress += Duration::from_secs(if args.duration > 600 { 60 } else { 10 });
            }
        }
        match fault {
            Fault::Baseline => baseline = Some(gather(shared, cluster, &conns)?),
            fault => faults.push(inject(fault, shared, cluster, redis)?),
        }
    }
    while run_start.elapsed() < duration {
        std::thread::sleep(Duration::from_millis(100));
    }
    progress(shared, cluster);

    shared.stop_rogues.store(true, Relaxed);
    for handle in rogues {
        let _ = handle.join();
    }
    shared.set_phase(Phase::Quiesce);
    shared.log("sends stopped; waiting for the last acks");
    wait_count("devices with no send pending", &stats.quiet, devices, Duration::from_secs(60))?;
    shared.set_phase(Phase::Settle);
    shared.log("every device home and syncing for the final check");
    wait_count("devices checked", &stats.settled, devices, Duration::from_secs(120))?;
    cluster.wait_connections(
        "back at the start's connection counts",
        |n| conns[n],
        Duration::from_secs(30),
    )?;
    let end = Snapshot::take(cluster)?;

    shared.set_phase(Phase::Leave);
    wait_count("devices gone", &stats.left, devices, Duration::from_secs(60))?;
    cluster.wait_connections("every client gone", |_| 0, Duration::from_secs(30))?;
    // A client's socket is closed a moment after the connection gauge drops.
    let deadline = Instant::now() + Duration::from_secs(10);
    let fds_after = loop {
        let now: Vec<u64> = cluster.nodes.iter().map(|n| open_files(n.pid)).collect::<Result<_, _>>()?;
        if now.iter().zip(&before.fds).all(|(a, b)| a <= b) || Instant::now() > deadline {
            break now;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    Ok(Account {
        rss_base: before.rss,
        first,
        warm: baseline.ok_or_else(|| Error::Usage("the run ended before its memory baseline".into()))?,
        end,
        conns,
        fds_before: before.fds,
        fds_after,
        faults,
        elapsed: shared.started.elapsed(),
    })
}

fn wait_count(what: &str, counter: &AtomicU64, want: u64, limit: Duration) -> Result<(), Error> {
    wait_for(what, counter, |v| v >= want, limit)
}

/// Waits until `done(counter)` holds, for at most `limit`.
fn wait_for(
    what: &str,
    counter: &AtomicU64,
    done: impl Fn(u64) -> bool,
    limit: Duration,
) -> Result<(), Error> {
    let deadline = Instant::now() + limit;
    while !done(counter.load(Relaxed)) {
        if Instant::now() > deadline {
            return Err(Error::Timeout {
                what: format!("{what} (at {})", counter.load(Relaxed)),
                secs: limit.as_secs(),
            });
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

fn progress(shared: &Shared, cluster: &Cluster) {
    let s = &shared.stats;
    // The nodes' memory as it goes (KiB): RSS, and malloc's live bytes.
    let memory: Vec<String> = cluster
        .nodes
        .iter()
        .map(|n| {
            let rss = n.status().map_or(0, |s| s.vm_rss / 1024);
            let heap = n.metrics().ok().flatten().map_or(0, |m| m.sum("ringpush_heap_in_use_bytes") / 1024);
            format!("{rss}/{heap}")
        })
        .collect();
    shared.log(format!(
        "acked {} delivered {} | reconnects {} gaps {} syncs {} unavailable {} | lost {} duplicated {} out of order {} \
         | RSS/heap KiB {}",
        s.acked.load(Relaxed),
        s.delivered.load(Relaxed),
        s.reconnects.load(Relaxed),
        s.gaps.load(Relaxed),
        s.syncs.load(Relaxed),
        s.unavailable.load(Relaxed),
        s.lost.load(Relaxed),
        s.duplicated.load(Relaxed),
        s.out_of_order.load(Relaxed),
        memory.join(" "),
    ));
}

/// Does `fault` and says what it did.
fn inject(fault: Fault, shared: &Shared, cluster: &mut Cluster, redis: &mut Redis) -> Result<String, Error> {
    shared.fault_epoch.fetch_add(1, Relaxed);
    let what = match fault {
        Fault::Kill | Fault::Drain => {
            let graceful = matches!(fault, Fault::Drain);
            shared.down[2].store(true, Relaxed);
            let took = cluster.restart(2, graceful)?;
            shared.down[2].store(false, Relaxed);
            format!(
                "node 3 {} and restarted, ready in {:.1} s",
                if graceful { "drained" } else { "killed" },
                took.as_secs_f64()
            )
        }
        Fault::Pause => {
            shared.down[1].store(true, Relaxed);
            cluster.nodes[1].signal(libc::SIGSTOP)?;
            std::thread::sleep(PAUSE);
            cluster.nodes[1].signal(libc::SIGCONT)?;
            shared.down[1].store(false, Relaxed);
            format!("node 2 paused (SIGSTOP) for {} s", PAUSE.as_secs())
        }
        // `drive` takes it with `gather`; nothing to inject.
        Fault::Baseline => "memory baseline".to_string(),
        Fault::Redis => {
            let t = Instant::now();
            redis.restart()?;
            format!("redis-server restarted in {:.1} s", t.elapsed().as_secs_f64())
        }
    };
    shared.fault_epoch.fetch_add(1, Relaxed);
    shared.log(&what);
    Ok(what)
}

/// Lines of the nodes' logs that tell of a panic.
fn panics_in_logs(dir: &std::path::Path, nodes: usize) -> Result<u64, Error> {
    let mut found = 0;
    for i in 1..=nodes {
        let path = dir.join(format!("node{i}.log"));
        let text =
            std::fs::read_to_string(&path).map_err(|e| Error::io(format!("read {}", path.display()), e))?;
        for line in text.lines().filter(|l| l.contains("panicked")) {
            found += 1;
            eprintln!("soak: node {i}: {line}");
        }
    }
    Ok(found)
}

impl Account {
    /// Prints the summary and fails the run if any check failed.
    fn verdict(&self, shared: &Shared, panics: u64) -> Result<(), Error> {
        let s = &shared.stats;
        let get = |c: &AtomicU64| c.load(Relaxed);
        let mut failed = Vec::new();
        for (name, value) in [
            ("lost", get(&s.lost)),
            ("duplicated", get(&s.duplicated)),
            ("out of order", get(&s.out_of_order)),
            ("incomplete syncs", get(&s.incomplete)),
            ("unexpected frames", get(&s.unexpected)),
            ("bad handshakes", get(&s.bad_handshakes)),
            ("unexpected rogue answers", get(&s.rogue_unexpected)),
            ("panics", panics),
        ] {
            if value > 0 {
                failed.push(format!("{value} {name}"));
            }
        }
        let mut rss = Vec::new();
        for n in 0..NODES {
            let (a, b) = (self.warm.rss[n], self.end.rss[n]);
            let change = (b as f64 - a as f64) / a.max(1) as f64;
            // What the clients cost: RSS over the node's own before any came, per connection.
            let per_conn = |r: u64| r.saturating_sub(self.rss_base[n]) / self.conns[n].max(1);
            rss.push(format!(
                "node {} {} KiB at the start, {}->{} KiB from the warm-up to the end ({:+.1}%, {}->{} B/conn over \
                 the node's own at {} conns; heap in use {}->{} KiB{})",
                n + 1,
                self.first.rss[n] / 1024,
                a / 1024,
                b / 1024,
                100.0 * change,
                per_conn(a),
                per_conn(b),
                self.conns[n],
                self.warm.heap[n] / 1024,
                self.end.heap[n] / 1024,
                if n == 2 { ", restarted: not judged" } else { "" }
            ));
            // Node 3 is restarted, so its baseline is not comparable.
            if n < 2 && change.abs() > RSS_TOLERANCE {
                failed.push(format!("node {} RSS changed {:+.1}%", n + 1, 100.0 * change));
            }
        }
        let mut fds = Vec::new();
        for n in 0..NODES {
            fds.push(format!("node {} {}->{}", n + 1, self.fds_before[n], self.fds_after[n]));
            if self.fds_after[n] > self.fds_before[n] {
                failed.push(format!(
                    "node {} holds {} more open files",
                    n + 1,
                    self.fds_after[n] - self.fds_before[n]
                ));
            }
        }
        let closes = s.closes.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let rogue: Vec<String> = rogue::KINDS
            .iter()
            .map(|k| format!("{} {}", get(&s.rogue_attempts[*k as usize]), k.name()))
            .collect();
        eprintln!("soak: faults: {}", self.faults.join("; "));
        eprintln!(
            "soak: churn: {} reconnects ({} left politely, {} vanished, {} connections lost to faults, {} refused, \
             {} connect failures); server closes {closes:?}",
            get(&s.reconnects),
            get(&s.left_politely),
            get(&s.vanished),
            get(&s.lost_connections),
            get(&s.refused),
            get(&s.connect_failures)
        );
        eprintln!(
            "soak: rogues: {} ({} overlapped a fault, not judged), {} unexpected",
            rogue.join(", "),
            get(&s.rogue_disturbed),
            get(&s.rogue_unexpected)
        );
        eprintln!("soak: memory: {}", rss.join("; "));
        eprintln!("soak: open files before clients -> after they left: {}", fds.join("; "));
        let verdict =
            if failed.is_empty() { "PASS".to_string() } else { format!("FAIL ({})", failed.join(", ")) };
        println!(
            "soak {verdict}: {:.0} s, {NODES} nodes, {} devices; {} sends acked of {} ({} unavailable), {} delivered, \
             {} gaps, {} syncs; lost {}, out of order {}, duplicated {}; {} faults; panics {panics}",
            self.elapsed.as_secs_f64(),
            shared.stats.ready.load(Relaxed),
            get(&s.acked),
            get(&s.sends),
            get(&s.unavailable),
            get(&s.delivered),
            get(&s.gaps),
            get(&s.syncs),
            get(&s.lost),
            get(&s.out_of_order),
            get(&s.duplicated),
            self.faults.len()
        );
        if failed.is_empty() {
            Ok(())
        } else {
            Err(Error::Server(format!("soak failed: {}", failed.join(", "))))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plan_mixes_sizes_and_everyone_is_in_four_conversations() {
        let plan = Plan::new(200, 3);
        assert!(plan.user_convs.iter().all(|c| c.len() == 4));
        let sizes: Vec<usize> = plan.convs.iter().map(|c| c.members.len()).collect();
        assert!(sizes.contains(&2) && sizes.contains(&10) && sizes.contains(&50) && sizes.contains(&203));
    }

    #[test]
    fn the_ci_schedule_has_every_fault() {
        let plan = schedule(Duration::from_secs(120));
        let names: Vec<String> = plan.iter().map(|(_, f)| format!("{f:?}")).collect();
        for want in ["Kill", "Pause", "Drain", "Redis"] {
            assert!(names.iter().any(|n| n == want), "{names:?}");
        }
        assert!(plan.iter().all(|(at, _)| *at < Duration::from_secs(120)));
    }
}
