//! Domain XML: rendering a [`VmSpec`] and reading one back, plus the disk
//! and snapshot fragments. Pure functions, no libvirt calls, so every rule
//! here is tested without a daemon (see the round-trip property test).
//!
//! What is rendered:
//!
//! | `VmSpec` | domain XML |
//! |---|---|
//! | name, vcpus, memory | `<name>`, `<vcpu placement='static'>`, `<memory unit='KiB'>` |
//! | firmware | nothing for BIOS, `<os firmware='efi'>` for UEFI |
//! | boot | `<kernel>`/`<initrd>`/`<cmdline>` for direct kernel boot, `<boot dev='hd'/>` for disk |
//! | disk | `<disk type='file'>` (`type='block'` for paths under `/dev/`), `<driver type=raw\|qcow2\|vhdx>`, `<target dev bus>`, `<readonly/>` |
//! | NIC | `type='bridge'` / `type='network'`; isolated = `type='ethernet'` with `<link state='down'/>` |
//!
//! Plus what every guest needs and `VmSpec` does not carry: ACPI and APIC
//! (graceful shutdown), UTC clock, a serial console (`pty`, or a log file
//! when the backend is configured with a console directory) and, for QEMU,
//! the guest agent channel (quiesced freezes). Reading back ignores what
//! `VmSpec` does not describe (controllers, emulator, consoles, graphics)
//! and refuses, as `Unsupported`, what it cannot describe without losing
//! something that matters to a spare (network disks, macvtap NICs...).
//!
//! For libvirt's Xen driver (`DomainType::Xen`) the neutral slot `vda` on
//! the virtio bus is rendered as `xvda` on the `xen` bus and read back the
//! other way, and virtio NICs get no model (netfront).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use wspare_core::{
    Boot, DiskBus, DiskFormat, DiskSpec, Firmware, MacAddr, NicModel, NicSource, NicSpec, VmName,
    VmSpec,
};

/// The `type` attribute of `<domain>`: which accelerator or driver runs it.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
pub enum DomainType {
    /// QEMU with KVM acceleration: production on the `qemu` driver.
    Kvm,
    /// QEMU with TCG software emulation: tests, CI and hosts without KVM.
    Qemu,
    /// Xen through libvirt's libxl driver (`xen:///system`).
    Xen,
    /// libvirt's mock `test` driver.
    Test,
}

impl DomainType {
    /// The attribute value.
    pub fn as_str(self) -> &'static str {
        match self {
            DomainType::Kvm => "kvm",
            DomainType::Qemu => "qemu",
            DomainType::Xen => "xen",
            DomainType::Test => "test",
        }
    }

    fn is_qemu(self) -> bool {
        matches!(self, DomainType::Kvm | DomainType::Qemu)
    }
}

/// Rendering choices that come from the backend's configuration, not from
/// the spec.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RenderOptions {
    /// `<domain type=...>`.
    pub domain_type: DomainType,
    /// `<type arch=...>`; `None` lets libvirt pick the host's.
    pub arch: Option<String>,
    /// `<type machine=...>` (`pc`, `q35`); `None` lets libvirt pick.
    pub machine: Option<String>,
    /// The UUID to keep when redefining an existing domain.
    pub uuid: Option<String>,
    /// Write the serial console to this file (truncated at each start)
    /// instead of a pty.
    pub console_log: Option<PathBuf>,
    /// Add the QEMU guest agent channel (QEMU domain types only).
    pub guest_agent: bool,
}

impl RenderOptions {
    /// Defaults for a domain type: no arch, machine, UUID or console file;
    /// the guest agent channel on QEMU.
    pub fn new(domain_type: DomainType) -> Self {
        RenderOptions {
            domain_type,
            arch: None,
            machine: None,
            uuid: None,
            console_log: None,
            guest_agent: domain_type.is_qemu(),
        }
    }
}

/// Why domain XML could not be read as a [`VmSpec`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParseError {
    /// The domain uses something a `VmSpec` cannot describe (as opposed to
    /// XML that is broken).
    pub unsupported: bool,
    /// What.
    pub what: String,
}

impl ParseError {
    fn bad(what: impl Into<String>) -> Self {
        ParseError {
            unsupported: false,
            what: what.into(),
        }
    }
    fn unsupported(what: impl Into<String>) -> Self {
        ParseError {
            unsupported: true,
            what: what.into(),
        }
    }
}

/// Escapes text for an XML element or a single- or double-quoted attribute.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            // Whitespace controls would be normalised by attribute parsing;
            // character references keep them (validation rejects them anyway).
            '\t' | '\n' | '\r' => {
                let _ = write!(out, "&#{};", c as u32);
            }
            c => out.push(c),
        }
    }
    out
}

