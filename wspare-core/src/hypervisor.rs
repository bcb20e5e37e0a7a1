//! The [`Hypervisor`] trait: what wspare needs from KVM/libvirt, Xen's `xl`
//! or Hyper-V to run one copy of a VM.
//!
//! # Contract
//!
//! Every implementation keeps these invariants; each is a named case of the
//! conformance suite (`wspare_testkit::suite`), gated by the capabilities.
//!
//! - **H1 missing**: `status` of a VM that is not defined is
//!   [`VmState::Missing`]; `start`, `shutdown`, `destroy`, `undefine`, `spec`,
//!   `attach_disk`, `detach_disk` and `freeze_disks` on it fail with
//!   [`ErrorKind::NotFound`](crate::ErrorKind::NotFound).
//! - **H2 define/read-back**: after `define(spec)`, `spec(name)` returns a
//!   spec equal to the one given (the VM is defined, not started: status
//!   `ShutOff`).
//! - **H3 redefine**: `define` of a defined, stopped VM replaces its
//!   definition; `define` of an invalid spec fails with `InvalidInput` and
//!   changes nothing. (Callers define only stopped VMs; a backend may refuse
//!   to redefine a running one with `Conflict`.)
//! - **H4 idempotent start**: once `start` returns Ok, status is `Running`;
//!   `start` of a running VM succeeds and changes nothing.
//! - **H5 idempotent destroy**: once `destroy` returns Ok, status is
//!   `ShutOff`; `destroy` of a stopped VM succeeds.
//! - **H6 shutdown deadline**: `shutdown(vm, t)` returns Ok only once status
//!   is `ShutOff`; if the guest is still up after `t` it fails with `Timeout`
//!   (within `t` plus a small slack) and leaves the VM running. `shutdown` of
//!   a stopped VM succeeds.
//! - **H7 undefine**: `undefine` of a running VM fails with `Conflict`; of a
//!   stopped VM it removes the definition (status `Missing`) and leaves the
//!   disk images in place.
//! - **H8 freeze** (capability `freeze`): between `freeze_disks` and
//!   `release_disks` the frozen images do not change, although the guest
//!   keeps writing; after `release_disks` the guest's disks hold every write
//!   it made, during the freeze too, and the VM kept running throughout.
//!   `freeze_disks` of a stopped VM fails with `Conflict` (its files are
//!   already consistent). A freeze left behind by a caller that crashed
//!   before `release_disks` is released by the next `freeze_disks`. During a
//!   freeze, `spec` reports the frozen images, not the overlays.
//! - **H9 hot-plug** (capability `attach_disk`): after `attach_disk` the disk
//!   is in `spec`; after `detach_disk` it is gone; detaching a slot that is
//!   not attached fails with `NotFound`.
//! - **H10 list**: `list` returns exactly the defined VMs.
//! - **H11 concurrency**: calls on different VMs may run at once and do not
//!   interfere.
//!
//! Names reach the backend only as validated [`VmName`]s, and backends quote
//! them for the target (XML, `xl.cfg`, PowerShell) anyway.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::ids::VmName;
use crate::spec::{DiskFormat, DiskSpec, VmSpec};
use crate::time::UnixMillis;

/// The state of one VM copy.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VmState {
    /// Running (or blocked on I/O).
    Running,
    /// Paused: in memory, vCPUs stopped. Still a live copy.
    Paused,
    /// A shutdown is in progress. Still a live copy.
    ShuttingDown,
    /// Suspended to RAM by the guest. Still a live copy.
    Suspended,
    /// Defined, not running.
    ShutOff,
    /// Crashed. The hypervisor may still hold its process; not proof of off.
    Crashed,
    /// Not defined on this host.
    Missing,
}

impl VmState {
    /// Whether this copy could be writing its disks or serving clients.
    pub fn is_live(self) -> bool {
        matches!(
            self,
            VmState::Running | VmState::Paused | VmState::ShuttingDown | VmState::Suspended
        )
    }

    /// Kebab-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            VmState::Running => "running",
            VmState::Paused => "paused",
            VmState::ShuttingDown => "shutting-down",
            VmState::Suspended => "suspended",
            VmState::ShutOff => "shut-off",
            VmState::Crashed => "crashed",
            VmState::Missing => "missing",
        }
    }
}

impl fmt::Display for VmState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A state with the hypervisor's reason for it ("crashed: panicked",
/// "shut off: destroyed").
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct VmStatus {
    /// The state.
    pub state: VmState,
    /// The backend's reason, in its own words.
    pub reason: Option<String>,
}

impl VmStatus {
    /// A status without a reason.
    pub fn new(state: VmState) -> Self {
        VmStatus {
            state,
            reason: None,
        }
    }
}

