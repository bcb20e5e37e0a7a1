//! [`Engine`]: the machines of one node with their journal, without async.
//!
//! It enforces the journal rule: when a machine's state changed, its
//! snapshot is persisted before the actions it asked for are handed out. The
//! tokio [`super::Driver`] runs on it, and so does the simulator, with a
//! [`crate::journal::MemoryStore`].

use std::collections::{BTreeMap, BTreeSet};

use crate::error::Error;
use crate::ids::{NodeId, PairId};
use crate::journal::Store;
use crate::machine::{
    Action, Command, Event, Input, Machine, PairConfig, PairStatus, PeerView, Snapshot,
};
use crate::time::Instant;

/// What handling inputs produced: actions to run (already journaled) and
/// events to publish.
#[derive(Debug, Default)]
pub struct Output {
    /// Actions, by pair, in the order asked.
    pub actions: Vec<(PairId, Action)>,
    /// Events, in order.
    pub events: Vec<Event>,
}

impl Output {
    fn extend(&mut self, o: Output) {
        self.actions.extend(o.actions);
        self.events.extend(o.events);
    }
}

/// The machines of one node, their journal and their timers.
pub struct Engine<S: Store> {
    local: NodeId,
    machines: BTreeMap<PairId, Machine>,
    persisted: BTreeMap<PairId, Snapshot>,
    store: S,
    timers: BTreeSet<(Instant, PairId)>,
    due: BTreeMap<PairId, Instant>,
}

impl<S: Store> Engine<S> {
    /// Opens the engine for `local`'s pairs: restores each from the store,
    /// or creates it; forgets journaled pairs no longer configured. The
    /// output holds what the machines ask for first.
    pub fn open(
        local: NodeId,
        configs: Vec<PairConfig>,
        mut store: S,
        now: Instant,
    ) -> Result<(Self, Output), Error> {
        let loaded = store.load()?;
        let mut e = Engine {
            local,
            machines: BTreeMap::new(),
            persisted: BTreeMap::new(),
            store,
            timers: BTreeSet::new(),
            due: BTreeMap::new(),
        };
        let configured: BTreeSet<PairId> = configs.iter().map(|c| c.pair.clone()).collect();
        for pair in loaded.snapshots.keys().filter(|p| !configured.contains(*p)) {
            tracing::info!(%pair, "pair no longer configured; removing it from the journal");
            e.store.remove(pair)?;
        }
        let mut out = Output::default();
        for cfg in configs {
            let pair = cfg.pair.clone();
            let m = match loaded.snapshots.get(&pair) {
                Some(s) => {
                    e.persisted.insert(pair.clone(), s.clone());
                    Machine::restore(cfg, s.clone(), now)?
                }
                None => Machine::new(cfg, now),
            };
            e.machines.insert(pair.clone(), m);
            out.extend(e.feed(&pair, Input::Tick, now)?);
        }
        Ok((e, out))
    }

    /// The node these machines run on.
    pub fn local(&self) -> &NodeId {
        &self.local
    }

    /// Feeds one input to one pair's machine.
    pub fn handle(&mut self, pair: &PairId, input: Input, now: Instant) -> Result<Output, Error> {
        self.machine_mut(pair)?;
        self.feed(pair, input, now)
    }

    /// An operator command; `Ok(Err(why))` if the machine refused it.
    pub fn command(
        &mut self,
        pair: &PairId,
        cmd: Command,
        now: Instant,
    ) -> Result<(Result<(), String>, Output), Error> {
        let m = self.machine_mut(pair)?;
        m.handle(Input::Tick, now);
        let r = m.command(cmd);
        let out = self.feed(pair, Input::Tick, now)?;
        Ok((r, out))
    }

    /// A heartbeat from `from` with its views: each pair `from` belongs to
    /// gets it, with its own view if one came.
    pub fn heartbeat(
        &mut self,
        from: &NodeId,
        views: &[(PairId, PeerView)],
        now: Instant,
    ) -> Result<Output, Error> {
        let mut out = Output::default();
        let pairs: Vec<PairId> = self
            .machines
            .iter()
            .filter(|(_, m)| m.config().peer() == from)
            .map(|(p, _)| p.clone())
            .collect();
        for pair in pairs {
            let view = views
                .iter()
                .find(|(p, _)| *p == pair)
                .map(|(_, v)| v.clone());
            out.extend(self.feed(
                &pair,
                Input::Heartbeat {
                    from: from.clone(),
                    view,
                },
                now,
            )?);
        }
        Ok(out)
    }