/// Checks that XML 1.0 can carry `s` at all (no NUL, no C0 controls other
/// than tab/LF/CR, no U+FFFE/U+FFFF): what no escaping can fix.
fn check_xml_text(what: &str, s: &str) -> Result<(), String> {
    match s.chars().find(|&c| {
        let u = c as u32;
        (u < 0x20 && !matches!(c, '\t' | '\n' | '\r')) || u == 0xFFFE || u == 0xFFFF
    }) {
        Some(c) => Err(format!(
            "{what} {s:?} contains U+{:04X}, which XML cannot carry",
            c as u32
        )),
        None => Ok(()),
    }
}

fn path_str<'a>(what: &str, p: &'a Path) -> Result<&'a str, String> {
    let s = p
        .to_str()
        .ok_or_else(|| format!("{what} {p:?} is not valid UTF-8"))?;
    if !s.starts_with('/') {
        return Err(format!("{what} {s:?} is not an absolute path (libvirt resolves paths on the host that runs the VM)"));
    }
    check_xml_text(what, s)?;
    Ok(s)
}

fn is_block_device(path: &str) -> bool {
    path.starts_with("/dev/")
}

fn bus_str(bus: DiskBus, dt: DomainType) -> &'static str {
    match bus {
        DiskBus::Virtio if dt == DomainType::Xen => "xen",
        DiskBus::Virtio => "virtio",
        DiskBus::Scsi => "scsi",
        DiskBus::Sata => "sata",
        DiskBus::Ide => "ide",
    }
}

/// The device name libvirt sees for a neutral slot (`xvda` for Xen's PV bus).
pub fn target_dev(target: &str, bus: DiskBus, dt: DomainType) -> String {
    if dt == DomainType::Xen && bus == DiskBus::Virtio {
        if let Some(rest) = target.strip_prefix("vd") {
            return format!("xvd{rest}");
        }
    }
    target.to_owned()
}

/// Renders one `<disk>` element (also used for hot-plug and detach).
pub fn render_disk(d: &DiskSpec, dt: DomainType) -> Result<String, String> {
    let what = format!("disk {}", d.target);
    wspare_core::spec::validate_disk_target(&d.target).map_err(|e| e.message().to_owned())?;
    let path = path_str(&format!("{what} path"), &d.path)?;
    let mut x = String::new();
    let (kind, attr) = if is_block_device(path) {
        ("block", "dev")
    } else {
        ("file", "file")
    };
    let _ = writeln!(x, "    <disk type='{kind}' device='disk'>");
    let _ = writeln!(
        x,
        "      <driver name='qemu' type='{}'/>",
        d.format.as_str()
    );
    let _ = writeln!(x, "      <source {attr}='{}'/>", escape(path));
    let _ = writeln!(
        x,
        "      <target dev='{}' bus='{}'/>",
        escape(&target_dev(&d.target, d.bus, dt)),
        bus_str(d.bus, dt)
    );
    if d.read_only {
        x.push_str("      <readonly/>\n");
    }
    x.push_str("    </disk>\n");
    Ok(x)
}

fn render_nic(n: &NicSpec, dt: DomainType) -> Result<String, String> {
    let mut x = String::new();
    let (kind, source) = match &n.source {
        NicSource::Bridge(b) => {
            check_xml_text("bridge name", b)?;
            ("bridge", Some(format!("<source bridge='{}'/>", escape(b))))
        }
        NicSource::Network(net) => {
            check_xml_text("network name", net)?;
            (
                "network",
                Some(format!("<source network='{}'/>", escape(net))),
            )
        }
        NicSource::Isolated => ("ethernet", None),
    };
    let _ = writeln!(x, "    <interface type='{kind}'>");
    let _ = writeln!(x, "      <mac address='{}'/>", n.mac);
    if let Some(s) = source {
        let _ = writeln!(x, "      {s}");
    }
    let model = match n.model {
        NicModel::Virtio if dt == DomainType::Xen => None,
        NicModel::Virtio => Some("virtio"),
        NicModel::E1000 => Some("e1000"),
        NicModel::Rtl8139 => Some("rtl8139"),
    };
    if let Some(m) = model {
        let _ = writeln!(x, "      <model type='{m}'/>");
    }
    if n.source == NicSource::Isolated {
        x.push_str("      <link state='down'/>\n");
    }
    x.push_str("    </interface>\n");
    Ok(x)
}

