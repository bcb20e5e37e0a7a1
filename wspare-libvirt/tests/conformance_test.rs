//! The conformance suite against libvirt's in-process `test:///default`
//! driver: no daemon, no guest. Runs everywhere `libvirt0` is installed.
//!
//! The test driver keeps one shared state per process while a connection
//! is open, so every environment removes the domains it made when dropped.

mod common;

use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use common::{digest, remove_domains, VmFencerEnv};
use wspare_core::{
    Boot, DiskBus, DiskFormat, DiskSpec, Error, ErrorKind, Firmware, Hypervisor, MacAddr, NicModel,
    NicSource, NicSpec, Result, VmName, VmSpec, VmState,
};
use wspare_libvirt::LibvirtHypervisor;
use wspare_testkit::suite::fencer::{FencerEnv, FencerFixture, FencerVariant};
use wspare_testkit::suite::hypervisor::{GuestTraits, HypervisorEnv, HypervisorFixture};

const URI: &str = "test:///default";

// ---------------------------------------------------------------- hypervisor

struct TestDriverFixture;

struct TestDriverEnv {
    hv: Arc<LibvirtHypervisor>,
    dir: tempfile::TempDir,
    made: Mutex<Vec<String>>,
}

#[async_trait]
impl HypervisorFixture for TestDriverFixture {
    fn title(&self) -> String {
        format!("libvirt {URI}")
    }

    async fn build(&self) -> Result<Box<dyn HypervisorEnv>> {
        Ok(Box::new(TestDriverEnv {
            hv: Arc::new(LibvirtHypervisor::connect_uri(URI)?),
            dir: tempfile::tempdir().map_err(|e| Error::new(ErrorKind::Backend, e.to_string()))?,
            made: Mutex::new(Vec::new()),
        }))
    }
}

#[async_trait]
impl HypervisorEnv for TestDriverEnv {
    fn hypervisor(&self) -> Arc<dyn Hypervisor> {
        self.hv.clone()
    }

    async fn vm_spec(&self, name: &VmName) -> Result<VmSpec> {
        self.made.lock().unwrap().push(name.to_string());
        let disk = self.dir.path().join(format!("{name}.raw"));
        std::fs::write(&disk, format!("image of {name}"))
            .map_err(|e| Error::new(ErrorKind::Backend, e.to_string()))?;
        Ok(VmSpec {
            name: name.clone(),
            vcpus: 1,
            memory_mib: 64,
            firmware: Firmware::Bios,
            disks: vec![DiskSpec {
                target: "vda".into(),
                path: disk,
                format: DiskFormat::Raw,
                bus: DiskBus::Virtio,
                read_only: false,
            }],
            nics: vec![NicSpec {
                mac: MacAddr([0x52, 0x54, 0x00, 0x00, 0x00, 0x01]),
                source: NicSource::Isolated,
                model: NicModel::Virtio,
            }],
            boot: Boot::Kernel {
                kernel: "/boot/vmlinuz".into(),
                initrd: None,
                cmdline: format!("console=ttyS0 name='{name}' a&b"),
            },
        })
    }

    async fn stubborn_vm_spec(&self, _name: &VmName) -> Result<Option<VmSpec>> {
        // The test driver shuts every domain off at once.
        Ok(None)
    }

    async fn image_digest(&self, path: &Path) -> Result<String> {
        digest(path)
    }

    fn guest(&self) -> GuestTraits {
        GuestTraits {
            writes_disk: false,
            honours_shutdown: true,
            boot_time: Duration::ZERO,
            deadline_slack: Duration::from_secs(1),
        }
    }
}

impl Drop for TestDriverEnv {
    fn drop(&mut self) {
        remove_domains(URI, &self.made.lock().unwrap());
    }
}

