//! [`VmSpec`]: a hypervisor-neutral description of a VM.
//!
//! Each backend renders it (libvirt XML, `xl.cfg`, `New-VM`) and reads it
//! back; that is what lets a replica of a Xen guest start on KVM. The spec
//! holds what a spare needs to boot the same guest, not every tuning knob.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::ids::VmName;

/// A VM, independent of any hypervisor.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct VmSpec {
    /// The VM's name.
    pub name: VmName,
    /// Virtual CPUs, at least 1.
    pub vcpus: u32,
    /// Memory in MiB, at least 16.
    pub memory_mib: u64,
    /// Firmware the guest boots with.
    #[serde(default)]
    pub firmware: Firmware,
    /// Disks, in the order the guest sees them.
    #[serde(default)]
    pub disks: Vec<DiskSpec>,
    /// Network interfaces.
    #[serde(default)]
    pub nics: Vec<NicSpec>,
    /// How the guest boots.
    pub boot: Boot,
}

/// Guest firmware.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Firmware {
    /// Legacy BIOS (SeaBIOS, Hyper-V generation 1).
    #[default]
    Bios,
    /// UEFI (OVMF, Hyper-V generation 2).
    Uefi,
}

/// One disk.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct DiskSpec {
    /// Neutral device slot, `vda`, `vdb`, ... (`sda` for SCSI/SATA, `hda`
    /// for IDE). Backends translate it (`xvda` for Xen, a controller
    /// location for Hyper-V).
    pub target: String,
    /// Image path on the host that runs the VM.
    pub path: PathBuf,
    /// Image format.
    #[serde(default)]
    pub format: DiskFormat,
    /// Bus the guest sees.
    #[serde(default)]
    pub bus: DiskBus,
    /// Attached read-only.
    #[serde(default)]
    pub read_only: bool,
}

/// A disk image format.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default, Serialize, Deserialize, Hash)]
#[serde(rename_all = "kebab-case")]
pub enum DiskFormat {
    /// Raw image or block device.
    #[default]
    Raw,
    /// QEMU copy-on-write v2.
    Qcow2,
    /// Hyper-V virtual hard disk.
    Vhdx,
}

impl DiskFormat {
    /// Name as QEMU and libvirt spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            DiskFormat::Raw => "raw",
            DiskFormat::Qcow2 => "qcow2",
            DiskFormat::Vhdx => "vhdx",
        }
    }
}

/// The bus a disk is attached to.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default, Serialize, Deserialize, Hash)]
#[serde(rename_all = "kebab-case")]
pub enum DiskBus {
    /// Paravirtual (virtio-blk, Xen PV, Hyper-V synthetic SCSI).
    #[default]
    Virtio,
    /// Emulated SCSI.
    Scsi,
    /// Emulated SATA.
    Sata,
    /// Emulated IDE.
    Ide,
}

/// One network interface.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct NicSpec {
    /// The MAC, kept across failover so the guest's network config holds.
    pub mac: MacAddr,
    /// What the NIC is plugged into on the host.
    #[serde(default)]
    pub source: NicSource,
    /// The emulated model.
    #[serde(default)]
    pub model: NicModel,
}

/// What a NIC is plugged into.
#[derive(Clone, PartialEq, Eq, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub enum NicSource {
    /// A host bridge (Linux bridge, Xen bridge, Hyper-V virtual switch).
    Bridge(String),
    /// A named hypervisor network (libvirt network).
    Network(String),
    /// Not connected: used for isolated test clones.
    #[default]
    Isolated,
}

/// NIC model.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NicModel {
    /// virtio-net / Xen netfront / Hyper-V synthetic.
    #[default]
    Virtio,
    /// Intel e1000.
    E1000,
    /// Realtek 8139.
    Rtl8139,
}

/// How the guest boots.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub enum Boot {
    /// Direct kernel boot.
    Kernel {
        /// Kernel image path on the host.
        kernel: PathBuf,
        /// Initial ramdisk path on the host.
        #[serde(default)]
        initrd: Option<PathBuf>,
        /// Kernel command line.
        #[serde(default)]
        cmdline: String,
    },
    /// Boot from the first disk.
    Disk,
}

/// A MAC address.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct MacAddr(pub [u8; 6]);

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl fmt::Debug for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")
    }
}

