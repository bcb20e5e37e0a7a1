//! The deterministic swarm simulator: whole clusters of real failover
//! machines under seeded faults, with the core's invariant [`Checker`]
//! after every step.
//!
//! [`Checker`]: wspare_core::invariants::Checker
//!
//! # What runs
//!
//! One seed builds a cluster of `nodes` hosts (default 2, up to 5) and
//! `pairs` pairs (default 4), spread so that every node is active for some
//! pairs and spare for others. Each node runs an *agent*: the real
//! [`Engine`](wspare_core::driver::Engine) (the machines and their journal,
//! a [`MemoryStore`](wspare_core::journal::MemoryStore) that survives the
//! agent) and the real [`Executor`](wspare_core::driver::Executor)s, over
//! the sim backends of one [`SimWorld`](crate::sim::SimWorld). The second
//! channel (a node's view of its peer's hypervisor) and replication go over
//! the simulated network; fence devices sit on their own management
//! network.
//!
//! The agents' loop is the tokio [`Driver`](wspare_core::driver::Driver)'s
//! loop, rewritten around the engine so that the simulator sees every
//! action handed out (with the machine's epoch and maintenance flag), every
//! outcome, every operator command and every machine's newest generation,
//! and feeds them to the checker with the world's ground truth (where each
//! pair's VM runs, which generation each node holds). It runs on a
//! current-thread tokio runtime with a paused clock: actions are tokio
//! tasks (the executors' deadlines are tokio timeouts), time jumps to the
//! next timer whenever every task waits, and nothing reads the wall clock.
//! That is deterministic (one thread, a fixed order of events, ordered maps
//! only, every draw from ChaCha8 seeded by the seed) and fast: a seed of a
//! 2-node, 4-pair cluster (about ten simulated minutes, some 4,000 checked
//! steps) takes about 30 ms of one core in a release build. The real
//! `Driver` could not be used as is: it does not expose the actions it
//! hands out, and the checker needs them. This loop makes the same engine
//! calls (heartbeats, commands, ticks, outcomes), in a fixed order.
//!
//! # A run
//!
//! 1. **Safety phase** (default 10 simulated minutes): the plan's faults
//!    and operator acts, invariants checked after every step.
//! 2. **Liveness phase**: faults heal (partitions, world faults, fence
//!    devices), hosts are powered on, crashed agents restart; a careful
//!    operator resolves blocked pairs (confirm-down only a node that is
//!    really off, resume otherwise, accept data loss when the replica is
//!    stale, end maintenance and tests; and never overrule a peer whose
//!    journal shows it took over at a newer epoch: wait for it instead).
//!    The same operator also acts in the safety phase, on pairs blocked for
//!    a minute. Every pair must then be
//!    *protected* within the bound (default 10 simulated minutes): both
//!    machines in `protected`, agreeing on epoch and active node, and the
//!    VM running on that node only. A pair that does not get there is a
//!    liveness violation, reported with each machine's last phase and
//!    reason.
//!
//! # The fault model
//!
//! A seed draws its fault rates (each kind off, or up to a maximum rate),
//! then a plan of timed faults:
//!
//! - host crash (power cut: its VMs stop, its agent dies; powered on again
//!   after at least 60 s, or only in the liveness phase; its agent
//!   restarts from its journal after booting);
//! - driver crash (the agent dies, host and VMs keep running; restarts from
//!   its journal; often timed to hit an action in flight, whose outcome is
//!   then unknown);
//! - VM crash; clock steps and a per-node clock skew (the wall clock the
//!   node's executors see: receipts, replica ages);
//! - network: base loss, latency, jitter; lossy links; two-way and one-way
//!   partitions between agents (a remote call needs both directions);
//! - the hypervisor daemon unreachable or hanging; replication
//!   unreachable, failing, hanging, broken once, corrupting once;
//! - fence devices failing, hanging, dead (BMC unreachable), stuck on;
//! - a witness (some seeds) that can lose sight of nodes;
//! - operator acts: maintenance, switchover, failback, test failover.
//!
//! Some combinations defeat any failover system; the plan never makes them:
//!
//! - **A lying fence device where nothing can see the lie.** A device that
//!   reports off while the node runs is caught only by the post-fence check
//!   (the fenced node's hypervisor still reports the VM). Lies happen only
//!   in a *lie episode*: node N's agent hangs (its host, hypervisor and VMs
//!   keep running), its fence device lies, and the other nodes cannot reach
//!   N's hypervisor, so the suspicion is confirmed, *until the device has
//!   lied once*: from then on N's hypervisor answers, at the post-fence
//!   check too. During an episode nothing else may hide N's hypervisor or
//!   touch N (partitions with N, hypervisor and fence faults on N, crashes
//!   of N's host or driver, VM crashes on N are skipped), and the episode
//!   lasts until 35 s after the last lie (the driver shares a fence
//!   receipt for 30 s). The machine's fence check is what makes the
//!   `trust-lying-fencer` defect visible.
//! - **An operator confirming a running node down.** The operator confirms
//!   a node down only when its host is really off (and has not taken over,
//!   by its journal).
//! - **A host back within the receipt-sharing window.** A host stays off
//!   at least 60 s, longer than the 30 s a fence receipt is shared.
//!
//! # On failure
//!
//! The report names the seed, the invariant (or the stuck pairs) and how
//! to replay it: `WSPARE_SEED=<seed>` for the tests, `wspare-sim --seed
//! <seed>` for the binary; a replay with the trace prints every fault,
//! action, outcome, event and ground-truth change. [`check_determinism`]
//! runs one seed twice and compares the hashes of the two traces.

