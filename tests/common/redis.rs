//! A real `redis-server` for the cluster tests: its own free loopback port and temp dir,
//! no persistence (a restart loses everything, which the tests use on purpose), killed
//! on drop.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::TempDir;

/// How long a `redis-server` has to answer PING after it was started.
const REDIS_START: Duration = Duration::from_secs(10);

pub struct Redis {
    dir: TempDir,
    port: u16,
    child: Option<Child>,
    /// Every write is in its append-only file before it is answered: a restart keeps
    /// the data.
    durable: bool,
}

/// A loopback port nothing listens on right now and no other test process holds, for a
/// server that must be restarted on the same port.
///
/// Taken below the kernel's ephemeral range (32768 and up), where the tests' own client
/// sockets would otherwise take it between this check and the bind. Test processes run
/// in parallel (nextest: one process per test), so a port that is merely free now could
/// be picked by another process before its server binds it: each port handed out is
/// reserved with an exclusive `flock` on a file of its own under the temp dir, held until
/// this process exits (the kernel drops the lock then, even after a SIGKILL).
pub fn free_port() -> u16 {
    use std::os::fd::AsRawFd;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Mutex;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    /// The lock files of the ports this process holds; never closed before exit.
    static HELD: Mutex<Vec<std::fs::File>> = Mutex::new(Vec::new());
    let dir = std::env::temp_dir().join("ringpush-test-ports");
    std::fs::create_dir_all(&dir).expect("create the port reservation dir");
    let seed = std::process::id().wrapping_mul(7919)
        ^ std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    for _ in 0..5000 {
        let n = seed.wrapping_add(NEXT.fetch_add(1, Ordering::Relaxed).wrapping_mul(104_729));
        let port = 15_000 + (n % 17_000) as u16;
        let Ok(file) = std::fs::File::create(dir.join(format!("{port}.lock"))) else { continue };
        // SAFETY: flock(2) on a descriptor we own; it touches no memory of ours.
        let locked = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0;
        if locked && TcpListener::bind(("127.0.0.1", port)).is_ok() {
            HELD.lock().unwrap_or_else(|e| e.into_inner()).push(file);
            return port;
        }
    }
    panic!("no free port below the ephemeral range");
}

impl Redis {
    pub fn start() -> Redis {
        let mut redis = Redis { dir: TempDir::new("redis"), port: free_port(), child: None, durable: false };
        redis.run();
        redis
    }

    /// A server that keeps its data across restarts (append-only file, fsync on every
    /// write), as a production Redis behind a cluster is.
    pub fn start_durable() -> Redis {
        let mut redis = Redis { dir: TempDir::new("redis"), port: free_port(), child: None, durable: true };
        redis.run();
        redis
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    fn run(&mut self) {
        let persistence: &[&str] = if self.durable {
            &["--appendonly", "yes", "--appendfsync", "always"]
        } else {
            &["--appendonly", "no"]
        };
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", ""])
            .args(persistence)
            .arg("--dir")
            .arg(self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server (scripts/test installs it: apt-get install redis-server)");
        self.child = Some(child);
        let deadline = Instant::now() + REDIS_START;
        while !self.pings() {
            assert!(Instant::now() < deadline, "redis-server on port {} never answered PING", self.port);
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Whether the server answers PING now.
    pub fn pings(&self) -> bool {
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else { return false };
        let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
        if s.write_all(b"PING\r\n").is_err() {
            return false;
        }
        let mut buf = [0u8; 7];
        s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
    }

    /// Kills the server (SIGKILL): its data is gone.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port, empty.
    pub fn restart(&mut self) {
        self.kill();
        self.run();
    }

    /// Runs a command with `redis-cli` and returns its output (for checking keys).
    pub fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(args)
            .output()
            .expect("run redis-cli");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}
