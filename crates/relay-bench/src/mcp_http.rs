//! A lean MCP-over-HTTP client for load: one reqwest pool, requests built by hand, either
//! protocol generation. (rmcp's client is for correctness; this one is for volume.)

use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, Result, bail};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use serde_json::{Value, json};

const MODERN: &str = "2026-07-28";
const LEGACY: &str = "2025-11-25";

pub struct McpHttp {
    http: reqwest::Client,
    url: String,
    headers: HeaderMap,
    /// Set when the server only speaks the session-based protocol.
    session: Option<String>,
    next_id: AtomicU64,
}

impl McpHttp {
    /// Probes `server/discover`; falls back to `initialize` with a session.
    pub async fn connect(http: reqwest::Client, url: &str, extra_headers: &[(String, String)]) -> Result<Self> {
        let mut headers = HeaderMap::new();
        headers.insert("accept", HeaderValue::from_static("application/json, text/event-stream"));
        headers.insert("content-type", HeaderValue::from_static("application/json"));
        for (k, v) in extra_headers {
            headers.insert(HeaderName::try_from(k.as_str())?, HeaderValue::try_from(v.as_str())?);
        }
        let mut client = Self { http, url: url.to_owned(), headers, session: None, next_id: AtomicU64::new(1) };
        let discover = client.request("server/discover", json!({}), None).await;
        let modern = discover.ok().is_some_and(|r| {
            r["supportedVersions"].as_array().is_some_and(|v| v.iter().any(|x| x == MODERN))
        });
        if !modern {
            client.initialize().await.context("neither server/discover nor initialize worked")?;
        }
        Ok(client)
    }

    async fn initialize(&mut self) -> Result<()> {
        let body = json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
            "protocolVersion": LEGACY, "capabilities": {}, "clientInfo": {"name": "relay-bench", "version": "0.1"}}});
        let resp = self.http.post(&self.url).headers(self.headers.clone()).body(body.to_string()).send().await?;
        self.session = resp.headers().get("mcp-session-id").and_then(|v| v.to_str().ok()).map(str::to_owned);
        let result = parse_response(resp).await?;
        if result.get("error").is_some() {
            bail!("initialize failed: {result}");
        }
        let note = json!({"jsonrpc": "2.0", "method": "notifications/initialized"});
        let mut req = self.http.post(&self.url).headers(self.headers.clone()).header("mcp-protocol-version", LEGACY);
        if let Some(s) = &self.session {
            req = req.header("mcp-session-id", s);
        }
        req.body(note.to_string()).send().await?;
        Ok(())
    }

    /// A `tools/call`; the result object, or an error for protocol and tool errors alike.
    pub async fn call_tool(&self, name: &str, args: &Value) -> Result<Value> {
        let result = self.request("tools/call", json!({"name": name, "arguments": args}), Some(name)).await?;
        if result["isError"] == true {
            bail!("{name} failed: {}", result["content"][0]["text"]);
        }
        Ok(result)
    }

    async fn request(&self, method: &str, mut params: Value, tool: Option<&str>) -> Result<Value> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut req = self.http.post(&self.url).headers(self.headers.clone());
        match &self.session {
            None => {
                params["_meta"] = json!({
                    "io.modelcontextprotocol/protocolVersion": MODERN,
                    "io.modelcontextprotocol/clientInfo": {"name": "relay-bench", "version": "0.1"},
                    "io.modelcontextprotocol/clientCapabilities": {}
                });
                req = req.header("mcp-protocol-version", MODERN).header("mcp-method", method);
                if let Some(t) = tool {
                    req = req.header("mcp-name", t);
                }
            }
            Some(session) => req = req.header("mcp-protocol-version", LEGACY).header("mcp-session-id", session),
        }
        let body = json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params});
        let resp = req.body(body.to_string()).send().await?;
        let reply = parse_response(resp).await?;
        match reply.get("result") {
            Some(result) => Ok(result.clone()),
            None => bail!("{method}: {}", reply.get("error").unwrap_or(&reply)),
        }
    }
}

/// The JSON-RPC reply, from a JSON body or the first `data:` of an SSE body.
async fn parse_response(resp: reqwest::Response) -> Result<Value> {
    let status = resp.status();
    let text = resp.text().await?;
    if let Ok(v) = serde_json::from_str::<Value>(&text) {
        return Ok(v);
    }
    for line in text.lines() {
        if let Some(data) = line.strip_prefix("data:")
            && let Ok(v) = serde_json::from_str::<Value>(data.trim())
                && v.get("id").is_some() {
                    return Ok(v);
                }
    }
    bail!("HTTP {status}: {}", text.chars().take(200).collect::<String>())
}
