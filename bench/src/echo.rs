//! The `echo` scenario: N connections x message size x pipeline depth against any echo
//! server, for a duration. Round trips a second, their latency, and the server's CPU
//! time per echoed message.
//!
//! Method: the client processes connect every connection on `/echo`; then each keeps
//! `--pipeline` messages in flight per connection (closed loop: the next message goes out
//! as an echo comes back). After `--warmup`, a window of `--duration` seconds is measured:
//! round trips that end inside it (CLOCK_MONOTONIC, shared by every process), and the
//! server's CPU time at its two ends. CPU per message is the server's CPU time over the
//! window divided by the round trips of the window, a figure that does not depend on how
//! fast the load generator is: where the server is not saturated (the clients' CPU is),
//! the rate is the clients' but the CPU per message still is the server's.

use std::time::Duration;

use crate::error::Error;
use crate::fleet::Endpoint;
use crate::latency::{Latency, Summary};
use crate::pipe;
use crate::server::{self, Server};
use crate::target::{pin_name, EchoTargetArgs};
use crate::workers::{total, FleetPlan, Workers};

/// Bound on the connect phase, handed to each client process (the parent adds 30 s).
pub const CONNECT_TIMEOUT_SECS: u64 = 120;

/// Connections one client process holds at most by default (20000 open files here).
pub const CONNS_PER_PROC: usize = 9000;

/// Connections per source address (the kernel's connect-time port search slows down past
/// about half of the ephemeral ports of one address).
pub const CONNS_PER_SOURCE_IP: usize = 10_000;

/// Round trips of an echo server.
#[derive(Debug, Clone, clap::Args)]
pub struct EchoArgs {
    #[command(flatten)]
    pub target: EchoTargetArgs,
    /// Connections.
    #[arg(long, default_value_t = 100)]
    pub conns: usize,
    /// Payload bytes of each message.
    #[arg(long, default_value_t = 64)]
    pub size: usize,
    /// Messages in flight per connection.
    #[arg(long, default_value_t = 1)]
    pub pipeline: usize,
    /// Seconds measured.
    #[arg(long, default_value_t = 5.0)]
    pub duration: f64,
    /// Seconds of load before the window (connections warm, buffers grown).
    #[arg(long, default_value_t = 1.0)]
    pub warmup: f64,
    /// Text messages (the server checks UTF-8) instead of binary.
    #[arg(long)]
    pub text: bool,
    /// Client processes [default: ceil(conns / 9000)]; they share the client CPU.
    #[arg(long)]
    pub procs: Option<usize>,
    /// Print one JSON line (after the human summary, which goes to stderr).
    #[arg(long)]
    pub json: bool,
}

/// What one run measured.
#[derive(Debug, Clone)]
pub struct Report {
    pub args: EchoArgs,
    pub server_pid: u32,
    pub server_cpu: Option<usize>,
    pub client_cpu: Option<usize>,
    pub procs: usize,
    /// The measured window, seconds.
    pub secs: f64,
    pub round_trips: u64,
    pub errors: u64,
    /// Messages still in flight when the drain gave up.
    pub inflight: u64,
    pub rtt: Summary,
    pub server_cpu_time: Duration,
    pub server_stat_time: Duration,
    pub client_cpu_time: Duration,
}

impl Report {
    pub fn round_trips_per_sec(&self) -> f64 {
        self.round_trips as f64 / self.secs
    }

    pub fn server_cpu_util(&self) -> f64 {
        self.server_cpu_time.as_secs_f64() / self.secs
    }

    /// Server CPU microseconds per echoed message.
    pub fn us_per_msg(&self) -> f64 {
        self.server_cpu_time.as_secs_f64() * 1e6 / self.round_trips.max(1) as f64
    }

    /// The same from `/proc/PID/stat` (10 ms ticks).
    pub fn stat_us_per_msg(&self) -> f64 {
        self.server_stat_time.as_secs_f64() * 1e6 / self.round_trips.max(1) as f64
    }

