//! One machine fed arbitrary input sequences, with the invariant
//! [`Checker`] watching: the model shared by the property test
//! (`machine/tests/properties.rs`, with proptest's steps) and the fuzzer
//! (`fuzz/fuzz_targets/machine.rs`, with steps decoded from bytes).
//!
//! Steps are heartbeats with any view, observations, replica reports,
//! witness verdicts, answers (right, failed or unknown) to whatever the
//! machine asked, operator commands, and driver crashes (a restore from the
//! journaled snapshot). A broken invariant (2 to 7: invariant 1 needs a
//! world, the simulator's job) or a pending list that keeps growing panics.
//!
//! The pair is `web` on nodes `a` (primary) and `b`; the scenario tests
//! build on the same fixtures.
//!
//! Compiled for tests and with the `model` feature (the fuzzer's); not part
//! of the supported API.

use std::time::Duration;

use super::{
    Answer, Command, Input, Machine, Op, Outcome, PairConfig, PeerView, PhaseName, Policy,
    ReplicaReport, Snapshot,
};
use crate::error::ErrorKind;
use crate::generation::{Generation, GenerationInfo};
use crate::hypervisor::VmState;
use crate::ids::{NodeId, PairId, VmName};
use crate::invariants::{Checker, Record};
use crate::receipt::{FenceReceipt, PowerState};
use crate::time::{Instant, UnixMillis};

/// Node `s`.
pub fn n(s: &str) -> NodeId {
    NodeId::new(s).unwrap()
}

/// Generation `x`, made at `x` seconds.
pub fn g(x: u64) -> GenerationInfo {
    GenerationInfo {
        generation: Generation(x),
        source_time: UnixMillis(x * 1000),
    }
}

/// The pair's VM.
pub fn vm() -> VmName {
    VmName::new("web").unwrap()
}

/// The policy: short intervals, so periodic work shows up in short runs.
pub fn policy() -> Policy {
    Policy {
        sync_interval: Duration::from_secs(20),
        monitor_interval: Duration::from_secs(7),
        data_loss_bound: Duration::from_secs(600),
        restart_limit: 2,
        restart_window: Duration::from_secs(600),
        fence_attempts: 3,
        fence_backoff: Duration::from_secs(2),
        fence_backoff_max: Duration::from_secs(8),
        shutdown_timeout: Duration::from_secs(30),
        handover_timeout: Duration::from_secs(60),
        peer_wait: Duration::from_secs(30),
        retry_backoff: Duration::from_secs(5),
        ..Policy::default()
    }
}

/// Pair `web` (primary `a`, spare `b`) as seen from `local`.
pub fn cfg(local: &str, policy: Policy) -> PairConfig {
    PairConfig {
        pair: PairId::new("web").unwrap(),
        vm: vm(),
        primary: n("a"),
        spare: n("b"),
        local: n(local),
        witness: false,
        peer_fence_delay: Duration::ZERO,
        policy,
    }
}

/// A fencer's receipt: `node` read back off.
pub fn power_receipt(node: &str) -> FenceReceipt {
    FenceReceipt::from_power_reading(n(node), "ipmi", PowerState::Off, UnixMillis(5000)).unwrap()
}

/// An observation's receipt: the VM shut off on `node`.
pub fn off_receipt(node: &str) -> FenceReceipt {
    FenceReceipt::from_observed_state(n(node), vm(), VmState::ShutOff, UnixMillis(5000)).unwrap()
}

/// Every VM state, for steps that pick one by index.
pub const STATES: [VmState; 7] = [
    VmState::Running,
    VmState::Paused,
    VmState::ShuttingDown,
    VmState::Suspended,
    VmState::ShutOff,
    VmState::Crashed,
    VmState::Missing,
];

/// One step of a sequence. The numbers pick among the choices (modulo
/// their count), so any value is valid.
#[derive(Clone, Debug)]
pub enum Step {
    /// Let this many milliseconds pass (below 20 s), ticking when asked.
    Advance(u16),
    /// A heartbeat from the peer with a view.
    Heartbeat {
        /// The view is at the next epoch.
        epoch_up: bool,
        /// The view names `b` active (else `a`).
        active_b: bool,
        /// Its newest generation (below 12).
        gen: u8,
        /// It offers the pair with that generation.
        handover: bool,
    },
    /// A lifecycle event.
    VmObserved {
        /// On this node's copy (else the peer's).
        local: bool,
        /// Index into [`STATES`].
        state: u8,
    },
    /// A replicator status read without being asked.
    Replica {
        /// Its newest generation (below 12).
        gen: u8,
        /// Its age in seconds.
        age: u16,
    },
    /// The witness's verdict on the peer: alive or not.
    Witness(bool),
    /// Answers one of the actions handed out.
    Answer {
        /// Which.
        pick: u8,
        /// Unknown (0), failed (1) or a plausible answer (modulo 8).
        how: u8,
        /// Varies the failure or the answer.
        detail: u8,
    },
    /// An operator command (`c` picks it, `x` varies it).
    Command(u8, u8),
    /// The driver crashes and the machine is restored.
    Crash,
}

