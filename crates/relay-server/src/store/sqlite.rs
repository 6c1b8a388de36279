//! The default store: one SQLite file in WAL mode.
//!
//! `synchronous=NORMAL` under WAL makes every commit durable against a crash or kill of
//! the process (the commit is in the WAL before `append` returns); only a power loss can
//! take the last commits, which `synchronous = "full"` in the config closes at the price of
//! an fsync per message.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use chrono::{DateTime, TimeZone, Utc};
use relay_proto::{DeliveryState, EventKind, PeerKind};
use rusqlite::{Connection, OptionalExtension, Row, params};

use crate::lock;

use super::{DeliveryRecord, GroupRecord, LogEntry, LogQuery, NewEntry, PeerRecord, PrincipalId, Result, Store, StoreError};

/// The file inside the data directory.
pub const DB_FILE: &str = "relay.sqlite3";

/// Each entry moves the schema one version up; never edit one that has shipped.
const MIGRATIONS: &[&str] = &[
    // 1: groups, token holders, peers, the per-group log
    r#"
    CREATE TABLE groups (
        group_id      TEXT PRIMARY KEY,
        join_key_hash TEXT,
        created_at    INTEGER NOT NULL
    );
    CREATE TABLE principals (
        principal_id  INTEGER PRIMARY KEY,
        token_hash    BLOB NOT NULL UNIQUE,
        created_at    INTEGER NOT NULL
    );
    CREATE TABLE peers (
        peer_id           TEXT PRIMARY KEY,
        group_id          TEXT NOT NULL REFERENCES groups(group_id),
        principal_id      INTEGER NOT NULL REFERENCES principals(principal_id),
        display_name      TEXT NOT NULL,
        requested_name    TEXT,
        hostname          TEXT NOT NULL,
        working_directory TEXT NOT NULL,
        git_branch        TEXT,
        joined_at         INTEGER NOT NULL,
        last_seen         INTEGER NOT NULL,
        left_at           INTEGER,
        read_seq          INTEGER NOT NULL DEFAULT 0
    );
    CREATE UNIQUE INDEX peers_by_origin
        ON peers(group_id, hostname, working_directory, ifnull(requested_name, ''));
    CREATE INDEX peers_by_principal ON peers(principal_id);
    CREATE TABLE log (
        group_id       TEXT NOT NULL,
        seq            INTEGER NOT NULL,
        id             TEXT NOT NULL UNIQUE,
        kind           TEXT NOT NULL,
        sender_id      TEXT NOT NULL,
        sender_name    TEXT NOT NULL,
        recipient_id   TEXT,
        recipient_name TEXT,
        body           TEXT NOT NULL,
        created_at     INTEGER NOT NULL,
        PRIMARY KEY (group_id, seq)
    ) WITHOUT ROWID;
    "#,
    // 2: daemons (relayd), and the daemon each peer was registered through
    r#"
    CREATE TABLE daemons (
        daemon_id   TEXT PRIMARY KEY,
        token_hash  BLOB NOT NULL UNIQUE,
        hostname    TEXT NOT NULL,
        created_at  INTEGER NOT NULL
    );
    ALTER TABLE peers ADD COLUMN daemon_id TEXT REFERENCES daemons(daemon_id);
    "#,
    // 3: where each recipient's copy of a message is (no row: stored)
    r#"
    CREATE TABLE deliveries (
        message_id  TEXT NOT NULL,
        peer_id     TEXT NOT NULL,
        state       TEXT NOT NULL,
        detail      TEXT,
        updated_at  INTEGER NOT NULL,
        PRIMARY KEY (message_id, peer_id)
    ) WITHOUT ROWID;
    "#,
    // 4: a group's or a token holder's peers read in order from an index, never sorted
    r#"
    DROP INDEX peers_by_principal;
    CREATE INDEX peers_by_principal ON peers(principal_id, peer_id);
    CREATE INDEX peers_by_group ON peers(group_id, peer_id);
    "#,
    // 5: a group's active peers counted from an index of them alone, not looked up one by one
    // (every send_message counts them before its streams can hear of it)
    r#"
    CREATE INDEX peers_active_by_group ON peers(group_id, left_at) WHERE left_at IS NULL;
    "#,
    // 6: a group's active peers are counted from its peer list in memory (see PeerLists)
    r#"
    DROP INDEX peers_active_by_group;
    "#,
    // 7: a sender's idempotency keys, so a send retried after a lost answer is stored once
    r#"
    ALTER TABLE log ADD COLUMN idempotency_key TEXT;
    CREATE UNIQUE INDEX log_by_idempotency_key ON log(sender_id, idempotency_key) WHERE idempotency_key IS NOT NULL;
    "#,
    // 8: humans in the console: peers and senders of a kind (NULL: an agent), and the
    // console's small records (humans, sign-in links, sessions)
    r#"
    ALTER TABLE peers ADD COLUMN kind TEXT;
    ALTER TABLE log ADD COLUMN sender_kind TEXT;
    CREATE INDEX peers_by_daemon ON peers(daemon_id) WHERE daemon_id IS NOT NULL;
    CREATE TABLE records (
        space       TEXT NOT NULL,
        key         TEXT NOT NULL,
        value       BLOB NOT NULL,
        expires_at  INTEGER,
        PRIMARY KEY (space, key)
    ) WITHOUT ROWID;
    "#,
];

