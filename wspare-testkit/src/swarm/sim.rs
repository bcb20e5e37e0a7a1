//! One seed's run: the cluster, its agents, the event loop, the checker
//! feed, the careful operator and the liveness check.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::AbortHandle;
use wspare_core::driver::{Deadlines, Engine, Executor, FenceGate, Output, PairBackends};
use wspare_core::invariants::{Checker, Record};
use wspare_core::journal::MemoryStore;
use wspare_core::machine::{
    Action, Answer, BlockedOn, Command, Event, EventKind, Input, Machine, Op, Outcome, PairConfig,
    PeerView, Phase, PhaseName, Policy,
};
use wspare_core::runner::Secret;
use wspare_core::{
    ActionId, Evidence, FenceReceipt, Generation, Hypervisor, Instant, NodeId, PairId, PowerState,
    VmName, VmSpec,
};

use super::net::{Net, SkewClock, SwarmFencer, SwarmHv, SwarmReplicator};
use super::plan::{plan, Act, Plan, MIN_HOST_DOWN};
use super::rng::Rng;
use super::{Failure, Metrics, Stuck, StuckMachine, SwarmConfig, Trace};
use crate::sim::{test_vm, Fault, SimFencer, SimHypervisor, SimReplicator, SimWorld};

mod faults;
mod operator;

type Store = Arc<Mutex<MemoryStore>>;

/// One pair: its VM and its two nodes (primary first).
pub(crate) struct PairDef {
    pub(crate) id: PairId,
    pub(crate) vm: VmName,
    pub(crate) nodes: [usize; 2],
    pub(crate) spec: VmSpec,
}

impl PairDef {
    /// The pair's other node, seen from its node `i`.
    fn peer_of(&self, i: usize) -> usize {
        if self.nodes[0] == i {
            self.nodes[1]
        } else {
            self.nodes[0]
        }
    }
}

/// Why an agent is not running.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Hold {
    HostOff,
    Crashed,
    Lie,
}

struct Task {
    abort: AbortHandle,
    op: Op,
}

/// One node's agent: the real engine (machines + journal) and executors.
struct Agent {
    node: NodeId,
    configs: Vec<PairConfig>,
    /// The nodes it shares a pair with, in order.
    peers: Vec<usize>,
    store: Store,
    engine: Option<Engine<Store>>,
    incarnation: u64,
    tasks: BTreeMap<(PairId, ActionId), Task>,
    executors: BTreeMap<PairId, Arc<Executor>>,
    holds: BTreeSet<Hold>,
    clock: Arc<SkewClock>,
    /// A driver crash waiting for an action with effects: (give-up time, downtime).
    crash_when_busy: Option<(Instant, Duration)>,
}

struct Done {
    agent: usize,
    incarnation: u64,
    pair: PairId,
    id: ActionId,
    outcome: Outcome,
}

enum Heal {
    Partition { a: usize, b: usize, oneway: bool },
    Lossy(u64),
    World(Fault),
    WitnessCut(usize),
    Lie(usize),
}

enum Ev {
    Act(Act),
    Beat(usize),
    Deliver {
        from: usize,
        to: usize,
        views: Vec<(PairId, PeerView)>,
    },
    Witness,
    Operator,
    Liveness,
    Release(usize, Hold),
    PowerOn(usize),
    Heal(Heal),
    EndTest(usize),
    EndMaintenance(usize),
}

/// The timers and limits every machine of the swarm runs with: short, so a
/// few simulated minutes see many periodic cycles.
pub(crate) fn swarm_policy() -> Policy {
    Policy {
        sync_interval: Duration::from_secs(10),
        monitor_interval: Duration::from_secs(5),
        data_loss_bound: Duration::from_secs(120),
        allow_stale_failover: false,
        restart_limit: 3,
        restart_window: Duration::from_secs(300),
        fence_attempts: 4,
        fence_backoff: Duration::from_secs(2),
        fence_backoff_max: Duration::from_secs(16),
        shutdown_timeout: Duration::from_secs(20),
        handover_timeout: Duration::from_secs(60),
        peer_wait: Duration::from_secs(20),
        retry_backoff: Duration::from_secs(3),
        ..Policy::default()
    }
}

fn deadlines() -> Deadlines {
    Deadlines {
        observe: Duration::from_secs(5),
        query: Duration::from_secs(5),
        sync: Duration::from_secs(60),
        freeze: Duration::from_secs(10),
        verify: Duration::from_secs(30),
        fence: Duration::from_secs(30),
        promote: Duration::from_secs(30),
        start: Duration::from_secs(30),
        stop: Duration::from_secs(30),
    }
}

