//! [`LibvirtConfig`]: which libvirt to talk to and how to render domains.

use std::path::PathBuf;
use std::time::Duration;

use wspare_core::{Error, Result};

use crate::xml::DomainType;

/// The libvirt driver behind a URI, from its scheme (`qemu+ssh` → QEMU).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Driver {
    /// `qemu://`, `qemu+ssh://`, `qemu+tls://`...: KVM or TCG.
    Qemu,
    /// `xen://` or `libxl://`: libvirt's libxl driver.
    Xen,
    /// `test://`: libvirt's in-process mock.
    Test,
    /// Anything else (`lxc`, `ch`, `bhyve`...): basic operations only, and
    /// the domain type must be configured.
    Other,
}

impl Driver {
    /// The driver of a URI such as `qemu+ssh://root@node-a/system`.
    pub fn from_uri(uri: &str) -> Result<Driver> {
        let scheme = uri
            .split_once(':')
            .map(|(s, _)| s)
            .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'-' || b == b'.'))
            .ok_or_else(|| Error::invalid(format!("libvirt URI {uri:?} has no scheme (expected qemu:///system, qemu+ssh://host/system, test:///default...)")))?;
        let base = scheme.split('+').next().unwrap_or(scheme);
        Ok(match base {
            "qemu" | "kvm" => Driver::Qemu,
            "xen" | "libxl" => Driver::Xen,
            "test" => Driver::Test,
            _ => Driver::Other,
        })
    }
}

/// How to reach one host's libvirt and how to render domains for it.
///
/// ```
/// use wspare_libvirt::{DomainType, LibvirtConfig};
/// let mut cfg = LibvirtConfig::new("qemu+ssh://root@node-b/system");
/// cfg.domain_type = Some(DomainType::Kvm);
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LibvirtConfig {
    /// The connection URI: `qemu:///system`, `qemu+ssh://user@host/system`
    /// (add `?keyfile=...&no_tty=1` for unattended SSH), `xen:///system`,
    /// `test:///default`.
    pub uri: String,
    /// `<domain type>`; `None` picks from the driver: `kvm` for QEMU, `xen`
    /// for Xen, `test` for the test driver. Set [`DomainType::Qemu`] for
    /// software emulation (TCG) where KVM is absent, as in CI.
    pub domain_type: Option<DomainType>,
    /// Machine type (`pc`, `q35`); `None` lets libvirt choose.
    pub machine: Option<String>,
    /// Guest architecture; `None` is the host's.
    pub arch: Option<String>,
    /// Write each domain's serial console to `<dir>/<name>.console.log` on
    /// the host that runs it (truncated at each start) instead of a pty.
    pub console_log_dir: Option<PathBuf>,
    /// Add the QEMU guest agent channel to rendered domains and ask the
    /// agent to quiesce filesystems when freezing (falling back to a
    /// crash-consistent freeze when no agent answers).
    pub guest_agent: bool,
    /// Where freeze overlays go; `None` puts each beside its image. Needed
    /// for disks that are block devices.
    pub overlay_dir: Option<PathBuf>,
    /// Deadline of one libvirt call, connecting included.
    pub call_timeout: Duration,
    /// How often state is polled while waiting (shutdown, detach, commit).
    pub poll_interval: Duration,
    /// How long a live disk detach may wait for the guest to release the disk.
    pub detach_timeout: Duration,
    /// How long the block commit of a release may take.
    pub commit_timeout: Duration,
}

impl LibvirtConfig {
    /// Defaults for `uri`: domain type from the driver, guest agent on,
    /// overlays beside the images, 60 s per call, 250 ms polling, 30 s for
    /// a detach, 10 min for a commit.
    pub fn new(uri: impl Into<String>) -> Self {
        LibvirtConfig {
            uri: uri.into(),
            domain_type: None,
            machine: None,
            arch: None,
            console_log_dir: None,
            guest_agent: true,
            overlay_dir: None,
            call_timeout: Duration::from_secs(60),
            poll_interval: Duration::from_millis(250),
            detach_timeout: Duration::from_secs(30),
            commit_timeout: Duration::from_secs(600),
        }
    }

    /// The domain type to render, from the configuration or the driver.
    pub fn effective_domain_type(&self) -> Result<DomainType> {
        if let Some(t) = self.domain_type {
            return Ok(t);
        }
        match Driver::from_uri(&self.uri)? {
            Driver::Qemu => Ok(DomainType::Kvm),
            Driver::Xen => Ok(DomainType::Xen),
            Driver::Test => Ok(DomainType::Test),
            Driver::Other => Err(Error::invalid(format!(
                "libvirt URI {}: set domain_type, the driver has no default this backend knows",
                self.uri
            ))),
        }
    }

    /// Whether the URI names this machine (no host part), so that files it
    /// names can be touched directly.
    pub fn is_local(&self) -> bool {
        match self.uri.split_once("://") {
            Some((_, rest)) => rest.starts_with('/') || rest.is_empty(),
            None => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drivers_and_defaults() {
        assert_eq!(Driver::from_uri("qemu:///system").unwrap(), Driver::Qemu);
        assert_eq!(
            Driver::from_uri("qemu+ssh://root@node-a/system?keyfile=/k").unwrap(),
            Driver::Qemu
        );
        assert_eq!(Driver::from_uri("xen:///system").unwrap(), Driver::Xen);
        assert_eq!(Driver::from_uri("test:///default").unwrap(), Driver::Test);
        assert_eq!(Driver::from_uri("lxc:///system").unwrap(), Driver::Other);
        assert!(Driver::from_uri("/var/run/libvirt").is_err());
        assert!(Driver::from_uri("").is_err());
        assert_eq!(
            LibvirtConfig::new("qemu:///system")
                .effective_domain_type()
                .unwrap(),
            DomainType::Kvm
        );
        assert_eq!(
            LibvirtConfig::new("xen:///system")
                .effective_domain_type()
                .unwrap(),
            DomainType::Xen
        );
        assert!(LibvirtConfig::new("lxc:///system")
            .effective_domain_type()
            .is_err());
        let mut c = LibvirtConfig::new("qemu:///system");
        c.domain_type = Some(DomainType::Qemu);
        assert_eq!(c.effective_domain_type().unwrap(), DomainType::Qemu);
        assert!(c.is_local());
        assert!(LibvirtConfig::new("test:///default").is_local());
        assert!(!LibvirtConfig::new("qemu+ssh://node-a/system").is_local());
    }
}
