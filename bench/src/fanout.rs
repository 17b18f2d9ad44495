//! The `fanout` scenario: one conversation with many members, one sender; how long until
//! the last member has a message, and how many deliveries a second a burst makes.
//!
//! Method: `--members` users `u1..=uN` plus the sender `u0`, one connection each, all in
//! one conversation and synced. Then, one message at a time: the sender sends message i
//! and every client process reports once each of its connections has read seq i (or
//! after `--timeout-ms`); only then is message i+1 sent. Per message: the latency to the
//! first and to the last member, from the `t` in the body to the receiver's read, and,
//! from the kernel's receive stamp (SO_TIMESTAMPNS), to the moment the bytes reached
//! the receiver's socket: the server's part without the client processes' own delay in
//! getting to each socket. With `--burst` the messages go back to back instead, and the
//! figure is deliveries over the time from the first send to the last delivery.

use std::time::{Duration, Instant};

use crate::crowd::{self, ClientArgs, Crowd};
use crate::error::Error;
use crate::latency::duration_us;
use crate::plan::Plan;
use crate::server::Server;
use crate::target::{pin_name, TargetArgs};
use crate::workers::Reply;

/// Measure the fan-out of one conversation to many members.
#[derive(Debug, Clone, clap::Args)]
pub struct FanoutArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    /// Members that receive (one connection each); the sender is one more.
    #[arg(long, default_value_t = 10_000)]
    pub members: usize,
    /// Messages to send.
    #[arg(long, default_value_t = 20)]
    pub messages: u64,
    /// Send the messages back to back and measure deliveries a second.
    #[arg(long)]
    pub burst: bool,
    /// Bound on waiting for one message's (or the burst's) receipts.
    #[arg(long, default_value_t = 5000)]
    pub timeout_ms: u64,
    #[command(flatten)]
    pub clients: ClientArgs,
}

/// One message's receipts over all members; latencies in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Receipt {
    pub seq: u64,
    pub got: u64,
    pub want: u64,
    pub first_read: f64,
    pub last_read: f64,
    /// From the kernel's receive stamps; `None` without them.
    pub first_arrival: Option<f64>,
    pub last_arrival: Option<f64>,
}

impl Receipt {
    /// Combines the processes' figures for one seq: (seq, got, want, first_read,
    /// last_read, first_arrival, last_arrival), latencies in ns, 0 = none.
    pub fn combine(seq: u64, parts: &[[u64; 6]]) -> Receipt {
        let with = |parts: &[[u64; 6]], k: usize| -> Vec<u64> {
            parts.iter().filter(|p| p[0] > 0 && p[k] > 0).map(|p| p[k]).collect()
        };
        let us = |ns: u64| ns as f64 / 1000.0;
        let min = |v: Vec<u64>| v.into_iter().min().map(us);
        let max = |v: Vec<u64>| v.into_iter().max().map(us);
        Receipt {
            seq,
            got: parts.iter().map(|p| p[0]).sum(),
            want: parts.iter().map(|p| p[1]).sum(),
            first_read: min(with(parts, 2)).unwrap_or(0.0),
            last_read: max(with(parts, 3)).unwrap_or(0.0),
            first_arrival: min(with(parts, 4)),
            last_arrival: max(with(parts, 5)),
        }
    }

    pub fn json(&self) -> serde_json::Value {
        let r = |x: f64| (x * 10.0).round() / 10.0;
        serde_json::json!({
            "seq": self.seq, "got": self.got, "want": self.want,
            "first_read_us": r(self.first_read), "last_read_us": r(self.last_read),
            "first_arrival_us": self.first_arrival.map(r), "last_arrival_us": self.last_arrival.map(r),
        })
    }
}

/// The burst's totals.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Burst {
    /// From the first send to the last read, and to the last arrival.
    pub read_secs: f64,
    pub arrival_secs: Option<f64>,
}

/// Everything the scenario measured.
#[derive(Debug, Clone)]
pub struct Report {
    pub members: usize,
    pub messages: u64,
    pub body_bytes: usize,
    pub procs: usize,
    pub server_pid: u32,
    pub server_cpu: Option<usize>,
    pub client_cpu: Option<usize>,
    pub connect_secs: f64,
    pub receipts: Vec<Receipt>,
    pub burst: Option<Burst>,
    /// Server CPU time over the sending phase.
    pub server_cpu_time: Duration,
    pub client_cpu_time: Duration,
    pub phase_secs: f64,
}

