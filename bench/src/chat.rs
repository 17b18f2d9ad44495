//! The IM side of a client process (`idle-worker --chat`): what its connections say and
//! hear above the WebSocket layer of [`crate::fleet`].
//!
//! - After `hello`, a connection syncs each of its user's conversations (`after` 0) and
//!   counts as connected once every one has answered `synced` (the server holds a new
//!   connection's live messages until its first sync, so a client that skipped it would
//!   measure that hold instead of the fan-out).
//! - A send is `{"op":"send","conv":C,"cid":"<t>","body":{"t":<t>,"p":"xx..."}}`, the body
//!   padded to `--body-bytes`. `t` is `CLOCK_MONOTONIC` in nanoseconds, which every
//!   process of one Linux host shares, so a receiver in another client process computes
//!   send-to-deliver latency from the body alone, and the sender its ack latency from the
//!   `cid` the `ack` echoes. `t` is strictly increasing in a process, so cids never repeat.
//! - Every `msg` is counted, its latency recorded, and its `seq` checked against the last
//!   one of its conversation on that connection; `gap` and `error` frames are counted.
//!   Frames are read with [`crate::scan`], not parsed.
//!
//! Nothing here allocates per message: frames are built in one scratch buffer and
//! written into the connection's output buffer; a text message is gathered only when it
//! arrives in pieces.

use std::io;
use std::os::fd::RawFd;

use crate::latency::Latency;
use crate::plan::Plan;
use crate::scan::{self, Op};
use crate::ws::{self, opcode, Rng};

/// The `--chat` options of a client process.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ChatArgs {
    /// Speak the IM protocol (sync after hello, sends, receipts) with the plan below.
    #[arg(long)]
    pub chat: bool,
    /// N of the plan: users in the whole run.
    #[arg(long, default_value_t = 0)]
    pub plan_users: usize,
    /// M of the plan: conversations.
    #[arg(long, default_value_t = 0)]
    pub plan_convs: usize,
    /// K of the plan: members per conversation.
    #[arg(long, default_value_t = 0)]
    pub plan_members: usize,
    /// S of the plan: senders.
    #[arg(long, default_value_t = 0)]
    pub plan_senders: usize,
    /// Prefix of the conversation ids.
    #[arg(long, default_value = "")]
    pub plan_tag: String,
    /// Bytes of each message body (JSON, padded).
    #[arg(long, default_value_t = 100)]
    pub body_bytes: usize,
    /// Keep per-seq receipt figures (the fan-out of one conversation).
    #[arg(long)]
    pub per_seq: bool,
    /// Also read the kernel's arrival time of each read (SO_TIMESTAMPNS).
    #[arg(long)]
    pub kernel_stamps: bool,
    /// Connections per user: connection `j` of the run is user `j / D`, device `d<j % D>`
    /// (the plan's users are users, not connections); only device 0 of a sender sends.
    #[arg(long, default_value_t = 1)]
    pub devices: usize,
    /// `read` frames per message sent: each `msg` read is marked read (`read` of its seq
    /// on the receiving connection) with this share over the K*D-1 receivers of a send.
    #[arg(long, default_value_t = 0.0)]
    pub reads: f64,
    /// `signal` frames per message sent: a sender sends this many signals (`{"typing":true}`)
    /// into the conversation before its send, on average.
    #[arg(long, default_value_t = 0.0)]
    pub signals: f64,
}

impl ChatArgs {
    /// Connections per user (at least 1).
    pub fn devices(&self) -> usize {
        self.devices.max(1)
    }

    pub fn plan(&self) -> Plan {
        Plan {
            users: self.plan_users,
            convs: self.plan_convs,
            members: self.plan_members,
            senders: self.plan_senders,
            tag: self.plan_tag.clone(),
        }
    }
}

/// Largest text message gathered from pieces (the server's default frame limit is 64 KiB).
const MAX_TEXT: usize = 1 << 20;

