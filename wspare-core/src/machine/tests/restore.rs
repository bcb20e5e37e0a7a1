//! Driver crashes: restoring from a snapshot at every step of a failover,
//! and the returned old primary.

use super::*;

/// Restarts `h`'s machine from its snapshot (through JSON, as the journal
/// keeps it) on a new timeline.
fn crash(h: &mut H) {
    let json = serde_json::to_string(&h.m.snapshot()).unwrap();
    let snap: Snapshot = serde_json::from_str(&json).unwrap();
    assert_eq!(snap, h.m.snapshot());
    let cfg = h.m.config().clone();
    h.t = Instant::from_origin(Duration::from_secs(5));
    h.m = Machine::restore(cfg, snap, h.t).unwrap();
    h.queue.clear();
    h.clear_events();
    h.drain();
}

/// Runs B's failover up to (not including) answering the action named
/// `stop_at`.
fn failover_until(stop_at: &str) -> H {
    let mut h = spare_protected(policy());
    h.advance(Duration::from_secs(10));
    let steps: Vec<(&str, Outcome)> = vec![
        ("observe VM on a", unreachable()),
        ("query replica", report("a", "b", 5, 8)),
        ("fence a", Outcome::Ok(Answer::Fenced(power_receipt("a")))),
        ("observe VM on a", unreachable()),
        ("promote g5 on b", Outcome::Ok(Answer::Promoted(g(5)))),
        ("start VM on b from g5", done()),
    ];
    let mut seen_fence = false;
    for (op, outcome) in steps {
        let is_check = op == "observe VM on a" && seen_fence;
        let key = if is_check { "fence-check" } else { op };
        if key == stop_at {
            break;
        }
        seen_fence |= op == "fence a";
        h.answer(op, outcome);
    }
    h.take();
    h
}

#[test]
fn crash_while_fencing_reads_the_power_state_instead_of_fencing_again() {
    let mut h = failover_until("fence a");
    assert_eq!(h.pending(), ["fence a"]);
    crash(&mut h);
    assert_eq!(h.take(), ["read power status of a"]);
    h.answer(
        "read power status of a",
        Outcome::Ok(Answer::Power {
            state: PowerState::Off,
            receipt: Some(power_receipt("a")),
        }),
    );
    assert_eq!(h.take(), ["observe VM on a"]);
    h.answer("observe VM on a", unreachable());
    assert_eq!(h.take(), ["promote g5 on b"]);
}

#[test]
fn crash_while_fencing_a_node_still_on_fences_again_after_observing() {
    let mut h = failover_until("fence a");
    crash(&mut h);
    h.answer(
        "read power status of a",
        Outcome::Ok(Answer::Power {
            state: PowerState::On,
            receipt: None,
        }),
    );
    assert!(h.take().is_empty());
    assert!(h.last_event().contains("reads on"), "{}", h.last_event());
    h.advance(policy().fence_backoff);
    assert_eq!(h.take(), ["fence a"]);
}

#[test]
fn crash_during_the_fence_check_checks_again() {
    let mut h = failover_until("fence-check");
    crash(&mut h);
    assert_eq!(h.take(), ["observe VM on a"]);
    assert_eq!(h.phase(), PhaseName::FenceCheck);
    h.answer("observe VM on a", unreachable());
    assert_eq!(h.take(), ["promote g5 on b"]);
}

#[test]
fn crash_while_promoting_observes_the_replica_then_promotes() {
    let mut h = failover_until("promote g5 on b");
    crash(&mut h);
    assert_eq!(h.take(), ["query replica"]);
    h.answer("query replica", report("a", "b", 5, 30));
    assert_eq!(h.take(), ["promote g5 on b"]);
    h.answer("promote g5 on b", Outcome::Ok(Answer::Promoted(g(5))));
    assert_eq!(h.take(), ["start VM on b from g5"]);
    assert_eq!(h.m.epoch(), Epoch(1));
}

