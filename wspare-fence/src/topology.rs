//! [`Topology`]: per node, fence levels tried in order, each level all-of its
//! devices, and the node's fence delay.
//!
//! # Levels
//!
//! A node has one or more levels (IPMI first, then a switched PDU, say).
//! `fence` tries level 1; if any of its devices fails, level 2, and so on.
//! A level succeeds only when **every** device in it returned a receipt
//! (a host with two power supplies on two PDUs is off only when both
//! outlets read off); its devices are fenced one after the other, in the
//! order given. The topology's receipt is the device's receipt for a
//! one-device level, and for a level of several devices a receipt naming
//! them all, timed at the last reading. When every level fails, the error
//! lists each level's failure.
//!
//! `power_status` asks the levels in the same order and returns the first
//! level's answer that every device of it gave: `Off` if all read off, `On`
//! if any reads on, `Unknown` otherwise. `unfence` powers on through every
//! level whose devices can all unfence, from the last level to the first
//! (PDU outlets come on before the BMC behind them is asked), and succeeds
//! if at least one level did.
//!
//! # Fence delay: who applies it
//!
//! Each node has a fence delay ([`Topology::fence_delay`]): how long to
//! wait before fencing **that** node. Two nodes that lose sight of each
//! other would otherwise fence each other at once. Give the delay to the
//! node that should survive a partition: its peer's fence of it waits, its
//! own fence of the peer does not, so it wins the race.
//!
//! **The topology never sleeps.** `Topology::fence` acts at once. The
//! failover machine applies the delay: it waits
//! [`PairConfig::peer_fence_delay`](wspare_core::machine::PairConfig::peer_fence_delay)
//! on its own clock
//! (a timer, sans-IO, so the simulator controls it) before it emits the
//! fence action. Whoever builds a machine's `PairConfig` sets
//! `peer_fence_delay = topology.fence_delay(&peer)`. A delay slept inside
//! `fence` would be applied twice and would eat into the driver's deadline
//! for the fence action. Integrators who call `fence` without the machine
//! wait the delay themselves.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use wspare_core::{
    Error, ErrorKind, FenceReceipt, FenceScope, FenceTarget, Fencer, FencerCaps, NodeId,
    PowerState, Result, UnixMillis,
};

use crate::error::FenceError;

/// One level: devices that must all succeed.
pub type Level = Vec<Arc<dyn Fencer>>;

/// A node's levels and fence delay.
#[derive(Clone)]
pub struct NodePlan {
    /// Levels, tried in order.
    pub levels: Vec<Level>,
    /// How long the caller (the failover machine) waits before fencing this
    /// node. Not applied by the topology: see the module docs.
    pub fence_delay: Duration,
}

/// Fences nodes through their levels. See the module docs.
#[derive(Clone, Default)]
pub struct Topology {
    nodes: BTreeMap<NodeId, NodePlan>,
}

impl std::fmt::Debug for Topology {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut m = f.debug_map();
        for (n, p) in &self.nodes {
            let levels: Vec<Vec<String>> = p
                .levels
                .iter()
                .map(|l| l.iter().map(|d| d.describe()).collect())
                .collect();
            m.entry(&n.as_str(), &(levels, p.fence_delay));
        }
        m.finish()
    }
}

fn describe_level(level: &Level) -> String {
    level
        .iter()
        .map(|d| d.describe())
        .collect::<Vec<_>>()
        .join(" + ")
}

/// One line of an "every level failed" error. A device's error names the
/// device already, so a one-device level is only numbered.
fn level_line(i: usize, level: &Level, e: &Error) -> String {
    let label = if level.len() == 1 {
        format!("level {}", i + 1)
    } else {
        format!("level {} ({})", i + 1, describe_level(level))
    };
    format!("{label} [{}]: {}", e.kind(), e.message())
}

