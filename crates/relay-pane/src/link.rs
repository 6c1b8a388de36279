//! The sidebar's link to relayd, its only road to the server: the pane's event stream, and
//! the questions and sends relayd answers as the pane's peer with the credential it holds.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Result, anyhow, bail};
use relay_local::client::Client;
use relay_proto::local::{AgentInfo, Attachment, DeliveryPath, ErrorCode, Reply, Request, SendRequest};
use relay_proto::{Event, EventKind};
use tokio::sync::mpsc;

use crate::app::PeerRow;
use crate::deliver;
use crate::deliver::notice::ReplyTarget;

const CLIENT_NAME: &str = "relay-pane";
/// How long relayd gets to answer a question: longer than it gives a server (30 s, and
/// 10 s to connect), so its own answer, even an error, arrives first.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(45);

/// What the link brings to the sidebar's loop.
pub enum Incoming {
    Subscribed(Vec<Attachment>),
    Event(Box<Event>),
    Peers(BTreeMap<String, BTreeMap<String, PeerRow>>),
    Lost(String),
    /// Words for the status line (how an agent's reply went).
    Note(String),
    /// `relay mcp` reported the pane's agent process.
    Agent(AgentInfo),
    /// Reminders due, checked with the server: what is read already is left out.
    Due {
        due: deliver::renotify::Due,
        settled: Vec<String>,
    },
}

/// Questions and sends for relayd, each in a task of its own; their answers come back to
/// the sidebar's loop as [`Incoming`].
pub struct Link {
    socket: PathBuf,
    pane: String,
    tx: mpsc::Sender<Incoming>,
}

impl Link {
    pub fn new(socket: PathBuf, pane: String, tx: mpsc::Sender<Incoming>) -> Self {
        Self { socket, pane, tx }
    }

    pub fn send_reply(&self, reply: deliver::AgentReply) {
        tokio::spawn(send_reply(self.socket.clone(), self.pane.clone(), reply, self.tx.clone()));
    }

    pub fn confirm_unread(&self, due: deliver::renotify::Due) {
        tokio::spawn(confirm_unread(self.socket.clone(), self.pane.clone(), due, self.tx.clone()));
    }

    pub fn tell_delivery(&self, path: DeliveryPath, activity: Option<String>) {
        tokio::spawn(tell_delivery(self.socket.clone(), self.pane.clone(), path, activity));
    }
}

/// One request on a connection of its own; relayd's error frames become errors.
async fn ask(socket: &Path, request: Request) -> Result<Reply> {
    let exchange = async {
        let mut client = Client::connect(socket, CLIENT_NAME).await?;
        match client.request(&request).await? {
            Reply::Error { code: ErrorCode::UnknownRequest, message } => {
                Err(anyhow!("relayd is older than this sidebar and cannot answer ({message}); restart relayd"))
            }
            Reply::Error { message, .. } => Err(anyhow!(message)),
            reply => Ok(reply),
        }
    };
    tokio::time::timeout(ANSWER_TIMEOUT, exchange).await.map_err(|_| anyhow!("relayd did not answer in time"))?
}

