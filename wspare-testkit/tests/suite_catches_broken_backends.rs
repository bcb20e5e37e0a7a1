//! The suite is not vacuous: deliberately broken backends (the sim backends
//! with one planted bug each) fail it, and the failing case's message names
//! the violated invariant and shows what the backend answered.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use wspare_core::{
    DiskSpec, Error, ErrorKind, FenceReceipt, Fencer, FencerCaps, FrozenDisks, Generation,
    GenerationInfo, Hypervisor, HypervisorCaps, NodeId, PairId, PowerState, Promoted,
    ReplicaStatus, Replicator, ReplicatorCaps, Result, SourceView, VmName, VmSpec, VmState,
    VmStatus,
};
use wspare_testkit::sim::{
    Fault, SimFencerFixture, SimHypervisor, SimHypervisorFixture, SimReplicatorFixture, SimWorld,
    SIM_WRONG_PASSWORD,
};
use wspare_testkit::suite::{self, CaseOutcome, Report};

/// Asserts that exactly the cases `failed` (ids) failed, and that the
/// message of case `id` names its invariant and contains `answer` (what
/// the broken backend said).
fn assert_caught(report: &Report, failed: &[&str], id: &str, answer: &str) {
    println!("{report}");
    let ids: Vec<&str> = report
        .failed()
        .map(|c| c.name.split_whitespace().next().unwrap())
        .collect();
    assert_eq!(ids, failed, "the cases that failed");
    let case = report.case(id).unwrap();
    let CaseOutcome::Failed(msg) = &case.outcome else {
        unreachable!()
    };
    assert!(
        msg.starts_with(&format!("{}: ", case.name)),
        "the message names the invariant {:?}: {msg}",
        case.name
    );
    assert!(
        msg.contains(answer),
        "the message shows the backend's answer {answer:?}: {msg}"
    );
}

// ------------------------------------------------------------------ hypervisor

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum HvBug {
    /// `start` of a VM that is not defined answers Ok.
    StartOfMissingOk,
    /// `spec` reads the disks back in reverse order.
    SpecReordersDisks,
    /// `define` of an existing VM answers Ok but keeps the old definition.
    RedefineIgnored,
    /// `start` of a running VM fails.
    StartOfRunningFails,
    /// `destroy` of a stopped VM fails.
    DestroyOfStoppedFails,
    /// `shutdown` waits for the guest with no deadline.
    ShutdownIgnoresDeadline,
    /// `shutdown` gives up at twice its deadline.
    ShutdownOvershoots,
    /// `undefine` of a running VM destroys it and succeeds.
    UndefineRunning,
    /// `freeze_disks` returns the live disks, not frozen ones.
    FreezeDoesNotFreeze,
    /// `release_disks` throws away what the guest wrote during the freeze.
    ReleaseLosesWrites,
    /// `freeze_disks` refuses while a crashed caller's freeze is left behind.
    RefreezeRefused,
    /// `detach_disk` of a slot that is not attached answers Ok.
    DetachOfMissingSlotOk,
    /// `list` repeats the first VM.
    ListDuplicates,
    /// `destroy` stops every VM of the host.
    DestroyStopsAll,
}

struct BrokenHv {
    inner: Arc<dyn Hypervisor>,
    world: SimWorld,
    bug: HvBug,
}

fn node_a() -> NodeId {
    NodeId::new("node-a").unwrap()
}

#[async_trait]
impl Hypervisor for BrokenHv {
    fn describe(&self) -> String {
        format!("broken ({:?}) {}", self.bug, self.inner.describe())
    }

    fn capabilities(&self) -> HypervisorCaps {
        self.inner.capabilities()
    }

    async fn status(&self, vm: &VmName) -> Result<VmStatus> {
        self.inner.status(vm).await
    }

    async fn list(&self) -> Result<Vec<VmName>> {
        let mut l = self.inner.list().await?;
        if self.bug == HvBug::ListDuplicates {
            if let Some(first) = l.first().cloned() {
                l.push(first);
            }
        }
        Ok(l)
    }

