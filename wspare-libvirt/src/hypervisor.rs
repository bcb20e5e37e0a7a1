//! [`LibvirtHypervisor`]: the [`Hypervisor`] trait on libvirt.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use virt::connect::Connect;
use virt::domain::{Domain, DomainStateReason};
use virt::sys;
use wspare_core::{
    Consistency, DiskSpec, FrozenDisk, FrozenDisks, Hypervisor, HypervisorCaps, Result, UnixMillis,
    VmName, VmSpec, VmState, VmStatus,
};

use crate::blockjob::{block_job, BlockJobOp};
use crate::config::{Driver, LibvirtConfig};
use crate::conn::{blocking, Conn, SharedConn};
use crate::error::{At, LibvirtError};
use crate::state::map_state;
use crate::xml::{self, DomainType, RenderOptions, SnapshotDisk, XmlDisk};

/// Marks the file names of freeze overlays: `<image>.wspare-overlay-<ms>.qcow2`.
pub const OVERLAY_MARK: &str = ".wspare-overlay-";

/// The [`Hypervisor`] for one host's libvirt (QEMU/KVM, Xen through libxl,
/// or the test driver).
///
/// Cheap to clone (one shared connection). The connection is opened at the
/// first call, checked before every call and reopened when it died (a
/// restarted libvirtd, a broken SSH link); a call that found the
/// connection dead fails with `Unreachable`, and calls that are safe to
/// repeat (status, list, spec, define, start, shutdown, destroy, undefine)
/// are retried once on a fresh connection first. Every libvirt call runs on
/// tokio's blocking pool under [`LibvirtConfig::call_timeout`].
///
/// # Contract points that need care
///
/// - **H1**: a domain that disappears between lookup and the call reads as
///   `Missing` / fails `NotFound` (libvirt's `VIR_ERR_NO_DOMAIN`).
///   `attach_disk`, `detach_disk` and `freeze_disks` look the domain up
///   before checking the capability, so a missing VM is `NotFound` on every
///   driver.
/// - **H2**: `spec` reads the *persistent* definition. libvirt also
///   rewrites it during a freeze (the disk points at the overlay); `spec`
///   reports the frozen image instead, so a spec read during a replication
///   cycle is still the VM's.
/// - **H3**: a redefinition keeps the domain's UUID (libvirt refuses a new
///   UUID for an existing name).
/// - **H6**: the ACPI request is repeated every 2 s until the deadline, so
///   a guest still booting when the first one arrived still gets one.
/// - **H7**: libvirt would undefine a running domain (making it transient);
///   this backend refuses with `Conflict` instead.
/// - **H8** (QEMU only): the freeze is an external disk-only snapshot
///   (`--disk-only --atomic --no-metadata`), quiesced by the guest agent
///   when one answers, else crash consistent (reported in
///   [`FrozenDisks::consistency`]); the release is an active block commit,
///   a pivot, and deletion of the overlay by libvirt (plus a local
///   clean-up for local URIs). `release_disks` is idempotent: disks already
///   back on their image are skipped, a commit job still running from an
///   earlier attempt is awaited rather than restarted.
/// - **H9**: a live detach waits (up to [`LibvirtConfig::detach_timeout`])
///   until the guest has released the disk, which libvirt does not.
/// - **H10**: domains whose names are not valid [`VmName`]s are left out
///   of `list` (with a warning): wspare cannot manage them.
#[derive(Clone)]
pub struct LibvirtHypervisor {
    inner: Arc<Inner>,
}

struct Inner {
    cfg: LibvirtConfig,
    driver: Driver,
    domain_type: DomainType,
    conn: SharedConn,
    /// Lifecycle events, started by the first `events()` call.
    events: std::sync::OnceLock<tokio::sync::broadcast::Sender<wspare_core::VmEvent>>,
    /// Whether the event watcher thread runs.
    watching: Arc<std::sync::atomic::AtomicBool>,
}

impl std::fmt::Debug for LibvirtHypervisor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LibvirtHypervisor")
            .field("uri", &self.inner.cfg.uri)
            .field("domain_type", &self.inner.domain_type)
            .finish()
    }
}

impl LibvirtHypervisor {
    /// A backend for `cfg`. Does not connect yet: the first call does, so a
    /// host that is down at start-up is an `Unreachable` call later, not a
    /// construction failure. Fails with `InvalidInput` for a URI without a
    /// scheme or an unknown driver without a configured domain type.
    pub fn new(cfg: LibvirtConfig) -> Result<Self> {
        let driver = Driver::from_uri(&cfg.uri)?;
        let domain_type = cfg.effective_domain_type()?;
        let conn = Arc::new(Conn::new(&cfg.uri));
        Ok(LibvirtHypervisor {
            inner: Arc::new(Inner {
                cfg,
                driver,
                domain_type,
                conn,
                events: std::sync::OnceLock::new(),
                watching: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            }),
        })
    }

    /// Shorthand for [`LibvirtHypervisor::new`] with defaults for `uri`.
    pub fn connect_uri(uri: &str) -> Result<Self> {
        Self::new(LibvirtConfig::new(uri))
    }

    /// The configuration.
    pub fn config(&self) -> &LibvirtConfig {
        &self.inner.cfg
    }

    /// The connection URI.
    pub fn uri(&self) -> &str {
        &self.inner.cfg.uri
    }

