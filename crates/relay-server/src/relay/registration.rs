//! Who may join which group as whom: registration, daemons, tokens, leaving.

use super::*;

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

impl Relay {
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
        let Some(peer) = self.registered_by(daemon_id, peer_id)? else {
            return Ok(None);
        };
        if peer.left_at.is_some() {
            return Ok(Some(Left { group_id: peer.group_id, peer_id: peer.peer_id, display_name: peer.display_name }));
        }
        let caller = Caller { principal: peer.principal_id, token: String::new() };
        self.leave_group(&caller, &peer.group_id).map(Some)
    }

    /// The peer `peer_id`, when this daemon registered it (left or not).
    pub fn registered_by(&self, daemon_id: &str, peer_id: &str) -> Result<Option<PeerRecord>> {
        Ok(self.store.peer(peer_id)?.filter(|p| p.daemon_id.as_deref() == Some(daemon_id)))
    }

    /// The peer `peer_id` and a caller for it, when this daemon registered it and it is still
    /// in its group: a daemon acts for its own peers, in their own group, with its credential.
    pub fn daemon_peer(&self, daemon_id: &str, peer_id: &str) -> Result<Option<(PeerRecord, Caller)>> {
        let peer = self.registered_by(daemon_id, peer_id)?.filter(|p| p.left_at.is_none());
        Ok(peer.map(|p| {
            let caller = Caller { principal: p.principal_id, token: String::new() };
            (p, caller)
        }))
    }

    /// The caller holding `token`.
    pub fn identify(&self, token: &str) -> Result<Caller> {
        let hash = secrets::token_hash(token);
        let principal = match self.known_tokens.get(&hash) {
            Some(principal) => principal,
            None => {
                let principal = self.store.principal_by_token(&hash)?.ok_or(RelayError::UnknownToken)?;
                self.known_tokens.insert(hash, principal);
                principal
            }
        };
        Ok(Caller { principal, token: token.to_owned() })
    }

    /// Joins a group (creating it if new) as a peer of `caller`, or of a new caller when
    /// there is none. Registering again from the same host, directory and name returns the
    /// same peer, to its own token or daemon only. Slow when a join key is involved (password
    /// hashing): call it off the async threads.
    pub fn register(&self, caller: Option<&Caller>, mut req: RegisterRequest) -> Result<(Registration, Caller)> {
        clean_and_validate(&mut req)?;
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
        let _registering = self.registering_in(&req.group_id)?;

        let group = self.store.group(&req.group_id)?;
        if group.as_ref().and_then(|g| g.join_key_hash.clone()) != checked.existing_hash {
            // the group was created (or made) meanwhile: check against what it is now
            checked = self.check_join_key(&req, group.as_ref())?;
        }
        let existing = self.store.peer_by_origin(&req.group_id, &req.hostname, &req.working_directory, req.name.as_deref())?;
        if let (None, Some(source)) = (&existing, source) {
            self.take_registration(source)?;
        }
        let group_created = match group {
            Some(_) => false,
            None => {
                if self.limits.require_join_keys && req.join_key.is_none() {
                    return Err(RelayError::JoinKeyNeededToCreate);
                }
                let record = GroupRecord {
                    group_id: req.group_id.clone(),
                    join_key_hash: checked.hash_for_new_group,
                    created_at: now,
                    renumbered: None,
                };
                self.store.create_group(&record)?;
                true
            }
        };
        let caller = self.token_holder(caller, &req, existing.as_ref(), now)?;
        let new_peer = existing.is_none();
        let (peer, announce) = self.peer_to_save(&req, existing, &caller, now)?;
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

    /// Who the registered peer belongs to: `caller`, unless it already has another peer in the
    /// group (a token stands for one agent: at most one peer per group), else a new principal
    /// with a token of its own. Taking over `existing` needs its own token or daemon.
    fn token_holder(
        &self,
        caller: Option<&Caller>,
        req: &RegisterRequest,
        existing: Option<&PeerRecord>,
        now: DateTime<Utc>,
    ) -> Result<Caller> {
        // host, directory and name are visible to every member: registering with them is no
        // proof of being that peer. Only its own token, or the daemon that registered it, is.
        if let Some(peer) = existing {
            let same_principal = caller.is_some_and(|c| c.principal == peer.principal_id);
            let same_daemon = req.daemon_id.is_some() && req.daemon_id == peer.daemon_id;
            if !same_principal && !same_daemon {
                return Err(RelayError::PeerTaken { group: req.group_id.clone(), name: peer.display_name.clone() });
            }
        }
        if let Some(c) = caller {
            let existing_id = existing.map(|p| p.peer_id.as_str());
            let mine = self.active_peers(c)?;
            if !mine.iter().any(|p| p.group_id == req.group_id && Some(p.peer_id.as_str()) != existing_id) {
                return Ok(c.clone());
            }
        }
        let token = secrets::new_token();
        let principal = self.store.create_principal(&secrets::token_hash(&token), now)?;
        Ok(Caller { principal, token })
    }

    /// The peer as it is to be saved (`existing` back, or a new one), and whether its joining
    /// is news to the group.
    fn peer_to_save(
        &self,
        req: &RegisterRequest,
        existing: Option<PeerRecord>,
        caller: &Caller,
        now: DateTime<Utc>,
    ) -> Result<(PeerRecord, bool)> {
        if let Some(mut peer) = existing {
            let rejoined = peer.left_at.take().is_some();
            peer.principal_id = caller.principal;
            peer.git_branch = req.git_branch.clone();
            if req.daemon_id.is_some() {
                peer.daemon_id = req.daemon_id.clone();
            }
            peer.last_seen = now;
            return Ok((peer, rejoined));
        }
        let peer = PeerRecord {
            peer_id: secrets::new_id("p_"),
            group_id: req.group_id.clone(),
            principal_id: caller.principal,
            display_name: self.free_display_name(req)?,
            kind: PeerKind::Agent,
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
        Ok((peer, true))
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
        self.take_token(&self.wrong_keys, &guesser, || key_tries(&guesser))?.map_err(refused)?;
        if !secrets::join_key_matches(key, hash) {
            return Err(RelayError::WrongJoinKey(req.group_id.clone()));
        }
        self.give_back_token(&self.wrong_keys, &guesser, || key_tries(&guesser))?;
        Ok(JoinKeyChecked { existing_hash: Some(hash.clone()), hash_for_new_group: None })
    }

    /// One registration in a group at a time, across the cluster's nodes too: held until
    /// both guards drop. (The cluster's first: waiting for another node must not hold up
    /// this node's registrations in other groups.)
    pub(super) fn registering_in(&self, group_id: &str) -> Result<(Held, MutexGuard<'_, ()>)> {
        let held = self.store.hold(&format!("register.{group_id}"))?;
        Ok((held, lock(&self.registering)))
    }

    /// A new-peer token of the client address (the cluster's, in a cluster).
    fn take_registration(&self, source: IpAddr) -> Result<()> {
        let taken = self.take_token(&self.registrations, &source, || format!("register.{source}"))?;
        taken.map_err(|wait| self.too_many_registrations(wait))
    }

    fn too_many_registrations(&self, wait: std::time::Duration) -> RelayError {
        RelayError::TooManyRegistrations { per_minute: self.limits.registrations_per_minute, retry_after_ms: millis(wait) }
    }

    /// `name`, or `host:last-dir`, made unique in the group with a numeric suffix.
    pub(super) fn free_display_name(&self, req: &RegisterRequest) -> Result<String> {
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
}

/// Clients send "" for "not given"; then every field must pass the shared rules.
fn clean_and_validate(req: &mut RegisterRequest) -> Result<()> {
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
    Ok(())
}

/// A peer joining or leaving, as a log entry.
/// The shared bucket of a group's join-key tries from an address (`/` is in no group id).
fn key_tries((group, address): &(String, Option<IpAddr>)) -> String {
    match address {
        Some(address) => format!("join-key/{group}/{address}"),
        None => format!("join-key/{group}"),
    }
}

pub(super) fn membership_entry(peer: &PeerRecord, kind: EventKind, at: DateTime<Utc>) -> NewEntry {
    NewEntry {
        group_id: peer.group_id.clone(),
        id: secrets::new_id("e_"),
        kind,
        sender_id: peer.peer_id.clone(),
        sender_name: peer.display_name.clone(),
        sender_kind: peer.kind,
        recipient_id: None,
        recipient_name: None,
        body: String::new(),
        created_at: at,
        idempotency_key: None,
    }
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
