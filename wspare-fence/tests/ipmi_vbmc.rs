//! IPMI fencing with the real ipmitool against virtualbmc serving real
//! libvirt QEMU/TCG domains: the conformance suite, and the faults.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use support::{node, Counting, Domain, Env, Vbmc};
use wspare_core::runner::{CommandRunner, LocalRunner, Secret};
use wspare_core::{ErrorKind, Fencer, PowerState, Result};
use wspare_fence::ipmi::{IpmiDevice, IpmiFencer, IpmiPassword, Privilege};
use wspare_fence::Timing;
use wspare_testkit::suite::fencer::{FencerEnv, FencerFixture, FencerVariant};

/// The device settings every test uses: 2 s per try and one retry (a dead
/// BMC fails in ~4 s), 5 s of read-back.
fn device(port: u16, password: IpmiPassword) -> IpmiDevice {
    let mut d = IpmiDevice::new("127.0.0.1", support::USER, password);
    d.port = port;
    d.try_timeout = Duration::from_secs(2);
    d.retries = 1;
    d.timing = Timing {
        command_timeout: Duration::from_secs(15),
        confirm_timeout: Duration::from_secs(5),
        poll_interval: Duration::from_millis(500),
    };
    d
}

struct Fixture;

#[async_trait]
impl FencerFixture for Fixture {
    fn title(&self) -> String {
        "ipmi: ipmitool -I lanplus -> virtualbmc 3.3.0 -> libvirt qemu:///system (TCG)".into()
    }

    async fn build(&self, variant: FencerVariant) -> Result<Option<Box<dyn FencerEnv>>> {
        let domain = Domain::start("ipmi");
        let (server, port) = support::ipmi_server(&domain, variant);
        let secret = support::password_for(variant);
        let fencer = IpmiFencer::new(
            "bmc-a",
            node(),
            device(port, IpmiPassword::Env(Secret::new(secret))),
            Arc::new(LocalRunner),
        )?;
        Ok(Some(Box::new(Env {
            fencer: Arc::new(fencer),
            secret,
            server,
            domain,
        })))
    }
}

#[tokio::test]
async fn conformance() {
    support::require_testbed();
    let report = wspare_testkit::suite::fencer::run(&Fixture).await;
    report.assert_passed();
    assert_eq!(report.skipped().count(), 0, "{report}");
}

/// The receipt comes only once libvirt has the domain shut off; the
/// password goes by file (`-f`), the argv holds no password.
#[tokio::test]
async fn password_file_fence_leaves_the_domain_destroyed() {
    let domain = Domain::start("ipmi-file");
    let bmc = Vbmc::add(&domain);
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("bmc.pw");
    std::fs::write(&pw, format!("{}\n", support::PASSWORD)).unwrap();
    let runner = Counting::new();
    let f = IpmiFencer::new(
        "bmc-a",
        node(),
        device(bmc.port, IpmiPassword::File(pw.clone())),
        runner.clone(),
    )
    .unwrap();
    assert_eq!(f.power_status(&node()).await.unwrap(), PowerState::On);
    let receipt = f.fence(&node()).await.unwrap();
    assert_eq!(domain.power().unwrap(), PowerState::Off);
    assert_eq!(domain.state_with_reason(), "shut off (destroyed)");
    assert_eq!(
        receipt.to_string(),
        format!(
            "node node-a read back off by ipmi bmc-a (127.0.0.1:{})",
            bmc.port
        )
    );
    let argvs = runner.argvs();
    assert!(
        argvs.iter().all(|a| !a.contains(support::PASSWORD)),
        "{argvs:?}"
    );
    let base = format!(
        "ipmitool -I lanplus -H 127.0.0.1 -p {} -U admin -f {} -N 2 -R 1 -v power",
        bmc.port,
        pw.display()
    );
    assert_eq!(argvs[0], format!("{base} status"));
    assert_eq!(argvs[1], format!("{base} off"));
    assert!(
        argvs.len() >= 3 && argvs[2..].iter().all(|a| *a == format!("{base} status")),
        "{argvs:?}"
    );
    f.unfence(&node()).await.unwrap();
    assert_eq!(domain.power().unwrap(), PowerState::On);
}

