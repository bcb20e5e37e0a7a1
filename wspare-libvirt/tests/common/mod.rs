//! What the libvirt test binaries share: removing their domains, image
//! digests, and the VM fencer's environment for the fencer suite.

#![allow(dead_code, unreachable_pub)]

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sha2::{Digest, Sha256};
use wspare_core::{Error, ErrorKind, Fencer, NodeId, PowerState, Result, VmName};
use wspare_libvirt::{LibvirtHypervisor, LibvirtVmFencer};
use wspare_testkit::suite::fencer::FencerEnv;

/// Destroys and undefines `names` on `uri`, ignoring what is already gone.
pub fn remove_domains(uri: &str, names: &[String]) {
    let Ok(c) = virt::connect::Connect::open(Some(uri)) else {
        return;
    };
    for n in names {
        if let Ok(d) = c.lookup_domain_by_name(n) {
            let _ = d.destroy();
            let _ = d.undefine_flags(virt::sys::VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA);
        }
    }
}

/// SHA-256 of a file's content, hex.
pub fn digest(path: &Path) -> Result<String> {
    let bytes =
        std::fs::read(path).map_err(|e| Error::not_found(format!("{}: {e}", path.display())))?;
    Ok(hex::encode(Sha256::digest(&bytes)))
}

pub fn node(s: &str) -> NodeId {
    NodeId::new(s).unwrap()
}

/// The fencer suite's environment: a [`LibvirtVmFencer`] that fences node
/// `guest-node-a` by destroying `domain` through `fence_hv`. The domain
/// lives on `uri` (where its true power is read, not through the fencer)
/// and is removed when the environment is dropped.
pub struct VmFencerEnv {
    fencer: Arc<LibvirtVmFencer>,
    uri: &'static str,
    domain: VmName,
}

impl VmFencerEnv {
    pub fn new(
        uri: &'static str,
        deadline: Duration,
        fence_hv: LibvirtHypervisor,
        domain: VmName,
    ) -> Self {
        let fencer = LibvirtVmFencer::new(deadline).with_node(
            node("guest-node-a"),
            fence_hv,
            domain.clone(),
        );
        VmFencerEnv {
            fencer: Arc::new(fencer),
            uri,
            domain,
        }
    }
}

#[async_trait]
impl FencerEnv for VmFencerEnv {
    fn fencer(&self) -> Arc<dyn Fencer> {
        self.fencer.clone()
    }
    fn node(&self) -> NodeId {
        node("guest-node-a")
    }
    fn unknown_node(&self) -> NodeId {
        node("guest-node-z")
    }
    async fn true_power(&self) -> Result<PowerState> {
        let (uri, name) = (self.uri, self.domain.to_string());
        tokio::task::spawn_blocking(move || {
            let c = virt::connect::Connect::open(Some(uri))
                .map_err(|e| Error::new(ErrorKind::Unreachable, e.to_string()))?;
            let d = c
                .lookup_domain_by_name(&name)
                .map_err(|e| Error::not_found(e.to_string()))?;
            let active = d
                .is_active()
                .map_err(|e| Error::new(ErrorKind::Backend, e.to_string()))?;
            Ok(if active {
                PowerState::On
            } else {
                PowerState::Off
            })
        })
        .await
        .map_err(|e| Error::new(ErrorKind::Backend, e.to_string()))?
    }
    fn secret(&self) -> Option<String> {
        // libvirt takes credentials from SSH keys, never through the fencer.
        None
    }
}

impl Drop for VmFencerEnv {
    fn drop(&mut self) {
        remove_domains(self.uri, &[self.domain.to_string()]);
    }
}
