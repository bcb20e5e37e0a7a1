//! [`RsyncReplicator`]: the [`Replicator`] implementation.

use std::path::PathBuf;
use std::sync::Mutex as StdMutex;

use async_trait::async_trait;
use tokio::sync::{watch, Mutex};
use wspare_core::{
    Consistency, DiskSpec, Generation, GenerationInfo, Progress, Promoted, ReplicaStatus,
    Replicator, ReplicatorCaps, Result, SourceView, UnixMillis,
};

use crate::config::{check_name, check_path, Endpoint, Options, Reach};
use crate::direction::other_pair;
use crate::error::RsyncError;
use crate::host::Host;
use crate::manifest::{disk_file, slot_dir, slot_file, DiskRecord, Manifest, Role, SlotGeneration};
use crate::parse::{self, Line, TransferReport};
use crate::transfer;

/// The capabilities of every [`RsyncReplicator`].
pub const CAPS: ReplicatorCaps = ReplicatorCaps {
    synchronous: false,
    consistency: Consistency::CrashConsistent,
    needs_source_view: true,
    reversible: true,
    recovery_points: 2,
    verify: true,
    test_copies: true,
};

/// The source view, checked.
#[derive(Clone, Debug)]
struct Source {
    /// The disks to copy; a frozen disk's bus and mode are not known, so
    /// they read as virtio and read-write.
    disks: Vec<DiskSpec>,
    at: UnixMillis,
    consistency: Consistency,
}

impl Source {
    fn of(view: &SourceView) -> Result<Source, RsyncError> {
        let Some((disks, at)) = view.disks() else {
            return Err(RsyncError::InvalidInput(
                "the rsync replicator copies image files and needs a stopped or frozen source view; \
                 copying a running VM's disks would give a torn copy (SourceView::Continuous refused)"
                    .into(),
            ));
        };
        let consistency = match view {
            SourceView::Frozen(f) => f.consistency,
            // A stopped VM's files are at least crash consistent; clean if it
            // was shut down cleanly, which the view does not say.
            _ => Consistency::CrashConsistent,
        };
        if disks.is_empty() {
            return Err(RsyncError::InvalidInput(
                "the source view has no disks".into(),
            ));
        }
        for (i, d) in disks.iter().enumerate() {
            check_name("disk target", &d.target)?;
            check_path("source disk", &d.path)?;
            if disks[..i].iter().any(|o| o.target == d.target) {
                return Err(RsyncError::InvalidInput(format!(
                    "disk target {} appears twice in the source view",
                    d.target
                )));
            }
        }
        Ok(Source {
            disks,
            at,
            consistency,
        })
    }
}

/// What the last successful cycle moved, summed over its disks (from
/// rsync's `--stats`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CycleStats {
    /// The generation it made.
    pub generation: Generation,
    /// Bytes of the images.
    pub bytes_total: u64,
    /// Bytes rsync did not find in the slot's old content (sent as data).
    pub literal: u64,
    /// Bytes found in the slot's old content.
    pub matched: u64,
    /// Bytes the sending rsync sent (data, checksums, protocol).
    pub bytes_sent: u64,
    /// Bytes it received (the target's block checksums).
    pub bytes_received: u64,
}

/// In-memory state: direction, epoch, progress.
#[derive(Debug)]
struct State {
    /// `a` is the source.
    forward: bool,
    /// The direction epoch, once learned from the manifests.
    epoch: Option<u64>,
    /// Highest generation number given out or seen.
    high_water: Generation,
    /// The cycle in progress.
    progress: Option<Progress>,
    /// The last successful cycle.
    last_cycle: Option<CycleStats>,
}

/// Clears the progress when a cycle ends, however it ends.
struct ProgressGuard<'a>(&'a StdMutex<State>);

impl Drop for ProgressGuard<'_> {
    fn drop(&mut self) {
        if let Ok(mut s) = self.0.lock() {
            s.progress = None;
        }
    }
}

/// A [`Replicator`] for disk image files over rsync. See the crate docs for
/// the slot layout, the manifest and who runs rsync where.
pub struct RsyncReplicator {
    name: String,
    a: Endpoint,
    b: Endpoint,
    opts: Options,
    state: StdMutex<State>,
    /// Serializes the operations that read or write slots and manifests.
    op: Mutex<()>,
    /// Bumped by `stop` to end a cycle in progress.
    stop_tx: watch::Sender<u64>,
}