/// p50 and max of some figures.
pub fn p50_max(mut v: Vec<f64>) -> (f64, f64) {
    if v.is_empty() {
        return (0.0, 0.0);
    }
    v.sort_by(|a, b| a.total_cmp(b));
    (v[(v.len() - 1) / 2], v[v.len() - 1])
}

impl Report {
    pub fn got(&self) -> u64 {
        self.receipts.iter().map(|r| r.got).sum()
    }

    pub fn want(&self) -> u64 {
        self.receipts.iter().map(|r| r.want).sum()
    }

    pub fn cpu_us_per_delivery(&self) -> f64 {
        self.server_cpu_time.as_secs_f64() * 1e6 / self.got().max(1) as f64
    }

    fn figure(&self, f: impl Fn(&Receipt) -> Option<f64>) -> Option<(f64, f64)> {
        let v: Vec<f64> = self.receipts.iter().filter_map(f).collect();
        (!v.is_empty()).then(|| p50_max(v))
    }

    pub fn human(&self) -> String {
        let mut s = format!(
            "ringpush-bench fanout: 1 conversation, {} receiving members + 1 sender, {} message(s) of {} bytes{}; \
             {} client process(es) ({}); server pid {} ({})\n",
            self.members,
            self.messages,
            self.body_bytes,
            if self.burst.is_some() { ", back to back" } else { ", one at a time" },
            self.procs,
            pin_name(self.client_cpu),
            self.server_pid,
            pin_name(self.server_cpu)
        );
        s += &format!(
            "  setup       {} connections up and synced in {:.1} s\n",
            self.members + 1,
            self.connect_secs
        );
        let pair = |f: Option<(f64, f64)>| {
            f.map_or("n/a".to_string(), |(p50, max)| {
                format!("p50 {}, max {}", duration_us(p50), duration_us(max))
            })
        };
        s += &format!(
            "  last member  read {}; arrived {}\n",
            pair(self.figure(|r| Some(r.last_read))),
            pair(self.figure(|r| r.last_arrival))
        );
        s += &format!(
            "  first member read {}; arrived {}\n",
            pair(self.figure(|r| Some(r.first_read))),
            pair(self.figure(|r| r.first_arrival))
        );
        if self.burst.is_none() {
            s += "  per message  seq: last read / last arrival (first read)\n";
            for r in &self.receipts {
                s += &format!(
                    "    {:>4}: {} / {} ({}){}\n",
                    r.seq,
                    duration_us(r.last_read),
                    r.last_arrival.map_or("n/a".to_string(), duration_us),
                    duration_us(r.first_read),
                    if r.got < r.want { format!("  {} of {} members", r.got, r.want) } else { String::new() }
                );
            }
        }
        if let Some(b) = &self.burst {
            s += &format!(
                "  burst       {} deliveries in {:.1} ms from the first send to the last read: {:.0} deliveries/s",
                self.got(),
                b.read_secs * 1000.0,
                self.got() as f64 / b.read_secs.max(1e-9)
            );
            if let Some(a) = b.arrival_secs {
                s += &format!(
                    "; to the last arrival {:.1} ms: {:.0}/s",
                    a * 1000.0,
                    self.got() as f64 / a.max(1e-9)
                );
            }
            s += "\n";
        }
        s += &format!(
            "  deliveries  {} of {} ({} missing)\n",
            self.got(),
            self.want(),
            self.want().saturating_sub(self.got())
        );
        s += &format!(
            "  server      {:.2} µs CPU per delivery ({:.0} ms CPU over {:.2} s); clients {:.0} ms CPU\n",
            self.cpu_us_per_delivery(),
            self.server_cpu_time.as_secs_f64() * 1000.0,
            self.phase_secs,
            self.client_cpu_time.as_secs_f64() * 1000.0
        );
        s
    }

