//! Durable state behind one narrow trait: SQLite by default ([`sqlite`]), memory for
//! `--ephemeral` ([`memory`]).
//!
//! The trait speaks in whole operations (append an entry, save a peer), so the cluster's
//! NATS JetStream backend ([`nats`]) takes the same place. A single node's store has no
//! other writers; a shared one says so ([`Store::shared`]) and tells each node what the
//! others did ([`Store::follow`]), and what they see online.

pub mod memory;
pub mod migrate;
pub mod nats;
pub mod sqlite;

use std::sync::Arc;

use chrono::{DateTime, Utc};
use relay_proto::{Addressed, DeliveryState, EventKind, PeerKind};
use serde::{Deserialize, Serialize};
use thiserror::Error;

pub use memory::MemoryStore;
pub use sqlite::SqliteStore;

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("database error: {0}; nothing was changed")]
    Sqlite(#[from] rusqlite::Error),
    #[error("cannot open the data directory {path}: {source}")]
    DataDir { path: String, source: std::io::Error },
    #[error("the database at {path} has schema version {found}, newer than this server knows ({known}); upgrade relay-server")]
    SchemaTooNew { path: String, found: i64, known: i64 },
    #[error("{0} already exists")]
    Conflict(String),
    #[error("the database at {path} is in use by another process (another relay-server on the same data dir?)")]
    InUse { path: String },
    #[error("cannot start the WAL checkpoint thread: {0}")]
    Checkpointer(std::io::Error),
    #[error("NATS JetStream: {0}; nothing was changed")]
    Nats(String),
    #[error(
        "NATS JetStream did not confirm the write ({0}): it may be stored or not; send again with the same idempotency_key to have it stored once"
    )]
    Unconfirmed(String),
    #[error("stored data is damaged: {0}")]
    Corrupt(String),
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// A group as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupRecord {
    pub group_id: String,
    /// Argon2 PHC string of the join key, when the group has one.
    pub join_key_hash: Option<String>,
    pub created_at: DateTime<Utc>,
    /// Set when the group's log was copied from another store under new sequence numbers
    /// (`relay-server migrate`): clients may still resume from an old one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub renumbered: Option<Renumbered>,
}

/// How a copied log's old sequence numbers map to its new ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Renumbered {
    /// The old log's last sequence number: every new one is above it.
    pub up_to: u64,
    /// Old sequence number + `offset` = new sequence number.
    pub offset: u64,
}

impl GroupRecord {
    /// The sequence number a client's `Last-Event-ID` means today.
    pub fn resume_point(&self, last_event_id: u64) -> u64 {
        match self.renumbered {
            Some(r) if last_event_id <= r.up_to => last_event_id + r.offset,
            _ => last_event_id,
        }
    }
}

/// Holder of a token: one agent, which may be a peer in several groups.
pub type PrincipalId = i64;

/// A peer as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerRecord {
    pub peer_id: String,
    pub group_id: String,
    pub principal_id: PrincipalId,
    pub display_name: String,
    /// An agent, or a human in the console.
    #[serde(default, skip_serializing_if = "PeerKind::is_agent")]
    pub kind: PeerKind,
    /// The `name` asked for at registration; part of the peer's identity with host and dir.
    pub requested_name: Option<String>,
    pub hostname: String,
    pub working_directory: String,
    pub git_branch: Option<String>,
    pub joined_at: DateTime<Utc>,
    pub last_seen: DateTime<Utc>,
    /// Set while the peer has left the group.
    pub left_at: Option<DateTime<Utc>>,
    /// Every log entry up to this sequence number has been read by the peer.
    pub read_seq: u64,
    /// The daemon (relayd) the peer was registered through, whose group stream carries
    /// its DMs.
    pub daemon_id: Option<String>,
}

