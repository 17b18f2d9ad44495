//! The client and server frames of PROTOCOL.md as plain types, serialised with serde.
//! No sockets here: sessions encode a [`ServerFrame`] once and queue the bytes.

use serde::{Deserialize, Serialize};

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

/// The envelope every client frame shares: what is needed to route it and to answer an
/// error with the request's `cid`. The rest of the object is read by the op's handler.
#[derive(Deserialize, Debug)]
pub struct Envelope<'a> {
    #[serde(borrow)]
    pub op: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow, default)]
    pub cid: Option<std::borrow::Cow<'a, str>>,
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
    fn error_shape() {
        let f = ServerFrame::Error { cid: Some("a1"), code: ErrorCode::UnknownOp, message: "nope" };
        assert_eq!(
            String::from_utf8(f.to_json()).unwrap(),
            r#"{"op":"error","cid":"a1","code":"unknown_op","message":"nope"}"#
        );
    }
}
