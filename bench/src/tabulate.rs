//! Side-by-side tables from the runs `bench/compare.sh` collects: one JSON object a line,
//!
//! ```text
//! {"meta":{"date":..,"commit":..,"cpu":..,"versions":{..},..}}
//! {"group":"echo","case":"64 B x 100 conns, pipeline 16","server":"ringpush","rep":1,"result":{..}}
//! {"group":"echo","case":"..","server":"node-ws","rep":2,"error":"exit 1"}
//! ```
//!
//! `result` is the scenario's own `--json` line. For each group, a table per figure:
//! a row per case, a column per server (in the order they first appear), each cell the
//! median over the repetitions, their min-max, and the ratio of the median to ringpush's.
//! Then the issue's goals, each checked against the medians. With `--readme FILE` the
//! block between `<!-- bench:summary:begin -->` and `<!-- bench:summary:end -->` of FILE
//! is replaced with the goals and the headline echo table.

use std::fmt::Write as _;
use std::fs;
use std::path::PathBuf;

use serde_json::Value;

use crate::error::Error;

/// The server every ratio is taken against.
const BASELINE: &str = "ringpush";

const README_BEGIN: &str = "<!-- bench:summary:begin -->";
const README_END: &str = "<!-- bench:summary:end -->";

#[derive(Debug, Clone, clap::Args)]
pub struct TabulateArgs {
    /// The runs: one JSON object a line (see the module docs).
    #[arg(long, value_name = "FILE")]
    pub runs: PathBuf,
    /// Write the tables here instead of stdout.
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
    /// Replace the summary block of this file (the README) with the goals and headline table.
    #[arg(long, value_name = "FILE")]
    pub readme: Option<PathBuf>,
    /// Where the full tables live, for the README's link.
    #[arg(long, default_value = "bench/RESULTS.md")]
    pub results_link: String,
}

pub fn run(args: TabulateArgs) -> Result<(), Error> {
    let text =
        fs::read_to_string(&args.runs).map_err(|e| Error::io(format!("read {}", args.runs.display()), e))?;
    let runs = Runs::parse(&text)?;
    let tables = runs.tables();
    match &args.out {
        Some(path) => {
            fs::write(path, &tables).map_err(|e| Error::io(format!("write {}", path.display()), e))?
        }
        None => print!("{tables}"),
    }
    if let Some(path) = &args.readme {
        let readme =
            fs::read_to_string(path).map_err(|e| Error::io(format!("read {}", path.display()), e))?;
        let summary = runs.summary(&args.results_link);
        let updated = splice(&readme, &summary).ok_or_else(|| {
            Error::Usage(format!("{} has no {README_BEGIN} ... {README_END} block", path.display()))
        })?;
        fs::write(path, updated).map_err(|e| Error::io(format!("write {}", path.display()), e))?;
    }
    Ok(())
}

/// One run: its place in the tables and what it measured (`None`: it failed).
#[derive(Debug, Clone)]
struct Run {
    group: String,
    case: String,
    server: String,
    result: Option<Value>,
}

#[derive(Debug, Default)]
struct Runs {
    meta: Value,
    runs: Vec<Run>,
}

/// How a figure is printed.
#[derive(Debug, Clone, Copy)]
enum Unit {
    /// A rate or count: 957k, 1.54M.
    Count,
    /// Microseconds: 0.65 µs, 18.2 µs, 1.23 ms.
    Micros,
    Bytes,
    Secs,
    Percent,
}

/// A figure of a table: where it is in a result, and how to print it.
struct Figure {
    title: &'static str,
    /// Dotted path into the result (`latency.p99_us`).
    path: &'static str,
    unit: Unit,
    /// What the ratio means, for the table's caption.
    note: &'static str,
}

