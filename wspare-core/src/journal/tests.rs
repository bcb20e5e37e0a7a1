use proptest::prelude::*;

use super::*;
use crate::generation::{Epoch, Generation, GenerationInfo};
use crate::ids::{ActionId, NodeId};
use crate::machine::{Op, Pending, Phase, Why};
use crate::time::UnixMillis;

fn snap(pair: &str, epoch: u64) -> Snapshot {
    Snapshot {
        pair: PairId::new(pair).unwrap(),
        local: NodeId::new("b").unwrap(),
        epoch: Epoch(epoch),
        active: NodeId::new("a").unwrap(),
        phase: Phase::Fencing {
            target: NodeId::new("a").unwrap(),
            attempt: 1,
            failover: true,
        },
        maintenance: false,
        test: None,
        next_id: 7,
        pending: vec![Pending {
            id: ActionId(6),
            op: Op::Fence {
                node: NodeId::new("a").unwrap(),
            },
            why: Why::Routine,
            held: false,
        }],
        newest: Some(GenerationInfo {
            generation: Generation(epoch + 3),
            source_time: UnixMillis(99),
        }),
        stale_floor: None,
        peer_lost: false,
        peer_receipt: None,
        needs_reverse: false,
        needs_initial: false,
        accept_data_loss: false,
    }
}

fn write_journal(dir: &Path, n: u64) -> (PathBuf, Vec<usize>) {
    let path = dir.join("journal");
    let (mut j, _) = Journal::open(&path, u64::MAX).unwrap();
    let mut bounds = vec![0];
    for i in 0..n {
        j.persist(&[snap(if i % 2 == 0 { "web" } else { "db" }, i)])
            .unwrap();
        bounds.push(std::fs::metadata(&path).unwrap().len() as usize);
    }
    (path, bounds)
}

#[test]
fn round_trip_keeps_the_newest_snapshot_per_pair() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = write_journal(dir.path(), 5);
    let (_, loaded) = Journal::open(&path, u64::MAX).unwrap();
    assert_eq!(loaded.records, 5);
    assert_eq!(loaded.torn_tail, None);
    assert_eq!(loaded.snapshots.len(), 2);
    assert_eq!(
        loaded.snapshots[&PairId::new("web").unwrap()],
        snap("web", 4)
    );
    assert_eq!(loaded.snapshots[&PairId::new("db").unwrap()], snap("db", 3));
}

#[test]
fn removed_pairs_stay_removed() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = write_journal(dir.path(), 3);
    let (mut j, _) = Journal::open(&path, u64::MAX).unwrap();
    j.remove(&PairId::new("db").unwrap()).unwrap();
    let (_, loaded) = Journal::open(&path, u64::MAX).unwrap();
    assert_eq!(
        loaded
            .snapshots
            .keys()
            .map(|p| p.as_str())
            .collect::<Vec<_>>(),
        ["web"]
    );
}

#[test]
fn compaction_is_atomic_and_keeps_the_state() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("journal");
    let (mut j, _) = Journal::open(&path, 4096).unwrap();
    for i in 0..200 {
        j.persist(&[snap("web", i), snap("db", i)]).unwrap();
    }
    let size = std::fs::metadata(&path).unwrap().len();
    assert!(size <= 4096 + 2 * 1024, "compacted: {size}");
    assert!(!path.with_extension("compact").exists());
    let (_, loaded) = Journal::open(&path, 4096).unwrap();
    assert_eq!(
        loaded.snapshots[&PairId::new("web").unwrap()],
        snap("web", 199)
    );
    assert_eq!(
        loaded.snapshots[&PairId::new("db").unwrap()],
        snap("db", 199)
    );
}

#[test]
fn a_torn_tail_is_cut_off_and_appends_continue() {
    let dir = tempfile::tempdir().unwrap();
    let (path, bounds) = write_journal(dir.path(), 3);
    let cut = bounds[2] + 10;
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..cut]).unwrap();
    let (mut j, loaded) = Journal::open(&path, u64::MAX).unwrap();
    assert_eq!(loaded.torn_tail, Some(bounds[2] as u64));
    assert_eq!(loaded.records, 2);
    j.persist(&[snap("web", 9)]).unwrap();
    let (_, again) = Journal::open(&path, u64::MAX).unwrap();
    assert_eq!(again.torn_tail, None);
    assert_eq!(
        again.snapshots[&PairId::new("web").unwrap()],
        snap("web", 9)
    );
    assert_eq!(again.snapshots[&PairId::new("db").unwrap()], snap("db", 1));
}

#[test]
fn corruption_names_the_file_and_offset() {
    let dir = tempfile::tempdir().unwrap();
    let (path, bounds) = write_journal(dir.path(), 3);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[bounds[1] + 40] ^= 0x20;
    std::fs::write(&path, &bytes).unwrap();
    let e = Journal::open(&path, u64::MAX).err().unwrap();
    assert_eq!(
        e.to_string(),
        format!(
            "journal {} is corrupt at byte {}: payload checksum mismatch in a frame of {} bytes; it was not loaded (move it aside only if you accept losing the pairs' state)",
            path.display(),
            bounds[1],
            bounds[2] - bounds[1] - 16
        )
    );
    assert_eq!(crate::Error::from(e).kind(), ErrorKind::InvalidInput);
}

