//! The tiny test guest, for backends' real-VM tests (libvirt, rsync, the
//! end-to-end test).
//!
//! `scripts/build-guest` builds a Debian cloud kernel and a busybox
//! initramfs whose `/init` reads a counter from the first sector of its
//! first disk (`/dev/vda`), adds one, writes it back with `O_DIRECT`, prints
//! `WSPARE-COUNTER <n>` on the serial console, and then powers off
//! ([`GuestMode::Once`]), keeps counting ([`GuestMode::Loop`]) or stays up
//! ([`GuestMode::Idle`]). An ACPI power-button press powers it off
//! (`WSPARE-POWEROFF`) unless the kernel runs with `acpi=off`. See
//! `docs/testbed.md` and `scripts/guest-init` for every marker.
//!
//! This module builds the guest once per process (the script caches its
//! output across runs), makes fresh disk images, gives a [`VmSpec`] that
//! boots the guest with direct kernel boot, reads the counter from an
//! image, waits for a marker in a console log file and reads the counters
//! printed there ([`console_counters`]). It runs nothing in
//! a hypervisor itself.
//!
//! ```no_run
//! # async fn demo() -> wspare_core::Result<()> {
//! use wspare_testkit::guest::{self, GuestMode};
//! let dir = std::path::Path::new("/tmp/wspare-demo");
//! let disk = dir.join("vda.raw");
//! guest::create_disk(&disk)?;
//! let spec = guest::spec(&"demo".parse()?, &disk, GuestMode::Once)?;
//! // ... define and start it with a backend that logs the console to `log` ...
//! # let log = dir.join("demo.console.log");
//! guest::wait_for_marker(&log, "WSPARE-COUNTER 1", std::time::Duration::from_secs(60)).await?;
//! assert_eq!(guest::read_counter(&disk)?, 1);
//! # Ok(()) }
//! ```

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use wspare_core::{
    Boot, DiskBus, DiskFormat, DiskSpec, Error, ErrorKind, Firmware, Result, VmName, VmSpec,
};

/// Size of a fresh guest disk image (sparse).
pub const DISK_SIZE: u64 = 16 << 20;
/// Memory the guest gets.
pub const MEMORY_MIB: u64 = 128;
/// The counter sector's size.
const SECTOR: usize = 512;

/// What the guest's `/init` does after counting once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestMode {
    /// Count once, print `WSPARE-POWEROFF`, power off.
    Once,
    /// Count again every `interval_ms`, forever (a guest that keeps
    /// writing its disk).
    Loop {
        /// Milliseconds between writes.
        interval_ms: u32,
    },
    /// Count once, then stay up, printing `WSPARE-DISKS` when disks come
    /// and go (hot-plug tests).
    Idle,
}

impl GuestMode {
    /// The kernel command line parameters for this mode.
    pub fn cmdline(self) -> String {
        match self {
            GuestMode::Once => "wspare.mode=once".into(),
            GuestMode::Loop { interval_ms } => {
                format!("wspare.mode=loop wspare.interval_ms={interval_ms}")
            }
            GuestMode::Idle => "wspare.mode=idle".into(),
        }
    }
}

/// The built kernel and initramfs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuestImage {
    /// The kernel.
    pub kernel: PathBuf,
    /// The busybox initramfs.
    pub initrd: PathBuf,
}

fn err(msg: impl Into<String>) -> Error {
    Error::new(ErrorKind::Backend, msg)
}

/// The repository root (the workspace directory).
pub fn repo_root() -> PathBuf {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    here.parent().unwrap_or(here).to_path_buf()
}

/// Where the guest is built: `$WSPARE_GUEST_DIR`, else `<repo>/target/guest`
/// (shared by every target dir, the script's cache key decides rebuilds).
pub fn guest_dir() -> PathBuf {
    std::env::var_os("WSPARE_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target").join("guest"))
}

