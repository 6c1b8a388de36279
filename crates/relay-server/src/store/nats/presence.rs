//! Who holds an event stream on which node. A node writes a key when its first stream for
//! a peer (or a daemon's group) opens and deletes it when the last one closes, so writes
//! follow streams, not time. Separately each node refreshes its own entry in `relay_nodes`,
//! whose entries expire: a node that died without deleting its keys stops counting once
//! its entry is older than the TTL, and the survivors sweep its keys away. Ages are taken
//! from this node's own clock (when the watch brought the entry), so clock skew between
//! machines cannot make a live node look dead. Each sweep also puts this node's own keys
//! right (a write that failed, or keys left by an earlier process of the same name).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use async_nats::jetstream::kv;
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::super::Result;
use super::{nats_error, subject_token};
use crate::lock;

pub struct Presence {
    changes: mpsc::UnboundedSender<(String, bool)>,
    nodes: kv::Store,
    view: Arc<Mutex<View>>,
    pub(super) node: String,
    ttl: Duration,
}

/// What this node knows of every node's streams.
#[derive(Default)]
struct View {
    /// Key token → nodes holding a stream for it.
    keys: HashMap<String, HashSet<String>>,
    /// Node token → when this node last heard it say it is alive.
    nodes: HashMap<String, Instant>,
}

impl View {
    fn alive(&self, node: &str, ttl: Duration) -> bool {
        self.nodes.get(node).is_some_and(|at| at.elapsed() < ttl)
    }
}

impl Presence {
    pub async fn start(keys: kv::Store, nodes: kv::Store, node: String, ttl: Duration, stop: CancellationToken) -> Result<Self> {
        let node = subject_token(&node);
        let view = Arc::new(Mutex::new(View::default()));
        nodes.put(&node, "".into()).await.map_err(nats_error)?;
        let key_watch = keys.watch_with_history(">").await.map_err(nats_error)?;
        let node_watch = nodes.watch_with_history(">").await.map_err(nats_error)?;
        tokio::spawn(follow(key_watch, view.clone(), stop.clone(), |view, entry| {
            let Some((key, holder)) = entry.key.rsplit_once('.') else { return };
            let holders = view.keys.entry(key.to_owned()).or_default();
            if entry.operation == kv::Operation::Put {
                holders.insert(holder.to_owned());
            } else {
                holders.remove(holder);
                if holders.is_empty() {
                    view.keys.remove(key);
                }
            }
        }));
        tokio::spawn(follow(node_watch, view.clone(), stop.clone(), |view, entry| {
            if entry.operation == kv::Operation::Put {
                view.nodes.insert(entry.key.clone(), Instant::now());
            } else {
                view.nodes.remove(&entry.key);
            }
        }));
        let (changes, rx) = mpsc::unbounded_channel();
        tokio::spawn(write(keys, nodes.clone(), rx, node.clone(), ttl, view.clone(), stop));
        Ok(Self { changes, nodes, view, node, ttl })
    }

    /// Says this node is alive: a write JetStream takes only with a quorum of its
    /// servers, so it also tells whether this node can serve.
    pub async fn beat(&self) -> Result<()> {
        self.nodes.put(&self.node, "".into()).await.map(drop).map_err(nats_error)
    }

    pub fn set(&self, key: &str, online: bool) {
        let _ = self.changes.send((subject_token(key), online));
    }

    pub fn online_elsewhere(&self, key: &str) -> bool {
        let view = lock(&self.view);
        let holders = view.keys.get(&subject_token(key));
        holders.is_some_and(|nodes| nodes.iter().any(|n| *n != self.node && view.alive(n, self.ttl)))
    }
}

async fn follow(mut watch: kv::Watch, view: Arc<Mutex<View>>, stop: CancellationToken, apply: impl Fn(&mut View, &kv::Entry)) {
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            next = watch.next() => match next {
                Some(Ok(entry)) => apply(&mut lock(&view), &entry),
                Some(Err(e)) => tracing::warn!(error = %e, "following presence"),
                None => {
                    tracing::error!("the presence watch ended; other nodes' streams no longer count here");
                    return;
                }
            },
        }
    }
}

/// Writes this node's changes in order, says it is alive every third of the TTL, and
/// sweeps away the keys of nodes that died.
async fn write(
    keys: kv::Store,
    nodes: kv::Store,
    mut changes: mpsc::UnboundedReceiver<(String, bool)>,
    node: String,
    ttl: Duration,
    view: Arc<Mutex<View>>,
    stop: CancellationToken,
) {
    let mut heartbeat = tokio::time::interval(ttl / 3);
    // the first sweep waits until the watches have brought every node's word
    let mut sweep = tokio::time::interval_at(Instant::now() + ttl, ttl);
    let mut mine: HashSet<String> = HashSet::new();
    loop {
        tokio::select! {
            () = stop.cancelled() => {
                // leaving cleanly: this node's streams are gone with it
                let _ = nodes.delete(&node).await;
                return;
            }
            change = changes.recv() => {
                let Some((key, online)) = change else { return };
                if online {
                    mine.insert(key.clone());
                } else {
                    mine.remove(&key);
                }
                record(&keys, &format!("{key}.{node}"), online).await;
            }
            _ = heartbeat.tick() => {
                if let Err(e) = nodes.put(&node, "".into()).await {
                    tracing::warn!(error = %e, "cannot say this node is alive");
                }
            }
            _ = sweep.tick() => {
                let (dead, wrong): (Vec<String>, Vec<(String, bool)>) = {
                    let view = lock(&view);
                    let dead = view
                        .keys
                        .iter()
                        .flat_map(|(key, holders)| holders.iter().filter(|n| **n != node && !view.alive(n, ttl)).map(move |n| format!("{key}.{n}")))
                        .collect();
                    let held_here = |key: &String| view.keys.get(key).is_some_and(|h| h.contains(&node));
                    let stale = view.keys.keys().filter(|k| held_here(k) && !mine.contains(*k)).map(|k| (k.clone(), false));
                    let missing = mine.iter().filter(|k| !held_here(k)).map(|k| (k.clone(), true));
                    (dead, stale.chain(missing).collect())
                };
                for entry in dead {
                    let _ = keys.delete(&entry).await;
                }
                for (key, online) in wrong {
                    record(&keys, &format!("{key}.{node}"), online).await;
                }
            }
        }
    }
}

async fn record(keys: &kv::Store, entry: &str, online: bool) {
    let written =
        if online { keys.put(entry, "".into()).await.map(drop).map_err(nats_error) } else { keys.delete(entry).await.map_err(nats_error) };
    if let Err(e) = written {
        tracing::warn!(error = %e, entry, online, "cannot record presence (the next sweep tries again)");
    }
}
