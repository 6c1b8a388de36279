//! The relay itself, free of any transport: registration, messages, cursors, presence and
//! the live fan-out. The MCP tools (`mcp`) and the event streams (`sse`) are thin layers
//! over this.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use relay_proto::{
    Addressed, DeliveryState, Event, EventKind, MessageKind, MessageStatus, PeerInfo, PeerReceipt, PeerRef, RecipientStatus, Sent,
    StoredMessage, validate,
};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use crate::clock::Clock;
use crate::error::RelayError;
use crate::live::{Live, LiveEntry, Recent};
use crate::lock;
use crate::metrics::Metrics;
use crate::rate::Buckets;
use crate::secrets;
use crate::store::{DeliveryRecord, GroupRecord, LogEntry, LogQuery, NewEntry, PeerRecord, PrincipalId, Store};

type Result<T> = std::result::Result<T, RelayError>;

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

/// What `register` needs; the MCP tool's arguments and the daemon API's body.
#[derive(Debug, Clone, Default, Deserialize, schemars::JsonSchema)]
pub struct RegisterRequest {
    /// The group to join (created if new): letters, digits, '.', '_' and '-'.
    pub group_id: String,
    /// This machine's hostname.
    pub hostname: String,
    /// The absolute path you are working in.
    pub working_directory: String,
    /// The current git branch, if any.
    #[serde(default)]
    pub git_branch: Option<String>,
    /// A display name; defaults to `host:directory-name`.
    #[serde(default)]
    pub name: Option<String>,
    /// The group's join key: sets it when creating a group, proves it when joining one.
    #[serde(default)]
    pub join_key: Option<String>,
    /// Set when a daemon (relayd) registers the peer for a local pane.
    #[serde(skip)]
    pub daemon_id: Option<String>,
    /// The client's address: new peers are limited per address.
    #[serde(skip)]
    pub source: Option<IpAddr>,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Registration {
    pub peer_id: String,
    pub display_name: String,
    pub group_id: String,
    pub token: String,
    /// False when this host and directory were already registered: the same peer is back.
    pub new_peer: bool,
    pub group_created: bool,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Inbox {
    pub messages: Vec<StoredMessage>,
    /// More unread messages wait beyond this batch.
    pub more: bool,
}

#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct ReceiptOutcome {
    /// Receipts that moved a message's state.
    pub moved: usize,
    /// Receipts that changed nothing: the state was there or past it already.
    pub unchanged: usize,
    /// Receipts refused, each with why.
    pub rejected: Vec<serde_json::Value>,
}

/// A receipt on its way to the streams of the message's sender, and (read, held, failed) of
/// the recipient whose copy it is, so its pane knows when a reminder is no longer needed.
#[derive(Debug)]
pub struct ReceiptNote {
    pub event: Event,
    /// The message's sender and the recipient: the only peers that see the receipt.
    pub peers: [String; 2],
    /// The daemons they were registered through, whose group streams carry it too.
    pub daemons: [Option<String>; 2],
}

impl ReceiptNote {
    pub fn is_for(&self, audience: &Audience) -> bool {
        let addressed = Addressed::of(&self.event);
        match audience {
            Audience::Peer(peer_id) => addressed.visible_to(peer_id),
            // a daemon's stream carries what its own peers hear
            Audience::Daemon(daemon_id) => self
                .peers
                .iter()
                .zip(&self.daemons)
                .any(|(peer, daemon)| daemon.as_deref() == Some(daemon_id.as_str()) && addressed.visible_to(peer)),
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct HistoryRequest {
    pub group_id: Option<String>,
    pub with_peer: Option<String>,
    pub filter: Option<String>,
    pub start_time: Option<String>,
    pub end_time: Option<String>,
    pub limit: Option<usize>,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct History {
    pub group_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub with_peer: Option<PeerRef>,
    pub messages: Vec<StoredMessage>,
    /// Older matching messages exist beyond `limit`.
    pub truncated: bool,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Left {
    pub group_id: String,
    pub peer_id: String,
    pub display_name: String,
}

/// What checking a join key outside the registration lock found.
#[derive(Default)]
struct JoinKeyChecked {
    /// The group's key hash the key was checked against (None: no group, or no key needed).
    existing_hash: Option<String>,
    /// The hash to create the group with.
    hash_for_new_group: Option<String>,
}

/// The address a client's allowances are kept under: IPv4 as itself (also when it comes
/// IPv4-mapped), IPv6 by its /64, which one host or user usually holds whole.
fn client_bucket(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let s = v6.segments();
            IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
        }
        v4 => v4,
    }
}

fn millis(wait: std::time::Duration) -> u64 {
    wait.as_millis().try_into().unwrap_or(u64::MAX)
}

pub const DEFAULT_HISTORY_LIMIT: usize = 50;
pub const MAX_IDEMPOTENCY_KEY_CHARS: usize = 128;
pub const MAX_HISTORY_LIMIT: usize = 1000;
pub const DEFAULT_READ_LIMIT: usize = 200;
/// How many log entries one store query reads at a time while filtering.
const PAGE: usize = 512;
/// Regexes are compiled from agents' input: keep them small.
const MAX_REGEX_BYTES: usize = 1 << 20;

pub struct Relay {
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    limits: Limits,
    pub metrics: Metrics,
    /// Held while appending and publishing, so live events leave in sequence order.
    live: Mutex<HashMap<String, broadcast::Sender<Live>>>,
    /// The new entries the live channels refer to (taken inside `live`).
    recent: Mutex<Recent>,
    /// Held while a delivery state moves, so two reports cannot both move it.
    delivering: Mutex<()>,
    /// Held for a whole registration: no two can race to create the same peer or group.
    registering: Mutex<()>,
    /// Held while a cursor moves, so two concurrent reads never return the same message.
    reading: Mutex<()>,
    streams: Mutex<HashMap<String, usize>>,
    /// Sends per peer.
    sends: Buckets<String>,
    /// New peers per client address.
    registrations: Buckets<IpAddr>,
    /// Wrong join keys per group and address: guessing is slow, and costs no password
    /// hashing once refused.
    wrong_keys: Buckets<(String, Option<IpAddr>)>,
    /// Token hash → principal, for the lookup every call makes. A token never changes
    /// hands, so entries never go stale; the map is cleared when it grows too large.
    known_tokens: Mutex<HashMap<[u8; 32], PrincipalId>>,
}

/// Wrong join keys a group takes per minute (and at once) before it refuses to check more.
const WRONG_KEYS_PER_MINUTE: u32 = 10;

/// Tokens remembered before the cache starts over.
const TOKEN_CACHE: usize = 100_000;

impl Relay {
    pub fn new(store: Arc<dyn Store>, clock: Arc<dyn Clock>, limits: Limits) -> Self {
        Self {
            store,
            clock,
            metrics: Metrics::default(),
            live: Mutex::default(),
            recent: Mutex::new(Recent::new(limits.live_buffer_bytes)),
            delivering: Mutex::default(),
            registering: Mutex::default(),
            reading: Mutex::default(),
            streams: Mutex::default(),
            sends: Buckets::new(limits.rate_per_second, limits.rate_burst),
            registrations: Buckets::new(f64::from(limits.registrations_per_minute) / 60.0, limits.registrations_per_minute),
            wrong_keys: Buckets::new(WRONG_KEYS_PER_MINUTE as f64 / 60.0, WRONG_KEYS_PER_MINUTE),
            known_tokens: Mutex::default(),
            limits,
        }
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    pub fn store(&self) -> &dyn Store {
        &*self.store
    }

    /// A new daemon credential for relayd on `hostname`: its id and token.
    pub fn create_daemon(&self, hostname: &str) -> Result<(String, String)> {
        validate::hostname(hostname)?;
        let (daemon_id, token) = (secrets::new_id("d_"), secrets::new_token());
        self.store.create_daemon(&daemon_id, &secrets::token_hash(&token), hostname, self.clock.now())?;
        Ok((daemon_id, token))
    }

    /// The daemon holding `token`.
    pub fn identify_daemon(&self, token: &str) -> Result<String> {
        self.store.daemon_by_token(&secrets::token_hash(token))?.ok_or(RelayError::UnknownToken)
    }

    /// Whether the daemon registered an active peer in the group: the right to its stream.
    pub fn daemon_in_group(&self, daemon_id: &str, group_id: &str) -> Result<bool> {
        validate::group_id(group_id)?;
        Ok(self.store.peers_in_group(group_id)?.iter().any(|p| p.left_at.is_none() && p.daemon_id.as_deref() == Some(daemon_id)))
    }

    /// Removes a peer the daemon registered from its group.
    pub fn daemon_leave(&self, daemon_id: &str, peer_id: &str) -> Result<Option<Left>> {
        let Some(peer) = self.store.peer(peer_id)?.filter(|p| p.daemon_id.as_deref() == Some(daemon_id)) else {
            return Ok(None);
        };
        if peer.left_at.is_some() {
            return Ok(Some(Left { group_id: peer.group_id, peer_id: peer.peer_id, display_name: peer.display_name }));
        }
        let caller = Caller { principal: peer.principal_id, token: String::new() };
        self.leave_group(&caller, &peer.group_id).map(Some)
    }

    /// The peer `peer_id` as a caller, when this daemon registered it and it is still in
    /// its group: a daemon acts for its own peers with its own credential.
    pub fn daemon_peer(&self, daemon_id: &str, peer_id: &str) -> Result<Option<Caller>> {
        let peer = self.store.peer(peer_id)?.filter(|p| p.daemon_id.as_deref() == Some(daemon_id) && p.left_at.is_none());
        Ok(peer.map(|p| Caller { principal: p.principal_id, token: String::new() }))
    }

    /// The caller holding `token`.
    pub fn identify(&self, token: &str) -> Result<Caller> {
        let hash = secrets::token_hash(token);
        let cached = lock(&self.known_tokens).get(&hash).copied();
        let principal = match cached {
            Some(principal) => principal,
            None => {
                let principal = self.store.principal_by_token(&hash)?.ok_or(RelayError::UnknownToken)?;
                let mut known = lock(&self.known_tokens);
                if known.len() >= TOKEN_CACHE {
                    known.clear();
                }
                known.insert(hash, principal);
                principal
            }
        };
        Ok(Caller { principal, token: token.to_owned() })
    }

    /// Joins a group (creating it if new) as a peer of `caller`, or of a new caller when
    /// there is none. Registering again from the same host, directory and name returns the
    /// same peer, to its own token or daemon only. Slow when a join key is involved (password hashing): call it off the
    /// async threads.
    pub fn register(&self, caller: Option<&Caller>, mut req: RegisterRequest) -> Result<(Registration, Caller)> {
        // clients send "" for "not given"
        for field in [&mut req.git_branch, &mut req.name, &mut req.join_key] {
            if field.as_deref() == Some("") {
                *field = None;
            }
        }
        validate::group_id(&req.group_id)?;
        validate::hostname(&req.hostname)?;
        validate::working_directory(&req.working_directory)?;
        if let Some(branch) = &req.git_branch {
            validate::git_branch(branch)?;
        }
        if let Some(name) = &req.name {
            validate::display_name(name)?;
        }
        if let Some(key) = &req.join_key {
            validate::join_key(key)?;
        }
        // (not from this machine: its agents are its own, and a proxy here must say who it forwards)
        let source = req.source.filter(|ip| !ip.to_canonical().is_loopback()).map(client_bucket);
        if let Some(source) = source
            && self.store.peer_by_origin(&req.group_id, &req.hostname, &req.working_directory, req.name.as_deref())?.is_none()
        {
            // a new peer, by the look of it: before any password hashing (counted below)
            self.registrations.check(&source).map_err(|wait| self.too_many_registrations(wait))?;
        }
        // the join key is checked (or hashed, for a new group) before the registration lock:
        // password hashing takes tens of milliseconds, and nobody else should wait for it
        let mut checked = self.check_join_key(&req, self.store.group(&req.group_id)?.as_ref())?;
        let now = self.clock.now();
        let _registering = lock(&self.registering);

        let group = self.store.group(&req.group_id)?;
        if group.as_ref().and_then(|g| g.join_key_hash.clone()) != checked.existing_hash {
            // the group was created (or made) meanwhile: check against what it is now
            checked = self.check_join_key(&req, group.as_ref())?;
        }
        let existing = self.store.peer_by_origin(&req.group_id, &req.hostname, &req.working_directory, req.name.as_deref())?;
        if let (None, Some(source)) = (&existing, source) {
            self.registrations.take(&source).map_err(|wait| self.too_many_registrations(wait))?;
        }
        let group_created = match group {
            Some(_) => false,
            None => {
                if self.limits.require_join_keys && req.join_key.is_none() {
                    return Err(RelayError::JoinKeyNeededToCreate);
                }
                self.store.create_group(&GroupRecord {
                    group_id: req.group_id.clone(),
                    join_key_hash: checked.hash_for_new_group,
                    created_at: now,
                })?;
                true
            }
        };

        // host, directory and name are visible to every member: registering with them is no
        // proof of being that peer. Only its own token, or the daemon that registered it, is.
        if let Some(peer) = &existing {
            let same_principal = caller.is_some_and(|c| c.principal == peer.principal_id);
            let same_daemon = req.daemon_id.is_some() && req.daemon_id == peer.daemon_id;
            if !same_principal && !same_daemon {
                return Err(RelayError::PeerTaken { group: req.group_id, name: peer.display_name.clone() });
            }
        }
        // A token stands for one agent: at most one peer per group. Another peer in a group
        // where the caller already has one gets a token of its own.
        let keep_caller = match caller {
            Some(c) => {
                let existing_id = existing.as_ref().map(|p| p.peer_id.as_str());
                let mine = self.active_peers(c)?;
                (!mine.iter().any(|p| p.group_id == req.group_id && Some(p.peer_id.as_str()) != existing_id)).then(|| c.clone())
            }
            None => None,
        };
        let caller = match keep_caller {
            Some(c) => c,
            None => {
                let token = secrets::new_token();
                let principal = self.store.create_principal(&secrets::token_hash(&token), now)?;
                Caller { principal, token }
            }
        };

        let new_peer = existing.is_none();
        let (peer, announce) = match existing {
            Some(mut peer) => {
                let rejoined = peer.left_at.take().is_some();
                peer.principal_id = caller.principal;
                peer.git_branch = req.git_branch.clone();
                if req.daemon_id.is_some() {
                    peer.daemon_id = req.daemon_id.clone();
                }
                peer.last_seen = now;
                (peer, rejoined)
            }
            None => {
                let display_name = self.free_display_name(&req)?;
                let peer = PeerRecord {
                    peer_id: secrets::new_id("p_"),
                    group_id: req.group_id.clone(),
                    principal_id: caller.principal,
                    display_name,
                    requested_name: req.name.clone(),
                    hostname: req.hostname.clone(),
                    working_directory: req.working_directory.clone(),
                    git_branch: req.git_branch.clone(),
                    joined_at: now,
                    last_seen: now,
                    left_at: None,
                    // history before joining is not "unread"
                    read_seq: self.store.head_seq(&req.group_id)?,
                    daemon_id: req.daemon_id.clone(),
                };
                (peer, true)
            }
        };
        self.store.save_peer(&peer)?;
        if announce {
            self.publish(membership_entry(&peer, EventKind::PeerJoined, now))?;
        }
        let registration = Registration {
            peer_id: peer.peer_id,
            display_name: peer.display_name,
            group_id: peer.group_id,
            token: caller.token.clone(),
            new_peer,
            group_created,
        };
        Ok((registration, caller))
    }

    /// Checks `req`'s join key against `group` (None: not created yet), or hashes it for a
    /// new group. Wrong keys are counted per group; past the limit none is checked for a while.
    fn check_join_key(&self, req: &RegisterRequest, group: Option<&GroupRecord>) -> Result<JoinKeyChecked> {
        let Some(group) = group else {
            let hash_for_new_group = req.join_key.as_deref().map(secrets::hash_join_key);
            return Ok(JoinKeyChecked { existing_hash: None, hash_for_new_group });
        };
        let Some(hash) = &group.join_key_hash else { return Ok(JoinKeyChecked::default()) };
        let Some(key) = &req.join_key else { return Err(RelayError::JoinKeyRequired(req.group_id.clone())) };
        let refused = |wait| RelayError::TooManyWrongKeys { group: req.group_id.clone(), retry_after_ms: millis(wait) };
        // per address too: a guesser does not lock out members who come from elsewhere. The
        // token is taken before hashing (so parallel guesses are counted) and given back when
        // the key is right
        let guesser = (req.group_id.clone(), req.source.map(client_bucket));
        self.wrong_keys.take(&guesser).map_err(refused)?;
        if !secrets::join_key_matches(key, hash) {
            return Err(RelayError::WrongJoinKey(req.group_id.clone()));
        }
        self.wrong_keys.give_back(&guesser);
        Ok(JoinKeyChecked { existing_hash: Some(hash.clone()), hash_for_new_group: None })
    }

    fn too_many_registrations(&self, wait: std::time::Duration) -> RelayError {
        RelayError::TooManyRegistrations { per_minute: self.limits.registrations_per_minute, retry_after_ms: millis(wait) }
    }

    /// `name`, or `host:last-dir`, made unique in the group with a numeric suffix.
    fn free_display_name(&self, req: &RegisterRequest) -> Result<String> {
        let base = match &req.name {
            Some(name) => name.clone(),
            None => {
                let dir = Path::new(&req.working_directory)
                    .file_name()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_else(|| "root".to_owned());
                let host = req.hostname.split('.').next().unwrap_or(&req.hostname);
                format!("{}:{}", validate::sanitize_name_part(host), validate::sanitize_name_part(&dir))
            }
        };
        let base: String = base.chars().take(validate::MAX_NAME_CHARS - 4).collect();
        // names that look alike are one name: a newcomer does not get to look like a member
        let taken: Vec<String> =
            self.store.peers_in_group(&req.group_id)?.into_iter().map(|p| validate::skeleton(&p.display_name)).collect();
        let mut candidate = base.clone();
        let mut n = 2;
        while taken.contains(&validate::skeleton(&candidate)) {
            candidate = format!("{base}-{n}");
            n += 1;
        }
        Ok(candidate)
    }

    /// The caller's peers that have not left their group.
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

    /// Broadcasts `text`. With a `key` used before by the same peer, nothing new is sent: the
    /// answer is the earlier message (so a client that retries after a lost answer sends once).
    pub fn send_message(&self, caller: &Caller, text: &str, group: Option<&str>, key: Option<&str>) -> Result<Sent> {
        let from = self.peer_in(caller, group)?;
        validate::message(text, self.limits.max_message_bytes)?;
        // everyone active but the sender
        let recipients = self.store.active_members(&from.group_id)?.saturating_sub(1);
        self.send(self.message_entry(&from, None, text, key)?, recipients)
    }

    pub fn send_dm(&self, caller: &Caller, to: &str, text: &str, key: Option<&str>) -> Result<Sent> {
        let own = self.active_peers(caller)?;
        if own.is_empty() {
            return Err(RelayError::NotRegistered);
        }
        if own.iter().any(|p| p.peer_id == to) {
            return Err(RelayError::DmToSelf);
        }
        let mut reachable = Vec::new();
        for mine in &own {
            reachable.extend(self.store.peers_in_group(&mine.group_id)?.into_iter().filter(|p| is_other_member(p, mine)));
        }
        let target = resolve_peer(to, &reachable)?;
        let from = own.into_iter().find(|p| p.group_id == target.group_id).expect("reachable peers share a group");
        validate::message(text, self.limits.max_message_bytes)?;
        self.send(self.message_entry(&from, Some(target), text, key)?, 1)
    }

    /// Stores and publishes a message, or answers with the earlier one of the same key.
    fn send(&self, entry: NewEntry, recipients: usize) -> Result<Sent> {
        // a retry costs no rate token (checked again where it counts, under the live lock)
        if let Some(earlier) = self.earlier_send(&entry)? {
            return Ok(Sent { repeated: true, ..sent(Arc::new(earlier), recipients) });
        }
        self.take_rate_token(&entry.sender_id)?;
        let (stored, repeated) = self.publish(entry)?;
        Ok(Sent { repeated, ..sent(stored, recipients) })
    }

    /// The message the sender already sent with `entry`'s key; an error if that key went
    /// with another text or addressee.
    fn earlier_send(&self, entry: &NewEntry) -> Result<Option<LogEntry>> {
        let Some(key) = &entry.idempotency_key else { return Ok(None) };
        let Some(earlier) = self.store.entry_by_key(&entry.sender_id, key)? else { return Ok(None) };
        if earlier.body != entry.body || earlier.recipient_id != entry.recipient_id {
            return Err(RelayError::BadArgument {
                field: "idempotency_key",
                reason: format!("{key:?} was already used for another message ({}); use a new key for each message", earlier.id),
            });
        }
        Ok(Some(earlier))
    }

    fn message_entry(&self, from: &PeerRecord, to: Option<&PeerRecord>, text: &str, key: Option<&str>) -> Result<NewEntry> {
        if let Some(key) = key {
            validate::single_line("idempotency_key", key, MAX_IDEMPOTENCY_KEY_CHARS)?;
        }
        Ok(NewEntry {
            group_id: from.group_id.clone(),
            id: secrets::new_id("m_"),
            kind: if to.is_some() { EventKind::Dm } else { EventKind::Message },
            sender_id: from.peer_id.clone(),
            sender_name: from.display_name.clone(),
            recipient_id: to.map(|p| p.peer_id.clone()),
            recipient_name: to.map(|p| p.display_name.clone()),
            body: text.to_owned(),
            created_at: self.clock.now(),
            idempotency_key: key.map(str::to_owned),
        })
    }

    /// Commits the entry, then hands it to the group's live streams, in sequence order;
    /// with `true` when it repeated an earlier send of the same key (nothing committed).
    fn publish(&self, entry: NewEntry) -> Result<(Arc<LogEntry>, bool)> {
        let mut live = lock(&self.live);
        if let Some(earlier) = self.earlier_send(&entry)? {
            return Ok((Arc::new(earlier), true));
        }
        let stored = Arc::new(self.store.append(entry)?);
        if let Some(tx) = live.get(&stored.group_id) {
            let mut recent = lock(&self.recent);
            let entry = recent.keep(LiveEntry { entry: stored.clone(), frames: Default::default() });
            self.metrics.live_bytes(recent.held());
            if tx.send(Live::Entry(entry)).is_err() {
                live.remove(&stored.group_id);
            }
        }
        if let Some(kind) = stored.kind.message_kind() {
            self.metrics.message(kind);
        }
        Ok((stored, false))
    }

    /// Live entries of a group, and the sequence number they follow: every entry after it
    /// arrives on the receiver, everything up to it is in the store.
    pub fn subscribe(&self, group_id: &str) -> Result<(broadcast::Receiver<Live>, u64)> {
        let mut live = lock(&self.live);
        let head = self.store.head_seq(group_id)?;
        let rx = match live.get(group_id) {
            Some(tx) => tx.subscribe(),
            None => {
                let (tx, rx) = broadcast::channel(self.limits.stream_buffer.max(1));
                live.insert(group_id.to_owned(), tx);
                rx
            }
        };
        Ok((rx, head))
    }

    fn take_rate_token(&self, peer_id: &str) -> Result<()> {
        self.sends.take(&peer_id.to_owned()).map_err(|wait| RelayError::RateLimited {
            per_second: self.sends.per_second,
            burst: self.sends.burst,
            retry_after_ms: millis(wait),
        })
    }

    /// Every unread broadcast and DM of the caller's peers, oldest first, at most `limit`;
    /// moves their cursors past what it returns.
    pub fn read_new_messages(&self, caller: &Caller, limit: Option<usize>) -> Result<Inbox> {
        let limit = limit.unwrap_or(DEFAULT_READ_LIMIT).clamp(1, MAX_HISTORY_LIMIT);
        let _reading = lock(&self.reading);
        let peers = self.active_peers(caller)?;
        if peers.is_empty() {
            return Err(RelayError::NotRegistered);
        }
        // Per peer: its unread messages (at most `limit`) and how far the scan got.
        let mut found: Vec<(PeerRecord, Vec<LogEntry>, u64)> = Vec::new();
        for peer in peers {
            let head = self.store.head_seq(&peer.group_id)?;
            let query = LogQuery {
                group_id: peer.group_id.clone(),
                up_to_seq: Some(head),
                kinds: Some(vec![EventKind::Message, EventKind::Dm]),
                ..Default::default()
            };
            let (unread, scanned_to) = self.scan(query, peer.read_seq, limit, |e| {
                // what reached the agent with its content (the inbox) is read already
                is_for(e, &peer.peer_id) && !self.already_read(&e.id, &peer.peer_id)
            })?;
            let scanned_to = if unread.len() < limit { head } else { scanned_to };
            found.push((peer, unread, scanned_to));
        }
        let mut all: Vec<(usize, &LogEntry)> =
            found.iter().enumerate().flat_map(|(i, (_, entries, _))| entries.iter().map(move |e| (i, e))).collect();
        all.sort_by(|a, b| (a.1.created_at, &a.1.group_id, a.1.seq).cmp(&(b.1.created_at, &b.1.group_id, b.1.seq)));
        let more = all.len() > limit || found.iter().any(|(_, entries, _)| entries.len() >= limit);
        all.truncate(limit);

        let now = self.clock.now();
        for (i, (peer, entries, scanned_to)) in found.iter().enumerate() {
            let taken: Vec<u64> = all.iter().filter(|(j, _)| *j == i).map(|(_, e)| e.seq).collect();
            let cursor = if taken.len() == entries.len() { *scanned_to } else { taken.iter().copied().max().unwrap_or(peer.read_seq) };
            if cursor != peer.read_seq {
                self.store.set_read_seq(&peer.peer_id, cursor)?;
            }
            self.store.touch_peer(&peer.peer_id, now)?;
        }
        for (i, entry) in &all {
            // the cursor has moved: a failed mark must not lose the messages it returns
            if let Err(e) = self.record_delivery(&found[*i].0, entry, DeliveryState::Read, None) {
                tracing::warn!(error = %e, message = %entry.id, "cannot mark a message read");
            }
        }
        let messages = all.into_iter().map(|(_, e)| stored_message(e)).collect();
        Ok(Inbox { messages, more })
    }

    /// Reads the log page by page after `after`, keeping entries that pass `keep`, until
    /// `limit` are kept or the query runs out. Returns them and the last sequence scanned.
    fn scan(&self, mut query: LogQuery, after: u64, limit: usize, mut keep: impl FnMut(&LogEntry) -> bool) -> Result<(Vec<LogEntry>, u64)> {
        query.after_seq = after;
        query.limit = PAGE;
        query.newest_first = false;
        let mut kept = Vec::new();
        loop {
            let page = self.store.entries(&query)?;
            let exhausted = page.len() < PAGE;
            for entry in page {
                query.after_seq = entry.seq;
                if keep(&entry) {
                    kept.push(entry);
                    if kept.len() == limit {
                        return Ok((kept, query.after_seq));
                    }
                }
            }
            if exhausted {
                return Ok((kept, query.after_seq));
            }
        }
    }

    fn already_read(&self, message_id: &str, peer_id: &str) -> bool {
        matches!(self.store.delivery(message_id, peer_id), Ok(Some(d)) if d.state == DeliveryState::Read)
    }

    /// Moves `recipient`'s copy of `message` to `state` if that is a move forward (see
    /// [`DeliveryState::can_move_to`]), and tells the sender's streams. Returns whether it moved.
    pub fn record_delivery(
        &self,
        recipient: &PeerRecord,
        message: &LogEntry,
        state: DeliveryState,
        detail: Option<String>,
    ) -> Result<bool> {
        if !is_for(message, &recipient.peer_id) {
            return Err(RelayError::UnknownMessage(message.id.clone()));
        }
        let _delivering = lock(&self.delivering);
        let current = self.store.delivery(&message.id, &recipient.peer_id)?.map_or(DeliveryState::Stored, |d| d.state);
        if !current.can_move_to(state) {
            return Ok(false);
        }
        let now = self.clock.now();
        let record = DeliveryRecord {
            message_id: message.id.clone(),
            peer_id: recipient.peer_id.clone(),
            state,
            detail: detail.clone(),
            updated_at: now,
        };
        self.store.save_delivery(&record)?;
        let sender_daemon = self.store.peer(&message.sender_id)?.and_then(|p| p.daemon_id);
        let daemons = [sender_daemon, recipient.daemon_id.clone()];
        let event = Event {
            kind: EventKind::Receipt,
            id: message.id.clone(),
            seq: message.seq,
            group: message.group_id.clone(),
            sender: PeerRef { peer_id: recipient.peer_id.clone(), name: recipient.display_name.clone() },
            recipient: Some(PeerRef { peer_id: message.sender_id.clone(), name: message.sender_name.clone() }),
            preview: format!("{} {state}", recipient.display_name),
            time: now,
            text: None,
            state: Some(state),
            detail,
        };
        let peers = [message.sender_id.clone(), recipient.peer_id.clone()];
        let note = Live::Receipt(Arc::new(ReceiptNote { event, peers, daemons }));
        if let Some(tx) = lock(&self.live).get(&message.group_id) {
            let _ = tx.send(note);
        }
        Ok(true)
    }

    /// Receipts from a daemon for its own peers; each is checked on its own.
    pub fn daemon_receipts(&self, daemon_id: &str, receipts: &[PeerReceipt]) -> Result<ReceiptOutcome> {
        let mut outcome = ReceiptOutcome::default();
        for r in receipts {
            let reject = |why: &str| serde_json::json!({"message_id": r.message_id, "peer_id": r.peer_id, "error": why});
            let Some(peer) = self.store.peer(&r.peer_id)?.filter(|p| p.daemon_id.as_deref() == Some(daemon_id)) else {
                outcome.rejected.push(reject("this daemon registered no such peer"));
                continue;
            };
            let Some(entry) = self.store.entry_by_id(&r.message_id)?.filter(|e| e.group_id == peer.group_id) else {
                outcome.rejected.push(reject("no such message in the peer's group"));
                continue;
            };
            let detail = r.detail.as_deref().map(validate::preview);
            match self.record_delivery(&peer, &entry, r.state, detail) {
                Ok(true) => outcome.moved += 1,
                Ok(false) => outcome.unchanged += 1,
                Err(RelayError::UnknownMessage(_)) => outcome.rejected.push(reject("the message was not sent to this peer")),
                Err(e) => return Err(e),
            }
        }
        Ok(outcome)
    }

    /// Per recipient, where a message the caller sent is; to a recipient, where its own copy is.
    pub fn message_status(&self, caller: &Caller, message_id: &str) -> Result<MessageStatus> {
        let unknown = || RelayError::UnknownMessage(message_id.to_owned());
        let entry = self.store.entry_by_id(message_id.trim())?.ok_or_else(unknown)?;
        let kind = entry.kind.message_kind().ok_or_else(unknown)?;
        let callers: Vec<String> = self.store.peers_of_principal(caller.principal)?.into_iter().map(|p| p.peer_id).collect();
        let mut recipients = self.recipient_statuses(&entry)?;
        if !callers.contains(&entry.sender_id) {
            // a recipient sees its own copy, and nobody else's
            recipients.retain(|r| callers.contains(&r.peer.peer_id));
            if recipients.is_empty() {
                return Err(unknown());
            }
        }
        Ok(MessageStatus { message_id: entry.id.clone(), group_id: entry.group_id.clone(), kind, sent_at: entry.created_at, recipients })
    }

    /// The peers a message was for (for a broadcast: the members when it was sent), each
    /// with the state of its copy.
    fn recipient_statuses(&self, entry: &LogEntry) -> Result<Vec<RecipientStatus>> {
        let mut records: HashMap<String, DeliveryRecord> =
            self.store.deliveries(&entry.id)?.into_iter().map(|d| (d.peer_id.clone(), d)).collect();
        let recipients: Vec<PeerRef> = match (&entry.recipient_id, &entry.recipient_name) {
            (Some(id), name) => vec![PeerRef { peer_id: id.clone(), name: name.clone().unwrap_or_default() }],
            (None, _) => self
                .store
                .peers_in_group(&entry.group_id)?
                .into_iter()
                .filter(|p| p.peer_id != entry.sender_id && p.joined_at <= entry.created_at)
                .filter(|p| p.left_at.is_none_or(|left| left > entry.created_at) || records.contains_key(&p.peer_id))
                .map(|p| PeerRef { peer_id: p.peer_id, name: p.display_name })
                .collect(),
        };
        let mut statuses: Vec<RecipientStatus> = recipients
            .into_iter()
            .map(|peer| match records.remove(&peer.peer_id) {
                Some(d) => RecipientStatus { peer, state: d.state, detail: d.detail, updated_at: Some(d.updated_at) },
                None => RecipientStatus { peer, state: DeliveryState::Stored, detail: None, updated_at: Some(entry.created_at) },
            })
            .collect();
        statuses.sort_by(|a, b| (&a.peer.name, &a.peer.peer_id).cmp(&(&b.peer.name, &b.peer.peer_id)));
        Ok(statuses)
    }

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

    /// A group's broadcasts, or the DM thread with one peer, newest `limit`, oldest first.
    pub fn history(&self, caller: &Caller, req: HistoryRequest) -> Result<History> {
        let me = self.peer_in(caller, req.group_id.as_deref())?;
        let limit = req.limit.unwrap_or(DEFAULT_HISTORY_LIMIT).clamp(1, MAX_HISTORY_LIMIT);
        let filter = match &req.filter {
            Some(f) => Some(
                regex::RegexBuilder::new(f)
                    .size_limit(MAX_REGEX_BYTES)
                    .build()
                    .map_err(|e| RelayError::BadArgument { field: "filter", reason: e.to_string() })?,
            ),
            None => None,
        };
        let since = req.start_time.as_deref().map(|t| parse_time("start_time", t)).transpose()?;
        let until = req.end_time.as_deref().map(|t| parse_time("end_time", t)).transpose()?;
        let with = match &req.with_peer {
            Some(who) => {
                let others: Vec<PeerRecord> =
                    self.store.peers_in_group(&me.group_id)?.into_iter().filter(|p| p.peer_id != me.peer_id).collect();
                Some(resolve_peer(who, &others)?.clone())
            }
            None => None,
        };
        let mut query = LogQuery { group_id: me.group_id.clone(), since, until, newest_first: true, limit: PAGE, ..Default::default() };
        match &with {
            Some(peer) => {
                query.kinds = Some(vec![EventKind::Dm]);
                query.dm_between = Some((me.peer_id.clone(), peer.peer_id.clone()));
            }
            None => query.kinds = Some(vec![EventKind::Message]),
        }
        // Newest first, page by page, until `limit` match.
        let mut kept: Vec<LogEntry> = Vec::new();
        let mut truncated = false;
        'pages: loop {
            let page = self.store.entries(&query)?;
            let exhausted = page.len() < PAGE;
            for entry in page {
                query.up_to_seq = Some(entry.seq.saturating_sub(1));
                if filter.as_ref().is_none_or(|re| re.is_match(&entry.body)) {
                    if kept.len() == limit {
                        truncated = true;
                        break 'pages;
                    }
                    kept.push(entry);
                }
            }
            if exhausted || query.up_to_seq == Some(0) {
                break;
            }
        }
        kept.reverse();
        let mut messages = Vec::with_capacity(kept.len());
        for entry in &kept {
            let mut message = stored_message(entry);
            if entry.sender_id == me.peer_id {
                message.delivery = Some(self.recipient_statuses(entry)?);
            }
            messages.push(message);
        }
        Ok(History {
            group_id: me.group_id,
            with_peer: with.map(|p| PeerRef { peer_id: p.peer_id, name: p.display_name }),
            messages,
            truncated,
        })
    }

    pub fn leave_group(&self, caller: &Caller, group: &str) -> Result<Left> {
        validate::group_id(group)?;
        let mut peer = self.peer_in(caller, Some(group))?;
        let now = self.clock.now();
        peer.left_at = Some(now);
        peer.last_seen = now;
        self.store.save_peer(&peer)?;
        self.publish(membership_entry(&peer, EventKind::PeerLeft, now))?;
        // (its bucket stays: leaving and registering again is no way to a full one)
        Ok(Left { group_id: peer.group_id, peer_id: peer.peer_id, display_name: peer.display_name })
    }

    /// The peer `peer_id` of `group_id`, if `caller` holds it and it has not left.
    pub fn owned_peer(&self, caller: &Caller, group_id: &str, peer_id: &str) -> Result<Option<PeerRecord>> {
        Ok(self.store.peer(peer_id)?.filter(|p| p.group_id == group_id && p.principal_id == caller.principal && p.left_at.is_none()))
    }

    /// A peer is online while it has an event stream open, or its daemon has one for its group.
    fn is_online(&self, peer: &PeerRecord) -> bool {
        let streams = lock(&self.streams);
        let open = |key: &str| streams.get(key).is_some_and(|n| *n > 0);
        open(&peer.peer_id) || peer.daemon_id.as_ref().is_some_and(|d| open(&daemon_stream_key(d, &peer.group_id)))
    }

    pub fn stream_opened(&self, audience: &Audience, group_id: &str) {
        *lock(&self.streams).entry(audience.presence_key(group_id)).or_default() += 1;
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
                }
            }
        }
        self.metrics.stream_closed(audience.is_daemon());
        if let Audience::Peer(peer_id) = audience {
            let _ = self.store.touch_peer(peer_id, self.clock.now());
        }
        let mut live = lock(&self.live);
        if live.get(group_id).is_some_and(|tx| tx.receiver_count() == 0) {
            live.remove(group_id);
        }
    }
}

/// Who an event stream is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Audience {
    /// One peer: others' broadcasts, its DMs, membership changes.
    Peer(String),
    /// A daemon: every broadcast of the group, DMs to the peers it registered, membership.
    Daemon(String),
}

