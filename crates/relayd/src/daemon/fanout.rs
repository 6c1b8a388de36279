//! Events from the upstream streams to the panes that should hear of them.

use super::*;

impl Daemon {
    /// An event from an upstream: remember how far the stream got, hand the event to every
    /// subscribed pane that should see it, and notify the desktop of DMs.
    pub fn on_event(&self, server: &str, group: &str, event: Event) {
        let key = upstream_key(server, group);
        let mut notices = Vec::new();
        let receipt = event.kind == EventKind::Receipt;
        {
            let mut inner = lock(&self.inner);
            if !inner.upstreams.contains_key(&key) {
                return; // reported before its group was detached: no one here wants it
            }
            // receipts are not in the log: no position of their own
            if !receipt {
                let last = inner.state.last_event_ids.entry(key.clone()).or_default();
                if event.seq <= *last {
                    return; // already seen: a resumed stream overlapped
                }
                *last = event.seq;
                if let Some(handle) = inner.upstreams.get_mut(&key) {
                    handle.status.last_event_id = event.seq;
                }
            }
            let recipients: Vec<(String, String, String)> = inner
                .state
                .attachments
                .iter()
                .filter(|a| a.attachment.server == server && a.attachment.group == group)
                .filter(|a| Addressed::of(&event).visible_to(&a.attachment.peer_id))
                .map(|a| (a.attachment.pane.clone(), a.attachment.display_name.clone(), a.attachment.peer_id.clone()))
                .collect();
            if event.kind.message_kind().is_some() {
                let delivered = recipients.iter().map(|(_, _, peer_id)| PeerReceipt {
                    peer_id: peer_id.clone(),
                    message_id: event.id.clone(),
                    state: DeliveryState::Delivered,
                    detail: None,
                });
                self.outbox.push(server, delivered);
            }
            let panes: Vec<(String, String)> = recipients.into_iter().map(|(pane, name, _)| (pane, name)).collect();
            if event.kind == EventKind::Dm && self.config.notifications {
                for (pane, name) in &panes {
                    notices.push(Notice {
                        summary: format!("DM from {} in {}", event.sender.name, event.group),
                        body: format!("to {name} ({pane}): {}", event.preview),
                    });
                }
            }
            inner.subscribers.retain(|sub| {
                if !panes.iter().any(|(p, _)| *p == sub.pane) {
                    return true;
                }
                match sub.tx.try_send(event.clone()) {
                    Ok(()) => true,
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        tracing::warn!(pane = %sub.pane, "a subscriber fell behind; dropping it (it resumes with since)");
                        false
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => false,
                }
            });
        }
        if !receipt {
            self.save_wanted.notify_one();
        }
        for notice in notices {
            self.notifier.notify(notice);
        }
    }
}