/// "Every level failed" from each failed level (its index, the level, the
/// error): the kind shared by every level's error, else the last level's;
/// retryable if any level's error is.
fn all_levels_failed(
    node: &NodeId,
    what: &'static str,
    failed: &[(usize, &Level, Error)],
) -> Error {
    let kind = match failed.first() {
        Some((_, _, first)) if failed.iter().all(|(_, _, e)| e.kind() == first.kind()) => {
            first.kind()
        }
        _ => failed
            .last()
            .map_or(ErrorKind::Backend, |(_, _, e)| e.kind()),
    };
    FenceError::AllLevelsFailed {
        node: node.clone(),
        what,
        failures: failed
            .iter()
            .map(|(i, l, e)| level_line(*i, l, e))
            .collect(),
        kind,
        retryable: failed.iter().any(|(_, _, e)| e.is_retryable()),
    }
    .into()
}

/// Checks that a node has levels and each level devices. Shared with the
/// config, which checks before it builds any device.
pub(crate) fn check_levels<T>(node: &str, levels: &[Vec<T>]) -> Result<(), FenceError> {
    if levels.is_empty() {
        return Err(FenceError::config(
            format!("nodes.{node}.levels"),
            "a node needs at least one level",
        ));
    }
    if let Some(i) = levels.iter().position(Vec::is_empty) {
        return Err(FenceError::config(
            format!("nodes.{node}.levels[{i}]"),
            "a level needs at least one device",
        ));
    }
    Ok(())
}

impl Topology {
    /// An empty topology.
    pub fn new() -> Self {
        Topology::default()
    }

    /// Adds `node` with its levels (tried in order) and fence delay.
    pub fn node(
        mut self,
        node: NodeId,
        fence_delay: Duration,
        levels: Vec<Level>,
    ) -> Result<Self, FenceError> {
        check_levels(node.as_str(), &levels)?;
        if self.nodes.contains_key(&node) {
            return Err(FenceError::config(format!("nodes.{node}"), "defined twice"));
        }
        self.nodes.insert(
            node,
            NodePlan {
                levels,
                fence_delay,
            },
        );
        Ok(self)
    }

    /// The fence delay of `node`: how long the caller waits before fencing
    /// it. `None` for a node the topology does not know.
    pub fn fence_delay(&self, node: &NodeId) -> Option<Duration> {
        self.nodes.get(node).map(|p| p.fence_delay)
    }

    /// The nodes, in name order.
    pub fn nodes(&self) -> impl Iterator<Item = &NodeId> {
        self.nodes.keys()
    }

    /// A node's plan.
    pub fn plan(&self, node: &NodeId) -> Option<&NodePlan> {
        self.nodes.get(node)
    }

    fn plan_or_not_found(&self, node: &NodeId) -> Result<&NodePlan, FenceError> {
        self.nodes.get(node).ok_or_else(|| FenceError::UnknownNode {
            device: self.describe(),
            node: node.clone(),
        })
    }

    async fn fence_level(node: &NodeId, level: &Level) -> Result<FenceReceipt> {
        let mut receipts = Vec::with_capacity(level.len());
        for d in level {
            let r = d.fence(node).await?;
            if r.target() != &FenceTarget::Node(node.clone()) {
                return Err(Error::new(
                    ErrorKind::Backend,
                    format!(
                        "{} returned a receipt for {}, not for node {node}",
                        d.describe(),
                        r.target()
                    ),
                )
                .retryable(false));
            }
            receipts.push(r);
        }
        if receipts.len() == 1 {
            return Ok(receipts.remove(0));
        }
        let at = receipts
            .iter()
            .map(FenceReceipt::at)
            .max()
            .unwrap_or(UnixMillis(0));
        let devices = describe_level(level);
        FenceReceipt::from_power_reading(node.clone(), devices, PowerState::Off, at).ok_or_else(
            || {
                Error::new(
                    ErrorKind::Backend,
                    "unreachable: an off reading makes a receipt",
                )
            },
        )
    }

    /// A level's power: `Off` if every device reads off, `On` if any reads
    /// on, `Unknown` otherwise; an error if any device fails to answer.
    async fn level_status(node: &NodeId, level: &Level) -> Result<PowerState> {
        let mut states = Vec::with_capacity(level.len());
        for d in level {
            states.push(d.power_status(node).await?);
        }
        Ok(if states.iter().all(|s| *s == PowerState::Off) {
            PowerState::Off
        } else if states.contains(&PowerState::On) {
            PowerState::On
        } else {
            PowerState::Unknown
        })
    }

