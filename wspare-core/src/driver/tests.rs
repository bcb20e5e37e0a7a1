//! Driver tests over small fakes that log every backend call.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use async_trait::async_trait;

use super::*;
use crate::fencer::{FenceScope, Fencer, FencerCaps};
use crate::generation::{Generation, GenerationInfo};
use crate::hypervisor::{
    Consistency, FrozenDisk, FrozenDisks, Hypervisor, HypervisorCaps, VmStatus,
};
use crate::journal::Journal;
use crate::machine::model::{cfg, n, vm};
use crate::machine::{Op, PairConfig, PhaseName, Policy};
use crate::receipt::{FenceReceipt, PowerState};
use crate::replicator::{Promoted, ReplicaStatus, Replicator, ReplicatorCaps, SourceView};
use crate::spec::{Boot, DiskFormat, DiskSpec, VmSpec};
use crate::time::UnixMillis;
use crate::Result;

#[derive(Default)]
struct World {
    vms: Mutex<BTreeMap<NodeId, VmState>>,
    power: Mutex<BTreeMap<NodeId, PowerState>>,
    calls: Mutex<Vec<String>>,
    newest: Mutex<u64>,
    hang_fence: AtomicBool,
    fail_sync: AtomicBool,
    slow_sync: AtomicBool,
    panic_promote: AtomicBool,
}

impl World {
    fn log(&self, s: impl Into<String>) {
        self.calls.lock().unwrap().push(s.into());
    }
    fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
    }
    fn up(&self, node: &NodeId) -> bool {
        self.power
            .lock()
            .unwrap()
            .get(node)
            .copied()
            .unwrap_or(PowerState::On)
            == PowerState::On
    }
}

fn disk(path: &str) -> DiskSpec {
    DiskSpec {
        target: "vda".into(),
        path: path.into(),
        format: DiskFormat::Raw,
        bus: Default::default(),
        read_only: false,
    }
}

struct Hv {
    node: NodeId,
    w: Arc<World>,
}

#[async_trait]
impl Hypervisor for Hv {
    fn describe(&self) -> String {
        format!("fake {}", self.node)
    }
    fn capabilities(&self) -> HypervisorCaps {
        HypervisorCaps {
            freeze: Some(Consistency::CrashConsistent),
            ..Default::default()
        }
    }
    async fn status(&self, _: &VmName) -> Result<VmStatus> {
        if !self.w.up(&self.node) {
            return Err(Error::new(
                ErrorKind::Unreachable,
                format!("{} is down", self.node),
            ));
        }
        Ok(VmStatus::new(
            self.w
                .vms
                .lock()
                .unwrap()
                .get(&self.node)
                .copied()
                .unwrap_or(VmState::ShutOff),
        ))
    }
    async fn list(&self) -> Result<Vec<VmName>> {
        Ok(vec![])
    }
    async fn define(&self, spec: &VmSpec) -> Result<()> {
        self.w.log(format!(
            "define {} on {} with {}",
            spec.name,
            self.node,
            spec.disks[0].path.display()
        ));
        Ok(())
    }
    async fn spec(&self, _: &VmName) -> Result<VmSpec> {
        Ok(spec())
    }
    async fn undefine(&self, _: &VmName) -> Result<()> {
        Ok(())
    }
    async fn start(&self, vm: &VmName) -> Result<()> {
        self.w.log(format!("start {vm} on {}", self.node));
        self.w
            .vms
            .lock()
            .unwrap()
            .insert(self.node.clone(), VmState::Running);
        Ok(())
    }
    async fn shutdown(&self, vm: &VmName, _: Duration) -> Result<()> {
        self.destroy(vm).await
    }
    async fn destroy(&self, vm: &VmName) -> Result<()> {
        self.w.log(format!("destroy {vm} on {}", self.node));
        self.w
            .vms
            .lock()
            .unwrap()
            .insert(self.node.clone(), VmState::ShutOff);
        Ok(())
    }
    async fn attach_disk(&self, _: &VmName, _: &DiskSpec) -> Result<()> {
        Err(Error::unsupported("no"))
    }
    async fn detach_disk(&self, _: &VmName, _: &str) -> Result<()> {
        Err(Error::unsupported("no"))
    }
    async fn freeze_disks(&self, vm: &VmName) -> Result<FrozenDisks> {
        self.w.log(format!("freeze {vm} on {}", self.node));
        Ok(FrozenDisks {
            vm: vm.clone(),
            at: UnixMillis(1000),
            consistency: Consistency::CrashConsistent,
            disks: vec![FrozenDisk {
                target: "vda".into(),
                path: "/a/vda".into(),
                format: DiskFormat::Raw,
                overlay: None,
            }],
        })
    }
    async fn release_disks(&self, f: &FrozenDisks) -> Result<()> {
        self.w.log(format!("release {} on {}", f.vm, self.node));
        Ok(())
    }
}

