//! What a machine tells integrators: [`Event`]s, each with its cause.

use std::fmt;

use serde::{Deserialize, Serialize};

use super::phase::PhaseName;
use crate::ids::{NodeId, PairId};
use crate::time::Instant;

/// Something that happened in a pair's machine.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// When (machine time).
    pub at: Instant,
    /// The pair.
    pub pair: PairId,
    /// The node whose machine speaks.
    pub node: NodeId,
    /// What kind of event.
    pub kind: EventKind,
    /// Why, in words an operator can act on.
    pub cause: String,
}

/// The kinds of [`Event`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EventKind {
    /// The phase changed.
    Transition {
        /// Before.
        from: PhaseName,
        /// After.
        to: PhaseName,
    },
    /// Worth knowing, no phase change (a failed sync that will be retried).
    Notice,
    /// An operator command was refused.
    Rejected,
}

impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}@{} ", self.at, self.pair, self.node)?;
        match &self.kind {
            EventKind::Transition { from, to } => write!(f, "{from} -> {to}: {}", self.cause),
            EventKind::Notice => write!(f, "{}", self.cause),
            EventKind::Rejected => write!(f, "command rejected: {}", self.cause),
        }
    }
}
