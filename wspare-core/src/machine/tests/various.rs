//! Seeding, periodic work, degraded, maintenance, test failover, and odd inputs.

use super::*;

#[test]
fn seeding_on_the_active_runs_the_initial_sync_then_cycles() {
    let mut h = H::new(cfg(
        "a",
        Policy {
            sync_interval: Duration::from_secs(30),
            ..policy()
        },
    ));
    assert_eq!(h.phase(), PhaseName::Seeding);
    assert_eq!(h.take(), ["observe VM on a", "initial sync a -> b"]);
    h.answer("observe VM on a", observed("a", VmState::Running));
    h.answer("initial sync a -> b", generation(1));
    assert_eq!(
        h.transitions().last().unwrap(),
        "seeding -> protected: complete generation g1 on b"
    );
    h.beats(30, Some(view_b(1)));
    assert_eq!(h.take(), ["sync a -> b"]);
    h.answer("sync a -> b", generation(2));
    h.beats(30, Some(view_b(2)));
    assert_eq!(h.take(), ["sync a -> b"]);
    assert_eq!(h.m.status().newest.unwrap().generation, Generation(2));
}

#[test]
fn seeding_failure_is_retried() {
    let mut h = H::new(cfg("a", policy()));
    h.take();
    h.answer(
        "initial sync a -> b",
        Outcome::failed(ErrorKind::Unreachable, "ssh: connect refused"),
    );
    assert_eq!(h.phase(), PhaseName::Seeding);
    h.beats(
        5,
        Some(PeerView {
            newest: None,
            newest_age: None,
            ..view_b(0)
        }),
    );
    assert_eq!(h.take(), ["initial sync a -> b"]);
}

#[test]
fn a_stopped_vm_at_pair_creation_is_started_with_proof_the_spare_is_off() {
    let mut h = H::new(cfg("a", policy()));
    h.take();
    h.answer("observe VM on a", observed("a", VmState::ShutOff));
    assert_eq!(h.take(), ["observe VM on b"]);
    h.answer("observe VM on b", observed("b", VmState::Missing));
    assert_eq!(h.take(), ["start VM on a in place"]);
}

#[test]
fn failing_syncs_degrade_and_recovery_protects_again() {
    let mut h = active_protected(Policy {
        sync_interval: Duration::from_secs(10),
        ..policy()
    });
    h.beats(6, Some(view_b(5)));
    h.answer(
        "sync a -> b",
        Outcome::failed(ErrorKind::Backend, "rsync: No space left on device"),
    );
    assert_eq!(
        h.transitions().last().unwrap(),
        "protected -> degraded: replication to b failing: rsync: No space left on device"
    );
    h.beats(5, Some(view_b(5)));
    assert_eq!(h.take(), ["sync a -> b"], "retried after the retry backoff");
    h.answer("sync a -> b", generation(6));
    assert_eq!(
        h.transitions().last().unwrap(),
        "degraded -> protected: complete generation g6 on b"
    );
}

#[test]
fn an_old_replica_degrades_when_it_passes_the_bound() {
    let mut h = spare_protected(Policy {
        data_loss_bound: Duration::from_secs(60),
        ..policy()
    });
    // Heartbeats keep coming, but no new generation: at 60 s of age, degraded.
    let silent = PeerView {
        newest: None,
        newest_age: None,
        ..view_a(5)
    };
    h.beats(50, Some(silent.clone()));
    assert_eq!(h.phase(), PhaseName::Protected);
    h.beats(15, Some(silent));
    assert_eq!(h.phase(), PhaseName::Degraded);
    assert_eq!(
        h.transitions().last().unwrap(),
        "protected -> degraded: newest generation g5 is older than the data-loss bound (1m)"
    );
    h.beats(
        1,
        Some(PeerView {
            newest: Some(g(6)),
            ..view_a(6)
        }),
    );
    assert_eq!(h.phase(), PhaseName::Protected);
}