/// Delay before fencing node `i` of `k`: the first node is the preferred
/// one and waits longest to be fenced, so it wins a partition.
fn fence_delay(i: usize, k: usize) -> Duration {
    Duration::from_secs(10 * (k - 1 - i) as u64)
}

/// Pair `j`'s primary and spare among `k` nodes: primaries round-robin,
/// spares spread over the other nodes.
pub(crate) fn placement(j: usize, k: usize) -> (usize, usize) {
    let primary = j % k;
    let spare = (primary + 1 + (j / k) % (k - 1)) % k;
    (primary, spare)
}

pub(crate) fn node_name(i: usize) -> NodeId {
    let letter = (b'a' + i as u8) as char;
    NodeId::new(format!("node-{letter}")).expect("valid node name")
}

pub(crate) fn pair_name(j: usize) -> String {
    const NAMES: [&str; 8] = ["web", "db", "mail", "git", "ci", "dns", "wiki", "chat"];
    NAMES
        .get(j)
        .map(|s| s.to_string())
        .unwrap_or_else(|| format!("vm-{j}"))
}

fn short(outcome: &Outcome) -> String {
    match outcome {
        Outcome::Ok(a) => match a {
            Answer::Done => "ok".into(),
            Answer::Observed { state, .. } => format!("ok: {state}"),
            Answer::Replica(r) => format!(
                "ok: {} -> {} newest {}",
                r.source,
                r.target,
                r.newest
                    .map(|g| g.generation.to_string())
                    .unwrap_or_else(|| "none".into())
            ),
            Answer::Generation { info, .. } => format!("ok: {}", info.generation),
            Answer::Fenced(r) => format!("ok: {r}"),
            Answer::Power { state, .. } => format!("ok: power {state}"),
            Answer::Promoted(info) => format!("ok: promoted {}", info.generation),
            Answer::Stopped(r) => format!("ok: {r}"),
        },
        Outcome::Failed(f) => format!("failed: {f}"),
        Outcome::Unknown => "unknown".into(),
    }
}

/// Whether a start is a failover: from a promoted generation, with a
/// receipt that is not a peer's clean stop (which is a hand-over).
fn is_failover_start(op: &Op) -> bool {
    matches!(op, Op::StartVm { generation: Some(_), receipt, .. }
        if !matches!(receipt.evidence(), Evidence::StoppedObserved { .. }))
}

pub(crate) struct Sim {
    cfg: SwarmConfig,
    world: SimWorld,
    net: Net,
    nodes: Vec<NodeId>,
    pairs: Vec<PairDef>,
    agents: Vec<Agent>,
    plan: Plan,
    queue: BTreeMap<(Instant, u64), Ev>,
    seq: u64,
    rng: Rng,
    checker: Checker,
    tx: mpsc::UnboundedSender<Done>,
    rx: mpsc::UnboundedReceiver<Done>,
    origin: tokio::time::Instant,
    running: Vec<[bool; 2]>,
    holds: Vec<[Option<Generation>; 2]>,
    /// Newest generation each machine knows, by agent and config index.
    knows: Vec<Vec<Option<Generation>>>,
    off_since: Vec<Option<Instant>>,
    power_on_due: Vec<bool>,
    lossy: Vec<(usize, usize, f64, u64)>,
    witness_cut: BTreeMap<usize, u32>,
    lie: BTreeSet<usize>,
    in_liveness: bool,
    end_at: Instant,
    blocked_since: BTreeMap<(usize, PairId), Instant>,
    pending_detect: BTreeMap<PairId, (Instant, usize, usize)>,
    decision: BTreeMap<(usize, PairId), bool>,
    pub(crate) metrics: Metrics,
    pub(crate) trace: Trace,
    pub(crate) failure: Option<Failure>,
    pub(crate) steps: u64,
    finished: bool,
}

