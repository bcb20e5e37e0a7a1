//! The fault plan of one seed: its rates (drawn from the seed) and the
//! timed faults and operator acts of the safety phase.

use std::fmt;
use std::time::Duration;

use wspare_core::{NodeId, PairId};

use super::rng::Rng;
use crate::sim::Fault;

/// One scheduled act of the plan. Node and pair fields are indices.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Act {
    /// The host loses power: its VMs stop, its agent dies. It is powered
    /// on again later (at least [`MIN_HOST_DOWN`] later).
    HostCrash(usize),
    /// The agent (driver) dies; host and VMs keep running. It restarts from
    /// its journal after `down`. With `busy`, the crash waits (up to a
    /// minute) for a moment when an action with effects is in flight.
    DriverCrash {
        node: usize,
        down: Duration,
        busy: bool,
    },
    /// The VM's guest crashes on whatever node runs it.
    VmCrash(usize),
    /// Messages between two nodes are lost: both ways, or `a -> b` only.
    Partition {
        a: usize,
        b: usize,
        oneway: bool,
        dur: Duration,
    },
    /// Extra loss on the link between two nodes, both ways.
    Lossy {
        a: usize,
        b: usize,
        loss: f64,
        dur: Duration,
    },
    /// A world fault switch (hypervisor, replication or fence device),
    /// cleared after `dur` (one-shot faults clear themselves).
    World { fault: Fault, dur: Duration },
    /// The witness cannot reach the node.
    WitnessCut { node: usize, dur: Duration },
    /// A lie episode: the agent of `node` hangs while its host and VMs
    /// run, its fence device lies, and the other nodes cannot reach its
    /// hypervisor until the device has lied once. See the module docs.
    Lie { node: usize, dur: Duration },
    /// The node's wall clock jumps.
    ClockStep { node: usize, delta_ms: i64 },
    /// The operator puts the pair in maintenance for `dur`.
    Maintenance { pair: usize, dur: Duration },
    /// The operator asks for a planned switchover.
    Switchover(usize),
    /// The operator asks for a failback to the primary.
    Failback(usize),
    /// The operator starts a test failover and ends it after `dur`.
    TestFailover { pair: usize, dur: Duration },
    /// (Scripts only.) The host is powered on now.
    PowerOn(usize),
}

/// A host stays off at least this long (the driver's fence gate shares a
/// receipt for 30 s; real hosts do not come back faster after a power cut).
pub(crate) const MIN_HOST_DOWN: Duration = Duration::from_secs(60);

/// The seed's fault rates, per hour of simulated time (0: off).
#[derive(Clone, Debug, Default)]
pub(crate) struct Rates {
    pub(crate) host_crash: f64,
    pub(crate) driver_crash: f64,
    pub(crate) vm_crash: f64,
    pub(crate) partition: f64,
    pub(crate) lossy: f64,
    pub(crate) hv_fault: f64,
    pub(crate) repl_fault: f64,
    pub(crate) fence_fault: f64,
    pub(crate) witness_cut: f64,
    pub(crate) clock_step: f64,
    pub(crate) operator: f64,
    /// Probability that the seed has a lie episode.
    pub(crate) lie: f64,
}

/// What one seed looks like.
#[derive(Clone, Debug)]
pub(crate) struct Plan {
    pub(crate) rates: Rates,
    /// Base loss of every link.
    pub(crate) loss: f64,
    /// Link latency and jitter.
    pub(crate) latency: Duration,
    pub(crate) jitter: Duration,
    /// Initial clock skew per node, ms.
    pub(crate) skew_ms: Vec<i64>,
    /// Whether a witness reports on the nodes.
    pub(crate) witness: bool,
    /// The acts, by time from the start.
    pub(crate) acts: Vec<(Duration, Act)>,
    /// A script: hosts come back only when it says so.
    pub(crate) scripted: bool,
}

