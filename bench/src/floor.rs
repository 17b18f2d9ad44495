//! The `floor` scenario: what the kernel alone charges a sender for one small TCP write to
//! each of many loopback sockets. No WebSocket and no ringpush: this is the floor under
//! ringpush's server CPU per delivery in `fanout`, which no server on this machine goes below.
//!
//! Method: this process listens on 127.0.0.1:0 and accepts `--conns` connections from
//! receiver processes (`floor-worker`, [`crate::sink`]; ceil(N / 9000) of them, on the
//! client CPU), setting TCP_NODELAY and non-blocking on each as ringpush does. The sender is
//! this process's main thread, pinned to the server CPU. Round i: it writes one
//! `--size`-byte buffer to every connection, one `send(MSG_DONTWAIT | MSG_NOSIGNAL)` each,
//! as ringpush writes one frame per delivery; every receiver process answers once each of
//! its connections has read i buffers (or after `--timeout-ms`); only then does round i+1
//! start. With `--burst` the rounds go back to back and the run waits once for them all.
//!
//! Sender CPU is the main thread's own (`CLOCK_THREAD_CPUTIME_ID`, user + system in ns;
//! the split from `getrusage(RUSAGE_THREAD)`), taken around each send loop: neither the
//! parent's other threads (the readers of the receivers' pipes, kept on the client CPU)
//! nor the hand-offs between rounds count. On loopback it includes the receiving sockets'
//! TCP processing and the receivers' wake-ups, which the kernel runs inside the `send`
//! (softirq, charged to the thread unless the kernel accounts IRQ time apart,
//! `CONFIG_IRQ_TIME_ACCOUNTING`); softirq work deferred to `ksoftirqd` is not the
//! thread's, so that thread's CPU time over the run is printed beside it.

use std::fs;
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use crate::crowd::{default_procs, CONNS_PER_SOURCE_IP};
use crate::error::Error;
use crate::fanout::{p50_max, Receipt};
use crate::latency::duration_us;
use crate::server;
use crate::target::{pin_name, PinArgs};
use crate::workers::{shares, total, Reply, Workers};

/// Default `--size`: the `msg` frame ringpush writes to each member in `fanout` with its
/// default 100-byte body. 217 bytes of JSON (`msg_json` in src/protocol:
/// `{"op":"msg","conv":"b16264x797922c0","seq":1,"from":"u0","dev":"d","cid":"31793700380798",
/// "ts":1795797922193,"body":{...100 bytes...}}`) after a 4-byte header (a payload of
/// 126..65535 bytes has a 16-bit length): each `recvmsg` of a client in
/// `strace -f ringpush-bench fanout --members 3 --messages 3` read 221 bytes.
const MSG_FRAME_BYTES: usize = 221;

/// The listener's backlog: above the receivers' connects in flight all together.
const ACCEPT_BACKLOG: i32 = 4096;

/// The accept phase fails when no connection has come for this long.
const ACCEPT_STALL: Duration = Duration::from_secs(10);

/// Bound on the receivers' connect phase (the parent adds 30 s to wait for its answers).
const CONNECT_TIMEOUT_SECS: u64 = 120;