#[test]
fn crash_while_starting_finds_the_vm_running_and_does_not_start_it_twice() {
    let mut h = failover_until("start VM on b from g5");
    assert_eq!(
        h.m.epoch(),
        Epoch(1),
        "the epoch is journaled before the start runs"
    );
    crash(&mut h);
    assert_eq!(h.take(), ["observe VM on b"]);
    h.answer("observe VM on b", observed("b", VmState::Running));
    assert!(h.take().is_empty());
    assert_eq!(h.phase(), PhaseName::Unprotected);
}

#[test]
fn crash_while_starting_starts_after_observing_it_off() {
    let mut h = failover_until("start VM on b from g5");
    crash(&mut h);
    h.answer("observe VM on b", observed("b", VmState::ShutOff));
    assert!(h.take().is_empty());
    h.advance(policy().retry_backoff);
    assert_eq!(h.take(), ["start VM on b from g5"]);
}

#[test]
fn crash_after_the_failover_recovers_as_active() {
    let mut h = failover_until("never");
    assert_eq!(h.phase(), PhaseName::Unprotected);
    crash(&mut h);
    assert_eq!(h.take(), ["observe VM on b"]);
    h.answer("observe VM on b", observed("b", VmState::Running));
    h.advance(policy().peer_wait);
    assert_eq!(h.phase(), PhaseName::Unprotected);
    assert!(h.take().is_empty());
}

#[test]
fn crash_while_suspecting_starts_over_from_recovering() {
    let mut h = failover_until("observe VM on a");
    crash(&mut h);
    assert_eq!(h.phase(), PhaseName::Recovering);
    // The lost observation is asked again, and the local copy is observed.
    assert_eq!(h.take(), ["observe VM on b", "observe VM on a"]);
}

#[test]
fn a_returned_old_primary_is_resynced_and_never_started() {
    // a's machine as it was when a was fenced: active, protected.
    let mut a = active_protected(policy());
    let a_snap = a.m.snapshot();
    // b failed over meanwhile.
    let mut b = failover_until("never");
    assert_eq!(b.phase(), PhaseName::Unprotected);
    // a comes back with its old journal.
    a.m = Machine::restore(a.m.config().clone(), a_snap, a.t).unwrap();
    a.queue.clear();
    a.clear_events();
    a.drain();
    assert_eq!(a.take(), ["observe VM on a"]);
    a.answer("observe VM on a", observed("a", VmState::ShutOff));
    assert!(a.take().is_empty(), "waits for the peer before deciding");
    a.input(Input::Heartbeat {
        from: n("b"),
        view: Some(b.m.view()),
    });
    assert_eq!(a.phase(), PhaseName::Stale);
    assert_eq!(a.m.active(), &n("b"));
    assert!(a.take().iter().all(|o| !o.starts_with("start")));
    // b sees a back and resyncs it in full.
    for _ in 0..3 {
        b.advance(Duration::from_secs(1));
        b.input(Input::Heartbeat {
            from: n("a"),
            view: Some(a.m.view()),
        });
    }
    assert_eq!(b.phase(), PhaseName::Resyncing);
    assert_eq!(
        b.transitions().last().unwrap(),
        "unprotected -> resyncing: a is back; replicating to it"
    );
    assert_eq!(b.take(), ["reverse replication to b -> a"]);
    b.answer("reverse replication to b -> a", done());
    assert_eq!(b.take(), ["initial sync b -> a"]);
    b.answer("initial sync b -> a", generation(6));
    assert_eq!(b.phase(), PhaseName::Protected);
    a.input(Input::Heartbeat {
        from: n("b"),
        view: Some(b.m.view()),
    });
    assert_eq!(a.phase(), PhaseName::Protected);
    // a, now the spare, never asked to start anything.
    a.advance(Duration::from_secs(3600));
    assert!(a.take().iter().all(|o| !o.starts_with("start")));
}

#[test]
fn a_returned_primary_without_peer_contact_blocks() {
    let mut a = active_protected(policy());
    let snap = a.m.snapshot();
    a.m = Machine::restore(a.m.config().clone(), snap, a.t).unwrap();
    a.queue.clear();
    a.drain();
    a.answer("observe VM on a", observed("a", VmState::ShutOff));
    a.advance(policy().peer_wait);
    assert!(matches!(
        a.blocked_on(),
        Some(BlockedOn::NoPeerContact { .. })
    ));
    assert!(a.take().is_empty());
    a.command(Command::ConfirmDown(FenceReceipt::from_operator(
        n("b"),
        UnixMillis(1),
    )));
    assert_eq!(a.take(), ["start VM on a in place"]);
    assert_eq!(a.m.epoch(), Epoch(1));
}

