//! The fence-agents adapter driving the real `fence_ipmilan` (fence-agents
//! 4.12.1) against virtualbmc serving real libvirt QEMU/TCG domains.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use support::{node, Counting, Domain, Env, Vbmc};
use wspare_core::runner::{CommandRunner, LocalRunner, Secret};
use wspare_core::{ErrorKind, Fencer, Result};
use wspare_fence::agent::{AgentDevice, FenceAgentFencer};
use wspare_fence::Timing;
use wspare_testkit::suite::fencer::{FencerEnv, FencerFixture, FencerVariant};

/// fence_ipmilan options: `verbose_level=2` makes it log ipmitool's `-v`
/// output, which tells a refused password from a dead BMC;
/// `power_timeout=4` bounds its own wait for the power to change;
/// `power_wait=0` drops its fixed 2 s sleep after off/on (the adapter reads
/// the power back itself).
fn device(port: u16, password: &str) -> AgentDevice {
    let mut d = AgentDevice::new("fence_ipmilan")
        .option("ip", "127.0.0.1")
        .option("ipport", port.to_string())
        .option("username", support::USER)
        .option("lanplus", "1")
        .option("verbose_level", "2")
        .option("power_timeout", "4")
        .option("power_wait", "0");
    d.password = Some(Secret::new(password));
    d.timing = Timing {
        command_timeout: Duration::from_secs(30),
        confirm_timeout: Duration::from_secs(4),
        poll_interval: Duration::from_millis(500),
    };
    d
}

fn fencer(port: u16, password: &str, runner: Arc<dyn CommandRunner>) -> FenceAgentFencer {
    FenceAgentFencer::new("ipmilan-a", device(port, password), runner)
        .unwrap()
        .node(node(), None)
        .unwrap()
}

struct Fixture;

#[async_trait]
impl FencerFixture for Fixture {
    fn title(&self) -> String {
        "fence-agent: fence_ipmilan (stdin protocol) -> virtualbmc 3.3.0 -> libvirt qemu:///system (TCG)".into()
    }

    async fn build(&self, variant: FencerVariant) -> Result<Option<Box<dyn FencerEnv>>> {
        let domain = Domain::start("agent");
        let (server, port) = support::ipmi_server(&domain, variant);
        let secret = support::password_for(variant);
        Ok(Some(Box::new(Env {
            fencer: Arc::new(fencer(port, secret, Arc::new(LocalRunner))),
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

/// off then status until off, all through stdin: the argv is the agent's
/// name alone; the receipt comes after libvirt has the domain destroyed.
#[tokio::test]
async fn fence_ipmilan_fences_through_stdin_only() {
    let domain = Domain::start("agent-stdin");
    let bmc = Vbmc::add(&domain);
    let runner = Counting::new();
    let f = fencer(bmc.port, support::PASSWORD, runner.clone());
    let receipt = f.fence(&node()).await.unwrap();
    assert_eq!(domain.state_with_reason(), "shut off (destroyed)");
    assert_eq!(
        receipt.to_string(),
        "node node-a read back off by fence-agent ipmilan-a (fence_ipmilan)"
    );
    assert_eq!(
        runner.argvs(),
        ["fence_ipmilan", "fence_ipmilan"],
        "one off, one status"
    );
}

/// A refused password: PermissionDenied after one agent run, its cause
/// (ipmitool's RAKP 2 error, logged with verbose_level=2) in the message.
#[tokio::test]
async fn refused_password_is_permission_denied_once() {
    let domain = Domain::start("agent-auth");
    let bmc = Vbmc::add(&domain);
    let runner = Counting::new();
    let f = fencer(bmc.port, support::WRONG_PASSWORD, runner.clone());
    let t0 = Instant::now();
    let e = f.fence(&node()).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::PermissionDenied, "{e}");
    assert!(!e.is_retryable());
    assert!(
        e.message().ends_with(
            "(RAKP 2 HMAC is invalid); check the user, password and privilege level \
             configured for the device"
        ),
        "{e}"
    );
    assert!(!e.to_string().contains(support::WRONG_PASSWORD));
    assert_eq!(runner.argvs().len(), 1);
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
}
