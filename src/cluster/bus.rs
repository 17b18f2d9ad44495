//! The sockets: one PUB bound on this node's endpoint, one SUB connected to every peer's,
//! each on a thread of its own, behind the [`Bus`] handle.
//!
//! # Socket options
//!
//! Both sockets:
//! - `LINGER 0`: on shutdown, queued messages are discarded, never waited for; a peer that
//!   missed them repairs from the store like after any other loss.
//! - ZMTP heartbeats (`HEARTBEAT_IVL` 1 s, `HEARTBEAT_TIMEOUT` and `_TTL` 5 s): a peer that
//!   vanished without closing its TCP connection (host down, partition) is noticed within
//!   seconds; the SUB side then reconnects and the PUB side frees what it queued for it.
//! - TCP keepalive (idle 30 s, interval 5 s, 3 probes): the kernel-level backstop.
//! - `IPV6` on: endpoints may be IPv6 literals; IPv4 addresses work as before.
//!
//! PUB: `SNDHWM` `cluster.hwm` (default 100 000) messages per subscriber. A subscriber that falls that far behind
//! loses messages (silently: libzmq's PUB drops at the high-water mark and reports
//! nothing) rather than stalling the node or its other peers. `send` uses `DONTWAIT`
//! anyway, so the publisher thread can never block on the network.
//!
//! Subscriptions: the SUB's `SNDHWM` and the PUB's `RCVHWM` are 0 (no limit). libzmq
//! queues subscribe and unsubscribe messages behind them and silently drops what is past
//! the mark (1000 by default): a node that took an interest in thousands of buckets at
//! once (a crowd connecting) would never hear most of them. Subscriptions are a few bytes
//! each and bounded by the `2 * BUCKETS + 1` topics there are.
//!
//! SUB: `RCVHWM` `cluster.hwm`; `RECONNECT_IVL` 100 ms backing off to `RECONNECT_IVL_MAX` 1 s,
//! so a restarted peer (same endpoint, new epoch) is back within a second of listening;
//! `MAXMSGSIZE` = [`MAX_PAYLOAD`], the largest valid payload, so a peer announcing a bigger
//! frame is disconnected before libzmq allocates for it. ZeroMQ resends a SUB socket's
//! subscriptions on every (re)connection.

use std::collections::{HashMap, HashSet};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender, TryRecvError, TrySendError};
use thiserror::Error;
use tracing::{debug, warn};

use super::counters::ClusterMetrics;
use super::wire::{self, ClusterMsg, Envelope, Topic, TopicFrame, MAX_PAYLOAD};
use crate::ids::Key;

/// Slots in each routing channel handed back by [`Bus::start`]; past that, inbound
/// messages are dropped and counted.
pub const INBOUND_SLOTS: usize = 65_536;
/// Messages waiting for the publisher thread; past that, [`Bus::publish`] drops and counts.
/// The queue is allocated and touched whole at start: about 90 bytes a slot, 6 MB a node.
pub const OUTBOX_SLOTS: usize = 65_536;

/// How long binding the PUB endpoint waits for it to be released (see `server`).
const RELEASE_WAIT: std::time::Duration = std::time::Duration::from_secs(3);
const RECONNECT_IVL_MS: i32 = 100;
const RECONNECT_IVL_MAX_MS: i32 = 1_000;
const HEARTBEAT_IVL_MS: i32 = 1_000;
const HEARTBEAT_TIMEOUT_MS: i32 = 5_000;
const KEEPALIVE_IDLE_S: i32 = 30;
const KEEPALIVE_INTVL_S: i32 = 5;
const KEEPALIVE_CNT: i32 = 3;
/// The longest the subscriber thread sleeps in `zmq::poll`. A command rings its doorbell
/// and wakes it at once; this bound only keeps an idle node from sleeping forever.
const IDLE_POLL_MS: i64 = 1_000;
/// Messages the subscriber thread takes in a row before looking at its commands again.
const RECV_BATCH: usize = 1024;

