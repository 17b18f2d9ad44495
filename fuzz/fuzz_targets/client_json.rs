//! The text of a client message: `protocol::parse_request`, exactly what a session runs on
//! every text frame before touching any state, then the `error` frame it would answer.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ringpush::auth::valid_id;
use ringpush::protocol::{self, ClientRequest, MAX_CID_CHARS, MAX_CONV_CHARS};

fuzz_target!(|data: &[u8]| {
    match protocol::parse_request(data) {
        Ok(ClientRequest::Send { cid, conv, body }) => {
            assert!(valid_id(&conv, MAX_CONV_CHARS));
            assert!(!cid.is_empty() && cid.chars().count() <= MAX_CID_CHARS);
            // The body is forwarded as is inside a `msg` frame: it must be JSON by itself.
            let msg = protocol::msg_json(&protocol::MsgFields {
                conv: &conv,
                seq: 1,
                from: "u",
                dev: None,
                cid: Some(&cid),
                ts: 0,
                body: body.get().as_bytes(),
            });
            assert!(serde_json::from_slice::<serde_json::Value>(&msg).is_ok());
        }
        Ok(ClientRequest::Sync { conv, .. }) | Ok(ClientRequest::Read { conv, .. }) => {
            assert!(valid_id(&conv, MAX_CONV_CHARS))
        }
        Ok(ClientRequest::Signal { conv, body, .. }) => {
            assert!(valid_id(&conv, MAX_CONV_CHARS));
            // The body is forwarded as is inside a `signal` frame: it must be JSON by itself.
            let frame = protocol::signal_json(&conv, "u", "d", body.get().as_bytes());
            assert!(serde_json::from_slice::<serde_json::Value>(&frame).is_ok());
        }
        Err(r) => {
            let frame = protocol::error_json(r.cid.as_deref(), r.code, r.message);
            assert!(serde_json::from_slice::<serde_json::Value>(&frame).is_ok());
        }
    }
});
