//! Delivery into the agent, best path first:
//!
//! 1. [`inbox`]: Claude Code's inbox socket. The messages themselves go in, one notice per
//!    conversation ([`notice`]); no keystrokes. Claude Code answers on relay's reply
//!    sockets: receipts for held messages, and the agent's own `SendMessage` replies.
//! 2. [`keys`]: one announcement line typed into the pane, for every other agent (and for a
//!    Claude Code session that refuses its inbox, when the user asked for that fallback).
//!
//! Every outcome becomes a [`Receipt`] for the senders to see.

pub mod inbox;
pub mod keys;
pub mod notice;
pub mod renotify;

use std::collections::HashMap;
use std::io;
use std::path::PathBuf;

use relay_proto::local::AgentInfo;
use relay_proto::{DeliveryState, Event, Receipt};
use tokio::sync::mpsc;

pub use inbox::Heard;
use inbox::{Inbound, ReplySocket};
use notice::ReplyTarget;
use relay_local::claude::{self as session, Session};

/// A message by group and id.
type MessageRef = (String, String);

/// A notice posted into the inbox, until Claude Code has it in the conversation.
struct Posted {
    carried: Vec<MessageRef>,
    mentioned: Vec<MessageRef>,
}

/// What the agent asked relay to send, by answering a notice with `SendMessage`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentReply {
    pub target: ReplyTarget,
    pub text: String,
}

/// The result of handing a burst to the inbox.
pub enum Posting {
    /// Posted; these receipts say so. `left` did not go in (the inbox stopped answering
    /// halfway): try them again.
    Posted { receipts: Vec<Receipt>, left: Vec<Event> },
    /// The pane has no Claude Code session with an inbox (now): use keystrokes.
    NoInbox,
}

/// What became of something a reply socket heard.
#[derive(Debug, Default)]
pub struct Outcome {
    pub receipts: Vec<Receipt>,
    pub reply: Option<AgentReply>,
    /// Messages Claude Code would not let in (denied, expired, refused, dropped).
    pub refused: Vec<MessageRef>,
    /// Words for the human, in the sidebar.
    pub note: Option<String>,
    /// Claude Code would not let relay's introduction in: the group it was for.
    pub intro_refused: Option<String>,
}

pub struct Inbox {
    pane: String,
    /// The pane's own display name, named in notices.
    me: String,
    claude_dir: Option<PathBuf>,
    session: Option<Session>,
    /// What `relay mcp` reported of the pane's agent (its parent), tried first.
    reported: Option<AgentInfo>,
    reply_sockets: HashMap<ReplyTarget, ReplySocket>,
    heard: mpsc::Sender<Heard>,
    posted: HashMap<String, Posted>,
    /// The msg_id of relay's introduction, and its group.
    intro: Option<(String, String)>,
    transcript: Option<(PathBuf, u64)>,
    /// Claude Code drops a sender's messages past 30 at once and 0.5 a second; relay keeps
    /// under that and coalesces more instead.
    room: f64,
    room_at: std::time::Instant,
}

/// The most of a transcript read at once.
const TRANSCRIPT_CHUNK: u64 = 16 * 1024 * 1024;

/// Notices relay posts at once into one session, and how fast the room comes back.
const ROOM: f64 = 20.0;
const ROOM_PER_SECOND: f64 = 0.5;

impl Inbox {
    pub fn with_claude_dir(pane: &str, claude_dir: Option<PathBuf>, heard: mpsc::Sender<Heard>) -> Self {
        Self {
            pane: pane.to_owned(),
            me: String::new(),
            claude_dir,
            session: None,
            reported: None,
            reply_sockets: HashMap::new(),
            heard,
            posted: HashMap::new(),
            intro: None,
            transcript: None,
            room: ROOM,
            room_at: std::time::Instant::now(),
        }
    }

