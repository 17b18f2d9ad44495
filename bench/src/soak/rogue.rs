//! Misbehaving clients of the soak: each rogue thread keeps doing one bad thing after
//! another to a node that is up, and checks the server's answer: garbage instead of an
//! upgrade, a frame announcing 1 GiB, an unmasked frame, a socket that never reads, an
//! upgrade request trickled a byte at a time.
//!
//! An attempt a fault overlapped (a node stopped or restarted meanwhile) is not judged.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use super::conn::{Conn, Frame};
use super::Shared;
use crate::ws::{self, Rng};

/// How long the server has to answer a bad input (its handshake timeout is 5 s).
const ANSWER_WITHIN: Duration = Duration::from_secs(10);

/// How long a never-reading socket is held before it vanishes.
const NEVER_READ_HOLD: Duration = Duration::from_secs(20);

/// Between a trickled upgrade's bytes.
const TRICKLE_EVERY: Duration = Duration::from_millis(400);

/// The bad things, in the order each rogue cycles through them.
#[derive(Debug, Clone, Copy)]
pub enum Kind {
    Garbage,
    HugeFrame,
    Unmasked,
    NeverReads,
    Trickle,
}

pub const KINDS: [Kind; 5] =
    [Kind::Garbage, Kind::HugeFrame, Kind::Unmasked, Kind::NeverReads, Kind::Trickle];

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Garbage => "garbage",
            Kind::HugeFrame => "1 GiB frame",
            Kind::Unmasked => "unmasked frame",
            Kind::NeverReads => "never reads",
            Kind::Trickle => "trickled upgrade",
        }
    }
}

/// What an attempt showed.
enum Outcome {
    /// The server answered as PROTOCOL.md says.
    Expected,
    /// It did not: what happened instead.
    Unexpected(String),
}

/// Rogue `id`'s thread: until the soak stops the rogues.
pub fn run(id: usize, shared: &Shared) {
    let mut rng = Rng::from_entropy();
    let mut turn = id;
    while !shared.stop_rogues.load(Relaxed) {
        if shared.hold_rogues.load(Relaxed) {
            std::thread::sleep(Duration::from_millis(100));
            continue;
        }
        let kind = KINDS[turn % KINDS.len()];
        turn += 1;
        let up: Vec<usize> = (0..shared.nodes.len()).filter(|&n| !shared.down[n].load(Relaxed)).collect();
        if up.is_empty() {
            std::thread::sleep(Duration::from_millis(200));
            continue;
        }
        let node = up[(rng.next_u64() % up.len() as u64) as usize];
        let epoch = shared.fault_epoch.load(Relaxed);
        shared.rogues_busy.fetch_add(1, Relaxed);
        let outcome = attempt(kind, shared.nodes[node], id, shared, &mut rng);
        shared.rogues_busy.fetch_sub(1, Relaxed);
        let stats = &shared.stats;
        if shared.fault_epoch.load(Relaxed) != epoch {
            stats.rogue_disturbed.fetch_add(1, Relaxed);
            continue;
        }
        stats.rogue_attempts[kind as usize].fetch_add(1, Relaxed);
        if let Outcome::Unexpected(what) = outcome {
            stats.rogue_unexpected.fetch_add(1, Relaxed);
            shared.report(format!("rogue {id} ({}) on node {}: {what}", kind.name(), node + 1));
        }
    }
}

fn attempt(kind: Kind, addr: SocketAddr, id: usize, shared: &Shared, rng: &mut Rng) -> Outcome {
    match kind {
        Kind::Garbage => garbage(addr, rng),
        Kind::HugeFrame => {
            // FIN + binary, masked, 64-bit length 2^30, then a little of it.
            let mut frame = vec![0x82, 0x80 | 127];
            frame.extend_from_slice(&(1u64 << 30).to_be_bytes());
            frame.extend_from_slice(&rng.mask());
            frame.extend_from_slice(&[0u8; 64]);
            expect_close(addr, &rogue_target(shared, id), &frame, 1009)
        }
        Kind::Unmasked => {
            let mut frame = Vec::new();
            ws::write_header(&mut frame, true, ws::opcode::TEXT, 2, None);
            frame.extend_from_slice(b"hi");
            expect_close(addr, &rogue_target(shared, id), &frame, 1002)
        }
        Kind::NeverReads => never_reads(addr, shared, id),
        Kind::Trickle => trickle(addr, shared),
    }
}

/// `/ws` as a user that is a member of nothing.
fn rogue_target(shared: &Shared, id: usize) -> String {
    let token =
        ringpush::auth::mint(&shared.secret, &format!("soak-rogue-{id}"), "r", 3600).expect("short ids mint");
    format!("/ws?token={token}")
}

