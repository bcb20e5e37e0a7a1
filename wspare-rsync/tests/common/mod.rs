//! Test fixtures: a source VM's disk images and two replica directories on
//! the real disk, joined by the real rsync, locally or over ssh to
//! loopback (`.ci/start-services` sets up the key).

#![allow(dead_code, unreachable_pub)]

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sha2::{Digest, Sha256};
use wspare_core::runner::{
    Command, CommandError, CommandRunner, DisplayArgv, LineSink, LocalRunner, Output, SshRunner,
    SshTarget,
};
use wspare_core::{
    DiskBus, DiskFormat, DiskSpec, Error, NodeId, Replicator, Result, SourceView, UnixMillis,
};
use wspare_rsync::{Endpoint, Options, Reach, RsyncReplicator};
use wspare_testkit::suite::replicator::{ReplicatorEnv, ReplicatorFixture};

/// The key `.ci/start-services` installs for root on loopback.
pub const CI_KEY: &str = "/root/.ssh/wspare_ci";

/// How the two endpoints are joined.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Two local directories.
    Local,
    /// Over ssh to root@127.0.0.1.
    Ssh,
}

/// Options with deadlines fit for tests.
pub fn test_options() -> Options {
    Options {
        io_timeout: Duration::from_secs(30),
        command_timeout: Duration::from_secs(30),
        ..Options::default()
    }
}

/// The ssh target for loopback; panics with instructions if the key is
/// missing.
pub fn loopback() -> SshTarget {
    assert!(
        Path::new(CI_KEY).exists(),
        "{CI_KEY} is missing: run `bash .ci/install-deps && bash .ci/start-services` (sshd on 127.0.0.1 with a root key)"
    );
    let mut t = SshTarget::new("root@127.0.0.1").unwrap();
    t.identity = Some(CI_KEY.into());
    // One connection for the many short commands of a cycle (the login
    // shell still starts for each).
    t.options = vec![
        "StrictHostKeyChecking=yes".into(),
        "ControlMaster=auto".into(),
        "ControlPath=/tmp/wspare-rsync-test-%C".into(),
        "ControlPersist=20".into(),
    ];
    t.connect_timeout = Duration::from_secs(5);
    t
}

/// A runner that can kill the next rsync transfer midway: it throttles it
/// with `--bwlimit` and drops it (the inner runner kills the process
/// group) once it has printed its first progress line.
pub struct FaultyRunner {
    inner: Arc<dyn CommandRunner>,
    armed: Arc<AtomicBool>,
}

impl FaultyRunner {
    pub fn new(inner: Arc<dyn CommandRunner>, armed: Arc<AtomicBool>) -> Self {
        FaultyRunner { inner, armed }
    }
}

fn is_transfer(cmd: &Command) -> bool {
    cmd.get_args().iter().any(|a| a == "--inplace")
}

#[async_trait]
impl CommandRunner for FaultyRunner {
    fn describe(&self) -> String {
        self.inner.describe()
    }

    async fn run_with(
        &self,
        cmd: &Command,
        on_line: Option<&mut LineSink<'_>>,
    ) -> Result<Output, CommandError> {
        if !(is_transfer(cmd) && self.armed.swap(false, Ordering::SeqCst)) {
            return self.inner.run_with(cmd, on_line).await;
        }
        let mut slow = Command::new(cmd.program())
            .args(cmd.get_args().iter().take_while(|a| *a != "--").cloned())
            .arg("--bwlimit=1000")
            .args(cmd.get_args().iter().skip_while(|a| *a != "--").cloned())
            .timeout(cmd.get_timeout());
        for (k, v) in cmd.env_redacted() {
            slow = slow.env(k, v);
        }
        let seen = tokio::sync::Notify::new();
        let mut sink = |_: &str| seen.notify_one();
        let run = self.inner.run_with(&slow, Some(&mut sink));
        let killed = || CommandError::Exit {
            argv: DisplayArgv(cmd.argv()),
            code: None,
            stderr_tail: "killed by the test fixture".into(),
            stdout: String::new(),
        };
        // Dropped at its first progress line (the process group dies); if
        // it finished first, the cycle still dies between rsync's exit and
        // the manifest switch.
        tokio::select! {
            biased;
            _ = seen.notified() => Err(killed()),
            _ = run => Err(killed()),
        }
    }
}

