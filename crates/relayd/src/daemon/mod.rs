//! The daemon's state and logic: attachments, upstream streams, fan-out to subscribed panes.

mod console;
mod fanout;
mod registration;
mod requests;

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
use crate::server_api::{ApiError, Credentials, PeerRequest, ServerApi};
use crate::state::{DaemonCredential, State, StoredAttachment, upstream_key};
use crate::upstream::{self, News};
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
    /// What the upstream streams report, for [`Self::follow_upstreams`].
    reports: mpsc::Sender<upstream::Report>,
    reports_rx: Mutex<Option<mpsc::Receiver<upstream::Report>>>,
}

impl Credentials for Daemon {
    fn daemon_token(&self, server: &str) -> Option<String> {
        Daemon::daemon_token(self, server)
    }
}

impl upstream::Host for Daemon {
    fn resume_from(&self, server: &str, group: &str) -> Option<u64> {
        self.last_event_id(server, group)
    }
}

/// Reports from the upstream streams not yet applied; a stream waits past this.
const REPORTS_BUFFER: usize = 1024;

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
        let (reports, reports_rx) = mpsc::channel(REPORTS_BUFFER);
        Arc::new(Self {
            reports,
            reports_rx: Mutex::new(Some(reports_rx)),
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

    pub fn outbox(&self) -> Arc<Outbox> {
        self.outbox.clone()
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
        let stream = upstream::Upstream {
            server: server.to_owned(),
            group: group.to_owned(),
            api: self.api.clone(),
            host: self.clone(),
            reports: self.reports.clone(),
            reconnect_max: self.reconnect_max(),
        };
        tokio::spawn(upstream::run(stream, cancel, retry_now));
    }

    pub fn daemon_token(&self, server: &str) -> Option<String> {
        lock(&self.inner).state.daemons.get(server).map(|d| d.token.clone())
    }

    /// The outbox's sender of receipts, for [`Outbox::run`].
    pub fn receipt_sender(self: &Arc<Self>) -> crate::receipts::Sender {
        crate::receipts::Sender {
            api: self.api.clone(),
            credentials: self.clone(),
            shutdown: self.shutdown.clone(),
            reconnect_max: self.reconnect_max(),
        }
    }

    /// Applies what the upstream streams report, in the order they report it, until
    /// relayd stops: the daemon alone changes its state.
    pub async fn follow_upstreams(self: Arc<Self>) {
        let Some(mut reports) = self.reports_rx.lock().unwrap_or_else(|p| p.into_inner()).take() else { return };
        loop {
            let report = tokio::select! {
                _ = self.shutdown.cancelled() => return,
                report = reports.recv() => match report {
                    Some(report) => report,
                    None => return,
                },
            };
            let upstream::Report { server, group, news } = report;
            match news {
                News::State { state, error } => self.set_upstream_state(&server, &group, state, error),
                News::Dropped(why) => self.note_drop(&server, &group, &why),
                News::Reached => self.outbox.server_back(&server),
                News::Event(event) => self.on_event(&server, &group, *event),
                News::Unauthorized { refused, done } => {
                    // (in a task: registering again talks to the server, and waits for attaches)
                    let daemon = self.clone();
                    tokio::spawn(async move {
                        let _ = done.send(daemon.reregister(&server, &refused).await);
                    });
                }
            }
        }
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
    pub fn delivery(&self, pane: &str, path: DeliveryPath, activity: Option<String>) -> Result<Reply, Failure> {
        // (under one lock with the check, so a detach cannot slip in between)
        let mut inner = lock(&self.inner);
        if !inner.state.attachments.iter().any(|a| a.attachment.pane == pane) {
            return Err(not_attached(pane));
        }
        if let DeliveryPath::Keys { why } = &path {
            tracing::info!(%pane, why, "the pane's sidebar types into the agent");
        }
        inner.delivery.insert(pane.to_owned(), path);
        drop(inner);
        if let Some(activity) = activity {
            self.tell_activity(pane, activity);
        }
        Ok(Reply::Noted { pane: pane.to_owned() })
    }

    pub fn credentials(&self, pane: &str) -> Result<Reply, Failure> {
        let credentials: Vec<Credential> = self.attachments_of(pane).iter().map(StoredAttachment::credential).collect();
        if credentials.is_empty() {
            return Err((ErrorCode::NotAttached, format!("pane {pane} is not attached; run `relay attach {pane} --group GROUP`")));
        }
        Ok(Reply::Credentials { pane: pane.to_owned(), credentials })
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
