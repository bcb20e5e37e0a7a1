//! The operator interface: a Unix socket (mode 0600, in a directory made
//! 0700 when the agent creates it), one JSON request per connection, one
//! JSON answer.
//!
//! Commands act on this node's machines. One that only the active node's
//! machine takes (switchover, failback) or only the spare's (test
//! failover) is not forwarded to the peer: the answer says which node to
//! run it on. That keeps the operator interface local (no command travels
//! the network) and the answer honest about where the decision is made.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use wspare_core::machine::{Command, PairStatus};
use wspare_core::{FenceReceipt, Generation, NodeId, PairId, UnixMillis};

use crate::history::Entry;
use crate::runtime::{Agent, Runtime};

/// A request (`{"cmd": "switchover", "pair": "web"}`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case")]
pub(crate) enum Request {
    /// Every pair, peer and counter of this node.
    Status,
    /// Planned switchover (the active node takes it).
    Switchover { pair: PairId },
    /// Planned switchover back to the primary (the active node takes it).
    Failback { pair: PairId },
    /// An isolated clone of a generation (the spare takes it).
    TestFailover {
        pair: PairId,
        generation: Option<u64>,
    },
    /// Ends the test failover.
    EndTest { pair: PairId },
    /// Maintenance on or off, for one pair or all of this node's.
    Maintenance { on: bool, pair: Option<PairId> },
    /// The operator states that a node is down.
    ConfirmDown { node: NodeId },
    /// Split brain: this node's copy loses.
    StandDown { pair: PairId },
    /// Leaves the blocked state.
    Resume {
        pair: PairId,
        accept_data_loss: bool,
    },
    /// Recent events with their causes.
    Explain { pair: PairId },
}

/// An answer.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) struct Response {
    pub(crate) ok: bool,
    /// What happened, or why not.
    pub(crate) message: String,
    /// `status` and `explain` data.
    #[serde(default)]
    pub(crate) data: Option<serde_json::Value>,
}

impl Response {
    fn new(ok: bool, message: impl Into<String>) -> Self {
        Response {
            ok,
            message: message.into(),
            data: None,
        }
    }
    fn ok(message: impl Into<String>) -> Self {
        Response::new(true, message)
    }
    fn err(message: impl Into<String>) -> Self {
        Response::new(false, message)
    }
    /// `status` and `explain`: the answer is the data.
    fn data(data: impl Serialize) -> Self {
        Response {
            data: serde_json::to_value(data).ok(),
            ..Response::ok("")
        }
    }
}

/// `items` joined with commas, or `none` when there are none.
fn list_or<T: std::fmt::Display>(items: &[T], none: &str) -> String {
    if items.is_empty() {
        return none.to_string();
    }
    let v: Vec<String> = items.iter().map(T::to_string).collect();
    v.join(", ")
}

/// One pair in `status`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) struct PairRow {
    pub(crate) vm: String,
    pub(crate) peer: NodeId,
    /// `active` or `spare`, as this node sees it.
    pub(crate) role: String,
    pub(crate) status: PairStatus,
}

/// One peer in `status`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) struct PeerRow {
    pub(crate) node: NodeId,
    pub(crate) address: String,
    pub(crate) sent: u64,
    pub(crate) received: u64,
    pub(crate) rtt_ms: Option<f64>,
    pub(crate) last_heartbeat_ms_ago: Option<u64>,
}

/// `status --json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) struct StatusData {
    pub(crate) node: NodeId,
    pub(crate) cluster: String,
    pub(crate) boot: u64,
    pub(crate) config: String,
    pub(crate) uptime_s: u64,
    pub(crate) reloads_ok: u64,
    pub(crate) reloads_failed: u64,
    pub(crate) last_reload_error: Option<String>,
    pub(crate) pairs: Vec<PairRow>,
    pub(crate) peers: Vec<PeerRow>,
    pub(crate) heartbeats_rejected: BTreeMap<String, u64>,
    pub(crate) takeovers: BTreeMap<String, u64>,
}

