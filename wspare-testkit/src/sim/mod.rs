//! Sim backends over a shared, deterministic in-memory world.
//!
//! A [`SimWorld`] holds hosts (with power), VMs (with a test guest that
//! writes a counter to its first disk, like the real test guest of
//! `scripts/guest-init`), disk images as small byte vectors, replicas with
//! their generations, fence devices, and fault switches. The backends act
//! on it through the real traits:
//!
//! - [`SimHypervisor`]: one host's hypervisor (`Hypervisor`).
//! - [`SimReplicator`]: one pair's file-copying replication
//!   (`Replicator`): generations, lag, interruption, corruption.
//! - [`SimFencer`]: out-of-band power control (`Fencer`) whose devices
//!   succeed, fail, hang, or lie.
//!
//! Built for the deterministic simulator: no wall-clock reads (time comes
//! from the world's [`Clock`]), no randomness (faults are explicit switches,
//! [`SimWorld::set_fault`], that a seeded simulator flips), ordered maps
//! only, and every delay is a sleep on the world's clock, so a run under a
//! paused tokio clock or a [`ManualClock`] takes no real time.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() {
//! use wspare_core::{Fencer, Hypervisor, NodeId, PowerState, VmName, VmState};
//! use wspare_core::runner::Secret;
//! use wspare_testkit::sim::{test_vm, SimFencer, SimHypervisor, SimWorld};
//!
//! let world = SimWorld::new();
//! let a = NodeId::new("node-a").unwrap();
//! let hv = SimHypervisor::new(&world, &a);
//! let spec = test_vm(&world, &a, &VmName::new("web").unwrap(), "wspare.mode=loop");
//! hv.define(&spec).await.unwrap();
//! hv.start(&spec.name).await.unwrap();
//!
//! world.add_fence_device(&a, "bmc-a", Secret::new("pw"));
//! let fencer = SimFencer::new(&world).with_device(&a, Secret::new("pw"));
//! let receipt = fencer.fence(&a).await.unwrap();
//! assert_eq!(world.host_power(&a), Some(PowerState::Off));
//! assert_eq!(world.vm_state(&a, &spec.name), VmState::ShutOff);
//! println!("{receipt}");
//! # }
//! ```

mod clock;
mod fencer;
mod fixtures;
mod hypervisor;
mod replicator;
mod world;