impl FromStr for MacAddr {
    type Err = Error;
    /// Accepts `52:54:00:12:34:56` and `52-54-00-12-34-56` (Hyper-V), any case.
    fn from_str(s: &str) -> Result<Self, Error> {
        let bad = || {
            Error::invalid(format!(
                "invalid MAC address {s:?}: expected six hex pairs like 52:54:00:12:34:56"
            ))
        };
        let parts: Vec<&str> = s.split([':', '-']).collect();
        if parts.len() != 6 {
            return Err(bad());
        }
        let mut m = [0u8; 6];
        for (i, p) in parts.iter().enumerate() {
            if p.len() != 2 {
                return Err(bad());
            }
            m[i] = u8::from_str_radix(p, 16).map_err(|_| bad())?;
        }
        Ok(MacAddr(m))
    }
}

impl Serialize for MacAddr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MacAddr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Checks free text that a backend will quote into XML, a config file or a
/// command: non-empty where `required`, at most 4096 bytes, no control
/// characters. Quoting is each backend's duty; this keeps out what no quoting
/// makes safe in every target (newlines in `xl.cfg`, NUL in argv).
pub fn validate_text(what: &str, s: &str, required: bool) -> Result<(), Error> {
    if required && s.is_empty() {
        return Err(Error::invalid(format!("{what} is empty")));
    }
    if s.len() > 4096 {
        return Err(Error::invalid(format!(
            "{what} is {} bytes long, at most 4096 are allowed",
            s.len()
        )));
    }
    // U+FFFE and U+FFFF cannot appear in XML (libvirt domains).
    if let Some(c) = s
        .chars()
        .find(|c| c.is_control() || matches!(*c, '\u{FFFE}' | '\u{FFFF}'))
    {
        return Err(Error::invalid(format!(
            "{what} {s:?} contains control character {c:?}"
        )));
    }
    Ok(())
}

fn validate_path(what: &str, p: &std::path::Path) -> Result<(), Error> {
    let s = p
        .to_str()
        .ok_or_else(|| Error::invalid(format!("{what} {p:?} is not valid UTF-8")))?;
    validate_text(what, s, true)
}

/// Checks a disk slot name: a lowercase letter run then optional digits and
/// letters, at most 16 bytes (`vda`, `sdb`, `xvdc`, `hdd`).
pub fn validate_disk_target(target: &str) -> Result<(), Error> {
    let ok = !target.is_empty()
        && target.len() <= 16
        && target.as_bytes()[0].is_ascii_lowercase()
        && target
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "invalid disk target {target:?}: expected a device slot like vda or sdb"
        )))
    }
}

impl VmSpec {
    /// Checks the whole spec; the error names the VM and the field.
    pub fn validate(&self) -> Result<(), Error> {
        let vm = &self.name;
        let ctx = |e: Error| e.context(format!("VM spec {vm}"));
        if self.vcpus == 0 || self.vcpus > 1024 {
            return Err(ctx(Error::invalid(format!(
                "vcpus = {} is outside 1..=1024",
                self.vcpus
            ))));
        }
        if self.memory_mib < 16 {
            return Err(ctx(Error::invalid(format!(
                "memory-mib = {} is below 16",
                self.memory_mib
            ))));
        }
        let mut targets = std::collections::HashSet::new();
        for (i, d) in self.disks.iter().enumerate() {
            validate_disk_target(&d.target)
                .map_err(|e| ctx(e.context(format!("disks[{i}].target"))))?;
            validate_path(&format!("disks[{i}].path"), &d.path).map_err(ctx)?;
            if !targets.insert(d.target.as_str()) {
                return Err(ctx(Error::invalid(format!(
                    "disks[{i}].target {:?} is used twice",
                    d.target
                ))));
            }
        }
        let mut macs = std::collections::HashSet::new();
        for (i, n) in self.nics.iter().enumerate() {
            if !macs.insert(n.mac) {
                return Err(ctx(Error::invalid(format!(
                    "nics[{i}].mac {} is used twice",
                    n.mac
                ))));
            }
            if n.mac.0[0] & 1 == 1 {
                return Err(ctx(Error::invalid(format!(
                    "nics[{i}].mac {} is a multicast address",
                    n.mac
                ))));
            }
            match &n.source {
                NicSource::Bridge(s) | NicSource::Network(s) => {
                    validate_text(&format!("nics[{i}].source"), s, true).map_err(ctx)?
                }
                NicSource::Isolated => {}
            }
        }
        match &self.boot {
            Boot::Kernel {
                kernel,
                initrd,
                cmdline,
            } => {
                validate_path("boot.kernel", kernel).map_err(ctx)?;
                if let Some(i) = initrd {
                    validate_path("boot.initrd", i).map_err(ctx)?;
                }
                validate_text("boot.cmdline", cmdline, false).map_err(ctx)?;
            }
            Boot::Disk => {
                if self.disks.is_empty() {
                    return Err(ctx(Error::invalid("boot = disk but the VM has no disks")));
                }
            }
        }
        Ok(())
    }