const ECHO: &[Figure] = &[
    Figure {
        title: "Echo: messages per server CPU-second",
        path: "msgs_per_cpu_sec",
        unit: Unit::Count,
        note: "Round trips over the server's CPU time in the window (1 / CPU per message); higher is \
               better. Ratio: this server's over ringpush's. The figure that does not depend on the \
               load generator.",
    },
    Figure {
        title: "Echo: server CPU per echoed message",
        path: "server_cpu_us_per_msg",
        unit: Unit::Micros,
        note: "Lower is better. Ratio: this server's over ringpush's.",
    },
    Figure {
        title: "Echo: round trips per second",
        path: "round_trips_per_sec",
        unit: Unit::Count,
        note: "Higher is better. Where the server's CPU (next table) is below ~90%, the load \
               generator set the rate, not the server.",
    },
    Figure {
        title: "Echo: server CPU use",
        path: "server_cpu_util",
        unit: Unit::Percent,
        note: "Share of one core over the window.",
    },
    Figure {
        title: "Echo: latency p50, send to echo read",
        path: "latency.p50_us",
        unit: Unit::Micros,
        note: "Closed loop: with a pipeline this is mostly queueing (depth x connections in flight).",
    },
    Figure { title: "Echo: latency p99", path: "latency.p99_us", unit: Unit::Micros, note: "" },
    Figure { title: "Echo: latency p99.9", path: "latency.p999_us", unit: Unit::Micros, note: "" },
];

const IDLE: &[Figure] = &[
    Figure {
        title: "Idle: server memory per connection",
        path: "bytes_per_conn",
        unit: Unit::Bytes,
        note: "RSS with every connection up and two pings answered, minus RSS before, over the \
               connections; lower is better. Ratio: this server's over ringpush's.",
    },
    Figure {
        title: "Idle: connect rate",
        path: "connect_rate",
        unit: Unit::Count,
        note: "Connections a second while the clients open them (256 handshakes in flight per \
               client process).",
    },
];

const UPGRADES: &[Figure] = &[
    Figure {
        title: "Upgrades: new upgrades per second",
        path: "rate.upgrades_per_sec",
        unit: Unit::Count,
        note: "Connect, upgrade, check the 101, reset, over and over (64 in flight). Higher is better; \
               where the server's CPU is not saturated the clients set the rate.",
    },
    Figure {
        title: "Upgrades: upgrades per server CPU-second",
        path: "rate.upgrades_per_cpu_sec",
        unit: Unit::Count,
        note: "Higher is better.",
    },
    Figure {
        title: "Upgrades: handshake latency p99",
        path: "rate.latency.p99_us",
        unit: Unit::Micros,
        note: "Socket created to the 101 checked.",
    },
    Figure {
        title: "Reconnect storm: clients that failed",
        path: "storm.failed",
        unit: Unit::Count,
        note: "Every client reset at once and reconnecting at once; refused, reset, or no 101 within 10 s.",
    },
    Figure {
        title: "Reconnect storm: time until all are back",
        path: "storm.secs",
        unit: Unit::Secs,
        note: "From the resets to the last client upgraded (or failed). A second or more means SYNs \
               were dropped and retransmitted: the listen backlog overflowed.",
    },
    Figure {
        title: "Reconnect storm: p50 time back",
        path: "storm.times.p50_us",
        unit: Unit::Micros,
        note: "",
    },
];

impl Runs {
    fn parse(text: &str) -> Result<Runs, Error> {
        let mut runs = Runs::default();
        for (n, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
            let v: Value = serde_json::from_str(line)
                .map_err(|e| Error::Usage(format!("runs line {}: not JSON: {e}", n + 1)))?;
            if let Some(meta) = v.get("meta") {
                runs.meta = meta.clone();
                continue;
            }
            let field = |name: &str| v.get(name).and_then(Value::as_str).map(str::to_string);
            let (Some(group), Some(case), Some(server)) = (field("group"), field("case"), field("server"))
            else {
                return Err(Error::Usage(format!("runs line {}: needs group, case and server", n + 1)));
            };
            runs.runs.push(Run { group, case, server, result: v.get("result").cloned() });
        }
        Ok(runs)
    }

    /// Servers in the order they first appear (the baseline first).
    fn servers(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for r in &self.runs {
            if !out.contains(&r.server) {
                out.push(r.server.clone());
            }
        }
        out.sort_by_key(|s| s != BASELINE);
        out
    }

