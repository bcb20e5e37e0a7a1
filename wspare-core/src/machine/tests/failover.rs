//! Unplanned failover on the spare, fencing failures, staleness, partitions.

use super::*;

/// Silence from A until B suspects it; returns the ops asked for.
fn silence_until_suspect(h: &mut H) -> Vec<String> {
    h.advance(Duration::from_secs(10));
    h.take()
}

#[test]
fn unplanned_failover() {
    let mut h = spare_protected(policy());
    assert_eq!(silence_until_suspect(&mut h), ["observe VM on a"]);
    assert_eq!(h.phase(), PhaseName::Suspect);
    h.answer("observe VM on a", unreachable());
    assert_eq!(h.take(), ["query replica"]);
    h.answer("query replica", report("a", "b", 5, 8));
    assert_eq!(h.take(), ["fence a"]);
    h.answer("fence a", Outcome::Ok(Answer::Fenced(power_receipt("a"))));
    assert_eq!(h.take(), ["observe VM on a"]);
    assert_eq!(h.phase(), PhaseName::FenceCheck);
    h.answer("observe VM on a", unreachable());
    assert_eq!(h.take(), ["promote g5 on b"]);
    h.answer("promote g5 on b", Outcome::Ok(Answer::Promoted(g(5))));
    assert_eq!(h.take(), ["start VM on b from g5"]);
    assert_eq!(h.m.epoch(), Epoch(1));
    assert_eq!(h.m.active(), &n("b"));
    h.answer("start VM on b from g5", done());
    assert_eq!(h.phase(), PhaseName::Unprotected);
    assert!(h.take().is_empty(), "no sync while a is down");
    let t = h.transitions();
    assert_eq!(t.len(), 6, "{t:#?}");
    assert!(
        t[0].starts_with("protected -> suspect: no heartbeat from active node a for "),
        "{}",
        t[0]
    );
    assert!(
        t[1].starts_with("suspect -> fencing: no heartbeat from a for "),
        "{}",
        t[1]
    );
    assert!(
        t[1].ends_with("and its hypervisor does not answer (connection refused); fencing a"),
        "{}",
        t[1]
    );
    assert_eq!(t[2], "fencing -> fence-check: fenced a: node a read back off by ipmi; checking that its VM is gone");
    assert_eq!(
        t[3],
        "fence-check -> promoting: a is fenced and its hypervisor is gone (connection refused); promoting g5 on b"
    );
    assert_eq!(
        t[4],
        "promoting -> starting: promoted g5 on b; b is active at epoch e1"
    );
    assert_eq!(
        t[5],
        "starting -> unprotected: VM started on b from g5 (node a read back off by ipmi)"
    );
    let v = h.m.view();
    assert_eq!(
        (v.epoch, v.active, v.phase),
        (Epoch(1), n("b"), PhaseName::Unprotected)
    );
}

#[test]
fn the_start_action_carries_the_receipt_for_the_other_copy() {
    let mut h = spare_protected(policy());
    silence_until_suspect(&mut h);
    h.answer("observe VM on a", unreachable());
    h.answer("query replica", report("a", "b", 5, 8));
    h.answer("fence a", Outcome::Ok(Answer::Fenced(power_receipt("a"))));
    h.answer("observe VM on a", unreachable());
    h.answer("promote g5 on b", Outcome::Ok(Answer::Promoted(g(5))));
    let Op::StartVm {
        node,
        receipt,
        generation,
    } = &h.queue[0].op
    else {
        panic!("{:?}", h.queue)
    };
    assert_eq!((node, *generation), (&n("b"), Some(Generation(5))));
    assert_eq!(receipt, &power_receipt("a"));
}

#[test]
fn a_newer_generation_on_the_replica_is_promoted() {
    let mut h = spare_protected(policy());
    silence_until_suspect(&mut h);
    h.answer("observe VM on a", unreachable());
    h.answer("query replica", report("a", "b", 6, 3));
    h.answer("fence a", Outcome::Ok(Answer::Fenced(power_receipt("a"))));
    h.answer("observe VM on a", unreachable());
    assert_eq!(h.take(), ["promote g6 on b"]);
}

#[test]
fn vm_running_on_the_primary_holds_the_failover() {
    let mut h = spare_protected(policy());
    silence_until_suspect(&mut h);
    h.answer("observe VM on a", observed("a", VmState::Running));
    assert!(h.take().is_empty());
    assert_eq!(h.phase(), PhaseName::Suspect);
    assert!(h
        .last_event()
        .contains("its hypervisor reports the VM running: holding, not failing over"));
    // It asks again a monitor interval later; now the host is gone.
    h.advance(policy().retry_backoff);
    assert_eq!(h.take(), ["observe VM on a"]);
    h.answer("observe VM on a", unreachable());
    assert_eq!(h.take(), ["query replica"]);
}

