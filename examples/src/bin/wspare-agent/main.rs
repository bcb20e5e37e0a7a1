//! `wspare-agent`: the reference daemon. One per host; it runs the core
//! driver for the host's pairs with libvirt, rsync and IPMI (or Redfish, or
//! a fence agent), exchanges authenticated heartbeats with its peers, and
//! answers operators on a Unix socket.
//!
//! ```text
//! wspare-agent --config /etc/wspare/wspare.toml --node node-a run
//! wspare-agent status [--json]
//! wspare-agent switchover web          # on the active node
//! wspare-agent failback web            # on the active node, back to the primary
//! wspare-agent test-failover web [--generation 12]   # on the spare
//! wspare-agent end-test web
//! wspare-agent maintenance on|off [web]
//! wspare-agent confirm-down node-a     # on the survivor, once node-a is known off
//! wspare-agent stand-down web         # split brain: this node's copy loses
//! wspare-agent resume web [--accept-data-loss]
//! wspare-agent explain web [--json]
//! wspare-agent check-config /etc/wspare/wspare.toml
//! ```
//!
//! The config (see `settings.rs` and `docs/agent.md`) is the core's
//! `[cluster]`, `[defaults]`, `[[node]]`, `[[pair]]`, with the backend
//! tables `[node.hypervisor]` (`type = "libvirt"`), `[node.fence]`
//! (`type = "ipmi" | "redfish" | "fence-agent"`, or `[[node.fence]]`
//! levels), `[pair.replication]` (`type = "rsync"`) and `[agent]`. Both
//! hosts use the same file; each is told which node it is (`--node`,
//! `$WSPARE_NODE`, or the host name).
//!
//! Signals: SIGHUP reloads the config (validated first: a bad one is
//! refused and the agent keeps running, saying why); SIGTERM or SIGINT
//! stop it, actions in flight get `[agent] shutdown-grace` and the
//! journal stays consistent. systemd: `Type=notify`, `WatchdogSec=`.

mod check;
mod control;
mod fencing;
mod heartbeat;
mod history;
mod metrics;
mod notify;
mod progress;
mod replication;
mod runtime;
mod settings;
mod wire;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use tokio::signal::unix::{signal, SignalKind};
use wspare_core::config::{Config, ConfigErrors};
use wspare_core::{NodeId, PairId, UnixMillis};

use crate::control::{ExplainData, Request, StatusData};
use crate::runtime::{Agent, Runtime};
use crate::settings::Settings;

