//! The journal: machine snapshots made durable before their actions run.
//!
//! An append-only file of framed records. Each frame is
//!
//! ```text
//! magic "WSJ1" (4) | payload length u32 LE | header crc32 (of the 8 bytes before)
//! | payload crc32 | payload (JSON of one Entry)
//! ```
//!
//! - Appends are written whole, then `fsync`ed, before the driver runs the
//!   actions they describe.
//! - Loading keeps the newest snapshot per pair. A frame cut short at the
//!   end of the file is a crash during an append: the actions it describes
//!   never ran, so the prefix before it is consistent; it is reported in
//!   [`Loaded::torn_tail`] and cut off before the next append.
//! - Anything else that does not check out (a bad magic, a header or payload
//!   checksum mismatch, JSON that does not parse, sequence numbers out of
//!   order) is an error naming the file and the byte offset. Never a silent
//!   reset.
//! - When the file grows past a threshold it is compacted: the newest
//!   snapshots go to a temporary file, which is fsynced, renamed over the
//!   journal, and the directory fsynced.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{BackendError, ErrorKind};
use crate::ids::PairId;
use crate::machine::Snapshot;

const MAGIC: &[u8; 4] = b"WSJ1";
const HEADER: usize = 16;
/// Frames larger than this are refused on load as corrupt (a snapshot is a
/// few KiB).
pub const MAX_FRAME: u32 = 16 << 20;

/// One journal record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Entry {
    /// A machine's state.
    Snapshot {
        /// Increases by one per record.
        seq: u64,
        /// The state.
        snapshot: Box<Snapshot>,
    },
    /// A pair was removed from the config.
    Removed {
        /// Increases by one per record.
        seq: u64,
        /// The pair.
        pair: PairId,
    },
}

impl Entry {
    fn seq(&self) -> u64 {
        match self {
            Entry::Snapshot { seq, .. } | Entry::Removed { seq, .. } => *seq,
        }
    }
}

/// What the journal holds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Loaded {
    /// Newest snapshot per pair.
    pub snapshots: BTreeMap<PairId, Snapshot>,
    /// Offset of an incomplete final frame, if the last append was cut short.
    pub torn_tail: Option<u64>,
    /// Records read.
    pub records: u64,
}

/// A journal that cannot be read or written.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// The content does not check out.
    #[error("journal {path} is corrupt at byte {offset}: {what}; it was not loaded (move it aside only if you accept losing the pairs' state)")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// Where the bad frame starts.
        offset: u64,
        /// What is wrong.
        what: String,
    },
    /// Reading or writing failed.
    #[error("journal {path}: {op} failed: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What was being done.
        op: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

impl BackendError for JournalError {
    fn kind(&self) -> ErrorKind {
        match self {
            JournalError::Corrupt { .. } => ErrorKind::InvalidInput,
            JournalError::Io { .. } => ErrorKind::Backend,
        }
    }
    fn retryable(&self) -> bool {
        false
    }
}