/// One entry of a group's log: a message or a membership change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogEntry {
    pub group_id: String,
    pub seq: u64,
    pub id: String,
    pub kind: EventKind,
    pub sender_id: String,
    pub sender_name: String,
    pub sender_kind: PeerKind,
    pub recipient_id: Option<String>,
    pub recipient_name: Option<String>,
    pub body: String,
    pub created_at: DateTime<Utc>,
}

impl LogEntry {
    /// Who the entry is from and for, for [`Addressed::visible_to`].
    pub fn addressed(&self) -> Addressed<'_> {
        Addressed { kind: self.kind, sender: &self.sender_id, recipient: self.recipient_id.as_deref(), state: None }
    }
}

/// A log entry before the store gives it its sequence number.
#[derive(Debug, Clone)]
pub struct NewEntry {
    pub group_id: String,
    pub id: String,
    pub kind: EventKind,
    pub sender_id: String,
    pub sender_name: String,
    pub sender_kind: PeerKind,
    pub recipient_id: Option<String>,
    pub recipient_name: Option<String>,
    pub body: String,
    pub created_at: DateTime<Utc>,
    /// The sender's own name for this message: a second entry from the same sender with
    /// the same key is not stored (see [`Store::entry_by_key`]).
    pub idempotency_key: Option<String>,
}

/// Where one recipient's copy of a message is. A recipient with no record is `stored`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliveryRecord {
    pub message_id: String,
    pub peer_id: String,
    pub state: DeliveryState,
    pub detail: Option<String>,
    pub updated_at: DateTime<Utc>,
}

/// Which entries of one group's log to read.
#[derive(Debug, Clone, Default)]
pub struct LogQuery {
    pub group_id: String,
    /// Only entries with `seq > after_seq`.
    pub after_seq: u64,
    /// Only entries with `seq <= up_to_seq`, when set.
    pub up_to_seq: Option<u64>,
    pub kinds: Option<Vec<EventKind>>,
    pub since: Option<DateTime<Utc>>,
    pub until: Option<DateTime<Utc>>,
    /// Only DMs with this peer on one end and `dm_between.1` on the other.
    pub dm_between: Option<(String, String)>,
    /// The newest entries first (for "the last N"), else oldest first.
    pub newest_first: bool,
    pub limit: usize,
}

impl LogQuery {
    /// Whether `e` passes the filters (kinds, time range, DM thread); sequence bounds and
    /// the limit are the reader's to apply.
    pub fn matches(&self, e: &LogEntry) -> bool {
        self.kinds.as_ref().is_none_or(|k| k.contains(&e.kind))
            && self.since.is_none_or(|t| e.created_at >= t)
            && self.until.is_none_or(|t| e.created_at <= t)
            && self.dm_between.as_ref().is_none_or(|(a, b)| {
                let (from, to) = (e.sender_id.as_str(), e.recipient_id.as_deref().unwrap_or(""));
                (from == a && to == b) || (from == b && to == a)
            })
    }
}

