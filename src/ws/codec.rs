//! RFC 6455 framing through tungstenite, driven sans-io from glommio sockets.
//!
//! The session reads socket bytes into a buffer shared by the whole shard and hands the
//! slice to [`Codec::read`]; tungstenite's `WebSocketContext` applies every rule (masking,
//! fragmentation, control frames, UTF-8, close handshake, size limits) and writes its own
//! replies (pong, close) into a `Vec` the session then queues for the socket.
//!
//! Memory: tungstenite keeps a read buffer that grows to the largest frame seen and never
//! shrinks. So the context is created only when bytes arrive and [`Codec::release`] drops
//! it again when the stream sits at a frame boundary outside any fragmented message (a
//! [`FrameBoundary`] follows the byte stream to know that). An idle connection then holds
//! no codec memory at all, whatever it received before.

use std::io::{self, Read, Write};

use bytes::Bytes;
use tungstenite::error::{CapacityError, Error as WsError};
use tungstenite::protocol::frame::coding::{Control, Data, OpCode};
use tungstenite::protocol::frame::{CloseFrame, FrameHeader, Utf8Bytes};
use tungstenite::protocol::{Role, WebSocketConfig, WebSocketContext};

pub use tungstenite::Message;

/// RFC 6455 close codes the server sends (section 7.4.1 and PROTOCOL.md).
pub mod close {
    pub const NORMAL: u16 = 1000;
    pub const GOING_AWAY: u16 = 1001;
    pub const PROTOCOL: u16 = 1002;
    pub const UNSUPPORTED: u16 = 1003;
    pub const INVALID_DATA: u16 = 1007;
    pub const POLICY: u16 = 1008;
    pub const TOO_BIG: u16 = 1009;
    pub const INTERNAL: u16 = 1011;
    pub const KICKED: u16 = 4001;
    pub const SLOW_CONSUMER: u16 = 4002;
}

/// The tungstenite configuration for server sessions: sized for many idle connections.
pub fn server_config(max_message_bytes: usize) -> WebSocketConfig {
    WebSocketConfig::default()
        // Per-read chunk and initial capacity while the context exists; 128 KiB by default,
        // which per connection would be the whole memory budget several times over.
        .read_buffer_size(READ_CHUNK)
        // Write every frame straight into the session's queue; the session batches.
        .write_buffer_size(0)
        .max_message_size(Some(max_message_bytes))
        .max_frame_size(Some(max_message_bytes))
}

/// tungstenite's read chunk while a context exists (allocated on first bytes, dropped idle).
const READ_CHUNK: usize = 4096;

/// What [`Codec::read`] found.
#[derive(Debug)]
pub enum Next {
    /// A complete message (text, binary, ping or pong; pongs for pings are already queued).
    Message(Message),
    /// All input consumed; wait for more bytes.
    NeedMore,
    /// The close handshake finished (the peer's close was answered): close the socket.
    Closed,
    /// The peer broke the protocol: send this close code and drop the connection.
    Fail(u16, &'static str),
}

/// The per-connection WebSocket state. Empty (one pointer and a few bytes) while idle.
#[derive(Default)]
pub struct Codec {
    ctx: Option<Box<WebSocketContext>>,
    boundary: FrameBoundary,
}

impl Codec {
    /// Account for freshly read socket bytes. Call once per read, before [`Codec::read`].
    pub fn received(&mut self, input: &[u8]) {
        self.boundary.advance(input);
    }