struct Rep {
    w: Arc<World>,
}

#[async_trait]
impl Replicator for Rep {
    fn describe(&self) -> String {
        "fake replicator".into()
    }
    fn capabilities(&self) -> ReplicatorCaps {
        ReplicatorCaps {
            synchronous: false,
            consistency: Consistency::CrashConsistent,
            needs_source_view: true,
            reversible: true,
            recovery_points: 2,
            verify: true,
            test_copies: true,
        }
    }
    async fn initial_sync(&self, v: &SourceView) -> Result<GenerationInfo> {
        self.sync(v).await
    }
    async fn sync(&self, v: &SourceView) -> Result<GenerationInfo> {
        let kind = match v {
            SourceView::Frozen(_) => "frozen",
            SourceView::Stopped { .. } => "stopped",
            SourceView::Continuous => "continuous",
        };
        self.w.log(format!("sync from {kind}"));
        if self.w.slow_sync.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_secs(5)).await;
            self.w.log("sync done");
        }
        if self.w.fail_sync.load(Ordering::SeqCst) {
            return Err(Error::new(
                ErrorKind::Backend,
                "rsync: No space left on device",
            ));
        }
        let mut g = self.w.newest.lock().unwrap();
        *g += 1;
        Ok(GenerationInfo {
            generation: Generation(*g),
            source_time: UnixMillis::now(),
        })
    }
    async fn status(&self) -> Result<ReplicaStatus> {
        let g = *self.w.newest.lock().unwrap();
        let info = (g > 0).then_some(GenerationInfo {
            generation: Generation(g),
            source_time: UnixMillis::now(),
        });
        Ok(ReplicaStatus {
            source: n("a"),
            target: n("b"),
            newest: info,
            generations: info.into_iter().collect(),
            in_sync: false,
            progress: None,
        })
    }
    async fn promote(&self, g: Generation) -> Result<Promoted> {
        self.w.log(format!("promote {g}"));
        if self.w.panic_promote.swap(false, Ordering::SeqCst) {
            panic!("promote exploded");
        }
        Ok(Promoted {
            generation: GenerationInfo {
                generation: g,
                source_time: UnixMillis::now(),
            },
            disks: vec![disk(&format!("/spare/{g}/vda"))],
        })
    }
    async fn reverse(&self) -> Result<()> {
        self.w.log("reverse");
        Ok(())
    }
    async fn verify(&self, _: Generation, _: &SourceView) -> Result<()> {
        Ok(())
    }
    async fn stop(&self) -> Result<()> {
        Ok(())
    }
    async fn test_copy(&self, _: Generation, _: &str) -> Result<Vec<DiskSpec>> {
        Ok(vec![])
    }
    async fn discard_test_copy(&self, _: &str) -> Result<()> {
        Ok(())
    }
}

struct Fen {
    w: Arc<World>,
}

#[async_trait]
impl Fencer for Fen {
    fn describe(&self) -> String {
        "fake-bmc".into()
    }
    fn capabilities(&self) -> FencerCaps {
        FencerCaps {
            scope: FenceScope::Host,
            unfence: true,
        }
    }
    async fn fence(&self, node: &NodeId) -> Result<FenceReceipt> {
        self.w.log(format!("fence {node}"));
        if self.w.hang_fence.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        self.w
            .power
            .lock()
            .unwrap()
            .insert(node.clone(), PowerState::Off);
        Ok(FenceReceipt::from_power_reading(
            node.clone(),
            "fake-bmc",
            PowerState::Off,
            UnixMillis(2000),
        )
        .unwrap())
    }
    async fn power_status(&self, node: &NodeId) -> Result<PowerState> {
        self.w.log(format!("power status {node}"));
        Ok(if self.w.up(node) {
            PowerState::On
        } else {
            PowerState::Off
        })
    }
    async fn unfence(&self, _: &NodeId) -> Result<()> {
        Ok(())
    }
}

fn spec() -> VmSpec {
    VmSpec {
        name: vm(),
        vcpus: 1,
        memory_mib: 64,
        firmware: Default::default(),
        disks: vec![disk("/a/vda")],
        nics: vec![],
        boot: Boot::Disk,
    }
}

