//! The simulated network between agents, and the backend wrappers that put
//! the sim backends behind it.
//!
//! Heartbeats are messages the simulator delivers itself (see `sim.rs`);
//! what lives here is the state they and the remote calls consult: which
//! directed links are cut, which nodes' hypervisors are unreachable from
//! elsewhere, and each node's wall clock. A remote call (one node's executor
//! asking another node's hypervisor, or the replicator reaching the other
//! end) needs both directions of its link: a request and its answer.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use wspare_core::driver::WallClock;
use wspare_core::{
    DiskSpec, Error, ErrorKind, FenceReceipt, Fencer, FencerCaps, FrozenDisks, Generation,
    GenerationInfo, Hypervisor, HypervisorCaps, NodeId, PairId, PowerState, Promoted,
    ReplicaStatus, Replicator, ReplicatorCaps, Result, SourceView, UnixMillis, VmName, VmSpec,
    VmStatus,
};

use crate::sim::{Clock, Fault, SimFencer, SimHypervisor, SimReplicator, SimWorld};

/// How long a remote call waits before it gives up on a cut link.
pub(crate) const RPC_TIMEOUT: Duration = Duration::from_secs(2);

/// What the network looks like now. Shared by the simulator (which changes
/// it) and the wrappers (which read it).
#[derive(Default, Debug)]
pub(crate) struct NetState {
    /// Directed links cut, with how many faults cut each (they overlap).
    pub(crate) cut: BTreeMap<(usize, usize), u32>,
    /// Nodes whose hypervisor no other node can reach until their fence
    /// device has told a lie (the flaky second channel of a lie episode).
    pub(crate) flaky_hv: BTreeSet<usize>,
    /// When each node's fence device last lied, by world time.
    pub(crate) lied_at: BTreeMap<usize, UnixMillis>,
}

impl NetState {
    /// Whether messages from `from` reach `to`.
    pub(crate) fn link_up(&self, from: usize, to: usize) -> bool {
        from == to || !self.cut.contains_key(&(from, to))
    }

    /// Whether `from` can call `to` and hear the answer.
    pub(crate) fn rpc_up(&self, from: usize, to: usize) -> bool {
        self.link_up(from, to) && self.link_up(to, from)
    }
}

/// The shared network state.
#[derive(Clone, Default, Debug)]
pub(crate) struct Net(Arc<Mutex<NetState>>);

impl Net {
    pub(crate) fn lock(&self) -> MutexGuard<'_, NetState> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn cut(&self, from: usize, to: usize) {
        *self.lock().cut.entry((from, to)).or_default() += 1;
    }

    pub(crate) fn uncut(&self, from: usize, to: usize) {
        let mut s = self.lock();
        if let Some(n) = s.cut.get_mut(&(from, to)) {
            *n -= 1;
            if *n == 0 {
                s.cut.remove(&(from, to));
            }
        }
    }

    fn rpc_up(&self, from: usize, to: usize) -> bool {
        self.lock().rpc_up(from, to)
    }

    /// A remote call from `from` to `to`: fails after [`RPC_TIMEOUT`] when
    /// the link is cut either way.
    async fn gate(&self, world: &SimWorld, from: usize, to: usize, what: &str) -> Result<()> {
        if from == to || self.rpc_up(from, to) {
            return Ok(());
        }
        world.sleep(RPC_TIMEOUT).await;
        Err(Error::new(
            ErrorKind::Unreachable,
            format!("sim network: {what}: no answer within {RPC_TIMEOUT:?}"),
        ))
    }
}

/// A node's wall clock: the world's, off by a skew the simulator sets.
#[derive(Debug)]
pub(crate) struct SkewClock {
    world: Arc<dyn Clock>,
    offset_ms: AtomicI64,
}

impl SkewClock {
    pub(crate) fn new(world: Arc<dyn Clock>, offset_ms: i64) -> Self {
        SkewClock {
            world,
            offset_ms: AtomicI64::new(offset_ms),
        }
    }

    pub(crate) fn offset_ms(&self) -> i64 {
        self.offset_ms.load(Ordering::Relaxed)
    }

    pub(crate) fn step(&self, delta_ms: i64) {
        self.offset_ms.fetch_add(delta_ms, Ordering::Relaxed);
    }

    fn shift(&self, t: UnixMillis) -> UnixMillis {
        UnixMillis(t.0.saturating_add_signed(self.offset_ms()))
    }
}

impl WallClock for SkewClock {
    fn now(&self) -> UnixMillis {
        self.shift(self.world.now())
    }
}

