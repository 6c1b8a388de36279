//! Humans in the console: who they are, how they sign in, what they may see.
//!
//! A human is the owner of one or more daemons (relayd on each of their machines). relayd
//! asks for a one-time sign-in link; the browser trades it for a session. In each group one
//! of their daemons' agents is in, the human has a peer of kind `human`, through which they
//! send. They see the group's broadcasts and membership, their own DMs, and the DMs of the
//! agents their own daemons registered — never another human's agents' DMs.
//!
//! Everything is kept as the store's records (see [`Store::record`]), by the SHA-256 of
//! each secret: a copy of the store holds no working link, session or code.

use std::collections::HashSet;

use super::*;

/// How long a sign-in link works.
pub const SIGN_IN_TTL: chrono::Duration = chrono::Duration::minutes(5);
/// How long a pairing code works.
pub const PAIRING_TTL: chrono::Duration = chrono::Duration::minutes(10);
/// How long a session lasts without signing in again.
pub const SESSION_TTL: chrono::Duration = chrono::Duration::days(30);

const HUMANS: &str = "humans";
const OWNERS: &str = "owners";
const SIGN_INS: &str = "sign_in";
const SESSIONS: &str = "sessions";
const PAIRINGS: &str = "pairings";
const ACTIVITIES: &str = "activity";

/// What an agent's Claude Code session can be doing.
pub const ACTIVITY_STATES: [&str; 3] = ["idle", "busy", "waiting"];
/// A sidebar tells its agent's activity every minute: one older than this is stale.
const ACTIVITY_TTL: chrono::Duration = chrono::Duration::seconds(150);

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Activity {
    activity: String,
    at: DateTime<Utc>,
}

/// The host and directory of every human peer: a human has no machine in the group.
pub const HUMAN_HOST: &str = "console";
const HUMAN_DIRECTORY: &str = "/";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Human {
    pub human_id: String,
    pub name: String,
    /// The token holder the human's peers belong to (its token is never handed out).
    pub principal: PrincipalId,
    /// The daemons that act for this human.
    pub daemons: Vec<String>,
    /// Sessions begun under an earlier epoch are over ("sign out everywhere").
    pub epoch: u32,
}

/// A signed-in browser.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Session {
    pub human_id: String,
    pub epoch: u32,
    /// Every form of the session carries it back (CSRF).
    pub csrf: String,
    pub expires_at: DateTime<Utc>,
}

/// A secret good for one use before `expires_at`, and before its human signs out
/// everywhere: a sign-in link or a pairing code.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct OneTime {
    human_id: String,
    expires_at: DateTime<Utc>,
    #[serde(default)]
    epoch: u32,
}

/// Records are kept under the secret's hash.
fn secret_key(secret: &str) -> String {
    hex::encode(secrets::token_hash(secret))
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("console records serialize")
}

fn decode<T: serde::de::DeserializeOwned>(bytes: Option<Vec<u8>>) -> Result<Option<T>> {
    bytes
        .map(|b| {
            serde_json::from_slice(&b).map_err(|e| RelayError::Storage(crate::store::StoreError::Corrupt(format!("console record: {e}"))))
        })
        .transpose()
}

impl Relay {
    fn human(&self, human_id: &str) -> Result<Option<Human>> {
        decode(self.store.record(HUMANS, human_id)?)
    }

    fn save_human(&self, human: &Human) -> Result<()> {
        Ok(self.store.put_record(HUMANS, &human.human_id, &encode(human), None)?)
    }

    /// The human the daemon acts for, if it has one yet.
    pub fn human_of_daemon(&self, daemon_id: &str) -> Result<Option<Human>> {
        match self.store.record(OWNERS, daemon_id)? {
            Some(id) => self.human(&String::from_utf8_lossy(&id)),
            None => Ok(None),
        }
    }

