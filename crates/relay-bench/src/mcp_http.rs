//! A lean MCP-over-HTTP client for load: kept-alive plain HTTP/1.1 connections (see
//! `http1`), requests built by hand, either protocol generation. (rmcp's client is for
//! correctness; this one is for volume.)

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, Result, bail, ensure};
use serde_json::{Value, json};

use crate::http1::{self, Pool};

const MODERN: &str = "2026-07-28";
const LEGACY: &str = "2025-11-25";

pub struct McpHttp {
    pool: Pool,
    path: String,
    /// Header lines sent with every request, each ending in CRLF.
    headers: String,
    /// Set when the server only speaks the session-based protocol (its session, if it
    /// gave one, is in `headers`).
    legacy: bool,
    next_id: AtomicU64,
}

impl McpHttp {
    /// Probes `server/discover`; falls back to `initialize` with a session.
    pub async fn connect(url: &str, extra_headers: &[(String, String)]) -> Result<Self> {
        let authority = http1::authority(url)?;
        let path = match &url["http://".len() + authority.len()..] {
            "" => "/",
            path => path,
        };
        let mut headers = String::from("accept: application/json, text/event-stream\r\ncontent-type: application/json\r\n");
        for (k, v) in extra_headers {
            ensure!(!format!("{k}{v}").contains(['\r', '\n']), "header {k:?} spans lines");
            write!(headers, "{k}: {v}\r\n")?;
        }
        let mut client =
            Self { pool: Pool::new(url)?, path: path.to_owned(), headers, legacy: false, next_id: AtomicU64::new(1) };
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
        let reply = self.pool.post(&self.path, &self.headers, body.to_string().as_bytes()).await?;
        let session = reply.head.header("mcp-session-id").map(|v| String::from_utf8_lossy(v).into_owned());
        ensure!(!session.as_deref().unwrap_or_default().contains(['\r', '\n']), "a session id that spans lines");
        let result = parse_reply(&reply)?;
        if result.get("error").is_some() {
            bail!("initialize failed: {result}");
        }
        write!(self.headers, "mcp-protocol-version: {LEGACY}\r\n")?;
        if let Some(s) = &session {
            write!(self.headers, "mcp-session-id: {s}\r\n")?;
        }
        self.legacy = true;
        let note = json!({"jsonrpc": "2.0", "method": "notifications/initialized"});
        self.pool.post(&self.path, &self.headers, note.to_string().as_bytes()).await?;
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
        let mut headers = self.headers.clone();
        if !self.legacy {
            params["_meta"] = json!({
                "io.modelcontextprotocol/protocolVersion": MODERN,
                "io.modelcontextprotocol/clientInfo": {"name": "relay-bench", "version": "0.1"},
                "io.modelcontextprotocol/clientCapabilities": {}
            });
            write!(headers, "mcp-protocol-version: {MODERN}\r\nmcp-method: {method}\r\n")?;
            if let Some(t) = tool {
                write!(headers, "mcp-name: {t}\r\n")?;
            }
        }
        let body = json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params});
        let reply = self.pool.post(&self.path, &headers, body.to_string().as_bytes()).await?;
        let reply = parse_reply(&reply)?;
        match reply.get("result") {
            Some(result) => Ok(result.clone()),
            None => bail!("{method}: {}", reply.get("error").unwrap_or(&reply)),
        }
    }
}

/// The JSON-RPC reply, from a JSON body or the first `data:` of an SSE body.
fn parse_reply(reply: &http1::Reply) -> Result<Value> {
    if let Ok(v) = serde_json::from_slice::<Value>(&reply.body) {
        return Ok(v);
    }
    let text = String::from_utf8_lossy(&reply.body);
    for line in text.lines() {
        if let Some(data) = line.strip_prefix("data:")
            && let Ok(v) = serde_json::from_str::<Value>(data.trim())
            && v.get("id").is_some()
        {
            return Ok(v);
        }
    }
    bail!("HTTP {}: {}", reply.head.status, text.chars().take(200).collect::<String>())
}
