//! [`SimReplicator`]: file-copying replication of one pair in a
//! [`SimWorld`].

use std::path::PathBuf;
use std::time::Duration;

use async_trait::async_trait;
use wspare_core::ids::validate_name;
use wspare_core::{
    Consistency, DiskSpec, Error, ErrorKind, Generation, GenerationInfo, NodeId, PairId,
    PowerState, Progress, Promoted, ReplicaStatus, Replicator, ReplicatorCaps, Result, SourceView,
    UnixMillis,
};

use super::world::{digest, flip, Fault, Replica, SimWorld, State, StoredGen};

/// Settings of a [`SimReplicator`].
#[derive(Clone, Debug)]
pub struct SimReplicatorConfig {
    /// Complete generations kept on the target (recovery points).
    pub recovery_points: u32,
    /// Time to copy one disk; `None` takes the world's
    /// [`SimConfig::copy_time_per_disk`](super::SimConfig).
    pub copy_time_per_disk: Option<Duration>,
}

impl Default for SimReplicatorConfig {
    fn default() -> Self {
        SimReplicatorConfig {
            recovery_points: 3,
            copy_time_per_disk: None,
        }
    }
}

/// Replication of pair `pair` in a [`SimWorld`], copying disk images like
/// an rsync of a stopped or frozen VM's files.
///
/// - A cycle copies disk after disk, each taking
///   [`SimReplicatorConfig::copy_time_per_disk`] of world time, from the
///   source view's images on the source host into a staging area, then
///   makes the generation in one step: generations are complete or absent.
///   Dropping the future or a fault midway leaves the last generation as it
///   was. Images are read when their turn comes, so a view of a VM that is
///   running (not frozen) makes a torn copy, as the real tool would.
/// - Generations live on the target host as images under
///   `/var/lib/wspare-sim/replicas/<pair>/g<N>/<slot>.img`; `promote`
///   returns those very images, and verify checks them against the
///   checksums taken from the source.
/// - Generation numbers come from the pair's highest ever (kept in the
///   world), so they grow across `reverse` and across replicator instances.
/// - Faults: [`Fault::ReplicationUnreachable`], [`Fault::BreakNextSync`],
///   [`Fault::SyncFails`], [`Fault::SyncHangs`], [`Fault::CorruptNextSync`];
///   a powered-off host fails calls that need it with `Unreachable`.
#[derive(Clone, Debug)]
pub struct SimReplicator {
    world: SimWorld,
    pair: PairId,
    config: SimReplicatorConfig,
}

impl SimReplicator {
    /// Replication of `pair` from `source` to `target`. If the world already
    /// has this pair (a restarted driver), its state and direction are kept.
    pub fn new(world: &SimWorld, pair: &PairId, source: &NodeId, target: &NodeId) -> Self {
        SimReplicator::with_config(world, pair, source, target, SimReplicatorConfig::default())
    }

    /// [`SimReplicator::new`] with settings.
    pub fn with_config(
        world: &SimWorld,
        pair: &PairId,
        source: &NodeId,
        target: &NodeId,
        config: SimReplicatorConfig,
    ) -> Self {
        world.add_host(source);
        world.add_host(target);
        world.with(|st, _| {
            st.replicas.entry(pair.clone()).or_insert_with(|| Replica {
                source: source.clone(),
                target: target.clone(),
                highest: Generation(0),
                stores: Default::default(),
                stopped: false,
                progress: None,
                next_sync: 0,
                test_copies: Default::default(),
            });
        });
        SimReplicator {
            world: world.clone(),
            pair: pair.clone(),
            config,
        }
    }

    /// Where generation `g`'s disk `slot` lives on the target.
    pub fn generation_path(&self, g: Generation, slot: &str) -> PathBuf {
        format!(
            "/var/lib/wspare-sim/replicas/{}/g{}/{slot}.img",
            self.pair, g.0
        )
        .into()
    }

