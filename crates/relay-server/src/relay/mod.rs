//! The relay itself, free of any transport: registration, messages, cursors, presence and
//! the live fan-out. The MCP tools (`mcp`) and the event streams (`sse`) are thin layers
//! over this.

mod console;
mod messages;
mod presence;
mod reading;
mod receipts;
mod registration;
mod tokens;

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use chrono::{DateTime, Utc};
use relay_proto::{
    Addressed, DeliveryState, Event, EventKind, MessageKind, MessageStatus, PeerInfo, PeerKind, PeerReceipt, PeerRef, RecipientStatus,
    Sent, StoredMessage, validate,
};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use crate::clock::Clock;
use crate::error::RelayError;
use crate::live::{Fanout, Live};
use crate::lock;
use crate::metrics::Metrics;
use crate::rate::Buckets;
use crate::secrets;
use crate::store::{DeliveryRecord, GroupRecord, Held, LogEntry, LogQuery, NewEntry, PeerRecord, PrincipalId, Store};

type Result<T> = std::result::Result<T, RelayError>;
use tokens::TokenCache;

pub use console::{Human, HumanView, Session, TimelineQuery};
pub use presence::Audience;
pub use reading::{HistoryRequest, Inbox, is_for, stored_message};
pub use receipts::ReceiptNote;
pub use registration::{RegisterRequest, Registration};

/// Bounds on what one caller can do.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_message_bytes: usize,
    /// Sustained messages per second per peer.
    pub rate_per_second: f64,
    /// Messages a peer may send at once before the rate applies.
    pub rate_burst: u32,
    /// New peers one client address may register per minute (and at once).
    pub registrations_per_minute: u32,
    /// Live events a stream may fall behind before it is closed (it can resume).
    pub stream_buffer: usize,
    /// Bytes of new messages kept in memory for the streams, server-wide; older ones are
    /// read from the store.
    pub live_buffer_bytes: usize,
    pub require_join_keys: bool,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_message_bytes: validate::DEFAULT_MAX_MESSAGE_BYTES,
            rate_per_second: 10.0,
            rate_burst: 50,
            registrations_per_minute: 30,
            stream_buffer: 1024,
            live_buffer_bytes: 64 << 20,
            require_join_keys: false,
        }
    }
}

/// Who is calling: the holder of one token, a peer in each group it joined.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub principal: PrincipalId,
    pub token: String,
}

fn millis(wait: std::time::Duration) -> u64 {
    wait.as_millis().try_into().unwrap_or(u64::MAX)
}

pub struct Relay {
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    limits: Limits,
    pub metrics: Arc<Metrics>,
    /// The groups with open streams on this node, and what they are sent.
    fanout: Arc<Fanout>,
    /// Held while a delivery state moves, so two reports cannot both move it.
    delivering: Mutex<()>,
    /// Held for a whole registration (with the group's lease in a cluster, see
    /// `registering_in`): no two can race to create the same peer or group.
    registering: Mutex<()>,
    /// Held while a human's record is read and written back (pairing, signing out).
    humans: Mutex<()>,
    streams: Mutex<HashMap<String, usize>>,
    /// Sends per peer.
    sends: Buckets<String>,
    /// New peers per client address.
    registrations: Buckets<IpAddr>,
    /// Wrong join keys per group and address: guessing is slow, and costs no password
    /// hashing once refused.
    wrong_keys: Buckets<(String, Option<IpAddr>)>,
    known_tokens: TokenCache,
}

/// Wrong join keys a group takes per minute (and at once) before it refuses to check more.
const WRONG_KEYS_PER_MINUTE: u32 = 10;

