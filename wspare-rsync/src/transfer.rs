//! The rsync command of one disk's transfer, and what its failure means.

use std::path::Path;

use wspare_core::runner::{Command, CommandError};

#[cfg(test)]
use crate::config::BlockSize;
use crate::config::{Options, Reach};
use crate::error::{symptom_of, timeout, RsyncError, Symptom};
use crate::parse;

/// The options every cycle's rsync gets, and why:
///
/// - `--inplace`: update the slot's file where it is: only changed blocks
///   are written, and no second full-size temporary file is needed. This
///   is what leaves a torn file when rsync dies, which is why a cycle only
///   ever writes a slot that holds no complete generation.
/// - `--no-whole-file`: the delta algorithm even for local copies (rsync
///   would otherwise copy local files whole).
/// - `--sparse`, only for the first copy into a new file: runs of zeros
///   become holes, so sparse images stay sparse. Not on later cycles: it
///   makes rsync scan every block for zeros, a quarter more CPU; zeros a
///   guest writes later are then written as data.
/// - `--ignore-times`: never skip a disk on size and mtime; every disk goes
///   through the delta algorithm, which also yields its checksum.
/// - `--checksum-choice=xxh128`: the whole-file checksum rsync verifies the
///   result with and prints (`%C`); recorded in the manifest, recomputed by
///   `verify`.
/// - `--fsync`: the receiver fsyncs the file before it reports success, so
///   the manifest never records a generation that is still in page cache.
/// - `--info=progress2`, `--stats`, `--out-format`: what the parsers read.
/// - `--timeout`: give up when no data moves.
pub const BASE_ARGS: &[&str] = &[
    "--inplace",
    "--no-whole-file",
    "--ignore-times",
    "--checksum-choice=xxh128",
    "--fsync",
    "--info=progress2",
    "--stats",
];

/// `rsync -e` for `reach`, or `None` for a local destination.
pub fn ssh_command(reach: &Reach) -> Option<String> {
    let Reach::Ssh(t) = reach else { return None };
    // The same option words as the core's `SshRunner`.
    let mut e = vec!["ssh".to_string()];
    e.extend(t.ssh_options());
    Some(e.join(" "))
}

/// The destination argument: a path, or `destination:path` over ssh.
pub fn destination(reach: &Reach, path: &Path) -> String {
    match reach {
        Reach::Local => path.display().to_string(),
        Reach::Ssh(t) => format!("{}:{}", t.destination, path.display()),
    }
}

/// What a transfer needs to know besides its paths.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TransferHints {
    /// The source image's size (for the block size).
    pub size: u64,
    /// The destination file is new (no earlier generation or seed): holes
    /// are kept.
    pub new_file: bool,
}

/// The rsync that copies `src` (on the host running it) to `dst` on the
/// host `reach` leads to.
pub fn command(
    opts: &Options,
    src: &Path,
    reach: &Reach,
    dst: &Path,
    hints: TransferHints,
) -> Command {
    let mut c = Command::new(opts.rsync.clone())
        .env("LC_ALL", "C")
        .timeout(opts.transfer_timeout)
        .args(BASE_ARGS.iter().copied())
        .arg(format!("--out-format={}", parse::OUT_FORMAT))
        .arg(format!("--timeout={}", opts.io_timeout.as_secs().max(1)));
    if hints.new_file {
        c = c.arg("--sparse");
    }
    if let Some(b) = opts.block_size.for_size(hints.size) {
        c = c.arg(format!("--block-size={b}"));
    }
    if let Some(l) = opts.bwlimit_kib {
        c = c.arg(format!("--bwlimit={l}"));
    }
    if let Some(e) = ssh_command(reach) {
        c = c.arg("-e").arg(e);
        if opts.rsync != "rsync" {
            c = c.arg(format!("--rsync-path={}", opts.rsync));
        }
    }
    c.arg("--")
        .arg(src.display().to_string())
        .arg(destination(reach, dst))
}

/// Who is involved in a failed transfer, for [`failure`].
pub(crate) struct Parties<'a> {
    pub(crate) disk: &'a str,
    pub(crate) src_node: &'a wspare_core::NodeId,
    pub(crate) src_path: &'a Path,
    pub(crate) dst_node: &'a wspare_core::NodeId,
    pub(crate) dst_dir: &'a Path,
    /// The transfer crosses ssh.
    pub(crate) remote: bool,
    /// The rsync runs on a host reached by ssh.
    pub(crate) runner_remote: bool,
    /// rsync's `--timeout`.
    pub(crate) io_timeout: std::time::Duration,
}