    /// Ticks every machine whose timer is due.
    pub fn tick(&mut self, now: Instant) -> Result<Output, Error> {
        let mut out = Output::default();
        while let Some((t, pair)) = self.timers.first().cloned() {
            if t > now {
                break;
            }
            out.extend(self.feed(&pair, Input::Tick, now)?);
        }
        Ok(out)
    }

    /// When the next machine wants a tick.
    pub fn next_timeout(&self) -> Instant {
        self.timers
            .first()
            .map(|(t, _)| *t)
            .unwrap_or(Instant::NEVER)
    }

    /// The views to send `peer` in a heartbeat.
    pub fn views_for(&self, peer: &NodeId) -> Vec<(PairId, PeerView)> {
        self.machines
            .iter()
            .filter(|(_, m)| m.config().peer() == peer)
            .map(|(p, m)| (p.clone(), m.view()))
            .collect()
    }

    /// Every pair's status.
    pub fn status(&self) -> BTreeMap<PairId, PairStatus> {
        self.machines
            .iter()
            .map(|(p, m)| (p.clone(), m.status()))
            .collect()
    }

    /// One pair's machine.
    pub fn machine(&self, pair: &PairId) -> Option<&Machine> {
        self.machines.get(pair)
    }

    /// The pairs.
    pub fn pairs(&self) -> impl Iterator<Item = &PairId> {
        self.machines.keys()
    }

    /// The store (for tests and the simulator).
    pub fn store(&self) -> &S {
        &self.store
    }

    fn machine_mut(&mut self, pair: &PairId) -> Result<&mut Machine, Error> {
        let local = &self.local;
        self.machines
            .get_mut(pair)
            .ok_or_else(|| Error::not_found(format!("pair {pair} is not configured on {local}")))
    }

    fn feed(&mut self, pair: &PairId, input: Input, now: Instant) -> Result<Output, Error> {
        let m = self.machines.get_mut(pair).expect("checked by callers");
        m.handle(input, now);
        let mut out = Output::default();
        while let Some(a) = m.poll_action() {
            out.actions.push((pair.clone(), a));
        }
        while let Some(ev) = m.poll_event() {
            out.events.push(ev);
        }
        // Journal before the actions leave the engine.
        let snap = m.snapshot();
        if self.persisted.get(pair) != Some(&snap) {
            self.store.persist(std::slice::from_ref(&snap))?;
            self.persisted.insert(pair.clone(), snap);
        }
        let t = m.poll_timeout();
        if let Some(old) = self.due.insert(pair.clone(), t) {
            self.timers.remove(&(old, pair.clone()));
        }
        self.timers.insert((t, pair.clone()));
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::error::ErrorKind;
    use crate::journal::{JournalError, Loaded, MemoryStore};
    use crate::machine::{Op, Policy};

    fn cfg(pair: &str, local: &str) -> PairConfig {
        PairConfig {
            pair: PairId::new(pair).unwrap(),
            vm: crate::ids::VmName::new(pair).unwrap(),
            primary: NodeId::new("a").unwrap(),
            spare: NodeId::new("b").unwrap(),
            local: NodeId::new(local).unwrap(),
            witness: false,
            peer_fence_delay: Duration::ZERO,
            policy: Policy::default(),
        }
    }

    fn t(s: u64) -> Instant {
        Instant::from_origin(Duration::from_secs(s))
    }

    /// The engine of node `local` for `pairs`, opened at `at` seconds.
    fn open<St: Store>(
        local: &str,
        pairs: &[&str],
        store: St,
        at: u64,
    ) -> Result<(Engine<St>, Output), Error> {
        let configs = pairs.iter().map(|p| cfg(p, local)).collect();
        Engine::open(NodeId::new(local).unwrap(), configs, store, t(at))
    }

    #[test]
    fn actions_are_journaled_before_they_are_handed_out() {
        let (e, out) = open("a", &["web"], MemoryStore::default(), 0).unwrap();
        assert_eq!(out.actions.len(), 2);
        let saved = e.store().clone().load().unwrap();
        let pending: Vec<_> = saved
            .snapshots
            .values()
            .next()
            .unwrap()
            .pending
            .iter()
            .map(|p| p.id)
            .collect();
        let asked: Vec<_> = out.actions.iter().map(|(_, a)| a.id).collect();
        assert_eq!(pending, asked);
    }

    #[test]
    fn reopening_restores_and_reobserves() {
        let (e, _) = open("b", &["web"], MemoryStore::default(), 0).unwrap();
        let store = e.store().clone();
        let (_, out) = open("b", &["web"], store, 100).unwrap();
        let ops: Vec<String> = out.actions.iter().map(|(_, a)| a.op.to_string()).collect();
        assert!(ops.contains(&"query replica".to_string()), "{ops:?}");
        assert!(out
            .events
            .iter()
            .any(|e| e.cause.contains("restored from the journal")));
    }

    #[test]
    fn heartbeats_fan_out_to_the_pairs_of_the_sender() {
        let (mut e, _) = open("b", &["web", "db"], MemoryStore::default(), 0).unwrap();
        let views = e.views_for(&NodeId::new("a").unwrap());
        assert_eq!(views.len(), 2);
        e.heartbeat(&NodeId::new("a").unwrap(), &[], t(1)).unwrap();
        e.heartbeat(&NodeId::new("zz").unwrap(), &[], t(1)).unwrap();
        assert!(e.next_timeout() > t(1));
        let err = e
            .handle(&PairId::new("nope").unwrap(), Input::Tick, t(2))
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::NotFound);
    }

