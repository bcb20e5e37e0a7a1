//! The two-host rig: each host is a network namespace with its own
//! libvirtd (in a private mount namespace), sshd and agent; the hosts are
//! joined by a veth pair (the heartbeat, replication and second-channel
//! network) and each has a second veth into the root namespace, where
//! vbmcd answers IPMI for the other host's BMC (the management network).
//!
//! ```text
//!            root namespace: vbmcd (BMC of A on .13, BMC of B on .9), this test
//!              | .9                                     | .13
//!              | wsm<pid>a                               | wsm<pid>b
//!  +-----------+------------+            +--------------+----------+
//!  | wse<pid>a  .10         |  wsx<pid>a | wse<pid>b     .14        |
//!  | libvirtd (tcp+unix)    |------------| libvirtd (tcp+unix)      |
//!  | sshd, wspare-agent     | .1      .2 | sshd, wspare-agent       |
//!  | power domain, VM `web` |            | power domain, (VM `web`) |
//!  +------------------------+            +--------------------------+
//!           198.19.K.0/29 between the hosts, /30s to the root namespace
//! ```
//!
//! **Host power.** A host's BMC (a virtualbmc entry) switches the host's
//! *power domain*: a QEMU domain kept paused (no CPU) in the host's
//! libvirtd. A libvirt hook of that libvirtd runs when the power domain
//! stops, and kills every process of the host's network namespace but
//! libvirtd (the agent, its rsync and ssh children, sshd) and every other
//! QEMU: what a power cut does. libvirtd stays up so the BMC can read the
//! power back and the other host's libvirt calls see the host's VM shut
//! off, as a real BMC would report. `power_on` starts the power domain
//! (paused), sshd and the agent again.
//!
//! **ssh sessions.** The rig's sshds accept `SHLVL` and the agents send
//! `SetEnv=SHLVL=1`: bash then does not read root's `.bashrc`, which on
//! this machine runs `pyenv init` (0.4 s per command, and a lock file that
//! a session killed by a power cut leaves behind, after which every login
//! on the machine waits 60 s).
//!
//! Everything is removed when the rig is dropped, pass or fail: agents,
//! vbmc entries, domains, libvirtds, sshds, namespaces, veths and the
//! directory (kept with `WSPARE_E2E_KEEP=1`). Leftovers of a run that
//! was killed are removed at the next start.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub(crate) const VBMC: &str = "/opt/wspare-venv/bin/vbmc";
pub(crate) const SSH_KEY: &str = "/root/.ssh/wspare_ci";
pub(crate) const SSHD_CONFIG: &str = "/etc/wspare/sshd_config";
pub(crate) const IPMI_USER: &str = "admin";
pub(crate) const IPMI_PASSWORD: &str = "e2e-bmc-pw";
pub(crate) const HINT: &str = "run `bash .ci/install-deps && bash .ci/start-services && scripts/build-guest` first (CI's .ci/run does)";

/// Runs a command; panics with its output if it fails.
/// `ip ARGS` in network namespace `ns`, else in the root one.
fn ip(ns: Option<&str>, args: &[&str]) {
    let n: &[&str] = match ns {
        Some(ns) => &["-n", ns],
        None => &[],
    };
    sh("ip", &[n, args].concat());
}

/// Gives `dev` (in namespace `ns`, else the root one) the address `cidr`
/// and brings it up.
fn addr_up(ns: Option<&str>, cidr: &str, dev: &str) {
    ip(ns, &["addr", "add", cidr, "dev", dev]);
    ip(ns, &["link", "set", dev, "up"]);
}

