//! The local control plane between relayd and its clients (the `relay` CLI, `relay-pane`,
//! `relay mcp`): newline-delimited JSON over a Unix socket.
//!
//! A connection starts with [`Request::Hello`] and [`Reply::Hello`], which carry
//! [`PROTOCOL_VERSION`]. Then each request gets one reply, except
//! [`Request::Subscribe`], after which the daemon streams [`Reply::Event`] and
//! [`Reply::Connection`] frames until the client hangs up. A frame the daemon cannot read
//! gets a [`Reply::Error`] and the connection goes on.

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::delivery::{MessageStatus, Receipt};
use crate::event::Event;
use crate::model::{PeerInfo, Sent};

/// Bumped when a frame both sides know changes so that an older peer would misread it. A new
/// request is not such a change: an older daemon answers it with [`ErrorCode::UnknownRequest`]
/// and the connection goes on.
pub const PROTOCOL_VERSION: u32 = 1;
/// The longest frame either side accepts, newline excluded.
pub const MAX_FRAME_BYTES: usize = 256 * 1024;

/// What clients send.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Request {
    Hello {
        version: u32,
        /// Who is asking, for logs: "relay attach", "relay-pane", …
        client: String,
    },
    /// Register the agent in a tmux pane with a group, through the daemon.
    Attach(AttachRequest),
    /// Leave `group`, or every group the pane is in.
    Detach {
        pane: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        group: Option<String>,
    },
    /// Stream the pane's events on this connection. `since` holds, per group, the last
    /// sequence number the client already has: it gets what came after, once.
    Subscribe {
        pane: String,
        #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
        since: std::collections::BTreeMap<String, u64>,
    },
    Status,
    /// The peer tokens of a pane, for `relay mcp`.
    Credentials {
        pane: String,
    },
    /// What `relay mcp` learns from its environment when the pane's agent starts it: the
    /// agent's process and (Claude Code) its inbox socket. relayd tells the pane's sidebar.
    Agent {
        pane: String,
        agent: AgentInfo,
    },
    /// Where the pane's agent got with messages it was sent (notified, held, read, …);
    /// relayd passes them on to the server for the senders to see.
    Report {
        pane: String,
        receipts: Vec<Receipt>,
    },
    /// How the pane's sidebar delivers into its agent now, for `relay status`; and what
    /// the agent is doing, when its Claude Code session says (idle, busy, waiting), which
    /// relayd carries to the servers for the console.
    Delivery {
        pane: String,
        path: DeliveryPath,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        activity: Option<String>,
    },
    /// Who is in the pane's groups, asked of each server as the pane's peer there.
    Peers {
        pane: String,
    },
    /// Where the copies of a message stand, asked as the pane's peer in `group`: its sender
    /// sees every recipient's, a recipient its own.
    MessageStatus {
        pane: String,
        group: String,
        message_id: String,
    },
    /// A message sent as the pane's peer in a group.
    Send(SendRequest),
    /// The console of a server (the daemon's default when absent), for this user's identity
    /// there: a sign-in link, a pairing code, or every session ended.
    Console {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        server: Option<String>,
        action: ConsoleAction,
    },
    Shutdown,
}

/// What [`Request::Console`] asks for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum ConsoleAction {
    /// A one-time sign-in link, named `name` when the identity is new.
    SignIn {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
    },
    /// Every console session of the identity ends (cookies stop working everywhere).
    SignOutEverywhere,
    /// A one-time code another machine's relayd redeems to act for the same human (named
    /// `name` when new).
    Pair {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
    },
    /// Redeems a code from [`ConsoleAction::Pair`]: this relayd's agents become that human's.
    Join { code: String },
}

/// What [`Request::Send`] sends, and where.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct SendRequest {
    pub pane: String,
    /// The group whose peer sends it.
    pub group: String,
    /// A DM to this peer (id or name); the whole group when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    pub text: String,
    /// The same key again sends nothing new (a retry after a lost answer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
}