    async fn define(&self, spec: &VmSpec) -> Result<()> {
        if self.bug == HvBug::RedefineIgnored && self.inner.spec(&spec.name).await.is_ok() {
            return Ok(());
        }
        self.inner.define(spec).await
    }

    async fn spec(&self, vm: &VmName) -> Result<VmSpec> {
        let mut s = self.inner.spec(vm).await?;
        if self.bug == HvBug::SpecReordersDisks {
            s.disks.reverse();
        }
        Ok(s)
    }

    async fn undefine(&self, vm: &VmName) -> Result<()> {
        if self.bug == HvBug::UndefineRunning {
            self.inner.destroy(vm).await?;
        }
        self.inner.undefine(vm).await
    }

    async fn start(&self, vm: &VmName) -> Result<()> {
        let state = self.inner.status(vm).await?.state;
        match (self.bug, state) {
            (HvBug::StartOfMissingOk, VmState::Missing) => Ok(()),
            (HvBug::StartOfRunningFails, VmState::Running) => Err(Error::new(
                ErrorKind::Conflict,
                format!("domain {vm} is already active"),
            )),
            _ => self.inner.start(vm).await,
        }
    }

    async fn shutdown(&self, vm: &VmName, timeout: Duration) -> Result<()> {
        match self.bug {
            HvBug::ShutdownIgnoresDeadline => loop {
                match self.inner.shutdown(vm, timeout).await {
                    Err(e) if e.kind() == ErrorKind::Timeout => continue,
                    r => return r,
                }
            },
            HvBug::ShutdownOvershoots => self.inner.shutdown(vm, timeout * 2).await,
            _ => self.inner.shutdown(vm, timeout).await,
        }
    }

    async fn destroy(&self, vm: &VmName) -> Result<()> {
        match self.bug {
            HvBug::DestroyOfStoppedFails
                if self.inner.status(vm).await?.state == VmState::ShutOff =>
            {
                Err(Error::new(
                    ErrorKind::Conflict,
                    format!("domain {vm} is not running"),
                ))
            }
            HvBug::DestroyStopsAll => {
                self.inner.spec(vm).await?;
                for other in self.inner.list().await? {
                    self.inner.destroy(&other).await?;
                }
                Ok(())
            }
            _ => self.inner.destroy(vm).await,
        }
    }

    async fn attach_disk(&self, vm: &VmName, disk: &DiskSpec) -> Result<()> {
        self.inner.attach_disk(vm, disk).await
    }

    async fn detach_disk(&self, vm: &VmName, target: &str) -> Result<()> {
        if self.bug == HvBug::DetachOfMissingSlotOk
            && self.inner.spec(vm).await?.disk(target).is_none()
        {
            return Ok(());
        }
        self.inner.detach_disk(vm, target).await
    }

    async fn freeze_disks(&self, vm: &VmName) -> Result<FrozenDisks> {
        if self.bug == HvBug::RefreezeRefused {
            let spec = self.inner.spec(vm).await?;
            let overlay = spec
                .disks
                .first()
                .map(|d| SimHypervisor::overlay_path(&d.path));
            if overlay.is_some_and(|p| self.world.image(&node_a(), &p).is_some()) {
                return Err(Error::new(
                    ErrorKind::Conflict,
                    format!("VM {vm}'s disks are already frozen"),
                ));
            }
        }
        let f = self.inner.freeze_disks(vm).await?;
        if self.bug == HvBug::FreezeDoesNotFreeze {
            self.inner.release_disks(&f).await?;
        }
        Ok(f)
    }

    async fn release_disks(&self, frozen: &FrozenDisks) -> Result<()> {
        match self.bug {
            HvBug::FreezeDoesNotFreeze => Ok(()),
            HvBug::ReleaseLosesWrites => {
                let n = node_a();
                let kept: Vec<_> = frozen
                    .disks
                    .iter()
                    .map(|d| (d.path.clone(), self.world.image(&n, &d.path)))
                    .collect();
                self.inner.release_disks(frozen).await?;
                for (p, bytes) in kept {
                    if let Some(b) = bytes {
                        self.world.write_image(&n, &p, b);
                    }
                }
                Ok(())
            }
            _ => self.inner.release_disks(frozen).await,
        }
    }
}