/// Measure the kernel's cost of one small TCP write to each of many loopback sockets.
#[derive(Debug, Clone, clap::Args)]
pub struct FloorArgs {
    /// Connections; the sender holds the accepted ends, the receiver processes the others.
    #[arg(long, default_value_t = 10_000)]
    pub conns: usize,
    /// Rounds: one send to every connection each.
    #[arg(long, default_value_t = 20)]
    pub rounds: u64,
    /// Bytes of each send [default: 221, the `msg` frame ringpush writes per delivery in
    /// `fanout` with its default 100-byte body].
    #[arg(long, default_value_t = MSG_FRAME_BYTES)]
    pub size: usize,
    /// Send the rounds back to back and measure sends a second to the last read.
    #[arg(long)]
    pub burst: bool,
    /// Bound on waiting for one round's (or the burst's) receipts.
    #[arg(long, default_value_t = 5000)]
    pub timeout_ms: u64,
    /// Receiver processes [default: ceil(connections / 9000)].
    #[arg(long)]
    pub procs: Option<usize>,
    /// The receivers poll instead of sleeping in epoll, so that the sends do not pay for
    /// waking them (on loopback the sending CPU runs the receiver's wake-up).
    #[arg(long)]
    pub client_spin: bool,
    /// Do not ask the kernel for receive stamps (send->arrival is then not measured).
    #[arg(long)]
    pub no_kernel_stamps: bool,
    #[command(flatten)]
    pub pin: PinArgs,
    /// Print one JSON line (after the human summary, which goes to stderr).
    #[arg(long)]
    pub json: bool,
}

/// One send loop: its wall time and the sender thread's CPU time over it.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SendLoop {
    pub secs: f64,
    pub cpu: Duration,
    pub sys: Duration,
}

/// Everything the scenario measured.
#[derive(Debug, Clone)]
pub struct Report {
    pub conns: usize,
    pub rounds: u64,
    pub size: usize,
    pub burst: bool,
    pub procs: usize,
    pub spin: bool,
    pub server_cpu: Option<usize>,
    pub client_cpu: Option<usize>,
    pub connect_secs: f64,
    /// Sends that wrote the whole buffer.
    pub sends: u64,
    /// Sends that found the socket full (wrote part of the buffer or nothing).
    pub full: u64,
    /// Per round (one for the burst): the receipts, latencies from the round's first send.
    pub receipts: Vec<Receipt>,
    /// Per round (one for the burst).
    pub loops: Vec<SendLoop>,
    /// `ksoftirqd` of the sender's CPU over the sending phase (`None` unpinned or unread).
    pub ksoftirqd_cpu: Option<Duration>,
    pub receivers_cpu: Duration,
    pub phase_secs: f64,
}

impl Report {
    /// The sender thread's CPU time over all send loops.
    pub fn sender_cpu(&self) -> Duration {
        self.loops.iter().map(|l| l.cpu).sum()
    }

    pub fn cpu_us_per_send(&self) -> f64 {
        self.sender_cpu().as_secs_f64() * 1e6 / self.sends.max(1) as f64
    }

    /// Sends per second of sender CPU: the ceiling of deliveries a second per core.
    pub fn sends_per_cpu_sec(&self) -> f64 {
        self.sends as f64 / self.sender_cpu().as_secs_f64().max(1e-9)
    }

    /// The system share of the sender's CPU (of `getrusage`'s tick-sampled split).
    pub fn sys_share(&self) -> f64 {
        let sys: Duration = self.loops.iter().map(|l| l.sys).sum();
        sys.as_secs_f64() / self.sender_cpu().as_secs_f64().max(1e-9)
    }

    pub fn got(&self) -> u64 {
        self.receipts.iter().map(|r| r.got).sum()
    }

    pub fn want(&self) -> u64 {
        self.receipts.iter().map(|r| r.want).sum()
    }

    /// With `--burst` and every receipt in: seconds from the first send to the last read
    /// and to the last arrival.
    pub fn burst_secs(&self) -> Option<(f64, Option<f64>)> {
        let r = self.receipts.first().filter(|r| self.burst && r.want > 0 && r.got == r.want)?;
        Some((r.last_read / 1e6, r.last_arrival.map(|a| a / 1e6)))
    }

    fn figure(&self, f: impl Fn(&Receipt) -> Option<f64>) -> Option<(f64, f64)> {
        let v: Vec<f64> = self.receipts.iter().filter_map(f).collect();
        (!v.is_empty()).then(|| p50_max(v))
    }

    fn loop_figure(&self) -> (f64, f64) {
        p50_max(self.loops.iter().map(|l| l.secs * 1e6).collect())
    }

