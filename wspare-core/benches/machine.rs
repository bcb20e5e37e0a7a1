//! Throughput of the failover machine: inputs handled per second on one
//! core, for one pair and for 10,000 pairs fed round-robin (cache misses
//! included), in steady state (heartbeats with views, ticks, and the
//! answers to every action the machines ask for).
//!
//! It also measures, in the same run, a baseline: building and dispatching
//! the same input stream without a machine. Its last line is
//! `inputs-per-sec-1-pair=N inputs-per-sec-10000-pairs=M`.

use std::hint::black_box;
use std::time::{Duration, Instant as Wall};

use wspare_core::machine::{
    Answer, Input, Machine, Op, Outcome, PairConfig, PeerView, PhaseName, Policy, ReplicaReport,
};
use wspare_core::{
    Epoch, FenceReceipt, Generation, GenerationInfo, Instant, NodeId, PairId, UnixMillis, VmName,
    VmState,
};

fn cfg(i: usize) -> PairConfig {
    let (a, b) = (
        NodeId::new("node-a").unwrap(),
        NodeId::new("node-b").unwrap(),
    );
    // Half the machines run on the active node, half on the spare.
    let local = if i % 2 == 0 { a.clone() } else { b.clone() };
    PairConfig {
        pair: PairId::new(format!("pair-{i}")).unwrap(),
        vm: VmName::new(format!("vm-{i}")).unwrap(),
        primary: a,
        spare: b,
        local,
        witness: false,
        peer_fence_delay: Duration::ZERO,
        policy: Policy {
            sync_interval: Duration::from_secs(10),
            monitor_interval: Duration::from_secs(5),
            ..Policy::default()
        },
    }
}

/// A plausible answer to `op`, so machines stay in steady state.
fn answer(m: &Machine, op: &Op, gen: &mut u64) -> Outcome {
    let a = match op {
        Op::Observe { node } => {
            let state = if *node == m.config().primary {
                VmState::Running
            } else {
                VmState::ShutOff
            };
            let receipt = FenceReceipt::from_observed_state(
                node.clone(),
                m.config().vm.clone(),
                state,
                UnixMillis(1),
            );
            Answer::Observed { state, receipt }
        }
        Op::QueryReplica => Answer::Replica(ReplicaReport {
            source: m.config().primary.clone(),
            target: m.config().spare.clone(),
            newest: Some(GenerationInfo {
                generation: Generation(*gen),
                source_time: UnixMillis(1),
            }),
            age: Some(Duration::from_secs(1)),
        }),
        Op::Sync { .. } | Op::InitialSync { .. } => {
            *gen += 1;
            Answer::Generation {
                info: GenerationInfo {
                    generation: Generation(*gen),
                    source_time: UnixMillis(1),
                },
                age: Duration::from_secs(1),
            }
        }
        _ => Answer::Done,
    };
    Outcome::Ok(a)
}

struct Bench {
    machines: Vec<Machine>,
    views: Vec<Input>,
    t: Instant,
    gen: u64,
}

impl Bench {
    fn new(pairs: usize) -> Bench {
        let t = Instant::from_origin(Duration::from_secs(1));
        let machines: Vec<Machine> = (0..pairs).map(|i| Machine::new(cfg(i), t)).collect();
        let views = machines
            .iter()
            .map(|m| {
                let peer = m.config().peer().clone();
                let view = PeerView {
                    epoch: Epoch(0),
                    active: m.config().primary.clone(),
                    phase: PhaseName::Protected,
                    newest: None,
                    newest_age: None,
                    handover: None,
                };
                Input::Heartbeat {
                    from: peer,
                    view: Some(view),
                }
            })
            .collect();
        Bench {
            machines,
            views,
            t,
            gen: 1,
        }
    }

    /// Runs `rounds` rounds; each round every machine gets a heartbeat, a
    /// tick, and the answers to what it asked. Time advances 100 ms per
    /// round, so each machine sees heartbeats at 10 Hz: the detector works
    /// on every one. Returns the number of inputs handled.
    fn run(&mut self, rounds: usize) -> u64 {
        let mut inputs = 0u64;
        let mut pending = Vec::new();
        for _ in 0..rounds {
            self.t = self.t + Duration::from_millis(100);
            for (m, hb) in self.machines.iter_mut().zip(&self.views) {
                m.handle(hb.clone(), self.t);
                m.handle(Input::Tick, self.t);
                inputs += 2;
                while let Some(a) = m.poll_action() {
                    pending.push(a);
                }
                while m.poll_event().is_some() {}
                for a in pending.drain(..) {
                    let outcome = answer(m, &a.op, &mut self.gen);
                    m.handle(Input::ActionDone { id: a.id, outcome }, self.t);
                    inputs += 1;
                    while m.poll_action().is_some() {}
                    while m.poll_event().is_some() {}
                }
            }
        }
        inputs
    }

    /// The baseline: the same stream of inputs, built and handed to an
    /// opaque function, with no machine.
    fn baseline(&mut self, rounds: usize) -> u64 {
        let mut inputs = 0u64;
        for _ in 0..rounds {
            self.t = self.t + Duration::from_millis(100);
            for hb in &self.views {
                black_box((hb.clone(), self.t));
                black_box((Input::Tick, self.t));
                inputs += 2;
            }
        }
        inputs
    }
}

fn rate(inputs: u64, d: Duration) -> f64 {
    inputs as f64 / d.as_secs_f64()
}

fn measure(pairs: usize, rounds: usize) -> (f64, f64) {
    let mut b = Bench::new(pairs);
    // Warm up into steady state: seeded, protected.
    b.run((200 / pairs).max(2));
    let t0 = Wall::now();
    let n = b.run(rounds);
    let machine = rate(n, t0.elapsed());
    let t0 = Wall::now();
    let n = b.baseline(rounds);
    let base = rate(n, t0.elapsed());
    let states: std::collections::BTreeMap<String, usize> =
        b.machines.iter().fold(Default::default(), |mut acc, m| {
            *acc.entry(m.phase().name().to_string()).or_default() += 1;
            acc
        });
    println!(
        "{pairs:>6} pair(s): {:>12.0} inputs/s, baseline {:>12.0} inputs/s, machine/baseline cost ratio {:.1}, phases {states:?}",
        machine,
        base,
        base / machine
    );
    (machine, base)
}

fn main() {
    let (one, _) = measure(1, 2_000_000);
    let (many, _) = measure(10_000, 200);
    println!("target: at least 1000000 inputs/s in both");
    println!("inputs-per-sec-1-pair={one:.0} inputs-per-sec-10000-pairs={many:.0}");
}
