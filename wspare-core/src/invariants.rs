//! The safety invariants of DESIGN.md §5 as checkable predicates over a
//! history of actions and observations. The simulator, the property tests
//! and the fuzzer all feed the same [`Checker`].
//!
//! 1. At most one copy of a pair's VM is running.
//! 2. The spare is started only with a receipt for the other copy.
//! 3. A VM is started only from a complete generation.
//! 4. Generations never go backwards on any node.
//! 5. Replication never overwrites a newer generation with an older one; a
//!    stale old primary is resynced, never started.
//! 6. Nothing acts automatically in maintenance.
//! 7. After a driver crash, an action with an unknown outcome is re-observed,
//!    not repeated blindly.
//!
//! Records come from two sources: what machines did ([`Record::Issued`],
//! [`Record::Completed`], [`Record::Commanded`], [`Record::Knows`]), and
//! ground truth that only a simulator (or a test) knows
//! ([`Record::Running`], [`Record::Holds`]). Invariant 1 needs ground truth;
//! the others hold over what machines did alone.
//!
//! Invariant 5 is checked through epochs: every action is recorded with the
//! epoch of the machine that asked for it, and a machine that asks to
//! replicate or start at an epoch older than one the pair already reached
//! is a stale old primary acting.

use std::collections::{HashMap, HashSet};
use std::fmt;

use crate::generation::{Epoch, Generation};
use crate::ids::{ActionId, NodeId, PairId, VmName};
use crate::machine::{allowed_in_maintenance, Action, Answer, Command, Op, Outcome};
use crate::receipt::FenceReceipt;

/// One entry of a history.
#[derive(Clone, Debug, PartialEq)]
pub enum Record {
    /// A machine on `node` handed `action` to its driver.
    Issued {
        /// The pair.
        pair: PairId,
        /// The node whose machine asked.
        node: NodeId,
        /// The machine's epoch when it asked.
        epoch: Epoch,
        /// Whether the machine was in maintenance.
        maintenance: bool,
        /// The action.
        action: Action,
    },
    /// The action's outcome was fed back.
    Completed {
        /// The pair.
        pair: PairId,
        /// The node whose machine asked.
        node: NodeId,
        /// Which action.
        id: ActionId,
        /// How it went.
        outcome: Outcome,
    },
    /// An operator command reached the machine on `node`.
    Commanded {
        /// The pair.
        pair: PairId,
        /// The node.
        node: NodeId,
        /// The command.
        command: Command,
    },
    /// The machine on `node` knows this newest complete generation.
    Knows {
        /// The pair.
        pair: PairId,
        /// The node.
        node: NodeId,
        /// The generation.
        generation: Generation,
    },
    /// Ground truth: the pair's VM copy on `node` is (or is not) running.
    Running {
        /// The pair.
        pair: PairId,
        /// The node.
        node: NodeId,
        /// Running or not.
        running: bool,
    },
    /// Ground truth: the newest complete generation held on `node`.
    Holds {
        /// The pair.
        pair: PairId,
        /// The node.
        node: NodeId,
        /// The generation.
        generation: Generation,
    },
}

/// A broken invariant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    /// Its number in DESIGN.md §5 (1 to 7).
    pub invariant: u8,
    /// Its short name.
    pub name: &'static str,
    /// What happened.
    pub detail: String,
    /// Index of the record that broke it.
    pub at: usize,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invariant {} ({}) violated at record {}: {}",
            self.invariant, self.name, self.at, self.detail
        )
    }
}

impl std::error::Error for Violation {}

impl Violation {
    fn new(invariant: u8, detail: String, at: usize) -> Self {
        Violation {
            invariant,
            name: NAMES[invariant as usize - 1],
            detail,
            at,
        }
    }
}

/// Names of the invariants, by number.
pub const NAMES: [&str; 7] = [
    "at most one copy running",
    "start only with a receipt for the other copy",
    "start only from a complete generation",
    "generations never go backwards",
    "no stale overwrite, no stale start",
    "nothing acts in maintenance",
    "unknown outcomes are re-observed",
];

struct PairInfo {
    vm: VmName,
    nodes: [NodeId; 2],
}

