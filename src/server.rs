//! Starting and stopping the node: bind the listeners, start one shard per CPU of the
//! process's affinity mask and the control thread, and stop them in order.
//!
//! Threads: `shard-N` (one glommio executor pinned per CPU: all client traffic),
//! `control` (an unpinned glommio executor: the admin listener, the drain, and in a
//! cluster the node's lease), `signals` (blocked in `sigwait`-style reads, turns
//! SIGTERM/SIGINT into a drain), and with Redis and ZeroMQ their blocking threads
//! (`bridge`, `cluster`).

use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};
use glommio::{LocalExecutorBuilder, Placement};
use socket2::{Domain, Protocol, Socket, Type};
use tracing::{error, info, warn};

use crate::api;
use crate::bridge::{PoolOptions, RedisPool};
use crate::cluster::{Bus, BusOptions, ClusterMsg, Envelope, Topic};
use crate::config::Config;
use crate::error::Error;
use crate::ids::{shard_for, Key};
use crate::lease;
use crate::mesh::{self, Mesh, MeshEnds, ShardMsg, ShardWide};
use crate::metrics::ShardMetrics;
use crate::node::{ClusterLinks, Node};
use crate::notify::Notifier;
use crate::outbox::Outbox;
use crate::shard::{self, ShardSetup};
use crate::store::RedisStore;

/// Pending connections the kernel may hold per listener (capped by `net.core.somaxconn`).
/// glommio's own `bind` uses 1024, too few for a reconnect storm of a large fleet.
const LISTEN_BACKLOG: i32 = 65535;

/// glommio's registered-buffer pool per executor. Only file I/O uses it; TCP does not,
/// so it is kept small instead of glommio's 10 MiB default (which also needs memlock).
const IO_MEMORY: usize = 512 * 1024;

/// io_uring submission-queue depth per shard. The kernel sizes its table of armed polls
/// (one per idle socket) from it; glommio's default of 128 gives 8 buckets, and every
/// reactor turn's timer cancel then walks ~N/8 polls: at 10,000 connections that was 44%
/// of a shard's CPU. 4096 gives the kernel's maximum of 256 buckets.
const RING_DEPTH: usize = 4096;

/// Blocking Redis connections (each on its own thread, pipelining what the shards queue).
const REDIS_CONNECTIONS: usize = 2;

/// Tells `run` to drain and return. Built from signals in `main`, from a channel in tests.
pub struct Shutdown {
    rx: Receiver<()>,
}

/// The sending side of [`Shutdown::channel`].
#[derive(Clone)]
pub struct ShutdownTrigger(Sender<()>);

impl ShutdownTrigger {
    pub fn trigger(&self) {
        let _ = self.0.send(());
    }
}

impl Shutdown {
    pub fn channel() -> (ShutdownTrigger, Shutdown) {
        let (tx, rx) = crossbeam_channel::bounded(1);
        (ShutdownTrigger(tx), Shutdown { rx })
    }

    /// SIGTERM or SIGINT drains; a second one exits at once.
    pub fn from_signals() -> std::io::Result<Shutdown> {
        use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
        // SIGHUP is caught only so that it does not kill the server: there is no reload.
        let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP])?;
        let (trigger, shutdown) = Shutdown::channel();
        std::thread::Builder::new().name("signals".into()).spawn(move || {
            let mut seen = 0;
            for signal in signals.forever() {
                if signal == SIGHUP {
                    info!("SIGHUP ignored: ringpush has no reload; restart it to apply a new config");
                    continue;
                }
                seen += 1;
                if seen == 1 {
                    info!(signal, "draining");
                    trigger.trigger();
                } else {
                    warn!(signal, "second signal: exiting without finishing the drain");
                    std::process::exit(1);
                }
            }
        })?;
        Ok(shutdown)
    }

    fn wait(self) {
        let _ = self.rx.recv();
    }
}

