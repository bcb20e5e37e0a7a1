//! The plan's acts: faults injected and healed, the lie episode and its
//! guarantees, and the operator's planned commands.

use super::*;

impl Sim {
    /// Whether a fault on node `i` now would break the lie episode's
    /// guarantee (its hypervisor visible at the post-fence check).
    pub(super) fn lie_conflict(&self, i: usize) -> bool {
        self.lie.contains(&i)
    }

    pub(super) fn skip(&mut self, what: String) {
        let now = self.now();
        self.trace.line(now, || {
            format!("plan: {what} skipped (a lie episode runs there)")
        });
    }

    pub(super) fn act(&mut self, act: Act) {
        let now = self.now();
        let name = |i: usize| self.nodes[i].clone();
        match act {
            Act::HostCrash(i) => {
                if self.lie_conflict(i) {
                    return self.skip(format!("host crash of {}", name(i)));
                }
                let n = name(i);
                self.trace
                    .line(now, || format!("FAULT host {n} loses power"));
                self.note_failure(i);
                self.world.power_off(&self.nodes[i]);
            }
            Act::DriverCrash { node, down, busy } => {
                if self.lie_conflict(node) || self.agents[node].engine.is_none() {
                    return;
                }
                let n = name(node);
                self.trace.line(now, || {
                    format!(
                        "FAULT the driver of {n} crashes{} (down {down:?})",
                        if busy {
                            " with an action in flight"
                        } else {
                            ""
                        }
                    )
                });
                if busy {
                    self.agents[node].crash_when_busy = Some((now + Duration::from_secs(60), down));
                } else {
                    self.crash_driver(node, down);
                }
            }
            Act::VmCrash(j) => {
                let p = &self.pairs[j];
                let Some(x) = (0..2).find(|&x| self.running[j][x]) else {
                    return;
                };
                let i = p.nodes[x];
                if self.lie_conflict(i) {
                    return self.skip(format!("VM crash of {}", p.vm));
                }
                let (n, vm) = (name(i), p.vm.clone());
                self.trace
                    .line(now, || format!("FAULT the VM {vm} crashes on {n}"));
                self.world.crash_vm(&self.nodes[i], &self.pairs[j].vm);
            }
            Act::Partition { a, b, oneway, dur } => {
                if self.lie_conflict(a) || self.lie_conflict(b) {
                    return self.skip(format!("partition {} / {}", name(a), name(b)));
                }
                let (na, nb) = (name(a), name(b));
                self.trace.line(now, || {
                    format!(
                        "FAULT partition {na} {} {nb} for {dur:?}",
                        if oneway { "-/->" } else { "<-/->" }
                    )
                });
                self.net.cut(a, b);
                if !oneway {
                    self.net.cut(b, a);
                }
                self.schedule_in(dur, Ev::Heal(Heal::Partition { a, b, oneway }));
            }
            Act::Lossy { a, b, loss, dur } => {
                let (na, nb) = (name(a), name(b));
                self.trace.line(now, || {
                    format!(
                        "FAULT link {na} <-> {nb} loses {:.0}% for {dur:?}",
                        loss * 100.0
                    )
                });
                self.seq += 1;
                let id = self.seq;
                self.lossy.push((a, b, loss, id));
                self.schedule_in(dur, Ev::Heal(Heal::Lossy(id)));
            }
            Act::World { fault, dur } => {
                let on_lie_node = fault
                    .node()
                    .and_then(|n| self.nodes.iter().position(|x| x == n))
                    .is_some_and(|i| self.lie_conflict(i));
                if on_lie_node {
                    return self.skip(format!("{fault:?}"));
                }
                let f = fault.clone();
                self.trace.line(now, || format!("FAULT {f:?} for {dur:?}"));
                self.world.set_fault(fault.clone());
                self.schedule_in(dur, Ev::Heal(Heal::World(fault)));
            }
            Act::WitnessCut { node, dur } => {
                let n = name(node);
                self.trace.line(now, || {
                    format!("FAULT the witness cannot reach {n} for {dur:?}")
                });
                *self.witness_cut.entry(node).or_default() += 1;
                self.schedule_in(dur, Ev::Heal(Heal::WitnessCut(node)));
            }
            Act::Lie { node, dur } => self.begin_lie(node, dur),
            Act::ClockStep { node, delta_ms } => {
                let n = name(node);
                self.trace.line(now, || {
                    format!("FAULT the clock of {n} jumps {delta_ms} ms")
                });
                self.agents[node].clock.step(delta_ms);
            }
            Act::Maintenance { pair, dur } => {
                let id = self.pairs[pair].id.clone();
                for x in 0..2 {
                    let i = self.pairs[pair].nodes[x];
                    self.command(i, &id, Command::Maintenance(true));
                }
                self.schedule_in(dur, Ev::EndMaintenance(pair));
            }
            Act::Switchover(pair) | Act::Failback(pair) => {
                let failback = matches!(act, Act::Failback(_));
                let id = self.pairs[pair].id.clone();
                for x in 0..2 {
                    let i = self.pairs[pair].nodes[x];
                    let active_here = self
                        .machine(i, &id)
                        .is_some_and(|m| *m.active() == self.nodes[i]);
                    if active_here {
                        let cmd = if failback {
                            Command::Failback
                        } else {
                            Command::Switchover
                        };
                        self.command(i, &id, cmd);
                    }
                }
            }
            Act::TestFailover { pair, dur } => {
                let id = self.pairs[pair].id.clone();
                for x in 0..2 {
                    let i = self.pairs[pair].nodes[x];
                    let spare_here = self
                        .machine(i, &id)
                        .is_some_and(|m| *m.active() != self.nodes[i]);
                    if spare_here {
                        self.command(i, &id, Command::TestFailover { generation: None });
                    }
                }
                self.schedule_in(dur, Ev::EndTest(pair));
            }
            Act::PowerOn(i) => {
                if self.off_since[i].is_some() && !self.power_on_due[i] {
                    self.power_on_due[i] = true;
                    self.schedule(now, Ev::PowerOn(i));
                }
            }
        }
    }