pub trait Store: Shared + Send + Sync + 'static {
    fn group(&self, group_id: &str) -> Result<Option<GroupRecord>>;
    /// Fails with [`StoreError::Conflict`] when the group exists.
    fn create_group(&self, group: &GroupRecord) -> Result<()>;

    /// Stores a new token hash and returns its principal.
    fn create_principal(&self, token_hash: &[u8; 32], at: DateTime<Utc>) -> Result<PrincipalId>;
    fn principal_by_token(&self, token_hash: &[u8; 32]) -> Result<Option<PrincipalId>>;

    /// Stores a daemon's credential.
    fn create_daemon(&self, daemon_id: &str, token_hash: &[u8; 32], hostname: &str, at: DateTime<Utc>) -> Result<()>;
    fn daemon_by_token(&self, token_hash: &[u8; 32]) -> Result<Option<String>>;

    fn peer(&self, peer_id: &str) -> Result<Option<PeerRecord>>;
    /// The peer registered from this host, directory and requested name in the group.
    fn peer_by_origin(
        &self,
        group_id: &str,
        hostname: &str,
        working_directory: &str,
        requested_name: Option<&str>,
    ) -> Result<Option<PeerRecord>>;
    /// Every peer of the group that ever joined, left ones included.
    fn peers_in_group(&self, group_id: &str) -> Result<Vec<PeerRecord>>;
    /// How many of the group's peers have not left it.
    fn active_members(&self, group_id: &str) -> Result<usize> {
        Ok(self.peers_in_group(group_id)?.iter().filter(|p| p.left_at.is_none()).count())
    }
    fn peers_of_principal(&self, principal: PrincipalId) -> Result<Vec<PeerRecord>>;
    /// Every peer registered through the daemon, left ones included.
    fn peers_of_daemon(&self, daemon_id: &str) -> Result<Vec<PeerRecord>>;
    /// Inserts or replaces the peer with this id.
    fn save_peer(&self, peer: &PeerRecord) -> Result<()>;
    /// Moves the peer's read cursor from `from` to `to`; `false` (nothing changed) when it
    /// is no longer at `from`: another reader, perhaps on another node, moved it first.
    fn advance_read_seq(&self, peer_id: &str, from: u64, to: u64) -> Result<bool>;
    fn touch_peer(&self, peer_id: &str, at: DateTime<Utc>) -> Result<()>;

    /// Appends to the group's log and returns the entry with its sequence number. Durable
    /// when this returns.
    fn append(&self, entry: NewEntry) -> Result<LogEntry>;
    /// The group's highest sequence number (0 for an empty log).
    fn head_seq(&self, group_id: &str) -> Result<u64>;
    fn entries(&self, query: &LogQuery) -> Result<Vec<LogEntry>>;
    fn entry_by_id(&self, id: &str) -> Result<Option<LogEntry>>;
    /// The entry `sender_id` appended with `key`, if any.
    fn entry_by_key(&self, sender_id: &str, key: &str) -> Result<Option<LogEntry>>;

    fn delivery(&self, message_id: &str, peer_id: &str) -> Result<Option<DeliveryRecord>>;
    /// Every recipient's record of one message.
    fn deliveries(&self, message_id: &str) -> Result<Vec<DeliveryRecord>>;
    /// Inserts or replaces the record of (message, peer).
    fn save_delivery(&self, record: &DeliveryRecord) -> Result<()>;
    /// Saves `record` if its state is a move forward from the one stored (see
    /// [`DeliveryState::can_move_to`]); whether it did. A single node's callers hold a lock
    /// around this; a shared store checks and writes in one compare-and-set.
    fn advance_delivery(&self, record: &DeliveryRecord) -> Result<bool> {
        let current = self.delivery(&record.message_id, &record.peer_id)?.map_or(DeliveryState::Stored, |d| d.state);
        if !current.can_move_to(record.state) {
            return Ok(false);
        }
        self.save_delivery(record)?;
        Ok(true)
    }

    /// A small record kept under `space` and `key`: the console's humans, sign-in links and
    /// sessions. Whoever reads one checks its expiry (the store's may lag).
    fn record(&self, space: &str, key: &str) -> Result<Option<Vec<u8>>>;
    /// Inserts or replaces a record; the store may forget it once `expires` has passed.
    fn put_record(&self, space: &str, key: &str, value: &[u8], expires: Option<DateTime<Utc>>) -> Result<()>;
    /// Removes a record and returns what it held: of several callers taking the same one at
    /// once, exactly one gets it (a one-time link is used once).
    fn take_record(&self, space: &str, key: &str) -> Result<Option<Vec<u8>>>;
}

/// What a shared store tells a node about a group the node follows.
pub trait GroupNews: Send + Sync + 'static {
    /// An entry some node appended, in sequence order. After a reconnect the same entry
    /// may come again; the receiver drops what it has seen.
    fn entry(&self, entry: LogEntry);
    /// A note a node shared for the group ([`Store::share`]), this node's own included.
    fn note(&self, group_id: &str, note: &[u8]);
}

