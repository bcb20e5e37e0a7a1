//! Failover: suspicion, second-channel confirmation, the data-loss check,
//! fencing with delay and backoff, the post-fence check, promotion and start.

use super::*;
use crate::time::UnixMillis;

impl Machine {
    /// The detector just suspected the peer.
    pub(super) fn on_suspected(&mut self) {
        let peer = self.peer();
        let silence = self.silence();
        if self.maintenance {
            self.notice(format!(
                "no heartbeat from {peer} {silence}; maintenance is on, not acting"
            ));
            return;
        }
        // A peer already fenced (or failed over from) is known down.
        if !self.phase.is_steady() || (self.is_active() && self.peer_lost) {
            return;
        }
        self.suspect_since = self.now;
        self.suspect_confirmed = None;
        let phi = self.detector.phi(self.now);
        let phi = if phi.is_finite() {
            format!("{phi:.1}")
        } else {
            "inf".into()
        };
        let role = if self.is_active() {
            "spare"
        } else {
            "active node"
        };
        self.transition(
            Phase::Suspect,
            format!("no heartbeat from {role} {peer} {silence} (phi {phi}); asking its hypervisor"),
        );
        self.observe_peer(Why::Confirm);
    }

    /// "for 4.2s", or "since this node started" when none ever came.
    fn silence(&self) -> String {
        match self.detector.silence(self.now) {
            Some(d) => format!("for {}", fmt_dur(d)),
            None => "since this node started".into(),
        }
    }

    /// The confirm timer: ask the second channel again while holding.
    pub(super) fn reconfirm(&mut self) {
        if matches!(self.phase, Phase::Suspect) && self.detector.is_suspected() && !self.maintenance
        {
            if let Some(how) = self.suspect_confirmed.clone() {
                // Waiting for the witness: check whether it spoke meanwhile.
                self.second_channel_down(how);
            } else {
                self.observe_peer(Why::Confirm);
            }
        }
    }

    pub(super) fn on_confirm(&mut self, r: Observed) {
        if !matches!(self.phase, Phase::Suspect) || !self.detector.is_suspected() {
            return;
        }
        let peer = self.peer();
        let hold = self.now + self.cfg.policy.retry_backoff;
        match r {
            Ok((s, _)) if s.is_live() => {
                if self.is_active() {
                    let reason = format!(
                        "no heartbeat from spare {peer}, and its hypervisor reports the VM {s} there: two copies may run"
                    );
                    self.block(BlockedOn::SplitBrain, reason);
                } else {
                    self.notice(format!(
                        "no heartbeat from {peer}, but its hypervisor reports the VM {s}: holding, not failing over"
                    ));
                    self.timers.confirm = hold;
                }
            }
            Ok((s, _)) => {
                if self.is_active() {
                    self.notice(format!(
                        "no heartbeat from spare {peer}, but its hypervisor answers and its copy is {s}: not fencing"
                    ));
                    self.timers.confirm = hold;
                } else {
                    self.second_channel_down(format!("its hypervisor reports the VM {s}"));
                }
            }
            Err(f) => {
                self.second_channel_down(format!("its hypervisor does not answer ({})", f.message))
            }
        }
    }

    /// The second channel agrees the peer is down; ask the witness if there is one.
    fn second_channel_down(&mut self, how: String) {
        let peer = self.peer();
        self.suspect_confirmed = Some(how.clone());
        if self.cfg.witness {
            match self.witness {
                Some((false, t)) if t >= self.suspect_since => {
                    return self.confirmed(format!("{how}, and the witness cannot reach it"));
                }
                Some((true, t)) if t >= self.suspect_since => {
                    self.notice(format!(
                        "{peer} is silent and {how}, but the witness still reaches it: this node may be the isolated one; holding"
                    ));
                }
                _ => self.notice(format!(
                    "{peer} is silent and {how}; waiting for the witness"
                )),
            }
            self.timers.confirm = self.now + self.cfg.policy.retry_backoff;
            return;
        }
        self.confirmed(how);
    }

