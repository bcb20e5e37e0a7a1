//! # wspare-rsync
//!
//! A [`Replicator`](wspare_core::Replicator) for VM disk image files (raw,
//! qcow2) over the real `rsync`, run through the core's
//! [`CommandRunner`](wspare_core::runner::CommandRunner): the warm spare of
//! the simplest kind. The spare host keeps copies of the VM's images,
//! refreshed by one cycle at a time, and the spare VM starts from the
//! newest *complete* copy when the primary dies.
//!
//! ## Never a torn replica: slots and the manifest
//!
//! rsync `--inplace` writes changed blocks into the existing file, which is
//! what makes it cheap, and what leaves a half-old, half-new file when it is
//! killed. So a cycle never writes the copy the spare would start from.
//! On the target host, one directory per pair holds:
//!
//! ```text
//! <replica_dir>/MANIFEST          the generation manifest (JSON)
//! <replica_dir>/slot-0/vda.raw    one complete generation ...
//! <replica_dir>/slot-1/vda.raw    ... and the other (or the slot being written)
//! <replica_dir>/tests/<label>/    test failover copies
//! ```
//!
//! The [`manifest::Manifest`] lists the complete generations (number,
//! source point in time, slot, source node, consistency, and per disk its
//! file, format, size and `xxh128` whole-file checksum), the slot being
//! written, the promoted slot, the direction epoch and role, and the
//! highest generation number given out. It is only ever replaced whole:
//! written to `MANIFEST.tmp` with `dd conv=fsync`, renamed over `MANIFEST`,
//! and the directory fsynced.
//!
//! A cycle:
//!
//! 1. stats the source images (a missing one fails with `NotFound` before
//!    anything is touched);
//! 2. reads both manifests and checks the direction (below);
//! 3. picks the slot: never the newest generation's, never the promoted
//!    one; a slot a dead cycle left behind first;
//! 4. switches the manifest to say that slot is being written, so its old
//!    generation stops being listed *before* a byte of it changes;
//! 5. seeds the slot by a local sparse copy of the newest generation if it
//!    has no file yet, so that rsync always sends a delta; where the target
//!    filesystem has reflinks (XFS, btrfs), replaces the slot's files by
//!    clones of the newest generation's ([`Options::reflink`]), so that the
//!    slot starts one generation behind instead of two;
//! 6. runs rsync per disk (see [`transfer::BASE_ARGS`] for the options and
//!    why), which verifies its result with the whole-file checksum, prints
//!    it (`%C`), and fsyncs the file;
//! 7. fsyncs the slot directory and switches the manifest to list the new
//!    generation: only now, with every disk done, is it complete.
//!
//! A cycle that fails at any point, or whose future is dropped (the runner
//! kills rsync's whole process group), leaves the manifest listing the
//! previous newest generation, whose slot was not touched. `promote`
//! returns the disks of a listed generation only, so the slot being written
//! is never used. Two generations are kept (two recovery points), except
//! during a cycle, when the slot being written holds none.
//!
//! **Cost.** The slot a cycle writes holds the generation *before* the
//! newest, so it catches up two generations of changes where a bare
//! `rsync --inplace` of the same file catches up one: twice the literal
//! data, and rsync's sender rolls its checksum byte by byte through every
//! literal region, which is most of its CPU time. Measured on a 1 GiB image
//! with 1 % of its 4 KiB blocks rewritten per cycle (`cargo bench -p
//! wspare-rsync --bench vs_rsync`, 2 cores shared with other work): at
//! equal rsync options a cycle takes about 1.4 times a bare rsync. Two
//! choices win part of it back: a 4 KiB delta block
//! ([`config::BlockSize::Auto`]: guest filesystems write 4 KiB blocks, so
//! a guest's write costs 4 KiB of literal data, not a 32 KiB rsync block;
//! larger for images over 4 GiB so that an image has at most 2^20 blocks),
//! and `--sparse` only on a slot's first copy (it makes rsync scan every
//! block for zeros). Against a bare `rsync --inplace --no-whole-file` with
//! rsync's own block size, a cycle on ext4 then takes 1.1 to 1.3 times as
//! long (median of 5 rounds: 1.10, 1.18, 1.27, 1.32 in four runs; CPU 1.02
//! to 1.19), including the `--fsync` that makes a generation durable, and
//! sends a quarter of the bytes. What removes the rest is bringing the slot up to
//! the newest generation before rsync runs, copying only what the last
//! cycle changed: on XFS or btrfs a reflink clone of the newest slot does
//! that at no cost, and cycles do it ([`Options::reflink`]; the test
//! `reflink_clones_make_the_slot_one_generation_behind` shows the literal
//! data halve on a loop-mounted XFS, and the benchmark there gives 0.82 of
//! a bare rsync, sending what a bare rsync with 4 KiB blocks sends). On ext4 it would need the changed
//! ranges, which rsync reports only through its per-block debug output
//! (megabytes per GiB) and a hypervisor could report through dirty bitmaps
//! (libvirt checkpoints), a capability the `Hypervisor` trait does not have
//! yet.
//!
//! ## Who runs rsync where
//!
//! rsync runs on the **source** host and pushes to the target (`rsync -e
//! ssh ... host:path`, or a plain local path when both ends are one host).
//! The source host holds the frozen images, and its hypervisor freezes and
//! releases them around the cycle, so the host that drives the cycle (the
//! active host, in the reference setup with an agent on each host) also
//! reads the images locally; the target needs only sshd and rsync. Every
//! other command (manifest, stat, mkdir, seed copies, checksums) runs on the
//! host it concerns through that [`config::Endpoint`]'s runner: a
//! `LocalRunner` on the host the replicator runs on, an `SshRunner` for the
//! other. After [`reverse`](wspare_core::Replicator::reverse) the roles of
//! the endpoints swap, so rsync then runs on the former spare, pushing back.
//!
//! ## Direction, failback and stale primaries
//!
//! Each manifest carries a direction *epoch* and the host's *role* at it.
//! `reverse` takes the next epoch, writes it to the old target (now the
//! source, role `source`: its VM runs from the promoted slot) and, if it
//! can be reached, to the old source (role `target`, its generations
//! dropped). A cycle refuses with `Conflict` to write into a host whose
//! manifest says it is the source at the current epoch, or whose epoch is
//! newer than the replicator's: a stale replicator (or a stale config
//! after a failover) can never copy an old primary over the new active
//! copy. A host that becomes a target again drops what it held (its VM
//! wrote to it), and every new generation number is larger than the
//! high-water mark of both manifests, so a stale old primary is only ever
//! overwritten by a newer generation. Failback: after the spare took over,
//! `promote` (the spare starts from the returned disks), `reverse`, cycles
//! back to the old primary while the spare runs (its hypervisor freezes the
//! promoted slot's images), then for the switchover a final cycle with the
//! spare stopped, `verify` against the stopped source, `promote` on the old
//! primary, start there, `reverse` again.
//!
//! ## Consistency
//!
//! The replicator never reads a running VM's images:
//! [`SourceView::Continuous`](wspare_core::SourceView::Continuous) is refused
//! with `InvalidInput`. A cycle copies either a stopped VM's files or a
//! freeze obtained through the `Hypervisor` trait (with libvirt, an
//! external disk-only snapshot for the length of the cycle, then a block
//! commit). Every disk of one generation comes from the same instant, so a
//! generation is **crash consistent**: as if the power cord had been pulled
//! at the source point in time. Journaled filesystems (ext4, XFS, NTFS)
//! replay their journal on boot; databases with a write-ahead log
//! (PostgreSQL, InnoDB, SQLite in WAL mode) recover to their last committed
//! transaction; data an application had not yet written or fsynced is lost,
//! as are non-journaled filesystems' recent metadata. When the guest agent
//! quiesced the filesystems for the freeze, the generation records
//! `application-consistent` in the manifest (filesystems clean, no replay).
//! Images must be standalone: a qcow2 with a backing file is copied without
//! its backing chain.
//!
//! ## Faults
//!
//! | fault | error kind | what is left |
//! |---|---|---|
//! | rsync killed mid-transfer | `Backend` (retryable) | newest generation intact, next cycle redoes the slot |
//! | target filesystem full | `Backend` (not retryable), names host and directory | same |
//! | source image missing | `NotFound`, names host and path | nothing written |
//! | target host unreachable | `Unreachable` | same |
//! | credentials refused | `PermissionDenied` | same |
//! | deadline or rsync I/O timeout | `Timeout` | same |
//! | copy altered (verify) | `Conflict`, names disk and checksums | the generation stays listed; verify tells |
//! | stale direction, another pair's directory | `Conflict` | nothing written |
//!
//! ## Test failover
//!
//! `test_copy(g, label)` copies generation `g`'s images (sparse, reflinked
//! where the filesystem can) to `tests/<label>/` on the target; a test VM
//! started from them writes nothing the replica or later cycles see.
//! `discard_test_copy` removes them.
//!
//! ## Using it
//!
//! ```no_run
//! use std::sync::Arc;
//! use wspare_core::runner::{LocalRunner, SshRunner, SshTarget};
//! use wspare_core::{NodeId, Replicator};
//! use wspare_rsync::{Endpoint, Options, Reach, RsyncReplicator};
//!
//! # fn main() -> wspare_core::Result<()> {
//! let mut b_ssh = SshTarget::new("root@node-b")?;
//! b_ssh.identity = Some("/etc/wspare/id_ed25519".into());
//! let mut a_ssh = SshTarget::new("root@node-a")?;
//! a_ssh.identity = Some("/etc/wspare/id_ed25519".into());
//! // This process runs on node-a, the active host.
//! let a = Endpoint::new(NodeId::new("node-a")?, Arc::new(LocalRunner), Reach::Ssh(a_ssh), "/srv/wspare/web");
//! let b = Endpoint::new(
//!     NodeId::new("node-b")?,
//!     Arc::new(SshRunner::new(b_ssh.clone())),
//!     Reach::Ssh(b_ssh),
//!     "/srv/wspare/web",
//! );
//! let replicator: Arc<dyn Replicator> = Arc::new(RsyncReplicator::new("web", a, b, Options::default())?);
//! # let _ = replicator;
//! # Ok(())
//! # }
//! ```

pub mod config;
pub mod direction;
pub mod error;
mod host;
pub mod manifest;
pub mod parse;
mod replicator;
pub mod transfer;

pub use config::{BlockSize, Endpoint, Options, Reach};
pub use direction::{direction, read_direction, read_manifest, Direction};
pub use error::RsyncError;
pub use replicator::{test_dir, CycleStats, RsyncReplicator, CAPS};
