//! The HTTP upgrade request, as the client listener sees it: `handshake::parse` on every
//! prefix the socket could deliver, then what the session does with an accepted request
//! (`token()`, `client_ip` behind trusted proxies, the `101` answer) or a refusal.
#![no_main]

use std::net::IpAddr;

use libfuzzer_sys::fuzz_target;
use ringpush::config::Cidr;
use ringpush::ws::handshake::{self, MAX_REQUEST_BYTES};

fuzz_target!(|data: &[u8]| {
    let trusted: [Cidr; 2] = [
        Cidr::new(IpAddr::from([10, 0, 0, 0]), 8).expect("valid prefix"),
        Cidr::new(IpAddr::from([0u16, 0, 0, 0, 0, 0, 0, 1]), 128).expect("valid prefix"),
    ];
    // The session reads until `parse` says complete or refused, or MAX_REQUEST_BYTES.
    let data = &data[..data.len().min(MAX_REQUEST_BYTES + 64)];
    match handshake::parse(data) {
        Ok(Some((req, head_len))) => {
            assert!(head_len <= data.len() && head_len <= MAX_REQUEST_BYTES);
            let _ = req.token();
            for peer in [IpAddr::from([10, 1, 2, 3]), IpAddr::from([203, 0, 113, 9])] {
                let ip = req.client_ip(peer, &trusted);
                assert!(ip == peer || trusted.iter().any(|c| c.contains(peer)));
            }
            let answer = handshake::accept_response(req.key);
            assert!(answer.starts_with(b"HTTP/1.1 101 "));
            // A shorter read of the same bytes is never accepted with a different head.
            if let Ok(Some((_, n))) = handshake::parse(&data[..head_len]) {
                assert_eq!(n, head_len);
            }
        }
        Ok(None) => assert!(data.len() < MAX_REQUEST_BYTES),
        Err(refusal) => {
            let response = refusal.response();
            assert!(response.starts_with(b"HTTP/1.1 "));
            let _ = refusal.label();
        }
    }
});
