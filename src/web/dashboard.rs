//! The dashboard on the admin listener: the page (`GET /`) and its live feed (`GET
//! /events`, server-sent events: one JSON snapshot per interval).
//!
//! A snapshot is built from the `/metrics` text, exactly what a Prometheus scrape sees, so
//! the dashboard never shows a figure the metrics do not have, and metric families added
//! later (the cluster's `ringpush_cluster_*`, the store's `ringpush_store_up`) appear on it
//! without changes here. Rates are the difference between two scrapes of the same stream
//! over the time between them; latency percentiles are interpolated from the histogram's
//! buckets over a sliding window, the way Prometheus' `histogram_quantile` does.
//!
//! Each stream is one task on the control thread. It writes a snapshot, then waits for
//! the next tick or for the client to go away (a read that ends), whichever comes first:
//! a closed tab ends its stream at once, and a stream never holds anything another
//! request waits on.

use std::cell::Cell;
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::time::{Duration, Instant};

use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::TcpStream;
use serde_json::{json, Map, Value};

use super::query_param;
use crate::clock::unix_ms;
use crate::node::Node;

/// The page: HTML, CSS and JS in one file, no external assets (its own
/// `Content-Security-Policy` meta tag allows nothing but itself and `/events`).
pub const DASHBOARD_HTML: &str = include_str!("dashboard.html");

/// Time between snapshots unless `?interval_ms=` says otherwise, and its bounds.
const DEFAULT_INTERVAL: Duration = Duration::from_secs(1);
const MIN_INTERVAL_MS: u64 = 100;
const MAX_INTERVAL_MS: u64 = 60_000;

/// The latency percentiles cover the last this-many snapshots.
const WINDOW_SNAPSHOTS: usize = 10;

/// Event streams served at once; more get `503` (each renders the metrics once per
/// interval on the control thread, which also serves the API).
pub const MAX_STREAMS: usize = 32;

/// A snapshot not written within this long ends the stream (a client that stopped
/// reading would otherwise hold its task and connection forever).
const WRITE_LIMIT: Duration = Duration::from_secs(10);

/// The histogram behind the fan-out percentiles.
const FANOUT: &str = "ringpush_fanout_seconds";

thread_local! {
    /// Event streams open on this (the control) thread.
    static STREAMS: Cell<usize> = const { Cell::new(0) };
}

/// Counts a stream while it lives, whichever way its task ends (returns or is dropped).
struct StreamGuard;

impl StreamGuard {
    fn new() -> StreamGuard {
        STREAMS.with(|s| s.set(s.get() + 1));
        StreamGuard
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        STREAMS.with(|s| s.set(s.get().saturating_sub(1)));
    }
}

/// The time between snapshots that the query of `GET /events` asks for: `interval_ms`,
/// held to 100 ms-60 s; absent or not a number, one second. Pure (the fuzz target runs it).
pub fn events_interval(query: &str) -> Duration {
    query_param(query, "interval_ms")
        .and_then(|v| v.parse::<u64>().ok())
        .map(|ms| Duration::from_millis(ms.clamp(MIN_INTERVAL_MS, MAX_INTERVAL_MS)))
        .unwrap_or(DEFAULT_INTERVAL)
}

