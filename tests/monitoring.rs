//! The monitoring that ships with ringpush, each piece against the real thing:
//! `ops/prometheus/ringpush.rules.yml` through `promtool check rules` and `promtool test
//! rules` (`ops/prometheus/ringpush.rules.test.yml`: every alert fired and not fired from
//! synthetic series), and the metric names of those rules and of the Grafana dashboard
//! `ops/grafana/ringpush.json` against what a live node's `/metrics` exports (a cluster
//! node on a real `redis-server`, so the store and cluster families are there too).
//!
//! promtool comes from Debian's `prometheus` package: `scripts/test` extracts it to
//! `target/tools/promtool` when it is not on the PATH (`PROMTOOL=path` picks another). A
//! test fails, not skips, without it.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::redis::{free_port, Redis};
use common::*;

/// The webhook families: exported only by a node with `[webhook]`, which the live server
/// below has.
const WEBHOOK_FAMILIES: [&str; 6] = [
    "ringpush_webhook_events_total",
    "ringpush_webhook_delivered_total",
    "ringpush_webhook_retried_total",
    "ringpush_webhook_dropped_total",
    "ringpush_webhook_queue_depth",
    "ringpush_webhook_request_seconds",
];

/// A `[webhook]` section for the live server.
const WEBHOOK_TOML: &str = "[webhook]\nurl = \"http://127.0.0.1:9/x\"\nsecret = \"whsecret123\"\n";

const RULES: &str = "ops/prometheus/ringpush.rules.yml";
const RULES_TEST: &str = "ops/prometheus/ringpush.rules.test.yml";
const DASHBOARD: &str = "ops/grafana/ringpush.json";

fn repo_path(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

fn repo_file(relative: &str) -> String {
    std::fs::read_to_string(repo_path(relative)).unwrap_or_else(|e| panic!("{relative}: {e}"))
}

/// Every `ringpush_*` metric name in `text` (recording rules, `ringpush:...`, are not
/// metric names of the server and are not matched).
fn metric_names(text: &str) -> BTreeSet<String> {
    let bytes = text.as_bytes();
    let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_' || b == b':';
    let mut names = BTreeSet::new();
    // ringpush's own families, and the process collector's that it exports too.
    for prefix in ["ringpush_", "process_"] {
        let mut i = 0;
        while let Some(found) = text[i..].find(prefix) {
            let start = i + found;
            let mut end = start + prefix.len();
            while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
                end += 1;
            }
            let standalone =
                (start == 0 || !word(bytes[start - 1])) && (end == bytes.len() || bytes[end] != b':');
            if standalone && end > start + prefix.len() {
                names.insert(text[start..end].to_owned());
            }
            i = end;
        }
    }
    names
}

/// The series names a scrape can hold: each `# TYPE` family, a histogram's as its
/// `_bucket`, `_sum` and `_count`.
fn exported_names(metrics: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in metrics.lines() {
        let mut words = line.split_whitespace();
        if let (Some("#"), Some("TYPE"), Some(name), Some(kind)) =
            (words.next(), words.next(), words.next(), words.next())
        {
            if kind == "histogram" {
                for suffix in ["_bucket", "_sum", "_count"] {
                    names.insert(format!("{name}{suffix}"));
                }
            } else {
                names.insert(name.to_owned());
            }
        }
    }
    names
}

#[test]
fn the_dashboard_and_the_rules_name_only_metrics_a_live_node_exports() {
    let redis = Redis::start();
    let publish = free_port();
    let node = format!(
        "node_id = \"mon\"\n{}[redis]\nurl = \"{}\"\n[cluster]\npub_listen = \"tcp://127.0.0.1:{publish}\"\n\
         advertise = \"tcp://127.0.0.1:{publish}\"\n",
        WEBHOOK_TOML,
        redis.url(),
    );
    let server = Server::start(&node);
    let exported = exported_names(&server.metrics());
    // The scrape holds the families of each layer the dashboard shows.
    for family in [
        "ringpush_connections",
        "ringpush_fanout_seconds_bucket",
        "ringpush_store_up",
        "ringpush_cluster_peers",
        "ringpush_cluster_gap_repairs_total",
        "ringpush_heap_in_use_bytes",
    ] {
        assert!(exported.contains(family), "{family} missing from /metrics: {exported:?}");
    }
    for family in WEBHOOK_FAMILIES {
        let seen = exported.contains(family) || exported.contains(&format!("{family}_bucket"));
        assert!(seen, "{family} missing from /metrics of a node with [webhook]");
    }

    for file in [DASHBOARD, RULES, RULES_TEST] {
        let named = metric_names(&repo_file(file));
        assert!(named.len() > 10, "{file}: only {named:?}");
        let unknown: Vec<&String> = named.iter().filter(|n| !exported.contains(*n)).collect();
        assert!(unknown.is_empty(), "{file} names metrics /metrics does not export: {unknown:?}");
    }
}

