//! A device: one thread that connects, behaves as its drawn plan says (syncs at once,
//! late or never; reads promptly or slowly through a small socket buffer; sends at once
//! or now and then; ends with a close, by vanishing, or not at all), records everything,
//! and comes back with the same device id, to the same node or another.
//!
//! What it remembers across its connections is what a real client keeps: the highest seq
//! it has of each conversation (its `sync` starts there) and the sends not acked yet,
//! which it sends again, with the same `cid`, on its next connection.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io;
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tungstenite::{Message, WebSocket};

use super::plan::{ConnPlan, DevicePlan, Ending, Reader, Rng, SyncPolicy};
use super::record::{Clock, ConnLog, Ev, Record};

/// What every device of a run shares.
pub struct Shared<'a> {
    pub clock: &'a Clock,
    pub record: &'a Record,
    pub secret: &'a str,
    /// The client address of each node (a restarted node keeps its ports).
    pub nodes: &'a [SocketAddr],
    /// Who is in each conversation, as the backend believes (the director keeps it).
    pub members: &'a Mutex<BTreeMap<String, HashSet<String>>>,
    /// The run is over: no new connection, no more sends; drain what is owed and stop.
    pub winding_down: &'a AtomicBool,
    /// Hands out connection ids.
    pub next_conn: &'a Mutex<usize>,
}

/// How long a drained connection must hear nothing before it is done.
const QUIET: Duration = Duration::from_millis(2500);
/// The most a drain waits at the end of a run.
const DRAIN_LIMIT: Duration = Duration::from_secs(25);
/// Granularity of a connection's loop (its read timeout).
const TICK: Duration = Duration::from_millis(15);

type Ws = WebSocket<TcpStream>;

/// Runs `device` until the run winds down.
pub fn run(device: &DevicePlan, shared: &Shared<'_>) {
    let mut rng = Rng::new(device.seed);
    let mut memory = Memory::default();
    // Devices do not all start at once.
    std::thread::sleep(rng.ms(0, 400));
    while !shared.winding_down.load(Ordering::Relaxed) {
        let plan = ConnPlan::draw(&mut rng, shared.nodes.len());
        let away = plan.away;
        Conn::run(device, plan, &mut rng, &mut memory, shared);
        sleep_unless_done(away, shared);
    }
}

