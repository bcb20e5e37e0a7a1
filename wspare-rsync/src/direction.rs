//! Which way a pair replicates, from the manifests on its two hosts.
//!
//! An [`RsyncReplicator`](crate::RsyncReplicator) is built with a
//! direction and keeps it in memory; after a `reverse` elsewhere (the other
//! node's agent, an earlier run of a tool) it is stale and refused. A
//! caller that does not hold the direction itself reads it from disk
//! before building one: the manifest with the highest direction epoch
//! names the source (itself if its role is `source`, the other host if its
//! role is `target`); at equal epochs the source's manifest wins; with no
//! manifest at all (a new pair), the configured primary is the source.

use wspare_core::{NodeId, Result};

use crate::config::{Endpoint, Options};
use crate::error::RsyncError;
use crate::host::Host;
use crate::manifest::{Manifest, Role};

/// Which way a pair replicates, as the manifests say.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Direction {
    /// The node whose copy is the source.
    pub source: NodeId,
    /// The direction epoch it is the source at (0 for a new pair).
    pub epoch: u64,
}

/// The direction from the manifests of the pair's two nodes (`None`: the
/// node has none, or it could not be read). See the module docs for the
/// rule; `primary` is the source when neither has one.
pub fn direction(primary: &NodeId, manifests: [(&NodeId, Option<&Manifest>); 2]) -> Direction {
    let [(a, ma), (b, mb)] = manifests;
    let best = [(a, b, ma), (b, a, mb)]
        .into_iter()
        .filter_map(|(me, other, m)| m.map(|m| (me, other, m)))
        // Highest epoch; at equal epochs, the source's word.
        .max_by_key(|(_, _, m)| (m.epoch, m.role == Role::Source));
    match best {
        Some((me, _, m)) if m.role == Role::Source => Direction {
            source: me.clone(),
            epoch: m.epoch,
        },
        Some((_, other, m)) => Direction {
            source: other.clone(),
            epoch: m.epoch,
        },
        None => Direction {
            source: primary.clone(),
            epoch: 0,
        },
    }
}

/// `pair`'s manifest on `ep`'s host (through its runner, within
/// `opts.command_timeout`): `None` when the host has none yet. Fails with
/// an error naming the node and the manifest's path when the host cannot
/// be reached or the file cannot be read or parsed (`Backend`), and with
/// `Conflict` when the replica directory belongs to another pair.
pub async fn read_manifest(pair: &str, ep: &Endpoint, opts: &Options) -> Result<Option<Manifest>> {
    let host = Host::new(ep, opts);
    match host.read_manifest().await? {
        Some(m) if m.pair != pair => {
            Err(RsyncError::Conflict(other_pair(ep, &m.pair, pair)).into())
        }
        m => Ok(m),
    }
}

/// The direction on disk of `pair` between `a` and `b`: both manifests
/// read at once ([`read_manifest`]), then [`direction`]. A manifest that
/// cannot be read (its node down, another pair's directory) is left out,
/// and its error returned beside the direction for the caller to report;
/// if that hides the direction, operations on the unreachable side fail
/// as they would anyway, and a stale replicator is still refused by the
/// manifests it does reach.
pub async fn read_direction(
    pair: &str,
    primary: &NodeId,
    a: &Endpoint,
    b: &Endpoint,
    opts: &Options,
) -> (Direction, Vec<wspare_core::Error>) {
    let (ma, mb) = tokio::join!(read_manifest(pair, a, opts), read_manifest(pair, b, opts));
    let mut unread = Vec::new();
    let mut keep = |m: Result<Option<Manifest>>| {
        m.unwrap_or_else(|e| {
            unread.push(e);
            None
        })
    };
    let (ma, mb) = (keep(ma), keep(mb));
    let d = direction(primary, [(&a.node, ma.as_ref()), (&b.node, mb.as_ref())]);
    (d, unread)
}

