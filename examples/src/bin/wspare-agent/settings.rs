//! The agent's part of the config: the backend tables the core keeps raw
//! (`[node.hypervisor]`, `node.fence`, `[pair.replication]`, `[agent]`),
//! decoded as strictly as the core's own sections.
//!
//! Every backend table says which backend it configures with `type`
//! (`libvirt`, `rsync`, `ipmi` / `redfish` / `fence-agent`), so another
//! backend is one more enum variant here and one more arm where the agent
//! builds it (`runtime.rs`).
//!
//! Paths may contain `{node}`: it is replaced by the name of the node the
//! path is on (the local node for the journal, socket and state directory;
//! each endpoint's node for a replica directory), so one config serves
//! hosts that share a filesystem (a test rig) as well as separate hosts.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use wspare_core::config::{Config, ConfigError, ConfigErrors};
use wspare_core::driver::Deadlines;
use wspare_core::{NodeId, PairId, VmName};
use wspare_examples::per_node_path;
use wspare_fence::config::DeviceConfig;

/// `[agent]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub(crate) struct AgentSection {
    /// The shared heartbeat key (at least 32 bytes; mode 0600 or stricter).
    pub(crate) key_file: Option<PathBuf>,
    /// The operator socket (mode 0600, in a directory made 0700).
    #[serde(default = "default_socket")]
    pub(crate) control_socket: PathBuf,
    /// Boot counter, cached VM definitions.
    #[serde(default = "default_state_dir")]
    pub(crate) state_dir: PathBuf,
    /// `host:port` of the Prometheus endpoint; none if absent.
    #[serde(default)]
    pub(crate) metrics_listen: Option<String>,
    /// How old (by the sender's clock) a heartbeat may be.
    #[serde(default = "default_skew", with = "humantime_serde")]
    pub(crate) max_clock_skew: Duration,
    /// How long actions in flight may finish at shutdown or reload.
    #[serde(default = "default_grace", with = "humantime_serde")]
    pub(crate) shutdown_grace: Duration,
    /// Events kept per pair for `explain`.
    #[serde(default = "default_history")]
    pub(crate) history: usize,
    /// Per-action deadlines.
    #[serde(default)]
    pub(crate) deadlines: Deadlines,
    /// How nodes reach each other over ssh (replication).
    #[serde(default)]
    pub(crate) ssh: SshSection,
    /// A witness command, when `[cluster] witness = true`.
    #[serde(default)]
    pub(crate) witness: Option<WitnessSection>,
}

fn default_socket() -> PathBuf {
    "/run/wspare/agent.sock".into()
}
fn default_state_dir() -> PathBuf {
    "/var/lib/wspare".into()
}
fn default_skew() -> Duration {
    Duration::from_secs(60)
}
fn default_grace() -> Duration {
    Duration::from_secs(30)
}
fn default_history() -> usize {
    200
}

/// `[agent.ssh]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub(crate) struct SshSection {
    /// Remote user.
    #[serde(default = "default_user")]
    pub(crate) user: String,
    /// Port, if not 22.
    #[serde(default)]
    pub(crate) port: Option<u16>,
    /// Private key.
    #[serde(default)]
    pub(crate) identity: Option<PathBuf>,
    /// Extra `-o` options.
    #[serde(default)]
    pub(crate) options: Vec<String>,
    /// ssh's connect timeout.
    #[serde(default = "default_connect", with = "humantime_serde")]
    pub(crate) connect_timeout: Duration,
    /// Host per node; default: the host of the node's heartbeat address (so
    /// replication crosses the heartbeat network and stops with it).
    #[serde(default)]
    pub(crate) hosts: BTreeMap<String, String>,
}

fn default_user() -> String {
    "root".into()
}
fn default_connect() -> Duration {
    Duration::from_secs(10)
}

impl Default for SshSection {
    fn default() -> Self {
        SshSection {
            user: default_user(),
            port: None,
            identity: None,
            options: Vec::new(),
            connect_timeout: default_connect(),
            hosts: BTreeMap::new(),
        }
    }
}

/// `[agent.witness]`: a command asked about each peer. Exit 0: the witness
/// reaches the peer; exit 1: it does not; anything else: no verdict.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub(crate) struct WitnessSection {
    /// argv; `{node}` is replaced by the peer's name, `{host}` by the host
    /// of its heartbeat address.
    pub(crate) command: Vec<String>,
    /// How often.
    #[serde(default = "default_witness_interval", with = "humantime_serde")]
    pub(crate) interval: Duration,
    /// Deadline of one run.
    #[serde(default = "default_witness_timeout", with = "humantime_serde")]
    pub(crate) timeout: Duration,
}

