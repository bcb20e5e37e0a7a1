//! One wspare-rsync cycle against a bare `rsync --inplace --no-whole-file`
//! of the same image and against `cat` of it (the read floor), side by side
//! in one run.
//!
//! An image of `WSPARE_BENCH_MIB` MiB (default 1024) of random data, in a
//! temp dir on the real disk (`WSPARE_BENCH_DIR`, default `/var/tmp`).
//! Both copies are first brought to a steady state: the bare copy holds the
//! previous content of the image, the replica's two slots hold the two
//! previous generations (so the slot a cycle writes is two generations
//! behind, as it always is). Then, for each of `WSPARE_BENCH_ROUNDS`
//! rounds (default 5): 1 % of the image's 4 KiB blocks are rewritten at
//! random, every file is read into the page cache and dirty pages are
//! flushed, and the three are timed. Ratios are per round; the last line
//! is the median round's: `wspare/rsync=R wspare/cat=C bytes-sent=B`, B
//! being what wspare's rsync sent.
//!
//! `WSPARE_BENCH_BLOCK` sets wspare's `--block-size` (default: rsync's own
//! choice, as the bare rsync has).

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use wspare_core::runner::LocalRunner;
use wspare_core::{DiskBus, DiskFormat, DiskSpec, NodeId, Replicator, SourceView, UnixMillis};
use wspare_rsync::{BlockSize, Endpoint, Options, Reach, RsyncReplicator};

