//! Heartbeats between agents over UDP: every `heartbeat-interval` each
//! peer gets the driver's views of the pairs it shares with this node, in
//! a datagram authenticated with the shared key (`wire`). What arrives is
//! checked (tag, cluster and recipient, sender, replay, age) before the
//! driver sees it; what is refused is counted by reason and never reaches
//! the failure detector, so a forger can neither fake liveness (delaying a
//! failover) nor feed views (causing one).

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::UdpSocket;
use wspare_core::driver::DriverHandle;
use wspare_core::{NodeId, UnixMillis};

use crate::metrics::Metrics;
use crate::wire::{self, Body, Echo, Key, Reject, ReplayGuard};

/// Heartbeat state that outlives a config reload: the boot epoch, the
/// outgoing sequence, the replay guards.
pub(crate) struct Shared {
    /// This agent's boot epoch (persisted, raised at each start).
    pub(crate) boot: u64,
    seq: AtomicU64,
    guards: Mutex<BTreeMap<NodeId, ReplayGuard>>,
    /// Per peer: the last accepted (boot, seq) and when it came.
    last_in: Mutex<BTreeMap<NodeId, (u64, u64, Instant)>>,
    /// Per peer: recent (seq, sent at), for round trips.
    sent: Mutex<BTreeMap<NodeId, VecDeque<(u64, Instant)>>>,
    metrics: Arc<Metrics>,
    /// Rejections logged so far, by reason (logs are rate-limited).
    logged: Mutex<BTreeMap<&'static str, u64>>,
    /// The current config's link; `None` before the first runtime.
    link: std::sync::RwLock<Option<Arc<Link>>>,
    /// The running driver; `None` while a reload swaps it.
    driver: std::sync::RwLock<Option<DriverHandle>>,
    /// The last views sent to each peer, re-sent while the driver is being
    /// swapped (a reload must not look like a dead node to the peer).
    cached: Mutex<BTreeMap<NodeId, (Instant, Views)>>,
}

type Views = Vec<(wspare_core::PairId, wspare_core::machine::PeerView)>;

/// How long cached views stand in for a driver that does not answer.
const CACHED_VIEWS_FOR: Duration = Duration::from_secs(30);

impl Shared {
    pub(crate) fn new(boot: u64, metrics: Arc<Metrics>) -> Self {
        Shared {
            boot,
            seq: AtomicU64::new(0),
            guards: Mutex::new(BTreeMap::new()),
            last_in: Mutex::new(BTreeMap::new()),
            sent: Mutex::new(BTreeMap::new()),
            metrics,
            logged: Mutex::new(BTreeMap::new()),
            link: std::sync::RwLock::new(None),
            driver: std::sync::RwLock::new(None),
            cached: Mutex::new(BTreeMap::new()),
        }
    }

    /// Installs a runtime's link and driver.
    pub(crate) fn install(&self, link: Arc<Link>, driver: DriverHandle) {
        *self.link.write().unwrap_or_else(|e| e.into_inner()) = Some(link);
        *self.driver.write().unwrap_or_else(|e| e.into_inner()) = Some(driver);
    }

    /// Detaches the driver (a reload or shutdown stops it): heartbeats go
    /// on with the last views, received ones are dropped.
    pub(crate) fn detach(&self) {
        *self.driver.write().unwrap_or_else(|e| e.into_inner()) = None;
    }

    fn current(&self) -> (Option<Arc<Link>>, Option<DriverHandle>) {
        (
            self.link.read().unwrap_or_else(|e| e.into_inner()).clone(),
            self.driver
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        )
    }

    /// The views for `peer`: the driver's, else the last ones sent (for a
    /// while).
    async fn views(
        &self,
        peer: &NodeId,
        driver: Option<DriverHandle>,
        wait: Duration,
    ) -> Option<Views> {
        if let Some(d) = driver {
            match tokio::time::timeout(wait, d.views_for(peer.clone())).await {
                Ok(Ok(v)) => {
                    self.cached
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(peer.clone(), (Instant::now(), v.clone()));
                    return Some(v);
                }
                Ok(Err(_)) => {}
                Err(_) => {
                    tracing::warn!(%peer, "the driver did not answer for the heartbeat's views in time; sending the last ones")
                }
            }
        }
        let cached = self.cached.lock().unwrap_or_else(|e| e.into_inner());
        cached
            .get(peer)
            .filter(|(at, _)| at.elapsed() < CACHED_VIEWS_FOR)
            .map(|(_, v)| v.clone())
    }

    fn reject(&self, why: &Reject, from: SocketAddr) {
        self.metrics.rejected(why);
        let mut logged = self.logged.lock().unwrap_or_else(|e| e.into_inner());
        let n = logged.entry(why.as_str()).or_default();
        *n += 1;
        // The first few of each reason, then every hundredth.
        if *n <= 5 || *n % 100 == 0 {
            tracing::warn!(reason = why.as_str(), %from, count = *n, "heartbeat refused: {why}");
        }
    }
}

