//! Event streams: one peer's (`GET /notifications/{group_id}/{peer_id}`, the seed's path)
//! and a daemon's group stream (`GET /v1/groups/{group_id}/events`, see `daemon_api`).
//!
//! The SSE `id` is the group's sequence number. A client that reconnects with
//! `Last-Event-ID` first gets what it missed from the store, then live events, with no gap
//! and no repeat. A client that falls `stream_buffer` events behind is disconnected (and
//! can resume); the buffer is shared per group and holds weak references (see `live`), so
//! a stalled client pins no messages.
//!
//! Each live entry's frame is built once and shared by every stream that sends it, and a
//! stream's heartbeat timer is re-armed only when it fires, never per event: a send to a
//! hundred streams costs each of them little more than its write.

// Handlers answer early with a ready HTTP response as their `Err`, as axum handlers do.
#![allow(clippy::result_large_err)]

use std::collections::VecDeque;
use std::convert::Infallible;
use std::fmt::Write as _;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::{Bytes, BytesMut};
use relay_proto::{Event, EventKind, PeerRef, validate};
use tokio::sync::broadcast::{self, error::RecvError, error::TryRecvError};
use tokio::time::{Instant, Sleep};
use tokio_util::sync::WaitForCancellationFutureOwned;

use crate::app_state::AppState;
use crate::error::RelayError;
use crate::live::Live;
use crate::relay::{Audience, Relay};
use crate::secrets;
use crate::store::{LogEntry, LogQuery};

/// Entries read from the store per replay query.
const REPLAY_PAGE: usize = 256;
/// Told to clients in the `retry:` field (2 s), the stream's first frame.
const RETRY: &[u8] = b"retry: 2000\n\n";
/// A comment, sent when a stream has been silent for the heartbeat interval.
const HEARTBEAT: &[u8] = b":heartbeat\n\n";

pub async fn notifications(
    State(state): State<AppState>,
    Path((group_id, peer_id)): Path<(String, String)>,
    Query(params): Query<StreamParams>,
    headers: HeaderMap,
) -> Response {
    let opened = authorize_peer(&state, &group_id, &peer_id, &headers)
        .and_then(|()| open(&state, Audience::Peer(peer_id), &group_id, &headers, &params));
    opened.unwrap_or_else(|rejection| rejection)
}

pub fn reject(status: StatusCode, message: &str) -> Response {
    let mut response = (status, format!("{message}\n")).into_response();
    if status == StatusCode::UNAUTHORIZED {
        response.headers_mut().insert(header::WWW_AUTHENTICATE, "Bearer".parse().expect("valid header"));
    }
    response
}

/// The bearer token of a request, or a 401 saying how to send one.
pub fn bearer_token(headers: &HeaderMap) -> Result<&str, Response> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(secrets::bearer)
        .ok_or_else(|| reject(StatusCode::UNAUTHORIZED, "send the token as Authorization: Bearer <token>"))
}

fn authorize_peer(state: &AppState, group_id: &str, peer_id: &str, headers: &HeaderMap) -> Result<(), Response> {
    let relay = &state.relay;
    if validate::group_id(group_id).is_err() {
        return Err(reject(StatusCode::NOT_FOUND, "no such group"));
    }
    let caller = relay.identify(bearer_token(headers)?).map_err(auth_error)?;
    match relay.owned_peer(&caller, group_id, peer_id).map_err(internal)? {
        Some(_) => Ok(()),
        None => Err(reject(StatusCode::FORBIDDEN, "this token holds no such peer in this group")),
    }
}

pub fn auth_error(e: RelayError) -> Response {
    match e {
        RelayError::UnknownToken => reject(StatusCode::UNAUTHORIZED, "unknown token"),
        other => internal(other),
    }
}

/// Query parameters of the stream endpoints.
#[derive(Debug, Default, serde::Deserialize)]
pub struct StreamParams {
    /// End the stream once it has caught up (replay only, no live events): for clients
    /// filling a gap.
    #[serde(default)]
    pub once: bool,
}