pub struct SqliteStore {
    conn: Arc<Mutex<Connection>>,
    /// Filled and emptied only while `conn` is held, so it never lags behind the file.
    peer_lists: Mutex<PeerLists>,
    /// Kept for its Drop, which stops the thread; `None` for an in-memory database (no WAL).
    _checkpointer: Option<Checkpointer>,
}

/// Commits between two checkpoints (a few pages each: about SQLite's own 1,000-page default).
const CHECKPOINT_EVERY: u32 = 256;
/// WAL pages at which SQLite checkpoints inside a commit after all: a backstop, reached only
/// if the checkpointer falls behind or 256 commits carry very large messages.
const WAL_BACKSTOP_PAGES: u32 = 16_384;
/// A WAL file that grew past this is cut back to it when the log starts over.
const WAL_KEEP_BYTES: u32 = 64 << 20;

/// Copies the WAL back into the database file on a thread of its own. Left to SQLite, the
/// checkpoint runs inside whichever commit crosses its threshold, fsync included (4–5 ms on
/// a small VM's disk), and a message's fan-out waits for it; here the committing call
/// returns first, and the checkpoint takes the connection after it (so a store call made
/// during the checkpoint still waits for it). The WAL's sync, the longest part (1.8–4.6 ms
/// of the 3–11 ms a checkpoint held the connection here), is done first without the
/// connection, leaving the checkpoint's own sync of the WAL little to write.
struct Checkpointer {
    signal: Arc<CheckpointSignal>,
    thread: Option<std::thread::JoinHandle<()>>,
}

#[derive(Default)]
struct CheckpointSignal {
    /// Commits since the last checkpoint was asked for.
    commits: AtomicU32,
    /// (a checkpoint is due, the store is closing)
    state: Mutex<(bool, bool)>,
    wake: Condvar,
}

impl CheckpointSignal {
    fn set(&self, due: bool, closing: bool) {
        let mut state = lock(&self.state);
        state.0 |= due;
        state.1 |= closing;
        self.wake.notify_one();
    }
}

impl Checkpointer {
    fn start(conn: &Arc<Mutex<Connection>>, wal: PathBuf) -> Result<Self> {
        let signal = Arc::new(CheckpointSignal::default());
        let counted = signal.clone();
        lock(conn).commit_hook(Some(move || {
            if counted.commits.fetch_add(1, Ordering::Relaxed) + 1 >= CHECKPOINT_EVERY {
                counted.commits.store(0, Ordering::Relaxed);
                counted.set(true, false);
            }
            false // never turn the commit into a rollback
        }))?;
        let (conn, waiting) = (conn.clone(), signal.clone());
        let thread = std::thread::Builder::new().name("relay-checkpoint".into()).spawn(move || {
            loop {
                let mut state = lock(&waiting.state);
                while !state.0 && !state.1 {
                    state = waiting.wake.wait(state).unwrap_or_else(|poisoned| poisoned.into_inner());
                }
                if state.1 {
                    return;
                }
                state.0 = false;
                drop(state);
                // an extra sync is never wrong; one that fails leaves SQLite's own to do it all
                if let Ok(wal) = std::fs::File::open(&wal) {
                    let _ = wal.sync_data();
                }
                if let Err(e) = checkpoint(&lock(&conn)) {
                    tracing::warn!(error = %e, "WAL checkpoint failed; the next one retries");
                }
            }
        });
        Ok(Self { signal, thread: Some(thread.map_err(StoreError::Checkpointer)?) })
    }
}

/// SQLite's write-ahead log of the database at `db`.
fn wal_path(db: &Path) -> PathBuf {
    let mut wal = db.as_os_str().to_owned();
    wal.push("-wal");
    wal.into()
}

/// Copies the WAL into the database; when all of it was copied, also starts the WAL over
/// with a write of its own (the schema version, unchanged): the first write to a new WAL
/// syncs its header, and that is then paid here instead of by the next message's commit.
fn checkpoint(conn: &Connection) -> rusqlite::Result<()> {
    let (busy, frames, copied): (i64, i64, i64) =
        conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
    if busy == 0 && frames > 0 && frames == copied {
        let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        conn.pragma_update(None, "user_version", version)?;
    }
    Ok(())
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        self.signal.set(false, true);
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            tracing::error!("the WAL checkpoint thread had panicked; SQLite's backstop checkpoints were all there was");
        }
    }
}

/// The two peer lists nearly every tool call reads (the caller's peers, a group's peers),
/// kept in memory: reading them from SQLite was most of what a cheap call cost. This
/// process alone uses the database (EXCLUSIVE locking), so every change to a peer comes
/// through `save_peer` (which forgets every list) or `advance_read_seq` and `touch_peer` (which
/// make the same change to the lists that hold the peer).
#[derive(Default)]
struct PeerLists {
    by_principal: HashMap<PrincipalId, Vec<PeerRecord>>,
    by_group: HashMap<String, Vec<PeerRecord>>,
    /// About the bytes both hold (a list filled twice by a race counts twice: harmless).
    bytes: usize,
}

/// Bytes kept before every list is dropped and filled again as used: a few thousand peers
/// with long paths, and a small share of the server's memory.
const PEER_LISTS_BYTES: usize = 4 << 20;

impl PeerLists {
    fn keep_for_principal(&mut self, principal: PrincipalId, peers: &[PeerRecord]) {
        self.make_room(size_of::<PrincipalId>(), peers);
        self.by_principal.insert(principal, peers.to_vec());
    }

    fn keep_for_group(&mut self, group_id: &str, peers: &[PeerRecord]) {
        self.make_room(group_id.len(), peers);
        self.by_group.insert(group_id.to_owned(), peers.to_vec());
    }

