//! A toy [`Hypervisor`] that keeps its VMs as files in a directory: the
//! model a backend author copies.
//!
//! ```text
//! <root>/<vm>/spec.json   the definition (the neutral VmSpec, as JSON)
//! <root>/<vm>/running     marker: the VM runs
//! ```
//!
//! A running VM's "guest" is a tokio task that writes a counter into the
//! first sector of the VM's first disk (`TOY <n>`) every 50 ms, like the
//! real test guest. It powers off 100 ms after an ACPI shutdown, unless its
//! kernel command line says `toy.acpi=off`. A freeze points the guest's
//! writes at an overlay file next to each disk and a release folds it back,
//! which is what an external snapshot does.
//!
//! What a real backend does differently: it talks to a daemon or a CLI
//! (through `wspare_core::runner`, with deadlines), reads the state back
//! instead of keeping guests in memory, and maps its own errors onto
//! [`ErrorKind`]s. What it must do the same: every numbered invariant of the
//! contract in [`wspare_core::hypervisor`], which `tests/toy_conformance.rs`
//! checks with the conformance suite.
//!
//! File I/O is plain `std::fs`: the files are tiny, and blocking calls keep
//! the backend deterministic under tokio's paused clock, which the
//! conformance test uses.

use std::collections::BTreeMap;
use std::fs;
use std::io::ErrorKind as IoKind;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use wspare_core::{
    Boot, Consistency, DiskSpec, Error, ErrorKind, FrozenDisk, FrozenDisks, Hypervisor,
    HypervisorCaps, Result, UnixMillis, VmName, VmSpec, VmState, VmStatus,
};

/// How often the guest writes its counter.
const GUEST_TICK: Duration = Duration::from_millis(50);
/// How long the guest takes to power off after an ACPI request.
const ACPI_DELAY: Duration = Duration::from_millis(100);

/// A guest that runs: its task, and where it writes.
struct Guest {
    task: tokio::task::JoinHandle<()>,
    /// The file the guest writes: the first disk, or its overlay while
    /// frozen. Shared with the task.
    target: Arc<Mutex<PathBuf>>,
    /// Set by an ACPI shutdown the guest honours; the task exits.
    off: Arc<AtomicBool>,
}

/// The toy hypervisor. See the module docs.
pub struct ToyHypervisor {
    root: PathBuf,
    guests: Mutex<BTreeMap<VmName, Guest>>,
}

/// An I/O error as a wspare error: a missing file is `NotFound`, the rest is
/// the backend's trouble. Every backend maps its errors onto the core kinds
/// like this, so the failover machine can branch on them.
fn io(what: &str, path: &Path, e: std::io::Error) -> Error {
    let kind = if e.kind() == IoKind::NotFound {
        ErrorKind::NotFound
    } else {
        ErrorKind::Backend
    };
    Error::new(
        kind,
        format!("toy hypervisor: {what} {}: {e}", path.display()),
    )
}

fn overlay_of(disk: &Path) -> PathBuf {
    let mut p = disk.as_os_str().to_owned();
    p.push(".overlay");
    PathBuf::from(p)
}

impl ToyHypervisor {
    /// A hypervisor keeping its VMs under `root` (created if missing).
    pub fn new(root: impl Into<PathBuf>) -> Result<Self> {
        let root = root.into();
        fs::create_dir_all(&root).map_err(|e| io("creating", &root, e))?;
        Ok(ToyHypervisor {
            root,
            guests: Mutex::new(BTreeMap::new()),
        })
    }

    fn dir(&self, vm: &VmName) -> PathBuf {
        // VmName is validated (no `/`, no `..`): safe as a path component.
        self.root.join(vm.as_str())
    }

