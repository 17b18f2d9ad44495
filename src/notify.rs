//! The systemd notify protocol (`sd_notify(3)`), spoken directly: one datagram per state
//! change to the socket named by `NOTIFY_SOCKET`. Without that variable (not under
//! systemd `Type=notify`) every call does nothing.

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

/// The notify socket, if the service manager gave one.
pub struct Notifier {
    socket: Option<(UnixDatagram, String)>,
}

impl Notifier {
    pub fn from_env() -> Notifier {
        let socket = std::env::var("NOTIFY_SOCKET").ok().filter(|p| !p.is_empty()).and_then(|path| {
            let sock = UnixDatagram::unbound().ok()?;
            sock.set_nonblocking(true).ok()?;
            Some((sock, path))
        });
        Notifier { socket }
    }

    /// Sends `state` (e.g. `READY=1`). Failures are ignored: notification is best effort
    /// and must never stop the server.
    pub fn notify(&self, state: &str) {
        let Some((sock, path)) = &self.socket else { return };
        if let Some(name) = path.strip_prefix('@') {
            // An abstract socket: a leading NUL instead of '@'.
            use std::os::linux::net::SocketAddrExt;
            if let Ok(addr) = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()) {
                let _ = sock.send_to_addr(state.as_bytes(), &addr);
            }
        } else {
            let _ = sock.send_to(state.as_bytes(), path);
        }
    }

    /// The watchdog interval systemd expects pets within (`WATCHDOG_USEC`), if any.
    pub fn watchdog_interval() -> Option<Duration> {
        let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
        if let Ok(pid) = std::env::var("WATCHDOG_PID") {
            if pid.parse::<u32>().ok() != Some(std::process::id()) {
                return None;
            }
        }
        (usec > 0).then(|| Duration::from_micros(usec))
    }
}
