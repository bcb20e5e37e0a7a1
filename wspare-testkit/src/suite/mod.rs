//! The conformance suite: every contract invariant of the core traits
//! (`H1`..`H11` of [`wspare_core::hypervisor`], `R1`..`R10` of
//! [`wspare_core::replicator`], `F1`..`F8` of [`wspare_core::fencer`]) as a
//! named case.
//!
//! A backend author writes one test file: a fixture that builds a fresh
//! environment (backend instance plus whatever it needs: disk images, a
//! test VM, a BMC), and one call:
//!
//! ```no_run
//! # use wspare_testkit::sim::SimHypervisorFixture as MyFixture;
//! #[tokio::test]
//! async fn conformance() {
//!     wspare_testkit::suite::hypervisor::run(&MyFixture::new()).await.assert_passed();
//! }
//! ```
//!
//! (The crate docs have a complete, compiled example.)
//!
//! Each case gets a fresh environment from the fixture and drops it when done
//! (the environment's `Drop` is the cleanup guard). Cases are gated by the
//! backend's capabilities and the fixture's declared traits; a case that
//! cannot apply is reported as skipped with its reason, never left out. A
//! failing case names the invariant and what the backend answered.
//!
//! Every case runs under a timeout ([`Options::case_timeout`]): a backend
//! call that hangs fails that case, with the step it hung in, and the run
//! goes on with the next case. A panic in a case (in the backend or the
//! fixture) fails that case too. All waiting is on tokio's clock, so a
//! backend that takes its time from tokio runs the suite instantly under
//! `#[tokio::test(start_paused = true)]`.

use std::time::Duration;

pub mod fencer;
pub mod hypervisor;
pub mod replicator;

mod report;
pub(crate) mod runner;

pub use report::{CaseOutcome, CaseResult, Report};

/// How a suite runs. [`Options::default`] is what the `run` functions use.
#[derive(Clone, Debug)]
pub struct Options {
    /// Time one case may take, environment build included, before it fails
    /// as hanging. Default 120 s.
    pub case_timeout: Duration,
    /// Run only the cases whose id (`"H4"`) or full name is listed; empty
    /// runs every case.
    pub only: Vec<String>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            case_timeout: Duration::from_secs(120),
            only: Vec::new(),
        }
    }
}

impl Options {
    /// Whether case `name` ("H4 idempotent start") is selected.
    pub fn selects(&self, name: &str) -> bool {
        let id = name.split_whitespace().next().unwrap_or(name);
        self.only.is_empty() || self.only.iter().any(|o| o == id || o == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selection_by_id_or_name() {
        let all = Options::default();
        assert!(all.selects("H4 idempotent start"));
        let some = Options {
            only: vec!["H4".into(), "R3 complete or nothing".into()],
            ..Options::default()
        };
        assert!(some.selects("H4 idempotent start"));
        assert!(some.selects("R3 complete or nothing"));
        assert!(!some.selects("H41 imaginary"));
        assert!(!some.selects("R3x"));
        assert!(!some.selects("F1 receipt means off"));
    }
}
