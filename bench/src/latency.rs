//! Latency histograms: HdrHistogram in nanoseconds (3 significant digits, up to a
//! minute), and the line a client process hands one to the parent in:
//! `hist NAME v1 c1 v2 c2 ...`, the non-empty buckets as (highest equivalent value,
//! count). The parent adds the buckets of every process into one histogram, which is
//! exact to the histogram's precision.

use hdrhistogram::Histogram;

/// Largest latency recorded as itself; larger ones count as this (a minute).
const MAX_NS: u64 = 60_000_000_000;

/// One latency distribution.
#[derive(Debug, Clone)]
pub struct Latency(Histogram<u64>);

/// The figures reported for a distribution, in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Summary {
    pub count: u64,
    pub p50: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub mean: f64,
}

impl Default for Latency {
    fn default() -> Latency {
        Latency::new()
    }
}

impl Latency {
    pub fn new() -> Latency {
        // Constant bounds that new_with_bounds accepts (low >= 1, high >= 2 * low, 3
        // digits): it cannot fail.
        Latency(Histogram::new_with_bounds(1, MAX_NS, 3).expect("valid constant bounds"))
    }

    pub fn record_ns(&mut self, ns: u64) {
        self.0.saturating_record(ns.clamp(1, MAX_NS));
    }

    pub fn reset(&mut self) {
        self.0.reset();
    }

    /// Adds another process's distribution.
    pub fn merge(&mut self, other: &Latency) {
        for v in other.0.iter_recorded() {
            self.0.saturating_record_n(v.value_iterated_to(), v.count_at_value());
        }
    }

    pub fn summary(&self) -> Summary {
        let us = |ns: u64| ns as f64 / 1000.0;
        if self.0.is_empty() {
            return Summary::default();
        }
        Summary {
            count: self.0.len(),
            p50: us(self.0.value_at_quantile(0.5)),
            p99: us(self.0.value_at_quantile(0.99)),
            p999: us(self.0.value_at_quantile(0.999)),
            max: us(self.0.max()),
            mean: self.0.mean() / 1000.0,
        }
    }

    /// `hist NAME v c v c ...`.
    pub fn line(&self, name: &str) -> String {
        let mut s = format!("hist {name}");
        for v in self.0.iter_recorded() {
            s += &format!(" {} {}", v.value_iterated_to(), v.count_at_value());
        }
        s
    }

    /// The name and distribution of a `hist` line.
    pub fn parse_line(line: &str) -> Option<(String, Latency)> {
        let mut words = line.split_whitespace();
        if words.next()? != "hist" {
            return None;
        }
        let name = words.next()?.to_string();
        let numbers: Vec<u64> = words.map(|w| w.parse().ok()).collect::<Option<_>>()?;
        if numbers.len() % 2 != 0 {
            return None;
        }
        let mut h = Latency::new();
        for pair in numbers.chunks(2) {
            h.0.saturating_record_n(pair[0].clamp(1, MAX_NS), pair[1]);
        }
        Some((name, h))
    }
}

impl Summary {
    /// `{"count":..,"p50_us":..,...}` for the JSON line.
    pub fn json(&self) -> serde_json::Value {
        let r = |x: f64| (x * 10.0).round() / 10.0;
        serde_json::json!({
            "count": self.count, "p50_us": r(self.p50), "p99_us": r(self.p99),
            "p999_us": r(self.p999), "max_us": r(self.max), "mean_us": r(self.mean),
        })
    }

    /// `p50 12.3 µs, p99 45.6 µs, p99.9 78.9 µs, max 1.2 ms (N samples)`.
    pub fn human(&self) -> String {
        format!(
            "p50 {}, p99 {}, p99.9 {}, max {} ({} samples)",
            duration_us(self.p50),
            duration_us(self.p99),
            duration_us(self.p999),
            duration_us(self.max),
            self.count
        )
    }
}

/// Microseconds as `850 µs` or `12.4 ms`.
pub fn duration_us(us: f64) -> String {
    if us >= 10_000.0 {
        format!("{:.1} ms", us / 1000.0)
    } else if us >= 1000.0 {
        format!("{:.2} ms", us / 1000.0)
    } else {
        format!("{us:.0} µs")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_round_trip_and_merge() {
        let mut a = Latency::new();
        let mut b = Latency::new();
        for ns in [1_000u64, 2_000, 3_000, 1_000_000] {
            a.record_ns(ns);
        }
        b.record_ns(5_000);
        b.record_ns(0);
        let (name, parsed) = Latency::parse_line(&a.line("deliver")).expect("parses");
        assert_eq!(name, "deliver");
        assert_eq!(parsed.summary(), a.summary());
        let mut all = parsed;
        all.merge(&b);
        let s = all.summary();
        assert_eq!(s.count, 6);
        assert!((s.max - 1000.0).abs() / 1000.0 < 0.001, "max {}", s.max);
        assert!((s.p50 - 2.0).abs() < 0.01, "p50 {}", s.p50);
        assert!(Latency::parse_line("hist x 1").is_none());
        assert!(Latency::parse_line("done 1 2").is_none());
        assert_eq!(Latency::new().summary(), Summary::default());
    }

    #[test]
    fn human_units() {
        assert_eq!(duration_us(850.2), "850 µs");
        assert_eq!(duration_us(1234.0), "1.23 ms");
        assert_eq!(duration_us(12_400.0), "12.4 ms");
    }
}