/// One link's settings (rebuilt at each reload).
pub(crate) struct Link {
    pub(crate) local: NodeId,
    pub(crate) cluster: String,
    pub(crate) key: Key,
    pub(crate) peers: Vec<(NodeId, SocketAddr)>,
    pub(crate) interval: Duration,
    pub(crate) max_skew: Duration,
}

/// Resolves `host:port`.
pub(crate) async fn resolve(address: &str) -> std::io::Result<SocketAddr> {
    tokio::net::lookup_host(address)
        .await?
        .next()
        .ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("{address} resolves to no address"),
            )
        })
}

/// Sends heartbeats until aborted, every `heartbeat-interval` of the
/// current link.
pub(crate) async fn send_loop(sock: Arc<UdpSocket>, shared: Arc<Shared>) {
    let mut too_big_logged = false;
    let mut next = tokio::time::Instant::now();
    loop {
        let (link, driver) = shared.current();
        let Some(link) = link else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        next += link.interval;
        let now = tokio::time::Instant::now();
        if next < now {
            next = now;
        }
        let wait = link.interval.max(Duration::from_millis(300));
        for (peer, addr) in &link.peers {
            let Some(views) = shared.views(peer, driver.clone(), wait).await else {
                continue;
            };
            let echo = shared
                .last_in
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(peer)
                .map(|(boot, seq, at)| Echo {
                    boot: *boot,
                    seq: *seq,
                    held_us: u64::try_from(at.elapsed().as_micros()).unwrap_or(u64::MAX),
                });
            let seq = shared.seq.fetch_add(1, Ordering::SeqCst) + 1;
            let body = Body {
                cluster: link.cluster.clone(),
                from: link.local.clone(),
                to: peer.clone(),
                boot: shared.boot,
                seq,
                sent_ms: UnixMillis::now().0,
                echo,
                views,
            };
            let d = wire::seal(&link.key, &body);
            if d.len() > wire::MAX_DATAGRAM {
                if !too_big_logged {
                    tracing::error!(%peer, bytes = d.len(), "the heartbeat to {peer} is larger than a datagram ({} bytes); too many pairs between two nodes for one datagram", wire::MAX_DATAGRAM);
                    too_big_logged = true;
                }
                continue;
            }
            {
                let mut sent = shared.sent.lock().unwrap_or_else(|e| e.into_inner());
                let q = sent.entry(peer.clone()).or_default();
                q.push_back((seq, Instant::now()));
                while q.len() > 64 {
                    q.pop_front();
                }
            }
            match sock.send_to(&d, addr).await {
                Ok(_) => shared.metrics.heartbeat_sent(peer),
                Err(e) => tracing::debug!(%peer, %addr, error = %e, "heartbeat not sent"),
            }
        }
        tokio::time::sleep_until(next).await;
    }
}

/// Checks a datagram that passed the tag: cluster, recipient, sender, age,
/// replay. Only an accepted one changes the replay guard.
pub(crate) fn admit(
    body: &Body,
    link: &Link,
    guards: &mut BTreeMap<NodeId, ReplayGuard>,
    now_ms: u64,
) -> Result<(), Reject> {
    if body.cluster != link.cluster || body.to != link.local {
        return Err(Reject::Misdirected(format!(
            "heartbeat for {} in cluster {:?}, this is {} in {:?}",
            body.to, body.cluster, link.local, link.cluster
        )));
    }
    if !link.peers.iter().any(|(n, _)| *n == body.from) {
        return Err(Reject::UnknownSender(format!(
            "heartbeat from {}, which shares no pair with {}",
            body.from, link.local
        )));
    }
    let skew = u64::try_from(link.max_skew.as_millis()).unwrap_or(u64::MAX);
    if body.sent_ms.saturating_add(skew) < now_ms || body.sent_ms > now_ms.saturating_add(skew) {
        return Err(Reject::Stale(format!(
            "heartbeat {} of boot {} from {} was sent at {} ms, {} ms from this clock (allowed: {} ms); a replay, or clocks out of sync",
            body.seq,
            body.boot,
            body.from,
            body.sent_ms,
            now_ms.abs_diff(body.sent_ms),
            skew
        )));
    }
    guards
        .entry(body.from.clone())
        .or_default()
        .accept(body.boot, body.seq)
}