    /// Starts a lie episode on `node` if nothing there could hide its
    /// hypervisor from the post-fence check.
    pub(super) fn begin_lie(&mut self, node: usize, dur: Duration) {
        let now = self.now();
        let n = self.nodes[node].clone();
        let net_clear = {
            let s = self.net.lock();
            !s.cut.keys().any(|&(a, b)| a == node || b == node)
        };
        // (A `FenceLies` on `n` means an episode runs there: `self.lie` is
        // not empty then.)
        let faults_clear = !self.world.faults().iter().any(|f| f.node() == Some(&n));
        let ok = net_clear
            && faults_clear
            && self.lie.is_empty()
            && self.agents[node].engine.is_some()
            && self.off_since[node].is_none();
        if !ok {
            self.trace.line(now, || {
                format!("plan: lie episode on {n} skipped (its hypervisor may be unreachable)")
            });
            return;
        }
        self.trace.line(now, || {
            format!(
                "FAULT lie episode on {n} for {dur:?}: its agent hangs (host and VMs run), its fence device lies, its hypervisor is unreachable from the other nodes until the device has lied"
            )
        });
        self.lie.insert(node);
        self.world.set_fault(Fault::FenceLies(n));
        self.net.lock().flaky_hv.insert(node);
        self.note_failure(node);
        self.agents[node].holds.insert(Hold::Lie);
        self.kill_agent(node, "it hangs");
        self.schedule_in(dur, Ev::Heal(Heal::Lie(node)));
    }

    pub(super) fn heal(&mut self, h: Heal) {
        let now = self.now();
        match h {
            Heal::Partition { a, b, oneway } => {
                self.net.uncut(a, b);
                if !oneway {
                    self.net.uncut(b, a);
                }
                let (na, nb) = (self.nodes[a].clone(), self.nodes[b].clone());
                self.trace
                    .line(now, || format!("heal partition {na} / {nb}"));
            }
            Heal::Lossy(id) => self.lossy.retain(|x| x.3 != id),
            Heal::World(f) => {
                if self.world.has_fault(&f) {
                    self.trace.line(now, || format!("heal {f:?}"));
                    self.world.clear_fault(&f);
                }
            }
            Heal::WitnessCut(n) => {
                if let Some(c) = self.witness_cut.get_mut(&n) {
                    *c -= 1;
                    if *c == 0 {
                        self.witness_cut.remove(&n);
                    }
                }
            }
            Heal::Lie(node) => {
                if !self.lie.contains(&node) {
                    return;
                }
                // The driver's fence gate shares a receipt for 30 s: the
                // episode lasts until no lie can be handed out any more.
                let lied = self.net.lock().lied_at.get(&node).copied();
                let wnow = self.world.now();
                if let Some(t) = lied {
                    let until = Duration::from_millis(t.0 + 35_000)
                        .saturating_sub(Duration::from_millis(wnow.0));
                    if !until.is_zero() {
                        return self.schedule_in(until, Ev::Heal(Heal::Lie(node)));
                    }
                }
                let n = self.nodes[node].clone();
                self.trace.line(now, || {
                    format!("heal the lie episode on {n}: its agent resumes")
                });
                self.lie.remove(&node);
                self.world.clear_fault(&Fault::FenceLies(n));
                self.net.lock().flaky_hv.remove(&node);
                self.release(node, Hold::Lie);
            }
        }
    }
}
