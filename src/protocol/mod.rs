//! The client and server frames of PROTOCOL.md as plain types, serialised with serde.
//! No sockets here: sessions encode a [`ServerFrame`] once and queue the bytes.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// A frame the server sends, tagged by `op`.
#[derive(Serialize, Debug)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum ServerFrame<'a> {
    Hello {
        user: &'a str,
        device: &'a str,
        conn: &'a str,
        node: &'a str,
        ping_interval_ms: u64,
        idle_timeout_ms: u64,
    },
    Error {
        #[serde(skip_serializing_if = "Option::is_none")]
        cid: Option<&'a str>,
        code: ErrorCode,
        message: &'a str,
    },
}

impl ServerFrame<'_> {
    /// The JSON text of this frame.
    pub fn to_json(&self) -> Vec<u8> {
        // Serialising these plain structs into a Vec cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// The `code` of an `error` frame (PROTOCOL.md, "Server to client").
#[derive(Serialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    BadRequest,
    UnknownOp,
    NotMember,
    RateLimited,
    Unavailable,
}

impl ErrorCode {
    /// The code as it appears on the wire and in metrics.
    pub fn label(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::UnknownOp => "unknown_op",
            ErrorCode::NotMember => "not_member",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::Unavailable => "unavailable",
        }
    }
}

/// A client frame (PROTOCOL.md, "Client to server"). Borrowed from the message text;
/// unknown fields are ignored, a wrong type for a known one is a `bad_request`.
#[derive(Deserialize, Debug)]
pub struct ClientFrame<'a> {
    #[serde(borrow, default)]
    pub op: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pub cid: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pub conv: Option<Cow<'a, str>>,
    /// Any JSON, `null` included; `None` only when the field is absent.
    #[serde(borrow, default, deserialize_with = "present")]
    pub body: Option<&'a RawValue>,
    #[serde(default)]
    pub after: Option<u64>,
    #[serde(default)]
    pub limit: Option<usize>,
    #[serde(default)]
    pub seq: Option<u64>,
}

/// Just the `cid` of a frame that failed to parse as a whole, to answer with it.
#[derive(Deserialize, Debug)]
pub struct CidOnly<'a> {
    #[serde(borrow, default)]
    pub cid: Option<Cow<'a, str>>,
}

fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(d).map(Some)
}

/// The longest `cid` accepted (PROTOCOL.md: 1-64 characters).
pub const MAX_CID_CHARS: usize = 64;
/// The longest conversation id accepted.
pub const MAX_CONV_CHARS: usize = 128;

/// A client request that passed every check needing no session state: one JSON object,
/// a known `op`, a valid `conv`, for `send` a valid `cid` and a `body`, for `read` a
/// `seq`, for `signal` a `body` (its size is the session's to check: a config limit).
#[derive(Debug)]
pub enum ClientRequest<'a> {
    Send { cid: Cow<'a, str>, conv: Cow<'a, str>, body: &'a RawValue },
    Sync { cid: Option<Cow<'a, str>>, conv: Cow<'a, str>, after: Option<u64>, limit: Option<usize> },
    Read { cid: Option<Cow<'a, str>>, conv: Cow<'a, str>, seq: u64 },
    Signal { cid: Option<Cow<'a, str>>, conv: Cow<'a, str>, body: &'a RawValue },
}

/// Why a client frame is answered with an `error` frame instead of being acted on.
#[derive(Debug, PartialEq, Eq)]
pub struct Refused<'a> {
    /// The request's `cid` when one could be read, to answer with it.
    pub cid: Option<Cow<'a, str>>,
    pub code: ErrorCode,
    pub message: &'static str,
}

enum Op {
    Send,
    Sync,
    Read,
    Signal,
}

