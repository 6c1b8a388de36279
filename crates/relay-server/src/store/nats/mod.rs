//! The cluster's store: every node keeps its state in NATS JetStream, so any node serves
//! any client and a node can die with nothing lost.
//!
//! | what | where | key / subject |
//! |---|---|---|
//! | group logs | stream `RELAY_LOG` | `relay.log.<group>` (sequence = SSE id) |
//! | groups | bucket `relay_groups` | group |
//! | token holders | bucket `relay_principals` | sha256(token), hex |
//! | daemons | bucket `relay_daemons` | sha256(token), hex |
//! | peers | bucket `relay_peers` (mirrored in memory by every node) | peer |
//! | message index | bucket `relay_messages` | `id.<message>`, `key.<sender>.<sha256(key)>` |
//! | delivery states | bucket `relay_deliveries` | message (all its recipients in one value) |
//! | open streams | bucket `relay_presence` | `<peer or daemon/group>.<node>` |
//! | live nodes | bucket `relay_nodes`, entries expire | node |
//! | limits (sends, new peers, join-key tries) | bucket `relay_rates`, idle entries expire | `send.<peer>`, `register.<address>`, `join-key/<group>/<address>` |
//! | console records (humans, sign-in links, sessions) | bucket `relay_console` | `<space>.<key>` |
//! | leases (one node at a time) | bucket `relay_leases`, entries expire | `register.<group>` |
//!
//! Receipts reach other nodes' streams as plain NATS messages on `relay.note.<group>`:
//! their state is in `relay_deliveries`; the note only saves a reader the asking.
//! Names that are not plain `[A-Za-z0-9_-]` are hex-encoded behind a `=`.
//!
//! Here: the store itself. `log` reads the group logs, `peers` is the in-memory copy of
//! the peers bucket, `follow` feeds this node's streams, `presence` and `rates` are the
//! shared presence and limits, `leases` hold a name for one node at a time, `buckets`
//! opens buckets, `bridge` joins the synchronous trait to the asynchronous client, and
//! `check` is `relay-server cluster check`.

mod bridge;
mod buckets;
pub mod check;
mod follow;
mod leases;
mod log;
mod peers;
mod presence;
mod rates;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, kv, stream};
use async_nats::{Client, HeaderMap, ServerAddr};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::StreamExt;
use relay_proto::DeliveryState;
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use super::{
    DeliveryRecord, Following, GroupNews, GroupRecord, Held, LogEntry, LogQuery, NewEntry, PeerRecord, PrincipalId, Result, Shared, Store,
    StoreError,
};
use crate::lock;
use bridge::Bridge;
use buckets::{create, lost_race, open_bucket};
use follow::{follow_group, note_subject};
use peers::PeerMirror;
use presence::Presence;
use rates::RateSlot;

pub const LOG_STREAM: &str = "RELAY_LOG";
pub const BUCKETS: [&str; 11] = [
    "relay_groups",
    "relay_principals",
    "relay_daemons",
    "relay_peers",
    "relay_messages",
    "relay_deliveries",
    "relay_console",
    "relay_presence",
    "relay_nodes",
    "relay_rates",
    "relay_leases",
];
/// A send limit's bucket left alone this long is full again anyway: it may go.
const RATES_KEPT: Duration = Duration::from_secs(3600);

/// How long a node keeps trying to reach NATS and set up its streams when it starts.
const STARTUP: Duration = Duration::from_secs(60);
/// How long one JetStream request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How long `/healthz` waits for JetStream to take a write.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(2);
/// A message id not (yet) in the index is looked up again this often, this long apart.
const INDEX_WAITS: usize = 3;
const INDEX_WAIT: Duration = Duration::from_millis(20);
/// How long a read waits for this node's peer mirror to reach another node's write.
const MIRROR_WAIT: Duration = Duration::from_secs(2);

/// Where the cluster's NATS is and how this node takes part.
#[derive(Debug, Clone)]
pub struct NatsOptions {
    pub urls: Vec<String>,
    pub replicas: usize,
    pub node: String,
    pub presence_ttl: Duration,
    /// How long the log keeps a message; `None` leaves the stream as it is (kept forever
    /// when a node created it).
    pub log_max_age: Option<Duration>,
}

pub struct NatsStore {
    bridge: Bridge,
    inner: Arc<Inner>,
    stop: CancellationToken,
}

struct Inner {
    client: Client,
    js: jetstream::Context,
    log: stream::Stream,
    groups: kv::Store,
    principals: kv::Store,
    daemons: kv::Store,
    peers: kv::Store,
    messages: kv::Store,
    deliveries: kv::Store,
    console: kv::Store,
    rates: kv::Store,
    leases: kv::Store,
    /// Per send limit: what this node last wrote of it, and its turn to take.
    rate_slots: Mutex<HashMap<String, RateSlot>>,
    mirror: Mutex<PeerMirror>,
    presence: Presence,
}

