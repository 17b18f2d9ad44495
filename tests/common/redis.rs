//! A real `redis-server` for the cluster tests: its own free loopback port and temp dir,
//! no persistence (a restart loses everything, which the tests use on purpose), killed
//! on drop; and a real three-master Redis Cluster ([`RedisCluster`]) for the pool's
//! cluster mode.

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
        self.child = Some(spawn_redis(self.port, &self.dir, persistence));
    }

    /// Whether the server answers PING now.
    pub fn pings(&self) -> bool {
        pings(self.port)
    }

    /// Kills the server (SIGKILL): its data is gone.
    pub fn kill(&mut self) {
        kill(&mut self.child);
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

/// How long a new Redis Cluster has to reach `cluster_state:ok` on every node.
const CLUSTER_READY: Duration = Duration::from_secs(30);

/// Three `redis-server` masters made one Redis Cluster (no replicas), each on its own free
/// port (and cluster bus port) and temp dir, no persistence; killed on drop.
///
/// `cluster-require-full-coverage no`: a master that is down leaves the others serving
/// their slots (the tests kill one on purpose).
pub struct RedisCluster {
    nodes: Vec<ClusterNode>,
}

struct ClusterNode {
    dir: TempDir,
    port: u16,
    bus: u16,
    child: Option<Child>,
}

impl ClusterNode {
    fn run(&mut self) {
        let bus = self.bus.to_string();
        let config = self.dir.path().join("nodes.conf");
        let args = [
            "--appendonly",
            "no",
            "--cluster-enabled",
            "yes",
            "--cluster-port",
            &bus,
            "--cluster-node-timeout",
            "2000",
            "--cluster-require-full-coverage",
            "no",
            "--cluster-config-file",
            config.to_str().expect("a UTF-8 temp dir"),
        ];
        self.child = Some(spawn_redis(self.port, &self.dir, &args));
    }

    fn kill(&mut self) {
        kill(&mut self.child);
    }
}

/// Starts `redis-server` on loopback `port` in `dir` (no RDB snapshots, its log in
/// `dir/redis.log`) with `extra` arguments, and waits until it answers PING; a server
/// that exits first fails the test with its log.
fn spawn_redis(port: u16, dir: &TempDir, extra: &[&str]) -> Child {
    let log = dir.path().join("redis.log");
    let mut child = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--protected-mode", "no"])
        .args(extra)
        .arg("--dir")
        .arg(dir.path())
        .arg("--logfile")
        .arg(&log)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn redis-server (scripts/test installs it: apt-get install redis-server)");
    let deadline = Instant::now() + REDIS_START;
    while !pings(port) {
        if let Ok(Some(status)) = child.try_wait() {
            let log = std::fs::read_to_string(&log).unwrap_or_default();
            panic!("redis-server on port {port} exited ({status}):\n{log}");
        }
        assert!(Instant::now() < deadline, "redis-server on port {port} never answered PING");
        std::thread::sleep(Duration::from_millis(10));
    }
    child
}

/// Kills a server started by [`spawn_redis`] (SIGKILL) and reaps it.
fn kill(child: &mut Option<Child>) {
    if let Some(mut child) = child.take() {
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl RedisCluster {
    /// Starts the three masters, joins them with `redis-cli --cluster create` (the slots
    /// split in three ranges, in node order) and waits until every node says the cluster
    /// is ok with all 16384 slots assigned.
    pub fn start() -> RedisCluster {
        let mut nodes: Vec<ClusterNode> = (0..3)
            .map(|_| ClusterNode {
                dir: TempDir::new("redis-cluster"),
                port: free_port(),
                bus: free_port(),
                child: None,
            })
            .collect();
        for node in &mut nodes {
            node.run();
        }
        let cluster = RedisCluster { nodes };
        let addrs: Vec<String> = cluster.nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)).collect();
        let out = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .expect("run redis-cli --cluster create");
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        cluster.wait_ok();
        cluster
    }

    /// Waits (bounded) until every running node reports `cluster_state:ok`, all slots
    /// assigned and every node known.
    pub fn wait_ok(&self) {
        let deadline = Instant::now() + CLUSTER_READY;
        loop {
            let ok = self.nodes.iter().enumerate().filter(|(_, n)| n.child.is_some()).all(|(i, _)| {
                let info = self.cli_at(i, &["CLUSTER", "INFO"]);
                info.contains("cluster_state:ok")
                    && info.contains("cluster_slots_assigned:16384")
                    && info.contains(&format!("cluster_known_nodes:{}", self.nodes.len()))
                    && info.contains(&format!("cluster_size:{}", self.nodes.len()))
            });
            if ok {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the cluster never became ok: {}",
                self.cli_at(0, &["CLUSTER", "INFO"])
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The first node's URL (any node would do).
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.nodes[0].port)
    }

    pub fn port(&self, node: usize) -> u16 {
        self.nodes[node].port
    }

    /// The node's cluster id.
    pub fn id(&self, node: usize) -> String {
        self.cli_at(node, &["CLUSTER", "MYID"]).trim().to_owned()
    }

    /// Runs a command with `redis-cli -c` (following redirections) against the first node.
    pub fn cli(&self, args: &[&str]) -> String {
        self.cli_on(0, true, args)
    }

    /// Runs a command with `redis-cli` on node `node` only (no redirection followed).
    pub fn cli_at(&self, node: usize, args: &[&str]) -> String {
        self.cli_on(node, false, args)
    }

    fn cli_on(&self, node: usize, follow: bool, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(["-p", &self.nodes[node].port.to_string()])
            .args(if follow { &["-c"][..] } else { &[][..] })
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run redis-cli");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Kills master `node` (SIGKILL): its data is gone, its slots stay its own.
    pub fn kill_master(&mut self, node: usize) {
        self.nodes[node].kill();
    }

    /// Starts master `node` again on its ports, with its cluster config (same id and
    /// slots) and no data, and waits until the cluster is ok again.
    pub fn restart(&mut self, node: usize) {
        self.nodes[node].kill();
        self.nodes[node].run();
        self.wait_ok();
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            node.kill();
        }
    }
}

/// Whether a server on `port` answers PING now.
fn pings(port: u16) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else { return false };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    if s.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 7];
    s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
}