impl Sim {
    /// Builds the cluster of `seed` (inside the paused runtime): nodes,
    /// pairs with their VMs running on the primaries, fence devices, the
    /// plan (or `script`), and the agents, started.
    pub(crate) async fn build(
        seed: u64,
        cfg: &SwarmConfig,
        trace: bool,
        script: Option<Plan>,
    ) -> Result<Sim, String> {
        cfg.validate()?;
        let mut policy = swarm_policy();
        if let Some(bug) = &cfg.bug {
            enable_bug(&mut policy, bug)?;
        }
        let world = SimWorld::new();
        let k = cfg.nodes;
        let nodes: Vec<NodeId> = (0..k).map(node_name).collect();
        for (i, n) in nodes.iter().enumerate() {
            world.add_host(n);
            world.add_fence_device(n, &format!("bmc-{i}"), Secret::new(format!("pw-{n}")));
        }
        let mut pairs = Vec::new();
        for j in 0..cfg.pairs {
            let (p, s) = placement(j, k);
            let name = pair_name(j);
            let id = PairId::new(name.clone()).map_err(|e| e.to_string())?;
            let vm = VmName::new(name).map_err(|e| e.to_string())?;
            let spec = test_vm(
                &world,
                &nodes[p],
                &vm,
                "wspare.mode=loop wspare.interval_ms=1000",
            );
            let hv = SimHypervisor::new(&world, &nodes[p]);
            hv.define(&spec).await.map_err(|e| e.to_string())?;
            hv.start(&vm).await.map_err(|e| e.to_string())?;
            SimReplicator::new(&world, &id, &nodes[p], &nodes[s]);
            pairs.push(PairDef {
                id,
                vm,
                nodes: [p, s],
                spec,
            });
        }
        let pair_list: Vec<(PairId, usize, usize)> = pairs
            .iter()
            .map(|p| (p.id.clone(), p.nodes[0], p.nodes[1]))
            .collect();
        let plan = match script {
            Some(p) => p,
            None => plan(seed, &nodes, &pair_list, cfg.safety, cfg.faults),
        };
        let mut checker = Checker::new();
        for p in &pairs {
            checker.add_pair(
                p.id.clone(),
                p.vm.clone(),
                [nodes[p.nodes[0]].clone(), nodes[p.nodes[1]].clone()],
            );
        }
        let mut agents = Vec::new();
        for (i, node) in nodes.iter().enumerate() {
            let mut configs = Vec::new();
            let mut peers = BTreeSet::new();
            for p in pairs.iter().filter(|p| p.nodes.contains(&i)) {
                let peer = p.peer_of(i);
                peers.insert(peer);
                configs.push(PairConfig {
                    pair: p.id.clone(),
                    vm: p.vm.clone(),
                    primary: nodes[p.nodes[0]].clone(),
                    spare: nodes[p.nodes[1]].clone(),
                    local: node.clone(),
                    witness: plan.witness,
                    peer_fence_delay: fence_delay(peer, k),
                    policy: policy.clone(),
                });
            }
            agents.push(Agent {
                node: node.clone(),
                configs,
                peers: peers.into_iter().collect(),
                store: Store::default(),
                engine: None,
                incarnation: 0,
                tasks: BTreeMap::new(),
                executors: BTreeMap::new(),
                holds: BTreeSet::new(),
                clock: Arc::new(SkewClock::new(world.clock(), plan.skew_ms[i])),
                crash_when_busy: None,
            });
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let np = pairs.len();
        let mut sim = Sim {
            cfg: cfg.clone(),
            world,
            net: Net::default(),
            nodes,
            pairs,
            agents,
            plan,
            queue: BTreeMap::new(),
            seq: 0,
            rng: Rng::new(seed, 2),
            checker,
            tx,
            rx,
            origin: tokio::time::Instant::now(),
            running: vec![[false; 2]; np],
            holds: vec![[None; 2]; np],
            knows: vec![vec![None; cfg.pairs]; k],
            off_since: vec![None; k],
            power_on_due: vec![false; k],
            lossy: Vec::new(),
            witness_cut: BTreeMap::new(),
            lie: BTreeSet::new(),
            in_liveness: false,
            end_at: Instant::NEVER,
            blocked_since: BTreeMap::new(),
            pending_detect: BTreeMap::new(),
            decision: BTreeMap::new(),
            metrics: Metrics::default(),
            trace: Trace::new(trace),
            failure: None,
            steps: 0,
            finished: false,
        };
        let plan_text = sim.plan.to_string();
        sim.trace
            .line(Instant::ZERO, || format!("seed {seed}: {plan_text}"));
        for (t, act) in sim.plan.acts.clone() {
            sim.schedule(Instant::ZERO + t, Ev::Act(act));
        }
        for i in 0..k {
            sim.schedule(
                Instant::ZERO + Duration::from_millis(100 + 137 * i as u64),
                Ev::Beat(i),
            );
        }
        sim.schedule(Instant::ZERO + Duration::from_secs(5), Ev::Operator);
        if sim.plan.witness {
            sim.schedule(Instant::ZERO + Duration::from_millis(500), Ev::Witness);
        }
        sim.schedule(Instant::ZERO + cfg.safety, Ev::Liveness);
        sim.after_step();
        for i in 0..k {
            sim.start_agent(i);
        }
        Ok(sim)
    }

    fn now(&self) -> Instant {
        Instant::from_origin(tokio::time::Instant::now() - self.origin)
    }

    fn schedule(&mut self, at: Instant, ev: Ev) {
        self.seq += 1;
        self.queue.insert((at, self.seq), ev);
    }

    fn schedule_in(&mut self, d: Duration, ev: Ev) {
        let at = self.now() + d;
        self.schedule(at, ev);
    }

    fn fail(&mut self, f: Failure) {
        if self.failure.is_none() {
            let now = self.now();
            let text = f.to_string();
            self.trace.line(now, || format!("VIOLATION {text}"));
            self.failure = Some(f);
        }
    }

    fn record(&mut self, r: Record) {
        if self.failure.is_some() {
            return;
        }
        if let Err(v) = self.checker.record(&r) {
            self.fail(Failure::Safety(v));
        }
    }

    /// The event loop, until the liveness phase succeeds or ends, or an
    /// invariant breaks.
    pub(crate) async fn run(&mut self) {
        while self.failure.is_none() && !self.finished {
            let wake = self.next_wake();
            let deadline = self.origin + wake.since_origin();
            tokio::select! {
                biased;
                Some(d) = self.rx.recv() => self.on_done(d),
                _ = tokio::time::sleep_until(deadline) => self.on_wake(),
            }
        }
    }

    fn next_wake(&self) -> Instant {
        let mut t = self.end_at;
        if let Some(((at, _), _)) = self.queue.first_key_value() {
            t = t.min(*at);
        }
        for a in &self.agents {
            if let Some(e) = &a.engine {
                t = t.min(e.next_timeout());
            }
        }
        t
    }

    fn on_wake(&mut self) {
        let now = self.now();
        if now >= self.end_at {
            return self.liveness_failed();
        }
        while let Some(entry) = self.queue.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let ev = entry.remove();
            self.on_event(ev);
            self.after_step();
            if self.failure.is_some() || self.finished {
                return;
            }
        }
        for i in 0..self.agents.len() {
            let due = self.agents[i]
                .engine
                .as_ref()
                .is_some_and(|e| e.next_timeout() <= now);
            if due {
                let out = self.agents[i]
                    .engine
                    .as_mut()
                    .expect("checked")
                    .tick(now)
                    .expect("memory store");
                self.apply(i, out);
                self.after_step();
                if self.failure.is_some() {
                    return;
                }
            }
        }
    }

