//! The steady state: heartbeats and views, monitoring the local copy,
//! replication cycles, and the protected / degraded / unprotected /
//! resyncing / stale evaluation.

use super::*;

impl Machine {
    /// Arms the periodic timers of the current role, keeping armed ones.
    pub(super) fn arm_steady_timers(&mut self) {
        let now = self.now;
        if self.timers.monitor == Instant::NEVER {
            self.timers.monitor = now + self.cfg.policy.monitor_interval;
        }
        if self.is_active() {
            self.timers.query = Instant::NEVER;
            if self.timers.sync == Instant::NEVER && !self.replicating() {
                self.timers.sync = now;
            }
        } else {
            self.timers.sync = Instant::NEVER;
            if self.timers.query == Instant::NEVER {
                self.timers.query = now;
            }
        }
    }

    pub(super) fn on_heartbeat(&mut self, from: NodeId, view: Option<PeerView>) {
        if from != *self.cfg.peer() {
            return;
        }
        let cleared = self.detector.heartbeat(self.now);
        if let Some(v) = view {
            self.on_peer_view(v);
        }
        if cleared {
            self.on_trusted();
        }
    }

    fn on_peer_view(&mut self, v: PeerView) {
        if v.active != self.cfg.primary && v.active != self.cfg.spare {
            self.notice(format!(
                "view from {} names {} active, which is not in the pair; ignored",
                self.peer(),
                v.active
            ));
            return;
        }
        if v.epoch > self.epoch && !self.bug(Bug::IgnoreGeneration) {
            self.adopt(&v);
        } else if v.epoch == self.epoch
            && v.active != self.active
            && !matches!(self.phase, Phase::Blocked { .. })
        {
            let reason = format!(
                "{} says {} is active at epoch {}, this node says {}: two copies may run",
                self.peer(),
                v.active,
                v.epoch,
                self.active
            );
            self.block(BlockedOn::SplitBrain, reason);
        }
        if v.epoch == self.epoch && v.active == self.active {
            if let Some(g) = v.newest {
                self.learn_generation(g, v.newest_age);
            }
            if let Some(g) = v.handover {
                if !self.is_active() {
                    self.begin_takeover(g);
                }
            }
        }
        let acking = matches!(
            v.phase,
            PhaseName::TakingOver | PhaseName::Promoting | PhaseName::Starting
        );
        self.peer_view = Some((v, self.now));
        if acking
            && matches!(
                self.phase,
                Phase::HandingOver {
                    step: HandoverStep::Offered,
                    ..
                }
            )
        {
            self.timers.handover = self.now + self.cfg.policy.handover_timeout;
        }
        match self.phase {
            Phase::Recovering => self.finish_recovery(false),
            _ if self.is_active() && self.peer_lost && !self.detector.is_suspected() => {
                self.peer_returned()
            }
            _ => self.resettle(),
        }
    }

    /// The detector trusts the peer again.
    fn on_trusted(&mut self) {
        let peer = self.peer();
        match &self.phase {
            Phase::Suspect => self.settle(format!("heartbeats from {peer} resumed")),
            Phase::Fencing { .. } if !self.in_flight(|o| matches!(o, Op::Fence { .. })) => {
                self.timers.fence = Instant::NEVER;
                self.settle(format!(
                    "heartbeats from {peer} resumed before it was fenced"
                ))
            }
            _ if self.is_active() && self.peer_lost => self.peer_returned(),
            _ => self.resettle(),
        }
    }

    /// The lost spare is back: resync it.
    fn peer_returned(&mut self) {
        if !self.phase.is_steady() {
            return;
        }
        self.peer_lost = false;
        self.peer_receipt = None;
        self.last_sync_error = None;
        let peer = self.peer();
        self.timers.sync = Instant::NEVER;
        self.settle(format!("{peer} is back; replicating to it"));
    }

