//! Everything in memory: the seed's behaviour, for `--ephemeral` and tests.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use chrono::{DateTime, Utc};

use super::{DeliveryRecord, GroupRecord, LogEntry, LogQuery, NewEntry, PeerRecord, PrincipalId, Result, Store, StoreError};

#[derive(Default)]
pub struct MemoryStore {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    groups: HashMap<String, GroupRecord>,
    principals: HashMap<[u8; 32], PrincipalId>,
    daemons: HashMap<[u8; 32], String>,
    /// Ordered by id so listings are stable, as in SQLite.
    peers: BTreeMap<String, PeerRecord>,
    logs: HashMap<String, Vec<LogEntry>>,
    /// Log entry id → (group, seq).
    ids: HashMap<String, (String, u64)>,
    /// (sender, idempotency key) → log entry id.
    keys: HashMap<(String, String), String>,
    /// Message id → peer id → record.
    deliveries: HashMap<String, BTreeMap<String, DeliveryRecord>>,
    /// (space, key) → value.
    records: HashMap<(String, String), Vec<u8>>,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        crate::lock(&self.inner)
    }
}

impl super::Shared for MemoryStore {}

impl Store for MemoryStore {
    fn group(&self, group_id: &str) -> Result<Option<GroupRecord>> {
        Ok(self.lock().groups.get(group_id).cloned())
    }

    fn create_group(&self, group: &GroupRecord) -> Result<()> {
        let mut inner = self.lock();
        if inner.groups.contains_key(&group.group_id) {
            return Err(StoreError::Conflict(format!("group {}", group.group_id)));
        }
        inner.groups.insert(group.group_id.clone(), group.clone());
        Ok(())
    }

    fn create_principal(&self, token_hash: &[u8; 32], _at: DateTime<Utc>) -> Result<PrincipalId> {
        let mut inner = self.lock();
        if inner.principals.contains_key(token_hash) {
            return Err(StoreError::Conflict("token".into()));
        }
        let id = inner.principals.len() as PrincipalId + 1;
        inner.principals.insert(*token_hash, id);
        Ok(id)
    }

    fn principal_by_token(&self, token_hash: &[u8; 32]) -> Result<Option<PrincipalId>> {
        Ok(self.lock().principals.get(token_hash).copied())
    }

    fn create_daemon(&self, daemon_id: &str, token_hash: &[u8; 32], _hostname: &str, _at: DateTime<Utc>) -> Result<()> {
        let mut inner = self.lock();
        if inner.daemons.contains_key(token_hash) {
            return Err(StoreError::Conflict("daemon token".into()));
        }
        inner.daemons.insert(*token_hash, daemon_id.to_owned());
        Ok(())
    }

    fn daemon_by_token(&self, token_hash: &[u8; 32]) -> Result<Option<String>> {
        Ok(self.lock().daemons.get(token_hash).cloned())
    }

    fn peer(&self, peer_id: &str) -> Result<Option<PeerRecord>> {
        Ok(self.lock().peers.get(peer_id).cloned())
    }

    fn peer_by_origin(
        &self,
        group_id: &str,
        hostname: &str,
        working_directory: &str,
        requested_name: Option<&str>,
    ) -> Result<Option<PeerRecord>> {
        Ok(self
            .lock()
            .peers
            .values()
            .find(|p| {
                p.group_id == group_id
                    && p.hostname == hostname
                    && p.working_directory == working_directory
                    && p.requested_name.as_deref() == requested_name
            })
            .cloned())
    }

    fn peers_in_group(&self, group_id: &str) -> Result<Vec<PeerRecord>> {
        Ok(self.lock().peers.values().filter(|p| p.group_id == group_id).cloned().collect())
    }

    fn peers_of_principal(&self, principal: PrincipalId) -> Result<Vec<PeerRecord>> {
        Ok(self.lock().peers.values().filter(|p| p.principal_id == principal).cloned().collect())
    }

    fn peers_of_daemon(&self, daemon_id: &str) -> Result<Vec<PeerRecord>> {
        Ok(self.lock().peers.values().filter(|p| p.daemon_id.as_deref() == Some(daemon_id)).cloned().collect())
    }

    fn save_peer(&self, peer: &PeerRecord) -> Result<()> {
        self.lock().peers.insert(peer.peer_id.clone(), peer.clone());
        Ok(())
    }

