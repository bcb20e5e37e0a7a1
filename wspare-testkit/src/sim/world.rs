//! [`SimWorld`]: the shared, deterministic in-memory world the sim backends
//! act on: hosts with power, VMs with guests that write their disks, disk
//! images as small byte vectors, replicas with generations, fence devices,
//! and fault switches.
//!
//! Nothing here reads the wall clock or draws a random number: time comes
//! from the world's [`Clock`], and faults are switched on and off
//! explicitly ([`SimWorld::set_fault`]), so the simulator can derive them
//! from its seed. Guests are lazy: a running guest's writes are worked out
//! from the clock whenever anyone looks at the world, so no background task
//! runs and an idle world costs nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use sha2::{Digest, Sha256};
use wspare_core::runner::Secret;
use wspare_core::{
    DiskSpec, Generation, GenerationInfo, NodeId, PairId, PowerState, Progress, UnixMillis, VmName,
    VmSpec, VmState,
};

use super::clock::{Clock, TokioClock};

/// Timings of the simulated world. All of it is world time: under a paused
/// tokio clock or a [`ManualClock`](super::ManualClock) it costs nothing.
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// From `start` until the guest has booted: its first disk write, and
    /// from then on it reacts to ACPI.
    pub guest_boot: Duration,
    /// How long a guest that honours ACPI takes to power off after the
    /// request.
    pub guest_acpi_delay: Duration,
    /// The latency of every backend call.
    pub op_latency: Duration,
    /// From a fence device's power-off command until the host is off.
    pub power_off_delay: Duration,
    /// Time a sync takes per disk.
    pub copy_time_per_disk: Duration,
    /// How often a sim backend polls while it waits (shutdown, fence).
    pub poll_interval: Duration,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            guest_boot: Duration::from_millis(200),
            guest_acpi_delay: Duration::from_millis(300),
            op_latency: Duration::from_millis(1),
            power_off_delay: Duration::from_millis(500),
            copy_time_per_disk: Duration::from_millis(20),
            poll_interval: Duration::from_millis(50),
        }
    }
}

/// A fault switch. Persistent faults hold until [`SimWorld::clear_fault`];
/// one-shot faults (named `...Next...`) are used up by the call they hit.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub enum Fault {
    /// Every call to the hypervisor on this node fails with `Unreachable`
    /// (daemon down, management network cut).
    HypervisorUnreachable(NodeId),
    /// Every call to the hypervisor on this node hangs, never returning (a
    /// wedged daemon): the caller's deadline must cope.
    HypervisorHangs(NodeId),
    /// Replication of this pair cannot reach its peer: `Unreachable`.
    ReplicationUnreachable(PairId),
    /// The next sync of this pair fails midway (one-shot).
    BreakNextSync(PairId),
    /// Every sync of this pair fails midway, until cleared.
    SyncFails(PairId),
    /// Syncs of this pair hang midway, never returning.
    SyncHangs(PairId),
    /// The next sync of this pair silently flips a byte of its copy on the
    /// target (one-shot); `verify` finds it.
    CorruptNextSync(PairId),
    /// This node's fence device answers every command with an error.
    FenceFails(NodeId),
    /// Calls to this node's fence device never return (a backend stuck in a
    /// call, which breaks F7 on purpose: the driver's deadline must cope).
    FenceHangs(NodeId),
    /// This node's fence device lies: it reports off while the node runs,
    /// and does not power it off.
    FenceLies(NodeId),
    /// This node's fence device accepts power-off but the node stays on and
    /// the device keeps reading on.
    FenceStuckOn(NodeId),
    /// This node's fence device does not answer: `Unreachable` after the
    /// fencer's connect timeout.
    FenceDeviceDead(NodeId),
}

impl Fault {
    /// The node a hypervisor or fence-device fault is about (`None` for a
    /// pair's replication faults).
    pub fn node(&self) -> Option<&NodeId> {
        match self {
            Fault::HypervisorUnreachable(n)
            | Fault::HypervisorHangs(n)
            | Fault::FenceFails(n)
            | Fault::FenceHangs(n)
            | Fault::FenceLies(n)
            | Fault::FenceStuckOn(n)
            | Fault::FenceDeviceDead(n) => Some(n),
            Fault::ReplicationUnreachable(_)
            | Fault::BreakNextSync(_)
            | Fault::SyncFails(_)
            | Fault::SyncHangs(_)
            | Fault::CorruptNextSync(_) => None,
        }
    }
}

