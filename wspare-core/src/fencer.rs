//! The [`Fencer`] trait: proving a node is off.
//!
//! # Contract
//!
//! Each invariant is a named case of the conformance suite.
//!
//! - **F1 receipt means off**: `fence(node)` returns a receipt only after the
//!   device read the power state back as off; the receipt names `node`.
//! - **F2 idempotent**: fencing a node that is already off succeeds with a
//!   receipt.
//! - **F3 no false receipt**: when the device accepts the power-off but keeps
//!   reporting on (or anything but off) until the deadline, `fence` fails
//!   (`Timeout`) and returns no receipt.
//! - **F4 status reads only**: `power_status` changes nothing.
//! - **F5 unfence** (capability `unfence`): powers the node on; status reads
//!   `On` afterwards.
//! - **F6 unknown node**: a node the fencer has no device for fails with
//!   `NotFound`.
//! - **F7 dead device**: an unreachable device fails with `Unreachable` or
//!   `Timeout` within the fencer's deadline, never hangs.
//! - **F8 credentials**: refused credentials fail with `PermissionDenied`,
//!   not retryable; the secret appears in no argv, log or error.
//!
//! A fencer that fences a VM rather than a host (libvirt's destroy, for guest
//! clusters) says so in [`FencerCaps::scope`]: it is not host-level fencing.

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::ids::NodeId;
use crate::receipt::{FenceReceipt, PowerState};

/// What a fencer powers off.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FenceScope {
    /// A physical host (IPMI, Redfish, PDU).
    Host,
    /// A VM acting as a node (guest clusters).
    Vm,
}

/// What a [`Fencer`] can do.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct FencerCaps {
    /// What a fence powers off.
    pub scope: FenceScope,
    /// Can power a node back on.
    pub unfence: bool,
}

/// Out-of-band power control of nodes. See the module docs for the contract.
#[async_trait]
pub trait Fencer: Send + Sync {
    /// A short description for messages ("ipmi bmc-a (10.0.0.5:623)"), never
    /// with credentials.
    fn describe(&self) -> String;

    /// What this fencer can do.
    fn capabilities(&self) -> FencerCaps;

    /// Powers `node` off and returns a receipt once it reads back off (F1-F3).
    async fn fence(&self, node: &NodeId) -> Result<FenceReceipt>;

    /// Reads `node`'s power state (F4).
    async fn power_status(&self, node: &NodeId) -> Result<PowerState>;

    /// Powers `node` on (F5).
    async fn unfence(&self, node: &NodeId) -> Result<()>;
}