    fn test_copy_path(&self, label: &str, slot: &str) -> PathBuf {
        format!(
            "/var/lib/wspare-sim/replicas/{}/test/{label}/{slot}.img",
            self.pair
        )
        .into()
    }

    fn err(&self, kind: ErrorKind, msg: impl std::fmt::Display) -> Error {
        Error::new(kind, format!("sim replicator {}: {msg}", self.pair))
    }

    async fn enter(&self) {
        self.world.sleep(self.world.config().op_latency).await;
    }

    /// Runs `f` on this pair's replica and the world's images; `needs`
    /// says which hosts must be up (source, target).
    fn replica<R>(
        &self,
        needs: (bool, bool),
        f: impl FnOnce(&mut Replica, &mut State, u64) -> Result<R>,
    ) -> Result<R> {
        self.world.with(|st, now| {
            let Some(mut r) = st.replicas.remove(&self.pair) else {
                return Err(self.err(ErrorKind::NotFound, "no such pair in the world"));
            };
            let out = self
                .reachable(&r, st, needs)
                .and_then(|()| f(&mut r, st, now));
            st.replicas.insert(self.pair.clone(), r);
            out
        })
    }

    fn reachable(&self, r: &Replica, st: &State, (source, target): (bool, bool)) -> Result<()> {
        let up = |n: &NodeId| st.hosts.get(n).is_some_and(|h| h.power == PowerState::On);
        if (source || target)
            && st
                .faults
                .contains(&Fault::ReplicationUnreachable(self.pair.clone()))
        {
            return Err(self.err(
                ErrorKind::Unreachable,
                format!("cannot reach {} -> {}", r.source, r.target),
            ));
        }
        if source && !up(&r.source) {
            return Err(self.err(
                ErrorKind::Unreachable,
                format!("source host {} is down", r.source),
            ));
        }
        if target && !up(&r.target) {
            return Err(self.err(
                ErrorKind::Unreachable,
                format!("target host {} is down", r.target),
            ));
        }
        Ok(())
    }

    /// The view's disks (a frozen disk on the default bus) and its point
    /// in time.
    fn source_disks(&self, view: &SourceView) -> Result<(Vec<DiskSpec>, UnixMillis)> {
        let Some((disks, at)) = view.disks() else {
            return Err(self.err(
                ErrorKind::InvalidInput,
                "it copies files and needs a stopped or frozen source view; Continuous would read a \
                 running VM's disks",
            ));
        };
        if disks.is_empty() {
            return Err(self.err(ErrorKind::InvalidInput, "the source view has no disks"));
        }
        Ok((disks, at))
    }

