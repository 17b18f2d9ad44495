//! The oracle: what PROTOCOL.md promises, checked on every connection's frames.
//!
//! Times are the clients' (one clock for the whole run), so each promise is checked only
//! where the clients' view decides it: a seq whose `send` left after a connection's
//! `hello` was surely accepted after it (it must arrive); a seq whose `ack` came back
//! before the connection even started its TCP connect was surely accepted before it (the
//! connection must hear nothing of it unless it asks). Seqs in between may go either way.
//!
//! Checked, per connection and conversation:
//! - `hello` first and once; no frame of a kind or code PROTOCOL.md does not allow here;
//! - `msg` seqs strictly increasing, but for the one restart a `sync` may cause: its
//!   replay starts after the `after` asked for, below what was in flight when the client
//!   asked (a client that asks again for what it has gets it again);
//! - every seq accepted after `hello`, while the user was surely a member, arrives as
//!   `msg` or inside a `gap` (whose `sync` the client sends), unless the connection
//!   ended too soon after it, or read slowly and did not survive to the end of the run;
//! - nothing about an earlier seq (no `msg`, no `gap`) unless a `sync` asked for it;
//! - no `msg` of a conversation the user was surely not in;
//! - on the sending connection, the `ack` before any `msg` with a later seq, and no
//!   `msg` of its own send unless a replay brings it;
//! - one seq per (user, conversation, cid), one message per seq, and every `msg` equal to
//!   what was sent (sender, device, cid, body);
//! - `synced.last` never below the `after` asked for nor below any `msg` delivered
//!   before it, `complete` (history is never trimmed in these runs);
//! - pushes and broadcasts in the order sent; on one node, every one sent after `hello`
//!   arrives, unless the connection was closed with 4002;
//! - a client that never syncs gets each message within about the grace (1 s) of its
//!   `hello`, or of its sending when later: never held until a heartbeat.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;

use serde_json::Value;

use super::plan::{Reader, SyncPolicy};
use super::record::{Call, ConnLog, Done, Ev, Ms};

/// What the checks allow for the machine they run on.
pub struct Bounds {
    pub cluster: bool,
    /// How long after a seq's `ack` a connection must have been open for the seq to be
    /// owed to it (delivery takes time; a connection that ends sooner may miss it).
    pub settle_ms: Ms,
    /// How late a never-syncing client's message may come past the 1 s grace.
    pub late_ms: Ms,
    /// How long after a membership change (or fault) its effect is uncertain.
    pub change_ms: Ms,
}

#[derive(Debug)]
pub struct Violation {
    pub conn: usize,
    pub what: String,
    /// The shortest trace that shows it: the connection's events about the conversation
    /// up to the violation.
    pub trace: String,
}

/// A message sequenced in a conversation, as the clients know it.
#[derive(Clone, Debug)]
struct SeqInfo {
    from: String,
    dev: Option<String>,
    cid: Option<String>,
    body: Value,
    /// When its `send` (or API post) left: it was sequenced after this.
    sent_at: Ms,
    /// When its `ack` (or API answer) came: it was sequenced before this.
    ack_at: Option<Ms>,
}

/// A send, by (user, conversation, cid).
struct SendInfo {
    body: Value,
    dev: String,
    sent_at: Ms,
    first_conn: usize,
}