    /// How long to wait before the next notice fits under Claude Code's rate limit; None
    /// when one fits now.
    pub fn wait_for_room(&mut self) -> Option<std::time::Duration> {
        let now = std::time::Instant::now();
        self.room = (self.room + now.duration_since(self.room_at).as_secs_f64() * ROOM_PER_SECOND).min(ROOM);
        self.room_at = now;
        (self.room < 1.0).then(|| std::time::Duration::from_secs_f64((1.0 - self.room) / ROOM_PER_SECOND))
    }

    pub fn set_me(&mut self, name: &str) {
        self.me = name.to_owned();
    }

    /// `relay mcp` told relayd which process runs in the pane (again each time it starts,
    /// and relayd repeats it to every new subscriber). A different session replaces the
    /// one we know; the same one keeps its reply sockets and what it was told. Its Claude
    /// Code configuration directory, from its own environment, is where to look from now on.
    pub fn agent_reported(&mut self, agent: AgentInfo) {
        let env =
            session::AgentEnv { config_dir: agent.claude_config_dir.clone().map(Into::into), home: agent.home.clone().map(Into::into) };
        if let Some(dir) = env.claude_dir().filter(|dir| self.claude_dir.as_ref() != Some(dir)) {
            tracing::info!(pane = %self.pane, dir = %dir.display(), "the agent's Claude Code keeps its sessions here");
            self.claude_dir = Some(dir);
        }
        let same = self
            .session
            .as_ref()
            .is_some_and(|s| s.pid == agent.pid && agent.messaging_socket.as_deref().is_none_or(|m| s.socket == std::path::Path::new(m)));
        self.reported = Some(agent);
        if !same {
            self.forget_session();
        }
    }

    /// The session `relay mcp` reported: its registry entry, else what it said itself.
    fn reported_session(&self) -> Option<Session> {
        let agent = self.reported.as_ref()?;
        if let Some(s) = self.claude_dir.as_deref().and_then(|dir| session::by_pid(dir, agent.pid)) {
            return Some(s);
        }
        let s = Session {
            pid: agent.pid,
            socket: PathBuf::from(agent.messaging_socket.as_ref()?),
            session_id: agent.session_id.clone(),
            proc_start: None,
            status: None,
            cwd: None,
        };
        session::is_alive(&s).then_some(s)
    }

    /// The pane's session, looked up again if the last one went away.
    pub fn session(&mut self) -> Option<&Session> {
        if self.session.as_ref().is_some_and(|s| !session::is_alive(s)) {
            self.forget_session();
        }
        if self.session.is_none() {
            let found = self.reported_session().or_else(|| session::find(self.claude_dir.as_deref()?, &self.pane));
            if let Some(s) = &found {
                tracing::info!(pane = %self.pane, pid = s.pid, socket = %s.socket.display(), "found the pane's Claude Code session");
            }
            self.session = found;
        }
        self.session.as_ref()
    }

    fn forget_session(&mut self) {
        self.session = None;
        self.reply_sockets.clear(); // they live in the old session's socket directory
        self.transcript = None;
        // what that session was told stays notified; reminders take it from there
        self.posted.clear();
    }

    /// Claude Code's own word on whether the pane's session is idle, busy or waiting, read
    /// fresh from its registry; None for other agents.
    pub fn agent_status(&mut self) -> Option<String> {
        let pid = self.session()?.pid;
        session::by_pid(self.claude_dir.as_deref()?, pid)?.status
    }

    /// Where the agent's Claude Code keeps its sessions, as far as known.
    pub fn claude_dir(&self) -> Option<&std::path::Path> {
        self.claude_dir.as_deref()
    }

    /// A session was found (and not seen to go away since).
    pub fn knows_session(&self) -> bool {
        self.session.is_some()
    }

    pub fn has_pending(&self) -> bool {
        !self.posted.is_empty()
    }

