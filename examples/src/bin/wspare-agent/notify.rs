//! systemd's notification protocol, without systemd's library: datagrams
//! to `$NOTIFY_SOCKET` (a path, or `@name` for an abstract socket).
//!
//! `READY=1` once the driver runs and the sockets are bound, `RELOADING=1`
//! then `READY=1` around a SIGHUP reload, `STOPPING=1` at shutdown, and
//! `WATCHDOG=1` every half `$WATCHDOG_USEC` while the driver answers (a
//! driver stuck for longer gets the agent restarted by systemd). With
//! `Type=notify` and `WatchdogSec=` in the unit, that is all systemd needs.

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

/// Where notifications go; a no-op without `$NOTIFY_SOCKET`.
pub(crate) struct Notifier {
    sock: Option<(UnixDatagram, std::os::unix::net::SocketAddr)>,
    watchdog: Option<Duration>,
}

impl Notifier {
    /// From the environment.
    pub(crate) fn from_env() -> Notifier {
        let sock = std::env::var("NOTIFY_SOCKET").ok().and_then(|p| {
            let addr = if let Some(name) = p.strip_prefix('@') {
                use std::os::linux::net::SocketAddrExt;
                std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).ok()?
            } else {
                std::os::unix::net::SocketAddr::from_pathname(&p).ok()?
            };
            let s = UnixDatagram::unbound().ok()?;
            Some((s, addr))
        });
        // WATCHDOG_PID, when set, must be this process.
        let ours = std::env::var("WATCHDOG_PID")
            .ok()
            .map(|p| p.trim() == std::process::id().to_string())
            .unwrap_or(true);
        let watchdog = std::env::var("WATCHDOG_USEC")
            .ok()
            .and_then(|u| u.trim().parse::<u64>().ok())
            .filter(|u| *u > 0 && ours)
            .map(Duration::from_micros);
        Notifier { sock, watchdog }
    }

    /// Sends one notification ("READY=1"); errors are logged, not fatal.
    pub(crate) fn send(&self, state: &str) {
        if let Some((s, addr)) = &self.sock {
            if let Err(e) = s.send_to_addr(state.as_bytes(), addr) {
                tracing::warn!(error = %e, state, "cannot notify the service manager");
            }
        }
    }

    /// How often to send WATCHDOG=1 (half the watchdog timeout).
    pub(crate) fn watchdog_every(&self) -> Option<Duration> {
        self.watchdog.map(|w| w / 2)
    }
}
