//! One libvirt connection, opened lazily, checked before each use and
//! reopened when it died; blocking calls run on tokio's blocking pool with
//! a deadline.
//!
//! **One call at a time per connection.** libvirt's RPC client lets several
//! threads share a connection ("passing the buck"), but up to libvirt 10.3
//! (Debian 12 ships 9.0) a thread that joins while another one polls leaves
//! a GSource pointing into that thread's stack in the connection's event
//! context, and the next thread to poll dispatches it: CVE-2024-4418, a
//! segfault we hit whenever two calls met on a connection whose peer had
//! died. So a [`Conn`] lets one thread into libvirt at a time, and client
//! keepalive stays off (its pings are sent from libvirt's event thread,
//! which would be the second thread). What keepalive was for, noticing a
//! dead peer, the deadlines do: a call whose caller gave up holds on to its
//! connection and the next call opens a fresh one, with at most
//! [`MAX_STUCK`] calls left behind per URI; beyond that calls fail at once
//! instead of tying up more threads.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, Once};
use std::time::Duration;

use virt::connect::Connect;

use crate::error::{At, LibvirtError};

/// Process-wide libvirt set-up, once: silence libvirt's default error
/// printing (every error reaches the caller through [`LibvirtError`]), and
/// run libvirt's default event loop on a thread of its own, which delivers
/// domain events and notices a local daemon that went away.
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
                    tracing::warn!(error = %e, "cannot start the libvirt event loop thread; no domain events");
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot register libvirt's default event loop; no domain events"),
        }
    });
}

/// Calls per URI left inside libvirt by callers that gave up (a dead peer)
/// before further calls fail at once.
pub(crate) const MAX_STUCK: usize = 2;

/// How often a call waiting for its turn checks whether its caller gave up.
const WAIT_SLICE: Duration = Duration::from_millis(100);

/// Set when the caller of a blocking call stopped waiting for it (its
/// deadline passed or its future was dropped).
#[derive(Clone, Debug, Default)]
pub(crate) struct Ticket(Arc<AtomicBool>);