    // ---- agents

    fn executors(&self, i: usize) -> BTreeMap<PairId, Arc<Executor>> {
        let gate = Arc::new(FenceGate::default());
        let a = &self.agents[i];
        let mut out = BTreeMap::new();
        for p in self.pairs.iter().filter(|p| p.nodes.contains(&i)) {
            let peer = p.peer_of(i);
            let mut hypervisors: BTreeMap<NodeId, Arc<dyn Hypervisor>> = BTreeMap::new();
            for &n in &p.nodes {
                hypervisors.insert(
                    self.nodes[n].clone(),
                    Arc::new(SwarmHv {
                        inner: SimHypervisor::new(&self.world, &self.nodes[n]),
                        world: self.world.clone(),
                        net: self.net.clone(),
                        from: i,
                        to: n,
                        host_clock: self.agents[n].clock.clone(),
                    }),
                );
            }
            let replicator = Arc::new(SwarmReplicator {
                inner: SimReplicator::new(
                    &self.world,
                    &p.id,
                    &self.nodes[p.nodes[0]],
                    &self.nodes[p.nodes[1]],
                ),
                world: self.world.clone(),
                net: self.net.clone(),
                pair: p.id.clone(),
                local: i,
                nodes: [
                    (p.nodes[0], self.nodes[p.nodes[0]].clone()),
                    (p.nodes[1], self.nodes[p.nodes[1]].clone()),
                ],
            });
            let fencer = SwarmFencer {
                inner: SimFencer::new(&self.world).with_device(
                    &self.nodes[peer],
                    Secret::new(format!("pw-{}", self.nodes[peer])),
                ),
                world: self.world.clone(),
                net: self.net.clone(),
                index: vec![(self.nodes[peer].clone(), peer)],
            };
            let mut fencers: BTreeMap<NodeId, Arc<dyn wspare_core::Fencer>> = BTreeMap::new();
            fencers.insert(self.nodes[peer].clone(), Arc::new(fencer));
            let backends = PairBackends {
                spec: p.spec.clone(),
                hypervisors,
                replicator,
                fencers,
            };
            out.insert(
                p.id.clone(),
                Arc::new(Executor::new(
                    p.id.clone(),
                    a.node.clone(),
                    Arc::new(backends),
                    deadlines(),
                    a.clock.clone(),
                    gate.clone(),
                )),
            );
        }
        out
    }

