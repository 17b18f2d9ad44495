//! The `echo` and `upgrades` scenarios inside a client process: their state and their
//! counting. The fleet ([`crate::fleet`]) owns the sockets and calls in here.
//!
//! - An **echo load** (`echo SIZE DEPTH OPCODE START END`): every connection keeps DEPTH
//!   messages of SIZE bytes in flight, and sends the next one as each echo comes back,
//!   until END. Echoes come back in order on a connection, so a queue of send times per
//!   connection gives every round trip its latency. Round trips that end inside
//!   `START..END` (CLOCK_MONOTONIC ns, the same clock in every process) are the figures;
//!   the parent reads the server's CPU time at the same two instants.
//! - **Upgrade churn** (`churn START END`): every connection slot connects, upgrades,
//!   and is reset (`SO_LINGER` 0: no TIME_WAIT) as soon as the `101` checks out, then
//!   starts over, until END.

use std::collections::VecDeque;

use crate::latency::Latency;
use crate::ws::{self, opcode};

/// The echo load of this process.
#[derive(Debug)]
pub struct EchoRun {
    pub size: u64,
    pub opcode: u8,
    /// The measuring window, CLOCK_MONOTONIC ns.
    pub start: u64,
    pub end: u64,
    /// What every message carries; each echo is compared with it byte for byte.
    pub payload: Vec<u8>,
    /// Bytes of one masked frame on the wire: what a raw TCP echo sends back per message.
    pub frame_len: u64,
    pub sent: u64,
    pub echoed: u64,
    /// Round trips that ended inside the window.
    pub in_window: u64,
    /// Connections that failed with messages in flight, or whose echo was wrong.
    pub errors: u64,
    /// Send to echo read, for the round trips of the window.
    pub rtt: Latency,
}

impl EchoRun {
    pub fn new(size: usize, opcode: u8, start: u64, end: u64) -> EchoRun {
        EchoRun {
            size: size as u64,
            opcode,
            start,
            end,
            payload: payload(size, opcode == ws::opcode::TEXT),
            frame_len: (ws::header_len(size as u64, true) + size) as u64,
            sent: 0,
            echoed: 0,
            in_window: 0,
            errors: 0,
            rtt: Latency::new(),
        }
    }

    /// New messages go out until the end of the window.
    pub fn sending(&self, now: u64) -> bool {
        now < self.end
    }

    /// An echo read at `now` of a message sent at `sent`.
    pub fn echoed(&mut self, sent: u64, now: u64) {
        self.echoed += 1;
        if (self.start..=self.end).contains(&now) {
            self.in_window += 1;
            self.rtt.record_ns(now.saturating_sub(sent));
        }
    }

    /// Checks a piece of an echo: `piece` is payload bytes from offset `at`.
    pub fn check(&self, op: u8, at: u64, piece: &[u8]) -> Result<(), String> {
        if op != self.opcode {
            return Err(format!("echo with opcode {op:#x}, sent {:#x}", self.opcode));
        }
        let at = at as usize;
        match self.payload.get(at..at + piece.len()) {
            Some(want) if want == piece => Ok(()),
            Some(_) => Err(format!("echo differs from what was sent, in bytes {at}..{}", at + piece.len())),
            None => Err(format!("echo longer than the {} bytes sent", self.size)),
        }
    }

    /// The parent's line: `echoed rt R rt_win W sent S errors E inflight I`.
    pub fn line(&self, inflight: u64) -> String {
        format!(
            "echoed rt {} rt_win {} sent {} errors {} inflight {inflight}",
            self.echoed, self.in_window, self.sent, self.errors
        )
    }
}

/// One connection's messages in flight: their send times, oldest first.
#[derive(Debug, Default)]
pub struct Pipe {
    pub sent_at: VecDeque<u64>,
}

impl Pipe {
    /// Writes the next message (a masked frame) into `out`, sent at `now`.
    pub fn send(&mut self, run: &mut EchoRun, out: &mut Vec<u8>, mask: [u8; 4], now: u64) {
        ws::write_frame(out, run.opcode, &run.payload, mask);
        self.sent_at.push_back(now);
        run.sent += 1;
    }
}

/// The payload of every message of a run: printable for text (valid UTF-8), varied
/// bytes for binary, so a misplaced byte shows either way.
pub fn payload(size: usize, text: bool) -> Vec<u8> {
    (0..size)
        .map(|i| match text {
            true => b'a' + (i % 26) as u8,
            false => (i.wrapping_mul(31) ^ (i >> 8)) as u8,
        })
        .collect()
}

