//! Where each recipient's copy of a message is: receipts in, statuses out.

use super::*;

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
#[derive(Debug, Serialize, Deserialize)]
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
            // the marks on the human's own messages
            Audience::Human(view) => addressed.recipient == Some(view.peer.peer_id.as_str()),
        }
    }
}

impl Relay {
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
        let now = self.clock.now();
        let record = DeliveryRecord {
            message_id: message.id.clone(),
            peer_id: recipient.peer_id.clone(),
            state,
            detail: detail.clone(),
            updated_at: now,
        };
        if !self.store.advance_delivery(&record)? {
            return Ok(false);
        }
        let sender_daemon = self.store.peer(&message.sender_id)?.and_then(|p| p.daemon_id);
        let daemons = [sender_daemon, recipient.daemon_id.clone()];
        let event = Event {
            kind: EventKind::Receipt,
            id: message.id.clone(),
            seq: message.seq,
            group: message.group_id.clone(),
            sender: PeerRef { peer_id: recipient.peer_id.clone(), name: recipient.display_name.clone() },
            sender_kind: recipient.kind,
            recipient: Some(PeerRef { peer_id: message.sender_id.clone(), name: message.sender_name.clone() }),
            preview: format!("{} {state}", recipient.display_name),
            time: now,
            text: None,
            state: Some(state),
            detail,
        };
        let peers = [message.sender_id.clone(), recipient.peer_id.clone()];
        let note = ReceiptNote { event, peers, daemons };
        if self.store.shared() {
            // every node's streams, this one's included, hear it through the store
            self.store.share(&message.group_id, serde_json::to_vec(&note).expect("notes serialize"));
        } else {
            self.fanout.receipt(&message.group_id, Arc::new(note));
        }
        Ok(true)
    }

    /// Receipts from a daemon for its own peers; each is checked on its own.
    pub fn daemon_receipts(&self, daemon_id: &str, receipts: &[PeerReceipt]) -> Result<ReceiptOutcome> {
        let mut outcome = ReceiptOutcome::default();
        for r in receipts {
            let reject = |why: &str| serde_json::json!({"message_id": r.message_id, "peer_id": r.peer_id, "error": why});
            let Some(peer) = self.registered_by(daemon_id, &r.peer_id)? else {
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
    pub(super) fn recipient_statuses(&self, entry: &LogEntry) -> Result<Vec<RecipientStatus>> {
        let mut records: HashMap<String, DeliveryRecord> =
            self.store.deliveries(&entry.id)?.into_iter().map(|d| (d.peer_id.clone(), d)).collect();
        let recipients: Vec<PeerRef> = match (&entry.recipient_id, &entry.recipient_name) {
            (Some(id), name) => vec![PeerRef { peer_id: id.clone(), name: name.clone().unwrap_or_default() }],
            (None, _) => self
                .store
                .peers_in_group(&entry.group_id)?
                .into_iter()
                // (a human in the console has no deliverer to report on its copy)
                .filter(|p| p.peer_id != entry.sender_id && p.joined_at <= entry.created_at && p.kind.is_agent())
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
}