/// Renders a complete domain definition. The spec must be valid
/// ([`VmSpec::validate`]); this adds the checks only XML and libvirt need
/// (absolute UTF-8 paths, characters XML can carry). The error says what
/// is wrong.
pub fn render_domain(spec: &VmSpec, o: &RenderOptions) -> Result<String, String> {
    let dt = o.domain_type;
    let mut x = String::new();
    let _ = writeln!(x, "<domain type='{}'>", dt.as_str());
    let _ = writeln!(x, "  <name>{}</name>", escape(spec.name.as_str()));
    if let Some(u) = &o.uuid {
        let _ = writeln!(x, "  <uuid>{}</uuid>", escape(u));
    }
    let kib = spec
        .memory_mib
        .checked_mul(1024)
        .ok_or_else(|| format!("memory-mib = {} is too large", spec.memory_mib))?;
    let _ = writeln!(x, "  <memory unit='KiB'>{kib}</memory>");
    let _ = writeln!(x, "  <vcpu placement='static'>{}</vcpu>", spec.vcpus);
    match spec.firmware {
        Firmware::Bios => x.push_str("  <os>\n"),
        Firmware::Uefi => x.push_str("  <os firmware='efi'>\n"),
    }
    let mut ty = String::from("    <type");
    if let Some(a) = &o.arch {
        let _ = write!(ty, " arch='{}'", escape(a));
    }
    if let Some(m) = &o.machine {
        let _ = write!(ty, " machine='{}'", escape(m));
    }
    ty.push_str(">hvm</type>\n");
    x.push_str(&ty);
    match &spec.boot {
        Boot::Kernel {
            kernel,
            initrd,
            cmdline,
        } => {
            let _ = writeln!(
                x,
                "    <kernel>{}</kernel>",
                escape(path_str("boot.kernel", kernel)?)
            );
            if let Some(i) = initrd {
                let _ = writeln!(
                    x,
                    "    <initrd>{}</initrd>",
                    escape(path_str("boot.initrd", i)?)
                );
            }
            check_xml_text("boot.cmdline", cmdline)?;
            if !cmdline.is_empty() {
                let _ = writeln!(x, "    <cmdline>{}</cmdline>", escape(cmdline));
            }
        }
        Boot::Disk => x.push_str("    <boot dev='hd'/>\n"),
    }
    x.push_str("  </os>\n");
    x.push_str("  <features>\n    <acpi/>\n    <apic/>\n  </features>\n");
    x.push_str("  <clock offset='utc'/>\n");
    x.push_str("  <on_poweroff>destroy</on_poweroff>\n  <on_reboot>restart</on_reboot>\n  <on_crash>destroy</on_crash>\n");
    x.push_str("  <devices>\n");
    for d in &spec.disks {
        x.push_str(&render_disk(d, dt)?);
    }
    for n in &spec.nics {
        x.push_str(&render_nic(n, dt)?);
    }
    match &o.console_log {
        Some(p) => {
            let p = escape(path_str("console log", p)?);
            let _ = writeln!(
                x,
                "    <serial type='file'>\n      <source path='{p}' append='off'/>\n      <target port='0'/>\n    </serial>"
            );
            let _ = writeln!(
                x,
                "    <console type='file'>\n      <source path='{p}' append='off'/>\n      <target type='serial' port='0'/>\n    </console>"
            );
        }
        None => {
            x.push_str("    <serial type='pty'>\n      <target port='0'/>\n    </serial>\n");
            x.push_str("    <console type='pty'>\n      <target type='serial' port='0'/>\n    </console>\n");
        }
    }
    if o.guest_agent && dt.is_qemu() {
        x.push_str("    <channel type='unix'>\n      <target type='virtio' name='org.qemu.guest_agent.0'/>\n    </channel>\n");
    }
    x.push_str("  </devices>\n</domain>\n");
    Ok(x)
}

fn child<'a, 'i>(n: roxmltree::Node<'a, 'i>, name: &str) -> Option<roxmltree::Node<'a, 'i>> {
    n.children().find(|c| c.has_tag_name(name))
}

fn children<'a, 'i: 'a>(
    n: roxmltree::Node<'a, 'i>,
    name: &'a str,
) -> impl Iterator<Item = roxmltree::Node<'a, 'i>> + 'a {
    n.children().filter(move |c| c.has_tag_name(name))
}

fn text(n: roxmltree::Node<'_, '_>) -> String {
    n.children()
        .filter(|c| c.is_text())
        .filter_map(|c| c.text())
        .collect()
}

fn memory_bytes(n: roxmltree::Node<'_, '_>) -> Result<u128, ParseError> {
    let v: u128 = text(n).trim().parse().map_err(|_| {
        ParseError::bad(format!(
            "<{}> {:?} is not a number",
            n.tag_name().name(),
            text(n)
        ))
    })?;
    let unit = n.attribute("unit").unwrap_or("KiB");
    let mul: u128 = match unit {
        "b" | "bytes" => 1,
        "KB" => 1_000,
        "k" | "KiB" => 1 << 10,
        "MB" => 1_000_000,
        "M" | "MiB" => 1 << 20,
        "GB" => 1_000_000_000,
        "G" | "GiB" => 1 << 30,
        "TB" => 1_000_000_000_000,
        "T" | "TiB" => 1 << 40,
        u => return Err(ParseError::bad(format!("unknown memory unit {u:?}"))),
    };
    Ok(v.saturating_mul(mul))
}

/// One `<disk device='disk'>` as libvirt describes it, live or inactive.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct XmlDisk {
    /// The neutral slot (`vda`, also for Xen's `xvda`).
    pub spec: DiskSpec,
    /// The libvirt target device name (`vda`, `xvda`).
    pub dev: String,
    /// The first element of `<backingStore>`, if libvirt lists one:
    /// (path, format).
    pub backing: Option<(PathBuf, Option<String>)>,
}

