//! The failover machine: one per pair per node, sans-IO.
//!
//! ```text
//! handle(input, now)         feed one input
//! poll_action() -> Action    drain until None after every input
//! poll_event()  -> Event     drain until None after every input
//! poll_timeout() -> Instant  when to call handle(Tick, ..) next
//! ```
//!
//! The machine never reads a clock, sleeps, spawns or does I/O. Every action
//! it asks for has an id and must be answered by [`Input::ActionDone`]; an
//! action whose outcome was lost in a crash is answered [`Outcome::Unknown`]
//! and the machine observes before it acts again.
//!
//! Both nodes of a pair run a machine for it. Roles follow the epoch: the
//! machine on the active node monitors and restarts the VM, drives the
//! replication cycles and fences a lost spare; the machine on the spare
//! tracks the replica, detects the active's failure, fences it, promotes and
//! starts. Heartbeats carry each side's [`PeerView`], which is how a
//! returning old primary learns that its copy is stale.
//!
//! The phases and their transitions are in `ARCHITECTURE.md`; the module
//! files hold them by topic: `steady` (monitoring, replication, degraded),
//! `failover` (suspect, fence, promote, start), `inplace` (restarts and
//! hand-overs), `recovery` (restore, unknown outcomes, epochs),
//! `commands` (operator commands and test failover).

mod action;
mod commands;
mod event;
mod failover;
mod inplace;
mod input;
#[cfg(any(test, feature = "model"))]
#[doc(hidden)]
pub mod model;
mod phase;
mod policy;
mod recovery;
mod steady;

#[cfg(test)]
mod tests;

use std::collections::VecDeque;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use action::{Action, Answer, Op, Outcome, ReplicaReport};
pub use event::{Event, EventKind};
pub use input::{Command, Input, PeerView};
pub use phase::{BlockedOn, HandoverStep, Phase, PhaseName};
use policy::Bug;
#[cfg(feature = "inject-bugs")]
pub use policy::Bugs;
pub use policy::{PairConfig, Policy};

use crate::detector::Detector;
use crate::error::{ErrorKind, Failure};
use crate::generation::{Epoch, Generation, GenerationInfo};
use crate::ids::{ActionId, NodeId, PairId};
use crate::receipt::FenceReceipt;
use crate::time::Instant;

/// Why an action was asked for: how its answer is read.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Why {
    /// Periodic observation or work.
    Routine,
    /// Second-channel confirmation of a suspicion.
    Confirm,
    /// Checking that a fenced node's VM is gone.
    FenceCheck,
    /// Proof that the peer's copy is off, before starting here.
    PeerReceipt,
    /// The replica's newest generation, just before a failover decision.
    PreFailover,
    /// Observing after a restart or a resume.
    Recover,
    /// Part of a hand-over.
    Handover,
    /// Part of a restart in place.
    Restart,
    /// An observation standing in for an action whose outcome is unknown.
    Reobserve(Box<(Op, Why)>),
}

/// An action asked for and not yet answered.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pending {
    /// Its id.
    pub id: ActionId,
    /// What was asked.
    pub op: Op,
    /// Why.
    pub why: Why,
    /// Held back by maintenance: not handed to the driver yet.
    pub held: bool,
}

/// A test failover's clone.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TestClone {
    /// Cloned generation.
    pub generation: Generation,
    /// Its label.
    pub label: String,
    /// Whether its start was confirmed.
    pub running: bool,
}

