//! The [`Replicator`] trait: keeping a spare's disks a recent, complete copy
//! of the active VM's, and handing over a chosen generation.
//!
//! One replicator instance serves one pair. It knows both ends (paths on the
//! primary and on the spare, a DRBD resource, a Hyper-V replica
//! relationship); [`Replicator::reverse`] swaps them after a failover.
//!
//! # Contract
//!
//! Each invariant is a named case of the conformance suite.
//!
//! - **R1 empty**: before the first sync, `status().newest` is `None` and
//!   `promote` fails with `NotFound`.
//! - **R2 monotonic**: each successful `initial_sync` or `sync` returns a
//!   generation larger than every earlier one, and `status().newest` is then
//!   that generation. Generations never go backwards, across `reverse` too.
//! - **R3 complete or nothing**: a sync that fails, or whose future is
//!   dropped midway, leaves `status().newest` as it was (or, if the drop came
//!   after the cycle's commit point, a newer complete generation), that
//!   generation stays promotable with its content intact, and the next sync
//!   succeeds.
//! - **R4 point in time**: the disks `promote(g)` returns hold exactly the
//!   source's content at `g`'s point in time, for every disk. `promote` does
//!   not consume the generation: it may be called again for the same `g`
//!   (after a driver crash) and returns the same disks, and later syncs
//!   continue from there.
//! - **R5 unknown generation**: `promote` or `verify` of a generation the
//!   replicator does not hold fails with `NotFound`.
//! - **R6 reverse** (capability `reversible`): after `reverse`, `status`
//!   shows source and target swapped and the next sync copies the other way,
//!   with a larger generation.
//! - **R7 verify** (capability `verify`): `verify(g)` succeeds on an intact
//!   generation and fails with `Conflict` when the copy was altered.
//! - **R8 stop**: `stop` leaves every complete generation intact and
//!   promotable.
//! - **R9 test copies** (capability `test_copies`): `test_copy(g)` returns
//!   disks apart from the replica; writing them changes neither the replica
//!   nor later syncs; `discard_test_copy` removes them.
//! - **R10 source view** (capability `needs_source_view`): `sync` with a
//!   [`SourceView::Continuous`] fails with `InvalidInput`: a file-copying
//!   replicator must never read a running VM's disks directly.

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::generation::{Generation, GenerationInfo};
use crate::hypervisor::{Consistency, FrozenDisks};
use crate::ids::NodeId;
use crate::spec::{DiskBus, DiskSpec};
use crate::time::UnixMillis;

/// What a [`Replicator`] can do.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct ReplicatorCaps {
    /// Every write reaches the spare before the guest sees it complete
    /// (DRBD protocol C): zero data loss while connected.
    pub synchronous: bool,
    /// The consistency of a generation.
    pub consistency: Consistency,
    /// Needs a [`SourceView`] of a stopped or frozen VM for each cycle
    /// (file copying). Block replication keeps its own consistency.
    pub needs_source_view: bool,
    /// Can replicate in the other direction after a failover.
    pub reversible: bool,
    /// How many complete generations it keeps (recovery points).
    pub recovery_points: u32,
    /// Can verify a generation against its checksums.
    pub verify: bool,
    /// Can expose a generation as a separate copy for a test failover.
    pub test_copies: bool,
}

/// What a sync cycle reads from.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum SourceView {
    /// The VM is not running: its disk files are consistent as they are.
    Stopped {
        /// The VM's disks on the source host.
        disks: Vec<DiskSpec>,
        /// When it was observed stopped.
        at: UnixMillis,
    },
    /// The VM runs; its disks are frozen for this cycle.
    Frozen(FrozenDisks),
    /// The replicator keeps consistency itself (DRBD, Hyper-V Replica).
    Continuous,
}

impl SourceView {
    /// The disks a file-copying cycle reads and their point in time: a
    /// stopped VM's disks as they are; a frozen VM's disks as [`DiskSpec`]s
    /// (slot, image and format of the frozen disk, on the default bus,
    /// read-write). `None` for [`SourceView::Continuous`], which has no
    /// files to read.
    pub fn disks(&self) -> Option<(Vec<DiskSpec>, UnixMillis)> {
        match self {
            SourceView::Stopped { disks, at } => Some((disks.clone(), *at)),
            SourceView::Frozen(f) => Some((
                f.disks
                    .iter()
                    .map(|d| DiskSpec {
                        target: d.target.clone(),
                        path: d.path.clone(),
                        format: d.format,
                        bus: DiskBus::default(),
                        read_only: false,
                    })
                    .collect(),
                f.at,
            )),
            SourceView::Continuous => None,
        }
    }
}

/// A sync cycle in progress.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct Progress {
    /// Bytes processed so far.
    pub bytes_done: u64,
    /// Bytes in all.
    pub bytes_total: u64,
    /// Current rate, bytes per second.
    pub bytes_per_sec: u64,
}