    /// Counts a list in, key included (so empty lists count too), dropping all first when
    /// it would not fit.
    fn make_room(&mut self, key_bytes: usize, peers: &[PeerRecord]) {
        let bytes = 64 + key_bytes + peers.iter().map(record_bytes).sum::<usize>();
        if self.bytes + bytes > PEER_LISTS_BYTES {
            self.forget_all();
        }
        self.bytes += bytes;
    }

    /// Applies `change` to the peer's copies in the lists that hold it.
    fn amend(&mut self, principal: PrincipalId, group_id: &str, peer_id: &str, change: impl Fn(&mut PeerRecord)) {
        let lists = self.by_principal.get_mut(&principal).into_iter().chain(self.by_group.get_mut(group_id));
        for peer in lists.flatten().filter(|p| p.peer_id == peer_id) {
            change(peer);
        }
    }

    fn forget_all(&mut self) {
        self.by_principal.clear();
        self.by_group.clear();
        self.bytes = 0;
    }
}

fn record_bytes(p: &PeerRecord) -> usize {
    let optional = |s: &Option<String>| s.as_ref().map_or(0, String::len);
    size_of::<PeerRecord>()
        + [&p.peer_id, &p.group_id, &p.display_name, &p.hostname, &p.working_directory].iter().map(|s| s.len()).sum::<usize>()
        + [&p.requested_name, &p.git_branch, &p.daemon_id].into_iter().map(optional).sum::<usize>()
}

fn count_active(peers: &[PeerRecord]) -> usize {
    peers.iter().filter(|p| p.left_at.is_none()).count()
}

/// How hard a commit waits for the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Synchronous {
    /// Durable against process crashes (the default).
    #[default]
    Normal,
    /// Durable against power loss too: one fsync per commit.
    Full,
}

impl SqliteStore {
    /// Opens (creating if needed) the database in `data_dir`, which is made 0700.
    pub fn open_dir(data_dir: &Path, sync: Synchronous) -> Result<Self> {
        let dir_err = |source| StoreError::DataDir { path: data_dir.display().to_string(), source };
        std::fs::create_dir_all(data_dir).map_err(dir_err)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(data_dir, std::fs::Permissions::from_mode(0o700)).map_err(dir_err)?;
        }
        Self::open(&data_dir.join(DB_FILE), sync)
    }

    pub fn open(path: &Path, sync: Synchronous) -> Result<Self> {
        let mut conn = Connection::open(path)?;
        let sync = match sync {
            Synchronous::Normal => "NORMAL",
            Synchronous::Full => "FULL",
        };
        // Exclusive: this process alone uses the database, so SQLite takes its file lock
        // once instead of around every statement (and needs no shared-memory WAL index); a
        // second server on the same data dir is refused instead of racing this one.
        let opened = conn
            .execute_batch(&format!(
                "PRAGMA busy_timeout=5000; PRAGMA locking_mode=EXCLUSIVE; PRAGMA journal_mode=WAL; \
                 PRAGMA synchronous={sync}; PRAGMA foreign_keys=ON; PRAGMA wal_autocheckpoint={WAL_BACKSTOP_PAGES}; \
                 PRAGMA journal_size_limit={WAL_KEEP_BYTES};"
            ))
            .and_then(|()| conn.execute_batch("BEGIN EXCLUSIVE; COMMIT;"));
        if let Err(e) = opened {
            return Err(match e.sqlite_error_code() {
                Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked) => {
                    StoreError::InUse { path: path.display().to_string() }
                }
                _ => e.into(),
            });
        }
        migrate(&mut conn, path)?;
        // the file as SQLite names it (symbolic links resolved)
        let wal = wal_path(conn.path().map_or(path, Path::new));
        let conn = Arc::new(Mutex::new(conn));
        let checkpointer = Checkpointer::start(&conn, wal)?;
        Ok(Self { conn, peer_lists: Mutex::default(), _checkpointer: Some(checkpointer) })
    }

    /// A private in-memory database; for tests of the SQL itself.
    pub fn open_in_memory() -> Result<Self> {
        let mut conn = Connection::open_in_memory()?;
        migrate(&mut conn, Path::new(":memory:"))?;
        Ok(Self { conn: Arc::new(Mutex::new(conn)), peer_lists: Mutex::default(), _checkpointer: None })
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        // SQLite rolls back an unfinished transaction itself; the connection stays usable.
        lock(&self.conn)
    }

    /// Take only while holding `conn` to change what it holds; a lookup needs no `conn`.
    fn peer_lists(&self) -> MutexGuard<'_, PeerLists> {
        lock(&self.peer_lists)
    }

    /// The peers whose `column` is `value`, read from the file and handed to `keep`.
    fn load_peers(
        &self,
        column: &str,
        value: impl rusqlite::ToSql,
        keep: impl FnOnce(&mut PeerLists, &[PeerRecord]),
    ) -> Result<Vec<PeerRecord>> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(&format!("SELECT {PEER_COLUMNS} FROM peers WHERE {column} = ?1 ORDER BY peer_id"))?;
        let rows: Vec<PeerRecord> = stmt.query_map([value], peer_row)?.collect::<rusqlite::Result<_>>()?;
        // still holding `conn`: no write can land between the query and this
        keep(&mut self.peer_lists(), &rows);
        Ok(rows)
    }

    /// Runs `update`, a statement on peer `peer_id` returning its principal and group, then
    /// makes the same `change` to the lists in memory.
    /// Whether a row changed.
    fn update_peer(&self, update: &str, params: impl rusqlite::Params, peer_id: &str, change: impl Fn(&mut PeerRecord)) -> Result<bool> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(update)?;
        // stepped to the end: the commit happens there, and its failure must not be lost
        let touched: Vec<(PrincipalId, String)> =
            stmt.query_map(params, |r| Ok((r.get(0)?, r.get(1)?)))?.collect::<rusqlite::Result<_>>()?;
        if let Some((principal, group_id)) = touched.first() {
            self.peer_lists().amend(*principal, group_id, peer_id, change);
        }
        Ok(!touched.is_empty())
    }
}

