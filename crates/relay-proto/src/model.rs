//! Peers and messages as tools return them.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::delivery::RecipientStatus;

/// Whether a message went to the whole group or to one peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MessageKind {
    Broadcast,
    Dm,
}

impl MessageKind {
    pub fn as_str(self) -> &'static str {
        match self {
            MessageKind::Broadcast => "broadcast",
            MessageKind::Dm => "dm",
        }
    }
}

/// One message as `read_new_messages` and `get_history` return it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredMessage {
    /// Server-assigned, globally unique.
    pub id: String,
    /// Position in the group's log; also the SSE event id.
    pub seq: u64,
    pub group_id: String,
    pub kind: MessageKind,
    pub sender: PeerRef,
    /// Set for DMs only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recipient: Option<PeerRef>,
    pub text: String,
    pub sent_at: DateTime<Utc>,
    /// For one's own messages in `get_history`: where each recipient's copy is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivery: Option<Vec<RecipientStatus>>,
}

/// What a send returns (`send_message`, `send_dm`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sent {
    pub message_id: String,
    pub seq: u64,
    pub group_id: String,
    pub kind: MessageKind,
    pub from: PeerRef,
    /// The addressee of a DM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<PeerRef>,
    /// Peers of the group (other than the sender) who will see it.
    pub recipients: usize,
    pub sent_at: DateTime<Utc>,
    /// This send repeated an earlier one with the same `idempotency_key`: nothing new was
    /// sent, and this is the earlier message.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub repeated: bool,
}

/// A peer named by id and display name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PeerRef {
    pub peer_id: String,
    pub name: String,
}

/// Who a peer is: an agent (the default), or a human, signed in to the console.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PeerKind {
    #[default]
    Agent,
    Human,
    /// Sent by newer servers; older clients read a kind they do not know as this.
    #[serde(other)]
    Unknown,
}

impl PeerKind {
    pub fn as_str(self) -> &'static str {
        match self {
            PeerKind::Agent => "agent",
            PeerKind::Human => "human",
            PeerKind::Unknown => "unknown",
        }
    }

    pub fn is_agent(&self) -> bool {
        *self == PeerKind::Agent
    }
}

/// One peer as `list_peers` returns it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerInfo {
    pub peer_id: String,
    pub display_name: String,
    /// An agent, or a human watching the group in the console. (Older servers do not say.)
    #[serde(default)]
    pub kind: PeerKind,
    pub group_id: String,
    pub hostname: String,
    pub working_directory: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub git_branch: Option<String>,
    /// True while the peer has an open event stream.
    pub online: bool,
    pub last_seen: DateTime<Utc>,
    pub joined_at: DateTime<Utc>,
}