impl Audience {
    fn presence_key(&self, group_id: &str) -> String {
        match self {
            Audience::Peer(peer_id) => peer_id.clone(),
            Audience::Daemon(daemon_id) => daemon_stream_key(daemon_id, group_id),
        }
    }

    pub fn is_daemon(&self) -> bool {
        matches!(self, Audience::Daemon(_))
    }
}

fn daemon_stream_key(daemon_id: &str, group_id: &str) -> String {
    format!("{daemon_id}/{group_id}")
}

/// A peer joining or leaving, as a log entry.
fn membership_entry(peer: &PeerRecord, kind: EventKind, at: DateTime<Utc>) -> NewEntry {
    NewEntry {
        group_id: peer.group_id.clone(),
        id: secrets::new_id("e_"),
        kind,
        sender_id: peer.peer_id.clone(),
        sender_name: peer.display_name.clone(),
        recipient_id: None,
        recipient_name: None,
        body: String::new(),
        created_at: at,
        idempotency_key: None,
    }
}

fn is_other_member(p: &PeerRecord, me: &PeerRecord) -> bool {
    p.left_at.is_none() && p.peer_id != me.peer_id && p.group_id == me.group_id
}

/// Whether `peer_id` should receive this message: a broadcast by someone else, or a DM to it.
pub fn is_for(e: &LogEntry, peer_id: &str) -> bool {
    e.kind.message_kind().is_some() && e.addressed().visible_to(peer_id)
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

fn sent(entry: Arc<LogEntry>, recipients: usize) -> Sent {
    let message = stored_message(&entry);
    Sent {
        message_id: message.id,
        seq: message.seq,
        group_id: message.group_id,
        kind: message.kind,
        from: message.sender,
        to: message.recipient,
        recipients,
        sent_at: message.sent_at,
        repeated: false,
    }
}

pub fn stored_message(e: &LogEntry) -> StoredMessage {
    StoredMessage {
        id: e.id.clone(),
        seq: e.seq,
        group_id: e.group_id.clone(),
        kind: e.kind.message_kind().unwrap_or(MessageKind::Broadcast),
        sender: PeerRef { peer_id: e.sender_id.clone(), name: e.sender_name.clone() },
        recipient: e.recipient_id.as_ref().map(|id| PeerRef { peer_id: id.clone(), name: e.recipient_name.clone().unwrap_or_default() }),
        text: e.body.clone(),
        sent_at: e.created_at,
        delivery: None,
    }
}

/// ISO 8601: a full timestamp with offset, one without (taken as UTC), or a date.
pub fn parse_time(field: &'static str, value: &str) -> Result<DateTime<Utc>> {
    let v = value.trim();
    if let Ok(t) = DateTime::parse_from_rfc3339(v) {
        return Ok(t.with_timezone(&Utc));
    }
    for format in ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.f", "%Y-%m-%dT%H:%M"] {
        if let Ok(t) = chrono::NaiveDateTime::parse_from_str(v, format) {
            return Ok(t.and_utc());
        }
    }
    if let Ok(d) = chrono::NaiveDate::parse_from_str(v, "%Y-%m-%d") {
        return Ok(d.and_hms_opt(0, 0, 0).expect("midnight exists").and_utc());
    }
    Err(RelayError::BadArgument {
        field,
        reason: format!("{value:?} is not an ISO 8601 time; use e.g. 2026-11-25T14:30:00Z or 2026-11-25"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allowances_are_kept_per_ipv4_address_and_ipv6_slash_64() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(client_bucket(ip("198.51.100.7")), ip("198.51.100.7"));
        assert_eq!(client_bucket(ip("::ffff:198.51.100.7")), ip("198.51.100.7"), "IPv4-mapped is IPv4");
        assert_eq!(client_bucket(ip("2001:db8:1:2:aaaa::1")), client_bucket(ip("2001:db8:1:2:bbbb::9")));
        assert_ne!(client_bucket(ip("2001:db8:1:2::1")), client_bucket(ip("2001:db8:1:3::1")));
        assert!(ip("::ffff:127.0.0.1").to_canonical().is_loopback());
    }

    /// A join key is checked without the registration lock: guesses (tens of milliseconds of
    /// password hashing each) hold up nobody else's registration.
    #[test]
    fn a_join_key_is_checked_without_the_registration_lock() {
        let store = Arc::new(crate::store::memory::MemoryStore::new());
        let relay = Arc::new(Relay::new(store, Arc::new(crate::clock::SystemClock), Limits::default()));
        let join = |dir: &str, key: &str| RegisterRequest {
            group_id: "locked".into(),
            hostname: "box".into(),
            working_directory: dir.into(),
            join_key: Some(key.into()),
            ..Default::default()
        };
        relay.register(None, join("/owner", "the right key")).unwrap();
        let held = lock(&relay.registering);
        let (done, checked) = std::sync::mpsc::channel();
        std::thread::spawn({
            let relay = relay.clone();
            move || {
                let _ = done.send(relay.register(None, join("/guess", "a wrong guess")));
            }
        });
        let outcome = checked.recv_timeout(std::time::Duration::from_secs(20)).expect("the wrong key waited for the lock");
        assert!(matches!(outcome, Err(RelayError::WrongJoinKey(_))), "{outcome:?}");
        drop(held);
    }
}
