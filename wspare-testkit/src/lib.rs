//! # wspare-testkit
//!
//! What makes wspare's backends trustworthy:
//!
//! - [`suite`]: the backend conformance suite. Every numbered invariant of
//!   the [`Hypervisor`](wspare_core::Hypervisor) (H1..H11),
//!   [`Replicator`](wspare_core::Replicator) (R1..R10) and
//!   [`Fencer`](wspare_core::Fencer) (F1..F8) contracts is a named case.
//! - [`sim`]: sim backends over a deterministic in-memory world, for the
//!   simulator and for tests that need a whole cluster without hosts.
//! - [`swarm`]: the deterministic swarm simulator: clusters of real
//!   failover machines on the sim backends under seeded faults, every step
//!   checked against the safety invariants, then a liveness phase.
//! - [`guest`]: the tiny real test guest, for backends' real-VM tests.
//! - `mocks` (feature `mocks`): mockall mocks of the three traits, for
//!   integrators' unit tests.
//!
//! # Testing your backend against the contract
//!
//! A backend author writes one test file (`tests/conformance.rs`): a
//! fixture that builds a fresh environment per case, and one call per
//! trait the backend implements. The environment is the backend under test
//! plus whatever the cases need around it (disk images and a test VM for a
//! hypervisor, a source with known content for a replicator, a node and the
//! ground truth of its power for a fencer); its `Drop` is the cleanup
//! guard. What each environment must provide is documented on
//! [`HypervisorEnv`](suite::hypervisor::HypervisorEnv),
//! [`ReplicatorEnv`](suite::replicator::ReplicatorEnv) and
//! [`FencerEnv`](suite::fencer::FencerEnv).
//!
//! The example below is a complete conformance test of a fencer. To keep it
//! self-contained its "lab" is the sim world, where a real fencer's fixture
//! would start a virtual BMC (sushy-tools, virtualbmc) in front of a
//! throwaway VM and read the VM's state as the ground truth. It cannot make
//! a device that stays on or refuses credentials, so it says so (`Ok(None)`)
//! and those cases are skipped with the reason:
//!
//! ```
//! use std::sync::Arc;
//!
//! use async_trait::async_trait;
//! use wspare_core::runner::Secret;
//! use wspare_core::{Fencer, NodeId, PowerState, Result};
//! use wspare_testkit::sim::{Fault, SimFencer, SimWorld};
//! use wspare_testkit::suite::fencer::{self, FencerEnv, FencerFixture, FencerVariant};
//!
//! struct MyFixture;
//!
//! struct MyEnv {
//!     lab: SimWorld,
//!     node: NodeId,
//!     fencer: Arc<dyn Fencer>,
//! }
//!
//! impl Drop for MyEnv {
//!     fn drop(&mut self) {
//!         // The cleanup guard: stop the virtual BMC, remove the VM behind it.
//!     }
//! }
//!
//! #[async_trait]
//! impl FencerFixture for MyFixture {
//!     fn title(&self) -> String {
//!         "my fencer against a lab BMC".into()
//!     }
//!
//!     async fn build(&self, variant: FencerVariant) -> Result<Option<Box<dyn FencerEnv>>> {
//!         let lab = SimWorld::new();
//!         let node = NodeId::new("node-a")?;
//!         lab.add_host(&node);
//!         lab.add_fence_device(&node, "bmc-a", Secret::new("hunter22"));
//!         match variant {
//!             FencerVariant::Normal => {}
//!             FencerVariant::DeadDevice => lab.set_fault(Fault::FenceDeviceDead(node.clone())),
//!             // Conditions this lab cannot produce: skipped, with the reason.
//!             FencerVariant::StuckOn | FencerVariant::WrongCredentials => return Ok(None),
//!         }
//!         let fencer = Arc::new(SimFencer::new(&lab).with_device(&node, Secret::new("hunter22")));
//!         Ok(Some(Box::new(MyEnv { lab, node, fencer })))
//!     }
//! }
//!
//! #[async_trait]
//! impl FencerEnv for MyEnv {
//!     fn fencer(&self) -> Arc<dyn Fencer> {
//!         self.fencer.clone()
//!     }
//!     fn node(&self) -> NodeId {
//!         self.node.clone()
//!     }
//!     fn unknown_node(&self) -> NodeId {
//!         NodeId::new("node-nobody").unwrap()
//!     }
//!     async fn true_power(&self) -> Result<PowerState> {
//!         // Not through the fencer: the ground truth (`virsh domstate`, say).
//!         Ok(self.lab.host_power(&self.node).unwrap_or(PowerState::Unknown))
//!     }
//!     fn secret(&self) -> Option<String> {
//!         Some("hunter22".into())
//!     }
//! }
//!
//! // In tests/conformance.rs this is a `#[tokio::test(start_paused = true)]`
//! // (paused time because this backend takes its time from tokio; a backend
//! // that talks to real devices runs on real time).
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() {
//! let report = fencer::run(&MyFixture).await;
//! report.assert_passed(); // prints the report; panics naming each failed case
//! let skipped: Vec<_> = report.skipped().map(|c| c.name).collect();
//! assert_eq!(skipped, ["F3 no false receipt", "F8 credentials"]);
//! # }
//! ```
//!
//! The report reads:
//!
//! ```text
//! conformance: fencer: my fencer against a lab BMC
//!   pass F1 receipt means off (502.0ms)
//!   pass F2 idempotent (502.0ms)
//!   skip F3 no false receipt (0.0ns): the fixture cannot build a device that keeps reporting on after accepting power-off (variant StuckOn)
//!   ...
//!   6 passed, 0 failed, 2 skipped
//! ```
//!
//! and a broken backend fails with the invariant and its answer:
//!
//! ```text
//!   FAIL F1 receipt means off (0.0ns): fence(node-a) returned a receipt (node node-a read back
//!        off by bmc) while the ground truth reads On, expected Off: ...
//! ```
//!
//! The hypervisor and replicator suites work the same way
//! ([`suite::hypervisor::run`], [`suite::replicator::run`]); the sim
//! backends' fixtures ([`sim::SimHypervisorFixture`],
//! [`sim::SimReplicatorFixture`], [`sim::SimFencerFixture`]) are complete
//! examples of each. Every case runs under a timeout, so a call that hangs
//! fails its case (naming the step) instead of the run; pick cases and the
//! timeout with [`suite::Options`] and the `run_with` functions.

pub mod guest;
pub mod sim;
pub mod suite;
pub mod swarm;

#[cfg(feature = "mocks")]
pub mod mocks;
