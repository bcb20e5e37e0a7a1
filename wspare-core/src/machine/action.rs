//! What a machine asks for: [`Action`]s, each with an id, each answered by
//! an `ActionDone` input with its [`Outcome`].

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{ErrorKind, Failure};
use crate::generation::{Generation, GenerationInfo};
use crate::hypervisor::VmState;
use crate::ids::{ActionId, NodeId};
use crate::receipt::{FenceReceipt, PowerState};

/// One obligation: do `op`, then answer with `Input::ActionDone { id, .. }`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Action {
    /// Its id, unique within the pair.
    pub id: ActionId,
    /// What to do.
    pub op: Op,
}

/// What to do. Ops that name a node act on that node's copy (through that
/// node's hypervisor, replicator end or fencer).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Op {
    /// Read the VM's state on `node`. Answer: [`Answer::Observed`].
    Observe {
        /// Whose copy.
        node: NodeId,
    },
    /// Read the replicator's status. Answer: [`Answer::Replica`].
    QueryReplica,
    /// First full copy from `source` to `target`. Answer: [`Answer::Generation`].
    InitialSync {
        /// Copy from.
        source: NodeId,
        /// Copy to.
        target: NodeId,
    },
    /// One replication cycle. The driver freezes the source VM's disks if it
    /// runs, or reads its files if stopped. Answer: [`Answer::Generation`].
    Sync {
        /// Copy from.
        source: NodeId,
        /// Copy to.
        target: NodeId,
    },
    /// Make the replicator's direction `source -> target` (after a
    /// failover). Answer: [`Answer::Done`].
    ReverseReplication {
        /// New source.
        source: NodeId,
        /// New target.
        target: NodeId,
    },
    /// Check generation `generation` against its checksums and the stopped
    /// source. Answer: [`Answer::Done`].
    Verify {
        /// Which.
        generation: Generation,
    },
    /// Power `node` off through its fencing topology. Answer: [`Answer::Fenced`].
    Fence {
        /// Whom.
        node: NodeId,
    },
    /// Read `node`'s power state (after a fence with unknown outcome).
    /// Answer: [`Answer::Power`].
    PowerStatus {
        /// Whom.
        node: NodeId,
    },
    /// Make `generation` usable on `node`. Answer: [`Answer::Promoted`].
    Promote {
        /// Where.
        node: NodeId,
        /// Which.
        generation: Generation,
    },
    /// Start the VM on `node`. The receipt proves the other copy is off.
    /// With a generation, the driver first defines the VM on the promoted
    /// disks. Answer: [`Answer::Done`].
    StartVm {
        /// Where.
        node: NodeId,
        /// Proof that the other copy is off.
        receipt: FenceReceipt,
        /// The promoted generation to start from (`None`: restart in place).
        generation: Option<Generation>,
    },
    /// Shut the VM down gracefully on `node`, within `timeout`. Answer:
    /// [`Answer::Stopped`].
    StopVm {
        /// Where.
        node: NodeId,
        /// Graceful shutdown deadline.
        timeout: Duration,
    },
    /// Stop the VM at once on `node`. Answer: [`Answer::Stopped`].
    DestroyVm {
        /// Where.
        node: NodeId,
    },
    /// Start an isolated test clone of `generation` on `node`, named from
    /// `label`, with no network shared with production. Answer: [`Answer::Done`].
    StartTestClone {
        /// Where.
        node: NodeId,
        /// From which generation.
        generation: Generation,
        /// Its label.
        label: String,
    },
    /// Destroy the test clone `label` and its disks. Answer: [`Answer::Done`].
    DestroyTestClone {
        /// Where.
        node: NodeId,
        /// Its label.
        label: String,
    },
}