/// Highest seq with per-seq figures; later ones are counted but not broken down.
const MAX_TRACKED_SEQ: u64 = 1 << 20;

/// When a batch of bytes was read: `read` is `CLOCK_MONOTONIC` at the read; `arrival`,
/// with kernel stamps, when the last of them reached the socket (same clock).
#[derive(Debug, Clone, Copy, Default)]
pub struct Stamp {
    pub read: u64,
    pub arrival: Option<u64>,
}

/// One conversation of a connection.
#[derive(Debug, Clone, Copy)]
struct PeerConv {
    conv: u32,
    /// The last seq seen (from `synced`, `msg` or `gap`).
    last: u64,
    synced: bool,
}

/// A connection's IM state.
#[derive(Debug)]
pub struct Peer {
    convs: Box<[PeerConv]>,
    /// Conversations not synced yet; the connection is ready at 0.
    unsynced: usize,
    /// Sends not yet acked.
    inflight: u32,
    /// Round robin over `convs` for sends.
    next: usize,
    pub sender: bool,
    /// A text message arriving in pieces, gathered; empty in between.
    text: Vec<u8>,
}

impl Peer {
    /// Gathers a piece of a text message that did not arrive whole.
    pub fn gather(&mut self, piece: &[u8]) -> Result<(), String> {
        if self.text.len() + piece.len() > MAX_TEXT {
            return Err(format!("text message over {MAX_TEXT} bytes"));
        }
        self.text.extend_from_slice(piece);
        Ok(())
    }

    /// The gathered message, handed out once.
    pub fn take_text(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.text)
    }

    /// Gives the gathering buffer back for reuse (kept small).
    pub fn return_text(&mut self, mut text: Vec<u8>) {
        text.clear();
        if text.capacity() <= 4096 {
            self.text = text;
        }
    }

    pub fn inflight(&self) -> u32 {
        self.inflight
    }
}

/// What a load phase counted, in this process.
#[derive(Debug, Clone, Copy, Default)]
pub struct Counters {
    pub sent: u64,
    pub acks: u64,
    /// Acks read before the end of the phase's window.
    pub acks_in_window: u64,
    pub msgs: u64,
    /// `msg` frames read before the end of the window.
    pub msgs_in_window: u64,
    pub gaps: u64,
    pub errors: u64,
    /// `msg` frames whose seq was not the last one + 1 of their conversation.
    pub seq_errors: u64,
    /// `msg` frames of conversations the connection does not know.
    pub strays: u64,
    /// `read` and `signal` frames sent (the mix; none without `--reads`/`--signals`).
    pub reads_sent: u64,
    pub signals_sent: u64,
    /// `read` frames (another device's read mark) and `signal` frames read, in all and
    /// before the end of the window.
    pub reads: u64,
    pub reads_in_window: u64,
    pub signals: u64,
    pub signals_in_window: u64,
}

/// Receipts of one seq of the fan-out conversation, latencies in nanoseconds.
#[derive(Debug, Clone, Copy, Default)]
pub struct SeqStat {
    pub count: u64,
    /// The sender's `t`.
    pub sent: u64,
    pub first_read: u64,
    pub last_read: u64,
    pub first_arrival: u64,
    pub last_arrival: u64,
    /// Clock time of the last read and the last arrival.
    pub last_read_at: u64,
    pub last_arrival_at: u64,
}

impl SeqStat {
    fn record(&mut self, sent: u64, at: Stamp) {
        let read = at.read.saturating_sub(sent);
        if self.count == 0 {
            self.sent = sent;
            self.first_read = read;
        }
        self.count += 1;
        self.first_read = self.first_read.min(read);
        self.last_read = self.last_read.max(read);
        self.last_read_at = self.last_read_at.max(at.read);
        if let Some(arrival) = at.arrival {
            let lat = arrival.saturating_sub(sent);
            self.first_arrival = if self.first_arrival == 0 { lat } else { self.first_arrival.min(lat) };
            self.last_arrival = self.last_arrival.max(lat);
            self.last_arrival_at = self.last_arrival_at.max(arrival);
        }
    }
}

