//! The VM on the active node: restarts in place up to the limit, then
//! hand-over to the peer; planned switchover and failback (stop, final sync,
//! verify, offer); and the spare's side of a hand-over (take-over).

use super::*;
use crate::hypervisor::VmState;

impl Machine {
    /// The active copy is not running and nobody stopped it.
    pub(super) fn on_local_down(&mut self, s: VmState) {
        if !self.is_active() || self.maintenance {
            return;
        }
        if let Some(phase) = self.peer_taking_over() {
            let peer = self.peer();
            self.notice(format!(
                "the VM is {s} on {}, but {peer} is taking the pair over ({phase}): not restarting it here",
                self.cfg.local
            ));
            return;
        }
        let p = &self.cfg.policy;
        let window = p.restart_window;
        while self
            .restarts
            .front()
            .is_some_and(|t| self.now - *t >= window)
        {
            self.restarts.pop_front();
        }
        if self.restarts.len() as u32 >= p.restart_limit {
            return self.crash_loop(s);
        }
        self.restarts.push_back(self.now);
        let n = self.restarts.len();
        let limit = p.restart_limit;
        let receipt = if self.peer_lost {
            self.peer_receipt.clone()
        } else {
            None
        };
        self.transition(
            Phase::Restarting {
                receipt,
                destroy_first: s == VmState::Crashed,
                receipt_tries: 0,
            },
            format!(
                "the VM is {s} on {}; restarting it in place ({n} of {limit} within {})",
                self.cfg.local,
                humantime::format_duration(window)
            ),
        );
        self.restart_step();
    }

    /// Next step of a restart: destroy a crashed copy, prove the spare's copy
    /// off, start.
    pub(super) fn restart_step(&mut self) {
        let Phase::Restarting {
            receipt,
            destroy_first,
            ..
        } = self.phase.clone()
        else {
            return;
        };
        let local = self.local();
        if destroy_first {
            if !self.in_flight(|o| matches!(o, Op::DestroyVm { .. })) {
                self.issue(Op::DestroyVm { node: local }, Why::Restart);
            }
        } else if let Some(receipt) = receipt {
            if !self.in_flight(|o| matches!(o, Op::StartVm { .. })) {
                self.issue(
                    Op::StartVm {
                        node: local,
                        receipt,
                        generation: None,
                    },
                    Why::Restart,
                );
            }
        } else {
            self.observe_peer(Why::PeerReceipt);
        }
    }

    pub(super) fn on_stopped(&mut self, outcome: Outcome, why: &Why) {
        match why {
            Why::Restart => {
                let Phase::Restarting {
                    receipt,
                    receipt_tries,
                    ..
                } = self.phase.clone()
                else {
                    return;
                };
                match outcome {
                    Outcome::Ok(Answer::Stopped(_)) => {
                        self.phase = Phase::Restarting {
                            receipt,
                            destroy_first: false,
                            receipt_tries,
                        };
                        self.restart_step();
                    }
                    other => {
                        let f = failure(other, "destroy");
                        let reason = format!(
                            "the crashed VM on {} could not be destroyed: {f}; destroy it by hand, then resume",
                            self.cfg.local
                        );
                        self.block(BlockedOn::CrashLoop, reason);
                    }
                }
            }
            Why::Handover => self.handover_stopped(outcome),
            _ => {}
        }
    }