    /// Where the serial console of `vm` is written, if the backend is
    /// configured with a console directory.
    pub fn console_log(&self, vm: &VmName) -> Option<PathBuf> {
        self.inner
            .cfg
            .console_log_dir
            .as_ref()
            .map(|d| d.join(format!("{vm}.console.log")))
    }

    /// The domain XML this backend would define for `spec` (for review,
    /// `virsh define`, or the tests).
    pub fn render(&self, spec: &VmSpec) -> Result<String> {
        spec.validate()
            .map_err(|e| e.context(format!("libvirt {}", self.inner.cfg.uri)))?;
        Ok(self.render_with_uuid(spec, None)?)
    }

    /// Renders a spec that passed [`VmSpec::validate`], keeping `uuid`.
    fn render_with_uuid(
        &self,
        spec: &VmSpec,
        uuid: Option<String>,
    ) -> Result<String, LibvirtError> {
        let mut o = RenderOptions::new(self.inner.domain_type);
        o.arch.clone_from(&self.inner.cfg.arch);
        o.machine.clone_from(&self.inner.cfg.machine);
        o.uuid = uuid;
        o.console_log = self.console_log(&spec.name);
        o.guest_agent = self.inner.cfg.guest_agent;
        xml::render_domain(spec, &o)
            .map_err(|what| self.invalid(Some(&spec.name), "rendering the domain XML", what))
    }

    fn at(&self, vm: Option<&VmName>) -> At {
        At::new(&self.inner.cfg.uri, vm.map(VmName::as_str))
    }

    fn invalid(&self, vm: Option<&VmName>, op: &str, what: impl Into<String>) -> LibvirtError {
        LibvirtError::InvalidInput {
            at: self.at(vm),
            op: op.into(),
            what: what.into(),
        }
    }

    /// Runs `f` on the blocking pool with a live connection (see
    /// [`Conn::with`]).
    async fn call<T: Send + 'static>(
        &self,
        vm: Option<&VmName>,
        op: &'static str,
        retry: bool,
        mut f: impl FnMut(&Connect, &At) -> Result<T, LibvirtError> + Send + 'static,
    ) -> Result<T, LibvirtError> {
        let inner = self.inner.clone();
        let at = self.at(vm);
        let at2 = at.clone();
        blocking(at, op, self.inner.cfg.call_timeout, move |ticket| {
            inner.conn.with(retry, ticket, &mut |c| f(c, &at2))
        })
        .await
    }

    async fn sleep_poll(&self) {
        tokio::time::sleep(self.inner.cfg.poll_interval).await;
    }

    fn undefine_flags(&self) -> u32 {
        match self.inner.driver {
            Driver::Qemu => {
                sys::VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
                    | sys::VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
                    | sys::VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
                    | sys::VIR_DOMAIN_UNDEFINE_KEEP_NVRAM
            }
            Driver::Test => {
                sys::VIR_DOMAIN_UNDEFINE_MANAGED_SAVE | sys::VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
            }
            Driver::Xen | Driver::Other => 0,
        }
    }

    fn overlay_path(
        &self,
        vm: &VmName,
        image: &Path,
        millis: u64,
    ) -> Result<PathBuf, LibvirtError> {
        let name = image.file_name().and_then(|n| n.to_str()).ok_or_else(|| {
            self.invalid(
                Some(vm),
                "freezing the disks",
                format!("image path {image:?} has no file name"),
            )
        })?;
        let dir = match &self.inner.cfg.overlay_dir {
            Some(d) => d.clone(),
            None if image.starts_with("/dev") => {
                return Err(self.invalid(
                    Some(vm),
                    "freezing the disks",
                    format!(
                    "{} is a block device: set overlay_dir so the freeze overlay has a place to go",
                    image.display()
                ),
                ))
            }
            None => image
                .parent()
                .map(Path::to_path_buf)
                .unwrap_or_else(|| PathBuf::from("/")),
        };
        Ok(dir.join(format!("{name}{OVERLAY_MARK}{millis}.qcow2")))
    }
}

// ---- blocking helpers, run inside `call` ----

fn lookup(c: &Connect, at: &At, name: &str) -> Result<Domain, LibvirtError> {
    c.lookup_domain_by_name(name)
        .map_err(|e| LibvirtError::call(at.clone(), "looking up the domain", &e))
}

fn lookup_opt(c: &Connect, at: &At, name: &str) -> Result<Option<Domain>, LibvirtError> {
    match lookup(c, at, name) {
        Ok(d) => Ok(Some(d)),
        Err(e) if e.is_code(sys::VIR_ERR_NO_DOMAIN) => Ok(None),
        Err(e) => Err(e),
    }
}

/// The state of domain `name`, `Missing` if it is not defined.
pub(crate) fn status_of(c: &Connect, at: &At, name: &str) -> Result<VmStatus, LibvirtError> {
    match lookup_opt(c, at, name)? {
        None => Ok(VmStatus::new(VmState::Missing)),
        Some(dom) => domain_status(&dom, at),
    }
}

/// Whether `path` is one of this backend's freeze overlays.
fn is_overlay(path: &Path) -> bool {
    path.to_string_lossy().contains(OVERLAY_MARK)
}

