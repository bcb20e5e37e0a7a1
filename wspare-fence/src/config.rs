//! The fencing config: strict kebab-case TOML (unknown fields rejected,
//! typed durations, errors that name the field), built into a
//! [`Topology`].
//!
//! ```toml
//! [devices.bmc-a]
//! type = "ipmi"
//! host = "10.0.0.5"
//! username = "fence"
//! password-file = "/etc/wspare/bmc-a.pw"   # read by ipmitool -f
//! privilege = "operator"
//!
//! [devices.bmc-b]
//! type = "redfish"
//! url = "https://10.0.0.6"
//! username = "fence"
//! password-file = "/etc/wspare/bmc-b.pw"
//! auth = "session"                          # or "basic"
//! ca-cert = "/etc/wspare/bmc-ca.pem"        # or tls-verify = false
//!
//! [devices.pdu-1]
//! type = "fence-agent"
//! agent = "fence_apc_snmp"
//! options = { ip = "10.0.0.9", username = "apc" }
//! password-file = "/etc/wspare/pdu.pw"
//! command-timeout = "60s"
//!
//! [nodes.node-a]
//! fence-delay = "10s"    # waited by the failover machine, not the topology
//! levels = [
//!   [ { device = "bmc-a" } ],
//!   [ { device = "pdu-1", plug = "3" } ],
//! ]
//!
//! [nodes.node-b]
//! levels = [ [ { device = "bmc-b", system = "1" } ], [ { device = "pdu-1", plug = "4" } ] ]
//! ```
//!
//! Passwords come only from files. An IPMI password file is handed to
//! ipmitool (`-f`), so with a runner over ssh it is a path on that host;
//! Redfish and fence-agent password files are read when the config is built.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use wspare_core::runner::{CommandRunner, Secret};
use wspare_core::{Fencer, NodeId};

use crate::agent::{AgentDevice, FenceAgentFencer};
use crate::confirm::Timing;
use crate::error::FenceError;
use crate::ipmi::{IpmiDevice, IpmiFencer, IpmiPassword, Privilege};
use crate::redfish::{RedfishAuth, RedfishDevice, RedfishFencer, SystemRef};
use crate::topology::{check_levels, Level, Topology};

/// The whole fencing config.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct FenceConfig {
    /// Fence devices by name.
    #[serde(default)]
    pub devices: BTreeMap<String, DeviceConfig>,
    /// Nodes by name: their levels and fence delay.
    #[serde(default)]
    pub nodes: BTreeMap<String, NodeConfig>,
}

/// One fence device.
#[derive(Clone, Debug, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum DeviceConfig {
    /// A BMC over IPMI lanplus.
    Ipmi(IpmiConfig),
    /// A Redfish service.
    Redfish(RedfishConfig),
    /// A ClusterLabs fence agent.
    FenceAgent(AgentConfig),
}

/// Deadlines shared by every device type; `None` keeps the type's default.
#[derive(Clone, Copy, Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct TimingConfig {
    /// Deadline of one command or request.
    #[serde(default, with = "humantime_serde")]
    pub command_timeout: Option<Duration>,
    /// Read-back deadline after a power change.
    #[serde(default, with = "humantime_serde")]
    pub confirm_timeout: Option<Duration>,
    /// Pause between readings.
    #[serde(default, with = "humantime_serde")]
    pub poll_interval: Option<Duration>,
}

impl TimingConfig {
    fn apply(&self, base: Timing, field: &str) -> Result<Timing, FenceError> {
        let t = Timing {
            command_timeout: self.command_timeout.unwrap_or(base.command_timeout),
            confirm_timeout: self.confirm_timeout.unwrap_or(base.confirm_timeout),
            poll_interval: self.poll_interval.unwrap_or(base.poll_interval),
        };
        if t.command_timeout.is_zero() {
            return Err(FenceError::config(
                format!("{field}.command-timeout"),
                "must be more than 0s",
            ));
        }
        if t.poll_interval.is_zero() {
            return Err(FenceError::config(
                format!("{field}.poll-interval"),
                "must be more than 0s",
            ));
        }
        Ok(t)
    }
}