/// A hypervisor as one node's executor sees it: its own directly, a
/// peer's over the network (the second channel). Freeze times are read by
/// the hypervisor's host clock.
pub(crate) struct SwarmHv {
    pub(crate) inner: SimHypervisor,
    pub(crate) world: SimWorld,
    pub(crate) net: Net,
    /// The caller's node.
    pub(crate) from: usize,
    /// The hypervisor's node.
    pub(crate) to: usize,
    /// The hypervisor host's clock.
    pub(crate) host_clock: Arc<SkewClock>,
}

impl SwarmHv {
    async fn gate(&self) -> Result<()> {
        if self.from != self.to && self.net.lock().flaky_hv.contains(&self.to) {
            self.world.sleep(RPC_TIMEOUT).await;
            return Err(Error::new(
                ErrorKind::Unreachable,
                format!(
                    "sim network: the hypervisor of {} does not answer (flaky channel)",
                    self.inner.node()
                ),
            ));
        }
        let what = format!("the hypervisor of {}", self.inner.node());
        self.net.gate(&self.world, self.from, self.to, &what).await
    }
}

#[async_trait]
impl Hypervisor for SwarmHv {
    fn describe(&self) -> String {
        self.inner.describe()
    }
    fn capabilities(&self) -> HypervisorCaps {
        self.inner.capabilities()
    }
    async fn status(&self, vm: &VmName) -> Result<VmStatus> {
        self.gate().await?;
        self.inner.status(vm).await
    }
    async fn list(&self) -> Result<Vec<VmName>> {
        self.gate().await?;
        self.inner.list().await
    }
    async fn define(&self, spec: &VmSpec) -> Result<()> {
        self.gate().await?;
        self.inner.define(spec).await
    }
    async fn spec(&self, vm: &VmName) -> Result<VmSpec> {
        self.gate().await?;
        self.inner.spec(vm).await
    }
    async fn undefine(&self, vm: &VmName) -> Result<()> {
        self.gate().await?;
        self.inner.undefine(vm).await
    }
    async fn start(&self, vm: &VmName) -> Result<()> {
        self.gate().await?;
        self.inner.start(vm).await
    }
    async fn shutdown(&self, vm: &VmName, timeout: Duration) -> Result<()> {
        self.gate().await?;
        self.inner.shutdown(vm, timeout).await
    }
    async fn destroy(&self, vm: &VmName) -> Result<()> {
        self.gate().await?;
        self.inner.destroy(vm).await
    }
    async fn attach_disk(&self, vm: &VmName, disk: &DiskSpec) -> Result<()> {
        self.gate().await?;
        self.inner.attach_disk(vm, disk).await
    }
    async fn detach_disk(&self, vm: &VmName, target: &str) -> Result<()> {
        self.gate().await?;
        self.inner.detach_disk(vm, target).await
    }
    async fn freeze_disks(&self, vm: &VmName) -> Result<FrozenDisks> {
        self.gate().await?;
        let mut f = self.inner.freeze_disks(vm).await?;
        f.at = self.host_clock.shift(f.at);
        Ok(f)
    }
    async fn release_disks(&self, frozen: &FrozenDisks) -> Result<()> {
        self.gate().await?;
        self.inner.release_disks(frozen).await
    }
}

/// A pair's replicator as one node's executor sees it: cycles and reversal
/// need the other end; reading the target's store or promoting from it
/// need the target (local on the spare).
pub(crate) struct SwarmReplicator {
    pub(crate) inner: SimReplicator,
    pub(crate) world: SimWorld,
    pub(crate) net: Net,
    pub(crate) pair: PairId,
    pub(crate) local: usize,
    /// The pair's two nodes, by index.
    pub(crate) nodes: [(usize, NodeId); 2],
}

impl SwarmReplicator {
    fn other(&self) -> usize {
        if self.nodes[0].0 == self.local {
            self.nodes[1].0
        } else {
            self.nodes[0].0
        }
    }

    async fn to_peer(&self) -> Result<()> {
        let what = format!("replication of {}", self.pair);
        self.net
            .gate(&self.world, self.local, self.other(), &what)
            .await
    }

    async fn to_target(&self) -> Result<()> {
        let target = self
            .world
            .replica_direction(&self.pair)
            .map(|(_, t)| t)
            .and_then(|t| self.nodes.iter().find(|(_, n)| *n == t).map(|(i, _)| *i))
            .unwrap_or(self.local);
        let what = format!("the replica of {} on its target", self.pair);
        self.net.gate(&self.world, self.local, target, &what).await
    }
}

