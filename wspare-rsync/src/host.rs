//! The commands run on one endpoint's host, through its runner: reading and
//! atomically replacing the manifest, sizes, directories, local copies,
//! checksums. Every one is an argv; the two that need a shell use a
//! constant script with the values as positional parameters, so that no
//! value is ever parsed as shell code.

use std::path::{Path, PathBuf};

use wspare_core::runner::{Command, CommandError};

use crate::config::{Endpoint, Options};
use crate::error::{symptom_of, timeout, RsyncError, Symptom};
use crate::manifest::{Manifest, MANIFEST};
use crate::parse;

/// Creates the slot directory `$2` (and with it the replica directory
/// `$1`) and fsyncs it; writes stdin to `$1/MANIFEST.tmp` and fsyncs it
/// (`dd conv=fsync`); renames it over `$1/MANIFEST`; fsyncs `$1`. Then, for
/// each pair of the following arguments up to `--clone`, copies the first
/// to the second unless the second exists (seeding a slot from another);
/// and for each pair after `--clone`, replaces the second by a reflink
/// clone of the first where the filesystem can clone (XFS, btrfs), and
/// leaves it alone where it cannot. One round trip.
pub(crate) const WRITE_MANIFEST_SH: &str = "set -e; d=$1; s=$2; shift 2; mkdir -p -- \"$s\"; sync -- \"$s\"; \
dd of=\"$d/MANIFEST.tmp\" conv=fsync status=none; mv -f -- \"$d/MANIFEST.tmp\" \"$d/MANIFEST\"; sync -- \"$d\"; \
while [ $# -ge 2 ] && [ \"$1\" != --clone ]; do [ -e \"$2\" ] || cp --sparse=always --reflink=auto -- \"$1\" \"$2\"; shift 2; done; \
[ \"${1:-}\" != --clone ] || shift; \
while [ $# -ge 2 ]; do cp --reflink=always -- \"$1\" \"$2.clone\" 2>/dev/null && mv -f -- \"$2.clone\" \"$2\" || rm -f -- \"$2.clone\"; shift 2; done";

/// One endpoint's host with the options.
pub(crate) struct Host<'a> {
    pub(crate) ep: &'a Endpoint,
    pub(crate) opts: &'a Options,
}

impl<'a> Host<'a> {
    pub(crate) fn new(ep: &'a Endpoint, opts: &'a Options) -> Self {
        Host { ep, opts }
    }

    /// `program` with `LC_ALL=C` and the small-command deadline.
    pub(crate) fn cmd(&self, program: &str) -> Command {
        Command::new(program)
            .env("LC_ALL", "C")
            .timeout(self.opts.command_timeout)
    }

    pub(crate) fn manifest_path(&self) -> PathBuf {
        self.ep.replica_dir.join(MANIFEST)
    }

    /// Maps a failed command on this host to an error of the right kind.
    pub(crate) fn fail(&self, context: impl Into<String>, e: CommandError) -> RsyncError {
        let context = context.into();
        let node = self.ep.node.clone();
        let detail = || format!("{context}: {}", e.stderr_tail().trim());
        match symptom_of(&e) {
            Symptom::Unreachable => RsyncError::Unreachable {
                node,
                detail: detail(),
            },
            Symptom::PermissionDenied => RsyncError::PermissionDenied {
                node,
                detail: detail(),
            },
            Symptom::NoSpace => RsyncError::TargetFull {
                node,
                dir: self.ep.replica_dir.clone(),
                detail: detail(),
            },
            Symptom::IoTimeout => timeout(
                format!("{context} on {node}"),
                &e,
                self.opts.io_timeout,
                e.to_string(),
            ),
            _ => RsyncError::Command {
                context: format!("{context} on {node}"),
                source: e,
            },
        }
    }

    async fn run(&self, context: &str, cmd: Command) -> Result<String, RsyncError> {
        match self.ep.runner.run(&cmd).await {
            Ok(o) => Ok(o.stdout),
            Err(e) => Err(self.fail(context, e)),
        }
    }

    /// The manifest, `None` if there is none yet.
    pub(crate) async fn read_manifest(&self) -> Result<Option<Manifest>, RsyncError> {
        let path = self.manifest_path();
        let cmd = self.cmd("cat").arg("--").arg(path.display().to_string());
        match self.ep.runner.run(&cmd).await {
            Ok(o) => {
                Manifest::parse(&o.stdout)
                    .map(Some)
                    .map_err(|reason| RsyncError::CorruptManifest {
                        node: self.ep.node.clone(),
                        path,
                        reason,
                    })
            }
            Err(e) if symptom_of(&e) == Symptom::NoSuchFile => Ok(None),
            Err(e) => Err(self.fail(format!("reading the manifest {}", path.display()), e)),
        }
    }

    /// Replaces the manifest atomically (write, fsync, rename, fsync dir),
    /// creating the replica directory if needed.
    pub(crate) async fn write_manifest(&self, m: &Manifest) -> Result<(), RsyncError> {
        self.write_manifest_with(m, &self.ep.replica_dir, &[], &[])
            .await
    }

