//! Who is in a group and who is online (an open event stream).

use super::*;

impl Relay {
    pub fn list_peers(&self, caller: &Caller, group: Option<&str>) -> Result<Vec<PeerInfo>> {
        let groups: Vec<String> = match group {
            Some(_) => vec![self.peer_in(caller, group)?.group_id],
            None => {
                let peers = self.active_peers(caller)?;
                if peers.is_empty() {
                    return Err(RelayError::NotRegistered);
                }
                peers.into_iter().map(|p| p.group_id).collect()
            }
        };
        debug_assert!(groups.iter().collect::<std::collections::HashSet<_>>().len() == groups.len());
        let mut out = Vec::new();
        for g in groups {
            for p in self.store.peers_in_group(&g)? {
                if p.left_at.is_some() {
                    continue;
                }
                out.push(PeerInfo {
                    online: self.is_online(&p),
                    peer_id: p.peer_id,
                    display_name: p.display_name,
                    kind: p.kind,
                    group_id: p.group_id,
                    hostname: p.hostname,
                    working_directory: p.working_directory,
                    git_branch: p.git_branch,
                    last_seen: p.last_seen,
                    joined_at: p.joined_at,
                });
            }
        }
        out.sort_by(|a, b| (&a.group_id, &a.display_name).cmp(&(&b.group_id, &b.display_name)));
        Ok(out)
    }

    /// A peer is online while it has an event stream open, or its daemon has one for its
    /// group, on any node.
    fn is_online(&self, peer: &PeerRecord) -> bool {
        let streams = lock(&self.streams);
        let open = |key: &str| streams.get(key).is_some_and(|n| *n > 0) || self.store.online_elsewhere(key);
        open(&peer.peer_id) || peer.daemon_id.as_ref().is_some_and(|d| open(&daemon_stream_key(d, &peer.group_id)))
    }

    pub fn stream_opened(&self, audience: &Audience, group_id: &str) {
        let key = audience.presence_key(group_id);
        let mut streams = lock(&self.streams);
        let count = streams.entry(key.clone()).or_default();
        *count += 1;
        if *count == 1 {
            self.store.set_online(&key, true);
        }
        drop(streams);
        self.metrics.stream_opened(audience.is_daemon());
        if let Audience::Peer(peer_id) = audience {
            let _ = self.store.touch_peer(peer_id, self.clock.now());
        }
    }

    pub fn stream_closed(&self, audience: &Audience, group_id: &str) {
        {
            let key = audience.presence_key(group_id);
            let mut streams = lock(&self.streams);
            if let Some(n) = streams.get_mut(&key) {
                *n -= 1;
                if *n == 0 {
                    streams.remove(&key);
                    self.store.set_online(&key, false);
                }
            }
        }
        self.metrics.stream_closed(audience.is_daemon());
        if let Audience::Peer(peer_id) = audience {
            let _ = self.store.touch_peer(peer_id, self.clock.now());
        }
        self.fanout.release(group_id);
    }
}

/// Who an event stream is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Audience {
    /// One peer: others' broadcasts, its DMs, membership changes.
    Peer(String),
    /// A daemon: every broadcast of the group, DMs to the peers it registered, membership.
    Daemon(String),
    /// A human in the console: what [`HumanView::sees`], rendered as HTML.
    Human(Box<super::HumanView>),
}

impl Audience {
    fn presence_key(&self, group_id: &str) -> String {
        match self {
            Audience::Peer(peer_id) => peer_id.clone(),
            Audience::Daemon(daemon_id) => daemon_stream_key(daemon_id, group_id),
            Audience::Human(view) => view.peer.peer_id.clone(),
        }
    }

    pub fn is_daemon(&self) -> bool {
        matches!(self, Audience::Daemon(_))
    }
}

fn daemon_stream_key(daemon_id: &str, group_id: &str) -> String {
    format!("{daemon_id}/{group_id}")
}
