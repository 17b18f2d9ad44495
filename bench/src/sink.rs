//! One receiver process of the `floor` scenario (the hidden `floor-worker` subcommand):
//! plain TCP connections to the sender, read on an epoll loop, their bytes counted. No
//! WebSocket and no parsing: the cheapest reader there is, so that what the sender's CPU
//! pays is the kernel's part alone.
//!
//! The parent talks to it in lines, as to [`crate::fleet`]:
//!
//! | parent sends    | sink answers |
//! | ---             | ---          |
//! | (start)         | `connected K failed F ms T` once every connection is up or has failed |
//! | `wait BYTES MS` | once every connection has read BYTES since it opened, or after MS: `got G want W first_read .. last_read .. first_arrival .. last_arrival ..`: G of the W connections have; the times are the smallest and largest over those G of their last read (`CLOCK_MONOTONIC` ns) and of its kernel receive stamp, 0 = none |
//! | `exit` or EOF   | exits; the kernel resets the connections |
//!
//! The sender writes nothing past the bytes a `wait` names until the parent has every
//! answer, so a connection's last read is the one that completed it.

use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use crate::chat;
use crate::error::Error;
use crate::fleet::{epoll_ctl, read_stdin, say, set_nonblocking, socket_error, start_connect};

/// What one receiver process is started with.
#[derive(Debug, Clone, clap::Args)]
pub struct SinkArgs {
    /// The sender's listener.
    #[arg(long)]
    pub addr: SocketAddr,
    /// Connections this process opens.
    #[arg(long)]
    pub count: usize,
    /// Index of this process's first connection in the whole run: source addresses
    /// rotate by it.
    #[arg(long, default_value_t = 0)]
    pub first: usize,
    /// Spread connections over 127.0.0.1..=127.0.0.K.
    #[arg(long, default_value_t = 1)]
    pub source_ips: u8,
    /// Pin this process to one CPU.
    #[arg(long)]
    pub cpu: Option<usize>,
    /// Never sleep in epoll: poll, and yield the CPU when nothing is ready (as
    /// `idle-worker --spin`): the sender's sends then do not pay for waking this process.
    #[arg(long)]
    pub spin: bool,
    /// Ask the kernel for receive stamps (SO_TIMESTAMPNS) on every read.
    #[arg(long)]
    pub kernel_stamps: bool,
    /// Bound on the whole connect phase.
    #[arg(long, default_value_t = 120)]
    pub connect_timeout_secs: u64,
}

/// epoll token of stdin; connections use their index.
const STDIN_TOKEN: u64 = u64::MAX;

/// Connects in flight at once: several, as the IM scenarios' handshakes, and well within
/// the kernel's SYN backlog (2048 here) and the sender's accept queue (128 or more).
const CONNECTS_IN_FLIGHT: usize = 64;

/// One connection: its bytes so far and its last read.
#[derive(Debug)]
struct Conn {
    /// `None` once the sender closed it or a read failed.
    fd: Option<OwnedFd>,
    bytes: u64,
    /// `CLOCK_MONOTONIC` ns of the last read, and its kernel receive stamp (0 = none).
    read_at: u64,
    arrival_at: u64,
}

/// The `wait` in progress.
#[derive(Debug)]
struct Wait {
    bytes: u64,
    deadline: Instant,
    /// Connections that have read `bytes`.
    done: u64,
}

/// Runs one receiver process until the parent says exit (or closes stdin).
pub fn run(args: SinkArgs) -> Result<(), Error> {
    if let Some(cpu) = args.cpu {
        crate::server::pin_current(cpu).map_err(|e| Error::io(format!("pin to cpu {cpu}"), e))?;
    }
    // SAFETY: epoll_create1 has no preconditions; the fd is owned right away.
    let raw = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if raw < 0 {
        return Err(Error::io("epoll_create1", std::io::Error::last_os_error()));
    }
    // SAFETY: a fresh fd nobody else owns.
    let epoll = unsafe { OwnedFd::from_raw_fd(raw) };
    let conns = connect_all(&args, &epoll)?;
    set_nonblocking(0).map_err(|e| Error::io("make stdin non-blocking", e))?;
    epoll_ctl(epoll.as_raw_fd(), libc::EPOLL_CTL_ADD, 0, libc::EPOLLIN as u32, STDIN_TOKEN)
        .map_err(|e| Error::io("watch stdin", e))?;
    Sink { args, epoll, conns, wait: None, realtime_offset: chat::realtime_offset() }.run_loop()
}

