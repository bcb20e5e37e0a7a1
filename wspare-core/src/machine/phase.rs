//! Where a machine stands: its [`Phase`].

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::generation::Generation;
use crate::ids::NodeId;
use crate::receipt::FenceReceipt;

/// The phase of one pair's machine, with the data that phase needs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// No complete generation yet: the first full copy runs (active) or is
    /// awaited (spare).
    Seeding,
    /// The VM runs on the active node and the spare holds a recent complete
    /// generation.
    Protected,
    /// The VM runs but protection is impaired.
    Degraded {
        /// Why.
        reason: String,
    },
    /// The peer is suspected down; the second channel is being asked.
    Suspect,
    /// Fencing `target`.
    Fencing {
        /// Whom.
        target: NodeId,
        /// Attempts made so far.
        attempt: u32,
        /// Whether a failover follows (the spare fencing the active), or
        /// only protection of the active (the active fencing a lost spare).
        failover: bool,
    },
    /// Fenced; checking on the second channel that the node's VM is gone.
    FenceCheck {
        /// The receipt being checked.
        receipt: FenceReceipt,
    },
    /// Making a generation usable on this node.
    Promoting {
        /// Proof the other copy is off.
        receipt: FenceReceipt,
        /// Which generation.
        generation: Generation,
        /// Taken over from a peer that handed over (its copy is current and
        /// it is alive), rather than failed over from a fenced one.
        takeover: bool,
    },
    /// Starting the VM on this node from a promoted generation.
    Starting {
        /// Proof the other copy is off.
        receipt: FenceReceipt,
        /// Which generation.
        generation: Generation,
        /// Start attempts so far.
        attempt: u32,
    },
    /// Active with no spare: the peer is down or fenced.
    Unprotected,
    /// Active, replicating to a returned peer until it holds a complete
    /// generation of this epoch.
    Resyncing,
    /// Active: the VM stopped unexpectedly and is being restarted here.
    Restarting {
        /// Proof the spare copy is off, once obtained.
        receipt: Option<FenceReceipt>,
        /// Whether the crashed copy still needs destroying first.
        destroy_first: bool,
        /// Failed attempts to prove the spare copy off.
        receipt_tries: u32,
    },
    /// Active: handing the pair to the peer (planned switchover or failback,
    /// or a VM that keeps crashing here).
    HandingOver {
        /// The step.
        step: HandoverStep,
        /// Planned (zero loss, verified, aborted on any failure) or not.
        planned: bool,
        /// The generation offered.
        generation: Option<Generation>,
    },
    /// Spare: the active offered the pair; taking it.
    TakingOver {
        /// The generation offered.
        generation: Generation,
    },
    /// Spare whose copy is older than the active's epoch: waits to be
    /// resynced and is never started.
    Stale,
    /// Just started or resumed: observing, and waiting for the peer's view.
    Recovering,
    /// Needs an operator.
    Blocked {
        /// What it waits for.
        on: BlockedOn,
        /// The whole story.
        reason: String,
    },
}

/// Steps of a hand-over.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HandoverStep {
    /// Stopping the VM here.
    Stop,
    /// Final sync of the stopped VM.
    FinalSync,
    /// Verifying the final generation.
    Verify,
    /// Waiting for the peer to take over.
    Offered,
    /// A planned switchover failed before the offer: starting the VM here again.
    Abort,
}

/// What a blocked machine waits for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BlockedOn {
    /// Fencing failed every attempt: `confirm-down` the node once it is
    /// known off, or `resume` to try again.
    FenceFailed {
        /// The node.
        target: NodeId,
    },
    /// The fencer gave a receipt but the node's VM still runs.
    LyingFencer {
        /// The node.
        target: NodeId,
    },
    /// The newest generation is older than the data-loss bound.
    StaleReplica,
    /// There is no complete generation to start from.
    NoGeneration,
    /// The VM kept crashing and could not be handed to the peer.
    CrashLoop,
    /// The peer never took over what was offered.
    HandoverUnacknowledged,
    /// Both copies may be running.
    SplitBrain,
    /// Restarted without contact to the peer, whose copy may be newer.
    NoPeerContact {
        /// The peer.
        peer: NodeId,
    },
    /// Promoting or starting failed.
    StartFailed,
    /// This node took the pair over (its generation promoted, at a new
    /// epoch) but the VM would not start: `resume` starts it from the
    /// promoted generation again (it is not defined on this node yet, so a
    /// restart in place cannot).
    FailoverStartFailed {
        /// Proof the other copy is off.
        receipt: FenceReceipt,
        /// The promoted generation.
        generation: Generation,
    },
}

/// A phase's name, without its data: for status, views and events.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PhaseName {
    #[allow(missing_docs)]
    Seeding,
    #[allow(missing_docs)]
    Protected,
    #[allow(missing_docs)]
    Degraded,
    #[allow(missing_docs)]
    Suspect,
    #[allow(missing_docs)]
    Fencing,
    #[allow(missing_docs)]
    FenceCheck,
    #[allow(missing_docs)]
    Promoting,
    #[allow(missing_docs)]
    Starting,
    #[allow(missing_docs)]
    Unprotected,
    #[allow(missing_docs)]
    Resyncing,
    #[allow(missing_docs)]
    Restarting,
    #[allow(missing_docs)]
    HandingOver,
    #[allow(missing_docs)]
    TakingOver,
    #[allow(missing_docs)]
    Stale,
    #[allow(missing_docs)]
    Recovering,
    #[allow(missing_docs)]
    Blocked,
}

