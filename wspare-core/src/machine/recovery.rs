//! Coming back: restoring from the journal, re-observing actions whose
//! outcome is unknown (invariant 7), waiting for the peer's view after a
//! restart, and adopting a newer epoch from the peer.

use super::*;
use crate::error::Error;
use crate::time::UnixMillis;

impl Machine {
    /// Rebuilds a machine from its journaled snapshot at `now` (a new
    /// timeline). Actions that were pending are answered `Unknown`, so the
    /// machine observes before it acts again; steady phases go through
    /// `Recovering`, which waits for the peer's view before deciding.
    pub fn restore(cfg: PairConfig, snap: Snapshot, now: Instant) -> Result<Machine, Error> {
        if snap.pair != cfg.pair || snap.local != cfg.local {
            return Err(Error::invalid(format!(
                "journal snapshot is for pair {} on {}, not pair {} on {}",
                snap.pair, snap.local, cfg.pair, cfg.local
            )));
        }
        if snap.active != cfg.primary && snap.active != cfg.spare {
            return Err(Error::invalid(format!(
                "journal snapshot names {} active, which is not a node of pair {}",
                snap.active, cfg.pair
            )));
        }
        let mut m = Machine::blank(cfg, now, snap.active);
        m.epoch = snap.epoch;
        m.phase = snap.phase;
        m.maintenance = snap.maintenance;
        m.test = snap.test;
        m.next_id = snap.next_id;
        m.newest = snap.newest;
        m.stale_floor = snap.stale_floor;
        m.peer_lost = snap.peer_lost;
        m.peer_receipt = snap.peer_receipt;
        m.needs_reverse = snap.needs_reverse;
        m.needs_initial = snap.needs_initial;
        m.accept_data_loss = snap.accept_data_loss;
        m.timers.monitor = now + m.cfg.policy.monitor_interval;
        m.notice(format!(
            "restored from the journal in phase {} at epoch {}",
            m.phase.name(),
            m.epoch
        ));
        let mut unknown = Vec::new();
        for p in snap.pending {
            if p.held {
                // Never handed to the driver: it did not run.
                m.pending.push(p);
            } else {
                unknown.push(p);
            }
        }
        if !m.maintenance {
            m.release_held();
        }
        match m.phase.clone() {
            p if p.is_steady() || p == Phase::Suspect || p == Phase::Recovering => {
                m.enter_recovering("restarted from the journal".into())
            }
            // An active node that was fencing its lost spare, restarting its
            // VM in place, or handing the pair over (short of the offer):
            // while it was down, the spare may have fenced it and taken
            // over. Find out first (its own copy, the peer's view), as from
            // a steady phase, instead of carrying on at a stale epoch.
            Phase::Fencing {
                failover: false, ..
            }
            | Phase::Restarting { .. }
            | Phase::HandingOver {
                step:
                    HandoverStep::Stop
                    | HandoverStep::FinalSync
                    | HandoverStep::Verify
                    | HandoverStep::Abort,
                ..
            } => m.enter_recovering(
                "restarted from the journal; the peer may have taken over meanwhile".into(),
            ),
            // A spare fencing the active node. The suspicion that led here
            // is not journaled and the restored detector holds none, so no
            // heartbeat could call the fence off: suspect again, so that a
            // peer that answers (this node was the one cut off, and fenced)
            // clears it as during the delay, and a silent one is fenced.
            Phase::Fencing { .. } if !unknown.iter().any(|p| matches!(p.op, Op::Fence { .. })) => {
                m.timers.fence = now + m.cfg.peer_fence_delay;
                m.detector.suspect();
            }
            Phase::Fencing { .. } => m.detector.suspect(),
            // A spare in the middle of a failover: the peer was fenced, and
            // so was suspected; a restored detector must not trust it
            // before it is heard (then its copy is observed afresh before
            // the start, see `start_spare`).
            Phase::FenceCheck { .. }
            | Phase::Promoting {
                takeover: false, ..
            } => {
                m.detector.suspect();
                if unknown.is_empty() {
                    m.timers.retry = now;
                }
            }
            Phase::Starting { .. } if m.peer_lost => {
                m.detector.suspect();
                if unknown.is_empty() {
                    m.timers.retry = now;
                }
            }
            Phase::HandingOver {
                step: HandoverStep::Offered,
                ..
            } => {
                m.timers.handover = now + m.cfg.policy.handover_timeout;
            }
            Phase::Blocked { .. } => {}
            _ if unknown.is_empty() => m.timers.retry = now,
            _ => {}
        }
        for p in unknown {
            m.notice(format!(
                "outcome of {} ({}) unknown after the restart; observing first",
                p.op, p.id
            ));
            m.on_unknown(p.op, p.why);
        }
        Ok(m)
    }

