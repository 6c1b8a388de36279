//! The daemon's state and logic: attachments, upstream streams, fan-out to subscribed panes.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures::StreamExt;
use relay_proto::local::{
    AgentInfo, AttachRequest, Attachment, ConnectionState, Credential, DeliveryPath, ErrorCode, Reply, SendRequest, Status, Upstream,
};
use relay_proto::{Addressed, DeliveryState, Event, EventKind, Receipt};
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;

use crate::receipts::{Outbox, PeerReceipt};
use crate::server_api::{ApiError, PeerRequest, ServerApi};
use crate::state::{DaemonCredential, State, StoredAttachment, upstream_key};
use crate::upstream;
use relay_local::config::Config;
use relay_local::notify::{Notice, Notifier};

/// Events a subscriber may fall behind before it is dropped (it resumes with `since`).
pub const SUBSCRIBER_BUFFER: usize = 4096;

/// What a subscriber receives.
pub struct Subscription {
    pub id: u64,
    pub attachments: Vec<StoredAttachment>,
    pub events: mpsc::Receiver<Event>,
    pub agents: mpsc::Receiver<AgentInfo>,
}

/// A failed request, as the error frame says it.
pub type Failure = (ErrorCode, String);

struct Subscriber {
    id: u64,
    pane: String,
    tx: mpsc::Sender<Event>,
    agents: mpsc::Sender<AgentInfo>,
}

struct UpstreamHandle {
    cancel: CancellationToken,
    /// Ends the stream's wait before its next attempt.
    retry_now: Arc<Notify>,
    status: Upstream,
}

#[derive(Default)]
struct Inner {
    state: State,
    upstreams: HashMap<String, UpstreamHandle>,
    /// Per server, the credential of a re-registration that failed part-way (see
    /// `register_again`).
    pending_daemons: HashMap<String, DaemonCredential>,
    /// Per upstream, how often its server started its log over (lost its data): a pane's
    /// subscription then forgets how far it got.
    log_restarts: HashMap<String, u64>,
    subscribers: Vec<Subscriber>,
    next_subscriber: u64,
    /// What `relay mcp` last reported of each pane's agent (until relayd restarts).
    agents: HashMap<String, AgentInfo>,
    /// Per pane, the messages its agent's session holds for the human (group, id).
    held: HashMap<String, std::collections::BTreeSet<(String, String)>>,
    /// Per pane, how its sidebar last said it delivers into the agent.
    delivery: HashMap<String, DeliveryPath>,
}

pub struct Daemon {
    config: Config,
    pub socket_path: PathBuf,
    state_dir: PathBuf,
    hostname: String,
    api: ServerApi,
    notifier: Arc<dyn Notifier>,
    inner: Mutex<Inner>,
    /// Attach and detach talk to servers; one at a time keeps the state simple.
    changing: tokio::sync::Mutex<()>,
    save_wanted: Notify,
    outbox: Arc<Outbox>,
    pub shutdown: CancellationToken,
}

