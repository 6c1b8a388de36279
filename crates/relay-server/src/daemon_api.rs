//! REST for daemons (relayd): one credential per daemon, peers registered through it, and
//! one event stream per group carrying the group's broadcasts plus the DMs addressed to
//! the daemon's own peers — never another machine's.
//!
//! - `POST /v1/daemons` `{"hostname"}` → `{"daemon_id", "token"}`
//! - `POST /v1/peers` (daemon token) `{group_id, hostname, working_directory, git_branch?, name?, join_key?}`
//!   → the registration, as the `register` tool returns it, and `events_after`: the group's
//!   last sequence number before it (a stream resumed from there misses nothing sent to the
//!   new peer)
//! - `DELETE /v1/peers/{peer_id}` (daemon token) → the peer leaves its group
//! - `GET /v1/groups/{group_id}/events` (daemon token) → SSE, resumable with `Last-Event-ID`;
//!   `?once=true` ends it after the replay (to fill a gap)
//! - `GET /v1/peers/{peer_id}/peers` (daemon token) → `{"peers"}`: `list_peers` as that peer
//! - `GET /v1/peers/{peer_id}/messages/{message_id}` (daemon token) → `message_status` as that peer
//! - `POST /v1/peers/{peer_id}/messages` (daemon token) `{message, to?, idempotency_key?}` →
//!   what `send_message` (no `to`) or `send_dm` returns, sent as that peer
//! - `POST /v1/receipts` (daemon token) `{"receipts": [{peer_id, message_id, state, detail?}]}`
//!   → `{"moved", "unchanged", "rejected": [{message_id, error}]}`: where the daemon's peers
//!   got with messages sent to them
//! - `POST /v1/peers/{peer_id}/activity` (daemon token) `{activity}`: idle, busy or waiting
//! - `POST /v1/console/sign-in`, `/v1/console/sign-out-everywhere`, `/v1/console/pairings`,
//!   `/v1/console/join` (daemon token): the console for the daemon's human (see below)

// Handlers answer early with a ready HTTP response as their `Err`, as axum handlers do.
#![allow(clippy::result_large_err)]

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use relay_proto::PeerReceipt;
use serde::Deserialize;
use serde_json::json;

use crate::app_state::AppState;
use crate::error::RelayError;
use crate::front::ClientAddr;
use crate::relay::{Audience, Caller, RegisterRequest};
use crate::sse::{self, StreamParams, bearer_token};
use crate::store::PeerRecord;

#[derive(Deserialize)]
pub struct NewDaemon {
    hostname: String,
}

/// A JSON error body with the status that fits the error.
fn error(e: RelayError) -> Response {
    let status = match &e {
        RelayError::Invalid(_) | RelayError::BadArgument { .. } => StatusCode::BAD_REQUEST,
        RelayError::UnknownToken | RelayError::NotRegistered => StatusCode::UNAUTHORIZED,
        RelayError::JoinKeyRequired(_) | RelayError::WrongJoinKey(_) | RelayError::JoinKeyNeededToCreate => StatusCode::FORBIDDEN,
        RelayError::NotMember { .. } => StatusCode::FORBIDDEN,
        RelayError::PeerTaken { .. } => StatusCode::CONFLICT,
        RelayError::UnknownPeer { .. } | RelayError::AmbiguousPeer { .. } | RelayError::WhichGroup { .. } => StatusCode::NOT_FOUND,
        RelayError::DmToSelf => StatusCode::BAD_REQUEST,
        RelayError::UnknownMessage(_) => StatusCode::NOT_FOUND,
        RelayError::RateLimited { .. } | RelayError::TooManyRegistrations { .. } | RelayError::TooManyWrongKeys { .. } => {
            StatusCode::TOO_MANY_REQUESTS
        }
        RelayError::Storage(_) => {
            tracing::error!(error = %e, "daemon API call failed");
            StatusCode::INTERNAL_SERVER_ERROR
        }
    };
    (status, Json(json!({"error": e.to_string()}))).into_response()
}

fn daemon(state: &AppState, headers: &HeaderMap) -> Result<String, Response> {
    state.relay.identify_daemon(bearer_token(headers)?).map_err(error)
}

pub async fn create_daemon(State(state): State<AppState>, Json(body): Json<NewDaemon>) -> Response {
    match state.relay.create_daemon(&body.hostname) {
        Ok((daemon_id, token)) => (StatusCode::CREATED, Json(json!({"daemon_id": daemon_id, "token": token}))).into_response(),
        Err(e) => error(e),
    }
}