/// The event stream of `group_id` for `audience`, resuming after `Last-Event-ID` if sent.
pub fn open(
    state: &AppState,
    audience: Audience,
    group_id: &str,
    headers: &HeaderMap,
    params: &StreamParams,
) -> Result<Response, Response> {
    let relay = &state.relay;
    let last_event_id = match headers.get("last-event-id").map(|v| v.to_str().map(|s| s.trim().parse::<u64>())) {
        None => None,
        Some(Ok(Ok(seq))) => Some(seq),
        Some(_) => return Err(reject(StatusCode::BAD_REQUEST, "Last-Event-ID must be a sequence number")),
    };
    let last_event_id = match last_event_id {
        Some(id) => Some(relay.resume_point(group_id, id).map_err(internal)?),
        None => None,
    };
    let (rx, head) = relay.subscribe(group_id).map_err(internal)?;
    let after = last_event_id.unwrap_or(head).min(head);
    relay.stream_opened(&audience, group_id);
    let now = Instant::now();
    let stream = GroupStream {
        relay: relay.clone(),
        audience,
        group_id: group_id.to_owned(),
        rx,
        backlog: VecDeque::new(),
        replayed_to: after,
        replay_until: head,
        last_sent: after,
        shutdown: Box::pin(state.shutdown.clone().cancelled_owned()),
        retry_sent: params.once, // a one-off catch-up has no reconnects to pace
        done: false,
        once: params.once,
        heartbeat: state.heartbeat,
        write_interval: state.stream_write_interval,
        // (the first frames go out at once)
        last_write: now.checked_sub(state.stream_write_interval).unwrap_or(now),
        alarm: Box::pin(tokio::time::sleep_until(now + state.heartbeat)),
    };
    let frames = futures::stream::unfold(stream, |mut s| async move {
        let frame = s.next_frame().await?;
        Some((Ok::<_, Infallible>(frame), s))
    });
    let response = Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        // Reverse proxies must pass events through as they come.
        .header("x-accel-buffering", "no")
        // so a client can tell a quiet stream from a dead one
        .header(relay_proto::event::HEARTBEAT_HEADER, state.heartbeat.as_millis().to_string())
        .body(Body::from_stream(frames))
        .expect("valid response");
    Ok(response)
}

pub fn internal(e: RelayError) -> Response {
    tracing::error!(error = %e, "event stream failed to open");
    reject(StatusCode::INTERNAL_SERVER_ERROR, "the relay's storage failed")
}

/// A batch of frames grows to about this many bytes before it is written.
const BATCH_BYTES: usize = 64 * 1024;

/// What one live event comes to for a stream.
enum Step {
    Frame(Bytes),
    /// Nothing for this stream; the next event.
    Next,
    /// Read from the store first (the stream fell behind the memory).
    Replay,
    End,
}

struct GroupStream {
    relay: Arc<Relay>,
    audience: Audience,
    group_id: String,
    rx: broadcast::Receiver<Live>,
    /// Replayed entries not yet sent.
    backlog: VecDeque<LogEntry>,
    /// The store has been read up to here.
    replayed_to: u64,
    /// Replay stops here; later entries come live.
    replay_until: u64,
    last_sent: u64,
    /// Kept from one wait to the next rather than registered anew for every event.
    shutdown: Pin<Box<WaitForCancellationFutureOwned>>,
    retry_sent: bool,
    done: bool,
    /// End after the replay.
    once: bool,
    heartbeat: Duration,
    /// The least time between two writes (see `next_frame`).
    write_interval: Duration,
    /// When the last frame was handed out: the heartbeat counts silence from here.
    last_write: Instant,
    /// Fires at `last_write + heartbeat`, or earlier; checked and re-armed only then.
    alarm: Pin<Box<Sleep>>,
}

impl GroupStream {
    /// The next write: a frame, and with it every further frame already waiting (up to
    /// [`BATCH_BYTES`]), so a busy stream costs one wake-up and one write per batch rather
    /// than per event. A write comes at most once per `write_interval`: on this 2-vCPU
    /// machine a write to a socket costs ~8 µs whatever it carries, so a stream sent
    /// thousands of events a second is served in a few writes rather than thousands, while
    /// an event on a quiet stream still goes out at once.
    async fn next_frame(&mut self) -> Option<Bytes> {
        let first = self.next().await?;
        // a busy stream waits out its interval, gathering what comes meanwhile
        let due = self.last_write + self.write_interval;
        if Instant::now() < due {
            tokio::time::sleep_until(due).await;
        }
        self.last_write = Instant::now();
        let mut batch: Option<BytesMut> = None;
        while batch.as_ref().map_or(first.len(), |b| b.len()) < BATCH_BYTES {
            let Some(frame) = self.next_ready() else { break };
            batch.get_or_insert_with(|| BytesMut::from(&first[..])).extend_from_slice(&frame);
        }
        Some(batch.map_or(first, BytesMut::freeze))
    }