    fn cases(&self, group: &str) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for r in self.runs.iter().filter(|r| r.group == group) {
            if !out.contains(&r.case) {
                out.push(r.case.clone());
            }
        }
        out
    }

    /// The values of `path` over the repetitions of (group, case, server), and how many runs failed.
    fn values(&self, group: &str, case: &str, server: &str, path: &str) -> (Vec<f64>, usize) {
        let mut values = Vec::new();
        let mut failed = 0;
        for r in self.runs.iter().filter(|r| r.group == group && r.case == case && r.server == server) {
            match r.result.as_ref().and_then(|v| lookup(v, path)) {
                Some(x) => values.push(x),
                None if r.result.is_none() => failed += 1,
                None => {}
            }
        }
        (values, failed)
    }

    fn median(&self, group: &str, case: &str, server: &str, path: &str) -> Option<f64> {
        median(&self.values(group, case, server, path).0)
    }

    /// The whole side-by-side part of RESULTS.md.
    fn tables(&self) -> String {
        let mut s = String::new();
        s += &self.header();
        s += &self.goals();
        s += &self.im_goals();
        for (group, figures) in [("echo", ECHO), ("idle", IDLE), ("upgrades", UPGRADES)] {
            if self.cases(group).is_empty() {
                continue;
            }
            for figure in figures {
                s += &self.table(group, figure);
            }
        }
        s
    }

    fn header(&self) -> String {
        let m = &self.meta;
        let get = |k: &str| m.get(k).and_then(Value::as_str).unwrap_or("?").to_string();
        let mut s = String::from("## Side by side\n\n");
        let _ = writeln!(
            s,
            "Written by `bench/compare.sh{}` on {}, commit {}: {} repetition(s) of each run, servers taking \
             turns within each repetition.",
            if m.get("quick").and_then(Value::as_bool) == Some(true) { " --quick" } else { "" },
            get("date"),
            get("commit"),
            m.get("reps").and_then(Value::as_u64).unwrap_or(0),
        );
        let _ = writeln!(
            s,
            "Machine: {} CPUs ({}), {} GiB, kernel {}. Every server pinned to CPU 0 on one thread (ringpush \
             with `shards = 1`), the load generator on CPU 1, all on loopback.\n",
            get("cpus"),
            get("cpu"),
            get("mem_gib"),
            get("kernel"),
        );
        if let Some(v) = m.get("versions").and_then(Value::as_object) {
            s += "| server | what runs |\n| --- | --- |\n";
            for (name, what) in v {
                let _ = writeln!(s, "| {name} | {} |", what.as_str().unwrap_or("?"));
            }
            s += "\n";
        }
        s += "Each cell: the median over the repetitions, (min-max) when there are several, and the \
              median's ratio to ringpush's. *failed*: every repetition of that run failed (see the log \
              `bench/compare.sh` keeps).\n\n";
        s
    }

    fn table(&self, group: &str, figure: &Figure) -> String {
        let servers = self.servers();
        let mut s = format!("### {}\n\n", figure.title);
        if !figure.note.is_empty() {
            s += figure.note;
            s += "\n\n";
        }
        s += "| case |";
        for server in &servers {
            let _ = write!(s, " {server} |");
        }
        s += "\n| --- |";
        s += &" ---: |".repeat(servers.len());
        s += "\n";
        for case in self.cases(group) {
            let base = self.median(group, &case, BASELINE, figure.path);
            let _ = write!(s, "| {case} |");
            for server in &servers {
                let (values, failed) = self.values(group, &case, server, figure.path);
                let _ = write!(s, " {} |", cell(&values, failed, base, figure.unit, server == BASELINE));
            }
            s += "\n";
        }
        s += "\n";
        s
    }

    /// The issue's goals against the medians.
    fn goals(&self) -> String {
        let mut rows: Vec<(String, String, Option<bool>)> = Vec::new();
        let echo_cases = self.cases("echo");
        for size in [64, 512] {
            let Some(case) = echo_cases.iter().find(|c| is_case(c, size, 100, 16)) else { continue };
            let us = self.median("echo", case, BASELINE, "server_cpu_us_per_msg");
            rows.push((
                format!("echo {case}: ringpush server CPU per message <= 3 µs"),
                us.map_or("no figure".into(), |v| format_unit(v, Unit::Micros)),
                us.map(|v| v <= 3.0),
            ));
            for (peer, want) in [("tungstenite", 1.3), ("tungstenite-4k", 1.3), ("fastwebsockets", 1.0)] {
                let ours = self.median("echo", case, BASELINE, "msgs_per_cpu_sec");
                let theirs = self.median("echo", case, peer, "msgs_per_cpu_sec");
                if theirs.is_none() && !self.servers().iter().any(|s| s == peer) {
                    continue;
                }
                let ratio = ours.zip(theirs).map(|(a, b)| a / b);
                rows.push((
                    format!("echo {case}: messages per CPU-second >= {want:.1}x {peer}"),
                    ratio.map_or("no figure".into(), |r| format!("{r:.2}x")),
                    ratio.map(|r| r >= want),
                ));
            }
        }
        if let Some(case) = self.cases("idle").iter().find(|c| c.starts_with("19000")) {
            let b = self.median("idle", case, BASELINE, "bytes_per_conn");
            rows.push((
                format!("idle, {case}: ringpush <= 2 KiB per connection"),
                b.map_or("no figure".into(), |v| format_unit(v, Unit::Bytes)),
                b.map(|v| v <= 2048.0),
            ));
        }
        for case in self.cases("upgrades") {
            let per_cpu = self.median("upgrades", &case, BASELINE, "rate.upgrades_per_cpu_sec");
            if let Some(v) = per_cpu {
                rows.push((
                    "upgrades: ringpush >= 20,000 per second per core (per server CPU-second)".into(),
                    format_unit(v, Unit::Count),
                    Some(v >= 20_000.0),
                ));
            }
            let clients = self.median("upgrades", &case, BASELINE, "storm.clients");
            let failed = self.median("upgrades", &case, BASELINE, "storm.failed");
            if let (Some(n), Some(f)) = (clients, failed) {
                let secs = self.median("upgrades", &case, BASELINE, "storm.secs").unwrap_or(f64::NAN);
                // The goal is about 19,000 clients; a smaller storm (--quick) decides nothing.
                rows.push((
                    format!("reconnect storm of {n:.0} clients (goal: 19,000): none refused or failed"),
                    format!("{f:.0} failed, all back in {secs:.2} s"),
                    (n >= 19_000.0).then_some(f == 0.0),
                ));
            }
        }
        goal_table("### The issue's goals", "measured (median)", rows)
    }

    /// Issue 3's goals, from ringpush's own `im` and `fanout` runs (one run each, after the
    /// side-by-side part), with the kernel's `floor` beside the fan-out figure.
    fn im_goals(&self) -> String {
        let mut rows: Vec<(String, String, Option<bool>)> = Vec::new();
        // The first case of `group` whose options do not include `flag`.
        let case_without =
            |group: &str, flag: &str| self.cases(group).into_iter().find(|c| !c.contains(flag));
        // An open-loop phase's rate and its p99 send -> deliver, with the server's CPU.
        let p99_at = |case: &str, phase: usize| {
            let get = |path: &str| self.median("im", case, BASELINE, &format!("phases.{phase}.{path}"));
            let (rate, p99) = (get("rate")?, get("deliver_latency.p99_us")?);
            let util = get("server_cpu_util").unwrap_or(f64::NAN);
            Some((rate, p99, format!("{} (server CPU {:.0}%)", format_unit(p99, Unit::Micros), util * 100.0)))
        };
        if let Some(case) = case_without("im", "--rate") {
            let per_core = self.median("im", &case, BASELINE, "phases.0.deliveries_per_core_sec");
            let us = self.median("im", &case, BASELINE, "phases.0.server_cpu_us_per_delivery");
            rows.push((
                "im, saturation: >= 300,000 deliveries per second per server core (100-byte bodies)".into(),
                per_core.map_or("no figure".into(), |v| {
                    let us = format_unit(us.unwrap_or(f64::NAN), Unit::Micros);
                    format!("{} per core ({us} per delivery)", format_unit(v, Unit::Count))
                }),
                per_core.map(|v| v >= 300_000.0),
            ));
            if let Some((rate, p99, cell)) = p99_at(&case, 1) {
                rows.push((
                    format!("im, half the saturation rate ({rate:.0} sends/s): p99 send -> deliver < 2 ms"),
                    cell,
                    Some(p99 < 2000.0),
                ));
            }
        }
        for case in self.cases("im").into_iter().filter(|c| c.contains("--rate")) {
            if let Some((rate, _, cell)) = p99_at(&case, 0) {
                rows.push((
                    format!("im at {rate:.0} sends/s (for comparison): p99 send -> deliver"),
                    cell,
                    None,
                ));
            }
        }
        if let Some(case) = case_without("fanout", "--burst") {
            let p50 = self.median("fanout", &case, BASELINE, "last_read.p50_us");
            let floor = case_without("floor", "--burst")
                .and_then(|c| self.median("floor", &c, BASELINE, "last_read.p50_us"));
            let members = self.median("fanout", &case, BASELINE, "members").unwrap_or(0.0);
            rows.push((
                format!("fanout, {members:.0} members (goal: 10,000): the last member within 40 ms"),
                p50.map_or("no figure".into(), |v| {
                    let beside = floor.map_or(String::new(), |f| {
                        format!(
                            "; the kernel alone, the same writes, no server: {}",
                            format_unit(f, Unit::Micros)
                        )
                    });
                    format!("p50 {}{beside}", format_unit(v, Unit::Micros))
                }),
                // The goal is about 10,000 members; a smaller run (--quick) decides nothing.
                p50.filter(|_| members >= 10_000.0).map(|v| v <= 40_000.0),
            ));
        }
        goal_table("### Issue 3's goals (ringpush alone)", "measured (one run)", rows)
    }

    /// The README's block: where the figures come from, the goals, the headline table.
    fn summary(&self, link: &str) -> String {
        let get = |k: &str| self.meta.get(k).and_then(Value::as_str).unwrap_or("?").to_string();
        let mut s = format!(
            "Generated by `bench/compare.sh` on {} (commit {}, kernel {}); every table and the method \
             are in [{link}]({link}).\n\n",
            get("date"),
            get("commit"),
            get("kernel"),
        );
        s += &self.goals().replacen("### The issue's goals", "**Goals** (issue 5)", 1);
        s += &self.im_goals().replacen(
            "### Issue 3's goals (ringpush alone)",
            "**Goals** (issue 3, ringpush alone)",
            1,
        );
        if let Some(figure) = ECHO.first() {
            let mut t = self.table("echo", figure);
            t = t.replacen(&format!("### {}", figure.title), &format!("**{}**", figure.title), 1);
            s += &t;
        }
        s
    }
}