    pub fn human(&self) -> String {
        let mut s = format!(
            "ringpush-bench floor: {} loopback TCP connections, {} round(s) of one {}-byte send to each{}; \
             {} receiver process(es) ({}, {}); sender: the main thread ({})\n",
            self.conns,
            self.rounds,
            self.size,
            if self.burst { ", back to back" } else { ", one at a time" },
            self.procs,
            pin_name(self.client_cpu),
            if self.spin { "spinning" } else { "sleeping in epoll" },
            pin_name(self.server_cpu)
        );
        s += &format!("  setup        {} connections up in {:.1} s\n", self.conns, self.connect_secs);
        s += &format!(
            "  sender       {:.2} µs CPU per send: {:.0} sends per CPU-second ({:.0} ms CPU over {} sends, {:.0}% system)\n",
            self.cpu_us_per_send(),
            self.sends_per_cpu_sec(),
            self.sender_cpu().as_secs_f64() * 1000.0,
            self.sends,
            self.sys_share() * 100.0
        );
        let (p50, max) = self.loop_figure();
        s += &format!(
            "  send loop    p50 {}, max {} per {}\n",
            duration_us(p50),
            duration_us(max),
            if self.burst { "burst" } else { "round" }
        );
        let pair = |f: Option<(f64, f64)>| {
            f.map_or("n/a".to_string(), |(p50, max)| {
                format!("p50 {}, max {}", duration_us(p50), duration_us(max))
            })
        };
        if let Some((read, arrival)) = self.burst_secs() {
            s += &format!(
                "  burst        {} sends in {} from the first send to the last read: {:.0} sends/s; \
                 to the last arrival {}\n",
                self.sends,
                duration_us(read * 1e6),
                self.sends as f64 / read.max(1e-9),
                arrival.map_or("n/a".to_string(), |a| duration_us(a * 1e6))
            );
        } else if self.burst {
            s += "  burst        n/a: receipts missing\n";
        } else {
            s += &format!(
                "  last reader  read {}; arrived {}\n",
                pair(self.figure(|r| Some(r.last_read))),
                pair(self.figure(|r| r.last_arrival))
            );
            s += &format!(
                "  first reader read {}; arrived {}\n",
                pair(self.figure(|r| Some(r.first_read))),
                pair(self.figure(|r| r.first_arrival))
            );
            s += "  per round    round: last read / last arrival (first read); send loop\n";
            for (r, l) in self.receipts.iter().zip(&self.loops) {
                s += &format!(
                    "    {:>4}: {} / {} ({}); {}{}\n",
                    r.seq,
                    duration_us(r.last_read),
                    r.last_arrival.map_or("n/a".to_string(), duration_us),
                    duration_us(r.first_read),
                    duration_us(l.secs * 1e6),
                    if r.got < r.want {
                        format!("  {} of {} connections", r.got, r.want)
                    } else {
                        String::new()
                    }
                );
            }
        }
        s += &format!(
            "  receipts     {} of {} ({} missing); {} sends found the socket full\n",
            self.got(),
            self.want(),
            self.want().saturating_sub(self.got()),
            self.full
        );
        s += &format!(
            "  receivers    {:.0} ms CPU over {:.2} s; ksoftirqd of the sender's CPU {}\n",
            self.receivers_cpu.as_secs_f64() * 1000.0,
            self.phase_secs,
            self.ksoftirqd_cpu.map_or("n/a".to_string(), |d| format!("{:.1} ms", d.as_secs_f64() * 1000.0))
        );
        s
    }

