//! A minimal RFC 6455 client: the upgrade request and the check of its answer, masked
//! frames out, a streaming decoder for the server's frames in.
//!
//! Built for holding tens of thousands of connections in one process: nothing here owns a
//! socket or a buffer per connection. The decoder keeps at most one frame header (14
//! bytes) and hands payloads back as slices of the caller's read buffer, so a 64 KiB
//! message is checked as it streams by instead of being gathered.

use std::fmt;

use base64::Engine as _;
use sha1::{Digest, Sha1};

/// The GUID of RFC 6455, section 1.3, appended to the key for `Sec-WebSocket-Accept`.
const ACCEPT_GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// Largest response head accepted from the server before the handshake counts as failed.
pub const MAX_RESPONSE_HEAD: usize = 4096;

/// Largest payload of a control frame (RFC 6455, section 5.5).
pub const MAX_CONTROL_PAYLOAD: usize = 125;

/// Largest frame header: 2 bytes, 8 of extended length, 4 of mask.
pub const MAX_HEADER: usize = 14;

/// Frame opcodes (RFC 6455, section 5.2).
pub mod opcode {
    pub const CONTINUATION: u8 = 0x0;
    pub const TEXT: u8 = 0x1;
    pub const BINARY: u8 = 0x2;
    pub const CLOSE: u8 = 0x8;
    pub const PING: u8 = 0x9;
    pub const PONG: u8 = 0xA;

    pub fn is_control(op: u8) -> bool {
        op & 0x8 != 0
    }
}

/// Close status codes the client sends (RFC 6455, section 7.4.1).
pub mod close {
    pub const PROTOCOL: u16 = 1002;
}

/// `Sec-WebSocket-Accept` for a `Sec-WebSocket-Key` (RFC 6455, section 4.2.2).
pub fn accept_key(key: &str) -> String {
    let mut sha = Sha1::new();
    sha.update(key.as_bytes());
    sha.update(ACCEPT_GUID);
    base64::engine::general_purpose::STANDARD.encode(sha.finalize())
}

/// A fresh `Sec-WebSocket-Key`: 16 random bytes in base64 (always 24 characters).
pub fn new_key(rng: &mut Rng) -> String {
    let mut raw = [0u8; 16];
    raw[..8].copy_from_slice(&rng.next_u64().to_le_bytes());
    raw[8..].copy_from_slice(&rng.next_u64().to_le_bytes());
    base64::engine::general_purpose::STANDARD.encode(raw)
}

/// The upgrade request for `target` (path and query) on `host` (`host:port`).
pub fn upgrade_request(host: &str, target: &str, key: &str) -> String {
    format!(
        "GET {target} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
}

/// Why the server's answer to the upgrade is not a valid `101`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HandshakeError {
    /// The server refused with this HTTP status (401 bad token, 503 limit, ...).
    Status(u16),
    /// Not parseable as an HTTP/1.1 response head.
    Malformed,
    /// The head is longer than [`MAX_RESPONSE_HEAD`].
    TooLong,
    /// `101` without `Upgrade: websocket` and `Connection: Upgrade`.
    NotUpgraded,
    /// `Sec-WebSocket-Accept` missing or not derived from our key.
    BadAccept,
}

impl fmt::Display for HandshakeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HandshakeError::Status(s) => write!(f, "refused with HTTP {s}"),
            HandshakeError::Malformed => f.write_str("malformed response head"),
            HandshakeError::TooLong => f.write_str("response head too long"),
            HandshakeError::NotUpgraded => f.write_str("101 without the upgrade headers"),
            HandshakeError::BadAccept => f.write_str("wrong Sec-WebSocket-Accept"),
        }
    }
}

/// Checks the server's answer gathered so far in `buf` against the `key` we sent.
/// `Ok(None)`: the head is not complete yet. `Ok(Some(n))`: a valid `101` whose head is
/// `n` bytes long; what follows in `buf` are already frames.
pub fn check_response(buf: &[u8], key: &str) -> Result<Option<usize>, HandshakeError> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut response = httparse::Response::new(&mut headers);
    let head_len = match response.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() > MAX_RESPONSE_HEAD => {
            return Err(HandshakeError::TooLong)
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err(HandshakeError::Malformed),
    };
    match response.code {
        Some(101) => {}
        Some(code) => return Err(HandshakeError::Status(code)),
        None => return Err(HandshakeError::Malformed),
    }
    let header = |name: &str| {
        response
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .and_then(|h| std::str::from_utf8(h.value).ok())
    };
    let upgrade = header("upgrade").is_some_and(|v| v.trim().eq_ignore_ascii_case("websocket"));
    let connection =
        header("connection").is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("upgrade")));
    if !upgrade || !connection {
        return Err(HandshakeError::NotUpgraded);
    }
    match header("sec-websocket-accept") {
        Some(accept) if accept.trim() == accept_key(key) => Ok(Some(head_len)),
        _ => Err(HandshakeError::BadAccept),
    }
}