fn default_witness_interval() -> Duration {
    Duration::from_secs(2)
}
fn default_witness_timeout() -> Duration {
    Duration::from_secs(5)
}

/// `[node.hypervisor]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub(crate) enum HypervisorSection {
    /// libvirt (KVM/QEMU, Xen through libxl).
    Libvirt(LibvirtSection),
}

/// `type = "libvirt"`.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub(crate) struct LibvirtSection {
    /// How the node's own agent reaches its libvirt (`qemu:///system`).
    pub(crate) uri: String,
    /// How the other nodes' agents reach it: the second channel of failure
    /// detection, so over the heartbeat network (`qemu+ssh://root@10.0.0.1/system`).
    pub(crate) peer_uri: String,
    /// `kvm`, `qemu` (TCG), `xen`, `test`; default from the URI.
    #[serde(default)]
    pub(crate) domain_type: Option<DomainTypeName>,
    /// Machine type.
    #[serde(default)]
    pub(crate) machine: Option<String>,
    /// Guest architecture.
    #[serde(default)]
    pub(crate) arch: Option<String>,
    /// Serial consoles to `<dir>/<vm>.console.log`.
    #[serde(default)]
    pub(crate) console_log_dir: Option<PathBuf>,
    /// Use the QEMU guest agent to quiesce at freezes.
    #[serde(default = "yes")]
    pub(crate) guest_agent: bool,
    /// Where freeze overlays go.
    #[serde(default)]
    pub(crate) overlay_dir: Option<PathBuf>,
    /// Deadline of one libvirt call.
    #[serde(default, with = "humantime_serde")]
    pub(crate) call_timeout: Option<Duration>,
    /// Polling while waiting.
    #[serde(default, with = "humantime_serde")]
    pub(crate) poll_interval: Option<Duration>,
    /// Block commit deadline.
    #[serde(default, with = "humantime_serde")]
    pub(crate) commit_timeout: Option<Duration>,
    /// Disk detach deadline.
    #[serde(default, with = "humantime_serde")]
    pub(crate) detach_timeout: Option<Duration>,
}

fn yes() -> bool {
    true
}

/// `domain-type`.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum DomainTypeName {
    /// KVM.
    Kvm,
    /// TCG.
    Qemu,
    /// Xen.
    Xen,
    /// libvirt's test driver.
    Test,
}

impl DomainTypeName {
    pub(crate) fn libvirt(self) -> wspare_libvirt::DomainType {
        match self {
            DomainTypeName::Kvm => wspare_libvirt::DomainType::Kvm,
            DomainTypeName::Qemu => wspare_libvirt::DomainType::Qemu,
            DomainTypeName::Xen => wspare_libvirt::DomainType::Xen,
            DomainTypeName::Test => wspare_libvirt::DomainType::Test,
        }
    }
}

/// `[pair.replication]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub(crate) enum ReplicationSection {
    /// Image files over rsync.
    Rsync(RsyncSection),
}

/// `type = "rsync"`.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub(crate) struct RsyncSection {
    /// The replica directory on each node (`{node}` allowed), one per pair.
    pub(crate) dir: PathBuf,
    /// The rsync program.
    #[serde(default)]
    pub(crate) rsync: Option<String>,
    /// Deadline of one disk's transfer.
    #[serde(default, with = "humantime_serde")]
    pub(crate) transfer_timeout: Option<Duration>,
    /// rsync's `--timeout`.
    #[serde(default, with = "humantime_serde")]
    pub(crate) io_timeout: Option<Duration>,
    /// Deadline of small commands (manifest, stat).
    #[serde(default, with = "humantime_serde")]
    pub(crate) command_timeout: Option<Duration>,
    /// Deadline of local copies.
    #[serde(default, with = "humantime_serde")]
    pub(crate) copy_timeout: Option<Duration>,
    /// `auto`, `rsync`, or a size in bytes.
    #[serde(default)]
    pub(crate) block_size: Option<BlockSizeSetting>,
    /// `--bwlimit` in KiB/s.
    #[serde(default)]
    pub(crate) bwlimit_kib: Option<u32>,
}

/// `block-size`.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub(crate) enum BlockSizeSetting {
    /// `auto` or `rsync`.
    Named(String),
    /// Bytes.
    Bytes(u32),
}

