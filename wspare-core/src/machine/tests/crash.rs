//! A VM that crashes on a live host: restarts in place, then a hand-over.

use super::*;

fn crash_and_restart(h: &mut H) {
    h.input(Input::VmObserved {
        node: n("a"),
        state: VmState::Crashed,
    });
    assert_eq!(h.take(), ["destroy VM on a"]);
    h.answer(
        "destroy VM on a",
        Outcome::Ok(Answer::Stopped(off_receipt("a"))),
    );
    assert_eq!(h.take(), ["observe VM on b"]);
    h.answer("observe VM on b", observed("b", VmState::ShutOff));
    assert_eq!(h.take(), ["start VM on a in place"]);
    h.answer("start VM on a in place", done());
    assert_eq!(h.phase(), PhaseName::Protected);
}

#[test]
fn crash_in_place_restarts_then_hands_over_after_the_limit() {
    let mut h = active_protected(policy());
    crash_and_restart(&mut h);
    let t = h.transitions();
    assert_eq!(t[0], "protected -> restarting: the VM is crashed on a; restarting it in place (1 of 2 within 10m)");
    assert_eq!(t[1], "restarting -> protected: the VM was restarted on a");
    h.beats(60, Some(view_b(5)));
    crash_and_restart(&mut h);
    h.beats(60, Some(view_b(5)));
    h.clear_events();
    // Third crash within the window: hand the pair to b, with a final sync.
    h.input(Input::VmObserved {
        node: n("a"),
        state: VmState::ShutOff,
    });
    assert_eq!(h.take(), ["destroy VM on a"]);
    assert_eq!(
        h.transitions()[0],
        "protected -> handing-over: the VM went shut-off on a 2 times within 10m: handing the pair to b"
    );
    h.answer(
        "destroy VM on a",
        Outcome::Ok(Answer::Stopped(off_receipt("a"))),
    );
    assert_eq!(h.take(), ["sync a -> b"]);
    h.answer("sync a -> b", generation(6));
    assert!(
        h.take().is_empty(),
        "an unplanned hand-over does not verify"
    );
    assert_eq!(h.m.view().handover, Some(Generation(6)));

    // b takes over.
    let mut b = spare_protected(policy());
    b.input(Input::Heartbeat {
        from: n("a"),
        view: Some(h.m.view()),
    });
    assert_eq!(b.take(), ["observe VM on a"]);
    assert_eq!(
        b.transitions()[0],
        "protected -> taking-over: a offered the pair with g6"
    );
    b.answer("observe VM on a", observed("a", VmState::ShutOff));
    assert_eq!(b.take(), ["promote g6 on b"]);
    b.answer("promote g6 on b", Outcome::Ok(Answer::Promoted(g(6))));
    assert_eq!(b.take(), ["start VM on b from g6"]);
    b.answer("start VM on b from g6", done());
    assert_eq!(b.phase(), PhaseName::Resyncing);
    // a is alive: replication reverses at once, with a delta sync.
    assert_eq!(b.take(), ["reverse replication to b -> a",]);
    b.answer("reverse replication to b -> a", done());
    assert_eq!(b.take(), ["sync b -> a"]);

    // a learns it is no longer active.
    h.input(Input::Heartbeat {
        from: n("b"),
        view: Some(b.m.view()),
    });
    assert_eq!(h.phase(), PhaseName::Stale);
    assert_eq!(h.take(), ["observe VM on a", "query replica"]);
    b.answer("sync b -> a", generation(7));
    assert_eq!(b.phase(), PhaseName::Protected);
    h.input(Input::Heartbeat {
        from: n("b"),
        view: Some(b.m.view()),
    });
    assert_eq!(h.phase(), PhaseName::Protected);
    assert_eq!(h.m.active(), &n("b"));
}

#[test]
fn restarts_age_out_of_the_window() {
    let mut h = active_protected(policy());
    crash_and_restart(&mut h);
    h.beats(300, Some(view_b(5)));
    crash_and_restart(&mut h);
    h.beats(301, Some(view_b(5)));
    // The first restart is now older than the window: restart again.
    crash_and_restart(&mut h);
}

#[test]
fn crash_loop_without_a_reachable_spare_blocks() {
    let mut h = active_protected(Policy {
        restart_limit: 0,
        ..policy()
    });
    h.advance(Duration::from_secs(10));
    h.answer("observe VM on b", unreachable());
    h.answer("fence b", Outcome::Ok(Answer::Fenced(power_receipt("b"))));
    h.input(Input::VmObserved {
        node: n("a"),
        state: VmState::ShutOff,
    });
    assert!(matches!(h.blocked_on(), Some(BlockedOn::CrashLoop)));
    assert!(
        h.last_event()
            .ends_with("and the spare b is unreachable; fix the VM, then resume"),
        "{}",
        h.last_event()
    );
    assert!(h.take().is_empty());
}

