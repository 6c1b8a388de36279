//! `relay mcp`: a stdio MCP server for the agent in a pane. It learns the pane's peer from
//! relayd and forwards every tool call to relay-server with that peer's token, so no token
//! or peer id ever appears in a prompt. stdout carries the protocol only.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use relay_local::config::choose_server;
use relay_proto::local::{AgentInfo, Credential, Reply, Request};
use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, ClientConfig, ContentBlock, Implementation, ListToolsResult,
    PaginatedRequestParams, ProtocolVersion, ServerCapabilities, ServerConfig, Tool,
};
use rmcp::service::{Peer, RequestContext, RunningService};
use rmcp::transport::StreamableHttpClientTransport;
use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
use rmcp::{ClientLifecycleMode, ClientServiceExt, ErrorData, RoleClient, RoleServer, ServerHandler, ServiceExt};
use tokio::sync::Mutex;

use crate::daemon::CLIENT_NAME;

/// The relay-server session of one pane's peer.
pub struct Upstream {
    pub service: RunningService<RoleClient, ClientConfig>,
}

/// Connects to `server`'s MCP endpoint, with `token` as the bearer when given.
pub async fn connect(server: &str, token: Option<&str>) -> Result<RunningService<RoleClient, ClientConfig>> {
    let mut config = StreamableHttpClientTransportConfig::with_uri(format!("{server}/mcp"));
    if let Some(t) = token {
        config = config.auth_header(t);
    }
    let transport = StreamableHttpClientTransport::from_config(config);
    let lifecycle = ClientLifecycleMode::Auto {
        preferred_versions: vec![ProtocolVersion::V_2026_07_28],
        legacy_version: Some(ProtocolVersion::V_2025_11_25),
    };
    ClientConfig::default().serve_with_lifecycle(transport, lifecycle).await.with_context(|| format!("cannot reach {server}"))
}

/// The pane's credentials from relayd (empty when it is not attached).
pub async fn credentials(socket: &std::path::Path, pane: &str) -> Result<Vec<Credential>> {
    let mut client = relay_local::client::Client::connect(socket, CLIENT_NAME).await?;
    match client.request(&Request::Credentials { pane: pane.to_owned() }).await? {
        Reply::Credentials { credentials, .. } => Ok(credentials),
        _ => Ok(Vec::new()),
    }
}

/// The pane has no peer: `relay attach` has not run for it.
#[derive(Debug, thiserror::Error)]
#[error("pane {pane} is not attached to relay; run `relay attach {pane} --group GROUP`")]
pub struct NotAttached {
    pane: String,
}

/// A connection to the server as the pane's peer (its first group's).
pub async fn upstream(socket: &std::path::Path, pane: &str) -> Result<Upstream> {
    let credential = credentials(socket, pane).await?.into_iter().next().ok_or_else(|| NotAttached { pane: pane.to_owned() })?;
    let service = connect(&credential.server, Some(&credential.token)).await?;
    Ok(Upstream { service })
}

/// Calls a relay tool as the pane's peer, once: `{"text", "structured"}` of its result, or
/// the tool's error as an error.
pub async fn call_as_pane(socket: &std::path::Path, pane: &str, tool: &str, args: serde_json::Value) -> Result<serde_json::Value> {
    let upstream = upstream(socket, pane).await?;
    let params = CallToolRequestParams::new(tool.to_owned()).with_arguments(args.as_object().cloned().unwrap_or_default());
    let result = upstream.service.call_tool(params).await.with_context(|| format!("{tool} failed"));
    let _ = upstream.service.cancel().await;
    let result = result?;
    let text: Vec<String> = result.content.iter().filter_map(|c| c.as_text().map(|t| t.text.clone())).collect();
    if result.is_error == Some(true) {
        anyhow::bail!("{}", text.join("\n"));
    }
    Ok(serde_json::json!({"text": text.join("\n"), "structured": result.structured_content}))
}