    fn start_agent(&mut self, i: usize) {
        let a = &self.agents[i];
        if a.engine.is_some() || !a.holds.is_empty() {
            return;
        }
        let now = self.now();
        let executors = self.executors(i);
        let a = &mut self.agents[i];
        a.incarnation += 1;
        a.executors = executors;
        let restored = a.incarnation > 1;
        let (engine, out) = Engine::open(a.node.clone(), a.configs.clone(), a.store.clone(), now)
            .expect("the memory journal opens");
        a.engine = Some(engine);
        let node = a.node.clone();
        self.trace.line(now, || {
            if restored {
                format!("agent {node} starts, restoring from its journal")
            } else {
                format!("agent {node} starts")
            }
        });
        self.pending_detect.retain(|_, (_, failed, _)| *failed != i);
        self.apply(i, out);
    }

    /// The agent dies (host off, driver crash, hang): its in-flight actions
    /// are abandoned and their outcome is unknown.
    fn kill_agent(&mut self, i: usize, why: &str) {
        let now = self.now();
        let Some(engine) = self.agents[i].engine.take() else {
            return;
        };
        let node = self.nodes[i].clone();
        self.trace
            .line(now, || format!("agent {node} is down: {why}"));
        let mut unknown = Vec::new();
        for p in &self.agents[i].configs {
            if let Some(m) = engine.machine(&p.pair) {
                for pending in m.pending().iter().filter(|x| !x.held) {
                    unknown.push((p.pair.clone(), pending.id));
                }
            }
        }
        for (pair, id) in unknown {
            self.record(Record::Completed {
                pair,
                node: node.clone(),
                id,
                outcome: Outcome::Unknown,
            });
        }
        for (_, t) in std::mem::take(&mut self.agents[i].tasks) {
            t.abort.abort();
        }
        self.agents[i].crash_when_busy = None;
        self.agents[i].executors.clear();
    }

    fn release(&mut self, i: usize, hold: Hold) {
        self.agents[i].holds.remove(&hold);
        self.start_agent(i);
    }

    /// Records and hands out what an engine step produced.
    fn apply(&mut self, i: usize, out: Output) {
        let now = self.now();
        for ev in &out.events {
            self.on_machine_event(i, ev, now);
        }
        for (pair, action) in out.actions {
            self.issue(i, pair, action, now);
        }
        self.update_knows(i);
    }

    fn machine(&self, i: usize, pair: &PairId) -> Option<&Machine> {
        self.agents[i].engine.as_ref()?.machine(pair)
    }

    fn pair_index(&self, pair: &PairId) -> usize {
        self.pairs
            .iter()
            .position(|p| p.id == *pair)
            .expect("a configured pair")
    }

    fn issue(&mut self, i: usize, pair: PairId, action: Action, now: Instant) {
        let m = self.machine(i, &pair).expect("a machine of this agent");
        let epoch = m.epoch();
        let maintenance = m.status().maintenance;
        let fencing_for_failover = matches!(m.phase(), Phase::Fencing { failover: true, .. });
        let j = self.pair_index(&pair);
        // Was the old active up, with the VM running, when the failover
        // was decided? Then it is a false failover.
        let decision_target = match &action.op {
            Op::Fence { node } if fencing_for_failover => Some(node.clone()),
            op if is_failover_start(op) => Some(self.nodes[self.pairs[j].peer_of(i)].clone()),
            _ => None,
        };
        if let Some(t) = decision_target {
            let up = self.world.host_power(&t) == Some(PowerState::On)
                && self.world.vm_state(&t, &self.pairs[j].vm).is_live();
            self.decision.entry((i, pair.clone())).or_insert(up);
        }
        let node = self.nodes[i].clone();
        self.trace.line(now, || {
            format!(
                "act {node} {pair} #{} {} ({epoch}{})",
                action.id.0,
                action.op,
                if maintenance { ", maintenance" } else { "" }
            )
        });
        self.record(Record::Issued {
            pair: pair.clone(),
            node: node.clone(),
            epoch,
            maintenance,
            action: action.clone(),
        });
        let ex = self.agents[i].executors[&pair].clone();
        let tx = self.tx.clone();
        let incarnation = self.agents[i].incarnation;
        let (op, id) = (action.op.clone(), action.id);
        let p = pair.clone();
        let h = tokio::spawn(async move {
            let outcome = ex.run(&op).await;
            let _ = tx.send(Done {
                agent: i,
                incarnation,
                pair: p,
                id,
                outcome,
            });
        });
        self.agents[i].tasks.insert(
            (pair, action.id),
            Task {
                abort: h.abort_handle(),
                op: action.op,
            },
        );
    }