/// Builds the guest (once per process; `scripts/build-guest` itself skips
/// the work when its inputs did not change) and returns its files. Runs
/// under `flock` so that test processes running at once do not build over
/// each other. The error carries the tail of the script's output.
pub fn build() -> Result<GuestImage> {
    static BUILT: OnceLock<std::result::Result<GuestImage, String>> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let dir = guest_dir();
            std::fs::create_dir_all(&dir)
                .map_err(|e| format!("creating {}: {e}", dir.display()))?;
            let script = repo_root().join("scripts").join("build-guest");
            let lock = dir.with_extension("lock");
            let out = Command::new("flock")
                .arg(&lock)
                .arg(&script)
                .arg(&dir)
                .output()
                .map_err(|e| {
                    format!("running flock {} {}: {e}", lock.display(), script.display())
                })?;
            if !out.status.success() {
                let stderr = String::from_utf8_lossy(&out.stderr);
                let tail: Vec<&str> = stderr.lines().rev().take(15).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                return Err(format!(
                    "{} {} failed ({}); run .ci/install-deps first. Output:\n{}",
                    script.display(),
                    dir.display(),
                    out.status,
                    tail.join("\n")
                ));
            }
            let img = GuestImage {
                kernel: dir.join("vmlinuz"),
                initrd: dir.join("initrd.img"),
            };
            for f in [&img.kernel, &img.initrd] {
                if !f.is_file() {
                    return Err(format!(
                        "{} succeeded but {} is missing",
                        script.display(),
                        f.display()
                    ));
                }
            }
            Ok(img)
        })
        .clone()
        .map_err(err)
}

/// Creates (or replaces) a sparse raw image of [`DISK_SIZE`] whose counter
/// reads 0.
pub fn create_disk(path: &Path) -> Result<()> {
    let io = |e: std::io::Error| err(format!("creating guest disk {}: {e}", path.display()));
    let mut f = std::fs::File::create(path).map_err(io)?;
    let mut sector = [0u8; SECTOR];
    let head = b"WSPARE 0\n";
    sector[..head.len()].copy_from_slice(head);
    f.write_all(&sector).map_err(io)?;
    f.set_len(DISK_SIZE).map_err(io)?;
    f.sync_all().map_err(io)
}

/// Parses a counter sector: `WSPARE <n>\n` then NUL padding; all zero is 0.
pub fn parse_counter(sector: &[u8]) -> Result<u64> {
    let text: Vec<u8> = sector.iter().copied().filter(|&b| b != 0).collect();
    let text = String::from_utf8_lossy(&text);
    let line = text.lines().next().unwrap_or("");
    if line.is_empty() {
        return Ok(0);
    }
    line.strip_prefix("WSPARE ")
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| err(format!("bad counter sector: {line:?}")))
}

/// Reads the counter the guest keeps in the first sector of `image` (a raw
/// image or block device).
pub fn read_counter(image: &Path) -> Result<u64> {
    let mut f =
        std::fs::File::open(image).map_err(|e| err(format!("opening {}: {e}", image.display())))?;
    let mut sector = [0u8; SECTOR];
    f.read_exact(&mut sector).map_err(|e| {
        err(format!(
            "reading the counter sector of {}: {e}",
            image.display()
        ))
    })?;
    parse_counter(&sector).map_err(|e| e.context(image.display()))
}

/// A spec for the guest named `name` on `disk` (slot `vda`, raw, virtio),
/// one vCPU, [`MEMORY_MIB`], direct kernel boot with `mode` on the command
/// line. Builds the guest if needed.
pub fn spec(name: &VmName, disk: &Path, mode: GuestMode) -> Result<VmSpec> {
    spec_with_cmdline(name, disk, mode, "")
}

/// Like [`spec`], with `extra` appended to the kernel command line
/// (`acpi=off` makes a guest that ignores ACPI shutdown requests).
pub fn spec_with_cmdline(
    name: &VmName,
    disk: &Path,
    mode: GuestMode,
    extra: &str,
) -> Result<VmSpec> {
    let img = build()?;
    let disk = std::path::absolute(disk).map_err(|e| err(format!("{}: {e}", disk.display())))?;
    let mut cmdline = format!("console=ttyS0 quiet panic=-1 {}", mode.cmdline());
    if !extra.is_empty() {
        cmdline.push(' ');
        cmdline.push_str(extra);
    }
    Ok(VmSpec {
        name: name.clone(),
        vcpus: 1,
        memory_mib: MEMORY_MIB,
        firmware: Firmware::Bios,
        disks: vec![DiskSpec {
            target: "vda".into(),
            path: disk,
            format: DiskFormat::Raw,
            bus: DiskBus::Virtio,
            read_only: false,
        }],
        nics: Vec::new(),
        boot: Boot::Kernel {
            kernel: img.kernel,
            initrd: Some(img.initrd),
            cmdline,
        },
    })
}