/// A goals table; empty without rows.
fn goal_table(title: &str, measured: &str, rows: Vec<(String, String, Option<bool>)>) -> String {
    if rows.is_empty() {
        return String::new();
    }
    let mut s = format!("{title}\n\n| goal | {measured} | |\n| --- | --- | --- |\n");
    for (goal, value, met) in rows {
        let verdict = match met {
            Some(true) => "met",
            Some(false) => "**not met**",
            // A figure shown beside the goals for comparison decides nothing.
            None if goal.contains("for comparison") => "",
            None => "?",
        };
        let _ = writeln!(s, "| {goal} | {value} | {verdict} |");
    }
    s += "\n";
    s
}

/// Whether an echo case label is `SIZE B x CONNS conns, pipeline DEPTH`.
fn is_case(case: &str, size: usize, conns: usize, depth: usize) -> bool {
    case == case_label(size, conns, depth)
}

/// The label `bench/compare.sh` gives an echo case.
pub fn case_label(size: usize, conns: usize, depth: usize) -> String {
    let size = match size {
        s if s >= 1024 && s % 1024 == 0 => format!("{} KiB", s / 1024),
        s => format!("{s} B"),
    };
    format!("{size} x {conns} conns, pipeline {depth}")
}

/// A number at a dotted path of a JSON value.
fn lookup(v: &Value, path: &str) -> Option<f64> {
    let mut at = v;
    for key in path.split('.') {
        // A number indexes an array (`phases.0.rate`).
        at = match key.parse::<usize>() {
            Ok(i) if at.is_array() => at.get(i)?,
            _ => at.get(key)?,
        };
    }
    at.as_f64()
}

