//! Wire types shared by every relay component.
//!
//! - [`model`]: peers and messages as the server stores and returns them.
//! - [`event`]: the payloads pushed on SSE streams.
//! - [`delivery`]: where a message is, per recipient, and the moves between states.
//! - [`validate`]: the rules for names, sizes and ids, so every component rejects the same
//!   input with the same words.
//! - [`local`]: the frames between relayd and its local clients.
//! - [`tools`]: the MCP tools' definitions, as the server lists them.

pub mod delivery;
pub mod event;
pub mod local;
pub mod model;
pub mod tools;
pub mod validate;

pub use delivery::{Addressed, DeliveryState, MessageStatus, PeerReceipt, Receipt, RecipientStatus};
pub use event::{Event, EventKind};
pub use model::{MessageKind, PeerInfo, PeerKind, PeerRef, Sent, StoredMessage};
pub use validate::ValidationError;
