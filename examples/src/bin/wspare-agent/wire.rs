//! The heartbeat datagram: authenticated with HMAC-SHA256 over a shared
//! key, numbered so that replays are refused.
//!
//! ```text
//! offset 0   "WSHB"                 magic
//!        4   1                      format version
//!        5   tag (32 bytes)         HMAC-SHA256(key, magic | version | body)
//!        37  body                   JSON of `Body`
//! ```
//!
//! The tag is checked (in constant time) before the body is parsed, so
//! nothing a forger sends reaches the JSON parser, let alone the driver.
//! A body names the cluster, the sender and the recipient (a datagram
//! meant for another cluster or node is refused even with the right key),
//! the sender's boot epoch (a counter the agent persists and raises at
//! every start) and a sequence number that grows by one per datagram
//! within a boot. [`ReplayGuard`] accepts each (boot, seq) at most once and
//! never one from an older boot: a captured datagram sent again is a
//! replay, whenever it arrives. `sent_ms` (the sender's wall clock) bounds
//! how old a datagram may be, which covers the receiver's own restart
//! (when its replay windows start empty).
//!
//! The end-to-end test's `heartbeats.py` speaks this format too (it
//! captures, replays, tampers with and forges datagrams): change both.

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use wspare_core::machine::PeerView;
use wspare_core::{NodeId, PairId};

/// The first four bytes of every heartbeat.
pub(crate) const MAGIC: &[u8; 4] = b"WSHB";
/// The format version this agent speaks.
pub(crate) const VERSION: u8 = 1;
/// Bytes before the body.
pub(crate) const HEADER: usize = 4 + 1 + 32;
/// Largest datagram sent or accepted (UDP over IPv4 carries 65507 bytes).
pub(crate) const MAX_DATAGRAM: usize = 65_000;
/// How far below the highest sequence number a late datagram is still
/// accepted (reordering), if not seen before.
pub(crate) const WINDOW: u64 = 64;

/// The shared key. Never printed.
#[derive(Clone)]
pub(crate) struct Key(Vec<u8>);

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Key({} bytes, redacted)", self.0.len())
    }
}

impl Key {
    /// A key of at least 32 bytes.
    pub(crate) fn new(bytes: Vec<u8>) -> Result<Key, String> {
        if bytes.len() < 32 {
            return Err(format!(
                "the heartbeat key is {} bytes long; use at least 32 (e.g. `head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n' > KEYFILE`)",
                bytes.len()
            ));
        }
        Ok(Key(bytes))
    }

    /// The MAC over the magic, the version and `body`.
    fn mac(&self, body: &[u8]) -> Hmac<Sha256> {
        let mut mac =
            <Hmac<Sha256> as Mac>::new_from_slice(&self.0).expect("HMAC takes keys of any length");
        mac.update(MAGIC);
        mac.update(&[VERSION]);
        mac.update(body);
        mac
    }
}

/// The sender's echo of the last heartbeat it received from the
/// recipient, for the round-trip time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub(crate) struct Echo {
    /// The recipient's boot epoch in that heartbeat.
    pub(crate) boot: u64,
    /// Its sequence number.
    pub(crate) seq: u64,
    /// How long the sender held it before this one left, in microseconds.
    pub(crate) held_us: u64,
}

/// What a heartbeat says.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub(crate) struct Body {
    /// The cluster's name (`[cluster] name`).
    pub(crate) cluster: String,
    /// The sender.
    pub(crate) from: NodeId,
    /// The recipient.
    pub(crate) to: NodeId,
    /// The sender's boot epoch.
    pub(crate) boot: u64,
    /// Sequence number within the boot, from 1.
    pub(crate) seq: u64,
    /// The sender's wall clock, milliseconds since the Unix epoch.
    pub(crate) sent_ms: u64,
    /// The last heartbeat the sender got from the recipient.
    pub(crate) echo: Option<Echo>,
    /// The sender's driver's views of the pairs it shares with the recipient.
    pub(crate) views: Vec<(PairId, PeerView)>,
}

/// Why a datagram was refused. `as_str` is the metrics label.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Reject {
    /// Too short, wrong magic or version, or a body that does not parse.
    Malformed(String),
    /// The tag does not match: forged, corrupted, or another key.
    BadMac,
    /// Authentic, but for another cluster or node.
    Misdirected(String),
    /// Authentic, but from a node that shares no pair with this one.
    UnknownSender(String),
    /// A (boot, seq) seen before or older than the window.
    Replay(String),
    /// Older than the allowed clock skew.
    Stale(String),
}

