//! What a machine is configured with: the pair, where it runs, and the
//! policy (timers, limits, the data-loss bound).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::detector::DetectorConfig;
use crate::ids::{NodeId, PairId, VmName};

/// One machine's configuration: a pair as seen from one of its two nodes.
#[derive(Clone, Debug, PartialEq)]
pub struct PairConfig {
    /// The pair.
    pub pair: PairId,
    /// The VM's name (the same on both nodes).
    pub vm: VmName,
    /// The node the VM prefers (active at creation, and the failback target).
    pub primary: NodeId,
    /// The other node.
    pub spare: NodeId,
    /// The node whose agent runs this machine.
    pub local: NodeId,
    /// Whether a witness reports on the nodes; if so, a node is only fenced
    /// once the witness also says it is down.
    pub witness: bool,
    /// How long to wait before fencing the peer (the peer's fence delay: the
    /// preferred node of a partition gets a long one, so it wins).
    pub peer_fence_delay: Duration,
    /// Timers and limits.
    pub policy: Policy,
}

impl PairConfig {
    /// The other node of the pair.
    pub fn peer(&self) -> &NodeId {
        if self.local == self.primary {
            &self.spare
        } else {
            &self.primary
        }
    }

    /// The node that is not `n`.
    pub fn other(&self, n: &NodeId) -> &NodeId {
        if *n == self.primary {
            &self.spare
        } else {
            &self.primary
        }
    }
}

/// Timers and limits of one pair. Defaults suit a LAN with 1 s heartbeats.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct Policy {
    /// How often the active node runs a replication cycle.
    #[serde(with = "humantime_serde")]
    pub sync_interval: Duration,
    /// How often each node observes its own copy of the VM.
    #[serde(with = "humantime_serde")]
    pub monitor_interval: Duration,
    /// Data-loss bound: the newest complete generation may be at most this
    /// old for an automatic failover.
    #[serde(with = "humantime_serde")]
    pub data_loss_bound: Duration,
    /// Fail over automatically even when the newest generation is older than
    /// the bound (it then loses more data than the bound).
    pub allow_stale_failover: bool,
    /// Restarts in place within `restart-window` before the VM is failed over.
    pub restart_limit: u32,
    /// The window for `restart-limit`.
    #[serde(with = "humantime_serde")]
    pub restart_window: Duration,
    /// Fence attempts before the pair blocks for an operator.
    pub fence_attempts: u32,
    /// First backoff between fence attempts; doubles per attempt.
    #[serde(with = "humantime_serde")]
    pub fence_backoff: Duration,
    /// Largest backoff between fence attempts.
    #[serde(with = "humantime_serde")]
    pub fence_backoff_max: Duration,
    /// How long a graceful shutdown may take in a switchover.
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    /// How long the old active waits for the peer to take over in a
    /// switchover or hand-over before it blocks.
    #[serde(with = "humantime_serde")]
    pub handover_timeout: Duration,
    /// After a restart, how long to wait for the peer's view before deciding
    /// without it.
    #[serde(with = "humantime_serde")]
    pub peer_wait: Duration,
    /// Backoff before retrying a failed sync, start or promote.
    #[serde(with = "humantime_serde")]
    pub retry_backoff: Duration,
    /// Heartbeat failure detector.
    pub detector: DetectorConfig,
    /// Deliberate defects, for the simulator's checker self-test.
    #[cfg(feature = "inject-bugs")]
    #[serde(skip)]
    pub bugs: Bugs,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            sync_interval: Duration::from_secs(30),
            monitor_interval: Duration::from_secs(5),
            data_loss_bound: Duration::from_secs(300),
            allow_stale_failover: false,
            restart_limit: 3,
            restart_window: Duration::from_secs(600),
            fence_attempts: 5,
            fence_backoff: Duration::from_secs(2),
            fence_backoff_max: Duration::from_secs(60),
            shutdown_timeout: Duration::from_secs(120),
            handover_timeout: Duration::from_secs(120),
            peer_wait: Duration::from_secs(30),
            retry_backoff: Duration::from_secs(5),
            detector: DetectorConfig::default(),
            #[cfg(feature = "inject-bugs")]
            bugs: Bugs::default(),
        }
    }
}

impl Policy {
    /// Checks the values; the error names the field.
    pub fn validate(&self) -> Result<(), String> {
        let nonzero = [
            ("sync-interval", self.sync_interval),
            ("monitor-interval", self.monitor_interval),
            ("restart-window", self.restart_window),
            ("fence-backoff", self.fence_backoff),
            ("shutdown-timeout", self.shutdown_timeout),
            ("handover-timeout", self.handover_timeout),
            ("retry-backoff", self.retry_backoff),
        ];
        for (name, d) in nonzero {
            if d.is_zero() {
                return Err(format!("{name} must be greater than zero"));
            }
        }
        if self.fence_attempts == 0 {
            return Err("fence-attempts must be at least 1".into());
        }
        if self.fence_backoff_max < self.fence_backoff {
            return Err("fence-backoff-max must not be below fence-backoff".into());
        }
        if self.data_loss_bound < self.sync_interval {
            return Err(format!(
                "data-loss-bound ({}) is below sync-interval ({}): every failover would be stale",
                humantime::format_duration(self.data_loss_bound),
                humantime::format_duration(self.sync_interval)
            ));
        }
        self.detector
            .validate()
            .map_err(|e| format!("detector.{e}"))
    }
}

/// A deliberate defect that the simulator's invariant checker must catch;
/// only ever on with the `inject-bugs` feature (see `Bugs`). In the order
/// of `Bugs::NAMES`.
#[derive(Clone, Copy, Debug)]
pub(super) enum Bug {
    /// Start the spare on suspicion alone, with a made-up receipt.
    SkipFence,
    /// Start the spare before the promotion finished.
    StartBeforePromote,
    /// Ignore a peer's newer epoch and keep replicating from the local copy.
    IgnoreGeneration,
    /// Repeat an action whose outcome is unknown instead of observing.
    RepeatUnknownAction,
    /// Skip the check that the fenced node really is down.
    TrustLyingFencer,
    /// After a restart without peer contact, start the local copy.
    StartStalePrimary,
}

/// The deliberate defects switched on (see [`Bugs::NAMES`]). They exist
/// only with the `inject-bugs` feature.
#[cfg(feature = "inject-bugs")]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Bugs(u8);

#[cfg(feature = "inject-bugs")]
impl Bugs {
    /// The names `wspare-sim --inject-bug` accepts, one per defect.
    pub const NAMES: [&'static str; 6] = [
        "skip-fence",
        "start-before-promote",
        "ignore-generation",
        "repeat-unknown-action",
        "trust-lying-fencer",
        "start-stale-primary",
    ];

    /// Turns on the defect `name`.
    pub fn enable(&mut self, name: &str) -> Result<(), String> {
        let i = Self::NAMES
            .iter()
            .position(|n| *n == name)
            .ok_or_else(|| format!("unknown bug {name:?}; known: {}", Self::NAMES.join(", ")))?;
        self.0 |= 1 << i;
        Ok(())
    }

    /// Whether `b` is on.
    pub(super) fn has(self, b: Bug) -> bool {
        self.0 & 1 << b as u8 != 0
    }
}