/// Runs the node until `shutdown` fires and every shard has drained.
pub fn run(mut config: Config, shutdown: Shutdown) -> Result<(), Error> {
    config.validate()?;
    tame_allocator();
    let cpus = affinity_cpus();
    let shard_count = if config.shards == 0 { cpus.len() } else { config.shards };
    let listeners = bind_client(config.listen, shard_count)?;
    let client_addr = local_addr(&listeners[0])?;
    if config.node_id_generated {
        // "host name + client port": the port bound, when the config asked for any.
        config.node_id = crate::config::default_node_id(client_addr.port());
    }
    let admin = when_released(config.admin_listen, || std::net::TcpListener::bind(config.admin_listen))
        .map_err(|source| Error::Bind { addr: config.admin_listen, source })?;
    let admin_addr = admin.local_addr()?;
    crate::limits::report(&config, shard_count);
    let epoch = crate::clock::unix_ms();
    if config.diagnostics.demo {
        warn!(
            "diagnostics.demo is on: /demo/token hands out client tokens to anyone; \
             never enable it on a server others can reach"
        );
    }

    let redis = match &config.redis {
        Some(r) => {
            let options = PoolOptions { connections: REDIS_CONNECTIONS, ..PoolOptions::default() };
            let pool = RedisPool::start(&r.url, options)
                .map_err(|e| Error::Start { what: "redis pool".into(), reason: e.to_string() })?;
            let node_key = Key::from(config.node_id.as_str());
            Some(RedisStore::new(
                pool,
                node_key,
                epoch,
                config.history.max_per_conv,
                config.limits.dedupe_window_ms,
            ))
        }
        None => None,
    };
    let mut inbound: Vec<Option<flume::Receiver<Envelope>>> = (0..shard_count).map(|_| None).collect();
    let cluster = match &config.cluster {
        Some(c) => {
            let route = Box::new(move |env: &Envelope| match &env.msg {
                ClusterMsg::Msg { conv, .. }
                | ClusterMsg::Members { conv, .. }
                | ClusterMsg::Signal { conv, .. } => shard_for(conv, shard_count),
                // Pushes and broadcasts all pass through shard 0, which hands them to every
                // shard: one path, so a connection gets them in the order the API took them
                // on the node they came from, as it does on that node itself.
                ClusterMsg::Push { .. } | ClusterMsg::Broadcast { .. } => 0,
                ClusterMsg::Disconnect { user } | ClusterMsg::ToUser { user, .. } => {
                    shard_for(user, shard_count)
                }
            });
            let node_key = Key::from(config.node_id.as_str());
            let (bus, receivers) = Bus::start(
                BusOptions {
                    pub_listen: &c.pub_listen,
                    node: node_key,
                    epoch,
                    receivers: shard_count,
                    hwm: c.hwm,
                },
                route,
            )
            .map_err(|e| Error::Start {
                what: format!("cluster PUB on {}", c.pub_listen),
                reason: e.to_string(),
            })?;
            for (slot, rx) in inbound.iter_mut().zip(receivers) {
                *slot = Some(rx);
            }
            bus.subscribe(Topic::All);
            if !c.peers.is_empty() {
                bus.set_peers(c.peers.clone());
            }
            Some(ClusterLinks { bus, advertise: c.advertise.clone() })
        }
        None => None,
    };
    let webhooks = match &config.webhook {
        Some(w) => Some(
            Outbox::start(w, redis.clone())
                .map_err(|e| Error::Start { what: "webhook sender".into(), reason: e.to_string() })?,
        ),
        None => None,
    };
    let node = Arc::new(Node {
        webhooks,
        shard_ping_us: AtomicU64::new(0),
        store_up: AtomicBool::new(redis.is_none()),
        presence_lost: AtomicBool::new(false),
        presence_purges: AtomicU64::new(0),
        redis,
        cluster,
        epoch_tag: epoch_tag(),
        epoch,
        connections: AtomicUsize::new(0),
        ready_shards: AtomicUsize::new(0),
        shard_count,
        stopped_shards: AtomicUsize::new(0),
        draining: AtomicBool::new(false),
        node_key: Key::from(config.node_id.as_str()),
        config: Arc::new(config),
    });
    let metrics: Vec<Arc<ShardMetrics>> = (0..shard_count).map(|_| Arc::default()).collect();

    // Shards are mesh peers 0..n; the control thread is peer n.
    let mut ends = mesh::build(shard_count + 1);
    let control_ends =
        ends.pop().ok_or_else(|| Error::Start { what: "mesh".into(), reason: "empty".into() })?;
    let mut shards = Vec::with_capacity(shard_count);
    for (((id, listener), mesh), inbound) in listeners.into_iter().enumerate().zip(ends).zip(inbound) {
        let metrics = metrics[id].clone();
        let setup = ShardSetup { id, listener, mesh, node: node.clone(), metrics, inbound };
        let cpu = cpus[id % cpus.len()];
        let handle = LocalExecutorBuilder::new(Placement::Fixed(cpu))
            .name(&format!("shard-{id}"))
            .io_memory(IO_MEMORY)
            .ring_depth(RING_DEPTH)
            .spawn(move || shard::run(setup))
            .map_err(|e| Error::Start { what: format!("shard {id} on cpu {cpu}"), reason: e.to_string() })?;
        shards.push(handle);
    }
    info!(
        "listening client={client_addr} admin={admin_addr} shards={shard_count} node={}",
        node.config.node_id
    );

    let control_node = node.clone();
    let control = LocalExecutorBuilder::new(Placement::Unbound)
        .name("control")
        .io_memory(IO_MEMORY)
        .spawn(move || control(admin, control_node, metrics, control_ends, shutdown))
        .map_err(|e| Error::Start { what: "control thread".into(), reason: e.to_string() })?;

    // A shard that fails (cannot create its io_uring at start, or panics later) takes the
    // node down: its connections and the conversations it owns are gone, and the other
    // shards would wait on it. Exit, say why, and let the supervisor restart the process.
    let (done_tx, done_rx) = crossbeam_channel::unbounded();
    for (id, handle) in shards.into_iter().enumerate() {
        let done = done_tx.clone();
        std::thread::Builder::new().name(format!("join-{id}")).spawn(move || {
            let result = handle.join().map(|_| ()).map_err(|e| e.to_string());
            let _ = done.send((id, result));
        })?;
    }
    for _ in 0..shard_count {
        if let Ok((id, Err(reason))) = done_rx.recv() {
            error!(shard = id, %reason, "shard failed; exiting");
            return Err(Error::Start { what: format!("shard {id}"), reason });
        }
    }
    node.draining.store(true, Ordering::Relaxed);
    if let Err(e) = control.join() {
        return Err(Error::Start { what: "control thread".into(), reason: e.to_string() });
    }
    info!("stopped");
    Ok(())
}