mod net;
mod plan;
mod rng;
mod sim;
mod story;

#[cfg(test)]
mod tests;

use std::fmt;
use std::time::Duration;

use sha2::{Digest, Sha256};
use wspare_core::invariants::Violation;
use wspare_core::machine::PairStatus;
use wspare_core::{Instant, NodeId, PairId};

pub use story::{story, story_config, Story};

/// What to simulate.
#[derive(Clone, Debug, PartialEq)]
pub struct SwarmConfig {
    /// Nodes (2 to 5).
    pub nodes: usize,
    /// Pairs (1 to 32), spread over the nodes.
    pub pairs: usize,
    /// A deliberate defect to switch on (needs the `inject-bugs` feature).
    pub bug: Option<String>,
    /// The safety phase.
    pub safety: Duration,
    /// How long the liveness phase may take.
    pub liveness: Duration,
    /// Faults in the safety phase (off: a quiet cluster).
    pub faults: bool,
    /// Whether the careful operator acts (off only to test the liveness
    /// check itself).
    pub operator: bool,
}

impl Default for SwarmConfig {
    fn default() -> Self {
        SwarmConfig {
            nodes: 2,
            pairs: 4,
            bug: None,
            safety: Duration::from_secs(600),
            liveness: Duration::from_secs(600),
            faults: true,
            operator: true,
        }
    }
}

/// The message for `--inject-bug` in a build without the defects.
pub fn no_bugs_message(bug: &str) -> String {
    format!(
        "cannot inject {bug:?}: this build has no deliberate defects; build with the `inject-bugs` feature, e.g. `cargo run --release -p wspare-examples --no-default-features --features inject-bugs --bin wspare-sim -- --seeds 1000 --inject-bug {bug}`"
    )
}

impl SwarmConfig {
    /// Checks the sizes and the bug name.
    pub fn validate(&self) -> Result<(), String> {
        if !(2..=5).contains(&self.nodes) {
            return Err(format!("nodes must be 2 to 5, not {}", self.nodes));
        }
        if !(1..=32).contains(&self.pairs) {
            return Err(format!("pairs must be 1 to 32, not {}", self.pairs));
        }
        if self.safety < Duration::from_secs(60) {
            return Err("the safety phase must last at least 60 s".into());
        }
        if let Some(b) = &self.bug {
            #[cfg(feature = "inject-bugs")]
            {
                if !wspare_core::machine::Bugs::NAMES.contains(&b.as_str()) {
                    return Err(format!(
                        "unknown bug {b:?}; known: {}",
                        wspare_core::machine::Bugs::NAMES.join(", ")
                    ));
                }
            }
            #[cfg(not(feature = "inject-bugs"))]
            return Err(no_bugs_message(b));
        }
        Ok(())
    }