    /// Decode the next message from `input` (advanced past what tungstenite consumed).
    /// Frames tungstenite must send in reply are appended to `out`.
    pub fn read(&mut self, config: &WebSocketConfig, input: &mut &[u8], out: &mut Vec<u8>) -> Next {
        let ctx =
            self.ctx.get_or_insert_with(|| Box::new(WebSocketContext::new(Role::Server, Some(*config))));
        let mut io = Io { input, out };
        match ctx.read(&mut io) {
            Ok(msg) => Next::Message(msg),
            // A control frame announcing more than 125 bytes is refused from its header,
            // without waiting for (and buffering) a payload that is refused anyway.
            Err(WsError::Io(e))
                if e.kind() == io::ErrorKind::WouldBlock && self.boundary.oversized_control() =>
            {
                Next::Fail(close::PROTOCOL, "control frame over 125 bytes")
            }
            Err(WsError::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => Next::NeedMore,
            Err(WsError::ConnectionClosed) | Err(WsError::AlreadyClosed) => Next::Closed,
            Err(WsError::Capacity(CapacityError::MessageTooLong { .. })) => {
                Next::Fail(close::TOO_BIG, "message too big")
            }
            Err(WsError::Capacity(_)) => Next::Fail(close::TOO_BIG, "frame too big"),
            Err(WsError::Utf8(_)) => Next::Fail(close::INVALID_DATA, "invalid UTF-8"),
            Err(WsError::Protocol(_)) => Next::Fail(close::PROTOCOL, "protocol error"),
            Err(_) => Next::Fail(close::INTERNAL, "internal error"),
        }
    }

    /// Starts the close handshake from the server side with `code` (tungstenite then
    /// expects the client's close reply, which [`Codec::read`] reports as `Closed`).
    pub fn close(&mut self, config: &WebSocketConfig, code: u16, reason: &str, out: &mut Vec<u8>) {
        let ctx =
            self.ctx.get_or_insert_with(|| Box::new(WebSocketContext::new(Role::Server, Some(*config))));
        let mut empty: &[u8] = &[];
        let mut io = Io { input: &mut empty, out };
        let frame = CloseFrame { code: code.into(), reason: Utf8Bytes::from(reason) };
        let _ = ctx.close(&mut io, Some(frame));
    }

    /// Drops the tungstenite context if nothing depends on it: the stream is at a frame
    /// boundary, outside a fragmented message, and the handshake is not closing. Returns
    /// whether memory was released.
    pub fn release(&mut self) -> bool {
        let open = self.ctx.as_ref().is_some_and(|c| c.can_read() && c.can_write());
        if open && self.boundary.quiet() {
            self.ctx = None;
            return true;
        }
        false
    }

    /// Whether a tungstenite context (and its buffers) is allocated right now.
    pub fn is_allocated(&self) -> bool {
        self.ctx.is_some()
    }
}

/// Adapts the session's bytes to tungstenite's blocking-style `Read + Write`: reads come
/// from the slice read off the socket (`WouldBlock` when it is used up), writes go to the
/// session's pending output.
struct Io<'a, 'b> {
    input: &'a mut &'b [u8],
    out: &'a mut Vec<u8>,
}

impl Read for Io<'_, '_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.input.is_empty() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = self.input.len().min(buf.len());
        buf[..n].copy_from_slice(&self.input[..n]);
        *self.input = &self.input[n..];
        Ok(n)
    }
}

impl Write for Io<'_, '_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.out.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Follows frame boundaries in the client's byte stream without buffering payloads, so
/// the codec knows when tungstenite holds no partial frame or fragmented message.
#[derive(Default, Debug)]
pub struct FrameBoundary {
    /// Header bytes collected so far (a header is at most 14 bytes).
    header: [u8; 14],
    header_len: u8,
    /// Payload bytes of the current frame still to come.
    remaining: u64,
    /// Between messages, inside a fragmented one, or failed (one byte: every connection
    /// holds this record).
    stream: Stream,
}

/// Where a [`FrameBoundary`] is between frames.
#[derive(Default, Debug, Clone, Copy, PartialEq, Eq)]
enum Stream {
    #[default]
    Between,
    /// A data frame without FIN was seen and its final continuation has not ended yet.
    InMessage,
    /// A control frame's header announced more than [`MAX_CONTROL_PAYLOAD`] bytes
    /// (RFC 6455, 5.5): the connection is failed with 1002 whatever follows.
    OversizedControl,
}

/// The largest payload of a control frame (RFC 6455, section 5.5).
pub const MAX_CONTROL_PAYLOAD: u64 = 125;

impl FrameBoundary {
    /// A control frame announced more than 125 bytes: the connection must fail (1002).
    pub fn oversized_control(&self) -> bool {
        self.stream == Stream::OversizedControl
    }

    pub fn advance(&mut self, mut input: &[u8]) {
        while !input.is_empty() {
            if self.remaining > 0 {
                let n = (input.len() as u64).min(self.remaining);
                self.remaining -= n;
                input = &input[n as usize..];
                continue;
            }
            let need = self.header_needed();
            let take = (need - self.header_len as usize).min(input.len());
            let at = self.header_len as usize;
            self.header[at..at + take].copy_from_slice(&input[..take]);
            self.header_len += take as u8;
            input = &input[take..];
            if (self.header_len as usize) == self.header_needed() {
                self.finish_header();
            }
        }
    }

    /// True when the stream sits between frames and outside any fragmented message.
    pub fn quiet(&self) -> bool {
        self.header_len == 0 && self.remaining == 0 && self.stream == Stream::Between
    }