    /// The daemon's human; a new one named `name` when it has none.
    fn human_for(&self, daemon_id: &str, name: Option<&str>) -> Result<Human> {
        let _humans = lock(&self.humans);
        if let Some(human) = self.human_of_daemon(daemon_id)? {
            return Ok(human);
        }
        let name = name.map(str::trim).filter(|n| !n.is_empty()).unwrap_or("human");
        validate::display_name(name)?;
        let principal = self.store.create_principal(&secrets::token_hash(&secrets::new_token()), self.clock.now())?;
        let human =
            Human { human_id: secrets::new_id("h_"), name: name.to_owned(), principal, daemons: vec![daemon_id.to_owned()], epoch: 0 };
        self.save_human(&human)?;
        self.store.put_record(OWNERS, daemon_id, human.human_id.as_bytes(), None)?;
        Ok(human)
    }

    /// A one-time sign-in secret for the daemon's human (made when new), and until when it works.
    pub fn console_sign_in_link(&self, daemon_id: &str, name: Option<&str>) -> Result<(Human, String, DateTime<Utc>)> {
        let human = self.human_for(daemon_id, name)?;
        self.one_time(SIGN_INS, &human, SIGN_IN_TTL).map(|(secret, until)| (human, secret, until))
    }

    /// A one-time code another daemon redeems ([`Relay::console_join`]) to act for the same human.
    pub fn console_pairing(&self, daemon_id: &str, name: Option<&str>) -> Result<(Human, String, DateTime<Utc>)> {
        let human = self.human_for(daemon_id, name)?;
        self.one_time(PAIRINGS, &human, PAIRING_TTL).map(|(secret, until)| (human, secret, until))
    }

    fn one_time(&self, space: &str, human: &Human, ttl: chrono::Duration) -> Result<(String, DateTime<Utc>)> {
        let secret = secrets::new_token();
        let expires_at = self.clock.now() + ttl;
        let record = OneTime { human_id: human.human_id.clone(), expires_at, epoch: human.epoch };
        self.store.put_record(space, &secret_key(&secret), &encode(&record), Some(expires_at))?;
        Ok((secret, expires_at))
    }

    /// The human a one-time secret was for, once: a second use, or a late one, finds nothing.
    fn redeem(&self, space: &str, secret: &str) -> Result<Option<Human>> {
        self.human_of_one_time(self.store.take_record(space, &secret_key(secret))?)
    }

    /// The human a one-time record is for, unless it has expired or its human has signed
    /// out everywhere since it was made.
    fn human_of_one_time(&self, record: Option<Vec<u8>>) -> Result<Option<Human>> {
        let Some(record) = decode::<OneTime>(record)? else { return Ok(None) };
        if record.expires_at < self.clock.now() {
            return Ok(None);
        }
        Ok(self.human(&record.human_id)?.filter(|h| h.epoch == record.epoch))
    }

    /// Makes the daemon act for the human who made `code` (its agents become theirs).
    pub fn console_join(&self, daemon_id: &str, code: &str) -> Result<Human> {
        let _humans = lock(&self.humans);
        let mut human = self.redeem(PAIRINGS, code.trim())?.ok_or_else(|| RelayError::BadArgument {
            field: "code",
            reason: "no such pairing code, or it was used or has expired; ask for a new one with `relay console --pair`".into(),
        })?;
        if let Some(mut previous) = self.human_of_daemon(daemon_id)?.filter(|h| h.human_id != human.human_id) {
            previous.daemons.retain(|d| d != daemon_id);
            self.save_human(&previous)?;
        }
        if !human.daemons.iter().any(|d| d == daemon_id) {
            human.daemons.push(daemon_id.to_owned());
            self.save_human(&human)?;
        }
        self.store.put_record(OWNERS, daemon_id, human.human_id.as_bytes(), None)?;
        Ok(human)
    }

    /// The human a sign-in secret is for, while it works, without using it up (the page that
    /// asks the browser to go on).
    pub fn console_sign_in_pending(&self, secret: &str) -> Result<Option<Human>> {
        self.human_of_one_time(self.store.record(SIGN_INS, &secret_key(secret))?)
    }

