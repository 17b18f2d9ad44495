//! One device of the soak: a thread that connects (to its home node, or another one
//! while home is down), syncs its conversations, sends now and then, leaves and comes
//! back (churn), and checks every `msg` against the seq it expects.
//!
//! The check ([`Order`]) is PROTOCOL.md's promise per conversation and connection: the
//! `msg` seqs of a conversation come strictly increasing and with no hole that no `gap`
//! announced, and `sync` after the last seq held fills a disconnect or a gap. At the end
//! ([`Phase::Settle`]) every device is on its home node, syncs everything, and must hold
//! each conversation up to the highest seq any sender had acknowledged.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::conn::{Conn, Frame, OpenError};
use super::{Phase, Shared};
use crate::ws::{HandshakeError, Rng};

/// The longest a device waits for a frame before it looks at the phase and its timers.
const TICK: Duration = Duration::from_millis(200);

/// Bound on a connect and upgrade.
const OPEN_LIMIT: Duration = Duration::from_secs(5);

/// A failed send (`unavailable`) or sync is tried again after this.
const RETRY_AFTER: Duration = Duration::from_millis(500);

/// How long a device in [`Phase::Settle`] waits for its conversations to reach the
/// highest acknowledged seqs after its final syncs.
const SETTLE_LIMIT: Duration = Duration::from_secs(30);

/// What a `msg` was, against the seqs already held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// The next seq: held now.
    Next,
    /// A seq held already, and not one of this connection's own sends replayed by a sync.
    Duplicate,
    /// A seq past the next one: the ones between were skipped without a `gap`.
    Skipped,
}

/// One conversation as one device sees it.
#[derive(Debug, Default)]
pub struct Order {
    /// Every seq up to this one is held (received, or acknowledged to this device).
    pub last: u64,
    /// Seqs this connection sent (acks), which never come back to it as live `msg`s:
    /// those past `last` are skipped over once `last` reaches them; a `sync` may replay
    /// any of them, which is not a duplicate.
    own: BTreeSet<u64>,
    /// A `sync` is in flight.
    pub syncing: bool,
    /// A `gap` came while syncing: sync again when it ends.
    pub resync: bool,
    /// A sync to send at this time (after `unavailable`).
    pub retry_at: Option<Instant>,
}

impl Order {
    /// A new connection: its acks are new, nothing is in flight.
    pub fn reconnect(&mut self) {
        self.own.clear();
        self.syncing = false;
        self.resync = false;
        self.retry_at = None;
    }

    pub fn on_msg(&mut self, seq: u64) -> Seen {
        if seq <= self.last {
            return if self.own.contains(&seq) { Seen::Next } else { Seen::Duplicate };
        }
        let seen = if seq == self.last + 1 { Seen::Next } else { Seen::Skipped };
        // Held from here on either way, so one skip is counted once.
        self.last = seq;
        self.advance();
        seen
    }

    pub fn on_ack(&mut self, seq: u64) {
        self.own.insert(seq);
        self.advance();
    }

    fn advance(&mut self) {
        while self.own.contains(&(self.last + 1)) {
            self.last += 1;
        }
    }
}

/// Who a device is.
#[derive(Debug, Clone, Copy)]
pub struct DeviceSpec {
    pub index: usize,
    pub user: usize,
    pub home: usize,
}

/// A send waiting for its ack (one at a time per device).
struct Pending {
    slot: usize,
    cid: String,
    text: Vec<u8>,
    /// Written on the current connection; `None`: to write (new, or after `unavailable`
    /// or a reconnect, with the same cid).
    retry_at: Option<Instant>,
}

/// How a connection ended.
enum End {
    /// The phase is over: the thread ends.
    Left,
    /// Churn: offline for a while.
    Churn,
    /// The connection broke or the server closed it: back soon.
    Lost,
    /// Settle: moving home.
    Moved,
}

