//! # wspare-examples
//!
//! Reference code for integrators and backend authors:
//!
//! - `wspare-sim` (in `src/bin`): the deterministic swarm simulator.
//! - [`toy_hypervisor`]: a complete custom `Hypervisor` backend that keeps
//!   VMs as files in a directory, and passes the conformance suite
//!   (`tests/toy_conformance.rs`): the model to copy.

pub mod toy_hypervisor;

use std::path::{Path, PathBuf};

/// `p` with every `{node}` replaced by `node`: one path setting serves
/// every host (`/srv/wspare/{node}/web`). Shared by `wspare-agent` and
/// `warm-spare-rsync`.
pub fn per_node_path(p: &Path, node: &wspare_core::NodeId) -> PathBuf {
    PathBuf::from(p.to_string_lossy().replace("{node}", node.as_str()))
}