/// Why the bus could not start.
#[derive(Debug, Error)]
pub enum BusError {
    /// The PUB socket cannot listen on `endpoint` (malformed, not a local address, or
    /// taken): fix `cluster.pub_listen` or stop what holds the port.
    #[error("cannot bind the cluster PUB socket on {endpoint}: {source}")]
    Bind { endpoint: String, source: zmq::Error },
    /// libzmq could not create or set up a socket (out of file descriptors or memory):
    /// raise the limits and start again.
    #[error("cannot set up the cluster {socket} socket: {source}")]
    Socket { socket: &'static str, source: zmq::Error },
    /// A bus thread could not be spawned: the process is out of threads or memory.
    #[error("cannot start the cluster {thread} thread: {source}")]
    Thread { thread: &'static str, source: std::io::Error },
    /// The subscriber thread's eventfd could not be made (out of file descriptors).
    #[error("cannot create the cluster subscriber's eventfd: {0}")]
    Doorbell(std::io::Error),
    /// `receivers` was 0: inbound messages need at least one channel to go to.
    #[error("the cluster bus needs at least one receiver")]
    NoReceivers,
}

/// The handle on this node's cluster sockets. `Send + Sync` and cheap to clone; the
/// threads stop on [`Bus::shutdown`] or when the last handle is dropped.
#[derive(Clone)]
pub struct Bus {
    inner: Arc<Inner>,
}

struct Inner {
    /// The PUB endpoint as libzmq reports it after binding (wildcard ports resolved).
    endpoint: String,
    /// To the publisher thread; bounded, `publish` only try-sends.
    outbox: Sender<Outgoing>,
    /// To the subscriber thread; unbounded, since commands are few and must not be lost.
    commands: Sender<Command>,
    /// Rung after every command, so the subscriber thread applies it at once.
    doorbell: Arc<Doorbell>,
    metrics: Arc<ClusterMetrics>,
    /// Taken (and joined) by the first shutdown.
    threads: Mutex<Vec<JoinHandle<()>>>,
}

enum Outgoing {
    Publish(Topic, ClusterMsg),
    Stop,
}

enum Command {
    Subscribe(Topic),
    Unsubscribe(Topic),
    Peers(Vec<String>),
    Stop,
}

/// Maps an inbound envelope to the index of the channel it goes to.
pub type Route = Box<dyn Fn(&Envelope) -> usize + Send>;

/// What a [`Bus`] is started with.
pub struct BusOptions<'a> {
    /// The endpoint the PUB socket binds (`cluster.pub_listen`; `tcp://host:*` picks a port).
    pub pub_listen: &'a str,
    /// This node's id and start epoch, stamped on every message it sends.
    pub node: Key,
    pub epoch: u64,
    /// Inbound channels, one per shard; `route` picks one for each message.
    pub receivers: usize,
    /// ZeroMQ's high-water mark per peer, both ways (`cluster.hwm`).
    pub hwm: u32,
}

impl Bus {
    /// Binds a PUB socket on `options.pub_listen` and starts the publisher and subscriber
    /// threads.
    ///
    /// Every decoded inbound message from another node goes to the receiver at
    /// `route(&env)` (taken modulo `receivers`; `route` runs on the subscriber thread and
    /// must neither block nor panic). The `receivers` channels are bounded at
    /// [`INBOUND_SLOTS`]: when one is full, what would go to it is dropped and counted in
    /// `inbound_dropped`. The node starts with no peers and no subscriptions.
    pub fn start(
        options: BusOptions<'_>,
        route: Route,
    ) -> Result<(Bus, Vec<flume::Receiver<Envelope>>), BusError> {
        let BusOptions { pub_listen, node, epoch, receivers, hwm } = options;
        let hwm = hwm.min(i32::MAX as u32) as i32;
        if receivers == 0 {
            return Err(BusError::NoReceivers);
        }
        let ctx = zmq::Context::new();
        let publisher = pub_socket(&ctx, hwm).map_err(|source| BusError::Socket { socket: "PUB", source })?;
        bind_when_released(&publisher, pub_listen)
            .map_err(|source| BusError::Bind { endpoint: pub_listen.to_owned(), source })?;
        let endpoint = match publisher.get_last_endpoint() {
            Ok(Ok(endpoint)) => endpoint,
            _ => pub_listen.to_owned(),
        };
        let subscriber =
            sub_socket(&ctx, hwm).map_err(|source| BusError::Socket { socket: "SUB", source })?;

        let metrics = Arc::new(ClusterMetrics::default());
        let (outbox, queue) = crossbeam_channel::bounded(OUTBOX_SLOTS);
        let (commands, command_rx) = crossbeam_channel::unbounded();
        let doorbell = Arc::new(Doorbell::new().map_err(BusError::Doorbell)?);
        let (senders, receivers): (Vec<_>, Vec<_>) =
            (0..receivers).map(|_| flume::bounded(INBOUND_SLOTS)).unzip();
        let inner = Arc::new(Inner {
            endpoint,
            outbox,
            commands,
            doorbell: doorbell.clone(),
            metrics: metrics.clone(),
            threads: Mutex::new(Vec::with_capacity(2)),
        });

        let pub_thread =
            Publisher { socket: publisher, node: node.clone(), epoch, queue, metrics: metrics.clone() };
        let handle = std::thread::Builder::new()
            .name("cluster-pub".into())
            .spawn(move || pub_thread.run())
            .map_err(|source| BusError::Thread { thread: "publisher", source })?;
        inner.push_thread(handle);
        let sub_thread = Subscriber {
            socket: subscriber,
            node,
            epoch,
            route,
            senders,
            commands: command_rx,
            doorbell,
            topics: HashMap::new(),
            peers: HashSet::new(),
            metrics,
        };
        // On an error here, dropping `inner` stops and joins the publisher.
        let handle = std::thread::Builder::new()
            .name("cluster-sub".into())
            .spawn(move || sub_thread.run())
            .map_err(|source| BusError::Thread { thread: "subscriber", source })?;
        inner.push_thread(handle);
        Ok((Bus { inner }, receivers))
    }