/// A, active, loses its spare B and starts fencing it.
fn active_fencing_its_spare() -> H {
    let mut a = active_protected(policy());
    a.advance(Duration::from_secs(20));
    assert_eq!(a.take(), ["observe VM on b"]);
    a.answer("observe VM on b", unreachable());
    assert_eq!(a.take(), ["fence b"]);
    a
}

#[test]
fn an_active_restarted_while_fencing_its_spare_waits_for_the_peer() {
    // Found by the swarm simulator: A went down (fenced by B) while it was
    // fencing B; B took over; A came back in a partition, resumed fencing
    // B, fenced it and restarted its stale copy in place.
    let mut a = active_fencing_its_spare();
    crash(&mut a);
    assert_eq!(a.phase(), PhaseName::Recovering);
    assert_eq!(a.take(), ["observe VM on a", "read power status of b"]);
    a.answer("observe VM on a", observed("a", VmState::ShutOff));
    a.advance(policy().peer_wait);
    assert!(
        matches!(a.blocked_on(), Some(BlockedOn::NoPeerContact { .. })),
        "{:?}",
        a.m.phase()
    );
    assert!(a.pending().iter().all(|o| !o.starts_with("start")));
    // B's view shows it took over: A's copy is stale.
    a.input(Input::Heartbeat {
        from: n("b"),
        view: Some(PeerView {
            epoch: Epoch(1),
            active: n("b"),
            ..view_b(6)
        }),
    });
    assert_eq!(a.phase(), PhaseName::Stale);
}

#[test]
fn a_spare_fenced_before_a_restart_is_no_proof_after_it() {
    // Found by the swarm simulator: A fenced its lost spare B, then lost
    // power; B came back and took over; A came back while B was down and
    // restarted its stale copy on the old receipt.
    let mut a = active_fencing_its_spare();
    a.answer("fence b", Outcome::Ok(Answer::Fenced(power_receipt("b"))));
    assert_eq!(a.phase(), PhaseName::Unprotected);
    a.take();
    crash(&mut a);
    assert_eq!(a.take(), ["observe VM on a"]);
    a.answer("observe VM on a", observed("a", VmState::ShutOff));
    a.advance(policy().peer_wait);
    assert!(
        matches!(a.blocked_on(), Some(BlockedOn::NoPeerContact { .. })),
        "{:?}",
        a.m.phase()
    );
    assert!(a.take().is_empty(), "nothing is started on the old receipt");
}

/// B, spare, waiting out A's fence delay of 10 s in a partition.
fn spare_in_fence_delay() -> H {
    let mut c = cfg("b", policy());
    c.peer_fence_delay = Duration::from_secs(10);
    let mut h = spare_protected_cfg(c);
    h.advance(Duration::from_secs(10));
    assert_eq!(h.take(), ["observe VM on a"]);
    h.answer("observe VM on a", unreachable());
    h.answer("query replica", report("a", "b", 5, 8));
    assert_eq!(h.phase(), PhaseName::Fencing);
    assert!(h.take().is_empty());
    h
}

#[test]
fn a_spare_restarted_in_the_fence_delay_does_not_fence_a_peer_that_answers() {
    // Found by the end-to-end test: in a partition, A fenced B (its power,
    // agent included) while B waited out A's fence delay. B came back with
    // the fence timer restored and a fresh detector holding no suspicion,
    // so A's heartbeats could not call the fence off: B fenced a healthy A.
    let mut h = spare_in_fence_delay();
    crash(&mut h);
    assert_eq!(h.phase(), PhaseName::Fencing);
    h.beats(3, Some(view_a(5)));
    assert_eq!(h.phase(), PhaseName::Protected, "{:?}", h.transitions());
    h.beats(30, Some(view_a(5)));
    let ops = h.take();
    assert!(
        !ops.iter().any(|o| o.starts_with("fence")),
        "A is never fenced: {ops:?}"
    );
}