/// Following a group: it stops when this is dropped.
pub type Following = Box<dyn std::any::Any + Send + Sync>;
/// A name held across nodes (see [`Shared::hold`]): let go when this is dropped.
pub type Held = Box<dyn std::any::Any + Send>;

/// The parts of [`Store`] only a store shared by several nodes needs; a single node's
/// store keeps the defaults (nobody else writes, nobody else holds streams).
pub trait Shared {
    /// Whether other nodes append to this store: then each new entry reaches the live
    /// streams through [`Store::follow`], the appending node's own included.
    fn shared(&self) -> bool {
        false
    }
    /// Calls `news` with every entry of the group after `after_seq`, and every note shared
    /// for it, until the returned value is dropped.
    fn follow(&self, group_id: &str, after_seq: u64, news: Arc<dyn GroupNews>) -> Result<Following> {
        let _ = (group_id, after_seq, news);
        Err(StoreError::Nats("this store is not shared".into()))
    }
    /// Hands `note` to every node following the group (at most once; nothing is kept).
    fn share(&self, group_id: &str, note: Vec<u8>) {
        let _ = (group_id, note);
    }
    /// This node holds a stream for `key` (a peer, or a daemon's group), or no longer does.
    fn set_online(&self, key: &str, online: bool) {
        let _ = (key, online);
    }
    /// Whether another node holds a stream for `key`.
    fn online_elsewhere(&self, key: &str) -> bool {
        let _ = key;
        false
    }
    /// Takes a token from `key`'s bucket shared by every node (`per_second`, `burst` at
    /// most); `Ok(Err(wait))` when none is left. A single node keeps its buckets in memory
    /// and never asks.
    fn take_token(&self, key: &str, per_second: f64, burst: u32) -> Result<std::result::Result<(), std::time::Duration>> {
        let _ = (key, per_second, burst);
        Ok(Ok(()))
    }
    /// Puts back a token taken from `key`'s shared bucket for something that turned out not
    /// to count.
    fn give_token(&self, key: &str, per_second: f64, burst: u32) -> Result<()> {
        let _ = (key, per_second, burst);
        Ok(())
    }
    /// Holds `name` until the returned value drops: of the nodes asking at once, one at a
    /// time (a node that dies holding it lets go within seconds). A single node has nobody
    /// else to exclude: its own locks do.
    fn hold(&self, name: &str) -> Result<Held> {
        let _ = name;
        Ok(Box::new(()))
    }
    /// Why the store cannot serve now, if it cannot (for `/healthz`).
    fn unhealthy(&self) -> Option<String> {
        None
    }
}

/// Runs the same behavioural tests against every store.
#[cfg(test)]
pub(crate) mod contract {
    use super::*;
    use chrono::TimeZone;

    fn t(secs: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(1_800_000_000 + secs, 0).unwrap()
    }

    fn peer(id: &str, group: &str, principal: PrincipalId, dir: &str) -> PeerRecord {
        PeerRecord {
            peer_id: id.into(),
            group_id: group.into(),
            principal_id: principal,
            display_name: format!("h:{dir}"),
            kind: PeerKind::Agent,
            requested_name: None,
            hostname: "h".into(),
            working_directory: format!("/src/{dir}"),
            git_branch: Some("main".into()),
            joined_at: t(0),
            last_seen: t(0),
            left_at: None,
            read_seq: 0,
            daemon_id: None,
        }
    }

    fn entry(group: &str, id: &str, kind: EventKind, from: &str, to: Option<&str>, at: i64) -> NewEntry {
        NewEntry {
            group_id: group.into(),
            id: id.into(),
            kind,
            sender_id: from.into(),
            sender_name: format!("name-{from}"),
            sender_kind: if from == "human" { PeerKind::Human } else { PeerKind::Agent },
            recipient_id: to.map(Into::into),
            recipient_name: to.map(|t| format!("name-{t}")),
            body: format!("body of {id}"),
            created_at: t(at),
            idempotency_key: None,
        }
    }