impl std::fmt::Debug for RsyncReplicator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RsyncReplicator")
            .field("name", &self.name)
            .field("a", &self.a)
            .field("b", &self.b)
            .field("opts", &self.opts)
            .finish()
    }
}

impl RsyncReplicator {
    /// A replicator for pair `name`, copying from `source` to `target` (the
    /// direction as the caller last knew it: after a failover, the spare is
    /// the source). Fails with `InvalidInput` for a bad name or path.
    pub fn new(name: &str, source: Endpoint, target: Endpoint, opts: Options) -> Result<Self> {
        check_name("pair name", name)?;
        source.validate()?;
        target.validate()?;
        if source.node == target.node && source.replica_dir == target.replica_dir {
            return Err(RsyncError::InvalidInput(format!(
                "both endpoints of {name} use replica directory {} on {}",
                source.replica_dir.display(),
                source.node
            ))
            .into());
        }
        Ok(RsyncReplicator {
            name: name.to_string(),
            a: source,
            b: target,
            opts,
            state: StdMutex::new(State {
                forward: true,
                epoch: None,
                high_water: Generation(0),
                progress: None,
                last_cycle: None,
            }),
            op: Mutex::new(()),
            stop_tx: watch::channel(0).0,
        })
    }

    /// What the last successful cycle moved.
    pub fn last_cycle(&self) -> Option<CycleStats> {
        self.state().last_cycle
    }

    /// The pair's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `(source, target)` in the current direction.
    pub fn ends(&self) -> (&Endpoint, &Endpoint) {
        if self.state().forward {
            (&self.a, &self.b)
        } else {
            (&self.b, &self.a)
        }
    }

    fn host<'a>(&'a self, ep: &'a Endpoint) -> Host<'a> {
        Host::new(ep, &self.opts)
    }

    /// The direction epoch: learned once from the manifests (the largest
    /// one seen), then kept.
    fn epoch(&self, seen: &[Option<&Manifest>]) -> u64 {
        let mut s = self.state();
        let hw = seen
            .iter()
            .flatten()
            .map(|m| m.high_water)
            .max()
            .unwrap_or_default();
        s.high_water = s.high_water.max(hw);
        *s.epoch
            .get_or_insert_with(|| seen.iter().flatten().map(|m| m.epoch).max().unwrap_or(0))
    }

    /// Checks `ep`'s manifest against this replicator, whose direction
    /// gives `ep` the role `role` at `epoch`: the directory is this pair's,
    /// its epoch is not newer, and at this epoch it does not hold the
    /// opposite role (a target that runs the VM, a source holding replicas).
    fn check_manifest(
        &self,
        m: &Manifest,
        epoch: u64,
        ep: &Endpoint,
        role: Role,
    ) -> Result<(), RsyncError> {
        let node = &ep.node;
        if m.pair != self.name {
            return Err(RsyncError::Conflict(other_pair(ep, &m.pair, &self.name)));
        }
        if m.epoch > epoch {
            return Err(RsyncError::Conflict(format!(
                "{node} is at direction epoch {} but this replicator at {epoch}: it is stale (a reverse happened elsewhere); \
                 rebuild it with the current direction",
                m.epoch
            )));
        }
        if m.epoch < epoch {
            return Ok(());
        }
        match (role, m.role) {
            (Role::Target, Role::Source) => Err(RsyncError::Conflict(format!(
                "{node} holds the active copy at epoch {epoch} (its VM runs from a promoted slot): nothing is synced into it \
                 until the direction is reversed"
            ))),
            (Role::Source, Role::Target) if !m.generations.is_empty() => Err(RsyncError::Conflict(format!(
                "{node} is configured as the source but is a replica target at epoch {epoch}: the configured direction is wrong; \
                 rebuild the replicator with source and target swapped"
            ))),
            _ => Ok(()),
        }
    }