/// A well-formed answer to `op`, varied by `d`: sometimes a receipt for the
/// wrong node.
pub fn plausible(op: &Op, d: u8) -> Answer {
    let gen = |d: u8| g(u64::from(d % 12));
    let other = |node: &NodeId| if node.as_str() == "a" { "b" } else { "a" };
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
        Op::Fence { node } => Answer::Fenced(power_receipt(if d % 7 == 0 {
            other(node)
        } else {
            node.as_str()
        })),
        Op::PowerStatus { node } if d % 2 == 0 => Answer::Power {
            state: PowerState::Off,
            receipt: Some(power_receipt(node.as_str())),
        },
        Op::PowerStatus { .. } => Answer::Power {
            state: PowerState::On,
            receipt: None,
        },
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

/// One machine of pair `web` on a timeline, its history recorded into a
/// [`Checker`].
pub struct Model {
    m: Machine,
    t: Instant,
    checker: Checker,
    pair: PairId,
    node: NodeId,
}

impl Model {
    /// The machine on `local` (`a` or `b`) with `policy`, just created.
    pub fn new(local: &str, policy: Policy) -> Model {
        let c = cfg(local, policy);
        let t = Instant::from_origin(Duration::from_secs(100));
        let mut checker = Checker::new();
        checker.add_pair(c.pair.clone(), c.vm.clone(), [n("a"), n("b")]);
        let (pair, node) = (c.pair.clone(), c.local.clone());
        let mut w = Model {
            m: Machine::new(c, t),
            t,
            checker,
            pair,
            node,
        };
        w.input(Input::Tick);
        w
    }

    /// Runs `steps` on a new machine on `local`.
    pub fn run(local: &str, policy: Policy, steps: impl IntoIterator<Item = Step>) {
        let mut w = Model::new(local, policy);
        for s in steps {
            w.step(s);
        }
    }

    /// Feeds one step.
    pub fn step(&mut self, s: Step) {
        let peer = self.m.config().peer().clone();
        match s {
            Step::Advance(ms) => self.advance(ms % 20_000),
            Step::Heartbeat {
                epoch_up,
                active_b,
                gen,
                handover,
            } => {
                let gen = u64::from(gen % 12);
                let epoch = if epoch_up {
                    self.m.epoch().next()
                } else {
                    self.m.epoch()
                };
                let view = PeerView {
                    epoch,
                    active: n(if active_b { "b" } else { "a" }),
                    phase: PhaseName::Protected,
                    newest: Some(g(gen)),
                    newest_age: Some(Duration::from_secs(2)),
                    handover: handover.then_some(Generation(gen)),
                };
                self.input(Input::Heartbeat {
                    from: peer,
                    view: Some(view),
                });
            }
            Step::VmObserved { local, state } => {
                let node = if local { self.node.clone() } else { peer };
                let state = STATES[state as usize % STATES.len()];
                self.input(Input::VmObserved { node, state });
            }
            Step::Replica { gen, age } => self.input(Input::Replica(ReplicaReport {
                source: n("a"),
                target: n("b"),
                newest: Some(g(u64::from(gen % 12))),
                age: Some(Duration::from_secs(u64::from(age))),
            })),
            Step::Witness(alive) => self.input(Input::Witness { node: peer, alive }),
            Step::Answer { pick, how, detail } => self.answer(pick, how, detail),
            Step::Command(c, x) => {
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
                self.input(Input::Command(cmd));
            }
            Step::Crash => self.crash(),
        }
    }

    fn record(&mut self, r: Record) {
        if let Err(v) = self.checker.record(&r) {
            panic!("{v} (phase {})", self.m.phase().name());
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
        while let Some(e) = self.m.poll_event() {
            let _ = e.to_string();
        }
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

    fn advance(&mut self, ms: u16) {
        let end = self.t + Duration::from_millis(u64::from(ms));
        while self.m.poll_timeout() <= end {
            self.t = self.m.poll_timeout().max(self.t);
            self.input(Input::Tick);
        }
        self.t = end;
        self.input(Input::Tick);
    }

    fn answer(&mut self, pick: u8, how: u8, detail: u8) {
        let live: Vec<_> = self.m.pending().iter().filter(|p| !p.held).collect();
        if live.is_empty() {
            return;
        }
        let p = live[pick as usize % live.len()];
        let (id, op) = (p.id, p.op.clone());
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
            _ => Outcome::Ok(plausible(&op, detail)),
        };
        self.record(Record::Completed {
            pair: self.pair.clone(),
            node: self.node.clone(),
            id,
            outcome: outcome.clone(),
        });
        self.input(Input::ActionDone { id, outcome });
    }

    /// A driver crash: what was handed out has an unknown outcome, and the
    /// machine comes back from its journaled snapshot (through JSON).
    fn crash(&mut self) {
        let snap = self.m.snapshot();
        let back: Snapshot = serde_json::from_str(&serde_json::to_string(&snap).unwrap()).unwrap();
        assert_eq!(back, snap, "the snapshot survives the journal");
        let unanswered: Vec<_> = self
            .m
            .pending()
            .iter()
            .filter(|p| !p.held)
            .map(|p| p.id)
            .collect();
        for id in unanswered {
            self.record(Record::Completed {
                pair: self.pair.clone(),
                node: self.node.clone(),
                id,
                outcome: Outcome::Unknown,
            });
        }
        self.t = self.t + Duration::from_secs(3);
        self.m = Machine::restore(self.m.config().clone(), back, self.t).unwrap();
        self.drain();
    }
}
