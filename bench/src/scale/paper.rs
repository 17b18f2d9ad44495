//! The million-connection host on paper, from the crowd's measured slopes, and the check
//! of the repository's tuning files against it.
//!
//! A host of C cores and R GiB holds, at default heartbeats, the least of:
//! - **memory**: (R - 4 GiB for the system - `tcp_mem`'s cap for buffers in flight) over
//!   (user-space + kernel bytes per connection);
//! - **descriptors**: `LimitNOFILE` of the unit (less 64 spare), itself capped by
//!   `fs.nr_open`;
//! - **CPU**: heartbeats may take [`CPU_BUDGET`] of the cores: C x budget over (CPU per
//!   heartbeat / ping interval).
//!
//! Ports are no limit for clients that connect directly (they all share the listening
//! port); behind a proxy on the host each (proxy address, upstream address) pair carries at
//! most one `ip_local_port_range` of connections, which is printed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::error::Error;

/// Share of the cores the idle crowd's heartbeats may take; the rest is for traffic.
pub const CPU_BUDGET: f64 = 0.5;

/// Memory kept for the system (kernel, page cache, the rest of the host).
const SYSTEM_GIB: f64 = 4.0;

/// Descriptors a node keeps for itself (`src/limits.rs`, `SPARE_FDS`).
const SPARE_FDS: u64 = 64;

/// The markers of the crowd's section of RESULTS.md.
pub const BEGIN: &str = "<!-- bench:crowd:begin -->";
pub const END: &str = "<!-- bench:crowd:end -->";

const GIB: f64 = 1024.0 * 1024.0 * 1024.0;

/// What one connection costs, measured.
#[derive(Debug, Clone, Copy, Default)]
pub struct Slopes {
    pub user_bytes: f64,
    /// One end's kernel memory.
    pub kernel_bytes: f64,
    pub cpu_us_per_heartbeat: f64,
    pub cpu_us_per_handshake: f64,
    pub cpu_us_per_delivery: f64,
    pub ping_interval_s: f64,
}

impl Slopes {
    /// CPU seconds a second (cores) one idle connection takes.
    fn cores_per_conn(&self) -> f64 {
        self.cpu_us_per_heartbeat / 1e6 / self.ping_interval_s.max(1e-9)
    }
}

/// The repository's tuning: sysctl values and the unit's `LimitNOFILE`.
#[derive(Debug, Clone, Default)]
pub struct Tuning {
    pub sysctl: BTreeMap<String, String>,
    pub limit_nofile: Option<u64>,
    pub sysctl_path: PathBuf,
    pub unit_path: PathBuf,
    /// What `tuning/README.md` says a connection costs (KiB, low and high), if it says.
    pub claimed_user_kib: Option<(f64, f64)>,
    pub claimed_kernel_kib: Option<(f64, f64)>,
}

impl Tuning {
    pub fn read(sysctl: &Path, unit: &Path) -> Result<Tuning, Error> {
        let text = std::fs::read_to_string(sysctl)
            .map_err(|e| Error::io(format!("read {}", sysctl.display()), e))?;
        let unit_text =
            std::fs::read_to_string(unit).map_err(|e| Error::io(format!("read {}", unit.display()), e))?;
        let readme = sysctl.parent().and_then(Path::parent).map(|d| d.join("README.md"));
        let readme = readme.and_then(|p| std::fs::read_to_string(p).ok()).unwrap_or_default();
        Ok(Tuning {
            sysctl: parse_sysctl(&text),
            limit_nofile: parse_unit(&unit_text, "LimitNOFILE"),
            sysctl_path: sysctl.to_path_buf(),
            unit_path: unit.to_path_buf(),
            claimed_user_kib: claim(&readme, "| ringpush, user space"),
            claimed_kernel_kib: claim(&readme, "| kernel, per TCP socket"),
        })
    }

    fn number(&self, key: &str) -> Option<u64> {
        self.sysctl.get(key)?.split_whitespace().next()?.parse().ok()
    }

    fn triple(&self, key: &str) -> Option<[u64; 3]> {
        let v: Vec<u64> = self.sysctl.get(key)?.split_whitespace().filter_map(|w| w.parse().ok()).collect();
        Some([*v.first()?, *v.get(1)?, *v.get(2)?])
    }

