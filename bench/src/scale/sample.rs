//! The crowd's syncing devices: a few hundred devices beside the idle crowd that send and
//! receive in their conversations, reconnect as the crowd does (behind a load balancer),
//! `sync` after every reconnect, and are checked as the soak checks its devices
//! ([`Order`]): no seq twice, no hole no `gap` announced, and at the end every
//! conversation held up to the highest seq acknowledged to anyone (0 lost).
//!
//! One thread per device on the soak's blocking connection ([`Conn`]). A device that
//! loses its connection comes back as the crowd's clients do: after a 1001 close's
//! `reconnect_after_ms`, or a jittered backoff; a refused TCP connect (a node gone) or a
//! 503 (a node full or draining) moves to the next node at once, as a balancer fails
//! over, and only when every node refused does a 503's `Retry-After` make it wait.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering::Relaxed};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::scan;
use crate::soak::conn::{Conn, Frame, OpenError};
use crate::soak::device::{Order, Seen};
use crate::ws::{HandshakeError, Rng};

/// The longest a device waits for a frame before it looks at the phase and its timers.
const TICK: Duration = Duration::from_millis(100);

/// Bound on a connect and upgrade.
const OPEN_LIMIT: Duration = Duration::from_secs(5);

/// A send or sync answered `unavailable` is tried again after this.
const RETRY: Duration = Duration::from_millis(500);

/// Where the run is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
pub enum Phase {
    /// Sends.
    Run,
    /// No new sends; pending ones get their acks.
    Quiesce,
    /// Every device syncs everything and is checked.
    Settle,
    /// Devices close and their threads end.
    Leave,
}

/// Conversations of the sample: `layers` per device, of `members` devices each.
#[derive(Debug)]
pub struct Plan {
    pub convs: Vec<Vec<usize>>,
    pub names: Vec<String>,
    /// Per device, its conversations.
    pub of_device: Vec<Vec<usize>>,
}

impl Plan {
    pub fn new(tag: &str, devices: usize, members: usize, layers: usize) -> Plan {
        let mut plan = Plan { convs: Vec::new(), names: Vec::new(), of_device: vec![Vec::new(); devices] };
        for layer in 0..layers {
            for (g, group) in super::layer_groups(devices, members, layer).into_iter().enumerate() {
                let index = plan.convs.len();
                for &d in &group {
                    plan.of_device[d].push(index);
                }
                plan.names.push(format!("{tag}-s{layer}-{g}"));
                plan.convs.push(group);
            }
        }
        plan
    }
}

/// The user id of sample device `d`.
pub fn user_name(tag: &str, d: usize) -> String {
    format!("{tag}s{d}")
}

/// What the devices count.
#[derive(Debug, Default)]
pub struct Stats {
    pub sends: AtomicU64,
    pub acked: AtomicU64,
    pub unavailable: AtomicU64,
    pub delivered: AtomicU64,
    pub duplicated: AtomicU64,
    pub out_of_order: AtomicU64,
    pub incomplete: AtomicU64,
    pub gaps: AtomicU64,
    pub syncs: AtomicU64,
    pub errors: AtomicU64,
    pub lost: AtomicU64,
    pub reconnects: AtomicU64,
    pub closes_1001: AtomicU64,
    pub refused_connect: AtomicU64,
    pub refused_503: AtomicU64,
    pub retry_after: AtomicU64,
    /// Devices connected and past the syncs that followed their `hello`.
    pub online: AtomicU64,
    /// When a device last came online (ns since [`Shared::started`]).
    pub last_online_ns: AtomicU64,
    pub quiet: AtomicU64,
    pub settled: AtomicU64,
}

/// What the device threads share.
pub struct Shared {
    phase: AtomicU8,
    pub nodes: Vec<SocketAddr>,
    pub secret: String,
    pub tag: String,
    pub plan: Plan,
    /// Per conversation, the highest seq acknowledged to any device.
    pub acked: Vec<AtomicU64>,
    /// Mean time between one device's sends.
    pub send_interval: Duration,
    pub stats: Stats,
    pub started: Instant,
    reports: AtomicU64,
}

impl Shared {
    pub fn new(
        nodes: Vec<SocketAddr>,
        secret: String,
        tag: String,
        plan: Plan,
        send_interval: Duration,
    ) -> Shared {
        Shared {
            phase: AtomicU8::new(Phase::Run as u8),
            nodes,
            secret,
            tag,
            acked: plan.convs.iter().map(|_| AtomicU64::new(0)).collect(),
            plan,
            send_interval,
            stats: Stats::default(),
            started: Instant::now(),
            reports: AtomicU64::new(0),
        }
    }

