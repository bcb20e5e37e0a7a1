//! Conformance fixtures for the sim backends: each case gets a fresh
//! [`SimWorld`]. They also show how a fixture is written.
//!
//! Each fixture can wrap the backend before the suite sees it
//! ([`SimHypervisorFixture::wrap`] and friends): the testkit's own tests
//! use that to plant deliberate bugs and check the suite catches them.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use wspare_core::runner::Secret;
use wspare_core::{
    Boot, DiskBus, DiskFormat, DiskSpec, Error, Fencer, Firmware, Hypervisor, MacAddr, NicModel,
    NicSource, NicSpec, NodeId, PairId, PowerState, Replicator, Result, SourceView, VmName, VmSpec,
};

use super::world::{digest_all, flip, fresh_guest_disk, Fault, SimConfig, SimWorld};
use super::{SimFencer, SimFencerConfig, SimHypervisor, SimReplicator, SimReplicatorConfig};
use crate::suite::fencer::{FencerEnv, FencerFixture, FencerVariant};
use crate::suite::hypervisor::{GuestTraits, HypervisorEnv, HypervisorFixture};
use crate::suite::replicator::{ReplicatorEnv, ReplicatorFixture};

/// Wraps a hypervisor before the suite sees it.
pub type HypervisorWrapper =
    Arc<dyn Fn(Arc<dyn Hypervisor>, &SimWorld) -> Arc<dyn Hypervisor> + Send + Sync>;
/// Wraps a replicator before the suite sees it.
pub type ReplicatorWrapper =
    Arc<dyn Fn(Arc<dyn Replicator>, &SimWorld) -> Arc<dyn Replicator> + Send + Sync>;
/// Wraps a fencer before the suite sees it.
pub type FencerWrapper = Arc<dyn Fn(Arc<dyn Fencer>, &SimWorld) -> Arc<dyn Fencer> + Send + Sync>;

fn node(s: &str) -> NodeId {
    NodeId::new(s).expect("fixture node names are valid")
}

/// A test VM on `node` of `world`: fresh images (`vda` with the guest's
/// counter at 0, `vdb` blank) under `/var/lib/wspare-sim/images/<name>/`,
/// and a spec that boots the test guest with `cmdline` (for example
/// `wspare.mode=loop wspare.interval_ms=100`, see [`Guest`](super::Guest)).
pub fn test_vm(world: &SimWorld, node: &NodeId, name: &VmName, cmdline: &str) -> VmSpec {
    let dir = PathBuf::from(format!("/var/lib/wspare-sim/images/{name}"));
    let mut disks = Vec::new();
    for (slot, content) in [("vda", fresh_guest_disk()), ("vdb", vec![0; 64])] {
        let path = dir.join(format!("{slot}.img"));
        world.write_image(node, &path, content);
        disks.push(DiskSpec {
            target: slot.into(),
            path,
            format: DiskFormat::Raw,
            bus: DiskBus::Virtio,
            read_only: false,
        });
    }
    // FNV-1a of the name: a stable, locally administered unicast MAC.
    let h = name
        .as_str()
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        });
    let b = h.to_le_bytes();
    VmSpec {
        name: name.clone(),
        vcpus: 1,
        memory_mib: 128,
        firmware: Firmware::Bios,
        disks,
        nics: vec![NicSpec {
            mac: MacAddr([0x52, 0x54, 0x00, b[0], b[1], b[2]]),
            source: NicSource::Bridge("br0".into()),
            model: NicModel::Virtio,
        }],
        boot: Boot::Kernel {
            kernel: "/var/lib/wspare-sim/guest/vmlinuz".into(),
            initrd: Some("/var/lib/wspare-sim/guest/initrd.img".into()),
            cmdline: format!("console=ttyS0 {cmdline}"),
        },
    }
}

// ---------------------------------------------------------------- hypervisor

/// Builds a one-host world with a [`SimHypervisor`] per case.
#[derive(Clone, Default)]
pub struct SimHypervisorFixture {
    config: SimConfig,
    title: Option<String>,
    wrap: Option<HypervisorWrapper>,
}

impl SimHypervisorFixture {
    /// With default world timings.
    pub fn new() -> Self {
        Self::default()
    }

    /// With these world timings.
    pub fn with_config(mut self, config: SimConfig) -> Self {
        self.config = config;
        self
    }

