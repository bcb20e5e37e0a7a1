//! Scenario tests: each asserts the exact list of actions a machine asks
//! for, and the causes it gives.

mod crash;
mod failover;
mod properties;
mod restore;
mod switchover;
mod various;

use std::time::Duration;

use super::*;
use crate::hypervisor::VmState;
use crate::receipt::PowerState;
use crate::time::UnixMillis;

pub(super) use super::model::{cfg, g, n, off_receipt, power_receipt};

/// The model's policy with long periodic intervals, so scenarios see only
/// the actions they cause.
pub(super) fn policy() -> Policy {
    Policy {
        sync_interval: Duration::from_secs(3600),
        monitor_interval: Duration::from_secs(3600),
        ..super::model::policy()
    }
}

pub(super) fn observed(node: &str, state: VmState) -> Outcome {
    let receipt = if state.is_live() || state == VmState::Crashed {
        None
    } else {
        Some(off_receipt(node))
    };
    Outcome::Ok(Answer::Observed { state, receipt })
}

pub(super) fn unreachable() -> Outcome {
    Outcome::failed(ErrorKind::Unreachable, "connection refused")
}

pub(super) fn report(source: &str, target: &str, gen: u64, age_s: u64) -> Outcome {
    Outcome::Ok(Answer::Replica(ReplicaReport {
        source: n(source),
        target: n(target),
        newest: Some(g(gen)),
        age: Some(Duration::from_secs(age_s)),
    }))
}

pub(super) fn generation(gen: u64) -> Outcome {
    Outcome::Ok(Answer::Generation {
        info: g(gen),
        age: Duration::from_secs(1),
    })
}

pub(super) fn done() -> Outcome {
    Outcome::Ok(Answer::Done)
}

/// One machine on a millisecond timeline.
pub(super) struct H {
    pub(super) m: Machine,
    pub(super) t: Instant,
    /// Actions asked for and not yet taken by `ops`.
    pub(super) queue: Vec<Action>,
    pub(super) events: Vec<Event>,
}

impl H {
    pub(super) fn new(cfg: PairConfig) -> H {
        let t = Instant::from_origin(Duration::from_secs(1000));
        let m = Machine::new(cfg, t);
        let mut h = H {
            m,
            t,
            queue: Vec::new(),
            events: Vec::new(),
        };
        h.input(Input::Tick);
        h
    }

    pub(super) fn drain(&mut self) {
        while let Some(a) = self.m.poll_action() {
            self.queue.push(a);
        }
        while let Some(e) = self.m.poll_event() {
            self.events.push(e);
        }
    }

    pub(super) fn input(&mut self, i: Input) {
        self.m.handle(i, self.t);
        self.drain();
    }

    /// Lets `d` pass, ticking whenever the machine asked to be woken.
    pub(super) fn advance(&mut self, d: Duration) {
        let end = self.t + d;
        loop {
            let next = self.m.poll_timeout();
            if next > end {
                break;
            }
            self.t = next.max(self.t);
            self.input(Input::Tick);
        }
        self.t = end;
        self.input(Input::Tick);
    }

    /// Heartbeats from the peer, one a second, for `secs` seconds.
    pub(super) fn beats(&mut self, secs: u64, view: Option<PeerView>) {
        let peer = self.m.config().peer().clone();
        for _ in 0..secs {
            self.advance(Duration::from_secs(1));
            self.input(Input::Heartbeat {
                from: peer.clone(),
                view: view.clone(),
            });
        }
    }

    /// The ops asked for since the last call, as text.
    pub(super) fn ops(&mut self) -> Vec<String> {
        self.queue.iter().map(|a| a.op.to_string()).collect()
    }

    /// Answers the pending action whose op reads `op`.
    pub(super) fn answer(&mut self, op: &str, outcome: Outcome) {
        let id = self
            .m
            .pending()
            .iter()
            .find(|p| p.op.to_string() == op)
            .unwrap_or_else(|| panic!("no pending `{op}`; pending: {:?}", self.pending()))
            .id;
        self.queue.retain(|a| a.id != id);
        self.input(Input::ActionDone { id, outcome });
    }

    /// Takes the queue (asserting what was asked), clearing it.
    pub(super) fn take(&mut self) -> Vec<String> {
        let v = self.ops();
        self.queue.clear();
        v
    }

    pub(super) fn pending(&self) -> Vec<String> {
        self.m.pending().iter().map(|p| p.op.to_string()).collect()
    }

    pub(super) fn phase(&self) -> PhaseName {
        self.m.phase().name()
    }

    /// What the machine is blocked on, if it is.
    pub(super) fn blocked_on(&self) -> Option<&BlockedOn> {
        match self.m.phase() {
            Phase::Blocked { on, .. } => Some(on),
            _ => None,
        }
    }

    /// Transition events as "from -> to: cause".
    pub(super) fn transitions(&self) -> Vec<String> {
        self.events
            .iter()
            .filter_map(|e| match &e.kind {
                EventKind::Transition { from, to } => Some(format!("{from} -> {to}: {}", e.cause)),
                _ => None,
            })
            .collect()
    }

    pub(super) fn last_event(&self) -> String {
        self.events
            .last()
            .map(|e| e.cause.clone())
            .unwrap_or_default()
    }

    pub(super) fn command(&mut self, c: Command) {
        self.input(Input::Command(c));
    }

    pub(super) fn clear_events(&mut self) {
        self.events.clear();
    }
}

/// The view node `a` sends while active and protected.
pub(super) fn view_a(gen: u64) -> PeerView {
    PeerView {
        epoch: Epoch(0),
        active: n("a"),
        phase: PhaseName::Protected,
        newest: Some(g(gen)),
        newest_age: Some(Duration::from_secs(1)),
        handover: None,
    }
}

/// The view node `b` sends while spare and protected.
pub(super) fn view_b(gen: u64) -> PeerView {
    PeerView {
        active: n("a"),
        ..view_a(gen)
    }
}

/// B's machine, spare, protected with g5, heartbeats from A flowing.
pub(super) fn spare_protected(policy: Policy) -> H {
    spare_protected_cfg(cfg("b", policy))
}

pub(super) fn spare_protected_cfg(c: PairConfig) -> H {
    let mut h = H::new(c);
    assert_eq!(h.take(), ["observe VM on b", "query replica"]);
    h.answer("observe VM on b", observed("b", VmState::ShutOff));
    h.answer("query replica", report("a", "b", 5, 1));
    h.beats(5, Some(view_a(5)));
    assert_eq!(h.phase(), PhaseName::Protected, "{:?}", h.transitions());
    assert!(h.take().is_empty());
    h.clear_events();
    h
}

/// A's machine, active, protected with g5, heartbeats from B flowing.
pub(super) fn active_protected(policy: Policy) -> H {
    let mut h = H::new(cfg("a", policy));
    assert_eq!(h.take(), ["observe VM on a", "initial sync a -> b"]);
    h.answer("observe VM on a", observed("a", VmState::Running));
    h.answer("initial sync a -> b", generation(5));
    h.beats(5, Some(view_b(5)));
    assert_eq!(h.phase(), PhaseName::Protected, "{:?}", h.transitions());
    assert!(h.take().is_empty());
    h.clear_events();
    h
}