    fn on_done(&mut self, d: Done) {
        let a = &mut self.agents[d.agent];
        if a.engine.is_none() || a.incarnation != d.incarnation {
            return;
        }
        let Some(task) = a.tasks.remove(&(d.pair.clone(), d.id)) else {
            return;
        };
        let now = self.now();
        let node = self.nodes[d.agent].clone();
        self.trace.line(now, || {
            format!(
                "done {node} {} #{} {}: {}",
                d.pair,
                d.id.0,
                task.op.name(),
                short(&d.outcome)
            )
        });
        if is_failover_start(&task.op) && matches!(d.outcome, Outcome::Ok(_)) {
            self.metrics.failovers += 1;
            if self.decision.remove(&(d.agent, d.pair.clone())) == Some(true) {
                self.metrics.false_failovers += 1;
                let pair = d.pair.clone();
                self.trace.line(now, || {
                    format!("metric: false failover of {pair}: the old active was up with the VM running when it was decided")
                });
            }
        }
        self.record(Record::Completed {
            pair: d.pair.clone(),
            node,
            id: d.id,
            outcome: d.outcome.clone(),
        });
        let out = self.agents[d.agent]
            .engine
            .as_mut()
            .expect("checked")
            .handle(
                &d.pair,
                Input::ActionDone {
                    id: d.id,
                    outcome: d.outcome,
                },
                now,
            )
            .expect("a configured pair");
        self.apply(d.agent, out);
        self.after_step();
    }

    fn on_machine_event(&mut self, i: usize, ev: &Event, now: Instant) {
        self.trace.line(now, || format!("event {ev}"));
        let EventKind::Transition { to, .. } = ev.kind else {
            return;
        };
        if to == PhaseName::Suspect {
            if let Some(&(t, _, spare)) = self.pending_detect.get(&ev.pair) {
                if spare == i {
                    self.metrics.detect_ms.push((now - t).as_millis() as u64);
                    self.pending_detect.remove(&ev.pair);
                }
            }
        }
        // A new suspicion, or back to normal: the next failover decision
        // is a new one.
        if matches!(
            to,
            PhaseName::Suspect | PhaseName::Protected | PhaseName::Degraded
        ) {
            self.decision.remove(&(i, ev.pair.clone()));
        }
    }

    fn update_knows(&mut self, i: usize) {
        let Some(engine) = self.agents[i].engine.as_ref() else {
            return;
        };
        let mut changed = Vec::new();
        for (x, p) in self.agents[i].configs.iter().enumerate() {
            let Some(m) = engine.machine(&p.pair) else {
                continue;
            };
            if let Some(g) = m.view().newest {
                if self.knows[i][x] != Some(g.generation) {
                    changed.push((x, p.pair.clone(), g.generation));
                }
            }
        }
        for (x, pair, g) in changed {
            self.knows[i][x] = Some(g);
            self.record(Record::Knows {
                pair,
                node: self.nodes[i].clone(),
                generation: g,
            });
        }
    }

    fn command(&mut self, i: usize, pair: &PairId, cmd: Command) {
        let now = self.now();
        let node = self.nodes[i].clone();
        if self.agents[i].engine.is_none() {
            self.trace.line(now, || {
                format!("operator: {node} is down; cannot ask {pair} for {cmd:?}")
            });
            return;
        }
        self.record(Record::Commanded {
            pair: pair.clone(),
            node: node.clone(),
            command: cmd.clone(),
        });
        let text = format!("{cmd:?}");
        let (answer, out) = self.agents[i]
            .engine
            .as_mut()
            .expect("checked")
            .command(pair, cmd, now)
            .expect("a configured pair");
        self.trace.line(now, || {
            format!(
                "operator -> {node} {pair}: {text}: {}",
                match &answer {
                    Ok(()) => "accepted".to_string(),
                    Err(why) => format!("refused: {why}"),
                }
            )
        });
        self.apply(i, out);
    }

    // ---- the world after each step