/// Bytes of the guest's counter sector in the sim (the real test guest uses
/// a 512-byte sector; see `scripts/guest-init`).
pub const SECTOR: usize = 64;

/// The guest's counter in the first sector of `image`: `WSPARE <n>\n` then
/// NUL bytes; an image without one reads 0.
pub fn read_counter(image: &[u8]) -> u64 {
    let sector = &image[..image.len().min(SECTOR)];
    let Some(rest) = sector.strip_prefix(b"WSPARE ") else {
        return 0;
    };
    let digits: Vec<u8> = rest
        .iter()
        .copied()
        .take_while(u8::is_ascii_digit)
        .collect();
    std::str::from_utf8(&digits)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// Writes counter `n` into the first sector of `image` (growing it to a
/// sector if needed), as the test guest does.
pub fn write_counter(image: &mut Vec<u8>, n: u64) {
    if image.len() < SECTOR {
        image.resize(SECTOR, 0);
    }
    let text = format!("WSPARE {n}\n");
    image[..SECTOR].fill(0);
    image[..text.len()].copy_from_slice(text.as_bytes());
}

/// A fresh guest disk: counter 0 in a zeroed sector.
pub fn fresh_guest_disk() -> Vec<u8> {
    let mut v = vec![0; SECTOR];
    write_counter(&mut v, 0);
    v
}

/// SHA-256 of `bytes`, lowercase hex.
pub fn digest(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// SHA-256 over several images in order, each length-prefixed, hex.
pub fn digest_all<'a>(images: impl IntoIterator<Item = &'a [u8]>) -> String {
    let mut h = Sha256::new();
    for i in images {
        h.update((i.len() as u64).to_le_bytes());
        h.update(i);
    }
    hex::encode(h.finalize())
}

/// What the guest of a VM does, read from its kernel command line as the
/// real test guest does (`scripts/guest-init`, [`crate::guest`]):
/// `wspare.mode=once|loop|idle` (default `once`), `wspare.interval_ms=N`
/// (default 200), and `acpi=off` for a guest that ignores ACPI shutdown. A
/// VM that boots from disk is `idle`.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Guest {
    /// What it does once booted.
    pub mode: GuestMode,
    /// Time between writes in `loop` mode, ms.
    pub interval_ms: u64,
    /// Powers off on an ACPI request.
    pub acpi: bool,
}

/// A guest's behaviour once booted.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum GuestMode {
    /// Counter +1, then power off.
    Once,
    /// Counter +1 every interval, forever.
    Loop,
    /// Counter +1 once, then stay up.
    Idle,
}

impl Guest {
    /// The guest a spec boots.
    pub fn of(spec: &VmSpec) -> Guest {
        let mut g = Guest {
            mode: GuestMode::Idle,
            interval_ms: 200,
            acpi: true,
        };
        if let wspare_core::Boot::Kernel { cmdline, .. } = &spec.boot {
            g.mode = GuestMode::Once;
            for arg in cmdline.split_whitespace() {
                match arg.split_once('=') {
                    Some(("wspare.mode", "once")) => g.mode = GuestMode::Once,
                    Some(("wspare.mode", "loop")) => g.mode = GuestMode::Loop,
                    Some(("wspare.mode", "idle")) => g.mode = GuestMode::Idle,
                    Some(("wspare.interval_ms", v)) => {
                        g.interval_ms = v.parse().unwrap_or(200).max(1)
                    }
                    Some(("acpi", "off")) => g.acpi = false,
                    _ => {}
                }
            }
        }
        g
    }
}

pub(crate) fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The world's state; sim backends change it under the world's lock.
#[derive(Default)]
pub(crate) struct State {
    pub(crate) hosts: BTreeMap<NodeId, Host>,
    pub(crate) images: Images,
    pub(crate) faults: BTreeSet<Fault>,
    pub(crate) replicas: BTreeMap<PairId, Replica>,
    pub(crate) fence_devices: BTreeMap<NodeId, FenceDevice>,
}

/// Disk images by host and path.
pub(crate) type Images = BTreeMap<(NodeId, PathBuf), Vec<u8>>;

