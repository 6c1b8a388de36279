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