impl Reject {
    /// Short kebab-case reason, for metrics.
    pub(crate) fn as_str(&self) -> &'static str {
        match self {
            Reject::Malformed(_) => "malformed",
            Reject::BadMac => "bad-mac",
            Reject::Misdirected(_) => "misdirected",
            Reject::UnknownSender(_) => "unknown-sender",
            Reject::Replay(_) => "replay",
            Reject::Stale(_) => "stale",
        }
    }

    /// Every reason, for metrics that show zeros.
    pub(crate) const ALL: [&'static str; 6] = [
        "malformed",
        "bad-mac",
        "misdirected",
        "unknown-sender",
        "replay",
        "stale",
    ];
}

impl std::fmt::Display for Reject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reject::Malformed(m) => write!(f, "malformed heartbeat: {m}"),
            Reject::BadMac => f.write_str(
                "heartbeat tag does not match (forged, corrupted, or sent with another key)",
            ),
            Reject::Misdirected(m)
            | Reject::UnknownSender(m)
            | Reject::Replay(m)
            | Reject::Stale(m) => f.write_str(m),
        }
    }
}

/// Encodes and authenticates a heartbeat.
pub(crate) fn seal(key: &Key, body: &Body) -> Vec<u8> {
    let json = serde_json::to_vec(body).expect("a heartbeat body serializes");
    let tag = key.mac(&json).finalize().into_bytes();
    let mut out = Vec::with_capacity(HEADER + json.len());
    out.extend_from_slice(MAGIC);
    out.push(VERSION);
    out.extend_from_slice(&tag);
    out.extend_from_slice(&json);
    out
}

/// Checks the tag, then parses the body. Nothing else is checked here
/// (see [`ReplayGuard`] and the receiver).
pub(crate) fn open(key: &Key, datagram: &[u8]) -> Result<Body, Reject> {
    if datagram.len() < HEADER {
        return Err(Reject::Malformed(format!(
            "{} bytes, shorter than the {HEADER}-byte header",
            datagram.len()
        )));
    }
    if datagram.len() > MAX_DATAGRAM {
        return Err(Reject::Malformed(format!(
            "{} bytes, over the {MAX_DATAGRAM}-byte limit",
            datagram.len()
        )));
    }
    if &datagram[..4] != MAGIC {
        return Err(Reject::Malformed("wrong magic".into()));
    }
    if datagram[4] != VERSION {
        return Err(Reject::Malformed(format!(
            "format version {} (this agent speaks {VERSION})",
            datagram[4]
        )));
    }
    let (tag, json) = (&datagram[5..HEADER], &datagram[HEADER..]);
    key.mac(json)
        .verify_slice(tag)
        .map_err(|_| Reject::BadMac)?;
    serde_json::from_slice(json).map_err(|e| {
        Reject::Malformed(format!(
            "authentic but unreadable body ({e}); are both agents the same version?"
        ))
    })
}

/// Accepts each (boot, seq) of one sender at most once.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct ReplayGuard {
    /// The sender's boot epoch last accepted.
    boot: u64,
    /// The highest sequence number accepted in that boot (0: none).
    top: u64,
    /// Bit i: `top - i` was accepted.
    seen: u64,
}