    /// Posts `events` into the session's inbox, one notice per conversation; those for
    /// which `is_reminder` holds as reminders.
    pub async fn post(&mut self, events: &[Event], is_reminder: &dyn Fn(&str) -> bool) -> Posting {
        let mut receipts = Vec::new();
        let mut left = Vec::new();
        for n in notice::notices(events, &self.me, is_reminder) {
            let posted = match self.post_notice(&n).await {
                Ok(posted) => posted,
                Err(e) => {
                    tracing::info!(pane = %self.pane, error = %e, "the inbox did not take a notice");
                    // gone (Claude Code restarted, /exit): look for the session again, once
                    if gone(&e) || self.session.as_ref().is_some_and(|s| !session::is_alive(s)) {
                        self.forget_session();
                    }
                    match self.post_notice(&n).await {
                        Ok(posted) => posted,
                        Err(_) if receipts.is_empty() && left.is_empty() && self.session.is_none() => return Posting::NoInbox,
                        Err(_) => {
                            left.extend(events.iter().filter(|e| ReplyTarget::of(e) == n.target).cloned());
                            continue;
                        }
                    }
                }
            };
            receipts.extend(posted);
        }
        Posting::Posted { receipts, left }
    }

    /// The reply socket for `target` (bound now if need be), and the session's inbox.
    fn addresses(&mut self, target: &ReplyTarget) -> io::Result<(PathBuf, PathBuf)> {
        let socket = self.session().map(|s| s.socket.clone()).ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no session"))?;
        if let Some(r) = self.reply_sockets.get(target) {
            return Ok((r.path.clone(), socket));
        }
        let path = inbox::reply_path(&socket, &self.pane, target);
        let listening = inbox::listen(path.clone(), target.clone(), self.heard.clone())?;
        self.reply_sockets.insert(target.clone(), listening);
        Ok((path, socket))
    }

    /// Tells the agent who it is on relay, through the inbox; replies go to the group.
    pub async fn introduce(&mut self, group: &str) -> io::Result<()> {
        let target = ReplyTarget::Group { group: group.to_owned() };
        let (from, socket) = self.addresses(&target)?;
        let n = notice::introduction(&self.me, group, target);
        let msg_id = uuid::Uuid::new_v4().to_string();
        inbox::post(&socket, &inbox::line(&n, &from, &msg_id)).await?;
        self.intro = Some((msg_id, group.to_owned()));
        Ok(())
    }

    async fn post_notice(&mut self, n: &notice::Notice) -> io::Result<Vec<Receipt>> {
        let (from, socket) = self.addresses(&n.target)?;
        let msg_id = uuid::Uuid::new_v4().to_string();
        inbox::post(&socket, &inbox::line(n, &from, &msg_id)).await?;
        self.room -= 1.0;
        let receipts = n.carried.iter().chain(&n.mentioned).map(|m| receipt(m, DeliveryState::Notified, None)).collect();
        self.posted.insert(msg_id, Posted { carried: n.carried.clone(), mentioned: n.mentioned.clone() });
        Ok(receipts)
    }

    /// Looks in the session's transcript for notices that reached the conversation: their
    /// messages are read.
    pub fn check_transcript(&mut self) -> Vec<Receipt> {
        if self.posted.is_empty() {
            return Vec::new();
        }
        let mut receipts = Vec::new();
        // /clear and the like start a new conversation, with its own transcript, in the
        // same process: finish the old transcript, then follow the registry's session id
        let moved = match (self.claude_dir.as_deref(), self.session.as_ref()) {
            (Some(dir), Some(s)) => session::by_pid(dir, s.pid).and_then(|e| e.session_id).filter(|now| s.session_id.as_ref() != Some(now)),
            _ => None,
        };
        if let Some(now) = moved {
            tracing::info!(pane = %self.pane, session = %now, "the Claude Code session moved to a new conversation");
            receipts.extend(self.read_transcript());
            if let Some(s) = self.session.as_mut() {
                s.session_id = Some(now);
            }
            self.transcript = None;
        }
        if self.transcript.is_none() {
            let found = self.claude_dir.clone().zip(self.session.clone()).and_then(|(dir, s)| session::transcript(&dir, &s));
            self.transcript = found.map(|path| (path, 0));
        }
        receipts.extend(self.read_transcript());
        receipts
    }

