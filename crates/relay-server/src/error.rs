//! What can go wrong in a relay call, worded for the agent that made it.

use relay_proto::ValidationError;
use thiserror::Error;

use crate::store::StoreError;

#[derive(Debug, Error)]
pub enum RelayError {
    #[error("invalid input: {0}")]
    Invalid(#[from] ValidationError),
    #[error(
        "not registered with the relay. Call the relay's `register` tool first (group_id, hostname, \
         working_directory). If you already registered and your MCP client keeps no session, pass \
         the `token` that `register` returned as the `token` argument of every relay tool call."
    )]
    NotRegistered,
    #[error(
        "the relay token is not recognised (it may belong to another relay server, or be mistyped). \
         Call `register` again to get a new one."
    )]
    UnknownToken,
    #[error("you are not a member of group {group:?}; your groups: {}", list(.yours))]
    NotMember { group: String, yours: Vec<String> },
    #[error("you are in several groups ({}); say which one with group_id", list(.yours))]
    WhichGroup { yours: Vec<String> },
    #[error("group {0:?} is protected by a join key; pass join_key to register")]
    JoinKeyRequired(String),
    #[error("wrong join key for group {0:?}")]
    WrongJoinKey(String),
    #[error("this relay requires a join key to create a group; pass join_key (at least 8 characters) to register")]
    JoinKeyNeededToCreate,
    #[error(
        "{name:?} (this host and directory) is already a peer of group {group:?}, registered by another agent. \
         To be that peer again, call register with the token it was given; to join as a new peer, pass another `name`."
    )]
    PeerTaken { group: String, name: String },
    #[error("no peer {to:?} in your groups. Peers you can reach: {}", list(.candidates))]
    UnknownPeer { to: String, candidates: Vec<String> },
    #[error("{to:?} matches several peers; use one of these peer ids instead: {}", list(.matches))]
    AmbiguousPeer { to: String, matches: Vec<String> },
    #[error("you cannot send a DM to yourself")]
    DmToSelf,
    #[error("rate limit: at most {burst} messages at once and {per_second} per second after that; retry in {retry_after_ms} ms")]
    RateLimited { per_second: f64, burst: u32, retry_after_ms: u64 },
    #[error(
        "too many new peers from your address: at most {per_minute} per minute; retry in {retry_after_ms} ms, \
         or register again with the token you were given (that is not a new peer)"
    )]
    TooManyRegistrations { per_minute: u32, retry_after_ms: u64 },
    #[error("too many wrong join keys for group {group:?} lately; retry in {retry_after_ms} ms")]
    TooManyWrongKeys { group: String, retry_after_ms: u64 },
    #[error("no message {0:?} among the messages you sent; pass the message_id that send_message or send_dm returned")]
    UnknownMessage(String),
    #[error("invalid {field}: {reason}")]
    BadArgument { field: &'static str, reason: String },
    #[error("the relay's storage failed: {0}")]
    Storage(#[from] StoreError),
}

fn list(items: &[String]) -> String {
    if items.is_empty() { "(none)".to_owned() } else { items.join(", ") }
}
