//! End to end: two hosts (network namespaces), a wspare-agent on each, a
//! real guest under libvirt/QEMU TCG, its image replicated by rsync over
//! ssh, fencing through virtualbmc. See `e2e/rig.rs` for the rig.
//!
//! `cargo test -p wspare-examples --test e2e` (as root, after
//! `.ci/install-deps`, `.ci/start-services` and `scripts/build-guest`).
//!
//! One test walks the scenarios in order on one rig (a TCG boot costs
//! 6-12 s, so the rig is built once); each scenario asserts that the VM
//! never ran on both hosts and that a copy started from a generation
//! boots with that generation's counter:
//!
//! 5. forged, tampered, replayed and junk heartbeats are refused and
//!    counted, and cause nothing (then, during 1, a replay storm does not
//!    delay the failover);
//! 1. host A loses power (agent and VM die at once): B detects, fences A
//!    through its BMC, promotes, starts; the guest's marker appears from
//!    B's copy; the RTO breakdown is printed (`rto-ms ...`);
//! 3. A comes back and is resynced; failback, switchover, failback: no
//!    counter value lost;
//! 2. the link between the hosts is cut, both alive: A (the longer fence
//!    delay) fences B (B's power goes, agent included); exactly one copy
//!    runs; after healing and power-on B rejoins as the spare;
//! 4. A loses power again and B's agent is killed while it waits out A's
//!    fence delay: restarted, it resumes the failover from its journal,
//!    and the VM runs once, on B.
//!
//! Around them: operator commands (status, explain, maintenance, test
//! failover, commands refused with where to run them), SIGHUP with a bad
//! and a good config, metrics, systemd notifications, and SIGTERM with a
//! consistent journal. A second test runs `check-config` on broken configs.

#[path = "e2e/observe.rs"]
mod observe;
#[path = "e2e/rig.rs"]
mod rig;

use std::io::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

use observe::{counters, first_counter, Sampler, Snooper};
use rig::{sh, tail, wait_for, Rig};
use wspare_core::{Hypervisor, UnixMillis, VmName};
use wspare_libvirt::{DomainType, LibvirtConfig, LibvirtHypervisor};
use wspare_testkit::guest::{self, GuestMode};

const A: usize = 0;
const B: usize = 1;
const FENCE_DELAY_A: &str = "6s";

fn bin() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_BIN_EXE_wspare-agent"))
}

struct Clock(Instant);

impl Clock {
    fn say(&self, what: &str) {
        eprintln!("[{:>7.1}s] {what}", self.0.elapsed().as_secs_f64());
    }
}

fn s(v: &serde_json::Value, k: &str) -> String {
    v[k].as_str().unwrap_or("").to_string()
}

fn newest(v: &serde_json::Value) -> Option<u64> {
    v["newest"]["generation"].as_u64()
}

fn rejected(rig: &Rig, i: usize) -> serde_json::Value {
    rig.status(i)["heartbeats-rejected"].clone()
}

fn n(v: &serde_json::Value, k: &str) -> u64 {
    v[k].as_u64().unwrap_or(0)
}