    fn guests(&self) -> std::sync::MutexGuard<'_, BTreeMap<VmName, Guest>> {
        self.guests.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The definition, or `NotFound`.
    fn read_spec(&self, vm: &VmName) -> Result<VmSpec> {
        let path = self.dir(vm).join("spec.json");
        let text = fs::read_to_string(&path).map_err(|e| match e.kind() {
            IoKind::NotFound => Error::not_found(format!("toy hypervisor: VM {vm} is not defined")),
            _ => io("reading", &path, e),
        })?;
        serde_json::from_str(&text).map_err(|e| {
            Error::new(
                ErrorKind::Backend,
                format!("toy hypervisor: {} is corrupt: {e}", path.display()),
            )
        })
    }

    /// Whether the guest runs. A guest that powered off after ACPI is
    /// reaped here: its marker goes.
    fn is_running(&self, vm: &VmName) -> bool {
        let marker = self.dir(vm).join("running");
        let mut guests = self.guests();
        let stopped = guests.get(vm).is_some_and(|g| g.off.load(Ordering::SeqCst));
        if stopped {
            guests.remove(vm);
            let _ = fs::remove_file(&marker);
        }
        marker.exists()
    }

    fn stop_guest(&self, vm: &VmName) -> Result<()> {
        if let Some(g) = self.guests().remove(vm) {
            g.task.abort();
        }
        let marker = self.dir(vm).join("running");
        match fs::remove_file(&marker) {
            Err(e) if e.kind() != IoKind::NotFound => Err(io("removing", &marker, e)),
            _ => Ok(()),
        }
    }

    /// Folds a freeze's overlays back into the disks (guest writes go to
    /// the disks again).
    fn unfreeze(&self, vm: &VmName, spec: &VmSpec) -> Result<()> {
        if let (Some(g), Some(first)) = (self.guests().get(vm), spec.disks.first()) {
            *g.target.lock().unwrap_or_else(|p| p.into_inner()) = first.path.clone();
        }
        for d in &spec.disks {
            let ov = overlay_of(&d.path);
            if ov.exists() {
                fs::rename(&ov, &d.path).map_err(|e| io("folding back", &ov, e))?;
            }
        }
        Ok(())
    }
}

/// The guest: writes `TOY <n>` into the first sector of its target file
/// every [`GUEST_TICK`], until it powers off or is destroyed.
async fn guest(target: Arc<Mutex<PathBuf>>, off: Arc<AtomicBool>) {
    let mut n: u64 = 0;
    loop {
        tokio::time::sleep(GUEST_TICK).await;
        if off.load(Ordering::SeqCst) {
            return;
        }
        n += 1;
        let path = target.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if let Ok(mut bytes) = fs::read(&path) {
            let text = format!("TOY {n}\n");
            if bytes.len() < text.len() {
                bytes.resize(text.len(), 0);
            }
            bytes[..text.len()].copy_from_slice(text.as_bytes());
            let _ = fs::write(&path, bytes);
        }
    }
}

#[async_trait]
impl Hypervisor for ToyHypervisor {
    fn describe(&self) -> String {
        format!("toy hypervisor in {}", self.root.display())
    }

    fn capabilities(&self) -> HypervisorCaps {
        HypervisorCaps {
            // Overlays while the guest keeps writing: crash consistent.
            freeze: Some(Consistency::CrashConsistent),
            // Not implemented: the suite skips H9 and says why.
            attach_disk: false,
            graceful_shutdown: true,
            lifecycle_events: false,
        }
    }

    async fn status(&self, vm: &VmName) -> Result<VmStatus> {
        if !self.dir(vm).join("spec.json").exists() {
            return Ok(VmStatus::new(VmState::Missing));
        }
        let state = if self.is_running(vm) {
            VmState::Running
        } else {
            VmState::ShutOff
        };
        Ok(VmStatus::new(state))
    }

