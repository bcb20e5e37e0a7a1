//! Faults against the real rsync: killed mid-transfer at random points, a
//! full target filesystem, a missing source, an unreachable target, a
//! checksum mismatch, a stale direction. Each gives an error of the right
//! kind and leaves the last complete generation promotable, its content
//! the source's at its point in time.
//!
//! Randomized tests print their seed; `WSPARE_SEED=N` replays one.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{digest_files, write_blocks, Env, Mode};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use wspare_core::runner::{LocalRunner, SshRunner};
use wspare_core::{
    Boot, DiskSpec, ErrorKind, Firmware, GenerationInfo, NodeId, Replicator, SourceView, VmName,
    VmSpec,
};
use wspare_rsync::{Endpoint, Reach, RsyncReplicator};

fn seeds(default: &[u64]) -> Vec<u64> {
    match std::env::var("WSPARE_SEED") {
        Ok(s) => vec![s.parse().expect("WSPARE_SEED must be a number")],
        Err(_) => default.to_vec(),
    }
}

/// A VM spec that boots from `disks`, as the driver would start the spare.
fn spare_spec(disks: Vec<DiskSpec>) -> VmSpec {
    let spec = VmSpec {
        name: VmName::new("web").unwrap(),
        vcpus: 1,
        memory_mib: 64,
        firmware: Firmware::Bios,
        disks,
        nics: Vec::new(),
        boot: Boot::Disk,
    };
    spec.validate()
        .expect("the promoted disks make a valid spec");
    spec
}

/// SIGKILLs every rsync process working on files under `root`.
fn kill_rsyncs(root: &Path) -> usize {
    let root = root.display().to_string();
    let mut killed = 0;
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let is_rsync = args
            .first()
            .is_some_and(|a| a == "rsync" || a.ends_with("/rsync"));
        if is_rsync && args.iter().any(|a| a.contains(&root)) {
            let ok = std::process::Command::new("kill")
                .args(["-9", &pid.to_string()])
                .status();
            if ok.is_ok_and(|s| s.success()) {
                killed += 1;
            }
        }
    }
    killed
}

/// Checks what the target exposes: the newest generation is `good`'s last,
/// every listed generation holds exactly the source's content at its point
/// in time (a VM spec started from it would see that), and the slot being
/// written is never listed.
async fn check_exposed(env: &Env, good: &[(GenerationInfo, String)], when: &str) {
    let rep = &env.rep;
    let st = rep.status().await.unwrap();
    assert_eq!(
        st.newest,
        Some(good.last().unwrap().0),
        "{when}: newest generation"
    );
    let m = rep.target_manifest().await.unwrap().expect("a manifest");
    if let Some(w) = m.writing {
        assert!(
            m.generations.iter().all(|g| g.slot != w.slot),
            "{when}: slot {} is being written and listed: {m:?}",
            w.slot
        );
    }
    for info in &st.generations {
        let (_, want) = good
            .iter()
            .find(|(g, _)| g == info)
            .unwrap_or_else(|| panic!("{when}: status lists {info:?}, never returned by a sync"));
        let p = rep.promote(info.generation).await.unwrap();
        let spec = spare_spec(p.disks);
        let got = digest_files(&spec.disks).unwrap();
        assert_eq!(
            &got, want,
            "{when}: {} does not hold the source's content at its point in time",
            info.generation
        );
    }
}