impl Ticket {
    fn given_up(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// Gives the ticket up when the caller's future ends, however it ends.
struct GiveUpOnDrop(Ticket);

impl Drop for GiveUpOnDrop {
    fn drop(&mut self) {
        (self.0).0.store(true, Ordering::SeqCst);
    }
}

struct Slot {
    /// Bumped whenever the connection is replaced.
    generation: u64,
    conn: Option<Connect>,
    /// The ticket of the call inside libvirt on this generation, if any.
    holder: Option<Ticket>,
    /// Calls still inside libvirt on generations left behind.
    stuck: usize,
}

/// A lazily opened, self-healing connection to one URI.
pub(crate) struct Conn {
    uri: String,
    slot: Mutex<Slot>,
    turn: Condvar,
}

impl Conn {
    pub(crate) fn new(uri: &str) -> Conn {
        init_libvirt();
        Conn {
            uri: uri.to_owned(),
            slot: Mutex::new(Slot {
                generation: 0,
                conn: None,
                holder: None,
                stuck: 0,
            }),
            turn: Condvar::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Slot> {
        self.slot.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn timeout(&self, what: String) -> LibvirtError {
        LibvirtError::Timeout {
            at: At::new(&self.uri, None),
            op: "waiting for the connection".into(),
            what,
        }
    }

    /// Waits for this connection's turn. A holder whose caller gave up is
    /// left its connection (it may never return) and the turn moves to a
    /// new generation, unless [`MAX_STUCK`] calls are stuck already.
    /// Returns the generation and its connection, if one is open.
    fn acquire(&self, me: &Ticket) -> Result<(u64, Option<Connect>), LibvirtError> {
        let mut slot = self.lock();
        loop {
            if me.given_up() {
                return Err(self.timeout(
                    "the caller gave up while an earlier call on this connection was still running"
                        .into(),
                ));
            }
            match &slot.holder {
                None => {
                    slot.holder = Some(me.clone());
                    return Ok((slot.generation, slot.conn.clone()));
                }
                Some(h) if h.given_up() => {
                    if slot.stuck >= MAX_STUCK {
                        return Err(self.timeout(format!(
                            "{} earlier calls have not returned (the daemon or the link to it is down); not sending another until one does: check libvirtd on that host and the network path to it",
                            slot.stuck + 1
                        )));
                    }
                    tracing::info!(uri = %self.uri, "a libvirt call outlived its caller; leaving it its connection and opening a new one");
                    slot.stuck += 1;
                    slot.generation += 1;
                    slot.conn = None;
                    slot.holder = Some(me.clone());
                    return Ok((slot.generation, None));
                }
                Some(_) => {
                    slot = self
                        .turn
                        .wait_timeout(slot, WAIT_SLICE)
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                }
            }
        }
    }

    /// Ends the turn of `generation`; `dead` drops its connection.
    fn release(&self, generation: u64, dead: bool) {
        let mut slot = self.lock();
        if slot.generation == generation {
            slot.holder = None;
            if dead {
                slot.conn = None;
            }
        } else {
            slot.stuck = slot.stuck.saturating_sub(1);
        }
        drop(slot);
        self.turn.notify_all();
    }

    /// Opens a connection for `generation` (outside the lock: it may block
    /// for as long as TCP takes to give up).
    fn open(&self, generation: u64) -> Result<Connect, LibvirtError> {
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
        let mut slot = self.lock();
        if slot.generation == generation {
            slot.conn = Some(c.clone());
        }
        Ok(c)
    }

    /// Runs `f` with a live connection, one call at a time (see the module
    /// docs). When `f` fails and the connection is found dead afterwards,
    /// the error is marked as a lost connection (`Unreachable`), the
    /// connection is dropped so the next call reconnects, and, if `retry`
    /// (the call is safe to repeat), `f` runs once more on a fresh
    /// connection. Blocking.
    pub(crate) fn with<T>(
        &self,
        retry: bool,
        me: &Ticket,
        f: &mut dyn FnMut(&Connect) -> Result<T, LibvirtError>,
    ) -> Result<T, LibvirtError> {
        let mut attempts = if retry { 2 } else { 1 };
        loop {
            attempts -= 1;
            let (generation, have) = self.acquire(me)?;
            let c = match have.filter(|c| c.is_alive().unwrap_or(false)) {
                Some(c) => c,
                None => match self.open(generation) {
                    Ok(c) => c,
                    Err(e) => {
                        self.release(generation, true);
                        return Err(e);
                    }
                },
            };
            let r = f(&c);
            let dead = r.is_err() && !c.is_alive().unwrap_or(false);
            drop(c);
            self.release(generation, dead);
            match r {
                Ok(v) => return Ok(v),
                Err(e @ LibvirtError::Call { .. }) if dead => {
                    if attempts == 0 || me.given_up() {
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
/// finishes in the background). The closure's [`Ticket`] is given up when
/// the deadline passes or the caller's future is dropped.
pub(crate) async fn blocking<T: Send + 'static>(
    at: At,
    op: &'static str,
    deadline: Duration,
    f: impl FnOnce(&Ticket) -> Result<T, LibvirtError> + Send + 'static,
) -> Result<T, LibvirtError> {
    let ticket = Ticket::default();
    let _give_up = GiveUpOnDrop(ticket.clone());
    let task = tokio::task::spawn_blocking(move || f(&ticket));
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

    /// One thread inside libvirt per connection; a call whose caller gave
    /// up keeps its connection, the next one opens another, and past
    /// `MAX_STUCK` such calls the next fails at once.
    #[test]
    fn one_call_at_a_time_and_stuck_calls_are_left_behind() {
        use std::sync::atomic::AtomicUsize;
        use std::sync::mpsc;
        let c = Arc::new(Conn::new("test:///default"));
        // Serialised: never two closures at once.
        let inside = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let (c, inside, most) = (c.clone(), inside.clone(), most.clone());
                std::thread::spawn(move || {
                    c.with(false, &Ticket::default(), &mut |conn| {
                        let n = inside.fetch_add(1, Ordering::SeqCst) + 1;
                        most.fetch_max(n, Ordering::SeqCst);
                        std::thread::sleep(Duration::from_millis(30));
                        conn.hyp_version().unwrap();
                        inside.fetch_sub(1, Ordering::SeqCst);
                        Ok(())
                    })
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap().unwrap();
        }
        assert_eq!(most.load(Ordering::SeqCst), 1);

        // Calls that hang inside libvirt after their callers gave up.
        let mut hung = Vec::new();
        let mut conns = Vec::new();
        for _ in 0..=MAX_STUCK {
            let (entered_tx, entered_rx) = mpsc::channel();
            let (go_tx, go_rx) = mpsc::channel::<()>();
            let ticket = Ticket::default();
            let t = {
                let (c, ticket) = (c.clone(), ticket.clone());
                std::thread::spawn(move || {
                    c.with(false, &ticket, &mut |_| {
                        entered_tx.send(()).unwrap();
                        go_rx.recv().unwrap();
                        Ok(())
                    })
                })
            };
            entered_rx
                .recv_timeout(Duration::from_secs(5))
                .expect("the call got its turn");
            conns.push(c.lock().generation);
            ticket.0.store(true, Ordering::SeqCst);
            hung.push((t, go_tx));
        }
        conns.dedup();
        assert_eq!(
            conns.len(),
            MAX_STUCK + 1,
            "each call after a stuck one got a new connection"
        );
        let e = c
            .with(false, &Ticket::default(), &mut |_| Ok(()))
            .unwrap_err();
        assert_eq!(
            wspare_core::BackendError::kind(&e),
            wspare_core::ErrorKind::Timeout
        );
        assert!(e.to_string().contains("have not returned"), "{e}");
        assert!(e.to_string().contains("test:///default"), "{e}");
        // The stuck calls return: calls go through again.
        for (t, go) in hung {
            go.send(()).unwrap();
            t.join().unwrap().unwrap();
        }
        c.with(false, &Ticket::default(), &mut |conn| {
            conn.hyp_version().unwrap();
            Ok(())
        })
        .unwrap();
    }

    #[test]
    fn unreachable_daemon_is_unreachable_and_named() {
        let c = Conn::new("qemu+unix:///system?socket=/nonexistent/wspare-test.sock");
        let e = c
            .with(true, &Ticket::default(), &mut |_| Ok(()))
            .unwrap_err();
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