impl XmlDisk {
    /// The image under this disk's active layer (the frozen image under a
    /// freeze overlay), with its format; `None` if libvirt lists no
    /// backing file. A format this crate does not know reads as raw.
    pub fn backing_image(&self) -> Option<(PathBuf, DiskFormat)> {
        let (path, format) = self.backing.clone()?;
        let format = format.as_deref().and_then(known_format);
        Some((path, format.unwrap_or(DiskFormat::Raw)))
    }
}

/// The [`DiskFormat`] of libvirt's format name `f`, if `VmSpec` has it.
fn known_format(f: &str) -> Option<DiskFormat> {
    match f {
        "raw" => Some(DiskFormat::Raw),
        "qcow2" => Some(DiskFormat::Qcow2),
        "vhdx" => Some(DiskFormat::Vhdx),
        _ => None,
    }
}

fn parse_format(disk: roxmltree::Node<'_, '_>, dev: &str) -> Result<DiskFormat, ParseError> {
    match child(disk, "driver").and_then(|d| d.attribute("type")) {
        None => Ok(DiskFormat::Raw),
        Some(f) => known_format(f).ok_or_else(|| {
            ParseError::unsupported(format!(
                "disk {dev} has format {f:?}, which VmSpec cannot describe"
            ))
        }),
    }
}

fn source_path<'a>(n: roxmltree::Node<'a, '_>) -> Option<&'a str> {
    let s = child(n, "source")?;
    s.attribute("file").or_else(|| s.attribute("dev"))
}

fn parse_disk(
    disk: roxmltree::Node<'_, '_>,
    dt: Option<DomainType>,
) -> Result<Option<XmlDisk>, ParseError> {
    let target =
        child(disk, "target").ok_or_else(|| ParseError::bad("a <disk> has no <target>"))?;
    let dev = target
        .attribute("dev")
        .ok_or_else(|| ParseError::bad("a <disk> <target> has no dev"))?
        .to_owned();
    match disk.attribute("device").unwrap_or("disk") {
        "disk" => {}
        "cdrom" | "floppy" => return Ok(None),
        other => {
            return Err(ParseError::unsupported(format!(
                "disk {dev} is a {other:?} device, which VmSpec cannot describe"
            )))
        }
    }
    match disk.attribute("type").unwrap_or("file") {
        "file" | "block" => {}
        other => {
            return Err(ParseError::unsupported(format!(
                "disk {dev} has source type {other:?}; VmSpec describes image files and block devices only"
            )))
        }
    }
    let path = source_path(disk)
        .ok_or_else(|| ParseError::unsupported(format!("disk {dev} has no source")))?;
    let bus_attr = target.attribute("bus");
    let (bus, target_name) = match bus_attr {
        Some("virtio") => (DiskBus::Virtio, dev.clone()),
        Some("xen") => (
            DiskBus::Virtio,
            dev.strip_prefix('x').unwrap_or(&dev).to_owned(),
        ),
        Some("scsi") => (DiskBus::Scsi, dev.clone()),
        Some("sata") => (DiskBus::Sata, dev.clone()),
        Some("ide") => (DiskBus::Ide, dev.clone()),
        None if dev.starts_with("vd") => (DiskBus::Virtio, dev.clone()),
        None if dev.starts_with("xvd") && dt == Some(DomainType::Xen) => {
            (DiskBus::Virtio, dev[1..].to_owned())
        }
        None if dev.starts_with("sd") => (DiskBus::Scsi, dev.clone()),
        None if dev.starts_with("hd") => (DiskBus::Ide, dev.clone()),
        Some(b) => {
            return Err(ParseError::unsupported(format!(
                "disk {dev} is on bus {b:?}, which VmSpec cannot describe"
            )))
        }
        None => return Err(ParseError::bad(format!("disk {dev} has no bus"))),
    };
    let backing = child(disk, "backingStore").and_then(|b| {
        source_path(b).map(|p| {
            (
                PathBuf::from(p),
                child(b, "format")
                    .and_then(|f| f.attribute("type"))
                    .map(str::to_owned),
            )
        })
    });
    Ok(Some(XmlDisk {
        spec: DiskSpec {
            target: target_name,
            path: PathBuf::from(path),
            format: parse_format(disk, &dev)?,
            bus,
            read_only: child(disk, "readonly").is_some(),
        },
        dev,
        backing,
    }))
}

fn parse_doc(xml: &str) -> Result<roxmltree::Document<'_>, ParseError> {
    let doc = roxmltree::Document::parse(xml)
        .map_err(|e| ParseError::bad(format!("domain XML does not parse: {e}")))?;
    if !doc.root_element().has_tag_name("domain") {
        return Err(ParseError::bad(format!(
            "root element is <{}>, not <domain>",
            doc.root_element().tag_name().name()
        )));
    }
    Ok(doc)
}

fn domain_type_of(root: roxmltree::Node<'_, '_>) -> Option<DomainType> {
    match root.attribute("type") {
        Some("kvm") => Some(DomainType::Kvm),
        Some("qemu") => Some(DomainType::Qemu),
        Some("xen") => Some(DomainType::Xen),
        Some("test") => Some(DomainType::Test),
        _ => None,
    }
}