#[test]
fn maintenance_observes_and_never_acts() {
    let mut h = spare_protected(policy());
    h.command(Command::Maintenance(true));
    assert_eq!(
        h.last_event(),
        "maintenance on: observing only, no automatic action"
    );
    h.advance(Duration::from_secs(3600));
    assert!(
        h.take()
            .iter()
            .all(|o| o.starts_with("observe") || o == "query replica"),
        "{:?}",
        h.ops()
    );
    assert_eq!(h.phase(), PhaseName::Protected);
    assert!(h
        .events
        .iter()
        .any(|e| e.cause.contains("maintenance is on, not acting")));
    h.command(Command::TestFailover { generation: None });
    assert_eq!(
        h.last_event(),
        "test-failover is refused in maintenance; turn maintenance off first"
    );
    h.command(Command::Maintenance(false));
    assert_eq!(h.phase(), PhaseName::Suspect);
    // The routine observation of b from the maintenance hour is still in flight.
    assert_eq!(h.take(), ["observe VM on a"]);
}

#[test]
fn maintenance_holds_actions_of_a_failover_in_progress() {
    let mut h = spare_protected(policy());
    h.advance(Duration::from_secs(10));
    h.answer("observe VM on a", unreachable());
    h.command(Command::Maintenance(true));
    h.answer("query replica", report("a", "b", 5, 8));
    assert!(h.take().is_empty(), "the fence is held");
    assert_eq!(h.pending(), ["fence a"]);
    assert_eq!(h.last_event(), "holding fence a until maintenance ends");
    h.command(Command::Maintenance(false));
    assert_eq!(h.take(), ["fence a", "observe VM on b"]);
}

#[test]
fn maintenance_suppresses_restarts_in_place() {
    let mut h = active_protected(policy());
    h.command(Command::Maintenance(true));
    h.input(Input::VmObserved {
        node: n("a"),
        state: VmState::ShutOff,
    });
    assert!(h.take().is_empty());
    h.command(Command::Maintenance(false));
    assert_eq!(h.take(), ["observe VM on a"]);
    h.answer("observe VM on a", observed("a", VmState::ShutOff));
    assert_eq!(h.take(), ["observe VM on b"]);
}

#[test]
fn test_failover_runs_a_clone_and_leaves_production_alone() {
    let mut h = spare_protected(policy());
    h.command(Command::TestFailover { generation: None });
    assert_eq!(h.take(), ["start test clone test-5 of g5 on b"]);
    h.answer("start test clone test-5 of g5 on b", done());
    assert_eq!(h.m.status().test_clone, Some(Generation(5)));
    assert_eq!(h.phase(), PhaseName::Protected);
    h.beats(10, Some(view_a(6)));
    assert!(h.take().is_empty(), "no production action");
    h.command(Command::TestFailover { generation: None });
    assert_eq!(
        h.last_event(),
        "test failover test-5 of g5 is already running; end it first"
    );
    h.command(Command::EndTest);
    assert_eq!(h.take(), ["destroy test clone test-5 on b"]);
    h.answer("destroy test clone test-5 on b", done());
    assert_eq!(h.m.status().test_clone, None);
    assert_eq!(
        h.last_event(),
        "test clone test-5 destroyed; test failover ended"
    );
}

#[test]
fn test_failover_of_a_chosen_generation_and_refusals() {
    let mut h = spare_protected(policy());
    h.command(Command::TestFailover {
        generation: Some(Generation(9)),
    });
    assert_eq!(
        h.last_event(),
        "g9 is newer than the newest complete generation, g5"
    );
    h.command(Command::TestFailover {
        generation: Some(Generation(3)),
    });
    assert_eq!(h.take(), ["start test clone test-3 of g3 on b"]);
    let mut a = active_protected(policy());
    a.command(Command::TestFailover { generation: None });
    assert_eq!(a.last_event(), "test failover runs on the spare; ask b");
    a.command(Command::EndTest);
    assert_eq!(a.last_event(), "no test failover is running");
}

#[test]
fn a_real_failover_during_a_test_destroys_the_clone_first() {
    let mut h = spare_protected(policy());
    h.command(Command::TestFailover { generation: None });
    h.answer("start test clone test-5 of g5 on b", done());
    h.advance(Duration::from_secs(10));
    h.answer("observe VM on a", unreachable());
    h.answer("query replica", report("a", "b", 5, 8));
    h.answer("fence a", Outcome::Ok(Answer::Fenced(power_receipt("a"))));
    h.answer("observe VM on a", unreachable());
    assert_eq!(
        h.take(),
        ["destroy test clone test-5 on b", "promote g5 on b"]
    );
}