/// The `Retry-After` of a refusal's response head (whole seconds; PROTOCOL.md: a 503
/// may carry it), if the head is complete and has one.
pub fn retry_after(buf: &[u8]) -> Option<u64> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut response = httparse::Response::new(&mut headers);
    response.parse(buf).ok()?;
    let h = response.headers.iter().find(|h| h.name.eq_ignore_ascii_case("retry-after"))?;
    std::str::from_utf8(h.value).ok()?.trim().parse().ok()
}

/// Header bytes of a frame with `payload_len` bytes of payload.
pub fn header_len(payload_len: u64, masked: bool) -> usize {
    let ext = match payload_len {
        0..=125 => 0,
        126..=0xFFFF => 2,
        _ => 8,
    };
    2 + ext + if masked { 4 } else { 0 }
}

/// Appends a frame header. Client frames always carry a `mask`.
pub fn write_header(out: &mut Vec<u8>, fin: bool, opcode: u8, payload_len: u64, mask: Option<[u8; 4]>) {
    out.push(if fin { 0x80 } else { 0 } | (opcode & 0x0F));
    let mask_bit = if mask.is_some() { 0x80 } else { 0 };
    match payload_len {
        0..=125 => out.push(mask_bit | payload_len as u8),
        126..=0xFFFF => {
            out.push(mask_bit | 126);
            out.extend_from_slice(&(payload_len as u16).to_be_bytes());
        }
        _ => {
            out.push(mask_bit | 127);
            out.extend_from_slice(&payload_len.to_be_bytes());
        }
    }
    if let Some(key) = mask {
        out.extend_from_slice(&key);
    }
}

/// XORs `buf` with the masking key, `buf[0]` being byte `offset` of the payload, so a
/// payload can be masked (or unmasked) in pieces. Its own inverse.
pub fn apply_mask(buf: &mut [u8], key: [u8; 4], offset: u64) {
    let rot = (offset % 4) as usize;
    let key = [key[rot], key[(rot + 1) % 4], key[(rot + 2) % 4], key[(rot + 3) % 4]];
    // Eight bytes at a time: the echo load masks every payload it sends.
    let word = u64::from_ne_bytes([key[0], key[1], key[2], key[3], key[0], key[1], key[2], key[3]]);
    let mut chunks = buf.chunks_exact_mut(8);
    for chunk in &mut chunks {
        let mut v = [0u8; 8];
        v.copy_from_slice(chunk);
        chunk.copy_from_slice(&(u64::from_ne_bytes(v) ^ word).to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= key[i % 4];
    }
}

/// Appends one complete, final, masked client frame.
pub fn write_frame(out: &mut Vec<u8>, opcode: u8, payload: &[u8], mask: [u8; 4]) {
    out.reserve(header_len(payload.len() as u64, true) + payload.len());
    write_header(out, true, opcode, payload.len() as u64, Some(mask));
    let at = out.len();
    out.extend_from_slice(payload);
    apply_mask(&mut out[at..], mask, 0);
}

/// A parsed frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub fin: bool,
    pub opcode: u8,
    pub len: u64,
    pub mask: Option<[u8; 4]>,
}

/// A frame that breaks RFC 6455; the client answers with close 1002 and drops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameError {
    /// RSV1-3 set without a negotiated extension.
    Reserved,
    /// An opcode RFC 6455 does not define.
    BadOpcode(u8),
    /// A control frame longer than 125 bytes or without FIN.
    BadControl,
    /// A 64-bit length with the most significant bit set.
    TooLong,
    /// A masked frame from the server (section 5.1: the client must close).
    Masked,
    /// A continuation outside a message, or a new message inside a fragmented one.
    Fragmentation,
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FrameError::Reserved => f.write_str("reserved bits set"),
            FrameError::BadOpcode(op) => write!(f, "unknown opcode {op:#x}"),
            FrameError::BadControl => f.write_str("bad control frame"),
            FrameError::TooLong => f.write_str("frame length out of range"),
            FrameError::Masked => f.write_str("masked frame from the server"),
            FrameError::Fragmentation => f.write_str("bad fragmentation"),
        }
    }
}