    pub fn json(&self) -> String {
        let r = |x: f64| (x * 10.0).round() / 10.0;
        let pair = |f: Option<(f64, f64)>| {
            f.map(|(p50, max)| serde_json::json!({ "p50_us": r(p50), "max_us": r(max) }))
        };
        let (loop_p50, loop_max) = self.loop_figure();
        serde_json::json!({
            "scenario": "floor",
            "conns": self.conns, "rounds": self.rounds, "size": self.size, "burst": self.burst,
            "procs": self.procs, "client_spin": self.spin,
            "sender_cpu": self.server_cpu, "client_cpu": self.client_cpu,
            "connect_secs": (self.connect_secs * 100.0).round() / 100.0,
            "sends": self.sends, "full": self.full,
            "sender_cpu_us_per_send": (self.cpu_us_per_send() * 1000.0).round() / 1000.0,
            "sends_per_cpu_sec": self.sends_per_cpu_sec().round(),
            "sender_cpu_ms": r(self.sender_cpu().as_secs_f64() * 1000.0),
            "sender_sys_share": (self.sys_share() * 1000.0).round() / 1000.0,
            "send_loop": { "p50_us": r(loop_p50), "max_us": r(loop_max) },
            "last_read": pair(self.figure(|x| Some(x.last_read))),
            "last_arrival": pair(self.figure(|x| x.last_arrival)),
            "first_read": pair(self.figure(|x| Some(x.first_read))),
            "first_arrival": pair(self.figure(|x| x.first_arrival)),
            "receipts_got": self.got(), "receipts_expected": self.want(),
            "burst_read_secs": self.burst_secs().map(|(read, _)| read),
            "burst_arrival_secs": self.burst_secs().and_then(|(_, arrival)| arrival),
            "burst_sends_per_sec": self.burst_secs().map(|(read, _)| (self.sends as f64 / read.max(1e-9)).round()),
            "receivers_cpu_ms": self.receivers_cpu.as_millis() as u64,
            "ksoftirqd_cpu_ms": self.ksoftirqd_cpu.map(|d| r(d.as_secs_f64() * 1000.0)),
            "phase_secs": (self.phase_secs * 1000.0).round() / 1000.0,
            "receipts": self.receipts.iter().map(Receipt::json).collect::<Vec<_>>(),
        })
        .to_string()
    }
}

/// Runs the scenario: prints the summary (and the JSON line) and returns the report; fails
/// after printing when a receipt is missing or a send found its socket full.
pub fn run(args: FloorArgs) -> Result<Report, Error> {
    if args.conns == 0 || args.rounds == 0 || args.size == 0 || args.procs == Some(0) {
        return Err(Error::Usage("--conns, --rounds, --size and --procs must be at least 1".into()));
    }
    let files = open_file_limit();
    if args.conns + 64 > files {
        return Err(Error::Usage(format!(
            "--conns {} needs {} open files in the sender's process; the limit is {files}",
            args.conns,
            args.conns + 64
        )));
    }
    let (server_cpu, client_cpu) = args.pin.cpus()?;
    let report = measure(&args, server_cpu, client_cpu)?;
    server::print_report(&report.human(), &report.json(), args.json);
    let missing = report.want().saturating_sub(report.got());
    if missing > 0 {
        return Err(Error::Timeout {
            what: format!("{missing} of {} receipts", report.want()),
            secs: args.timeout_ms.div_ceil(1000),
        });
    }
    if report.full > 0 {
        return Err(Error::Usage(format!(
            "{} sends found the socket full: the figures are not one whole send each (fewer --rounds with --burst?)",
            report.full
        )));
    }
    Ok(report)
}

