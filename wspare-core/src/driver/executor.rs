//! [`Executor`]: runs one pair's actions through its backends.
//!
//! - Sync: freezes the source VM's disks if it runs and the replicator
//!   copies files, syncs, and always releases the freeze (the sync step has
//!   its own deadline, so a timeout cannot skip the release).
//! - Observe, stop, destroy: the receipt comes from the state read back.
//!   A graceful stop first ends a sync cycle in progress and waits for the
//!   release of its freeze (a VM shut down while frozen would keep its
//!   last writes in an overlay).
//! - Start from a generation: defines the VM from the pair's spec with the
//!   promoted disks, then starts it; the receipt must cover the other copy.
//! - Reverse: only if the replicator does not run that way already.
//! - Fence: one fence per node at a time across pairs ([`FenceGate`]).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{Error, ErrorKind, Result};
use crate::fencer::Fencer;
use crate::generation::{Generation, GenerationInfo};
use crate::hypervisor::{Hypervisor, VmState};
use crate::ids::{NodeId, PairId, VmName};
use crate::machine::{Answer, Op, Outcome, ReplicaReport};
use crate::receipt::FenceReceipt;
use crate::replicator::{Promoted, Replicator, SourceView};
use crate::spec::{NicSource, VmSpec};
use crate::time::UnixMillis;

/// A pair's backends, as seen from one node.
pub struct PairBackends {
    /// The VM as defined on its primary. A spare is defined from it, with the
    /// promoted disks in place of the primary's.
    pub spec: VmSpec,
    /// Each node's hypervisor (the peer's through a remote connection: it is
    /// the second channel of failure detection).
    pub hypervisors: BTreeMap<NodeId, Arc<dyn Hypervisor>>,
    /// The pair's replicator.
    pub replicator: Arc<dyn Replicator>,
    /// A fencer for each node this node may fence (the peer).
    pub fencers: BTreeMap<NodeId, Arc<dyn Fencer>>,
}

/// How long each kind of action may take.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct Deadlines {
    /// Reading a VM's state.
    #[serde(with = "humantime_serde")]
    pub observe: Duration,
    /// Reading the replicator's status.
    #[serde(with = "humantime_serde")]
    pub query: Duration,
    /// One replication cycle (the copy itself).
    #[serde(with = "humantime_serde")]
    pub sync: Duration,
    /// Freezing or releasing a VM's disks.
    #[serde(with = "humantime_serde")]
    pub freeze: Duration,
    /// Verifying a generation.
    #[serde(with = "humantime_serde")]
    pub verify: Duration,
    /// Fencing a node, power read-back included.
    #[serde(with = "humantime_serde")]
    pub fence: Duration,
    /// Promoting a generation.
    #[serde(with = "humantime_serde")]
    pub promote: Duration,
    /// Defining and starting a VM.
    #[serde(with = "humantime_serde")]
    pub start: Duration,
    /// Destroying a VM; a graceful stop gets its own timeout plus this.
    #[serde(with = "humantime_serde")]
    pub stop: Duration,
}

impl Default for Deadlines {
    fn default() -> Self {
        Deadlines {
            observe: Duration::from_secs(20),
            query: Duration::from_secs(30),
            sync: Duration::from_secs(6 * 3600),
            freeze: Duration::from_secs(120),
            verify: Duration::from_secs(3600),
            fence: Duration::from_secs(120),
            promote: Duration::from_secs(600),
            start: Duration::from_secs(300),
            stop: Duration::from_secs(60),
        }
    }
}

/// Wall-clock time, for receipts and replica ages.
pub trait WallClock: Send + Sync {
    /// Now.
    fn now(&self) -> UnixMillis;
}

/// The system clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl WallClock for SystemClock {
    fn now(&self) -> UnixMillis {
        UnixMillis::now()
    }
}

type FenceSlot = Arc<tokio::sync::Mutex<Option<(tokio::time::Instant, FenceReceipt)>>>;

/// One fence per node at a time: when several pairs lose the same node,
/// the first caller fences and the others share its fresh receipt.
#[derive(Default)]
pub struct FenceGate {
    slots: Mutex<HashMap<NodeId, FenceSlot>>,
}

/// How long a receipt is shared with later callers.
const FENCE_SHARE: Duration = Duration::from_secs(30);

