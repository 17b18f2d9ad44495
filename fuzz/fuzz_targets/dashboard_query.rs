//! The admin listener's `GET /events` request target: the split into path and query the
//! connection loop makes, `web::dashboard::events_interval` (the stream's `interval_ms`),
//! and `web::query_param`, which also reads the demo's `/demo/token` query on the client
//! listener.
#![no_main]

use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use ringpush::web::{dashboard, query_param};

fuzz_target!(|data: &[u8]| {
    let Ok(target) = std::str::from_utf8(data) else { return };
    let query = target.split_once('?').map_or("", |(_, q)| q);
    let interval = dashboard::events_interval(query);
    assert!(interval >= Duration::from_millis(100) && interval <= Duration::from_secs(60), "{interval:?}");
    for name in ["interval_ms", "user", "device", "ttl", ""] {
        if let Some(value) = query_param(query, name) {
            // Decoding never grows a value: `%XX` is three bytes for one.
            assert!(value.len() <= query.len(), "{name}: {value:?} from {query:?}");
        }
    }
});
