//! Configuration: strict kebab-case TOML.
//!
//! Unknown fields are rejected, durations are typed (`"30s"`, `"5m"`), and
//! every error names the field (`pair[web].spare`) and, where it can be
//! found, the line. Validation collects every error, so `check-config` can
//! show them all at once.
//!
//! The core owns the generic part: the cluster, its nodes and pairs, and the
//! failover policy. Backend settings live in tables the core keeps as raw
//! TOML for the binary that picks the backends (`[node.hypervisor]`,
//! `[node.fence]`, `[pair.replication]`, top-level `[agent]`); that binary
//! parses them just as strictly, through [`Config::extension`].
//!
//! ```toml
//! [cluster]
//! name = "prod"
//! heartbeat-interval = "1s"
//!
//! [defaults]            # policy for every pair
//! data-loss-bound = "5m"
//!
//! [[node]]
//! name = "node-a"
//! address = "10.0.0.1:7400"
//! fence-delay = "15s"   # others wait this long before fencing node-a
//!
//! [[node]]
//! name = "node-b"
//! address = "10.0.0.2:7400"
//!
//! [[pair]]
//! name = "web"
//! vm = "web"
//! primary = "node-a"
//! spare = "node-b"
//! policy = { sync-interval = "10s" }   # overrides [defaults]
//! ```

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Deserialize;
use toml::Spanned;

use crate::error::{BackendError, ErrorKind};
use crate::ids::{NodeId, PairId, VmName};
use crate::machine::{PairConfig, Policy};

/// One configuration error.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    /// The field, as a path (`pair[web].spare`); empty for syntax errors.
    pub field: String,
    /// 1-based line, when known.
    pub line: Option<usize>,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.field.is_empty(), self.line) {
            (false, Some(l)) => write!(f, "line {l}: {}: {}", self.field, self.message),
            (false, None) => write!(f, "{}: {}", self.field, self.message),
            (true, Some(l)) => write!(f, "line {l}: {}", self.message),
            (true, None) => f.write_str(&self.message),
        }
    }
}

/// Every error found in one config file.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors {
    /// The file, if read from one.
    pub path: Option<PathBuf>,
    /// The errors, in file order.
    pub errors: Vec<ConfigError>,
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let src = self
            .path
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "config".into());
        write!(f, "{src}: {} error(s)", self.errors.len())?;
        for e in &self.errors {
            write!(f, "\n  {e}")?;
        }
        Ok(())
    }
}

impl ConfigErrors {
    fn one(path: Option<PathBuf>, field: &str, line: Option<usize>, message: String) -> Self {
        ConfigErrors {
            path,
            errors: vec![ConfigError {
                field: field.into(),
                line,
                message,
            }],
        }
    }
}

impl BackendError for ConfigErrors {
    fn kind(&self) -> ErrorKind {
        ErrorKind::InvalidInput
    }
}

/// `[cluster]`.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ClusterConfig {
    /// A name for logs and metrics.
    #[serde(default = "default_cluster_name")]
    pub name: String,
    /// How often nodes send heartbeats.
    #[serde(default = "default_heartbeat", with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// The journal file.
    #[serde(default = "default_journal")]
    pub journal: PathBuf,
    /// Whether a witness reports on the nodes.
    #[serde(default)]
    pub witness: bool,
}

fn default_cluster_name() -> String {
    "wspare".into()
}
fn default_heartbeat() -> Duration {
    Duration::from_secs(1)
}
fn default_journal() -> PathBuf {
    "/var/lib/wspare/journal".into()
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            name: default_cluster_name(),
            heartbeat_interval: default_heartbeat(),
            journal: default_journal(),
            witness: false,
        }
    }
}

/// `[[node]]`.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct NodeConfig {
    /// Its name.
    pub name: Spanned<NodeId>,
    /// Where its agent listens for heartbeats (`host:port`).
    pub address: Spanned<String>,
    /// How long other nodes wait before fencing this one. Give the node
    /// that should survive a partition the longer delay.
    #[serde(default, with = "humantime_serde")]
    pub fence_delay: Option<Duration>,
    /// Backend settings for its hypervisor (parsed by the agent).
    #[serde(default)]
    pub hypervisor: Option<Spanned<toml::Table>>,
    /// Backend settings for fencing it (parsed by the agent).
    #[serde(default)]
    pub fence: Option<Spanned<toml::Value>>,
}