/// Random bytes instead of an upgrade request: the server answers (400) or hangs up.
fn garbage(addr: SocketAddr, rng: &mut Rng) -> Outcome {
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, ANSWER_WITHIN) else {
        return Outcome::Unexpected("connect failed".into());
    };
    let bytes: Vec<u8> = (0..256).flat_map(|_| rng.next_u64().to_le_bytes()).collect();
    // The server may hang up before all of it is written: that is an answer too.
    let _ = stream.write_all(&bytes);
    read_until_eof(&mut stream, ANSWER_WITHIN)
}

/// A real upgrade, then `frame`: the server must close with `code`.
fn expect_close(addr: SocketAddr, target: &str, frame: &[u8], code: u16) -> Outcome {
    let mut conn = match Conn::open(addr, target, ANSWER_WITHIN) {
        Ok(conn) => conn,
        Err(e) => return Outcome::Unexpected(format!("upgrade failed: {e}")),
    };
    let mut stream = conn.stream();
    if stream.write_all(frame).is_err() {
        return Outcome::Unexpected("the write failed before any answer".into());
    }
    let deadline = Instant::now() + ANSWER_WITHIN;
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match conn.next(left) {
            Ok(Some(Frame::Close(Some(c)))) if c == code => return Outcome::Expected,
            Ok(Some(Frame::Close(other))) => {
                return Outcome::Unexpected(format!("closed with {other:?}, not {code}"))
            }
            // hello and the like come first.
            Ok(Some(_)) => {}
            Ok(None) => break,
            Err(e) => return Outcome::Unexpected(format!("no close frame: {e}")),
        }
    }
    Outcome::Unexpected(format!("no close {code} within {} s", ANSWER_WITHIN.as_secs()))
}

/// A member of the busiest conversation that never reads: the server folds its queue
/// into gaps (and may close it with 4002); nothing else may notice.
fn never_reads(addr: SocketAddr, shared: &Shared, id: usize) -> Outcome {
    let lurker = super::lurker_name(id % shared.plan.lurkers.max(1));
    let token = ringpush::auth::mint(&shared.secret, &lurker, "l", 3600).expect("short ids mint");
    let conn = match Conn::open(addr, &format!("/ws?token={token}"), ANSWER_WITHIN) {
        Ok(conn) => conn,
        Err(e) => return Outcome::Unexpected(format!("upgrade failed: {e}")),
    };
    conn.set_option(libc::SO_RCVBUF, &(4096 as libc::c_int));
    let until = Instant::now() + NEVER_READ_HOLD;
    while Instant::now() < until && !shared.stop_rogues.load(Relaxed) && !shared.hold_rogues.load(Relaxed) {
        std::thread::sleep(Duration::from_millis(200));
    }
    Outcome::Expected
}

/// An upgrade request a byte at a time: the server must hang up within its handshake
/// timeout, long before the request is complete.
fn trickle(addr: SocketAddr, shared: &Shared) -> Outcome {
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, ANSWER_WITHIN) else {
        return Outcome::Unexpected("connect failed".into());
    };
    let token = ringpush::auth::mint(&shared.secret, "soak-trickler", "t", 3600).expect("short ids mint");
    let request =
        ws::upgrade_request(&addr.to_string(), &format!("/ws?token={token}"), "dGhlIHNhbXBsZSBub25jZQ==");
    let started = Instant::now();
    let _ = stream.set_read_timeout(Some(TRICKLE_EVERY));
    let mut scratch = [0u8; 512];
    for byte in request.as_bytes() {
        if stream.write_all(std::slice::from_ref(byte)).is_err() {
            return Outcome::Expected;
        }
        match stream.read(&mut scratch) {
            Ok(_) => return Outcome::Expected,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(_) => return Outcome::Expected,
        }
        if started.elapsed() > ANSWER_WITHIN {
            return Outcome::Unexpected(format!("still open after {} s", ANSWER_WITHIN.as_secs()));
        }
    }
    Outcome::Unexpected("the whole trickled request was taken".into())
}

fn read_until_eof(stream: &mut TcpStream, limit: Duration) -> Outcome {
    let deadline = Instant::now() + limit;
    let mut scratch = [0u8; 1024];
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        let _ = stream.set_read_timeout(Some(left.max(Duration::from_millis(1))));
        match stream.read(&mut scratch) {
            Ok(0) => return Outcome::Expected,
            Ok(_) => {}
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                break
            }
            // A reset is a hang-up too.
            Err(_) => return Outcome::Expected,
        }
    }
    Outcome::Unexpected(format!("still open after {} s", limit.as_secs()))
}