/// Parses and checks the text of a client message (what a session does with every text
/// frame before any state is touched). Pure: the server and the fuzz target both call it.
pub fn parse_request(text: &[u8]) -> Result<ClientRequest<'_>, Refused<'_>> {
    let refused = |cid, code, message| Refused { cid, code, message };
    // One JSON object: serde would also read an array positionally into the fields.
    let is_object = text.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{');
    let frame = match serde_json::from_slice::<ClientFrame>(text) {
        Ok(frame) if is_object => frame,
        _ => {
            // Still answer with the request's cid when one can be read.
            let cid = serde_json::from_slice::<CidOnly>(text).ok().filter(|_| is_object);
            let cid = cid.and_then(|c| c.cid);
            return Err(refused(cid, ErrorCode::BadRequest, "not a valid request frame"));
        }
    };
    let ClientFrame { op, cid, conv, body, after, limit, seq } = frame;
    let op = match op.as_deref() {
        Some("send") => Op::Send,
        Some("sync") => Op::Sync,
        Some("read") => Op::Read,
        Some("signal") => Op::Signal,
        Some(_) => return Err(refused(cid, ErrorCode::UnknownOp, "unknown op")),
        None => return Err(refused(cid, ErrorCode::BadRequest, "missing op")),
    };
    let conv = match conv {
        Some(c) if crate::auth::valid_id(&c, MAX_CONV_CHARS) => c,
        _ => {
            let why = "conv must be 1-128 characters of [A-Za-z0-9._:@-]";
            return Err(refused(cid, ErrorCode::BadRequest, why));
        }
    };
    match op {
        Op::Send => {}
        Op::Sync => return Ok(ClientRequest::Sync { cid, conv, after, limit }),
        Op::Read => {
            return match seq {
                Some(seq) => Ok(ClientRequest::Read { cid, conv, seq }),
                None => Err(refused(cid, ErrorCode::BadRequest, "missing seq")),
            }
        }
        Op::Signal => {
            return match body {
                Some(body) => match check_body(body.get()) {
                    Ok(()) => Ok(ClientRequest::Signal { cid, conv, body }),
                    Err(why) => Err(refused(cid, ErrorCode::BadRequest, why)),
                },
                None => Err(refused(cid, ErrorCode::BadRequest, "missing body")),
            }
        }
    }
    let cid = match cid {
        Some(c) if !c.is_empty() && c.chars().count() <= MAX_CID_CHARS => c,
        cid => return Err(refused(cid, ErrorCode::BadRequest, "cid must be 1-64 characters")),
    };
    match body {
        Some(body) => match check_body(body.get()) {
            Ok(()) => Ok(ClientRequest::Send { cid, conv, body }),
            Err(why) => Err(refused(Some(cid), ErrorCode::BadRequest, why)),
        },
        None => Err(refused(Some(cid), ErrorCode::BadRequest, "missing body")),
    }
}

/// The deepest nesting of arrays and objects a `body` may have. Bodies are forwarded
/// as they are, so every receiving client parses them: common parsers stop at about
/// 128 levels (serde_json's default) and some sooner.
pub const MAX_BODY_DEPTH: usize = 64;

/// The `\uXXXX` escape at `at` (grammar already checked): a surrogate must come as a
/// high one followed by a low one (JSON allows a lone one; many parsers refuse it).
/// Returns where the escape (pair) ends.
fn unicode_escape(bytes: &[u8], at: usize) -> Result<usize, &'static str> {
    let unit = |i: usize| {
        let hex = bytes.get(i + 2..i + 6).and_then(|h| std::str::from_utf8(h).ok())?;
        u16::from_str_radix(hex, 16).ok()
    };
    const LONE: &str = "body has a lone surrogate escape";
    match unit(at) {
        Some(0xD800..=0xDBFF) => match (bytes.get(at + 6..at + 8), unit(at + 6)) {
            (Some(b"\\u"), Some(0xDC00..=0xDFFF)) => Ok(at + 12),
            _ => Err(LONE),
        },
        Some(0xDC00..=0xDFFF) => Err(LONE),
        _ => Ok(at + 6),
    }
}

/// Checks that a `body` (valid JSON: its grammar is checked already) is one every
/// receiving client can parse: nested at most [`MAX_BODY_DEPTH`] levels, and no number
/// beyond the range of a double and no lone surrogate escape (JSON allows both; many
/// parsers refuse them). One pass,
/// no recursion. The message is the `bad_request` error's.
pub fn check_body(json: &str) -> Result<(), &'static str> {
    let bytes = json.as_bytes();
    let mut depth = 0usize;
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'"' => {
                i += 1;
                while i < bytes.len() && bytes[i] != b'"' {
                    if bytes[i] != b'\\' {
                        i += 1;
                    } else if bytes.get(i + 1) == Some(&b'u') {
                        i = unicode_escape(bytes, i)?;
                    } else {
                        i += 2;
                    }
                }
            }
            b'[' | b'{' => {
                depth += 1;
                if depth > MAX_BODY_DEPTH {
                    return Err("body nested deeper than 64 levels");
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            b'-' | b'0'..=b'9' => {
                let start = i;
                while i + 1 < bytes.len()
                    && matches!(bytes[i + 1], b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E')
                {
                    i += 1;
                }
                if !json[start..=i].parse::<f64>().is_ok_and(f64::is_finite) {
                    return Err("body has a number beyond the range of a double");
                }
            }
            _ => {}
        }
        i += 1;
    }
    Ok(())
}