/// `[[pair]]`.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct PairEntry {
    /// Its name.
    pub name: Spanned<PairId>,
    /// The VM.
    pub vm: Spanned<VmName>,
    /// The preferred node.
    pub primary: Spanned<NodeId>,
    /// The spare node.
    pub spare: Spanned<NodeId>,
    /// Overrides of `[defaults]`.
    #[serde(default)]
    pub policy: Option<Spanned<toml::Table>>,
    /// Replication settings (parsed by the agent).
    #[serde(default)]
    pub replication: Option<Spanned<toml::Table>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct Raw {
    #[serde(default)]
    cluster: ClusterConfig,
    #[serde(default)]
    defaults: Option<Spanned<toml::Table>>,
    #[serde(default, rename = "node")]
    nodes: Vec<NodeConfig>,
    #[serde(default, rename = "pair")]
    pairs: Vec<PairEntry>,
    #[serde(default)]
    agent: Option<Spanned<toml::Table>>,
}

/// A validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    /// `[cluster]`.
    pub cluster: ClusterConfig,
    /// `[[node]]`, in file order.
    pub nodes: Vec<NodeConfig>,
    /// `[[pair]]`, in file order.
    pub pairs: Vec<PairEntry>,
    /// Each pair's policy: `[defaults]` with the pair's overrides.
    pub policies: BTreeMap<PairId, Policy>,
    /// `[agent]`, for the binary.
    pub agent: Option<Spanned<toml::Table>>,
    text: String,
    path: Option<PathBuf>,
}