/// The IM state of a whole client process.
pub struct Chat {
    plan: Plan,
    /// Conversation ids, by index.
    names: Vec<Vec<u8>>,
    body_bytes: usize,
    per_seq: bool,
    pub counters: Counters,
    /// Send to deliver, by the receiver's read time.
    pub deliver: Latency,
    /// Send to the kernel's arrival stamp at the receiver (with kernel stamps).
    pub arrival: Latency,
    /// Send to ack.
    pub ack: Latency,
    /// Per seq, with `per_seq`.
    seqs: Vec<SeqStat>,
    /// The last `t` handed out (each is larger than the one before).
    last_t: u64,
    /// Sends go on while the clock is before this; `msg`s before it count in the window.
    window_end: u64,
    /// Each ack of a send made in the window is answered with the next send.
    closed_loop: bool,
    /// Clock time of the last `msg` or `ack` read.
    pub last_rx: u64,
    /// Scratch for building frames.
    frame: Vec<u8>,
    /// `error` frames printed so far (the first few go to stderr).
    errors_shown: u64,
    /// `read` frames per `msg` read, and the share owed so far (a `read` goes out at 1).
    read_share: f64,
    read_owed: f64,
    /// `signal` frames per send, and the share owed so far.
    signals: f64,
    signal_owed: f64,
}

impl Chat {
    /// The process's IM state and one [`Peer`] per connection, for the users
    /// `first..first + count`.
    /// `first..first + count` are connections: with `--devices D`, connection `j` is
    /// user `j / D`, device `j % D`.
    pub fn new(args: &ChatArgs, first: usize, count: usize) -> (Chat, Vec<Peer>) {
        let plan = args.plan();
        let d = args.devices();
        let names = (0..plan.convs).map(|c| plan.conv_name(c).into_bytes()).collect();
        let first_user = first / d;
        let users = if count == 0 { 0 } else { (first + count - 1) / d + 1 - first_user };
        let lists = plan.convs_of_range(first_user, users);
        let peers = (first..first + count)
            .map(|j| {
                let convs = &lists[j / d - first_user];
                Peer {
                    unsynced: convs.len(),
                    convs: convs.iter().map(|&conv| PeerConv { conv, last: 0, synced: false }).collect(),
                    inflight: 0,
                    next: 0,
                    sender: j % d == 0 && plan.is_sender(j / d),
                    text: Vec::new(),
                }
            })
            .collect();
        // Each send reaches every other connection of every member.
        let receivers = plan.receivers_per_send(d).max(1);
        let chat = Chat {
            plan,
            names,
            body_bytes: args.body_bytes,
            per_seq: args.per_seq,
            counters: Counters::default(),
            deliver: Latency::new(),
            arrival: Latency::new(),
            ack: Latency::new(),
            seqs: Vec::new(),
            last_t: 0,
            window_end: 0,
            closed_loop: false,
            last_rx: 0,
            frame: Vec::with_capacity(256),
            errors_shown: 0,
            read_share: args.reads.max(0.0) / receivers as f64,
            read_owed: 0.0,
            signals: args.signals.max(0.0),
            signal_owed: 0.0,
        };
        (chat, peers)
    }

    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// Starts a load phase at `now`: counters and histograms from zero, sends allowed
    /// until `window_end`; `closed_loop` refills a sender's window on each ack.
    pub fn start_phase(&mut self, window_end: u64, closed_loop: bool) {
        self.counters = Counters::default();
        self.deliver.reset();
        self.arrival.reset();
        self.ack.reset();
        self.window_end = window_end;
        self.closed_loop = closed_loop;
    }

    /// Stops refilling windows (the phase's sends are over).
    pub fn end_sends(&mut self, now: u64) {
        self.window_end = self.window_end.min(now);
    }

