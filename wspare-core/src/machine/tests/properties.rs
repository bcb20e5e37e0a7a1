//! Property test: random interleavings of inputs, outcomes, operator
//! commands and driver crashes never make one machine break an invariant it
//! can break on its own (2 to 7; invariant 1 needs a world: the simulator).

use proptest::prelude::*;

use super::*;
use crate::invariants::{Checker, Record};

#[derive(Clone, Debug)]
enum Step {
    Advance(u16),
    Heartbeat {
        epoch_up: bool,
        active_b: bool,
        gen: u8,
        handover: bool,
    },
    VmObserved {
        local: bool,
        state: u8,
    },
    Replica {
        gen: u8,
        age: u16,
    },
    Witness(bool),
    Answer {
        pick: u8,
        how: u8,
        detail: u8,
    },
    Command(u8, u8),
    Crash,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => any::<u16>().prop_map(|ms| Step::Advance(ms % 20_000)),
        3 => (any::<bool>(), any::<bool>(), any::<u8>(), any::<bool>())
            .prop_map(|(e, a, g, h)| Step::Heartbeat { epoch_up: e, active_b: a, gen: g % 12, handover: h }),
        1 => (any::<bool>(), any::<u8>()).prop_map(|(local, state)| Step::VmObserved { local, state }),
        1 => (any::<u8>(), any::<u16>()).prop_map(|(g, age)| Step::Replica { gen: g % 12, age }),
        1 => any::<bool>().prop_map(Step::Witness),
        8 => (any::<u8>(), any::<u8>(), any::<u8>()).prop_map(|(pick, how, detail)| Step::Answer { pick, how, detail }),
        1 => (any::<u8>(), any::<u8>()).prop_map(|(c, x)| Step::Command(c, x)),
        1 => Just(Step::Crash),
    ]
}

const STATES: [VmState; 7] = [
    VmState::Running,
    VmState::Paused,
    VmState::ShuttingDown,
    VmState::Suspended,
    VmState::ShutOff,
    VmState::Crashed,
    VmState::Missing,
];

struct World {
    m: Machine,
    t: Instant,
    checker: Checker,
    pair: PairId,
    node: NodeId,
}

fn prop_policy() -> Policy {
    Policy {
        sync_interval: Duration::from_secs(20),
        monitor_interval: Duration::from_secs(7),
        ..policy()
    }
}

impl World {
    fn new(local: &str, policy: Policy) -> World {
        let c = cfg(local, policy);
        let t = Instant::from_origin(Duration::from_secs(100));
        let mut checker = Checker::new();
        checker.add_pair(c.pair.clone(), c.vm.clone(), [n("a"), n("b")]);
        let (pair, node) = (c.pair.clone(), c.local.clone());
        let mut w = World {
            m: Machine::new(c, t),
            t,
            checker,
            pair,
            node,
        };
        w.input(Input::Tick);
        w
    }

    fn record(&mut self, r: Record) {
        if let Err(v) = self.checker.record(&r) {
            panic!("{v}\nevents:\n{}", self.m.phase().name());
        }
    }

    /// Feeds an input, then records what the machine asked for.
    fn input(&mut self, i: Input) {
        if let Input::Command(c) = &i {
            self.record(Record::Commanded {
                pair: self.pair.clone(),
                node: self.node.clone(),
                command: c.clone(),
            });
        }
        self.m.handle(i, self.t);
        self.drain();
    }

    fn drain(&mut self) {
        while let Some(a) = self.m.poll_action() {
            let r = Record::Issued {
                pair: self.pair.clone(),
                node: self.node.clone(),
                epoch: self.m.epoch(),
                maintenance: self.m.status().maintenance,
                action: a,
            };
            self.record(r);
        }
        while self.m.poll_event().is_some() {}
        if let Some(g) = self.m.status().newest {
            self.record(Record::Knows {
                pair: self.pair.clone(),
                node: self.node.clone(),
                generation: g.generation,
            });
        }
        let held = self.m.pending().iter().filter(|p| p.held).count();
        assert!(
            self.m.pending().len() - held <= 12,
            "pending grows without bound: {:?}",
            self.m.pending()
        );
    }