    /// Trades a sign-in secret for a session: its cookie value and the session.
    pub fn console_sign_in(&self, secret: &str) -> Result<Option<(String, Session)>> {
        let Some(human) = self.redeem(SIGN_INS, secret)? else { return Ok(None) };
        let cookie = secrets::new_token();
        let session = Session {
            human_id: human.human_id,
            epoch: human.epoch,
            csrf: secrets::new_token(),
            expires_at: self.clock.now() + SESSION_TTL,
        };
        self.store.put_record(SESSIONS, &secret_key(&cookie), &encode(&session), Some(session.expires_at))?;
        Ok(Some((cookie, session)))
    }

    /// The human and session a cookie stands for, while it lasts.
    pub fn console_session(&self, cookie: &str) -> Result<Option<(Human, Session)>> {
        let Some(session) = decode::<Session>(self.store.record(SESSIONS, &secret_key(cookie))?)? else { return Ok(None) };
        if session.expires_at < self.clock.now() {
            return Ok(None);
        }
        Ok(self.human(&session.human_id)?.filter(|h| h.epoch == session.epoch).map(|h| (h, session)))
    }

    /// Ends this one session.
    pub fn console_sign_out(&self, cookie: &str) -> Result<()> {
        self.store.take_record(SESSIONS, &secret_key(cookie))?;
        Ok(())
    }

    /// Ends every session of the daemon's human; the human, if any.
    pub fn console_sign_out_everywhere(&self, daemon_id: &str) -> Result<Option<Human>> {
        let _humans = lock(&self.humans);
        let Some(mut human) = self.human_of_daemon(daemon_id)? else { return Ok(None) };
        human.epoch += 1;
        self.save_human(&human)?;
        Ok(Some(human))
    }

    /// The active agents the human's daemons registered, in every group.
    pub fn human_agents(&self, human: &Human) -> Result<Vec<PeerRecord>> {
        let mut agents = Vec::new();
        for daemon in &human.daemons {
            agents.extend(self.store.peers_of_daemon(daemon)?.into_iter().filter(|p| p.left_at.is_none()));
        }
        Ok(agents)
    }

    /// The groups the human is in: where one of their agents is, unless they left it in the
    /// console, and where they joined themselves. Sorted.
    pub fn human_groups(&self, human: &Human) -> Result<Vec<String>> {
        let own = self.store.peers_of_principal(human.principal)?;
        let mut groups: Vec<String> = own.iter().filter(|p| p.left_at.is_none()).map(|p| p.group_id.clone()).collect();
        for agent in self.human_agents(human)? {
            if !own.iter().any(|p| p.group_id == agent.group_id) {
                groups.push(agent.group_id);
            }
        }
        groups.sort();
        groups.dedup();
        Ok(groups)
    }

    /// What the human may see of a group: their peer there (joined now if they had none) and
    /// the ids whose DMs they see. `None` when the group is not theirs.
    pub fn human_view(&self, human: &Human, group_id: &str) -> Result<Option<HumanView>> {
        validate::group_id(group_id)?;
        if !self.human_groups(human)?.iter().any(|g| g == group_id) {
            return Ok(None);
        }
        let peer = self.human_peer(human, group_id)?;
        let mut dm_peers: HashSet<String> =
            self.human_agents(human)?.into_iter().filter(|p| p.group_id == group_id).map(|p| p.peer_id).collect();
        dm_peers.insert(peer.peer_id.clone());
        Ok(Some(HumanView { peer, daemons: human.daemons.clone(), dm_peers, cookie: None }))
    }