/// Everything a data directory holds but the logs (read those with [`Store::entries`]),
/// for `relay-server migrate`.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub groups: Vec<GroupRecord>,
    pub principals: Vec<([u8; 32], PrincipalId, DateTime<Utc>)>,
    /// (daemon id, token hash, host name, created)
    pub daemons: Vec<(String, [u8; 32], String, DateTime<Utc>)>,
    pub peers: Vec<PeerRecord>,
    pub deliveries: Vec<DeliveryRecord>,
    /// Message id → the idempotency key its sender gave it.
    pub keys: HashMap<String, String>,
    pub records: Vec<StoredRecord>,
}

/// A console record as the store keeps it: (space, key, value, expires).
pub type StoredRecord = (String, String, Vec<u8>, Option<DateTime<Utc>>);

fn hash32(bytes: Vec<u8>) -> rusqlite::Result<[u8; 32]> {
    bytes.try_into().map_err(|_| rusqlite::Error::InvalidColumnType(0, "token_hash".into(), rusqlite::types::Type::Blob))
}

impl SqliteStore {
    pub fn snapshot(&self) -> Result<Snapshot> {
        let conn = self.conn();
        let all = |sql: &str| conn.prepare(sql);
        let groups = all("SELECT group_id, join_key_hash, created_at FROM groups ORDER BY group_id")?
            .query_map([], |r| {
                Ok(GroupRecord { group_id: r.get(0)?, join_key_hash: r.get(1)?, created_at: time(r.get(2)?), renumbered: None })
            })?
            .collect::<rusqlite::Result<_>>()?;
        let principals = all("SELECT token_hash, principal_id, created_at FROM principals ORDER BY principal_id")?
            .query_map([], |r| Ok((hash32(r.get(0)?)?, r.get(1)?, time(r.get(2)?))))?
            .collect::<rusqlite::Result<_>>()?;
        let daemons = all("SELECT daemon_id, token_hash, hostname, created_at FROM daemons ORDER BY daemon_id")?
            .query_map([], |r| Ok((r.get(0)?, hash32(r.get(1)?)?, r.get(2)?, time(r.get(3)?))))?
            .collect::<rusqlite::Result<_>>()?;
        let peers = all(&format!("SELECT {PEER_COLUMNS} FROM peers ORDER BY peer_id"))?
            .query_map([], peer_row)?
            .collect::<rusqlite::Result<_>>()?;
        let deliveries = all(&format!("SELECT {DELIVERY_COLUMNS} FROM deliveries ORDER BY message_id, peer_id"))?
            .query_map([], delivery_row)?
            .collect::<rusqlite::Result<_>>()?;
        let keys = all("SELECT id, idempotency_key FROM log WHERE idempotency_key IS NOT NULL")?
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<rusqlite::Result<_>>()?;
        let records = all("SELECT space, key, value, expires_at FROM records ORDER BY space, key")?
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get::<_, Option<i64>>(3)?.map(time))))?
            .collect::<rusqlite::Result<_>>()?;
        Ok(Snapshot { groups, principals, daemons, peers, deliveries, keys, records })
    }
}

fn migrate(conn: &mut Connection, path: &Path) -> Result<()> {
    let known = MIGRATIONS.len() as i64;
    let found: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if found > known {
        return Err(StoreError::SchemaTooNew { path: PathBuf::from(path).display().to_string(), found, known });
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(found as usize) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", i as i64 + 1)?;
        tx.commit()?;
    }
    Ok(())
}

fn micros(t: DateTime<Utc>) -> i64 {
    t.timestamp_micros()
}

fn time(us: i64) -> DateTime<Utc> {
    Utc.timestamp_micros(us).single().unwrap_or_default()
}

fn kind_name(kind: EventKind) -> &'static str {
    kind.as_str()
}

fn kind_from(name: &str) -> EventKind {
    serde_json::from_value(serde_json::Value::String(name.to_owned())).unwrap_or(EventKind::Unknown)
}

const PEER_COLUMNS: &str = "peer_id, group_id, principal_id, display_name, requested_name, hostname, \
     working_directory, git_branch, joined_at, last_seen, left_at, read_seq, daemon_id, kind";

/// A kind as its column keeps it: NULL for an agent, as every row before kinds were.
fn kind_column(kind: PeerKind) -> Option<&'static str> {
    (!kind.is_agent()).then(|| kind.as_str())
}

fn kind_of(column: Option<String>) -> PeerKind {
    match column.as_deref() {
        Some("human") => PeerKind::Human,
        _ => PeerKind::Agent,
    }
}

