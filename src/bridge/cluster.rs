//! One worker's view of a Redis Cluster: the slot map (which master serves each of the
//! 16384 hash slots, from `CLUSTER SLOTS`), one connection per master, and the rounds that
//! send a batch's commands to their masters and follow `MOVED` / `ASK`.
//!
//! A batch's commands are grouped per master by the hash slot of their key, keeping their
//! order; every group is written (one pipeline each) before any reply is read, so a round
//! costs one round trip of wall time however many masters it reaches. Replies that send a
//! command elsewhere (`MOVED`, `ASK`), ask to come back (`TRYAGAIN`, `CLUSTERDOWN`) or
//! miss a script (`NOSCRIPT`) put it in the next round, at most [`ROUNDS`] rounds in all.

use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use redis::{Cmd, Connection, ConnectionAddr, ConnectionInfo, Value};

use super::slot::{cmd_key, key_slot, SLOTS};
use super::wire::{self, error_reply, is_code, is_noscript, Counters, Scripts, Timing};

/// No master (in the slot map) or no node (for a command).
const NONE: usize = usize::MAX;
/// Rounds of one batch: the first sending plus the re-sends after redirections and retries.
pub const ROUNDS: usize = 6;
/// Pause before a round re-sending `TRYAGAIN` / `CLUSTERDOWN` commands, times the round.
const RETRY_PAUSE: Duration = Duration::from_millis(25);

/// What became of one command.
#[derive(Debug)]
pub enum Outcome {
    /// Its reply (an error reply included).
    Reply(Value),
    /// Written, and the connection failed before its reply: it may or may not have run.
    Lost(String),
    /// Never run: its master is unreachable (or no master serves its slot).
    NotSent(String),
}

/// A node of the cluster, as `CLUSTER SLOTS` or a redirection named it.
struct Node {
    host: String,
    port: u16,
    /// `None` while unreachable.
    conn: Option<Connection>,
    /// How many of the registered scripts this connection has loaded.
    loaded: usize,
    /// While disconnected: no connect attempt before this.
    next_attempt: Instant,
}

/// A range of slots and the address of its master.
#[derive(Debug, PartialEq, Eq)]
struct Range {
    first: u16,
    last: u16,
    host: String,
    port: u16,
}

pub struct Cluster {
    /// The URL's connection settings (database 0); each node's replaces the address.
    base: ConnectionInfo,
    timing: Timing,
    /// Only appended to, so an index stays valid for the whole of a batch.
    nodes: Vec<Node>,
    /// The node serving each slot, or `NONE`.
    slots: Vec<usize>,
    /// The nodes that serve at least one slot, in index order.
    owners: Vec<usize>,
}

impl Cluster {
    /// The cluster whose node `base` answered `CLUSTER SLOTS` with `reply`; connects to
    /// every master and loads the scripts there. An error when no master could be reached.
    pub fn open(
        base: ConnectionInfo,
        reply: &Value,
        timing: Timing,
        scripts: &Scripts,
        counters: &Counters,
    ) -> Result<Cluster, String> {
        let ranges = parse_slots(reply, host_of(&base.addr))?;
        if ranges.is_empty() {
            return Err("redis cluster: no hash slot is assigned yet".into());
        }
        let mut cluster =
            Cluster { base, timing, nodes: Vec::new(), slots: vec![NONE; SLOTS], owners: Vec::new() };
        cluster.apply(ranges);
        let mut why = String::new();
        for node in cluster.owners.clone() {
            if let Err(e) = cluster.ready(node, scripts, counters) {
                why = e;
            }
        }
        match cluster.any_up() {
            true => Ok(cluster),
            false => Err(why),
        }
    }

    /// Whether every master that serves slots has a connection (whose last use succeeded).
    pub fn all_up(&self) -> bool {
        self.owners.iter().all(|&n| self.nodes[n].conn.is_some())
    }

    /// Whether any node has a connection.
    pub fn any_up(&self) -> bool {
        self.nodes.iter().any(|n| n.conn.is_some())
    }

    /// The masters' addresses, for finding the cluster again when the URL's node is gone.
    pub fn masters(&self) -> Vec<(String, u16)> {
        self.owners.iter().map(|&n| (self.nodes[n].host.clone(), self.nodes[n].port)).collect()
    }

    /// When the next connect attempt to a master that is down may be made (`None`: all up).
    pub fn next_repair(&self) -> Option<Instant> {
        let down = self.owners.iter().map(|&n| &self.nodes[n]).filter(|n| n.conn.is_none());
        down.map(|n| n.next_attempt).min()
    }