    /// Powers `node` on through every device of `level`, stopping at the
    /// first failure.
    async fn unfence_level(node: &NodeId, level: &Level) -> Result<()> {
        for d in level {
            d.unfence(node).await?;
        }
        Ok(())
    }
}

#[async_trait]
impl Fencer for Topology {
    fn describe(&self) -> String {
        format!("fence topology ({} nodes)", self.nodes.len())
    }

    fn capabilities(&self) -> FencerCaps {
        let devices = || self.nodes.values().flat_map(|p| p.levels.iter().flatten());
        let scope = if devices().any(|d| d.capabilities().scope == FenceScope::Vm) {
            FenceScope::Vm
        } else {
            FenceScope::Host
        };
        let unfence = self.nodes.values().all(|p| {
            p.levels
                .iter()
                .any(|l| l.iter().all(|d| d.capabilities().unfence))
        });
        FencerCaps { scope, unfence }
    }

    async fn fence(&self, node: &NodeId) -> Result<FenceReceipt> {
        let plan = self.plan_or_not_found(node)?;
        let mut failed = Vec::new();
        for (i, level) in plan.levels.iter().enumerate() {
            match Topology::fence_level(node, level).await {
                Ok(r) => {
                    tracing::info!(%node, level = i + 1, devices = %describe_level(level), "fenced");
                    return Ok(r);
                }
                Err(e) => {
                    tracing::warn!(%node, level = i + 1, error = %e, "fence level failed");
                    failed.push((i, level, e));
                }
            }
        }
        Err(all_levels_failed(node, "fencing", &failed))
    }

    async fn power_status(&self, node: &NodeId) -> Result<PowerState> {
        let plan = self.plan_or_not_found(node)?;
        let mut failed = Vec::new();
        for (i, level) in plan.levels.iter().enumerate() {
            match Topology::level_status(node, level).await {
                Ok(s) => return Ok(s),
                Err(e) => failed.push((i, level, e)),
            }
        }
        Err(all_levels_failed(node, "power status", &failed))
    }