/// What the journal keeps of a machine: everything but timers, the
/// detector's history and the output queues, which a restart rebuilds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    /// The pair.
    pub pair: PairId,
    /// The node the machine runs on.
    pub local: NodeId,
    /// The epoch.
    pub epoch: Epoch,
    /// The active node.
    pub active: NodeId,
    /// The phase.
    pub phase: Phase,
    /// Maintenance on.
    pub maintenance: bool,
    /// A test failover's clone.
    pub test: Option<TestClone>,
    /// The next action id.
    pub next_id: u64,
    /// Actions asked for and not answered.
    pub pending: Vec<Pending>,
    /// Newest complete generation known.
    pub newest: Option<GenerationInfo>,
    /// On a spare whose copy went stale at an epoch change: the generation
    /// the new active started from. Protected again once a newer one is here.
    pub stale_floor: Option<Generation>,
    /// Active: the peer is down or fenced; it needs a resync when it returns.
    pub peer_lost: bool,
    /// Proof the peer is off, while it is lost.
    pub peer_receipt: Option<FenceReceipt>,
    /// Active: the replication still runs the old way and must be reversed.
    pub needs_reverse: bool,
    /// Active: the peer's copy diverged and needs a full resync.
    pub needs_initial: bool,
    /// An operator accepted the replica's age for the next failover.
    pub accept_data_loss: bool,
}

#[derive(Clone, Copy, Debug)]
struct Timers {
    monitor: Instant,
    sync: Instant,
    query: Instant,
    fence: Instant,
    retry: Instant,
    handover: Instant,
    peer_wait: Instant,
    confirm: Instant,
    stale: Instant,
}

impl Timers {
    fn new() -> Self {
        Timers {
            monitor: Instant::NEVER,
            sync: Instant::NEVER,
            query: Instant::NEVER,
            fence: Instant::NEVER,
            retry: Instant::NEVER,
            handover: Instant::NEVER,
            peer_wait: Instant::NEVER,
            confirm: Instant::NEVER,
            stale: Instant::NEVER,
        }
    }

    fn earliest(&self) -> Instant {
        [
            self.monitor,
            self.sync,
            self.query,
            self.fence,
            self.retry,
            self.handover,
            self.peer_wait,
            self.confirm,
            self.stale,
        ]
        .into_iter()
        .min()
        .unwrap_or(Instant::NEVER)
    }
}

/// A pair's status, for dashboards and `wspare-agent status`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PairStatus {
    /// The pair.
    pub pair: PairId,
    /// The node reporting.
    pub node: NodeId,
    /// The active node.
    pub active: NodeId,
    /// The epoch.
    pub epoch: Epoch,
    /// The phase.
    pub phase: PhaseName,
    /// Why degraded or blocked.
    pub detail: Option<String>,
    /// Maintenance on.
    pub maintenance: bool,
    /// Newest complete generation known.
    pub newest: Option<GenerationInfo>,
    /// Its age now.
    pub newest_age: Option<Duration>,
    /// Whether the peer is suspected down.
    pub peer_suspected: bool,
    /// A running test clone's generation.
    pub test_clone: Option<Generation>,
    /// Actions in flight.
    pub pending: usize,
}

/// One pair's failover machine on one node. See the module docs.
#[derive(Clone, Debug)]
pub struct Machine {
    cfg: PairConfig,
    now: Instant,
    // Journaled state (see `Snapshot`).
    epoch: Epoch,
    active: NodeId,
    phase: Phase,
    maintenance: bool,
    test: Option<TestClone>,
    next_id: u64,
    pending: Vec<Pending>,
    newest: Option<GenerationInfo>,
    stale_floor: Option<Generation>,
    peer_lost: bool,
    peer_receipt: Option<FenceReceipt>,
    needs_reverse: bool,
    needs_initial: bool,
    accept_data_loss: bool,
    // Volatile state.
    newest_age: Option<(Duration, Instant)>,
    last_sync_error: Option<Failure>,
    detector: Detector,
    peer_view: Option<(PeerView, Instant)>,
    witness: Option<(bool, Instant)>,
    suspect_since: Instant,
    recover_since: Instant,
    recover_local: Option<crate::hypervisor::VmState>,
    suspect_confirmed: Option<String>,
    restarts: VecDeque<Instant>,
    retries: u32,
    timers: Timers,
    actions: VecDeque<Action>,
    events: VecDeque<Event>,
}