    /// A frame that is ready now (replayed, or live and still in memory), without waiting.
    fn next_ready(&mut self) -> Option<Bytes> {
        loop {
            if self.done {
                return None;
            }
            if let Some(entry) = self.backlog.pop_front() {
                match self.deliver(&entry, None) {
                    Some(frame) => return Some(frame),
                    None => continue,
                }
            }
            if self.once || self.replayed_to < self.replay_until {
                return None;
            }
            let received = match self.rx.try_recv() {
                Ok(live) => Ok(live),
                Err(TryRecvError::Empty) => return None,
                Err(TryRecvError::Lagged(n)) => Err(RecvError::Lagged(n)),
                Err(TryRecvError::Closed) => Err(RecvError::Closed),
            };
            match self.on_live(received) {
                Step::Frame(frame) => return Some(frame),
                Step::Next => continue,
                Step::Replay | Step::End => return None,
            }
        }
    }

    async fn next(&mut self) -> Option<Bytes> {
        if !self.retry_sent {
            self.retry_sent = true;
            return Some(Bytes::from_static(RETRY));
        }
        loop {
            if self.done {
                return None;
            }
            if let Some(entry) = self.backlog.pop_front() {
                if let Some(event) = self.deliver(&entry, None) {
                    return Some(event);
                }
                continue;
            }
            if self.replayed_to < self.replay_until {
                if let Err(e) = self.fill_backlog() {
                    tracing::error!(error = %e, "event replay failed; closing the stream so the client resumes");
                    return None;
                }
                continue;
            }
            if self.once {
                return None;
            }
            tokio::select! {
                () = self.shutdown.as_mut() => return None,
                () = self.alarm.as_mut() => {
                    let (now, due) = (Instant::now(), self.last_write + self.heartbeat);
                    if let Audience::Human(view) = &self.audience && !view.still_valid(&self.relay) {
                        return None; // signed out: a quiet stream ends too
                    }
                    if now >= due {
                        self.alarm.as_mut().reset(now + self.heartbeat);
                        return Some(Bytes::from_static(HEARTBEAT));
                    }
                    self.alarm.as_mut().reset(due);
                    continue;
                }
                received = self.rx.recv() => match self.on_live(received) {
                    Step::Frame(frame) => return Some(frame),
                    Step::Next | Step::Replay => continue,
                    Step::End => return None,
                },
            }
        }
    }

    /// What a live event means for this stream.
    fn on_live(&mut self, received: Result<Live, RecvError>) -> Step {
        match received {
            Ok(Live::Entry(live)) => match live.entry.upgrade() {
                Some(entry) if entry.entry.seq > self.last_sent => match self.deliver(&entry.entry, Some(&entry.frames)) {
                    Some(frame) => Step::Frame(frame),
                    None if self.done => Step::End,
                    None => Step::Next,
                },
                Some(_) => Step::Next,
                None if live.seq <= self.last_sent => Step::Next,
                None => {
                    // no longer in memory (this stream fell behind): from the store, up to
                    // the group's head (one read, not one per entry missed)
                    let head = self.relay.store().head_seq(&self.group_id).unwrap_or(live.seq);
                    (self.replayed_to, self.replay_until) = (self.last_sent, head.max(live.seq));
                    self.relay.metrics.replayed_from_store();
                    Step::Replay
                }
            },
            Ok(Live::Receipt(note)) if note.is_for(&self.audience) => {
                // no SSE id: receipts are not in the log, and do not move Last-Event-ID
                let data = match &self.audience {
                    Audience::Human(_) => crate::console::receipt_fragment(&note.event),
                    _ => serde_json::to_string(&note.event).expect("events serialize"),
                };
                Step::Frame(sse_frame(EventKind::Receipt, None, &data))
            }
            Ok(Live::Receipt(_)) => Step::Next,
            Err(RecvError::Lagged(_)) => {
                tracing::info!(audience = ?self.audience, "event stream fell behind; closing it (the client can resume)");
                self.relay.metrics.stream_dropped_slow();
                self.done = true;
                Step::End
            }
            Err(RecvError::Closed) => {
                self.done = true;
                Step::End
            }
        }
    }

    fn fill_backlog(&mut self) -> Result<(), crate::store::StoreError> {
        let page = self.relay.store().entries(&LogQuery {
            group_id: self.group_id.clone(),
            after_seq: self.replayed_to,
            up_to_seq: Some(self.replay_until),
            limit: REPLAY_PAGE,
            ..Default::default()
        })?;
        self.replayed_to = if page.len() < REPLAY_PAGE { self.replay_until } else { page.last().map_or(self.replay_until, |e| e.seq) };
        self.backlog.extend(page);
        Ok(())
    }