async fn kill_at_random_points(mode: Mode, seed: u64, rounds: usize) {
    println!("kill_at_random_points {mode:?} seed {seed} (replay: WSPARE_SEED={seed})");
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let env = Env::new(mode, &[12 << 10, 4 << 10], None);
    let rep = env.rep.clone();
    let mut good = Vec::new();
    let d = digest_files(&env.vm_disks).unwrap();
    good.push((
        rep.initial_sync(&env.view().await.unwrap()).await.unwrap(),
        d,
    ));
    // One undisturbed cycle, timed: kill points are drawn over its length.
    write_blocks(&env.vm_disks, rng.gen(), 64).unwrap();
    let d = digest_files(&env.vm_disks).unwrap();
    let t0 = Instant::now();
    good.push((rep.sync(&env.view().await.unwrap()).await.unwrap(), d));
    let cycle = t0.elapsed();
    let (mut killed, mut dropped, mut finished) = (0, 0, 0);
    for round in 0..rounds {
        write_blocks(&env.vm_disks, rng.gen(), 64).unwrap();
        let d = digest_files(&env.vm_disks).unwrap();
        let view = env.view().await.unwrap();
        let delay = Duration::from_micros(rng.gen_range(0..=(cycle.as_micros() as u64 * 11 / 10)));
        let by_signal = rng.gen_bool(0.6);
        let when = format!(
            "seed {seed} round {round}: {} after {delay:?}",
            if by_signal {
                "kill -9 rsync"
            } else {
                "drop the sync"
            }
        );
        if by_signal {
            let root = env.root().to_path_buf();
            let killer = tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                kill_rsyncs(&root)
            });
            let r = rep.sync(&view).await;
            let n = killer.await.unwrap();
            match r {
                Ok(info) => {
                    finished += 1;
                    good.push((info, d));
                }
                Err(e) => {
                    assert!(
                        n > 0,
                        "{when}: sync failed although nothing was killed: {e}"
                    );
                    let kinds: &[ErrorKind] = match mode {
                        Mode::Local => &[ErrorKind::Backend],
                        // The far end's rsync dying looks like a lost connection.
                        Mode::Ssh => &[ErrorKind::Backend, ErrorKind::Unreachable],
                    };
                    assert!(
                        kinds.contains(&e.kind()),
                        "{when}: error of kind {}: {e}",
                        e.kind()
                    );
                    assert!(e.is_retryable(), "{when}: {e}");
                    killed += 1;
                }
            }
        } else {
            match tokio::time::timeout(delay, rep.sync(&view)).await {
                Ok(r) => {
                    finished += 1;
                    good.push((r.unwrap(), d));
                }
                Err(_) => {
                    dropped += 1;
                    // Dropped after the manifest switch (the rename is the
                    // commit point, done by a child that outlives nothing):
                    // the new generation is complete, with this content.
                    let newest = rep.status().await.unwrap().newest.unwrap();
                    if newest.generation > good.last().unwrap().0.generation {
                        good.push((newest, d));
                    }
                }
            }
        }
        check_exposed(&env, &good, &when).await;
    }
    // And the next cycle succeeds.
    write_blocks(&env.vm_disks, rng.gen(), 8).unwrap();
    let d = digest_files(&env.vm_disks).unwrap();
    good.push((rep.sync(&env.view().await.unwrap()).await.unwrap(), d));
    check_exposed(&env, &good, &format!("seed {seed}: after the last cycle")).await;
    println!(
        "seed {seed}: cycle {cycle:?}; {killed} killed, {dropped} dropped, {finished} finished"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rsync_killed_at_random_points_leaves_the_last_generation_promotable() {
    for seed in seeds(&[1, 2, 3, 4, 5]) {
        kill_at_random_points(Mode::Local, seed, 6).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rsync_over_ssh_killed_at_random_points_leaves_the_last_generation_promotable() {
    for seed in seeds(&[11, 12]) {
        kill_at_random_points(Mode::Ssh, seed, 4).await;
    }
}

/// Unmounts on drop.
struct Mount(PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_target_filesystem_fails_the_cycle_cleanly() {
    let env0 = tempfile::Builder::new()
        .prefix("wspare-rsync-full-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let small = env0.path().join("small");
    std::fs::create_dir(&small).unwrap();
    let st = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=8m", "tmpfs"])
        .arg(&small)
        .status()
        .unwrap();
    assert!(
        st.success(),
        "mounting an 8 MiB tmpfs at {} failed (the test runs as root)",
        small.display()
    );
    let _mount = Mount(small.clone());
    let env = Env::new(Mode::Local, &[3 << 10], Some(small.join("b")));
    let rep = env.rep.clone();
    let d1 = digest_files(&env.vm_disks).unwrap();
    let g1 = rep.initial_sync(&env.view().await.unwrap()).await.unwrap();

    // The guest's disk grows past what the target can hold.
    let disk = &env.vm_disks[0].path;
    {
        use std::io::{Seek, SeekFrom, Write};
        let mut f = std::fs::OpenOptions::new().write(true).open(disk).unwrap();
        f.seek(SeekFrom::Start(3 << 20)).unwrap();
        f.write_all(&vec![0x5a; 6 << 20]).unwrap();
    }
    let e = rep.sync(&env.view().await.unwrap()).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Backend, "{e}");
    assert!(!e.is_retryable(), "{e}");
    let msg = e.to_string();
    assert!(msg.contains("target filesystem on node-b is full"), "{msg}");
    assert!(
        msg.contains(&small.join("b").display().to_string()),
        "{msg}"
    );
    assert!(msg.contains("No space left on device"), "{msg}");
    check_exposed(&env, &[(g1, d1.clone())], "after the full filesystem").await;

    // Space back (the disk shrinks again): the next cycle succeeds.
    std::fs::OpenOptions::new()
        .write(true)
        .open(disk)
        .unwrap()
        .set_len(3 << 20)
        .unwrap();
    let d3 = digest_files(&env.vm_disks).unwrap();
    let g3 = rep.sync(&env.view().await.unwrap()).await.unwrap();
    assert!(g3.generation > g1.generation);
    check_exposed(&env, &[(g1, d1), (g3, d3)], "after space was freed").await;
    drop(env);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_source_is_not_found_and_touches_nothing() {
    let env = Env::new(Mode::Local, &[1 << 10, 1 << 10], None);
    let rep = env.rep.clone();
    let d1 = digest_files(&env.vm_disks).unwrap();
    let g1 = rep.initial_sync(&env.view().await.unwrap()).await.unwrap();
    let before = rep.target_manifest().await.unwrap();
    let view = env.view().await.unwrap();
    std::fs::remove_file(&env.vm_disks[1].path).unwrap();
    let e = rep.sync(&view).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
    assert!(
        e.to_string()
            .contains(&env.vm_disks[1].path.display().to_string()),
        "{e}"
    );
    assert!(e.to_string().contains("node-a"), "{e}");
    assert_eq!(
        rep.target_manifest().await.unwrap(),
        before,
        "the manifest changed"
    );
    check_exposed(&env, &[(g1, d1)], "after a missing source").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_target_is_unreachable() {
    let env = Env::new(Mode::Local, &[1 << 10], None);
    let d1 = digest_files(&env.vm_disks).unwrap();
    let g1 = env
        .rep
        .initial_sync(&env.view().await.unwrap())
        .await
        .unwrap();
    let mut dead = common::loopback();
    dead.port = Some(1);
    let (a, b) = env.rep.ends();
    let a = a.clone();
    let b = b.clone();

    // rsync cannot connect (the target's own commands still run).
    let rep = RsyncReplicator::new(
        "web",
        a.clone(),
        Endpoint::new(
            b.node.clone(),
            b.runner.clone(),
            Reach::Ssh(dead.clone()),
            b.replica_dir.clone(),
        ),
        common::test_options(),
    )
    .unwrap();
    let t0 = Instant::now();
    let e = rep.sync(&env.view().await.unwrap()).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unreachable, "{e}");
    assert!(e.to_string().contains("node-b is unreachable"), "{e}");
    assert!(e.to_string().contains("Connection refused"), "{e}");
    assert!(t0.elapsed() < Duration::from_secs(20));
    check_exposed(&env, &[(g1, d1.clone())], "after rsync could not connect").await;

    // Nothing on the target can be run.
    let rep = RsyncReplicator::new(
        "web",
        a,
        Endpoint::new(
            b.node.clone(),
            Arc::new(SshRunner::new(dead.clone())),
            Reach::Ssh(dead),
            b.replica_dir.clone(),
        ),
        common::test_options(),
    )
    .unwrap();
    let e = rep.sync(&env.view().await.unwrap()).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unreachable, "{e}");
    let e = rep.status().await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unreachable, "{e}");
    check_exposed(&env, &[(g1, d1)], "after the target was unreachable").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_finds_a_checksum_mismatch() {
    let env = Env::new(Mode::Local, &[2 << 10, 1 << 10], None);
    let rep = env.rep.clone();
    let g1 = rep
        .initial_sync(&env.view().await.unwrap())
        .await
        .unwrap()
        .generation;
    write_blocks(&env.vm_disks, 7, 4).unwrap();
    let view = env.view().await.unwrap();
    let g2 = rep.sync(&view).await.unwrap().generation;
    rep.verify(g1, &view).await.unwrap();
    rep.verify(g2, &view).await.unwrap();

    // The source moved on after g2: verify against it says so.
    write_blocks(&env.vm_disks, 8, 1).unwrap();
    let e = rep.verify(g2, &view).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Conflict, "{e}");
    assert!(e.to_string().contains("on node-a"), "{e}");

    // One byte of the copy altered.
    let p = rep.promote(g2).await.unwrap();
    {
        use std::io::{Seek, SeekFrom, Write};
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(&p.disks[1].path)
            .unwrap();
        f.seek(SeekFrom::Start(100)).unwrap();
        f.write_all(b"x").unwrap();
    }
    let e = rep.verify(g2, &SourceView::Continuous).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Conflict, "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("checksum mismatch for disk vdb of g2 on node-b"),
        "{msg}"
    );
    assert!(msg.contains("expected xxh128:"), "{msg}");
    // The other generation is untouched.
    rep.verify(g1, &SourceView::Continuous).await.unwrap();
    let e = rep
        .verify(wspare_core::Generation(99), &view)
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound);
}

/// After a failover (promote, reverse), a replicator still configured in
/// the old direction cannot copy the stale old primary over the new
/// active copy; the reverse sync overwrites the old primary's replica
/// directory only with a newer generation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_direction_is_refused_and_failback_only_moves_forward() {
    let env = Env::new(Mode::Local, &[2 << 10], None);
    let rep = env.rep.clone();
    let g1 = rep.initial_sync(&env.view().await.unwrap()).await.unwrap();
    write_blocks(&env.vm_disks, 1, 4).unwrap();
    let g2 = rep.sync(&env.view().await.unwrap()).await.unwrap();
    let (a, b) = {
        let (a, b) = rep.ends();
        (a.clone(), b.clone())
    };

    assert_eq!(on_disk(&a, &b).await, ("node-a".into(), 0));

    // Failover: the spare runs from g2's promoted slot; replication reverses.
    let p = rep.promote(g2.generation).await.unwrap();
    rep.reverse().await.unwrap();
    assert_eq!(on_disk(&a, &b).await, ("node-b".into(), 1));
    assert_eq!(rep.active_disks().await.unwrap().unwrap(), p.disks);
    write_blocks(&p.disks, 2, 4).unwrap(); // the spare's guest writes

    // A replicator built with the old direction (a stale agent on the old primary).
    let stale = RsyncReplicator::new("web", a.clone(), b.clone(), common::test_options()).unwrap();
    write_blocks(&env.vm_disks, 3, 4).unwrap(); // the stale primary's own writes
    let e = stale.sync(&env.view_of(&env.vm_disks)).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Conflict, "{e}");
    assert!(
        e.to_string().contains("node-b holds the active copy"),
        "{e}"
    );
    let spare_content = digest_files(&p.disks).unwrap();

    // Failback: the spare's copy goes back to the old primary, as a newer generation.
    let d3 = digest_files(&p.disks).unwrap();
    let g3 = rep.sync(&env.view_of(&p.disks)).await.unwrap();
    assert!(g3.generation > g2.generation && g2.generation > g1.generation);
    assert_eq!(
        digest_files(&p.disks).unwrap(),
        spare_content,
        "the active copy changed"
    );
    let st = rep.status().await.unwrap();
    assert_eq!(
        (st.source.as_str(), st.target.as_str()),
        ("node-b", "node-a")
    );
    assert_eq!(st.newest, Some(g3));
    let back = rep.promote(g3.generation).await.unwrap();
    assert!(
        back.disks[0].path.starts_with(&a.replica_dir),
        "{:?}",
        back.disks
    );
    assert_eq!(digest_files(&back.disks).unwrap(), d3);

    // A fresh replicator with the right direction learns the epoch from the manifests.
    let fresh = RsyncReplicator::new("web", b.clone(), a.clone(), common::test_options()).unwrap();
    let st = fresh.status().await.unwrap();
    assert_eq!(st.newest, Some(g3));
    let g4 = fresh.sync(&env.view_of(&p.disks)).await.unwrap();
    assert!(g4.generation > g3.generation);
    // The stale one still refuses, now because it is behind.
    let e = stale.sync(&env.view_of(&env.vm_disks)).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Conflict, "{e}");
    assert_eq!(on_disk(&a, &b).await, ("node-b".into(), 1));
}