#[test]
fn heartbeats_resuming_cancel_the_suspicion() {
    let mut h = spare_protected(policy());
    silence_until_suspect(&mut h);
    h.answer("observe VM on a", observed("a", VmState::Running));
    h.beats(3, Some(view_a(5)));
    assert_eq!(h.phase(), PhaseName::Protected);
    assert_eq!(
        h.transitions().last().unwrap(),
        "suspect -> protected: heartbeats from a resumed"
    );
    assert!(h.take().is_empty());
}

#[test]
fn vm_off_on_a_live_primary_whose_agent_is_silent_is_failed_over() {
    let mut h = spare_protected(policy());
    silence_until_suspect(&mut h);
    h.answer("observe VM on a", observed("a", VmState::Crashed));
    assert_eq!(h.take(), ["query replica"]);
    h.answer("query replica", report("a", "b", 5, 8));
    assert_eq!(h.take(), ["fence a"]);
}

#[test]
fn fence_failure_retries_with_backoff_then_blocks_until_confirmed() {
    let mut h = spare_protected(policy());
    silence_until_suspect(&mut h);
    h.answer("observe VM on a", unreachable());
    h.answer("query replica", report("a", "b", 5, 8));
    h.answer(
        "fence a",
        Outcome::failed(ErrorKind::Timeout, "bmc-a: no answer"),
    );
    assert!(h.take().is_empty());
    assert_eq!(
        h.last_event(),
        "fence attempt 1 of a failed: bmc-a: no answer (timeout); retrying in 2.0s"
    );
    h.advance(Duration::from_millis(1999));
    assert!(h.take().is_empty());
    h.advance(Duration::from_millis(1));
    assert_eq!(h.take(), ["fence a"]);
    h.answer(
        "fence a",
        Outcome::failed(ErrorKind::Timeout, "bmc-a: no answer"),
    );
    h.advance(Duration::from_secs(4));
    assert_eq!(h.take(), ["fence a"]);
    h.answer(
        "fence a",
        Outcome::failed(ErrorKind::Timeout, "bmc-a: no answer"),
    );
    assert_eq!(h.phase(), PhaseName::Blocked);
    assert_eq!(
        h.transitions().last().unwrap(),
        "fencing -> blocked: fencing a failed 3 time(s), last: bmc-a: no answer (timeout); make sure a is off, then confirm-down a (or resume to try again)"
    );
    h.advance(Duration::from_secs(600));
    assert!(h.take().is_empty(), "blocked means no action");
    let op = FenceReceipt::from_operator(n("a"), UnixMillis(9));
    h.command(Command::ConfirmDown(op.clone()));
    assert_eq!(h.take(), ["promote g5 on b"]);
    h.answer("promote g5 on b", Outcome::Ok(Answer::Promoted(g(5))));
    let Op::StartVm { receipt, .. } = &h.queue[0].op else {
        panic!()
    };
    assert_eq!(receipt, &op);
}

#[test]
fn refused_credentials_block_at_once_without_a_retry_storm() {
    let mut h = spare_protected(policy());
    silence_until_suspect(&mut h);
    h.answer("observe VM on a", unreachable());
    h.answer("query replica", report("a", "b", 5, 8));
    h.answer(
        "fence a",
        Outcome::failed(ErrorKind::PermissionDenied, "bmc-a refused user admin"),
    );
    assert_eq!(h.phase(), PhaseName::Blocked);
    assert!(h.take().is_empty());
}

#[test]
fn resume_after_fence_failure_decides_again() {
    let mut h = spare_protected(policy());
    silence_until_suspect(&mut h);
    h.answer("observe VM on a", unreachable());
    h.answer("query replica", report("a", "b", 5, 8));
    h.answer(
        "fence a",
        Outcome::failed(ErrorKind::PermissionDenied, "refused"),
    );
    h.command(Command::Resume {
        accept_data_loss: false,
    });
    assert_eq!(h.take(), ["observe VM on b"]);
    h.answer("observe VM on b", observed("b", VmState::ShutOff));
    h.advance(policy().peer_wait);
    assert_eq!(h.take(), ["observe VM on a"]);
    assert_eq!(h.phase(), PhaseName::Suspect);
}

#[test]
fn confirm_down_of_the_wrong_node_or_at_the_wrong_time_is_rejected() {
    let mut h = spare_protected(policy());
    h.command(Command::ConfirmDown(FenceReceipt::from_operator(
        n("a"),
        UnixMillis(1),
    )));
    assert_eq!(h.events.last().unwrap().kind, EventKind::Rejected);
    assert_eq!(
        h.last_event(),
        "nothing waits for a to be confirmed down (the pair is protected)"
    );
    h.command(Command::ConfirmDown(FenceReceipt::from_operator(
        n("b"),
        UnixMillis(1),
    )));
    assert_eq!(h.last_event(), "b is not the peer of this node (a)");
    assert!(h.take().is_empty());
}

