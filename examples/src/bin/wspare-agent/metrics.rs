//! Prometheus metrics: counters the agent's parts update, gauges read from
//! the driver's status when scraped, and a minimal HTTP endpoint
//! (`GET /metrics`, text format 0.0.4).
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `wspare_pair_phase` | gauge, 1 for the current phase | pair, node, phase |
//! | `wspare_pair_active` | gauge, 1 if this node runs the VM | pair |
//! | `wspare_pair_epoch` | gauge | pair |
//! | `wspare_pair_maintenance` | gauge | pair |
//! | `wspare_generation` | gauge, newest complete generation | pair |
//! | `wspare_generation_age_seconds` | gauge, age of its source point | pair |
//! | `wspare_replication_lag_seconds` | gauge, how old the newest generation was when its cycle completed | pair |
//! | `wspare_sync_cycles_total` | counter | pair, result |
//! | `wspare_heartbeats_sent_total` / `_received_total` | counter | peer |
//! | `wspare_heartbeat_rtt_seconds` | gauge, last round trip | peer |
//! | `wspare_heartbeats_rejected_total` | counter | reason |
//! | `wspare_failovers_total` | counter: this node took over | pair, kind (failover, switchover) |
//! | `wspare_fence_attempts_total` | counter | node, result |
//! | `wspare_fence_duration_seconds` | summary (sum, count) and gauge of the last | node |
//! | `wspare_config_reloads_total` | counter | result |

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use wspare_core::machine::{PairStatus, PhaseName};
use wspare_core::{NodeId, PairId};

use crate::wire::Reject;

/// Per-peer heartbeat figures.
#[derive(Clone, Debug, Default)]
pub(crate) struct PeerStats {
    pub(crate) sent: u64,
    pub(crate) received: u64,
    pub(crate) rtt: Option<Duration>,
    /// Wall clock of the last accepted heartbeat, ms.
    pub(crate) last_ms: Option<u64>,
}

/// Per-node fence figures.
#[derive(Clone, Debug, Default)]
pub(crate) struct FenceStats {
    pub(crate) ok: u64,
    pub(crate) failed: u64,
    pub(crate) seconds_sum: f64,
    pub(crate) last_seconds: f64,
}

/// Per-pair replication figures.
#[derive(Clone, Debug, Default)]
pub(crate) struct SyncStats {
    pub(crate) ok: u64,
    pub(crate) failed: u64,
    pub(crate) last_lag: Option<Duration>,
}

#[derive(Clone, Debug, Default)]
struct State {
    peers: BTreeMap<NodeId, PeerStats>,
    rejected: BTreeMap<&'static str, u64>,
    fences: BTreeMap<NodeId, FenceStats>,
    syncs: BTreeMap<PairId, SyncStats>,
    takeovers: BTreeMap<(PairId, &'static str), u64>,
    reloads_ok: u64,
    reloads_failed: u64,
}

/// The agent's counters. Shared by every part, kept across reloads.
#[derive(Debug, Default)]
pub(crate) struct Metrics {
    state: Mutex<State>,
}

impl Metrics {
    fn with<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        f(&mut self.state.lock().unwrap_or_else(|e| e.into_inner()))
    }

    pub(crate) fn heartbeat_sent(&self, peer: &NodeId) {
        self.with(|s| s.peers.entry(peer.clone()).or_default().sent += 1);
    }

    pub(crate) fn heartbeat_received(&self, peer: &NodeId, at_ms: u64, rtt: Option<Duration>) {
        self.with(|s| {
            let p = s.peers.entry(peer.clone()).or_default();
            p.received += 1;
            p.last_ms = Some(at_ms);
            if rtt.is_some() {
                p.rtt = rtt;
            }
        });
    }

    pub(crate) fn rejected(&self, why: &Reject) {
        self.with(|s| *s.rejected.entry(why.as_str()).or_default() += 1);
    }

    pub(crate) fn fence(&self, node: &NodeId, ok: bool, took: Duration) {
        self.with(|s| {
            let f = s.fences.entry(node.clone()).or_default();
            if ok {
                f.ok += 1;
            } else {
                f.failed += 1;
            }
            f.seconds_sum += took.as_secs_f64();
            f.last_seconds = took.as_secs_f64();
        });
    }

    pub(crate) fn sync(&self, pair: &PairId, lag: Option<Duration>) {
        self.with(|s| {
            let x = s.syncs.entry(pair.clone()).or_default();
            match lag {
                Some(l) => {
                    x.ok += 1;
                    x.last_lag = Some(l);
                }
                None => x.failed += 1,
            }
        });
    }

    pub(crate) fn takeover(&self, pair: &PairId, kind: &'static str) {
        self.with(|s| *s.takeovers.entry((pair.clone(), kind)).or_default() += 1);
    }

    pub(crate) fn reload(&self, ok: bool) {
        self.with(|s| {
            if ok {
                s.reloads_ok += 1;
            } else {
                s.reloads_failed += 1;
            }
        });
    }