/// Builds environments.
#[derive(Clone, Debug)]
pub struct Fixture {
    pub mode: Mode,
    /// Disk sizes in KiB (vda, vdb, ...).
    pub disk_kib: Vec<u64>,
}

impl Fixture {
    pub fn new(mode: Mode) -> Self {
        Fixture {
            mode,
            disk_kib: vec![4 << 10, 1 << 10],
        }
    }

    pub fn build_env(&self) -> Env {
        Env::new(self.mode, &self.disk_kib, None)
    }
}

#[async_trait]
impl ReplicatorFixture for Fixture {
    fn title(&self) -> String {
        match self.mode {
            Mode::Local => "rsync between two local directories".into(),
            Mode::Ssh => "rsync over ssh to root@127.0.0.1".into(),
        }
    }

    async fn build(&self) -> Result<Box<dyn ReplicatorEnv>> {
        Ok(Box::new(self.build_env()))
    }
}

/// One environment: a temp dir on the real disk with the source VM's
/// images (`vm/`), and replica directories `a/` and `b/`.
pub struct Env {
    pub tmp: tempfile::TempDir,
    pub rep: Arc<RsyncReplicator>,
    pub vm_disks: Vec<DiskSpec>,
    pub armed: Arc<AtomicBool>,
    pub mode: Mode,
}

impl Env {
    /// `target_dir` replaces b's replica directory (a small filesystem).
    pub fn new(mode: Mode, disk_kib: &[u64], target_dir: Option<PathBuf>) -> Env {
        Env::new_with(mode, disk_kib, target_dir, test_options())
    }

    /// With rsync options of the caller's.
    pub fn new_with(
        mode: Mode,
        disk_kib: &[u64],
        target_dir: Option<PathBuf>,
        opts: Options,
    ) -> Env {
        let tmp = tempfile::Builder::new()
            .prefix("wspare-rsync-test-")
            .tempdir_in("/var/tmp")
            .unwrap();
        let root = tmp.path().to_path_buf();
        std::fs::create_dir(root.join("vm")).unwrap();
        let mut vm_disks = Vec::new();
        for (i, kib) in disk_kib.iter().enumerate() {
            let target = format!("vd{}", (b'a' + i as u8) as char);
            let format = if i == 0 {
                DiskFormat::Raw
            } else {
                DiskFormat::Qcow2
            };
            let path = root.join("vm").join(format!("{target}.img"));
            // Random content from the kernel (fast in debug builds); every
            // fourth 64 KiB chunk stays a hole: the image is sparse.
            let mut urandom = std::fs::File::open("/dev/urandom").unwrap();
            let mut f = std::fs::File::create(&path).unwrap();
            let mut buf = vec![0u8; 64 << 10];
            for chunk in 0..(kib / 64) {
                if chunk % 4 == 3 {
                    f.seek(SeekFrom::Current(buf.len() as i64)).unwrap();
                } else {
                    urandom.read_exact(&mut buf).unwrap();
                    f.write_all(&buf).unwrap();
                }
            }
            f.set_len(kib * 1024).unwrap();
            vm_disks.push(DiskSpec {
                target,
                path,
                format,
                bus: DiskBus::Virtio,
                read_only: false,
            });
        }
        let armed = Arc::new(AtomicBool::new(false));
        let (ra, rb): (Arc<dyn CommandRunner>, Arc<dyn CommandRunner>) = match mode {
            Mode::Local => (Arc::new(LocalRunner), Arc::new(LocalRunner)),
            Mode::Ssh => (Arc::new(LocalRunner), Arc::new(SshRunner::new(loopback()))),
        };
        let reach = match mode {
            Mode::Local => Reach::Local,
            Mode::Ssh => Reach::Ssh(loopback()),
        };
        let a = Endpoint::new(
            NodeId::new("node-a").unwrap(),
            Arc::new(FaultyRunner::new(ra, armed.clone())),
            reach.clone(),
            root.join("a"),
        );
        let b = Endpoint::new(
            NodeId::new("node-b").unwrap(),
            Arc::new(FaultyRunner::new(rb, armed.clone())),
            reach,
            target_dir.unwrap_or_else(|| root.join("b")),
        );
        let rep = Arc::new(RsyncReplicator::new("web", a, b, opts).unwrap());
        Env {
            tmp,
            rep,
            vm_disks,
            armed,
            mode,
        }
    }