impl Relay {
    pub fn new(store: Arc<dyn Store>, clock: Arc<dyn Clock>, limits: Limits) -> Self {
        let metrics = Arc::new(Metrics::default());
        Self {
            store,
            clock,
            fanout: Fanout::new(limits.stream_buffer, limits.live_buffer_bytes, metrics.clone()),
            metrics,
            delivering: Mutex::default(),
            registering: Mutex::default(),
            humans: Mutex::default(),
            streams: Mutex::default(),
            sends: Buckets::new(limits.rate_per_second, limits.rate_burst),
            registrations: Buckets::new(f64::from(limits.registrations_per_minute) / 60.0, limits.registrations_per_minute),
            wrong_keys: Buckets::new(WRONG_KEYS_PER_MINUTE as f64 / 60.0, WRONG_KEYS_PER_MINUTE),
            known_tokens: TokenCache::default(),
            limits,
        }
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    pub fn store(&self) -> &dyn Store {
        &*self.store
    }

    /// The caller's peers that have not left their group.
    /// A token from `buckets` for `key`: from the cluster's shared bucket `shared_key` when
    /// the store is shared (a client may reach every node), else from this node's; how long
    /// until one is there when none is.
    fn take_token<K: Hash + Eq + Clone>(
        &self,
        buckets: &Buckets<K>,
        key: &K,
        shared_key: impl FnOnce() -> String,
    ) -> Result<std::result::Result<(), Duration>> {
        if self.store.shared() {
            return Ok(self.store.take_token(&shared_key(), buckets.per_second, buckets.burst)?);
        }
        Ok(buckets.take(key))
    }

    /// Puts back a token [`Self::take_token`] took for something that turned out not to count.
    fn give_back_token<K: Hash + Eq + Clone>(&self, buckets: &Buckets<K>, key: &K, shared_key: impl FnOnce() -> String) -> Result<()> {
        if self.store.shared() {
            return Ok(self.store.give_token(&shared_key(), buckets.per_second, buckets.burst)?);
        }
        buckets.give_back(key);
        Ok(())
    }

    fn active_peers(&self, caller: &Caller) -> Result<Vec<PeerRecord>> {
        let mut peers = self.store.peers_of_principal(caller.principal)?;
        peers.retain(|p| p.left_at.is_none());
        Ok(peers)
    }

    /// The caller's peer in `group`, or in its only group when `group` is `None`.
    fn peer_in(&self, caller: &Caller, group: Option<&str>) -> Result<PeerRecord> {
        let mut peers = self.active_peers(caller)?;
        let yours = || {
            let mut groups: Vec<String> = peers.iter().map(|p| p.group_id.clone()).collect();
            groups.sort();
            groups
        };
        match group {
            Some(g) => match peers.iter().position(|p| p.group_id == g) {
                Some(i) => Ok(peers.swap_remove(i)),
                None => Err(RelayError::NotMember { group: g.to_owned(), yours: yours() }),
            },
            None => match peers.len() {
                0 => Err(RelayError::NotRegistered),
                1 => Ok(peers.remove(0)),
                _ => Err(RelayError::WhichGroup { yours: yours() }),
            },
        }
    }
}

fn is_other_member(p: &PeerRecord, me: &PeerRecord) -> bool {
    p.left_at.is_none() && p.peer_id != me.peer_id && p.group_id == me.group_id
}

/// Finds `to` among `peers` by id, then exact display name, then display name ignoring case.
fn resolve_peer<'a>(to: &str, peers: &'a [PeerRecord]) -> Result<&'a PeerRecord> {
    let to_trimmed = to.trim().trim_start_matches('@');
    let rules: [&dyn Fn(&PeerRecord) -> bool; 3] =
        [&|p| p.peer_id == to_trimmed, &|p| p.display_name == to_trimmed, &|p| p.display_name.eq_ignore_ascii_case(to_trimmed)];
    for rule in rules {
        let matches: Vec<&PeerRecord> = peers.iter().filter(|p| rule(p)).collect();
        match matches.len() {
            0 => continue,
            1 => return Ok(matches[0]),
            _ => {
                return Err(RelayError::AmbiguousPeer {
                    to: to.to_owned(),
                    matches: matches.iter().map(|p| format!("{} ({} in {})", p.peer_id, p.display_name, p.group_id)).collect(),
                });
            }
        }
    }
    let mut candidates: Vec<String> =
        peers.iter().filter(|p| p.left_at.is_none()).map(|p| format!("{} ({} in {})", p.display_name, p.peer_id, p.group_id)).collect();
    candidates.sort();
    Err(RelayError::UnknownPeer { to: to.to_owned(), candidates })
}