/// Opens the connections, `CONNECTS_IN_FLIGHT` at a time, reports `connected`, and
/// returns them (a failed one without its socket).
fn connect_all(args: &SinkArgs, epoll: &OwnedFd) -> Result<Vec<Conn>, Error> {
    let started = Instant::now();
    let deadline = started + Duration::from_secs(args.connect_timeout_secs);
    let k = args.source_ips.max(1) as usize;
    let mut conns: Vec<Conn> = Vec::with_capacity(args.count);
    let mut connecting: Vec<bool> = Vec::with_capacity(args.count);
    let (mut in_flight, mut ok) = (0, 0u64);
    let mut failures: Vec<std::io::Error> = Vec::new();
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 256];
    while conns.len() < args.count || in_flight > 0 {
        while conns.len() < args.count && in_flight < CONNECTS_IN_FLIGHT {
            let i = conns.len();
            let source = (k > 1).then(|| ((args.first + i) % k) as u8 + 1);
            let fd = start_connect(args.addr, source, args.kernel_stamps).and_then(|fd| {
                let flags = (libc::EPOLLOUT | libc::EPOLLIN | libc::EPOLLRDHUP) as u32;
                epoll_ctl(epoll.as_raw_fd(), libc::EPOLL_CTL_ADD, fd.as_raw_fd(), flags, i as u64)?;
                Ok(fd)
            });
            let fd = fd.map_err(|e| failures.push(e)).ok();
            in_flight += usize::from(fd.is_some());
            connecting.push(fd.is_some());
            conns.push(Conn { fd, bytes: 0, read_at: 0, arrival_at: 0 });
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            for (conn, _) in conns.iter_mut().zip(&connecting).filter(|(_, c)| **c) {
                conn.fd = None;
                failures.push(std::io::ErrorKind::TimedOut.into());
            }
            break;
        }
        let timeout_ms = left.as_millis().min(100) as i32;
        // SAFETY: `events` is valid for its length; the epoll fd is ours.
        let n = unsafe {
            libc::epoll_wait(epoll.as_raw_fd(), events.as_mut_ptr(), events.len() as i32, timeout_ms)
        };
        for ev in &events[..n.max(0) as usize] {
            let i = ev.u64 as usize;
            let Some(raw) = conns[i].fd.as_ref().map(|f| f.as_raw_fd()).filter(|_| connecting[i]) else {
                continue;
            };
            connecting[i] = false;
            in_flight -= 1;
            let up = match socket_error(raw) {
                Ok(0) => {
                    let flags = (libc::EPOLLIN | libc::EPOLLRDHUP) as u32;
                    epoll_ctl(epoll.as_raw_fd(), libc::EPOLL_CTL_MOD, raw, flags, i as u64)
                }
                Ok(errno) => Err(std::io::Error::from_raw_os_error(errno)),
                Err(e) => Err(e),
            };
            match up {
                Ok(()) => ok += 1,
                Err(e) => {
                    conns[i].fd = None;
                    failures.push(e);
                }
            }
        }
    }
    if let Some(e) = failures.first() {
        eprintln!("floor-worker: {} connections failed, the first with: {e}", failures.len());
    }
    say(&format!("connected {ok} failed {} ms {}", failures.len(), started.elapsed().as_millis()))?;
    Ok(conns)
}

struct Sink {
    args: SinkArgs,
    epoll: OwnedFd,
    conns: Vec<Conn>,
    wait: Option<Wait>,
    /// `CLOCK_REALTIME - CLOCK_MONOTONIC`, for kernel receive stamps.
    realtime_offset: i64,
}