    fn after_step(&mut self) {
        self.steps += 1;
        if self.failure.is_some() {
            return;
        }
        let now = self.now();
        let (nodes, pairs) = (&self.nodes, &self.pairs);
        let (live, held, power) = self.world.with(|st, _| {
            let mut live = Vec::with_capacity(pairs.len());
            let mut held = Vec::with_capacity(pairs.len());
            for PairDef {
                id: pair,
                vm,
                nodes: ns,
                ..
            } in pairs
            {
                let mut l = [false; 2];
                let mut h = [None; 2];
                for (x, &n) in ns.iter().enumerate() {
                    l[x] = st
                        .hosts
                        .get(&nodes[n])
                        .and_then(|host| host.vms.get(vm))
                        .is_some_and(|v| v.state.is_live());
                    h[x] = st
                        .replicas
                        .get(pair)
                        .and_then(|r| r.stores.get(&nodes[n]))
                        .and_then(|s| s.keys().next_back().copied());
                }
                live.push(l);
                held.push(h);
            }
            let power: Vec<bool> = nodes
                .iter()
                .map(|n| st.hosts.get(n).is_some_and(|h| h.power == PowerState::On))
                .collect();
            (live, held, power)
        });
        for j in 0..self.pairs.len() {
            for x in 0..2 {
                if live[j][x] != self.running[j][x] {
                    self.running[j][x] = live[j][x];
                    let pair = self.pairs[j].id.clone();
                    let node = self.nodes[self.pairs[j].nodes[x]].clone();
                    let running = live[j][x];
                    self.trace.line(now, || {
                        format!(
                            "truth {pair}: the VM {} on {node}",
                            if running { "runs" } else { "stopped" }
                        )
                    });
                    self.record(Record::Running {
                        pair,
                        node,
                        running,
                    });
                }
                if held[j][x] != self.holds[j][x] {
                    self.holds[j][x] = held[j][x];
                    if let Some(g) = held[j][x] {
                        self.record(Record::Holds {
                            pair: self.pairs[j].id.clone(),
                            node: self.nodes[self.pairs[j].nodes[x]].clone(),
                            generation: g,
                        });
                    }
                }
            }
        }
        for (i, &on) in power.iter().enumerate() {
            if !on && self.off_since[i].is_none() {
                self.off_since[i] = Some(now);
                self.agents[i].holds.insert(Hold::HostOff);
                self.kill_agent(i, "its host is powered off");
                self.plan_power_on(i);
            }
        }
        for i in 0..self.agents.len() {
            if let Some((give_up, down)) = self.agents[i].crash_when_busy {
                let busy = self.agents[i]
                    .tasks
                    .values()
                    .any(|t| !t.op.is_observation());
                if busy || now >= give_up {
                    self.agents[i].crash_when_busy = None;
                    self.crash_driver(i, down);
                }
            }
        }
    }

    fn plan_power_on(&mut self, i: usize) {
        if self.power_on_due[i] {
            return;
        }
        let since = self.off_since[i].unwrap_or(self.now());
        let at = if self.in_liveness {
            let soon = self.now() + self.rng.millis(Duration::ZERO, Duration::from_secs(30));
            soon.max(since + MIN_HOST_DOWN)
        } else if !self.plan.scripted && self.rng.chance(0.85) {
            since + self.rng.millis(MIN_HOST_DOWN, Duration::from_secs(300))
        } else {
            return;
        };
        self.power_on_due[i] = true;
        self.schedule(at, Ev::PowerOn(i));
    }

    fn crash_driver(&mut self, i: usize, down: Duration) {
        self.note_failure(i);
        self.agents[i].holds.insert(Hold::Crashed);
        self.kill_agent(i, "its driver crashed");
        self.schedule_in(down, Ev::Release(i, Hold::Crashed));
    }

    /// Node `i` fails: the spares of the pairs it runs should suspect it.
    fn note_failure(&mut self, i: usize) {
        if self.agents[i].engine.is_none() {
            return;
        }
        let now = self.now();
        for (j, p) in self.pairs.iter().enumerate() {
            let x = if p.nodes[0] == i {
                0
            } else if p.nodes[1] == i {
                1
            } else {
                continue;
            };
            // Measured only from a spare that watches: steady, not yet
            // suspecting, not in maintenance.
            let spare = p.nodes[1 - x];
            let watching = self.machine(spare, &p.id).is_some_and(|m| {
                let st = m.status();
                m.phase().is_steady() && !st.peer_suspected && !st.maintenance
            });
            if self.running[j][x] && watching {
                self.pending_detect.insert(p.id.clone(), (now, i, spare));
            }
        }
    }

    // ---- events