    /// The human's peer in the group, joining it (as a member of kind human) if needed.
    fn human_peer(&self, human: &Human, group_id: &str) -> Result<PeerRecord> {
        let _registering = self.registering_in(group_id)?;
        let mine = self.store.peers_of_principal(human.principal)?;
        if let Some(peer) = mine.iter().find(|p| p.group_id == group_id && p.left_at.is_none()) {
            return Ok(peer.clone());
        }
        let now = self.clock.now();
        let peer = match mine.into_iter().find(|p| p.group_id == group_id) {
            Some(mut left) => {
                left.left_at = None;
                left.last_seen = now;
                left
            }
            None => {
                let req = RegisterRequest {
                    group_id: group_id.to_owned(),
                    hostname: HUMAN_HOST.to_owned(),
                    working_directory: HUMAN_DIRECTORY.to_owned(),
                    name: Some(human.name.clone()),
                    ..Default::default()
                };
                PeerRecord {
                    peer_id: secrets::new_id("p_"),
                    group_id: group_id.to_owned(),
                    principal_id: human.principal,
                    display_name: self.free_display_name(&req)?,
                    kind: PeerKind::Human,
                    // the human's id, not their name: two humans of one name are two peers
                    requested_name: Some(human.human_id.clone()),
                    hostname: HUMAN_HOST.to_owned(),
                    working_directory: HUMAN_DIRECTORY.to_owned(),
                    git_branch: None,
                    joined_at: now,
                    last_seen: now,
                    left_at: None,
                    read_seq: self.store.head_seq(group_id)?,
                    daemon_id: None,
                }
            }
        };
        self.store.save_peer(&peer)?;
        self.publish(registration::membership_entry(&peer, EventKind::PeerJoined, now))?;
        Ok(peer)
    }

    /// Notes what the peer's agent is doing (idle, busy or waiting), as its daemon says.
    pub fn set_activity(&self, peer: &PeerRecord, activity: &str) -> Result<()> {
        if !ACTIVITY_STATES.contains(&activity) {
            return Err(RelayError::BadArgument { field: "activity", reason: format!("must be one of {}", ACTIVITY_STATES.join(", ")) });
        }
        let record = Activity { activity: activity.to_owned(), at: self.clock.now() };
        Ok(self.store.put_record(ACTIVITIES, &peer.peer_id, &encode(&record), Some(record.at + ACTIVITY_TTL))?)
    }

    /// What the peer's agent was last said to be doing, while that is fresh.
    pub fn activity(&self, peer_id: &str) -> Result<Option<String>> {
        let record = decode::<Activity>(self.store.record(ACTIVITIES, peer_id)?)?;
        Ok(record.filter(|r| self.clock.now() - r.at <= ACTIVITY_TTL).map(|r| r.activity))
    }

    /// A caller acting as the human (their peers' token holder).
    pub fn human_caller(&self, human: &Human) -> Caller {
        Caller { principal: human.principal, token: String::new() }
    }
}

/// What one human may see of one group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HumanView {
    /// The human's own peer in the group.
    pub peer: PeerRecord,
    /// The human's daemons: DMs to and from the peers they register are the human's to see.
    pub daemons: Vec<String>,
    /// The peers of the group whose DMs the human sees when this view was made: their own
    /// and their agents'.
    pub dm_peers: HashSet<String>,
    /// The session cookie the view was made for: a stream of it ends with the session.
    pub cookie: Option<String>,
}

impl HumanView {
    /// Whether the human sees `entry`: broadcasts and membership, and DMs with one of their
    /// own on either end. A DM of an agent that joined after the view was made is looked up.
    pub fn sees(&self, relay: &Relay, entry: &LogEntry) -> bool {
        match entry.kind {
            EventKind::Message | EventKind::PeerJoined | EventKind::PeerLeft => true,
            EventKind::Dm => {
                [Some(entry.sender_id.as_str()), entry.recipient_id.as_deref()].into_iter().flatten().any(|id| self.owns(relay, id))
            }
            EventKind::Receipt | EventKind::Unknown => false,
        }
    }

