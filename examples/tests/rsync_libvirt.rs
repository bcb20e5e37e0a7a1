//! wspare-rsync with wspare-libvirt on a real running guest.
//!
//! The tiny TCG guest keeps incrementing the counter on its disk while
//! replication cycles run, each from a freeze of the running guest (an
//! external disk-only snapshot, released by an active block commit). At
//! each freeze the test reads the counter from the frozen image: that is
//! the generation's point in time. Then the primary is powered off without
//! warning, the newest generation is promoted, and a spare domain boots
//! from the promoted images: the counter it starts from must be the one
//! frozen in that generation (it prints that value plus one), and the
//! image must be whole.
//!
//! Needs libvirtd and virtlogd (`.ci/start-services`); fails with that hint
//! otherwise.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use wspare_core::runner::LocalRunner;
use wspare_core::{Hypervisor, NodeId, Replicator, SourceView, VmName, VmState};
use wspare_libvirt::{DomainType, LibvirtConfig, LibvirtHypervisor};
use wspare_rsync::{Endpoint, Options, Reach, RsyncReplicator};
use wspare_testkit::guest::{self, GuestMode};

const URI: &str = "qemu:///system";
const BOOT: Duration = Duration::from_secs(90);

fn require_libvirtd() {
    if let Err(e) = virt_ok() {
        panic!(
            "libvirtd does not answer on {URI} ({e}); run `bash .ci/install-deps && bash .ci/start-services` (CI does)"
        );
    }
}

fn virt_ok() -> Result<(), String> {
    let out = std::process::Command::new("virsh")
        .args(["-c", URI, "list", "--all"])
        .output()
        .map_err(|e| format!("virsh: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

/// Destroys and undefines a domain, ignoring what is already gone.
fn remove(name: &str) {
    for cmd in [
        vec!["destroy", name],
        vec!["undefine", name, "--snapshots-metadata"],
    ] {
        let _ = std::process::Command::new("virsh")
            .args(["-c", URI])
            .args(&cmd)
            .output();
    }
}

struct Domains(Vec<String>);

impl Drop for Domains {
    fn drop(&mut self) {
        for d in &self.0 {
            remove(d);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_guest_replicated_by_rsync_boots_from_the_promoted_generation() {
    require_libvirtd();
    guest::build().unwrap_or_else(|e| panic!("cannot build the test guest: {e}"));
    let dir = tempfile::Builder::new()
        .prefix("wspare-rl-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let (src, a_dir, b_dir, consoles) = (
        dir.path().join("src"),
        dir.path().join("a"),
        dir.path().join("b"),
        dir.path().join("console"),
    );
    for d in [&src, &a_dir, &b_dir, &consoles] {
        std::fs::create_dir_all(d).unwrap();
    }
    let mut cfg = LibvirtConfig::new(URI);
    cfg.domain_type = Some(DomainType::Qemu);
    cfg.console_log_dir = Some(consoles.clone());
    let hv = LibvirtHypervisor::new(cfg).unwrap();

    let pid = std::process::id();
    let primary = VmName::new(format!("wspare-rl-{pid}")).unwrap();
    let spare = VmName::new(format!("wspare-rl-spare-{pid}")).unwrap();
    let _cleanup = Domains(vec![primary.to_string(), spare.to_string()]);
    for d in [&primary, &spare] {
        remove(d.as_str());
    }

    // The primary: a guest that writes its counter every 100 ms.
    let disk = src.join("vda.raw");
    guest::create_disk(&disk).unwrap();
    let spec = guest::spec(&primary, &disk, GuestMode::Loop { interval_ms: 100 }).unwrap();
    hv.define(&spec).await.unwrap();
    hv.start(&primary).await.unwrap();
    let log = hv.console_log(&primary).unwrap();
    guest::wait_for_marker(&log, guest::COUNTER_MARKER, BOOT)
        .await
        .unwrap();

    let local: Arc<dyn wspare_core::runner::CommandRunner> = Arc::new(LocalRunner);
    let (a, b) = (
        NodeId::new("node-a").unwrap(),
        NodeId::new("node-b").unwrap(),
    );
    let rep = RsyncReplicator::new(
        "web",
        Endpoint::new(a, local.clone(), Reach::Local, &a_dir),
        Endpoint::new(b, local, Reach::Local, &b_dir),
        Options::default(),
    )
    .unwrap();

    // Cycles while the guest keeps writing; the counter frozen in each.
    let mut frozen_counters = Vec::new();
    for i in 0..4 {
        let frozen = hv.freeze_disks(&primary).await.unwrap();
        let base = &frozen.disks[0].path;
        let at_freeze = guest::read_counter(base).unwrap();
        let view = SourceView::Frozen(frozen.clone());
        let r = if i == 0 {
            rep.initial_sync(&view).await
        } else {
            rep.sync(&view).await
        };
        // The frozen image did not move while it was copied.
        assert_eq!(
            guest::read_counter(base).unwrap(),
            at_freeze,
            "the frozen image changed during cycle {i}"
        );
        hv.release_disks(&frozen).await.unwrap();
        let info = r.unwrap();
        assert_eq!(
            hv.status(&primary).await.unwrap().state,
            VmState::Running,
            "the guest ran through cycle {i}"
        );
        println!("cycle {i}: {} holds counter {at_freeze}", info.generation);
        frozen_counters.push((info.generation, at_freeze));
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
    let counters: Vec<u64> = frozen_counters.iter().map(|(_, c)| *c).collect();
    assert!(
        counters.windows(2).all(|w| w[0] < w[1]),
        "the guest kept writing between cycles: {counters:?}"
    );

    // The primary dies without warning; it had written past the last generation.
    hv.destroy(&primary).await.unwrap();
    let last_written = guest::read_counter(&disk).unwrap();
    let (newest, frozen_at) = *frozen_counters.last().unwrap();
    assert!(
        last_written > frozen_at,
        "writes after the last cycle are what a failover loses"
    );

    let status = rep.status().await.unwrap();
    assert_eq!(status.newest.unwrap().generation, newest);
    let promoted = rep.promote(newest).await.unwrap();
    let replica = &promoted.disks[0].path;
    assert!(
        replica.starts_with(&b_dir),
        "the spare runs from the target's slot: {}",
        replica.display()
    );
    assert_eq!(
        guest::read_counter(replica).unwrap(),
        frozen_at,
        "the promoted image holds the frozen point in time"
    );

    // The spare boots from the promoted generation.
    let spare_spec = guest::spec(&spare, Path::new(replica), GuestMode::Once).unwrap();
    hv.define(&spare_spec).await.unwrap();
    hv.start(&spare).await.unwrap();
    let spare_log = hv.console_log(&spare).unwrap();
    let line = guest::wait_for_marker(&spare_log, guest::COUNTER_MARKER, BOOT)
        .await
        .unwrap();
    assert_eq!(
        guest::console_counters(&line)[..],
        [frozen_at + 1],
        "the spare started from counter {frozen_at}, the value in {newest}; console:\n{}",
        guest::read_console(&spare_log)
    );
    println!(
        "spare booted from {newest} with counter {frozen_at} (the primary had reached {last_written}); generations {frozen_counters:?}"
    );
}