/// Serves `GET /events[?interval_ms=N]` until the client goes away: the response head,
/// then one `data: <snapshot JSON>` event per interval. `scrape` renders the `/metrics`
/// text.
pub async fn serve_events<F, Fut>(stream: &mut TcpStream, query: &str, node: &Node, scrape: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = String>,
{
    if STREAMS.with(|s| s.get()) >= MAX_STREAMS {
        let _ = stream.write_all(&crate::http::busy("too many event streams", 10)).await;
        return;
    }
    let _counted = StreamGuard::new();
    let interval = events_interval(query);
    const HEAD: &str = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-store\r\n\
        X-Accel-Buffering: no\r\nConnection: close\r\n\r\nretry: 2000\n\n";
    if stream.write_all(HEAD.as_bytes()).await.is_err() {
        return;
    }
    let mut sampler = Sampler::default();
    let mut scratch = [0u8; 256];
    loop {
        let text = scrape().await;
        let info = NodeInfo {
            node: &node.config.node_id,
            shards: node.shard_count,
            started_unix_ms: node.epoch,
            now_unix_ms: unix_ms(),
            ready: node.is_ready(),
            draining: node.draining.load(std::sync::atomic::Ordering::Relaxed),
            streams: STREAMS.with(|s| s.get()),
            interval_ms: interval.as_millis() as u64,
        };
        let snapshot = sampler.snapshot(&text, &info, Instant::now());
        let event = format!("data: {snapshot}\n\n");
        let written = glommio::timer::timeout(WRITE_LIMIT, async {
            Ok(stream.write_all(event.as_bytes()).await.is_ok())
        })
        .await;
        if !matches!(written, Ok(true)) {
            return;
        }
        // The client never sends anything on an event stream: a read that ends means it
        // is gone. Bytes it does send (a pipelined request) are ignored.
        let gone = futures_lite::future::or(
            async {
                loop {
                    match stream.read(&mut scratch).await {
                        Ok(0) | Err(_) => return true,
                        Ok(_) => {}
                    }
                }
            },
            async {
                glommio::timer::sleep(interval).await;
                false
            },
        )
        .await;
        if gone {
            return;
        }
    }
}

/// The node facts a snapshot carries besides the metrics.
pub struct NodeInfo<'a> {
    pub node: &'a str,
    pub shards: usize,
    pub started_unix_ms: u64,
    pub now_unix_ms: u64,
    pub ready: bool,
    pub draining: bool,
    pub streams: usize,
    pub interval_ms: u64,
}

/// One line of the Prometheus text format.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

