//! Receipts on their way to the servers: where this machine's panes got with the messages
//! sent to them. Queued per server, sent in batches in order, kept while a server is away.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::stream::FuturesUnordered;
pub use relay_proto::PeerReceipt;
use tokio::sync::Notify;

use crate::server_api::{ApiError, Credentials, ServerApi};

/// Receipts kept per server while it cannot be reached; the oldest go first past this.
const QUEUE_LIMIT: usize = 10_000;
/// Receipts per request.
const BATCH: usize = 500;
/// The wait after a server's first failure; it doubles up to the reconnect maximum.
const FIRST_RETRY: Duration = Duration::from_millis(250);

#[derive(Default)]
pub struct Outbox {
    queues: Mutex<HashMap<String, VecDeque<PeerReceipt>>>,
    /// Servers an upstream has reached again since the sender last looked.
    back: Mutex<HashSet<String>>,
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

    /// An upstream reached `server` again: what waits for it goes now, not when the backoff
    /// that its failures built up (as long as the reconnect maximum) runs out.
    pub fn server_back(&self, server: &str) {
        if self.back.lock().unwrap_or_else(|p| p.into_inner()).insert(server.to_owned()) {
            self.wake.notify_one();
        }
    }

    /// Up to a batch from each server's queue that `ready` allows.
    fn take(&self, ready: impl Fn(&str) -> bool) -> Vec<(String, Vec<PeerReceipt>)> {
        let mut queues = self.queues.lock().unwrap_or_else(|p| p.into_inner());
        queues
            .iter_mut()
            .filter(|(server, q)| !q.is_empty() && ready(server))
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

    /// Sends what is queued until shutdown, to every server at once, backing off from each
    /// server while it fails: a server that is away or slow holds up no other server.
    pub async fn run(self: Arc<Self>, sender: Sender) {
        let outbox = &self;
        let Sender { shutdown, reconnect_max, .. } = sender.clone();
        // servers that failed: the wait after their next failure, and when to try again
        let mut backoff: HashMap<String, (Duration, Instant)> = HashMap::new();
        let mut sending = FuturesUnordered::new();
        // servers with a batch in flight: one at a time each, so receipts stay in order
        let mut busy: HashSet<String> = HashSet::new();
        loop {
            for server in std::mem::take(&mut *outbox.back.lock().unwrap_or_else(|p| p.into_inner())) {
                backoff.remove(&server);
            }
            let now = Instant::now();
            let ready = |server: &str| !busy.contains(server) && backoff.get(server).is_none_or(|(_, at)| *at <= now);
            for (server, batch) in outbox.take(ready) {
                busy.insert(server.clone());
                let (sender, outbox) = (sender.clone(), self.clone());
                sending.push(async move {
                    let sent = send(&sender, &outbox, &server, batch).await;
                    (server, sent)
                });
            }
            let next_try = backoff.values().map(|(_, at)| *at).filter(|at| *at > now).min();
            tokio::select! {
                _ = shutdown.cancelled() => return,
                Some((server, sent)) = sending.next(), if !sending.is_empty() => {
                    busy.remove(&server);
                    if sent {
                        backoff.remove(&server);
                    } else {
                        let wait = backoff.get(&server).map_or(FIRST_RETRY, |(wait, _)| (*wait * 2).min(reconnect_max));
                        backoff.insert(server, (wait, Instant::now() + wait));
                    }
                }
                _ = outbox.wake.notified() => {}
                _ = tokio::time::sleep_until(next_try.unwrap_or(now).into()), if next_try.is_some() => {}
            }
        }
    }
}

/// What the outbox sends with, and until when.
#[derive(Clone)]
pub struct Sender {
    pub api: ServerApi,
    pub credentials: Arc<dyn Credentials>,
    pub shutdown: tokio_util::sync::CancellationToken,
    /// The longest wait between attempts at one server.
    pub reconnect_max: Duration,
}

/// Sends one batch; false if it went back in the queue to be tried again.
async fn send(sender: &Sender, outbox: &Outbox, server: &str, batch: Vec<PeerReceipt>) -> bool {
    let Some(token) = sender.credentials.daemon_token(server) else {
        // not registered with that server (yet): keep them for when it is
        outbox.put_back(server, batch);
        return false;
    };
    let retry = match sender.api.report(server, &token, &batch).await {
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
        outbox.put_back(server, batch);
    }
    !retry
}