/// Where replication stands.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct ReplicaStatus {
    /// Node whose copy is the source.
    pub source: NodeId,
    /// Node that receives.
    pub target: NodeId,
    /// Newest complete generation on the target.
    pub newest: Option<GenerationInfo>,
    /// Every complete generation held (recovery points), oldest first.
    pub generations: Vec<GenerationInfo>,
    /// Synchronous replication connected and up to date: nothing at risk.
    pub in_sync: bool,
    /// A cycle in progress.
    pub progress: Option<Progress>,
}

impl ReplicaStatus {
    /// Data at risk if the source died at `now`: the age of the newest
    /// complete generation (zero when in sync; `None` with no generation).
    pub fn lag(&self, now: UnixMillis) -> Option<Duration> {
        if self.in_sync {
            return Some(Duration::ZERO);
        }
        self.newest.map(|g| now.saturating_since(g.source_time))
    }
}

/// A generation made usable on the target.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct Promoted {
    /// The generation.
    pub generation: GenerationInfo,
    /// The disks to start the spare from, on the target host, in the VM's
    /// slot order.
    pub disks: Vec<DiskSpec>,
}

/// Direction and endpoints, for messages.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Endpoints {
    /// Source node.
    pub source: NodeId,
    /// Target node.
    pub target: NodeId,
}

impl fmt::Display for Endpoints {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} -> {}", self.source, self.target)
    }
}

/// Replication of one pair's disks. See the module docs for the contract.
#[async_trait]
pub trait Replicator: Send + Sync {
    /// A short description for messages ("rsync web: node-a:/var/lib/... -> node-b:/srv/...").
    fn describe(&self) -> String;

    /// What this backend can do.
    fn capabilities(&self) -> ReplicatorCaps;

    /// The first full copy (R2).
    async fn initial_sync(&self, source: &SourceView) -> Result<GenerationInfo>;

    /// One cycle: a new complete generation, or the last one left intact (R2, R3).
    async fn sync(&self, source: &SourceView) -> Result<GenerationInfo>;

    /// Where replication stands (R1, R2).
    async fn status(&self) -> Result<ReplicaStatus>;

    /// Makes generation `g` usable on the target and returns its disks (R4, R5).
    async fn promote(&self, g: Generation) -> Result<Promoted>;

    /// Swaps source and target (R6).
    async fn reverse(&self) -> Result<()>;

    /// Checks generation `g` on the target against its checksums and, where
    /// `source` is a stopped or frozen view, against the source (R7).
    async fn verify(&self, g: Generation, source: &SourceView) -> Result<()>;

    /// Stops replicating, keeping every generation (R8).
    async fn stop(&self) -> Result<()>;

    /// A separate copy of generation `g` for a test failover, named `label` (R9).
    async fn test_copy(&self, g: Generation, label: &str) -> Result<Vec<DiskSpec>>;

    /// Removes the test copy `label` (R9). Succeeds if it is already gone.
    async fn discard_test_copy(&self, label: &str) -> Result<()>;
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::hypervisor::FrozenDisk;
    use crate::ids::VmName;
    use crate::spec::DiskFormat;

    fn disk(
        target: &str,
        path: &str,
        format: DiskFormat,
        bus: DiskBus,
        read_only: bool,
    ) -> DiskSpec {
        DiskSpec {
            target: target.into(),
            path: PathBuf::from(path),
            format,
            bus,
            read_only,
        }
    }

    #[test]
    fn a_stopped_view_gives_its_disks_as_they_are() {
        let disks = vec![
            disk(
                "vda",
                "/img/a.qcow2",
                DiskFormat::Qcow2,
                DiskBus::Scsi,
                false,
            ),
            disk("vdb", "/img/b.raw", DiskFormat::Raw, DiskBus::Virtio, true),
        ];
        let view = SourceView::Stopped {
            disks: disks.clone(),
            at: UnixMillis(42),
        };
        assert_eq!(view.disks(), Some((disks, UnixMillis(42))));
    }

    #[test]
    fn a_frozen_view_gives_read_write_disks_on_the_default_bus() {
        let view = SourceView::Frozen(FrozenDisks {
            vm: VmName::new("web").unwrap(),
            at: UnixMillis(7),
            consistency: Consistency::ApplicationConsistent,
            disks: vec![
                FrozenDisk {
                    target: "vda".into(),
                    path: PathBuf::from("/img/a.qcow2"),
                    format: DiskFormat::Qcow2,
                    overlay: Some(PathBuf::from("/img/a.overlay")),
                },
                FrozenDisk {
                    target: "vdb".into(),
                    path: PathBuf::from("/img/b.raw"),
                    format: DiskFormat::Raw,
                    overlay: None,
                },
            ],
        });
        assert_eq!(
            view.disks(),
            Some((
                vec![
                    disk(
                        "vda",
                        "/img/a.qcow2",
                        DiskFormat::Qcow2,
                        DiskBus::default(),
                        false
                    ),
                    disk(
                        "vdb",
                        "/img/b.raw",
                        DiskFormat::Raw,
                        DiskBus::default(),
                        false
                    ),
                ],
                UnixMillis(7)
            ))
        );
    }

    #[test]
    fn a_continuous_view_has_no_disks() {
        assert_eq!(SourceView::Continuous.disks(), None);
    }
}
