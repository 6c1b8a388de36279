//! Receipts on their way to the servers: where this machine's panes got with the messages
//! sent to them. Queued per server, sent in batches in order, kept while a server is away.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub use relay_proto::PeerReceipt;
use tokio::sync::Notify;

use crate::daemon::Daemon;
use crate::server_api::ApiError;

/// Receipts kept per server while it cannot be reached; the oldest go first past this.
const QUEUE_LIMIT: usize = 10_000;
/// Receipts per request.
const BATCH: usize = 500;

#[derive(Default)]
pub struct Outbox {
    queues: Mutex<HashMap<String, VecDeque<PeerReceipt>>>,
    wake: Notify,
}

impl Outbox {
    pub fn push(&self, server: &str, receipts: impl IntoIterator<Item = PeerReceipt>) -> usize {
        let mut queues = self.queues.lock().unwrap_or_else(|p| p.into_inner());
        let queue = queues.entry(server.to_owned()).or_default();
        let before = queue.len();
        queue.extend(receipts);
        let added = queue.len() - before;
        if queue.len() > QUEUE_LIMIT {
            let dropped = queue.len() - QUEUE_LIMIT;
            queue.drain(..dropped);
            tracing::warn!(%server, dropped, "the server has been away too long; dropping the oldest receipts");
        }
        drop(queues);
        if added > 0 {
            self.wake.notify_one();
        }
        added
    }

    fn take(&self) -> Vec<(String, Vec<PeerReceipt>)> {
        let mut queues = self.queues.lock().unwrap_or_else(|p| p.into_inner());
        queues
            .iter_mut()
            .filter(|(_, q)| !q.is_empty())
            .map(|(server, q)| (server.clone(), q.drain(..q.len().min(BATCH)).collect()))
            .collect()
    }

    fn put_back(&self, server: &str, batch: Vec<PeerReceipt>) {
        let mut queues = self.queues.lock().unwrap_or_else(|p| p.into_inner());
        let queue = queues.entry(server.to_owned()).or_default();
        for receipt in batch.into_iter().rev() {
            queue.push_front(receipt);
        }
    }

    /// Sends what is queued until shutdown, backing off while a server fails.
    pub async fn run(daemon: Arc<Daemon>) {
        let outbox = daemon.outbox();
        let mut backoff = Duration::from_millis(250);
        loop {
            let batches = outbox.take();
            if batches.is_empty() {
                tokio::select! {
                    _ = daemon.shutdown.cancelled() => return,
                    _ = outbox.wake.notified() => continue,
                }
            }
            let mut failed = false;
            for (server, batch) in batches {
                let Some(token) = daemon.daemon_token(&server) else {
                    // not registered with that server (yet): keep them for when it is
                    failed = true;
                    outbox.put_back(&server, batch);
                    continue;
                };
                let retry = match daemon.api().report(&server, &token, &batch).await {
                    Ok(outcome) => {
                        if let Some(rejected) = outcome["rejected"].as_array().filter(|r| !r.is_empty()) {
                            tracing::debug!(%server, ?rejected, "the server refused some receipts");
                        }
                        false
                    }
                    // the upstream re-registers the daemon; the receipts wait for it
                    Err(e) if e.is_unauthorized() => true,
                    Err(ApiError::Refused { status, message, .. }) if (400..500).contains(&status) => {
                        tracing::warn!(%server, status, %message, "receipts refused; dropping them");
                        false
                    }
                    Err(e) => {
                        tracing::debug!(%server, error = %e, "cannot send receipts yet");
                        true
                    }
                };
                if retry {
                    failed = true;
                    outbox.put_back(&server, batch);
                }
            }
            if failed {
                tokio::select! {
                    _ = daemon.shutdown.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(daemon.reconnect_max());
            } else {
                backoff = Duration::from_millis(250);
            }
        }
    }
}
