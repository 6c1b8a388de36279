//! Where a message is, per recipient: the delivery states and the moves between them.
//!
//! stored → delivered → notified → read, with the dead ends held and failed. Every
//! component applies [`DeliveryState::can_move_to`], so a late or repeated report never
//! moves a message backwards or announces the same state twice.

use std::fmt;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::event::{Event, EventKind};
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

/// An event as far as who hears of it: its kind, the peer it is from (for a receipt, the
/// recipient whose copy moved), the peer it is addressed to (a DM's addressee; a receipt's
/// message sender) and, for receipts, the state reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Addressed<'a> {
    pub kind: EventKind,
    pub sender: &'a str,
    pub recipient: Option<&'a str>,
    pub state: Option<DeliveryState>,
}

impl<'a> Addressed<'a> {
    pub fn of(event: &'a Event) -> Self {
        Self {
            kind: event.kind,
            sender: &event.sender.peer_id,
            recipient: event.recipient.as_ref().map(|r| r.peer_id.as_str()),
            state: event.state,
        }
    }

    /// Whether the peer `peer_id` hears of it: the one rule behind the server's peer
    /// streams and inboxes, its receipts, and relayd's fan-out to panes.
    ///
    /// - a broadcast, a join or a leave: every member but the peer it is about (a stream
    ///   told of its own peer's leave is an ending, not an event: see the server's streams);
    /// - a DM: its addressee only;
    /// - a receipt: the message's sender, and the recipient whose copy it is once its wait
    ///   is over (read, held, failed), so it knows no reminder is due;
    /// - a kind this build does not know: no one.
    pub fn visible_to(&self, peer_id: &str) -> bool {
        match self.kind {
            EventKind::Message | EventKind::PeerJoined | EventKind::PeerLeft => self.sender != peer_id,
            EventKind::Dm => self.recipient == Some(peer_id),
            EventKind::Receipt => {
                let own_copy = self.sender == peer_id && self.state.is_some_and(DeliveryState::concerns_recipient);
                own_copy || self.recipient == Some(peer_id)
            }
            EventKind::Unknown => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Addressed;
    use super::DeliveryState::{self, *};
    use crate::event::EventKind;

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

    #[test]
    fn who_hears_of_each_event() {
        use crate::event::EventKind::*;
        // (kind, recipient, state) of an event from B → heard by A, B, C
        type Case = (EventKind, Option<&'static str>, Option<DeliveryState>, [bool; 3]);
        let cases: &[Case] = &[
            (Message, None, None, [true, false, true]),
            (PeerJoined, None, None, [true, false, true]),
            (PeerLeft, None, None, [true, false, true]),
            (Dm, Some("c"), None, [false, false, true]),
            (Dm, Some("b"), None, [false, true, false]), // (refused when sent; the addressee still rules)
            (Unknown, None, None, [false, false, false]),
            (Unknown, Some("a"), None, [false, false, false]),
            // b's copy of c's message moved: c hears every move, b only the end of its wait
            (Receipt, Some("c"), Some(Delivered), [false, false, true]),
            (Receipt, Some("c"), Some(Notified), [false, false, true]),
            (Receipt, Some("c"), Some(Read), [false, true, true]),
            (Receipt, Some("c"), Some(Held), [false, true, true]),
            (Receipt, Some("c"), Some(Failed), [false, true, true]),
            (Receipt, Some("c"), None, [false, false, true]),
        ];
        for &(kind, recipient, state, heard) in cases {
            let event = Addressed { kind, sender: "b", recipient, state };
            let got = ["a", "b", "c"].map(|p| event.visible_to(p));
            assert_eq!(got, heard, "{event:?}");
        }
        // every kind is in the table
        for kind in [Message, Dm, PeerJoined, PeerLeft, Receipt, Unknown] {
            assert!(cases.iter().any(|c| c.0 == kind), "{kind:?}");
        }
    }
}
