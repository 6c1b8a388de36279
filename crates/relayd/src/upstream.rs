//! One event stream per (server, group), however many local panes are in the group:
//! reconnects with exponential backoff and jitter, honours the server's `retry:`, resumes
//! with `Last-Event-ID`, and reopens a stream that stays silent past the server's heartbeat
//! (a proxy or NAT that drops a connection without closing it leaves TCP "open" for hours).

use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use relay_proto::Event;
use relay_proto::event::HEARTBEAT_HEADER;
use relay_proto::local::ConnectionState;
use sse_stream::SseStream;
use tokio::sync::{Notify, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::server_api::{ApiError, Credentials, ServerApi};

const FIRST_RETRY: Duration = Duration::from_millis(500);
/// The heartbeat of a server that does not announce its own: relay-server's default.
const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(15);
/// A stream may miss this many heartbeats in a row before it counts as dead.
const HEARTBEATS_MISSED: u32 = 3;

/// The wait before attempt `attempt` (0-based) after a failure: doubling from `base` up to
/// `max`, then spread over its upper half so that daemons do not reconnect in lockstep.
pub fn backoff(attempt: u32, base: Duration, max: Duration) -> Duration {
    let exp = base.saturating_mul(2u32.saturating_pow(attempt.min(16))).min(max);
    let mut byte = [0u8; 1];
    let _ = getrandom::fill(&mut byte);
    exp.mul_f64(0.5 + byte[0] as f64 / 510.0)
}

/// What a stream reads of the daemon's state when it (re)opens.
pub trait Host: Credentials {
    /// Where the group's stream resumes; `None` before it has a position (then from now).
    fn resume_from(&self, server: &str, group: &str) -> Option<u64>;
}

/// What a stream tells the daemon, which owns the state: sent in order, one stream's at a
/// time as they happen.
#[derive(Debug)]
pub struct Report {
    pub server: String,
    pub group: String,
    pub news: News,
}

#[derive(Debug)]
pub enum News {
    State {
        state: ConnectionState,
        error: Option<String>,
    },
    /// A stream that had connected ended, and why.
    Dropped(String),
    /// The stream reached the server: what waits for it can go.
    Reached,
    Event(Box<Event>),
    /// The server does not know the daemon's credential `refused` (it lost its data):
    /// register again, and say when done.
    Unauthorized {
        refused: String,
        done: oneshot::Sender<Result<(), ApiError>>,
    },
}

/// One stream's standing: where it reads from, and where it reports.
pub struct Upstream {
    pub server: String,
    pub group: String,
    pub api: ServerApi,
    pub host: Arc<dyn Host>,
    pub reports: mpsc::Sender<Report>,
    pub reconnect_max: Duration,
}

impl Upstream {
    async fn tell(&self, news: News) {
        // (the daemon gone means relayd is stopping: nothing left to tell)
        let _ = self.reports.send(Report { server: self.server.clone(), group: self.group.clone(), news }).await;
    }

    async fn state(&self, state: ConnectionState, error: Option<String>) {
        self.tell(News::State { state, error }).await
    }
}

enum Ended {
    /// The server closed a stream that had worked: reconnect promptly.
    Closed,
    /// A stream that had worked broke (or went silent).
    Broke(String),
    /// No stream was opened.
    Failed(String),
}

pub async fn run(stream: Upstream, cancel: CancellationToken, retry_now: Arc<Notify>) {
    let (server, group) = (&stream.server, &stream.group);
    let mut attempt: u32 = 0;
    let mut retry_hint: Option<Duration> = None;
    // whether the last attempt was made at once, on a credential that had just arrived
    let mut retried_at_once = false;
    loop {
        stream.state(ConnectionState::Connecting, None).await;
        let credential = stream.host.daemon_token(server);
        let ended = tokio::select! {
            _ = cancel.cancelled() => return,
            ended = read_stream(&stream, &mut retry_hint, &mut attempt) => ended,
        };
        // A new credential came during the attempt (this stream registered again, or another
        // did meanwhile): try it at once, but not twice in a row, so that a server refusing
        // every credential is not asked for one after another without pause.
        let fresh = stream.host.daemon_token(server) != credential;
        if fresh && !std::mem::replace(&mut retried_at_once, true) {
            tracing::info!(%server, %group, "the daemon has a new credential for this server; reconnecting at once");
            continue;
        }
        retried_at_once = false;
        let error = match ended {
            Ended::Closed => {
                stream.tell(News::Dropped("the server ended the stream".into())).await;
                None
            }
            Ended::Broke(e) => {
                stream.tell(News::Dropped(e.clone())).await;
                Some(e)
            }
            Ended::Failed(e) => Some(e),
        };
        if let Some(e) = &error {
            tracing::info!(%server, %group, error = %e, attempt, "upstream stream failed; will retry");
        }
        stream.state(ConnectionState::Retrying, error).await;
        let delay = backoff(attempt, retry_hint.unwrap_or(FIRST_RETRY), stream.reconnect_max);
        attempt = attempt.saturating_add(1);
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
            // (not after a fresh credential was refused too: two streams of a server that
            // refuses every credential would wake each other without pause)
            _ = retry_now.notified(), if !fresh => {}
        }
    }
}