pub(crate) fn nats_error(e: impl std::fmt::Display) -> StoreError {
    let text = e.to_string();
    if text.contains("no responders") || text.contains("timed out") || text.contains("temporarily unavailable") {
        return StoreError::Nats(format!("JetStream does not answer (no quorum, or no NATS server reachable): {text}"));
    }
    StoreError::Nats(text)
}

/// A name as a NATS subject token or key part: itself when plain, else `=` and its hex.
pub(crate) fn subject_token(name: &str) -> String {
    if !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
        name.to_owned()
    } else {
        format!("={}", hex::encode(name))
    }
}

fn json<T: serde::Serialize>(value: &T) -> Bytes {
    serde_json::to_vec(value).expect("records serialize").into()
}

fn parse<T: serde::de::DeserializeOwned>(what: &str, bytes: &[u8]) -> Result<T> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt(format!("{what}: {e}")))
}

impl NatsStore {
    /// Connects, creates the streams and buckets that are missing (with `replicas`
    /// copies), loads the peers and starts following their changes. Keeps trying for a
    /// minute while NATS starts or elects its leaders.
    pub fn open(options: NatsOptions) -> Result<Self> {
        let bridge = Bridge::new()?;
        let stop = CancellationToken::new();
        let inner = bridge.call(Inner::connect(options, stop.clone()))?;
        Ok(Self { bridge, inner, stop })
    }

    fn call<T: Send + 'static, F>(&self, work: impl FnOnce(Arc<Inner>) -> F) -> Result<T>
    where
        F: Future<Output = Result<T>> + Send + 'static,
    {
        self.bridge.call(work(self.inner.clone()))
    }

    /// Peers read from memory; `fresh` first waits until the mirror holds every change
    /// made so far, on any node.
    fn mirror<T>(&self, fresh: bool, read: impl Fn(&PeerMirror) -> T) -> Result<T> {
        if fresh {
            self.call(|inner| async move { inner.catch_up().await })?;
        }
        Ok(read(&lock(&self.inner.mirror)))
    }
}

/// For `relay-server migrate`, which fills an empty cluster with nothing else running.
impl NatsStore {
    /// Whether the cluster holds no relay data yet.
    pub fn is_empty(&self) -> Result<bool> {
        self.call(|inner| async move {
            let mut log = inner.log.clone();
            let entries = log.info().await.map_err(nats_error)?.state.messages;
            let groups = inner.groups.status().await.map_err(nats_error)?.info.state.messages;
            let peers = inner.peers.status().await.map_err(nats_error)?.info.state.messages;
            Ok(entries + groups + peers == 0)
        })
    }

    /// Makes the log's next sequence number `next` (or keeps it, when it is past that).
    pub fn start_log_at(&self, next: u64) -> Result<()> {
        self.call(|inner| async move {
            let mut log = inner.log.clone();
            if log.info().await.map_err(nats_error)?.state.last_sequence + 1 < next {
                log.purge().sequence(next).await.map_err(nats_error)?;
            }
            Ok(())
        })
    }

    /// Stores a token holder under the id it had.
    pub fn import_principal(&self, token_hash: &[u8; 32], id: PrincipalId) -> Result<()> {
        let key = hex::encode(token_hash);
        self.call(|inner| async move { create(&inner.principals, key, id.to_string().into(), "token".into()).await })
    }
}