#[test]
fn garbage_is_corrupt_not_empty() {
    let p = Path::new("/j");
    let e = parse(p, b"{\"hello\": 1}\n").unwrap_err();
    assert!(
        e.to_string().contains("corrupt at byte 0: bad frame magic"),
        "{e}"
    );
    let e = parse(p, b"xy").unwrap_err();
    assert!(e.to_string().contains("bad frame magic"), "{e}");
    // A frame whose JSON is not an entry.
    let payload = b"[1,2]";
    let mut f = Vec::new();
    f.extend_from_slice(MAGIC);
    f.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    let h = crc32fast::hash(&f[..8]);
    f.extend_from_slice(&h.to_le_bytes());
    f.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    f.extend_from_slice(payload);
    assert!(parse(p, &f)
        .unwrap_err()
        .to_string()
        .contains("record does not parse"));
}

#[test]
fn sequence_out_of_order_is_corrupt() {
    let mut bytes = frame(&Entry::Snapshot {
        seq: 2,
        snapshot: Box::new(snap("web", 1)),
    });
    bytes.extend(frame(&Entry::Snapshot {
        seq: 2,
        snapshot: Box::new(snap("web", 2)),
    }));
    let e = parse(Path::new("/j"), &bytes).unwrap_err();
    assert!(e.to_string().contains("sequence 2 follows 2"), "{e}");
}

#[test]
fn a_missing_journal_is_empty() {
    let dir = tempfile::tempdir().unwrap();
    let (_, loaded) = Journal::open(dir.path().join("none"), u64::MAX).unwrap();
    assert_eq!(loaded, Loaded::default());
}

#[test]
fn an_unreadable_journal_is_an_io_error_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let e = Journal::open(dir.path(), u64::MAX).err().unwrap();
    assert!(
        e.to_string()
            .starts_with(&format!("journal {}: read failed", dir.path().display())),
        "{e}"
    );
}

/// Every cut and every single-byte flip of a journal either loads a
/// consistent prefix (cuts) or is a named error (flips).
#[test]
fn every_cut_loads_a_prefix_and_every_flip_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let (path, bounds) = write_journal(dir.path(), 4);
    let bytes = std::fs::read(&path).unwrap();
    let full = parse(&path, &bytes).unwrap();
    for cut in 0..bytes.len() {
        let l = parse(&path, &bytes[..cut]).unwrap_or_else(|e| panic!("cut at {cut}: {e}"));
        let whole = bounds.iter().filter(|b| **b <= cut).count() as u64 - 1;
        assert_eq!(l.records, whole, "cut at {cut}");
        assert_eq!(
            l.torn_tail.is_some(),
            !bounds.contains(&cut),
            "cut at {cut}"
        );
    }
    for i in 0..bytes.len() {
        for bit in [0x01u8, 0x80] {
            let mut b = bytes.clone();
            b[i] ^= bit;
            match parse(&path, &b) {
                Err(JournalError::Corrupt { offset, .. }) => {
                    let frame_start = *bounds.iter().rfind(|s| **s <= i).unwrap() as u64;
                    assert!(offset <= frame_start, "flip at {i} reported at {offset}");
                }
                Err(e) => panic!("flip at {i}: {e}"),
                Ok(l) => panic!(
                    "flip at {i} loaded {} records (full has {})",
                    l.records, full.records
                ),
            }
        }
    }
}

proptest! {
    /// Random contents round-trip, and random damage is either a prefix or
    /// an error, never a different state.
    #[test]
    fn random_damage_never_yields_a_different_state(
        epochs in prop::collection::vec(0u64..50, 1..8),
        cut in any::<prop::sample::Index>(),
        flip in any::<prop::sample::Index>(),
        mask in 1u8..=255,
    ) {
        let mut bytes = Vec::new();
        for (i, e) in epochs.iter().enumerate() {
            bytes.extend(frame(&Entry::Snapshot { seq: i as u64 + 1, snapshot: Box::new(snap("web", *e)) }));
        }
        let p = Path::new("/j");
        let full = parse(p, &bytes).unwrap();
        prop_assert_eq!(full.snapshots[&PairId::new("web").unwrap()].epoch, Epoch(*epochs.last().unwrap()));
        let c = cut.index(bytes.len() + 1);
        let prefix = parse(p, &bytes[..c]).unwrap();
        if let Some(s) = prefix.snapshots.get(&PairId::new("web").unwrap()) {
            prop_assert_eq!(s.epoch, Epoch(epochs[prefix.records as usize - 1]));
        }
        let mut damaged = bytes.clone();
        damaged[flip.index(bytes.len())] ^= mask;
        prop_assert!(parse(p, &damaged).is_err());
    }
}