fn peer_row(r: &Row<'_>) -> rusqlite::Result<PeerRecord> {
    Ok(PeerRecord {
        peer_id: r.get(0)?,
        group_id: r.get(1)?,
        principal_id: r.get(2)?,
        display_name: r.get(3)?,
        requested_name: r.get(4)?,
        hostname: r.get(5)?,
        working_directory: r.get(6)?,
        git_branch: r.get(7)?,
        joined_at: time(r.get(8)?),
        last_seen: time(r.get(9)?),
        left_at: r.get::<_, Option<i64>>(10)?.map(time),
        read_seq: r.get::<_, i64>(11)? as u64,
        daemon_id: r.get(12)?,
        kind: kind_of(r.get(13)?),
    })
}

const LOG_COLUMNS: &str = "group_id, seq, id, kind, sender_id, sender_name, recipient_id, recipient_name, body, created_at, sender_kind";

fn log_row(r: &Row<'_>) -> rusqlite::Result<LogEntry> {
    Ok(LogEntry {
        group_id: r.get(0)?,
        seq: r.get::<_, i64>(1)? as u64,
        id: r.get(2)?,
        kind: kind_from(&r.get::<_, String>(3)?),
        sender_id: r.get(4)?,
        sender_name: r.get(5)?,
        recipient_id: r.get(6)?,
        recipient_name: r.get(7)?,
        body: r.get(8)?,
        created_at: time(r.get(9)?),
        sender_kind: kind_of(r.get(10)?),
    })
}

impl super::Shared for SqliteStore {}

