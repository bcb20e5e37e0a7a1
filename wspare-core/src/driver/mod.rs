//! The driver: runs one node's machines on tokio.
//!
//! It owns an [`Engine`] (machines plus journal), runs each action through
//! the pair's [`Executor`] with its deadline, feeds the outcome back, and
//! publishes events (a broadcast channel) and a status snapshot per pair (a
//! watch channel). The journal is written before any action runs; a journal
//! that cannot be written stops the driver (fail-stop: a node that cannot
//! remember what it did must not act).
//!
//! Integrators talk to it through a [`DriverHandle`]: heartbeats and
//! witness reports in, views for outgoing heartbeats out, operator
//! commands with their answer.

mod engine;
mod executor;

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::task::JoinSet;

pub use engine::{Engine, Output};
pub use executor::{Deadlines, Executor, FenceGate, PairBackends, SystemClock, WallClock};

use crate::error::{Error, ErrorKind};
use crate::hypervisor::VmState;
use crate::ids::{ActionId, NodeId, PairId, VmName};
use crate::journal::Store;
use crate::machine::{Command, Event, Input, Outcome, PairStatus, PeerView};
use crate::time::Instant;

enum Msg {
    Heartbeat {
        from: NodeId,
        views: Vec<(PairId, PeerView)>,
    },
    Witness {
        node: NodeId,
        alive: bool,
    },
    VmState {
        node: NodeId,
        vm: VmName,
        state: VmState,
    },
    Command {
        pair: PairId,
        cmd: Command,
        reply: oneshot::Sender<Result<(), String>>,
    },
    Views {
        peer: NodeId,
        reply: oneshot::Sender<Vec<(PairId, PeerView)>>,
    },
    Shutdown {
        grace: Duration,
        reply: oneshot::Sender<()>,
    },
}

/// Talks to a running [`Driver`]. Cheap to clone.
#[derive(Clone)]
pub struct DriverHandle {
    tx: mpsc::Sender<Msg>,
    events: broadcast::Sender<Event>,
    status: watch::Receiver<BTreeMap<PairId, PairStatus>>,
}

fn gone() -> Error {
    Error::new(ErrorKind::Unreachable, "the driver has stopped")
}

impl DriverHandle {
    /// A heartbeat arrived from `from` with its views.
    pub async fn heartbeat(
        &self,
        from: NodeId,
        views: Vec<(PairId, PeerView)>,
    ) -> Result<(), Error> {
        self.tx
            .send(Msg::Heartbeat { from, views })
            .await
            .map_err(|_| gone())
    }

    /// A witness's verdict on `node`.
    pub async fn witness(&self, node: NodeId, alive: bool) -> Result<(), Error> {
        self.tx
            .send(Msg::Witness { node, alive })
            .await
            .map_err(|_| gone())
    }

    /// A VM state seen outside the driver.
    pub async fn vm_state(&self, node: NodeId, vm: VmName, state: VmState) -> Result<(), Error> {
        self.tx
            .send(Msg::VmState { node, vm, state })
            .await
            .map_err(|_| gone())
    }

    /// An operator command; `Ok(Err(why))` if the machine refused it.
    pub async fn command(&self, pair: PairId, cmd: Command) -> Result<Result<(), String>, Error> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Msg::Command { pair, cmd, reply })
            .await
            .map_err(|_| gone())?;
        rx.await.map_err(|_| gone())
    }

    /// The views to send `peer`.
    pub async fn views_for(&self, peer: NodeId) -> Result<Vec<(PairId, PeerView)>, Error> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Msg::Views { peer, reply })
            .await
            .map_err(|_| gone())?;
        rx.await.map_err(|_| gone())
    }

    /// Events from now on.
    pub fn events(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    /// Status of every pair, updated after each step.
    pub fn status(&self) -> watch::Receiver<BTreeMap<PairId, PairStatus>> {
        self.status.clone()
    }

    /// Stops the driver: no new action starts; actions in flight get up to
    /// `grace` to finish and have their outcomes journaled. The journal is
    /// consistent either way (what did not finish is re-observed at the next
    /// start).
    pub async fn shutdown(&self, grace: Duration) -> Result<(), Error> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Msg::Shutdown { grace, reply })
            .await
            .map_err(|_| gone())?;
        rx.await.map_err(|_| gone())
    }
}