    /// Both channels say the peer is down.
    pub(super) fn confirmed(&mut self, how: String) {
        let peer = self.peer();
        let silence = self.silence();
        let cause = format!("no heartbeat from {peer} {silence} and {how}");
        self.suspect_confirmed = Some(cause.clone());
        if self.is_active() {
            self.start_fencing(peer, false, format!("spare lost: {cause}"));
        } else {
            // Read the replica first: the newest generation here decides.
            self.issue(Op::QueryReplica, Why::PreFailover);
        }
    }

    /// After the pre-failover replica read: fence, or block on the data.
    pub(super) fn decide_failover(&mut self) {
        if !matches!(self.phase, Phase::Suspect) {
            return;
        }
        let active = self.active.clone();
        let cause = self.suspect_confirmed.clone().unwrap_or_default();
        if let Some(floor) = self.stale_floor {
            let reason = format!(
                "{cause}; but the copy here went stale when {active} took over from {floor} and was not resynced since: it is never started; bring {active} back up"
            );
            return self.block(BlockedOn::StaleReplica, reason);
        }
        let Some(newest) = self.newest else {
            let reason = format!(
                "{cause}; but there is no complete generation here to start from; bring {active} back up"
            );
            return self.block(BlockedOn::NoGeneration, reason);
        };
        if self.is_stale() && !self.cfg.policy.allow_stale_failover && !self.accept_data_loss {
            let age = self.age().map(fmt_dur).unwrap_or_default();
            let reason = format!(
                "{cause}; but the newest generation here, {}, is {age} old, over the data-loss bound {}: resume with accept-data-loss to fail over anyway",
                newest.generation,
                humantime::format_duration(self.cfg.policy.data_loss_bound)
            );
            return self.block(BlockedOn::StaleReplica, reason);
        }
        self.accept_data_loss = false;
        if self.bug(Bug::SkipFence) {
            let r = FenceReceipt::from_operator(active, UnixMillis(0));
            return self.begin_promote(r, cause);
        }
        self.start_fencing(active, true, cause);
    }

    fn start_fencing(&mut self, target: NodeId, failover: bool, cause: String) {
        let delay = self.cfg.peer_fence_delay;
        let cause = if delay.is_zero() {
            format!("{cause}; fencing {target}")
        } else {
            format!(
                "{cause}; fencing {target} after its fence delay of {}",
                fmt_dur(delay)
            )
        };
        self.transition(
            Phase::Fencing {
                target,
                attempt: 0,
                failover,
            },
            cause,
        );
        if delay.is_zero() {
            self.fence_now();
        } else {
            self.timers.fence = self.now + delay;
        }
    }

    /// The fence timer: ask for the fence.
    pub(super) fn fence_now(&mut self) {
        let Phase::Fencing { target, .. } = &self.phase else {
            return;
        };
        let target = target.clone();
        if !self.in_flight(|o| matches!(o, Op::Fence { .. })) {
            self.issue(Op::Fence { node: target }, Why::Routine);
        }
    }

    pub(super) fn on_fence_done(&mut self, node: NodeId, outcome: Outcome) {
        let Phase::Fencing {
            target,
            attempt,
            failover,
        } = self.phase.clone()
        else {
            self.notice(format!("late answer to fencing {node} ignored"));
            return;
        };
        match outcome {
            Outcome::Ok(Answer::Fenced(r)) if r.covers(&target, &self.cfg.vm) => {
                self.fenced(target, failover, r)
            }
            other => {
                let f = match other {
                    Outcome::Ok(a) => Failure::new(
                        ErrorKind::Backend,
                        format!("the fencer answered {a:?}, not a receipt for {target}"),
                    ),
                    o => failure(o, "fence"),
                };
                self.fence_failed(target, attempt, failover, f);
            }
        }
    }

    fn fenced(&mut self, target: NodeId, failover: bool, r: FenceReceipt) {
        if !failover {
            self.peer_lost = true;
            self.peer_receipt = Some(r.clone());
            return self.settle(format!("fenced spare {target}: {r}"));
        }
        if self.bug(Bug::TrustLyingFencer) {
            return self.begin_promote(r.clone(), format!("fenced {target}: {r}"));
        }
        self.transition(
            Phase::FenceCheck { receipt: r.clone() },
            format!("fenced {target}: {r}; checking that its VM is gone"),
        );
        self.observe_peer(Why::FenceCheck);
    }