    pub fn json(&self) -> String {
        let r = |x: f64| (x * 10.0).round() / 10.0;
        let pair = |f: Option<(f64, f64)>| {
            f.map(|(p50, max)| serde_json::json!({ "p50_us": r(p50), "max_us": r(max) }))
        };
        serde_json::json!({
            "scenario": "fanout",
            "members": self.members, "messages": self.messages, "body_bytes": self.body_bytes,
            "burst": self.burst.is_some(), "procs": self.procs,
            "server": { "pid": self.server_pid, "cpu": self.server_cpu }, "client_cpu": self.client_cpu,
            "connect_secs": (self.connect_secs * 100.0).round() / 100.0,
            "last_read": pair(self.figure(|x| Some(x.last_read))),
            "last_arrival": pair(self.figure(|x| x.last_arrival)),
            "first_read": pair(self.figure(|x| Some(x.first_read))),
            "first_arrival": pair(self.figure(|x| x.first_arrival)),
            "deliveries": self.got(), "expected": self.want(),
            "burst_read_secs": self.burst.map(|b| b.read_secs),
            "burst_arrival_secs": self.burst.and_then(|b| b.arrival_secs),
            "burst_deliveries_per_sec": self.burst.map(|b| r(self.got() as f64 / b.read_secs.max(1e-9))),
            "server_cpu_us_per_delivery": (self.cpu_us_per_delivery() * 1000.0).round() / 1000.0,
            "server_cpu_ms": self.server_cpu_time.as_millis() as u64,
            "client_cpu_ms": self.client_cpu_time.as_millis() as u64,
            "receipts": self.receipts.iter().map(Receipt::json).collect::<Vec<_>>(),
        })
        .to_string()
    }
}

/// Runs the scenario: prints the summary (and the JSON line) and returns the report.
pub fn run(args: FanoutArgs) -> Result<Report, Error> {
    if args.members == 0 || args.messages == 0 || args.clients.procs == Some(0) {
        return Err(Error::Usage("--members, --messages and --procs must be at least 1".into()));
    }
    if args.clients.body_bytes < 32 {
        return Err(Error::Usage(
            "--body-bytes must be at least 32 (the timestamp lives in the body)".into(),
        ));
    }
    let mut target = args.target.open()?;
    let result = measure(&args, &mut target.server, target.server_cpu, target.client_cpu);
    if result.is_err() {
        let tail = target.server.log_tail(15);
        if !tail.is_empty() {
            eprintln!("ringpush-bench: the server's log ends with:\n{tail}");
        }
    }
    result
}