    pub fn groups(store: &dyn Store) {
        assert_eq!(store.group("g").unwrap(), None);
        let g = GroupRecord { group_id: "g".into(), join_key_hash: Some("$argon2id$x".into()), created_at: t(1), renumbered: None };
        store.create_group(&g).unwrap();
        assert_eq!(store.group("g").unwrap(), Some(g.clone()));
        assert!(matches!(store.create_group(&g), Err(StoreError::Conflict(_))));
    }

    pub fn principals_and_peers(store: &dyn Store) {
        let g = GroupRecord { group_id: "g".into(), join_key_hash: None, created_at: t(0), renumbered: None };
        store.create_group(&g).unwrap();
        let a = store.create_principal(&[1; 32], t(0)).unwrap();
        let b = store.create_principal(&[2; 32], t(0)).unwrap();
        assert_ne!(a, b);
        assert_eq!(store.principal_by_token(&[1; 32]).unwrap(), Some(a));
        assert_eq!(store.principal_by_token(&[3; 32]).unwrap(), None);

        let mut p1 = peer("p1", "g", a, "api");
        store.save_peer(&p1).unwrap();
        store.save_peer(&peer("p2", "g", b, "web")).unwrap();
        assert_eq!(store.peer("p1").unwrap(), Some(p1.clone()));
        assert_eq!(store.peer_by_origin("g", "h", "/src/api", None).unwrap(), Some(p1.clone()));
        assert_eq!(store.peer_by_origin("g", "h", "/src/api", Some("x")).unwrap(), None);
        assert_eq!(store.peer_by_origin("other", "h", "/src/api", None).unwrap(), None);

        // a requested name is part of the origin
        let mut named = peer("p3", "g", a, "api");
        named.requested_name = Some("alice".into());
        named.display_name = "alice".into();
        named.kind = PeerKind::Human;
        store.save_peer(&named).unwrap();
        assert_eq!(store.peer_by_origin("g", "h", "/src/api", Some("alice")).unwrap(), Some(named));

        // save replaces
        p1.principal_id = b;
        p1.left_at = Some(t(5));
        store.save_peer(&p1).unwrap();
        assert_eq!(store.peer("p1").unwrap().unwrap().principal_id, b);
        let ids = |v: Vec<PeerRecord>| v.into_iter().map(|p| p.peer_id).collect::<Vec<_>>();
        assert_eq!(ids(store.peers_of_principal(a).unwrap()), vec!["p3"]);
        assert_eq!(ids(store.peers_of_principal(b).unwrap()), vec!["p1", "p2"]);
        assert_eq!(ids(store.peers_in_group("g").unwrap()), vec!["p1", "p2", "p3"]);
        assert_eq!(store.active_members("g").unwrap(), 2, "p1 left");
        assert_eq!(store.active_members("nope").unwrap(), 0);

        store.create_daemon("d1", &[9; 32], "box", t(0)).unwrap();
        assert_eq!(store.daemon_by_token(&[9; 32]).unwrap().as_deref(), Some("d1"));
        assert_eq!(store.daemon_by_token(&[1; 32]).unwrap(), None);
        assert!(matches!(store.create_daemon("d2", &[9; 32], "box", t(0)), Err(StoreError::Conflict(_))));

        let mut via_daemon = peer("p4", "g", b, "cli");
        via_daemon.daemon_id = Some("d1".into());
        store.save_peer(&via_daemon).unwrap();
        assert_eq!(store.peer("p4").unwrap().unwrap().daemon_id.as_deref(), Some("d1"));
        assert_eq!(ids(store.peers_of_daemon("d1").unwrap()), vec!["p4"]);
        assert!(store.peers_of_daemon("d2").unwrap().is_empty());

        assert!(store.advance_read_seq("p2", 0, 7).unwrap());
        assert!(!store.advance_read_seq("p2", 0, 9).unwrap(), "the cursor moved on: a second reader at 0 loses");
        store.touch_peer("p2", t(9)).unwrap();
        let p2 = store.peer("p2").unwrap().unwrap();
        assert_eq!((p2.read_seq, p2.last_seen), (7, t(9)));
    }

