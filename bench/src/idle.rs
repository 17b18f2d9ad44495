//! The `idle` scenario: bytes of server memory per idle WebSocket connection.
//!
//! Method: RSS of the server before any connection (once ready), then with all N
//! connected, upgraded (greeted, on /ws), and after at least two heartbeats each have
//! been sent by the server, answered by the clients and read back by the server (its
//! pings and received-frames counters both rose by >= 2 per open connection).
//! `(RSS_N - RSS_0) / N` is the figure. Kernel socket memory (`/proc/net/sockstat`) is
//! reported beside it, not in it: it is not the server's user space, and on loopback it
//! holds both ends of every connection.
//!
//! With `--client-pings` (servers that send no pings of their own: the peers of
//! `bench/compare.sh`) the clients ping instead, twice, and the wait ends once every pong
//! is back. With `--raw` (a plain TCP echo) the same pings come back as bytes.
//!
//! With `--burst BYTES` (on /echo) every connection then sends one binary message of that
//! size and reads its echo back; after two more heartbeats the RSS is measured again, to
//! show whether the server gave the buffers of the burst back.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::error::Error;
use crate::fleet::Endpoint;
use crate::server::{self, ProcStatus, Server, ServerSetup, Slab, Sockstat};
use crate::target::PinArgs;
use crate::workers::{total, Workers};

/// Connections one client process holds at most by default: the open-file limit here is
/// 20000 per process and cannot be raised.
const CONNS_PER_PROC: usize = 9000;

/// Connections per source address by default: the kernel's connect-time port search
/// slows down sharply past about half of the 28k ephemeral ports of one address.
const CONNS_PER_SOURCE_IP: usize = 10_000;

/// The server's default `limits.max_message_bytes`; raised for a larger burst.
const DEFAULT_MAX_MESSAGE: usize = 64 * 1024;

/// Measure the server's memory per idle connection.
#[derive(Debug, Clone, clap::Args)]
pub struct IdleArgs {
    /// The ringpush binary to start (with a generated config: one shard, port 0).
    #[arg(long, value_name = "PATH", default_value = "target/release/ringpush")]
    pub server_bin: PathBuf,
    /// Measure a running server instead: its client listener, e.g. ws://127.0.0.1:8080.
    #[arg(long, value_name = "URL", requires = "pid")]
    pub url: Option<String>,
    /// With --url: the server's process id (its RSS is read from /proc).
    #[arg(long, requires = "url")]
    pub pid: Option<u32>,
    /// With --url: the server's admin listener, for /readyz and /metrics. Without it the
    /// heartbeat wait relies on the clients' count of answered pings alone.
    #[arg(long, value_name = "HOST:PORT", requires = "url")]
    pub admin: Option<SocketAddr>,
    /// Keep the started server's log (stderr) in FILE.
    #[arg(long, value_name = "FILE")]
    pub server_log: Option<PathBuf>,
    /// auth.secret the /ws tokens are signed with (must match a --url server's).
    #[arg(long, default_value = "ringpush-bench-secret")]
    pub secret: String,
    /// Connections to open.
    #[arg(long, default_value_t = 10_000)]
    pub conns: usize,
    /// Client processes [default: ceil(conns / 9000)].
    #[arg(long)]
    pub procs: Option<usize>,
    /// The endpoint: `ws` (authenticated clients) or `echo` (needs diagnostics.echo).
    #[arg(long, value_enum, default_value = "ws")]
    pub path: Endpoint,
    /// After the idle measurement, each connection sends one binary message of BYTES on
    /// /echo and reads it back; then memory is measured again. 0 = off.
    #[arg(long, value_name = "BYTES", default_value_t = 0)]
    pub burst: usize,
    #[command(flatten)]
    pub pin: PinArgs,
    /// Spread connections over the source addresses 127.0.0.1..=127.0.0.K, so the
    /// ephemeral ports of one source address never run out [default: ceil(conns / 10000)].
    #[arg(long, value_name = "K", value_parser = clap::value_parser!(u8).range(1..=254))]
    pub source_ips: Option<u8>,
    /// heartbeat.ping_interval_ms of the started server (with --url: what the server uses,
    /// to bound the waits).
    #[arg(long, default_value_t = 2000)]
    pub ping_interval_ms: u64,
    /// heartbeat.idle_timeout_ms of the started server.
    #[arg(long, default_value_t = 6000)]
    pub idle_timeout_ms: u64,
    /// Handshakes in flight per client process.
    #[arg(long, default_value_t = 256)]
    pub concurrency: usize,
    /// The clients send the heartbeats (two pings per connection, each answered before
    /// the next) instead of waiting for the server's: for servers that send no pings.
    #[arg(long)]
    pub client_pings: bool,
    /// With --url: the server is a plain TCP echo, no WebSocket (implies --client-pings).
    #[arg(long, requires = "url")]
    pub raw: bool,
    /// Print one JSON line (after the human summary, which goes to stderr).
    #[arg(long)]
    pub json: bool,
}