async fn run_broken_hypervisor(bug: HvBug) -> Report {
    let fixture = SimHypervisorFixture::new()
        .titled(format!("broken sim hypervisor ({bug:?})"))
        .wrap(move |inner, world| {
            Arc::new(BrokenHv {
                inner,
                world: world.clone(),
                bug,
            })
        });
    suite::hypervisor::run(&fixture).await
}

#[tokio::test(start_paused = true)]
async fn h1_catches_start_of_a_missing_vm_answering_ok() {
    let r = run_broken_hypervisor(HvBug::StartOfMissingOk).await;
    assert_caught(
        &r,
        &["H1"],
        "H1",
        "start(wspare-ct-h1) of a VM that is not defined returned Ok(())",
    );
}

#[tokio::test(start_paused = true)]
async fn h2_catches_a_spec_read_back_with_disks_reordered() {
    let r = run_broken_hypervisor(HvBug::SpecReordersDisks).await;
    assert_caught(
        &r,
        &["H2", "H3", "H11"],
        "H2",
        "spec(wspare-ct-h2) after define differs from the spec given: disks:",
    );
}

#[tokio::test(start_paused = true)]
async fn h3_catches_a_redefine_that_keeps_the_old_definition() {
    let r = run_broken_hypervisor(HvBug::RedefineIgnored).await;
    assert_caught(&r, &["H3"], "H3", "vcpus: expected 2, got 1");
}

#[tokio::test(start_paused = true)]
async fn h4_catches_start_of_a_running_vm_failing() {
    let r = run_broken_hypervisor(HvBug::StartOfRunningFails).await;
    assert_caught(&r, &["H4"], "H4",
        "start(wspare-ct-h4) of a running VM failed: domain wspare-ct-h4 is already active (conflict)",
    );
}

#[tokio::test(start_paused = true)]
async fn h5_catches_destroy_of_a_stopped_vm_failing() {
    let r = run_broken_hypervisor(HvBug::DestroyOfStoppedFails).await;
    assert_caught(
        &r,
        &["H5"],
        "H5",
        "domain wspare-ct-h5 is not running (conflict)",
    );
}

#[tokio::test(start_paused = true)]
async fn h6_catches_a_shutdown_without_deadline_by_the_case_timeout() {
    let r = run_broken_hypervisor(HvBug::ShutdownIgnoresDeadline).await;
    assert_caught(&r, &["H6"], "H6",
        "did not finish within 120s (a call hangs?); last step: shutdown(wspare-ct-h6-stubborn, 2s) of a guest \
         that ignores ACPI",
    );
}

#[tokio::test(start_paused = true)]
async fn h6_catches_a_shutdown_that_overshoots_its_deadline() {
    let r = run_broken_hypervisor(HvBug::ShutdownOvershoots).await;
    assert_caught(
        &r,
        &["H6"],
        "H6",
        "took 4.001s to time out, more than its deadline plus slack (2s + 100ms)",
    );
}

#[tokio::test(start_paused = true)]
async fn h7_catches_undefine_of_a_running_vm_succeeding() {
    let r = run_broken_hypervisor(HvBug::UndefineRunning).await;
    assert_caught(
        &r,
        &["H7"],
        "H7",
        "undefine(wspare-ct-h7) of a running VM returned Ok(()), expected a Conflict error",
    );
}

#[tokio::test(start_paused = true)]
async fn h8_catches_a_freeze_that_does_not_freeze() {
    let r = run_broken_hypervisor(HvBug::FreezeDoesNotFreeze).await;
    assert_caught(&r, &["H8"], "H8", "of vda changed during the freeze");
}

#[tokio::test(start_paused = true)]
async fn h8_catches_a_release_that_loses_the_guests_writes() {
    let r = run_broken_hypervisor(HvBug::ReleaseLosesWrites).await;
    assert_caught(
        &r,
        &["H8"],
        "H8",
        "the guest's writes during the freeze are lost",
    );
}

