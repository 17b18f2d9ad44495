//! The server under test as the IM scenarios' command line names it: started by the bench
//! (pinned, one shard, a generated config tuned for load) or attached to with
//! `--url/--pid/--admin`; and which CPU the clients get.

use std::net::SocketAddr;
use std::path::PathBuf;

use crate::error::Error;
use crate::server::{self, Server, ServerSetup, API_KEY};

/// `limits.send_rate_per_sec` of a started server: high enough never to limit a run.
const SEND_RATE_PER_SEC: u32 = 1_000_000;

/// `limits.outbound_queue_bytes` of a started server: room for a burst to one connection.
const OUTBOUND_QUEUE_BYTES: usize = 4 << 20;

/// Where the server comes from and where everything runs.
#[derive(Debug, Clone, clap::Args)]
pub struct TargetArgs {
    /// The ringpush binary to start (with a generated config: one shard, port 0).
    #[arg(long, value_name = "PATH", default_value = "target/release/ringpush")]
    pub server_bin: PathBuf,
    /// Measure a running server instead: its client listener, e.g. ws://127.0.0.1:8080.
    /// Its limits.send_rate_per_sec must not limit the run.
    #[arg(long, value_name = "URL", requires_all = ["pid", "admin"])]
    pub url: Option<String>,
    /// With --url: the server's process id (its CPU time is read from /proc).
    #[arg(long, requires = "url")]
    pub pid: Option<u32>,
    /// With --url: the server's admin listener (memberships, /metrics).
    #[arg(long, value_name = "HOST:PORT", requires = "url")]
    pub admin: Option<SocketAddr>,
    /// With --url: the server's api_key.
    #[arg(long, default_value = API_KEY)]
    pub api_key: String,
    /// auth.secret the /ws tokens are signed with (must match a --url server's).
    #[arg(long, default_value = "ringpush-bench-secret")]
    pub secret: String,
    /// Keep the started server's log (stderr) in FILE.
    #[arg(long, value_name = "FILE")]
    pub server_log: Option<PathBuf>,
    #[command(flatten)]
    pub pin: PinArgs,
}

/// The server and the CPUs of the run.
pub struct Target {
    pub server: Server,
    /// `None` for an attached server or without pinning.
    pub server_cpu: Option<usize>,
    pub client_cpu: Option<usize>,
}

impl TargetArgs {
    /// Starts or attaches to the server.
    pub fn open(&self) -> Result<Target, Error> {
        let (server_cpu, client_cpu) = self.pin.cpus()?;
        let server = match (&self.url, self.pid) {
            (Some(url), Some(pid)) => Server::attach(server::parse_ws_url(url)?, pid, self.admin)?,
            _ => {
                let setup = ServerSetup {
                    secret: self.secret.clone(),
                    // The server's defaults: heartbeats stay out of the figures.
                    ping_interval_ms: 25_000,
                    idle_timeout_ms: 60_000,
                    echo: false,
                    max_message_bytes: 64 * 1024,
                    send_rate_per_sec: Some(SEND_RATE_PER_SEC),
                    signal_rate_per_sec: Some(SEND_RATE_PER_SEC),
                    outbound_queue_bytes: Some(OUTBOUND_QUEUE_BYTES),
                    cpu: server_cpu,
                    log: self.server_log.clone(),
                    node_id: "bench".into(),
                    extra_toml: String::new(),
                    extra_limits: String::new(),
                    ports: (0, 0),
                };
                Server::start(&self.server_bin, &setup)?
            }
        };
        // An attached server: the CPU it was pinned to by whoever started it, if one.
        let server_cpu = if self.url.is_some() { server::pinned_cpu(server.pid) } else { server_cpu };
        Ok(Target { server, server_cpu, client_cpu })
    }
}

/// `cpu N` or `unpinned`.
pub fn pin_name(cpu: Option<usize>) -> String {
    cpu.map_or("unpinned".to_string(), |c| format!("cpu {c}"))
}