/// The wall-clock time (ms) of the first event on host `i` after `since`
/// whose transition or cause matches.
fn event_at(
    rig: &Rig,
    i: usize,
    since: u64,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> Option<u64> {
    rig.events(i)
        .iter()
        .filter(|e| e["at-ms"].as_u64().unwrap_or(0) >= since)
        .find(|e| pred(e))
        .and_then(|e| e["at-ms"].as_u64())
}

/// The pair runs its VM on `node` after a failover: active there, and
/// either still without a spare or protected again.
fn runs_on(p: &serde_json::Value, node: &str) -> bool {
    s(p, "active") == node && matches!(s(p, "phase").as_str(), "unprotected" | "protected")
}

fn to_is(e: &serde_json::Value, phase: &str) -> bool {
    e["to"].as_str() == Some(phase)
}

fn libvirt(uri: &str, console: &Path) -> LibvirtHypervisor {
    let mut c = LibvirtConfig::new(uri);
    c.domain_type = Some(DomainType::Qemu);
    c.console_log_dir = Some(console.to_path_buf());
    c.guest_agent = false;
    LibvirtHypervisor::new(c).unwrap()
}

/// Host `i`'s libvirt, its consoles logged where the rig reads them.
fn host_hv(rig: &Rig, i: usize) -> LibvirtHypervisor {
    let h = &rig.hosts[i];
    libvirt(&h.uri, &h.dir.join("console"))
}

/// The counter in the image host `i`'s stopped copy of the VM runs from.
fn disk_counter(rt: &tokio::runtime::Runtime, rig: &Rig, i: usize) -> u64 {
    let hv = host_hv(rig, i);
    let spec = rt.block_on(hv.spec(&VmName::new("web").unwrap())).unwrap();
    guest::read_counter(&spec.disks[0].path).unwrap()
}

fn vm_state(rt: &tokio::runtime::Runtime, rig: &Rig, i: usize, vm: &str) -> wspare_core::VmState {
    rt.block_on(host_hv(rig, i).status(&VmName::new(vm).unwrap()))
        .unwrap()
        .state
}

/// A planned hand-over from host `from` (active) to `to`, asked with
/// `cmd` on `from`: the stopped source's counter is the one the target
/// boots with, plus one.
fn handover(
    rig: &Rig,
    rt: &tokio::runtime::Runtime,
    clock: &Clock,
    cmd: &str,
    from: usize,
    to: usize,
) {
    let to_node = rig.hosts[to].node.clone();
    let console = rig.hosts[to].console("web");
    let _ = std::fs::remove_file(&console);
    let before = rig.pair(from).unwrap();
    let (ok, out, err) = rig.cli(from, &[cmd, "web"]);
    assert!(ok, "{cmd} on host {}: {out}{err}", rig.hosts[from].id);
    clock.say(&format!(
        "{cmd} asked on host {}: {}",
        rig.hosts[from].id,
        out.trim()
    ));
    let t0 = Instant::now();
    let p = rig.wait_pair(
        to,
        &format!("{to_node} active after {cmd}"),
        Duration::from_secs(150),
        |p| {
            s(p, "active") == to_node && s(p, "phase") != "starting" && s(p, "phase") != "promoting"
        },
    );
    assert_eq!(
        n(&p, "epoch"),
        n(&before, "epoch") + 1,
        "a hand-over takes the next epoch"
    );
    let (first, _) = first_counter(&console, Duration::from_secs(90));
    let stopped = disk_counter(rt, rig, from);
    clock.say(&format!(
        "{cmd}: {to_node} runs the VM after {:.1}s; the source stopped at counter {stopped}, the target booted with {first}",
        t0.elapsed().as_secs_f64()
    ));
    assert_eq!(
        first,
        stopped + 1,
        "{cmd}: the target must boot with the stopped source's last counter (no value lost)"
    );
    let last_printed = counters(&rig.hosts[from].console("web"))
        .last()
        .copied()
        .unwrap_or(0);
    assert!(
        stopped >= last_printed,
        "the source's disk ({stopped}) holds every counter it printed ({last_printed})"
    );
    // Both sides settle: the old active resynced as the spare.
    rig.wait_pair(
        from,
        &format!("host {} protected as the spare", rig.hosts[from].id),
        Duration::from_secs(120),
        |p| s(p, "phase") == "protected" && s(p, "active") == to_node,
    );
    rig.wait_pair(to, "protected again", Duration::from_secs(60), |p| {
        s(p, "phase") == "protected"
    });
}

#[test]
fn failover_end_to_end() {
    let clock = Clock(Instant::now());
    guest::build().unwrap_or_else(|e| panic!("cannot build the test guest: {e}; {}", rig::HINT));
    let mut rig = Rig::new(bin());
    clock.say(&format!(
        "rig up: {} (subnet {}.0/24)",
        rig.dir.display(),
        rig.subnet
    ));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();

    // The guest, on A: loop mode, a counter write every 200 ms.
    let a_hv = host_hv(&rig, A);
    let disk = rig.hosts[A].dir.join("images").join("web.raw");
    guest::create_disk(&disk).unwrap();
    let spec = guest::spec(
        &VmName::new("web").unwrap(),
        &disk,
        GuestMode::Loop { interval_ms: 200 },
    )
    .unwrap();
    rt.block_on(a_hv.define(&spec)).unwrap();
    rt.block_on(a_hv.start(&spec.name)).unwrap();
    // A second pair the other way round: `db` runs on B, its spare is A
    // (idle mode: it counts once per boot, then stays up).
    let b_hv = host_hv(&rig, B);
    let db_disk = rig.hosts[B].dir.join("images").join("db.raw");
    guest::create_disk(&db_disk).unwrap();
    let db_spec = guest::spec(&VmName::new("db").unwrap(), &db_disk, GuestMode::Idle).unwrap();
    rt.block_on(b_hv.define(&db_spec)).unwrap();
    rt.block_on(b_hv.start(&db_spec.name)).unwrap();
    first_counter(&rig.hosts[A].console("web"), Duration::from_secs(90));
    first_counter(&rig.hosts[B].console("db"), Duration::from_secs(90));
    clock.say("guests up: web on host a (counting), db on host b");

    let sampler = Sampler::start(
        [rig.hosts[A].uri.clone(), rig.hosts[B].uri.clone()],
        &["web", "db"],
    );
    let snooper = Snooper::start(
        [A, B]
            .iter()
            .flat_map(|&i| {
                ["web", "db"].map(|vm| {
                    (
                        rig.hosts[i].id.to_string(),
                        vm.to_string(),
                        rig.hosts[i].replica(vm),
                    )
                })
            })
            .collect(),
    );

    rig.write_config(FENCE_DELAY_A);
    let (ok, out, err) = rig.cli(A, &["check-config", &rig.config.display().to_string()]);
    assert!(ok, "the rig's config does not check: {out}{err}");
    rig.start_agent(A);
    rig.start_agent(B);
    clock.say("agents ready (READY=1)");
    rig.wait_pair(A, "a protected", Duration::from_secs(120), |p| {
        s(p, "phase") == "protected"
    });
    let p = rig.wait_pair(
        B,
        "b protected with a generation",
        Duration::from_secs(60),
        |p| s(p, "phase") == "protected" && newest(p).is_some(),
    );
    rig.wait_pair_of(B, "db", "db protected on b", Duration::from_secs(60), |p| {
        s(p, "phase") == "protected"
    });
    let db = rig.wait_pair_of(
        A,
        "db",
        "a protected as db's spare",
        Duration::from_secs(60),
        |p| s(p, "phase") == "protected" && newest(p).is_some(),
    );
    clock.say(&format!(
        "both pairs protected from one config: web a -> b holds {:?}, db b -> a holds {:?}",
        newest(&p),
        newest(&db)
    ));
    let (ok, table, _) = rig.cli(B, &["status"]);
    assert!(ok);
    eprintln!("{table}");
    let rows: Vec<Vec<&str>> = table
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert!(
        rows.iter()
            .any(|r| r.starts_with(&["web", "web", "spare", "protected", "node-a"])),
        "{table}"
    );
    assert!(
        rows.iter()
            .any(|r| r.starts_with(&["db", "db", "active", "protected", "node-b"])),
        "{table}"
    );

    // ---- commands run where they are taken, or say where to run them.
    let (ok, _, err) = rig.cli(B, &["switchover", "web"]);
    assert!(
        !ok && err.contains("taken by the active node, node-a") && err.contains("on node-a"),
        "{err}"
    );
    let (ok, _, err) = rig.cli(A, &["test-failover", "web"]);
    assert!(
        !ok && err.contains("runs on the spare node, node-b"),
        "{err}"
    );
    let (ok, _, err) = rig.cli(A, &["explain", "nosuch"]);
    assert!(
        !ok && err.contains("pair nosuch does not run on node-a"),
        "{err}"
    );
    let (ok, out, _) = rig.cli(B, &["maintenance", "on", "web"]);
    assert!(ok && out.contains("run it on node-a too"), "{out}");
    rig.wait_pair(B, "maintenance on", Duration::from_secs(5), |p| {
        p["maintenance"] == true
    });
    let (ok, out, _) = rig.cli(B, &["maintenance", "off"]);
    assert!(ok, "{out}");
    rig.wait_pair(B, "maintenance off", Duration::from_secs(5), |p| {
        p["maintenance"] == false
    });

    // ---- test failover: an isolated clone of a generation on B.
    let g = newest(&rig.pair(B).unwrap()).unwrap();
    let clone_console = rig.hosts[B].console(&format!("web-test-{g}"));
    let (ok, out, err) = rig.cli(B, &["test-failover", "web", "--generation", &g.to_string()]);
    assert!(ok, "test-failover: {out}{err}");
    let (first, _, _) = snooper.assert_boot(&clone_console, "b", "web", g, Duration::from_secs(90));
    rig.wait_pair(B, "test clone running", Duration::from_secs(30), |p| {
        p["test_clone"].as_u64() == Some(g)
    });
    let (ok, out, err) = rig.cli(B, &["end-test", "web"]);
    assert!(ok, "end-test: {out}{err}");
    rig.wait_pair(B, "test clone gone", Duration::from_secs(60), |p| {
        p["test_clone"].is_null()
    });
    wait_for(
        "the clone's domain to be removed",
        Duration::from_secs(30),
        || {
            let (_, list) = rig.hosts[B].virsh(&["list", "--all", "--name"]);
            (!list.contains("web-test")).then_some(())
        },
    );
    assert_eq!(
        s(&rig.pair(A).unwrap(), "active"),
        "node-a",
        "production untouched"
    );
    clock.say(&format!(
        "test failover of g{g}: clone booted with {first}, ended"
    ));

    // ---- SIGHUP: a bad config is refused, the agent keeps running; a good one reloads.
    let good = std::fs::read_to_string(&rig.config).unwrap();
    std::fs::write(
        &rig.config,
        good.replace("[[pair]]", "[[pair]]\nprimaryy = \"node-a\""),
    )
    .unwrap();
    rig.signal_agent(A, "HUP");
    let st = wait_for("the refused reload", Duration::from_secs(20), || {
        let st = rig.status(A);
        (n(&st, "reloads-failed") == 1).then_some(st)
    });
    let why = st["last-reload-error"].as_str().unwrap_or("").to_string();
    assert!(why.contains("primaryy"), "{why}");
    std::fs::write(&rig.config, &good).unwrap();
    rig.signal_agent(A, "HUP");
    wait_for("the reload", Duration::from_secs(60), || {
        let st = rig.try_status(A)?;
        (n(&st, "reloads-ok") == 1 && st["last-reload-error"].is_null()).then_some(())
    });
    rig.wait_pair(
        A,
        "a protected after the reload",
        Duration::from_secs(60),
        |p| s(p, "phase") == "protected",
    );
    assert_eq!(
        vm_state(&rt, &rig, A, "web"),
        wspare_core::VmState::Running,
        "a reload leaves the VM alone"
    );
    clock.say(&format!(
        "SIGHUP: bad config refused ({why}); good config reloaded"
    ));

    // ---- 5. forged, tampered, replayed, junk heartbeats.
    let py = rig.dir.join("heartbeats.py");
    std::fs::write(&py, include_str!("e2e/heartbeats.py")).unwrap();
    let capture = rig.dir.join("captured.hex");
    let (b_ns, b_link, b_ip) = (
        rig.hosts[B].netns.clone(),
        rig.hosts[B].link.clone(),
        rig.hosts[B].ip.clone(),
    );
    let got = sh(
        "ip",
        &[
            "netns",
            "exec",
            &b_ns,
            "/usr/bin/python3",
            &py.display().to_string(),
            "capture",
            &b_link,
            "7400",
            &capture.display().to_string(),
            "3",
        ],
    );
    let captured: usize = got.trim().parse().unwrap();
    assert!(
        captured >= 8,
        "captured only {captured} heartbeats from a in 3 s"
    );
    let send = |ns: &str, mode: &str, count: usize, rate: u32| {
        sh(
            "ip",
            &[
                "netns",
                "exec",
                ns,
                "/usr/bin/python3",
                &py.display().to_string(),
                "send",
                &b_ip,
                "7400",
                &capture.display().to_string(),
                mode,
                &count.to_string(),
                &rate.to_string(),
            ],
        );
    };
    let r0 = rejected(&rig, B);
    let epoch0 = n(&rig.pair(B).unwrap(), "epoch");
    let a_ns = rig.hosts[A].netns.clone();
    send(&a_ns, "replay", 40, 100);
    send(&a_ns, "tamper", 20, 100);
    send(&a_ns, "forge", 20, 100);
    send(&a_ns, "junk", 10, 100);
    std::thread::sleep(Duration::from_millis(500));
    let r1 = rejected(&rig, B);
    let delta = |k: &str| n(&r1, k) - n(&r0, k);
    clock.say(&format!(
        "5: {captured} genuine heartbeats captured; sent 40 replayed, 20 tampered, 20 forged, 10 junk; refused: replay {}, bad-mac {}, malformed {}, stale {}",
        delta("replay"), delta("bad-mac"), delta("malformed"), delta("stale")
    ));
    assert_eq!(
        delta("replay"),
        40,
        "every replayed heartbeat is refused as a replay: {r1}"
    );
    assert_eq!(
        delta("bad-mac"),
        40,
        "tampered and forged heartbeats fail the tag: {r1}"
    );
    assert_eq!(delta("malformed"), 10, "junk is refused as malformed: {r1}");
    let p = rig.pair(B).unwrap();
    assert_eq!(s(&p, "phase"), "protected", "forgeries cause nothing: {p}");
    assert_eq!(n(&p, "epoch"), epoch0, "no forged epoch was adopted: {p}");
    assert_eq!(s(&rig.pair(A).unwrap(), "active"), "node-a");
    let m = Rig::metric_map(&rig.metrics(B));
    assert_eq!(
        m.get("wspare_heartbeats_rejected_total{reason=\"replay\"}")
            .copied(),
        Some(n(&r1, "replay") as f64),
        "the metric agrees with status"
    );
    sampler.assert_never_twice("after the forgeries");

    // ---- 1. host A loses power, while a replay storm of A's heartbeats hits B.
    let gen_before = newest(&rig.pair(B).unwrap()).unwrap();
    let b_console = rig.hosts[B].console("web");
    let _ = std::fs::remove_file(&b_console);
    let storm = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &b_ns,
            "/usr/bin/python3",
            &py.display().to_string(),
            "send",
            &b_ip,
            "7400",
            &capture.display().to_string(),
            "replay",
            "3000",
            "50",
        ])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let replays_before = n(&rejected(&rig, B), "replay");
    let crash = Instant::now();
    let asked = UnixMillis::now().0;
    // The moment the power went, as the host's power hook saw it.
    let t_crash = rig.power_cut(A);
    clock.say(&format!(
        "1: host a lost power (agent and VM killed without warning; the cut took {} ms to reach the host)",
        t_crash.saturating_sub(asked)
    ));
    let st = rig.wait_agent_exit(A, Duration::from_secs(10));
    assert!(!st.success(), "the power cut killed a's agent: {st:?}");
    let p = rig.wait_pair(B, "b runs the VM", Duration::from_secs(120), |p| {
        runs_on(p, "node-b")
    });
    let promoted = p["newest"]["generation"].as_u64().unwrap();
    let (first, want, t_marker) =
        snooper.assert_boot(&b_console, "b", "web", promoted, Duration::from_secs(120));
    let mut storm = storm;
    let storm_running_at_detection = storm.try_wait().unwrap().is_none();
    let _ = storm.kill();
    let _ = storm.wait();
    let replays_during = n(&rejected(&rig, B), "replay") - replays_before;
    let at = |pred: &dyn Fn(&serde_json::Value) -> bool, what: &str| {
        event_at(&rig, B, t_crash, pred).unwrap_or_else(|| panic!("no {what} event on b"))
    };
    let t_suspect = at(&|e| to_is(e, "suspect"), "suspect");
    let t_fenced = at(
        &|e| to_is(e, "fence-check") || (to_is(e, "promoting") && s(e, "from") == "fencing"),
        "fenced",
    );
    let t_promoted = at(&|e| to_is(e, "starting"), "promoted");
    let t_started = at(&|e| s(e, "from") == "starting", "started");
    let t_marker_ms = asked + t_marker.duration_since(crash).as_millis() as u64;
    // Straight to stdout, past the test harness's capture: CI logs show it.
    let _ = writeln!(
        std::io::stdout(),
        "rto-ms detect={} fence={} promote={} start={} marker={} total={}",
        t_suspect - t_crash,
        t_fenced - t_suspect,
        t_promoted - t_fenced,
        t_started - t_promoted,
        t_marker_ms - t_started,
        t_marker_ms - t_crash
    );
    clock.say(&format!("1: {replays_during} replayed heartbeats refused during the failover (the storm did not delay it)"));
    assert!(
        replays_during > 100,
        "the replay storm ran during the failover ({replays_during} refused)"
    );
    // The storm (50 replays a second for a minute) outlasts the failover:
    // had replays counted as heartbeats, b would not have suspected a
    // before it ended.
    assert!(
        t_suspect - t_crash < 15_000,
        "detection took {} ms while replays of a's heartbeats arrived: they must not count as liveness",
        t_suspect - t_crash
    );
    assert!(
        storm_running_at_detection,
        "the replay storm still ran when b suspected a"
    );
    assert!(
        promoted >= gen_before,
        "b promoted g{promoted}, older than g{gen_before} it held"
    );
    assert!(
        rig.events(B)
            .iter()
            .any(|e| s(e, "cause").contains("fenced node-a")),
        "b fenced a"
    );
    assert!(!rig.powered(A), "a's BMC reads off");
    let m = Rig::metric_map(&rig.metrics(B));
    assert!(
        m.get("wspare_fence_attempts_total{node=\"node-a\",result=\"ok\"}")
            .copied()
            .unwrap_or(0.0)
            >= 1.0
    );
    assert_eq!(
        m.get("wspare_failovers_total{pair=\"web\",kind=\"failover\"}")
            .copied(),
        Some(1.0)
    );
    // db, active on b, lost its spare: a's hypervisor still answers and
    // shows a's copy off, so b's machine for db does not fence (web's
    // already did) and db runs on, at the same epoch, on b.
    let db = rig.pair_of(B, "db").unwrap();
    assert_eq!(
        (s(&db, "active").as_str(), n(&db, "epoch")),
        ("node-b", 0),
        "{db}"
    );
    assert_ne!(s(&db, "phase"), "blocked", "{db}");
    assert_eq!(vm_state(&rt, &rig, B, "db"), wspare_core::VmState::Running);
    sampler.assert_never_twice("scenario 1");
    clock.say(&format!(
        "1: b promoted g{promoted} (counter {want}) and booted with {first}; db stayed on b"
    ));

    // ---- A comes back: stale, resynced from B.
    rig.power_on(A);
    rig.wait_pair(
        A,
        "a resynced as the spare",
        Duration::from_secs(120),
        |p| s(p, "active") == "node-b" && s(p, "phase") == "protected",
    );
    rig.wait_pair(B, "b protected", Duration::from_secs(60), |p| {
        s(p, "phase") == "protected"
    });
    assert!(
        rig.events(A).iter().any(|e| to_is(e, "stale")),
        "a learned its copy was stale"
    );
    rig.wait_pair_of(
        A,
        "db",
        "a back as db's spare",
        Duration::from_secs(120),
        |p| s(p, "active") == "node-b" && s(p, "phase") == "protected",
    );
    rig.wait_pair_of(B, "db", "db protected on b", Duration::from_secs(60), |p| {
        s(p, "phase") == "protected"
    });
    sampler.assert_never_twice("a's return");
    clock.say("a back and resynced from b (web), and db's spare again");

    // ---- 3. failback, switchover, failback: no counter value lost.
    handover(&rig, &rt, &clock, "failback", B, A);
    handover(&rig, &rt, &clock, "switchover", A, B);
    handover(&rig, &rt, &clock, "failback", B, A);
    sampler.assert_never_twice("scenario 3");

    // ---- 2. partition: both alive, the link between them cut.
    let epoch = n(&rig.pair(A).unwrap(), "epoch");
    let db_epoch = n(&rig.pair_of(A, "db").unwrap(), "epoch");
    let a_db_console = rig.hosts[A].console("db");
    let _ = std::fs::remove_file(&a_db_console);
    let t_cut = UnixMillis::now().0;
    rig.link(false);
    clock.say("2: link between the hosts cut");
    let st = rig.wait_agent_exit(B, Duration::from_secs(60));
    clock.say(&format!("2: b's agent went down with b's power ({st:?})"));
    assert!(!rig.powered(B), "a fenced b: b's BMC reads off");
    let p = rig.wait_pair(A, "a unprotected", Duration::from_secs(30), |p| {
        s(p, "phase") == "unprotected"
    });
    assert_eq!(s(&p, "active"), "node-a");
    assert_eq!(n(&p, "epoch"), epoch);
    assert!(
        event_at(&rig, A, t_cut, |e| s(e, "cause")
            .contains("fenced spare node-b"))
        .is_some(),
        "a fenced b"
    );
    // Longer than a's fence delay: nothing fences a now.
    std::thread::sleep(Duration::from_secs(8));
    assert_eq!(
        vm_state(&rt, &rig, A, "web"),
        wspare_core::VmState::Running,
        "a's copy kept running"
    );
    assert!(rig.powered(A), "a was not fenced");
    // db was active on b: a fenced b, so db failed over to a.
    let db = rig.wait_pair_of(
        A,
        "db",
        "db failed over to a",
        Duration::from_secs(60),
        |p| runs_on(p, "node-a"),
    );
    assert_eq!(n(&db, "epoch"), db_epoch + 1);
    let db_gen = newest(&db).unwrap();
    let (db_first, _, _) =
        snooper.assert_boot(&a_db_console, "a", "db", db_gen, Duration::from_secs(90));
    sampler.assert_never_twice("the partition");
    rig.link(true);
    rig.power_on(B);
    rig.wait_pair(B, "b back as the spare", Duration::from_secs(120), |p| {
        s(p, "active") == "node-a" && s(p, "phase") == "protected"
    });
    rig.wait_pair(A, "a protected", Duration::from_secs(60), |p| {
        s(p, "phase") == "protected"
    });
    assert_eq!(
        n(&rig.pair(A).unwrap(), "epoch"),
        epoch,
        "no failover happened"
    );
    let held = newest(&rig.pair(B).unwrap()).unwrap_or(0);
    rig.wait_pair(
        B,
        "a fresh generation on b after the heal",
        Duration::from_secs(60),
        |p| newest(p).is_some_and(|g| g > held),
    );
    assert_eq!(
        vm_state(&rt, &rig, B, "web"),
        wspare_core::VmState::ShutOff,
        "b's copy stayed off"
    );
    rig.wait_pair_of(
        B,
        "db",
        "b resynced as db's spare",
        Duration::from_secs(120),
        |p| s(p, "active") == "node-a" && s(p, "phase") == "protected",
    );
    assert!(
        !vm_state(&rt, &rig, B, "db").is_live(),
        "b's stale copy of db is never started"
    );
    sampler.assert_never_twice("after the partition");
    clock.say(&format!(
        "2: healed; b rejoined as the spare of both; web never stopped on a, db failed over to a (g{db_gen}, booted {db_first})"
    ));

    // ---- 4. a loses power; b's agent is killed during the failover and restarted.
    let gen_before = newest(&rig.pair(B).unwrap()).unwrap();
    let _ = std::fs::remove_file(&b_console);
    let b_db_console = rig.hosts[B].console("db");
    let _ = std::fs::remove_file(&b_db_console);
    let t_crash = rig.power_cut(A);
    rig.wait_agent_exit(A, Duration::from_secs(10));
    rig.wait_pair(
        B,
        "b fencing a (in a's fence delay)",
        Duration::from_secs(30),
        |p| s(p, "phase") == "fencing",
    );
    rig.kill_agent(B);
    clock.say("4: b's agent killed while fencing a");
    rig.start_agent(B);
    let p = rig.wait_pair(
        B,
        "b runs the VM after its restart",
        Duration::from_secs(120),
        |p| runs_on(p, "node-b"),
    );
    let promoted = p["newest"]["generation"].as_u64().unwrap();
    assert!(promoted >= gen_before);
    let (first, _, _) =
        snooper.assert_boot(&b_console, "b", "web", promoted, Duration::from_secs(120));
    let restored = rig.events(B).iter().any(|e| {
        e["at-ms"].as_u64().unwrap_or(0) >= t_crash
            && s(e, "cause").contains("restored from the journal in phase fencing")
    });
    assert!(restored, "b resumed from its journal in phase fencing");
    let db = rig.wait_pair_of(B, "db", "db back on b", Duration::from_secs(120), |p| {
        runs_on(p, "node-b")
    });
    let db_gen = newest(&db).unwrap();
    snooper.assert_boot(&b_db_console, "b", "db", db_gen, Duration::from_secs(120));
    sampler.assert_never_twice("scenario 4");
    clock.say(&format!(
        "4: b resumed from its journal, fenced a, booted g{promoted} with {first}"
    ));

    // ---- systemd notifications, SIGTERM and the journal.
    for i in [A, B] {
        let notes = &rig.hosts[i].notes;
        assert!(
            notes.count("WATCHDOG=1") > 0,
            "host {}: no WATCHDOG=1",
            rig.hosts[i].id
        );
    }
    assert!(
        rig.hosts[A].notes.count("RELOADING=1") >= 2,
        "a sent RELOADING=1 at SIGHUP"
    );
    rig.signal_agent(B, "TERM");
    let st = rig.wait_agent_exit(B, Duration::from_secs(30));
    assert!(
        st.success(),
        "SIGTERM stops the agent cleanly: {st:?}\n{}",
        tail(&rig.hosts[B].dir.join("agent.log"), 20)
    );
    assert!(
        rig.hosts[B].notes.count("STOPPING=1") >= 1,
        "b sent STOPPING=1"
    );
    let journal = rig.hosts[B].dir.join("state").join("journal");
    let (_, loaded) = wspare_core::journal::Journal::open(&journal, u64::MAX)
        .unwrap_or_else(|e| panic!("b's journal after SIGTERM: {e}"));
    assert_eq!(loaded.torn_tail, None);
    for pair in ["web", "db"] {
        let snap = &loaded.snapshots[&wspare_core::PairId::new(pair).unwrap()];
        assert_eq!(
            snap.active.as_str(),
            "node-b",
            "{pair} is active on b in b's journal"
        );
    }
    assert_eq!(
        vm_state(&rt, &rig, B, "web"),
        wspare_core::VmState::Running,
        "stopping the agent leaves the VM running"
    );
    sampler.assert_never_twice("the end");
    clock.say(&format!(
        "done: {} state samples, never two copies of a VM; {} generations seen",
        sampler.count(),
        snooper.generations()
    ));
    drop(snooper);
    drop(sampler);
    classic_warm_spare(&mut rig, &rt, &clock);
}