#[tokio::test(start_paused = true)]
async fn h8_catches_a_freeze_left_behind_that_blocks_every_later_one() {
    let r = run_broken_hypervisor(HvBug::RefreezeRefused).await;
    assert_caught(
        &r,
        &["H8"],
        "H8",
        "after a freeze left behind by a crashed caller failed: VM wspare-ct-h8's disks are already frozen",
    );
}

#[tokio::test(start_paused = true)]
async fn h9_catches_detach_of_a_missing_slot_answering_ok() {
    let r = run_broken_hypervisor(HvBug::DetachOfMissingSlotOk).await;
    assert_caught(
        &r,
        &["H9"],
        "H9",
        "detach_disk(wspare-ct-h9, vdc) of a slot that is no longer attached returned Ok(())",
    );
}

#[tokio::test(start_paused = true)]
async fn h10_catches_a_list_with_duplicates() {
    let r = run_broken_hypervisor(HvBug::ListDuplicates).await;
    assert_caught(&r, &["H10"], "H10", "returned duplicates");
}

#[tokio::test(start_paused = true)]
async fn h11_catches_calls_on_one_vm_hitting_the_others() {
    let r = run_broken_hypervisor(HvBug::DestroyStopsAll).await;
    assert_caught(&r, &["H11"], "H11", "answered ShutOff, expected Running");
}

// ------------------------------------------------------------------ replicator

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum RepBug {
    /// `status` before any sync reports a generation.
    InventsGeneration,
    /// `sync` returns the previous generation's info.
    StaleSyncAnswer,
    /// A failed sync still bumps the generation `status` reports.
    BumpsOnFailure,
    /// A sync writes into the newest generation in place: interrupted or
    /// failed midway, it leaves that generation torn.
    TornOnInterrupt,
    /// `promote(g)` hands out the newest generation's disks for any held `g`.
    PromotesNewest,
    /// Unknown generations fail with `Backend`, not `NotFound`.
    UnknownIsBackend,
    /// `reverse` answers Ok and changes nothing.
    ReverseNoop,
    /// `verify` answers Ok without checking.
    VerifyAlwaysOk,
    /// `stop` deletes every generation but the newest.
    StopPrunes,
    /// `test_copy` returns the replica's own disks.
    TestCopyIsReplica,
    /// `sync(Continuous)` answers Ok with the newest generation.
    AcceptsContinuous,
}

struct BrokenRep {
    inner: Arc<dyn Replicator>,
    world: SimWorld,
    bug: RepBug,
    /// What status claims after a failed sync (BumpsOnFailure).
    bumped: Mutex<Option<GenerationInfo>>,
}

fn pair() -> PairId {
    PairId::new("web").unwrap()
}

impl BrokenRep {
    fn newest_held(&self) -> Option<GenerationInfo> {
        let (_, target) = self.world.replica_direction(&pair())?;
        self.world
            .replica_generations(&pair(), &target)
            .last()
            .copied()
    }
}

/// Tears the newest generation unless disarmed (TornOnInterrupt).
struct TearGuard<'a> {
    rep: &'a BrokenRep,
    armed: bool,
}

impl Drop for TearGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            if let Some(g) = self.rep.newest_held() {
                self.rep.world.corrupt_generation(&pair(), g.generation);
            }
        }
    }
}

#[async_trait]
impl Replicator for BrokenRep {
    fn describe(&self) -> String {
        format!("broken ({:?}) {}", self.bug, self.inner.describe())
    }

    fn capabilities(&self) -> ReplicatorCaps {
        self.inner.capabilities()
    }

    async fn initial_sync(&self, source: &SourceView) -> Result<GenerationInfo> {
        self.inner.initial_sync(source).await
    }

