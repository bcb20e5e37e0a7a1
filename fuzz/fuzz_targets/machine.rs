//! Arbitrary input sequences to one failover machine: heartbeats with any
//! view, observations, replica reports, witness verdicts, answers (right,
//! failed or unknown) to whatever it asked, operator commands, and driver
//! crashes (restore from the journaled snapshot). After every input the
//! core's invariant checker sees what the machine did; a violation (2 to 7:
//! invariant 1 needs a world, the simulator's job) or a panic is a crash.
//!
//! The same model as the property test in
//! `wspare-core/src/machine/tests/properties.rs`, driven by fuzz bytes.

#![no_main]

use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use wspare_core::invariants::{Checker, Record};
use wspare_core::machine::{
    Answer, Command, Input, Machine, Op, Outcome, PairConfig, PeerView, PhaseName, Policy,
    ReplicaReport, Snapshot,
};
use wspare_core::{
    ErrorKind, FenceReceipt, Generation, GenerationInfo, Instant, NodeId, PairId, PowerState,
    UnixMillis, VmName, VmState,
};

/// Reads the fuzz input byte by byte; zeros once it runs out.
struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    fn u8(&mut self) -> u8 {
        match self.0.split_first() {
            Some((b, rest)) => {
                self.0 = rest;
                *b
            }
            None => 0,
        }
    }
    fn u16(&mut self) -> u16 {
        u16::from(self.u8()) << 8 | u16::from(self.u8())
    }
    fn bool(&mut self) -> bool {
        self.u8() & 1 == 1
    }
    fn done(&self) -> bool {
        self.0.is_empty()
    }
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

fn n(s: &str) -> NodeId {
    NodeId::new(s).unwrap()
}

fn g(x: u64) -> GenerationInfo {
    GenerationInfo {
        generation: Generation(x),
        source_time: UnixMillis(x * 1000),
    }
}

fn vm() -> VmName {
    VmName::new("web").unwrap()
}

fn cfg(local: &str) -> PairConfig {
    PairConfig {
        pair: PairId::new("web").unwrap(),
        vm: vm(),
        primary: n("a"),
        spare: n("b"),
        local: n(local),
        witness: false,
        peer_fence_delay: Duration::ZERO,
        policy: Policy {
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
        },
    }
}

fn off_receipt(node: &NodeId) -> FenceReceipt {
    FenceReceipt::from_observed_state(node.clone(), vm(), VmState::ShutOff, UnixMillis(5000))
        .unwrap()
}

fn power_receipt(node: &NodeId) -> FenceReceipt {
    FenceReceipt::from_power_reading(node.clone(), "ipmi", PowerState::Off, UnixMillis(5000))
        .unwrap()
}