    fn answer(&mut self, pick: u8, how: u8, detail: u8) {
        let live: Vec<Pending> = self
            .m
            .pending()
            .iter()
            .filter(|p| !p.held)
            .cloned()
            .collect();
        if live.is_empty() {
            return;
        }
        let p = &live[pick as usize % live.len()];
        let outcome = match how % 8 {
            0 => Outcome::Unknown,
            1 => Outcome::failed(
                [
                    ErrorKind::Unreachable,
                    ErrorKind::Timeout,
                    ErrorKind::Backend,
                    ErrorKind::PermissionDenied,
                ][detail as usize % 4],
                "injected",
            ),
            _ => Outcome::Ok(plausible(&p.op, detail)),
        };
        self.record(Record::Completed {
            pair: self.pair.clone(),
            node: self.node.clone(),
            id: p.id,
            outcome: outcome.clone(),
        });
        self.input(Input::ActionDone { id: p.id, outcome });
    }

    fn crash(&mut self) {
        let snap = self.m.snapshot();
        let json = serde_json::to_string(&snap).unwrap();
        let back: Snapshot = serde_json::from_str(&json).unwrap();
        assert_eq!(back, snap);
        for p in self.m.pending().iter().filter(|p| !p.held) {
            let r = Record::Completed {
                pair: self.pair.clone(),
                node: self.node.clone(),
                id: p.id,
                outcome: Outcome::Unknown,
            };
            self.checker.record(&r).unwrap();
        }
        self.t = self.t + Duration::from_secs(3);
        self.m = Machine::restore(self.m.config().clone(), back, self.t).unwrap();
        self.drain();
    }
}

/// A well-formed answer to `op`, varied by `d`.
fn plausible(op: &Op, d: u8) -> Answer {
    let gen = |d: u8| g(u64::from(d % 12));
    match op {
        Op::Observe { node } => {
            let state = STATES[d as usize % STATES.len()];
            let receipt =
                (!state.is_live() && state != VmState::Crashed).then(|| off_receipt(node.as_str()));
            Answer::Observed { state, receipt }
        }
        Op::QueryReplica => Answer::Replica(ReplicaReport {
            source: n(if d % 2 == 0 { "a" } else { "b" }),
            target: n(if d % 2 == 0 { "b" } else { "a" }),
            newest: (d % 5 != 0).then(|| gen(d)),
            age: Some(Duration::from_secs(u64::from(d) * 7)),
        }),
        Op::InitialSync { .. } | Op::Sync { .. } => Answer::Generation {
            info: gen(d),
            age: Duration::from_secs(1),
        },
        Op::Fence { node } => {
            // Sometimes a receipt for the wrong node.
            let who = if d % 7 == 0 {
                if node.as_str() == "a" {
                    "b"
                } else {
                    "a"
                }
            } else {
                node.as_str()
            };
            Answer::Fenced(power_receipt(who))
        }
        Op::PowerStatus { node } => {
            if d % 2 == 0 {
                Answer::Power {
                    state: PowerState::Off,
                    receipt: Some(power_receipt(node.as_str())),
                }
            } else {
                Answer::Power {
                    state: PowerState::On,
                    receipt: None,
                }
            }
        }
        Op::Promote { generation, .. } => Answer::Promoted(GenerationInfo {
            generation: *generation,
            source_time: UnixMillis(1),
        }),
        Op::StopVm { node, .. } | Op::DestroyVm { node } => {
            Answer::Stopped(off_receipt(node.as_str()))
        }
        Op::ReverseReplication { .. }
        | Op::Verify { .. }
        | Op::StartVm { .. }
        | Op::StartTestClone { .. }
        | Op::DestroyTestClone { .. } => Answer::Done,
    }
}

fn run(local: &str, steps: Vec<Step>) {
    run_with(local, steps, prop_policy())
}

