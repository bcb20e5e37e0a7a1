//! Domain lifecycle events, so the driver learns at once that a VM stopped
//! or crashed instead of at its next poll.
//!
//! A watcher thread holds its own connection and registers a lifecycle
//! callback on it (libvirt's default event loop, started in
//! [`crate::conn`], dispatches it). The callback only passes the domain's
//! name; the watcher then reads the domain's real state and broadcasts a
//! [`VmEvent`]. Reading the state, rather than trusting the event code,
//! keeps one mapping of libvirt states (`crate::state`) and makes a
//! burst of events for one domain cheap and correct. When the connection
//! dies the watcher reconnects and registers again; events missed meanwhile
//! are covered by the driver's periodic observation. No client keepalive
//! (see [`crate::conn`] for why): a local daemon that goes away closes the
//! socket, which libvirt's event thread notices; a remote one behind a dead
//! link is noticed only when TCP gives up, which is why the driver watches
//! only local hypervisors.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use tokio::sync::broadcast;
use virt::connect::Connect;
use wspare_core::{VmEvent, VmName};

/// How long the watcher waits for a callback before checking its connection.
const POLL: Duration = Duration::from_secs(2);

/// Starts the watcher for `uri`; events go to `tx`. The thread ends when
/// every receiver is gone.
/// `alive` is true while the thread runs.
pub(crate) fn spawn_watcher(uri: String, tx: broadcast::Sender<VmEvent>, alive: Arc<AtomicBool>) {
    crate::conn::init_libvirt();
    alive.store(true, Ordering::SeqCst);
    let name = format!("libvirt-watch {uri}");
    let flag = alive.clone();
    let spawned = std::thread::Builder::new().name(name).spawn(move || {
        watch(&uri, &tx);
        flag.store(false, Ordering::SeqCst);
    });
    if let Err(e) = spawned {
        alive.store(false, Ordering::SeqCst);
        tracing::warn!(error = %e, "cannot start the libvirt event watcher; the driver polls instead");
    }
}

fn watch(uri: &str, tx: &broadcast::Sender<VmEvent>) {
    let mut backoff = Duration::from_millis(500);
    while tx.receiver_count() > 0 {
        let conn = match Connect::open(Some(uri)) {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(%uri, error = %e, "event watcher cannot connect; retrying");
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(30));
                continue;
            }
        };
        let (names_tx, names_rx) = mpsc::channel::<String>();
        let id = match ffi::register_lifecycle(&conn, names_tx) {
            Ok(id) => id,
            Err(e) => {
                tracing::warn!(%uri, error = %e, "libvirt refused lifecycle events; the driver polls instead");
                return;
            }
        };
        backoff = Duration::from_millis(500);
        tracing::debug!(%uri, "watching domain lifecycle events");
        while tx.receiver_count() > 0 && conn.is_alive().unwrap_or(false) {
            match names_rx.recv_timeout(POLL) {
                Ok(name) => {
                    // Coalesce a burst of events for the same domain.
                    let mut names = vec![name];
                    names.extend(names_rx.try_iter());
                    names.sort();
                    names.dedup();
                    for n in names {
                        if let Some(ev) = read_event(&conn, uri, &n) {
                            let _ = tx.send(ev);
                        }
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        ffi::deregister(&conn, id);
        tracing::info!(%uri, "event watcher connection ended; reconnecting");
    }
}

/// The domain's state now, as an event; `None` for names that are not VM
/// names wspare accepts (other tools' domains).
fn read_event(conn: &Connect, uri: &str, name: &str) -> Option<VmEvent> {
    let vm = VmName::new(name).ok()?;
    let at = crate::error::At::new(uri, Some(name));
    let status = crate::hypervisor::status_of(conn, &at, name).ok()?;
    Some(VmEvent { vm, status })
}

/// The FFI surface: virt 0.5 does not wrap domain event registration.
#[allow(unsafe_code)]
mod ffi {
    use std::ffi::CStr;
    use std::os::raw::{c_int, c_void};
    use std::sync::mpsc::Sender;

    use virt::connect::Connect;
    use virt::sys;

    /// The lifecycle callback: sends the domain's name.
    ///
    /// Safety: libvirt calls it with the `opaque` given at registration, a
    /// `*mut Sender<String>` from `Box::into_raw` that stays valid until
    /// `free_sender` runs (libvirt never calls the callback after that), and
    /// a `dom` valid for the duration of the call; `virDomainGetName`
    /// returns a NUL-terminated string owned by `dom`, copied before return.
    unsafe extern "C" fn on_lifecycle(
        _conn: sys::virConnectPtr,
        dom: sys::virDomainPtr,
        _event: c_int,
        _detail: c_int,
        opaque: *mut c_void,
    ) -> c_int {
        let tx = &*(opaque as *const Sender<String>);
        let name = sys::virDomainGetName(dom);
        if !name.is_null() {
            let _ = tx.send(CStr::from_ptr(name).to_string_lossy().into_owned());
        }
        0
    }

    /// Frees the sender when libvirt drops the registration.
    ///
    /// Safety: called once by libvirt with the pointer from `Box::into_raw`.
    unsafe extern "C" fn free_sender(opaque: *mut c_void) {
        drop(Box::from_raw(opaque as *mut Sender<String>));
    }

    /// Registers `on_lifecycle` for every domain of `conn`; returns the
    /// callback id.
    pub(super) fn register_lifecycle(
        conn: &Connect,
        tx: Sender<String>,
    ) -> Result<c_int, virt::error::Error> {
        let opaque = Box::into_raw(Box::new(tx)) as *mut c_void;
        type Lifecycle = unsafe extern "C" fn(
            sys::virConnectPtr,
            sys::virDomainPtr,
            c_int,
            c_int,
            *mut c_void,
        ) -> c_int;
        type Generic = unsafe extern "C" fn(sys::virConnectPtr, sys::virDomainPtr, *mut c_void);
        // Safety: libvirt's API takes every event callback as the generic
        // type and calls it with the signature of the event id
        // (VIR_DOMAIN_EVENT_CALLBACK in libvirt-domain.h); both are
        // `extern "C"` function pointers of the same size.
        let cb = unsafe { std::mem::transmute::<Lifecycle, Generic>(on_lifecycle as Lifecycle) };
        // Safety: `conn.as_ptr()` is a live connection borrowed for the
        // call; a null domain means all domains; on failure libvirt does
        // not keep `opaque` and we free it ourselves.
        let id = unsafe {
            sys::virConnectDomainEventRegisterAny(
                conn.as_ptr(),
                std::ptr::null_mut(),
                sys::VIR_DOMAIN_EVENT_ID_LIFECYCLE as c_int,
                Some(cb),
                opaque,
                Some(free_sender),
            )
        };
        if id < 0 {
            // Safety: registration failed, so libvirt did not take `opaque`.
            unsafe { drop(Box::from_raw(opaque as *mut Sender<String>)) };
            return Err(virt::error::Error::last_error());
        }
        Ok(id)
    }

    /// Drops a registration (libvirt then frees its sender).
    pub(super) fn deregister(conn: &Connect, id: c_int) {
        // Safety: `conn` is live for the call; a stale id only fails.
        unsafe {
            sys::virConnectDomainEventDeregisterAny(conn.as_ptr(), id);
        }
    }
}
