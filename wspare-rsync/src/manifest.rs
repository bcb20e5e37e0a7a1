//! The generation manifest: which slot holds which complete generation, and
//! the pure decisions made from it (which slot a cycle writes, what a
//! finished cycle keeps, what a direction change does).
//!
//! One manifest per replica directory, `MANIFEST`, JSON. It is only ever
//! replaced whole: written to `MANIFEST.tmp`, fsynced, renamed over
//! `MANIFEST`, and the directory fsynced. A reader sees the old or the new
//! manifest, never a mix.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use wspare_core::{
    Consistency, DiskBus, DiskFormat, DiskSpec, Generation, GenerationInfo, NodeId, UnixMillis,
};

/// The manifest's file name in the replica directory.
pub const MANIFEST: &str = "MANIFEST";
/// The file a new manifest is written to before the rename.
pub const MANIFEST_TMP: &str = "MANIFEST.tmp";
/// The manifest format this crate writes and reads.
pub const FORMAT: u32 = 1;

/// Which role a replica directory's host has at the manifest's epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// It receives: its complete generations are replicas.
    Target,
    /// The VM runs from its files (after a promote and a reverse): it is
    /// the active copy, and nothing may be synced into it at this epoch.
    Source,
}

/// One disk of a complete generation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct DiskRecord {
    /// The guest's slot (`vda`).
    pub target: String,
    /// The file name inside the slot directory (`vda.raw`).
    pub file: String,
    /// Image format.
    pub format: DiskFormat,
    /// Bus, as the source view said (virtio when it did not say).
    pub bus: DiskBus,
    /// Read-only, as the source view said.
    pub read_only: bool,
    /// Size in bytes.
    pub size: u64,
    /// Whole-file checksum, `xxh128:<hex>`.
    pub checksum: String,
}

/// A complete generation in one slot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct SlotGeneration {
    /// The generation.
    pub generation: Generation,
    /// The source's point in time.
    pub source_time: UnixMillis,
    /// The slot directory's number (`slot-1`).
    pub slot: u32,
    /// The host it was copied from.
    pub source_node: NodeId,
    /// What the source view gave: crash consistent from a freeze or a
    /// stopped VM, application consistent when the guest agent quiesced.
    pub consistency: Consistency,
    /// Every disk, in the VM's order.
    pub disks: Vec<DiskRecord>,
}

impl SlotGeneration {
    /// The core's view of it.
    pub fn info(&self) -> GenerationInfo {
        GenerationInfo {
            generation: self.generation,
            source_time: self.source_time,
        }
    }

    /// Its disks as specs at their paths under `dir`.
    pub fn disk_specs(&self, dir: &Path) -> Vec<DiskSpec> {
        self.disks
            .iter()
            .map(|d| DiskSpec {
                target: d.target.clone(),
                path: slot_file(dir, self.slot, &d.file),
                format: d.format,
                bus: d.bus,
                read_only: d.read_only,
            })
            .collect()
    }
}

/// A cycle in progress (or one that died): the slot's previous content is
/// no longer a generation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Writing {
    /// The slot being written.
    pub slot: u32,
    /// The generation number it was to become.
    pub generation: Generation,
}

/// The manifest of one replica directory.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Manifest {
    /// Format version, [`FORMAT`].
    pub format: u32,
    /// The pair (replicator name) the directory belongs to.
    pub pair: String,
    /// Direction epoch: each `reverse` takes the next one.
    pub epoch: u64,
    /// This host's role at `epoch`.
    pub role: Role,
    /// The largest generation number ever given out for this pair, as this
    /// host knows it. New generations are larger than every high-water mark.
    pub high_water: Generation,
    /// Complete generations, oldest first.
    pub generations: Vec<SlotGeneration>,
    /// The slot a cycle is writing, if one is (or died midway).
    pub writing: Option<Writing>,
    /// The slot `promote` handed out: never written by a later cycle into
    /// this host while the pin stands.
    pub promoted: Option<u32>,
}

impl Manifest {
    /// An empty target manifest.
    pub fn new(pair: &str, epoch: u64, role: Role) -> Self {
        Manifest {
            format: FORMAT,
            pair: pair.to_string(),
            epoch,
            role,
            high_water: Generation(0),
            generations: Vec::new(),
            writing: None,
            promoted: None,
        }
    }

    /// Parses a manifest; the error says what is wrong.
    pub fn parse(text: &str) -> Result<Self, String> {
        let m: Manifest = serde_json::from_str(text).map_err(|e| e.to_string())?;
        if m.format != FORMAT {
            return Err(format!("format {} is not the supported {FORMAT}", m.format));
        }
        if !m
            .generations
            .windows(2)
            .all(|w| w[0].generation < w[1].generation)
        {
            return Err("generations are not in increasing order".into());
        }
        let mut slots: Vec<u32> = m.generations.iter().map(|g| g.slot).collect();
        slots.sort_unstable();
        if slots.windows(2).any(|w| w[0] == w[1]) {
            return Err("two generations share a slot".into());
        }
        if let Some(w) = m.writing {
            if slots.contains(&w.slot) {
                return Err(format!(
                    "slot {} is both being written and complete",
                    w.slot
                ));
            }
        }
        if m.generations.iter().any(|g| g.generation > m.high_water) {
            return Err("a generation is above the high-water mark".into());
        }
        Ok(m)
    }