pub fn check(
    conns: &[ConnLog],
    calls: &[Call],
    initial: &[(String, Vec<String>)],
    bounds: &Bounds,
) -> Vec<Violation> {
    let mut out = Vec::new();
    let mut bad = |conn: usize, what: String, trace: String| out.push(Violation { conn, what, trace });

    // Every send, by (user, conv, cid).
    let mut sends: HashMap<(String, String, String), SendInfo> = HashMap::new();
    for c in conns {
        for (t, e) in &c.events {
            if let Ev::Sent { conv, cid, body } = e {
                let key = (c.user.clone(), conv.clone(), cid.clone());
                match sends.get(&key) {
                    Some(s) if s.body != *body => {
                        bad(c.id, format!("cid {cid} reused with another body"), String::new())
                    }
                    Some(_) => {}
                    None => {
                        let info = SendInfo {
                            body: body.clone(),
                            dev: c.device.clone(),
                            sent_at: *t,
                            first_conn: c.id,
                        };
                        sends.insert(key, info);
                    }
                }
            }
        }
    }
    // Every acked seq, and the API posts.
    let mut seqs: BTreeMap<(String, u64), SeqInfo> = BTreeMap::new();
    let mut seq_of: HashMap<(String, String, String), u64> = HashMap::new();
    for c in conns {
        for (t, e) in &c.events {
            let Ev::Frame(f) = e else { continue };
            if f["op"] != "ack" {
                continue;
            }
            let (conv, cid, seq) = (str_of(f, "conv"), str_of(f, "cid"), f["seq"].as_u64().unwrap_or(0));
            let key = (c.user.clone(), conv.clone(), cid.clone());
            let Some(send) = sends.get(&key) else {
                bad(c.id, format!("ack for a cid never sent: {f}"), trace(c, &conv, *t));
                continue;
            };
            match seq_of.insert(key, seq) {
                Some(first) if first != seq => bad(
                    c.id,
                    format!("cid {cid} of {conv} acked as seq {first} and as {seq}"),
                    trace(c, &conv, *t),
                ),
                _ => {}
            }
            let info = SeqInfo {
                from: c.user.clone(),
                dev: Some(send.dev.clone()),
                cid: Some(cid.clone()),
                body: send.body.clone(),
                sent_at: send.sent_at,
                ack_at: Some(*t),
            };
            match seqs.get_mut(&(conv.clone(), seq)) {
                Some(known) if known.cid != info.cid || known.from != info.from => bad(
                    c.id,
                    format!(
                        "seq {seq} of {conv} acked for {}/{:?} and for {}/{cid}",
                        known.from, known.cid, c.user
                    ),
                    trace(c, &conv, *t),
                ),
                Some(known) => known.ack_at = Some(known.ack_at.map_or(*t, |a| a.min(*t))),
                None => {
                    seqs.insert((conv, seq), info);
                }
            }
        }
    }
    for call in calls {
        if let Done::Post { conv, body, seq: Some(seq) } = &call.what {
            let info = SeqInfo {
                from: "system".into(),
                dev: None,
                cid: None,
                body: body.clone(),
                sent_at: call.at,
                ack_at: Some(call.done),
            };
            if seqs.insert((conv.clone(), *seq), info).is_some() {
                bad(
                    0,
                    format!("seq {seq} of {conv} given to an API post and to another message"),
                    String::new(),
                );
            }
        }
    }
    // Seqs stored but never acked (the sender went before the ack came) show up as msgs.
    for c in conns {
        for (t, e) in &c.events {
            let Ev::Frame(f) = e else { continue };
            if f["op"] != "msg" {
                continue;
            }
            let (conv, seq) = (str_of(f, "conv"), f["seq"].as_u64().unwrap_or(0));
            if seqs.contains_key(&(conv.clone(), seq)) || f["cid"].is_null() {
                continue;
            }
            let key = (str_of(f, "from"), conv.clone(), str_of(f, "cid"));
            match sends.get(&key) {
                Some(send) => {
                    let info = SeqInfo {
                        from: key.0.clone(),
                        dev: Some(send.dev.clone()),
                        cid: Some(key.2.clone()),
                        body: send.body.clone(),
                        sent_at: send.sent_at,
                        ack_at: None,
                    };
                    seqs.insert((conv, seq), info);
                }
                None => bad(c.id, format!("msg of a send nobody made: {}", short(f)), trace(c, &conv, *t)),
            }
        }
    }

    let members = Members::new(initial, calls, bounds.change_ms);
    let faults: Vec<(Ms, Ms)> = calls
        .iter()
        .filter(|c| matches!(c.what, Done::Fault(_)))
        .map(|c| (c.at, c.done + bounds.change_ms))
        .collect();
    let disturbed = |from: Ms, to: Ms| faults.iter().any(|(a, b)| *a <= to && from <= *b);
    let pushes: Vec<&Call> =
        calls.iter().filter(|c| matches!(c.what, Done::Push { via: Some(_), .. })).collect();
    // Which node took each push: pushes through one node keep their order; through
    // different nodes they have none.
    let push_via: HashMap<u64, usize> = calls
        .iter()
        .filter_map(|c| match c.what {
            Done::Push { k, via: Some(node), .. } => Some((k, node)),
            _ => None,
        })
        .collect();

    for c in conns {
        let Some(hello_at) = c.hello_at() else { continue };
        let connect_at = c.connect_at();
        let end_at = c.end_at();
        // The running seq of each conversation, and the highest ever seen.
        let mut last: HashMap<String, u64> = HashMap::new();
        let mut high: HashMap<String, u64> = HashMap::new();
        let mut got: HashMap<String, Vec<u64>> = HashMap::new();
        let mut gaps: HashMap<String, Vec<(u64, u64)>> = HashMap::new();
        // The lowest `after` of the syncs of each conversation sent so far (what they
        // may bring back), and the `after`s of those not answered yet, in order.
        let mut asked: HashMap<String, u64> = HashMap::new();
        // Each open sync: its `after`, and whether its replay has restarted the seqs.
        let mut open_syncs: HashMap<String, Vec<(u64, bool)>> = HashMap::new();
        let mut pending_acks: HashMap<String, Vec<String>> = HashMap::new();
        let mut own: HashMap<(String, String), bool> = HashMap::new();
        let mut pushes_seen: Vec<u64> = Vec::new();
        let mut last_push_via: HashMap<usize, u64> = HashMap::new();
        let mut hellos = 0;
        for (i, (t, e)) in c.events.iter().enumerate() {
            let t = *t;
            match e {
                Ev::Sent { conv, cid, .. } => {
                    pending_acks.entry(conv.clone()).or_default().push(cid.clone());
                    let first_here = sends
                        .get(&(c.user.clone(), conv.clone(), cid.clone()))
                        .is_some_and(|s| s.first_conn == c.id);
                    own.insert((conv.clone(), cid.clone()), first_here);
                }
                Ev::Synced { conv, after } => {
                    let low = asked.entry(conv.clone()).or_insert(*after);
                    *low = (*low).min(*after);
                    open_syncs.entry(conv.clone()).or_default().push((*after, false));
                }
                Ev::Frame(f) => {
                    let op = f["op"].as_str().unwrap_or("?");
                    if hellos == 0 && op != "hello" {
                        bad(c.id, format!("{} before hello", short(f)), trace_all(c, i));
                    }
                    let conv = str_of(f, "conv");
                    let asked_below = |s: u64| asked.get(&conv).is_some_and(|after| *after < s);
                    match op {
                        "hello" => {
                            hellos += 1;
                            if hellos > 1 {
                                bad(c.id, "a second hello".into(), trace_all(c, i));
                            }
                        }
                        "msg" => {
                            let seq = f["seq"].as_u64().unwrap_or(0);
                            let prev = last.get(&conv).copied().unwrap_or(0);
                            if seq <= prev && last.contains_key(&conv) {
                                // The replay of an open sync may start below what was in
                                // flight when it was asked for, once.
                                let restart = open_syncs.get_mut(&conv).and_then(|o| {
                                    o.iter_mut().find(|(after, restarted)| !*restarted && *after < seq)
                                });
                                match restart {
                                    Some(sync) => sync.1 = true,
                                    None => bad(
                                        c.id,
                                        format!("msg {seq} of {conv} after {prev}: not increasing"),
                                        trace(c, &conv, t),
                                    ),
                                }
                            }
                            last.insert(conv.clone(), seq);
                            let h = high.entry(conv.clone()).or_default();
                            *h = (*h).max(seq);
                            got.entry(conv.clone()).or_default().push(seq);
                            let Some(info) = seqs.get(&(conv.clone(), seq)) else { continue };
                            if !same_message(f, info) {
                                bad(
                                    c.id,
                                    format!("msg {seq} of {conv} differs from what was sent: {}", short(f)),
                                    trace(c, &conv, t),
                                );
                            }
                            if info.ack_at.is_some_and(|a| a < connect_at) && !asked_below(seq) {
                                bad(c.id, format!("msg {seq} of {conv}, acked before this connection began, came unasked"), trace(c, &conv, t));
                            }
                            if members.surely(&c.user, &conv, info.sent_at, info.ack_at.unwrap_or(t))
                                == Some(false)
                                && !asked_below(seq)
                            {
                                let history = members.history(&c.user, &conv);
                                bad(c.id, format!("msg {seq} of {conv} (sent at {:.0} ms) reached {}, not a member ({history})", info.sent_at, c.user), trace(c, &conv, t));
                            }
                            if let Some(cid) = &info.cid {
                                if info.from == c.user
                                    && own.get(&(conv.clone(), cid.clone())) == Some(&true)
                                    && !asked_below(seq)
                                {
                                    bad(
                                        c.id,
                                        format!("the sending connection got msg {seq} of its own send {cid}"),
                                        trace(c, &conv, t),
                                    );
                                }
                            }
                            for cid in pending_acks.get(&conv).into_iter().flatten() {
                                if let Some(mine) = seq_of.get(&(c.user.clone(), conv.clone(), cid.clone())) {
                                    if *mine < seq {
                                        bad(c.id, format!("msg {seq} of {conv} came before the ack of this connection's seq {mine} ({cid})"), trace(c, &conv, t));
                                    }
                                }
                            }
                            let never_syncs =
                                c.plan.sync == SyncPolicy::Never && c.plan.reader == Reader::Prompt;
                            if never_syncs && info.sent_at > hello_at {
                                let due = info.ack_at.unwrap_or(info.sent_at).max(hello_at + 1000.0)
                                    + bounds.late_ms;
                                if t > due && !disturbed(info.sent_at, t) {
                                    bad(c.id, format!("msg {seq} of {conv} came {:.0} ms after it was due (never-syncing client)", t - due + bounds.late_ms), trace(c, &conv, t));
                                }
                            }
                        }
                        "gap" => {
                            let (from, to) = (f["from"].as_u64().unwrap_or(0), f["to"].as_u64().unwrap_or(0));
                            if from > to || from == 0 {
                                bad(c.id, format!("malformed {}", short(f)), trace(c, &conv, t));
                            }
                            if let Some(prev) = last.get(&conv).filter(|p| **p >= from) {
                                bad(
                                    c.id,
                                    format!("gap {from}..{to} of {conv} covers msg {prev}, already sent"),
                                    trace(c, &conv, t),
                                );
                            }
                            let earlier = (from..=to.min(from + 10_000)).find(|s| {
                                seqs.get(&(conv.clone(), *s))
                                    .and_then(|i| i.ack_at)
                                    .is_some_and(|a| a < connect_at)
                                    && !asked_below(*s)
                            });
                            if let Some(s) = earlier {
                                bad(c.id, format!("gap {from}..{to} of {conv} tells of seq {s}, acked before this connection began, unasked"), trace(c, &conv, t));
                            }
                            gaps.entry(conv.clone()).or_default().push((from, to));
                        }
                        "synced" => {
                            let Some((after, _)) =
                                open_syncs.get_mut(&conv).filter(|o| !o.is_empty()).map(|o| o.remove(0))
                            else {
                                bad(c.id, format!("synced of {conv} nobody asked for"), trace(c, &conv, t));
                                continue;
                            };
                            let synced_last = f["last"].as_u64().unwrap_or(0);
                            if synced_last < after {
                                bad(
                                    c.id,
                                    format!("synced.last below the after ({after}) asked for: {}", short(f)),
                                    trace(c, &conv, t),
                                );
                            }
                            let delivered = high.get(&conv).copied().unwrap_or(0);
                            if synced_last < delivered {
                                bad(
                                    c.id,
                                    format!(
                                        "synced.last below msg {delivered}, delivered before it: {}",
                                        short(f)
                                    ),
                                    trace(c, &conv, t),
                                );
                            }
                            // Live messages follow the replay.
                            last.insert(conv.clone(), delivered.max(synced_last));
                            if f["complete"] != true {
                                bad(
                                    c.id,
                                    format!("history never trimmed here, yet {}", short(f)),
                                    trace(c, &conv, t),
                                );
                            }
                        }
                        "ack" => {
                            let cid = str_of(f, "cid");
                            if let Some(list) = pending_acks.get_mut(&conv) {
                                list.retain(|pending| *pending != cid);
                            }
                        }
                        "push" => {
                            let k = f["body"]["k"].as_u64().unwrap_or(0);
                            let via = push_via.get(&k).copied().unwrap_or(usize::MAX);
                            if let Some(prev) = last_push_via.get(&via).filter(|p| **p >= k) {
                                bad(
                                    c.id,
                                    format!(
                                        "push {k} after push {prev}, both through node {}: out of order",
                                        via + 1
                                    ),
                                    trace_all(c, i),
                                );
                            }
                            last_push_via.insert(via, k);
                            pushes_seen.push(k);
                        }
                        "error" => {
                            let code = str_of(f, "code");
                            let cid = str_of(f, "cid");
                            let allowed = match code.as_str() {
                                "unavailable" => bounds.cluster,
                                // A send or sync racing a membership change.
                                "not_member" => {
                                    let conv = conv_of_cid(c, &cid);
                                    members.surely(&c.user, &conv, t - 5000.0, t) != Some(true)
                                }
                                _ => false,
                            };
                            if !allowed {
                                bad(c.id, format!("unexpected {}", short(f)), trace_all(c, i));
                            }
                            if let Some(conv) = cid.strip_prefix("sync:") {
                                if let Some(o) = open_syncs.get_mut(conv).filter(|o| !o.is_empty()) {
                                    o.remove(0);
                                }
                            }
                            // A send that failed will not be acked.
                            for list in pending_acks.values_mut() {
                                list.retain(|pending| *pending != cid);
                            }
                        }
                        _ => bad(
                            c.id,
                            format!("a frame PROTOCOL.md does not define: {}", short(f)),
                            trace_all(c, i),
                        ),
                    }
                }
                Ev::Close(code) => {
                    let allowed = match code {
                        4002 => matches!(c.plan.reader, Reader::Slow { .. }),
                        1000 | 1005 => true,
                        1001 => bounds.cluster,
                        _ => false,
                    };
                    if !allowed {
                        bad(c.id, format!("closed with {code}"), trace_all(c, i));
                    }
                }
                _ => {}
            }
        }

        // What was owed and never came.
        let reads_all = c.plan.reader == Reader::Prompt || c.survived;
        if !reads_all || (bounds.cluster && !c.survived) {
            continue;
        }
        let by_4002 = c.closed_with() == Some(4002);
        for ((conv, seq), info) in &seqs {
            let Some(ack_at) = info.ack_at else { continue };
            if info.sent_at <= hello_at || ack_at + bounds.settle_ms >= end_at || by_4002 {
                continue;
            }
            if members.surely(&c.user, conv, hello_at.min(info.sent_at), ack_at) != Some(true) {
                continue;
            }
            // Its own sends reach the sending connection as acks.
            let own_send = info
                .cid
                .as_ref()
                .is_some_and(|cid| info.from == c.user && own.contains_key(&(conv.clone(), cid.clone())));
            let as_msg = own_send || got.get(conv).is_some_and(|g| g.contains(seq));
            let in_gap = gaps.get(conv).is_some_and(|g| g.iter().any(|(f, t)| f <= seq && seq <= t));
            if !as_msg && !in_gap {
                let when = format!(
                    "sent by {} at {:.0} ms, acked at {ack_at:.0} ms; this connection: hello at {hello_at:.0} ms, end at {end_at:.0} ms",
                    info.from, info.sent_at
                );
                bad(
                    c.id,
                    format!("seq {seq} of {conv} never arrived, as msg or in a gap ({when})"),
                    trace(c, conv, end_at),
                );
            }
        }
        if !bounds.cluster && !by_4002 {
            for call in &pushes {
                let Done::Push { k, users, .. } = &call.what else { continue };
                let mine = users.as_ref().is_none_or(|u| u.contains(&c.user));
                if mine
                    && call.at > hello_at
                    && call.done + bounds.settle_ms < end_at
                    && !pushes_seen.contains(k)
                {
                    bad(
                        c.id,
                        format!("push {k} (sent at {:.0} ms) never arrived", call.at),
                        trace_all(c, c.events.len()),
                    );
                }
            }
        }
    }
    out
}