    fn fence_failed(&mut self, target: NodeId, attempt: u32, failover: bool, f: Failure) {
        let n = attempt + 1;
        let p = &self.cfg.policy;
        if !f.retryable || n >= p.fence_attempts {
            let reason = format!(
                "fencing {target} failed {n} time(s), last: {f}; make sure {target} is off, then confirm-down {target} (or resume to try again)"
            );
            return self.block(BlockedOn::FenceFailed { target }, reason);
        }
        let backoff = p
            .fence_backoff
            .saturating_mul(1 << (n - 1).min(16))
            .min(p.fence_backoff_max);
        self.phase = Phase::Fencing {
            target: target.clone(),
            attempt: n,
            failover,
        };
        self.notice(format!(
            "fence attempt {n} of {target} failed: {f}; retrying in {}",
            fmt_dur(backoff)
        ));
        self.timers.fence = self.now + backoff;
    }

    pub(super) fn on_fence_check(&mut self, r: Observed) {
        let Phase::FenceCheck { receipt } = self.phase.clone() else {
            return;
        };
        let peer = self.peer();
        match r {
            Ok((s, _)) if s.is_live() => {
                let reason = format!(
                    "{receipt}, but {peer}'s hypervisor still reports the VM {s}: the fence device may be lying; make sure {peer} is off, then confirm-down {peer}"
                );
                self.block(BlockedOn::LyingFencer { target: peer }, reason);
            }
            Ok((s, _)) => {
                self.begin_promote(receipt, format!("{peer} is fenced and its VM is {s}"))
            }
            Err(f) => self.begin_promote(
                receipt,
                format!(
                    "{peer} is fenced and its hypervisor is gone ({})",
                    f.message
                ),
            ),
        }
    }

    /// Promotes the newest generation, with proof the other copy is off.
    pub(super) fn begin_promote(&mut self, receipt: FenceReceipt, cause: String) {
        match self.newest {
            Some(n) => self.begin_promote_gen(receipt, n.generation, false, cause),
            None => {
                let reason = format!(
                    "{cause}; but there is no complete generation on {} to start from; bring {} back up",
                    self.cfg.local, self.active
                );
                self.block(BlockedOn::NoGeneration, reason)
            }
        }
    }

    pub(super) fn begin_promote_gen(
        &mut self,
        receipt: FenceReceipt,
        g: Generation,
        takeover: bool,
        cause: String,
    ) {
        if let Some(t) = self.test.clone() {
            self.notice(format!(
                "destroying test clone {} before taking over",
                t.label
            ));
            self.issue(
                Op::DestroyTestClone {
                    node: self.local(),
                    label: t.label,
                },
                Why::Routine,
            );
        }
        let local = self.local();
        self.transition(
            Phase::Promoting {
                receipt: receipt.clone(),
                generation: g,
                takeover,
            },
            format!("{cause}; promoting {g} on {local}"),
        );
        self.issue(
            Op::Promote {
                node: local.clone(),
                generation: g,
            },
            Why::Routine,
        );
        if self.bug(Bug::StartBeforePromote) {
            self.become_active(takeover, &receipt);
            self.phase = Phase::Starting {
                receipt: receipt.clone(),
                generation: g,
                attempt: 0,
            };
            self.issue(
                Op::StartVm {
                    node: local,
                    receipt,
                    generation: Some(g),
                },
                Why::Routine,
            );
        }
    }

    /// This node takes the active role at the next epoch.
    fn become_active(&mut self, takeover: bool, receipt: &FenceReceipt) {
        self.epoch = self.epoch.next();
        self.active = self.local();
        self.needs_reverse = true;
        self.needs_initial = !takeover;
        self.peer_lost = !takeover;
        self.peer_receipt = (!takeover).then(|| receipt.clone());
        self.stale_floor = None;
        self.restarts.clear();
        self.last_sync_error = None;
    }

