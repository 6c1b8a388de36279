//! Sending: broadcasts and DMs, stored then published to the live streams in order.

use super::*;

pub const MAX_IDEMPOTENCY_KEY_CHARS: usize = 128;

impl Relay {
    /// Broadcasts `text`. With a `key` used before by the same peer, nothing new is sent: the
    /// answer is the earlier message (so a client that retries after a lost answer sends once).
    pub fn send_message(&self, caller: &Caller, text: &str, group: Option<&str>, key: Option<&str>) -> Result<Sent> {
        let from = self.peer_in(caller, group)?;
        validate::message(text, self.limits.max_message_bytes)?;
        // everyone active but the sender
        let recipients = self.store.active_members(&from.group_id)?.saturating_sub(1);
        self.send(self.message_entry(&from, None, text, key)?, recipients)
    }

    /// A DM to `to`, from the caller's peer in a group they share (in `group` only, when given).
    pub fn send_dm(&self, caller: &Caller, group: Option<&str>, to: &str, text: &str, key: Option<&str>) -> Result<Sent> {
        let mut own = self.active_peers(caller)?;
        own.retain(|p| group.is_none_or(|g| p.group_id == g));
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
        same_message(key, &earlier, &entry.body, entry.recipient_id.as_deref())?;
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
            sender_kind: from.kind,
            recipient_id: to.map(|p| p.peer_id.clone()),
            recipient_name: to.map(|p| p.display_name.clone()),
            body: text.to_owned(),
            created_at: self.clock.now(),
            idempotency_key: key.map(str::to_owned),
        })
    }

    /// Commits the entry, then hands it to the group's live streams, in sequence order;
    /// with `true` when it repeated an earlier send of the same key (nothing committed).
    /// A shared store hands it to them itself (see `live`), so a cluster node commits
    /// without holding the streams up.
    pub(super) fn publish(&self, entry: NewEntry) -> Result<(Arc<LogEntry>, bool)> {
        let mut channels = (!self.store.shared()).then(|| self.fanout.lock());
        if let Some(earlier) = self.earlier_send(&entry)? {
            return Ok((Arc::new(earlier), true));
        }
        // a shared store may find the key's earlier message itself (sent at the same moment
        // through another node) and answer with that
        let keyed = entry.idempotency_key.clone().map(|key| (key, entry.id.clone(), entry.body.clone(), entry.recipient_id.clone()));
        let stored = Arc::new(self.store.append(entry)?);
        if let Some((key, id, body, to)) = keyed
            && stored.id != id
        {
            same_message(&key, &stored, &body, to.as_deref())?;
            return Ok((stored, true));
        }
        if let Some(channels) = &mut channels {
            channels.entry(stored.clone());
        }
        if let Some(kind) = stored.kind.message_kind() {
            self.metrics.message(kind);
        }
        Ok((stored, false))
    }

    /// Live entries of a group, and the sequence number they follow: every entry after it
    /// arrives on the receiver, everything up to it is in the store.
    pub fn subscribe(&self, group_id: &str) -> Result<(broadcast::Receiver<Live>, u64)> {
        Ok(self.fanout.subscribe(&*self.store, group_id)?)
    }

    /// The sequence number a client's `Last-Event-ID` for the group means today (a group
    /// copied by `relay-server migrate` was renumbered).
    pub fn resume_point(&self, group_id: &str, last_event_id: u64) -> Result<u64> {
        Ok(self.store.group(group_id)?.map_or(last_event_id, |g| g.resume_point(last_event_id)))
    }

    /// A send token of the peer's (the cluster's, in a cluster: a peer may send through
    /// every node).
    fn take_rate_token(&self, peer_id: &str) -> Result<()> {
        let taken = self.take_token(&self.sends, &peer_id.to_owned(), || format!("send.{peer_id}"))?;
        taken.map_err(|wait| RelayError::RateLimited {
            per_second: self.sends.per_second,
            burst: self.sends.burst,
            retry_after_ms: millis(wait),
        })
    }
}

/// A send repeated with `key` must be the same message as the key's earlier one.
fn same_message(key: &str, earlier: &LogEntry, body: &str, recipient: Option<&str>) -> Result<()> {
    if earlier.body != body || earlier.recipient_id.as_deref() != recipient {
        return Err(RelayError::BadArgument {
            field: "idempotency_key",
            reason: format!("{key:?} was already used for another message ({}); use a new key for each message", earlier.id),
        });
    }
    Ok(())
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