    /// The PUB endpoint as bound (a wildcard port such as `tcp://127.0.0.1:*` resolved).
    pub fn endpoint(&self) -> &str {
        &self.inner.endpoint
    }

    /// Queues `msg` for every peer subscribed to `topic`. Never blocks: when the
    /// publisher's queue is full (or the bus is shut down) the message is dropped and
    /// counted. Encoding happens on the publisher thread.
    pub fn publish(&self, topic: Topic, msg: ClusterMsg) {
        match self.inner.outbox.try_send(Outgoing::Publish(topic, msg)) {
            Ok(()) | Err(TrySendError::Disconnected(_)) => {}
            Err(TrySendError::Full(_)) => self.inner.metrics.publish_queue_full.inc(),
        }
    }

    /// Counts one more interest in `topic`; the SUB socket subscribes on the first. Takes
    /// effect at each peer asynchronously, once the subscription has reached it.
    pub fn subscribe(&self, topic: Topic) {
        self.inner.command(Command::Subscribe(topic));
    }

    /// Counts one interest in `topic` less; the SUB socket unsubscribes on the last. An
    /// unsubscribe without a subscribe is ignored.
    pub fn unsubscribe(&self, topic: Topic) {
        self.inner.command(Command::Unsubscribe(topic));
    }

    /// Makes `endpoints` the peers: connects to the new ones, disconnects from those no
    /// longer listed (endpoints compare as strings). Idempotent. An endpoint libzmq refuses
    /// (malformed) is logged and left out; the next call tries it again.
    pub fn set_peers(&self, endpoints: Vec<String>) {
        self.inner.command(Command::Peers(endpoints));
    }

    pub fn metrics(&self) -> &ClusterMetrics {
        &self.inner.metrics
    }

    /// Stops both threads and closes the sockets, discarding queued messages. Blocks until
    /// the threads have exited; idempotent. Calls on any handle after this do nothing.
    pub fn shutdown(&self) {
        self.inner.shutdown();
    }
}

impl Inner {
    fn command(&self, command: Command) {
        // Disconnected only after shutdown, when there is nothing left to command.
        let _ = self.commands.send(command);
        self.doorbell.ring();
    }

    fn push_thread(&self, handle: JoinHandle<()>) {
        if let Ok(mut threads) = self.threads.lock() {
            threads.push(handle);
        }
    }

