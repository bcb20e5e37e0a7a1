//! What one config builds: backends, executors, the driver, the heartbeat
//! link, the witness and the progress bar; and the parts of the agent that
//! outlive a reload (metrics, history, heartbeat sequence and replay
//! guards, the boot epoch).
//!
//! A reload builds everything that does not conflict with the running
//! runtime first ([`prepare`]: config, key, fencing, hypervisors, VM
//! definitions, replicators), so that a bad config or an unreadable key
//! leaves the agent running as it was. Only then is the old driver shut
//! down (actions in flight get the grace period; what does not finish is
//! re-observed from the journal) and the new one started on the same
//! journal ([`launch`]).

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use tokio::task::JoinHandle;
use wspare_core::driver::{Driver, DriverHandle, Executor, FenceGate, PairBackends, SystemClock};
use wspare_core::journal::Journal;
use wspare_core::runner::{CommandRunner, LocalRunner, SshRunner, SshTarget};
use wspare_core::{Fencer, Hypervisor, NodeId, PairId, UnixMillis, VmSpec};
use wspare_libvirt::{LibvirtConfig, LibvirtHypervisor};
use wspare_rsync::{BlockSize, Endpoint, Options, Reach};

use crate::fencing;
use crate::heartbeat::{self, Link};
use crate::history::History;
use crate::metrics::Metrics;
use crate::replication::{Directed, LocalDirected};
use crate::settings::{
    self, BlockSizeSetting, HypervisorSection, NodeSettings, PairSettings, ReplicationSection,
    Settings,
};
use crate::wire::Key;

/// Journals larger than this are compacted.
const JOURNAL_COMPACT_AT: u64 = 4 << 20;

/// The parts of the agent that live across reloads.
pub(crate) struct Agent {
    pub(crate) local: NodeId,
    pub(crate) config_path: PathBuf,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) history: Arc<History>,
    pub(crate) hb: Arc<heartbeat::Shared>,
    pub(crate) current: tokio::sync::RwLock<Option<Arc<Runtime>>>,
    pub(crate) last_reload_error: Mutex<Option<String>>,
    pub(crate) started: UnixMillis,
}

/// A running config.
pub(crate) struct Runtime {
    pub(crate) settings: Settings,
    pub(crate) handle: DriverHandle,
    /// Set once the driver task ended, with how.
    done: tokio::sync::watch::Receiver<Option<String>>,
    /// Set by `stop`: the driver's end is expected.
    stopping: std::sync::atomic::AtomicBool,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

/// Everything built from a config before anything is started.
pub(crate) struct Prepared {
    settings: Settings,
    key: Key,
    executors: BTreeMap<PairId, Arc<Executor>>,
    replicators: Vec<Arc<Directed>>,
}

/// Raises and returns the boot epoch kept in `state_dir/boot`.
pub(crate) fn next_boot(state_dir: &Path) -> Result<u64> {
    std::fs::create_dir_all(state_dir)
        .with_context(|| format!("creating the state directory {}", state_dir.display()))?;
    let path = state_dir.join("boot");
    let old = match std::fs::read_to_string(&path) {
        Ok(s) => s.trim().parse::<u64>().with_context(|| {
            format!("{} does not hold a number; remove it only if no peer runs (it orders this agent's heartbeats)", path.display())
        })?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let new = old + 1;
    let tmp = state_dir.join("boot.tmp");
    std::fs::File::create(&tmp)
        .and_then(|mut f| {
            writeln!(f, "{new}")?;
            f.sync_all()
        })
        .and_then(|_| std::fs::rename(&tmp, &path))
        .and_then(|_| std::fs::File::open(state_dir)?.sync_all())
        .with_context(|| format!("writing the boot epoch {new} to {}", path.display()))?;
    Ok(new)
}

/// Reads the heartbeat key; refuses a file others can read.
pub(crate) fn read_key(path: &Path) -> Result<Key> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path)
        .with_context(|| format!("heartbeat key file {}", path.display()))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        bail!(
            "heartbeat key file {} is readable by others (mode {mode:o}); run `chmod 600 {}`",
            path.display(),
            path.display()
        );
    }
    let mut bytes = std::fs::read(path)
        .with_context(|| format!("reading heartbeat key file {}", path.display()))?;
    while bytes.last().is_some_and(|b| b.is_ascii_whitespace()) {
        bytes.pop();
    }
    Key::new(bytes).map_err(|e| anyhow!("heartbeat key file {}: {e}", path.display()))
}