/// A membership change: made at, answered at (plus the uncertainty after it), and whether
/// the user is a member after it (`None` after a call that failed: it may or may not have
/// been applied).
type Change = (Ms, Ms, Option<bool>);

/// Who was in which conversation when, as the director's calls show it.
struct Members {
    initial: HashMap<(String, String), bool>,
    /// Per (user, conv): its changes.
    changes: HashMap<(String, String), Vec<Change>>,
}

impl Members {
    fn new(initial: &[(String, Vec<String>)], calls: &[Call], change_ms: Ms) -> Members {
        let mut first = HashMap::new();
        for (conv, members) in initial {
            for user in members {
                first.insert((user.clone(), conv.clone()), true);
            }
        }
        let mut changes: HashMap<(String, String), Vec<Change>> = HashMap::new();
        for call in calls {
            if let Done::Member { conv, user, join, ok } = &call.what {
                let after = ok.then_some(*join);
                changes.entry((user.clone(), conv.clone())).or_default().push((
                    call.at,
                    call.done + change_ms,
                    after,
                ));
            }
        }
        Members { initial: first, changes }
    }

    /// The membership of `user` in `conv` over the run, for a report.
    fn history(&self, user: &str, conv: &str) -> String {
        let key = (user.to_owned(), conv.to_owned());
        let mut out = format!("member at the start: {}", self.initial.get(&key).copied().unwrap_or(false));
        for (at, settled, join) in self.changes.get(&key).into_iter().flatten() {
            let what = match join {
                Some(true) => "joined",
                Some(false) => "left",
                None => "a change that failed",
            };
            out.push_str(&format!("; {what} from {at:.0} to {settled:.0} ms"));
        }
        out
    }