impl Store for SqliteStore {
    fn group(&self, group_id: &str) -> Result<Option<GroupRecord>> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached("SELECT group_id, join_key_hash, created_at FROM groups WHERE group_id = ?1")?;
        let row = stmt
            .query_row([group_id], |r| {
                Ok(GroupRecord { group_id: r.get(0)?, join_key_hash: r.get(1)?, created_at: time(r.get(2)?), renumbered: None })
            })
            .optional()?;
        Ok(row)
    }

    fn create_group(&self, group: &GroupRecord) -> Result<()> {
        let conn = self.conn();
        let mut stmt =
            conn.prepare_cached("INSERT INTO groups (group_id, join_key_hash, created_at) VALUES (?1, ?2, ?3) ON CONFLICT DO NOTHING")?;
        let inserted = stmt.execute(params![group.group_id, group.join_key_hash, micros(group.created_at)])?;
        if inserted == 0 {
            return Err(StoreError::Conflict(format!("group {}", group.group_id)));
        }
        Ok(())
    }

    fn create_principal(&self, token_hash: &[u8; 32], at: DateTime<Utc>) -> Result<PrincipalId> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached("INSERT INTO principals (token_hash, created_at) VALUES (?1, ?2) ON CONFLICT DO NOTHING")?;
        if stmt.execute(params![&token_hash[..], micros(at)])? == 0 {
            return Err(StoreError::Conflict("token".into()));
        }
        Ok(conn.last_insert_rowid())
    }

    fn principal_by_token(&self, token_hash: &[u8; 32]) -> Result<Option<PrincipalId>> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached("SELECT principal_id FROM principals WHERE token_hash = ?1")?;
        Ok(stmt.query_row([&token_hash[..]], |r| r.get(0)).optional()?)
    }

    fn create_daemon(&self, daemon_id: &str, token_hash: &[u8; 32], hostname: &str, at: DateTime<Utc>) -> Result<()> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "INSERT INTO daemons (daemon_id, token_hash, hostname, created_at) VALUES (?1, ?2, ?3, ?4) ON CONFLICT DO NOTHING",
        )?;
        if stmt.execute(params![daemon_id, &token_hash[..], hostname, micros(at)])? == 0 {
            return Err(StoreError::Conflict("daemon".into()));
        }
        Ok(())
    }

    fn daemon_by_token(&self, token_hash: &[u8; 32]) -> Result<Option<String>> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached("SELECT daemon_id FROM daemons WHERE token_hash = ?1")?;
        Ok(stmt.query_row([&token_hash[..]], |r| r.get(0)).optional()?)
    }

    fn peer(&self, peer_id: &str) -> Result<Option<PeerRecord>> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(&format!("SELECT {PEER_COLUMNS} FROM peers WHERE peer_id = ?1"))?;
        Ok(stmt.query_row([peer_id], peer_row).optional()?)
    }

    fn peer_by_origin(
        &self,
        group_id: &str,
        hostname: &str,
        working_directory: &str,
        requested_name: Option<&str>,
    ) -> Result<Option<PeerRecord>> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(&format!(
            "SELECT {PEER_COLUMNS} FROM peers WHERE group_id = ?1 AND hostname = ?2 \
             AND working_directory = ?3 AND ifnull(requested_name, '') = ?4"
        ))?;
        let row = stmt.query_row(params![group_id, hostname, working_directory, requested_name.unwrap_or("")], peer_row).optional()?;
        Ok(row)
    }

    fn peers_in_group(&self, group_id: &str) -> Result<Vec<PeerRecord>> {
        if let Some(peers) = self.peer_lists().by_group.get(group_id) {
            return Ok(peers.clone());
        }
        self.load_peers("group_id", group_id, |lists, rows| lists.keep_for_group(group_id, rows))
    }

    fn active_members(&self, group_id: &str) -> Result<usize> {
        // counted where the list is, without copying it; a miss fills it for the next send
        if let Some(peers) = self.peer_lists().by_group.get(group_id) {
            return Ok(count_active(peers));
        }
        Ok(count_active(&self.peers_in_group(group_id)?))
    }

    fn peers_of_principal(&self, principal: PrincipalId) -> Result<Vec<PeerRecord>> {
        if let Some(peers) = self.peer_lists().by_principal.get(&principal) {
            return Ok(peers.clone());
        }
        self.load_peers("principal_id", principal, |lists, rows| lists.keep_for_principal(principal, rows))
    }

    fn peers_of_daemon(&self, daemon_id: &str) -> Result<Vec<PeerRecord>> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(&format!("SELECT {PEER_COLUMNS} FROM peers WHERE daemon_id = ?1 ORDER BY peer_id"))?;
        Ok(stmt.query_map([daemon_id], peer_row)?.collect::<rusqlite::Result<_>>()?)
    }

    fn save_peer(&self, p: &PeerRecord) -> Result<()> {
        let conn = self.conn();
        // a replaced row may have moved between principals and groups, or (same origin,
        // another peer_id) been deleted: every list is forgotten, whatever the outcome
        self.peer_lists().forget_all();
        let mut stmt = conn.prepare_cached(&format!(
            "INSERT OR REPLACE INTO peers ({PEER_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)"
        ))?;
        stmt.execute(params![
            p.peer_id,
            p.group_id,
            p.principal_id,
            p.display_name,
            p.requested_name,
            p.hostname,
            p.working_directory,
            p.git_branch,
            micros(p.joined_at),
            micros(p.last_seen),
            p.left_at.map(micros),
            p.read_seq as i64,
            p.daemon_id,
            kind_column(p.kind),
        ])?;
        Ok(())
    }

    fn advance_read_seq(&self, peer_id: &str, from: u64, to: u64) -> Result<bool> {
        self.update_peer(
            "UPDATE peers SET read_seq = ?3 WHERE peer_id = ?1 AND read_seq = ?2 RETURNING principal_id, group_id",
            params![peer_id, from as i64, to as i64],
            peer_id,
            |p| p.read_seq = to,
        )
    }

    fn touch_peer(&self, peer_id: &str, at: DateTime<Utc>) -> Result<()> {
        // as the column keeps it
        let at = time(micros(at));
        self.update_peer(
            "UPDATE peers SET last_seen = ?2 WHERE peer_id = ?1 RETURNING principal_id, group_id",
            params![peer_id, micros(at)],
            peer_id,
            |p| p.last_seen = at,
        )
        .map(drop)
    }

    fn append(&self, e: NewEntry) -> Result<LogEntry> {
        let conn = self.conn();
        // One statement, so the sequence number and the row commit together.
        let mut stmt = conn.prepare_cached(
            "INSERT INTO log (group_id, seq, id, kind, sender_id, sender_name, recipient_id, recipient_name, body, created_at,
                              idempotency_key, sender_kind)
             VALUES (?1, (SELECT ifnull(max(seq), 0) + 1 FROM log WHERE group_id = ?1), ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)
             RETURNING seq",
        )?;
        let row = params![
            e.group_id,
            e.id,
            kind_name(e.kind),
            e.sender_id,
            e.sender_name,
            e.recipient_id,
            e.recipient_name,
            e.body,
            micros(e.created_at),
            e.idempotency_key,
            kind_column(e.sender_kind)
        ];
        // stepped to the end, where the commit happens (query_row would drop its error)
        let seqs: Vec<i64> = stmt.query_map(row, |r| r.get(0))?.collect::<rusqlite::Result<_>>()?;
        let seq = *seqs.first().ok_or(rusqlite::Error::QueryReturnedNoRows)?;
        Ok(LogEntry {
            group_id: e.group_id,
            seq: seq as u64,
            id: e.id,
            kind: e.kind,
            sender_id: e.sender_id,
            sender_name: e.sender_name,
            sender_kind: e.sender_kind,
            recipient_id: e.recipient_id,
            recipient_name: e.recipient_name,
            body: e.body,
            // round-trips through the column's precision
            created_at: time(micros(e.created_at)),
        })
    }

    fn head_seq(&self, group_id: &str) -> Result<u64> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached("SELECT ifnull(max(seq), 0) FROM log WHERE group_id = ?1")?;
        Ok(stmt.query_row([group_id], |r| r.get::<_, i64>(0))? as u64)
    }

    fn entries(&self, q: &LogQuery) -> Result<Vec<LogEntry>> {
        let mut sql = format!("SELECT {LOG_COLUMNS} FROM log WHERE group_id = ?1 AND seq > ?2");
        let mut args: Vec<rusqlite::types::Value> = vec![q.group_id.clone().into(), (q.after_seq as i64).into()];
        let mut bind = |sql: &mut String, clause: &str, value: rusqlite::types::Value| {
            args.push(value);
            sql.push_str(&clause.replace('?', &format!("?{}", args.len())));
        };
        if let Some(up_to) = q.up_to_seq {
            bind(&mut sql, " AND seq <= ?", (up_to as i64).into());
        }
        if let Some(since) = q.since {
            bind(&mut sql, " AND created_at >= ?", micros(since).into());
        }
        if let Some(until) = q.until {
            bind(&mut sql, " AND created_at <= ?", micros(until).into());
        }
        if let Some(kinds) = &q.kinds {
            let names: Vec<String> = kinds.iter().map(|k| format!("'{}'", kind_name(*k))).collect();
            sql.push_str(&format!(" AND kind IN ({})", names.join(",")));
        }
        if let Some((a, b)) = &q.dm_between {
            bind(&mut sql, " AND ((sender_id = ?", a.clone().into());
            bind(&mut sql, " AND recipient_id = ?)", b.clone().into());
            bind(&mut sql, " OR (sender_id = ?", b.clone().into());
            bind(&mut sql, " AND recipient_id = ?))", a.clone().into());
        }
        sql.push_str(if q.newest_first { " ORDER BY seq DESC" } else { " ORDER BY seq ASC" });
        bind(&mut sql, " LIMIT ?", (q.limit.min(i64::MAX as usize) as i64).into());
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(&sql)?;
        let rows = stmt.query_map(rusqlite::params_from_iter(args), log_row)?.collect::<rusqlite::Result<_>>()?;
        Ok(rows)
    }

    fn entry_by_id(&self, id: &str) -> Result<Option<LogEntry>> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(&format!("SELECT {LOG_COLUMNS} FROM log WHERE id = ?1"))?;
        Ok(stmt.query_row([id], log_row).optional()?)
    }

    fn entry_by_key(&self, sender_id: &str, key: &str) -> Result<Option<LogEntry>> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(&format!("SELECT {LOG_COLUMNS} FROM log WHERE sender_id = ?1 AND idempotency_key = ?2"))?;
        Ok(stmt.query_row([sender_id, key], log_row).optional()?)
    }

    fn delivery(&self, message_id: &str, peer_id: &str) -> Result<Option<DeliveryRecord>> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(&format!("SELECT {DELIVERY_COLUMNS} FROM deliveries WHERE message_id = ?1 AND peer_id = ?2"))?;
        Ok(stmt.query_row([message_id, peer_id], delivery_row).optional()?)
    }

    fn deliveries(&self, message_id: &str) -> Result<Vec<DeliveryRecord>> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(&format!("SELECT {DELIVERY_COLUMNS} FROM deliveries WHERE message_id = ?1"))?;
        let rows = stmt.query_map([message_id], delivery_row)?.collect::<rusqlite::Result<_>>()?;
        Ok(rows)
    }

    fn save_delivery(&self, d: &DeliveryRecord) -> Result<()> {
        let conn = self.conn();
        let mut stmt =
            conn.prepare_cached(&format!("INSERT OR REPLACE INTO deliveries ({DELIVERY_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5)"))?;
        stmt.execute(params![d.message_id, d.peer_id, d.state.as_str(), d.detail, micros(d.updated_at)])?;
        Ok(())
    }

    fn record(&self, space: &str, key: &str) -> Result<Option<Vec<u8>>> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached("SELECT value FROM records WHERE space = ?1 AND key = ?2")?;
        Ok(stmt.query_row([space, key], |r| r.get(0)).optional()?)
    }

    fn put_record(&self, space: &str, key: &str, value: &[u8], expires: Option<DateTime<Utc>>) -> Result<()> {
        let conn = self.conn();
        // expired records go as new ones come: never many, and no timer to keep
        conn.prepare_cached("DELETE FROM records WHERE expires_at < ?1")?.execute([micros(Utc::now())])?;
        let mut stmt = conn.prepare_cached("INSERT OR REPLACE INTO records (space, key, value, expires_at) VALUES (?1, ?2, ?3, ?4)")?;
        stmt.execute(params![space, key, value, expires.map(micros)])?;
        Ok(())
    }

    fn take_record(&self, space: &str, key: &str) -> Result<Option<Vec<u8>>> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached("DELETE FROM records WHERE space = ?1 AND key = ?2 RETURNING value")?;
        let taken: Vec<Vec<u8>> = stmt.query_map([space, key], |r| r.get(0))?.collect::<rusqlite::Result<_>>()?;
        Ok(taken.into_iter().next())
    }
}