    pub fn phase(&self) -> Phase {
        match self.phase.load(Relaxed) {
            0 => Phase::Run,
            1 => Phase::Quiesce,
            2 => Phase::Settle,
            _ => Phase::Leave,
        }
    }

    pub fn set_phase(&self, phase: Phase) {
        self.phase.store(phase as u8, Relaxed);
    }

    /// Nanoseconds since the start of the sample.
    pub fn now_ns(&self) -> u64 {
        self.started.elapsed().as_nanos() as u64
    }

    fn report(&self, what: String) {
        if self.reports.fetch_add(1, Relaxed) < 20 {
            eprintln!("  sample: {what}");
        }
    }
}

/// A send waiting for its ack (one at a time per device).
struct Pending {
    slot: usize,
    cid: String,
    text: Vec<u8>,
    /// `None`: written on this connection; else (re)write at this time.
    write_at: Option<Instant>,
}

struct Device<'a> {
    index: usize,
    shared: &'a Shared,
    rng: Rng,
    convs: Vec<usize>,
    order: Vec<Order>,
    pending: Option<Pending>,
    sent: u64,
    next_send: Instant,
    online: bool,
    quiet: bool,
    settling: Option<Instant>,
    settled: bool,
}

/// How a session ended, and the wait before the next connect.
enum End {
    Leave,
    /// Come back after this (the server's ask, or a backoff).
    Back(Option<Duration>),
}

/// One device's thread; returns when the phase is [`Phase::Leave`].
pub fn run(index: usize, shared: &Shared) {
    let convs = shared.plan.of_device[index].clone();
    let mut dev = Device {
        index,
        shared,
        rng: Rng::from_entropy(),
        order: convs.iter().map(|_| Order::default()).collect(),
        convs,
        pending: None,
        sent: 0,
        next_send: Instant::now(),
        online: false,
        quiet: false,
        settling: None,
        settled: false,
    };
    dev.next_send = Instant::now() + dev.send_interval();
    let nodes = shared.nodes.len();
    let mut node = index % nodes;
    let mut attempts = 0u32;
    let stats = &shared.stats;
    while shared.phase() != Phase::Leave {
        let target = format!("/ws?token={}", dev.token());
        let wait = match Conn::open_or_retry_after(shared.nodes[node], &target, OPEN_LIMIT) {
            Ok(conn) => {
                attempts = 0;
                match dev.session(conn) {
                    End::Leave => break,
                    End::Back(wait) => {
                        stats.reconnects.fetch_add(1, Relaxed);
                        wait
                    }
                }
            }
            Err((OpenError::Io(e), _)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                stats.refused_connect.fetch_add(1, Relaxed);
                attempts += 1;
                (attempts as usize >= nodes).then_some(Duration::from_millis(200))
            }
            Err((OpenError::Handshake(HandshakeError::Status(503)), retry_after)) => {
                stats.refused_503.fetch_add(1, Relaxed);
                attempts += 1;
                if retry_after.is_some() {
                    stats.retry_after.fetch_add(1, Relaxed);
                }
                // A full or draining node: the balancer tries the next one at once (nginx:
                // `proxy_next_upstream http_503`); once every node refused, wait as told.
                match retry_after {
                    _ if (attempts as usize) < nodes => Some(Duration::ZERO),
                    Some(s) => Some(Duration::from_secs(s)),
                    None => None,
                }
            }
            Err((e, _)) => {
                shared.report(format!("device {index}: connect to node {}: {e}", node + 1));
                attempts += 1;
                None
            }
        };
        // A balancer's next pick: the next node in turn.
        node = (node + 1) % nodes;
        let wait = wait.unwrap_or_else(|| {
            // Full jitter below 1 s doubling to 8 s.
            let cap = 1000u64 << attempts.min(3);
            Duration::from_millis(dev.rng.next_u64() % cap)
        });
        dev.pause(wait);
    }
}