    /// The SSE frame for `entry` if this stream's audience should see it; from `shared`
    /// when another stream made it already.
    fn deliver(&mut self, entry: &LogEntry, shared: Option<&[OnceLock<Bytes>; 2]>) -> Option<Bytes> {
        self.last_sent = self.last_sent.max(entry.seq);
        let visible = match &self.audience {
            Audience::Peer(peer_id) => {
                if entry.kind == EventKind::PeerLeft && entry.sender_id == *peer_id {
                    // the stream's own peer left: tell the client, then end the stream
                    self.done = true;
                    true
                } else {
                    entry.addressed().visible_to(peer_id)
                }
            }
            Audience::Daemon(daemon_id) => match entry.kind {
                EventKind::Message | EventKind::PeerJoined => true,
                EventKind::PeerLeft => {
                    // the daemon's last peer in the group left: the right to the stream went
                    // with it (checked at open only, it would carry the group on forever)
                    let gone = self.daemon_owns(daemon_id, &entry.sender_id)
                        && !self.relay.daemon_in_group(daemon_id, &self.group_id).unwrap_or(false);
                    self.done = gone;
                    true
                }
                // only DMs to the peers this daemon registered: never another machine's
                EventKind::Dm => entry.recipient_id.as_deref().is_some_and(|to| self.daemon_owns(daemon_id, to)),
                EventKind::Receipt | EventKind::Unknown => false,
            },
            Audience::Human(view) => {
                if !view.still_valid(&self.relay) {
                    self.done = true;
                    return None;
                }
                let visible = view.sees(&self.relay, entry);
                if entry.kind == EventKind::PeerLeft && entry.sender_id == view.peer.peer_id {
                    self.done = true; // the human left the group
                }
                return visible.then(|| sse_frame(entry.kind, Some(entry.seq), &crate::console::entry_fragment(entry, &view.peer.peer_id)));
            }
        };
        let with_text = self.audience.is_daemon();
        visible.then(|| match shared {
            Some(frames) => frames[usize::from(with_text)].get_or_init(|| entry_frame(entry, with_text)).clone(),
            None => entry_frame(entry, with_text),
        })
    }

    fn daemon_owns(&self, daemon_id: &str, peer_id: &str) -> bool {
        match self.relay.registered_by(daemon_id, peer_id) {
            Ok(peer) => peer.is_some(),
            Err(e) => {
                tracing::error!(error = %e, "cannot look up a DM's recipient; withholding it");
                false
            }
        }
    }
}

impl Drop for GroupStream {
    fn drop(&mut self) {
        self.relay.stream_closed(&self.audience, &self.group_id);
    }
}

/// The event for a log entry; with the message's whole text for a daemon, which delivers it.
pub fn event_payload(entry: &LogEntry, with_text: bool) -> Event {
    let preview = match entry.kind {
        EventKind::PeerJoined => format!("{} joined {}", entry.sender_name, entry.group_id),
        EventKind::PeerLeft => format!("{} left {}", entry.sender_name, entry.group_id),
        _ => validate::preview(&entry.body),
    };
    Event {
        kind: entry.kind,
        id: entry.id.clone(),
        seq: entry.seq,
        group: entry.group_id.clone(),
        sender: PeerRef { peer_id: entry.sender_id.clone(), name: entry.sender_name.clone() },
        sender_kind: entry.sender_kind,
        recipient: entry
            .recipient_id
            .as_ref()
            .map(|id| PeerRef { peer_id: id.clone(), name: entry.recipient_name.clone().unwrap_or_default() }),
        preview,
        time: entry.created_at,
        text: (with_text && entry.kind.message_kind().is_some()).then(|| entry.body.clone()),
        state: None,
        detail: None,
    }
}

fn entry_frame(entry: &LogEntry, with_text: bool) -> Bytes {
    let json = serde_json::to_string(&event_payload(entry, with_text)).expect("events serialize");
    sse_frame(entry.kind, Some(entry.seq), &json)
}

/// One SSE event: its name, its id when it has one, and its data, a `data:` line per line.
fn sse_frame(kind: EventKind, id: Option<u64>, data: &str) -> Bytes {
    let mut frame = String::with_capacity(data.len() + 48);
    let _ = writeln!(frame, "event: {}", kind.as_str());
    if let Some(id) = id {
        let _ = writeln!(frame, "id: {id}");
    }
    for line in data.split('\n') {
        let _ = writeln!(frame, "data: {line}");
    }
    frame.push('\n');
    Bytes::from(frame)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_frame_names_its_event_carries_its_id_and_splits_data_lines() {
        assert_eq!(&sse_frame(EventKind::Message, Some(7), r#"{"a":1}"#)[..], b"event: message\nid: 7\ndata: {\"a\":1}\n\n");
        assert_eq!(&sse_frame(EventKind::Receipt, None, "one\ntwo")[..], b"event: receipt\ndata: one\ndata: two\n\n");
    }
}