impl Plan {
    /// A script for `nodes` nodes: exactly `acts`, on a quiet network (no
    /// loss, 2 ms latency, no jitter, skew or witness); hosts come back only
    /// when an act says so.
    pub(crate) fn script(nodes: usize, acts: Vec<(Duration, Act)>) -> Plan {
        Plan {
            rates: Rates::default(),
            loss: 0.0,
            latency: Duration::from_millis(2),
            jitter: Duration::ZERO,
            skew_ms: vec![0; nodes],
            witness: false,
            acts,
            scripted: true,
        }
    }
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let r = &self.rates;
        write!(
            f,
            "rates/h: host-crash {:.1} driver-crash {:.1} vm-crash {:.1} partition {:.1} lossy {:.1} hv {:.1} repl {:.1} fence {:.1} witness-cut {:.1} clock {:.1} operator {:.1}; lie episode p={:.2}; loss {:.3} latency {:?} jitter {:?}; skew ms {:?}; witness {}; {} acts",
            r.host_crash, r.driver_crash, r.vm_crash, r.partition, r.lossy, r.hv_fault, r.repl_fault,
            r.fence_fault, r.witness_cut, r.clock_step, r.operator, r.lie, self.loss, self.latency,
            self.jitter, self.skew_ms, self.witness, self.acts.len()
        )
    }
}

/// Makes one act of a kind from the seed's draws.
type Maker = Box<dyn Fn(&mut Rng) -> Act>;

/// A rate: off with probability `p_off`, else uniform up to `max`.
fn rate(rng: &mut Rng, p_off: f64, max: f64) -> f64 {
    if rng.chance(p_off) {
        0.0
    } else {
        rng.unit() * max
    }
}