/// Checks a history one record at a time; cheap enough to run after every
/// step of a simulation.
#[derive(Default)]
pub struct Checker {
    pairs: HashMap<PairId, PairInfo>,
    seq: usize,
    issued: HashMap<(PairId, NodeId, ActionId), Op>,
    running: HashMap<PairId, HashSet<NodeId>>,
    receipts: HashMap<FenceReceipt, usize>,
    last_start: HashMap<(PairId, NodeId), usize>,
    promoted: HashSet<(PairId, NodeId, Generation)>,
    knows: HashMap<(PairId, NodeId), Generation>,
    holds: HashMap<(PairId, NodeId), Generation>,
    max_epoch: HashMap<PairId, Epoch>,
    unknown: HashMap<(PairId, NodeId), Vec<Op>>,
}

impl Checker {
    /// An empty checker.
    pub fn new() -> Self {
        Checker::default()
    }

    /// Declares a pair: its VM and its two nodes.
    pub fn add_pair(&mut self, pair: PairId, vm: VmName, nodes: [NodeId; 2]) {
        self.pairs.insert(pair, PairInfo { vm, nodes });
    }

    /// Records one entry; returns the first invariant it breaks.
    pub fn record(&mut self, r: &Record) -> Result<(), Violation> {
        let at = self.seq;
        self.seq += 1;
        let v = |invariant, detail| Violation::new(invariant, detail, at);
        match r {
            Record::Running {
                pair,
                node,
                running,
            } => {
                let set = self.running.entry(pair.clone()).or_default();
                if *running {
                    set.insert(node.clone());
                } else {
                    set.remove(node);
                }
                if set.len() > 1 {
                    let mut nodes: Vec<&str> = set.iter().map(|n| n.as_str()).collect();
                    nodes.sort();
                    return Err(v(
                        1,
                        format!("pair {pair}: the VM runs on {}", nodes.join(" and ")),
                    ));
                }
            }
            Record::Holds {
                pair,
                node,
                generation,
            } => {
                if let Some(old) = raise(&mut self.holds, pair, node, *generation) {
                    return Err(v(
                        4,
                        format!("pair {pair}: {node} held {old}, now holds {generation}"),
                    ));
                }
            }
            Record::Knows {
                pair,
                node,
                generation,
            } => {
                if let Some(old) = raise(&mut self.knows, pair, node, *generation) {
                    return Err(v(
                        4,
                        format!("pair {pair}: the machine on {node} knew {old}, now {generation}"),
                    ));
                }
            }
            Record::Commanded {
                command: Command::ConfirmDown(receipt),
                ..
            } => {
                self.receipts.entry(receipt.clone()).or_insert(at);
            }
            Record::Commanded { .. } => {}
            Record::Completed {
                pair,
                node,
                id,
                outcome,
            } => {
                let key = (pair.clone(), node.clone(), *id);
                let Some(op) = self.issued.remove(&key) else {
                    return Ok(());
                };
                match outcome {
                    Outcome::Unknown
                        if !op.is_observation() && !matches!(op, Op::DestroyTestClone { .. }) =>
                    {
                        self.unknown
                            .entry((pair.clone(), node.clone()))
                            .or_default()
                            .push(op.clone());
                    }
                    Outcome::Ok(a) => {
                        if let Some(receipt) = receipt_in(a) {
                            self.receipts.entry(receipt.clone()).or_insert(at);
                        }
                        if let (
                            Op::Promote {
                                node: n,
                                generation,
                            },
                            Answer::Promoted(info),
                        ) = (&op, a)
                        {
                            if info.generation == *generation {
                                self.promoted.insert((pair.clone(), n.clone(), *generation));
                            }
                        }
                    }
                    _ => {}
                }
            }
            Record::Issued {
                pair,
                node,
                epoch,
                maintenance,
                action,
            } => {
                let op = &action.op;
                // 6
                if *maintenance && !allowed_in_maintenance(op) {
                    return Err(v(
                        6,
                        format!("pair {pair}: {node} asked to {op} in maintenance"),
                    ));
                }
                // 7
                let k = (pair.clone(), node.clone());
                if let Some(list) = self.unknown.get_mut(&k) {
                    if let Some(pos) = list.iter().position(|u| same_effect(u, op)) {
                        return Err(v(
                            7,
                            format!("pair {pair}: {node} repeated `{}` after its outcome was unknown, without observing", list[pos]),
                        ));
                    }
                    list.retain(|u| !observes(op, u));
                }
                // 5
                let max = self.max_epoch.entry(pair.clone()).or_insert(*epoch);
                if *epoch > *max {
                    *max = *epoch;
                }
                if *epoch < *max
                    && matches!(
                        op,
                        Op::Sync { .. } | Op::InitialSync { .. } | Op::StartVm { .. }
                    )
                {
                    return Err(v(
                        5,
                        format!("pair {pair}: {node} at stale epoch {epoch} asked to {op}; the pair is at {max}"),
                    ));
                }
                if let Op::StartVm {
                    node: target,
                    receipt,
                    generation,
                } = op
                {
                    self.check_start(pair, target, receipt, *generation, at)?;
                    self.last_start.insert((pair.clone(), target.clone()), at);
                }
                self.issued
                    .insert((pair.clone(), node.clone(), action.id), op.clone());
            }
        }
        Ok(())
    }