/// Appends `s` as a JSON string.
fn put_str(out: &mut Vec<u8>, s: &str) {
    // Writing a &str into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, s);
}

fn put_opt_str(out: &mut Vec<u8>, s: Option<&str>) {
    match s {
        Some(s) => put_str(out, s),
        None => out.extend_from_slice(b"null"),
    }
}

fn put_u64(out: &mut Vec<u8>, n: u64) {
    use std::io::Write as _;
    // Writing into a Vec cannot fail.
    let _ = write!(out, "{n}");
}

/// What a `msg` frame says about its message.
pub struct MsgFields<'a> {
    pub conv: &'a str,
    pub seq: u64,
    pub from: &'a str,
    pub dev: Option<&'a str>,
    pub cid: Option<&'a str>,
    pub ts: u64,
    /// JSON text, validated when it arrived; written as is.
    pub body: &'a [u8],
}

/// `{"op":"msg",...}`: written field by field so the body is copied once, never re-parsed.
pub fn msg_json(m: &MsgFields<'_>) -> Vec<u8> {
    let mut out = Vec::with_capacity(100 + m.conv.len() + m.from.len() + m.body.len());
    out.extend_from_slice(b"{\"op\":\"msg\",\"conv\":");
    put_str(&mut out, m.conv);
    out.extend_from_slice(b",\"seq\":");
    put_u64(&mut out, m.seq);
    out.extend_from_slice(b",\"from\":");
    put_str(&mut out, m.from);
    out.extend_from_slice(b",\"dev\":");
    put_opt_str(&mut out, m.dev);
    out.extend_from_slice(b",\"cid\":");
    put_opt_str(&mut out, m.cid);
    out.extend_from_slice(b",\"ts\":");
    put_u64(&mut out, m.ts);
    out.extend_from_slice(b",\"body\":");
    out.extend_from_slice(m.body);
    out.push(b'}');
    out
}

/// `{"op":"ack","conv":...,"cid":...,"seq":...,"ts":...}`
pub fn ack_json(conv: &str, cid: &str, seq: u64, ts: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 + conv.len() + cid.len());
    out.extend_from_slice(b"{\"op\":\"ack\",\"conv\":");
    put_str(&mut out, conv);
    out.extend_from_slice(b",\"cid\":");
    put_str(&mut out, cid);
    out.extend_from_slice(b",\"seq\":");
    put_u64(&mut out, seq);
    out.extend_from_slice(b",\"ts\":");
    put_u64(&mut out, ts);
    out.push(b'}');
    out
}

/// `{"op":"synced","conv":...,"last":...,"read":...,"complete":...}`
pub fn synced_json(conv: &str, last: u64, read: u64, complete: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(80 + conv.len());
    out.extend_from_slice(b"{\"op\":\"synced\",\"conv\":");
    put_str(&mut out, conv);
    out.extend_from_slice(b",\"last\":");
    put_u64(&mut out, last);
    out.extend_from_slice(b",\"read\":");
    put_u64(&mut out, read);
    out.extend_from_slice(if complete { b",\"complete\":true}" } else { b",\"complete\":false}" });
    out
}

/// `{"op":"gap","conv":...,"from":...,"to":...}`
pub fn gap_json(conv: &str, from: u64, to: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(48 + conv.len());
    out.extend_from_slice(b"{\"op\":\"gap\",\"conv\":");
    put_str(&mut out, conv);
    out.extend_from_slice(b",\"from\":");
    put_u64(&mut out, from);
    out.extend_from_slice(b",\"to\":");
    put_u64(&mut out, to);
    out.push(b'}');
    out
}

