//! The frame path of a session: client bytes -> `Codec::received` + `Codec::read` until
//! `NeedMore`, then `Codec::release` (as `Session::on_bytes` does), with the server's
//! tungstenite configuration. The same stream is fed once whole and once cut at arbitrary
//! points: the messages and the final close code must not depend on how TCP split it (that
//! is what proves `release` drops the context only where nothing depends on it).
#![no_main]

use libfuzzer_sys::fuzz_target;
use ringpush::config::LimitsConfig;
use ringpush::ws::codec::{self, Codec, Message, Next};

#[derive(Debug, PartialEq)]
enum Event {
    Message(Message),
    Closed,
    Fail(u16),
}

/// Feeds `chunks` to one codec the way a session does; stops at the first terminal event.
fn run<'a>(limit: usize, echo: bool, chunks: impl Iterator<Item = &'a [u8]>) -> Vec<Event> {
    let config = codec::server_config(limit);
    let mut codec = Codec::default();
    let mut events = Vec::new();
    for chunk in chunks {
        codec.received(chunk);
        let mut input = chunk;
        let mut replies = Vec::new();
        loop {
            match codec.read(&config, &mut input, &mut replies) {
                Next::Message(msg) => {
                    if echo {
                        codec::append_echo(&msg, &mut replies);
                    }
                    assert!(msg.len() <= limit, "a message past max_message_bytes");
                    events.push(Event::Message(msg));
                }
                Next::NeedMore => break,
                Next::Closed => {
                    events.push(Event::Closed);
                    return events;
                }
                Next::Fail(code, _) => {
                    events.push(Event::Fail(code));
                    return events;
                }
            }
        }
        assert!(input.is_empty(), "the codec left input unread");
        codec.release();
    }
    events
}

fuzz_target!(|data: &[u8]| {
    let Some((&knobs, stream)) = data.split_first() else { return };
    // Small limits reach the size checks with small inputs; the default is what ships.
    let limit = if knobs & 1 == 0 { LimitsConfig::default().max_message_bytes } else { 125 };
    let echo = knobs & 2 != 0;
    let whole = run(limit, echo, std::iter::once(stream));
    // Cut points from a tiny generator seeded by the knobs: runs of 1 to 16 bytes.
    let mut state = u32::from(knobs) | 0x9e37_0000;
    let mut rest = stream;
    let chunks = std::iter::from_fn(|| {
        if rest.is_empty() {
            return None;
        }
        state = state.wrapping_mul(1_103_515_245).wrapping_add(12_345);
        let n = (((state >> 16) as usize) % 16 + 1).min(rest.len());
        let (head, tail) = rest.split_at(n);
        rest = tail;
        Some(head)
    });
    let split = run(limit, echo, chunks);
    assert_eq!(whole, split, "the result depends on how the bytes were split");
});