    pub(super) fn on_promote_done(&mut self, outcome: Outcome) {
        let Phase::Promoting {
            receipt,
            generation,
            takeover,
        } = self.phase.clone()
        else {
            return;
        };
        match outcome {
            Outcome::Ok(Answer::Promoted(info)) => {
                self.learn_generation(info, None);
                self.become_active(takeover, &receipt);
                let local = self.local();
                self.transition(
                    Phase::Starting {
                        receipt: receipt.clone(),
                        generation,
                        attempt: 0,
                    },
                    format!(
                        "promoted {generation} on {local}; {local} is active at epoch {}",
                        self.epoch
                    ),
                );
                self.start_spare(receipt, generation);
            }
            other => {
                let f = failure(other, "promote");
                self.retries += 1;
                if f.retryable && self.retries < self.cfg.policy.fence_attempts {
                    self.notice(format!("promoting {generation} failed: {f}; retrying"));
                    self.timers.retry = self.now + self.cfg.policy.retry_backoff;
                } else {
                    let reason = format!(
                        "promoting {generation} on {} failed: {f}; resume to try the failover again",
                        self.cfg.local
                    );
                    self.block(BlockedOn::StartFailed, reason);
                }
            }
        }
    }

    pub(super) fn on_start_done(&mut self, outcome: Outcome, why: &Why) {
        match self.phase.clone() {
            Phase::Starting {
                receipt,
                generation,
                attempt,
            } => match outcome {
                Outcome::Ok(_) => {
                    let local = self.local();
                    self.settle(format!(
                        "VM started on {local} from {generation} ({receipt})"
                    ));
                }
                other => {
                    let f = failure(other, "start");
                    if f.retryable && attempt + 1 < self.cfg.policy.restart_limit.max(1) {
                        self.phase = Phase::Starting {
                            receipt,
                            generation,
                            attempt: attempt + 1,
                        };
                        self.notice(format!("starting the VM failed: {f}; retrying"));
                        self.timers.retry = self.now + self.cfg.policy.retry_backoff;
                    } else {
                        let reason = format!(
                            "starting the VM on {} from {generation} failed: {f}; resume to try again",
                            self.cfg.local
                        );
                        self.block(
                            BlockedOn::FailoverStartFailed {
                                receipt,
                                generation,
                            },
                            reason,
                        );
                    }
                }
            },
            Phase::Restarting { .. } if *why == Why::Restart => self.restart_started(outcome),
            Phase::HandingOver {
                step: HandoverStep::Abort,
                ..
            } => self.abort_started(outcome),
            _ => self.notice(format!("late answer to a start: {outcome:?}")),
        }
    }

    /// Starts the VM here from the promoted generation. A failover's
    /// receipt proves the fenced peer was off when it was fenced; if the
    /// peer is heard again since (powered back on, its agent restarted), it
    /// no longer proves that its copy is off now, so the copy is observed
    /// first for a fresh receipt (`on_peer_receipt`).
    pub(super) fn start_spare(&mut self, receipt: FenceReceipt, generation: Generation) {
        if self.peer_lost && !self.detector.is_suspected() {
            let peer = self.peer();
            self.notice(format!(
                "{peer} is heard again since it was fenced; proving its copy off before starting here"
            ));
            self.observe_peer(Why::PeerReceipt);
            return;
        }
        if self.in_flight(|o| matches!(o, Op::StartVm { .. })) {
            return;
        }
        self.issue(
            Op::StartVm {
                node: self.local(),
                receipt,
                generation: Some(generation),
            },
            Why::Routine,
        );
    }

    /// The retry timer: repeat the step the current phase is stuck on.
    pub(super) fn retry_now(&mut self) {
        if self.maintenance {
            return;
        }
        match self.phase.clone() {
            Phase::Promoting { generation, .. }
                if !self.in_flight(|o| matches!(o, Op::Promote { .. })) =>
            {
                self.issue(
                    Op::Promote {
                        node: self.local(),
                        generation,
                    },
                    Why::Routine,
                );
            }
            Phase::Starting {
                receipt,
                generation,
                ..
            } if !self.in_flight(|o| matches!(o, Op::StartVm { .. })) => {
                self.start_spare(receipt, generation);
            }
            Phase::Restarting { .. } => self.restart_step(),
            Phase::HandingOver {
                step: HandoverStep::Abort,
                ..
            }
            | Phase::TakingOver { .. } => self.observe_peer(Why::PeerReceipt),
            Phase::FenceCheck { .. } => self.observe_peer(Why::FenceCheck),
            Phase::Recovering => self.observe_local(Why::Recover),
            _ => {}
        }
    }
}