/// A node's fencing: one device, or levels of one device each, tried in order.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub(crate) enum FenceSection {
    /// `[node.fence]`.
    One(DeviceConfig),
    /// `[[node.fence]]`.
    Levels(Vec<DeviceConfig>),
}

impl FenceSection {
    pub(crate) fn levels(&self) -> Vec<DeviceConfig> {
        match self {
            FenceSection::One(d) => vec![d.clone()],
            FenceSection::Levels(v) => v.clone(),
        }
    }
}

/// One node, decoded.
#[derive(Clone, Debug)]
pub(crate) struct NodeSettings {
    pub(crate) name: NodeId,
    pub(crate) address: String,
    pub(crate) hypervisor: HypervisorSection,
    pub(crate) fence: Vec<DeviceConfig>,
}

impl NodeSettings {
    /// The host part of the heartbeat address.
    pub(crate) fn host(&self) -> &str {
        host_of(&self.address)
    }
}

/// One pair, decoded.
#[derive(Clone, Debug)]
pub(crate) struct PairSettings {
    pub(crate) name: PairId,
    pub(crate) vm: VmName,
    pub(crate) primary: NodeId,
    pub(crate) spare: NodeId,
    pub(crate) replication: ReplicationSection,
}

impl PairSettings {
    /// The pair's other node, seen from `local` (one of its two).
    pub(crate) fn peer_of(&self, local: &NodeId) -> &NodeId {
        if self.primary == *local {
            &self.spare
        } else {
            &self.primary
        }
    }
}

/// The whole config as the agent on `local` uses it.
#[derive(Clone, Debug)]
pub(crate) struct Settings {
    pub(crate) core: Config,
    pub(crate) local: NodeId,
    pub(crate) agent: AgentSection,
    pub(crate) nodes: BTreeMap<NodeId, NodeSettings>,
    pub(crate) pairs: Vec<PairSettings>,
    /// Non-fatal findings.
    pub(crate) warnings: Vec<String>,
}

/// `host` of `host:port` (`[v6]:port` gives `v6`).
pub(crate) fn host_of(address: &str) -> &str {
    let h = address.rsplit_once(':').map_or(address, |(h, _)| h);
    h.trim_start_matches('[').trim_end_matches(']')
}

fn one(field: String, line: Option<usize>, message: impl Into<String>) -> ConfigError {
    ConfigError {
        field,
        line,
        message: message.into(),
    }
}

/// The agent's tables of a config, decoded (for any node).
#[derive(Clone, Debug)]
pub(crate) struct Decoded {
    pub(crate) agent: AgentSection,
    pub(crate) nodes: BTreeMap<NodeId, NodeSettings>,
    pub(crate) pairs: Vec<PairSettings>,
    pub(crate) warnings: Vec<String>,
}