fn sleep_unless_done(d: Duration, shared: &Shared<'_>) {
    let until = Instant::now() + d;
    while Instant::now() < until && !shared.winding_down.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// What a device keeps between connections.
#[derive(Default)]
struct Memory {
    /// The highest seq it has of each conversation.
    held: HashMap<String, u64>,
    /// Sends not acked yet: (conv, cid, body), resent on the next connection.
    unacked: Vec<(String, String, Value)>,
    sent: u64,
}

struct Conn<'a, 's> {
    device: &'a DevicePlan,
    plan: ConnPlan,
    shared: &'a Shared<'s>,
    log: ConnLog,
    ws: Ws,
    /// Highest seq of each conversation seen on this connection.
    seen: HashMap<String, u64>,
    /// Conversations told of with a `gap`, or whose `sync` was answered `unavailable`,
    /// not yet synced since: PROTOCOL.md has the client sync them (again).
    gapped: HashSet<String>,
    syncing: HashSet<String>,
    /// A sync answered `unavailable` is asked again after a pause, not at once.
    retry_after: HashMap<String, Instant>,
    ended: bool,
}

impl<'a, 's> Conn<'a, 's> {
    fn run(
        device: &'a DevicePlan,
        plan: ConnPlan,
        rng: &mut Rng,
        memory: &mut Memory,
        shared: &'a Shared<'s>,
    ) {
        let id = {
            let mut next = shared.next_conn.lock().unwrap_or_else(|e| e.into_inner());
            *next += 1;
            *next
        };
        let mut log = ConnLog {
            id,
            user: device.user.clone(),
            device: device.device.clone(),
            plan: plan.clone(),
            survived: false,
            events: Vec::new(),
        };
        log.events.push((shared.clock.now(), Ev::Connect));
        let ws = match connect(shared, device, &plan) {
            Ok(ws) => ws,
            Err(why) => {
                log.events.push((shared.clock.now(), Ev::Refused(why)));
                shared.record.conn(log);
                std::thread::sleep(rng.ms(50, 300));
                return;
            }
        };
        let mut conn = Conn {
            device,
            plan,
            shared,
            log,
            ws,
            seen: HashMap::new(),
            gapped: HashSet::new(),
            syncing: HashSet::new(),
            retry_after: HashMap::new(),
            ended: false,
        };
        conn.live(rng, memory);
        shared.record.conn(conn.log);
    }

    fn now(&self) -> f64 {
        self.shared.clock.now()
    }

    fn my_convs(&self) -> Vec<String> {
        let members = self.shared.members.lock().unwrap_or_else(|e| e.into_inner());
        members.iter().filter(|(_, m)| m.contains(&self.device.user)).map(|(c, _)| c.clone()).collect()
    }

    fn live(&mut self, rng: &mut Rng, memory: &mut Memory) {
        // The hello first: nothing else may come before it.
        let hello_deadline = Instant::now() + Duration::from_secs(10);
        while self.log.hello_at().is_none() && !self.ended {
            if Instant::now() > hello_deadline {
                self.end_now("no hello within 10 s");
                return;
            }
            self.read_once(memory);
        }
        if self.ended {
            return;
        }
        let born = Instant::now();
        if self.plan.send_at_once {
            self.send_new(rng, memory);
        }
        for (conv, cid, body) in memory.unacked.clone() {
            self.send(&conv, &cid, &body);
        }
        if self.plan.sync == SyncPolicy::AtOnce {
            self.sync_all(memory);
        }
        let mut next_send = self.plan.send_every.map(|every| born + jitter(rng, every));
        let mut late_sync = match self.plan.sync {
            SyncPolicy::Late(after) => Some(born + after),
            _ => None,
        };
        let mut reading_until = born + Duration::from_secs(3600);
        let mut paused_until = born;
        if let Reader::Slow { read, .. } = self.plan.reader {
            reading_until = born + read;
        }
        while !self.ended {
            let now = Instant::now();
            if self.shared.winding_down.load(Ordering::Relaxed) {
                return self.drain(memory);
            }
            if now >= born + self.plan.lifetime && self.plan.ending != Ending::Stay {
                return self.leave(memory);
            }
            if let Some(at) = next_send.filter(|at| now >= *at) {
                self.send_new(rng, memory);
                next_send = self.plan.send_every.map(|every| at + jitter(rng, every));
            }
            if late_sync.is_some_and(|at| now >= at) {
                late_sync = None;
                self.sync_all(memory);
            }
            if let Reader::Slow { read, pause } = self.plan.reader {
                if now >= reading_until && now >= paused_until {
                    paused_until = now + pause;
                    reading_until = paused_until + read;
                }
                if now < paused_until {
                    std::thread::sleep(TICK);
                    continue;
                }
            }
            self.read_once(memory);
            // A gap calls for a sync from its start (a client that never syncs ignores it).
            if self.plan.sync != SyncPolicy::Never {
                for conv in self.gapped.clone() {
                    let waiting = self.retry_after.get(&conv).is_some_and(|at| Instant::now() < *at);
                    if !self.syncing.contains(&conv) && !waiting {
                        self.sync(&conv, memory);
                    }
                }
            }
        }
    }

    /// The run is over: read everything owed (syncing what gaps call for, whatever the
    /// plan said about reading) until nothing has come for a while, then close.
    fn drain(&mut self, memory: &mut Memory) {
        let started = Instant::now();
        let mut last_heard = Instant::now();
        while !self.ended && last_heard.elapsed() < QUIET && started.elapsed() < DRAIN_LIMIT {
            let before = self.log.events.len();
            self.read_once(memory);
            if self.log.events.len() > before {
                last_heard = Instant::now();
            }
            if self.plan.sync != SyncPolicy::Never {
                for conv in self.gapped.clone() {
                    let waiting = self.retry_after.get(&conv).is_some_and(|at| Instant::now() < *at);
                    if !self.syncing.contains(&conv) && !waiting {
                        self.sync(&conv, memory);
                        last_heard = Instant::now();
                    }
                }
            }
        }
        if !self.ended {
            self.log.survived = true;
            self.end_now("run over");
            let _ = self.ws.close(None);
            let _ = self.ws.flush();
        }
    }

    fn leave(&mut self, memory: &mut Memory) {
        match self.plan.ending {
            Ending::Vanish => {
                // A reset, as when a phone loses its network for good.
                let _ = socket2::SockRef::from(self.ws.get_ref()).set_linger(Some(Duration::ZERO));
                self.end_now("vanished");
            }
            _ => {
                let _ = self.ws.close(None);
                let _ = self.ws.flush();
                // Read on until the server's close frame and EOF (bounded).
                let until = Instant::now() + Duration::from_secs(2);
                while !self.ended && Instant::now() < until {
                    self.read_once(memory);
                }
                if !self.ended {
                    self.end_now("closed");
                }
            }
        }
    }

    fn end_now(&mut self, why: &'static str) {
        let now = self.now();
        self.log.events.push((now, Ev::End(why)));
        self.ended = true;
    }

    fn read_once(&mut self, memory: &mut Memory) {
        match self.ws.read() {
            Ok(Message::Text(text)) => {
                let now = self.now();
                let frame: Value = match serde_json::from_str(text.as_str()) {
                    Ok(v) => v,
                    Err(e) => {
                        let why = format!("text that is not JSON ({e}): {}", text.as_str());
                        self.log.events.push((now, Ev::Frame(json!({ "op": "?", "raw": why }))));
                        return;
                    }
                };
                self.on_frame(&frame, memory);
                self.log.events.push((now, Ev::Frame(frame)));
            }
            Ok(Message::Close(frame)) => {
                let code = frame.map_or(1005, |f| u16::from(f.code));
                let now = self.now();
                self.log.events.push((now, Ev::Close(code)));
            }
            Ok(_) => {}
            Err(tungstenite::Error::Io(e))
                if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {}
            Err(e) => {
                let now = self.now();
                self.log.events.push((now, Ev::Eof(e.to_string())));
                self.end_now("stream ended");
            }
        }
    }

    fn on_frame(&mut self, frame: &Value, memory: &mut Memory) {
        let conv = frame["conv"].as_str().unwrap_or_default().to_owned();
        match frame["op"].as_str() {
            Some("msg") => {
                let seq = frame["seq"].as_u64().unwrap_or(0);
                let seen = self.seen.entry(conv.clone()).or_default();
                *seen = (*seen).max(seq);
                let held = memory.held.entry(conv).or_default();
                *held = (*held).max(seq);
            }
            Some("gap") => {
                self.gapped.insert(conv);
            }
            Some("synced") => {
                self.syncing.remove(&conv);
            }
            Some("ack") => {
                let cid = frame["cid"].as_str().unwrap_or_default();
                memory.unacked.retain(|(c, id, _)| !(c == &conv && id == cid));
            }
            Some("error") => {
                // A sync that failed is no longer running, and is asked again when the store
                // was unavailable; a send refused is not retried (`not_member`) or is
                // retried on the next connection (`unavailable`).
                if let Some(cid) = frame["cid"].as_str() {
                    let unavailable = frame["code"] == "unavailable";
                    if !unavailable {
                        memory.unacked.retain(|(_, id, _)| id != cid);
                    }
                    if let Some(conv) = cid.strip_prefix("sync:") {
                        self.syncing.remove(conv);
                        if unavailable {
                            self.gapped.insert(conv.to_owned());
                            self.retry_after
                                .insert(conv.to_owned(), Instant::now() + Duration::from_millis(250));
                        }
                    }
                }
            }
            _ => {}
        }
    }

    fn send_new(&mut self, rng: &mut Rng, memory: &mut Memory) {
        let convs = self.my_convs();
        if convs.is_empty() {
            return;
        }
        let conv = rng.pick(&convs).clone();
        memory.sent += 1;
        let cid = format!("{}-{}", self.device.device, memory.sent);
        // Bodies of all sizes, so that slow readers run into their budget.
        let pad = "x".repeat(rng.range(0, 3000) as usize);
        let body = json!({ "d": self.device.device, "n": memory.sent, "pad": pad });
        memory.unacked.push((conv.clone(), cid.clone(), body.clone()));
        self.send(&conv, &cid, &body);
    }

    fn send(&mut self, conv: &str, cid: &str, body: &Value) {
        let now = self.now();
        self.log.events.push((now, Ev::Sent { conv: conv.into(), cid: cid.into(), body: body.clone() }));
        let frame = json!({ "op": "send", "conv": conv, "cid": cid, "body": body });
        self.write(frame);
    }

    fn sync_all(&mut self, memory: &mut Memory) {
        for conv in self.my_convs() {
            self.sync(&conv, memory);
        }
    }

    /// Syncs `conv` from the highest seq the device holds (the start of a gap, after one).
    fn sync(&mut self, conv: &str, memory: &mut Memory) {
        let held = memory.held.get(conv).copied().unwrap_or(0);
        let after = held.max(self.seen.get(conv).copied().unwrap_or(0));
        self.gapped.remove(conv);
        self.syncing.insert(conv.to_owned());
        let now = self.now();
        self.log.events.push((now, Ev::Synced { conv: conv.into(), after }));
        let frame = json!({ "op": "sync", "conv": conv, "after": after, "cid": format!("sync:{conv}") });
        self.write(frame);
    }

    fn write(&mut self, frame: Value) {
        match self.ws.send(Message::text(frame.to_string())) {
            Ok(()) => {}
            // The frame stays in tungstenite's buffer and goes with the next write.
            Err(tungstenite::Error::Io(e))
                if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {}
            Err(e) => {
                let now = self.now();
                self.log.events.push((now, Ev::Eof(format!("write: {e}"))));
                self.end_now("stream ended");
            }
        }
    }
}

/// Between half and one and a half times `every`.
fn jitter(rng: &mut Rng, every: Duration) -> Duration {
    let ms = every.as_millis() as u64;
    Duration::from_millis(rng.range(ms / 2, ms + ms / 2).max(1))
}

fn connect(shared: &Shared<'_>, device: &DevicePlan, plan: &ConnPlan) -> Result<Ws, String> {
    let addr = shared.nodes[plan.node];
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
        .map_err(|e| e.to_string())?;
    if let Reader::Slow { .. } = plan.reader {
        socket.set_recv_buffer_size(4096).map_err(|e| e.to_string())?;
    }
    socket.connect_timeout(&addr.into(), Duration::from_secs(2)).map_err(|e| format!("connect: {e}"))?;
    let stream: TcpStream = socket.into();
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).map_err(|e| e.to_string())?;
    stream.set_write_timeout(Some(Duration::from_secs(2))).map_err(|e| e.to_string())?;
    let token =
        ringpush::auth::mint(shared.secret, &device.user, &device.device, 3600).map_err(|e| e.to_string())?;
    let url = format!("ws://{addr}/ws?token={token}");
    let (ws, _) = tungstenite::client(url.as_str(), stream).map_err(|e| format!("upgrade: {e}"))?;
    ws.get_ref().set_read_timeout(Some(TICK)).map_err(|e| e.to_string())?;
    Ok(ws)
}
