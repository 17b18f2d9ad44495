//! The `im` scenario: many small conversations, many senders; throughput, latency and
//! server CPU per delivery.
//!
//! Method: N connections (users `u0..u(N-1)`), M conversations of K members each
//! ([`crate::plan`]), S senders sending into their own conversations. Memberships are
//! set through the admin API, then every connection connects and syncs its
//! conversations. Then one or two load phases of `--duration` seconds each:
//!
//! - without `--rate`: a closed-loop phase (each sender keeps `--window` sends unacked)
//!   that drives the server as hard as the clients can, the saturation figure; then an
//!   open-loop phase at `--latency-rate` (default: half the sends a second the first
//!   phase achieved), the latency figure;
//! - with `--rate R`: one open-loop phase at R sends a second.
//!
//! Each phase reports the sends acked and the `msg` frames read within its window (per
//! second), send-to-deliver and ack latency over every message of the phase (including
//! those read during the drain after the window), and the server's CPU time over the
//! window (`/proc/PID/task/*/schedstat`) against the deliveries it counted in that window.

use std::thread;
use std::time::{Duration, Instant};

use crate::crowd::{self, ClientArgs, Crowd};
use crate::error::Error;
use crate::latency::{duration_us, Latency, Summary};
use crate::plan::Plan;
use crate::server::{Metrics, Server};
use crate::target::{pin_name, TargetArgs};
use crate::workers::total;

/// Measure IM throughput and latency: many conversations, many senders.
#[derive(Debug, Clone, clap::Args)]
pub struct ImArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    /// N: connections, one per user.
    #[arg(long, default_value_t = 10_000)]
    pub conns: usize,
    /// M: conversations.
    #[arg(long, default_value_t = 1000)]
    pub convs: usize,
    /// K: members per conversation.
    #[arg(long, default_value_t = 10)]
    pub members: usize,
    /// S: users that send [default: one per conversation, at most N].
    #[arg(long)]
    pub senders: Option<usize>,
    /// Only one open-loop phase at this many sends a second (over all senders).
    #[arg(long, value_name = "SENDS_PER_SEC")]
    pub rate: Option<u64>,
    /// Rate of the latency phase after the saturation phase [default: half the sends a
    /// second the saturation phase achieved].
    #[arg(long, value_name = "SENDS_PER_SEC", conflicts_with = "rate")]
    pub latency_rate: Option<u64>,
    /// Skip the latency phase after the saturation phase.
    #[arg(long, conflicts_with_all = ["rate", "latency_rate"])]
    pub no_latency_phase: bool,
    /// Closed loop: sends each sender keeps unacked in the saturation phase.
    #[arg(long, default_value_t = 4)]
    pub window: u64,
    /// Seconds of each phase.
    #[arg(long, default_value_t = 10)]
    pub duration: u64,
    /// D: connections per user (devices `d0..d(D-1)`; N*D connections in all). A `msg`
    /// reaches K*D-1 connections, a `read` the reader's D-1 other devices.
    #[arg(long, default_value_t = 1)]
    pub devices: usize,
    /// The mix: `read` frames per message sent. Receivers mark the `msg` they just read as
    /// read (spread evenly over them); only a user's other devices get the `read`.
    #[arg(long, value_name = "F", default_value_t = 0.0)]
    pub reads: f64,
    /// The mix: `signal` frames per message sent. Senders send a typing signal into the
    /// conversation before a send; every other connection of every member gets it.
    #[arg(long, value_name = "F", default_value_t = 0.0)]
    pub signals: f64,
    #[command(flatten)]
    pub clients: ClientArgs,
}

/// How a phase sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Each sender keeps this many sends unacked.
    Closed { window: u64 },
    /// This many sends a second over all senders.
    Open { rate: u64 },
}