impl ReplayGuard {
    /// Accepts (boot, seq) or says why not. Only an accepted pair changes
    /// the guard.
    pub(crate) fn accept(&mut self, boot: u64, seq: u64) -> Result<(), Reject> {
        if seq == 0 {
            return Err(Reject::Malformed("sequence number 0".into()));
        }
        if boot < self.boot {
            return Err(Reject::Replay(format!(
                "replayed heartbeat from boot {boot}; the sender is at boot {}",
                self.boot
            )));
        }
        if boot > self.boot {
            *self = ReplayGuard {
                boot,
                top: seq,
                seen: 1,
            };
            return Ok(());
        }
        if seq > self.top {
            let shift = seq - self.top;
            self.seen = if shift >= 64 { 0 } else { self.seen << shift };
            self.seen |= 1;
            self.top = seq;
            return Ok(());
        }
        let back = self.top - seq;
        if back >= WINDOW {
            return Err(Reject::Replay(format!(
                "replayed or very late heartbeat {seq} of boot {boot}; {} seen already",
                self.top
            )));
        }
        if self.seen & (1 << back) != 0 {
            return Err(Reject::Replay(format!(
                "replayed heartbeat {seq} of boot {boot}"
            )));
        }
        self.seen |= 1 << back;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wspare_core::machine::PhaseName;
    use wspare_core::Epoch;

    fn key(b: u8) -> Key {
        Key::new(vec![b; 32]).unwrap()
    }

    fn body(seq: u64) -> Body {
        Body {
            cluster: "c".into(),
            from: NodeId::new("node-a").unwrap(),
            to: NodeId::new("node-b").unwrap(),
            boot: 3,
            seq,
            sent_ms: 1_700_000_000_000,
            echo: Some(Echo {
                boot: 9,
                seq: 4,
                held_us: 120,
            }),
            views: vec![(
                PairId::new("web").unwrap(),
                PeerView {
                    epoch: Epoch(2),
                    active: NodeId::new("node-a").unwrap(),
                    phase: PhaseName::Protected,
                    newest: None,
                    newest_age: None,
                    handover: None,
                },
            )],
        }
    }

    #[test]
    fn round_trip_and_tampering() {
        let k = key(7);
        let d = seal(&k, &body(1));
        assert_eq!(&d[..4], MAGIC);
        assert_eq!(open(&k, &d).unwrap(), body(1));
        // Another key.
        assert_eq!(open(&key(8), &d), Err(Reject::BadMac));
        // Every single-bit flip in the tag or the body is caught.
        for i in 5..d.len() {
            let mut t = d.clone();
            t[i] ^= 0x20;
            assert_eq!(open(&k, &t), Err(Reject::BadMac), "byte {i}");
        }
        let mut t = d.clone();
        t[4] = 2;
        assert!(matches!(open(&k, &t), Err(Reject::Malformed(_))));
        assert!(matches!(open(&k, &d[..10]), Err(Reject::Malformed(_))));
        assert!(matches!(open(&k, b"XXXX"), Err(Reject::Malformed(_))));
        let mut t = d.clone();
        t[0] = b'X';
        assert!(matches!(open(&k, &t), Err(Reject::Malformed(_))));
    }

    #[test]
    fn short_keys_are_refused_and_never_printed() {
        assert!(Key::new(vec![1; 31]).unwrap_err().contains("31 bytes"));
        let k = Key::new(b"0123456789abcdef0123456789abcdefSECRET".to_vec()).unwrap();
        assert!(!format!("{k:?}").contains("SECRET"));
    }

    #[test]
    fn replays_are_refused() {
        let mut g = ReplayGuard::default();
        g.accept(1, 1).unwrap();
        g.accept(1, 2).unwrap();
        assert!(matches!(g.accept(1, 2), Err(Reject::Replay(_))));
        assert!(matches!(g.accept(1, 1), Err(Reject::Replay(_))));
        // Reordering within the window is fine, once.
        g.accept(1, 10).unwrap();
        g.accept(1, 7).unwrap();
        assert!(matches!(g.accept(1, 7), Err(Reject::Replay(_))));
        // Far behind: refused.
        g.accept(1, 200).unwrap();
        assert!(matches!(g.accept(1, 100), Err(Reject::Replay(_))));
        g.accept(1, 199).unwrap();
        // A new boot starts over; the old one is over for good.
        g.accept(2, 1).unwrap();
        assert!(matches!(g.accept(1, 500), Err(Reject::Replay(_))));
        assert!(matches!(g.accept(2, 1), Err(Reject::Replay(_))));
        assert!(matches!(g.accept(2, 0), Err(Reject::Malformed(_))));
        // A refused pair does not move the guard.
        let before = g.clone();
        let _ = g.accept(1, 900);
        assert_eq!(g, before);
    }

    #[test]
    fn a_large_jump_clears_the_window() {
        let mut g = ReplayGuard::default();
        g.accept(1, 5).unwrap();
        g.accept(1, 5 + 64).unwrap();
        assert!(matches!(g.accept(1, 5), Err(Reject::Replay(_))));
        g.accept(1, 5 + 63).unwrap();
        assert!(matches!(g.accept(1, 5 + 63), Err(Reject::Replay(_))));
    }
}
