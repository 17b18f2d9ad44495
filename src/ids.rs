//! Ids and where they live: the shared string type of conversation and user ids, and
//! the hash that places a key on a shard (and a ZeroMQ topic bucket). A leaf: every layer
//! may use it, it uses nothing of the crate.

use std::sync::Arc;

/// Conversation and user ids travel as shared strings.
pub type Key = Arc<str>;

/// The shard that owns `key` (a conversation or a user): FNV-1a of the key modulo the
/// shard count. Stable across processes and versions, so every node agrees on it.
pub fn shard_for(key: &str, shards: usize) -> usize {
    (fnv1a(key.as_bytes()) % shards.max(1) as u64) as usize
}

/// 64-bit FNV-1a.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_for_is_stable_and_spread() {
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
        let mut hits = [0usize; 4];
        for i in 0..4000 {
            hits[shard_for(&format!("conv-{i}"), 4)] += 1;
        }
        assert!(hits.iter().all(|&h| h > 800), "{hits:?}");
    }
}