impl Machine {
    /// A machine for a new pair: the configured primary is active, epoch 0,
    /// nothing replicated yet.
    pub fn new(cfg: PairConfig, now: Instant) -> Machine {
        let active = cfg.primary.clone();
        let mut m = Machine::blank(cfg, now, active);
        m.phase = Phase::Seeding;
        m.emit(
            EventKind::Transition {
                from: PhaseName::Seeding,
                to: PhaseName::Seeding,
            },
            format!("pair created; {} is active", m.active),
        );
        m.arm_steady_timers();
        m.observe_local(Why::Routine);
        m
    }

    fn blank(cfg: PairConfig, now: Instant, active: NodeId) -> Machine {
        let detector = Detector::new(cfg.policy.detector.clone(), now);
        Machine {
            now,
            epoch: Epoch(0),
            active,
            phase: Phase::Recovering,
            maintenance: false,
            test: None,
            next_id: 1,
            pending: Vec::new(),
            newest: None,
            stale_floor: None,
            peer_lost: false,
            peer_receipt: None,
            needs_reverse: false,
            needs_initial: false,
            accept_data_loss: false,
            newest_age: None,
            last_sync_error: None,
            detector,
            peer_view: None,
            witness: None,
            suspect_since: now,
            recover_since: now,
            recover_local: None,
            suspect_confirmed: None,
            restarts: VecDeque::new(),
            retries: 0,
            timers: Timers::new(),
            actions: VecDeque::new(),
            events: VecDeque::new(),
            cfg,
        }
    }

    /// Feeds one input at `now`. Drain [`Machine::poll_action`] and
    /// [`Machine::poll_event`] afterwards.
    pub fn handle(&mut self, input: Input, now: Instant) {
        if now > self.now {
            self.now = now;
        }
        match input {
            Input::Heartbeat { from, view } => self.on_heartbeat(from, view),
            Input::VmObserved { node, state } => {
                let r = Ok((state, None));
                if node == self.cfg.local {
                    self.on_local_state(r);
                } else if node == *self.cfg.peer() {
                    self.on_peer_state(r, &Why::Routine);
                }
            }
            Input::Replica(r) => self.on_replica(r, &Why::Routine),
            Input::Witness { node, alive } => self.on_witness(node, alive),
            Input::ActionDone { id, outcome } => self.on_done(id, outcome),
            Input::Command(c) => {
                if let Err(why) = self.command(c) {
                    self.emit(EventKind::Rejected, why);
                }
            }
            Input::Tick => {}
        }
        self.on_timers();
    }

    /// The next action to run, if any.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// The next event, if any.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// When to call `handle(Tick, ..)` next.
    pub fn poll_timeout(&self) -> Instant {
        self.timers.earliest().min(self.detector.deadline())
    }

    /// The view to send the peer in heartbeats.
    pub fn view(&self) -> PeerView {
        let handover = match &self.phase {
            Phase::HandingOver {
                step: HandoverStep::Offered,
                generation,
                ..
            } => *generation,
            _ => None,
        };
        PeerView {
            epoch: self.epoch,
            active: self.active.clone(),
            phase: self.phase.name(),
            newest: self.newest,
            newest_age: self.age(),
            handover,
        }
    }

    /// The pair's status as this node sees it.
    pub fn status(&self) -> PairStatus {
        let detail = match &self.phase {
            Phase::Degraded { reason } | Phase::Blocked { reason, .. } => Some(reason.clone()),
            _ => None,
        };
        PairStatus {
            pair: self.cfg.pair.clone(),
            node: self.cfg.local.clone(),
            active: self.active.clone(),
            epoch: self.epoch,
            phase: self.phase.name(),
            detail,
            maintenance: self.maintenance,
            newest: self.newest,
            newest_age: self.age(),
            peer_suspected: self.detector.is_suspected(),
            test_clone: self
                .test
                .as_ref()
                .filter(|t| t.running)
                .map(|t| t.generation),
            pending: self.pending.len(),
        }
    }