    async fn cycle(&self, view: &SourceView) -> Result<GenerationInfo> {
        self.enter().await;
        let (disks, at) = self.source_disks(view)?;
        let copy_time = self
            .config
            .copy_time_per_disk
            .unwrap_or(self.world.config().copy_time_per_disk);
        let total = disks.len() as u64;
        let (id, source, target) = self.replica((true, true), |r, _, _| {
            r.stopped = false;
            let id = r.next_sync;
            r.next_sync += 1;
            r.progress = Some((
                id,
                Progress {
                    bytes_done: 0,
                    bytes_total: total,
                    bytes_per_sec: 0,
                },
            ));
            Ok((id, r.source.clone(), r.target.clone()))
        })?;
        let _guard = ProgressGuard { rep: self, id };
        if self.world.has_fault(&Fault::SyncHangs(self.pair.clone())) {
            std::future::pending::<()>().await;
        }
        let mut copied = Vec::new();
        for (i, d) in disks.iter().enumerate() {
            self.world.sleep(copy_time).await;
            let bytes = self.replica((true, true), |r, st, _| {
                let Some(bytes) = st.images.get(&(source.clone(), d.path.clone())).cloned() else {
                    return Err(self.err(
                        ErrorKind::NotFound,
                        format!(
                            "source image {} does not exist on {source}",
                            d.path.display()
                        ),
                    ));
                };
                if let Some((_, p)) = &mut r.progress {
                    p.bytes_done = i as u64 + 1;
                }
                let broken = st.faults.remove(&Fault::BreakNextSync(self.pair.clone()))
                    | st.faults.contains(&Fault::SyncFails(self.pair.clone()));
                if broken {
                    return Err(self.err(
                        ErrorKind::Backend,
                        format!(
                            "transfer broken after {} of {total} disks (injected fault)",
                            i + 1
                        ),
                    ));
                }
                Ok(bytes)
            })?;
            copied.push(bytes);
        }
        self.replica((true, true), |r, st, _| {
            if r.source != source || r.target != target {
                return Err(self.err(ErrorKind::Conflict, "the direction changed during the sync"));
            }
            let corrupt = st.faults.remove(&Fault::CorruptNextSync(self.pair.clone()));
            let g = r.highest.next();
            let info = GenerationInfo {
                generation: g,
                source_time: at,
            };
            let mut stored = StoredGen {
                info,
                disks: Vec::new(),
                checksums: Vec::new(),
            };
            for (i, (d, bytes)) in disks.iter().zip(copied).enumerate() {
                let path = self.generation_path(g, &d.target);
                stored.checksums.push(digest(&bytes));
                let mut bytes = bytes;
                if corrupt && i == 0 {
                    flip(&mut bytes);
                }
                st.images.insert((target.clone(), path.clone()), bytes);
                stored.disks.push(DiskSpec {
                    path,
                    read_only: false,
                    ..d.clone()
                });
            }
            r.highest = g;
            let store = r.stores.entry(target.clone()).or_default();
            store.insert(g, stored);
            while store.len() > self.config.recovery_points.max(1) as usize {
                if let Some((_, old)) = store.pop_first() {
                    for d in old.disks {
                        st.images.remove(&(target.clone(), d.path));
                    }
                }
            }
            Ok(info)
        })
    }

    fn held<'r>(&self, r: &'r Replica, g: Generation) -> Result<&'r StoredGen> {
        let store = r.stores.get(&r.target);
        store.and_then(|s| s.get(&g)).ok_or_else(|| {
            let held: Vec<String> = store
                .map(|s| s.keys().map(|g| g.to_string()).collect())
                .unwrap_or_default();
            self.err(
                ErrorKind::NotFound,
                format!(
                    "generation {g} is not held on {} (held: {})",
                    r.target,
                    held.join(", ")
                ),
            )
        })
    }
}

/// Clears the progress of a sync that ends, however it ends.
struct ProgressGuard<'a> {
    rep: &'a SimReplicator,
    id: u64,
}

impl Drop for ProgressGuard<'_> {
    fn drop(&mut self) {
        self.rep.world.with(|st, _| {
            if let Some(r) = st.replicas.get_mut(&self.rep.pair) {
                if r.progress.is_some_and(|(id, _)| id == self.id) {
                    r.progress = None;
                }
            }
        });
    }
}

#[async_trait]
impl Replicator for SimReplicator {
    fn describe(&self) -> String {
        match self.world.replica_direction(&self.pair) {
            Some((s, t)) => format!("sim replicator {}: {s} -> {t}", self.pair),
            None => format!("sim replicator {}", self.pair),
        }
    }

    fn capabilities(&self) -> ReplicatorCaps {
        ReplicatorCaps {
            synchronous: false,
            consistency: Consistency::CrashConsistent,
            needs_source_view: true,
            reversible: true,
            recovery_points: self.config.recovery_points.max(1),
            verify: true,
            test_copies: true,
        }
    }

    async fn initial_sync(&self, source: &SourceView) -> Result<GenerationInfo> {
        self.cycle(source).await
    }

    async fn sync(&self, source: &SourceView) -> Result<GenerationInfo> {
        self.cycle(source).await
    }

    async fn status(&self) -> Result<ReplicaStatus> {
        self.enter().await;
        self.replica((false, true), |r, _, _| {
            let generations: Vec<GenerationInfo> = r
                .stores
                .get(&r.target)
                .map(|s| s.values().map(|g| g.info).collect())
                .unwrap_or_default();
            Ok(ReplicaStatus {
                source: r.source.clone(),
                target: r.target.clone(),
                newest: generations.last().copied(),
                generations,
                in_sync: false,
                progress: r.progress.map(|(_, p)| p),
            })
        })
    }

