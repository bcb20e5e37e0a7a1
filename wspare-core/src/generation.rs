//! Replica versions: generations, their source point in time, and the epoch
//! that says which node holds the active copy.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::time::UnixMillis;

/// The version of a replica. Only grows: a cycle that finishes produces a
/// larger one, a cycle that fails leaves the last one as it was.
#[derive(
    Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Debug, Default,
)]
#[serde(transparent)]
pub struct Generation(pub u64);

impl Generation {
    /// The generation after this one.
    pub fn next(self) -> Generation {
        Generation(self.0 + 1)
    }
}

impl fmt::Display for Generation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "g{}", self.0)
    }
}

/// A complete generation: every disk of the VM reached the same source point
/// in time. Replicators only ever report complete generations; a cycle in
/// progress has no `GenerationInfo`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Debug)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct GenerationInfo {
    /// Its number.
    pub generation: Generation,
    /// When the source was frozen (or stopped), by the source host's clock.
    pub source_time: UnixMillis,
}

/// Which node holds the active copy, and how often that changed. Every
/// failover or switchover takes the next epoch; a node that learns of a larger
/// epoch than its own knows that its copy is stale.
#[derive(
    Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Debug, Default,
)]
#[serde(transparent)]
pub struct Epoch(pub u64);

impl Epoch {
    /// The epoch after this one.
    pub fn next(self) -> Epoch {
        Epoch(self.0 + 1)
    }
}

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "e{}", self.0)
    }
}