fn domain_status(dom: &Domain, at: &At) -> Result<VmStatus, LibvirtError> {
    // virt 0.5's `state()` drops the call's error and reports state -1.
    let (state, reason) = dom
        .state()
        .map_err(|e| LibvirtError::call(at.clone(), "reading the state", &e))?;
    let raw_state = state.to_raw();
    if raw_state == u32::MAX {
        let e = virt::error::Error::last_error();
        if e.code().to_raw() == sys::VIR_ERR_NO_DOMAIN {
            return Ok(VmStatus::new(VmState::Missing));
        }
        return Err(LibvirtError::call(at.clone(), "reading the state", &e));
    }
    let raw_reason = match reason {
        virt::enumutil::Enum::Known(r) => match r {
            DomainStateReason::NoState(r) => r.to_raw() as i32,
            DomainStateReason::Running(r) => r.to_raw() as i32,
            DomainStateReason::Blocked(r) => r.to_raw() as i32,
            DomainStateReason::Paused(r) => r.to_raw() as i32,
            DomainStateReason::Shutdown(r) => r.to_raw() as i32,
            DomainStateReason::Shutoff(r) => r.to_raw() as i32,
            DomainStateReason::Crashed(r) => r.to_raw() as i32,
            DomainStateReason::PMSuspended(r) => r.to_raw() as i32,
        },
        virt::enumutil::Enum::Unknown(r) => r,
    };
    Ok(map_state(raw_state, raw_reason))
}

fn is_active(dom: &Domain, at: &At) -> Result<bool, LibvirtError> {
    dom.is_active()
        .map_err(|e| LibvirtError::call(at.clone(), "reading whether the domain runs", &e))
}

/// Brings `dom` to running (`want` true) or stopped with `act`, unless it
/// is there already. `VIR_ERR_OPERATION_INVALID` from `act` is success when the
/// domain got there meanwhile (someone else started or stopped it).
fn ensure_active(
    dom: &Domain,
    at: &At,
    want: bool,
    op: &str,
    act: impl FnOnce(&Domain) -> Result<(), virt::error::Error>,
) -> Result<(), LibvirtError> {
    if is_active(dom, at)? == want {
        return Ok(());
    }
    match act(dom) {
        Ok(()) => Ok(()),
        Err(e)
            if e.code().to_raw() == sys::VIR_ERR_OPERATION_INVALID
                && is_active(dom, at)? == want =>
        {
            Ok(())
        }
        Err(e) => Err(LibvirtError::call(at.clone(), op, &e)),
    }
}

fn domain_xml(dom: &Domain, at: &At, inactive: bool) -> Result<String, LibvirtError> {
    let flags = if inactive {
        sys::VIR_DOMAIN_XML_INACTIVE
    } else {
        0
    };
    dom.xml_desc(flags)
        .map_err(|e| LibvirtError::call(at.clone(), "reading the domain XML", &e))
}

/// Why a driver cannot freeze.
const NO_FREEZE: &str = "this libvirt driver has no external disk-only snapshots";

fn unsupported(at: &At, op: &str, what: &str) -> LibvirtError {
    LibvirtError::Unsupported {
        at: at.clone(),
        op: op.into(),
        what: what.into(),
    }
}

fn parse_err(at: &At, op: &str, e: xml::ParseError) -> LibvirtError {
    if e.unsupported {
        LibvirtError::Unsupported {
            at: at.clone(),
            op: op.into(),
            what: e.what,
        }
    } else {
        LibvirtError::Backend {
            at: at.clone(),
            op: op.into(),
            what: e.what,
        }
    }
}

fn disks_of(dom: &Domain, at: &At, inactive: bool) -> Result<Vec<XmlDisk>, LibvirtError> {
    xml::parse_disks(&domain_xml(dom, at, inactive)?)
        .map_err(|e| parse_err(at, "reading the disks", e))
}

/// The disk in slot `target` of the persistent definition and, if the
/// domain runs (`active`), of the live one.
fn disk_in_slot(
    dom: &Domain,
    at: &At,
    target: &str,
    active: bool,
) -> Result<(Option<XmlDisk>, Option<XmlDisk>), LibvirtError> {
    let find = |inactive| -> Result<Option<XmlDisk>, LibvirtError> {
        Ok(disks_of(dom, at, inactive)?
            .into_iter()
            .find(|d| d.spec.target == target))
    };
    let config = find(true)?;
    let live = if active { find(false)? } else { None };
    Ok((config, live))
}

/// Errors of a quiesced snapshot that mean "no guest agent answered": the
/// freeze falls back to crash consistent.
fn agent_unavailable(e: &virt::error::Error) -> bool {
    let code = e.code().to_raw();
    [
        sys::VIR_ERR_AGENT_UNRESPONSIVE,
        sys::VIR_ERR_AGENT_UNSYNCED,
        sys::VIR_ERR_AGENT_COMMAND_TIMEOUT,
        sys::VIR_ERR_AGENT_COMMAND_FAILED,
        sys::VIR_ERR_ARGUMENT_UNSUPPORTED,
        sys::VIR_ERR_OPERATION_UNSUPPORTED,
        sys::VIR_ERR_NO_SUPPORT,
    ]
    .contains(&code)
        || (code == sys::VIR_ERR_OPERATION_INVALID
            && e.message().to_ascii_lowercase().contains("agent"))
}

/// Where one frozen disk stands when a release begins.
enum ReleaseStep {
    /// Back on its image already.
    Done,
    /// A commit job runs (started now or by an earlier attempt).
    Committing,
}

#[async_trait]
impl Hypervisor for LibvirtHypervisor {
    fn describe(&self) -> String {
        format!("libvirt {}", self.inner.cfg.uri)
    }