    /// Answer to "is the peer's copy off?", for a restart, an aborted
    /// switchover, or a take-over.
    pub(super) fn on_peer_receipt(&mut self, r: Observed) {
        let peer = self.peer();
        let tries_left = |t: u32, m: &Machine| t + 1 < m.cfg.policy.fence_attempts;
        match self.phase.clone() {
            Phase::Restarting {
                receipt: None,
                destroy_first,
                receipt_tries,
            } => match r {
                Ok((_, Some(rc))) => {
                    self.phase = Phase::Restarting {
                        receipt: Some(rc),
                        destroy_first,
                        receipt_tries,
                    };
                    self.restart_step();
                }
                Ok((s, None)) if s.is_live() => {
                    let reason = format!(
                        "the VM is {s} on spare {peer}: not restarting it on {}",
                        self.cfg.local
                    );
                    self.block(BlockedOn::SplitBrain, reason);
                }
                other => {
                    let why = match other {
                        Ok((s, _)) => format!("its copy is {s}"),
                        Err(f) => f.message,
                    };
                    if tries_left(receipt_tries, self) {
                        self.phase = Phase::Restarting {
                            receipt: None,
                            destroy_first,
                            receipt_tries: receipt_tries + 1,
                        };
                        self.timers.retry = self.now + self.cfg.policy.retry_backoff;
                    } else {
                        let reason = format!(
                            "cannot prove the copy on {peer} is off ({why}); not restarting the VM on {}; resume once {peer}'s hypervisor reports its copy shut off",
                            self.cfg.local
                        );
                        self.block(BlockedOn::StartFailed, reason);
                    }
                }
            },
            Phase::HandingOver {
                step: HandoverStep::Abort,
                ..
            } => match r {
                Ok((_, Some(rc))) => {
                    if !self.in_flight(|o| matches!(o, Op::StartVm { .. })) {
                        self.issue(
                            Op::StartVm {
                                node: self.local(),
                                receipt: rc,
                                generation: None,
                            },
                            Why::Handover,
                        );
                    }
                }
                Ok((s, _)) if s.is_live() => {
                    let reason = format!(
                        "switchover aborted, but the VM is {s} on {peer}: two copies may run"
                    );
                    self.block(BlockedOn::SplitBrain, reason);
                }
                _ => self.timers.retry = self.now + self.cfg.policy.retry_backoff,
            },
            Phase::Starting {
                generation,
                attempt,
                ..
            } => match r {
                Ok((_, Some(rc))) => {
                    if self.peer_lost {
                        self.peer_receipt = Some(rc.clone());
                    }
                    self.phase = Phase::Starting {
                        receipt: rc.clone(),
                        generation,
                        attempt,
                    };
                    if !self.in_flight(|o| matches!(o, Op::StartVm { .. })) {
                        self.issue(
                            Op::StartVm {
                                node: self.local(),
                                receipt: rc,
                                generation: Some(generation),
                            },
                            Why::Routine,
                        );
                    }
                }
                Ok((s, _)) if s.is_live() => {
                    let reason = format!(
                        "{peer} was fenced, came back, and its VM is {s}: not starting a second copy on {}",
                        self.cfg.local
                    );
                    self.block(BlockedOn::SplitBrain, reason);
                }
                _ => self.timers.retry = self.now + self.cfg.policy.retry_backoff,
            },
            Phase::TakingOver { generation } => {
                match r {
                    Ok((_, Some(rc))) => self.take_over(rc, generation),
                    Ok((s, _)) if s.is_live() => {
                        self.settle(format!(
                            "{peer} offered the pair, but its VM is {s}: declining"
                        ));
                    }
                    _ => {
                        self.retries += 1;
                        if self.retries < self.cfg.policy.fence_attempts {
                            self.timers.retry = self.now + self.cfg.policy.retry_backoff;
                        } else {
                            self.settle(format!("{peer} offered the pair, but its copy cannot be proven off: declining"));
                        }
                    }
                }
            }
            _ => {}
        }
    }

    pub(super) fn restart_started(&mut self, outcome: Outcome) {
        match outcome {
            Outcome::Ok(_) => {
                let local = self.local();
                self.settle(format!("the VM was restarted on {local}"));
            }
            other => {
                let f = failure(other, "start");
                self.restarts.push_back(self.now);
                if self.restarts.len() as u32 >= self.cfg.policy.restart_limit {
                    self.notice(format!("restarting the VM failed: {f}"));
                    self.crash_loop(VmState::ShutOff);
                } else {
                    self.notice(format!("restarting the VM failed: {f}; retrying"));
                    self.timers.retry = self.now + self.cfg.policy.retry_backoff;
                }
            }
        }
    }