/// Parses a frame header at the start of `buf`: `Ok(None)` while incomplete, else the
/// header and its length in bytes. Masked or not: the checks of who may mask are the
/// decoder's.
pub fn parse_header(buf: &[u8]) -> Result<Option<(Header, usize)>, FrameError> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let (b0, b1) = (buf[0], buf[1]);
    if b0 & 0x70 != 0 {
        return Err(FrameError::Reserved);
    }
    let fin = b0 & 0x80 != 0;
    let op = b0 & 0x0F;
    match op {
        opcode::CONTINUATION | opcode::TEXT | opcode::BINARY => {}
        opcode::CLOSE | opcode::PING | opcode::PONG => {
            if !fin || (b1 & 0x7F) as usize > MAX_CONTROL_PAYLOAD {
                return Err(FrameError::BadControl);
            }
        }
        other => return Err(FrameError::BadOpcode(other)),
    }
    let masked = b1 & 0x80 != 0;
    let (len, ext) = match b1 & 0x7F {
        126 => {
            let Some(b) = buf.get(2..4) else { return Ok(None) };
            (u16::from_be_bytes([b[0], b[1]]) as u64, 2)
        }
        127 => {
            let Some(b) = buf.get(2..10) else { return Ok(None) };
            let mut len = [0u8; 8];
            len.copy_from_slice(b);
            let len = u64::from_be_bytes(len);
            if len >> 63 != 0 {
                return Err(FrameError::TooLong);
            }
            (len, 8)
        }
        n => (n as u64, 0),
    };
    let at = 2 + ext;
    let mask = if masked {
        let Some(b) = buf.get(at..at + 4) else { return Ok(None) };
        Some([b[0], b[1], b[2], b[3]])
    } else {
        None
    };
    Ok(Some((Header { fin, opcode: op, len, mask }, at + if masked { 4 } else { 0 })))
}

/// Bytes of header needed so far, as far as the first two bytes tell.
fn header_needed(head: &[u8]) -> usize {
    if head.len() < 2 {
        return 2;
    }
    let ext = match head[1] & 0x7F {
        126 => 2,
        127 => 8,
        _ => 0,
    };
    2 + ext + if head[1] & 0x80 != 0 { 4 } else { 0 }
}

/// What the decoder found next in the input.
#[derive(Debug, PartialEq, Eq)]
pub enum Event<'a> {
    /// A frame begins; its payload follows as `Payload` pieces, then `End`.
    Start(Header),
    /// A piece of the current frame's payload (unmasked: server frames never are masked).
    Payload(&'a [u8]),
    /// The current frame is complete.
    End,
}

/// Follows the server's byte stream frame by frame without buffering payloads.
#[derive(Debug, Default)]
pub struct Decoder {
    head: [u8; MAX_HEADER],
    head_len: u8,
    /// The frame whose payload is streaming, with the bytes still to come.
    current: Option<(Header, u64)>,
    /// A data frame without FIN was seen and its final continuation has not come yet.
    in_message: bool,
}

impl Decoder {
    /// The next event from `input`, advancing it past what was used. `Ok(None)`: all input
    /// used, read more.
    pub fn next<'a>(&mut self, input: &mut &'a [u8]) -> Result<Option<Event<'a>>, FrameError> {
        if let Some((header, remaining)) = &mut self.current {
            if *remaining == 0 {
                let header = *header;
                self.current = None;
                if !opcode::is_control(header.opcode) {
                    self.in_message = !header.fin;
                }
                return Ok(Some(Event::End));
            }
            if input.is_empty() {
                return Ok(None);
            }
            let n = (*remaining).min(input.len() as u64) as usize;
            *remaining -= n as u64;
            let (piece, rest) = input.split_at(n);
            *input = rest;
            return Ok(Some(Event::Payload(piece)));
        }
        loop {
            let have = self.head_len as usize;
            let need = header_needed(&self.head[..have]);
            if have == need {
                break;
            }
            if input.is_empty() {
                return Ok(None);
            }
            let take = (need - have).min(input.len());
            self.head[have..have + take].copy_from_slice(&input[..take]);
            self.head_len += take as u8;
            *input = &input[take..];
        }
        let parsed = parse_header(&self.head[..self.head_len as usize])?;
        self.head_len = 0;
        // header_needed and parse_header agree on the length, so a full head parses.
        let Some((header, _)) = parsed else { return Err(FrameError::TooLong) };
        if header.mask.is_some() {
            return Err(FrameError::Masked);
        }
        match header.opcode {
            opcode::CONTINUATION if !self.in_message => return Err(FrameError::Fragmentation),
            opcode::TEXT | opcode::BINARY if self.in_message => return Err(FrameError::Fragmentation),
            _ => {}
        }
        self.current = Some((header, header.len));
        Ok(Some(Event::Start(header)))
    }
}

