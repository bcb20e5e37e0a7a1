//! [mockall] mocks of the three traits, for integrators' unit tests
//! (feature `mocks`).
//!
//! Each mock implements the real trait, so it goes wherever an
//! `Arc<dyn Hypervisor>` (`Replicator`, `Fencer`) does. Set expectations
//! with the generated `expect_*` methods; a call without a matching
//! expectation panics, and unmet `times(..)` panic when the mock drops.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! use wspare_core::{Hypervisor, VmName, VmState, VmStatus};
//! use wspare_testkit::mocks::mockall::predicate::eq;
//! use wspare_testkit::mocks::MockHypervisor;
//!
//! let web = VmName::new("web").unwrap();
//! let mut hv = MockHypervisor::new();
//! hv.expect_status()
//!     .with(eq(web.clone()))
//!     .returning(|_| Ok(VmStatus::new(VmState::ShutOff)));
//! hv.expect_start().with(eq(web.clone())).times(1).returning(|_| Ok(()));
//!
//! // The code under test:
//! if hv.status(&web).await.unwrap().state != VmState::Running {
//!     hv.start(&web).await.unwrap();
//! }
//! # }
//! ```

use std::time::Duration;

use async_trait::async_trait;
/// The mockall version the mocks are made with, for `predicate` and
/// `Sequence` without a direct dependency.
pub use mockall;
use wspare_core::{
    DiskSpec, FenceReceipt, Fencer, FencerCaps, FrozenDisks, Generation, GenerationInfo,
    Hypervisor, HypervisorCaps, NodeId, PowerState, Promoted, ReplicaStatus, Replicator,
    ReplicatorCaps, Result, SourceView, VmEvent, VmName, VmSpec, VmStatus,
};

mockall::mock! {
    /// A mock [`Hypervisor`].
    pub Hypervisor {}

    #[async_trait]
    impl Hypervisor for Hypervisor {
        fn describe(&self) -> String;
        fn capabilities(&self) -> HypervisorCaps;
        async fn status(&self, vm: &VmName) -> Result<VmStatus>;
        async fn list(&self) -> Result<Vec<VmName>>;
        async fn define(&self, spec: &VmSpec) -> Result<()>;
        async fn spec(&self, vm: &VmName) -> Result<VmSpec>;
        async fn undefine(&self, vm: &VmName) -> Result<()>;
        async fn start(&self, vm: &VmName) -> Result<()>;
        async fn shutdown(&self, vm: &VmName, timeout: Duration) -> Result<()>;
        async fn destroy(&self, vm: &VmName) -> Result<()>;
        async fn attach_disk(&self, vm: &VmName, disk: &DiskSpec) -> Result<()>;
        async fn detach_disk(&self, vm: &VmName, target: &str) -> Result<()>;
        async fn freeze_disks(&self, vm: &VmName) -> Result<FrozenDisks>;
        async fn release_disks(&self, frozen: &FrozenDisks) -> Result<()>;
        fn events(&self) -> Option<tokio::sync::broadcast::Receiver<VmEvent>>;
    }
}

mockall::mock! {
    /// A mock [`Replicator`].
    pub Replicator {}

    #[async_trait]
    impl Replicator for Replicator {
        fn describe(&self) -> String;
        fn capabilities(&self) -> ReplicatorCaps;
        async fn initial_sync(&self, source: &SourceView) -> Result<GenerationInfo>;
        async fn sync(&self, source: &SourceView) -> Result<GenerationInfo>;
        async fn status(&self) -> Result<ReplicaStatus>;
        async fn promote(&self, g: Generation) -> Result<Promoted>;
        async fn reverse(&self) -> Result<()>;
        async fn verify(&self, g: Generation, source: &SourceView) -> Result<()>;
        async fn stop(&self) -> Result<()>;
        async fn test_copy(&self, g: Generation, label: &str) -> Result<Vec<DiskSpec>>;
        async fn discard_test_copy(&self, label: &str) -> Result<()>;
    }
}

mockall::mock! {
    /// A mock [`Fencer`].
    pub Fencer {}

    #[async_trait]
    impl Fencer for Fencer {
        fn describe(&self) -> String;
        fn capabilities(&self) -> FencerCaps;
        async fn fence(&self, node: &NodeId) -> Result<FenceReceipt>;
        async fn power_status(&self, node: &NodeId) -> Result<PowerState>;
        async fn unfence(&self, node: &NodeId) -> Result<()>;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use mockall::predicate::eq;
    use mockall::Sequence;
    use wspare_core::{ErrorKind, UnixMillis};

    use super::*;

    /// A piece of integrator code: fence the node, then promote the newest
    /// generation. It must not promote without a receipt.
    async fn fence_then_promote(
        f: &dyn Fencer,
        r: &dyn Replicator,
        node: &NodeId,
    ) -> Result<Promoted> {
        let receipt = f.fence(node).await?;
        assert!(receipt.covers(node, &VmName::new("web").unwrap()));
        let newest = r
            .status()
            .await?
            .newest
            .ok_or_else(|| wspare_core::Error::not_found("no generation"))?;
        r.promote(newest.generation).await
    }

    fn status_with(g: u64) -> ReplicaStatus {
        let info = GenerationInfo {
            generation: Generation(g),
            source_time: UnixMillis(1),
        };
        ReplicaStatus {
            source: NodeId::new("a").unwrap(),
            target: NodeId::new("b").unwrap(),
            newest: Some(info),
            generations: vec![info],
            in_sync: false,
            progress: None,
        }
    }

    #[tokio::test]
    async fn mocks_drive_integrator_code_in_order() {
        let a = NodeId::new("a").unwrap();
        let mut seq = Sequence::new();
        let mut f = MockFencer::new();
        let mut r = MockReplicator::new();
        f.expect_fence()
            .with(eq(a.clone()))
            .times(1)
            .in_sequence(&mut seq)
            .returning(|n| {
                Ok(FenceReceipt::from_power_reading(
                    n.clone(),
                    "bmc",
                    PowerState::Off,
                    UnixMillis(5),
                )
                .unwrap())
            });
        r.expect_status()
            .times(1)
            .in_sequence(&mut seq)
            .returning(|| Ok(status_with(7)));
        r.expect_promote()
            .with(eq(Generation(7)))
            .times(1)
            .in_sequence(&mut seq)
            .returning(|g| {
                Ok(Promoted {
                    generation: GenerationInfo {
                        generation: g,
                        source_time: UnixMillis(1),
                    },
                    disks: vec![],
                })
            });
        let p = fence_then_promote(&f, &r, &a).await.unwrap();
        assert_eq!(p.generation.generation, Generation(7));
    }

    #[tokio::test]
    async fn a_failed_fence_stops_before_promote() {
        let a = NodeId::new("a").unwrap();
        let mut f = MockFencer::new();
        f.expect_fence()
            .returning(|_| Err(wspare_core::Error::timeout("device still reads on")));
        let mut r = MockReplicator::new();
        r.expect_promote().never();
        r.expect_status().never();
        let e = fence_then_promote(&f, &r, &a).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Timeout);
    }

    #[tokio::test]
    async fn mocks_are_trait_objects() {
        let mut hv = MockHypervisor::new();
        hv.expect_describe()
            .return_const("mock hypervisor".to_string());
        hv.expect_events().returning(|| None);
        let hv: Arc<dyn Hypervisor> = Arc::new(hv);
        assert_eq!(hv.describe(), "mock hypervisor");
        assert!(hv.events().is_none());
    }
}
