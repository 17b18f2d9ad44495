//! The parent's side of the client processes: spawn them (this same binary with a hidden
//! subcommand), send them command lines, collect one answer line from each within a
//! bound, and stop them. See [`crate::fleet`] for the lines.
//!
//! Dropping [`Workers`] stops every process still running: closing stdin asks, a kill
//! follows after a bound, so no client outlives the run, also on error.

use std::collections::HashMap;
use std::ffi::OsString;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use crate::error::Error;

/// How long a process has to exit after its stdin closed before it is killed.
const EXIT_TIMEOUT: Duration = Duration::from_secs(5);

/// One answer line: a kind, then `name value` pairs; an odd word right after the kind is
/// the kind's own value (`connected 10 failed 0 ms 52`: `connected` = 10).
#[derive(Debug, Clone, Default)]
pub struct Reply {
    pub kind: String,
    values: HashMap<String, u64>,
}

impl Reply {
    pub fn parse(line: &str) -> Option<Reply> {
        let mut words = line.split_whitespace();
        let kind = words.next()?.to_string();
        let mut rest: Vec<&str> = words.collect();
        let mut values = HashMap::new();
        if rest.len() % 2 == 1 {
            values.insert(kind.clone(), rest.remove(0).parse().ok()?);
        }
        for pair in rest.chunks(2) {
            let [name, value] = pair else { return None };
            values.insert(name.to_string(), value.parse().ok()?);
        }
        Some(Reply { kind, values })
    }

    /// The value of `name`, 0 when absent.
    pub fn get(&self, name: &str) -> u64 {
        self.values.get(name).copied().unwrap_or(0)
    }
}

/// Splits `total` connections over `procs` processes as evenly as possible: each
/// process's `(first, count)`.
pub fn shares(total: usize, procs: usize) -> Vec<(usize, usize)> {
    let procs = procs.clamp(1, total.max(1));
    let mut first = 0;
    (0..procs)
        .map(|i| {
            let count = total / procs + usize::from(i < total % procs);
            let share = (first, count);
            first += count;
            share
        })
        .collect()
}

/// The command lines of plain client processes (`idle-worker` without `--chat`): `conns`
/// connections split over `procs` processes, rotating over `source_ips` addresses.
#[derive(Debug, Clone)]
pub struct FleetPlan {
    pub addr: std::net::SocketAddr,
    pub path: crate::fleet::Endpoint,
    pub conns: usize,
    pub procs: usize,
    pub source_ips: u8,
    pub cpu: Option<usize>,
    /// Handshakes in flight per process while connecting.
    pub concurrency: usize,
    /// A plain TCP echo (`--raw`).
    pub raw: bool,
    pub connect_timeout_secs: u64,
}

impl FleetPlan {
    pub fn arg_lists(&self) -> Vec<Vec<OsString>> {
        shares(self.conns, self.procs)
            .into_iter()
            .map(|(first, count)| {
                let mut v: Vec<String> = vec![
                    "idle-worker".into(),
                    "--addr".into(),
                    self.addr.to_string(),
                    "--path".into(),
                    self.path.as_str().into(),
                    "--count".into(),
                    count.to_string(),
                    "--first".into(),
                    first.to_string(),
                    "--source-ips".into(),
                    self.source_ips.to_string(),
                    "--concurrency".into(),
                    self.concurrency.to_string(),
                    "--connect-timeout-secs".into(),
                    self.connect_timeout_secs.to_string(),
                ];
                if self.raw {
                    v.push("--raw".into());
                }
                if let Some(cpu) = self.cpu {
                    v.push("--cpu".into());
                    v.push(cpu.to_string());
                }
                v.into_iter().map(OsString::from).collect()
            })
            .collect()
    }
}

/// Sums `name` over the answers of every process.
pub fn total(replies: &[Reply], name: &str) -> u64 {
    replies.iter().map(|r| r.get(name)).sum()
}

struct Proc {
    child: Child,
    stdin: Option<ChildStdin>,
    /// Lines of the process's stdout, read by a thread of their own.
    lines: Receiver<String>,
}

/// The running client processes.
pub struct Workers {
    procs: Vec<Proc>,
}

