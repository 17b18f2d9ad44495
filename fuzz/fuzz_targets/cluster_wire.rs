//! The node-to-node payload: `cluster::decode` on any bytes (what the subscriber thread
//! runs on every ZeroMQ message), and `encode(decode(x)) == x` for what decodes, since the
//! format has one encoding per message. Topic frames too.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ringpush::cluster::{self, Topic};

fuzz_target!(|data: &[u8]| {
    if let Ok(env) = cluster::decode(data) {
        let again = cluster::encode(&env).expect("a decoded envelope encodes");
        assert_eq!(again, data, "decode then encode is not the identity");
        assert_eq!(cluster::decode(&again).as_ref(), Ok(&env));
    }
    if let Some(topic) = Topic::parse(data) {
        assert_eq!(Topic::parse(topic.frame().as_bytes()), Some(topic));
    }
});
