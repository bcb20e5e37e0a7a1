//! The rsync replicator as two agents use it.
//!
//! An [`RsyncReplicator`] keeps the direction it copies in memory: it is
//! built with (source, target) and flips at `reverse`. Each agent holds its
//! own, so after the agent on one node reverses the pair, the other
//! agent's replicator still points the old way, and the crate refuses it
//! with `Conflict` ("stale; rebuild it with the current direction"), by
//! design: a stale replicator must never copy an old primary over the new
//! active copy. The same holds for an agent that restarts after a
//! failover.
//!
//! [`Directed`] rebuilds it from the truth on disk: before each operation
//! it reads both manifests (the replica directory of each node) and takes
//! the direction of the one with the highest direction epoch: a manifest
//! whose role is `source` names its own node, one whose role is `target`
//! names the other node. With no manifest (a new pair), the configured
//! primary is the source. A manifest that cannot be read (a node down) is
//! left out; if that hides the direction, operations on the unreachable
//! side fail as they would anyway. The replicator is rebuilt only when
//! (source, epoch) changes, so a cycle in progress keeps its instance.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use wspare_core::runner::Command;
use wspare_core::{
    DiskSpec, Error, ErrorKind, Generation, GenerationInfo, NodeId, PairId, Progress, Promoted,
    ReplicaStatus, Replicator, ReplicatorCaps, Result, SourceView, UnixMillis,
};
use wspare_rsync::manifest::{Manifest, Role, MANIFEST};
use wspare_rsync::{Endpoint, Options, RsyncReplicator};

use crate::metrics::Metrics;

/// Which way the pair replicates, as the manifests say.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Direction {
    pub(crate) source: NodeId,
    pub(crate) epoch: u64,
}

/// The direction from what each node's manifest says (`None`: no manifest
/// or unreadable).
pub(crate) fn direction(
    primary: &NodeId,
    manifests: &[(NodeId, Option<Manifest>)],
    other: impl Fn(&NodeId) -> NodeId,
) -> Direction {
    let best = manifests
        .iter()
        .filter_map(|(n, m)| m.as_ref().map(|m| (n, m)))
        // Highest epoch; at equal epochs, the source's word.
        .max_by_key(|(_, m)| (m.epoch, m.role == Role::Source));
    match best {
        Some((n, m)) if m.role == Role::Source => Direction {
            source: n.clone(),
            epoch: m.epoch,
        },
        Some((n, m)) => Direction {
            source: other(n),
            epoch: m.epoch,
        },
        None => Direction {
            source: primary.clone(),
            epoch: 0,
        },
    }
}

/// An [`RsyncReplicator`] that follows the direction on disk. See the
/// module docs.
pub(crate) struct Directed {
    pair: PairId,
    primary: NodeId,
    ends: BTreeMap<NodeId, Endpoint>,
    opts: Options,
    current: Mutex<Option<(Direction, Arc<RsyncReplicator>)>>,
    metrics: Arc<Metrics>,
    /// Set while an initial sync runs (for the progress bar).
    initial: std::sync::atomic::AtomicBool,
}

impl Directed {
    /// A replicator for `pair` between the two endpoints.
    pub(crate) fn new(
        pair: PairId,
        primary: NodeId,
        a: Endpoint,
        b: Endpoint,
        opts: Options,
        metrics: Arc<Metrics>,
    ) -> Result<Self> {
        // Validates names and paths once, up front.
        RsyncReplicator::new(pair.as_str(), a.clone(), b.clone(), opts.clone())?;
        let ends = [(a.node.clone(), a), (b.node.clone(), b)]
            .into_iter()
            .collect();
        Ok(Directed {
            pair,
            primary,
            ends,
            opts,
            current: Mutex::new(None),
            metrics,
            initial: std::sync::atomic::AtomicBool::new(false),
        })
    }

