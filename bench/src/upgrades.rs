//! The `upgrades` scenario: how fast a server takes new WebSocket connections.
//!
//! - **Rate**: each client process keeps `--concurrency` handshakes going: connect, send
//!   the upgrade request, check the `101` (its `Sec-WebSocket-Accept`), reset the
//!   connection, start over. Upgrades that complete inside the window of `--duration`
//!   seconds (after `--warmup`) count, with the server's CPU time over the same window.
//!   Resets rather than close handshakes: no TIME_WAIT piles up, and the server's cost is
//!   the upgrade, not a close dance that differs between servers.
//! - **Storm** (`--storm N`): N clients connect (gently, `--concurrency`-style) and are
//!   held; then every one is reset at the same moment and all N reconnect at once, with
//!   no cap on handshakes in flight, spread over ceil(N / 9000) processes and
//!   ceil(N / 10000) source addresses. Reported: failures (refused, reset, no answer
//!   within 10 s), the time until every client is back, and the spread of the times.

use std::time::{Duration, Instant};

use crate::echo::{self, CpuMark};
use crate::error::Error;
use crate::fleet::Endpoint;
use crate::latency::{Latency, Summary};
use crate::server::{self, Server};
use crate::target::{pin_name, EchoTargetArgs};
use crate::workers::{total, FleetPlan, Workers};

/// New upgrades a second, and a reconnect storm.
#[derive(Debug, Clone, clap::Args)]
pub struct UpgradesArgs {
    #[command(flatten)]
    pub target: EchoTargetArgs,
    /// Handshakes in flight per client process in the rate phase.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// Client processes of the rate phase (they share the client CPU).
    #[arg(long, default_value_t = 1)]
    pub procs: usize,
    /// Seconds measured in the rate phase.
    #[arg(long, default_value_t = 5.0)]
    pub duration: f64,
    /// Seconds of churn before the window.
    #[arg(long, default_value_t = 1.0)]
    pub warmup: f64,
    /// Clients of the reconnect storm; 0 = no storm.
    #[arg(long, default_value_t = 19_000)]
    pub storm: usize,
    /// Skip the rate phase (the storm only).
    #[arg(long)]
    pub no_rate: bool,
    /// Print one JSON line (after the human summary, which goes to stderr).
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone)]
pub struct RateReport {
    pub secs: f64,
    pub ok: u64,
    pub failed: u64,
    pub latency: Summary,
    pub server_cpu_time: Duration,
    pub client_cpu_time: Duration,
}

impl RateReport {
    pub fn per_sec(&self) -> f64 {
        self.ok as f64 / self.secs
    }

    pub fn us_per_upgrade(&self) -> f64 {
        self.server_cpu_time.as_secs_f64() * 1e6 / self.ok.max(1) as f64
    }
}

#[derive(Debug, Clone)]
pub struct StormReport {
    pub clients: usize,
    pub procs: usize,
    pub source_ips: u8,
    /// The first, gentle connect phase.
    pub connect_secs: f64,
    pub back: u64,
    pub failed: u64,
    /// From the resets to the last client up (or failed), as the parent saw it.
    pub secs: f64,
    /// Each client's time from the storm to up.
    pub times: Summary,
    pub server_cpu_time: Duration,
}

#[derive(Debug, Clone)]
pub struct Report {
    pub args: UpgradesArgs,
    pub server_pid: u32,
    pub server_cpu: Option<usize>,
    pub client_cpu: Option<usize>,
    pub rate: Option<RateReport>,
    pub storm: Option<StormReport>,
}