    fn ports(&self) -> Option<u64> {
        let [lo, hi] = self
            .sysctl
            .get("net.ipv4.ip_local_port_range")?
            .split_whitespace()
            .filter_map(|w| w.parse::<u64>().ok())
            .collect::<Vec<_>>()[..]
        else {
            return None;
        };
        Some(hi.saturating_sub(lo) + 1)
    }
}

/// `key = value` lines (a leading `-` marks an optional key), comments skipped.
fn parse_sysctl(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (k, v) = l.split_once('=')?;
            Some((k.trim().trim_start_matches('-').to_string(), v.trim().to_string()))
        })
        .collect()
}

/// `Key=N` of a systemd unit (the last one wins, as in systemd).
fn parse_unit(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .rev()
        .filter_map(|l| l.trim().strip_prefix(key)?.strip_prefix('='))
        .find_map(|v| v.trim().parse().ok())
}

/// `~2 KiB` or `~4-5 KiB` in the table row starting with `row`.
fn claim(readme: &str, row: &str) -> Option<(f64, f64)> {
    let line = readme.lines().find(|l| l.starts_with(row))?;
    let at = line.find('~')? + 1;
    let rest = &line[at..];
    let end = rest.find(" KiB")?;
    let nums: Vec<f64> = rest[..end].split('-').filter_map(|n| n.trim().parse().ok()).collect();
    Some((*nums.first()?, *nums.last()?))
}

/// One host on paper.
#[derive(Debug, Clone)]
pub struct Host {
    pub cores: u32,
    pub ram_gib: u32,
    pub mem_conns: u64,
    pub fd_conns: Option<u64>,
    pub cpu_conns: u64,
    /// The connections it holds: the least of the three.
    pub conns: u64,
    pub binds: &'static str,
    /// Cores the idle crowd takes at `conns`.
    pub idle_cores: f64,
    /// CPU seconds on all cores to take every client back (a restart), and to broadcast
    /// to everyone.
    pub storm_secs: f64,
    pub broadcast_secs: f64,
    pub memory_gib: f64,
    /// (proxy address, upstream address) pairs a local proxy would need.
    pub proxy_pairs: Option<u64>,
}

impl Host {
    pub fn plan(s: &Slopes, tuning: &Tuning, cores: u32, ram_gib: u32) -> Host {
        let buffers_gib = tuning.triple("net.ipv4.tcp_mem").map_or(0.0, |t| t[2] as f64 * 4096.0 / GIB);
        let usable = (f64::from(ram_gib) - SYSTEM_GIB - buffers_gib).max(0.0) * GIB;
        let per_conn = (s.user_bytes + s.kernel_bytes).max(1.0);
        let mem_conns = (usable / per_conn) as u64;
        let fd_conns = tuning.limit_nofile.map(|n| {
            let n = tuning.number("fs.nr_open").map_or(n, |cap| n.min(cap));
            n.saturating_sub(SPARE_FDS)
        });
        let cpu_conns = (f64::from(cores) * CPU_BUDGET / s.cores_per_conn().max(1e-12)) as u64;
        let mut binds = ("memory", mem_conns);
        if let Some(fd) = fd_conns {
            if fd < binds.1 {
                binds = ("descriptors (LimitNOFILE)", fd);
            }
        }
        if cpu_conns < binds.1 {
            binds = ("CPU (heartbeats)", cpu_conns);
        }
        let conns = binds.1;
        let n = conns as f64;
        Host {
            cores,
            ram_gib,
            mem_conns,
            fd_conns,
            cpu_conns,
            conns,
            binds: binds.0,
            idle_cores: n * s.cores_per_conn(),
            storm_secs: n * s.cpu_us_per_handshake / 1e6 / f64::from(cores),
            broadcast_secs: n * s.cpu_us_per_delivery / 1e6 / f64::from(cores),
            memory_gib: n * per_conn / GIB,
            proxy_pairs: tuning.ports().map(|p| conns.div_ceil(p.max(1))),
        }
    }
}