fn median(values: &[f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 })
}

fn cell(values: &[f64], failed: usize, base: Option<f64>, unit: Unit, is_base: bool) -> String {
    let Some(mid) = median(values) else {
        return if failed > 0 { "failed".into() } else { "".into() };
    };
    let mut s = format_unit(mid, unit);
    if values.len() > 1 {
        let lo = values.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let _ = write!(s, " ({}-{})", format_unit(lo, unit), format_unit(hi, unit));
    }
    if let (false, Some(b)) = (is_base, base) {
        if b != 0.0 && !matches!(unit, Unit::Percent) {
            let _ = write!(s, " {:.2}x", mid / b);
        }
    }
    if failed > 0 {
        let _ = write!(s, " ({failed} failed)");
    }
    s
}

fn format_unit(x: f64, unit: Unit) -> String {
    match unit {
        Unit::Count if x >= 1e6 => format!("{:.2}M", x / 1e6),
        Unit::Count if x >= 1e4 => format!("{:.0}k", x / 1e3),
        Unit::Count if x >= 1e3 => format!("{:.1}k", x / 1e3),
        Unit::Count => format!("{x:.0}"),
        Unit::Micros if x >= 1e6 => format!("{:.2} s", x / 1e6),
        Unit::Micros if x >= 10_000.0 => format!("{:.1} ms", x / 1e3),
        Unit::Micros if x >= 1000.0 => format!("{:.2} ms", x / 1e3),
        Unit::Micros if x >= 100.0 => format!("{x:.0} µs"),
        Unit::Micros if x >= 10.0 => format!("{x:.1} µs"),
        Unit::Micros => format!("{x:.2} µs"),
        Unit::Bytes if x >= 10.0 * 1024.0 => format!("{:.1} KiB", x / 1024.0),
        Unit::Bytes => format!("{x:.0} B"),
        Unit::Secs => format!("{x:.2} s"),
        Unit::Percent => format!("{:.0}%", x * 100.0),
    }
}