    /// `tgt`'s manifest as this replicator's target at `epoch`: checked, or
    /// a new one if it has none; what an older epoch held is dropped.
    fn as_target(
        &self,
        m: Option<Manifest>,
        epoch: u64,
        tgt: &Endpoint,
    ) -> Result<Manifest, RsyncError> {
        let mut m = match m {
            Some(m) => {
                self.check_manifest(&m, epoch, tgt, Role::Target)?;
                m
            }
            None => Manifest::new(&self.name, epoch, Role::Target),
        };
        m.become_target(epoch);
        Ok(m)
    }

    /// The target's manifest as it stands for this replicator: its complete
    /// generations, or an empty one (none yet, or stale from an older epoch).
    async fn target_view(&self) -> Result<Manifest, RsyncError> {
        let (src, tgt) = self.ends();
        let t = self.host(tgt).read_manifest().await?;
        // The source may be down (a failover): it only adds what it knows.
        let s = self.host(src).read_manifest().await.ok().flatten();
        let epoch = self.epoch(&[t.as_ref(), s.as_ref()]);
        self.as_target(t, epoch, tgt)
    }

    /// The current target's manifest, if it has one (for tests and tools).
    pub async fn target_manifest(&self) -> Result<Option<Manifest>> {
        let (_, tgt) = self.ends();
        Ok(self.host(tgt).read_manifest().await?)
    }

    /// The disks the active copy runs from on the source host when it runs
    /// from a replica slot (after `promote` and `reverse`): the promoted
    /// slot's generation, else the newest. `None` when the source's replica
    /// directory holds no generation (the VM runs from its own files).
    pub async fn active_disks(&self) -> Result<Option<Vec<DiskSpec>>> {
        let (src, _) = self.ends();
        let Some(m) = self.host(src).read_manifest().await? else {
            return Ok(None);
        };
        let g = m
            .promoted
            .and_then(|p| m.generations.iter().find(|g| g.slot == p))
            .or(m.newest());
        Ok(g.map(|g| g.disk_specs(&src.replica_dir)))
    }

    async fn cycle(&self, view: &SourceView) -> Result<GenerationInfo> {
        let source = Source::of(view)?;
        let _op = self.op.lock().await;
        let mut stop = self.stop_tx.subscribe();
        stop.borrow_and_update();
        let _progress = ProgressGuard(&self.state);
        let r = tokio::select! {
            r = self.cycle_locked(&source) => r,
            _ = stop.changed() => Err(RsyncError::Stopped),
        };
        if let Err(RsyncError::TargetFull { .. }) = &r {
            self.clean_torn_slot().await;
        }
        Ok(r?)
    }

    /// After a cycle failed for lack of space: removes the files of the
    /// slot it was writing (junk, and what filled the disk), if the manifest
    /// on the target says that slot is being written and lists no
    /// generation in it. Best effort.
    async fn clean_torn_slot(&self) {
        let (_, tgt) = self.ends();
        let t_host = self.host(tgt);
        match t_host.read_manifest().await {
            Ok(Some(m)) => {
                if let Some(w) = m.writing {
                    if m.generations.iter().all(|g| g.slot != w.slot) && m.promoted != Some(w.slot)
                    {
                        let dir = slot_dir(&tgt.replica_dir, w.slot);
                        if let Err(e) = t_host.remove_tree(&dir).await {
                            tracing::warn!(pair = %self.name, dir = %dir.display(), error = %e, "cannot remove a torn slot");
                        }
                    }
                }
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(pair = %self.name, error = %e, "cannot read the manifest to clean a torn slot")
            }
        }
    }