    async fn sync(&self, source: &SourceView) -> Result<GenerationInfo> {
        let before = self.newest_held();
        match self.bug {
            RepBug::StaleSyncAnswer => {
                let g = self.inner.sync(source).await?;
                Ok(before.unwrap_or(g))
            }
            RepBug::BumpsOnFailure => match self.inner.sync(source).await {
                Ok(g) => {
                    *self.bumped.lock().unwrap() = None;
                    Ok(g)
                }
                Err(e) => {
                    let next = before.map(|b| GenerationInfo {
                        generation: b.generation.next(),
                        ..b
                    });
                    *self.bumped.lock().unwrap() = next;
                    Err(e)
                }
            },
            RepBug::TornOnInterrupt => {
                let mut guard = TearGuard {
                    rep: self,
                    armed: true,
                };
                let r = self.inner.sync(source).await;
                guard.armed = r.is_err();
                r
            }
            RepBug::AcceptsContinuous if *source == SourceView::Continuous => {
                before.ok_or_else(|| Error::not_found("nothing yet"))
            }
            _ => self.inner.sync(source).await,
        }
    }

    async fn status(&self) -> Result<ReplicaStatus> {
        let mut st = self.inner.status().await?;
        match self.bug {
            RepBug::InventsGeneration if st.newest.is_none() => {
                st.newest = Some(GenerationInfo {
                    generation: Generation(0),
                    source_time: wspare_core::UnixMillis(0),
                });
            }
            RepBug::BumpsOnFailure => {
                if let Some(b) = *self.bumped.lock().unwrap() {
                    st.newest = Some(b);
                    st.generations.push(b);
                }
            }
            _ => {}
        }
        Ok(st)
    }

    async fn promote(&self, g: Generation) -> Result<Promoted> {
        match self.bug {
            RepBug::PromotesNewest => {
                let p = self.inner.promote(g).await?;
                let newest = self.newest_held().map_or(g, |n| n.generation);
                let n = self.inner.promote(newest).await?;
                Ok(Promoted {
                    generation: p.generation,
                    disks: n.disks,
                })
            }
            RepBug::UnknownIsBackend => self.inner.promote(g).await.map_err(not_found_as_backend),
            _ => self.inner.promote(g).await,
        }
    }

    async fn reverse(&self) -> Result<()> {
        if self.bug == RepBug::ReverseNoop {
            return Ok(());
        }
        self.inner.reverse().await
    }

    async fn verify(&self, g: Generation, source: &SourceView) -> Result<()> {
        match self.bug {
            RepBug::VerifyAlwaysOk => Ok(()),
            RepBug::UnknownIsBackend => self
                .inner
                .verify(g, source)
                .await
                .map_err(not_found_as_backend),
            _ => self.inner.verify(g, source).await,
        }
    }

    async fn stop(&self) -> Result<()> {
        if self.bug == RepBug::StopPrunes {
            if let (Some((_, target)), Some(newest)) =
                (self.world.replica_direction(&pair()), self.newest_held())
            {
                for g in self.world.replica_generations(&pair(), &target) {
                    if g.generation != newest.generation {
                        self.world.corrupt_generation(&pair(), g.generation);
                    }
                }
            }
        }
        self.inner.stop().await
    }

    async fn test_copy(&self, g: Generation, label: &str) -> Result<Vec<DiskSpec>> {
        if self.bug == RepBug::TestCopyIsReplica {
            return Ok(self.inner.promote(g).await?.disks);
        }
        self.inner.test_copy(g, label).await
    }

    async fn discard_test_copy(&self, label: &str) -> Result<()> {
        self.inner.discard_test_copy(label).await
    }
}

fn not_found_as_backend(e: Error) -> Error {
    if e.kind() == ErrorKind::NotFound {
        Error::new(ErrorKind::Backend, format!("rsync: {}", e.message()))
    } else {
        e
    }
}

async fn run_broken_replicator(bug: RepBug) -> Report {
    let fixture = SimReplicatorFixture::new()
        .titled(format!("broken sim replicator ({bug:?})"))
        .wrap(move |inner, world| {
            Arc::new(BrokenRep {
                inner,
                world: world.clone(),
                bug,
                bumped: Mutex::new(None),
            })
        });
    suite::replicator::run(&fixture).await
}