#[test]
fn a_spare_restarted_in_the_fence_delay_fences_a_silent_peer() {
    let mut h = spare_in_fence_delay();
    crash(&mut h);
    h.advance(Duration::from_millis(9999));
    assert!(h.take().is_empty());
    h.advance(Duration::from_millis(1));
    assert_eq!(h.take(), ["fence a"]);
}

#[test]
fn an_active_restarted_in_a_switchover_does_not_finish_it_blindly() {
    // Found by the swarm simulator: A's driver died while it shut the VM
    // down for a switchover; B failed A over (fencing it) at epoch 1; A came
    // back, found the VM stopped and ran the final sync to B at epoch 0,
    // over B's newer data.
    let mut a = active_protected(policy());
    a.command(Command::Switchover);
    assert_eq!(a.take(), ["shut down VM on a"]);
    crash(&mut a);
    assert_eq!(a.phase(), PhaseName::Recovering);
    // Its own copy, for the recovery and for the lost shutdown's outcome.
    assert_eq!(a.take(), ["observe VM on a", "observe VM on a"]);
    a.answer("observe VM on a", observed("a", VmState::ShutOff));
    a.answer("observe VM on a", observed("a", VmState::ShutOff));
    assert!(
        a.take().iter().all(|o| !o.starts_with("sync")),
        "no final sync before the peer is heard"
    );
    a.input(Input::Heartbeat {
        from: n("b"),
        view: Some(PeerView {
            epoch: Epoch(1),
            active: n("b"),
            ..view_b(6)
        }),
    });
    assert_eq!(a.phase(), PhaseName::Stale);
    assert!(a.take().iter().all(|o| !o.starts_with("sync")));
}

#[test]
fn restarts_in_a_row_do_not_pile_up_observations() {
    // Found by the fuzzer: each restart re-asked every unanswered
    // observation and added its own, so a driver that kept crashing before
    // any answer grew its pending list (and journal) by one each time.
    let mut a = active_protected(policy());
    for _ in 0..20 {
        crash(&mut a);
    }
    assert_eq!(a.pending(), ["observe VM on a"], "{:?}", a.pending());
}

#[test]
fn restore_rejects_a_snapshot_of_another_pair_or_node() {
    let h = spare_protected(policy());
    let e = Machine::restore(cfg("a", policy()), h.m.snapshot(), h.t).unwrap_err();
    assert!(
        e.to_string()
            .contains("journal snapshot is for pair web on b, not pair web on a"),
        "{e}"
    );
}

#[test]
fn unknown_sync_outcome_observes_the_replica() {
    let mut a = active_protected(Policy {
        sync_interval: Duration::from_secs(10),
        ..policy()
    });
    a.beats(6, Some(view_b(5)));
    assert_eq!(a.take(), ["sync a -> b"]);
    a.answer("sync a -> b", Outcome::Unknown);
    assert_eq!(a.take(), ["query replica"]);
    a.answer("query replica", report("a", "b", 6, 2));
    assert_eq!(a.m.status().newest.unwrap().generation, Generation(6));
    assert_eq!(a.phase(), PhaseName::Protected);
}

#[test]
fn unknown_reverse_is_observed_and_not_repeated_when_done() {
    let mut h = failover_until("never");
    for _ in 0..3 {
        h.advance(Duration::from_secs(1));
        h.input(Input::Heartbeat {
            from: n("a"),
            view: Some(PeerView {
                phase: PhaseName::Stale,
                ..view_a(5)
            }),
        });
    }
    assert_eq!(h.take(), ["reverse replication to b -> a"]);
    h.answer("reverse replication to b -> a", Outcome::Unknown);
    assert_eq!(h.take(), ["query replica"]);
    h.answer("query replica", report("b", "a", 5, 30));
    assert_eq!(
        h.take(),
        ["initial sync b -> a"],
        "already reversed: not reversed twice"
    );
}