    fn check_start(
        &self,
        pair: &PairId,
        target: &NodeId,
        receipt: &FenceReceipt,
        generation: Option<Generation>,
        at: usize,
    ) -> Result<(), Violation> {
        let v = |invariant, detail| Violation::new(invariant, detail, at);
        let Some(info) = self.pairs.get(pair) else {
            return Ok(());
        };
        let other = if info.nodes[0] == *target {
            &info.nodes[1]
        } else {
            &info.nodes[0]
        };
        // 2: the receipt covers the other copy, came from a fencer, an
        // observation or an operator, and is newer than the other copy's
        // last start.
        if !receipt.covers(other, &info.vm) {
            return Err(v(2, format!("pair {pair}: start on {target} carries `{receipt}`, which is not about {other}")));
        }
        let Some(got) = self.receipts.get(receipt) else {
            return Err(v(2, format!("pair {pair}: start on {target} carries `{receipt}`, which no fencer, observation or operator gave")));
        };
        if let Some(started) = self.last_start.get(&(pair.clone(), other.clone())) {
            if started > got {
                return Err(v(
                    2,
                    format!("pair {pair}: start on {target} carries `{receipt}`, older than the last start on {other}"),
                ));
            }
        }
        // 3
        if let Some(g) = generation {
            if !self.promoted.contains(&(pair.clone(), target.clone(), g)) {
                return Err(v(
                    3,
                    format!(
                        "pair {pair}: start on {target} from {g}, which was not promoted there"
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// Records `generation` as the newest on `node`; if it is older than the
/// newest recorded, returns that one instead (invariant 4).
fn raise(
    newest: &mut HashMap<(PairId, NodeId), Generation>,
    pair: &PairId,
    node: &NodeId,
    generation: Generation,
) -> Option<Generation> {
    let old = newest
        .entry((pair.clone(), node.clone()))
        .or_insert(generation);
    if generation < *old {
        return Some(*old);
    }
    *old = generation;
    None
}

fn receipt_in(a: &Answer) -> Option<&FenceReceipt> {
    match a {
        Answer::Fenced(r) | Answer::Stopped(r) => Some(r),
        Answer::Observed { receipt, .. } | Answer::Power { receipt, .. } => receipt.as_ref(),
        _ => None,
    }
}

/// Whether `b` would redo what `a` did (same kind of effect, same target).
fn same_effect(a: &Op, b: &Op) -> bool {
    match (a, b) {
        (Op::Fence { node: x }, Op::Fence { node: y }) => x == y,
        (Op::StartVm { node: x, .. }, Op::StartVm { node: y, .. })
        | (Op::StopVm { node: x, .. }, Op::StopVm { node: y, .. })
        | (Op::DestroyVm { node: x }, Op::DestroyVm { node: y }) => x == y,
        (Op::Promote { node: x, .. }, Op::Promote { node: y, .. }) => x == y,
        (Op::Sync { .. } | Op::InitialSync { .. }, Op::Sync { .. } | Op::InitialSync { .. }) => {
            true
        }
        (Op::ReverseReplication { .. }, Op::ReverseReplication { .. }) => true,
        (Op::StartTestClone { label: x, .. }, Op::StartTestClone { label: y, .. }) => x == y,
        _ => false,
    }
}

/// Whether `obs` observes what `unknown` may have changed.
fn observes(obs: &Op, unknown: &Op) -> bool {
    match (obs, unknown) {
        (Op::PowerStatus { node: x } | Op::Observe { node: x }, Op::Fence { node: y }) => x == y,
        (
            Op::Observe { node: x },
            Op::StartVm { node: y, .. } | Op::StopVm { node: y, .. } | Op::DestroyVm { node: y },
        ) => x == y,
        (
            Op::QueryReplica,
            Op::Sync { .. }
            | Op::InitialSync { .. }
            | Op::ReverseReplication { .. }
            | Op::Promote { .. },
        ) => true,
        (Op::DestroyTestClone { label: x, .. }, Op::StartTestClone { label: y, .. }) => x == y,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generation::GenerationInfo;
    use crate::hypervisor::VmState;
    use crate::receipt::PowerState;
    use crate::time::UnixMillis;

    fn n(s: &str) -> NodeId {
        NodeId::new(s).unwrap()
    }
    fn p() -> PairId {
        PairId::new("web").unwrap()
    }
    fn vm() -> VmName {
        VmName::new("web").unwrap()
    }
    fn checker() -> Checker {
        let mut c = Checker::new();
        c.add_pair(p(), vm(), [n("a"), n("b")]);
        c
    }
    fn issued(node: &str, epoch: u64, id: u64, op: Op) -> Record {
        Record::Issued {
            pair: p(),
            node: n(node),
            epoch: Epoch(epoch),
            maintenance: false,
            action: Action {
                id: ActionId(id),
                op,
            },
        }
    }
    fn completed(node: &str, id: u64, outcome: Outcome) -> Record {
        Record::Completed {
            pair: p(),
            node: n(node),
            id: ActionId(id),
            outcome,
        }
    }
    fn receipt() -> FenceReceipt {
        FenceReceipt::from_power_reading(n("a"), "ipmi", PowerState::Off, UnixMillis(1)).unwrap()
    }
    fn promote_ok(c: &mut Checker, id: u64, g: u64) {
        c.record(&issued(
            "b",
            0,
            id,
            Op::Promote {
                node: n("b"),
                generation: Generation(g),
            },
        ))
        .unwrap();
        let info = GenerationInfo {
            generation: Generation(g),
            source_time: UnixMillis(0),
        };
        c.record(&completed("b", id, Outcome::Ok(Answer::Promoted(info))))
            .unwrap();
    }
    /// `by` observes the VM shut off on `node`; returns the receipt.
    fn observed_off(c: &mut Checker, by: &str, id: u64, node: &str) -> FenceReceipt {
        c.record(&issued(by, 0, id, Op::Observe { node: n(node) }))
            .unwrap();
        let r = FenceReceipt::from_observed_state(n(node), vm(), VmState::ShutOff, UnixMillis(1))
            .unwrap();
        let outcome = Outcome::Ok(Answer::Observed {
            state: VmState::ShutOff,
            receipt: Some(r.clone()),
        });
        c.record(&completed(by, id, outcome)).unwrap();
        r
    }
    fn start_b(id: u64, epoch: u64, r: FenceReceipt, g: Option<u64>) -> Record {
        issued(
            "b",
            epoch,
            id,
            Op::StartVm {
                node: n("b"),
                receipt: r,
                generation: g.map(Generation),
            },
        )
    }

    #[test]
    fn one_copy_running() {
        let mut c = checker();
        let run = |node: &str, running| Record::Running {
            pair: p(),
            node: n(node),
            running,
        };
        c.record(&run("a", true)).unwrap();
        c.record(&run("a", false)).unwrap();
        c.record(&run("b", true)).unwrap();
        let e = c.record(&run("a", true)).unwrap_err();
        assert_eq!(e.invariant, 1);
        assert_eq!(e.to_string(), "invariant 1 (at most one copy running) violated at record 3: pair web: the VM runs on a and b");
    }

    #[test]
    fn a_proper_failover_passes() {
        let mut c = checker();
        c.record(&issued("b", 0, 1, Op::Fence { node: n("a") }))
            .unwrap();
        c.record(&completed("b", 1, Outcome::Ok(Answer::Fenced(receipt()))))
            .unwrap();
        promote_ok(&mut c, 2, 5);
        c.record(&start_b(3, 1, receipt(), Some(5))).unwrap();
    }

    #[test]
    fn a_made_up_receipt_breaks_2() {
        let mut c = checker();
        promote_ok(&mut c, 2, 5);
        let fake = FenceReceipt::from_operator(n("a"), UnixMillis(0));
        let e = c.record(&start_b(3, 1, fake, Some(5))).unwrap_err();
        assert_eq!(e.invariant, 2);
        assert!(
            e.detail
                .contains("which no fencer, observation or operator gave"),
            "{e}"
        );
    }

    #[test]
    fn an_operator_receipt_is_accepted() {
        let mut c = checker();
        let op = FenceReceipt::from_operator(n("a"), UnixMillis(0));
        c.record(&Record::Commanded {
            pair: p(),
            node: n("b"),
            command: Command::ConfirmDown(op.clone()),
        })
        .unwrap();
        promote_ok(&mut c, 2, 5);
        c.record(&start_b(3, 1, op, Some(5))).unwrap();
    }

    #[test]
    fn a_receipt_for_the_wrong_node_or_an_old_one_breaks_2() {
        let mut c = checker();
        let own = FenceReceipt::from_power_reading(n("b"), "ipmi", PowerState::Off, UnixMillis(1))
            .unwrap();
        let e = c.record(&start_b(1, 0, own, None)).unwrap_err();
        assert!(e.detail.contains("which is not about a"), "{e}");

        let mut c = checker();
        let seen_off = observed_off(&mut c, "b", 1, "a");
        // a was started after the observation: the receipt is stale.
        let rb = observed_off(&mut c, "a", 2, "b");
        c.record(&issued(
            "a",
            0,
            3,
            Op::StartVm {
                node: n("a"),
                receipt: rb,
                generation: None,
            },
        ))
        .unwrap();
        let e = c.record(&start_b(4, 0, seen_off, None)).unwrap_err();
        assert!(e.detail.contains("older than the last start on a"), "{e}");
    }

    #[test]
    fn starting_an_unpromoted_generation_breaks_3() {
        let mut c = checker();
        c.record(&issued("b", 0, 1, Op::Fence { node: n("a") }))
            .unwrap();
        c.record(&completed("b", 1, Outcome::Ok(Answer::Fenced(receipt()))))
            .unwrap();
        c.record(&issued(
            "b",
            0,
            2,
            Op::Promote {
                node: n("b"),
                generation: Generation(5),
            },
        ))
        .unwrap();
        let e = c.record(&start_b(3, 1, receipt(), Some(5))).unwrap_err();
        assert_eq!(e.invariant, 3);
    }

    #[test]
    fn generations_going_backwards_break_4() {
        let mut c = checker();
        let holds = |g| Record::Holds {
            pair: p(),
            node: n("b"),
            generation: Generation(g),
        };
        c.record(&holds(3)).unwrap();
        c.record(&holds(3)).unwrap();
        assert_eq!(c.record(&holds(2)).unwrap_err().invariant, 4);
        let knows = |g| Record::Knows {
            pair: p(),
            node: n("a"),
            generation: Generation(g),
        };
        c.record(&knows(7)).unwrap();
        assert_eq!(c.record(&knows(6)).unwrap_err().invariant, 4);
    }

    #[test]
    fn a_stale_node_syncing_or_starting_breaks_5() {
        let mut c = checker();
        c.record(&issued(
            "b",
            1,
            1,
            Op::Sync {
                source: n("b"),
                target: n("a"),
            },
        ))
        .unwrap();
        let e = c
            .record(&issued(
                "a",
                0,
                1,
                Op::Sync {
                    source: n("a"),
                    target: n("b"),
                },
            ))
            .unwrap_err();
        assert_eq!(e.invariant, 5);
        assert_eq!(
            e.detail,
            "pair web: a at stale epoch e0 asked to sync a -> b; the pair is at e1"
        );
        // Observing at a stale epoch is fine.
        c.record(&issued("a", 0, 2, Op::Observe { node: n("a") }))
            .unwrap();
    }

    #[test]
    fn acting_in_maintenance_breaks_6() {
        let mut c = checker();
        let obs = Record::Issued {
            pair: p(),
            node: n("b"),
            epoch: Epoch(0),
            maintenance: true,
            action: Action {
                id: ActionId(1),
                op: Op::Observe { node: n("a") },
            },
        };
        c.record(&obs).unwrap();
        let fence = Record::Issued {
            pair: p(),
            node: n("b"),
            epoch: Epoch(0),
            maintenance: true,
            action: Action {
                id: ActionId(2),
                op: Op::Fence { node: n("a") },
            },
        };
        assert_eq!(c.record(&fence).unwrap_err().invariant, 6);
    }

    #[test]
    fn repeating_an_unknown_action_without_observing_breaks_7() {
        let mut c = checker();
        c.record(&issued("b", 0, 1, Op::Fence { node: n("a") }))
            .unwrap();
        c.record(&completed("b", 1, Outcome::Unknown)).unwrap();
        let e = c
            .record(&issued("b", 0, 2, Op::Fence { node: n("a") }))
            .unwrap_err();
        assert_eq!(e.invariant, 7);
        // Observing first makes the repeat fine.
        let mut c = checker();
        c.record(&issued("b", 0, 1, Op::Fence { node: n("a") }))
            .unwrap();
        c.record(&completed("b", 1, Outcome::Unknown)).unwrap();
        c.record(&issued("b", 0, 2, Op::PowerStatus { node: n("a") }))
            .unwrap();
        c.record(&issued("b", 0, 3, Op::Fence { node: n("a") }))
            .unwrap();
    }
}