    /// Reads the transcript's new lines: the notices they show reached the conversation.
    fn read_transcript(&mut self) -> Vec<Receipt> {
        let Some((path, offset)) = &mut self.transcript else { return Vec::new() };
        let Ok(bytes) = read_from(path, *offset) else { return Vec::new() };
        // only whole lines; a line still being written is read next time
        let Some(end) = bytes.iter().rposition(|b| *b == b'\n') else {
            if bytes.len() as u64 >= TRANSCRIPT_CHUNK {
                *offset += bytes.len() as u64; // one huge line: skip it rather than read it forever
            }
            return Vec::new();
        };
        *offset += end as u64 + 1;
        let text = String::from_utf8_lossy(&bytes[..=end]);
        // the conversation's records (a user turn, or an attachment mid-turn) carry the
        // notice's msg_id in their `origin`; queue bookkeeping does not count
        let records: Vec<&str> = text.lines().filter(|l| l.contains("\"origin\"") && !l.contains("\"queue-operation\"")).collect();
        let arrived: Vec<String> =
            self.posted.keys().filter(|id| records.iter().any(|l| l.contains(&format!("\"msg_id\":\"{id}\"")))).cloned().collect();
        let mut receipts = Vec::new();
        for id in arrived {
            if let Some(p) = self.posted.remove(&id) {
                receipts.extend(p.carried.iter().map(|m| receipt(m, DeliveryState::Read, None)));
            }
        }
        receipts
    }

    /// Handles what a reply socket heard: a receipt from Claude Code, or the agent's reply.
    pub fn on_heard(&mut self, heard: Heard) -> Outcome {
        let mut out = Outcome::default();
        let own_uid = relay_local::paths::euid();
        if heard.peer_uid != own_uid {
            tracing::warn!(uid = heard.peer_uid, "ignoring a reply socket writer of another user");
            return out;
        }
        match heard.inbound {
            Inbound::Status { orig_msg_id, status, detail, reason } => {
                if let Some((intro, group)) = &self.intro
                    && orig_msg_id.as_deref() == Some(intro)
                    && !matches!(status.as_str(), "held" | "delivered")
                {
                    tracing::info!(pane = %self.pane, %status, "Claude Code did not let relay's introduction in");
                    // a human who declined it does not get it typed either
                    if status != "denied" {
                        out.intro_refused = Some(group.clone());
                    }
                    self.intro = None;
                    return out;
                }
                let Some(posted) = orig_msg_id.as_deref().and_then(|id| self.posted.get(id)) else { return out };
                let all: Vec<MessageRef> = posted.carried.iter().chain(&posted.mentioned).cloned().collect();
                let carried = posted.carried.clone();
                match status.as_str() {
                    "held" => {
                        out.receipts =
                            all.iter().map(|m| receipt(m, DeliveryState::Held, Some("held for approval in the agent's pane"))).collect();
                        out.note = Some(format!(
                            "⏸ {} held: approve in the agent pane, or set crossSessionInbound to \"accept\" in Claude Code's settings",
                            all.len()
                        ));
                    }
                    "delivered" => {
                        // a held notice was let in
                        out.receipts = carried.iter().map(|m| receipt(m, DeliveryState::Read, None)).collect();
                        out.receipts.extend(posted.mentioned.iter().map(|m| receipt(m, DeliveryState::Notified, None)));
                        self.posted.remove(orig_msg_id.as_deref().unwrap_or_default());
                        out.note = None;
                    }
                    other => {
                        let why = match (other, detail.as_deref()) {
                            ("denied", _) => "declined by the agent's human".to_owned(),
                            ("expired", Some("refused")) => "the Claude Code session refuses cross-session messages".to_owned(),
                            ("expired", _) => "held, and not approved in time".to_owned(),
                            ("dropped", Some(d)) => format!("dropped by Claude Code ({d})"),
                            (s, _) => format!("Claude Code reported {s}"),
                        };
                        tracing::info!(pane = %self.pane, status = other, reason = reason.as_deref().unwrap_or(""), "a notice was not let in");
                        out.receipts = all.iter().map(|m| receipt(m, DeliveryState::Failed, Some(&why))).collect();
                        out.note = Some(format!("✗ {} not delivered: {why}", all.len()));
                        out.refused = all;
                        self.posted.remove(orig_msg_id.as_deref().unwrap_or_default());
                    }
                }
            }
            Inbound::Reply { text, from } => {
                // only the pane's own Claude Code session may speak for it
                let session = self.session.as_ref();
                let from_ok = from.as_deref().and_then(|f| f.strip_prefix("uds:")).map(PathBuf::from) == session.map(|s| s.socket.clone());
                let pid_ok = heard.peer_pid.is_some_and(|pid| session.is_some_and(|s| s.pid as i32 == pid));
                if !(from_ok && pid_ok) {
                    tracing::warn!(pane = %self.pane, ?from, pid = ?heard.peer_pid, "ignoring a reply that is not from the pane's Claude Code session");
                    out.note = Some("ignored a reply from a process that is not this pane's agent".into());
                    return out;
                }
                if !text.trim().is_empty() {
                    out.reply = Some(AgentReply { target: heard.target, text });
                }
            }
        }
        out
    }
}