    /// Header length as far as the bytes collected so far tell (2 until the second byte).
    fn header_needed(&self) -> usize {
        if self.header_len < 2 {
            return 2;
        }
        let b1 = self.header[1];
        let ext = match b1 & 0x7f {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        let mask = if b1 & 0x80 != 0 { 4 } else { 0 };
        2 + ext + mask
    }

    fn finish_header(&mut self) {
        let b0 = self.header[0];
        let b1 = self.header[1];
        let len = match b1 & 0x7f {
            126 => u16::from_be_bytes([self.header[2], self.header[3]]) as u64,
            127 => u64::from_be_bytes(self.header[2..10].try_into().unwrap_or([0; 8])),
            n => n as u64,
        };
        let fin = b0 & 0x80 != 0;
        let opcode = b0 & 0x0f;
        if self.stream == Stream::OversizedControl {
            // Failed for good.
        } else if opcode <= 2 {
            // Text or binary opens a message, continuation carries it on; FIN ends it.
            self.stream = if fin { Stream::Between } else { Stream::InMessage };
        } else if opcode >= 8 && len > MAX_CONTROL_PAYLOAD {
            self.stream = Stream::OversizedControl;
        }
        self.remaining = len;
        self.header_len = 0;
    }
}

/// Encodes one unmasked server frame (header + payload) as ready-to-write bytes.
fn encode(opcode: OpCode, payload: &[u8]) -> Bytes {
    let mut buf = Vec::with_capacity(payload.len() + 10);
    append_frame(opcode, payload, &mut buf);
    Bytes::from(buf)
}

/// Appends one unmasked, final server frame to `out`: tungstenite formats the header.
fn append_frame(opcode: OpCode, payload: &[u8], out: &mut Vec<u8>) {
    let header = FrameHeader { opcode, ..FrameHeader::default() };
    // Formatting a header into a Vec cannot fail.
    let _ = header.format(payload.len() as u64, out);
    out.extend_from_slice(payload);
}

/// Appends the frame that echoes `msg` exactly (`/echo`): the same opcode and payload,
/// unfragmented. Only text and binary messages are echoed; others append nothing.
pub fn append_echo(msg: &Message, out: &mut Vec<u8>) {
    match msg {
        Message::Text(text) => append_frame(OpCode::Data(Data::Text), text.as_bytes(), out),
        Message::Binary(data) => append_frame(OpCode::Data(Data::Binary), data, out),
        _ => {}
    }
}

/// A server text frame carrying `payload` (which must be UTF-8: the caller serialised it).
pub fn text_frame(payload: &[u8]) -> Bytes {
    encode(OpCode::Data(Data::Text), payload)
}

/// The payload of a frame made by [`text_frame`] (a server frame: unmasked), shared
/// without a copy.
pub fn text_payload(frame: &Bytes) -> Bytes {
    let offset = match frame.get(1).map(|b| b & 0x7f) {
        Some(126) => 4,
        Some(127) => 10,
        Some(_) => 2,
        None => return Bytes::new(),
    };
    frame.slice(offset.min(frame.len())..)
}

/// A server close frame with `code` and a short `reason` (cut to the 123 bytes a control
/// frame leaves for it, on a character boundary).
pub fn close_frame(code: u16, reason: &str) -> Bytes {
    let mut cut = reason.len().min(123);
    while !reason.is_char_boundary(cut) {
        cut -= 1;
    }
    let mut payload = Vec::with_capacity(2 + cut);
    payload.extend_from_slice(&code.to_be_bytes());
    payload.extend_from_slice(&reason.as_bytes()[..cut]);
    encode(OpCode::Control(Control::Close), &payload)
}

/// An empty server ping: two bytes, shared by every heartbeat.
pub const PING_FRAME: &[u8] = &[0x89, 0x00];

#[cfg(test)]
mod tests {
    #[test]
    fn text_payload_skips_every_header_length() {
        for len in [0usize, 125, 126, 65535, 65536] {
            let payload = vec![b'x'; len];
            assert_eq!(super::text_payload(&super::text_frame(&payload)), payload, "len {len}");
        }
    }

    use super::*;