impl PhaseName {
    /// Every phase name, in declaration order (for metrics that list each
    /// phase, zero or not).
    pub const ALL: &'static [PhaseName] = &[
        PhaseName::Seeding,
        PhaseName::Protected,
        PhaseName::Degraded,
        PhaseName::Suspect,
        PhaseName::Fencing,
        PhaseName::FenceCheck,
        PhaseName::Promoting,
        PhaseName::Starting,
        PhaseName::Unprotected,
        PhaseName::Resyncing,
        PhaseName::Restarting,
        PhaseName::HandingOver,
        PhaseName::TakingOver,
        PhaseName::Stale,
        PhaseName::Recovering,
        PhaseName::Blocked,
    ];

    /// Kebab-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            PhaseName::Seeding => "seeding",
            PhaseName::Protected => "protected",
            PhaseName::Degraded => "degraded",
            PhaseName::Suspect => "suspect",
            PhaseName::Fencing => "fencing",
            PhaseName::FenceCheck => "fence-check",
            PhaseName::Promoting => "promoting",
            PhaseName::Starting => "starting",
            PhaseName::Unprotected => "unprotected",
            PhaseName::Resyncing => "resyncing",
            PhaseName::Restarting => "restarting",
            PhaseName::HandingOver => "handing-over",
            PhaseName::TakingOver => "taking-over",
            PhaseName::Stale => "stale",
            PhaseName::Recovering => "recovering",
            PhaseName::Blocked => "blocked",
        }
    }
}

impl fmt::Display for PhaseName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Phase {
    /// The name.
    pub fn name(&self) -> PhaseName {
        match self {
            Phase::Seeding => PhaseName::Seeding,
            Phase::Protected => PhaseName::Protected,
            Phase::Degraded { .. } => PhaseName::Degraded,
            Phase::Suspect => PhaseName::Suspect,
            Phase::Fencing { .. } => PhaseName::Fencing,
            Phase::FenceCheck { .. } => PhaseName::FenceCheck,
            Phase::Promoting { .. } => PhaseName::Promoting,
            Phase::Starting { .. } => PhaseName::Starting,
            Phase::Unprotected => PhaseName::Unprotected,
            Phase::Resyncing => PhaseName::Resyncing,
            Phase::Restarting { .. } => PhaseName::Restarting,
            Phase::HandingOver { .. } => PhaseName::HandingOver,
            Phase::TakingOver { .. } => PhaseName::TakingOver,
            Phase::Stale => PhaseName::Stale,
            Phase::Recovering => PhaseName::Recovering,
            Phase::Blocked { .. } => PhaseName::Blocked,
        }
    }

    /// Phases in which nothing is in progress and periodic work runs.
    pub fn is_steady(&self) -> bool {
        matches!(
            self,
            Phase::Seeding
                | Phase::Protected
                | Phase::Degraded { .. }
                | Phase::Unprotected
                | Phase::Resyncing
                | Phase::Stale
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The phase names chained in declaration order. The match is
    /// exhaustive on purpose: a new variant does not compile here until it
    /// is put in the chain, and the test below then fails until
    /// [`PhaseName::ALL`] holds it too.
    fn next(p: PhaseName) -> Option<PhaseName> {
        Some(match p {
            PhaseName::Seeding => PhaseName::Protected,
            PhaseName::Protected => PhaseName::Degraded,
            PhaseName::Degraded => PhaseName::Suspect,
            PhaseName::Suspect => PhaseName::Fencing,
            PhaseName::Fencing => PhaseName::FenceCheck,
            PhaseName::FenceCheck => PhaseName::Promoting,
            PhaseName::Promoting => PhaseName::Starting,
            PhaseName::Starting => PhaseName::Unprotected,
            PhaseName::Unprotected => PhaseName::Resyncing,
            PhaseName::Resyncing => PhaseName::Restarting,
            PhaseName::Restarting => PhaseName::HandingOver,
            PhaseName::HandingOver => PhaseName::TakingOver,
            PhaseName::TakingOver => PhaseName::Stale,
            PhaseName::Stale => PhaseName::Recovering,
            PhaseName::Recovering => PhaseName::Blocked,
            PhaseName::Blocked => return None,
        })
    }

    #[test]
    fn all_holds_every_phase_name_once() {
        let mut chain = vec![PhaseName::Seeding];
        while let Some(p) = next(*chain.last().unwrap()) {
            assert!(!chain.contains(&p), "{p} twice in the chain");
            chain.push(p);
        }
        assert_eq!(PhaseName::ALL, chain.as_slice());
        for p in PhaseName::ALL {
            assert_eq!(
                PhaseName::ALL
                    .iter()
                    .filter(|q| q.as_str() == p.as_str())
                    .count(),
                1,
                "{p} named twice"
            );
        }
    }
}
