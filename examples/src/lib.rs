//! # wspare-examples
//!
//! Reference code for integrators and backend authors:
//!
//! - `wspare-sim` (in `src/bin`): the deterministic swarm simulator.
//! - [`toy_hypervisor`]: a complete custom `Hypervisor` backend that keeps
//!   VMs as files in a directory, and passes the conformance suite
//!   (`tests/toy_conformance.rs`): the model to copy.

pub mod toy_hypervisor;