    fn other(&self, n: &NodeId) -> NodeId {
        self.ends
            .keys()
            .find(|k| *k != n)
            .cloned()
            .unwrap_or_else(|| n.clone())
    }

    async fn read_manifest(&self, ep: &Endpoint) -> Option<Manifest> {
        let path = ep.replica_dir.join(MANIFEST);
        let cmd = Command::new("cat")
            .arg("--")
            .arg(path.display().to_string())
            .timeout(self.opts.command_timeout);
        match ep.runner.run(&cmd).await {
            Ok(o) => match Manifest::parse(&o.stdout) {
                Ok(m) if m.pair == self.pair.as_str() => Some(m),
                Ok(m) => {
                    tracing::warn!(pair = %self.pair, node = %ep.node, other = %m.pair, "the replica directory belongs to another pair; ignoring its manifest");
                    None
                }
                Err(e) => {
                    tracing::warn!(pair = %self.pair, node = %ep.node, path = %path.display(), error = %e, "unreadable manifest");
                    None
                }
            },
            Err(e) => {
                if !e.stderr_tail().contains("No such file") {
                    tracing::debug!(pair = %self.pair, node = %ep.node, error = %e, "cannot read the manifest");
                }
                None
            }
        }
    }

    /// The direction now, from both manifests.
    pub(crate) async fn resolve(&self) -> Direction {
        let eps: Vec<&Endpoint> = self.ends.values().collect();
        let (m0, m1) = tokio::join!(self.read_manifest(eps[0]), self.read_manifest(eps[1]));
        direction(
            &self.primary,
            &[(eps[0].node.clone(), m0), (eps[1].node.clone(), m1)],
            |n| self.other(n),
        )
    }

    /// The replicator for the direction on disk, rebuilt if it changed.
    async fn inner(&self) -> Result<Arc<RsyncReplicator>> {
        let d = self.resolve().await;
        let mut cur = self.current.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((have, r)) = cur.as_ref() {
            if *have == d {
                return Ok(r.clone());
            }
        }
        let target = self.other(&d.source);
        let (s, t) = (self.ends[&d.source].clone(), self.ends[&target].clone());
        let r = Arc::new(RsyncReplicator::new(
            self.pair.as_str(),
            s,
            t,
            self.opts.clone(),
        )?);
        if let Some((have, _)) = cur.as_ref() {
            tracing::info!(pair = %self.pair, from = %have.source, to = %d.source, epoch = d.epoch, "replication direction changed on disk; following it");
        }
        *cur = Some((d, r.clone()));
        Ok(r)
    }

    /// The running initial sync's progress, if one runs.
    pub(crate) async fn initial_progress(&self) -> Option<Progress> {
        if !self.initial.load(std::sync::atomic::Ordering::SeqCst) {
            return None;
        }
        let r = self.current.lock().ok()?.as_ref()?.1.clone();
        r.status().await.ok()?.progress
    }

    fn record(&self, r: &Result<GenerationInfo>) {
        match r {
            Ok(info) => {
                let lag = UnixMillis::now().saturating_since(info.source_time);
                self.metrics.sync(&self.pair, Some(lag));
            }
            Err(_) => self.metrics.sync(&self.pair, None),
        }
    }

    /// Refuses to copy unless `local` is the source on disk: syncs run on
    /// the active node, which must be the source.
    async fn for_sync(&self, local: &NodeId) -> Result<Arc<RsyncReplicator>> {
        let r = self.inner().await?;
        let (src, _) = r.ends();
        if src.node != *local {
            return Err(Error::new(
                ErrorKind::Conflict,
                format!(
                    "pair {}: the manifests say {} is the replication source, but the sync was asked on {local}; \
                     the replication must be reversed first",
                    self.pair, src.node
                ),
            ));
        }
        Ok(r)
    }
}

/// A [`Directed`] bound to the node it runs on (syncs are checked against it).
pub(crate) struct LocalDirected {
    pub(crate) inner: Arc<Directed>,
    pub(crate) local: NodeId,
}