    async fn unfence(&self, node: &NodeId) -> Result<()> {
        let plan = self.plan_or_not_found(node)?;
        let mut failed = Vec::new();
        let mut any_ok = false;
        let mut any_capable = false;
        for (i, level) in plan.levels.iter().enumerate().rev() {
            if !level.iter().all(|d| d.capabilities().unfence) {
                continue;
            }
            any_capable = true;
            match Topology::unfence_level(node, level).await {
                Ok(()) => any_ok = true,
                Err(e) => {
                    tracing::warn!(%node, level = i + 1, error = %e, "unfence failed");
                    failed.push((i, level, e));
                }
            }
        }
        if !any_capable {
            return Err(Error::unsupported(format!(
                "node {node}: no fence level can power it on"
            )));
        }
        if any_ok {
            return Ok(());
        }
        Err(all_levels_failed(node, "unfencing", &failed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::{AgentDevice, FenceAgentFencer};
    use crate::confirm::Timing;
    use crate::ipmi::{IpmiDevice, IpmiFencer, IpmiPassword};
    use std::sync::Mutex;
    use wspare_core::runner::{Reply, ScriptedRunner, Secret};
    use wspare_core::{Evidence, UnixMillis};

    fn n(s: &str) -> NodeId {
        NodeId::new(s).unwrap()
    }

    /// A scripted fencer: answers fence/status/unfence from queues and logs
    /// every call.
    struct Fake {
        name: &'static str,
        fence: Mutex<Vec<Result<(), ErrorKind>>>,
        log: Arc<Mutex<Vec<String>>>,
        unfence_cap: bool,
    }

    impl Fake {
        fn new(
            name: &'static str,
            fence: Vec<Result<(), ErrorKind>>,
            log: &Arc<Mutex<Vec<String>>>,
        ) -> Arc<Fake> {
            Arc::new(Fake {
                name,
                fence: Mutex::new(fence),
                log: log.clone(),
                unfence_cap: true,
            })
        }
    }

    #[async_trait]
    impl Fencer for Fake {
        fn describe(&self) -> String {
            format!("fake {}", self.name)
        }
        fn capabilities(&self) -> FencerCaps {
            FencerCaps {
                scope: FenceScope::Host,
                unfence: self.unfence_cap,
            }
        }
        async fn fence(&self, node: &NodeId) -> Result<FenceReceipt> {
            self.log
                .lock()
                .unwrap()
                .push(format!("fence {} {node}", self.name));
            match self.fence.lock().unwrap().remove(0) {
                Ok(()) => Ok(FenceReceipt::from_power_reading(
                    node.clone(),
                    self.describe(),
                    PowerState::Off,
                    UnixMillis(7),
                )
                .unwrap()),
                Err(k) => Err(Error::new(k, format!("{} failed", self.name))),
            }
        }
        async fn power_status(&self, _: &NodeId) -> Result<PowerState> {
            self.log
                .lock()
                .unwrap()
                .push(format!("status {}", self.name));
            Ok(PowerState::Off)
        }
        async fn unfence(&self, node: &NodeId) -> Result<()> {
            self.log
                .lock()
                .unwrap()
                .push(format!("unfence {} {node}", self.name));
            Ok(())
        }
    }

    #[tokio::test]
    async fn levels_in_order_all_of_each_level() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let ipmi = Fake::new("ipmi", vec![Err(ErrorKind::Timeout)], &log);
        let pdu1 = Fake::new("pdu1", vec![Ok(())], &log);
        let pdu2 = Fake::new("pdu2", vec![Ok(())], &log);
        let t = Topology::new()
            .node(
                n("node-a"),
                Duration::ZERO,
                vec![vec![ipmi], vec![pdu1, pdu2]],
            )
            .unwrap();
        let r = t.fence(&n("node-a")).await.unwrap();
        assert_eq!(
            r.evidence(),
            &Evidence::PowerReadBackOff {
                device: "fake pdu1 + fake pdu2".into()
            }
        );
        assert_eq!(
            *log.lock().unwrap(),
            [
                "fence ipmi node-a",
                "fence pdu1 node-a",
                "fence pdu2 node-a"
            ]
        );
    }

    #[tokio::test]
    async fn a_level_fails_if_any_device_fails_and_every_failure_is_reported() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let ipmi = Fake::new("ipmi", vec![Err(ErrorKind::PermissionDenied)], &log);
        let pdu1 = Fake::new("pdu1", vec![Ok(())], &log);
        let pdu2 = Fake::new("pdu2", vec![Err(ErrorKind::PermissionDenied)], &log);
        let t = Topology::new()
            .node(
                n("node-a"),
                Duration::ZERO,
                vec![vec![ipmi], vec![pdu1, pdu2]],
            )
            .unwrap();
        let e = t.fence(&n("node-a")).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::PermissionDenied);
        assert!(!e.is_retryable());
        assert_eq!(
            e.message(),
            "node node-a: fencing failed at every fence level: level 1 [permission-denied]: ipmi failed; \
             level 2 (fake pdu1 + fake pdu2) [permission-denied]: pdu2 failed"
        );
    }