    #[test]
    fn ticks_reach_due_machines_only() {
        let (mut e, _) = open("b", &["web"], MemoryStore::default(), 0).unwrap();
        assert!(e.tick(t(0)).unwrap().actions.is_empty());
        // With no heartbeat at all, the detector suspects a after its
        // initial timeout (15 s): not before.
        let mut asked = Vec::new();
        while e.next_timeout() <= t(16) {
            let at = e.next_timeout();
            for (_, a) in e.tick(at).unwrap().actions {
                asked.push((at, a.op.to_string()));
            }
        }
        let suspect: Vec<_> = asked
            .iter()
            .filter(|(_, o)| o == "observe VM on a")
            .collect();
        assert_eq!(suspect.len(), 1, "{asked:?}");
        assert_eq!(suspect[0].0, t(15));
    }

    #[test]
    fn commands_answer_with_the_refusal() {
        let (mut e, _) = open("b", &["web"], MemoryStore::default(), 0).unwrap();
        let (r, _) = e
            .command(&PairId::new("web").unwrap(), Command::Switchover, t(1))
            .unwrap();
        assert_eq!(
            r.unwrap_err(),
            "switchover must be asked of the active node, a"
        );
        let (r, _) = e
            .command(
                &PairId::new("web").unwrap(),
                Command::Maintenance(true),
                t(1),
            )
            .unwrap();
        r.unwrap();
        // Maintenance is journaled although no action was asked.
        let s = e.store().clone().load().unwrap();
        assert!(s.snapshots.values().next().unwrap().maintenance);
    }

    struct FailingStore;
    impl Store for FailingStore {
        fn persist(&mut self, _: &[Snapshot]) -> Result<(), JournalError> {
            Err(JournalError::Io {
                path: "/j".into(),
                op: "append",
                source: std::io::Error::other("disk gone"),
            })
        }
        fn remove(&mut self, _: &PairId) -> Result<(), JournalError> {
            Ok(())
        }
        fn load(&mut self) -> Result<Loaded, JournalError> {
            Ok(Loaded::default())
        }
    }

    #[test]
    fn a_store_that_cannot_persist_stops_the_engine_before_any_action() {
        let e = open("a", &["web"], FailingStore, 0).err().unwrap();
        assert_eq!(
            e.to_string(),
            "journal /j: append failed: disk gone (backend)"
        );
    }

    #[test]
    fn pairs_dropped_from_the_config_leave_the_journal() {
        let (e, _) = open("a", &["web", "db"], MemoryStore::default(), 0).unwrap();
        let store = e.store().clone();
        let (e, _) = open("a", &["web"], store, 1).unwrap();
        let mut s = e.store().clone();
        assert_eq!(s.load().unwrap().snapshots.len(), 1);
        assert!(matches!(
            e.machine(&PairId::new("web").unwrap()).unwrap().pending()[0].op,
            Op::Observe { .. } | Op::InitialSync { .. }
        ));
    }
}