    /// Whether the session the view was made for still stands, for the same human with
    /// the same daemons (signing out, or a daemon moving to another human, ends its streams).
    pub fn still_valid(&self, relay: &Relay) -> bool {
        let Some(cookie) = &self.cookie else { return true };
        match relay.console_session(cookie) {
            Ok(Some((human, _))) => human.principal == self.peer.principal_id && human.daemons == self.daemons,
            Ok(None) => false,
            Err(e) => {
                tracing::warn!(error = %e, "cannot check a console session; ending its stream");
                false
            }
        }
    }

    fn owns(&self, relay: &Relay, peer_id: &str) -> bool {
        if self.dm_peers.contains(peer_id) {
            return true;
        }
        match relay.store.peer(peer_id) {
            Ok(Some(p)) => p.daemon_id.is_some_and(|d| self.daemons.contains(&d)),
            Ok(None) => false,
            Err(e) => {
                tracing::error!(error = %e, "cannot look up a DM's peer; withholding it from the console");
                false
            }
        }
    }
}

/// Which part of a group's log the console shows.
#[derive(Debug, Clone, Default)]
pub struct TimelineQuery {
    /// A regular expression the message text must match.
    pub text: Option<String>,
    /// A sender's peer id or name (any case).
    pub sender: Option<String>,
    pub since: Option<String>,
    pub until: Option<String>,
    /// Only entries before this sequence number.
    pub before: Option<u64>,
    pub limit: usize,
}

/// A filter's value, unless the form left it empty.
fn given(field: &Option<String>) -> Option<&str> {
    field.as_deref().filter(|v| !v.trim().is_empty())
}

/// One entry of the console's timeline, with its recipients' marks when the human sent it.
pub type TimelineEntry = (LogEntry, Option<Vec<RecipientStatus>>);

impl Relay {
    /// The newest entries the human sees that pass the query, oldest first, and whether
    /// older ones pass it too. Membership changes show only without filters.
    pub fn console_timeline(&self, view: &HumanView, q: &TimelineQuery) -> Result<(Vec<TimelineEntry>, bool)> {
        let filter = given(&q.text).map(reading::text_filter).transpose()?;
        let sender = given(&q.sender).map(|s| s.trim().trim_start_matches('@').to_lowercase());
        let since = given(&q.since).map(|t| reading::parse_time("since", t)).transpose()?;
        let until = given(&q.until).map(|t| reading::parse_time("until", t)).transpose()?;
        let filtered = filter.is_some() || sender.is_some();
        let kinds = if filtered {
            vec![EventKind::Message, EventKind::Dm]
        } else {
            vec![EventKind::Message, EventKind::Dm, EventKind::PeerJoined, EventKind::PeerLeft]
        };
        let query = LogQuery {
            group_id: view.peer.group_id.clone(),
            up_to_seq: q.before.map(|b| b.saturating_sub(1)),
            kinds: Some(kinds),
            since,
            until,
            ..Default::default()
        };
        let keep = |e: &LogEntry| {
            view.sees(self, e)
                && filter.as_ref().is_none_or(|re| re.is_match(&e.body))
                && sender.as_ref().is_none_or(|s| e.sender_id == *s || e.sender_name.to_lowercase() == *s)
        };
        let (kept, more) = self.newest(query, q.limit, keep)?;
        let mut out = Vec::with_capacity(kept.len());
        for entry in kept {
            let marks = (entry.sender_id == view.peer.peer_id && entry.kind.message_kind().is_some())
                .then(|| self.recipient_statuses(&entry))
                .transpose()?;
            out.push((entry, marks));
        }
        Ok((out, more))
    }

    /// The messages of the last hour the human sees, for the activity view.
    pub fn console_last_hour(&self, view: &HumanView) -> Result<Vec<LogEntry>> {
        let query = LogQuery {
            group_id: view.peer.group_id.clone(),
            kinds: Some(vec![EventKind::Message, EventKind::Dm]),
            since: Some(self.clock.now() - chrono::Duration::hours(1)),
            limit: 10_000,
            ..Default::default()
        };
        Ok(self.store.entries(&query)?.into_iter().filter(|e| view.sees(self, e)).collect())
    }
}
