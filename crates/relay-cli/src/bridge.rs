//! `relay mcp`: a stdio MCP server for the agent in a pane. It learns the pane's peer from
//! relayd and forwards every tool call to relay-server with that peer's token, so no token
//! or peer id ever appears in a prompt. stdout carries the protocol only.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use relay_proto::local::{AgentInfo, Credential, Reply, Request};
use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, ClientConfig, ContentBlock, Implementation, ListToolsResult,
    PaginatedRequestParams, ProtocolVersion, ServerCapabilities, ServerConfig, Tool,
};
use rmcp::service::{RequestContext, RunningService};
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
    let mut client = relayd::client::Client::connect(socket, CLIENT_NAME).await?;
    match client.request(&Request::Credentials { pane: pane.to_owned() }).await? {
        Reply::Credentials { credentials, .. } => Ok(credentials),
        _ => Ok(Vec::new()),
    }
}

/// A connection to the server as the pane's peer (its first group's).
pub async fn upstream(socket: &std::path::Path, pane: &str) -> Result<Upstream> {
    upstream_in(socket, pane, None).await
}

/// A connection to the server as the pane's peer in `group` (its first group's if None).
pub async fn upstream_in(socket: &std::path::Path, pane: &str, group: Option<&str>) -> Result<Upstream> {
    let credential = credentials(socket, pane).await?.into_iter().find(|c| group.is_none_or(|g| c.group == g)).with_context(|| {
        format!(
            "pane {pane} is not attached to relay{}; run `relay attach {pane} --group GROUP`",
            group.map(|g| format!(" in group {g}")).unwrap_or_default()
        )
    })?;
    let service = connect(&credential.server, Some(&credential.token)).await?;
    Ok(Upstream { service })
}

/// Calls a relay tool as the pane's peer, once: `{"text", "structured"}` of its result, or
/// the tool's error as an error.
pub async fn call_as_pane(socket: &std::path::Path, pane: &str, tool: &str, args: serde_json::Value) -> Result<serde_json::Value> {
    call_in_group(socket, pane, None, tool, args).await
}

/// [`call_as_pane`] as the pane's peer in `group`.
pub async fn call_in_group(
    socket: &std::path::Path,
    pane: &str,
    group: Option<&str>,
    tool: &str,
    args: serde_json::Value,
) -> Result<serde_json::Value> {
    let upstream = upstream_in(socket, pane, group).await?;
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
}

impl Bridge {
    pub fn new(socket: PathBuf, pane: Option<String>) -> Self {
        Self { socket, pane, upstream: Mutex::new(None) }
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
                Err(e) if e.to_string().contains("not attached") => return Err(self.not_attached()),
                Err(e) => return Err(format!("relay is unavailable: {e:#}")),
            }
        }
        Ok(guard)
    }

    /// The tool list when not attached: the server's that relayd attaches to, so the agent
    /// has the tools from the start (Claude Code asks once, when it starts) and they work as
    /// soon as the pane is attached.
    async fn anonymous_tools(&self) -> Vec<Tool> {
        let server = match std::env::var("RELAY_SERVER") {
            Ok(server) => server,
            Err(_) => relayd_server(&self.socket).await.unwrap_or_else(|| relayd::config::DEFAULT_SERVER.to_owned()),
        };
        match connect(&relayd::Config::normalize_server(&server), None).await {
            Ok(service) => {
                let tools = service.list_all_tools().await.unwrap_or_default();
                let _ = service.cancel().await;
                tools
            }
            Err(e) => {
                tracing::warn!(error = %e, "no tool list: not attached and no server reachable");
                Vec::new()
            }
        }
    }
}

impl ServerHandler for Bridge {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
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
        let tools = match self.ensure().await {
            Ok(guard) => match guard.as_ref() {
                Some(u) => u.service.list_all_tools().await.unwrap_or_default(),
                None => Vec::new(),
            },
            Err(_) => self.anonymous_tools().await,
        };
        Ok(ListToolsResult::with_all_items(tools.into_iter().map(without_token).collect()))
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
        if let Some(args) = request.arguments.as_mut() {
            args.remove("token");
        }
        let upstream = guard.as_ref().expect("ensured");
        match upstream.service.call_tool(request).await {
            Ok(result) => Ok(result.into()),
            Err(e) => {
                // the connection may be stale (server restart): reconnect on the next call
                *guard = None;
                Ok(CallToolResult::error(vec![ContentBlock::text(format!("relay server unavailable, try again: {e}"))]).into())
            }
        }
    }
}

/// The server relayd attaches panes to.
async fn relayd_server(socket: &std::path::Path) -> Option<String> {
    let mut client = relayd::client::Client::connect(socket, CLIENT_NAME).await.ok()?;
    match client.request(&Request::Status).await.ok()? {
        Reply::Status { status } if !status.server.is_empty() => Some(status.server),
        _ => None,
    }
}

/// Tells relayd who runs this `relay mcp`: the agent (our parent) and, for Claude Code, its
/// inbox socket, so the pane's sidebar delivers into the right session. Best effort.
async fn report_agent(socket: &std::path::Path, pane: &str) {
    let agent = AgentInfo {
        // SAFETY: getppid has no preconditions and cannot fail.
        pid: unsafe { libc::getppid() } as u32,
        messaging_socket: std::env::var("CLAUDE_CODE_MESSAGING_SOCKET").ok().filter(|s| !s.is_empty()),
        session_id: std::env::var("CLAUDE_CODE_SESSION_ID").ok().filter(|s| !s.is_empty()),
    };
    let reported = async {
        let mut client = relayd::client::Client::connect(socket, CLIENT_NAME).await?;
        client.request(&Request::Agent { pane: pane.to_owned(), agent }).await
    };
    match tokio::time::timeout(std::time::Duration::from_secs(2), reported).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => tracing::debug!(error = %e, "could not tell relayd about the agent"),
        Err(_) => tracing::debug!("relayd did not answer about the agent in 2 s"),
    }
}

/// Serves the bridge on stdin/stdout until the agent closes it.
pub async fn serve(socket: PathBuf, pane: Option<String>) -> Result<()> {
    if let Some(pane) = &pane {
        report_agent(&socket, pane).await;
    }
    let bridge = Bridge::new(socket, pane);
    let service = bridge.serve(rmcp::transport::stdio()).await.context("MCP handshake on stdio failed")?;
    service.waiting().await?;
    Ok(())
}
