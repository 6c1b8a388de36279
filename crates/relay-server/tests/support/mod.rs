//! An in-process relay-server on 127.0.0.1:0 and clients for it.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use relay_server::clock::SystemClock;
use relay_server::{Config, Relay};
use rmcp::model::{CallToolRequestParams, CallToolResult, ClientConfig, ProtocolVersion};
use rmcp::service::RunningService;
use rmcp::transport::StreamableHttpClientTransport;
use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
use rmcp::{ClientLifecycleMode, ClientServiceExt, RoleClient, ServiceExt};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

pub struct TestServer {
    pub addr: SocketAddr,
    pub relay: Arc<Relay>,
    shutdown: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

impl TestServer {
    /// Ephemeral storage, generous rate limits, unless `tweak` says otherwise.
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(tweak: impl FnOnce(&mut Config)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut config =
            Config { ephemeral: true, rate_burst: 10_000, rate_per_second: 10_000.0, ..Config::default() };
        config.data_dir = Some(dir.path().join("data"));
        tweak(&mut config);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let store = relay_server::open_store(&config).unwrap();
        let relay = Arc::new(Relay::new(store, Arc::new(SystemClock), config.limits()));
        let shutdown = CancellationToken::new();
        let task = tokio::spawn({
            let (relay, shutdown) = (relay.clone(), shutdown.clone());
            async move { relay_server::serve(relay, &config, listener, shutdown).await.unwrap() }
        });
        Self { addr, relay, shutdown, task: Some(task), _dir: dir }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// A client on the stateless protocol version, with a bearer token if given.
    pub async fn client(&self, token: Option<&str>) -> Client {
        self.client_with(token, Mode::Stateless).await
    }

    pub async fn client_with(&self, token: Option<&str>, mode: Mode) -> Client {
        let mut cfg = StreamableHttpClientTransportConfig::with_uri(self.url("/mcp"));
        if let Some(t) = token {
            cfg = cfg.auth_header(t);
        }
        let transport = StreamableHttpClientTransport::from_config(cfg);
        let service = match mode {
            Mode::Stateless => ClientConfig::default()
                .serve_with_lifecycle(transport, ClientLifecycleMode::Discover {
                    preferred_versions: vec![ProtocolVersion::V_2026_07_28],
                })
                .await
                .unwrap(),
            Mode::Session => ClientConfig::default()
                .with_protocol_version(ProtocolVersion::V_2025_11_25)
                .serve(transport)
                .await
                .unwrap(),
        };
        Client { service }
    }

    /// Registers a fresh agent and returns a client that sends its token as a header.
    pub async fn peer(&self, group: &str, dir: &str) -> (Client, Value) {
        let anon = self.client(None).await;
        let reg = anon.ok("register", json!({"group_id": group, "hostname": "box", "working_directory": dir})).await;
        let client = self.client(Some(reg["token"].as_str().unwrap())).await;
        (client, reg)
    }

    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(10), task).await.expect("server stops").unwrap();
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

#[derive(Clone, Copy, Debug)]
pub enum Mode {
    /// Protocol 2026-07-28: no session.
    Stateless,
    /// Protocol 2025-11-25 with an MCP session.
    Session,
}

pub struct Client {
    pub service: RunningService<RoleClient, ClientConfig>,
}

impl Client {
    pub async fn call(&self, tool: &str, args: Value) -> CallToolResult {
        let args = args.as_object().cloned().unwrap_or_default();
        let params = CallToolRequestParams::new(tool.to_owned()).with_arguments(args);
        self.service.call_tool(params).await.unwrap_or_else(|e| panic!("{tool}: protocol error {e}"))
    }

    /// Calls a tool that must succeed; returns its structured content.
    pub async fn ok(&self, tool: &str, args: Value) -> Value {
        let result = self.call(tool, args).await;
        assert_ne!(result.is_error, Some(true), "{tool} failed: {}", text(&result));
        result.structured_content.clone().unwrap_or_else(|| panic!("{tool} returned no structured content"))
    }

    /// Calls a tool that must fail; returns its error text.
    pub async fn err(&self, tool: &str, args: Value) -> String {
        let result = self.call(tool, args).await;
        assert_eq!(result.is_error, Some(true), "{tool} should have failed: {}", text(&result));
        text(&result)
    }
}

pub fn text(result: &CallToolResult) -> String {
    result.content.iter().filter_map(|c| c.as_text().map(|t| t.text.clone())).collect::<Vec<_>>().join("\n")
}

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
        let mut req = reqwest::Client::new().get(url).header("accept", "text/event-stream");
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(id) = last_event_id {
            req = req.header("last-event-id", id.to_string());
        }
        let resp = req.send().await.unwrap();
        let status = resp.status();
        let body = status.is_success().then(|| resp.bytes_stream().boxed());
        Self { status, body, buf: String::new(), comments: 0 }
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