impl Sample {
    fn label(&self, name: &str) -> Option<&str> {
        self.labels.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    /// The series identity: name and labels.
    fn key(&self) -> String {
        let mut key = self.name.clone();
        for (k, v) in &self.labels {
            key.push_str(&format!("|{k}={v}"));
        }
        key
    }

    fn labels_json(&self) -> Value {
        Value::Object(self.labels.iter().map(|(k, v)| (k.clone(), Value::from(v.as_str()))).collect())
    }
}

/// Parses the Prometheus text format (version 0.0.4); comments and lines that do not parse
/// are skipped.
pub fn parse_metrics(text: &str) -> Vec<Sample> {
    text.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()).filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<Sample> {
    let line = line.trim();
    let (series, rest) = match line.find('{') {
        Some(open) => {
            let close = open + line[open..].find('}')?;
            (&line[..=close], &line[close + 1..])
        }
        None => line.split_at(line.find(char::is_whitespace)?),
    };
    let value = parse_value(rest.split_whitespace().next()?)?;
    let (name, labels) = match series.split_once('{') {
        Some((name, labels)) => (name, parse_labels(labels.strip_suffix('}')?)?),
        None => (series, Vec::new()),
    };
    Some(Sample { name: name.to_string(), labels, value })
}

fn parse_value(v: &str) -> Option<f64> {
    match v {
        "+Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        _ => v.parse().ok(),
    }
}

/// `a="1",b="x\"y"` into pairs.
fn parse_labels(text: &str) -> Option<Vec<(String, String)>> {
    let mut labels = Vec::new();
    let mut rest = text.trim_start_matches([',', ' ']);
    while !rest.is_empty() {
        let (name, after) = rest.split_once('=')?;
        let mut chars = after.strip_prefix('"')?.char_indices();
        let mut value = String::new();
        let end = loop {
            let (i, c) = chars.next()?;
            match c {
                '"' => break i,
                '\\' => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                c => value.push(c),
            }
        };
        labels.push((name.trim().to_string(), value));
        rest = after[end + 2..].trim_start_matches([',', ' ']);
    }
    Some(labels)
}

/// Keeps what one stream needs between snapshots: the previous scrape (for rates) and the
/// fan-out histogram of the last [`WINDOW_SNAPSHOTS`] scrapes (for windowed percentiles).
#[derive(Default)]
pub struct Sampler {
    previous: Option<(Instant, HashMap<String, f64>)>,
    fanout_history: VecDeque<Vec<(f64, f64)>>,
}

impl Sampler {
    /// The snapshot of one scrape, with rates against the previous one.
    pub fn snapshot(&mut self, text: &str, info: &NodeInfo<'_>, now: Instant) -> Value {
        let samples = parse_metrics(text);
        let values: HashMap<String, f64> = samples.iter().map(|s| (s.key(), s.value)).collect();
        let elapsed = self.previous.as_ref().map(|(at, _)| now.duration_since(*at).as_secs_f64());
        let previous = self.previous.as_ref().map(|(_, v)| v);
        let f = Figures { samples: &samples, previous, elapsed };

        let buckets = histogram(&samples, FANOUT);
        self.fanout_history.push_back(buckets.clone());
        if self.fanout_history.len() > WINDOW_SNAPSHOTS + 1 {
            self.fanout_history.pop_front();
        }
        let oldest = self.fanout_history.front().cloned().unwrap_or_default();
        let window: Vec<(f64, f64)> = buckets
            .iter()
            .map(|(le, count)| {
                let before = oldest.iter().find(|(l, _)| l == le).map_or(0.0, |(_, c)| *c);
                (*le, (count - before).max(0.0))
            })
            .collect();
        let window_s = elapsed.unwrap_or(0.0) * (self.fanout_history.len() - 1) as f64;

        let per_shard: Vec<Value> = {
            let mut shards: Vec<(usize, f64)> = samples
                .iter()
                .filter(|s| s.name == "ringpush_connections")
                .filter_map(|s| Some((s.label("shard")?.parse().ok()?, s.value)))
                .collect();
            shards.sort_by_key(|(shard, _)| *shard);
            shards.into_iter().map(|(_, v)| num(v)).collect()
        };

        let snapshot = json!({
            "ts": info.now_unix_ms,
            "node": info.node,
            "shards": info.shards,
            "uptime_s": info.now_unix_ms.saturating_sub(info.started_unix_ms) / 1000,
            "ready": info.ready,
            "draining": info.draining,
            "interval_ms": info.interval_ms,
            "streams": info.streams,
            "connections": { "total": f.total("ringpush_connections"), "per_shard": per_shard },
            "handshakes": {
                "ok_total": f.total("ringpush_handshakes_ok_total"),
                "ok_per_s": f.rate("ringpush_handshakes_ok_total"),
                "refused_total": f.total("ringpush_handshakes_refused_total"),
                "refused_per_s": f.rate("ringpush_handshakes_refused_total"),
                "refused": f.by_label("ringpush_handshakes_refused_total", "reason"),
            },
            "messages": {
                "in_per_s": f.rate("ringpush_messages_accepted_total"),
                "in_total": f.total("ringpush_messages_accepted_total"),
                "delivered_per_s": f.rate("ringpush_messages_delivered_total"),
                "delivered_total": f.total("ringpush_messages_delivered_total"),
                "replayed_per_s": f.rate("ringpush_messages_replayed_total"),
                "deduplicated_total": f.total("ringpush_messages_deduplicated_total"),
                "pushes_per_s": f.rate("ringpush_pushes_delivered_total"),
                "syncs_per_s": f.rate("ringpush_sync_replays_total"),
            },
            "frames": {
                "in_per_s": f.rate("ringpush_frames_in_total"),
                "out_per_s": f.rate("ringpush_frames_out_total"),
            },
            "bytes": {
                "in_per_s": f.rate("ringpush_bytes_in_total"),
                "out_per_s": f.rate("ringpush_bytes_out_total"),
            },
            "fanout": {
                "window": percentiles(&window, window_s),
                "lifetime": percentiles(&buckets, info.now_unix_ms.saturating_sub(info.started_unix_ms) as f64 / 1000.0),
            },
            "slow_consumers": {
                "gaps_total": f.total("ringpush_slow_consumer_gaps_total"),
                "gaps_per_s": f.rate("ringpush_slow_consumer_gaps_total"),
                "closes_total": f.total("ringpush_slow_consumer_closes_total"),
            },
            "idle_drops_total": f.total("ringpush_idle_drops_total"),
            "closes": f.by_label("ringpush_closes_sent_total", "code"),
            "requests_refused": f.by_label("ringpush_requests_refused_total", "code"),
            "cluster": cluster(&f),
            "webhooks": webhooks(&f),
            "store": store(&f),
        });
        self.previous = Some((now, values));
        snapshot
    }
}

/// One scrape and, from the second on, the previous one of the same stream.
struct Figures<'a> {
    samples: &'a [Sample],
    previous: Option<&'a HashMap<String, f64>>,
    elapsed: Option<f64>,
}

