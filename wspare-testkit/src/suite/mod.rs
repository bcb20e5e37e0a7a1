//! The conformance suite: every contract invariant of the core traits
//! (`H1`..`H11` of [`wspare_core::hypervisor`], `R1`..`R10` of
//! [`wspare_core::replicator`], `F1`..`F8` of [`wspare_core::fencer`]) as a
//! named case.
//!
//! A backend author writes one test file: a fixture that builds a fresh
//! environment (backend instance plus whatever it needs: disk images, a
//! test VM, a BMC), and one call:
//!
//! ```ignore
//! #[tokio::test]
//! async fn conformance() {
//!     wspare_testkit::suite::hypervisor::run(&MyFixture::new()).await.assert_passed();
//! }
//! ```
//!
//! Each case gets a fresh environment from the fixture and drops it when done
//! (the environment's `Drop` is the cleanup guard). Cases are gated by the
//! backend's capabilities and the fixture's declared traits; a case that
//! cannot apply is reported as skipped with its reason, never left out. A
//! failing case names the invariant and what the backend answered.

pub mod fencer;
pub mod hypervisor;
pub mod replicator;

mod report;

pub use report::{CaseOutcome, CaseResult, Report};