    fn on_event(&mut self, ev: Ev) {
        let now = self.now();
        match ev {
            Ev::Act(act) => self.act(act),
            Ev::Beat(i) => {
                self.schedule_in(Duration::from_secs(1), Ev::Beat(i));
                self.beat(i);
            }
            Ev::Deliver { from, to, views } => {
                if let Some(e) = self.agents[to].engine.as_mut() {
                    let out = e
                        .heartbeat(&self.nodes[from], &views, now)
                        .expect("memory store");
                    self.apply(to, out);
                }
            }
            Ev::Witness => {
                self.schedule_in(Duration::from_secs(1), Ev::Witness);
                self.witness();
            }
            Ev::Operator => {
                self.schedule_in(Duration::from_secs(5), Ev::Operator);
                if self.cfg.operator {
                    self.operator();
                }
                if self.in_liveness {
                    self.check_liveness();
                }
            }
            Ev::Liveness => self.begin_liveness(),
            Ev::Release(i, hold) => self.release(i, hold),
            Ev::PowerOn(i) => {
                self.power_on_due[i] = false;
                self.world.power_on(&self.nodes[i]);
                self.off_since[i] = None;
                let node = self.nodes[i].clone();
                self.trace
                    .line(now, || format!("host {node} is powered on"));
                let boot = self
                    .rng
                    .millis(Duration::from_secs(5), Duration::from_secs(20));
                self.schedule_in(boot, Ev::Release(i, Hold::HostOff));
            }
            Ev::Heal(h) => self.heal(h),
            Ev::EndTest(j) => {
                for x in 0..2 {
                    let i = self.pairs[j].nodes[x];
                    let pair = self.pairs[j].id.clone();
                    let has_clone = self
                        .machine(i, &pair)
                        .is_some_and(|m| m.status().test_clone.is_some());
                    if has_clone {
                        self.command(i, &pair, Command::EndTest);
                    }
                }
            }
            Ev::EndMaintenance(j) => {
                for x in 0..2 {
                    let i = self.pairs[j].nodes[x];
                    let pair = self.pairs[j].id.clone();
                    if self
                        .machine(i, &pair)
                        .is_some_and(|m| m.status().maintenance)
                    {
                        self.command(i, &pair, Command::Maintenance(false));
                    }
                }
            }
        }
    }

    fn loss(&self, a: usize, b: usize) -> f64 {
        let mut keep = 1.0 - self.plan.loss;
        for &(x, y, l, _) in &self.lossy {
            if (x, y) == (a, b) || (x, y) == (b, a) {
                keep *= 1.0 - l;
            }
        }
        1.0 - keep
    }

    fn beat(&mut self, i: usize) {
        let Some(engine) = self.agents[i].engine.as_ref() else {
            return;
        };
        let mut sends = Vec::new();
        for &j in &self.agents[i].peers {
            sends.push((j, engine.views_for(&self.nodes[j])));
        }
        for (j, views) in sends {
            let lost = self.rng.chance(self.loss(i, j));
            let jitter = self.rng.millis(Duration::ZERO, self.plan.jitter);
            if lost || !self.net.lock().link_up(i, j) {
                continue;
            }
            self.schedule_in(
                self.plan.latency + jitter,
                Ev::Deliver {
                    from: i,
                    to: j,
                    views,
                },
            );
        }
    }

    fn witness(&mut self) {
        let now = self.now();
        for x in 0..self.agents.len() {
            if self.agents[x].engine.is_none() || self.witness_cut.contains_key(&x) {
                continue;
            }
            for y in self.agents[x].peers.clone() {
                let alive = self.world.host_power(&self.nodes[y]) == Some(PowerState::On)
                    && !self.witness_cut.contains_key(&y);
                let pairs: Vec<PairId> = self.agents[x]
                    .configs
                    .iter()
                    .filter(|c| *c.peer() == self.nodes[y])
                    .map(|c| c.pair.clone())
                    .collect();
                for pair in pairs {
                    let input = Input::Witness {
                        node: self.nodes[y].clone(),
                        alive,
                    };
                    let out = self.agents[x]
                        .engine
                        .as_mut()
                        .expect("checked")
                        .handle(&pair, input, now)
                        .expect("a configured pair");
                    self.apply(x, out);
                }
            }
        }
    }
}

impl Sim {
    pub(crate) fn world_digest(&self) -> String {
        self.world.state_digest()
    }
}

fn enable_bug(policy: &mut Policy, bug: &str) -> Result<(), String> {
    #[cfg(feature = "inject-bugs")]
    {
        policy.bugs.enable(bug)
    }
    #[cfg(not(feature = "inject-bugs"))]
    {
        let _ = policy;
        Err(super::no_bugs_message(bug))
    }
}