/// What one phase measured.
#[derive(Debug, Clone)]
pub struct Phase {
    pub mode: Mode,
    /// Wall time of the window.
    pub secs: f64,
    pub sent: u64,
    pub acks: u64,
    pub acks_in_window: u64,
    pub msgs: u64,
    pub msgs_in_window: u64,
    pub gaps: u64,
    pub errors: u64,
    pub seq_errors: u64,
    pub strays: u64,
    /// Sends still unacked when the drain ended.
    pub unacked: u64,
    /// Deliveries expected from the acks (each to the K-1 other members) minus those read.
    pub missing: i64,
    pub deliver: Summary,
    /// Send to the kernel's arrival stamp at the receiver; `None` without stamps.
    pub arrival: Option<Summary>,
    pub ack: Summary,
    pub server_cpu: Duration,
    pub client_cpu: Duration,
    /// `ringpush_messages_delivered_total` over the window, when /metrics is known.
    pub server_delivered: Option<u64>,
    /// `ringpush_slow_consumer_gaps_total` over the phase.
    pub server_gaps: Option<u64>,
    /// `ringpush_frames_out_total` and `ringpush_socket_writes_total` over the window:
    /// how many frames (msgs, acks) one socket write carried on average.
    pub server_frames: Option<u64>,
    pub server_writes: Option<u64>,
    /// The mix: `read` and `signal` frames the clients sent over the phase.
    pub reads_sent: u64,
    pub signals_sent: u64,
    /// `read` and `signal` frames the clients read, over the phase and in the window.
    pub reads: u64,
    pub reads_in_window: u64,
    pub signals: u64,
    pub signals_in_window: u64,
    /// `ringpush_signals_delivered_total` and `ringpush_read_marks_total` over the window,
    /// `ringpush_signals_dropped_total` over the phase.
    pub server_signals: Option<u64>,
    pub server_read_marks: Option<u64>,
    pub server_signals_dropped: Option<u64>,
}

impl Phase {
    fn per_sec(&self, n: u64) -> f64 {
        n as f64 / self.secs.max(1e-9)
    }

    pub fn acks_per_sec(&self) -> f64 {
        self.per_sec(self.acks_in_window)
    }

    pub fn deliveries_per_sec(&self) -> f64 {
        self.per_sec(self.msgs_in_window)
    }

    pub fn server_util(&self) -> f64 {
        self.server_cpu.as_secs_f64() / self.secs.max(1e-9)
    }

    pub fn client_util(&self) -> f64 {
        self.client_cpu.as_secs_f64() / self.secs.max(1e-9)
    }

    /// Server CPU µs per delivery, over the deliveries the server counted in the window
    /// (the clients' count without /metrics).
    pub fn cpu_us_per_delivery(&self) -> f64 {
        let n = self.server_delivered.unwrap_or(self.msgs_in_window);
        self.server_cpu.as_secs_f64() * 1e6 / n.max(1) as f64
    }

    /// Deliveries one fully used server core would make at this cost.
    pub fn deliveries_per_core_sec(&self) -> f64 {
        1e6 / self.cpu_us_per_delivery().max(1e-9)
    }

    /// Whether the phase had a mix (`read` or `signal` frames sent).
    pub fn mixed(&self) -> bool {
        self.reads_sent + self.signals_sent > 0
    }

    /// Frames delivered in the window, `msg`, `read` and `signal` together: the server's
    /// counts of `msg` and `signal` (the clients' without /metrics), the clients' of `read`
    /// (the server counts read marks moved, not the frames it sends).
    pub fn frames_delivered(&self) -> u64 {
        self.server_delivered.unwrap_or(self.msgs_in_window)
            + self.server_signals.unwrap_or(self.signals_in_window)
            + self.reads_in_window
    }

    /// Server CPU µs per delivered frame of any of the three kinds.
    pub fn cpu_us_per_frame(&self) -> f64 {
        self.server_cpu.as_secs_f64() * 1e6 / self.frames_delivered().max(1) as f64
    }

    /// Frames per socket write on the server over the window, when /metrics is known.
    pub fn frames_per_write(&self) -> Option<f64> {
        let (frames, writes) = (self.server_frames?, self.server_writes?);
        (writes > 0).then(|| frames as f64 / writes as f64)
    }