    /// Whether `user` was surely a member of `conv` (`Some(true)`), surely not
    /// (`Some(false)`), throughout `from..=to`; `None` when a change was under way.
    fn surely(&self, user: &str, conv: &str, from: Ms, to: Ms) -> Option<bool> {
        let key = (user.to_owned(), conv.to_owned());
        let mut member = Some(self.initial.get(&key).copied().unwrap_or(false));
        for (at, settled, join) in self.changes.get(&key).into_iter().flatten() {
            if *at <= to && from <= *settled {
                return None;
            }
            if *settled < from {
                member = *join;
            }
        }
        member
    }
}

fn str_of(f: &Value, key: &str) -> String {
    f[key].as_str().unwrap_or_default().to_owned()
}

fn same_message(f: &Value, info: &SeqInfo) -> bool {
    f["from"] == info.from.as_str()
        && f["dev"].as_str() == info.dev.as_deref()
        && f["cid"].as_str() == info.cid.as_deref()
        && f["body"] == info.body
}

/// The conversation a client request with this cid was about.
fn conv_of_cid(c: &ConnLog, cid: &str) -> String {
    if let Some(conv) = cid.strip_prefix("sync:") {
        return conv.to_owned();
    }
    c.events
        .iter()
        .find_map(|(_, e)| match e {
            Ev::Sent { conv, cid: id, .. } if id == cid => Some(conv.clone()),
            _ => None,
        })
        .unwrap_or_default()
}