struct Device<'a> {
    spec: DeviceSpec,
    shared: &'a Shared,
    rng: Rng,
    /// The device's conversations (indices into the plan) and their order state.
    convs: Vec<u32>,
    order: Vec<Order>,
    pending: Option<Pending>,
    sent: u64,
    /// The node of the current (or last) connection, for reports.
    node: usize,
    next_send: Instant,
    ready: bool,
    quiet: bool,
    /// Settle: final syncs sent (at this time), and the result reported.
    settling: Option<Instant>,
    settled: bool,
}

/// The thread of one device; returns when the soak reaches [`Phase::Leave`].
pub fn run(spec: DeviceSpec, shared: &Shared) {
    let convs = shared.plan.user_convs[spec.user].clone();
    let mut dev = Device {
        spec,
        shared,
        rng: Rng::from_entropy(),
        order: convs.iter().map(|_| Order::default()).collect(),
        convs,
        pending: None,
        sent: 0,
        node: spec.home,
        next_send: Instant::now(),
        ready: false,
        quiet: false,
        settling: None,
        settled: false,
    };
    dev.next_send = Instant::now() + dev.send_interval();
    let stats = &shared.stats;
    let mut failures = 0u32;
    loop {
        if shared.phase() == Phase::Leave {
            break;
        }
        let Some((conn, node)) = dev.connect() else {
            failures += 1;
            // 100 ms, doubling to 2 s, jittered.
            let backoff = 100u64 << failures.min(5);
            let wait = backoff / 2 + dev.rng.next_u64() % backoff;
            dev.pause(Duration::from_millis(wait));
            continue;
        };
        failures = 0;
        match dev.session(conn, node) {
            End::Left => break,
            End::Churn => {
                let offline = 1000 + dev.rng.next_u64() % 4000;
                dev.pause(Duration::from_millis(offline));
            }
            End::Lost => {
                stats.lost_connections.fetch_add(1, Relaxed);
                let wait = 100 + dev.rng.next_u64() % 400;
                dev.pause(Duration::from_millis(wait));
            }
            End::Moved => {}
        }
        stats.reconnects.fetch_add(1, Relaxed);
    }
    stats.left.fetch_add(1, Relaxed);
}