    fn capabilities(&self) -> HypervisorCaps {
        match self.inner.driver {
            Driver::Qemu => HypervisorCaps {
                freeze: Some(if self.inner.cfg.guest_agent {
                    Consistency::ApplicationConsistent
                } else {
                    Consistency::CrashConsistent
                }),
                attach_disk: true,
                graceful_shutdown: true,
                lifecycle_events: true,
            },
            Driver::Xen => HypervisorCaps {
                freeze: None,
                attach_disk: true,
                graceful_shutdown: true,
                lifecycle_events: true,
            },
            // libvirt 9's test driver has no virDomainAttachDeviceFlags.
            Driver::Test | Driver::Other => HypervisorCaps {
                freeze: None,
                attach_disk: false,
                graceful_shutdown: true,
                lifecycle_events: false,
            },
        }
    }

    /// Lifecycle events for every domain of the connection (QEMU and Xen
    /// drivers), from a watcher with its own connection; see `events.rs`.
    fn events(&self) -> Option<tokio::sync::broadcast::Receiver<wspare_core::VmEvent>> {
        if !self.capabilities().lifecycle_events {
            return None;
        }
        let tx = self
            .inner
            .events
            .get_or_init(|| tokio::sync::broadcast::channel(256).0);
        let rx = tx.subscribe();
        if !self
            .inner
            .watching
            .load(std::sync::atomic::Ordering::SeqCst)
        {
            crate::events::spawn_watcher(
                self.inner.cfg.uri.clone(),
                tx.clone(),
                self.inner.watching.clone(),
            );
        }
        Some(rx)
    }

    async fn status(&self, vm: &VmName) -> Result<VmStatus> {
        let name = vm.to_string();
        Ok(self
            .call(Some(vm), "reading the state", true, move |c, at| {
                status_of(c, at, &name)
            })
            .await?)
    }

    async fn list(&self) -> Result<Vec<VmName>> {
        let names = self
            .call(None, "listing domains", true, |c, at| {
                let doms = c
                    .list_all_domains(0)
                    .map_err(|e| LibvirtError::call(at.clone(), "listing domains", &e))?;
                let mut names = Vec::with_capacity(doms.len());
                for d in doms {
                    match d.name() {
                        Ok(n) => names.push(n),
                        // Undefined between the listing and the name.
                        Err(e) if e.code().to_raw() == sys::VIR_ERR_NO_DOMAIN => {}
                        Err(e) => {
                            return Err(LibvirtError::call(
                                at.clone(),
                                "reading a domain's name",
                                &e,
                            ))
                        }
                    }
                }
                Ok(names)
            })
            .await?;
        let mut out: Vec<VmName> = names
            .into_iter()
            .filter_map(|n| match VmName::new(n.clone()) {
                Ok(v) => Some(v),
                Err(e) => {
                    tracing::warn!(uri = %self.inner.cfg.uri, domain = %n, error = %e, "domain left out of list: not a valid VM name");
                    None
                }
            })
            .collect();
        out.sort();
        Ok(out)
    }

    async fn define(&self, spec: &VmSpec) -> Result<()> {
        // Validates and renders once here, so that a bad spec fails before
        // any call.
        self.render(spec)?;
        let this = self.clone();
        let spec = spec.clone();
        Ok(self
            .call(Some(&spec.name.clone()), "defining", true, move |c, at| {
                let name = spec.name.as_str();
                let uuid = match lookup_opt(c, at, name)? {
                    Some(dom) => xml::parse_uuid(&domain_xml(&dom, at, true)?)
                        .map_err(|e| parse_err(at, "reading the UUID", e))?,
                    None => None,
                };
                let xml = this.render_with_uuid(&spec, uuid)?;
                c.define_domain_xml_flags(&xml, sys::VIR_DOMAIN_DEFINE_VALIDATE)
                    .map_err(|e| LibvirtError::call(at.clone(), "defining", &e))?;
                Ok(())
            })
            .await?)
    }

    async fn spec(&self, vm: &VmName) -> Result<VmSpec> {
        let name = vm.to_string();
        Ok(self
            .call(Some(vm), "reading the definition", true, move |c, at| {
                let dom = lookup(c, at, &name)?;
                let mut spec =
                    xml::parse_domain(&domain_xml(&dom, at, true)?).map_err(|e| parse_err(at, "reading the definition", e))?;
                // During a freeze libvirt points the persistent definition at
                // the overlay too: report the frozen image, from the live chain.
                if spec.disks.iter().any(|d| is_overlay(&d.path)) {
                    let live = disks_of(&dom, at, false)?;
                    for d in spec.disks.iter_mut().filter(|d| is_overlay(&d.path)) {
                        let (path, format) = live
                            .iter()
                            .find(|l| l.spec.target == d.target)
                            .and_then(XmlDisk::backing_image)
                            .ok_or_else(|| LibvirtError::Backend {
                                at: at.clone(),
                                op: "reading the definition".into(),
                                what: format!(
                                    "disk {} is defined on freeze overlay {} and its base image is unknown",
                                    d.target,
                                    d.path.display()
                                ),
                            })?;
                        d.path = path;
                        d.format = format;
                    }
                }
                Ok(spec)
            })
            .await?)
    }