#[tokio::test(start_paused = true)]
async fn r1_catches_a_generation_before_the_first_sync() {
    let r = run_broken_replicator(RepBug::InventsGeneration).await;
    assert_caught(
        &r,
        &["R1"],
        "R1",
        "before the first sync, status().newest is Some(GenerationInfo",
    );
}

#[tokio::test(start_paused = true)]
async fn r2_catches_a_sync_that_answers_the_previous_generation() {
    let r = run_broken_replicator(RepBug::StaleSyncAnswer).await;
    assert_caught(
        &r,
        &["R2", "R3", "R4", "R8", "R9"],
        "R2",
        "sync() returned generation g1, not larger than the earlier g1",
    );
}

#[tokio::test(start_paused = true)]
async fn r3_catches_a_failed_sync_that_bumps_the_generation() {
    let r = run_broken_replicator(RepBug::BumpsOnFailure).await;
    assert_caught(&r, &["R3", "R10"], "R3", "after a sync() failed midway (sim replicator web: transfer broken after 1 of 2 disks (injected fault) (backend)), status().newest is g2, expected g1");
}

#[tokio::test(start_paused = true)]
async fn r3_catches_an_interrupted_sync_that_tears_the_last_generation() {
    let r = run_broken_replicator(RepBug::TornOnInterrupt).await;
    assert_caught(&r, &["R3"], "R3",
        "after a sync() was interrupted (its future dropped after 1ms), generation g1 holds content with digest",
    );
}

#[tokio::test(start_paused = true)]
async fn r4_catches_promote_handing_out_the_wrong_point_in_time() {
    let r = run_broken_replicator(RepBug::PromotesNewest).await;
    assert_caught(
        &r,
        &["R4", "R8"],
        "R4",
        "after the newer g2 was made, generation g1 holds content with digest",
    );
}

#[tokio::test(start_paused = true)]
async fn r5_catches_unknown_generations_failing_with_the_wrong_kind() {
    let r = run_broken_replicator(RepBug::UnknownIsBackend).await;
    assert_caught(
        &r,
        &["R1", "R5"],
        "R5",
        "failed with kind backend, expected a NotFound",
    );
    let r5 = r.case("R5").unwrap();
    assert!(matches!(&r5.outcome, CaseOutcome::Failed(m)
        if m.starts_with("R5 unknown generation: promote(g1001) of a generation the replicator does not hold failed with kind backend")));
}

#[tokio::test(start_paused = true)]
async fn r6_catches_a_reverse_that_changes_nothing() {
    let r = run_broken_replicator(RepBug::ReverseNoop).await;
    assert_caught(
        &r,
        &["R6"],
        "R6",
        "after reverse(), status() shows node-a -> node-b, expected node-b -> node-a",
    );
}

#[tokio::test(start_paused = true)]
async fn r7_catches_a_verify_that_never_finds_anything() {
    let r = run_broken_replicator(RepBug::VerifyAlwaysOk).await;
    assert_caught(
        &r,
        &["R5", "R7"],
        "R7",
        "verify(g1) after its copy was altered returned Ok(()), expected a Conflict error",
    );
}

#[tokio::test(start_paused = true)]
async fn r8_catches_a_stop_that_damages_older_generations() {
    let r = run_broken_replicator(RepBug::StopPrunes).await;
    assert_caught(
        &r,
        &["R8"],
        "R8",
        "after stop(), generation g1 holds content with digest",
    );
}

#[tokio::test(start_paused = true)]
async fn r9_catches_a_test_copy_that_is_the_replica() {
    let r = run_broken_replicator(RepBug::TestCopyIsReplica).await;
    assert_caught(
        &r,
        &["R9"],
        "R9",
        "a disk of the replica itself, not a separate copy",
    );
}

#[tokio::test(start_paused = true)]
async fn r10_catches_a_sync_from_a_running_vms_disks() {
    let r = run_broken_replicator(RepBug::AcceptsContinuous).await;
    assert_caught(
        &r,
        &["R10"],
        "R10",
        "sync(Continuous) by a replicator that needs a source view returned Ok(GenerationInfo",
    );
}