impl Device<'_> {
    /// Mean time between this device's sends.
    fn send_interval(&mut self) -> Duration {
        let mean = self.shared.send_interval.as_micros() as u64;
        Duration::from_micros(mean / 2 + self.rng.next_u64() % mean.max(1))
    }

    /// Sleeps up to `wait`, less once the run winds down (no one stays away then).
    fn pause(&mut self, wait: Duration) {
        let until = Instant::now() + wait;
        while Instant::now() < until && self.shared.phase() < Phase::Quiesce {
            std::thread::sleep(TICK.min(until.saturating_duration_since(Instant::now())));
        }
    }

    /// Connects to home, else (not while settling) to the next node that answers.
    fn connect(&mut self) -> Option<(Conn, usize)> {
        let nodes = self.shared.nodes.len();
        let tries = if self.shared.phase() >= Phase::Settle { 1 } else { nodes };
        let target = format!("/ws?token={}", self.token());
        for k in 0..tries {
            let node = (self.spec.home + k) % nodes;
            match Conn::open(self.shared.nodes[node], &target, OPEN_LIMIT) {
                Ok(conn) => return Some((conn, node)),
                Err(OpenError::Handshake(HandshakeError::Status(503))) => {
                    self.shared.stats.refused.fetch_add(1, Relaxed);
                }
                Err(OpenError::Handshake(e)) => {
                    self.shared.stats.bad_handshakes.fetch_add(1, Relaxed);
                    self.shared.report(format!(
                        "device {}: upgrade on node {}: {e}",
                        self.spec.index,
                        node + 1
                    ));
                }
                Err(OpenError::Io(_)) => {
                    self.shared.stats.connect_failures.fetch_add(1, Relaxed);
                }
            }
        }
        None
    }

    fn token(&self) -> String {
        let user = super::user_name(self.spec.user);
        let device = format!("d{}", self.spec.index);
        ringpush::auth::mint(&self.shared.secret, &user, &device, 7 * 24 * 3600)
            .expect("a short user id mints")
    }

    fn session(&mut self, mut conn: Conn, node: usize) -> End {
        self.node = node;
        for order in &mut self.order {
            order.reconnect();
        }
        if let Some(p) = &mut self.pending {
            p.retry_at = Some(Instant::now());
        }
        let mut hello = false;
        let lifetime = self.shared.session.as_millis() as u64;
        let leave_at =
            Instant::now() + Duration::from_millis(lifetime / 2 + self.rng.next_u64() % lifetime.max(1));
        loop {
            let now = Instant::now();
            let phase = self.shared.phase();
            match phase {
                Phase::Leave => {
                    conn.close(1000, Duration::from_secs(1));
                    return End::Left;
                }
                Phase::Settle | Phase::Gather if node != self.spec.home => {
                    conn.close(1000, Duration::from_secs(1));
                    return End::Moved;
                }
                Phase::Run if now >= leave_at => return self.leave(conn),
                _ => {}
            }
            if hello && self.act(&mut conn, phase, now).is_err() {
                return End::Lost;
            }
            // Until the next send is due, if one can be sent.
            let wait = match self.pending {
                None if phase <= Phase::Run => TICK.min(self.next_send.saturating_duration_since(now)),
                _ => TICK,
            };
            let frame = match conn.next(wait) {
                Ok(Some(frame)) => frame,
                Ok(None) => continue,
                Err(_) => {
                    self.shared.stats.abrupt_ends.fetch_add(1, Relaxed);
                    return End::Lost;
                }
            };
            let handled = match frame {
                Frame::Text(text) => self.on_text(&mut conn, &text, &mut hello),
                Frame::Ping(payload) => conn.send(crate::ws::opcode::PONG, &payload),
                Frame::Close(code) => {
                    self.shared.count_close(code);
                    conn.close(code.unwrap_or(1000), Duration::from_millis(200));
                    return End::Lost;
                }
                Frame::Binary | Frame::Pong => Ok(()),
            };
            if handled.is_err() {
                return End::Lost;
            }
        }
    }

    /// Leaves for churn: a close handshake, or (one in three) vanishing without one,
    /// half of those with a TCP reset.
    fn leave(&mut self, conn: Conn) -> End {
        let stats = &self.shared.stats;
        match self.rng.next_u64() % 6 {
            0 => {
                stats.vanished.fetch_add(1, Relaxed);
                // SO_LINGER 0: closing the socket sends a reset, as a client that
                // vanishes mid-stream.
                conn.set_option(libc::SO_LINGER, &libc::linger { l_onoff: 1, l_linger: 0 });
                drop(conn);
            }
            1 => {
                stats.vanished.fetch_add(1, Relaxed);
                drop(conn);
            }
            _ => {
                stats.left_politely.fetch_add(1, Relaxed);
                conn.close(1000, Duration::from_secs(1));
            }
        }
        End::Churn
    }

    /// Timers of a connection past `hello`: sends, retries, the end-of-run reports.
    fn act(&mut self, conn: &mut Conn, phase: Phase, now: Instant) -> std::io::Result<()> {
        for slot in 0..self.order.len() {
            if self.order[slot].retry_at.is_some_and(|t| t <= now) {
                self.sync(conn, slot)?;
            }
        }
        if let Some(p) = &mut self.pending {
            if phase < Phase::Settle && p.retry_at.is_some_and(|t| t <= now) {
                p.retry_at = None;
                conn.send_text(&p.text)?;
            }
        } else if phase <= Phase::Run && now >= self.next_send {
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
    /// seq any sender had acknowledged (within [`SETTLE_LIMIT`]).
    fn settle(&mut self, conn: &mut Conn, now: Instant) -> std::io::Result<()> {
        let started = match self.settling {
            Some(t) => t,
            None => {
                // Sends are over: a pending one never got its ack and does not count.
                self.pending = None;
                for slot in 0..self.order.len() {
                    if self.order[slot].syncing {
                        // A second sync with the same `after` would replay it all twice:
                        // sync again from where this one ends.
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
            .map(|(&conv, order)| self.shared.acked[conv as usize].load(Relaxed).saturating_sub(order.last))
            .sum();
        let syncing = self.order.iter().any(|o| o.syncing || o.retry_at.is_some());
        if (short == 0 && !syncing) || now.duration_since(started) > SETTLE_LIMIT {
            if short > 0 {
                self.shared.stats.lost.fetch_add(short, Relaxed);
                self.shared.report(format!(
                    "device {} (user {}): {short} acknowledged message(s) never arrived",
                    self.spec.index, self.spec.user
                ));
            }
            self.settled = true;
            self.shared.stats.settled.fetch_add(1, Relaxed);
        }
        Ok(())
    }

    fn new_send(&mut self, conn: &mut Conn) -> std::io::Result<()> {
        let slot = self.pick_conv();
        let conv = &self.shared.plan.convs[self.convs[slot] as usize].name;
        self.sent += 1;
        let cid = format!("d{}-{}", self.spec.index, self.sent);
        // Mostly short bodies, now and then a large one.
        let pad = match self.rng.next_u64() % 50 {
            0 => 8192,
            n => 20 + (n as usize * 7) % 300,
        };
        let text = format!(
            r#"{{"op":"send","conv":"{conv}","cid":"{cid}","body":{{"from":{},"n":{},"pad":"{}"}}}}"#,
            self.spec.index,
            self.sent,
            "x".repeat(pad)
        )
        .into_bytes();
        conn.send_text(&text)?;
        self.shared.stats.sends.fetch_add(1, Relaxed);
        self.pending = Some(Pending { slot, cid, text, retry_at: None });
        Ok(())
    }

    /// A conversation to send into: pairs most often, the conversation of everyone least.
    fn pick_conv(&mut self) -> usize {
        let weights: Vec<u64> =
            self.convs.iter().map(|&c| self.shared.plan.convs[c as usize].weight as u64).collect();
        let mut roll = self.rng.next_u64() % weights.iter().sum::<u64>().max(1);
        for (slot, w) in weights.iter().enumerate() {
            if roll < *w {
                return slot;
            }
            roll -= w;
        }
        0
    }

    fn sync(&mut self, conn: &mut Conn, slot: usize) -> std::io::Result<()> {
        let order = &mut self.order[slot];
        order.syncing = true;
        order.resync = false;
        order.retry_at = None;
        let conv = &self.shared.plan.convs[self.convs[slot] as usize].name;
        let text = format!(r#"{{"op":"sync","conv":"{conv}","after":{},"cid":"sync-{slot}"}}"#, order.last);
        self.shared.stats.syncs.fetch_add(1, Relaxed);
        conn.send_text(text.as_bytes())
    }

    fn slot_of(&self, conv: &str) -> Option<usize> {
        self.convs.iter().position(|&c| self.shared.plan.convs[c as usize].name == conv)
    }

    fn on_text(&mut self, conn: &mut Conn, text: &[u8], hello: &mut bool) -> std::io::Result<()> {
        let stats = &self.shared.stats;
        let Ok(v) = serde_json::from_slice::<Value>(text) else {
            self.shared.report(format!(
                "device {}: unparsable frame {}",
                self.spec.index,
                String::from_utf8_lossy(text)
            ));
            stats.unexpected.fetch_add(1, Relaxed);
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
                    stats.unexpected.fetch_add(1, Relaxed);
                    return Ok(());
                };
                let before = self.order[slot].last;
                // Where and how it came, for the reports below.
                let how = if self.order[slot].syncing { "in a replay" } else { "live" };
                let node = self.node + 1;
                match self.order[slot].on_msg(seq) {
                    Seen::Next => {
                        stats.delivered.fetch_add(1, Relaxed);
                    }
                    Seen::Duplicate => {
                        stats.duplicated.fetch_add(1, Relaxed);
                        self.shared.report(format!(
                            "device {}: {conv} seq {seq} again (held up to {before}), {how} on node {node}",
                            self.spec.index
                        ));
                    }
                    Seen::Skipped => {
                        stats.out_of_order.fetch_add(1, Relaxed);
                        self.shared.report(format!(
                            "device {}: {conv} seq {seq} after {before} with no gap frame, {how} on node {node}",
                            self.spec.index
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
                self.shared.acked[self.convs[slot] as usize].fetch_max(seq, Relaxed);
                stats.acked.fetch_add(1, Relaxed);
                self.next_send = Instant::now() + self.send_interval();
            }
            "synced" => {
                let Some(slot) = self.slot_of(conv) else { return Ok(()) };
                if v["complete"] == Value::Bool(false) {
                    stats.incomplete.fetch_add(1, Relaxed);
                    self.shared.report(format!(
                        "device {}: {conv} history no longer reaches its seq",
                        self.spec.index
                    ));
                }
                self.order[slot].syncing = false;
                if self.order[slot].resync {
                    self.sync(conn, slot)?;
                } else if !self.ready && self.order.iter().all(|o| !o.syncing) {
                    self.ready = true;
                    stats.ready.fetch_add(1, Relaxed);
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
                if let Some(slot) = cid.strip_prefix("sync-").and_then(|s| s.parse::<usize>().ok()) {
                    if code == "unavailable" && slot < self.order.len() {
                        stats.unavailable.fetch_add(1, Relaxed);
                        self.order[slot].syncing = false;
                        self.order[slot].retry_at = Some(Instant::now() + RETRY_AFTER);
                        return Ok(());
                    }
                }
                if let Some(p) = &mut self.pending {
                    if p.cid == cid && code == "unavailable" {
                        stats.unavailable.fetch_add(1, Relaxed);
                        p.retry_at = Some(Instant::now() + RETRY_AFTER);
                        return Ok(());
                    }
                }
                stats.unexpected.fetch_add(1, Relaxed);
                self.shared.report(format!("device {}: {}", self.spec.index, String::from_utf8_lossy(text)));
            }
            _ => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seqs_in_order_are_next() {
        let mut o = Order::default();
        assert_eq!(o.on_msg(1), Seen::Next);
        assert_eq!(o.on_msg(2), Seen::Next);
        assert_eq!(o.last, 2);
    }

    #[test]
    fn a_repeat_is_a_duplicate_and_a_hole_a_skip() {
        let mut o = Order::default();
        o.on_msg(1);
        assert_eq!(o.on_msg(1), Seen::Duplicate);
        assert_eq!(o.on_msg(3), Seen::Skipped);
        // Counted once: the skip is held from there on.
        assert_eq!(o.on_msg(4), Seen::Next);
    }

    #[test]
    fn own_acks_are_stepped_over_and_their_replay_is_no_duplicate() {
        let mut o = Order::default();
        o.on_msg(1);
        // This connection sent 3 and got its ack before 2 arrived.
        o.on_ack(3);
        assert_eq!(o.last, 1);
        assert_eq!(o.on_msg(2), Seen::Next);
        assert_eq!(o.last, 3);
        // A sync after 1 replays 2 (a duplicate) and 3 (its own, not one).
        assert_eq!(o.on_msg(3), Seen::Next);
        assert_eq!(o.on_msg(2), Seen::Duplicate);
        assert_eq!(o.on_msg(4), Seen::Next);
    }

    #[test]
    fn a_new_connection_forgets_its_acks() {
        let mut o = Order::default();
        o.on_ack(1);
        assert_eq!(o.last, 1);
        o.reconnect();
        assert_eq!(o.on_msg(1), Seen::Duplicate);
    }
}
