//! Proof that a node or a VM copy is off.
//!
//! A [`FenceReceipt`] can only be built from evidence: a power state read back
//! as off from an out-of-band device, a VM state observed as shut off, or an
//! operator's explicit confirmation. "The command was accepted" is not
//! evidence, so no constructor takes it. The machine's start action requires
//! a receipt for the other copy of the pair.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::hypervisor::VmState;
use crate::ids::{NodeId, VmName};
use crate::time::UnixMillis;

/// A power state read from an out-of-band device.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PowerState {
    /// Powered on.
    On,
    /// Powered off.
    Off,
    /// The device answered, but not with on or off (powering, standby...).
    Unknown,
}

impl fmt::Display for PowerState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PowerState::On => "on",
            PowerState::Off => "off",
            PowerState::Unknown => "unknown",
        })
    }
}

/// What is proven off.
#[derive(Clone, PartialEq, Eq, Hash, Debug, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FenceTarget {
    /// A whole host, and every VM on it.
    Node(NodeId),
    /// One VM copy on a host.
    Vm {
        /// The host.
        node: NodeId,
        /// The VM.
        vm: VmName,
    },
}

impl FenceTarget {
    /// The node the target lives on.
    pub fn node(&self) -> &NodeId {
        match self {
            FenceTarget::Node(n) | FenceTarget::Vm { node: n, .. } => n,
        }
    }
}

impl fmt::Display for FenceTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FenceTarget::Node(n) => write!(f, "node {n}"),
            FenceTarget::Vm { node, vm } => write!(f, "VM {vm} on {node}"),
        }
    }
}

/// How the target was proven off.
#[derive(Clone, PartialEq, Eq, Hash, Debug, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Evidence {
    /// An out-of-band device read the power state back as off.
    PowerReadBackOff {
        /// The device that answered (a name from the config, never a secret).
        device: String,
    },
    /// The hypervisor reported the VM shut off (or not defined).
    StoppedObserved {
        /// The state seen.
        state: VmState,
    },
    /// An operator stated the node is down (and accepts the risk).
    OperatorConfirmed,
}

/// Proof that a node or VM copy is off. See the module docs.
#[derive(Clone, PartialEq, Eq, Hash, Debug, Serialize, Deserialize)]
pub struct FenceReceipt {
    target: FenceTarget,
    evidence: Evidence,
    at: UnixMillis,
}

impl FenceReceipt {
    /// A receipt from a power reading; `None` unless the reading is `Off`.
    pub fn from_power_reading(
        node: NodeId,
        device: impl Into<String>,
        reading: PowerState,
        at: UnixMillis,
    ) -> Option<FenceReceipt> {
        (reading == PowerState::Off).then(|| FenceReceipt {
            target: FenceTarget::Node(node),
            evidence: Evidence::PowerReadBackOff {
                device: device.into(),
            },
            at,
        })
    }

    /// A receipt from an observed VM state; `None` unless the VM is shut off
    /// or not defined. A crashed VM may still hold its process and disks, so
    /// it is not proof.
    pub fn from_observed_state(
        node: NodeId,
        vm: VmName,
        state: VmState,
        at: UnixMillis,
    ) -> Option<FenceReceipt> {
        matches!(state, VmState::ShutOff | VmState::Missing).then(|| FenceReceipt {
            target: FenceTarget::Vm { node, vm },
            evidence: Evidence::StoppedObserved { state },
            at,
        })
    }

    /// A receipt from an operator's confirmation that `node` is down.
    pub fn from_operator(node: NodeId, at: UnixMillis) -> FenceReceipt {
        FenceReceipt {
            target: FenceTarget::Node(node),
            evidence: Evidence::OperatorConfirmed,
            at,
        }
    }

    /// What is proven off.
    pub fn target(&self) -> &FenceTarget {
        &self.target
    }

    /// How.
    pub fn evidence(&self) -> &Evidence {
        &self.evidence
    }

    /// When the evidence was read.
    pub fn at(&self) -> UnixMillis {
        self.at
    }

    /// Whether this receipt proves that `vm` on `node` is off: the node is
    /// off, or that very VM copy is.
    pub fn covers(&self, node: &NodeId, vm: &VmName) -> bool {
        match &self.target {
            FenceTarget::Node(n) => n == node,
            FenceTarget::Vm { node: n, vm: v } => n == node && v == vm,
        }
    }
}

impl fmt::Display for FenceReceipt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.evidence {
            Evidence::PowerReadBackOff { device } => {
                write!(f, "{} read back off by {device}", self.target)
            }
            Evidence::StoppedObserved { state } => write!(f, "{} observed {state}", self.target),
            Evidence::OperatorConfirmed => {
                write!(f, "{} confirmed down by an operator", self.target)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(s: &str) -> NodeId {
        NodeId::new(s).unwrap()
    }

    #[test]
    fn only_evidence_of_off_makes_a_receipt() {
        let at = UnixMillis(1);
        assert!(FenceReceipt::from_power_reading(n("a"), "ipmi", PowerState::On, at).is_none());
        assert!(
            FenceReceipt::from_power_reading(n("a"), "ipmi", PowerState::Unknown, at).is_none()
        );
        let r = FenceReceipt::from_power_reading(n("a"), "ipmi", PowerState::Off, at).unwrap();
        assert_eq!(r.to_string(), "node a read back off by ipmi");
        let vm = VmName::new("web").unwrap();
        for s in [
            VmState::Running,
            VmState::Paused,
            VmState::Crashed,
            VmState::ShuttingDown,
        ] {
            assert!(FenceReceipt::from_observed_state(n("a"), vm.clone(), s, at).is_none());
        }
        let r =
            FenceReceipt::from_observed_state(n("a"), vm.clone(), VmState::ShutOff, at).unwrap();
        assert!(r.covers(&n("a"), &vm));
        assert!(!r.covers(&n("b"), &vm));
        assert!(!r.covers(&n("a"), &VmName::new("db").unwrap()));
        let r = FenceReceipt::from_operator(n("b"), at);
        assert!(r.covers(&n("b"), &vm));
    }
}