    async fn undefine(&self, vm: &VmName) -> Result<()> {
        let name = vm.to_string();
        let flags = self.undefine_flags();
        Ok(self
            .call(Some(vm), "undefining", true, move |c, at| {
                let dom = lookup(c, at, &name)?;
                if is_active(&dom, at)? {
                    return Err(LibvirtError::Conflict {
                        at: at.clone(),
                        op: "undefining".into(),
                        what: "the domain is running; stop it first".into(),
                    });
                }
                dom.undefine_flags(flags)
                    .map_err(|e| LibvirtError::call(at.clone(), "undefining", &e))
            })
            .await?)
    }

    async fn start(&self, vm: &VmName) -> Result<()> {
        let name = vm.to_string();
        Ok(self
            .call(Some(vm), "starting", true, move |c, at| {
                ensure_active(&lookup(c, at, &name)?, at, true, "starting", Domain::create)
            })
            .await?)
    }

    async fn shutdown(&self, vm: &VmName, timeout: Duration) -> Result<()> {
        const RESEND: Duration = Duration::from_secs(2);
        let deadline = tokio::time::Instant::now() + timeout;
        let mut next_request = tokio::time::Instant::now();
        loop {
            let now = tokio::time::Instant::now();
            let send = now >= next_request;
            if send {
                next_request = now + RESEND;
            }
            let name = vm.to_string();
            let status = self
                .call(Some(vm), "shutting down", true, move |c, at| {
                    let dom = lookup(c, at, &name)?;
                    let st = domain_status(&dom, at)?;
                    if send && st.state.is_live() {
                        if let Err(e) = dom.shutdown() {
                            // "domain is not running": it stopped meanwhile.
                            if e.code().to_raw() != sys::VIR_ERR_OPERATION_INVALID {
                                return Err(LibvirtError::call(
                                    at.clone(),
                                    "requesting a shutdown",
                                    &e,
                                ));
                            }
                        }
                    }
                    Ok(st)
                })
                .await?;
            if !status.state.is_live() && status.state != VmState::Crashed {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(LibvirtError::Timeout {
                    at: self.at(Some(vm)),
                    op: "shutting down".into(),
                    what: format!(
                        "the guest did not power off within {timeout:?} (state {}); it was left running",
                        status.state
                    ),
                }
                .into());
            }
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            tokio::time::sleep(self.inner.cfg.poll_interval.min(left)).await;
        }
    }

