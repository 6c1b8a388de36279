//! Where a message is, per recipient: the delivery states and the moves between them.
//!
//! stored → delivered → notified → read, with the dead ends held and failed. Every
//! component applies [`DeliveryState::can_move_to`], so a late or repeated report never
//! moves a message backwards or announces the same state twice.

use std::fmt;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::model::PeerRef;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryState {
    /// The server has it.
    Stored,
    /// The recipient's relayd has it.
    Delivered,
    /// It reached the agent: its inbox took it, or the typed line showed on screen.
    Notified,
    /// Waiting for the agent's human to let it in (Claude Code held it).
    Held,
    /// Could not be brought to the agent (refused, expired, or typing kept failing).
    Failed,
    /// In the agent's context: delivered with its content, or returned by read_new_messages.
    Read,
}

impl DeliveryState {
    pub const ALL: [DeliveryState; 6] = [Self::Stored, Self::Delivered, Self::Notified, Self::Held, Self::Failed, Self::Read];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stored => "stored",
            Self::Delivered => "delivered",
            Self::Notified => "notified",
            Self::Held => "held",
            Self::Failed => "failed",
            Self::Read => "read",
        }
    }

    /// The mark people see beside a message.
    pub fn symbol(self) -> &'static str {
        match self {
            Self::Stored => "·",
            Self::Delivered | Self::Notified => "✓",
            Self::Read => "✓✓",
            Self::Held => "⏸",
            Self::Failed => "✗",
        }
    }

    /// Whether the recipient's own side hears of this state too (it ends the wait for a
    /// read, so the recipient's pane knows no reminder is due); the sender hears of all.
    pub fn concerns_recipient(self) -> bool {
        matches!(self, Self::Read | Self::Held | Self::Failed)
    }

    /// Whether a report of `next` moves a message that is in `self`. Read is final; held
    /// and failed can still be overcome (the human approves, a retry or the agent's own
    /// read gets through); nothing moves back towards stored, and no state repeats.
    pub fn can_move_to(self, next: DeliveryState) -> bool {
        use DeliveryState::*;
        match (self, next) {
            (Read, _) | (_, Stored) => false,
            (a, b) if a == b => false,
            (Stored, _) => true,
            (Delivered, _) => true,
            // the inbox took it, then Claude Code held it, or the human refused it
            (Notified, Held | Failed | Read) => true,
            (Held, Notified | Failed | Read) => true,
            (Failed, Notified | Read) => true,
            _ => false,
        }
    }
}

impl fmt::Display for DeliveryState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where each recipient's copy of one message is (`message_status`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageStatus {
    pub message_id: String,
    pub group_id: String,
    pub kind: crate::model::MessageKind,
    pub sent_at: DateTime<Utc>,
    pub recipients: Vec<RecipientStatus>,
}

/// One recipient's copy of a message, as `message_status` reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecipientStatus {
    pub peer: PeerRef,
    pub state: DeliveryState,
    /// Why a message is held or failed, in words ("denied by the human", …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated_at: Option<DateTime<Utc>>,
}

/// A report that one recipient's copy of a message reached a state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipt {
    pub message_id: String,
    pub group: String,
    pub state: DeliveryState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// A daemon's report to the server on one of its peers' copies (`POST /v1/receipts`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerReceipt {
    pub peer_id: String,
    pub message_id: String,
    pub state: DeliveryState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::DeliveryState::{self, *};

    #[test]
    fn the_happy_path_moves_forward_only() {
        let path = [Stored, Delivered, Notified, Read];
        for (i, from) in path.iter().enumerate() {
            for (j, to) in path.iter().enumerate() {
                assert_eq!(from.can_move_to(*to), j > i, "{from} → {to}");
            }
        }
    }

    #[test]
    fn every_transition_is_decided() {
        let allowed: &[(DeliveryState, DeliveryState)] = &[
            (Stored, Delivered),
            (Stored, Notified),
            (Stored, Held),
            (Stored, Failed),
            (Stored, Read),
            (Delivered, Notified),
            (Delivered, Held),
            (Delivered, Failed),
            (Delivered, Read),
            (Notified, Held),
            (Notified, Failed),
            (Notified, Read),
            (Held, Notified),
            (Held, Failed),
            (Held, Read),
            (Failed, Notified),
            (Failed, Read),
        ];
        for from in DeliveryState::ALL {
            for to in DeliveryState::ALL {
                assert_eq!(from.can_move_to(to), allowed.contains(&(from, to)), "{from} → {to}");
            }
        }
    }

    #[test]
    fn held_then_approved_is_read_and_read_is_final() {
        assert!(Notified.can_move_to(Held));
        assert!(Held.can_move_to(Read));
        for next in DeliveryState::ALL {
            assert!(!Read.can_move_to(next));
        }
    }

    #[test]
    fn the_recipient_hears_only_of_what_ends_its_wait() {
        let told: Vec<DeliveryState> = DeliveryState::ALL.into_iter().filter(|s| s.concerns_recipient()).collect();
        assert_eq!(told, [Held, Failed, Read]);
    }

    #[test]
    fn names_round_trip() {
        for s in DeliveryState::ALL {
            let json = serde_json::to_string(&s).unwrap();
            assert_eq!(json, format!("\"{}\"", s.as_str()));
            assert_eq!(serde_json::from_str::<DeliveryState>(&json).unwrap(), s);
        }
    }
}
