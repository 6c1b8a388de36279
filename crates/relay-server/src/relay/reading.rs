//! Reading: inboxes and their cursors, history with its filters.

use super::*;

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Inbox {
    pub messages: Vec<StoredMessage>,
    /// More unread messages wait beyond this batch.
    pub more: bool,
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

pub const DEFAULT_HISTORY_LIMIT: usize = 50;
pub const MAX_HISTORY_LIMIT: usize = 1000;
pub const DEFAULT_READ_LIMIT: usize = 200;
/// How many log entries one store query reads at a time while filtering.
const PAGE: usize = 512;
/// Regexes are compiled from agents' input: keep them small.
const MAX_REGEX_BYTES: usize = 1 << 20;

impl Relay {
    /// Every unread broadcast and DM of the caller's peers, oldest first, at most `limit`;
    /// moves their cursors past what it returns.
    pub fn read_new_messages(&self, caller: &Caller, limit: Option<usize>) -> Result<Inbox> {
        let limit = limit.unwrap_or(DEFAULT_READ_LIMIT).clamp(1, MAX_HISTORY_LIMIT);
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
        let mut moved = vec![true; found.len()];
        for (i, (peer, entries, scanned_to)) in found.iter().enumerate() {
            let taken: Vec<u64> = all.iter().filter(|(j, _)| *j == i).map(|(_, e)| e.seq).collect();
            let cursor = if taken.len() == entries.len() { *scanned_to } else { taken.iter().copied().max().unwrap_or(peer.read_seq) };
            if cursor != peer.read_seq {
                // a concurrent read (on any node) moved it first and returns these itself;
                // what it did not reach stays unread for the next call
                moved[i] = self.store.advance_read_seq(&peer.peer_id, peer.read_seq, cursor)?;
            }
            self.store.touch_peer(&peer.peer_id, now)?;
        }
        all.retain(|(i, _)| moved[*i]);
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

    /// The newest `limit` entries of `query` that pass `keep`, oldest first, read newest
    /// first page by page; and whether older ones pass too.
    pub(super) fn newest(&self, mut query: LogQuery, limit: usize, keep: impl Fn(&LogEntry) -> bool) -> Result<(Vec<LogEntry>, bool)> {
        query.newest_first = true;
        query.limit = PAGE;
        let mut kept: Vec<LogEntry> = Vec::new();
        let mut more = false;
        'pages: loop {
            let page = self.store.entries(&query)?;
            let exhausted = page.len() < PAGE;
            for entry in page {
                query.up_to_seq = Some(entry.seq.saturating_sub(1));
                if keep(&entry) {
                    if kept.len() == limit {
                        more = true;
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
        Ok((kept, more))
    }

    fn already_read(&self, message_id: &str, peer_id: &str) -> bool {
        matches!(self.store.delivery(message_id, peer_id), Ok(Some(d)) if d.state == DeliveryState::Read)
    }

    /// A group's broadcasts, or the DM thread with one peer, newest `limit`, oldest first.
    pub fn history(&self, caller: &Caller, req: HistoryRequest) -> Result<History> {
        let me = self.peer_in(caller, req.group_id.as_deref())?;
        let limit = req.limit.unwrap_or(DEFAULT_HISTORY_LIMIT).clamp(1, MAX_HISTORY_LIMIT);
        let filter = req.filter.as_deref().map(text_filter).transpose()?;
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
        let (kept, truncated) = self.newest(query, limit, |e| filter.as_ref().is_none_or(|re| re.is_match(&e.body)))?;
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
}

/// A history filter: a regular expression, kept small (it comes from agents' input).
pub(super) fn text_filter(pattern: &str) -> Result<regex::Regex> {
    regex::RegexBuilder::new(pattern)
        .size_limit(MAX_REGEX_BYTES)
        .build()
        .map_err(|e| RelayError::BadArgument { field: "filter", reason: e.to_string() })
}

/// Whether `peer_id` should receive this message: a broadcast by someone else, or a DM to it.
pub fn is_for(e: &LogEntry, peer_id: &str) -> bool {
    e.kind.message_kind().is_some() && e.addressed().visible_to(peer_id)
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