impl FenceGate {
    async fn fence(&self, node: &NodeId, fencer: &dyn Fencer) -> Result<FenceReceipt> {
        let slot = self
            .slots
            .lock()
            .expect("fence gate")
            .entry(node.clone())
            .or_default()
            .clone();
        let mut g = slot.lock().await;
        if let Some((at, r)) = &*g {
            if at.elapsed() < FENCE_SHARE {
                return Ok(r.clone());
            }
        }
        let r = fencer.fence(node).await?;
        *g = Some((tokio::time::Instant::now(), r.clone()));
        Ok(r)
    }
}

/// `f`, or a timeout error saying that `what` did not finish within `t`.
async fn within<T>(
    what: &str,
    t: Duration,
    f: impl std::future::Future<Output = Result<T>>,
) -> Result<T> {
    tokio::time::timeout(t, f).await.unwrap_or_else(|_| {
        Err(Error::timeout(format!(
            "{what} did not finish within {}",
            humantime::format_duration(t)
        )))
    })
}

/// Runs one pair's actions.
pub struct Executor {
    pair: PairId,
    local: NodeId,
    backends: Arc<PairBackends>,
    deadlines: Deadlines,
    clock: Arc<dyn WallClock>,
    fences: Arc<FenceGate>,
    promoted: Mutex<Option<Promoted>>,
    /// Held from reading the source VM's state to releasing its freeze in a
    /// sync: a graceful stop waits for it, so a VM is never shut down with
    /// its writes in a freeze overlay that no one commits any more.
    disks: tokio::sync::Mutex<()>,
}

impl Executor {
    /// An executor for `pair` on `local`.
    pub fn new(
        pair: PairId,
        local: NodeId,
        backends: Arc<PairBackends>,
        deadlines: Deadlines,
        clock: Arc<dyn WallClock>,
        fences: Arc<FenceGate>,
    ) -> Self {
        Executor {
            pair,
            local,
            backends,
            deadlines,
            clock,
            fences,
            promoted: Mutex::new(None),
            disks: tokio::sync::Mutex::new(()),
        }
    }

    /// The backends.
    pub fn backends(&self) -> &Arc<PairBackends> {
        &self.backends
    }

    /// Runs `op` to an outcome, within its deadline.
    pub async fn run(&self, op: &Op) -> Outcome {
        let d = &self.deadlines;
        let limit = match op {
            // Syncs carry per-step deadlines inside, so the release of a
            // freeze is never skipped.
            Op::Sync { .. } | Op::InitialSync { .. } => None,
            Op::Observe { .. } => Some(d.observe),
            Op::QueryReplica | Op::ReverseReplication { .. } => Some(d.query),
            Op::Verify { .. } => Some(d.verify),
            Op::Fence { .. } | Op::PowerStatus { .. } => Some(d.fence),
            Op::Promote { .. } => Some(d.promote),
            Op::StartVm { .. } | Op::StartTestClone { .. } => Some(d.start + d.promote),
            Op::StopVm { timeout, .. } => Some(*timeout + d.stop),
            Op::DestroyVm { .. } | Op::DestroyTestClone { .. } => Some(d.stop),
        };
        let r = match limit {
            Some(t) => within("the action", t, self.exec(op)).await,
            None => self.exec(op).await,
        };
        match r {
            Ok(a) => Outcome::Ok(a),
            Err(e) => {
                let e = e.context(format!("pair {}: {op}", self.pair));
                tracing::warn!(pair = %self.pair, %op, error = %e, "action failed");
                Outcome::Failed(e.to_failure())
            }
        }
    }

    fn vm(&self) -> &VmName {
        &self.backends.spec.name
    }

    fn hv(&self, node: &NodeId) -> Result<&Arc<dyn Hypervisor>> {
        self.backends
            .hypervisors
            .get(node)
            .ok_or_else(|| Error::invalid(format!("no hypervisor configured for node {node}")))
    }

    fn fencer(&self, node: &NodeId) -> Result<&Arc<dyn Fencer>> {
        self.backends
            .fencers
            .get(node)
            .ok_or_else(|| Error::invalid(format!("no fence device configured for node {node}")))
    }

    /// The VM's state on `node`, and a receipt if it is off.
    async fn observed(&self, node: &NodeId) -> Result<(VmState, Option<FenceReceipt>)> {
        let state = self.hv(node)?.status(self.vm()).await?.state;
        let receipt = FenceReceipt::from_observed_state(
            node.clone(),
            self.vm().clone(),
            state,
            self.clock.now(),
        );
        Ok((state, receipt))
    }