    pub(super) fn on_local_state(&mut self, r: Observed) {
        let state = match &r {
            Ok((s, _)) => Some(*s),
            Err(f) => {
                self.notice(format!("cannot observe the VM on {}: {f}", self.cfg.local));
                None
            }
        };
        if let Phase::Recovering = self.phase {
            match state {
                Some(s) => {
                    self.recover_local = Some(s);
                    self.finish_recovery(false);
                }
                None => self.timers.retry = self.now + self.cfg.policy.retry_backoff,
            }
            return;
        }
        let Some(s) = state else { return };
        if self.maintenance {
            return;
        }
        let steady = self.phase.is_steady();
        if self.is_active() {
            if (steady || matches!(self.phase, Phase::Suspect)) && !s.is_live() {
                self.on_local_down(s);
            }
        } else if (steady || matches!(self.phase, Phase::Suspect)) && s.is_live() {
            let reason = format!(
                "the VM is {s} on {}, which is the spare ({} is active, epoch {}): two copies may run",
                self.cfg.local, self.active, self.epoch
            );
            self.block(BlockedOn::SplitBrain, reason);
        }
    }

    pub(super) fn on_peer_state(&mut self, r: Observed, why: &Why) {
        match why {
            Why::Confirm => self.on_confirm(r),
            Why::FenceCheck => self.on_fence_check(r),
            Why::PeerReceipt => self.on_peer_receipt(r),
            _ => {}
        }
    }

    pub(super) fn on_replica(&mut self, r: ReplicaReport, why: &Why) {
        if r.target != self.active {
            if let Some(g) = r.newest {
                if self.newest.is_some_and(|n| g.generation < n.generation) {
                    self.notice(format!(
                        "replicator reports {} on {}, older than {} known; keeping {}",
                        g.generation,
                        r.target,
                        self.newest.map(|n| n.generation).unwrap_or_default(),
                        self.newest.map(|n| n.generation).unwrap_or_default()
                    ));
                } else {
                    self.learn_generation(g, r.age);
                }
            }
        }
        if *why == Why::PreFailover {
            self.decide_failover();
        } else {
            self.resettle();
        }
    }

    pub(super) fn on_replica_failed(&mut self, f: Failure, why: &Why) {
        self.notice(format!("reading the replica's status failed: {f}"));
        if *why == Why::PreFailover {
            self.decide_failover();
        }
    }

    /// Whether a sync, initial sync or reverse is in flight.
    fn replicating(&self) -> bool {
        self.in_flight(|o| {
            matches!(
                o,
                Op::Sync { .. } | Op::InitialSync { .. } | Op::ReverseReplication { .. }
            )
        })
    }

    /// The sync timer: one replication cycle, if this node drives them now.
    pub(super) fn sync_cycle(&mut self) {
        let interval = self.cfg.policy.sync_interval;
        let drives = self.is_active()
            && !self.maintenance
            && !self.peer_lost
            && matches!(
                self.phase,
                Phase::Seeding | Phase::Protected | Phase::Degraded { .. } | Phase::Resyncing
            );
        if !drives || self.detector.is_suspected() {
            if self.is_active() {
                self.timers.sync = self.now + interval;
            }
            return;
        }
        if self.replicating() {
            return;
        }
        let (source, target) = (self.local(), self.peer());
        if self.needs_reverse {
            self.issue(Op::ReverseReplication { source, target }, Why::Routine);
        } else if self.newest.is_none() || self.needs_initial {
            self.issue(Op::InitialSync { source, target }, Why::Routine);
        } else {
            self.issue(Op::Sync { source, target }, Why::Routine);
        }
    }

    pub(super) fn on_reverse_done(&mut self, source: NodeId, outcome: Outcome) {
        match outcome {
            Outcome::Ok(_) => {
                self.needs_reverse = false;
                self.notice(format!(
                    "replication reversed: {source} -> {}",
                    self.cfg.other(&source)
                ));
                self.sync_cycle();
            }
            other => {
                let f = failure(other, "reverse replication");
                self.notice(format!("reversing replication failed: {f}"));
                self.last_sync_error = Some(f);
                self.timers.sync = self.now + self.cfg.policy.retry_backoff;
                self.resettle();
            }
        }
    }

