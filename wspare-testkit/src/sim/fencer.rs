//! [`SimFencer`]: out-of-band power control of the hosts of a [`SimWorld`].

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use wspare_core::runner::Secret;
use wspare_core::{
    Error, ErrorKind, FenceReceipt, FenceScope, Fencer, FencerCaps, NodeId, PowerState, Result,
};

use super::world::{Fault, SimWorld};

/// Settings of a [`SimFencer`].
#[derive(Clone, Debug)]
pub struct SimFencerConfig {
    /// The user it logs in as.
    pub user: String,
    /// How long `fence` waits for the power to read back off.
    pub deadline: Duration,
    /// How long it waits for a device to answer at all.
    pub connect_timeout: Duration,
}

impl Default for SimFencerConfig {
    fn default() -> Self {
        SimFencerConfig {
            user: "admin".into(),
            deadline: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(3),
        }
    }
}

/// A fencer of hosts in a [`SimWorld`], through the fence devices added
/// with [`SimWorld::add_fence_device`], like IPMI: it sends power-off, then
/// polls the device until it reads off (a receipt) or the deadline passes
/// (`Timeout`).
///
/// The devices can misbehave by fault switch: [`Fault::FenceFails`] (an
/// error), [`Fault::FenceHangs`] (the call never returns),
/// [`Fault::FenceLies`] (reads off while the node runs: this fencer then
/// hands out a false receipt, as any fencer would that trusts its device),
/// [`Fault::FenceStuckOn`] (accepts power-off, stays on: `Timeout`),
/// [`Fault::FenceDeviceDead`] (`Unreachable` after the connect timeout).
/// A wrong password fails with `PermissionDenied`; the password appears in
/// no error or description.
#[derive(Clone, Debug)]
pub struct SimFencer {
    world: SimWorld,
    config: SimFencerConfig,
    devices: BTreeMap<NodeId, Secret>,
}

impl SimFencer {
    /// A fencer with no devices configured.
    pub fn new(world: &SimWorld) -> Self {
        SimFencer::with_config(world, SimFencerConfig::default())
    }

    /// [`SimFencer::new`] with settings.
    pub fn with_config(world: &SimWorld, config: SimFencerConfig) -> Self {
        SimFencer {
            world: world.clone(),
            config,
            devices: BTreeMap::new(),
        }
    }

    /// Configures the device of `node`, logging in with `password`.
    pub fn with_device(mut self, node: &NodeId, password: Secret) -> Self {
        self.devices.insert(node.clone(), password);
        self
    }

    fn err(kind: ErrorKind, msg: impl std::fmt::Display) -> Error {
        Error::new(kind, format!("sim fencer: {msg}"))
    }

    /// Logs in to `node`'s device; its name on success.
    async fn contact(&self, node: &NodeId) -> Result<String> {
        self.world.sleep(self.world.config().op_latency).await;
        let Some(password) = self.devices.get(node) else {
            return Err(Self::err(
                ErrorKind::NotFound,
                format!("no fence device configured for node {node}"),
            ));
        };
        enum Answer {
            Ok(String),
            Dead(String),
            Hang,
            Refused(String),
            Fails(String),
            Missing,
        }
        let answer = self.world.with(|st, _| {
            let Some(dev) = st.fence_devices.get(node) else {
                return Answer::Missing;
            };
            let f = |make: fn(NodeId) -> Fault| st.faults.contains(&make(node.clone()));
            if f(Fault::FenceDeviceDead) {
                Answer::Dead(dev.name.clone())
            } else if f(Fault::FenceHangs) {
                Answer::Hang
            } else if dev.password != *password {
                Answer::Refused(dev.name.clone())
            } else if f(Fault::FenceFails) {
                Answer::Fails(dev.name.clone())
            } else {
                Answer::Ok(dev.name.clone())
            }
        });
        match answer {
            Answer::Ok(name) => Ok(name),
            Answer::Missing => {
                self.world.sleep(self.config.connect_timeout).await;
                Err(Self::err(
                    ErrorKind::Unreachable,
                    format!("no fence device answers for node {node}"),
                ))
            }
            Answer::Dead(name) => {
                self.world.sleep(self.config.connect_timeout).await;
                Err(Self::err(
                    ErrorKind::Unreachable,
                    format!(
                        "device {name} of {node}: no answer within {:?}",
                        self.config.connect_timeout
                    ),
                ))
            }
            Answer::Hang => std::future::pending().await,
            Answer::Refused(name) => Err(Self::err(
                ErrorKind::PermissionDenied,
                format!(
                    "device {name} of {node} refused the credentials of user {}",
                    self.config.user
                ),
            )
            .retryable(false)),
            Answer::Fails(name) => Err(Self::err(
                ErrorKind::Backend,
                format!("device {name} of {node}: command failed (injected fault)"),
            )),
        }
    }