    /// The command lines that replay `seed` with this configuration.
    pub fn replay(&self, seed: u64) -> String {
        let mut args = format!("--nodes {} --pairs {}", self.nodes, self.pairs);
        let mut features = String::new();
        if let Some(b) = &self.bug {
            args.push_str(&format!(" --inject-bug {b}"));
            features = " --features inject-bugs".into();
        }
        format!(
            "replay: WSPARE_SEED={seed} cargo test -p wspare-testkit{features} swarm (the tests)\n        cargo run --release -p wspare-examples --no-default-features{features} --bin wspare-sim -- --seed {seed} {args}"
        )
    }
}

/// A seed's trace: faults, actions, outcomes, events and ground-truth
/// changes, one line each (recorded only when asked for; the run is the
/// same either way).
#[derive(Clone, Debug, Default)]
pub struct Trace {
    on: bool,
    lines: Vec<String>,
}

impl Trace {
    pub(crate) fn new(on: bool) -> Self {
        Trace {
            on,
            lines: Vec::new(),
        }
    }

    pub(crate) fn line(&mut self, at: Instant, f: impl FnOnce() -> String) {
        if self.on {
            let t = at.since_origin().as_secs_f64();
            self.lines.push(format!("[{t:>9.3}s] {}", f()));
        }
    }

    /// The lines.
    pub fn lines(&self) -> &[String] {
        &self.lines
    }

    /// SHA-256 of the lines, hex.
    pub fn hash(&self) -> String {
        let mut h = Sha256::new();
        for l in &self.lines {
            h.update(l.as_bytes());
            h.update(b"\n");
        }
        hex::encode(h.finalize())
    }
}

/// One machine of a stuck pair.
#[derive(Clone, Debug)]
pub struct StuckMachine {
    /// Its node.
    pub node: NodeId,
    /// Its status; `None` if its agent is down.
    pub status: Option<PairStatus>,
}

/// A pair that did not reach `protected` in the liveness phase.
#[derive(Clone, Debug)]
pub struct Stuck {
    /// The pair.
    pub pair: PairId,
    /// Its two machines.
    pub machines: Vec<StuckMachine>,
    /// Where its VM runs.
    pub running_on: Vec<NodeId>,
}

/// What went wrong in a seed.
#[derive(Clone, Debug)]
pub enum Failure {
    /// A safety invariant broke.
    Safety(Violation),
    /// Pairs did not reach `protected` within the bound.
    Liveness {
        /// The bound.
        bound: Duration,
        /// The pairs, with their last phase and reason.
        stuck: Vec<Stuck>,
    },
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Safety(v) => write!(f, "safety: {v}"),
            Failure::Liveness { bound, stuck } => {
                write!(
                    f,
                    "liveness: {} pair(s) not protected {bound:?} into the liveness phase:",
                    stuck.len()
                )?;
                for s in stuck {
                    let on: Vec<&str> = s.running_on.iter().map(|n| n.as_str()).collect();
                    write!(f, " {} (VM runs on [{}];", s.pair, on.join(", "))?;
                    for m in &s.machines {
                        match &m.status {
                            None => write!(f, " {}: agent down;", m.node)?,
                            Some(st) => write!(
                                f,
                                " {}: {} at {}, {} active{};",
                                m.node,
                                st.phase,
                                st.epoch,
                                st.active,
                                st.detail
                                    .as_ref()
                                    .map(|d| format!(": {d}"))
                                    .unwrap_or_default()
                            )?,
                        }
                    }
                    write!(f, ")")?;
                }
                Ok(())
            }
        }
    }
}

/// Counts of one seed.
#[derive(Clone, Debug, Default)]
pub struct Metrics {
    /// Spares started after fencing (or an operator's confirm-down).
    pub failovers: u64,
    /// Failovers decided while the old active's host was up and its VM
    /// running (a partition, a hung agent).
    pub false_failovers: u64,
    /// From an injected failure of an active node (host crash, driver
    /// crash, hang) to its spare's suspicion, ms.
    pub detect_ms: Vec<u64>,
    /// When every pair was protected in the liveness phase.
    pub liveness_at: Option<Instant>,
}

/// The result of one seed.
#[derive(Clone, Debug)]
pub struct SeedReport {
    /// The seed.
    pub seed: u64,
    /// What went wrong, if anything.
    pub failure: Option<Failure>,
    /// Its counts.
    pub metrics: Metrics,
    /// Its trace (empty unless asked for).
    pub trace: Trace,
    /// Steps (inputs, outcomes, faults) checked.
    pub steps: u64,
    /// Simulated time.
    pub sim_time: Duration,
    /// The world's state digest at the end.
    pub world_digest: String,
}

