//! How a replicator is set up: the two [`Endpoint`]s of a pair and the
//! [`Options`] of its rsync runs.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use wspare_core::runner::{CommandRunner, SshTarget};
use wspare_core::NodeId;

use crate::error::RsyncError;

/// How rsync running on the *other* endpoint's host reaches this one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reach {
    /// Both endpoints are the same host: paths are used as they are (a
    /// local copy; rsync is told `--no-whole-file` so it still sends only
    /// deltas and writes only changed blocks).
    Local,
    /// Over ssh (`rsync -e ssh`), with the target's destination, port,
    /// identity and options. Key authentication only (`BatchMode=yes`).
    Ssh(SshTarget),
}

/// One end of a pair: a host, a way to run commands on it, how the other
/// end's rsync reaches it, and the directory that holds the replica slots
/// when it is the target.
#[derive(Clone)]
pub struct Endpoint {
    /// The host.
    pub node: NodeId,
    /// Runs commands on this host: [`wspare_core::runner::LocalRunner`]
    /// where the replicator runs on it, an
    /// [`wspare_core::runner::SshRunner`] otherwise.
    pub runner: Arc<dyn CommandRunner>,
    /// How the other host's rsync reaches this one.
    pub reach: Reach,
    /// Where replica slots, the manifest and test copies live when this
    /// host is the target: an absolute path of safe characters, one per
    /// pair, not shared with anything else.
    pub replica_dir: PathBuf,
}

impl fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Endpoint")
            .field("node", &self.node)
            .field("runner", &self.runner.describe())
            .field("reach", &self.reach)
            .field("replica_dir", &self.replica_dir)
            .finish()
    }
}

impl Endpoint {
    /// An endpoint.
    pub fn new(
        node: NodeId,
        runner: Arc<dyn CommandRunner>,
        reach: Reach,
        replica_dir: impl Into<PathBuf>,
    ) -> Self {
        Endpoint {
            node,
            runner,
            reach,
            replica_dir: replica_dir.into(),
        }
    }

    pub(crate) fn validate(&self) -> Result<(), RsyncError> {
        check_path("replica_dir", &self.replica_dir)?;
        if let Reach::Ssh(t) = &self.reach {
            if let Some(i) = &t.identity {
                check_path("ssh identity", i)?;
            }
            for o in &t.options {
                if o.is_empty()
                    || !o
                        .bytes()
                        .all(|b| b.is_ascii_graphic() && !b"'\"\\`$".contains(&b))
                {
                    return Err(RsyncError::InvalidInput(format!(
                        "ssh option {o:?} of {} is not allowed in rsync's -e command (no spaces or quotes)",
                        self.node
                    )));
                }
            }
        }
        Ok(())
    }
}

/// Tuning of the rsync runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Options {
    /// The rsync program on each host.
    pub rsync: String,
    /// Deadline of one disk's transfer (the process group is killed after
    /// it). Default 12 h.
    pub transfer_timeout: Duration,
    /// rsync's `--timeout`: it gives up when no data moves for this long.
    /// Default 120 s.
    pub io_timeout: Duration,
    /// Deadline of the small commands (manifest, stat, mkdir). Default 60 s.
    pub command_timeout: Duration,
    /// Deadline of local copies on one host (seeding a slot, test copies,
    /// checksums for verify). Default 6 h.
    pub copy_timeout: Duration,
    /// rsync's `--block-size` policy. Default [`BlockSize::Auto`].
    pub block_size: BlockSize,
    /// rsync's `--bwlimit` in KiB/s, to leave the link to the guests;
    /// `None` for no limit.
    pub bwlimit_kib: Option<u32>,
    /// Before each cycle, replace the slot's files by reflink clones of the
    /// newest generation's, where the target filesystem can clone (XFS,
    /// btrfs): the slot is then one generation behind instead of two, at no
    /// cost. Where it cannot (ext4), the clone fails at once and the cycle
    /// catches up two generations. Default true.
    pub reflink: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            rsync: "rsync".into(),
            transfer_timeout: Duration::from_secs(12 * 3600),
            io_timeout: Duration::from_secs(120),
            command_timeout: Duration::from_secs(60),
            copy_timeout: Duration::from_secs(6 * 3600),
            block_size: BlockSize::Auto,
            bwlimit_kib: None,
            reflink: true,
        }
    }
}