    fn advance_read_seq(&self, peer_id: &str, from: u64, to: u64) -> Result<bool> {
        match self.lock().peers.get_mut(peer_id) {
            Some(p) if p.read_seq == from => {
                p.read_seq = to;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    fn touch_peer(&self, peer_id: &str, at: DateTime<Utc>) -> Result<()> {
        if let Some(p) = self.lock().peers.get_mut(peer_id) {
            p.last_seen = at;
        }
        Ok(())
    }

    fn append(&self, entry: NewEntry) -> Result<LogEntry> {
        let mut inner = self.lock();
        if let Some(key) = &entry.idempotency_key {
            inner.keys.insert((entry.sender_id.clone(), key.clone()), entry.id.clone());
        }
        let log = inner.logs.entry(entry.group_id.clone()).or_default();
        let stored = LogEntry {
            seq: log.len() as u64 + 1,
            group_id: entry.group_id,
            id: entry.id,
            kind: entry.kind,
            sender_id: entry.sender_id,
            sender_name: entry.sender_name,
            sender_kind: entry.sender_kind,
            recipient_id: entry.recipient_id,
            recipient_name: entry.recipient_name,
            body: entry.body,
            created_at: entry.created_at,
        };
        log.push(stored.clone());
        inner.ids.insert(stored.id.clone(), (stored.group_id.clone(), stored.seq));
        Ok(stored)
    }

    fn head_seq(&self, group_id: &str) -> Result<u64> {
        Ok(self.lock().logs.get(group_id).map_or(0, |l| l.len() as u64))
    }

    fn entries(&self, q: &LogQuery) -> Result<Vec<LogEntry>> {
        let inner = self.lock();
        let Some(log) = inner.logs.get(&q.group_id) else { return Ok(Vec::new()) };
        // seq n sits at index n-1
        let start = (q.after_seq as usize).min(log.len());
        let end = q.up_to_seq.map_or(log.len(), |s| (s as usize).min(log.len())).max(start);
        let matching = log[start..end].iter().filter(|e| q.matches(e));
        let out = if q.newest_first { matching.rev().take(q.limit).cloned().collect() } else { matching.take(q.limit).cloned().collect() };
        Ok(out)
    }

    fn entry_by_id(&self, id: &str) -> Result<Option<LogEntry>> {
        let inner = self.lock();
        let Some((group, seq)) = inner.ids.get(id) else { return Ok(None) };
        Ok(inner.logs.get(group).and_then(|log| log.get(*seq as usize - 1)).cloned())
    }

    fn entry_by_key(&self, sender_id: &str, key: &str) -> Result<Option<LogEntry>> {
        let id = self.lock().keys.get(&(sender_id.to_owned(), key.to_owned())).cloned();
        match id {
            Some(id) => self.entry_by_id(&id),
            None => Ok(None),
        }
    }

    fn delivery(&self, message_id: &str, peer_id: &str) -> Result<Option<DeliveryRecord>> {
        Ok(self.lock().deliveries.get(message_id).and_then(|m| m.get(peer_id)).cloned())
    }

    fn deliveries(&self, message_id: &str) -> Result<Vec<DeliveryRecord>> {
        Ok(self.lock().deliveries.get(message_id).map(|m| m.values().cloned().collect()).unwrap_or_default())
    }

    fn save_delivery(&self, record: &DeliveryRecord) -> Result<()> {
        let mut inner = self.lock();
        inner.deliveries.entry(record.message_id.clone()).or_default().insert(record.peer_id.clone(), record.clone());
        Ok(())
    }

    fn record(&self, space: &str, key: &str) -> Result<Option<Vec<u8>>> {
        Ok(self.lock().records.get(&(space.to_owned(), key.to_owned())).cloned())
    }

    fn put_record(&self, space: &str, key: &str, value: &[u8], _expires: Option<DateTime<Utc>>) -> Result<()> {
        self.lock().records.insert((space.to_owned(), key.to_owned()), value.to_vec());
        Ok(())
    }

    fn take_record(&self, space: &str, key: &str) -> Result<Option<Vec<u8>>> {
        Ok(self.lock().records.remove(&(space.to_owned(), key.to_owned())))
    }
}

#[cfg(test)]
mod tests {
    use super::super::contract;
    use super::MemoryStore;

    #[test]
    fn groups() {
        contract::groups(&MemoryStore::new());
    }

    #[test]
    fn principals_and_peers() {
        contract::principals_and_peers(&MemoryStore::new());
    }

    #[test]
    fn peer_lists_follow_writes() {
        contract::peer_lists_follow_writes(&MemoryStore::new());
    }

    #[test]
    fn log() {
        contract::log(&MemoryStore::new());
        contract::idempotency_keys(&MemoryStore::new());
        contract::long_logs(&MemoryStore::new());
    }

    #[test]
    fn deliveries() {
        contract::deliveries(&MemoryStore::new());
    }

    #[test]
    fn records() {
        contract::records(&MemoryStore::new());
    }
}