/// What a failed transfer means.
pub(crate) fn failure(p: &Parties<'_>, e: CommandError) -> RsyncError {
    let detail = || {
        let t = e.stderr_tail().trim();
        if t.is_empty() {
            e.to_string()
        } else {
            format!(
                "exit {}; {t}",
                e.exit_code().map_or("by signal".into(), |c| c.to_string())
            )
        }
    };
    let far = if p.runner_remote && !p.remote {
        p.src_node
    } else {
        p.dst_node
    };
    match symptom_of(&e) {
        Symptom::NoSpace => RsyncError::TargetFull {
            node: p.dst_node.clone(),
            dir: p.dst_dir.to_path_buf(),
            detail: detail(),
        },
        Symptom::Unreachable => RsyncError::Unreachable { node: far.clone(), detail: detail() },
        Symptom::PeerDied if p.remote => RsyncError::Unreachable { node: far.clone(), detail: detail() },
        Symptom::PermissionDenied => RsyncError::PermissionDenied { node: far.clone(), detail: detail() },
        Symptom::Killed | Symptom::PeerDied => RsyncError::Killed { disk: p.disk.to_string(), detail: detail() },
        Symptom::IoTimeout => timeout(
            format!("rsync of disk {} from {} to {}", p.disk, p.src_node, p.dst_node),
            &e,
            p.io_timeout,
            detail(),
        ),
        Symptom::NoSuchFile if e.stderr_tail().contains("[sender]") => RsyncError::SourceMissing {
            node: p.src_node.clone(),
            path: p.src_path.to_path_buf(),
        },
        Symptom::Unsupported => RsyncError::Unsupported(format!(
            "rsync cannot do what a cycle needs (rsync 3.2.3 or later on both hosts, with xxh128): {}",
            detail()
        )),
        _ => RsyncError::Command {
            context: format!("rsync of disk {} from {} to {}", p.disk, p.src_node, p.dst_node),
            source: e,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use wspare_core::runner::SshTarget;

    #[test]
    fn local_argv() {
        let hints = TransferHints {
            size: 1 << 30,
            new_file: true,
        };
        let c = command(
            &Options::default(),
            Path::new("/vm/a.img"),
            &Reach::Local,
            Path::new("/r/slot-0/vda.raw"),
            hints,
        );
        assert_eq!(
            c.argv(),
            [
                "rsync",
                "--inplace",
                "--no-whole-file",
                "--ignore-times",
                "--checksum-choice=xxh128",
                "--fsync",
                "--info=progress2",
                "--stats",
                "--out-format=wspare-item:%C:%l:%n",
                "--timeout=120",
                "--sparse",
                "--block-size=4096",
                "--",
                "/vm/a.img",
                "/r/slot-0/vda.raw"
            ]
        );
        assert_eq!(c.env_redacted(), [("LC_ALL".to_string(), "C".to_string())]);
        assert_eq!(c.get_timeout(), Duration::from_secs(12 * 3600));
    }

    #[test]
    fn ssh_argv() {
        let mut t = SshTarget::new("root@node-b").unwrap();
        t.port = Some(2222);
        t.identity = Some("/root/.ssh/id".into());
        t.options = vec!["StrictHostKeyChecking=yes".into()];
        let opts = Options {
            block_size: BlockSize::Fixed(4096),
            bwlimit_kib: Some(10_000),
            rsync: "/opt/rsync".into(),
            ..Options::default()
        };
        let hints = TransferHints {
            size: 1 << 30,
            new_file: false,
        };
        let c = command(
            &opts,
            Path::new("/vm/a.img"),
            &Reach::Ssh(t),
            Path::new("/r/slot-1/vda.raw"),
            hints,
        );
        let argv = c.argv();
        let tail: Vec<&str> = argv[9..].iter().map(String::as_str).collect();
        assert_eq!(
            tail,
            [
                "--timeout=120",
                "--block-size=4096",
                "--bwlimit=10000",
                "-e",
                "ssh -o BatchMode=yes -o ConnectTimeout=10 -p 2222 -i /root/.ssh/id -o StrictHostKeyChecking=yes",
                "--rsync-path=/opt/rsync",
                "--",
                "/vm/a.img",
                "root@node-b:/r/slot-1/vda.raw"
            ]
        );
    }
}