    async fn destroy(&self, vm: &VmName) -> Result<()> {
        let name = vm.to_string();
        self.call(Some(vm), "destroying", true, move |c, at| {
            ensure_active(
                &lookup(c, at, &name)?,
                at,
                false,
                "destroying",
                Domain::destroy,
            )
        })
        .await?;
        // virDomainDestroy is synchronous; read the state back anyway, the
        // fencer's receipt depends on it.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let st = self.status(vm).await?;
            if matches!(st.state, VmState::ShutOff | VmState::Missing) {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(LibvirtError::Timeout {
                    at: self.at(Some(vm)),
                    op: "destroying".into(),
                    what: format!(
                        "libvirt accepted the destroy but the domain still reads {}",
                        st.state
                    ),
                }
                .into());
            }
            self.sleep_poll().await;
        }
    }

    async fn attach_disk(&self, vm: &VmName, disk: &DiskSpec) -> Result<()> {
        const OP: &str = "attaching a disk";
        let supported = self.capabilities().attach_disk;
        let dt = self.inner.domain_type;
        let frag = xml::render_disk(disk, dt).map_err(|what| self.invalid(Some(vm), OP, what))?;
        let name = vm.to_string();
        let target = disk.target.clone();
        Ok(self
            .call(Some(vm), OP, false, move |c, at| {
                let dom = lookup(c, at, &name)?;
                if !supported {
                    return Err(unsupported(
                        at,
                        OP,
                        "this libvirt driver cannot hot-plug disks",
                    ));
                }
                let active = is_active(&dom, at)?;
                let (config, live) = disk_in_slot(&dom, at, &target, active)?;
                if config.is_some() || live.is_some() {
                    return Err(LibvirtError::Conflict {
                        at: at.clone(),
                        op: OP.into(),
                        what: format!(
                            "slot {target} is in use: detach its disk first or use another slot"
                        ),
                    });
                }
                let mut flags = sys::VIR_DOMAIN_AFFECT_CONFIG;
                if active {
                    flags |= sys::VIR_DOMAIN_AFFECT_LIVE;
                }
                dom.attach_device_flags(&frag, flags).map_err(|e| {
                    LibvirtError::call(at.clone(), format!("attaching disk {target}"), &e)
                })
            })
            .await?)
    }

    async fn detach_disk(&self, vm: &VmName, target: &str) -> Result<()> {
        const OP: &str = "detaching a disk";
        let supported = self.capabilities().attach_disk;
        let name = vm.to_string();
        let dt = self.inner.domain_type;
        let tgt = target.to_owned();
        let live_pending = self
            .call(Some(vm), OP, false, move |c, at| {
                let dom = lookup(c, at, &name)?;
                if !supported {
                    return Err(unsupported(
                        at,
                        OP,
                        "this libvirt driver cannot hot-unplug disks",
                    ));
                }
                let active = is_active(&dom, at)?;
                let (config, live) = disk_in_slot(&dom, at, &tgt, active)?;
                if config.is_none() && live.is_none() {
                    return Err(LibvirtError::NotFound {
                        at: at.clone(),
                        op: OP.into(),
                        what: format!("no disk in slot {tgt}"),
                    });
                }
                for (disk, flags) in [
                    (&config, sys::VIR_DOMAIN_AFFECT_CONFIG),
                    (&live, sys::VIR_DOMAIN_AFFECT_LIVE),
                ] {
                    if let Some(d) = disk {
                        let frag = xml::render_disk(&d.spec, dt).map_err(|what| {
                            LibvirtError::Backend {
                                at: at.clone(),
                                op: OP.into(),
                                what,
                            }
                        })?;
                        dom.detach_device_flags(&frag, flags).map_err(|e| {
                            LibvirtError::call(at.clone(), format!("detaching disk {tgt}"), &e)
                        })?;
                    }
                }
                Ok(live.is_some())
            })
            .await?;
        if !live_pending {
            return Ok(());
        }
        // libvirt returns once QEMU got the unplug request (waiting 5 s at
        // most); the guest releases the disk when it is ready.
        let deadline = tokio::time::Instant::now() + self.inner.cfg.detach_timeout;
        loop {
            let name = vm.to_string();
            let tgt = target.to_owned();
            let still = self
                .call(Some(vm), OP, true, move |c, at| {
                    let Some(dom) = lookup_opt(c, at, &name)? else {
                        return Ok(false);
                    };
                    if !is_active(&dom, at)? {
                        return Ok(false);
                    }
                    Ok(disks_of(&dom, at, false)?
                        .iter()
                        .any(|d| d.spec.target == tgt))
                })
                .await?;
            if !still {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(LibvirtError::Timeout {
                    at: self.at(Some(vm)),
                    op: OP.into(),
                    what: format!(
                        "the guest did not release disk {target} within {:?}; it is gone from the definition, the unplug request stays pending",
                        self.inner.cfg.detach_timeout
                    ),
                }
                .into());
            }
            self.sleep_poll().await;
        }
    }

    async fn freeze_disks(&self, vm: &VmName) -> Result<FrozenDisks> {
        const OP: &str = "freezing the disks";
        let supported = self.capabilities().freeze.is_some();
        // H8: a freeze left behind by a caller that crashed before its
        // release (the disk still writes to one of our overlays) is
        // released first, by the same active commit and pivot.
        if supported {
            let name = vm.to_string();
            let leftovers = self
                .call(Some(vm), OP, true, move |c, at| {
                    let Some(dom) = lookup_opt(c, at, &name)? else {
                        return Ok(Vec::new());
                    };
                    if !is_active(&dom, at)? {
                        return Ok(Vec::new());
                    }
                    Ok(disks_of(&dom, at, false)?
                        .into_iter()
                        .filter(|d| is_overlay(&d.spec.path))
                        .filter_map(|d| {
                            let (base, format) = d.backing_image()?;
                            Some(FrozenDisk {
                                target: d.spec.target.clone(),
                                path: base,
                                format,
                                overlay: Some(d.spec.path.clone()),
                            })
                        })
                        .collect::<Vec<_>>())
                })
                .await?;
            for d in &leftovers {
                tracing::warn!(
                    vm = %vm,
                    disk = %d.target,
                    overlay = %d.overlay.as_deref().unwrap_or(Path::new("")).display(),
                    "releasing a freeze left behind by a caller that did not release it"
                );
                self.release_one(vm, d).await?;
            }
        }
        let this = self.clone();
        let vm2 = vm.clone();
        let name = vm.to_string();
        let use_agent = self.inner.cfg.guest_agent;
        Ok(self
            .call(Some(vm), OP, false, move |c, at| {
                let dom = lookup(c, at, &name)?;
                if !supported {
                    return Err(unsupported(at, OP, NO_FREEZE));
                }
                if !is_active(&dom, at)? {
                    return Err(LibvirtError::Conflict {
                        at: at.clone(),
                        op: OP.into(),
                        what: "the domain is not running; its images are already consistent".into(),
                    });
                }
                let disks = disks_of(&dom, at, false)?;
                if let Some(d) = disks.iter().find(|d| is_overlay(&d.spec.path)) {
                    return Err(LibvirtError::Conflict {
                        at: at.clone(),
                        op: OP.into(),
                        what: format!(
                            "disk {} is already frozen (it writes to {}); release the last freeze first",
                            d.spec.target,
                            d.spec.path.display()
                        ),
                    });
                }
                let at_ms = UnixMillis::now();
                let mut snap = Vec::new();
                let mut frozen = Vec::new();
                for d in &disks {
                    let overlay = if d.spec.read_only {
                        None
                    } else {
                        Some(this.overlay_path(&vm2, &d.spec.path, at_ms.0)?)
                    };
                    snap.push(SnapshotDisk {
                        dev: d.dev.clone(),
                        overlay: overlay.clone(),
                    });
                    frozen.push(FrozenDisk {
                        target: d.spec.target.clone(),
                        path: d.spec.path.clone(),
                        format: d.spec.format,
                        overlay,
                    });
                }
                let mut consistency = Consistency::CrashConsistent;
                if snap.iter().any(|s| s.overlay.is_some()) {
                    let xml = xml::render_snapshot(&format!("wspare-freeze-{}", at_ms.0), &snap)
                        .map_err(|what| this.invalid(Some(&vm2), OP, what))?;
                    let base = sys::VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY
                        | sys::VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC
                        | sys::VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA;
                    let mut done = false;
                    if use_agent {
                        match dom.create_snapshot_xml(&xml, base | sys::VIR_DOMAIN_SNAPSHOT_CREATE_QUIESCE) {
                            Ok(_) => {
                                consistency = Consistency::ApplicationConsistent;
                                done = true;
                            }
                            Err(e) if agent_unavailable(&e) => {
                                tracing::info!(uri = %at.uri, domain = %name, error = %e, "no guest agent answered: crash-consistent freeze");
                            }
                            Err(e) => return Err(LibvirtError::call(at.clone(), "creating the quiesced snapshot", &e)),
                        }
                    }
                    if !done {
                        dom.create_snapshot_xml(&xml, base)
                            .map_err(|e| LibvirtError::call(at.clone(), "creating the snapshot", &e))?;
                    }
                    // The guest now writes to the overlays.
                    let now = disks_of(&dom, at, false)?;
                    for f in frozen.iter().filter(|f| f.overlay.is_some()) {
                        let live = now.iter().find(|d| d.spec.target == f.target);
                        if live.map(|d| &d.spec.path) != f.overlay.as_ref() {
                            return Err(LibvirtError::Backend {
                                at: at.clone(),
                                op: OP.into(),
                                what: format!(
                                    "after the snapshot disk {} is on {:?}, not on overlay {:?}",
                                    f.target,
                                    live.map(|d| d.spec.path.display().to_string()),
                                    f.overlay
                                ),
                            });
                        }
                    }
                }
                Ok(FrozenDisks {
                    vm: vm2.clone(),
                    at: at_ms,
                    consistency,
                    disks: frozen,
                })
            })
            .await?)
    }

    async fn release_disks(&self, frozen: &FrozenDisks) -> Result<()> {
        const OP: &str = "releasing the disks";
        let vm = &frozen.vm;
        if self.capabilities().freeze.is_none() {
            return Err(unsupported(&self.at(Some(vm)), OP, NO_FREEZE).into());
        }
        for disk in frozen.disks.iter().filter(|d| d.overlay.is_some()) {
            self.release_one(vm, disk).await?;
        }
        Ok(())
    }
}