fn measure(args: &FloorArgs, server_cpu: Option<usize>, client_cpu: Option<usize>) -> Result<Report, Error> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| Error::io("listen on 127.0.0.1:0", e))?;
    let addr = listener.local_addr().map_err(|e| Error::io("read the listener's address", e))?;
    listener.set_nonblocking(true).map_err(|e| Error::io("make the listener non-blocking", e))?;
    // std listens with a backlog of 128, which the receivers' connects in flight overflow
    // while this thread accepts: the dropped handshakes then wait for the 1 s SYN
    // retransmit (a 10000-connection setup took 5-7 s instead of under one). A second
    // `listen` only raises the backlog (the kernel caps it at net.core.somaxconn).
    // SAFETY: `listen` on a socket we own.
    if unsafe { libc::listen(listener.as_raw_fd(), ACCEPT_BACKLOG) } != 0 {
        return Err(Error::io("raise the listen backlog", std::io::Error::last_os_error()));
    }

    // The threads that read the receivers' answers are started with the receivers: made
    // on the client CPU, they keep off the sender's.
    let pin = |cpu: Option<usize>| match cpu {
        Some(cpu) => server::pin_current(cpu).map_err(|e| Error::io(format!("pin to cpu {cpu}"), e)),
        None => Ok(()),
    };
    pin(client_cpu)?;
    let procs = args.procs.unwrap_or_else(|| default_procs(args.conns));
    let source_ips = args.conns.div_ceil(CONNS_PER_SOURCE_IP).clamp(1, 254);
    let started = Instant::now();
    let mut workers = Workers::spawn(
        shares(args.conns, procs)
            .into_iter()
            .map(|(first, count)| {
                let mut v = vec![
                    "floor-worker".to_string(),
                    format!("--addr={addr}"),
                    format!("--count={count}"),
                    format!("--first={first}"),
                    format!("--source-ips={source_ips}"),
                    format!("--connect-timeout-secs={CONNECT_TIMEOUT_SECS}"),
                ];
                v.extend(client_cpu.map(|cpu| format!("--cpu={cpu}")));
                v.extend(args.client_spin.then(|| "--spin".to_string()));
                v.extend((!args.no_kernel_stamps).then(|| "--kernel-stamps".to_string()));
                v.into_iter().map(Into::into).collect()
            })
            .collect(),
    )?;
    pin(server_cpu)?;
    let socks = accept_all(&listener, args.conns)?;
    let replies = workers.expect("connected", Duration::from_secs(CONNECT_TIMEOUT_SECS + 30))?;
    let connect_secs = started.elapsed().as_secs_f64();
    let (connected, failed) = (total(&replies, "connected"), total(&replies, "failed"));
    if failed > 0 || connected != args.conns as u64 {
        return Err(Error::Worker(format!("{connected} of {} connections up, {failed} failed", args.conns)));
    }
    eprintln!("ringpush-bench floor: {connected} connections up in {connect_secs:.1} s");

    let buf = vec![b'x'; args.size];
    let pids = workers.pids();
    let receivers_cpu = || -> Duration { pids.iter().filter_map(|pid| server::cpu_time(*pid).ok()).sum() };
    let ksoftirqd = server_cpu.and_then(ksoftirqd_pid);
    let ksoftirqd_cpu = || ksoftirqd.and_then(|pid| server::cpu_time(pid).ok());
    let limit = Duration::from_millis(args.timeout_ms) + Duration::from_secs(10);
    let (receivers_before, ksoftirqd_before) = (receivers_cpu(), ksoftirqd_cpu());
    let phase = Instant::now();
    let (mut sends, mut full) = (0, 0);
    let mut receipts = Vec::new();
    let mut loops = Vec::new();
    let batches = if args.burst { vec![args.rounds] } else { vec![1; args.rounds as usize] };
    let mut rounds_sent = 0;
    for (k, batch) in batches.into_iter().enumerate() {
        rounds_sent += batch;
        // Asked before the sends, so that reading the command is not in the send loop.
        workers.send(&format!("wait {} {}", rounds_sent * args.size as u64, args.timeout_ms))?;
        let (t0, cpu0) = (crate::chat::now_ns(), thread_cpu());
        for _ in 0..batch {
            let (ok, no) = send_all(&socks, &buf)?;
            sends += ok;
            full += no;
        }
        let (t1, cpu1) = (crate::chat::now_ns(), thread_cpu());
        loops.push(SendLoop {
            secs: (t1 - t0) as f64 / 1e9,
            cpu: cpu1.total.saturating_sub(cpu0.total),
            sys: cpu1.sys.saturating_sub(cpu0.sys),
        });
        let replies = workers.expect("got", limit)?;
        receipts.push(Receipt::combine(k as u64 + 1, &receipt_parts(&replies, t0)));
    }
    let phase_secs = phase.elapsed().as_secs_f64();
    let receivers_cpu = receivers_cpu().saturating_sub(receivers_before);
    let ksoftirqd_cpu =
        ksoftirqd_cpu().zip(ksoftirqd_before).map(|(after, before)| after.saturating_sub(before));
    workers.stop();
    Ok(Report {
        conns: args.conns,
        rounds: args.rounds,
        size: args.size,
        burst: args.burst,
        procs,
        spin: args.client_spin,
        server_cpu,
        client_cpu,
        connect_secs,
        sends,
        full,
        receipts,
        loops,
        ksoftirqd_cpu,
        receivers_cpu,
        phase_secs,
    })
}