/// The console log as text (empty if the file does not exist yet).
pub fn read_console(log: &Path) -> String {
    std::fs::read(log)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

/// The marker the guest prints after each successful write of its counter.
pub const COUNTER_MARKER: &str = "WSPARE-COUNTER";

/// The counter values the guest printed (`WSPARE-COUNTER <n>`) in console
/// text (a log from [`read_console`], or one line of it), in order. A
/// marker may stand anywhere in a line (console output interleaves); one
/// without a number after it (a line cut short) is skipped.
pub fn console_counters(text: &str) -> Vec<u64> {
    text.lines()
        .flat_map(|l| l.split(COUNTER_MARKER).skip(1))
        .filter_map(|rest| {
            // The marker is followed by one space and the number.
            rest.strip_prefix(' ')?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .collect()
}

/// Waits until a line of the console log `log` contains `needle` and
/// returns that line; fails with `Timeout` after `timeout`, showing the end
/// of the log.
pub async fn wait_for_marker(log: &Path, needle: &str, timeout: Duration) -> Result<String> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let text = read_console(log);
        if let Some(line) = text.lines().find(|l| l.contains(needle)) {
            return Ok(line.trim_end_matches('\r').to_owned());
        }
        if tokio::time::Instant::now() >= deadline {
            let tail: Vec<&str> = text.lines().rev().take(12).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            return Err(Error::timeout(format!(
                "no line with {needle:?} in console log {} after {timeout:?}; last lines:\n{}",
                log.display(),
                tail.join("\n")
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_and_counter() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("vda.raw");
        create_disk(&p).unwrap();
        assert_eq!(std::fs::metadata(&p).unwrap().len(), DISK_SIZE);
        assert_eq!(read_counter(&p).unwrap(), 0);
        let mut sector = [0u8; SECTOR];
        sector[..10].copy_from_slice(b"WSPARE 42\n");
        assert_eq!(parse_counter(&sector).unwrap(), 42);
        assert_eq!(parse_counter(&[0u8; SECTOR]).unwrap(), 0);
        assert!(parse_counter(b"garbage\n").is_err());
        assert!(read_counter(&dir.path().join("missing")).is_err());
    }

    #[test]
    fn modes() {
        assert_eq!(
            GuestMode::Loop { interval_ms: 200 }.cmdline(),
            "wspare.mode=loop wspare.interval_ms=200"
        );
        assert_eq!(GuestMode::Once.cmdline(), "wspare.mode=once");
    }

    #[test]
    fn counters_on_a_console() {
        let log = "WSPARE-BOOT mode=loop kernel=6.1 uptime=3.1\r\n\
                   WSPARE-COUNTER 1\r\n\
                   [    4.2] random: crng init done WSPARE-COUNTER 2\r\n\
                   WSPARE-COUNTER\r\n\
                   WSPARE-COUNTER x\n\
                   WSPARE-COUNTER 10\n\
                   WSPARE-POWEROFF\n";
        assert_eq!(console_counters(log), vec![1, 2, 10]);
        assert_eq!(console_counters("WSPARE-COUNTER 7"), vec![7]);
        assert!(console_counters("").is_empty());
        assert!(console_counters("WSPARE-BOOT mode=once\n").is_empty());
    }

    #[tokio::test]
    async fn marker_wait() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("c.log");
        let e = wait_for_marker(&log, "WSPARE-COUNTER 1", Duration::from_millis(200))
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Timeout);
        std::fs::write(&log, "boot\r\nWSPARE-COUNTER 1\r\n").unwrap();
        let line = wait_for_marker(&log, "WSPARE-COUNTER", Duration::from_secs(1))
            .await
            .unwrap();
        assert_eq!(line, "WSPARE-COUNTER 1");
    }
}