impl Figures<'_> {
    fn family(&self, name: &str) -> impl Iterator<Item = &Sample> {
        let name = name.to_string();
        self.samples.iter().filter(move |s| s.name == name)
    }

    /// The family's samples summed (every shard, every label); `null` when absent.
    fn total(&self, name: &str) -> Value {
        let mut found = false;
        let sum: f64 = self.family(name).inspect(|_| found = true).map(|s| s.value).sum();
        if found {
            num(sum)
        } else {
            Value::Null
        }
    }

    /// Per second since the previous scrape, summed over the family; `null` on the first
    /// scrape or when absent.
    fn rate(&self, name: &str) -> Value {
        let mut sum = 0.0;
        let mut found = false;
        for s in self.family(name) {
            found = true;
            sum += self.series_rate(s).unwrap_or(0.0);
        }
        match (found, self.elapsed) {
            (true, Some(_)) => num(round(sum, 2)),
            _ => Value::Null,
        }
    }

    fn series_rate(&self, s: &Sample) -> Option<f64> {
        let (previous, elapsed) = (self.previous?, self.elapsed?);
        if elapsed <= 0.0 {
            return None;
        }
        let before = previous.get(&s.key()).copied().unwrap_or(0.0);
        // A counter that went down was reset (a restart): count from zero.
        let delta = if s.value >= before { s.value - before } else { s.value };
        Some(delta / elapsed)
    }

    /// `{label value: total}` over a family.
    fn by_label(&self, name: &str, label: &str) -> Value {
        let mut out = Map::new();
        for s in self.family(name) {
            let key = s.label(label).unwrap_or("").to_string();
            let sum = out.get(&key).and_then(Value::as_f64).unwrap_or(0.0) + s.value;
            out.insert(key, num(sum));
        }
        Value::Object(out)
    }

    /// Every sample of families starting with `prefix`, with a rate for counters.
    fn series(&self, prefix: &str) -> Vec<Value> {
        self.samples
            .iter()
            .filter(|s| s.name.starts_with(prefix))
            .map(|s| {
                let per_s = if s.name.ends_with("_total") {
                    self.series_rate(s).map(|r| num(round(r, 2))).unwrap_or(Value::Null)
                } else {
                    Value::Null
                };
                json!({ "name": s.name, "labels": s.labels_json(), "value": num(s.value), "per_s": per_s })
            })
            .collect()
    }
}

/// The cluster part: `{"enabled": false}` on a single node (no `ringpush_cluster_*`
/// family), else the peers gauge's samples and every cluster series.
fn cluster(f: &Figures<'_>) -> Value {
    let series = f.series("ringpush_cluster_");
    if series.is_empty() {
        return json!({ "enabled": false });
    }
    let peers: Vec<Value> = f
        .family("ringpush_cluster_peers")
        .map(|s| json!({ "labels": s.labels_json(), "value": num(s.value) }))
        .collect();
    json!({ "enabled": true, "peers": peers, "series": series })
}

/// The webhook part: `{"enabled": false}` without `[webhook]` (no `ringpush_webhook_*`
/// family), else every webhook series (histogram buckets left out) and the request
/// latency's percentiles over the node's life.
fn webhooks(f: &Figures<'_>) -> Value {
    let series: Vec<Value> = f
        .series("ringpush_webhook_")
        .into_iter()
        .filter(|x| x["name"].as_str().is_some_and(|n| !n.starts_with("ringpush_webhook_request_seconds")))
        .collect();
    if series.is_empty() {
        return json!({ "enabled": false });
    }
    let buckets = histogram(f.samples, "ringpush_webhook_request_seconds");
    json!({ "enabled": true, "series": series, "latency": percentiles(&buckets, 0.0) })
}

/// The store part: `{"reported": false, "backend": "memory"}` without `ringpush_store_up`
/// (the embedded store, which cannot be down), else whether it is up and every store series.
fn store(f: &Figures<'_>) -> Value {
    let up: Vec<&Sample> = f.family("ringpush_store_up").collect();
    if up.is_empty() {
        return json!({ "reported": false, "backend": "memory", "up": true });
    }
    let labels = up[0].labels_json();
    let backend = up[0].label("backend").unwrap_or("store").to_string();
    json!({
        "reported": true,
        "backend": backend,
        "up": up.iter().all(|s| s.value >= 1.0),
        "labels": labels,
        "series": f.series("ringpush_store_"),
    })
}