/// `explain --json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) struct ExplainData {
    pub(crate) status: Option<PairStatus>,
    pub(crate) events: Vec<Entry>,
}

/// Binds the socket: parent directory created 0700 if missing, a stale
/// socket removed, the socket made 0600.
pub(crate) fn bind(path: &Path) -> Result<UnixListener> {
    if let Some(dir) = path.parent() {
        if !dir.exists() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("creating the socket directory {}", dir.display()))?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                .with_context(|| format!("chmod 700 {}", dir.display()))?;
        }
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            bail!(
                "another agent answers on {}; stop it first (or set [agent] control-socket)",
                path.display()
            );
        }
        std::fs::remove_file(path)
            .with_context(|| format!("removing the stale socket {}", path.display()))?;
    }
    let l = UnixListener::bind(path)
        .with_context(|| format!("binding the control socket {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("chmod 600 {}", path.display()))?;
    Ok(l)
}

/// Serves requests until aborted.
pub(crate) async fn serve(listener: UnixListener, agent: Arc<Agent>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let agent = agent.clone();
        tokio::spawn(async move {
            if let Err(e) = one(stream, &agent).await {
                tracing::debug!(error = %e, "control connection");
            }
        });
    }
}

async fn one(stream: UnixStream, agent: &Agent) -> Result<()> {
    let (r, mut w) = stream.into_split();
    let mut line = String::new();
    tokio::time::timeout(
        Duration::from_secs(10),
        BufReader::new(r).take(1 << 16).read_line(&mut line),
    )
    .await
    .context("request timed out")??;
    let resp = match serde_json::from_str::<Request>(&line) {
        Ok(req) => {
            tracing::info!(?req, "operator request");
            handle(req, agent).await
        }
        Err(e) => Response::err(format!("bad request: {e}")),
    };
    let mut out = serde_json::to_vec(&resp)?;
    out.push(b'\n');
    w.write_all(&out).await?;
    w.shutdown().await?;
    Ok(())
}

fn status_of(rt: &Runtime, pair: &PairId) -> Option<PairStatus> {
    rt.handle.status().borrow().get(pair).cloned()
}

/// `pair` is not one of this node's.
fn not_here(rt: &Runtime, pair: &PairId) -> Response {
    Response::err(format!(
        "pair {pair} does not run on {} (pairs here: {}); see `wspare-agent status`",
        rt.settings.local,
        list_or(&rt.pairs(), "none")
    ))
}

/// Sends `cmd` to `pair`'s machine, first checking that this node is the
/// one that takes it.
async fn command(rt: &Runtime, pair: &PairId, cmd: Command) -> Response {
    let local = &rt.settings.local;
    let name = cmd.name();
    let (Some(st), Some(p)) = (
        status_of(rt, pair),
        rt.settings.local_pairs().find(|p| p.name == *pair),
    ) else {
        return not_here(rt, pair);
    };
    match &cmd {
        Command::Switchover | Command::Failback if st.active != *local => {
            return Response::err(format!(
                "pair {pair}: {name} is taken by the active node, {}, not {local}: run `wspare-agent {name} {pair}` on {}",
                st.active, st.active
            ));
        }
        Command::TestFailover { .. } | Command::EndTest if st.active == *local => {
            let spare = p.peer_of(local);
            return Response::err(format!(
                "pair {pair}: {name} runs on the spare node, {spare}, not on the active {local}: run `wspare-agent {name} {pair}` on {spare}"
            ));
        }
        _ => {}
    }
    match rt.handle.command(pair.clone(), cmd).await {
        Ok(Ok(())) => Response::ok(format!(
            "pair {pair} on {local}: {name} accepted; follow it with `wspare-agent explain {pair}`"
        )),
        Ok(Err(why)) => Response::err(format!("pair {pair} on {local}: {name} refused: {why}")),
        Err(e) => Response::err(format!(
            "pair {pair} on {local}: {name} not delivered: {e}; is the agent stopping?"
        )),
    }
}

