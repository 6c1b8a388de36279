//! An MCP client (rmcp's) for tests, on either protocol generation.

use rmcp::model::{CallToolRequestParams, CallToolResult, ClientConfig, ProtocolVersion};
use rmcp::service::RunningService;
use rmcp::transport::StreamableHttpClientTransport;
use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
use rmcp::{ClientLifecycleMode, ClientServiceExt, RoleClient, ServiceExt};
use serde_json::Value;

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
    pub async fn connect(url: &str, token: Option<&str>, mode: Mode) -> Self {
        Self::try_connect(url, token, mode).await.unwrap_or_else(|e| panic!("connect to {url}: {e}"))
    }

    /// For tests that connect while the server may be down.
    pub async fn try_connect(url: &str, token: Option<&str>, mode: Mode) -> Result<Self, rmcp::service::ClientInitializeError> {
        let mut cfg = StreamableHttpClientTransportConfig::with_uri(url.to_owned());
        if let Some(t) = token {
            cfg = cfg.auth_header(t);
        }
        let transport = StreamableHttpClientTransport::from_config(cfg);
        let service = match mode {
            Mode::Stateless => {
                let lifecycle = ClientLifecycleMode::Discover { preferred_versions: vec![ProtocolVersion::V_2026_07_28] };
                ClientConfig::default().serve_with_lifecycle(transport, lifecycle).await?
            }
            Mode::Session => ClientConfig::default().with_protocol_version(ProtocolVersion::V_2025_11_25).serve(transport).await?,
        };
        Ok(Self { service })
    }

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

/// One stateless `tools/call` over plain HTTP, for tests where a connection may break
/// mid-call (a node killed behind a proxy): the tool's structured result, or why it failed,
/// a tool error and a broken connection alike.
pub async fn call_once(http: &reqwest::Client, url: &str, token: Option<&str>, tool: &str, args: Value) -> Result<Value, String> {
    let body = serde_json::json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {
        "name": tool, "arguments": args, "_meta": {
            "io.modelcontextprotocol/protocolVersion": "2026-07-28",
            "io.modelcontextprotocol/clientInfo": {"name": "relay-e2e", "version": "0.1"},
            "io.modelcontextprotocol/clientCapabilities": {}}}});
    let mut request = http
        .post(url)
        .header("accept", "application/json, text/event-stream")
        .header("mcp-protocol-version", "2026-07-28")
        .header("mcp-method", "tools/call")
        .header("mcp-name", tool)
        .json(&body);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.map_err(|e| format!("request failed: {e} ({:?})", std::error::Error::source(&e)))?;
    let status = response.status();
    let text = response.text().await.map_err(|e| format!("reply cut short: {e}"))?;
    // a reply framed as one SSE event carries the JSON on its data line
    let json = text.lines().find_map(|l| l.strip_prefix("data:")).unwrap_or(&text);
    let reply: Value = serde_json::from_str(json.trim()).map_err(|_| format!("{status}: {text}"))?;
    match &reply["result"] {
        Value::Null => Err(format!("{status}: {reply}")),
        result if result["isError"] == true => Err(result["content"][0]["text"].as_str().unwrap_or_default().to_owned()),
        result => Ok(result["structuredContent"].clone()),
    }
}