    async fn list(&self) -> Result<Vec<VmName>> {
        let entries = fs::read_dir(&self.root).map_err(|e| io("listing", &self.root, e))?;
        let mut out = Vec::new();
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if entry.path().join("spec.json").exists() {
                if let Ok(vm) = VmName::new(name) {
                    out.push(vm);
                }
            }
        }
        out.sort();
        Ok(out)
    }

    async fn define(&self, spec: &VmSpec) -> Result<()> {
        spec.validate()?;
        if self.is_running(&spec.name) {
            return Err(Error::new(
                ErrorKind::Conflict,
                format!("toy hypervisor: VM {} runs; stop it first", spec.name),
            ));
        }
        let dir = self.dir(&spec.name);
        fs::create_dir_all(&dir).map_err(|e| io("creating", &dir, e))?;
        // Write, then rename: a crash leaves the old definition or the new.
        let json = serde_json::to_string_pretty(spec)
            .map_err(|e| Error::new(ErrorKind::Backend, format!("toy hypervisor: {e}")))?;
        let tmp = dir.join("spec.json.tmp");
        fs::write(&tmp, json).map_err(|e| io("writing", &tmp, e))?;
        fs::rename(&tmp, dir.join("spec.json")).map_err(|e| io("renaming", &tmp, e))
    }

    async fn spec(&self, vm: &VmName) -> Result<VmSpec> {
        // The disks in the spec are the frozen images during a freeze (the
        // overlays are never in it): H8.
        self.read_spec(vm)
    }

    async fn undefine(&self, vm: &VmName) -> Result<()> {
        self.read_spec(vm)?;
        if self.is_running(vm) {
            return Err(Error::new(
                ErrorKind::Conflict,
                format!("toy hypervisor: VM {vm} runs; stop it before undefining it"),
            ));
        }
        // The disk images live elsewhere and stay (H7).
        let dir = self.dir(vm);
        fs::remove_dir_all(&dir).map_err(|e| io("removing", &dir, e))
    }

    async fn start(&self, vm: &VmName) -> Result<()> {
        let spec = self.read_spec(vm)?;
        if self.is_running(vm) {
            return Ok(()); // H4: idempotent.
        }
        if let Some(d) = spec.disks.iter().find(|d| !d.path.exists()) {
            return Err(Error::new(
                ErrorKind::Backend,
                format!(
                    "toy hypervisor: cannot start {vm}: disk {} does not exist",
                    d.path.display()
                ),
            ));
        }
        let marker = self.dir(vm).join("running");
        fs::write(&marker, b"").map_err(|e| io("writing", &marker, e))?;
        let first = spec
            .disks
            .first()
            .map(|d| d.path.clone())
            .unwrap_or_default();
        let target = Arc::new(Mutex::new(first));
        let off = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn(guest(target.clone(), off.clone()));
        self.guests()
            .insert(vm.clone(), Guest { task, target, off });
        Ok(())
    }

    async fn shutdown(&self, vm: &VmName, timeout: Duration) -> Result<()> {
        let spec = self.read_spec(vm)?;
        if !self.is_running(vm) {
            return Ok(());
        }
        let acpi = match &spec.boot {
            Boot::Kernel { cmdline, .. } => {
                !cmdline.split_whitespace().any(|a| a == "toy.acpi=off")
            }
            _ => true,
        };
        if acpi {
            // The guest powers off a moment after the request.
            if let Some(g) = self.guests().get(vm) {
                let off = g.off.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(ACPI_DELAY).await;
                    off.store(true, Ordering::SeqCst);
                });
            }
        }
        // Poll until it is off or the deadline passes (H6).
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if !self.is_running(vm) {
                return Ok(());
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Err(Error::timeout(format!(
                    "toy hypervisor: {vm} still runs {timeout:?} after the ACPI request"
                )));
            }
            tokio::time::sleep((deadline - now).min(GUEST_TICK)).await;
        }
    }

    async fn destroy(&self, vm: &VmName) -> Result<()> {
        self.read_spec(vm)?;
        self.stop_guest(vm) // H5: destroying a stopped VM succeeds.
    }

    async fn attach_disk(&self, vm: &VmName, _disk: &DiskSpec) -> Result<()> {
        self.read_spec(vm)?;
        Err(Error::unsupported("toy hypervisor: no disk hot-plug"))
    }

    async fn detach_disk(&self, vm: &VmName, _target: &str) -> Result<()> {
        self.read_spec(vm)?;
        Err(Error::unsupported("toy hypervisor: no disk hot-plug"))
    }

    async fn freeze_disks(&self, vm: &VmName) -> Result<FrozenDisks> {
        let spec = self.read_spec(vm)?;
        if !self.is_running(vm) {
            return Err(Error::new(
                ErrorKind::Conflict,
                format!("toy hypervisor: {vm} is stopped: its disks are already consistent"),
            ));
        }
        // A freeze left behind by a caller that crashed is released first
        // (H8).
        self.unfreeze(vm, &spec)?;
        let mut disks = Vec::new();
        for d in &spec.disks {
            let ov = overlay_of(&d.path);
            fs::copy(&d.path, &ov).map_err(|e| io("copying", &d.path, e))?;
            disks.push(FrozenDisk {
                target: d.target.clone(),
                path: d.path.clone(),
                format: d.format,
                overlay: Some(ov),
            });
        }
        // From now on the guest writes the overlay; the image stays still.
        if let (Some(g), Some(first)) = (self.guests().get(vm), disks.first()) {
            *g.target.lock().unwrap_or_else(|p| p.into_inner()) =
                first.overlay.clone().unwrap_or_default();
        }
        Ok(FrozenDisks {
            vm: vm.clone(),
            at: UnixMillis::now(),
            consistency: Consistency::CrashConsistent,
            disks,
        })
    }

    async fn release_disks(&self, frozen: &FrozenDisks) -> Result<()> {
        let spec = self.read_spec(&frozen.vm)?;
        self.unfreeze(&frozen.vm, &spec)
    }
}

