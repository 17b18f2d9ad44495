//! The client processes of the IM scenarios, as one crowd: their command lines from the
//! [`Plan`], the connect phase (every connection greeted and synced), and the CPU time
//! they use, which tells whether a run measured the server or its load generator.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::error::Error;
use crate::plan::Plan;
use crate::server;
use crate::workers::{shares, total, Workers};

/// Connections one client process holds at most by default (the open-file limit here is
/// 20000 per process).
pub const CONNS_PER_PROC: usize = 9000;

/// Connections per source address (the kernel's connect-time port search slows down past
/// about half of the 28k ephemeral ports of one address).
pub const CONNS_PER_SOURCE_IP: usize = 10_000;

/// Bound on the connect phase, handed to each client process (the parent adds 30 s).
const CONNECT_TIMEOUT_SECS: u64 = 180;

/// How the crowd is made.
#[derive(Debug, Clone)]
pub struct CrowdSetup<'a> {
    pub addr: SocketAddr,
    /// The other nodes' client listeners: users are spread over `addr` and these by
    /// index (user `i` on the `i % (1 + len)`-th), so every conversation spans nodes.
    pub also: Vec<SocketAddr>,
    pub plan: &'a Plan,
    pub secret: &'a str,
    pub cpu: Option<usize>,
    pub procs: usize,
    pub body_bytes: usize,
    /// Per-seq receipts (the fan-out scenario).
    pub per_seq: bool,
    /// Kernel arrival stamps on every read.
    pub kernel_stamps: bool,
    /// The clients poll instead of sleeping in epoll (`idle-worker --spin`).
    pub spin: bool,
    pub concurrency: usize,
    /// Connections per user (`im --devices`); the crowd holds `users * devices`.
    pub devices: usize,
    /// `read` and `signal` frames per message sent (`im --reads`, `--signals`).
    pub reads: f64,
    pub signals: f64,
}

impl CrowdSetup<'_> {
    /// Connections in the crowd.
    pub fn conns(&self) -> usize {
        self.plan.users * self.devices.max(1)
    }
}

/// The client side of the IM scenarios (`im`, `fanout`): how the crowd is run and reported.
#[derive(Debug, Clone, clap::Args)]
pub struct ClientArgs {
    /// Bytes of each message body (JSON `{"t":...,"p":"xx..."}`).
    #[arg(long, default_value_t = 100)]
    pub body_bytes: usize,
    /// Do not ask the kernel for receive stamps (send->arrival is then not measured).
    #[arg(long)]
    pub no_kernel_stamps: bool,
    /// Client processes [default: ceil(connections / 9000)].
    #[arg(long)]
    pub procs: Option<usize>,
    /// Handshakes in flight per client process.
    #[arg(long, default_value_t = 256)]
    pub concurrency: usize,
    /// The client processes poll instead of sleeping, so that the server's CPU time does not
    /// include waking them (on loopback the sending CPU runs the receiver's wake-up).
    #[arg(long)]
    pub client_spin: bool,
    /// Print one JSON line (after the human summary, which goes to stderr).
    #[arg(long)]
    pub json: bool,
}

impl ClientArgs {
    /// The crowd for `plan`: these options, the server's client listener and the secret.
    pub fn crowd<'a>(
        &self,
        addr: SocketAddr,
        plan: &'a Plan,
        secret: &'a str,
        cpu: Option<usize>,
        per_seq: bool,
    ) -> CrowdSetup<'a> {
        CrowdSetup {
            addr,
            also: Vec::new(),
            plan,
            secret,
            cpu,
            procs: self.procs.unwrap_or_else(|| default_procs(plan.users)),
            body_bytes: self.body_bytes,
            per_seq,
            kernel_stamps: !self.no_kernel_stamps,
            spin: self.client_spin,
            concurrency: self.concurrency,
            devices: 1,
            reads: 0.0,
            signals: 0.0,
        }
    }
}

/// The running client processes, all connected and synced.
pub struct Crowd {
    pub workers: Workers,
    pub procs: usize,
    pub connected: u64,
    pub connect_secs: f64,
    pids: Vec<u32>,
}

