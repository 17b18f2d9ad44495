//! Who may open a connection now: a shard's share of the node's connect rate
//! (`limits.connect_rate_per_sec`) and its count of open connections per client address
//! (`limits.max_connections_per_ip`). Checked before the upgrade is answered, so a
//! reconnect storm is turned away with `503` and a `Retry-After` before it costs a
//! session, a token check's worth of CPU at most.
//!
//! Shard-local and lock-free like everything on a shard: the node's rate is split evenly
//! over the shards (the kernel spreads connections evenly over their `SO_REUSEPORT`
//! listeners), and so is the per-address cap.

use std::collections::HashMap;
use std::net::IpAddr;

/// `Retry-After` seconds for a connection over the node's rate: spread over this range so
/// that refused clients do not return in step.
const RATE_RETRY_S: (u32, u32) = (1, 5);

/// `Retry-After` seconds for an address over its cap: its connections end slowly.
const IP_RETRY_S: (u32, u32) = (10, 30);

/// `Retry-After` seconds for a node at `limits.max_connections` or draining: long enough
/// for a load balancer to send the retry elsewhere, spread so retries do not come in step.
pub const FULL_RETRY_S: (u32, u32) = (2, 10);

/// Why a connection is turned away, and when to try again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Throttle {
    pub why: &'static str,
    pub retry_after_s: u32,
}

pub struct Admission {
    /// New connections per second for this shard; 0 = no limit.
    rate: f64,
    /// Tokens left in the bucket (at most `rate`: one second's burst).
    tokens: f64,
    /// When the bucket was last filled, shard milliseconds.
    filled_ms: u64,
    /// Open connections per address allowed on this shard; 0 = no limit.
    per_ip: u32,
    /// Open connections by address (only while `per_ip` is set).
    open: HashMap<IpAddr, u32>,
    /// A small PRNG for the retry spread (xorshift64).
    seed: u64,
}

impl Admission {
    pub fn new(
        connect_rate_per_sec: u32,
        max_connections_per_ip: u32,
        shards: usize,
        seed: u64,
    ) -> Admission {
        let shards = shards.max(1) as u32;
        let rate = f64::from(connect_rate_per_sec) / f64::from(shards);
        Admission {
            rate,
            tokens: rate,
            filled_ms: 0,
            per_ip: max_connections_per_ip.div_ceil(shards),
            open: HashMap::new(),
            seed: seed | 1,
        }
    }

    /// Takes a place for a connection from `ip` at `now_ms`, or says why not. A taken
    /// place is given back with [`Admission::release`] when the connection ends.
    pub fn admit(&mut self, ip: IpAddr, now_ms: u64) -> Result<(), Throttle> {
        if self.per_ip > 0 && self.open.get(&ip).is_some_and(|n| *n >= self.per_ip) {
            let retry_after_s = self.spread(IP_RETRY_S);
            return Err(Throttle { why: "too many connections from this address", retry_after_s });
        }
        if self.rate > 0.0 {
            let elapsed = now_ms.saturating_sub(self.filled_ms) as f64 / 1000.0;
            self.tokens = (self.tokens + elapsed * self.rate).min(self.rate.max(1.0));
            self.filled_ms = now_ms;
            if self.tokens < 1.0 {
                let retry_after_s = self.spread(RATE_RETRY_S);
                return Err(Throttle { why: "too many new connections; retry later", retry_after_s });
            }
            self.tokens -= 1.0;
        }
        if self.per_ip > 0 {
            *self.open.entry(ip).or_insert(0) += 1;
        }
        Ok(())
    }

    /// A connection admitted from `ip` ended.
    pub fn release(&mut self, ip: IpAddr) {
        if self.per_ip == 0 {
            return;
        }
        if let Some(n) = self.open.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                self.open.remove(&ip);
            }
        }
    }

    /// A number in `lo..=hi`, and on each call a different one.
    pub fn spread(&mut self, (lo, hi): (u32, u32)) -> u32 {
        lo + (self.next() % u64::from(hi - lo + 1)) as u32
    }

    /// `0..n` milliseconds, for the drain's reconnect hint.
    pub fn jitter_ms(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }

    fn next(&mut self) -> u64 {
        let mut x = self.seed;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.seed = x;
        x
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(n: u8) -> IpAddr {
        IpAddr::from([203, 0, 113, n])
    }

    #[test]
    fn the_rate_is_a_bucket_of_one_seconds_worth_split_over_the_shards() {
        let mut a = Admission::new(20, 0, 2, 7); // 10 a second on this shard
        for _ in 0..10 {
            assert!(a.admit(ip(1), 0).is_ok());
        }
        let refused = a.admit(ip(1), 0).unwrap_err();
        assert!((1..=5).contains(&refused.retry_after_s), "{refused:?}");
        assert!(a.admit(ip(2), 50).is_err(), "half a token after 50 ms");
        assert!(a.admit(ip(2), 100).is_ok(), "one token after 100 ms");
        assert!(a.admit(ip(2), 100).is_err());
        for _ in 0..10 {
            assert!(a.admit(ip(3), 60_000).is_ok(), "a full bucket after a quiet minute");
        }
        assert!(a.admit(ip(3), 60_000).is_err(), "never more than one second's burst");
    }

    #[test]
    fn the_per_address_cap_counts_open_connections() {
        let mut a = Admission::new(0, 3, 2, 7); // ceil(3 / 2) = 2 on this shard
        assert!(a.admit(ip(1), 0).is_ok());
        assert!(a.admit(ip(1), 0).is_ok());
        let refused = a.admit(ip(1), 0).unwrap_err();
        assert!((10..=30).contains(&refused.retry_after_s));
        assert!(a.admit(ip(2), 0).is_ok(), "another address is not affected");
        a.release(ip(1));
        assert!(a.admit(ip(1), 0).is_ok());
        a.release(ip(1));
        a.release(ip(1));
        a.release(ip(2));
        assert!(a.open.is_empty(), "no entry kept for an address with nothing open");
    }

    #[test]
    fn no_limits_keep_no_state() {
        let mut a = Admission::new(0, 0, 4, 7);
        for i in 0..1000u32 {
            assert!(a.admit(IpAddr::from(i.to_be_bytes()), 0).is_ok());
        }
        assert!(a.open.is_empty());
    }

    #[test]
    fn spreads_cover_their_range() {
        let mut a = Admission::new(0, 0, 1, 99);
        let seen: std::collections::BTreeSet<u32> = (0..200).map(|_| a.spread((1, 5))).collect();
        assert_eq!(seen.into_iter().collect::<Vec<_>>(), vec![1, 2, 3, 4, 5]);
        assert!((0..200).map(|_| a.jitter_ms(10_000)).all(|j| j < 10_000));
        assert_eq!(a.jitter_ms(0), 0);
    }
}