fn libvirt_config(n: &NodeSettings, local: bool) -> LibvirtConfig {
    let HypervisorSection::Libvirt(l) = &n.hypervisor;
    let mut c = LibvirtConfig::new(if local { &l.uri } else { &l.peer_uri });
    c.domain_type = l.domain_type.map(|d| d.libvirt());
    c.machine = l.machine.clone();
    c.arch = l.arch.clone();
    c.console_log_dir = l.console_log_dir.clone();
    c.guest_agent = l.guest_agent;
    c.overlay_dir = l.overlay_dir.clone();
    c.call_timeout = l.call_timeout.unwrap_or(c.call_timeout);
    c.poll_interval = l.poll_interval.unwrap_or(c.poll_interval);
    c.commit_timeout = l.commit_timeout.unwrap_or(c.commit_timeout);
    c.detach_timeout = l.detach_timeout.unwrap_or(c.detach_timeout);
    c
}

/// The VM's definition: from this node's hypervisor, else the peer's, else
/// the copy cached at the last success.
async fn load_spec(
    pair: &PairSettings,
    local: (&NodeId, &Arc<dyn Hypervisor>),
    peer: (&NodeId, &Arc<dyn Hypervisor>),
    cache_dir: &Path,
) -> Result<VmSpec> {
    let cache = cache_dir.join(format!("{}.spec.json", pair.name));
    let mut tried = Vec::new();
    for (node, hv) in [local, peer] {
        match hv.spec(&pair.vm).await {
            Ok(spec) => {
                let json = serde_json::to_vec_pretty(&spec)?;
                let tmp = cache.with_extension("tmp");
                std::fs::write(&tmp, json)
                    .and_then(|_| std::fs::rename(&tmp, &cache))
                    .with_context(|| format!("caching the definition in {}", cache.display()))?;
                tracing::info!(pair = %pair.name, vm = %pair.vm, from = %node, "read the VM's definition");
                return Ok(spec);
            }
            Err(e) => tried.push(format!("{node}: {e}")),
        }
    }
    match std::fs::read(&cache) {
        Ok(bytes) => {
            let spec: VmSpec = serde_json::from_slice(&bytes)
                .with_context(|| format!("cached definition {}", cache.display()))?;
            tracing::warn!(pair = %pair.name, vm = %pair.vm, cache = %cache.display(), "neither hypervisor has the VM's definition now; using the cached one ({})", tried.join("; "));
            Ok(spec)
        }
        Err(_) => bail!(
            "pair {}: cannot read the definition of VM {} ({}) and no cached copy is at {}: define the VM on {} (or {}) first",
            pair.name,
            pair.vm,
            tried.join("; "),
            cache.display(),
            pair.primary,
            pair.spare
        ),
    }
}

fn ssh_target(s: &Settings, n: &NodeSettings) -> Result<SshTarget> {
    let ssh = &s.agent.ssh;
    let host = s.ssh_host(n);
    let mut t = SshTarget::new(format!("{}@{host}", ssh.user))
        .map_err(|e| anyhow!("[agent.ssh] for node {}: {e}", n.name))?;
    t.port = ssh.port;
    t.identity = ssh.identity.clone();
    t.options = ssh.options.clone();
    t.connect_timeout = ssh.connect_timeout;
    Ok(t)
}

