//! Tests of the swarm simulator. `WSPARE_SEED=<seed>` replays one seed
//! with its trace (in every test that runs seeds); `WSPARE_SEEDS=<n>` runs
//! more seeds than the default.

use std::time::Instant as Wall;

use super::plan::{Act, Plan};
use super::*;
use crate::sim::Fault;

/// The seeds to run: `WSPARE_SEED` alone, or `first..first + n`
/// (`WSPARE_SEEDS` overrides `n`).
fn seeds(first: u64, n: u64) -> Vec<u64> {
    if let Ok(s) = std::env::var("WSPARE_SEED") {
        return vec![s.trim().parse().expect("WSPARE_SEED is a number")];
    }
    let n = std::env::var("WSPARE_SEEDS")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(n);
    (first..first + n).collect()
}

/// Runs the seeds; on a failure, panics with the failure, the replay
/// command and the tail of the seed's trace.
fn run_clean(cfg: &SwarmConfig, seeds: &[u64]) -> Summary {
    let replaying = std::env::var("WSPARE_SEED").is_ok();
    let t0 = Wall::now();
    let mut summary = Summary::default();
    for &seed in seeds {
        let r = run_seed(seed, cfg, replaying).unwrap();
        if replaying {
            for l in r.trace.lines() {
                println!("{l}");
            }
        }
        summary.add(&r);
        if let Some(text) = r.explain(cfg) {
            let t = run_seed(seed, cfg, true).unwrap();
            let lines = t.trace.lines();
            let tail = &lines[lines.len().saturating_sub(150)..];
            panic!(
                "{text}\ntrace (last {} lines):\n{}",
                tail.len(),
                tail.join("\n")
            );
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    println!(
        "{} ({:.1} seeds/s in this build)",
        summary.line(),
        seeds.len() as f64 / secs
    );
    summary
}

#[test]
fn two_nodes_four_pairs_keep_every_invariant_and_recover() {
    let s = run_clean(&SwarmConfig::default(), &seeds(0, 40));
    assert!(
        s.seeds == 1 || s.failovers > 0,
        "faults this strong fail over: {}",
        s.line()
    );
}

#[test]
fn two_nodes_four_pairs_more_seeds() {
    run_clean(&SwarmConfig::default(), &seeds(1000, 40));
}

#[test]
fn three_nodes_six_pairs_keep_every_invariant_and_recover() {
    let cfg = SwarmConfig {
        nodes: 3,
        pairs: 6,
        ..SwarmConfig::default()
    };
    run_clean(&cfg, &seeds(0, 25));
}

#[test]
fn a_quiet_cluster_is_protected_and_fails_nothing_over() {
    let cfg = SwarmConfig {
        faults: false,
        safety: Duration::from_secs(120),
        ..SwarmConfig::default()
    };
    let r = run_seed(1, &cfg, true).unwrap();
    assert!(r.failure.is_none(), "{}", r.trace.lines().join("\n"));
    assert_eq!(r.metrics.failovers, 0);
    // Protected at the first check of the liveness phase.
    assert_eq!(
        r.metrics.liveness_at,
        Some(Instant::ZERO + Duration::from_secs(120))
    );
}

#[test]
fn one_seed_replays_identically_with_or_without_its_trace() {
    let cfg = SwarmConfig::default();
    let d = check_determinism(7, &cfg).unwrap();
    assert!(d.same(), "{d:?}");
    assert!(d.lines > 1000, "a real run: {} trace lines", d.lines);
    let traced = run_seed(7, &cfg, true).unwrap();
    let plain = run_seed(7, &cfg, false).unwrap();
    assert!(plain.trace.lines().is_empty());
    assert_eq!(traced.steps, plain.steps);
    assert_eq!(traced.world_digest, plain.world_digest);
    assert_eq!(traced.metrics.detect_ms, plain.metrics.detect_ms);
    assert_eq!(traced.metrics.failovers, plain.metrics.failovers);
    // And another seed is another run.
    let other = run_seed(8, &cfg, false).unwrap();
    assert_ne!(other.world_digest, plain.world_digest);
}

#[test]
fn the_story_tells_a_failover_and_a_failback() {
    let s = story().unwrap();
    assert!(s.report.failure.is_none(), "{:?}", s.report.failure);
    let text = s.lines.join("\n");
    for want in [
        "FAULT host node-a loses power",
        "web@node-b protected -> suspect: no heartbeat from active node node-a",
        "suspect -> fencing",
        "fencing -> fence-check: fenced node-a",
        "promoting -> starting: promoted",
        "node-b is active at epoch e1",
        "truth web: the VM runs on node-b",
        "web@node-a recovering -> stale",
        "web@node-b unprotected -> resyncing: node-a is back",
        "operator -> node-b web: Failback: accepted",
        "node-a is active at epoch e2",
        "liveness: every pair is protected",
    ] {
        assert!(text.contains(want), "the story lacks {want:?}:\n{text}");
    }
    assert_eq!(s.report.metrics.failovers, 1);
    assert_eq!(s.report.metrics.false_failovers, 0);
    assert_eq!(s.report.metrics.detect_ms.len(), 1);
}

/// A node whose fence device stays dead: its pairs block on the failed
/// fence, and without an operator nothing resolves them.
fn stuck_plan() -> Plan {
    Plan::script(
        2,
        vec![
            (
                Duration::from_secs(30),
                Act::World {
                    fault: Fault::FenceDeviceDead(sim::node_name(0)),
                    dur: Duration::from_secs(3600),
                },
            ),
            (Duration::from_secs(40), Act::HostCrash(0)),
        ],
    )
}

#[test]
fn the_liveness_check_reports_a_pair_left_blocked() {
    let cfg = SwarmConfig {
        pairs: 1,
        operator: false,
        safety: Duration::from_secs(180),
        liveness: Duration::from_secs(120),
        faults: false,
        ..SwarmConfig::default()
    };
    let r = run(3, &cfg, true, Some(stuck_plan())).unwrap();
    let Some(Failure::Liveness { stuck, .. }) = &r.failure else {
        panic!("expected a liveness failure, got {:?}", r.failure);
    };
    assert_eq!(stuck.len(), 1);
    let text = r.failure.as_ref().unwrap().to_string();
    assert!(
        text.contains("web (VM runs on [node-a]; node-a: protected at e0")
            && text
                .contains("node-b: blocked at e0, node-a active: fencing node-a failed 4 time(s)"),
        "{text}"
    );
    // The same cluster with its operator recovers: it confirms node-a
    // down (it is off) and the spare takes over.
    let cfg = SwarmConfig {
        operator: true,
        ..cfg
    };
    let r = run(3, &cfg, true, Some(stuck_plan())).unwrap();
    assert!(r.failure.is_none(), "{:?}", r.failure);
    assert!(r
        .trace
        .lines()
        .iter()
        .any(|l| l.contains("ConfirmDown") && l.contains(": accepted")));
}

#[test]
fn configs_are_checked_and_failures_say_how_to_replay() {
    let bad = SwarmConfig {
        nodes: 1,
        ..SwarmConfig::default()
    };
    assert_eq!(bad.validate().unwrap_err(), "nodes must be 2 to 5, not 1");
    assert!(run_seed(0, &bad, false).is_err());
    let cfg = SwarmConfig {
        bug: Some("skip-fence".into()),
        ..SwarmConfig::default()
    };
    let replay = cfg.replay(42);
    assert!(replay.contains("WSPARE_SEED=42"), "{replay}");
    assert!(
        replay.contains("--features inject-bugs --bin wspare-sim -- --seed 42 --nodes 2 --pairs 4 --inject-bug skip-fence"),
        "{replay}"
    );
    #[cfg(not(feature = "inject-bugs"))]
    assert!(
        cfg.validate()
            .unwrap_err()
            .contains("build with the `inject-bugs` feature"),
        "{:?}",
        cfg.validate()
    );
    #[cfg(feature = "inject-bugs")]
    {
        cfg.validate().unwrap();
        let wrong = SwarmConfig {
            bug: Some("no-such-bug".into()),
            ..SwarmConfig::default()
        };
        assert!(wrong.validate().unwrap_err().starts_with("unknown bug"));
    }
}

#[test]
fn the_summary_line_has_the_agreed_shape() {
    let mut s = Summary::default();
    assert_eq!(
        s.line(),
        "seeds=0 violations=0 failovers=0 false-failovers=0 p50-detect-ms=- p99-detect-ms=-"
    );
    s.seeds = 3;
    s.failovers = 2;
    s.detect_ms = (1..=100).collect();
    assert_eq!(
        s.line(),
        "seeds=3 violations=0 failovers=2 false-failovers=0 p50-detect-ms=50 p99-detect-ms=99"
    );
}

/// With a deliberate defect, the swarm finds a seed that breaks the
/// invariant the defect is about, and the same seed passes without it.
#[cfg(feature = "inject-bugs")]
fn catches(bug: &str, invariants: &[u8]) {
    let cfg = SwarmConfig {
        bug: Some(bug.into()),
        ..SwarmConfig::default()
    };
    let clean = SwarmConfig::default();
    let limit = 300;
    for (n, seed) in seeds(0, limit).into_iter().enumerate() {
        let r = run_seed(seed, &cfg, false).unwrap();
        let Some(Failure::Safety(v)) = &r.failure else {
            continue;
        };
        if !invariants.contains(&v.invariant) {
            continue;
        }
        let control = run_seed(seed, &clean, false).unwrap();
        assert!(
            control.failure.is_none(),
            "seed {seed} fails without {bug} too: {:?}",
            control.failure
        );
        println!("{bug}: caught by seed {seed} after {} seed(s): {v}", n + 1);
        return;
    }
    panic!("{bug}: not caught in {limit} seeds");
}

#[cfg(feature = "inject-bugs")]
mod injected {
    use super::catches;

    #[test]
    fn skip_fence_is_caught() {
        catches("skip-fence", &[2]);
    }

    #[test]
    fn start_before_promote_is_caught() {
        catches("start-before-promote", &[3]);
    }

    #[test]
    fn ignore_generation_is_caught() {
        catches("ignore-generation", &[5]);
    }

    #[test]
    fn repeat_unknown_action_is_caught() {
        catches("repeat-unknown-action", &[7]);
    }

    #[test]
    fn trust_lying_fencer_is_caught() {
        catches("trust-lying-fencer", &[1]);
    }

    #[test]
    fn start_stale_primary_is_caught() {
        catches("start-stale-primary", &[2, 5]);
    }
}