#[test]
fn a_lying_fencer_blocks_instead_of_starting() {
    let mut h = spare_protected(policy());
    silence_until_suspect(&mut h);
    h.answer("observe VM on a", unreachable());
    h.answer("query replica", report("a", "b", 5, 8));
    h.answer("fence a", Outcome::Ok(Answer::Fenced(power_receipt("a"))));
    h.answer("observe VM on a", observed("a", VmState::Running));
    assert_eq!(h.phase(), PhaseName::Blocked);
    assert!(matches!(
        h.blocked_on(),
        Some(BlockedOn::LyingFencer { .. })
    ));
    assert!(h.take().is_empty());
    assert!(
        h.last_event().contains("the fence device may be lying"),
        "{}",
        h.last_event()
    );
}

#[test]
fn a_receipt_for_another_node_is_not_accepted() {
    let mut h = spare_protected(policy());
    silence_until_suspect(&mut h);
    h.answer("observe VM on a", unreachable());
    h.answer("query replica", report("a", "b", 5, 8));
    h.answer("fence a", Outcome::Ok(Answer::Fenced(power_receipt("b"))));
    assert!(
        h.last_event().contains("not a receipt for a"),
        "{}",
        h.last_event()
    );
    assert_eq!(h.phase(), PhaseName::Fencing);
}

#[test]
fn stale_replica_blocks_without_fencing_until_the_operator_accepts() {
    let mut h = spare_protected(policy());
    silence_until_suspect(&mut h);
    h.answer("observe VM on a", unreachable());
    h.answer("query replica", report("a", "b", 5, 700));
    assert!(h.take().is_empty(), "no fence for a stale replica");
    assert_eq!(h.phase(), PhaseName::Blocked);
    let t = h.transitions();
    let last = t.last().unwrap();
    assert!(
        last.contains(
            "but the newest generation here, g5, is 11m 40s old, over the data-loss bound 10m"
        ),
        "{last}"
    );
    assert!(
        last.ends_with("resume with accept-data-loss to fail over anyway"),
        "{last}"
    );
    h.command(Command::Resume {
        accept_data_loss: true,
    });
    h.answer("observe VM on b", observed("b", VmState::ShutOff));
    h.advance(policy().peer_wait);
    h.answer("observe VM on a", unreachable());
    h.answer("query replica", report("a", "b", 5, 730));
    assert_eq!(h.take(), ["fence a"]);
}

#[test]
fn no_generation_blocks() {
    let mut h = H::new(cfg("b", policy()));
    h.answer("observe VM on b", observed("b", VmState::ShutOff));
    h.answer(
        "query replica",
        Outcome::Ok(Answer::Replica(ReplicaReport {
            source: n("a"),
            target: n("b"),
            newest: None,
            age: None,
        })),
    );
    h.take();
    h.advance(Duration::from_secs(20));
    h.answer("observe VM on a", unreachable());
    h.answer(
        "query replica",
        Outcome::Ok(Answer::Replica(ReplicaReport {
            source: n("a"),
            target: n("b"),
            newest: None,
            age: None,
        })),
    );
    assert!(matches!(h.blocked_on(), Some(BlockedOn::NoGeneration)));
    assert!(h.take().is_empty());
}

#[test]
fn allow_stale_policy_fails_over_anyway() {
    let mut h = spare_protected(Policy {
        allow_stale_failover: true,
        ..policy()
    });
    silence_until_suspect(&mut h);
    h.answer("observe VM on a", unreachable());
    h.answer("query replica", report("a", "b", 5, 7000));
    assert_eq!(h.take(), ["fence a"]);
}

#[test]
fn fence_delay_postpones_fencing_in_a_partition() {
    let mut c = cfg("b", policy());
    c.peer_fence_delay = Duration::from_secs(10);
    let mut h = spare_protected_cfg(c);
    silence_until_suspect(&mut h);
    h.answer("observe VM on a", unreachable());
    h.answer("query replica", report("a", "b", 5, 8));
    assert!(h.take().is_empty());
    let last = h.transitions().last().unwrap().clone();
    assert!(
        last.ends_with("fencing a after its fence delay of 10s"),
        "{last}"
    );
    h.advance(Duration::from_millis(9999));
    assert!(h.take().is_empty());
    h.advance(Duration::from_millis(1));
    assert_eq!(h.take(), ["fence a"]);
}

