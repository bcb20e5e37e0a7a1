//! Fencer conformance: cases `F1`..`F8` of [`wspare_core::fencer`].

use std::sync::Arc;

use async_trait::async_trait;
use wspare_core::{Fencer, NodeId, PowerState, Result};

/// Conditions a fixture may be asked to build, for the fault cases.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FencerVariant {
    /// A working device and a node that is on.
    Normal,
    /// The device accepts power-off but keeps reporting on (F3).
    StuckOn,
    /// The device does not answer (F7).
    DeadDevice,
    /// The credentials are wrong (F8).
    WrongCredentials,
}

/// One fresh environment for one case. Dropping it cleans up (powers the
/// node back on or removes it).
#[async_trait]
pub trait FencerEnv: Send + Sync {
    /// The fencer under test.
    fn fencer(&self) -> Arc<dyn Fencer>;

    /// A node the fencer has a device for; it is on when the env is built.
    fn node(&self) -> NodeId;

    /// A node the fencer has no device for (F6).
    fn unknown_node(&self) -> NodeId;

    /// The node's power as the ground truth sees it (the libvirt domain
    /// behind a virtual BMC, the simulator's host), not through the fencer.
    async fn true_power(&self) -> Result<PowerState>;

    /// The secret the fencer was configured with, so the suite can check it
    /// never shows up in errors (F8).
    fn secret(&self) -> Option<String>;
}

/// Builds a fresh [`FencerEnv`] per case.
#[async_trait]
pub trait FencerFixture: Send + Sync {
    /// Title for the report.
    fn title(&self) -> String;
    /// A fresh environment of `variant`; `Ok(None)` if the fixture cannot
    /// build it (the case is skipped with that reason).
    async fn build(&self, variant: FencerVariant) -> Result<Option<Box<dyn FencerEnv>>>;
}