/// Parses a journal's bytes (the pure half of [`Journal::open`]).
pub fn parse(path: &Path, bytes: &[u8]) -> Result<Loaded, JournalError> {
    let corrupt = |offset: usize, what: String| JournalError::Corrupt {
        path: path.to_path_buf(),
        offset: offset as u64,
        what,
    };
    let mut loaded = Loaded::default();
    let mut off = 0usize;
    let mut last_seq: Option<u64> = None;
    while off < bytes.len() {
        let rest = &bytes[off..];
        if rest.len() < HEADER {
            // Only a torn append leaves a partial header, and then what is
            // there must be the start of a valid one.
            if !MAGIC.starts_with(&rest[..rest.len().min(4)]) {
                return Err(corrupt(off, "bad frame magic".into()));
            }
            loaded.torn_tail = Some(off as u64);
            break;
        }
        if &rest[..4] != MAGIC {
            return Err(corrupt(off, format!("bad frame magic {:02x?}", &rest[..4])));
        }
        let len = u32::from_le_bytes(rest[4..8].try_into().expect("4 bytes"));
        let hcrc = u32::from_le_bytes(rest[8..12].try_into().expect("4 bytes"));
        if crc32fast::hash(&rest[..8]) != hcrc {
            return Err(corrupt(off, "frame header checksum mismatch".into()));
        }
        if len > MAX_FRAME {
            return Err(corrupt(
                off,
                format!("frame of {len} bytes is larger than {MAX_FRAME}"),
            ));
        }
        let pcrc = u32::from_le_bytes(rest[12..16].try_into().expect("4 bytes"));
        let end = HEADER + len as usize;
        if rest.len() < end {
            loaded.torn_tail = Some(off as u64);
            break;
        }
        let payload = &rest[HEADER..end];
        if crc32fast::hash(payload) != pcrc {
            return Err(corrupt(
                off,
                format!("payload checksum mismatch in a frame of {len} bytes"),
            ));
        }
        let entry: Entry = serde_json::from_slice(payload)
            .map_err(|e| corrupt(off, format!("record does not parse: {e}")))?;
        if let Some(prev) = last_seq {
            if entry.seq() <= prev {
                return Err(corrupt(
                    off,
                    format!("sequence {} follows {prev}", entry.seq()),
                ));
            }
        }
        last_seq = Some(entry.seq());
        match entry {
            Entry::Snapshot { snapshot, .. } => {
                loaded.snapshots.insert(snapshot.pair.clone(), *snapshot);
            }
            Entry::Removed { pair, .. } => {
                loaded.snapshots.remove(&pair);
            }
        }
        loaded.records += 1;
        off += end;
    }
    Ok(loaded)
}

/// The journal's bytes; none if there is no file yet.
fn read(path: &Path) -> Result<Vec<u8>, JournalError> {
    let io = |op, source| JournalError::Io {
        path: path.to_path_buf(),
        op,
        source,
    };
    let mut bytes = Vec::new();
    match File::open(path) {
        Ok(mut f) => {
            f.read_to_end(&mut bytes).map_err(|e| io("read", e))?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io("open", e)),
    }
    Ok(bytes)
}