/// The plan of `seed` for `nodes` nodes and `pairs` pairs (each pair's two
/// nodes given), over a safety phase of `safety`.
pub(crate) fn plan(
    seed: u64,
    nodes: &[NodeId],
    pairs: &[(PairId, usize, usize)],
    safety: Duration,
    faults: bool,
) -> Plan {
    let mut rng = Rng::new(seed, 1);
    let k = nodes.len();
    let mut p = Plan {
        rates: Rates::default(),
        loss: 0.0,
        latency: Duration::from_millis(rng.range(1, 5)),
        jitter: Duration::from_millis(rng.range(0, 40)),
        skew_ms: vec![0; k],
        witness: false,
        acts: Vec::new(),
        scripted: false,
    };
    if !faults {
        return p;
    }
    p.loss = if rng.chance(0.5) {
        0.0
    } else {
        rng.unit() * 0.05
    };
    for s in &mut p.skew_ms {
        if rng.chance(0.4) {
            *s = rng.range(0, 120_000) as i64 - 60_000;
        }
    }
    p.witness = rng.chance(0.25);
    p.rates = Rates {
        host_crash: rate(&mut rng, 0.3, 12.0),
        driver_crash: rate(&mut rng, 0.3, 18.0),
        vm_crash: rate(&mut rng, 0.4, 18.0),
        partition: rate(&mut rng, 0.3, 18.0),
        lossy: rate(&mut rng, 0.5, 12.0),
        hv_fault: rate(&mut rng, 0.5, 9.0),
        repl_fault: rate(&mut rng, 0.4, 18.0),
        fence_fault: rate(&mut rng, 0.4, 12.0),
        witness_cut: if p.witness {
            rate(&mut rng, 0.3, 9.0)
        } else {
            0.0
        },
        clock_step: rate(&mut rng, 0.7, 6.0),
        operator: rate(&mut rng, 0.3, 24.0),
        lie: if rng.chance(0.3) { 1.0 } else { 0.0 },
    };
    let r = p.rates.clone();
    let secs = |rng: &mut Rng, lo: u64, hi: u64| Duration::from_secs(rng.range(lo, hi));
    // Each kind of act is a Poisson process over the safety phase, except
    // its first 20 s and its last 30 s (faults begun earlier may still run
    // when the liveness phase starts).
    let mut kinds: Vec<(f64, Maker)> = Vec::new();
    let node = move |rng: &mut Rng| rng.below(k as u64) as usize;
    let np = pairs.len();
    let pair = move |rng: &mut Rng| rng.below(np as u64) as usize;
    let other = move |rng: &mut Rng, a: usize| (a + 1 + rng.below(k as u64 - 1) as usize) % k;
    kinds.push((r.host_crash, Box::new(move |rng| Act::HostCrash(node(rng)))));
    kinds.push((
        r.driver_crash,
        Box::new(move |rng| Act::DriverCrash {
            node: node(rng),
            down: Duration::from_millis(rng.range(500, 45_000)),
            busy: rng.chance(0.6),
        }),
    ));
    kinds.push((r.vm_crash, Box::new(move |rng| Act::VmCrash(pair(rng)))));
    kinds.push((
        r.partition,
        Box::new(move |rng| {
            let a = node(rng);
            Act::Partition {
                a,
                b: other(rng, a),
                oneway: rng.chance(0.35),
                dur: secs(rng, 2, 90),
            }
        }),
    ));
    kinds.push((
        r.lossy,
        Box::new(move |rng| {
            let a = node(rng);
            Act::Lossy {
                a,
                b: other(rng, a),
                loss: 0.2 + rng.unit() * 0.75,
                dur: secs(rng, 5, 120),
            }
        }),
    ));
    let names: Vec<NodeId> = nodes.to_vec();
    kinds.push((
        r.hv_fault,
        Box::new(move |rng| {
            let n = names[node(rng)].clone();
            let fault = if rng.chance(0.7) {
                Fault::HypervisorUnreachable(n)
            } else {
                Fault::HypervisorHangs(n)
            };
            Act::World {
                fault,
                dur: secs(rng, 3, 60),
            }
        }),
    ));
    let pair_ids: Vec<PairId> = pairs.iter().map(|(p, _, _)| p.clone()).collect();
    kinds.push((
        r.repl_fault,
        Box::new(move |rng| {
            let p = pair_ids[pair(rng)].clone();
            let fault = match rng.below(5) {
                0 => Fault::ReplicationUnreachable(p),
                1 => Fault::BreakNextSync(p),
                2 => Fault::SyncFails(p),
                3 => Fault::SyncHangs(p),
                _ => Fault::CorruptNextSync(p),
            };
            Act::World {
                fault,
                dur: secs(rng, 5, 150),
            }
        }),
    ));
    let names: Vec<NodeId> = nodes.to_vec();
    kinds.push((
        r.fence_fault,
        Box::new(move |rng| {
            let n = names[node(rng)].clone();
            let fault = match rng.below(4) {
                0 => Fault::FenceFails(n),
                1 => Fault::FenceHangs(n),
                2 => Fault::FenceDeviceDead(n),
                _ => Fault::FenceStuckOn(n),
            };
            Act::World {
                fault,
                dur: secs(rng, 10, 240),
            }
        }),
    ));
    kinds.push((
        r.witness_cut,
        Box::new(move |rng| Act::WitnessCut {
            node: node(rng),
            dur: secs(rng, 5, 90),
        }),
    ));
    kinds.push((
        r.clock_step,
        Box::new(move |rng| Act::ClockStep {
            node: node(rng),
            delta_ms: rng.range(0, 120_000) as i64 - 60_000,
        }),
    ));
    kinds.push((
        r.operator,
        Box::new(move |rng| {
            let p = pair(rng);
            match rng.below(4) {
                0 => Act::Maintenance {
                    pair: p,
                    dur: secs(rng, 5, 120),
                },
                1 => Act::Switchover(p),
                2 => Act::Failback(p),
                _ => Act::TestFailover {
                    pair: p,
                    dur: secs(rng, 5, 120),
                },
            }
        }),
    ));
    let end = safety.saturating_sub(Duration::from_secs(30));
    for (per_hour, make) in &kinds {
        let mut t = Duration::ZERO;
        while let Some(gap) = rng.exp_gap(*per_hour) {
            t += gap;
            // Let the cluster seed its replicas first.
            if t < Duration::from_secs(20) {
                continue;
            }
            if t >= end {
                break;
            }
            p.acts.push((t, make(&mut rng)));
        }
    }
    if rng.chance(r.lie) && end > Duration::from_secs(60) {
        let t = Duration::from_millis(rng.range(40_000, end.as_millis() as u64));
        p.acts.push((
            t,
            Act::Lie {
                node: node(&mut rng),
                dur: secs(&mut rng, 30, 120),
            },
        ));
    }
    // Stable order: by time, then by plan order.
    p.acts.sort_by_key(|a| a.0);
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nodes() -> Vec<NodeId> {
        vec![NodeId::new("a").unwrap(), NodeId::new("b").unwrap()]
    }

    fn pairs() -> Vec<(PairId, usize, usize)> {
        vec![(PairId::new("web").unwrap(), 0, 1)]
    }

    #[test]
    fn a_seed_fixes_its_plan_and_seeds_differ() {
        let s = Duration::from_secs(600);
        let a = plan(5, &nodes(), &pairs(), s, true);
        let b = plan(5, &nodes(), &pairs(), s, true);
        assert_eq!(a.acts, b.acts);
        assert_eq!(a.to_string(), b.to_string());
        let differ = (0..20).any(|x| plan(x, &nodes(), &pairs(), s, true).acts != a.acts);
        assert!(differ);
        assert!(a.acts.windows(2).all(|w| w[0].0 <= w[1].0));
        assert!(plan(5, &nodes(), &pairs(), s, false).acts.is_empty());
    }
}
