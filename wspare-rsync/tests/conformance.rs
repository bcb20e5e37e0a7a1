//! The replicator conformance suite against the real rsync: between two
//! local directories, and over ssh to loopback.

mod common;

use common::{Fixture, Mode};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_local_directories() {
    wspare_testkit::suite::replicator::run(&Fixture::new(Mode::Local))
        .await
        .assert_passed();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_ssh_loopback() {
    wspare_testkit::suite::replicator::run(&Fixture::new(Mode::Ssh))
        .await
        .assert_passed();
}