/// One line per check; lines that disagree start with `DISAGREES`.
pub fn check(s: &Slopes, hosts: &[Host], t: &Tuning) -> Vec<String> {
    let mut out = Vec::new();
    let sysctl = t.sysctl_path.display();
    let unit = t.unit_path.display();
    let mut line = |ok: bool, text: String| {
        out.push(if ok { format!("agrees: {text}") } else { format!("DISAGREES: {text}") });
    };
    let nr_open = t.number("fs.nr_open");
    let file_max = t.number("fs.file-max");
    match (t.limit_nofile, nr_open) {
        (Some(l), Some(n)) => {
            line(n >= l, format!("fs.nr_open = {n} ({sysctl}) >= LimitNOFILE={l} ({unit})"))
        }
        _ => line(false, format!("LimitNOFILE ({unit}) or fs.nr_open ({sysctl}) not found")),
    }
    let biggest = hosts.iter().map(|h| h.conns).max().unwrap_or(0);
    if let (Some(f), Some(l)) = (file_max, t.limit_nofile) {
        line(
            f >= l,
            format!("fs.file-max = {f} >= LimitNOFILE={l}: one node's descriptors fit the system's"),
        );
    }
    for h in hosts {
        let room = h.mem_conns.min(h.cpu_conns);
        if let Some(l) = t.limit_nofile {
            line(
                l >= 1_000_000 || room < l,
                format!(
                    "{} cores / {} GiB: memory and CPU would hold {room} connections; LimitNOFILE={l} {}",
                    h.cores,
                    h.ram_gib,
                    if room > l {
                        "is what binds first (raise it with fs.nr_open to use the host)"
                    } else {
                        "is not reached"
                    }
                ),
            );
        }
        line(
            h.conns >= 1_000_000,
            format!(
                "{} cores / {} GiB holds {} connections (bound by {}): the tuning files are written for ~1,000,000",
                h.cores, h.ram_gib, h.conns, h.binds
            ),
        );
    }
    if let Some([lo, pressure, hi]) = t.triple("net.ipv4.tcp_mem") {
        let cap_gib = hi as f64 * 4096.0 / GIB;
        let mut rams: Vec<u32> = hosts.iter().map(|h| h.ram_gib).collect();
        rams.dedup();
        for ram in rams {
            line(
                cap_gib <= f64::from(ram) / 2.0,
                format!("tcp_mem cap {hi} pages = {cap_gib:.1} GiB stays within half of {ram} GiB"),
            );
        }
        // The file sizes tcp_mem for 1M sockets at the kernel's minimum buffers: it does
        // not cover the idle sockets themselves (slabs), which the measurement adds.
        let idle_pages = (biggest as f64 * s.kernel_bytes / 4096.0) as u64;
        line(
            true,
            format!(
                "tcp_mem = {lo} {pressure} {hi} counts buffer pages only; the {biggest} idle sockets' own kernel memory \
                 ({idle_pages} pages, measured) comes on top and is in the memory bound above"
            ),
        );
    }
    let user_kib = s.user_bytes / 1024.0;
    let kernel_kib = s.kernel_bytes / 1024.0;
    if let Some((lo, hi)) = t.claimed_user_kib {
        line(
            user_kib >= lo * 0.75 && user_kib <= hi * 1.25,
            format!("tuning/README.md says ~{} KiB of ringpush user space per connection; measured {user_kib:.2} KiB", range(lo, hi)),
        );
    }
    if let Some((lo, hi)) = t.claimed_kernel_kib {
        line(
            kernel_kib >= lo * 0.75 && kernel_kib <= hi * 1.25,
            format!("tuning/README.md says ~{} KiB of kernel per TCP socket; measured {kernel_kib:.2} KiB (one end)", range(lo, hi)),
        );
    }
    if let Some(somax) = t.number("net.core.somaxconn") {
        for h in hosts {
            // After a node's drain, its clients come back within reconnect_spread_ms (10 s).
            let arrivals = h.conns as f64 / 10.0;
            let capacity = f64::from(h.cores) * 1e6 / s.cpu_us_per_handshake.max(1e-9);
            let queued = ((arrivals - capacity) * 10.0).max(0.0) as u64;
            line(
                queued <= somax,
                format!(
                    "{} cores: a drain's {} clients return at {arrivals:.0}/s against {capacity:.0} handshakes/s; \
                     at most {queued} wait in a backlog of somaxconn = {somax}",
                    h.cores, h.conns
                ),
            );
        }
    }
    out
}

/// `2` or `4-5`.
fn range(lo: f64, hi: f64) -> String {
    if lo == hi {
        format!("{lo}")
    } else {
        format!("{lo}-{hi}")
    }
}

