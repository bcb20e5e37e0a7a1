//! [`RsyncError`]: what goes wrong, mapped onto the core's error kinds, and
//! the classification of a failed rsync (pure: from its exit status and
//! stderr).

use std::path::PathBuf;
use std::time::Duration;

use wspare_core::runner::CommandError;
use wspare_core::{BackendError, ErrorKind, Generation, NodeId};

/// Errors of the rsync replicator. Converts into [`wspare_core::Error`]
/// with `?`.
#[derive(Debug, thiserror::Error)]
pub enum RsyncError {
    /// A source disk image does not exist.
    #[error("source disk {} does not exist on {node}", path.display())]
    SourceMissing {
        /// The source host.
        node: NodeId,
        /// The image.
        path: PathBuf,
    },
    /// A host could not be reached (ssh failed to connect, the connection
    /// dropped).
    #[error("{node} is unreachable: {detail}")]
    Unreachable {
        /// The host.
        node: NodeId,
        /// ssh's or rsync's words.
        detail: String,
    },
    /// Credentials were refused.
    #[error("permission denied on {node}: {detail}")]
    PermissionDenied {
        /// The host.
        node: NodeId,
        /// The tool's words.
        detail: String,
    },
    /// The target filesystem ran out of space (or quota) during the cycle.
    #[error("target filesystem on {node} is full (replica directory {}): {detail}", dir.display())]
    TargetFull {
        /// The target host.
        node: NodeId,
        /// The replica directory.
        dir: PathBuf,
        /// rsync's words.
        detail: String,
    },
    /// rsync was killed by a signal (or interrupted) mid-transfer.
    #[error("rsync of disk {disk} was killed mid-transfer ({detail})")]
    Killed {
        /// The disk slot.
        disk: String,
        /// Exit status and stderr.
        detail: String,
    },
    /// A command passed its deadline (or rsync's I/O timeout).
    #[error("{what} did not finish within {after:?}: {detail}")]
    Timeout {
        /// What was running.
        what: String,
        /// The deadline.
        after: Duration,
        /// The tool's words.
        detail: String,
    },
    /// A copy does not match its recorded checksum, or the source no
    /// longer matches the generation.
    #[error("checksum mismatch for disk {disk} of {generation} on {node}: expected {expected}, found {found}")]
    ChecksumMismatch {
        /// The host holding the file checked.
        node: NodeId,
        /// The generation.
        generation: Generation,
        /// The disk slot.
        disk: String,
        /// The recorded checksum.
        expected: String,
        /// What the file holds now.
        found: String,
    },
    /// The target does not hold this generation.
    #[error("generation {generation} is not held on {node} (held: {held})")]
    NoSuchGeneration {
        /// The target host.
        node: NodeId,
        /// The generation asked for.
        generation: Generation,
        /// What it holds.
        held: String,
    },
    /// The replicator's direction or epoch contradicts what a host's
    /// manifest says (a stale instance after a failover, a replica
    /// directory of another pair).
    #[error("{0}")]
    Conflict(String),
    /// A manifest cannot be read.
    #[error("manifest {} on {node} is corrupt: {reason}", path.display())]
    CorruptManifest {
        /// The host.
        node: NodeId,
        /// The manifest file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The request is wrong (a continuous source view, a hostile path or
    /// label, a disk list that does not fit).
    #[error("{0}")]
    InvalidInput(String),
    /// The installed rsync cannot do what is needed.
    #[error("{0}")]
    Unsupported(String),
    /// `stop` ended the cycle.
    #[error("the sync cycle was stopped by stop(); the last complete generation is intact")]
    Stopped,
    /// Any other failure of a command.
    #[error("{context}: {source}")]
    Command {
        /// What was being done.
        context: String,
        /// The command's failure (argv, exit status, stderr tail).
        #[source]
        source: CommandError,
    },
}

impl BackendError for RsyncError {
    fn kind(&self) -> ErrorKind {
        match self {
            RsyncError::SourceMissing { .. } | RsyncError::NoSuchGeneration { .. } => {
                ErrorKind::NotFound
            }
            RsyncError::Unreachable { .. } => ErrorKind::Unreachable,
            RsyncError::PermissionDenied { .. } => ErrorKind::PermissionDenied,
            RsyncError::Timeout { .. } => ErrorKind::Timeout,
            RsyncError::ChecksumMismatch { .. } | RsyncError::Conflict(_) | RsyncError::Stopped => {
                ErrorKind::Conflict
            }
            RsyncError::InvalidInput(_) => ErrorKind::InvalidInput,
            RsyncError::Unsupported(_) => ErrorKind::Unsupported,
            RsyncError::TargetFull { .. }
            | RsyncError::Killed { .. }
            | RsyncError::CorruptManifest { .. } => ErrorKind::Backend,
            RsyncError::Command { source, .. } => source.kind(),
        }
    }

    fn retryable(&self) -> bool {
        match self {
            // Space must be freed, or the manifest repaired, first.
            RsyncError::TargetFull { .. } | RsyncError::CorruptManifest { .. } => false,
            RsyncError::Killed { .. } | RsyncError::Stopped => true,
            RsyncError::Command { source, .. } => source.retryable(),
            e => e.kind().default_retryable(),
        }
    }
}

/// What a failed command's stderr says, for classification.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Symptom {
    /// No space left on device, quota exceeded.
    NoSpace,
    /// A file named in the command does not exist.
    NoSuchFile,
    /// ssh could not connect, or the connection dropped.
    Unreachable,
    /// Credentials refused.
    PermissionDenied,
    /// rsync's own I/O timeout (`--timeout`).
    IoTimeout,
    /// Killed by a signal, or interrupted.
    Killed,
    /// The rsync at the other end of the transfer went away mid-transfer
    /// (killed, or its host or the network died).
    PeerDied,
    /// The remote or local rsync lacks an option or algorithm.
    Unsupported,
    /// Something else.
    Other,
}