    async fn stopped(&self, node: &NodeId) -> Result<Answer> {
        match self.observed(node).await? {
            (_, Some(r)) => Ok(Answer::Stopped(r)),
            (state, None) => Err(Error::new(
                ErrorKind::Conflict,
                format!(
                    "the VM {} on {node} is {state} after it was stopped",
                    self.vm()
                ),
            )),
        }
    }

    async fn sync(&self, source: &NodeId, initial: bool) -> Result<Answer> {
        let d = &self.deadlines;
        let info = if self.backends.replicator.capabilities().needs_source_view {
            let _disks = self.disks.lock().await;
            let hv = self.hv(source)?;
            let state = within("reading the VM's state", d.observe, hv.status(self.vm()))
                .await?
                .state;
            if state.is_live() {
                let frozen =
                    within("freezing the disks", d.freeze, hv.freeze_disks(self.vm())).await?;
                let copy = self
                    .copy(initial, &SourceView::Frozen(frozen.clone()))
                    .await;
                // Released whatever the copy did.
                within("releasing the disks", d.freeze, hv.release_disks(&frozen))
                    .await
                    .map_err(|e| {
                        e.context(format!(
                            "the VM {} on {source} may still write to a snapshot overlay; releasing its freeze failed",
                            self.vm()
                        ))
                    })?;
                copy?
            } else {
                let spec =
                    within("reading the VM's definition", d.observe, hv.spec(self.vm())).await?;
                let view = SourceView::Stopped {
                    disks: spec.disks,
                    at: self.clock.now(),
                };
                self.copy(initial, &view).await?
            }
        } else {
            self.copy(initial, &SourceView::Continuous).await?
        };
        Ok(Answer::Generation {
            info,
            age: self.clock.now().saturating_since(info.source_time),
        })
    }

    /// One replication cycle from `view`, within the sync deadline.
    async fn copy(&self, initial: bool, view: &SourceView) -> Result<GenerationInfo> {
        let (rep, t) = (&self.backends.replicator, self.deadlines.sync);
        if initial {
            within("the initial sync", t, rep.initial_sync(view)).await
        } else {
            within("the sync", t, rep.sync(view)).await
        }
    }

    async fn promote(&self, g: Generation) -> Result<Promoted> {
        if let Some(p) = self
            .promoted
            .lock()
            .expect("promoted")
            .as_ref()
            .filter(|p| p.generation.generation == g)
        {
            return Ok(p.clone());
        }
        let p = self.backends.replicator.promote(g).await?;
        if p.generation.generation != g {
            return Err(Error::new(
                ErrorKind::Backend,
                format!(
                    "{} promoted {} when asked for {g}",
                    self.backends.replicator.describe(),
                    p.generation.generation
                ),
            ));
        }
        *self.promoted.lock().expect("promoted") = Some(p.clone());
        Ok(p)
    }

    /// The pair's spec with each disk's image replaced by the replica's
    /// (matched by slot); bus, format and the rest come from the spec.
    fn spare_spec(&self, replica: &[crate::spec::DiskSpec]) -> Result<VmSpec> {
        let mut spec = self.backends.spec.clone();
        for d in &mut spec.disks {
            let r = replica
                .iter()
                .find(|r| r.target == d.target)
                .ok_or_else(|| {
                    Error::new(
                        ErrorKind::Backend,
                        format!(
                            "{} returned no image for disk {} of {}",
                            self.backends.replicator.describe(),
                            d.target,
                            spec.name
                        ),
                    )
                })?;
            d.path = r.path.clone();
        }
        Ok(spec)
    }

    fn clone_name(&self, label: &str) -> Result<VmName> {
        let base = self.vm().as_str();
        let suffix = format!("-{label}");
        let keep = crate::ids::MAX_NAME_LEN
            .saturating_sub(suffix.len())
            .min(base.len());
        VmName::new(format!("{}{suffix}", &base[..keep]))
    }