/// The `(le, cumulative count)` buckets of a histogram family, in order.
fn histogram(samples: &[Sample], family: &str) -> Vec<(f64, f64)> {
    let bucket = format!("{family}_bucket");
    let mut buckets: Vec<(f64, f64)> = samples
        .iter()
        .filter(|s| s.name == bucket)
        .filter_map(|s| Some((parse_value(s.label("le")?)?, s.value)))
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    buckets
}

/// p50, p90, p99 (microseconds) of cumulative buckets, interpolated within the bucket as
/// Prometheus does; a rank in the `+Inf` bucket reports the highest finite bound.
fn percentiles(buckets: &[(f64, f64)], over_s: f64) -> Value {
    let count = buckets.last().map_or(0.0, |(_, c)| *c);
    let q = |q: f64| -> Value {
        if count <= 0.0 {
            return Value::Null;
        }
        let rank = q * count;
        let mut lower = 0.0;
        let mut below = 0.0;
        for &(le, cumulative) in buckets {
            if cumulative >= rank {
                if le.is_infinite() {
                    return num(round(lower * 1e6, 1));
                }
                let in_bucket = cumulative - below;
                let frac = if in_bucket > 0.0 { (rank - below) / in_bucket } else { 1.0 };
                return num(round((lower + (le - lower) * frac) * 1e6, 1));
            }
            lower = le;
            below = cumulative;
        }
        num(round(lower * 1e6, 1))
    };
    json!({ "count": num(count), "over_s": round(over_s, 1), "p50_us": q(0.5), "p90_us": q(0.9), "p99_us": q(0.99) })
}

fn round(v: f64, decimals: i32) -> f64 {
    let f = 10f64.powi(decimals);
    (v * f).round() / f
}