    pub(crate) fn peers(&self) -> BTreeMap<NodeId, PeerStats> {
        self.with(|s| s.peers.clone())
    }

    pub(crate) fn rejected_counts(&self) -> BTreeMap<String, u64> {
        self.with(|s| {
            Reject::ALL
                .iter()
                .map(|r| (r.to_string(), s.rejected.get(r).copied().unwrap_or(0)))
                .collect()
        })
    }

    pub(crate) fn reloads(&self) -> (u64, u64) {
        self.with(|s| (s.reloads_ok, s.reloads_failed))
    }

    pub(crate) fn takeovers(&self) -> BTreeMap<String, u64> {
        self.with(|s| {
            s.takeovers
                .iter()
                .map(|((p, k), n)| (format!("{p}/{k}"), *n))
                .collect()
        })
    }

    /// The text exposition: counters, and gauges from `status`.
    pub(crate) fn render(&self, local: &NodeId, status: &BTreeMap<PairId, PairStatus>) -> String {
        let s = self.with(|s| s.clone());
        let mut o = String::new();
        // One family: its header, then `name{labels} value` per sample.
        let mut family = |name: &str, kind: &str, help: &str, samples: Vec<(String, String)>| {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (labels, value) in samples {
                let _ = writeln!(o, "{name}{labels} {value}");
            }
        };
        let per_pair = |value: &dyn Fn(&PairStatus) -> Option<String>| -> Vec<(String, String)> {
            status
                .iter()
                .filter_map(|(p, st)| Some((format!("{{pair=\"{p}\"}}"), value(st)?)))
                .collect()
        };
        family(
            "wspare_pair_phase",
            "gauge",
            "1 for the phase the pair's machine on this node is in.",
            status
                .iter()
                .flat_map(|(p, st)| {
                    PhaseName::ALL.iter().map(move |phase| {
                        (
                            format!("{{pair=\"{p}\",node=\"{local}\",phase=\"{phase}\"}}"),
                            u8::from(st.phase == *phase).to_string(),
                        )
                    })
                })
                .collect(),
        );
        family(
            "wspare_pair_active",
            "gauge",
            "1 if this node is the pair's active node.",
            per_pair(&|st| Some(u8::from(st.active == *local).to_string())),
        );
        family(
            "wspare_pair_epoch",
            "gauge",
            "The pair's epoch as this node knows it.",
            per_pair(&|st| Some(st.epoch.0.to_string())),
        );
        family(
            "wspare_pair_maintenance",
            "gauge",
            "1 if maintenance is on for the pair on this node.",
            per_pair(&|st| Some(u8::from(st.maintenance).to_string())),
        );
        family(
            "wspare_generation",
            "gauge",
            "Newest complete generation known.",
            per_pair(&|st| Some(st.newest?.generation.0.to_string())),
        );
        family(
            "wspare_generation_age_seconds",
            "gauge",
            "Age of the newest complete generation's source point in time.",
            per_pair(&|st| Some(format!("{:.3}", st.newest_age?.as_secs_f64()))),
        );
        family(
            "wspare_replication_lag_seconds",
            "gauge",
            "How old the newest generation was when its sync cycle completed.",
            s.syncs
                .iter()
                .filter_map(|(p, x)| {
                    let lag = x.last_lag?.as_secs_f64();
                    Some((format!("{{pair=\"{p}\"}}"), format!("{lag:.3}")))
                })
                .collect(),
        );
        family(
            "wspare_sync_cycles_total",
            "counter",
            "Sync cycles run from this node.",
            s.syncs
                .iter()
                .flat_map(|(p, x)| by_result(&format!("pair=\"{p}\","), x.ok, x.failed))
                .collect(),
        );
        let per_peer = |value: &dyn Fn(&PeerStats) -> Option<String>| -> Vec<(String, String)> {
            s.peers
                .iter()
                .filter_map(|(n, x)| Some((format!("{{peer=\"{n}\"}}"), value(x)?)))
                .collect()
        };
        family(
            "wspare_heartbeats_sent_total",
            "counter",
            "Heartbeats sent.",
            per_peer(&|x| Some(x.sent.to_string())),
        );
        family(
            "wspare_heartbeats_received_total",
            "counter",
            "Heartbeats accepted.",
            per_peer(&|x| Some(x.received.to_string())),
        );
        family(
            "wspare_heartbeat_rtt_seconds",
            "gauge",
            "Last heartbeat round-trip time.",
            per_peer(&|x| Some(format!("{:.6}", x.rtt?.as_secs_f64()))),
        );
        family(
            "wspare_heartbeats_rejected_total",
            "counter",
            "Heartbeat datagrams refused, by reason.",
            Reject::ALL
                .iter()
                .map(|r| {
                    let n = s.rejected.get(r).copied().unwrap_or(0);
                    (format!("{{reason=\"{r}\"}}"), n.to_string())
                })
                .collect(),
        );
        family(
            "wspare_failovers_total",
            "counter",
            "Times this node took a pair over.",
            s.takeovers
                .iter()
                .map(|((p, k), n)| (format!("{{pair=\"{p}\",kind=\"{k}\"}}"), n.to_string()))
                .collect(),
        );
        family(
            "wspare_fence_attempts_total",
            "counter",
            "Fence attempts by this node, by target and result.",
            s.fences
                .iter()
                .flat_map(|(n, f)| by_result(&format!("node=\"{n}\","), f.ok, f.failed))
                .collect(),
        );
        // A summary's samples carry suffixes: `_sum`, `_count`.
        family(
            "wspare_fence_duration_seconds",
            "summary",
            "Time fence attempts took.",
            s.fences
                .iter()
                .flat_map(|(n, f)| {
                    [
                        (
                            format!("_sum{{node=\"{n}\"}}"),
                            format!("{:.3}", f.seconds_sum),
                        ),
                        (
                            format!("_count{{node=\"{n}\"}}"),
                            (f.ok + f.failed).to_string(),
                        ),
                    ]
                })
                .collect(),
        );
        family(
            "wspare_fence_last_duration_seconds",
            "gauge",
            "Time the last fence attempt took.",
            s.fences
                .iter()
                .map(|(n, f)| {
                    (
                        format!("{{node=\"{n}\"}}"),
                        format!("{:.3}", f.last_seconds),
                    )
                })
                .collect(),
        );
        family(
            "wspare_config_reloads_total",
            "counter",
            "Config reloads (SIGHUP), by result.",
            by_result("", s.reloads_ok, s.reloads_failed).to_vec(),
        );
        o
    }
}