/// Accepts `n` connections, each made TCP_NODELAY and non-blocking as ringpush's are.
fn accept_all(listener: &TcpListener, n: usize) -> Result<Vec<TcpStream>, Error> {
    let mut socks = Vec::with_capacity(n);
    let mut last = Instant::now();
    while socks.len() < n {
        match listener.accept() {
            Ok((s, _)) => {
                s.set_nodelay(true).map_err(|e| Error::io("set TCP_NODELAY", e))?;
                s.set_nonblocking(true).map_err(|e| Error::io("make a connection non-blocking", e))?;
                socks.push(s);
                last = Instant::now();
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                let left = ACCEPT_STALL.saturating_sub(last.elapsed());
                if left.is_zero() {
                    return Err(Error::Timeout {
                        what: format!("connections ({} of {n} accepted, none for a while)", socks.len()),
                        secs: ACCEPT_STALL.as_secs(),
                    });
                }
                let mut pfd = libc::pollfd { fd: listener.as_raw_fd(), events: libc::POLLIN, revents: 0 };
                // SAFETY: one pollfd we own; an interrupted poll just loops.
                unsafe { libc::poll(&mut pfd, 1, left.as_millis() as i32) };
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::io("accept", e)),
        }
    }
    Ok(socks)
}

/// One non-blocking `send` of `buf` on every socket, in order: (sends that wrote all of
/// it, sends that found the socket full). Any other failure ends the run.
fn send_all(socks: &[TcpStream], buf: &[u8]) -> Result<(u64, u64), Error> {
    let (mut ok, mut full) = (0, 0);
    for s in socks {
        loop {
            // SAFETY: `buf` is valid for its length; the socket is open.
            let n = unsafe {
                libc::send(
                    s.as_raw_fd(),
                    buf.as_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                )
            };
            if n == buf.len() as isize {
                ok += 1;
            } else if n >= 0 {
                full += 1;
            } else {
                let e = std::io::Error::last_os_error();
                match e.kind() {
                    std::io::ErrorKind::WouldBlock => full += 1,
                    std::io::ErrorKind::Interrupted => continue,
                    _ => return Err(Error::io("send to a receiver", e)),
                }
            }
            break;
        }
    }
    Ok((ok, full))
}

/// The `got` answers as [`Receipt::combine`] takes them: latencies in ns from `t0`, the
/// round's first send (0 stays "none").
fn receipt_parts(replies: &[Reply], t0: u64) -> Vec<[u64; 6]> {
    let since = |at: u64| if at == 0 { 0 } else { at.saturating_sub(t0).max(1) };
    replies
        .iter()
        .map(|r| {
            [
                r.get("got"),
                r.get("want"),
                since(r.get("first_read")),
                since(r.get("last_read")),
                since(r.get("first_arrival")),
                since(r.get("last_arrival")),
            ]
        })
        .collect()
}

/// The calling thread's CPU time: all of it (`CLOCK_THREAD_CPUTIME_ID`, ns) and the system
/// part (`getrusage(RUSAGE_THREAD)`, split by tick samples).
#[derive(Debug, Clone, Copy)]
struct ThreadCpu {
    total: Duration,
    sys: Duration,
}