fn setup(local: &str, w: &Arc<World>) -> (Vec<PairConfig>, BTreeMap<PairId, Arc<Executor>>) {
    let policy = Policy {
        sync_interval: Duration::from_secs(30),
        monitor_interval: Duration::from_secs(5),
        ..Policy::default()
    };
    let cfg = cfg(local, policy);
    let mut hvs: BTreeMap<NodeId, Arc<dyn Hypervisor>> = BTreeMap::new();
    for node in ["a", "b"] {
        hvs.insert(
            n(node),
            Arc::new(Hv {
                node: n(node),
                w: w.clone(),
            }),
        );
    }
    let peer = if local == "a" { "b" } else { "a" };
    let mut fencers: BTreeMap<NodeId, Arc<dyn Fencer>> = BTreeMap::new();
    fencers.insert(n(peer), Arc::new(Fen { w: w.clone() }));
    let backends = Arc::new(PairBackends {
        spec: spec(),
        hypervisors: hvs,
        replicator: Arc::new(Rep { w: w.clone() }),
        fencers,
    });
    let ex = Executor::new(
        cfg.pair.clone(),
        n(local),
        backends,
        Deadlines::default(),
        Arc::new(SystemClock),
        Arc::new(FenceGate::default()),
    );
    (
        vec![cfg],
        BTreeMap::from([(PairId::new("web").unwrap(), Arc::new(ex))]),
    )
}

async fn wait_for(h: &DriverHandle, phase: PhaseName) {
    let mut rx = h.status();
    let pair = PairId::new("web").unwrap();
    tokio::time::timeout(
        Duration::from_secs(600),
        rx.wait_for(|s| s.get(&pair).is_some_and(|p| p.phase == phase)),
    )
    .await
    .unwrap_or_else(|_| {
        panic!(
            "never reached {phase}: {:?}",
            h.status().borrow().get(&pair)
        )
    })
    .unwrap();
}