    fn title(&self) -> String {
        match self.mode {
            Mode::Closed { window } => {
                format!("saturation: closed loop, {window} sends unacked per sender, {:.1} s", self.secs)
            }
            Mode::Open { rate } => format!("open loop at {rate} sends/s, {:.1} s", self.secs),
        }
    }

    fn human(&self) -> String {
        let mut s = format!("  {}\n", self.title());
        s += &format!(
            "    sends      {:.0}/s acked in the window ({} sent, {} acked in all{})\n",
            self.acks_per_sec(),
            self.sent,
            self.acks,
            if self.unacked > 0 { format!(", {} never acked", self.unacked) } else { String::new() }
        );
        s += &format!(
            "    deliveries {:.0}/s read by the clients{}\n",
            self.deliveries_per_sec(),
            self.server_delivered
                .map(|d| format!(" ({:.0}/s handed to sockets by the server)", self.per_sec(d)))
                .unwrap_or_default()
        );
        s += &format!("    deliver    send -> msg read: {}\n", self.deliver.human());
        if let Some(arrival) = &self.arrival {
            s += &format!("    arrival    send -> msg in the receiver's socket: {}\n", arrival.human());
        }
        s += &format!(
            "    ack        send -> ack read: p50 {}, p99 {}, max {}\n",
            duration_us(self.ack.p50),
            duration_us(self.ack.p99),
            duration_us(self.ack.max)
        );
        s += &format!(
            "    server     CPU {:.1}% of one core; {:.2} µs per delivery = {:.0} deliveries/s per core{}\n",
            100.0 * self.server_util(),
            self.cpu_us_per_delivery(),
            self.deliveries_per_core_sec(),
            self.frames_per_write().map(|f| format!("; {f:.2} frames per socket write")).unwrap_or_default()
        );
        if self.mixed() {
            let per_send = |n: u64| n as f64 / self.sent.max(1) as f64;
            s += &format!(
                "    mix        {} reads and {} signals sent ({:.2} and {:.2} per send); read by the clients: \
                 {:.0} read/s, {:.0} signal/s{}\n",
                self.reads_sent,
                self.signals_sent,
                per_send(self.reads_sent),
                per_send(self.signals_sent),
                self.per_sec(self.reads_in_window),
                self.per_sec(self.signals_in_window),
                match (self.server_read_marks, self.server_signals) {
                    (Some(marks), Some(sig)) => format!(
                        " (server: {:.0} read marks moved/s, {:.0} signals handed to sockets/s{})",
                        self.per_sec(marks),
                        self.per_sec(sig),
                        self.server_signals_dropped
                            .filter(|d| *d > 0)
                            .map(|d| format!(", {d} dropped"))
                            .unwrap_or_default()
                    ),
                    _ => String::new(),
                }
            );
            s += &format!(
                "    per frame  {:.2} µs server CPU per delivered frame (msg + read + signal: {:.0}/s) = {:.0} frames/s per core\n",
                self.cpu_us_per_frame(),
                self.per_sec(self.frames_delivered()),
                1e6 / self.cpu_us_per_frame().max(1e-9)
            );
        }
        s += &format!("    clients    CPU {:.1}% of one core\n", 100.0 * self.client_util());
        s += &format!(
            "    integrity  {} gaps, {} errors, {} out-of-order seqs, {} strays, {} missing deliveries\n",
            self.gaps, self.errors, self.seq_errors, self.strays, self.missing
        );
        s
    }