    /// The journaled part of the state.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            pair: self.cfg.pair.clone(),
            local: self.cfg.local.clone(),
            epoch: self.epoch,
            active: self.active.clone(),
            phase: self.phase.clone(),
            maintenance: self.maintenance,
            test: self.test.clone(),
            next_id: self.next_id,
            pending: self.pending.clone(),
            newest: self.newest,
            stale_floor: self.stale_floor,
            peer_lost: self.peer_lost,
            peer_receipt: self.peer_receipt.clone(),
            needs_reverse: self.needs_reverse,
            needs_initial: self.needs_initial,
            accept_data_loss: self.accept_data_loss,
        }
    }

    /// The current phase.
    pub fn phase(&self) -> &Phase {
        &self.phase
    }

    /// The configuration.
    pub fn config(&self) -> &PairConfig {
        &self.cfg
    }

    /// Actions asked for and not answered.
    pub fn pending(&self) -> &[Pending] {
        &self.pending
    }

    /// The epoch.
    pub fn epoch(&self) -> Epoch {
        self.epoch
    }

    /// The active node.
    pub fn active(&self) -> &NodeId {
        &self.active
    }

    // ---- helpers shared by the behaviour modules ----

    fn is_active(&self) -> bool {
        self.active == self.cfg.local
    }

    fn local(&self) -> NodeId {
        self.cfg.local.clone()
    }

    fn peer(&self) -> NodeId {
        self.cfg.peer().clone()
    }

    /// Whether the deliberate defect `b` is on.
    fn bug(&self, b: Bug) -> bool {
        #[cfg(feature = "inject-bugs")]
        {
            self.cfg.policy.bugs.has(b)
        }
        #[cfg(not(feature = "inject-bugs"))]
        {
            let _ = b;
            false
        }
    }

    /// Asks for `op`. In maintenance, anything but an observation (or an
    /// operator's end of a test) is held back until maintenance ends: the
    /// one place that keeps invariant 6.
    fn issue(&mut self, op: Op, why: Why) -> ActionId {
        let id = ActionId(self.next_id);
        self.next_id += 1;
        let held = self.maintenance && !allowed_in_maintenance(&op);
        if held {
            self.notice(format!("holding {op} until maintenance ends"));
        } else {
            self.actions.push_back(Action { id, op: op.clone() });
        }
        self.pending.push(Pending { id, op, why, held });
        id
    }

    /// Hands the held actions to the driver (maintenance ended).
    fn release_held(&mut self) {
        for p in self.pending.iter_mut().filter(|p| p.held) {
            p.held = false;
            self.actions.push_back(Action {
                id: p.id,
                op: p.op.clone(),
            });
        }
    }

    /// The peer's phase, if its latest view says it is taking this pair
    /// over from this node (at this epoch) and this node has not fenced it
    /// since: then this node must not start its own copy.
    fn peer_taking_over(&self) -> Option<PhaseName> {
        let (v, _) = self.peer_view.as_ref()?;
        let taking = matches!(
            v.phase,
            PhaseName::Fencing
                | PhaseName::FenceCheck
                | PhaseName::Promoting
                | PhaseName::Starting
                | PhaseName::TakingOver
        );
        (taking && v.epoch == self.epoch && v.active == self.active && !self.peer_lost)
            .then_some(v.phase)
    }

    fn in_flight(&self, f: impl Fn(&Op) -> bool) -> bool {
        self.pending.iter().any(|p| f(&p.op))
    }

    fn observe_local(&mut self, why: Why) {
        let local = self.local();
        if !self.in_flight(|o| matches!(o, Op::Observe { node } if *node == local)) {
            self.issue(Op::Observe { node: local }, why);
        }
    }

    /// Observes the peer's copy, unless an observation for the same reason
    /// is in flight. (One asked for another reason is answered to that
    /// reason: a restart waiting for a receipt behind a suspicion's
    /// observation would wait forever.)
    fn observe_peer(&mut self, why: Why) {
        let peer = self.peer();
        let asked = self
            .pending
            .iter()
            .any(|p| p.why == why && matches!(&p.op, Op::Observe { node } if *node == peer));
        if !asked {
            self.issue(Op::Observe { node: peer }, why);
        }
    }

    fn emit(&mut self, kind: EventKind, cause: impl Into<String>) {
        self.events.push_back(Event {
            at: self.now,
            pair: self.cfg.pair.clone(),
            node: self.cfg.local.clone(),
            kind,
            cause: cause.into(),
        });
    }

    fn notice(&mut self, cause: impl Into<String>) {
        self.emit(EventKind::Notice, cause);
    }

    /// Enters `to`, with an event naming the cause when the phase (or its
    /// reason) changes.
    fn transition(&mut self, to: Phase, cause: impl Into<String>) {
        let from = self.phase.name();
        let changed = from != to.name()
            || matches!((&self.phase, &to), (Phase::Degraded { reason: a }, Phase::Degraded { reason: b }) if a != b)
            || matches!(to, Phase::Blocked { .. });
        self.phase = to;
        if changed {
            self.emit(
                EventKind::Transition {
                    from,
                    to: self.phase.name(),
                },
                cause,
            );
        }
    }

    /// Blocks for an operator. `reason` says what happened and, but for a
    /// split brain (whose way out is always the same, added here), what to
    /// do.
    fn block(&mut self, on: BlockedOn, reason: impl Into<String>) {
        let mut reason = reason.into();
        if on == BlockedOn::SplitBrain {
            reason.push_str(
                "; stand-down on the node whose copy should lose (it is destroyed and resynced), or stop one copy and resume",
            );
        }
        self.timers.fence = Instant::NEVER;
        self.timers.retry = Instant::NEVER;
        self.timers.handover = Instant::NEVER;
        self.timers.confirm = Instant::NEVER;
        self.transition(
            Phase::Blocked {
                on,
                reason: reason.clone(),
            },
            reason,
        );
    }

    /// Age of the newest generation now.
    fn age(&self) -> Option<Duration> {
        self.newest_age.map(|(age, at)| age + (self.now - at))
    }

    fn learn_generation(&mut self, info: GenerationInfo, age: Option<Duration>) {
        let newer = self.newest.is_none_or(|n| info.generation > n.generation);
        if newer {
            self.newest = Some(info);
            self.newest_age = age.map(|a| (a, self.now));
            self.arm_stale_timer();
        } else if self.newest.is_some_and(|n| n.generation == info.generation) && age.is_some() {
            // A fresher reading of the same generation's age.
            self.newest_age = age.map(|a| (a, self.now));
            self.arm_stale_timer();
        }
    }

    fn arm_stale_timer(&mut self) {
        self.timers.stale = match self.newest_age {
            Some((age, at)) if age < self.cfg.policy.data_loss_bound => {
                at + (self.cfg.policy.data_loss_bound - age)
            }
            _ => Instant::NEVER,
        };
    }

    fn is_stale(&self) -> bool {
        self.age()
            .is_some_and(|a| a > self.cfg.policy.data_loss_bound)
    }

    fn on_done(&mut self, id: ActionId, outcome: Outcome) {
        let Some(pos) = self.pending.iter().position(|p| p.id == id) else {
            self.notice(format!("answer for unknown action {id} ignored"));
            return;
        };
        let p = self.pending.remove(pos);
        match outcome {
            Outcome::Unknown => self.on_unknown(p.op, p.why),
            outcome => self.dispatch(p.op, p.why, outcome),
        }
    }

    fn dispatch(&mut self, op: Op, why: Why, outcome: Outcome) {
        if let Why::Reobserve(orig) = why {
            let (orig_op, orig_why) = *orig;
            self.reobserved(outcome, orig_op, orig_why);
            return;
        }
        match op {
            Op::Observe { node } => {
                let r = observed(outcome);
                if node == self.cfg.local {
                    self.on_local_state(r);
                } else {
                    self.on_peer_state(r, &why);
                }
            }
            Op::QueryReplica => match outcome {
                Outcome::Ok(Answer::Replica(r)) => self.on_replica(r, &why),
                other => {
                    let f = failure(other, "query replica");
                    self.on_replica_failed(f, &why);
                }
            },
            Op::InitialSync { .. } | Op::Sync { .. } => self.on_sync_done(outcome, &why),
            Op::ReverseReplication { source, .. } => self.on_reverse_done(source, outcome),
            Op::Verify { .. } => self.on_verify_done(outcome),
            Op::Fence { node } => self.on_fence_done(node, outcome),
            Op::PowerStatus { node } => self.notice(format!("power status of {node}: {outcome:?}")),
            Op::Promote { .. } => self.on_promote_done(outcome),
            Op::StartVm { .. } => self.on_start_done(outcome, &why),
            Op::StopVm { .. } | Op::DestroyVm { .. } => self.on_stopped(outcome, &why),
            Op::StartTestClone { .. } => self.on_test_started(outcome),
            Op::DestroyTestClone { .. } => self.on_test_destroyed(outcome),
        }
    }

    fn on_timers(&mut self) {
        let now = self.now;
        if self.detector.check(now) {
            self.on_suspected();
        }
        if now >= self.timers.monitor {
            self.timers.monitor = now + self.cfg.policy.monitor_interval;
            self.observe_local(Why::Routine);
        }
        if now >= self.timers.sync {
            self.timers.sync = Instant::NEVER;
            self.sync_cycle();
        }
        if now >= self.timers.query {
            self.timers.query = now + self.cfg.policy.sync_interval;
            if !self.in_flight(|o| matches!(o, Op::QueryReplica)) {
                self.issue(Op::QueryReplica, Why::Routine);
            }
        }
        if now >= self.timers.fence {
            self.timers.fence = Instant::NEVER;
            self.fence_now();
        }
        if now >= self.timers.retry {
            self.timers.retry = Instant::NEVER;
            self.retry_now();
        }
        if now >= self.timers.handover {
            self.timers.handover = Instant::NEVER;
            self.handover_expired();
        }
        if now >= self.timers.peer_wait {
            self.timers.peer_wait = Instant::NEVER;
            self.finish_recovery(true);
        }
        if now >= self.timers.confirm {
            self.timers.confirm = Instant::NEVER;
            self.reconfirm();
        }
        if now >= self.timers.stale {
            self.timers.stale = Instant::NEVER;
            self.resettle();
        }
    }
}

