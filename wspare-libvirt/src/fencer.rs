//! [`LibvirtVmFencer`]: fences a VM by destroying its domain through the
//! libvirt of the host that runs it.
//!
//! **This is not host-level fencing.** It proves that one domain is shut
//! off, as read back from its hypervisor; it says nothing about the host,
//! which may be unreachable, partitioned or still running other copies. Its
//! use is the `fence_virsh` case: clusters whose nodes are VMs (guest
//! clusters), and fencing one copy of a pair's VM while its host's libvirt
//! still answers. [`Fencer::capabilities`] reports [`FenceScope::Vm`], and
//! the receipts it issues are [`FenceTarget::Vm`](wspare_core::FenceTarget)
//! receipts that cover that one domain only. When the host itself is gone,
//! only an out-of-band host fencer (IPMI, Redfish, a PDU) can prove
//! anything.

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use wspare_core::{
    Error, ErrorKind, FenceReceipt, FenceScope, Fencer, FencerCaps, Hypervisor, NodeId, PowerState,
    Result, UnixMillis, VmName, VmState,
};

use crate::hypervisor::LibvirtHypervisor;

#[derive(Clone, Debug)]
struct Target {
    hypervisor: LibvirtHypervisor,
    domain: VmName,
}

/// A VM-level [`Fencer`] over libvirt (see the module docs: not host-level
/// fencing).
///
/// # Contract points that need care
///
/// - **F1**: the receipt is issued only after the domain's state is read
///   back as shut off after the destroy; a domain that is not defined on
///   the configured host is an error (`NotFound`), never a receipt, since
///   a wrong host or name must not pass for "off".
/// - **F3**: if the domain still reads live until the deadline, `fence`
///   fails with `Timeout` and issues nothing.
/// - **F7**: every libvirt call has a deadline
///   ([`LibvirtConfig::call_timeout`](crate::LibvirtConfig::call_timeout)),
///   and `fence` as a whole is bounded by the fencer's deadline.
/// - **F8**: libvirt takes credentials from SSH keys or SASL
///   configuration, never from this fencer, so nothing secret passes
///   through it; a refused SSH key or SASL login is `PermissionDenied`.
#[derive(Clone, Debug)]
pub struct LibvirtVmFencer {
    targets: BTreeMap<NodeId, Target>,
    deadline: Duration,
}

impl LibvirtVmFencer {
    /// A fencer without nodes whose `fence` gives up after `deadline`.
    pub fn new(deadline: Duration) -> Self {
        LibvirtVmFencer {
            targets: BTreeMap::new(),
            deadline,
        }
    }

    /// Fences `node` by destroying `domain` through `hypervisor` (the
    /// libvirt of the host that runs it).
    pub fn with_node(
        mut self,
        node: NodeId,
        hypervisor: LibvirtHypervisor,
        domain: VmName,
    ) -> Self {
        self.targets.insert(node, Target { hypervisor, domain });
        self
    }

    fn target(&self, node: &NodeId) -> Result<&Target> {
        self.targets.get(node).ok_or_else(|| {
            Error::not_found(format!(
                "libvirt VM fencer: no domain is configured for node {node}"
            ))
        })
    }

    async fn bounded<T>(
        &self,
        node: &NodeId,
        what: &str,
        f: impl std::future::Future<Output = Result<T>>,
    ) -> Result<T> {
        match tokio::time::timeout(self.deadline, f).await {
            Ok(r) => r,
            Err(_) => Err(Error::timeout(format!(
                "libvirt VM fencer: {what} node {node} did not finish within {:?}",
                self.deadline
            ))),
        }
    }
}

fn not_defined(t: &Target, node: &NodeId) -> Error {
    Error::not_found(format!(
        "libvirt VM fencer: domain {} of node {node} is not defined on {}; it cannot be proven off there",
        t.domain,
        t.hypervisor.uri()
    ))
}

#[async_trait]
impl Fencer for LibvirtVmFencer {
    fn describe(&self) -> String {
        let list: Vec<String> = self
            .targets
            .iter()
            .map(|(n, t)| format!("{n}: {} on {}", t.domain, t.hypervisor.uri()))
            .collect();
        format!(
            "libvirt VM fencer (VM-level, not host fencing) [{}]",
            list.join(", ")
        )
    }

    fn capabilities(&self) -> FencerCaps {
        FencerCaps {
            scope: FenceScope::Vm,
            unfence: true,
        }
    }

    async fn fence(&self, node: &NodeId) -> Result<FenceReceipt> {
        let t = self.target(node)?;
        self.bounded(node, "fencing", async {
            match t.hypervisor.destroy(&t.domain).await {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::NotFound => return Err(not_defined(t, node)),
                Err(e) => return Err(e.context(format!("libvirt VM fencer: fencing node {node}"))),
            }
            loop {
                let st = t.hypervisor.status(&t.domain).await?;
                match st.state {
                    VmState::ShutOff => {
                        let at = UnixMillis::now();
                        return FenceReceipt::from_observed_state(
                            node.clone(),
                            t.domain.clone(),
                            st.state,
                            at,
                        )
                        .ok_or_else(|| {
                            Error::new(
                                ErrorKind::Backend,
                                format!(
                                    "libvirt VM fencer: domain {} of node {node} reads shut off on {}, \
                                     but the core refused a receipt for that state (a bug); fence node {node} by other means",
                                    t.domain,
                                    t.hypervisor.uri()
                                ),
                            )
                        });
                    }
                    VmState::Missing => return Err(not_defined(t, node)),
                    _ => tokio::time::sleep(t.hypervisor.config().poll_interval).await,
                }
            }
        })
        .await
    }

    async fn power_status(&self, node: &NodeId) -> Result<PowerState> {
        let t = self.target(node)?;
        self.bounded(node, "reading the power of", async {
            let st = t.hypervisor.status(&t.domain).await?;
            Ok(match st.state {
                VmState::Missing => return Err(not_defined(t, node)),
                VmState::ShutOff => PowerState::Off,
                VmState::Crashed => PowerState::Unknown,
                s if s.is_live() => PowerState::On,
                _ => PowerState::Unknown,
            })
        })
        .await
    }

    async fn unfence(&self, node: &NodeId) -> Result<()> {
        let t = self.target(node)?;
        self.bounded(node, "unfencing", async {
            t.hypervisor
                .start(&t.domain)
                .await
                .map_err(|e| e.context(format!("libvirt VM fencer: unfencing node {node}")))
        })
        .await
    }
}