async fn handle(req: Request, agent: &Agent) -> Response {
    let Some(rt) = agent.runtime().await else {
        return Response::err(format!(
            "the agent on {} is reloading its config; try again in a moment",
            agent.local
        ));
    };
    match req {
        Request::Status => Response::data(status_data(agent, &rt)),
        Request::Switchover { pair } => command(&rt, &pair, Command::Switchover).await,
        Request::Failback { pair } => command(&rt, &pair, Command::Failback).await,
        Request::TestFailover { pair, generation } => {
            command(
                &rt,
                &pair,
                Command::TestFailover {
                    generation: generation.map(Generation),
                },
            )
            .await
        }
        Request::EndTest { pair } => command(&rt, &pair, Command::EndTest).await,
        Request::StandDown { pair } => command(&rt, &pair, Command::StandDown).await,
        Request::Resume {
            pair,
            accept_data_loss,
        } => command(&rt, &pair, Command::Resume { accept_data_loss }).await,
        Request::Maintenance { on, pair } => {
            let pairs = match pair {
                Some(p) => vec![p],
                None => rt.pairs(),
            };
            let mut lines = Vec::new();
            let mut ok = true;
            for p in &pairs {
                let already = status_of(&rt, p).is_some_and(|st| st.maintenance == on);
                if already {
                    let state = if on { "on" } else { "off" };
                    lines.push(format!("pair {p}: maintenance is already {state}"));
                    continue;
                }
                let r = command(&rt, p, Command::Maintenance(on)).await;
                ok &= r.ok;
                lines.push(r.message);
            }
            let peers = rt.settings.peers();
            if !peers.is_empty() {
                lines.push(format!(
                    "maintenance is per node: run it on {} too, so that neither side acts",
                    list_or(&peers, "")
                ));
            }
            Response::new(ok, lines.join("\n"))
        }
        Request::ConfirmDown { node } => {
            let local = &rt.settings.local;
            if node == *local {
                return Response::err(format!(
                    "{node} is this node; confirm-down is run on the node that survives, about its peer"
                ));
            }
            let pairs: Vec<PairId> = rt
                .settings
                .local_pairs()
                .filter(|p| p.primary == node || p.spare == node)
                .map(|p| p.name.clone())
                .collect();
            if pairs.is_empty() {
                return Response::err(format!(
                    "node {node} shares no pair with {local}; confirm-down names a peer of this node ({})",
                    list_or(&rt.settings.peers(), "it has none")
                ));
            }
            tracing::warn!(%node, "operator confirms the node is down");
            let mut lines = Vec::new();
            let mut any = false;
            for p in &pairs {
                let receipt = FenceReceipt::from_operator(node.clone(), UnixMillis::now());
                let r = command(&rt, p, Command::ConfirmDown(receipt)).await;
                any |= r.ok;
                lines.push(r.message);
            }
            Response::new(any, lines.join("\n"))
        }
        Request::Explain { pair } => {
            let status = status_of(&rt, &pair);
            let events = agent.history.get(&pair);
            if status.is_none() && events.is_empty() {
                return not_here(&rt, &pair);
            }
            Response::data(ExplainData { status, events })
        }
    }
}

fn status_data(agent: &Agent, rt: &Runtime) -> StatusData {
    let s = &rt.settings;
    let local = &s.local;
    let statuses = rt.handle.status().borrow().clone();
    let pairs = s
        .local_pairs()
        .filter_map(|p| {
            let st = statuses.get(&p.name)?.clone();
            Some(PairRow {
                vm: p.vm.to_string(),
                peer: p.peer_of(local).clone(),
                role: if st.active == *local {
                    "active"
                } else {
                    "spare"
                }
                .into(),
                status: st,
            })
        })
        .collect();
    let stats = agent.metrics.peers();
    let now = UnixMillis::now().0;
    let peers = s
        .peers()
        .into_iter()
        .map(|n| {
            let st = stats.get(&n).cloned().unwrap_or_default();
            PeerRow {
                address: s.nodes[&n].address.clone(),
                sent: st.sent,
                received: st.received,
                rtt_ms: st.rtt.map(|r| r.as_secs_f64() * 1000.0),
                last_heartbeat_ms_ago: st.last_ms.map(|t| now.saturating_sub(t)),
                node: n,
            }
        })
        .collect();
    let (rok, rfail) = agent.metrics.reloads();
    StatusData {
        node: local.clone(),
        cluster: s.core.cluster.name.clone(),
        boot: agent.hb.boot,
        config: agent.config_path.display().to_string(),
        uptime_s: agent.uptime().as_secs(),
        reloads_ok: rok,
        reloads_failed: rfail,
        last_reload_error: agent
            .last_reload_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone(),
        pairs,
        peers,
        heartbeats_rejected: agent.metrics.rejected_counts(),
        takeovers: agent.metrics.takeovers(),
    }
}

