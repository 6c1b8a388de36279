//! relay-server's daemon API, as relayd calls it.

use std::time::Duration;

use serde::Deserialize;
use serde_json::{Value, json};
use thiserror::Error;

use relay_proto::local::{ConsoleAction, SendRequest};
use relay_proto::{MessageStatus, PeerInfo, PeerReceipt, Sent};

/// The longest a request/response call (not an event stream) may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Error)]
pub enum ApiError {
    #[error("cannot reach {server}: {source}")]
    Unreachable { server: String, source: reqwest::Error },
    /// The server answered with an error; `message` is its own words.
    #[error("{server} refused: {message} (HTTP {status})")]
    Refused { server: String, status: u16, message: String },
}

impl ApiError {
    /// The server no longer knows our credential (a fresh or ephemeral server).
    pub fn is_unauthorized(&self) -> bool {
        matches!(self, ApiError::Refused { status: 401, .. })
    }

    /// The server refused this request for what it asked (a join key wanted, a name taken,
    /// a field invalid): asking again the same way gets the same answer.
    pub fn is_refusal_of_the_request(&self) -> bool {
        matches!(self, ApiError::Refused { status, .. } if (400..500).contains(status) && ![401, 408, 429].contains(status))
    }
}

/// What the server answers a console request with.
#[derive(Debug, Clone, Deserialize)]
pub struct ConsoleAnswer {
    /// The human's name (none when signing out a daemon that never had one).
    #[serde(default)]
    pub human: Option<String>,
    /// A sign-in link's path on the server.
    #[serde(default)]
    pub path: Option<String>,
    #[serde(default)]
    pub code: Option<String>,
    #[serde(default)]
    pub expires_at: Option<chrono::DateTime<chrono::Utc>>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Registration {
    pub peer_id: String,
    pub display_name: String,
    pub group_id: String,
    pub token: String,
    /// The group's last event before the registration: its stream, resumed from here,
    /// misses nothing sent to the new peer. (Older servers do not say.)
    #[serde(default)]
    pub events_after: Option<u64>,
}

/// Where the daemon's credential for each server is read from (the daemon keeps them).
pub trait Credentials: Send + Sync {
    fn daemon_token(&self, server: &str) -> Option<String>;
}

#[derive(Clone)]
pub struct ServerApi {
    http: reqwest::Client,
    /// For live event streams: each on a connection of its own, never one pooled from a
    /// request (the server serves a fresh stream connection leaner), and not pooled after.
    streams: reqwest::Client,
}

/// What a registration asks for.
pub struct PeerRequest<'a> {
    pub group: &'a str,
    pub hostname: &'a str,
    pub working_directory: &'a str,
    pub git_branch: Option<&'a str>,
    pub name: Option<&'a str>,
    pub join_key: Option<&'a str>,
}

impl Default for ServerApi {
    fn default() -> Self {
        Self::new()
    }
}