/// The disks (`device='disk'`) of a domain, in XML order, with their
/// backing files as libvirt lists them (live XML lists the chain).
pub fn parse_disks(xml: &str) -> Result<Vec<XmlDisk>, ParseError> {
    let doc = parse_doc(xml)?;
    let root = doc.root_element();
    let dt = domain_type_of(root);
    let Some(devices) = child(root, "devices") else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for d in children(devices, "disk") {
        if let Some(d) = parse_disk(d, dt)? {
            out.push(d);
        }
    }
    Ok(out)
}

/// The `<uuid>` of a domain, if the XML has one.
pub fn parse_uuid(xml: &str) -> Result<Option<String>, ParseError> {
    let doc = parse_doc(xml)?;
    Ok(child(doc.root_element(), "uuid").map(|u| text(u).trim().to_owned()))
}

/// Reads domain XML back into a [`VmSpec`].
pub fn parse_domain(xml: &str) -> Result<VmSpec, ParseError> {
    let doc = parse_doc(xml)?;
    let root = doc.root_element();
    let dt = domain_type_of(root);
    let name_text = child(root, "name")
        .map(text)
        .ok_or_else(|| ParseError::bad("no <name>"))?;
    let name = VmName::new(name_text.clone()).map_err(|e| {
        ParseError::unsupported(format!(
            "domain name {name_text:?} is not a valid VM name: {}",
            e.message()
        ))
    })?;

    let mem = child(root, "memory").ok_or_else(|| ParseError::bad("no <memory>"))?;
    let bytes = memory_bytes(mem)?;
    let mib = u64::try_from(bytes.div_ceil(1 << 20))
        .map_err(|_| ParseError::bad("memory is too large"))?;

    let vcpu = child(root, "vcpu").ok_or_else(|| ParseError::bad("no <vcpu>"))?;
    let vcpus_text = vcpu
        .attribute("current")
        .map(str::to_owned)
        .unwrap_or_else(|| text(vcpu));
    let vcpus: u32 = vcpus_text
        .trim()
        .parse()
        .map_err(|_| ParseError::bad(format!("<vcpu> {vcpus_text:?} is not a number")))?;

    let os = child(root, "os").ok_or_else(|| ParseError::bad("no <os>"))?;
    let efi = os.attribute("firmware") == Some("efi")
        || child(os, "loader").is_some_and(|l| l.attribute("type") == Some("pflash"));
    let firmware = if efi { Firmware::Uefi } else { Firmware::Bios };
    let boot = match child(os, "kernel") {
        Some(k) => Boot::Kernel {
            kernel: PathBuf::from(text(k)),
            initrd: child(os, "initrd").map(|i| PathBuf::from(text(i))),
            cmdline: child(os, "cmdline").map(text).unwrap_or_default(),
        },
        None => Boot::Disk,
    };

    let mut disks = Vec::new();
    let mut nics = Vec::new();
    if let Some(devices) = child(root, "devices") {
        for d in children(devices, "disk") {
            if let Some(d) = parse_disk(d, dt)? {
                disks.push(d.spec);
            }
        }
        for i in children(devices, "interface") {
            nics.push(parse_nic(i, dt)?);
        }
    }
    Ok(VmSpec {
        name,
        vcpus,
        memory_mib: mib,
        firmware,
        disks,
        nics,
        boot,
    })
}

fn parse_nic(i: roxmltree::Node<'_, '_>, dt: Option<DomainType>) -> Result<NicSpec, ParseError> {
    let mac_s = child(i, "mac")
        .and_then(|m| m.attribute("address"))
        .ok_or_else(|| ParseError::bad("an <interface> has no MAC address"))?;
    let mac: MacAddr = mac_s
        .parse()
        .map_err(|_| ParseError::bad(format!("interface MAC {mac_s:?} does not parse")))?;
    let src = child(i, "source");
    let link_down = child(i, "link").and_then(|l| l.attribute("state")) == Some("down");
    let source = match i.attribute("type") {
        Some("bridge") => NicSource::Bridge(
            src.and_then(|s| s.attribute("bridge"))
                .ok_or_else(|| ParseError::bad(format!("interface {mac} has no bridge")))?
                .to_owned(),
        ),
        Some("network") => NicSource::Network(
            src.and_then(|s| s.attribute("network"))
                .ok_or_else(|| ParseError::bad(format!("interface {mac} has no network")))?
                .to_owned(),
        ),
        Some("ethernet") if link_down => NicSource::Isolated,
        other => {
            return Err(ParseError::unsupported(format!(
                "interface {mac} of type {:?}{} cannot be described by VmSpec (bridge, network or isolated)",
                other.unwrap_or("?"),
                if other == Some("ethernet") { " with its link up" } else { "" }
            )))
        }
    };
    let model = match child(i, "model").and_then(|m| m.attribute("type")) {
        Some("virtio") => NicModel::Virtio,
        None if dt == Some(DomainType::Xen) => NicModel::Virtio,
        Some("netfront") => NicModel::Virtio,
        Some("e1000") => NicModel::E1000,
        Some("rtl8139") => NicModel::Rtl8139,
        other => {
            return Err(ParseError::unsupported(format!(
                "interface {mac} has model {:?}, which VmSpec cannot describe",
                other.unwrap_or("(none)")
            )))
        }
    };
    Ok(NicSpec { mac, source, model })
}

