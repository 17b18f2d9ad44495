//! What the host allows this process, reported at start with the fix when it is too
//! little for the configuration (open files, locked memory, CPUs).

use tracing::{info, warn};

use crate::config::Config;

/// File descriptors a node needs besides client sockets (listeners, io_uring, logs, ...).
const SPARE_FDS: u64 = 64;

/// Locked memory glommio needs per executor for its rings (measured: a little over
/// 1.5 MiB); below it glommio runs without registered buffers, and below 512 KiB it
/// cannot start an executor at all.
const MEMLOCK_PER_EXECUTOR: u64 = 2 * 1024 * 1024;

/// `kernel.io_uring_disabled` (kernels 6.6+): 0 allows io_uring, 1 only for a group, 2 never.
fn io_uring_disabled() -> Option<u32> {
    std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled").ok()?.trim().parse().ok()
}

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
    let io_uring = match io_uring_disabled() {
        None | Some(0) => "enabled",
        Some(1) => "restricted to kernel.io_uring_group",
        Some(_) => "disabled",
    };
    info!(
        shards,
        open_files = %show(nofile),
        open_files_hard = %show(nofile_max),
        memlock_bytes = %show(memlock),
        io_uring,
        max_connections = config.limits.max_connections,
        "host limits"
    );
    if matches!(io_uring_disabled(), Some(n) if n >= 1) {
        warn!(
            "kernel.io_uring_disabled is set ({io_uring}): ringpush needs io_uring; \
             set it to 0 (tuning/apply.sh does) or run ringpush in kernel.io_uring_group"
        );
    }
    if let Some(locked) = memlock {
        // The shards plus the control thread are glommio executors.
        let wanted = (shards as u64 + 1) * MEMLOCK_PER_EXECUTOR;
        if locked < wanted {
            warn!(
                "locked-memory limit {locked} bytes is below the {wanted} bytes {} executors want: \
                 raise it (systemd LimitMEMLOCK=infinity, as systemd/ringpush.service sets, or \
                 `ulimit -l`); glommio cannot start an executor below 512 KiB",
                shards + 1
            );
        }
    }
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