    pub(super) fn enter_recovering(&mut self, cause: String) {
        self.recover_since = self.now;
        self.recover_local = None;
        self.transition(Phase::Recovering, cause);
        self.observe_local(Why::Recover);
        self.timers.peer_wait = self.now + self.cfg.policy.peer_wait;
    }

    /// Leaves `Recovering` once the local copy was observed and the peer's
    /// view arrived (or `peer_wait` passed without it).
    pub(super) fn finish_recovery(&mut self, deadline_passed: bool) {
        if self.phase != Phase::Recovering {
            return;
        }
        let Some(local_state) = self.recover_local else {
            if deadline_passed {
                self.observe_local(Why::Recover);
                self.timers.peer_wait = self.now + self.cfg.policy.peer_wait;
            }
            return;
        };
        let peer_seen = self
            .peer_view
            .as_ref()
            .is_some_and(|(_, t)| *t >= self.recover_since);
        if !peer_seen && !deadline_passed {
            return;
        }
        self.timers.peer_wait = Instant::NEVER;
        let (local, peer) = (self.local(), self.peer());
        if self.is_active() {
            if local_state.is_live() {
                let how = if peer_seen {
                    format!("{peer} agrees")
                } else {
                    format!("no word from {peer}")
                };
                self.settle(format!(
                    "recovered: the VM is {local_state} on {local}; {how}"
                ));
            } else if let Some(phase) = self.peer_taking_over() {
                // The peer is failing this node over: wait for its epoch.
                self.notice(format!(
                    "the VM is {local_state} here and {peer} is taking the pair over ({phase}); waiting for it"
                ));
                self.timers.peer_wait = self.now + self.cfg.policy.peer_wait;
            } else if peer_seen {
                // Only the peer's view says it did not take over: a peer
                // lost before this node went down may have come back since.
                self.settle(format!("recovered as active; the VM is {local_state}"));
                if self.phase.is_steady() {
                    self.on_local_down(local_state);
                }
            } else if self.bug(Bug::StartStalePrimary) {
                let r = FenceReceipt::from_operator(peer, UnixMillis(0));
                self.phase = Phase::Restarting {
                    receipt: Some(r),
                    destroy_first: false,
                    receipt_tries: 0,
                };
                self.restart_step();
            } else {
                let reason = format!(
                    "restarted with the VM {local_state} on {local} and no word from {peer} for {}; {peer} may have taken over with newer data: confirm-down {peer} to start the VM here",
                    humantime::format_duration(self.cfg.policy.peer_wait)
                );
                self.block(BlockedOn::NoPeerContact { peer }, reason);
            }
        } else if local_state.is_live() && !self.maintenance {
            let reason = format!(
                "the VM is {local_state} on {local}, which is the spare ({} is active, epoch {}): two copies may run",
                self.active, self.epoch
            );
            self.block(BlockedOn::SplitBrain, reason);
        } else {
            self.settle(format!("recovered as spare of {}", self.active));
        }
    }

    /// The peer's view carries a newer epoch: it took over (or was handed
    /// the pair). A copy that was active here is stale from now on.
    pub(super) fn adopt(&mut self, v: &PeerView) {
        if v.active == self.cfg.local {
            // Only this node can make itself active (by promoting, journaled
            // before it starts); a peer saying so is confused, not evidence.
            self.notice(format!(
                "{} claims this node is active at epoch {}; ignored (this node is at {})",
                self.peer(),
                v.epoch,
                self.epoch
            ));
            return;
        }
        let was_active = self.is_active();
        self.yield_to(v);
        if let Some(g) = v.newest {
            self.learn_generation(g, v.newest_age);
        }
        self.last_sync_error = None;
        self.timers.handover = Instant::NEVER;
        self.timers.sync = Instant::NEVER;
        self.timers.retry = Instant::NEVER;
        self.timers.fence = Instant::NEVER;
        if self.phase == Phase::Recovering
            || !was_active && matches!(self.phase, Phase::Blocked { .. })
        {
            return;
        }
        let cause = format!(
            "{} took over at epoch {}; the copy here is stale and will be resynced, never started",
            self.active, self.epoch
        );
        self.transition(Phase::Stale, cause);
        self.arm_steady_timers();
        self.observe_local(Why::Routine);
    }

    /// Takes the peer's claim (its epoch and active node), as a newer epoch
    /// or an operator's stand-down calls for: the copy here is stale until
    /// a generation newer than the peer's (or this node's) newest arrives.
    pub(super) fn yield_to(&mut self, v: &PeerView) {
        self.epoch = self.epoch.max(v.epoch);
        self.active = v.active.clone();
        self.stale_floor = Some(
            v.newest
                .or(self.newest)
                .map(|g| g.generation)
                .unwrap_or_default(),
        );
        self.peer_lost = false;
        self.peer_receipt = None;
        self.needs_reverse = false;
        self.needs_initial = false;
        self.restarts.clear();
    }

