//! The toy hypervisor against the conformance suite: the one test file a
//! backend author writes. A fixture builds a fresh environment per case
//! (here: a temporary directory holding the VMs and their disk images), the
//! environment's `Drop` cleans up, and one call runs every case.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use wspare_core::{
    Boot, DiskBus, DiskFormat, DiskSpec, Error, ErrorKind, Firmware, Hypervisor, Result, VmName,
    VmSpec,
};
use wspare_examples::toy_hypervisor::ToyHypervisor;
use wspare_testkit::suite::hypervisor::{self, GuestTraits, HypervisorEnv, HypervisorFixture};

struct ToyFixture;

/// A fixture's own I/O failure, naming the file: a failing case then says
/// which step of the lab broke, not only that something did.
fn io_err(what: &str, path: &Path, e: std::io::Error) -> Error {
    Error::new(
        ErrorKind::Backend,
        format!("{what} {}: {e}", path.display()),
    )
}

/// One case's world: the backend and its directory. Dropping the temporary
/// directory is the cleanup guard; dropping the backend stops its guests.
struct ToyEnv {
    hypervisor: Arc<ToyHypervisor>,
    dir: tempfile::TempDir,
}

#[async_trait]
impl HypervisorFixture for ToyFixture {
    fn title(&self) -> String {
        "toy hypervisor (VMs as files)".into()
    }

    async fn build(&self) -> Result<Box<dyn HypervisorEnv>> {
        let dir = tempfile::tempdir()
            .map_err(|e| io_err("creating a directory in", &std::env::temp_dir(), e))?;
        let hypervisor = Arc::new(ToyHypervisor::new(dir.path().join("vms"))?);
        Ok(Box::new(ToyEnv { hypervisor, dir }))
    }
}

impl ToyEnv {
    /// A VM with two fresh disk images and a kernel command line.
    fn make(&self, name: &VmName, cmdline: &str) -> Result<VmSpec> {
        let images = self.dir.path().join("images");
        std::fs::create_dir_all(&images).map_err(|e| io_err("creating", &images, e))?;
        let mut disks = Vec::new();
        for slot in ["vda", "vdb"] {
            let path = images.join(format!("{name}-{slot}.img"));
            std::fs::write(&path, vec![0u8; 512]).map_err(|e| io_err("writing", &path, e))?;
            disks.push(DiskSpec {
                target: slot.into(),
                path,
                format: DiskFormat::Raw,
                bus: DiskBus::Virtio,
                read_only: false,
            });
        }
        Ok(VmSpec {
            name: name.clone(),
            vcpus: 1,
            memory_mib: 128,
            firmware: Firmware::Bios,
            disks,
            nics: vec![],
            boot: Boot::Kernel {
                kernel: "/toy/vmlinuz".into(),
                initrd: None,
                cmdline: cmdline.into(),
            },
        })
    }
}

#[async_trait]
impl HypervisorEnv for ToyEnv {
    fn hypervisor(&self) -> Arc<dyn Hypervisor> {
        self.hypervisor.clone()
    }

    async fn vm_spec(&self, name: &VmName) -> Result<VmSpec> {
        self.make(name, "console=ttyS0")
    }

    async fn stubborn_vm_spec(&self, name: &VmName) -> Result<Option<VmSpec>> {
        // A guest that ignores ACPI: H6's deadline path.
        self.make(name, "console=ttyS0 toy.acpi=off").map(Some)
    }

    async fn image_digest(&self, path: &Path) -> Result<String> {
        use std::hash::{Hash, Hasher};
        let bytes = std::fs::read(path)
            .map_err(|e| Error::not_found(format!("{}: {e}", path.display())))?;
        let mut h = std::collections::hash_map::DefaultHasher::new();
        bytes.hash(&mut h);
        Ok(format!("{:016x}", h.finish()))
    }

    fn guest(&self) -> GuestTraits {
        GuestTraits {
            writes_disk: true,
            honours_shutdown: true,
            boot_time: Duration::from_millis(200),
            deadline_slack: Duration::from_millis(100),
        }
    }
}

// Paused time: the toy's guests and deadlines run on tokio's clock, so the
// suite's waits take no real time. A backend that drives real VMs runs on
// real time (`#[tokio::test]`).
#[tokio::test(start_paused = true)]
async fn toy_hypervisor_passes_the_conformance_suite() {
    let report = hypervisor::run(&ToyFixture).await;
    report.assert_passed();
    let skipped: Vec<_> = report.skipped().map(|c| c.name).collect();
    assert_eq!(skipped, ["H9 hot-plug"], "the toy has no disk hot-plug");
}