impl Drop for ToyHypervisor {
    fn drop(&mut self) {
        // Guests live as long as their hypervisor (a toy's privilege).
        for (_, g) in std::mem::take(&mut *self.guests()) {
            g.task.abort();
        }
    }
}

/// Reads the toy guest's counter from a disk image (0 if it never wrote).
pub fn read_counter(image: &[u8]) -> u64 {
    let text = String::from_utf8_lossy(&image[..image.len().min(32)]);
    text.strip_prefix("TOY ")
        .and_then(|r| r.split('\n').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(dir: &Path, name: &str) -> VmSpec {
        let disk = dir.join(format!("{name}.img"));
        fs::write(&disk, vec![0u8; 64]).unwrap();
        VmSpec {
            name: VmName::new(name).unwrap(),
            vcpus: 1,
            memory_mib: 64,
            firmware: Default::default(),
            disks: vec![DiskSpec {
                target: "vda".into(),
                path: disk,
                format: Default::default(),
                bus: Default::default(),
                read_only: false,
            }],
            nics: vec![],
            boot: Boot::Kernel {
                kernel: "/toy/vmlinuz".into(),
                initrd: None,
                cmdline: "console=ttyS0".into(),
            },
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_vm_is_a_directory_and_its_guest_writes_a_counter() {
        let tmp = tempfile::tempdir().unwrap();
        let hv = ToyHypervisor::new(tmp.path().join("vms")).unwrap();
        let s = spec(tmp.path(), "web");
        hv.define(&s).await.unwrap();
        assert!(tmp.path().join("vms/web/spec.json").exists());
        hv.start(&s.name).await.unwrap();
        assert!(tmp.path().join("vms/web/running").exists());
        tokio::time::sleep(Duration::from_millis(520)).await;
        let n = read_counter(&fs::read(&s.disks[0].path).unwrap());
        assert!((9..=11).contains(&n), "counter {n}");
        hv.shutdown(&s.name, Duration::from_secs(5)).await.unwrap();
        assert_eq!(hv.status(&s.name).await.unwrap().state, VmState::ShutOff);
        assert!(!tmp.path().join("vms/web/running").exists());
        assert_eq!(hv.list().await.unwrap(), vec![s.name.clone()]);
        hv.undefine(&s.name).await.unwrap();
        assert_eq!(hv.status(&s.name).await.unwrap().state, VmState::Missing);
        assert!(s.disks[0].path.exists(), "images stay");
        assert_eq!(read_counter(b"nothing"), 0);
    }
}