    /// The idle round: when a master is down, reads the slot map again (it may have moved
    /// on) and tries to reconnect (at most every `retry_every`); then pings every master.
    pub fn ping(&mut self, scripts: &Scripts, counters: &Counters) {
        if !self.all_up() {
            let _ = self.refresh(None, scripts, counters);
            for node in self.owners.clone() {
                let _ = self.ready(node, scripts, counters);
            }
        }
        let ping = redis::cmd("PING").get_packed_command();
        let mut written = Vec::new();
        for node in self.owners.clone() {
            let Some(conn) = self.nodes[node].conn.as_mut() else { continue };
            match conn.send_packed_command(&ping) {
                Ok(()) => written.push(node),
                Err(e) => drop(self.lost(node, &e)),
            }
        }
        for node in written {
            let Some(conn) = self.nodes[node].conn.as_mut() else { continue };
            if let Err(e) = conn.recv_response() {
                self.lost(node, &e);
            }
        }
    }

    /// Runs `cmds` (command `i` belongs to job `jobs[i]`) and answers one outcome per
    /// command, in order.
    pub fn execute(
        &mut self,
        cmds: &[&Cmd],
        jobs: &[usize],
        scripts: &Scripts,
        counters: &Counters,
    ) -> Vec<Outcome> {
        let n = cmds.len();
        let mut slot: Vec<Option<u16>> = cmds.iter().map(|cmd| cmd_key(cmd).map(key_slot)).collect();
        // A command without a key goes with a neighbour of its own job, so a job that
        // falls in one slot stays on one connection.
        for i in 1..n {
            if slot[i].is_none() && jobs[i] == jobs[i - 1] {
                slot[i] = slot[i - 1];
            }
        }
        for i in (0..n.saturating_sub(1)).rev() {
            if slot[i].is_none() && jobs[i] == jobs[i + 1] {
                slot[i] = slot[i + 1];
            }
        }
        let mut out: Vec<Option<Outcome>> = (0..n).map(|_| None).collect();
        // The node an `ASK` sent the command to, for its next sending only.
        let mut ask = vec![NONE; n];
        let mut noscript_retried = vec![false; n];
        // The reply that put a command in the next round, answered if no round is left.
        let mut deferred: Vec<Option<Value>> = (0..n).map(|_| None).collect();
        let mut pending: Vec<usize> = (0..n).collect();
        let mut refreshed = false;
        for round in 0..ROUNDS {
            if pending.is_empty() {
                break;
            }
            let mut groups: Vec<Vec<usize>> = vec![Vec::new(); self.nodes.len()];
            for &i in &pending {
                let node = match (ask[i], slot[i]) {
                    (NONE, Some(s)) => self.slots[usize::from(s)],
                    (NONE, None) => self.any_node(),
                    (node, _) => node,
                };
                match node {
                    NONE => {
                        let what = slot[i].map_or("a keyless command".into(), |s| format!("hash slot {s}"));
                        out[i] = Some(Outcome::NotSent(format!("redis cluster: no master serves {what}")));
                    }
                    node => groups[node].push(i),
                }
            }
            pending.clear();
            for (node, group) in groups.iter_mut().enumerate() {
                if group.is_empty() {
                    continue;
                }
                if let Err(why) = self.ready(node, scripts, counters) {
                    for i in group.drain(..) {
                        out[i] = Some(Outcome::NotSent(why.clone()));
                    }
                }
            }
            // Every group written before any reply is read: one round trip in all.
            let asking = redis::cmd("ASKING");
            let mut wrote = false;
            for (node, group) in groups.iter_mut().enumerate() {
                if group.is_empty() {
                    continue;
                }
                let mut packed = Vec::new();
                for &i in group.iter() {
                    if ask[i] != NONE {
                        asking.write_packed_command(&mut packed);
                    }
                    cmds[i].write_packed_command(&mut packed);
                }
                let sent = match self.nodes[node].conn.as_mut() {
                    Some(conn) => conn.send_packed_command(&packed),
                    None => continue,
                };
                match sent {
                    Ok(()) => wrote = true,
                    Err(e) => {
                        let why = self.lost(node, &e);
                        for i in group.drain(..) {
                            out[i] = Some(Outcome::Lost(why.clone()));
                        }
                    }
                }
            }
            if wrote {
                counters.round_trips.fetch_add(1, Relaxed);
            }
            let mut moved_at = None;
            let mut pause = false;
            let mut noscript = Vec::new();
            for (node, group) in groups.iter().enumerate() {
                for (k, &i) in group.iter().enumerate() {
                    let value = match self.recv(node, ask[i] != NONE) {
                        Ok(value) => value,
                        Err(e) => {
                            let why = self.lost(node, &e);
                            for &j in &group[k..] {
                                out[j] = Some(Outcome::Lost(why.clone()));
                            }
                            break;
                        }
                    };
                    let Value::ServerError(e) = &value else {
                        out[i] = Some(Outcome::Reply(value));
                        continue;
                    };
                    let redirect = match e.code() {
                        "MOVED" | "ASK" => e.details().and_then(|d| self.redirection(d, node)),
                        _ => None,
                    };
                    match redirect {
                        Some((s, target)) if e.code() == "MOVED" => {
                            self.slots[usize::from(s)] = target;
                            ask[i] = NONE;
                            moved_at.get_or_insert(node);
                        }
                        Some((_, target)) => ask[i] = target,
                        None if is_code(&value, "TRYAGAIN") || is_code(&value, "CLUSTERDOWN") => pause = true,
                        None if is_noscript(&value) && !noscript_retried[i] => {
                            noscript_retried[i] = true;
                            if !noscript.contains(&node) {
                                noscript.push(node);
                            }
                        }
                        None => {
                            out[i] = Some(Outcome::Reply(value));
                            continue;
                        }
                    }
                    if redirect.is_some() {
                        counters.redirects.fetch_add(1, Relaxed);
                    }
                    deferred[i] = Some(value);
                    pending.push(i);
                }
            }
            // Re-sent in their original order (so within one slot too).
            pending.sort_unstable();
            if let Some(node) = moved_at {
                if !refreshed {
                    refreshed = true;
                    if let Err(why) = self.refresh(Some(node), scripts, counters) {
                        tracing::warn!("redis cluster: reading the slot map after MOVED: {why}");
                    }
                }
                self.count_owners();
            }
            for node in noscript {
                self.reload(node, scripts);
            }
            if pause && round + 1 < ROUNDS {
                std::thread::sleep(RETRY_PAUSE * (round as u32 + 1));
            }
        }
        // Still redirected (or told to try again) after the last round: its last reply
        // (`MOVED ...`, `TRYAGAIN ...`, `CLUSTERDOWN ...`) fails its job.
        for i in pending {
            out[i] = Some(match deferred[i].take() {
                Some(value) => Outcome::Reply(value),
                None => Outcome::NotSent(format!("redis cluster: not answered after {ROUNDS} rounds")),
            });
        }
        out.into_iter()
            .map(|o| o.unwrap_or_else(|| Outcome::NotSent("redis cluster: not sent".into())))
            .collect()
    }