    /// Creates and fsyncs `dir` (a slot directory, or the replica
    /// directory), then replaces the manifest atomically, then makes each
    /// `(from, to)` seed copy whose `to` does not exist yet, then each
    /// reflink clone that the filesystem can make.
    pub(crate) async fn write_manifest_with(
        &self,
        m: &Manifest,
        dir: &Path,
        seeds: &[(PathBuf, PathBuf)],
        clones: &[(PathBuf, PathBuf)],
    ) -> Result<(), RsyncError> {
        let mut cmd = self
            .cmd("sh")
            .args(["-c", WRITE_MANIFEST_SH, "sh"])
            .arg(self.ep.replica_dir.display().to_string())
            .arg(dir.display().to_string())
            .stdin(m.to_json());
        for (from, to) in seeds {
            cmd = cmd
                .arg(from.display().to_string())
                .arg(to.display().to_string());
        }
        if !clones.is_empty() {
            cmd = cmd.arg("--clone");
            for (from, to) in clones {
                cmd = cmd
                    .arg(from.display().to_string())
                    .arg(to.display().to_string());
            }
        }
        if !seeds.is_empty() || !clones.is_empty() {
            cmd = cmd.timeout(self.opts.copy_timeout);
        }
        self.run("writing the manifest", cmd).await.map(|_| ())
    }

    /// `mkdir -p` of `dirs`.
    pub(crate) async fn mkdirs(&self, dirs: &[PathBuf]) -> Result<(), RsyncError> {
        let mut cmd = self.cmd("mkdir").args(["-p", "--"]);
        for d in dirs {
            cmd = cmd.arg(d.display().to_string());
        }
        self.run("creating directories", cmd).await.map(|_| ())
    }

    /// Sizes of `paths` (following links), in order. A missing file is
    /// `SourceMissing` naming it.
    pub(crate) async fn sizes(&self, paths: &[PathBuf]) -> Result<Vec<u64>, RsyncError> {
        let mut cmd = self.cmd("stat").args(["-L", "-c", "%s", "--"]);
        for p in paths {
            cmd = cmd.arg(p.display().to_string());
        }
        match self.ep.runner.run(&cmd).await {
            Ok(o) => {
                let sizes: Vec<u64> = o
                    .stdout
                    .lines()
                    .filter_map(|l| l.trim().parse().ok())
                    .collect();
                if sizes.len() != paths.len() {
                    return Err(RsyncError::InvalidInput(format!(
                        "stat on {} printed {} sizes for {} files: {:?}",
                        self.ep.node,
                        sizes.len(),
                        paths.len(),
                        o.stdout
                    )));
                }
                Ok(sizes)
            }
            Err(e) if symptom_of(&e) == Symptom::NoSuchFile => {
                let tail = e.stderr_tail();
                let path = paths
                    .iter()
                    .find(|p| tail.contains(&p.display().to_string()))
                    .unwrap_or(&paths[0])
                    .clone();
                Err(RsyncError::SourceMissing {
                    node: self.ep.node.clone(),
                    path,
                })
            }
            Err(e) => Err(self.fail("reading file sizes", e)),
        }
    }

    /// Copies `from` to `to` on this host (sparse, reflink where possible),
    /// replacing `to`.
    pub(crate) async fn copy(&self, from: &Path, to: &Path) -> Result<(), RsyncError> {
        let cmd = self
            .cmd("cp")
            .args(["--sparse=always", "--reflink=auto", "--"])
            .arg(from.display().to_string())
            .arg(to.display().to_string())
            .timeout(self.opts.copy_timeout);
        self.run("copying a disk", cmd).await.map(|_| ())
    }

    /// `sync` of `paths` (fsync each file or directory).
    pub(crate) async fn fsync(&self, paths: &[PathBuf]) -> Result<(), RsyncError> {
        let mut cmd = self.cmd("sync").arg("--").timeout(self.opts.copy_timeout);
        for p in paths {
            cmd = cmd.arg(p.display().to_string());
        }
        self.run("flushing copies", cmd).await.map(|_| ())
    }

    /// `rm -rf` of `path`.
    pub(crate) async fn remove_tree(&self, path: &Path) -> Result<(), RsyncError> {
        let cmd = self
            .cmd("rm")
            .args(["-rf", "--"])
            .arg(path.display().to_string());
        self.run("removing a directory", cmd).await.map(|_| ())
    }

    /// The whole-file checksum of `path` as rsync computes it
    /// (`xxh128:<hex>`), by a dry run on this host. `None` if the file is
    /// missing.
    pub(crate) async fn checksum(&self, path: &Path) -> Result<Option<String>, RsyncError> {
        let empty = self.ep.replica_dir.join(".wspare-no-such-dir");
        let cmd = self
            .cmd(&self.opts.rsync)
            .args(["--dry-run", "--checksum", "--checksum-choice=xxh128"])
            .arg(format!("--out-format={}", parse::OUT_FORMAT))
            .arg("--")
            .arg(path.display().to_string())
            .arg(format!("{}/", empty.display()))
            .timeout(self.opts.copy_timeout);
        match self.ep.runner.run(&cmd).await {
            Ok(o) => {
                let sums = parse::parse_checksums(&o.stdout);
                match sums.as_slice() {
                    [one] => Ok(Some(format!("xxh128:{}", one.checksum))),
                    _ => Err(RsyncError::Unsupported(format!(
                        "rsync on {} printed no checksum for {} (needs rsync 3.2.3 or later with xxh128): {:?}",
                        self.ep.node,
                        path.display(),
                        o.stdout
                    ))),
                }
            }
            Err(e) if symptom_of(&e) == Symptom::NoSuchFile => Ok(None),
            Err(e) => Err(self.fail(format!("checksumming {}", path.display()), e)),
        }
    }
}