/// The opcode of `--text` or not.
pub fn data_opcode(text: bool) -> u8 {
    if text {
        opcode::TEXT
    } else {
        opcode::BINARY
    }
}

/// Upgrade churn in this process.
#[derive(Debug)]
pub struct Churn {
    pub start: u64,
    pub end: u64,
    pub ok: u64,
    pub ok_in_window: u64,
    pub failed: u64,
    pub failed_in_window: u64,
    /// Socket creation to the checked `101`, for upgrades of the window.
    pub upgrade: Latency,
}

impl Churn {
    pub fn new(start: u64, end: u64) -> Churn {
        Churn { start, end, ok: 0, ok_in_window: 0, failed: 0, failed_in_window: 0, upgrade: Latency::new() }
    }

    pub fn upgraded(&mut self, now: u64, took_ns: u64) {
        self.ok += 1;
        if (self.start..=self.end).contains(&now) {
            self.ok_in_window += 1;
            self.upgrade.record_ns(took_ns);
        }
    }

    pub fn failed(&mut self, now: u64) {
        self.failed += 1;
        if (self.start..=self.end).contains(&now) {
            self.failed_in_window += 1;
        }
    }

    /// Slots start over until the end of the window.
    pub fn going(&self, now: u64) -> bool {
        now < self.end
    }

    /// The parent's line: `churned ok K ok_win W failed F failed_win FW`.
    pub fn line(&self) -> String {
        format!(
            "churned ok {} ok_win {} failed {} failed_win {}",
            self.ok, self.ok_in_window, self.failed, self.failed_in_window
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ws::{parse_header, Decoder, Event};

    #[test]
    fn echoes_are_checked_and_counted_in_the_window() {
        let mut run = EchoRun::new(300, opcode::BINARY, 1_000, 2_000);
        assert_eq!(run.frame_len, 2 + 2 + 4 + 300);
        assert!(run.check(opcode::BINARY, 0, &run.payload[..100]).is_ok());
        assert!(run.check(opcode::BINARY, 100, &run.payload[100..]).is_ok());
        assert!(run.check(opcode::TEXT, 0, &run.payload[..1]).is_err(), "other opcode");
        assert!(run.check(opcode::BINARY, 1, &run.payload[..10]).is_err(), "shifted");
        assert!(run.check(opcode::BINARY, 299, &[run.payload[299], 0]).is_err(), "too long");
        run.echoed(500, 900);
        run.echoed(1_500, 1_700);
        run.echoed(1_900, 2_100);
        assert_eq!((run.echoed, run.in_window, run.rtt.summary().count), (3, 1, 1));
        assert!(run.sending(1_999) && !run.sending(2_000));
    }

    #[test]
    fn pipe_sends_masked_frames_of_the_payload() {
        let mut run = EchoRun::new(20, opcode::TEXT, 0, 10);
        assert!(std::str::from_utf8(&run.payload).is_ok());
        let mut pipe = Pipe::default();
        let mut out = Vec::new();
        pipe.send(&mut run, &mut out, [1, 2, 3, 4], 7);
        pipe.send(&mut run, &mut out, [5, 6, 7, 8], 9);
        assert_eq!(out.len() as u64, 2 * run.frame_len);
        assert_eq!(pipe.sent_at, [7, 9]);
        let (h, n) = parse_header(&out).expect("valid").expect("complete");
        assert_eq!((h.opcode, h.len, h.mask), (opcode::TEXT, 20, Some([1, 2, 3, 4])));
        let mut body = out[n..n + 20].to_vec();
        ws::apply_mask(&mut body, [1, 2, 3, 4], 0);
        assert_eq!(body, run.payload);
        // The server's echo (unmasked) decodes back to the payload.
        let mut echo = Vec::new();
        ws::write_header(&mut echo, true, opcode::TEXT, 20, None);
        echo.extend_from_slice(&run.payload);
        let mut input = &echo[..];
        let mut d = Decoder::default();
        assert!(matches!(d.next(&mut input), Ok(Some(Event::Start(_)))));
        assert!(matches!(d.next(&mut input), Ok(Some(Event::Payload(p))) if p == &run.payload[..]));
    }

    #[test]
    fn churn_counts_the_window() {
        let mut c = Churn::new(100, 200);
        c.upgraded(50, 10);
        c.upgraded(150, 20);
        c.failed(150);
        c.failed(250);
        assert_eq!(c.line(), "churned ok 2 ok_win 1 failed 2 failed_win 1");
        assert!(c.going(199) && !c.going(200));
    }
}