    pub fn human(&self) -> String {
        let a = &self.args;
        let kind = if a.text { "text" } else { "binary" };
        let server = if a.target.raw { "plain TCP echo" } else { "server" };
        let mut s = format!(
            "ringpush-bench echo: {} connections x {}-byte {kind} messages x pipeline {}, {:.1} s after {:.1} s \
             of warm-up; {} client process(es) ({}); {server} pid {} ({})\n",
            a.conns,
            a.size,
            a.pipeline,
            self.secs,
            a.warmup,
            self.procs,
            pin_name(self.client_cpu),
            self.server_pid,
            pin_name(self.server_cpu),
        );
        s += &format!(
            "  round trips {:.0}/s ({} in the window; {} errors, {} left in flight)\n",
            self.round_trips_per_sec(),
            self.round_trips,
            self.errors,
            self.inflight
        );
        s += &format!("  latency     send -> echo read: {}\n", self.rtt.human());
        let util = self.server_cpu_util();
        s += &format!(
            "  server      CPU {:.1}% of one core; {:.2} µs per echoed message = {:.0} messages per CPU-second \
             (utime+stime: {:.2} µs){}\n",
            util * 100.0,
            self.us_per_msg(),
            1e6 / self.us_per_msg(),
            self.stat_us_per_msg(),
            if util < 0.9 { "; not saturated: the clients set the rate" } else { "" }
        );
        s += &format!(
            "  clients     CPU {:.1}% of one core\n",
            self.client_cpu_time.as_secs_f64() * 100.0 / self.secs
        );
        s
    }

    pub fn json(&self) -> String {
        let a = &self.args;
        let r2 = |x: f64| (x * 100.0).round() / 100.0;
        let r3 = |x: f64| (x * 1000.0).round() / 1000.0;
        serde_json::json!({
            "scenario": "echo",
            "raw": a.target.raw,
            "conns": a.conns,
            "size": a.size,
            "pipeline": a.pipeline,
            "text": a.text,
            "procs": self.procs,
            "secs": r3(self.secs),
            "round_trips": self.round_trips,
            "round_trips_per_sec": self.round_trips_per_sec().round(),
            "errors": self.errors,
            "inflight": self.inflight,
            "latency": self.rtt.json(),
            "server_cpu_util": r3(self.server_cpu_util()),
            "server_cpu_us_per_msg": r3(self.us_per_msg()),
            "server_stat_cpu_us_per_msg": r3(self.stat_us_per_msg()),
            "msgs_per_cpu_sec": (1e6 / self.us_per_msg()).round(),
            "client_cpu_util": r2(self.client_cpu_time.as_secs_f64() / self.secs),
        })
        .to_string()
    }
}

/// Runs the scenario: prints the summary (and the JSON line) and returns the report.
pub fn run(args: EchoArgs) -> Result<Report, Error> {
    check(&args)?;
    let target = args.target.open(args.size)?;
    let result = measure(&args, &target.server, target.server_cpu, target.client_cpu);
    if result.is_err() {
        let tail = target.server.log_tail(15);
        if !tail.is_empty() {
            eprintln!("ringpush-bench: the server's log ends with:\n{tail}");
        }
    }
    result
}

fn check(args: &EchoArgs) -> Result<(), Error> {
    if args.conns == 0 || args.size == 0 || args.pipeline == 0 {
        return Err(Error::Usage("--conns, --size and --pipeline must be at least 1".into()));
    }
    if !(args.duration > 0.0 && args.warmup >= 0.0) {
        return Err(Error::Usage("--duration must be above 0 and --warmup not below 0".into()));
    }
    if args.procs == Some(0) {
        return Err(Error::Usage("--procs must be at least 1".into()));
    }
    Ok(())
}