/// `{"op":"read","conv":...,"seq":...,"dev":...}`: a user's read mark moved (`dev`
/// `null` when it was moved through the API).
pub fn read_json(conv: &str, seq: u64, dev: Option<&str>) -> Vec<u8> {
    let mut out = Vec::with_capacity(48 + conv.len());
    out.extend_from_slice(b"{\"op\":\"read\",\"conv\":");
    put_str(&mut out, conv);
    out.extend_from_slice(b",\"seq\":");
    put_u64(&mut out, seq);
    out.extend_from_slice(b",\"dev\":");
    put_opt_str(&mut out, dev);
    out.push(b'}');
    out
}

/// `{"op":"signal","conv":...,"from":...,"dev":...,"body":...}`
pub fn signal_json(conv: &str, from: &str, dev: &str, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 + conv.len() + from.len() + dev.len() + body.len());
    out.extend_from_slice(b"{\"op\":\"signal\",\"conv\":");
    put_str(&mut out, conv);
    out.extend_from_slice(b",\"from\":");
    put_str(&mut out, from);
    out.extend_from_slice(b",\"dev\":");
    put_str(&mut out, dev);
    out.extend_from_slice(b",\"body\":");
    out.extend_from_slice(body);
    out.push(b'}');
    out
}

/// `{"op":"push","body":...}`
pub fn push_json(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(24 + body.len());
    out.extend_from_slice(b"{\"op\":\"push\",\"body\":");
    out.extend_from_slice(body);
    out.push(b'}');
    out
}