impl Drop for NatsStore {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Inner {
    async fn connect(options: NatsOptions, stop: CancellationToken) -> Result<Arc<Self>> {
        let servers = server_addrs(&options.urls)?;
        let deadline = Instant::now() + STARTUP;
        let mut last_error = String::new();
        while Instant::now() < deadline {
            match Self::try_connect(&options, servers.clone(), &stop).await {
                Ok(inner) => return Ok(inner),
                Err(e) => {
                    if last_error != e.to_string() {
                        tracing::warn!(error = %e, "cannot set up the cluster's NATS yet; retrying");
                        last_error = e.to_string();
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
        Err(StoreError::Nats(format!("gave up after {}s: {last_error}", STARTUP.as_secs())))
    }

    async fn try_connect(options: &NatsOptions, servers: Vec<ServerAddr>, stop: &CancellationToken) -> Result<Arc<Self>> {
        let client = async_nats::ConnectOptions::new()
            .name(format!("relay-server {}", options.node))
            .connection_timeout(Duration::from_secs(5))
            .request_timeout(Some(REQUEST_TIMEOUT))
            .connect(servers)
            .await
            .map_err(|e| StoreError::Nats(format!("cannot connect to {}: {e}", options.urls.join(","))))?;
        let mut js = jetstream::new(client.clone());
        js.set_timeout(REQUEST_TIMEOUT);
        let mut log = js
            .get_or_create_stream(stream::Config {
                name: LOG_STREAM.into(),
                description: Some("relay: every group's log, one subject per group".into()),
                subjects: vec!["relay.log.>".into()],
                num_replicas: options.replicas,
                storage: stream::StorageType::File,
                allow_direct: true,
                duplicate_window: Duration::from_secs(120),
                max_age: options.log_max_age.unwrap_or_default(),
                ..Default::default()
            })
            .await
            .map_err(|e| StoreError::Nats(format!("cannot create the stream {LOG_STREAM}: {e}")))?;
        // a retention set since the stream was made (by an operator's config, on any node)
        let kept = log.cached_info().config.clone();
        if let Some(max_age) = options.log_max_age.filter(|age| *age != kept.max_age) {
            js.update_stream(stream::Config { max_age, ..kept })
                .await
                .map_err(|e| StoreError::Nats(format!("cannot set how long {LOG_STREAM} keeps messages: {e}")))?;
            log = js.get_stream(LOG_STREAM).await.map_err(nats_error)?;
            tracing::info!(days = max_age.as_secs() / 86_400, "{LOG_STREAM} keeps messages for this long now");
        }
        let bucket = |name: &'static str, storage, max_age| {
            let config =
                kv::Config { bucket: name.into(), history: 1, num_replicas: options.replicas, storage, max_age, ..Default::default() };
            open_bucket(js.clone(), config)
        };
        let file = stream::StorageType::File;
        let memory = stream::StorageType::Memory;
        let inner = Arc::new(Self {
            groups: bucket("relay_groups", file, Duration::ZERO).await?,
            principals: bucket("relay_principals", file, Duration::ZERO).await?,
            daemons: bucket("relay_daemons", file, Duration::ZERO).await?,
            peers: bucket("relay_peers", file, Duration::ZERO).await?,
            messages: bucket("relay_messages", file, Duration::ZERO).await?,
            deliveries: bucket("relay_deliveries", file, Duration::ZERO).await?,
            console: bucket("relay_console", file, Duration::ZERO).await?,
            rates: bucket("relay_rates", memory, RATES_KEPT).await?,
            leases: bucket("relay_leases", memory, leases::LEASE_FOR).await?,
            rate_slots: Mutex::default(),
            presence: Presence::start(
                bucket("relay_presence", memory, Duration::ZERO).await?,
                bucket("relay_nodes", memory, options.presence_ttl).await?,
                options.node.clone(),
                options.presence_ttl,
                stop.clone(),
            )
            .await?,
            mirror: Mutex::default(),
            client,
            js,
            log,
        });
        inner.clone().follow_peers(stop.clone()).await?;
        Ok(inner)
    }

    /// Loads the peers bucket into the mirror, then applies each change as it comes.
    async fn follow_peers(self: Arc<Self>, stop: CancellationToken) -> Result<()> {
        let head = self.peers_head().await?;
        let mut watch = self.peers.watch_with_history(">").await.map_err(nats_error)?;
        // the history first, so the node starts with every peer
        while lock(&self.mirror).revision() < head {
            match tokio::time::timeout(REQUEST_TIMEOUT, watch.next()).await {
                Ok(Some(Ok(entry))) => self.apply_peer(&entry)?,
                Ok(Some(Err(e))) => return Err(nats_error(e)),
                Ok(None) | Err(_) => return Err(StoreError::Nats("loading the peers stopped short".into())),
            }
        }
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    next = watch.next() => match next {
                        Some(Ok(entry)) => {
                            if let Err(e) = self.apply_peer(&entry) {
                                tracing::error!(error = %e, key = entry.key, "ignoring a peer record");
                            }
                        }
                        Some(Err(e)) => tracing::warn!(error = %e, "following the peers bucket"),
                        None => {
                            tracing::error!("the peers bucket's watch ended; this node's peer list goes stale");
                            return;
                        }
                    },
                }
            }
        });
        Ok(())
    }

    fn apply_peer(&self, entry: &kv::Entry) -> Result<()> {
        let mut mirror = lock(&self.mirror);
        mirror.seen(entry.revision);
        // (peers are never deleted, only marked as left)
        if entry.operation == kv::Operation::Put {
            mirror.apply(parse("peer record", &entry.value)?, entry.revision);
        }
        Ok(())
    }

    async fn peers_head(&self) -> Result<u64> {
        let status = self.peers.status().await.map_err(nats_error)?;
        Ok(status.info.state.last_sequence)
    }