    /// The peer lists answer every write made after they were read (a store that keeps
    /// them in memory must forget them on each kind of write).
    pub fn peer_lists_follow_writes(store: &dyn Store) {
        for g in ["g", "h"] {
            store.create_group(&GroupRecord { group_id: g.into(), join_key_hash: None, created_at: t(0), renumbered: None }).unwrap();
        }
        let a = store.create_principal(&[1; 32], t(0)).unwrap();
        let b = store.create_principal(&[2; 32], t(0)).unwrap();
        let p1 = peer("p1", "g", a, "api");
        store.save_peer(&p1).unwrap();
        let read = |store: &dyn Store| {
            (store.peers_of_principal(a).unwrap(), store.peers_in_group("g").unwrap(), store.active_members("g").unwrap())
        };
        assert_eq!(read(store), (vec![p1.clone()], vec![p1.clone()], 1));

        assert!(store.advance_read_seq("p1", 0, 7).unwrap());
        store.touch_peer("p1", t(9)).unwrap();
        let (mine, group, active) = read(store);
        assert_eq!((mine[0].read_seq, mine[0].last_seen, active), (7, t(9), 1));
        assert_eq!(group, mine);
        // a time finer than the store keeps reads back as the store keeps it
        store.touch_peer("p1", t(9) + chrono::Duration::nanoseconds(1500)).unwrap();
        assert_eq!(read(store).0, vec![store.peer("p1").unwrap().unwrap()]);
        assert_eq!(read(store).1, read(store).0);

        // joining, leaving, moving to another token holder and group
        let p2 = peer("p2", "g", b, "web");
        store.save_peer(&p2).unwrap();
        assert_eq!(read(store).1.len(), 2);
        assert_eq!(read(store).2, 2);
        let mut left = store.peer("p1").unwrap().unwrap();
        left.left_at = Some(t(10));
        store.save_peer(&left).unwrap();
        assert_eq!(read(store).0[0].left_at, Some(t(10)));
        assert_eq!(read(store).2, 1);
        let mut moved = left.clone();
        (moved.principal_id, moved.group_id, moved.left_at) = (b, "h".into(), None);
        store.save_peer(&moved).unwrap();
        assert_eq!(read(store).0, vec![]);
        assert_eq!(read(store).1, vec![p2.clone()]);
        let ids = |v: Vec<PeerRecord>| v.into_iter().map(|p| p.peer_id).collect::<Vec<_>>();
        assert_eq!(ids(store.peers_of_principal(b).unwrap()), vec!["p1", "p2"]);
        assert_eq!(ids(store.peers_in_group("h").unwrap()), vec!["p1"]);

        // unknown peers change nothing and are no error
        store.touch_peer("nobody", t(11)).unwrap();
        assert!(!store.advance_read_seq("nobody", 0, 1).unwrap());
        assert_eq!(store.peers_in_group("h").unwrap()[0].last_seen, moved.last_seen);
    }

    pub fn idempotency_keys(store: &dyn Store) {
        let keyed =
            |id: &str, from: &str| NewEntry { idempotency_key: Some("k-1".into()), ..entry("g", id, EventKind::Message, from, None, 1) };
        store.append(keyed("m1", "a")).unwrap();
        assert_eq!(store.entry_by_key("a", "k-1").unwrap().map(|e| e.id), Some("m1".into()));
        assert_eq!(store.entry_by_key("a", "k-2").unwrap(), None);
        // keys are the sender's own: another sender may use the same
        store.append(keyed("m2", "b")).unwrap();
        assert_eq!(store.entry_by_key("b", "k-1").unwrap().map(|e| e.id), Some("m2".into()));
        assert_eq!(store.entry_by_key("a", "k-1").unwrap().map(|e| e.id), Some("m1".into()));
    }