/// The 1-based line of byte `offset` in config text `text` (an offset past
/// the end counts as the last line). For the spans of `toml`'s errors and
/// of [`Spanned`] values; with a parsed [`Config`], use [`Config::line_at`].
pub fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|b| **b == b'\n')
        .count()
        + 1
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigErrors::one(
                Some(path.to_path_buf()),
                "",
                None,
                format!("cannot read: {e}"),
            )
        })?;
        let mut c = Config::parse(&text).map_err(|mut e| {
            e.path = Some(path.to_path_buf());
            e
        })?;
        c.path = Some(path.to_path_buf());
        Ok(c)
    }

    /// Parses and validates config text.
    pub fn parse(text: &str) -> Result<Config, ConfigErrors> {
        let raw: Raw = toml::from_str(text).map_err(|e| {
            let line = e.span().map(|s| line_of(text, s.start));
            ConfigErrors::one(None, "", line, e.message().trim_end().to_string())
        })?;
        let mut errors = Vec::new();
        let mut err = |field: String, span: Option<std::ops::Range<usize>>, message: String| {
            errors.push(ConfigError {
                field,
                line: span.map(|s| line_of(text, s.start)),
                message,
            });
        };
        if raw.cluster.heartbeat_interval.is_zero() {
            err(
                "cluster.heartbeat-interval".into(),
                None,
                "must be greater than zero".into(),
            );
        }
        // Nodes.
        let mut names = HashSet::new();
        for (i, n) in raw.nodes.iter().enumerate() {
            let field = format!("node[{}]", n.name.get_ref());
            if !names.insert(n.name.get_ref().clone()) {
                err(
                    format!("node[{i}].name"),
                    Some(n.name.span()),
                    format!("node {} is defined twice", n.name.get_ref()),
                );
            }
            let a = n.address.get_ref();
            let ok = a
                .rsplit_once(':')
                .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0));
            if !ok {
                err(
                    format!("{field}.address"),
                    Some(n.address.span()),
                    format!("{a:?} is not host:port"),
                );
            }
        }
        if raw.nodes.len() < 2 && !raw.pairs.is_empty() {
            err(
                "node".into(),
                None,
                format!("{} node(s) defined; a pair needs two", raw.nodes.len()),
            );
        }
        // Policies: defaults, then each pair's overrides.
        let base = raw
            .defaults
            .as_ref()
            .map(|t| t.get_ref().clone())
            .unwrap_or_default();
        if let Some(d) = &raw.defaults {
            if let Err(m) = decode::<Policy>(d.get_ref().clone()).and_then(|p| p.validate()) {
                err("defaults".into(), Some(d.span()), m);
            }
        }
        // Pairs.
        let mut pairs = HashSet::new();
        let mut vms = HashSet::new();
        let mut policies = BTreeMap::new();
        for (i, p) in raw.pairs.iter().enumerate() {
            let name = p.name.get_ref();
            let field = format!("pair[{name}]");
            if !pairs.insert(name.clone()) {
                err(
                    format!("pair[{i}].name"),
                    Some(p.name.span()),
                    format!("pair {name} is defined twice"),
                );
            }
            for (what, node) in [("primary", &p.primary), ("spare", &p.spare)] {
                if !names.contains(node.get_ref()) {
                    err(
                        format!("{field}.{what}"),
                        Some(node.span()),
                        format!("node {} is not defined", node.get_ref()),
                    );
                }
            }
            if p.primary.get_ref() == p.spare.get_ref() {
                err(
                    format!("{field}.spare"),
                    Some(p.spare.span()),
                    format!(
                        "primary and spare are both {}: a spare on the same host protects nothing",
                        p.spare.get_ref()
                    ),
                );
            }
            let nodes: &[&Spanned<NodeId>] = if p.primary.get_ref() == p.spare.get_ref() {
                &[&p.primary]
            } else {
                &[&p.primary, &p.spare]
            };
            for node in nodes {
                if !vms.insert((node.get_ref().clone(), p.vm.get_ref().clone())) {
                    err(
                        format!("{field}.vm"),
                        Some(p.vm.span()),
                        format!(
                            "VM {} on {} already belongs to another pair",
                            p.vm.get_ref(),
                            node.get_ref()
                        ),
                    );
                }
            }
            let mut table = base.clone();
            if let Some(o) = &p.policy {
                merge(&mut table, o.get_ref().clone());
            }
            match decode::<Policy>(table).and_then(|pol| pol.validate().map(|_| pol)) {
                Ok(pol) => {
                    policies.insert(name.clone(), pol);
                }
                Err(m) => {
                    let span = p.policy.as_ref().map(|t| t.span()).or(Some(p.name.span()));
                    err(format!("{field}.policy"), span, m)
                }
            }
        }
        if !errors.is_empty() {
            errors.sort_by_key(|e| e.line.unwrap_or(0));
            return Err(ConfigErrors { path: None, errors });
        }
        Ok(Config {
            cluster: raw.cluster,
            nodes: raw.nodes,
            pairs: raw.pairs,
            policies,
            agent: raw.agent,
            text: text.to_string(),
            path: None,
        })
    }

    /// The node named `n`.
    pub fn node(&self, n: &NodeId) -> Option<&NodeConfig> {
        self.nodes.iter().find(|c| c.name.get_ref() == n)
    }

    /// The machine configurations of the pairs `local` belongs to.
    pub fn machines_for(&self, local: &NodeId) -> Vec<PairConfig> {
        self.pairs
            .iter()
            .filter(|p| p.primary.get_ref() == local || p.spare.get_ref() == local)
            .map(|p| {
                let peer = if p.primary.get_ref() == local {
                    p.spare.get_ref()
                } else {
                    p.primary.get_ref()
                };
                PairConfig {
                    pair: p.name.get_ref().clone(),
                    vm: p.vm.get_ref().clone(),
                    primary: p.primary.get_ref().clone(),
                    spare: p.spare.get_ref().clone(),
                    local: local.clone(),
                    witness: self.cluster.witness,
                    peer_fence_delay: self
                        .node(peer)
                        .and_then(|n| n.fence_delay)
                        .unwrap_or_default(),
                    policy: self.policies[p.name.get_ref()].clone(),
                }
            })
            .collect()
    }

    /// Decodes an extension table strictly (the type should deny unknown
    /// fields); the error names `field` and the table's line.
    pub fn extension<T: DeserializeOwned>(
        &self,
        field: &str,
        table: &Spanned<toml::Table>,
    ) -> Result<T, ConfigErrors> {
        decode(table.get_ref().clone())
            .map_err(|message| self.error_at(field, table.span().start, message))
    }

    /// Like [`Config::extension`], for a value that may be a table or an
    /// array of tables (fence levels).
    pub fn extension_value<T: DeserializeOwned>(
        &self,
        field: &str,
        v: &Spanned<toml::Value>,
    ) -> Result<T, ConfigErrors> {
        T::deserialize(v.get_ref().clone())
            .map_err(|e| self.error_at(field, v.span().start, e.message().trim_end().to_string()))
    }

    /// The 1-based line of byte `offset` in the text this config was parsed
    /// from: where a [`Spanned`] value of it (`table.span().start`) stands,
    /// for errors about the tables the core keeps raw.
    pub fn line_at(&self, offset: usize) -> usize {
        line_of(&self.text, offset)
    }

    fn error_at(&self, field: &str, offset: usize, message: String) -> ConfigErrors {
        let line = Some(self.line_at(offset));
        ConfigErrors::one(self.path.clone(), field, line, message)
    }
}

fn decode<T: DeserializeOwned>(t: toml::Table) -> Result<T, String> {
    T::deserialize(toml::Value::Table(t)).map_err(|e| e.message().trim_end().to_string())
}

/// Merges `over` into `base`, tables recursively.
fn merge(base: &mut toml::Table, over: toml::Table) {
    for (k, v) in over {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

#[cfg(test)]
mod tests;
