//! Recent decisions per pair, with their causes, for `explain`; and the
//! take-over counter, from the same event stream.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;
use wspare_core::machine::{Event, EventKind, PhaseName};
use wspare_core::{NodeId, PairId, UnixMillis};

use crate::metrics::Metrics;

/// One remembered event.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) struct Entry {
    /// Wall clock when the agent saw it, ms since the Unix epoch.
    pub(crate) at_ms: u64,
    /// `transition`, `notice` or `rejected`.
    pub(crate) kind: String,
    /// For transitions.
    pub(crate) from: Option<PhaseName>,
    /// For transitions.
    pub(crate) to: Option<PhaseName>,
    /// Why.
    pub(crate) cause: String,
}

#[derive(Default)]
struct PairLog {
    entries: VecDeque<Entry>,
    /// Phases since the last steady one: tells a failover (went through
    /// fencing) from a switchover.
    fenced: bool,
}

impl PairLog {
    /// Appends `e`, keeping the newest `cap` entries.
    fn push(&mut self, e: Entry, cap: usize) {
        self.entries.push_back(e);
        while self.entries.len() > cap {
            self.entries.pop_front();
        }
    }
}

/// Every pair's recent events. Kept across config reloads.
pub(crate) struct History {
    cap: Mutex<usize>,
    pairs: Mutex<BTreeMap<PairId, PairLog>>,
    metrics: Arc<Metrics>,
}

impl History {
    pub(crate) fn new(cap: usize, metrics: Arc<Metrics>) -> Self {
        History {
            cap: Mutex::new(cap.max(1)),
            pairs: Mutex::new(BTreeMap::new()),
            metrics,
        }
    }

    pub(crate) fn set_cap(&self, cap: usize) {
        *self.cap.lock().unwrap_or_else(|e| e.into_inner()) = cap.max(1);
    }

    /// Records one event.
    pub(crate) fn record(&self, local: &NodeId, ev: &Event) {
        let cap = *self.cap.lock().unwrap_or_else(|e| e.into_inner());
        let mut pairs = self.pairs.lock().unwrap_or_else(|e| e.into_inner());
        let log = pairs.entry(ev.pair.clone()).or_default();
        let (kind, from, to) = match &ev.kind {
            EventKind::Transition { from, to } => ("transition", Some(*from), Some(*to)),
            EventKind::Notice => ("notice", None, None),
            EventKind::Rejected => ("rejected", None, None),
        };
        if let EventKind::Transition { from, to } = &ev.kind {
            match to {
                PhaseName::Fencing | PhaseName::FenceCheck => log.fenced = true,
                PhaseName::Protected | PhaseName::Degraded | PhaseName::Stale => log.fenced = false,
                _ => {}
            }
            // The VM started here from a promoted generation.
            if *from == PhaseName::Starting && ev.node == *local && *to != PhaseName::Blocked {
                let kind = if log.fenced { "failover" } else { "switchover" };
                self.metrics.takeover(&ev.pair, kind);
                log.fenced = false;
            }
        }
        log.push(
            Entry {
                at_ms: UnixMillis::now().0,
                kind: kind.into(),
                from,
                to,
                cause: ev.cause.clone(),
            },
            cap,
        );
    }

    /// A note of the agent's own (reloads, restarts), in every pair's log.
    pub(crate) fn note(&self, pairs: &[PairId], cause: &str) {
        let cap = *self.cap.lock().unwrap_or_else(|e| e.into_inner());
        let mut all = self.pairs.lock().unwrap_or_else(|e| e.into_inner());
        for p in pairs {
            let entry = Entry {
                at_ms: UnixMillis::now().0,
                kind: "agent".into(),
                from: None,
                to: None,
                cause: cause.to_string(),
            };
            all.entry(p.clone()).or_default().push(entry, cap);
        }
    }

    /// A pair's events, oldest first.
    pub(crate) fn get(&self, pair: &PairId) -> Vec<Entry> {
        self.pairs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(pair)
            .map(|l| l.entries.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Follows a driver's events until its channel closes.
    pub(crate) async fn follow(self: Arc<Self>, local: NodeId, mut rx: broadcast::Receiver<Event>) {
        loop {
            match rx.recv().await {
                Ok(ev) => self.record(&local, &ev),
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    tracing::warn!(missed = n, "explain history missed events");
                }
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wspare_core::Instant;

    fn ev(from: PhaseName, to: PhaseName) -> Event {
        Event {
            at: Instant::ZERO,
            pair: PairId::new("web").unwrap(),
            node: NodeId::new("b").unwrap(),
            kind: EventKind::Transition { from, to },
            cause: format!("{from} to {to}"),
        }
    }

    #[test]
    fn bounded_and_counts_takeovers_by_kind() {
        let m = Arc::new(Metrics::default());
        let h = History::new(3, m.clone());
        let b = NodeId::new("b").unwrap();
        use PhaseName::*;
        for (f, t) in [
            (Protected, Suspect),
            (Suspect, Fencing),
            (Fencing, FenceCheck),
            (FenceCheck, Promoting),
            (Promoting, Starting),
            (Starting, Unprotected),
            (Unprotected, Protected),
            (Protected, TakingOver),
            (TakingOver, Promoting),
            (Promoting, Starting),
            (Starting, Resyncing),
        ] {
            h.record(&b, &ev(f, t));
        }
        let e = h.get(&PairId::new("web").unwrap());
        assert_eq!(e.len(), 3);
        assert_eq!(e[2].cause, "starting to resyncing");
        let t = m.takeovers();
        assert_eq!(t.get("web/failover"), Some(&1));
        assert_eq!(t.get("web/switchover"), Some(&1));
    }
}