fn rsync_options(r: &settings::RsyncSection) -> Options {
    let mut o = Options::default();
    if let Some(p) = &r.rsync {
        o.rsync = p.clone();
    }
    o.transfer_timeout = r.transfer_timeout.unwrap_or(o.transfer_timeout);
    o.io_timeout = r.io_timeout.unwrap_or(o.io_timeout);
    o.command_timeout = r.command_timeout.unwrap_or(o.command_timeout);
    o.copy_timeout = r.copy_timeout.unwrap_or(o.copy_timeout);
    o.block_size = match &r.block_size {
        None => BlockSize::Auto,
        Some(BlockSizeSetting::Named(n)) if n == "rsync" => BlockSize::Rsync,
        Some(BlockSizeSetting::Named(_)) => BlockSize::Auto,
        Some(BlockSizeSetting::Bytes(b)) => BlockSize::Fixed(*b),
    };
    o.bwlimit_kib = r.bwlimit_kib;
    o
}

/// Builds every backend of `settings` without starting anything.
pub(crate) async fn prepare(settings: Settings, agent: &Agent) -> Result<Prepared> {
    let local = settings.local.clone();
    let key_file = settings
        .agent
        .key_file
        .clone()
        .ok_or_else(|| anyhow!("[agent] key-file is not set"))?;
    let key = read_key(&key_file)?;
    let topology = fencing::topology(&settings.nodes, &settings.core)
        .map_err(|e| anyhow!("fencing config: {e}"))?;
    let fencer: Arc<dyn Fencer> = Arc::new(fencing::Metered::new(
        Arc::new(topology),
        agent.metrics.clone(),
    ));
    // One hypervisor per node: ours locally, the peers' over the network.
    let mut hvs: BTreeMap<NodeId, Arc<dyn Hypervisor>> = BTreeMap::new();
    let mut wanted = vec![local.clone()];
    wanted.extend(settings.peers());
    for n in wanted {
        let ns = settings.nodes.get(&n).ok_or_else(|| {
            anyhow!("node {n} has no [node.hypervisor] or no [node.fence] table; the agent on {local} needs both for its own node and its peers")
        })?;
        let hv = LibvirtHypervisor::new(libvirt_config(ns, n == local))
            .map_err(|e| anyhow!("node {n}: hypervisor: {e}"))?;
        hvs.insert(n, Arc::new(hv));
    }
    let state_dir = settings.state_dir();
    std::fs::create_dir_all(&state_dir)
        .with_context(|| format!("creating the state directory {}", state_dir.display()))?;
    let gate = Arc::new(FenceGate::default());
    let clock = Arc::new(SystemClock);
    let mut executors = BTreeMap::new();
    let mut replicators = Vec::new();
    for p in settings.local_pairs() {
        let peer = p.peer_of(&local).clone();
        let spec = load_spec(p, (&local, &hvs[&local]), (&peer, &hvs[&peer]), &state_dir).await?;
        if spec.name != p.vm {
            bail!(
                "pair {}: the definition read is of VM {}, not {}",
                p.name,
                spec.name,
                p.vm
            );
        }
        let ReplicationSection::Rsync(rs) = &p.replication;
        let endpoint = |n: &NodeId| -> Result<Endpoint> {
            let ns = &settings.nodes[n];
            let target = ssh_target(&settings, ns)?;
            let runner: Arc<dyn CommandRunner> = if *n == local {
                Arc::new(LocalRunner)
            } else {
                Arc::new(SshRunner::new(target.clone()))
            };
            Ok(Endpoint::new(
                n.clone(),
                runner,
                Reach::Ssh(target),
                wspare_examples::per_node_path(&rs.dir, n),
            ))
        };
        let directed = Arc::new(
            Directed::new(
                p.name.clone(),
                p.primary.clone(),
                endpoint(&p.primary)?,
                endpoint(&p.spare)?,
                rsync_options(rs),
                agent.metrics.clone(),
            )
            .map_err(|e| anyhow!("pair {}: replication: {e}", p.name))?,
        );
        replicators.push(directed.clone());
        let backends = PairBackends {
            spec,
            hypervisors: [
                (local.clone(), hvs[&local].clone()),
                (peer.clone(), hvs[&peer].clone()),
            ]
            .into_iter()
            .collect(),
            replicator: Arc::new(LocalDirected {
                inner: directed,
                local: local.clone(),
            }),
            fencers: [(peer.clone(), fencer.clone())].into_iter().collect(),
        };
        executors.insert(
            p.name.clone(),
            Arc::new(Executor::new(
                p.name.clone(),
                local.clone(),
                Arc::new(backends),
                settings.agent.deadlines.clone(),
                clock.clone(),
                gate.clone(),
            )),
        );
    }
    Ok(Prepared {
        settings,
        key,
        executors,
        replicators,
    })
}

