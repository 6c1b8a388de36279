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
        let mut client = Self { pool: Pool::new(url)?, path: path.to_owned(), headers, legacy: false, next_id: AtomicU64::new(1) };
        let discover = client.request("server/discover", json!({}), None).await;
        let modern = discover.ok().is_some_and(|r| r["supportedVersions"].as_array().is_some_and(|v| v.iter().any(|x| x == MODERN)));
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
        let call = self.prepare(name, args)?;
        tool_result(&call, &self.post(&call).await?)
    }

    /// A `tools/call` to send again and again with [`McpHttp::call_prepared`].
    pub fn prepare(&self, name: &str, args: &Value) -> Result<PreparedCall> {
        self.envelope("tools/call", json!({"name": name, "arguments": args}), Some(name))
    }

    /// Sends a prepared call; an error for protocol and tool errors alike. Under load:
    /// a reply is only looked at as far as saying whether it is an error.
    pub async fn call_prepared(&self, call: &PreparedCall) -> Result<()> {
        let reply = self.post(call).await?;
        if let Ok(Outcome { result: Some(ToolOutcome { is_error: false }) }) = serde_json::from_slice(&reply.body) {
            return Ok(());
        }
        // an error, or a reply framed as SSE: the whole reply says which
        tool_result(call, &reply).map(drop)
    }

    async fn request(&self, method: &str, params: Value, tool: Option<&str>) -> Result<Value> {
        let call = self.envelope(method, params, tool)?;
        into_result(&call.method, parse_reply(&self.post(&call).await?)?)
    }

    /// The headers and the body of a request but for its id.
    fn envelope(&self, method: &str, mut params: Value, tool: Option<&str>) -> Result<PreparedCall> {
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
        let mut body_before_id = json!({"jsonrpc": "2.0", "method": method, "params": params}).to_string().into_bytes();
        body_before_id.pop(); // the closing brace, which the id goes before
        body_before_id.extend_from_slice(b",\"id\":");
        Ok(PreparedCall { method: method.to_owned(), tool: tool.unwrap_or(method).to_owned(), headers, body_before_id })
    }

    async fn post(&self, call: &PreparedCall) -> Result<http1::Reply> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut body = Vec::with_capacity(call.body_before_id.len() + 24);
        body.extend_from_slice(&call.body_before_id);
        std::io::Write::write_fmt(&mut body, format_args!("{id}}}"))?;
        self.pool.post(&self.path, &call.headers, &body).await
    }
}

/// A request built once: all of it but the JSON-RPC id, which each send numbers afresh.
pub struct PreparedCall {
    method: String,
    /// The tool's name, or the method for other requests (for error messages).
    tool: String,
    headers: String,
    /// The JSON body up to the value of its last member, `"id"`.
    body_before_id: Vec<u8>,
}

/// As much of a `tools/call` reply as says whether it succeeded (the rest is skipped).
#[derive(serde::Deserialize)]
struct Outcome {
    result: Option<ToolOutcome>,
}

#[derive(serde::Deserialize)]
struct ToolOutcome {
    #[serde(rename = "isError", default)]
    is_error: bool,
}

/// The `result` of a JSON-RPC reply, or its error.
fn into_result(method: &str, mut reply: Value) -> Result<Value> {
    match reply.get_mut("result").map(Value::take) {
        Some(result) => Ok(result),
        None => bail!("{method}: {}", reply.get("error").unwrap_or(&reply)),
    }
}

/// A tool call's result, or an error when the call or the tool failed.
fn tool_result(call: &PreparedCall, reply: &http1::Reply) -> Result<Value> {
    let result = into_result(&call.method, parse_reply(reply)?)?;
    if result["isError"] == true {
        bail!("{} failed: {}", call.tool, result["content"][0]["text"]);
    }
    Ok(result)
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

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    /// Answers each request (on one connection) with the next of `replies`, as JSON, and
    /// keeps the request bodies.
    async fn server(replies: Vec<&'static str>) -> (String, Arc<Mutex<Vec<Value>>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/mcp", listener.local_addr().unwrap());
        let bodies = Arc::new(Mutex::new(Vec::new()));
        let seen = bodies.clone();
        tokio::spawn(async move {
            let (mut tcp, _) = listener.accept().await.unwrap();
            for reply in replies {
                let mut request = vec![0u8; 8192];
                let n = tcp.read(&mut request).await.unwrap();
                let text = String::from_utf8_lossy(&request[..n]).into_owned();
                let (_, body) = text.split_once("\r\n\r\n").unwrap();
                seen.lock().unwrap().push(serde_json::from_str::<Value>(body).unwrap());
                let kind = if reply.starts_with("data:") { "text/event-stream" } else { "application/json" };
                let head = format!("HTTP/1.1 200 OK\r\ncontent-type: {kind}\r\ncontent-length: {}\r\n\r\n", reply.len());
                tcp.write_all(format!("{head}{reply}").as_bytes()).await.unwrap();
            }
        });
        (url, bodies)
    }

    #[tokio::test]
    async fn a_prepared_call_is_numbered_afresh_and_its_failures_are_errors() {
        let (url, bodies) = server(vec![
            r#"{"jsonrpc":"2.0","id":1,"result":{"content":[{"type":"text","text":"ok"}],"isError":false}}"#,
            "data: {\"jsonrpc\":\"2.0\",\"id\":2,\"result\":{\"content\":[]}}\n\n",
            r#"{"jsonrpc":"2.0","id":3,"result":{"content":[{"type":"text","text":"boom"}],"isError":true}}"#,
            r#"{"jsonrpc":"2.0","id":4,"error":{"code":-32602,"message":"no such tool"}}"#,
        ])
        .await;
        let mcp = McpHttp {
            pool: Pool::new(&url).unwrap(),
            path: "/mcp".into(),
            headers: String::new(),
            legacy: false,
            next_id: AtomicU64::new(1),
        };
        let call = mcp.prepare("list_peers", &json!({"group_id": "g"})).unwrap();
        mcp.call_prepared(&call).await.unwrap();
        mcp.call_prepared(&call).await.expect("a success framed as SSE");
        let tool_error = mcp.call_prepared(&call).await.unwrap_err().to_string();
        assert!(tool_error.contains("list_peers failed") && tool_error.contains("boom"), "{tool_error}");
        let rpc_error = mcp.call_prepared(&call).await.unwrap_err().to_string();
        assert!(rpc_error.contains("no such tool"), "{rpc_error}");

        let bodies = bodies.lock().unwrap();
        let ids: Vec<_> = bodies.iter().map(|b| b["id"].as_u64().unwrap()).collect();
        assert_eq!(ids, [1, 2, 3, 4]);
        for b in bodies.iter() {
            assert_eq!(
                (&b["method"], &b["params"]["name"], &b["params"]["arguments"]),
                (&json!("tools/call"), &json!("list_peers"), &json!({"group_id": "g"}))
            );
            assert_eq!(b["params"]["_meta"]["io.modelcontextprotocol/protocolVersion"], MODERN);
        }
    }
}