impl Report {
    pub fn human(&self) -> String {
        let a = &self.args;
        let mut s = format!(
            "ringpush-bench upgrades: on /echo{}; clients on {}; server pid {} ({})\n",
            if a.target.raw { " (plain TCP echo: the request coming back stands for the 101)" } else { "" },
            pin_name(self.client_cpu),
            self.server_pid,
            pin_name(self.server_cpu),
        );
        if let Some(r) = &self.rate {
            s += &format!(
                "  rate        {:.0} upgrades/s over {:.1} s ({} handshakes in flight x {} process(es)); {} failed\n",
                r.per_sec(),
                r.secs,
                a.concurrency,
                a.procs,
                r.failed
            );
            s += &format!("  handshake   connect -> 101 checked: {}\n", r.latency.human());
            s += &format!(
                "  server      CPU {:.1}% of one core; {:.1} µs per upgrade = {:.0} upgrades per CPU-second; \
                 clients CPU {:.1}%\n",
                r.server_cpu_time.as_secs_f64() * 100.0 / r.secs,
                r.us_per_upgrade(),
                1e6 / r.us_per_upgrade(),
                r.client_cpu_time.as_secs_f64() * 100.0 / r.secs
            );
        }
        if let Some(st) = &self.storm {
            s += &format!(
                "  storm       {} clients ({} process(es), {} source address(es)), first connected in {:.2} s, \
                 then all reset and reconnecting at once\n",
                st.clients, st.procs, st.source_ips, st.connect_secs
            );
            s += &format!(
                "  back        {} of {} in {:.2} s; {} failed{}\n",
                st.back,
                st.clients,
                st.secs,
                st.failed,
                if st.failed > 0 { " (reasons above)" } else { "" }
            );
            s += &format!("  times       storm -> up: {}\n", st.times.human());
            s += &format!(
                "  server      {:.0} ms CPU over the storm ({:.1} µs per client)\n",
                st.server_cpu_time.as_secs_f64() * 1000.0,
                st.server_cpu_time.as_secs_f64() * 1e6 / st.clients.max(1) as f64
            );
        }
        s
    }

    pub fn json(&self) -> String {
        let r3 = |x: f64| (x * 1000.0).round() / 1000.0;
        let rate = self.rate.as_ref().map(|r| {
            serde_json::json!({
                "secs": r3(r.secs),
                "concurrency": self.args.concurrency,
                "procs": self.args.procs,
                "upgrades": r.ok,
                "upgrades_per_sec": r.per_sec().round(),
                "failed": r.failed,
                "latency": r.latency.json(),
                "server_cpu_util": r3(r.server_cpu_time.as_secs_f64() / r.secs),
                "server_cpu_us_per_upgrade": r3(r.us_per_upgrade()),
                "upgrades_per_cpu_sec": (1e6 / r.us_per_upgrade()).round(),
                "client_cpu_util": r3(r.client_cpu_time.as_secs_f64() / r.secs),
            })
        });
        let storm = self.storm.as_ref().map(|st| {
            serde_json::json!({
                "clients": st.clients,
                "procs": st.procs,
                "source_ips": st.source_ips,
                "connect_secs": r3(st.connect_secs),
                "back": st.back,
                "failed": st.failed,
                "secs": r3(st.secs),
                "times": st.times.json(),
                "server_cpu_ms": r3(st.server_cpu_time.as_secs_f64() * 1000.0),
            })
        });
        serde_json::json!({ "scenario": "upgrades", "raw": self.args.target.raw, "rate": rate, "storm": storm })
            .to_string()
    }
}

/// Runs the scenario: prints the summary (and the JSON line) and returns the report.
pub fn run(args: UpgradesArgs) -> Result<Report, Error> {
    if args.no_rate && args.storm == 0 {
        return Err(Error::Usage("--no-rate with --storm 0 leaves nothing to measure".into()));
    }
    if args.concurrency == 0 || args.procs == 0 || !(args.duration > 0.0 && args.warmup >= 0.0) {
        return Err(Error::Usage("--concurrency, --procs and --duration must be above 0".into()));
    }
    let target = args.target.open(0)?;
    let server = &target.server;
    let result = (|| {
        let rate = match args.no_rate {
            true => None,
            false => Some(rate(&args, server, target.client_cpu)?),
        };
        let storm = match args.storm {
            0 => None,
            n => Some(storm(&args, server, target.client_cpu, n)?),
        };
        Ok((rate, storm))
    })();
    let (rate, storm) = match result {
        Ok(found) => found,
        Err(e) => {
            let tail = server.log_tail(15);
            if !tail.is_empty() {
                eprintln!("ringpush-bench: the server's log ends with:\n{tail}");
            }
            return Err(e);
        }
    };
    let report = Report {
        args: args.clone(),
        server_pid: server.pid,
        server_cpu: target.server_cpu,
        client_cpu: target.client_cpu,
        rate,
        storm,
    };
    server::print_report(&report.human(), &report.json(), args.json);
    Ok(report)
}

