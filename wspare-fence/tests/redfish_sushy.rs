//! Redfish fencing over HTTPS (rustls, certificate verification on) against
//! sushy-tools' emulator serving real libvirt QEMU/TCG domains.
//!
//! Basic auth runs against the unmodified `sushy-emulator`. Session auth
//! runs against the same sushy-tools application with a small session
//! layer in front (`tests/support/redfish_emulator.py`): sushy-tools 2.2.0
//! has no SessionService. The "accepts ForceOff, still On" device is that
//! wrapper with ForceOff ignored.

mod support;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use support::{node, Domain, Emulator, Env, Redfish};
use wspare_core::runner::Secret;
use wspare_core::{ErrorKind, Fencer, PowerState, Result};
use wspare_fence::redfish::{RedfishAuth, RedfishDevice, RedfishFencer, SystemRef};
use wspare_fence::Timing;
use wspare_testkit::suite::fencer::{FencerEnv, FencerFixture, FencerVariant};

fn device(url: String, password: &str, auth: RedfishAuth) -> RedfishDevice {
    let mut d = RedfishDevice::new(url, support::USER, Secret::new(password));
    d.auth = auth;
    d.ca_cert = Some(support::tls().ca.clone());
    d.timing = Timing {
        command_timeout: Duration::from_secs(3),
        confirm_timeout: Duration::from_secs(4),
        poll_interval: Duration::from_millis(500),
    };
    d
}

fn fencer(d: RedfishDevice, system: SystemRef) -> RedfishFencer {
    RedfishFencer::new("bmc-r", d)
        .unwrap()
        .node(node(), system)
        .unwrap()
}

struct Fixture(RedfishAuth);

#[async_trait]
impl FencerFixture for Fixture {
    fn title(&self) -> String {
        match self.0 {
            RedfishAuth::Basic => "redfish: basic auth, TLS verified -> sushy-emulator 2.2.0 -> libvirt (TCG)".into(),
            RedfishAuth::Session => {
                "redfish: session auth, TLS verified -> sushy-tools 2.2.0 app + session layer -> libvirt (TCG)".into()
            }
        }
    }

    async fn build(&self, variant: FencerVariant) -> Result<Option<Box<dyn FencerEnv>>> {
        let domain = Domain::start("redfish");
        let normal = match self.0 {
            RedfishAuth::Basic => Emulator::Sushy,
            RedfishAuth::Session => Emulator::WithSessions,
        };
        let (server, url): (support::Server, String) = match variant {
            FencerVariant::Normal | FencerVariant::WrongCredentials => {
                let r = Redfish::start(&domain, normal);
                let u = r.url();
                (Box::new(r), u)
            }
            FencerVariant::StuckOn => {
                let r = Redfish::start(&domain, Emulator::StuckOff);
                let u = r.url();
                (Box::new(r), u)
            }
            FencerVariant::DeadDevice => {
                let (l, port) = support::silent_tcp();
                (Box::new(l), format!("https://127.0.0.1:{port}"))
            }
        };
        let secret = support::password_for(variant);
        // The service exposes only this domain, but name it: the lookup by
        // name walks the Systems collection as on a multi-system service.
        let f = fencer(
            device(url, secret, self.0),
            SystemRef::Named(domain.name.clone()),
        );
        Ok(Some(Box::new(Env {
            fencer: Arc::new(f),
            secret,
            server,
            domain,
        })))
    }
}

#[tokio::test]
async fn conformance_basic_auth() {
    support::require_testbed();
    let report = wspare_testkit::suite::fencer::run(&Fixture(RedfishAuth::Basic)).await;
    report.assert_passed();
    assert_eq!(report.skipped().count(), 0, "{report}");
}

#[tokio::test]
async fn conformance_session_auth() {
    support::require_testbed();
    let report = wspare_testkit::suite::fencer::run(&Fixture(RedfishAuth::Session)).await;
    report.assert_passed();
    assert_eq!(report.skipped().count(), 0, "{report}");
}

/// Sessions are deleted after each call: none is left on the service.
#[tokio::test]
async fn sessions_are_logged_out() {
    let domain = Domain::start("redfish-logout");
    let server = Redfish::start(&domain, Emulator::WithSessions);
    let f = fencer(
        device(server.url(), support::PASSWORD, RedfishAuth::Session),
        SystemRef::Only,
    );
    f.fence(&node()).await.unwrap();
    assert_eq!(domain.state_with_reason(), "shut off (destroyed)");
    assert_eq!(f.power_status(&node()).await.unwrap(), PowerState::Off);
    let body = reqwest::Client::builder()
        .add_root_certificate(
            reqwest::Certificate::from_pem(&std::fs::read(&support::tls().ca).unwrap()).unwrap(),
        )
        .build()
        .unwrap()
        .get(format!(
            "{}/redfish/v1/SessionService/Sessions",
            server.url()
        ))
        .basic_auth(support::USER, Some(support::PASSWORD))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        body.contains("\"Members@odata.count\": 0"),
        "sessions left behind: {body}"
    );
}

/// Verification is on by default: the emulator's certificate (from a test
/// CA) is refused by the built-in roots, with a hint, and nothing is done.
#[tokio::test]
async fn an_untrusted_certificate_is_refused_by_default() {
    let domain = Domain::start("redfish-tls");
    let server = Redfish::start(&domain, Emulator::Sushy);
    let mut d = device(server.url(), support::PASSWORD, RedfishAuth::Basic);
    d.ca_cert = None;
    let e = fencer(d, SystemRef::Only).fence(&node()).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
    assert!(!e.is_retryable());
    let m = e.message();
    assert!(m.contains("TLS: ") && m.contains("certificate"), "{m}");
    assert!(m.contains("trust the BMC's CA with ca-cert"), "{m}");
    assert_eq!(domain.power().unwrap(), PowerState::On);
}

/// `tls-verify = false` is a per-device opt-out: the same server, and a
/// path reference to the system.
#[tokio::test]
async fn verification_can_be_turned_off_per_device() {
    let domain = Domain::start("redfish-noverify");
    let server = Redfish::start(&domain, Emulator::Sushy);
    let mut d = device(server.url(), support::PASSWORD, RedfishAuth::Basic);
    d.ca_cert = None;
    d.tls_verify = false;
    let f = fencer(
        d,
        SystemRef::Path(format!("/redfish/v1/Systems/{}", domain.uuid)),
    );
    f.fence(&node()).await.unwrap();
    assert_eq!(domain.power().unwrap(), PowerState::Off);
}

/// A system name the service does not have: the error lists what it has.
#[tokio::test]
async fn an_unknown_system_name_is_a_config_error() {
    let domain = Domain::start("redfish-name");
    let server = Redfish::start(&domain, Emulator::Sushy);
    let f = fencer(
        device(server.url(), support::PASSWORD, RedfishAuth::Basic),
        SystemRef::Named("nope".into()),
    );
    let e = f.fence(&node()).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
    assert!(
        e.message().contains(&format!(
            "no system named \"nope\"; the service has: {}",
            domain.name
        )),
        "{e}"
    );
}