/// Subscribes through relayd, and again after every disconnect, resuming after the last
/// event seen in each group.
pub async fn follow(socket: PathBuf, pane: String, tx: mpsc::Sender<Incoming>) {
    let mut since: BTreeMap<String, u64> = BTreeMap::new();
    loop {
        let lost = match subscribe_once(&socket, &pane, &mut since, &tx).await {
            Ok(()) => "relayd closed the stream".to_owned(),
            Err(e) => e.to_string(),
        };
        if tx.send(Incoming::Lost(lost)).await.is_err() {
            return;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

async fn subscribe_once(socket: &Path, pane: &str, since: &mut BTreeMap<String, u64>, tx: &mpsc::Sender<Incoming>) -> Result<()> {
    let mut client = Client::connect(socket, CLIENT_NAME).await?;
    let attachments = match client.request(&Request::Subscribe { pane: pane.to_owned(), since: since.clone() }).await? {
        Reply::Subscribed { attachments, .. } => attachments,
        Reply::Error { message, .. } => bail!(message),
        other => bail!("unexpected reply {other:?}"),
    };
    tx.send(Incoming::Subscribed(attachments)).await?;
    tokio::spawn(load_peers(socket.to_owned(), pane.to_owned(), tx.clone()));
    loop {
        match client.next().await? {
            Reply::Event { event, .. } => {
                if event.kind != EventKind::Receipt {
                    since.insert(event.group.clone(), event.seq);
                }
                tx.send(Incoming::Event(Box::new(event))).await?;
            }
            Reply::Agent { agent, .. } => tx.send(Incoming::Agent(agent)).await?,
            _ => {}
        }
    }
}

/// Who is in the pane's groups.
async fn load_peers(socket: PathBuf, pane: String, tx: mpsc::Sender<Incoming>) {
    let peers = match ask(&socket, Request::Peers { pane }).await {
        Ok(Reply::Peers { peers, .. }) => peers,
        Ok(other) => return tracing::warn!("unexpected reply to peers: {other:?}"),
        Err(e) => return tracing::warn!("cannot list peers: {e:#}"),
    };
    let mut by_group: BTreeMap<String, BTreeMap<String, PeerRow>> = BTreeMap::new();
    for p in peers {
        by_group.entry(p.group_id).or_default().insert(p.peer_id, PeerRow { name: p.display_name, online: p.online });
    }
    let _ = tx.send(Incoming::Peers(by_group)).await;
}

/// Tells relayd how this sidebar delivers (for `relay status`) and what the agent is doing
/// (for the console).
async fn tell_delivery(socket: PathBuf, pane: String, path: DeliveryPath, activity: Option<String>) {
    if let Err(e) = ask(&socket, Request::Delivery { pane, path, activity }).await {
        tracing::debug!("could not tell relayd the delivery path: {e:#}");
    }
}

/// Whether the pane's copy of `event` is read (or held, or failed) already, as the server
/// says; None when it cannot be asked.
async fn settled_on_server(socket: &Path, pane: &str, event: &Event) -> Option<bool> {
    let request = Request::MessageStatus { pane: pane.to_owned(), group: event.group.clone(), message_id: event.id.clone() };
    match ask(socket, request).await {
        Ok(Reply::MessageStatus { status }) => Some(status.recipients.iter().any(|r| r.state.concerns_recipient())),
        Ok(_) | Err(_) => None,
    }
}

/// Leaves out of `due` what the server says the agent has read (or its human holds, or
/// failed) already: a receipt missed while relayd was reconnecting must not cause a
/// reminder. When the server cannot be asked, the reminder goes out.
async fn confirm_unread(socket: PathBuf, pane: String, mut due: deliver::renotify::Due, tx: mpsc::Sender<Incoming>) {
    let mut settled = Vec::new();
    for list in [&mut due.remind, &mut due.tell_human] {
        let mut unread = Vec::new();
        for e in list.drain(..) {
            if settled_on_server(&socket, &pane, &e).await == Some(true) {
                settled.push(e.id);
            } else {
                unread.push(e);
            }
        }
        *list = unread;
    }
    let _ = tx.send(Incoming::Due { due, settled }).await;
}

/// Sends what the agent answered with `SendMessage` over relay: a DM back to the sender,
/// or a message to the group.
async fn send_reply(socket: PathBuf, pane: String, reply: deliver::AgentReply, tx: mpsc::Sender<Incoming>) {
    let (group, to, what) = match reply.target {
        ReplyTarget::Dm { group, peer_id, .. } => (group, Some(peer_id), "a DM"),
        ReplyTarget::Group { group } => (group, None, "a message to the group"),
    };
    let key = uuid::Uuid::new_v4().to_string();
    let request = SendRequest { pane, group: group.clone(), to, text: reply.text, idempotency_key: Some(key) };
    let note = match ask(&socket, Request::Send(request)).await {
        Ok(Reply::Sent { sent }) => {
            tracing::info!(%group, message = %sent.message_id, "sent the agent's reply");
            format!("sent the agent's reply ({what} in {group})")
        }
        Ok(other) => format!("the agent's reply was not sent: unexpected reply {other:?}"),
        Err(e) => {
            tracing::warn!(%group, "the agent's reply was not sent: {e:#}");
            format!("the agent's reply was not sent: {e:#}")
        }
    };
    let _ = tx.send(Incoming::Note(note)).await;
}