    async fn promote(&self, g: Generation) -> Result<Promoted> {
        self.enter().await;
        self.replica((false, true), |r, _, _| {
            let s = self.held(r, g)?;
            Ok(Promoted {
                generation: s.info,
                disks: s.disks.clone(),
            })
        })
    }

    async fn reverse(&self) -> Result<()> {
        self.enter().await;
        self.replica((false, false), |r, _, _| {
            std::mem::swap(&mut r.source, &mut r.target);
            Ok(())
        })
    }

    async fn verify(&self, g: Generation, source: &SourceView) -> Result<()> {
        self.enter().await;
        let view = match source {
            SourceView::Continuous => None,
            v => Some(self.source_disks(v)?.0),
        };
        let needs_source = view.is_some();
        self.replica((needs_source, true), |r, st, _| {
            let s = self.held(r, g)?;
            for (d, sum) in s.disks.iter().zip(&s.checksums) {
                match st.images.get(&(r.target.clone(), d.path.clone())) {
                    None => {
                        return Err(self.err(
                            ErrorKind::Conflict,
                            format!(
                                "generation {g} disk {} is missing on {}",
                                d.target, r.target
                            ),
                        ))
                    }
                    Some(b) if &digest(b) != sum => {
                        return Err(self.err(
                            ErrorKind::Conflict,
                            format!(
                                "generation {g} disk {} on {}: checksum mismatch",
                                d.target, r.target
                            ),
                        ))
                    }
                    Some(_) => {}
                }
            }
            for sd in view.iter().flatten() {
                let Some(i) = s.disks.iter().position(|d| d.target == sd.target) else {
                    return Err(self.err(
                        ErrorKind::Conflict,
                        format!("generation {g} has no disk {} of the source", sd.target),
                    ));
                };
                let now = st
                    .images
                    .get(&(r.source.clone(), sd.path.clone()))
                    .map(|b| digest(b));
                if now.as_ref() != Some(&s.checksums[i]) {
                    return Err(self.err(
                        ErrorKind::Conflict,
                        format!(
                            "generation {g} disk {} differs from the source {}",
                            sd.target, r.source
                        ),
                    ));
                }
            }
            Ok(())
        })
    }

    async fn stop(&self) -> Result<()> {
        self.enter().await;
        self.replica((false, false), |r, _, _| {
            r.stopped = true;
            Ok(())
        })
    }

    async fn test_copy(&self, g: Generation, label: &str) -> Result<Vec<DiskSpec>> {
        self.enter().await;
        validate_name("test copy label", label)?;
        self.replica((false, true), |r, st, _| {
            if r.test_copies.contains_key(label) {
                return Err(self.err(ErrorKind::Conflict, format!("test copy {label} exists")));
            }
            let disks = self.held(r, g)?.disks.clone();
            let mut out = Vec::new();
            for d in disks {
                let bytes = st
                    .images
                    .get(&(r.target.clone(), d.path.clone()))
                    .cloned()
                    .unwrap_or_default();
                let path = self.test_copy_path(label, &d.target);
                st.images.insert((r.target.clone(), path.clone()), bytes);
                out.push(DiskSpec { path, ..d });
            }
            r.test_copies
                .insert(label.to_string(), (r.target.clone(), out.clone()));
            Ok(out)
        })
    }