    /// The reply of the next command on `node`'s connection (after that of its `ASKING`).
    fn recv(&mut self, node: usize, asked: bool) -> redis::RedisResult<Value> {
        let Some(conn) = self.nodes[node].conn.as_mut() else {
            return Err(std::io::Error::from(std::io::ErrorKind::NotConnected).into());
        };
        if asked {
            conn.recv_response()?;
        }
        conn.recv_response()
    }

    /// `slot host:port` of a `MOVED` or `ASK` from `from`: the slot and the node (added
    /// when new). An empty host is `from`'s own (its endpoint is unknown to the cluster).
    fn redirection(&mut self, details: &str, from: usize) -> Option<(u16, usize)> {
        let (slot, addr) = details.split_once(' ')?;
        let slot: u16 = slot.parse().ok().filter(|&s| usize::from(s) < SLOTS)?;
        let (host, port) = addr.trim().rsplit_once(':')?;
        let port: u16 = port.parse().ok()?;
        let host = match host {
            "" => self.nodes[from].host.clone(),
            host => host.to_owned(),
        };
        Some((slot, self.node(host, port)))
    }

    /// A node for a command without a key: a connected master if there is one.
    fn any_node(&self) -> usize {
        let mut owners = self.owners.iter().copied();
        owners.clone().find(|&n| self.nodes[n].conn.is_some()).or_else(|| owners.next()).unwrap_or(NONE)
    }

    /// The index of the node at `host:port`, added when new.
    fn node(&mut self, host: String, port: u16) -> usize {
        if let Some(i) = self.nodes.iter().position(|n| n.host == host && n.port == port) {
            return i;
        }
        self.nodes.push(Node { host, port, conn: None, loaded: 0, next_attempt: Instant::now() });
        self.nodes.len() - 1
    }