    fn json(&self) -> serde_json::Value {
        let r = |x: f64| (x * 10.0).round() / 10.0;
        let r3 = |x: f64| (x * 1000.0).round() / 1000.0;
        let (mode, rate, window) = match self.mode {
            Mode::Closed { window } => ("closed", None, Some(window)),
            Mode::Open { rate } => ("open", Some(rate), None),
        };
        serde_json::json!({
            "mode": mode, "rate": rate, "window": window, "secs": r3(self.secs),
            "sent": self.sent, "acks": self.acks, "acks_in_window": self.acks_in_window,
            "acks_per_sec": r(self.acks_per_sec()),
            "msgs": self.msgs, "msgs_in_window": self.msgs_in_window,
            "deliveries_per_sec": r(self.deliveries_per_sec()),
            "server_delivered_in_window": self.server_delivered,
            "deliver_latency": self.deliver.json(), "ack_latency": self.ack.json(),
            "arrival_latency": self.arrival.map(|a| a.json()),
            "server_cpu_util": r3(self.server_util()),
            "server_cpu_us_per_delivery": r3(self.cpu_us_per_delivery()),
            "deliveries_per_core_sec": r(self.deliveries_per_core_sec()),
            "client_cpu_util": r3(self.client_util()),
            "gaps": self.gaps, "errors": self.errors, "seq_errors": self.seq_errors,
            "strays": self.strays, "unacked": self.unacked, "missing": self.missing,
            "server_gaps": self.server_gaps,
            "server_frames_per_write": self.frames_per_write().map(r3),
            "reads_sent": self.reads_sent, "signals_sent": self.signals_sent,
            "read_frames": self.reads, "read_frames_in_window": self.reads_in_window,
            "read_frames_per_sec": r(self.per_sec(self.reads_in_window)),
            "signal_frames": self.signals, "signal_frames_in_window": self.signals_in_window,
            "signal_frames_per_sec": r(self.per_sec(self.signals_in_window)),
            "server_signals_delivered_in_window": self.server_signals,
            "server_read_marks_in_window": self.server_read_marks,
            "server_signals_dropped": self.server_signals_dropped,
            "frames_delivered_in_window": self.frames_delivered(),
            "server_cpu_us_per_frame": r3(self.cpu_us_per_frame()),
        })
    }
}

/// Everything the scenario measured.
#[derive(Debug, Clone)]
pub struct Report {
    pub plan: Plan,
    /// Connections per user, and the mix asked for (frames per send).
    pub devices: usize,
    pub reads: f64,
    pub signals: f64,
    pub body_bytes: usize,
    pub procs: usize,
    pub server_pid: u32,
    pub server_cpu: Option<usize>,
    pub client_cpu: Option<usize>,
    pub setup_secs: f64,
    pub connect_secs: f64,
    pub phases: Vec<Phase>,
}

impl Report {
    pub fn human(&self) -> String {
        let p = &self.plan;
        let mut s = format!(
            "ringpush-bench im: {} in {} conversations of {} members, {} senders, {}-byte bodies; \
             {} client process(es) ({}); server pid {} ({})\n",
            match self.devices {
                1 => format!("{} connections", p.users),
                d => format!("{} users x {d} devices", p.users),
            },
            p.convs,
            p.members,
            p.senders,
            self.body_bytes,
            self.procs,
            pin_name(self.client_cpu),
            self.server_pid,
            pin_name(self.server_cpu)
        );
        if self.devices > 1 || self.reads > 0.0 || self.signals > 0.0 {
            s += &format!(
                "  mix        {} device(s) per user ({} connections); per send {} read(s) and {} signal(s)\n",
                self.devices,
                p.users * self.devices,
                self.reads,
                self.signals
            );
        }
        s += &format!(
            "  setup      memberships in {:.1} s; {} connections up and synced in {:.1} s\n",
            self.setup_secs,
            p.users * self.devices,
            self.connect_secs
        );
        for phase in &self.phases {
            s += &phase.human();
        }
        if let [sat, lat] = self.phases.as_slice() {
            s += &format!(
                "  summary    saturation {:.0} deliveries/s (server CPU {:.0}%, {:.0}/s per core); \
                 at {:.0} sends/s p99 send->deliver {}\n",
                sat.deliveries_per_sec(),
                100.0 * sat.server_util(),
                sat.deliveries_per_core_sec(),
                lat.acks_per_sec(),
                duration_us(lat.deliver.p99)
            );
        }
        s
    }

    pub fn json(&self) -> String {
        let p = &self.plan;
        serde_json::json!({
            "scenario": "im",
            "conns": p.users, "convs": p.convs, "members": p.members, "senders": p.senders,
            "body_bytes": self.body_bytes, "procs": self.procs,
            "devices": self.devices, "reads": self.reads, "signals": self.signals,
            "server": { "pid": self.server_pid, "cpu": self.server_cpu },
            "client_cpu": self.client_cpu,
            "setup_secs": (self.setup_secs * 100.0).round() / 100.0,
            "connect_secs": (self.connect_secs * 100.0).round() / 100.0,
            "phases": self.phases.iter().map(Phase::json).collect::<Vec<_>>(),
        })
        .to_string()
    }
}