    async fn discard_test_copy(&self, label: &str) -> Result<()> {
        self.enter().await;
        self.replica((false, false), |r, st, _| {
            if let Some((node, disks)) = r.test_copies.remove(label) {
                for d in disks {
                    st.images.remove(&(node.clone(), d.path));
                }
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use wspare_core::{DiskBus, DiskFormat};

    use super::*;

    fn n(s: &str) -> NodeId {
        NodeId::new(s).unwrap()
    }

    fn setup() -> (SimWorld, SimReplicator, SourceView) {
        let w = SimWorld::new();
        let r = SimReplicator::new(&w, &PairId::new("web").unwrap(), &n("a"), &n("b"));
        let disks: Vec<DiskSpec> = ["vda", "vdb"]
            .iter()
            .map(|t| DiskSpec {
                target: t.to_string(),
                path: format!("/vm/{t}.img").into(),
                format: DiskFormat::Raw,
                bus: DiskBus::Virtio,
                read_only: false,
            })
            .collect();
        for d in &disks {
            w.write_image(&n("a"), &d.path, d.target.as_bytes().to_vec());
        }
        let view = SourceView::Stopped {
            disks,
            at: UnixMillis(7),
        };
        (w, r, view)
    }

    #[tokio::test(start_paused = true)]
    async fn keeps_recovery_points_and_reports_progress_only_while_syncing() {
        let (w, r, view) = setup();
        for i in 1..=5 {
            let g = r.sync(&view).await.unwrap();
            assert_eq!(g.generation, Generation(i));
            assert_eq!(g.source_time, UnixMillis(7));
        }
        let st = r.status().await.unwrap();
        let gens: Vec<u64> = st.generations.iter().map(|g| g.generation.0).collect();
        assert_eq!(gens, [3, 4, 5]);
        assert!(st.progress.is_none());
        assert!(
            w.image(&n("b"), &r.generation_path(Generation(2), "vda"))
                .is_none(),
            "pruned"
        );
        let fut = r.sync(&view);
        let dropped = tokio::time::timeout(Duration::from_millis(5), fut).await;
        assert!(dropped.is_err());
        assert!(
            r.status().await.unwrap().progress.is_none(),
            "a dropped sync leaves no progress behind"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn injected_faults() {
        let (w, r, view) = setup();
        let pair = PairId::new("web").unwrap();
        w.set_fault(Fault::SyncFails(pair.clone()));
        assert_eq!(r.sync(&view).await.unwrap_err().kind(), ErrorKind::Backend);
        assert_eq!(r.sync(&view).await.unwrap_err().kind(), ErrorKind::Backend);
        w.clear_fault(&Fault::SyncFails(pair.clone()));
        w.set_fault(Fault::CorruptNextSync(pair.clone()));
        let g = r.sync(&view).await.unwrap().generation;
        let e = r.verify(g, &view).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Conflict);
        assert!(e.to_string().contains("checksum mismatch"), "{e}");
        let g2 = r.sync(&view).await.unwrap().generation;
        r.verify(g2, &view).await.unwrap();
        assert!(w.corrupt_generation(&pair, g2));
        assert_eq!(
            r.verify(g2, &view).await.unwrap_err().kind(),
            ErrorKind::Conflict
        );
        w.set_fault(Fault::ReplicationUnreachable(pair.clone()));
        assert_eq!(
            r.sync(&view).await.unwrap_err().kind(),
            ErrorKind::Unreachable
        );
        w.clear_faults();
        w.power_off(&n("a"));
        assert_eq!(
            r.sync(&view).await.unwrap_err().kind(),
            ErrorKind::Unreachable
        );
        assert_eq!(
            r.promote(g2).await.unwrap().generation.generation,
            g2,
            "promote needs only the target"
        );
        w.set_fault(Fault::SyncHangs(pair));
        w.power_on(&n("a"));
        assert!(tokio::time::timeout(Duration::from_secs(60), r.sync(&view))
            .await
            .is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn a_sync_reading_a_running_vm_tears() {
        // Verify against the source catches a source that moved on.
        let (w, r, view) = setup();
        let g = r.sync(&view).await.unwrap().generation;
        r.verify(g, &view).await.unwrap();
        w.write_image(
            &n("a"),
            std::path::Path::new("/vm/vdb.img"),
            b"changed".to_vec(),
        );
        let e = r.verify(g, &view).await.unwrap_err();
        assert!(e.to_string().contains("differs from the source"), "{e}");
    }
}