/// `type = "ipmi"`.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct IpmiConfig {
    /// BMC address.
    pub host: String,
    /// UDP port (623).
    #[serde(default)]
    pub port: Option<u16>,
    /// IPMI user.
    pub username: String,
    /// File holding the password, handed to ipmitool's `-f`.
    pub password_file: PathBuf,
    /// Session privilege level.
    #[serde(default)]
    pub privilege: Option<Privilege>,
    /// Cipher suite (`-C`).
    #[serde(default)]
    pub cipher_suite: Option<u8>,
    /// Per-try timeout (`-N`, whole seconds).
    #[serde(default, with = "humantime_serde")]
    pub try_timeout: Option<Duration>,
    /// Retries (`-R`).
    #[serde(default)]
    pub retries: Option<u32>,
    /// The ipmitool program.
    #[serde(default)]
    pub ipmitool: Option<String>,
    /// Deadline of one ipmitool run.
    #[serde(default, with = "humantime_serde")]
    pub command_timeout: Option<Duration>,
    /// Read-back deadline.
    #[serde(default, with = "humantime_serde")]
    pub confirm_timeout: Option<Duration>,
    /// Pause between readings.
    #[serde(default, with = "humantime_serde")]
    pub poll_interval: Option<Duration>,
}

/// `type = "redfish"`.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct RedfishConfig {
    /// `https://host[:port]`.
    pub url: String,
    /// User.
    pub username: String,
    /// File holding the password.
    pub password_file: PathBuf,
    /// `session` (default) or `basic`.
    #[serde(default)]
    pub auth: RedfishAuth,
    /// Verify the certificate (default true).
    #[serde(default = "yes")]
    pub tls_verify: bool,
    /// PEM CA (or certificate) to trust for this device only.
    #[serde(default)]
    pub ca_cert: Option<PathBuf>,
    /// Deadline of one request.
    #[serde(default, with = "humantime_serde")]
    pub command_timeout: Option<Duration>,
    /// Read-back deadline.
    #[serde(default, with = "humantime_serde")]
    pub confirm_timeout: Option<Duration>,
    /// Pause between readings.
    #[serde(default, with = "humantime_serde")]
    pub poll_interval: Option<Duration>,
}

fn yes() -> bool {
    true
}

/// `type = "fence-agent"`.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct AgentConfig {
    /// Agent name or absolute path.
    pub agent: String,
    /// The agent's stdin options (strings), without action, plug, password.
    #[serde(default)]
    pub options: BTreeMap<String, String>,
    /// File holding the password, sent as `password=`.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// Whether the agent can power nodes on (default true).
    #[serde(default = "yes")]
    pub unfence: bool,
    /// Deadline of one agent run (default 60 s).
    #[serde(default, with = "humantime_serde")]
    pub command_timeout: Option<Duration>,
    /// Read-back deadline.
    #[serde(default, with = "humantime_serde")]
    pub confirm_timeout: Option<Duration>,
    /// Pause between readings.
    #[serde(default, with = "humantime_serde")]
    pub poll_interval: Option<Duration>,
}

/// A node: its fence delay and levels.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct NodeConfig {
    /// How long the failover machine waits before fencing this node (see
    /// [`crate::topology`]): set it on the node that should survive a
    /// partition.
    #[serde(default, with = "humantime_serde")]
    pub fence_delay: Option<Duration>,
    /// Levels, tried in order; each is all-of its devices.
    pub levels: Vec<Vec<DeviceRef>>,
}

/// A device in a level.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct DeviceRef {
    /// The device's name under `[devices]`.
    pub device: String,
    /// Fence agents: the plug (outlet, VM, blade) of this node.
    #[serde(default)]
    pub plug: Option<String>,
    /// Redfish: the node's system (`Id`, `Name`, `UUID`, or a path); absent
    /// when the service has one system.
    #[serde(default)]
    pub system: Option<String>,
}

fn timing_of(c: (Option<Duration>, Option<Duration>, Option<Duration>)) -> TimingConfig {
    TimingConfig {
        command_timeout: c.0,
        confirm_timeout: c.1,
        poll_interval: c.2,
    }
}

fn read_secret(field: String, path: &std::path::Path) -> Result<Secret, FenceError> {
    Secret::from_file(path).map_err(|e| FenceError::config(field, e.message().to_string()))
}