pub(crate) struct Host {
    pub(crate) power: PowerState,
    /// A pending power-off (a fence device's command taking effect).
    pub(crate) off_at: Option<u64>,
    pub(crate) vms: BTreeMap<VmName, Vm>,
}

pub(crate) struct Vm {
    pub(crate) spec: VmSpec,
    pub(crate) state: VmState,
    pub(crate) reason: Option<String>,
    pub(crate) run: Option<Run>,
    pub(crate) freeze: Option<Freeze>,
}

pub(crate) struct Run {
    pub(crate) started: u64,
    pub(crate) guest: Guest,
    pub(crate) writes: u64,
    /// When the guest powers off (once mode, or an ACPI request it honours).
    pub(crate) off_at: Option<u64>,
    pub(crate) off_reason: &'static str,
}

pub(crate) struct Freeze {
    /// (base image, overlay) per disk, in the VM's disk order.
    pub(crate) overlays: Vec<(PathBuf, PathBuf)>,
}

pub(crate) struct Replica {
    pub(crate) source: NodeId,
    pub(crate) target: NodeId,
    /// The largest generation ever made, on either side.
    pub(crate) highest: Generation,
    /// Complete generations held, by node.
    pub(crate) stores: BTreeMap<NodeId, BTreeMap<Generation, StoredGen>>,
    pub(crate) stopped: bool,
    pub(crate) progress: Option<(u64, Progress)>,
    pub(crate) next_sync: u64,
    pub(crate) test_copies: BTreeMap<String, (NodeId, Vec<DiskSpec>)>,
}

pub(crate) struct StoredGen {
    pub(crate) info: GenerationInfo,
    pub(crate) disks: Vec<DiskSpec>,
    /// Digest of each disk as read from the source.
    pub(crate) checksums: Vec<String>,
}

pub(crate) struct FenceDevice {
    pub(crate) name: String,
    pub(crate) password: Secret,
}

impl Vm {
    pub(crate) fn new(spec: VmSpec) -> Vm {
        Vm {
            spec,
            state: VmState::ShutOff,
            reason: Some("defined".into()),
            run: None,
            freeze: None,
        }
    }

    /// Where the guest's writes go now: the first disk, or its overlay
    /// while frozen.
    fn write_target(spec: &VmSpec, freeze: &Option<Freeze>) -> Option<PathBuf> {
        let first = spec.disks.first()?;
        if let Some(f) = freeze {
            if let Some((_, ov)) = f.overlays.iter().find(|(b, _)| b == &first.path) {
                return Some(ov.clone());
            }
        }
        Some(first.path.clone())
    }

    /// Applies the guest's writes and power-off up to time `t`.
    fn settle(&mut self, node: &NodeId, t: u64, images: &mut Images, cfg: &SimConfig) {
        let Vm {
            spec,
            run,
            freeze,
            state,
            reason,
        } = self;
        let Some(r) = run else { return };
        let boot_done = r.started + ms(cfg.guest_boot);
        let end = r.off_at.map_or(t, |o| o.min(t));
        let due = if end < boot_done {
            0
        } else {
            match r.guest.mode {
                GuestMode::Loop => 1 + (end - boot_done) / r.guest.interval_ms,
                GuestMode::Once | GuestMode::Idle => 1,
            }
        };
        if due > r.writes {
            if let Some(path) = Vm::write_target(spec, freeze) {
                if let Some(img) = images.get_mut(&(node.clone(), path)) {
                    let n = read_counter(img) + (due - r.writes);
                    write_counter(img, n);
                }
            }
            r.writes = due;
        }
        if r.off_at.is_some_and(|o| o <= t) {
            *state = VmState::ShutOff;
            *reason = Some(r.off_reason.into());
            *run = None;
        }
    }

    /// Ends a freeze: each overlay becomes the image again.
    pub(crate) fn merge_overlays(&mut self, node: &NodeId, images: &mut Images) {
        if let Some(f) = self.freeze.take() {
            for (base, ov) in f.overlays {
                if let Some(bytes) = images.remove(&(node.clone(), ov)) {
                    images.insert((node.clone(), base), bytes);
                }
            }
        }
    }

