//! A Server-Sent Events reader for tests.

use std::time::Duration;

use futures::StreamExt;
use serde_json::Value;

/// One parsed SSE event.
#[derive(Debug, Clone)]
pub struct Sse {
    pub id: Option<String>,
    pub event: Option<String>,
    pub data: Value,
}

/// An open event stream, read event by event.
pub struct EventStream {
    pub status: reqwest::StatusCode,
    body: Option<futures::stream::BoxStream<'static, reqwest::Result<bytes::Bytes>>>,
    buf: String,
    pub comments: usize,
}

impl EventStream {
    pub async fn open(url: &str, token: Option<&str>, last_event_id: Option<u64>) -> Self {
        Self::try_open(url, token, last_event_id).await.unwrap_or_else(|e| panic!("open {url}: {e}"))
    }

    /// For tests that open streams while servers come and go.
    pub async fn try_open(url: &str, token: Option<&str>, last_event_id: Option<u64>) -> reqwest::Result<Self> {
        let mut req = reqwest::Client::new().get(url).header("accept", "text/event-stream");
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(id) = last_event_id {
            req = req.header("last-event-id", id.to_string());
        }
        let resp = req.send().await?;
        let status = resp.status();
        let body = status.is_success().then(|| resp.bytes_stream().boxed());
        Ok(Self { status, body, buf: String::new(), comments: 0 })
    }

    /// The next event with data, or None when the stream ends or `wait` passes.
    pub async fn next(&mut self, wait: Duration) -> Option<Sse> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            while let Some(end) = self.buf.find("\n\n") {
                let frame: String = self.buf.drain(..end + 2).collect();
                let (mut id, mut event, mut data) = (None, None, String::new());
                for line in frame.lines() {
                    if line.starts_with(':') {
                        self.comments += 1;
                    } else if let Some(v) = line.strip_prefix("id:") {
                        id = Some(v.trim().to_owned());
                    } else if let Some(v) = line.strip_prefix("event:") {
                        event = Some(v.trim().to_owned());
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.trim_start());
                    }
                }
                if !data.is_empty() {
                    return Some(Sse { id, event, data: serde_json::from_str(&data).unwrap() });
                }
            }
            let body = self.body.as_mut()?;
            match tokio::time::timeout_at(deadline, body.next()).await {
                Ok(Some(Ok(chunk))) => self.buf.push_str(&String::from_utf8_lossy(&chunk)),
                Ok(_) => {
                    self.body = None;
                    return None;
                }
                Err(_) => return None,
            }
        }
    }

    /// Every event that arrives within `wait`.
    pub async fn drain(&mut self, wait: Duration) -> Vec<Sse> {
        let mut out = Vec::new();
        while let Some(e) = self.next(wait).await {
            out.push(e);
        }
        out
    }

    pub fn ended(&self) -> bool {
        self.body.is_none()
    }
}

pub const SHORT: Duration = Duration::from_millis(300);
pub const LONG: Duration = Duration::from_secs(5);