/// Sends one request to the agent at `socket`.
pub(crate) async fn call(socket: &Path, req: &Request) -> Result<Response> {
    let stream = UnixStream::connect(socket).await.map_err(|e| {
        let hint = if e.kind() == std::io::ErrorKind::PermissionDenied {
            "the socket is root's (mode 0600): run this as root"
        } else {
            "is the agent running on this node? The socket is [agent] control-socket; see --socket, --node"
        };
        anyhow!("cannot reach the agent at {}: {e} ({hint})", socket.display())
    })?;
    let (r, mut w) = stream.into_split();
    let mut line = serde_json::to_vec(req)?;
    line.push(b'\n');
    w.write_all(&line).await?;
    w.shutdown().await?;
    let mut buf = String::new();
    tokio::time::timeout(
        Duration::from_secs(60),
        BufReader::new(r).read_line(&mut buf),
    )
    .await
    .context("the agent did not answer within 60 s")??;
    serde_json::from_str(&buf).with_context(|| format!("unreadable answer from the agent: {buf:?}"))
}

fn fmt_age(d: Option<Duration>) -> String {
    match d {
        None => "-".into(),
        Some(d) if d < Duration::from_secs(1) => format!("{}ms", d.as_millis()),
        Some(d) if d < Duration::from_secs(120) => format!("{:.1}s", d.as_secs_f64()),
        Some(d) => format!("{}m", d.as_secs() / 60),
    }
}

/// The `status` table.
pub(crate) fn render_status(d: &StatusData) -> String {
    let mut rows = vec![[
        "PAIR", "VM", "ROLE", "PHASE", "ACTIVE", "EPOCH", "GEN", "AGE", "PEER", "NOTE",
    ]
    .map(String::from)
    .to_vec()];
    for p in &d.pairs {
        let s = &p.status;
        let mut note = Vec::new();
        if s.maintenance {
            note.push("maintenance".to_string());
        }
        if s.peer_suspected {
            note.push(format!("{} suspected", p.peer));
        }
        if let Some(g) = s.test_clone {
            note.push(format!("test clone of {g}"));
        }
        if let Some(x) = &s.detail {
            note.push(x.clone());
        }
        rows.push(vec![
            s.pair.to_string(),
            p.vm.clone(),
            p.role.clone(),
            s.phase.to_string(),
            s.active.to_string(),
            s.epoch.0.to_string(),
            s.newest
                .map(|g| g.generation.to_string())
                .unwrap_or_else(|| "-".into()),
            fmt_age(s.newest_age),
            p.peer.to_string(),
            note.join("; "),
        ]);
    }
    let mut out = format!(
        "node {} (cluster {}, boot {}, up {}s)\n",
        d.node, d.cluster, d.boot, d.uptime_s
    );
    out.push_str(&table(&rows));
    if !d.peers.is_empty() {
        out.push('\n');
        let mut rows = vec![[
            "PEER",
            "ADDRESS",
            "LAST HEARTBEAT",
            "RTT",
            "SENT",
            "RECEIVED",
        ]
        .map(String::from)
        .to_vec()];
        for p in &d.peers {
            rows.push(vec![
                p.node.to_string(),
                p.address.clone(),
                p.last_heartbeat_ms_ago
                    .map(|m| format!("{m}ms ago"))
                    .unwrap_or_else(|| "never".into()),
                p.rtt_ms
                    .map(|r| format!("{r:.2}ms"))
                    .unwrap_or_else(|| "-".into()),
                p.sent.to_string(),
                p.received.to_string(),
            ]);
        }
        out.push_str(&table(&rows));
    }
    let rejected: Vec<String> = d
        .heartbeats_rejected
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(k, n)| format!("{k} {n}"))
        .collect();
    if !rejected.is_empty() {
        out.push_str(&format!("\nheartbeats refused: {}\n", rejected.join(", ")));
    }
    if let Some(e) = &d.last_reload_error {
        out.push_str(&format!("\nlast reload failed: {e}\n"));
    }
    out
}