/// The control thread: serves the admin listener until shutdown, then drains the shards.
async fn control(
    admin: std::net::TcpListener,
    node: Arc<Node>,
    metrics: Vec<Arc<ShardMetrics>>,
    ends: MeshEnds,
    shutdown: Shutdown,
) {
    let (mesh, receivers) = Mesh::connect(ends).await;
    // The control thread only ever receives answers to its requests.
    for (_, rx) in receivers {
        let mesh = mesh.clone();
        glommio::spawn_local(async move {
            while let Some(msg) = rx.recv().await {
                if let ShardMsg::Reply { id, reply } = msg {
                    mesh.complete(id, reply);
                }
            }
        })
        .detach();
    }
    let api = api::Admin::new(node.clone(), metrics, mesh.clone());
    let serving = glommio::spawn_local(api::serve(admin, api));
    let notifier = Rc::new(Notifier::from_env());
    let supervised = glommio::spawn_local(supervise(node.clone(), mesh.clone(), notifier.clone()));
    let upkeep = glommio::spawn_local(lease::upkeep(node.clone(), mesh.clone()));
    glommio::executor().spawn_blocking(move || shutdown.wait()).await;
    drop(supervised);
    drop(upkeep);
    notifier.notify("STOPPING=1");
    node.draining.store(true, Ordering::Relaxed);
    for shard in 0..node.shard_count {
        mesh.send(shard, ShardMsg::Shard(ShardWide::Drain));
    }
    // The admin listener keeps answering (readyz 503) until the shards have drained.
    while !all_stopped(&node) {
        glommio::timer::sleep(Duration::from_millis(20)).await;
    }
    if node.webhooks.is_some() {
        // What the sender can still deliver in a moment goes now; in a cluster the rest
        // stays in Redis for another node.
        let node = node.clone();
        glommio::executor()
            .spawn_blocking(move || {
                if let Some(outbox) = &node.webhooks {
                    outbox.stop(Duration::from_secs(2));
                }
            })
            .await;
    }
    lease::leave(&node).await;
    drop(serving);
}

/// Tells systemd `READY=1` once every shard accepts, then pets
/// the watchdog at half its interval, but only while every shard answers a ping through
/// the mesh: a wedged shard stops the pets and systemd restarts the service.
async fn supervise(node: Arc<Node>, mesh: Rc<Mesh>, notifier: Rc<Notifier>) {
    while !node.is_serving() {
        glommio::timer::sleep(Duration::from_millis(10)).await;
    }
    notifier.notify(&format!("READY=1\nSTATUS=serving {} shards", node.shard_count));
    // Every shard is pinged through the mesh: at half systemd's watchdog interval when it
    // has one (and petted only while every shard answers), else once a second for the
    // metric alone (`ringpush_shard_ping_seconds`).
    let watchdog = Notifier::watchdog_interval();
    let every = watchdog.map_or(Duration::from_secs(1), |i| i / 2);
    let limit = watchdog.map_or(Duration::from_secs(1), |i| i / 4);
    loop {
        glommio::timer::sleep(every).await;
        let mut alive = true;
        let mut slowest = Duration::ZERO;
        for shard in 0..node.shard_count {
            let asked = std::time::Instant::now();
            let ping = glommio::timer::timeout(limit, async {
                Ok(mesh.request(shard, |reply| ShardMsg::Shard(ShardWide::Ping { reply })).await)
            });
            alive &= matches!(ping.await, Ok(Some(_)));
            slowest = slowest.max(asked.elapsed().min(limit));
        }
        node.shard_ping_us.store(slowest.as_micros() as u64, Ordering::Relaxed);
        if watchdog.is_none() {
            continue;
        }
        if alive {
            notifier.notify("WATCHDOG=1");
        } else {
            warn!("a shard did not answer its watchdog ping; not petting the watchdog");
        }
    }
}