    /// Handles one whole text message from the server. Returns true when it made the
    /// connection ready (its last conversation synced).
    pub fn on_text(
        &mut self,
        peer: &mut Peer,
        text: &[u8],
        at: Stamp,
        out: &mut Vec<u8>,
        rng: &mut Rng,
    ) -> bool {
        match scan::op(text) {
            Op::Msg => self.on_msg(peer, text, at, out, rng),
            Op::Read => {
                self.counters.reads += 1;
                if at.read < self.window_end {
                    self.counters.reads_in_window += 1;
                }
            }
            Op::Signal => {
                self.counters.signals += 1;
                if at.read < self.window_end {
                    self.counters.signals_in_window += 1;
                }
            }
            Op::Ack => {
                self.last_rx = at.read;
                self.counters.acks += 1;
                if at.read < self.window_end {
                    self.counters.acks_in_window += 1;
                }
                if let Some(t) = scan::string_after(text, b"\"cid\":").and_then(scan::number) {
                    self.ack.record_ns(at.read.saturating_sub(t));
                }
                peer.inflight = peer.inflight.saturating_sub(1);
                if self.closed_loop && peer.sender {
                    let now = now_ns();
                    if now < self.window_end {
                        self.write_send(peer, out, rng, now);
                    }
                }
            }
            Op::Synced => {
                let conv = scan::string_after(text, b"\"conv\":").unwrap_or_default();
                let last = scan::number_after(text, b"\"last\":").unwrap_or(0);
                let Some(pc) = self.peer_conv(peer, conv) else { return false };
                if !pc.synced {
                    pc.synced = true;
                    pc.last = pc.last.max(last);
                    peer.unsynced -= 1;
                    return peer.unsynced == 0;
                }
                pc.last = pc.last.max(last);
            }
            Op::Hello => {
                for i in 0..peer.convs.len() {
                    self.write_sync(peer.convs[i].conv, 0, out, rng);
                }
                return peer.convs.is_empty();
            }
            Op::Gap => {
                self.counters.gaps += 1;
                let conv = scan::string_after(text, b"\"conv\":").unwrap_or_default();
                let to = scan::number_after(text, b"\"to\":").unwrap_or(0);
                if let Some(pc) = self.peer_conv(peer, conv) {
                    // The server holds the conversation's live messages until a sync:
                    // skip what was missed (it is counted) and carry on from `to`.
                    pc.last = pc.last.max(to);
                    let c = pc.conv;
                    self.write_sync(c, to, out, rng);
                }
            }
            Op::Error => {
                self.counters.errors += 1;
                self.errors_shown += 1;
                if self.errors_shown <= 5 {
                    eprintln!("idle-worker: error frame: {}", String::from_utf8_lossy(text));
                }
                if scan::string_after(text, b"\"cid\":").is_some() {
                    peer.inflight = peer.inflight.saturating_sub(1);
                }
            }
            Op::Push | Op::Other => {}
        }
        false
    }

    fn on_msg(&mut self, peer: &mut Peer, text: &[u8], at: Stamp, out: &mut Vec<u8>, rng: &mut Rng) {
        self.last_rx = at.read;
        self.counters.msgs += 1;
        if at.read < self.window_end {
            self.counters.msgs_in_window += 1;
        }
        let sent = scan::number_after(text, b"\"body\":{\"t\":");
        if let Some(t) = sent {
            self.deliver.record_ns(at.read.saturating_sub(t));
            if let Some(arrival) = at.arrival {
                self.arrival.record_ns(arrival.saturating_sub(t));
            }
        }
        let seq = scan::number_after(text, b"\"seq\":").unwrap_or(0);
        let conv = scan::string_after(text, b"\"conv\":").unwrap_or_default();
        match self.peer_conv(peer, conv) {
            Some(pc) => {
                if seq != pc.last + 1 {
                    self.counters.seq_errors += 1;
                }
                pc.last = pc.last.max(seq);
                let c = pc.conv;
                if self.read_share > 0.0 && at.read < self.window_end {
                    self.read_owed += self.read_share;
                    if self.read_owed >= 1.0 {
                        self.read_owed -= 1.0;
                        self.write_read(c, seq, out, rng);
                    }
                }
            }
            None => self.counters.strays += 1,
        }
        if self.per_seq && seq <= MAX_TRACKED_SEQ {
            let i = seq as usize;
            if self.seqs.len() <= i {
                self.seqs.resize(i + 1, SeqStat::default());
            }
            self.seqs[i].record(sent.unwrap_or(at.read), at);
        }
    }