/// Everything measured, in bytes where it is memory.
#[derive(Debug, Clone)]
pub struct Report {
    pub path: Endpoint,
    pub conns: usize,
    pub procs: usize,
    pub server_pid: u32,
    pub server_cpu: Option<usize>,
    pub client_cpu: Option<usize>,
    pub connected: u64,
    pub failures: u64,
    pub connect_secs: f64,
    /// Connections that ended after being counted, up to the last measurement.
    pub dropped: u64,
    pub before: ProcStatus,
    /// Right after the connect phase, before the heartbeat wait.
    pub connected_status: ProcStatus,
    pub after: ProcStatus,
    pub heartbeat_secs: f64,
    /// The clients sent the heartbeats (`--client-pings`).
    pub client_pings: bool,
    pub sockstat_before: Sockstat,
    pub sockstat_after: Sockstat,
    /// Kernel socket objects (machine-wide), when /proc/slabinfo is readable.
    pub slab_before: Option<Slab>,
    pub slab_after: Option<Slab>,
    pub source_ips: u8,
    pub burst: Option<BurstReport>,
    /// `ringpush_codec_releases_total` rise over the run, if /metrics is known.
    pub codec_releases: Option<u64>,
    /// `ringpush_idle_drops_total` rise over the run: connections the server dropped for
    /// silence (a client that answers every ping should see none).
    pub idle_drops: Option<u64>,
}

#[derive(Debug, Clone)]
pub struct BurstReport {
    pub bytes: usize,
    pub ok: u64,
    pub failed: u64,
    pub secs: f64,
    pub after: ProcStatus,
    pub sockstat: Sockstat,
}

impl Report {
    pub fn connect_rate(&self) -> f64 {
        if self.connect_secs > 0.0 {
            self.connected as f64 / self.connect_secs
        } else {
            0.0
        }
    }

    fn per_conn(&self, before: u64, after: u64) -> f64 {
        (after as f64 - before as f64) / self.connected.max(1) as f64
    }

    pub fn bytes_per_conn(&self) -> f64 {
        self.per_conn(self.before.vm_rss, self.after.vm_rss)
    }

    pub fn anon_bytes_per_conn(&self) -> f64 {
        self.per_conn(self.before.rss_anon, self.after.rss_anon)
    }

    pub fn kernel_bytes_per_conn(&self) -> f64 {
        self.per_conn(self.sockstat_before.mem_bytes(), self.sockstat_after.mem_bytes())
    }

    pub fn slab_bytes_per_conn(&self) -> Option<f64> {
        Some(self.per_conn(self.slab_before?.total(), self.slab_after?.total()))
    }

    pub fn bytes_per_conn_after_burst(&self) -> Option<f64> {
        self.burst.as_ref().map(|b| self.per_conn(self.before.vm_rss, b.after.vm_rss))
    }

