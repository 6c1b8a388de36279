//! What panes ask of the servers through relayd: receipts, peers, message status, sends,
//! and events a subscriber missed.

use super::*;

impl Daemon {
    /// Receipts from a pane's deliverer, passed on to the servers as its peers' reports.
    pub fn report(&self, pane: &str, receipts: Vec<Receipt>) -> Result<Reply, Failure> {
        let attachments = self.attachments_of(pane);
        if attachments.is_empty() {
            return Err(not_attached(pane));
        }
        let mut queued = 0;
        for r in receipts {
            // one stale receipt (a group the pane has left) must not cost the others
            let Some(a) = attachments.iter().find(|a| a.attachment.group == r.group) else {
                tracing::warn!(%pane, group = %r.group, "dropping a receipt for a group the pane is not in");
                continue;
            };
            {
                let mut inner = lock(&self.inner);
                let held = inner.held.entry(pane.to_owned()).or_default();
                let key = (r.group.clone(), r.message_id.clone());
                if r.state == DeliveryState::Held {
                    held.insert(key);
                } else {
                    held.remove(&key);
                }
            }
            let receipt = PeerReceipt { peer_id: a.attachment.peer_id.clone(), message_id: r.message_id, state: r.state, detail: r.detail };
            queued += self.outbox.push(&a.attachment.server, [receipt]);
        }
        Ok(Reply::Reported { pane: pane.to_owned(), queued })
    }

    /// Who is in the pane's groups, asked of each server as the pane's peer there. A server
    /// that cannot be asked leaves its groups out, unless no server answered.
    pub async fn peers(&self, pane: &str) -> Result<Reply, Failure> {
        let attachments = self.attachments_of(pane);
        if attachments.is_empty() {
            return Err(not_attached(pane));
        }
        let (mut peers, mut failed) = (Vec::new(), None);
        for a in &attachments {
            let a = &a.attachment;
            let asked = match self.daemon_token(&a.server) {
                Some(token) => self.api.peers(&a.server, &token, &a.peer_id).await,
                None => continue,
            };
            match asked {
                Ok(found) => peers.extend(found),
                Err(e) => {
                    tracing::warn!(%pane, group = %a.group, error = %e, "cannot list the group's peers");
                    failed = Some(e);
                }
            }
        }
        match failed {
            Some(e) if peers.is_empty() => Err(server_failure(e)),
            _ => Ok(Reply::Peers { pane: pane.to_owned(), peers }),
        }
    }

    /// Where the copies of a message stand, asked as the pane's peer in `group`.
    pub async fn message_status(&self, pane: &str, group: &str, message_id: &str) -> Result<Reply, Failure> {
        let (a, token) = self.acting_for(pane, group)?;
        let status = self.api.message_status(&a.server, &token, &a.peer_id, message_id).await.map_err(server_failure)?;
        Ok(Reply::MessageStatus { status })
    }

    /// Sends as the pane's peer in the request's group.
    pub async fn send(&self, req: SendRequest) -> Result<Reply, Failure> {
        let (a, token) = self.acting_for(&req.pane, &req.group)?;
        let sent = self.api.send_as(&a.server, &token, &a.peer_id, &req).await.map_err(server_failure)?;
        Ok(Reply::Sent { sent })
    }

    /// The pane's peer in `group`, and the credential relayd holds on its server.
    fn acting_for(&self, pane: &str, group: &str) -> Result<(Attachment, String), Failure> {
        let attachments = self.attachments_of(pane);
        if attachments.is_empty() {
            return Err(not_attached(pane));
        }
        let Some(a) = attachments.into_iter().find(|a| a.attachment.group == group) else {
            return Err((ErrorCode::NotAttached, format!("pane {pane} is not attached to group {group}")));
        };
        let token = self.daemon_token(&a.attachment.server).ok_or_else(|| {
            (ErrorCode::Server, format!("relayd holds no credential for {} yet; try again in a moment", a.attachment.server))
        })?;
        Ok((a.attachment, token))
    }

    /// The events a subscriber missed in `group` after `since`, fetched from the server.
    pub async fn catch_up(&self, attachment: &StoredAttachment, since: u64) -> Result<Vec<Event>, ApiError> {
        let a = &attachment.attachment;
        let Some(token) = self.daemon_token(&a.server) else { return Ok(Vec::new()) };
        let response = self.api.events(&a.server, &token, &a.group, (since > 0).then_some(since), true).await?;
        let mut out = Vec::new();
        let mut events = sse_stream::SseStream::from_bytes_stream(response.bytes_stream());
        while let Some(Ok(sse)) = events.next().await {
            if let Some(event) = sse.data.and_then(|d| serde_json::from_str::<Event>(&d).ok())
                && Addressed::of(&event).visible_to(&a.peer_id)
            {
                out.push(event);
            }
        }
        Ok(out)
    }
}