    /// The restart limit is reached: hand over if the spare can take it.
    fn crash_loop(&mut self, s: VmState) {
        let peer = self.peer();
        let what = format!(
            "the VM went {s} on {} {} times within {}",
            self.cfg.local,
            self.restarts.len(),
            humantime::format_duration(self.cfg.policy.restart_window)
        );
        let why_not = if self.peer_lost || self.detector.is_suspected() {
            Some(format!("the spare {peer} is unreachable"))
        } else if self.newest.is_none() {
            Some(format!("there is no complete generation on {peer}"))
        } else if self.needs_reverse || self.needs_initial {
            Some(format!("{peer} is not resynced yet"))
        } else {
            None
        };
        match why_not {
            Some(w) => self.block(
                BlockedOn::CrashLoop,
                format!("{what}, and {w}; fix the VM, then resume"),
            ),
            None => self.begin_handover(false, format!("{what}: handing the pair to {peer}")),
        }
    }

    /// Starts a hand-over: stop here, final sync, (verify), offer.
    pub(super) fn begin_handover(&mut self, planned: bool, cause: String) {
        self.transition(
            Phase::HandingOver {
                step: HandoverStep::Stop,
                planned,
                generation: None,
            },
            cause,
        );
        let local = self.local();
        let op = if planned {
            Op::StopVm {
                node: local,
                timeout: self.cfg.policy.shutdown_timeout,
            }
        } else {
            Op::DestroyVm { node: local }
        };
        self.issue(op, Why::Handover);
    }

    fn handover_stopped(&mut self, outcome: Outcome) {
        let Phase::HandingOver {
            step: HandoverStep::Stop,
            planned,
            ..
        } = self.phase.clone()
        else {
            return;
        };
        match outcome {
            Outcome::Ok(Answer::Stopped(_)) => {
                self.phase = Phase::HandingOver {
                    step: HandoverStep::FinalSync,
                    planned,
                    generation: None,
                };
                let (source, target) = (self.local(), self.peer());
                self.notice(format!("VM stopped on {source}; final sync to {target}"));
                self.issue(Op::Sync { source, target }, Why::Handover);
            }
            other => {
                let f = failure(other, "stop");
                if planned {
                    self.observe_local(Why::Routine);
                    self.settle(format!(
                        "switchover aborted: shutting the VM down on {} failed: {f}",
                        self.cfg.local
                    ));
                } else {
                    let reason = format!(
                        "could not stop the VM on {} to hand it over to {}: {f}; stop it by hand, then resume",
                        self.cfg.local,
                        self.peer()
                    );
                    self.block(BlockedOn::CrashLoop, reason);
                }
            }
        }
    }

    pub(super) fn handover_synced(&mut self, outcome: Outcome) {
        let Phase::HandingOver {
            step: HandoverStep::FinalSync,
            planned,
            ..
        } = self.phase.clone()
        else {
            return;
        };
        match outcome {
            Outcome::Ok(Answer::Generation { info, age }) => {
                self.learn_generation(info, Some(age));
                let g = info.generation;
                if planned {
                    self.phase = Phase::HandingOver {
                        step: HandoverStep::Verify,
                        planned,
                        generation: Some(g),
                    };
                    self.issue(Op::Verify { generation: g }, Why::Handover);
                } else {
                    self.offer(g);
                }
            }
            other => {
                let f = failure(other, "final sync");
                if planned {
                    self.abort_handover(format!("the final sync failed: {f}"));
                } else if let Some(n) = self.newest {
                    self.notice(format!(
                        "the final sync failed: {f}; offering {}",
                        n.generation
                    ));
                    self.offer(n.generation);
                }
            }
        }
    }