    /// After-burst bytes per connection over before-burst ones.
    pub fn burst_ratio(&self) -> Option<f64> {
        let before = self.bytes_per_conn();
        self.bytes_per_conn_after_burst().map(|after| if before > 0.0 { after / before } else { f64::NAN })
    }

    pub fn human(&self) -> String {
        let mut s = String::new();
        let pin = |c: Option<usize>| c.map_or("unpinned".to_string(), |c| format!("cpu {c}"));
        s += &format!(
            "ringpush-bench idle: {} connections on /{}, {} client process(es) ({}, {} source address(es)); \
             server pid {} ({})\n",
            self.conns,
            self.path.as_str(),
            self.procs,
            pin(self.client_cpu),
            self.source_ips,
            self.server_pid,
            pin(self.server_cpu),
        );
        s += &format!(
            "  connect     {} ok, {} failed in {:.2} s: {:.0} connections/s\n",
            self.connected,
            self.failures,
            self.connect_secs,
            self.connect_rate()
        );
        let beats = match self.client_pings {
            true => "2 client pings per connection answered",
            false => "2 per connection answered and read back",
        };
        s += &format!(
            "  heartbeats  {beats} within {:.1} s; {} connection(s) dropped\n",
            self.heartbeat_secs, self.dropped
        );
        s += &format!(
            "  server RSS  {} before, {} connected, {} after heartbeats\n",
            mib(self.before.vm_rss),
            mib(self.connected_status.vm_rss),
            mib(self.after.vm_rss)
        );
        s += &format!(
            "  per conn    {:.0} bytes of RSS per idle connection ({:.0} of RssAnon)\n",
            self.bytes_per_conn(),
            self.anon_bytes_per_conn()
        );
        s += &format!(
            "  kernel TCP  buffers {} -> {} pages ({:.0} bytes per connection), sockets in use {} -> {} \
             (sockstat; both ends; not in RSS)\n",
            self.sockstat_before.mem_pages,
            self.sockstat_after.mem_pages,
            self.kernel_bytes_per_conn(),
            self.sockstat_before.inuse,
            self.sockstat_after.inuse,
        );
        if let (Some(a), Some(b), Some(per)) = (self.slab_before, self.slab_after, self.slab_bytes_per_conn())
        {
            s += &format!(
                "  kernel objs TCP + sock_inode_cache slabs {} -> {}: {:.0} bytes per connection \
                 (both ends; machine-wide)\n",
                mib(a.total()),
                mib(b.total()),
                per
            );
        }
        if let Some(b) = &self.burst {
            s += &format!(
                "  burst       {} bytes each: {} ok, {} failed in {:.2} s; peak RSS of the run {}\n",
                b.bytes,
                b.ok,
                b.failed,
                b.secs,
                mib(b.after.vm_hwm)
            );
            s += &format!(
                "  after burst {} RSS after 2 more heartbeats: {:.0} bytes per connection, {:.2}x before{}\n",
                mib(b.after.vm_rss),
                self.bytes_per_conn_after_burst().unwrap_or(0.0),
                self.burst_ratio().unwrap_or(0.0),
                if self.burst_ratio().is_some_and(|r| r <= 1.25) {
                    " (within 1.25x)"
                } else {
                    " (over 1.25x)"
                }
            );
        }
        if let (Some(releases), Some(drops)) = (self.codec_releases, self.idle_drops) {
            s += &format!(
                "  server      {releases} codec releases, {drops} idle drops counted over the run\n"
            );
        }
        s
    }