fn count(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

pub fn human(s: &Slopes, hosts: &[Host], checks: &[String]) -> String {
    let mut out = format!(
        "  on paper   slopes: {:.0} user + {:.0} kernel bytes per connection; {:.1} µs CPU per heartbeat (every {} s), \
         {:.1} µs per handshake, {:.2} µs per delivery\n",
        s.user_bytes, s.kernel_bytes, s.cpu_us_per_heartbeat, s.ping_interval_s, s.cpu_us_per_handshake, s.cpu_us_per_delivery
    );
    for h in hosts {
        out += &format!(
            "  host       {} cores / {} GiB: {} connections (memory {}, descriptors {}, CPU at {:.0}% {}): bound by {}; \
             idle {:.2} cores, all back after a restart in {:.1} s of all cores, broadcast {:.2} s\n",
            h.cores,
            h.ram_gib,
            count(h.conns),
            count(h.mem_conns),
            h.fd_conns.map_or("?".into(), count),
            CPU_BUDGET * 100.0,
            count(h.cpu_conns),
            h.binds,
            h.idle_cores,
            h.storm_secs,
            h.broadcast_secs
        );
    }
    for c in checks {
        out += &format!("  tuning     {c}\n");
    }
    out
}

pub fn markdown(s: &Slopes, hosts: &[Host], checks: &[String]) -> String {
    let mut out = String::from("### The million-connection host, on paper\n\n");
    out += &format!(
        "From this run's slopes: {:.0} bytes of user space and {:.0} bytes of kernel (one end) per connection; \
         {:.1} µs of CPU per heartbeat (one ping and its pong, every {} s: the idle CPU over the heartbeats a \
         second), {:.1} µs per handshake (the fill), {:.2} µs per delivery (the broadcast). Memory: RAM less {SYSTEM_GIB} GiB \
         for the system and less `tcp_mem`'s cap for buffers in flight; descriptors: `LimitNOFILE` (capped by \
         `fs.nr_open`) less {SPARE_FDS}; CPU: heartbeats may take {:.0}% of the cores.\n\n",
        s.user_bytes,
        s.kernel_bytes,
        s.cpu_us_per_heartbeat,
        s.ping_interval_s,
        s.cpu_us_per_handshake,
        s.cpu_us_per_delivery,
        CPU_BUDGET * 100.0
    );
    out += "| host | memory allows | descriptors allow | CPU allows | holds | bound by | idle CPU | all back after a restart | broadcast to all |\n";
    out += "| --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: |\n";
    for h in hosts {
        out += &format!(
            "| {} cores, {} GiB | {} | {} | {} | **{}** | {} | {:.2} cores | {:.1} s | {:.2} s |\n",
            h.cores,
            h.ram_gib,
            count(h.mem_conns),
            h.fd_conns.map_or("?".into(), count),
            count(h.cpu_conns),
            count(h.conns),
            h.binds,
            h.idle_cores,
            h.storm_secs,
            h.broadcast_secs
        );
    }
    out += "\nThe repository's tuning against it (`tuning/sysctl.d/90-ringpush.conf`, `systemd/ringpush.service`, `tuning/README.md`):\n\n";
    for c in checks {
        out += &format!("- {c}\n");
    }
    out
}

pub fn json(s: &Slopes, hosts: &[Host], checks: &[String]) -> Value {
    json!({
        "slopes": {"user_bytes": s.user_bytes.round(), "kernel_bytes": s.kernel_bytes.round(),
            "cpu_us_per_heartbeat": s.cpu_us_per_heartbeat, "cpu_us_per_handshake": s.cpu_us_per_handshake,
            "cpu_us_per_delivery": s.cpu_us_per_delivery, "ping_interval_s": s.ping_interval_s},
        "hosts": hosts.iter().map(|h| json!({"cores": h.cores, "ram_gib": h.ram_gib, "mem_conns": h.mem_conns,
            "fd_conns": h.fd_conns, "cpu_conns": h.cpu_conns, "conns": h.conns, "binds": h.binds,
            "idle_cores": h.idle_cores, "storm_secs": h.storm_secs, "broadcast_secs": h.broadcast_secs,
            "memory_gib": h.memory_gib, "proxy_pairs": h.proxy_pairs})).collect::<Vec<_>>(),
        "checks": checks,
        "disagreements": checks.iter().filter(|c| c.starts_with("DISAGREES")).count(),
    })
}

/// Rewrites the crowd's section of `path` (between [`BEGIN`] and [`END`]); appends the
/// section with its markers when the file has none.
pub fn write_section(path: &Path, body: &str) -> Result<(), Error> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(format!("read {}", path.display()), e))?;
    let out = replace_section(&text, body);
    std::fs::write(path, out).map_err(|e| Error::io(format!("write {}", path.display()), e))
}