/// Classifies a failed command from its exit code and stderr. Pure; tested
/// on stderr recorded from the real rsync.
pub fn classify(code: Option<i32>, stderr: &str) -> Symptom {
    let has = |s: &str| stderr.contains(s);
    if has("No space left on device")
        || has("Disk quota exceeded")
        || has("(28)") && has("write failed")
    {
        return Symptom::NoSpace;
    }
    if has("Permission denied (publickey") || has("Host key verification failed") {
        return Symptom::PermissionDenied;
    }
    if has("ssh: connect to host")
        || has("Could not resolve hostname")
        || has("No route to host")
        || has("Connection refused")
        || has("Connection timed out")
        || has("Connection reset by peer")
        || code == Some(255)
    {
        return Symptom::Unreachable;
    }
    if code == Some(30) || code == Some(35) || has("timeout in data send/receive") {
        return Symptom::IoTimeout;
    }
    if has("connection unexpectedly closed") {
        return Symptom::PeerDied;
    }
    if code.is_none()
        || code == Some(20)
        || has("received SIGINT, SIGTERM, or SIGHUP")
        || has("Killed by signal")
    {
        return Symptom::Killed;
    }
    if has("refused by the server")
        || has("unknown option")
        || has("unrecognized option")
        || has("requested action not supported")
        || code == Some(2) && has("protocol")
    {
        return Symptom::Unsupported;
    }
    if has("No such file or directory") {
        return Symptom::NoSuchFile;
    }
    if has("Permission denied") {
        return Symptom::PermissionDenied;
    }
    Symptom::Other
}

/// A command that passed its deadline, or an rsync that gave up on its
/// own `--timeout` (`io_timeout`) when no data moved.
pub(crate) fn timeout(
    what: String,
    e: &CommandError,
    io_timeout: Duration,
    detail: String,
) -> RsyncError {
    let after = match e {
        CommandError::Timeout { after, .. } => *after,
        _ => io_timeout,
    };
    RsyncError::Timeout {
        what,
        after,
        detail,
    }
}

/// The exit code and stderr of a command error, for [`classify`].
pub(crate) fn symptom_of(e: &CommandError) -> Symptom {
    match e {
        CommandError::Exit {
            code, stderr_tail, ..
        } => classify(*code, stderr_tail),
        CommandError::Timeout { .. } => Symptom::IoTimeout,
        CommandError::Spawn { .. } | CommandError::Io { .. } => Symptom::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wspare_core::Error;

    const MISSING: &str = include_str!("../testdata/missing-source.err");
    const UNREACHABLE: &str = include_str!("../testdata/unreachable.err");
    const FULL: &str = include_str!("../testdata/disk-full.err");
    const FULL_SSH: &str = include_str!("../testdata/disk-full-ssh.err");

    #[test]
    fn recorded_stderr_is_classified() {
        assert_eq!(classify(Some(23), MISSING), Symptom::NoSuchFile);
        assert_eq!(classify(Some(255), UNREACHABLE), Symptom::Unreachable);
        assert_eq!(classify(Some(11), FULL), Symptom::NoSpace);
        assert_eq!(classify(Some(11), FULL_SSH), Symptom::NoSpace);
        assert_eq!(classify(None, ""), Symptom::Killed);
        assert_eq!(
            classify(Some(30), "[sender] io timeout after 60 seconds -- exiting"),
            Symptom::IoTimeout
        );
        assert_eq!(
            classify(
                Some(4),
                "Your --checksum-choice value (xxh128) was refused by the server."
            ),
            Symptom::Unsupported
        );
        assert_eq!(
            classify(Some(255), "root@h: Permission denied (publickey,password).\r\nrsync: connection unexpectedly closed"),
            Symptom::PermissionDenied
        );
        assert_eq!(
            classify(Some(1), "cat: x: No such file or directory"),
            Symptom::NoSuchFile
        );
        assert_eq!(
            classify(Some(12), "rsync error: error in rsync protocol data stream"),
            Symptom::Other
        );
        assert_eq!(
            classify(
                Some(12),
                "rsync: connection unexpectedly closed (2048 bytes received so far) [sender]"
            ),
            Symptom::PeerDied
        );
    }

    #[test]
    fn errors_map_to_kinds() {
        let n = NodeId::new("node-b").unwrap();
        let full: Error = RsyncError::TargetFull {
            node: n.clone(),
            dir: "/srv/r".into(),
            detail: "ENOSPC".into(),
        }
        .into();
        assert_eq!(full.kind(), ErrorKind::Backend);
        assert!(!full.is_retryable());
        assert!(
            full.to_string()
                .contains("target filesystem on node-b is full"),
            "{full}"
        );
        let e: Error = RsyncError::ChecksumMismatch {
            node: n.clone(),
            generation: Generation(3),
            disk: "vda".into(),
            expected: "xxh128:aa".into(),
            found: "xxh128:bb".into(),
        }
        .into();
        assert_eq!(e.kind(), ErrorKind::Conflict);
        let e: Error = RsyncError::NoSuchGeneration {
            node: n.clone(),
            generation: Generation(9),
            held: "g1".into(),
        }
        .into();
        assert_eq!(e.kind(), ErrorKind::NotFound);
        let e: Error = RsyncError::Unreachable {
            node: n,
            detail: "refused".into(),
        }
        .into();
        assert_eq!(e.kind(), ErrorKind::Unreachable);
        assert!(e.is_retryable());
        let e: Error = RsyncError::Killed {
            disk: "vda".into(),
            detail: "signal".into(),
        }
        .into();
        assert!(e.is_retryable());
    }
}