#[async_trait]
impl Replicator for SwarmReplicator {
    fn describe(&self) -> String {
        self.inner.describe()
    }
    fn capabilities(&self) -> ReplicatorCaps {
        self.inner.capabilities()
    }
    async fn initial_sync(&self, source: &SourceView) -> Result<GenerationInfo> {
        self.to_peer().await?;
        self.inner.initial_sync(source).await
    }
    async fn sync(&self, source: &SourceView) -> Result<GenerationInfo> {
        self.to_peer().await?;
        self.inner.sync(source).await
    }
    async fn status(&self) -> Result<ReplicaStatus> {
        self.to_target().await?;
        self.inner.status().await
    }
    async fn promote(&self, g: Generation) -> Result<Promoted> {
        self.to_target().await?;
        self.inner.promote(g).await
    }
    async fn reverse(&self) -> Result<()> {
        self.to_peer().await?;
        self.inner.reverse().await
    }
    async fn verify(&self, g: Generation, source: &SourceView) -> Result<()> {
        self.to_peer().await?;
        self.inner.verify(g, source).await
    }
    async fn stop(&self) -> Result<()> {
        self.inner.stop().await
    }
    async fn test_copy(&self, g: Generation, label: &str) -> Result<Vec<DiskSpec>> {
        self.to_target().await?;
        self.inner.test_copy(g, label).await
    }
    async fn discard_test_copy(&self, label: &str) -> Result<()> {
        self.to_target().await?;
        self.inner.discard_test_copy(label).await
    }
}

/// The out-of-band fencer (its own management network: partitions of the
/// agents' network do not reach it). When a device lies, the flaky second
/// channel to its node heals: the fault model's guarantee that the
/// post-fence check sees the truth.
pub(crate) struct SwarmFencer {
    pub(crate) inner: SimFencer,
    pub(crate) world: SimWorld,
    pub(crate) net: Net,
    /// Node index by name, for the nodes this fencer may fence.
    pub(crate) index: Vec<(NodeId, usize)>,
}

impl SwarmFencer {
    fn after(&self, node: &NodeId, read_off: bool) {
        if !read_off || !self.world.has_fault(&Fault::FenceLies(node.clone())) {
            return;
        }
        if let Some((_, i)) = self.index.iter().find(|(n, _)| n == node) {
            let mut s = self.net.lock();
            s.flaky_hv.remove(i);
            s.lied_at.insert(*i, self.world.now());
        }
    }
}

#[async_trait]
impl Fencer for SwarmFencer {
    fn describe(&self) -> String {
        self.inner.describe()
    }
    fn capabilities(&self) -> FencerCaps {
        self.inner.capabilities()
    }
    async fn fence(&self, node: &NodeId) -> Result<FenceReceipt> {
        let r = self.inner.fence(node).await;
        self.after(node, r.is_ok());
        r
    }
    async fn power_status(&self, node: &NodeId) -> Result<PowerState> {
        let r = self.inner.power_status(node).await;
        self.after(node, matches!(r, Ok(PowerState::Off)));
        r
    }
    async fn unfence(&self, node: &NodeId) -> Result<()> {
        self.inner.unfence(node).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::{test_vm, SimWorld};

    #[tokio::test(start_paused = true)]
    async fn a_cut_link_fails_remote_calls_both_ways_but_not_local_ones() {
        let world = SimWorld::new();
        let net = Net::default();
        let a = NodeId::new("a").unwrap();
        let vm = VmName::new("web").unwrap();
        let spec = test_vm(&world, &a, &vm, "wspare.mode=loop");
        let clock = Arc::new(SkewClock::new(world.clock(), 0));
        let hv = |from| SwarmHv {
            inner: SimHypervisor::new(&world, &a),
            world: world.clone(),
            net: net.clone(),
            from,
            to: 0,
            host_clock: clock.clone(),
        };
        hv(0).define(&spec).await.unwrap();
        net.cut(0, 1);
        let t0 = world.now();
        let e = hv(1).status(&vm).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unreachable);
        assert_eq!(world.now().saturating_since(t0), RPC_TIMEOUT);
        hv(0).status(&vm).await.unwrap();
        net.uncut(0, 1);
        hv(1).status(&vm).await.unwrap();
        net.lock().flaky_hv.insert(0);
        assert!(hv(1).status(&vm).await.is_err());
        hv(0).status(&vm).await.unwrap();
    }

    #[test]
    fn skew_shifts_the_wall_clock() {
        let world = SimWorld::with_clock(
            Arc::new(crate::sim::ManualClock::new(UnixMillis(10_000))),
            Default::default(),
        );
        let c = SkewClock::new(world.clock(), -3000);
        assert_eq!(c.now(), UnixMillis(7000));
        c.step(5000);
        assert_eq!(c.now(), UnixMillis(12_000));
    }
}