    pub(super) fn on_verify_done(&mut self, outcome: Outcome) {
        let Phase::HandingOver {
            step: HandoverStep::Verify,
            generation: Some(g),
            ..
        } = self.phase.clone()
        else {
            return;
        };
        match outcome {
            Outcome::Ok(_) => self.offer(g),
            other => {
                let f = failure(other, "verify");
                self.abort_handover(format!("verifying {g} failed: {f}"));
            }
        }
    }

    fn offer(&mut self, g: Generation) {
        let Phase::HandingOver { planned, .. } = self.phase.clone() else {
            return;
        };
        self.phase = Phase::HandingOver {
            step: HandoverStep::Offered,
            planned,
            generation: Some(g),
        };
        self.notice(format!(
            "the VM is stopped on {} and {g} is on {}; offering the pair",
            self.cfg.local,
            self.peer()
        ));
        self.timers.handover = self.now + self.cfg.policy.handover_timeout;
    }

    /// The handover timer: the peer never took over.
    pub(super) fn handover_expired(&mut self) {
        let Phase::HandingOver {
            step: HandoverStep::Offered,
            generation,
            ..
        } = self.phase.clone()
        else {
            return;
        };
        let reason = format!(
            "offered the pair to {} with {} and it did not take over within {}; the VM is stopped on {}: resume to start it here again",
            self.peer(),
            generation.map(|g| g.to_string()).unwrap_or_default(),
            humantime::format_duration(self.cfg.policy.handover_timeout),
            self.cfg.local
        );
        self.block(BlockedOn::HandoverUnacknowledged, reason);
    }

    /// A planned switchover failed before the offer: start the VM here again.
    fn abort_handover(&mut self, reason: String) {
        self.phase = Phase::HandingOver {
            step: HandoverStep::Abort,
            planned: true,
            generation: None,
        };
        self.notice(format!(
            "switchover aborted: {reason}; starting the VM on {} again",
            self.cfg.local
        ));
        self.observe_peer(Why::PeerReceipt);
    }

    pub(super) fn abort_started(&mut self, outcome: Outcome) {
        match outcome {
            Outcome::Ok(_) => {
                let local = self.local();
                self.settle(format!("switchover aborted; the VM runs on {local} again"));
            }
            other => {
                let f = failure(other, "start");
                let reason = format!(
                    "switchover aborted, and starting the VM on {} again failed: {f}; resume to try again",
                    self.cfg.local
                );
                self.block(BlockedOn::StartFailed, reason);
            }
        }
    }

    /// The active offered the pair to this spare.
    pub(super) fn begin_takeover(&mut self, g: Generation) {
        let ok = matches!(
            self.phase,
            Phase::Protected | Phase::Degraded { .. } | Phase::Seeding | Phase::Suspect
        );
        if !ok || self.maintenance || self.stale_floor.is_some() {
            return;
        }
        self.retries = 0;
        let peer = self.peer();
        self.transition(
            Phase::TakingOver { generation: g },
            format!("{peer} offered the pair with {g}"),
        );
        self.observe_peer(Why::PeerReceipt);
    }

    fn take_over(&mut self, receipt: FenceReceipt, g: Generation) {
        if self.is_stale() && !self.cfg.policy.allow_stale_failover && !self.accept_data_loss {
            let reason = format!(
                "{} offered the pair with {g}, which is {} old, over the data-loss bound {}: resume with accept-data-loss to take it anyway",
                self.peer(),
                self.age().map(fmt_dur).unwrap_or_default(),
                humantime::format_duration(self.cfg.policy.data_loss_bound)
            );
            return self.block(BlockedOn::StaleReplica, reason);
        }
        self.accept_data_loss = false;
        let cause = format!("{} handed over ({receipt})", self.peer());
        self.begin_promote_gen(receipt, g, true, cause);
    }
}