    async fn exec(&self, op: &Op) -> Result<Answer> {
        let vm = self.vm();
        match op {
            Op::Observe { node } => {
                let (state, receipt) = self.observed(node).await?;
                Ok(Answer::Observed { state, receipt })
            }
            Op::QueryReplica => {
                let s = self.backends.replicator.status().await?;
                let age = s.lag(self.clock.now());
                Ok(Answer::Replica(ReplicaReport {
                    source: s.source,
                    target: s.target,
                    newest: s.newest,
                    age,
                }))
            }
            Op::InitialSync { source, .. } => self.sync(source, true).await,
            Op::Sync { source, .. } => self.sync(source, false).await,
            Op::ReverseReplication { source, .. } => {
                let rep = &self.backends.replicator;
                if rep.status().await?.source != *source {
                    rep.reverse().await?;
                }
                Ok(Answer::Done)
            }
            Op::Verify { generation } => {
                let spec = self.hv(&self.local)?.spec(vm).await?;
                let view = SourceView::Stopped {
                    disks: spec.disks,
                    at: self.clock.now(),
                };
                self.backends.replicator.verify(*generation, &view).await?;
                Ok(Answer::Done)
            }
            Op::Fence { node } => {
                let r = self.fences.fence(node, self.fencer(node)?.as_ref()).await?;
                Ok(Answer::Fenced(r))
            }
            Op::PowerStatus { node } => {
                let f = self.fencer(node)?;
                let state = f.power_status(node).await?;
                let receipt = FenceReceipt::from_power_reading(
                    node.clone(),
                    f.describe(),
                    state,
                    self.clock.now(),
                );
                Ok(Answer::Power { state, receipt })
            }
            Op::Promote { generation, .. } => Ok(Answer::Promoted(
                self.promote(*generation).await?.generation,
            )),
            Op::StartVm {
                node,
                receipt,
                generation,
            } => {
                let other = self
                    .backends
                    .hypervisors
                    .keys()
                    .find(|n| *n != node)
                    .ok_or_else(|| {
                        Error::invalid(format!("pair {} has no node besides {node}", self.pair))
                    })?;
                if !receipt.covers(other, vm) {
                    return Err(Error::invalid(format!(
                        "refusing to start {vm} on {node}: `{receipt}` does not prove {other} off"
                    )));
                }
                let hv = self.hv(node)?;
                if let Some(g) = generation {
                    let p = self.promote(*g).await?;
                    let spec = self.spare_spec(&p.disks)?;
                    hv.define(&spec).await?;
                }
                hv.start(vm).await?;
                Ok(Answer::Done)
            }
            Op::StopVm { node, timeout } => {
                // A cycle in progress may hold the VM's disks frozen: end
                // it (a planned stop is followed by a final sync anyway)
                // and wait for its release before shutting the VM down.
                // Only file-copying replicators freeze the source; a
                // block-level one (DRBD) must keep replicating here.
                let rep = &self.backends.replicator;
                if rep.capabilities().needs_source_view {
                    if let Err(e) = rep.stop().await {
                        tracing::warn!(pair = %self.pair, error = %e, "could not end the sync cycle in progress; waiting for it");
                    }
                }
                let _disks = self.disks.lock().await;
                self.hv(node)?.shutdown(vm, *timeout).await?;
                self.stopped(node).await
            }
            Op::DestroyVm { node } => {
                let hv = self.hv(node)?;
                match hv.destroy(vm).await {
                    Err(e) if e.kind() == ErrorKind::NotFound => {}
                    r => r?,
                }
                self.stopped(node).await
            }
            Op::StartTestClone {
                node,
                generation,
                label,
            } => {
                let disks = self
                    .backends
                    .replicator
                    .test_copy(*generation, label)
                    .await?;
                let mut spec = self.spare_spec(&disks)?;
                spec.name = self.clone_name(label)?;
                for nic in &mut spec.nics {
                    nic.source = NicSource::Isolated;
                }
                let hv = self.hv(node)?;
                hv.define(&spec).await?;
                hv.start(&spec.name).await?;
                Ok(Answer::Done)
            }
            Op::DestroyTestClone { node, label } => {
                let name = self.clone_name(label)?;
                let hv = self.hv(node)?;
                for r in [hv.destroy(&name).await, hv.undefine(&name).await] {
                    match r {
                        Err(e) if e.kind() == ErrorKind::NotFound => {}
                        r => r?,
                    }
                }
                self.backends.replicator.discard_test_copy(label).await?;
                Ok(Answer::Done)
            }
        }
    }
}