fn replace_section(text: &str, body: &str) -> String {
    match (text.find(BEGIN), text.find(END)) {
        (Some(b), Some(e)) if b < e => {
            format!("{}{BEGIN}\n{}\n{}", &text[..b], body.trim_end(), &text[e..])
        }
        _ => format!(
            "{}\n{BEGIN}\n{}\n{END}\n",
            text.trim_end_matches('\n').to_string() + "\n",
            body.trim_end()
        ),
    }
}

/// `YYYY-MM-DD HH:MM UTC` now.
pub fn utc_now() -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rest) = ((secs / 86_400) as i64, secs % 86_400);
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02} UTC", rest / 3600, rest % 3600 / 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tuning() -> Tuning {
        Tuning {
            sysctl: parse_sysctl(
                "# c\nfs.file-max = 4194304\nfs.nr_open = 2097152\nnet.core.somaxconn = 65535\n\
                 net.ipv4.ip_local_port_range = 10240 65535\nnet.ipv4.tcp_mem = 1048576 2097152 3145728\n\
                 -net.netfilter.nf_conntrack_max = 2097152\n",
            ),
            limit_nofile: parse_unit(
                "[Service]\nLimitNOFILE=1048576\nLimitMEMLOCK=infinity\n",
                "LimitNOFILE",
            ),
            ..Tuning::default()
        }
    }

    #[test]
    fn files_are_read() {
        let t = tuning();
        assert_eq!(t.number("fs.nr_open"), Some(2_097_152));
        assert_eq!(t.number("net.netfilter.nf_conntrack_max"), Some(2_097_152));
        assert_eq!(t.triple("net.ipv4.tcp_mem"), Some([1_048_576, 2_097_152, 3_145_728]));
        assert_eq!(t.ports(), Some(55_296));
        assert_eq!(t.limit_nofile, Some(1_048_576));
        assert_eq!(
            claim("| kernel, per TCP socket | x | ~4-5 KiB |", "| kernel, per TCP socket"),
            Some((4.0, 5.0))
        );
        assert_eq!(
            claim("| ringpush, user space | x | ~2 KiB |", "| ringpush, user space"),
            Some((2.0, 2.0))
        );
    }

    #[test]
    fn the_least_limit_binds() {
        let s = Slopes {
            user_bytes: 2000.0,
            kernel_bytes: 3000.0,
            cpu_us_per_heartbeat: 10.0,
            cpu_us_per_handshake: 100.0,
            cpu_us_per_delivery: 2.0,
            ping_interval_s: 25.0,
        };
        let h = Host::plan(&s, &tuning(), 16, 64);
        // (64 - 4 - 12) GiB / 5000 bytes.
        assert_eq!(h.mem_conns, (48.0 * GIB / 5000.0) as u64);
        assert_eq!(h.fd_conns, Some(1_048_576 - 64));
        // 16 cores x 0.5 / (10 µs / 25 s).
        assert_eq!(h.cpu_conns, 20_000_000);
        assert_eq!(h.binds, "descriptors (LimitNOFILE)");
        assert_eq!(h.conns, 1_048_512);
        let checks = check(&s, &[h], &tuning());
        assert!(checks.iter().any(|c| c.starts_with("agrees: fs.nr_open")), "{checks:?}");
    }

    #[test]
    fn the_section_is_replaced_or_appended() {
        let body = "## x\nnew";
        let text = format!("# R\n\n{BEGIN}\nold\n{END}\ntail\n");
        assert_eq!(replace_section(&text, body), format!("# R\n\n{BEGIN}\n## x\nnew\n{END}\ntail\n"));
        let appended = replace_section("# R\n", body);
        assert_eq!(appended, format!("# R\n\n{BEGIN}\n## x\nnew\n{END}\n"));
        assert_eq!(replace_section(&appended, "y"), format!("# R\n\n{BEGIN}\ny\n{END}\n"));
    }

    #[test]
    fn dates() {
        assert_eq!(utc_now().len(), "2026-11-27 17:57 UTC".len());
    }
}