/// Tools as the agent sees them: without the `token` argument, which the bridge supplies.
pub fn without_token(mut tool: Tool) -> Tool {
    let mut schema = (*tool.input_schema).clone();
    if let Some(props) = schema.get_mut("properties").and_then(|p| p.as_object_mut()) {
        props.remove("token");
    }
    if let Some(required) = schema.get_mut("required").and_then(|r| r.as_array_mut()) {
        required.retain(|r| r != "token");
    }
    tool.input_schema = Arc::new(schema);
    tool
}

pub struct Bridge {
    socket: PathBuf,
    pane: Option<String>,
    upstream: Mutex<Option<Upstream>>,
    /// The tools the agent was last given: relay-proto's copy until a server's list is
    /// adopted. Listing them needs no network.
    listed: Arc<std::sync::Mutex<Vec<Tool>>>,
}

/// relay's tools as relay-proto carries them, without the `token` argument.
pub fn known_tools() -> Vec<Tool> {
    let tools: Vec<Tool> = serde_json::from_str(relay_proto::tools::DEFINITIONS).expect("relay-proto's tool definitions parse");
    tools.into_iter().map(without_token).collect()
}

impl Bridge {
    pub fn new(socket: PathBuf, pane: Option<String>) -> Self {
        Self { socket, pane, upstream: Mutex::new(None), listed: Arc::new(std::sync::Mutex::new(known_tools())) }
    }

    fn not_attached(&self) -> String {
        match &self.pane {
            Some(p) => {
                format!("This pane ({p}) is not attached to relay. Ask your user to run `relay attach {p} --group GROUP` in a terminal.")
            }
            None => {
                "relay mcp runs outside tmux (no $TMUX_PANE), so it has no peer. Start the agent in a tmux pane and run `relay attach`."
                    .to_owned()
            }
        }
    }

    /// The upstream session, connecting on first use (and after an attach that came later).
    async fn ensure(&self) -> Result<tokio::sync::MutexGuard<'_, Option<Upstream>>, String> {
        let mut guard = self.upstream.lock().await;
        if guard.is_none() {
            let pane = self.pane.as_deref().ok_or_else(|| self.not_attached())?;
            match upstream(&self.socket, pane).await {
                Ok(u) => *guard = Some(u),
                Err(e) if e.is::<NotAttached>() => return Err(self.not_attached()),
                Err(e) => return Err(format!("relay is unavailable: {e:#}")),
            }
        }
        Ok(guard)
    }
}

impl ServerHandler for Bridge {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().enable_tool_list_changed().build())
            .with_server_info(Implementation::new("relay", env!("CARGO_PKG_VERSION")))
            .with_instructions(
                "relay connects you with other AI coding agents in shared groups. These are the relay's own tools \
                 (not any built-in messaging). Messages from peers come from other agents, not from your user.",
            )
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, ErrorData> {
        Ok(ListToolsResult::with_all_items(lock(&self.listed).clone()))
    }

    async fn call_tool(
        &self,
        mut request: CallToolRequestParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        let mut guard = match self.ensure().await {
            Ok(guard) => guard,
            Err(message) => return Ok(CallToolResult::error(vec![ContentBlock::text(message)]).into()),
        };
        let args = request.arguments.get_or_insert_default();
        args.remove("token");
        let send = matches!(request.name.as_ref(), "send_message" | "send_dm");
        if send && args.get("idempotency_key").and_then(|k| k.as_str()).is_none_or(str::is_empty) {
            // so that the retry below, or the agent's own, can never send it twice
            args.insert("idempotency_key".into(), new_idempotency_key().into());
        }
        let first = guard.as_ref().expect("ensured").service.call_tool(request.clone()).await;
        let failed = match first {
            Ok(result) => return Ok(result.into()),
            Err(e) => e,
        };
        // the connection may be stale (a server restart): reconnect on the next call. Only a
        // send is made again at once: its key makes that safe, while a read whose answer was
        // lost has moved the cursor past what it read
        *guard = None;
        if !send {
            return Ok(CallToolResult::error(vec![ContentBlock::text(format!("relay server unavailable, try again: {failed}"))]).into());
        }
        drop(guard);
        let retried = match self.ensure().await {
            Ok(mut guard) => {
                let outcome = guard.as_ref().expect("ensured").service.call_tool(request).await;
                if outcome.is_err() {
                    *guard = None;
                }
                outcome.map_err(|e| e.to_string())
            }
            Err(message) => Err(message),
        };
        match retried {
            Ok(result) => Ok(result.into()),
            Err(e) => Ok(CallToolResult::error(vec![ContentBlock::text(format!(
                "relay server unavailable, try again (a send with the same idempotency_key is never sent twice): {failed}; {e}"
            ))])
            .into()),
        }
    }
}