    /// Sequence numbers rise within a group; a shared store's are not consecutive.
    pub fn log(store: &dyn Store) {
        assert_eq!(store.head_seq("g").unwrap(), 0);
        let e1 = store.append(entry("g", "m1", EventKind::Message, "a", None, 1)).unwrap();
        assert!(e1.seq >= 1);
        let m2 = store.append(entry("g", "m2", EventKind::Dm, "a", Some("b"), 2)).unwrap().seq;
        let m3 = store.append(entry("g", "m3", EventKind::Dm, "b", Some("a"), 3)).unwrap().seq;
        store.append(entry("g", "m4", EventKind::Dm, "a", Some("c"), 4)).unwrap();
        let o1 = store.append(entry("other", "o1", EventKind::Message, "z", None, 4)).unwrap().seq;
        let j5 = store.append(entry("g", "j5", EventKind::PeerJoined, "d", None, 5)).unwrap().seq;
        assert!(e1.seq < m2 && m2 < m3 && m3 < j5);
        assert_eq!(store.head_seq("g").unwrap(), j5);
        assert_eq!(store.head_seq("other").unwrap(), o1);

        let ids = |q: LogQuery| store.entries(&q).unwrap().into_iter().map(|e| e.id).collect::<Vec<_>>();
        let all = LogQuery { group_id: "g".into(), limit: 100, ..Default::default() };
        assert_eq!(ids(all.clone()), vec!["m1", "m2", "m3", "m4", "j5"]);
        assert_eq!(
            store.entries(&all).unwrap()[1],
            LogEntry {
                group_id: "g".into(),
                seq: m2,
                id: "m2".into(),
                kind: EventKind::Dm,
                sender_id: "a".into(),
                sender_name: "name-a".into(),
                sender_kind: PeerKind::Agent,
                recipient_id: Some("b".into()),
                recipient_name: Some("name-b".into()),
                body: "body of m2".into(),
                created_at: t(2),
            }
        );
        assert_eq!(ids(LogQuery { after_seq: m3, ..all.clone() }), vec!["m4", "j5"]);
        assert_eq!(ids(LogQuery { up_to_seq: Some(m2), ..all.clone() }), vec!["m1", "m2"]);
        assert_eq!(ids(LogQuery { limit: 2, ..all.clone() }), vec!["m1", "m2"]);
        assert_eq!(ids(LogQuery { limit: 2, newest_first: true, ..all.clone() }), vec!["j5", "m4"]);
        assert_eq!(ids(LogQuery { newest_first: true, after_seq: m2, up_to_seq: Some(j5 - 1), ..all.clone() }), vec!["m4", "m3"]);
        assert_eq!(ids(LogQuery { kinds: Some(vec![EventKind::Dm]), ..all.clone() }), vec!["m2", "m3", "m4"]);
        assert_eq!(ids(LogQuery { since: Some(t(2)), until: Some(t(3)), ..all.clone() }), vec!["m2", "m3"]);
        let thread = LogQuery { dm_between: Some(("b".into(), "a".into())), ..all.clone() };
        assert_eq!(ids(thread), vec!["m2", "m3"]);
        assert_eq!(store.entry_by_id("m3").unwrap().map(|e| (e.group_id, e.seq)), Some(("g".into(), m3)));
        assert_eq!(store.entry_by_id("o1").unwrap().map(|e| e.group_id), Some("other".into()));
        assert_eq!(store.entry_by_id("nope").unwrap(), None);

        store.append(entry("g", "h6", EventKind::Message, "human", None, 6)).unwrap();
        assert_eq!(store.entry_by_id("h6").unwrap().map(|e| e.sender_kind), Some(PeerKind::Human));
        assert_eq!(store.entry_by_id("m3").unwrap().map(|e| e.sender_kind), Some(PeerKind::Agent));
    }