fn lock(m: &Mutex<Inner>) -> MutexGuard<'_, Inner> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Daemon {
    pub fn new(
        config: Config,
        state: State,
        socket_path: PathBuf,
        state_dir: PathBuf,
        notifier: Arc<dyn Notifier>,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        Arc::new(Self {
            hostname: config.hostname(),
            config,
            socket_path,
            state_dir,
            api: ServerApi::new(),
            notifier,
            inner: Mutex::new(Inner { state, ..Inner::default() }),
            changing: tokio::sync::Mutex::new(()),
            save_wanted: Notify::new(),
            outbox: Arc::default(),
            shutdown,
        })
    }

    pub fn api(&self) -> &ServerApi {
        &self.api
    }

    pub fn outbox(&self) -> Arc<Outbox> {
        self.outbox.clone()
    }

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

    pub fn reconnect_max(&self) -> Duration {
        self.config.reconnect_max()
    }

    /// Starts an upstream for every group some pane is attached to (after a restart).
    pub fn resume(self: &Arc<Self>) {
        let keys: Vec<(String, String)> = {
            let inner = lock(&self.inner);
            inner.state.attachments.iter().map(|a| (a.attachment.server.clone(), a.attachment.group.clone())).collect()
        };
        for (server, group) in keys {
            self.ensure_upstream(&server, &group);
        }
    }

    fn ensure_upstream(self: &Arc<Self>, server: &str, group: &str) {
        let key = upstream_key(server, group);
        let mut inner = lock(&self.inner);
        if inner.upstreams.contains_key(&key) {
            return;
        }
        let cancel = self.shutdown.child_token();
        let status = Upstream {
            server: server.to_owned(),
            group: group.to_owned(),
            state: ConnectionState::Connecting,
            last_event_id: inner.state.last_event_ids.get(&key).copied().unwrap_or(0),
            panes: 0,
            error: None,
            reopened: 0,
            last_drop: None,
        };
        let retry_now = Arc::new(Notify::new());
        inner.upstreams.insert(key, UpstreamHandle { cancel: cancel.clone(), retry_now: retry_now.clone(), status });
        tokio::spawn(upstream::run(self.clone(), server.to_owned(), group.to_owned(), cancel, retry_now));
    }

    pub fn daemon_token(&self, server: &str) -> Option<String> {
        lock(&self.inner).state.daemons.get(server).map(|d| d.token.clone())
    }

    /// How often the server has started the group's log over, as far as relayd has seen.
    pub fn log_restarts(&self, server: &str, group: &str) -> u64 {
        lock(&self.inner).log_restarts.get(&upstream_key(server, group)).copied().unwrap_or(0)
    }

    /// Where the group's stream resumes; `None` before it has a position (then from now).
    pub fn last_event_id(&self, server: &str, group: &str) -> Option<u64> {
        lock(&self.inner).state.last_event_ids.get(&upstream_key(server, group)).copied()
    }

    pub fn set_upstream_state(&self, server: &str, group: &str, state: ConnectionState, error: Option<String>) {
        let mut inner = lock(&self.inner);
        let Some(handle) = inner.upstreams.get_mut(&upstream_key(server, group)) else { return };
        if handle.status.state == state && handle.status.error == error {
            return;
        }
        handle.status.state = state;
        handle.status.error = error;
        tracing::debug!(%server, %group, ?state, "upstream state");
    }

    /// A stream that had connected ended: counted, and why kept for `relay status`.
    pub fn note_drop(&self, server: &str, group: &str, why: &str) {
        tracing::info!(%server, %group, why, "upstream stream ended; reopening");
        let mut inner = lock(&self.inner);
        let Some(handle) = inner.upstreams.get_mut(&upstream_key(server, group)) else { return };
        handle.status.reopened = handle.status.reopened.saturating_add(1);
        handle.status.last_drop = Some(format!("{}: {why}", chrono::Utc::now().format("%Y-%m-%d %H:%M:%S UTC")));
    }

    /// An event from an upstream: remember how far the stream got, hand the event to every
    /// subscribed pane that should see it, and notify the desktop of DMs.
    pub fn on_event(&self, server: &str, group: &str, event: Event) {
        let key = upstream_key(server, group);
        let mut notices = Vec::new();
        let receipt = event.kind == EventKind::Receipt;
        {
            let mut inner = lock(&self.inner);
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

    pub async fn attach(self: &Arc<Self>, req: AttachRequest) -> Result<Reply, Failure> {
        let _changing = self.changing.lock().await;
        let server = Config::normalize_server(req.server.as_deref().unwrap_or(&self.config.server));
        if let Some(existing) = self.find(&req.pane, &server, &req.group) {
            return Ok(Reply::Attached { attachment: existing.attachment, already: true });
        }
        let name = self.distinct_name(&req, &server)?;
        let join_key = req.join_key.clone().or_else(|| self.config.join_keys.get(&server).cloned());
        let peer = PeerRequest {
            group: &req.group,
            hostname: &self.hostname,
            working_directory: &req.working_directory,
            git_branch: req.git_branch.as_deref(),
            name: name.as_deref(),
            join_key: join_key.as_deref(),
        };
        let token = self.credential(&server).await?;
        let registration = match self.api.register(&server, &token, &peer).await {
            Err(e) if e.is_unauthorized() => {
                // the server lost its data: the panes already here are registered again too
                self.register_again(&server, &token).await.map_err(server_failure)?;
                let token = self.daemon_token(&server).unwrap_or(token);
                self.api.register(&server, &token, &peer).await
            }
            other => other,
        }
        .map_err(server_failure)?;
        let stored = StoredAttachment {
            attachment: Attachment {
                pane: req.pane.clone(),
                server: server.clone(),
                group: registration.group_id.clone(),
                peer_id: registration.peer_id,
                display_name: registration.display_name,
                working_directory: req.working_directory.clone(),
            },
            token: registration.token,
            requested_name: name,
        };
        {
            let mut inner = lock(&self.inner);
            // A group's first pane here: its stream, about to open, starts where the pane
            // joined, so a message sent to it meanwhile is not missed.
            if let Some(after) = registration.events_after {
                inner.state.last_event_ids.entry(upstream_key(&server, &stored.attachment.group)).or_insert(after);
            }
            inner.state.attachments.push(stored.clone());
        }
        self.save_now().await;
        self.ensure_upstream(&server, &stored.attachment.group);
        tracing::info!(pane = %req.pane, %server, group = %req.group, peer = %stored.attachment.peer_id, "attached");
        Ok(Reply::Attached { attachment: stored.attachment, already: false })
    }

    /// The server knows a peer by host, directory and requested name: a second pane in the
    /// same directory and group would take over the first one's peer. It gets a name of its
    /// own instead (`host:dir-7` for pane %7), or an error if the clash is by explicit name.
    fn distinct_name(&self, req: &AttachRequest, server: &str) -> Result<Option<String>, Failure> {
        let inner = lock(&self.inner);
        let clash = inner.state.attachments.iter().find(|a| {
            a.attachment.server == server
                && a.attachment.group == req.group
                && a.attachment.working_directory == req.working_directory
                && a.attachment.pane != req.pane
                && a.requested_name == req.name
        });
        match (clash, &req.name) {
            (None, name) => Ok(name.clone()),
            (Some(other), None) => {
                let base = other.requested_name.clone().unwrap_or_else(|| other.attachment.display_name.clone());
                let base: String = base.chars().take(relay_proto::validate::MAX_NAME_CHARS - 8).collect();
                Ok(Some(format!("{base}-{}", req.pane.trim_start_matches('%'))))
            }
            (Some(other), Some(name)) => Err((
                ErrorCode::Server,
                format!(
                    "pane {} is already attached to {} as {name} from this directory; choose another --name",
                    other.attachment.pane, req.group
                ),
            )),
        }
    }

    fn find(&self, pane: &str, server: &str, group: &str) -> Option<StoredAttachment> {
        lock(&self.inner)
            .state
            .attachments
            .iter()
            .find(|a| a.attachment.pane == pane && a.attachment.server == server && a.attachment.group == group)
            .cloned()
    }

    /// The daemon's token on `server`, asking the server for one the first time.
    async fn credential(&self, server: &str) -> Result<String, Failure> {
        match self.daemon_token(server) {
            Some(token) => Ok(token),
            None => self.new_credential(server).await,
        }
    }

    async fn new_credential(&self, server: &str) -> Result<String, Failure> {
        let (daemon_id, token) = self.api.create_daemon(server, &self.hostname).await.map_err(server_failure)?;
        lock(&self.inner).state.daemons.insert(server.to_owned(), DaemonCredential { daemon_id, token: token.clone() });
        self.save_now().await;
        Ok(token)
    }

    /// After a server lost its data: a new credential, and every local pane registered again.
    /// `refused` is the token the server did not know; if another upstream already replaced
    /// it, there is nothing left to do.
    pub async fn reregister(self: &Arc<Self>, server: &str, refused: &str) -> Result<(), ApiError> {
        let _changing = self.changing.lock().await;
        self.register_again(server, refused).await
    }

    /// [`Self::reregister`], for a caller that holds `changing`.
    async fn register_again(self: &Arc<Self>, server: &str, refused: &str) -> Result<(), ApiError> {
        if self.daemon_token(server).as_deref() != Some(refused) {
            return Ok(());
        }
        // the credential an unfinished attempt made, if any: registering a pane again with it
        // finds the same peer (the server knows a peer by host, directory and name)
        let pending = lock(&self.inner).pending_daemons.remove(server);
        let DaemonCredential { daemon_id, token } = match pending {
            Some(credential) => credential,
            None => {
                let (daemon_id, token) = self.api.create_daemon(server, &self.hostname).await?;
                DaemonCredential { daemon_id, token }
            }
        };
        let attachments: Vec<StoredAttachment> =
            lock(&self.inner).state.attachments.iter().filter(|a| a.attachment.server == server).cloned().collect();
        // per group, where its first pane joined again: its stream resumes there, so nothing
        // sent to the panes since is missed
        let mut resume_after: HashMap<String, u64> = HashMap::new();
        let mut registered = Ok(());
        for old in attachments.iter() {
            let a = &old.attachment;
            let peer = PeerRequest {
                group: &a.group,
                hostname: &self.hostname,
                working_directory: &a.working_directory,
                git_branch: None,
                name: old.requested_name.as_deref(),
                join_key: self.config.join_keys.get(server).map(String::as_str),
            };
            let registration = match self.api.register(server, &token, &peer).await {
                Ok(registration) => registration,
                // this pane's own trouble (a join key of its own, say), not the server's
                Err(e) if e.is_refusal_of_the_request() => {
                    tracing::warn!(pane = %a.pane, %server, group = %a.group, error = %e, "cannot register this pane again; attach it again");
                    continue;
                }
                Err(e) => {
                    registered = Err(e);
                    break;
                }
            };
            if let Some(stored) = lock(&self.inner).state.attachments.iter_mut().find(|s| s.attachment == old.attachment) {
                stored.attachment.peer_id = registration.peer_id;
                stored.attachment.display_name = registration.display_name;
                stored.token = registration.token;
            }
            if let Some(after) = registration.events_after {
                let first = resume_after.entry(upstream_key(server, &a.group)).or_insert(after);
                *first = (*first).min(after);
            }
        }
        // The new credential is kept only once every pane has been registered with it: until
        // then the streams keep meeting 401 and the next of them goes on with it, so no pane is
        // left with a peer the server does not know.
        if let Err(e) = &registered {
            if !e.is_unauthorized() {
                lock(&self.inner).pending_daemons.insert(server.to_owned(), DaemonCredential { daemon_id, token });
            }
        } else {
            let mut inner = lock(&self.inner);
            inner.state.daemons.insert(server.to_owned(), DaemonCredential { daemon_id, token });
            // a server that lost its data numbers events from the start again
            for a in &attachments {
                let key = upstream_key(server, &a.attachment.group);
                inner.state.last_event_ids.remove(&key);
                *inner.log_restarts.entry(key).or_default() += 1;
            }
            for (key, after) in resume_after {
                if let Some(handle) = inner.upstreams.get_mut(&key) {
                    handle.status.last_event_id = after;
                }
                inner.state.last_event_ids.insert(key, after);
            }
            // every stream of this server, not only the one that met the 401, reopens now
            for handle in inner.upstreams.values().filter(|h| h.status.server == server) {
                handle.retry_now.notify_waiters();
            }
        }
        self.save_now().await;
        registered
    }

    pub async fn detach(self: &Arc<Self>, pane: &str, group: Option<&str>) -> Result<Reply, Failure> {
        let _changing = self.changing.lock().await;
        let leaving: Vec<StoredAttachment> = lock(&self.inner)
            .state
            .attachments
            .iter()
            .filter(|a| a.attachment.pane == pane && group.is_none_or(|g| a.attachment.group == g))
            .cloned()
            .collect();
        if leaving.is_empty() {
            return Err((ErrorCode::NotAttached, format!("pane {pane} is not attached{}", in_group(group))));
        }
        for a in &leaving {
            if let Some(token) = self.daemon_token(&a.attachment.server) {
                match self.api.remove_peer(&a.attachment.server, &token, &a.attachment.peer_id).await {
                    Ok(()) => {}
                    // a server that forgot us has forgotten the peer too
                    Err(e) if e.is_unauthorized() => {}
                    Err(e) => return Err(server_failure(e)),
                }
            }
        }
        let groups: Vec<String> = leaving.iter().map(|a| a.attachment.group.clone()).collect();
        {
            let mut inner = lock(&self.inner);
            inner.state.attachments.retain(|a| !leaving.contains(a));
            if !inner.state.attachments.iter().any(|a| a.attachment.pane == pane) {
                inner.held.remove(pane);
                inner.agents.remove(pane);
                inner.delivery.remove(pane);
            } else if let Some(held) = inner.held.get_mut(pane) {
                held.retain(|(group, _)| !groups.contains(group));
            }
            for a in &leaving {
                let (server, group) = (&a.attachment.server, &a.attachment.group);
                let still_used = inner.state.attachments.iter().any(|o| o.attachment.server == *server && o.attachment.group == *group);
                if !still_used {
                    let key = upstream_key(server, group);
                    if let Some(handle) = inner.upstreams.remove(&key) {
                        handle.cancel.cancel();
                    }
                    inner.state.last_event_ids.remove(&key);
                }
            }
        }
        self.save_now().await;
        tracing::info!(%pane, ?groups, "detached");
        Ok(Reply::Detached { pane: pane.to_owned(), groups })
    }

    /// A new subscriber for `pane`: its attachments and the receiving ends of its events
    /// and of news of its agent (the last known first).
    pub fn subscribe(&self, pane: &str) -> Subscription {
        let (tx, events) = mpsc::channel(SUBSCRIBER_BUFFER);
        let (agents_tx, agents) = mpsc::channel(4);
        let mut inner = lock(&self.inner);
        inner.next_subscriber += 1;
        let id = inner.next_subscriber;
        if let Some(agent) = inner.agents.get(pane) {
            let _ = agents_tx.try_send(agent.clone());
        }
        inner.subscribers.push(Subscriber { id, pane: pane.to_owned(), tx, agents: agents_tx });
        let attachments = inner.state.attachments.iter().filter(|a| a.attachment.pane == pane).cloned().collect();
        Subscription { id, attachments, events, agents }
    }

    /// `relay mcp` reported the pane's agent: remember it and tell the pane's subscribers.
    pub fn agent_started(&self, pane: &str, agent: AgentInfo) -> Reply {
        let mut inner = lock(&self.inner);
        for sub in inner.subscribers.iter().filter(|s| s.pane == pane) {
            let _ = sub.agents.try_send(agent.clone());
        }
        tracing::info!(%pane, pid = agent.pid, socket = ?agent.messaging_socket, "the pane's agent reported in");
        inner.agents.insert(pane.to_owned(), agent.clone());
        Reply::Agent { pane: pane.to_owned(), agent }
    }

    pub fn unsubscribe(&self, id: u64) {
        lock(&self.inner).subscribers.retain(|s| s.id != id);
    }

    pub fn attachments_of(&self, pane: &str) -> Vec<StoredAttachment> {
        lock(&self.inner).state.attachments.iter().filter(|a| a.attachment.pane == pane).cloned().collect()
    }

    pub fn status(&self) -> Status {
        let inner = lock(&self.inner);
        let mut upstreams: Vec<Upstream> = inner
            .upstreams
            .values()
            .map(|h| {
                let mut u = h.status.clone();
                u.panes =
                    inner.state.attachments.iter().filter(|a| a.attachment.server == u.server && a.attachment.group == u.group).count();
                u
            })
            .collect();
        upstreams.sort_by(|a, b| (&a.server, &a.group).cmp(&(&b.server, &b.group)));
        Status {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            pid: std::process::id(),
            socket: self.socket_path.display().to_string(),
            server: Config::normalize_server(&self.config.server),
            attachments: inner.state.attachments.iter().map(|a| a.attachment.clone()).collect(),
            upstreams,
            subscribers: inner.subscribers.len(),
            held: inner.held.iter().filter(|(_, h)| !h.is_empty()).map(|(pane, h)| (pane.clone(), h.len())).collect(),
            delivery: inner.delivery.iter().map(|(pane, path)| (pane.clone(), path.clone())).collect(),
        }
    }

    /// The pane's sidebar says how it delivers into its agent now.
    pub fn delivery(&self, pane: &str, path: DeliveryPath) -> Result<Reply, Failure> {
        // (under one lock with the check, so a detach cannot slip in between)
        let mut inner = lock(&self.inner);
        if !inner.state.attachments.iter().any(|a| a.attachment.pane == pane) {
            return Err(not_attached(pane));
        }
        if let DeliveryPath::Keys { why } = &path {
            tracing::info!(%pane, why, "the pane's sidebar types into the agent");
        }
        inner.delivery.insert(pane.to_owned(), path);
        Ok(Reply::Noted { pane: pane.to_owned() })
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

    pub fn credentials(&self, pane: &str) -> Result<Reply, Failure> {
        let credentials: Vec<Credential> = self.attachments_of(pane).iter().map(StoredAttachment::credential).collect();
        if credentials.is_empty() {
            return Err((ErrorCode::NotAttached, format!("pane {pane} is not attached; run `relay attach {pane} --group GROUP`")));
        }
        Ok(Reply::Credentials { pane: pane.to_owned(), credentials })
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

    /// Writes the state now (attachments changed: worth a disk write before replying).
    pub async fn save_now(&self) {
        let snapshot = lock(&self.inner).state.clone();
        let dir = self.state_dir.clone();
        let saved = tokio::task::spawn_blocking(move || snapshot.save(&dir)).await;
        if let Ok(Err(e)) | Err(e) = saved.map_err(std::io::Error::other) {
            tracing::error!(error = %e, dir = %self.state_dir.display(), "cannot save relayd's state");
        }
    }

    /// Saves stream positions in the background, at most a few times a second.
    pub async fn save_in_background(self: Arc<Self>) {
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => break,
                _ = self.save_wanted.notified() => {}
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
            self.save_now().await;
        }
        self.save_now().await;
    }

    /// Last event ids by group for one pane's attachments, as a subscriber's `since` starts.
    pub fn since_defaults(&self, attachments: &[StoredAttachment]) -> BTreeMap<String, u64> {
        attachments
            .iter()
            .map(|a| (a.attachment.group.clone(), self.last_event_id(&a.attachment.server, &a.attachment.group).unwrap_or(0)))
            .collect()
    }
}

fn in_group(group: Option<&str>) -> String {
    group.map(|g| format!(" to group {g}")).unwrap_or_default()
}

fn not_attached(pane: &str) -> Failure {
    (ErrorCode::NotAttached, format!("pane {pane} is not attached"))
}

fn server_failure(e: ApiError) -> Failure {
    (ErrorCode::Server, e.to_string())
}
