//! The admin listener's request head: `api::parse_head`, as the connection loop calls it
//! on every read (each prefix of the stream), and the body bounds it then reads.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ringpush::api::{self, MAX_BODY};

fuzz_target!(|data: &[u8]| {
    let data = &data[..data.len().min(32 * 1024)];
    if let Ok(Some(head)) = api::parse_head(data) {
        assert!(head.head_len <= data.len());
        assert!(head.content_length <= MAX_BODY);
        // Keep-alive: the next request starts after this one's body.
        let end = head.head_len + head.content_length;
        if end <= data.len() {
            let _ = api::parse_head(&data[end..]);
        }
    }
});