    fn reading(&self, node: &NodeId) -> PowerState {
        self.world.with(|st, _| st.device_reading(node))
    }
}

#[async_trait]
impl Fencer for SimFencer {
    fn describe(&self) -> String {
        let nodes: Vec<String> = self.devices.keys().map(|n| n.to_string()).collect();
        format!(
            "sim fencer as {} for {}",
            self.config.user,
            nodes.join(", ")
        )
    }

    fn capabilities(&self) -> FencerCaps {
        FencerCaps {
            scope: FenceScope::Host,
            unfence: true,
        }
    }

    async fn fence(&self, node: &NodeId) -> Result<FenceReceipt> {
        let device = self.contact(node).await?;
        let obeys = !self.world.has_fault(&Fault::FenceStuckOn(node.clone()))
            && !self.world.has_fault(&Fault::FenceLies(node.clone()));
        if obeys {
            self.world
                .request_power_off(node, self.world.config().power_off_delay);
        }
        let start = self.world.now();
        loop {
            let reading = self.reading(node);
            let now = self.world.now();
            if let Some(r) =
                FenceReceipt::from_power_reading(node.clone(), device.clone(), reading, now)
            {
                return Ok(r);
            }
            let waited = now.saturating_since(start);
            if waited >= self.config.deadline {
                return Err(Self::err(
                    ErrorKind::Timeout,
                    format!(
                        "device {device} accepted power-off of {node} but still reads {reading} after {:?}",
                        self.config.deadline
                    ),
                ));
            }
            let poll = self.world.config().poll_interval;
            self.world
                .sleep(poll.min(self.config.deadline - waited))
                .await;
        }
    }

    async fn power_status(&self, node: &NodeId) -> Result<PowerState> {
        self.contact(node).await?;
        Ok(self.reading(node))
    }

    async fn unfence(&self, node: &NodeId) -> Result<()> {
        self.contact(node).await?;
        if !self.world.has_fault(&Fault::FenceStuckOn(node.clone())) {
            self.world.power_on(node);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> (SimWorld, SimFencer, NodeId) {
        let w = SimWorld::new();
        let a = NodeId::new("node-a").unwrap();
        w.add_host(&a);
        w.add_fence_device(&a, "bmc-a", Secret::new("pw-123"));
        let f = SimFencer::new(&w).with_device(&a, Secret::new("pw-123"));
        (w, f, a)
    }

    #[tokio::test(start_paused = true)]
    async fn fence_waits_for_the_power_to_read_off() {
        let (w, f, a) = setup();
        let t0 = w.now();
        let r = f.fence(&a).await.unwrap();
        assert_eq!(w.host_power(&a), Some(PowerState::Off));
        assert!(r.at().saturating_since(t0) >= w.config().power_off_delay);
        assert_eq!(r.to_string(), "node node-a read back off by bmc-a");
        f.unfence(&a).await.unwrap();
        assert_eq!(f.power_status(&a).await.unwrap(), PowerState::On);
    }

    #[tokio::test(start_paused = true)]
    async fn a_lying_device_yields_a_false_receipt_and_a_failing_one_an_error() {
        let (w, f, a) = setup();
        w.set_fault(Fault::FenceLies(a.clone()));
        f.fence(&a).await.unwrap();
        assert_eq!(
            w.host_power(&a),
            Some(PowerState::On),
            "the node still runs"
        );
        w.clear_faults();
        w.set_fault(Fault::FenceFails(a.clone()));
        assert_eq!(f.fence(&a).await.unwrap_err().kind(), ErrorKind::Backend);
        w.clear_faults();
        w.set_fault(Fault::FenceHangs(a.clone()));
        assert!(tokio::time::timeout(Duration::from_secs(600), f.fence(&a))
            .await
            .is_err());
        assert_eq!(w.host_power(&a), Some(PowerState::On));
    }

    #[tokio::test(start_paused = true)]
    async fn a_device_without_a_world_entry_is_unreachable() {
        let w = SimWorld::new();
        let b = NodeId::new("node-b").unwrap();
        let f = SimFencer::new(&w).with_device(&b, Secret::new("x"));
        assert_eq!(
            f.power_status(&b).await.unwrap_err().kind(),
            ErrorKind::Unreachable
        );
    }
}