#[test]
fn partition_healing_during_the_fence_delay_cancels_the_fence() {
    let mut c = cfg("b", policy());
    c.peer_fence_delay = Duration::from_secs(10);
    let mut h = spare_protected_cfg(c);
    silence_until_suspect(&mut h);
    h.answer("observe VM on a", unreachable());
    h.answer("query replica", report("a", "b", 5, 8));
    h.beats(3, Some(view_a(5)));
    assert_eq!(h.phase(), PhaseName::Protected);
    assert_eq!(
        h.transitions().last().unwrap(),
        "fencing -> protected: heartbeats from a resumed before it was fenced"
    );
    h.beats(30, Some(view_a(5)));
    assert!(h.take().is_empty());
}

#[test]
fn the_active_side_of_a_partition_fences_the_spare_without_delay() {
    let mut h = active_protected(policy());
    h.advance(Duration::from_secs(10));
    assert_eq!(h.take(), ["observe VM on b"]);
    h.answer("observe VM on b", unreachable());
    assert_eq!(h.take(), ["fence b"]);
    h.answer("fence b", Outcome::Ok(Answer::Fenced(power_receipt("b"))));
    assert_eq!(h.phase(), PhaseName::Unprotected);
    assert_eq!(
        h.transitions().last().unwrap(),
        "fencing -> unprotected: fenced spare b: node b read back off by ipmi"
    );
    assert!(h.take().is_empty());
}

#[test]
fn the_active_side_does_not_fence_a_spare_whose_hypervisor_answers() {
    let mut h = active_protected(policy());
    h.advance(Duration::from_secs(10));
    h.answer("observe VM on b", observed("b", VmState::ShutOff));
    assert!(h.take().is_empty());
    assert_eq!(h.phase(), PhaseName::Suspect);
}

#[test]
fn witness_that_still_reaches_the_peer_holds_the_failover() {
    let mut c = cfg("b", policy());
    c.witness = true;
    let mut h = spare_protected_cfg(c);
    silence_until_suspect(&mut h);
    h.input(Input::Witness {
        node: n("a"),
        alive: true,
    });
    h.answer("observe VM on a", unreachable());
    assert!(h.take().is_empty());
    assert!(
        h.last_event().contains("the witness still reaches it"),
        "{}",
        h.last_event()
    );
    h.input(Input::Witness {
        node: n("a"),
        alive: false,
    });
    assert_eq!(h.take(), ["query replica"]);
}

#[test]
fn witness_silence_waits() {
    let mut c = cfg("b", policy());
    c.witness = true;
    let mut h = spare_protected_cfg(c);
    silence_until_suspect(&mut h);
    h.answer("observe VM on a", unreachable());
    assert!(h.take().is_empty());
    assert_eq!(h.last_event(), "a is silent and its hypervisor does not answer (connection refused); waiting for the witness");
}

#[test]
fn a_stale_spare_never_fails_over() {
    let mut h = spare_protected(policy());
    // The pair was switched over and back: this node went stale at g5.
    h.input(Input::Heartbeat {
        from: n("a"),
        view: Some(PeerView {
            epoch: Epoch(2),
            ..view_a(5)
        }),
    });
    assert_eq!(h.phase(), PhaseName::Stale);
    h.take();
    h.advance(Duration::from_secs(20));
    h.answer("observe VM on a", unreachable());
    h.answer("query replica", report("a", "b", 5, 3));
    assert!(matches!(h.blocked_on(), Some(BlockedOn::StaleReplica)));
    assert!(h.take().is_empty());
}

#[test]
fn a_failover_whose_start_fails_is_resumed_from_the_promoted_generation() {
    // Found by the swarm simulator: the start failed (the new active's
    // hypervisor was down) until the pair blocked; `resume` went through a
    // restart in place, which cannot start a VM that was never defined on
    // this node, and the pair stayed down for good.
    let mut h = spare_protected(policy());
    silence_until_suspect(&mut h);
    h.answer("observe VM on a", unreachable());
    h.answer("query replica", report("a", "b", 5, 8));
    h.answer("fence a", Outcome::Ok(Answer::Fenced(power_receipt("a"))));
    h.answer("observe VM on a", unreachable());
    h.answer("promote g5 on b", Outcome::Ok(Answer::Promoted(g(5))));
    h.take();
    for _ in 0..policy().restart_limit {
        h.answer("start VM on b from g5", unreachable());
        h.advance(policy().retry_backoff);
    }
    assert!(
        matches!(h.blocked_on(), Some(BlockedOn::FailoverStartFailed { .. })),
        "{:?}",
        h.m.phase()
    );
    h.take();
    h.command(Command::Resume {
        accept_data_loss: false,
    });
    assert_eq!(h.take(), ["start VM on b from g5"]);
    assert_eq!(
        h.m.epoch(),
        Epoch(1),
        "the epoch of the failover, not a new one"
    );
    h.answer("start VM on b from g5", done());
    assert_eq!(h.phase(), PhaseName::Unprotected);
}