/// A use of a device: the node, its reference in a level, and that
/// reference's field path (`nodes.node-a.levels[1][0]`).
type Use<'a> = (NodeId, &'a DeviceRef, String);

/// Per node, what `value` reads from its uses of one device (its plug, its
/// system); a node that uses the device twice must say the same both times,
/// else the error names the `key` of the second use.
fn per_node<T: PartialEq>(
    uses: &[Use<'_>],
    key: &str,
    value: impl Fn(&DeviceRef) -> T,
) -> Result<BTreeMap<NodeId, T>, FenceError> {
    let mut seen = BTreeMap::new();
    for (node, r, field) in uses {
        let v = value(r);
        if seen.get(node).is_some_and(|old| old != &v) {
            return Err(FenceError::config(
                format!("{field}.{key}"),
                "differs from this node's other use of the device",
            ));
        }
        seen.insert(node.clone(), v);
    }
    Ok(seen)
}

impl FenceConfig {
    /// Parses TOML. The error names the line, the column and the key.
    pub fn from_toml(text: &str) -> Result<FenceConfig, FenceError> {
        toml::from_str(text)
            .map_err(|e| FenceError::config("fence config", e.to_string().trim().to_string()))
    }

    /// Builds the topology; ipmitool and fence agents run through `runner`.
    pub fn build(&self, runner: Arc<dyn CommandRunner>) -> Result<Topology, FenceError> {
        // Who uses which device, per device name.
        let mut uses: BTreeMap<&str, Vec<Use<'_>>> = BTreeMap::new();
        let mut node_ids = BTreeMap::new();
        for (name, node) in &self.nodes {
            let id = NodeId::new(name.as_str()).map_err(|e| {
                FenceError::config(format!("nodes.{name}"), e.message().to_string())
            })?;
            check_levels(name, &node.levels)?;
            for (i, level) in node.levels.iter().enumerate() {
                for (j, r) in level.iter().enumerate() {
                    let field = format!("nodes.{name}.levels[{i}][{j}]");
                    if !self.devices.contains_key(&r.device) {
                        return Err(FenceError::config(
                            format!("{field}.device"),
                            format!("no device {:?} under [devices]", r.device),
                        ));
                    }
                    uses.entry(r.device.as_str())
                        .or_default()
                        .push((id.clone(), r, field));
                }
            }
            node_ids.insert(name.as_str(), id);
        }

        let mut fencers: BTreeMap<&str, Arc<dyn Fencer>> = BTreeMap::new();
        for (name, dev) in &self.devices {
            let field = format!("devices.{name}");
            wspare_core::ids::validate_name("device name", name)
                .map_err(|e| FenceError::config(field.clone(), e.message().to_string()))?;
            let users = uses.remove(name.as_str()).unwrap_or_default();
            if users.is_empty() {
                return Err(FenceError::config(field, "defined but no node uses it"));
            }
            let fencer: Arc<dyn Fencer> = match dev {
                DeviceConfig::Ipmi(c) => {
                    let nodes: BTreeSet<&NodeId> = users.iter().map(|u| &u.0).collect();
                    if nodes.len() > 1 {
                        let list: Vec<&str> = nodes.iter().map(|n| n.as_str()).collect();
                        return Err(FenceError::config(
                            field,
                            format!(
                                "an IPMI BMC powers one node, but {} use it",
                                list.join(" and ")
                            ),
                        ));
                    }
                    for (_, r, f) in &users {
                        if r.plug.is_some() || r.system.is_some() {
                            return Err(FenceError::config(
                                f.clone(),
                                "an IPMI device takes no plug or system",
                            ));
                        }
                    }
                    let mut d = IpmiDevice::new(
                        c.host.clone(),
                        c.username.clone(),
                        IpmiPassword::File(c.password_file.clone()),
                    );
                    d.port = c.port.unwrap_or(623);
                    d.privilege = c.privilege;
                    d.cipher_suite = c.cipher_suite;
                    if let Some(t) = c.try_timeout {
                        d.try_timeout = t;
                    }
                    if let Some(r) = c.retries {
                        d.retries = r;
                    }
                    if let Some(p) = &c.ipmitool {
                        d.ipmitool = p.clone();
                    }
                    d.timing = timing_of((c.command_timeout, c.confirm_timeout, c.poll_interval))
                        .apply(d.timing, &field)?;
                    Arc::new(IpmiFencer::new(
                        name.clone(),
                        users[0].0.clone(),
                        d,
                        runner.clone(),
                    )?)
                }
                DeviceConfig::Redfish(c) => {
                    let mut d = RedfishDevice::new(
                        c.url.clone(),
                        c.username.clone(),
                        read_secret(format!("{field}.password-file"), &c.password_file)?,
                    );
                    d.auth = c.auth;
                    d.tls_verify = c.tls_verify;
                    d.ca_cert = c.ca_cert.clone();
                    d.timing = timing_of((c.command_timeout, c.confirm_timeout, c.poll_interval))
                        .apply(d.timing, &field)?;
                    if let Some((_, _, rf)) = users.iter().find(|u| u.1.plug.is_some()) {
                        return Err(FenceError::config(
                            format!("{rf}.plug"),
                            "a Redfish device takes a system, not a plug",
                        ));
                    }
                    let systems = per_node(&users, "system", |r| match &r.system {
                        None => SystemRef::Only,
                        Some(p) if p.starts_with('/') => SystemRef::Path(p.clone()),
                        Some(n) => SystemRef::Named(n.clone()),
                    })?;
                    let mut f = RedfishFencer::new(name.clone(), d)?;
                    for (node, system) in systems {
                        f = f.node(node, system)?;
                    }
                    Arc::new(f)
                }
                DeviceConfig::FenceAgent(c) => {
                    let mut d = AgentDevice::new(c.agent.clone());
                    d.options = c.options.clone();
                    d.unfence = c.unfence;
                    d.password = match &c.password_file {
                        Some(p) => Some(read_secret(format!("{field}.password-file"), p)?),
                        None => None,
                    };
                    d.timing = timing_of((c.command_timeout, c.confirm_timeout, c.poll_interval))
                        .apply(d.timing, &field)?;
                    if let Some((_, _, rf)) = users.iter().find(|u| u.1.system.is_some()) {
                        return Err(FenceError::config(
                            format!("{rf}.system"),
                            "a fence agent takes a plug, not a system",
                        ));
                    }
                    let plugs = per_node(&users, "plug", |r| r.plug.clone())?;
                    let mut f = FenceAgentFencer::new(name.clone(), d, runner.clone())?;
                    for (node, plug) in plugs {
                        f = f.node(node, plug)?;
                    }
                    Arc::new(f)
                }
            };
            fencers.insert(name.as_str(), fencer);
        }

        let mut topology = Topology::new();
        for (name, node) in &self.nodes {
            let levels: Vec<Level> = node
                .levels
                .iter()
                .map(|l| {
                    l.iter()
                        .map(|r| fencers[r.device.as_str()].clone())
                        .collect()
                })
                .collect();
            topology = topology.node(
                node_ids[name.as_str()].clone(),
                node.fence_delay.unwrap_or_default(),
                levels,
            )?;
        }
        Ok(topology)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wspare_core::runner::LocalRunner;

    fn build(text: &str) -> Result<Topology, FenceError> {
        FenceConfig::from_toml(text)?.build(Arc::new(LocalRunner))
    }

    fn pw_file(dir: &tempfile::TempDir) -> String {
        let p = dir.path().join("pw");
        std::fs::write(&p, "s3cretpw\n").unwrap();
        p.display().to_string()
    }

    #[test]
    fn the_documented_example_builds() {
        let dir = tempfile::tempdir().unwrap();
        let pw = pw_file(&dir);
        let text = format!(
            r#"
            [devices.bmc-a]
            type = "ipmi"
            host = "10.0.0.5"
            username = "fence"
            password-file = "{pw}"
            privilege = "operator"
            confirm-timeout = "20s"

            [devices.bmc-b]
            type = "redfish"
            url = "https://10.0.0.6"
            username = "fence"
            password-file = "{pw}"
            auth = "basic"
            tls-verify = false

            [devices.pdu-1]
            type = "fence-agent"
            agent = "fence_apc_snmp"
            options = {{ ip = "10.0.0.9", username = "apc" }}
            password-file = "{pw}"
            command-timeout = "60s"

            [nodes.node-a]
            fence-delay = "10s"
            levels = [ [ {{ device = "bmc-a" }} ], [ {{ device = "pdu-1", plug = "3" }} ] ]

            [nodes.node-b]
            levels = [ [ {{ device = "bmc-b", system = "1" }} ], [ {{ device = "pdu-1", plug = "4" }} ] ]
            "#
        );
        let t = build(&text).unwrap();
        let a = NodeId::new("node-a").unwrap();
        let b = NodeId::new("node-b").unwrap();
        assert_eq!(t.fence_delay(&a), Some(Duration::from_secs(10)));
        assert_eq!(t.fence_delay(&b), Some(Duration::ZERO));
        let levels: Vec<Vec<String>> = t
            .plan(&b)
            .unwrap()
            .levels
            .iter()
            .map(|l| l.iter().map(|d| d.describe()).collect())
            .collect();
        assert_eq!(
            levels,
            [
                vec!["redfish bmc-b (https://10.0.0.6)".to_string()],
                vec!["fence-agent pdu-1 (fence_apc_snmp)".to_string()]
            ]
        );
        assert!(!format!("{t:?}").contains("s3cretpw"));
    }

    #[test]
    fn errors_name_the_field() {
        let dir = tempfile::tempdir().unwrap();
        let pw = pw_file(&dir);
        let ipmi = format!("[devices.bmc-a]\ntype = \"ipmi\"\nhost = \"10.0.0.5\"\nusername = \"u\"\npassword-file = \"{pw}\"\n");
        let cases: Vec<(String, &str)> = vec![
            (format!("{ipmi}colour = \"red\"\n"), "unknown field `colour`"),
            (format!("{ipmi}[nodes.node-a]\nlevels = [[{{ device = \"bmc-x\" }}]]\n"), "nodes.node-a.levels[0][0].device: no device \"bmc-x\""),
            (ipmi.clone(), "devices.bmc-a: defined but no node uses it"),
            (
                format!("{ipmi}[nodes.a]\nlevels = [[{{ device = \"bmc-a\" }}]]\n[nodes.b]\nlevels = [[{{ device = \"bmc-a\" }}]]\n"),
                "devices.bmc-a: an IPMI BMC powers one node, but a and b use it",
            ),
            (format!("{ipmi}[nodes.a]\nlevels = [[{{ device = \"bmc-a\", plug = \"1\" }}]]\n"), "nodes.a.levels[0][0]: an IPMI device takes no plug"),
            (format!("{ipmi}[nodes.a]\nfence-delay = \"soon\"\nlevels = [[{{ device = \"bmc-a\" }}]]\n"), "fence-delay"),
            (format!("{ipmi}[nodes.a]\nlevels = []\n"), "nodes.a.levels: a node needs at least one level"),
            (format!("{ipmi}[nodes.\"a b\"]\nlevels = [[{{ device = \"bmc-a\" }}]]\n"), "nodes.a b: invalid node name \"a b\": character ' ' is not allowed"),
            (
                format!("{}[nodes.a]\nlevels = [[{{ device = \"bmc-a\" }}]]\n", ipmi.replace("10.0.0.5", "-x")),
                "devices.bmc-a.host",
            ),
            (
                "[devices.r]\ntype = \"redfish\"\nurl = \"https://h\"\nusername = \"u\"\npassword-file = \"/nonexistent\"\n[nodes.a]\nlevels = [[{ device = \"r\" }]]\n".into(),
                "devices.r.password-file: cannot read secret file /nonexistent",
            ),
            ("[devices.x]\ntype = \"pdu\"\n".into(), "unknown variant `pdu`"),
            (
                "[devices.p]\ntype = \"fence-agent\"\nagent = \"fence_x\"\noptions = { lanplus = 1 }\n".into(),
                "invalid type: integer `1`, expected a string",
            ),
        ];
        for (text, want) in cases {
            let e = build(&text).unwrap_err().to_string();
            assert!(
                e.contains(want),
                "config:\n{text}\nerror: {e}\nwanted: {want}"
            );
        }
    }
}