impl SeedReport {
    /// The failure with the seed and how to replay it.
    pub fn explain(&self, cfg: &SwarmConfig) -> Option<String> {
        let f = self.failure.as_ref()?;
        Some(format!(
            "seed {} FAILED: {f}\n{}",
            self.seed,
            cfg.replay(self.seed)
        ))
    }
}

/// Runs one seed. With `trace`, the report carries the trace.
pub fn run_seed(seed: u64, cfg: &SwarmConfig, trace: bool) -> Result<SeedReport, String> {
    run(seed, cfg, trace, None)
}

pub(crate) fn run(
    seed: u64,
    cfg: &SwarmConfig,
    trace: bool,
    script: Option<plan::Plan>,
) -> Result<SeedReport, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .map_err(|e| format!("cannot build the simulator's runtime: {e}"))?;
    rt.block_on(async {
        let start = tokio::time::Instant::now();
        let mut s = sim::Sim::build(seed, cfg, trace, script).await?;
        s.run().await;
        Ok(SeedReport {
            seed,
            failure: s.failure.take(),
            metrics: std::mem::take(&mut s.metrics),
            trace: std::mem::take(&mut s.trace),
            steps: s.steps,
            sim_time: tokio::time::Instant::now() - start,
            world_digest: s.world_digest(),
        })
    })
}

/// The outcome of a determinism check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Determinism {
    /// The seed.
    pub seed: u64,
    /// Trace hash (and world digest) of the first run.
    pub first: String,
    /// Of the second.
    pub second: String,
    /// Lines in the trace.
    pub lines: usize,
}

impl Determinism {
    /// Whether both runs agree.
    pub fn same(&self) -> bool {
        self.first == self.second
    }
}

/// Runs `seed` twice with its trace and compares the hashes.
pub fn check_determinism(seed: u64, cfg: &SwarmConfig) -> Result<Determinism, String> {
    let a = run_seed(seed, cfg, true)?;
    let b = run_seed(seed, cfg, true)?;
    Ok(Determinism {
        seed,
        first: format!("{}/{}", a.trace.hash(), a.world_digest),
        second: format!("{}/{}", b.trace.hash(), b.world_digest),
        lines: a.trace.lines().len(),
    })
}

/// Totals over seeds.
#[derive(Clone, Debug, Default)]
pub struct Summary {
    /// Seeds run.
    pub seeds: u64,
    /// Seeds that failed, with their failure.
    pub failed: Vec<(u64, Failure)>,
    /// Failovers.
    pub failovers: u64,
    /// False failovers.
    pub false_failovers: u64,
    /// Detection latencies, ms.
    pub detect_ms: Vec<u64>,
    /// Steps checked.
    pub steps: u64,
    /// Simulated time, all seeds.
    pub sim_time: Duration,
}

impl Summary {
    /// Adds a seed's report.
    pub fn add(&mut self, r: &SeedReport) {
        self.seeds += 1;
        if let Some(f) = &r.failure {
            self.failed.push((r.seed, f.clone()));
        }
        self.failovers += r.metrics.failovers;
        self.false_failovers += r.metrics.false_failovers;
        self.detect_ms.extend(&r.metrics.detect_ms);
        self.steps += r.steps;
        self.sim_time += r.sim_time;
    }

    /// The `p`th percentile of the detection latencies (nearest rank).
    pub fn detect_percentile(&self, p: f64) -> Option<u64> {
        percentile(&self.detect_ms, p)
    }

    /// The summary line: `seeds=N violations=V failovers=F
    /// false-failovers=X p50-detect-ms=… p99-detect-ms=…`.
    pub fn line(&self) -> String {
        let pct = |p| {
            self.detect_percentile(p)
                .map(|v| v.to_string())
                .unwrap_or_else(|| "-".into())
        };
        format!(
            "seeds={} violations={} failovers={} false-failovers={} p50-detect-ms={} p99-detect-ms={}",
            self.seeds,
            self.failed.len(),
            self.failovers,
            self.false_failovers,
            pct(50.0),
            pct(99.0)
        )
    }
}

fn percentile(v: &[u64], p: f64) -> Option<u64> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_unstable();
    let rank = ((p / 100.0) * s.len() as f64).ceil().max(1.0) as usize;
    Some(s[rank.min(s.len()) - 1])
}