fn table(rows: &[Vec<String>]) -> String {
    let cols = rows.iter().map(|r| r.len()).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .map(|r| r.get(c).map_or(0, |s| s.len()))
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(i, s)| format!("{s:<w$}", w = widths[i]))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// The `explain` text.
pub(crate) fn render_explain(pair: &PairId, d: &ExplainData) -> String {
    let mut out = String::new();
    if let Some(s) = &d.status {
        out.push_str(&format!(
            "pair {pair} on {}: {} (active {}, epoch {}{})\n",
            s.node,
            s.phase,
            s.active,
            s.epoch.0,
            s.detail
                .as_ref()
                .map(|x| format!("; {x}"))
                .unwrap_or_default()
        ));
    }
    for e in &d.events {
        let t = humantime::format_rfc3339_millis(
            std::time::UNIX_EPOCH + Duration::from_millis(e.at_ms),
        );
        let what = match (e.from, e.to) {
            (Some(f), Some(t)) => format!("{f} -> {t}"),
            _ => e.kind.clone(),
        };
        out.push_str(&format!("{t}  {what}: {}\n", e.cause));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use wspare_core::machine::PhaseName;
    use wspare_core::{Epoch, GenerationInfo};

    #[test]
    fn requests_round_trip_and_the_table_renders() {
        let r = Request::TestFailover {
            pair: PairId::new("web").unwrap(),
            generation: Some(4),
        };
        let j = serde_json::to_string(&r).unwrap();
        assert_eq!(j, r#"{"cmd":"test-failover","pair":"web","generation":4}"#);
        assert_eq!(serde_json::from_str::<Request>(&j).unwrap(), r);
        let d = StatusData {
            node: NodeId::new("node-b").unwrap(),
            cluster: "c".into(),
            boot: 3,
            config: "/etc/x".into(),
            uptime_s: 5,
            reloads_ok: 0,
            reloads_failed: 0,
            last_reload_error: None,
            pairs: vec![PairRow {
                vm: "web".into(),
                peer: NodeId::new("node-a").unwrap(),
                role: "spare".into(),
                status: PairStatus {
                    pair: PairId::new("web").unwrap(),
                    node: NodeId::new("node-b").unwrap(),
                    active: NodeId::new("node-a").unwrap(),
                    epoch: Epoch(1),
                    phase: PhaseName::Protected,
                    detail: None,
                    maintenance: true,
                    newest: Some(GenerationInfo {
                        generation: Generation(12),
                        source_time: UnixMillis(0),
                    }),
                    newest_age: Some(Duration::from_millis(1500)),
                    peer_suspected: false,
                    test_clone: None,
                    pending: 0,
                },
            }],
            peers: Vec::new(),
            heartbeats_rejected: [("replay".to_string(), 2u64)].into_iter().collect(),
            takeovers: BTreeMap::new(),
        };
        let t = render_status(&d);
        assert!(
            t.contains("PAIR  VM   ROLE   PHASE      ACTIVE  EPOCH  GEN  AGE   PEER    NOTE"),
            "{t}"
        );
        assert!(
            t.contains(
                "web   web  spare  protected  node-a  1      g12  1.5s  node-a  maintenance"
            ),
            "{t}"
        );
        assert!(t.contains("heartbeats refused: replay 2"), "{t}");
    }
}