/// Ops that may run in maintenance: observations, and destroying a test
/// clone (only ever on an operator's request).
pub fn allowed_in_maintenance(op: &Op) -> bool {
    op.is_observation() || matches!(op, Op::DestroyTestClone { .. })
}

/// Reads an Observe outcome: the state and maybe a receipt, or the failure.
type Observed = Result<(crate::hypervisor::VmState, Option<FenceReceipt>), Failure>;

fn observed(outcome: Outcome) -> Observed {
    match outcome {
        Outcome::Ok(Answer::Observed { state, receipt }) => Ok((state, receipt)),
        other => Err(failure(other, "observe")),
    }
}

/// The failure in an outcome, or one saying the answer did not fit the op.
fn failure(outcome: Outcome, what: &str) -> Failure {
    match outcome {
        Outcome::Failed(f) => f,
        Outcome::Unknown => Failure::new(ErrorKind::Backend, format!("{what}: outcome unknown")),
        Outcome::Ok(a) => Failure::new(
            ErrorKind::Backend,
            format!("{what}: unexpected answer {a:?}"),
        ),
    }
}

fn fmt_dur(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 10_000 {
        format!("{:.1}s", d.as_secs_f64())
    } else {
        humantime::format_duration(Duration::from_secs(d.as_secs())).to_string()
    }
}