impl Op {
    /// Short kebab-case name.
    pub fn name(&self) -> &'static str {
        match self {
            Op::Observe { .. } => "observe",
            Op::QueryReplica => "query-replica",
            Op::InitialSync { .. } => "initial-sync",
            Op::Sync { .. } => "sync",
            Op::ReverseReplication { .. } => "reverse-replication",
            Op::Verify { .. } => "verify",
            Op::Fence { .. } => "fence",
            Op::PowerStatus { .. } => "power-status",
            Op::Promote { .. } => "promote",
            Op::StartVm { .. } => "start-vm",
            Op::StopVm { .. } => "stop-vm",
            Op::DestroyVm { .. } => "destroy-vm",
            Op::StartTestClone { .. } => "start-test-clone",
            Op::DestroyTestClone { .. } => "destroy-test-clone",
        }
    }

    /// Whether the op only reads (allowed in maintenance, safe to repeat).
    pub fn is_observation(&self) -> bool {
        matches!(
            self,
            Op::Observe { .. } | Op::QueryReplica | Op::PowerStatus { .. } | Op::Verify { .. }
        )
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Op::Observe { node } => write!(f, "observe VM on {node}"),
            Op::QueryReplica => write!(f, "query replica"),
            Op::InitialSync { source, target } => write!(f, "initial sync {source} -> {target}"),
            Op::Sync { source, target } => write!(f, "sync {source} -> {target}"),
            Op::ReverseReplication { source, target } => {
                write!(f, "reverse replication to {source} -> {target}")
            }
            Op::Verify { generation } => write!(f, "verify {generation}"),
            Op::Fence { node } => write!(f, "fence {node}"),
            Op::PowerStatus { node } => write!(f, "read power status of {node}"),
            Op::Promote { node, generation } => write!(f, "promote {generation} on {node}"),
            Op::StartVm {
                node,
                generation: Some(g),
                ..
            } => write!(f, "start VM on {node} from {g}"),
            Op::StartVm {
                node,
                generation: None,
                ..
            } => write!(f, "start VM on {node} in place"),
            Op::StopVm { node, .. } => write!(f, "shut down VM on {node}"),
            Op::DestroyVm { node } => write!(f, "destroy VM on {node}"),
            Op::StartTestClone {
                node,
                generation,
                label,
            } => write!(f, "start test clone {label} of {generation} on {node}"),
            Op::DestroyTestClone { node, label } => {
                write!(f, "destroy test clone {label} on {node}")
            }
        }
    }
}

/// How an action ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    /// It succeeded with this answer.
    Ok(Answer),
    /// It failed.
    Failed(Failure),
    /// Nobody knows: the driver crashed while it ran. The machine observes
    /// before it acts again.
    Unknown,
}

impl Outcome {
    /// A failure of `kind` with `message`.
    pub fn failed(kind: ErrorKind, message: impl Into<String>) -> Outcome {
        Outcome::Failed(Failure::new(kind, message))
    }
}

/// What a successful action answered.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Answer {
    /// Done, nothing to report.
    Done,
    /// The VM's state, and a receipt if it is shut off or not defined
    /// (built by the driver with [`FenceReceipt::from_observed_state`]).
    Observed {
        /// The state.
        state: VmState,
        /// Proof it is off, when it is.
        receipt: Option<FenceReceipt>,
    },
    /// The replicator's status.
    Replica(ReplicaReport),
    /// A new complete generation, and its age when the cycle ended.
    Generation {
        /// The generation.
        info: GenerationInfo,
        /// Its age (time since its source point in time).
        age: Duration,
    },
    /// The node is off.
    Fenced(FenceReceipt),
    /// The node's power state, and a receipt if it reads off.
    Power {
        /// The reading.
        state: PowerState,
        /// A receipt built from the reading (present iff `state` is off).
        receipt: Option<FenceReceipt>,
    },
    /// The generation is usable on the node.
    Promoted(GenerationInfo),
    /// The VM is stopped; the receipt proves it.
    Stopped(FenceReceipt),
}

/// The part of a replicator's status the machine uses.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaReport {
    /// Source node.
    pub source: NodeId,
    /// Target node.
    pub target: NodeId,
    /// Newest complete generation on the target.
    pub newest: Option<GenerationInfo>,
    /// Its age when read (zero when synchronous and in sync).
    pub age: Option<Duration>,
}