/// The message for a replica directory on `ep` whose manifest belongs to
/// pair `found`, not `expected`.
pub(crate) fn other_pair(ep: &Endpoint, found: &str, expected: &str) -> String {
    format!(
        "replica directory {} on {} belongs to pair {found:?}, not {expected:?}: each pair needs a replica directory of its own",
        ep.replica_dir.display(),
        ep.node,
    )
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use wspare_core::runner::{Reply, ScriptedRunner};
    use wspare_core::ErrorKind;

    use super::*;
    use crate::config::Reach;

    fn n(s: &str) -> NodeId {
        NodeId::new(s).unwrap()
    }

    fn m(epoch: u64, role: Role) -> Option<Manifest> {
        Some(Manifest::new("web", epoch, role))
    }

    fn dir(ms: &[(&str, Option<Manifest>); 2]) -> (String, u64) {
        let [(a, ma), (b, mb)] = ms;
        let (a, b) = (n(a), n(b));
        let d = direction(&n("a"), [(&a, ma.as_ref()), (&b, mb.as_ref())]);
        (d.source.to_string(), d.epoch)
    }

    #[test]
    fn the_direction_follows_the_newest_manifest() {
        // New pair: the primary.
        assert_eq!(dir(&[("a", None), ("b", None)]), ("a".into(), 0));
        // First cycles: b is the target.
        assert_eq!(
            dir(&[("a", None), ("b", m(0, Role::Target))]),
            ("a".into(), 0)
        );
        // b took over and reversed; a was unreachable.
        assert_eq!(
            dir(&[("a", None), ("b", m(1, Role::Source))]),
            ("b".into(), 1)
        );
        // ... and reachable.
        assert_eq!(
            dir(&[("a", m(1, Role::Target)), ("b", m(1, Role::Source))]),
            ("b".into(), 1)
        );
        // Failback: a reversed again; b still has its old source manifest
        // (unreachable then).
        assert_eq!(
            dir(&[("a", m(2, Role::Source)), ("b", m(1, Role::Source))]),
            ("a".into(), 2)
        );
        // Only the target is readable: the other one is the source.
        assert_eq!(
            dir(&[("a", m(2, Role::Target)), ("b", None)]),
            ("b".into(), 2)
        );
    }

    fn ep(node: &str, dir: &str, reply: Reply) -> Endpoint {
        let r = ScriptedRunner::new().expect(&["cat", "--", &format!("{dir}/MANIFEST")], reply);
        Endpoint::new(n(node), Arc::new(r), Reach::Local, dir)
    }

    #[tokio::test]
    async fn a_manifest_is_read_or_absent_or_an_error_naming_node_and_path() {
        let opts = Options::default();
        let web = Manifest::new("web", 3, Role::Source);
        let got = read_manifest("web", &ep("a", "/srv/a", Reply::ok(web.to_json())), &opts).await;
        assert_eq!(got.unwrap(), Some(web.clone()));

        let absent = Reply::exit(1, "", "cat: /srv/a/MANIFEST: No such file or directory\n");
        let got = read_manifest("web", &ep("a", "/srv/a", absent), &opts).await;
        assert_eq!(got.unwrap(), None);

        let got = read_manifest("db", &ep("a", "/srv/a", Reply::ok(web.to_json())), &opts).await;
        let e = got.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Conflict);
        let msg = e.to_string();
        assert!(
            msg.contains("/srv/a") && msg.contains(" a ") && msg.contains("\"web\""),
            "{msg}"
        );

        let got = read_manifest("web", &ep("a", "/srv/a", Reply::ok("{not json")), &opts).await;
        let msg = got.unwrap_err().to_string();
        assert!(
            msg.contains("/srv/a/MANIFEST") && msg.contains("on a"),
            "{msg}"
        );

        let down = Reply::exit(
            255,
            "",
            "ssh: connect to host a port 22: Connection refused\n",
        );
        let got = read_manifest("web", &ep("a", "/srv/a", down), &opts).await;
        let e = got.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unreachable);
        let msg = e.to_string();
        assert!(
            msg.contains("/srv/a/MANIFEST") && msg.contains("a is unreachable"),
            "{msg}"
        );
    }

    #[tokio::test]
    async fn an_unreadable_manifest_is_left_out_and_reported() {
        let opts = Options::default();
        let a_target = Manifest::new("web", 2, Role::Target);
        let down = Reply::exit(
            255,
            "",
            "ssh: connect to host b port 22: Connection refused\n",
        );
        let (d, unread) = read_direction(
            "web",
            &n("a"),
            &ep("a", "/srv/a", Reply::ok(a_target.to_json())),
            &ep("b", "/srv/b", down),
            &opts,
        )
        .await;
        assert_eq!(
            d,
            Direction {
                source: n("b"),
                epoch: 2
            }
        );
        assert_eq!(unread.len(), 1);
        assert_eq!(unread[0].kind(), ErrorKind::Unreachable);
    }
}