fn plan(args: &UpgradesArgs, server: &Server, cpu: Option<usize>, conns: usize, procs: usize) -> FleetPlan {
    FleetPlan {
        addr: server.client,
        path: Endpoint::Echo,
        conns,
        procs,
        source_ips: conns.div_ceil(echo::CONNS_PER_SOURCE_IP).clamp(1, 254) as u8,
        cpu,
        concurrency: 256,
        raw: args.target.raw,
        connect_timeout_secs: echo::CONNECT_TIMEOUT_SECS,
    }
}

fn rate(args: &UpgradesArgs, server: &Server, cpu: Option<usize>) -> Result<RateReport, Error> {
    let conns = args.concurrency * args.procs;
    let mut workers = Workers::spawn(plan(args, server, cpu, conns, args.procs).arg_lists())?;
    echo::connect_all(&mut workers, conns)?;
    let start = echo::now_ns() + echo::secs_ns(args.warmup);
    let end = start + echo::secs_ns(args.duration);
    workers.send(&format!("churn {start} {end}"))?;
    let pids = workers.pids();
    echo::sleep_until(start);
    let first = CpuMark::take(server, &pids)?;
    echo::sleep_until(end);
    let last = CpuMark::take(server, &pids)?;
    // The slots in flight at the end finish within the handshake timeout (10 s).
    let limit = Duration::from_secs(30);
    let done = workers.expect("churned", limit)?;
    let mut latency = Latency::new();
    for line in workers.expect_lines("hist", limit)? {
        if let Some((_, h)) = Latency::parse_line(&line) {
            latency.merge(&h);
        }
    }
    workers.stop();
    let ok = total(&done, "ok_win");
    if ok == 0 {
        return Err(Error::Worker("no upgrade completed in the window (reasons above)".into()));
    }
    Ok(RateReport {
        secs: (last.at - first.at) as f64 / 1e9,
        ok,
        failed: total(&done, "failed_win"),
        latency: latency.summary(),
        server_cpu_time: last.server.saturating_sub(first.server),
        client_cpu_time: last.clients.saturating_sub(first.clients),
    })
}

fn storm(
    args: &UpgradesArgs,
    server: &Server,
    cpu: Option<usize>,
    clients: usize,
) -> Result<StormReport, Error> {
    let procs = clients.div_ceil(echo::CONNS_PER_PROC);
    let plan = plan(args, server, cpu, clients, procs);
    let mut workers = Workers::spawn(plan.arg_lists())?;
    let connect_secs = echo::connect_all(&mut workers, clients)?;
    let pids = workers.pids();
    let first = CpuMark::take(server, &pids)?;
    let started = Instant::now();
    workers.send("storm")?;
    let limit = Duration::from_secs(echo::CONNECT_TIMEOUT_SECS + 30);
    let replies = workers.expect("connected", limit)?;
    let secs = started.elapsed().as_secs_f64();
    let last = CpuMark::take(server, &pids)?;
    let mut times = Latency::new();
    for line in workers.expect_lines("hist", limit)? {
        if let Some((_, h)) = Latency::parse_line(&line) {
            times.merge(&h);
        }
    }
    workers.stop();
    Ok(StormReport {
        clients,
        procs,
        source_ips: plan.source_ips,
        connect_secs,
        back: total(&replies, "connected"),
        failed: total(&replies, "failed"),
        secs,
        times: times.summary(),
        server_cpu_time: last.server.saturating_sub(first.server),
    })
}