#[async_trait]
impl Replicator for LocalDirected {
    fn describe(&self) -> String {
        let cur = self.inner.current.lock().unwrap_or_else(|e| e.into_inner());
        match cur.as_ref() {
            Some((_, r)) => r.describe(),
            None => format!("rsync {} (direction not read yet)", self.inner.pair),
        }
    }

    fn capabilities(&self) -> ReplicatorCaps {
        wspare_rsync::CAPS
    }

    async fn initial_sync(&self, source: &SourceView) -> Result<GenerationInfo> {
        let r = self.inner.for_sync(&self.local).await?;
        self.inner
            .initial
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let out = r.initial_sync(source).await;
        self.inner
            .initial
            .store(false, std::sync::atomic::Ordering::SeqCst);
        self.inner.record(&out);
        out
    }

    async fn sync(&self, source: &SourceView) -> Result<GenerationInfo> {
        let r = self.inner.for_sync(&self.local).await?;
        let out = r.sync(source).await;
        self.inner.record(&out);
        out
    }

    async fn status(&self) -> Result<ReplicaStatus> {
        self.inner.inner().await?.status().await
    }

    async fn promote(&self, g: Generation) -> Result<Promoted> {
        self.inner.inner().await?.promote(g).await
    }

    async fn reverse(&self) -> Result<()> {
        self.inner.inner().await?.reverse().await
    }

    async fn verify(&self, g: Generation, source: &SourceView) -> Result<()> {
        self.inner.inner().await?.verify(g, source).await
    }

    async fn stop(&self) -> Result<()> {
        let r = self
            .inner
            .current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|(_, r)| r.clone());
        match r {
            Some(r) => r.stop().await,
            None => Ok(()),
        }
    }

    async fn test_copy(&self, g: Generation, label: &str) -> Result<Vec<DiskSpec>> {
        self.inner.inner().await?.test_copy(g, label).await
    }

    async fn discard_test_copy(&self, label: &str) -> Result<()> {
        self.inner.inner().await?.discard_test_copy(label).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(s: &str) -> NodeId {
        NodeId::new(s).unwrap()
    }

    fn m(epoch: u64, role: Role) -> Option<Manifest> {
        Some(Manifest::new("web", epoch, role))
    }

    fn dir(ms: &[(&str, Option<Manifest>)]) -> (String, u64) {
        let v: Vec<(NodeId, Option<Manifest>)> =
            ms.iter().map(|(k, m)| (n(k), m.clone())).collect();
        let d = direction(
            &n("a"),
            &v,
            |x| if x.as_str() == "a" { n("b") } else { n("a") },
        );
        (d.source.to_string(), d.epoch)
    }

    #[test]
    fn the_direction_follows_the_newest_manifest() {
        // New pair: the primary.
        assert_eq!(dir(&[("a", None), ("b", None)]), ("a".into(), 0));
        // First cycles: b is the target.
        assert_eq!(
            dir(&[("a", None), ("b", m(0, Role::Target))]),
            ("a".into(), 0)
        );
        // b took over and reversed; a was unreachable.
        assert_eq!(
            dir(&[("a", None), ("b", m(1, Role::Source))]),
            ("b".into(), 1)
        );
        // ... and reachable.
        assert_eq!(
            dir(&[("a", m(1, Role::Target)), ("b", m(1, Role::Source))]),
            ("b".into(), 1)
        );
        // Failback: a reversed again; b still has its old source manifest
        // (unreachable then).
        assert_eq!(
            dir(&[("a", m(2, Role::Source)), ("b", m(1, Role::Source))]),
            ("a".into(), 2)
        );
        // Only the target is readable: the other one is the source.
        assert_eq!(
            dir(&[("a", m(2, Role::Target)), ("b", None)]),
            ("b".into(), 2)
        );
    }
}