/// How the delta algorithm's block size is chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum BlockSize {
    /// 4 KiB, the block size guest filesystems write in, so that a guest's
    /// 4 KiB write costs 4 KiB of literal data rather than a whole rsync
    /// block (rsync's own choice is about the square root of the file
    /// size: 32 KiB for 1 GiB); larger for large images so that an image
    /// has at most 2^20 blocks (the sender's checksum table stays near
    /// 40 MiB), up to rsync's maximum of 128 KiB. See [`auto_block_size`].
    #[default]
    Auto,
    /// rsync's own choice.
    Rsync,
    /// A fixed size in bytes.
    Fixed(u32),
}

impl BlockSize {
    /// The `--block-size` for an image of `size` bytes; `None` to let rsync
    /// choose.
    pub fn for_size(self, size: u64) -> Option<u32> {
        match self {
            BlockSize::Auto => Some(auto_block_size(size)),
            BlockSize::Rsync => None,
            BlockSize::Fixed(b) => Some(b),
        }
    }
}

/// 4 KiB, doubled until an image of `size` bytes has at most 2^20 blocks,
/// at most 128 KiB.
pub fn auto_block_size(size: u64) -> u32 {
    let mut b: u32 = 4096;
    while b < 128 << 10 && size.div_ceil(u64::from(b)) > 1 << 20 {
        b *= 2;
    }
    b
}

/// Bytes allowed in paths that reach rsync and the remote shell: the
/// remote side parses them, so they are kept to a set that needs no
/// quoting anywhere.
fn safe_path_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"/._-+@%,=".contains(&b)
}

/// Checks that `p` is absolute, without `..`, and made of safe bytes.
pub(crate) fn check_path(what: &str, p: &Path) -> Result<(), RsyncError> {
    let s = p.to_str().unwrap_or("");
    let ok = s.starts_with('/')
        && s.len() > 1
        && s.bytes().all(safe_path_byte)
        && !s.split('/').any(|c| c == "..");
    if ok {
        Ok(())
    } else {
        Err(RsyncError::InvalidInput(format!(
            "{what} {p:?} must be an absolute path of letters, digits and / . _ - + @ % , = without `..`"
        )))
    }
}

/// Checks a name used as a file or directory name (a disk's slot, a test
/// copy label).
pub(crate) fn check_name(what: &str, s: &str) -> Result<(), RsyncError> {
    wspare_core::ids::validate_name(what, s)
        .map_err(|e| RsyncError::InvalidInput(e.message().to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_sizes() {
        assert_eq!(auto_block_size(0), 4096);
        assert_eq!(auto_block_size(1 << 30), 4096);
        assert_eq!(auto_block_size(4 << 30), 4096);
        assert_eq!(auto_block_size((4 << 30) + 1), 8192);
        assert_eq!(auto_block_size(100 << 30), 128 << 10);
        assert_eq!(auto_block_size(1 << 50), 128 << 10);
        assert_eq!(BlockSize::Rsync.for_size(1 << 30), None);
        assert_eq!(BlockSize::Fixed(700).for_size(1 << 30), Some(700));
    }

    #[test]
    fn paths_are_checked() {
        for ok in ["/srv/replicas/web", "/var/lib/wspare/a_b-c.d+1@x%2,y=3"] {
            check_path("p", Path::new(ok)).unwrap();
        }
        for bad in [
            "",
            "/",
            "relative/x",
            "/a/../b",
            "/a b",
            "/a;b",
            "/a$(id)",
            "/a'b",
            "/a\nb",
            "/a:b",
        ] {
            assert!(check_path("p", Path::new(bad)).is_err(), "{bad:?}");
        }
        assert!(check_name("label", "test-1").is_ok());
        assert!(check_name("label", "../x").is_err());
    }
}