#[test]
fn a_running_copy_on_the_spare_is_split_brain() {
    let mut h = spare_protected(policy());
    h.input(Input::VmObserved {
        node: n("b"),
        state: VmState::Running,
    });
    assert!(matches!(h.blocked_on(), Some(BlockedOn::SplitBrain)));
    assert_eq!(
        h.last_event(),
        "the VM is running on b, which is the spare (a is active, epoch e0): two copies may run; stand-down on the node whose copy should lose (it is destroyed and resynced), or stop one copy and resume"
    );
}

#[test]
fn conflicting_claims_at_one_epoch_are_split_brain() {
    let mut h = spare_protected(policy());
    h.input(Input::Heartbeat {
        from: n("a"),
        view: Some(PeerView {
            active: n("b"),
            ..view_a(5)
        }),
    });
    assert_eq!(h.phase(), PhaseName::Blocked);
}

#[test]
fn strangers_and_stray_answers_are_ignored() {
    let mut h = spare_protected(policy());
    h.input(Input::Heartbeat {
        from: n("zz"),
        view: Some(view_a(9)),
    });
    assert_eq!(h.m.status().newest.unwrap().generation, Generation(5));
    h.input(Input::ActionDone {
        id: ActionId(999),
        outcome: done(),
    });
    assert_eq!(h.last_event(), "answer for unknown action #999 ignored");
    h.input(Input::Heartbeat {
        from: n("a"),
        view: Some(PeerView {
            active: n("zz"),
            ..view_a(5)
        }),
    });
    assert!(h.last_event().contains("which is not in the pair"));
    assert_eq!(h.phase(), PhaseName::Protected);
}

#[test]
fn a_replica_report_never_moves_the_generation_backwards() {
    let mut h = spare_protected(policy());
    h.input(Input::Replica(ReplicaReport {
        source: n("a"),
        target: n("b"),
        newest: Some(g(3)),
        age: None,
    }));
    assert_eq!(h.m.status().newest.unwrap().generation, Generation(5));
    assert!(h.last_event().contains("older than g5 known"));
}

#[test]
fn resume_when_not_blocked_is_rejected() {
    let mut h = spare_protected(policy());
    h.command(Command::Resume {
        accept_data_loss: false,
    });
    assert_eq!(h.events.last().unwrap().kind, EventKind::Rejected);
    assert_eq!(
        h.last_event(),
        "the pair is protected, not blocked; nothing to resume"
    );
}

#[test]
fn status_and_view_report_the_pair() {
    let h = spare_protected(policy());
    let s = h.m.status();
    assert_eq!(
        (s.phase, s.active.as_str(), s.epoch, s.peer_suspected),
        (PhaseName::Protected, "a", Epoch(0), false)
    );
    assert!(s.newest_age.unwrap() >= Duration::from_secs(1));
    let v = h.m.view();
    assert_eq!((v.phase, v.handover), (PhaseName::Protected, None));
}

#[test]
fn poll_timeout_is_the_detector_deadline_when_idle() {
    let h = spare_protected(policy());
    let t = h.m.poll_timeout();
    assert!(
        t > h.t && t < h.t + Duration::from_secs(10),
        "{t:?} vs {:?}",
        h.t
    );
}

#[test]
fn periodic_monitor_and_query_run_on_the_spare() {
    let mut h = spare_protected(Policy {
        monitor_interval: Duration::from_secs(6),
        sync_interval: Duration::from_secs(7),
        ..policy()
    });
    h.beats(10, Some(view_a(5)));
    let ops = h.take();
    assert_eq!(
        ops.iter().filter(|o| *o == "observe VM on b").count(),
        1,
        "{ops:?}"
    );
    assert_eq!(
        ops.iter().filter(|o| *o == "query replica").count(),
        1,
        "{ops:?}"
    );
}