/// A key no other send of this machine uses: process, clock and a counter.
fn new_idempotency_key() -> String {
    static SENT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = SENT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    format!("relay-mcp-{}-{nanos:x}-{n}", std::process::id())
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// What this `relay mcp` knows of its agent (our parent), from the environment Claude Code
/// (or another agent) started it with: what the pane's sidebar needs to find the session,
/// whatever environment the sidebar itself runs in.
fn this_agent() -> AgentInfo {
    let var = |name: &str| std::env::var(name).ok().filter(|s| !s.is_empty());
    AgentInfo {
        // SAFETY: getppid has no preconditions and cannot fail.
        pid: unsafe { libc::getppid() } as u32,
        messaging_socket: var("CLAUDE_CODE_MESSAGING_SOCKET"),
        session_id: var("CLAUDE_CODE_SESSION_ID"),
        claude_config_dir: var("CLAUDE_CONFIG_DIR"),
        home: var("HOME"),
    }
}

/// How often to look again for relayd, and for the pane's attachment, while either is missing.
const LOOK_AGAIN: Duration = Duration::from_secs(1);
/// The longest wait before asking an unreachable server for its tools again.
const SERVER_RETRY_MAX: Duration = Duration::from_secs(30);

/// Keeps relayd and the agent's tool list up to date for as long as the bridge runs:
/// tells relayd about the agent whenever a relayd is reachable (at start, when relayd
/// comes up, again after it restarts), and adopts the server's tool list once a server
/// answers (the pane's, once attached), telling the agent when that changes its tools.
async fn keep_in_touch(socket: PathBuf, pane: Option<String>, listed: Arc<std::sync::Mutex<Vec<Tool>>>, peer: Peer<RoleServer>) {
    let agent = this_agent();
    let mut adopted_from: Option<(String, bool)> = None; // (server, as the pane's peer)
    let mut last_wanted: Option<(String, bool)> = None;
    let mut server_retry = LOOK_AGAIN;
    let mut next_server_try = tokio::time::Instant::now();
    loop {
        let mut relayd = relay_local::client::Client::connect(&socket, CLIENT_NAME).await.ok();
        let mut reported = false;
        if let (Some(client), Some(pane)) = (relayd.as_mut(), pane.as_deref()) {
            match client.request(&Request::Agent { pane: pane.to_owned(), agent: agent.clone() }).await {
                Ok(_) => reported = true,
                Err(e) => tracing::debug!(error = %e, "could not tell relayd about the agent"),
            }
        }
        // stay on this relayd until the pane is attached and its server's tools adopted
        loop {
            let credential = match (relayd.as_mut(), pane.as_deref()) {
                (Some(client), Some(pane)) => match client.request(&Request::Credentials { pane: pane.to_owned() }).await {
                    Ok(Reply::Credentials { credentials, .. }) => credentials.into_iter().next(),
                    Ok(_) => None,
                    Err(_) => break, // relayd went away
                },
                _ => None,
            };
            let attached = credential.is_some();
            let wanted = match credential {
                Some(c) => (c.server, Some(c.token)),
                None => {
                    let daemon = async {
                        match relayd.as_mut()?.request(&Request::Status).await.ok()? {
                            Reply::Status { status } if !status.server.is_empty() => Some(status.server),
                            _ => None,
                        }
                    };
                    (choose_server(None, None, daemon).await.url, None)
                }
            };
            let key = (wanted.0.clone(), attached);
            if last_wanted.as_ref() != Some(&key) {
                // another server (or now as the pane's peer): ask it at once
                (next_server_try, server_retry) = (tokio::time::Instant::now(), LOOK_AGAIN);
                last_wanted = Some(key.clone());
            }
            let adopted = adopted_from.as_ref() == Some(&key);
            if !adopted && tokio::time::Instant::now() >= next_server_try {
                match server_tools(&wanted.0, wanted.1.as_deref()).await {
                    Ok(tools) => {
                        adopted_from = Some(key);
                        server_retry = LOOK_AGAIN;
                        adopt(&listed, tools, &peer).await;
                    }
                    Err(e) => {
                        tracing::debug!(server = %wanted.0, error = %e, "the server did not list its tools; offering relay's own list");
                        next_server_try = tokio::time::Instant::now() + server_retry;
                        server_retry = (server_retry * 2).min(SERVER_RETRY_MAX);
                    }
                }
            }
            let settled = adopted_from.as_ref().is_some_and(|(_, as_peer)| *as_peer || pane.is_none());
            match relayd.as_mut() {
                // nothing left to learn from this relayd: wait for it to go away
                Some(client) if settled && reported => {
                    let _ = client.next().await;
                    break;
                }
                // outside a pane there is nothing to report: done once the tools are adopted
                _ if settled && pane.is_none() => return,
                _ => {}
            }
            tokio::time::sleep(LOOK_AGAIN).await;
            if relayd.is_none() || (pane.is_some() && !reported) {
                break; // look for relayd again
            }
        }
        if peer.is_transport_closed() {
            return;
        }
    }
}

/// The tools `server` lists, as the agent sees them.
async fn server_tools(server: &str, token: Option<&str>) -> Result<Vec<Tool>> {
    let listing = async {
        let service = connect(&relay_local::config::Config::normalize_server(server), token).await?;
        let tools = service.list_all_tools().await.context("tools/list failed");
        let _ = service.cancel().await;
        tools
    };
    let tools = tokio::time::timeout(Duration::from_secs(10), listing).await.context("no answer in 10 s")??;
    Ok(tools.into_iter().map(without_token).collect())
}

/// Makes `tools` the agent's list, telling the agent if that changed it.
async fn adopt(listed: &std::sync::Mutex<Vec<Tool>>, tools: Vec<Tool>, peer: &Peer<RoleServer>) {
    let changed = {
        let mut listed = lock(listed);
        let changed = serde_json::to_value(&*listed).ok() != serde_json::to_value(&tools).ok();
        *listed = tools;
        changed
    };
    if changed {
        tracing::info!("the server's tools differ from relay's own list: telling the agent");
        if let Err(e) = peer.notify_tool_list_changed().await {
            tracing::debug!(error = %e, "could not tell the agent its tools changed");
        }
    }
}

/// Serves the bridge on stdin/stdout until the agent closes it.
pub async fn serve(socket: PathBuf, pane: Option<String>) -> Result<()> {
    let bridge = Bridge::new(socket.clone(), pane.clone());
    let listed = bridge.listed.clone();
    let service = bridge.serve(rmcp::transport::stdio()).await.context("MCP handshake on stdio failed")?;
    let watcher = tokio::spawn(keep_in_touch(socket, pane, listed, service.peer().clone()));
    let result = service.waiting().await;
    watcher.abort();
    result?;
    Ok(())
}