fn env_u64(k: &str, default: u64) -> u64 {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn run(cmd: &mut std::process::Command) -> String {
    let out = cmd.output().expect("spawn");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Reads `paths` into the page cache and flushes dirty pages, so that every
/// measurement starts from the same state.
fn settle(paths: &[&Path]) {
    for p in paths {
        let mut f = std::fs::File::open(p).unwrap();
        let mut buf = vec![0u8; 1 << 20];
        while f.read(&mut buf).unwrap() > 0 {}
    }
    run(&mut std::process::Command::new("sync"));
}

/// Rewrites `frac` of the 4 KiB blocks of `path` with random data.
fn rewrite(path: &Path, frac: f64, rng: &mut ChaCha8Rng) -> usize {
    let mut f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    let blocks = f.metadata().unwrap().len() / 4096;
    let n = (blocks as f64 * frac) as usize;
    let picks = rand::seq::index::sample(rng, blocks as usize, n);
    let mut buf = [0u8; 4096];
    for b in picks.iter() {
        rng.fill_bytes(&mut buf);
        f.seek(SeekFrom::Start(b as u64 * 4096)).unwrap();
        f.write_all(&buf).unwrap();
    }
    f.sync_all().unwrap();
    n
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

fn stat_sent(stats: &str) -> u64 {
    stats
        .lines()
        .find_map(|l| l.strip_prefix("Total bytes sent: "))
        .map(|v| v.trim().replace(',', "").parse().unwrap())
        .unwrap_or(0)
}

/// User + system CPU seconds of this process's waited-for children (and
/// theirs), from `/proc/self/stat`.
fn children_cpu() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    // Fields 16 and 17 of proc(5) (cutime, cstime) are 13 and 14 after the state.
    let ticks: u64 = f[13].parse::<u64>().unwrap() + f[14].parse::<u64>().unwrap();
    ticks as f64 / 100.0
}

/// Wall and CPU seconds of one measured run, and what it sent.
#[derive(Clone, Copy, Default)]
struct M {
    wall: f64,
    cpu: f64,
    sent: u64,
}

struct Round {
    cat: M,
    bare: M,
    /// `sync FILE` right after the bare rsync: what making its copy durable
    /// costs (wspare's rsync runs with `--fsync`).
    bare_fsync: f64,
    bare_same: Option<M>,
    wspare: M,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    // `cargo bench` passes `--bench`; nothing else is taken.
    let mib = env_u64("WSPARE_BENCH_MIB", 1024);
    let rounds = env_u64("WSPARE_BENCH_ROUNDS", 5).max(1) as usize;
    let base = std::env::var("WSPARE_BENCH_DIR").unwrap_or_else(|_| "/var/tmp".into());
    let block = match std::env::var("WSPARE_BENCH_BLOCK").as_deref() {
        Ok("rsync") => BlockSize::Rsync,
        Ok(n) => BlockSize::Fixed(n.parse().expect("WSPARE_BENCH_BLOCK: a number or `rsync`")),
        Err(_) => BlockSize::Auto,
    };
    let tmp = tempfile::Builder::new()
        .prefix("wspare-bench-")
        .tempdir_in(&base)
        .unwrap();
    let root = tmp.path();
    let mut rng = ChaCha8Rng::seed_from_u64(env_u64("WSPARE_SEED", 42));
    println!("vs_rsync: {mib} MiB image in {}, 1 % of its 4 KiB blocks rewritten per round, {rounds} rounds", root.display());

    let image = root.join("vm").join("vda.img");
    std::fs::create_dir_all(image.parent().unwrap()).unwrap();
    {
        let mut f = std::fs::File::create(&image).unwrap();
        let mut buf = vec![0u8; 1 << 20];
        for _ in 0..mib {
            rng.fill_bytes(&mut buf);
            f.write_all(&buf).unwrap();
        }
        f.sync_all().unwrap();
    }
    let bare = root.join("bare").join("vda.raw");
    let bare_same = root.join("bare").join("vda-same-block.raw");
    std::fs::create_dir_all(bare.parent().unwrap()).unwrap();
    // wspare's block size for this image, for the equal-options row.
    let same_block = block.for_size(mib << 20);

    let ep = |n: &str, d: PathBuf| {
        Endpoint::new(
            NodeId::new(n).unwrap(),
            Arc::new(LocalRunner),
            Reach::Local,
            d,
        )
    };
    let opts = Options {
        block_size: block,
        ..Options::default()
    };
    let rep = RsyncReplicator::new(
        "bench",
        ep("node-a", root.join("a")),
        ep("node-b", root.join("b")),
        opts,
    )
    .unwrap();
    let view = || SourceView::Stopped {
        disks: vec![DiskSpec {
            target: "vda".into(),
            path: image.clone(),
            format: DiskFormat::Raw,
            bus: DiskBus::Virtio,
            read_only: false,
        }],
        at: UnixMillis::now(),
    };

    // Steady state: two generations in the slots, the bare copy one behind.
    let t = Instant::now();
    rep.initial_sync(&view()).await.unwrap();
    for _ in 0..2 {
        rewrite(&image, 0.01, &mut rng);
        rep.sync(&view()).await.unwrap();
    }
    run(std::process::Command::new("cp")
        .arg("--sparse=always")
        .arg(&image)
        .arg(&bare));
    run(std::process::Command::new("cp")
        .arg("--sparse=always")
        .arg(&image)
        .arg(&bare_same));
    println!(
        "setup (initial copy, two cycles, bare copy): {:.1} s",
        secs(t.elapsed())
    );

    let slots: Vec<PathBuf> = (0..2)
        .map(|s| root.join("b").join(format!("slot-{s}")).join("vda.raw"))
        .collect();
    let mut results = Vec::new();
    for round in 0..rounds {
        let n = rewrite(&image, 0.01, &mut rng);
        let mut r = Round {
            cat: M::default(),
            bare: M::default(),
            bare_fsync: 0.0,
            bare_same: None,
            wspare: M::default(),
        };
        // Rotate the order so that none always runs first.
        let mut order = vec!["cat", "bare", "wspare"];
        if same_block.is_some() {
            order.push("same");
        }
        let k = round % order.len();
        order.rotate_left(k);
        for what in order {
            settle(&[&image, &bare, &bare_same, &slots[0], &slots[1]]);
            let (t, c) = (Instant::now(), children_cpu());
            let sent = match what {
                "cat" => {
                    run(std::process::Command::new("cat")
                        .arg(&image)
                        .stdout(std::process::Stdio::null()));
                    0
                }
                "bare" | "same" => {
                    let mut cmd = std::process::Command::new("rsync");
                    cmd.args(["--inplace", "--no-whole-file", "--ignore-times", "--stats"])
                        .env("LC_ALL", "C");
                    if what == "same" {
                        cmd.arg(format!("--block-size={}", same_block.unwrap()))
                            .arg(&image)
                            .arg(&bare_same);
                    } else {
                        cmd.arg(&image).arg(&bare);
                    }
                    stat_sent(&run(&mut cmd))
                }
                _ => {
                    rep.sync(&view()).await.unwrap();
                    rep.last_cycle().unwrap().bytes_sent
                }
            };
            let m = M {
                wall: secs(t.elapsed()),
                cpu: children_cpu() - c,
                sent,
            };
            if what == "bare" {
                let t = Instant::now();
                run(std::process::Command::new("sync").arg("--").arg(&bare));
                r.bare_fsync = secs(t.elapsed());
            }
            match what {
                "cat" => r.cat = m,
                "bare" => r.bare = m,
                "same" => r.bare_same = Some(m),
                _ => r.wspare = m,
            }
        }
        let same = r.bare_same.map_or(String::new(), |m| {
            format!(
                " | rsync -B{} {:.2} s ({:.2} cpu), sent {}",
                same_block.unwrap(),
                m.wall,
                m.cpu,
                m.sent
            )
        });
        println!(
            "round {round}: {n} blocks | cat {:.3} s | rsync {:.2} s ({:.2} cpu; then fsync {:.2} s), sent {}{same} | wspare {:.2} s ({:.2} cpu), sent {} | wspare/rsync {:.3} (cpu {:.3})",
            r.cat.wall, r.bare.wall, r.bare.cpu, r.bare_fsync, r.bare.sent, r.wspare.wall, r.wspare.cpu, r.wspare.sent,
            r.wspare.wall / r.bare.wall, r.wspare.cpu / r.bare.cpu,
        );
        results.push(r);
    }
    let med = |f: &dyn Fn(&Round) -> f64| median(results.iter().map(f).collect());
    let r_wall = med(&|r| r.wspare.wall / r.bare.wall);
    let r_cpu = med(&|r| r.wspare.cpu / r.bare.cpu);
    let c_wall = med(&|r| r.wspare.wall / r.cat.wall);
    let sent = median(results.iter().map(|r| r.wspare.sent as f64).collect()) as u64;
    let r_durable = med(&|r| r.wspare.wall / (r.bare.wall + r.bare_fsync));
    println!(
        "median over {rounds} rounds: wspare/rsync {r_wall:.3} wall, {r_cpu:.3} cpu; \
         wspare/(rsync + fsync of its copy) {r_durable:.3}; wspare/cat {c_wall:.2}"
    );
    if let Some(b) = same_block {
        let s_wall = med(&|r| r.wspare.wall / r.bare_same.unwrap().wall);
        let s_cpu = med(&|r| r.wspare.cpu / r.bare_same.unwrap().cpu);
        println!(
            "equal options (bare rsync also at --block-size={b}): wspare/rsync {s_wall:.3} wall, {s_cpu:.3} cpu \
             (the scheme's own cost: a slot two generations behind \
             unless the filesystem clones, the fsync, the manifest switches)"
        );
    }
    // Clean up before the last line.
    drop(rep);
    tmp.close().unwrap();
    println!("wspare/rsync={r_wall:.3} wspare/cat={c_wall:.2} bytes-sent={sent}");
}