/// Runs the scenario: prints the summary (and the JSON line) and returns the report.
pub fn run(args: ImArgs) -> Result<Report, Error> {
    check(&args)?;
    let mut target = args.target.open()?;
    let result =
        measure(&args, std::slice::from_mut(&mut target.server), target.server_cpu, target.client_cpu);
    if result.is_err() {
        let tail = target.server.log_tail(15);
        if !tail.is_empty() {
            eprintln!("ringpush-bench: the server's log ends with:\n{tail}");
        }
    }
    result
}

fn check(args: &ImArgs) -> Result<(), Error> {
    let usage = |m: &str| Err(Error::Usage(m.into()));
    if args.conns == 0 || args.convs == 0 || args.members == 0 {
        return usage("--conns, --convs and --members must be at least 1");
    }
    if args.members > args.conns {
        return usage("--members cannot be more than --conns (one connection per user)");
    }
    if senders(args) == 0 || senders(args) > args.conns {
        return usage("--senders must be 1..=conns");
    }
    if args.duration == 0 || args.clients.procs == Some(0) || args.window == 0 {
        return usage("--duration, --procs and --window must be at least 1");
    }
    if args.rate == Some(0) || args.latency_rate == Some(0) {
        return usage("a rate must be at least 1 send a second");
    }
    if args.devices == 0 {
        return usage("--devices must be at least 1");
    }
    if !(args.reads.is_finite() && args.reads >= 0.0 && args.signals.is_finite() && args.signals >= 0.0) {
        return usage("--reads and --signals must be 0 or more");
    }
    if args.clients.body_bytes < 32 {
        return usage("--body-bytes must be at least 32 (the timestamp lives in the body)");
    }
    Ok(())
}

fn senders(args: &ImArgs) -> usize {
    args.senders.unwrap_or(args.convs.min(args.conns))
}

/// Runs the scenario's phases against `servers`: one, or the nodes of a cluster (users
/// spread over them by index, memberships set through the first; CPU time and counters
/// are their sums).
pub fn measure(
    args: &ImArgs,
    servers: &mut [Server],
    server_cpu: Option<usize>,
    client_cpu: Option<usize>,
) -> Result<Report, Error> {
    let server = &servers[0];
    let plan = Plan {
        users: args.conns,
        convs: args.convs,
        members: args.members,
        senders: senders(args),
        tag: crowd::run_tag(),
    };
    let started = Instant::now();
    crowd::set_memberships(server, &args.target.api_key, &plan)?;
    let setup_secs = started.elapsed().as_secs_f64();
    let mut setup = args.clients.crowd(server.client, &plan, &args.target.secret, client_cpu, false);
    setup.also = servers[1..].iter().map(|s| s.client).collect();
    (setup.devices, setup.reads, setup.signals) = (args.devices, args.reads, args.signals);
    if args.clients.procs.is_none() {
        setup.procs = crowd::default_procs(setup.conns());
    }
    setup.procs = setup.procs.max(servers.len());
    let mut crowd = Crowd::start(&setup)?;
    eprintln!(
        "ringpush-bench im: {} connections up and synced in {:.1} s",
        crowd.connected, crowd.connect_secs
    );

    let receivers = plan.receivers_per_send(args.devices) as u64;
    let mut phases = Vec::new();
    let duration = Duration::from_secs(args.duration);
    match args.rate {
        Some(rate) => phases.push(phase(servers, &mut crowd, receivers, Mode::Open { rate }, duration)?),
        None => {
            let sat = phase(servers, &mut crowd, receivers, Mode::Closed { window: args.window }, duration)?;
            let half = ((sat.acks_per_sec() / 2.0).round() as u64).max(1);
            let rate = args.latency_rate.unwrap_or(half);
            phases.push(sat);
            if !args.no_latency_phase {
                phases.push(phase(servers, &mut crowd, receivers, Mode::Open { rate }, duration)?);
            }
        }
    }
    crowd.workers.stop();
    if !servers.iter_mut().all(|s| s.alive()) {
        return Err(Error::Server("a server exited during the run".into()));
    }
    let server = &servers[0];
    let report = Report {
        plan,
        devices: args.devices,
        reads: args.reads,
        signals: args.signals,
        body_bytes: args.clients.body_bytes,
        procs: crowd.procs,
        server_pid: server.pid,
        server_cpu,
        client_cpu,
        setup_secs,
        connect_secs: crowd.connect_secs,
        phases,
    };
    crate::server::print_report(&report.human(), &report.json(), args.clients.json);
    Ok(report)
}