    /// Takes `ranges` as the whole slot map.
    fn apply(&mut self, ranges: Vec<Range>) {
        self.slots.fill(NONE);
        for range in ranges {
            let node = self.node(range.host, range.port);
            self.slots[usize::from(range.first)..=usize::from(range.last)].fill(node);
        }
        self.count_owners();
    }

    fn count_owners(&mut self) {
        let mut owns = vec![false; self.nodes.len()];
        for &node in &self.slots {
            if node != NONE {
                owns[node] = true;
            }
        }
        self.owners = (0..owns.len()).filter(|&n| owns[n]).collect();
    }

    /// Reads the slot map again from `from` (else any connected node) and connects to the
    /// masters it names that are not connected (those whose retry time has come).
    fn refresh(&mut self, from: Option<usize>, scripts: &Scripts, counters: &Counters) -> Result<(), String> {
        let mut slots_cmd = redis::cmd("CLUSTER");
        slots_cmd.arg("SLOTS");
        let mut why = "no node is connected".to_owned();
        for node in from.into_iter().chain(0..self.nodes.len()) {
            let Some(conn) = self.nodes[node].conn.as_mut() else { continue };
            let reply = match wire::round_trip(conn, std::iter::once(&slots_cmd)) {
                Ok(mut values) => values.pop().unwrap_or(Value::Nil),
                Err(e) => {
                    why = self.lost(node, &e);
                    continue;
                }
            };
            match parse_slots(&reply, &self.nodes[node].host.clone()) {
                Ok(ranges) if !ranges.is_empty() => {
                    self.apply(ranges);
                    for node in self.owners.clone() {
                        let _ = self.ready(node, scripts, counters);
                    }
                    return Ok(());
                }
                Ok(_) => why = "CLUSTER SLOTS: no slot is assigned".into(),
                Err(e) => why = e,
            }
        }
        Err(why)
    }

    /// Makes sure `node` has a connection with every registered script loaded: connects
    /// when it has none (unless its retry time has not come), loads new scripts.
    fn ready(&mut self, node: usize, scripts: &Scripts, counters: &Counters) -> Result<(), String> {
        let registered = scripts.len();
        let n = &mut self.nodes[node];
        if let Some(conn) = n.conn.as_mut() {
            if registered > n.loaded {
                match wire::load_scripts(conn, scripts, n.loaded) {
                    Ok(loaded) => n.loaded = loaded,
                    Err(why) => {
                        let why = format!("redis {}:{}: {why}", n.host, n.port);
                        self.drop_conn(node, &why);
                        return Err(why);
                    }
                }
            }
            return Ok(());
        }
        let (info, timing) = (self.info(node), self.timing);
        let n = &mut self.nodes[node];
        if Instant::now() < n.next_attempt {
            return Err(format!("redis {}:{} is unreachable", n.host, n.port));
        }
        let opened = wire::connect(&info, timing).and_then(|mut conn| {
            let loaded = wire::load_scripts(&mut conn, scripts, 0)?;
            wire::settle(&conn, timing)?;
            Ok((conn, loaded))
        });
        match opened {
            Ok((conn, loaded)) => {
                n.conn = Some(conn);
                n.loaded = loaded;
                counters.connects.fetch_add(1, Relaxed);
                tracing::info!("redis: connected to cluster node {}:{}", n.host, n.port);
                Ok(())
            }
            Err(why) => {
                n.next_attempt = Instant::now() + timing.retry_every;
                tracing::debug!("redis: cannot connect to cluster node {}:{}: {why}", n.host, n.port);
                Err(format!("redis {}:{} is unreachable: {why}", n.host, n.port))
            }
        }
    }

    /// Loads every script again on `node` after a `NOSCRIPT` (its cache was flushed).
    fn reload(&mut self, node: usize, scripts: &Scripts) {
        let Some(conn) = self.nodes[node].conn.as_mut() else { return };
        match wire::load_scripts(conn, scripts, 0) {
            Ok(loaded) => self.nodes[node].loaded = loaded,
            Err(why) => {
                let why = format!("reloading scripts after NOSCRIPT: {why}");
                self.drop_conn(node, &why);
            }
        }
    }

    /// Drops `node`'s connection after `e`; answers why, for the commands it took along.
    fn lost(&mut self, node: usize, e: &redis::RedisError) -> String {
        let n = &self.nodes[node];
        let why = format!("redis {}:{} connection lost: {e}", n.host, n.port);
        self.drop_conn(node, &why);
        why
    }