impl LibvirtHypervisor {
    async fn release_one(&self, vm: &VmName, disk: &FrozenDisk) -> Result<(), LibvirtError> {
        const OP: &str = "releasing the disks";
        let overlay = disk.overlay.clone().unwrap_or_default();
        let (name, target, base, ov) = (
            vm.to_string(),
            disk.target.clone(),
            disk.path.clone(),
            overlay.clone(),
        );
        let step = self
            .call(Some(vm), OP, false, move |c, at| {
                let dom = lookup(c, at, &name)?;
                if !is_active(&dom, at)? {
                    return Err(LibvirtError::Conflict {
                        at: at.clone(),
                        op: OP.into(),
                        what: format!(
                            "the domain stopped while frozen: disk {target} still points at overlay {}; start it and release again (or `qemu-img commit` the overlay offline)",
                            ov.display()
                        ),
                    });
                }
                let live = disks_of(&dom, at, false)?;
                let Some(d) = live.iter().find(|d| d.spec.target == target) else {
                    return Err(LibvirtError::NotFound {
                        at: at.clone(),
                        op: OP.into(),
                        what: format!("no disk in slot {target}"),
                    });
                };
                if d.spec.path == base {
                    return Ok(ReleaseStep::Done);
                }
                if d.spec.path != ov {
                    return Err(LibvirtError::Conflict {
                        at: at.clone(),
                        op: OP.into(),
                        what: format!(
                            "disk {target} is on {}, neither the frozen image {} nor the overlay {}",
                            d.spec.path.display(),
                            base.display(),
                            ov.display()
                        ),
                    });
                }
                let running = block_job(&dom, &d.dev, BlockJobOp::Info)
                    .map_err(|e| LibvirtError::call(at.clone(), format!("reading the block job of {target}"), &e))?;
                if running.is_none() {
                    let base_s = base.to_str().ok_or_else(|| LibvirtError::InvalidInput {
                        at: at.clone(),
                        op: OP.into(),
                        what: format!("image path {base:?} is not UTF-8"),
                    })?;
                    block_job(&dom, &d.dev, BlockJobOp::CommitActive { base: base_s })
                        .map_err(|e| LibvirtError::call(at.clone(), format!("starting the block commit of {target}"), &e))?;
                }
                Ok(ReleaseStep::Committing)
            })
            .await?;
        if let ReleaseStep::Committing = step {
            let deadline = tokio::time::Instant::now() + self.inner.cfg.commit_timeout;
            loop {
                let (name, target) = (vm.to_string(), disk.target.clone());
                let progress = self
                    .call(Some(vm), OP, true, move |c, at| {
                        let dom = lookup(c, at, &name)?;
                        block_job(&dom, &target, BlockJobOp::Info).map_err(|e| {
                            LibvirtError::call(
                                at.clone(),
                                format!("reading the block job of {target}"),
                                &e,
                            )
                        })
                    })
                    .await?;
                match progress {
                    Some(p) if p.ready() => break,
                    Some(_) => {}
                    None => {
                        return Err(LibvirtError::Backend {
                            at: self.at(Some(vm)),
                            op: OP.into(),
                            what: format!(
                                "the block commit of disk {} into {} ended before it could pivot; the guest still writes to {} (see libvirtd's log)",
                                disk.target,
                                disk.path.display(),
                                overlay.display()
                            ),
                        })
                    }
                }
                if tokio::time::Instant::now() >= deadline {
                    return Err(LibvirtError::Timeout {
                        at: self.at(Some(vm)),
                        op: OP.into(),
                        what: format!(
                            "the block commit of disk {} was not ready within {:?}; it keeps running, release again to wait for it",
                            disk.target, self.inner.cfg.commit_timeout
                        ),
                    });
                }
                self.sleep_poll().await;
            }
            let (name, target, base) = (vm.to_string(), disk.target.clone(), disk.path.clone());
            self.call(Some(vm), OP, false, move |c, at| {
                let dom = lookup(c, at, &name)?;
                block_job(&dom, &target, BlockJobOp::Pivot).map_err(|e| {
                    LibvirtError::call(
                        at.clone(),
                        format!("pivoting disk {target} back to its image"),
                        &e,
                    )
                })?;
                let live = disks_of(&dom, at, false)?;
                match live.iter().find(|d| d.spec.target == target) {
                    Some(d) if d.spec.path == base => Ok(()),
                    other => Err(LibvirtError::Backend {
                        at: at.clone(),
                        op: OP.into(),
                        what: format!(
                            "after the pivot disk {target} is on {:?}, not on {}",
                            other.map(|d| d.spec.path.display().to_string()),
                            base.display()
                        ),
                    }),
                }
            })
            .await?;
        }
        // libvirt deletes the overlay after the pivot (COMMIT_DELETE); on a
        // local connection make sure of it.
        if self.inner.cfg.is_local() {
            match std::fs::remove_file(&overlay) {
                Ok(()) => {
                    tracing::debug!(overlay = %overlay.display(), "removed a freeze overlay libvirt left behind")
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(LibvirtError::Backend {
                        at: self.at(Some(vm)),
                        op: OP.into(),
                        what: format!("removing overlay {}: {e}", overlay.display()),
                    })
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hv(uri: &str) -> LibvirtHypervisor {
        LibvirtHypervisor::connect_uri(uri).unwrap()
    }

    #[test]
    fn capabilities_follow_the_driver() {
        let q = hv("qemu+ssh://root@node-a/system");
        assert_eq!(q.describe(), "libvirt qemu+ssh://root@node-a/system");
        let c = q.capabilities();
        assert_eq!(c.freeze, Some(Consistency::ApplicationConsistent));
        assert!(c.attach_disk && c.graceful_shutdown && c.lifecycle_events);
        let mut cfg = LibvirtConfig::new("qemu:///system");
        cfg.guest_agent = false;
        assert_eq!(
            LibvirtHypervisor::new(cfg).unwrap().capabilities().freeze,
            Some(Consistency::CrashConsistent)
        );
        assert_eq!(hv("test:///default").capabilities().freeze, None);
        assert!(!hv("test:///default").capabilities().attach_disk);
        let x = hv("xen:///system").capabilities();
        assert!(x.freeze.is_none() && x.attach_disk);
        assert!(LibvirtHypervisor::connect_uri("no-scheme").is_err());
    }

    #[test]
    fn renders_kvm_by_default_and_tcg_on_request() {
        let spec = VmSpec {
            name: VmName::new("web").unwrap(),
            vcpus: 1,
            memory_mib: 64,
            firmware: wspare_core::Firmware::Bios,
            disks: Vec::new(),
            nics: Vec::new(),
            boot: wspare_core::Boot::Kernel {
                kernel: "/boot/vmlinuz".into(),
                initrd: None,
                cmdline: String::new(),
            },
        };
        assert!(hv("qemu:///system")
            .render(&spec)
            .unwrap()
            .starts_with("<domain type='kvm'>"));
        let mut cfg = LibvirtConfig::new("qemu:///system");
        cfg.domain_type = Some(DomainType::Qemu);
        cfg.console_log_dir = Some("/var/log/wspare".into());
        let h = LibvirtHypervisor::new(cfg).unwrap();
        let xml = h.render(&spec).unwrap();
        assert!(xml.starts_with("<domain type='qemu'>"), "{xml}");
        assert!(xml.contains("/var/log/wspare/web.console.log"), "{xml}");
        let mut bad = spec.clone();
        bad.boot = wspare_core::Boot::Kernel {
            kernel: "vmlinuz".into(),
            initrd: None,
            cmdline: String::new(),
        };
        let e = h.render(&bad).unwrap_err();
        assert_eq!(e.kind(), wspare_core::ErrorKind::InvalidInput);
        assert!(
            e.to_string().contains("qemu:///system") && e.to_string().contains("domain web"),
            "{e}"
        );
    }

    #[test]
    fn overlays_go_beside_the_image_or_into_overlay_dir() {
        let vm = VmName::new("web").unwrap();
        let h = hv("qemu:///system");
        assert_eq!(
            h.overlay_path(&vm, Path::new("/srv/web/vda.raw"), 17)
                .unwrap(),
            PathBuf::from("/srv/web/vda.raw.wspare-overlay-17.qcow2")
        );
        let e = h
            .overlay_path(&vm, Path::new("/dev/vg0/web"), 17)
            .unwrap_err();
        assert!(e.to_string().contains("overlay_dir"), "{e}");
        let mut cfg = LibvirtConfig::new("qemu:///system");
        cfg.overlay_dir = Some("/var/lib/wspare/overlays".into());
        assert_eq!(
            LibvirtHypervisor::new(cfg)
                .unwrap()
                .overlay_path(&vm, Path::new("/dev/vg0/web"), 17)
                .unwrap(),
            PathBuf::from("/var/lib/wspare/overlays/web.wspare-overlay-17.qcow2")
        );
    }
}