/// Starts the driver and the tasks around it.
pub(crate) async fn launch(p: Prepared, agent: &Arc<Agent>) -> Result<Runtime> {
    let s = &p.settings;
    let local = s.local.clone();
    let journal_path = s.journal();
    if let Some(dir) = journal_path.parent() {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating the journal's directory {}", dir.display()))?;
    }
    let (journal, loaded) =
        Journal::open(&journal_path, JOURNAL_COMPACT_AT).map_err(|e| anyhow!("{e}"))?;
    tracing::info!(journal = %journal_path.display(), pairs = loaded.snapshots.len(), records = loaded.records, "journal opened");
    // The machines' first events (restores) go out before anyone can
    // subscribe: say in `explain` what the journal held.
    for p in s.local_pairs() {
        let note = match loaded.snapshots.get(&p.name) {
            Some(snap) => format!(
                "agent start: restored from the journal in phase {} at epoch {} with {} action(s) pending (their outcome is re-observed before anything is repeated)",
                snap.phase.name(),
                snap.epoch,
                snap.pending.len()
            ),
            None => "agent start: the journal holds nothing for this pair; starting it fresh".into(),
        };
        agent.history.note(std::slice::from_ref(&p.name), &note);
    }
    let configs = s.core.machines_for(&local);
    let (handle, join) = Driver::start(local.clone(), configs, journal, p.executors)
        .map_err(|e| anyhow!("starting the driver: {e}"))?;
    let (done_tx, done) = tokio::sync::watch::channel(None);
    tokio::spawn(async move {
        let how = match join.await {
            Ok(Ok(())) => "the driver stopped".to_string(),
            Ok(Err(e)) => format!("the driver stopped: {e}"),
            Err(e) => format!("the driver task failed: {e}"),
        };
        let _ = done_tx.send(Some(how));
    });
    let mut tasks = Vec::new();
    tasks.push(tokio::spawn(
        agent.history.clone().follow(local.clone(), handle.events()),
    ));
    // Heartbeats: the socket and its loops belong to the agent (they go on
    // through a reload); this config's link and driver are installed.
    let mut peers = Vec::new();
    for n in s.peers() {
        let addr = heartbeat::resolve(&s.nodes[&n].address)
            .await
            .with_context(|| format!("node {n}: heartbeat address {}", s.nodes[&n].address))?;
        peers.push((n, addr));
    }
    let link = Arc::new(Link {
        local: local.clone(),
        cluster: s.core.cluster.name.clone(),
        key: p.key,
        peers: peers.clone(),
        interval: s.core.cluster.heartbeat_interval,
        max_skew: s.agent.max_clock_skew,
    });
    agent.hb.install(link, handle.clone());
    if let (true, Some(w)) = (s.core.cluster.witness, s.agent.witness.clone()) {
        let peers: Vec<(NodeId, String)> = peers
            .iter()
            .map(|(n, _)| (n.clone(), s.nodes[n].host().to_string()))
            .collect();
        tasks.push(tokio::spawn(witness_loop(w, peers, handle.clone())));
    }
    tasks.push(tokio::spawn(crate::progress::run(p.replicators)));
    agent.history.set_cap(s.agent.history);
    tracing::info!(node = %local, peers = peers.len(), pairs = s.local_pairs().count(), "agent running");
    Ok(Runtime {
        settings: p.settings,
        handle,
        done,
        stopping: std::sync::atomic::AtomicBool::new(false),
        tasks: Mutex::new(tasks),
    })
}