#[tokio::test]
async fn hypervisor_conformance_test_driver() {
    let report = wspare_testkit::suite::hypervisor::run(&TestDriverFixture).await;
    report.assert_passed();
    // What the test driver cannot do is skipped with a reason, never absent.
    for id in ["H8", "H9"] {
        let c = report
            .case(id)
            .unwrap_or_else(|| panic!("case {id} missing from the report"));
        assert!(
            matches!(c.outcome, wspare_testkit::suite::CaseOutcome::Skipped(_)),
            "{id}: {:?}",
            c.outcome
        );
    }
    for id in ["H1", "H2", "H3", "H4", "H5", "H7", "H10", "H11"] {
        assert_eq!(
            report.case(id).map(|c| &c.outcome),
            Some(&wspare_testkit::suite::CaseOutcome::Passed),
            "{id}"
        );
    }
}

// ---------------------------------------------------------------- fencer

struct TestDriverFencerFixture;

static NEXT: AtomicU32 = AtomicU32::new(0);

#[async_trait]
impl FencerFixture for TestDriverFencerFixture {
    fn title(&self) -> String {
        format!("libvirt VM fencer on {URI}")
    }

    async fn build(&self, variant: FencerVariant) -> Result<Option<Box<dyn FencerEnv>>> {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let domain = VmName::new(format!("wspare-ctf-{}-{n}", std::process::id()))?;
        let hv = LibvirtHypervisor::connect_uri(URI)?;
        let fence_hv = match variant {
            FencerVariant::Normal => hv.clone(),
            // A libvirtd socket that does not exist: the "device" is dead.
            FencerVariant::DeadDevice => LibvirtHypervisor::connect_uri(
                "test+unix:///default?socket=/nonexistent/wspare/libvirt-sock",
            )?,
            // libvirt cannot make the test driver lie about a destroyed
            // domain, and the test driver takes no credentials.
            FencerVariant::StuckOn | FencerVariant::WrongCredentials => return Ok(None),
        };
        let spec = VmSpec {
            name: domain.clone(),
            vcpus: 1,
            memory_mib: 64,
            firmware: Firmware::Bios,
            disks: Vec::new(),
            nics: Vec::new(),
            boot: Boot::Kernel {
                kernel: "/boot/vmlinuz".into(),
                initrd: None,
                cmdline: String::new(),
            },
        };
        hv.define(&spec).await?;
        hv.start(&domain).await?;
        Ok(Some(Box::new(VmFencerEnv::new(
            URI,
            Duration::from_secs(10),
            fence_hv,
            domain,
        ))))
    }
}

#[tokio::test]
async fn fencer_conformance_test_driver() {
    let report = wspare_testkit::suite::fencer::run(&TestDriverFencerFixture).await;
    report.assert_passed();
    for id in ["F1", "F2", "F4", "F5", "F6", "F7"] {
        assert_eq!(
            report.case(id).map(|c| &c.outcome),
            Some(&wspare_testkit::suite::CaseOutcome::Passed),
            "{id}"
        );
    }
}

/// The receipt is VM-level, names the node and the domain, and the fencer
/// says it is not host fencing.
#[tokio::test]
async fn vm_fencer_receipt_is_vm_scoped() {
    let fixture = TestDriverFencerFixture;
    let env = fixture.build(FencerVariant::Normal).await.unwrap().unwrap();
    let f = env.fencer();
    assert_eq!(f.capabilities().scope, wspare_core::FenceScope::Vm);
    assert!(
        f.describe().contains("not host fencing"),
        "{}",
        f.describe()
    );
    let r = f.fence(&env.node()).await.unwrap();
    match r.target() {
        wspare_core::FenceTarget::Vm { node: n, vm } => {
            assert_eq!(n, &env.node());
            assert!(vm.as_str().starts_with("wspare-ctf-"), "{vm}");
        }
        other => panic!("expected a VM-level receipt, got {other}"),
    }
    assert_eq!(
        r.evidence(),
        &wspare_core::Evidence::StoppedObserved {
            state: VmState::ShutOff
        }
    );
}