/// Receives heartbeats until aborted.
pub(crate) async fn recv_loop(sock: Arc<UdpSocket>, shared: Arc<Shared>) {
    let mut buf = vec![0u8; wire::MAX_DATAGRAM + 1];
    loop {
        let (n, from_addr) = match sock.recv_from(&mut buf).await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "heartbeat socket error");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (link, driver) = shared.current();
        let Some(link) = link else { continue };
        let body = match wire::open(&link.key, &buf[..n]) {
            Ok(b) => b,
            Err(why) => {
                shared.reject(&why, from_addr);
                continue;
            }
        };
        let verdict = {
            let mut guards = shared.guards.lock().unwrap_or_else(|e| e.into_inner());
            admit(&body, &link, &mut guards, UnixMillis::now().0)
        };
        if let Err(why) = verdict {
            shared.reject(&why, from_addr);
            continue;
        }
        let now = Instant::now();
        let rtt = body.echo.filter(|e| e.boot == shared.boot).and_then(|e| {
            let sent = shared.sent.lock().unwrap_or_else(|e| e.into_inner());
            let at = sent
                .get(&body.from)?
                .iter()
                .find(|(s, _)| *s == e.seq)
                .map(|(_, t)| *t)?;
            now.checked_duration_since(at)?
                .checked_sub(Duration::from_micros(e.held_us))
        });
        shared
            .last_in
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(body.from.clone(), (body.boot, body.seq, now));
        shared
            .metrics
            .heartbeat_received(&body.from, UnixMillis::now().0, rtt);
        match driver {
            Some(d) => {
                if d.heartbeat(body.from, body.views).await.is_err() {
                    tracing::debug!("heartbeat not delivered: the driver is stopping");
                }
            }
            None => tracing::debug!("heartbeat not delivered: the driver is being swapped"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link() -> Link {
        Link {
            local: NodeId::new("node-b").unwrap(),
            cluster: "c".into(),
            key: Key::new(vec![1; 32]).unwrap(),
            peers: vec![(
                NodeId::new("node-a").unwrap(),
                "127.0.0.1:1".parse().unwrap(),
            )],
            interval: Duration::from_millis(200),
            max_skew: Duration::from_secs(60),
        }
    }

    fn body(seq: u64, sent_ms: u64) -> Body {
        Body {
            cluster: "c".into(),
            from: NodeId::new("node-a").unwrap(),
            to: NodeId::new("node-b").unwrap(),
            boot: 1,
            seq,
            sent_ms,
            echo: None,
            views: Vec::new(),
        }
    }

    #[test]
    fn admission() {
        let l = link();
        let mut g = BTreeMap::new();
        let now = 1_000_000_000;
        admit(&body(1, now), &l, &mut g, now).unwrap();
        assert_eq!(
            admit(&body(1, now), &l, &mut g, now).unwrap_err().as_str(),
            "replay"
        );
        assert_eq!(
            admit(&body(2, now - 61_000), &l, &mut g, now)
                .unwrap_err()
                .as_str(),
            "stale"
        );
        assert_eq!(
            admit(&body(2, now + 61_000), &l, &mut g, now)
                .unwrap_err()
                .as_str(),
            "stale"
        );
        // A stale refusal did not burn seq 2.
        admit(&body(2, now), &l, &mut g, now).unwrap();
        let mut b = body(3, now);
        b.to = NodeId::new("node-c").unwrap();
        assert_eq!(
            admit(&b, &l, &mut g, now).unwrap_err().as_str(),
            "misdirected"
        );
        let mut b = body(3, now);
        b.cluster = "other".into();
        assert_eq!(
            admit(&b, &l, &mut g, now).unwrap_err().as_str(),
            "misdirected"
        );
        let mut b = body(3, now);
        b.from = NodeId::new("node-x").unwrap();
        assert_eq!(
            admit(&b, &l, &mut g, now).unwrap_err().as_str(),
            "unknown-sender"
        );
    }

    /// The real receive loop, on a real socket, with a real (empty)
    /// driver: genuine heartbeats are accepted, forged, tampered, replayed
    /// and junk datagrams are counted by reason.
    #[tokio::test]
    async fn forged_and_replayed_datagrams_are_counted() {
        let metrics = Arc::new(Metrics::default());
        let shared = Arc::new(Shared::new(1, metrics.clone()));
        let l = Arc::new(link());
        let (driver, _join) = wspare_core::driver::Driver::start(
            l.local.clone(),
            Vec::new(),
            wspare_core::journal::MemoryStore::default(),
            BTreeMap::new(),
        )
        .unwrap();
        let sock = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let to = sock.local_addr().unwrap();
        shared.install(l.clone(), driver);
        let task = tokio::spawn(recv_loop(sock, shared));
        let attacker = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let now = UnixMillis::now().0;
        let genuine = wire::seal(&l.key, &body(1, now));
        let forged = wire::seal(&Key::new(vec![2; 32]).unwrap(), &body(2, now));
        let mut tampered = wire::seal(&l.key, &body(3, now));
        let last = tampered.len() - 2;
        tampered[last] ^= 1;
        let old = wire::seal(&l.key, &body(4, now - 3_600_000));
        for d in [
            &genuine,
            &genuine,
            &forged,
            &tampered,
            &old,
            &b"junk".to_vec(),
        ] {
            attacker.send_to(d, to).await.unwrap();
        }
        let a = NodeId::new("node-a").unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let r = metrics.rejected_counts();
            let total: u64 = r.values().sum();
            if total == 5 {
                assert_eq!(r["replay"], 1, "{r:?}");
                assert_eq!(r["bad-mac"], 2, "{r:?}");
                assert_eq!(r["stale"], 1, "{r:?}");
                assert_eq!(r["malformed"], 1, "{r:?}");
                assert_eq!(metrics.peers()[&a].received, 1);
                break;
            }
            assert!(Instant::now() < deadline, "rejections: {r:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        task.abort();
    }
}