/// Decodes the agent's tables of a validated core config. Every error
/// names its field and line; all of them are collected.
pub(crate) fn decode(core: &Config, path: &Path) -> Result<Decoded, ConfigErrors> {
    let mut errors = Vec::new();
    let mut warnings = Vec::new();
    let agent = match &core.agent {
        Some(t) => match core.extension::<AgentSection>("agent", t) {
            Ok(a) => Some(a),
            Err(e) => {
                errors.extend(e.errors);
                None
            }
        },
        None => {
            errors.push(one(
                "agent".into(),
                None,
                "missing [agent] table (it needs at least key-file)",
            ));
            None
        }
    };
    if let Some(a) = &agent {
        let line = core.agent.as_ref().map(|t| core.line_at(t.span().start));
        if a.key_file.is_none() {
            errors.push(one(
                "agent.key-file".into(),
                line,
                "missing: the file with the shared heartbeat key",
            ));
        }
        if let Some(m) = &a.metrics_listen {
            if m.parse::<SocketAddr>().is_err() {
                errors.push(one(
                    "agent.metrics-listen".into(),
                    line,
                    format!("{m:?} is not an ip:port address"),
                ));
            }
        }
        if a.history == 0 {
            errors.push(one("agent.history".into(), line, "must be at least 1"));
        }
        if core.cluster.witness && a.witness.is_none() {
            errors.push(one(
                "agent.witness".into(),
                line,
                "[cluster] witness = true, but no [agent.witness] command is configured",
            ));
        }
        if let Some(w) = &a.witness {
            if w.command.is_empty() {
                errors.push(one("agent.witness.command".into(), line, "is empty"));
            }
        }
    }
    let mut nodes = BTreeMap::new();
    let in_pairs: Vec<&NodeId> = core
        .pairs
        .iter()
        .flat_map(|p| [p.primary.get_ref(), p.spare.get_ref()])
        .collect();
    for n in &core.nodes {
        let name = n.name.get_ref().clone();
        let field = format!("node[{name}]");
        let line = Some(core.line_at(n.name.span().start));
        let in_a_pair = in_pairs.contains(&&name);
        let hv = match &n.hypervisor {
            Some(t) => {
                match core.extension::<HypervisorSection>(&format!("{field}.hypervisor"), t) {
                    Ok(h) => Some(h),
                    Err(e) => {
                        errors.extend(e.errors);
                        None
                    }
                }
            }
            None => {
                if in_a_pair {
                    let why = "missing: which hypervisor runs this node's VMs (type = \"libvirt\", uri, peer-uri)";
                    errors.push(one(format!("{field}.hypervisor"), line, why));
                }
                None
            }
        };
        if let Some(HypervisorSection::Libvirt(l)) = &hv {
            let hb = host_of(n.address.get_ref());
            match uri_host(&l.peer_uri) {
                None => {
                    let why = format!(
                        "{:?} names no host: the peer reaches this node's libvirt over the network (qemu+ssh://root@{hb}/system)",
                        l.peer_uri
                    );
                    errors.push(one(format!("{field}.hypervisor.peer-uri"), line, why));
                }
                Some(h) if h != hb => warnings.push(format!(
                    "{field}.hypervisor.peer-uri: host {h} differs from the heartbeat address host {hb}; the peer's second channel should cross the heartbeat network, or in a partition of that network it still sees the VM running and holds the failover"
                )),
                Some(_) => {}
            }
            if let Err(e) = wspare_libvirt::Driver::from_uri(&l.uri) {
                errors.push(one(
                    format!("{field}.hypervisor.uri"),
                    line,
                    e.message().to_string(),
                ));
            }
        }
        let fence = match &n.fence {
            Some(v) => match core.extension_value::<FenceSection>(&format!("{field}.fence"), v) {
                Ok(f) => Some(f.levels()),
                Err(mut e) => {
                    for err in &mut e.errors {
                        if err.message.contains("did not match any variant") {
                            err.message = fence_detail(v.get_ref());
                        }
                    }
                    errors.extend(e.errors);
                    None
                }
            },
            None => {
                if in_a_pair {
                    let why = "missing: how the peer powers this node off ([node.fence] type = \"ipmi\" | \"redfish\" | \"fence-agent\")";
                    errors.push(one(format!("{field}.fence"), line, why));
                }
                None
            }
        };
        if let (Some(hypervisor), Some(fence)) = (hv, fence) {
            nodes.insert(
                name.clone(),
                NodeSettings {
                    name,
                    address: n.address.get_ref().clone(),
                    hypervisor,
                    fence,
                },
            );
        }
    }
    let mut pairs = Vec::new();
    for p in &core.pairs {
        let name = p.name.get_ref().clone();
        let field = format!("pair[{name}]");
        let Some(t) = &p.replication else {
            let why = "missing: how the VM's disks reach the spare ([pair.replication] type = \"rsync\", dir)";
            let line = Some(core.line_at(p.name.span().start));
            errors.push(one(format!("{field}.replication"), line, why));
            continue;
        };
        let r = match core.extension::<ReplicationSection>(&format!("{field}.replication"), t) {
            Ok(r) => r,
            Err(e) => {
                errors.extend(e.errors);
                continue;
            }
        };
        let ReplicationSection::Rsync(rs) = &r;
        let line = Some(core.line_at(t.span().start));
        if !rs.dir.to_string_lossy().starts_with('/') {
            errors.push(one(
                format!("{field}.replication.dir"),
                line,
                format!("{} is not an absolute path", rs.dir.display()),
            ));
        }
        if let Some(BlockSizeSetting::Named(n)) = &rs.block_size {
            if n != "auto" && n != "rsync" {
                errors.push(one(
                    format!("{field}.replication.block-size"),
                    line,
                    format!("{n:?}: expected \"auto\", \"rsync\" or a size in bytes"),
                ));
            }
        }
        pairs.push(PairSettings {
            name,
            vm: p.vm.get_ref().clone(),
            primary: p.primary.get_ref().clone(),
            spare: p.spare.get_ref().clone(),
            replication: r,
        });
    }
    if !errors.is_empty() {
        errors.sort_by_key(|e| e.line.unwrap_or(0));
        return Err(ConfigErrors {
            path: Some(path.to_path_buf()),
            errors,
        });
    }
    Ok(Decoded {
        agent: agent.expect("no errors, so [agent] decoded"),
        nodes,
        pairs,
        warnings,
    })
}