/// The server of the `echo` and `upgrades` scenarios: a ringpush this bench starts (one
/// shard, `diagnostics.echo`), or any server named by `--url`/`--pid` that echoes on
/// `/echo` (ringpush or a peer; see `bench/peers/`), or with `--raw` a plain TCP echo.
#[derive(Debug, Clone, clap::Args)]
pub struct EchoTargetArgs {
    /// The ringpush binary to start (with a generated config: one shard, /echo on, port 0).
    #[arg(long, value_name = "PATH", default_value = "target/release/ringpush")]
    pub server_bin: PathBuf,
    /// Measure a running server instead: its listener, e.g. ws://127.0.0.1:8080. The
    /// clients upgrade on /echo.
    #[arg(long, value_name = "URL", requires = "pid")]
    pub url: Option<String>,
    /// With --url: the server's process id (its CPU time is read from /proc).
    #[arg(long, requires = "url")]
    pub pid: Option<u32>,
    /// With --url, for a ringpush: its admin listener, to wait for /readyz first.
    #[arg(long, value_name = "HOST:PORT", requires = "url")]
    pub admin: Option<SocketAddr>,
    /// With --url: the server is a plain TCP echo, no WebSocket (the ceiling).
    #[arg(long, requires = "url")]
    pub raw: bool,
    /// Keep the started server's log (stderr) in FILE.
    #[arg(long, value_name = "FILE")]
    pub server_log: Option<PathBuf>,
    #[command(flatten)]
    pub pin: PinArgs,
}

impl EchoTargetArgs {
    /// Starts or attaches to the server; a started one takes messages of
    /// `max_message_bytes` (at least its default of 64 KiB).
    pub fn open(&self, max_message_bytes: usize) -> Result<Target, Error> {
        let (server_cpu, client_cpu) = self.pin.cpus()?;
        let server = match (&self.url, self.pid) {
            (Some(url), Some(pid)) => Server::attach(server::parse_ws_url(url)?, pid, self.admin)?,
            _ => {
                let setup = ServerSetup {
                    secret: "ringpush-bench-secret".into(),
                    // The server's defaults: heartbeats stay out of the figures.
                    ping_interval_ms: 25_000,
                    idle_timeout_ms: 60_000,
                    echo: true,
                    max_message_bytes: max_message_bytes.max(64 * 1024),
                    send_rate_per_sec: None,
                    signal_rate_per_sec: None,
                    outbound_queue_bytes: None,
                    cpu: server_cpu,
                    log: self.server_log.clone(),
                    node_id: "bench".into(),
                    extra_toml: String::new(),
                    extra_limits: String::new(),
                    ports: (0, 0),
                };
                Server::start(&self.server_bin, &setup)?
            }
        };
        // An attached server: the CPU it was pinned to by whoever started it, if one.
        let server_cpu = if self.url.is_some() { server::pinned_cpu(server.pid) } else { server_cpu };
        Ok(Target { server, server_cpu, client_cpu })
    }
}

/// Where the server (or `floor`'s sender) and the client processes run; shared by every
/// scenario's command line.
#[derive(Debug, Clone, clap::Args)]
pub struct PinArgs {
    /// Pin the server (floor: the sender) to this CPU [default: the first allowed CPU when there are 2+].
    #[arg(long, value_name = "CPU")]
    pub pin_server: Option<usize>,
    /// Pin the client processes to this CPU [default: the second allowed CPU when there are 2+].
    #[arg(long, value_name = "CPU")]
    pub pin_client: Option<usize>,
    /// Pin nothing.
    #[arg(long, conflicts_with_all = ["pin_server", "pin_client"])]
    pub no_pin: bool,
}

impl PinArgs {
    /// The server's and the clients' CPUs ([`server::pick_cpus`]).
    pub fn cpus(&self) -> Result<(Option<usize>, Option<usize>), Error> {
        server::pick_cpus(self.no_pin, self.pin_server, self.pin_client)
    }
}