#[derive(Parser, Debug)]
#[command(
    name = "wspare-agent",
    version,
    about = "wspare's reference daemon: warm-spare failover of VMs between hosts (libvirt, rsync, IPMI)"
)]
struct Cli {
    /// The config file (the same on every node).
    #[arg(long, short, global = true, default_value = "/etc/wspare/wspare.toml")]
    config: PathBuf,
    /// Which node this is; default: $WSPARE_NODE, else the node named like this host.
    #[arg(long, global = true)]
    node: Option<String>,
    /// The agent's control socket (default: from the config).
    #[arg(long, global = true)]
    socket: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Runs the agent (the daemon).
    Run {
        /// Log format.
        #[arg(long, value_enum, default_value_t = LogFormat::Text)]
        log_format: LogFormat,
    },
    /// Every pair on this node, its peers, refused heartbeats.
    Status {
        /// Machine-readable.
        #[arg(long)]
        json: bool,
    },
    /// Planned switchover to the spare (run on the active node).
    Switchover { pair: PairId },
    /// Planned switchover back to the primary (run on the active node).
    Failback { pair: PairId },
    /// Starts an isolated clone of a generation on the spare (run on the spare).
    TestFailover {
        pair: PairId,
        /// The generation (default: the newest).
        #[arg(long)]
        generation: Option<u64>,
    },
    /// Ends the test failover (destroys the clone).
    EndTest { pair: PairId },
    /// Maintenance on this node: observe, never act.
    Maintenance {
        #[arg(value_enum)]
        state: OnOff,
        /// One pair (default: every pair of this node).
        pair: Option<PairId>,
    },
    /// States that NODE is down (after checking it is): unblocks a failover
    /// whose fencing failed.
    ConfirmDown { node: NodeId },
    /// Resolves a split brain in favour of the peer: this node's copy is
    /// destroyed and resynced (run it on the node whose copy must lose).
    StandDown { pair: PairId },
    /// Leaves the blocked state and decides again.
    Resume {
        pair: PairId,
        /// Fail over even though the replica is older than the data-loss bound.
        #[arg(long)]
        accept_data_loss: bool,
    },
    /// The recent decisions of a pair, with their causes.
    Explain {
        pair: PairId,
        #[arg(long)]
        json: bool,
    },
    /// Checks a config file: every error with its field and line.
    CheckConfig { file: PathBuf },
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum OnOff {
    On,
    Off,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
enum LogFormat {
    Text,
    Json,
}

fn init_logs(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if format == LogFormat::Json {
        b.json().init();
    } else {
        b.init();
    }
}

impl Cli {
    /// `--node`, else `$WSPARE_NODE`.
    fn node_arg(&self) -> Result<Option<NodeId>> {
        match self
            .node
            .clone()
            .or_else(|| std::env::var("WSPARE_NODE").ok())
        {
            Some(n) => Ok(Some(NodeId::new(n).map_err(|e| anyhow!("--node: {e}"))?)),
            None => Ok(None),
        }
    }
}

/// Which node this is: `--node`, `$WSPARE_NODE`, else the host name if a
/// node is named so.
fn local_node(cli: &Cli, core: &Config) -> Result<NodeId> {
    if let Some(n) = cli.node_arg()? {
        return Ok(n);
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap_or_default()
        .trim()
        .to_string();
    if let Some(n) = core
        .nodes
        .iter()
        .find(|n| n.name.get_ref().as_str() == host)
    {
        return Ok(n.name.get_ref().clone());
    }
    let names: Vec<&str> = core
        .nodes
        .iter()
        .map(|n| n.name.get_ref().as_str())
        .collect();
    bail!(
        "which node is this? No node is named like this host ({host:?}); pass --node with one of: {}",
        names.join(", ")
    )
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Cmd::CheckConfig { file } = &cli.cmd {
        return check_config(file);
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("wspare-agent: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let r = match &cli.cmd {
        Cmd::Run { log_format } => {
            init_logs(*log_format);
            rt.block_on(run_daemon(&cli))
        }
        _ => rt.block_on(client(&cli)),
    };
    match r {
        Ok(code) => code,
        Err(e) => {
            eprintln!("wspare-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn check_config(file: &Path) -> ExitCode {
    let text = match std::fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("{}: cannot read: {e}", file.display());
            return ExitCode::from(2);
        }
    };
    let r = check::check(&text, file);
    for w in &r.warnings {
        println!("{}: warning: {w}", file.display());
    }
    if r.errors.is_empty() {
        println!("{}: ok ({})", file.display(), r.summary.unwrap_or_default());
        ExitCode::SUCCESS
    } else {
        println!("{}: {} error(s)", file.display(), r.errors.len());
        for e in &r.errors {
            println!("  {e}");
        }
        ExitCode::FAILURE
    }
}

async fn client(cli: &Cli) -> Result<ExitCode> {
    let socket = match &cli.socket {
        Some(s) => s.clone(),
        None => socket_from_config(cli)?,
    };
    let req = match &cli.cmd {
        Cmd::Status { .. } => Request::Status,
        Cmd::Switchover { pair } => Request::Switchover { pair: pair.clone() },
        Cmd::Failback { pair } => Request::Failback { pair: pair.clone() },
        Cmd::TestFailover { pair, generation } => Request::TestFailover {
            pair: pair.clone(),
            generation: *generation,
        },
        Cmd::EndTest { pair } => Request::EndTest { pair: pair.clone() },
        Cmd::Maintenance { state, pair } => Request::Maintenance {
            on: matches!(state, OnOff::On),
            pair: pair.clone(),
        },
        Cmd::ConfirmDown { node } => Request::ConfirmDown { node: node.clone() },
        Cmd::StandDown { pair } => Request::StandDown { pair: pair.clone() },
        Cmd::Resume {
            pair,
            accept_data_loss,
        } => Request::Resume {
            pair: pair.clone(),
            accept_data_loss: *accept_data_loss,
        },
        Cmd::Explain { pair, .. } => Request::Explain { pair: pair.clone() },
        Cmd::Run { .. } | Cmd::CheckConfig { .. } => unreachable!("handled in main"),
    };
    let resp = control::call(&socket, &req).await?;
    if !resp.ok {
        eprintln!("{}", resp.message);
        return Ok(ExitCode::FAILURE);
    }
    match (&cli.cmd, resp.data) {
        (Cmd::Status { json: true }, Some(d)) | (Cmd::Explain { json: true, .. }, Some(d)) => {
            println!("{}", serde_json::to_string_pretty(&d)?);
        }
        (Cmd::Status { .. }, Some(d)) => {
            let d: StatusData = serde_json::from_value(d)?;
            print!("{}", control::render_status(&d));
        }
        (Cmd::Explain { pair, .. }, Some(d)) => {
            let d: ExplainData = serde_json::from_value(d)?;
            print!("{}", control::render_explain(pair, &d));
        }
        _ => println!("{}", resp.message),
    }
    Ok(ExitCode::SUCCESS)
}

/// The control socket named by the config. An operator still reaches the
/// agent while the file holds an error the agent refused at a reload: only
/// `[agent] control-socket` and the node names are read then.
fn socket_from_config(cli: &Cli) -> Result<PathBuf> {
    if let Ok(core) = Config::load(&cli.config) {
        let local = local_node(cli, &core)?;
        if let Ok(s) = Settings::from_core(core, &cli.config, &local) {
            return Ok(s.socket());
        }
    }
    let text = std::fs::read_to_string(&cli.config)
        .with_context(|| format!("reading {} (or pass --socket)", cli.config.display()))?;
    let doc: toml::Table = toml::from_str(&text).map_err(|e| {
        anyhow!(
            "{}: {} (to reach the agent anyway, pass --socket)",
            cli.config.display(),
            e.message().trim()
        )
    })?;
    let Some(local) = cli.node_arg()? else {
        bail!(
            "{} does not load; pass --node (or --socket) to reach the agent",
            cli.config.display()
        );
    };
    let path = doc
        .get("agent")
        .and_then(|a| a.get("control-socket"))
        .and_then(|s| s.as_str())
        .unwrap_or("/run/wspare/agent.sock");
    Ok(wspare_examples::per_node_path(Path::new(path), &local))
}

/// A config that does not load, for the log or `status`: every error, and
/// where to see them all (the loader stops at the first structural one).
fn config_error(e: ConfigErrors, path: &Path) -> anyhow::Error {
    anyhow!(
        "{e}\n  (`wspare-agent check-config {}` lists every error with its line)",
        path.display()
    )
}

/// Loads and checks the config for `local`: the core's validation, the
/// backend tables, with every error.
fn load_settings(path: &Path, local: &NodeId) -> Result<Settings> {
    let core = Config::load(path).map_err(|e| config_error(e, path))?;
    decode_settings(core, path, local)
}

/// The backend tables of a loaded config, for `local`; warnings logged.
fn decode_settings(core: Config, path: &Path, local: &NodeId) -> Result<Settings> {
    let s = Settings::from_core(core, path, local).map_err(|e| config_error(e, path))?;
    for w in &s.warnings {
        tracing::warn!("config: {w}");
    }
    Ok(s)
}

async fn run_daemon(cli: &Cli) -> Result<ExitCode> {
    let notifier = notify::Notifier::from_env();
    let core = Config::load(&cli.config).map_err(|e| config_error(e, &cli.config))?;
    let local = local_node(cli, &core)?;
    let settings = decode_settings(core, &cli.config, &local)?;
    let boot = runtime::next_boot(&settings.state_dir())?;
    let metrics = Arc::new(metrics::Metrics::default());
    let agent = Arc::new(Agent {
        local: local.clone(),
        config_path: cli.config.clone(),
        history: Arc::new(history::History::new(
            settings.agent.history,
            metrics.clone(),
        )),
        hb: Arc::new(heartbeat::Shared::new(boot, metrics.clone())),
        metrics,
        current: tokio::sync::RwLock::new(None),
        last_reload_error: std::sync::Mutex::new(None),
        started: UnixMillis::now(),
    });
    tracing::info!(node = %local, boot, config = %cli.config.display(), "wspare-agent starting");
    // Signals first, so that a SIGTERM during startup is not lost.
    let mut hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;

    let socket_path = cli.socket.clone().unwrap_or_else(|| settings.socket());
    let metrics_listen = settings.agent.metrics_listen.clone();
    let grace0 = settings.agent.shutdown_grace;
    let prepared = runtime::prepare(settings, &agent)
        .await
        .context("building the backends")?;
    let rt = Arc::new(runtime::launch(prepared, &agent).await?);
    *agent.current.write().await = Some(rt.clone());
    agent
        .history
        .note(&rt.pairs(), &format!("agent started (boot {boot})"));

    // The heartbeat socket, bound once for the agent's life.
    let me = &rt.settings.nodes[&local];
    let listen = heartbeat::resolve(&me.address)
        .await
        .with_context(|| format!("node {local}: heartbeat address {}", me.address))?;
    let hb_addr = me.address.clone();
    let sock = Arc::new(tokio::net::UdpSocket::bind(listen).await.with_context(|| {
        format!("binding the heartbeat socket to {listen} (node {local}'s address)")
    })?);
    let hb_tasks = [
        tokio::spawn(heartbeat::recv_loop(sock.clone(), agent.hb.clone())),
        tokio::spawn(heartbeat::send_loop(sock, agent.hb.clone())),
    ];
    tracing::info!(%listen, "heartbeats on {listen}");
    let listener = control::bind(&socket_path)?;
    let control_task = tokio::spawn(control::serve(listener, agent.clone()));
    let metrics_task = match &metrics_listen {
        Some(addr) => {
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding the metrics endpoint {addr}"))?;
            tracing::info!(%addr, "metrics on http://{addr}/metrics");
            let a = agent.clone();
            let status_of = move || {
                let a = a.clone();
                // The runtime may be swapped by a reload; read it each time.
                let rt = a.current.try_read().ok().and_then(|g| g.clone());
                match rt {
                    Some(rt) => {
                        let st = rt.handle.status().borrow().clone();
                        a.metrics.render(&a.local, &st)
                    }
                    None => a.metrics.render(&a.local, &Default::default()),
                }
            };
            Some(tokio::spawn(metrics::serve(l, status_of)))
        }
        None => None,
    };
    notifier.send("READY=1");
    tracing::info!(socket = %socket_path.display(), "ready");

    let mut watchdog = notifier.watchdog_every().map(tokio::time::interval);
    let mut grace = grace0;
    let code = loop {
        let current: Arc<Runtime> = agent
            .runtime()
            .await
            .expect("a runtime runs between reloads");
        tokio::select! {
            _ = hup.recv() => {
                notifier.send("RELOADING=1");
                match reload(&agent, &current, &local, &hb_addr).await {
                    Ok(Some(g)) => grace = g,
                    Ok(None) => {}
                    Err(e) => {
                        tracing::error!(error = %format!("{e:#}"), "reload failed and the previous config could not be restarted; stopping");
                        break ExitCode::FAILURE;
                    }
                }
                notifier.send("READY=1");
            }
            _ = term.recv() => {
                tracing::info!("SIGTERM: stopping");
                break ExitCode::SUCCESS;
            }
            _ = int.recv() => {
                tracing::info!("SIGINT: stopping");
                break ExitCode::SUCCESS;
            }
            how = current.unexpected_end() => {
                tracing::error!("{how}; stopping (fail-stop: a node that cannot journal must not act)");
                break ExitCode::FAILURE;
            }
            _ = async {
                match watchdog.as_mut() {
                    Some(w) => { w.tick().await; }
                    None => std::future::pending::<()>().await,
                }
            } => {
                // Only a driver that answers counts as alive.
                let alive = tokio::time::timeout(Duration::from_secs(2), current.handle.views_for(local.clone())).await;
                if matches!(alive, Ok(Ok(_))) {
                    notifier.send("WATCHDOG=1");
                } else {
                    tracing::warn!("the driver did not answer the watchdog check");
                }
            }
        }
    };
    notifier.send("STOPPING=1");
    if let Some(rt) = agent.current.write().await.take() {
        rt.stop(&agent, grace).await;
    }
    for t in hb_tasks {
        t.abort();
    }
    control_task.abort();
    if let Some(t) = metrics_task {
        t.abort();
    }
    let _ = std::fs::remove_file(&socket_path);
    tracing::info!("stopped");
    Ok(code)
}

/// SIGHUP: validate and build the new config; only then swap. Returns the
/// new shutdown grace, `None` if the old config stays; an error only when
/// neither config runs any more.
async fn reload(
    agent: &Arc<Agent>,
    current: &Arc<Runtime>,
    local: &NodeId,
    hb_addr: &str,
) -> Result<Option<Duration>> {
    let path = &agent.config_path;
    tracing::info!(config = %path.display(), "SIGHUP: reloading the config");
    let refuse = |why: String| {
        tracing::error!("config reload refused, keeping the running config: {why}");
        agent.record_reload(&current.pairs(), Some(why));
    };
    let settings = match load_settings(path, local) {
        Ok(s) => s,
        Err(e) => {
            refuse(format!("{e:#}"));
            return Ok(None);
        }
    };
    if settings.nodes.get(local).map(|n| n.address.as_str()) != Some(hb_addr) {
        tracing::warn!("node {local}'s heartbeat address changed; the agent keeps listening on {hb_addr} until it restarts");
    }
    if settings.socket() != current.settings.socket() {
        tracing::warn!("[agent] control-socket changed; it moves at the next restart");
    }
    if settings.agent.metrics_listen != current.settings.agent.metrics_listen {
        tracing::warn!("[agent] metrics-listen changed; it moves at the next restart");
    }
    let grace = settings.agent.shutdown_grace;
    let prepared = match runtime::prepare(settings, agent).await {
        Ok(p) => p,
        Err(e) => {
            refuse(format!("{e:#}"));
            return Ok(None);
        }
    };
    // The swap: stop the old driver (journal consistent), start the new.
    let old = agent.current.write().await.take();
    let old_settings = current.settings.clone();
    if let Some(old) = old {
        old.stop(agent, current.settings.agent.shutdown_grace).await;
    }
    match runtime::launch(prepared, agent).await {
        Ok(rt) => {
            agent.record_reload(&rt.pairs(), None);
            *agent.current.write().await = Some(Arc::new(rt));
            tracing::info!("config reloaded");
            Ok(Some(grace))
        }
        Err(e) => {
            let why = format!("the new config failed to start: {e:#}");
            tracing::error!("{why}; restarting the previous one");
            let p = runtime::prepare(old_settings, agent)
                .await
                .context("rebuilding the previous config's backends")?;
            let rt = runtime::launch(p, agent)
                .await
                .context("restarting the previous config")?;
            agent.record_reload(&rt.pairs(), Some(why));
            *agent.current.write().await = Some(Arc::new(rt));
            Ok(None)
        }
    }
}
