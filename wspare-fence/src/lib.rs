//! # wspare-fence
//!
//! Out-of-band [`Fencer`](wspare_core::Fencer)s for wspare:
//!
//! - [`ipmi::IpmiFencer`]: IPMI v2.0 through the real `ipmitool -I lanplus`;
//! - [`redfish::RedfishFencer`]: Redfish `ComputerSystem.Reset` over HTTPS
//!   (rustls), session or basic auth;
//! - [`agent::FenceAgentFencer`]: any ClusterLabs fence agent (`fence_ipmilan`,
//!   `fence_apc_snmp`, `fence_ilo`, cloud agents...) through its stdin
//!   `key=value` protocol;
//! - [`topology::Topology`]: per node, levels of devices tried in order, each
//!   level all-of its devices, and the node's fence delay.
//!
//! Every fencer powers off, then reads the power state back until it is off
//! or a deadline passes; a [`FenceReceipt`](wspare_core::FenceReceipt) is
//! built only from a reading of off. A failure ([`FenceError`]) names the
//! device, the node, what was asked and what came back. Passwords travel
//! only in a child's environment, stdin or a file ipmitool reads, or in an
//! HTTP header; they never appear in an argv, an error or a log line.
//!
//! [`config::FenceConfig`] reads all of it from strict kebab-case TOML.

pub mod agent;
pub mod config;
pub mod confirm;
pub mod error;
pub mod ipmi;
pub mod redfish;
pub mod topology;

pub use confirm::Timing;
pub use error::{Exchange, FenceError, Op};

#[cfg(test)]
mod tests {
    //! Properties across the crate: parsers never panic, logs carry no secret.

    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use proptest::prelude::*;
    use wspare_core::runner::{Reply, ScriptedRunner, Secret};
    use wspare_core::{Fencer, NodeId};

    use crate::agent::{AgentDevice, FenceAgentFencer};
    use crate::Timing;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        #[test]
        fn parsers_never_panic(text in "(?s).{0,300}", code in -3i32..300) {
            let _ = crate::ipmi::parse::power_status(&text);
            let _ = crate::ipmi::parse::power_control(&text, "Down/Off");
            let _ = crate::ipmi::parse::classify(&text);
            let _ = crate::ipmi::parse::meaningful(&text);
            let _ = crate::agent::parse::status(&text, code);
            let _ = crate::agent::parse::success(&text);
            let _ = crate::agent::parse::classify(&text);
            let _ = crate::agent::parse::summary(&text);
            let _ = crate::agent::parse::cause(&text);
            let _ = crate::redfish::parse::service_root(&text);
            let _ = crate::redfish::parse::members(&text);
            let _ = crate::redfish::parse::system(&text);
            let _ = crate::redfish::parse::describe_body(&text);
        }

        #[test]
        fn redfish_parsers_never_panic_on_json(
            fields in proptest::collection::vec((
                prop_oneof![
                    Just("PowerState"), Just("Id"), Just("@odata.id"), Just("Actions"), Just("Systems"),
                    Just("Links"), Just("Members"), Just("error"), Just("Name"), Just("UUID"),
                ],
                0u8..5,
            ), 0..8)
        ) {
            // The keys the parsers look for, holding odd values.
            let fields: Vec<String> = fields.iter().map(|(k, t)| {
                let val = match t {
                    0 => "null",
                    1 => "3",
                    2 => "[{}, \"x\"]",
                    3 => "{\"#ComputerSystem.Reset\": {\"target\": 1}, \"Sessions\": []}",
                    _ => "\"On\"",
                };
                format!("\"{k}\": {val}")
            }).collect();
            let body = format!("{{{}}}", fields.join(","));
            let _ = crate::redfish::parse::system(&body);
            let _ = crate::redfish::parse::service_root(&body);
            let _ = crate::redfish::parse::members(&body);
            let _ = crate::redfish::parse::error_message(&body);
        }
    }

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// A device that echoes the password in its failure, then keeps
    /// reporting on: every log line of the fence, at every level, is free
    /// of the secret.
    #[test]
    fn logs_carry_no_secret() {
        let buf = Buf::default();
        let w = buf.clone();
        let sub = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_writer(move || w.clone())
            .finish();
        tracing::subscriber::with_default(sub, || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .start_paused(true)
                .build()
                .unwrap();
            rt.block_on(async {
                let r = Arc::new(ScriptedRunner::new().expect(
                    &["fence_x"],
                    Reply::exit(1, "", "ERROR: Failed: device said: bad login hunter2-pw\n"),
                ));
                for _ in 0..3 {
                    r.push(
                        &["fence_x"],
                        None,
                        vec![],
                        Reply::exit(0, "Status: ON\n", ""),
                    );
                }
                let mut d = AgentDevice::new("fence_x");
                d.password = Some(Secret::new("hunter2-pw"));
                d.timing = Timing {
                    command_timeout: Duration::from_secs(5),
                    confirm_timeout: Duration::from_secs(2),
                    poll_interval: Duration::from_secs(1),
                };
                let node = NodeId::new("node-a").unwrap();
                let f = FenceAgentFencer::new("x", d, r)
                    .unwrap()
                    .node(node.clone(), None)
                    .unwrap();
                let e = f.fence(&node).await.unwrap_err();
                assert!(!format!("{e} {e:?}").contains("hunter2-pw"));
            });
        });
        let logs = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        assert!(logs.contains("reading the power back anyway"), "{logs}");
        assert!(logs.contains("bad login <redacted>"), "{logs}");
        assert!(!logs.contains("hunter2-pw"), "{logs}");
    }
}
