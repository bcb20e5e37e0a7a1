//! Planned switchover, failback, and their aborts.

use super::*;

/// Runs a planned switchover from `from` (active) to `to` (spare) and
/// returns both machines afterwards.
fn switch(mut from: H, mut to: H, cmd: Command, gen: u64) -> (H, H) {
    let (f, t) = (from.m.config().local.clone(), to.m.config().local.clone());
    from.command(cmd);
    assert_eq!(from.take(), [format!("shut down VM on {f}")]);
    from.answer(
        &format!("shut down VM on {f}"),
        Outcome::Ok(Answer::Stopped(off_receipt(f.as_str()))),
    );
    assert_eq!(from.take(), [format!("sync {f} -> {t}")]);
    from.answer(&format!("sync {f} -> {t}"), generation(gen));
    assert_eq!(from.take(), [format!("verify g{gen}")]);
    from.answer(&format!("verify g{gen}"), done());
    assert!(from.take().is_empty());
    assert_eq!(from.m.view().handover, Some(Generation(gen)));

    to.input(Input::Heartbeat {
        from: f.clone(),
        view: Some(from.m.view()),
    });
    assert_eq!(to.take(), [format!("observe VM on {f}")]);
    to.answer(
        &format!("observe VM on {f}"),
        observed(f.as_str(), VmState::ShutOff),
    );
    assert_eq!(to.take(), [format!("promote g{gen} on {t}")]);
    to.answer(
        &format!("promote g{gen} on {t}"),
        Outcome::Ok(Answer::Promoted(g(gen))),
    );
    assert_eq!(to.take(), [format!("start VM on {t} from g{gen}")]);
    to.answer(&format!("start VM on {t} from g{gen}"), done());
    assert_eq!(to.take(), [format!("reverse replication to {t} -> {f}")]);
    to.answer(&format!("reverse replication to {t} -> {f}"), done());
    assert_eq!(
        to.take(),
        [format!("sync {t} -> {f}")],
        "a delta sync: no initial copy after a switchover"
    );
    from.input(Input::Heartbeat {
        from: t.clone(),
        view: Some(to.m.view()),
    });
    assert_eq!(from.phase(), PhaseName::Stale);
    assert_eq!(
        from.take(),
        [format!("observe VM on {f}"), "query replica".to_string()]
    );
    from.answer(
        &format!("observe VM on {f}"),
        observed(f.as_str(), VmState::ShutOff),
    );
    to.answer(&format!("sync {t} -> {f}"), generation(gen + 1));
    assert_eq!(to.phase(), PhaseName::Protected);
    from.input(Input::Heartbeat {
        from: t.clone(),
        view: Some(to.m.view()),
    });
    assert_eq!(from.phase(), PhaseName::Protected);
    from.clear_events();
    to.clear_events();
    (from, to)
}

#[test]
fn planned_switchover_then_failback() {
    let a = active_protected(policy());
    let b = spare_protected(policy());
    let (mut a, mut b) = switch(a, b, Command::Switchover, 6);
    assert_eq!((a.m.active(), b.m.active()), (&n("b"), &n("b")));
    assert_eq!(b.m.epoch(), Epoch(1));
    // Keep both sides' heartbeats flowing while the failback runs.
    b.input(Input::Heartbeat {
        from: n("a"),
        view: Some(a.m.view()),
    });
    // Failback on the configured primary is refused: it must come from the active node.
    a.command(Command::Failback);
    assert_eq!(
        a.last_event(),
        "failback must be asked of the active node, b"
    );
    let (b, a) = switch(b, a, Command::Failback, 8);
    assert_eq!((a.m.active(), b.m.active()), (&n("a"), &n("a")));
    assert_eq!(a.m.epoch(), Epoch(2));
}

#[test]
fn switchover_events_name_the_operator() {
    let mut a = active_protected(policy());
    a.command(Command::Switchover);
    assert_eq!(
        a.transitions()[0],
        "protected -> handing-over: operator asked for switchover to b"
    );
}

#[test]
fn failback_when_the_primary_is_active_is_refused() {
    let mut a = active_protected(policy());
    a.command(Command::Failback);
    assert_eq!(a.last_event(), "a is already active; nothing to fail back");
    assert!(a.take().is_empty());
}

#[test]
fn switchover_of_a_degraded_pair_is_refused() {
    let mut a = active_protected(Policy {
        sync_interval: Duration::from_secs(10),
        ..policy()
    });
    a.beats(6, Some(view_b(5)));
    assert_eq!(a.take(), ["sync a -> b"]);
    a.answer(
        "sync a -> b",
        Outcome::failed(ErrorKind::Backend, "rsync: disk full"),
    );
    assert_eq!(a.phase(), PhaseName::Degraded);
    a.take();
    a.command(Command::Switchover);
    assert_eq!(
        a.last_event(),
        "switchover needs a protected pair; it is degraded (replication to b failing: rsync: disk full)"
    );
    assert!(a.take().is_empty());
}

#[test]
fn switchover_on_the_spare_is_refused() {
    let mut b = spare_protected(policy());
    b.command(Command::Switchover);
    assert_eq!(
        b.last_event(),
        "switchover must be asked of the active node, a"
    );
}

#[test]
fn failed_verification_aborts_the_switchover_and_restarts_here() {
    let mut a = active_protected(policy());
    a.command(Command::Switchover);
    a.answer(
        "shut down VM on a",
        Outcome::Ok(Answer::Stopped(off_receipt("a"))),
    );
    a.answer("sync a -> b", generation(6));
    a.answer(
        "verify g6",
        Outcome::failed(ErrorKind::Conflict, "vda of g6: checksum differs"),
    );
    assert_eq!(a.take(), ["observe VM on b"]);
    assert!(a.m.view().handover.is_none(), "nothing was offered");
    a.answer("observe VM on b", observed("b", VmState::ShutOff));
    assert_eq!(a.take(), ["start VM on a in place"]);
    a.answer("start VM on a in place", done());
    assert_eq!(a.phase(), PhaseName::Protected);
    assert_eq!(
        a.transitions().last().unwrap(),
        "handing-over -> protected: switchover aborted; the VM runs on a again"
    );
}

#[test]
fn a_shutdown_timeout_aborts_the_switchover() {
    let mut a = active_protected(policy());
    a.command(Command::Switchover);
    a.answer(
        "shut down VM on a",
        Outcome::failed(ErrorKind::Timeout, "guest ignored ACPI for 30s"),
    );
    assert_eq!(a.take(), ["observe VM on a"]);
    assert_eq!(a.phase(), PhaseName::Protected);
    assert!(a
        .transitions()
        .last()
        .unwrap()
        .contains("switchover aborted: shutting the VM down on a failed"));
}

#[test]
fn a_failed_final_sync_aborts_the_switchover() {
    let mut a = active_protected(policy());
    a.command(Command::Switchover);
    a.answer(
        "shut down VM on a",
        Outcome::Ok(Answer::Stopped(off_receipt("a"))),
    );
    a.answer(
        "sync a -> b",
        Outcome::failed(ErrorKind::Unreachable, "ssh: no route"),
    );
    assert_eq!(a.take(), ["observe VM on b"]);
}