    pub(super) fn on_sync_done(&mut self, outcome: Outcome, why: &Why) {
        if *why == Why::Handover {
            self.handover_synced(outcome);
            return;
        }
        if !self.is_active() {
            return;
        }
        self.timers.sync = self.now + self.cfg.policy.sync_interval;
        match outcome {
            Outcome::Ok(Answer::Generation { info, age }) => {
                if self.newest.is_some_and(|n| info.generation <= n.generation) {
                    self.notice(format!(
                        "sync answered {}, not newer than {} known; ignored",
                        info.generation,
                        self.newest.map(|n| n.generation).unwrap_or_default()
                    ));
                } else {
                    self.learn_generation(info, Some(age));
                }
                self.needs_initial = false;
                self.last_sync_error = None;
                self.resettle();
            }
            other => {
                let f = failure(other, "sync");
                self.timers.sync = self.now
                    + self
                        .cfg
                        .policy
                        .retry_backoff
                        .min(self.cfg.policy.sync_interval);
                self.last_sync_error = Some(f);
                self.resettle();
            }
        }
    }

    /// The steady phase the facts call for. A stale copy that got a
    /// generation newer than its floor is stale no more.
    fn steady_target(&mut self) -> Phase {
        if self
            .stale_floor
            .is_some_and(|f| self.newest.is_some_and(|n| n.generation > f))
        {
            self.stale_floor = None;
        }
        let bound = humantime::format_duration(self.cfg.policy.data_loss_bound);
        let stale_reason = |g: Generation| {
            format!("newest generation {g} is older than the data-loss bound ({bound})")
        };
        if self.is_active() {
            if self.peer_lost {
                return Phase::Unprotected;
            }
            if self.newest.is_none() {
                return Phase::Seeding;
            }
            if self.needs_reverse || self.needs_initial {
                return Phase::Resyncing;
            }
            let reason = if self.detector.is_suspected() {
                Some(format!("no heartbeat from {}", self.peer()))
            } else if let Some(f) = &self.last_sync_error {
                Some(format!(
                    "replication to {} failing: {}",
                    self.peer(),
                    f.message
                ))
            } else if self.is_stale() {
                self.newest.map(|n| stale_reason(n.generation))
            } else {
                None
            };
            match reason {
                Some(reason) => Phase::Degraded { reason },
                None => Phase::Protected,
            }
        } else {
            if let Some(floor) = self.stale_floor {
                if self.newest.is_none_or(|n| n.generation <= floor) {
                    return Phase::Stale;
                }
            }
            match self.newest {
                None => Phase::Seeding,
                Some(n) if self.is_stale() => Phase::Degraded {
                    reason: stale_reason(n.generation),
                },
                Some(_) => Phase::Protected,
            }
        }
    }

    fn steady_cause(&self, to: &Phase) -> String {
        match to {
            Phase::Degraded { reason } => reason.clone(),
            Phase::Protected => match self.newest {
                Some(n) => format!(
                    "complete generation {} on {}",
                    n.generation,
                    self.cfg.other(&self.active)
                ),
                None => "protected".into(),
            },
            Phase::Unprotected => format!("{} is down; no spare", self.peer()),
            Phase::Resyncing => format!("resyncing {}", self.peer()),
            Phase::Stale => "the copy here is stale".into(),
            Phase::Seeding => "waiting for the first complete generation".into(),
            _ => String::new(),
        }
    }

    /// Enters the steady phase the facts call for, from any phase.
    pub(super) fn settle(&mut self, cause: impl Into<String>) {
        self.retries = 0;
        self.suspect_confirmed = None;
        let to = self.steady_target();
        self.transition(to, cause);
        self.arm_steady_timers();
        if self.detector.is_suspected() && !self.maintenance {
            self.on_suspected();
        }
    }

    /// In a steady phase, moves to the steady phase the facts now call for.
    pub(super) fn resettle(&mut self) {
        if !self.phase.is_steady() {
            return;
        }
        let to = self.steady_target();
        if to != self.phase {
            let cause = self.steady_cause(&to);
            self.transition(to, cause);
            self.arm_steady_timers();
        }
    }

    pub(super) fn on_witness(&mut self, node: NodeId, alive: bool) {
        if node != self.peer() {
            return;
        }
        self.witness = Some((alive, self.now));
        if !alive && matches!(self.phase, Phase::Suspect) {
            if let Some(how) = self.suspect_confirmed.clone() {
                self.confirmed(format!("{how}, and the witness cannot reach it"));
            }
        }
    }
}
