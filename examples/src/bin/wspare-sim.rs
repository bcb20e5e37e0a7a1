//! `wspare-sim`: the deterministic swarm simulator.
//!
//! ```text
//! wspare-sim                          the story of one failover, then 100 seeds
//! wspare-sim --seeds 1000             1000 seeds (0..999) of 2 nodes, 4 pairs
//! wspare-sim --seed 42                replay seed 42 with its full trace
//! wspare-sim --seeds 1000 --inject-bug skip-fence    (built with --features inject-bugs)
//! wspare-sim --check-determinism --seed 7
//! ```
//!
//! Built with the Rust toolchain alone:
//! `cargo run --release -p wspare-examples --no-default-features --bin wspare-sim`
//! (the package's default feature `agent` pulls in wspare-libvirt, which
//! needs the libvirt development files).
//!
//! The last line is `seeds=N violations=V failovers=F false-failovers=X
//! p50-detect-ms=… p99-detect-ms=…`; the exit status is 0 iff V is 0.
//! `WSPARE_SEED=S` in the environment replays seed S like `--seed S`.

use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Parser;
use wspare_testkit::swarm::{self, SeedReport, Summary, SwarmConfig};

/// How many trace lines of a failing seed to print in a batch run.
const TAIL: usize = 300;

#[derive(Parser, Debug)]
#[command(
    name = "wspare-sim",
    about = "Deterministic swarm simulation of wspare's failover machines under seeded faults"
)]
struct Args {
    /// Run this many seeds (from --seed, default 0).
    #[arg(long)]
    seeds: Option<u64>,
    /// The first seed; alone, replays this one seed and prints its trace.
    #[arg(long)]
    seed: Option<u64>,
    /// Nodes (2 to 5).
    #[arg(long, default_value_t = 2)]
    nodes: usize,
    /// Pairs (1 to 32), spread over the nodes.
    #[arg(long, default_value_t = 4)]
    pairs: usize,
    /// Switch on a deliberate defect (needs the `inject-bugs` feature):
    /// skip-fence, start-before-promote, ignore-generation,
    /// repeat-unknown-action, trust-lying-fencer, start-stale-primary.
    #[arg(long, value_name = "NAME")]
    inject_bug: Option<String>,
    /// Run each seed twice and compare the hashes of the two traces.
    #[arg(long)]
    check_determinism: bool,
    /// Print the story of one failover (the default without --seed/--seeds).
    #[arg(long)]
    story: bool,
    /// Print the full trace of every seed.
    #[arg(long)]
    trace: bool,
    /// Stop at the first failing seed.
    #[arg(long)]
    fail_fast: bool,
}

fn main() -> ExitCode {
    match run() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("wspare-sim: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run() -> Result<bool> {
    let mut args = Args::parse();
    if let Ok(s) = std::env::var("WSPARE_SEED") {
        let s: u64 = s
            .trim()
            .parse()
            .with_context(|| format!("WSPARE_SEED={s:?} is not a seed"))?;
        args.seed = Some(s);
    }
    let cfg = SwarmConfig {
        nodes: args.nodes,
        pairs: args.pairs,
        bug: args.inject_bug.clone(),
        ..SwarmConfig::default()
    };
    cfg.validate().map_err(anyhow::Error::msg)?;

    let story = args.story || (args.seeds.is_none() && args.seed.is_none());
    if story {
        print_story()?;
    }
    let first = args.seed.unwrap_or(0);
    let (count, verbose) = match (args.seeds, args.seed) {
        (Some(n), _) => (n, args.trace),
        (None, Some(_)) => (1, true),
        (None, None) => (100, false),
    };
    if count == 0 {
        bail!("--seeds must be at least 1");
    }
    if story {
        println!();
        println!(
            "Now the swarm: {count} seeds of {} nodes and {} pairs, each 10 simulated minutes under \
             seeded faults, invariants checked after every step, then faults heal and every pair \
             must be protected again.",
            cfg.nodes, cfg.pairs
        );
    }
    if args.check_determinism {
        return determinism(&cfg, first, count);
    }

    let started = Instant::now();
    let mut summary = Summary::default();
    let mut shown = 0;
    for seed in first..first + count {
        let r = swarm::run_seed(seed, &cfg, verbose).map_err(anyhow::Error::msg)?;
        if verbose {
            for l in r.trace.lines() {
                println!("{l}");
            }
        }
        summary.add(&r);
        if r.failure.is_some() {
            if shown == 0 {
                show_failure(&cfg, &r, verbose)?;
            } else {
                println!(
                    "{}",
                    r.explain(&cfg)
                        .unwrap_or_default()
                        .lines()
                        .next()
                        .unwrap_or("")
                );
            }
            shown += 1;
            if args.fail_fast {
                break;
            }
        }
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "ran {} seeds in {secs:.2} s ({:.0} seeds/s; {} steps checked over {:.1} simulated hours)",
        summary.seeds,
        summary.seeds as f64 / secs.max(1e-9),
        summary.steps,
        summary.sim_time.as_secs_f64() / 3600.0
    );
    if let Some(b) = &cfg.bug {
        let first_bad = summary.failed.first().map(|(s, _)| *s);
        match first_bad {
            Some(s) => println!(
                "injected bug {b}: caught first by seed {s} ({} of {} seeds failed)",
                summary.failed.len(),
                summary.seeds
            ),
            None => println!("injected bug {b}: NOT caught in {} seeds", summary.seeds),
        }
    }
    println!("{}", summary.line());
    Ok(summary.failed.is_empty())
}

fn print_story() -> Result<()> {
    let s = swarm::story().map_err(anyhow::Error::msg)?;
    println!(
        "wspare-sim: one failover, as the machines tell it. Two hosts: the VM `web` runs on node-a \
         and is replicated to node-b every 10 s. At 40 s node-a loses power; at 130 s it is powered \
         on again; at 200 s the operator fails the VM back."
    );
    println!();
    for l in &s.lines {
        println!("{l}");
    }
    if let Some(f) = &s.report.failure {
        bail!("the story itself failed: {f}");
    }
    Ok(())
}

fn show_failure(cfg: &SwarmConfig, r: &SeedReport, printed_trace: bool) -> Result<()> {
    println!("{}", r.explain(cfg).unwrap_or_default());
    if printed_trace {
        return Ok(());
    }
    // Replay with the trace: the run is the same.
    let t = swarm::run_seed(r.seed, cfg, true).map_err(anyhow::Error::msg)?;
    let lines = t.trace.lines();
    let skip = lines.len().saturating_sub(TAIL);
    println!(
        "trace of seed {} (last {} of {} lines; all of it with --seed {}):",
        r.seed,
        lines.len() - skip,
        lines.len(),
        r.seed
    );
    for l in &lines[skip..] {
        println!("  {l}");
    }
    Ok(())
}

fn determinism(cfg: &SwarmConfig, first: u64, count: u64) -> Result<bool> {
    let mut summary = Summary::default();
    let mut same = true;
    for seed in first..first + count {
        let d = swarm::check_determinism(seed, cfg).map_err(anyhow::Error::msg)?;
        println!(
            "determinism: seed {seed}: {} lines, run 1 {} run 2 {}: {}",
            d.lines,
            &d.first[..16],
            &d.second[..16],
            if d.same() { "same" } else { "DIFFERENT" }
        );
        same &= d.same();
        summary.add(&swarm::run_seed(seed, cfg, false).map_err(anyhow::Error::msg)?);
    }
    println!("{}", summary.line());
    Ok(same && summary.failed.is_empty())
}
