//! On a filesystem with reflinks (XFS on a loop device here), the slot a
//! cycle writes starts as a clone of the newest generation, so rsync
//! catches up one generation instead of two; on ext4 it catches up two.
//! Needs root, loop devices and `mkfs.xfs` (Debian's xfsprogs).

mod common;

use std::path::{Path, PathBuf};

use common::{digest_files, write_blocks, Env, Mode};
use wspare_core::Replicator;

/// A loop-mounted XFS filesystem; unmounted on drop.
struct Xfs {
    dir: PathBuf,
}

impl Xfs {
    fn new(root: &Path) -> Xfs {
        let img = root.join("xfs.img");
        let dir = root.join("xfs");
        std::fs::create_dir(&dir).unwrap();
        std::fs::File::create(&img)
            .unwrap()
            .set_len(512 << 20)
            .unwrap();
        let mkfs = std::process::Command::new("mkfs.xfs")
            .arg("-q")
            .arg(&img)
            .status();
        assert!(
            mkfs.as_ref().is_ok_and(|s| s.success()),
            "mkfs.xfs failed ({mkfs:?}): install xfsprogs (`apt-get install xfsprogs`, in .ci/install-deps)"
        );
        let mount = std::process::Command::new("mount")
            .args(["-o", "loop"])
            .arg(&img)
            .arg(&dir)
            .status()
            .unwrap();
        assert!(
            mount.success(),
            "mounting {} on a loop device failed (needs root)",
            img.display()
        );
        Xfs { dir }
    }
}

impl Drop for Xfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.dir).status();
    }
}

/// Runs an initial sync and three cycles of `blocks` rewritten blocks per
/// disk; returns the literal bytes of the last cycle, after checking that
/// both held generations hold their source content.
async fn literal_of_third_cycle(env: &Env, blocks: usize) -> u64 {
    let rep = &env.rep;
    rep.initial_sync(&env.view().await.unwrap()).await.unwrap();
    let mut digests = Vec::new();
    for seed in 1..=3 {
        write_blocks(&env.vm_disks, seed, blocks).unwrap();
        let d = digest_files(&env.vm_disks).unwrap();
        let g = rep.sync(&env.view().await.unwrap()).await.unwrap();
        digests.push((g.generation, d));
    }
    for (g, d) in &digests[1..] {
        let p = rep.promote(*g).await.unwrap();
        assert_eq!(
            &digest_files(&p.disks).unwrap(),
            d,
            "{g} does not hold its source content"
        );
    }
    rep.last_cycle().unwrap().literal
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflink_clones_make_the_slot_one_generation_behind() {
    let blocks = 64;
    let disks = [16 << 10, 4 << 10];
    let holder = tempfile::Builder::new()
        .prefix("wspare-rsync-xfs-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let xfs = Xfs::new(holder.path());
    let on_xfs = Env::new(Mode::Local, &disks, Some(xfs.dir.join("b")));
    let cloned = literal_of_third_cycle(&on_xfs, blocks).await;
    let on_ext4 = Env::new(Mode::Local, &disks, None);
    let two_behind = literal_of_third_cycle(&on_ext4, blocks).await;
    // At most `blocks` distinct 4 KiB blocks per disk changed since the
    // newest generation, two cycles' worth since the one before it.
    let one_cycle = (blocks * disks.len() * 4096) as u64;
    println!("literal bytes of the third cycle: {cloned} with reflinks, {two_behind} without; one cycle changes at most {one_cycle}");
    assert!(
        cloned <= one_cycle,
        "with reflinks the slot caught up more than one cycle: {cloned} > {one_cycle}"
    );
    assert!(
        two_behind > one_cycle,
        "without reflinks the slot should be two cycles behind: {two_behind}"
    );
    drop(on_xfs);
    drop(xfs);
}