/// The socket is not there, or nobody listens on it.
fn gone(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused)
}

fn receipt((group, id): &MessageRef, state: DeliveryState, detail: Option<&str>) -> Receipt {
    Receipt { message_id: id.clone(), group: group.clone(), state, detail: detail.map(str::to_owned) }
}

fn read_from(path: &std::path::Path, offset: u64) -> io::Result<Vec<u8>> {
    use std::io::{Read, Seek, SeekFrom};
    let mut file = std::fs::File::open(path)?;
    file.seek(SeekFrom::Start(offset))?;
    let mut out = Vec::new();
    file.take(TRANSCRIPT_CHUNK).read_to_end(&mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;
    use relay_proto::{EventKind, PeerRef};
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    use tokio::net::{UnixListener, UnixStream};

    /// A stand-in Claude Code session of pane %7 run by this very process: its registry
    /// entry, its inbox socket, and the lines the inbox got.
    struct FakeSession {
        dir: tempfile::TempDir,
        socket: PathBuf,
        lines: mpsc::Receiver<String>,
    }

    fn fake_session() -> FakeSession {
        let dir = tempfile::tempdir().unwrap();
        let pid = std::process::id();
        let socks = dir.path().join("cc-socks");
        std::fs::create_dir_all(&socks).unwrap();
        let socket = socks.join(format!("{pid}.sock"));
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let start = session::proc_start(&stat).unwrap().to_owned();
        let entry = serde_json::json!({
            "pid": pid, "sessionId": "sess-1", "cwd": "/w", "procStart": start, "tmux": "main:@1.%7",
            "messagingSocketPath": socket, "status": "idle"
        });
        std::fs::create_dir_all(dir.path().join("sessions")).unwrap();
        std::fs::write(dir.path().join(format!("sessions/{pid}.json")), entry.to_string()).unwrap();
        let listener = UnixListener::bind(&socket).unwrap();
        let (tx, lines) = mpsc::channel(16);
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let mut line = String::new();
                BufReader::new(stream).read_line(&mut line).await.unwrap();
                tx.send(line).await.unwrap();
            }
        });
        FakeSession { dir, socket, lines }
    }

    fn dm(id: &str, text: &str) -> Event {
        Event {
            kind: EventKind::Dm,
            id: id.into(),
            seq: 1,
            group: "team".into(),
            sender: PeerRef { peer_id: "p_alice".into(), name: "alice".into() },
            sender_kind: Default::default(),
            recipient: Some(PeerRef { peer_id: "p_me".into(), name: "me".into() }),
            preview: text.into(),
            time: Utc::now(),
            text: Some(text.into()),
            state: None,
            detail: None,
        }
    }

    /// Writes `line` to a reply socket the way Claude Code does, and waits for it to be taken.
    async fn answer(path: &str, line: serde_json::Value) {
        let mut stream = UnixStream::connect(path.strip_prefix("uds:").unwrap()).await.unwrap();
        stream.write_all(format!("{line}\n").as_bytes()).await.unwrap();
        stream.shutdown().await.unwrap();
        let mut rest = Vec::new();
        stream.read_to_end(&mut rest).await.unwrap();
    }

    fn states(receipts: &[Receipt]) -> Vec<(&str, DeliveryState)> {
        receipts.iter().map(|r| (r.message_id.as_str(), r.state)).collect()
    }

    #[tokio::test]
    async fn posts_into_the_panes_session_and_follows_its_receipts() {
        let mut fake = fake_session();
        let (tx, mut heard) = mpsc::channel(8);
        let mut inbox = Inbox::with_claude_dir("%7", Some(fake.dir.path().to_owned()), tx);
        inbox.set_me("box:me");
        assert_eq!(inbox.session().map(|s| s.socket.clone()), Some(fake.socket.clone()));

        let Posting::Posted { receipts, left } = inbox.post(&[dm("m1", "can you review #42?")], &|_: &str| false).await else {
            panic!("not posted")
        };
        assert!(left.is_empty());
        assert_eq!(states(&receipts), [("m1", DeliveryState::Notified)]);
        let line: serde_json::Value = serde_json::from_str(&fake.lines.recv().await.unwrap()).unwrap();
        let from = line["from"].as_str().unwrap().to_owned();
        let reply_socket = from.strip_prefix("uds:").unwrap();
        assert!(reply_socket.starts_with(fake.socket.parent().unwrap().to_str().unwrap()), "beside the session's socket: {from}");
        let content = line["message"]["content"].as_str().unwrap();
        assert!(content.starts_with(&format!("<cross-session-message from=\"{from}\" from-name=\"alice@team\">\n")), "{content}");
        assert!(content.contains("can you review #42?") && content.ends_with("\n</cross-session-message>"));
        let msg_id = line["msg_id"].as_str().unwrap().to_owned();
        assert!(uuid::Uuid::parse_str(&msg_id).is_ok(), "{msg_id}");

        // Claude Code holds it (bypass-permissions mode), then the human lets it in
        let receipt = |status: &str| serde_json::json!({"type":"control","action":"peer_message_status","status":status,"orig_msg_id":msg_id,"from":format!("uds:{}", fake.socket.display())});
        answer(&from, receipt("held")).await;
        let outcome = inbox.on_heard(heard.recv().await.unwrap());
        assert_eq!(states(&outcome.receipts), [("m1", DeliveryState::Held)]);
        assert!(outcome.note.unwrap().contains("approve in the agent pane"));
        answer(&from, receipt("delivered")).await;
        let outcome = inbox.on_heard(heard.recv().await.unwrap());
        assert_eq!(states(&outcome.receipts), [("m1", DeliveryState::Read)]);
        assert!(!inbox.has_pending());

        // a second notice, denied by the human: failed, and offered to the keystroke fallback
        let Posting::Posted { .. } = inbox.post(&[dm("m2", "and this one?")], &|_: &str| false).await else { panic!("not posted") };
        let line: serde_json::Value = serde_json::from_str(&fake.lines.recv().await.unwrap()).unwrap();
        assert_eq!(line["from"], from.as_str(), "one reply socket per conversation");
        let denied = serde_json::json!({"type":"control","action":"peer_message_status","status":"denied","orig_msg_id":line["msg_id"]});
        answer(&from, denied).await;
        let outcome = inbox.on_heard(heard.recv().await.unwrap());
        assert_eq!(states(&outcome.receipts), [("m2", DeliveryState::Failed)]);
        assert_eq!(outcome.receipts[0].detail.as_deref(), Some("declined by the agent's human"));
        assert_eq!(outcome.refused, [("team".to_owned(), "m2".to_owned())]);
    }

    #[tokio::test]
    async fn the_transcript_says_when_a_notice_reached_the_conversation() {
        let mut fake = fake_session();
        let (tx, _heard) = mpsc::channel(8);
        let mut inbox = Inbox::with_claude_dir("%7", Some(fake.dir.path().to_owned()), tx);
        let Posting::Posted { .. } = inbox.post(&[dm("m1", "hello")], &|_: &str| false).await else { panic!("not posted") };
        let line: serde_json::Value = serde_json::from_str(&fake.lines.recv().await.unwrap()).unwrap();
        let project = fake.dir.path().join("projects/-w");
        std::fs::create_dir_all(&project).unwrap();
        let transcript = project.join("sess-1.jsonl");
        std::fs::write(&transcript, "{\"type\":\"queue-operation\",\"operation\":\"enqueue\"}\n").unwrap();
        assert!(inbox.check_transcript().is_empty());
        let record = serde_json::json!({"type":"user","isMeta":true,"origin":{"kind":"peer","msg_id":line["msg_id"]}});
        let mut file = std::fs::OpenOptions::new().append(true).open(&transcript).unwrap();
        std::io::Write::write_all(&mut file, format!("{record}\n").as_bytes()).unwrap();
        assert_eq!(states(&inbox.check_transcript()), [("m1", DeliveryState::Read)]);
        assert!(!inbox.has_pending() && inbox.check_transcript().is_empty(), "read once");

        // /clear: the same process goes on in a new conversation, with a new transcript;
        // what the old one showed last still counts
        let Posting::Posted { .. } = inbox.post(&[dm("m2", "just before the clear")], &|_: &str| false).await else { panic!("not posted") };
        let line: serde_json::Value = serde_json::from_str(&fake.lines.recv().await.unwrap()).unwrap();
        let record = serde_json::json!({"type":"user","origin":{"kind":"peer","msg_id":line["msg_id"]}});
        std::io::Write::write_all(&mut file, format!("{record}\n").as_bytes()).unwrap();
        let entry_path = fake.dir.path().join(format!("sessions/{}.json", std::process::id()));
        let entry = std::fs::read_to_string(&entry_path).unwrap().replace("sess-1", "sess-2");
        std::fs::write(&entry_path, entry).unwrap();
        let Posting::Posted { .. } = inbox.post(&[dm("m3", "after the clear")], &|_: &str| false).await else { panic!("not posted") };
        let line: serde_json::Value = serde_json::from_str(&fake.lines.recv().await.unwrap()).unwrap();
        let record = serde_json::json!({"type":"user","origin":{"kind":"peer","msg_id":line["msg_id"]}});
        std::fs::write(project.join("sess-2.jsonl"), format!("{record}\n")).unwrap();
        assert_eq!(states(&inbox.check_transcript()), [("m2", DeliveryState::Read), ("m3", DeliveryState::Read)]);
    }

    #[tokio::test]
    async fn replies_are_taken_only_from_the_panes_own_session() {
        let mut fake = fake_session();
        let (tx, mut heard) = mpsc::channel(8);
        let mut inbox = Inbox::with_claude_dir("%7", Some(fake.dir.path().to_owned()), tx);
        let Posting::Posted { .. } = inbox.post(&[dm("m1", "ping")], &|_: &str| false).await else { panic!("not posted") };
        let line: serde_json::Value = serde_json::from_str(&fake.lines.recv().await.unwrap()).unwrap();
        let from = line["from"].as_str().unwrap();
        let own = format!("uds:{}", fake.socket.display());
        let send_message = |sender: &str, text: &str| {
            serde_json::json!({
                "msgV": 1, "type": "user", "priority": "next", "from": sender,
                "message": {"role": "user", "content": format!("<cross-session-message from=\"{sender}\" hop-chain=\"ab\" from-name=\"w-1\" from-mode=\"prompting\">\n{text}\n</cross-session-message>")}
            })
        };
        answer(from, send_message(&own, "pong")).await;
        let outcome = inbox.on_heard(heard.recv().await.unwrap());
        assert_eq!(
            outcome.reply,
            Some(AgentReply {
                target: ReplyTarget::Dm { group: "team".into(), peer_id: "p_alice".into(), name: "alice".into() },
                text: "pong".into()
            })
        );
        // another session's socket is not this pane's agent
        answer(from, send_message("uds:/tmp/cc-socks/1.sock", "spoofed")).await;
        let outcome = inbox.on_heard(heard.recv().await.unwrap());
        assert_eq!(outcome.reply, None);
        assert!(outcome.note.unwrap().contains("ignored a reply"));
    }

    #[tokio::test]
    async fn the_session_relay_mcp_reported_is_used_without_a_registry() {
        let mut fake = fake_session();
        std::fs::remove_dir_all(fake.dir.path().join("sessions")).unwrap();
        let (tx, _heard) = mpsc::channel(8);
        let mut inbox = Inbox::with_claude_dir("%7", Some(fake.dir.path().join("elsewhere")), tx);
        assert!(inbox.session().is_none());
        let socket = fake.socket.display().to_string();
        let agent = AgentInfo { pid: std::process::id(), messaging_socket: Some(socket), session_id: None, ..Default::default() };
        inbox.agent_reported(agent.clone());
        assert!(matches!(inbox.post(&[dm("m1", "hi")], &|_: &str| false).await, Posting::Posted { .. }));
        assert!(fake.lines.recv().await.unwrap().contains("hi"));
        // the same agent reported again (relay mcp restarted): its reply sockets stay
        let reply_socket = inbox.reply_sockets.values().next().unwrap().path.clone();
        inbox.agent_reported(agent);
        assert!(inbox.has_pending() && reply_socket.exists(), "the same session was forgotten");
        // a dead pid reported is not believed
        inbox.agent_reported(AgentInfo {
            pid: 999_999_999,
            messaging_socket: Some("/nope.sock".into()),
            session_id: None,
            ..Default::default()
        });
        assert!(inbox.session().is_none());
    }

    /// The sidebar runs in tmux's environment; Claude Code may run with a CLAUDE_CONFIG_DIR
    /// (or HOME) of its own, which relay mcp reports: the session is found there.
    #[tokio::test]
    async fn the_session_is_found_in_the_config_dir_the_agent_reported() {
        let mut fake = fake_session();
        let (tx, _heard) = mpsc::channel(8);
        let mut inbox = Inbox::with_claude_dir("%7", Some(fake.dir.path().join("tmux-home/.claude")), tx);
        assert!(inbox.session().is_none(), "not in the sidebar's own config dir");
        let config_dir = fake.dir.path().display().to_string();
        inbox.agent_reported(AgentInfo { pid: std::process::id(), claude_config_dir: Some(config_dir), ..Default::default() });
        assert_eq!(inbox.session().map(|s| s.socket.clone()), Some(fake.socket.clone()));
        assert_eq!(inbox.agent_status().as_deref(), Some("idle"), "its registry entry is read from there");
        assert!(matches!(inbox.post(&[dm("m1", "hi")], &|_: &str| false).await, Posting::Posted { .. }));
        assert!(fake.lines.recv().await.unwrap().contains("hi"));
    }

    #[tokio::test]
    async fn no_session_means_no_inbox_and_a_vanished_one_is_noticed() {
        let fake = fake_session();
        let (tx, _heard) = mpsc::channel(8);
        let mut other = Inbox::with_claude_dir("%8", Some(fake.dir.path().to_owned()), tx.clone());
        assert!(matches!(other.post(&[dm("m1", "hi")], &|_: &str| false).await, Posting::NoInbox));
        let mut inbox = Inbox::with_claude_dir("%7", Some(fake.dir.path().to_owned()), tx);
        assert!(inbox.session().is_some());
        // Claude Code exits: registry entry and socket go away
        std::fs::remove_file(&fake.socket).unwrap();
        std::fs::remove_dir_all(fake.dir.path().join("sessions")).unwrap();
        assert!(matches!(inbox.post(&[dm("m1", "hi")], &|_: &str| false).await, Posting::NoInbox));
        assert!(inbox.session().is_none());
    }
}
