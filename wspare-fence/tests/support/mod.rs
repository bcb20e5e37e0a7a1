//! Real-system test support: libvirt TCG domains, virtualbmc BMCs, a stuck
//! BMC, silent sockets, TLS material and Redfish emulators.
//!
//! Needs libvirtd and vbmcd running (`bash .ci/start-services`) and the
//! tools from `.ci/install-deps`; [`require_testbed`] fails the test with
//! what is missing and how to start it, it never skips.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use wspare_core::runner::{CommandError, CommandRunner, LineSink, LocalRunner, Output};
use wspare_core::{Fencer, NodeId, PowerState};
use wspare_testkit::suite::fencer::{FencerEnv, FencerVariant};

pub(crate) const URI: &str = "qemu:///system";
/// The password the test BMCs accept.
pub(crate) const PASSWORD: &str = "fence-test-pw-1";
/// A password they refuse.
pub(crate) const WRONG_PASSWORD: &str = "wrong-pw-2f9c";
pub(crate) const USER: &str = "admin";

/// The node every fixture fences.
pub(crate) fn node() -> NodeId {
    NodeId::new("node-a").unwrap()
}

/// The password a conformance fixture configures: the refused one for
/// [`FencerVariant::WrongCredentials`].
pub(crate) fn password_for(variant: FencerVariant) -> &'static str {
    if variant == FencerVariant::WrongCredentials {
        WRONG_PASSWORD
    } else {
        PASSWORD
    }
}

/// Whatever serves (or plays dead for) a fence device; kept for its `Drop`.
pub(crate) type Server = Box<dyn std::any::Any + Send + Sync>;

/// The BMC a conformance variant needs for `domain`, and its UDP port:
/// virtualbmc, the stuck BMC, or a socket that never answers.
pub(crate) fn ipmi_server(domain: &Domain, variant: FencerVariant) -> (Server, u16) {
    match variant {
        FencerVariant::Normal | FencerVariant::WrongCredentials => {
            let b = Vbmc::add(domain);
            let p = b.port;
            (Box::new(b), p)
        }
        FencerVariant::StuckOn => {
            let (g, p) = stuck_bmc(domain);
            (Box::new(g), p)
        }
        FencerVariant::DeadDevice => {
            let (s, p) = silent_udp();
            (Box::new(s), p)
        }
    }
}

/// A conformance environment: a fencer of [`node`], its device's server
/// and the domain that is the node (the ground truth). Dropped in order:
/// the server, then the domain.
pub(crate) struct Env {
    pub(crate) fencer: Arc<dyn Fencer>,
    pub(crate) secret: &'static str,
    pub(crate) server: Server,
    pub(crate) domain: Domain,
}

#[async_trait]
impl FencerEnv for Env {
    fn fencer(&self) -> Arc<dyn Fencer> {
        self.fencer.clone()
    }
    fn node(&self) -> NodeId {
        node()
    }
    fn unknown_node(&self) -> NodeId {
        NodeId::new("node-z").unwrap()
    }
    async fn true_power(&self) -> wspare_core::Result<PowerState> {
        self.domain.power().map_err(wspare_core::Error::invalid)
    }
    fn secret(&self) -> Option<String> {
        Some(self.secret.to_string())
    }
}

pub(crate) fn venv() -> PathBuf {
    PathBuf::from(std::env::var("WSPARE_VENV").unwrap_or_else(|_| "/opt/wspare-venv".into()))
}

fn support_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support")
}