/// xorshift64*: masking keys and handshake keys. Seeded from the kernel once per process;
/// unpredictable enough for a load generator on loopback (RFC 6455 asks for a strong
/// source so that intermediaries cannot be poisoned, and there are none here).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn from_entropy() -> Rng {
        let mut seed = [0u8; 8];
        let got = std::fs::File::open("/dev/urandom")
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut seed))
            .is_ok();
        let mut s = u64::from_le_bytes(seed);
        if !got || s == 0 {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1);
            s = t ^ ((std::process::id() as u64) << 32) | 1;
        }
        Rng(s)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub fn mask(&mut self) -> [u8; 4] {
        (self.next_u64() as u32).to_ne_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `bytes` in pieces of `step` and collects (header, payload) pairs.
    fn decode(bytes: &[u8], step: usize) -> Result<Vec<(Header, Vec<u8>)>, FrameError> {
        let mut d = Decoder::default();
        let mut frames = Vec::new();
        let mut cur: Option<(Header, Vec<u8>)> = None;
        for piece in bytes.chunks(step) {
            let mut input = piece;
            while let Some(ev) = d.next(&mut input)? {
                match ev {
                    Event::Start(h) => cur = Some((h, Vec::new())),
                    Event::Payload(p) => cur.as_mut().expect("payload inside a frame").1.extend(p),
                    Event::End => frames.push(cur.take().expect("end of a frame")),
                }
            }
        }
        // A zero-length final frame ends on the next call.
        while let Some(ev) = d.next(&mut &[][..])? {
            if ev == Event::End {
                frames.push(cur.take().expect("end of a frame"));
            }
        }
        Ok(frames)
    }

    #[test]
    fn accept_key_matches_rfc_example() {
        // RFC 6455, section 1.3.
        assert_eq!(accept_key("dGhlIHNhbXBsZSBub25jZQ=="), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    }

    #[test]
    fn keys_are_16_bytes_of_base64() {
        let mut rng = Rng::from_entropy();
        let a = new_key(&mut rng);
        let b = new_key(&mut rng);
        assert_eq!(a.len(), 24);
        assert_ne!(a, b);
        let raw = base64::engine::general_purpose::STANDARD.decode(&a).expect("base64");
        assert_eq!(raw.len(), 16);
    }

    #[test]
    fn header_lengths_at_every_boundary() {
        for (len, unmasked) in
            [(0u64, 2), (125, 2), (126, 4), (0xFFFF, 4), (0x1_0000, 10), (u32::MAX as u64, 10)]
        {
            assert_eq!(header_len(len, false), unmasked, "len {len}");
            assert_eq!(header_len(len, true), unmasked + 4, "len {len}");
            let mut out = Vec::new();
            write_header(&mut out, true, opcode::BINARY, len, Some([1, 2, 3, 4]));
            assert_eq!(out.len(), header_len(len, true));
            let (h, n) = parse_header(&out).expect("valid").expect("complete");
            assert_eq!((h.len, n, h.mask, h.fin), (len, out.len(), Some([1, 2, 3, 4]), true));
            for cut in 0..out.len() {
                assert_eq!(parse_header(&out[..cut]), Ok(None), "len {len} cut {cut}");
            }
        }
    }

    #[test]
    fn mask_round_trip_at_any_offset() {
        let payload: Vec<u8> = (0..1000u32).map(|i| (i * 7 + 3) as u8).collect();
        let key = [0xA1, 0x5B, 0x07, 0xFE];
        let mut whole = payload.clone();
        apply_mask(&mut whole, key, 0);
        assert_ne!(whole, payload);
        for (i, b) in whole.iter().enumerate() {
            assert_eq!(*b, payload[i] ^ key[i % 4]);
        }
        // Masking in uneven pieces gives the same bytes as masking at once.
        let mut pieces = payload.clone();
        let mut at = 0;
        for size in [1usize, 3, 5, 64, 927] {
            apply_mask(&mut pieces[at..at + size], key, at as u64);
            at += size;
        }
        assert_eq!(pieces, whole);
        apply_mask(&mut whole, key, 0);
        assert_eq!(whole, payload);
    }

    #[test]
    fn masked_frame_round_trip() {
        for len in [0usize, 1, 125, 126, 65535, 65536, 70000] {
            let payload: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let key = [9, 8, 7, 6];
            let mut frame = Vec::new();
            write_frame(&mut frame, opcode::BINARY, &payload, key);
            let (h, n) = parse_header(&frame).expect("valid").expect("complete");
            assert_eq!(h, Header { fin: true, opcode: opcode::BINARY, len: len as u64, mask: Some(key) });
            assert_eq!(frame.len(), n + len);
            let mut body = frame[n..].to_vec();
            apply_mask(&mut body, key, 0);
            assert_eq!(body, payload, "len {len}");
        }
    }

    #[test]
    fn decoder_streams_server_frames_in_any_split() {
        let mut bytes = Vec::new();
        write_header(&mut bytes, true, opcode::TEXT, 5, None);
        bytes.extend_from_slice(b"hello");
        write_header(&mut bytes, true, opcode::PING, 0, None);
        write_header(&mut bytes, false, opcode::BINARY, 300, None);
        bytes.extend(std::iter::repeat_n(7u8, 300));
        write_header(&mut bytes, true, opcode::PONG, 2, None);
        bytes.extend_from_slice(b"hb");
        write_header(&mut bytes, true, opcode::CONTINUATION, 70000, None);
        bytes.extend(std::iter::repeat_n(8u8, 70000));
        for step in [1, 2, 3, 13, 4096, bytes.len()] {
            let frames = decode(&bytes, step).expect("valid stream");
            let ops: Vec<(u8, usize)> = frames.iter().map(|(h, p)| (h.opcode, p.len())).collect();
            assert_eq!(ops, vec![(1, 5), (9, 0), (2, 300), (10, 2), (0, 70000)], "step {step}");
            assert_eq!(frames[0].1, b"hello");
            assert!(frames[4].1.iter().all(|b| *b == 8));
        }
    }

    #[test]
    fn decoder_refuses_what_rfc_6455_forbids() {
        let masked = {
            let mut f = Vec::new();
            write_frame(&mut f, opcode::TEXT, b"x", [1, 2, 3, 4]);
            f
        };
        assert_eq!(decode(&masked, 64).unwrap_err(), FrameError::Masked);
        assert_eq!(decode(&[0xC1, 0x00], 64).unwrap_err(), FrameError::Reserved);
        assert_eq!(decode(&[0x83, 0x00], 64).unwrap_err(), FrameError::BadOpcode(3));
        assert_eq!(decode(&[0x09, 0x00], 64).unwrap_err(), FrameError::BadControl);
        assert_eq!(decode(&[0x89, 126, 0, 126], 64).unwrap_err(), FrameError::BadControl);
        assert_eq!(decode(&[0x80, 0x00], 64).unwrap_err(), FrameError::Fragmentation);
        assert_eq!(decode(&[0x01, 0x00, 0x81, 0x00], 64).unwrap_err(), FrameError::Fragmentation);
        let huge = [0x82, 127, 0x80, 0, 0, 0, 0, 0, 0, 0];
        assert_eq!(decode(&huge, 64).unwrap_err(), FrameError::TooLong);
    }

    #[test]
    fn response_check() {
        let key = "dGhlIHNhbXBsZSBub25jZQ==";
        let ok = "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                  Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n";
        // A frame right behind the head is not part of it.
        let with_frame = [ok.as_bytes(), &[0x81, 0x00]].concat();
        assert_eq!(check_response(&with_frame, key), Ok(Some(ok.len())));
        assert_eq!(check_response(&ok.as_bytes()[..40], key), Ok(None));
        let wrong = ok.replace("s3pP", "AAAA");
        assert_eq!(check_response(wrong.as_bytes(), key), Err(HandshakeError::BadAccept));
        let refused = "HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n";
        assert_eq!(check_response(refused.as_bytes(), key), Err(HandshakeError::Status(401)));
        assert_eq!(retry_after(refused.as_bytes()), None);
        let busy = "HTTP/1.1 503 Service Unavailable\r\nRetry-After: 3\r\nContent-Length: 0\r\n\r\n";
        assert_eq!(retry_after(busy.as_bytes()), Some(3));
        let plain =
            "HTTP/1.1 101 Switching Protocols\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n";
        assert_eq!(check_response(plain.as_bytes(), key), Err(HandshakeError::NotUpgraded));
    }
}