/// The direction the manifests on disk give, as the agent and
/// `warm-spare-rsync` read it before they build a replicator.
async fn on_disk(a: &Endpoint, b: &Endpoint) -> (String, u64) {
    let (d, unread) =
        wspare_rsync::read_direction("web", &a.node, a, b, &common::test_options()).await;
    assert!(unread.is_empty(), "{unread:?}");
    (d.source.to_string(), d.epoch)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_progress_and_lag_during_a_cycle() {
    // rsync updates its meter about once a second: at 4 MiB/s the 12 MiB
    // take 3 s, so two midway updates each stay visible for about a
    // second, even to a sampler slowed by a loaded machine (at 8 MiB/s the
    // one midway update was missed on CI).
    let opts = wspare_rsync::Options {
        bwlimit_kib: Some(4 << 10),
        ..common::test_options()
    };
    let env = Env::new_with(Mode::Local, &[12 << 10], None, opts);
    let rep = env.rep.clone();
    let view = env.view().await.unwrap();
    let total = std::fs::metadata(&env.vm_disks[0].path).unwrap().len();
    let r2 = rep.clone();
    let task = tokio::spawn(async move { r2.initial_sync(&view).await });
    let mut seen = Vec::new();
    while !task.is_finished() {
        if let Some(p) = rep.status().await.unwrap().progress {
            seen.push(p);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let g = task.await.unwrap().unwrap();
    assert!(
        seen.iter()
            .any(|p| p.bytes_done > 0 && p.bytes_done < total),
        "no progress midway: {seen:?}"
    );
    assert!(seen.iter().all(|p| p.bytes_total == total), "{seen:?}");
    assert!(seen.iter().any(|p| p.bytes_per_sec > 0), "{seen:?}");
    assert!(
        seen.windows(2).all(|w| w[0].bytes_done <= w[1].bytes_done),
        "{seen:?}"
    );
    let st = rep.status().await.unwrap();
    assert_eq!(st.progress, None);
    let now = wspare_core::UnixMillis(g.source_time.0 + 1500);
    assert_eq!(st.lag(now), Some(Duration::from_millis(1500)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_ends_a_cycle_and_keeps_the_generations() {
    let opts = wspare_rsync::Options {
        bwlimit_kib: Some(2 << 10),
        ..common::test_options()
    };
    let env = Env::new_with(Mode::Local, &[8 << 10], None, opts);
    let rep = env.rep.clone();
    let d1 = digest_files(&env.vm_disks).unwrap();
    let g1 = rep.initial_sync(&env.view().await.unwrap()).await.unwrap();
    for b in 0..64 {
        write_blocks(&env.vm_disks, 100 + b, 32).unwrap();
    }
    let view = env.view().await.unwrap();
    let r2 = rep.clone();
    let task = tokio::spawn(async move { r2.sync(&view).await });
    while rep
        .status()
        .await
        .unwrap()
        .progress
        .is_none_or(|p| p.bytes_done == 0)
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let t0 = Instant::now();
    rep.stop().await.unwrap();
    assert!(t0.elapsed() < Duration::from_secs(5));
    let e = task.await.unwrap().unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Conflict, "{e}");
    assert!(e.to_string().contains("stopped"), "{e}");
    assert_eq!(kill_rsyncs(env.root()), 0, "rsync survived stop()");
    check_exposed(&env, &[(g1, d1)], "after stop()").await;
}

/// Both ends on loopback over ssh, with the runner for the local end a
/// `LocalRunner`: a reverse makes the remote end run rsync.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reverse_over_ssh_runs_rsync_on_the_other_host() {
    let env = Env::new(Mode::Ssh, &[2 << 10], None);
    let rep = env.rep.clone();
    rep.initial_sync(&env.view().await.unwrap()).await.unwrap();
    rep.reverse().await.unwrap();
    let (src, _) = rep.ends();
    assert_eq!(src.node, NodeId::new("node-b").unwrap());
    assert!(
        src.runner.describe().starts_with("ssh "),
        "{}",
        src.runner.describe()
    );
    let disks = rep.active_disks().await.unwrap().unwrap();
    write_blocks(&disks, 5, 4).unwrap();
    let d = digest_files(&disks).unwrap();
    let g = rep.sync(&env.view_of(&disks)).await.unwrap();
    let p = rep.promote(g.generation).await.unwrap();
    assert_eq!(digest_files(&p.disks).unwrap(), d);
    let _ = LocalRunner;
}