impl ServerApi {
    pub fn new() -> Self {
        let client = |pool: usize, timeout: Option<Duration>| {
            let builder = reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(10))
                .user_agent(concat!("relayd/", env!("CARGO_PKG_VERSION")))
                .pool_max_idle_per_host(pool);
            let builder = match timeout {
                Some(t) => builder.timeout(t),
                None => builder,
            };
            builder.build().expect("an HTTP client with default settings builds")
        };
        // a server that stops answering must not hold an attach or a batch of receipts forever
        Self { http: client(usize::MAX, Some(REQUEST_TIMEOUT)), streams: client(0, None) }
    }

    async fn send(&self, server: &str, request: reqwest::RequestBuilder) -> Result<Value, ApiError> {
        let unreachable = |source| ApiError::Unreachable { server: server.to_owned(), source };
        let resp = request.send().await.map_err(unreachable)?;
        let status = resp.status();
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        if status.is_success() {
            return Ok(body);
        }
        let message = body["error"].as_str().map_or_else(|| status.to_string(), str::to_owned);
        Err(ApiError::Refused { server: server.to_owned(), status: status.as_u16(), message })
    }

    pub async fn create_daemon(&self, server: &str, hostname: &str) -> Result<(String, String), ApiError> {
        let body = self.send(server, self.http.post(format!("{server}/v1/daemons")).json(&json!({"hostname": hostname}))).await?;
        let field = |k: &str| body[k].as_str().unwrap_or_default().to_owned();
        Ok((field("daemon_id"), field("token")))
    }

    pub async fn register(&self, server: &str, daemon_token: &str, req: &PeerRequest<'_>) -> Result<Registration, ApiError> {
        let body = json!({
            "group_id": req.group,
            "hostname": req.hostname,
            "working_directory": req.working_directory,
            "git_branch": req.git_branch,
            "name": req.name,
            "join_key": req.join_key,
        });
        self.typed(server, self.http.post(format!("{server}/v1/peers")).bearer_auth(daemon_token).json(&body)).await
    }

    pub async fn remove_peer(&self, server: &str, daemon_token: &str, peer_id: &str) -> Result<(), ApiError> {
        let request = self.http.delete(format!("{server}/v1/peers/{peer_id}")).bearer_auth(daemon_token);
        match self.send(server, request).await {
            // already gone is gone
            Err(ApiError::Refused { status: 404, .. }) | Ok(_) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Where this daemon's peers got with messages sent to them.
    pub async fn report(&self, server: &str, daemon_token: &str, receipts: &[PeerReceipt]) -> Result<Value, ApiError> {
        let request = self.http.post(format!("{server}/v1/receipts")).bearer_auth(daemon_token).json(&json!({"receipts": receipts}));
        self.send(server, request).await
    }

    /// Who is in the group of the daemon's peer `peer_id`, as that peer sees them.
    pub async fn peers(&self, server: &str, daemon_token: &str, peer_id: &str) -> Result<Vec<PeerInfo>, ApiError> {
        #[derive(Deserialize)]
        struct Peers {
            peers: Vec<PeerInfo>,
        }
        let request = self.http.get(format!("{server}/v1/peers/{peer_id}/peers")).bearer_auth(daemon_token);
        self.typed::<Peers>(server, request).await.map(|p| p.peers)
    }

    /// Where the copies of a message stand, asked as the daemon's peer `peer_id`.
    pub async fn message_status(
        &self,
        server: &str,
        daemon_token: &str,
        peer_id: &str,
        message_id: &str,
    ) -> Result<MessageStatus, ApiError> {
        let request = self.http.get(format!("{server}/v1/peers/{peer_id}/messages/{message_id}")).bearer_auth(daemon_token);
        self.typed(server, request).await
    }

    /// Sends as the daemon's peer `peer_id`: to its group, or a DM `to` one peer.
    pub async fn send_as(&self, server: &str, daemon_token: &str, peer_id: &str, req: &SendRequest) -> Result<Sent, ApiError> {
        let body = json!({"message": req.text, "to": req.to, "idempotency_key": req.idempotency_key});
        let request = self.http.post(format!("{server}/v1/peers/{peer_id}/messages")).bearer_auth(daemon_token).json(&body);
        self.typed(server, request).await
    }

    /// The console for this daemon's human: what `action` asks (see relay-server's
    /// `/v1/console/…`), as the server answers it.
    pub async fn console(&self, server: &str, daemon_token: &str, action: &ConsoleAction) -> Result<ConsoleAnswer, ApiError> {
        let (path, body) = match action {
            ConsoleAction::SignIn { name } => ("sign-in", json!({"name": name})),
            ConsoleAction::SignOutEverywhere => ("sign-out-everywhere", json!({})),
            ConsoleAction::Pair { name } => ("pairings", json!({"name": name})),
            ConsoleAction::Join { code } => ("join", json!({"code": code})),
        };
        let request = self.http.post(format!("{server}/v1/console/{path}")).bearer_auth(daemon_token).json(&body);
        self.typed(server, request).await
    }

    /// What the daemon's peer `peer_id`'s agent is doing: idle, busy or waiting.
    pub async fn activity(&self, server: &str, daemon_token: &str, peer_id: &str, activity: &str) -> Result<(), ApiError> {
        let request =
            self.http.post(format!("{server}/v1/peers/{peer_id}/activity")).bearer_auth(daemon_token).json(&json!({"activity": activity}));
        self.send(server, request).await.map(drop)
    }

    async fn typed<T: serde::de::DeserializeOwned>(&self, server: &str, request: reqwest::RequestBuilder) -> Result<T, ApiError> {
        let value = self.send(server, request).await?;
        serde_json::from_value(value).map_err(|e| ApiError::Refused {
            server: server.to_owned(),
            status: 200,
            message: format!("unexpected reply: {e}"),
        })
    }

    /// The group's event stream for this daemon, resuming after `last_event_id`.
    pub async fn events(
        &self,
        server: &str,
        daemon_token: &str,
        group: &str,
        last_event_id: Option<u64>,
        once: bool,
    ) -> Result<reqwest::Response, ApiError> {
        let mut url = format!("{server}/v1/groups/{group}/events");
        if once {
            url.push_str("?once=true");
        }
        let client = if once { &self.http } else { &self.streams };
        let mut request = client.get(url).bearer_auth(daemon_token).header("accept", "text/event-stream");
        // 0 too: a group whose log was empty when its pane joined replays all of it
        if let Some(last) = last_event_id {
            request = request.header("last-event-id", last.to_string());
        }
        let unreachable = |source| ApiError::Unreachable { server: server.to_owned(), source };
        let resp = request.send().await.map_err(unreachable)?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status();
        let message = resp.text().await.unwrap_or_default().trim().to_owned();
        Err(ApiError::Refused { server: server.to_owned(), status: status.as_u16(), message })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// The request head `events` sends for `last`, as a server receives it.
    async fn events_request(last: Option<u64>) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server = format!("http://{}", listener.local_addr().unwrap());
        let answer = tokio::spawn(async move {
            let (mut tcp, _) = listener.accept().await.unwrap();
            let mut head = Vec::new();
            while !head.ends_with(b"\r\n\r\n") {
                let mut byte = [0u8; 1];
                assert_eq!(tcp.read(&mut byte).await.unwrap(), 1, "the request ended early");
                head.push(byte[0]);
            }
            tcp.write_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: 0\r\n\r\n").await.unwrap();
            String::from_utf8(head).unwrap().to_ascii_lowercase()
        });
        ServerApi::new().events(&server, "t", "team", last, false).await.unwrap();
        answer.await.unwrap()
    }

    #[tokio::test]
    async fn a_stream_resumes_from_any_position_it_has_even_zero() {
        assert!(events_request(Some(7)).await.contains("\r\nlast-event-id: 7\r\n"));
        // 0: a group whose log was empty when its pane joined; from the start, not from now
        assert!(events_request(Some(0)).await.contains("\r\nlast-event-id: 0\r\n"));
        assert!(!events_request(None).await.contains("last-event-id"));
    }
}
