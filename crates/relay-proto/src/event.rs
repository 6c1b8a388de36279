//! Payloads pushed on event streams (SSE `data:` lines).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::delivery::DeliveryState;
use crate::model::{MessageKind, PeerKind, PeerRef};

/// Response header of a daemon's event stream: the server's heartbeat interval in
/// milliseconds. A stream silent for much longer than that is dead, whatever TCP says.
pub const HEARTBEAT_HEADER: &str = "relay-heartbeat-ms";

/// What happened. The SSE `event:` field carries the same name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// A broadcast to the group.
    Message,
    /// A direct message between two peers of the group.
    Dm,
    PeerJoined,
    PeerLeft,
    /// A recipient's copy of one of your messages changed state. Not part of the log: it
    /// has no SSE id and is not replayed (`message_status` has the current state).
    Receipt,
    /// Sent by newer servers; older clients skip what they do not know.
    #[serde(other)]
    Unknown,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Message => "message",
            EventKind::Dm => "dm",
            EventKind::PeerJoined => "peer_joined",
            EventKind::PeerLeft => "peer_left",
            EventKind::Receipt => "receipt",
            EventKind::Unknown => "unknown",
        }
    }

    /// The message kind for events that carry a message.
    pub fn message_kind(self) -> Option<MessageKind> {
        match self {
            EventKind::Message => Some(MessageKind::Broadcast),
            EventKind::Dm => Some(MessageKind::Dm),
            _ => None,
        }
    }
}

impl From<MessageKind> for EventKind {
    fn from(kind: MessageKind) -> Self {
        match kind {
            MessageKind::Broadcast => EventKind::Message,
            MessageKind::Dm => EventKind::Dm,
        }
    }
}

/// One entry of a group's log, as streamed. Peer streams carry no message bodies:
/// `preview` is a short single-line excerpt, and the agent reads the whole text through
/// `read_new_messages`. A daemon's stream carries the whole `text`, which relayd hands to
/// the pane that delivers it into the agent.
///
/// For a [`EventKind::Receipt`]: `id` and `seq` are the message's, `sender` is the
/// recipient whose copy moved, `recipient` the message's sender, and `state` where it is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub kind: EventKind,
    /// Server-assigned id of the message or membership change.
    pub id: String,
    /// Position in the group's log; the SSE `id:` field, so `Last-Event-ID` resumes here.
    pub seq: u64,
    pub group: String,
    /// Who sent the message, or who joined or left.
    pub sender: PeerRef,
    /// A human (writing from the console) rather than an agent; omitted for agents.
    #[serde(default, skip_serializing_if = "PeerKind::is_agent")]
    pub sender_kind: PeerKind,
    /// The addressee of a DM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recipient: Option<PeerRef>,
    #[serde(default)]
    pub preview: String,
    pub time: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<DeliveryState>,
    /// Why a receipt says held or failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}
