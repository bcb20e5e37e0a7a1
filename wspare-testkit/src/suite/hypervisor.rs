//! Hypervisor conformance: cases `H1`..`H11` of [`wspare_core::hypervisor`].

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use wspare_core::{Hypervisor, Result, VmName, VmSpec};

/// What the fixture's test guest does, so cases that need a behaviour are
/// skipped (with the reason) when the guest lacks it.
#[derive(Clone, Copy, Debug)]
pub struct GuestTraits {
    /// The guest keeps writing its first disk while it runs (H8 checks that
    /// the frozen image stays still while the live disk changes).
    pub writes_disk: bool,
    /// The guest powers off on an ACPI shutdown request (H6's success path).
    pub honours_shutdown: bool,
    /// Time for the guest to boot far enough to react (ACPI, disk writes).
    pub boot_time: Duration,
    /// Slack allowed past a deadline before the case calls it broken.
    pub deadline_slack: Duration,
}

/// One fresh environment for one case. Dropping it cleans up (undefines the
/// VMs the case made, removes images): it is the cleanup guard.
#[async_trait]
pub trait HypervisorEnv: Send + Sync {
    /// The backend under test.
    fn hypervisor(&self) -> Arc<dyn Hypervisor>;

    /// A valid spec for a VM named `name`, with fresh disk images that this
    /// backend can define and boot.
    async fn vm_spec(&self, name: &VmName) -> Result<VmSpec>;

    /// A spec whose guest ignores ACPI shutdown, for H6's deadline path;
    /// `None` if the fixture cannot make one (the case is skipped).
    async fn stubborn_vm_spec(&self, name: &VmName) -> Result<Option<VmSpec>>;

    /// A digest of an image file's content on the host (H8).
    async fn image_digest(&self, path: &std::path::Path) -> Result<String>;

    /// What the test guest does.
    fn guest(&self) -> GuestTraits;
}

/// Builds a fresh [`HypervisorEnv`] per case.
#[async_trait]
pub trait HypervisorFixture: Send + Sync {
    /// Title for the report ("libvirt test:///default").
    fn title(&self) -> String;
    /// A fresh environment.
    async fn build(&self) -> Result<Box<dyn HypervisorEnv>>;
}