/// A figure as JSON: whole numbers as integers (counts read better as `3` than `3.0`).
fn num(v: f64) -> Value {
    if v.fract() == 0.0 && v.abs() < 9.0e15 {
        json!(v as i64)
    } else {
        json!(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "# HELP ringpush_connections Open WebSocket connections.\n\
        # TYPE ringpush_connections gauge\n\
        ringpush_connections{shard=\"1\"} 2\n\
        ringpush_connections{shard=\"0\"} 1\n\
        ringpush_handshakes_ok_total{shard=\"0\"} 10\n\
        ringpush_handshakes_ok_total{shard=\"1\"} 20\n\
        ringpush_handshakes_refused_total{reason=\"unauthorized\"} 3\n\
        ringpush_messages_delivered_total 100\n\
        ringpush_fanout_seconds_bucket{le=\"0.00001\"} 50\n\
        ringpush_fanout_seconds_bucket{le=\"0.0001\"} 90\n\
        ringpush_fanout_seconds_bucket{le=\"0.001\"} 100\n\
        ringpush_fanout_seconds_bucket{le=\"+Inf\"} 100\n\
        ringpush_fanout_seconds_sum 0.01\n\
        ringpush_fanout_seconds_count 100\n";

    fn info() -> NodeInfo<'static> {
        NodeInfo {
            node: "n1",
            shards: 2,
            started_unix_ms: 1000,
            now_unix_ms: 11_000,
            ready: true,
            draining: false,
            streams: 1,
            interval_ms: 1000,
        }
    }

    #[test]
    fn the_page_loads_nothing_from_elsewhere() {
        assert!(!DASHBOARD_HTML.contains("http://") && !DASHBOARD_HTML.contains("https://"));
        assert!(DASHBOARD_HTML.contains("Content-Security-Policy"));
        assert!(DASHBOARD_HTML.contains("new EventSource('/events')"));
    }

    #[test]
    fn parses_the_text_format() {
        let samples = parse_metrics(
            "# TYPE x counter\nx 1\ny{a=\"1\",b=\"q\\\"uote\"} 2.5\nz{le=\"+Inf\"} 3\nbad line here\n",
        );
        assert_eq!(samples.len(), 3, "{samples:?}");
        assert_eq!(samples[0], Sample { name: "x".into(), labels: vec![], value: 1.0 });
        assert_eq!(samples[1].labels, vec![("a".into(), "1".into()), ("b".into(), "q\"uote".into())]);
        assert_eq!(samples[1].value, 2.5);
        assert_eq!(samples[2].label("le"), Some("+Inf"));
    }

    #[test]
    fn snapshots_sum_shards_and_rate_against_the_previous_scrape() {
        let mut sampler = Sampler::default();
        let t0 = Instant::now();
        let first = sampler.snapshot(TEXT, &info(), t0);
        assert_eq!(first["connections"]["total"], json!(3));
        assert_eq!(first["connections"]["per_shard"], json!([1, 2]));
        assert_eq!(first["handshakes"]["ok_total"], json!(30));
        assert_eq!(first["handshakes"]["ok_per_s"], Value::Null, "no rate on the first scrape");
        assert_eq!(first["handshakes"]["refused"], json!({ "unauthorized": 3 }));
        assert_eq!(first["cluster"], json!({ "enabled": false }));
        assert_eq!(first["store"]["backend"], "memory");
        assert_eq!(first["uptime_s"], 10);

        let later = TEXT
            .replace(
                "ringpush_handshakes_ok_total{shard=\"1\"} 20",
                "ringpush_handshakes_ok_total{shard=\"1\"} 24",
            )
            .replace("ringpush_messages_delivered_total 100", "ringpush_messages_delivered_total 300");
        let second = sampler.snapshot(&later, &info(), t0 + Duration::from_secs(2));
        assert_eq!(second["handshakes"]["ok_per_s"], json!(2));
        assert_eq!(second["messages"]["delivered_per_s"], json!(100));
    }

    #[test]
    fn percentiles_interpolate_within_buckets() {
        let mut sampler = Sampler::default();
        let snap = sampler.snapshot(TEXT, &info(), Instant::now());
        let life = &snap["fanout"]["lifetime"];
        assert_eq!(life["count"], json!(100));
        assert_eq!(life["p50_us"], json!(10));
        // rank 90 is the top of the second bucket; rank 99 is 90% into the third.
        assert_eq!(life["p90_us"], json!(100));
        assert_eq!(life["p99_us"], json!(910));
        let empty = percentiles(&[(0.001, 0.0), (f64::INFINITY, 0.0)], 1.0);
        assert_eq!(empty["p50_us"], Value::Null);
        let beyond = percentiles(&[(0.001, 0.0), (f64::INFINITY, 5.0)], 1.0);
        assert_eq!(beyond["p99_us"], json!(1000), "the +Inf bucket reports the highest bound");
    }

    #[test]
    fn the_events_interval_is_held_to_its_bounds() {
        assert_eq!(events_interval(""), DEFAULT_INTERVAL);
        assert_eq!(events_interval("interval_ms=250"), Duration::from_millis(250));
        assert_eq!(events_interval("x=1&interval_ms=5"), Duration::from_millis(MIN_INTERVAL_MS));
        assert_eq!(events_interval("interval_ms=99999999999999999999"), DEFAULT_INTERVAL);
        assert_eq!(events_interval("interval_ms=%36%30%30%30%30%30"), Duration::from_millis(MAX_INTERVAL_MS));
        assert_eq!(events_interval("interval_ms=-1"), DEFAULT_INTERVAL);
    }

    #[test]
    fn the_window_covers_only_recent_scrapes() {
        let mut sampler = Sampler::default();
        let t0 = Instant::now();
        sampler.snapshot(TEXT, &info(), t0);
        let snap = sampler.snapshot(TEXT, &info(), t0 + Duration::from_secs(1));
        assert_eq!(snap["fanout"]["window"]["count"], json!(0), "nothing new in the window");
        assert_eq!(snap["fanout"]["window"]["p50_us"], Value::Null);
    }

    #[test]
    fn cluster_and_store_families_are_shown_when_present() {
        let text = format!(
            "{TEXT}ringpush_cluster_peers{{peer=\"tcp://10.0.0.2:7001\",state=\"up\"}} 1\n\
             ringpush_cluster_messages_published_total 7\n\
             ringpush_store_up{{backend=\"redis\"}} 0\n"
        );
        let snap = Sampler::default().snapshot(&text, &info(), Instant::now());
        assert_eq!(snap["cluster"]["enabled"], true);
        assert_eq!(snap["cluster"]["peers"][0]["labels"]["state"], "up");
        assert_eq!(snap["cluster"]["series"].as_array().map(Vec::len), Some(2));
        assert_eq!(snap["store"]["up"], false);
        assert_eq!(snap["store"]["backend"], "redis");
    }
}