    fn shutdown(&self) {
        let threads = match self.threads.lock() {
            Ok(mut threads) => std::mem::take(&mut *threads),
            Err(_) => return,
        };
        if threads.is_empty() {
            return;
        }
        // The publisher empties its queue without ever blocking, so this waits at most for
        // one free slot; an error means the thread is already gone.
        let _ = self.outbox.send(Outgoing::Stop);
        let _ = self.commands.send(Command::Stop);
        self.doorbell.ring();
        let me = std::thread::current().id();
        for handle in threads {
            // A route function that dropped the last handle runs on the subscriber thread,
            // which cannot join itself; it exits on the Stop just sent.
            if handle.thread().id() != me && handle.join().is_err() {
                warn!("a cluster bus thread panicked");
            }
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Binds the PUB socket, waiting (boundedly) for an endpoint that a killed predecessor
/// has not released yet, as the node's other listeners do.
fn bind_when_released(socket: &zmq::Socket, endpoint: &str) -> zmq::Result<()> {
    let deadline = std::time::Instant::now() + RELEASE_WAIT;
    loop {
        match socket.bind(endpoint) {
            Err(zmq::Error::EADDRINUSE) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            other => return other,
        }
    }
}

fn common_options(socket: &zmq::Socket) -> zmq::Result<()> {
    socket.set_linger(0)?;
    socket.set_ipv6(true)?;
    socket.set_heartbeat_ivl(HEARTBEAT_IVL_MS)?;
    socket.set_heartbeat_timeout(HEARTBEAT_TIMEOUT_MS)?;
    socket.set_heartbeat_ttl(HEARTBEAT_TIMEOUT_MS)?;
    socket.set_tcp_keepalive(1)?;
    socket.set_tcp_keepalive_idle(KEEPALIVE_IDLE_S)?;
    socket.set_tcp_keepalive_intvl(KEEPALIVE_INTVL_S)?;
    socket.set_tcp_keepalive_cnt(KEEPALIVE_CNT)
}

fn pub_socket(ctx: &zmq::Context, hwm: i32) -> zmq::Result<zmq::Socket> {
    let socket = ctx.socket(zmq::PUB)?;
    common_options(&socket)?;
    socket.set_sndhwm(hwm)?;
    // Subscriptions arrive on the PUB's receive side: never limited (see the module doc).
    socket.set_rcvhwm(0)?;
    Ok(socket)
}

fn sub_socket(ctx: &zmq::Context, hwm: i32) -> zmq::Result<zmq::Socket> {
    let socket = ctx.socket(zmq::SUB)?;
    common_options(&socket)?;
    socket.set_rcvhwm(hwm)?;
    // Subscriptions leave on the SUB's send side: never limited (see the module doc).
    socket.set_sndhwm(0)?;
    socket.set_reconnect_ivl(RECONNECT_IVL_MS)?;
    socket.set_reconnect_ivl_max(RECONNECT_IVL_MAX_MS)?;
    socket.set_maxmsgsize(MAX_PAYLOAD as i64)?;
    Ok(socket)
}

/// The publisher thread: the PUB socket and the queue feeding it.
struct Publisher {
    socket: zmq::Socket,
    node: Key,
    epoch: u64,
    queue: Receiver<Outgoing>,
    metrics: Arc<ClusterMetrics>,
}

impl Publisher {
    fn run(self) {
        while let Ok(Outgoing::Publish(topic, msg)) = self.queue.recv() {
            let env = Envelope { node: self.node.clone(), epoch: self.epoch, msg };
            let payload = match wire::encode(&env) {
                Ok(payload) => payload,
                Err(e) => {
                    debug!(kind = env.msg.label(), error = %e, "cluster message not publishable");
                    self.metrics.publish_too_large.inc();
                    continue;
                }
            };
            // The payload's buffer is handed to libzmq without a copy.
            let sent = self
                .socket
                .send(topic.frame().as_bytes(), zmq::SNDMORE | zmq::DONTWAIT)
                .and_then(|()| self.socket.send(payload, zmq::DONTWAIT));
            match sent {
                Ok(()) => self.metrics.published.inc(),
                Err(e) => {
                    debug!(error = %e, "cluster PUB send failed");
                    self.metrics.publish_send_errors.inc();
                }
            }
        }
    }
}

/// The subscriber thread: the SUB socket, its subscriptions and peers, the routing.
struct Subscriber {
    socket: zmq::Socket,
    node: Key,
    epoch: u64,
    route: Route,
    senders: Vec<flume::Sender<Envelope>>,
    commands: Receiver<Command>,
    doorbell: Arc<Doorbell>,
    /// Interest count per subscribed topic, keyed by frame so that two spellings of one
    /// bucket (`Conv(1)`, `Conv(4097)`) share a count. Absent means 0.
    topics: HashMap<TopicFrame, usize>,
    /// The endpoints the SUB socket is connected to, as they were given.
    peers: HashSet<String>,
    metrics: Arc<ClusterMetrics>,
}

impl Subscriber {
    fn run(mut self) {
        let mut topic = zmq::Message::new();
        let mut payload = zmq::Message::new();
        loop {
            loop {
                match self.commands.try_recv() {
                    Ok(Command::Stop) | Err(TryRecvError::Disconnected) => return,
                    Ok(command) => self.apply(command),
                    Err(TryRecvError::Empty) => break,
                }
            }
            // Sleeps until a message or a command comes: no timer wakes an idle node.
            let mut items = [
                self.socket.as_poll_item(zmq::POLLIN),
                zmq::PollItem::from_fd(self.doorbell.fd(), zmq::POLLIN),
            ];
            match zmq::poll(&mut items, IDLE_POLL_MS) {
                Ok(_) => {
                    let (message, rung) = (items[0].is_readable(), items[1].is_readable());
                    if rung {
                        self.doorbell.clear();
                    }
                    if message {
                        for _ in 0..RECV_BATCH {
                            if !self.receive(&mut topic, &mut payload) {
                                break;
                            }
                        }
                    }
                }
                Err(zmq::Error::EINTR) => {}
                Err(e) => {
                    warn!(error = %e, "cluster SUB socket failed; no more inbound cluster traffic");
                    return;
                }
            }
        }
    }

    fn apply(&mut self, command: Command) {
        match command {
            Command::Subscribe(topic) => {
                let frame = topic.frame();
                let count = self.topics.entry(frame).or_insert(0);
                if *count == 0 {
                    if let Err(e) = self.socket.set_subscribe(frame.as_bytes()) {
                        warn!(?topic, error = %e, "cluster subscribe failed");
                        self.topics.remove(&frame);
                        return;
                    }
                    self.metrics.subscribed_topics.inc();
                }
                *count += 1;
            }
            Command::Unsubscribe(topic) => {
                let frame = topic.frame();
                let Some(count) = self.topics.get_mut(&frame) else {
                    debug!(?topic, "cluster unsubscribe without a subscribe");
                    return;
                };
                *count -= 1;
                if *count == 0 {
                    self.topics.remove(&frame);
                    self.metrics.subscribed_topics.dec();
                    if let Err(e) = self.socket.set_unsubscribe(frame.as_bytes()) {
                        warn!(?topic, error = %e, "cluster unsubscribe failed");
                    }
                }
            }
            Command::Peers(endpoints) => {
                let wanted: HashSet<String> = endpoints.into_iter().collect();
                let gone: Vec<String> = self.peers.difference(&wanted).cloned().collect();
                for endpoint in gone {
                    if let Err(e) = self.socket.disconnect(&endpoint) {
                        debug!(%endpoint, error = %e, "cluster disconnect");
                    }
                    self.peers.remove(&endpoint);
                    self.metrics.peers.dec();
                }
                for endpoint in wanted {
                    if self.peers.contains(&endpoint) {
                        continue;
                    }
                    match self.socket.connect(&endpoint) {
                        Ok(()) => {
                            self.peers.insert(endpoint);
                            self.metrics.peers.inc();
                        }
                        Err(e) => warn!(%endpoint, error = %e, "cannot connect to cluster peer"),
                    }
                }
            }
            Command::Stop => {}
        }
    }

    /// Takes one message if one is waiting; false when there is none.
    fn receive(&mut self, topic: &mut zmq::Message, payload: &mut zmq::Message) -> bool {
        if self.socket.recv(topic, zmq::DONTWAIT).is_err() {
            return false;
        }
        if !topic.get_more() {
            self.metrics.decode_errors.inc();
            return true;
        }
        // The rest of a multipart message arrives with its first part.
        if self.socket.recv(payload, zmq::DONTWAIT).is_err() {
            self.metrics.decode_errors.inc();
            return true;
        }
        if payload.get_more() {
            while payload.get_more() && self.socket.recv(payload, zmq::DONTWAIT).is_ok() {}
            self.metrics.decode_errors.inc();
            return true;
        }
        let env = match wire::decode(payload) {
            Ok(env) => env,
            Err(e) => {
                debug!(error = %e, "undecodable cluster message");
                self.metrics.decode_errors.inc();
                return true;
            }
        };
        if env.epoch == self.epoch && env.node == self.node {
            self.metrics.looped_back.inc();
            return true;
        }
        self.metrics.received[env.msg.kind() as usize - 1].inc();
        let i = (self.route)(&env) % self.senders.len();
        if self.senders[i].try_send(env).is_err() {
            self.metrics.inbound_dropped.inc();
        }
        true
    }
}

/// An eventfd that the subscriber thread polls beside its SUB socket.
struct Doorbell(OwnedFd);

impl Doorbell {
    fn new() -> std::io::Result<Doorbell> {
        // SAFETY: eventfd(2) takes no pointers; a non-negative answer is a new descriptor
        // that nothing else owns.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` was just created and is owned by nothing else.
        Ok(Doorbell(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    fn fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }

    /// Wakes the poller (the counter saturates long after anyone would care).
    fn ring(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to a descriptor we own.
        let _ = unsafe { libc::write(self.fd(), (&one as *const u64).cast(), 8) };
    }

    /// Resets the counter after a wake-up.
    fn clear(&self) {
        let mut count: u64 = 0;
        // SAFETY: reads at most 8 bytes into a live u64 from a descriptor we own.
        let _ = unsafe { libc::read(self.fd(), (&mut count as *mut u64).cast(), 8) };
    }
}