/// The two samples of a counter by `result` (`ok`, `failed`); `labels` are
/// the others, each followed by a comma.
fn by_result(labels: &str, ok: u64, failed: u64) -> [(String, String); 2] {
    [("ok", ok), ("failed", failed)]
        .map(|(result, n)| (format!("{{{labels}result=\"{result}\"}}"), n.to_string()))
}

/// Serves `GET /metrics` on `listener` with what `page` renders, until the
/// task is aborted.
pub(crate) async fn serve<F>(listener: tokio::net::TcpListener, page: F)
where
    F: Fn() -> String + Send + Sync + 'static,
{
    let page = std::sync::Arc::new(page);
    loop {
        let Ok((mut sock, _)) = listener.accept().await else {
            continue;
        };
        let page = page.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            let mut n = 0;
            // Read the request head (bounded, with a deadline).
            let read = tokio::time::timeout(Duration::from_secs(5), async {
                while n < buf.len() {
                    match sock.read(&mut buf[n..]).await {
                        Ok(0) | Err(_) => break,
                        Ok(k) => {
                            n += k;
                            if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                                break;
                            }
                        }
                    }
                }
            })
            .await;
            if read.is_err() {
                return;
            }
            let head = String::from_utf8_lossy(&buf[..n]);
            let first = head.lines().next().unwrap_or("");
            let (status, ctype, body) = if first.starts_with("GET /metrics ") {
                ("200 OK", "text/plain; version=0.0.4", page())
            } else if first.starts_with("GET / ") {
                (
                    "200 OK",
                    "text/plain",
                    "wspare-agent: see /metrics\n".to_string(),
                )
            } else {
                (
                    "404 Not Found",
                    "text/plain",
                    "not found; try /metrics\n".to_string(),
                )
            };
            let resp = format!(
                "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = sock.write_all(resp.as_bytes()).await;
            let _ = sock.shutdown().await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_has_every_family() {
        let m = Metrics::default();
        let a = NodeId::new("node-a").unwrap();
        m.heartbeat_sent(&a);
        m.heartbeat_received(&a, 1, Some(Duration::from_micros(350)));
        m.rejected(&Reject::BadMac);
        m.rejected(&Reject::Replay("x".into()));
        m.rejected(&Reject::Replay("y".into()));
        m.fence(&a, true, Duration::from_millis(1500));
        let text = m.render(&NodeId::new("node-b").unwrap(), &BTreeMap::new());
        for want in [
            "wspare_heartbeats_rejected_total{reason=\"bad-mac\"} 1",
            "wspare_heartbeats_rejected_total{reason=\"replay\"} 2",
            "wspare_heartbeats_rejected_total{reason=\"stale\"} 0",
            "wspare_heartbeat_rtt_seconds{peer=\"node-a\"} 0.000350",
            "wspare_fence_attempts_total{node=\"node-a\",result=\"ok\"} 1",
            "wspare_fence_duration_seconds_sum{node=\"node-a\"} 1.500",
            "# TYPE wspare_pair_phase gauge",
        ] {
            assert!(text.contains(want), "{want} not in\n{text}");
        }
    }
}
