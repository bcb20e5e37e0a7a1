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
//! it reads both manifests (the replica directory of each node) with
//! [`wspare_rsync::read_direction`]: the one with the highest direction
//! epoch names the source; with no manifest (a new pair), the configured
//! primary is the source. A manifest that cannot be read (a node down) is
//! left out; if that hides the direction, operations on the unreachable
//! side fail as they would anyway. The replicator is rebuilt only when
//! (source, epoch) changes, so a cycle in progress keeps its instance.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use wspare_core::{
    DiskSpec, Error, ErrorKind, Generation, GenerationInfo, NodeId, PairId, Progress, Promoted,
    ReplicaStatus, Replicator, ReplicatorCaps, Result, SourceView, UnixMillis,
};
use wspare_rsync::{read_direction, Direction, Endpoint, Options, RsyncReplicator};

use crate::metrics::Metrics;

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

    /// The pair it replicates.
    pub(crate) fn pair(&self) -> &PairId {
        &self.pair
    }

    /// The replicator built for the last direction read, if any.
    fn built(&self) -> Option<Arc<RsyncReplicator>> {
        let cur = self.current.lock().unwrap_or_else(|e| e.into_inner());
        cur.as_ref().map(|(_, r)| r.clone())
    }

    fn other(&self, n: &NodeId) -> NodeId {
        self.ends
            .keys()
            .find(|k| *k != n)
            .cloned()
            .unwrap_or_else(|| n.clone())
    }

    /// The direction now, from both manifests.
    pub(crate) async fn resolve(&self) -> Direction {
        let eps: Vec<&Endpoint> = self.ends.values().collect();
        let (d, unread) = read_direction(
            self.pair.as_str(),
            &self.primary,
            eps[0],
            eps[1],
            &self.opts,
        )
        .await;
        for e in unread {
            // A node that is down is expected (a failover); anything else
            // (a corrupt manifest, another pair's directory) is worth a look.
            if matches!(e.kind(), ErrorKind::Unreachable | ErrorKind::Timeout) {
                tracing::debug!(pair = %self.pair, error = %e, "cannot read a manifest; leaving it out");
            } else {
                tracing::warn!(pair = %self.pair, error = %e, "ignoring a manifest");
            }
        }
        d
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
        self.built()?.status().await.ok()?.progress
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
        match self.inner.built() {
            Some(r) => r.describe(),
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
        match self.inner.built() {
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
