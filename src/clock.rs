//! Wall-clock time. Shards keep their own monotonic clocks for timers; this is the
//! time that leaves the process (message `ts`, presence `since`, token expiry). A leaf.

/// Wall-clock time in unix milliseconds (message `ts`, presence `since`).
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