fn thread_cpu() -> ThreadCpu {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes into the struct we own.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    // SAFETY: all-zero is a valid rusage, which getrusage fills.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut ru) };
    ThreadCpu {
        total: Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32),
        sys: Duration::new(ru.ru_stime.tv_sec as u64, ru.ru_stime.tv_usec as u32 * 1000),
    }
}

/// The process id of `ksoftirqd/CPU`, which runs the softirq work the kernel defers.
fn ksoftirqd_pid(cpu: usize) -> Option<u32> {
    let name = format!("ksoftirqd/{cpu}");
    fs::read_dir("/proc").ok()?.flatten().find_map(|entry| {
        let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
        let comm = fs::read_to_string(entry.path().join("comm")).ok()?;
        (comm.trim() == name).then_some(pid)
    })
}

/// The soft limit on open files of this process.
fn open_file_limit() -> usize {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return usize::MAX;
    }
    usize::try_from(lim.rlim_cur).unwrap_or(usize::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn receipts_count_from_the_first_send() {
        let a =
            Reply::parse("got 5 want 5 first_read 1200 last_read 9000 first_arrival 1100 last_arrival 8000")
                .expect("parses");
        let b = Reply::parse("got 3 want 5 first_read 1500 last_read 12000 first_arrival 0 last_arrival 0")
            .expect("parses");
        let parts = receipt_parts(&[a, b], 1000);
        assert_eq!(parts, vec![[5, 5, 200, 8000, 100, 7000], [3, 5, 500, 11_000, 0, 0]]);
        let r = Receipt::combine(1, &parts);
        assert_eq!((r.got, r.want, r.first_read, r.last_read), (8, 10, 0.2, 11.0));
        assert_eq!(r.last_arrival, Some(7.0));
        // A read stamped before the send it answers (clocks of one host agree; never
        // expected) still counts as a read, not as none.
        assert_eq!(
            receipt_parts(&[Reply::parse("got 1 want 1 last_read 900").expect("parses")], 1000)[0][3],
            1
        );
    }

    #[test]
    fn per_send_figures() {
        let report = Report {
            conns: 10,
            rounds: 2,
            size: 221,
            burst: false,
            procs: 1,
            spin: false,
            server_cpu: Some(0),
            client_cpu: Some(1),
            connect_secs: 0.1,
            sends: 20,
            full: 0,
            receipts: vec![Receipt { seq: 1, got: 10, want: 10, ..Default::default() }; 2],
            loops: vec![
                SendLoop { secs: 0.001, cpu: Duration::from_micros(30), sys: Duration::from_micros(27) },
                SendLoop { secs: 0.002, cpu: Duration::from_micros(50), sys: Duration::from_micros(45) },
            ],
            ksoftirqd_cpu: None,
            receivers_cpu: Duration::from_millis(1),
            phase_secs: 0.01,
        };
        assert_eq!(report.sender_cpu(), Duration::from_micros(80));
        assert!((report.cpu_us_per_send() - 4.0).abs() < 1e-9);
        assert!((report.sends_per_cpu_sec() - 250_000.0).abs() < 1e-3);
        assert!((report.sys_share() - 0.9).abs() < 1e-9);
        assert_eq!(report.loop_figure(), (1000.0, 2000.0));
        assert_eq!((report.got(), report.want()), (20, 20));
        assert_eq!(report.burst_secs(), None, "not a burst");
        let burst = |got| Report {
            burst: true,
            receipts: vec![Receipt {
                seq: 1,
                got,
                want: 10,
                last_read: 2000.0,
                last_arrival: Some(1500.0),
                ..Default::default()
            }],
            ..report.clone()
        };
        assert_eq!(burst(10).burst_secs(), Some((0.002, Some(0.0015))));
        assert_eq!(burst(9).burst_secs(), None, "a receipt missing: no rate");
    }
}