    /// The connection's state for the conversation named `conv`.
    fn peer_conv<'p>(&self, peer: &'p mut Peer, conv: &[u8]) -> Option<&'p mut PeerConv> {
        peer.convs.iter_mut().find(|pc| self.names.get(pc.conv as usize).is_some_and(|n| n == conv))
    }

    /// Writes a `sync` of `conv` from `after` into `out`.
    fn write_sync(&mut self, conv: u32, after: u64, out: &mut Vec<u8>, rng: &mut Rng) {
        let f = &mut self.frame;
        f.clear();
        f.extend_from_slice(b"{\"op\":\"sync\",\"conv\":\"");
        f.extend_from_slice(&self.names[conv as usize]);
        f.extend_from_slice(b"\",\"after\":");
        scan::put_u64(f, after);
        f.push(b'}');
        ws::write_frame(out, opcode::TEXT, f, rng.mask());
    }

    /// Writes a `read` of `conv` up to `seq` into `out`.
    fn write_read(&mut self, conv: u32, seq: u64, out: &mut Vec<u8>, rng: &mut Rng) {
        let f = &mut self.frame;
        f.clear();
        f.extend_from_slice(b"{\"op\":\"read\",\"conv\":\"");
        f.extend_from_slice(&self.names[conv as usize]);
        f.extend_from_slice(b"\",\"seq\":");
        scan::put_u64(f, seq);
        f.push(b'}');
        ws::write_frame(out, opcode::TEXT, f, rng.mask());
        self.counters.reads_sent += 1;
    }

    /// Writes a `signal` into `conv` (a typing indicator) into `out`.
    fn write_signal(&mut self, conv: u32, out: &mut Vec<u8>, rng: &mut Rng) {
        let f = &mut self.frame;
        f.clear();
        f.extend_from_slice(b"{\"op\":\"signal\",\"conv\":\"");
        f.extend_from_slice(&self.names[conv as usize]);
        f.extend_from_slice(b"\",\"body\":{\"typing\":true}}");
        ws::write_frame(out, opcode::TEXT, f, rng.mask());
        self.counters.signals_sent += 1;
    }

    /// Writes the peer's next `send` (round robin over its conversations) into `out`,
    /// stamped with `now` (or just after the last stamp, so cids stay unique).
    pub fn write_send(&mut self, peer: &mut Peer, out: &mut Vec<u8>, rng: &mut Rng, now: u64) {
        if peer.convs.is_empty() {
            return;
        }
        let t = now.max(self.last_t + 1);
        self.last_t = t;
        let conv = peer.convs[peer.next % peer.convs.len()].conv;
        peer.next = peer.next.wrapping_add(1);
        if self.signals > 0.0 {
            self.signal_owed += self.signals;
            while self.signal_owed >= 1.0 {
                self.signal_owed -= 1.0;
                self.write_signal(conv, out, rng);
            }
        }
        let f = &mut self.frame;
        f.clear();
        f.extend_from_slice(b"{\"op\":\"send\",\"conv\":\"");
        f.extend_from_slice(&self.names[conv as usize]);
        f.extend_from_slice(b"\",\"cid\":\"");
        scan::put_u64(f, t);
        f.extend_from_slice(b"\",\"body\":");
        let body_start = f.len();
        f.extend_from_slice(b"{\"t\":");
        scan::put_u64(f, t);
        f.extend_from_slice(b",\"p\":\"");
        // The body ends with `"}`: pad so that it is body_bytes long in all.
        let pad = self.body_bytes.saturating_sub(f.len() - body_start + 2);
        f.resize(f.len() + pad, b'x');
        f.extend_from_slice(b"\"}}");
        ws::write_frame(out, opcode::TEXT, f, rng.mask());
        peer.inflight += 1;
        self.counters.sent += 1;
    }

    /// Receipts of `seq` so far.
    pub fn seq(&self, seq: u64) -> SeqStat {
        self.seqs.get(seq as usize).copied().unwrap_or_default()
    }
}

