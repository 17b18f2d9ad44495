//! A `redis-server` of the bench's own: a free loopback port, a temporary directory,
//! stopped when dropped. `cluster` runs one without persistence; `soak` runs one that
//! fsyncs every write to its append-only file and restarts it in place, so a restart
//! keeps every acknowledged message.

use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::error::Error;

/// How long a started redis-server has to listen.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a stopped redis-server has to exit (it writes its files) before SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

pub struct Redis {
    child: Child,
    pub port: u16,
    pub pid: u32,
    dir: PathBuf,
    bin: PathBuf,
    cpu: Option<usize>,
    /// `appendonly yes` with `appendfsync always`.
    durable: bool,
}

impl Redis {
    /// Starts redis-server on a free port, pinned to `cpu` if given. `durable`: every
    /// write is fsynced to the append-only file before Redis answers it.
    pub fn start(bin: &Path, cpu: Option<usize>, durable: bool) -> Result<Redis, Error> {
        let port = free_port()?;
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("ringpush-bench-redis-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(format!("create {}", dir.display()), e))?;
        let child = spawn(bin, cpu, port, &dir, durable)?;
        let redis = Redis { pid: child.id(), child, port, dir, bin: bin.to_path_buf(), cpu, durable };
        redis.wait_listening()?;
        Ok(redis)
    }

    /// Stops redis-server (SIGTERM: it finishes its files) and starts it again on the
    /// same port and directory.
    pub fn restart(&mut self) -> Result<(), Error> {
        self.stop();
        self.child = spawn(&self.bin, self.cpu, self.port, &self.dir, self.durable)?;
        self.pid = self.child.id();
        self.wait_listening()
    }

    fn stop(&mut self) {
        // SAFETY: signalling our own child, which has not been reaped yet.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        crate::server::reap_within(&mut self.child, STOP_TIMEOUT);
    }

    fn wait_listening(&self) -> Result<(), Error> {
        let deadline = Instant::now() + START_TIMEOUT;
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if Instant::now() > deadline {
                return Err(Error::Server(format!("redis-server did not listen on port {}", self.port)));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn spawn(bin: &Path, cpu: Option<usize>, port: u16, dir: &Path, durable: bool) -> Result<Child, Error> {
    let mut cmd = match cpu {
        Some(cpu) => {
            let mut c = Command::new("taskset");
            c.args(["-c", &cpu.to_string()]).arg(bin);
            c
        }
        None => Command::new(bin),
    };
    let persistence: &[&str] =
        if durable { &["--appendonly", "yes", "--appendfsync", "always"] } else { &["--appendonly", "no"] };
    // SAFETY: prctl is async-signal-safe and touches only the child.
    unsafe {
        // redis-server must not outlive the bench, even one killed outright.
        cmd.pre_exec(|| crate::server::die_with_parent(libc::SIGTERM));
    }
    cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", ""])
        .args(persistence)
        .arg("--dir")
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| Error::io(format!("start {} (apt-get install redis-server)", bin.display()), e))
}

/// A loopback port nothing listens on right now, for a server that is restarted on the
/// same port (a node, redis-server). Taken below the kernel's ephemeral range (32768 and
/// up): there, any client socket on the machine (the soak's own devices reconnecting) may
/// take the port as its local one while the server is down, and the restart then cannot
/// bind it. From a spot that differs per process and per call.
pub fn free_port() -> Result<u16, Error> {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let seed = std::process::id().wrapping_mul(7919)
        ^ std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    for _ in 0..1000 {
        let n = seed.wrapping_add(NEXT.fetch_add(1, Ordering::Relaxed).wrapping_mul(104_729));
        let port = 15_000 + (n % 17_000) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    Err(Error::io("find a free loopback port below 32000", std::io::ErrorKind::AddrInUse.into()))
}