/// How a sidebar gets messages to its agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "path", rename_all = "snake_case")]
pub enum DeliveryPath {
    /// Posted into the agent's inbox (Claude Code's messaging socket): no keystrokes.
    Inbox,
    /// Announced by typing into the pane, and why the inbox is not used.
    Keys { why: String },
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct AttachRequest {
    /// A tmux pane id such as `%3`.
    pub pane: String,
    pub group: String,
    /// The relay-server URL; the daemon's configured default when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub join_key: Option<String>,
    /// The pane's working directory.
    pub working_directory: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub git_branch: Option<String>,
}

/// One pane's membership of one group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    pub pane: String,
    pub server: String,
    pub group: String,
    pub peer_id: String,
    pub display_name: String,
    pub working_directory: String,
}

/// The agent process of a pane.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct AgentInfo {
    /// The agent's pid (`relay mcp`'s parent).
    pub pid: u32,
    /// Claude Code's `CLAUDE_CODE_MESSAGING_SOCKET`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub messaging_socket: Option<String>,
    /// Claude Code's `CLAUDE_CODE_SESSION_ID`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_id: Option<String>,
    /// The agent's `CLAUDE_CONFIG_DIR`, where its session registry and transcripts live.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claude_config_dir: Option<String>,
    /// The agent's `HOME` (its `~/.claude` when it has no `CLAUDE_CONFIG_DIR`), which may not
    /// be the sidebar's: the sidebar runs in the tmux server's environment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub home: Option<String>,
}

/// A pane's identity on one server, for `relay mcp`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Credential {
    pub server: String,
    pub group: String,
    pub peer_id: String,
    pub token: String,
}

/// The state of one upstream event stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConnectionState {
    Connecting,
    Connected,
    /// Waiting before the next attempt.
    Retrying,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Upstream {
    pub server: String,
    pub group: String,
    pub state: ConnectionState,
    /// The last event received: where the stream resumes.
    pub last_event_id: u64,
    /// Panes of this group on this machine.
    pub panes: usize,
    /// Why the last attempt failed, while retrying.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// How often a stream that had connected ended and was opened again, since relayd started.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub reopened: u32,
    /// Why it last ended (kept once it is connected again), with the time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_drop: Option<String>,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub version: String,
    pub pid: u32,
    pub socket: String,
    /// The server panes attach to unless they name another.
    #[serde(default)]
    pub server: String,
    pub attachments: Vec<Attachment>,
    pub upstreams: Vec<Upstream>,
    pub subscribers: usize,
    /// Per pane, messages its Claude Code session holds for the human's approval.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub held: std::collections::BTreeMap<String, usize>,
    /// Per pane, how its sidebar delivers into the agent (as the sidebar last said).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub delivery: std::collections::BTreeMap<String, DeliveryPath>,
}