fn measure(
    args: &EchoArgs,
    server: &Server,
    server_cpu: Option<usize>,
    client_cpu: Option<usize>,
) -> Result<Report, Error> {
    let procs = args.procs.unwrap_or_else(|| args.conns.div_ceil(CONNS_PER_PROC)).min(args.conns);
    let plan = FleetPlan {
        addr: server.client,
        path: Endpoint::Echo,
        conns: args.conns,
        procs,
        source_ips: args.conns.div_ceil(CONNS_PER_SOURCE_IP).clamp(1, 254) as u8,
        cpu: client_cpu,
        concurrency: 256,
        raw: args.target.raw,
        connect_timeout_secs: CONNECT_TIMEOUT_SECS,
    };
    let mut workers = Workers::spawn(plan.arg_lists())?;
    connect_all(&mut workers, args.conns)?;

    let start = now_ns() + secs_ns(args.warmup);
    let end = start + secs_ns(args.duration);
    let op = pipe::data_opcode(args.text);
    workers.send(&format!("echo {} {} {op} {start} {end}", args.size, args.pipeline))?;
    let pids = workers.pids();
    sleep_until(start);
    let first = CpuMark::take(server, &pids)?;
    sleep_until(end);
    let last = CpuMark::take(server, &pids)?;
    // The drain after the window is bounded by the client processes (5 s).
    let limit = Duration::from_secs(30);
    let done = workers.expect("echoed", limit)?;
    let mut rtt = Latency::new();
    for line in workers.expect_lines("hist", limit)? {
        if let Some((_, h)) = Latency::parse_line(&line) {
            rtt.merge(&h);
        }
    }
    workers.stop();
    let report = Report {
        args: args.clone(),
        server_pid: server.pid,
        server_cpu,
        client_cpu,
        procs,
        secs: (last.at - first.at) as f64 / 1e9,
        round_trips: total(&done, "rt_win"),
        errors: total(&done, "errors"),
        inflight: total(&done, "inflight"),
        rtt: rtt.summary(),
        server_cpu_time: last.server.saturating_sub(first.server),
        server_stat_time: last.server_stat.saturating_sub(first.server_stat),
        client_cpu_time: last.clients.saturating_sub(first.clients),
    };
    if report.round_trips == 0 {
        return Err(Error::Worker("no round trip completed in the window".into()));
    }
    server::print_report(&report.human(), &report.json(), args.json);
    Ok(report)
}

/// Waits for every client process's `connected` line; every connection must be up.
pub fn connect_all(workers: &mut Workers, conns: usize) -> Result<f64, Error> {
    let started = std::time::Instant::now();
    let replies = workers.expect("connected", Duration::from_secs(CONNECT_TIMEOUT_SECS + 30))?;
    let (ok, failed) = (total(&replies, "connected"), total(&replies, "failed"));
    if ok != conns as u64 {
        return Err(Error::Worker(format!(
            "{ok} of {conns} connections up, {failed} failed (reasons above)"
        )));
    }
    Ok(started.elapsed().as_secs_f64())
}

/// CPU times at one instant: the server's (schedstat and stat) and the clients'.
pub struct CpuMark {
    pub at: u64,
    pub server: Duration,
    pub server_stat: Duration,
    pub clients: Duration,
}

impl CpuMark {
    pub fn take(server: &Server, client_pids: &[u32]) -> Result<CpuMark, Error> {
        let at = now_ns();
        let server_time = server.cpu_time()?;
        let server_stat = server::stat_cpu_time(server.pid)
            .map_err(|e| Error::io(format!("read /proc/{}/stat", server.pid), e))?;
        let clients = client_pids.iter().filter_map(|pid| server::cpu_time(*pid).ok()).sum();
        Ok(CpuMark { at, server: server_time, server_stat, clients })
    }
}

pub fn now_ns() -> u64 {
    crate::chat::now_ns()
}

pub fn secs_ns(secs: f64) -> u64 {
    (secs * 1e9) as u64
}

/// Sleeps until CLOCK_MONOTONIC reaches `ns` (the clock the client processes count by).
pub fn sleep_until(ns: u64) {
    let now = now_ns();
    if ns > now {
        std::thread::sleep(Duration::from_nanos(ns - now));
    }
}