#[test]
fn restart_with_the_spare_fenced_uses_its_fence_receipt() {
    let mut h = active_protected(policy());
    h.advance(Duration::from_secs(10));
    h.answer("observe VM on b", unreachable());
    h.answer("fence b", Outcome::Ok(Answer::Fenced(power_receipt("b"))));
    h.input(Input::VmObserved {
        node: n("a"),
        state: VmState::ShutOff,
    });
    assert_eq!(h.take(), ["start VM on a in place"]);
    let Op::StartVm { receipt, .. } = &h.m.pending()[0].op else {
        panic!()
    };
    assert_eq!(receipt, &power_receipt("b"));
}

#[test]
fn a_running_spare_copy_blocks_the_restart() {
    let mut h = active_protected(policy());
    h.input(Input::VmObserved {
        node: n("a"),
        state: VmState::ShutOff,
    });
    h.answer("observe VM on b", observed("b", VmState::Running));
    assert!(matches!(h.blocked_on(), Some(BlockedOn::SplitBrain)));
    assert!(h.take().is_empty());
}

#[test]
fn an_unreachable_spare_hypervisor_is_asked_again_then_blocks() {
    let mut h = active_protected(policy());
    h.input(Input::VmObserved {
        node: n("a"),
        state: VmState::ShutOff,
    });
    for _ in 0..2 {
        assert_eq!(h.take(), ["observe VM on b"]);
        h.answer("observe VM on b", unreachable());
        h.advance(policy().retry_backoff);
    }
    assert_eq!(h.take(), ["observe VM on b"]);
    h.answer("observe VM on b", unreachable());
    assert_eq!(h.phase(), PhaseName::Blocked);
    assert!(
        h.last_event()
            .starts_with("cannot prove the copy on b is off"),
        "{}",
        h.last_event()
    );
}

/// A, with no restart allowed, finds its VM down and offers the pair to B
/// with g6.
fn offering_g6() -> H {
    let mut h = active_protected(Policy {
        restart_limit: 0,
        ..policy()
    });
    h.input(Input::VmObserved {
        node: n("a"),
        state: VmState::ShutOff,
    });
    h.answer(
        "destroy VM on a",
        Outcome::Ok(Answer::Stopped(off_receipt("a"))),
    );
    h.answer("sync a -> b", generation(6));
    h
}

#[test]
fn the_hand_over_blocks_when_the_peer_never_takes_over() {
    let mut h = offering_g6();
    h.beats(59, Some(view_b(6)));
    assert_eq!(h.phase(), PhaseName::HandingOver);
    h.advance(Duration::from_secs(1));
    assert!(matches!(
        h.blocked_on(),
        Some(BlockedOn::HandoverUnacknowledged)
    ));
    assert!(
        h.take().is_empty(),
        "never restarts on its own after an offer"
    );
}

#[test]
fn the_hand_over_waits_while_the_peer_is_taking_over() {
    let mut h = offering_g6();
    h.beats(50, Some(view_b(6)));
    h.beats(
        50,
        Some(PeerView {
            phase: PhaseName::Promoting,
            ..view_b(6)
        }),
    );
    assert_eq!(h.phase(), PhaseName::HandingOver);
}

#[test]
fn a_restart_behind_a_suspicions_observation_asks_for_its_own_receipt() {
    // Found by the swarm simulator: the VM crashed while the spare was
    // suspected; the restart's "is the peer's copy off?" was folded into
    // the suspicion's observation in flight, whose answer went to the
    // suspicion, and the restart waited forever.
    let mut a = active_protected(policy());
    a.advance(Duration::from_secs(20));
    assert_eq!(a.take(), ["observe VM on b"]);
    a.input(Input::VmObserved {
        node: n("a"),
        state: VmState::Crashed,
    });
    assert_eq!(a.phase(), PhaseName::Restarting);
    assert_eq!(a.take(), ["destroy VM on a"]);
    a.answer(
        "destroy VM on a",
        Outcome::Ok(Answer::Stopped(off_receipt("a"))),
    );
    assert_eq!(a.take(), ["observe VM on b"], "its own observation");
    // The suspicion's observation answers first, then the restart's.
    a.answer("observe VM on b", unreachable());
    a.answer("observe VM on b", observed("b", VmState::ShutOff));
    assert_eq!(a.take(), ["start VM on a in place"]);
}