pub async fn register_peer(
    State(state): State<AppState>,
    client: Option<Extension<ClientAddr>>,
    headers: HeaderMap,
    Json(mut req): Json<RegisterRequest>,
) -> Response {
    let daemon_id = match daemon(&state, &headers) {
        Ok(d) => d,
        Err(rejection) => return rejection,
    };
    req.daemon_id = Some(daemon_id);
    req.source = client.map(|Extension(c)| c.0);
    let relay = state.relay.clone();
    // Each pane is its own agent: a fresh token, never the daemon's. With it goes where the
    // group's log stood just before: a daemon that resumes its stream from there misses
    // nothing sent to the new peer, however late its stream opens.
    let outcome = tokio::task::spawn_blocking(move || {
        let events_after = relay.store().head_seq(&req.group_id)?;
        relay.register(None, req).map(|(registration, _)| (registration, events_after))
    })
    .await
    .expect("register does not panic");
    match outcome {
        Ok((registration, events_after)) => {
            let mut reply = serde_json::to_value(registration).expect("a registration serializes");
            reply["events_after"] = events_after.into();
            (StatusCode::OK, Json(reply)).into_response()
        }
        Err(e) => error(e),
    }
}

pub async fn remove_peer(State(state): State<AppState>, headers: HeaderMap, Path(peer_id): Path<String>) -> Response {
    let daemon_id = match daemon(&state, &headers) {
        Ok(d) => d,
        Err(rejection) => return rejection,
    };
    match state.relay.daemon_leave(&daemon_id, &peer_id) {
        Ok(Some(left)) => Json(left).into_response(),
        Ok(None) => no_such_peer(),
        Err(e) => error(e),
    }
}

pub async fn group_events(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(group_id): Path<String>,
    Query(params): Query<StreamParams>,
) -> Response {
    let daemon_id = match daemon(&state, &headers) {
        Ok(d) => d,
        Err(rejection) => return rejection,
    };
    match state.relay.daemon_in_group(&daemon_id, &group_id) {
        Ok(true) => {}
        Ok(false) => return sse::reject(StatusCode::FORBIDDEN, "this daemon has no peer in this group"),
        Err(e) => return error(e),
    }
    sse::open(&state, Audience::Daemon(daemon_id), &group_id, &headers, &params).unwrap_or_else(|rejection| rejection)
}

/// One of this daemon's own peers (still in its group), and a caller acting as it.
fn own_peer(state: &AppState, headers: &HeaderMap, peer_id: &str) -> Result<(PeerRecord, Caller), Response> {
    let daemon_id = daemon(state, headers)?;
    match state.relay.daemon_peer(&daemon_id, peer_id) {
        Ok(Some(found)) => Ok(found),
        Ok(None) => Err(no_such_peer()),
        Err(e) => Err(error(e)),
    }
}

fn no_such_peer() -> Response {
    (StatusCode::NOT_FOUND, Json(json!({"error": "this daemon registered no such peer"}))).into_response()
}

fn reply<T: serde::Serialize>(outcome: Result<T, RelayError>) -> Response {
    match outcome {
        Ok(value) => Json(value).into_response(),
        Err(e) => error(e),
    }
}

/// `list_peers` as the peer: its own group's members.
pub async fn peer_list_peers(State(state): State<AppState>, headers: HeaderMap, Path(peer_id): Path<String>) -> Response {
    match own_peer(&state, &headers, &peer_id) {
        Ok((peer, caller)) => reply(state.relay.list_peers(&caller, Some(&peer.group_id)).map(|peers| json!({"peers": peers}))),
        Err(rejection) => rejection,
    }
}

pub async fn peer_message_status(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path((peer_id, message_id)): Path<(String, String)>,
) -> Response {
    match own_peer(&state, &headers, &peer_id) {
        Ok((_, caller)) => reply(state.relay.message_status(&caller, &message_id)),
        Err(rejection) => rejection,
    }
}

#[derive(Deserialize)]
pub struct PeerSend {
    message: String,
    /// A peer's id or name: a DM. None: a broadcast to the peer's group.
    #[serde(default)]
    to: Option<String>,
    #[serde(default)]
    idempotency_key: Option<String>,
}

/// A send as the peer, within its own group only.
pub async fn peer_send(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(peer_id): Path<String>,
    Json(body): Json<PeerSend>,
) -> Response {
    let (peer, caller) = match own_peer(&state, &headers, &peer_id) {
        Ok(found) => found,
        Err(rejection) => return rejection,
    };
    let (group, key) = (Some(peer.group_id.as_str()), body.idempotency_key.as_deref().filter(|k| !k.is_empty()));
    reply(match body.to.as_deref() {
        Some(to) => state.relay.send_dm(&caller, group, to, &body.message, key),
        None => state.relay.send_message(&caller, &body.message, group, key),
    })
}