    /// The disk in slot `target`.
    pub fn disk(&self, target: &str) -> Option<&DiskSpec> {
        self.disks.iter().find(|d| d.target == target)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::error::ErrorKind;

    pub(crate) fn sample() -> VmSpec {
        VmSpec {
            name: VmName::new("web").unwrap(),
            vcpus: 2,
            memory_mib: 512,
            firmware: Firmware::Bios,
            disks: vec![DiskSpec {
                target: "vda".into(),
                path: "/var/lib/wspare/web/vda.raw".into(),
                format: DiskFormat::Raw,
                bus: DiskBus::Virtio,
                read_only: false,
            }],
            nics: vec![NicSpec {
                mac: "52:54:00:12:34:56".parse().unwrap(),
                source: NicSource::Bridge("br0".into()),
                model: NicModel::Virtio,
            }],
            boot: Boot::Kernel {
                kernel: "/boot/vmlinuz".into(),
                initrd: Some("/boot/initrd.img".into()),
                cmdline: "console=ttyS0 wspare.mode=once".into(),
            },
        }
    }

    #[test]
    fn valid_spec_round_trips_through_toml_and_json() {
        let s = sample();
        s.validate().unwrap();
        let t = toml::to_string(&s).unwrap();
        assert!(t.contains("memory-mib = 512"), "{t}");
        assert_eq!(toml::from_str::<VmSpec>(&t).unwrap(), s);
        let j = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<VmSpec>(&j).unwrap(), s);
    }

    #[test]
    fn invalid_specs_name_the_field() {
        let mut s = sample();
        s.vcpus = 0;
        assert!(s
            .validate()
            .unwrap_err()
            .to_string()
            .contains("VM spec web: vcpus = 0"));
        let mut s = sample();
        s.disks[0].target = "../x".into();
        let e = s.validate().unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidInput);
        assert!(e.to_string().contains("disks[0].target"), "{e}");
        let mut s = sample();
        s.disks.push(s.disks[0].clone());
        assert!(s.validate().unwrap_err().to_string().contains("used twice"));
        let mut s = sample();
        s.boot = Boot::Kernel {
            kernel: "/k".into(),
            initrd: None,
            cmdline: "a\nb".into(),
        };
        assert!(s
            .validate()
            .unwrap_err()
            .to_string()
            .contains("boot.cmdline"));
        let mut s = sample();
        s.disks.clear();
        s.boot = Boot::Disk;
        assert!(s.validate().unwrap_err().to_string().contains("no disks"));
        let mut s = sample();
        s.nics[0].mac = "01:00:5e:00:00:01".parse().unwrap();
        assert!(s.validate().unwrap_err().to_string().contains("multicast"));
    }

    #[test]
    fn mac_parsing() {
        let m: MacAddr = "52-54-00-AB-cd-EF".parse().unwrap();
        assert_eq!(m.to_string(), "52:54:00:ab:cd:ef");
        for bad in [
            "",
            "52:54:00:ab:cd",
            "52:54:00:ab:cd:ef:01",
            "zz:54:00:ab:cd:ef",
            "5254:00:ab:cd:ef:0",
        ] {
            assert!(bad.parse::<MacAddr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn unknown_fields_are_rejected() {
        let e = toml::from_str::<VmSpec>(
            "name = \"w\"\nvcpus = 1\nmemory-mib = 64\nboot = \"disk\"\ncpus = 2\n",
        )
        .unwrap_err();
        assert!(e.to_string().contains("unknown field `cpus`"), "{e}");
    }
}