    pub fn root(&self) -> &Path {
        self.tmp.path()
    }

    /// The current source's disks: the VM's own files, or after a reverse
    /// the replica slot the VM now runs from.
    pub async fn source_disks(&self) -> Result<Vec<DiskSpec>> {
        Ok(match self.rep.active_disks().await? {
            Some(d) => d,
            None => self.vm_disks.clone(),
        })
    }

    /// A stopped view of `disks`, now.
    pub fn view_of(&self, disks: &[DiskSpec]) -> SourceView {
        SourceView::Stopped {
            disks: disks.to_vec(),
            at: UnixMillis::now(),
        }
    }

    pub async fn view(&self) -> Result<SourceView> {
        Ok(self.view_of(&self.source_disks().await?))
    }
}

/// SHA-256 over the content of `disks`, in order (by `sha256sum`, fast in
/// debug builds); fails if one is missing.
pub fn digest_files(disks: &[DiskSpec]) -> Result<String> {
    let out = std::process::Command::new("sha256sum")
        .arg("--")
        .args(disks.iter().map(|d| &d.path))
        .output()
        .map_err(|e| Error::invalid(e.to_string()))?;
    if !out.status.success() {
        return Err(Error::not_found(
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ));
    }
    let mut h = Sha256::new();
    for (line, d) in String::from_utf8_lossy(&out.stdout).lines().zip(disks) {
        h.update(line.split_whitespace().next().unwrap_or("").as_bytes());
        h.update(d.target.as_bytes());
    }
    Ok(hex::encode(h.finalize()))
}

/// Rewrites some 4 KiB blocks of every disk from `seed` (and sometimes
/// zeroes a block, so holes matter).
pub fn write_blocks(disks: &[DiskSpec], seed: u64, blocks: usize) -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    for d in disks {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(&d.path)
            .map_err(|e| Error::not_found(format!("{}: {e}", d.path.display())))?;
        let n = f.metadata().unwrap().len() / 4096;
        let mut buf = [0u8; 4096];
        for _ in 0..blocks {
            let b = rng.gen_range(0..n);
            if rng.gen_bool(0.2) {
                buf = [0u8; 4096];
            } else {
                rng.fill_bytes(&mut buf);
            }
            f.seek(SeekFrom::Start(b * 4096)).unwrap();
            f.write_all(&buf).unwrap();
        }
        f.sync_all().unwrap();
    }
    Ok(())
}

#[async_trait]
impl ReplicatorEnv for Env {
    fn replicator(&self) -> Arc<dyn Replicator> {
        self.rep.clone()
    }

    async fn source_view(&self) -> Result<SourceView> {
        self.view().await
    }

    async fn write_source(&self, seed: u64) -> Result<()> {
        write_blocks(&self.source_disks().await?, seed, 16)
    }

    async fn source_digest(&self) -> Result<String> {
        digest_files(&self.source_disks().await?)
    }

    async fn digest(&self, disks: &[DiskSpec]) -> Result<String> {
        digest_files(disks)
    }

    async fn tamper(&self, disks: &[DiskSpec]) -> Result<()> {
        let d = &disks[0];
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&d.path)
            .map_err(|e| Error::not_found(e.to_string()))?;
        let mut b = [0u8; 1];
        f.seek(SeekFrom::Start(4096)).unwrap();
        f.read_exact(&mut b).unwrap();
        f.seek(SeekFrom::Start(4096)).unwrap();
        f.write_all(&[!b[0]]).unwrap();
        f.sync_all().unwrap();
        Ok(())
    }

    async fn break_next_sync(&self) -> Result<bool> {
        self.armed.store(true, Ordering::SeqCst);
        Ok(true)
    }
}