const DELIVERY_COLUMNS: &str = "message_id, peer_id, state, detail, updated_at";

fn delivery_row(r: &Row<'_>) -> rusqlite::Result<DeliveryRecord> {
    let state: String = r.get(2)?;
    Ok(DeliveryRecord {
        message_id: r.get(0)?,
        peer_id: r.get(1)?,
        // a state this version does not know reads as the earliest
        state: serde_json::from_value(serde_json::Value::String(state)).unwrap_or(DeliveryState::Stored),
        detail: r.get(3)?,
        updated_at: time(r.get(4)?),
    })
}

#[cfg(test)]
mod tests {
    use super::super::contract;
    use super::*;

    #[test]
    fn groups() {
        contract::groups(&SqliteStore::open_in_memory().unwrap());
    }

    #[test]
    fn records() {
        contract::records(&SqliteStore::open_in_memory().unwrap());
    }

    #[test]
    fn principals_and_peers() {
        contract::principals_and_peers(&SqliteStore::open_in_memory().unwrap());
    }

    #[test]
    fn peer_lists_follow_writes() {
        contract::peer_lists_follow_writes(&SqliteStore::open_in_memory().unwrap());
    }

    #[test]
    fn deliveries() {
        contract::deliveries(&SqliteStore::open_in_memory().unwrap());
    }

    #[test]
    fn log() {
        contract::log(&SqliteStore::open_in_memory().unwrap());
        contract::idempotency_keys(&SqliteStore::open_in_memory().unwrap());
        contract::long_logs(&SqliteStore::open_in_memory().unwrap());
    }