    /// More entries than one read returns, in order, with none lost at the page edges.
    pub fn long_logs(store: &dyn Store) {
        let mut seqs = Vec::new();
        for i in 0..600 {
            let group = if i % 3 == 0 { "noise" } else { "long" };
            let e = store.append(entry(group, &format!("long{i}"), EventKind::Message, "a", None, i)).unwrap();
            if group == "long" {
                seqs.push(e.seq);
            }
        }
        let all = LogQuery { group_id: "long".into(), limit: 10_000, ..Default::default() };
        let read: Vec<u64> = store.entries(&all).unwrap().iter().map(|e| e.seq).collect();
        assert_eq!(read, seqs);
        let tail: Vec<u64> = store.entries(&LogQuery { after_seq: seqs[299], ..all.clone() }).unwrap().iter().map(|e| e.seq).collect();
        assert_eq!(tail, seqs[300..]);
        let newest: Vec<u64> = store.entries(&LogQuery { newest_first: true, limit: 3, ..all }).unwrap().iter().map(|e| e.seq).collect();
        assert_eq!(newest, [seqs[399], seqs[398], seqs[397]]);
    }

    /// Records are kept per space and key, replaced whole, and taken by one caller only.
    pub fn records(store: &dyn Store) {
        assert_eq!(store.record("humans", "h1").unwrap(), None);
        store.put_record("humans", "h1", b"ann", None).unwrap();
        store.put_record("links", "h1", b"a link", Some(t(60))).unwrap();
        assert_eq!(store.record("humans", "h1").unwrap().as_deref(), Some(&b"ann"[..]));
        assert_eq!(store.record("links", "h1").unwrap().as_deref(), Some(&b"a link"[..]));
        store.put_record("humans", "h1", b"ann b.", None).unwrap();
        assert_eq!(store.record("humans", "h1").unwrap().as_deref(), Some(&b"ann b."[..]));
        assert_eq!(store.take_record("links", "h1").unwrap().as_deref(), Some(&b"a link"[..]));
        assert_eq!(store.take_record("links", "h1").unwrap(), None, "taken once");
        assert_eq!(store.record("links", "h1").unwrap(), None);
        assert_eq!(store.take_record("links", "nothing").unwrap(), None);
        assert_eq!(store.record("humans", "h1").unwrap().as_deref(), Some(&b"ann b."[..]), "another space is untouched");
    }

    pub fn deliveries(store: &dyn Store) {
        let record = |peer: &str, state, at| DeliveryRecord {
            message_id: "m1".into(),
            peer_id: peer.into(),
            state,
            detail: None,
            updated_at: t(at),
        };
        assert_eq!(store.delivery("m1", "b").unwrap(), None);
        assert!(store.deliveries("m1").unwrap().is_empty());
        store.save_delivery(&record("b", DeliveryState::Delivered, 1)).unwrap();
        store.save_delivery(&record("c", DeliveryState::Held, 2)).unwrap();
        let read = DeliveryRecord { detail: Some("through the inbox".into()), ..record("b", DeliveryState::Read, 3) };
        store.save_delivery(&read).unwrap();
        assert_eq!(store.delivery("m1", "b").unwrap(), Some(read.clone()));
        let mut all = store.deliveries("m1").unwrap();
        all.sort_by(|x, y| x.peer_id.cmp(&y.peer_id));
        assert_eq!(all, vec![read, record("c", DeliveryState::Held, 2)]);
        assert!(store.deliveries("m2").unwrap().is_empty());
        // states only move forward
        assert!(!store.advance_delivery(&record("b", DeliveryState::Delivered, 4)).unwrap(), "read stays read");
        assert_eq!(store.delivery("m1", "b").unwrap().map(|d| d.state), Some(DeliveryState::Read));
        assert!(store.advance_delivery(&record("d", DeliveryState::Delivered, 4)).unwrap());
        assert!(store.advance_delivery(&record("d", DeliveryState::Read, 5)).unwrap());
    }
}