    fn drop_conn(&mut self, node: usize, why: &str) {
        let n = &mut self.nodes[node];
        if n.conn.take().is_some() {
            tracing::warn!("redis: {why}");
        }
        n.next_attempt = Instant::now() + self.timing.retry_every;
    }

    /// The URL's settings (password, username, TLS, protocol) with `node`'s address.
    fn info(&self, node: usize) -> ConnectionInfo {
        let mut info = self.base.clone();
        info.addr = with_address(&self.base.addr, &self.nodes[node].host, self.nodes[node].port);
        info
    }
}

/// `addr` (TCP, or TCP with its TLS settings) moved to `host:port`.
pub fn with_address(addr: &ConnectionAddr, host: &str, port: u16) -> ConnectionAddr {
    match addr {
        ConnectionAddr::TcpTls { insecure, tls_params, .. } => ConnectionAddr::TcpTls {
            host: host.to_owned(),
            port,
            insecure: *insecure,
            tls_params: tls_params.clone(),
        },
        _ => ConnectionAddr::Tcp(host.to_owned(), port),
    }
}

fn host_of(addr: &ConnectionAddr) -> &str {
    match addr {
        ConnectionAddr::Tcp(host, _) | ConnectionAddr::TcpTls { host, .. } => host,
        _ => "127.0.0.1",
    }
}

/// The masters' ranges of a `CLUSTER SLOTS` reply. A master whose endpoint is unknown to
/// the cluster (an empty or null host) is at `default_host`, the host that answered; one
/// whose endpoint is `?` cannot be reached, and its range is left out.
fn parse_slots(reply: &Value, default_host: &str) -> Result<Vec<Range>, String> {
    let bad = || match error_reply(reply) {
        Some(e) => format!("CLUSTER SLOTS: {e}"),
        None => format!("CLUSTER SLOTS: unexpected reply {reply:?}"),
    };
    let Value::Array(ranges) = reply else { return Err(bad()) };
    let mut out = Vec::new();
    for range in ranges {
        let Value::Array(parts) = range else { return Err(bad()) };
        let (Some(Value::Int(first)), Some(Value::Int(last)), Some(Value::Array(master))) =
            (parts.first(), parts.get(1), parts.get(2))
        else {
            return Err(bad());
        };
        let host = match master.first() {
            Some(Value::BulkString(host)) => String::from_utf8_lossy(host).into_owned(),
            Some(Value::SimpleString(host)) => host.clone(),
            Some(Value::Nil) | None => String::new(),
            _ => return Err(bad()),
        };
        let Some(Value::Int(port)) = master.get(1) else { return Err(bad()) };
        let (Ok(first), Ok(last), Ok(port)) =
            (u16::try_from(*first), u16::try_from(*last), u16::try_from(*port))
        else {
            return Err(bad());
        };
        if first > last || usize::from(last) >= SLOTS {
            return Err(bad());
        }
        let host = match host.as_str() {
            "?" => continue,
            "" => default_host.to_owned(),
            _ => host,
        };
        out.push(Range { first, last, host, port });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn slots_reply_is_read() {
        let reply = Value::Array(vec![
            Value::Array(vec![
                Value::Int(0),
                Value::Int(5460),
                Value::Array(vec![bulk("10.0.0.1"), Value::Int(7000), bulk("id1")]),
                Value::Array(vec![bulk("10.0.0.4"), Value::Int(7003), bulk("id4")]),
            ]),
            Value::Array(vec![
                Value::Int(5461),
                Value::Int(10922),
                Value::Array(vec![bulk(""), Value::Int(7001), bulk("id2")]),
            ]),
            Value::Array(vec![
                Value::Int(10923),
                Value::Int(16383),
                Value::Array(vec![bulk("?"), Value::Int(7002), bulk("id3")]),
            ]),
        ]);
        let ranges = parse_slots(&reply, "seed").unwrap();
        assert_eq!(
            ranges,
            vec![
                Range { first: 0, last: 5460, host: "10.0.0.1".into(), port: 7000 },
                Range { first: 5461, last: 10922, host: "seed".into(), port: 7001 },
            ]
        );
        assert!(parse_slots(&Value::Int(1), "seed").is_err());
        assert!(parse_slots(&Value::Array(vec![Value::Array(vec![Value::Int(0)])]), "seed").is_err());
    }
}