    /// The report's title.
    pub fn titled(mut self, title: impl Into<String>) -> Self {
        self.title = Some(title.into());
        self
    }

    /// Hands the suite `wrap(backend, world)` instead of the backend.
    pub fn wrap(
        mut self,
        wrap: impl Fn(Arc<dyn Hypervisor>, &SimWorld) -> Arc<dyn Hypervisor> + Send + Sync + 'static,
    ) -> Self {
        self.wrap = Some(Arc::new(wrap));
        self
    }
}

/// The environment [`SimHypervisorFixture`] builds: host `node-a`.
pub struct SimHypervisorEnv {
    world: SimWorld,
    node: NodeId,
    hypervisor: Arc<dyn Hypervisor>,
}

impl SimHypervisorEnv {
    /// The world.
    pub fn world(&self) -> &SimWorld {
        &self.world
    }
}

#[async_trait]
impl HypervisorFixture for SimHypervisorFixture {
    fn title(&self) -> String {
        self.title
            .clone()
            .unwrap_or_else(|| "sim hypervisor".into())
    }

    async fn build(&self) -> Result<Box<dyn HypervisorEnv>> {
        let world = SimWorld::with_config(self.config.clone());
        let node = node("node-a");
        let mut hypervisor: Arc<dyn Hypervisor> = Arc::new(SimHypervisor::new(&world, &node));
        if let Some(w) = &self.wrap {
            hypervisor = w(hypervisor, &world);
        }
        Ok(Box::new(SimHypervisorEnv {
            world,
            node,
            hypervisor,
        }))
    }
}

#[async_trait]
impl HypervisorEnv for SimHypervisorEnv {
    fn hypervisor(&self) -> Arc<dyn Hypervisor> {
        self.hypervisor.clone()
    }

    async fn vm_spec(&self, name: &VmName) -> Result<VmSpec> {
        Ok(test_vm(
            &self.world,
            &self.node,
            name,
            "wspare.mode=loop wspare.interval_ms=100",
        ))
    }

    async fn stubborn_vm_spec(&self, name: &VmName) -> Result<Option<VmSpec>> {
        Ok(Some(test_vm(
            &self.world,
            &self.node,
            name,
            "wspare.mode=loop wspare.interval_ms=100 acpi=off",
        )))
    }

    async fn image_digest(&self, path: &Path) -> Result<String> {
        self.world.image_digest(&self.node, path).ok_or_else(|| {
            Error::not_found(format!("no image {} on {}", path.display(), self.node))
        })
    }

    fn guest(&self) -> GuestTraits {
        GuestTraits {
            writes_disk: true,
            honours_shutdown: true,
            boot_time: self.world.config().guest_boot * 2,
            deadline_slack: self.world.config().poll_interval * 2,
        }
    }
}

// ---------------------------------------------------------------- replicator

/// Builds a two-host world (`node-a` -> `node-b`, pair `web`, two disks)
/// with a [`SimReplicator`] per case.
#[derive(Clone, Default)]
pub struct SimReplicatorFixture {
    config: SimConfig,
    replicator: SimReplicatorConfig,
    title: Option<String>,
    wrap: Option<ReplicatorWrapper>,
}

impl SimReplicatorFixture {
    /// With default timings and settings.
    pub fn new() -> Self {
        Self::default()
    }

    /// With these world timings.
    pub fn with_config(mut self, config: SimConfig) -> Self {
        self.config = config;
        self
    }

    /// With these replicator settings.
    pub fn with_replicator_config(mut self, config: SimReplicatorConfig) -> Self {
        self.replicator = config;
        self
    }

    /// The report's title.
    pub fn titled(mut self, title: impl Into<String>) -> Self {
        self.title = Some(title.into());
        self
    }

    /// Hands the suite `wrap(backend, world)` instead of the backend.
    pub fn wrap(
        mut self,
        wrap: impl Fn(Arc<dyn Replicator>, &SimWorld) -> Arc<dyn Replicator> + Send + Sync + 'static,
    ) -> Self {
        self.wrap = Some(Arc::new(wrap));
        self
    }
}

/// The environment [`SimReplicatorFixture`] builds.
pub struct SimReplicatorEnv {
    world: SimWorld,
    pair: PairId,
    replicator: Arc<dyn Replicator>,
    /// The VM's disks; the same paths on either host.
    disks: Vec<DiskSpec>,
}

