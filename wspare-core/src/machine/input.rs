//! What a machine is fed: [`Input`]s, operator [`Command`]s, and the
//! [`PeerView`] that heartbeats carry.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::action::{Outcome, ReplicaReport};
use super::phase::PhaseName;
use crate::generation::{Epoch, Generation, GenerationInfo};
use crate::hypervisor::VmState;
use crate::ids::{ActionId, NodeId};
use crate::receipt::FenceReceipt;

/// One input to [`crate::machine::Machine::handle`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Input {
    /// A heartbeat arrived from `from`, with its view of this pair.
    Heartbeat {
        /// The sender.
        from: NodeId,
        /// Its machine's view of this pair, if it has one.
        view: Option<PeerView>,
    },
    /// A VM state seen without being asked (a lifecycle event).
    VmObserved {
        /// Whose copy.
        node: NodeId,
        /// The state.
        state: VmState,
    },
    /// A replicator status read without being asked.
    Replica(ReplicaReport),
    /// A witness's verdict on a node.
    Witness {
        /// The node.
        node: NodeId,
        /// Whether the witness can reach it.
        alive: bool,
    },
    /// An action finished.
    ActionDone {
        /// Its id.
        id: ActionId,
        /// How it went.
        outcome: Outcome,
    },
    /// An operator's command.
    Command(Command),
    /// Time passed: call at [`crate::machine::Machine::poll_timeout`].
    Tick,
}

/// What an operator can ask. A command the machine cannot take in its
/// current state is rejected with an event that says why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Command {
    /// Planned switchover to the spare, with a final sync: no data loss.
    /// Taken by the machine on the active node.
    Switchover,
    /// Switchover back to the configured primary.
    Failback,
    /// Start an isolated clone of a generation (the newest if `None`) on the
    /// spare, leaving production untouched. Taken on the spare node.
    TestFailover {
        /// Which generation.
        generation: Option<Generation>,
    },
    /// End the test failover: destroy the clone.
    EndTest,
    /// Maintenance on (observe, never act) or off.
    Maintenance(bool),
    /// The operator states that a node is down; the receipt is built by the
    /// caller with [`FenceReceipt::from_operator`].
    ConfirmDown(FenceReceipt),
    /// Resolve a split brain: this node's copy loses. Its VM is destroyed,
    /// the peer's claim (epoch, active node) is taken, and the copy here is
    /// stale until the peer resyncs it. Only when blocked on a split brain
    /// or on missing peer contact, and once the peer's view was heard.
    StandDown,
    /// Leave the blocked state and decide again. With `accept_data_loss`, a
    /// failover that waited because the replica was older than the
    /// data-loss bound goes ahead.
    Resume {
        /// Accept the replica's age for the next failover decision.
        accept_data_loss: bool,
    },
}

impl Command {
    /// The command's name, as operators type it (`wspare-agent`).
    pub fn name(&self) -> &'static str {
        match self {
            Command::Switchover => "switchover",
            Command::Failback => "failback",
            Command::TestFailover { .. } => "test-failover",
            Command::EndTest => "end-test",
            Command::Maintenance(true) => "maintenance on",
            Command::Maintenance(false) => "maintenance off",
            Command::ConfirmDown(_) => "confirm-down",
            Command::StandDown => "stand-down",
            Command::Resume { .. } => "resume",
        }
    }
}

/// A machine's view of its pair, sent to the peer in every heartbeat.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct PeerView {
    /// The sender's epoch.
    pub epoch: Epoch,
    /// Which node the sender believes active.
    pub active: NodeId,
    /// The sender's phase.
    pub phase: PhaseName,
    /// The newest complete generation the sender knows.
    pub newest: Option<GenerationInfo>,
    /// Its age when the view was made.
    pub newest_age: Option<Duration>,
    /// Set by an active node that stopped its VM and offers the pair to the
    /// peer (switchover, or a VM that keeps crashing): the generation to
    /// start from.
    pub handover: Option<Generation>,
}
