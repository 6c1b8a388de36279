//! `relay-server migrate --from DIR --to nats://…`: a single server's SQLite data into an
//! empty cluster's JetStream, once, with every relay-server stopped.
//!
//! Sequence numbers change: the cluster numbers all groups' entries in one stream. Each
//! group's entries are copied in one run, so its new numbers are its old ones plus one
//! offset, and the log is made to start above every old number, so an old number can be
//! told from a new one. The group records the offset ([`Renumbered`]): a relayd or any
//! client that resumes with an old `Last-Event-ID` gets exactly what it missed.

use std::collections::HashMap;

use super::nats::NatsStore;
use super::sqlite::SqliteStore;
use super::{GroupRecord, LogQuery, NewEntry, Renumbered, Result, Store, StoreError};

const PAGE: usize = 1000;

/// What was copied.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Migrated {
    pub groups: usize,
    pub principals: usize,
    pub daemons: usize,
    pub peers: usize,
    pub entries: usize,
    pub deliveries: usize,
}

pub fn migrate(from: &SqliteStore, to: &NatsStore, progress: &mut dyn FnMut(&str)) -> Result<Migrated> {
    if !to.is_empty()? {
        return Err(StoreError::Conflict("relay data in the cluster (migrate fills an empty one only)".into()));
    }
    let snapshot = from.snapshot()?;
    let mut heads = HashMap::new();
    for group in &snapshot.groups {
        heads.insert(group.group_id.clone(), from.head_seq(&group.group_id)?);
    }
    to.start_log_at(heads.values().max().copied().unwrap_or(0) + 1)?;
    let mut done = Migrated::default();
    for (hash, id, _) in &snapshot.principals {
        to.import_principal(hash, *id)?;
        done.principals += 1;
    }
    for (id, hash, host, at) in &snapshot.daemons {
        to.create_daemon(id, hash, host, *at)?;
        done.daemons += 1;
    }
    let mut offsets = HashMap::new();
    for group in &snapshot.groups {
        let (copied, offset) = copy_log(from, to, &group.group_id, &snapshot.keys)?;
        let renumbered = offset.map(|offset| Renumbered { up_to: heads[&group.group_id], offset });
        to.create_group(&GroupRecord { renumbered, ..group.clone() })?;
        offsets.insert(group.group_id.clone(), offset.unwrap_or(0));
        done.entries += copied;
        done.groups += 1;
        progress(&format!("group {}: {copied} entries", group.group_id));
    }
    for peer in &snapshot.peers {
        let mut peer = peer.clone();
        if peer.read_seq > 0 {
            peer.read_seq += offsets.get(&peer.group_id).copied().unwrap_or(0);
        }
        to.save_peer(&peer)?;
        done.peers += 1;
    }
    for record in &snapshot.deliveries {
        to.save_delivery(record)?;
        done.deliveries += 1;
    }
    for (space, key, value, expires) in &snapshot.records {
        to.put_record(space, key, value, *expires)?;
    }
    Ok(done)
}

/// Copies one group's log in order; how many entries, and new minus old sequence number.
fn copy_log(from: &SqliteStore, to: &NatsStore, group_id: &str, keys: &HashMap<String, String>) -> Result<(usize, Option<u64>)> {
    let (mut after, mut copied, mut offset) = (0, 0, None);
    loop {
        let page = from.entries(&LogQuery { group_id: group_id.to_owned(), after_seq: after, limit: PAGE, ..Default::default() })?;
        if page.is_empty() {
            return Ok((copied, offset));
        }
        for e in page {
            let new = to.append(NewEntry {
                group_id: e.group_id.clone(),
                id: e.id.clone(),
                kind: e.kind,
                sender_id: e.sender_id.clone(),
                sender_name: e.sender_name.clone(),
                sender_kind: e.sender_kind,
                recipient_id: e.recipient_id.clone(),
                recipient_name: e.recipient_name.clone(),
                body: e.body.clone(),
                created_at: e.created_at,
                idempotency_key: keys.get(&e.id).cloned(),
            })?;
            let moved = new.seq - e.seq;
            if *offset.get_or_insert(moved) != moved {
                return Err(StoreError::Conflict(format!(
                    "another writer in the cluster's log while copying group {group_id} (is a relay-server running on it?)"
                )));
            }
            after = e.seq;
            copied += 1;
        }
    }
}