/// A frame as one short line (bodies' padding left out).
fn short(f: &Value) -> String {
    let mut f = f.clone();
    if let Some(body) = f.get_mut("body").and_then(Value::as_object_mut) {
        body.remove("pad");
    }
    let s = f.to_string();
    if s.len() > 240 {
        format!("{}...", &s[..240])
    } else {
        s
    }
}

fn describe(e: &Ev) -> String {
    match e {
        Ev::Frame(f) => format!("<- {}", short(f)),
        Ev::Sent { conv, cid, .. } => format!("-> send {conv} cid {cid}"),
        Ev::Synced { conv, after } => format!("-> sync {conv} after {after}"),
        Ev::Connect => "connect".into(),
        Ev::Refused(why) => format!("refused: {why}"),
        Ev::Close(code) => format!("<- close {code}"),
        Ev::Eof(why) => format!("stream ended: {why}"),
        Ev::End(why) => format!("end: {why}"),
    }
}

fn header(c: &ConnLog) -> String {
    format!(
        "connection {} of {}/{} on node {} ({:?}, {:?}, ends {:?}{})\n",
        c.id,
        c.user,
        c.device,
        c.plan.node + 1,
        c.plan.sync,
        c.plan.reader,
        c.plan.ending,
        if c.survived { ", survived" } else { "" }
    )
}

