//! The admin listener's requests: `api::parse_head`, as the connection loop calls it on
//! every read (each prefix of the stream), the body bounds it then reads, and for
//! `/api/v1` paths `api::parse_call` on the body (the ids and JSON bodies of the calls).
#![no_main]

use libfuzzer_sys::fuzz_target;
use ringpush::api::{self, MAX_BODY};

fuzz_target!(|data: &[u8]| {
    let data = &data[..data.len().min(32 * 1024)];
    let Ok(Some(head)) = api::parse_head(data) else { return };
    assert!(head.head_len <= data.len());
    assert!(head.content_length <= MAX_BODY);
    let end = head.head_len + head.content_length;
    let Some(body) = data.get(head.head_len..end) else { return };
    let path = head.path.split('?').next().unwrap_or("");
    if let Some(segments) = api::api_path(path) {
        if let Err(response) = api::parse_call(&head.method, &segments, body) {
            assert!(matches!(response.status(), 400 | 404));
        }
    }
    // Keep-alive: the next request starts after this one's body.
    let _ = api::parse_head(&data[end..]);
});