/// `text` with the block between the markers replaced by `body`; `None` without markers.
fn splice(text: &str, body: &str) -> Option<String> {
    let begin = text.find(README_BEGIN)? + README_BEGIN.len();
    let end = begin + text[begin..].find(README_END)?;
    Some(format!("{}\n{}\n{}", &text[..begin], body.trim_end(), &text[end..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn count_by_server(runs: &Runs) -> std::collections::BTreeMap<String, usize> {
        let mut out = std::collections::BTreeMap::new();
        for r in &runs.runs {
            *out.entry(r.server.clone()).or_default() += 1;
        }
        out
    }

    fn runs() -> Runs {
        let case = case_label(64, 100, 16);
        let mut text = String::from(
            r#"{"meta":{"date":"2026-01-01","commit":"abc","kernel":"6.1","cpus":"2","cpu":"X","mem_gib":"24","reps":3,"versions":{"ringpush":"0.1.0"}}}"#,
        );
        text.push('\n');
        for (server, values) in
            [("node-ws", [10.0, 12.0, 11.0]), ("ringpush", [2.0, 2.5, 3.5]), ("tungstenite", [4.0, 4.0, 4.0])]
        {
            for (rep, us) in values.iter().enumerate() {
                let result = serde_json::json!({
                    "server_cpu_us_per_msg": us, "msgs_per_cpu_sec": 1e6 / us,
                    "latency": {"p99_us": 100.0 * us},
                });
                let line = serde_json::json!({"group":"echo","case":case,"server":server,"rep":rep + 1,"result":result});
                text += &format!("{line}\n");
            }
        }
        text += &format!(
            "{}\n",
            serde_json::json!({"group":"echo","case":case,"server":"fastwebsockets","rep":1,"error":"exit 1"})
        );
        Runs::parse(&text).expect("parses")
    }

    #[test]
    fn medians_ranges_and_ratios() {
        let r = runs();
        assert_eq!(count_by_server(&r)["ringpush"], 3);
        assert_eq!(r.servers()[0], "ringpush", "the baseline comes first");
        let case = case_label(64, 100, 16);
        assert_eq!(r.median("echo", &case, "ringpush", "server_cpu_us_per_msg"), Some(2.5));
        assert_eq!(r.median("echo", &case, "ringpush", "latency.p99_us"), Some(250.0));
        let t = r.table("echo", &ECHO[1]);
        assert!(t.contains("| 2.50 µs (2.00 µs-3.50 µs) |"), "{t}");
        assert!(t.contains("| 4.00 µs (4.00 µs-4.00 µs) 1.60x |"), "{t}");
        assert!(t.contains("| failed |"), "{t}");
        let goals = r.goals();
        assert!(goals.contains("ringpush server CPU per message <= 3 µs | 2.50 µs | met"), "{goals}");
        assert!(goals.contains(">= 1.3x tungstenite | 1.60x | met"), "{goals}");
        assert!(goals.contains(">= 1.0x fastwebsockets | no figure | ?"), "{goals}");
    }

    #[test]
    fn im_goals_come_from_the_alone_runs() {
        let phase = |rate: Option<f64>, per_core: f64, p99: f64| {
            serde_json::json!({"rate": rate, "deliveries_per_core_sec": per_core,
                "server_cpu_us_per_delivery": 1e6 / per_core, "server_cpu_util": 0.5,
                "deliver_latency": {"p99_us": p99}})
        };
        let lines = [
            serde_json::json!({"group":"im","case":"im --duration 10","server":"ringpush","rep":1,
                "result":{"phases":[phase(None, 400_000.0, 90_000.0), phase(Some(20_000.0), 200_000.0, 2500.0)]}}),
            serde_json::json!({"group":"im","case":"im --rate 2000 --duration 10","server":"ringpush","rep":1,
                "result":{"phases":[phase(Some(2000.0), 50_000.0, 700.0)]}}),
            serde_json::json!({"group":"fanout","case":"fanout --members 10000","server":"ringpush","rep":1,
                "result":{"members":10000,"last_read":{"p50_us":65_000.0}}}),
            serde_json::json!({"group":"floor","case":"floor --conns 10000","server":"ringpush","rep":1,
                "result":{"last_read":{"p50_us":60_000.0}}}),
        ];
        let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
        let goals = Runs::parse(&text).expect("parses").im_goals();
        assert!(goals.contains("| 400k per core (2.50 µs per delivery) | met |"), "{goals}");
        assert!(
            goals.contains(
                "(20000 sends/s): p99 send -> deliver < 2 ms | 2.50 ms (server CPU 50%) | **not met** |"
            ),
            "{goals}"
        );
        assert!(
            goals.contains(
                "im at 2000 sends/s (for comparison): p99 send -> deliver | 700 µs (server CPU 50%) |  |"
            ),
            "{goals}"
        );
        assert!(
            goals.contains(
                "| p50 65.0 ms; the kernel alone, the same writes, no server: 60.0 ms | **not met** |"
            ),
            "{goals}"
        );
    }

    #[test]
    fn units() {
        assert_eq!(format_unit(1_543_000.0, Unit::Count), "1.54M");
        assert_eq!(format_unit(957_858.0, Unit::Count), "958k");
        assert_eq!(format_unit(0.654, Unit::Micros), "0.65 µs");
        assert_eq!(format_unit(18_220.0, Unit::Micros), "18.2 ms");
        assert_eq!(format_unit(1_098_900.0, Unit::Micros), "1.10 s");
        assert_eq!(format_unit(136_610.0, Unit::Bytes), "133.4 KiB");
        assert_eq!(format_unit(0.995, Unit::Percent), "100%");
        assert_eq!(case_label(16384, 200, 1), "16 KiB x 200 conns, pipeline 1");
    }

    #[test]
    fn readme_block_is_replaced() {
        let text = format!("a\n{README_BEGIN}\nold\n{README_END}\nb\n");
        let out = splice(&text, "new\n").expect("markers");
        assert_eq!(out, format!("a\n{README_BEGIN}\nnew\n{README_END}\nb\n"));
        assert!(splice("no markers", "x").is_none());
    }
}