/// `CLOCK_MONOTONIC` in nanoseconds: comparable between the processes of one host.
pub fn now_ns() -> u64 {
    clock(libc::CLOCK_MONOTONIC)
}

fn clock(id: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes into the struct we own.
    unsafe { libc::clock_gettime(id, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// `CLOCK_REALTIME - CLOCK_MONOTONIC` now: turns the kernel's receive stamps (real time)
/// into the monotonic clock the bodies carry. Sampled once; a run is short.
pub fn realtime_offset() -> i64 {
    let mono = clock(libc::CLOCK_MONOTONIC);
    let real = clock(libc::CLOCK_REALTIME);
    let mono2 = clock(libc::CLOCK_MONOTONIC);
    real as i64 - ((mono / 2 + mono2 / 2) as i64)
}

/// Asks the kernel to stamp what arrives on `fd` (read back by [`recv_stamped`]).
pub fn enable_stamps(fd: RawFd) -> io::Result<()> {
    let on: libc::c_int = 1;
    // SAFETY: `on` lives across the call and its size is passed.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_TIMESTAMPNS,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A `recvmsg` into `buf`: the bytes read and the kernel's arrival stamp (real time, in
/// ns) when there is one.
pub fn recv_stamped(fd: RawFd, buf: &mut [u8]) -> io::Result<(usize, Option<u64>)> {
    let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    // Room for one SCM_TIMESTAMPNS control message (u64 words keep it aligned).
    let mut control = [0u64; 8];
    // SAFETY: an all-zero msghdr is valid; the pointers set below outlive the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control) as _;
    // SAFETY: `msg` describes buffers valid for their stated lengths.
    let n = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_DONTWAIT) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut stamp = None;
    // SAFETY: the CMSG macros walk the control buffer the kernel just filled, within
    // `msg_controllen`; the timespec is read unaligned.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_TIMESTAMPNS {
                let ts = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<libc::timespec>());
                stamp = Some(ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64);
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    Ok((n as usize, stamp))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(per_seq: bool) -> (Chat, Vec<Peer>) {
        let args = ChatArgs {
            chat: true,
            plan_users: 4,
            plan_convs: 2,
            plan_members: 2,
            plan_senders: 4,
            plan_tag: "t".into(),
            body_bytes: 100,
            per_seq,
            kernel_stamps: false,
            devices: 1,
            reads: 0.0,
            signals: 0.0,
        };
        Chat::new(&args, 0, 4)
    }

    /// The text of every frame in `out` (client frames are masked).
    fn frames(out: &[u8]) -> Vec<String> {
        let mut texts = Vec::new();
        let mut rest = out;
        while let Ok(Some((h, n))) = ws::parse_header(rest) {
            let mut payload = rest[n..n + h.len as usize].to_vec();
            ws::apply_mask(&mut payload, h.mask.expect("masked"), 0);
            texts.push(String::from_utf8(payload).expect("utf-8"));
            rest = &rest[n + h.len as usize..];
        }
        texts
    }

    #[test]
    fn hello_syncs_and_synced_makes_ready() {
        let (mut chat, mut peers) = chat(false);
        let mut rng = Rng::from_entropy();
        let mut out = Vec::new();
        let at = Stamp { read: 10, arrival: None };
        assert!(!chat.on_text(&mut peers[0], br#"{"op":"hello","user":"u0"}"#, at, &mut out, &mut rng));
        assert_eq!(frames(&out), vec![r#"{"op":"sync","conv":"tc0","after":0}"#]);
        let synced = br#"{"op":"synced","conv":"tc0","last":0,"complete":true}"#;
        assert!(chat.on_text(&mut peers[0], synced, at, &mut out, &mut rng));
        assert!(!chat.on_text(&mut peers[0], synced, at, &mut out, &mut rng), "ready once");
    }

    #[test]
    fn sends_are_padded_and_receipts_measured() {
        let (mut chat, mut peers) = chat(true);
        let mut rng = Rng::from_entropy();
        let mut out = Vec::new();
        chat.start_phase(u64::MAX, false);
        chat.write_send(&mut peers[0], &mut out, &mut rng, 5_000);
        chat.write_send(&mut peers[0], &mut out, &mut rng, 5_000);
        let sent = frames(&out);
        assert_eq!(sent.len(), 2);
        let v: serde_json::Value = serde_json::from_str(&sent[0]).expect("valid JSON");
        assert_eq!(v["conv"], "tc0");
        assert_eq!(v["cid"], "5000");
        assert_eq!(v["body"]["t"], 5000);
        assert_eq!(v["body"].to_string().len(), 100);
        let v2: serde_json::Value = serde_json::from_str(&sent[1]).expect("valid JSON");
        assert_eq!(v2["cid"], "5001", "cids stay unique at the same instant");
        assert_eq!(peers[0].inflight(), 2);

        let ack = br#"{"op":"ack","conv":"tc0","cid":"5000","seq":1,"ts":1}"#;
        chat.on_text(&mut peers[0], ack, Stamp { read: 7_000, arrival: None }, &mut out, &mut rng);
        assert_eq!(chat.counters.acks, 1);
        assert!((chat.ack.summary().max - 2.0).abs() < 0.01, "2 µs to the ack");
        assert_eq!(peers[0].inflight(), 1);

        let msg = br#"{"op":"msg","conv":"tc0","seq":1,"from":"u0","dev":"d","cid":"5000","ts":1,"body":{"t":5000,"p":"x"}}"#;
        let at = Stamp { read: 9_000, arrival: Some(6_000) };
        chat.on_text(&mut peers[1], msg, at, &mut out, &mut rng);
        assert_eq!(chat.counters.msgs, 1);
        assert_eq!(chat.counters.seq_errors, 0);
        assert!((chat.deliver.summary().max - 4.0).abs() < 0.01, "4 µs to the read");
        let s = chat.seq(1);
        assert_eq!((s.count, s.first_read, s.last_arrival, s.sent), (1, 4_000, 1_000, 5_000));
        // The same seq again is out of order; a message of a stranger conversation is a stray.
        chat.on_text(&mut peers[1], msg, at, &mut out, &mut rng);
        assert_eq!(chat.counters.seq_errors, 1);
        let stray = br#"{"op":"msg","conv":"tc1","seq":1,"body":{"t":1}}"#;
        chat.on_text(&mut peers[0], stray, at, &mut out, &mut rng);
        assert_eq!(chat.counters.strays, 1);
    }

    #[test]
    fn gaps_resync_from_their_end() {
        let (mut chat, mut peers) = chat(false);
        let mut rng = Rng::from_entropy();
        let mut out = Vec::new();
        let gap = br#"{"op":"gap","conv":"tc0","from":3,"to":9}"#;
        chat.on_text(&mut peers[0], gap, Stamp::default(), &mut out, &mut rng);
        assert_eq!(chat.counters.gaps, 1);
        assert_eq!(frames(&out), vec![r#"{"op":"sync","conv":"tc0","after":9}"#]);
    }
}