    /// An action's outcome is unknown: observe first (invariant 7).
    pub(super) fn on_unknown(&mut self, op: Op, why: Why) {
        if self.bug(Bug::RepeatUnknownAction) && !op.is_observation() {
            self.issue(op, why);
            return;
        }
        let orig = Why::Reobserve(Box::new((op.clone(), why.clone())));
        match op {
            Op::Observe { .. } | Op::QueryReplica | Op::PowerStatus { .. } | Op::Verify { .. } => {
                // Asked again, unless the same question is pending already
                // (a restart's own observation): repeated restarts must not
                // pile up twins.
                if !self.pending.iter().any(|p| p.op == op && p.why == why) {
                    self.issue(op, why);
                }
            }
            Op::Sync { .. }
            | Op::InitialSync { .. }
            | Op::ReverseReplication { .. }
            | Op::Promote { .. } => {
                self.issue(Op::QueryReplica, orig);
            }
            Op::Fence { node } => {
                self.issue(Op::PowerStatus { node }, orig);
            }
            Op::StartVm { node, .. } | Op::StopVm { node, .. } | Op::DestroyVm { node } => {
                self.issue(Op::Observe { node }, orig);
            }
            Op::StartTestClone { node, label, .. } => {
                self.notice(format!(
                    "test clone {label} state unknown after the restart; destroying it"
                ));
                self.issue(Op::DestroyTestClone { node, label }, Why::Routine);
            }
            // Idempotent by contract, and nothing can observe a clone.
            Op::DestroyTestClone { .. } => {
                self.issue(op, why);
            }
        }
    }

    /// The observation standing in for an unknown outcome answered: turn it
    /// into the original action's outcome, or repeat the action now that its
    /// effect is known to be missing.
    pub(super) fn reobserved(&mut self, outcome: Outcome, op: Op, why: Why) {
        match &op {
            Op::Sync { .. } | Op::InitialSync { .. } => {
                let before = self.newest.map(|n| n.generation);
                if let Outcome::Ok(Answer::Replica(r)) = outcome {
                    self.on_replica(r, &Why::Routine);
                }
                let after = self.newest;
                let synthetic = match after {
                    Some(info) if Some(info.generation) > before => {
                        Outcome::Ok(Answer::Generation {
                            info,
                            age: self.age().unwrap_or_default(),
                        })
                    }
                    _ => Outcome::failed(
                        ErrorKind::Backend,
                        "sync interrupted by a restart; no new generation on the target",
                    ),
                };
                self.dispatch(op, why, synthetic);
            }
            Op::ReverseReplication { source, .. } => match outcome {
                Outcome::Ok(Answer::Replica(r)) if r.source == *source => {
                    self.dispatch(op, why, Outcome::Ok(Answer::Done))
                }
                _ => {
                    self.issue(op, why);
                }
            },
            Op::Promote { .. } => {
                if let Outcome::Ok(Answer::Replica(r)) = outcome {
                    self.on_replica(r, &Why::Routine);
                }
                self.issue(op, why);
            }
            Op::Fence { node } => {
                let synthetic = match outcome {
                    Outcome::Ok(Answer::Power {
                        receipt: Some(r), ..
                    }) => Outcome::Ok(Answer::Fenced(r)),
                    Outcome::Ok(Answer::Power { state, .. }) => Outcome::failed(
                        ErrorKind::Backend,
                        format!("fencing {node} was interrupted by a restart; it reads {state}"),
                    ),
                    other => Outcome::Failed(failure(other, "power status")),
                };
                let node = node.clone();
                self.on_fence_done(node, synthetic);
            }
            Op::StartVm { .. } => {
                let synthetic = match observed(outcome) {
                    Ok((s, _)) if s.is_live() => Outcome::Ok(Answer::Done),
                    Ok((s, _)) => Outcome::failed(
                        ErrorKind::Backend,
                        format!("start interrupted by a restart; the VM is {s}"),
                    ),
                    Err(f) => Outcome::Failed(f),
                };
                self.dispatch(op, why, synthetic);
            }
            Op::StopVm { .. } | Op::DestroyVm { .. } => match observed(outcome) {
                Ok((_, Some(r))) => self.dispatch(op, why, Outcome::Ok(Answer::Stopped(r))),
                Ok(_) => {
                    self.issue(op, why);
                }
                Err(f) => self.dispatch(op, why, Outcome::Failed(f)),
            },
            _ => self.dispatch(op, why, outcome),
        }
    }
}