// ------------------------------------------------------------------ fencer

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum FenceBug {
    /// Hands out a receipt as soon as the power-off command is accepted.
    ReceiptOnCommand,
    /// Turns a power-off that never read back off into a receipt.
    ReceiptOnTimeout,
    /// Fencing a node that is already off fails.
    AlreadyOffConflict,
    /// Reading the power status powers the node on.
    StatusPowersOn,
    /// `unfence` answers Ok and does nothing.
    UnfenceNoop,
    /// A node without a device fails with `Unreachable`.
    UnknownUnreachable,
    /// A dead device makes the call hang.
    DeadDeviceHangs,
    /// Refused credentials put the password into the error.
    SecretInError,
}

struct BrokenFencer {
    inner: Arc<dyn Fencer>,
    world: SimWorld,
    bug: FenceBug,
}

#[async_trait]
impl Fencer for BrokenFencer {
    fn describe(&self) -> String {
        format!("broken ({:?}) {}", self.bug, self.inner.describe())
    }

    fn capabilities(&self) -> FencerCaps {
        self.inner.capabilities()
    }

    async fn fence(&self, node: &NodeId) -> Result<FenceReceipt> {
        self.checks(node).await?;
        match self.bug {
            FenceBug::ReceiptOnCommand => {
                // Reaches the device, sends power-off, and trusts "accepted".
                self.inner.power_status(node).await?;
                self.world
                    .request_power_off(node, self.world.config().power_off_delay);
                Ok(FenceReceipt::from_power_reading(
                    node.clone(),
                    "bmc",
                    PowerState::Off,
                    self.world.now(),
                )
                .unwrap())
            }
            FenceBug::ReceiptOnTimeout => match self.inner.fence(node).await {
                Err(e) if e.kind() == ErrorKind::Timeout => Ok(FenceReceipt::from_power_reading(
                    node.clone(),
                    "bmc",
                    PowerState::Off,
                    self.world.now(),
                )
                .unwrap()),
                r => r,
            },
            FenceBug::AlreadyOffConflict
                if self.world.host_power(node) == Some(PowerState::Off) =>
            {
                Err(Error::new(
                    ErrorKind::Conflict,
                    format!("{node} is already off"),
                ))
            }
            _ => self.inner.fence(node).await.map_err(|e| self.leak(e)),
        }
    }

    async fn power_status(&self, node: &NodeId) -> Result<PowerState> {
        self.checks(node).await?;
        let p = self
            .inner
            .power_status(node)
            .await
            .map_err(|e| self.leak(e))?;
        if self.bug == FenceBug::StatusPowersOn {
            self.world.power_on(node);
        }
        Ok(p)
    }

    async fn unfence(&self, node: &NodeId) -> Result<()> {
        self.checks(node).await?;
        if self.bug == FenceBug::UnfenceNoop {
            self.inner.power_status(node).await?;
            return Ok(());
        }
        self.inner.unfence(node).await
    }
}

impl BrokenFencer {
    async fn checks(&self, node: &NodeId) -> Result<()> {
        if self.bug == FenceBug::UnknownUnreachable && self.world.host_power(node).is_none() {
            return Err(Error::new(
                ErrorKind::Unreachable,
                format!("no route to the BMC of {node}"),
            ));
        }
        if self.bug == FenceBug::DeadDeviceHangs
            && self.world.has_fault(&Fault::FenceDeviceDead(node.clone()))
        {
            std::future::pending::<()>().await;
        }
        Ok(())
    }

    fn leak(&self, e: Error) -> Error {
        if self.bug == FenceBug::SecretInError && e.kind() == ErrorKind::PermissionDenied {
            Error::new(
                ErrorKind::PermissionDenied,
                format!("{} (tried password {SIM_WRONG_PASSWORD})", e.message()),
            )
            .retryable(false)
        } else {
            e
        }
    }
}

