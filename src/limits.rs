//! What the host allows this process, reported at start with the fix when it is too
//! little for the configuration (open files, locked memory, CPUs).

use tracing::{info, warn};

use crate::config::Config;

/// File descriptors a node needs besides client sockets (listeners, io_uring, logs, ...).
const SPARE_FDS: u64 = 64;

/// The soft and hard limits of one resource, `None` where unlimited.
fn rlimit(resource: libc::__rlimit_resource_t) -> (Option<u64>, Option<u64>) {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes into the struct we own.
    if unsafe { libc::getrlimit(resource, &mut lim) } != 0 {
        return (None, None);
    }
    let v = |x: libc::rlim_t| (x != libc::RLIM_INFINITY).then_some(x);
    (v(lim.rlim_cur), v(lim.rlim_max))
}

/// Logs the limits that bound this node and warns when `max_connections` is above what
/// the open-file limit allows.
pub fn report(config: &Config, shards: usize) {
    let (nofile, nofile_max) = rlimit(libc::RLIMIT_NOFILE);
    let (memlock, _) = rlimit(libc::RLIMIT_MEMLOCK);
    let show = |v: Option<u64>| v.map_or("unlimited".to_string(), |n| n.to_string());
    info!(
        shards,
        open_files = %show(nofile),
        open_files_hard = %show(nofile_max),
        memlock_bytes = %show(memlock),
        max_connections = config.limits.max_connections,
        "host limits"
    );
    if let Some(n) = nofile {
        let usable = n.saturating_sub(SPARE_FDS);
        if (config.limits.max_connections as u64) > usable {
            warn!(
                "limits.max_connections = {} but the open-file limit allows about {usable} connections: \
                 raise it (systemd LimitNOFILE=, `ulimit -n`, and fs.nr_open via tuning/apply.sh) \
                 or lower limits.max_connections",
                config.limits.max_connections
            );
        }
    }
}