    async fn cycle_locked(&self, source: &Source) -> Result<GenerationInfo, RsyncError> {
        let (src, tgt) = self.ends();
        let (s_host, t_host) = (self.host(src), self.host(tgt));
        let paths: Vec<PathBuf> = source.disks.iter().map(|d| d.path.clone()).collect();
        let sizes = s_host.sizes(&paths).await?;
        let total: u64 = sizes.iter().sum();
        self.state().progress = Some(Progress {
            bytes_done: 0,
            bytes_total: total,
            bytes_per_sec: 0,
        });

        let t_m = t_host.read_manifest().await?;
        let s_m = s_host.read_manifest().await?;
        let epoch = self.epoch(&[t_m.as_ref(), s_m.as_ref()]);
        if let Some(m) = &s_m {
            self.check_manifest(m, epoch, src, Role::Source)?;
        }
        let mut m = self.as_target(t_m, epoch, tgt)?;
        let g = {
            let s = self.state();
            let hw = [
                m.high_water,
                s_m.as_ref().map_or(Generation(0), |x| x.high_water),
                s.high_water,
            ];
            hw.into_iter().max().unwrap_or_default().next()
        };
        let slot = m.choose_slot();
        let seeds = m.generations.clone();
        m.begin(slot, g);
        let dir = &tgt.replica_dir;
        let files: Vec<String> = source
            .disks
            .iter()
            .map(|d| disk_file(&d.target, d.format))
            .collect();
        // `file` in generation `sg`'s slot and in the slot being written, if
        // `sg` has that file.
        let from = |sg: &SlotGeneration, file: &String| {
            sg.disks
                .iter()
                .any(|x| x.file == *file)
                .then(|| (slot_file(dir, sg.slot, file), slot_file(dir, slot, file)))
        };
        // A slot used for the first time starts as a local copy of the
        // newest generation, so that rsync sends a delta.
        let seed_pairs: Vec<(PathBuf, PathBuf)> = files
            .iter()
            .filter_map(|f| seeds.iter().rev().find_map(|sg| from(sg, f)))
            .collect();
        // Where the filesystem clones, the slot starts as the newest
        // generation: one generation to catch up instead of two.
        let clones: Vec<(PathBuf, PathBuf)> = match (self.opts.reflink, seeds.last()) {
            (true, Some(newest)) => files.iter().filter_map(|f| from(newest, f)).collect(),
            _ => Vec::new(),
        };
        t_host
            .write_manifest_with(&m, &slot_dir(dir, slot), &seed_pairs, &clones)
            .await?;
        self.state().high_water = g;
        tracing::info!(pair = %self.name, generation = %g, slot, from = %src.node, to = %tgt.node, "sync cycle");

        let mut records = Vec::with_capacity(source.disks.len());
        let mut stats = CycleStats {
            generation: g,
            bytes_total: total,
            ..CycleStats::default()
        };
        let mut done_before = 0u64;
        for ((d, size), file) in source.disks.iter().zip(&sizes).zip(files) {
            let dst = slot_file(dir, slot, &file);
            let hints = transfer::TransferHints {
                size: *size,
                new_file: !seed_pairs.iter().any(|(_, to)| *to == dst)
                    && !seeds
                        .iter()
                        .any(|sg| sg.slot == slot && sg.disks.iter().any(|x| x.file == file)),
            };
            let report = self.transfer(d, &dst, done_before, total, hints).await?;
            stats.literal += report.literal;
            stats.matched += report.matched;
            stats.bytes_sent += report.sent;
            stats.bytes_received += report.received;
            let checksum = match (&report.checksum, report.length) {
                (Some(c), Some(len)) if len == *size => format!("xxh128:{c}"),
                _ => {
                    return Err(RsyncError::Conflict(format!(
                        "rsync of disk {} finished without reporting the checksum of a {size}-byte file (reported length {:?}); \
                         the source changed during the cycle or rsync is too old",
                        d.target, report.length
                    )))
                }
            };
            records.push(DiskRecord {
                target: d.target.clone(),
                file,
                format: d.format,
                bus: d.bus,
                read_only: d.read_only,
                size: *size,
                checksum,
            });
            done_before += size;
        }
        let new = SlotGeneration {
            generation: g,
            source_time: source.at,
            slot,
            source_node: src.node.clone(),
            consistency: source.consistency,
            disks: records,
        };
        let info = new.info();
        m.commit(new);
        // Fsyncs the slot directory, then switches the manifest.
        t_host
            .write_manifest_with(&m, &slot_dir(dir, slot), &[], &[])
            .await?;
        tracing::info!(
            pair = %self.name, generation = %g, literal = stats.literal, matched = stats.matched,
            sent = stats.bytes_sent, "sync cycle complete"
        );
        self.state().last_cycle = Some(stats);
        Ok(info)
    }