fn run_with(local: &str, steps: Vec<Step>, policy: Policy) {
    let mut w = World::new(local, policy);
    for s in steps {
        match s {
            Step::Advance(ms) => {
                let end = w.t + Duration::from_millis(u64::from(ms));
                while w.m.poll_timeout() <= end {
                    w.t = w.m.poll_timeout().max(w.t);
                    w.input(Input::Tick);
                }
                w.t = end;
                w.input(Input::Tick);
            }
            Step::Heartbeat {
                epoch_up,
                active_b,
                gen,
                handover,
            } => {
                let peer = w.m.config().peer().clone();
                let epoch = if epoch_up {
                    w.m.epoch().next()
                } else {
                    w.m.epoch()
                };
                let view = PeerView {
                    epoch,
                    active: n(if active_b { "b" } else { "a" }),
                    phase: PhaseName::Protected,
                    newest: Some(g(u64::from(gen))),
                    newest_age: Some(Duration::from_secs(2)),
                    handover: handover.then_some(Generation(u64::from(gen))),
                };
                w.input(Input::Heartbeat {
                    from: peer,
                    view: Some(view),
                });
            }
            Step::VmObserved { local, state } => {
                let node = if local {
                    w.node.clone()
                } else {
                    w.m.config().peer().clone()
                };
                w.input(Input::VmObserved {
                    node,
                    state: STATES[state as usize % STATES.len()],
                });
            }
            Step::Replica { gen, age } => {
                let r = ReplicaReport {
                    source: n("a"),
                    target: n("b"),
                    newest: Some(g(u64::from(gen))),
                    age: Some(Duration::from_secs(u64::from(age))),
                };
                w.input(Input::Replica(r));
            }
            Step::Witness(alive) => {
                let peer = w.m.config().peer().clone();
                w.input(Input::Witness { node: peer, alive });
            }
            Step::Answer { pick, how, detail } => w.answer(pick, how, detail),
            Step::Command(c, x) => {
                let peer = w.m.config().peer().clone();
                let cmd = match c % 9 {
                    0 => Command::Switchover,
                    1 => Command::Failback,
                    2 => Command::TestFailover {
                        generation: (x % 2 == 0).then_some(Generation(u64::from(x % 8))),
                    },
                    3 => Command::EndTest,
                    4 => Command::Maintenance(true),
                    5 => Command::Maintenance(false),
                    6 => Command::ConfirmDown(FenceReceipt::from_operator(
                        peer,
                        UnixMillis(u64::from(x)),
                    )),
                    _ => Command::Resume {
                        accept_data_loss: x % 2 == 0,
                    },
                };
                w.input(Input::Command(cmd));
            }
            Step::Crash => w.crash(),
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn spare_machine_never_breaks_an_invariant(steps in prop::collection::vec(step(), 1..250)) {
        run("b", steps);
    }

    #[test]
    fn active_machine_never_breaks_an_invariant(steps in prop::collection::vec(step(), 1..250)) {
        run("a", steps);
    }
}

/// The property is not vacuous: with a deliberate defect switched on, it
/// finds a violating sequence. (Defects that need a second node or ground
/// truth, `ignore-generation` and `trust-lying-fencer`, are caught by the
/// simulator in wspare-testkit.)
#[cfg(feature = "inject-bugs")]
#[test]
fn the_property_catches_injected_defects() {
    use proptest::test_runner::{Config, TestError, TestRunner};
    // The runner catches each violation's panic; keep their messages quiet.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    for (bug, local) in [
        ("skip-fence", "b"),
        ("start-before-promote", "b"),
        ("repeat-unknown-action", "b"),
        ("start-stale-primary", "a"),
    ] {
        let mut policy = prop_policy();
        policy.bugs.enable(bug).unwrap();
        let mut runner = TestRunner::new(Config {
            cases: 2000,
            failure_persistence: None,
            ..Config::default()
        });
        let result = runner.run(&prop::collection::vec(step(), 1..250), |steps| {
            let p = policy.clone();
            std::panic::catch_unwind(move || run_with(local, steps, p))
                .map_err(|_| proptest::test_runner::TestCaseError::fail("violation"))
        });
        match result {
            Err(TestError::Fail(_, steps)) => eprintln!("{bug}: caught with {} steps", steps.len()),
            other => {
                std::panic::set_hook(hook);
                panic!("{bug}: the property did not catch it: {other:?}")
            }
        }
    }
    std::panic::set_hook(hook);
}