    pub fn json(&self) -> String {
        let status = |p: &ProcStatus| {
            serde_json::json!({
                "vm_rss": p.vm_rss, "rss_anon": p.rss_anon, "rss_file": p.rss_file, "vm_hwm": p.vm_hwm,
            })
        };
        let sock = |k: &Sockstat| {
            serde_json::json!({
                "tcp_inuse": k.inuse, "tcp_alloc": k.alloc, "tcp_orphan": k.orphan, "tcp_tw": k.tw,
                "tcp_mem_pages": k.mem_pages, "tcp_mem_bytes": k.mem_bytes(),
            })
        };
        let round = |x: f64| (x * 10.0).round() / 10.0;
        let round2 = |x: f64| (x * 100.0).round() / 100.0;
        let slab =
            |k: &Option<Slab>| k.map(|k| serde_json::json!({ "tcp": k.tcp, "sock_inode": k.sock_inode }));
        let mut v = serde_json::json!({
            "scenario": "idle",
            "path": self.path.as_str(),
            "conns": self.conns,
            "procs": self.procs,
            "connected": self.connected,
            "failures": self.failures,
            "dropped": self.dropped,
            "connect_secs": round2(self.connect_secs),
            "connect_rate": round(self.connect_rate()),
            "rss_before": self.before.vm_rss,
            "rss_connected": self.connected_status.vm_rss,
            "rss_after": self.after.vm_rss,
            "rss_anon_before": self.before.rss_anon,
            "rss_anon_after": self.after.rss_anon,
            "bytes_per_conn": round(self.bytes_per_conn()),
            "anon_bytes_per_conn": round(self.anon_bytes_per_conn()),
            "heartbeat_secs": round(self.heartbeat_secs),
            "client_pings": self.client_pings,
            "sockstat": {
                "before": sock(&self.sockstat_before),
                "after": sock(&self.sockstat_after),
                "kernel_bytes_per_conn": round(self.kernel_bytes_per_conn()),
            },
            "kernel_slab": {
                "before": slab(&self.slab_before),
                "after": slab(&self.slab_after),
                "bytes_per_conn": self.slab_bytes_per_conn().map(round),
            },
            "source_ips": self.source_ips,
            "server": { "pid": self.server_pid, "before": status(&self.before), "after": status(&self.after) },
            "codec_releases": self.codec_releases,
            "idle_drops": self.idle_drops,
            "bytes_per_conn_after_burst": self.bytes_per_conn_after_burst().map(round),
        });
        if let Some(b) = &self.burst {
            v["burst"] = serde_json::json!({
                "bytes": b.bytes, "ok": b.ok, "failed": b.failed, "secs": round2(b.secs),
                "rss_after": b.after.vm_rss, "rss_peak": b.after.vm_hwm,
                "ratio": self.burst_ratio().map(|r| (r * 1000.0).round() / 1000.0),
                "sockstat_after": sock(&b.sockstat),
            });
        }
        v.to_string()
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

/// Runs the scenario: prints the summary (and the JSON line) and returns the report.
pub fn run(args: IdleArgs) -> Result<Report, Error> {
    check(&args)?;
    let (server_cpu, client_cpu) = args.pin.cpus()?;
    let mut server = match (&args.url, args.pid) {
        (Some(url), Some(pid)) => Server::attach(server::parse_ws_url(url)?, pid, args.admin)?,
        _ => {
            let setup = ServerSetup {
                secret: args.secret.clone(),
                ping_interval_ms: args.ping_interval_ms,
                idle_timeout_ms: args.idle_timeout_ms,
                echo: args.path == Endpoint::Echo,
                max_message_bytes: args.burst.max(DEFAULT_MAX_MESSAGE),
                send_rate_per_sec: None,
                signal_rate_per_sec: None,
                outbound_queue_bytes: None,
                cpu: server_cpu,
                log: args.server_log.clone(),
                node_id: "bench".into(),
                extra_toml: String::new(),
                extra_limits: String::new(),
                ports: (0, 0),
            };
            Server::start(&args.server_bin, &setup)?
        }
    };
    let server_cpu = if args.url.is_some() { server::pinned_cpu(server.pid) } else { server_cpu };
    let result = measure(&args, &mut server, server_cpu, client_cpu);
    if result.is_err() {
        let tail = server.log_tail(15);
        if !tail.is_empty() {
            eprintln!("ringpush-bench: the server's log ends with:\n{tail}");
        }
    }
    result
}

fn check(args: &IdleArgs) -> Result<(), Error> {
    if args.conns == 0 {
        return Err(Error::Usage("--conns must be at least 1".into()));
    }
    if args.procs == Some(0) {
        return Err(Error::Usage("--procs must be at least 1".into()));
    }
    if args.raw && args.burst > 0 {
        return Err(Error::Usage("--burst needs a WebSocket server, not --raw".into()));
    }
    if args.burst > 0 && args.path != Endpoint::Echo {
        return Err(Error::Usage("--burst needs --path echo (/ws refuses binary messages with 1003)".into()));
    }
    if args.idle_timeout_ms <= args.ping_interval_ms {
        return Err(Error::Usage("--idle-timeout-ms must be greater than --ping-interval-ms".into()));
    }
    let procs = procs(args);
    let per_proc = args.conns.div_ceil(procs);
    if let Some(limit) = open_files_limit() {
        if per_proc as u64 + 64 > limit {
            return Err(Error::Usage(format!(
                "{per_proc} connections per client process, but the open-file limit is {limit}: raise --procs"
            )));
        }
        if args.url.is_none() && args.conns as u64 + 64 > limit {
            eprintln!(
                "ringpush-bench: warning: the server inherits an open-file limit of {limit}, \
                 too few for {} connections",
                args.conns
            );
        }
    }
    Ok(())
}

fn source_ips(args: &IdleArgs) -> u8 {
    args.source_ips.unwrap_or_else(|| args.conns.div_ceil(CONNS_PER_SOURCE_IP).clamp(1, 254) as u8)
}

fn procs(args: &IdleArgs) -> usize {
    args.procs.unwrap_or_else(|| args.conns.div_ceil(CONNS_PER_PROC)).min(args.conns)
}

fn measure(
    args: &IdleArgs,
    server: &mut Server,
    server_cpu: Option<usize>,
    client_cpu: Option<usize>,
) -> Result<Report, Error> {
    let procs = procs(args);
    let first_metrics = server.metrics()?;
    let before = server.status()?;
    let sockstat_before = server::sockstat()?;
    let slab_before = server::slab();

    let started = Instant::now();
    let mut workers = Workers::spawn(worker_args(args, server.client, procs, client_cpu))?;
    let connected = workers.expect("connected", Duration::from_secs(CONNECT_TIMEOUT_SECS + 30))?;
    let connect_secs = started.elapsed().as_secs_f64();
    let connected_status = server.status()?;
    let (ok, failures) = (total(&connected, "connected"), total(&connected, "failed"));
    if ok == 0 {
        return Err(Error::Worker(format!(
            "no connection succeeded ({failures} failed); see the lines above"
        )));
    }

    let beat = Heartbeats { limit: Heartbeats::limit(args.ping_interval_ms), by_clients: client_pings(args) };
    let waited = beat.wait(server, &mut workers)?;
    let after = server.status()?;
    let sockstat_after = server::sockstat()?;
    let slab_after = server::slab();
    let mut dropped = ok.saturating_sub(waited.open);

    let mut burst = None;
    if args.burst > 0 {
        let limit = Duration::from_secs(BURST_TIMEOUT_SECS + 30);
        let started = Instant::now();
        let done = workers.ask(&format!("burst {}", args.burst), "burst", limit)?;
        let secs = started.elapsed().as_secs_f64();
        let waited = beat.wait(server, &mut workers)?;
        dropped = ok.saturating_sub(waited.open);
        burst = Some(BurstReport {
            bytes: args.burst,
            ok: total(&done, "ok"),
            failed: total(&done, "failed"),
            secs,
            after: server.status()?,
            sockstat: server::sockstat()?,
        });
    }
    let last_metrics = server.metrics()?;
    workers.stop();
    if !server.alive() {
        return Err(Error::Server("the server exited during the run".into()));
    }

    let rise = |name: &str| match (&first_metrics, &last_metrics) {
        (Some(a), Some(b)) => Some(b.sum(name).saturating_sub(a.sum(name))),
        _ => None,
    };
    let codec_releases = rise("ringpush_codec_releases_total");
    let idle_drops = rise("ringpush_idle_drops_total");
    let report = Report {
        path: args.path,
        conns: args.conns,
        procs,
        server_pid: server.pid,
        server_cpu,
        client_cpu,
        connected: ok,
        failures,
        connect_secs,
        dropped,
        before,
        connected_status,
        after,
        heartbeat_secs: waited.secs,
        client_pings: client_pings(args),
        sockstat_before,
        sockstat_after,
        slab_before,
        slab_after,
        source_ips: source_ips(args),
        burst,
        codec_releases,
        idle_drops,
    };
    server::print_report(&report.human(), &report.json(), args.json);
    Ok(report)
}

/// Bound on the clients' connect phase, passed to each of them.
const CONNECT_TIMEOUT_SECS: u64 = 180;

/// Bound on one burst, passed to each client process.
const BURST_TIMEOUT_SECS: u64 = 120;

/// The command line of each client process: its share of the connections.
fn worker_args(args: &IdleArgs, addr: SocketAddr, procs: usize, cpu: Option<usize>) -> Vec<Vec<OsString>> {
    let mut first = 0;
    (0..procs)
        .map(|i| {
            let count = args.conns / procs + usize::from(i < args.conns % procs);
            let mut v: Vec<OsString> = vec![
                "idle-worker".into(),
                "--addr".into(),
                addr.to_string().into(),
                "--path".into(),
                args.path.as_str().into(),
                "--count".into(),
                count.to_string().into(),
                "--first".into(),
                first.to_string().into(),
                "--source-ips".into(),
                source_ips(args).to_string().into(),
                "--secret".into(),
                args.secret.clone().into(),
                "--concurrency".into(),
                args.concurrency.to_string().into(),
                "--connect-timeout-secs".into(),
                CONNECT_TIMEOUT_SECS.to_string().into(),
                "--burst-timeout-secs".into(),
                BURST_TIMEOUT_SECS.to_string().into(),
            ];
            if args.raw {
                v.push("--raw".into());
            }
            if let Some(cpu) = cpu {
                v.push("--cpu".into());
                v.push(cpu.to_string().into());
            }
            first += count;
            v
        })
        .collect()
}

fn client_pings(args: &IdleArgs) -> bool {
    args.client_pings || args.raw
}

/// Waits for two heartbeats per open connection, seen from both sides.
struct Heartbeats {
    limit: Duration,
    /// The clients send them (`--client-pings`).
    by_clients: bool,
}

/// What a heartbeat wait found.
struct Waited {
    /// Connections open at the end of the wait (all clients' count).
    open: u64,
    secs: f64,
}

impl Heartbeats {
    fn limit(ping_interval_ms: u64) -> Duration {
        // Two intervals are enough in principle; the rest is room for a busy machine.
        Duration::from_millis(5 * ping_interval_ms) + Duration::from_secs(20)
    }

    /// Until the server's `ringpush_pings_sent_total` and `ringpush_frames_in_total` (the
    /// pongs read back) and the clients' pong count have each risen by twice the open
    /// connections. Without /metrics, the clients' count alone.
    fn wait(&self, server: &Server, workers: &mut Workers) -> Result<Waited, Error> {
        if self.by_clients {
            return self.ping(workers);
        }
        let started = Instant::now();
        let stats_limit = Duration::from_secs(10);
        let base_metrics = server.metrics()?;
        let base = workers.ask("stats", "stats", stats_limit)?;
        let base_pongs = total(&base, "pongs");
        loop {
            let stats = workers.ask("stats", "stats", stats_limit)?;
            let open = total(&stats, "open");
            if open == 0 {
                return Err(Error::Worker("every connection has closed".into()));
            }
            let want = 2 * open;
            let mut done = total(&stats, "pongs").saturating_sub(base_pongs) >= want;
            if let (Some(base), Some(now)) = (&base_metrics, server.metrics()?) {
                let rise = |name: &str| now.sum(name).saturating_sub(base.sum(name));
                done &= rise("ringpush_pings_sent_total") >= want && rise("ringpush_frames_in_total") >= want;
            }
            if done {
                return Ok(Waited { open, secs: started.elapsed().as_secs_f64() });
            }
            if started.elapsed() > self.limit {
                return Err(Error::Timeout {
                    what: format!("two heartbeats answered on each of {open} connections"),
                    secs: self.limit.as_secs(),
                });
            }
            // Counters are polled: neither side pushes an event when they move.
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Heartbeats {
    /// Two rounds of client pings; every pong must come back within the bound.
    fn ping(&self, workers: &mut Workers) -> Result<Waited, Error> {
        let started = Instant::now();
        let ms = self.limit.as_millis() as u64;
        for _ in 0..2 {
            let pinged =
                workers.ask(&format!("ping {ms}"), "pinged", self.limit + Duration::from_secs(10))?;
            let missing = total(&pinged, "missing");
            if missing > 0 {
                return Err(Error::Timeout {
                    what: format!("{missing} pong(s) of the clients' pings"),
                    secs: self.limit.as_secs(),
                });
            }
        }
        let stats = workers.ask("stats", "stats", Duration::from_secs(10))?;
        Ok(Waited { open: total(&stats, "open"), secs: started.elapsed().as_secs_f64() })
    }
}

fn open_files_limit() -> Option<u64> {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 || lim.rlim_cur == libc::RLIM_INFINITY {
        return None;
    }
    Some(lim.rlim_cur)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        idle: IdleArgs,
    }

    fn parse(args: &[&str]) -> IdleArgs {
        Cli::try_parse_from(std::iter::once("idle").chain(args.iter().copied())).expect("parses").idle
    }

    #[test]
    fn shares_cover_every_connection_once() {
        let args = parse(&["--conns", "19000"]);
        assert_eq!(procs(&args), 3);
        let lists = worker_args(&args, "127.0.0.1:1".parse().unwrap(), 3, Some(1));
        let value = |v: &Vec<OsString>, name: &str| -> usize {
            let at = v.iter().position(|a| a == name).expect("present");
            v[at + 1].to_str().unwrap().parse().unwrap()
        };
        let counts: Vec<usize> = lists.iter().map(|v| value(v, "--count")).collect();
        let firsts: Vec<usize> = lists.iter().map(|v| value(v, "--first")).collect();
        assert_eq!(counts, vec![6334, 6333, 6333]);
        assert_eq!(firsts, vec![0, 6334, 12667]);
        assert_eq!(procs(&parse(&["--conns", "10000"])), 2);
        assert_eq!(procs(&parse(&["--conns", "9000"])), 1);
        assert_eq!(source_ips(&parse(&["--conns", "10000"])), 1);
        assert_eq!(source_ips(&parse(&["--conns", "19000"])), 2);
        assert_eq!(source_ips(&parse(&["--conns", "19000", "--source-ips", "5"])), 5);
    }

    #[test]
    fn options_are_checked() {
        assert!(check(&parse(&["--burst", "65536"])).is_err());
        assert!(check(&parse(&["--burst", "65536", "--path", "echo"])).is_ok());
        assert!(check(&parse(&["--ping-interval-ms", "6000"])).is_err());
        assert!(Cli::try_parse_from(["idle", "--url", "ws://127.0.0.1:1"]).is_err(), "--url needs --pid");
    }
}