    /// One disk's rsync, on the source host, with progress.
    async fn transfer(
        &self,
        d: &DiskSpec,
        dst: &std::path::Path,
        done_before: u64,
        total: u64,
        hints: transfer::TransferHints,
    ) -> Result<TransferReport, RsyncError> {
        let (src, tgt) = self.ends();
        let cmd = transfer::command(&self.opts, &d.path, &tgt.reach, dst, hints);
        let state = &self.state;
        let mut sink = |line: &str| {
            if let Line::Progress(p) = parse::parse_line(line) {
                if let Ok(mut s) = state.lock() {
                    s.progress = Some(parse::cycle_progress(done_before, total, &p));
                }
            }
        };
        match src.runner.run_with(&cmd, Some(&mut sink)).await {
            Ok(out) => Ok(TransferReport::from_output(&out.stdout)),
            Err(e) => {
                let parties = transfer::Parties {
                    disk: &d.target,
                    src_node: &src.node,
                    src_path: &d.path,
                    dst_node: &tgt.node,
                    dst_dir: &tgt.replica_dir,
                    remote: matches!(tgt.reach, Reach::Ssh(_)),
                    runner_remote: src.runner.describe() != "local",
                    io_timeout: self.opts.io_timeout,
                };
                Err(transfer::failure(&parties, e))
            }
        }
    }

    fn not_held(&self, m: &Manifest, g: Generation) -> RsyncError {
        let (_, tgt) = self.ends();
        RsyncError::NoSuchGeneration {
            node: tgt.node.clone(),
            generation: g,
            held: m.held(),
        }
    }
}

#[async_trait]
impl Replicator for RsyncReplicator {
    fn describe(&self) -> String {
        let (src, tgt) = self.ends();
        format!(
            "rsync {}: {} -> {}:{}",
            self.name,
            src.node,
            tgt.node,
            tgt.replica_dir.display()
        )
    }

    fn capabilities(&self) -> ReplicatorCaps {
        CAPS
    }

    async fn initial_sync(&self, source: &SourceView) -> Result<GenerationInfo> {
        self.cycle(source).await
    }

    async fn sync(&self, source: &SourceView) -> Result<GenerationInfo> {
        self.cycle(source).await
    }

    async fn status(&self) -> Result<ReplicaStatus> {
        let m = self.target_view().await?;
        let (src, tgt) = self.ends();
        Ok(ReplicaStatus {
            source: src.node.clone(),
            target: tgt.node.clone(),
            newest: m.newest().map(SlotGeneration::info),
            generations: m.generations.iter().map(SlotGeneration::info).collect(),
            in_sync: false,
            progress: self.state().progress,
        })
    }

    async fn promote(&self, g: Generation) -> Result<Promoted> {
        let _op = self.op.lock().await;
        let mut m = self.target_view().await?;
        let (_, tgt) = self.ends();
        let t_host = self.host(tgt);
        let sg = m.get(g).cloned().ok_or_else(|| self.not_held(&m, g))?;
        let disks = sg.disk_specs(&tgt.replica_dir);
        let paths: Vec<PathBuf> = disks.iter().map(|d| d.path.clone()).collect();
        let sizes = t_host.sizes(&paths).await.map_err(|e| match e {
            RsyncError::SourceMissing { node, path } => RsyncError::Conflict(format!(
                "disk file {} of {g} is missing on {node}: the replica was altered",
                path.display()
            )),
            e => e,
        })?;
        for (d, size) in sg.disks.iter().zip(sizes) {
            if d.size != size {
                return Err(RsyncError::Conflict(format!(
                    "disk {} of {g} on {} is {size} bytes, the manifest says {}: the replica was altered",
                    d.target, tgt.node, d.size
                ))
                .into());
            }
        }
        if m.promoted != Some(sg.slot) {
            m.promoted = Some(sg.slot);
            t_host.write_manifest(&m).await?;
        }
        Ok(Promoted {
            generation: sg.info(),
            disks,
        })
    }