/// Deterministic content for disk `i` from `seed`.
fn pattern(seed: u64, i: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (i as u64 + 1);
    (0..64)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

impl SimReplicatorEnv {
    /// The world.
    pub fn world(&self) -> &SimWorld {
        &self.world
    }

    fn source(&self) -> Result<NodeId> {
        self.world
            .replica_direction(&self.pair)
            .map(|(s, _)| s)
            .ok_or_else(|| Error::not_found(format!("pair {} has no replica", self.pair)))
    }

    /// Where the image at `path` is: the target first, then any host.
    fn locate(&self, path: &Path) -> Result<NodeId> {
        let nodes = self.world.image_nodes(path);
        let target = self.world.replica_direction(&self.pair).map(|(_, t)| t);
        target
            .filter(|t| nodes.contains(t))
            .or_else(|| nodes.first().cloned())
            .ok_or_else(|| Error::not_found(format!("no image {} on any host", path.display())))
    }
}

#[async_trait]
impl ReplicatorFixture for SimReplicatorFixture {
    fn title(&self) -> String {
        self.title
            .clone()
            .unwrap_or_else(|| "sim replicator".into())
    }

    async fn build(&self) -> Result<Box<dyn ReplicatorEnv>> {
        let world = SimWorld::with_config(self.config.clone());
        let (a, b) = (node("node-a"), node("node-b"));
        let pair = PairId::new("web").expect("valid");
        let disks: Vec<DiskSpec> = ["vda", "vdb"]
            .iter()
            .map(|slot| DiskSpec {
                target: slot.to_string(),
                path: format!("/var/lib/wspare-sim/vm/web/{slot}.img").into(),
                format: DiskFormat::Raw,
                bus: DiskBus::Virtio,
                read_only: false,
            })
            .collect();
        let mut replicator: Arc<dyn Replicator> = Arc::new(SimReplicator::with_config(
            &world,
            &pair,
            &a,
            &b,
            self.replicator.clone(),
        ));
        for (i, d) in disks.iter().enumerate() {
            world.write_image(&a, &d.path, pattern(0, i));
            world.write_image(&b, &d.path, pattern(u64::MAX, i));
        }
        if let Some(w) = &self.wrap {
            replicator = w(replicator, &world);
        }
        Ok(Box::new(SimReplicatorEnv {
            world,
            pair,
            replicator,
            disks,
        }))
    }
}

#[async_trait]
impl ReplicatorEnv for SimReplicatorEnv {
    fn replicator(&self) -> Arc<dyn Replicator> {
        self.replicator.clone()
    }

    async fn source_view(&self) -> Result<SourceView> {
        Ok(SourceView::Stopped {
            disks: self.disks.clone(),
            at: self.world.now(),
        })
    }

    async fn write_source(&self, seed: u64) -> Result<()> {
        let src = self.source()?;
        for (i, d) in self.disks.iter().enumerate() {
            self.world.write_image(&src, &d.path, pattern(seed, i));
        }
        Ok(())
    }

    async fn source_digest(&self) -> Result<String> {
        let src = self.source()?;
        let images = self
            .disks
            .iter()
            .map(|d| {
                self.world.image(&src, &d.path).ok_or_else(|| {
                    Error::not_found(format!("no source image {}", d.path.display()))
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(digest_all(images.iter().map(Vec::as_slice)))
    }

    async fn digest(&self, disks: &[DiskSpec]) -> Result<String> {
        let mut images = Vec::new();
        for d in disks {
            let n = self.locate(&d.path)?;
            images.push(self.world.image(&n, &d.path).unwrap_or_default());
        }
        Ok(digest_all(images.iter().map(Vec::as_slice)))
    }

    async fn tamper(&self, disks: &[DiskSpec]) -> Result<()> {
        for d in disks {
            let n = self.locate(&d.path)?;
            let mut img = self.world.image(&n, &d.path).unwrap_or_default();
            flip(&mut img);
            self.world.write_image(&n, &d.path, img);
        }
        Ok(())
    }

    async fn break_next_sync(&self) -> Result<bool> {
        self.world
            .set_fault(Fault::BreakNextSync(self.pair.clone()));
        Ok(true)
    }
}

// ---------------------------------------------------------------- fencer

/// The password of the sim fence device, as the fixture configures it.
pub const SIM_FENCE_PASSWORD: &str = "sim-pw-5f3a9c1d";
/// The password the fixture configures for [`FencerVariant::WrongCredentials`].
pub const SIM_WRONG_PASSWORD: &str = "sim-pw-wrong-7e21b4";

/// Builds a world with host `node-a`, its fence device `bmc-node-a`, and a
/// [`SimFencer`] per case; variants switch the matching faults on.
#[derive(Clone, Default)]
pub struct SimFencerFixture {
    config: SimConfig,
    fencer: SimFencerConfig,
    title: Option<String>,
    wrap: Option<FencerWrapper>,
}

impl SimFencerFixture {
    /// With default timings and settings.
    pub fn new() -> Self {
        Self::default()
    }

    /// With these world timings.
    pub fn with_config(mut self, config: SimConfig) -> Self {
        self.config = config;
        self
    }

    /// With these fencer settings.
    pub fn with_fencer_config(mut self, config: SimFencerConfig) -> Self {
        self.fencer = config;
        self
    }

    /// The report's title.
    pub fn titled(mut self, title: impl Into<String>) -> Self {
        self.title = Some(title.into());
        self
    }

    /// Hands the suite `wrap(backend, world)` instead of the backend.
    pub fn wrap(
        mut self,
        wrap: impl Fn(Arc<dyn Fencer>, &SimWorld) -> Arc<dyn Fencer> + Send + Sync + 'static,
    ) -> Self {
        self.wrap = Some(Arc::new(wrap));
        self
    }
}

/// The environment [`SimFencerFixture`] builds.
pub struct SimFencerEnv {
    world: SimWorld,
    node: NodeId,
    fencer: Arc<dyn Fencer>,
    secret: String,
}

impl SimFencerEnv {
    /// The world.
    pub fn world(&self) -> &SimWorld {
        &self.world
    }
}

#[async_trait]
impl FencerFixture for SimFencerFixture {
    fn title(&self) -> String {
        self.title.clone().unwrap_or_else(|| "sim fencer".into())
    }

    async fn build(&self, variant: FencerVariant) -> Result<Option<Box<dyn FencerEnv>>> {
        let world = SimWorld::with_config(self.config.clone());
        let a = node("node-a");
        world.add_host(&a);
        world.add_fence_device(&a, "bmc-node-a", Secret::new(SIM_FENCE_PASSWORD));
        let secret = match variant {
            FencerVariant::WrongCredentials => SIM_WRONG_PASSWORD,
            _ => SIM_FENCE_PASSWORD,
        };
        match variant {
            FencerVariant::StuckOn => world.set_fault(Fault::FenceStuckOn(a.clone())),
            FencerVariant::DeadDevice => world.set_fault(Fault::FenceDeviceDead(a.clone())),
            FencerVariant::Normal | FencerVariant::WrongCredentials => {}
        }
        let mut fencer: Arc<dyn Fencer> = Arc::new(
            SimFencer::with_config(&world, self.fencer.clone())
                .with_device(&a, Secret::new(secret)),
        );
        if let Some(w) = &self.wrap {
            fencer = w(fencer, &world);
        }
        Ok(Some(Box::new(SimFencerEnv {
            world,
            node: a,
            fencer,
            secret: secret.to_string(),
        })))
    }
}

#[async_trait]
impl FencerEnv for SimFencerEnv {
    fn fencer(&self) -> Arc<dyn Fencer> {
        self.fencer.clone()
    }

    fn node(&self) -> NodeId {
        self.node.clone()
    }

    fn unknown_node(&self) -> NodeId {
        node("node-z")
    }

    async fn true_power(&self) -> Result<PowerState> {
        Ok(self
            .world
            .host_power(&self.node)
            .unwrap_or(PowerState::Unknown))
    }

    fn secret(&self) -> Option<String> {
        Some(self.secret.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_vms_are_valid_and_distinct() {
        let w = SimWorld::new();
        let a = node("a");
        let s1 = test_vm(&w, &a, &VmName::new("one").unwrap(), "wspare.mode=idle");
        let s2 = test_vm(&w, &a, &VmName::new("two").unwrap(), "wspare.mode=idle");
        s1.validate().unwrap();
        assert_ne!(s1.nics[0].mac, s2.nics[0].mac);
        assert_eq!(w.guest_counter(&a, &s1.disks[0].path), Some(0));
        assert_ne!(pattern(1, 0), pattern(1, 1));
        assert_ne!(pattern(1, 0), pattern(2, 0));
    }
}