impl Crowd {
    /// Starts the processes and waits until every connection is up and synced; any
    /// connection that fails fails the run (its receipts would be missing).
    pub fn start(setup: &CrowdSetup<'_>) -> Result<Crowd, Error> {
        let users = setup.conns();
        let source_ips = users.div_ceil(CONNS_PER_SOURCE_IP).clamp(1, 254);
        let lists: Vec<Vec<OsString>> = shares(users, setup.procs)
            .into_iter()
            .map(|(first, count)| {
                let mut v: Vec<String> = vec![
                    "idle-worker".into(),
                    "--addr".into(),
                    setup.addr.to_string(),
                    "--path".into(),
                    "ws".into(),
                    "--count".into(),
                    count.to_string(),
                    "--first".into(),
                    first.to_string(),
                    "--user-prefix".into(),
                    "u".into(),
                    "--source-ips".into(),
                    source_ips.to_string(),
                    "--secret".into(),
                    setup.secret.into(),
                    "--concurrency".into(),
                    setup.concurrency.to_string(),
                    "--connect-timeout-secs".into(),
                    CONNECT_TIMEOUT_SECS.to_string(),
                    "--chat".into(),
                    "--plan-users".into(),
                    setup.plan.users.to_string(),
                    "--plan-convs".into(),
                    setup.plan.convs.to_string(),
                    "--plan-members".into(),
                    setup.plan.members.to_string(),
                    "--plan-senders".into(),
                    setup.plan.senders.to_string(),
                    "--plan-tag".into(),
                    setup.plan.tag.clone(),
                    "--body-bytes".into(),
                    setup.body_bytes.to_string(),
                ];
                if setup.devices > 1 {
                    v.push("--devices".into());
                    v.push(setup.devices.to_string());
                }
                if setup.reads > 0.0 {
                    v.push("--reads".into());
                    v.push(setup.reads.to_string());
                }
                if setup.signals > 0.0 {
                    v.push("--signals".into());
                    v.push(setup.signals.to_string());
                }
                if !setup.also.is_empty() {
                    v.push("--also".into());
                    v.push(setup.also.iter().map(|a| a.to_string()).collect::<Vec<_>>().join(","));
                }
                if setup.per_seq {
                    v.push("--per-seq".into());
                }
                if setup.kernel_stamps {
                    v.push("--kernel-stamps".into());
                }
                if setup.spin {
                    v.push("--spin".into());
                }
                if let Some(cpu) = setup.cpu {
                    v.push("--cpu".into());
                    v.push(cpu.to_string());
                }
                v.into_iter().map(OsString::from).collect()
            })
            .collect();
        let procs = lists.len();
        let started = Instant::now();
        let mut workers = Workers::spawn(lists)?;
        let replies = workers.expect("connected", Duration::from_secs(CONNECT_TIMEOUT_SECS + 30))?;
        let connect_secs = started.elapsed().as_secs_f64();
        let (connected, failed) = (total(&replies, "connected"), total(&replies, "failed"));
        if failed > 0 || connected != users as u64 {
            return Err(Error::Worker(format!(
                "{connected} of {users} connections up and synced, {failed} failed (reasons above)"
            )));
        }
        let pids = workers.pids();
        Ok(Crowd { workers, procs, connected, connect_secs, pids })
    }

    /// CPU time the client processes have used so far, all together.
    pub fn cpu_time(&self) -> Duration {
        self.pids.iter().filter_map(|pid| server::cpu_time(*pid).ok()).sum()
    }
}

/// Default client processes for `users` connections.
pub fn default_procs(users: usize) -> usize {
    users.div_ceil(CONNS_PER_PROC).max(1)
}

/// A prefix for conversation ids that no earlier run used.
pub fn run_tag() -> String {
    let secs =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    format!("b{}x{}", std::process::id(), secs % 1_000_000)
}

/// Sets every conversation's members through the admin API, in bodies of at most
/// `MEMBERS_PER_REQUEST` users.
pub fn set_memberships(server: &server::Server, api_key: &str, plan: &Plan) -> Result<(), Error> {
    for conv in 0..plan.convs {
        let users: Vec<String> = plan.members_of(conv).map(Plan::user_name).collect();
        server.set_members(api_key, &plan.conv_name(conv), &users, MEMBERS_PER_REQUEST)?;
    }
    Ok(())
}

/// Users per membership request: 2000 ids stay far below the API's 1 MiB body limit.
const MEMBERS_PER_REQUEST: usize = 2000;