async fn read_stream(stream: &Upstream, retry_hint: &mut Option<Duration>, attempt: &mut u32) -> Ended {
    let (server, group) = (stream.server.as_str(), stream.group.as_str());
    let Some(token) = stream.host.daemon_token(server) else {
        return Ended::Failed("no credential for this server".into());
    };
    let last = stream.host.resume_from(server, group);
    let response = match stream.api.events(server, &token, group, last, false).await {
        Ok(r) => r,
        Err(e) if e.is_unauthorized() => {
            // the server forgot us (a fresh data dir, or --ephemeral): introduce ourselves again
            let (done, registered) = oneshot::channel();
            stream.tell(News::Unauthorized { refused: token, done }).await;
            match registered.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Ended::Failed(format!("cannot register again: {e}")),
                Err(_) => return Ended::Failed("relayd is stopping".into()),
            }
            // the new credential makes `run` try again at once
            return Ended::Failed("the server did not know this daemon; registered again".into());
        }
        Err(e @ ApiError::Refused { .. }) | Err(e @ ApiError::Unreachable { .. }) => return Ended::Failed(e.to_string()),
    };
    stream.state(ConnectionState::Connected, None).await;
    stream.tell(News::Reached).await;
    *attempt = 0;
    let limit = silence_limit(&response);
    let mut events = std::pin::pin!(SseStream::from_bytes_stream(until_silent(Box::pin(response.bytes_stream()), limit)));
    while let Some(item) = events.next().await {
        let sse = match item {
            Ok(sse) => sse,
            Err(e) => return Ended::Broke(format!("stream broke: {e}")),
        };
        if let Some(ms) = sse.retry {
            *retry_hint = Some(Duration::from_millis(ms));
        }
        let Some(data) = sse.data else { continue };
        match serde_json::from_str::<Event>(&data) {
            Ok(event) => stream.tell(News::Event(Box::new(event))).await,
            Err(e) => tracing::warn!(%server, %group, error = %e, "skipping an event that does not parse"),
        }
    }
    Ended::Closed
}

/// How long the stream may go without a byte: a few of the heartbeats the server says it sends.
fn silence_limit(response: &reqwest::Response) -> Duration {
    let announced = response.headers().get(HEARTBEAT_HEADER).and_then(|v| v.to_str().ok()?.trim().parse::<u64>().ok());
    // (bounded both ways: a server's word is no reason to spin, or to overflow)
    let heartbeat = announced.map_or(DEFAULT_HEARTBEAT, Duration::from_millis).clamp(Duration::from_millis(100), Duration::from_secs(3600));
    heartbeat * HEARTBEATS_MISSED
}

/// The body's chunks, ending with a `TimedOut` error once none has come for `limit`.
fn until_silent<S, D, E>(body: S, limit: Duration) -> impl Stream<Item = std::io::Result<D>>
where
    S: Stream<Item = Result<D, E>> + Unpin,
    E: std::error::Error + Send + Sync + 'static,
{
    futures::stream::unfold(Some(body), move |body| async move {
        let mut body = body?;
        match tokio::time::timeout(limit, body.next()).await {
            Ok(Some(Ok(chunk))) => Some((Ok(chunk), Some(body))),
            Ok(Some(Err(e))) => Some((Err(std::io::Error::other(e)), None)),
            Ok(None) => None,
            Err(_) => {
                let why = format!("no data for {limit:?}, though the server sends a heartbeat every {:?}", limit / HEARTBEATS_MISSED);
                Some((Err(std::io::Error::new(std::io::ErrorKind::TimedOut, why)), None))
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_up_to_the_cap() {
        let (base, max) = (Duration::from_millis(100), Duration::from_secs(5));
        for attempt in 0..20 {
            let d = backoff(attempt, base, max);
            let cap = base.saturating_mul(2u32.pow(attempt.min(16))).min(max);
            assert!(d >= cap / 2 && d <= cap, "attempt {attempt}: {d:?} outside [{:?}, {cap:?}]", cap / 2);
        }
        assert!(backoff(30, base, max) <= max);
    }
}
