//! Every node keeps the peers bucket in memory, indexed three ways, and follows its
//! changes: the tools ask "which peers has this token" and "who is in this group" on every
//! call, and a KV bucket answers neither without a scan. Writes go to the bucket first; a
//! read that must see another node's latest write waits for the mirror to reach the
//! bucket's head ([`PeerMirror::revision`]).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use super::super::{PeerRecord, PrincipalId};

type Origin = (String, String, String, Option<String>);

#[derive(Default)]
pub struct PeerMirror {
    peers: BTreeMap<String, (PeerRecord, u64)>,
    by_group: HashMap<String, BTreeSet<String>>,
    by_principal: HashMap<PrincipalId, BTreeSet<String>>,
    by_origin: HashMap<Origin, String>,
    /// The bucket's newest change the watch has brought: every change up to it is here.
    /// (This node's own writes are applied at once but do not move it: changes from other
    /// nodes below them may still be on their way.)
    revision: u64,
}

fn origin(p: &PeerRecord) -> Origin {
    (p.group_id.clone(), p.hostname.clone(), p.working_directory.clone(), p.requested_name.clone())
}

impl PeerMirror {
    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// Notes that the watch has brought every change up to `revision`.
    pub fn seen(&mut self, revision: u64) {
        self.revision = self.revision.max(revision);
    }

    /// Applies a record at `revision`, unless a newer one of the same peer is here already.
    pub fn apply(&mut self, peer: PeerRecord, revision: u64) {
        if let Some((old, old_revision)) = self.peers.get(&peer.peer_id) {
            if *old_revision >= revision {
                return;
            }
            let old = old.clone();
            self.unindex(&old);
        }
        self.by_group.entry(peer.group_id.clone()).or_default().insert(peer.peer_id.clone());
        self.by_principal.entry(peer.principal_id).or_default().insert(peer.peer_id.clone());
        self.by_origin.insert(origin(&peer), peer.peer_id.clone());
        self.peers.insert(peer.peer_id.clone(), (peer, revision));
    }

    fn unindex(&mut self, old: &PeerRecord) {
        if let Some(set) = self.by_group.get_mut(&old.group_id) {
            set.remove(&old.peer_id);
        }
        if let Some(set) = self.by_principal.get_mut(&old.principal_id) {
            set.remove(&old.peer_id);
        }
        let key = origin(old);
        if self.by_origin.get(&key) == Some(&old.peer_id) {
            self.by_origin.remove(&key);
        }
    }

    pub fn peer(&self, peer_id: &str) -> Option<(PeerRecord, u64)> {
        self.peers.get(peer_id).cloned()
    }

    pub fn by_origin(&self, group: &str, host: &str, dir: &str, name: Option<&str>) -> Option<PeerRecord> {
        let key = (group.to_owned(), host.to_owned(), dir.to_owned(), name.map(str::to_owned));
        self.by_origin.get(&key).and_then(|id| self.peers.get(id)).map(|(p, _)| p.clone())
    }

    pub fn in_group(&self, group: &str) -> Vec<PeerRecord> {
        self.collect(self.by_group.get(group))
    }

    pub fn of_principal(&self, principal: PrincipalId) -> Vec<PeerRecord> {
        self.collect(self.by_principal.get(&principal))
    }

    /// (Rare: the console asks, per page; a scan of the mirror, no index to keep.)
    pub fn of_daemon(&self, daemon_id: &str) -> Vec<PeerRecord> {
        self.peers.values().filter(|(p, _)| p.daemon_id.as_deref() == Some(daemon_id)).map(|(p, _)| p.clone()).collect()
    }

    fn collect(&self, ids: Option<&BTreeSet<String>>) -> Vec<PeerRecord> {
        ids.into_iter().flatten().filter_map(|id| self.peers.get(id)).map(|(p, _)| p.clone()).collect()
    }
}
