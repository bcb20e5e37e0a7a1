//! The conformance suite against the sim backends: every case that applies
//! passes, none is skipped (the sims have every capability).

use wspare_testkit::sim::{SimFencerFixture, SimHypervisorFixture, SimReplicatorFixture};
use wspare_testkit::suite::{self, Report};

fn assert_all_passed(report: &Report, cases: &[&str]) {
    report.assert_passed();
    let ran: Vec<&str> = report.cases.iter().map(|c| c.name).collect();
    assert_eq!(ran, cases, "every case ran, in order");
    let skipped: Vec<_> = report.skipped().map(|c| c.name).collect();
    assert!(
        skipped.is_empty(),
        "the sims support every case, but these were skipped: {skipped:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn sim_hypervisor_passes_the_suite() {
    let report = suite::hypervisor::run(&SimHypervisorFixture::new()).await;
    assert_all_passed(&report, suite::hypervisor::CASES);
}

#[tokio::test(start_paused = true)]
async fn sim_replicator_passes_the_suite() {
    let report = suite::replicator::run(&SimReplicatorFixture::new()).await;
    assert_all_passed(&report, suite::replicator::CASES);
}

#[tokio::test(start_paused = true)]
async fn sim_fencer_passes_the_suite() {
    let report = suite::fencer::run(&SimFencerFixture::new()).await;
    assert_all_passed(&report, suite::fencer::CASES);
}