#[test]
fn the_dashboard_is_a_grafana_dashboard_of_prometheus_queries() {
    let dashboard: serde_json::Value = serde_json::from_str(&repo_file(DASHBOARD)).expect("dashboard JSON");
    assert_eq!(dashboard["uid"], "ringpush");
    let vars: Vec<&str> = dashboard["templating"]["list"]
        .as_array()
        .expect("templating")
        .iter()
        .map(|v| v["name"].as_str().expect("variable name"))
        .collect();
    assert_eq!(vars, ["datasource", "job", "instance"]);
    let panels = dashboard["panels"].as_array().expect("panels");
    let mut ids = BTreeSet::new();
    let mut queries = 0;
    for panel in panels {
        let id = panel["id"].as_u64().expect("panel id");
        assert!(ids.insert(id), "panel id {id} twice");
        let grid = &panel["gridPos"];
        let (x, w) = (grid["x"].as_u64().expect("x"), grid["w"].as_u64().expect("w"));
        assert!(x + w <= 24, "panel {id} is wider than the grid");
        if panel["type"] == "row" {
            continue;
        }
        let title = panel["title"].as_str().unwrap_or_default();
        assert!(!title.is_empty(), "panel {id} has no title");
        assert_eq!(panel["datasource"]["uid"], "${datasource}", "{title}");
        let targets = panel["targets"].as_array().unwrap_or_else(|| panic!("{title}: no targets"));
        assert!(!targets.is_empty(), "{title}: no targets");
        for target in targets {
            let expr = target["expr"].as_str().unwrap_or_default();
            assert!(!metric_names(expr).is_empty() || expr.starts_with("up{"), "{title}: query {expr:?}");
            assert!(
                expr.contains("instance=~\"$instance\""),
                "{title}: {expr:?} ignores the instance variable"
            );
            queries += 1;
        }
    }
    assert!(queries >= 30, "{queries} queries");
}

/// `PROMTOOL`, else `target/tools/promtool` (put there by `scripts/test`), else the PATH.
fn promtool() -> PathBuf {
    if let Some(path) = std::env::var_os("PROMTOOL") {
        return PathBuf::from(path);
    }
    let local = repo_path("target/tools/promtool");
    if local.exists() {
        return local;
    }
    std::env::var_os("PATH")
        .and_then(|paths| std::env::split_paths(&paths).map(|p| p.join("promtool")).find(|p| p.exists()))
        .expect("promtool not found: run ./scripts/test once (it extracts Debian's to target/tools/), or apt-get install prometheus")
}

fn run_promtool(args: &[&str]) -> String {
    let out = Command::new(promtool())
        .args(args)
        .current_dir(repo_path("ops/prometheus"))
        .output()
        .expect("run promtool");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "promtool {args:?}: {}\n{text}", out.status);
    text
}

#[test]
fn promtool_checks_the_rules_and_their_unit_tests_pass() {
    let checked = run_promtool(&["check", "rules", "ringpush.rules.yml"]);
    assert!(checked.contains("SUCCESS"), "{checked}");
    let tested = run_promtool(&["test", "rules", "ringpush.rules.test.yml"]);
    assert!(tested.contains("SUCCESS"), "{tested}");
}

/// The `- alert: Name` lines of the rules file.
fn alerts() -> Vec<String> {
    repo_file(RULES)
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert:").map(|n| n.trim().to_owned()))
        .collect()
}

#[test]
fn every_alert_is_tested_firing_and_not_firing_and_has_a_runbook_row() {
    let alerts = alerts();
    assert!(alerts.len() >= 12, "{alerts:?}");
    // In the test file, each `alertname:` line is followed by its `exp_alerts:` line.
    let tests = repo_file(RULES_TEST);
    let lines: Vec<&str> = tests.lines().map(str::trim).collect();
    let (mut fires, mut quiet) = (BTreeSet::new(), BTreeSet::new());
    for pair in lines.windows(2) {
        if let Some(name) = pair[0].strip_prefix("alertname:") {
            match pair[1] {
                "exp_alerts: []" => quiet.insert(name.trim()),
                "exp_alerts:" => fires.insert(name.trim()),
                other => panic!("{RULES_TEST}: alertname {name} followed by {other:?}"),
            };
        }
    }
    let readme = repo_file("README.md");
    let runbook = &readme[readme.find("\n## Alerts").expect("README.md has an Alerts section")..];
    let rules = repo_file(RULES);
    for alert in &alerts {
        assert!(fires.contains(alert.as_str()), "{alert} is never tested firing");
        assert!(quiet.contains(alert.as_str()), "{alert} is never tested not firing");
        assert!(
            runbook.lines().any(|l| l.starts_with(&format!("| `{alert}`"))),
            "README.md's Alerts table has no row for {alert}"
        );
        let block = &rules[rules.find(&format!("- alert: {alert}\n")).expect("alert block")..];
        let block = &block[..block[1..].find("- alert:").map_or(block.len(), |e| e + 1)];
        for key in ["severity:", "summary:", "description:", "runbook_url:"] {
            assert!(block.contains(key), "{alert} has no {key}");
        }
    }
    // And no test names an alert the rules do not have.
    for name in fires.iter().chain(&quiet) {
        assert!(alerts.iter().any(|a| a == name), "{RULES_TEST} tests {name}, which is not an alert");
    }
}

#[test]
fn metric_names_finds_names_and_skips_recording_rules() {
    let names = metric_names(
        "sum(rate(ringpush_frames_in_total[5m])) / ringpush:connections:sum + x_ringpush_no ringpush_a_bucket{le=\"1\"} / process_max_fds",
    );
    assert_eq!(
        names,
        BTreeSet::from([
            "ringpush_frames_in_total".to_owned(),
            "ringpush_a_bucket".to_owned(),
            "process_max_fds".to_owned()
        ])
    );
    let exported =
        exported_names("# TYPE ringpush_x_seconds histogram\n# TYPE ringpush_y gauge\nringpush_y 1\n");
    assert!(exported.contains("ringpush_x_seconds_bucket") && exported.contains("ringpush_y"));
    assert!(!exported.contains("ringpush_x_seconds"));
}