#[tokio::test(start_paused = true)]
async fn the_spare_fails_over_through_the_backends() {
    let w = Arc::new(World::default());
    *w.newest.lock().unwrap() = 4;
    w.vms.lock().unwrap().insert(n("a"), VmState::Running);
    let (cfgs, ex) = setup("b", &w);
    let (h, task) =
        Driver::start(n("b"), cfgs, crate::journal::MemoryStore::default(), ex).unwrap();
    let mut events = h.events();
    // a sends a few heartbeats, then its host dies.
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        h.heartbeat(n("a"), vec![]).await.unwrap();
    }
    wait_for(&h, PhaseName::Protected).await;
    w.power.lock().unwrap().insert(n("a"), PowerState::Off);
    wait_for(&h, PhaseName::Unprotected).await;
    assert_eq!(
        w.calls(),
        [
            "fence a",
            "promote g4",
            "define web on b with /spare/g4/vda",
            "start web on b"
        ],
        "nothing else touched a backend"
    );
    let mut causes = Vec::new();
    while let Ok(e) = events.try_recv() {
        causes.push(e.to_string());
    }
    assert!(
        causes
            .iter()
            .any(|c| c.contains("starting -> unprotected: VM started on b from g4")),
        "{causes:#?}"
    );
    h.shutdown(Duration::from_secs(1)).await.unwrap();
    task.await.unwrap().unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_crash_with_the_fence_in_flight_resumes_from_the_journal_without_fencing_blindly() {
    let dir = tempfile::tempdir().unwrap();
    let journal = dir.path().join("journal");
    let w = Arc::new(World::default());
    *w.newest.lock().unwrap() = 4;
    w.power.lock().unwrap().insert(n("a"), PowerState::Off);
    w.hang_fence.store(true, Ordering::SeqCst);
    let (cfgs, ex) = setup("b", &w);
    let (store, _) = Journal::open(&journal, 1 << 20).unwrap();
    let (h, task) = Driver::start(n("b"), cfgs.clone(), store, ex).unwrap();
    wait_for(&h, PhaseName::Fencing).await;
    while !w.calls().contains(&"fence a".to_string()) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The driver dies with the fence in flight.
    task.abort();
    let _ = task.await;
    w.hang_fence.store(false, Ordering::SeqCst);
    w.calls.lock().unwrap().clear();
    let (cfgs2, ex2) = setup("b", &w);
    let (store, loaded) = Journal::open(&journal, 1 << 20).unwrap();
    assert_eq!(
        loaded.snapshots.values().next().unwrap().phase.name(),
        PhaseName::Fencing
    );
    let (h, task) = Driver::start(n("b"), cfgs2, store, ex2).unwrap();
    wait_for(&h, PhaseName::Unprotected).await;
    assert_eq!(
        w.calls(),
        [
            "power status a",
            "promote g4",
            "define web on b with /spare/g4/vda",
            "start web on b"
        ],
        "observed the power state instead of fencing again"
    );
    drop(cfgs);
    h.shutdown(Duration::from_secs(1)).await.unwrap();
    task.await.unwrap().unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_failed_sync_still_releases_the_freeze() {
    let w = Arc::new(World::default());
    w.vms.lock().unwrap().insert(n("a"), VmState::Running);
    w.fail_sync.store(true, Ordering::SeqCst);
    let (cfgs, ex) = setup("a", &w);
    let (h, task) =
        Driver::start(n("a"), cfgs, crate::journal::MemoryStore::default(), ex).unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    h.heartbeat(n("b"), vec![]).await.unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        w.calls()[..3],
        ["freeze web on a", "sync from frozen", "release web on a"]
    );
    h.shutdown(Duration::from_secs(1)).await.unwrap();
    task.await.unwrap().unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_graceful_stop_waits_for_the_release_of_a_sync_freeze() {
    // Found by the end-to-end test: a switchover stopped the VM while a
    // periodic cycle held its disks frozen; the release failed on the
    // stopped VM and the final sync copied the base image without the
    // writes left in the overlay.
    let w = Arc::new(World::default());
    w.vms.lock().unwrap().insert(n("a"), VmState::Running);
    w.slow_sync.store(true, Ordering::SeqCst);
    let (_, ex) = setup("a", &w);
    let ex = ex.values().next().unwrap().clone();
    let sync = tokio::spawn({
        let ex = ex.clone();
        async move {
            ex.run(&Op::Sync {
                source: n("a"),
                target: n("b"),
            })
            .await
        }
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    let stop = ex
        .run(&Op::StopVm {
            node: n("a"),
            timeout: Duration::from_secs(30),
        })
        .await;
    assert!(
        matches!(stop, Outcome::Ok(crate::machine::Answer::Stopped(_))),
        "{stop:?}"
    );
    assert!(matches!(sync.await.unwrap(), Outcome::Ok(_)));
    assert_eq!(
        w.calls(),
        [
            "freeze web on a",
            "sync from frozen",
            "sync done",
            "release web on a",
            "destroy web on a"
        ]
    );
}

#[tokio::test]
async fn the_executor_refuses_a_start_without_proof_for_the_other_copy() {
    let w = Arc::new(World::default());
    let (_, ex) = setup("b", &w);
    let ex = ex.values().next().unwrap().clone();
    let own =
        FenceReceipt::from_power_reading(n("b"), "x", PowerState::Off, UnixMillis(1)).unwrap();
    let out = ex
        .run(&Op::StartVm {
            node: n("b"),
            receipt: own,
            generation: None,
        })
        .await;
    let Outcome::Failed(f) = out else {
        panic!("{out:?}")
    };
    assert_eq!(f.kind, ErrorKind::InvalidInput);
    assert!(f.message.contains("does not prove a off"), "{}", f.message);
    assert!(w.calls().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_panicking_backend_makes_the_outcome_unknown_and_it_is_observed() {
    let w = Arc::new(World::default());
    *w.newest.lock().unwrap() = 4;
    w.power.lock().unwrap().insert(n("a"), PowerState::Off);
    w.panic_promote.store(true, Ordering::SeqCst);
    let (cfgs, ex) = setup("b", &w);
    let (h, task) =
        Driver::start(n("b"), cfgs, crate::journal::MemoryStore::default(), ex).unwrap();
    wait_for(&h, PhaseName::Unprotected).await;
    let calls = w.calls();
    assert_eq!(
        calls,
        [
            "fence a",
            "promote g4",
            "promote g4",
            "define web on b with /spare/g4/vda",
            "start web on b"
        ]
    );
    h.shutdown(Duration::from_secs(1)).await.unwrap();
    task.await.unwrap().unwrap();
}

#[tokio::test(start_paused = true)]
async fn commands_get_their_answer_and_unknown_pairs_are_named() {
    let w = Arc::new(World::default());
    let (cfgs, ex) = setup("b", &w);
    let (h, task) =
        Driver::start(n("b"), cfgs, crate::journal::MemoryStore::default(), ex).unwrap();
    let r = h
        .command(PairId::new("web").unwrap(), Command::Switchover)
        .await
        .unwrap();
    assert_eq!(
        r.unwrap_err(),
        "switchover must be asked of the active node, a"
    );
    let r = h
        .command(PairId::new("nope").unwrap(), Command::Switchover)
        .await
        .unwrap();
    assert_eq!(r.unwrap_err(), "pair nope is not configured on b");
    assert_eq!(h.views_for(n("a")).await.unwrap().len(), 1);
    h.shutdown(Duration::from_secs(1)).await.unwrap();
    task.await.unwrap().unwrap();
    assert!(h
        .command(PairId::new("web").unwrap(), Command::EndTest)
        .await
        .is_err());
}

#[test]
fn a_pair_without_backends_is_refused() {
    let w = Arc::new(World::default());
    let (cfgs, _) = setup("b", &w);
    let e = Driver::start(
        n("b"),
        cfgs,
        crate::journal::MemoryStore::default(),
        BTreeMap::new(),
    )
    .err()
    .unwrap();
    assert_eq!(e.to_string(), "pair web has no backends (invalid-input)");
}