async fn run_broken_fencer(bug: FenceBug) -> Report {
    let fixture = SimFencerFixture::new()
        .titled(format!("broken sim fencer ({bug:?})"))
        .wrap(move |inner, world| {
            Arc::new(BrokenFencer {
                inner,
                world: world.clone(),
                bug,
            })
        });
    suite::fencer::run(&fixture).await
}

#[tokio::test(start_paused = true)]
async fn f1_catches_a_receipt_while_the_power_is_still_on() {
    let r = run_broken_fencer(FenceBug::ReceiptOnCommand).await;
    assert_caught(&r, &["F1", "F2", "F3", "F4", "F5"], "F1",
        "fence(node-a) returned a receipt (node node-a read back off by bmc) while the ground truth reads On",
    );
}

#[tokio::test(start_paused = true)]
async fn f1_catches_a_lying_device() {
    let fixture = SimFencerFixture::new()
        .titled("sim fencer, lying device")
        .wrap(|inner, world| {
            world.set_fault(Fault::FenceLies(node_a()));
            inner
        });
    let r = suite::fencer::run(&fixture).await;
    assert_caught(&r, &["F1", "F2", "F3", "F4", "F5"], "F1",
        "returned a receipt (node node-a read back off by bmc-node-a) while the ground truth reads On",
    );
}

#[tokio::test(start_paused = true)]
async fn f2_catches_fencing_an_off_node_failing() {
    let r = run_broken_fencer(FenceBug::AlreadyOffConflict).await;
    assert_caught(
        &r,
        &["F2"],
        "F2",
        "a second fence(node-a) failed: node-a is already off (conflict)",
    );
}

#[tokio::test(start_paused = true)]
async fn f3_catches_a_receipt_after_the_device_kept_reading_on() {
    let r = run_broken_fencer(FenceBug::ReceiptOnTimeout).await;
    assert_caught(&r, &["F3"], "F3",
        "fence(node-a) returned a receipt (node node-a read back off by bmc) although the device kept reporting on \
         (ground truth: On)",
    );
}

#[tokio::test(start_paused = true)]
async fn f4_catches_a_status_read_that_changes_the_power() {
    let r = run_broken_fencer(FenceBug::StatusPowersOn).await;
    assert_caught(
        &r,
        &["F4"],
        "F4",
        "power_status(node-a) read #1 changed the node's power: the ground truth reads On, was Off",
    );
}

#[tokio::test(start_paused = true)]
async fn f5_catches_an_unfence_that_does_nothing() {
    let r = run_broken_fencer(FenceBug::UnfenceNoop).await;
    assert_caught(
        &r,
        &["F5"],
        "F5",
        "after unfence(node-a) returned Ok, power_status(node-a) answered Off, expected On",
    );
}

#[tokio::test(start_paused = true)]
async fn f6_catches_an_unknown_node_failing_as_unreachable() {
    let r = run_broken_fencer(FenceBug::UnknownUnreachable).await;
    assert_caught(&r, &["F6"], "F6",
        "fence(node-z) of a node the fencer has no device for failed with kind unreachable, expected a NotFound",
    );
}

#[tokio::test(start_paused = true)]
async fn f7_catches_a_dead_device_that_hangs_the_call() {
    let r = run_broken_fencer(FenceBug::DeadDeviceHangs).await;
    assert_caught(
        &r,
        &["F7"],
        "F7",
        "did not finish within 120s (a call hangs?); last step: fence(node-a)",
    );
}

#[tokio::test(start_paused = true)]
async fn f8_catches_the_password_in_an_error() {
    let r = run_broken_fencer(FenceBug::SecretInError).await;
    assert_caught(
        &r,
        &["F8"],
        "F8",
        "fence()'s error shows the configured secret in its Display",
    );
    let CaseOutcome::Failed(msg) = &r.case("F8").unwrap().outcome else {
        unreachable!()
    };
    assert!(
        msg.contains("<SECRET>") && !msg.contains(SIM_WRONG_PASSWORD),
        "the report itself hides it: {msg}"
    );
}