    /// Serializes it (pretty, with a trailing newline).
    pub fn to_json(&self) -> String {
        let mut s = serde_json::to_string_pretty(self).expect("manifest serializes");
        s.push('\n');
        s
    }

    /// The newest complete generation.
    pub fn newest(&self) -> Option<&SlotGeneration> {
        self.generations.last()
    }

    /// Generation `g`, if complete here.
    pub fn get(&self, g: Generation) -> Option<&SlotGeneration> {
        self.generations.iter().find(|x| x.generation == g)
    }

    /// The held generations, for messages ("g3, g4" or "none").
    pub fn held(&self) -> String {
        if self.generations.is_empty() {
            "none".into()
        } else {
            self.generations
                .iter()
                .map(|g| g.generation.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        }
    }

    /// The slot the next cycle writes: never the newest generation's, never
    /// the promoted one. A slot without a complete generation is preferred
    /// (a dead cycle's, a fresh one), then the oldest generation's; if
    /// every slot is taken, a new one.
    pub fn choose_slot(&self) -> u32 {
        let newest = self.newest().map(|g| g.slot);
        let busy = |s: u32| Some(s) == newest || Some(s) == self.promoted;
        let used: Vec<u32> = self
            .generations
            .iter()
            .map(|g| g.slot)
            .chain(self.writing.map(|w| w.slot))
            .chain(self.promoted)
            .collect();
        if let Some(w) = self.writing {
            if !busy(w.slot) {
                return w.slot;
            }
        }
        // A free slot number below two (the usual pair of slots).
        for s in 0..2 {
            if !used.contains(&s) {
                return s;
            }
        }
        if let Some(g) = self.generations.iter().find(|g| !busy(g.slot)) {
            return g.slot;
        }
        (0..)
            .find(|s| !used.contains(s))
            .expect("a free slot number")
    }

    /// Starts a cycle of generation `g` into `slot`: the slot's old
    /// generation stops being complete before a byte of it is written.
    pub fn begin(&mut self, slot: u32, g: Generation) {
        self.generations.retain(|x| x.slot != slot);
        self.writing = Some(Writing {
            slot,
            generation: g,
        });
        self.high_water = self.high_water.max(g);
    }

    /// Ends a cycle: `new` is complete. Keeps at most two generations: the
    /// new one and the promoted one if there is one, else the one before.
    pub fn commit(&mut self, new: SlotGeneration) {
        self.high_water = self.high_water.max(new.generation);
        self.writing = None;
        let keep_old = match self.promoted {
            Some(p) if p != new.slot && self.generations.iter().any(|g| g.slot == p) => Some(p),
            _ => self.newest().map(|g| g.slot).filter(|s| *s != new.slot),
        };
        self.generations.retain(|g| Some(g.slot) == keep_old);
        self.generations.push(new);
        if let Some(p) = self.promoted {
            if !self.generations.iter().any(|g| g.slot == p) {
                self.promoted = None;
            }
        }
    }

    /// This host becomes the target at `epoch`, after having been the
    /// source or a target of an older epoch: what it held is no replica of
    /// anything at the new epoch (its VM wrote to it), so every generation
    /// and the pin are dropped; the high-water mark stays.
    pub fn become_target(&mut self, epoch: u64) {
        if self.epoch < epoch || self.role == Role::Source {
            self.generations.clear();
            self.promoted = None;
            self.writing = None;
        }
        self.epoch = epoch;
        self.role = Role::Target;
    }
}

/// `dir/slot-N`.
pub fn slot_dir(dir: &Path, slot: u32) -> PathBuf {
    dir.join(format!("slot-{slot}"))
}

/// `dir/slot-N/file`.
pub fn slot_file(dir: &Path, slot: u32, file: &str) -> PathBuf {
    slot_dir(dir, slot).join(file)
}

/// The file name of a disk in a slot: `<target>.<format>`.
pub fn disk_file(target: &str, format: DiskFormat) -> String {
    format!("{target}.{}", format.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gen(g: u64, slot: u32) -> SlotGeneration {
        SlotGeneration {
            generation: Generation(g),
            source_time: UnixMillis(1000 * g),
            slot,
            source_node: NodeId::new("node-a").unwrap(),
            consistency: Consistency::CrashConsistent,
            disks: vec![DiskRecord {
                target: "vda".into(),
                file: "vda.raw".into(),
                format: DiskFormat::Raw,
                bus: DiskBus::Virtio,
                read_only: false,
                size: 4096,
                checksum: format!("xxh128:{g:032x}"),
            }],
        }
    }

    /// Runs `n` cycles, checking after each that the slot written never
    /// held the newest or promoted generation.
    fn cycles(m: &mut Manifest, n: u64) -> Vec<u32> {
        let mut slots = Vec::new();
        for _ in 0..n {
            let g = m.high_water.next();
            let s = m.choose_slot();
            assert_ne!(Some(s), m.newest().map(|x| x.slot), "wrote the newest slot");
            assert_ne!(Some(s), m.promoted, "wrote the promoted slot");
            let before_newest = m.newest().cloned();
            m.begin(s, g);
            assert_eq!(
                m.newest().map(|x| x.generation),
                before_newest.map(|x| x.generation)
            );
            m.commit(gen(g.0, s));
            assert!(m.generations.len() <= 2);
            slots.push(s);
        }
        slots
    }

    #[test]
    fn two_slots_alternate() {
        let mut m = Manifest::new("web", 0, Role::Target);
        assert_eq!(cycles(&mut m, 5), [0, 1, 0, 1, 0]);
        let gens: Vec<u64> = m.generations.iter().map(|g| g.generation.0).collect();
        assert_eq!(gens, [4, 5]);
    }

    #[test]
    fn a_dead_cycle_leaves_the_newest_and_its_slot_is_reused() {
        let mut m = Manifest::new("web", 0, Role::Target);
        cycles(&mut m, 2);
        let s = m.choose_slot();
        assert_eq!(s, 0);
        m.begin(s, Generation(3));
        // Dies here: g1's slot is no longer listed, g2 is newest.
        assert_eq!(m.held(), "g2");
        assert_eq!(m.choose_slot(), 0);
        m.begin(0, Generation(4));
        m.commit(gen(4, 0));
        assert_eq!(m.held(), "g2, g4");
        let m2 = Manifest::parse(&m.to_json()).unwrap();
        assert_eq!(m2, m);
    }

    #[test]
    fn promoted_slot_is_never_written() {
        let mut m = Manifest::new("web", 0, Role::Target);
        cycles(&mut m, 2); // g1 in 0, g2 in 1
        m.promoted = Some(0); // promote the older g1
        let slots = cycles(&mut m, 4);
        assert!(!slots.contains(&0), "{slots:?}");
        assert!(
            m.get(Generation(1)).is_some(),
            "the promoted generation was dropped"
        );
        assert_eq!(m.generations.len(), 2);
        // Promoting the newest moves the pin; `cycles` checks it is not written.
        m.promoted = Some(m.newest().unwrap().slot);
        cycles(&mut m, 3);
        assert!(m.promoted.is_some());
    }

    #[test]
    fn becoming_target_drops_what_was_live() {
        let mut m = Manifest::new("web", 1, Role::Source);
        m.generations.push(gen(5, 1));
        m.high_water = Generation(5);
        m.promoted = Some(1);
        m.become_target(2);
        assert!(m.generations.is_empty());
        assert_eq!(m.promoted, None);
        assert_eq!(m.high_water, Generation(5));
        assert_eq!(m.role, Role::Target);
        // Same epoch, already target: nothing dropped.
        let mut t = Manifest::new("web", 2, Role::Target);
        t.generations.push(gen(6, 0));
        t.high_water = Generation(6);
        t.become_target(2);
        assert_eq!(t.held(), "g6");
    }

    #[test]
    fn corrupt_manifests_are_refused_with_the_reason() {
        assert!(Manifest::parse("{").unwrap_err().contains("EOF"));
        let mut m = Manifest::new("web", 0, Role::Target);
        m.high_water = Generation(3);
        m.generations = vec![gen(2, 0), gen(1, 1)];
        assert!(Manifest::parse(&m.to_json())
            .unwrap_err()
            .contains("increasing"));
        m.generations = vec![gen(1, 0), gen(2, 0)];
        assert!(Manifest::parse(&m.to_json())
            .unwrap_err()
            .contains("share a slot"));
        m.generations = vec![gen(1, 0)];
        m.writing = Some(Writing {
            slot: 0,
            generation: Generation(3),
        });
        assert!(Manifest::parse(&m.to_json())
            .unwrap_err()
            .contains("being written"));
        m.writing = None;
        m.high_water = Generation(0);
        assert!(Manifest::parse(&m.to_json())
            .unwrap_err()
            .contains("high-water"));
        let j = Manifest::new("web", 0, Role::Target)
            .to_json()
            .replace("\"format\": 1", "\"format\": 2");
        assert!(Manifest::parse(&j).unwrap_err().contains("format 2"));
        let j = Manifest::new("web", 0, Role::Target)
            .to_json()
            .replace("\"pair\"", "\"extra\": 1, \"pair\"");
        assert!(Manifest::parse(&j).unwrap_err().contains("unknown field"));
    }

    proptest::proptest! {
        /// Any text: a manifest or an error, never a panic.
        #[test]
        fn any_text_parses_or_fails(text in ".{0,300}") {
            let _ = Manifest::parse(&text);
        }
    }

    #[test]
    fn disk_specs_point_into_the_slot() {
        let g = gen(1, 1);
        let d = g.disk_specs(Path::new("/srv/r/web"));
        assert_eq!(d[0].path, PathBuf::from("/srv/r/web/slot-1/vda.raw"));
        assert_eq!(d[0].target, "vda");
        assert_eq!(disk_file("vdb", DiskFormat::Qcow2), "vdb.qcow2");
    }
}