impl Settings {
    /// Decodes a validated core config for the agent on `local`.
    pub(crate) fn from_core(
        core: Config,
        path: &Path,
        local: &NodeId,
    ) -> Result<Settings, ConfigErrors> {
        if core.node(local).is_none() {
            let names: Vec<&str> = core
                .nodes
                .iter()
                .map(|n| n.name.get_ref().as_str())
                .collect();
            return Err(ConfigErrors {
                path: Some(path.to_path_buf()),
                errors: vec![one(
                    "node".into(),
                    None,
                    format!(
                        "the local node {local} is not defined (nodes: {}); pass --node with one of them",
                        names.join(", ")
                    ),
                )],
            });
        }
        let d = decode(&core, path)?;
        Ok(Settings {
            core,
            local: local.clone(),
            agent: d.agent,
            nodes: d.nodes,
            pairs: d.pairs,
            warnings: d.warnings,
        })
    }

    /// The journal file.
    pub(crate) fn journal(&self) -> PathBuf {
        per_node_path(&self.core.cluster.journal, &self.local)
    }

    /// The control socket.
    pub(crate) fn socket(&self) -> PathBuf {
        per_node_path(&self.agent.control_socket, &self.local)
    }

    /// The state directory.
    pub(crate) fn state_dir(&self) -> PathBuf {
        per_node_path(&self.agent.state_dir, &self.local)
    }

    /// The pairs the local node belongs to.
    pub(crate) fn local_pairs(&self) -> impl Iterator<Item = &PairSettings> {
        self.pairs
            .iter()
            .filter(|p| p.primary == self.local || p.spare == self.local)
    }

    /// The nodes the local node shares a pair with.
    pub(crate) fn peers(&self) -> Vec<NodeId> {
        let mut v: Vec<NodeId> = self
            .local_pairs()
            .map(|p| p.peer_of(&self.local).clone())
            .collect();
        v.sort();
        v.dedup();
        v
    }

    /// The ssh host of `node`.
    pub(crate) fn ssh_host(&self, node: &NodeSettings) -> String {
        self.agent
            .ssh
            .hosts
            .get(node.name.as_str())
            .cloned()
            .unwrap_or_else(|| node.host().to_string())
    }
}

/// The host of a libvirt URI (`qemu+ssh://root@h:22/system` gives `h`).
pub(crate) fn uri_host(uri: &str) -> Option<&str> {
    let rest = uri.split_once("://")?.1;
    let authority = rest.split(['/', '?']).next()?;
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let host = if host.starts_with('[') {
        host.split_once(']').map(|(h, _)| &h[1..])?
    } else {
        host.split(':').next()?
    };
    (!host.is_empty()).then_some(host)
}

/// What is wrong with a fence value, from the device type it names.
fn fence_detail(v: &toml::Value) -> String {
    let tables: Vec<&toml::Table> = match v {
        toml::Value::Table(t) => vec![t],
        toml::Value::Array(a) => a.iter().filter_map(|x| x.as_table()).collect(),
        _ => return "expected a device table ([node.fence]) or levels ([[node.fence]])".into(),
    };
    for (i, t) in tables.iter().enumerate() {
        let level = if tables.len() > 1 {
            format!("level {}: ", i + 1)
        } else {
            String::new()
        };
        if let Err(e) = DeviceConfig::deserialize(toml::Value::Table((*t).clone())) {
            return format!("{level}{}", e.message().trim_end());
        }
    }
    "expected a device table ([node.fence]) or levels ([[node.fence]])".into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_and_paths() {
        assert_eq!(host_of("10.0.0.1:7400"), "10.0.0.1");
        assert_eq!(host_of("[fd00::1]:7400"), "fd00::1");
        assert_eq!(
            uri_host("qemu+ssh://root@node-a:2222/system?keyfile=/k"),
            Some("node-a")
        );
        assert_eq!(uri_host("qemu+tcp://198.18.0.1/system"), Some("198.18.0.1"));
        assert_eq!(
            uri_host("qemu+tcp://[fd00::1]:16509/system"),
            Some("fd00::1")
        );
        assert_eq!(uri_host("qemu:///system"), None);
        assert_eq!(uri_host("qemu+unix:///system?socket=/x"), None);
        let n = NodeId::new("node-a").unwrap();
        assert_eq!(
            per_node_path(Path::new("/var/lib/{node}/j"), &n),
            PathBuf::from("/var/lib/node-a/j")
        );
    }
}