    #[tokio::test]
    async fn mixed_kinds_take_the_last_and_retry_if_any_can() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let t = Topology::new()
            .node(
                n("node-a"),
                Duration::ZERO,
                vec![
                    vec![Fake::new("a", vec![Err(ErrorKind::PermissionDenied)], &log)
                        as Arc<dyn Fencer>],
                    vec![Fake::new("b", vec![Err(ErrorKind::Timeout)], &log) as Arc<dyn Fencer>],
                ],
            )
            .unwrap();
        let e = t.fence(&n("node-a")).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Timeout);
        assert!(e.is_retryable());
    }

    #[tokio::test(start_paused = true)]
    async fn the_topology_never_sleeps_the_fence_delay() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let t = Topology::new()
            .node(
                n("node-a"),
                Duration::from_secs(15),
                vec![vec![Fake::new("a", vec![Ok(())], &log) as Arc<dyn Fencer>]],
            )
            .unwrap();
        assert_eq!(t.fence_delay(&n("node-a")), Some(Duration::from_secs(15)));
        assert_eq!(t.fence_delay(&n("node-b")), None);
        let t0 = tokio::time::Instant::now();
        t.fence(&n("node-a")).await.unwrap();
        assert_eq!(
            t0.elapsed(),
            Duration::ZERO,
            "the machine applies the delay, not the topology"
        );
    }

    #[tokio::test]
    async fn unknown_node_and_bad_plans() {
        let t = Topology::new();
        assert_eq!(
            t.fence(&n("x")).await.unwrap_err().kind(),
            ErrorKind::NotFound
        );
        assert_eq!(
            t.power_status(&n("x")).await.unwrap_err().kind(),
            ErrorKind::NotFound
        );
        let e = Topology::new()
            .node(n("a"), Duration::ZERO, vec![])
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid fence config: nodes.a.levels: a node needs at least one level"
        );
        let e = Topology::new()
            .node(n("a"), Duration::ZERO, vec![vec![]])
            .unwrap_err();
        assert!(e.to_string().contains("nodes.a.levels[0]"), "{e}");
    }

    #[tokio::test]
    async fn unfence_goes_from_the_last_capable_level_to_the_first() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let no_unfence = Arc::new(Fake {
            name: "kdump",
            fence: Mutex::new(vec![]),
            log: log.clone(),
            unfence_cap: false,
        });
        let t = Topology::new()
            .node(
                n("node-a"),
                Duration::ZERO,
                vec![
                    vec![Fake::new("ipmi", vec![], &log) as Arc<dyn Fencer>],
                    vec![no_unfence],
                    vec![
                        Fake::new("pdu1", vec![], &log) as Arc<dyn Fencer>,
                        Fake::new("pdu2", vec![], &log),
                    ],
                ],
            )
            .unwrap();
        t.unfence(&n("node-a")).await.unwrap();
        assert_eq!(
            *log.lock().unwrap(),
            [
                "unfence pdu1 node-a",
                "unfence pdu2 node-a",
                "unfence ipmi node-a"
            ]
        );
        assert!(t.capabilities().unfence);
    }

    /// The fault from the issue, with the real backends on recorded output:
    /// level 1 is an IPMI BMC that does not answer, level 2 a fence agent.
    #[tokio::test(start_paused = true)]
    async fn first_level_dead_bmc_second_level_agent_fences() {
        let ipmi_runner = Arc::new(ScriptedRunner::new().expect(
            &[
                "ipmitool", "-I", "lanplus", "-H", "10.0.0.5", "-p", "623", "-U", "admin", "-E",
                "-N", "3", "-R", "1", "-v", "power", "off",
            ],
            Reply::exit(1, "", include_str!("../testdata/ipmitool/no_answer.stderr")),
        ));
        let agent_runner = Arc::new(
            ScriptedRunner::new()
                .expect(
                    &["fence_ipmilan"],
                    Reply::exit(
                        0,
                        include_str!("../testdata/fence_ipmilan/off_ok.stdout"),
                        "",
                    ),
                )
                .expect(
                    &["fence_ipmilan"],
                    Reply::exit(
                        2,
                        include_str!("../testdata/fence_ipmilan/status_off.stdout"),
                        "",
                    ),
                ),
        );
        let ipmi = IpmiFencer::new(
            "bmc-a",
            n("node-a"),
            IpmiDevice::new("10.0.0.5", "admin", IpmiPassword::Env(Secret::new("pw1"))),
            ipmi_runner.clone(),
        )
        .unwrap();
        let mut dev = AgentDevice::new("fence_ipmilan").option("ip", "10.0.0.6");
        dev.timing = Timing::default();
        let agent = FenceAgentFencer::new("backup", dev, agent_runner.clone())
            .unwrap()
            .node(n("node-a"), None)
            .unwrap();
        let t = Topology::new()
            .node(
                n("node-a"),
                Duration::ZERO,
                vec![vec![Arc::new(ipmi)], vec![Arc::new(agent)]],
            )
            .unwrap();
        let r = t.fence(&n("node-a")).await.unwrap();
        assert_eq!(
            r.to_string(),
            "node node-a read back off by fence-agent backup (fence_ipmilan)"
        );
        ipmi_runner.assert_done();
        agent_runner.assert_done();
    }
}