/// How consistent a point-in-time copy is.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Consistency {
    /// Like pulling the power cord at one instant across all disks: journaled
    /// filesystems and databases recover, unflushed application data is lost.
    CrashConsistent,
    /// Write order is kept continuously (block replication): crash
    /// consistent at every instant.
    WriteOrder,
    /// The guest flushed and froze its filesystems first (guest agent, VSS).
    ApplicationConsistent,
}

/// What a [`Hypervisor`] backend can do beyond the basics.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default, Serialize, Deserialize)]
pub struct HypervisorCaps {
    /// Point-in-time freezing of a running VM's disks, and the best
    /// consistency it reaches (application consistent needs a guest agent
    /// that answers; the freeze reports what it got).
    pub freeze: Option<Consistency>,
    /// Hot-plug of disks into a running VM.
    pub attach_disk: bool,
    /// Graceful (ACPI) shutdown.
    pub graceful_shutdown: bool,
    /// [`Hypervisor::events`] delivers lifecycle events.
    pub lifecycle_events: bool,
}

/// One disk of a frozen VM.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct FrozenDisk {
    /// The slot (`vda`).
    pub target: String,
    /// The image to read: it does not change until the release.
    pub path: PathBuf,
    /// Its format.
    pub format: DiskFormat,
    /// Where the guest's writes go meanwhile (an external snapshot overlay),
    /// if the backend uses one.
    pub overlay: Option<PathBuf>,
}

/// A VM's disks frozen at one point in time, for one replication cycle.
/// Hand it back to [`Hypervisor::release_disks`] when the cycle ends, whether
/// it succeeded or not.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct FrozenDisks {
    /// The VM.
    pub vm: VmName,
    /// When the freeze took effect, by this host's clock.
    pub at: UnixMillis,
    /// What was reached: application consistent only if the guest agent
    /// quiesced the filesystems.
    pub consistency: Consistency,
    /// Every disk of the VM.
    pub disks: Vec<FrozenDisk>,
}

/// A lifecycle event pushed by the backend.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct VmEvent {
    /// The VM.
    pub vm: VmName,
    /// Its new status.
    pub status: VmStatus,
}

/// One hypervisor on one host. See the module docs for the contract.
#[async_trait]
pub trait Hypervisor: Send + Sync {
    /// A short description for messages: backend and connection
    /// ("libvirt qemu+ssh://node-a/system").
    fn describe(&self) -> String;

    /// What this backend can do.
    fn capabilities(&self) -> HypervisorCaps;

    /// The state of `vm` (H1).
    async fn status(&self, vm: &VmName) -> Result<VmStatus>;

    /// The defined VMs (H10).
    async fn list(&self) -> Result<Vec<VmName>>;

    /// Defines or redefines a VM from a neutral spec (H2, H3). Does not start it.
    async fn define(&self, spec: &VmSpec) -> Result<()>;

    /// Reads a VM's definition back as a neutral spec (H2).
    async fn spec(&self, vm: &VmName) -> Result<VmSpec>;

    /// Removes a stopped VM's definition, keeping its disk images (H7).
    async fn undefine(&self, vm: &VmName) -> Result<()>;

    /// Starts a VM; succeeds if it already runs (H4).
    async fn start(&self, vm: &VmName) -> Result<()>;

    /// Asks the guest to power off and waits up to `timeout` (H6).
    async fn shutdown(&self, vm: &VmName, timeout: Duration) -> Result<()>;

    /// Stops a VM at once; succeeds if it is already stopped (H5).
    async fn destroy(&self, vm: &VmName) -> Result<()>;

    /// Hot-plugs a disk (H9).
    async fn attach_disk(&self, vm: &VmName, disk: &DiskSpec) -> Result<()>;

    /// Unplugs the disk in slot `target` (H9).
    async fn detach_disk(&self, vm: &VmName, target: &str) -> Result<()>;

    /// Freezes a running VM's disks at one point in time for one replication
    /// cycle (H8). Fails with `Unsupported` without the `freeze` capability.
    async fn freeze_disks(&self, vm: &VmName) -> Result<FrozenDisks>;

    /// Ends a freeze: the guest's disks are whole again and the overlays are
    /// gone (H8). Must be called after every successful `freeze_disks`.
    async fn release_disks(&self, frozen: &FrozenDisks) -> Result<()>;

    /// Lifecycle events, if the backend pushes them (capability
    /// `lifecycle_events`); `None` means the caller polls `status`.
    fn events(&self) -> Option<tokio::sync::broadcast::Receiver<VmEvent>> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn trait_is_object_safe_and_shareable() {
        fn takes(_: Option<Arc<dyn Hypervisor>>) {}
        takes(None);
        assert!(VmState::Paused.is_live());
        assert!(!VmState::Crashed.is_live());
        assert_eq!(VmState::ShutOff.to_string(), "shut-off");
    }
}
