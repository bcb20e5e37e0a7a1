//! The careful operator, and the liveness phase with its check.

use super::*;

impl Sim {
    // ---- the operator

    /// A careful operator: resolves a machine blocked for a while the way
    /// its reason asks, confirming a node down only if it really is off.
    pub(super) fn operator(&mut self) {
        let now = self.now();
        let wait = if self.in_liveness {
            Duration::from_secs(10)
        } else {
            Duration::from_secs(60)
        };
        let mut todo = Vec::new();
        for i in 0..self.agents.len() {
            let Some(engine) = self.agents[i].engine.as_ref() else {
                continue;
            };
            for c in &self.agents[i].configs {
                let m = engine.machine(&c.pair).expect("configured");
                let key = (i, c.pair.clone());
                if self.in_liveness {
                    let st = m.status();
                    if st.maintenance {
                        todo.push((i, c.pair.clone(), Command::Maintenance(false)));
                        continue;
                    }
                    if st.test_clone.is_some() {
                        todo.push((i, c.pair.clone(), Command::EndTest));
                    }
                }
                let Phase::Blocked { on, .. } = m.phase() else {
                    self.blocked_since.remove(&key);
                    continue;
                };
                let since = *self.blocked_since.entry(key.clone()).or_insert(now);
                if now - since < wait {
                    continue;
                }
                self.blocked_since.remove(&key);
                let off = |n: &NodeId| self.world.host_power(n) == Some(PowerState::Off);
                // A careful operator never overrules a peer whose journal
                // shows it took over (a newer epoch): that would throw its
                // newer data away. They wait for it to come back instead.
                let ahead = |n: &NodeId| {
                    let p = self.nodes.iter().position(|x| x == n).expect("a node");
                    self.journaled_epoch(p, &c.pair) > Some(m.epoch())
                };
                let confirm = |n: &NodeId| {
                    Command::ConfirmDown(FenceReceipt::from_operator(n.clone(), self.world.now()))
                };
                let cmd = match on {
                    BlockedOn::FenceFailed { target }
                    | BlockedOn::LyingFencer { target }
                    | BlockedOn::NoPeerContact { peer: target }
                        if off(target) =>
                    {
                        if ahead(target) {
                            continue;
                        }
                        confirm(target)
                    }
                    BlockedOn::StaleReplica => {
                        if ahead(c.peer()) {
                            continue;
                        }
                        Command::Resume {
                            accept_data_loss: true,
                        }
                    }
                    // Both copies claim the pair (an operator's earlier
                    // override met a failover): keep the copy that runs,
                    // stand the other down. With neither running, the
                    // lower-named node stands down.
                    BlockedOn::SplitBrain => {
                        let here = &c.local;
                        let runs = |n: &NodeId| self.world.vm_state(n, &c.vm).is_live();
                        let loses = if runs(here) != runs(c.peer()) {
                            !runs(here)
                        } else {
                            here < c.peer()
                        };
                        if loses {
                            Command::StandDown
                        } else {
                            Command::Resume {
                                accept_data_loss: false,
                            }
                        }
                    }
                    _ => Command::Resume {
                        accept_data_loss: false,
                    },
                };
                todo.push((i, c.pair.clone(), cmd));
            }
        }
        for (i, pair, cmd) in todo {
            self.command(i, &pair, cmd);
        }
    }

    /// The epoch node `i` journaled for `pair` (what an operator reads on
    /// a host that is down).
    pub(super) fn journaled_epoch(&self, i: usize, pair: &PairId) -> Option<wspare_core::Epoch> {
        let mut store = self.agents[i]
            .store
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let loaded = wspare_core::journal::Store::load(&mut *store).ok()?;
        loaded.snapshots.get(pair).map(|s| s.epoch)
    }

    // ---- liveness

    pub(super) fn begin_liveness(&mut self) {
        let now = self.now();
        self.trace.line(now, || {
            "liveness phase: faults heal, hosts come back, the operator resolves blocked pairs"
                .into()
        });
        self.in_liveness = true;
        self.end_at = now + self.cfg.liveness;
        self.pending_detect.clear();
        let lies: Vec<usize> = self.lie.iter().copied().collect();
        let keep_lies: Vec<Fault> = lies
            .iter()
            .map(|&i| Fault::FenceLies(self.nodes[i].clone()))
            .collect();
        self.world.clear_faults();
        for f in keep_lies {
            self.world.set_fault(f);
        }
        {
            let mut s = self.net.lock();
            s.cut.clear();
            s.flaky_hv.clear();
        }
        self.lossy.clear();
        self.witness_cut.clear();
        for i in lies {
            self.heal(Heal::Lie(i));
        }
        for i in 0..self.agents.len() {
            self.agents[i].crash_when_busy = None;
            if self.agents[i].holds.contains(&Hold::Crashed) {
                let d = self.rng.millis(Duration::ZERO, Duration::from_secs(10));
                self.schedule_in(d, Ev::Release(i, Hold::Crashed));
            }
            if self.off_since[i].is_some() {
                self.power_on_due[i] = false;
                self.queue
                    .retain(|_, ev| !matches!(ev, Ev::PowerOn(x) if *x == i));
                self.plan_power_on(i);
            }
        }
    }

    pub(super) fn protected(&self, j: usize) -> bool {
        let p = &self.pairs[j];
        let m = |x: usize| self.machine(p.nodes[x], &p.id);
        let (Some(a), Some(b)) = (m(0), m(1)) else {
            return false;
        };
        let both = *a.phase() == Phase::Protected && *b.phase() == Phase::Protected;
        if !both || a.epoch() != b.epoch() || a.active() != b.active() {
            return false;
        }
        let x = if *a.active() == self.nodes[p.nodes[0]] {
            0
        } else {
            1
        };
        self.running[j][x] && !self.running[j][1 - x]
    }

    pub(super) fn check_liveness(&mut self) {
        if (0..self.pairs.len()).all(|j| self.protected(j)) {
            let now = self.now();
            self.trace
                .line(now, || "liveness: every pair is protected".into());
            self.metrics.liveness_at = Some(now);
            self.finished = true;
        }
    }

    pub(super) fn liveness_failed(&mut self) {
        let mut stuck = Vec::new();
        for j in 0..self.pairs.len() {
            if self.protected(j) {
                continue;
            }
            let p = &self.pairs[j];
            let machines = p
                .nodes
                .iter()
                .map(|&i| StuckMachine {
                    node: self.nodes[i].clone(),
                    status: self.machine(i, &p.id).map(Machine::status),
                })
                .collect();
            let running_on = (0..2)
                .filter(|&x| self.running[j][x])
                .map(|x| self.nodes[p.nodes[x]].clone())
                .collect();
            stuck.push(Stuck {
                pair: p.id.clone(),
                machines,
                running_on,
            });
        }
        let bound = self.cfg.liveness;
        self.fail(Failure::Liveness { bound, stuck });
    }
}