impl Device<'_> {
    fn send_interval(&mut self) -> Duration {
        let mean = self.shared.send_interval.as_micros() as u64;
        Duration::from_micros(mean / 2 + self.rng.next_u64() % mean.max(1))
    }

    /// Sleeps up to `wait`, less once the run winds down.
    fn pause(&mut self, wait: Duration) {
        let until = Instant::now() + wait;
        while Instant::now() < until && self.shared.phase() < Phase::Settle {
            std::thread::sleep(TICK.min(until.saturating_duration_since(Instant::now())));
        }
    }

    fn token(&self) -> String {
        let user = user_name(&self.shared.tag, self.index);
        ringpush::auth::mint(&self.shared.secret, &user, "d", 24 * 3600).expect("a short user id mints")
    }

    fn set_online(&mut self, online: bool) {
        if online == self.online {
            return;
        }
        self.online = online;
        let stats = &self.shared.stats;
        if online {
            stats.online.fetch_add(1, Relaxed);
            stats.last_online_ns.fetch_max(self.shared.now_ns(), Relaxed);
        } else {
            stats.online.fetch_sub(1, Relaxed);
        }
    }

    fn session(&mut self, mut conn: Conn) -> End {
        for order in &mut self.order {
            order.reconnect();
        }
        if let Some(p) = &mut self.pending {
            p.write_at = Some(Instant::now());
        }
        let mut hello = false;
        let end = loop {
            let now = Instant::now();
            if self.shared.phase() == Phase::Leave {
                conn.close(1000, Duration::from_secs(1));
                break End::Leave;
            }
            if hello && self.act(&mut conn, now).is_err() {
                break End::Back(None);
            }
            let frame = match conn.next(TICK) {
                Ok(Some(frame)) => frame,
                Ok(None) => continue,
                Err(_) => break End::Back(None),
            };
            let handled = match frame {
                Frame::Text(text) => self.on_text(&mut conn, &text, &mut hello),
                Frame::Ping(payload) => conn.send(crate::ws::opcode::PONG, &payload),
                Frame::Close(code) => {
                    let after = scan::number_after(conn.close_reason(), b"reconnect_after_ms=");
                    if code == Some(1001) {
                        self.shared.stats.closes_1001.fetch_add(1, Relaxed);
                    }
                    conn.close(code.unwrap_or(1000), Duration::from_millis(200));
                    break End::Back(after.map(Duration::from_millis));
                }
                Frame::Binary | Frame::Pong => Ok(()),
            };
            if handled.is_err() {
                break End::Back(None);
            }
        };
        self.set_online(false);
        end
    }

    fn act(&mut self, conn: &mut Conn, now: Instant) -> std::io::Result<()> {
        let phase = self.shared.phase();
        for slot in 0..self.order.len() {
            if self.order[slot].retry_at.is_some_and(|t| t <= now) {
                self.sync(conn, slot)?;
            }
        }
        if let Some(p) = &mut self.pending {
            if phase < Phase::Settle && p.write_at.is_some_and(|t| t <= now) {
                p.write_at = None;
                conn.send_text(&p.text)?;
            }
        } else if phase == Phase::Run && now >= self.next_send {
            self.new_send(conn)?;
        }
        if phase == Phase::Quiesce && self.pending.is_none() && !self.quiet {
            self.quiet = true;
            self.shared.stats.quiet.fetch_add(1, Relaxed);
        }
        if phase == Phase::Settle && !self.settled {
            self.settle(conn, now)?;
        }
        Ok(())
    }

    /// The final check: sync everything, then hold every conversation up to the highest
    /// seq any device had acknowledged (within 30 s).
    fn settle(&mut self, conn: &mut Conn, now: Instant) -> std::io::Result<()> {
        let started = match self.settling {
            Some(t) => t,
            None => {
                self.pending = None;
                for slot in 0..self.order.len() {
                    if self.order[slot].syncing {
                        self.order[slot].resync = true;
                    } else {
                        self.sync(conn, slot)?;
                    }
                }
                self.settling = Some(now);
                now
            }
        };
        let short: u64 = self
            .convs
            .iter()
            .zip(&self.order)
            .map(|(&conv, order)| self.shared.acked[conv].load(Relaxed).saturating_sub(order.last))
            .sum();
        let syncing = self.order.iter().any(|o| o.syncing || o.retry_at.is_some());
        if (short == 0 && !syncing) || now.duration_since(started) > Duration::from_secs(30) {
            if short > 0 {
                self.shared.stats.lost.fetch_add(short, Relaxed);
                self.shared
                    .report(format!("device {}: {short} acknowledged message(s) never arrived", self.index));
            }
            self.settled = true;
            self.shared.stats.settled.fetch_add(1, Relaxed);
        }
        Ok(())
    }

    fn new_send(&mut self, conn: &mut Conn) -> std::io::Result<()> {
        let slot = (self.rng.next_u64() % self.convs.len().max(1) as u64) as usize;
        let conv = &self.shared.plan.names[self.convs[slot]];
        self.sent += 1;
        let cid = format!("s{}-{}", self.index, self.sent);
        let text = format!(
            r#"{{"op":"send","conv":"{conv}","cid":"{cid}","body":{{"d":{},"n":{}}}}}"#,
            self.index, self.sent
        )
        .into_bytes();
        conn.send_text(&text)?;
        self.shared.stats.sends.fetch_add(1, Relaxed);
        self.pending = Some(Pending { slot, cid, text, write_at: None });
        Ok(())
    }

    fn sync(&mut self, conn: &mut Conn, slot: usize) -> std::io::Result<()> {
        let order = &mut self.order[slot];
        order.syncing = true;
        order.resync = false;
        order.retry_at = None;
        let conv = &self.shared.plan.names[self.convs[slot]];
        let text = format!(r#"{{"op":"sync","conv":"{conv}","after":{},"cid":"sync-{slot}"}}"#, order.last);
        self.shared.stats.syncs.fetch_add(1, Relaxed);
        conn.send_text(text.as_bytes())
    }

    fn slot_of(&self, conv: &str) -> Option<usize> {
        self.convs.iter().position(|&c| self.shared.plan.names[c] == conv)
    }

    fn on_text(&mut self, conn: &mut Conn, text: &[u8], hello: &mut bool) -> std::io::Result<()> {
        let stats = &self.shared.stats;
        let Ok(v) = serde_json::from_slice::<Value>(text) else {
            stats.errors.fetch_add(1, Relaxed);
            return Ok(());
        };
        let conv = v["conv"].as_str().unwrap_or("");
        match v["op"].as_str().unwrap_or("") {
            "hello" => {
                *hello = true;
                for slot in 0..self.order.len() {
                    self.sync(conn, slot)?;
                }
            }
            "msg" => {
                let (Some(slot), Some(seq)) = (self.slot_of(conv), v["seq"].as_u64()) else {
                    stats.errors.fetch_add(1, Relaxed);
                    return Ok(());
                };
                let before = self.order[slot].last;
                match self.order[slot].on_msg(seq) {
                    Seen::Next => {
                        stats.delivered.fetch_add(1, Relaxed);
                    }
                    Seen::Duplicate => {
                        stats.duplicated.fetch_add(1, Relaxed);
                        self.shared.report(format!(
                            "device {}: {conv} seq {seq} again (held up to {before})",
                            self.index
                        ));
                    }
                    Seen::Skipped => {
                        stats.out_of_order.fetch_add(1, Relaxed);
                        self.shared.report(format!(
                            "device {}: {conv} seq {seq} after {before} with no gap frame",
                            self.index
                        ));
                    }
                }
            }
            "ack" => {
                let cid = v["cid"].as_str().unwrap_or("");
                let (Some(p), Some(seq)) = (&self.pending, v["seq"].as_u64()) else { return Ok(()) };
                if p.cid != cid {
                    return Ok(());
                }
                let slot = p.slot;
                self.pending = None;
                self.order[slot].on_ack(seq);
                self.shared.acked[self.convs[slot]].fetch_max(seq, Relaxed);
                stats.acked.fetch_add(1, Relaxed);
                self.next_send = Instant::now() + self.send_interval();
            }
            "synced" => {
                let Some(slot) = self.slot_of(conv) else { return Ok(()) };
                if v["complete"] == Value::Bool(false) {
                    stats.incomplete.fetch_add(1, Relaxed);
                }
                self.order[slot].syncing = false;
                if self.order[slot].resync {
                    self.sync(conn, slot)?;
                } else if self.order.iter().all(|o| !o.syncing) {
                    self.set_online(true);
                }
            }
            "gap" => {
                let Some(slot) = self.slot_of(conv) else { return Ok(()) };
                stats.gaps.fetch_add(1, Relaxed);
                if self.order[slot].syncing {
                    self.order[slot].resync = true;
                } else {
                    self.sync(conn, slot)?;
                }
            }
            "error" => {
                let cid = v["cid"].as_str().unwrap_or("");
                let code = v["code"].as_str().unwrap_or("");
                if code == "unavailable" {
                    stats.unavailable.fetch_add(1, Relaxed);
                    if let Some(slot) = cid.strip_prefix("sync-").and_then(|s| s.parse::<usize>().ok()) {
                        if slot < self.order.len() {
                            self.order[slot].syncing = false;
                            self.order[slot].retry_at = Some(Instant::now() + RETRY);
                        }
                        return Ok(());
                    }
                    if let Some(p) = &mut self.pending {
                        if p.cid == cid {
                            p.write_at = Some(Instant::now() + RETRY);
                        }
                    }
                    return Ok(());
                }
                stats.errors.fetch_add(1, Relaxed);
                self.shared.report(format!("device {}: {}", self.index, String::from_utf8_lossy(text)));
            }
            _ => {}
        }
        Ok(())
    }
}
