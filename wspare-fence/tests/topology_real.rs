//! Fence topologies built from TOML over the real tools: the first level
//! fails, the second fences; every level fails, no receipt.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use support::{node, Domain, Emulator, Redfish, Vbmc};
use wspare_core::runner::LocalRunner;
use wspare_core::{ErrorKind, Evidence, Fencer, PowerState};
use wspare_fence::config::FenceConfig;
use wspare_fence::topology::Topology;

fn build(toml: &str) -> Topology {
    FenceConfig::from_toml(toml)
        .unwrap()
        .build(Arc::new(LocalRunner))
        .unwrap()
}

struct Passwords {
    dir: tempfile::TempDir,
}

impl Passwords {
    fn new() -> Passwords {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("good"), format!("{}\n", support::PASSWORD)).unwrap();
        std::fs::write(
            dir.path().join("bad"),
            format!("{}\n", support::WRONG_PASSWORD),
        )
        .unwrap();
        Passwords { dir }
    }
    fn good(&self) -> String {
        self.dir.path().join("good").display().to_string()
    }
    fn bad(&self) -> String {
        self.dir.path().join("bad").display().to_string()
    }
}

/// Level 1: an IPMI BMC that does not answer. Level 2: fence_ipmilan
/// against the node's working virtualbmc. The receipt comes from level 2,
/// after libvirt has the domain destroyed; the fence delay is exposed, not
/// slept.
#[tokio::test]
async fn dead_bmc_then_fence_agent() {
    let domain = Domain::start("topo-agent");
    let bmc = Vbmc::add(&domain);
    let (_dead, dead_port) = support::silent_udp();
    let pw = Passwords::new();
    let t = build(&format!(
        r#"
        [devices.bmc-a]
        type = "ipmi"
        host = "127.0.0.1"
        port = {dead_port}
        username = "{user}"
        password-file = "{good}"
        try-timeout = "2s"
        retries = 1

        [devices.ipmilan-a]
        type = "fence-agent"
        agent = "fence_ipmilan"
        options = {{ ip = "127.0.0.1", ipport = "{port}", username = "{user}", lanplus = "1", verbose_level = "2" }}
        password-file = "{good}"
        command-timeout = "30s"
        confirm-timeout = "5s"

        [nodes.node-a]
        fence-delay = "30s"
        levels = [ [ {{ device = "bmc-a" }} ], [ {{ device = "ipmilan-a" }} ] ]
        "#,
        user = support::USER,
        good = pw.good(),
        port = bmc.port,
    ));
    assert_eq!(t.fence_delay(&node()), Some(Duration::from_secs(30)));
    let t0 = Instant::now();
    let receipt = t.fence(&node()).await.unwrap();
    let took = t0.elapsed();
    assert_eq!(domain.state_with_reason(), "shut off (destroyed)");
    assert_eq!(
        receipt.evidence(),
        &Evidence::PowerReadBackOff {
            device: "fence-agent ipmilan-a (fence_ipmilan)".into()
        }
    );
    assert!(
        took < Duration::from_secs(30),
        "the fence delay was slept? {took:?}"
    );
    assert_eq!(
        t.power_status(&node()).await.unwrap(),
        PowerState::Off,
        "level 2 answers the status"
    );
}

/// Level 1: IPMI with a refused password. Level 2: Redfish over verified
/// TLS. Three backends, one receipt: Redfish's.
#[tokio::test]
async fn refused_ipmi_then_redfish() {
    let domain = Domain::start("topo-redfish");
    let bmc = Vbmc::add(&domain);
    let server = Redfish::start(&domain, Emulator::Sushy);
    let pw = Passwords::new();
    let t = build(&format!(
        r#"
        [devices.bmc-a]
        type = "ipmi"
        host = "127.0.0.1"
        port = {port}
        username = "{user}"
        password-file = "{bad}"

        [devices.redfish-a]
        type = "redfish"
        url = "{url}"
        username = "{user}"
        password-file = "{good}"
        auth = "basic"
        ca-cert = "{ca}"
        confirm-timeout = "5s"

        [nodes.node-a]
        levels = [ [ {{ device = "bmc-a" }} ], [ {{ device = "redfish-a", system = "{name}" }} ] ]
        "#,
        user = support::USER,
        good = pw.good(),
        bad = pw.bad(),
        port = bmc.port,
        url = server.url(),
        ca = support::tls().ca.display(),
        name = domain.name,
    ));
    let receipt = t.fence(&node()).await.unwrap();
    assert_eq!(domain.state_with_reason(), "shut off (destroyed)");
    assert_eq!(
        receipt.to_string(),
        format!(
            "node node-a read back off by redfish redfish-a ({})",
            server.url()
        )
    );
}

/// Level 1: a BMC stuck on (accepts off, reads on). Level 2: a dead BMC.
/// No receipt; the error names both levels, what was asked and what came
/// back; the domain is still running.
#[tokio::test]
async fn every_level_failing_gives_no_receipt() {
    let domain = Domain::start("topo-fail");
    let (_stuck, stuck_port) = support::stuck_bmc(&domain);
    let (_dead, dead_port) = support::silent_udp();
    let pw = Passwords::new();
    let t = build(&format!(
        r#"
        [devices.stuck]
        type = "ipmi"
        host = "127.0.0.1"
        port = {stuck_port}
        username = "{user}"
        password-file = "{good}"
        confirm-timeout = "3s"
        poll-interval = "500ms"

        [devices.dead]
        type = "ipmi"
        host = "127.0.0.1"
        port = {dead_port}
        username = "{user}"
        password-file = "{good}"
        try-timeout = "1s"
        retries = 1

        [nodes.node-a]
        levels = [ [ {{ device = "stuck" }} ], [ {{ device = "dead" }} ] ]
        "#,
        user = support::USER,
        good = pw.good(),
    ));
    let e = t.fence(&node()).await.unwrap_err();
    let m = e.message();
    assert_eq!(e.kind(), ErrorKind::Timeout, "{m}");
    assert!(e.is_retryable());
    assert!(
        m.starts_with(
            "node node-a: fencing failed at every fence level: level 1 [timeout]: ipmi stuck"
        ),
        "{m}"
    );
    assert!(
        m.contains("power off of node node-a was accepted, but the power did not read back off"),
        "{m}"
    );
    assert!(
        m.contains("; level 2 [timeout]: no answer: ipmi dead"),
        "{m}"
    );
    assert!(m.contains("asked `ipmitool -I lanplus -H 127.0.0.1"), "{m}");
    assert!(m.contains("Get Auth Capabilities error"), "{m}");
    assert!(!m.contains(support::PASSWORD));
    assert_eq!(domain.power().unwrap(), PowerState::On);
}