/// Wrong credentials: PermissionDenied after exactly one ipmitool run (no
/// retry storm), in well under the dead-BMC time.
#[tokio::test]
async fn wrong_password_is_one_call_and_permission_denied() {
    let domain = Domain::start("ipmi-auth");
    let bmc = Vbmc::add(&domain);
    let runner = Counting::new();
    let f = IpmiFencer::new(
        "bmc-a",
        node(),
        device(
            bmc.port,
            IpmiPassword::Env(Secret::new(support::WRONG_PASSWORD)),
        ),
        runner.clone() as Arc<dyn CommandRunner>,
    )
    .unwrap();
    let t0 = Instant::now();
    let e = f.fence(&node()).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::PermissionDenied, "{e}");
    assert!(!e.is_retryable());
    assert!(e.message().contains("RAKP 2 HMAC is invalid"), "{e}");
    assert!(!format!("{e:?}").contains(support::WRONG_PASSWORD));
    assert_eq!(runner.argvs().len(), 1, "{:?}", runner.argvs());
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    assert_eq!(domain.power().unwrap(), PowerState::On);
}

/// A BMC that does not answer: Timeout kind, one ipmitool run, bounded by
/// ipmitool's own -N/-R.
#[tokio::test]
async fn dead_bmc_is_a_timeout_within_the_retry_budget() {
    support::require_testbed();
    let (_sock, port) = support::silent_udp();
    let runner = Counting::new();
    let f = IpmiFencer::new(
        "bmc-a",
        node(),
        device(port, IpmiPassword::Env(Secret::new(support::PASSWORD))),
        runner.clone() as Arc<dyn CommandRunner>,
    )
    .unwrap();
    let t0 = Instant::now();
    let e = f.fence(&node()).await.unwrap_err();
    let took = t0.elapsed();
    assert_eq!(e.kind(), ErrorKind::Timeout, "{e}");
    assert!(e.message().contains("Get Auth Capabilities error"), "{e}");
    assert_eq!(runner.argvs().len(), 1);
    assert!(took < Duration::from_secs(10), "{took:?}");
}

/// The stuck BMC accepts power-off (ipmitool says Down/Off) while libvirt
/// keeps the domain running: no receipt, Timeout, and the message says so.
#[tokio::test]
async fn stuck_bmc_gives_no_receipt() {
    let domain = Domain::start("ipmi-stuck");
    let (_bmc, port) = support::stuck_bmc(&domain);
    let f = IpmiFencer::new(
        "bmc-a",
        node(),
        device(port, IpmiPassword::Env(Secret::new(support::PASSWORD))),
        Arc::new(LocalRunner),
    )
    .unwrap();
    let e = f.fence(&node()).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Timeout);
    let m = e.message();
    assert!(
        m.contains(
            "power off of node node-a was accepted, but the power did not read back off within"
        ),
        "{m}"
    );
    assert!(m.ends_with("last: on); no receipt"), "{m}");
    assert_eq!(domain.power().unwrap(), PowerState::On);
}

/// The privilege level and cipher suite go to the real ipmitool: `-L
/// OPERATOR -C 3` (the suite virtualbmc speaks) reads the power; a suite the
/// BMC does not offer (`-C 17`) is a configuration error after one call,
/// not retried, and nothing is done.
#[tokio::test]
async fn privilege_and_cipher_suite_reach_the_bmc() {
    let domain = Domain::start("ipmi-cipher");
    let bmc = Vbmc::add(&domain);
    let mut d = device(bmc.port, IpmiPassword::Env(Secret::new(support::PASSWORD)));
    d.privilege = Some(Privilege::Operator);
    d.cipher_suite = Some(3);
    let f = IpmiFencer::new("bmc-a", node(), d.clone(), Arc::new(LocalRunner)).unwrap();
    assert_eq!(f.power_status(&node()).await.unwrap(), PowerState::On);

    d.cipher_suite = Some(17);
    let runner = Counting::new();
    let f = IpmiFencer::new("bmc-a", node(), d, runner.clone()).unwrap();
    let e = f.fence(&node()).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
    assert!(!e.is_retryable());
    assert!(
        e.message().starts_with(&format!(
            "configuration does not fit the device: ipmi bmc-a (127.0.0.1:{}): power off of node \
             node-a: asked `ipmitool -I lanplus -H 127.0.0.1 -p {} -U admin -E -L OPERATOR -C 17",
            bmc.port, bmc.port
        )),
        "{e}"
    );
    assert_eq!(runner.argvs().len(), 1, "{:?}", runner.argvs());
    assert_eq!(domain.power().unwrap(), PowerState::On);
}