    /// The host lost power: the VM is off. A freeze in progress is folded
    /// back (the sim keeps every write the guest made).
    fn power_loss(&mut self, node: &NodeId, images: &mut Images) {
        if self.state.is_live() || self.state == VmState::Crashed {
            self.state = VmState::ShutOff;
            self.reason = Some("host powered off".into());
        }
        self.run = None;
        self.merge_overlays(node, images);
    }
}

impl State {
    /// Brings the world up to time `now`: guest writes, guest power-offs,
    /// pending host power-offs.
    fn settle(&mut self, now: u64, cfg: &SimConfig) {
        let State { hosts, images, .. } = self;
        for (node, host) in hosts.iter_mut() {
            if host.power != PowerState::On {
                continue;
            }
            let off = host.off_at.filter(|&t| t <= now);
            let cut = off.unwrap_or(now);
            for vm in host.vms.values_mut() {
                vm.settle(node, cut, images, cfg);
            }
            if off.is_some() {
                host.power = PowerState::Off;
                host.off_at = None;
                for vm in host.vms.values_mut() {
                    vm.power_loss(node, images);
                }
            }
        }
    }

    /// What `node`'s fence device reads, lies included.
    pub(crate) fn device_reading(&self, node: &NodeId) -> PowerState {
        if self.faults.contains(&Fault::FenceLies(node.clone())) {
            return PowerState::Off;
        }
        self.hosts
            .get(node)
            .map_or(PowerState::Unknown, |h| h.power)
    }
}

struct Shared {
    clock: Arc<dyn Clock>,
    config: SimConfig,
    state: Mutex<State>,
}

/// The simulated world. Cheap to clone: clones share it. See the module docs.
#[derive(Clone)]
pub struct SimWorld {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for SimWorld {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimWorld")
            .field("clock", &self.shared.clock)
            .field("now", &self.now())
            .finish_non_exhaustive()
    }
}

impl Default for SimWorld {
    fn default() -> Self {
        SimWorld::new()
    }
}

impl SimWorld {
    /// An empty world on tokio's clock (make it inside the runtime), with
    /// default timings.
    pub fn new() -> Self {
        SimWorld::with_config(SimConfig::default())
    }

    /// An empty world on tokio's clock (make it inside the runtime), with
    /// `config`.
    pub fn with_config(config: SimConfig) -> Self {
        SimWorld::with_clock(Arc::new(TokioClock::default()), config)
    }