    fn masked(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [1u8, 2, 3, 4];
        let mut f = vec![(if fin { 0x80 } else { 0 }) | opcode];
        match payload.len() {
            n if n < 126 => f.push(0x80 | n as u8),
            n if n < 65536 => {
                f.push(0x80 | 126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(0x80 | 127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        f.extend_from_slice(&mask);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        f
    }

    fn drain(codec: &mut Codec, bytes: &[u8]) -> (Vec<Next>, Vec<u8>) {
        let cfg = server_config(1 << 20);
        codec.received(bytes);
        let mut input = bytes;
        let mut out = Vec::new();
        let mut seen = Vec::new();
        loop {
            match codec.read(&cfg, &mut input, &mut out) {
                Next::NeedMore => break,
                n @ (Next::Closed | Next::Fail(..)) => {
                    seen.push(n);
                    break;
                }
                n => seen.push(n),
            }
        }
        (seen, out)
    }

    #[test]
    fn text_byte_by_byte_then_release() {
        let mut codec = Codec::default();
        let frame = masked(true, 1, b"hello");
        let mut got = Vec::new();
        for b in &frame {
            let (seen, _) = drain(&mut codec, std::slice::from_ref(b));
            got.extend(seen);
        }
        assert!(matches!(&got[..], [Next::Message(Message::Text(t))] if t.as_str() == "hello"));
        assert!(codec.release());
        assert!(!codec.is_allocated());
    }

    #[test]
    fn no_release_inside_fragmented_message_or_partial_frame() {
        let mut codec = Codec::default();
        drain(&mut codec, &masked(false, 1, b"hel"));
        assert!(!codec.release());
        let (seen, _) = drain(&mut codec, &masked(true, 0, b"lo"));
        assert!(matches!(&seen[..], [Next::Message(Message::Text(t))] if t.as_str() == "hello"));
        let big = masked(true, 2, &[7u8; 300]);
        drain(&mut codec, &big[..100]);
        assert!(!codec.release());
        drain(&mut codec, &big[100..]);
        assert!(codec.release());
    }

    #[test]
    fn ping_is_answered_and_close_completes() {
        let mut codec = Codec::default();
        let (seen, out) = drain(&mut codec, &masked(true, 9, b"hb"));
        assert!(matches!(&seen[..], [Next::Message(Message::Ping(_))]));
        assert_eq!(out, vec![0x8a, 2, b'h', b'b']);
        let (seen, out) = drain(&mut codec, &masked(true, 8, &1000u16.to_be_bytes()));
        assert!(matches!(seen.last(), Some(Next::Closed)));
        assert_eq!(out, vec![0x88, 2, 0x03, 0xe8]);
    }

    #[test]
    fn violations_map_to_close_codes() {
        let unmasked = [0x81u8, 0x01, b'a'];
        assert!(matches!(drain(&mut Codec::default(), &unmasked).0[..], [Next::Fail(1002, _)]));
        let bad_utf8 = masked(true, 1, &[0xff, 0xfe]);
        assert!(matches!(drain(&mut Codec::default(), &bad_utf8).0[..], [Next::Fail(1007, _)]));
        let too_big = masked(true, 2, &vec![0u8; (1 << 20) + 1]);
        assert!(matches!(drain(&mut Codec::default(), &too_big).0[..], [Next::Fail(1009, _)]));
        let rsv = {
            let mut f = masked(true, 1, b"x");
            f[0] |= 0x40;
            f
        };
        assert!(matches!(drain(&mut Codec::default(), &rsv).0[..], [Next::Fail(1002, _)]));
    }

    #[test]
    fn server_frames() {
        assert_eq!(&text_frame(b"hi")[..], &[0x81, 2, b'h', b'i']);
        let long = text_frame(&[b'a'; 200]);
        assert_eq!(&long[..4], &[0x81, 126, 0, 200]);
        assert_eq!(&close_frame(1001, "bye")[..], &[0x88, 5, 0x03, 0xe9, b'b', b'y', b'e']);
    }

    #[test]
    fn echo_frames_carry_the_message_back_unmasked() {
        let mut out = Vec::new();
        append_echo(&Message::Binary(Bytes::from_static(b"ab")), &mut out);
        append_echo(&Message::Text("hi".into()), &mut out);
        append_echo(&Message::Ping(Bytes::from_static(b"p")), &mut out);
        assert_eq!(out, [0x82, 2, b'a', b'b', 0x81, 2, b'h', b'i']);
        let mut out = Vec::new();
        append_echo(&Message::Binary(vec![7u8; 70000].into()), &mut out);
        assert_eq!(&out[..10], &[0x82, 127, 0, 0, 0, 0, 0, 1, 0x11, 0x70]);
        assert_eq!(out.len(), 70010);
    }

    #[test]
    fn an_oversized_control_frame_fails_from_its_header() {
        // A ping announcing 126 bytes (within the message limit), none of them sent: 1002
        // now, not once the payload has arrived and been buffered.
        let ping = masked(true, 9, &[b'p'; 126]);
        let (seen, _) = drain(&mut Codec::default(), &ping[..8]);
        assert!(matches!(seen[..], [Next::Fail(1002, _)]), "{seen:?}");
        // 125 bytes is a good ping, even when it arrives in pieces.
        let mut codec = Codec::default();
        let ping = masked(true, 9, &[b'p'; 125]);
        assert!(drain(&mut codec, &ping[..8]).0.is_empty());
        let (seen, _) = drain(&mut codec, &ping[8..]);
        assert!(matches!(seen[..], [Next::Message(Message::Ping(_))]), "{seen:?}");
    }

    #[test]
    fn boundary_tracks_extended_lengths() {
        let mut b = FrameBoundary::default();
        let f = masked(true, 2, &[0u8; 70000]);
        b.advance(&f[..5]);
        assert!(!b.quiet());
        b.advance(&f[5..]);
        assert!(b.quiet());
    }
}
