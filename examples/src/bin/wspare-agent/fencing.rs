//! Fencing: the `node.fence` tables built into a
//! [`wspare_fence::topology::Topology`] (one level per device), wrapped so
//! that every attempt is counted and timed.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use wspare_core::config::{Config, ConfigError};
use wspare_core::runner::LocalRunner;
use wspare_core::{FenceReceipt, Fencer, FencerCaps, NodeId, PowerState, Result};
use wspare_fence::config::{DeviceRef, FenceConfig, NodeConfig};
use wspare_fence::error::FenceError;
use wspare_fence::topology::Topology;

use crate::metrics::Metrics;
use crate::settings::NodeSettings;

/// The device name of `node`'s level `i` (1-based in messages).
fn device_name(node: &NodeId, i: usize, levels: usize) -> String {
    if levels == 1 {
        format!("{node}.fence")
    } else {
        format!("{node}.fence.{}", i + 1)
    }
}

/// Builds the fencing topology of every node (ipmitool and fence agents
/// run here). The error names the field in the agent config's terms.
pub(crate) fn topology(
    nodes: &BTreeMap<NodeId, NodeSettings>,
    core: &Config,
) -> std::result::Result<Topology, ConfigError> {
    let mut fc = FenceConfig {
        devices: BTreeMap::new(),
        nodes: BTreeMap::new(),
    };
    for (name, n) in nodes {
        let mut levels = Vec::new();
        for (i, d) in n.fence.iter().enumerate() {
            let dev = device_name(name, i, n.fence.len());
            fc.devices.insert(dev.clone(), d.clone());
            levels.push(vec![DeviceRef {
                device: dev,
                plug: None,
                system: None,
            }]);
        }
        let delay = core.node(name).and_then(|c| c.fence_delay);
        fc.nodes.insert(
            name.to_string(),
            NodeConfig {
                fence_delay: delay,
                levels,
            },
        );
    }
    fc.build(Arc::new(LocalRunner)).map_err(|e| {
        let (field, line, message) = match e {
            FenceError::Config { field, why } => {
                (config_field(&field), fence_line(&field, core), why)
            }
            other => ("fence".into(), None, other.to_string()),
        };
        ConfigError {
            field,
            line,
            message,
        }
    })
}

/// The line of the `fence` table (or, without one, the name) of the node
/// that a field of the fence crate names (`devices.node-a.fence.2.host`,
/// `nodes.node-a.levels`).
fn fence_line(field: &str, core: &Config) -> Option<usize> {
    let names = |prefix: &str, rest: fn(&str) -> bool, name: &str| {
        field
            .strip_prefix(prefix)
            .and_then(|f| f.strip_prefix(name))
            .is_some_and(rest)
    };
    let n = core.nodes.iter().find(|n| {
        let name = n.name.get_ref().as_str();
        names("devices.", |r| r.starts_with(".fence"), name)
            || names("nodes.", |r| r.is_empty() || r.starts_with('.'), name)
    })?;
    let at = n
        .fence
        .as_ref()
        .map_or(n.name.span().start, |f| f.span().start);
    Some(core.line_at(at))
}

/// `devices.node-a.fence.2.host` in the agent's terms:
/// `node[node-a].fence[1].host`.
fn config_field(field: &str) -> String {
    let Some(rest) = field.strip_prefix("devices.") else {
        return field.to_string();
    };
    let Some((node, tail)) = rest.split_once(".fence") else {
        return field.to_string();
    };
    let tail = tail.strip_prefix('.').unwrap_or(tail);
    let (level, key) = match tail.split_once('.') {
        Some((l, k)) if l.chars().all(|c| c.is_ascii_digit()) => (Some(l), Some(k)),
        _ if tail.chars().all(|c| c.is_ascii_digit()) && !tail.is_empty() => (Some(tail), None),
        _ => (None, (!tail.is_empty()).then_some(tail)),
    };
    let mut s = format!("node[{node}].fence");
    if let Some(l) = level.and_then(|l| l.parse::<usize>().ok()) {
        s.push_str(&format!("[{}]", l.saturating_sub(1)));
    }
    if let Some(k) = key {
        s.push('.');
        s.push_str(k);
    }
    s
}

/// A fencer that counts and times every fence.
pub(crate) struct Metered {
    inner: Arc<dyn Fencer>,
    metrics: Arc<Metrics>,
}

impl Metered {
    pub(crate) fn new(inner: Arc<dyn Fencer>, metrics: Arc<Metrics>) -> Self {
        Metered { inner, metrics }
    }
}

#[async_trait]
impl Fencer for Metered {
    fn describe(&self) -> String {
        self.inner.describe()
    }

    fn capabilities(&self) -> FencerCaps {
        self.inner.capabilities()
    }

    async fn fence(&self, node: &NodeId) -> Result<FenceReceipt> {
        let t0 = Instant::now();
        tracing::warn!(%node, "fencing");
        let r = self.inner.fence(node).await;
        let took = t0.elapsed();
        self.metrics.fence(node, r.is_ok(), took);
        let took_ms = u64::try_from(took.as_millis()).unwrap_or(u64::MAX);
        match &r {
            Ok(receipt) => tracing::warn!(%node, took_ms, %receipt, "fenced"),
            Err(e) => tracing::error!(%node, took_ms, error = %e, "fencing failed"),
        }
        r
    }

    async fn power_status(&self, node: &NodeId) -> Result<PowerState> {
        self.inner.power_status(node).await
    }

    async fn unfence(&self, node: &NodeId) -> Result<()> {
        self.inner.unfence(node).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_are_named_as_in_the_agent_config() {
        assert_eq!(
            config_field("devices.node-a.fence.host"),
            "node[node-a].fence.host"
        );
        assert_eq!(
            config_field("devices.node-a.fence.2.port"),
            "node[node-a].fence[1].port"
        );
        assert_eq!(
            config_field("devices.node-a.fence.2"),
            "node[node-a].fence[1]"
        );
        assert_eq!(config_field("devices.node-a.fence"), "node[node-a].fence");
        assert_eq!(config_field("nodes.x.levels"), "nodes.x.levels");
    }

    #[test]
    fn a_topology_error_names_the_line_of_the_nodes_fence_table() {
        let text = include_str!("../../../tests/data/two-nodes.toml")
            .replace("host = \"10.1.0.2\"", "host = \"-10.1.0.2\"");
        let core = Config::parse(&text).unwrap();
        let d = crate::settings::decode(&core, std::path::Path::new("t.toml")).unwrap();
        let Err(e) = topology(&d.nodes, &core) else {
            panic!("a host of \"-10.1.0.2\" was accepted");
        };
        assert_eq!(e.field, "node[node-b].fence.host");
        // `[node.fence]` of node-b.
        assert_eq!(e.line, Some(30));
    }
}