fn measure(
    args: &FanoutArgs,
    server: &mut Server,
    server_cpu: Option<usize>,
    client_cpu: Option<usize>,
) -> Result<Report, Error> {
    // Users u0..=uN, all members of the one conversation; u0 (sender i = 0) sends.
    let users = args.members + 1;
    let plan = Plan { users, convs: 1, members: users, senders: 1, tag: crowd::run_tag() };
    crowd::set_memberships(server, &args.target.api_key, &plan)?;
    let mut crowd =
        Crowd::start(&args.clients.crowd(server.client, &plan, &args.target.secret, client_cpu, true))?;
    eprintln!(
        "ringpush-bench fanout: {} connections up and synced in {:.1} s",
        crowd.connected, crowd.connect_secs
    );

    let limit = Duration::from_millis(args.timeout_ms) + Duration::from_secs(10);
    let server_cpu_before = server.cpu_time()?;
    let client_cpu_before = crowd.cpu_time();
    let started = Instant::now();
    let mut receipts = Vec::new();
    let mut burst = None;
    if args.burst {
        crowd.workers.send(&format!("flood 1 {} {}", args.messages, args.timeout_ms))?;
        let floods = crowd.workers.expect("flood", limit)?;
        let lines = crowd.workers.expect_lines("seqlat", Duration::from_secs(10))?;
        let per_proc: Vec<Vec<[u64; 6]>> = lines.iter().map(|l| parse_seqlat(l)).collect::<Result<_, _>>()?;
        for k in 0..args.messages as usize {
            let parts: Vec<[u64; 6]> = per_proc
                .iter()
                .zip(&floods)
                .filter_map(|(seqs, flood)| {
                    let [_, got, first_read, last_read, first_arrival, last_arrival] = *seqs.get(k)?;
                    let want = flood.get("want") / args.messages;
                    Some([got, want, first_read, last_read, first_arrival, last_arrival])
                })
                .collect();
            receipts.push(Receipt::combine(k as u64 + 1, &parts));
        }
        let t0 = floods.iter().map(|f| f.get("t0")).filter(|t| *t > 0).min().unwrap_or(0);
        let read_at = floods.iter().map(|f| f.get("last_read_at")).max().unwrap_or(0);
        let arrival_at = floods.iter().map(|f| f.get("last_arrival_at")).max().unwrap_or(0);
        let secs = |at: u64| (at > t0 && t0 > 0).then(|| (at - t0) as f64 / 1e9);
        burst = Some(Burst { read_secs: secs(read_at).unwrap_or(0.0), arrival_secs: secs(arrival_at) });
    } else {
        for seq in 1..=args.messages {
            let replies = crowd.workers.ask(&format!("fan {seq} {}", args.timeout_ms), "fan", limit)?;
            receipts.push(Receipt::combine(seq, &fan_parts(&replies)));
        }
    }
    let phase_secs = started.elapsed().as_secs_f64();
    let server_cpu_time = server.cpu_time()?.saturating_sub(server_cpu_before);
    let client_cpu_time = crowd.cpu_time().saturating_sub(client_cpu_before);
    crowd.workers.stop();
    if !server.alive() {
        return Err(Error::Server("the server exited during the run".into()));
    }
    let report = Report {
        members: args.members,
        messages: args.messages,
        body_bytes: args.clients.body_bytes,
        procs: crowd.procs,
        server_pid: server.pid,
        server_cpu,
        client_cpu,
        connect_secs: crowd.connect_secs,
        receipts,
        burst,
        server_cpu_time,
        client_cpu_time,
        phase_secs,
    };
    crate::server::print_report(&report.human(), &report.json(), args.clients.json);
    Ok(report)
}

/// The `fan` answers as [`Receipt::combine`] takes them.
fn fan_parts(replies: &[Reply]) -> Vec<[u64; 6]> {
    replies
        .iter()
        .map(|r| {
            [
                r.get("got"),
                r.get("want"),
                r.get("first_read"),
                r.get("last_read"),
                r.get("first_arrival"),
                r.get("last_arrival"),
            ]
        })
        .collect()
}

/// `seqlat` followed by six numbers per seq (seq, receipts, first and last read
/// latency, first and last arrival latency) into one array per seq.
fn parse_seqlat(line: &str) -> Result<Vec<[u64; 6]>, Error> {
    let bad = || Error::Worker(format!("bad seqlat line {:.60}", line));
    let numbers: Vec<u64> =
        line.split_whitespace().skip(1).map(|w| w.parse().map_err(|_| bad())).collect::<Result<_, _>>()?;
    if numbers.len() % 6 != 0 {
        return Err(bad());
    }
    Ok(numbers.chunks(6).map(|c| [c[0], c[1], c[2], c[3], c[4], c[5]]).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn receipts_combine_over_processes() {
        let r = Receipt::combine(
            3,
            &[[5, 5, 1000, 9000, 800, 7000], [4, 5, 2000, 12_000, 0, 0], [0, 5, 0, 0, 0, 0]],
        );
        assert_eq!((r.seq, r.got, r.want), (3, 9, 15));
        assert_eq!((r.first_read, r.last_read), (1.0, 12.0));
        assert_eq!((r.first_arrival, r.last_arrival), (Some(0.8), Some(7.0)));
        let none = Receipt::combine(1, &[[0, 5, 0, 0, 0, 0]]);
        assert_eq!((none.first_arrival, none.last_read), (None, 0.0));
    }

    #[test]
    fn figures() {
        assert_eq!(p50_max(vec![3.0, 1.0, 2.0, 10.0]), (2.0, 10.0));
        assert_eq!(p50_max(vec![]), (0.0, 0.0));
        assert_eq!(
            parse_seqlat("seqlat 1 5 2 3 4 5 2 5 6 7 8 9").unwrap(),
            vec![[1, 5, 2, 3, 4, 5], [2, 5, 6, 7, 8, 9]]
        );
        assert!(parse_seqlat("seqlat 1 2").is_err());
    }
}
