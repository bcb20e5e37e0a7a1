//! One failover, told: a scripted run of the swarm with a single pair.

use std::time::Duration;

use super::plan::{Act, Plan};
use super::{run, SeedReport, SwarmConfig};

/// A scripted failover and what the machines said along the way.
#[derive(Clone, Debug)]
pub struct Story {
    /// The readable lines: faults, agents, and the machines' events with
    /// their causes.
    pub lines: Vec<String>,
    /// The run behind it (its trace holds every action too).
    pub report: SeedReport,
}

/// The configuration of the story: two nodes, one pair (`web`, active on
/// `node-a`, spare on `node-b`).
pub fn story_config() -> SwarmConfig {
    SwarmConfig {
        nodes: 2,
        pairs: 1,
        safety: Duration::from_secs(260),
        liveness: Duration::from_secs(300),
        faults: false,
        ..SwarmConfig::default()
    }
}

/// Runs the story: `node-a` loses power at 40 s; `node-b` suspects it,
/// fences it, promotes the newest generation and starts the VM; `node-a`
/// is powered on at 130 s, learns it is stale and is resynced; at 200 s
/// the operator fails the VM back to `node-a` with a planned switchover.
pub fn story() -> Result<Story, String> {
    let cfg = story_config();
    let plan = Plan::script(
        cfg.nodes,
        vec![
            (Duration::from_secs(40), Act::HostCrash(0)),
            (Duration::from_secs(130), Act::PowerOn(0)),
            (Duration::from_secs(200), Act::Failback(0)),
        ],
    );
    let report = run(1, &cfg, true, Some(plan))?;
    let lines = report
        .trace
        .lines()
        .iter()
        .filter(|l| is_story(l))
        .map(|l| tidy(l))
        .collect();
    Ok(Story { lines, report })
}

fn is_story(line: &str) -> bool {
    let body = line.split_once("] ").map_or(line, |(_, b)| b);
    let keep = [
        "FAULT", "agent ", "host ", "event ", "operator", "truth ", "liveness",
    ];
    if !keep.iter().any(|k| body.starts_with(k)) {
        return false;
    }
    // Routine notices that say nothing new.
    !(body.contains("answer for unknown action") || body.contains("late answer"))
}

/// Drops the machine's own timestamp from event lines (the line has one).
fn tidy(line: &str) -> String {
    match line.split_once("] event ") {
        Some((at, ev)) => {
            let ev = ev.split_once(' ').map_or(ev, |(_, rest)| rest);
            format!("{at}] {ev}")
        }
        None => line.to_string(),
    }
}
