//! MCP sessions (protocol versions before 2026-07-28) with a bound on how many live at once.
//!
//! rmcp's `LocalSessionManager` keeps every session that ever sent `initialize` until it has
//! been idle for `session_idle_secs`, and an `initialize` costs an anonymous client nothing:
//! 20,000 of them took the server from 10 MB to 1.2 GB. This wrapper keeps at most
//! `max_sessions`; when a new one would pass that, the oldest session that never made a
//! request goes first, else the one unused longest. A session that never made a request is
//! also closed once it has waited `unused_session_secs`.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use futures::Stream;
use rmcp::model::{ClientJsonRpcMessage, ServerJsonRpcMessage};
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::streamable_http_server::session::{EventStore, ServerSseMessage, SessionId, SessionManager};

use crate::relay::Relay;

pub struct BoundedSessions {
    inner: LocalSessionManager,
    max: usize,
    unused_limit: Duration,
    table: Mutex<HashMap<SessionId, Use>>,
    relay: Arc<Relay>,
}

#[derive(Clone, Copy)]
struct Use {
    last: Instant,
    /// Made a request (beyond `initialize`) or opened a stream.
    used: bool,
}

impl BoundedSessions {
    pub fn new(inner: LocalSessionManager, max: usize, unused_limit: Duration, relay: Arc<Relay>) -> Self {
        Self { inner, max: max.max(1), unused_limit, table: Mutex::new(HashMap::new()), relay }
    }

    fn table(&self) -> std::sync::MutexGuard<'_, HashMap<SessionId, Use>> {
        self.table.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn touch(&self, id: &SessionId, used: bool) {
        if let Some(entry) = self.table().get_mut(id) {
            entry.last = Instant::now();
            entry.used |= used;
        }
    }

    /// The sessions to close before one more may open: those left unused too long, then
    /// as many more as the bound asks, unused ones first, oldest first.
    fn victims(&self, now: Instant) -> Vec<SessionId> {
        let mut table = self.table();
        let mut out: Vec<SessionId> =
            table.iter().filter(|(_, u)| !u.used && now.duration_since(u.last) >= self.unused_limit).map(|(id, _)| id.clone()).collect();
        for id in &out {
            table.remove(id);
        }
        if table.len() >= self.max {
            let mut order: Vec<(bool, Instant, SessionId)> = table.iter().map(|(id, u)| (u.used, u.last, id.clone())).collect();
            order.sort_unstable_by_key(|(used, last, _)| (*used, *last));
            for (_, _, id) in order.into_iter().take(table.len() + 1 - self.max) {
                table.remove(&id);
                out.push(id);
            }
        }
        out
    }

    pub fn open(&self) -> usize {
        self.table().len()
    }
}

impl SessionManager for BoundedSessions {
    type Error = <LocalSessionManager as SessionManager>::Error;
    type Transport = <LocalSessionManager as SessionManager>::Transport;

    async fn create_session(&self) -> Result<(SessionId, Self::Transport), Self::Error> {
        let victims = self.victims(Instant::now());
        if !victims.is_empty() {
            tracing::debug!(closed = victims.len(), "closing MCP sessions to make room");
            self.relay.metrics.sessions_evicted(victims.len());
        }
        for id in victims {
            let _ = self.inner.close_session(&id).await;
        }
        let (id, transport) = self.inner.create_session().await?;
        self.table().insert(id.clone(), Use { last: Instant::now(), used: false });
        self.relay.metrics.sessions_open(self.open());
        Ok((id, transport))
    }

    async fn initialize_session(&self, id: &SessionId, message: ClientJsonRpcMessage) -> Result<ServerJsonRpcMessage, Self::Error> {
        self.touch(id, false);
        self.inner.initialize_session(id, message).await
    }

    async fn has_session(&self, id: &SessionId) -> Result<bool, Self::Error> {
        self.inner.has_session(id).await
    }

    async fn close_session(&self, id: &SessionId) -> Result<(), Self::Error> {
        let removed = self.table().remove(id).is_some();
        if removed {
            self.relay.metrics.sessions_open(self.open());
        }
        self.inner.close_session(id).await
    }

    async fn create_stream(
        &self,
        id: &SessionId,
        message: ClientJsonRpcMessage,
    ) -> Result<impl Stream<Item = ServerSseMessage> + Send + Sync + 'static, Self::Error> {
        self.touch(id, true);
        self.inner.create_stream(id, message).await
    }

    async fn accept_message(&self, id: &SessionId, message: ClientJsonRpcMessage) -> Result<(), Self::Error> {
        // (`notifications/initialized` comes this way: not a use yet)
        self.touch(id, false);
        self.inner.accept_message(id, message).await
    }

    async fn create_standalone_stream(
        &self,
        id: &SessionId,
    ) -> Result<impl Stream<Item = ServerSseMessage> + Send + Sync + 'static, Self::Error> {
        self.touch(id, true);
        self.inner.create_standalone_stream(id).await
    }

    async fn resume(
        &self,
        id: &SessionId,
        last_event_id: String,
    ) -> Result<impl Stream<Item = ServerSseMessage> + Send + Sync + 'static, Self::Error> {
        self.touch(id, true);
        self.inner.resume(id, last_event_id).await
    }

    fn event_store(&self) -> Option<Arc<dyn EventStore>> {
        self.inner.event_store()
    }
}
