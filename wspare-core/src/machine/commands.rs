//! Operator commands, maintenance, and test failover.

use super::*;

impl Machine {
    /// Takes an operator command, or says why not. (`handle` turns the
    /// refusal into a `Rejected` event.)
    pub fn command(&mut self, c: Command) -> Result<(), String> {
        let phase = self.phase.name();
        if self.maintenance && !matches!(c, Command::Maintenance(_) | Command::EndTest) {
            return Err(format!(
                "{} is refused in maintenance; turn maintenance off first",
                c.name()
            ));
        }
        match c {
            Command::Maintenance(on) => {
                if on == self.maintenance {
                    return Err(format!(
                        "maintenance is already {}",
                        if on { "on" } else { "off" }
                    ));
                }
                self.maintenance = on;
                if on {
                    self.notice("maintenance on: observing only, no automatic action");
                } else {
                    self.notice("maintenance off: acting again");
                    self.release_held();
                    self.observe_local(Why::Routine);
                    match self.phase {
                        Phase::Fencing { .. } => self.timers.fence = self.now,
                        ref p if p.is_steady() => {
                            self.resettle();
                            self.arm_steady_timers();
                            if self.detector.is_suspected() {
                                self.on_suspected();
                            }
                        }
                        _ => self.timers.retry = self.now,
                    }
                }
                Ok(())
            }
            Command::Switchover => self.request_handover("switchover"),
            Command::Failback => {
                if self.active == self.cfg.primary {
                    return Err(format!(
                        "{} is already active; nothing to fail back",
                        self.cfg.primary
                    ));
                }
                self.request_handover("failback")
            }
            Command::TestFailover { generation } => {
                if self.is_active() {
                    return Err(format!(
                        "test failover runs on the spare; ask {}",
                        self.peer()
                    ));
                }
                if let Some(t) = &self.test {
                    return Err(format!(
                        "test failover {} of {} is already running; end it first",
                        t.label, t.generation
                    ));
                }
                if !matches!(self.phase, Phase::Protected | Phase::Degraded { .. }) {
                    return Err(format!(
                        "the pair is {phase}; test failover needs it protected or degraded"
                    ));
                }
                let newest = self
                    .newest
                    .ok_or("there is no complete generation yet")?
                    .generation;
                let g = generation.unwrap_or(newest);
                if g > newest {
                    return Err(format!(
                        "{g} is newer than the newest complete generation, {newest}"
                    ));
                }
                let label = format!("test-{}", g.0);
                self.test = Some(TestClone {
                    generation: g,
                    label: label.clone(),
                    running: false,
                });
                self.notice(format!(
                    "test failover: starting isolated clone {label} of {g} on {}",
                    self.cfg.local
                ));
                self.issue(
                    Op::StartTestClone {
                        node: self.local(),
                        generation: g,
                        label,
                    },
                    Why::Routine,
                );
                Ok(())
            }
            Command::EndTest => {
                let t = self.test.clone().ok_or("no test failover is running")?;
                if self.in_flight(|o| matches!(o, Op::DestroyTestClone { .. })) {
                    return Err(format!("test clone {} is being destroyed already", t.label));
                }
                self.issue(
                    Op::DestroyTestClone {
                        node: self.local(),
                        label: t.label,
                    },
                    Why::Routine,
                );
                Ok(())
            }
            Command::ConfirmDown(receipt) => self.confirm_down(receipt),
            Command::StandDown => self.stand_down(),
            Command::Resume { accept_data_loss } => {
                if !matches!(self.phase, Phase::Blocked { .. }) {
                    return Err(format!(
                        "the pair is {phase}, not blocked; nothing to resume"
                    ));
                }
                self.accept_data_loss = accept_data_loss;
                let cause = if accept_data_loss {
                    "operator resumed, accepting the replica's age"
                } else {
                    "operator resumed"
                };
                if let Phase::Blocked {
                    on:
                        BlockedOn::FailoverStartFailed {
                            receipt,
                            generation,
                        },
                    ..
                } = self.phase.clone()
                {
                    // The VM is not defined here yet: only a start from the
                    // promoted generation can bring it up.
                    let local = self.local();
                    self.transition(
                        Phase::Starting {
                            receipt,
                            generation,
                            attempt: 0,
                        },
                        format!("{cause}; starting the VM on {local} from {generation} again"),
                    );
                    self.timers.retry = self.now;
                    return Ok(());
                }
                self.enter_recovering(cause.into());
                Ok(())
            }
        }
    }