/// What the daemon sends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Reply {
    Hello {
        version: u32,
        /// The daemon's own version.
        daemon: String,
    },
    Attached {
        attachment: Attachment,
        /// The pane was attached to this group already; nothing changed.
        already: bool,
    },
    Detached {
        pane: String,
        groups: Vec<String>,
    },
    Subscribed {
        pane: String,
        attachments: Vec<Attachment>,
    },
    Status {
        status: Status,
    },
    Credentials {
        pane: String,
        credentials: Vec<Credential>,
    },
    /// The agent of a pane, as `relay mcp` reported it (to the pane's subscribers too).
    Agent {
        pane: String,
        agent: AgentInfo,
    },
    /// The receipts are queued for the server (sent in order, retried while it is away).
    Reported {
        pane: String,
        queued: usize,
    },
    /// A pane's delivery path is noted.
    Noted {
        pane: String,
    },
    /// Who is in the pane's groups ([`Request::Peers`]), from every server that answered.
    Peers {
        pane: String,
        peers: Vec<PeerInfo>,
    },
    MessageStatus {
        status: MessageStatus,
    },
    Sent {
        sent: Sent,
    },
    /// What a [`Request::Console`] came to.
    Console {
        server: String,
        /// The human the console shows (their display name).
        human: String,
        /// A sign-in link ([`ConsoleAction::SignIn`]).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        url: Option<String>,
        /// A pairing code ([`ConsoleAction::Pair`]).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        code: Option<String>,
        /// When the link or code stops working.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        expires_at: Option<chrono::DateTime<chrono::Utc>>,
    },
    ShuttingDown,
    /// Something for a subscribed pane: a message, a DM, a peer coming or going.
    Event {
        pane: String,
        event: Event,
    },
    /// An upstream connection of a subscribed pane's group changed state.
    Connection {
        upstream: Upstream,
    },
    Error {
        code: ErrorCode,
        message: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// Not JSON, not UTF-8, or not the shape of any request.
    BadFrame,
    TooLarge,
    UnknownRequest,
    VersionMismatch,
    /// The first frame must be a hello.
    HelloFirst,
    NotAttached,
    /// The relay server refused or could not be reached.
    Server,
    Internal,
    /// Sent by newer daemons; read as this by older clients.
    #[serde(other)]
    Other,
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum FrameError {
    #[error("frame of {len} bytes exceeds the limit of {max}")]
    TooLarge { len: usize, max: usize },
    #[error("frame is not valid UTF-8")]
    InvalidUtf8,
    #[error("unknown request type {0:?}")]
    UnknownType(String),
    #[error("malformed frame: {0}")]
    Malformed(String),
}

impl FrameError {
    pub fn code(&self) -> ErrorCode {
        match self {
            FrameError::TooLarge { .. } => ErrorCode::TooLarge,
            FrameError::UnknownType(_) => ErrorCode::UnknownRequest,
            FrameError::InvalidUtf8 | FrameError::Malformed(_) => ErrorCode::BadFrame,
        }
    }
}

/// One frame as a line, newline included.
pub fn encode<T: Serialize>(frame: &T) -> String {
    let mut line = serde_json::to_string(frame).expect("frames serialize");
    line.push('\n');
    line
}

/// Parses one frame (without its newline).
pub fn decode<T: for<'de> Deserialize<'de>>(line: &[u8]) -> Result<T, FrameError> {
    let text = std::str::from_utf8(line).map_err(|_| FrameError::InvalidUtf8)?;
    serde_json::from_str(text).map_err(|e| {
        let ty =
            serde_json::from_str::<serde_json::Value>(text).ok().and_then(|v| v.get("type").and_then(|t| t.as_str()).map(str::to_owned));
        match ty {
            Some(ty) if e.to_string().starts_with("unknown variant") => FrameError::UnknownType(ty),
            _ => FrameError::Malformed(e.to_string()),
        }
    })
}

/// Splits a byte stream into frames, however it arrives: partial lines wait for the rest,
/// an oversized line is skipped up to its newline and reported once, never buffered whole.
#[derive(Debug)]
pub struct FrameReader {
    buf: Vec<u8>,
    max: usize,
    /// Inside an oversized line: drop bytes up to the next newline.
    skipping: Option<usize>,
}

impl Default for FrameReader {
    fn default() -> Self {
        Self::new(MAX_FRAME_BYTES)
    }
}

impl FrameReader {
    pub fn new(max: usize) -> Self {
        Self { buf: Vec::new(), max, skipping: None }
    }

    /// Takes more bytes; then call [`FrameReader::next_line`] until it returns `None`.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete line (without its newline), or the error for an oversized one.
    pub fn next_line(&mut self) -> Option<Result<Vec<u8>, FrameError>> {
        loop {
            let newline = self.buf.iter().position(|&b| b == b'\n');
            if let Some(skipped) = self.skipping {
                match newline {
                    Some(i) => {
                        let len = skipped + i;
                        self.buf.drain(..=i);
                        self.skipping = None;
                        return Some(Err(FrameError::TooLarge { len, max: self.max }));
                    }
                    None => {
                        self.skipping = Some(skipped + self.buf.len());
                        self.buf.clear();
                        return None;
                    }
                }
            }
            match newline {
                Some(i) if i > self.max => {
                    self.skipping = Some(0);
                    // fall through: the loop reports it at its newline
                    continue;
                }
                Some(i) => {
                    let mut line: Vec<u8> = self.buf.drain(..=i).collect();
                    line.pop();
                    if line.last() == Some(&b'\r') {
                        line.pop();
                    }
                    if line.iter().all(u8::is_ascii_whitespace) {
                        continue; // blank lines are keep-alives
                    }
                    return Some(Ok(line));
                }
                None if self.buf.len() > self.max => {
                    self.skipping = Some(self.buf.len());
                    self.buf.clear();
                    return None;
                }
                None => return None,
            }
        }
    }

    /// Bytes held for an unfinished line (bounded by the maximum frame size).
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }
}