pub(crate) fn sh(prog: &str, args: &[&str]) -> String {
    let out = Command::new(prog)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {prog}: {e}; {HINT}"));
    if !out.status.success() {
        panic!(
            "`{prog} {}` failed ({}):\n{}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a command, ignoring failure; returns (success, stdout+stderr).
pub(crate) fn try_sh(prog: &str, args: &[&str]) -> (bool, String) {
    match Command::new(prog).args(args).output() {
        Ok(o) => (
            o.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
        ),
        Err(e) => (false, e.to_string()),
    }
}

/// Retries `f` every 100 ms until it returns `Some`, or panics with `what`.
pub(crate) fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let t0 = Instant::now();
    loop {
        if let Some(x) = f() {
            return x;
        }
        assert!(
            t0.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Fails with a clear message unless the machine has what the rig needs.
pub(crate) fn require_prerequisites() {
    let id = sh("id", &["-u"]);
    assert_eq!(
        id.trim(),
        "0",
        "the e2e test runs as root (network namespaces, libvirtd); {HINT}"
    );
    for p in [
        "/usr/sbin/ip",
        "/usr/sbin/libvirtd",
        "/usr/bin/virsh",
        "/usr/bin/unshare",
        "/usr/sbin/sshd",
        "/usr/bin/ssh",
        "/usr/bin/rsync",
        "/usr/bin/ipmitool",
        "/usr/bin/python3",
        VBMC,
        SSH_KEY,
        SSHD_CONFIG,
        "/root/.ssh/known_hosts",
    ] {
        assert!(
            Path::new(p).exists(),
            "e2e prerequisite missing: {p}; {HINT}"
        );
    }
    let known = std::fs::read_to_string("/root/.ssh/known_hosts").unwrap_or_default();
    assert!(
        known.contains("198.19.*"),
        "/root/.ssh/known_hosts has no entry for 198.19.* (the rig's addresses); {HINT}"
    );
    let (ok, out) = try_sh(VBMC, &["list"]);
    assert!(ok, "vbmcd does not answer (`vbmc list`: {out}); {HINT}");
    assert!(
        Path::new("/run/sshd").is_dir(),
        "/run/sshd is missing (sshd's privilege separation directory); {HINT}"
    );
}

/// Removes what runs of this test that no longer exist left behind.
pub(crate) fn remove_leftovers() {
    let alive = |pid: &str| Path::new(&format!("/proc/{pid}")).exists();
    let (_, ns) = try_sh("ip", &["netns", "list"]);
    for line in ns.lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        if let Some(rest) = name.strip_prefix("wse") {
            let pid = rest.trim_end_matches(['a', 'b']);
            if !pid.is_empty() && pid.chars().all(|c| c.is_ascii_digit()) && !alive(pid) {
                let _ = try_sh("ip", &["netns", "del", name]);
            }
        }
    }
    let (_, links) = try_sh("ip", &["-o", "link", "show"]);
    for line in links.lines() {
        let name = line
            .split(':')
            .nth(1)
            .unwrap_or("")
            .trim()
            .split('@')
            .next()
            .unwrap_or("");
        if let Some(rest) = name.strip_prefix("wsm") {
            let pid = rest.trim_end_matches(['a', 'b']);
            if !pid.is_empty() && pid.chars().all(|c| c.is_ascii_digit()) && !alive(pid) {
                let _ = try_sh("ip", &["link", "del", name]);
            }
        }
    }
    let (_, list) = try_sh(VBMC, &["list"]);
    for line in list.lines() {
        let name = line.split('|').nth(1).unwrap_or("").trim();
        if let Some(rest) = name.strip_prefix("wse") {
            let pid = rest.split('-').next().unwrap_or("");
            if !pid.is_empty() && pid.chars().all(|c| c.is_ascii_digit()) && !alive(pid) {
                let _ = try_sh(VBMC, &["delete", name]);
            }
        }
    }
    if let Ok(rd) = std::fs::read_dir("/tmp") {
        for e in rd.flatten() {
            let n = e.file_name().to_string_lossy().to_string();
            if let Some(pid) = n.strip_prefix("wspare-e2e-") {
                if pid.chars().all(|c| c.is_ascii_digit()) && !alive(pid) {
                    for h in ["node-a", "node-b"] {
                        for f in ["libvirtd.pid", "sshd.pid"] {
                            if let Ok(p) = std::fs::read_to_string(e.path().join(h).join(f)) {
                                let p = p.trim();
                                if alive(p) {
                                    let _ = try_sh("kill", &["-KILL", p]);
                                }
                            }
                        }
                    }
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
    }
}

/// Notifications an agent sent to its `NOTIFY_SOCKET`.
#[derive(Clone, Default)]
pub(crate) struct Notes(pub(crate) Arc<Mutex<Vec<(Instant, String)>>>);

impl Notes {
    pub(crate) fn count(&self, what: &str) -> usize {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, m)| m.contains(what))
            .count()
    }
}

/// One host.
pub(crate) struct Host {
    /// "a" or "b".
    pub(crate) id: &'static str,
    pub(crate) node: String,
    pub(crate) netns: String,
    pub(crate) ip: String,
    pub(crate) mgmt_ip: String,
    /// The root-namespace address of this host's management link (where
    /// the *other* host's BMC listens).
    pub(crate) mgmt_root_ip: String,
    pub(crate) link: String,
    pub(crate) dir: PathBuf,
    pub(crate) uri: String,
    pub(crate) power_domain: String,
    /// Where this host's BMC listens (root namespace) and its port.
    pub(crate) bmc: (String, u16),
    pub(crate) agent: Option<Child>,
    pub(crate) notes: Notes,
}

impl Host {
    pub(crate) fn console(&self, vm: &str) -> PathBuf {
        self.dir.join("console").join(format!("{vm}.console.log"))
    }

    pub(crate) fn replica(&self, vm: &str) -> PathBuf {
        self.dir.join("replica").join(vm)
    }

    pub(crate) fn virsh(&self, args: &[&str]) -> (bool, String) {
        let mut v = vec!["-c", self.uri.as_str()];
        v.extend_from_slice(args);
        try_sh("virsh", &v)
    }
}

/// The rig. See the module docs.
pub(crate) struct Rig {
    pub(crate) pid: u32,
    pub(crate) dir: PathBuf,
    pub(crate) hosts: [Host; 2],
    pub(crate) bin: PathBuf,
    pub(crate) config: PathBuf,
    pub(crate) subnet: String,
    vbmc_entries: Vec<String>,
}

const HOOK: &str = r#"#!/bin/sh
# Host power emulation (wspare e2e rig): when this host's power domain
# stops, everything on the host dies at once, as in a power cut: every
# process of the host's network namespace but libvirtd (agent, rsync, ssh,
# sshd) and every other QEMU. libvirtd stays, as the BMC's view of the host.
[ "$1" = "@POWER@" ] || exit 0
[ "$2" = "stopped" ] || exit 0
echo "$(date +%s%3N) cut" >> @DIR@/power.log
lv=$(cat @DIR@/libvirtd.pid 2>/dev/null)
victims=""
for p in $(/usr/sbin/ip netns pids @NETNS@); do
  [ "$p" = "$lv" ] && continue
  [ "$p" = "$$" ] && continue
  victims="$victims $p"
done
for f in /run/libvirt/qemu/*.pid; do
  [ -f "$f" ] || continue
  # driver.pid is libvirtd's own lock file.
  case "$f" in */@POWER@.pid|*/driver.pid) continue ;; esac
  p=$(cat "$f")
  [ "$p" = "$lv" ] || victims="$victims $p"
done
for p in $victims; do kill -KILL "$p" 2>/dev/null; done
i=0
while [ $i -lt 100 ]; do
  left=""
  # Gone, or a zombie its parent has not reaped yet.
  for p in $victims; do
    grep -qs '^State:[[:space:]]*[^Z]' /proc/$p/status && left="$left $p"
  done
  [ -z "$left" ] && break
  i=$((i + 1)); sleep 0.05
done
echo "$(date +%s.%N) power off; killed:$victims" >> @DIR@/power.log
exit 0
"#;

impl Rig {
    /// Builds the rig (namespaces, libvirtds, power domains, BMCs, sshds).
    pub(crate) fn new(bin: PathBuf) -> Rig {
        require_prerequisites();
        remove_leftovers();
        let pid = std::process::id();
        let k = 20 + pid % 200;
        let subnet = format!("198.19.{k}");
        let dir = PathBuf::from(format!("/tmp/wspare-e2e-{pid}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let port0 = 17000 + (pid % 2000) as u16 * 2;
        let host = |id: &'static str, i: u8| {
            let hdir = dir.join(format!("node-{id}"));
            Host {
                id,
                node: format!("node-{id}"),
                netns: format!("wse{pid}{id}"),
                ip: format!("{subnet}.{}", 1 + i),
                mgmt_ip: format!("{subnet}.{}", 10 + 4 * i),
                mgmt_root_ip: format!("{subnet}.{}", 9 + 4 * i),
                link: format!("wsx{pid}{id}"),
                uri: format!(
                    "qemu+unix:///system?socket={}",
                    hdir.join("sock").join("libvirt-sock").display()
                ),
                power_domain: format!("wse{pid}-host-{id}"),
                // A's BMC is reached from B's management link, and back.
                bmc: (format!("{subnet}.{}", 13 - 4 * i), port0 + u16::from(i)),
                dir: hdir,
                agent: None,
                notes: Notes::default(),
            }
        };
        let mut rig = Rig {
            pid,
            config: dir.join("wspare.toml"),
            dir: dir.clone(),
            hosts: [host("a", 0), host("b", 1)],
            bin,
            subnet,
            vbmc_entries: Vec::new(),
        };
        rig.network();
        for i in 0..2 {
            rig.libvirtd(i);
            rig.power_domain(i);
            rig.sshd(i);
        }
        for i in 0..2 {
            rig.bmc(i);
        }
        rig.check_paths();
        rig
    }

    fn network(&self) {
        let [a, b] = &self.hosts;
        for h in [a, b] {
            sh("ip", &["netns", "add", &h.netns]);
            ip(Some(&h.netns), &["link", "set", "lo", "up"]);
        }
        sh(
            "ip",
            &[
                "link", "add", &a.link, "netns", &a.netns, "type", "veth", "peer", "name", &b.link,
                "netns", &b.netns,
            ],
        );
        for h in [a, b] {
            addr_up(Some(&h.netns), &format!("{}/29", h.ip), &h.link);
            let root = format!("wsm{}{}", self.pid, h.id);
            let inner = format!("wsn{}{}", self.pid, h.id);
            sh(
                "ip",
                &[
                    "link", "add", &root, "type", "veth", "peer", "name", &inner, "netns", &h.netns,
                ],
            );
            addr_up(None, &format!("{}/30", h.mgmt_root_ip), &root);
            addr_up(Some(&h.netns), &format!("{}/30", h.mgmt_ip), &inner);
        }
    }

    fn libvirtd(&self, i: usize) {
        let h = &self.hosts[i];
        let d = &h.dir;
        for sub in [
            "etc/hooks",
            "run",
            "lib",
            "cache",
            "log",
            "sock",
            "console",
            "images",
            "state",
        ] {
            std::fs::create_dir_all(d.join(sub)).unwrap();
        }
        std::fs::write(
            d.join("etc/libvirtd.conf"),
            format!(
                "listen_tls = 0\nlisten_tcp = 1\nauth_tcp = \"none\"\ntcp_port = \"16509\"\nlisten_addr = \"0.0.0.0\"\n\
                 unix_sock_dir = \"{}\"\nunix_sock_rw_perms = \"0700\"\nlog_outputs = \"3:file:{}\"\n",
                d.join("sock").display(),
                d.join("libvirtd.log").display()
            ),
        )
        .unwrap();
        std::fs::write(
            d.join("etc/qemu.conf"),
            "user = \"root\"\ngroup = \"root\"\ndynamic_ownership = 0\nsecurity_driver = \"none\"\n\
             stdio_handler = \"file\"\ncgroup_controllers = [ ]\n",
        )
        .unwrap();
        let hook = HOOK
            .replace("@POWER@", &h.power_domain)
            .replace("@DIR@", &d.display().to_string())
            .replace("@NETNS@", &h.netns);
        let hp = d.join("etc/hooks/qemu");
        std::fs::write(&hp, hook).unwrap();
        std::fs::set_permissions(&hp, std::fs::Permissions::from_mode(0o755)).unwrap();
        let script = format!(
            "mount --bind {d}/etc /etc/libvirt && mount --bind {d}/run /run/libvirt && \
             mount --bind {d}/lib /var/lib/libvirt && mount --bind {d}/cache /var/cache/libvirt && \
             mount --bind {d}/log /var/log/libvirt && \
             exec libvirtd -d -l -f /etc/libvirt/libvirtd.conf -p {d}/libvirtd.pid",
            d = d.display()
        );
        for p in [
            "/run/libvirt",
            "/var/lib/libvirt",
            "/var/cache/libvirt",
            "/var/log/libvirt",
            "/etc/libvirt",
        ] {
            assert!(Path::new(p).is_dir(), "{p} is missing; {HINT}");
        }
        sh(
            "ip",
            &[
                "netns",
                "exec",
                &h.netns,
                "unshare",
                "-m",
                "--propagation",
                "private",
                "sh",
                "-c",
                &script,
            ],
        );
        wait_for(
            &format!("libvirtd of host {} to answer", h.id),
            Duration::from_secs(60),
            || h.virsh(&["list"]).0.then_some(()),
        );
    }

    fn power_domain(&self, i: usize) {
        let h = &self.hosts[i];
        let xml = format!(
            "<domain type='qemu'><name>{}</name><memory unit='MiB'>32</memory><vcpu>1</vcpu>\
             <os><type arch='x86_64' machine='pc'>hvm</type></os>\
             <devices><controller type='usb' model='none'/><memballoon model='none'/></devices></domain>",
            h.power_domain
        );
        let f = h.dir.join("power.xml");
        std::fs::write(&f, xml).unwrap();
        let (ok, out) = h.virsh(&["define", &f.display().to_string()]);
        assert!(ok, "defining the power domain of host {}: {out}", h.id);
        self.power_domain_on(i);
    }

    fn power_domain_on(&self, i: usize) {
        let h = &self.hosts[i];
        let (ok, out) = h.virsh(&["start", "--paused", &h.power_domain]);
        assert!(ok, "powering host {} on (its power domain): {out}", h.id);
    }

    fn sshd(&self, i: usize) {
        let h = &self.hosts[i];
        let pidf = h.dir.join("sshd.pid");
        let _ = std::fs::remove_file(&pidf);
        sh(
            "ip",
            &[
                "netns",
                "exec",
                &h.netns,
                "/usr/sbin/sshd",
                "-f",
                SSHD_CONFIG,
                "-o",
                &format!("ListenAddress={}:22", h.ip),
                // Sessions that send SHLVL=1 skip root's .bashrc (see the
                // module docs).
                "-o",
                "AcceptEnv=SHLVL",
                "-o",
                &format!("PidFile={}", pidf.display()),
                "-E",
                &h.dir.join("sshd.log").display().to_string(),
            ],
        );
        wait_for(
            &format!("sshd of host {}", h.id),
            Duration::from_secs(10),
            || pidf.exists().then_some(()),
        );
    }

    fn bmc(&mut self, i: usize) {
        let h = &self.hosts[i];
        let port = h.bmc.1.to_string();
        sh(
            VBMC,
            &[
                "add",
                &h.power_domain,
                "--port",
                &port,
                "--address",
                &h.bmc.0,
                "--username",
                IPMI_USER,
                "--password",
                IPMI_PASSWORD,
                "--libvirt-uri",
                &h.uri,
            ],
        );
        self.vbmc_entries.push(h.power_domain.clone());
        sh(VBMC, &["start", &h.power_domain]);
        // The other host fences this one: check from there.
        let other = &self.hosts[1 - i];
        wait_for(
            &format!(
                "the BMC of host {} at {}:{port} from host {}",
                h.id, h.bmc.0, other.id
            ),
            Duration::from_secs(20),
            || {
                let (ok, out) = try_sh(
                    "ip",
                    &[
                        "netns",
                        "exec",
                        &other.netns,
                        "ipmitool",
                        "-I",
                        "lanplus",
                        "-H",
                        &h.bmc.0,
                        "-p",
                        &port,
                        "-U",
                        IPMI_USER,
                        "-P",
                        IPMI_PASSWORD,
                        "-N",
                        "1",
                        "-R",
                        "1",
                        "chassis",
                        "power",
                        "status",
                    ],
                );
                (ok && out.contains("Chassis Power is on")).then_some(())
            },
        );
    }

    fn check_paths(&self) {
        let [a, b] = &self.hosts;
        for (from, to) in [(a, b), (b, a)] {
            let (ok, out) = try_sh(
                "ip",
                &[
                    "netns",
                    "exec",
                    &from.netns,
                    "ssh",
                    "-i",
                    SSH_KEY,
                    "-o",
                    "BatchMode=yes",
                    "-o",
                    "StrictHostKeyChecking=yes",
                    "-o",
                    "SetEnv=SHLVL=1",
                    "-o",
                    "ConnectTimeout=5",
                    &format!("root@{}", to.ip),
                    "true",
                ],
            );
            assert!(
                ok,
                "ssh from host {} to {} ({}): {out}",
                from.id, to.id, to.ip
            );
            let (ok, out) = try_sh(
                "ip",
                &[
                    "netns",
                    "exec",
                    &from.netns,
                    "virsh",
                    "-c",
                    &format!("qemu+tcp://{}/system", to.ip),
                    "list",
                ],
            );
            assert!(
                ok,
                "libvirt over tcp from host {} to {}: {out}",
                from.id, to.id
            );
        }
    }

    /// Writes the key, the BMC password file and the config.
    pub(crate) fn write_config(&self, fence_delay_a: &str) {
        let key = self.dir.join("cluster.key");
        let mut bytes = [0u8; 32];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes))
            .unwrap();
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        std::fs::write(&key, format!("{hex}\n")).unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        let pw = self.dir.join("ipmi.pw");
        std::fs::write(&pw, IPMI_PASSWORD).unwrap();
        std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::write(&self.config, self.config_text(fence_delay_a)).unwrap();
    }

    pub(crate) fn config_text(&self, fence_delay_a: &str) -> String {
        let d = self.dir.display();
        let mut t = format!(
            r#"# wspare e2e rig (pid {pid}): one config for both hosts.
[cluster]
name = "e2e-{pid}"
heartbeat-interval = "200ms"
journal = "{d}/{{node}}/state/journal"

[defaults]
sync-interval = "2s"
monitor-interval = "1s"
data-loss-bound = "120s"
fence-attempts = 4
fence-backoff = "1s"
fence-backoff-max = "4s"
shutdown-timeout = "30s"
handover-timeout = "90s"
peer-wait = "5s"
retry-backoff = "1s"
restart-limit = 3

[defaults.detector]
expected-interval = "200ms"
acceptable-pause = "800ms"
min-std-dev = "100ms"
initial-timeout = "15s"
recovery-heartbeats = 3

[agent]
key-file = "{d}/cluster.key"
control-socket = "{d}/{{node}}/agent.sock"
state-dir = "{d}/{{node}}/state"
metrics-listen = "0.0.0.0:9464"
max-clock-skew = "30s"
shutdown-grace = "10s"
history = 1000

[agent.deadlines]
observe = "5s"
query = "10s"
sync = "120s"
freeze = "30s"
verify = "60s"
fence = "40s"
promote = "30s"
start = "60s"
stop = "40s"

[agent.ssh]
user = "root"
identity = "{key}"
options = ["StrictHostKeyChecking=yes", "SetEnv=SHLVL=1"]
connect-timeout = "3s"
"#,
            pid = self.pid,
            key = SSH_KEY,
        );
        for h in &self.hosts {
            let delay = if h.id == "a" { fence_delay_a } else { "0s" };
            t.push_str(&format!(
                r#"
[[node]]
name = "{node}"
address = "{ip}:7400"
fence-delay = "{delay}"

[node.hypervisor]
type = "libvirt"
uri = "{uri}"
peer-uri = "qemu+tcp://{ip}/system"
domain-type = "qemu"
console-log-dir = "{console}"
guest-agent = false
call-timeout = "5s"

[node.fence]
type = "ipmi"
host = "{bmc_host}"
port = {bmc_port}
username = "{user}"
password-file = "{d}/ipmi.pw"
try-timeout = "1s"
retries = 1
command-timeout = "15s"
confirm-timeout = "20s"
poll-interval = "500ms"
"#,
                node = h.node,
                ip = h.ip,
                uri = h.uri,
                console = h.dir.join("console").display(),
                bmc_host = h.bmc.0,
                bmc_port = h.bmc.1,
                user = IPMI_USER,
            ));
        }
        // web runs on a, db on b: each host is a primary and a spare.
        for (vm, primary, spare) in [("web", "node-a", "node-b"), ("db", "node-b", "node-a")] {
            t.push_str(&format!(
                r#"
[[pair]]
name = "{vm}"
vm = "{vm}"
primary = "{primary}"
spare = "{spare}"

[pair.replication]
type = "rsync"
dir = "{d}/{{node}}/replica/{vm}"
command-timeout = "15s"
io-timeout = "30s"
transfer-timeout = "120s"
"#
            ));
        }
        t
    }

    /// Starts host `i`'s agent and waits for READY=1.
    pub(crate) fn start_agent(&mut self, i: usize) {
        let bin = self.bin.clone();
        let config = self.config.clone();
        let h = &mut self.hosts[i];
        assert!(h.agent.is_none(), "agent of host {} already runs", h.id);
        let notify = h.dir.join("notify.sock");
        if !notify.exists() {
            let sock = UnixDatagram::bind(&notify).unwrap();
            let notes = h.notes.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = sock.recv(&mut buf) {
                    let m = String::from_utf8_lossy(&buf[..n]).into_owned();
                    notes.0.lock().unwrap().push((Instant::now(), m));
                }
            });
        }
        let ready_before = h.notes.count("READY=1");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(h.dir.join("agent.log"))
            .unwrap();
        let mut marker = log.try_clone().unwrap();
        let _ = writeln!(
            marker,
            "===== e2e: agent start at {:?}",
            std::time::SystemTime::now()
        );
        let child = Command::new("ip")
            .args(["netns", "exec", &h.netns])
            .arg(&bin)
            .arg("--config")
            .arg(&config)
            .args(["--node", &h.node, "run"])
            .env("RUST_LOG", "info,wspare_core=debug")
            .env("NOTIFY_SOCKET", &notify)
            .env("WATCHDOG_USEC", "2000000")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        std::fs::write(h.dir.join("agent.pid"), child.id().to_string()).unwrap();
        h.agent = Some(child);
        let id = h.id;
        let notes = h.notes.clone();
        let t0 = Instant::now();
        loop {
            if notes.count("READY=1") > ready_before {
                break;
            }
            if let Some(st) = self.hosts[i].agent.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "the agent of host {id} exited ({st}) before it was ready:\n{}",
                    tail(&self.hosts[i].dir.join("agent.log"), 40)
                );
            }
            assert!(
                t0.elapsed() < Duration::from_secs(90),
                "the agent of host {id} sent no READY=1 within 90 s:\n{}",
                tail(&self.hosts[i].dir.join("agent.log"), 40)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kills host `i`'s agent (SIGKILL) and reaps it.
    pub(crate) fn kill_agent(&mut self, i: usize) {
        if let Some(mut c) = self.hosts[i].agent.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends `sig` (TERM, HUP) to host `i`'s agent.
    pub(crate) fn signal_agent(&self, i: usize, sig: &str) {
        let pid = self.hosts[i]
            .agent
            .as_ref()
            .expect("the agent runs")
            .id()
            .to_string();
        sh("kill", &[&format!("-{sig}"), &pid]);
    }

    /// Waits for host `i`'s agent to exit (after SIGTERM, or a power cut).
    pub(crate) fn wait_agent_exit(
        &mut self,
        i: usize,
        timeout: Duration,
    ) -> std::process::ExitStatus {
        let t0 = Instant::now();
        loop {
            let c = self.hosts[i].agent.as_mut().expect("the agent was started");
            if let Some(st) = c.try_wait().unwrap() {
                self.hosts[i].agent = None;
                return st;
            }
            assert!(
                t0.elapsed() < timeout,
                "the agent of host {} did not exit within {timeout:?}",
                self.hosts[i].id
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Cuts host `i`'s power (as a failed power supply: its power domain
    /// is destroyed, and the hook kills everything on the host).
    pub(crate) fn power_cut(&self, i: usize) -> u64 {
        let h = &self.hosts[i];
        let (ok, out) = h.virsh(&["destroy", &h.power_domain]);
        assert!(ok, "cutting the power of host {}: {out}", h.id);
        self.last_cut(i)
    }

    /// When host `i`'s power last went (ms since the Unix epoch), as its
    /// power hook recorded it before killing anything.
    pub(crate) fn last_cut(&self, i: usize) -> u64 {
        let log = std::fs::read_to_string(self.hosts[i].dir.join("power.log")).unwrap_or_default();
        log.lines()
            .filter_map(|l| l.strip_suffix(" cut"))
            .filter_map(|t| t.trim().parse().ok())
            .next_back()
            .unwrap_or_else(|| {
                panic!(
                    "host {}'s power hook recorded no cut:\n{log}",
                    self.hosts[i].id
                )
            })
    }

    /// Whether host `i`'s BMC reads power on.
    pub(crate) fn powered(&self, i: usize) -> bool {
        let h = &self.hosts[i];
        h.virsh(&["domstate", &h.power_domain]).1.contains("paused")
    }

    /// Powers host `i` on: power domain, sshd, agent (after a power cut or
    /// a fence).
    pub(crate) fn power_on(&mut self, i: usize) {
        self.power_on_host(i);
        self.start_agent(i);
    }

    /// Powers host `i` on without starting its agent.
    pub(crate) fn power_on_host(&mut self, i: usize) {
        if let Some(mut c) = self.hosts[i].agent.take() {
            let _ = c.wait();
        }
        self.power_domain_on(i);
        self.sshd(i);
    }

    /// Runs `prog args` in host `i`'s network namespace.
    pub(crate) fn in_host(&self, i: usize, prog: &str, args: &[&str]) -> (bool, String) {
        let mut v = vec!["netns", "exec", self.hosts[i].netns.as_str(), prog];
        v.extend_from_slice(args);
        try_sh("ip", &v)
    }

    /// Cuts (`up` false) or heals the link between the hosts.
    pub(crate) fn link(&self, up: bool) {
        for h in &self.hosts {
            ip(
                Some(&h.netns),
                &["link", "set", &h.link, if up { "up" } else { "down" }],
            );
        }
    }

    /// Runs `wspare-agent` as an operator on host `i`.
    pub(crate) fn cli(&self, i: usize, args: &[&str]) -> (bool, String, String) {
        let out = Command::new(&self.bin)
            .arg("--config")
            .arg(&self.config)
            .args(["--node", &self.hosts[i].node])
            .args(args)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// `status --json` of host `i`.
    pub(crate) fn status(&self, i: usize) -> serde_json::Value {
        let (ok, out, err) = self.cli(i, &["status", "--json"]);
        assert!(ok, "status on host {}: {err}", self.hosts[i].id);
        serde_json::from_str(&out).unwrap()
    }

    /// `status --json` of host `i`, or `None` if its agent does not answer.
    pub(crate) fn try_status(&self, i: usize) -> Option<serde_json::Value> {
        let (ok, out, _) = self.cli(i, &["status", "--json"]);
        ok.then(|| serde_json::from_str(&out).ok()).flatten()
    }

    /// Pair `web`'s status on host `i`.
    pub(crate) fn pair(&self, i: usize) -> Option<serde_json::Value> {
        self.pair_of(i, "web")
    }

    /// Pair `name`'s status on host `i`.
    pub(crate) fn pair_of(&self, i: usize, name: &str) -> Option<serde_json::Value> {
        let s = self.try_status(i)?;
        s["pairs"]
            .as_array()?
            .iter()
            .find(|p| p["status"]["pair"] == name)
            .map(|p| p["status"].clone())
    }

    /// Waits until `pred` holds for pair `web`'s status on host `i`.
    pub(crate) fn wait_pair(
        &self,
        i: usize,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        self.wait_pair_of(i, "web", what, timeout, pred)
    }

    /// Waits until `pred` holds for pair `name`'s status on host `i`.
    pub(crate) fn wait_pair_of(
        &self,
        i: usize,
        name: &str,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let t0 = Instant::now();
        let mut last = None;
        loop {
            if let Some(p) = self.pair_of(i, name) {
                if pred(&p) {
                    return p;
                }
                last = Some(p);
            }
            if t0.elapsed() > timeout {
                panic!(
                    "host {}: timed out after {timeout:?} waiting for {what}; last status: {}\nexplain:\n{}\nagent log:\n{}",
                    self.hosts[i].id,
                    last.map(|p| p.to_string()).unwrap_or_else(|| "none".into()),
                    self.cli(i, &["explain", name]).1,
                    tail(&self.hosts[i].dir.join("agent.log"), 30)
                );
            }
            std::thread::sleep(Duration::from_millis(150));
        }
    }

    /// `explain web --json` events of host `i`.
    pub(crate) fn events(&self, i: usize) -> Vec<serde_json::Value> {
        self.events_of(i, "web")
    }

    /// `explain NAME --json` events of host `i`.
    pub(crate) fn events_of(&self, i: usize, name: &str) -> Vec<serde_json::Value> {
        let (ok, out, err) = self.cli(i, &["explain", name, "--json"]);
        assert!(ok, "explain on host {}: {err}", self.hosts[i].id);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v["events"].as_array().cloned().unwrap_or_default()
    }

    /// Prometheus text of host `i` (over its management address).
    pub(crate) fn metrics(&self, i: usize) -> String {
        use std::io::Read;
        let addr = format!("{}:9464", self.hosts[i].mgmt_ip);
        let mut s =
            std::net::TcpStream::connect_timeout(&addr.parse().unwrap(), Duration::from_secs(5))
                .unwrap_or_else(|e| panic!("metrics of host {} at {addr}: {e}", self.hosts[i].id));
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }

    /// Dumps the ends of the logs (when a scenario failed).
    pub(crate) fn dump(&self) {
        for h in &self.hosts {
            eprintln!(
                "===== host {}: agent log =====\n{}",
                h.id,
                tail(&h.dir.join("agent.log"), 80)
            );
            eprintln!(
                "===== host {}: power log =====\n{}",
                h.id,
                tail(&h.dir.join("power.log"), 10)
            );
            eprintln!(
                "===== host {}: libvirtd log =====\n{}",
                h.id,
                tail(&h.dir.join("libvirtd.log"), 15)
            );
        }
    }

    /// Metric values by full sample name (`name{labels}`).
    pub(crate) fn metric_map(text: &str) -> BTreeMap<String, f64> {
        text.lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .filter_map(|l| {
                let (k, v) = l.rsplit_once(' ')?;
                Some((k.to_string(), v.parse().ok()?))
            })
            .collect()
    }
}

/// The last `n` lines of a file.
pub(crate) fn tail(p: &Path, n: usize) -> String {
    let t = std::fs::read_to_string(p).unwrap_or_default();
    let lines: Vec<&str> = t.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

impl Drop for Rig {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dump();
        }
        for i in 0..2 {
            self.kill_agent(i);
        }
        for e in &self.vbmc_entries {
            let _ = try_sh(VBMC, &["delete", e]);
        }
        for h in &self.hosts {
            let (_, list) = h.virsh(&["list", "--all", "--name"]);
            for d in list.lines().map(str::trim).filter(|l| !l.is_empty()) {
                let _ = h.virsh(&["destroy", d]);
                let _ = h.virsh(&["undefine", d]);
            }
            for f in ["libvirtd.pid", "sshd.pid"] {
                if let Ok(p) = std::fs::read_to_string(h.dir.join(f)) {
                    let _ = try_sh("kill", &["-TERM", p.trim()]);
                }
            }
        }
        std::thread::sleep(Duration::from_millis(500));
        for h in &self.hosts {
            // Whatever is left in the namespace (a stuck libvirtd or QEMU).
            let (_, pids) = try_sh("ip", &["netns", "pids", &h.netns]);
            for p in pids.split_whitespace() {
                let _ = try_sh("kill", &["-KILL", p]);
            }
            let _ = try_sh("ip", &["netns", "del", &h.netns]);
            let _ = try_sh("ip", &["link", "del", &format!("wsm{}{}", self.pid, h.id)]);
        }
        if std::env::var_os("WSPARE_E2E_KEEP").is_some() {
            eprintln!(
                "WSPARE_E2E_KEEP: the rig's files stay in {}",
                self.dir.display()
            );
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
