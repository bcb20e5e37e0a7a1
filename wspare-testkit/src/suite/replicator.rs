//! Replicator conformance: cases `R1`..`R10` of [`wspare_core::replicator`].

use std::sync::Arc;

use async_trait::async_trait;
use wspare_core::{DiskSpec, Replicator, Result, SourceView};

/// One fresh environment for one case: a replicator with an empty target
/// and a source VM's disks with known content. Dropping it cleans up.
#[async_trait]
pub trait ReplicatorEnv: Send + Sync {
    /// The backend under test.
    fn replicator(&self) -> Arc<dyn Replicator>;

    /// A view of the current source's disks as of now (a stopped VM's files,
    /// or a freeze). After `reverse` the source is the other side.
    async fn source_view(&self) -> Result<SourceView>;

    /// Changes the current source's content deterministically from `seed`,
    /// as a guest would (rewrites some blocks of every disk).
    async fn write_source(&self, seed: u64) -> Result<()>;

    /// Digest of the current source's content, all disks in order.
    async fn source_digest(&self) -> Result<String>;

    /// Digest of the content of `disks` (as returned by `promote` or
    /// `test_copy`), all disks in order.
    async fn digest(&self, disks: &[DiskSpec]) -> Result<String>;

    /// Alters `disks` behind the replicator's back (R7's tampering).
    async fn tamper(&self, disks: &[DiskSpec]) -> Result<()>;

    /// Makes the next sync fail midway (a killed transfer, a full disk);
    /// `false` if the fixture cannot (R3 then relies on dropping the future).
    async fn break_next_sync(&self) -> Result<bool>;
}

/// Builds a fresh [`ReplicatorEnv`] per case.
#[async_trait]
pub trait ReplicatorFixture: Send + Sync {
    /// Title for the report.
    fn title(&self) -> String;
    /// A fresh environment.
    async fn build(&self) -> Result<Box<dyn ReplicatorEnv>>;
}