    async fn reverse(&self) -> Result<()> {
        let _op = self.op.lock().await;
        let (src, tgt) = self.ends();
        let (s_host, t_host) = (self.host(src), self.host(tgt));
        let t_m = t_host.read_manifest().await?;
        let s_m = s_host.read_manifest().await;
        let epoch = self.epoch(&[t_m.as_ref(), s_m.as_ref().ok().and_then(Option::as_ref)]);
        let mut t_m = self.as_target(t_m, epoch, tgt)?;
        let new_epoch = epoch + 1;
        // The old target becomes the source: its slots are the active copy
        // now (the promoted one runs the VM); a dead cycle's slot is junk.
        t_m.epoch = new_epoch;
        t_m.role = Role::Source;
        t_m.writing = None;
        t_host.write_manifest(&t_m).await?;
        // The old source becomes the target, if it can be reached now; if
        // not, the first sync to it does the same.
        match s_m {
            Ok(Some(mut m)) if m.pair == self.name => {
                m.become_target(new_epoch);
                if let Err(e) = s_host.write_manifest(&m).await {
                    tracing::warn!(pair = %self.name, node = %src.node, error = %e, "reverse: old source not updated");
                }
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(pair = %self.name, node = %src.node, error = %e, "reverse: old source unreachable")
            }
        }
        let mut s = self.state();
        s.forward = !s.forward;
        s.epoch = Some(new_epoch);
        s.high_water = s.high_water.max(t_m.high_water);
        tracing::info!(pair = %self.name, epoch = new_epoch, "replication reversed");
        Ok(())
    }

    async fn verify(&self, g: Generation, source: &SourceView) -> Result<()> {
        let _op = self.op.lock().await;
        let m = self.target_view().await?;
        let (src, tgt) = self.ends();
        let sg = m.get(g).cloned().ok_or_else(|| self.not_held(&m, g))?;
        let t_host = self.host(tgt);
        for d in &sg.disks {
            let path = slot_file(&tgt.replica_dir, sg.slot, &d.file);
            let found = t_host
                .checksum(&path)
                .await?
                .unwrap_or_else(|| "missing".into());
            if found != d.checksum {
                return Err(RsyncError::ChecksumMismatch {
                    node: tgt.node.clone(),
                    generation: g,
                    disk: d.target.clone(),
                    expected: d.checksum.clone(),
                    found,
                }
                .into());
            }
        }
        // Against the source too, for the newest generation (the final
        // check of a planned switchover: the stopped source must equal it).
        let is_newest = m.newest().map(|n| n.generation) == Some(g);
        if let (true, Ok(source)) = (is_newest, Source::of(source)) {
            let s_host = self.host(src);
            for d in &sg.disks {
                let Some(sd) = source.disks.iter().find(|s| s.target == d.target) else {
                    return Err(RsyncError::Conflict(format!(
                        "the source view lacks disk {} of {g}: the VM's disks changed since",
                        d.target
                    ))
                    .into());
                };
                let found = s_host
                    .checksum(&sd.path)
                    .await?
                    .unwrap_or_else(|| "missing".into());
                if found != d.checksum {
                    return Err(RsyncError::ChecksumMismatch {
                        node: src.node.clone(),
                        generation: g,
                        disk: d.target.clone(),
                        expected: d.checksum.clone(),
                        found,
                    }
                    .into());
                }
            }
        }
        Ok(())
    }

    async fn stop(&self) -> Result<()> {
        self.stop_tx.send_modify(|n| *n += 1);
        // Waits for a cycle in progress to end (its rsync is killed).
        let _op = self.op.lock().await;
        Ok(())
    }

    async fn test_copy(&self, g: Generation, label: &str) -> Result<Vec<DiskSpec>> {
        check_name("test copy label", label)?;
        let _op = self.op.lock().await;
        let m = self.target_view().await?;
        let (_, tgt) = self.ends();
        let sg = m.get(g).cloned().ok_or_else(|| self.not_held(&m, g))?;
        let t_host = self.host(tgt);
        let dir = test_dir(&tgt.replica_dir, label);
        t_host.remove_tree(&dir).await?;
        t_host.mkdirs(std::slice::from_ref(&dir)).await?;
        let mut out = Vec::new();
        for (d, spec) in sg.disks.iter().zip(sg.disk_specs(&tgt.replica_dir)) {
            let to = dir.join(&d.file);
            t_host.copy(&spec.path, &to).await?;
            out.push(DiskSpec { path: to, ..spec });
        }
        t_host.fsync(&[dir]).await?;
        Ok(out)
    }