/// `{"op":"error",...}` for a request with the given `cid`.
pub fn error_json(cid: Option<&str>, code: ErrorCode, message: &str) -> Vec<u8> {
    ServerFrame::Error { cid, code, message }.to_json()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hello_shape() {
        let f = ServerFrame::Hello {
            user: "u1",
            device: "phone",
            conn: "c1",
            node: "n1",
            ping_interval_ms: 25000,
            idle_timeout_ms: 60000,
        };
        assert_eq!(
            String::from_utf8(f.to_json()).unwrap(),
            r#"{"op":"hello","user":"u1","device":"phone","conn":"c1","node":"n1","ping_interval_ms":25000,"idle_timeout_ms":60000}"#
        );
    }

    #[test]
    fn msg_and_friends_are_valid_json() {
        let m = MsgFields {
            conv: "c\"1",
            seq: 42,
            from: "u1",
            dev: None,
            cid: Some("a1"),
            ts: 7,
            body: br#"{"text":"hi"}"#,
        };
        let v: serde_json::Value = serde_json::from_slice(&msg_json(&m)).unwrap();
        assert_eq!(v["conv"], "c\"1");
        assert_eq!(v["seq"], 42);
        assert!(v["dev"].is_null());
        assert_eq!(v["body"]["text"], "hi");
        let v: serde_json::Value = serde_json::from_slice(&ack_json("c", "x", 3, 4)).unwrap();
        assert_eq!((v["op"].as_str(), v["seq"].as_u64()), (Some("ack"), Some(3)));
        let v: serde_json::Value = serde_json::from_slice(&synced_json("c", 9, 4, false)).unwrap();
        assert_eq!((v["complete"].as_bool(), v["read"].as_u64()), (Some(false), Some(4)));
        let v: serde_json::Value = serde_json::from_slice(&read_json("c", 7, Some("phone"))).unwrap();
        assert_eq!(
            (v["op"].as_str(), v["seq"].as_u64(), v["dev"].as_str()),
            (Some("read"), Some(7), Some("phone"))
        );
        assert!(
            serde_json::from_slice::<serde_json::Value>(&read_json("c", 7, None)).unwrap()["dev"].is_null()
        );
        let v: serde_json::Value =
            serde_json::from_slice(&signal_json("c", "u\"1", "d", br#"{"typing":true}"#)).unwrap();
        assert_eq!((v["from"].as_str(), v["body"]["typing"].as_bool()), (Some("u\"1"), Some(true)));
        let v: serde_json::Value = serde_json::from_slice(&gap_json("c", 2, 5)).unwrap();
        assert_eq!((v["from"].as_u64(), v["to"].as_u64()), (Some(2), Some(5)));
    }

    #[test]
    fn bodies_deeper_than_the_limit_or_with_infinite_numbers_are_refused() {
        let nest = |d: usize| format!("{}{}", "[".repeat(d), "]".repeat(d));
        assert_eq!(check_body(&nest(MAX_BODY_DEPTH)), Ok(()));
        assert!(check_body(&nest(MAX_BODY_DEPTH + 1)).is_err());
        // Brackets and quotes inside strings are text.
        let inside = format!(r#"{{"a":"{}\"[{{","b":[1]}}"#, "[".repeat(100));
        assert_eq!(check_body(&inside), Ok(()));
        for ok in
            ["0", "-0.5", "1e308", "-1.7976931348623157e308", "444444444444444444444", r#"{"n":2.5E-3}"#]
        {
            assert_eq!(check_body(ok), Ok(()), "{ok}");
        }
        // Surrogates in pairs only (the fuzzer found a lone one serde_json refuses).
        assert_eq!(check_body(r#""\ud834\udd1e \u00e9 \\udd1e""#), Ok(()));
        for bad in
            ["1e309", "-3e4449", r#"[0,{"x":[1E400]}]"#, r#""\udd1e""#, r#""\ud834x""#, r#""\ud834\u0041""#]
        {
            assert!(check_body(bad).is_err(), "{bad}");
        }
        // The fuzzer's input: refused as a request, and so never forwarded.
        let text = br#"{"op":"send","conv":"c1","cid":"c","body":[0,-3e4449,true]}"#;
        let refused = parse_request(text).unwrap_err();
        assert_eq!((refused.code, refused.cid.as_deref()), (ErrorCode::BadRequest, Some("c")));
    }

    #[test]
    fn read_needs_a_seq_and_signal_a_checked_body() {
        let ok = parse_request(br#"{"op":"read","conv":"c","seq":42,"cid":"r"}"#).unwrap();
        assert!(matches!(ok, ClientRequest::Read { seq: 42, .. }));
        let refused = parse_request(br#"{"op":"read","conv":"c","cid":"r"}"#).unwrap_err();
        assert_eq!((refused.code, refused.cid.as_deref()), (ErrorCode::BadRequest, Some("r")));
        assert!(parse_request(br#"{"op":"read","conv":"c","seq":-1}"#).is_err());
        let ok = parse_request(br#"{"op":"signal","conv":"c","body":{"typing":true}}"#).unwrap();
        assert!(matches!(ok, ClientRequest::Signal { .. }));
        assert!(parse_request(br#"{"op":"signal","conv":"c"}"#).is_err());
        assert!(parse_request(br#"{"op":"signal","conv":"c","body":1e999}"#).is_err());
    }

    #[test]
    fn client_frame_body_null_is_present() {
        let f: ClientFrame =
            serde_json::from_str(r#"{"op":"send","conv":"c","cid":"1","body":null}"#).unwrap();
        assert_eq!(f.body.map(|b| b.get()), Some("null"));
        let f: ClientFrame = serde_json::from_str(r#"{"op":"send"}"#).unwrap();
        assert!(f.body.is_none());
    }

    #[test]
    fn requests_are_checked_in_order() {
        fn refused(t: &str) -> Refused<'_> {
            parse_request(t.as_bytes()).unwrap_err()
        }
        let r = refused(r#"{"op":"send","conv":"c 1","cid":"k2","body":1}"#);
        assert_eq!((r.cid.as_deref(), r.code), (Some("k2"), ErrorCode::BadRequest));
        assert_eq!(refused(r#"{"op":"x","cid":"u"}"#).code, ErrorCode::UnknownOp);
        assert_eq!(refused(r#"{"cid":"m"}"#).message, "missing op");
        assert_eq!(refused(r#"["send","c1"]"#).cid, None);
        assert_eq!(refused(r#"{"op":"send","conv":"c1","cid":"b"}"#).message, "missing body");
        assert_eq!(refused(r#"{"op":5,"cid":"n"}"#).cid.as_deref(), Some("n"));
        let ok = parse_request(br#" {"op":"send","conv":"c1","cid":"a","body":null}"#).unwrap();
        assert!(matches!(ok, ClientRequest::Send { body, .. } if body.get() == "null"));
        let ok = parse_request(br#"{"op":"sync","conv":"c1","after":3}"#).unwrap();
        assert!(matches!(ok, ClientRequest::Sync { cid: None, after: Some(3), limit: None, .. }));
    }

    #[test]
    fn error_shape() {
        let f = ServerFrame::Error { cid: Some("a1"), code: ErrorCode::UnknownOp, message: "nope" };
        assert_eq!(
            String::from_utf8(f.to_json()).unwrap(),
            r#"{"op":"error","cid":"a1","code":"unknown_op","message":"nope"}"#
        );
    }
}
