//! # wspare-core
//!
//! The core of wspare, warm-spare failover of virtual machines: the model,
//! the [`Hypervisor`], [`Replicator`] and [`Fencer`] traits, the sans-IO
//! failover machine, the failure detector, the safety invariants, the tokio
//! driver with its journal, the config and the command runner.
//!
//! See `ARCHITECTURE.md` at the repository root for how the pieces fit.

pub mod config;
pub mod detector;
pub mod driver;
pub mod error;
pub mod fencer;
pub mod generation;
pub mod hypervisor;
pub mod ids;
pub mod invariants;
pub mod journal;
pub mod machine;
pub mod receipt;
pub mod replicator;
pub mod runner;
pub mod spec;
pub mod time;

pub use error::{BackendError, Error, ErrorKind, Failure, Result};
pub use fencer::{FenceScope, Fencer, FencerCaps};
pub use generation::{Epoch, Generation, GenerationInfo};
pub use hypervisor::{
    Consistency, FrozenDisk, FrozenDisks, Hypervisor, HypervisorCaps, VmEvent, VmState, VmStatus,
};
pub use ids::{ActionId, NodeId, PairId, VmName};
pub use receipt::{Evidence, FenceReceipt, FenceTarget, PowerState};
pub use replicator::{Progress, Promoted, ReplicaStatus, Replicator, ReplicatorCaps, SourceView};
pub use spec::{
    Boot, DiskBus, DiskFormat, DiskSpec, Firmware, MacAddr, NicModel, NicSource, NicSpec, VmSpec,
};
pub use time::{Instant, UnixMillis};