    #[test]
    fn survives_reopen_and_sets_up_a_private_dir() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        {
            let store = SqliteStore::open_dir(&data, Synchronous::Normal).unwrap();
            contract::log(&store);
        }
        let store = SqliteStore::open_dir(&data, Synchronous::Full).unwrap();
        assert_eq!(store.head_seq("g").unwrap(), 6);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&data).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o700);
        }
        let journal: String = store.conn().query_row("PRAGMA journal_mode", [], |r| r.get(0)).unwrap();
        assert_eq!(journal, "wal");
    }

    #[test]
    fn the_wal_is_checkpointed_by_the_store_s_own_thread() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open_dir(dir.path(), Synchronous::Normal).unwrap();
        let db_bytes = || std::fs::metadata(dir.path().join(DB_FILE)).unwrap().len();
        let before = db_bytes();
        // far below the backstop: SQLite itself would checkpoint none of this
        for i in 0..CHECKPOINT_EVERY + 8 {
            store
                .append(NewEntry {
                    group_id: "g".into(),
                    id: format!("m{i}"),
                    kind: EventKind::Message,
                    sender_id: "a".into(),
                    sender_name: "a".into(),
                    sender_kind: PeerKind::Agent,
                    recipient_id: None,
                    recipient_name: None,
                    body: "x".repeat(2000),
                    created_at: Utc::now(),
                    idempotency_key: None,
                })
                .unwrap();
        }
        // the file the checkpointer syncs ahead of each checkpoint
        assert!(wal_path(&dir.path().join(DB_FILE)).exists());
        // the pages reach the database file only through a checkpoint
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while db_bytes() <= before {
            assert!(std::time::Instant::now() < deadline, "no checkpoint after {CHECKPOINT_EVERY} commits");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let backstop: u32 = store.conn().query_row("PRAGMA wal_autocheckpoint", [], |r| r.get(0)).unwrap();
        assert_eq!(backstop, WAL_BACKSTOP_PAGES);
        drop(store); // stops the checkpointer thread
        let reopened = SqliteStore::open_dir(dir.path(), Synchronous::Normal).unwrap();
        assert_eq!(reopened.head_seq("g").unwrap(), u64::from(CHECKPOINT_EVERY + 8));
    }

    #[test]
    fn a_second_server_on_the_same_data_dir_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let _first = SqliteStore::open_dir(dir.path(), Synchronous::Normal).unwrap();
        match SqliteStore::open_dir(dir.path(), Synchronous::Normal) {
            Err(e @ StoreError::InUse { .. }) => assert!(e.to_string().contains("in use by another process"), "{e}"),
            Err(other) => panic!("unexpected error: {other}"),
            Ok(_) => panic!("two stores share one database"),
        }
    }

    #[test]
    fn peer_lists_stay_under_their_cap() {
        let store = SqliteStore::open_in_memory().unwrap();
        store.create_group(&GroupRecord { group_id: "g".into(), join_key_hash: None, created_at: Utc::now(), renumbered: None }).unwrap();
        let principal = store.create_principal(&[1; 32], Utc::now()).unwrap();
        let peer = |id: &str| PeerRecord {
            peer_id: id.into(),
            group_id: "g".into(),
            principal_id: principal,
            display_name: id.into(),
            kind: PeerKind::Agent,
            requested_name: None,
            hostname: "h".into(),
            working_directory: format!("/{id}"),
            git_branch: None,
            joined_at: time(0),
            last_seen: time(0),
            left_at: None,
            read_seq: 0,
            daemon_id: None,
        };
        store.save_peer(&peer("a")).unwrap();
        store.save_peer(&peer("b")).unwrap();
        assert_eq!(store.active_members("g").unwrap(), 2);
        assert_eq!(store.peers_of_principal(principal).unwrap().len(), 2);
        let held = store.peer_lists().bytes;
        assert!(held > 4 * size_of::<PeerRecord>(), "{held}");
        // one more list than fits: every list is dropped first
        store.peer_lists().bytes = PEER_LISTS_BYTES - 1;
        store.peer_lists().by_group.clear();
        assert_eq!(store.peers_in_group("g").unwrap().len(), 2);
        let lists = store.peer_lists();
        assert_eq!((lists.by_group.len(), lists.by_principal.len()), (1, 0));
        assert!(lists.bytes < held, "only the group's list is counted: {}", lists.bytes);
        drop(lists);
        // a list of nobody still counts
        let before = store.peer_lists().bytes;
        assert!(store.peers_in_group("nobody-here").unwrap().is_empty());
        assert!(store.peer_lists().bytes > before);
    }

    #[test]
    fn migrates_a_version_1_database_keeping_its_rows() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v1.sqlite3");
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(MIGRATIONS[0]).unwrap();
            conn.pragma_update(None, "user_version", 1).unwrap();
            conn.execute_batch(
                "INSERT INTO groups VALUES ('g', NULL, 0);
                 INSERT INTO principals VALUES (1, x'01', 0);
                 INSERT INTO peers VALUES ('p1', 'g', 1, 'h:d', NULL, 'h', '/d', NULL, 0, 0, NULL, 4);",
            )
            .unwrap();
        }
        let store = SqliteStore::open(&path, Synchronous::Normal).unwrap();
        let version: i64 = store.conn().query_row("PRAGMA user_version", [], |r| r.get(0)).unwrap();
        assert_eq!(version, MIGRATIONS.len() as i64);
        let peer = store.peer("p1").unwrap().unwrap();
        assert_eq!((peer.read_seq, peer.daemon_id), (4, None));
    }

    #[test]
    fn refuses_a_newer_schema() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.sqlite3");
        Connection::open(&path).unwrap().pragma_update(None, "user_version", 99).unwrap();
        let err = SqliteStore::open(&path, Synchronous::Normal).err().unwrap();
        assert!(err.to_string().contains("schema version 99"), "{err}");
    }
}