    async fn discard_test_copy(&self, label: &str) -> Result<()> {
        check_name("test copy label", label)?;
        let (_, tgt) = self.ends();
        self.host(tgt)
            .remove_tree(&test_dir(&tgt.replica_dir, label))
            .await?;
        Ok(())
    }
}

/// `dir/tests/<label>`.
pub fn test_dir(dir: &std::path::Path, label: &str) -> PathBuf {
    dir.join("tests").join(label)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use wspare_core::runner::{Reply, ScriptedRunner};
    use wspare_core::{DiskBus, DiskFormat, ErrorKind, NodeId};

    use super::*;
    use crate::host::WRITE_MANIFEST_SH;
    use crate::manifest::Writing;

    const RECORDED: &str = include_str!("../testdata/progress2-local-delta.out");
    const KILLED: &str = include_str!("../testdata/killed.out");

    fn rsync_argv(dst: &str, first: bool) -> Vec<String> {
        let mut v: Vec<String> = ["rsync"]
            .iter()
            .chain(transfer::BASE_ARGS)
            .map(|s| s.to_string())
            .collect();
        v.extend(["--out-format=wspare-item:%C:%l:%n", "--timeout=120"].map(String::from));
        if first {
            v.push("--sparse".into());
        }
        v.extend(["--block-size=4096", "--", "/vm/vda.img", dst].map(String::from));
        v
    }

    fn strs(v: &[String]) -> Vec<&str> {
        v.iter().map(String::as_str).collect()
    }

    fn write_argv<'a>(slot: &'a str, seeds: &[&'a str]) -> Vec<&'a str> {
        let mut v = vec!["sh", "-c", WRITE_MANIFEST_SH, "sh", "/srv/b", slot];
        v.extend(seeds);
        v
    }

    /// One cycle and one killed cycle, command by command: the exact argv on
    /// each host, and the manifest written before and after the transfer.
    #[tokio::test]
    async fn cycle_commands_and_manifests() {
        let at = UnixMillis(1_700_000_000_000);
        let no_file =
            |p: &str| Reply::exit(1, "", format!("cat: {p}: No such file or directory\n"));
        let mut begin = Manifest::new("web", 0, Role::Target);
        begin.begin(0, Generation(1));
        assert_eq!(
            begin.writing,
            Some(Writing {
                slot: 0,
                generation: Generation(1)
            })
        );
        let g1 = SlotGeneration {
            generation: Generation(1),
            source_time: at,
            slot: 0,
            source_node: NodeId::new("node-a").unwrap(),
            consistency: Consistency::CrashConsistent,
            disks: vec![DiskRecord {
                target: "vda".into(),
                file: "vda.raw".into(),
                format: DiskFormat::Raw,
                bus: DiskBus::Virtio,
                read_only: false,
                size: 1 << 30,
                checksum: "xxh128:6c82c48c161bb1bb5dfb869d17ecf338".into(),
            }],
        };
        let mut commit = begin.clone();
        commit.commit(g1.clone());
        let mut begin2 = commit.clone();
        begin2.begin(1, Generation(2));

        let a = ScriptedRunner::new()
            .expect(
                &["stat", "-L", "-c", "%s", "--", "/vm/vda.img"],
                Reply::ok("1073741824\n"),
            )
            .expect(
                &["cat", "--", "/srv/a/MANIFEST"],
                no_file("/srv/a/MANIFEST"),
            )
            .expect(
                &strs(&rsync_argv("/srv/b/slot-0/vda.raw", true)),
                Reply::ok(RECORDED),
            )
            .expect(
                &["stat", "-L", "-c", "%s", "--", "/vm/vda.img"],
                Reply::ok("1073741824\n"),
            )
            .expect(
                &["cat", "--", "/srv/a/MANIFEST"],
                no_file("/srv/a/MANIFEST"),
            )
            .expect(
                &strs(&rsync_argv("/srv/b/slot-1/vda.raw", false)),
                Reply::killed(KILLED, ""),
            )
            // status()
            .expect(
                &["cat", "--", "/srv/a/MANIFEST"],
                no_file("/srv/a/MANIFEST"),
            );
        let b = ScriptedRunner::new()
            .expect(
                &["cat", "--", "/srv/b/MANIFEST"],
                no_file("/srv/b/MANIFEST"),
            )
            .expect_stdin(
                &write_argv("/srv/b/slot-0", &[]),
                &begin.to_json(),
                Reply::ok(""),
            )
            .expect_stdin(
                &write_argv("/srv/b/slot-0", &[]),
                &commit.to_json(),
                Reply::ok(""),
            )
            .expect(
                &["cat", "--", "/srv/b/MANIFEST"],
                Reply::ok(commit.to_json()),
            )
            // The new slot is seeded from the newest generation's file (a
            // sparse copy if it has none yet, a reflink clone if it can).
            .expect_stdin(
                &write_argv(
                    "/srv/b/slot-1",
                    &[
                        "/srv/b/slot-0/vda.raw",
                        "/srv/b/slot-1/vda.raw",
                        "--clone",
                        "/srv/b/slot-0/vda.raw",
                        "/srv/b/slot-1/vda.raw",
                    ],
                ),
                &begin2.to_json(),
                Reply::ok(""),
            )
            // status()
            .expect(
                &["cat", "--", "/srv/b/MANIFEST"],
                Reply::ok(begin2.to_json()),
            );
        let ep = |n: &str, r: ScriptedRunner, d: &str| {
            Endpoint::new(NodeId::new(n).unwrap(), Arc::new(r), Reach::Local, d)
        };
        let rep = RsyncReplicator::new(
            "web",
            ep("node-a", a, "/srv/a"),
            ep("node-b", b, "/srv/b"),
            Options::default(),
        )
        .unwrap();
        let view = SourceView::Stopped {
            disks: vec![DiskSpec {
                target: "vda".into(),
                path: "/vm/vda.img".into(),
                format: DiskFormat::Raw,
                bus: DiskBus::Virtio,
                read_only: false,
            }],
            at,
        };
        let info = rep.initial_sync(&view).await.unwrap();
        assert_eq!(info, g1.info());
        let e = rep.sync(&view).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Backend);
        assert!(e.is_retryable());
        assert!(
            e.to_string()
                .contains("rsync of disk vda was killed mid-transfer"),
            "{e}"
        );
        let st = rep.status().await.unwrap();
        assert_eq!(st.newest, Some(g1.info()));
        assert_eq!(st.generations, [g1.info()]);
        assert_eq!(st.progress, None);
    }

    #[tokio::test]
    async fn continuous_views_and_bad_labels_are_refused() {
        let ep = |n: &str, d: &str| {
            Endpoint::new(
                NodeId::new(n).unwrap(),
                Arc::new(ScriptedRunner::new()),
                Reach::Local,
                d,
            )
        };
        let rep = RsyncReplicator::new(
            "web",
            ep("node-a", "/srv/a"),
            ep("node-b", "/srv/b"),
            Options::default(),
        )
        .unwrap();
        let e = rep.sync(&SourceView::Continuous).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidInput);
        let e = rep.test_copy(Generation(1), "../x").await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidInput);
        let e = rep.discard_test_copy("a b").await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidInput);
        let view = SourceView::Stopped {
            disks: vec![DiskSpec {
                target: "vda".into(),
                path: "/vm/a;reboot".into(),
                format: DiskFormat::Raw,
                bus: DiskBus::Virtio,
                read_only: false,
            }],
            at: UnixMillis(0),
        };
        assert_eq!(
            rep.sync(&view).await.unwrap_err().kind(),
            ErrorKind::InvalidInput
        );
        assert!(RsyncReplicator::new(
            "web",
            ep("node-a", "/srv/a"),
            ep("node-a", "/srv/a"),
            Options::default()
        )
        .is_err());
        assert!(RsyncReplicator::new(
            "web",
            ep("node-a", "relative"),
            ep("node-b", "/srv/b"),
            Options::default()
        )
        .is_err());
        assert_eq!(rep.capabilities(), CAPS);
        assert_eq!(rep.describe(), "rsync web: node-a -> node-b:/srv/b");
    }
}