    /// An empty world on `clock` with `config`.
    pub fn with_clock(clock: Arc<dyn Clock>, config: SimConfig) -> Self {
        SimWorld {
            shared: Arc::new(Shared {
                clock,
                config,
                state: Mutex::new(State::default()),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.shared.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` on the state brought up to now.
    pub(crate) fn with<R>(&self, f: impl FnOnce(&mut State, u64) -> R) -> R {
        let mut st = self.lock();
        let now = self.shared.clock.now().0;
        st.settle(now, &self.shared.config);
        f(&mut st, now)
    }

    /// The world's timings.
    pub fn config(&self) -> &SimConfig {
        &self.shared.config
    }

    /// The world's clock.
    pub fn clock(&self) -> Arc<dyn Clock> {
        self.shared.clock.clone()
    }

    /// Now, by the world's clock.
    pub fn now(&self) -> UnixMillis {
        self.shared.clock.now()
    }

    /// Sleeps `d` of world time.
    pub async fn sleep(&self, d: Duration) {
        if !d.is_zero() {
            self.shared.clock.sleep(d).await;
        }
    }

    /// A digest of the whole world's state (time, hosts, VMs, images,
    /// replicas, faults): two runs of one seed must agree on it step by
    /// step.
    pub fn state_digest(&self) -> String {
        self.with(|st, now| {
            let mut h = Sha256::new();
            let mut put = |s: String| {
                h.update((s.len() as u64).to_le_bytes());
                h.update(s.as_bytes());
            };
            put(format!("now {now}"));
            for (n, host) in &st.hosts {
                put(format!("host {n} {:?} {:?}", host.power, host.off_at));
                for (name, vm) in &host.vms {
                    let run = vm.run.as_ref().map(|r| (r.started, r.writes, r.off_at));
                    let freeze = vm.freeze.as_ref().map(|f| &f.overlays);
                    put(format!(
                        "vm {name} {:?} {:?} {run:?} {freeze:?} {:?}",
                        vm.state, vm.reason, vm.spec
                    ));
                }
            }
            for ((n, p), bytes) in &st.images {
                put(format!("image {n} {} {}", p.display(), digest(bytes)));
            }
            for f in &st.faults {
                put(format!("fault {f:?}"));
            }
            for (pair, r) in &st.replicas {
                put(format!(
                    "replica {pair} {} -> {} {} stopped={} progress={:?} copies={:?}",
                    r.source,
                    r.target,
                    r.highest,
                    r.stopped,
                    r.progress,
                    r.test_copies.keys().collect::<Vec<_>>()
                ));
                for (n, store) in &r.stores {
                    for g in store.values() {
                        put(format!("gen {pair} {n} {:?} {:?}", g.info, g.checksums));
                    }
                }
            }
            hex::encode(h.finalize())
        })
    }

    // ---- hosts

    /// Adds a host, powered on, with no VMs (no-op if it exists).
    pub fn add_host(&self, node: &NodeId) {
        self.with(|st, _| {
            st.hosts.entry(node.clone()).or_insert_with(|| Host {
                power: PowerState::On,
                off_at: None,
                vms: BTreeMap::new(),
            });
        });
    }

    /// The hosts, in name order.
    pub fn hosts(&self) -> Vec<NodeId> {
        self.with(|st, _| st.hosts.keys().cloned().collect())
    }

    /// A host's true power (not what a fence device says); `None` if there
    /// is no such host.
    pub fn host_power(&self, node: &NodeId) -> Option<PowerState> {
        self.with(|st, _| st.hosts.get(node).map(|h| h.power))
    }

    /// Cuts a host's power now (a crash, or a pulled plug): its VMs stop.
    pub fn power_off(&self, node: &NodeId) {
        self.with(|st, now| {
            if let Some(h) = st.hosts.get_mut(node) {
                if h.power == PowerState::On {
                    h.off_at = Some(now);
                }
            }
            st.settle(now, &self.shared.config);
        });
    }

    /// Powers a host off `after` from now (a fence device's command taking
    /// effect), unless an earlier power-off is pending.
    pub fn request_power_off(&self, node: &NodeId, after: Duration) {
        self.with(|st, now| {
            if let Some(h) = st.hosts.get_mut(node) {
                if h.power == PowerState::On {
                    let t = now + ms(after);
                    h.off_at = Some(h.off_at.map_or(t, |o| o.min(t)));
                }
            }
            st.settle(now, &self.shared.config);
        });
    }

    /// Powers a host on (its VMs stay shut off) and cancels a pending
    /// power-off.
    pub fn power_on(&self, node: &NodeId) {
        self.with(|st, _| {
            if let Some(h) = st.hosts.get_mut(node) {
                h.power = PowerState::On;
                h.off_at = None;
            }
        });
    }

    // ---- faults

    /// Switches a fault on.
    pub fn set_fault(&self, fault: Fault) {
        self.with(|st, _| st.faults.insert(fault));
    }

    /// Switches a fault off.
    pub fn clear_fault(&self, fault: &Fault) {
        self.with(|st, _| st.faults.remove(fault));
    }

    /// Switches every fault off.
    pub fn clear_faults(&self) {
        self.with(|st, _| st.faults.clear());
    }

    /// Whether a fault is on.
    pub fn has_fault(&self, fault: &Fault) -> bool {
        self.with(|st, _| st.faults.contains(fault))
    }

    /// The faults that are on, in order.
    pub fn faults(&self) -> Vec<Fault> {
        self.with(|st, _| st.faults.iter().cloned().collect())
    }

    // ---- images

    /// Writes a disk image on a host (creating it).
    pub fn write_image(&self, node: &NodeId, path: &Path, bytes: Vec<u8>) {
        self.with(|st, _| st.images.insert((node.clone(), path.to_path_buf()), bytes));
    }

    /// A disk image's content, brought up to now (the guest's writes).
    pub fn image(&self, node: &NodeId, path: &Path) -> Option<Vec<u8>> {
        self.with(|st, _| st.images.get(&(node.clone(), path.to_path_buf())).cloned())
    }

    /// Removes a disk image; whether it existed.
    pub fn remove_image(&self, node: &NodeId, path: &Path) -> bool {
        self.with(|st, _| {
            st.images
                .remove(&(node.clone(), path.to_path_buf()))
                .is_some()
        })
    }

    /// [`digest`] of a disk image.
    pub fn image_digest(&self, node: &NodeId, path: &Path) -> Option<String> {
        self.image(node, path).map(|b| digest(&b))
    }

    /// The nodes holding an image at `path`, in name order.
    pub fn image_nodes(&self, path: &Path) -> Vec<NodeId> {
        self.with(|st, _| {
            st.images
                .keys()
                .filter(|(_, p)| p == path)
                .map(|(n, _)| n.clone())
                .collect()
        })
    }

    /// The test guest's counter in an image (see [`read_counter`]).
    pub fn guest_counter(&self, node: &NodeId, path: &Path) -> Option<u64> {
        self.image(node, path).map(|b| read_counter(&b))
    }

    // ---- VMs

    /// A VM's true state on a host (`Missing` if the host or VM is unknown),
    /// whether the host's hypervisor answers or not.
    pub fn vm_state(&self, node: &NodeId, vm: &VmName) -> VmState {
        self.with(|st, _| {
            st.hosts
                .get(node)
                .and_then(|h| h.vms.get(vm))
                .map_or(VmState::Missing, |v| v.state)
        })
    }

    /// The nodes where a copy of `vm` is live (safety invariant 1 wants at
    /// most one).
    pub fn live_copies(&self, vm: &VmName) -> Vec<NodeId> {
        self.with(|st, _| {
            st.hosts
                .iter()
                .filter(|(_, h)| h.vms.get(vm).is_some_and(|v| v.state.is_live()))
                .map(|(n, _)| n.clone())
                .collect()
        })
    }

    /// Crashes a running VM (its guest stops writing; state `Crashed`).
    /// Whether it was live.
    pub fn crash_vm(&self, node: &NodeId, vm: &VmName) -> bool {
        self.with(|st, _| {
            let Some(v) = st.hosts.get_mut(node).and_then(|h| h.vms.get_mut(vm)) else {
                return false;
            };
            if !v.state.is_live() {
                return false;
            }
            v.state = VmState::Crashed;
            v.reason = Some("guest crashed".into());
            v.run = None;
            true
        })
    }

    // ---- replicas

    /// `(source, target)` of a pair's replication, if a replicator was made.
    pub fn replica_direction(&self, pair: &PairId) -> Option<(NodeId, NodeId)> {
        self.with(|st, _| {
            st.replicas
                .get(pair)
                .map(|r| (r.source.clone(), r.target.clone()))
        })
    }

    /// The complete generations of `pair` held on `node`, oldest first.
    pub fn replica_generations(&self, pair: &PairId, node: &NodeId) -> Vec<GenerationInfo> {
        self.with(|st, _| {
            st.replicas
                .get(pair)
                .and_then(|r| r.stores.get(node))
                .map(|s| s.values().map(|g| g.info).collect())
                .unwrap_or_default()
        })
    }

    /// The largest generation `pair` ever made.
    pub fn highest_generation(&self, pair: &PairId) -> Option<Generation> {
        self.with(|st, _| st.replicas.get(pair).map(|r| r.highest))
    }

    /// Bit rot: flips a byte of the first disk of generation `g` of `pair`
    /// wherever it is held. Whether it found one.
    pub fn corrupt_generation(&self, pair: &PairId, g: Generation) -> bool {
        self.with(|st, _| {
            let State {
                replicas, images, ..
            } = st;
            let Some(r) = replicas.get(pair) else {
                return false;
            };
            let mut hit = false;
            for (node, store) in &r.stores {
                if let Some(d) = store.get(&g).and_then(|s| s.disks.first()) {
                    if let Some(img) = images.get_mut(&(node.clone(), d.path.clone())) {
                        flip(img);
                        hit = true;
                    }
                }
            }
            hit
        })
    }

    // ---- fence devices

    /// Gives `node` an out-of-band fence device named `name` that accepts
    /// `password`.
    pub fn add_fence_device(&self, node: &NodeId, name: &str, password: Secret) {
        self.with(|st, _| {
            st.fence_devices.insert(
                node.clone(),
                FenceDevice {
                    name: name.to_string(),
                    password,
                },
            )
        });
    }
}

/// Flips the bits of an image's first byte (or makes it one byte long).
pub(crate) fn flip(img: &mut Vec<u8>) {
    match img.first_mut() {
        Some(b) => *b ^= 0xff,
        None => img.push(0xff),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::sim::ManualClock;

    fn node(s: &str) -> NodeId {
        NodeId::new(s).unwrap()
    }

    fn world() -> (SimWorld, ManualClock) {
        let clock = ManualClock::new(UnixMillis(0));
        (
            SimWorld::with_clock(Arc::new(clock.clone()), SimConfig::default()),
            clock,
        )
    }

    /// A one-disk spec (`vda` at `/img/<name>.img`, no image made) booting
    /// the test guest with `cmdline`.
    pub(crate) fn spec(name: &str, cmdline: &str) -> VmSpec {
        VmSpec {
            name: VmName::new(name).unwrap(),
            vcpus: 1,
            memory_mib: 64,
            firmware: Default::default(),
            disks: vec![DiskSpec {
                target: "vda".into(),
                path: format!("/img/{name}.img").into(),
                format: Default::default(),
                bus: Default::default(),
                read_only: false,
            }],
            nics: vec![],
            boot: wspare_core::Boot::Kernel {
                kernel: "/k".into(),
                initrd: None,
                cmdline: cmdline.into(),
            },
        }
    }

    #[test]
    fn counter_sector_round_trips() {
        let mut img = fresh_guest_disk();
        assert_eq!(img.len(), SECTOR);
        assert_eq!(read_counter(&img), 0);
        write_counter(&mut img, 41);
        assert_eq!(read_counter(&img), 41);
        assert!(img.starts_with(b"WSPARE 41\n\0"));
        assert_eq!(read_counter(&[0u8; 8]), 0);
        assert_ne!(
            digest_all([&b"ab"[..], b"c"]),
            digest_all([&b"a"[..], b"bc"])
        );
    }

    #[test]
    fn guest_parses_the_test_guest_cmdline() {
        let g = Guest::of(&spec(
            "a",
            "console=ttyS0 acpi=off wspare.mode=loop wspare.interval_ms=50",
        ));
        assert_eq!(
            g,
            Guest {
                mode: GuestMode::Loop,
                interval_ms: 50,
                acpi: false
            }
        );
        assert_eq!(Guest::of(&spec("a", "quiet")).mode, GuestMode::Once);
    }

    #[test]
    fn a_running_loop_guest_writes_by_the_clock_and_stops_at_power_loss() {
        let (w, clock) = world();
        let a = node("a");
        w.add_host(&a);
        let s = spec("web", "wspare.mode=loop wspare.interval_ms=100");
        w.write_image(&a, &s.disks[0].path, fresh_guest_disk());
        w.with(|st, now| {
            let h = st.hosts.get_mut(&a).unwrap();
            let mut vm = Vm::new(s.clone());
            vm.state = VmState::Running;
            vm.run = Some(Run {
                started: now,
                guest: Guest::of(&s),
                writes: 0,
                off_at: None,
                off_reason: "",
            });
            h.vms.insert(s.name.clone(), vm);
        });
        let path = s.disks[0].path.clone();
        clock.advance(Duration::from_millis(199));
        assert_eq!(w.guest_counter(&a, &path), Some(0), "still booting");
        clock.advance(Duration::from_millis(1));
        assert_eq!(w.guest_counter(&a, &path), Some(1), "first write at boot");
        clock.advance(Duration::from_millis(1000));
        assert_eq!(w.guest_counter(&a, &path), Some(11));
        w.request_power_off(&a, Duration::from_millis(250));
        clock.advance(Duration::from_millis(10_000));
        assert_eq!(w.host_power(&a), Some(PowerState::Off));
        assert_eq!(
            w.guest_counter(&a, &path),
            Some(13),
            "writes stop when the power goes"
        );
        assert_eq!(w.vm_state(&a, &s.name), VmState::ShutOff);
        assert!(w.live_copies(&s.name).is_empty());
        w.power_on(&a);
        assert_eq!(w.vm_state(&a, &s.name), VmState::ShutOff);
    }

    #[test]
    fn faults_switch_on_and_off() {
        let (w, _) = world();
        let f = Fault::FenceLies(node("a"));
        assert!(!w.has_fault(&f));
        w.set_fault(f.clone());
        assert_eq!(w.faults(), vec![f.clone()]);
        w.clear_fault(&f);
        assert!(w.faults().is_empty());
    }
}