/// The connection's events about `conv` (and its life: connect, hello, end) up to `until`.
fn trace(c: &ConnLog, conv: &str, until: Ms) -> String {
    let lines: Vec<String> = c
        .events
        .iter()
        .filter(|(t, _)| *t <= until)
        .filter(|(_, e)| match e {
            Ev::Frame(f) => f["op"] == "hello" || f["op"] == "error" || f["conv"] == conv,
            Ev::Sent { conv: x, .. } | Ev::Synced { conv: x, .. } => x == conv,
            _ => true,
        })
        .map(|(t, e)| format!("  {t:>9.1} ms  {}", describe(e)))
        .collect();
    tail(header(c), &lines)
}

/// All of the connection's events up to index `until` (exclusive of nothing: included).
fn trace_all(c: &ConnLog, until: usize) -> String {
    let lines: Vec<String> =
        c.events.iter().take(until + 1).map(|(t, e)| format!("  {t:>9.1} ms  {}", describe(e))).collect();
    tail(header(c), &lines)
}

/// The first three lines (connect, hello) and the last 25.
fn tail(mut out: String, lines: &[String]) -> String {
    let skip_from = 3.min(lines.len());
    let keep_from = lines.len().saturating_sub(25).max(skip_from);
    for l in &lines[..skip_from] {
        let _ = writeln!(out, "{l}");
    }
    if keep_from > skip_from {
        let _ = writeln!(out, "  ... {} events ...", keep_from - skip_from);
    }
    for l in &lines[keep_from..] {
        let _ = writeln!(out, "{l}");
    }
    out
}