/// Frames one entry.
pub fn frame(entry: &Entry) -> Vec<u8> {
    let payload = serde_json::to_vec(entry).expect("journal entries serialize");
    let mut out = Vec::with_capacity(HEADER + payload.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    let hcrc = crc32fast::hash(&out[..8]);
    out.extend_from_slice(&hcrc.to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
    out
}

/// Where the driver keeps snapshots: the file journal, or memory (tests and
/// the simulator, whose "crash" keeps what was persisted).
pub trait Store: Send {
    /// Makes these snapshots durable, all or none, before returning.
    fn persist(&mut self, snapshots: &[Snapshot]) -> Result<(), JournalError>;
    /// Forgets a pair.
    fn remove(&mut self, pair: &PairId) -> Result<(), JournalError>;
    /// What was persisted.
    fn load(&mut self) -> Result<Loaded, JournalError>;
}

/// A store shared with its owner: the simulator keeps a handle, so what a
/// "crashed" driver journaled is there for the next one.
impl<S: Store> Store for std::sync::Arc<std::sync::Mutex<S>> {
    fn persist(&mut self, snapshots: &[Snapshot]) -> Result<(), JournalError> {
        self.lock().expect("store lock").persist(snapshots)
    }
    fn remove(&mut self, pair: &PairId) -> Result<(), JournalError> {
        self.lock().expect("store lock").remove(pair)
    }
    fn load(&mut self) -> Result<Loaded, JournalError> {
        self.lock().expect("store lock").load()
    }
}

/// An in-memory [`Store`].
#[derive(Clone, Debug, Default)]
pub struct MemoryStore {
    snapshots: BTreeMap<PairId, Snapshot>,
    /// How many persist calls ran.
    pub writes: u64,
}

impl Store for MemoryStore {
    fn persist(&mut self, snapshots: &[Snapshot]) -> Result<(), JournalError> {
        for s in snapshots {
            self.snapshots.insert(s.pair.clone(), s.clone());
        }
        self.writes += 1;
        Ok(())
    }
    fn remove(&mut self, pair: &PairId) -> Result<(), JournalError> {
        self.snapshots.remove(pair);
        Ok(())
    }
    fn load(&mut self) -> Result<Loaded, JournalError> {
        Ok(Loaded {
            snapshots: self.snapshots.clone(),
            torn_tail: None,
            records: self.snapshots.len() as u64,
        })
    }
}

/// The file journal.
pub struct Journal {
    path: PathBuf,
    file: Option<File>,
    seq: u64,
    size: u64,
    live: BTreeMap<PairId, Snapshot>,
    compact_at: u64,
}

impl Journal {
    /// Opens (or creates) the journal at `path`. Compacts when the file
    /// passes `compact_at` bytes.
    pub fn open(
        path: impl Into<PathBuf>,
        compact_at: u64,
    ) -> Result<(Journal, Loaded), JournalError> {
        let path = path.into();
        let bytes = read(&path)?;
        let loaded = parse(&path, &bytes)?;
        let valid = loaded.torn_tail.unwrap_or(bytes.len() as u64);
        if let Some(off) = loaded.torn_tail {
            tracing::warn!(journal = %path.display(), offset = off, "journal ends in an incomplete record (a crash during an append); cutting it off");
        }
        let mut j = Journal {
            seq: loaded.records,
            size: valid,
            live: loaded.snapshots.clone(),
            compact_at,
            file: None,
            path,
        };
        if loaded.torn_tail.is_some() || j.size > j.compact_at {
            j.compact()?;
        }
        Ok((j, loaded))
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn io(&self, op: &'static str) -> impl Fn(std::io::Error) -> JournalError + '_ {
        move |source| JournalError::Io {
            path: self.path.clone(),
            op,
            source,
        }
    }

    fn append(&mut self, entries: &[Entry]) -> Result<(), JournalError> {
        let mut buf = Vec::new();
        for e in entries {
            buf.extend_from_slice(&frame(e));
        }
        if self.file.is_none() {
            let f = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)
                .map_err(self.io("open for append"))?;
            self.file = Some(f);
        }
        let f = self.file.as_mut().expect("opened above");
        let r = f.write_all(&buf).and_then(|_| f.sync_data());
        r.map_err(self.io("append"))?;
        self.size += buf.len() as u64;
        if self.size > self.compact_at {
            self.compact()?;
        }
        Ok(())
    }

    /// Rewrites the journal with only the newest snapshots, atomically.
    pub fn compact(&mut self) -> Result<(), JournalError> {
        let tmp = self.path.with_extension("compact");
        let mut buf = Vec::new();
        let mut seq = 0;
        for s in self.live.values() {
            seq += 1;
            buf.extend_from_slice(&frame(&Entry::Snapshot {
                seq,
                snapshot: Box::new(s.clone()),
            }));
        }
        let mut f = File::create(&tmp).map_err(self.io("create compacted journal"))?;
        f.write_all(&buf)
            .and_then(|_| f.sync_all())
            .map_err(self.io("write compacted journal"))?;
        std::fs::rename(&tmp, &self.path).map_err(self.io("rename compacted journal"))?;
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(self.io("fsync journal directory"))?;
        }
        self.file = None;
        self.seq = seq;
        self.size = buf.len() as u64;
        Ok(())
    }
}

impl Store for Journal {
    fn persist(&mut self, snapshots: &[Snapshot]) -> Result<(), JournalError> {
        let mut entries = Vec::with_capacity(snapshots.len());
        for s in snapshots {
            self.seq += 1;
            entries.push(Entry::Snapshot {
                seq: self.seq,
                snapshot: Box::new(s.clone()),
            });
        }
        self.append(&entries)?;
        for s in snapshots {
            self.live.insert(s.pair.clone(), s.clone());
        }
        Ok(())
    }

    fn remove(&mut self, pair: &PairId) -> Result<(), JournalError> {
        self.seq += 1;
        self.append(&[Entry::Removed {
            seq: self.seq,
            pair: pair.clone(),
        }])?;
        self.live.remove(pair);
        Ok(())
    }

    fn load(&mut self) -> Result<Loaded, JournalError> {
        parse(&self.path, &read(&self.path)?)
    }
}

#[cfg(test)]
mod tests;