/// `warm-spare-rsync`, the classic setup, on the same two hosts with the
/// agents gone: copies of a second VM to B (the stopped copy there follows
/// the newest), a failover to B with A fenced through its BMC, and a
/// failback with nothing lost.
fn classic_warm_spare(rig: &mut Rig, rt: &tokio::runtime::Runtime, clock: &Clock) {
    let bin = std::path::PathBuf::from(env!("CARGO_BIN_EXE_warm-spare-rsync"));
    // Quiet the rig: b's copy of `web` off, a powered on without an agent.
    let _ = rig.hosts[B].virsh(&["destroy", "web"]);
    let _ = rig.hosts[B].virsh(&["destroy", "db"]);
    rig.power_on_host(A);
    let (a_ip, b_ip) = (rig.hosts[A].ip.clone(), rig.hosts[B].ip.clone());
    let (a_uri, b_uri) = (rig.hosts[A].uri.clone(), rig.hosts[B].uri.clone());
    let vm = VmName::new("classic").unwrap();
    let disk = rig.hosts[A].dir.join("images").join("classic.raw");
    guest::create_disk(&disk).unwrap();
    // The classic tool names hosts after their addresses: its files go
    // under <rig>/<address>/.
    let rig_dir = rig.dir.clone();
    for ip in [&a_ip, &b_ip] {
        std::fs::create_dir_all(rig_dir.join(ip).join("console")).unwrap();
    }
    let console_of = |ip: &str| rig_dir.join(ip).join("console").join("classic.console.log");
    let hv_a = libvirt(&a_uri, &rig.dir.join(&a_ip).join("console"));
    let hv_b = libvirt(&b_uri, &rig.dir.join(&b_ip).join("console"));
    let spec = guest::spec(&vm, &disk, GuestMode::Loop { interval_ms: 200 }).unwrap();
    rt.block_on(hv_a.define(&spec)).unwrap();
    rt.block_on(hv_a.start(&vm)).unwrap();
    first_counter(&console_of(&a_ip), Duration::from_secs(90));
    let run = |rig: &Rig, host: usize, local: &str, extra: &[&str]| -> String {
        let (p_uri, s_uri) = if host == A {
            (a_uri.clone(), format!("qemu+tcp://{b_ip}/system"))
        } else {
            (format!("qemu+tcp://{a_ip}/system"), b_uri.clone())
        };
        let mut args: Vec<String> = vec![
            "--vm".into(),
            "classic".into(),
            "--primary".into(),
            format!("root@{a_ip}"),
            "--spare".into(),
            format!("root@{b_ip}"),
            "--local".into(),
            local.into(),
            "--dir".into(),
            format!("{}/{{node}}/classic", rig.dir.display()),
            "--primary-uri".into(),
            p_uri,
            "--spare-uri".into(),
            s_uri,
            "--domain-type".into(),
            "qemu".into(),
            "--console-log-dir".into(),
            format!("{}/{{node}}/console", rig.dir.display()),
            "--ssh-key".into(),
            rig::SSH_KEY.into(),
            "--ssh-option".into(),
            "SetEnv=SHLVL=1".into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let (ok, out) = rig.in_host(host, &bin.display().to_string(), &refs);
        assert!(ok, "warm-spare-rsync {}: {out}", extra.join(" "));
        clock.say(&format!(
            "warm-spare-rsync {} (on {}): {}",
            extra.join(" "),
            rig.hosts[host].id,
            out.trim()
        ));
        out
    };
    run(rig, A, "primary", &["sync"]);
    run(rig, A, "primary", &["sync"]);
    let out = run(rig, A, "primary", &["status"]);
    assert!(out.contains(&format!("{a_ip} -> {b_ip}")), "{out}");
    // The spare's stopped copy is defined on the newest generation.
    let b_dir = rig.dir.join(&b_ip).join("classic");
    let m = wspare_rsync::manifest::Manifest::parse(
        &std::fs::read_to_string(b_dir.join("MANIFEST")).unwrap(),
    )
    .unwrap();
    let newest = m.newest().unwrap().clone();
    let image = newest.disk_specs(&b_dir)[0].path.clone();
    let held = guest::read_counter(&image).unwrap();
    let defined = rt.block_on(hv_b.spec(&vm)).unwrap();
    assert_eq!(
        defined.disks[0].path, image,
        "the stopped spare follows the newest copy"
    );
    // Failover, on the spare: fence a through its BMC, start from the newest copy.
    let pw = rig.dir.join("ipmi.pw").display().to_string();
    let bmc = format!("{}:{}", rig.hosts[A].bmc.0, rig.hosts[A].bmc.1);
    run(
        rig,
        B,
        "spare",
        &[
            "failover",
            "--ipmi",
            &bmc,
            "--ipmi-user",
            rig::IPMI_USER,
            "--ipmi-password-file",
            &pw,
        ],
    );
    assert!(!rig.powered(A), "a was fenced through its BMC");
    let (first, _) = first_counter(&console_of(&b_ip), Duration::from_secs(90));
    assert_eq!(
        first,
        held + 1,
        "the spare boots with the newest copy's counter ({held})"
    );
    assert!(
        !rt.block_on(hv_a.status(&vm)).unwrap().state.is_live(),
        "classic runs once"
    );
    // Failback, from the spare, once a is back: nothing lost.
    rig.power_on_host(A);
    let _ = std::fs::remove_file(console_of(&a_ip));
    run(rig, B, "spare", &["failback", "--shutdown-timeout", "60s"]);
    let stopped = {
        let s = rt.block_on(hv_b.spec(&vm)).unwrap();
        guest::read_counter(&s.disks[0].path).unwrap()
    };
    let (first, _) = first_counter(&console_of(&a_ip), Duration::from_secs(90));
    assert_eq!(
        first,
        stopped + 1,
        "failback: a boots with the spare's last counter ({stopped})"
    );
    assert!(!rt.block_on(hv_b.status(&vm)).unwrap().state.is_live());
    clock.say(&format!(
        "classic warm spare: failover booted {} on b (copy held {held}), failback booted {first} on a (b stopped at {stopped})",
        held + 1
    ));
}

/// `check-config` on broken configs: each error with its field (and its
/// line), nothing else wrong reported, never a panic.
#[test]
fn check_config_reports_every_error_with_its_field() {
    let dir = tempfile::tempdir().unwrap();
    // Line 1 is a comment: line numbers below are the file's.
    let good = include_str!("data/two-nodes.toml");
    let run = |name: &str, text: &str| -> (bool, String) {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        let out = std::process::Command::new(bin())
            .args(["check-config", &p.display().to_string()])
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            !text.contains("panicked"),
            "check-config panicked on {name}:\n{text}"
        );
        (out.status.success(), text)
    };
    let (ok, out) = run("good.toml", good);
    assert!(ok, "{out}");
    assert!(out.contains("ok (2 node(s), 1 pair(s))"), "{out}");

    // (file, edit, every line the report must have, how many errors)
    let cases: Vec<(&str, String, Vec<&str>, usize)> = vec![
        (
            "typo.toml",
            good.replace("address = \"10.0.0.2:7400\"", "adress = \"10.0.0.2:7400\""),
            vec![
                "line 25: node[node-b].adress: unknown field `adress`",
                "did you mean `address`?",
                "line 23: node[node-b].address: missing field `address`",
            ],
            2,
        ),
        (
            "types.toml",
            good.replace("heartbeat-interval = \"500ms\"", "heartbeat-interval = 500")
                .replace("sync-interval = \"10s\"", "sync-interval = true"),
            vec![
                "line 4: cluster.heartbeat-interval: invalid type: integer `500`",
                "pair[web].policy.sync-interval: invalid type: boolean `true`",
            ],
            2,
        ),
        (
            "same-node.toml",
            good.replace("spare = \"node-b\"", "spare = \"node-a\""),
            vec!["line 40: pair[web].spare: primary and spare are both node-a"],
            1,
        ),
        (
            "missing.toml",
            good.replace("vm = \"web\"\n", "")
                .replace("dir = \"/srv/wspare/web\"\n", "")
                .replace("key-file = \"/etc/wspare/key\"\n", ""),
            vec![
                "agent.key-file: missing field `key-file`",
                "pair[web].vm: missing field `vm`",
                "pair[web].replication.dir: missing field `dir`",
            ],
            3,
        ),
        (
            "all-at-once.toml",
            good.replace("address = \"10.0.0.2:7400\"", "adress = \"10.0.0.2:7400\"")
                .replace("heartbeat-interval = \"500ms\"", "heartbeat-interval = 500")
                .replace("spare = \"node-b\"", "spare = \"node-a\"")
                .replace("vm = \"web\"\n", "")
                .replace("type = \"rsync\"", "type = \"rsink\""),
            vec![
                "cluster.heartbeat-interval: invalid type",
                "node[node-b].adress: unknown field",
                "node[node-b].address: missing field",
                "pair[web].spare: primary and spare are both node-a",
                "pair[web].vm: missing field `vm`",
                "pair[web].replication.type: unknown backend `rsink`",
            ],
            6,
        ),
        (
            "backends.toml",
            good.replacen("type = \"ipmi\"", "type = \"ipmy\"", 1)
                .replacen(
                    "uri = \"qemu:///system\"",
                    "uri = \"qemu:///system\"\ndomain-type = \"kvmm\"",
                    1,
                ),
            vec![
                "node[node-a].hypervisor.domain-type: unknown variant `kvmm`",
                "node[node-a].fence.type: unknown backend `ipmy`",
                "did you mean `ipmi`?",
            ],
            2,
        ),
        (
            "semantic.toml",
            good.replace("address = \"10.0.0.2:7400\"", "address = \"10.0.0.2\"")
                .replace("primary = \"node-a\"", "primary = \"node-c\""),
            vec![
                "line 39: pair[web].primary: node node-c is not defined",
                "line 25: node[node-b].address: \"10.0.0.2\" is not host:port",
            ],
            2,
        ),
        (
            "syntax.toml",
            good.replace("[[pair]]", "[[pair]"),
            vec!["line 36:"],
            1,
        ),
    ];
    for (name, text, want, count) in cases {
        let (ok, out) = run(name, &text);
        assert!(!ok, "{name} passed:\n{out}");
        for w in want {
            assert!(out.contains(w), "{name}: wanted {w:?} in:\n{out}");
        }
        assert!(
            out.contains(&format!("{count} error(s)")),
            "{name}: wanted {count} error(s):\n{out}"
        );
        for l in out.lines().filter(|l| l.starts_with("  ")) {
            assert!(
                l.starts_with("  line "),
                "{name}: an error without its line: {l:?}"
            );
        }
        eprintln!("{out}");
    }
    // Errors that only the core's validation finds, once the structure is sound.
    let (ok, out) = run(
        "core.toml",
        &good.replace("address = \"10.0.0.2:7400\"", "address = \"10.0.0.2\""),
    );
    assert!(!ok);
    assert!(
        out.contains("line 25: node[node-b].address: \"10.0.0.2\" is not host:port"),
        "{out}"
    );
    // Not a file at all.
    let (ok, out) = run("binary.toml", "\u{0}\u{1}garbage = = =\n[[[");
    assert!(!ok && out.contains("error(s)"), "{out}");
}