    fn stand_down(&mut self) -> Result<(), String> {
        let peer = self.peer();
        if !matches!(
            self.phase,
            Phase::Blocked {
                on: BlockedOn::SplitBrain | BlockedOn::NoPeerContact { .. },
                ..
            }
        ) {
            return Err(format!(
                "stand-down resolves a split brain; the pair is {}",
                self.phase.name()
            ));
        }
        let Some((v, _)) = self.peer_view.clone() else {
            return Err(format!(
                "nothing heard from {peer} yet: stand-down makes this node {peer}'s spare, so {peer} must be heard first"
            ));
        };
        if v.active == self.cfg.local {
            return Err(format!(
                "{peer} says this node ({}) is active: stand down on {peer} instead",
                self.cfg.local
            ));
        }
        self.yield_to(&v);
        let local = self.local();
        self.transition(
            Phase::Stale,
            format!(
                "operator stood {local} down: {} keeps the pair at epoch {}; the copy here is stale and will be resynced",
                self.active, self.epoch
            ),
        );
        self.issue(Op::DestroyVm { node: local }, Why::Routine);
        self.arm_steady_timers();
        Ok(())
    }

    fn request_handover(&mut self, what: &str) -> Result<(), String> {
        if !self.is_active() {
            return Err(format!(
                "{what} must be asked of the active node, {}",
                self.active
            ));
        }
        if self.phase != Phase::Protected {
            let why = match &self.phase {
                Phase::Degraded { reason } | Phase::Blocked { reason, .. } => {
                    format!(" ({reason})")
                }
                _ => String::new(),
            };
            return Err(format!(
                "{what} needs a protected pair; it is {}{why}",
                self.phase.name()
            ));
        }
        let peer = self.peer();
        self.begin_handover(true, format!("operator asked for {what} to {peer}"));
        Ok(())
    }

    fn confirm_down(&mut self, receipt: FenceReceipt) -> Result<(), String> {
        let node = receipt.target().node().clone();
        let peer = self.peer();
        if node != peer {
            return Err(format!("{node} is not the peer of this node ({peer})"));
        }
        let cause = format!("operator confirmed {node} down");
        match self.phase.clone() {
            Phase::Blocked {
                on: BlockedOn::FenceFailed { target } | BlockedOn::LyingFencer { target },
                ..
            }
            | Phase::Fencing { target, .. }
                if target == node =>
            {
                self.timers.fence = Instant::NEVER;
                if self.is_active() {
                    self.peer_lost = true;
                    self.peer_receipt = Some(receipt);
                    self.settle(cause);
                } else {
                    self.begin_promote(receipt, cause);
                }
                Ok(())
            }
            Phase::Blocked {
                on: BlockedOn::NoPeerContact { peer: p },
                ..
            } if p == node => {
                // The operator overrules whatever the peer may have done:
                // take a new epoch, so equal claims show up as split brain.
                self.epoch = self.epoch.next();
                self.peer_lost = true;
                self.needs_initial = true;
                self.peer_receipt = Some(receipt.clone());
                self.transition(
                    Phase::Restarting {
                        receipt: Some(receipt),
                        destroy_first: false,
                        receipt_tries: 0,
                    },
                    format!(
                        "{cause}; starting the VM on {} at epoch {}",
                        self.cfg.local, self.epoch
                    ),
                );
                self.restart_step();
                Ok(())
            }
            _ => Err(format!(
                "nothing waits for {node} to be confirmed down (the pair is {})",
                self.phase.name()
            )),
        }
    }

    pub(super) fn on_test_started(&mut self, outcome: Outcome) {
        let Some(t) = self.test.clone() else { return };
        match outcome {
            Outcome::Ok(_) => {
                self.test = Some(TestClone {
                    running: true,
                    ..t.clone()
                });
                self.notice(format!(
                    "test clone {} of {} runs on {}, isolated; production untouched",
                    t.label, t.generation, self.cfg.local
                ));
            }
            other => {
                let f = failure(other, "start test clone");
                self.test = None;
                self.notice(format!("test failover failed: {f}"));
            }
        }
    }

    pub(super) fn on_test_destroyed(&mut self, outcome: Outcome) {
        match outcome {
            Outcome::Ok(_) => {
                if let Some(t) = self.test.take() {
                    self.notice(format!(
                        "test clone {} destroyed; test failover ended",
                        t.label
                    ));
                }
            }
            other => {
                let f = failure(other, "destroy test clone");
                self.notice(format!(
                    "destroying the test clone failed: {f}; run end-test again"
                ));
            }
        }
    }
}
