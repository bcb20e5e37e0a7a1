//! # wspare-libvirt
//!
//! The libvirt backend of wspare, on the [`virt`] crate:
//!
//! - [`LibvirtHypervisor`]: the [`Hypervisor`](wspare_core::Hypervisor)
//!   trait for KVM/QEMU (`qemu:///system`, `qemu+ssh://host/system`), for
//!   Xen through libvirt's libxl driver (`xen:///system`), and for libvirt's
//!   mock `test:///default` driver.
//! - [`LibvirtVmFencer`]: a **VM-level** [`Fencer`](wspare_core::Fencer)
//!   that destroys a domain through the libvirt of its host (the
//!   `fence_virsh` use case: guest clusters). It is *not* host-level
//!   fencing; see [`fencer`].
//!
//! ```no_run
//! # async fn demo() -> wspare_core::Result<()> {
//! use wspare_core::{Hypervisor, VmName};
//! use wspare_libvirt::{LibvirtConfig, LibvirtHypervisor};
//!
//! let hv = LibvirtHypervisor::new(LibvirtConfig::new("qemu+ssh://root@node-b/system?keyfile=/etc/wspare/id_ed25519"))?;
//! let status = hv.status(&VmName::new("web")?).await?;
//! # Ok(()) }
//! ```
//!
//! ## How it maps
//!
//! - **Domains** are rendered from a [`VmSpec`](wspare_core::VmSpec) and
//!   read back with a real XML parser ([`xml`] has the table). The domain
//!   type is configurable ([`DomainType`]): `kvm` for production, `qemu`
//!   (TCG, software emulation) where KVM is absent, as in CI.
//! - **States** and their reasons map as in [`state`]; a domain shut off
//!   with reason "crashed" is `ShutOff` (its process is gone), libvirt's
//!   `crashed` state (`on_crash='preserve'`) is `Crashed`.
//! - **Freeze** (QEMU only): an external, disk-only, atomic snapshot without
//!   libvirt metadata, quiesced through the QEMU guest agent when one
//!   answers and crash consistent otherwise (the result says which); the
//!   release is an active block commit, a pivot and the deletion of the
//!   overlay. `virt` 0.5 wraps none of the block-job calls, so they go
//!   through `virt::sys` in one small function (`src/blockjob.rs`; the
//!   event registration in `src/events.rs` is the other unsafe module).
//! - **Errors** are [`LibvirtError`]s: each names the URI, the domain, the
//!   operation and libvirt's error code by name and number, and maps onto
//!   the core kinds (`VIR_ERR_NO_DOMAIN` → `NotFound`,
//!   `VIR_ERR_OPERATION_INVALID` → `Conflict`, a dead connection →
//!   `Unreachable`, `VIR_ERR_AUTH_FAILED` → `PermissionDenied`, ...; see
//!   [`error::kind_of_code`]). libvirt's default printing of errors to
//!   stderr is switched off for the whole process at the first backend
//!   created.
//! - **Connections** are opened at the first call, checked before each
//!   call and reopened after a loss. Every blocking libvirt call runs on
//!   tokio's blocking pool under a deadline, one call at a time per
//!   connection: libvirt up to 10.3 crashes when two threads meet on a
//!   connection whose peer died (CVE-2024-4418; Debian 12 ships 9.0), so
//!   client keepalive is off too, and a call that outlives its caller (a
//!   dead peer) keeps its connection while the next call opens a new one,
//!   at most a few per URI (see `conn.rs`).
//! - **Lifecycle events** (QEMU and Xen drivers): `events()` starts a
//!   watcher thread with its own connection that registers a lifecycle
//!   callback (`virConnectDomainEventRegisterAny`; `virt` 0.5 has no
//!   wrapper, so this and the block jobs are the crate's two small unsafe
//!   modules, each with its safety argument), reads the domain's real state
//!   on every event and broadcasts it; a VM crash reaches the driver at
//!   once instead of at its next poll. It re-registers after a reconnect;
//!   events lost meanwhile are covered by the driver's periodic
//!   observation.
//!
//! ## Xen through libvirt
//!
//! libvirt's libxl driver is the second way to run Xen guests (the first is
//! `wspare-xen` over `xl`). Use `xen:///system` (or
//! `xen+ssh://root@host/system` remotely); the domain type defaults to
//! `xen`. Neutral `vdX` slots on the virtio bus become `xvdX` on Xen's PV
//! bus and read back as `vdX`, virtio NICs become PV NICs (no model), and
//! the guest agent channel is left out. Freezing is not offered (libxl has
//! no external disk-only snapshots or block commit), so replication of a
//! running Xen guest needs a replicator with its own consistency (DRBD).
//! Hot-plug, graceful shutdown and destroy work as on QEMU. A Xen spare
//! defined this way can also be started on KVM from the same `VmSpec`,
//! which is the point of the neutral spec. The Xen driver is exercised here
//! only through the rendering tests: there is no Xen host in CI.
//!
//! ## What is tested against real libvirt
//!
//! - `tests/conformance_test.rs`: the conformance suite against
//!   `test:///default` (libvirt's in-process mock, no daemon), hypervisor
//!   and VM fencer, plus the fencer's receipt scope.
//! - `tests/qemu_system.rs`: against libvirtd (`qemu:///system`) with QEMU
//!   TCG and the tiny test guest of `scripts/build-guest` (kernel + busybox
//!   initramfs that counts boots on its disk): define from a `VmSpec` and
//!   read it back, start, the guest's marker on the console log, its own
//!   power-off, a restart with the counter advanced, destroy of a running
//!   guest, disk hot-plug and unplug seen by the guest, a freeze while the
//!   guest writes (the frozen image holds still, the definition still names
//!   it) and a release with every write intact and the overlay gone, error
//!   kinds and messages (URI, domain, `VIR_ERR_NO_DOMAIN`, code) for a
//!   missing domain, `list`, reconnection after libvirtd drops the client
//!   (`virt-admin client-disconnect`), and the conformance suites
//!   (hypervisor and VM fencer, the latter with a refused SSH key through
//!   `qemu+ssh://` for F8) against `qemu:///system`. The hypervisor suite
//!   sees `list()` narrowed to its own `wspare-ct-*` domains, since libvirtd
//!   is shared with other test processes; the unfiltered `list()` is checked
//!   by the `test:///default` run and by a test of its own. These tests need
//!   `.ci/start-services` to have started libvirtd, virtlogd and the
//!   loopback sshd, and fail with that hint when libvirtd does not answer.
//! - Unit tests (no libvirt): XML rendering and parsing with a
//!   `VmSpec` → XML → `VmSpec` round-trip property test, state mapping,
//!   error-code mapping and messages, configuration.
//!
//! ```text
//! export CARGO_TARGET_DIR=target-libvirt
//! cargo test -p wspare-libvirt --lib --test conformance_test   # no daemon
//! bash .ci/install-deps && bash .ci/start-services
//! cargo test -p wspare-libvirt --test qemu_system               # about 3 min
//! ```

mod blockjob;
pub mod config;
mod conn;
pub mod error;
mod events;
pub mod fencer;
pub mod hypervisor;
pub mod state;
pub mod xml;

pub use config::{Driver, LibvirtConfig};
pub use error::LibvirtError;
pub use fencer::LibvirtVmFencer;
pub use hypervisor::{LibvirtHypervisor, OVERLAY_MARK};
pub use xml::DomainType;