#[derive(Deserialize)]
pub struct Receipts {
    receipts: Vec<PeerReceipt>,
}

pub async fn report_receipts(State(state): State<AppState>, headers: HeaderMap, Json(body): Json<Receipts>) -> Response {
    let daemon_id = match daemon(&state, &headers) {
        Ok(d) => d,
        Err(rejection) => return rejection,
    };
    let relay = state.relay.clone();
    let outcome = tokio::task::spawn_blocking(move || relay.daemon_receipts(&daemon_id, &body.receipts)).await;
    reply(outcome.expect("receipts do not panic"))
}

#[derive(Deserialize, Default)]
pub struct ConsoleRequest {
    /// The human's name, when the daemon has no human yet.
    #[serde(default)]
    name: Option<String>,
    /// A pairing code ([`console_join`]).
    #[serde(default)]
    code: Option<String>,
}

/// The daemon's human, answered from a blocking console call.
async fn console_call(
    state: &AppState,
    headers: &HeaderMap,
    status: StatusCode,
    work: impl FnOnce(&crate::Relay, &str) -> Result<serde_json::Value, RelayError> + Send + 'static,
) -> Response {
    let daemon_id = match daemon(state, headers) {
        Ok(d) => d,
        Err(rejection) => return rejection,
    };
    let relay = state.relay.clone();
    match tokio::task::spawn_blocking(move || work(&relay, &daemon_id)).await.expect("console calls do not panic") {
        Ok(body) => (status, Json(body)).into_response(),
        Err(e) => error(e),
    }
}

#[derive(Deserialize)]
pub struct ActivityBody {
    activity: String,
}

/// `POST /v1/peers/{peer_id}/activity` `{activity}`: what the daemon's peer's agent is doing
/// (idle, busy, waiting), for the console.
pub async fn peer_activity(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(peer_id): Path<String>,
    Json(body): Json<ActivityBody>,
) -> Response {
    match own_peer(&state, &headers, &peer_id) {
        Ok((peer, _)) => reply(state.relay.set_activity(&peer, &body.activity).map(|()| json!({}))),
        Err(rejection) => rejection,
    }
}

/// `POST /v1/console/sign-in` `{name?}` → `{human, path, expires_at}`: a one-time sign-in
/// link (the server's URL + `path`) for the daemon's human, made when new.
pub async fn console_sign_in(State(state): State<AppState>, headers: HeaderMap, body: Option<Json<ConsoleRequest>>) -> Response {
    let Json(body) = body.unwrap_or_default();
    console_call(&state, &headers, StatusCode::CREATED, move |relay, daemon_id| {
        let (human, secret, expires_at) = relay.console_sign_in_link(daemon_id, body.name.as_deref())?;
        Ok(json!({"human": human.name, "path": format!("/console/sign-in/{secret}"), "expires_at": expires_at}))
    })
    .await
}

/// `POST /v1/console/sign-out-everywhere` → `{human}`: every console session of the
/// daemon's human ends.
pub async fn console_sign_out_everywhere(State(state): State<AppState>, headers: HeaderMap) -> Response {
    console_call(&state, &headers, StatusCode::OK, |relay, daemon_id| {
        let human = relay.console_sign_out_everywhere(daemon_id)?;
        Ok(json!({"human": human.map(|h| h.name)}))
    })
    .await
}

/// `POST /v1/console/pairings` `{name?}` → `{human, code, expires_at}`: a one-time code
/// another daemon redeems to act for the same human.
pub async fn console_pairing(State(state): State<AppState>, headers: HeaderMap, body: Option<Json<ConsoleRequest>>) -> Response {
    let Json(body) = body.unwrap_or_default();
    console_call(&state, &headers, StatusCode::CREATED, move |relay, daemon_id| {
        let (human, code, expires_at) = relay.console_pairing(daemon_id, body.name.as_deref())?;
        Ok(json!({"human": human.name, "code": code, "expires_at": expires_at}))
    })
    .await
}

/// `POST /v1/console/join` `{code}` → `{human}`: the daemon now acts for the code's human.
pub async fn console_join(State(state): State<AppState>, headers: HeaderMap, Json(body): Json<ConsoleRequest>) -> Response {
    console_call(&state, &headers, StatusCode::OK, move |relay, daemon_id| {
        let human = relay.console_join(daemon_id, body.code.as_deref().unwrap_or_default())?;
        Ok(json!({"human": human.name}))
    })
    .await
}