impl Workers {
    /// Starts one process per argument list (each run as `<this binary> <args...>`).
    pub fn spawn(arg_lists: Vec<Vec<OsString>>) -> Result<Workers, Error> {
        let exe = std::env::current_exe().map_err(|e| Error::io("find this binary", e))?;
        let mut workers = Workers { procs: Vec::with_capacity(arg_lists.len()) };
        for args in arg_lists {
            let mut cmd = Command::new(&exe);
            cmd.args(&args).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::inherit());
            // SAFETY: prctl is async-signal-safe and changes only the child.
            unsafe {
                cmd.pre_exec(|| crate::server::die_with_parent(libc::SIGKILL));
            }
            let mut child = cmd.spawn().map_err(|e| Error::io("start a client process", e))?;
            let stdin = child.stdin.take();
            let Some(stdout) = child.stdout.take() else {
                return Err(Error::Worker("no stdout pipe".into()));
            };
            let (tx, rx) = mpsc::channel();
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
            workers.procs.push(Proc { child, stdin, lines: rx });
        }
        Ok(workers)
    }

    /// Sends `line` to every process.
    pub fn send(&mut self, line: &str) -> Result<(), Error> {
        for (i, p) in self.procs.iter_mut().enumerate() {
            let Some(stdin) = p.stdin.as_mut() else { continue };
            writeln!(stdin, "{line}")
                .and_then(|_| stdin.flush())
                .map_err(|e| Error::io(format!("send {line:?} to client process {i}"), e))?;
        }
        Ok(())
    }

    /// Waits for one `kind` line from every process, all within `limit`.
    pub fn expect(&mut self, kind: &str, limit: Duration) -> Result<Vec<Reply>, Error> {
        let lines = self.expect_lines(kind, limit)?;
        let mut replies = Vec::with_capacity(lines.len());
        for (i, line) in lines.iter().enumerate() {
            match Reply::parse(line) {
                Some(reply) if reply.kind == kind => replies.push(reply),
                _ => return Err(Error::Worker(format!("process {i} said {line:?}, expected {kind:?}"))),
            }
        }
        Ok(replies)
    }

    /// Waits for one line starting with the word `kind` from every process, all within
    /// `limit`, and returns the lines as they are (for lines that are not `name value`
    /// pairs, such as histograms).
    pub fn expect_lines(&mut self, kind: &str, limit: Duration) -> Result<Vec<String>, Error> {
        let deadline = Instant::now() + limit;
        let mut lines = Vec::with_capacity(self.procs.len());
        for (i, p) in self.procs.iter_mut().enumerate() {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = match p.lines.recv_timeout(left) {
                Ok(line) => line,
                Err(RecvTimeoutError::Timeout) => {
                    return Err(Error::Timeout {
                        what: format!("{kind:?} from client process {i}"),
                        secs: limit.as_secs(),
                    })
                }
                Err(RecvTimeoutError::Disconnected) => {
                    let status = p.child.wait().map(|s| s.to_string()).unwrap_or_else(|e| e.to_string());
                    return Err(Error::Worker(format!("process {i} exited ({status}) before {kind:?}")));
                }
            };
            if line.split_whitespace().next() != Some(kind) {
                return Err(Error::Worker(format!("process {i} said {line:?}, expected {kind:?}")));
            }
            lines.push(line);
        }
        Ok(lines)
    }

    /// The process ids, in the order the processes were started.
    pub fn pids(&self) -> Vec<u32> {
        self.procs.iter().map(|p| p.child.id()).collect()
    }

    /// `send` then `expect`.
    pub fn ask(&mut self, line: &str, kind: &str, limit: Duration) -> Result<Vec<Reply>, Error> {
        self.send(line)?;
        self.expect(kind, limit)
    }

    /// Closes every stdin, waits for the exits within a bound, kills what is left.
    pub fn stop(&mut self) {
        for p in &mut self.procs {
            p.stdin = None;
        }
        // One bound for all of them together.
        let deadline = Instant::now() + EXIT_TIMEOUT;
        for p in &mut self.procs {
            crate::server::reap_within(&mut p.child, deadline.saturating_duration_since(Instant::now()));
        }
        self.procs.clear();
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies() {
        let r = Reply::parse("connected 4500 failed 2 ms 812").expect("parses");
        assert_eq!(
            (r.kind.as_str(), r.get("connected"), r.get("failed"), r.get("ms")),
            ("connected", 4500, 2, 812)
        );
        assert_eq!(r.get("absent"), 0);
        let s = Reply::parse("stats open 3 pongs 6").expect("parses");
        assert_eq!((s.get("open"), s.get("pongs")), (3, 6));
        assert!(Reply::parse("stats open").is_none());
        assert!(Reply::parse("stats open x").is_none());
        let both = [r.clone(), r];
        assert_eq!(total(&both, "connected"), 9000);
    }

    #[test]
    fn shares_cover_everything_once() {
        assert_eq!(shares(19_000, 3), vec![(0, 6334), (6334, 6333), (12_667, 6333)]);
        assert_eq!(shares(2, 5), vec![(0, 1), (1, 1)]);
        assert_eq!(shares(10, 1), vec![(0, 10)]);
    }
}