#[test]
fn a_spare_restored_mid_failover_proves_a_returned_peer_off_before_starting() {
    // Defect E of the swarm simulator (seed 1624): B fenced A and was
    // promoting when maintenance held the promotion and B lost power; A came
    // back first. B then finished the failover on the receipt from before
    // A's return.
    let mut b = spare_protected(policy());
    b.advance(Duration::from_secs(10));
    b.answer("observe VM on a", unreachable());
    b.answer("query replica", report("a", "b", 5, 8));
    b.answer("fence a", Outcome::Ok(Answer::Fenced(power_receipt("a"))));
    b.answer("observe VM on a", unreachable());
    assert_eq!(b.take(), ["promote g5 on b"]);
    crash(&mut b);
    assert_eq!(b.phase(), PhaseName::Promoting);
    assert_eq!(b.take(), ["query replica"]);
    // A is back and heartbeating, still at epoch 0.
    b.beats(3, Some(view_a(5)));
    b.answer("query replica", report("a", "b", 5, 30));
    assert_eq!(b.take(), ["promote g5 on b"]);
    b.answer("promote g5 on b", Outcome::Ok(Answer::Promoted(g(5))));
    // Not started on the old receipt: A's copy is observed first.
    assert_eq!(b.take(), ["observe VM on a"]);
    let fresh = off_receipt("a");
    b.answer("observe VM on a", observed("a", VmState::ShutOff));
    assert_eq!(b.take(), ["start VM on b from g5"]);
    let Op::StartVm { receipt, .. } = &b.m.pending()[0].op else {
        panic!()
    };
    assert_eq!(receipt, &fresh);
}

#[test]
fn a_spare_whose_fenced_peer_came_back_running_does_not_start() {
    let mut b = spare_protected(policy());
    b.advance(Duration::from_secs(10));
    b.answer("observe VM on a", unreachable());
    b.answer("query replica", report("a", "b", 5, 8));
    b.answer("fence a", Outcome::Ok(Answer::Fenced(power_receipt("a"))));
    b.answer("observe VM on a", unreachable());
    b.beats(3, Some(view_a(5)));
    b.answer("promote g5 on b", Outcome::Ok(Answer::Promoted(g(5))));
    b.answer("observe VM on a", observed("a", VmState::Running));
    assert!(matches!(b.blocked_on(), Some(BlockedOn::SplitBrain)));
    assert!(b.take().is_empty());
}

#[test]
fn an_active_does_not_restart_while_its_peer_takes_the_pair_over() {
    let mut a = active_protected(policy());
    let taking = PeerView {
        phase: PhaseName::Promoting,
        ..view_b(5)
    };
    a.input(Input::Heartbeat {
        from: n("b"),
        view: Some(taking.clone()),
    });
    a.input(Input::VmObserved {
        node: n("a"),
        state: VmState::ShutOff,
    });
    assert!(a.take().is_empty(), "no restart in place");
    assert!(
        a.last_event()
            .contains("b is taking the pair over (promoting): not restarting it here"),
        "{}",
        a.last_event()
    );
    // b gives up (back to protected): the restart goes ahead at the next observation.
    a.input(Input::Heartbeat {
        from: n("b"),
        view: Some(view_b(5)),
    });
    a.input(Input::VmObserved {
        node: n("a"),
        state: VmState::ShutOff,
    });
    assert_eq!(a.take(), ["observe VM on b"]);
}

#[test]
fn stand_down_resolves_a_split_brain_in_favour_of_the_peer() {
    // Defect F of the swarm simulator: two claims at one epoch block both
    // sides for good; the operator picks the losing copy.
    let mut a = active_protected(policy());
    a.input(Input::Heartbeat {
        from: n("b"),
        view: Some(PeerView {
            active: n("b"),
            ..view_b(5)
        }),
    });
    assert!(matches!(a.blocked_on(), Some(BlockedOn::SplitBrain)));
    a.command(Command::StandDown);
    assert_eq!(a.phase(), PhaseName::Stale);
    assert_eq!(a.m.active(), &n("b"));
    assert_eq!(a.take(), ["destroy VM on a", "query replica"]);
    assert!(a
        .transitions()
        .last()
        .unwrap()
        .contains("operator stood a down: b keeps the pair at epoch e0"));
    // Not from a healthy pair.
    let mut a2 = active_protected(policy());
    a2.command(Command::StandDown);
    assert_eq!(
        a2.last_event(),
        "stand-down resolves a split brain; the pair is protected"
    );
}