/// Every server's `/metrics`.
fn all_metrics(servers: &[Server]) -> Result<Vec<Option<Metrics>>, Error> {
    servers.iter().map(|s| s.metrics()).collect()
}

/// The servers' CPU time together.
fn all_cpu(servers: &[Server]) -> Result<Duration, Error> {
    servers.iter().map(|s| s.cpu_time()).sum()
}

/// Bound on the wait for a phase's answers after its window: the clients' drain bound
/// (5 s) and room for a loaded machine.
const PHASE_ANSWER_LIMIT: Duration = Duration::from_secs(20);

/// Runs one load phase and gathers what every client process measured.
fn phase(
    servers: &[Server],
    crowd: &mut Crowd,
    receivers: u64,
    mode: Mode,
    duration: Duration,
) -> Result<Phase, Error> {
    eprintln!(
        "ringpush-bench im: {} ...",
        match mode {
            Mode::Closed { window } => format!("saturation phase (closed loop, window {window})"),
            Mode::Open { rate } => format!("open-loop phase at {rate} sends/s"),
        }
    );
    let (rate, window) = match mode {
        Mode::Closed { window } => (0, window),
        Mode::Open { rate } => (rate, 0),
    };
    let metrics_before = all_metrics(servers)?;
    let server_cpu_before = all_cpu(servers)?;
    let client_cpu_before = crowd.cpu_time();
    let started = Instant::now();
    crowd.workers.send(&format!("go {rate} {window} {}", duration.as_millis()))?;
    // The clients time the window themselves; the parent samples the CPU over the same span.
    thread::sleep(duration);
    let server_cpu = all_cpu(servers)?.saturating_sub(server_cpu_before);
    let client_cpu = crowd.cpu_time().saturating_sub(client_cpu_before);
    let metrics_window = all_metrics(servers)?;
    let secs = started.elapsed().as_secs_f64();

    let done = crowd.workers.expect("done", PHASE_ANSWER_LIMIT)?;
    let mut deliver = Latency::new();
    let mut arrival = Latency::new();
    let mut ack = Latency::new();
    for _ in 0..3 {
        for line in crowd.workers.expect_lines("hist", Duration::from_secs(10))? {
            match Latency::parse_line(&line) {
                Some((name, h)) if name == "deliver" => deliver.merge(&h),
                Some((name, h)) if name == "arrival" => arrival.merge(&h),
                Some((name, h)) if name == "ack" => ack.merge(&h),
                _ => return Err(Error::Worker(format!("unexpected histogram line {:.60}...", line))),
            }
        }
    }
    let metrics_after = all_metrics(servers)?;
    let sum = |m: &[Option<Metrics>], name: &str| -> Option<u64> {
        m.iter().map(|m| m.as_ref().map(|m| m.sum(name))).sum()
    };
    let rise = |a: &[Option<Metrics>], b: &[Option<Metrics>], name: &str| match (sum(a, name), sum(b, name)) {
        (Some(a), Some(b)) => Some(b.saturating_sub(a)),
        _ => None,
    };
    let acks = total(&done, "acks");
    let msgs = total(&done, "msgs");
    Ok(Phase {
        mode,
        secs,
        sent: total(&done, "sent"),
        acks,
        acks_in_window: total(&done, "acks_win"),
        msgs,
        msgs_in_window: total(&done, "msgs_win"),
        gaps: total(&done, "gaps"),
        errors: total(&done, "errors"),
        seq_errors: total(&done, "seq_errors"),
        strays: total(&done, "strays"),
        unacked: total(&done, "inflight"),
        missing: (acks * receivers) as i64 - msgs as i64,
        deliver: deliver.summary(),
        arrival: Some(arrival.summary()).filter(|a| a.count > 0),
        ack: ack.summary(),
        server_cpu,
        client_cpu,
        server_delivered: rise(&metrics_before, &metrics_window, "ringpush_messages_delivered_total"),
        server_gaps: rise(&metrics_before, &metrics_after, "ringpush_slow_consumer_gaps_total"),
        server_frames: rise(&metrics_before, &metrics_window, "ringpush_frames_out_total"),
        server_writes: rise(&metrics_before, &metrics_window, "ringpush_socket_writes_total"),
        reads_sent: total(&done, "reads_sent"),
        signals_sent: total(&done, "signals_sent"),
        reads: total(&done, "reads"),
        reads_in_window: total(&done, "reads_win"),
        signals: total(&done, "signals"),
        signals_in_window: total(&done, "signals_win"),
        server_signals: rise(&metrics_before, &metrics_window, "ringpush_signals_delivered_total"),
        server_read_marks: rise(&metrics_before, &metrics_window, "ringpush_read_marks_total"),
        server_signals_dropped: rise(&metrics_before, &metrics_after, "ringpush_signals_dropped_total"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        im: ImArgs,
    }

    fn parse(args: &[&str]) -> Result<ImArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("im").chain(args.iter().copied())).map(|c| c.im)
    }

    #[test]
    fn defaults_and_checks() {
        let a = parse(&[]).expect("parses");
        assert_eq!((a.conns, a.convs, a.members, senders(&a)), (10_000, 1000, 10, 1000));
        assert!(check(&a).is_ok());
        assert!(check(&parse(&["--members", "20000"]).unwrap()).is_err());
        assert!(check(&parse(&["--senders", "0"]).unwrap()).is_err());
        assert!(check(&parse(&["--body-bytes", "10"]).unwrap()).is_err());
        assert!(parse(&["--rate", "5", "--latency-rate", "6"]).is_err());
        assert!(parse(&["--url", "ws://127.0.0.1:1", "--pid", "1"]).is_err(), "--url needs --admin");
        assert_eq!(senders(&parse(&["--conns", "200", "--convs", "500"]).unwrap()), 200);
    }

    #[test]
    fn phase_arithmetic() {
        let p = Phase {
            mode: Mode::Open { rate: 10 },
            secs: 2.0,
            sent: 20,
            acks: 20,
            acks_in_window: 20,
            msgs: 180,
            msgs_in_window: 180,
            gaps: 0,
            errors: 0,
            seq_errors: 0,
            strays: 0,
            unacked: 0,
            missing: 0,
            deliver: Summary::default(),
            arrival: None,
            ack: Summary::default(),
            server_cpu: Duration::from_millis(1),
            client_cpu: Duration::from_millis(2),
            server_delivered: Some(200),
            server_gaps: Some(0),
            server_frames: Some(220),
            server_writes: Some(55),
            reads_sent: 0,
            signals_sent: 0,
            reads: 30,
            reads_in_window: 30,
            signals: 40,
            signals_in_window: 40,
            server_signals: Some(50),
            server_read_marks: Some(30),
            server_signals_dropped: Some(0),
        };
        assert_eq!(p.acks_per_sec(), 10.0);
        assert_eq!(p.deliveries_per_sec(), 90.0);
        assert_eq!(p.cpu_us_per_delivery(), 5.0);
        assert_eq!(p.deliveries_per_core_sec(), 200_000.0);
        assert_eq!(p.server_util(), 0.0005);
        assert_eq!(p.frames_per_write(), Some(4.0));
        assert!(!p.mixed());
        assert_eq!(p.frames_delivered(), 200 + 50 + 30);
        assert_eq!(p.cpu_us_per_frame(), 1000.0 / 280.0);
    }
}
