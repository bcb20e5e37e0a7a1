//! One libvirt connection, opened lazily, checked before each use and
//! reopened when it died; blocking calls run on tokio's blocking pool with
//! a deadline.

use std::sync::{Arc, Mutex, Once};
use std::time::Duration;

use virt::connect::Connect;

use crate::error::{At, LibvirtError};

/// Process-wide libvirt set-up, once: silence libvirt's default error
/// printing (every error reaches the caller through [`LibvirtError`]), and
/// run libvirt's default event loop on a thread of its own so that
/// keepalive works (a dead remote daemon or SSH link is noticed within
/// seconds instead of at the next TCP timeout).
pub(crate) fn init_libvirt() {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        virt::error::clear_error_callback();
        match virt::event::event_register_default_impl() {
            Ok(()) => {
                let spawned = std::thread::Builder::new()
                    .name("libvirt-events".into())
                    .spawn(|| loop {
                        if let Err(e) = virt::event::event_run_default_impl() {
                            tracing::warn!(error = %e, "libvirt event loop iteration failed");
                            std::thread::sleep(Duration::from_millis(500));
                        }
                    });
                if let Err(e) = spawned {
                    tracing::warn!(error = %e, "cannot start the libvirt event loop thread; keepalive is off");
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot register libvirt's default event loop; keepalive is off"),
        }
    });
}

/// Keepalive: a probe every `INTERVAL` seconds, the connection is closed
/// after `COUNT` unanswered ones.
const KEEPALIVE_INTERVAL: i32 = 5;
const KEEPALIVE_COUNT: u32 = 3;

struct Slot {
    generation: u64,
    conn: Option<Connect>,
}

/// A lazily opened, self-healing connection to one URI.
pub(crate) struct Conn {
    uri: String,
    slot: Mutex<Slot>,
}

impl Conn {
    pub(crate) fn new(uri: &str) -> Conn {
        init_libvirt();
        Conn {
            uri: uri.to_owned(),
            slot: Mutex::new(Slot {
                generation: 0,
                conn: None,
            }),
        }
    }

    /// The live connection, opening a new one if there is none or the last
    /// one died. Blocking.
    fn get(&self) -> Result<(u64, Connect), LibvirtError> {
        let mut slot = self.slot.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = &slot.conn {
            if c.is_alive().unwrap_or(false) {
                return Ok((slot.generation, c.clone()));
            }
            tracing::info!(uri = %self.uri, "libvirt connection lost, reconnecting");
            slot.conn = None;
        }
        let c = Connect::open(Some(&self.uri)).map_err(|e| {
            let err = LibvirtError::call(At::new(&self.uri, None), "connecting", &e);
            match wspare_core::BackendError::kind(&err) {
                wspare_core::ErrorKind::PermissionDenied | wspare_core::ErrorKind::InvalidInput => {
                    err
                }
                _ if is_auth_refusal(e.message()) => LibvirtError::Call {
                    at: At::new(&self.uri, None),
                    op: "connecting (authentication refused)".into(),
                    code: virt::sys::VIR_ERR_AUTH_FAILED as i32,
                    message: e.message().to_owned(),
                    conn_lost: false,
                },
                _ => err.mark_conn_lost(),
            }
        })?;
        // Fails on drivers without keepalive (test://): harmless.
        if let Err(e) = c.set_keep_alive(KEEPALIVE_INTERVAL, KEEPALIVE_COUNT) {
            tracing::debug!(uri = %self.uri, error = %e, "libvirt keepalive not enabled");
        }
        slot.generation += 1;
        slot.conn = Some(c.clone());
        Ok((slot.generation, c))
    }

    /// Drops the connection of `generation` if it is still the current one.
    fn invalidate(&self, generation: u64) {
        let mut slot = self.slot.lock().unwrap_or_else(|p| p.into_inner());
        if slot.generation == generation {
            slot.conn = None;
        }
    }

    /// Runs `f` with a live connection. When `f` fails and the connection is
    /// found dead afterwards, the error is marked as a lost connection
    /// (`Unreachable`), the connection is dropped so the next call
    /// reconnects, and, if `retry` (the call is safe to repeat), `f` runs
    /// once more on a fresh connection. Blocking.
    pub(crate) fn with<T>(
        &self,
        retry: bool,
        f: &mut dyn FnMut(&Connect) -> Result<T, LibvirtError>,
    ) -> Result<T, LibvirtError> {
        let mut attempts = if retry { 2 } else { 1 };
        loop {
            attempts -= 1;
            let (generation, c) = self.get()?;
            match f(&c) {
                Ok(v) => return Ok(v),
                Err(e @ LibvirtError::Call { .. }) if !c.is_alive().unwrap_or(false) => {
                    self.invalidate(generation);
                    if attempts == 0 {
                        return Err(e.mark_conn_lost());
                    }
                    tracing::info!(uri = %self.uri, error = %e, "libvirt connection lost during a call, retrying once");
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// Whether a failed connection was refused for its credentials (SSH's
/// "Permission denied (publickey)", SASL's "authentication failed"), which
/// libvirt reports as a generic system error.
fn is_auth_refusal(message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    m.contains("permission denied (publickey")
        || m.contains("authentication failed")
        || m.contains("host key verification failed")
}

/// Runs a blocking closure on tokio's blocking pool, failing with `Timeout`
/// after `deadline` (the libvirt call itself cannot be interrupted and
/// finishes in the background).
pub(crate) async fn blocking<T: Send + 'static>(
    at: At,
    op: &'static str,
    deadline: Duration,
    f: impl FnOnce() -> Result<T, LibvirtError> + Send + 'static,
) -> Result<T, LibvirtError> {
    let task = tokio::task::spawn_blocking(f);
    match tokio::time::timeout(deadline, task).await {
        Ok(Ok(r)) => r,
        Ok(Err(join)) => Err(LibvirtError::Backend {
            at,
            op: op.into(),
            what: format!("the libvirt worker thread failed: {join}"),
        }),
        Err(_) => Err(LibvirtError::Timeout {
            at,
            op: op.into(),
            what: format!("libvirt did not answer within {deadline:?}"),
        }),
    }
}

/// A shareable [`Conn`].
pub(crate) type SharedConn = Arc<Conn>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auth_refusals_are_recognised() {
        assert!(is_auth_refusal(
            "Cannot recv data: root@127.0.0.1: Permission denied (publickey).: Connection reset by peer"
        ));
        assert!(is_auth_refusal(
            "authentication failed: Failed to start SASL negotiation"
        ));
        assert!(!is_auth_refusal(
            "Failed to connect socket to '/run/libvirt/libvirt-sock': No such file or directory"
        ));
    }

    #[test]
    fn unreachable_daemon_is_unreachable_and_named() {
        let c = Conn::new("qemu+unix:///system?socket=/nonexistent/wspare-test.sock");
        let e = c.with(true, &mut |_| Ok(())).unwrap_err();
        assert_eq!(
            wspare_core::BackendError::kind(&e),
            wspare_core::ErrorKind::Unreachable,
            "{e}"
        );
        let msg = e.to_string();
        assert!(
            msg.contains("qemu+unix:///system?socket=/nonexistent/wspare-test.sock"),
            "{msg}"
        );
        assert!(msg.contains("connecting"), "{msg}");
        assert!(msg.contains("code "), "{msg}");
    }
}