impl Sink {
    fn run_loop(&mut self) -> Result<(), Error> {
        let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 1024];
        let mut buf = vec![0u8; 64 * 1024];
        let mut stdin_buf = Vec::new();
        loop {
            let timeout_ms = match (self.args.spin, &self.wait) {
                (true, _) => 0,
                (false, Some(w)) => {
                    w.deadline.saturating_duration_since(Instant::now()).as_millis().min(50) as i32
                }
                (false, None) => 50,
            };
            // SAFETY: `events` is valid for its length; the epoll fd is ours.
            let n = unsafe {
                libc::epoll_wait(self.epoll.as_raw_fd(), events.as_mut_ptr(), events.len() as i32, timeout_ms)
            };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(Error::io("epoll_wait", e));
            }
            if n == 0 && self.args.spin {
                // Let the other receiver processes on this CPU run.
                // SAFETY: sched_yield has no preconditions.
                unsafe { libc::sched_yield() };
            }
            for ev in &events[..n as usize] {
                if ev.u64 != STDIN_TOKEN {
                    self.on_readable(ev.u64 as usize, &mut buf);
                    continue;
                }
                let Some(lines) = read_stdin(&mut stdin_buf)? else { return Ok(()) };
                for line in lines {
                    if !self.command(&line)? {
                        return Ok(());
                    }
                }
            }
            self.report()?;
        }
    }

    /// Handles one line from the parent; `Ok(false)` to exit.
    fn command(&mut self, line: &str) -> Result<bool, Error> {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["exit"] => return Ok(false),
            ["wait", bytes, ms] => {
                let bad = || Error::Worker(format!("bad command {line:?}"));
                let bytes: u64 = bytes.parse().map_err(|_| bad())?;
                let ms: u64 = ms.parse().map_err(|_| bad())?;
                // Bytes may have come before the command did.
                let done = self.conns.iter().filter(|c| c.bytes >= bytes).count() as u64;
                self.wait = Some(Wait { bytes, deadline: Instant::now() + Duration::from_millis(ms), done });
            }
            _ => return Err(Error::Worker(format!("unknown command {line:?}"))),
        }
        Ok(true)
    }

    /// Reads connection `i` until it is empty.
    fn on_readable(&mut self, i: usize, buf: &mut [u8]) {
        let Some(conn) = self.conns.get_mut(i) else { return };
        loop {
            let Some(raw) = conn.fd.as_ref().map(|f| f.as_raw_fd()) else { return };
            let read = if self.args.kernel_stamps {
                chat::recv_stamped(raw, buf)
            } else {
                // SAFETY: `buf` is valid for its length; `raw` is this connection's socket.
                let n = unsafe { libc::read(raw, buf.as_mut_ptr().cast(), buf.len()) };
                if n < 0 {
                    Err(std::io::Error::last_os_error())
                } else {
                    Ok((n as usize, None))
                }
            };
            let n = match read {
                Ok((0, _)) => {
                    eprintln!("floor-worker: connection {} closed by the sender", self.args.first + i);
                    conn.fd = None;
                    return;
                }
                Ok((n, arrival)) => {
                    conn.read_at = chat::now_ns();
                    conn.arrival_at =
                        arrival.map_or(0, |real| (real as i64 - self.realtime_offset).max(1) as u64);
                    n
                }
                Err(e) => match e.kind() {
                    std::io::ErrorKind::WouldBlock => return,
                    std::io::ErrorKind::Interrupted => continue,
                    kind => {
                        eprintln!("floor-worker: connection {}: read: {kind}", self.args.first + i);
                        conn.fd = None;
                        return;
                    }
                },
            };
            let before = conn.bytes;
            conn.bytes += n as u64;
            if let Some(w) = self.wait.as_mut() {
                if before < w.bytes && conn.bytes >= w.bytes {
                    w.done += 1;
                }
            }
            // A short read emptied the socket: epoll (level-triggered) says when more comes.
            if n < buf.len() {
                return;
            }
        }
    }

    /// Answers the `wait` once every connection has read its bytes, or at its deadline.
    fn report(&mut self) -> Result<(), Error> {
        let Some(w) = &self.wait else { return Ok(()) };
        if w.done < self.conns.len() as u64 && Instant::now() < w.deadline {
            return Ok(());
        }
        let done: Vec<&Conn> = self.conns.iter().filter(|c| c.bytes >= w.bytes).collect();
        let min_max = |f: fn(&Conn) -> u64| {
            let v = done.iter().map(|c| f(c)).filter(|t| *t > 0);
            (v.clone().min().unwrap_or(0), v.max().unwrap_or(0))
        };
        let (first_read, last_read) = min_max(|c| c.read_at);
        let (first_arrival, last_arrival) = min_max(|c| c.arrival_at);
        say(&format!(
            "got {} want {} first_read {first_read} last_read {last_read} first_arrival {first_arrival} \
             last_arrival {last_arrival}",
            done.len(),
            self.args.count
        ))?;
        self.wait = None;
        Ok(())
    }
}