pub use clock::{Clock, ManualClock, Sleep, TokioClock, DEFAULT_EPOCH};
pub use fencer::{SimFencer, SimFencerConfig};
pub use fixtures::{
    test_vm, FencerWrapper, HypervisorWrapper, ReplicatorWrapper, SimFencerEnv, SimFencerFixture,
    SimHypervisorEnv, SimHypervisorFixture, SimReplicatorEnv, SimReplicatorFixture,
    SIM_FENCE_PASSWORD, SIM_WRONG_PASSWORD,
};
pub use hypervisor::SimHypervisor;
pub use replicator::{SimReplicator, SimReplicatorConfig};
pub use world::{
    digest, digest_all, fresh_guest_disk, read_counter, write_counter, Fault, Guest, GuestMode,
    SimConfig, SimWorld, SECTOR,
};

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use wspare_core::runner::Secret;
    use wspare_core::{
        Fencer, Hypervisor, NodeId, PairId, PowerState, Replicator, SourceView, VmName, VmState,
    };

    use super::*;

    /// A failover by hand, with no runtime, on a manual clock: the VM runs
    /// on node-a and is replicated to node-b from freezes; node-a's fence
    /// device lies once (a false receipt while the VM still runs); then
    /// node-a is fenced for real, the newest generation promoted and the
    /// spare started on node-b from it. Returns a transcript with the
    /// world's state digest after each step.
    fn failover(clock: &ManualClock) -> Vec<String> {
        let world = SimWorld::with_clock(Arc::new(clock.clone()), SimConfig::default());
        let (a, b) = (
            NodeId::new("node-a").unwrap(),
            NodeId::new("node-b").unwrap(),
        );
        let vm = VmName::new("web").unwrap();
        let ha = SimHypervisor::new(&world, &a);
        let hb = SimHypervisor::new(&world, &b);
        let rep = SimReplicator::new(&world, &PairId::new("web").unwrap(), &a, &b);
        world.add_fence_device(&a, "bmc-a", Secret::new("pw-a"));
        let fencer = SimFencer::new(&world).with_device(&a, Secret::new("pw-a"));
        let spec = test_vm(&world, &a, &vm, "wspare.mode=loop wspare.interval_ms=100");
        let mut log = Vec::new();
        let note = |log: &mut Vec<String>, what: String| {
            log.push(format!("{} {what} {}", world.now().0, world.state_digest()));
        };
        clock
            .block_on(async {
                ha.define(&spec).await.unwrap();
                ha.start(&vm).await.unwrap();
                for _ in 0..3 {
                    world.sleep(Duration::from_millis(700)).await;
                    let frozen = ha.freeze_disks(&vm).await.unwrap();
                    let g = rep.sync(&SourceView::Frozen(frozen.clone())).await.unwrap();
                    ha.release_disks(&frozen).await.unwrap();
                    note(&mut log, format!("synced {}", g.generation));
                }
                world.set_fault(Fault::FenceLies(a.clone()));
                let lie = fencer.fence(&a).await.unwrap();
                assert_eq!(
                    world.live_copies(&vm),
                    std::slice::from_ref(&a),
                    "a lying device: the VM still runs"
                );
                note(&mut log, format!("false receipt: {lie}"));
                world.clear_faults();
                let receipt = fencer.fence(&a).await.unwrap();
                assert_eq!(world.host_power(&a), Some(PowerState::Off));
                note(&mut log, format!("receipt: {receipt}"));
                let newest = rep.status().await.unwrap().newest.unwrap();
                let promoted = rep.promote(newest.generation).await.unwrap();
                let at_promote = world.guest_counter(&b, &promoted.disks[0].path).unwrap();
                let mut spare = spec.clone();
                spare.disks = promoted.disks;
                hb.define(&spare).await.unwrap();
                hb.start(&vm).await.unwrap();
                world.sleep(Duration::from_secs(1)).await;
                assert_eq!(hb.status(&vm).await.unwrap().state, VmState::Running);
                assert_eq!(
                    world.live_copies(&vm),
                    std::slice::from_ref(&b),
                    "one copy runs"
                );
                let now = world.guest_counter(&b, &spare.disks[0].path).unwrap();
                assert!(
                    now > at_promote,
                    "the spare goes on from the generation: {at_promote} -> {now}"
                );
                note(
                    &mut log,
                    format!("spare runs from {} at counter {now}", newest.generation),
                );
            })
            .expect("nothing hangs");
        log
    }

    #[test]
    fn a_failover_on_a_manual_clock_replays_identically() {
        let first = failover(&ManualClock::new(DEFAULT_EPOCH));
        let second = failover(&ManualClock::new(DEFAULT_EPOCH));
        assert_eq!(first.len(), 6);
        assert_eq!(first, second, "same steps, same world, same digests");
        assert!(first[5].contains("spare runs from g3"), "{}", first[5]);
    }

    #[test]
    fn a_hanging_call_is_reported_by_the_manual_driver() {
        let clock = ManualClock::new(DEFAULT_EPOCH);
        let world = SimWorld::with_clock(Arc::new(clock.clone()), SimConfig::default());
        let a = NodeId::new("node-a").unwrap();
        world.add_host(&a);
        world.add_fence_device(&a, "bmc-a", Secret::new("pw"));
        let fencer = SimFencer::new(&world).with_device(&a, Secret::new("pw"));
        world.set_fault(Fault::FenceHangs(a.clone()));
        assert!(clock.block_on(fencer.fence(&a)).is_none());
        world.clear_faults();
        assert!(clock.block_on(fencer.fence(&a)).unwrap().is_ok());
    }
}