impl Runtime {
    /// Stops the tasks, then the driver (in-flight actions get `grace`).
    pub(crate) async fn stop(&self, agent: &Agent, grace: Duration) {
        self.stopping
            .store(true, std::sync::atomic::Ordering::SeqCst);
        agent.hb.detach();
        let tasks: Vec<JoinHandle<()>> =
            std::mem::take(&mut *self.tasks.lock().unwrap_or_else(|e| e.into_inner()));
        for t in &tasks {
            t.abort();
        }
        for t in tasks {
            let _ = t.await;
        }
        if let Err(e) = self.handle.shutdown(grace).await {
            tracing::debug!(error = %e, "driver already stopped");
        }
        let mut done = self.done.clone();
        let waited = tokio::time::timeout(
            grace + Duration::from_secs(5),
            done.wait_for(|d| d.is_some()),
        )
        .await;
        match waited {
            Ok(Ok(d)) => tracing::info!("{}", d.clone().unwrap_or_default()),
            _ => tracing::error!("the driver did not stop within the grace period"),
        }
    }

    /// Resolves when the driver stops by itself (a journal that cannot be
    /// written: fail-stop), with how; never after `stop`.
    pub(crate) async fn unexpected_end(&self) -> String {
        let mut done = self.done.clone();
        let how = match done.wait_for(|d| d.is_some()).await {
            Ok(d) => d.clone().unwrap_or_default(),
            Err(_) => "the driver's monitor ended".into(),
        };
        if self.stopping.load(std::sync::atomic::Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        how
    }

    /// The pairs this runtime runs.
    pub(crate) fn pairs(&self) -> Vec<PairId> {
        self.settings
            .local_pairs()
            .map(|p| p.name.clone())
            .collect()
    }
}

/// Asks the witness about each peer every `interval`.
async fn witness_loop(
    w: settings::WitnessSection,
    peers: Vec<(NodeId, String)>,
    handle: DriverHandle,
) {
    let mut tick = tokio::time::interval(w.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        for (peer, host) in &peers {
            let argv: Vec<String> = w
                .command
                .iter()
                .map(|a| a.replace("{node}", peer.as_str()).replace("{host}", host))
                .collect();
            let cmd = wspare_core::runner::Command::new(argv[0].clone())
                .args(argv[1..].iter().cloned())
                .timeout(w.timeout)
                .ok_exit_codes(&[0, 1]);
            match LocalRunner.run(&cmd).await {
                Ok(out) => {
                    let alive = out.code == 0;
                    tracing::debug!(%peer, alive, "witness verdict");
                    if handle.witness(peer.clone(), alive).await.is_err() {
                        return;
                    }
                }
                Err(e) => tracing::warn!(%peer, error = %e, "the witness gave no verdict"),
            }
        }
    }
}

impl Agent {
    /// The running runtime, if any (none during a reload).
    pub(crate) async fn runtime(&self) -> Option<Arc<Runtime>> {
        self.current.read().await.clone()
    }

    /// Records a reload's outcome (`refused`: why the running config
    /// stays) in the metrics, `status` and the `explain` log of `pairs`.
    pub(crate) fn record_reload(&self, pairs: &[PairId], refused: Option<String>) {
        self.metrics.reload(refused.is_none());
        let note = match &refused {
            Some(why) => format!("config reload refused: {why}"),
            None => "config reloaded".into(),
        };
        self.history.note(pairs, &note);
        *self
            .last_reload_error
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = refused;
    }

    /// How long the agent has run (for `status`).
    pub(crate) fn uptime(&self) -> Duration {
        UnixMillis::now().saturating_since(self.started)
    }
}