/// A well-formed answer to `op`, varied by `d`.
fn plausible(op: &Op, d: u8) -> Answer {
    let gen = |d: u8| g(u64::from(d % 12));
    match op {
        Op::Observe { node } => {
            let state = STATES[d as usize % STATES.len()];
            let receipt =
                (!state.is_live() && state != VmState::Crashed).then(|| off_receipt(node));
            Answer::Observed { state, receipt }
        }
        Op::QueryReplica => Answer::Replica(ReplicaReport {
            source: n(if d.is_multiple_of(2) { "a" } else { "b" }),
            target: n(if d.is_multiple_of(2) { "b" } else { "a" }),
            newest: (!d.is_multiple_of(5)).then(|| gen(d)),
            age: Some(Duration::from_secs(u64::from(d) * 7)),
        }),
        Op::InitialSync { .. } | Op::Sync { .. } => Answer::Generation {
            info: gen(d),
            age: Duration::from_secs(1),
        },
        // Sometimes a receipt for the wrong node.
        Op::Fence { node } => Answer::Fenced(power_receipt(&if d.is_multiple_of(7) {
            if node.as_str() == "a" {
                n("b")
            } else {
                n("a")
            }
        } else {
            node.clone()
        })),
        Op::PowerStatus { node } => {
            if d.is_multiple_of(2) {
                Answer::Power {
                    state: PowerState::Off,
                    receipt: Some(power_receipt(node)),
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
        Op::StopVm { node, .. } | Op::DestroyVm { node } => Answer::Stopped(off_receipt(node)),
        Op::ReverseReplication { .. }
        | Op::Verify { .. }
        | Op::StartVm { .. }
        | Op::StartTestClone { .. }
        | Op::DestroyTestClone { .. } => Answer::Done,
    }
}

struct World {
    m: Machine,
    t: Instant,
    checker: Checker,
    pair: PairId,
    node: NodeId,
}

impl World {
    fn new(local: &str) -> World {
        let c = cfg(local);
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
            panic!("{v} (phase {})", self.m.phase().name());
        }
    }

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
        let live: Vec<_> = self
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

    /// A driver crash: what was handed out has an unknown outcome, and the
    /// machine comes back from its journaled snapshot (through JSON).
    fn crash(&mut self) {
        let snap = self.m.snapshot();
        let back: Snapshot = serde_json::from_str(&serde_json::to_string(&snap).unwrap()).unwrap();
        assert_eq!(back, snap, "the snapshot survives the journal");
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

    fn step(&mut self, b: &mut Bytes<'_>) {
        let peer = self.m.config().peer().clone();
        match b.u8() % 20 {
            0..=3 => {
                let ms = b.u16() % 20_000;
                self.advance(ms);
            }
            4..=6 => {
                let (epoch_up, active_b, gen, handover) =
                    (b.bool(), b.bool(), b.u8() % 12, b.bool());
                let epoch = if epoch_up {
                    self.m.epoch().next()
                } else {
                    self.m.epoch()
                };
                let view = PeerView {
                    epoch,
                    active: n(if active_b { "b" } else { "a" }),
                    phase: PhaseName::Protected,
                    newest: Some(g(u64::from(gen))),
                    newest_age: Some(Duration::from_secs(2)),
                    handover: handover.then_some(Generation(u64::from(gen))),
                };
                self.input(Input::Heartbeat {
                    from: peer,
                    view: Some(view),
                });
            }
            7 => {
                let node = if b.bool() { self.node.clone() } else { peer };
                let state = STATES[b.u8() as usize % STATES.len()];
                self.input(Input::VmObserved { node, state });
            }
            8 => {
                let (gen, age) = (b.u8() % 12, b.u16());
                self.input(Input::Replica(ReplicaReport {
                    source: n("a"),
                    target: n("b"),
                    newest: Some(g(u64::from(gen))),
                    age: Some(Duration::from_secs(u64::from(age))),
                }));
            }
            9 => {
                let alive = b.bool();
                self.input(Input::Witness { node: peer, alive });
            }
            10..=17 => {
                let (pick, how, detail) = (b.u8(), b.u8(), b.u8());
                self.answer(pick, how, detail);
            }
            18 => {
                let (c, x) = (b.u8(), b.u8());
                let cmd = match c % 9 {
                    0 => Command::Switchover,
                    1 => Command::Failback,
                    2 => Command::TestFailover {
                        generation: (x.is_multiple_of(2)).then_some(Generation(u64::from(x % 8))),
                    },
                    3 => Command::EndTest,
                    4 => Command::Maintenance(true),
                    5 => Command::Maintenance(false),
                    6 => Command::ConfirmDown(FenceReceipt::from_operator(
                        peer,
                        UnixMillis(u64::from(x)),
                    )),
                    _ => Command::Resume {
                        accept_data_loss: x.is_multiple_of(2),
                    },
                };
                self.input(Input::Command(cmd));
            }
            _ => self.crash(),
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let mut b = Bytes(data);
    let local = if b.bool() { "a" } else { "b" };
    let mut w = World::new(local);
    let mut steps = 0;
    while !b.done() && steps < 400 {
        w.step(&mut b);
        steps += 1;
    }
});