    /// Waits until the mirror holds every peer change made so far.
    async fn catch_up(&self) -> Result<()> {
        let head = self.peers_head().await?;
        let deadline = Instant::now() + MIRROR_WAIT;
        while lock(&self.mirror).revision() < head {
            if Instant::now() > deadline {
                return Err(StoreError::Nats("this node's peer list is behind the cluster's".into()));
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        Ok(())
    }

    /// Writes a whole peer record. The caller read it from this node's mirror, which may
    /// miss another node's move of the read cursor or last-seen time a moment ago: those
    /// only ever rise, and the later of each is kept.
    async fn save_peer(&self, mut peer: PeerRecord) -> Result<()> {
        let key = subject_token(&peer.peer_id);
        loop {
            let current = self.peers.entry(&key).await.map_err(nats_error)?.filter(|e| e.operation == kv::Operation::Put);
            let written = match &current {
                Some(entry) => {
                    let stored: PeerRecord = parse("peer record", &entry.value)?;
                    peer.read_seq = peer.read_seq.max(stored.read_seq);
                    peer.last_seen = peer.last_seen.max(stored.last_seen);
                    let update = self.peers.update(&key, json(&peer), entry.revision).await;
                    update.map_err(|e| (lost_race(&e, e.kind() == kv::UpdateErrorKind::WrongLastRevision), e.to_string()))
                }
                None => {
                    let create = self.peers.create(&key, json(&peer)).await;
                    create.map_err(|e| (lost_race(&e, e.kind() == kv::CreateErrorKind::AlreadyExists), e.to_string()))
                }
            };
            match written {
                Ok(revision) => {
                    lock(&self.mirror).apply(peer, revision);
                    return Ok(());
                }
                Err((true, _)) => continue,
                Err((false, e)) => return Err(StoreError::Nats(e)),
            }
        }
    }

    /// Changes one peer's record in place if `change` says so (`true`), retrying when
    /// another node changed it first; whether it changed.
    async fn update_peer(&self, peer_id: &str, change: impl Fn(&mut PeerRecord) -> bool) -> Result<bool> {
        let key = subject_token(peer_id);
        loop {
            let Some(entry) = self.peers.entry(&key).await.map_err(nats_error)? else { return Ok(false) };
            if entry.operation != kv::Operation::Put {
                return Ok(false);
            }
            let mut peer: PeerRecord = parse("peer record", &entry.value)?;
            if !change(&mut peer) {
                return Ok(false);
            }
            match self.peers.update(&key, json(&peer), entry.revision).await {
                Ok(revision) => {
                    lock(&self.mirror).apply(peer, revision);
                    return Ok(true);
                }
                Err(e) if lost_race(&e, e.kind() == kv::UpdateErrorKind::WrongLastRevision) => continue,
                Err(e) => return Err(nats_error(e)),
            }
        }
    }

    async fn append(&self, entry: NewEntry) -> Result<LogEntry> {
        let mut headers = HeaderMap::new();
        // a retried publish (or a retried send with the same key) is stored once
        let dedupe = match &entry.idempotency_key {
            Some(key) => format!("key:{}:{}", entry.sender_id, hex::encode(Sha256::digest(key.as_bytes()))),
            None => entry.id.clone(),
        };
        headers.insert("Nats-Msg-Id", dedupe.as_str());
        let ack = self
            .js
            .publish_with_headers(log::subject(&entry.group_id), headers, log::encode(&entry))
            .await
            .map_err(nats_error)?
            .await
            .map_err(|e| StoreError::Unconfirmed(e.to_string()))?;
        let stored = if ack.duplicate { self.entry_at(ack.sequence).await? } else { None };
        let stored = match stored {
            Some(earlier) => earlier,
            None => log::decode(ack.sequence, &log::encode(&entry))?,
        };
        // The indexes follow the log. The entry is sent once stored, so an index that cannot
        // be written is no reason to say otherwise: its message is then found in its group's
        // log and streams, not by id (a send retried with its key writes the index again).
        let location = format!("{}/{}", stored.group_id, stored.seq);
        let mut indexes = vec![(format!("id.{}", subject_token(&stored.id)), Bytes::from(location))];
        if let Some(key) = &entry.idempotency_key {
            indexes.push((key_index(&entry.sender_id, key), stored.id.clone().into()));
        }
        let writes = indexes.into_iter().map(|(key, value)| async move {
            if let Err(e) = self.messages.put(&key, value).await {
                tracing::error!(error = %e, key, "a stored message's index was not written");
            }
        });
        futures::future::join_all(writes).await;
        Ok(stored)
    }

    /// The entry at `seq`: from any replica, and from the leader when a replica has not
    /// got it yet (an index can name an entry a moment old).
    async fn entry_at(&self, seq: u64) -> Result<Option<LogEntry>> {
        match self.log.direct_get(seq).await {
            Ok(message) => return Ok(Some(log::decode(message.sequence, &message.payload)?)),
            Err(e) if e.kind() == stream::DirectGetErrorKind::NotFound => {}
            Err(e) => return Err(nats_error(e)),
        }
        match self.log.get_raw_message(seq).await {
            Ok(message) => Ok(Some(log::decode(message.sequence, &message.payload)?)),
            Err(e) if e.kind() == stream::RawMessageErrorKind::NoMessageFound => Ok(None),
            Err(e) => Err(nats_error(e)),
        }
    }

    async fn entry_by_id(&self, id: &str) -> Result<Option<LogEntry>> {
        let key = format!("id.{}", subject_token(id));
        let mut location = self.messages.get(&key).await.map_err(nats_error)?;
        // a message other nodes already stream is indexed a moment after it is stored
        for _ in 0..INDEX_WAITS {
            if location.is_some() {
                break;
            }
            tokio::time::sleep(INDEX_WAIT).await;
            location = self.messages.get(&key).await.map_err(nats_error)?;
        }
        let Some(location) = location else { return Ok(None) };
        let location = String::from_utf8_lossy(&location).into_owned();
        let seq = location.rsplit('/').next().and_then(|s| s.parse().ok());
        let seq = seq.ok_or_else(|| StoreError::Corrupt(format!("message index of {id}: {location}")))?;
        Ok(self.entry_at(seq).await?.filter(|e| e.id == id))
    }

    async fn deliveries(&self, message_id: &str) -> Result<(Vec<DeliveryRecord>, u64)> {
        match self.deliveries.entry(subject_token(message_id)).await.map_err(nats_error)? {
            Some(entry) if entry.operation == kv::Operation::Put => Ok((parse("delivery records", &entry.value)?, entry.revision)),
            _ => Ok((Vec::new(), 0)),
        }
    }

    /// Replaces one recipient's record among the message's if `forward_only` allows (its
    /// state moves forward), retrying when another node changed them first; whether it did.
    async fn save_delivery(&self, record: DeliveryRecord, forward_only: bool) -> Result<bool> {
        let key = subject_token(&record.message_id);
        loop {
            let (mut records, revision) = self.deliveries(&record.message_id).await?;
            let current = records.iter().find(|r| r.peer_id == record.peer_id).map_or(DeliveryState::Stored, |r| r.state);
            if forward_only && !current.can_move_to(record.state) {
                return Ok(false);
            }
            records.retain(|r| r.peer_id != record.peer_id);
            records.push(record.clone());
            let written = if revision == 0 {
                self.deliveries
                    .create(&key, json(&records))
                    .await
                    .map(|_| ())
                    .map_err(|e| (lost_race(&e, e.kind() == kv::CreateErrorKind::AlreadyExists), e.to_string()))
            } else {
                self.deliveries
                    .update(&key, json(&records), revision)
                    .await
                    .map(|_| ())
                    .map_err(|e| (lost_race(&e, e.kind() == kv::UpdateErrorKind::WrongLastRevision), e.to_string()))
            };
            match written {
                Ok(()) => return Ok(true),
                Err((true, _)) => continue,
                Err((false, e)) => return Err(StoreError::Nats(e)),
            }
        }
    }
}

/// The servers to connect to; a URL that cannot work is an error at once, not after a
/// minute of retries. Commas separate URLs within an entry too.
fn server_addrs(urls: &[String]) -> Result<Vec<ServerAddr>> {
    let urls: Vec<&str> = urls.iter().flat_map(|u| u.split(',')).map(str::trim).filter(|u| !u.is_empty()).collect();
    if urls.is_empty() {
        return Err(StoreError::Nats("no NATS server URL given".into()));
    }
    urls.iter().map(|u| u.parse::<ServerAddr>().map_err(|e| StoreError::Nats(format!("invalid NATS URL {u:?}: {e}")))).collect()
}

fn key_index(sender_id: &str, key: &str) -> String {
    format!("key.{}.{}", subject_token(sender_id), hex::encode(Sha256::digest(key.as_bytes())))
}

impl Store for NatsStore {
    fn group(&self, group_id: &str) -> Result<Option<GroupRecord>> {
        let key = subject_token(group_id);
        self.call(|inner| async move {
            let value = inner.groups.get(key).await.map_err(nats_error)?;
            value.map(|v| parse("group record", &v)).transpose()
        })
    }

    fn create_group(&self, group: &GroupRecord) -> Result<()> {
        let (key, value, what) = (subject_token(&group.group_id), json(group), format!("group {}", group.group_id));
        self.call(|inner| async move { create(&inner.groups, key, value, what).await })
    }

    fn create_principal(&self, token_hash: &[u8; 32], _at: DateTime<Utc>) -> Result<PrincipalId> {
        let key = hex::encode(token_hash);
        self.call(|inner| async move {
            // no counter to share: a random id, positive so it reads like the others
            let mut bytes = [0u8; 8];
            getrandom::fill(&mut bytes).map_err(|e| StoreError::Nats(format!("no randomness: {e}")))?;
            let id = (i64::from_le_bytes(bytes) & i64::MAX).max(1);
            create(&inner.principals, key, id.to_string().into(), "token".into()).await?;
            Ok(id)
        })
    }

    fn principal_by_token(&self, token_hash: &[u8; 32]) -> Result<Option<PrincipalId>> {
        let key = hex::encode(token_hash);
        self.call(|inner| async move {
            let Some(value) = inner.principals.get(key).await.map_err(nats_error)? else { return Ok(None) };
            let id = String::from_utf8_lossy(&value).parse().map_err(|_| StoreError::Corrupt("a principal id".into()))?;
            Ok(Some(id))
        })
    }

    fn create_daemon(&self, daemon_id: &str, token_hash: &[u8; 32], _hostname: &str, _at: DateTime<Utc>) -> Result<()> {
        let (key, value) = (hex::encode(token_hash), Bytes::from(daemon_id.to_owned()));
        self.call(|inner| async move { create(&inner.daemons, key, value, "daemon token".into()).await })
    }

    fn daemon_by_token(&self, token_hash: &[u8; 32]) -> Result<Option<String>> {
        let key = hex::encode(token_hash);
        self.call(|inner| async move {
            let value = inner.daemons.get(key).await.map_err(nats_error)?;
            Ok(value.map(|v| String::from_utf8_lossy(&v).into_owned()))
        })
    }

    fn peer(&self, peer_id: &str) -> Result<Option<PeerRecord>> {
        if let Some((peer, _)) = self.mirror(false, |m| m.peer(peer_id))? {
            return Ok(Some(peer));
        }
        // perhaps registered through another node a moment ago
        Ok(self.mirror(true, |m| m.peer(peer_id))?.map(|(peer, _)| peer))
    }

    fn peer_by_origin(
        &self,
        group_id: &str,
        hostname: &str,
        working_directory: &str,
        requested_name: Option<&str>,
    ) -> Result<Option<PeerRecord>> {
        self.mirror(true, |m| m.by_origin(group_id, hostname, working_directory, requested_name))
    }

    fn peers_in_group(&self, group_id: &str) -> Result<Vec<PeerRecord>> {
        self.mirror(false, |m| m.in_group(group_id))
    }

    fn peers_of_principal(&self, principal: PrincipalId) -> Result<Vec<PeerRecord>> {
        // a token's peers decide what every call may do: never from a stale list
        self.mirror(true, |m| m.of_principal(principal))
    }

    fn peers_of_daemon(&self, daemon_id: &str) -> Result<Vec<PeerRecord>> {
        self.mirror(true, |m| m.of_daemon(daemon_id))
    }

    fn save_peer(&self, peer: &PeerRecord) -> Result<()> {
        let peer = peer.clone();
        self.call(|inner| async move { inner.save_peer(peer).await })
    }

    fn advance_read_seq(&self, peer_id: &str, from: u64, to: u64) -> Result<bool> {
        let peer_id = peer_id.to_owned();
        self.call(|inner| async move {
            inner
                .update_peer(&peer_id, |p| {
                    let at = p.read_seq == from;
                    if at {
                        p.read_seq = to;
                    }
                    at
                })
                .await
        })
    }

    fn touch_peer(&self, peer_id: &str, at: DateTime<Utc>) -> Result<()> {
        let peer_id = peer_id.to_owned();
        self.call(|inner| async move {
            inner
                .update_peer(&peer_id, |p| {
                    p.last_seen = at;
                    true
                })
                .await
        })
        .map(drop)
    }

    fn append(&self, entry: NewEntry) -> Result<LogEntry> {
        self.call(|inner| async move { inner.append(entry).await })
    }

    fn head_seq(&self, group_id: &str) -> Result<u64> {
        let group_id = group_id.to_owned();
        self.call(|inner| async move { Ok(log::last_at_or_before(&inner.client, &group_id, None).await?.map_or(0, |(seq, _)| seq)) })
    }

    fn entries(&self, query: &LogQuery) -> Result<Vec<LogEntry>> {
        let query = query.clone();
        self.call(|inner| async move { log::entries(&inner.client, &inner.log, &query).await })
    }

    fn entry_by_id(&self, id: &str) -> Result<Option<LogEntry>> {
        let id = id.to_owned();
        self.call(|inner| async move { inner.entry_by_id(&id).await })
    }

    fn entry_by_key(&self, sender_id: &str, key: &str) -> Result<Option<LogEntry>> {
        let index = key_index(sender_id, key);
        self.call(|inner| async move {
            let Some(id) = inner.messages.get(index).await.map_err(nats_error)? else { return Ok(None) };
            inner.entry_by_id(&String::from_utf8_lossy(&id)).await
        })
    }

    fn delivery(&self, message_id: &str, peer_id: &str) -> Result<Option<DeliveryRecord>> {
        Ok(self.deliveries(message_id)?.into_iter().find(|r| r.peer_id == peer_id))
    }

    fn deliveries(&self, message_id: &str) -> Result<Vec<DeliveryRecord>> {
        let message_id = message_id.to_owned();
        self.call(|inner| async move { Ok(inner.deliveries(&message_id).await?.0) })
    }

    fn save_delivery(&self, record: &DeliveryRecord) -> Result<()> {
        let record = record.clone();
        self.call(|inner| async move { inner.save_delivery(record, false).await }).map(drop)
    }

    fn advance_delivery(&self, record: &DeliveryRecord) -> Result<bool> {
        let record = record.clone();
        self.call(|inner| async move { inner.save_delivery(record, true).await })
    }

    // (the bucket has no per-key expiry: expired records stay until replaced or taken, and
    // their readers, who check expiry, ignore them)
    fn record(&self, space: &str, key: &str) -> Result<Option<Vec<u8>>> {
        let key = record_key(space, key);
        self.call(|inner| async move { Ok(inner.console.get(key).await.map_err(nats_error)?.map(|v| v.to_vec())) })
    }

    fn put_record(&self, space: &str, key: &str, value: &[u8], _expires: Option<DateTime<Utc>>) -> Result<()> {
        let (key, value) = (record_key(space, key), Bytes::copy_from_slice(value));
        self.call(|inner| async move { inner.console.put(key, value).await.map(drop).map_err(nats_error) })
    }

    fn take_record(&self, space: &str, key: &str) -> Result<Option<Vec<u8>>> {
        let key = record_key(space, key);
        self.call(|inner| async move {
            let Some(entry) = inner.console.entry(key.clone()).await.map_err(nats_error)? else { return Ok(None) };
            if entry.operation != kv::Operation::Put {
                return Ok(None);
            }
            // only the taker whose purge finds the revision it read gets the value
            match inner.console.purge_expect_revision(&key, Some(entry.revision)).await {
                Ok(()) => Ok(Some(entry.value.to_vec())),
                Err(e) if lost_race(&e, false) => Ok(None),
                Err(e) => Err(nats_error(e)),
            }
        })
    }
}

fn record_key(space: &str, key: &str) -> String {
    format!("{}.{}", subject_token(space), subject_token(key))
}

impl Shared for NatsStore {
    fn shared(&self) -> bool {
        true
    }

    fn hold(&self, name: &str) -> Result<Held> {
        let key = subject_token(name);
        let revision = self.call(|inner| {
            let key = key.clone();
            async move { inner.take_lease(&key).await }
        })?;
        Ok(Box::new(leases::Lease::new(self.inner.clone(), self.bridge.handle().clone(), key, revision)))
    }

    fn follow(&self, group_id: &str, after_seq: u64, news: Arc<dyn GroupNews>) -> Result<Following> {
        let stop = self.stop.child_token();
        self.bridge.handle().spawn(follow_group(self.inner.clone(), group_id.to_owned(), after_seq, news, stop.clone()));
        Ok(Box::new(stop.drop_guard()))
    }

    fn share(&self, group_id: &str, note: Vec<u8>) {
        let (client, subject) = (self.inner.client.clone(), note_subject(group_id));
        self.bridge.handle().spawn(async move {
            if let Err(e) = client.publish(subject, note.into()).await {
                tracing::warn!(error = %e, "cannot share a receipt with the other nodes");
            }
        });
    }

    fn set_online(&self, key: &str, online: bool) {
        self.inner.presence.set(key, online);
    }

    fn online_elsewhere(&self, key: &str) -> bool {
        self.inner.presence.online_elsewhere(key)
    }

    fn take_token(&self, key: &str, per_second: f64, burst: u32) -> Result<std::result::Result<(), Duration>> {
        let key = key.to_owned();
        self.call(|inner| async move { inner.take_token(&key, per_second, burst).await })
    }

    fn give_token(&self, key: &str, per_second: f64, burst: u32) -> Result<()> {
        let key = key.to_owned();
        self.call(|inner| async move { inner.give_token(&key, per_second, burst).await })
    }

    fn unhealthy(&self) -> Option<String> {
        // a write, not a read: a lone NATS server that lost its peers still answers reads
        let checked = self.call(|inner| async move {
            match tokio::time::timeout(HEALTH_TIMEOUT, inner.presence.beat()).await {
                Ok(beat) => beat,
                Err(_) => Err(StoreError::Nats(format!("JetStream took no write within {}s (no quorum?)", HEALTH_TIMEOUT.as_secs()))),
            }
        });
        checked.err().map(|e| e.to_string())
    }
}

/// The store contract against a real NATS server (skipped, by name, where none is
/// installed outside CI).
#[cfg(test)]
mod tests {
    use super::super::contract;
    use super::*;
    use relay_e2e::nats::NatsCluster;

    fn options(nats: &NatsCluster, node: &str) -> NatsOptions {
        NatsOptions { urls: vec![nats.urls()], replicas: 1, node: node.into(), presence_ttl: Duration::from_secs(30), log_max_age: None }
    }

    fn store(test: &str) -> Option<(NatsStore, NatsCluster)> {
        let cluster = NatsCluster::start(test, 1)?;
        Some((NatsStore::open(options(&cluster, "test-node")).expect("open the NATS store"), cluster))
    }

    #[test]
    fn groups() {
        let Some((store, _nats)) = store("nats::groups") else { return };
        contract::groups(&store);
    }

    #[test]
    fn principals_and_peers() {
        let Some((store, _nats)) = store("nats::principals_and_peers") else { return };
        contract::principals_and_peers(&store);
    }

    #[test]
    fn peer_lists_follow_writes() {
        let Some((store, _nats)) = store("nats::peer_lists_follow_writes") else { return };
        contract::peer_lists_follow_writes(&store);
    }

    #[test]
    fn log() {
        let Some((store, _nats)) = store("nats::log") else { return };
        contract::log(&store);
        contract::idempotency_keys(&store);
        contract::long_logs(&store);
    }

    #[test]
    fn deliveries() {
        let Some((store, _nats)) = store("nats::deliveries") else { return };
        contract::deliveries(&store);
    }

    #[test]
    fn records() {
        let Some((store, _nats)) = store("nats::records") else { return };
        contract::records(&store);
    }

    #[test]
    fn a_lease_is_held_by_one_node_at_a_time_and_runs_out_if_its_node_dies() {
        let Some((store, nats)) = store("nats::leases") else { return };
        let other = NatsStore::open(options(&nats, "other-node")).expect("a second node");
        let held = store.hold("register.g").unwrap();
        let (taken, took) = std::sync::mpsc::channel();
        let waiter = std::thread::spawn(move || {
            let started = Instant::now();
            let lease = other.hold("register.g").unwrap();
            taken.send(started.elapsed()).unwrap();
            drop(lease);
            other
        });
        drop(store.hold("register.another").unwrap());
        std::thread::sleep(Duration::from_millis(300));
        assert!(took.try_recv().is_err(), "taken while held");
        drop(held);
        let waited = took.recv_timeout(Duration::from_secs(5)).expect("taken once let go");
        assert!(waited >= Duration::from_millis(300), "{waited:?}");
        let _other = waiter.join().unwrap();
        // a node died holding it (never let go): taken once the bucket's age limit ends it
        std::mem::forget(store.hold("register.h").unwrap());
        let started = Instant::now();
        drop(store.hold("register.h").unwrap());
        let waited = started.elapsed();
        assert!(waited >= Duration::from_secs(3) && waited < Duration::from_secs(9), "{waited:?}");
    }

    #[test]
    fn the_log_keeps_messages_as_long_as_configured_and_otherwise_as_it_was() {
        let Some(nats) = NatsCluster::start("nats::log_max_age", 1) else { return };
        let max_age = |store: &NatsStore| store.call(|inner| async move { Ok(inner.log.cached_info().config.max_age) }).unwrap();
        let days = |n: u64| Some(Duration::from_secs(n * 86_400));
        let opened = |log_max_age| NatsStore::open(NatsOptions { log_max_age, ..options(&nats, "test-node") }).unwrap();
        assert_eq!(max_age(&opened(None)), Duration::ZERO, "made without a retention: kept forever");
        assert_eq!(max_age(&opened(days(30))), days(30).unwrap(), "a node configured for 30 days sets it");
        assert_eq!(max_age(&opened(None)), days(30).unwrap(), "a node that says nothing leaves it");
        assert_eq!(max_age(&opened(days(7))), days(7).unwrap());
    }

    #[test]
    fn nats_urls_are_checked_at_once() {
        assert_eq!(server_addrs(&["nats://a:4222,nats://b:4222".into(), "nats://c".into()]).unwrap().len(), 3);
        let err = server_addrs(&["nats://a:42x".into()]).unwrap_err().to_string();
        assert!(err.contains("invalid NATS URL \"nats://a:42x\""), "{err}");
        assert!(server_addrs(&[" , ".into()]).is_err());
    }

    #[test]
    fn names_become_safe_tokens() {
        assert_eq!(subject_token("team-a_1"), "team-a_1");
        assert_eq!(subject_token("a.b"), "=612e62");
        assert_eq!(subject_token(""), "=");
        assert_ne!(subject_token("=612e62"), subject_token("a.b"));
    }
}