fn run(cmd: &mut Command) -> Result<String, String> {
    let shown = format!("{cmd:?}");
    let out = cmd
        .output()
        .map_err(|e| format!("cannot run {shown}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{shown} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        ))
    }
}

fn virsh(args: &[&str]) -> Result<String, String> {
    run(Command::new("virsh").arg("-c").arg(URI).args(args))
}

fn vbmc(args: &[&str]) -> Result<String, String> {
    run(Command::new(venv().join("bin/vbmc")).args(args))
}

/// Panics, naming what is missing, unless libvirtd, vbmcd and the tools
/// answer. Checked once per test binary.
pub(crate) fn require_testbed() {
    static CHECK: OnceLock<Result<(), String>> = OnceLock::new();
    let r = CHECK.get_or_init(|| {
        let hint = "run `bash .ci/install-deps && bash .ci/start-services` (CI does)";
        for tool in ["ipmitool", "fence_ipmilan", "openssl", "virsh"] {
            run(Command::new("sh").args(["-c", &format!("command -v {tool}")]))
                .map_err(|_| format!("{tool} is not installed: {hint}"))?;
        }
        virsh(&["list", "--name"]).map_err(|e| format!("libvirtd does not answer: {e}; {hint}"))?;
        vbmc(&["list"]).map_err(|e| format!("vbmcd does not answer: {e}; {hint}"))?;
        run(Command::new(venv().join("bin/python"))
            .args(["-c", "import virtualbmc, sushy_tools, bcrypt"]))
        .map_err(|e| format!("the venv lacks virtualbmc/sushy-tools: {e}; {hint}"))?;
        sweep_stale();
        Ok(())
    });
    if let Err(e) = r {
        panic!("real-system test environment missing: {e}");
    }
}

/// Removes domains and vbmc entries left by test processes that were killed
/// before their guards ran (names `wspare-fence-<tag>-<pid>-<n>` whose pid
/// is gone).
fn sweep_stale() {
    let Ok(list) = virsh(&["list", "--all", "--name"]) else {
        return;
    };
    for name in list
        .lines()
        .map(str::trim)
        .filter(|n| n.starts_with("wspare-fence-"))
    {
        let mut parts = name.rsplit('-');
        let (Some(_n), Some(pid)) = (parts.next(), parts.next()) else {
            continue;
        };
        let Ok(pid) = pid.parse::<u32>() else {
            continue;
        };
        if pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        eprintln!("removing {name}, left behind by test process {pid}");
        let _ = vbmc(&["delete", name]);
        let _ = virsh(&["destroy", name]);
        let _ = virsh(&["undefine", name]);
    }
}

/// A name unique to this process and call.
pub(crate) fn unique(tag: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "wspare-fence-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    )
}

/// A free UDP port on 127.0.0.1 (bound and released: a small race).
pub(crate) fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A free TCP port on 127.0.0.1.
pub(crate) fn free_tcp_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A running libvirt QEMU/TCG domain with no disk (SeaBIOS finds nothing
/// to boot and waits): started in well under a second, destroyed and
/// undefined on drop.
pub(crate) struct Domain {
    pub(crate) name: String,
    pub(crate) uuid: String,
}

impl Domain {
    pub(crate) fn start(tag: &str) -> Domain {
        require_testbed();
        let name = unique(tag);
        let xml = format!(
            "<domain type='qemu'>\
               <name>{name}</name>\
               <memory unit='MiB'>32</memory>\
               <vcpu>1</vcpu>\
               <os><type arch='x86_64' machine='pc'>hvm</type></os>\
               <on_poweroff>destroy</on_poweroff>\
               <devices>\
                 <emulator>/usr/bin/qemu-system-x86_64</emulator>\
                 <controller type='usb' model='none'/>\
                 <memballoon model='none'/>\
               </devices>\
             </domain>"
        );
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(xml.as_bytes()).unwrap();
        virsh(&["define", f.path().to_str().unwrap()]).unwrap();
        let d = Domain {
            uuid: virsh(&["domuuid", &name]).unwrap().trim().to_string(),
            name,
        };
        virsh(&["start", &d.name]).unwrap();
        d
    }

    /// The domain's power as libvirt sees it: the ground truth.
    pub(crate) fn power(&self) -> Result<PowerState, String> {
        let s = virsh(&["domstate", &self.name])?;
        Ok(match s.trim() {
            "running" | "paused" | "in shutdown" => PowerState::On,
            "shut off" => PowerState::Off,
            _ => PowerState::Unknown,
        })
    }

    /// `virsh domstate --reason`.
    pub(crate) fn state_with_reason(&self) -> String {
        virsh(&["domstate", "--reason", &self.name])
            .unwrap_or_default()
            .trim()
            .to_string()
    }
}

impl Drop for Domain {
    fn drop(&mut self) {
        let _ = virsh(&["destroy", &self.name]);
        if let Err(e) = virsh(&["undefine", &self.name]) {
            eprintln!("cleanup: {e}");
        }
    }
}

/// A virtualbmc BMC (served by vbmcd) for a domain; deleted on drop.
pub(crate) struct Vbmc {
    domain: String,
    pub(crate) port: u16,
}

impl Vbmc {
    pub(crate) fn add(domain: &Domain) -> Vbmc {
        let port = free_udp_port();
        // vbmc takes the password only on its command line (test credential).
        let p = port.to_string();
        vbmc(&[
            "add",
            &domain.name,
            "--port",
            &p,
            "--address",
            "127.0.0.1",
            "--username",
            USER,
            "--password",
            PASSWORD,
            "--libvirt-uri",
            URI,
        ])
        .unwrap();
        let bmc = Vbmc {
            domain: domain.name.clone(),
            port,
        };
        vbmc(&["start", &domain.name]).unwrap();
        // vbmc start returns before the BMC listens (and says nothing on a
        // port clash): probe it.
        let t0 = Instant::now();
        loop {
            let out = Command::new("ipmitool")
                .args([
                    "-I",
                    "lanplus",
                    "-H",
                    "127.0.0.1",
                    "-p",
                    &p,
                    "-U",
                    USER,
                    "-E",
                    "-N",
                    "1",
                    "-R",
                    "1",
                ])
                .args(["power", "status"])
                .env("IPMI_PASSWORD", PASSWORD)
                .output()
                .unwrap();
            if out.status.success() {
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "vbmc for {} on port {port} does not answer: {} (vbmc show: {:?})",
                domain.name,
                String::from_utf8_lossy(&out.stderr),
                vbmc(&["show", &domain.name])
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        bmc
    }
}

impl Drop for Vbmc {
    fn drop(&mut self) {
        if let Err(e) = vbmc(&["delete", &self.domain]) {
            eprintln!("cleanup: {e}");
        }
    }
}

/// A child process killed on drop, with the directory of its log.
pub(crate) struct ChildGuard(Child, Option<tempfile::TempDir>);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `cmd` with its stderr in `log`, waits until it prints a line
/// starting with `ready`.
fn spawn_ready(mut cmd: Command, ready: &str, log: &Path) -> ChildGuard {
    let shown = format!("{cmd:?}");
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {shown}: {e}"));
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    let n = out.read_line(&mut line).unwrap();
    assert!(
        n > 0 && line.starts_with(ready),
        "{shown} did not get ready: {line:?}; its stderr: {}",
        std::fs::read_to_string(log).unwrap_or_default()
    );
    // Keep draining stdout so the child never blocks on a full pipe.
    std::thread::spawn(move || {
        let mut sink = String::new();
        while out.read_line(&mut sink).map(|n| n > 0).unwrap_or(false) {
            sink.clear();
        }
    });
    ChildGuard(child, None)
}

/// virtualbmc's VirtualBMC for `domain` with power-off a no-op
/// (`tests/support/stuck_vbmc.py`). Returns the guard and its UDP port.
pub(crate) fn stuck_bmc(domain: &Domain) -> (ChildGuard, u16) {
    let port = free_udp_port();
    let mut cmd = Command::new(venv().join("bin/python"));
    cmd.arg(support_dir().join("stuck_vbmc.py"))
        .args([&domain.name, &port.to_string(), USER])
        .env("STUCK_BMC_PASSWORD", PASSWORD);
    let dir = tempfile::tempdir().unwrap();
    let mut g = spawn_ready(cmd, "listening", &dir.path().join("stuck-bmc.log"));
    g.1 = Some(dir);
    (g, port)
}

/// A UDP socket that never answers: a BMC that is dead (or unreachable
/// with its packets dropped).
pub(crate) fn silent_udp() -> (UdpSocket, u16) {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = s.local_addr().unwrap().port();
    (s, port)
}

/// A TCP listener that never accepts: connections complete in the kernel's
/// backlog, the TLS handshake never gets an answer.
pub(crate) fn silent_tcp() -> (TcpListener, u16) {
    let s = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = s.local_addr().unwrap().port();
    (s, port)
}

/// A test CA and a server certificate for 127.0.0.1 signed by it, in
/// `$CARGO_TARGET_TMPDIR/wspare-fence-tls/<pid>` (a static is never
/// dropped, so directories of finished processes are swept instead).
pub(crate) struct Tls {
    pub(crate) ca: PathBuf,
    pub(crate) cert: PathBuf,
    pub(crate) key: PathBuf,
}

pub(crate) fn tls() -> &'static Tls {
    static TLS: OnceLock<Tls> = OnceLock::new();
    TLS.get_or_init(|| {
        let root = Path::new(env!("CARGO_TARGET_TMPDIR")).join("wspare-fence-tls");
        if let Ok(entries) = std::fs::read_dir(&root) {
            for e in entries.flatten() {
                let pid = e.file_name().to_string_lossy().parse::<u32>().ok();
                if pid.is_some_and(|p| !Path::new(&format!("/proc/{p}")).exists()) {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        let dir = root.join(std::process::id().to_string());
        std::fs::create_dir_all(&dir).unwrap();
        let p = |f: &str| dir.join(f);
        let s = |f: &str| p(f).display().to_string();
        run(Command::new("openssl").args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=wspare-fence test CA",
            "-keyout",
            &s("ca.key"),
            "-out",
            &s("ca.pem"),
        ]))
        .unwrap();
        run(Command::new("openssl").args([
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=127.0.0.1",
            "-keyout",
            &s("key.pem"),
            "-out",
            &s("csr.pem"),
        ]))
        .unwrap();
        std::fs::write(
            p("ext.cnf"),
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n\
             keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n",
        )
        .unwrap();
        run(Command::new("openssl").args([
            "x509",
            "-req",
            "-in",
            &s("csr.pem"),
            "-CA",
            &s("ca.pem"),
            "-CAkey",
            &s("ca.key"),
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            &s("ext.cnf"),
            "-out",
            &s("cert.pem"),
        ]))
        .unwrap();
        Tls {
            ca: p("ca.pem"),
            cert: p("cert.pem"),
            key: p("key.pem"),
        }
    })
}

/// Which Redfish server to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Emulator {
    /// The unmodified `sushy-emulator` (basic auth only).
    Sushy,
    /// sushy-tools' app with the session layer (`tests/support/redfish_emulator.py`).
    WithSessions,
    /// The same, with ForceOff accepted and ignored.
    StuckOff,
}

/// A Redfish emulator over TLS exposing only `domain`; killed on drop.
pub(crate) struct Redfish {
    _child: ChildGuard,
    _dir: tempfile::TempDir,
    pub(crate) port: u16,
}

impl Redfish {
    pub(crate) fn start(domain: &Domain, kind: Emulator) -> Redfish {
        let tls = tls();
        let dir = tempfile::tempdir().unwrap();
        let htpasswd = dir.path().join("htpasswd");
        // The password goes to the hashing script on stdin.
        let mut hash = Command::new(venv().join("bin/python"))
            .args([
                "-c",
                "import sys, bcrypt; u, p = sys.stdin.read().split('\\n')[:2]; \
                 print(u + ':' + bcrypt.hashpw(p.encode(), bcrypt.gensalt(rounds=4)).decode())",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        hash.stdin
            .take()
            .unwrap()
            .write_all(format!("{USER}\n{PASSWORD}\n").as_bytes())
            .unwrap();
        let out = hash.wait_with_output().unwrap();
        assert!(out.status.success());
        std::fs::write(&htpasswd, &out.stdout).unwrap();
        let port = free_tcp_port();
        let conf = dir.path().join("sushy.conf");
        std::fs::write(
            &conf,
            format!(
                "SUSHY_EMULATOR_LISTEN_IP = '127.0.0.1'\n\
                 SUSHY_EMULATOR_LISTEN_PORT = {port}\n\
                 SUSHY_EMULATOR_SSL_CERT = '{}'\n\
                 SUSHY_EMULATOR_SSL_KEY = '{}'\n\
                 SUSHY_EMULATOR_LIBVIRT_URI = '{URI}'\n\
                 SUSHY_EMULATOR_IGNORE_BOOT_DEVICE = True\n\
                 SUSHY_EMULATOR_AUTH_FILE = '{}'\n\
                 SUSHY_EMULATOR_ALLOWED_INSTANCES = ['{}', '{}']\n",
                tls.cert.display(),
                tls.key.display(),
                htpasswd.display(),
                domain.name,
                domain.uuid
            ),
        )
        .unwrap();
        let child = match kind {
            Emulator::Sushy => {
                let child = Command::new(venv().join("bin/sushy-emulator"))
                    .arg("--config")
                    .arg(&conf)
                    .stdout(Stdio::null())
                    .stderr(std::fs::File::create(dir.path().join("emulator.log")).unwrap())
                    .spawn()
                    .unwrap();
                ChildGuard(child, None)
            }
            Emulator::WithSessions | Emulator::StuckOff => {
                let mut cmd = Command::new(venv().join("bin/python"));
                cmd.arg(support_dir().join("redfish_emulator.py"))
                    .arg(&conf)
                    .arg(port.to_string())
                    .arg(&tls.cert)
                    .arg(&tls.key)
                    .env(
                        "WSPARE_REDFISH_STUCK_OFF",
                        if kind == Emulator::StuckOff { "1" } else { "0" },
                    );
                spawn_ready(cmd, "listening", &dir.path().join("emulator.log"))
            }
        };
        let t0 = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "the Redfish emulator never listened on {port}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Redfish {
            _child: child,
            _dir: dir,
            port,
        }
    }

    pub(crate) fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }
}

/// A [`LocalRunner`] that records every argv it runs (to count calls).
#[derive(Default)]
pub(crate) struct Counting {
    pub(crate) calls: Mutex<Vec<String>>,
}

impl Counting {
    pub(crate) fn new() -> Arc<Counting> {
        Arc::new(Counting::default())
    }

    pub(crate) fn argvs(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
    }
}

#[async_trait]
impl CommandRunner for Counting {
    fn describe(&self) -> String {
        "local (counting)".into()
    }

    async fn run_with(
        &self,
        cmd: &wspare_core::runner::Command,
        on_line: Option<&mut LineSink<'_>>,
    ) -> Result<Output, CommandError> {
        self.calls.lock().unwrap().push(cmd.to_string());
        LocalRunner.run_with(cmd, on_line).await
    }
}