/// One disk of an external disk-only snapshot: `Some(overlay)` to move the
/// disk onto a new qcow2 overlay, `None` to leave it out (`snapshot='no'`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotDisk {
    /// libvirt target device (`vda`).
    pub dev: String,
    /// The overlay file to create.
    pub overlay: Option<PathBuf>,
}

/// Renders `<domainsnapshot>` for an external, disk-only snapshot.
pub fn render_snapshot(name: &str, disks: &[SnapshotDisk]) -> Result<String, String> {
    let mut x = String::new();
    x.push_str("<domainsnapshot>\n");
    let _ = writeln!(x, "  <name>{}</name>", escape(name));
    x.push_str("  <description>wspare replication freeze; released by an active block commit</description>\n");
    x.push_str("  <disks>\n");
    for d in disks {
        match &d.overlay {
            Some(o) => {
                let o = path_str("overlay", o)?;
                let _ = writeln!(
                    x,
                    "    <disk name='{}' snapshot='external' type='file'>\n      <driver type='qcow2'/>\n      <source file='{}'/>\n    </disk>",
                    escape(&d.dev),
                    escape(o)
                );
            }
            None => {
                let _ = writeln!(x, "    <disk name='{}' snapshot='no'/>", escape(&d.dev));
            }
        }
    }
    x.push_str("  </disks>\n</domainsnapshot>\n");
    Ok(x)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> VmSpec {
        VmSpec {
            name: VmName::new("web").unwrap(),
            vcpus: 2,
            memory_mib: 512,
            firmware: Firmware::Bios,
            disks: vec![
                DiskSpec {
                    target: "vda".into(),
                    path: "/var/lib/wspare/web's \"vda\" & <co>.raw".into(),
                    format: DiskFormat::Raw,
                    bus: DiskBus::Virtio,
                    read_only: false,
                },
                DiskSpec {
                    target: "sdb".into(),
                    path: "/dev/vg0/web-data".into(),
                    format: DiskFormat::Qcow2,
                    bus: DiskBus::Scsi,
                    read_only: true,
                },
            ],
            nics: vec![
                NicSpec {
                    mac: "52:54:00:12:34:56".parse().unwrap(),
                    source: NicSource::Bridge("br0".into()),
                    model: NicModel::Virtio,
                },
                NicSpec {
                    mac: "52:54:00:12:34:57".parse().unwrap(),
                    source: NicSource::Isolated,
                    model: NicModel::E1000,
                },
            ],
            boot: Boot::Kernel {
                kernel: "/boot/vmlinuz".into(),
                initrd: Some("/boot/initrd.img".into()),
                cmdline: "console=ttyS0 a='b' c=\"d\" e&f <g>".into(),
            },
        }
    }

    #[test]
    fn renders_escaped_and_reads_back() {
        let s = sample();
        let xml = render_domain(&s, &RenderOptions::new(DomainType::Qemu)).unwrap();
        assert!(xml.starts_with("<domain type='qemu'>"), "{xml}");
        assert!(
            xml.contains("web&apos;s &quot;vda&quot; &amp; &lt;co&gt;.raw"),
            "{xml}"
        );
        assert!(xml.contains("<disk type='block' device='disk'>"), "{xml}");
        assert!(xml.contains("<source dev='/dev/vg0/web-data'/>"), "{xml}");
        assert!(xml.contains("<link state='down'/>"), "{xml}");
        assert!(xml.contains("org.qemu.guest_agent.0"), "{xml}");
        assert!(xml.contains("<serial type='pty'>"), "{xml}");
        assert_eq!(parse_domain(&xml).unwrap(), s);
        let mut o = RenderOptions::new(DomainType::Kvm);
        o.console_log = Some("/var/log/web.log".into());
        o.uuid = Some("c2e7641d-655e-4d45-a111-cbcb7fb749ef".into());
        o.machine = Some("q35".into());
        let xml = render_domain(&s, &o).unwrap();
        assert!(
            xml.contains("<source path='/var/log/web.log' append='off'/>"),
            "{xml}"
        );
        assert!(xml.contains("<type machine='q35'>hvm</type>"), "{xml}");
        assert_eq!(
            parse_uuid(&xml).unwrap().as_deref(),
            Some("c2e7641d-655e-4d45-a111-cbcb7fb749ef")
        );
        assert_eq!(parse_domain(&xml).unwrap(), s);
    }

    #[test]
    fn xen_translates_slots_and_models() {
        let s = sample();
        let xml = render_domain(&s, &RenderOptions::new(DomainType::Xen)).unwrap();
        assert!(xml.contains("<target dev='xvda' bus='xen'/>"), "{xml}");
        assert!(!xml.contains("guest_agent"), "{xml}");
        assert!(!xml.contains("<model type='virtio'/>"), "{xml}");
        assert_eq!(parse_domain(&xml).unwrap(), s);
    }

    #[test]
    fn rejects_what_xml_or_libvirt_cannot_take() {
        let mut s = sample();
        s.disks[0].path = "relative/vda.raw".into();
        let e = render_domain(&s, &RenderOptions::new(DomainType::Qemu)).unwrap_err();
        assert!(e.contains("not an absolute path"), "{e}");
        let mut s = sample();
        s.boot = Boot::Kernel {
            kernel: "/k".into(),
            initrd: None,
            cmdline: "a\u{FFFE}".into(),
        };
        let e = render_domain(&s, &RenderOptions::new(DomainType::Qemu)).unwrap_err();
        assert!(e.contains("U+FFFE"), "{e}");
    }

    /// libvirt's own output for a domain defined on `test:///default`, plus
    /// what a hand-made QEMU domain carries.
    #[test]
    fn reads_libvirt_output() {
        let xml = r#"<domain type='kvm' id='2'>
  <name>a1</name>
  <uuid>c2e7641d-655e-4d45-a111-cbcb7fb749ef</uuid>
  <memory unit='KiB'>65536</memory>
  <currentMemory unit='KiB'>65536</currentMemory>
  <vcpu placement='static' current='2'>4</vcpu>
  <os>
    <type arch='x86_64' machine='pc-i440fx-7.2'>hvm</type>
    <loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE.fd</loader>
    <boot dev='hd'/>
  </os>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/tmp/x.img.wspare-overlay-1.qcow2' index='2'/>
      <backingStore type='file' index='1'>
        <format type='raw'/>
        <source file='/tmp/x.img'/>
        <backingStore/>
      </backingStore>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='file' device='cdrom'>
      <target dev='hdc' bus='ide'/>
      <readonly/>
    </disk>
    <controller type='usb' index='0'/>
    <interface type='network'>
      <mac address='52:54:00:AA:00:01'/>
      <source network='default'/>
      <target dev='testnet0'/>
      <model type='rtl8139'/>
    </interface>
    <serial type='pty'><target port='0'/></serial>
  </devices>
</domain>"#;
        let s = parse_domain(xml).unwrap();
        assert_eq!(s.vcpus, 2);
        assert_eq!(s.memory_mib, 64);
        assert_eq!(s.firmware, Firmware::Uefi);
        assert_eq!(s.boot, Boot::Disk);
        assert_eq!(s.disks.len(), 1);
        assert_eq!(s.disks[0].format, DiskFormat::Qcow2);
        assert_eq!(s.nics[0].source, NicSource::Network("default".into()));
        assert_eq!(s.nics[0].mac.to_string(), "52:54:00:aa:00:01");
        let d = parse_disks(xml).unwrap();
        assert_eq!(
            d[0].backing,
            Some(("/tmp/x.img".into(), Some("raw".into())))
        );

        let user_nic = xml.replace("type='network'", "type='user'");
        let e = parse_domain(&user_nic).unwrap_err();
        assert!(e.unsupported && e.what.contains("\"user\""), "{e:?}");
        let rbd = xml.replace(
            "<disk type='file' device='disk'>",
            "<disk type='network' device='disk'>",
        );
        assert!(parse_domain(&rbd).unwrap_err().unsupported);
        assert!(
            !parse_domain("<domain><name>x</name>")
                .unwrap_err()
                .unsupported
        );
        assert!(parse_domain("<pool/>").unwrap_err().what.contains("<pool>"));
    }

    #[test]
    fn snapshot_xml() {
        let x = render_snapshot(
            "wspare-freeze-1",
            &[
                SnapshotDisk {
                    dev: "vda".into(),
                    overlay: Some("/img/a b&c.wspare-overlay-1.qcow2".into()),
                },
                SnapshotDisk {
                    dev: "vdb".into(),
                    overlay: None,
                },
            ],
        )
        .unwrap();
        let doc = roxmltree::Document::parse(&x).unwrap();
        let disks: Vec<_> = doc
            .descendants()
            .filter(|n| n.has_tag_name("disk"))
            .collect();
        assert_eq!(disks[0].attribute("snapshot"), Some("external"));
        assert_eq!(
            child(disks[0], "source").unwrap().attribute("file"),
            Some("/img/a b&c.wspare-overlay-1.qcow2")
        );
        assert_eq!(disks[1].attribute("snapshot"), Some("no"));
    }

    // ---- property: VmSpec -> XML -> VmSpec is the identity ----

    fn text_strategy(required: bool) -> impl Strategy<Value = String> {
        // Letters, XML specials, spaces, quotes, non-ASCII and astral chars.
        let min = usize::from(required);
        proptest::collection::vec(
            prop_oneof![
                proptest::char::range('a', 'z'),
                Just('&'),
                Just('<'),
                Just('>'),
                Just('"'),
                Just('\''),
                Just(' '),
                Just(';'),
                Just('é'),
                Just('\u{2028}'),
                Just('😀'),
                Just(']'),
            ],
            min..12,
        )
        .prop_map(|v| v.into_iter().collect())
    }

    fn path_strategy() -> impl Strategy<Value = PathBuf> {
        (text_strategy(true), prop::bool::ANY).prop_map(|(t, dev)| {
            PathBuf::from(if dev {
                format!("/dev/{t}")
            } else {
                format!("/srv/{t}.img")
            })
        })
    }

    fn disk_strategy() -> impl Strategy<Value = DiskSpec> {
        (
            path_strategy(),
            prop_oneof![
                Just(DiskFormat::Raw),
                Just(DiskFormat::Qcow2),
                Just(DiskFormat::Vhdx)
            ],
            prop_oneof![
                Just(DiskBus::Virtio),
                Just(DiskBus::Scsi),
                Just(DiskBus::Sata),
                Just(DiskBus::Ide)
            ],
            prop::bool::ANY,
        )
            .prop_map(|(path, format, bus, read_only)| DiskSpec {
                target: String::new(),
                path,
                format,
                bus,
                read_only,
            })
    }

    fn nic_strategy() -> impl Strategy<Value = NicSpec> {
        (
            any::<[u8; 5]>(),
            prop_oneof![
                text_strategy(true).prop_map(NicSource::Bridge),
                text_strategy(true).prop_map(NicSource::Network),
                Just(NicSource::Isolated)
            ],
            prop_oneof![
                Just(NicModel::Virtio),
                Just(NicModel::E1000),
                Just(NicModel::Rtl8139)
            ],
        )
            .prop_map(|(m, source, model)| NicSpec {
                mac: MacAddr([0x52, m[0], m[1], m[2], m[3], m[4]]),
                source,
                model,
            })
    }

    fn spec_strategy() -> impl Strategy<Value = VmSpec> {
        (
            "[a-z0-9][a-z0-9._-]{0,20}",
            1u32..=64,
            16u64..=1 << 20,
            prop_oneof![Just(Firmware::Bios), Just(Firmware::Uefi)],
            proptest::collection::vec(disk_strategy(), 0..4),
            proptest::collection::vec(nic_strategy(), 0..3),
            prop_oneof![
                Just(None),
                (
                    path_strategy(),
                    proptest::option::of(path_strategy()),
                    text_strategy(false)
                )
                    .prop_map(Some)
            ],
        )
            .prop_map(
                |(name, vcpus, memory_mib, firmware, mut disks, nics, kernel)| {
                    for (i, d) in disks.iter_mut().enumerate() {
                        let letter = char::from(b'a' + i as u8);
                        d.target = match d.bus {
                            DiskBus::Virtio => format!("vd{letter}"),
                            DiskBus::Scsi | DiskBus::Sata => format!("sd{letter}"),
                            DiskBus::Ide => format!("hd{letter}"),
                        };
                    }
                    let boot = match kernel {
                        Some((kernel, initrd, cmdline)) => Boot::Kernel {
                            kernel,
                            initrd,
                            cmdline,
                        },
                        None if disks.is_empty() => Boot::Kernel {
                            kernel: "/boot/vmlinuz".into(),
                            initrd: None,
                            cmdline: String::new(),
                        },
                        None => Boot::Disk,
                    };
                    VmSpec {
                        name: VmName::new(name).unwrap(),
                        vcpus,
                        memory_mib,
                        firmware,
                        disks,
                        nics,
                        boot,
                    }
                },
            )
            .prop_filter("valid spec", |s| s.validate().is_ok())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn vmspec_xml_round_trip(
            spec in spec_strategy(),
            dt in prop_oneof![Just(DomainType::Kvm), Just(DomainType::Qemu), Just(DomainType::Xen), Just(DomainType::Test)],
            console in prop::bool::ANY,
        ) {
            let mut o = RenderOptions::new(dt);
            if console {
                o.console_log = Some(PathBuf::from(format!("/var/log/{}.log", spec.name)));
            }
            let xml = render_domain(&spec, &o).map_err(TestCaseError::fail)?;
            let back = parse_domain(&xml).map_err(|e| TestCaseError::fail(format!("{e:?}\n{xml}")))?;
            prop_assert_eq!(&back, &spec, "{}", xml);
            let disks = parse_disks(&xml).map_err(|e| TestCaseError::fail(e.what))?;
            prop_assert_eq!(disks.into_iter().map(|d| d.spec).collect::<Vec<_>>(), spec.disks.clone());
        }

        #[test]
        fn unrepresentable_chars_are_refused_not_mangled(prefix in text_strategy(false), bad in prop_oneof![Just('\u{FFFE}'), Just('\u{FFFF}')]) {
            let mut spec = sample();
            spec.nics[0].source = NicSource::Bridge(format!("{prefix}{bad}"));
            let e = render_domain(&spec, &RenderOptions::new(DomainType::Qemu)).unwrap_err();
            prop_assert!(e.contains("XML cannot carry"), "{}", e);
        }
    }
}