fn all_stopped(node: &Node) -> bool {
    node.stopped_shards.load(Ordering::Acquire) == node.shard_count
}

/// glibc raises its mmap threshold each time a large block is freed, so after a burst of
/// large messages their buffers come from (and stay in) the heap arenas: RSS then never
/// comes back down. A fixed threshold keeps blocks of 128 KiB and more in their own
/// mappings, returned to the system when freed.
fn tame_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tunables; called before any shard starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
    }
}

/// How long start-up waits for a listening address that is still taken. A process killed
/// outright (a supervisor's `Restart=` after SIGKILL, the OOM killer) gives its listening
/// sockets back only when its io_uring is torn down, a few milliseconds after the process
/// has been reaped; a restart in that window must wait, not fail.
const RELEASE_WAIT: Duration = Duration::from_secs(3);

/// Runs `bind` until it succeeds or fails with anything but "address in use"; an address
/// still in use after [`RELEASE_WAIT`] is that error. Called before any shard starts (it
/// sleeps on the starting thread).
pub fn when_released<T>(
    addr: impl std::fmt::Display,
    mut bind: impl FnMut() -> std::io::Result<T>,
) -> std::io::Result<T> {
    let deadline = std::time::Instant::now() + RELEASE_WAIT;
    let mut said = false;
    loop {
        match bind() {
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && std::time::Instant::now() < deadline => {
                if !said {
                    info!(%addr, "address still in use; waiting for it to be released");
                    said = true;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            other => return other,
        }
    }
}

/// One listener per shard on the same address, with `SO_REUSEPORT` so the kernel spreads
/// connections over them. Port 0 is resolved by the first and reused by the rest.
///
/// `SO_REUSEPORT` would let the first bind share the port with the listener of a process
/// that was just killed and whose sockets are not released yet, and the kernel would hand
/// that dead listener a share of the new connections. So a fixed port is first probed
/// without it until no other listener holds it (bounded by [`RELEASE_WAIT`]; past that the
/// port is shared on purpose, as with a second ringpush started beside a running one).
fn bind_client(addr: SocketAddr, count: usize) -> Result<Vec<OwnedFd>, Error> {
    if addr.port() != 0 {
        let probe = || -> std::io::Result<Socket> {
            let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
            socket.set_reuse_address(true)?;
            socket.bind(&addr.into())?;
            Ok(socket)
        };
        match when_released(addr, probe) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
                warn!(%addr, "the client port is held by another process's listener; sharing it (SO_REUSEPORT)")
            }
            Err(source) => return Err(Error::Bind { addr, source }),
        }
    }
    let mut addr = addr;
    let mut fds = Vec::with_capacity(count);
    for _ in 0..count {
        let bind = || -> std::io::Result<Socket> {
            let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
            socket.set_reuse_address(true)?;
            socket.set_reuse_port(true)?;
            socket.bind(&addr.into())?;
            socket.listen(LISTEN_BACKLOG)?;
            Ok(socket)
        };
        let socket = bind().map_err(|source| Error::Bind { addr, source })?;
        if addr.port() == 0 {
            if let Some(bound) = socket.local_addr()?.as_socket() {
                addr = bound;
            }
        }
        fds.push(OwnedFd::from(socket));
    }
    Ok(fds)
}

fn local_addr(fd: &OwnedFd) -> std::io::Result<SocketAddr> {
    let socket = socket2::SockRef::from(fd);
    socket.local_addr()?.as_socket().ok_or_else(|| std::io::Error::other("listener has no inet address"))
}

/// The CPUs this process may run on (taskset, numactl, systemd `CPUAffinity=`).
fn affinity_cpus() -> Vec<usize> {
    let cpus: Vec<usize> =
        core_affinity::get_core_ids().unwrap_or_default().into_iter().map(|c| c.id).collect();
    if cpus.is_empty() {
        vec![0]
    } else {
        cpus
    }
}

fn epoch_tag() -> String {
    let mut secs =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let digits = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = Vec::new();
    while secs > 0 {
        out.push(digits[(secs % 36) as usize]);
        secs /= 36;
    }
    out.reverse();
    String::from_utf8(out).unwrap_or_default()
}