/// Runs one node's machines. See the module docs.
pub struct Driver<S: Store> {
    engine: Engine<S>,
    executors: BTreeMap<PairId, Arc<Executor>>,
    origin: tokio::time::Instant,
    rx: mpsc::Receiver<Msg>,
    inflight: JoinSet<(PairId, ActionId, Outcome)>,
    tasks: std::collections::HashMap<tokio::task::Id, (PairId, ActionId)>,
    events: broadcast::Sender<Event>,
    status: watch::Sender<BTreeMap<PairId, PairStatus>>,
    stopping: bool,
}

impl<S: Store + 'static> Driver<S> {
    /// Opens the engine for `local`'s pairs and starts the driver task.
    /// Every configured pair needs an executor.
    pub fn start(
        local: NodeId,
        configs: Vec<crate::machine::PairConfig>,
        store: S,
        executors: BTreeMap<PairId, Arc<Executor>>,
    ) -> Result<(DriverHandle, tokio::task::JoinHandle<Result<(), Error>>), Error> {
        if let Some(c) = configs.iter().find(|c| !executors.contains_key(&c.pair)) {
            return Err(Error::invalid(format!("pair {} has no backends", c.pair)));
        }
        let origin = tokio::time::Instant::now();
        let (engine, first) = Engine::open(local.clone(), configs, store, Instant::ZERO)?;
        let (tx, rx) = mpsc::channel(1024);
        let (events, _) = broadcast::channel(4096);
        let (status, status_rx) = watch::channel(engine.status());
        let handle = DriverHandle {
            tx: tx.clone(),
            events: events.clone(),
            status: status_rx,
        };
        // Lifecycle events of local hypervisors save polling.
        let mut seen = Vec::new();
        for ex in executors.values() {
            let Some(hv) = ex.backends().hypervisors.get(&local) else {
                continue;
            };
            if seen.iter().any(|h| Arc::ptr_eq(h, hv)) {
                continue;
            }
            seen.push(hv.clone());
            if let Some(mut rx) = hv.events() {
                let (tx, node) = (tx.clone(), local.clone());
                tokio::spawn(async move {
                    loop {
                        match rx.recv().await {
                            Ok(ev) => {
                                let m = Msg::VmState {
                                    node: node.clone(),
                                    vm: ev.vm,
                                    state: ev.status.state,
                                };
                                if tx.send(m).await.is_err() {
                                    return;
                                }
                            }
                            Err(broadcast::error::RecvError::Lagged(n)) => {
                                tracing::warn!(
                                    missed = n,
                                    "hypervisor events lagged; periodic observation covers them"
                                );
                            }
                            Err(broadcast::error::RecvError::Closed) => return,
                        }
                    }
                });
            }
        }
        let mut d = Driver {
            engine,
            executors,
            origin,
            rx,
            inflight: JoinSet::new(),
            tasks: std::collections::HashMap::new(),
            events,
            status,
            stopping: false,
        };
        d.dispatch(first);
        let task = tokio::spawn(d.run());
        Ok((handle, task))
    }

    fn now(&self) -> Instant {
        Instant::from_origin(self.origin.elapsed())
    }

    fn dispatch(&mut self, out: Output) {
        for ev in out.events {
            tracing::info!(pair = %ev.pair, "{ev}");
            let _ = self.events.send(ev);
        }
        if self.stopping {
            return;
        }
        for (pair, action) in out.actions {
            let ex = self.executors[&pair].clone();
            let key = (pair.clone(), action.id);
            let task = self.inflight.spawn(async move {
                let outcome = ex.run(&action.op).await;
                (pair, action.id, outcome)
            });
            self.tasks.insert(task.id(), key);
        }
        self.status.send_replace(self.engine.status());
    }

    fn step(&mut self, r: Result<Output, Error>) -> Result<(), Error> {
        let out = r?;
        self.dispatch(out);
        Ok(())
    }

    async fn run(mut self) -> Result<(), Error> {
        let r = self.event_loop().await;
        if let Err(e) = &r {
            tracing::error!(error = %e, "driver stopped");
        }
        r
    }

    async fn event_loop(&mut self) -> Result<(), Error> {
        loop {
            let next = self.engine.next_timeout();
            let wake = self.origin + next.since_origin().min(Duration::from_secs(86_400 * 365));
            // Biased: a fixed order keeps runs on a paused clock
            // deterministic (the simulator replays seeds).
            tokio::select! {
                biased;
                msg = self.rx.recv() => {
                    let Some(msg) = msg else { return Ok(()) };
                    let now = self.now();
                    match msg {
                        Msg::Heartbeat { from, views } => {
                            let r = self.engine.heartbeat(&from, &views, now);
                            self.step(r)?;
                        }
                        Msg::Witness { node, alive } => {
                            let pairs: Vec<PairId> = self.engine.pairs().cloned().collect();
                            for p in pairs {
                                let r = self.engine.handle(&p, Input::Witness { node: node.clone(), alive }, now);
                                self.step(r)?;
                            }
                        }
                        Msg::VmState { node, vm, state } => {
                            let pair = self.executors.iter().find(|(_, ex)| ex.backends().spec.name == vm).map(|(p, _)| p.clone());
                            if let Some(p) = pair {
                                let r = self.engine.handle(&p, Input::VmObserved { node, state }, now);
                                self.step(r)?;
                            }
                        }
                        Msg::Command { pair, cmd, reply } => {
                            match self.engine.command(&pair, cmd, now) {
                                Ok((answer, out)) => {
                                    let _ = reply.send(answer);
                                    self.dispatch(out);
                                }
                                Err(e) if e.kind() == ErrorKind::NotFound => {
                                    let _ = reply.send(Err(e.message().to_string()));
                                }
                                Err(e) => return Err(e),
                            }
                        }
                        Msg::Views { peer, reply } => {
                            let _ = reply.send(self.engine.views_for(&peer));
                        }
                        Msg::Shutdown { grace, reply } => {
                            self.stopping = true;
                            let deadline = tokio::time::Instant::now() + grace;
                            while let Ok(Some(done)) = tokio::time::timeout_at(deadline, self.inflight.join_next_with_id()).await {
                                self.completed(done)?;
                            }
                            self.inflight.abort_all();
                            self.status.send_replace(self.engine.status());
                            let _ = reply.send(());
                            return Ok(());
                        }
                    }
                }
                Some(done) = self.inflight.join_next_with_id(), if !self.inflight.is_empty() => {
                    self.completed(done)?;
                }
                _ = tokio::time::sleep_until(wake) => {
                    let r = self.engine.tick(self.now());
                    self.step(r)?;
                }
            }
        }
    }

    fn completed(
        &mut self,
        done: Result<(tokio::task::Id, (PairId, ActionId, Outcome)), tokio::task::JoinError>,
    ) -> Result<(), Error> {
        let (task, pair, id, outcome) = match done {
            Ok((task, (pair, id, outcome))) => (task, pair, id, outcome),
            // A backend panicked: nobody knows what it did, so the outcome
            // is unknown and the machine observes before acting again.
            Err(e) => {
                let Some((pair, id)) = self.tasks.get(&e.id()).cloned() else {
                    return Ok(());
                };
                tracing::error!(%pair, %id, error = %e, "an action's task failed; its outcome is unknown");
                (e.id(), pair, id, Outcome::Unknown)
            }
        };
        self.tasks.remove(&task);
        let r = self
            .engine
            .handle(&pair, Input::ActionDone { id, outcome }, self.now());
        self.step(r)
    }
}
